//! A shard's engine as the state machine of its group: the one piece of
//! replication logic that both hosts run — the daemon's shard loop
//! (`shard::cluster`) and the deterministic simulation (`sim`) — so the
//! simulation proves the code the server runs.
//!
//! The host executes a drain against its engine, as a standalone shard
//! does before its WAL commit, and hands over what it staged:
//! [`ReplicatedShard::propose`] makes those records, with the offsets the
//! leader assigned, one entry. The host answers the drain when
//! [`Progress::outcome`] says its entry was applied with the term it was
//! proposed in. If another entry takes that index first, the drain's
//! changes are undone here (before that entry is replayed) and the host
//! tells its callers the outcome is unknown. A host that stops waiting
//! (its commit timeout) calls [`ReplicatedShard::abandon`] after rolling
//! the drain back: whatever entry later lands at its index is replayed —
//! it may be the drain itself — and no drain runs before that.
//!
//! A drain of reads only is not logged: after the host executed it, the
//! leader asks the group to confirm its commit index (ReadIndex, one
//! heartbeat round). If the group confirms, this node led when the reads
//! ran, so they saw every committed write; if it stops leading first, the
//! reads are dropped and their callers retry.
//!
//! Entries the node did not propose (a follower's whole diet, a new
//! leader's inheritance) are replayed into the engine. Their records, and
//! those of the node's own committed drains, come back in log order in
//! [`Progress::write`]: what the host appends to its WAL.

use raft::prelude::Message;

use super::payload;
use super::replica::{Applied, Persist, ProposeError, Proposed, Replica};
use crate::commands::WatchEvent;
use crate::engine::{Engine, Staged};
use crate::wal_entry::WalEntry;

/// What became of the drain in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its entry is applied with its term: answer its callers.
    Committed(Proposed),
    /// Another entry took its index; its changes are undone. Its callers'
    /// outcome is unknown (a retry with an idempotency key is safe).
    Lost(Proposed),
    /// The reads are confirmed (this node still led): answer them.
    ReadConfirmed,
    /// This node stopped leading before the reads were confirmed: their
    /// callers retry.
    ReadLost,
}

/// A committed record, for the host's WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub kind: u8,
    pub bytes: Vec<u8>,
}

/// What one Ready came to for the host.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages to send now.
    pub send: Vec<Message>,
    /// The write to make, then [`ReplicatedShard::persisted`].
    pub persist: Option<Persist>,
    /// What became of the drain in flight, if that was decided.
    pub outcome: Option<Outcome>,
    /// Committed records to append to the WAL, in log order.
    pub write: Vec<Record>,
    /// Transitions among the replayed records (when asked to collect).
    pub events: Vec<WatchEvent>,
    /// The entries applied, in log order.
    pub applied: Vec<Applied>,
    /// A snapshot from the leader: the host replaces its state (engine and
    /// WAL) by this one, which holds every record below `offset`.
    pub install: Option<Install>,
}

/// A leader's state to replace the host's (see [`Progress::install`]).
#[derive(Debug)]
pub struct Install {
    /// Every record below this offset is in `state`.
    pub offset: u64,
    /// The host's own encoding of its engine (a snapshot file).
    pub state: Vec<u8>,
}

/// Where a snapshot of a leader's engine stands in its group's log (see
/// [`ReplicatedShard::snapshot_point`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotPoint {
    /// The last entry the snapshot holds.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The group's configuration there.
    pub conf_state: raft::prelude::ConfState,
    /// Every record below this offset is in the snapshot.
    pub offset: u64,
}

/// Why a drain cannot be proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// Another drain of this shard is still waiting for its commit.
    #[error("a drain is already in flight")]
    Busy,
    /// Not the leader, or a leader whose state is not yet current.
    #[error("not serving: {0}")]
    NotServing(ProposeError),
}

/// The drain waiting for its outcome.
enum InFlight {
    /// Executed; waiting for its entry. Its records go to the WAL once
    /// committed.
    Write {
        proposed: Proposed,
        staged: Vec<Staged>,
    },
    /// Reads executed; waiting for the group to confirm (`index`), then
    /// for the state to be applied that far.
    Read {
        ctx: Vec<u8>,
        term: u64,
        index: Option<u64>,
    },
    /// Given up on by the host (and rolled back there): whatever entry
    /// lands at its index is replayed.
    Abandoned(Proposed),
}

/// A shard replicated through its group.
pub struct ReplicatedShard {
    replica: Replica,
    in_flight: Option<InFlight>,
    /// Numbers ReadIndex requests (their context).
    reads: u64,
    /// The offset after everything the applied log holds or owns (an
    /// entry owns its drain's whole reserved range): the host's state has
    /// every record below it, and records below it (from entries raft
    /// hands over again after a restart) are skipped.
    applied_offset: u64,
}

impl ReplicatedShard {
    /// The shard's member `replica`; the host's state holds every record
    /// below `applied_offset`.
    pub fn new(replica: Replica, applied_offset: u64) -> ReplicatedShard {
        assert!(applied_offset >= 1, "offsets start at 1");
        let mut replica = replica;
        replica.raise_next_offset(applied_offset);
        ReplicatedShard {
            replica,
            in_flight: None,
            reads: 0,
            applied_offset,
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// Whether a drain is waiting for its outcome.
    pub fn busy(&self) -> bool {
        matches!(
            self.in_flight,
            Some(InFlight::Write { .. } | InFlight::Read { .. })
        )
    }

    /// Whether the host may execute a drain now: this node leads, its
    /// state holds every entry before its term's, no drain is in flight,
    /// and no abandoned drain's index is still open.
    pub fn can_serve(&self) -> bool {
        self.replica.can_serve() && self.in_flight.is_none()
    }

    /// Why the host may not execute a drain now.
    pub fn refusal(&self) -> Option<DrainError> {
        if self.busy() {
            return Some(DrainError::Busy);
        }
        if self.can_serve() {
            return None;
        }
        let leader = self.replica.role().2;
        Some(DrainError::NotServing(ProposeError::NotLeader {
            leader: (leader != 0 && !self.replica.is_leader()).then_some(leader),
        }))
    }

    /// The offset after everything the applied log holds or owns.
    pub fn applied_offset(&self) -> u64 {
        self.applied_offset
    }

    /// The first offset the next drain's records take.
    pub fn next_offset(&self) -> u64 {
        self.replica.next_offset().max(self.applied_offset)
    }

    /// Proposes the records a drain staged; the host executed it on its
    /// engine since the last commit, with the offsets `reserved` (from
    /// [`ReplicatedShard::next_offset`]). The entry owns the whole range,
    /// used or not, so no later leader hands out an offset in it: a reader
    /// that passed the range never misses a record in it.
    pub fn propose(
        &mut self,
        staged: Vec<Staged>,
        reserved: std::ops::Range<u64>,
    ) -> Result<Proposed, DrainError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        assert!(!staged.is_empty(), "a drain of writes stages records");
        assert!(
            reserved.start >= self.next_offset()
                && staged.iter().all(|s| reserved.contains(&s.offset)),
            "a drain's offsets lie in its range, from the next offset"
        );
        let mut data = Vec::new();
        payload::encode(&staged, &mut data);
        let first = reserved.start;
        self.replica.raise_next_offset(first);
        let count = u32::try_from(reserved.end - first).expect("a drain's offsets fit a u32");
        let proposed = self
            .replica
            .propose(&data, count)
            .map_err(DrainError::NotServing)?;
        debug_assert_eq!(proposed.offset, first);
        self.in_flight = Some(InFlight::Write { proposed, staged });
        Ok(proposed)
    }

    /// A drain of reads was executed: asks the group to confirm this
    /// node still leads.
    pub fn confirm_reads(&mut self) -> Result<(), DrainError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        self.reads += 1;
        let ctx = self.reads.to_le_bytes().to_vec();
        self.replica.read_index(ctx.clone());
        self.in_flight = Some(InFlight::Read {
            ctx,
            term: self.replica.role().0,
            index: None,
        });
        Ok(())
    }

    /// The host stops waiting for the drain in flight and has rolled it
    /// back. A write's index stays open (see the module docs); reads are
    /// simply dropped.
    pub fn abandon(&mut self) {
        self.in_flight = match self.in_flight.take() {
            Some(InFlight::Write { proposed, .. }) => Some(InFlight::Abandoned(proposed)),
            Some(InFlight::Abandoned(p)) => Some(InFlight::Abandoned(p)),
            Some(InFlight::Read { .. }) | None => None,
        };
    }

    /// Takes the replica's next Ready and applies what it committed to
    /// `engine`; `collect` asks for the replayed transitions.
    pub fn ready(&mut self, engine: &mut Engine, collect: bool) -> Result<Progress, String> {
        let out = self.replica.ready();
        let mut progress = Progress {
            send: out.send,
            persist: out.persist,
            ..Progress::default()
        };
        if let Some(snapshot) = out.install {
            // raft hands over entries after a snapshot only once it is
            // persisted: the host loads the snapshot before any of them.
            assert!(out.apply.is_empty(), "entries applied beside a snapshot");
            self.install(snapshot, &mut progress)?;
        }
        for a in out.apply {
            self.apply(engine, &a, collect, &mut progress)?;
            progress.applied.push(a);
        }
        self.advance_reads(out.reads, &mut progress);
        Ok(progress)
    }

    /// The write of Ready `number` is done: the messages that waited.
    pub fn persisted(&mut self, number: u64) -> Vec<Message> {
        self.replica.persisted(number)
    }

    /// Whether followers need a snapshot and the host may build one now:
    /// its engine holds exactly the applied log (no drain in flight).
    pub fn snapshot_wanted(&self) -> bool {
        !self.busy() && self.replica.log().snapshot_wanted()
    }

    /// Where a snapshot of the host's engine taken now stands: the applied
    /// index, its term, the configuration and the offset below which the
    /// engine holds every record. The host may take a while to serialize
    /// the engine (point-in-time, while drains go on): it offers the state
    /// with this point once done.
    pub fn snapshot_point(&self) -> SnapshotPoint {
        assert!(!self.busy(), "a snapshot of applied state only");
        let index = self.replica.applied();
        let term = raft::Storage::term(self.replica.log(), index)
            .expect("the applied index is in the log");
        SnapshotPoint {
            index,
            term,
            conf_state: self.replica.log().with_state(|s| s.conf_state.clone()),
            offset: self.applied_offset,
        }
    }

    /// Offers followers the host's `state`, its engine as of `point` (see
    /// [`ReplicatedShard::snapshot_point`]). A point the log has since been
    /// compacted past is never sent (raft asks again, and the host builds
    /// a newer one).
    pub fn offer_snapshot(&mut self, point: SnapshotPoint, state: &[u8]) {
        assert!(point.index <= self.replica.applied(), "a point of the past");
        let mut data = Vec::with_capacity(8 + state.len());
        data.extend_from_slice(&point.offset.to_le_bytes());
        data.extend_from_slice(state);
        let mut snapshot = raft::prelude::Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = point.index;
        meta.term = point.term;
        meta.set_conf_state(point.conf_state);
        self.replica.log().offer(snapshot);
    }

    /// The leader's snapshot replaces this node's state: a drain in flight
    /// is dropped (its callers' outcome is unknown), and the host gets the
    /// state to load.
    fn install(
        &mut self,
        snapshot: raft::prelude::Snapshot,
        progress: &mut Progress,
    ) -> Result<(), String> {
        let index = snapshot.get_metadata().index;
        let data = &snapshot.data[..];
        if data.len() < 8 {
            return Err(format!("snapshot at {index}: {} bytes", data.len()));
        }
        let offset = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        progress.outcome = match self.in_flight.take() {
            Some(InFlight::Write { proposed, .. }) => Some(Outcome::Lost(proposed)),
            Some(InFlight::Read { .. }) => Some(Outcome::ReadLost),
            Some(InFlight::Abandoned(p)) => {
                if p.index > index {
                    self.in_flight = Some(InFlight::Abandoned(p));
                }
                None
            }
            None => None,
        };
        self.applied_offset = offset;
        self.replica.raise_next_offset(offset);
        progress.install = Some(Install {
            offset,
            state: data[8..].to_vec(),
        });
        Ok(())
    }

    /// Moves the drain of reads on: note its confirmed index, answer it
    /// once applied that far, or drop it if this node lost office (raft-rs
    /// drops the request silently then).
    fn advance_reads(&mut self, answers: Vec<(Vec<u8>, u64)>, progress: &mut Progress) {
        let (term_now, leading) = (self.replica.role().0, self.replica.is_leader());
        let Some(InFlight::Read { ctx, term, index }) = &mut self.in_flight else {
            return;
        };
        if let Some((_, at)) = answers.iter().find(|(c, _)| c == ctx) {
            *index = Some(*at);
        }
        if !leading || *term != term_now {
            self.in_flight = None;
            progress.outcome = Some(Outcome::ReadLost);
        } else if index.is_some_and(|at| self.replica.applied() >= at) {
            self.in_flight = None;
            progress.outcome = Some(Outcome::ReadConfirmed);
        }
    }

    /// One committed entry: the drain in flight (its records go to the
    /// WAL), or another's — a drain in flight that it displaced is rolled
    /// back first, then the entry is replayed.
    fn apply(
        &mut self,
        engine: &mut Engine,
        a: &Applied,
        collect: bool,
        progress: &mut Progress,
    ) -> Result<(), String> {
        match self.in_flight.take() {
            Some(InFlight::Write { proposed, staged }) if a.index >= proposed.index => {
                if proposed.index == a.index && proposed.term == a.term {
                    progress.outcome = Some(Outcome::Committed(proposed));
                    self.keep(staged, progress);
                    self.own(a);
                    return Ok(());
                }
                engine.rollback();
                progress.outcome = Some(Outcome::Lost(proposed));
            }
            Some(InFlight::Abandoned(p)) if a.index >= p.index => {}
            other => self.in_flight = other,
        }
        self.replay(engine, a, collect, progress)?;
        self.own(a);
        Ok(())
    }

    /// The applied entry's whole range is taken, records or not.
    fn own(&mut self, a: &Applied) {
        if a.offsets > 0 {
            self.applied_offset = self.applied_offset.max(a.offset + u64::from(a.offsets));
        }
    }

    /// The drain's own records, committed: to the WAL.
    fn keep(&mut self, staged: Vec<Staged>, progress: &mut Progress) {
        for s in staged {
            assert!(
                s.offset >= self.applied_offset,
                "offsets grow along the log"
            );
            self.applied_offset = s.offset + 1;
            progress.write.push(Record {
                offset: s.offset,
                kind: s.kind,
                bytes: s.bytes,
            });
        }
    }

    /// Applies an entry's records as recovery would, skipping those the
    /// host's state already holds.
    fn replay(
        &mut self,
        engine: &mut Engine,
        a: &Applied,
        collect: bool,
        progress: &mut Progress,
    ) -> Result<(), String> {
        let records = payload::decode(a.index, &a.payload)?;
        let span = a.offset..a.offset + u64::from(a.offsets);
        for r in records {
            if !span.contains(&r.offset) {
                return Err(format!(
                    "entry {}: record offset {} outside its offsets {span:?}",
                    a.index, r.offset
                ));
            }
            if r.offset < self.applied_offset {
                continue;
            }
            let entry: WalEntry = serde_json::from_slice(r.bytes)
                .map_err(|e| format!("entry {}: record at offset {}: {e}", a.index, r.offset))?;
            if collect {
                entry
                    .clone()
                    .into_watch_events(r.offset, r.bytes.len(), &mut progress.events);
            }
            engine.replay(r.offset, entry)?;
            // One shard per group: an atomic batch's part is its whole
            // batch, decided when its record is.
            for (id, _) in engine.unresolved_parts() {
                engine.resolve_part(&id, true);
            }
            self.applied_offset = r.offset + 1;
            progress.write.push(Record {
                offset: r.offset,
                kind: r.kind,
                bytes: r.bytes.to_vec(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{ApplyEvent, Command, Reply};
    use crate::definition::MachineDef;
    use crate::engine::{EngineLimits, Offsets};
    use crate::replication::log::{LogState, RaftLog};
    use crate::replication::replica::ReplicaConfig;
    use serde_json::{json, Value};
    use std::sync::Arc;

    fn engine() -> Engine {
        let mut engine = Engine::new(&EngineLimits {
            idempotency_entries: 16,
            idempotency_max_age_ms: 0,
        });
        let def = json!({"states": ["a", "b"], "initial": "a",
            "transitions": [{"from": "a", "event": "GO", "to": "b"}]});
        engine.adopt_machine(
            "m".into(),
            1,
            Arc::new(MachineDef::from_json(&def).unwrap()),
        );
        engine
    }

    fn lone_leader(engine: &mut Engine) -> ReplicatedShard {
        let log = RaftLog::new(LogState::bootstrap(&[1]));
        let replica = Replica::new(1, log, &ReplicaConfig::default(), 0, 3).unwrap();
        let mut s = ReplicatedShard::new(replica, 1);
        for _ in 0..100 {
            s.replica_mut().tick();
            settle(&mut s, engine);
            if s.can_serve() {
                return s;
            }
        }
        panic!("no leader");
    }

    /// Carries out Readies (writes complete at once) until nothing is
    /// left; returns the outcomes and the records to write.
    fn settle(s: &mut ReplicatedShard, engine: &mut Engine) -> (Vec<Outcome>, Vec<Record>) {
        let (mut outcomes, mut records) = (Vec::new(), Vec::new());
        for _ in 0..100 {
            let p = s.ready(engine, false).unwrap();
            outcomes.extend(p.outcome);
            records.extend(p.write);
            match p.persist {
                Some(w) => {
                    let _ = s.persisted(w.number);
                }
                None if p.applied.is_empty() && p.send.is_empty() => break,
                None => {}
            }
        }
        (outcomes, records)
    }

    /// Executes `commands` as the host does, staging from the next offset.
    fn execute(s: &ReplicatedShard, engine: &mut Engine, commands: Vec<Command>) -> Vec<Reply> {
        let base = s.next_offset();
        let mut offsets = Offsets::new(base, base + commands.len() as u64);
        commands
            .into_iter()
            .map(|c| engine.execute(c, &mut offsets, 5))
            .collect()
    }

    fn json_of(r: &Reply) -> Value {
        match r {
            Reply::Json(j) => serde_json::from_slice(j).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn create(id: &str) -> Command {
        Command::CreateInstance {
            instance_id: id.into(),
            machine: "m".into(),
            version: 1,
            initial_ctx: json!({}),
            idempotency_key: None,
            allow_recreate: false,
        }
    }

    #[test]
    fn a_write_is_answered_once_applied_and_its_records_go_to_the_wal() {
        let mut e = engine();
        let mut s = lone_leader(&mut e);
        let replies = execute(&s, &mut e, vec![create("i")]);
        let p = s.propose(e.take_staged(), 1..2).unwrap();
        assert_eq!(s.propose(Vec::new(), 2..3), Err(DrainError::Busy));
        let (outcomes, records) = settle(&mut s, &mut e);
        assert_eq!(outcomes, [Outcome::Committed(p)]);
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [p.offset]
        );
        assert_eq!(json_of(&replies[0])["wal_offset"], p.offset);
        e.commit_done();
        let go = Command::ApplyEvent(ApplyEvent {
            instance_id: "i".into(),
            event: "GO".into(),
            payload: Value::Null,
            expected_state: None,
            expected_wal_offset: None,
            event_id: None,
            idempotency_key: None,
        });
        execute(&s, &mut e, vec![go]);
        let next = s.next_offset();
        let p2 = s.propose(e.take_staged(), next..next + 1).unwrap();
        assert!(p2.offset > p.offset);
        assert_eq!(settle(&mut s, &mut e).0, [Outcome::Committed(p2)]);
    }

    #[test]
    fn reads_are_confirmed_without_an_entry() {
        let mut e = engine();
        let mut s = lone_leader(&mut e);
        let last = s.replica().log().find_back(|x| Some(x.index)).unwrap();
        execute(
            &s,
            &mut e,
            vec![Command::GetInstance {
                instance_id: "i".into(),
            }],
        );
        s.confirm_reads().unwrap();
        assert!(s.busy());
        let (outcomes, records) = settle(&mut s, &mut e);
        assert_eq!(outcomes, [Outcome::ReadConfirmed]);
        assert!(records.is_empty());
        let now = s.replica().log().find_back(|x| Some(x.index)).unwrap();
        assert_eq!(now, last, "a read adds no entry");
    }

    #[test]
    fn an_abandoned_drain_that_commits_after_all_is_replayed() {
        let mut e = engine();
        let mut s = lone_leader(&mut e);
        execute(&s, &mut e, vec![create("i")]);
        let p = s.propose(e.take_staged(), 1..2).unwrap();
        // The host gave up waiting, and rolled back.
        e.rollback();
        s.abandon();
        assert!(!s.can_serve(), "nothing runs while its index is open");
        let (outcomes, records) = settle(&mut s, &mut e);
        assert!(outcomes.is_empty(), "nobody waits for it any more");
        assert_eq!(records.len(), 1, "its record reaches the WAL");
        assert!(s.can_serve());
        let mut o = Offsets::new(p.offset + 1, p.offset + 1);
        let got = e.execute(
            Command::GetInstance {
                instance_id: "i".into(),
            },
            &mut o,
            0,
        );
        assert_eq!(
            json_of(&got)["state"],
            "a",
            "the replayed creation is in the state"
        );
    }
}

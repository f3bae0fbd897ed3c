//! One node's member of one Raft group: the host feeds it ticks, peer
//! messages and proposals, and carries out what each Ready asks — send,
//! persist, apply — in the order raft-rs requires.
//!
//! The host owns the I/O: [`Replica::ready`] returns the messages to send
//! now, at most one [`Persist`] (the group-commit write: one at a time, as
//! the shard's WAL writer does) and the entries to apply; the host reports
//! the write done with [`Replica::persisted`], which releases the messages
//! that had to wait for it (votes and append acknowledgements).
//!
//! **WAL offsets.** raft assigns entry indexes itself and some carry no
//! data (a new leader's empty entry), so an index is not a `wal_offset`.
//! The leader assigns the offset of every proposal and it travels inside
//! the entry; every node applies it as given, so a record has the same
//! offset everywhere. On winning an election a leader raises its next
//! offset above the last one in its log: its log holds every entry that
//! will precede its own in the committed log (an entry from an earlier
//! term is in the log of every later leader that appends after it), so
//! offsets grow along the committed log across every failover.

use raft::prelude::{
    Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata,
};
use raft::{RawNode, StateRole};

use super::log::RaftLog;

/// Timing and limits of a group, in ticks of the host's clock.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Ticks without a leader before a follower stands for election (the
    /// actual timeout is drawn from `[election_ticks, 2 * election_ticks)`).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest append message, in bytes of entries.
    pub max_message_bytes: u64,
    /// Append messages in flight per follower.
    pub max_inflight: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_message_bytes: 1 << 20,
            max_inflight: 256,
        }
    }
}

/// Bytes in front of a proposal's payload: its first `wal_offset` and how
/// many offsets it uses.
const PREFIX_BYTES: usize = 12;

/// Why a proposal was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The leader refused it (a leadership transfer, or too much
    /// uncommitted); retry.
    #[error("proposal dropped by the leader")]
    Dropped,
}

/// A proposal taken into the leader's log: it is acknowledged once the
/// entry at `index` is applied with the same `term`; an entry of another
/// term there means it was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    pub index: u64,
    pub term: u64,
    /// The first of the offsets it uses.
    pub offset: u64,
}

/// The write a Ready asks for: the entries first, then the hard state. A
/// torn write keeps a prefix, so a surviving hard state implies every
/// entry before it survived: its commit index never points past the log
/// (raft-rs refuses to start then; the simulation found it with the other
/// order). An entry that survives without the hard state is harmless: the
/// vote and the acknowledgements that needed them were never sent.
#[derive(Debug, Clone, Default)]
pub struct Persist {
    /// Which Ready this is; hand it back to [`Replica::persisted`].
    pub number: u64,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    /// Whether it must reach the disk before the messages it holds go out
    /// (false when only the commit index moved).
    pub must_sync: bool,
    /// A snapshot's point the log now starts at (the log is rewritten
    /// from it; its data is the host's to keep).
    pub snapshot: Option<SnapshotMetadata>,
}

/// A committed entry, in log order. The engine's own entries (a new
/// leader's empty entry, configuration changes) come with no offsets and
/// an empty payload: the host must see them too, since one can take the
/// index of a proposal it is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub term: u64,
    /// The first offset it uses (0 when it uses none).
    pub offset: u64,
    /// How many offsets it uses, from `offset`.
    pub offsets: u32,
    pub payload: Vec<u8>,
}

/// What the host does after a Ready.
#[derive(Debug, Default)]
pub struct Output {
    /// Send now (a leader's appends go out before its own write).
    pub send: Vec<Message>,
    /// Write this, then call [`Replica::persisted`].
    pub persist: Option<Persist>,
    /// Apply these, in order.
    pub apply: Vec<Applied>,
    /// The index of the last committed entry handed over (with data or
    /// not), when any was.
    pub applied_to: Option<u64>,
    /// ReadIndex answers: (request context, the commit index a read with
    /// that context may be served at once applied).
    pub reads: Vec<(Vec<u8>, u64)>,
    /// A snapshot from the leader: the host replaces its state by its
    /// data (before applying anything after it).
    pub install: Option<Snapshot>,
}

/// One member of a group.
pub struct Replica {
    raw: RawNode<RaftLog>,
    election_ticks: usize,
    /// The node's own generator for election timeouts (raft-rs draws them
    /// from a thread-local generator, which a simulation cannot seed).
    rng: u64,
    /// (term, role, leader) when last looked at: a change redraws the
    /// election timeout and, on becoming leader, raises `next_offset`.
    seen: (u64, StateRole, u64),
    next_offset: u64,
    /// The index of this leader's first entry of its term: it serves only
    /// once that is applied, since the entries before it (from earlier
    /// terms) are in its log but maybe not yet in its state.
    term_start: u64,
    /// The last index handed to the host to apply.
    applied: u64,
    /// The Ready whose write is in flight, and the messages that wait for it.
    in_flight: Option<(u64, Vec<Message>)>,
    /// A snapshot installed, to count applied once persisted.
    snapshot_to_apply: Option<u64>,
}

impl Replica {
    /// Member `id` over `log` (fresh or recovered); `applied` is the index
    /// the state machine already holds, `seed` seeds election timeouts.
    pub fn new(
        id: u64,
        log: RaftLog,
        cfg: &ReplicaConfig,
        applied: u64,
        seed: u64,
    ) -> raft::Result<Replica> {
        let config = raft::Config {
            id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: cfg.max_message_bytes,
            max_inflight_msgs: cfg.max_inflight,
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config, log, &logger)?;
        let mut replica = Replica {
            raw,
            election_ticks: cfg.election_ticks,
            rng: seed | 1,
            seen: (0, StateRole::Follower, 0),
            next_offset: 1,
            term_start: u64::MAX,
            applied,
            in_flight: None,
            snapshot_to_apply: None,
        };
        replica.redraw_election_timeout();
        replica.seen = replica.role();
        Ok(replica)
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// (term, role, leader id; 0 for none).
    pub fn role(&self) -> (u64, StateRole, u64) {
        let r = &self.raw.raft;
        (r.term, r.state, r.leader_id)
    }

    /// Whether this member leads its group.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Hands leadership to `to` (a voter): raft brings it up to date, then
    /// tells it to stand for election at once. Proposals are refused
    /// meanwhile; raft gives up after an election timeout.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// The voters of the group.
    pub fn voters(&self) -> Vec<u64> {
        self.log().with_state(|s| s.conf_state.voters.clone())
    }

    /// The log (shared with the engine).
    pub fn log(&self) -> &RaftLog {
        self.raw.store()
    }

    /// Whether this member leads and its state holds every entry before
    /// its term's: only then may it execute requests against that state.
    pub fn can_serve(&self) -> bool {
        self.is_leader() && self.applied >= self.term_start
    }

    /// The offset the next proposal starts at.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Raises the offset the next proposal starts at to at least `next`
    /// (the WAL's next offset after a restart, or a drain's reserved base).
    pub fn raise_next_offset(&mut self, next: u64) {
        self.next_offset = self.next_offset.max(next);
    }

    /// The group's commit index as this member knows it.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// On a leader, each member's matched index (empty elsewhere).
    pub fn progress(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut v: Vec<(u64, u64)> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether a Ready's write is in flight.
    pub fn writing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// One tick of the host's clock.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.notice_role();
    }

    /// A message from a peer. One the engine refuses (from an unknown
    /// peer, say) is dropped, as the network might have.
    pub fn step(&mut self, msg: Message) {
        let _ = self.raw.step(msg);
        self.notice_role();
    }

    /// Proposes `payload`, which uses `offsets` offsets from
    /// [`Replica::next_offset`].
    pub fn propose(&mut self, payload: &[u8], offsets: u32) -> Result<Proposed, ProposeError> {
        if !self.is_leader() {
            let leader = self.raw.raft.leader_id;
            return Err(ProposeError::NotLeader {
                leader: (leader != 0).then_some(leader),
            });
        }
        let index = self.raw.raft.raft_log.last_index() + 1;
        let offset = self.next_offset;
        let mut data = Vec::with_capacity(PREFIX_BYTES + payload.len());
        data.extend_from_slice(&offset.to_le_bytes());
        data.extend_from_slice(&offsets.to_le_bytes());
        data.extend_from_slice(payload);
        if self.raw.propose(vec![], data).is_err() || self.raw.raft.raft_log.last_index() != index {
            return Err(ProposeError::Dropped);
        }
        self.next_offset += u64::from(offsets);
        Ok(Proposed {
            index,
            term: self.raw.raft.term,
            offset,
        })
    }

    /// Asks the group to confirm this leader's commit index for a read
    /// (ReadIndex: one heartbeat round, no log entry); the answer comes in
    /// a later [`Output::reads`] under `ctx`.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    /// The index of the last entry handed to the host to apply.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Takes the next Ready, if any and if no write is in flight (one
    /// write at a time: what arrives meanwhile joins the next one).
    pub fn ready(&mut self) -> Output {
        if self.in_flight.is_some() || !self.raw.has_ready() {
            return Output::default();
        }
        let mut rd = self.raw.ready();
        let install = self.take_snapshot(&rd);
        let send = rd.take_messages();
        self.report_snapshots_sent(&send);
        let reads = rd
            .take_read_states()
            .into_iter()
            .map(|r| (r.request_ctx, r.index))
            .collect();
        let committed = rd.take_committed_entries();
        let applied_to = committed.last().map(|e| e.index);
        let apply = self.take_committed(committed);
        let entries = rd.take_entries();
        self.log().append(&entries);
        let hard_state = rd.hs().cloned();
        if let Some(hs) = &hard_state {
            self.log().set_hard_state(hs.clone());
        }
        let held = rd.take_persisted_messages();
        let number = rd.number();
        let must_sync = rd.must_sync();
        self.raw.advance_append_async(rd);
        let snapshot = install.as_ref().map(|s| s.get_metadata().clone());
        let mut out = Output {
            send,
            persist: None,
            apply,
            applied_to,
            reads,
            install,
        };
        if hard_state.is_none() && entries.is_empty() && snapshot.is_none() {
            // Nothing to write: what waited for the write goes now.
            self.raw.on_persist_ready(number);
            self.notice_role();
            out.send.extend(held);
        } else {
            self.in_flight = Some((number, held));
            out.persist = Some(Persist {
                number,
                hard_state,
                entries,
                must_sync,
                snapshot,
            });
        }
        out
    }

    /// The write of Ready `number` is done: returns the messages that
    /// waited for it.
    pub fn persisted(&mut self, number: u64) -> Vec<Message> {
        let (expected, held) = self.in_flight.take().expect("a write in flight");
        assert_eq!(number, expected, "writes complete in order");
        self.raw.on_persist_ready(number);
        if let Some(index) = self.snapshot_to_apply.take() {
            // The host installed it at Ready time; raft may count it
            // applied once it is persisted.
            self.raw.advance_apply_to(index);
        }
        self.notice_role();
        held
    }

    /// A snapshot the leader sent: installed into the in-memory log now
    /// (the entries of this Ready follow it), handed to the host to load.
    fn take_snapshot(&mut self, rd: &raft::Ready) -> Option<Snapshot> {
        if rd.snapshot().is_empty() {
            return None;
        }
        let snapshot = rd.snapshot().clone();
        let index = snapshot.get_metadata().index;
        self.log()
            .with_state(|s| s.install(snapshot.get_metadata()));
        self.applied = index;
        self.snapshot_to_apply = Some(index);
        Some(snapshot)
    }

    /// Snapshots go out through the host's transport, which reports no
    /// delivery: each is reported sent at once. If it was lost, the
    /// follower's next answer shows it still behind, and raft sends again.
    fn report_snapshots_sent(&mut self, send: &[Message]) {
        for m in send {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.raw.report_snapshot(m.to, raft::SnapshotStatus::Finish);
            }
        }
    }

    /// Decodes committed entries for the host and records them applied.
    fn take_committed(&mut self, committed: Vec<Entry>) -> Vec<Applied> {
        let Some(last) = committed.last().map(|e| e.index) else {
            return Vec::new();
        };
        let applied = committed
            .iter()
            .map(decode)
            .inspect(|a| self.next_offset = self.next_offset.max(a.offset + u64::from(a.offsets)))
            .collect();
        self.raw.advance_apply_to(last);
        self.applied = last;
        applied
    }

    /// After any input: a new term, role or leader redraws the election
    /// timeout (raft-rs drew one from its own generator), and a new leader
    /// raises its next offset above its log's.
    fn notice_role(&mut self) {
        let now = self.role();
        if now == self.seen {
            return;
        }
        self.seen = now;
        self.redraw_election_timeout();
        if now.1 == StateRole::Leader {
            let last = self.log().find_back(|e| {
                let a = decode(e);
                (a.offsets > 0).then(|| a.offset + u64::from(a.offsets))
            });
            self.next_offset = self.next_offset.max(last.unwrap_or(1));
            // raft-rs appended this term's empty entry on election.
            self.term_start = self.raw.raft.raft_log.last_index();
        } else {
            self.term_start = u64::MAX;
        }
    }

    fn redraw_election_timeout(&mut self) {
        // xorshift64*: deterministic for a seed, which is all this needs.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = self.election_ticks as u64;
        let t = self.election_ticks + (self.rng % span) as usize;
        self.raw.raft.set_randomized_election_timeout(t);
    }
}

/// What the host sees of a committed entry.
fn decode(e: &Entry) -> Applied {
    let mut a = Applied {
        index: e.index,
        term: e.term,
        offset: 0,
        offsets: 0,
        payload: Vec::new(),
    };
    if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
        return a;
    }
    assert!(e.data.len() >= PREFIX_BYTES, "entry {} too short", e.index);
    let (prefix, payload) = e.data.split_at(PREFIX_BYTES);
    a.offset = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    a.offsets = u32::from_le_bytes(prefix[8..].try_into().expect("4 bytes"));
    a.payload = payload.to_vec();
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::log::LogState;

    /// Drives a one-node group: ticks until it leads, carrying out every
    /// Ready with its write completing at once.
    fn lone_leader() -> Replica {
        let log = RaftLog::new(LogState::bootstrap(&[1]));
        let mut r = Replica::new(1, log, &ReplicaConfig::default(), 0, 7).unwrap();
        for _ in 0..100 {
            r.tick();
            settle(&mut r);
            if r.can_serve() {
                return r;
            }
        }
        panic!("a one-node group never elected itself");
    }

    /// Carries out Readies until none is left; returns what was applied.
    fn settle(r: &mut Replica) -> Vec<Applied> {
        let mut applied = Vec::new();
        loop {
            let out = r.ready();
            applied.extend(out.apply);
            match out.persist {
                Some(p) => {
                    let _ = r.persisted(p.number);
                }
                None if !r.raw.has_ready() => return applied,
                None => {}
            }
        }
    }

    #[test]
    fn a_follower_refuses_proposals_and_names_no_leader() {
        let log = RaftLog::new(LogState::bootstrap(&[1, 2, 3]));
        let mut r = Replica::new(1, log, &ReplicaConfig::default(), 0, 1).unwrap();
        assert!(!r.can_serve());
        assert_eq!(
            r.propose(b"x", 1),
            Err(ProposeError::NotLeader { leader: None })
        );
    }

    #[test]
    fn a_leader_numbers_offsets_and_applies_its_proposals_in_order() {
        let mut r = lone_leader();
        let a = r.propose(b"first", 2).unwrap();
        let b = r.propose(b"second", 0).unwrap();
        let c = r.propose(b"third", 1).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (1, 3, 3));
        assert!(a.index < b.index && b.index < c.index);
        let applied: Vec<Applied> = settle(&mut r)
            .into_iter()
            .filter(|x| !x.payload.is_empty())
            .collect();
        let got: Vec<(&[u8], u64, u32)> = applied
            .iter()
            .map(|x| (&x.payload[..], x.offset, x.offsets))
            .collect();
        assert_eq!(
            got,
            [
                (&b"first"[..], 1, 2),
                (&b"second"[..], 3, 0),
                (&b"third"[..], 3, 1)
            ]
        );
        assert_eq!(r.next_offset(), 4);
        assert_eq!(r.applied(), c.index);
    }

    #[test]
    fn one_write_at_a_time_and_its_messages_wait_for_it() {
        let mut r = lone_leader();
        r.propose(b"x", 1).unwrap();
        let out = r.ready();
        let p = out.persist.expect("the entry must be written");
        assert_eq!(p.entries.len(), 1);
        assert!(r.writing());
        r.propose(b"y", 1).unwrap();
        let none = r.ready();
        assert!(
            none.persist.is_none() && none.apply.is_empty(),
            "a second write while one is in flight"
        );
        let _ = r.persisted(p.number);
        assert!(!r.writing());
        let applied = settle(&mut r);
        assert_eq!(applied.iter().filter(|a| !a.payload.is_empty()).count(), 2);
    }
}

//! A shard's engine as the state machine of its group.
//!
//! The leader executes a drain against its engine before proposing it, as
//! a standalone shard does before its WAL commit: the records the drain
//! stages, with the offsets the leader assigned, are the entry. Followers
//! apply an entry's records as recovery replays a WAL. The leader releases
//! a drain's replies when its entry is applied with the term it was
//! proposed in; if another entry takes that index first, the drain's
//! changes are undone and its callers told the outcome is unknown.
//!
//! A drain of reads only is not logged: the leader asks the group to
//! confirm its commit index (ReadIndex, one heartbeat round) and executes
//! the reads once it has applied that far, so no read returns state a
//! newer leader could already have changed.
//!
//! One drain is in flight per shard at a time, as with today's group
//! commit, so the engine's undo log holds exactly that drain, and a read
//! never sees a write that is not committed.

use raft::prelude::Message;

use super::replica::{Applied, Persist, ProposeError, Proposed, Replica};
use crate::commands::{Command, Reply};
use crate::engine::{Engine, Mark, Offsets};
use crate::wal_entry::WalEntry;

/// Why a drain was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// Another drain of this shard is still waiting for its commit.
    #[error("a drain is already in flight")]
    Busy,
    /// Not the leader, or a leader whose state is not yet current.
    #[error("not serving: {0}")]
    NotServing(ProposeError),
}

/// What one Ready came to for the host.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages to send now.
    pub send: Vec<Message>,
    /// The write to make, then [`ReplicatedShard::persisted`].
    pub persist: Option<Persist>,
    /// A drain committed: its replies, in command order.
    pub committed: Option<(Proposed, Vec<Reply>)>,
    /// A drain of reads answered (confirmed by ReadIndex), in command order.
    pub read: Option<Vec<Reply>>,
    /// A drain whose index another entry took: undone, outcome unknown to
    /// its callers (a retry with an idempotency key is safe).
    pub lost: Option<Proposed>,
    /// A drain of reads abandoned because this node stopped leading before
    /// the group confirmed it: not executed; the callers may retry.
    pub read_lost: bool,
    /// The entries applied, in log order.
    pub applied: Vec<Applied>,
}

/// The drain waiting for its commit.
enum InFlight {
    /// Writes (or a mix): executed, waiting for their entry.
    Write {
        proposed: Proposed,
        mark: Mark,
        replies: Vec<Reply>,
    },
    /// Reads only: waiting for the ReadIndex answer (`index`), then for the
    /// state to be applied that far; executed only then.
    Read {
        ctx: Vec<u8>,
        term: u64,
        index: Option<u64>,
        commands: Vec<Command>,
    },
}

/// A shard replicated through its group.
pub struct ReplicatedShard {
    replica: Replica,
    engine: Engine,
    in_flight: Option<InFlight>,
    /// Numbers ReadIndex requests (their context).
    reads: u64,
}

impl ReplicatedShard {
    /// The shard's member `replica` over `engine`, which holds the state
    /// up to the index the replica was created with.
    pub fn new(replica: Replica, engine: Engine) -> ReplicatedShard {
        ReplicatedShard {
            replica,
            engine,
            in_flight: None,
            reads: 0,
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Whether a drain is waiting for its commit.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Executes `commands` as one drain and proposes what they staged.
    /// Reads go through the log too, so every answer is linearizable.
    /// Returns the proposal, or `None` for a drain of reads (answered in a
    /// later [`Progress::read`]).
    pub fn execute(
        &mut self,
        commands: Vec<Command>,
        now: i64,
    ) -> Result<Option<Proposed>, DrainError> {
        if self.in_flight.is_some() {
            return Err(DrainError::Busy);
        }
        if !self.replica.can_serve() {
            let leader = self.replica.role().2;
            return Err(DrainError::NotServing(ProposeError::NotLeader {
                leader: (leader != 0).then_some(leader),
            }));
        }
        if !commands.iter().any(Command::may_write) {
            self.start_read(commands);
            return Ok(None);
        }
        let mark = self.engine.mark();
        let base = self.replica.next_offset();
        let writes = commands.iter().filter(|c| c.may_write()).count() as u64;
        let mut offsets = Offsets::new(base, base + writes);
        let replies: Vec<Reply> = commands
            .into_iter()
            .map(|c| self.engine.execute(c, &mut offsets, now))
            .collect();
        let staged = self.engine.take_staged();
        let used = staged.len() as u32;
        for (i, s) in staged.iter().enumerate() {
            assert_eq!(s.offset, base + i as u64, "staged offsets are dense");
        }
        let mut payload = Vec::new();
        super::payload::encode(&staged, &mut payload);
        match self.replica.propose(&payload, used) {
            Ok(proposed) => {
                self.in_flight = Some(InFlight::Write {
                    proposed,
                    mark,
                    replies,
                });
                Ok(Some(proposed))
            }
            Err(e) => {
                self.engine.rollback_to(mark);
                Err(DrainError::NotServing(e))
            }
        }
    }

    /// Takes the replica's next Ready and applies what it committed.
    pub fn ready(&mut self) -> Result<Progress, String> {
        let out = self.replica.ready();
        let mut progress = Progress {
            send: out.send,
            persist: out.persist,
            ..Progress::default()
        };
        for a in out.apply {
            self.apply(&a, &mut progress)?;
            progress.applied.push(a);
        }
        self.advance_read(out.reads, &mut progress);
        Ok(progress)
    }

    /// Asks the group to confirm the commit index for a drain of reads.
    fn start_read(&mut self, commands: Vec<Command>) {
        self.reads += 1;
        let ctx = self.reads.to_le_bytes().to_vec();
        self.replica.read_index(ctx.clone());
        self.in_flight = Some(InFlight::Read {
            ctx,
            term: self.replica.role().0,
            index: None,
            commands,
        });
    }

    /// Moves the drain of reads on: note its confirmed index, execute it
    /// once applied that far, or drop it if this node lost office (raft-rs
    /// drops the request silently then).
    fn advance_read(&mut self, answers: Vec<(Vec<u8>, u64)>, progress: &mut Progress) {
        let (term_now, leading) = (self.replica.role().0, self.replica.is_leader());
        let Some(InFlight::Read {
            ctx, term, index, ..
        }) = &mut self.in_flight
        else {
            return;
        };
        if let Some((_, at)) = answers.iter().find(|(c, _)| c == ctx) {
            *index = Some(*at);
        }
        if !leading || *term != term_now {
            self.in_flight = None;
            progress.read_lost = true;
            return;
        }
        if index.is_some_and(|at| self.replica.applied() >= at) {
            let Some(InFlight::Read { commands, .. }) = self.in_flight.take() else {
                unreachable!("matched above");
            };
            let mut none = Offsets::new(1, 1);
            let replies = commands
                .into_iter()
                .map(|c| self.engine.execute(c, &mut none, 0))
                .collect();
            progress.read = Some(replies);
        }
    }

    /// The write of Ready `number` is done: the messages that waited.
    pub fn persisted(&mut self, number: u64) -> Vec<Message> {
        self.replica.persisted(number)
    }

    /// One committed entry: our drain (its replies go), or another's (ours,
    /// if any, is undone first: it was executed on a state without it).
    fn apply(&mut self, a: &Applied, progress: &mut Progress) -> Result<(), String> {
        if let Some(InFlight::Write { proposed, .. }) = &self.in_flight {
            let ours = proposed.index == a.index && proposed.term == a.term;
            let Some(InFlight::Write {
                proposed,
                mark,
                replies,
            }) = self.in_flight.take()
            else {
                unreachable!("matched above");
            };
            if ours {
                self.engine.commit_done();
                progress.committed = Some((proposed, replies));
                return Ok(());
            }
            self.engine.rollback_to(mark);
            self.engine.commit_done();
            progress.lost = Some(proposed);
        }
        self.replay(a)
    }

    /// Applies an entry's records as recovery would.
    fn replay(&mut self, a: &Applied) -> Result<(), String> {
        let records = super::payload::decode(a.index, &a.payload)?;
        if records.len() != a.offsets as usize {
            return Err(format!(
                "entry {} holds {} records for {} offsets",
                a.index,
                records.len(),
                a.offsets
            ));
        }
        for r in records {
            let entry: WalEntry = serde_json::from_slice(r.bytes)
                .map_err(|e| format!("entry {}: record at offset {}: {e}", a.index, r.offset))?;
            self.engine.replay(r.offset, entry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::ApplyEvent;
    use crate::definition::MachineDef;
    use crate::engine::EngineLimits;
    use crate::replication::log::{LogState, RaftLog};
    use crate::replication::replica::ReplicaConfig;
    use serde_json::{json, Value};
    use std::sync::Arc;

    fn shard() -> ReplicatedShard {
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
        let log = RaftLog::new(LogState::bootstrap(&[1]));
        let replica = Replica::new(1, log, &ReplicaConfig::default(), 0, 3).unwrap();
        let mut s = ReplicatedShard::new(replica, engine);
        for _ in 0..100 {
            s.replica_mut().tick();
            settle(&mut s);
            if s.replica().can_serve() {
                return s;
            }
        }
        panic!("no leader");
    }

    /// Carries out Readies (writes complete at once) until nothing is left;
    /// returns the answers that came out.
    fn settle(s: &mut ReplicatedShard) -> Vec<Vec<Reply>> {
        let mut answers = Vec::new();
        for _ in 0..100 {
            let p = s.ready().unwrap();
            answers.extend(p.committed.map(|(_, r)| r));
            answers.extend(p.read);
            match p.persist {
                Some(w) => {
                    let _ = s.persisted(w.number);
                }
                None if p.applied.is_empty() && p.send.is_empty() => return answers,
                None => {}
            }
        }
        answers
    }

    fn json_of(r: &Reply) -> Value {
        match r {
            Reply::Json(j) => serde_json::from_slice(j).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writes_answer_once_applied_and_reads_through_read_index() {
        let mut s = shard();
        let create = Command::CreateInstance {
            instance_id: "i".into(),
            machine: "m".into(),
            version: 1,
            initial_ctx: json!({}),
            idempotency_key: None,
            allow_recreate: false,
        };
        let p = s
            .execute(vec![create], 5)
            .unwrap()
            .expect("a write is proposed");
        assert_eq!(s.execute(vec![], 5), Err(DrainError::Busy));
        let answers = settle(&mut s);
        assert_eq!(json_of(&answers[0][0])["state"], "a");
        assert_eq!(json_of(&answers[0][0])["wal_offset"], p.offset);
        let go = Command::ApplyEvent(ApplyEvent {
            instance_id: "i".into(),
            event: "GO".into(),
            payload: Value::Null,
            expected_state: None,
            expected_wal_offset: None,
            event_id: None,
            idempotency_key: None,
        });
        s.execute(vec![go], 6).unwrap();
        assert_eq!(json_of(&settle(&mut s)[0][0])["to_state"], "b");
        let get = Command::GetInstance {
            instance_id: "i".into(),
        };
        assert_eq!(s.execute(vec![get], 7), Ok(None), "a read is not logged");
        assert_eq!(json_of(&settle(&mut s)[0][0])["state"], "b");
    }
}

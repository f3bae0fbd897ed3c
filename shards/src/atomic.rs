//! A shard's side of atomic batches (DECISIONS D11; the protocol is in
//! docs/ARCHITECTURE.md "BATCH").
//!
//! 1. *Prepare*: dry-run the part, undo it, and on success hold its
//!    instances (commands on held instances wait) and vote yes.
//! 2. *Commit*: run the part for real and log it as one `batch_part` record;
//!    keep the holds, the undo log and the events: another participant may
//!    still fail to write its part.
//! 3. *Release*: the batch is committed everywhere: drop the holds and the
//!    undo log, publish the events. Or *abort*: undo (and, if the part was
//!    written, log a `batch_abort` so recovery never counts it).

use hashbrown::{HashMap, HashSet};

use crate::commands::{Command, Reply, WatchEvent};
use crate::engine::{Engine, Mark, Offsets, UndoLog};
use crate::error::ApiError;
use crate::wal_entry::WalEntry;

/// A participant's vote.
#[derive(Debug)]
pub enum Vote {
    /// The part ran without error in a dry run; `writes` says whether it
    /// will log anything.
    Yes {
        /// The part changes something.
        writes: bool,
    },
    /// The op in `slot` failed with `error`.
    No {
        /// Slot of the failing op.
        slot: u32,
        /// Its error.
        error: ApiError,
    },
}

/// A part run for real: its answers, the mark to hand to
/// [`AtomicState::written`], and its lowest offset.
pub type Executed = (Vec<(u32, Reply)>, Mark, Option<u64>);

/// A written part waiting for release or abort.
struct Written {
    undo: UndoLog,
    events: Vec<WatchEvent>,
    /// Lowest offset of the part (readers are held below it).
    first: Option<u64>,
}

/// Atomic-batch state of one shard.
#[derive(Default)]
pub struct AtomicState {
    /// Instance id → batch holding it.
    holds: HashMap<String, String>,
    /// Prepared parts: their commands, run again at commit.
    prepared: HashMap<String, Vec<(u32, Command)>>,
    /// Written parts awaiting release.
    written: HashMap<String, Written>,
}

fn instance_of(cmd: &Command) -> Option<&str> {
    match cmd {
        Command::CreateInstance { instance_id, .. }
        | Command::GetInstance { instance_id }
        | Command::DeleteInstance { instance_id, .. } => Some(instance_id),
        Command::ApplyEvent(a) => Some(&a.instance_id),
        _ => None,
    }
}

impl AtomicState {
    /// Whether `cmd` must wait for a held batch: it touches a held instance,
    /// or it reads or changes every instance while anything is held.
    pub fn conflicts(&self, cmd: &Command) -> bool {
        if self.holds.is_empty() {
            return false;
        }
        match cmd {
            Command::ListInstances { .. } | Command::FlushAll => true,
            c => instance_of(c).is_some_and(|id| self.holds.contains_key(id)),
        }
    }

    /// Whether a part may only run after other holds are released.
    pub fn part_conflicts(&self, commands: &[(u32, Command)]) -> bool {
        commands.iter().any(|(_, c)| self.conflicts(c))
    }

    /// Offsets a prepared part may use when it runs for real.
    pub fn prepared_writes(&self, batch_id: &str) -> u64 {
        // One more for the part record itself when the part is empty.
        self.prepared.get(batch_id).map_or(0, |c| {
            c.iter().filter(|(_, c)| c.may_write()).count() as u64 + 1
        })
    }

    /// The lowest offset of any written, unreleased part.
    pub fn hold_floor(&self) -> Option<u64> {
        self.written.values().filter_map(|w| w.first).min()
    }

    /// Phase 1: dry run; on success hold the part's instances.
    pub fn prepare(
        &mut self,
        engine: &mut Engine,
        batch_id: String,
        commands: Vec<(u32, Command)>,
        now: i64,
    ) -> Vote {
        assert!(
            !self.part_conflicts(&commands),
            "caller defers conflicting parts"
        );
        let mark = engine.mark();
        let collect = std::mem::replace(&mut engine.collect_events, false);
        let n = commands.len() as u64;
        let mut dry = Offsets::new(1, 1 + n);
        let mut vote = Vote::Yes {
            writes: commands.iter().any(|(_, c)| c.may_write()),
        };
        for (slot, cmd) in &commands {
            if let Reply::Error(error) = engine.execute(cmd.clone(), &mut dry, now) {
                vote = Vote::No { slot: *slot, error };
                break;
            }
        }
        engine.rollback_to(mark);
        engine.collect_events = collect;
        if matches!(vote, Vote::Yes { .. }) {
            for (_, c) in &commands {
                if let Some(id) = instance_of(c) {
                    self.holds.insert(id.to_owned(), batch_id.clone());
                }
            }
            self.prepared.insert(batch_id, commands);
        }
        vote
    }

    /// Phase 2: runs the prepared part for real, its changes staged as one
    /// `batch_part` record. Returns the answers, the mark to pass to
    /// [`AtomicState::written`] once the record is durable, and the part's
    /// lowest offset. An op that fails now (it passed the dry run on held
    /// instances, so this is not expected) fails the part.
    pub fn execute(
        &mut self,
        engine: &mut Engine,
        batch_id: &str,
        participants: &[u32],
        offsets: &mut Offsets,
        now: i64,
    ) -> Result<Executed, ApiError> {
        let Some(commands) = self.prepared.remove(batch_id) else {
            return Err(ApiError::bad_request(format!(
                "atomic batch failed: batch {batch_id} is not prepared here"
            )));
        };
        let mark = engine.mark();
        // A part's events are kept whether or not anyone watches yet: they
        // are published at release, possibly after the first subscription.
        let collect = std::mem::replace(&mut engine.collect_events, true);
        engine.begin_part();
        let mut replies = Vec::with_capacity(commands.len());
        let mut failed = None;
        for (slot, cmd) in commands {
            let r = engine.execute(cmd, offsets, now);
            if let Reply::Error(e) = &r {
                failed = Some(ApiError::bad_request(format!(
                    "atomic batch failed at commit: {}",
                    e.message
                )));
                break;
            }
            replies.push((slot, r));
        }
        let result = match failed {
            Some(e) => Err(e),
            None => engine.end_part(batch_id, participants, offsets),
        };
        engine.collect_events = collect;
        match result {
            Ok(first) => Ok((replies, mark, Some(first))),
            Err(e) => {
                engine.rollback_to(mark);
                self.release_holds(batch_id);
                Err(e)
            }
        }
    }

    /// The part executed after `mark` is durable: keep its undo log and
    /// events until release or abort.
    pub fn written(
        &mut self,
        engine: &mut Engine,
        batch_id: String,
        mark: Mark,
        first: Option<u64>,
    ) {
        let undo = engine.take_undo_since(mark);
        let events = engine.take_events_since(mark);
        self.written.insert(
            batch_id,
            Written {
                undo,
                events,
                first,
            },
        );
    }

    /// The part's commit failed and the drain was rolled back: drop holds.
    pub fn failed(&mut self, batch_id: &str) {
        self.prepared.remove(batch_id);
        self.release_holds(batch_id);
    }

    /// Phase 3: the batch is committed everywhere. Returns its events.
    pub fn release(&mut self, batch_id: &str) -> Vec<WatchEvent> {
        self.prepared.remove(batch_id);
        self.release_holds(batch_id);
        self.written
            .remove(batch_id)
            .map(|w| w.events)
            .unwrap_or_default()
    }

    /// Abort. A prepared part only loses its holds; a written part is undone
    /// and a `batch_abort` entry is returned for the caller to log (holds
    /// are kept until that record is durable: call
    /// [`AtomicState::release`] then).
    pub fn abort(&mut self, engine: &mut Engine, batch_id: &str) -> Option<WalEntry> {
        if self.prepared.remove(batch_id).is_some() {
            self.release_holds(batch_id);
            return None;
        }
        let w = self.written.remove(batch_id)?;
        engine.undo_part(w.undo);
        // Keep the holds (and no hold floor: nothing of the part remains
        // visible) until the abort record is written.
        self.written.insert(
            batch_id.to_owned(),
            Written {
                undo: UndoLog::default(),
                events: Vec::new(),
                first: None,
            },
        );
        Some(WalEntry::BatchAbort {
            batch_id: batch_id.to_owned(),
        })
    }

    /// Ids of every batch with state here (for shutdown diagnostics).
    pub fn pending(&self) -> HashSet<String> {
        self.prepared
            .keys()
            .chain(self.written.keys())
            .cloned()
            .collect()
    }

    fn release_holds(&mut self, batch_id: &str) {
        self.holds.retain(|_, b| b != batch_id);
    }
}

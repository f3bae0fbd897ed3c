//! The Raft log as the engine reads it: a node's entries, its hard state
//! (term, vote, commit) and its configuration, with the point below which
//! the log is compacted.
//!
//! raft-rs reads the log through [`raft::Storage`] synchronously, and
//! entries handed to `advance_append_async` must be readable at once, before
//! they are durable. So the log lives in memory; what is durable is the
//! host's business (the WAL commit of a [`super::Persist`]), and after a
//! crash the log is rebuilt from what was.

use std::cell::RefCell;
use std::rc::Rc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

/// The log's contents.
#[derive(Debug, Default, Clone)]
pub struct LogState {
    /// Index of the last entry compacted away (0: none).
    pub snap_index: u64,
    /// Its term (raft checks `term(first_index - 1)`).
    pub snap_term: u64,
    /// Entries `snap_index + 1 ..`, dense.
    pub entries: Vec<Entry>,
    /// Term, vote and commit.
    pub hard_state: HardState,
    /// Voters and learners.
    pub conf_state: ConfState,
    /// A snapshot the host prepared for followers that need one (not
    /// durable: a leader builds another when asked again).
    pub prepared: Option<Snapshot>,
    /// The index a snapshot was asked for while none was prepared: the
    /// host should build one.
    pub wanted: Option<u64>,
}

impl LogState {
    /// A fresh log for a group whose voters are `voters`.
    pub fn bootstrap(voters: &[u64]) -> LogState {
        assert!(!voters.is_empty(), "a group needs a voter");
        LogState {
            conf_state: ConfState::from((voters.to_vec(), vec![])),
            ..LogState::default()
        }
    }

    /// Index of the last entry (the compaction point when empty).
    pub fn last_index(&self) -> u64 {
        self.snap_index + self.entries.len() as u64
    }

    /// Appends `ents`, first dropping every entry at or above the first
    /// one's index (a new leader's entries replace a conflicting tail).
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        assert!(
            first.index > self.snap_index && first.index <= self.last_index() + 1,
            "append at {} to a log of {}..={}",
            first.index,
            self.snap_index + 1,
            self.last_index()
        );
        self.entries
            .truncate((first.index - self.snap_index - 1) as usize);
        self.entries.extend_from_slice(ents);
        debug_assert!(self
            .entries
            .windows(2)
            .all(|w| w[1].index == w[0].index + 1 && w[1].term >= w[0].term));
    }

    /// Drops the entries before `keep_from` (applied ones: their effect is
    /// in the host's state).
    pub fn compact_to(&mut self, keep_from: u64) {
        let keep_from = keep_from.clamp(self.snap_index + 1, self.last_index() + 1);
        let cut = (keep_from - self.snap_index - 1) as usize;
        if cut > 0 {
            self.snap_term = self.entries[cut - 1].term;
            self.snap_index = keep_from - 1;
            self.entries.drain(..cut);
        }
    }

    /// Replaces the log by a snapshot's point (raft-rs's
    /// `MemStorage::apply_snapshot`): no entries, the commit at its index.
    pub fn install(&mut self, meta: &SnapshotMetadata) {
        assert!(
            meta.index >= self.snap_index,
            "a snapshot at {} behind the log's start {}",
            meta.index,
            self.snap_index
        );
        self.snap_index = meta.index;
        self.snap_term = meta.term;
        self.entries.clear();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = meta.index;
        self.conf_state = meta.get_conf_state().clone();
    }

    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index - self.snap_index - 1) as usize]
    }
}

/// A node's log, shared between the engine (which reads it) and the host
/// (which appends what each Ready says).
#[derive(Debug, Clone, Default)]
pub struct RaftLog(Rc<RefCell<LogState>>);

impl RaftLog {
    /// A log holding `state` (a fresh one, or what a node recovered).
    pub fn new(state: LogState) -> RaftLog {
        RaftLog(Rc::new(RefCell::new(state)))
    }

    /// Appends entries a Ready gave (see [`LogState::append`]).
    pub fn append(&self, ents: &[Entry]) {
        self.0.borrow_mut().append(ents);
    }

    /// Records the hard state a Ready gave.
    pub fn set_hard_state(&self, hs: HardState) {
        self.0.borrow_mut().hard_state = hs;
    }

    /// Runs `f` on the log's contents (compaction rewrites them).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut LogState) -> T) -> T {
        f(&mut self.0.borrow_mut())
    }

    /// Offers followers `snapshot`, and clears the request for one.
    pub fn offer(&self, snapshot: Snapshot) {
        let mut s = self.0.borrow_mut();
        s.prepared = Some(snapshot);
        s.wanted = None;
    }

    /// Drops the prepared snapshot once every member has reached `index`
    /// past it (`reached`): nobody needs it, and it may be large. Raft asks
    /// again if one is needed later.
    pub fn release_prepared(&self, reached: u64) {
        let mut s = self.0.borrow_mut();
        if s.prepared
            .as_ref()
            .is_some_and(|p| p.get_metadata().index <= reached)
        {
            s.prepared = None;
        }
    }

    /// Whether raft asked for a snapshot that is not prepared.
    pub fn snapshot_wanted(&self) -> bool {
        self.0.borrow().wanted.is_some()
    }

    /// Calls `f` on every entry from the newest back, until it returns
    /// `Some`.
    pub fn find_back<T>(&self, mut f: impl FnMut(&Entry) -> Option<T>) -> Option<T> {
        self.0.borrow().entries.iter().rev().find_map(&mut f)
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.0.borrow();
        Ok(RaftState::new(s.hard_state.clone(), s.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let s = self.0.borrow();
        if low <= s.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > s.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - s.snap_index - 1) as usize;
        let to = (high - s.snap_index - 1) as usize;
        let mut ents = s.entries[from..to].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let s = self.0.borrow();
        if idx == s.snap_index {
            return Ok(s.snap_term);
        }
        if idx < s.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > s.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(s.entry(idx).term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.0.borrow().snap_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.0.borrow().last_index())
    }

    /// The prepared snapshot if it is recent enough: at least what was
    /// asked for, and no older than the log's compaction point (a follower
    /// that needs a snapshot is behind that point; an older one would not
    /// bring it past the gap, and raft would send it again and again).
    /// Otherwise the host is asked to build one (it can only between
    /// drains), and raft retries.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut s = self.0.borrow_mut();
        let needed = request_index.max(s.snap_index);
        if let Some(p) = s
            .prepared
            .as_ref()
            .filter(|p| p.get_metadata().index >= needed)
        {
            return Ok(p.clone());
        }
        s.wanted = Some(s.wanted.unwrap_or(0).max(needed));
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_replaces_a_conflicting_tail() {
        let log = RaftLog::new(LogState::bootstrap(&[1, 2, 3]));
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        log.append(&[entry(2, 2)]);
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        assert_eq!(log.term(0).unwrap(), 0);
        assert!(log.term(3).is_err());
        let got = log
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    #[should_panic(expected = "append at 5")]
    fn append_past_the_end_is_a_bug() {
        let log = RaftLog::new(LogState::bootstrap(&[1]));
        log.append(&[entry(5, 1)]);
    }
}

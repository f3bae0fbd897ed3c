//! The idempotency window of one shard (DECISIONS D6–D8).
//!
//! Keyed by (instance id, key). Bounded two ways, both configurable: at most
//! `max_entries` entries (oldest evicted first) and, if `max_age_ms` > 0, an
//! entry older than that no longer matches. Entries are rebuilt from WAL
//! records on recovery, with the record's own timestamp, so a client retrying
//! after a crash within the window is not applied twice.

use std::collections::VecDeque;

use hashbrown::HashMap;

/// What a retry with the same key gets back.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    /// The original CREATE_INSTANCE result.
    Create {
        /// State right after creation.
        state: String,
        /// Offset of the create record.
        wal_offset: u64,
    },
    /// The original APPLY_EVENT result.
    Apply {
        /// Creation offset of the instance it applied to: a key used on an
        /// earlier incarnation (before a delete and re-create) must not
        /// match the new one.
        incarnation: u64,
        /// State before.
        from_state: String,
        /// State after.
        to_state: String,
        /// Context after the merge.
        ctx: crate::ctx::Ctx,
        /// Offset of the apply record.
        wal_offset: u64,
    },
}

#[derive(Debug)]
struct Entry {
    cached: Cached,
    at_ms: i64,
    seq: u64,
}

/// What an insert replaced or evicted.
#[derive(Debug, Default)]
pub struct InsertUndo {
    /// The entry for the same (id, key), with its time and sequence.
    pub prev: Option<(Cached, i64, u64)>,
    /// Entries pushed out of the window, with their times and sequences.
    pub evicted: Vec<((String, String), Cached, i64, u64)>,
}

/// Bounded map (instance id, key) → original result.
#[derive(Debug)]
pub struct IdempotencyWindow {
    map: HashMap<(String, String), Entry>,
    order: VecDeque<((String, String), u64)>,
    next_seq: u64,
    max_entries: usize,
    max_age_ms: i64,
}

impl IdempotencyWindow {
    /// A window of at most `max_entries` entries no older than `max_age_ms`
    /// (0 = no age limit).
    pub fn new(max_entries: usize, max_age_ms: i64) -> Self {
        assert!(max_entries > 0);
        IdempotencyWindow {
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            max_entries,
            max_age_ms,
        }
    }

    /// The cached result for (id, key), if present and not expired.
    pub fn get(&self, id: &str, key: &str, now_ms: i64) -> Option<&Cached> {
        let e = self.map.get(&(id.to_owned(), key.to_owned()))?;
        if self.max_age_ms > 0 && now_ms - e.at_ms > self.max_age_ms {
            return None;
        }
        Some(&e.cached)
    }

    /// Records a result; returns what it replaced or evicted, so that a
    /// rollback can put everything back ([`IdempotencyWindow::restore`]).
    pub fn insert(&mut self, id: &str, key: &str, cached: Cached, at_ms: i64) -> InsertUndo {
        let k = (id.to_owned(), key.to_owned());
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((k.clone(), seq));
        let prev = self
            .map
            .insert(k, Entry { cached, at_ms, seq })
            .map(|e| (e.cached, e.at_ms, e.seq));
        let mut evicted = Vec::new();
        while self.map.len() > self.max_entries {
            evicted.extend(self.evict_oldest());
        }
        // Keep the order queue from growing without bound when keys repeat.
        while self.order.len() > 2 * self.max_entries {
            evicted.extend(self.evict_oldest());
        }
        InsertUndo { prev, evicted }
    }

    /// Reverses an insert of (id, key): restores what it replaced and what
    /// it evicted, each with its original time *and place in the order*,
    /// so the window is exactly as before (a snapshot walking it by
    /// sequence must find restored entries where they were).
    pub fn restore(&mut self, id: &str, key: &str, undo: InsertUndo) {
        let k = (id.to_owned(), key.to_owned());
        match undo.prev {
            Some((c, at_ms, seq)) => self.put_back(k, c, at_ms, seq),
            None => {
                self.map.remove(&k);
            }
        }
        for (k, c, at_ms, seq) in undo.evicted {
            if !self.map.contains_key(&k) {
                self.put_back(k, c, at_ms, seq);
            }
        }
    }

    fn put_back(&mut self, k: (String, String), cached: Cached, at_ms: i64, seq: u64) {
        let pos = self.order.partition_point(|(_, s)| *s < seq);
        if self.order.get(pos).is_none_or(|(_, s)| *s != seq) {
            self.order.insert(pos, (k.clone(), seq));
        }
        self.map.insert(k, Entry { cached, at_ms, seq });
    }

    /// The sequence number the next insert gets: entries inserted from now
    /// on have a sequence at or above it.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Visits live entries in insertion order, starting at sequence `from`
    /// and stopping before `below` or after `max` entries; returns the
    /// sequence to continue from. Lets a snapshot walk the window in chunks
    /// between drains (entries inserted meanwhile come later in the order).
    pub fn visit_from(
        &self,
        from: u64,
        below: u64,
        max: usize,
        mut f: impl FnMut(&str, &str, &Cached, i64),
    ) -> u64 {
        let start = self.order.partition_point(|(_, s)| *s < from);
        let mut next = from;
        let mut seen = 0;
        for (k, seq) in self.order.iter().skip(start) {
            if *seq >= below || seen == max {
                return next.max(from);
            }
            next = seq + 1;
            if let Some(e) = self.map.get(k).filter(|e| e.seq == *seq) {
                f(&k.0, &k.1, &e.cached, e.at_ms);
                seen += 1;
            }
        }
        below
    }

    /// An empty window with the same bounds.
    pub fn emptied(&self) -> Self {
        IdempotencyWindow::new(self.max_entries, self.max_age_ms)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn evict_oldest(&mut self) -> Option<((String, String), Cached, i64, u64)> {
        let (k, seq) = self.order.pop_front()?;
        if self.map.get(&k).is_some_and(|e| e.seq == seq) {
            let e = self.map.remove(&k).expect("checked");
            return Some((k, e.cached, e.at_ms, seq));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(o: u64) -> Cached {
        Cached::Create {
            state: "s".into(),
            wal_offset: o,
        }
    }

    #[test]
    fn bounded_by_entries() {
        let mut w = IdempotencyWindow::new(2, 0);
        w.insert("a", "k", c(1), 0);
        w.insert("b", "k", c(2), 0);
        w.insert("c", "k", c(3), 0);
        assert_eq!(w.len(), 2);
        assert!(w.get("a", "k", 0).is_none());
        assert_eq!(w.get("c", "k", 0), Some(&c(3)));
    }

    #[test]
    fn bounded_by_age() {
        let mut w = IdempotencyWindow::new(10, 1000);
        w.insert("a", "k", c(1), 0);
        assert!(w.get("a", "k", 1000).is_some());
        assert!(w.get("a", "k", 1001).is_none());
    }

    #[test]
    fn same_key_other_instance_is_independent() {
        let mut w = IdempotencyWindow::new(10, 0);
        w.insert("a", "k", c(1), 0);
        assert!(w.get("b", "k", 0).is_none());
    }

    #[test]
    fn restore_puts_back_what_an_insert_replaced_and_evicted() {
        let mut w = IdempotencyWindow::new(2, 0);
        w.insert("a", "k", c(1), 0);
        w.insert("b", "k", c(2), 0);
        let undo = w.insert("c", "k", c(3), 0);
        assert!(w.get("a", "k", 0).is_none());
        w.restore("c", "k", undo);
        assert_eq!(w.get("a", "k", 0), Some(&c(1)));
        assert_eq!(w.get("b", "k", 0), Some(&c(2)));
        assert!(w.get("c", "k", 0).is_none());
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn restored_entries_keep_their_place_in_the_order() {
        let mut w = IdempotencyWindow::new(2, 0);
        w.insert("a", "k", c(1), 0);
        w.insert("b", "k", c(2), 0);
        let begin = w.next_seq();
        let undo = w.insert("c", "k", c(3), 0); // evicts a
        w.restore("c", "k", undo);
        // A walk of what existed before `begin` finds both, in order.
        let mut seen = Vec::new();
        w.visit_from(0, begin, usize::MAX, |id, _, _, _| seen.push(id.to_owned()));
        assert_eq!(seen, vec!["a", "b"]);
    }

    #[test]
    fn repeated_keys_keep_the_queue_bounded() {
        let mut w = IdempotencyWindow::new(3, 0);
        for i in 0..100 {
            w.insert("a", "k", c(i), 0);
        }
        assert_eq!(w.len(), 1);
        assert!(w.order.len() <= 6);
        assert_eq!(w.get("a", "k", 0), Some(&c(99)));
    }
}

//! The global WAL offset sequencer and the durable watermark.
//!
//! DESIGN.md "WAL offsets": each shard reserves a contiguous range per group
//! commit from one process-wide counter, so offsets are unique, increase
//! within every shard and order all shards. The only state shared between
//! shards besides the channels.
//!
//! The watermark is the offset below which every record is written (durable
//! under `every_write`): readers (WAL_READ, subscriptions) never look past
//! it, so an offset they have passed can never be filled in later by a
//! commit still in flight. Each shard publishes a *floor* while it has
//! reserved offsets that are not yet written: the counter's value read
//! *before* reserving, so the floor is never above anything it reserves.
//! `watermark()` reads the counter first and the floors after, so a
//! reservation it does not see as a floor is above the counter value it
//! read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const IDLE: u64 = u64::MAX;

/// Shared by every shard and the frontend.
#[derive(Debug, Clone)]
pub struct Sequencer {
    next: Arc<AtomicU64>,
    floors: Arc<[AtomicU64]>,
    /// Per shard: the lowest offset of an atomic-batch part that is written
    /// but not yet released (IDLE when none). Readers must not pass it: the
    /// batch may still be undone.
    holds: Arc<[AtomicU64]>,
}

impl Sequencer {
    /// A sequencer whose next offset is `next` (>= 1), for `shards` shards.
    pub fn new(next: u64, shards: usize) -> Self {
        assert!(next >= 1 && shards >= 1);
        let floors: Vec<AtomicU64> = (0..shards).map(|_| AtomicU64::new(IDLE)).collect();
        let holds: Vec<AtomicU64> = (0..shards).map(|_| AtomicU64::new(IDLE)).collect();
        Sequencer {
            next: Arc::new(AtomicU64::new(next)),
            floors: floors.into(),
            holds: holds.into(),
        }
    }

    /// Shard `shard` reserves `n` offsets; returns the first. Until
    /// [`Sequencer::release`], the watermark stays at or below it.
    pub fn reserve(&self, shard: usize, n: u64) -> u64 {
        assert!(n > 0);
        let floor = &self.floors[shard];
        debug_assert_eq!(
            floor.load(Ordering::SeqCst),
            IDLE,
            "shard {shard} reserved twice"
        );
        floor.store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
        let base = self.next.fetch_add(n, Ordering::SeqCst);
        debug_assert!(base >= floor.load(Ordering::SeqCst));
        base
    }

    /// Shard `shard` has written everything it reserved.
    pub fn release(&self, shard: usize) {
        self.floors[shard].store(IDLE, Ordering::SeqCst);
    }

    /// Moves the next offset up to `next` if it is below: a replica of a
    /// group wrote records the leader numbered, and readers may now pass
    /// them.
    pub fn advance_to(&self, next: u64) {
        self.next.fetch_max(next, Ordering::SeqCst);
    }

    /// Takes the next offset back down to `next` (cluster mode, one shard):
    /// a drain whose entry did not commit gives its reserved offsets back,
    /// since another leader may hand them out. Called while the shard's
    /// floor still holds readers below them.
    pub fn retract_to(&self, next: u64) {
        let before = self.next.swap(next, Ordering::SeqCst);
        debug_assert!(next <= before, "retracting {before} up to {next}");
    }

    /// Shard `shard` holds back readers at `offset` (its lowest unreleased
    /// batch part), or stops holding (`None`). Set while the shard's floor
    /// still covers the part (before it releases the drain that wrote it).
    pub fn hold(&self, shard: usize, offset: Option<u64>) {
        self.holds[shard].store(offset.unwrap_or(IDLE), Ordering::SeqCst);
    }

    /// The offset the next reservation would start at.
    pub fn peek(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Every record with an offset below this is written.
    pub fn watermark(&self) -> u64 {
        let next = self.next.load(Ordering::SeqCst);
        let floors = self.floors.iter().chain(self.holds.iter());
        floors
            .map(|f| f.load(Ordering::SeqCst))
            .fold(next, u64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_stays_below_unwritten_reservations() {
        let s = Sequencer::new(1, 2);
        assert_eq!(s.watermark(), 1);
        let a = s.reserve(0, 5); // 1..6 in flight on shard 0
        let b = s.reserve(1, 3); // 6..9 in flight on shard 1
        assert_eq!((a, b), (1, 6));
        assert_eq!(s.watermark(), 1);
        s.release(1);
        assert_eq!(s.watermark(), 1, "shard 0 still holds 1..6");
        s.release(0);
        assert_eq!(s.watermark(), 9);
    }

    #[test]
    fn concurrent_reservations_never_let_the_watermark_pass_a_reserved_offset() {
        let s = Sequencer::new(1, 4);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each shard records its in-flight base; a checker asserts that the
        // watermark never exceeds any base while it is in flight.
        let inflight: Arc<[AtomicU64]> = (0..4)
            .map(|_| AtomicU64::new(IDLE))
            .collect::<Vec<_>>()
            .into();
        let mut handles = Vec::new();
        for shard in 0..4 {
            let (s, stop, inflight) = (s.clone(), stop.clone(), inflight.clone());
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let base = s.reserve(shard, 3);
                    inflight[shard].store(base, Ordering::SeqCst);
                    std::hint::spin_loop();
                    inflight[shard].store(IDLE, Ordering::SeqCst);
                    s.release(shard);
                }
            }));
        }
        for _ in 0..200_000 {
            // Snapshot in-flight bases first: any still in flight when the
            // watermark is read must not be passed.
            let w = s.watermark();
            for f in inflight.iter() {
                // A base still in flight now was published before its
                // shard released, so its floor was visible when `w` was
                // computed (or it was reserved after `w`'s counter read and
                // is >= w): either way it is not below w.
                let base = f.load(Ordering::SeqCst);
                assert!(
                    base == IDLE || base >= w,
                    "watermark {w} passed in-flight offset {base}"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
    }
}

//! Subscriptions (WATCH_INSTANCE, WATCH_ALL, UNWATCH; SEMANTICS.md §10 with
//! DECISIONS D6, D9, D19).
//!
//! A subscription is a cursor over the global offset space: it has been
//! given every matching event below `cursor`. Events come from two places:
//!
//! * the **hub**'s live window: shards send the transitions of each drain
//!   to the hub *before* releasing their offsets, and say so again after;
//!   the hub reads the durable watermark, drains its channel, and moves
//!   every event below the watermark, in offset order, into a bounded
//!   window. The window holds *every* event in `[base, released)`; older
//!   ones are dropped when it is full;
//! * the **WAL**, for a cursor below the window's base: a subscription that
//!   asked for an older `from_offset`, or fell behind (a slow reader), is
//!   served from the log (the same merged read as WAL_READ) until it reaches
//!   the window, then continues live.
//!
//! Either way a subscriber sees every matching event exactly once, in offset
//! order, and only events below the watermark (none a crash could take
//! back). Delivery is pulled by the subscriber's own connection task, in
//! chunks, and waits on that connection's socket only: a slow subscriber
//! costs its own connection time and never blocks a shard or another
//! subscriber; its memory is one chunk.
//!
//! The hub starts collecting when the first subscription is made: it turns
//! on the shards' `watching` flag, waits for every shard to pass a barrier
//! (after which each drain sees the flag), and takes the watermark then as
//! the window's base: events below it are in the WAL, events at or above it
//! all reach the hub.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rstmdb_shards::commands::WatchEvent;
use rstmdb_shards::error::ApiError;
use rstmdb_shards::shard::{HubMsg, Sequencer, ShardMsg};
use rstmdb_shards::wal_entry::{kind, WalEntry};
use serde::Serialize;
use serde_json::Value;

/// Most events the live window keeps.
pub const WINDOW_EVENTS: usize = 16_384;
/// Most bytes (approximate, by WAL entry size) the live window keeps.
pub const WINDOW_BYTES: usize = 64 * 1024 * 1024;
/// Most events written to one subscriber per delivery pass.
pub const CHUNK: usize = 256;
/// Most subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 64;

/// Which transitions a subscription wants (AND across fields, OR within).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// WATCH_INSTANCE: this instance only.
    pub instance_id: Option<String>,
    /// Machine names (empty = any).
    pub machines: HashSet<String>,
    /// States before (empty = any).
    pub from_states: HashSet<String>,
    /// States after (empty = any).
    pub to_states: HashSet<String>,
    /// Event names (empty = any).
    pub events: HashSet<String>,
}

impl Filter {
    /// Whether `e` passes.
    pub fn matches(&self, e: &WatchEvent) -> bool {
        self.instance_id
            .as_ref()
            .is_none_or(|id| *id == e.instance_id)
            && (self.machines.is_empty() || self.machines.contains(&e.machine))
            && (self.from_states.is_empty() || self.from_states.contains(&e.from_state))
            && (self.to_states.is_empty() || self.to_states.contains(&e.to_state))
            && (self.events.is_empty() || self.events.contains(&e.event))
    }
}

/// One subscription of a connection.
#[derive(Debug)]
pub struct Subscription {
    /// `sub-` + UUID v4.
    pub id: String,
    /// What it wants.
    pub filter: Filter,
    /// Whether events carry `ctx`.
    pub include_ctx: bool,
    /// Every matching event below this offset has been delivered.
    pub cursor: u64,
    /// The cursor as compaction sees it: the WAL is kept from the lowest
    /// cursor of any subscription on.
    pub lease: Arc<AtomicU64>,
    /// Metrics instruments (no-ops without a recorder).
    pub metrics: SubscriptionMetrics,
}

/// A subscription's instruments: made once when it starts, so delivery
/// never looks anything up in the metrics registry. Not `Clone`: each one
/// is counted once in the active gauge and uncounted when dropped.
#[derive(Debug)]
pub struct SubscriptionMetrics {
    /// `instance` or `all`: the `type` label.
    kind: &'static str,
    /// `rstmdb_events_forwarded_total{type}`.
    pub forwarded: metrics::Counter,
    /// `rstmdb_subscriber_lag_offsets`.
    pub lag: metrics::Histogram,
}

impl SubscriptionMetrics {
    /// Instruments for a new subscription; counts it in
    /// `rstmdb_subscriptions_active{type}` until dropped (UNWATCH or the
    /// connection closing, unlike the reference, which only counted UNWATCH).
    pub fn new(watch_instance: bool) -> Self {
        let kind = if watch_instance { "instance" } else { "all" };
        metrics::gauge!(crate::telemetry::SUBSCRIPTIONS_ACTIVE, "type" => kind).increment(1.0);
        Self {
            kind,
            forwarded: metrics::counter!(crate::telemetry::EVENTS_FORWARDED, "type" => kind),
            lag: metrics::histogram!(crate::telemetry::SUBSCRIBER_LAG),
        }
    }
}

impl Drop for SubscriptionMetrics {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::SUBSCRIPTIONS_ACTIVE, "type" => self.kind).decrement(1.0);
    }
}

impl Subscription {
    /// Moves the cursor forward (and the hub's view of it).
    pub fn advance(&mut self, next: u64) {
        debug_assert!(next >= self.cursor);
        self.cursor = next;
        self.lease.store(next, Ordering::SeqCst);
    }
}

/// Encodes one event message for a subscription (PROTOCOL.md §4 key order).
pub fn encode_event(sub: &Subscription, e: &WatchEvent) -> Vec<u8> {
    #[derive(Serialize)]
    struct Msg<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        subscription_id: &'a str,
        instance_id: &'a str,
        machine: &'a str,
        version: u32,
        wal_offset: u64,
        from_state: &'a str,
        to_state: &'a str,
        event: &'a str,
        payload: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        ctx: Option<&'a rstmdb_shards::ctx::Ctx>,
    }
    serde_json::to_vec(&Msg {
        kind: "event",
        subscription_id: &sub.id,
        instance_id: &e.instance_id,
        machine: &e.machine,
        version: e.version,
        wal_offset: e.wal_offset,
        from_state: &e.from_state,
        to_state: &e.to_state,
        event: &e.event,
        payload: &e.payload,
        ctx: sub.include_ctx.then_some(&e.ctx),
    })
    .expect("event serialization cannot fail")
}

/// The transitions a WAL record holds: an apply, or the applies of an
/// atomic-batch part that was not undone (`aborted`).
pub fn events_from_record(
    offset: u64,
    kind_byte: u8,
    payload: &[u8],
    aborted: &HashSet<String>,
) -> Result<Vec<WatchEvent>, ApiError> {
    if kind_byte != kind::APPLY_EVENT && kind_byte != kind::BATCH_PART {
        return Ok(Vec::new());
    }
    let entry: WalEntry = serde_json::from_slice(payload)
        .map_err(|e| ApiError::wal(format!("undecodable record at offset {offset}: {e}")))?;
    if let WalEntry::BatchPart { batch_id, .. } = &entry {
        if aborted.contains(batch_id) {
            return Ok(Vec::new());
        }
    }
    let mut events = Vec::new();
    entry.into_watch_events(offset, payload.len(), &mut events);
    Ok(events)
}

/// What a subscription at `cursor` gets from the hub.
pub enum Take {
    /// Events from the window (already filtered by offset, not by filter),
    /// and the cursor after them.
    Live(Vec<Arc<WatchEvent>>, u64),
    /// The cursor is below the window: read the WAL in `[cursor, below)`.
    FromWal {
        /// Read up to here, then ask again.
        below: u64,
    },
}

/// The frontend's event hub (one per frontend executor).
pub struct Hub {
    seq: Sequencer,
    watching: Arc<AtomicBool>,
    /// Base of the window once live: every event at or above it reaches us.
    live: Option<u64>,
    enabling: bool,
    /// Events in `[base, released)`, in offset order.
    window: VecDeque<Arc<WatchEvent>>,
    /// Approximate bytes held by `window`.
    window_bytes: usize,
    base: u64,
    released: u64,
    /// Received but not yet below the watermark.
    pending: BTreeMap<u64, Arc<WatchEvent>>,
    /// Connections to wake when events arrive.
    doorbells: Vec<flume::Sender<()>>,
    /// What all frontends' hubs share.
    pub shared: Arc<Shared>,
}

/// State every frontend's hub shares: with several frontends, compaction
/// and atomic batches on one must be seen by the subscribers of all.
#[derive(Debug, Default)]
pub struct Shared {
    /// Atomic batches undone after their parts were logged: replay skips
    /// those parts.
    aborted: Mutex<HashSet<String>>,
    /// Cursors of every subscription (see [`Subscription::lease`]).
    leases: Mutex<Vec<Weak<AtomicU64>>>,
    /// Records below this may have been compacted away: no subscription
    /// may start below it (D9).
    wal_floor: AtomicU64,
}

impl Shared {
    /// Remembers an undone batch.
    pub fn add_aborted(&self, batch_id: String) {
        self.aborted.lock().expect("not poisoned").insert(batch_id);
    }

    /// Remembers undone batches.
    pub fn extend_aborted(&self, ids: impl IntoIterator<Item = String>) {
        self.aborted.lock().expect("not poisoned").extend(ids);
    }

    /// The undone batches (held briefly, never across an await).
    pub fn aborted(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.aborted.lock().expect("not poisoned")
    }

    /// A lease for a new subscription's cursor.
    pub fn lease(&self, cursor: u64) -> Arc<AtomicU64> {
        let lease = Arc::new(AtomicU64::new(cursor));
        self.leases
            .lock()
            .expect("not poisoned")
            .push(Arc::downgrade(&lease));
        lease
    }

    /// The lowest cursor of any live subscription (forgetting the gone).
    pub fn min_cursor(&self) -> Option<u64> {
        let mut leases = self.leases.lock().expect("not poisoned");
        leases.retain(|w| w.strong_count() > 0);
        leases
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|c| c.load(Ordering::SeqCst))
            .min()
    }

    /// The oldest offset a subscription may start from.
    pub fn wal_floor(&self) -> u64 {
        self.wal_floor.load(Ordering::SeqCst)
    }

    /// Sets it.
    pub fn set_wal_floor(&self, floor: u64) {
        self.wal_floor.store(floor, Ordering::SeqCst);
    }
}

impl Hub {
    /// A hub that is not collecting yet.
    pub fn new(seq: Sequencer, watching: Arc<AtomicBool>, shared: Arc<Shared>) -> Self {
        Hub {
            seq,
            watching,
            live: None,
            enabling: false,
            window: VecDeque::new(),
            window_bytes: 0,
            base: 0,
            released: 0,
            pending: BTreeMap::new(),
            doorbells: Vec::new(),
            shared,
        }
    }

    /// The offset below which every event has been released to the window
    /// (or lies in the WAL): a new live-only subscription starts here.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Registers a connection's doorbell.
    pub fn register(&mut self, bell: flume::Sender<()>) {
        self.doorbells.push(bell);
    }

    /// Gives a subscription at `cursor` what it can have now.
    pub fn take(&self, cursor: u64, max: usize) -> Take {
        if cursor < self.base {
            return Take::FromWal { below: self.base };
        }
        let start = self.window.partition_point(|e| e.wal_offset < cursor);
        let events: Vec<Arc<WatchEvent>> =
            self.window.iter().skip(start).take(max).cloned().collect();
        let next = if events.len() == max {
            events.last().map_or(cursor, |e| e.wal_offset + 1)
        } else {
            self.released.max(cursor)
        };
        Take::Live(events, next)
    }

    /// Takes in one message of a shard.
    fn receive(&mut self, msg: HubMsg) {
        match msg {
            HubMsg::Events(evs) => {
                for e in evs {
                    self.pending.insert(e.wal_offset, Arc::new(e));
                }
            }
            HubMsg::Released => {}
            HubMsg::HistoryReplaced { below } => self.replace_history(below),
        }
    }

    /// A leader's snapshot replaced this node's state below `below` (cluster
    /// mode): no subscription may start below it any more, and every
    /// subscription still below it is sent to the WAL, whose read there is
    /// refused, which ends it (never a silent gap, D19). The window is
    /// emptied: what it held lies below `below`.
    fn replace_history(&mut self, below: u64) {
        self.shared
            .set_wal_floor(self.shared.wal_floor().max(below));
        self.pending.retain(|&offset, _| offset >= below);
        self.window.clear();
        self.window_bytes = 0;
        self.base = self.base.max(below);
        // Whoever waits is woken to find out.
        self.doorbells.retain(|b| match b.try_send(()) {
            Ok(()) | Err(flume::TrySendError::Full(_)) => true,
            Err(flume::TrySendError::Disconnected(_)) => false,
        });
    }

    /// Folds everything the shards sent into the window.
    fn pump(&mut self, rx: &flume::Receiver<HubMsg>) {
        // Watermark first, then drain: every event below it was sent before
        // its shard released, so it is in the channel by now.
        let w = self.seq.watermark();
        while let Ok(msg) = rx.try_recv() {
            self.receive(msg);
        }
        if self.live.is_none() {
            // Not collecting yet. While enabling, keep what arrives: events
            // at or above the base to be chosen must not be lost.
            if !self.enabling {
                self.pending.clear();
            }
            return;
        }
        let mut moved = false;
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() >= w {
                break;
            }
            let e = entry.remove();
            if e.wal_offset >= self.base {
                debug_assert!(self
                    .window
                    .back()
                    .is_none_or(|b| b.wal_offset < e.wal_offset));
                self.window_bytes += e.size;
                self.window.push_back(e);
                moved = true;
            }
        }
        if w > self.released {
            self.released = w;
            moved = true;
        }
        // Bounded by count and bytes; subscribers behind the window are
        // served from the WAL (D19).
        while self.window.len() > WINDOW_EVENTS
            || (self.window_bytes > WINDOW_BYTES && self.window.len() > 1)
        {
            let old = self.window.pop_front().expect("non-empty");
            self.window_bytes -= old.size;
            self.base = old.wal_offset + 1;
        }
        if moved {
            self.doorbells.retain(|b| match b.try_send(()) {
                Ok(()) | Err(flume::TrySendError::Full(_)) => true,
                Err(flume::TrySendError::Disconnected(_)) => false,
            });
        }
    }
}

/// Runs the hub's pump until every shard is gone.
pub async fn run_hub(hub: Rc<RefCell<Hub>>, rx: flume::Receiver<HubMsg>) {
    while let Ok(first) = rx.recv_async().await {
        let mut h = hub.borrow_mut();
        h.receive(first);
        h.pump(&rx);
    }
}

/// Makes the hub collect events (once). After this returns, every event at
/// or above the hub's base reaches the hub.
pub async fn ensure_live(hub: &Rc<RefCell<Hub>>, shards: &[flume::Sender<ShardMsg>]) {
    loop {
        {
            let mut h = hub.borrow_mut();
            if h.live.is_some() {
                return;
            }
            if !h.enabling {
                h.enabling = true;
                h.watching.store(true, Ordering::SeqCst);
                break;
            }
        }
        // Someone else is enabling: wait for them.
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let (tx, rx) = flume::bounded(shards.len());
    let mut sent = 0;
    for s in shards {
        if s.send_async(ShardMsg::Barrier(tx.clone())).await.is_ok() {
            sent += 1;
        }
    }
    drop(tx);
    for _ in 0..sent {
        let _ = rx.recv_async().await;
    }
    // Every drain from now on collects events; everything reserved before
    // is below `base`. Wait until all of that is released (a held atomic
    // part can keep it back a moment): below `base` is the WAL's business.
    let seq = hub.borrow().seq.clone();
    let base = seq.peek();
    while seq.watermark() < base {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut h = hub.borrow_mut();
    h.base = base;
    h.released = base;
    h.live = Some(base);
    h.enabling = false;
    h.pending.retain(|o, _| *o >= base);
    tracing::info!(base, "subscriptions: collecting live events");
}

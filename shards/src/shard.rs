//! The shard loop: drain the channel, execute, group-commit, reply.
//!
//! One shard runs on one pinned glommio executor and owns its [`Engine`] and
//! [`WalWriter`]; nothing else touches them. Each turn of the loop takes
//! every batch waiting in the channel (up to a bound), executes the commands
//! in arrival order (later ones see the effects of earlier ones), writes all
//! staged records with one aligned write and at most one `fdatasync`, and
//! only then releases the replies — reads included, so no reply reveals
//! state a crash could take back.
//!
//! [`run`] opens the WAL and hands over to `ShardLoop`, whose steps live in
//! submodules: `main_loop` (waiting, idling, stopping), `gather` (building
//! a drain; messages that need no commit), `drain` (execute, commit or roll
//! back, release) and `snapshots` (snapshots and compaction).

mod cluster;
mod drain;
mod gather;
mod main_loop;
mod snapshots;
mod transfer;
pub use transfer::MAX_SNAPSHOT_BYTES;

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use rstmdb_wal::{Page, ReadRange, Recovered, WalError, WalWriter, WriteMode, WriterConfig};

use crate::atomic::{AtomicState, Vote};
use crate::commands::WatchEvent;
use crate::commands::{Batch, Command, Reply, ShardWalStats};
use crate::engine::Engine;
use crate::error::ApiError;
pub use crate::sequencer::Sequencer;
pub use cluster::{ClusterShardConfig, GroupStatus, LogBounds, COMMIT_SECONDS, PEER_QUEUE};
use snapshots::Snapshots;

/// When to `fdatasync` (config `storage.fsync_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every reply (group commit makes this affordable).
    EveryWrite,
    /// After every N records.
    EveryN(u64),
    /// At most N ms after a write (a real timer, DECISIONS D13).
    EveryMs(u64),
    /// Only at shutdown.
    Never,
}

impl FsyncPolicy {
    /// How the WAL writes for this policy. `every_write` acknowledges
    /// durable records, so each commit is one O_DSYNC write (one device
    /// round trip). The others acknowledge records that survive a crash of
    /// the process, which a copy into the page cache gives in microseconds;
    /// their `fdatasync` comes when the policy says.
    pub fn write_mode(self) -> WriteMode {
        match self {
            FsyncPolicy::EveryWrite => WriteMode::DirectSync,
            FsyncPolicy::EveryN(_) | FsyncPolicy::EveryMs(_) | FsyncPolicy::Never => {
                WriteMode::PageCache
            }
        }
    }
}

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Shard number.
    pub id: usize,
    /// WAL writer settings.
    pub wal: WriterConfig,
    /// Fsync policy.
    pub fsync: FsyncPolicy,
    /// Most commands executed in one group commit.
    pub max_drain_commands: usize,
    /// Where committed transitions go for subscribers.
    pub events: EventSink,
    /// The shard's snapshot directory.
    pub snapshot_dir: std::path::PathBuf,
    /// Cluster mode: the shard is a member of its Raft group.
    pub cluster: Option<ClusterShardConfig>,
}

/// What a shard tells the subscription hubs.
#[derive(Debug, Clone)]
pub enum HubMsg {
    /// Committed transitions of one drain, sent *before* the shard releases
    /// its offsets (so they are in the channel before the watermark can
    /// pass them).
    Events(Vec<WatchEvent>),
    /// The shard released its offsets: the watermark may have moved.
    Released,
    /// Cluster mode: a leader's snapshot replaced this node's state, and
    /// its WAL holds nothing below `below` any more. Subscribers still
    /// below it cannot be served without a gap: they are ended (D19).
    HistoryReplaced { below: u64 },
}

/// The shard's side of the subscription hubs' channels (one hub per
/// frontend).
#[derive(Debug, Clone)]
pub struct EventSink {
    /// Set by a hub once anyone subscribes; until then shards build no
    /// events.
    pub watching: Arc<AtomicBool>,
    /// Unbounded on purpose: a shard must never wait for subscribers. Each
    /// hub drains its channel at once into its bounded window.
    pub tx: Vec<flume::Sender<HubMsg>>,
}

impl EventSink {
    /// Sends `msg` to every hub.
    pub fn send(&self, msg: HubMsg) {
        if let Some((last, rest)) = self.tx.split_last() {
            for t in rest {
                let _ = t.send(msg.clone());
            }
            let _ = last.send(msg);
        }
    }
}

/// Messages a shard accepts.
pub enum ShardMsg {
    /// Commands from one connection's read cycle.
    Batch(Batch),
    /// Read committed records back (served off the shard loop).
    WalRead(WalReadRequest),
    /// Cluster mode: hand this node's leadership to `to` (or, with `None`,
    /// to the follower furthest along); answered with the leader once
    /// another node leads.
    TransferLeader {
        to: Option<u64>,
        reply_to: flume::Sender<Result<u64, ApiError>>,
    },
    /// Answered as soon as the shard handles it: every drain the shard
    /// starts afterwards sees the current `EventSink::watching` flag.
    Barrier(flume::Sender<()>),
    /// A step of an atomic batch (see `atomic`).
    Atomic(AtomicMsg),
    /// Take a snapshot if the request's condition holds.
    Snapshot(SnapshotRequest),
    /// Drop WAL segments below a floor and prune old snapshots.
    Compact(CompactRequest),
    /// Figures for automatic compaction.
    Stats(flume::Sender<(usize, ShardStats)>),
    /// Figures for the metrics endpoint (counts instances: O(instances),
    /// so asked once per scrape, not per request).
    Telemetry(flume::Sender<(usize, Telemetry)>),
    /// A Raft message from a peer for this shard's group (cluster mode).
    Peer(raft::prelude::Message),
}

/// A shard's figures for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Telemetry {
    /// Live (not deleted) instances.
    pub instances: u64,
    /// Machine versions held (every shard holds all of them).
    pub machine_versions: u64,
    /// WAL figures, as WAL_STATS sums them.
    pub wal: ShardWalStats,
}

/// When a [`ShardMsg::Snapshot`] should write one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotWhen {
    /// Only if the shard has none yet (COMPACT without `force_snapshot`).
    IfNone,
    /// If it has none or the log moved since (COMPACT `force_snapshot`).
    IfChanged,
    /// Whatever the log did (a shard that skipped the previous round, so
    /// its oldest snapshot does not hold back pruning for ever).
    Always,
    /// If the log moved since and either threshold is reached (0 = that
    /// trigger is off): automatic compaction.
    IfOver {
        /// Records written since the last snapshot.
        records: u64,
        /// Bytes of WAL in use.
        wal_bytes: u64,
    },
}

/// What a snapshot request came to.
#[derive(Debug)]
pub enum SnapshotOutcome {
    /// None was needed; the newest existing one starts here (if any).
    Skipped(Option<u64>),
    /// A new snapshot is durable.
    Written(crate::snapshot::SnapshotFile),
    /// It failed (nothing changed on disk).
    Failed(String),
}

/// A [`ShardMsg::Snapshot`].
pub struct SnapshotRequest {
    /// Condition.
    pub when: SnapshotWhen,
    /// Every shard's oldest snapshot starts above this offset: committed
    /// batches released below it need no remembering (see
    /// `Engine::committed`).
    pub prune_committed_upto: u64,
    /// Where the outcome goes once the file is durable.
    pub reply_to: flume::Sender<(usize, SnapshotOutcome)>,
}

/// A [`ShardMsg::Compact`].
pub struct CompactRequest {
    /// A snapshot of this shard that is now durable and recorded in the
    /// manifest (recovery can start from it).
    pub snapshot_start: Option<u64>,
    /// Segments whose every record is below this go.
    pub floor: u64,
    /// Segments written to at or after this time stay (WAL retention).
    pub retain_since: Option<std::time::SystemTime>,
    /// Snapshot files to keep (newest first; at least 1).
    pub keep_snapshots: usize,
    /// Where the outcome goes.
    pub reply_to: flume::Sender<(usize, CompactOutcome)>,
}

/// What a [`ShardMsg::Compact`] did.
#[derive(Debug, Clone, Default)]
pub struct CompactOutcome {
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Their size on disk.
    pub bytes_reclaimed: u64,
    /// Segments left.
    pub wal_segments: u64,
    /// Snapshot files left.
    pub snapshots: u64,
    /// Start of the oldest snapshot file left.
    pub oldest_snapshot: Option<u64>,
    /// Every record at or above this offset is still in the WAL (at most
    /// the requested floor; lower when retention kept segments).
    pub retained_from: u64,
    /// First error met while deleting, if any (the log is intact either
    /// way: segments are only ever deleted oldest first).
    pub error: Option<String>,
}

/// Figures for automatic compaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardStats {
    /// Records written since the last snapshot started.
    pub records_since_snapshot: u64,
    /// WAL bytes in use.
    pub wal_bytes: u64,
    /// WAL segments.
    pub wal_segments: u64,
    /// Start of the newest durable snapshot.
    pub snapshot_start: Option<u64>,
}

/// A participant's answer to [`AtomicMsg::Commit`]: the answers of its
/// part's ops once the part is durable, or why it failed.
pub type PartAnswer = (usize, Result<Vec<(u32, Reply)>, ApiError>);

/// The steps of an atomic batch, sent by the coordinating frontend.
pub enum AtomicMsg {
    /// Dry-run this shard's part and hold its instances.
    Prepare {
        /// Batch id.
        batch_id: String,
        /// The part, in batch order.
        commands: Vec<(u32, Command)>,
        /// Where the vote goes.
        reply_to: flume::Sender<(usize, Vote)>,
    },
    /// Run the part for real and log it; answer once it is durable.
    Commit {
        /// Batch id.
        batch_id: String,
        /// Shards whose parts log something.
        participants: Vec<u32>,
        /// The answers of the part's ops, or why it failed.
        reply_to: flume::Sender<PartAnswer>,
    },
    /// Every part is durable: the batch is committed.
    Release {
        /// Batch id.
        batch_id: String,
    },
    /// The batch failed: undo this shard's part (logging the abort if it
    /// was written); acknowledged when done.
    Abort {
        /// Batch id.
        batch_id: String,
        /// Acknowledgement.
        reply_to: flume::Sender<usize>,
    },
}

/// A request for this shard's records in `range` (see [`rstmdb_wal::read`]).
pub struct WalReadRequest {
    /// What to read; `range.below` must not exceed the watermark.
    pub range: ReadRange,
    /// Where the records (or the error) go.
    pub reply_to: flume::Sender<(usize, Result<Page, ApiError>)>,
}

/// What recovery decided for a shard beyond its engine and WAL.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Batch parts recovery undid: their `batch_abort` records are logged
    /// before the shard serves.
    pub aborted_batches: Vec<String>,
    /// Start of the snapshot the shard was loaded from.
    pub snapshot_start: Option<u64>,
    /// Records the shard has ever written (see `RecoveredShard`).
    pub records_ever: u64,
}

/// Runs the shard until every sender of `rx` is gone, then syncs the WAL.
/// `ready` is told once the WAL is open (or why it could not be), so that
/// start-up fails instead of serving with a dead shard.
pub async fn run(
    cfg: ShardConfig,
    engine: Engine,
    recovered: Recovered,
    rx: flume::Receiver<ShardMsg>,
    seq: Sequencer,
    resume: Resume,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), WalError> {
    let Resume {
        aborted_batches,
        snapshot_start,
        records_ever,
    } = resume;
    let mut writer = open_wal(&cfg, &recovered, &seq, &aborted_batches, ready).await?;
    // Recovery counted the records compacted away too (plus any abort
    // records just logged).
    writer.set_records(records_ever + aborted_batches.len() as u64);
    drop(recovered);
    let member = match cfg.cluster.clone() {
        Some(c) => match cluster::Member::open(c.clone(), seq.peek()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(shard = cfg.id, error = %e, "cannot join the shard's group");
                return Err(WalError::Io {
                    op: "opening the group's raft log",
                    path: c.raft_dir,
                    source: std::io::Error::other(e),
                });
            }
        },
        None => None,
    };
    let mut shard = ShardLoop::new(cfg, engine, writer, rx, seq, snapshot_start);
    shard.cluster = member;
    shard.serve().await
}

/// Opens the WAL and logs the aborts recovery decided, then tells start-up
/// (through `ready`) whether the shard can serve.
async fn open_wal(
    cfg: &ShardConfig,
    recovered: &Recovered,
    seq: &Sequencer,
    aborted_batches: &[String],
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<WalWriter, WalError> {
    let mut opened = WalWriter::open(cfg.wal.clone(), recovered).await;
    if let (Ok(w), false) = (opened.as_mut(), aborted_batches.is_empty()) {
        if let Err(e) = log_aborts(w, seq, cfg.id, aborted_batches).await {
            opened = Err(e);
        }
    }
    let _ = ready.send(match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("shard {}: opening the WAL failed: {e}", cfg.id)),
    });
    // Dropped now, so that start-up notices an executor that dies before
    // reporting (its sender is then gone too).
    drop(ready);
    opened
}

/// Logs (durably, before serving) a `batch_abort` for every batch part that
/// recovery undid, so that later records never depend on an undone part.
async fn log_aborts(
    writer: &mut WalWriter,
    seq: &Sequencer,
    shard: usize,
    batches: &[String],
) -> Result<(), WalError> {
    let base = seq.reserve(shard, batches.len() as u64);
    for (i, id) in batches.iter().enumerate() {
        let entry = crate::wal_entry::WalEntry::BatchAbort {
            batch_id: id.clone(),
        };
        let bytes = serde_json::to_vec(&entry).expect("serializable");
        writer.stage(base + i as u64, entry.kind(), &bytes)?;
    }
    let result = writer.commit(true).await;
    seq.release(shard);
    tracing::warn!(shard, batches = ?batches, "atomic batches missing a participant's part were undone");
    result
}

/// Histogram of records written per group commit (metrics endpoint).
pub const GROUP_COMMIT_RECORDS: &str = "rstmdb_group_commit_records";
/// Histogram of seconds from a snapshot's start to its file being durable.
pub const SNAPSHOT_SECONDS: &str = "rstmdb_snapshot_duration_seconds";

/// Everything a running shard owns. Its loop is a page of named steps
/// (`main_loop`): take a message, gather a drain (`gather`), execute and
/// group-commit it (`drain`); snapshots and compaction are in `snapshots`.
struct ShardLoop {
    cfg: ShardConfig,
    engine: Engine,
    writer: WalWriter,
    rx: flume::Receiver<ShardMsg>,
    seq: Sequencer,
    atomic: AtomicState,
    /// Messages that waited for a held atomic batch and may run now.
    ready: VecDeque<ShardMsg>,
    /// Messages still waiting for a held atomic batch.
    deferred: VecDeque<ShardMsg>,
    snaps: Snapshots,
    /// Records committed since the last sync (`every_n`).
    unsynced_records: u64,
    /// When the oldest unsynced commit was written (`every_ms`).
    dirty_since: Option<Instant>,
    /// Records per group commit (no-op handle without a metrics recorder).
    commit_records: metrics::Histogram,
    /// Cluster mode: the shard's member of its group.
    cluster: Option<cluster::Member>,
    /// Cluster mode: a leader's snapshot replaced the state below this
    /// offset, and the WAL with it: readers asking for less are refused
    /// rather than given a gap (0 while nothing was replaced).
    replaced_below: u64,
}

impl ShardLoop {
    fn new(
        cfg: ShardConfig,
        engine: Engine,
        writer: WalWriter,
        rx: flume::Receiver<ShardMsg>,
        seq: Sequencer,
        snapshot_start: Option<u64>,
    ) -> Self {
        let snaps = Snapshots {
            latest: snapshot_start,
            records_since: writer.records(),
            job: None,
            job_started: Instant::now(),
        };
        ShardLoop {
            cfg,
            engine,
            writer,
            rx,
            seq,
            atomic: AtomicState::default(),
            ready: VecDeque::new(),
            deferred: VecDeque::new(),
            snaps,
            unsynced_records: 0,
            dirty_since: None,
            commit_records: metrics::histogram!(GROUP_COMMIT_RECORDS),
            cluster: None,
            replaced_below: 0,
        }
    }

    /// Lets every message an atomic batch held back run (next, in order).
    fn let_deferred_run(&mut self) {
        self.ready.extend(self.deferred.drain(..));
    }
}

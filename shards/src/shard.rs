//! The shard loop: drain the channel, execute, group-commit, reply.
//!
//! One shard runs on one pinned glommio executor and owns its [`Engine`] and
//! [`WalWriter`]; nothing else touches them. Each turn of the loop takes
//! every batch waiting in the channel (up to a bound), executes the commands
//! in arrival order (later ones see the effects of earlier ones), writes all
//! staged records with one aligned write and at most one `fdatasync`, and
//! only then releases the replies — reads included, so no reply reveals
//! state a crash could take back.

use std::time::{Duration, Instant};

use futures_lite::future;
use rstmdb_wal::{
    Page, ReadRange, ReaderIo, Recovered, SegmentInfo, WalError, WalWriter, WriteMode, WriterConfig,
};

use crate::atomic::{AtomicState, Vote};
use crate::commands::WatchEvent;
use crate::commands::{Batch, BatchReply, Command, Reply, ShardWalStats, BATCH_ANSWER_BYTES};
use crate::engine::{now_ms, Engine, Mark, Offsets};
use crate::error::ApiError;
pub use crate::sequencer::Sequencer;
use crate::snapshot::{SnapshotJob, Step};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// The replies to one batch and where they go.
type Answer = (flume::Sender<BatchReply>, Vec<(u32, Reply)>);

/// Messages a shard accepts.
pub enum ShardMsg {
    /// Commands from one connection's read cycle.
    Batch(Batch),
    /// Read committed records back (served off the shard loop).
    WalRead(WalReadRequest),
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

impl ShardMsg {
    fn kind(&self) -> &'static str {
        match self {
            ShardMsg::Batch(_) => "batch",
            ShardMsg::WalRead(_) => "wal read",
            ShardMsg::Barrier(_) => "barrier",
            ShardMsg::Atomic(_) => "atomic",
            ShardMsg::Snapshot(_) => "snapshot",
            ShardMsg::Compact(_) => "compact",
            ShardMsg::Stats(_) => "stats",
            ShardMsg::Telemetry(_) => "telemetry",
        }
    }
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

/// A part executed in this drain, waiting for the drain's commit.
struct PartCommit {
    batch_id: String,
    replies: Vec<(u32, Reply)>,
    mark: Mark,
    first: Option<u64>,
    reply_to: flume::Sender<PartAnswer>,
}

/// A request for this shard's records in `range` (see [`rstmdb_wal::read`]).
pub struct WalReadRequest {
    /// What to read; `range.below` must not exceed the watermark.
    pub range: ReadRange,
    /// Where the records (or the error) go.
    pub reply_to: flume::Sender<(usize, Result<Page, ApiError>)>,
}

/// Serves a WAL read on the blocking pool, so the shard loop keeps going.
/// The records below the watermark are already in the written part of the
/// segments listed now, which is never rewritten.
/// Its reads are counted into the writer's `io_stats` through `io`.
fn spawn_wal_read(
    shard: usize,
    dir: std::path::PathBuf,
    segments: Vec<SegmentInfo>,
    io: ReaderIo,
    req: WalReadRequest,
) {
    glommio::spawn_local(async move {
        let range = req.range;
        let result = glommio::executor()
            .spawn_blocking(move || rstmdb_wal::read(&dir, &segments, range))
            .await
            .inspect(|page| io.add(page))
            .map_err(ApiError::wal);
        let _ = req.reply_to.send_async((shard, result)).await;
    })
    .detach();
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
    mut engine: Engine,
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
    let mut opened = WalWriter::open(cfg.wal.clone(), &recovered).await;
    if let (Ok(w), false) = (opened.as_mut(), aborted_batches.is_empty()) {
        if let Err(e) = log_aborts(w, &seq, cfg.id, &aborted_batches).await {
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
    let mut writer = opened?;
    // Recovery counted the records compacted away too (plus any abort
    // records just logged).
    writer.set_records(records_ever + aborted_batches.len() as u64);
    drop(recovered);
    let mut unsynced_records: u64 = 0;
    let mut dirty_since: Option<Instant> = None;
    let mut atomic = AtomicState::default();
    // Messages that waited for a held atomic batch and may run now; and
    // those still waiting.
    let mut ready: VecDeque<ShardMsg> = VecDeque::new();
    let mut deferred: VecDeque<ShardMsg> = VecDeque::new();
    let mut snaps = Snapshots {
        latest: snapshot_start,
        records_since: writer.records(),
        job: None,
        job_started: Instant::now(),
    };
    // Records per group commit (no-op handles without a metrics recorder).
    let commit_records = metrics::histogram!(GROUP_COMMIT_RECORDS);
    loop {
        let first = match ready.pop_front() {
            Some(m) => m,
            None if snaps.job.is_some() => match rx.try_recv() {
                Ok(m) => m,
                Err(flume::TryRecvError::Disconnected) => break,
                Err(flume::TryRecvError::Empty) => {
                    // The every_ms timer lives in `next_message`, which an
                    // idle shard with a snapshot running does not reach.
                    if let (FsyncPolicy::EveryMs(ms), Some(since)) = (cfg.fsync, dirty_since) {
                        if since.elapsed() >= Duration::from_millis(ms) {
                            if let Err(e) = writer.sync().await {
                                tracing::error!(shard = cfg.id, error = %e, "timed fdatasync failed");
                            }
                            dirty_since = None;
                        }
                    }
                    // Idle: give the snapshot the time, but wake for work.
                    if matches!(
                        snaps.step(&cfg, &mut engine, IDLE_SNAPSHOT_STEP),
                        Step::Blocked
                    ) {
                        let woke = future::or(async { Some(rx.recv_async().await.ok()) }, async {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                            None
                        })
                        .await;
                        match woke {
                            Some(Some(m)) => m,
                            Some(None) => break,
                            None => continue,
                        }
                    } else {
                        // Let the executor's other tasks and I/O run.
                        future::yield_now().await;
                        continue;
                    }
                }
            },
            None => match next_message(&rx, &cfg, &mut writer, &mut dirty_since).await {
                Some(m) => m,
                None => break,
            },
        };
        // Gather the drain: every message already waiting, in order.
        let mut items: Vec<ShardMsg> = Vec::new();
        let mut commands = 0;
        let mut writes: u64 = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            let mut ends_drain = false;
            match msg {
                ShardMsg::Barrier(done) => {
                    let _ = done.try_send(());
                }
                ShardMsg::Snapshot(req) => {
                    snaps
                        .begin(&cfg, &mut engine, &mut writer, &seq, &atomic, req)
                        .await
                }
                ShardMsg::Compact(req) => snaps.compact(&cfg, &mut writer, req),
                ShardMsg::Stats(to) => {
                    let _ = to.try_send((
                        cfg.id,
                        ShardStats {
                            records_since_snapshot: snaps.records_since,
                            wal_bytes: writer.used_bytes(),
                            wal_segments: writer.segments().len() as u64,
                            snapshot_start: snaps.latest,
                        },
                    ));
                }
                ShardMsg::Telemetry(to) => {
                    let _ = to.try_send((
                        cfg.id,
                        Telemetry {
                            instances: engine.active_instances() as u64,
                            machine_versions: engine.machine_versions() as u64,
                            wal: ShardWalStats {
                                entries: writer.records(),
                                segments: writer.segments().len() as u64,
                                used_bytes: writer.used_bytes(),
                                io: writer.io_stats(),
                            },
                        },
                    ));
                }
                ShardMsg::WalRead(req) => spawn_wal_read(
                    cfg.id,
                    cfg.wal.dir.clone(),
                    writer.read_plan(req.range.from),
                    writer.reader_io(),
                    req,
                ),
                ShardMsg::Atomic(AtomicMsg::Release { batch_id }) => {
                    let events = atomic.release(&batch_id);
                    // Every participant's part is below the next offset.
                    engine.note_committed(batch_id, seq.peek());
                    // Events first, then lift the hold, then say so: the
                    // hub must find them before the watermark passes them.
                    if !events.is_empty() {
                        cfg.events.send(HubMsg::Events(events));
                    }
                    seq.hold(cfg.id, atomic.hold_floor());
                    cfg.events.send(HubMsg::Released);
                    ready.extend(deferred.drain(..));
                }
                ShardMsg::Batch(b) => {
                    commands += b.commands.len();
                    writes += b.commands.iter().filter(|(_, c)| c.may_write()).count() as u64;
                    items.push(ShardMsg::Batch(b));
                }
                ShardMsg::Atomic(AtomicMsg::Prepare {
                    batch_id,
                    commands: cmds,
                    reply_to,
                }) => {
                    commands += cmds.len();
                    items.push(ShardMsg::Atomic(AtomicMsg::Prepare {
                        batch_id,
                        commands: cmds,
                        reply_to,
                    }));
                }
                ShardMsg::Atomic(AtomicMsg::Commit {
                    batch_id,
                    participants,
                    reply_to,
                }) => {
                    writes += atomic.prepared_writes(&batch_id);
                    items.push(ShardMsg::Atomic(AtomicMsg::Commit {
                        batch_id,
                        participants,
                        reply_to,
                    }));
                    // A commit ends its drain: the part's undo log is
                    // everything after its mark.
                    ends_drain = true;
                }
                ShardMsg::Atomic(AtomicMsg::Abort { batch_id, reply_to }) => {
                    writes += 1;
                    items.push(ShardMsg::Atomic(AtomicMsg::Abort { batch_id, reply_to }));
                }
            }
            if !ends_drain && commands < cfg.max_drain_commands {
                next = rx.try_recv().ok();
            }
        }
        if items.is_empty() {
            continue;
        }
        snaps.records_since += writes;
        let base = if writes > 0 {
            seq.reserve(cfg.id, writes)
        } else {
            seq.peek()
        };
        let mut offsets = Offsets::new(base, base + writes);
        engine.collect_events = cfg.events.watching.load(Ordering::SeqCst);
        let now = now_ms();

        let mut answers: Vec<Answer> = Vec::with_capacity(items.len());
        let mut stats_wanted = false;
        let mut part: Option<PartCommit> = None;
        let mut aborts: Vec<(String, flume::Sender<usize>)> = Vec::new();
        for item in items {
            match item {
                ShardMsg::Batch(b) => {
                    if b.commands.iter().any(|(_, c)| atomic.conflicts(c)) {
                        deferred.push_back(ShardMsg::Batch(b));
                        continue;
                    }
                    let mut replies = Vec::with_capacity(b.commands.len());
                    let mut answer_bytes = 0usize;
                    for (slot, cmd) in b.commands {
                        if answer_bytes >= BATCH_ANSWER_BYTES {
                            // Bounds what a connection's answers hold in
                            // memory; the rest comes back later, in order.
                            replies.push((slot, Reply::Deferred(cmd)));
                            continue;
                        }
                        let reply = if matches!(cmd, Command::WalStats) {
                            stats_wanted = true;
                            Reply::WalStats(ShardWalStats::default())
                        } else {
                            engine.execute(cmd, &mut offsets, now)
                        };
                        answer_bytes += reply.approx_bytes();
                        replies.push((slot, reply));
                    }
                    answers.push((b.reply_to, replies));
                }
                ShardMsg::Atomic(AtomicMsg::Prepare {
                    batch_id,
                    commands,
                    reply_to,
                }) => {
                    // No waiting between atomic batches (two could wait for
                    // each other across shards), and none ahead of commands
                    // already waiting (they would starve): fail this one.
                    let blocked = commands
                        .iter()
                        .find(|(_, c)| atomic.conflicts(c))
                        .map(|(slot, _)| *slot);
                    if let Some(slot) = blocked.or_else(|| {
                        (!deferred.is_empty()).then(|| commands.first().map_or(0, |c| c.0))
                    }) {
                        let error = ApiError::bad_request(
                            "an instance it touches is held by another atomic batch in progress; retry",
                        );
                        let _ = reply_to.try_send((cfg.id, Vote::No { slot, error }));
                        continue;
                    }
                    let vote = atomic.prepare(&mut engine, batch_id, commands, now);
                    let _ = reply_to.try_send((cfg.id, vote));
                }
                ShardMsg::Atomic(AtomicMsg::Commit {
                    batch_id,
                    participants,
                    reply_to,
                }) => {
                    match atomic.execute(&mut engine, &batch_id, &participants, &mut offsets, now) {
                        Ok((replies, mark, first)) => {
                            part = Some(PartCommit {
                                batch_id,
                                replies,
                                mark,
                                first,
                                reply_to,
                            });
                        }
                        Err(e) => {
                            let _ = reply_to.try_send((cfg.id, Err(e)));
                        }
                    }
                }
                ShardMsg::Atomic(AtomicMsg::Abort { batch_id, reply_to }) => {
                    match atomic.abort(&mut engine, &batch_id) {
                        Some(entry) => {
                            if let Err(e) = engine.stage_abort(&mut offsets, entry) {
                                tracing::error!(shard = cfg.id, error = %e, "cannot stage batch abort");
                            }
                            aborts.push((batch_id, reply_to));
                        }
                        None => {
                            ready.extend(deferred.drain(..));
                            let _ = reply_to.try_send(cfg.id);
                        }
                    }
                }
                other => unreachable!("only drain items are queued: {}", other.kind()),
            }
        }

        let staged = engine.take_staged();
        let mut result = Ok(());
        if !staged.is_empty() {
            commit_records.record(staged.len() as f64);
            for s in &staged {
                if let Err(e) = writer.stage(s.offset, s.kind, &s.bytes) {
                    result = Err(e);
                    break;
                }
            }
            if result.is_ok() {
                let sync = match cfg.fsync {
                    FsyncPolicy::EveryWrite => true,
                    FsyncPolicy::EveryN(n) => {
                        unsynced_records += staged.len() as u64;
                        unsynced_records >= n
                    }
                    // Under steady load the loop never idles long enough for
                    // the timer in `next_message`: sync here once the oldest
                    // unsynced write is due.
                    FsyncPolicy::EveryMs(ms) => {
                        dirty_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(ms))
                    }
                    FsyncPolicy::Never => false,
                };
                result = writer.commit(sync).await;
                if result.is_ok() {
                    if sync {
                        unsynced_records = 0;
                        dirty_since = None;
                    } else if dirty_since.is_none() {
                        dirty_since = Some(Instant::now());
                    }
                }
            } else {
                writer.discard_staged();
            }
        }
        let failure = result.as_ref().err().map(ApiError::wal);
        match &result {
            Ok(()) => {
                if let Some(p) = &part {
                    atomic.written(&mut engine, p.batch_id.clone(), p.mark, p.first);
                    // Hold readers below the part until it is released.
                    seq.hold(cfg.id, atomic.hold_floor());
                }
                engine.commit_done();
            }
            Err(e) => {
                tracing::error!(shard = cfg.id, error = %e, "group commit failed; rolling back the drain");
                engine.rollback();
                if let Some(p) = &part {
                    atomic.failed(&p.batch_id);
                }
            }
        }
        if let Some(p) = part {
            let answer = match &failure {
                None => Ok(p.replies),
                Some(e) => Err(e.clone()),
            };
            let _ = p.reply_to.try_send((cfg.id, answer));
        }
        for (batch_id, reply_to) in aborts {
            let _ = atomic.release(&batch_id);
            seq.hold(cfg.id, atomic.hold_floor());
            let _ = reply_to.try_send(cfg.id);
            ready.extend(deferred.drain(..));
        }
        if writes > 0 {
            let events = engine.take_events();
            let announce = engine.collect_events;
            if !events.is_empty() {
                cfg.events.send(HubMsg::Events(events));
            }
            // Everything reserved is written (or will never be): readers may
            // pass these offsets now.
            seq.release(cfg.id);
            if announce {
                cfg.events.send(HubMsg::Released);
            }
        }
        let stats = stats_wanted.then(|| ShardWalStats {
            entries: writer.records(),
            segments: writer.segments().len() as u64,
            used_bytes: writer.used_bytes(),
            io: writer.io_stats(),
        });
        for (to, mut replies) in answers {
            for (_, r) in replies.iter_mut() {
                if matches!(r, Reply::Deferred(_)) {
                    // Never executed: not touched by the drain's outcome.
                } else if let Some(err) = &failure {
                    // Every answer of a failed drain, errors included, was
                    // computed against state that has been rolled back.
                    *r = Reply::Error(err.clone());
                } else if let Reply::WalStats(s) = r {
                    *s = stats.expect("stats computed when requested");
                }
            }
            // A vanished connection is not the shard's problem.
            let _ = to
                .send_async(BatchReply {
                    shard: cfg.id,
                    replies,
                })
                .await;
        }
        // Under load the loop never idles: a running snapshot advances a
        // slice per drain, which bounds the pause it adds to any request.
        if snaps.job.is_some() {
            snaps.step(&cfg, &mut engine, BUSY_SNAPSHOT_STEP);
        }
    }
    if let Some((mut job, reply_to)) = snaps.job.take() {
        job.abandon(&mut engine);
        let _ = reply_to.try_send((
            cfg.id,
            SnapshotOutcome::Failed("the server is stopping".into()),
        ));
    }
    if !atomic.pending().is_empty() {
        tracing::warn!(shard = cfg.id, batches = ?atomic.pending(), "stopping with unresolved atomic batches; recovery decides them");
    }
    writer.close().await?;
    tracing::info!(shard = cfg.id, "shard stopped; WAL synced");
    Ok(())
}

/// Histogram of records written per group commit (metrics endpoint).
pub const GROUP_COMMIT_RECORDS: &str = "rstmdb_group_commit_records";
/// Histogram of seconds from a snapshot's start to its file being durable.
pub const SNAPSHOT_SECONDS: &str = "rstmdb_snapshot_duration_seconds";

/// Serialization time a snapshot gets per turn of a busy shard loop.
const BUSY_SNAPSHOT_STEP: Duration = Duration::from_micros(500);
/// ... and per turn while the shard has nothing else to do.
const IDLE_SNAPSHOT_STEP: Duration = Duration::from_millis(1);

/// The shard's snapshot bookkeeping.
struct Snapshots {
    /// Start of the newest snapshot recorded in the manifest.
    latest: Option<u64>,
    /// Records written since the running or latest snapshot started.
    records_since: u64,
    /// The snapshot being written and who wants its outcome.
    job: Option<(SnapshotJob, flume::Sender<(usize, SnapshotOutcome)>)>,
    /// When the running (or last) snapshot began.
    job_started: Instant,
}

impl Snapshots {
    async fn begin(
        &mut self,
        cfg: &ShardConfig,
        engine: &mut Engine,
        writer: &mut WalWriter,
        seq: &Sequencer,
        atomic: &AtomicState,
        req: SnapshotRequest,
    ) {
        let fail = |why: String| {
            let _ = req
                .reply_to
                .try_send((cfg.id, SnapshotOutcome::Failed(why)));
        };
        if self.job.is_some() {
            return fail("a snapshot of this shard is already running".into());
        }
        engine.prune_committed(req.prune_committed_upto);
        if atomic.hold_floor().is_some() {
            // The coordinator never asks while a batch is between commit
            // and release; refuse rather than snapshot a part that might
            // still be undone.
            return fail("an atomic batch is in progress on this shard".into());
        }
        let changed = self.latest.is_none_or(|s| writer.last_offset() >= s);
        let wanted = match req.when {
            SnapshotWhen::IfNone => self.latest.is_none(),
            SnapshotWhen::IfChanged => changed,
            SnapshotWhen::Always => true,
            SnapshotWhen::IfOver { records, wal_bytes } => {
                changed
                    && ((records > 0 && self.records_since >= records)
                        || (wal_bytes > 0 && writer.used_bytes() >= wal_bytes))
            }
        };
        if !wanted {
            let _ = req
                .reply_to
                .try_send((cfg.id, SnapshotOutcome::Skipped(self.latest)));
            return;
        }
        // Everything the snapshot will contain is durable in the WAL
        // before the snapshot can be, so the two never disagree. With
        // `never` the operator chose to risk the unsynced tail: flushing a
        // large dirty log here would stall the shard for no promise made.
        // (Recovery copes either way: offsets continue above the snapshot.)
        if cfg.fsync != FsyncPolicy::Never {
            if let Err(e) = writer.sync().await {
                return fail(format!("syncing the WAL before the snapshot: {e}"));
            }
        }
        // Every record of this shard so far is below the global next
        // offset, and every later one at or above it.
        let start = seq.peek();
        let job = SnapshotJob::begin(
            engine,
            cfg.snapshot_dir.clone(),
            cfg.id as u32,
            start,
            now_ms(),
            writer.records(),
        );
        tracing::debug!(shard = cfg.id, start, "snapshot started");
        self.records_since = 0;
        self.job = Some((job, req.reply_to));
        self.job_started = Instant::now();
    }

    /// Advances the running snapshot by about `budget`.
    fn step(&mut self, cfg: &ShardConfig, engine: &mut Engine, budget: Duration) -> Step {
        let Some((job, _)) = self.job.as_mut() else {
            return Step::More;
        };
        let step = job.step(engine, budget);
        match &step {
            Step::More | Step::Blocked => {}
            Step::Finished(done) => {
                let (job, reply_to) = self.job.take().expect("running");
                let (done, shard, start) = (done.clone(), cfg.id, job.start());
                let started = self.job_started;
                glommio::spawn_local(async move {
                    let outcome = match done.recv_async().await {
                        Ok(Ok(file)) => {
                            metrics::histogram!(SNAPSHOT_SECONDS)
                                .record(started.elapsed().as_secs_f64());
                            SnapshotOutcome::Written(file)
                        }
                        Ok(Err(e)) => SnapshotOutcome::Failed(e),
                        Err(_) => SnapshotOutcome::Failed("snapshot writer vanished".into()),
                    };
                    tracing::debug!(shard, start, ?outcome, "snapshot finished");
                    let _ = reply_to.send_async((shard, outcome)).await;
                })
                .detach();
            }
            Step::Abandoned(why) => {
                let (_, reply_to) = self.job.take().expect("running");
                let _ = reply_to.try_send((
                    cfg.id,
                    SnapshotOutcome::Failed(format!("snapshot abandoned: {why}")),
                ));
            }
        }
        step
    }

    fn compact(&mut self, cfg: &ShardConfig, writer: &mut WalWriter, req: CompactRequest) {
        if let Some(s) = req.snapshot_start {
            self.latest = Some(self.latest.map_or(s, |l| l.max(s)));
        }
        // Never past the newest snapshot recovery can start from.
        let floor = req.floor.min(self.latest.unwrap_or(0));
        let paths = writer.detach_segments_below(floor, |p| match req.retain_since {
            None => true,
            Some(t) => std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m < t),
        });
        let seg_size = writer.segment_size();
        let wal_segments = writer.segments().len() as u64;
        let retained_from = writer
            .retained_from()
            .map_or(req.floor, |r| r.min(req.floor));
        let (wal_dir, snap_dir, shard) = (cfg.wal.dir.clone(), cfg.snapshot_dir.clone(), cfg.id);
        let keep = req.keep_snapshots.max(1);
        let latest = self.latest;
        glommio::spawn_local(async move {
            let outcome = glommio::executor()
                .spawn_blocking(move || {
                    let mut out = CompactOutcome {
                        wal_segments,
                        retained_from,
                        ..CompactOutcome::default()
                    };
                    // Out of the log at once (renamed, directory synced);
                    // the space is freed gently in the background.
                    let (retired, err) = rstmdb_wal::segment::retire(&wal_dir, &paths);
                    out.segments_deleted = retired.len() as u64;
                    out.bytes_reclaimed = retired.len() as u64 * seg_size;
                    if let Some(e) = err {
                        out.error = Some(e.to_string());
                    }
                    if !retired.is_empty() {
                        free_in_background(shard, retired);
                    }
                    match crate::snapshot::list(&snap_dir) {
                        Ok(list) => {
                            let mut kept = 0u64;
                            for (i, (start, path)) in list.iter().enumerate() {
                                // Keep the newest few, the one the manifest
                                // records, and any newer one.
                                if i < keep || latest.is_none_or(|l| *start >= l) {
                                    kept += 1;
                                    out.oldest_snapshot = Some(*start);
                                } else if let Err(e) = std::fs::remove_file(path) {
                                    kept += 1;
                                    out.oldest_snapshot = Some(*start);
                                    out.error
                                        .get_or_insert(format!("deleting {}: {e}", path.display()));
                                }
                            }
                            out.snapshots = kept;
                        }
                        Err(e) => {
                            out.error.get_or_insert(e.to_string());
                        }
                    }
                    out
                })
                .await;
            if let Some(e) = &outcome.error {
                tracing::error!(shard, error = %e, "compaction could not delete everything");
            }
            let _ = req.reply_to.send_async((shard, outcome)).await;
        })
        .detach();
    }
}

/// Frees retired segment files on a low-priority thread, a slice at a
/// time (see [`rstmdb_wal::segment::remove_gradually`]). Files left by a
/// crash are removed at the next start-up.
fn free_in_background(shard: usize, files: Vec<std::path::PathBuf>) {
    let spawned = std::thread::Builder::new()
        .name(format!("wal-free-{shard}"))
        .spawn(move || {
            crate::snapshot::lower_priority();
            for f in files {
                let step = 4 * 1024 * 1024;
                let r = rstmdb_wal::segment::remove_gradually(&f, step, Duration::from_millis(2));
                if let Err(e) = r {
                    tracing::warn!(shard, file = %f.display(), error = %e, "freeing a retired WAL segment failed");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(shard, error = %e, "cannot start the thread freeing retired WAL segments");
    }
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

/// Waits for the next message, running the `every_ms` timer meanwhile.
/// `None` when every sender is gone.
async fn next_message(
    rx: &flume::Receiver<ShardMsg>,
    cfg: &ShardConfig,
    writer: &mut WalWriter,
    dirty_since: &mut Option<Instant>,
) -> Option<ShardMsg> {
    loop {
        let deadline = match (cfg.fsync, *dirty_since) {
            (FsyncPolicy::EveryMs(ms), Some(since)) => Some(since + Duration::from_millis(ms)),
            _ => None,
        };
        let Some(deadline) = deadline else {
            return rx.recv_async().await.ok();
        };
        enum Woke {
            Msg(Option<ShardMsg>),
            Timer,
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let woke = future::or(async { Woke::Msg(rx.recv_async().await.ok()) }, async {
            glommio::timer::sleep(wait).await;
            Woke::Timer
        })
        .await;
        match woke {
            Woke::Msg(m) => return m,
            Woke::Timer => {
                if let Err(e) = writer.sync().await {
                    tracing::error!(shard = cfg.id, error = %e, "timed fdatasync failed");
                }
                *dirty_since = None;
            }
        }
    }
}

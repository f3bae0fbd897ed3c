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
use rstmdb_wal::{Page, ReadRange, Recovered, SegmentInfo, WalError, WalWriter, WriterConfig};

use crate::commands::WatchEvent;
use crate::commands::{Batch, BatchReply, Command, Reply, ShardWalStats};
use crate::engine::{now_ms, Engine, Offsets};
use crate::error::ApiError;
pub use crate::sequencer::Sequencer;
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
}

/// What a shard tells the subscription hub.
#[derive(Debug)]
pub enum HubMsg {
    /// Committed transitions of one drain, sent *before* the shard releases
    /// its offsets (so they are in the channel before the watermark can
    /// pass them).
    Events(Vec<WatchEvent>),
    /// The shard released its offsets: the watermark may have moved.
    Released,
}

/// The shard's side of the subscription hub's channel.
#[derive(Debug, Clone)]
pub struct EventSink {
    /// Set by the hub once anyone subscribes; until then shards build no
    /// events.
    pub watching: Arc<AtomicBool>,
    /// Unbounded on purpose: a shard must never wait for subscribers. The
    /// hub on the frontend drains it at once into its bounded window.
    pub tx: flume::Sender<HubMsg>,
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
fn spawn_wal_read(
    shard: usize,
    dir: std::path::PathBuf,
    segments: Vec<SegmentInfo>,
    req: WalReadRequest,
) {
    glommio::spawn_local(async move {
        let range = req.range;
        let result = glommio::executor()
            .spawn_blocking(move || rstmdb_wal::read(&dir, &segments, range))
            .await
            .map_err(ApiError::wal);
        let _ = req.reply_to.send_async((shard, result)).await;
    })
    .detach();
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
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), WalError> {
    let opened = WalWriter::open(cfg.wal.clone(), &recovered).await;
    let _ = ready.send(match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("shard {}: opening the WAL failed: {e}", cfg.id)),
    });
    // Dropped now, so that start-up notices an executor that dies before
    // reporting (its sender is then gone too).
    drop(ready);
    let mut writer = opened?;
    drop(recovered);
    let mut unsynced_records: u64 = 0;
    let mut dirty_since: Option<Instant> = None;
    let mut drain: Vec<Batch> = Vec::new();
    loop {
        let first = match next_message(&rx, &cfg, &mut writer, &mut dirty_since).await {
            Some(m) => m,
            None => break,
        };
        let mut commands = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                ShardMsg::Batch(b) => {
                    commands += b.commands.len();
                    drain.push(b);
                }
                ShardMsg::Barrier(done) => {
                    let _ = done.try_send(());
                }
                ShardMsg::WalRead(req) => {
                    spawn_wal_read(cfg.id, cfg.wal.dir.clone(), writer.segments().to_vec(), req)
                }
            }
            if commands < cfg.max_drain_commands {
                next = rx.try_recv().ok();
            }
        }
        if drain.is_empty() {
            continue;
        }
        let writes: u64 = drain
            .iter()
            .flat_map(|b| b.commands.iter())
            .filter(|(_, c)| c.may_write())
            .count() as u64;
        let base = if writes > 0 {
            seq.reserve(cfg.id, writes)
        } else {
            seq.peek()
        };
        let mut offsets = Offsets::new(base, base + writes);
        engine.collect_events = cfg.events.watching.load(Ordering::SeqCst);
        let now = now_ms();

        let mut answers: Vec<Answer> = Vec::with_capacity(drain.len());
        let mut stats_wanted = false;
        for b in drain.drain(..) {
            let mut replies = Vec::with_capacity(b.commands.len());
            for (slot, cmd) in b.commands {
                let reply = if matches!(cmd, Command::WalStats) {
                    stats_wanted = true;
                    Reply::WalStats(ShardWalStats::default())
                } else {
                    engine.execute(cmd, &mut offsets, now)
                };
                replies.push((slot, reply));
            }
            answers.push((b.reply_to, replies));
        }

        let staged = engine.take_staged();
        let mut result = Ok(());
        if !staged.is_empty() {
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
        match &result {
            Ok(()) => engine.commit_done(),
            Err(e) => {
                tracing::error!(shard = cfg.id, error = %e, "group commit failed; rolling back the drain");
                engine.rollback();
            }
        }
        if writes > 0 {
            let events = engine.take_events();
            let announce = engine.collect_events;
            if !events.is_empty() {
                let _ = cfg.events.tx.send(HubMsg::Events(events));
            }
            // Everything reserved is written (or will never be): readers may
            // pass these offsets now.
            seq.release(cfg.id);
            if announce {
                let _ = cfg.events.tx.send(HubMsg::Released);
            }
        }
        let failure = result.err().map(ApiError::wal);
        let stats = stats_wanted.then(|| ShardWalStats {
            entries: writer.records(),
            segments: writer.segments().len() as u64,
            used_bytes: writer.used_bytes(),
            io: writer.io_stats(),
        });
        for (to, mut replies) in answers {
            for (_, r) in replies.iter_mut() {
                if let Some(err) = &failure {
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
    }
    writer.close().await?;
    tracing::info!(shard = cfg.id, "shard stopped; WAL synced");
    Ok(())
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

//! The shard's snapshots (written a slice at a time by the loop) and
//! compaction (segments and old snapshot files deleted off the loop).

use std::time::{Duration, Instant};

use rstmdb_wal::WalWriter;

use super::{
    CompactOutcome, CompactRequest, FsyncPolicy, ShardConfig, SnapshotOutcome, SnapshotRequest,
    SnapshotWhen, SNAPSHOT_SECONDS,
};
use crate::atomic::AtomicState;
use crate::engine::{now_ms, Engine};
use crate::sequencer::Sequencer;
use crate::snapshot::{SnapshotJob, Step};

/// Serialization time a snapshot gets per turn of a busy shard loop.
pub(super) const BUSY_SNAPSHOT_STEP: Duration = Duration::from_micros(500);
/// ... and per turn while the shard has nothing else to do.
pub(super) const IDLE_SNAPSHOT_STEP: Duration = Duration::from_millis(1);

/// The shard's snapshot bookkeeping.
pub(super) struct Snapshots {
    /// Start of the newest snapshot recorded in the manifest.
    pub(super) latest: Option<u64>,
    /// Records written since the running or latest snapshot started.
    pub(super) records_since: u64,
    /// The snapshot being written and who wants its outcome.
    pub(super) job: Option<(SnapshotJob, flume::Sender<(usize, SnapshotOutcome)>)>,
    /// When the running (or last) snapshot began.
    pub(super) job_started: Instant,
}

impl Snapshots {
    /// Starts a snapshot if `req`'s condition holds (the outcome goes to
    /// the requester once the file is durable, or at once if none starts).
    pub(super) async fn begin(
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
    pub(super) fn step(
        &mut self,
        cfg: &ShardConfig,
        engine: &mut Engine,
        budget: Duration,
    ) -> Step {
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

    /// Records the newest durable snapshot, detaches the WAL segments
    /// below the floor, and deletes them and old snapshot files off the
    /// loop.
    pub(super) fn compact(
        &mut self,
        cfg: &ShardConfig,
        writer: &mut WalWriter,
        req: CompactRequest,
    ) {
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
                    prune_snapshots(&snap_dir, keep, latest, &mut out);
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

/// Deletes old snapshot files of `snap_dir`, keeping the newest `keep`,
/// the one the manifest records (`latest`), and any newer one; counts what
/// is left into `out`.
fn prune_snapshots(
    snap_dir: &std::path::Path,
    keep: usize,
    latest: Option<u64>,
    out: &mut CompactOutcome,
) {
    match crate::snapshot::list(snap_dir) {
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

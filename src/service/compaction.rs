//! Snapshot rounds and WAL compaction, coordinated by the frontend
//! (COMPACT, automatic compaction, SNAPSHOT_INSTANCE).
//!
//! A round:
//! 1. takes the commit gate exclusively and asks every shard to snapshot
//!    (if the round's condition holds for it), then lets the gate go. Atomic
//!    batches hold the gate shared from their commit until their release or
//!    abort has been sent, so every batch is either wholly before every
//!    participant's snapshot or wholly after it: recovery never sees half a
//!    batch's parts hidden in a snapshot;
//! 2. waits until each new snapshot file is durable;
//! 3. computes each shard's WAL floor: its newest snapshot's start, lowered
//!    to the cursor of the slowest subscription (which may still need to
//!    read the WAL), and publishes the highest floor to the hub so that no
//!    new subscription starts below what may disappear;
//! 4. writes the manifest (snapshots and floors) atomically;
//! 5. tells every shard to delete the segments wholly below its floor
//!    (keeping those inside the retention time) and prune old snapshots.
//!
//! A crash anywhere in between leaves a consistent directory: snapshot
//! files are complete or absent, the manifest never claims more WAL than
//! the disk holds, and segments go oldest first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_lock::RwLock;
use rstmdb_shards::commands::Command;
use rstmdb_shards::error::{ApiError, ErrorCode};
use rstmdb_shards::shard::{
    CompactOutcome, CompactRequest, ShardMsg, ShardStats, SnapshotOutcome, SnapshotRequest,
    SnapshotWhen,
};
use serde::Serialize;
use serde_json::Value;

use crate::service::router::{Outcome, Router};
use crate::service::subscriptions::Shared;
use crate::storage::datadir::Manifest;

/// How often automatic compaction looks at the shards' figures.
pub const AUTO_CHECK_EVERY: Duration = Duration::from_millis(200);

/// Compaction settings (config `compaction.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Automatic compaction on.
    pub auto: bool,
    /// Records since a shard's last snapshot that trigger one (0 = off).
    pub events_threshold: u64,
    /// WAL bytes of a shard that trigger a snapshot (0 = off).
    pub size_threshold_bytes: u64,
    /// Least time between automatic rounds.
    pub min_interval: Duration,
    /// Segments written within this time are kept.
    pub retention: Duration,
    /// Snapshot files kept per shard.
    pub keep_snapshots: usize,
}

/// COMPACT's result (PROTOCOL.md §7.19, with real figures).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Shard snapshots written by this round.
    pub snapshots_created: u64,
    /// WAL segment files deleted.
    pub segments_deleted: u64,
    /// Their size on disk.
    pub bytes_reclaimed: u64,
    /// Snapshot files kept, all shards.
    pub total_snapshots: u64,
    /// WAL segments left, all shards.
    pub wal_segments: u64,
}

/// The compaction coordinator, shared by every frontend (`Send + Sync`:
/// its locks are executor-agnostic, its state behind mutexes never held
/// across an await).
pub struct Compactor {
    router: Router,
    shared: Arc<Shared>,
    settings: Settings,
    /// The data directory (instance exports go below it).
    data_root: PathBuf,
    /// Where the manifest lives (the data directory's current layout).
    manifest_dir: PathBuf,
    /// Shared by atomic batches between commit and release/abort;
    /// exclusive while a round asks the shards to snapshot.
    gate: RwLock<()>,
    /// One round at a time.
    rounds: async_lock::Mutex<()>,
    manifest: Mutex<Manifest>,
    last_round: Mutex<Option<Instant>>,
    /// Per shard: start of its oldest snapshot file (after the last round's
    /// pruning). The minimum bounds what shards must remember about
    /// committed atomic batches.
    oldest_snapshots: Mutex<Vec<Option<u64>>>,
    /// Per shard: whether it skipped the last round (it takes a snapshot
    /// in the next one whatever its log did, so that its oldest snapshot
    /// keeps moving).
    skipped_last: Mutex<Vec<bool>>,
}

fn internal(detail: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InternalError, detail.to_string())
}

impl Compactor {
    /// A coordinator over `router`'s shards; `manifest` as recovery read it.
    pub fn new(
        router: Router,
        shared: Arc<Shared>,
        settings: Settings,
        data_root: PathBuf,
        manifest_dir: PathBuf,
        manifest: Manifest,
    ) -> Self {
        let floor = manifest
            .shards
            .iter()
            .map(|s| s.wal_floor)
            .max()
            .unwrap_or(0)
            .max(manifest.history_floor);
        shared.set_wal_floor(floor);
        Compactor {
            router,
            shared,
            settings,
            data_root,
            manifest_dir,
            gate: RwLock::new(()),
            rounds: async_lock::Mutex::new(()),
            oldest_snapshots: Mutex::new(vec![None; manifest.shards.len()]),
            skipped_last: Mutex::new(vec![false; manifest.shards.len()]),
            manifest: Mutex::new(manifest),
            last_round: Mutex::new(None),
        }
    }

    /// Held shared by an atomic batch from its commit until its release
    /// or abort is sent.
    pub async fn commit_gate(&self) -> async_lock::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// COMPACT: `force_snapshot` snapshots every shard that changed since
    /// its last snapshot; without it, only shards that have none.
    pub async fn compact(&self, force: bool) -> Result<Report, ApiError> {
        let when = if force {
            SnapshotWhen::IfChanged
        } else {
            SnapshotWhen::IfNone
        };
        self.round(when).await
    }

    /// One round (see the module doc): snapshots, floors, manifest, then
    /// deletion, one round at a time.
    async fn round(&self, when: SnapshotWhen) -> Result<Report, ApiError> {
        let _one = self.rounds.lock().await;
        let began = Instant::now();
        *self.last_round.lock().expect("not poisoned") = Some(began);
        let shards = self.router.shards();
        let n = shards.len();
        let mut report = Report::default();
        let mut failure: Option<String> = None;

        let snapshots = self.request_snapshots(shards, when).await?;
        let written = self
            .collect_snapshots(&snapshots, n, &mut report, &mut failure)
            .await?;
        let manifest = self.raise_floors();
        self.write_manifest(&manifest).await?;
        let compactions = self.request_compaction(shards, &written, &manifest).await?;
        let retained = self
            .collect_compaction(&compactions, n, &manifest, &mut report, &mut failure)
            .await?;
        self.lower_floors(&manifest, retained).await;

        log_round(&report, began);
        match failure {
            None => Ok(report),
            Some(e) => Err(internal(format!("compaction incomplete: {e}"))),
        }
    }

    /// Step 1: asks every shard to snapshot, holding the gate exclusively
    /// only while the requests are sent (so no atomic batch straddles a
    /// snapshot); returns where the outcomes arrive.
    async fn request_snapshots(
        &self,
        shards: &[flume::Sender<ShardMsg>],
        when: SnapshotWhen,
    ) -> Result<flume::Receiver<(usize, SnapshotOutcome)>, ApiError> {
        let (tx, rx) = flume::bounded::<(usize, SnapshotOutcome)>(shards.len());
        let prune_upto = self
            .oldest_snapshots
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|o| o.unwrap_or(0))
            .min()
            .unwrap_or(0);
        {
            let _closed = self.gate.write().await;
            for (i, s) in shards.iter().enumerate() {
                // Automatic rounds only: COMPACT keeps the meaning its
                // caller asked for.
                let when = match when {
                    SnapshotWhen::IfOver { .. }
                        if self.skipped_last.lock().expect("not poisoned")[i] =>
                    {
                        SnapshotWhen::Always
                    }
                    other => other,
                };
                let msg = ShardMsg::Snapshot(SnapshotRequest {
                    when,
                    prune_committed_upto: prune_upto,
                    reply_to: tx.clone(),
                });
                s.send_async(msg)
                    .await
                    .map_err(|_| internal("shard unavailable (server shutting down)"))?;
            }
        }
        drop(tx);
        Ok(rx)
    }

    /// Step 2: gathers the `n` snapshot outcomes, records written ones in
    /// the manifest (in memory) and notes who skipped; returns each shard's
    /// new snapshot start, if any.
    async fn collect_snapshots(
        &self,
        rx: &flume::Receiver<(usize, SnapshotOutcome)>,
        n: usize,
        report: &mut Report,
        failure: &mut Option<String>,
    ) -> Result<Vec<Option<u64>>, ApiError> {
        let mut written: Vec<Option<u64>> = vec![None; n];
        for _ in 0..n {
            let (shard, outcome) = rx
                .recv_async()
                .await
                .map_err(|_| internal("shard unavailable (server shutting down)"))?;
            self.skipped_last.lock().expect("not poisoned")[shard] =
                matches!(outcome, SnapshotOutcome::Skipped(_));
            match outcome {
                SnapshotOutcome::Written(f) => {
                    report.snapshots_created += 1;
                    written[shard] = Some(f.start_offset);
                    let mut m = self.manifest.lock().expect("not poisoned");
                    let e = &mut m.shards[shard];
                    e.snapshot = f.path.file_name().map(|s| s.to_string_lossy().into_owned());
                    e.start_offset = f.start_offset;
                    e.size_bytes = f.size;
                    e.checksum = Some(f.checksum);
                }
                SnapshotOutcome::Skipped(_) => {}
                SnapshotOutcome::Failed(e) => {
                    tracing::error!(shard, error = %e, "snapshot failed");
                    failure.get_or_insert(format!("shard {shard}: {e}"));
                }
            }
        }
        Ok(written)
    }

    /// Step 3: raises each snapshotted shard's WAL floor to its snapshot's
    /// start, never above what the slowest subscription still needs, and
    /// publishes the highest; returns the manifest to write.
    fn raise_floors(&self) -> Manifest {
        let slowest = self.shared.min_cursor();
        let mut m = self.manifest.lock().expect("not poisoned");
        for e in m.shards.iter_mut() {
            if e.snapshot.is_some() {
                let floor = slowest.map_or(e.start_offset, |c| c.min(e.start_offset));
                e.wal_floor = e.wal_floor.max(floor);
            }
        }
        let highest = m.shards.iter().map(|e| e.wal_floor).max().unwrap_or(0);
        self.shared
            .set_wal_floor(self.shared.wal_floor().max(highest));
        m.clone()
    }

    /// Step 4: writes the manifest durably, before anything is deleted.
    async fn write_manifest(&self, manifest: &Manifest) -> Result<(), ApiError> {
        let root = self.manifest_dir.clone();
        let to_write = manifest.clone();
        glommio::executor()
            .spawn_blocking(move || to_write.write(&root))
            .await
            .map_err(|e| ApiError::wal(format!("writing the manifest: {e}")))
    }

    /// Step 5a: asks every shard to delete its segments below its floor
    /// (keeping those inside the retention time) and prune old snapshots;
    /// returns where the outcomes arrive.
    async fn request_compaction(
        &self,
        shards: &[flume::Sender<ShardMsg>],
        written: &[Option<u64>],
        manifest: &Manifest,
    ) -> Result<flume::Receiver<(usize, CompactOutcome)>, ApiError> {
        let retain_since = (!self.settings.retention.is_zero())
            .then(|| SystemTime::now() - self.settings.retention);
        let (ctx, crx) = flume::bounded::<(usize, CompactOutcome)>(shards.len());
        for (i, s) in shards.iter().enumerate() {
            let msg = ShardMsg::Compact(CompactRequest {
                snapshot_start: written[i],
                floor: manifest.shards[i].wal_floor,
                retain_since,
                keep_snapshots: self.settings.keep_snapshots,
                reply_to: ctx.clone(),
            });
            s.send_async(msg)
                .await
                .map_err(|_| internal("shard unavailable (server shutting down)"))?;
        }
        drop(ctx);
        Ok(crx)
    }

    /// Step 5b: gathers the `n` compaction outcomes into the report and the
    /// oldest snapshots; returns the manifest with each floor lowered to
    /// the WAL the shard actually kept (never below the history floor).
    async fn collect_compaction(
        &self,
        crx: &flume::Receiver<(usize, CompactOutcome)>,
        n: usize,
        manifest: &Manifest,
        report: &mut Report,
        failure: &mut Option<String>,
    ) -> Result<Manifest, ApiError> {
        let mut retained = manifest.clone();
        for _ in 0..n {
            let (shard, o) = crx
                .recv_async()
                .await
                .map_err(|_| internal("shard unavailable (server shutting down)"))?;
            report.segments_deleted += o.segments_deleted;
            report.bytes_reclaimed += o.bytes_reclaimed;
            report.total_snapshots += o.snapshots;
            report.wal_segments += o.wal_segments;
            self.oldest_snapshots.lock().expect("not poisoned")[shard] = o.oldest_snapshot;
            let history = retained.history_floor;
            let e = &mut retained.shards[shard];
            e.wal_floor = e.wal_floor.min(o.retained_from).max(history);
            if let Some(e) = o.error {
                failure.get_or_insert(format!("shard {shard}: {e}"));
            }
        }
        Ok(retained)
    }

    /// Step 6: where retention (or segment granularity) kept more WAL than
    /// the floor allowed to drop, says so: recovery may then fall back to an
    /// older snapshot, and subscribers may start lower. A failed write only
    /// warns (the manifest on disk still claims no more than the disk has).
    async fn lower_floors(&self, manifest: &Manifest, retained: Manifest) {
        if retained == *manifest {
            return;
        }
        let root = self.manifest_dir.clone();
        let to_write = retained.clone();
        match glommio::executor()
            .spawn_blocking(move || to_write.write(&root))
            .await
        {
            Ok(()) => {
                let highest = retained
                    .shards
                    .iter()
                    .map(|e| e.wal_floor)
                    .max()
                    .unwrap_or(0)
                    .max(retained.history_floor);
                self.shared.set_wal_floor(highest);
                *self.manifest.lock().expect("not poisoned") = retained;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not lower the WAL floors in the manifest")
            }
        }
    }

    /// Runs automatic compaction until `stop` closes, checking the
    /// thresholds at every tick of `ticks` (every [`AUTO_CHECK_EVERY`]).
    pub async fn run_auto(self: Arc<Self>, stop: flume::Receiver<()>, ticks: flume::Receiver<()>) {
        let s = &self.settings;
        if !s.auto || (s.events_threshold == 0 && s.size_threshold_bytes == 0) {
            let _ = stop.recv_async().await;
            return;
        }
        loop {
            let stopped = futures_lite::future::or(
                async {
                    let _ = stop.recv_async().await;
                    true
                },
                async {
                    // Ticks ending means shutdown too.
                    ticks.recv_async().await.is_err()
                },
            )
            .await;
            if stopped {
                return;
            }
            let last = *self.last_round.lock().expect("not poisoned");
            if last.is_some_and(|t| t.elapsed() < s.min_interval) {
                continue;
            }
            match self.stats().await {
                Some(stats) if stats.iter().any(|st| self.over(st)) => {}
                _ => continue,
            }
            let when = SnapshotWhen::IfOver {
                records: s.events_threshold,
                wal_bytes: s.size_threshold_bytes,
            };
            if let Err(e) = self.round(when).await {
                tracing::error!(error = %e.message, "automatic compaction failed");
            }
        }
    }

    fn over(&self, st: &ShardStats) -> bool {
        let s = &self.settings;
        (s.events_threshold > 0 && st.records_since_snapshot >= s.events_threshold)
            || (s.size_threshold_bytes > 0 && st.wal_bytes >= s.size_threshold_bytes)
    }

    async fn stats(&self) -> Option<Vec<ShardStats>> {
        let shards = self.router.shards();
        let (tx, rx) = flume::bounded(shards.len());
        for s in shards {
            s.send_async(ShardMsg::Stats(tx.clone())).await.ok()?;
        }
        drop(tx);
        let mut out = Vec::with_capacity(shards.len());
        for _ in 0..shards.len() {
            out.push(rx.recv_async().await.ok()?.1);
        }
        Some(out)
    }

    /// SNAPSHOT_INSTANCE: writes the instance as it is now to
    /// `<data_dir>/instance-snapshots/<snapshot_id>.snap` (pretty JSON, the
    /// reference's fields) and answers with its id, offset, size and CRC32C.
    /// An export for audits, backups or moving one instance elsewhere;
    /// recovery does not use these files.
    pub async fn snapshot_instance(
        &self,
        shard: usize,
        instance_id: String,
        replies: &crate::service::router::Replies,
    ) -> Result<Vec<u8>, ApiError> {
        let get = crate::service::ops::Action::Shard(
            shard,
            Command::GetInstance {
                instance_id: instance_id.clone(),
            },
        );
        let bytes = match self.router.run(vec![get], replies).await.pop() {
            Some(Outcome::Done(r)) => r?,
            _ => return Err(internal("shard unavailable")),
        };
        let inst: Value = serde_json::from_slice(&bytes).map_err(internal)?;
        let snapshot_id = format!("snap-{}", uuid::Uuid::new_v4());
        let wal_offset = inst["last_wal_offset"].as_u64().unwrap_or(0);
        let mut doc = serde_json::Map::new();
        doc.insert("snapshot_id".into(), Value::from(snapshot_id.clone()));
        doc.insert("instance_id".into(), Value::from(instance_id.clone()));
        for k in ["machine", "version", "state", "ctx", "last_event_id"] {
            if let Some(v) = inst.get(k) {
                doc.insert(k.into(), v.clone());
            }
        }
        doc.insert("wal_offset".into(), Value::from(wal_offset));
        doc.insert(
            "created_at".into(),
            Value::from(rstmdb_shards::engine::now_ms()),
        );
        let text = serde_json::to_vec_pretty(&Value::Object(doc)).expect("serializable");
        let checksum = format!("{:08x}", crc32c::crc32c(&text));
        let size = text.len() as u64;
        let dir = self.data_root.join("instance-snapshots");
        let name = format!("{snapshot_id}.snap");
        glommio::executor()
            .spawn_blocking(move || write_file(&dir, &name, &text))
            .await
            .map_err(|e| internal(format!("writing the instance snapshot: {e}")))?;
        #[derive(Serialize)]
        struct R<'a> {
            checksum: &'a str,
            instance_id: &'a str,
            size_bytes: u64,
            snapshot_id: &'a str,
            wal_offset: u64,
        }
        Ok(serde_json::to_vec(&R {
            checksum: &checksum,
            instance_id: &instance_id,
            size_bytes: size,
            snapshot_id: &snapshot_id,
            wal_offset,
        })
        .expect("serializable"))
    }
}

/// Writes `dir/name` durably (temp file, fsync, rename, fsync dir).
fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Logs a round's figures when it did anything.
fn log_round(report: &Report, began: Instant) {
    if report.snapshots_created > 0 || report.segments_deleted > 0 {
        tracing::info!(
            snapshots = report.snapshots_created,
            segments_deleted = report.segments_deleted,
            bytes_reclaimed = report.bytes_reclaimed,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "compaction round done"
        );
    }
}

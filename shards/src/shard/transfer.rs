//! Snapshot transfer in cluster mode: how a follower that is behind the
//! leader's compacted log catches up.
//!
//! **Leader.** When raft asks for a snapshot that is not prepared, the
//! shard notes where its engine stands in the group's log (applied index,
//! term, offset) and writes a snapshot of the engine as of then — the
//! server's own point-in-time snapshot job, a slice per turn of the loop,
//! so drains go on meanwhile — into `raft/outgoing/`. Once the file is
//! durable its bytes are offered to raft with that point; raft sends them
//! in one message. A point the log was compacted past meanwhile is never
//! sent (raft asks again, and a newer one is built).
//!
//! **Follower.** A received snapshot replaces the node's state before the
//! group's log records it (the log's write follows in the same cycle):
//! 1. the file is stored in the shard's snapshot directory, durably, and
//!    loaded from there (which verifies it);
//! 2. the subscription hubs are told that history below its offset is gone
//!    here, and WAL reads below it are refused from now on;
//! 3. the WAL restarts at its offset: a fresh segment, every older one
//!    retired, and older snapshots deleted — what they held is not a
//!    prefix of the history any more, and recovery must never replay it;
//! 4. the engine is replaced.
//!
//! A crash anywhere in between leaves a node that recovers from the new
//! snapshot (the newest) or, before step 1 finished, from its old state,
//! and asks for the snapshot again.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{HubMsg, ShardLoop, SnapshotOutcome};
use crate::engine::now_ms;
use crate::replication::state::{Install, SnapshotPoint};
use crate::snapshot::{self, Loaded, SnapshotJob};

/// Largest snapshot a leader offers: it travels in one peer frame and is
/// held in memory on both sides while it does.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// How long a leader waits before building again after a failed build.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// ... and after one too large to send.
const RETRY_AFTER_TOO_LARGE: Duration = Duration::from_secs(60);

/// A leader's snapshot for followers: the one being built, and when the
/// next may start.
#[derive(Default)]
pub(super) struct Outgoing {
    building: Option<Building>,
    not_before: Option<Instant>,
}

/// A snapshot being written for a follower.
struct Building {
    point: SnapshotPoint,
    done: flume::Receiver<(usize, SnapshotOutcome)>,
}

/// Where a leader writes the snapshots it sends (emptied at start-up).
pub(super) fn outgoing_dir(raft_dir: &Path) -> PathBuf {
    raft_dir.join("outgoing")
}

impl ShardLoop {
    /// Leader: starts a snapshot for followers if raft wants one, or
    /// offers the one that finished.
    pub(super) async fn send_snapshot_if_due(&mut self) {
        self.release_sent_snapshot();
        self.begin_outgoing_if_wanted();
        let Some(outcome) = self.outgoing_outcome() else {
            return;
        };
        let m = self.cluster.as_mut().expect("cluster mode");
        let point = m.outgoing.building.take().expect("polled").point;
        let retry = match outcome {
            SnapshotOutcome::Written(file) => self.offer_written(point, file.path).await,
            SnapshotOutcome::Failed(why) => {
                tracing::warn!(
                    shard = self.cfg.id,
                    why,
                    "building a snapshot for a follower failed"
                );
                Some(RETRY_AFTER_FAILURE)
            }
            SnapshotOutcome::Skipped(_) => unreachable!("a follower's snapshot is always taken"),
        };
        self.member().outgoing.not_before = retry.map(|d| Instant::now() + d);
    }

    /// Lets go of the offered snapshot once every follower is past it.
    fn release_sent_snapshot(&mut self) {
        let Some(m) = self.cluster.as_ref() else {
            return;
        };
        let r = m.shard.replica();
        if !r.log().with_state(|s| s.prepared.is_some()) {
            return;
        }
        if let Some(reached) = r.progress().iter().map(|(_, matched)| *matched).min() {
            r.log().release_prepared(reached);
        }
    }

    /// Starts writing a snapshot of the engine, as of its place in the
    /// log, when raft asked for one and no other snapshot is running.
    fn begin_outgoing_if_wanted(&mut self) {
        let Some(m) = self.cluster.as_mut() else {
            return;
        };
        let waiting = m.outgoing.not_before.is_some_and(|t| Instant::now() < t);
        if m.outgoing.building.is_some() || waiting || self.snaps.job.is_some() {
            return;
        }
        if !m.shard.snapshot_wanted() {
            return;
        }
        let point = m.shard.snapshot_point();
        let dir = outgoing_dir(&m.cfg.raft_dir);
        let (tx, done) = flume::bounded(1);
        let job = SnapshotJob::begin(
            &mut self.engine,
            dir,
            self.cfg.id as u32,
            point.offset,
            now_ms(),
            self.writer.records(),
        );
        tracing::info!(
            shard = self.cfg.id,
            index = point.index,
            offset = point.offset,
            "building a snapshot for a follower behind the compacted log"
        );
        m.outgoing.building = Some(Building { point, done });
        self.snaps.job = Some((job, tx));
        self.snaps.job_started = Instant::now();
    }

    /// What became of the snapshot being built, once known.
    fn outgoing_outcome(&mut self) -> Option<SnapshotOutcome> {
        let b = self.cluster.as_ref()?.outgoing.building.as_ref()?;
        match b.done.try_recv() {
            Ok((_, outcome)) => Some(outcome),
            Err(flume::TryRecvError::Empty) => None,
            Err(flume::TryRecvError::Disconnected) => Some(SnapshotOutcome::Failed(
                "the snapshot writer vanished".into(),
            )),
        }
    }

    /// Reads the written file (then deletes it) and offers it to raft;
    /// how long to wait before building again if it could not be offered.
    async fn offer_written(&mut self, point: SnapshotPoint, path: PathBuf) -> Option<Duration> {
        let read = glommio::executor()
            .spawn_blocking(move || {
                let bytes = std::fs::read(&path);
                let _ = std::fs::remove_file(&path);
                bytes
            })
            .await;
        let bytes = match read {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(shard = self.cfg.id, error = %e, "reading a snapshot for a follower failed");
                return Some(RETRY_AFTER_FAILURE);
            }
        };
        if bytes.len() as u64 > MAX_SNAPSHOT_BYTES {
            tracing::error!(
                shard = self.cfg.id,
                bytes = bytes.len(),
                limit = MAX_SNAPSHOT_BYTES,
                "a snapshot for a follower is too large to send: it cannot catch up"
            );
            return Some(RETRY_AFTER_TOO_LARGE);
        }
        let m = self.member();
        if !m.shard.replica().is_leader() {
            return None; // no follower of ours needs it now
        }
        m.shard.offer_snapshot(point, &bytes);
        m.cfg.status.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Follower: the leader's snapshot replaces this node's state (see the
    /// module doc). Any failure stops the node: raft already counts the
    /// snapshot as this node's state, and a restart asks for it again.
    pub(super) async fn install_snapshot(&mut self, install: Install) {
        let offset = install.offset;
        self.abandon_running_snapshot();
        let loaded = self.store_and_load(install).await;
        assert_eq!(loaded.start_offset, offset, "the snapshot's own start");
        // Readers first: from here on nothing below `offset` is served.
        self.replaced_below = offset;
        self.cfg
            .events
            .send(HubMsg::HistoryReplaced { below: offset });
        self.restart_wal(offset).await;
        let Loaded {
            mut engine,
            wal_records,
            ..
        } = loaded;
        engine.reserve_below(offset);
        self.engine = engine;
        self.writer.set_records(wal_records);
        self.snaps.latest = Some(offset);
        self.snaps.records_since = 0;
        self.seq.advance_to(offset);
        let status = &self.member().cfg.status;
        status.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            shard = self.cfg.id,
            offset,
            "installed a snapshot from the leader"
        );
    }

    /// A snapshot of the state being replaced is moot: dropped, its
    /// requester told why.
    fn abandon_running_snapshot(&mut self) {
        if let Some((mut job, reply_to)) = self.snaps.job.take() {
            job.abandon(&mut self.engine);
            let why = "the leader's snapshot replaced this node's state".to_string();
            let _ = reply_to.try_send((self.cfg.id, SnapshotOutcome::Failed(why)));
        }
        if let Some(m) = self.cluster.as_mut() {
            m.outgoing = Outgoing::default();
        }
    }

    /// Stores the received file as this shard's newest snapshot and loads
    /// it back.
    async fn store_and_load(&mut self, install: Install) -> Loaded {
        let dir = self.cfg.snapshot_dir.clone();
        let shard = self.cfg.id as u32;
        let limits = self.member().cfg.limits.clone();
        let Install { offset, state } = install;
        let loaded = glommio::executor()
            .spawn_blocking(move || {
                let path = snapshot::store_received(&dir, offset, &state)?;
                snapshot::load(&path, shard, &limits)
            })
            .await;
        loaded.unwrap_or_else(|e| {
            super::cluster::fatal(
                self.cfg.id,
                format_args!("storing the leader's snapshot: {e}"),
            )
        })
    }

    /// Deletes the snapshots older than `offset`, then restarts the WAL
    /// there and retires its old segments. In this order, a crash in
    /// between never leaves an old snapshot beside a WAL that lacks what
    /// followed it.
    async fn restart_wal(&mut self, offset: u64) {
        let snap_dir = self.cfg.snapshot_dir.clone();
        let deleted = glommio::executor()
            .spawn_blocking(move || delete_snapshots_below(&snap_dir, offset))
            .await;
        let old = match deleted {
            Ok(()) => self
                .writer
                .restart_at(offset)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let wal_dir = self.cfg.wal.dir.clone();
        let retired = match old {
            Ok(old) => {
                glommio::executor()
                    .spawn_blocking(move || retire_segments(&wal_dir, &old))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = retired {
            super::cluster::fatal(
                self.cfg.id,
                format_args!("dropping the history a snapshot replaced: {e}"),
            );
        }
    }
}

/// Deletes the snapshots of `dir` that start below `offset`.
fn delete_snapshots_below(dir: &Path, offset: u64) -> Result<(), String> {
    for (start, path) in snapshot::list(dir).map_err(|e| e.to_string())? {
        if start < offset {
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Retires the WAL segments `old` (renamed out of the log, the directory
/// synced) and deletes them.
fn retire_segments(wal_dir: &Path, old: &[PathBuf]) -> Result<(), String> {
    let (retired, err) = rstmdb_wal::segment::retire(wal_dir, old);
    if let Some(e) = err {
        return Err(e.to_string());
    }
    for f in retired {
        if let Err(e) = std::fs::remove_file(&f) {
            tracing::warn!(file = %f.display(), error = %e, "removing a retired WAL segment failed");
        }
    }
    Ok(())
}

//! Rebuilding a shard's engine at start-up: the newest intact snapshot,
//! then every WAL record at or above its start offset (DECISIONS D15).

use std::path::{Path, PathBuf};

use rstmdb_wal::recovery::recover_on;
use rstmdb_wal::storage::{Disk, Storage};
use rstmdb_wal::{Recovered, RecoveryOptions, WalError};

use crate::engine::{Engine, EngineLimits};
use crate::snapshot;
use crate::wal_entry::WalEntry;

/// Why a shard could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The WAL is unreadable or corrupt.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// Compaction removed WAL records that only a snapshot could replace,
    /// and no intact snapshot covering them is left.
    #[error(
        "the WAL below offset {floor} was compacted away and no intact snapshot \
         starting at or above it is left in {dir}{tried}; refusing to start with missing data"
    )]
    NoUsableSnapshot {
        /// Lowest offset still guaranteed to be in the WAL.
        floor: u64,
        /// Snapshot directory.
        dir: PathBuf,
        /// What was tried and why it failed.
        tried: String,
    },
    /// The WAL lost its first segments and no snapshot covers them.
    #[error(
        "the WAL in {dir} starts at segment {segment}, not 1, and no intact snapshot is left to \
         start from: its beginning is gone; refusing to start with missing data"
    )]
    MissingBeginning {
        /// The oldest segment left.
        segment: u64,
        /// The WAL directory.
        dir: PathBuf,
    },
    /// The snapshot directory could not be listed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
}

/// A recovered shard.
pub struct RecoveredShard {
    /// Its state.
    pub engine: Engine,
    /// Where its WAL stands.
    pub wal: Recovered,
    /// Start offset of the snapshot it was loaded from, if any.
    pub snapshot_start: Option<u64>,
    /// Snapshots found damaged and skipped (path and reason), newest first.
    pub skipped: Vec<String>,
    /// Records this shard has ever written (those in the snapshot's count
    /// plus those replayed after it): WAL_STATS `entry_count`.
    pub records_ever: u64,
}

/// Loads the newest intact snapshot whose start is at or above `wal_floor`
/// (every record from there on is still in the WAL), then replays the WAL
/// after it. Blocking (std::fs); run it on a thread of its own, one per
/// shard, before the executors start.
pub fn recover_shard(
    opts: &RecoveryOptions,
    limits: &EngineLimits,
    snapshot_dir: &Path,
    wal_floor: u64,
) -> Result<RecoveredShard, RecoveryError> {
    recover_shard_on(&Disk, opts, limits, snapshot_dir, wal_floor)
}

/// [`recover_shard`] on any [`Storage`] (the simulated disk in tests).
pub fn recover_shard_on<S: Storage>(
    storage: &S,
    opts: &RecoveryOptions,
    limits: &EngineLimits,
    snapshot_dir: &Path,
    wal_floor: u64,
) -> Result<RecoveredShard, RecoveryError> {
    let mut skipped = Vec::new();
    let mut loaded = None;
    let files = snapshot::list_on(storage, snapshot_dir, !opts.read_only)?;
    let newest = files.first().map_or(0, |f| f.0);
    for (start, path) in files {
        if start < wal_floor {
            skipped.push(below_floor(&path, start, wal_floor));
            continue;
        }
        match snapshot::load_on(storage, &path, opts.shard, limits) {
            Ok(l) => {
                loaded = Some(l);
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "skipping damaged snapshot");
                skipped.push(e.to_string());
            }
        }
    }
    let mut r = replay_after(
        storage,
        opts,
        limits,
        snapshot_dir,
        wal_floor,
        loaded,
        skipped,
    )?;
    r.engine.reserve_below(newest);
    Ok(r)
}

/// One snapshot file as [`verify_shard`] found it.
#[derive(Debug)]
pub struct SnapshotCheck {
    /// The file.
    pub path: PathBuf,
    /// Its start offset (from the file name).
    pub start_offset: u64,
    /// Instances it holds, or why it is unusable.
    pub result: Result<u64, String>,
}

/// What [`verify_shard`] found.
pub struct ShardReport {
    /// Every snapshot file, newest first.
    pub snapshots: Vec<SnapshotCheck>,
    /// The outcome start-up would have: the snapshot it would load and the
    /// WAL replayed after it, or the error that would stop it.
    pub recovery: Result<RecoveredShard, RecoveryError>,
}

/// Checks a shard's files the way start-up reads them, changing nothing
/// (the offline `rstmdb wal verify`): *every* snapshot is decoded in full
/// (start-up stops at the first intact one), then the WAL is replayed
/// read-only on top of the one start-up would choose. `opts.read_only`
/// must be set.
pub fn verify_shard(
    opts: &RecoveryOptions,
    limits: &EngineLimits,
    snapshot_dir: &Path,
    wal_floor: u64,
) -> ShardReport {
    assert!(opts.read_only, "verification must not change the files");
    let files = match snapshot::list_files(snapshot_dir, false) {
        Ok(f) => f,
        Err(e) => {
            return ShardReport {
                snapshots: Vec::new(),
                recovery: Err(e.into()),
            }
        }
    };
    let mut snapshots = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    let mut loaded = None;
    for (start, path) in files {
        let result = match snapshot::load(&path, opts.shard, limits) {
            Ok(l) => {
                let instances = l.instances;
                if start < wal_floor {
                    skipped.push(below_floor(&path, start, wal_floor));
                } else if loaded.is_none() {
                    loaded = Some(l);
                }
                Ok(instances)
            }
            Err(e) => {
                if start >= wal_floor && loaded.is_none() {
                    skipped.push(e.to_string());
                }
                Err(e.to_string())
            }
        };
        snapshots.push(SnapshotCheck {
            path,
            start_offset: start,
            result,
        });
    }
    let recovery = replay_after(
        &Disk,
        opts,
        limits,
        snapshot_dir,
        wal_floor,
        loaded,
        skipped,
    );
    ShardReport {
        snapshots,
        recovery,
    }
}

fn below_floor(path: &Path, start: u64, wal_floor: u64) -> String {
    format!(
        "{}: starts at {start}, below the WAL floor {wal_floor}",
        path.display()
    )
}

/// A WAL whose first segment is not the log's first lost its beginning
/// (compaction, or a cluster replica restarted above a leader's snapshot):
/// without a snapshot, replaying what is left would build a state with a
/// hole in its history. Checked before anything is replayed.
fn refuse_headless_wal<S: Storage>(
    storage: &S,
    opts: &RecoveryOptions,
) -> Result<(), RecoveryError> {
    if !storage.exists(&opts.dir) {
        return Ok(()); // a new log
    }
    let segments = rstmdb_wal::segment::list_on(storage, &opts.dir, false)?;
    match segments.first() {
        Some(&first) if first != 1 => Err(RecoveryError::MissingBeginning {
            segment: first,
            dir: opts.dir.clone(),
        }),
        _ => Ok(()),
    }
}

/// Replays the WAL on top of `loaded` (or an empty engine when no
/// snapshot is needed).
fn replay_after<S: Storage>(
    storage: &S,
    opts: &RecoveryOptions,
    limits: &EngineLimits,
    snapshot_dir: &Path,
    wal_floor: u64,
    loaded: Option<snapshot::Loaded>,
    skipped: Vec<String>,
) -> Result<RecoveredShard, RecoveryError> {
    let (mut engine, start, mut records_ever) = match loaded {
        Some(l) => (l.engine, Some(l.start_offset), l.wal_records),
        None if wal_floor > 1 => {
            return Err(RecoveryError::NoUsableSnapshot {
                floor: wal_floor,
                dir: snapshot_dir.to_path_buf(),
                tried: if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (tried: {})", skipped.join("; "))
                },
            })
        }
        None => (Engine::new(limits), None, 0),
    };
    if start.is_none() {
        refuse_headless_wal(storage, opts)?;
    }
    let below = start.unwrap_or(0);
    let wal = recover_on(storage, opts, |r| {
        if r.offset < below {
            return Ok(()); // in the snapshot
        }
        records_ever += 1;
        let entry: WalEntry = serde_json::from_slice(r.payload)
            .map_err(|e| format!("undecodable entry at offset {}: {e}", r.offset))?;
        if entry.kind() != r.kind {
            return Err(format!(
                "record kind {} does not match its entry {:?}",
                r.kind,
                entry.kind()
            ));
        }
        engine.replay(r.offset, entry)
    })?;
    Ok(RecoveredShard {
        engine,
        wal,
        snapshot_start: start,
        skipped,
        records_ever,
    })
}

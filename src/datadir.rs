//! The data directory: an exclusive lock, the recorded shard count, and the
//! per-shard WAL directories.
//!
//! ```text
//! <data_dir>/LOCK              flock'ed while a server runs on it
//! <data_dir>/meta.json         {"format":1,"shards":N}
//! <data_dir>/shard-000/wal/    segments of shard 0
//! <data_dir>/shard-000/snapshots/  snapshots of shard 0 (see rstmdb_shards::snapshot)
//! <data_dir>/manifest.json     each shard's newest snapshot and WAL floor
//! <data_dir>/instance-snapshots/   SNAPSHOT_INSTANCE exports
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Format version of the data directory layout.
const FORMAT: u32 = 1;

/// Start-up failures concerning the data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Filesystem error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Path involved.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("data directory {0} is in use by another rstmdb process (LOCK is held)")]
    Locked(PathBuf),
    /// The shard count differs from the recorded one.
    #[error(
        "data directory {path} was created with {recorded} shard(s) but this server is configured for {configured}; \
         instances are placed by hash(instance_id) % shards, so changing the count would strand them. \
         Start with --shards {recorded} (or RSTMDB_SHARDS={recorded}); re-sharding is not supported yet"
    )]
    ShardCountMismatch {
        /// Data directory.
        path: PathBuf,
        /// Count in meta.json.
        recorded: usize,
        /// Count configured now.
        configured: usize,
    },
    /// meta.json is unreadable.
    #[error("{path}: {reason}")]
    BadMeta {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    shards: usize,
}

/// An opened, locked data directory.
pub struct DataDir {
    root: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates (if needed) and locks `root`, and checks or records the shard
    /// count.
    pub fn open(root: &Path, shards: usize) -> Result<DataDir, DataDirError> {
        let io = |what, path: &Path, source| DataDirError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(root).map_err(|e| io("creating data directory", root, e))?;
        let lock_path = root.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("opening", &lock_path, e))?;
        // SAFETY: flock on a valid, open file descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DataDirError::Locked(root.to_path_buf()));
        }
        let meta_path = root.join("meta.json");
        match fs::read(&meta_path) {
            Ok(bytes) => {
                let meta: Meta =
                    serde_json::from_slice(&bytes).map_err(|e| DataDirError::BadMeta {
                        path: meta_path.clone(),
                        reason: e.to_string(),
                    })?;
                if meta.format != FORMAT {
                    return Err(DataDirError::BadMeta {
                        path: meta_path,
                        reason: format!("unsupported data directory format {}", meta.format),
                    });
                }
                if meta.shards != shards {
                    return Err(DataDirError::ShardCountMismatch {
                        path: root.to_path_buf(),
                        recorded: meta.shards,
                        configured: shards,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = serde_json::to_vec(&Meta {
                    format: FORMAT,
                    shards,
                })
                .expect("serializable");
                write_atomically(root, "meta.json", &bytes)?;
            }
            Err(e) => return Err(io("reading", &meta_path, e)),
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// WAL directory of shard `i`.
    pub fn wal_dir(&self, shard: usize) -> PathBuf {
        self.root.join(format!("shard-{shard:03}")).join("wal")
    }

    /// Snapshot directory of shard `i`.
    pub fn snapshot_dir(&self, shard: usize) -> PathBuf {
        self.root
            .join(format!("shard-{shard:03}"))
            .join("snapshots")
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the manifest; an absent one means no compaction ever ran.
    pub fn read_manifest(&self, shards: usize) -> Result<Manifest, DataDirError> {
        let path = self.root.join(MANIFEST);
        let m: Manifest = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DataDirError::BadMeta {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::empty(shards),
            Err(e) => {
                return Err(DataDirError::Io {
                    what: "reading",
                    path,
                    source: e,
                })
            }
        };
        if m.shards.len() != shards {
            return Err(DataDirError::BadMeta {
                path,
                reason: format!(
                    "lists {} shard(s), the data directory has {shards}",
                    m.shards.len()
                ),
            });
        }
        Ok(m)
    }
}

const MANIFEST: &str = "manifest.json";

/// What compaction has done to each shard: the snapshot recovery is meant
/// to start from, and the WAL floor (every record at or above it is still
/// in the WAL; below it, segments may be gone). Written atomically
/// *before* any segment is deleted, so it never claims more WAL than the
/// disk holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Layout version.
    pub format: u32,
    /// One entry per shard, by shard number.
    pub shards: Vec<ShardManifest>,
}

/// One shard's entry in the [`Manifest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardManifest {
    /// File name of the newest snapshot (in the shard's snapshot dir).
    pub snapshot: Option<String>,
    /// Its start offset (every record below is in it).
    pub start_offset: u64,
    /// Its size.
    pub size_bytes: u64,
    /// Its CRC32C.
    pub checksum: Option<String>,
    /// Every record at or above this is in the WAL.
    pub wal_floor: u64,
}

impl Manifest {
    /// No snapshots, nothing compacted.
    pub fn empty(shards: usize) -> Self {
        Manifest {
            format: FORMAT,
            shards: vec![ShardManifest::default(); shards],
        }
    }

    /// Writes it atomically into `root`. Blocking.
    pub fn write(&self, root: &Path) -> Result<(), DataDirError> {
        let bytes = serde_json::to_vec_pretty(self).expect("serializable");
        write_atomically(root, MANIFEST, &bytes)
    }
}

/// Writes `name` in `dir` atomically: temp file, fsync, rename, fsync dir.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DataDirError> {
    let io = |what, path: &Path, source| DataDirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(bytes).map_err(|e| io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    fs::rename(&tmp, &dst).map_err(|e| io("renaming", &dst, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_checks_the_shard_count() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DataDir::open(tmp.path(), 3).unwrap());
        assert!(DataDir::open(tmp.path(), 3).is_ok());
        let err = DataDir::open(tmp.path(), 2)
            .err()
            .expect("mismatch refused")
            .to_string();
        assert!(
            err.contains("created with 3 shard(s)") && err.contains("--shards 3"),
            "{err}"
        );
    }

    #[test]
    fn a_second_opener_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = DataDir::open(tmp.path(), 1).unwrap();
        assert!(matches!(
            DataDir::open(tmp.path(), 1),
            Err(DataDirError::Locked(_))
        ));
    }
}

//! The data directory: an exclusive lock, the recorded shard count and
//! layout, and the per-shard directories.
//!
//! ```text
//! <data_dir>/LOCK              flock'ed while a server runs on it
//! <data_dir>/meta.json         {"format":1,"shards":N[,"layout":"layout-…"]}
//! <base>/shard-000/wal/        segments of shard 0
//! <base>/shard-000/snapshots/  snapshots of shard 0 (see rstmdb_shards::snapshot)
//! <base>/manifest.json         each shard's newest snapshot and WAL floor
//! <data_dir>/instance-snapshots/   SNAPSHOT_INSTANCE exports
//! ```
//!
//! `<base>` is the data directory itself, or, once the data has been
//! re-sharded, the `layout-…` directory that `meta.json` names. Re-sharding
//! writes a complete new layout beside the old one and switches by
//! rewriting `meta.json` atomically; whatever `meta.json` does not name is
//! garbage, removed when the directory is opened.

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
    /// The directory holding the shards, when not the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layout: Option<String>,
}

impl Meta {
    /// The directory holding the shard directories.
    fn base(&self, root: &Path) -> PathBuf {
        self.layout
            .as_ref()
            .map_or_else(|| root.to_path_buf(), |l| root.join(l))
    }
}

/// Reads and checks `meta.json`; `None` when there is none (a new
/// directory).
fn read_meta(root: &Path) -> Result<Option<Meta>, DataDirError> {
    let meta_path = root.join("meta.json");
    let bytes = match fs::read(&meta_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DataDirError::Io {
                what: "reading",
                path: meta_path,
                source: e,
            })
        }
    };
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| DataDirError::BadMeta {
        path: meta_path.clone(),
        reason: e.to_string(),
    })?;
    if meta.format != FORMAT {
        return Err(DataDirError::BadMeta {
            path: meta_path,
            reason: format!("unsupported data directory format {}", meta.format),
        });
    }
    if meta.shards == 0
        || meta
            .layout
            .as_deref()
            .is_some_and(|l| !l.starts_with(LAYOUT_PREFIX) || l.contains('/'))
    {
        return Err(DataDirError::BadMeta {
            path: meta_path,
            reason: format!("invalid shard count or layout: {meta:?}"),
        });
    }
    if let Some(l) = &meta.layout {
        if !root.join(l).is_dir() {
            return Err(DataDirError::BadMeta {
                path: meta_path,
                reason: format!(
                    "names the layout directory {l}, which is missing: \
                     refusing to start without the data"
                ),
            });
        }
    }
    Ok(Some(meta))
}

/// The shape of a data directory, read-only (see [`DataDir::inspect`]).
#[derive(Debug, Clone)]
pub struct Layout {
    /// Where the shard directories and the manifest live.
    pub base: PathBuf,
    /// The recorded shard count.
    pub shards: usize,
}

impl Layout {
    /// WAL directory of shard `i`.
    pub fn wal_dir(&self, shard: usize) -> PathBuf {
        DataDir::shard_dir_in(&self.base, shard).join("wal")
    }

    /// Snapshot directory of shard `i`.
    pub fn snapshot_dir(&self, shard: usize) -> PathBuf {
        DataDir::shard_dir_in(&self.base, shard).join("snapshots")
    }

    /// The compaction manifest (see [`DataDir::read_manifest`]).
    pub fn read_manifest(&self) -> Result<Manifest, DataDirError> {
        read_manifest_in(&self.base, self.shards)
    }
}

/// Prefix of layout directories written by re-sharding.
const LAYOUT_PREFIX: &str = "layout-";

/// An opened, locked data directory.
pub struct DataDir {
    root: PathBuf,
    /// Where the shard directories and the manifest live.
    base: PathBuf,
    layout: Option<String>,
    /// The recorded shard count.
    shards: usize,
    _lock: File,
}

impl DataDir {
    /// Creates (if needed) and locks `root`; records `shards` as the shard
    /// count of a new directory. An existing directory keeps its recorded
    /// count ([`DataDir::shards`]): the caller re-shards if it differs.
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
        match read_meta(root)? {
            Some(meta) => {
                let dir = DataDir {
                    root: root.to_path_buf(),
                    base: meta.base(root),
                    layout: meta.layout,
                    shards: meta.shards,
                    _lock: lock,
                };
                dir.collect_garbage()?;
                Ok(dir)
            }
            None => {
                let bytes = serde_json::to_vec(&Meta {
                    format: FORMAT,
                    shards,
                    layout: None,
                })
                .expect("serializable");
                write_atomically(root, "meta.json", &bytes)?;
                let dir = DataDir {
                    root: root.to_path_buf(),
                    base: root.to_path_buf(),
                    layout: None,
                    shards,
                    _lock: lock,
                };
                dir.collect_garbage()?;
                Ok(dir)
            }
        }
    }

    /// Where an existing data directory keeps its shards, read without
    /// creating, locking or removing anything (the offline tools, which
    /// may look at a directory a server is using). A directory without
    /// `meta.json` is refused: it is not a data directory.
    pub fn inspect(root: &Path) -> Result<Layout, DataDirError> {
        match read_meta(root)? {
            Some(meta) => Ok(Layout {
                base: meta.base(root),
                shards: meta.shards,
            }),
            None => Err(DataDirError::BadMeta {
                path: root.join("meta.json"),
                reason: "not found: not an rstmdb data directory".into(),
            }),
        }
    }

    /// The shard count the data is laid out for.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Removes layouts `meta.json` does not name: a re-sharding that
    /// crashed before its switch, or the old layout of one that crashed
    /// after it.
    fn collect_garbage(&self) -> Result<(), DataDirError> {
        let io = |what, path: &Path, source| DataDirError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        let entries = fs::read_dir(&self.root).map_err(|e| io("listing", &self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io("listing", &self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_layout =
                name.starts_with(LAYOUT_PREFIX) && Some(name.as_str()) != self.layout.as_deref();
            let stale_root_shard =
                self.layout.is_some() && (name.starts_with("shard-") || name == MANIFEST);
            if stale_layout || stale_root_shard {
                let path = entry.path();
                tracing::warn!(path = %path.display(), "removing data left by an earlier re-sharding");
                let r = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                r.map_err(|e| io("removing", &path, e))?;
            }
        }
        Ok(())
    }

    /// Creates an empty directory for a new layout of `shards` shards, to
    /// be filled and then switched to with [`DataDir::switch_layout`].
    pub fn new_layout(&self, shards: usize) -> Result<(String, PathBuf), DataDirError> {
        let name = format!(
            "{LAYOUT_PREFIX}{shards}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        let path = self.root.join(&name);
        fs::create_dir_all(&path).map_err(|e| DataDirError::Io {
            what: "creating",
            path: path.clone(),
            source: e,
        })?;
        Ok((name, path))
    }

    /// Makes layout `name` (complete and synced) the data directory's, in
    /// one atomic rename of `meta.json`, then removes the old layout.
    pub fn switch_layout(&mut self, name: String, shards: usize) -> Result<(), DataDirError> {
        let bytes = serde_json::to_vec(&Meta {
            format: FORMAT,
            shards,
            layout: Some(name.clone()),
        })
        .expect("serializable");
        write_atomically(&self.root, "meta.json", &bytes)?;
        self.base = self.root.join(&name);
        self.layout = Some(name);
        self.shards = shards;
        self.collect_garbage()
    }

    /// Shard directory `i` inside layout directory `base`.
    pub fn shard_dir_in(base: &Path, shard: usize) -> PathBuf {
        base.join(format!("shard-{shard:03}"))
    }

    /// WAL directory of shard `i`.
    pub fn wal_dir(&self, shard: usize) -> PathBuf {
        Self::shard_dir_in(&self.base, shard).join("wal")
    }

    /// Snapshot directory of shard `i`.
    pub fn snapshot_dir(&self, shard: usize) -> PathBuf {
        Self::shard_dir_in(&self.base, shard).join("snapshots")
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the shard directories and the manifest live.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Reads the manifest; an absent one means no compaction ever ran.
    pub fn read_manifest(&self, shards: usize) -> Result<Manifest, DataDirError> {
        read_manifest_in(&self.base, shards)
    }
}

/// Reads the manifest in `base`, checking it lists `shards` shards.
fn read_manifest_in(base: &Path, shards: usize) -> Result<Manifest, DataDirError> {
    let path = base.join(MANIFEST);
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
    /// Records below this offset exist only in snapshots, whatever the
    /// segments say (set by re-sharding: the new layout's WALs start
    /// there). No WAL floor is ever lowered below it.
    #[serde(default)]
    pub history_floor: u64,
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
            history_floor: 0,
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
    fn records_the_shard_count() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DataDir::open(tmp.path(), 3).unwrap());
        assert_eq!(DataDir::open(tmp.path(), 3).unwrap().shards(), 3);
        assert_eq!(DataDir::open(tmp.path(), 2).unwrap().shards(), 3);
    }

    #[test]
    fn switching_layouts_is_one_rename_and_leaves_no_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DataDir::open(tmp.path(), 2).unwrap();
        std::fs::create_dir_all(d.wal_dir(0)).unwrap();
        std::fs::write(tmp.path().join(MANIFEST), b"{}").unwrap();
        // A layout abandoned by a crash before its switch is removed.
        let (_, abandoned) = d.new_layout(5).unwrap();
        drop(d);
        let mut d = DataDir::open(tmp.path(), 2).unwrap();
        assert!(!abandoned.exists());
        assert!(d.wal_dir(0).exists(), "the live layout is kept");
        let (name, path) = d.new_layout(3).unwrap();
        std::fs::create_dir_all(DataDir::shard_dir_in(&path, 2).join("wal")).unwrap();
        d.switch_layout(name, 3).unwrap();
        assert_eq!(d.shards(), 3);
        assert_eq!(d.wal_dir(2), path.join("shard-002").join("wal"));
        assert!(!tmp.path().join("shard-000").exists(), "old layout removed");
        assert!(!tmp.path().join(MANIFEST).exists());
        drop(d);
        let d = DataDir::open(tmp.path(), 1).unwrap();
        assert_eq!((d.shards(), d.base()), (3, path.as_path()));
        assert!(d.wal_dir(2).exists());
        drop(d);
        std::fs::remove_dir_all(&path).unwrap();
        let err = DataDir::open(tmp.path(), 3)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("missing"), "{err}");
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

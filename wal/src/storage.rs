//! The file operations the WAL performs, behind one narrow interface, so
//! that the writer, segment creation and recovery can run on a simulated
//! disk (`crate::sim`) that injects I/O errors, tears writes and loses
//! whatever was not synced when it "crashes".
//!
//! [`Disk`] is the real filesystem: buffered `std::fs` calls for creation
//! and recovery (blocking, off the shard's executor), and O_DIRECT glommio
//! DMA files for the writer's appends.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Every file operation of the WAL. Paths name files and directories as
/// on a real filesystem. Methods are blocking unless they return a future.
pub trait Storage: Clone + Send + Sync + 'static {
    /// A segment opened for the writer's appends.
    type Segment: SegmentFile;

    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir` (unsorted).
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Up to `n` bytes from the start of the file.
    fn read_prefix(&self, path: &Path, n: usize) -> io::Result<Vec<u8>>;
    /// Creates `path` empty (truncating an existing file).
    fn create_file(&self, path: &Path) -> io::Result<()>;
    /// Writes `data` at `pos` of an existing file (buffered, not synced).
    fn write_at(&self, path: &Path, pos: u64, data: &[u8]) -> io::Result<()>;
    /// The file's length.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Makes the file's data and size durable (`fsync`).
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` durable (creations, renames, removals).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Renames a file (atomically replacing `to`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Whether segment creation (blocking, up to a segment of zeros) should
    /// run on a blocking thread rather than inline on the executor. A
    /// simulated disk answers false, so that a run is deterministic.
    fn create_in_background(&self) -> bool;
    /// Opens an existing segment for appends (must run on a glommio
    /// executor for the real disk).
    fn open_segment(
        &self,
        path: &Path,
        mode: WriteMode,
    ) -> impl Future<Output = io::Result<Self::Segment>>;
}

/// A segment file open for the writer's block-aligned appends.
pub trait SegmentFile {
    /// Writes `len` bytes at `pos` (both block-aligned); `fill` writes them
    /// into the buffer that goes to the device (zeroed beforehand). Returns
    /// the bytes written.
    fn write_block(
        &self,
        pos: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> impl Future<Output = io::Result<usize>>;
    /// `fdatasync`.
    fn sync(&self) -> impl Future<Output = io::Result<()>>;
    /// Whether a completed `write_block` is already durable (O_DSYNC), so
    /// that no `sync` is needed after it.
    fn durable_writes(&self) -> bool;
    /// Closes the file.
    fn close(self) -> impl Future<Output = ()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disk;

impl Storage for Disk {
    type Segment = DiskSegment;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn read_prefix(&self, path: &Path, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut f = File::open(path)?;
        let mut got = 0;
        while got < n {
            match f.read(&mut buf[got..])? {
                0 => break,
                k => got += k,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn create_file(&self, path: &Path) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map(drop)
    }

    fn write_at(&self, path: &Path, pos: u64, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(path)?;
        f.seek(SeekFrom::Start(pos))?;
        f.write_all(data)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        OpenOptions::new().write(true).open(path)?.set_len(len)
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        // A handle of its own: Linux reports a write-back error not yet
        // seen by anyone to the first fsync on any handle of the file
        // (errseq, since 4.16), so nothing written before is missed.
        OpenOptions::new().write(true).open(path)?.sync_all()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_in_background(&self) -> bool {
        true
    }

    async fn open_segment(&self, path: &Path, mode: WriteMode) -> io::Result<DiskSegment> {
        match mode {
            WriteMode::DirectSync => glommio::io::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .dma_open(path)
                .await
                .map(DiskSegment::DirectSync)
                .map_err(|e| io::Error::other(e.to_string())),
            WriteMode::PageCache => OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map(|f| DiskSegment::PageCache(std::sync::Arc::new(f))),
        }
    }
}

/// How a segment's appends reach the disk; the fsync policy picks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// O_DIRECT | O_DSYNC through io_uring: a write completes once it is
    /// durable (FUA where the device has it), so a durable commit is one
    /// device round trip, with no `fdatasync` after it.
    #[default]
    DirectSync,
    /// A copy into the page cache (`pwrite` on the executor thread, a few
    /// microseconds): the data survives a crash of the process as soon as
    /// the call returns, and the power going only after an `fdatasync`.
    PageCache,
}

/// A segment open on the real disk, in its [`WriteMode`].
pub enum DiskSegment {
    /// A glommio DMA file opened with O_DSYNC.
    DirectSync(glommio::io::DmaFile),
    /// An ordinary file (shared with the blocking pool for `fdatasync`).
    PageCache(std::sync::Arc<File>),
}

impl SegmentFile for DiskSegment {
    async fn write_block(
        &self,
        pos: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<usize> {
        match self {
            DiskSegment::DirectSync(f) => {
                let mut buf = f.alloc_dma_buffer(len);
                let bytes = buf.as_bytes_mut();
                bytes.fill(0);
                fill(bytes);
                f.write_at(buf, pos)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
            }
            DiskSegment::PageCache(f) => {
                let mut buf = vec![0u8; len];
                fill(&mut buf);
                std::os::unix::fs::FileExt::write_all_at(&**f, &buf, pos).map(|()| len)
            }
        }
    }

    async fn sync(&self) -> io::Result<()> {
        match self {
            DiskSegment::DirectSync(f) => f
                .fdatasync()
                .await
                .map_err(|e| io::Error::other(e.to_string())),
            DiskSegment::PageCache(f) => {
                // Off the executor: an fdatasync of page-cache data waits
                // for the device.
                let f = f.clone();
                glommio::executor()
                    .spawn_blocking(move || f.sync_data())
                    .await
            }
        }
    }

    fn durable_writes(&self) -> bool {
        matches!(self, DiskSegment::DirectSync(_))
    }

    async fn close(self) {
        if let DiskSegment::DirectSync(f) = self {
            let _ = f.close().await;
        }
    }
}

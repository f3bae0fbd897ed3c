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
    fn open_segment(&self, path: &Path) -> impl Future<Output = io::Result<Self::Segment>>;
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
    /// Closes the file.
    fn close(self) -> impl Future<Output = ()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disk;

impl Storage for Disk {
    type Segment = DmaSegment;

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

    async fn open_segment(&self, path: &Path) -> io::Result<DmaSegment> {
        glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map(DmaSegment)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A segment written with O_DIRECT through io_uring (a glommio DMA file).
pub struct DmaSegment(glommio::io::DmaFile);

impl SegmentFile for DmaSegment {
    async fn write_block(
        &self,
        pos: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<usize> {
        let mut buf = self.0.alloc_dma_buffer(len);
        let bytes = buf.as_bytes_mut();
        bytes.fill(0);
        fill(bytes);
        self.0
            .write_at(buf, pos)
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }

    async fn sync(&self) -> io::Result<()> {
        self.0
            .fdatasync()
            .await
            .map_err(|e| io::Error::other(e.to_string()))
    }

    async fn close(self) {
        let _ = self.0.close().await;
    }
}

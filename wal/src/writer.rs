//! The group-commit writer: one per shard, living on the shard's executor.
//!
//! The shard stages every record of a drain with [`WalWriter::stage`], then
//! calls [`WalWriter::commit`] once: the staged bytes go to disk as one
//! block-aligned O_DIRECT write through io_uring (glommio DMA file), followed
//! by one `fdatasync` when the caller's fsync policy asks for it. Rotation is
//! owned here (DECISIONS D16): the next segment is prepared in the background
//! while the current one fills, and every segment a commit needs exists
//! before the commit writes its first byte, so a failure to create a segment
//! (e.g. `ENOSPC`) fails the commit with nothing written.
//!
//! A failed data write or `fdatasync` leaves the on-disk state unknown; the
//! writer then refuses every later commit ("poisoned") until the process is
//! restarted and recovery re-establishes the truth from the disk.

use std::path::{Path, PathBuf};

use crate::recovery::Recovered;
use crate::segment::{self, align_up, BLOCK};
use crate::storage::{Disk, SegmentFile, Storage, WriteMode};
use crate::{record, WalError, MAX_RECORD_PAYLOAD, REPAIR_KIND};

/// Histogram of `fdatasync` durations, in seconds (metrics endpoint).
pub const FSYNC_SECONDS: &str = "rstmdb_wal_fsync_duration_seconds";

/// Cumulative I/O counters (WAL_STATS `io_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Bytes handed to write calls (block padding included).
    pub bytes_written: u64,
    /// Bytes read (recovery included).
    pub bytes_read: u64,
    /// Write calls.
    pub writes: u64,
    /// Read calls.
    pub reads: u64,
    /// `fdatasync` calls.
    pub fsyncs: u64,
}

/// Counts the reads of a log's readers for its writer's `io_stats`. Lives
/// on the writer's executor (not `Send`), like the writer.
#[derive(Debug, Clone, Default)]
pub struct ReaderIo(std::rc::Rc<std::cell::Cell<(u64, u64)>>);

impl ReaderIo {
    /// Adds one page's reads.
    pub fn add(&self, page: &crate::Page) {
        let (bytes, calls) = self.0.get();
        self.0.set((bytes + page.bytes_read, calls + page.reads));
    }
}

/// One segment as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Segment id.
    pub id: u64,
    /// Bytes in use (end of its data: block-aligned, except after packed
    /// page-cache commits not yet synced).
    pub used: u64,
    /// Offset of its first record; 0 while it has none.
    pub first_offset: u64,
    /// Where a reader should start scanning: the block after the header,
    /// or a commit boundary chosen by [`WalWriter::read_plan`].
    pub start: u64,
}

/// Writer configuration.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The shard's WAL directory.
    pub dir: PathBuf,
    /// Shard number (written into segment headers).
    pub shard: u32,
    /// Full segment size in bytes (multiple of 4096, at least 8 KiB).
    pub segment_size: u64,
    /// How appends reach the disk (see [`WriteMode`]).
    pub mode: WriteMode,
}

/// Creation of the next segment.
enum Pending {
    /// Running in glommio's blocking pool. A spawned task (not a bare
    /// future): glommio's `spawn_blocking` only starts its work when first
    /// polled.
    Task(glommio::Task<Result<PathBuf, WalError>>),
    /// Done inline (a storage that asks for it: the simulated disk).
    Done(Result<PathBuf, WalError>),
}

impl Pending {
    async fn wait(self) -> Result<PathBuf, WalError> {
        match self {
            Pending::Task(t) => t.await,
            Pending::Done(r) => r,
        }
    }
}

/// Spacing of the sparse read index (bytes of segment between entries).
pub const INDEX_EVERY: u64 = 64 * 1024;

/// Per-shard WAL writer. Not `Send`: it lives on one glommio executor.
/// Generic over its [`Storage`] so that tests can run it on a simulated
/// disk; the server uses the real one ([`Disk`]).
pub struct WalWriter<S: Storage = Disk> {
    storage: S,
    cfg: WriterConfig,
    file: S::Segment,
    seg_id: u64,
    /// Next write position in the current segment: block-aligned, except
    /// in page-cache mode, where commits are packed one after another until
    /// the next sync (see [`WalWriter::packs`]).
    write_pos: u64,
    /// Encoded records waiting for the next commit.
    staging: Vec<u8>,
    /// End position in `staging` of each staged record.
    record_ends: Vec<usize>,
    /// Every segment, ascending.
    segments: Vec<SegmentInfo>,
    /// Per segment (same order): a sparse index of commit starts,
    /// (first record offset, byte position), one every [`INDEX_EVERY`]
    /// bytes, so readers can start near the record they want.
    index: Vec<Vec<(u64, u64)>>,
    /// Background creation of segment `seg_id + 1`.
    next_segment: Option<Pending>,
    /// Whether data was written since the last `fdatasync`.
    unsynced: bool,
    /// Position in the current segment up to which everything is durable;
    /// written into each commit's first record (see `record`).
    synced_pos: u64,
    /// Set by a failed write or fsync; every later commit fails.
    poisoned: Option<String>,
    stats: IoStats,
    /// What readers of this log (WAL_READ, watch catch-up) read, counted
    /// into `io_stats` beside the writer's own I/O.
    reader_io: ReaderIo,
    records: u64,
    last_offset: u64,
    /// `rstmdb_wal_fsync_duration_seconds`: how long each `fdatasync` (or
    /// each O_DSYNC write, which is the sync)
    /// took (a no-op handle when no metrics recorder is installed).
    fsync_seconds: metrics::Histogram,
}

impl WalWriter<Disk> {
    /// Opens the writer where recovery left the log, on the real disk.
    /// Must run inside a glommio executor.
    pub async fn open(cfg: WriterConfig, recovered: &Recovered) -> Result<WalWriter, WalError> {
        warn_if_no_direct_io(&cfg.dir);
        WalWriter::open_on(Disk, cfg, recovered).await
    }
}

impl<S: Storage> WalWriter<S> {
    /// Opens the writer where recovery left the log, on `storage`. Must
    /// run inside a glommio executor.
    pub async fn open_on(
        storage: S,
        cfg: WriterConfig,
        recovered: &Recovered,
    ) -> Result<WalWriter<S>, WalError> {
        assert!(cfg.segment_size >= 2 * BLOCK && cfg.segment_size.is_multiple_of(BLOCK));
        let mut segments: Vec<SegmentInfo> = (0..recovered.segments.len())
            .map(|i| SegmentInfo {
                id: recovered.segments[i],
                used: recovered.used_bytes[i],
                first_offset: recovered.first_offsets[i],
                start: BLOCK,
            })
            .collect();
        let (seg_id, write_pos) = match recovered.resume {
            Some(r) => r,
            None => {
                create(&storage, &cfg, 1).wait().await?;
                segments.push(SegmentInfo {
                    id: 1,
                    used: BLOCK,
                    first_offset: 0,
                    start: BLOCK,
                });
                (1, BLOCK)
            }
        };
        assert_eq!(write_pos % BLOCK, 0);
        let file = open_segment(
            &storage,
            &cfg.dir.join(segment::file_name(seg_id)),
            cfg.mode,
        )
        .await?;
        let mut w = WalWriter {
            storage,
            cfg,
            file,
            seg_id,
            write_pos,
            staging: Vec::with_capacity(1 << 16),
            record_ends: Vec::new(),
            index: {
                let mut ix = recovered.indexes.clone();
                ix.resize(segments.len(), Vec::new());
                ix
            },
            segments,
            next_segment: None,
            unsynced: false,
            synced_pos: write_pos,
            poisoned: None,
            stats: IoStats {
                bytes_read: recovered.bytes_read,
                reads: recovered.reads,
                ..IoStats::default()
            },
            reader_io: ReaderIo::default(),
            records: recovered.records,
            last_offset: recovered.last_offset,
            fsync_seconds: metrics::histogram!(FSYNC_SECONDS),
        };
        w.prepare_next();
        Ok(w)
    }

    /// Stages one record for the next commit. Offsets must strictly increase.
    pub fn stage(&mut self, offset: u64, kind: u8, payload: &[u8]) -> Result<(), WalError> {
        assert!(
            kind != 0 && kind != REPAIR_KIND,
            "record kind {kind} is reserved"
        );
        assert!(
            offset > self.last_offset,
            "WAL offsets must increase: {offset} after {}",
            self.last_offset
        );
        if payload.len() > MAX_RECORD_PAYLOAD {
            return Err(WalError::RecordTooLarge(payload.len()));
        }
        record::encode(&mut self.staging, offset, kind, payload);
        self.record_ends.push(self.staging.len());
        self.last_offset = offset;
        Ok(())
    }

    /// Number of records staged and not yet committed.
    pub fn staged(&self) -> usize {
        self.record_ends.len()
    }

    /// Drops every staged record (the caller rolled back their effects).
    /// The offsets they carried are simply never used.
    pub fn discard_staged(&mut self) {
        self.staging.clear();
        self.record_ends.clear();
    }

    /// Writes every staged record (one aligned write per segment touched)
    /// and, if `sync`, makes them durable with one `fdatasync`.
    pub async fn commit(&mut self, sync: bool) -> Result<(), WalError> {
        if let Some(why) = self.poisoned.clone() {
            self.discard_staged();
            return Err(self.poison_error(why));
        }
        if self.staging.is_empty() {
            return if sync { self.sync().await } else { Ok(()) };
        }
        let chunks = self.plan();
        // Create every segment this commit needs before writing anything.
        let rotations = chunks.len() - 1;
        let mut new_files = Vec::with_capacity(rotations);
        for i in 0..rotations {
            match self.take_next_segment(self.seg_id + 1 + i as u64).await {
                Ok(f) => new_files.push(f),
                Err(e) => {
                    self.discard_staged();
                    return Err(e);
                }
            }
        }
        let staging = std::mem::take(&mut self.staging);
        let mut new_files = new_files.into_iter();
        let mut result = Ok(());
        for (i, &(start, end)) in chunks.iter().enumerate() {
            if i > 0 {
                if let Err(e) = self
                    .switch_to(new_files.next().expect("planned segment"))
                    .await
                {
                    result = Err(e);
                    break;
                }
            }
            if start == end {
                continue;
            }
            if let Err(e) = self.write_block(&staging[start..end]).await {
                result = Err(e);
                break;
            }
        }
        self.staging = staging;
        if rotations > 0 && self.next_segment.is_none() {
            self.prepare_next();
        }
        if result.is_ok() && sync {
            result = self.sync().await;
        }
        if result.is_ok() {
            self.records += self.record_ends.len() as u64;
        }
        self.discard_staged();
        result
    }

    /// `fdatasync` if anything was written since the last one.
    pub async fn sync(&mut self) -> Result<(), WalError> {
        if !self.unsynced {
            return Ok(());
        }
        if let Some(why) = &self.poisoned {
            return Err(self.poison_error(why.clone()));
        }
        self.stats.fsyncs += 1;
        let started = std::time::Instant::now();
        match self.file.sync().await {
            Ok(()) => {
                self.fsync_seconds.record(started.elapsed().as_secs_f64());
                self.unsynced = false;
                // Synced blocks are never written again: the next commit
                // starts in a fresh block (the rest of this one stays zero).
                self.seal_block();
                self.synced_pos = self.write_pos;
                Ok(())
            }
            Err(e) => Err(self.poison("fdatasync", e)),
        }
    }

    /// Syncs, waits for the background segment creation (so no work is left
    /// running in the blocking pool when the executor stops) and closes the
    /// current segment.
    pub async fn close(mut self) -> Result<(), WalError> {
        let synced = self.sync().await;
        if let Some(pending) = self.next_segment.take() {
            if let Err(e) = pending.wait().await {
                tracing::warn!(error = %e, "preparing the next WAL segment failed");
            }
        }
        self.file.close().await;
        synced
    }

    /// Whether a failed write or sync made the writer refuse every later
    /// commit (until a restart recovers the truth from the disk).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Whether written data awaits an `fdatasync`.
    pub fn is_dirty(&self) -> bool {
        self.unsynced
    }

    /// I/O counters: the writer's own, recovery's reads, and those of the
    /// readers that reported through [`WalWriter::reader_io`].
    pub fn io_stats(&self) -> IoStats {
        let (bytes_read, reads) = self.reader_io.0.get();
        IoStats {
            bytes_read: self.stats.bytes_read + bytes_read,
            reads: self.stats.reads + reads,
            ..self.stats
        }
    }

    /// A handle through which reads of this log done elsewhere (a reader on
    /// a blocking thread, see [`crate::read`]) are counted in `io_stats`.
    pub fn reader_io(&self) -> ReaderIo {
        self.reader_io.clone()
    }

    /// (segment id, bytes used) of every segment, ascending.
    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    /// The segments a reader wanting records from offset `from` must scan,
    /// each with the position to start at (a commit boundary at or before
    /// the first wanted record).
    pub fn read_plan(&self, from: u64) -> Vec<SegmentInfo> {
        let mut plan = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let next_first = self.segments.get(i + 1).map_or(0, |s| s.first_offset);
            if next_first != 0 && next_first <= from {
                continue; // wholly before `from`
            }
            let mut s = *seg;
            if plan.is_empty() {
                let ix = &self.index[i];
                let k = ix.partition_point(|&(o, _)| o <= from);
                if k > 0 {
                    s.start = ix[k - 1].1;
                }
            }
            plan.push(s);
        }
        plan
    }

    /// Takes the oldest segments whose every record lies below `floor` out
    /// of the log (never the current segment), stopping at the first one
    /// `may_drop` refuses; returns their paths, oldest first, for the caller
    /// to delete (in that order, so a crash leaves a contiguous suffix).
    /// Readers planned before this call may still hold them: deleting is
    /// the caller's business, after everything that needed them moved on.
    pub fn detach_segments_below(
        &mut self,
        floor: u64,
        mut may_drop: impl FnMut(&std::path::Path) -> bool,
    ) -> Vec<PathBuf> {
        let mut out = Vec::new();
        while self.segments.len() > 1 && self.segments[0].id != self.seg_id {
            let below = match self.segments[1].first_offset {
                0 => self.last_offset < floor,
                next_first => next_first <= floor,
            };
            let path = self.cfg.dir.join(segment::file_name(self.segments[0].id));
            if !below || !may_drop(&path) {
                break;
            }
            self.segments.remove(0);
            self.index.remove(0);
            out.push(path);
        }
        out
    }

    /// Starts the log afresh below `next`: a new segment becomes the
    /// current one and every older segment is taken out of the log
    /// (returned, oldest first, for the caller to retire before anything is
    /// written to the new one). For a cluster replica whose state a
    /// leader's snapshot replaced: the records it held are no longer a
    /// prefix of the history, and recovery must not mistake them for one.
    /// The next record staged must be at or above `next`.
    pub async fn restart_at(&mut self, next: u64) -> Result<Vec<PathBuf>, WalError> {
        assert!(
            self.record_ends.is_empty(),
            "nothing staged across a restart"
        );
        assert!(
            next > self.last_offset,
            "the log restarts above its last record ({} >= {next})",
            self.last_offset
        );
        if let Some(why) = self.poisoned.clone() {
            return Err(self.poison_error(why));
        }
        let file = self.take_next_segment(self.seg_id + 1).await?;
        self.switch_to(file).await?;
        self.prepare_next();
        self.last_offset = next - 1;
        let old = self.segments.len() - 1;
        self.index.drain(..old);
        let paths = self
            .segments
            .drain(..old)
            .map(|s| self.cfg.dir.join(segment::file_name(s.id)))
            .collect();
        debug_assert_eq!(self.segments.len(), 1);
        Ok(paths)
    }

    /// The lowest offset from which every record is still in the log: 0
    /// while no segment was ever removed (the log starts at segment 1),
    /// else the first offset of the oldest segment (`None` if that one
    /// holds no record yet: everything before it is gone).
    pub fn retained_from(&self) -> Option<u64> {
        match self.segments.first() {
            Some(s) if s.id == 1 => Some(0),
            Some(s) if s.first_offset != 0 => Some(s.first_offset),
            _ => None,
        }
    }

    /// Size of a full segment file on disk.
    pub fn segment_size(&self) -> u64 {
        self.cfg.segment_size
    }

    /// Bytes of log in use across all segments.
    pub fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.used).sum()
    }

    /// Sets the count of records written over the life of the log (when
    /// compaction removed some, recovery knows the total from the
    /// snapshot).
    pub fn set_records(&mut self, total: u64) {
        self.records = total;
    }

    /// Records written over the life of this log (replayed + committed).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Highest offset staged or written.
    pub fn last_offset(&self) -> u64 {
        self.last_offset
    }

    /// Splits the staged bytes into chunks at record boundaries: the first
    /// goes to the current segment (it may be empty when nothing fits
    /// there), each later one to a fresh segment.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut chunks = Vec::new();
        let mut pos = self.write_pos;
        let mut start = 0usize;
        let mut end = 0usize;
        for &rec_end in &self.record_ends {
            let fits = pos + align_up((rec_end - start) as u64) <= self.cfg.segment_size;
            // An oversized record alone in a fresh segment is allowed to
            // extend that segment.
            let alone_in_fresh = pos == BLOCK && end == start;
            if !fits && !alone_in_fresh {
                chunks.push((start, end));
                start = end;
                pos = BLOCK;
            }
            end = rec_end;
        }
        chunks.push((start, end));
        chunks
    }

    /// Whether commits are packed: page-cache writes need no alignment, and
    /// padding every commit to a block would make the kernel write back
    /// 4 KiB per small commit (measured: ~48 MB/s of dirty pages for one
    /// client applying events one at a time, and the writeback throttling
    /// that came with it). Only unsynced bytes share a block, so a torn
    /// write of a shared block never damages synced data.
    fn packs(&self) -> bool {
        self.cfg.mode == WriteMode::PageCache
    }

    /// Moves the write position to the next block boundary.
    fn seal_block(&mut self) {
        self.write_pos = align_up(self.write_pos);
        let last = self.segments.last_mut().expect("current segment");
        last.used = last.used.max(self.write_pos);
    }

    /// Writes `data` (whole records) at the current position — padded to
    /// whole blocks unless commits are packed — its first record marked as
    /// a commit start.
    async fn write_block(&mut self, data: &[u8]) -> Result<(), WalError> {
        let len = if self.packs() {
            data.len()
        } else {
            align_up(data.len() as u64) as usize
        };
        debug_assert!(self.packs() || self.write_pos.is_multiple_of(BLOCK));
        let synced_pos = self.synced_pos;
        self.stats.writes += 1;
        self.stats.bytes_written += len as u64;
        self.unsynced = true;
        let started = std::time::Instant::now();
        let written = self
            .file
            .write_block(self.write_pos, len, |bytes| {
                bytes[..data.len()].copy_from_slice(data);
                record::mark_commit_start(&mut bytes[..data.len()], synced_pos);
            })
            .await;
        match written {
            Ok(n) if n == len => {
                let at = self.write_pos;
                self.write_pos += len as u64;
                if self.file.durable_writes() {
                    // The write was the sync (O_DSYNC): counted and timed
                    // as one.
                    self.stats.fsyncs += 1;
                    self.fsync_seconds.record(started.elapsed().as_secs_f64());
                    self.unsynced = false;
                    self.synced_pos = self.write_pos;
                }
                let first = u64::from_le_bytes(data[8..16].try_into().expect("record header"));
                let last = self.segments.last_mut().expect("current segment");
                assert_eq!(last.id, self.seg_id);
                last.used = self.write_pos;
                if last.first_offset == 0 {
                    last.first_offset = first;
                }
                let ix = self.index.last_mut().expect("index per segment");
                if ix.last().is_none_or(|&(_, p)| at - p >= INDEX_EVERY) {
                    ix.push((first, at));
                }
                Ok(())
            }
            Ok(n) => Err(self.poison(
                "write",
                std::io::Error::other(format!("short write: {n} of {len} bytes")),
            )),
            Err(e) => Err(self.poison("write", e)),
        }
    }

    /// Closes the current segment (synced) and continues in `next`.
    async fn switch_to(&mut self, next: S::Segment) -> Result<(), WalError> {
        self.sync().await?;
        let old = std::mem::replace(&mut self.file, next);
        old.close().await;
        self.seg_id += 1;
        self.write_pos = BLOCK;
        // The header block was synced when the segment was created.
        self.synced_pos = BLOCK;
        self.segments.push(SegmentInfo {
            id: self.seg_id,
            used: BLOCK,
            first_offset: 0,
            start: BLOCK,
        });
        self.index.push(Vec::new());
        Ok(())
    }

    /// Starts creating segment `seg_id + 1` in the background.
    fn prepare_next(&mut self) {
        self.next_segment = Some(create(&self.storage, &self.cfg, self.seg_id + 1));
    }

    /// Returns segment `id`, opened: the one prepared in the background when
    /// it is the next one (retrying its creation once, as the background
    /// attempt may have failed for a passing reason such as a full disk),
    /// else created now (a commit spanning several segments).
    async fn take_next_segment(&mut self, id: u64) -> Result<S::Segment, WalError> {
        let pending = if id == self.seg_id + 1 {
            self.next_segment.take()
        } else {
            None
        };
        let created = match pending {
            Some(p) => p.wait().await,
            None => create(&self.storage, &self.cfg, id).wait().await,
        };
        let path = match created {
            Ok(p) => p,
            Err(first) => {
                tracing::warn!(error = %first, "creating WAL segment {id} failed; retrying");
                match create(&self.storage, &self.cfg, id).wait().await {
                    Ok(p) => p,
                    Err(e) => {
                        if self.next_segment.is_none() {
                            self.prepare_next();
                        }
                        return Err(e);
                    }
                }
            }
        };
        open_segment(&self.storage, &path, self.cfg.mode).await
    }

    fn poison(&mut self, op: &'static str, e: std::io::Error) -> WalError {
        let path = self.cfg.dir.join(segment::file_name(self.seg_id));
        let err = WalError::io(op, path, e);
        tracing::error!(error = %err, "WAL write failed; refusing further writes until restart");
        self.poisoned = Some(err.to_string());
        err
    }

    fn poison_error(&self, why: String) -> WalError {
        WalError::io(
            "refusing write after an earlier failure (restart to recover)",
            self.cfg.dir.clone(),
            std::io::Error::other(why),
        )
    }
}

/// Creates segment `id` (see [`segment::create_on`]): in glommio's
/// blocking pool for the real disk, inline for a storage that asks so.
fn create<S: Storage>(storage: &S, cfg: &WriterConfig, id: u64) -> Pending {
    let (storage, dir, shard, size) = (
        storage.clone(),
        cfg.dir.clone(),
        cfg.shard,
        cfg.segment_size,
    );
    if !storage.create_in_background() {
        return Pending::Done(segment::create_on(&storage, &dir, shard, id, size));
    }
    Pending::Task(glommio::spawn_local(async move {
        glommio::executor()
            .spawn_blocking(move || segment::create_on(&storage, &dir, shard, id, size))
            .await
    }))
}

async fn open_segment<S: Storage>(
    storage: &S,
    path: &Path,
    mode: WriteMode,
) -> Result<S::Segment, WalError> {
    let what = match mode {
        WriteMode::DirectSync => "opening segment (O_DIRECT|O_DSYNC)",
        WriteMode::PageCache => "opening segment",
    };
    storage
        .open_segment(path, mode)
        .await
        .map_err(|e| WalError::io(what, path, e))
}

/// glommio silently drops O_DIRECT on tmpfs: say so, since the WAL is then
/// a buffered file (still fdatasync'ed, but not what the design promises).
fn warn_if_no_direct_io(dir: &std::path::Path) {
    if crate::is_tmpfs(dir) {
        tracing::warn!(dir = %dir.display(), "WAL on tmpfs: O_DIRECT unavailable, using buffered I/O fallback");
    }
}

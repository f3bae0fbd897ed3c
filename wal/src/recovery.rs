//! Start-up recovery: replay every record of a shard's WAL in order, repair a
//! torn tail, refuse real corruption.
//!
//! Rules (DESIGN.md, DECISIONS D14):
//! * Records are replayed in segment order, then file order; offsets must
//!   strictly increase.
//! * An invalid record in the **newest** segment with no valid record after
//!   it is a torn tail (a write interrupted by a crash; never acknowledged):
//!   the log ends there. If the torn bytes share a block with acknowledged
//!   records, that block is not rewritten: a *repair record* naming the
//!   torn position is written at the next block boundary, so later scans know
//!   the bytes in between are dead. All bytes after the resume point are then
//!   zeroed (they hold only unacknowledged data) and the segment is extended
//!   back to its full size.
//! * An invalid record anywhere else (an older segment, or followed by a
//!   valid record that is not the matching repair record) is corruption:
//!   recovery fails naming the file and byte position. Nothing is skipped.

use std::path::{Path, PathBuf};

use crate::record::{self, Decoded, RecordRef};
use crate::segment::{self, align_up, BLOCK};
use crate::storage::{Disk, Storage};
use crate::{WalError, REPAIR_KIND};

/// What recovery needs to know.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// The shard's WAL directory (created if missing).
    pub dir: PathBuf,
    /// Shard number, checked against segment headers.
    pub shard: u32,
    /// Full size of a segment in bytes (multiple of 4096).
    pub segment_size: u64,
    /// Scan only: create, remove, repair or extend nothing (the offline
    /// `wal verify` / `wal dump` tools, which may run beside a server).
    /// A torn tail is still reported in [`Recovered::torn`].
    pub read_only: bool,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Segment file.
    pub path: PathBuf,
    /// Byte position where the invalid data started.
    pub position: u64,
    /// Why the bytes there were not a record.
    pub reason: String,
}

/// The state of the log after recovery, handed to the writer.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Segment ids present, ascending.
    pub segments: Vec<u64>,
    /// Bytes in use per segment (position after its last block of data),
    /// same order as `segments`.
    pub used_bytes: Vec<u64>,
    /// Offset of the first record of each segment (0 when it has none), same
    /// order as `segments`.
    pub first_offsets: Vec<u64>,
    /// Sparse index of commit starts per segment (see the writer).
    pub indexes: Vec<Vec<(u64, u64)>>,
    /// Highest record offset seen (0 when the log is empty).
    pub last_offset: u64,
    /// Number of records replayed.
    pub records: u64,
    /// Where the next write goes: (segment id, block-aligned position).
    pub resume: Option<(u64, u64)>,
    /// Set when a torn tail was cut off.
    pub torn: Option<TornTail>,
    /// Bytes read during recovery.
    pub bytes_read: u64,
    /// Read calls made during recovery.
    pub reads: u64,
}

/// How the scan of one segment ended.
enum ScanEnd {
    /// Log data ends cleanly at `end` (first unused byte).
    Clean { end: u64 },
    /// Invalid bytes at `pos` with no valid record after them.
    Torn { pos: u64, reason: String },
}

/// Replays the WAL in `opts.dir`, calling `visit` for every record in order.
/// A visitor error stops recovery (the record passed its CRC, so a payload
/// the caller cannot apply is a bug or corruption, never something to skip).
pub fn recover<F>(opts: &RecoveryOptions, visit: F) -> Result<Recovered, WalError>
where
    F: FnMut(RecordRef<'_>) -> Result<(), String>,
{
    recover_on(&Disk, opts, visit)
}

/// [`recover`] on any [`Storage`]: a page of steps, in the order they always
/// ran.
pub fn recover_on<S, F>(
    storage: &S,
    opts: &RecoveryOptions,
    mut visit: F,
) -> Result<Recovered, WalError>
where
    S: Storage,
    F: FnMut(RecordRef<'_>) -> Result<(), String>,
{
    assert!(opts.segment_size >= 2 * BLOCK && opts.segment_size.is_multiple_of(BLOCK));
    let run = Recovery { storage, opts };
    if !opts.read_only {
        run.create_dir()?;
    }
    let ids = run.list_segments()?;
    let mut out = Recovered {
        segments: ids.clone(),
        ..Recovered::default()
    };
    for (i, &id) in ids.iter().enumerate() {
        let newest = i + 1 == ids.len();
        run.recover_segment(id, newest, &mut out, &mut visit)?;
    }
    Ok(out)
}

/// One recovery's storage and options, shared by its steps.
struct Recovery<'a, S> {
    storage: &'a S,
    opts: &'a RecoveryOptions,
}

impl<S: Storage> Recovery<'_, S> {
    /// Creates the WAL directory and makes its entry durable (the directory
    /// and its parent synced).
    fn create_dir(&self) -> Result<(), WalError> {
        let dir = &self.opts.dir;
        self.storage
            .create_dir_all(dir)
            .map_err(|e| WalError::io("creating WAL directory", dir, e))?;
        self.sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            self.sync_dir(parent)?;
        }
        Ok(())
    }

    /// Syncs a directory, naming it on failure.
    fn sync_dir(&self, dir: &Path) -> Result<(), WalError> {
        self.storage
            .sync_dir(dir)
            .map_err(|e| WalError::io("syncing directory", dir, e))
    }

    /// The segment ids to replay, ascending: none may be missing between
    /// the first and the last, and trailing empty ones are dropped.
    fn list_segments(&self) -> Result<Vec<u64>, WalError> {
        let opts = self.opts;
        let mut ids = segment::list_on(self.storage, &opts.dir, !opts.read_only)?;
        for pair in ids.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(WalError::BadSegment {
                    path: opts.dir.join(segment::file_name(pair[0] + 1)),
                    reason: format!("segment missing between {} and {}", pair[0], pair[1]),
                });
            }
        }
        drop_trailing_empty_segments(self.storage, opts, &mut ids)?;
        Ok(ids)
    }

    /// Replays segment `id` and adds what the writer needs to know about it
    /// to `out`; the newest segment is also made ready for appends.
    fn recover_segment<F>(
        &self,
        id: u64,
        newest: bool,
        out: &mut Recovered,
        visit: &mut F,
    ) -> Result<(), WalError>
    where
        F: FnMut(RecordRef<'_>) -> Result<(), String>,
    {
        let path = self.opts.dir.join(segment::file_name(id));
        let buf = self.read_segment(id, &path, out)?;
        let (end, first_offset) = replay(&buf, &path, out, visit)?;
        out.first_offsets.push(first_offset);
        out.indexes.push(index_of(&buf));
        let used = self.settle_end(id, path, &buf, end, newest, out)?;
        out.used_bytes.push(used);
        Ok(())
    }

    /// Reads a whole segment (counted in `out`) and checks its header.
    fn read_segment(&self, id: u64, path: &Path, out: &mut Recovered) -> Result<Vec<u8>, WalError> {
        let buf = self
            .storage
            .read(path)
            .map_err(|e| WalError::io("reading segment", path, e))?;
        out.bytes_read += buf.len() as u64;
        out.reads += 1;
        segment::check_header(&buf, self.opts.shard, id).map_err(|reason| {
            WalError::BadSegment {
                path: path.to_path_buf(),
                reason,
            }
        })?;
        Ok(buf)
    }

    /// Decides what the end of a scanned segment means and returns the bytes
    /// it uses: a clean end, a torn tail cut off the newest segment, or
    /// corruption anywhere else.
    fn settle_end(
        &self,
        id: u64,
        path: PathBuf,
        buf: &[u8],
        end: ScanEnd,
        newest: bool,
        out: &mut Recovered,
    ) -> Result<u64, WalError> {
        match end {
            ScanEnd::Clean { end } => {
                let resume = align_up(end);
                if newest {
                    self.finish(&path, buf, resume, None)?;
                    out.resume = Some((id, resume));
                }
                Ok(resume)
            }
            // Rotation syncs a segment before the next one gets a record, so
            // an older segment cannot hold a torn write.
            ScanEnd::Torn { pos, reason } if !newest => Err(WalError::Corrupt {
                path,
                position: pos,
                reason,
            }),
            ScanEnd::Torn { pos, reason } => self.cut_torn_tail(id, path, buf, pos, reason, out),
        }
    }

    /// Cuts the torn tail at `pos` off the newest segment and returns where
    /// appends resume: at `pos` on a block boundary, else after a repair
    /// record at the next one (the block holding `pos` is not rewritten).
    fn cut_torn_tail(
        &self,
        id: u64,
        path: PathBuf,
        buf: &[u8],
        pos: u64,
        reason: String,
        out: &mut Recovered,
    ) -> Result<u64, WalError> {
        let resume = if pos.is_multiple_of(BLOCK) {
            self.finish(&path, buf, pos, None)?;
            pos
        } else {
            let repair_at = align_up(pos);
            let repair = Some((repair_at, pos, out.last_offset));
            self.finish(&path, buf, repair_at + BLOCK, repair)?;
            repair_at + BLOCK
        };
        if !self.opts.read_only {
            tracing::warn!(file = %path.display(), position = pos, %reason, "WAL torn tail cut off");
        }
        out.torn = Some(TornTail {
            path,
            position: pos,
            reason,
        });
        out.resume = Some((id, resume));
        Ok(resume)
    }

    /// Every change to the files goes through this one gate: a read-only
    /// recovery changes nothing.
    fn finish(
        &self,
        path: &Path,
        buf: &[u8],
        resume: u64,
        repair: Option<(u64, u64, u64)>,
    ) -> Result<(), WalError> {
        if self.opts.read_only {
            Ok(())
        } else {
            finish_newest(
                self.storage,
                path,
                buf,
                resume,
                repair,
                self.opts.segment_size,
            )
        }
    }
}

/// Scans one segment, passing its records to `visit`; returns how the scan
/// ended and the offset of the segment's first record (0 when it has none).
fn replay<F>(
    buf: &[u8],
    path: &Path,
    out: &mut Recovered,
    visit: &mut F,
) -> Result<(ScanEnd, u64), WalError>
where
    F: FnMut(RecordRef<'_>) -> Result<(), String>,
{
    let records_before = out.records;
    let mut first_offset = 0;
    let end = scan(buf, path, out, &mut |r: RecordRef<'_>| {
        if first_offset == 0 {
            first_offset = r.offset;
        }
        visit(r)
    })?;
    debug_assert!(first_offset == 0 || out.records > records_before);
    Ok((end, first_offset))
}

/// Removes segments at the end of the log that hold no record: the writer
/// prepares the next segment ahead of time, so after a crash the newest file
/// is usually empty and the real tail (possibly torn) is in the one before.
/// Keeps at least one segment.
fn drop_trailing_empty_segments<S: Storage>(
    storage: &S,
    opts: &RecoveryOptions,
    ids: &mut Vec<u64>,
) -> Result<(), WalError> {
    let mut removed = false;
    while ids.len() > 1 {
        let id = *ids.last().expect("non-empty");
        let path = opts.dir.join(segment::file_name(id));
        let head = storage
            .read_prefix(&path, 2 * BLOCK as usize)
            .map_err(|e| WalError::io("reading segment", &path, e))?;
        let n = head.len();
        let header_ok =
            segment::check_header(&head[..n.min(BLOCK as usize)], opts.shard, id).is_ok();
        let no_record = n <= BLOCK as usize || head[BLOCK as usize] == 0;
        if !(header_ok && no_record) {
            break;
        }
        if !opts.read_only {
            storage
                .remove(&path)
                .map_err(|e| WalError::io("removing empty segment", &path, e))?;
            removed = true;
        }
        ids.pop();
    }
    if removed {
        storage
            .sync_dir(&opts.dir)
            .map_err(|e| WalError::io("syncing directory", &opts.dir, e))?;
    }
    Ok(())
}

/// Builds the sparse read index of a scanned segment: commit-start records
/// at block boundaries, one every `INDEX_EVERY` bytes.
fn index_of(buf: &[u8]) -> Vec<(u64, u64)> {
    let mut ix: Vec<(u64, u64)> = Vec::new();
    let mut pos = BLOCK;
    while pos + record::HEADER_LEN as u64 <= buf.len() as u64 {
        if ix
            .last()
            .is_none_or(|&(_, p)| pos - p >= crate::writer::INDEX_EVERY)
        {
            if let Decoded::Record(r, meta, _) = record::decode(&buf[pos as usize..]) {
                if meta.commit_start && r.kind != REPAIR_KIND {
                    ix.push((r.offset, pos));
                }
            }
        }
        pos += BLOCK;
    }
    ix
}

/// Scans one segment from its first record.
fn scan<F>(buf: &[u8], path: &Path, out: &mut Recovered, visit: &mut F) -> Result<ScanEnd, WalError>
where
    F: FnMut(RecordRef<'_>) -> Result<(), String>,
{
    let len = buf.len() as u64;
    let mut pos = BLOCK;
    loop {
        if pos >= len {
            return Ok(ScanEnd::Clean { end: len });
        }
        if buf[pos as usize] == 0 {
            if pos.is_multiple_of(BLOCK) {
                return Ok(ScanEnd::Clean { end: pos });
            }
            pos = align_up(pos);
            continue;
        }
        let failure = match record::decode(&buf[pos as usize..]) {
            Decoded::Record(r, _, n) if r.kind == REPAIR_KIND => {
                // Reached in order: the torn bytes before it were zeros.
                pos += n as u64;
                continue;
            }
            Decoded::Record(r, _, n) if r.offset > out.last_offset => {
                visit(r).map_err(|reason| WalError::Replay {
                    path: path.to_path_buf(),
                    position: pos,
                    reason,
                })?;
                out.last_offset = r.offset;
                out.records += 1;
                pos += n as u64;
                continue;
            }
            Decoded::Record(r, _, _) => {
                format!("offset {} does not follow {}", r.offset, out.last_offset)
            }
            Decoded::Invalid(reason) => reason,
        };
        match classify_invalid(buf, pos) {
            Verdict::Repaired(next) => pos = next,
            Verdict::Torn => {
                return Ok(ScanEnd::Torn {
                    pos,
                    reason: failure,
                })
            }
            Verdict::Corrupt => {
                return Err(WalError::Corrupt {
                    path: path.to_path_buf(),
                    position: pos,
                    reason: failure,
                })
            }
        }
    }
}

/// What invalid bytes at a position mean.
enum Verdict {
    /// A repair record for exactly this position follows; continue there.
    Repaired(u64),
    /// Never known durable: a torn tail.
    Torn,
    /// Data that had been made durable is damaged.
    Corrupt,
}

/// Decides about invalid bytes at `pos`.
///
/// A repair record for exactly `pos` at the next block boundary means an
/// earlier recovery already cut a torn tail here: continue after it.
/// Otherwise the evidence is every later record at a block boundary that
/// starts a commit: each commit starts at a boundary and records how much of
/// the segment was durable when it was written (`synced_to`). If any of them
/// covers `pos`, the damaged bytes had been synced: corruption. If none
/// does, they never were (a power loss may persist a later unsynced write and
/// not an earlier one): a torn tail, and everything after it was equally
/// unsynced. Records inside a commit that happen to start at a boundary are
/// not evidence (a large write may land out of order). A repair record for
/// another position counts as a commit synced up to itself (recovery syncs
/// everything before it).
fn classify_invalid(buf: &[u8], pos: u64) -> Verdict {
    let len = buf.len() as u64;
    let first = align_up(pos + 1);
    if first + record::HEADER_LEN as u64 <= len {
        if let Decoded::Record(r, _, n) = record::decode(&buf[first as usize..]) {
            if r.kind == REPAIR_KIND && r.payload == pos.to_le_bytes() {
                return Verdict::Repaired(first + n as u64);
            }
        }
    }
    let mut q = first;
    while q + record::HEADER_LEN as u64 <= len {
        if let Decoded::Record(r, meta, _) = record::decode(&buf[q as usize..]) {
            let synced_to = if r.kind == REPAIR_KIND {
                q
            } else if meta.commit_start {
                meta.synced_to
            } else {
                0
            };
            if synced_to > pos {
                return Verdict::Corrupt;
            }
        }
        q += BLOCK;
    }
    Verdict::Torn
}

/// Makes the newest segment ready for appends at `resume`: optionally writes
/// the repair record `(at, torn_pos, offset)`, zeroes every non-zero byte
/// from `resume` on, restores the full segment size, and syncs (always: the
/// writer treats everything before `resume` as durable).
fn finish_newest<S: Storage>(
    storage: &S,
    path: &Path,
    buf: &[u8],
    resume: u64,
    repair: Option<(u64, u64, u64)>,
    segment_size: u64,
) -> Result<(), WalError> {
    let io = |op, e| WalError::io(op, path, e);
    let len = buf.len() as u64;
    let dirty_end = buf
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| i as u64 + 1)
        .filter(|&e| e > resume);
    let target_len = segment_size.max(align_up(len)).max(resume);
    if let Some((at, torn_pos, offset)) = repair {
        let mut block = Vec::with_capacity(BLOCK as usize);
        record::encode(
            &mut block,
            offset.max(1),
            REPAIR_KIND,
            &torn_pos.to_le_bytes(),
        );
        block.resize(BLOCK as usize, 0);
        storage
            .write_at(path, at, &block)
            .map_err(|e| io("writing repair record", e))?;
    }
    if let Some(end) = dirty_end {
        let zeros = vec![0u8; (end - resume) as usize];
        storage
            .write_at(path, resume, &zeros)
            .map_err(|e| io("zeroing torn tail", e))?;
    }
    if storage.len(path).map_err(|e| io("stat", e))? < target_len {
        storage
            .set_len(path, target_len)
            .map_err(|e| io("extending segment", e))?;
    }
    storage
        .sync_file(path)
        .map_err(|e| io("syncing repaired segment", e))?;
    Ok(())
}

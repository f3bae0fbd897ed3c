//! Reading committed records back (WAL_READ, subscription catch-up) while
//! the writer keeps appending.
//!
//! Only the written part of each segment (`SegmentInfo::used`) is read; that
//! part is never rewritten, so reading it with ordinary buffered I/O next to
//! the O_DIRECT writer is safe. A segment is read from `SegmentInfo::start`
//! (a commit boundary at or before the first wanted record, found through
//! the writer's sparse index) in bounded windows, so a page costs about what
//! it returns, not a whole segment. Blocking: run it on a blocking thread.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::path::Path;

use crate::record::{self, Decoded};
use crate::segment::{self, align_up, BLOCK};
use crate::writer::SegmentInfo;
use crate::{WalError, REPAIR_KIND};

/// Bytes read from a segment at a time (more when a record is larger).
const WINDOW: u64 = 1 << 20;

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// Global offset.
    pub offset: u64,
    /// Kind byte.
    pub kind: u8,
    /// Payload.
    pub payload: Vec<u8>,
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadRange {
    /// First offset wanted (inclusive).
    pub from: u64,
    /// Stop before this offset (the durable watermark).
    pub below: u64,
    /// Most records to return.
    pub limit: usize,
    /// Most payload bytes to return (at least one record is returned if any
    /// qualifies, whatever its size).
    pub max_bytes: usize,
}

/// A page of records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Records in log order.
    pub records: Vec<OwnedRecord>,
    /// Whether a limit cut the page short (more records below `below` may
    /// follow the last one).
    pub truncated: bool,
    /// Bytes read from segment files to produce this page.
    pub bytes_read: u64,
    /// Read calls made to produce this page.
    pub reads: u64,
}

/// A forward-only window over the written part of one segment.
struct SegmentWindow<'a> {
    file: File,
    path: std::path::PathBuf,
    used: u64,
    buf: Vec<u8>,
    buf_start: u64,
    /// The page's (bytes read, read calls), for WAL_STATS `io_stats`.
    io: &'a mut (u64, u64),
}

impl<'a> SegmentWindow<'a> {
    fn open(path: std::path::PathBuf, used: u64, io: &'a mut (u64, u64)) -> Result<Self, WalError> {
        let file = File::open(&path).map_err(|e| WalError::io("opening segment", &path, e))?;
        Ok(SegmentWindow {
            file,
            path,
            used,
            buf: Vec::new(),
            buf_start: 0,
            io,
        })
    }

    /// The bytes from `pos` to at least `pos + want` (fewer at the end of
    /// the written part).
    fn at(&mut self, pos: u64, want: u64) -> Result<&[u8], WalError> {
        let end = (pos + want).min(self.used);
        let have_end = self.buf_start + self.buf.len() as u64;
        if pos < self.buf_start || end > have_end {
            let len = (end - pos).max(WINDOW).min(self.used - pos);
            self.buf.resize(len as usize, 0);
            let io = |e| WalError::io("reading segment", &self.path, e);
            self.file.seek(SeekFrom::Start(pos)).map_err(io)?;
            self.file.read_exact(&mut self.buf).map_err(io)?;
            self.buf_start = pos;
            self.io.0 += len;
            self.io.1 += 1;
        }
        let from = (pos - self.buf_start) as usize;
        Ok(&self.buf[from..])
    }
}

/// Reads records with `from <= offset < below` in log order, within the
/// limits. `segments` is the writer's view (ascending), possibly narrowed by
/// `WalWriter::read_plan`.
pub fn read(dir: &Path, segments: &[SegmentInfo], range: ReadRange) -> Result<Page, WalError> {
    let mut io = (0u64, 0u64);
    let mut page = read_counting(dir, segments, range, &mut io)?;
    (page.bytes_read, page.reads) = io;
    Ok(page)
}

/// [`read`], adding the bytes and calls of every segment window it used to
/// `io` as it goes.
fn read_counting(
    dir: &Path,
    segments: &[SegmentInfo],
    range: ReadRange,
    io: &mut (u64, u64),
) -> Result<Page, WalError> {
    let mut page = PageBuilder::new(range);
    if range.limit == 0 || range.from >= range.below {
        return Ok(page.finish(range.limit == 0));
    }
    for seg in &segments[first_wanted(segments, range.from)..] {
        if seg.first_offset == 0 {
            continue;
        }
        if seg.first_offset >= range.below {
            return Ok(page.finish(false));
        }
        if let ControlFlow::Break(truncated) = read_segment(dir, seg, io, &mut page)? {
            return Ok(page.finish(truncated));
        }
    }
    Ok(page.finish(false))
}

/// The index of the first segment that may hold `from`: segments whose
/// successor starts at or before it are wholly before it.
fn first_wanted(segments: &[SegmentInfo], from: u64) -> usize {
    let mut first = 0;
    for i in 0..segments.len() {
        let next_first = segments.get(i + 1).map_or(0, |s| s.first_offset);
        if next_first != 0 && next_first <= from {
            first = i + 1;
        }
    }
    first
}

/// Reads one segment's records from `SegmentInfo::start` into `page`;
/// `Break(truncated)` once the page is complete.
fn read_segment(
    dir: &Path,
    seg: &SegmentInfo,
    io: &mut (u64, u64),
    page: &mut PageBuilder,
) -> Result<ControlFlow<bool>, WalError> {
    let mut w = SegmentWindow::open(dir.join(segment::file_name(seg.id)), seg.used, io)?;
    let mut pos = seg.start.max(BLOCK);
    while pos < seg.used {
        let head = w.at(pos, record::HEADER_LEN as u64)?;
        if head[0] == 0 {
            if pos.is_multiple_of(BLOCK) {
                break;
            }
            pos = align_up(pos);
            continue;
        }
        let len = payload_len(head);
        match record::decode(w.at(pos, record::HEADER_LEN as u64 + len)?) {
            Decoded::Record(r, _, n) => {
                if let ControlFlow::Break(truncated) = page.offer(r) {
                    return Ok(ControlFlow::Break(truncated));
                }
                pos += n as u64;
            }
            Decoded::Invalid(reason) => pos = skip_repaired(&mut w, pos, reason)?,
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// The payload length a record header declares (0 when the header is cut
/// short: decoding then says why).
fn payload_len(head: &[u8]) -> u64 {
    if head.len() >= 8 {
        u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as u64
    } else {
        0
    }
}

/// Invalid bytes at `pos` are only acceptable where a recovery cut them off:
/// their repair record follows at the next block boundary, where reading
/// goes on. Anything else is corruption.
fn skip_repaired(w: &mut SegmentWindow<'_>, pos: u64, reason: String) -> Result<u64, WalError> {
    let next = align_up(pos + 1);
    let repaired = next + (record::HEADER_LEN as u64) <= w.used && {
        let after = w.at(next, record::HEADER_LEN as u64 + 8)?;
        matches!(record::decode(after),
        Decoded::Record(r, _, _) if r.kind == REPAIR_KIND && r.payload == pos.to_le_bytes())
    };
    if !repaired {
        return Err(WalError::Corrupt {
            path: w.path.clone(),
            position: pos,
            reason,
        });
    }
    Ok(next)
}

/// The records of a page so far, held against the range's limits.
struct PageBuilder {
    range: ReadRange,
    records: Vec<OwnedRecord>,
    bytes: usize,
}

impl PageBuilder {
    /// An empty page for `range`.
    fn new(range: ReadRange) -> Self {
        PageBuilder {
            range,
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Takes the next record in log order if the page wants it;
    /// `Break(truncated)` once the page is complete.
    fn offer(&mut self, r: record::RecordRef<'_>) -> ControlFlow<bool> {
        let range = self.range;
        if r.kind == REPAIR_KIND || r.offset < range.from {
            return ControlFlow::Continue(());
        }
        if r.offset >= range.below {
            return ControlFlow::Break(false);
        }
        if !self.records.is_empty() && self.bytes + r.payload.len() > range.max_bytes {
            return ControlFlow::Break(true);
        }
        self.bytes += r.payload.len();
        self.records.push(OwnedRecord {
            offset: r.offset,
            kind: r.kind,
            payload: r.payload.to_vec(),
        });
        if self.records.len() >= range.limit {
            ControlFlow::Break(true)
        } else {
            ControlFlow::Continue(())
        }
    }

    /// The page; `truncated` when a limit cut it short.
    fn finish(self, truncated: bool) -> Page {
        Page {
            records: self.records,
            truncated,
            ..Page::default()
        }
    }
}

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
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let page = |records, truncated| {
        Ok(Page {
            records,
            truncated,
            ..Page::default()
        })
    };
    if range.limit == 0 || range.from >= range.below {
        return page(out, range.limit == 0);
    }
    // Skip segments wholly before `from`: those whose successor starts at or
    // before it.
    let mut first = 0;
    for i in 0..segments.len() {
        let next_first = segments.get(i + 1).map_or(0, |s| s.first_offset);
        if next_first != 0 && next_first <= range.from {
            first = i + 1;
        }
    }
    for seg in &segments[first..] {
        if seg.first_offset == 0 {
            continue;
        }
        if seg.first_offset >= range.below {
            return page(out, false);
        }
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
            let len = if head.len() >= 8 {
                u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as u64
            } else {
                0
            };
            let rec = w.at(pos, record::HEADER_LEN as u64 + len)?;
            match record::decode(rec) {
                Decoded::Record(r, _, n) => {
                    if r.kind == REPAIR_KIND || r.offset < range.from {
                        pos += n as u64;
                        continue;
                    }
                    if r.offset >= range.below {
                        return page(out, false);
                    }
                    if !out.is_empty() && bytes + r.payload.len() > range.max_bytes {
                        return page(out, true);
                    }
                    bytes += r.payload.len();
                    out.push(OwnedRecord {
                        offset: r.offset,
                        kind: r.kind,
                        payload: r.payload.to_vec(),
                    });
                    pos += n as u64;
                    if out.len() >= range.limit {
                        return page(out, true);
                    }
                }
                Decoded::Invalid(reason) => {
                    // Bytes cut off by a recovery are followed by their
                    // repair record at the next block boundary.
                    let next = align_up(pos + 1);
                    let repaired = next + (record::HEADER_LEN as u64) <= seg.used
                        && {
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
                    pos = next;
                }
            }
        }
    }
    page(out, false)
}

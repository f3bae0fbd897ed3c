//! Reading committed records back (WAL_READ, subscription catch-up) while
//! the writer keeps appending.
//!
//! Only the written part of each segment (`SegmentInfo::used`) is read; that
//! part is never rewritten, so reading it with ordinary buffered I/O next to
//! the O_DIRECT writer is safe. Blocking: run it on a blocking thread.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::record::{self, Decoded};
use crate::segment::{self, align_up, BLOCK};
use crate::writer::SegmentInfo;
use crate::{WalError, REPAIR_KIND};

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
}

/// Reads records with `from <= offset < below` in log order, within the
/// limits. `segments` is the writer's view (ascending).
pub fn read(dir: &Path, segments: &[SegmentInfo], range: ReadRange) -> Result<Page, WalError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    if range.limit == 0 || range.from >= range.below {
        return Ok(Page {
            records: out,
            truncated: range.limit == 0,
        });
    }
    // Skip segments wholly before `from`: those whose successor starts at or
    // before it.
    let mut start = 0;
    for i in 0..segments.len() {
        let next_first = segments.get(i + 1).map_or(0, |s| s.first_offset);
        if next_first != 0 && next_first <= range.from {
            start = i + 1;
        }
    }
    for seg in &segments[start..] {
        if seg.first_offset == 0 || seg.first_offset >= range.below {
            if seg.first_offset >= range.below && seg.first_offset != 0 {
                return Ok(Page {
                    records: out,
                    truncated: false,
                });
            }
            continue;
        }
        let path = dir.join(segment::file_name(seg.id));
        let buf = read_used(&path, seg.used)?;
        let mut pos = BLOCK;
        let len = buf.len() as u64;
        while pos < len {
            if buf[pos as usize] == 0 {
                if pos.is_multiple_of(BLOCK) {
                    break;
                }
                pos = align_up(pos);
                continue;
            }
            match record::decode(&buf[pos as usize..]) {
                Decoded::Record(r, _, n) => {
                    pos += n as u64;
                    if r.kind == REPAIR_KIND || r.offset < range.from {
                        continue;
                    }
                    if r.offset >= range.below {
                        return Ok(Page {
                            records: out,
                            truncated: false,
                        });
                    }
                    if !out.is_empty() && bytes + r.payload.len() > range.max_bytes {
                        return Ok(Page {
                            records: out,
                            truncated: true,
                        });
                    }
                    bytes += r.payload.len();
                    out.push(OwnedRecord {
                        offset: r.offset,
                        kind: r.kind,
                        payload: r.payload.to_vec(),
                    });
                    if out.len() >= range.limit {
                        return Ok(Page {
                            records: out,
                            truncated: true,
                        });
                    }
                }
                Decoded::Invalid(reason) => {
                    // Bytes cut off by a recovery are followed by their
                    // repair record at the next block boundary.
                    let next = align_up(pos + 1);
                    let repaired = next + (record::HEADER_LEN as u64) <= len
                        && matches!(record::decode(&buf[next as usize..]),
                            Decoded::Record(r, _, _) if r.kind == REPAIR_KIND && r.payload == pos.to_le_bytes());
                    if !repaired {
                        return Err(WalError::Corrupt {
                            path,
                            position: pos,
                            reason,
                        });
                    }
                    pos = next;
                }
            }
        }
    }
    Ok(Page {
        records: out,
        truncated: false,
    })
}

fn read_used(path: &Path, used: u64) -> Result<Vec<u8>, WalError> {
    let io = |e| WalError::io("reading segment", path, e);
    let mut f = File::open(path).map_err(io)?;
    let mut buf = vec![0u8; used as usize];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

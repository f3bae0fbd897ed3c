//! Record framing.
//!
//! ```text
//! 0   4  magic  "RWAL"
//! 4   4  payload length (u32 LE)
//! 8   8  offset (u64 LE, the global WAL offset, >= 1)
//! 16  1  kind (caller-defined record type, never 0)
//! 17  1  flags (0)
//! 18  2  reserved (0)
//! 20  4  CRC32C (u32 LE) over bytes 0..20 followed by the payload
//! 24  .. payload
//! ```
//!
//! The magic's first byte is non-zero, so a zero byte where a record should
//! start means "padding up to the next block" (see [`crate::segment`]).

use crate::MAX_RECORD_PAYLOAD;

/// Bytes of a record header.
pub const HEADER_LEN: usize = 24;
/// Record magic.
pub const MAGIC: [u8; 4] = *b"RWAL";

/// A decoded record borrowing its payload from the segment buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Global WAL offset of this record.
    pub offset: u64,
    /// Caller-defined kind byte.
    pub kind: u8,
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Appends one encoded record to `out`.
pub fn encode(out: &mut Vec<u8>, offset: u64, kind: u8, payload: &[u8]) {
    assert!(offset >= 1, "WAL offsets start at 1");
    assert!(kind != 0, "record kind 0 is reserved");
    assert!(payload.len() <= MAX_RECORD_PAYLOAD);
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 20]), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Outcome of trying to decode a record at a position.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A valid record and its total encoded length.
    Record(RecordRef<'a>, usize),
    /// The bytes do not form a valid record; the reason says why.
    Invalid(String),
}

/// Decodes the record starting at `buf[0]`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_LEN {
        return Decoded::Invalid(format!("truncated header ({} bytes)", buf.len()));
    }
    if buf[0..4] != MAGIC {
        return Decoded::Invalid("bad record magic".into());
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD_PAYLOAD {
        return Decoded::Invalid(format!("record length {len} exceeds the limit"));
    }
    let offset = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let kind = buf[16];
    if kind == 0 || buf[17] != 0 || buf[18] != 0 || buf[19] != 0 {
        return Decoded::Invalid("bad record kind or flags".into());
    }
    if buf.len() < HEADER_LEN + len {
        return Decoded::Invalid(format!("truncated payload ({len} bytes declared)"));
    }
    let stored = u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes"));
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..20]), payload);
    if crc != stored {
        return Decoded::Invalid(format!(
            "CRC mismatch (stored {stored:08x}, computed {crc:08x})"
        ));
    }
    if offset == 0 {
        return Decoded::Invalid("record offset 0".into());
    }
    Decoded::Record(
        RecordRef {
            offset,
            kind,
            payload,
        },
        HEADER_LEN + len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&mut buf, 42, 3, b"hello");
        encode(&mut buf, 43, 1, b"");
        let Decoded::Record(r, n) = decode(&buf) else {
            panic!("first record invalid")
        };
        assert_eq!((r.offset, r.kind, r.payload, n), (42, 3, &b"hello"[..], 29));
        let Decoded::Record(r2, n2) = decode(&buf[n..]) else {
            panic!("second record invalid")
        };
        assert_eq!((r2.offset, r2.kind, r2.payload.len(), n2), (43, 1, 0, 24));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 2, b"payload bytes");
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(decode(&b), Decoded::Invalid(_)),
                "bit {i} flip undetected"
            );
        }
    }

    #[test]
    fn truncation_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 2, b"payload bytes");
        for n in 0..buf.len() {
            assert!(matches!(decode(&buf[..n]), Decoded::Invalid(_)));
        }
    }
}

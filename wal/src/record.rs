//! Record framing.
//!
//! ```text
//! 0   4  magic  "RWAL"
//! 4   4  payload length (u32 LE)
//! 8   8  offset (u64 LE, the global WAL offset, >= 1)
//! 16  1  kind (caller-defined record type, never 0)
//! 17  1  flags: bit 0 = COMMIT_START (first record of a commit's write)
//! 18  2  reserved (0)
//! 20  8  synced_to (u64 LE): on a COMMIT_START record, the position in this
//!        segment up to which every byte was known durable (fdatasync'ed)
//!        when the commit was written; 0 otherwise
//! 28  4  CRC32C (u32 LE) over bytes 0..28 followed by the payload
//! 32  .. payload
//! ```
//!
//! The magic's first byte is non-zero, so a zero byte where a record should
//! start means "padding up to the next block" (see [`crate::segment`]).
//! `synced_to` lets recovery tell a torn, never-synced tail from corruption
//! of data that had been made durable (see [`crate::recovery`]).

use crate::MAX_RECORD_PAYLOAD;

/// Bytes of a record header.
pub const HEADER_LEN: usize = 32;
/// Record magic.
pub const MAGIC: [u8; 4] = *b"RWAL";
/// Flag: first record of a commit's write.
pub const FLAG_COMMIT_START: u8 = 0x01;

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

/// Header facts recovery needs beyond the record itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// First record of a commit's write.
    pub commit_start: bool,
    /// See the module docs.
    pub synced_to: u64,
}

/// Appends one encoded record (no flags) to `out`.
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
    out.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 28]), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Marks the encoded record at the start of `rec` as the first of a commit
/// written when `synced_to` bytes of its segment were durable, and fixes
/// its CRC.
pub fn mark_commit_start(rec: &mut [u8], synced_to: u64) {
    assert!(rec.len() >= HEADER_LEN && rec[0..4] == MAGIC);
    let len = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes")) as usize;
    assert!(rec.len() >= HEADER_LEN + len);
    rec[17] |= FLAG_COMMIT_START;
    rec[20..28].copy_from_slice(&synced_to.to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&rec[0..28]),
        &rec[HEADER_LEN..HEADER_LEN + len],
    );
    rec[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// Outcome of trying to decode a record at a position.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A valid record, its header facts and its total encoded length.
    Record(RecordRef<'a>, Meta, usize),
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
    let flags = buf[17];
    if kind == 0 || flags & !FLAG_COMMIT_START != 0 || buf[18] != 0 || buf[19] != 0 {
        return Decoded::Invalid("bad record kind or flags".into());
    }
    if buf.len() < HEADER_LEN + len {
        return Decoded::Invalid(format!("truncated payload ({len} bytes declared)"));
    }
    let synced_to = u64::from_le_bytes(buf[20..28].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes"));
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..28]), payload);
    if crc != stored {
        return Decoded::Invalid(format!(
            "CRC mismatch (stored {stored:08x}, computed {crc:08x})"
        ));
    }
    if offset == 0 {
        return Decoded::Invalid("record offset 0".into());
    }
    let meta = Meta {
        commit_start: flags & FLAG_COMMIT_START != 0,
        synced_to,
    };
    Decoded::Record(
        RecordRef {
            offset,
            kind,
            payload,
        },
        meta,
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
        let Decoded::Record(r, m, n) = decode(&buf) else {
            panic!("first record invalid")
        };
        assert_eq!((r.offset, r.kind, r.payload, n), (42, 3, &b"hello"[..], 37));
        assert_eq!(
            m,
            Meta {
                commit_start: false,
                synced_to: 0
            }
        );
        let Decoded::Record(r2, _, n2) = decode(&buf[n..]) else {
            panic!("second record invalid")
        };
        assert_eq!((r2.offset, r2.kind, r2.payload.len(), n2), (43, 1, 0, 32));
    }

    #[test]
    fn commit_start_marking_keeps_the_record_valid() {
        let mut buf = Vec::new();
        encode(&mut buf, 9, 2, b"abc");
        mark_commit_start(&mut buf, 8192);
        let Decoded::Record(r, m, _) = decode(&buf) else {
            panic!("invalid after marking")
        };
        assert_eq!((r.offset, r.payload), (9, &b"abc"[..]));
        assert_eq!(
            m,
            Meta {
                commit_start: true,
                synced_to: 8192
            }
        );
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 2, b"payload bytes");
        mark_commit_start(&mut buf, 4096);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(decode(&b), Decoded::Invalid(_)),
                "bit {i} flip undetected"
            );
        }
    }

    proptest::proptest! {
        /// Any sequence of records, some marked as commit starts, decodes
        /// back to exactly what was encoded, record by record.
        #[test]
        fn any_records_round_trip(
            records in proptest::collection::vec(
                (1u64.., 1u8.., proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                 proptest::option::of(0u64..1 << 40)),
                1..20,
            )
        ) {
            let mut buf = Vec::new();
            for (offset, kind, payload, synced) in &records {
                let start = buf.len();
                encode(&mut buf, *offset, *kind, payload);
                if let Some(s) = synced {
                    mark_commit_start(&mut buf[start..], *s);
                }
            }
            let mut at = 0;
            for (offset, kind, payload, synced) in &records {
                let Decoded::Record(r, m, n) = decode(&buf[at..]) else {
                    panic!("record at {at} did not decode");
                };
                proptest::prop_assert_eq!((r.offset, r.kind, r.payload), (*offset, *kind, &payload[..]));
                proptest::prop_assert_eq!(m.commit_start, synced.is_some());
                proptest::prop_assert_eq!(m.synced_to, synced.unwrap_or(0));
                at += n;
            }
            proptest::prop_assert_eq!(at, buf.len());
        }

        /// Arbitrary bytes never panic the decoder, and whatever it
        /// accepts lies within the input.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Decoded::Record(r, _, n) = decode(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
                proptest::prop_assert_eq!(n, HEADER_LEN + r.payload.len());
            }
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

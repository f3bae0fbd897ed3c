//! Binary frames (PROTOCOL.md §2): an 18-byte big-endian header, an ignored
//! header extension, and a JSON payload protected by CRC32C.

/// Frame magic `RCPX`.
pub const MAGIC: [u8; 4] = *b"RCPX";
/// Fixed header length.
pub const HEADER_LEN: usize = 18;
/// Largest payload accepted or sent: 16 MiB.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Flag: the CRC field is valid and must be checked.
pub const FLAG_CRC: u16 = 0x0001;
/// Every defined flag bit; any other set bit is fatal.
pub const KNOWN_FLAGS: u16 = 0x000F;

/// A framing error: the connection is closed without a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Magic is not `RCPX`.
    #[error("bad frame magic")]
    BadMagic,
    /// Version is not 1.
    #[error("unsupported frame version {0}")]
    BadVersion(u16),
    /// Reserved flag bits set.
    #[error("reserved frame flags set: {0:#06x}")]
    BadFlags(u16),
    /// Declared payload over 16 MiB.
    #[error("frame payload of {0} bytes exceeds 16 MiB")]
    TooLarge(u32),
    /// CRC flag set and CRC wrong.
    #[error("frame CRC mismatch")]
    BadCrc,
}

/// Tries to decode one frame at the start of `buf`, in the reference's
/// order (magic, version, flags, size as soon as the header is there; CRC
/// once the whole frame is). `Ok(None)`: more bytes needed; `Ok(Some((payload
/// range, total length)))` otherwise.
pub fn decode(buf: &[u8]) -> Result<Option<(std::ops::Range<usize>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let version = u16::from_be_bytes([buf[4], buf[5]]);
    if version != 1 {
        return Err(FrameError::BadVersion(version));
    }
    let flags = u16::from_be_bytes([buf[6], buf[7]]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let header_len = u16::from_be_bytes([buf[8], buf[9]]) as usize;
    let payload_len = u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload_len));
    }
    let start = HEADER_LEN + header_len;
    let total = start + payload_len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    if flags & FLAG_CRC != 0 {
        let crc = u32::from_be_bytes([buf[14], buf[15], buf[16], buf[17]]);
        if crc32c::crc32c(&buf[start..total]) != crc {
            return Err(FrameError::BadCrc);
        }
    }
    Ok(Some((start..total, total)))
}

/// Bytes still needed before `buf` can hold a whole frame, when its header
/// is complete (lets the reader size its buffer once).
pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let header_len = u16::from_be_bytes([buf[8], buf[9]]) as usize;
    let payload_len = u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]) as usize;
    Some(HEADER_LEN + header_len + payload_len.min(MAX_PAYLOAD))
}

/// Appends a server frame (version 1, CRC flag, no extension) to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "caller must keep responses within the frame limit"
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&FLAG_CRC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Starts a server frame at the end of `out` whose payload will be written
/// in place after it (no separate payload buffer); returns the frame's
/// start for [`finish`].
pub fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Completes the frame begun at `start`: everything after its header is the
/// payload (at most [`MAX_PAYLOAD`] bytes).
pub fn finish(out: &mut [u8], start: usize) {
    let payload_len = out.len() - start - HEADER_LEN;
    assert!(
        payload_len <= MAX_PAYLOAD,
        "caller must keep responses within the frame limit"
    );
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    let h = &mut out[start..start + HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&1u16.to_be_bytes());
    h[6..8].copy_from_slice(&FLAG_CRC.to_be_bytes());
    h[8..10].copy_from_slice(&0u16.to_be_bytes());
    h[10..14].copy_from_slice(&(payload_len as u32).to_be_bytes());
    h[14..18].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: &[u8] = br#"{"type":"request","id":"1","op":"PING","params":{}}"#;

    #[test]
    fn in_place_frames_equal_encoded_ones() {
        let mut a = b"prefix".to_vec();
        let start = begin(&mut a);
        a.extend_from_slice(PING);
        finish(&mut a, start);
        let mut b = b"prefix".to_vec();
        encode(PING, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn protocol_worked_examples() {
        // PROTOCOL.md §9.1
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let mut f = Vec::new();
        encode(PING, &mut f);
        assert_eq!(
            &f[..18],
            &[0x52, 0x43, 0x50, 0x58, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0x33, 0xc3, 0x20, 0x09, 0xc4]
        );
        // §9.2
        let reply = br#"{"type":"response","id":"1","status":"ok","result":{"pong":true}}"#;
        assert_eq!(crc32c::crc32c(reply), 0x4B7B_432F);
    }

    #[test]
    fn decodes_and_waits_for_more() {
        let mut f = Vec::new();
        encode(PING, &mut f);
        for n in 0..f.len() {
            assert_eq!(decode(&f[..n]), Ok(None), "prefix {n}");
        }
        let (range, total) = decode(&f).unwrap().unwrap();
        assert_eq!(&f[range], PING);
        assert_eq!(total, f.len());
    }

    #[test]
    fn crc_flag_clear_skips_the_check() {
        let mut f = Vec::new();
        encode(PING, &mut f);
        f[7] = 0; // flags 0
        f[14..18].copy_from_slice(&[0, 0, 0, 0]);
        assert!(decode(&f).unwrap().is_some());
    }

    #[test]
    fn framing_errors() {
        let mut f = Vec::new();
        encode(PING, &mut f);
        let mut bad = f.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(FrameError::BadMagic));
        let mut bad = f.clone();
        bad[5] = 2;
        assert_eq!(decode(&bad), Err(FrameError::BadVersion(2)));
        let mut bad = f.clone();
        bad[6] = 0x80;
        assert_eq!(decode(&bad), Err(FrameError::BadFlags(0x8001)));
        let mut bad = f.clone();
        bad[10..14].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert_eq!(
            decode(&bad[..18]),
            Err(FrameError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
        let mut bad = f.clone();
        *bad.last_mut().unwrap() = b']';
        assert_eq!(decode(&bad), Err(FrameError::BadCrc));
    }

    #[test]
    fn header_extension_is_skipped() {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&[0, 1, 0, 1, 0, 3]);
        f.extend_from_slice(&(PING.len() as u32).to_be_bytes());
        f.extend_from_slice(&crc32c::crc32c(PING).to_be_bytes());
        f.extend_from_slice(b"ext");
        f.extend_from_slice(PING);
        let (range, _) = decode(&f).unwrap().unwrap();
        assert_eq!(&f[range], PING);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary bytes never panic the decoder, and a decoded frame
            /// never claims more bytes than it was given.
            #[test]
            fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                if let Ok(Some((range, total))) = decode(&bytes) {
                    prop_assert!(total <= bytes.len());
                    prop_assert!(range.end == total);
                }
            }

            /// Frames survive any chunking: feeding a stream of encoded
            /// frames in arbitrary pieces yields exactly the payloads sent.
            #[test]
            fn round_trip_under_any_chunking(
                payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
                cuts in proptest::collection::vec(1usize..64, 1..64),
            ) {
                let mut stream = Vec::new();
                for p in &payloads {
                    encode(p, &mut stream);
                }
                let mut buf: Vec<u8> = Vec::new();
                let mut got: Vec<Vec<u8>> = Vec::new();
                let mut pos = 0;
                let mut i = 0;
                while pos < stream.len() {
                    let n = cuts[i % cuts.len()].min(stream.len() - pos);
                    i += 1;
                    buf.extend_from_slice(&stream[pos..pos + n]);
                    pos += n;
                    while let Some((range, total)) = decode(&buf).expect("valid stream") {
                        got.push(buf[range].to_vec());
                        buf.drain(..total);
                    }
                }
                prop_assert!(buf.is_empty());
                prop_assert_eq!(got, payloads);
            }
        }
    }
}

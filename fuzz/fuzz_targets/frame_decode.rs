//! RCP frame decoder: arbitrary byte streams in arbitrary chunkings.
//!
//! The first byte seeds the chunk sizes; the rest is the stream. The stream
//! is fed to the decoder the way a connection does (append what arrived,
//! decode every complete frame, keep the rest), and the outcome must be the
//! same as decoding the whole stream at once: the same payloads, then the
//! same error or the same leftover. Every decoded payload re-encodes to a
//! frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb::protocol::frame::{self, FrameError};

/// Decodes every complete frame of `buf`; returns the payloads and how it
/// stopped (an error, or the bytes left over).
fn drain(buf: &[u8]) -> (Vec<Vec<u8>>, Result<usize, FrameError>) {
    let mut payloads = Vec::new();
    let mut at = 0;
    loop {
        match frame::decode(&buf[at..]) {
            Ok(Some((range, total))) => {
                assert!(range.end == total && range.start >= frame::HEADER_LEN);
                assert!(total <= buf.len() - at);
                assert!(range.len() <= frame::MAX_PAYLOAD);
                if let Some(hint) = frame::frame_len_hint(&buf[at..]) {
                    assert_eq!(hint, total, "the size hint is the frame's size");
                }
                payloads.push(buf[at + range.start..at + range.end].to_vec());
                at += total;
            }
            Ok(None) => return (payloads, Ok(buf.len() - at)),
            Err(e) => return (payloads, Err(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let (whole, whole_end) = drain(stream);

    // The same stream, arriving in pieces.
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let mut end = Ok(0);
    let mut rng = u32::from(seed) | 1;
    let mut fed = 0;
    while fed < stream.len() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let n = (rng as usize % 64 + 1).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let (payloads, stop) = drain(&buf);
        got.extend(payloads);
        match stop {
            Ok(left) => {
                buf.drain(..buf.len() - left);
                end = Ok(left);
            }
            Err(e) => {
                end = Err(e);
                break;
            }
        }
    }
    assert_eq!(got, whole, "chunking changed the frames");
    match (&whole_end, &end) {
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        // A size or header error is seen as soon as the header is there;
        // the whole stream sees the same one.
        _ => panic!("whole: {whole_end:?}, chunked: {end:?}"),
    }

    for p in &whole {
        let mut out = Vec::new();
        frame::encode(p, &mut out);
        let (again, stop) = drain(&out);
        assert_eq!(again, vec![p.clone()]);
        assert_eq!(stop, Ok(0));
    }
});

//! Snapshot decoder: arbitrary files handed to `snapshot::load`.
//!
//! Input: a mode byte, then bytes. Mode even: the bytes are the whole file
//! (frame checks: magic, lengths, CRC). Mode odd: the bytes are the
//! decompressed body, framed as a real snapshot would be (header, zstd,
//! trailer with the right CRC), so the fuzzer reaches the line decoder and
//! the engine it rebuilds. Nothing may panic; every refusal is a
//! `SnapshotError` naming the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use rstmdb_shards::engine::EngineLimits;
use rstmdb_shards::snapshot;

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"RSTMSNAP");
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes()); // shard
    f.extend_from_slice(&100u64.to_le_bytes()); // start offset
    f.extend_from_slice(&0u64.to_le_bytes());
    let mut z = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("encoder");
    z.write_all(body).expect("compress");
    let z = z.finish().expect("compress");
    f.extend_from_slice(&z);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&(z.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(b"SNAPEND\0");
    f
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode % 2 == 0 { rest.to_vec() } else { framed(rest) };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(snapshot::file_name(100));
    std::fs::write(&path, &file).expect("write");
    let limits = EngineLimits {
        idempotency_entries: 64,
        idempotency_max_age_ms: 0,
    };
    match snapshot::load(&path, 0, &limits) {
        // The start offset is the header's.
        Ok(l) => assert_eq!(
            l.start_offset,
            u64::from_le_bytes(file[16..24].try_into().expect("a header"))
        ),
        Err(e) => assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}"),
    }
});

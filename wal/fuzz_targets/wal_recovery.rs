//! Segment recovery: a log the writer could have produced (segments of
//! block-aligned commits, each first record marked with how much of the
//! segment was synced), then damaged by the fuzzer (bytes flipped,
//! overwritten or cut off), then recovered.
//!
//! Checks: nothing panics; read-only recovery changes no file and finds the
//! same records as the repairing recovery; a second recovery after the
//! repair finds the same records again with no torn tail (repair is
//! idempotent); an undamaged log yields every record written; the records
//! come out with increasing offsets.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rstmdb_wal::record;
use rstmdb_wal::segment::{self, align_up, BLOCK};
use rstmdb_wal::{recover, RecoveryOptions};

/// Reads bytes off the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) << 8 | u16::from(self.byte()?))
    }
}

const SEGMENT: u64 = 16 * BLOCK;

fn files(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name(), std::fs::read(e.path()).expect("read"))
        })
        .collect();
    v.sort();
    v
}

fn replay(opts: &RecoveryOptions) -> Option<(Vec<u64>, bool)> {
    let mut seen = Vec::new();
    let r = recover(opts, |r| {
        seen.push(r.offset);
        Ok(())
    })
    .ok()?;
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    Some((seen, r.torn.is_some()))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let dir = tempfile::tempdir().expect("temp dir");
    // Build up to 3 segments of commits.
    let mut segs: Vec<Vec<u8>> = vec![segment::encode_header(0, 1)];
    let (mut offset, mut synced) = (1u64, BLOCK);
    let mut written = Vec::new();
    let commits = input.byte().unwrap_or(0) % 24;
    for _ in 0..commits {
        let Some(shape) = input.byte() else { break };
        let mut buf = Vec::new();
        for _ in 0..(shape % 4 + 1) {
            let len = input.u16().unwrap_or(0) % 3000;
            let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ shape).collect();
            record::encode(&mut buf, offset, 1 + shape % 9, &payload);
            written.push(offset);
            offset += 1 + u64::from(shape % 3);
        }
        let seg = segs.last_mut().expect("a segment");
        let pos = seg.len() as u64;
        if shape & 0x80 != 0 && segs.len() < 3 || pos + align_up(buf.len() as u64) > SEGMENT {
            // Rotate: the writer syncs a segment before leaving it.
            let id = segs.len() as u64 + 1;
            segs.push(segment::encode_header(0, id));
            synced = BLOCK;
        }
        let seg = segs.last_mut().expect("a segment");
        record::mark_commit_start(&mut buf, synced);
        buf.resize(align_up(buf.len() as u64) as usize, 0);
        seg.extend_from_slice(&buf);
        if shape & 0x40 != 0 {
            synced = seg.len() as u64;
        }
    }
    // Damage.
    let mut damaged = false;
    while let Some(op) = input.byte() {
        let k = op as usize % segs.len();
        let seg = &mut segs[k];
        let at = input.u16().unwrap_or(0) as usize * 4 % seg.len().max(1);
        match op % 3 {
            0 => {
                let v = input.byte().unwrap_or(1);
                if v != 0 && at < seg.len() {
                    seg[at] ^= v;
                    damaged = true;
                }
            }
            1 if at < seg.len() => {
                seg.truncate(at);
                damaged = true;
            }
            _ => {
                let v = input.byte().unwrap_or(0xAB);
                if at < seg.len() && seg[at] != v {
                    seg[at] = v;
                    damaged = true;
                }
            }
        }
    }
    for (i, s) in segs.iter().enumerate() {
        std::fs::write(dir.path().join(segment::file_name(i as u64 + 1)), s).expect("write");
    }
    let ro = RecoveryOptions {
        dir: dir.path().to_path_buf(),
        shard: 0,
        segment_size: SEGMENT,
        read_only: true,
    };
    let before = files(dir.path());
    let looked = replay(&ro);
    assert_eq!(files(dir.path()), before, "read-only recovery wrote");
    if !damaged {
        assert_eq!(looked.as_ref().map(|l| &l.0), Some(&written));
    }
    let rw = RecoveryOptions {
        read_only: false,
        ..ro
    };
    let repaired = replay(&rw);
    assert_eq!(
        looked.as_ref().map(|l| &l.0),
        repaired.as_ref().map(|l| &l.0),
        "read-only and repairing recovery disagree"
    );
    if let Some((records, _)) = repaired {
        let (again, torn) = replay(&rw).expect("a repaired log recovers");
        assert_eq!(again, records, "repair changed the records");
        assert!(!torn, "repair left a torn tail");
    }
});

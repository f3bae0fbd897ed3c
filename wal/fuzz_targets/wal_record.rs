//! WAL record decoder: arbitrary bytes. Nothing may panic; a record that
//! decodes re-encodes to exactly the bytes it came from (the decoder accepts
//! only what the encoder writes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb_wal::record::{self, Decoded, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    match record::decode(data) {
        Decoded::Record(r, meta, n) => {
            assert!((HEADER_LEN..=data.len()).contains(&n));
            assert_eq!(n, HEADER_LEN + r.payload.len());
            assert!(r.offset >= 1 && r.kind != 0);
            let mut again = Vec::new();
            record::encode(&mut again, r.offset, r.kind, r.payload);
            if meta.commit_start {
                record::mark_commit_start(&mut again, meta.synced_to);
            }
            if meta.commit_start || meta.synced_to == 0 {
                assert_eq!(&again[..], &data[..n]);
            }
        }
        Decoded::Invalid(reason) => assert!(!reason.is_empty()),
    }
});

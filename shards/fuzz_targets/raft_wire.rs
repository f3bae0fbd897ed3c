//! The peer wire format of Raft messages (`replication::wire`): arbitrary
//! bytes decode to a message or to an error, never a panic or an
//! allocation a forged count asks for; every message decoded re-encodes
//! to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb_shards::replication::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((group, msg)) = wire::decode(data) {
        let mut out = Vec::new();
        wire::encode(group, &msg, &mut out);
        assert_eq!(out, data, "a decoded frame re-encodes to itself");
    }
});

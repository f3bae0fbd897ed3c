//! A group's Raft log file (`replication::store`): arbitrary bytes open
//! to a log or to an error, never a panic; what opens is consistent (a
//! dense log whose terms never decrease, a commit index within it) and
//! ends inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb_shards::replication::store;

fuzz_target!(|data: &[u8]| {
    if let Ok((state, end)) = store::decode(data, &[1, 2, 3]) {
        assert!(end as usize <= data.len());
        assert!(state.hard_state.commit <= state.last_index());
        for w in state.entries.windows(2) {
            assert_eq!(w[1].index, w[0].index + 1);
            assert!(w[1].term >= w[0].term);
        }
        if let Some(first) = state.entries.first() {
            assert_eq!(first.index, state.snap_index + 1);
        }
    }
});

//! Machine definition validation: arbitrary JSON as a PUT_MACHINE
//! `definition`. Nothing may panic; an accepted definition's normal form is
//! accepted too and has the same checksum (the normal form is a fixed
//! point, so re-registering what GET_MACHINE returned is idempotent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb_shards::definition::MachineDef;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(def) = MachineDef::from_json(&v) {
        let again = MachineDef::from_json(def.normalized())
            .unwrap_or_else(|e| panic!("normal form refused: {e}: {}", def.normalized()));
        assert_eq!(def.checksum(), again.checksum());
        assert_eq!(def.normalized(), again.normalized());
    }
});

//! Rebuilding a shard's engine from its WAL at start-up.

use rstmdb_wal::{recover, Recovered, RecoveryOptions, WalError};

use crate::engine::{Engine, EngineLimits};
use crate::wal_entry::WalEntry;

/// Replays the shard's WAL into a fresh engine. Blocking (std::fs); run it
/// on a thread of its own, one per shard, before the executors start.
pub fn recover_shard(
    opts: &RecoveryOptions,
    limits: &EngineLimits,
) -> Result<(Engine, Recovered), WalError> {
    let mut engine = Engine::new(limits);
    let recovered = recover(opts, |r| {
        let entry: WalEntry = serde_json::from_slice(r.payload)
            .map_err(|e| format!("undecodable entry at offset {}: {e}", r.offset))?;
        if entry.kind() != r.kind {
            return Err(format!(
                "record kind {} does not match its entry {:?}",
                r.kind,
                entry.kind()
            ));
        }
        engine.replay(r.offset, entry)
    })?;
    Ok((engine, recovered))
}

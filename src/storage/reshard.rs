//! Re-sharding at start-up: the data directory was laid out for a different
//! number of shards than configured. Every old shard is recovered (newest
//! snapshot + WAL, batches resolved), the instances are redistributed by
//! the router's placement rule, each new shard's state is written as a
//! snapshot into a fresh layout directory beside the old one, and
//! `meta.json` is switched to it in one atomic rename. A crash before the
//! switch leaves the old layout in charge (the half-written one is removed
//! at the next start, which re-shards again); a crash after it leaves the
//! new one (the old one is removed). Nothing is lost either way.

use std::path::Path;
use std::time::Instant;

use rstmdb_shards::engine::{now_ms, EngineLimits};
use rstmdb_shards::reshard::redistribute;
use rstmdb_shards::snapshot::write_blocking;

use crate::storage::datadir::{DataDir, Manifest, ShardManifest};
use crate::storage::recover;

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", dir.display()))
}

/// Re-lays `data` out for `to` shards (see the module doc).
pub fn reshard(
    data: &mut DataDir,
    to: usize,
    limits: &EngineLimits,
    segment_size: u64,
) -> Result<(), String> {
    let from = data.shards();
    assert_ne!(from, to);
    let started = Instant::now();
    tracing::warn!(
        from,
        to,
        "the data directory is laid out for {from} shard(s) but {to} are configured: re-sharding"
    );
    let rec = recover::recover_all(data, from, limits, segment_size)
        .map_err(|e| format!("re-sharding from {from} to {to} shards: {e}"))?;
    let start = rec.next_offset;
    let records_total: u64 = rec.records_ever.iter().sum();
    let engines = rec.shards.into_iter().map(|(e, _)| e).collect();
    let mut new = redistribute(engines, to, limits, start);
    let instances: usize = new.iter().map(|e| e.active_instances()).sum();

    let (name, base) = data.new_layout(to).map_err(|e| e.to_string())?;
    let mut manifest = Manifest::empty(to);
    let now = now_ms();
    for (i, engine) in new.iter_mut().enumerate() {
        let shard_dir = DataDir::shard_dir_in(&base, i);
        let wal = shard_dir.join("wal");
        std::fs::create_dir_all(&wal).map_err(|e| format!("creating {}: {e}", wal.display()))?;
        // WAL_STATS entry_count stays what it was: the old total goes
        // with new shard 0.
        let records = if i == 0 { records_total } else { 0 };
        let f = write_blocking(
            engine,
            shard_dir.join("snapshots"),
            i as u32,
            start,
            now,
            records,
        )
        .map_err(|e| format!("re-sharding: writing the snapshot of new shard {i}: {e}"))?;
        sync_dir(&shard_dir)?;
        manifest.shards[i] = ShardManifest {
            snapshot: f.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            start_offset: start,
            size_bytes: f.size,
            checksum: Some(f.checksum),
            // Everything below `start` lives in the snapshots only.
            wal_floor: start,
        };
    }
    manifest.history_floor = start;
    manifest.write(&base).map_err(|e| e.to_string())?;
    sync_dir(data.root())?;
    // The switch: one atomic rename of meta.json.
    data.switch_layout(name, to).map_err(|e| e.to_string())?;
    tracing::warn!(
        from,
        to,
        instances,
        next_offset = start,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "re-sharding complete"
    );
    Ok(())
}

//! Start-up recovery of every shard of a data directory: snapshots and
//! WALs in parallel, then what needs all shards at once (machine
//! definitions unioned, atomic-batch parts resolved, the next offset).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rstmdb_shards::definition::MachineDef;
use rstmdb_shards::engine::{Engine, EngineLimits};
use rstmdb_shards::recovery::{recover_shard, RecoveredShard};
use rstmdb_wal::{Recovered, RecoveryOptions};

use crate::storage::datadir::{DataDir, Manifest};

/// Every shard's recovered state.
pub struct Recovery {
    /// Engine and WAL position per shard.
    pub shards: Vec<(Engine, Recovered)>,
    /// Start of the snapshot each shard was loaded from.
    pub snapshot_starts: Vec<Option<u64>>,
    /// Records each shard has ever written.
    pub records_ever: Vec<u64>,
    /// Per shard: batch parts undone now (their aborts must be logged).
    pub aborted: Vec<Vec<String>>,
    /// Every batch ever undone (subscribers replaying the log skip them).
    pub aborted_ever: HashSet<String>,
    /// The first offset not used by any shard.
    pub next_offset: u64,
    /// The compaction manifest read.
    pub manifest: Manifest,
}

/// Recovers the `shards` shards of `data`. Blocking; one thread per shard.
pub fn recover_all(
    data: &DataDir,
    shards: usize,
    limits: &EngineLimits,
    segment_size: u64,
) -> Result<Recovery, String> {
    // Recover every shard in parallel (blocking reads), then union the
    // machine definitions so a PUT_MACHINE cut short by a crash on some
    // shards is complete everywhere.
    let started = std::time::Instant::now();
    let mut manifest = data.read_manifest(shards).map_err(|e| e.to_string())?;
    let results = recover_shards(data, shards, limits, segment_size, &manifest);
    let Gathered {
        mut recovered,
        snapshot_starts,
        records_ever,
    } = gather(results, &mut manifest)?;
    union_machines(&mut recovered)?;
    let next_offset = next_offset(&recovered);
    let present = durable_parts(&recovered);
    let aborted = resolve_parts(&mut recovered, &present, next_offset, shards);
    let aborted_ever = aborted_ever(&recovered, &aborted);
    log_recovery(&recovered, shards, next_offset, started);
    Ok(Recovery {
        shards: recovered,
        snapshot_starts,
        records_ever,
        aborted,
        aborted_ever,
        next_offset,
        manifest,
    })
}

/// One scoped thread per shard, each recovering from its snapshots above
/// the manifest's floor; the results in shard order.
fn recover_shards(
    data: &DataDir,
    shards: usize,
    limits: &EngineLimits,
    segment_size: u64,
    manifest: &Manifest,
) -> Vec<Result<RecoveredShard, String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..shards)
            .map(|i| {
                let opts = RecoveryOptions {
                    dir: data.wal_dir(i),
                    shard: i as u32,
                    segment_size,
                    read_only: false,
                };
                let limits = limits.clone();
                let snapshots = data.snapshot_dir(i);
                let floor = manifest.shards[i].wal_floor.max(manifest.history_floor);
                s.spawn(move || recover_one(i, &opts, &limits, &snapshots, floor))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("recovery thread panicked".into()))
            })
            .collect()
    })
}

/// One shard's recovery (on its own thread), logged with its timing.
fn recover_one(
    i: usize,
    opts: &RecoveryOptions,
    limits: &EngineLimits,
    snapshots: &std::path::Path,
    floor: u64,
) -> Result<RecoveredShard, String> {
    let t = std::time::Instant::now();
    let r = recover_shard(opts, limits, snapshots, floor)
        .map_err(|e| format!("shard {i}: recovery failed: {e}"))?;
    tracing::info!(
        shard = i,
        snapshot_start = r.snapshot_start,
        skipped_snapshots = r.skipped.len(),
        wal_records = r.wal.records,
        elapsed_ms = t.elapsed().as_millis() as u64,
        "shard recovered"
    );
    Ok(r)
}

/// The shards' recovered parts, split by what `Recovery` keeps of them.
struct Gathered {
    recovered: Vec<(Engine, Recovered)>,
    snapshot_starts: Vec<Option<u64>>,
    records_ever: Vec<u64>,
}

/// The first failure in shard order, or every shard's parts, each shard's
/// manifest floor raised to what its WAL still holds.
fn gather(
    results: Vec<Result<RecoveredShard, String>>,
    manifest: &mut Manifest,
) -> Result<Gathered, String> {
    let shards = results.len();
    let mut recovered = Vec::with_capacity(shards);
    let mut snapshot_starts = Vec::with_capacity(shards);
    let mut records_ever = Vec::with_capacity(shards);
    for (i, r) in results.into_iter().enumerate() {
        let r = r?;
        // Subscriptions may not start below what the WAL still holds, even
        // where the manifest's floor is lower (a cluster replica restarted
        // its WAL above a leader's snapshot).
        let floor = &mut manifest.shards[i].wal_floor;
        *floor = (*floor).max(retained_floor(&r.wal, r.snapshot_start));
        recovered.push((r.engine, r.wal));
        snapshot_starts.push(r.snapshot_start);
        records_ever.push(r.records_ever);
    }
    Ok(Gathered {
        recovered,
        snapshot_starts,
        records_ever,
    })
}

/// Every shard adopts every machine definition any shard holds (they must
/// agree), completing a PUT_MACHINE a crash cut short.
fn union_machines(recovered: &mut [(Engine, Recovered)]) -> Result<(), String> {
    let all_machines: Vec<_> = recovered
        .iter()
        .flat_map(|(e, _)| e.machine_defs())
        .collect();
    check_machines_agree(&all_machines)?;
    for (engine, _) in recovered.iter_mut() {
        for (name, v, def) in &all_machines {
            engine.adopt_machine(name.clone(), *v, def.clone());
        }
    }
    Ok(())
}

/// The first offset no shard has used, in its WAL or its engine.
fn next_offset(recovered: &[(Engine, Recovered)]) -> u64 {
    // Batch parts carry their first entry's offset: count their entries too.
    recovered
        .iter()
        .map(|(e, r)| r.last_offset.max(e.max_offset()))
        .max()
        .unwrap_or(0)
        + 1
}

/// Per unresolved atomic batch, the shards whose part of it is durable.
fn durable_parts(recovered: &[(Engine, Recovered)]) -> HashMap<String, HashSet<u32>> {
    // Atomic-batch parts count only if every participant's part is durable:
    // replayed from its WAL, or inside its snapshot with the batch known
    // there as committed (the participant snapshotted after the release).
    let mut present: HashMap<String, HashSet<u32>> = HashMap::new();
    for (i, (engine, _)) in recovered.iter().enumerate() {
        for (id, _) in engine.unresolved_parts() {
            present.entry(id).or_default().insert(i as u32);
        }
    }
    let unresolved: HashSet<String> = present.keys().cloned().collect();
    for (i, (engine, _)) in recovered.iter().enumerate() {
        for id in &unresolved {
            if engine.knows_committed(id) {
                present.entry(id.clone()).or_default().insert(i as u32);
            }
        }
    }
    present
}

/// Commits each unresolved part whose batch is durable on every
/// participant and undoes the others; per shard, the batches it undid.
fn resolve_parts(
    recovered: &mut [(Engine, Recovered)],
    present: &HashMap<String, HashSet<u32>>,
    next_offset: u64,
    shards: usize,
) -> Vec<Vec<String>> {
    let mut aborted: Vec<Vec<String>> = vec![Vec::new(); shards];
    for (i, (engine, _)) in recovered.iter_mut().enumerate() {
        for (id, participants) in engine.unresolved_parts() {
            let complete = participants
                .iter()
                .all(|p| present.get(&id).is_some_and(|s| s.contains(p)));
            engine.resolve_part(&id, complete);
            if complete {
                if !engine.knows_committed(&id) {
                    engine.note_committed(id, next_offset);
                }
            } else {
                aborted[i].push(id);
            }
        }
    }
    aborted
}

/// Batches undone anywhere, before or now: subscribers replaying the log
/// skip their parts.
fn aborted_ever(recovered: &[(Engine, Recovered)], aborted: &[Vec<String>]) -> HashSet<String> {
    let mut aborted_ever: HashSet<String> = recovered
        .iter()
        .flat_map(|(e, _)| e.aborted_batches().iter().cloned())
        .collect();
    aborted_ever.extend(aborted.iter().flatten().cloned());
    aborted_ever
}

/// The closing log line: instances recovered, the next offset, the time.
fn log_recovery(
    recovered: &[(Engine, Recovered)],
    shards: usize,
    next_offset: u64,
    started: std::time::Instant,
) {
    let instances: usize = recovered.iter().map(|(e, _)| e.active_instances()).sum();
    tracing::info!(
        shards,
        instances,
        next_offset,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovery complete"
    );
}

/// The lowest offset from which the WAL holds every record: 0 while it
/// still starts at its first segment; else the oldest segment's first
/// record, or (that segment holding none yet) the snapshot's start.
fn retained_floor(wal: &rstmdb_wal::Recovered, snapshot_start: Option<u64>) -> u64 {
    match (wal.segments.first(), wal.first_offsets.first()) {
        (None | Some(1), _) => 0,
        (Some(_), Some(&first)) if first != 0 => first,
        _ => snapshot_start.unwrap_or(0),
    }
}

/// Every shard holding a (name, version) must hold the same definition
/// (PUT_MACHINE is two-phase through shard 0, so they always do); anything
/// else means the data directory was tampered with.
fn check_machines_agree(defs: &[(String, u32, Arc<MachineDef>)]) -> Result<(), String> {
    let mut seen: HashMap<(&str, u32), &str> = HashMap::new();
    for (name, version, def) in defs {
        let sum = def.checksum();
        if let Some(other) = seen.insert((name.as_str(), *version), sum) {
            if other != sum {
                return Err(format!(
                    "machine {name:?} v{version} has different definitions on different shards \
                     (checksums {other} and {sum}); refusing to start"
                ));
            }
        }
    }
    Ok(())
}

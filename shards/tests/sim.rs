//! Deterministic simulation of a shard's whole storage path on the
//! simulated disk (`rstmdb_wal::sim`): the engine executes random commands
//! (creates, guarded applies, deletes, idempotency keys), each drain is
//! group-committed to the WAL (rolled back when the commit fails, as the
//! shard does), snapshots are written, compaction records the WAL floor in
//! a manifest (temp file, sync, rename, directory sync) before segments
//! below it are removed, and the disk fails writes, syncs and reads, runs
//! out of space and crashes keeping any subset of the unsynced writes.
//!
//! After every recovery (snapshot + WAL replay, as start-up does) the
//! shard's visible state must be one the history allows: the state after
//! the last acknowledged commit, or after a later commit that was in
//! flight (handed to the WAL, never acknowledged). Recovery may fail only
//! with an injected I/O error; then the disk "crashes" and it is tried
//! again. `make test` runs `SIM_SEEDS` seeds (default 60); `make sim` many
//! more.

use std::path::{Path, PathBuf};

use rstmdb_shards::commands::{ApplyEvent, Command, Reply};
use rstmdb_shards::definition::MachineDef;
use rstmdb_shards::engine::{Engine, EngineLimits, Offsets};
use rstmdb_shards::recovery::{recover_shard_on, RecoveryError};
use rstmdb_shards::snapshot::{SnapshotJob, Step};
use rstmdb_wal::segment::BLOCK;
use rstmdb_wal::sim::{on_executor, seeds_from_env, CrashMode, Faults, Rng, SimDisk, SimStats};
use rstmdb_wal::storage::Storage;
use rstmdb_wal::{RecoveryOptions, WalError, WalWriter, WriteMode, WriterConfig};
use serde_json::json;

const SEG: u64 = 16 * BLOCK;
const IDS: u64 = 8;

fn wal_dir() -> PathBuf {
    PathBuf::from("/data/shard-000/wal")
}
fn snap_dir() -> PathBuf {
    PathBuf::from("/data/shard-000/snapshots")
}
fn manifest() -> PathBuf {
    PathBuf::from("/data/manifest")
}

fn limits() -> EngineLimits {
    EngineLimits {
        idempotency_entries: 64,
        idempotency_max_age_ms: 0,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    seeds: u64,
    commits_acked: u64,
    commits_failed: u64,
    snapshots: u64,
    snapshots_failed: u64,
    compactions: u64,
    recoveries: u64,
    recoveries_failed: u64,
    recovered_from_snapshot: u64,
    /// What the simulated disk did (faults, crashes, writes lost and torn).
    disk: SimStats,
}

/// What a client could see of the shard: every instance and the machine.
fn visible(engine: &mut Engine) -> String {
    let mut out = String::new();
    let mut o = Offsets::new(1, 1);
    let mut show = |cmd| match engine.execute(cmd, &mut o, 0) {
        Reply::Json(j) => String::from_utf8(j).expect("utf-8"),
        Reply::Error(e) => format!("{:?}", e.code),
        other => format!("{other:?}"),
    };
    for i in 0..IDS {
        out += &show(Command::GetInstance {
            instance_id: format!("i{i}"),
        });
        out.push('\n');
    }
    out += &show(Command::GetMachine {
        machine: "m".into(),
        version: 1,
    });
    out
}

fn machine() -> Command {
    let def = json!({"states": ["a", "b", "c"], "initial": "a", "transitions": [
        {"from": "a", "event": "GO", "to": "b", "guard": "ctx.n > 2 && !ctx.stop"},
        {"from": ["a", "b"], "event": "NEXT", "to": "c"},
        {"from": "c", "event": "BACK", "to": "a"},
        {"from": ["a", "b", "c"], "event": "TICK", "to": "a"}]});
    Command::PutMachine {
        machine: "m".into(),
        version: 1,
        def: Ok(std::sync::Arc::new(
            MachineDef::from_json(&def).expect("valid"),
        )),
        raw: std::sync::Arc::new(def),
        max_versions: 0,
    }
}

fn random_command(rng: &mut Rng, k: u64) -> Command {
    let id = format!("i{}", rng.below(IDS));
    let key = rng.chance(0.3).then(|| format!("k{}", rng.below(20)));
    let pad = "p".repeat(rng.below(3000) as usize);
    match rng.below(10) {
        0..=2 => Command::CreateInstance {
            instance_id: id,
            machine: "m".into(),
            version: 1,
            initial_ctx: json!({"n": rng.below(5), "pad": pad}),
            idempotency_key: key,
            allow_recreate: true,
        },
        3 => Command::DeleteInstance {
            instance_id: id,
            idempotency_key: key,
        },
        _ => Command::ApplyEvent(ApplyEvent {
            instance_id: id,
            event: ["GO", "NEXT", "BACK", "TICK"][rng.below(4) as usize].into(),
            payload: json!({"n": rng.below(6), "stop": rng.chance(0.2), "k": k, "pad": pad}),
            expected_state: None,
            expected_wal_offset: None,
            event_id: Some(format!("e{k}")),
            idempotency_key: key,
        }),
    }
}

/// The WAL floor recorded by the last compaction (0: none).
fn read_floor(disk: &SimDisk) -> Result<u64, std::io::Error> {
    match disk.read(&manifest()) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Records the floor as the server's manifest is written: temp file,
/// sync, rename, directory sync.
fn write_floor(disk: &SimDisk, floor: u64) -> std::io::Result<()> {
    let tmp = PathBuf::from("/data/manifest.tmp");
    disk.create_file(&tmp)?;
    disk.write_at(&tmp, 0, floor.to_string().as_bytes())?;
    disk.sync_file(&tmp)?;
    disk.rename(&tmp, &manifest())?;
    disk.sync_dir(Path::new("/data"))
}

fn snapshot(disk: &SimDisk, engine: &mut Engine, start: u64) -> Result<u64, String> {
    let mut job = SnapshotJob::begin_on(disk.clone(), engine, snap_dir(), 0, start, 1, 0);
    loop {
        match job.step(engine, std::time::Duration::from_millis(5)) {
            Step::More => {}
            Step::Blocked => std::thread::yield_now(),
            Step::Finished(done) => {
                return done
                    .recv()
                    .map_err(|_| "writer gone".to_string())?
                    .map(|f| f.start_offset)
            }
            Step::Abandoned(why) => return Err(why.into()),
        }
    }
}

fn trace() -> bool {
    std::env::var_os("SIM_TRACE").is_some()
}

async fn run_seed(seed: u64, t: &mut Totals) {
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let disk = SimDisk::new(seed);
    disk.create_dir_all(Path::new("/data")).unwrap();
    let opts = RecoveryOptions {
        dir: wal_dir(),
        shard: 0,
        segment_size: SEG,
        read_only: false,
    };
    // Both write paths: O_DSYNC writes, and page-cache writes synced later.
    let cfg = WriterConfig {
        dir: wal_dir(),
        shard: 0,
        segment_size: SEG,
        mode: if rng.chance(0.5) {
            WriteMode::DirectSync
        } else {
            WriteMode::PageCache
        },
    };
    // Visible states recovery may come back with: the acknowledged one,
    // then those of commits in flight after it.
    let mut allowed: Vec<String> = Vec::new();
    let mut k = 0u64;
    t.seeds += 1;
    for _round in 0..6 {
        disk.set_faults(if rng.chance(0.5) {
            let p = [0.005, 0.02, 0.05][rng.below(3) as usize];
            Faults {
                write_eio: p,
                write_enospc: p,
                sync_eio: p,
                read_eio: p,
            }
        } else {
            Faults::default()
        });
        t.recoveries += 1;
        let floor = match read_floor(&disk) {
            Ok(f) => f,
            Err(_) => {
                t.recoveries_failed += 1;
                disk.crash(CrashMode::Subset);
                continue;
            }
        };
        let rec = match recover_shard_on(&disk, &opts, &limits(), &snap_dir(), floor) {
            Ok(r) => r,
            Err(RecoveryError::Wal(WalError::Io { .. })) => {
                t.recoveries_failed += 1;
                disk.crash(CrashMode::Subset);
                continue;
            }
            // An injected read error on a snapshot the WAL no longer
            // covers: start-up must refuse (and say why), not go on
            // without the data.
            Err(e @ (RecoveryError::Snapshot(_) | RecoveryError::NoUsableSnapshot { .. }))
                if e.to_string().contains("os error 5") =>
            {
                t.recoveries_failed += 1;
                disk.crash(CrashMode::Subset);
                continue;
            }
            Err(e) => panic!("seed {seed}: recovery failed: {e}"),
        };
        if rec.snapshot_start.is_some() {
            t.recovered_from_snapshot += 1;
        }
        if trace() {
            eprintln!(
                "recovered: floor {floor} snapshot {:?} skipped {:?} wal segments {:?} records {} last {} torn {:?}",
                rec.snapshot_start, rec.skipped, rec.wal.segments, rec.wal.records, rec.wal.last_offset, rec.wal.torn
            );
        }
        let next_offset = rec.wal.last_offset.max(rec.engine.max_offset()) + 1;
        let mut engine = rec.engine;
        let now = visible(&mut engine);
        if allowed.is_empty() {
            assert!(!now.contains("\"state\""), "seed {seed}: data from nowhere");
        } else {
            if !allowed.contains(&now) {
                let short = |s: &str| -> Vec<String> {
                    s.lines()
                        .map(|l| {
                            let p = l.matches('p').count();
                            format!(
                                "{} [{p} p]",
                                l.replace('p', "").chars().take(240).collect::<String>()
                            )
                        })
                        .collect()
                };
                let got = short(&now);
                let mut diffs = String::new();
                for (n, a) in allowed.iter().enumerate() {
                    diffs += &format!("allowed #{n}:\n");
                    for (x, y) in short(a).iter().zip(&got) {
                        if x != y {
                            diffs += &format!("  want {x}\n  got  {y}\n");
                        }
                    }
                }
                panic!("seed {seed}: recovered a state no history allows (#0 = acknowledged):\n{diffs}");
            }
        }
        // What recovery returned is durable: the new acknowledged state.
        allowed = vec![now];
        // As start-up computes it (src/recover.rs).
        let mut next = next_offset;
        disk.set_capacity(if rng.chance(0.2) {
            Some(disk.used() + rng.below(4 * SEG))
        } else {
            None
        });
        let Ok(mut w) = WalWriter::open_on(disk.clone(), cfg.clone(), &rec.wal).await else {
            disk.crash(CrashMode::Subset);
            continue;
        };
        if !allowed[0].contains("\"checksum\"") {
            // The machine, once.
            let mut o = Offsets::new(next, next + 1);
            engine.execute(machine(), &mut o, 1);
            let staged = engine.take_staged();
            for s in &staged {
                w.stage(s.offset, s.kind, &s.bytes).expect("stage");
            }
            if w.commit(true).await.is_ok() {
                engine.commit_done();
                allowed = vec![visible(&mut engine)];
            } else {
                engine.rollback();
                allowed.push({
                    // In flight: the machine may or may not be there.
                    let mut e2 = Engine::new(&limits());
                    let mut o2 = Offsets::new(next, next + 1);
                    e2.execute(machine(), &mut o2, 1);
                    let _ = e2.take_staged();
                    visible(&mut e2)
                });
                if allowed[0] == allowed[1] {
                    allowed.pop();
                }
            }
            next += 1;
        }
        for _ in 0..rng.below(25) {
            // One drain: a few commands, one group commit.
            let n = 1 + rng.below(4);
            let mut o = Offsets::new(next, next + n);
            // The state after each record: a torn commit may leave any
            // prefix of its records (each one request, none acknowledged).
            let mut staged = Vec::new();
            let mut states = Vec::new();
            for _ in 0..n {
                k += 1;
                let cmd = random_command(&mut rng, k);
                let _ = engine.execute(cmd, &mut o, 1_000 + k as i64);
                let new = engine.take_staged();
                if !new.is_empty() {
                    staged.extend(new);
                    states.push(visible(&mut engine));
                }
            }
            next += n;
            if staged.is_empty() {
                engine.commit_done();
                continue;
            }
            for s in &staged {
                w.stage(s.offset, s.kind, &s.bytes).expect("stage");
            }
            let sync = rng.chance(0.8);
            let r = w.commit(sync).await;
            if trace() {
                let offs: Vec<u64> = staged.iter().map(|s| s.offset).collect();
                eprintln!("commit {offs:?} sync={sync} -> {r:?}");
            }
            match r {
                Ok(()) => {
                    t.commits_acked += 1;
                    engine.commit_done();
                    if sync {
                        allowed = vec![states.pop().expect("a state per record")];
                    } else {
                        allowed.extend(states);
                    }
                }
                Err(_) => {
                    t.commits_failed += 1;
                    engine.rollback();
                    // Its records may have reached the disk.
                    allowed.extend(states);
                }
            }
            if rng.chance(0.15) && !w.is_poisoned() {
                // A snapshot of everything below `next`, then compaction:
                // the floor is recorded before segments go.
                if w.sync().await.is_ok() {
                    allowed.truncate(1);
                    allowed[0] = visible(&mut engine);
                }
                let snap = snapshot(&disk, &mut engine, next);
                if trace() {
                    eprintln!("snapshot at {next}: {snap:?}");
                }
                match snap {
                    Ok(start) => {
                        t.snapshots += 1;
                        if rng.chance(0.7) && write_floor(&disk, start).is_ok() {
                            t.compactions += 1;
                            let gone = w.detach_segments_below(start, |_| true);
                            if trace() {
                                eprintln!("floor {start}; removing {gone:?}");
                            }
                            for p in &gone {
                                let _ = disk.remove(p);
                            }
                            let _ = disk.sync_dir(&wal_dir());
                        }
                    }
                    Err(_) => t.snapshots_failed += 1,
                }
            }
            if rng.chance(0.05) {
                disk.set_capacity(None);
            }
        }
        drop(w);
        disk.set_faults(Faults::default());
        let mode = if rng.chance(0.5) {
            CrashMode::DropUnsynced
        } else {
            CrashMode::Subset
        };
        if trace() {
            eprintln!("crash {mode:?}");
        }
        disk.crash(mode);
    }
    t.disk += disk.stats();
}

fn run_seeds(seeds: std::ops::Range<u64>) -> Totals {
    on_executor(move || async move {
        let mut t = Totals::default();
        for seed in seeds {
            run_seed(seed, &mut t).await;
        }
        t
    })
}

#[test]
fn shard_state_survives_random_faults_crashes_and_compaction() {
    let seeds = seeds_from_env(60);
    let t = run_seeds(seeds.clone());
    println!("[sim-shard] seeds {seeds:?}: {t:?}");
    assert_eq!(t.seeds, seeds.end - seeds.start);
    assert!(
        t.disk.crashes > 0 && t.commits_acked > 0 && t.snapshots > 0,
        "{t:?}"
    );
}

/// Seeds that found real bugs, kept as regressions: 195 (a segment
/// whose creation stopped at the directory sync was reused without it, so
/// acknowledged records synced into it vanished with its entry in a crash)
/// and 657 (after start-up fell back past an unreadable newest snapshot,
/// new records took offsets that snapshot covers; a later start-up that
/// could read it skipped them as already in it).
#[test]
fn seeds_that_found_bugs_stay_fixed() {
    for seed in [195, 657] {
        let t = run_seeds(seed..seed + 1);
        assert_eq!(t.seeds, 1);
    }
}

//! Deterministic simulation: the WAL writer and recovery on a simulated
//! disk ([`rstmdb_wal::sim`]) that fails writes, syncs and reads, tears
//! writes, runs out of space, and crashes keeping any subset of the unsynced
//! writes. Each seed runs a random workload of commits, faults and crashes;
//! after every recovery:
//!
//! * every acknowledged record (a commit with sync that returned Ok, or a
//!   record a previous recovery returned) is there, with its payload;
//! * nothing else is there but records handed to a commit (the in-flight
//!   set), in offset order;
//! * recovery never reports corruption (the simulated disk never damages
//!   synced data), and fails only with an injected I/O error;
//! * read-only recovery sees the same records, and a second recovery after
//!   the repair changes nothing;
//! * a writer that failed a write or sync refuses every later commit.
//!
//! `make test` runs `SIM_SEEDS` seeds (default 200); `make sim` runs many
//! more and prints the totals recorded in docs/DURABILITY.md.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rstmdb_wal::segment::BLOCK;
use rstmdb_wal::sim::{on_executor, seeds_from_env, CrashMode, Faults, Rng, SimDisk, SimStats};
use rstmdb_wal::{
    recovery::recover_on, RecoveryOptions, WalError, WalWriter, WriteMode, WriterConfig,
};

/// Small segments, so that commits rotate and span segments often.
const SEG: u64 = 16 * BLOCK;

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    seeds: u64,
    rounds: u64,
    commits_acked: u64,
    commits_failed: u64,
    records_acked: u64,
    recoveries: u64,
    recoveries_failed: u64,
    /// What the simulated disk did (faults, crashes, writes lost and torn).
    disk: SimStats,
    /// Synced records damaged on purpose (each refused by recovery).
    damaged: u64,
}

/// What the test knows of every record handed to the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    payload: Vec<u8>,
    /// Its commit returned Ok (it is on its way to the disk; a later sync
    /// makes it durable). A record of a failed commit may or may not be
    /// on disk: never acknowledged, only a recovery can settle it.
    committed: bool,
    acked: bool,
}

fn payload(rng: &mut Rng, offset: u64) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => rng.below(3 * SEG) as usize, // larger than a segment
        1..=3 => rng.below(12 * 1024) as usize,
        _ => rng.below(600) as usize,
    };
    let mut p = offset.to_le_bytes().to_vec();
    p.extend((0..len).map(|i| (i as u64 ^ offset) as u8));
    p
}

fn faults(rng: &mut Rng) -> Faults {
    let p = [0.0, 0.002, 0.01, 0.05][rng.below(4) as usize];
    Faults {
        write_eio: p,
        write_enospc: p / 2.0,
        sync_eio: p,
        read_eio: p / 2.0,
    }
}

/// Recovers, checking the records against the model; returns the
/// recovered state or None when an injected fault stopped recovery.
fn recover_checked(
    disk: &SimDisk,
    opts: &RecoveryOptions,
    model: &mut BTreeMap<u64, Rec>,
    seed: u64,
    t: &mut Totals,
) -> Option<rstmdb_wal::Recovered> {
    t.recoveries += 1;
    let mut seen: Vec<(u64, Vec<u8>)> = Vec::new();
    let rec = match recover_on(disk, opts, |r| {
        seen.push((r.offset, r.payload.to_vec()));
        Ok(())
    }) {
        Ok(r) => r,
        Err(WalError::Io { .. }) => {
            t.recoveries_failed += 1;
            return None;
        }
        Err(e) => panic!("seed {seed}: recovery failed without damage to synced data: {e}"),
    };
    // Offsets increase, each record is one that was handed to a commit,
    // with its payload, and no acknowledged record is missing.
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "seed {seed}: offsets out of order"
    );
    for (off, p) in &seen {
        let m = model
            .get(off)
            .unwrap_or_else(|| panic!("seed {seed}: record {off} was never written"));
        assert_eq!(&m.payload, p, "seed {seed}: record {off} changed");
    }
    let got: std::collections::BTreeSet<u64> = seen.iter().map(|r| r.0).collect();
    if trace() {
        eprintln!(
            "recovered {got:?} torn={:?} resume={:?}",
            rec.torn, rec.resume
        );
    }
    for (off, m) in model.iter() {
        assert!(
            !m.acked || got.contains(off),
            "seed {seed}: acknowledged record {off} lost"
        );
    }
    // What recovery returned is durable now (it synced the tail): from
    // here on it counts as acknowledged; the rest is gone for good.
    model.retain(|off, _| got.contains(off));
    for m in model.values_mut() {
        m.committed = true;
        m.acked = true;
    }
    // A second look, read-only, then repairing again: the same records,
    // no torn tail left.
    let faults_were = disk.stats().faults;
    let mut again = Vec::new();
    let ro = RecoveryOptions {
        read_only: true,
        ..opts.clone()
    };
    if let Ok(r2) = recover_on(disk, &ro, |r| {
        again.push(r.offset);
        Ok(())
    }) {
        assert!(r2.torn.is_none(), "seed {seed}: repair left a torn tail");
        assert_eq!(
            again,
            got.iter().copied().collect::<Vec<_>>(),
            "seed {seed}: a second recovery disagrees"
        );
    } else {
        assert!(disk.stats().faults > faults_were, "seed {seed}");
    }
    Some(rec)
}

fn trace() -> bool {
    std::env::var_os("SIM_TRACE").is_some()
}

/// Media damage to data that was made durable: a byte flipped inside the
/// records of a segment that is not the newest one holding records (every
/// such segment was synced before the next one got a record). Start-up must
/// stop and name the file and the byte, never go on without the records;
/// then the byte is restored (as from a backup) and the run goes on.
fn damage_synced_data(
    disk: &SimDisk,
    opts: &RecoveryOptions,
    rng: &mut Rng,
    seed: u64,
    t: &mut Totals,
) {
    use rstmdb_wal::storage::Storage;
    let mut with_records: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut names = disk.read_dir(&opts.dir).unwrap_or_default();
    names.sort();
    for name in names.iter().filter(|n| n.ends_with(".wal")) {
        let path = opts.dir.join(name);
        let bytes = disk.read(&path).expect("read");
        if bytes.len() > BLOCK as usize && bytes[BLOCK as usize] != 0 {
            with_records.push((path, bytes));
        }
    }
    if with_records.len() < 2 {
        return;
    }
    let (path, bytes) = with_records.swap_remove(rng.below(with_records.len() as u64 - 1) as usize);
    // The byte ranges of its records (padding is never read: a flip there
    // destroys nothing).
    let mut records = Vec::new();
    let mut at = BLOCK as usize;
    while at < bytes.len() && bytes[at] != 0 {
        match rstmdb_wal::record::decode(&bytes[at..]) {
            rstmdb_wal::record::Decoded::Record(_, _, n) => {
                records.push((at, n));
                at += n;
                if at >= bytes.len() || bytes[at] == 0 {
                    at = (at as u64).div_ceil(BLOCK) as usize * BLOCK as usize;
                }
            }
            rstmdb_wal::record::Decoded::Invalid(_) => break,
        }
    }
    let Some(&(start, n)) = records.get(rng.below(records.len().max(1) as u64) as usize) else {
        return;
    };
    let pos = (start + rng.below(n as u64) as usize) as u64;
    let old = bytes[pos as usize];
    disk.write_at(&path, pos, &[old ^ 0x5A]).expect("damage");
    disk.sync_file(&path).expect("damage");
    t.damaged += 1;
    match recover_on(disk, opts, |_| Ok(())) {
        Err(WalError::Corrupt { path: p, .. }) => assert_eq!(p, path, "seed {seed}"),
        other => panic!(
            "seed {seed}: a damaged synced record in {} at byte {pos} was not refused: {other:?}",
            path.display()
        ),
    }
    disk.write_at(&path, pos, &[old]).expect("restore");
    disk.sync_file(&path).expect("restore");
}

async fn run_seed(seed: u64, t: &mut Totals) {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let disk = SimDisk::new(seed);
    let dir = PathBuf::from("/data/shard-000/wal");
    let opts = RecoveryOptions {
        dir: dir.clone(),
        shard: 0,
        segment_size: SEG,
        read_only: false,
    };
    // Both write paths: O_DSYNC writes, and page-cache writes synced later.
    let cfg = WriterConfig {
        dir,
        shard: 0,
        segment_size: SEG,
        mode: if rng.chance(0.5) {
            WriteMode::DirectSync
        } else {
            WriteMode::PageCache
        },
    };
    let mut model: BTreeMap<u64, Rec> = BTreeMap::new();
    let mut next = 1u64;
    t.seeds += 1;
    for _round in 0..8 {
        t.rounds += 1;
        // Recovery, possibly under faults (then it may fail: crash and try
        // again, as an operator restarting the server would).
        disk.set_faults(if rng.chance(0.3) {
            faults(&mut rng)
        } else {
            Faults::default()
        });
        let Some(rec) = recover_checked(&disk, &opts, &mut model, seed, t) else {
            disk.crash(CrashMode::Subset);
            continue;
        };
        next = next.max(rec.last_offset + 1);
        // Space may run out (new segments then fail) and come back.
        disk.set_capacity(if rng.chance(0.2) {
            Some(disk.used() + rng.below(3 * SEG))
        } else {
            None
        });
        disk.set_faults(faults(&mut rng));
        let Ok(mut w) = WalWriter::open_on(disk.clone(), cfg.clone(), &rec).await else {
            disk.crash(CrashMode::Subset);
            continue;
        };
        let mut poisoned = false;
        for _ in 0..rng.below(30) {
            let n = 1 + rng.below(5);
            let mut staged = Vec::new();
            for _ in 0..n {
                let p = payload(&mut rng, next);
                if w.stage(next, 1, &p).is_ok() {
                    staged.push((next, p));
                }
                next += 1 + rng.below(2);
            }
            let sync = rng.chance(0.8);
            // Handed to a commit: from now on it may be on disk.
            for (off, p) in &staged {
                model.insert(
                    *off,
                    Rec {
                        payload: p.clone(),
                        committed: false,
                        acked: false,
                    },
                );
            }
            let r = w.commit(sync).await;
            if trace() {
                let offs: Vec<(u64, usize)> = staged.iter().map(|(o, p)| (*o, p.len())).collect();
                eprintln!(
                    "commit {offs:?} sync={sync} -> {r:?} segments={:?}",
                    w.segments()
                );
            }
            match r {
                Ok(()) => {
                    assert!(!poisoned, "seed {seed}: a poisoned writer committed");
                    t.commits_acked += 1;
                    for (off, _) in &staged {
                        model.get_mut(off).expect("staged").committed = true;
                    }
                    if sync {
                        // Every committed record is durable now.
                        for m in model.values_mut().filter(|m| m.committed) {
                            if !m.acked {
                                t.records_acked += 1;
                            }
                            m.acked = true;
                        }
                    }
                }
                Err(_) => {
                    t.commits_failed += 1;
                    // A failed segment creation writes nothing and leaves
                    // the writer usable; a failed write or sync poisons it.
                    poisoned |= w.is_poisoned();
                }
            }
            if rng.chance(0.05) {
                // Space comes back.
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
        if rng.chance(0.2) {
            damage_synced_data(&disk, &opts, &mut rng, seed, t);
        }
    }
    // A last recovery without faults always succeeds.
    disk.set_faults(Faults::default());
    disk.set_capacity(None);
    assert!(
        recover_checked(&disk, &opts, &mut model, seed, t).is_some(),
        "seed {seed}: final recovery failed"
    );
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
fn wal_survives_random_faults_and_crashes() {
    let seeds = seeds_from_env(200);
    let count = seeds.end - seeds.start;
    let t = run_seeds(seeds.clone());
    println!("[sim] seeds {seeds:?}: {t:?}");
    assert_eq!(t.seeds, count);
    assert!(
        t.disk.crashes > 0 && t.disk.faults > 0 && t.records_acked > 0,
        "{t:?}"
    );
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let a = run_seeds(7..12);
    let b = run_seeds(7..12);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

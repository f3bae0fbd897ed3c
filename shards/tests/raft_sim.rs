//! The replication simulation (`rstmdb_shards::replication::sim`) over
//! many seeds: a shard replicated by three- and five-node groups under
//! message loss, duplication, reordering, partitions, crashes with torn
//! writes, and restarts, its clients' history checked for
//! linearizability. `SIM_SEEDS` / `SIM_FIRST_SEED` choose the seeds (`make sim`
//! runs thousands); a failing seed is named in the failure and replays
//! alone with `SIM_FIRST_SEED=<seed> SIM_SEEDS=1`.

use rstmdb_shards::replication::sim::{run, SimConfig, SimReport};
use rstmdb_wal::sim::seeds_from_env;

fn run_seeds(nodes: u64, default_seeds: u64) -> SimReport {
    let mut total = SimReport::default();
    let seeds = seeds_from_env(default_seeds);
    let count = seeds.end - seeds.start;
    for seed in seeds {
        let cfg = SimConfig {
            nodes,
            ..SimConfig::default()
        };
        match run(seed, cfg) {
            Ok(r) => total.add(&r),
            Err(e) => panic!("seed {seed} ({nodes} nodes): {e}"),
        }
    }
    eprintln!("{nodes} nodes, {count} seeds: {total:?}");
    assert!(total.acknowledged > 0, "no proposal was ever acknowledged");
    assert!(total.crashes > 0 && total.partitions > 0, "no fault struck");
    assert!(
        total.wal_lost > 0,
        "no crash took WAL records to catch up on"
    );
    assert!(total.installs > 0, "no follower caught up by a snapshot");
    total
}

#[test]
fn three_nodes_lose_no_acknowledged_proposal() {
    run_seeds(3, 300);
}

#[test]
fn five_nodes_lose_no_acknowledged_proposal() {
    run_seeds(5, 150);
}

/// The same seed gives the same run: the simulation is a function of it.
#[test]
fn a_seed_replays_exactly() {
    let a = run(7, SimConfig::default()).unwrap();
    let b = run(7, SimConfig::default()).unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

/// Seeds that caught a bug (under a mutation of the code, see
/// docs/DURABILITY.md), kept so that every run replays them whatever
/// `SIM_SEEDS` says: 824 and 1270 end in a stalled leader answering a read
/// after the new leader acknowledged a creation. They replay the same
/// scenario only while the simulation draws its faults as it does now.
#[test]
fn regression_seeds() {
    for (seed, nodes) in [(824, 3), (1270, 5)] {
        let cfg = SimConfig {
            nodes,
            ..SimConfig::default()
        };
        if let Err(e) = run(seed, cfg) {
            panic!("seed {seed} ({nodes} nodes): {e}");
        }
    }
}

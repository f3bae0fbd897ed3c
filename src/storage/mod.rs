//! The data directory on disk ([`datadir`]: lock, layout, manifest),
//! start-up recovery of every shard ([`recover`]) and re-sharding
//! ([`reshard`]). The WAL and snapshot formats live in the `rstmdb-wal` and
//! `rstmdb-shards` crates.

pub mod datadir;
pub mod recover;
pub mod reshard;

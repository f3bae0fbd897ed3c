//! `rstmdb`: a thread-per-core state-machine database server speaking RCP,
//! wire-compatible with rstmdb 0.3.0.
//!
//! Start-up: configuration → the client and metrics addresses checked →
//! data directory (lock, shard count) → every shard's WAL recovered in
//! parallel → machine definitions unioned across shards → pinned glommio
//! executors as `server.layout` plans them (by default each owns a shard
//! and accepts connections) → every shard ready, then every frontend
//! listening → serve until SIGINT/SIGTERM → stop accepting, finish
//! in-flight cycles, sync every WAL, exit 0. A second signal exits at once.

pub mod auth;
pub mod batch;
pub mod compaction;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod idle;
pub mod layout;
pub mod listen;
pub mod ops;
pub mod protocol;
pub mod recover;
pub mod reshard;
pub mod router;
pub mod server;
pub mod session;
pub mod subscriptions;
pub mod telemetry;
pub mod ticker;
pub mod tls;
pub mod wal_tool;
pub mod watch;

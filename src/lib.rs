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
//!
//! Modules by role; imports go one way, down this list:
//!
//! * [`daemon`]: the process — configuration, recovery, executors, signals.
//! * [`net`]: listeners, the accept loop and each connection's loop, idle
//!   connections.
//! * [`service`]: what a request does — session state, one planner per
//!   operation, routing to shards, batches, watches and subscriptions,
//!   compaction rounds.
//! * [`storage`]: the data directory, start-up recovery, re-sharding.
//! * [`security`]: token authentication and TLS.
//! * [`telemetry`], [`ticker`]: metrics; housekeeping ticks.
//! * [`protocol`]: RCP frames, the JSON envelope, the operation names.
//! * [`config`]: settings and the executor layout.
//! * [`tools`]: the offline WAL tools (`rstmdb wal …`).

pub mod cluster;
pub mod config;
pub mod daemon;
pub mod net;
pub mod protocol;
pub mod security;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod ticker;
pub mod tools;

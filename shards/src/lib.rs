//! The shard engine: machine definitions, guards, instances, idempotency,
//! and the shard loop that group-commits them to the WAL.
//!
//! Knows nothing of sockets or the wire protocol: it receives typed
//! [`commands::Command`]s in batches over flume channels and answers with
//! [`commands::Reply`]s.

pub mod atomic;
pub mod commands;
pub mod ctx;
pub mod definition;
pub mod engine;
pub mod error;
pub mod guard;
pub mod idempotency;
pub mod lincheck;
pub mod recovery;
pub mod replication;
pub mod reshard;
pub mod routing;
pub mod sequencer;
pub mod shard;
pub mod snapshot;
pub mod wal_entry;

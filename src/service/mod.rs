//! What the server does with a request, below the connection loop:
//! session state ([`session`]), planning each operation ([`ops`]), routing
//! to shards and merging answers ([`router`]), BATCH ([`batch`]), WATCH_*
//! delivery ([`watch`]) over the per-frontend subscription hub
//! ([`subscriptions`]), and compaction rounds ([`compaction`]).
//!
//! Imports go one way: `subscriptions` ← `session` ← `ops` ← `router` ←
//! `compaction` ← `watch` ← `batch`.

pub mod batch;
pub mod compaction;
pub mod ops;
pub mod replication_status;
pub mod router;
pub mod session;
pub mod subscriptions;
pub mod watch;

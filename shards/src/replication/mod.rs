//! Replication of a shard's log across nodes (issue 17): one Raft group
//! per shard, on tikv's raft-rs engine (`docs/ARCHITECTURE.md`,
//! "Replication"). The engine decides elections, log matching and commit;
//! this module drives it ([`Replica`]), holds its log ([`RaftLog`]) and
//! proves the whole under a deterministic simulation of nodes, disks,
//! network faults and crashes ([`sim`]).

pub mod log;
pub mod payload;
pub mod replica;
pub mod sim;
pub mod state;
pub mod store;
pub mod wire;

pub use log::{LogState, RaftLog};
pub use replica::{Applied, Output, Persist, ProposeError, Proposed, Replica, ReplicaConfig};
pub use state::{DrainError, Progress, ReplicatedShard};

//! What the frontend sends a shard and what the shard answers.
//!
//! Requests are parsed and validated by the frontend (it must decode them to
//! route anyway); a shard receives typed commands in batches and answers each
//! batch with one message.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::ctx::Ctx;
use crate::definition::MachineDef;
use crate::error::ApiError;

/// One operation for a shard.
#[derive(Debug, Clone)]
pub enum Command {
    /// Register a machine version (sent to every shard).
    PutMachine {
        /// Name.
        machine: String,
        /// Version.
        version: u32,
        /// Parsed definition, or why it is invalid (reported after the
        /// version-limit check, as the reference orders them).
        def: Result<Arc<MachineDef>, ApiError>,
        /// The definition as submitted (logged verbatim).
        raw: Arc<Value>,
        /// `storage.max_machine_versions` (0 = unlimited).
        max_versions: u32,
    },
    /// Read a machine version.
    GetMachine {
        /// Name.
        machine: String,
        /// Version.
        version: u32,
    },
    /// List machine names and versions.
    ListMachines,
    /// Create an instance.
    CreateInstance {
        /// Id (given, generated or derived from the idempotency key).
        instance_id: String,
        /// Machine name.
        machine: String,
        /// Machine version.
        version: u32,
        /// Initial context (an object, D1).
        initial_ctx: Value,
        /// Idempotency key.
        idempotency_key: Option<String>,
        /// `storage.allow_instance_recreate`.
        allow_recreate: bool,
    },
    /// Read an instance.
    GetInstance {
        /// Id.
        instance_id: String,
    },
    /// This shard's share of a LIST_INSTANCES page.
    ListInstances {
        /// Machine filter.
        machine: Option<String>,
        /// State filter.
        state: Option<String>,
        /// How many of the smallest matching ids to return (offset + limit).
        take: usize,
    },
    /// Soft-delete an instance.
    DeleteInstance {
        /// Id.
        instance_id: String,
        /// Idempotency key (logged only).
        idempotency_key: Option<String>,
    },
    /// Apply an event.
    ApplyEvent(ApplyEvent),
    /// WAL figures of this shard.
    WalStats,
    /// Remove every instance, machine and idempotency entry (FLUSH_ALL,
    /// sent to every shard).
    FlushAll,
}

/// APPLY_EVENT parameters.
#[derive(Debug, Clone)]
pub struct ApplyEvent {
    /// Target instance.
    pub instance_id: String,
    /// Event name.
    pub event: String,
    /// Payload (null when absent).
    pub payload: Value,
    /// Optimistic check on the state.
    pub expected_state: Option<String>,
    /// Optimistic check on last_wal_offset.
    pub expected_wal_offset: Option<u64>,
    /// Stored as last_event_id and echoed.
    pub event_id: Option<String>,
    /// Per-instance dedupe key.
    pub idempotency_key: Option<String>,
}

impl Command {
    /// Whether the command may append a WAL record (used to reserve offsets).
    pub fn may_write(&self) -> bool {
        matches!(
            self,
            Command::PutMachine { .. }
                | Command::CreateInstance { .. }
                | Command::DeleteInstance { .. }
                | Command::ApplyEvent(_)
                | Command::FlushAll
        )
    }
}

/// A shard's answer to one command.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The finished `result` object, serialized.
    Json(Vec<u8>),
    /// An error answer.
    Error(ApiError),
    /// PUT_MACHINE outcome on this shard (merged by the frontend).
    PutMachine {
        /// Newly stored here.
        created: bool,
        /// Stored checksum.
        checksum: String,
    },
    /// This shard's matches for LIST_INSTANCES, sorted by id.
    Instances {
        /// All matches on this shard.
        total: u64,
        /// The `take` smallest ids.
        items: Vec<InstanceSummary>,
    },
    /// This shard's WAL figures.
    WalStats(ShardWalStats),
    /// What FLUSH_ALL removed on this shard.
    Flushed {
        /// Instances removed (active and deleted).
        instances: u64,
        /// (name, version) pairs removed.
        machines: u64,
    },
    /// Not executed: the answers to the batch's earlier commands reached
    /// [`BATCH_ANSWER_BYTES`]. The command comes back to be sent again,
    /// with every later command of the batch (so order is kept).
    Deferred(Command),
}

/// Answer bytes a shard produces for one [`Batch`] before it defers the
/// rest of it ([`Reply::Deferred`]): what one connection's answers may
/// hold in memory per shard, plus the one answer that crosses it.
pub const BATCH_ANSWER_BYTES: usize = 4 * 1024 * 1024;

impl Reply {
    /// About how many bytes the answer occupies.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Reply::Json(b) => b.len(),
            Reply::Instances { items, .. } => items.len() * 96,
            _ => 64,
        }
    }
}

/// One LIST_INSTANCES item (fields in the reference's alphabetical order).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceSummary {
    /// Created, Unix ms.
    pub created_at: i64,
    /// Instance id.
    pub id: String,
    /// Offset of the latest record.
    pub last_wal_offset: u64,
    /// Machine name.
    pub machine: String,
    /// Current state.
    pub state: String,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// Machine version.
    pub version: u32,
}

/// WAL figures of one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardWalStats {
    /// Records written over the log's life.
    pub entries: u64,
    /// Segments present.
    pub segments: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// I/O counters.
    pub io: rstmdb_wal::IoStats,
}

/// A committed transition, for subscribers (SEMANTICS.md §10): every field
/// of the protocol's event message but the subscription id.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// Offset of the apply_event record.
    pub wal_offset: u64,
    /// Instance id.
    pub instance_id: String,
    /// Machine name.
    pub machine: String,
    /// Machine version.
    pub version: u32,
    /// State before.
    pub from_state: String,
    /// State after.
    pub to_state: String,
    /// Event name.
    pub event: String,
    /// The request's payload (null when absent).
    pub payload: Value,
    /// Context after the merge.
    pub ctx: Ctx,
    /// Approximate bytes it occupies (its WAL entry's size): bounds the
    /// subscription hub's memory.
    pub size: usize,
}

/// A batch of commands from one connection's read cycle.
pub struct Batch {
    /// (slot, command): the slot is echoed in the answer.
    pub commands: Vec<(u32, Command)>,
    /// Where to send the answers.
    pub reply_to: flume::Sender<BatchReply>,
    /// Cluster mode: reads a node answers from its own applied state even
    /// when it does not lead (watch subscriptions, WAL_STATS, and reads
    /// under `cluster.follower_reads: stale`). Ignored when standalone.
    pub node_local: bool,
}

/// The answers to one [`Batch`], in its order.
pub struct BatchReply {
    /// Which shard answered.
    pub shard: usize,
    /// (slot, reply).
    pub replies: Vec<(u32, Reply)>,
}

//! The JSON payloads of WAL records (SEMANTICS.md §11.2, the reference's
//! entry shapes, so WAL_READ can return them unchanged), plus the timestamps
//! our server keeps across restarts (DECISIONS D22).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ctx::Ctx;

/// Record kind bytes (the reference's type numbers).
pub mod kind {
    /// `put_machine`
    pub const PUT_MACHINE: u8 = 1;
    /// `create_instance`
    pub const CREATE_INSTANCE: u8 = 2;
    /// `apply_event`
    pub const APPLY_EVENT: u8 = 3;
    /// `delete_instance`
    pub const DELETE_INSTANCE: u8 = 4;
    /// `flush_all` (ours: FLUSH_ALL is durable, DECISIONS D12)
    pub const FLUSH_ALL: u8 = 7;
    /// `batch_part` (ours: one shard's part of an atomic batch)
    pub const BATCH_PART: u8 = 8;
    /// `batch_abort` (ours: a batch part undone at recovery)
    pub const BATCH_ABORT: u8 = 9;
}

/// One change inside a batch part, with its own offset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchEntry {
    /// The change's offset (what its answer reported).
    pub offset: u64,
    /// The change.
    pub entry: WalEntry,
}

/// One logged change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WalEntry {
    /// A machine definition registered (logged by every shard).
    PutMachine {
        /// Machine name.
        machine: String,
        /// Version.
        version: u32,
        /// Checksum of the normalized definition.
        definition_hash: String,
        /// The definition as submitted.
        definition: Value,
    },
    /// An instance created.
    CreateInstance {
        /// Instance id.
        instance_id: String,
        /// Machine name.
        machine: String,
        /// Machine version.
        version: u32,
        /// The machine's initial state.
        initial_state: String,
        /// Initial context (always an object, D1).
        initial_ctx: Ctx,
        /// Idempotency key of the create, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// Creation time, Unix ms.
        #[serde(default)]
        ts: i64,
    },
    /// An event applied.
    ApplyEvent {
        /// Instance id.
        instance_id: String,
        /// The instance's machine (ours: lets subscribers catching up from
        /// the WAL filter by machine and fill the event's fields).
        #[serde(default)]
        machine: String,
        /// The instance's machine version.
        #[serde(default)]
        version: u32,
        /// Event name.
        event: String,
        /// State before.
        from_state: String,
        /// State after.
        to_state: String,
        /// The request's payload (null when absent).
        payload: Value,
        /// Context after the merge.
        ctx: Ctx,
        /// The request's event id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        /// Idempotency key, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// Apply time, Unix ms.
        #[serde(default)]
        ts: i64,
    },
    /// Everything on this shard removed (FLUSH_ALL, logged so that it
    /// stays flushed after a restart, D12).
    FlushAll {
        /// Flush time, Unix ms.
        #[serde(default)]
        ts: i64,
    },
    /// One shard's part of an atomic batch: all of its changes in one
    /// record, so the part is durable whole or not at all. The batch counts
    /// only if every participant's part is durable (see ARCHITECTURE.md).
    BatchPart {
        /// Batch id.
        batch_id: String,
        /// Shards holding a part of this batch.
        participants: Vec<u32>,
        /// The changes, in order.
        entries: Vec<BatchEntry>,
    },
    /// A batch part undone at start-up because another participant's part
    /// was missing.
    BatchAbort {
        /// Batch id.
        batch_id: String,
    },
    /// An instance soft-deleted.
    DeleteInstance {
        /// Instance id.
        instance_id: String,
        /// Idempotency key, if any (only logged, as the reference does).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// Delete time, Unix ms.
        #[serde(default)]
        ts: i64,
    },
}

impl WalEntry {
    /// The record kind byte for this entry.
    pub fn kind(&self) -> u8 {
        match self {
            WalEntry::PutMachine { .. } => kind::PUT_MACHINE,
            WalEntry::CreateInstance { .. } => kind::CREATE_INSTANCE,
            WalEntry::ApplyEvent { .. } => kind::APPLY_EVENT,
            WalEntry::DeleteInstance { .. } => kind::DELETE_INSTANCE,
            WalEntry::FlushAll { .. } => kind::FLUSH_ALL,
            WalEntry::BatchPart { .. } => kind::BATCH_PART,
            WalEntry::BatchAbort { .. } => kind::BATCH_ABORT,
        }
    }
}

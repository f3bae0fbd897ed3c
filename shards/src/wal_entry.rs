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

impl WalEntry {
    /// The transitions this entry (at `offset`, `size` bytes logged) holds,
    /// as subscribers see them: an apply, or the applies of a batch part
    /// (its size shared among them). Catching up from the WAL and a
    /// replica serving watches from its applied log both read them here.
    pub fn into_watch_events(
        self,
        offset: u64,
        size: usize,
        out: &mut Vec<crate::commands::WatchEvent>,
    ) {
        match self {
            WalEntry::ApplyEvent {
                instance_id,
                machine,
                version,
                event,
                from_state,
                to_state,
                payload,
                ctx,
                ..
            } => out.push(crate::commands::WatchEvent {
                wal_offset: offset,
                instance_id,
                machine,
                version,
                from_state,
                to_state,
                event,
                payload,
                ctx,
                size,
            }),
            WalEntry::BatchPart { entries, .. } => {
                let each = size / entries.len().max(1);
                for e in entries {
                    e.entry.into_watch_events(e.offset, each, out);
                }
            }
            _ => {}
        }
    }
}

/// Appends a logged entry as WAL_READ shows it: the logged object with
/// `timestamp` (Unix ms, the value of `ts`) added beside `ts`, the name
/// rstmdb-studio reads for an instance's history. Inside a `batch_part`
/// each change gets it too. An entry without `ts` is copied unchanged.
pub fn append_read_view(kind_byte: u8, payload: &[u8], out: &mut Vec<u8>) {
    if kind_byte == kind::BATCH_PART {
        if let Some(text) = batch_part_read_view(payload) {
            out.extend_from_slice(&text);
            return;
        }
    }
    /// Only `ts`; every other field is skipped unparsed.
    #[derive(Deserialize)]
    struct Ts {
        ts: Option<i64>,
    }
    match (serde_json::from_slice::<Ts>(payload), payload.split_first()) {
        (Ok(Ts { ts: Some(ts) }), Some((b'{', rest))) => {
            out.extend_from_slice(b"{\"timestamp\":");
            out.extend_from_slice(ts.to_string().as_bytes());
            out.push(b',');
            out.extend_from_slice(rest);
        }
        _ => out.extend_from_slice(payload),
    }
}

/// A `batch_part` with `timestamp` beside `ts` in each of its changes;
/// `None` when the payload is not such an object.
fn batch_part_read_view(payload: &[u8]) -> Option<Vec<u8>> {
    let mut part: Value = serde_json::from_slice(payload).ok()?;
    for change in part.get_mut("entries")?.as_array_mut()? {
        if let Some(entry) = change.get_mut("entry").and_then(Value::as_object_mut) {
            if let Some(ts) = entry.get("ts").cloned() {
                entry.insert("timestamp".into(), ts);
            }
        }
    }
    serde_json::to_vec(&part).ok()
}

#[cfg(test)]
mod read_view_tests {
    use super::*;

    fn view(kind_byte: u8, payload: &str) -> Value {
        let mut out = Vec::new();
        append_read_view(kind_byte, payload.as_bytes(), &mut out);
        serde_json::from_slice(&out).expect("the view is JSON")
    }

    #[test]
    fn timestamp_repeats_ts() {
        let v = view(
            kind::APPLY_EVENT,
            r#"{"type":"apply_event","instance_id":"a","ctx":{"ts":1},"ts":1700000000123}"#,
        );
        assert_eq!(v["timestamp"], 1_700_000_000_123i64);
        assert_eq!(v["ts"], 1_700_000_000_123i64);
        assert_eq!(v["ctx"], serde_json::json!({"ts": 1}));
    }

    #[test]
    fn entries_without_ts_are_unchanged() {
        let text = r#"{"type":"put_machine","machine":"m","version":1}"#;
        let mut out = Vec::new();
        append_read_view(kind::PUT_MACHINE, text.as_bytes(), &mut out);
        assert_eq!(out, text.as_bytes());
    }

    #[test]
    fn batch_part_changes_get_timestamp() {
        let v = view(
            kind::BATCH_PART,
            r#"{"type":"batch_part","batch_id":"b","participants":[0],"entries":[{"offset":3,"entry":{"type":"delete_instance","instance_id":"x","ts":5}}]}"#,
        );
        assert_eq!(v["entries"][0]["entry"]["timestamp"], 5);
        assert_eq!(v["entries"][0]["offset"], 3);
    }
}

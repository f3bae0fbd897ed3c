//! BATCH (PROTOCOL.md §7.15, SEMANTICS.md §9).
//!
//! Best effort: the ops run one after another through the ordinary
//! dispatcher (each its own round trip, as in the reference: other
//! connections' requests may interleave); every op gets its own result.
//! Structural errors (an element without a string `op`, an unknown op name)
//! abort the whole batch with `BAD_REQUEST` after the preceding ops ran, as
//! the reference does. Nested batches are allowed (100 ops per level, at
//! most [`MAX_DEPTH`] levels).
//!
//! Atomic mode must be all-or-nothing across shards and crashes (D11); until
//! that protocol exists it is refused before any op runs.

use std::future::Future;
use std::pin::Pin;

use rstmdb_shards::error::ApiError;
use serde_json::Value;

use crate::ops::{self, Action, OpSettings};
use crate::router::Outcome;
use crate::session::Session;
use crate::watch::{self, Ctx};

/// Most ops per batch level (INFO's `max_batch_ops`).
pub const MAX_OPS: usize = 100;
/// Deepest nesting of batches inside batches.
pub const MAX_DEPTH: usize = 8;

/// The 25 operation names the protocol knows.
pub const OPS: [&str; 25] = [
    "HELLO",
    "AUTH",
    "PING",
    "BYE",
    "INFO",
    "REPLICATION_STATUS",
    "PUT_MACHINE",
    "GET_MACHINE",
    "LIST_MACHINES",
    "CREATE_INSTANCE",
    "GET_INSTANCE",
    "LIST_INSTANCES",
    "DELETE_INSTANCE",
    "APPLY_EVENT",
    "BATCH",
    "SNAPSHOT_INSTANCE",
    "WAL_READ",
    "WAL_STATS",
    "COMPACT",
    "WATCH_INSTANCE",
    "WATCH_ALL",
    "UNWATCH",
    "FLUSH_ALL",
    "REPLICATE",
    "REPLICATE_ACK",
];

/// What a batch produced.
pub struct BatchResult {
    /// The `result` object, or the error of the whole batch.
    pub result: Result<Vec<u8>, ApiError>,
    /// A BYE ran inside: close the connection after the answer.
    pub bye: bool,
}

/// Runs a BATCH request.
pub fn run<'a>(
    params: Value,
    session: &'a mut Session,
    ctx: &'a Ctx<'a>,
    settings: &'a OpSettings,
    depth: usize,
) -> Pin<Box<dyn Future<Output = BatchResult> + 'a>> {
    Box::pin(async move {
        let mut bye = false;
        let result = run_ops(params, session, ctx, settings, depth, &mut bye).await;
        BatchResult { result, bye }
    })
}

async fn run_ops(
    params: Value,
    session: &mut Session,
    ctx: &Ctx<'_>,
    settings: &OpSettings,
    depth: usize,
    bye: &mut bool,
) -> Result<Vec<u8>, ApiError> {
    if depth >= MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "batches nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let atomic = params.get("mode").and_then(Value::as_str) == Some("atomic");
    let Some(ops) = params.get("ops").and_then(Value::as_array) else {
        return Err(ApiError::bad_request("missing ops array"));
    };
    if ops.len() > MAX_OPS {
        return Err(ApiError::bad_request(format!(
            "batch size {} exceeds limit {MAX_OPS}",
            ops.len()
        )));
    }
    if atomic {
        return Err(ApiError::bad_request(
            "atomic BATCH is not supported by this server yet (no op was run); use best_effort mode",
        ));
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"results":["#);
    for (i, element) in ops.iter().enumerate() {
        let Some(op) = element.get("op").and_then(Value::as_str) else {
            return Err(ApiError::bad_request("missing op type"));
        };
        if !OPS.contains(&op) {
            return Err(ApiError::bad_request(format!(
                "unknown variant `{op}`, expected one of {}",
                OPS.iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let op_params = element.get("params").cloned().unwrap_or(Value::Null);
        let outcome = match ops::plan(op, op_params.clone(), session, settings) {
            Action::Bye => {
                *bye = true;
                Ok(br#"{"goodbye":true}"#.to_vec())
            }
            Action::Batch(inner) => {
                let nested = run(inner, session, ctx, settings, depth + 1).await;
                *bye |= nested.bye;
                nested.result
            }
            Action::Watch(spec) => watch::subscribe(spec, session, ctx).await,
            Action::Unwatch(id) => Ok(watch::unwatch(id, session)),
            action => match ctx.router.run(vec![action], ctx.replies).await.pop() {
                Some(Outcome::Done(r)) => r,
                Some(Outcome::Bye) | None => Ok(br#"{"goodbye":true}"#.to_vec()),
            },
        };
        if i > 0 {
            out.push(b',');
        }
        match outcome {
            Ok(result) => {
                out.extend_from_slice(br#"{"error":null,"result":"#);
                out.extend_from_slice(&result);
                out.extend_from_slice(br#","status":"ok"}"#);
            }
            Err(e) => {
                out.extend_from_slice(br#"{"error":"#);
                crate::protocol::envelope::error_object(&e, &mut out);
                out.extend_from_slice(br#","result":null,"status":"error"}"#);
            }
        }
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

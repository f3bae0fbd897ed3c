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
//! Atomic mode is all-or-nothing across shards and crashes (D11): see
//! [`run_atomic`].

use std::future::Future;
use std::pin::Pin;

use rstmdb_shards::atomic::Vote;
use rstmdb_shards::commands::{Command, Reply};
use rstmdb_shards::error::{ApiError, ErrorCode};
use rstmdb_shards::shard::{AtomicMsg, ShardMsg};
use serde_json::Value;

use crate::protocol::names::OPS;
use crate::service::ops::{self, Action, OpSettings};
use crate::service::router::Outcome;
use crate::service::session::Session;
use crate::service::watch::{self, Ctx};

/// Most ops per batch level (INFO's `max_batch_ops`).
pub const MAX_OPS: usize = 100;
/// Deepest nesting of batches inside batches.
pub const MAX_DEPTH: usize = 8;

/// The `op` of a batch element; an element without a string `op` or with
/// an unknown name is a structural error of the whole batch.
fn op_name(element: &Value) -> Result<&str, ApiError> {
    let Some(op) = element.get("op").and_then(Value::as_str) else {
        return Err(ApiError::bad_request("missing op type"));
    };
    if !OPS.contains(&op) {
        let expected: Vec<String> = OPS.iter().map(|o| format!("`{o}`")).collect();
        return Err(ApiError::bad_request(format!(
            "unknown variant `{op}`, expected one of {}",
            expected.join(", ")
        )));
    }
    Ok(op)
}

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

/// Ops an atomic batch may hold: single-instance operations and answers the
/// frontend gives itself.
const ATOMIC_OPS: [&str; 7] = [
    "CREATE_INSTANCE",
    "APPLY_EVENT",
    "DELETE_INSTANCE",
    "GET_INSTANCE",
    "PING",
    "INFO",
    "REPLICATION_STATUS",
];

/// How an op of an atomic batch is answered.
enum Planned {
    /// By the frontend itself.
    Local(Vec<u8>),
    /// By its shard's part.
    Shard,
}

fn atomic_failed(detail: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("atomic batch failed: {detail}"))
}

/// An atomic batch (D11): all or nothing, across shards and crashes.
/// Prepare (dry run + holds) on every participant, commit (each logs its
/// part as one record) once all voted yes, release once all parts are
/// durable; any failure aborts every part. See docs/ARCHITECTURE.md.
async fn run_atomic(
    ops: &[Value],
    session: &mut Session,
    ctx: &Ctx<'_>,
    settings: &OpSettings,
) -> Result<Vec<u8>, ApiError> {
    let mut planned = Vec::with_capacity(ops.len());
    let mut names = Vec::with_capacity(ops.len());
    let mut parts: std::collections::BTreeMap<usize, Vec<(u32, Command)>> = Default::default();
    for (i, element) in ops.iter().enumerate() {
        let op = op_name(element)?;
        if !ATOMIC_OPS.contains(&op) {
            return Err(atomic_failed(format!(
                "op {i} ({op}) cannot be part of an atomic batch"
            )));
        }
        let params = element.get("params").cloned().unwrap_or(Value::Null);
        names.push(op);
        planned.push(match ops::plan(op, params, session, settings) {
            Action::Local(Ok(r)) => Planned::Local(r),
            Action::Local(Err(e)) => {
                return Err(atomic_failed(format!(
                    "op {i} ({op}): {}: {}",
                    e.code.as_str(),
                    e.message
                )))
            }
            Action::Shard(shard, cmd) => {
                parts.entry(shard).or_default().push((i as u32, cmd));
                Planned::Shard
            }
            _ => {
                return Err(atomic_failed(format!(
                    "op {i} ({op}) cannot be part of an atomic batch"
                )))
            }
        });
    }
    let shards = ctx.router.shards();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let voters: Vec<usize> = parts.keys().copied().collect();

    // Phase 1: prepare. Our own sender is dropped before the answers are
    // awaited, so a shard that dies closes the channel instead of hanging us.
    let (vtx, vrx) = flume::bounded(voters.len().max(1));
    let mut contacted = Vec::with_capacity(voters.len());
    for (&shard, commands) in &parts {
        let msg = AtomicMsg::Prepare {
            batch_id: batch_id.clone(),
            commands: commands.clone(),
            reply_to: vtx.clone(),
        };
        if send(&shards[shard], msg).await.is_err() {
            abort(&batch_id, &contacted, shards).await;
            return Err(unavailable());
        }
        contacted.push(shard);
    }
    drop(vtx);
    let mut failure: Option<(u32, ApiError)> = None;
    let mut yes = Vec::new();
    for _ in 0..voters.len() {
        match vrx.recv_async().await {
            Ok((shard, Vote::Yes { .. })) => yes.push(shard),
            Ok((_, Vote::No { slot, error })) => {
                if failure.as_ref().is_none_or(|(s, _)| slot < *s) {
                    failure = Some((slot, error));
                }
            }
            Err(_) => {
                failure = failure.or(Some((0, unavailable())));
                break;
            }
        }
    }
    if let Some((slot, e)) = failure {
        abort(&batch_id, &yes, shards).await;
        let op = names.get(slot as usize).copied().unwrap_or("?");
        return Err(atomic_failed(format!(
            "op {slot} ({op}): {}: {}",
            e.code.as_str(),
            e.message
        )));
    }

    // Phase 2: every participant runs its part for real and logs it (even
    // an empty part: recovery counts the batch only if all parts are there).
    // From here until the release or abort is sent, a snapshot round must
    // not start: it would see some parts written and others not.
    let _gate = ctx.compactor.commit_gate().await;
    let participants: Vec<u32> = voters.iter().map(|&s| s as u32).collect();
    let (ctx_tx, ctx_rx) = flume::bounded(voters.len().max(1));
    let mut sent = 0;
    for &shard in &voters {
        let msg = AtomicMsg::Commit {
            batch_id: batch_id.clone(),
            participants: participants.clone(),
            reply_to: ctx_tx.clone(),
        };
        if send(&shards[shard], msg).await.is_ok() {
            sent += 1;
        }
    }
    drop(ctx_tx);
    let mut answers: Vec<Option<Result<Vec<u8>, ApiError>>> =
        (0..ops.len()).map(|_| None).collect();
    let mut commit_error = (sent < voters.len()).then(unavailable);
    for _ in 0..sent {
        match ctx_rx.recv_async().await {
            Ok((_, Ok(replies))) => {
                for (slot, r) in replies {
                    answers[slot as usize] = Some(match r {
                        Reply::Json(b) => Ok(b),
                        Reply::Error(e) => Err(e),
                        other => Err(ApiError::new(
                            ErrorCode::InternalError,
                            format!("unexpected reply {other:?}"),
                        )),
                    });
                }
            }
            Ok((_, Err(e))) => commit_error = commit_error.or(Some(e)),
            Err(_) => {
                commit_error = commit_error.or(Some(unavailable()));
                break;
            }
        }
    }
    if let Some(e) = commit_error {
        // Parts may be logged: replaying subscribers must skip them.
        ctx.hub.borrow().shared.add_aborted(batch_id.clone());
        abort(&batch_id, &voters, shards).await;
        return Err(e);
    }

    // Phase 3: every part is durable; the batch is committed.
    for &shard in &voters {
        let _ = shards[shard]
            .send_async(ShardMsg::Atomic(AtomicMsg::Release {
                batch_id: batch_id.clone(),
            }))
            .await;
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"results":["#);
    for (i, p) in planned.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let r = match p {
            Planned::Local(r) => Ok(r),
            Planned::Shard => answers[i].take().unwrap_or_else(|| Err(unavailable())),
        };
        push_result(&mut out, r);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::InternalError,
        "shard unavailable (server shutting down)",
    )
}

async fn send(shard: &flume::Sender<ShardMsg>, msg: AtomicMsg) -> Result<(), ApiError> {
    shard
        .send_async(ShardMsg::Atomic(msg))
        .await
        .map_err(|_| unavailable())
}

/// Aborts the batch on `shards` and waits until each has undone its part.
async fn abort(batch_id: &str, on: &[usize], shards: &[flume::Sender<ShardMsg>]) {
    let (tx, rx) = flume::bounded(on.len().max(1));
    let mut sent = 0;
    for &shard in on {
        let msg = AtomicMsg::Abort {
            batch_id: batch_id.to_owned(),
            reply_to: tx.clone(),
        };
        if shards[shard]
            .send_async(ShardMsg::Atomic(msg))
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    for _ in 0..sent {
        let _ = rx.recv_async().await;
    }
}

fn push_result(out: &mut Vec<u8>, r: Result<Vec<u8>, ApiError>) {
    match r {
        Ok(result) => {
            out.extend_from_slice(br#"{"error":null,"result":"#);
            out.extend_from_slice(&result);
            out.extend_from_slice(br#","status":"ok"}"#);
        }
        Err(e) => {
            out.extend_from_slice(br#"{"error":"#);
            crate::protocol::envelope::error_object(&e, out);
            out.extend_from_slice(br#","result":null,"status":"error"}"#);
        }
    }
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
        return run_atomic(ops, session, ctx, settings).await;
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"results":["#);
    for (i, element) in ops.iter().enumerate() {
        let op = op_name(element)?;
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
        push_result(&mut out, outcome);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

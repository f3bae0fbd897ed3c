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

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use rstmdb_shards::atomic::Vote;
use rstmdb_shards::commands::{Command, Reply};
use rstmdb_shards::error::{ApiError, ErrorCode};
use rstmdb_shards::shard::{AtomicMsg, PartAnswer, ShardMsg};
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
    let plan = plan_atomic(ops, session, settings)?;
    let shards = ctx.router.shards();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let voters: Vec<usize> = plan.parts.keys().copied().collect();
    prepare(&batch_id, &plan, shards).await?;
    // From here until the release or abort is sent, a snapshot round must
    // not start: it would see some parts written and others not.
    let _gate = ctx.compactor.commit_gate().await;
    let answers = commit(&batch_id, &voters, ops.len(), ctx, shards).await?;
    release(&batch_id, &voters, shards).await;
    Ok(assemble(plan.planned, answers))
}

/// Each participant shard's part: its ops' slots and commands, in batch order.
type Parts = BTreeMap<usize, Vec<(u32, Command)>>;

/// The shards' answers, by slot (`None`: no shard answered that op).
type Answers = Vec<Option<Result<Vec<u8>, ApiError>>>;

/// An atomic batch once planned, before any shard has seen it.
struct AtomicPlan<'a> {
    /// How each op is answered, in batch order.
    planned: Vec<Planned>,
    /// Each op's name, for the error of a failed op.
    names: Vec<&'a str>,
    /// Each participant's part.
    parts: Parts,
}

/// Splits the ops into the frontend's own answers and the shards' parts; an
/// op that cannot be atomic, or that fails already here, fails the batch.
fn plan_atomic<'a>(
    ops: &'a [Value],
    session: &mut Session,
    settings: &OpSettings,
) -> Result<AtomicPlan<'a>, ApiError> {
    let mut plan = AtomicPlan {
        planned: Vec::with_capacity(ops.len()),
        names: Vec::with_capacity(ops.len()),
        parts: Parts::new(),
    };
    for (i, element) in ops.iter().enumerate() {
        let op = op_name(element)?;
        if !ATOMIC_OPS.contains(&op) {
            return Err(not_atomic(i, op));
        }
        let params = element.get("params").cloned().unwrap_or(Value::Null);
        plan.names.push(op);
        let planned = match ops::plan(op, params, session, settings) {
            Action::Local(Ok(r)) => Planned::Local(r),
            Action::Local(Err(e)) => return Err(op_failed(i, op, &e)),
            Action::Shard(shard, cmd) => {
                plan.parts.entry(shard).or_default().push((i as u32, cmd));
                Planned::Shard
            }
            _ => return Err(not_atomic(i, op)),
        };
        plan.planned.push(planned);
    }
    Ok(plan)
}

/// Phase 1: every participant dry-runs its part and holds its instances; if
/// any cannot, the shards that voted yes are aborted (they hold a part).
async fn prepare(
    batch_id: &str,
    plan: &AtomicPlan<'_>,
    shards: &[flume::Sender<ShardMsg>],
) -> Result<(), ApiError> {
    let votes = send_prepares(batch_id, &plan.parts, shards).await?;
    let (yes, failure) = collect_votes(&votes, plan.parts.len()).await;
    if let Some((slot, e)) = failure {
        abort(batch_id, &yes, shards).await;
        let op = plan.names.get(slot as usize).copied().unwrap_or("?");
        return Err(op_failed(slot as usize, op, &e));
    }
    Ok(())
}

/// Sends every participant its part; if a shard is gone, aborts those
/// already asked. Our own sender is dropped before the votes are awaited,
/// so a shard that dies closes the channel instead of hanging us.
async fn send_prepares(
    batch_id: &str,
    parts: &Parts,
    shards: &[flume::Sender<ShardMsg>],
) -> Result<flume::Receiver<(usize, Vote)>, ApiError> {
    let (vtx, vrx) = flume::bounded(parts.len().max(1));
    let mut contacted = Vec::with_capacity(parts.len());
    for (&shard, commands) in parts {
        let msg = AtomicMsg::Prepare {
            batch_id: batch_id.to_owned(),
            commands: commands.clone(),
            reply_to: vtx.clone(),
        };
        if send(&shards[shard], msg).await.is_err() {
            abort(batch_id, &contacted, shards).await;
            return Err(unavailable());
        }
        contacted.push(shard);
    }
    drop(vtx);
    Ok(vrx)
}

/// Awaits the votes: the shards that voted yes, and the failure of the
/// earliest failed op (or a shard that died, which ends the wait).
async fn collect_votes(
    votes: &flume::Receiver<(usize, Vote)>,
    voters: usize,
) -> (Vec<usize>, Option<(u32, ApiError)>) {
    let mut failure: Option<(u32, ApiError)> = None;
    let mut yes = Vec::new();
    for _ in 0..voters {
        match votes.recv_async().await {
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
    (yes, failure)
}

/// Phase 2, under the commit gate: every participant runs its part for
/// real and logs it (even an empty part: recovery counts the batch only if
/// all parts are there). Any failure aborts every part.
async fn commit(
    batch_id: &str,
    voters: &[usize],
    slots: usize,
    ctx: &Ctx<'_>,
    shards: &[flume::Sender<ShardMsg>],
) -> Result<Answers, ApiError> {
    let (tx, rx) = flume::bounded(voters.len().max(1));
    let sent = send_commits(batch_id, voters, tx, shards).await;
    let short = (sent < voters.len()).then(unavailable);
    let (answers, failed) = collect_parts(&rx, sent, slots).await;
    if let Some(e) = short.or(failed) {
        // Parts may be logged: replaying subscribers must skip them.
        ctx.hub.borrow().shared.add_aborted(batch_id.to_owned());
        abort(batch_id, voters, shards).await;
        return Err(e);
    }
    Ok(answers)
}

/// Sends every participant the commit; returns how many got it. The
/// sender is dropped here, so a shard that dies closes the channel.
async fn send_commits(
    batch_id: &str,
    voters: &[usize],
    reply_to: flume::Sender<PartAnswer>,
    shards: &[flume::Sender<ShardMsg>],
) -> usize {
    let participants: Vec<u32> = voters.iter().map(|&s| s as u32).collect();
    let mut sent = 0;
    for &shard in voters {
        let msg = AtomicMsg::Commit {
            batch_id: batch_id.to_owned(),
            participants: participants.clone(),
            reply_to: reply_to.clone(),
        };
        if send(&shards[shard], msg).await.is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Awaits the `sent` parts' answers: each op's by its slot, and the first
/// error (a part that failed, or a shard that died, which ends the wait).
async fn collect_parts(
    parts: &flume::Receiver<PartAnswer>,
    sent: usize,
    slots: usize,
) -> (Answers, Option<ApiError>) {
    let mut answers: Answers = (0..slots).map(|_| None).collect();
    let mut error = None;
    for _ in 0..sent {
        match parts.recv_async().await {
            Ok((_, Ok(replies))) => {
                for (slot, r) in replies {
                    answers[slot as usize] = Some(part_reply(r));
                }
            }
            Ok((_, Err(e))) => error = error.or(Some(e)),
            Err(_) => {
                error = error.or(Some(unavailable()));
                break;
            }
        }
    }
    (answers, error)
}

/// One op's answer from its part's reply.
fn part_reply(r: Reply) -> Result<Vec<u8>, ApiError> {
    match r {
        Reply::Json(b) => Ok(b),
        Reply::Error(e) => Err(e),
        other => Err(ApiError::new(
            ErrorCode::InternalError,
            format!("unexpected reply {other:?}"),
        )),
    }
}

/// Phase 3: every part is durable, the batch is committed; the shards drop
/// their holds (nothing to wait for).
async fn release(batch_id: &str, voters: &[usize], shards: &[flume::Sender<ShardMsg>]) {
    for &shard in voters {
        let _ = shards[shard]
            .send_async(ShardMsg::Atomic(AtomicMsg::Release {
                batch_id: batch_id.to_owned(),
            }))
            .await;
    }
}

/// The `result` object: every op's answer in batch order, the frontend's
/// own or its shard's (a shard that did not answer: unavailable).
fn assemble(planned: Vec<Planned>, mut answers: Answers) -> Vec<u8> {
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
    out
}

/// Op `slot` may not be part of an atomic batch.
fn not_atomic(slot: usize, op: &str) -> ApiError {
    atomic_failed(format!(
        "op {slot} ({op}) cannot be part of an atomic batch"
    ))
}

/// Op `slot` failed with `e`, which fails the whole batch.
fn op_failed(slot: usize, op: &str, e: &ApiError) -> ApiError {
    atomic_failed(format!(
        "op {slot} ({op}): {}: {}",
        e.code.as_str(),
        e.message
    ))
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

//! Executing WATCH_INSTANCE / WATCH_ALL / UNWATCH for a connection, and
//! delivering its subscriptions' events (see `subscriptions` for the model).

use std::cell::RefCell;
use std::rc::Rc;

use futures_lite::{AsyncWrite, AsyncWriteExt};
use rstmdb_shards::commands::{Command, WatchEvent};
use rstmdb_shards::error::{ApiError, ErrorCode};
use serde_json::{json, Value};

use crate::protocol::frame;
use crate::service::compaction::Compactor;
use crate::service::ops::{Action, WatchSpec};
use crate::service::router::{Outcome, Replies, Router};
use crate::service::session::{Session, WireMode};
use crate::service::subscriptions::{
    encode_event, ensure_live, events_from_record, Hub, Subscription, SubscriptionMetrics, Take,
    CHUNK, MAX_SUBSCRIPTIONS_PER_CONNECTION,
};

/// Most delivery steps (window chunks or catch-up reads) per pass.
const STEPS_PER_PASS: usize = 16;
/// Most WAL records read per catch-up step.
const CATCH_UP_RECORDS: usize = 1024;
/// Events are written out whenever this many bytes are buffered.
const FLUSH_BYTES: usize = 256 * 1024;

/// What subscription handling needs from the connection.
pub struct Ctx<'a> {
    /// Shard access.
    pub router: &'a Router,
    /// The frontend's hub.
    pub hub: &'a Rc<RefCell<Hub>>,
    /// The connection's reply channel.
    pub replies: &'a Replies,
    /// Snapshot rounds and the atomic-batch commit gate.
    pub compactor: &'a std::sync::Arc<Compactor>,
}

/// Creates a subscription; answers the WATCH request.
pub async fn subscribe(
    spec: WatchSpec,
    session: &mut Session,
    ctx: &Ctx<'_>,
) -> Result<Vec<u8>, ApiError> {
    if session.subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
        return Err(ApiError::bad_request(format!(
            "too many subscriptions on this connection (limit {MAX_SUBSCRIPTIONS_PER_CONNECTION})"
        )));
    }
    ensure_live(ctx.hub, ctx.router.shards()).await;
    // The cursor is taken before the instance is read, so no transition
    // after the state we report can be missed.
    let mut cursor = spec
        .from_offset
        .unwrap_or_else(|| ctx.hub.borrow().released());
    let floor = ctx.hub.borrow().shared.wal_floor();
    // Only a replay can ask for what compaction removed; a live watch
    // starts at the released offset, whose history it does not need.
    if spec.from_offset.is_some() && cursor < floor {
        return Err(ApiError::bad_request(format!(
            "from_offset {cursor} is no longer available: the oldest retained offset is {floor} \
             (older records were compacted into snapshots)"
        )));
    }
    // Leased in the same synchronous step as the floor check: a compaction
    // round computing its floor from now on sees this cursor.
    let lease = ctx.hub.borrow().shared.lease(cursor);
    let id = format!("sub-{}", uuid::Uuid::new_v4());
    let reply = match &spec.instance {
        Some((shard, instance_id)) => {
            let get = Action::Shard(
                *shard,
                Command::GetInstance {
                    instance_id: instance_id.clone(),
                },
            );
            let bytes = match ctx.router.run(vec![get], ctx.replies).await.pop() {
                Some(Outcome::Done(r)) => r?,
                _ => return Err(ApiError::new(ErrorCode::InternalError, "shard unavailable")),
            };
            let inst: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::new(ErrorCode::InternalError, e.to_string()))?;
            // A live watch starts after the state it reports.
            if spec.from_offset.is_none() {
                if let Some(o) = inst["last_wal_offset"].as_u64() {
                    cursor = cursor.max(o + 1);
                }
            }
            json!({
                "current_state": inst["state"],
                "current_wal_offset": inst["last_wal_offset"],
                "instance_id": instance_id,
                "subscription_id": id,
            })
        }
        None => json!({"subscription_id": id, "wal_offset": ctx.router.sequencer().peek()}),
    };
    lease.store(cursor, std::sync::atomic::Ordering::SeqCst);
    session.subscriptions.push(Subscription {
        metrics: SubscriptionMetrics::new(spec.instance.is_some()),
        id,
        filter: spec.filter,
        include_ctx: spec.include_ctx,
        cursor,
        lease,
    });
    Ok(serde_json::to_vec(&reply).expect("serializable"))
}

/// UNWATCH: `removed` is false for an id this connection does not hold.
pub fn unwatch(id: String, session: &mut Session) -> Vec<u8> {
    let before = session.subscriptions.len();
    session.subscriptions.retain(|s| s.id != id);
    let removed = session.subscriptions.len() < before;
    serde_json::to_vec(&json!({"removed": removed, "subscription_id": id})).expect("serializable")
}

/// Writes events the connection's subscriptions can have now, at most
/// [`STEPS_PER_PASS`] chunks or catch-up reads, so that requests on the
/// same connection are not kept waiting behind a long catch-up. Returns
/// whether more is waiting. `Err` when the connection must close (socket
/// error, or a catch-up read that failed: never a silent gap, D19).
pub async fn deliver<S: AsyncWrite + Unpin>(
    session: &mut Session,
    ctx: &Ctx<'_>,
    stream: &mut S,
) -> std::io::Result<bool> {
    let mode = session.wire_mode;
    let mut out = Vec::new();
    let mut steps = 0;
    for sub in session.subscriptions.iter_mut() {
        loop {
            if steps >= STEPS_PER_PASS {
                write_and_flush(&out, stream).await?;
                return Ok(true);
            }
            steps += 1;
            let take = ctx.hub.borrow().take(sub.cursor, CHUNK);
            let more = match take {
                Take::Live(events, next) => {
                    let more = events.len() == CHUNK;
                    push_matching(sub, events.iter().map(|e| &**e), mode, &mut out);
                    sub.advance(next);
                    flush_if_large(&mut out, stream).await?;
                    more
                }
                Take::FromWal { below } => {
                    catch_up(sub, ctx, below, mode, &mut out, stream).await?
                }
            };
            if !more {
                break;
            }
        }
        let released = ctx.hub.borrow().released();
        sub.metrics
            .lag
            .record(released.saturating_sub(sub.cursor) as f64);
    }
    write_and_flush(&out, stream).await?;
    Ok(false)
}

/// One catch-up read of `[cursor, below)` from the WAL. Returns false when it moved
/// the cursor no further (nothing more to read there now).
async fn catch_up<S: AsyncWrite + Unpin>(
    sub: &mut Subscription,
    ctx: &Ctx<'_>,
    below: u64,
    mode: WireMode,
    out: &mut Vec<u8>,
    stream: &mut S,
) -> std::io::Result<bool> {
    let (records, next) = ctx
        .router
        .read_merged(sub.cursor, below, CATCH_UP_RECORDS)
        .await
        .map_err(|e| {
            tracing::warn!(subscription = %sub.id, error = %e, "catch-up read failed; closing");
            std::io::Error::other(e.to_string())
        })?;
    let mut events = Vec::new();
    {
        let shared = ctx.hub.borrow().shared.clone();
        let aborted = shared.aborted();
        for r in &records {
            let evs = events_from_record(r.offset, r.kind, &r.payload, &aborted)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            events.extend(evs);
        }
    }
    // A batch part's record carries its first change's offset; its changes
    // run on from there. Deliver only what lies in [cursor, below): the rest
    // comes from the window.
    events.retain(|e| e.wal_offset >= sub.cursor && e.wal_offset < below);
    push_matching(sub, events.iter(), mode, out);
    debug_assert!(next > sub.cursor || records.is_empty());
    if next <= sub.cursor {
        return Ok(false);
    }
    sub.advance(next);
    flush_if_large(out, stream).await?;
    Ok(true)
}

/// Encodes onto `out` the events that pass `sub`'s filter, counting each as forwarded.
fn push_matching<'e>(
    sub: &Subscription,
    events: impl Iterator<Item = &'e WatchEvent>,
    mode: WireMode,
    out: &mut Vec<u8>,
) {
    for e in events.filter(|e| sub.filter.matches(e)) {
        push(out, &encode_event(sub, e), mode);
        sub.metrics.forwarded.increment(1);
    }
}

/// Writes what is buffered, then flushes: a TLS stream may hold the last record until flushed.
async fn write_and_flush<S: AsyncWrite + Unpin>(out: &[u8], stream: &mut S) -> std::io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
    }
    stream.flush().await
}

/// Whether any subscription may have something to deliver.
pub fn pending(session: &Session, hub: &Rc<RefCell<Hub>>) -> bool {
    let released = hub.borrow().released();
    session.subscriptions.iter().any(|s| s.cursor < released)
}

fn push(out: &mut Vec<u8>, payload: &[u8], mode: WireMode) {
    match mode {
        WireMode::Binary => frame::encode(payload, out),
        WireMode::Jsonl => {
            out.extend_from_slice(payload);
            out.push(b'\n');
        }
    }
}

async fn flush_if_large<S: AsyncWrite + Unpin>(
    out: &mut Vec<u8>,
    stream: &mut S,
) -> std::io::Result<()> {
    if out.len() >= FLUSH_BYTES {
        stream.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

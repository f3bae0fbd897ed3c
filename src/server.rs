//! The frontend: accepts connections, decodes frames, keeps sessions,
//! routes requests to shards and writes answers in request order.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpListener;
use rstmdb_shards::commands::BatchReply;
use rstmdb_shards::error::{ApiError, ErrorCode};

use crate::batch;
use crate::compaction::Compactor;
use crate::idle::{Idle, IdleWatch};
use crate::ops::{self, Action, OpSettings};
use crate::protocol::{envelope, frame};
use crate::router::{Outcome, Router};
use crate::session::{Session, WireMode};
use crate::subscriptions::Hub;
use crate::telemetry::RequestMetrics;
use crate::ticker::Ticker;
use crate::watch;

/// Most requests decoded and dispatched in one cycle; more complete frames
/// wait for the next cycle (bounds per-connection memory and latency).
const MAX_REQUESTS_PER_CYCLE: usize = 1024;
/// Answers are written out whenever this many bytes are buffered.
const WRITE_FLUSH_BYTES: usize = 256 * 1024;
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// How long shutdown waits for connections to finish their current cycle.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Frontend settings.
#[derive(Clone)]
pub struct FrontendConfig {
    /// Operation settings.
    pub ops: OpSettings,
    /// `network.max_connections`.
    pub max_connections: usize,
    /// `network.idle_timeout_secs` (None = never): a connection that sends
    /// nothing for this long is closed silently (D18).
    pub idle_timeout: Option<Duration>,
    /// TLS on the listener (`tls.*`), None for plain TCP.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Request instruments, None when `metrics.enabled` is off (then the
    /// request path does no metrics work at all).
    pub metrics: Option<Arc<RequestMetrics>>,
    /// Housekeeping ticks (the idle sweeper's).
    pub ticker: Ticker,
}

/// Runs the accept loop until `shutdown` fires (or its sender is dropped),
/// then lets open connections finish their current cycle.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    hub: Rc<RefCell<Hub>>,
    compactor: Arc<Compactor>,
    cfg: FrontendConfig,
    shutdown: flume::Receiver<()>,
    active: Arc<AtomicUsize>,
) {
    // Dropping this sender tells every connection to stop after its cycle.
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let idle = cfg.idle_timeout.map(IdleWatch::new);
    if let Some(watch) = &idle {
        let ticks = cfg.ticker.every(watch.sweep_every());
        glommio::spawn_local(watch.clone().sweep(ticks)).detach();
    }
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = shutdown.recv_async().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Shared by every frontend: the limit is the server's.
        if active.fetch_add(1, Ordering::SeqCst) >= cfg.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            // Over the limit: close without sending a byte (D18).
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        if let Some(m) = &cfg.metrics {
            m.connections.increment(1);
        }
        let (router, cfg, active, stop, hub, compactor) = (
            router.clone(),
            cfg.clone(),
            active.clone(),
            stop_rx.clone(),
            hub.clone(),
            compactor.clone(),
        );
        let idle = idle.as_ref().map(|w| w.register());
        glommio::spawn_local(async move {
            let ended = match cfg.tls.clone() {
                None => connection(stream, router, hub, compactor, &cfg, stop, idle).await,
                Some(acceptor) => match handshake(acceptor, stream).await {
                    Ok(tls) => connection(tls, router, hub, compactor, &cfg, stop, idle).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
    tracing::info!("stopped accepting; finishing open connections");
    drop(stop_tx);
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    while active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// The TLS handshake, bounded by [`crate::tls::HANDSHAKE_TIMEOUT`]; a
/// failure closes the connection (no RCP bytes are ever sent).
async fn handshake(
    acceptor: futures_rustls::TlsAcceptor,
    stream: glommio::net::TcpStream,
) -> std::io::Result<futures_rustls::server::TlsStream<glommio::net::TcpStream>> {
    futures_lite::future::or(acceptor.accept(stream), async {
        glommio::timer::sleep(crate::tls::HANDSHAKE_TIMEOUT).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        ))
    })
    .await
}

/// Serves one connection until EOF, BYE, a fatal framing/envelope error, or
/// shutdown.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    router: Router,
    hub: Rc<RefCell<Hub>>,
    compactor: Arc<Compactor>,
    cfg: &FrontendConfig,
    stop: flume::Receiver<()>,
    idle: Option<Idle>,
) -> std::io::Result<()> {
    let mut session = Session::default();
    // Rung by the hub when events arrive; registered at the first WATCH.
    let (bell_tx, bell_rx) = flume::bounded::<()>(1);
    let mut bell_registered = false;
    // Socket reads land straight in `rbuf` (kept initialized, so it is
    // never zeroed or copied per read); bytes `start..filled` are
    // unconsumed.
    let mut rbuf: Vec<u8> = vec![0; READ_CHUNK];
    let mut start = 0usize;
    let mut filled = 0usize;
    let mut wbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let replies = flume::bounded::<BatchReply>(router.shard_count());
    loop {
        // Decode every complete frame already buffered.
        // (request id, action, the output mode its answer is written in:
        // a HELLO switches the mode for its own answer and later ones only).
        let mut requests: Vec<(String, Action, WireMode, u8)> = Vec::new();
        let mut close = false;
        let cycle_start = cfg.metrics.as_ref().map(|_| std::time::Instant::now());
        while requests.len() < MAX_REQUESTS_PER_CYCLE {
            match frame::decode(&rbuf[start..filled]) {
                Ok(Some((range, total))) => {
                    let payload = &rbuf[start + range.start..start + range.end];
                    let Some(req) = envelope::parse(payload) else {
                        close = true; // envelope errors are fatal, silently
                        break;
                    };
                    start += total;
                    let op = match &cfg.metrics {
                        Some(_) => RequestMetrics::op_index(&req.op).unwrap_or(0),
                        None => 0,
                    };
                    let action = ops::plan_raw(&req.op, req.params, &mut session, &cfg.ops);
                    let bye = matches!(action, Action::Bye);
                    // A fan-out ends the cycle: it bounds the cycle's memory
                    // (one large LIST page at most) and keeps PUT_MACHINE,
                    // which is two-phase, the last action of its cycle.
                    let fan_out = matches!(
                        action,
                        Action::PutMachine(_)
                            | Action::ListInstances { .. }
                            | Action::WalStats
                            | Action::WalRead { .. }
                            | Action::FlushAll
                            | Action::Batch(_)
                            | Action::Watch(_)
                            | Action::Unwatch(_)
                            | Action::Compact { .. }
                            | Action::SnapshotInstance(..)
                    );
                    requests.push((req.id.into_owned(), action, session.wire_mode, op));
                    if bye {
                        close = true; // requests pipelined after BYE are discarded
                        break;
                    }
                    if fan_out {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "framing error; closing connection");
                    close = true;
                    break;
                }
            }
        }
        if !requests.is_empty() {
            let mut ids: Vec<(String, WireMode, u8)> = Vec::with_capacity(requests.len());
            let mut actions = Vec::with_capacity(requests.len());
            for (id, action, mode, op) in requests {
                ids.push((id, mode, op));
                actions.push(action);
            }
            // BATCH and WATCH/UNWATCH need the session and end their cycle:
            // run the others, then it, in order.
            let special = match actions.last() {
                Some(
                    Action::Batch(_)
                    | Action::Watch(_)
                    | Action::Unwatch(_)
                    | Action::Compact { .. }
                    | Action::SnapshotInstance(..),
                ) => actions.pop(),
                _ => None,
            };
            // A trailing fan-out (PUT_MACHINE, LIST_INSTANCES, WAL_STATS,
            // WAL_READ, FLUSH_ALL) runs once everything before it is
            // answered.
            let fan_out = match actions.last() {
                Some(
                    Action::PutMachine(_)
                    | Action::ListInstances { .. }
                    | Action::WalStats
                    | Action::WalRead { .. }
                    | Action::FlushAll,
                ) => actions.pop(),
                _ => None,
            };
            // The plain actions: each shard answers its share of the cycle
            // until its answers reach a budget and defers the rest; the
            // complete prefix is written before the rest is sent again. A
            // client pipelining reads of large values that never reads
            // its answers holds one round of them per shard in server
            // memory; then TCP backpressure stops its requests.
            let cycle = Cycle {
                metrics: cfg.metrics.as_deref(),
                elapsed: cycle_start,
            };
            wbuf.clear();
            let mut ids = ids.into_iter();
            let mut pending = actions;
            let mut fresh = true;
            while !pending.is_empty() {
                let (outcomes, rest) = router.run_prefix(pending, fresh, &replies).await;
                fresh = false;
                let answered = ids.by_ref().take(outcomes.len()).zip(outcomes);
                write_answers(&mut stream, &mut wbuf, answered, &cycle).await?;
                pending = rest;
            }
            if let Some(f) = fan_out {
                let outcomes = router.run(vec![f], &replies).await;
                let answered = ids.by_ref().take(1).zip(outcomes);
                write_answers(&mut stream, &mut wbuf, answered, &cycle).await?;
            }
            let mut outcomes = Vec::new();
            let ctx = watch::Ctx {
                router: &router,
                hub: &hub,
                compactor: &compactor,
                replies: &replies,
            };
            match special {
                Some(Action::Batch(params)) => {
                    let r = batch::run(params, &mut session, &ctx, &cfg.ops, 0).await;
                    close |= r.bye;
                    outcomes.push(Outcome::Done(r.result));
                }
                Some(Action::Watch(spec)) => {
                    outcomes.push(Outcome::Done(
                        watch::subscribe(spec, &mut session, &ctx).await,
                    ));
                }
                Some(Action::Unwatch(id)) => {
                    outcomes.push(Outcome::Done(Ok(watch::unwatch(id, &mut session))))
                }
                Some(Action::Compact { force }) => {
                    let r = compactor
                        .compact(force)
                        .await
                        .map(|report| serde_json::to_vec(&report).expect("serializable"));
                    outcomes.push(Outcome::Done(r));
                }
                Some(Action::SnapshotInstance(shard, id)) => {
                    outcomes.push(Outcome::Done(
                        compactor.snapshot_instance(shard, id, &replies).await,
                    ));
                }
                _ => {}
            }
            if !bell_registered && !session.subscriptions.is_empty() {
                hub.borrow_mut().register(bell_tx.clone());
                bell_registered = true;
            }
            let answered = ids.zip(outcomes);
            write_answers(&mut stream, &mut wbuf, answered, &cycle).await?;
            stream.write_all(&wbuf).await?;
            // A TLS stream may hold the last record until flushed.
            stream.flush().await?;
            if wbuf.capacity() > 4 * READ_CHUNK {
                wbuf = Vec::with_capacity(READ_CHUNK);
            }
        }
        if close {
            let _ = stream.flush().await;
            return Ok(());
        }
        // Compact the read buffer, then read more unless a full cycle's worth
        // of frames is still waiting.
        if start > 0 {
            rbuf.copy_within(start..filled, 0);
            filled -= start;
            start = 0;
        }
        match frame::decode(&rbuf[..filled]) {
            Ok(Some(_)) => continue, // a full cycle's worth was already buffered
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "framing error; closing connection");
                return Ok(());
            }
        }
        if stop.is_disconnected() {
            return Ok(());
        }
        // A buffer grown for a large frame is given back once it is used.
        if filled == 0 && rbuf.len() > 4 * READ_CHUNK {
            rbuf.truncate(READ_CHUNK);
            rbuf.shrink_to_fit();
        }
        // Room for at least one more byte, growing with the bytes that
        // arrive (up to the frame being read), never with what a header
        // merely declares: a client that announces 16 MiB and trickles
        // costs what it sent.
        let need = frame::frame_len_hint(&rbuf[..filled])
            .unwrap_or(0)
            .max(filled + 1);
        let want = need.min(filled + READ_CHUNK);
        if rbuf.len() < want {
            rbuf.resize(want, 0);
        }
        // Nothing buffered to answer: deliver what the subscriptions can
        // have, then wait for bytes, events, shutdown or idleness.
        if watch::pending(&session, &hub) {
            let ctx = watch::Ctx {
                router: &router,
                hub: &hub,
                compactor: &compactor,
                replies: &replies,
            };
            if watch::deliver(&mut session, &ctx, &mut stream).await? {
                // More is waiting: come back right after checking for
                // requests (the read is polled before the doorbell).
                let _ = bell_tx.try_send(());
            }
        }
        // A connection that watches is not idle while it waits for events.
        let watching = !session.subscriptions.is_empty();
        enum Woke {
            Read(std::io::Result<usize>),
            Bell,
            Stop,
            Idle,
        }
        let idle = &idle;
        let woke = futures_lite::future::or(
            async { Woke::Read(stream.read(&mut rbuf[filled..]).await) },
            futures_lite::future::or(
                async {
                    let _ = bell_rx.recv_async().await;
                    Woke::Bell
                },
                futures_lite::future::or(
                    async {
                        let _ = stop.recv_async().await;
                        Woke::Stop
                    },
                    async move {
                        match idle {
                            Some(i) if !watching => {
                                let _ = i.kicked.recv_async().await;
                            }
                            _ => futures_lite::future::pending::<()>().await,
                        }
                        Woke::Idle
                    },
                ),
            ),
        )
        .await;
        match woke {
            Woke::Stop | Woke::Read(Ok(0)) => return Ok(()),
            Woke::Bell => continue,
            Woke::Idle => {
                if idle.as_ref().is_some_and(Idle::expired) {
                    return Ok(()); // idle: closed silently (D18)
                }
                continue;
            }
            Woke::Read(Ok(n)) => {
                if let Some(i) = &idle {
                    i.touch();
                }
                filled += n;
            }
            Woke::Read(Err(e)) => return Err(e),
        }
    }
}

/// What every answer of a cycle shares.
struct Cycle<'a> {
    metrics: Option<&'a RequestMetrics>,
    /// When the cycle started (metrics only): every request of the cycle
    /// waited for the whole cycle.
    elapsed: Option<std::time::Instant>,
}

/// Frames the answers into `wbuf`, writing it out whenever
/// [`WRITE_FLUSH_BYTES`] are buffered (the rest stays for the caller's
/// final write).
async fn write_answers<S: AsyncWrite + Unpin>(
    stream: &mut S,
    wbuf: &mut Vec<u8>,
    answered: impl Iterator<Item = ((String, WireMode, u8), Outcome)>,
    cycle: &Cycle<'_>,
) -> std::io::Result<()> {
    let elapsed = cycle.elapsed.map_or(0.0, |t| t.elapsed().as_secs_f64());
    for ((id, mode, op), outcome) in answered {
        if let Some(m) = cycle.metrics {
            let error = match &outcome {
                Outcome::Done(Err(e)) => Some(e.code),
                _ => None,
            };
            m.observe(op, elapsed, error);
        }
        // Each answer is written straight into the output buffer; a binary
        // frame's header is filled in once its payload is.
        let frame_start = (mode == WireMode::Binary).then(|| frame::begin(wbuf));
        let body = wbuf.len();
        match outcome {
            Outcome::Done(Ok(result)) => envelope::ok_response(&id, &result, wbuf),
            Outcome::Done(Err(e)) => envelope::error_response(&id, &e, wbuf),
            Outcome::Bye => envelope::ok_response(&id, br#"{"goodbye":true}"#, wbuf),
        }
        if wbuf.len() - body > frame::MAX_PAYLOAD {
            wbuf.truncate(body);
            let e = ApiError::new(
                ErrorCode::InternalError,
                "response exceeds the 16 MiB frame limit; read less at once",
            );
            envelope::error_response(&id, &e, wbuf);
        }
        match frame_start {
            Some(start) => frame::finish(wbuf, start),
            None => wbuf.push(b'\n'),
        }
        if wbuf.len() >= WRITE_FLUSH_BYTES {
            stream.write_all(wbuf).await?;
            wbuf.clear();
        }
    }
    Ok(())
}

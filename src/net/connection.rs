//! One client connection: read frames, answer them in order, deliver
//! watch events, until EOF, BYE, a fatal framing or envelope error,
//! shutdown or idleness.
//!
//! A *cycle* is every complete frame already read (up to
//! [`MAX_REQUESTS_PER_CYCLE`], ending early at a fan-out), planned, sent to
//! the shards as one batch per shard, and answered in request order in one
//! write. Frames after BYE are discarded.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use rstmdb_shards::commands::BatchReply;
use rstmdb_shards::error::{ApiError, ErrorCode};

use crate::net::forward::{ForwardError, Upstream};
use crate::net::idle::Idle;
use crate::net::server::FrontendConfig;
use crate::protocol::{envelope, frame};
use crate::service::batch;
use crate::service::compaction::Compactor;
use crate::service::ops::{self, Action};
use crate::service::router::{Outcome, Replies, Router};
use crate::service::session::{Session, WireMode};
use crate::service::subscriptions::Hub;
use crate::service::watch;
use crate::telemetry::RequestMetrics;

/// Most requests decoded and dispatched in one cycle; more complete frames
/// wait for the next cycle (bounds per-connection memory and latency).
const MAX_REQUESTS_PER_CYCLE: usize = 1024;
/// Answers are written out whenever this many bytes are buffered.
const WRITE_FLUSH_BYTES: usize = 256 * 1024;
/// Bytes read per `read` call.
pub const READ_CHUNK: usize = 64 * 1024;

/// What the connection shares with its frontend.
pub struct Shared {
    pub router: Router,
    pub hub: Rc<RefCell<Hub>>,
    pub compactor: Arc<Compactor>,
    /// Closed when the server shuts down.
    pub stop: flume::Receiver<()>,
    /// The connection's idle registration (None: no idle timeout).
    pub idle: Option<Idle>,
}

/// A decoded request: its id, what it does, the output mode its answer is
/// written in (a HELLO switches the mode from its own answer on), and its
/// operation's metrics index.
struct Request {
    id: String,
    action: Action,
    mode: WireMode,
    op: u8,
    /// Cluster mode on a follower: the request's payload, to be answered
    /// by the leader (`action` is then unused).
    forward: Option<Vec<u8>>,
}

/// What woke an idle connection.
enum Woke {
    Read(io::Result<usize>),
    Bell,
    Stop,
    Idle,
}

/// Serves one connection (see the module docs).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    shared: Shared,
    cfg: &FrontendConfig,
) -> io::Result<()> {
    let (bell_tx, bell_rx) = flume::bounded::<()>(1);
    let mut shared = shared;
    let local_router = shared.router.node_local();
    if cfg.forward.as_ref().is_some_and(|f| f.stale_reads) {
        // `cluster.follower_reads: stale`: reads answer from this node.
        shared.router = local_router.clone();
    }
    let mut c = Connection {
        local_router,
        replies: flume::bounded::<BatchReply>(shared.router.shard_count()),
        stream,
        shared,
        cfg,
        session: Session::default(),
        input: Input::new(),
        wbuf: Vec::with_capacity(READ_CHUNK),
        bell_tx,
        bell_rx,
        bell_registered: false,
        upstream: None,
        auth_payload: None,
    };
    c.run().await
}

struct Connection<'a, S> {
    stream: S,
    /// The router for what a node answers from its own applied state
    /// (watch subscriptions, WAL_STATS): see [`Router::node_local`].
    local_router: Router,
    shared: Shared,
    cfg: &'a FrontendConfig,
    session: Session,
    input: Input,
    wbuf: Vec<u8>,
    replies: Replies,
    /// Rung by the hub when events arrive; registered at the first WATCH.
    bell_tx: flume::Sender<()>,
    bell_rx: flume::Receiver<()>,
    bell_registered: bool,
    /// Cluster mode: the tunnel to the leader, once a request needed it.
    upstream: Option<Upstream>,
    /// The client's successful AUTH request, replayed on a new tunnel.
    auth_payload: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<'_, S> {
    /// The loop: answer what is buffered, deliver events, wait for more.
    async fn run(&mut self) -> io::Result<()> {
        loop {
            let cycle_start = self.cfg.metrics.as_ref().map(|_| std::time::Instant::now());
            let (requests, mut close) = self.decode_cycle();
            if !requests.is_empty() {
                close |= self.answer(requests, cycle_start).await?;
            }
            if close {
                let _ = self.stream.flush().await;
                return Ok(());
            }
            self.input.compact();
            match frame::decode(self.input.unread()) {
                Ok(Some(_)) => continue, // a full cycle's worth was already buffered
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "framing error; closing connection");
                    return Ok(());
                }
            }
            if self.shared.stop.is_disconnected() {
                return Ok(());
            }
            self.input.make_room();
            self.deliver_events().await?;
            match self.wait().await {
                Woke::Stop | Woke::Read(Ok(0)) => return Ok(()),
                Woke::Read(Ok(n)) => {
                    if let Some(i) = &self.shared.idle {
                        i.touch();
                    }
                    self.input.filled += n;
                }
                Woke::Read(Err(e)) => return Err(e),
                Woke::Bell => {}
                Woke::Idle => {
                    if self.shared.idle.as_ref().is_some_and(Idle::expired) {
                        return Ok(()); // idle: closed silently (D18)
                    }
                }
            }
        }
    }

    /// Decodes and plans every complete frame buffered, up to the cycle's
    /// limit; stops after a fan-out (it bounds the cycle's memory to one
    /// large page and keeps PUT_MACHINE, two-phase, last in its cycle) and
    /// after BYE. Returns the requests and whether to close afterwards.
    fn decode_cycle(&mut self) -> (Vec<Request>, bool) {
        let mut requests = Vec::new();
        while requests.len() < MAX_REQUESTS_PER_CYCLE {
            let (range, total) = match frame::decode(self.input.unread()) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "framing error; closing connection");
                    return (requests, true);
                }
            };
            let unread = self.input.unread();
            let payload = &unread[range];
            let Some(req) = envelope::parse(payload) else {
                return (requests, true); // envelope errors are fatal, silently
            };
            let forward = self.forwards(&req.op);
            if requests
                .first()
                .is_some_and(|r: &Request| r.forward.is_some() != forward)
            {
                break; // a cycle is all forwarded or all local
            }
            if forward {
                requests.push(Request {
                    id: req.id.into_owned(),
                    action: Action::Local(Ok(Vec::new())),
                    mode: self.session.wire_mode,
                    op: 0,
                    forward: Some(payload.to_vec()),
                });
                self.input.start += total;
                continue;
            }
            let op = match &self.cfg.metrics {
                Some(_) => RequestMetrics::op_index(&req.op).unwrap_or(0),
                None => 0,
            };
            let action = ops::plan_raw(&req.op, req.params, &mut self.session, &self.cfg.ops);
            if req.op == "AUTH" && matches!(action, Action::Local(Ok(_))) {
                self.auth_payload = Some(payload.to_vec());
            }
            let (bye, fan_out) = (matches!(action, Action::Bye), ends_cycle(&action));
            requests.push(Request {
                id: req.id.into_owned(),
                action,
                mode: self.session.wire_mode,
                op,
                forward: None,
            });
            self.input.start += total;
            if bye {
                return (requests, true); // requests pipelined after BYE are discarded
            }
            if fan_out {
                break;
            }
        }
        (requests, false)
    }

    /// Runs one cycle's requests and writes their answers in order: the
    /// plain ones first, then a trailing fan-out, then a trailing operation
    /// that needs the session (BATCH, WATCH, UNWATCH, COMPACT,
    /// SNAPSHOT_INSTANCE). Returns whether a BYE inside a batch closes the
    /// connection.
    async fn answer(
        &mut self,
        requests: Vec<Request>,
        cycle_start: Option<std::time::Instant>,
    ) -> io::Result<bool> {
        if requests.first().is_some_and(|r| r.forward.is_some()) {
            self.answer_forwarded(requests).await?;
            return Ok(false);
        }
        let mut ids = Vec::with_capacity(requests.len());
        let mut actions = Vec::with_capacity(requests.len());
        for r in requests {
            ids.push((r.id, r.mode, r.op));
            actions.push(r.action);
        }
        let special = actions.pop_if(|a| needs_session(a));
        let fan_out = actions.pop_if(|a| is_fan_out(a));
        let cycle = Cycle {
            metrics: self.cfg.metrics.as_deref(),
            elapsed: cycle_start,
        };
        let mut ids = ids.into_iter();
        self.wbuf.clear();
        self.run_plain(actions, &mut ids, &cycle).await?;
        if let Some(f) = fan_out {
            let router = match f {
                Action::WalStats => &self.local_router,
                _ => &self.shared.router,
            };
            let outcomes = router.run(vec![f], &self.replies).await;
            let answered = ids.by_ref().take(1).zip(outcomes);
            write_answers(&mut self.stream, &mut self.wbuf, answered, &cycle).await?;
        }
        let (outcome, close) = match special {
            Some(action) => self.run_special(action).await,
            None => (None, false),
        };
        self.register_bell();
        write_answers(&mut self.stream, &mut self.wbuf, ids.zip(outcome), &cycle).await?;
        self.stream.write_all(&self.wbuf).await?;
        // A TLS stream may hold the last record until flushed.
        self.stream.flush().await?;
        if self.wbuf.capacity() > 4 * READ_CHUNK {
            self.wbuf = Vec::with_capacity(READ_CHUNK);
        }
        Ok(close)
    }

    /// Whether a request for `op` goes to the leader: in cluster mode, on
    /// a node that knows a leader other than itself, for everything but
    /// the node-local operations.
    fn forwards(&self, op: &str) -> bool {
        self.cfg.forward.as_ref().is_some_and(|f| f.forwards(op))
    }

    /// A forwarded cycle: the leader answers every request (pipelined
    /// through the tunnel); a failed tunnel answers the rest with a
    /// retryable error.
    async fn answer_forwarded(&mut self, requests: Vec<Request>) -> io::Result<()> {
        let mut ids = Vec::with_capacity(requests.len());
        let mut payloads = Vec::with_capacity(requests.len());
        for r in requests {
            ids.push((r.id, r.mode));
            payloads.push(r.forward.expect("a forwarded cycle"));
        }
        let answers = self.exchange_upstream(&payloads).await;
        self.wbuf.clear();
        match answers {
            Ok(answers) => {
                for ((_, mode), answer) in ids.iter().zip(answers) {
                    match mode {
                        WireMode::Binary => frame::encode(&answer, &mut self.wbuf),
                        WireMode::Jsonl => {
                            self.wbuf.extend_from_slice(&answer);
                            self.wbuf.push(b'\n');
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarding to the leader failed");
                self.upstream = None;
                let err = ApiError::new(ErrorCode::InternalError, e.to_string());
                let failed = ids
                    .into_iter()
                    .map(|(id, mode)| ((id, mode, 0), Outcome::Done(Err(err.clone()))));
                let cycle = Cycle {
                    metrics: None,
                    elapsed: None,
                };
                write_answers(&mut self.stream, &mut self.wbuf, failed, &cycle).await?;
            }
        }
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await
    }

    /// Sends payloads to the current leader, opening (or re-opening, when
    /// the leader changed) the tunnel first.
    async fn exchange_upstream(
        &mut self,
        payloads: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ForwardError> {
        let fwd = self.cfg.forward.as_ref().expect("forwarding is configured");
        let leader = fwd.leader().ok_or(ForwardError::NoLeader)?;
        if self.upstream.as_ref().is_none_or(|u| u.leader != leader) {
            self.upstream = None;
            let up = Upstream::open(fwd, leader, self.auth_payload.as_deref())
                .await
                .map_err(|e| ForwardError::Unreachable(leader, e))?;
            self.upstream = Some(up);
        }
        let up = self.upstream.as_mut().expect("opened above");
        up.exchange(payloads).await.map_err(ForwardError::Broken)
    }

    /// The plain actions: each shard answers its share until its answers
    /// reach a budget and defers the rest; the complete prefix is written
    /// before the rest is sent again. A client pipelining reads of large
    /// values that never reads its answers holds one round of them per
    /// shard in server memory; then TCP backpressure stops its requests.
    async fn run_plain(
        &mut self,
        mut pending: Vec<Action>,
        ids: &mut std::vec::IntoIter<(String, WireMode, u8)>,
        cycle: &Cycle<'_>,
    ) -> io::Result<()> {
        let mut fresh = true;
        while !pending.is_empty() {
            let (outcomes, rest) = self
                .shared
                .router
                .run_prefix(pending, fresh, &self.replies)
                .await;
            fresh = false;
            let answered = ids.by_ref().take(outcomes.len()).zip(outcomes);
            write_answers(&mut self.stream, &mut self.wbuf, answered, cycle).await?;
            pending = rest;
        }
        Ok(())
    }

    /// Runs an operation that needs the session or the compactor; returns
    /// its outcome and whether a BYE inside a batch closes the connection.
    async fn run_special(&mut self, action: Action) -> (Option<Outcome>, bool) {
        let sh = &self.shared;
        let ctx = watch_ctx(sh, &sh.router, &self.replies);
        let local = watch_ctx(sh, &self.local_router, &self.replies);
        let done = |r| (Some(Outcome::Done(r)), false);
        match action {
            Action::Batch(params) => {
                let r = batch::run(params, &mut self.session, &ctx, &self.cfg.ops, 0).await;
                (Some(Outcome::Done(r.result)), r.bye)
            }
            Action::Watch(spec) => done(watch::subscribe(spec, &mut self.session, &local).await),
            Action::Unwatch(id) => done(Ok(watch::unwatch(id, &mut self.session))),
            Action::Compact { force } => done(
                sh.compactor
                    .compact(force)
                    .await
                    .map(|report| serde_json::to_vec(&report).expect("serializable")),
            ),
            Action::SnapshotInstance(shard, id) => done(
                sh.compactor
                    .snapshot_instance(shard, id, &self.replies)
                    .await,
            ),
            Action::TransferLeader { to } => done(sh.router.transfer_leader(to).await),
            _ => unreachable!("only operations that need the session come here"),
        }
    }

    /// The hub rings the connection's bell once it watches something.
    fn register_bell(&mut self) {
        if !self.bell_registered && !self.session.subscriptions.is_empty() {
            self.shared.hub.borrow_mut().register(self.bell_tx.clone());
            self.bell_registered = true;
        }
    }

    /// Delivers what the subscriptions have; rings the bell again when more
    /// is waiting (the read is polled before the bell).
    async fn deliver_events(&mut self) -> io::Result<()> {
        if !watch::pending(&self.session, &self.shared.hub) {
            return Ok(());
        }
        let ctx = watch_ctx(&self.shared, &self.local_router, &self.replies);
        if watch::deliver(&mut self.session, &ctx, &mut self.stream).await? {
            let _ = self.bell_tx.try_send(());
        }
        Ok(())
    }

    /// Waits for bytes, the bell, shutdown or idleness (a connection that
    /// watches is not idle while it waits for events).
    async fn wait(&mut self) -> Woke {
        let watching = !self.session.subscriptions.is_empty();
        let (stream, input) = (&mut self.stream, &mut self.input);
        let (bell, stop, idle) = (&self.bell_rx, &self.shared.stop, &self.shared.idle);
        let read = async { Woke::Read(stream.read(input.free()).await) };
        let bell = async {
            let _ = bell.recv_async().await;
            Woke::Bell
        };
        let stop = async {
            let _ = stop.recv_async().await;
            Woke::Stop
        };
        let idle = async {
            match idle {
                Some(i) if !watching => {
                    let _ = i.kicked.recv_async().await;
                }
                _ => futures_lite::future::pending::<()>().await,
            }
            Woke::Idle
        };
        use futures_lite::future::or;
        or(read, or(bell, or(stop, idle))).await
    }
}

/// What watch delivery and batches need from the connection.
fn watch_ctx<'a>(shared: &'a Shared, router: &'a Router, replies: &'a Replies) -> watch::Ctx<'a> {
    watch::Ctx {
        router,
        hub: &shared.hub,
        compactor: &shared.compactor,
        replies,
    }
}

/// Actions that end a cycle: fan-outs and those that need the session.
fn ends_cycle(action: &Action) -> bool {
    is_fan_out(action) || needs_session(action)
}

/// Actions sent to every shard and merged.
fn is_fan_out(action: &Action) -> bool {
    matches!(
        action,
        Action::PutMachine(_)
            | Action::ListInstances { .. }
            | Action::WalStats
            | Action::WalRead { .. }
            | Action::FlushAll
    )
}

/// Actions run by the connection itself, with its session.
fn needs_session(action: &Action) -> bool {
    matches!(
        action,
        Action::Batch(_)
            | Action::Watch(_)
            | Action::Unwatch(_)
            | Action::Compact { .. }
            | Action::SnapshotInstance(..)
            | Action::TransferLeader { .. }
    )
}

/// The read buffer: socket reads land straight in `buf` (kept initialized,
/// so it is never zeroed or copied per read); bytes `start..filled` are
/// unconsumed.
struct Input {
    buf: Vec<u8>,
    start: usize,
    filled: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            buf: vec![0; READ_CHUNK],
            start: 0,
            filled: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.filled]
    }

    fn free(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Moves the unconsumed bytes to the front.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.start = 0;
        }
    }

    /// Room for at least one more byte, growing with the bytes that arrive
    /// (up to the frame being read), never with what a header merely
    /// declares: a client that announces 16 MiB and trickles costs what it
    /// sent. A buffer grown for a large frame is given back once drained.
    fn make_room(&mut self) {
        debug_assert_eq!(self.start, 0, "compacted first");
        if self.filled == 0 && self.buf.len() > 4 * READ_CHUNK {
            self.buf.truncate(READ_CHUNK);
            self.buf.shrink_to_fit();
        }
        let need = frame::frame_len_hint(&self.buf[..self.filled])
            .unwrap_or(0)
            .max(self.filled + 1);
        let want = need.min(self.filled + READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
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
) -> io::Result<()> {
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

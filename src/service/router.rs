//! Routing a read cycle's requests to shards and merging the answers.
//!
//! A connection hands the router every request it decoded in one read
//! cycle. The router groups shard commands per shard (keeping request
//! order inside each shard's list, so per-shard order is the connection's
//! order), sends one [`Batch`] per shard, waits for one [`BatchReply`] per
//! shard, and merges fan-out answers (PUT_MACHINE, LIST_INSTANCES,
//! WAL_STATS) into single results.
//!
//! PUT_MACHINE is two-phase: shard 0 logs it first, and only if shard 0
//! accepted it (stored now, or already stored with the same checksum) do the
//! other shards log it. Shard 0 is therefore the authority on every
//! definition: no shard ever holds a definition that shard 0 does not hold
//! with the same checksum, so a partly failed PUT can be completed by a retry
//! but never diverge. The connection ends a cycle after a fan-out operation,
//! so a PUT is always the cycle's last action.

use rstmdb_shards::commands::{Batch, BatchReply, Command, InstanceSummary, Reply, ShardWalStats};
use rstmdb_shards::error::{ApiError, ErrorCode};
use rstmdb_shards::shard::{Sequencer, ShardMsg, WalReadRequest};
use rstmdb_shards::wal_entry;
use rstmdb_wal::{OwnedRecord, ReadRange};
use serde::Serialize;

use crate::service::ops::Action;

/// A connection's channel for shard replies.
pub type Replies = (flume::Sender<BatchReply>, flume::Receiver<BatchReply>);

/// Byte budget of one LIST_INSTANCES result: a response must fit a frame
/// (DECISIONS D21), with room for the envelope.
const LIST_BYTES_BUDGET: usize = 15 * 1024 * 1024;

/// Most records one WAL_READ returns.
const WAL_READ_MAX_RECORDS: usize = 10_000;
/// Byte budget of one WAL_READ answer's records (within a 16 MiB frame).
const WAL_READ_BYTES: usize = 15 * 1024 * 1024;

/// Senders to every shard, owned by the frontend executor.
#[derive(Clone)]
pub struct Router {
    shards: Vec<flume::Sender<ShardMsg>>,
    seq: Sequencer,
    /// Batches are marked [`Batch::node_local`] (see [`Router::node_local`]).
    node_local: bool,
}

/// The outcome of one request in a cycle.
pub enum Outcome {
    /// Answered.
    Done(Result<Vec<u8>, ApiError>),
    /// Answered; close the connection after writing it.
    Bye,
}

/// Per-request merge state while shard answers come in.
enum Slot {
    Done(Result<Vec<u8>, ApiError>),
    Bye,
    Single,
    Put {
        machine: String,
        version: u32,
        /// Phase 2 still to send (the command for the other shards).
        pending: Option<Command>,
        first_error: Option<(usize, ApiError)>,
        created: bool,
        checksum: Option<String>,
    },
    List {
        offset: usize,
        limit: usize,
        total: u64,
        parts: Vec<Vec<InstanceSummary>>,
        error: Option<ApiError>,
    },
    Stats(Result<ShardWalStats, ApiError>),
    WalRead {
        from: u64,
        limit: Option<u64>,
    },
    Flush {
        instances: u64,
        machines: u64,
        error: Option<ApiError>,
    },
}

fn unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::InternalError,
        "shard unavailable (server shutting down)",
    )
}

impl Router {
    /// A router over the given shard channels.
    pub fn new(shards: Vec<flume::Sender<ShardMsg>>, seq: Sequencer) -> Self {
        assert!(!shards.is_empty());
        Router {
            shards,
            seq,
            node_local: false,
        }
    }

    /// This router for reads a cluster node answers from its own applied
    /// state, leader or not.
    pub fn node_local(&self) -> Router {
        Router {
            node_local: true,
            ..self.clone()
        }
    }

    /// The shard channels.
    pub fn shards(&self) -> &[flume::Sender<ShardMsg>] {
        &self.shards
    }

    /// CLUSTER_TRANSFER_LEADER: shard 0 (the node's group) hands its
    /// leadership over; the answer names the new leader.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<Vec<u8>, ApiError> {
        let (tx, rx) = flume::bounded(1);
        let msg = ShardMsg::TransferLeader { to, reply_to: tx };
        self.shards[0]
            .send_async(msg)
            .await
            .map_err(|_| unavailable())?;
        let leader = rx.recv_async().await.map_err(|_| unavailable())??;
        Ok(serde_json::to_vec(&serde_json::json!({ "leader_id": leader })).expect("serializable"))
    }

    /// The offset sequencer.
    pub fn sequencer(&self) -> &Sequencer {
        &self.seq
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Executes one cycle's actions and returns their outcomes in order.
    /// `replies` is the connection's reply channel (capacity ≥ shard count).
    pub async fn run(
        &self,
        actions: Vec<Action>,
        replies: &(flume::Sender<BatchReply>, flume::Receiver<BatchReply>),
    ) -> Vec<Outcome> {
        let mut per_shard: Vec<Vec<(u32, Command)>> = vec![Vec::new(); self.shards.len()];
        let mut slots = Vec::with_capacity(actions.len());
        for (i, action) in actions.into_iter().enumerate() {
            slots.push(slot_for(i as u32, action, &mut per_shard));
        }
        self.dispatch_all(per_shard, &mut slots, replies).await;
        // Phase 2 of PUT_MACHINE: the other shards, once shard 0 accepted.
        let phase2 = put_phase2(&mut slots, self.shards.len());
        if phase2.iter().any(|l| !l.is_empty()) {
            self.dispatch_all(phase2, &mut slots, replies).await;
        }
        self.run_wal_reads(&mut slots).await;
        slots.into_iter().map(|s| self.finish(s)).collect()
    }

    /// Answers the cycle's WAL_READ slots, after its shard commands ran.
    async fn run_wal_reads(&self, slots: &mut [Slot]) {
        for slot in slots.iter_mut() {
            if let Slot::WalRead { from, limit } = *slot {
                *slot = Slot::Done(self.wal_read(from, limit).await);
            }
        }
    }

    /// Executes the plain actions of a cycle (answered locally or by one
    /// shard) until some shard defers part of its list because its answers
    /// reached [`rstmdb_shards::commands::BATCH_ANSWER_BYTES`]; returns the outcomes of the leading
    /// actions that are complete, and what is left, in order, for the next
    /// call (completed answers beyond the first deferred one come back as
    /// `Action::Local`). The caller writes each prefix before the next call,
    /// so a connection holds at most one round of answers per shard.
    ///
    /// `fresh`: the actions come straight from a cycle (nothing carried).
    /// Otherwise only the commands ahead of the first carried answer are
    /// sent: a shard that ran ahead waits until the others catch up, so
    /// carried answers never pile up.
    pub async fn run_prefix(
        &self,
        actions: Vec<Action>,
        fresh: bool,
        replies: &(flume::Sender<BatchReply>, flume::Receiver<BatchReply>),
    ) -> (Vec<Outcome>, Vec<Action>) {
        let n = self.shards.len();
        let window = if fresh {
            actions.len()
        } else {
            actions
                .iter()
                .position(|a| !matches!(a, Action::Shard(..)))
                .unwrap_or(actions.len())
                .max(1)
        };
        let mut per_shard: Vec<Vec<(u32, Command)>> = vec![Vec::new(); n];
        let mut slots = Vec::with_capacity(actions.len());
        let mut unsent = Vec::new();
        for (i, action) in actions.into_iter().enumerate() {
            slots.push(match action {
                Action::Local(r) => Slot::Done(r),
                Action::Bye => Slot::Bye,
                Action::Shard(s, cmd) if i < window => {
                    per_shard[s].push((i as u32, cmd));
                    Slot::Single
                }
                Action::Shard(s, cmd) => {
                    unsent.push((i, s, cmd));
                    Slot::Single
                }
                _ => unreachable!("run_prefix takes plain actions only"),
            });
        }
        let deferred = self.dispatch(per_shard, &mut slots, replies).await;
        let mut again: Vec<Option<(usize, Command)>> = (0..slots.len()).map(|_| None).collect();
        for (shard, list) in deferred.into_iter().enumerate() {
            for (slot, cmd) in list {
                again[slot as usize] = Some((shard, cmd));
            }
        }
        for (i, s, cmd) in unsent {
            again[i] = Some((s, cmd));
        }
        let first = again
            .iter()
            .position(Option::is_some)
            .unwrap_or(slots.len());
        // The first action always completes (a shard runs the first
        // command of every list it gets), so each call makes progress.
        assert!(first > 0 || slots.is_empty(), "a round answered nothing");
        let mut outcomes = Vec::with_capacity(first);
        let mut rest = Vec::with_capacity(slots.len() - first);
        for (i, (slot, retry)) in slots.into_iter().zip(again).enumerate() {
            if i < first {
                outcomes.push(self.finish(slot));
                continue;
            }
            rest.push(match retry {
                Some((shard, cmd)) => Action::Shard(shard, cmd),
                None => match self.finish(slot) {
                    Outcome::Done(r) => Action::Local(r),
                    Outcome::Bye => Action::Bye,
                },
            });
        }
        (outcomes, rest)
    }

    /// [`Router::dispatch`] until every command has run (deferred ones are
    /// sent again, in order).
    async fn dispatch_all(
        &self,
        mut per_shard: Vec<Vec<(u32, Command)>>,
        slots: &mut [Slot],
        replies: &(flume::Sender<BatchReply>, flume::Receiver<BatchReply>),
    ) {
        loop {
            per_shard = self.dispatch(per_shard, slots, replies).await;
            if per_shard.iter().all(Vec::is_empty) {
                return;
            }
        }
    }

    /// Sends each shard its list and merges every answer into `slots`;
    /// returns, per shard, the commands it deferred (in order).
    async fn dispatch(
        &self,
        per_shard: Vec<Vec<(u32, Command)>>,
        slots: &mut [Slot],
        replies: &(flume::Sender<BatchReply>, flume::Receiver<BatchReply>),
    ) -> Vec<Vec<(u32, Command)>> {
        let mut deferred: Vec<Vec<(u32, Command)>> = vec![Vec::new(); self.shards.len()];
        let mut waiting = 0;
        for (shard, commands) in per_shard.into_iter().enumerate() {
            if commands.is_empty() {
                continue;
            }
            let batch = Batch {
                commands,
                reply_to: replies.0.clone(),
                node_local: self.node_local,
            };
            if self.shards[shard]
                .send_async(ShardMsg::Batch(batch))
                .await
                .is_err()
            {
                tracing::error!(shard, "shard channel closed");
                continue;
            }
            waiting += 1;
        }
        while waiting > 0 {
            let Ok(reply) = replies.1.recv_async().await else {
                break;
            };
            waiting -= 1;
            for (slot, r) in reply.replies {
                match r {
                    Reply::Deferred(cmd) => deferred[reply.shard].push((slot, cmd)),
                    r => merge(&mut slots[slot as usize], reply.shard, r),
                }
            }
        }
        deferred
    }

    fn finish(&self, slot: Slot) -> Outcome {
        match slot {
            Slot::Done(r) => Outcome::Done(r),
            Slot::Bye => Outcome::Bye,
            Slot::Single => Outcome::Done(Err(unavailable())),
            Slot::Put {
                first_error: Some((_, e)),
                ..
            } => Outcome::Done(Err(e)),
            Slot::Put {
                machine,
                version,
                created,
                checksum: Some(checksum),
                ..
            } => Outcome::Done(Ok(put_result(&machine, version, created, &checksum))),
            Slot::Put { checksum: None, .. } => Outcome::Done(Err(unavailable())),
            Slot::List { error: Some(e), .. } => Outcome::Done(Err(e)),
            Slot::List {
                offset,
                limit,
                total,
                parts,
                error: None,
            } => Outcome::Done(Ok(list_result(offset, limit, total, parts))),
            Slot::Stats(Ok(s)) => Outcome::Done(Ok(self.stats_result(&s))),
            Slot::WalRead { .. } => Outcome::Done(Err(unavailable())),
            Slot::Flush { error: Some(e), .. } => Outcome::Done(Err(e)),
            Slot::Flush { instances, machines, error: None } => Outcome::Done(Ok(serde_json::to_vec(
                &serde_json::json!({"flushed": true, "instances_removed": instances, "machines_removed": machines}),
            )
            .expect("serialization cannot fail"))),
            Slot::Stats(Err(e)) => Outcome::Done(Err(e)),
        }
    }

    /// WAL_READ: every shard reads its records with offsets in
    /// `[from, watermark)`; the pages are merged in offset order and cut
    /// where the first shard's page was cut short, so no record is skipped:
    /// `next_offset` continues exactly after the last record returned. The
    /// answer always fits a frame (DECISIONS D21).
    pub async fn wal_read(&self, from: u64, limit: Option<u64>) -> Result<Vec<u8>, ApiError> {
        let limit = limit.map_or(WAL_READ_MAX_RECORDS, |l| {
            (l as usize).min(WAL_READ_MAX_RECORDS)
        });
        let (records, _) = self.read_merged(from, self.seq.watermark(), limit).await?;
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(br#"{"next_offset":"#);
        let mut body = Vec::new();
        let mut last = None;
        for (i, r) in records.iter().take(limit).enumerate() {
            let before = body.len();
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"entry":"#);
            wal_entry::append_read_view(r.kind, &r.payload, &mut body);
            body.extend_from_slice(
                format!(r#","offset":{o},"sequence":{o}}}"#, o = r.offset).as_bytes(),
            );
            // The first record always goes (a record fits a frame); later
            // ones only while the answer stays within its bound.
            if i > 0 && body.len() + 64 > WAL_READ_BYTES {
                body.truncate(before);
                break;
            }
            last = Some(r.offset);
        }
        match last {
            Some(o) => out.extend_from_slice((o + 1).to_string().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","records":["#);
        out.extend_from_slice(&body);
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// Reads records with offsets in `[from, below)` from every shard,
    /// merged in offset order and cut where the first shard's page was cut
    /// short (so nothing in between is skipped). Returns them with the
    /// offset to continue from: `below` when everything up to it was read.
    /// `below` must not exceed the watermark.
    pub async fn read_merged(
        &self,
        from: u64,
        below: u64,
        limit: usize,
    ) -> Result<(Vec<OwnedRecord>, u64), ApiError> {
        let n = self.shards.len();
        let range = ReadRange {
            from,
            below,
            limit,
            max_bytes: (WAL_READ_BYTES / n).max(256 * 1024),
        };
        let (tx, rx) = flume::bounded(n);
        let mut waiting = 0;
        for shard in &self.shards {
            let req = WalReadRequest {
                range,
                reply_to: tx.clone(),
            };
            if shard.send_async(ShardMsg::WalRead(req)).await.is_ok() {
                waiting += 1;
            }
        }
        if waiting < n {
            return Err(unavailable());
        }
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            match rx.recv_async().await {
                Ok((_, Ok(page))) => pages.push(page),
                Ok((_, Err(e))) => return Err(e),
                Err(_) => return Err(unavailable()),
            }
        }
        let cutoff = pages
            .iter()
            .filter(|p| p.truncated)
            .filter_map(|p| p.records.last().map(|r| r.offset))
            .min();
        let mut records: Vec<OwnedRecord> = pages
            .into_iter()
            .flat_map(|p| p.records)
            .filter(|r| cutoff.is_none_or(|c| r.offset <= c))
            .collect();
        records.sort_unstable_by_key(|r| r.offset);
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map_or(from, |r| r.offset + 1)
        } else {
            match cutoff {
                Some(c) => c + 1,
                None => below.max(from),
            }
        };
        Ok((records, next))
    }

    fn stats_result(&self, s: &ShardWalStats) -> Vec<u8> {
        #[derive(Serialize)]
        struct Io {
            bytes_read: u64,
            bytes_written: u64,
            fsyncs: u64,
            reads: u64,
            writes: u64,
        }
        #[derive(Serialize)]
        struct R {
            entry_count: u64,
            io_stats: Io,
            latest_offset: u64,
            segment_count: u64,
            total_size_bytes: u64,
        }
        serde_json::to_vec(&R {
            entry_count: s.entries,
            io_stats: Io {
                bytes_read: s.io.bytes_read,
                bytes_written: s.io.bytes_written,
                fsyncs: s.io.fsyncs,
                reads: s.io.reads,
                writes: s.io.writes,
            },
            latest_offset: self.seq.peek(),
            segment_count: s.segments,
            total_size_bytes: s.used_bytes,
        })
        .expect("serialization cannot fail")
    }
}

/// The merge state of one action, after queueing its shard commands (if
/// any) on `per_shard`.
fn slot_for(slot: u32, action: Action, per_shard: &mut [Vec<(u32, Command)>]) -> Slot {
    match action {
        Action::Local(r) => Slot::Done(r),
        Action::Bye => Slot::Bye,
        Action::Shard(s, cmd) => {
            per_shard[s].push((slot, cmd));
            Slot::Single
        }
        Action::PutMachine(cmd) => put_slot(slot, cmd, per_shard),
        Action::ListInstances {
            machine,
            state,
            offset,
            limit,
        } => {
            let take = offset.saturating_add(limit);
            fan_out(per_shard, slot, || Command::ListInstances {
                machine: machine.clone(),
                state: state.clone(),
                take,
            });
            Slot::List {
                offset,
                limit,
                total: 0,
                parts: Vec::with_capacity(per_shard.len()),
                error: None,
            }
        }
        Action::WalStats => {
            fan_out(per_shard, slot, || Command::WalStats);
            Slot::Stats(Ok(ShardWalStats::default()))
        }
        Action::WalRead { from, limit } => Slot::WalRead { from, limit },
        Action::Batch(_)
        | Action::Watch(_)
        | Action::Unwatch(_)
        | Action::Compact { .. }
        | Action::SnapshotInstance(..)
        | Action::TransferLeader { .. } => Slot::Done(Err(ApiError::new(
            ErrorCode::InternalError,
            "internal error: a connection-level operation reached the router",
        ))),
        Action::FlushAll => {
            fan_out(per_shard, slot, || Command::FlushAll);
            Slot::Flush {
                instances: 0,
                machines: 0,
                error: None,
            }
        }
    }
}

/// Queues one command per shard, built by `cmd`, for a fan-out action.
fn fan_out(per_shard: &mut [Vec<(u32, Command)>], slot: u32, cmd: impl Fn() -> Command) {
    for list in per_shard.iter_mut() {
        list.push((slot, cmd()));
    }
}

/// PUT_MACHINE phase 1: shard 0 only; the command is kept for phase 2
/// when there are other shards.
fn put_slot(slot: u32, cmd: Command, per_shard: &mut [Vec<(u32, Command)>]) -> Slot {
    let (machine, version) = match &cmd {
        Command::PutMachine {
            machine, version, ..
        } => (machine.clone(), *version),
        _ => unreachable!("PutMachine action carries a PutMachine command"),
    };
    per_shard[0].push((slot, cmd.clone()));
    Slot::Put {
        machine,
        version,
        pending: (per_shard.len() > 1).then_some(cmd),
        first_error: None,
        created: false,
        checksum: None,
    }
}

/// PUT_MACHINE phase 2: the pending commands, for every shard but 0, of
/// the PUTs that shard 0 accepted (no error, a checksum).
fn put_phase2(slots: &mut [Slot], n: usize) -> Vec<Vec<(u32, Command)>> {
    let mut phase2: Vec<Vec<(u32, Command)>> = vec![Vec::new(); n];
    for (i, slot) in slots.iter_mut().enumerate() {
        if let Slot::Put {
            pending,
            first_error,
            checksum,
            ..
        } = slot
        {
            if let Some(cmd) = pending.take() {
                if first_error.is_none() && checksum.is_some() {
                    for list in phase2.iter_mut().skip(1) {
                        list.push((i as u32, cmd.clone()));
                    }
                }
            }
        }
    }
    phase2
}

/// PUT_MACHINE result: created if any shard stored it now (a retry after a
/// partial failure completes the registration on the remaining shards).
fn put_result(machine: &str, version: u32, created: bool, checksum: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "created": created,
        "machine": machine,
        "stored_checksum": checksum,
        "version": version,
    }))
    .expect("serialization cannot fail")
}

/// Folds one shard's answer into a request's slot. An answer of an
/// unexpected kind (a bug) becomes an `INTERNAL_ERROR` answer, never a
/// panic of the frontend.
fn merge(slot: &mut Slot, shard: usize, reply: Reply) {
    match (slot, reply) {
        (s @ Slot::Single, Reply::Json(b)) => *s = Slot::Done(Ok(b)),
        (s @ Slot::Single, Reply::Error(e)) => *s = Slot::Done(Err(e)),
        (
            Slot::Put {
                first_error,
                created,
                checksum,
                ..
            },
            r,
        ) => merge_put(first_error, created, checksum, shard, r),
        (
            Slot::List {
                total,
                parts,
                error,
                ..
            },
            r,
        ) => merge_list(total, parts, error, r),
        (Slot::Stats(acc), r) => merge_stats(acc, r),
        (
            Slot::Flush {
                instances,
                machines,
                error,
            },
            r,
        ) => merge_flush(instances, machines, error, shard, r),
        (s, other) => *s = Slot::Done(Err(unexpected(&other))),
    }
}

/// PUT_MACHINE: created if any shard stored it now; of the shards' errors
/// the lowest shard's is kept (an unexpected reply kind always is).
fn merge_put(
    first_error: &mut Option<(usize, ApiError)>,
    created: &mut bool,
    checksum: &mut Option<String>,
    shard: usize,
    reply: Reply,
) {
    match reply {
        Reply::PutMachine {
            created: c,
            checksum: sum,
        } => {
            *created |= c;
            *checksum = Some(sum);
        }
        Reply::Error(e) => {
            if first_error.as_ref().is_none_or(|(s, _)| shard < *s) {
                *first_error = Some((shard, e));
            }
        }
        other => *first_error = Some((shard, unexpected(&other))),
    }
}

/// LIST_INSTANCES: totals add up; each shard's sorted share is kept for
/// [`list_result`].
fn merge_list(
    total: &mut u64,
    parts: &mut Vec<Vec<InstanceSummary>>,
    error: &mut Option<ApiError>,
    reply: Reply,
) {
    match reply {
        Reply::Instances { total: t, items } => {
            *total += t;
            parts.push(items);
        }
        Reply::Error(e) => *error = Some(e),
        other => *error = Some(unexpected(&other)),
    }
}

/// WAL_STATS: every figure is summed; the first error sticks.
fn merge_stats(acc: &mut Result<ShardWalStats, ApiError>, reply: Reply) {
    match (acc.as_mut(), reply) {
        (Ok(acc), Reply::WalStats(s)) => {
            acc.entries += s.entries;
            acc.segments += s.segments;
            acc.used_bytes += s.used_bytes;
            acc.io.bytes_read += s.io.bytes_read;
            acc.io.bytes_written += s.io.bytes_written;
            acc.io.reads += s.io.reads;
            acc.io.writes += s.io.writes;
            acc.io.fsyncs += s.io.fsyncs;
        }
        (Err(_), _) => {}
        (Ok(_), Reply::Error(e)) => *acc = Err(e),
        (Ok(_), other) => *acc = Err(unexpected(&other)),
    }
}

/// FLUSH_ALL: removed instances add up; definitions are counted once.
fn merge_flush(
    instances: &mut u64,
    machines: &mut u64,
    error: &mut Option<ApiError>,
    shard: usize,
    reply: Reply,
) {
    match reply {
        Reply::Flushed {
            instances: i,
            machines: m,
        } => {
            *instances += i;
            // Every shard holds every definition: count them once.
            if shard == 0 {
                *machines = m;
            }
        }
        Reply::Error(e) => *error = Some(e),
        other => *error = Some(unexpected(&other)),
    }
}

fn unexpected(r: &Reply) -> ApiError {
    tracing::error!(reply = ?r, "shard answered with an unexpected reply kind");
    ApiError::new(
        ErrorCode::InternalError,
        "internal error: unexpected shard reply",
    )
}

/// Merges the shards' id-sorted shares into one page in instance-id order,
/// so consecutive pages neither overlap nor leave gaps while nothing
/// changes.
fn list_result(
    offset: usize,
    limit: usize,
    total: u64,
    parts: Vec<Vec<InstanceSummary>>,
) -> Vec<u8> {
    let mut all: Vec<InstanceSummary> = parts.into_iter().flatten().collect();
    all.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let page: Vec<InstanceSummary> = all.into_iter().skip(offset).take(limit).collect();
    // Keep the response within a frame: return fewer items, has_more says so.
    let mut items = Vec::with_capacity(page.len());
    let mut bytes = 0usize;
    for it in page {
        bytes += 200 + it.id.len() + it.machine.len() + it.state.len();
        if bytes > LIST_BYTES_BUDGET {
            break;
        }
        items.push(it);
    }
    #[derive(Serialize)]
    struct R {
        has_more: bool,
        instances: Vec<InstanceSummary>,
        total: u64,
    }
    let has_more = (offset + items.len()) < total as usize;
    serde_json::to_vec(&R {
        has_more,
        instances: items,
        total,
    })
    .expect("serialization cannot fail")
}

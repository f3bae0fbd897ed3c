//! A shard as a member of its Raft group (cluster mode, issue 17).
//!
//! The loop is the standalone one with its commit point replaced: a drain
//! still executes against the engine first, but instead of one WAL commit
//! its staged records become one proposal, and the drain's replies wait
//! until the group has committed and applied that entry. Only then are the
//! records written to the shard's WAL, which therefore holds committed
//! records only, in log order, with the offsets the leader assigned.
//! A drain of reads only is confirmed by ReadIndex (one heartbeat round,
//! no entry) after it executed: if this node still led its group then,
//! the state it read held every committed write.
//!
//! Entries this node did not propose (a follower's whole diet, and a new
//! leader's inheritance) are replayed into the engine and written to the
//! WAL as they are applied. A drain whose index another entry took is
//! rolled back and its callers told the outcome is unknown; so is one that
//! no majority confirmed within the commit timeout — that one is kept as
//! *unresolved*, and the shard serves again only once whatever entry holds
//! its index has been applied (replayed, if it was ours after all).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::future;
use raft::prelude::Message;
use raft::StateRole;

use super::{FsyncPolicy, HubMsg, ShardLoop, ShardMsg};
use crate::engine::Staged;
use crate::error::{ApiError, ErrorCode};
use crate::replication::payload;
use crate::replication::replica::{Applied, Proposed, Replica, ReplicaConfig};
use crate::replication::store::RaftStore;
use crate::replication::{wire, RaftLog};
use crate::wal_entry::WalEntry;

/// Most frames queued to one peer; beyond it messages are dropped, as a
/// lossy network would (raft retransmits).
pub const PEER_QUEUE: usize = 4096;

/// Entries kept in the group's log behind the applied index, for
/// followers that lag (one further behind needs a snapshot transfer).
pub const RETAINED_ENTRIES: u64 = 10_000;
/// The log file is compacted once it passes this size...
const COMPACT_LOG_BYTES: u64 = 64 << 20;
/// ...or holds this many entries.
const COMPACT_LOG_ENTRIES: u64 = 4 * RETAINED_ENTRIES;

/// A shard's cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterShardConfig {
    /// This node's id.
    pub node_id: u64,
    /// Every voter's id, this node's included.
    pub voters: Vec<u64>,
    /// Where the group's Raft log lives.
    pub raft_dir: PathBuf,
    /// One tick of the group's clock.
    pub tick: Duration,
    /// Election and heartbeat ticks, message bounds.
    pub replica: ReplicaConfig,
    /// How long a drain waits for its commit before its callers are told
    /// the outcome is unknown.
    pub commit_timeout: Duration,
    /// Frames to each peer (its transport task sends them).
    pub peers: HashMap<u64, flume::Sender<Vec<u8>>>,
    /// What `REPLICATION_STATUS` and the metrics read.
    pub status: Arc<GroupStatus>,
}

/// A group member's figures, shared with the frontends.
#[derive(Debug, Default)]
pub struct GroupStatus {
    pub term: AtomicU64,
    /// 0 follower, 1 candidate, 2 leader, 3 pre-candidate.
    pub role: AtomicU8,
    /// 0 for none known.
    pub leader: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    /// The last offset written to the WAL.
    pub applied_offset: AtomicU64,
    /// Elections this node has seen (term changes).
    pub term_changes: AtomicU64,
    /// On the leader: each peer's matched index.
    pub matched: Mutex<Vec<(u64, u64)>>,
}

/// The drain waiting for its entry.
struct InFlight {
    proposed: Proposed,
    staged: Vec<Staged>,
    outcome: Option<Outcome>,
}

/// What became of a drain's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    Lost,
}

/// The group side of a shard: its replica, log file and waiting drain.
pub(super) struct Member {
    pub(super) cfg: ClusterShardConfig,
    replica: Replica,
    store: RaftStore,
    next_tick: Instant,
    in_flight: Option<InFlight>,
    /// The index of a proposal of ours whose fate is unknown (it timed out
    /// and was rolled back); no drain runs before that index is applied.
    unresolved: Option<u64>,
    /// The ReadIndex request being waited for (its context) and its answer.
    read: Option<(Vec<u8>, Option<u64>)>,
    reads: u64,
    /// The offset after the last record in the WAL.
    wal_next: u64,
}

impl Member {
    /// Opens the group's log and joins it. `wal_next` is the offset after
    /// the last record the WAL holds: committed entries below it are
    /// already in the engine and are skipped when raft hands them over again.
    pub(super) fn open(cfg: ClusterShardConfig, wal_next: u64) -> Result<Member, String> {
        let (store, state) =
            RaftStore::open(&cfg.raft_dir, &cfg.voters).map_err(|e| e.to_string())?;
        let applied = state.snap_index;
        let seed = cfg.node_id ^ (std::process::id() as u64) << 20 ^ now_nanos();
        let mut replica = Replica::new(
            cfg.node_id,
            RaftLog::new(state),
            &cfg.replica,
            applied,
            seed,
        )
        .map_err(|e| format!("raft: {e}"))?;
        replica.raise_next_offset(wal_next);
        Ok(Member {
            next_tick: Instant::now() + cfg.tick,
            cfg,
            replica,
            store,
            in_flight: None,
            unresolved: None,
            read: None,
            reads: 0,
            wal_next,
        })
    }

    /// Whether this member may execute a drain now: it leads, its state
    /// holds every entry before its term's, and no proposal of ours is of
    /// unknown fate.
    pub(super) fn can_serve(&self) -> bool {
        self.replica.can_serve() && self.unresolved.is_none_or(|i| self.replica.applied() >= i)
    }

    /// The error a drain gets on a member that cannot serve.
    pub(super) fn not_serving(&self) -> ApiError {
        let (_, role, leader) = self.replica.role();
        let detail = if role == StateRole::Leader {
            "the new leader is catching up; retry".to_string()
        } else if leader == 0 {
            "the cluster has no leader (no majority reachable); retry".to_string()
        } else {
            format!("this node is not the leader; node {leader} leads; retry there")
        };
        ApiError::new(ErrorCode::InternalError, format!("replication: {detail}"))
    }

    /// The offset a drain's records start at on this leader.
    pub(super) fn next_offset(&self) -> u64 {
        self.replica.next_offset().max(self.wal_next)
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if let Some(tx) = self.cfg.peers.get(&m.to) {
                let mut frame = Vec::new();
                wire::encode(0, &m, &mut frame);
                // A full or closed queue drops the message; raft resends.
                let _ = tx.try_send(frame);
            }
        }
    }

    /// Drops applied entries from the log (memory and file) once it has
    /// grown past its bounds, keeping [`RETAINED_ENTRIES`] for followers.
    /// The applied entries are in the WAL, which is what recovery reads.
    fn compact_log_if_due(&mut self) {
        let applied = self.replica.applied();
        let log = self.replica.log().clone();
        let held = log.with_state(|s| s.last_index() - s.snap_index);
        if self.store.len() < COMPACT_LOG_BYTES && held < COMPACT_LOG_ENTRIES {
            return;
        }
        let keep_from = applied.saturating_sub(RETAINED_ENTRIES) + 1;
        if log.with_state(|s| keep_from <= s.snap_index + 1) {
            return;
        }
        let store = &mut self.store;
        if let Err(e) = log.with_state(|s| store.compact(s, keep_from)) {
            // The old file is intact (the new one replaces it only once
            // durable): go on with it, and try again later.
            tracing::error!(error = %e, "compacting the raft log failed");
        }
    }

    fn publish(&self) {
        let s = &self.cfg.status;
        let (term, role, leader) = self.replica.role();
        if s.term.swap(term, Ordering::Relaxed) != term {
            s.term_changes.fetch_add(1, Ordering::Relaxed);
        }
        let role = match role {
            StateRole::Follower => 0,
            StateRole::Candidate => 1,
            StateRole::Leader => 2,
            StateRole::PreCandidate => 3,
        };
        s.role.store(role, Ordering::Relaxed);
        s.leader.store(leader, Ordering::Relaxed);
        s.commit_index
            .store(self.replica.commit_index(), Ordering::Relaxed);
        s.applied_index
            .store(self.replica.applied(), Ordering::Relaxed);
        s.applied_offset.store(self.wal_next - 1, Ordering::Relaxed);
        if let Ok(mut m) = s.matched.lock() {
            *m = self.replica.progress();
        }
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What woke a wait for the group.
enum Woke {
    Msg(Option<ShardMsg>),
    Timer,
}

impl ShardLoop {
    fn member(&mut self) -> &mut Member {
        self.cluster.as_mut().expect("cluster mode")
    }

    /// A peer's message for this group.
    pub(super) async fn on_peer(&mut self, msg: Message) {
        self.member().replica.step(msg);
        self.cycle().await;
    }

    /// The group's clock, if a tick is due; then whatever it caused.
    pub(super) async fn tick_if_due(&mut self) {
        let m = self.member();
        if Instant::now() >= m.next_tick {
            m.next_tick = Instant::now() + m.cfg.tick;
            m.replica.tick();
            self.cycle().await;
        }
    }

    /// Makes the group's log durable (the fsync policy's timed sync, and
    /// shutdown).
    pub(super) fn sync_raft_log(&mut self) -> Result<(), String> {
        match self.cluster.as_mut() {
            Some(m) => m.store.sync().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// When the next tick is due.
    pub(super) fn next_tick(&self) -> Option<Instant> {
        self.cluster.as_ref().map(|m| m.next_tick)
    }

    /// Replicates a drain's staged records (or, with none, confirms this
    /// node still leads) and waits for the outcome. On success the records
    /// are in the WAL.
    pub(super) async fn replicate_staged(&mut self) -> Result<(), ApiError> {
        let staged = self.engine.take_staged();
        if staged.is_empty() {
            return self.confirm_leadership().await;
        }
        let m = self.member();
        let base = staged[0].offset;
        let last = staged.last().expect("not empty").offset;
        assert!(
            base >= m.next_offset(),
            "a drain's offsets start at the leader's next"
        );
        let mut data = Vec::new();
        payload::encode(&staged, &mut data);
        m.replica.raise_next_offset(base);
        let count = u32::try_from(last - base + 1).expect("a drain's offsets fit a u32");
        let proposed = m.replica.propose(&data, count).map_err(|e| {
            ApiError::new(ErrorCode::InternalError, format!("replication: {e}; retry"))
        })?;
        assert_eq!(proposed.offset, base);
        m.in_flight = Some(InFlight {
            proposed,
            staged,
            outcome: None,
        });
        self.cycle().await;
        let waited = self
            .wait_for_group(|m| m.in_flight.as_ref().and_then(|f| f.outcome).is_some())
            .await;
        let m = self.member();
        let flight = m.in_flight.take().expect("still ours");
        match (waited, flight.outcome) {
            (_, Some(Outcome::Committed)) => Ok(()),
            (_, Some(Outcome::Lost)) => {
                Err(unknown_outcome("another leader's entry took its place"))
            }
            (Err(e), None) => {
                m.unresolved = Some(flight.proposed.index);
                Err(e)
            }
            (Ok(()), None) => unreachable!("the wait ends with an outcome"),
        }
    }

    /// A drain of reads: asks the group to confirm this leader's commit
    /// index, and waits for it to be applied.
    async fn confirm_leadership(&mut self) -> Result<(), ApiError> {
        let m = self.member();
        m.reads += 1;
        let ctx = m.reads.to_le_bytes().to_vec();
        let term = m.replica.role().0;
        m.replica.read_index(ctx.clone());
        m.read = Some((ctx, None));
        self.cycle().await;
        let waited = self
            .wait_for_group(move |m| {
                let confirmed = matches!(m.read, Some((_, Some(at))) if m.replica.applied() >= at);
                confirmed || !m.replica.is_leader() || m.replica.role().0 != term
            })
            .await;
        let m = self.member();
        let read = m.read.take();
        waited?;
        match read {
            Some((_, Some(at))) if m.replica.applied() >= at && m.replica.is_leader() => Ok(()),
            _ => Err(ApiError::new(
                ErrorCode::InternalError,
                "replication: this node stopped leading before the read was confirmed; retry",
            )),
        }
    }

    /// Runs the group (peer messages, ticks) until `done` holds or the
    /// commit timeout passes. Other messages wait for the drain in flight.
    async fn wait_for_group(&mut self, done: impl Fn(&Member) -> bool) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.member().cfg.commit_timeout;
        loop {
            if done(self.member()) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(unknown_outcome("no majority confirmed it in time"));
            }
            let wake = self.member().next_tick.min(deadline);
            let rx = &self.rx;
            let woke = future::or(async { Woke::Msg(rx.recv_async().await.ok()) }, async {
                glommio::timer::sleep(wake.saturating_duration_since(now)).await;
                Woke::Timer
            })
            .await;
            match woke {
                Woke::Msg(Some(ShardMsg::Peer(msg))) => self.on_peer(msg).await,
                Woke::Msg(Some(other)) => self.ready.push_back(other),
                Woke::Msg(None) => return Err(unknown_outcome("the server is stopping")),
                Woke::Timer => self.tick_if_due().await,
            }
        }
    }

    /// Carries out every Ready the replica has: send, apply, persist.
    pub(super) async fn cycle(&mut self) {
        loop {
            let m = self.member();
            let out = m.replica.ready();
            let idle = out.persist.is_none()
                && out.apply.is_empty()
                && out.send.is_empty()
                && out.reads.is_empty();
            m.send(out.send);
            if let Some((ctx, answer)) = &mut m.read {
                if let Some((_, at)) = out.reads.iter().find(|(c, _)| c == ctx) {
                    *answer = Some(*at);
                }
            }
            for a in out.apply {
                self.apply_entry(a).await;
            }
            if let Some(p) = out.persist {
                let sync = self.cfg.fsync == FsyncPolicy::EveryWrite && p.must_sync;
                let m = self.member();
                if let Err(e) = m.store.write(&p, sync) {
                    // The log cannot be trusted any more: stop rather than
                    // acknowledge what may not be on disk.
                    fatal(self.cfg.id, format_args!("{e}"));
                }
                let held = m.replica.persisted(p.number);
                m.send(held);
            }
            self.member().compact_log_if_due();
            self.member().publish();
            if idle {
                return;
            }
        }
    }

    /// One committed entry: the drain in flight (its records go to the
    /// WAL), or another's (a drain in flight that it displaced is rolled
    /// back first, then the entry is replayed).
    async fn apply_entry(&mut self, a: Applied) {
        let m = self.member();
        if let Some(f) = m.in_flight.as_mut().filter(|f| f.outcome.is_none()) {
            if f.proposed.index == a.index && f.proposed.term == a.term {
                f.outcome = Some(Outcome::Committed);
                let staged = std::mem::take(&mut f.staged);
                self.write_applied(staged.iter().map(|s| (s.offset, s.kind, &s.bytes[..])))
                    .await;
                return;
            }
            if a.index >= f.proposed.index {
                f.outcome = Some(Outcome::Lost);
                self.engine.rollback();
            }
        }
        if a.offsets == 0 {
            return;
        }
        let records = match payload::decode(a.index, &a.payload) {
            Ok(r) => r,
            Err(e) => fatal(self.cfg.id, format_args!("committed {e}")),
        };
        let wal_next = self.member().wal_next;
        let fresh: Vec<_> = records
            .into_iter()
            .filter(|r| r.offset >= wal_next)
            .collect();
        let watching = self.cfg.events.watching.load(Ordering::SeqCst);
        let mut events = Vec::new();
        for r in &fresh {
            let entry: WalEntry = match serde_json::from_slice(r.bytes) {
                Ok(e) => e,
                Err(e) => fatal(
                    self.cfg.id,
                    format_args!("committed record at offset {}: {e}", r.offset),
                ),
            };
            if watching {
                entry.watch_events(r.offset, r.bytes.len(), &mut events);
            }
            if let Err(e) = self.engine.replay(r.offset, entry) {
                fatal(
                    self.cfg.id,
                    format_args!("replaying committed record at offset {}: {e}", r.offset),
                );
            }
        }
        // A one-shard cluster: an atomic batch's part is its whole batch.
        for (id, _) in self.engine.unresolved_parts() {
            self.engine.resolve_part(&id, true);
        }
        self.write_applied(fresh.iter().map(|r| (r.offset, r.kind, r.bytes)))
            .await;
        // Events first, then the watermark, as a leader's drain does.
        if !events.is_empty() {
            self.cfg.events.send(HubMsg::Events(events));
        }
        let next = self.member().wal_next;
        self.seq.advance_to(next);
        if watching {
            self.cfg.events.send(HubMsg::Released);
        }
    }

    /// Writes committed records to the WAL. A failure here leaves the WAL
    /// behind the group's log; the process stops, and recovery replays the
    /// committed entries from the Raft log.
    async fn write_applied<'a>(&mut self, records: impl Iterator<Item = (u64, u8, &'a [u8])>) {
        let mut last = None;
        for (offset, kind, bytes) in records {
            if let Err(e) = self.writer.stage(offset, kind, bytes) {
                fatal(self.cfg.id, format_args!("staging a committed record: {e}"));
            }
            last = Some(offset);
        }
        let Some(last) = last else { return };
        let sync = self.sync_due(0);
        if let Err(e) = self.writer.commit(sync).await {
            fatal(
                self.cfg.id,
                format_args!("writing committed records to the WAL: {e}"),
            );
        }
        if !sync && self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        self.member().wal_next = last + 1;
    }
}

/// The group's log or the WAL could not be written: going on could
/// acknowledge what is not on disk, so the process stops (as TigerBeetle
/// does). A restart recovers from the Raft log and catches up from peers.
fn fatal(shard: usize, what: std::fmt::Arguments<'_>) -> ! {
    tracing::error!(shard, "stopping the node: {what}");
    eprintln!("rstmdb: shard {shard}: stopping the node: {what}");
    std::process::exit(70)
}

fn unknown_outcome(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InternalError,
        format!(
            "replication: {why}; the write may or may not have taken effect: retry with its \
             idempotency key, or read before writing again"
        ),
    )
}

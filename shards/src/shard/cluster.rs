//! A shard as a member of its Raft group (cluster mode, issue 17): the
//! shard loop as host of the replication core
//! ([`crate::replication::ReplicatedShard`], the code the simulation
//! proves).
//!
//! The loop is the standalone one with its commit point replaced: a drain
//! still executes against the engine first, but instead of one WAL commit
//! its staged records become one proposal (a drain of reads: a ReadIndex
//! confirmation), and the drain's replies wait for the core's outcome.
//! Meanwhile the loop keeps the group going: peer messages, ticks, and
//! each Ready's write (the group's log file), messages and applied
//! entries. Committed records reach the shard's WAL as they are applied,
//! so it holds committed records only, in log order, with the offsets the
//! leader assigned; watches and WAL_READ on any node read them there.
//!
//! A drain that no majority confirms within the commit timeout is rolled
//! back and its callers told the outcome is unknown; the core keeps its
//! index open until whatever entry lands there is applied.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::future;
use raft::prelude::Message;
use raft::StateRole;

use super::transfer::{outgoing_dir, Outgoing};
use super::{FsyncPolicy, HubMsg, ShardLoop, ShardMsg};
use crate::commands::WatchEvent;
use crate::error::{ApiError, ErrorCode};
use crate::replication::replica::Persist;
use crate::replication::replica::{Replica, ReplicaConfig};
use crate::replication::state::{DrainError, Outcome, Record, ReplicatedShard};
use crate::replication::store::{RaftStore, StoreError};
use crate::replication::{wire, RaftLog};

/// Most frames queued to one peer; beyond it messages are dropped, as a
/// lossy network would (raft retransmits).
pub const PEER_QUEUE: usize = 4096;

/// The log is compacted once its file passes this size (or it holds
/// [`LogBounds::entries`] entries).
const COMPACT_LOG_BYTES: u64 = 64 << 20;
/// A member that lags holds compaction back until the log reaches this
/// size (or [`LogBounds::hard_entries`]); past it the log is compacted all
/// the same, and that member catches up by a snapshot transfer.
const HARD_LOG_BYTES: u64 = 256 << 20;

/// How many entries the group's log holds before it is compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Compacted once it holds this many entries (`cluster.raft_log_entries`).
    pub entries: u64,
    /// Entries kept behind the point every member has reached (a new
    /// leader may need them): 1/40 of `entries`.
    pub retained: u64,
    /// A lagging member holds compaction back up to this many entries:
    /// 12.5 × `entries`.
    pub hard_entries: u64,
}

impl LogBounds {
    /// The bounds derived from `entries` (40,000 by default: 1,000 kept
    /// behind, 500,000 held for a lagging member).
    pub fn from_entries(entries: u64) -> LogBounds {
        let entries = entries.max(2);
        LogBounds {
            entries,
            retained: (entries / 40).max(1),
            hard_entries: entries.saturating_mul(25) / 2,
        }
    }
}

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
    /// When the group's log is compacted.
    pub log_bounds: LogBounds,
    /// What a received snapshot is loaded with.
    pub limits: crate::engine::EngineLimits,
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
    /// Entries sent to followers in append messages.
    pub entries_sent: AtomicU64,
    /// Drains no majority confirmed within the commit timeout.
    pub commit_timeouts: AtomicU64,
    /// Snapshots this node offered to followers behind its compacted log.
    pub snapshots_sent: AtomicU64,
    /// Leader's snapshots this node installed.
    pub snapshots_installed: AtomicU64,
    /// Since when (Unix ms) this member has applied less than it knows
    /// committed; 0 while caught up (`lag_seconds`).
    pub behind_since_ms: AtomicU64,
}

/// Histogram of seconds from a drain's proposal to its outcome.
pub const COMMIT_SECONDS: &str = "rstmdb_replication_commit_seconds";

/// The group side of a shard: the replication core and the log file.
pub(super) struct Member {
    pub(super) cfg: ClusterShardConfig,
    pub(super) shard: ReplicatedShard,
    /// The log file; lent to a blocking thread during a synced write.
    store: Option<RaftStore>,
    next_tick: Instant,
    /// What became of the drain in flight, once the core says.
    outcome: Option<Outcome>,
    /// The snapshot this node builds for followers (as leader).
    pub(super) outgoing: Outgoing,
}

impl Member {
    /// Opens the group's log and joins it. `wal_next` is the offset after
    /// the last record the WAL holds: committed entries below it are
    /// already in the engine and are skipped when raft hands them over again.
    pub(super) fn open(cfg: ClusterShardConfig, wal_next: u64) -> Result<Member, String> {
        let (store, state) =
            RaftStore::open(&cfg.raft_dir, &cfg.voters).map_err(|e| e.to_string())?;
        clear_outgoing(&outgoing_dir(&cfg.raft_dir))?;
        let applied = state.snap_index;
        let seed = cfg.node_id ^ ((std::process::id() as u64) << 20) ^ now_nanos();
        let replica = Replica::new(
            cfg.node_id,
            RaftLog::new(state),
            &cfg.replica,
            applied,
            seed,
        )
        .map_err(|e| format!("raft: {e}"))?;
        Ok(Member {
            next_tick: Instant::now() + cfg.tick,
            cfg,
            shard: ReplicatedShard::new(replica, wal_next),
            store: Some(store),
            outcome: None,
            outgoing: Outgoing::default(),
        })
    }

    /// Whether this member may execute a drain now.
    pub(super) fn can_serve(&self) -> bool {
        self.shard.can_serve()
    }

    /// The error a drain gets on a member that cannot serve.
    pub(super) fn not_serving(&self) -> ApiError {
        let (_, role, leader) = self.shard.replica().role();
        let detail = if role == StateRole::Leader {
            "the leader is catching up; retry".to_string()
        } else if leader == 0 {
            "the cluster has no leader (no majority reachable); retry".to_string()
        } else {
            format!("this node is not the leader; node {leader} leads; retry there")
        };
        ApiError::new(ErrorCode::InternalError, format!("replication: {detail}"))
    }

    /// The offset a drain's records start at on this leader.
    pub(super) fn next_offset(&self) -> u64 {
        self.shard.next_offset()
    }

    /// The offset after the last record in the WAL.
    pub(super) fn applied_offset(&self) -> u64 {
        self.shard.applied_offset()
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            self.cfg
                .status
                .entries_sent
                .fetch_add(m.entries.len() as u64, Ordering::Relaxed);
            if let Some(tx) = self.cfg.peers.get(&m.to) {
                let mut frame = Vec::new();
                wire::encode(0, &m, &mut frame);
                // A full or closed queue drops the message; raft resends.
                let _ = tx.try_send(frame);
            }
        }
    }

    /// The first index to keep if the log has grown past its bounds. What
    /// every member has reached goes (less [`RETAINED_ENTRIES`]): a leader
    /// knows each follower's matched index; a follower, only its own. A
    /// member that lags holds that back until the hard bounds.
    fn log_compaction_due(&self) -> Option<u64> {
        let r = self.shard.replica();
        let (snap_index, held) = r
            .log()
            .with_state(|s| (s.snap_index, s.last_index() - s.snap_index));
        let applied = r.applied();
        let reached = r
            .progress()
            .iter()
            .map(|(_, m)| *m)
            .min()
            .unwrap_or(applied);
        let at = LogPosition {
            bytes: self.store().len(),
            held,
            snap_index,
            applied,
            reached,
        };
        let point = compaction_point(&self.cfg.log_bounds, &at)?;
        if point.past_lagging {
            tracing::warn!(
                reached,
                keep_from = point.keep_from,
                "compacting the raft log past a lagging member: it will catch up by a snapshot \
                 transfer"
            );
        }
        Some(point.keep_from)
    }

    /// Drops the entries before `keep_from` from the log, memory and file.
    /// The caller made the WAL, which holds their records, durable first.
    fn compact_log(&mut self, keep_from: u64) {
        let log = self.shard.replica().log().clone();
        let store = self.store.as_mut().expect("not lent out");
        if let Err(e) = log.with_state(|s| store.compact(s, keep_from)) {
            // The old file is intact (the new one replaces it only once
            // durable): go on with it, and try again later.
            tracing::error!(error = %e, "compacting the raft log failed");
        }
    }

    fn store(&self) -> &RaftStore {
        self.store.as_ref().expect("not lent out")
    }

    fn store_mut(&mut self) -> &mut RaftStore {
        self.store.as_mut().expect("not lent out")
    }

    /// Writes a Ready's share of the log. A synced write runs on a
    /// blocking thread, so that this executor keeps going meanwhile: the
    /// append messages this Ready sent reach the followers (the peer tasks
    /// share the executor) while the leader's own write runs, and the
    /// frontends keep reading. An unsynced write (page cache) is cheaper
    /// done here.
    async fn persist(&mut self, w: Persist, sync: bool) -> Result<(), StoreError> {
        if !sync {
            return self.store_mut().write(&w, false);
        }
        let mut store = self.store.take().expect("one write at a time");
        let (store, written) = glommio::executor()
            .spawn_blocking(move || {
                let written = store.write(&w, true);
                (store, written)
            })
            .await;
        self.store = Some(store);
        written
    }

    fn publish(&self) {
        let s = &self.cfg.status;
        let r = self.shard.replica();
        let (term, role, leader) = r.role();
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
        s.commit_index.store(r.commit_index(), Ordering::Relaxed);
        s.applied_index.store(r.applied(), Ordering::Relaxed);
        let behind = r.applied() < r.commit_index();
        match (behind, s.behind_since_ms.load(Ordering::Relaxed)) {
            (true, 0) => s.behind_since_ms.store(now_ms().max(1), Ordering::Relaxed),
            (false, since) if since != 0 => s.behind_since_ms.store(0, Ordering::Relaxed),
            _ => {}
        }
        s.applied_offset
            .store(self.shard.applied_offset() - 1, Ordering::Relaxed);
        if let Ok(mut m) = s.matched.lock() {
            *m = r.progress();
        }
    }
}

/// Where a member's log stands, for [`compaction_point`].
struct LogPosition {
    /// Its file's size.
    bytes: u64,
    /// Entries after `snap_index`.
    held: u64,
    /// The compaction point.
    snap_index: u64,
    /// Applied here.
    applied: u64,
    /// Reached by every member (as far as this one knows).
    reached: u64,
}

/// Empties (creating it if need be) the directory of snapshots for
/// followers: what a crash left there is not wanted.
fn clear_outgoing(dir: &std::path::Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// The follower furthest along (by matched index) to hand leadership to.
fn best_successor(me: u64, progress: &[(u64, u64)]) -> Option<u64> {
    progress
        .iter()
        .filter(|(id, _)| *id != me)
        .max_by_key(|(id, matched)| (*matched, std::cmp::Reverse(*id)))
        .map(|(id, _)| *id)
}

/// Where to compact a log.
#[derive(Debug, PartialEq, Eq)]
struct CompactionPoint {
    keep_from: u64,
    /// A member has not reached it (the hard bounds forced it).
    past_lagging: bool,
}

fn compaction_point(bounds: &LogBounds, at: &LogPosition) -> Option<CompactionPoint> {
    if at.bytes < COMPACT_LOG_BYTES && at.held < bounds.entries {
        return None;
    }
    let hard = at.bytes >= HARD_LOG_BYTES || at.held >= bounds.hard_entries;
    let upto = if hard {
        at.applied
    } else {
        at.applied.min(at.reached)
    };
    let keep_from = upto.saturating_sub(bounds.retained) + 1;
    (keep_from > at.snap_index + 1).then_some(CompactionPoint {
        keep_from,
        past_lagging: at.reached < keep_from,
    })
}

fn now_ms() -> u64 {
    now_nanos() / 1_000_000
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Why a wait for the group ended without its condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    TimedOut,
    Stopping,
}

/// What woke a wait for the group.
enum Woke {
    Msg(Option<ShardMsg>),
    Timer,
}

impl ShardLoop {
    pub(super) fn member(&mut self) -> &mut Member {
        self.cluster.as_mut().expect("cluster mode")
    }

    /// A peer's message for this group.
    pub(super) async fn on_peer(&mut self, msg: Message) {
        self.member().shard.replica_mut().step(msg);
        self.cycle().await;
    }

    /// The group's clock, if a tick is due; then whatever it caused.
    pub(super) async fn tick_if_due(&mut self) {
        let m = self.member();
        if Instant::now() >= m.next_tick {
            m.next_tick = Instant::now() + m.cfg.tick;
            m.shard.replica_mut().tick();
            self.cycle().await;
        }
    }

    /// Makes the group's log durable (the fsync policy's timed sync, and
    /// shutdown).
    pub(super) fn sync_raft_log(&mut self) -> Result<(), String> {
        match self.cluster.as_mut() {
            Some(m) => m.store_mut().sync().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The group's log file's I/O (cluster mode): writes, bytes, syncs.
    pub(super) fn raft_log_io(&self) -> Option<(u64, u64, u64)> {
        self.cluster.as_ref().map(|m| m.store().io())
    }

    /// When the next tick is due.
    pub(super) fn next_tick(&self) -> Option<Instant> {
        self.cluster.as_ref().map(|m| m.next_tick)
    }

    /// Replicates a drain's staged records (or, with none, confirms this
    /// node still leads) and waits for the outcome. On success the records
    /// are in the WAL.
    pub(super) async fn replicate_staged(
        &mut self,
        reserved: std::ops::Range<u64>,
    ) -> Result<(), ApiError> {
        let staged = self.engine.take_staged();
        let m = self.member();
        m.outcome = None;
        let taken = if staged.is_empty() {
            m.shard.confirm_reads()
        } else {
            m.shard.propose(staged, reserved).map(|_| ())
        };
        taken.map_err(|e: DrainError| {
            ApiError::new(ErrorCode::InternalError, format!("replication: {e}; retry"))
        })?;
        let started = Instant::now();
        self.cycle().await;
        let deadline = started + self.member().cfg.commit_timeout;
        let waited = self
            .wait_for_group(|m| m.outcome.is_some(), deadline)
            .await
            .map_err(|w| match w {
                Waited::TimedOut => unknown_outcome("no majority confirmed it in time"),
                Waited::Stopping => unknown_outcome("the server is stopping"),
            });
        metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if let Err(e) = waited {
            // Given up: undo the drain; the core keeps its index open.
            self.engine.rollback();
            let m = self.member();
            m.shard.abandon();
            m.cfg.status.commit_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        match self
            .member()
            .outcome
            .take()
            .expect("the wait ends with one")
        {
            Outcome::Committed(_) | Outcome::ReadConfirmed => Ok(()),
            Outcome::Lost(_) => Err(unknown_outcome("another leader's entry took its place")),
            Outcome::ReadLost => Err(ApiError::new(
                ErrorCode::InternalError,
                "replication: this node stopped leading before the read was confirmed; retry",
            )),
        }
    }

    /// Runs the group (peer messages, ticks) until `done` holds or the
    /// `deadline` passes. Other messages wait until then.
    async fn wait_for_group(
        &mut self,
        done: impl Fn(&Member) -> bool,
        deadline: Instant,
    ) -> Result<(), Waited> {
        loop {
            if done(self.member()) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Waited::TimedOut);
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
                Woke::Msg(None) => return Err(Waited::Stopping),
                Woke::Timer => self.tick_if_due().await,
            }
        }
    }

    /// Hands this node's leadership to `to`, or to the follower furthest
    /// along; the new leader once another node leads (within two election
    /// timeouts, after which raft has given up on the transfer).
    pub(super) async fn transfer_leader(&mut self, to: Option<u64>) -> Result<u64, ApiError> {
        let retry = |why: String| ApiError::new(ErrorCode::InternalError, format!("{why}; retry"));
        let Some(m) = self.cluster.as_mut() else {
            return Err(ApiError::bad_request("this server is not a cluster node"));
        };
        let me = m.cfg.node_id;
        let r = m.shard.replica();
        if !r.is_leader() {
            return Err(retry("this node does not lead now".into()));
        }
        let target = match to {
            Some(id) if !r.voters().contains(&id) => {
                return Err(ApiError::bad_request(format!(
                    "node {id} is not a voter of this cluster (voters: {:?})",
                    r.voters()
                )))
            }
            Some(id) => id,
            None => best_successor(me, &r.progress())
                .ok_or_else(|| retry("no other node to hand leadership to".into()))?,
        };
        if target == me {
            return Ok(me);
        }
        m.shard.replica_mut().transfer_leader(target);
        let ticks = m.cfg.replica.election_ticks as u32 * 2;
        let deadline = Instant::now() + m.cfg.tick * ticks;
        self.cycle().await;
        let handed = |m: &Member| {
            let (_, _, leader) = m.shard.replica().role();
            leader != 0 && leader != me
        };
        let waited = self.wait_for_group(handed, deadline).await;
        let (_, _, leader) = self.member().shard.replica().role();
        match waited {
            Ok(()) => {
                tracing::info!(shard = self.cfg.id, to = leader, "handed leadership over");
                Ok(leader)
            }
            Err(_) => Err(retry(format!(
                "node {target} did not take leadership in time (node {leader} leads)"
            ))),
        }
    }

    /// Carries out every Ready the core has: send, apply (WAL, watches),
    /// persist.
    pub(super) async fn cycle(&mut self) {
        loop {
            let watching = self.cfg.events.watching.load(Ordering::SeqCst);
            let m = self.cluster.as_mut().expect("cluster mode");
            let p = match m.shard.ready(&mut self.engine, watching) {
                Ok(p) => p,
                Err(e) => fatal(self.cfg.id, format_args!("applying a committed entry: {e}")),
            };
            let idle = p.persist.is_none()
                && p.install.is_none()
                && p.applied.is_empty()
                && p.send.is_empty()
                && p.outcome.is_none();
            m.send(p.send);
            if p.outcome.is_some() {
                m.outcome = p.outcome;
            }
            if let Some(install) = p.install {
                self.install_snapshot(install).await;
            }
            self.write_applied(p.write, p.events).await;
            if let Some(w) = p.persist {
                let sync = self.cfg.fsync == FsyncPolicy::EveryWrite && w.must_sync;
                let m = self.member();
                let number = w.number;
                if let Err(e) = m.persist(w, sync).await {
                    // The log cannot be trusted any more: stop rather than
                    // acknowledge what may not be on disk.
                    fatal(self.cfg.id, format_args!("{e}"));
                }
                let held = m.shard.persisted(number);
                m.send(held);
            }
            self.compact_log_if_due().await;
            self.send_snapshot_if_due().await;
            self.member().publish();
            if idle {
                return;
            }
        }
    }

    /// Compacts the group's log once it has grown past its bounds. The WAL
    /// is synced first: it is written without syncing at apply (the log is
    /// the durable copy), so it must hold the dropped entries' records
    /// durably before they go.
    async fn compact_log_if_due(&mut self) {
        let Some(keep_from) = self.member().log_compaction_due() else {
            return;
        };
        if let Err(e) = self.writer.sync().await {
            tracing::error!(shard = self.cfg.id, error = %e, "syncing the WAL before compacting the raft log failed");
            return;
        }
        self.member().compact_log(keep_from);
    }

    /// Writes committed records to the WAL, then lets watchers see the
    /// replayed transitions and readers pass the new offsets. A failed
    /// write leaves the WAL behind the group's log: the process stops, and
    /// recovery replays the committed entries from the log.
    async fn write_applied(&mut self, records: Vec<Record>, events: Vec<WatchEvent>) {
        if records.is_empty() {
            return;
        }
        for r in &records {
            if let Err(e) = self.writer.stage(r.offset, r.kind, &r.bytes) {
                fatal(self.cfg.id, format_args!("staging a committed record: {e}"));
            }
        }
        // Not synced here, whatever the fsync policy: the group's log is the
        // durable copy (synced by the policy), and recovery replays from it
        // what the WAL lost. The WAL is synced on the policy's timer, before
        // the log is compacted, and at shutdown.
        if let Err(e) = self.writer.commit(false).await {
            fatal(
                self.cfg.id,
                format_args!("writing committed records to the WAL: {e}"),
            );
        }
        if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        // Events first, then the watermark, as a leader's drain does.
        let announce = self.cfg.events.watching.load(Ordering::SeqCst);
        if !events.is_empty() {
            self.cfg.events.send(HubMsg::Events(events));
        }
        let owned = self.member().applied_offset();
        self.seq.advance_to(owned);
        if announce {
            self.cfg.events.send(HubMsg::Released);
        }
    }
}

/// The group's log or the WAL could not be written: going on could
/// acknowledge what is not on disk, so the process stops (as TigerBeetle
/// does). A restart recovers from the Raft log and catches up from peers.
pub(super) fn fatal(shard: usize, what: std::fmt::Arguments<'_>) -> ! {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(bytes: u64, held: u64, snap_index: u64, applied: u64, reached: u64) -> LogPosition {
        LogPosition {
            bytes,
            held,
            snap_index,
            applied,
            reached,
        }
    }

    #[test]
    fn leadership_goes_to_the_follower_furthest_along() {
        assert_eq!(best_successor(1, &[(1, 90), (2, 80), (3, 85)]), Some(3));
        assert_eq!(best_successor(1, &[(1, 90), (2, 85), (3, 85)]), Some(2));
        assert_eq!(best_successor(1, &[(1, 90)]), None);
    }

    #[test]
    fn the_log_is_compacted_to_what_every_member_reached_until_the_hard_bounds() {
        let b = LogBounds::from_entries(40_000);
        assert_eq!((b.retained, b.hard_entries), (1_000, 500_000));
        // Small: nothing to do.
        assert_eq!(compaction_point(&b, &at(1 << 20, 100, 0, 100, 100)), None);
        // Over the soft bound: up to what everyone reached, less the margin.
        let p = compaction_point(&b, &at(COMPACT_LOG_BYTES, 50_000, 0, 50_000, 30_000)).unwrap();
        assert_eq!(p.keep_from, 30_000 - b.retained + 1);
        assert!(!p.past_lagging);
        // A member far behind holds it back...
        let far_behind = at(COMPACT_LOG_BYTES, 50_000, 0, 50_000, 10);
        assert_eq!(compaction_point(&b, &far_behind), None);
        // ...until the hard bound: then up to what this node applied.
        let p = compaction_point(&b, &at(HARD_LOG_BYTES, 600_000, 0, 600_000, 10)).unwrap();
        assert_eq!(p.keep_from, 600_000 - b.retained + 1);
        assert!(p.past_lagging);
        // By entries alone too.
        let p = compaction_point(&b, &at(1 << 20, 500_000, 0, 500_000, 10)).unwrap();
        assert!(p.past_lagging);
        // Never behind the existing compaction point.
        let compacted = at(COMPACT_LOG_BYTES, 50_000, 29_500, 50_000, 30_000);
        assert_eq!(compaction_point(&b, &compacted), None);
    }
}

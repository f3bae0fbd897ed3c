//! Deterministic simulation of one replicated shard: N nodes, each with
//! the shard's engine as the group's state machine and a disk that keeps
//! only completed writes (a crash keeps a torn prefix of the one in
//! flight), a network that drops, duplicates, delays and reorders messages
//! and partitions nodes, crashes and restarts, and clients sending
//! CREATE_INSTANCE, APPLY_EVENT and GET_INSTANCE throughout. Everything
//! derives from one seed, so a failing seed replays exactly.
//!
//! The nodes run the same replication core as the server
//! ([`ReplicatedShard`]); the simulation is its host as the shard loop is:
//! it executes drains on the engine, proposes what they staged, writes the
//! committed records to the node's WAL, and gives up on a drain after a
//! commit timeout. A crash loses the WAL's newest records too (they are
//! written after the entry is applied), and a restarted node rebuilds its
//! engine from its WAL, as recovery does, then catches up from the log.
//!
//! Checked on every event: at most one leader per term; every node applies
//! the same entry (term, offsets, records) at each index; offsets grow
//! along every node's applied log. Checked at the end, after the faults
//! stop and the cluster heals: one leader, every node has applied the same
//! log and holds the same instances, every acknowledged drain is in the log
//! at the index and offsets it was acknowledged with, every node's WAL holds
//! the same records at the same offsets, and the clients' history of every
//! instance is linearizable.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use raft::prelude::Message;
use rstmdb_wal::sim::Rng;
use serde_json::{json, Value};

use super::log::{LogState, RaftLog};
use super::replica::{Applied, Persist, Replica, ReplicaConfig};
use super::state::{Install, Outcome, Progress, Record, ReplicatedShard, SnapshotPoint};
use crate::commands::{ApplyEvent, Command, Reply};
use crate::definition::MachineDef;
use crate::engine::{Engine, EngineLimits, Offsets};
use crate::lincheck::{self, Call, InstanceModel, InstanceOp, InstanceRet};
use crate::snapshot::Step;
use crate::wal_entry::WalEntry;

/// Instances the clients work on.
const INSTANCES: u64 = 4;
/// A node compacts its log once it holds more entries than this...
const LOG_BOUND: u64 = 16;
/// ...keeping this many behind its applied index.
const LOG_RETAIN: u64 = 2;

/// The shape and fault rates of one run (times in virtual milliseconds).
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: u64,
    /// How long clients propose and faults strike.
    pub run_ms: u64,
    /// Quiet time after that for the cluster to converge.
    pub heal_ms: u64,
    pub tick_ms: u64,
    /// A message is lost / delivered twice with these probabilities.
    pub drop: f64,
    pub duplicate: f64,
    /// Delivery delay is uniform in `1..=max_delay_ms` (so messages reorder).
    pub max_delay_ms: u64,
    /// A disk write takes `1..=max_write_ms`.
    pub max_write_ms: u64,
    /// Mean time between faults (a crash, or a new partition).
    pub fault_every_ms: u64,
    /// Mean time between client requests.
    pub propose_every_ms: u64,
    /// The longest a node waits for a drain's outcome before it gives up
    /// (rolls it back, tells the client the outcome is unknown); each
    /// drain's timeout is drawn below it.
    pub commit_timeout_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            run_ms: 3_000,
            heal_ms: 3_000,
            tick_ms: 10,
            drop: 0.05,
            duplicate: 0.02,
            max_delay_ms: 8,
            max_write_ms: 4,
            fault_every_ms: 250,
            propose_every_ms: 3,
            commit_timeout_ms: 400,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    /// Drains acknowledged (committed and answered).
    pub acknowledged: u64,
    /// Drains whose index went to another leader's entry (undone; their
    /// callers see an unknown outcome).
    pub lost: u64,
    /// Client calls checked for linearizability.
    pub calls: u64,
    /// Calls sent again with their idempotency key after an unknown
    /// outcome, and taken.
    pub retries: u64,
    /// Calls whose outcome stayed unknown to the end.
    pub unknown: u64,
    /// Reads answered through ReadIndex (no log entry).
    pub reads: u64,
    /// Process pauses.
    pub pauses: u64,
    pub crashes: u64,
    pub partitions: u64,
    /// Highest term reached.
    pub terms: u64,
    /// Entries with data in the final log.
    pub committed: u64,
    /// Drains a node gave up waiting for (commit timeout).
    pub abandoned: u64,
    /// Log compactions, snapshots a leader built, snapshots installed.
    pub compactions: u64,
    pub snapshots: u64,
    pub installs: u64,
    /// WAL records a crash took (replayed from the log afterwards).
    pub wal_lost: u64,
}

impl SimReport {
    /// Adds another run's figures (the highest term is the larger one).
    pub fn add(&mut self, r: &SimReport) {
        let SimReport {
            acknowledged,
            lost,
            calls,
            retries,
            unknown,
            reads,
            pauses,
            crashes,
            partitions,
            terms,
            committed,
            abandoned,
            compactions,
            snapshots,
            installs,
            wal_lost,
        } = r;
        self.acknowledged += acknowledged;
        self.lost += lost;
        self.calls += calls;
        self.retries += retries;
        self.unknown += unknown;
        self.reads += reads;
        self.pauses += pauses;
        self.crashes += crashes;
        self.partitions += partitions;
        self.terms = self.terms.max(*terms);
        self.committed += committed;
        self.abandoned += abandoned;
        self.compactions += compactions;
        self.snapshots += snapshots;
        self.installs += installs;
        self.wal_lost += wal_lost;
    }
}

enum Event {
    Tick {
        node: usize,
        epoch: u64,
    },
    Deliver(Message),
    Written {
        node: usize,
        epoch: u64,
    },
    Propose,
    Fault,
    Restart(usize),
    Heal,
    /// A drain's commit timeout on a node (of an incarnation).
    Timeout {
        node: usize,
        epoch: u64,
        drain: u64,
    },
}

/// A node: its disk survives crashes; the rest is rebuilt on restart.
struct Node {
    disk: LogState,
    /// Bumped by a crash, so events of the old incarnation are ignored.
    epoch: u64,
    shard: Option<ReplicatedShard>,
    /// The engine, rebuilt from `wal` on restart.
    engine: Option<Engine>,
    /// The node's WAL: committed records, in log order. Survives crashes,
    /// but a crash may take its newest records, down to `wal_durable`.
    wal: Vec<Record>,
    /// Records of `wal` made durable (synced before the log was compacted).
    wal_durable: usize,
    /// A snapshot installed from the leader: every record below its offset
    /// (the WAL starts there), as the snapshot file's bytes.
    snap: Option<(u64, Vec<u8>)>,
    /// A snapshot this node (as leader) is building for followers: taken
    /// at its point, offered some steps later (the server writes it a slice
    /// at a time while drains go on), when the log may have moved past it.
    building: Option<(SnapshotPoint, Vec<u8>)>,
    writing: Option<Persist>,
    /// Offset and index of the last entry this incarnation applied.
    last_offset: u64,
    applied_index: u64,
    /// The client call of the drain in flight here, its replies, and its
    /// number (for its timeout).
    pending: Option<(Waiting, Vec<Reply>, u64)>,
    /// Numbers drains.
    drains: u64,
    /// Paused (handles no event) until then.
    paused_until: u64,
}

/// A client call waiting for its answer: its place in the history, and
/// the command (sent again, with its idempotency key, if its outcome
/// becomes unknown).
#[derive(Debug, Clone)]
struct Waiting {
    slot: usize,
    inst: u64,
    cmd: Command,
}

/// Client calls per instance, for the linearizability check.
type History = Vec<Vec<Call<InstanceOp, InstanceRet>>>;

/// The simulated cluster.
pub struct Sim {
    cfg: SimConfig,
    replica_cfg: ReplicaConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<Node>,
    /// Partition side of each node (all 0: connected).
    side: Vec<u8>,
    leaders: HashMap<u64, u64>,
    /// The committed log as first applied anywhere: index → entry.
    log: BTreeMap<u64, Applied>,
    /// Acknowledged drains: index → (term, first offset).
    acked: HashMap<u64, (u64, u64)>,
    history: History,
    /// Calls whose outcome became unknown, to be sent again.
    retries: Vec<Waiting>,
    report: SimReport,
}

/// Runs one seed; `Err` says which invariant broke.
pub fn run(seed: u64, cfg: SimConfig) -> Result<SimReport, String> {
    let mut sim = Sim::new(seed, cfg);
    sim.run()?;
    sim.check_converged()?;
    Ok(sim.report)
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        assert!(cfg.nodes >= 1 && cfg.tick_ms > 0);
        let voters: Vec<u64> = (1..=cfg.nodes).collect();
        let mut sim = Sim {
            replica_cfg: ReplicaConfig::default(),
            rng: Rng::new(seed),
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: Vec::new(),
            side: vec![0; cfg.nodes as usize],
            leaders: HashMap::new(),
            log: BTreeMap::new(),
            acked: HashMap::new(),
            history: vec![Vec::new(); INSTANCES as usize],
            retries: Vec::new(),
            report: SimReport::default(),
            cfg,
        };
        for i in 0..sim.cfg.nodes as usize {
            sim.nodes.push(Node {
                disk: LogState::bootstrap(&voters),
                epoch: 0,
                shard: None,
                engine: None,
                wal: Vec::new(),
                wal_durable: 0,
                snap: None,
                building: None,
                writing: None,
                last_offset: 0,
                applied_index: 0,
                pending: None,
                drains: 0,
                paused_until: 0,
            });
            sim.start(i);
        }
        sim.at(0, Event::Propose);
        sim.at(sim.cfg.fault_every_ms, Event::Fault);
        sim.at(sim.cfg.run_ms, Event::Heal);
        sim
    }

    fn at(&mut self, time: u64, ev: Event) {
        self.seq += 1;
        self.queue.insert((time, self.seq), ev);
    }

    /// Processes events until the end of the quiet time.
    fn run(&mut self) -> Result<(), String> {
        let end = self.cfg.run_ms + self.cfg.heal_ms;
        while let Some(((time, _), ev)) = self.queue.pop_first() {
            if time > end {
                break;
            }
            self.now = time;
            self.handle(ev)?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event) -> Result<(), String> {
        if let Some(n) = self.target(&ev) {
            let until = self.nodes[n].paused_until;
            if until > self.now {
                // A paused process handles nothing; what reached it waits,
                // in a random order, until it runs again.
                let when = until + self.rng.below(5);
                self.at(when, ev);
                return Ok(());
            }
        }
        match ev {
            Event::Tick { node, epoch } => self.tick(node, epoch),
            Event::Deliver(m) => self.deliver(m),
            Event::Written { node, epoch } => self.written(node, epoch),
            Event::Propose => self.propose(),
            Event::Fault => {
                self.fault();
                Ok(())
            }
            Event::Restart(n) => {
                self.start(n);
                Ok(())
            }
            Event::Heal => {
                self.heal();
                Ok(())
            }
            Event::Timeout { node, epoch, drain } => {
                self.timeout(node, epoch, drain);
                Ok(())
            }
        }
    }

    /// The node an event is handled by, if one.
    fn target(&self, ev: &Event) -> Option<usize> {
        match ev {
            Event::Tick { node, .. }
            | Event::Written { node, .. }
            | Event::Timeout { node, .. } => Some(*node),
            Event::Deliver(m) => Some(m.to as usize - 1),
            _ => None,
        }
    }

    /// Starts node `n` from its disk (a fresh start or a restart): its
    /// engine rebuilt from its WAL, as recovery does; the replica hands
    /// over the committed log again, and what the WAL holds is skipped.
    fn start(&mut self, n: usize) {
        if self.nodes[n].shard.is_some() {
            return;
        }
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[n];
        node.epoch += 1;
        let mut e = match &node.snap {
            Some((_, bytes)) => load_image(bytes),
            None => engine(),
        };
        for r in &node.wal {
            let entry: WalEntry = serde_json::from_slice(&r.bytes).expect("a logged entry");
            e.replay(r.offset, entry).expect("the WAL replays");
        }
        for (id, _) in e.unresolved_parts() {
            e.resolve_part(&id, true);
        }
        let wal_next = node
            .wal
            .last()
            .map(|r| r.offset + 1)
            .or(node.snap.as_ref().map(|s| s.0))
            .unwrap_or(1);
        // The compacted entries are in the engine (snapshot and WAL).
        let applied = node.disk.snap_index;
        let log = RaftLog::new(node.disk.clone());
        let replica = Replica::new(n as u64 + 1, log, &self.replica_cfg, applied, seed)
            .expect("a valid replica config");
        node.shard = Some(ReplicatedShard::new(replica, wal_next));
        node.engine = Some(e);
        node.writing = None;
        node.last_offset = 0;
        // The engine holds the log up to its compaction point already.
        node.applied_index = applied;
        node.pending = None;
        let first_tick = self.now + 1 + self.rng.below(self.cfg.tick_ms);
        let epoch = node.epoch;
        self.at(first_tick, Event::Tick { node: n, epoch });
    }

    /// A tick of node `n`'s clock (of its current incarnation).
    fn tick(&mut self, n: usize, epoch: u64) -> Result<(), String> {
        if self.nodes[n].epoch != epoch {
            return Ok(());
        }
        let Some(shard) = self.nodes[n].shard.as_mut() else {
            return Ok(());
        };
        shard.replica_mut().tick();
        self.at(self.now + self.cfg.tick_ms, Event::Tick { node: n, epoch });
        self.drive(n)
    }

    /// A crash: the write in flight keeps a random prefix (entries, then
    /// the hard state), everything not on the disk is gone, and the WAL
    /// may lose its newest records (written after their entry applied).
    fn crash(&mut self, n: usize) {
        let keep = self.rng.next_u64();
        let lose = self.rng.below(8) as usize;
        let node = &mut self.nodes[n];
        if let Some(p) = node.writing.take() {
            let parts =
                p.snapshot.is_some() as usize + p.hard_state.is_some() as usize + p.entries.len();
            let kept = (keep % (parts as u64 + 1)) as usize;
            write_prefix(&mut node.disk, &p, kept);
        }
        let lose = lose.min(node.wal.len() - node.wal_durable);
        node.wal.truncate(node.wal.len() - lose);
        self.report.wal_lost += lose as u64;
        node.shard = None;
        node.engine = None;
        node.building = None;
        node.epoch += 1;
        self.report.crashes += 1;
        if let Some((w, _, _)) = node.pending.take() {
            // The client's connection broke: outcome unknown; it retries.
            self.retries.push(w);
        }
    }

    /// Takes node `n`'s next Ready and carries it out.
    fn drive(&mut self, n: usize) -> Result<(), String> {
        let node = &mut self.nodes[n];
        let (Some(shard), Some(engine)) = (node.shard.as_mut(), node.engine.as_mut()) else {
            return Ok(());
        };
        let progress: Progress = shard
            .ready(engine, false)
            .map_err(|e| format!("node {}: {e}", n + 1))?;
        self.check_leader(n)?;
        self.send(progress.send);
        if let Some(install) = progress.install {
            self.install(n, install);
        }
        self.record_applied(n, progress.applied)?;
        self.write_wal(n, progress.write)?;
        if let Some(outcome) = progress.outcome {
            self.answer(n, outcome);
        }
        self.offer_snapshot(n);
        self.compact_log(n);
        if let Some(p) = progress.persist {
            let done = self.now + 1 + self.rng.below(self.cfg.max_write_ms);
            let epoch = self.nodes[n].epoch;
            self.nodes[n].writing = Some(p);
            self.at(done, Event::Written { node: n, epoch });
        }
        Ok(())
    }

    /// Node `n` replaces its state by the leader's snapshot: the engine,
    /// and a WAL that starts at the snapshot's offset.
    fn install(&mut self, n: usize, install: Install) {
        let node = &mut self.nodes[n];
        node.engine = Some(load_image(&install.state));
        node.wal.clear();
        node.wal_durable = 0;
        node.last_offset = install.offset - 1;
        node.applied_index = node.shard.as_ref().expect("live").replica().applied();
        node.snap = Some((install.offset, install.state));
        self.report.installs += 1;
    }

    /// A leader whose followers need a snapshot builds one of its engine
    /// when no drain is in flight.
    fn offer_snapshot(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let (Some(shard), Some(engine)) = (node.shard.as_mut(), node.engine.as_mut()) else {
            return;
        };
        if let Some((point, image)) = node.building.take() {
            if self.rng.chance(0.5) {
                shard.offer_snapshot(point, &image);
            } else {
                node.building = Some((point, image));
            }
        } else if shard.snapshot_wanted() {
            let point = shard.snapshot_point();
            let image = engine_image(engine, point.offset);
            node.building = Some((point, image));
            self.report.snapshots += 1;
        }
    }

    /// Compacts node `n`'s log, memory and disk, once it holds more than
    /// [`LOG_BOUND`] entries: to [`LOG_RETAIN`] behind the applied index,
    /// whoever lags (a follower behind it then needs a snapshot). The WAL
    /// is made durable first, as the server syncs it.
    fn compact_log(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let Some(shard) = node.shard.as_ref() else {
            return;
        };
        let log = shard.replica().log();
        let (snap_index, last) = log.with_state(|s| (s.snap_index, s.last_index()));
        if last - snap_index <= LOG_BOUND {
            return;
        }
        let keep_from = shard.replica().applied().saturating_sub(LOG_RETAIN) + 1;
        if keep_from <= snap_index + 1 {
            return;
        }
        node.wal_durable = node.wal.len();
        log.with_state(|s| s.compact_to(keep_from));
        node.disk
            .compact_to(keep_from.min(node.disk.last_index() + 1));
        self.report.compactions += 1;
    }

    /// Appends committed records to node `n`'s WAL: offsets must grow.
    fn write_wal(&mut self, n: usize, records: Vec<Record>) -> Result<(), String> {
        let wal = &mut self.nodes[n].wal;
        for r in records {
            if wal.last().is_some_and(|l| l.offset >= r.offset) {
                return Err(format!(
                    "node {} wrote offset {} to its WAL after {}",
                    n + 1,
                    r.offset,
                    wal.last().map_or(0, |l| l.offset)
                ));
            }
            wal.push(r);
        }
        Ok(())
    }

    /// Node `n` gives up on its drain (commit timeout): rolled back, the
    /// client told the outcome is unknown.
    fn timeout(&mut self, n: usize, epoch: u64, drain: u64) {
        let node = &mut self.nodes[n];
        if node.epoch != epoch || node.pending.as_ref().is_none_or(|p| p.2 != drain) {
            return;
        }
        let (w, _, _) = node.pending.take().expect("checked");
        if let (Some(shard), Some(engine)) = (node.shard.as_mut(), node.engine.as_mut()) {
            engine.rollback();
            shard.abandon();
        }
        self.report.abandoned += 1;
        self.retries.push(w);
    }

    /// Node `n`'s write finished: it is on the disk, and the messages
    /// that waited for it go out.
    fn written(&mut self, n: usize, epoch: u64) -> Result<(), String> {
        let node = &mut self.nodes[n];
        if node.epoch != epoch {
            return Ok(());
        }
        let p = node.writing.take().expect("a write in flight");
        let parts =
            p.snapshot.is_some() as usize + p.hard_state.is_some() as usize + p.entries.len();
        write_prefix(&mut node.disk, &p, parts);
        let held = node
            .shard
            .as_mut()
            .expect("a live node")
            .persisted(p.number);
        self.send(held);
        self.drive(n)
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if self.rng.chance(self.cfg.drop) {
                continue;
            }
            let copies = 1 + self.rng.chance(self.cfg.duplicate) as usize;
            for _ in 0..copies {
                let when = self.now + 1 + self.rng.below(self.cfg.max_delay_ms);
                self.at(when, Event::Deliver(m.clone()));
            }
        }
    }

    /// Delivers `m` unless a partition separates its ends or its
    /// receiver is down.
    fn deliver(&mut self, m: Message) -> Result<(), String> {
        let (from, to) = (m.from as usize - 1, m.to as usize - 1);
        if self.side[from] != self.side[to] {
            return Ok(());
        }
        let Some(shard) = self.nodes[to].shard.as_mut() else {
            return Ok(());
        };
        shard.replica_mut().step(m);
        self.drive(to)
    }

    /// A client sends one request to a random node: a new call, or one
    /// whose outcome became unknown sent again with the same idempotency
    /// key (still one call in the history, from its first invocation).
    /// Only a leader whose state is current takes it (the server forwards
    /// to the leader; here the client just tries again later). Retries go
    /// on after the faults stop, until every call has its answer.
    fn propose(&mut self) -> Result<(), String> {
        let clients_on = self.now < self.cfg.run_ms;
        let end = self.cfg.run_ms + self.cfg.heal_ms;
        if clients_on || (!self.retries.is_empty() && self.now + 100 < end) {
            let next = self.now + 1 + self.rng.below(2 * self.cfg.propose_every_ms);
            self.at(next, Event::Propose);
        }
        let n = self.rng.below(self.cfg.nodes) as usize;
        let retry = !self.retries.is_empty() && (!clients_on || self.rng.chance(0.3));
        let (w, op) = if retry {
            let i = self.rng.below(self.retries.len() as u64) as usize;
            (self.retries.swap_remove(i), None)
        } else if clients_on {
            let (w, op) = self.new_call();
            (w, Some(op))
        } else {
            return Ok(());
        };
        let paused = self.nodes[n].paused_until > self.now;
        let replies = if paused {
            None
        } else {
            self.execute(n, &w.cmd)
        };
        let Some(replies) = replies else {
            // Refused at once (not the leader): the call did nothing. A
            // new one is forgotten, a retry waits for another try.
            if retry {
                self.retries.push(w);
            }
            return Ok(());
        };
        if let Some(op) = op {
            let calls = &mut self.history[w.inst as usize];
            debug_assert_eq!(calls.len(), w.slot);
            calls.push(Call {
                op,
                invoked: self.now,
                returned: None,
            });
        }
        self.report.retries += retry as u64;
        let node = &mut self.nodes[n];
        node.drains += 1;
        let (drain, epoch) = (node.drains, node.epoch);
        node.pending = Some((w, replies, drain));
        // Drawn per drain, from a few ms (a leader that gives up while it
        // still leads) to the configured bound.
        let at = self.now + 5 + self.rng.below(self.cfg.commit_timeout_ms);
        self.at(
            at,
            Event::Timeout {
                node: n,
                epoch,
                drain,
            },
        );
        self.drive(n)
    }

    /// Node `n` runs `cmd` as a drain, as the shard loop does: executed on
    /// the engine, then proposed (what it staged) or confirmed (a read, or
    /// a write that changed nothing). `None` when the node cannot serve.
    fn execute(&mut self, n: usize, cmd: &Command) -> Option<Vec<Reply>> {
        let node = &mut self.nodes[n];
        let (shard, engine) = (node.shard.as_mut()?, node.engine.as_mut()?);
        if shard.refusal().is_some() {
            return None;
        }
        let base = shard.next_offset();
        let mut offsets = Offsets::new(base, base + 1);
        let reply = engine.execute(cmd.clone(), &mut offsets, self.now as i64);
        let staged = engine.take_staged();
        let taken = if staged.is_empty() {
            shard.confirm_reads()
        } else {
            shard.propose(staged, base..base + 1).map(|_| ())
        };
        match taken {
            Ok(()) => Some(vec![reply]),
            Err(e) => panic!("a node that can serve refused a drain: {e}"),
        }
    }

    /// A new client call on a random instance (entered in its history once
    /// a node takes it).
    fn new_call(&mut self) -> (Waiting, InstanceOp) {
        let inst = self.rng.below(INSTANCES);
        let slot = self.history[inst as usize].len();
        let key = format!("i{inst}-c{slot}");
        let (op, cmd) = random_call(&mut self.rng, inst, key);
        (Waiting { slot, inst, cmd }, op)
    }

    /// Records the entries node `n` applied, checking them against the log
    /// every other node applied.
    fn record_applied(&mut self, n: usize, entries: Vec<Applied>) -> Result<(), String> {
        for a in entries {
            let node = &mut self.nodes[n];
            node.applied_index = a.index;
            if a.offsets > 0 {
                if a.offset <= node.last_offset {
                    return Err(format!(
                        "node {} applied offset {} at index {} after offset {}",
                        n + 1,
                        a.offset,
                        a.index,
                        node.last_offset
                    ));
                }
                node.last_offset = a.offset + u64::from(a.offsets) - 1;
            }
            match self.log.get(&a.index) {
                Some(first) if *first != a => {
                    return Err(format!(
                        "index {} applied differently on node {}: {first:?} and {a:?}",
                        a.index,
                        n + 1
                    ))
                }
                Some(_) => {}
                None => {
                    self.log.insert(a.index, a);
                }
            }
        }
        Ok(())
    }

    /// The outcome of node `n`'s drain: the client's answer, or a retry
    /// (lost, or reads no longer confirmable).
    fn answer(&mut self, n: usize, outcome: Outcome) {
        let node = &mut self.nodes[n];
        let Some((w, replies, _)) = node.pending.take() else {
            // An abandoned drain's outcome: nobody waits for it.
            return;
        };
        match outcome {
            Outcome::Committed(p) => {
                node.engine.as_mut().expect("live").commit_done();
                self.report.acknowledged += 1;
                self.acked.insert(p.index, (p.term, p.offset));
            }
            Outcome::ReadConfirmed => self.report.reads += 1,
            Outcome::Lost(_) | Outcome::ReadLost => {
                self.report.lost += matches!(outcome, Outcome::Lost(_)) as u64;
                self.retries.push(w);
                return;
            }
        }
        let ret = instance_ret(&replies[0]);
        self.history[w.inst as usize][w.slot].returned = Some((self.now, ret));
    }

    /// A crash (restarted later) or a new partition.
    fn fault(&mut self) {
        if self.now >= self.cfg.run_ms {
            return;
        }
        let next = self.now + 1 + self.rng.below(2 * self.cfg.fault_every_ms);
        self.at(next, Event::Fault);
        let roll = self.rng.below(10);
        if roll < 2 {
            // A process pause (a stalled VM, a stopped process): it wakes
            // up still believing what it believed, a leader included.
            let n = self.rng.below(self.cfg.nodes) as usize;
            self.nodes[n].paused_until = self.now + 100 + self.rng.below(600);
            self.report.pauses += 1;
        } else if roll < 6 {
            let n = self.rng.below(self.cfg.nodes) as usize;
            if self.nodes[n].shard.is_some() {
                self.crash(n);
                let back = self.now + 20 + self.rng.below(400);
                self.at(back.min(self.cfg.run_ms), Event::Restart(n));
            }
        } else {
            for s in self.side.iter_mut() {
                *s = 0;
            }
            if self.rng.chance(0.7) {
                for i in 0..self.side.len() {
                    self.side[i] = self.rng.below(2) as u8;
                }
                self.report.partitions += 1;
            }
        }
    }

    /// The faults stop: partitions heal and every node comes back.
    fn heal(&mut self) {
        for s in self.side.iter_mut() {
            *s = 0;
        }
        for n in 0..self.nodes.len() {
            self.start(n);
        }
    }

    fn check_leader(&mut self, n: usize) -> Result<(), String> {
        let Some(r) = self.nodes[n].shard.as_ref().map(ReplicatedShard::replica) else {
            return Ok(());
        };
        let (term, _, _) = r.role();
        self.report.terms = self.report.terms.max(term);
        if !r.is_leader() {
            return Ok(());
        }
        let id = r.id();
        match self.leaders.insert(term, id) {
            Some(other) if other != id => {
                Err(format!("two leaders in term {term}: {other} and {id}"))
            }
            _ => Ok(()),
        }
    }

    /// After the quiet time: one leader, the same applied log and the same
    /// instances everywhere, every acknowledged drain in the log, and every
    /// instance's history linearizable.
    fn check_converged(&mut self) -> Result<(), String> {
        let leaders = self
            .nodes
            .iter()
            .filter(|n| n.shard.as_ref().is_some_and(|s| s.replica().is_leader()))
            .count();
        if leaders != 1 {
            return Err(format!("{leaders} leaders after healing"));
        }
        let applied: Vec<u64> = self.nodes.iter().map(|n| n.applied_index).collect();
        if applied.iter().any(|&a| a != applied[0]) {
            return Err(format!("nodes applied different prefixes: {applied:?}"));
        }
        let states: Vec<String> = self
            .nodes
            .iter_mut()
            .map(|n| visible(n.engine.as_mut().expect("healed")))
            .collect();
        if let Some(i) = states.iter().position(|s| *s != states[0]) {
            return Err(format!(
                "node {} holds other instances than node 1:\n{}\n{}",
                i + 1,
                states[i],
                states[0]
            ));
        }
        // Above every node's floor (a node that installed a snapshot keeps
        // no record below it), the WALs are the same.
        let floor = self
            .nodes
            .iter()
            .filter_map(|n| n.snap.as_ref().map(|s| s.0))
            .max()
            .unwrap_or(0);
        let above = |n: &Node| -> Vec<Record> {
            n.wal
                .iter()
                .filter(|r| r.offset >= floor)
                .cloned()
                .collect()
        };
        let first = above(&self.nodes[0]);
        if let Some(i) = self.nodes.iter().position(|n| above(n) != first) {
            return Err(format!(
                "node {}'s WAL differs from node 1's above offset {floor} ({} and {} records)",
                i + 1,
                above(&self.nodes[i]).len(),
                first.len()
            ));
        }
        for (index, (term, offset)) in &self.acked {
            match self.log.get(index) {
                Some(a) if a.term == *term && a.offset == *offset => {}
                other => {
                    return Err(format!(
                        "acknowledged a drain at {index} (term {term}, offset {offset}) but the log has {other:?}"
                    ))
                }
            }
        }
        self.check_linearizable()?;
        self.report.committed = self.log.values().filter(|a| a.offsets > 0).count() as u64;
        Ok(())
    }

    fn check_linearizable(&mut self) -> Result<(), String> {
        let model = InstanceModel {
            state: None,
            transitions: Rc::new(
                TRANSITIONS
                    .iter()
                    .map(|(a, e, b)| (a.to_string(), e.to_string(), b.to_string()))
                    .collect(),
            ),
        };
        for (i, calls) in self.history.iter().enumerate() {
            self.report.calls += calls.len() as u64;
            self.report.unknown += calls.iter().filter(|c| c.returned.is_none()).count() as u64;
            lincheck::check(&model, calls).map_err(|e| format!("instance i{i}: {e}"))?;
        }
        Ok(())
    }
}

/// The machine every node knows: `(from, event, to)`, no guards.
const TRANSITIONS: [(&str, &str, &str); 4] = [
    ("a", "GO", "b"),
    ("a", "NEXT", "c"),
    ("b", "NEXT", "c"),
    ("c", "BACK", "a"),
];

/// The engine's limits on every node.
fn limits() -> EngineLimits {
    EngineLimits {
        // Larger than any run's keyed calls: a retry must find its key.
        idempotency_entries: 1 << 20,
        idempotency_max_age_ms: 0,
    }
}

/// `engine` as a snapshot file's bytes (the server's own format, written
/// to a simulated disk), covering every record below `offset`.
fn engine_image(engine: &mut Engine, offset: u64) -> Vec<u8> {
    let disk = rstmdb_wal::sim::SimDisk::new(0);
    let dir = std::path::PathBuf::from("/snap");
    rstmdb_wal::storage::Storage::create_dir_all(&disk, &dir).expect("a simulated directory");
    let mut job =
        crate::snapshot::SnapshotJob::begin_on(disk.clone(), engine, dir, 0, offset, 0, 0);
    loop {
        match job.step(engine, std::time::Duration::from_secs(1)) {
            Step::More => {}
            Step::Blocked => std::thread::sleep(std::time::Duration::from_micros(100)),
            Step::Finished(done) => {
                let file = done
                    .recv()
                    .expect("the snapshot writer answers")
                    .expect("a simulated disk without faults");
                return rstmdb_wal::storage::Storage::read(&disk, &file.path)
                    .expect("the file just written");
            }
            Step::Abandoned(why) => panic!("snapshot abandoned: {why}"),
        }
    }
}

/// An engine loaded from [`engine_image`]'s bytes.
fn load_image(bytes: &[u8]) -> Engine {
    let disk = rstmdb_wal::sim::SimDisk::new(0);
    let path = std::path::Path::new("/image/snapshot");
    rstmdb_wal::storage::Storage::create_dir_all(&disk, std::path::Path::new("/image"))
        .expect("a simulated directory");
    rstmdb_wal::storage::Storage::create_file(&disk, path).expect("a simulated file");
    rstmdb_wal::storage::Storage::write_at(&disk, path, 0, bytes).expect("a simulated write");
    crate::snapshot::load_on(&disk, path, 0, &limits())
        .expect("a snapshot the leader built")
        .engine
}

/// A fresh engine that knows the machine (as after its PUT_MACHINE).
fn engine() -> Engine {
    let mut e = Engine::new(&limits());
    let transitions: Vec<Value> = TRANSITIONS
        .iter()
        .map(|(a, ev, b)| json!({"from": a, "event": ev, "to": b}))
        .collect();
    let def = json!({"states": ["a", "b", "c"], "initial": "a", "transitions": transitions});
    let parsed = MachineDef::from_json(&def).expect("a valid machine");
    e.adopt_machine("m".into(), 1, Arc::new(parsed));
    e
}

/// A random call on instance `inst`: the model's view and the command.
fn random_call(rng: &mut Rng, inst: u64, key: String) -> (InstanceOp, Command) {
    let id = format!("i{inst}");
    match rng.below(10) {
        0..=1 => (
            InstanceOp::Create {
                initial: "a".into(),
            },
            Command::CreateInstance {
                instance_id: id,
                machine: "m".into(),
                version: 1,
                initial_ctx: json!({}),
                idempotency_key: Some(key),
                allow_recreate: false,
            },
        ),
        2..=3 => (InstanceOp::Get, Command::GetInstance { instance_id: id }),
        _ => {
            let event = ["GO", "NEXT", "BACK"][rng.below(3) as usize].to_string();
            (
                InstanceOp::Apply {
                    event: event.clone(),
                },
                Command::ApplyEvent(ApplyEvent {
                    instance_id: id,
                    event,
                    payload: Value::Null,
                    expected_state: None,
                    expected_wal_offset: None,
                    event_id: None,
                    idempotency_key: Some(key),
                }),
            )
        }
    }
}

/// What a reply says in the model's terms: the state, or the error code.
fn instance_ret(reply: &Reply) -> InstanceRet {
    match reply {
        Reply::Json(j) => {
            let v: Value = serde_json::from_slice(j).expect("a JSON result");
            let state = v.get("to_state").or_else(|| v.get("state"));
            InstanceRet::State(state.and_then(Value::as_str).expect("a state").to_string())
        }
        Reply::Error(e) => InstanceRet::Error(e.code.as_str().to_string()),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// What a client can read of the shard: every instance.
fn visible(engine: &mut Engine) -> String {
    let mut out = String::new();
    let mut o = Offsets::new(1, 1);
    for i in 0..INSTANCES {
        let r = engine.execute(
            Command::GetInstance {
                instance_id: format!("i{i}"),
            },
            &mut o,
            0,
        );
        out += &format!("{:?}\n", instance_ret(&r));
    }
    out
}

/// Puts the first `parts` parts of `p` (the entries, then the hard state)
/// on the disk.
fn write_prefix(disk: &mut LogState, p: &Persist, parts: usize) {
    // A snapshot's point comes first in the write (`RaftStore` frames it
    // before the entries).
    if let Some(meta) = &p.snapshot {
        if parts == 0 {
            return;
        }
        let mut meta = meta.clone();
        meta.set_conf_state(disk.conf_state.clone());
        disk.install(&meta);
    }
    let parts = parts.saturating_sub(p.snapshot.is_some() as usize);
    let n = parts.min(p.entries.len());
    disk.append(&p.entries[..n]);
    if let Some(hs) = &p.hard_state {
        if parts > p.entries.len() {
            disk.hard_state = hs.clone();
        }
    }
}

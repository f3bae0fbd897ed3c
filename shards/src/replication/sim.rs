//! Deterministic simulation of one replicated group: N nodes, each with a
//! disk that keeps only completed writes (a crash keeps a torn prefix of
//! the one in flight), a network that drops, duplicates, delays and
//! reorders messages and partitions nodes, crashes and restarts, and
//! clients proposing throughout. Everything derives from one seed, so a
//! failing seed replays exactly.
//!
//! Checked on every event: at most one leader per term; every node applies
//! the same entry (term, offset, payload) at each index; offsets grow along
//! every node's applied log. Checked at the end, after the faults stop and
//! the cluster heals: one leader, every node has applied the same log, and
//! every acknowledged proposal is in it at the index and offset it was
//! acknowledged with.

use std::collections::{BTreeMap, HashMap};

use raft::prelude::Message;
use rstmdb_wal::sim::Rng;

use super::log::{LogState, RaftLog};
use super::replica::{Applied, Output, Persist, Proposed, Replica, ReplicaConfig};

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
    /// Mean time between client proposals.
    pub propose_every_ms: u64,
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
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub acknowledged: u64,
    /// Proposals whose index went to another leader's entry.
    pub lost: u64,
    pub crashes: u64,
    pub partitions: u64,
    /// Highest term reached.
    pub terms: u64,
    /// Entries with data in the final log.
    pub committed: u64,
}

enum Event {
    Tick { node: usize, epoch: u64 },
    Deliver(Message),
    Written { node: usize, epoch: u64 },
    Propose,
    Fault,
    Restart(usize),
    Heal,
}

/// A node: its disk survives crashes; the rest is rebuilt on restart.
struct Node {
    disk: LogState,
    /// Bumped by a crash, so events of the old incarnation are ignored.
    epoch: u64,
    replica: Option<Replica>,
    writing: Option<Persist>,
    /// Offset and index of the last entry this incarnation applied.
    last_offset: u64,
    applied_index: u64,
    /// Own proposals not yet resolved: (proposal, payload).
    pending: Vec<(Proposed, Vec<u8>)>,
}

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
    /// Acknowledged proposals: payload → (index, offset).
    acked: HashMap<Vec<u8>, (u64, u64)>,
    next_op: u64,
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
            next_op: 0,
            report: SimReport::default(),
            cfg,
        };
        for i in 0..sim.cfg.nodes as usize {
            sim.nodes.push(Node {
                disk: LogState::bootstrap(&voters),
                epoch: 0,
                replica: None,
                writing: None,
                last_offset: 0,
                applied_index: 0,
                pending: Vec::new(),
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
        }
    }

    /// Starts node `n` from its disk (a fresh start or a restart): the
    /// replica replays the committed log into the state machine.
    fn start(&mut self, n: usize) {
        if self.nodes[n].replica.is_some() {
            return;
        }
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[n];
        node.epoch += 1;
        let log = RaftLog::new(node.disk.clone());
        let replica = Replica::new(n as u64 + 1, log, &self.replica_cfg, 0, seed)
            .expect("a valid replica config");
        node.replica = Some(replica);
        node.writing = None;
        node.last_offset = 0;
        node.applied_index = 0;
        node.pending.clear();
        let first_tick = self.now + 1 + self.rng.below(self.cfg.tick_ms);
        let epoch = node.epoch;
        self.at(first_tick, Event::Tick { node: n, epoch });
    }

    /// A tick of node `n`'s clock (of its current incarnation).
    fn tick(&mut self, n: usize, epoch: u64) -> Result<(), String> {
        if self.nodes[n].epoch != epoch {
            return Ok(());
        }
        let Some(r) = self.nodes[n].replica.as_mut() else {
            return Ok(());
        };
        r.tick();
        self.at(self.now + self.cfg.tick_ms, Event::Tick { node: n, epoch });
        self.drive(n)
    }

    /// A crash: the write in flight keeps a random prefix (entries, then
    /// the hard state), everything not on the disk is gone.
    fn crash(&mut self, n: usize) {
        let keep = self.rng.next_u64();
        let node = &mut self.nodes[n];
        if let Some(p) = node.writing.take() {
            let parts = p.hard_state.is_some() as usize + p.entries.len();
            let kept = (keep % (parts as u64 + 1)) as usize;
            write_prefix(&mut node.disk, &p, kept);
        }
        node.replica = None;
        node.pending.clear();
        node.epoch += 1;
        self.report.crashes += 1;
    }

    /// Takes node `n`'s next Ready and carries it out.
    fn drive(&mut self, n: usize) -> Result<(), String> {
        let Some(r) = self.nodes[n].replica.as_mut() else {
            return Ok(());
        };
        let out: Output = r.ready();
        self.check_leader(n)?;
        self.send(out.send);
        self.apply(n, out.apply, out.applied_to)?;
        if let Some(p) = out.persist {
            let done = self.now + 1 + self.rng.below(self.cfg.max_write_ms);
            let epoch = self.nodes[n].epoch;
            self.nodes[n].writing = Some(p);
            self.at(done, Event::Written { node: n, epoch });
        }
        Ok(())
    }

    /// Node `n`'s write finished: it is on the disk, and the messages
    /// that waited for it go out.
    fn written(&mut self, n: usize, epoch: u64) -> Result<(), String> {
        let node = &mut self.nodes[n];
        if node.epoch != epoch {
            return Ok(());
        }
        let p = node.writing.take().expect("a write in flight");
        let parts = p.hard_state.is_some() as usize + p.entries.len();
        write_prefix(&mut node.disk, &p, parts);
        let held = node
            .replica
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
        let Some(r) = self.nodes[to].replica.as_mut() else {
            return Ok(());
        };
        r.step(m);
        self.drive(to)
    }

    /// A client proposes to a random node; only a leader takes it (the
    /// server forwards to the leader; here the client just tries again).
    fn propose(&mut self) -> Result<(), String> {
        if self.now < self.cfg.run_ms {
            let next = self.now + 1 + self.rng.below(2 * self.cfg.propose_every_ms);
            self.at(next, Event::Propose);
        }
        let n = self.rng.below(self.cfg.nodes) as usize;
        let Some(r) = self.nodes[n].replica.as_mut() else {
            return Ok(());
        };
        self.next_op += 1;
        let payload = format!("op-{}", self.next_op).into_bytes();
        if let Ok(p) = r.propose(&payload) {
            self.nodes[n].pending.push((p, payload));
        }
        self.drive(n)
    }

    /// Applies committed entries on node `n`, checking them against the
    /// log every other node applied, and resolves its proposals.
    fn apply(&mut self, n: usize, entries: Vec<Applied>, to: Option<u64>) -> Result<(), String> {
        for a in entries {
            let node = &mut self.nodes[n];
            if a.offset <= node.last_offset {
                return Err(format!(
                    "node {} applied offset {} at index {} after offset {}",
                    n + 1,
                    a.offset,
                    a.index,
                    node.last_offset
                ));
            }
            node.last_offset = a.offset;
            match self.log.get(&a.index) {
                Some(first) if *first != a => {
                    return Err(format!(
                        "index {} applied differently: {first:?} and {a:?} on node {}",
                        a.index,
                        n + 1
                    ))
                }
                Some(_) => {}
                None => {
                    self.log.insert(a.index, a.clone());
                }
            }
        }
        if let Some(to) = to {
            self.nodes[n].applied_index = to;
            self.resolve(n, to);
        }
        Ok(())
    }

    /// Proposals of node `n` at or below `to` are decided: acknowledged if
    /// the applied entry there is theirs, lost otherwise.
    fn resolve(&mut self, n: usize, to: u64) {
        let pending = std::mem::take(&mut self.nodes[n].pending);
        for (p, payload) in pending {
            if p.index > to {
                self.nodes[n].pending.push((p, payload));
                continue;
            }
            match self.log.get(&p.index) {
                Some(a) if a.term == p.term && a.payload == payload => {
                    assert_eq!(a.offset, p.offset);
                    self.acked.insert(payload, (p.index, p.offset));
                    self.report.acknowledged += 1;
                }
                _ => self.report.lost += 1,
            }
        }
    }

    /// A crash (restarted later) or a new partition.
    fn fault(&mut self) {
        if self.now >= self.cfg.run_ms {
            return;
        }
        let next = self.now + 1 + self.rng.below(2 * self.cfg.fault_every_ms);
        self.at(next, Event::Fault);
        if self.rng.chance(0.5) {
            let n = self.rng.below(self.cfg.nodes) as usize;
            if self.nodes[n].replica.is_some() {
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
        let Some(r) = self.nodes[n].replica.as_ref() else {
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

    /// After the quiet time: one leader, the same applied log everywhere,
    /// every acknowledged proposal in it.
    fn check_converged(&mut self) -> Result<(), String> {
        let leaders = self
            .nodes
            .iter()
            .filter(|n| n.replica.as_ref().is_some_and(Replica::is_leader))
            .count();
        if leaders != 1 {
            return Err(format!("{leaders} leaders after healing"));
        }
        let applied: Vec<u64> = self.nodes.iter().map(|n| n.applied_index).collect();
        if applied.iter().any(|&a| a != applied[0]) {
            return Err(format!("nodes applied different prefixes: {applied:?}"));
        }
        for (payload, (index, offset)) in &self.acked {
            match self.log.get(index) {
                Some(a) if a.payload == *payload && a.offset == *offset => {}
                other => {
                    return Err(format!(
                        "acknowledged {} at {index} (offset {offset}) but the log has {other:?}",
                        String::from_utf8_lossy(payload)
                    ))
                }
            }
        }
        let offsets: Vec<u64> = self.log.values().map(|a| a.offset).collect();
        if offsets.windows(2).any(|w| w[1] <= w[0]) {
            return Err("offsets do not grow along the committed log".into());
        }
        self.report.committed = self.log.len() as u64;
        Ok(())
    }
}

/// Puts the first `parts` parts of `p` (the entries, then the hard state)
/// on the disk.
fn write_prefix(disk: &mut LogState, p: &Persist, parts: usize) {
    let n = parts.min(p.entries.len());
    disk.append(&p.entries[..n]);
    if let Some(hs) = &p.hard_state {
        if parts > p.entries.len() {
            disk.hard_state = hs.clone();
        }
    }
}

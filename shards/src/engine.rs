//! The state of one shard and the semantics of every operation on it
//! (SEMANTICS.md §2–§8, §13 with the DECISIONS). Pure and synchronous: no
//! I/O here. Executing a write stages a WAL entry and records how to undo
//! it; the shard loop commits the entries and, if the commit fails, rolls
//! the state back with the undo log.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use serde::Serialize;
use serde_json::Value;

use crate::commands::{ApplyEvent, Command, InstanceSummary, Reply, WatchEvent};
use crate::ctx::Ctx;
use crate::definition::{MachineDef, Transition};
use crate::error::{ApiError, ErrorCode};
use crate::idempotency::{Cached, IdempotencyWindow, InsertUndo};
use crate::wal_entry::{BatchEntry, WalEntry};

/// One instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Machine name (interned: shared by every instance of the shard).
    pub machine: Arc<str>,
    /// Machine version.
    pub version: u32,
    /// Current state (interned).
    pub state: Arc<str>,
    /// Context (an object for every instance created by this server).
    pub ctx: Ctx,
    /// `event_id` of the latest apply, if it had one.
    pub last_event_id: Option<String>,
    /// Offset of the latest record (create, apply or delete).
    pub last_wal_offset: u64,
    /// Offset of the create record: identifies this incarnation of the id
    /// (idempotency entries of a deleted predecessor must not match).
    pub created_offset: u64,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Soft-deleted.
    pub deleted: bool,
}

/// Machine versions by name.
pub(crate) type Machines = HashMap<String, BTreeMap<u32, Arc<MachineDef>>>;

/// Instances by id. An `IndexMap` so that a snapshot can walk it by
/// position across many turns of the shard loop: positions below the
/// length at the snapshot's start never move while it runs (only entries
/// created after it are ever removed, and they sit above that length).
pub(crate) type Instances = indexmap::IndexMap<String, Instance, hashbrown::DefaultHashBuilder>;

/// A point-in-time snapshot being written in chunks (see `snapshot`):
/// positions `[next, end)` are still to be serialized, and `shadow` keeps
/// the snapshot-time value of each of them changed since it started.
#[derive(Debug, Default)]
pub(crate) struct SnapCursor {
    pub(crate) next: usize,
    pub(crate) end: usize,
    pub(crate) shadow: HashMap<usize, Instance>,
    /// Why the snapshot can no longer be point-in-time (FLUSH_ALL, an
    /// entry below `end` removed): it must be abandoned.
    pub(crate) broken: Option<&'static str>,
}

/// Everything a FLUSH_ALL removed, kept until its commit is durable.
type Saved = (Machines, Instances, IdempotencyWindow);

/// How to reverse one staged change.
#[derive(Debug)]
enum Undo {
    /// Restore the instance's previous value (None: it did not exist).
    Instance(String, Option<Instance>),
    /// Remove a machine version stored in this drain.
    Machine(String, u32),
    /// Restore everything a FLUSH_ALL removed.
    Flush(Box<Saved>),
    /// Reverse an idempotency insert (what it replaced and evicted).
    Idempotency(String, String, InsertUndo),
}

/// A WAL record staged by an operation.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Record offset.
    pub offset: u64,
    /// Record kind byte.
    pub kind: u8,
    /// Serialized entry.
    pub bytes: Vec<u8>,
}

/// Offsets reserved from the global sequencer for one drain.
#[derive(Debug)]
pub struct Offsets {
    next: u64,
    end: u64,
}

impl Offsets {
    /// The range `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        assert!(start >= 1 && start <= end);
        Offsets { next: start, end }
    }

    /// The offsets not handed out yet.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.next..self.end
    }

    fn take(&mut self) -> u64 {
        assert!(
            self.next < self.end,
            "more WAL records than reserved offsets"
        );
        let o = self.next;
        self.next += 1;
        o
    }
}

/// Limits that shape engine behaviour.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Idempotency window: entries per shard.
    pub idempotency_entries: usize,
    /// Idempotency window: max age in ms (0 = none).
    pub idempotency_max_age_ms: i64,
}

/// Everything one shard owns in memory.
pub struct Engine {
    pub(crate) machines: Machines,
    /// Machine and state names, interned: every instance shares one copy
    /// of each (bounded by the definitions ever stored).
    names: HashSet<Arc<str>>,
    pub(crate) instances: Instances,
    pub(crate) idempotency: IdempotencyWindow,
    /// Set while a snapshot walks `instances` (see [`SnapCursor`]).
    pub(crate) snap: Option<SnapCursor>,
    undo: Vec<Undo>,
    staged: Vec<Staged>,
    /// Whether applies produce [`WatchEvent`]s (someone is watching).
    pub collect_events: bool,
    events: Vec<WatchEvent>,
    /// While executing an atomic-batch part for real: its entries, which
    /// go to the WAL as one `batch_part` record.
    capture: Option<Vec<BatchEntry>>,
    /// Replayed batch parts awaiting resolution: participants and undo.
    replay_parts: HashMap<String, (Vec<u32>, Vec<Undo>)>,
    /// Size of the entry staged last (for event accounting).
    last_entry_size: usize,
    /// Highest offset replayed, counting the offsets of batch entries
    /// (a batch part's record carries its first entry's offset).
    pub(crate) max_offset: u64,
    /// Batches undone by a logged `batch_abort` (their parts stay in the
    /// log; subscribers replaying the log skip them).
    pub(crate) aborted: HashSet<String>,
    /// Atomic batches committed with a part on this shard, each with the
    /// global offset reached when it was released here (above every
    /// participant's part). Kept in snapshots: a participant that replays
    /// its part from the WAL after a restart finds the batch committed here
    /// even though this shard's part is inside its snapshot. Pruned once
    /// every shard's oldest snapshot starts above that offset.
    pub(crate) committed: Vec<(String, u64)>,
}

/// A position in the engine's logs (see [`Engine::mark`]).
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    undo: usize,
    staged: usize,
    events: usize,
}

/// Undo entries taken out of the drain's log (a committed batch part that
/// may still have to be undone).
#[derive(Debug, Default)]
pub struct UndoLog(Vec<Undo>);

/// Largest WAL entry an operation may produce: 16 MiB − 64 KiB (the
/// reference's record limit). Smaller than a frame, so every answer that
/// carries a context (APPLY_EVENT, GET_INSTANCE) still fits one: a change
/// whose answer could not be sent is refused before it is made.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn json<T: Serialize>(v: &T) -> Reply {
    Reply::Json(serde_json::to_vec(v).expect("result serialization cannot fail"))
}

/// The reply to create_instance, fresh or replayed from the idempotency cache.
fn create_reply(instance_id: &str, state: &str, wal_offset: u64) -> Reply {
    #[derive(Serialize)]
    struct R<'a> {
        instance_id: &'a str,
        state: &'a str,
        wal_offset: u64,
    }
    json(&R {
        instance_id,
        state,
        wal_offset,
    })
}

fn instance_not_found(id: &str) -> ApiError {
    ApiError::core(
        ErrorCode::InstanceNotFound,
        format!("instance not found: {id}"),
    )
}

fn machine_not_found(m: &str, v: u32) -> ApiError {
    ApiError::core(
        ErrorCode::MachineNotFound,
        format!("machine version not found: {m} v{v}"),
    )
}

impl Engine {
    /// An empty shard.
    pub fn new(limits: &EngineLimits) -> Self {
        Engine {
            machines: HashMap::new(),
            names: HashSet::new(),
            instances: Instances::default(),
            snap: None,
            idempotency: IdempotencyWindow::new(
                limits.idempotency_entries,
                limits.idempotency_max_age_ms,
            ),
            undo: Vec::new(),
            staged: Vec::new(),
            collect_events: false,
            events: Vec::new(),
            capture: None,
            replay_parts: HashMap::new(),
            last_entry_size: 0,
            max_offset: 0,
            aborted: HashSet::new(),
            committed: Vec::new(),
        }
    }

    /// Records that atomic batch `batch_id` committed (see `committed`);
    /// `at` is the global next offset now.
    pub fn note_committed(&mut self, batch_id: String, at: u64) {
        debug_assert!(self.committed.last().is_none_or(|(_, v)| *v <= at));
        self.committed.push((batch_id, at));
    }

    /// Forgets committed batches released below `upto`: every shard's
    /// every snapshot holds their parts.
    pub fn prune_committed(&mut self, upto: u64) {
        self.committed.retain(|(_, at)| *at > upto);
    }

    /// Whether this shard knows `batch_id` as committed.
    pub fn knows_committed(&self, batch_id: &str) -> bool {
        self.committed.iter().any(|(id, _)| id == batch_id)
    }

    /// Keeps the snapshot-time value of `id` before it changes, if a
    /// running snapshot has not serialized it yet.
    fn preserve(&mut self, id: &str) {
        let Some(snap) = self.snap.as_mut() else {
            return;
        };
        if let Some((i, _, v)) = self.instances.get_full(id) {
            if i >= snap.next && i < snap.end && !snap.shadow.contains_key(&i) {
                snap.shadow.insert(i, v.clone());
            }
        }
    }

    /// Marks a running snapshot unusable if position `i` (or anything
    /// after it) below its end moved.
    fn break_snapshot_below(&mut self, i: usize, why: &'static str) {
        if let Some(snap) = self.snap.as_mut() {
            if i < snap.end && snap.broken.is_none() {
                snap.broken = Some(why);
            }
        }
    }

    /// Number of active instances.
    pub fn active_instances(&self) -> usize {
        self.instances.values().filter(|i| !i.deleted).count()
    }

    /// Number of machine versions held.
    pub fn machine_versions(&self) -> usize {
        self.machines.values().map(|v| v.len()).sum()
    }

    /// Every machine version held, for the start-up union across shards.
    pub fn machine_defs(&self) -> Vec<(String, u32, Arc<MachineDef>)> {
        let mut out = Vec::new();
        for (name, versions) in &self.machines {
            for (v, d) in versions {
                out.push((name.clone(), *v, d.clone()));
            }
        }
        out
    }

    /// Installs a definition found on another shard during recovery (not
    /// logged here: recovery unions definitions from every shard again).
    pub fn adopt_machine(&mut self, name: String, version: u32, def: Arc<MachineDef>) {
        self.machines
            .entry(name)
            .or_default()
            .entry(version)
            .or_insert(def);
    }

    /// The shared copy of a machine or state name.
    pub(crate) fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    fn machine(&self, name: &str, version: u32) -> Option<&Arc<MachineDef>> {
        self.machines.get(name)?.get(&version)
    }

    /// Takes the entries staged since the last call.
    pub fn take_staged(&mut self) -> Vec<Staged> {
        std::mem::take(&mut self.staged)
    }

    /// Takes the events of the changes made since the last call.
    pub fn take_events(&mut self) -> Vec<WatchEvent> {
        std::mem::take(&mut self.events)
    }

    /// Takes the events produced since `mark`.
    pub fn take_events_since(&mut self, mark: Mark) -> Vec<WatchEvent> {
        self.events.split_off(mark.events.min(self.events.len()))
    }

    /// Stages a `batch_abort` record.
    pub fn stage_abort(&mut self, offsets: &mut Offsets, entry: WalEntry) -> Result<u64, ApiError> {
        assert!(matches!(entry, WalEntry::BatchAbort { .. }));
        self.stage(offsets, entry)
    }

    /// Forgets the undo log: the staged entries are durable.
    pub fn commit_done(&mut self) {
        self.undo.clear();
    }

    /// The current position of the undo, staging and event logs.
    pub fn mark(&self) -> Mark {
        Mark {
            undo: self.undo.len(),
            staged: self.staged.len(),
            events: self.events.len(),
        }
    }

    /// Reverses every change made since `mark` (a dry run, or a failed
    /// batch part), leaving earlier changes of the drain alone.
    pub fn rollback_to(&mut self, mark: Mark) {
        assert!(mark.undo <= self.undo.len() && mark.staged <= self.staged.len());
        self.capture = None;
        self.staged.truncate(mark.staged);
        self.events.truncate(mark.events.min(self.events.len()));
        let tail = self.undo.split_off(mark.undo);
        self.apply_undo(tail);
    }

    /// Takes the undo entries since `mark` out of the drain's log, so that
    /// they outlive the drain's commit.
    pub fn take_undo_since(&mut self, mark: Mark) -> UndoLog {
        UndoLog(self.undo.split_off(mark.undo))
    }

    /// Reverses a batch part kept by [`Engine::take_undo_since`].
    pub fn undo_part(&mut self, log: UndoLog) {
        self.apply_undo(log.0);
    }

    /// Starts capturing the staged entries of an atomic-batch part.
    pub fn begin_part(&mut self) {
        assert!(self.capture.is_none(), "batch parts do not nest");
        self.capture = Some(Vec::new());
    }

    /// Ends the part: stages its entries as one `batch_part` record (none
    /// if it changed nothing). Returns the lowest offset it holds.
    pub fn end_part(
        &mut self,
        batch_id: &str,
        participants: &[u32],
        offsets: &mut Offsets,
    ) -> Result<u64, ApiError> {
        let entries = self.capture.take().expect("begin_part first");
        // Every participant logs a part, even one that changed nothing:
        // recovery counts a batch only if every participant's part is there.
        // The record takes its first entry's offset (its changes occupy
        // offsets from there on), or one of its own when empty.
        let first = match entries.first() {
            Some(e) => e.offset,
            None => offsets.take(),
        };
        let entry = WalEntry::BatchPart {
            batch_id: batch_id.to_owned(),
            participants: participants.to_vec(),
            entries,
        };
        let bytes = serde_json::to_vec(&entry).expect("WAL entry serialization cannot fail");
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(ApiError::bad_request(format!(
                "atomic batch part of {} bytes exceeds the WAL record limit of {MAX_ENTRY_BYTES} bytes",
                bytes.len()
            )));
        }
        self.staged.push(Staged {
            offset: first,
            kind: entry.kind(),
            bytes,
        });
        Ok(first)
    }

    fn apply_undo(&mut self, mut undo: Vec<Undo>) {
        while let Some(u) = undo.pop() {
            self.undo_one(u);
        }
    }

    /// Reverses every change made since the last [`Engine::commit_done`].
    pub fn rollback(&mut self) {
        self.staged.clear();
        self.events.clear();
        self.capture = None;
        let all = std::mem::take(&mut self.undo);
        self.apply_undo(all);
    }

    fn undo_one(&mut self, u: Undo) {
        {
            match u {
                Undo::Instance(id, Some(prev)) => {
                    self.preserve(&id);
                    self.instances.insert(id, prev);
                }
                Undo::Instance(id, None) => {
                    if let Some((i, _, _)) = self.instances.swap_remove_full(&id) {
                        self.break_snapshot_below(i, "an instance it held was removed");
                    }
                }
                Undo::Machine(name, v) => {
                    if let Some(vs) = self.machines.get_mut(&name) {
                        vs.remove(&v);
                        if vs.is_empty() {
                            self.machines.remove(&name);
                        }
                    }
                }
                Undo::Flush(saved) => {
                    self.break_snapshot_below(0, "FLUSH_ALL was rolled back");
                    let (machines, instances, idempotency) = *saved;
                    self.machines = machines;
                    self.instances = instances;
                    self.idempotency = idempotency;
                }
                Undo::Idempotency(id, key, prev) => self.idempotency.restore(&id, &key, prev),
            }
        }
    }

    /// Serializes and stages `entry`; refuses an entry too large for a WAL
    /// record before the caller has changed any state.
    fn stage(&mut self, offsets: &mut Offsets, entry: WalEntry) -> Result<u64, ApiError> {
        let bytes = serde_json::to_vec(&entry).expect("WAL entry serialization cannot fail");
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(ApiError::bad_request(format!(
                "the change would need a WAL record of {} bytes (limit {})",
                bytes.len(),
                MAX_ENTRY_BYTES
            )));
        }
        let offset = offsets.take();
        self.last_entry_size = bytes.len();
        match self.capture.as_mut() {
            Some(part) => part.push(BatchEntry { offset, entry }),
            None => self.staged.push(Staged {
                offset,
                kind: entry.kind(),
                bytes,
            }),
        }
        Ok(offset)
    }

    /// Executes one command. Writes stage a WAL entry (see
    /// [`Engine::take_staged`]); the reply must not be released before the
    /// entry is committed.
    pub fn execute(&mut self, cmd: Command, offsets: &mut Offsets, now: i64) -> Reply {
        let result = match cmd {
            Command::PutMachine {
                machine,
                version,
                def,
                raw,
                max_versions,
            } => self.put_machine(machine, version, def, raw, max_versions, offsets),
            Command::GetMachine { machine, version } => self.get_machine(&machine, version),
            Command::ListMachines => Ok(self.list_machines()),
            Command::CreateInstance {
                instance_id,
                machine,
                version,
                initial_ctx,
                idempotency_key,
                allow_recreate,
            } => self.create_instance(
                instance_id,
                machine,
                version,
                initial_ctx,
                idempotency_key,
                allow_recreate,
                offsets,
                now,
            ),
            Command::GetInstance { instance_id } => self.get_instance(&instance_id),
            Command::ListInstances {
                machine,
                state,
                take,
            } => Ok(self.list_instances(machine.as_deref(), state.as_deref(), take)),
            Command::DeleteInstance {
                instance_id,
                idempotency_key,
            } => self.delete_instance(instance_id, idempotency_key, offsets, now),
            Command::ApplyEvent(a) => self.apply_event(a, offsets, now),
            Command::FlushAll => self.flush_all(offsets, now),
            Command::WalStats => unreachable!("WAL_STATS is answered by the shard loop"),
        };
        result.unwrap_or_else(Reply::Error)
    }

    fn put_machine(
        &mut self,
        machine: String,
        version: u32,
        def: Result<Arc<MachineDef>, ApiError>,
        raw: Arc<Value>,
        max_versions: u32,
        offsets: &mut Offsets,
    ) -> Result<Reply, ApiError> {
        let existing = self.machine(&machine, version).cloned();
        if max_versions > 0 && existing.is_none() {
            let have = self.machines.get(&machine).map_or(0, |v| v.len());
            if have >= max_versions as usize {
                return Err(ApiError::new(
                    ErrorCode::MachineVersionLimitExceeded,
                    format!(
                        "machine version limit exceeded: machine '{machine}' already has {have} versions (limit: {max_versions})"
                    ),
                ));
            }
        }
        let def = def?;
        if let Some(old) = existing {
            if old.checksum() == def.checksum() {
                return Ok(Reply::PutMachine {
                    created: false,
                    checksum: def.checksum().to_owned(),
                });
            }
            return Err(ApiError::core(
                ErrorCode::MachineVersionExists,
                format!("machine version already exists: {machine} v{version}"),
            ));
        }
        let checksum = def.checksum().to_owned();
        self.stage(
            offsets,
            WalEntry::PutMachine {
                machine: machine.clone(),
                version,
                definition_hash: checksum.clone(),
                definition: (*raw).clone(),
            },
        )?;
        self.machines
            .entry(machine.clone())
            .or_default()
            .insert(version, def);
        self.undo.push(Undo::Machine(machine, version));
        Ok(Reply::PutMachine {
            created: true,
            checksum,
        })
    }

    fn get_machine(&self, machine: &str, version: u32) -> Result<Reply, ApiError> {
        let def = self
            .machine(machine, version)
            .ok_or_else(|| machine_not_found(machine, version))?;
        #[derive(Serialize)]
        struct R<'a> {
            checksum: &'a str,
            definition: &'a Value,
        }
        Ok(json(&R {
            checksum: def.checksum(),
            definition: def.normalized(),
        }))
    }

    fn list_machines(&self) -> Reply {
        #[derive(Serialize)]
        struct Item<'a> {
            machine: &'a str,
            versions: Vec<u32>,
        }
        #[derive(Serialize)]
        struct R<'a> {
            items: Vec<Item<'a>>,
        }
        let mut items: Vec<Item<'_>> = self
            .machines
            .iter()
            .map(|(name, vs)| Item {
                machine: name,
                versions: vs.keys().copied().collect(),
            })
            .collect();
        items.sort_unstable_by(|a, b| a.machine.as_bytes().cmp(b.machine.as_bytes()));
        json(&R { items })
    }

    #[allow(clippy::too_many_arguments)]
    fn create_instance(
        &mut self,
        id: String,
        machine: String,
        version: u32,
        initial_ctx: Value,
        idempotency_key: Option<String>,
        allow_recreate: bool,
        offsets: &mut Offsets,
        now: i64,
    ) -> Result<Reply, ApiError> {
        if let Some(key) = &idempotency_key {
            if let Some(reply) = self.create_replayed(&id, key, now) {
                return Ok(reply);
            }
        }
        self.check_create_allowed(&id, allow_recreate)?;
        let def = self
            .machine(&machine, version)
            .ok_or_else(|| machine_not_found(&machine, version))?
            .clone();
        let state = self.intern(def.initial());
        let ctx = Ctx::from_value(&initial_ctx);
        let offset = self.stage(
            offsets,
            WalEntry::CreateInstance {
                instance_id: id.clone(),
                machine: machine.clone(),
                version,
                initial_state: state.to_string(),
                initial_ctx: ctx.clone(),
                idempotency_key: idempotency_key.clone(),
                ts: now,
            },
        )?;
        let reply = create_reply(&id, &state, offset);
        if let Some(key) = idempotency_key {
            self.remember_create(&id, key, &state, offset, now);
        }
        let inst = Instance {
            machine: self.intern(&machine),
            version,
            state,
            ctx,
            last_event_id: None,
            last_wal_offset: offset,
            created_offset: offset,
            created_at: now,
            updated_at: now,
            deleted: false,
        };
        self.preserve(&id);
        let prev = self.instances.insert(id.clone(), inst);
        self.undo.push(Undo::Instance(id, prev));
        Ok(reply)
    }

    /// The cached reply of a retried create, only while the instance that create made still exists.
    fn create_replayed(&self, id: &str, key: &str, now: i64) -> Option<Reply> {
        let Some(Cached::Create { state, wal_offset }) = self.idempotency.get(id, key, now) else {
            return None;
        };
        let same = self
            .instances
            .get(id)
            .is_some_and(|i| !i.deleted && i.created_offset == *wal_offset);
        same.then(|| create_reply(id, state, *wal_offset))
    }

    /// A live instance blocks a create; a deleted one only without `allow_recreate`.
    fn check_create_allowed(&self, id: &str, allow_recreate: bool) -> Result<(), ApiError> {
        if let Some(existing) = self.instances.get(id) {
            if !existing.deleted || !allow_recreate {
                return Err(ApiError::core(
                    ErrorCode::InstanceExists,
                    format!("instance already exists: {id}"),
                ));
            }
        }
        Ok(())
    }

    /// Caches the create's outcome under its key, with the undo entry that forgets it.
    fn remember_create(&mut self, id: &str, key: String, state: &str, offset: u64, now: i64) {
        let cached = Cached::Create {
            state: state.to_string(),
            wal_offset: offset,
        };
        let prev = self.idempotency.insert(id, &key, cached, now);
        self.undo.push(Undo::Idempotency(id.to_string(), key, prev));
    }

    fn get_instance(&self, id: &str) -> Result<Reply, ApiError> {
        let inst = self
            .instances
            .get(id)
            .filter(|i| !i.deleted)
            .ok_or_else(|| instance_not_found(id))?;
        #[derive(Serialize)]
        struct R<'a> {
            ctx: &'a Ctx,
            #[serde(skip_serializing_if = "Option::is_none")]
            last_event_id: Option<&'a str>,
            last_wal_offset: u64,
            machine: &'a str,
            state: &'a str,
            version: u32,
        }
        Ok(json(&R {
            ctx: &inst.ctx,
            last_event_id: inst.last_event_id.as_deref(),
            last_wal_offset: inst.last_wal_offset,
            machine: &inst.machine,
            state: &inst.state,
            version: inst.version,
        }))
    }

    fn list_instances(&self, machine: Option<&str>, state: Option<&str>, take: usize) -> Reply {
        let mut matches: Vec<(&String, &Instance)> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                !i.deleted
                    && machine.is_none_or(|m| *i.machine == *m)
                    && state.is_none_or(|s| *i.state == *s)
            })
            .collect();
        let total = matches.len() as u64;
        let take = take.min(matches.len());
        if take < matches.len() {
            matches.select_nth_unstable_by(take, |a, b| a.0.cmp(b.0));
            matches.truncate(take);
        }
        matches.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let items = matches
            .into_iter()
            .map(|(id, i)| InstanceSummary {
                created_at: i.created_at,
                id: id.clone(),
                last_wal_offset: i.last_wal_offset,
                machine: i.machine.to_string(),
                state: i.state.to_string(),
                updated_at: i.updated_at,
                version: i.version,
            })
            .collect();
        Reply::Instances { total, items }
    }

    fn delete_instance(
        &mut self,
        id: String,
        idempotency_key: Option<String>,
        offsets: &mut Offsets,
        now: i64,
    ) -> Result<Reply, ApiError> {
        #[derive(Serialize)]
        struct R<'a> {
            deleted: bool,
            instance_id: &'a str,
            wal_offset: u64,
        }
        let inst = self
            .instances
            .get(&id)
            .ok_or_else(|| instance_not_found(&id))?;
        if inst.deleted {
            return Ok(json(&R {
                deleted: true,
                instance_id: &id,
                wal_offset: inst.last_wal_offset,
            }));
        }
        let prev = inst.clone();
        let offset = self.stage(
            offsets,
            WalEntry::DeleteInstance {
                instance_id: id.clone(),
                idempotency_key,
                ts: now,
            },
        )?;
        self.preserve(&id);
        let inst = self.instances.get_mut(&id).expect("checked above");
        inst.deleted = true;
        inst.last_wal_offset = offset;
        inst.updated_at = now;
        let reply = json(&R {
            deleted: true,
            instance_id: &id,
            wal_offset: offset,
        });
        self.undo.push(Undo::Instance(id, Some(prev)));
        Ok(reply)
    }

    /// APPLY_EVENT as a page of steps: each check may refuse before anything
    /// changes; then the record is staged, and only then the state changes.
    fn apply_event(
        &mut self,
        a: ApplyEvent,
        offsets: &mut Offsets,
        now: i64,
    ) -> Result<Reply, ApiError> {
        let inst = self.live_instance(&a.instance_id)?;
        if let Some(reply) = self.repeated_apply(&a, inst, now) {
            return Ok(reply);
        }
        check_expected(&a, inst)?;
        let t = self.transition(&a, inst)?;
        // Parsed once, for the guard and the merge, and only if needed.
        let current =
            (t.guard.is_some() || Ctx::merge_changes(&a.payload)).then(|| inst.ctx.to_value());
        check_guard(t, &a, inst, current.as_ref())?;
        let to_name = t.to.clone();
        let change = ApplyChange {
            incarnation: inst.created_offset,
            ctx: match current {
                Some(cur) => inst.ctx.merged_from(cur, &a.payload),
                None => inst.ctx.clone(),
            },
            from_state: inst.state.clone(),
            machine: inst.machine.clone(),
            version: inst.version,
            to_state: self.intern(&to_name),
        };
        let offset = self.stage_apply(offsets, &a, &change, now)?;
        if self.collect_events {
            self.push_watch_event(offset, &a.instance_id, a.event, a.payload, &change);
        }
        let reply = json(&ApplyReply {
            applied: true,
            ctx: &change.ctx,
            event_id: a.event_id.as_deref(),
            from_state: &change.from_state,
            to_state: &change.to_state,
            wal_offset: offset,
        });
        self.remember_apply(&a.instance_id, a.idempotency_key, &change, offset, now);
        self.move_instance(a.instance_id, a.event_id, change, offset, now);
        Ok(reply)
    }

    /// The instance an operation targets: present and not deleted.
    fn live_instance(&self, id: &str) -> Result<&Instance, ApiError> {
        self.instances
            .get(id)
            .filter(|i| !i.deleted)
            .ok_or_else(|| instance_not_found(id))
    }

    /// The first answer again, for a retry whose key the window still holds
    /// for this incarnation of the instance (a predecessor's does not count).
    fn repeated_apply(&self, a: &ApplyEvent, inst: &Instance, now: i64) -> Option<Reply> {
        let key = a.idempotency_key.as_ref()?;
        let same = |c: &&Cached| match c {
            Cached::Apply { incarnation, .. } => *incarnation == inst.created_offset,
            _ => false,
        };
        let Some(Cached::Apply {
            incarnation,
            from_state,
            to_state,
            ctx,
            wal_offset,
        }) = self.idempotency.get(&a.instance_id, key, now).filter(same)
        else {
            return None;
        };
        debug_assert_eq!(*incarnation, inst.created_offset);
        Some(json(&ApplyReply {
            applied: false,
            ctx,
            event_id: a.event_id.as_deref(),
            from_state,
            to_state,
            wal_offset: *wal_offset,
        }))
    }

    /// The transition the event takes in the instance's state, if its
    /// machine version defines one.
    fn transition(&self, a: &ApplyEvent, inst: &Instance) -> Result<&Transition, ApiError> {
        let def = self
            .machine(&inst.machine, inst.version)
            .ok_or_else(|| machine_not_found(&inst.machine, inst.version))?;
        def.transition(&inst.state, &a.event).ok_or_else(|| {
            ApiError::core(
                ErrorCode::InvalidTransition,
                format!(
                    "invalid transition: cannot apply '{}' in state '{}'",
                    a.event, inst.state
                ),
            )
        })
    }

    /// Stages the apply's WAL record: refused, before anything changed, if
    /// it is too large.
    fn stage_apply(
        &mut self,
        offsets: &mut Offsets,
        a: &ApplyEvent,
        change: &ApplyChange,
        now: i64,
    ) -> Result<u64, ApiError> {
        self.stage(
            offsets,
            WalEntry::ApplyEvent {
                instance_id: a.instance_id.clone(),
                machine: change.machine.to_string(),
                version: change.version,
                event: a.event.clone(),
                from_state: change.from_state.to_string(),
                to_state: change.to_state.to_string(),
                payload: a.payload.clone(),
                ctx: change.ctx.clone(),
                event_id: a.event_id.clone(),
                idempotency_key: a.idempotency_key.clone(),
                ts: now,
            },
        )
    }

    /// Queues the apply for watchers (sized by the record just staged).
    fn push_watch_event(
        &mut self,
        offset: u64,
        instance_id: &str,
        event: String,
        payload: Value,
        change: &ApplyChange,
    ) {
        self.events.push(WatchEvent {
            wal_offset: offset,
            instance_id: instance_id.to_owned(),
            machine: change.machine.to_string(),
            version: change.version,
            from_state: change.from_state.to_string(),
            to_state: change.to_state.to_string(),
            event,
            payload,
            ctx: change.ctx.clone(),
            size: self.last_entry_size,
        });
    }

    /// Keeps the apply's answer under its idempotency key, if it has one,
    /// with the undo entry that forgets it again.
    fn remember_apply(
        &mut self,
        id: &str,
        key: Option<String>,
        change: &ApplyChange,
        offset: u64,
        now: i64,
    ) {
        let Some(key) = key else {
            return;
        };
        let cached = Cached::Apply {
            incarnation: change.incarnation,
            from_state: change.from_state.to_string(),
            to_state: change.to_state.to_string(),
            ctx: change.ctx.clone(),
            wal_offset: offset,
        };
        let prev = self.idempotency.insert(id, &key, cached, now);
        self.undo.push(Undo::Idempotency(id.to_owned(), key, prev));
    }

    /// Moves the instance to its new state and context, logging the old
    /// values as its undo entry.
    fn move_instance(
        &mut self,
        id: String,
        event_id: Option<String>,
        change: ApplyChange,
        offset: u64,
        now: i64,
    ) {
        self.preserve(&id);
        let inst = self.instances.get_mut(&id).expect("looked up above");
        let prev = Instance {
            machine: inst.machine.clone(),
            version: inst.version,
            state: std::mem::replace(&mut inst.state, change.to_state),
            ctx: std::mem::replace(&mut inst.ctx, change.ctx),
            last_event_id: std::mem::replace(&mut inst.last_event_id, event_id),
            last_wal_offset: std::mem::replace(&mut inst.last_wal_offset, offset),
            created_offset: inst.created_offset,
            created_at: inst.created_at,
            updated_at: std::mem::replace(&mut inst.updated_at, now),
            deleted: false,
        };
        self.undo.push(Undo::Instance(id, Some(prev)));
    }

    fn flush_all(&mut self, offsets: &mut Offsets, now: i64) -> Result<Reply, ApiError> {
        self.stage(offsets, WalEntry::FlushAll { ts: now })?;
        self.break_snapshot_below(0, "FLUSH_ALL ran");
        let instances = self.instances.len() as u64;
        let machines = self.machines.values().map(|v| v.len() as u64).sum();
        let fresh = self.idempotency.emptied();
        let saved = (
            std::mem::take(&mut self.machines),
            std::mem::take(&mut self.instances),
            std::mem::replace(&mut self.idempotency, fresh),
        );
        self.undo.push(Undo::Flush(Box::new(saved)));
        Ok(Reply::Flushed {
            instances,
            machines,
        })
    }

    /// Applies one recovered WAL entry (no validation beyond what keeps the
    /// maps consistent: the entry was validated when it was logged).
    ///
    /// Atomic-batch parts are applied in log order but remembered with an
    /// undo log until [`Engine::resolve_part`] says whether every
    /// participant's part is durable; a `batch_abort` record undoes its part
    /// on the spot (nothing after the part touched its instances before the
    /// abort was logged).
    pub fn replay(&mut self, offset: u64, entry: WalEntry) -> Result<(), String> {
        self.max_offset = self.max_offset.max(offset);
        match entry {
            WalEntry::BatchPart {
                batch_id,
                participants,
                entries,
            } => {
                let mut undo = Vec::new();
                for e in entries {
                    if matches!(
                        e.entry,
                        WalEntry::BatchPart { .. } | WalEntry::BatchAbort { .. }
                    ) {
                        return Err(format!("nested batch record in batch {batch_id}"));
                    }
                    self.replay_one(e.offset, e.entry, Some(&mut undo))?;
                }
                if self.replay_parts.contains_key(&batch_id) {
                    return Err(format!(
                        "batch {batch_id} has two parts on one shard (at offset {offset})"
                    ));
                }
                self.replay_parts.insert(batch_id, (participants, undo));
                Ok(())
            }
            WalEntry::BatchAbort { batch_id } => {
                if let Some((_, undo)) = self.replay_parts.remove(&batch_id) {
                    self.apply_undo(undo);
                }
                self.aborted.insert(batch_id);
                Ok(())
            }
            other => self.replay_one(offset, other, None),
        }
    }

    /// Batch parts replayed whose fate is not decided yet: (batch id,
    /// participants).
    pub fn unresolved_parts(&self) -> Vec<(String, Vec<u32>)> {
        self.replay_parts
            .iter()
            .map(|(id, (p, _))| (id.clone(), p.clone()))
            .collect()
    }

    /// Decides a replayed batch part: kept when every participant's part is
    /// durable, else undone (the caller then logs a `batch_abort`).
    pub fn resolve_part(&mut self, batch_id: &str, keep: bool) {
        if let Some((_, undo)) = self.replay_parts.remove(batch_id) {
            if !keep {
                self.apply_undo(undo);
                self.aborted.insert(batch_id.to_owned());
            }
        }
    }

    /// Marks every offset below `start` as used: a snapshot starting there
    /// exists, even if recovery could not read it (a passing I/O error).
    /// New records must never take offsets it claims to cover: a later
    /// start-up that can read it would skip them as "in the snapshot" and
    /// lose them (found by the storage simulation).
    pub fn reserve_below(&mut self, start: u64) {
        self.max_offset = self.max_offset.max(start.saturating_sub(1));
    }

    /// Highest offset replayed (batch entries included).
    pub fn max_offset(&self) -> u64 {
        self.max_offset
    }

    /// Ids of every batch undone in this shard's log.
    pub fn aborted_batches(&self) -> &HashSet<String> {
        &self.aborted
    }

    /// Applies one recovered entry other than a batch record: notes the
    /// instance's old value when inside a batch part, then one step per kind.
    fn replay_one(
        &mut self,
        offset: u64,
        entry: WalEntry,
        mut undo: Option<&mut Vec<Undo>>,
    ) -> Result<(), String> {
        if let (Some(u), Some(id)) = (undo.as_deref_mut(), entry_instance(&entry)) {
            u.push(Undo::Instance(
                id.to_owned(),
                self.instances.get(id).cloned(),
            ));
        }
        match entry {
            WalEntry::BatchPart { .. } | WalEntry::BatchAbort { .. } => {
                unreachable!("batch records are handled by replay")
            }
            WalEntry::PutMachine {
                machine,
                version,
                definition,
                ..
            } => self.replay_put_machine(machine, version, &definition),
            WalEntry::CreateInstance { .. } => self.replay_create(offset, entry, undo),
            WalEntry::ApplyEvent { .. } => self.replay_apply(offset, entry, undo)?,
            WalEntry::FlushAll { .. } => self.replay_flush_all(),
            WalEntry::DeleteInstance {
                instance_id, ts, ..
            } => self.replay_delete(offset, &instance_id, ts)?,
        }
        Ok(())
    }

    /// A logged definition; one that no longer parses is skipped, not fatal.
    fn replay_put_machine(&mut self, machine: String, version: u32, definition: &Value) {
        match MachineDef::from_json(definition) {
            Ok(def) => {
                self.machines
                    .entry(machine)
                    .or_default()
                    .entry(version)
                    .or_insert_with(|| Arc::new(def));
            }
            Err(e) => {
                tracing::warn!(%machine, version, error = %e, "skipping invalid logged definition")
            }
        }
    }

    /// A logged create: its idempotency key first, then the instance.
    fn replay_create(&mut self, offset: u64, entry: WalEntry, undo: Option<&mut Vec<Undo>>) {
        let WalEntry::CreateInstance {
            instance_id,
            machine,
            version,
            initial_state,
            initial_ctx,
            idempotency_key,
            ts,
        } = entry
        else {
            unreachable!("replay_one passes create records only")
        };
        if let Some(key) = idempotency_key {
            let cached = Cached::Create {
                state: initial_state.clone(),
                wal_offset: offset,
            };
            replay_key(&mut self.idempotency, &instance_id, key, cached, ts, undo);
        }
        let (machine, state) = (self.intern(&machine), self.intern(&initial_state));
        self.instances.insert(
            instance_id,
            Instance {
                machine,
                version,
                state,
                ctx: initial_ctx,
                last_event_id: None,
                last_wal_offset: offset,
                created_offset: offset,
                created_at: ts,
                updated_at: ts,
                deleted: false,
            },
        );
    }

    /// A logged apply: its instance must exist; its key is recorded for the
    /// instance's incarnation before the instance moves.
    fn replay_apply(
        &mut self,
        offset: u64,
        entry: WalEntry,
        undo: Option<&mut Vec<Undo>>,
    ) -> Result<(), String> {
        let WalEntry::ApplyEvent {
            instance_id,
            from_state,
            to_state,
            ctx,
            event_id,
            idempotency_key,
            ts,
            ..
        } = entry
        else {
            unreachable!("replay_one passes apply records only")
        };
        let to_name = self.intern(&to_state);
        let inst = self
            .instances
            .get_mut(&instance_id)
            .ok_or_else(|| format!("apply_event for unknown instance {instance_id}"))?;
        if let Some(key) = idempotency_key {
            let cached = Cached::Apply {
                incarnation: inst.created_offset,
                from_state,
                to_state: to_state.clone(),
                ctx: ctx.clone(),
                wal_offset: offset,
            };
            replay_key(&mut self.idempotency, &instance_id, key, cached, ts, undo);
        }
        inst.state = to_name;
        inst.ctx = ctx;
        inst.last_event_id = event_id;
        inst.last_wal_offset = offset;
        inst.updated_at = ts;
        Ok(())
    }

    /// A logged FLUSH_ALL: everything goes, the window's limits stay.
    fn replay_flush_all(&mut self) {
        self.machines.clear();
        self.instances.clear();
        self.idempotency = self.idempotency.emptied();
    }

    /// A logged delete (soft): its instance must exist.
    fn replay_delete(&mut self, offset: u64, instance_id: &str, ts: i64) -> Result<(), String> {
        let inst = self
            .instances
            .get_mut(instance_id)
            .ok_or_else(|| format!("delete_instance for unknown instance {instance_id}"))?;
        inst.deleted = true;
        inst.last_wal_offset = offset;
        inst.updated_at = ts;
        Ok(())
    }
}

/// APPLY_EVENT's answer (also the answer replayed for a repeated key).
#[derive(Serialize)]
struct ApplyReply<'a> {
    applied: bool,
    ctx: &'a Ctx,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    from_state: &'a str,
    to_state: &'a str,
    wal_offset: u64,
}

/// What an apply changes, decided by its checks before anything is staged.
struct ApplyChange {
    /// The instance's create offset (keys are per incarnation).
    incarnation: u64,
    ctx: Ctx,
    from_state: Arc<str>,
    machine: Arc<str>,
    version: u32,
    to_state: Arc<str>,
}

/// Optimistic concurrency: the state and the WAL offset the client expects,
/// where it names them.
fn check_expected(a: &ApplyEvent, inst: &Instance) -> Result<(), ApiError> {
    if let Some(exp) = &a.expected_state {
        if **exp != *inst.state {
            return Err(ApiError::core(
                ErrorCode::Conflict,
                format!("state conflict: expected '{exp}', actual '{}'", inst.state),
            ));
        }
    }
    if let Some(exp) = a.expected_wal_offset {
        if exp != inst.last_wal_offset {
            return Err(ApiError::core(
                ErrorCode::Conflict,
                format!(
                    "WAL offset conflict: expected {exp}, actual {}",
                    inst.last_wal_offset
                ),
            ));
        }
    }
    Ok(())
}

/// The transition's guard, evaluated on the current context (`current` is
/// there whenever the transition has a guard).
fn check_guard(
    t: &Transition,
    a: &ApplyEvent,
    inst: &Instance,
    current: Option<&Value>,
) -> Result<(), ApiError> {
    if let (Some(g), Some(cur)) = (&t.guard, current) {
        if !g.eval(cur) {
            return Err(ApiError::core(
                ErrorCode::GuardFailed,
                format!(
                    "guard failed: guard failed for transition '{}' -> '{}' on event '{}'",
                    inst.state, t.to, a.event
                ),
            ));
        }
    }
    Ok(())
}

/// Records a replayed key in the idempotency window and, inside a batch
/// part, how to forget it (a free function: the caller may hold an instance).
fn replay_key(
    idempotency: &mut IdempotencyWindow,
    id: &str,
    key: String,
    cached: Cached,
    ts: i64,
    undo: Option<&mut Vec<Undo>>,
) {
    let prev = idempotency.insert(id, &key, cached, ts);
    if let Some(u) = undo {
        u.push(Undo::Idempotency(id.to_owned(), key, prev));
    }
}

/// The instance a single-instance WAL entry changes.
fn entry_instance(e: &WalEntry) -> Option<&str> {
    match e {
        WalEntry::CreateInstance { instance_id, .. }
        | WalEntry::ApplyEvent { instance_id, .. }
        | WalEntry::DeleteInstance { instance_id, .. } => Some(instance_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal_entry::BatchEntry;
    use serde_json::json;

    fn limits() -> EngineLimits {
        EngineLimits {
            idempotency_entries: 100,
            idempotency_max_age_ms: 0,
        }
    }

    fn create(id: &str) -> WalEntry {
        WalEntry::CreateInstance {
            instance_id: id.into(),
            machine: "m".into(),
            version: 1,
            initial_state: "a".into(),
            initial_ctx: Ctx::from_value(&json!({"n": 0})),
            idempotency_key: None,
            ts: 1,
        }
    }

    fn apply(id: &str, n: i64, key: Option<&str>) -> WalEntry {
        WalEntry::ApplyEvent {
            instance_id: id.into(),
            machine: "m".into(),
            version: 1,
            event: "E".into(),
            from_state: "a".into(),
            to_state: "b".into(),
            payload: json!({"n": n}),
            ctx: Ctx::from_value(&json!({"n": n})),
            event_id: None,
            idempotency_key: key.map(str::to_owned),
            ts: 2,
        }
    }

    fn part(batch: &str, entries: Vec<(u64, WalEntry)>) -> WalEntry {
        WalEntry::BatchPart {
            batch_id: batch.into(),
            participants: vec![0, 1],
            entries: entries
                .into_iter()
                .map(|(offset, entry)| BatchEntry { offset, entry })
                .collect(),
        }
    }

    fn n_of(e: &Engine, id: &str) -> Option<i64> {
        e.instances
            .get(id)
            .filter(|i| !i.deleted)
            .map(|i| i.ctx.to_value()["n"].as_i64().unwrap())
    }

    #[test]
    fn replayed_parts_are_undone_unless_complete() {
        let mut e = Engine::new(&limits());
        e.replay(1, create("x")).unwrap();
        e.replay(
            3,
            part("b1", vec![(2, apply("x", 1, Some("k"))), (3, create("y"))]),
        )
        .unwrap();
        assert_eq!((n_of(&e, "x"), n_of(&e, "y")), (Some(1), Some(0)));
        assert_eq!(e.unresolved_parts(), vec![("b1".to_owned(), vec![0, 1])]);
        e.resolve_part("b1", false);
        assert_eq!((n_of(&e, "x"), n_of(&e, "y")), (Some(0), None), "undone");
        assert!(
            e.idempotency.get("x", "k", 0).is_none(),
            "its idempotency entry too"
        );
        assert!(e.unresolved_parts().is_empty());

        e.replay(
            5,
            part("b2", vec![(4, apply("x", 2, None)), (5, create("z"))]),
        )
        .unwrap();
        e.resolve_part("b2", true);
        assert_eq!((n_of(&e, "x"), n_of(&e, "z")), (Some(2), Some(0)), "kept");
    }

    #[test]
    fn a_logged_abort_undoes_its_part_in_place() {
        let mut e = Engine::new(&limits());
        e.replay(1, create("x")).unwrap();
        e.replay(2, part("b", vec![(2, apply("x", 7, None))]))
            .unwrap();
        e.replay(
            3,
            WalEntry::BatchAbort {
                batch_id: "b".into(),
            },
        )
        .unwrap();
        assert_eq!(n_of(&e, "x"), Some(0));
        // Later records apply on top of the undone state.
        e.replay(4, apply("x", 9, None)).unwrap();
        assert_eq!(n_of(&e, "x"), Some(9));
        assert!(e.unresolved_parts().is_empty());
    }

    #[test]
    fn two_parts_of_one_batch_on_one_shard_are_refused() {
        let mut e = Engine::new(&limits());
        e.replay(1, create("x")).unwrap();
        e.replay(2, part("b", vec![(2, apply("x", 1, None))]))
            .unwrap();
        assert!(e
            .replay(3, part("b", vec![(3, apply("x", 2, None))]))
            .is_err());
    }
}

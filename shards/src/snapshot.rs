//! Per-shard snapshots: the whole state of one shard at one point of its
//! log, so that recovery replays only the WAL after it and compaction can
//! delete the segments before it (DECISIONS D15).
//!
//! # Point in time without a long pause
//!
//! A snapshot covers every record below its `start_offset` and nothing at
//! or above it. The shard takes it between two drains: machines, aborted
//! batch ids and the idempotency window's position are copied at once (all
//! small), while the instance map, which may hold millions of entries, is
//! walked by position a slice at a time across later turns of the shard
//! loop ([`SnapshotJob::step`], a time budget per turn). Changes made
//! meanwhile first save the instance's snapshot-time value into the
//! engine's shadow map (copy-on-write per instance, see `engine`), so the
//! file holds exactly the state at `start_offset`.
//!
//! The idempotency window is walked the same way but *not* shadowed: it is
//! written as it is when each slice is taken. That is harmless because
//! recovery replays every record at or above `start_offset`, which re-inserts
//! exactly the entries those records made, in order, and the window's
//! evictions follow from insertion order alone.
//!
//! Serialization (JSON lines) happens on the shard; compression (zstd) and
//! the file I/O on a thread of the snapshot's own, so the shard only pays
//! for the serialization.
//!
//! # File format
//!
//! ```text
//! header   32 bytes: "RSTMSNAP", format u32, shard u32, start_offset u64, 0u64
//! body     zstd stream of lines "<tag> <json>\n": H (meta), M (machine),
//!          I (instance), K (idempotency entry), E (end, with counts)
//! trailer  24 bytes: body length u64, CRC32C u32 of header+body, 0u32,
//!          "SNAPEND\0"
//! ```
//!
//! The file is written as `<name>.tmp`, fsynced, renamed, and the directory
//! fsynced: a snapshot either exists complete or not at all. The CRC (and
//! the end line's counts) let recovery refuse a damaged one and fall back.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use rstmdb_wal::storage::{Disk, Storage};

use crate::ctx::Ctx;
use crate::definition::MachineDef;
use crate::engine::{Engine, EngineLimits, Instance, SnapCursor};
use crate::idempotency::Cached;

const MAGIC: &[u8; 8] = b"RSTMSNAP";
const END_MAGIC: &[u8; 8] = b"SNAPEND\0";
const FORMAT: u32 = 1;
const HEADER: usize = 32;
const TRAILER: usize = 24;
/// zstd level: fast; snapshots are written while serving.
const ZSTD_LEVEL: i32 = 1;
/// Bytes of serialized lines handed to the writer thread at a time.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks in flight to the writer thread (bounds the memory a snapshot
/// holds when the disk is slower than the shard).
const CHUNKS_IN_FLIGHT: usize = 8;

/// Snapshot failures.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Filesystem error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// File involved.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a complete, intact snapshot of this shard.
    #[error("snapshot {path} is unusable: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A durable snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Full path.
    pub path: PathBuf,
    /// Every record below this offset is in the snapshot, none at or above.
    pub start_offset: u64,
    /// File size.
    pub size: u64,
    /// CRC32C of the file's header and body, 8 lowercase hex digits.
    pub checksum: String,
}

/// File name of the snapshot starting at `start` (sorts by offset).
pub fn file_name(start: u64) -> String {
    format!("snap-{start:020}.snap")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// Snapshot files in `dir`, newest (highest start offset) first. Leftover
/// `.tmp` files of interrupted snapshots are removed.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    list_on(&Disk, dir, true)
}

/// [`list`], removing the leftovers only when `remove_leftovers` (the
/// offline tools look without touching anything).
pub fn list_files(
    dir: &Path,
    remove_leftovers: bool,
) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    list_on(&Disk, dir, remove_leftovers)
}

/// [`list_files`] on any [`Storage`].
pub fn list_on<S: Storage>(
    storage: &S,
    dir: &Path,
    remove_leftovers: bool,
) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    let mut out = Vec::new();
    let names = match storage.read_dir(dir) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("listing snapshots in", dir)(e)),
    };
    for name in names {
        if name.ends_with(".tmp") {
            if remove_leftovers {
                let _ = storage.remove(&dir.join(&name));
            }
        } else if let Some(start) = parse_name(&name) {
            out.push((start, dir.join(&name)));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

// ---- lines ---------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct MetaLine {
    format: u32,
    shard: u32,
    start_offset: u64,
    created_at: i64,
    aborted: Vec<String>,
    /// Committed atomic batches (see `Engine::committed`).
    #[serde(default)]
    committed: Vec<(String, u64)>,
    /// Records the shard had written when the snapshot started (WAL_STATS
    /// `entry_count` must not shrink when compaction deletes segments).
    #[serde(default)]
    wal_records: u64,
}

#[derive(Serialize)]
struct MachineOut<'a> {
    machine: &'a str,
    version: u32,
    checksum: &'a str,
    definition: &'a Value,
}

#[derive(Deserialize)]
struct MachineIn {
    machine: String,
    version: u32,
    checksum: String,
    definition: Value,
}

#[derive(Serialize)]
struct InstanceOut<'a> {
    id: &'a str,
    machine: &'a str,
    version: u32,
    state: &'a str,
    ctx: &'a Ctx,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_event_id: Option<&'a str>,
    last_wal_offset: u64,
    created_offset: u64,
    created_at: i64,
    updated_at: i64,
    deleted: bool,
}

#[derive(Deserialize)]
struct InstanceIn<'a> {
    id: String,
    #[serde(borrow)]
    machine: std::borrow::Cow<'a, str>,
    version: u32,
    #[serde(borrow)]
    state: std::borrow::Cow<'a, str>,
    ctx: Ctx,
    #[serde(default)]
    last_event_id: Option<String>,
    last_wal_offset: u64,
    created_offset: u64,
    created_at: i64,
    updated_at: i64,
    deleted: bool,
}

/// One idempotency entry: `incarnation`, `from_state` and `ctx` only for
/// applies.
#[derive(Serialize, Deserialize)]
struct IdemLine<'a> {
    id: std::borrow::Cow<'a, str>,
    key: std::borrow::Cow<'a, str>,
    at: i64,
    wal_offset: u64,
    state: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incarnation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from_state: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ctx: Option<Ctx>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug, Default)]
struct EndLine {
    machines: u64,
    instances: u64,
    idempotency: u64,
}

fn push_line<T: Serialize>(out: &mut Vec<u8>, tag: u8, v: &T) {
    out.push(tag);
    out.push(b' ');
    serde_json::to_writer(&mut *out, v).expect("snapshot line serialization cannot fail");
    out.push(b'\n');
}

fn push_instance(out: &mut Vec<u8>, id: &str, i: &Instance) {
    push_line(
        out,
        b'I',
        &InstanceOut {
            id,
            machine: &i.machine,
            version: i.version,
            state: &i.state,
            ctx: &i.ctx,
            last_event_id: i.last_event_id.as_deref(),
            last_wal_offset: i.last_wal_offset,
            created_offset: i.created_offset,
            created_at: i.created_at,
            updated_at: i.updated_at,
            deleted: i.deleted,
        },
    );
}

fn push_idem(out: &mut Vec<u8>, id: &str, key: &str, c: &Cached, at: i64) {
    use std::borrow::Cow::Borrowed;
    let line = match c {
        Cached::Create { state, wal_offset } => IdemLine {
            id: Borrowed(id),
            key: Borrowed(key),
            at,
            wal_offset: *wal_offset,
            state: Borrowed(state),
            incarnation: None,
            from_state: None,
            ctx: None,
        },
        Cached::Apply {
            incarnation,
            from_state,
            to_state,
            ctx,
            wal_offset,
        } => IdemLine {
            id: Borrowed(id),
            key: Borrowed(key),
            at,
            wal_offset: *wal_offset,
            state: Borrowed(to_state),
            incarnation: Some(*incarnation),
            from_state: Some(Borrowed(from_state)),
            ctx: Some(ctx.clone()),
        },
    };
    push_line(out, b'K', &line);
}

// ---- writing -------------------------------------------------------------

enum SinkMsg {
    Data(Vec<u8>),
    Finish,
}

/// Computes the CRC of everything written through it.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Appends to a file of a [`Storage`] (buffered by the caller).
struct Appender<'a, S: Storage> {
    storage: &'a S,
    path: &'a Path,
    pos: u64,
}

impl<S: Storage> Write for Appender<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.storage.write_at(self.path, self.pos, buf)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writer thread: compresses chunks into `<name>.tmp`; on `Finish`
/// writes the trailer, fsyncs, renames and fsyncs the directory. If the
/// shard goes away without `Finish`, the temporary file is removed.
fn write_file<S: Storage>(
    storage: &S,
    dir: PathBuf,
    shard: u32,
    start: u64,
    rx: flume::Receiver<SinkMsg>,
) -> Result<Option<SnapshotFile>, SnapshotError> {
    create_dir(storage, &dir)?;
    let path = dir.join(file_name(start));
    let tmp = path.with_extension("tmp");
    let result = write_and_place(storage, &dir, &path, &tmp, shard, start, &rx);
    if !matches!(result, Ok(Some(_))) {
        let _ = storage.remove(&tmp);
    }
    result
}

/// Syncs `dir` so that the entries made in it survive a power loss.
fn sync_dir<S: Storage>(storage: &S, dir: &Path) -> Result<(), SnapshotError> {
    storage
        .sync_dir(dir)
        .map_err(io_err("syncing directory", dir))
}

/// Creates the snapshot directory if missing, syncing its parent.
fn create_dir<S: Storage>(storage: &S, dir: &Path) -> Result<(), SnapshotError> {
    if !storage.exists(dir) {
        storage
            .create_dir_all(dir)
            .map_err(io_err("creating", dir))?;
        // The new directory's entry must survive a power loss too.
        if let Some(parent) = dir.parent() {
            sync_dir(storage, parent)?;
        }
    }
    Ok(())
}

/// Writes `tmp` whole and makes it durable as `path`; `None` when the
/// shard went away without `Finish` (the caller removes `tmp`).
fn write_and_place<S: Storage>(
    storage: &S,
    dir: &Path,
    path: &Path,
    tmp: &Path,
    shard: u32,
    start: u64,
    rx: &flume::Receiver<SinkMsg>,
) -> Result<Option<SnapshotFile>, SnapshotError> {
    let out = create_tmp(storage, tmp, shard, start)?;
    let Some(out) = compress_chunks(out, tmp, rx)? else {
        return Ok(None);
    };
    let crc = write_trailer(out, tmp)?;
    let size = place(storage, dir, tmp, path)?;
    Ok(Some(SnapshotFile {
        path: path.to_path_buf(),
        start_offset: start,
        size,
        checksum: format!("{crc:08x}"),
    }))
}

/// The temporary file's writer: buffered, counting length and CRC.
type TmpWriter<'a, S> = CrcWriter<BufWriter<Appender<'a, S>>>;

/// Creates `tmp` and writes the header through a fresh CRC.
fn create_tmp<'a, S: Storage>(
    storage: &'a S,
    tmp: &'a Path,
    shard: u32,
    start: u64,
) -> Result<TmpWriter<'a, S>, SnapshotError> {
    storage.create_file(tmp).map_err(io_err("creating", tmp))?;
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT.to_le_bytes());
    header.extend_from_slice(&shard.to_le_bytes());
    header.extend_from_slice(&start.to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes());
    let file = Appender {
        storage,
        path: tmp,
        pos: 0,
    };
    let mut out = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: 0,
        len: 0,
    };
    out.write_all(&header).map_err(io_err("writing", tmp))?;
    Ok(out)
}

/// Streams the shard's chunks through zstd until `Finish`; `None` if the
/// shard went away first.
fn compress_chunks<'a, S: Storage>(
    out: TmpWriter<'a, S>,
    tmp: &Path,
    rx: &flume::Receiver<SinkMsg>,
) -> Result<Option<TmpWriter<'a, S>>, SnapshotError> {
    let mut z = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)
        .map_err(io_err("starting compression for", tmp))?;
    let mut finished = false;
    while let Ok(msg) = rx.recv() {
        match msg {
            SinkMsg::Data(d) => z.write_all(&d).map_err(io_err("writing", tmp))?,
            SinkMsg::Finish => {
                finished = true;
                break;
            }
        }
    }
    if !finished {
        return Ok(None);
    }
    let out = z.finish().map_err(io_err("writing", tmp))?;
    Ok(Some(out))
}

/// Appends the trailer (outside the CRC it records) and flushes; returns
/// the CRC.
fn write_trailer<S: Storage>(mut out: TmpWriter<'_, S>, tmp: &Path) -> Result<u32, SnapshotError> {
    let body = out.len - HEADER as u64;
    let crc = out.crc;
    let mut trailer = Vec::with_capacity(TRAILER);
    trailer.extend_from_slice(&body.to_le_bytes());
    trailer.extend_from_slice(&crc.to_le_bytes());
    trailer.extend_from_slice(&0u32.to_le_bytes());
    trailer.extend_from_slice(END_MAGIC);
    out.inner
        .write_all(&trailer)
        .map_err(io_err("writing", tmp))?;
    out.inner
        .into_inner()
        .map_err(|e| io_err("writing", tmp)(e.into_error()))?;
    Ok(crc)
}

/// Fsyncs `tmp`, renames it to `path` and fsyncs `dir`: the snapshot
/// exists complete or not at all. Returns the file's size.
fn place<S: Storage>(
    storage: &S,
    dir: &Path,
    tmp: &Path,
    path: &Path,
) -> Result<u64, SnapshotError> {
    storage.sync_file(tmp).map_err(io_err("syncing", tmp))?;
    let size = storage.len(tmp).map_err(io_err("reading size of", tmp))?;
    storage.rename(tmp, path).map_err(io_err("renaming", tmp))?;
    sync_dir(storage, dir)?;
    Ok(size)
}

/// Makes the calling thread yield the CPU to the shards: compression is
/// background work, and on a machine with as many busy threads as cores
/// it would otherwise take time slices from request processing.
pub(crate) fn lower_priority() {
    // SAFETY: setpriority with PRIO_PROCESS and who = 0 affects only the
    // calling thread on Linux; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::debug!("could not lower the snapshot thread's priority");
    }
}

/// What a step of a snapshot did.
#[derive(Debug)]
pub enum Step {
    /// More to do; call again on a later turn.
    More,
    /// The writer thread is behind: wait a little before the next step.
    Blocked,
    /// Everything is handed to the writer thread; its result arrives on
    /// the returned channel.
    Finished(flume::Receiver<Result<SnapshotFile, String>>),
    /// The snapshot could not stay point-in-time and was abandoned.
    Abandoned(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Instances,
    Idempotency,
    Done,
}

/// A snapshot in progress on a shard (see the module doc).
pub struct SnapshotJob {
    start: u64,
    phase: Phase,
    idem_next: u64,
    idem_end: u64,
    counts: EndLine,
    buf: Vec<u8>,
    tx: Option<flume::Sender<SinkMsg>>,
    done: flume::Receiver<Result<SnapshotFile, String>>,
}

impl SnapshotJob {
    /// Starts a snapshot of `engine` covering every record below `start`
    /// (the shard must have applied all of them and none above). Starts
    /// the writer thread.
    pub fn begin(
        engine: &mut Engine,
        dir: PathBuf,
        shard: u32,
        start: u64,
        now: i64,
        wal_records: u64,
    ) -> Self {
        Self::begin_on(Disk, engine, dir, shard, start, now, wal_records)
    }

    /// [`SnapshotJob::begin`] writing to any [`Storage`].
    pub fn begin_on<S: Storage>(
        storage: S,
        engine: &mut Engine,
        dir: PathBuf,
        shard: u32,
        start: u64,
        now: i64,
        wal_records: u64,
    ) -> Self {
        assert!(engine.snap.is_none(), "one snapshot at a time");
        engine.snap = Some(SnapCursor {
            next: 0,
            end: engine.instances.len(),
            ..SnapCursor::default()
        });
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
        push_meta(&mut buf, engine, shard, start, now, wal_records);
        let counts = EndLine {
            machines: push_machines(&mut buf, engine),
            ..EndLine::default()
        };
        let (tx, done) = match spawn_writer(storage, dir, shard, start) {
            Ok(writer) => writer,
            Err(e) => return Self::not_started(start, counts, buf, e),
        };
        SnapshotJob {
            start,
            phase: Phase::Instances,
            idem_next: 0,
            idem_end: engine.idempotency.next_seq(),
            counts,
            buf,
            tx: Some(tx),
            done,
        }
    }

    /// A job that is already `Done`, its result the writer thread's
    /// failure to start.
    fn not_started(start: u64, counts: EndLine, buf: Vec<u8>, e: std::io::Error) -> Self {
        let (done_tx, done_rx) = flume::bounded(1);
        let _ = done_tx.send(Err(format!("cannot start the snapshot thread: {e}")));
        SnapshotJob {
            start,
            phase: Phase::Done,
            idem_next: 0,
            idem_end: 0,
            counts,
            buf,
            tx: None,
            done: done_rx,
        }
    }

    /// The snapshot's start offset.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Serializes for about `budget`, handing full chunks to the writer.
    pub fn step(&mut self, engine: &mut Engine, budget: Duration) -> Step {
        if let Some(why) = engine.snap.as_ref().and_then(|s| s.broken) {
            self.abandon(engine);
            return Step::Abandoned(why);
        }
        if self.phase == Phase::Done {
            engine.snap = None;
            return Step::Finished(self.done.clone());
        }
        let Some(tx) = self.tx.clone() else {
            unreachable!("a job without a writer is Done")
        };
        if tx.is_full() {
            return Step::Blocked;
        }
        self.fill(engine, budget);
        if !self.buf.is_empty() && (self.buf.len() >= CHUNK_BYTES || self.phase == Phase::Done) {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES + 65536));
            if tx.try_send(SinkMsg::Data(chunk)).is_err() {
                // The writer thread died (its error is in `done`).
                self.abandon(engine);
                return Step::Finished(self.done.clone());
            }
        }
        if self.phase == Phase::Done {
            return self.finish(engine);
        }
        Step::More
    }

    /// Serializes slices until a chunk is full, the budget is spent or the body ends.
    fn fill(&mut self, engine: &mut Engine, budget: Duration) {
        let began = Instant::now();
        // At least one slice per step, however small the budget.
        let mut first = true;
        while first || (self.buf.len() < CHUNK_BYTES && began.elapsed() < budget) {
            first = false;
            match self.phase {
                Phase::Instances => self.fill_instances(engine),
                Phase::Idempotency => {
                    if self.fill_idempotency(engine) {
                        break;
                    }
                }
                Phase::Done => break,
            }
        }
    }

    /// Up to 256 instances, each as it was when the snapshot began (its shadow, if changed since).
    fn fill_instances(&mut self, engine: &mut Engine) {
        let snap = engine.snap.as_mut().expect("set by begin");
        let stop = (snap.next + 256).min(snap.end);
        while snap.next < stop && self.buf.len() < CHUNK_BYTES {
            let i = snap.next;
            snap.next += 1;
            let (id, current) = engine.instances.get_index(i).expect("below end");
            let value = snap.shadow.remove(&i);
            push_instance(&mut self.buf, id, value.as_ref().unwrap_or(current));
            self.counts.instances += 1;
        }
        if snap.next == snap.end {
            debug_assert!(snap.shadow.is_empty());
            self.phase = Phase::Idempotency;
        }
    }

    /// Up to 256 idempotency entries; at the window's end, the end line. True once done.
    fn fill_idempotency(&mut self, engine: &Engine) -> bool {
        let buf = &mut self.buf;
        let counts = &mut self.counts;
        self.idem_next =
            engine
                .idempotency
                .visit_from(self.idem_next, self.idem_end, 256, |id, key, c, at| {
                    push_idem(buf, id, key, c, at);
                    counts.idempotency += 1;
                });
        if self.idem_next >= self.idem_end {
            push_line(&mut self.buf, b'E', &self.counts);
            self.phase = Phase::Done;
            return true;
        }
        false
    }

    /// Ends the job: releases the engine and tells the writer to sync and rename.
    fn finish(&mut self, engine: &mut Engine) -> Step {
        engine.snap = None;
        let tx = self.tx.take().expect("present until done");
        if tx.send(SinkMsg::Finish).is_err() {
            tracing::debug!("snapshot writer gone before finish");
        }
        Step::Finished(self.done.clone())
    }

    /// Gives up: the writer thread removes its temporary file.
    pub fn abandon(&mut self, engine: &mut Engine) {
        engine.snap = None;
        self.tx = None;
        self.phase = Phase::Done;
    }
}

/// The meta line (`H`), first in the body; aborted batch ids sorted so
/// that equal states give equal files.
fn push_meta(
    buf: &mut Vec<u8>,
    engine: &Engine,
    shard: u32,
    start: u64,
    now: i64,
    wal_records: u64,
) {
    let mut aborted: Vec<String> = engine.aborted.iter().cloned().collect();
    aborted.sort_unstable();
    push_line(
        buf,
        b'H',
        &MetaLine {
            format: FORMAT,
            shard,
            start_offset: start,
            created_at: now,
            aborted,
            committed: engine.committed.clone(),
            wal_records,
        },
    );
}

/// One `M` line per machine version, by name; returns how many.
fn push_machines(buf: &mut Vec<u8>, engine: &Engine) -> u64 {
    let mut machines = 0;
    let mut names: Vec<&String> = engine.machines.keys().collect();
    names.sort_unstable();
    for name in names {
        for (v, def) in &engine.machines[name] {
            push_line(
                buf,
                b'M',
                &MachineOut {
                    machine: name,
                    version: *v,
                    checksum: def.checksum(),
                    definition: def.normalized(),
                },
            );
            machines += 1;
        }
    }
    machines
}

/// The receiving end of a snapshot's result.
type Done = flume::Receiver<Result<SnapshotFile, String>>;

/// Starts the writer thread (at a lower priority); returns where to send
/// it chunks and where its result arrives.
fn spawn_writer<S: Storage>(
    storage: S,
    dir: PathBuf,
    shard: u32,
    start: u64,
) -> std::io::Result<(flume::Sender<SinkMsg>, Done)> {
    let (tx, rx) = flume::bounded(CHUNKS_IN_FLIGHT);
    let (done_tx, done) = flume::bounded(1);
    std::thread::Builder::new()
        .name(format!("snapshot-{shard}"))
        .spawn(move || {
            lower_priority();
            let r = match write_file(&storage, dir, shard, start, rx) {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err("snapshot abandoned".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            let _ = done_tx.send(r);
        })?;
    Ok((tx, done))
}

/// Writes a snapshot of `engine` in one go, waiting until it is durable:
/// for an engine nothing else is using (re-sharding at start-up).
pub fn write_blocking(
    engine: &mut Engine,
    dir: PathBuf,
    shard: u32,
    start: u64,
    now: i64,
    wal_records: u64,
) -> Result<SnapshotFile, String> {
    let mut job = SnapshotJob::begin(engine, dir, shard, start, now, wal_records);
    loop {
        match job.step(engine, Duration::from_millis(50)) {
            Step::More => {}
            Step::Blocked => std::thread::sleep(Duration::from_millis(1)),
            Step::Finished(done) => {
                return done
                    .recv()
                    .map_err(|_| "snapshot writer vanished".to_string())?
            }
            Step::Abandoned(why) => return Err(why.to_owned()),
        }
    }
}

/// Stores a snapshot file received whole (from a cluster's leader) as the
/// snapshot of `start` in `dir`: written beside, synced, renamed into
/// place, the directory synced. The caller verifies it by loading it.
pub fn store_received(dir: &Path, start: u64, bytes: &[u8]) -> Result<PathBuf, SnapshotError> {
    use std::io::Write as _;
    let path = dir.join(file_name(start));
    let tmp = path.with_extension("tmp");
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let mut f = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
    Disk.sync_dir(dir)
        .map_err(io_err("syncing directory", dir))?;
    Ok(path)
}

// ---- reading -------------------------------------------------------------

/// Header fields checked without reading the whole file.
fn check_frame(path: &Path, bytes: &[u8], shard: u32) -> Result<(u64, u32), SnapshotError> {
    let bad = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER + TRAILER {
        return Err(bad(format!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    if u32_at(8) != FORMAT {
        return Err(bad(format!("unknown format {}", u32_at(8))));
    }
    if u32_at(12) != shard {
        return Err(bad(format!("belongs to shard {}, not {shard}", u32_at(12))));
    }
    let start = u64_at(16);
    let t = bytes.len() - TRAILER;
    if &bytes[t + 16..] != END_MAGIC {
        return Err(bad("incomplete (no end marker)".into()));
    }
    let body = u64_at(t);
    if body != (t - HEADER) as u64 {
        return Err(bad(format!(
            "body length {body} does not match the file ({})",
            t - HEADER
        )));
    }
    let crc = u32_at(t + 8);
    let actual = crc32c::crc32c(&bytes[..t]);
    if crc != actual {
        return Err(bad(format!(
            "checksum mismatch (stored {crc:08x}, computed {actual:08x})"
        )));
    }
    Ok((start, crc))
}

/// A loaded snapshot.
pub struct Loaded {
    /// The engine state at `start_offset`.
    pub engine: Engine,
    /// Every record below this is in `engine`.
    pub start_offset: u64,
    /// Instances loaded (tombstones included).
    pub instances: u64,
    /// Records the shard had written when the snapshot started.
    pub wal_records: u64,
}

/// Loads and verifies a snapshot of shard `shard`.
pub fn load(path: &Path, shard: u32, limits: &EngineLimits) -> Result<Loaded, SnapshotError> {
    load_on(&Disk, path, shard, limits)
}

/// [`load`] from any [`Storage`].
pub fn load_on<S: Storage>(
    storage: &S,
    path: &Path,
    shard: u32,
    limits: &EngineLimits,
) -> Result<Loaded, SnapshotError> {
    let bytes = storage.read(path).map_err(io_err("reading", path))?;
    let (start, _) = check_frame(path, &bytes, shard)?;
    let body = &bytes[HEADER..bytes.len() - TRAILER];
    let decoder =
        zstd::stream::read::Decoder::new(body).map_err(|e| corrupt(path, e.to_string()))?;
    let mut reader = BufReader::with_capacity(1 << 20, decoder);
    let mut loading = Loading {
        path,
        shard,
        start,
        engine: Engine::new(limits),
        counts: EndLine::default(),
        end: None,
        saw_meta: false,
        wal_records: 0,
    };
    loading.read_lines(&mut reader)?;
    // The reader must have consumed the whole zstd stream.
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    loading.finish()
}

/// A snapshot body's reason to be refused, for `path`.
fn corrupt(path: &Path, reason: String) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// A snapshot being loaded: the engine so far and what its lines counted.
struct Loading<'a> {
    path: &'a Path,
    shard: u32,
    start: u64,
    engine: Engine,
    counts: EndLine,
    end: Option<EndLine>,
    saw_meta: bool,
    wal_records: u64,
}

impl Loading<'_> {
    /// This snapshot refused, for `reason`.
    fn bad(&self, reason: String) -> SnapshotError {
        corrupt(self.path, reason)
    }

    /// A line `n` that is not the JSON its tag promises.
    fn parse_err(&self, n: u64, e: serde_json::Error) -> SnapshotError {
        self.bad(format!("line {n}: {e}"))
    }

    /// Reads the decompressed body line by line (`n` counts from 1), each
    /// checked for shape before its kind is loaded.
    fn read_lines<R: BufRead>(&mut self, reader: &mut R) -> Result<(), SnapshotError> {
        let mut line = Vec::with_capacity(4096);
        let mut n = 0u64;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.bad(format!("decompressing: {e}")))?;
            if read == 0 {
                return Ok(());
            }
            n += 1;
            if self.end.is_some() {
                return Err(self.bad(format!("data after the end line (line {n})")));
            }
            if line.len() < 3 || line[1] != b' ' || line.last() != Some(&b'\n') {
                return Err(self.bad(format!("malformed line {n}")));
            }
            self.line(line[0], &line[2..line.len() - 1], n)?;
        }
    }

    /// One line by its tag: the meta line first, then the others.
    fn line(&mut self, tag: u8, json: &[u8], n: u64) -> Result<(), SnapshotError> {
        match (tag, self.saw_meta) {
            (b'H', false) => self.meta(json, n),
            (b'M', true) => self.machine(json, n),
            (b'I', true) => self.instance(json, n),
            (b'K', true) => self.idempotency(json, n),
            (b'E', true) => {
                self.end = Some(serde_json::from_slice(json).map_err(|e| self.parse_err(n, e))?);
                Ok(())
            }
            (tag, _) => Err(self.bad(format!("unexpected line {n} (tag {:?})", char::from(tag)))),
        }
    }

    /// The meta line must agree with the header.
    fn meta(&mut self, json: &[u8], n: u64) -> Result<(), SnapshotError> {
        let m: MetaLine = serde_json::from_slice(json).map_err(|e| self.parse_err(n, e))?;
        if m.format != FORMAT || m.shard != self.shard || m.start_offset != self.start {
            return Err(self.bad("meta line does not match the header".into()));
        }
        self.engine.aborted.extend(m.aborted);
        self.engine.committed = m.committed;
        self.wal_records = m.wal_records;
        self.saw_meta = true;
        Ok(())
    }

    /// A machine version, its definition checked against its checksum.
    fn machine(&mut self, json: &[u8], n: u64) -> Result<(), SnapshotError> {
        let m: MachineIn = serde_json::from_slice(json).map_err(|e| self.parse_err(n, e))?;
        let def = MachineDef::from_json(&m.definition)
            .map_err(|e| self.bad(format!("machine {} v{}: {e}", m.machine, m.version)))?;
        if def.checksum() != m.checksum {
            return Err(self.bad(format!(
                "machine {} v{}: checksum {} does not match {}",
                m.machine,
                m.version,
                def.checksum(),
                m.checksum
            )));
        }
        self.engine
            .machines
            .entry(m.machine)
            .or_default()
            .insert(m.version, Arc::new(def));
        self.counts.machines += 1;
        Ok(())
    }

    /// An instance, which must predate the snapshot and appear once.
    fn instance(&mut self, json: &[u8], n: u64) -> Result<(), SnapshotError> {
        let i: InstanceIn<'_> = serde_json::from_slice(json).map_err(|e| self.parse_err(n, e))?;
        let start = self.start;
        if i.last_wal_offset >= start.max(1) {
            return Err(self.bad(format!(
                "instance {} is at offset {}, not below the snapshot's {start}",
                i.id, i.last_wal_offset
            )));
        }
        let engine = &mut self.engine;
        let (machine, state) = (engine.intern(&i.machine), engine.intern(&i.state));
        let prev = engine.instances.insert(
            i.id,
            Instance {
                machine,
                version: i.version,
                state,
                ctx: i.ctx,
                last_event_id: i.last_event_id,
                last_wal_offset: i.last_wal_offset,
                created_offset: i.created_offset,
                created_at: i.created_at,
                updated_at: i.updated_at,
                deleted: i.deleted,
            },
        );
        if prev.is_some() {
            return Err(self.bad(format!("instance listed twice (line {n})")));
        }
        self.counts.instances += 1;
        Ok(())
    }

    /// An idempotency entry: a create's, or an apply's with all its parts.
    fn idempotency(&mut self, json: &[u8], n: u64) -> Result<(), SnapshotError> {
        let k: IdemLine<'_> = serde_json::from_slice(json).map_err(|e| self.parse_err(n, e))?;
        let cached = match (k.incarnation, k.from_state, k.ctx) {
            (None, None, None) => Cached::Create {
                state: k.state.into_owned(),
                wal_offset: k.wal_offset,
            },
            (Some(incarnation), Some(from), Some(ctx)) => Cached::Apply {
                incarnation,
                from_state: from.into_owned(),
                to_state: k.state.into_owned(),
                ctx,
                wal_offset: k.wal_offset,
            },
            _ => return Err(self.bad(format!("line {n}: incomplete idempotency entry"))),
        };
        let _ = self.engine.idempotency.insert(&k.id, &k.key, cached, k.at);
        self.counts.idempotency += 1;
        Ok(())
    }

    /// The end line must be there and match what was loaded.
    fn finish(self) -> Result<Loaded, SnapshotError> {
        let Loading {
            path,
            start,
            mut engine,
            counts,
            end,
            wal_records,
            ..
        } = self;
        match end {
            Some(e) if e == counts => {}
            Some(e) => {
                return Err(corrupt(
                    path,
                    format!("counts {counts:?} do not match the end line {e:?}"),
                ))
            }
            None => return Err(corrupt(path, "no end line".into())),
        }
        engine.max_offset = start.saturating_sub(1);
        Ok(Loaded {
            engine,
            start_offset: start,
            instances: counts.instances,
            wal_records,
        })
    }
}

/// Reads just the checksum and start offset of a snapshot file (verifying
/// its CRC).
pub fn verify(path: &Path, shard: u32) -> Result<(u64, String), SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    let (start, crc) = check_frame(path, &bytes, shard)?;
    Ok((start, format!("{crc:08x}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{ApplyEvent, Command, Reply};
    use crate::engine::Offsets;
    use serde_json::json;

    fn limits() -> EngineLimits {
        EngineLimits {
            idempotency_entries: 1000,
            idempotency_max_age_ms: 0,
        }
    }

    /// A test engine and its next free offset.
    struct T {
        e: Engine,
        next: u64,
    }

    impl T {
        fn new() -> T {
            let mut t = T {
                e: Engine::new(&limits()),
                next: 1,
            };
            let def = json!({"states": ["a", "b"], "initial": "a", "transitions": [
                {"from": "a", "event": "GO", "to": "b"}, {"from": "b", "event": "GO", "to": "a"}]});
            t.run(Command::PutMachine {
                machine: "m".into(),
                version: 1,
                def: Ok(Arc::new(MachineDef::from_json(&def).unwrap())),
                raw: Arc::new(def),
                max_versions: 0,
            });
            t
        }

        fn run(&mut self, cmd: Command) -> Reply {
            let mut o = Offsets::new(self.next, self.next + 1);
            let r = self.e.execute(cmd, &mut o, 1_700_000_000_000);
            assert!(!matches!(r, Reply::Error(_)), "{r:?}");
            for s in self.e.take_staged() {
                self.next = self.next.max(s.offset + 1);
            }
            self.e.commit_done();
            r
        }

        fn create(&mut self, id: &str, n: i64) {
            self.run(Command::CreateInstance {
                instance_id: id.into(),
                machine: "m".into(),
                version: 1,
                initial_ctx: json!({"n": n}),
                idempotency_key: Some(format!("c-{id}")),
                allow_recreate: true,
            });
        }

        fn apply(&mut self, id: &str, n: i64) {
            self.run(Command::ApplyEvent(ApplyEvent {
                instance_id: id.into(),
                event: "GO".into(),
                payload: json!({"n": n}),
                expected_state: None,
                expected_wal_offset: None,
                event_id: Some(format!("ev-{n}")),
                idempotency_key: Some(format!("k-{n}")),
            }));
        }

        /// Runs a snapshot to the end, calling `between` after every step.
        fn snapshot(&mut self, dir: &Path, mut between: impl FnMut(&mut T)) -> SnapshotFile {
            let start = self.next;
            let mut job = SnapshotJob::begin(&mut self.e, dir.to_path_buf(), 0, start, 5, 0);
            loop {
                match job.step(&mut self.e, Duration::from_micros(1)) {
                    Step::More | Step::Blocked => between(self),
                    Step::Finished(done) => return done.recv().unwrap().unwrap(),
                    Step::Abandoned(why) => panic!("abandoned: {why}"),
                }
            }
        }
    }

    fn view(e: &Engine) -> Vec<(String, Instance)> {
        let mut v: Vec<(String, Instance)> = e
            .instances
            .iter()
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn round_trip_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = T::new();
        for i in 0..500 {
            t.create(&format!("i{i}"), i);
        }
        for i in 0..500 {
            t.apply(&format!("i{}", i % 37), i);
        }
        t.run(Command::DeleteInstance {
            instance_id: "i3".into(),
            idempotency_key: None,
        });
        t.e.aborted.insert("b-1".into());
        let f = t.snapshot(dir.path(), |_| {});
        assert_eq!(f.start_offset, t.next);
        let l = load(&f.path, 0, &limits()).unwrap();
        assert_eq!(view(&l.engine), view(&t.e));
        assert_eq!(l.instances, 500);
        assert_eq!(l.engine.max_offset, t.next - 1);
        assert!(l.engine.aborted.contains("b-1"));
        assert_eq!(l.engine.machine_defs().len(), 1);
        // The idempotency window came along: same entries, same answers.
        let mut a = Vec::new();
        t.e.idempotency
            .visit_from(0, u64::MAX, usize::MAX, |i, k, c, at| {
                a.push((i.to_owned(), k.to_owned(), c.clone(), at))
            });
        let mut b = Vec::new();
        l.engine
            .idempotency
            .visit_from(0, u64::MAX, usize::MAX, |i, k, c, at| {
                b.push((i.to_owned(), k.to_owned(), c.clone(), at))
            });
        assert_eq!(a.len(), 1000);
        assert_eq!(a, b);
        let (start, sum) = verify(&f.path, 0).unwrap();
        assert_eq!((start, sum), (f.start_offset, f.checksum));
    }

    #[test]
    fn changes_during_a_snapshot_do_not_leak_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = T::new();
        for i in 0..2000 {
            t.create(&format!("i{i}"), i);
        }
        let at_start = view(&t.e);
        let mut k = 10_000;
        let f = t.snapshot(dir.path(), |t| {
            // Touch early and late positions, recreate, delete, add.
            for id in ["i0", "i1999", "i1000"] {
                k += 1;
                t.apply(id, k);
            }
            k += 1;
            t.create(&format!("new{k}"), k);
            t.run(Command::DeleteInstance {
                instance_id: format!("i{}", k % 2000),
                idempotency_key: None,
            });
        });
        let l = load(&f.path, 0, &limits()).unwrap();
        assert_eq!(view(&l.engine), at_start);
        assert!(t.e.snap.is_none());
        assert_ne!(view(&t.e), at_start, "the live state did move on");
    }

    #[test]
    fn a_rolled_back_change_during_a_snapshot_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = T::new();
        for i in 0..600 {
            t.create(&format!("i{i}"), i);
        }
        let at_start = view(&t.e);
        let f = t.snapshot(dir.path(), |t| {
            let mark = t.e.mark();
            let mut o = Offsets::new(t.next, t.next + 2);
            t.e.execute(
                Command::ApplyEvent(ApplyEvent {
                    instance_id: "i599".into(),
                    event: "GO".into(),
                    payload: json!({"n": -1}),
                    expected_state: None,
                    expected_wal_offset: None,
                    event_id: None,
                    idempotency_key: None,
                }),
                &mut o,
                9,
            );
            t.e.rollback_to(mark);
        });
        assert_eq!(view(&load(&f.path, 0, &limits()).unwrap().engine), at_start);
    }

    #[test]
    fn flush_all_during_a_snapshot_abandons_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = T::new();
        for i in 0..600 {
            t.create(&format!("i{i}"), i);
        }
        let start = t.next;
        let mut job = SnapshotJob::begin(&mut t.e, dir.path().to_path_buf(), 0, start, 5, 0);
        assert!(matches!(
            job.step(&mut t.e, Duration::from_micros(1)),
            Step::More
        ));
        t.run(Command::FlushAll);
        assert!(matches!(
            job.step(&mut t.e, Duration::from_micros(1)),
            Step::Abandoned(_)
        ));
        assert!(t.e.snap.is_none());
        drop(job);
        // The writer thread removes its temporary file.
        for _ in 0..200 {
            if list(dir.path()).unwrap().is_empty()
                && std::fs::read_dir(dir.path()).unwrap().count() == 0
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("temporary snapshot file left behind");
    }

    #[test]
    fn damage_anywhere_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = T::new();
        for i in 0..50 {
            t.create(&format!("i{i}"), i);
        }
        let f = t.snapshot(dir.path(), |_| {});
        let good = std::fs::read(&f.path).unwrap();
        let mut positions: Vec<usize> = (0..good.len()).step_by(97).collect();
        positions.push(good.len() - 1);
        for pos in positions {
            let mut bad = good.clone();
            bad[pos] ^= 0x40;
            std::fs::write(&f.path, &bad).unwrap();
            assert!(
                matches!(
                    load(&f.path, 0, &limits()),
                    Err(SnapshotError::Corrupt { .. })
                ),
                "flip at {pos} went unnoticed"
            );
        }
        std::fs::write(&f.path, &good[..good.len() - 5]).unwrap();
        assert!(load(&f.path, 0, &limits()).is_err());
        std::fs::write(&f.path, &good).unwrap();
        assert!(load(&f.path, 1, &limits()).is_err(), "another shard's file");
        assert!(load(&f.path, 0, &limits()).is_ok());
    }

    #[test]
    fn names_sort_by_offset() {
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name("snap-1.snap"), None);
        let dir = tempfile::tempdir().unwrap();
        for o in [5u64, 300, 20] {
            std::fs::write(dir.path().join(file_name(o)), b"x").unwrap();
        }
        std::fs::write(dir.path().join("snap-x.tmp"), b"x").unwrap();
        let l: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(l, vec![300, 20, 5]);
        assert!(!dir.path().join("snap-x.tmp").exists());
    }
}

//! A group's Raft log on disk: the entries and hard state each Ready asks
//! to persist, appended to one file, and rebuilt from it after a crash.
//!
//! **Why a file of its own, beside the shard's WAL.** The WAL holds only
//! *committed* records, written when an entry is applied. So every WAL
//! reader — recovery, `WAL_READ`, watches, snapshots, compaction — keeps
//! its invariants unchanged (offsets grow, nothing is ever taken back),
//! and the uncommitted tail a new leader replaces never reaches it. The
//! price is a second write per drain (TiKV's shape, not Redpanda's); the
//! single-log design is recorded in `docs/ARCHITECTURE.md`.
//!
//! **Format.** An 8-byte magic, then frames `[len u32][crc32c u32][body]`
//! with a body of one kind byte and its fields (little-endian):
//! `BASE` (the compaction point: index, term), `ENTRY` (index, term, type,
//! context length, context, data) and `HARD` (term, vote, commit). The file
//! is only ever appended to; a later entry at index *i* replaces every
//! entry from *i* on, exactly as [`LogState::append`] does in memory. A
//! torn or corrupt tail (short frame, bad checksum) is cut off at open: a
//! Ready's write puts its entries before its hard state, so what survives
//! of it is a prefix that raft can start from (see [`super::Persist`]).
//!
//! **Compaction.** Once the file passes a size bound, it is rewritten with
//! the entries from a given index on (those the WAL may still need, and a
//! margin for lagging followers), written to a temporary file, synced and
//! renamed over the old one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::prelude::{Entry, EntryType, HardState};

use super::log::LogState;
use super::replica::Persist;

const MAGIC: &[u8; 8] = b"RSTRAFT1";
const FRAME_HEADER: usize = 8;
const KIND_BASE: u8 = 1;
const KIND_ENTRY: u8 = 2;
const KIND_HARD: u8 = 3;
/// A snapshot installed from the leader: the log restarts at its point.
const KIND_SNAP: u8 = 4;
/// Largest frame body accepted when reading back: an entry is one drain,
/// bounded well below this by the shard's drain limits.
const MAX_FRAME: usize = 256 << 20;

/// What can go wrong with the log file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// One group's log file, open for appends.
pub struct RaftStore {
    path: PathBuf,
    file: File,
    /// Bytes in the file (where the next frame goes).
    end: u64,
    /// Bytes written since the last sync.
    unsynced: bool,
    /// What it wrote and synced: (write calls, bytes, syncs).
    io: (u64, u64, u64),
}

impl RaftStore {
    /// Opens (or creates) the log in `dir` and rebuilds what it holds. A
    /// new log starts with `voters` as its configuration; so does a
    /// recovered one (membership changes are not logged yet).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<(RaftStore, LogState), StoreError> {
        let path = dir.join("raft.log");
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() < MAGIC.len() {
            // New, or torn before its magic was whole.
            file.set_len(0).map_err(io)?;
            file.write_all_at(MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(dir).map_err(io)?;
            bytes = MAGIC.to_vec();
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(StoreError::Corrupt {
                path,
                detail: "not a raft log (bad magic)".into(),
            });
        }
        let mut state = LogState::bootstrap(voters);
        let end = replay(&bytes, &mut state).map_err(|detail| StoreError::Corrupt {
            path: path.clone(),
            detail,
        })?;
        if end < bytes.len() as u64 {
            tracing::warn!(path = %path.display(), kept = end, dropped = bytes.len() as u64 - end, "cutting a torn raft log tail");
            file.set_len(end).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let store = RaftStore {
            path,
            file,
            end,
            unsynced: false,
            io: (0, 0, 0),
        };
        Ok((store, state))
    }

    /// Appends a Ready's write: its entries, then its hard state; synced
    /// when `sync` (the fsync policy says so, or raft needs it).
    pub fn write(&mut self, p: &Persist, sync: bool) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        if let Some(m) = &p.snapshot {
            frame(&mut buf, |b| {
                b.push(KIND_SNAP);
                b.extend_from_slice(&m.index.to_le_bytes());
                b.extend_from_slice(&m.term.to_le_bytes());
            });
        }
        for e in &p.entries {
            frame(&mut buf, |b| encode_entry(b, e));
        }
        if let Some(hs) = &p.hard_state {
            frame(&mut buf, |b| encode_hard(b, hs));
        }
        self.append(&buf)?;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes everything written durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced {
            self.file.sync_data().map_err(|source| StoreError::Io {
                path: self.path.clone(),
                source,
            })?;
            self.unsynced = false;
            self.io.2 += 1;
        }
        Ok(())
    }

    /// Write calls, bytes written and syncs since it was opened.
    pub fn io(&self) -> (u64, u64, u64) {
        self.io
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Whether the file holds nothing but its magic.
    pub fn is_empty(&self) -> bool {
        self.end == MAGIC.len() as u64
    }

    /// Rewrites the file with `state` from index `keep_from` on (and its
    /// hard state), and drops the entries before it from `state` too.
    pub fn compact(&mut self, state: &mut LogState, keep_from: u64) -> Result<(), StoreError> {
        state.compact_to(keep_from);
        self.rewrite(state)
    }

    /// Rewrites the file as `state`: its compaction point, entries and
    /// hard state (after a compaction, or a snapshot's installation).
    pub fn rewrite(&mut self, state: &LogState) -> Result<(), StoreError> {
        let mut buf = MAGIC.to_vec();
        frame(&mut buf, |b| {
            b.push(KIND_BASE);
            b.extend_from_slice(&state.snap_index.to_le_bytes());
            b.extend_from_slice(&state.snap_term.to_le_bytes());
        });
        for e in &state.entries {
            frame(&mut buf, |b| encode_entry(b, e));
        }
        frame(&mut buf, |b| encode_hard(b, &state.hard_state));
        let dir = self.path.parent().expect("the log lives in a directory");
        let tmp = self.path.with_extension("log.tmp");
        let io = |source| StoreError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        sync_dir(dir).map_err(io)?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        self.end = buf.len() as u64;
        self.unsynced = false;
        Ok(())
    }

    fn append(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(buf, self.end)
            .map_err(|source| StoreError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.end += buf.len() as u64;
        self.unsynced = true;
        self.io.0 += 1;
        self.io.1 += buf.len() as u64;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends one frame whose body `body` writes.
fn frame(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    body(buf);
    let len = (buf.len() - start - FRAME_HEADER) as u32;
    let crc = crc32c::crc32c(&buf[start + FRAME_HEADER..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_entry(b: &mut Vec<u8>, e: &Entry) {
    b.push(KIND_ENTRY);
    b.extend_from_slice(&e.index.to_le_bytes());
    b.extend_from_slice(&e.term.to_le_bytes());
    b.push(e.get_entry_type() as u8);
    b.extend_from_slice(&(e.context.len() as u32).to_le_bytes());
    b.extend_from_slice(&e.context);
    b.extend_from_slice(&e.data);
}

fn encode_hard(b: &mut Vec<u8>, hs: &HardState) {
    b.push(KIND_HARD);
    b.extend_from_slice(&hs.term.to_le_bytes());
    b.extend_from_slice(&hs.vote.to_le_bytes());
    b.extend_from_slice(&hs.commit.to_le_bytes());
}

/// What a log file's bytes hold: the log, and where its intact part ends
/// (what [`RaftStore::open`] keeps). Public for the fuzz target.
pub fn decode(bytes: &[u8], voters: &[u64]) -> Result<(LogState, u64), String> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a raft log (bad magic)".into());
    }
    let mut state = LogState::bootstrap(voters);
    let end = replay(bytes, &mut state)?;
    Ok((state, end))
}

/// Rebuilds `state` from the file's frames; returns where the intact part
/// ends (a torn or corrupt frame and everything after it are dropped). A
/// frame that is intact but impossible (an entry past the end of the log)
/// is corruption, not a torn write.
fn replay(bytes: &[u8], state: &mut LogState) -> Result<u64, String> {
    let mut pos = MAGIC.len();
    while let Some(body) = next_frame(bytes, pos) {
        apply_frame(body, state).map_err(|e| format!("frame at byte {pos}: {e}"))?;
        pos += FRAME_HEADER + body.len();
    }
    // A committed entry is never replaced, so the commit index stays in
    // the log whatever came after its hard state.
    if state.hard_state.commit > state.last_index() {
        return Err(format!(
            "commit index {} past the log's end {}",
            state.hard_state.commit,
            state.last_index()
        ));
    }
    Ok(pos as u64)
}

/// The body of the intact frame at `pos`, if there is one.
fn next_frame(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let header = bytes.get(pos..pos + FRAME_HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let body = bytes.get(pos + FRAME_HEADER..pos + FRAME_HEADER + len)?;
    (crc32c::crc32c(body) == crc).then_some(body)
}

/// Replays one frame onto the log state; a frame that cannot follow is an error.
fn apply_frame(body: &[u8], state: &mut LogState) -> Result<(), String> {
    let r = Fields(&body[1..]);
    match body[0] {
        KIND_BASE => apply_base(r, state),
        KIND_ENTRY => {
            let e = decode_entry(r)?;
            check_entry(&e, state)?;
            state.append(&[e]);
            Ok(())
        }
        KIND_SNAP => apply_snap(r, state),
        KIND_HARD => apply_hard(r, state),
        k => Err(format!("unknown frame kind {k}")),
    }
}

/// The compaction point, valid only as the first frame of a log.
fn apply_base(mut r: Fields, state: &mut LogState) -> Result<(), String> {
    let (index, term) = (r.u64()?, r.u64()?);
    if !state.entries.is_empty() || state.snap_index != 0 {
        return Err("a compaction point after entries".into());
    }
    state.snap_index = index;
    state.snap_term = term;
    state.hard_state.commit = state.hard_state.commit.max(index);
    Ok(())
}

/// An entry frame: index, term, type, context, then the data to the frame's end.
fn decode_entry(mut r: Fields) -> Result<Entry, String> {
    let mut e = Entry {
        index: r.u64()?,
        term: r.u64()?,
        ..Default::default()
    };
    let kind = r.u8()?;
    e.set_entry_type(match kind {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        k => return Err(format!("unknown entry type {k}")),
    });
    let ctx_len = r.u32()? as usize;
    e.context = r.take(ctx_len)?.to_vec().into();
    e.data = r.0.to_vec().into();
    Ok(e)
}

/// An entry may not lower the term, and must land inside the log or just past its end.
fn check_entry(e: &Entry, state: &LogState) -> Result<(), String> {
    let prev_term = match e.index - 1 {
        i if i == state.snap_index => state.snap_term,
        i if i > state.snap_index && i <= state.last_index() => {
            state.entries[(i - state.snap_index - 1) as usize].term
        }
        _ => 0,
    };
    if e.index > state.snap_index && e.term < prev_term {
        return Err(format!(
            "entry {} of term {} after term {prev_term}",
            e.index, e.term
        ));
    }
    if e.index <= state.snap_index || e.index > state.last_index() + 1 {
        return Err(format!(
            "entry {} outside the log {}..={}",
            e.index,
            state.snap_index + 1,
            state.last_index()
        ));
    }
    Ok(())
}

/// A snapshot install: the log restarts after it, keeping the current membership.
fn apply_snap(mut r: Fields, state: &mut LogState) -> Result<(), String> {
    let (index, term) = (r.u64()?, r.u64()?);
    if index < state.snap_index {
        return Err(format!("a snapshot at {index} behind the log's start"));
    }
    let mut meta = raft::prelude::SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    meta.set_conf_state(state.conf_state.clone());
    state.install(&meta);
    Ok(())
}

/// The hard state, whose commit index may not pass the log's end.
fn apply_hard(mut r: Fields, state: &mut LogState) -> Result<(), String> {
    state.hard_state.term = r.u64()?;
    state.hard_state.vote = r.u64()?;
    state.hard_state.commit = r.u64()?;
    if state.hard_state.commit > state.last_index() {
        return Err(format!(
            "commit index {} past the log's end {}",
            state.hard_state.commit,
            state.last_index()
        ));
    }
    Ok(())
}

/// Reads little-endian fields off a frame body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("frame too short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn persist(entries: Vec<Entry>, term: u64, commit: u64) -> Persist {
        Persist {
            number: 1,
            hard_state: Some(HardState {
                term,
                vote: 1,
                commit,
                ..Default::default()
            }),
            entries,
            must_sync: true,
            snapshot: None,
        }
    }

    #[test]
    fn reopens_with_replaced_tails_and_hard_state() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, st) = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(st.last_index(), 0);
        assert!(s.is_empty());
        s.write(
            &persist(
                vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")],
                1,
                1,
            ),
            true,
        )
        .unwrap();
        // A new leader replaces the uncommitted tail from index 2.
        s.write(&persist(vec![entry(2, 2, b"B")], 2, 2), false)
            .unwrap();
        drop(s);
        let (_, st) = RaftStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(st.last_index(), 2);
        assert_eq!(&st.entries[1].data[..], b"B");
        assert_eq!((st.hard_state.term, st.hard_state.commit), (2, 2));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = RaftStore::open(dir.path(), &[1]).unwrap();
        s.write(&persist(vec![entry(1, 1, b"first")], 1, 1), true)
            .unwrap();
        let whole = s.len();
        s.write(&persist(vec![entry(2, 1, b"second")], 1, 2), true)
            .unwrap();
        drop(s);
        // Tear the second write inside its entry frame.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("raft.log"))
            .unwrap();
        f.set_len(whole + 10).unwrap();
        let (s, st) = RaftStore::open(dir.path(), &[1]).unwrap();
        assert_eq!(s.len(), whole, "the torn frame is cut");
        assert_eq!((st.last_index(), st.hard_state.commit), (1, 1));
        // A flipped byte in an intact-length frame is a bad checksum: cut too.
        drop(s);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("raft.log"))
            .unwrap();
        f.write_all_at(b"X", whole - 3).unwrap();
        let (_, st) = RaftStore::open(dir.path(), &[1]).unwrap();
        assert_eq!(
            st.last_index(),
            1,
            "the entry frame before the hard state survives"
        );
        assert_eq!(st.hard_state.commit, 0);
    }

    #[test]
    fn compaction_keeps_the_tail_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, mut st) = RaftStore::open(dir.path(), &[1]).unwrap();
        let ents: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 5, b"x")).collect();
        let p = persist(ents.clone(), 3, 10);
        s.write(&p, true).unwrap();
        st.append(&ents);
        st.hard_state = p.hard_state.clone().unwrap();
        s.compact(&mut st, 7).unwrap();
        assert_eq!((st.snap_index, st.snap_term, st.last_index()), (6, 2, 10));
        s.write(&persist(vec![entry(11, 3, b"y")], 3, 11), true)
            .unwrap();
        drop(s);
        let (_, st) = RaftStore::open(dir.path(), &[1]).unwrap();
        assert_eq!((st.snap_index, st.snap_term), (6, 2));
        assert_eq!(st.entries.first().map(|e| e.index), Some(7));
        assert_eq!((st.last_index(), st.hard_state.commit), (11, 11));
    }

    #[test]
    fn an_installed_snapshot_restarts_the_log_at_its_point() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = RaftStore::open(dir.path(), &[1, 2]).unwrap();
        s.write(
            &persist(vec![entry(1, 1, b"a"), entry(2, 1, b"b")], 1, 1),
            true,
        )
        .unwrap();
        let snap = Persist {
            snapshot: Some(raft::prelude::SnapshotMetadata {
                index: 40,
                term: 3,
                ..Default::default()
            }),
            entries: vec![entry(41, 3, b"c")],
            ..Persist::default()
        };
        s.write(&snap, true).unwrap();
        drop(s);
        let (_, st) = RaftStore::open(dir.path(), &[1, 2]).unwrap();
        assert_eq!((st.snap_index, st.snap_term, st.last_index()), (40, 3, 41));
        assert_eq!(st.hard_state.commit, 40);
        assert_eq!(st.conf_state.voters, vec![1, 2]);
    }

    #[test]
    fn a_frame_past_the_end_of_the_log_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = RaftStore::open(dir.path(), &[1]).unwrap();
        s.write(&persist(vec![entry(5, 1, b"gap")], 1, 0), true)
            .unwrap();
        drop(s);
        let err = RaftStore::open(dir.path(), &[1]).err().expect("refused");
        assert!(err.to_string().contains("outside the log"), "{err}");
    }

    use proptest::prelude::*;

    proptest! {
        /// Writes of random entries (new leaders replacing tails) and hard
        /// states, cut at any byte: what opens is exactly the log after
        /// some prefix of the frames written.
        #[test]
        fn any_cut_opens_to_a_prefix_of_what_was_written(
            steps in proptest::collection::vec((0u64..3, 1usize..4, any::<bool>()), 1..12),
            cut in any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut s, _) = RaftStore::open(dir.path(), &[1]).unwrap();
            let mut expected = vec![(MAGIC.len() as u64, LogState::bootstrap(&[1]))];
            let mut model = LogState::bootstrap(&[1]);
            for (term, (back, n, hard)) in (2u64..).zip(steps) {
                let first = model.last_index().saturating_sub(back).max(model.snap_index) + 1;
                let ents: Vec<Entry> = (0..n as u64).map(|i| entry(first + i, term, b"d")).collect();
                let commit = model.hard_state.commit.min(first - 1);
                for e in &ents {
                    s.write(&Persist { entries: vec![e.clone()], ..Persist::default() }, false).unwrap();
                    model.append(std::slice::from_ref(e));
                    expected.push((s.len(), model.clone()));
                }
                if hard {
                    let hs = HardState { term, vote: 1, commit, ..Default::default() };
                    s.write(&Persist { hard_state: Some(hs.clone()), ..Persist::default() }, false).unwrap();
                    model.hard_state = hs;
                    expected.push((s.len(), model.clone()));
                }
            }
            drop(s);
            let path = dir.path().join("raft.log");
            let bytes = std::fs::read(&path).unwrap();
            let at = cut.index(bytes.len() + 1);
            let (state, end) = decode(&bytes[..at.max(MAGIC.len())], &[1]).unwrap();
            let (want_end, want) = expected.iter().rev().find(|(e, _)| *e as usize <= at.max(MAGIC.len())).unwrap();
            prop_assert_eq!(end, *want_end);
            prop_assert_eq!(state.entries, want.entries.clone());
            prop_assert_eq!(state.hard_state, want.hard_state.clone());
        }
    }
}

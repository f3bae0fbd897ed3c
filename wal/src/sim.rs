//! A simulated disk for deterministic fault and crash tests.
//!
//! It keeps, per file, what a crash could leave: the *durable* bytes (as of
//! the last `fsync`) and the writes made since, in order. Reads see every
//! write. [`SimDisk::crash`] then decides what survives, the way a power
//! loss may:
//!
//! * [`CrashMode::DropUnsynced`]: every write since the last sync is lost.
//! * [`CrashMode::Subset`]: each such write independently survives or not,
//!   and one that survives may be torn: cut at any byte (only a prefix
//!   reached the medium) or with any subset of its 512-byte sectors
//!   written, in any order relative to the other writes.
//!
//! Directory entries (creations, renames, removals) become durable with
//! `sync_dir` of their directory; at a crash, a random prefix of those not
//! yet synced survives (journaled metadata is applied in order).
//! Directories themselves are always durable once created (the WAL syncs
//! its directory's parent when it creates it).
//!
//! Faults: with [`Faults`] set, each operation of a kind fails with the
//! given probability: writes with `EIO` (a data write may leave a torn
//! prefix behind) or `ENOSPC`, syncs and reads with `EIO`. A capacity makes
//! writes that would grow the files past it fail with `ENOSPC`. Every
//! decision comes from one seeded generator, so a run is a pure function of
//! its seed (the WAL creates segments inline on a simulated disk for that
//! reason, see [`Storage::create_in_background`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{SegmentFile, Storage, WriteMode};

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The unit a device writes atomically; a torn multi-sector write may keep
/// any subset of its sectors.
const SECTOR: usize = 512;

/// Fault probabilities, per operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// A write (segment append or buffered write) fails with `EIO`.
    pub write_eio: f64,
    /// A write fails with `ENOSPC`.
    pub write_enospc: f64,
    /// An `fsync` (file or directory) fails with `EIO`.
    pub sync_eio: f64,
    /// A read fails with `EIO`.
    pub read_eio: f64,
}

/// What a crash keeps of the writes not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Nothing.
    DropUnsynced,
    /// Any subset, each write possibly torn at any byte.
    Subset,
}

/// Counters of what the simulation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Faults injected.
    pub faults: u64,
    /// Crashes simulated.
    pub crashes: u64,
    /// Unsynced writes a crash dropped.
    pub writes_lost: u64,
    /// Unsynced writes a crash tore.
    pub writes_torn: u64,
}

#[derive(Debug, Clone)]
enum FileOp {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
}

#[derive(Debug)]
struct State {
    rng: Rng,
    faults: Faults,
    capacity: Option<u64>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// Entry changes not yet synced, in order, with their directory.
    pending_dir: Vec<(PathBuf, DirOp)>,
    dirs: std::collections::BTreeSet<PathBuf>,
    stats: SimStats,
}

/// The simulated disk (cheap to clone: clones share one disk).
#[derive(Debug, Clone)]
pub struct SimDisk(Arc<Mutex<State>>);

fn enoent(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn injected(kind: &str) -> io::Error {
    match kind {
        "ENOSPC" => io::Error::from_raw_os_error(libc::ENOSPC),
        _ => io::Error::from_raw_os_error(libc::EIO),
    }
}

impl SimDisk {
    /// An empty disk whose decisions all derive from `seed`.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk(Arc::new(Mutex::new(State {
            rng: Rng::new(seed),
            faults: Faults::default(),
            capacity: None,
            inodes: HashMap::new(),
            next_ino: 1,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            pending_dir: Vec::new(),
            dirs: Default::default(),
            stats: SimStats::default(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the fault probabilities (all zero: no faults).
    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// Limits the bytes all files may hold together (`None`: unlimited).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state().capacity = bytes;
    }

    /// Bytes all files hold now.
    pub fn used(&self) -> u64 {
        self.state().used()
    }

    /// What the simulation did so far.
    pub fn stats(&self) -> SimStats {
        self.state().stats
    }

    /// Simulates a power loss: decides what of the unsynced writes and
    /// entries survives (see the module docs); afterwards everything on the
    /// disk is durable.
    pub fn crash(&self, mode: CrashMode) {
        let mut st = self.state();
        st.stats.crashes += 1;
        let st = &mut *st;
        // Entries: the durable ones plus a random prefix of the rest.
        let keep = match mode {
            CrashMode::DropUnsynced => 0,
            CrashMode::Subset => st.rng.below(st.pending_dir.len() as u64 + 1) as usize,
        };
        let mut names = st.durable_names.clone();
        for (_, op) in st.pending_dir.drain(..).take(keep) {
            match op {
                DirOp::Link(p, ino) => {
                    names.insert(p, ino);
                }
                DirOp::Unlink(p) => {
                    names.remove(&p);
                }
            }
        }
        // Contents.
        let mut inodes = HashMap::new();
        for ino in names.values() {
            let Some(node) = st.inodes.get(ino) else {
                continue;
            };
            let mut data = node.durable.clone();
            for op in &node.pending {
                let kept = mode == CrashMode::Subset && st.rng.chance(0.5);
                if !kept {
                    st.stats.writes_lost += 1;
                    continue;
                }
                match op {
                    FileOp::Write { pos, data: bytes } => {
                        if !st.rng.chance(0.3) {
                            write_into(&mut data, *pos, bytes);
                            continue;
                        }
                        st.stats.writes_torn += 1;
                        if st.rng.chance(0.5) {
                            // Cut at any byte: a prefix reached the medium.
                            let n = st.rng.below(bytes.len() as u64 + 1) as usize;
                            write_into(&mut data, *pos, &bytes[..n]);
                        } else {
                            // Any subset of its 512-byte sectors, in any
                            // order (a multi-block write is not ordered).
                            // Bytes of sectors lost keep their old content.
                            for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                                if st.rng.chance(0.5) {
                                    write_into(&mut data, pos + (i * SECTOR) as u64, sector);
                                } else if data.len() < (*pos as usize + i * SECTOR) {
                                    data.resize(*pos as usize + i * SECTOR, 0);
                                }
                            }
                        }
                    }
                    FileOp::SetLen(len) => data.resize(*len as usize, 0),
                }
            }
            inodes.insert(
                *ino,
                Inode {
                    durable: data.clone(),
                    current: data,
                    pending: Vec::new(),
                },
            );
        }
        st.inodes = inodes;
        st.names = names.clone();
        st.durable_names = names;
    }
}

impl std::ops::AddAssign for SimStats {
    fn add_assign(&mut self, o: SimStats) {
        self.faults += o.faults;
        self.crashes += o.crashes;
        self.writes_lost += o.writes_lost;
        self.writes_torn += o.writes_torn;
    }
}

fn write_into(buf: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let end = pos as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[pos as usize..end].copy_from_slice(data);
}

impl State {
    fn used(&self) -> u64 {
        self.names
            .values()
            .filter_map(|i| self.inodes.get(i))
            .map(|n| n.current.len() as u64)
            .sum()
    }

    /// Draws whether an operation of probability `p` fails.
    fn fault(&mut self, p: f64) -> bool {
        let hit = self.rng.chance(p);
        if hit {
            self.stats.faults += 1;
        }
        hit
    }

    /// Draws whether an operation fails, its probability picked from the
    /// current [`Faults`].
    fn hit(&mut self, pick: impl Fn(&Faults) -> f64) -> bool {
        let p = pick(&self.faults);
        self.fault(p)
    }

    fn ino(&self, path: &Path) -> io::Result<u64> {
        self.names.get(path).copied().ok_or_else(|| enoent(path))
    }

    /// Whether growing the files by `grow` bytes fits the capacity.
    fn fits(&self, grow: u64) -> bool {
        // Overwrites need no new space, even on a disk already over its
        // (lowered) capacity.
        grow == 0 || self.capacity.is_none_or(|c| self.used() + grow <= c)
    }

    /// A write of `data` at `pos` of inode `ino`, with faults (`torn_on_eio`:
    /// a failed write may leave a prefix behind).
    fn write(&mut self, ino: u64, pos: u64, data: &[u8], torn_on_eio: bool) -> io::Result<()> {
        let len = self.inodes[&ino].current.len() as u64;
        let grow = (pos + data.len() as u64).saturating_sub(len);
        if !self.fits(grow) || self.hit(|f| f.write_enospc) {
            return Err(injected("ENOSPC"));
        }
        let mut n = data.len();
        let eio = self.hit(|f| f.write_eio);
        if eio {
            n = if torn_on_eio {
                self.rng.below(data.len() as u64 + 1) as usize
            } else {
                0
            };
        }
        let node = self.inodes.get_mut(&ino).expect("inode");
        if n > 0 {
            write_into(&mut node.current, pos, &data[..n]);
            node.pending.push(FileOp::Write {
                pos,
                data: data[..n].to_vec(),
            });
        }
        if eio {
            Err(injected("EIO"))
        } else {
            Ok(())
        }
    }

    fn sync(&mut self, ino: u64) -> io::Result<()> {
        if self.hit(|f| f.sync_eio) {
            return Err(injected("EIO"));
        }
        let node = self.inodes.get_mut(&ino).expect("inode");
        node.durable = node.current.clone();
        node.pending.clear();
        Ok(())
    }

    fn link(&mut self, path: &Path, ino: u64) {
        self.names.insert(path.to_path_buf(), ino);
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.pending_dir
            .push((dir, DirOp::Link(path.to_path_buf(), ino)));
    }

    fn unlink(&mut self, path: &Path) {
        self.names.remove(path);
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.pending_dir
            .push((dir, DirOp::Unlink(path.to_path_buf())));
    }
}

impl Storage for SimDisk {
    type Segment = SimSegment;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state();
        for a in dir.ancestors() {
            st.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut st = self.state();
        if !st.dirs.contains(dir) {
            return Err(enoent(dir));
        }
        if st.hit(|f| f.read_eio) {
            return Err(injected("EIO"));
        }
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let st = self.state();
        st.names.contains_key(path) || st.dirs.contains(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut st = self.state();
        let ino = st.ino(path)?;
        if st.hit(|f| f.read_eio) {
            return Err(injected("EIO"));
        }
        Ok(st.inodes[&ino].current.clone())
    }

    fn read_prefix(&self, path: &Path, n: usize) -> io::Result<Vec<u8>> {
        let mut data = self.read(path)?;
        data.truncate(n);
        Ok(data)
    }

    fn create_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state();
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !st.dirs.contains(parent) {
            return Err(enoent(parent));
        }
        if st.hit(|f| f.write_enospc) {
            return Err(injected("ENOSPC"));
        }
        match st.names.get(path).copied() {
            Some(ino) => {
                let node = st.inodes.get_mut(&ino).expect("inode");
                node.current.clear();
                node.pending.push(FileOp::SetLen(0));
            }
            None => {
                let ino = st.next_ino;
                st.next_ino += 1;
                st.inodes.insert(ino, Inode::default());
                st.link(path, ino);
            }
        }
        Ok(())
    }

    fn write_at(&self, path: &Path, pos: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        let ino = st.ino(path)?;
        st.write(ino, pos, data, true)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let st = self.state();
        let ino = st.ino(path)?;
        Ok(st.inodes[&ino].current.len() as u64)
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut st = self.state();
        let ino = st.ino(path)?;
        let cur = st.inodes[&ino].current.len() as u64;
        if !st.fits(len.saturating_sub(cur)) || st.hit(|f| f.write_enospc) {
            return Err(injected("ENOSPC"));
        }
        let node = st.inodes.get_mut(&ino).expect("inode");
        node.current.resize(len as usize, 0);
        node.pending.push(FileOp::SetLen(len));
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state();
        let ino = st.ino(path)?;
        st.sync(ino)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state();
        if !st.dirs.contains(dir) {
            return Err(enoent(dir));
        }
        if st.hit(|f| f.sync_eio) {
            return Err(injected("EIO"));
        }
        // Entries of this directory become durable, in order.
        let st = &mut *st;
        let mut rest = Vec::new();
        for (d, op) in st.pending_dir.drain(..) {
            if d != dir {
                rest.push((d, op));
                continue;
            }
            match op {
                DirOp::Link(p, ino) => {
                    st.durable_names.insert(p, ino);
                }
                DirOp::Unlink(p) => {
                    st.durable_names.remove(&p);
                }
            }
        }
        st.pending_dir = rest;
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.state();
        let ino = st.ino(from)?;
        st.unlink(from);
        st.link(to, ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state();
        st.ino(path)?;
        st.unlink(path);
        Ok(())
    }

    fn create_in_background(&self) -> bool {
        false
    }

    async fn open_segment(&self, path: &Path, mode: WriteMode) -> io::Result<SimSegment> {
        let ino = self.state().ino(path)?;
        Ok(SimSegment {
            disk: self.clone(),
            ino,
            mode,
        })
    }
}

/// A segment open on a [`SimDisk`]: appends and syncs go to its inode
/// (which stays the same file even if the name is later removed).
#[derive(Debug)]
pub struct SimSegment {
    disk: SimDisk,
    ino: u64,
    /// With [`WriteMode::DirectSync`] a write is synced before it completes
    /// (and an injected sync failure fails the write, its data then as
    /// uncertain as any unsynced write); [`WriteMode::PageCache`] writes
    /// wait for `sync` like any other (a simulated crash is a power loss).
    mode: WriteMode,
}

impl SegmentFile for SimSegment {
    async fn write_block(
        &self,
        pos: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<usize> {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        let mut st = self.disk.state();
        if !st.inodes.contains_key(&self.ino) {
            // Its file was lost in a crash this handle outlived.
            return Err(injected("EIO"));
        }
        st.write(self.ino, pos, &buf, true)?;
        if self.mode == WriteMode::DirectSync {
            st.sync(self.ino)?;
        }
        Ok(len)
    }

    fn durable_writes(&self) -> bool {
        self.mode == WriteMode::DirectSync
    }

    async fn sync(&self) -> io::Result<()> {
        let mut st = self.disk.state();
        if !st.inodes.contains_key(&self.ino) {
            return Err(injected("EIO"));
        }
        st.sync(self.ino)
    }

    async fn close(self) {}
}

/// The seeds a simulation test runs: `SIM_FIRST_SEED` (default 0) onwards,
/// `SIM_SEEDS` of them (default `default_count`), so that CI runs a few and
/// `make sim` many, and a failing seed can be replayed alone.
pub fn seeds_from_env(default_count: u64) -> std::ops::Range<u64> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let first = var("SIM_FIRST_SEED").unwrap_or(0);
    first..first + var("SIM_SEEDS").unwrap_or(default_count)
}

/// Runs `f` on a fresh glommio executor (the writer needs one) in a thread
/// of its own, and returns what it returns; a panic inside is re-raised.
pub fn on_executor<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let joined = std::thread::spawn(move || {
        glommio::LocalExecutorBuilder::default()
            .spawn(f)
            .expect("a glommio executor")
            .join()
    })
    .join();
    match joined {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("simulation failed: {e}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn unsynced_data_and_entries_are_lost_synced_ones_kept() {
        let d = SimDisk::new(1);
        d.create_dir_all(&p("/d")).unwrap();
        d.create_file(&p("/d/a")).unwrap();
        d.write_at(&p("/d/a"), 0, b"hello").unwrap();
        d.sync_file(&p("/d/a")).unwrap();
        d.sync_dir(&p("/d")).unwrap();
        d.write_at(&p("/d/a"), 5, b" world").unwrap();
        d.create_file(&p("/d/b")).unwrap();
        assert_eq!(d.read(&p("/d/a")).unwrap(), b"hello world");
        d.crash(CrashMode::DropUnsynced);
        assert_eq!(d.read(&p("/d/a")).unwrap(), b"hello");
        assert!(!d.exists(&p("/d/b")), "an entry never synced is gone");
        assert_eq!(d.stats().crashes, 1);
    }

    #[test]
    fn a_rename_needs_the_directory_synced() {
        let d = SimDisk::new(2);
        d.create_dir_all(&p("/d")).unwrap();
        d.create_file(&p("/d/t")).unwrap();
        d.sync_dir(&p("/d")).unwrap();
        d.rename(&p("/d/t"), &p("/d/f")).unwrap();
        d.crash(CrashMode::DropUnsynced);
        assert!(d.exists(&p("/d/t")) && !d.exists(&p("/d/f")));
        d.rename(&p("/d/t"), &p("/d/f")).unwrap();
        d.sync_dir(&p("/d")).unwrap();
        d.crash(CrashMode::DropUnsynced);
        assert!(!d.exists(&p("/d/t")) && d.exists(&p("/d/f")));
    }

    #[test]
    fn subset_crashes_keep_any_subset_and_tear() {
        // Over many seeds, a crash keeps each of two unsynced writes or not,
        // whole or torn: every combination shows up.
        let mut seen = std::collections::HashSet::new();
        for seed in 0..400 {
            let d = SimDisk::new(seed);
            d.create_dir_all(&p("/d")).unwrap();
            d.create_file(&p("/d/a")).unwrap();
            d.set_len(&p("/d/a"), 8).unwrap();
            d.sync_file(&p("/d/a")).unwrap();
            d.sync_dir(&p("/d")).unwrap();
            d.write_at(&p("/d/a"), 0, b"AAAA").unwrap();
            d.write_at(&p("/d/a"), 4, b"BBBB").unwrap();
            d.crash(CrashMode::Subset);
            let got = d.read(&p("/d/a")).unwrap();
            let a = got[..4].iter().filter(|&&b| b == b'A').count();
            let b = got[4..].iter().filter(|&&b| b == b'B').count();
            seen.insert((a.min(1) + (a == 4) as usize, b.min(1) + (b == 4) as usize));
        }
        // (0 = lost, 1 = torn, 2 = whole) for each write.
        for a in 0..3 {
            for b in 0..3 {
                assert!(seen.contains(&(a, b)), "never saw {a},{b}: {seen:?}");
            }
        }
    }

    #[test]
    fn faults_and_capacity() {
        let d = SimDisk::new(3);
        d.create_dir_all(&p("/d")).unwrap();
        d.create_file(&p("/d/a")).unwrap();
        d.set_capacity(Some(10));
        assert!(d.write_at(&p("/d/a"), 0, b"0123456789").is_ok());
        let e = d.write_at(&p("/d/a"), 10, b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        d.set_capacity(None);
        d.set_faults(Faults {
            read_eio: 1.0,
            ..Faults::default()
        });
        assert_eq!(
            d.read(&p("/d/a")).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(d.stats().faults, 1);
    }
}

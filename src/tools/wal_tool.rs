//! `rstmdb wal verify|dump`: offline tools over a data directory.
//!
//! * `verify` reads every WAL segment and snapshot the way start-up does
//!   (every snapshot decoded in full, the WAL replayed on top of the one
//!   start-up would choose), changing nothing, and reports the first bad
//!   record of each shard with its file and byte position. Exit status:
//!   0 all intact (a torn tail, which start-up cuts off, is only noted),
//!   1 damage found, 2 the directory could not be examined.
//! * `verify --repair` is the explicit repair flag of DECISIONS D14: for a
//!   shard whose WAL is corrupt, the damaged segment and every later one are
//!   copied into `<data_dir>/repair-<unix ms>/shard-NNN/`, then the log is
//!   cut at the bad record (zeros from there on, later segments removed), so
//!   that the next start-up recovers everything before it. It discards
//!   whatever followed the damage, acknowledged or not: that is why it is a
//!   flag and never automatic. It takes the data directory's lock, so it
//!   refuses to run beside a server.
//! * `dump` prints the records as JSON lines in global offset order (all
//!   shards merged), from an offset, up to a count.
//!
//! Both read with the WAL crate's read-only recovery, so they may run while a
//! server uses the directory (they then see what was on disk when each file
//! was read).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;

use rstmdb_shards::engine::EngineLimits;
use rstmdb_shards::recovery::{verify_shard, RecoveryError};
use rstmdb_wal::segment::{self, BLOCK};
use rstmdb_wal::{recover, RecoveryOptions, WalError};

use crate::config::WalCommand;
use crate::storage::datadir::{DataDir, Layout};

/// Exit status: everything intact (or repaired).
const EXIT_OK: u8 = 0;
/// Exit status: damage found (and not repaired).
const EXIT_DAMAGED: u8 = 1;
/// Exit status: the directory could not be examined.
const EXIT_UNUSABLE: u8 = 2;

/// Records a `dump` reader thread may hold ahead of the merge, per shard.
const DUMP_QUEUE: usize = 256;
/// The reason a `dump` reader thread stops when the merge needs no more.
const STOPPED: &str = "dump stopped";

/// Runs one `rstmdb wal …` command.
pub fn run(cmd: &WalCommand) -> ExitCode {
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let code = match cmd {
        WalCommand::Verify { data_dir, repair } => verify(data_dir, *repair, &mut out),
        WalCommand::Dump {
            data_dir,
            from,
            limit,
            shard,
        } => dump(data_dir, *from, *limit, *shard, &mut out),
    };
    let _ = out.flush();
    ExitCode::from(code)
}

/// Read-only recovery options for shard `i`. The segment size only sizes a
/// repaired segment, which read-only recovery never writes.
fn read_only(layout: &Layout, i: usize) -> RecoveryOptions {
    RecoveryOptions {
        dir: layout.wal_dir(i),
        shard: i as u32,
        segment_size: 2 * BLOCK,
        read_only: true,
    }
}

fn limits() -> EngineLimits {
    let st = crate::config::StorageConfig::default();
    EngineLimits {
        idempotency_entries: st.idempotency_window,
        idempotency_max_age_ms: 0,
    }
}

/// Where a shard's WAL must be cut to get past its damage.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    /// Segment id of the first damaged byte.
    segment: u64,
    /// Byte position in that segment; everything from here on goes.
    position: u64,
}

/// The cut that repairs `err`, when the error is damage to the WAL that
/// discarding from the bad record on removes.
fn cut_for(err: &RecoveryError) -> Option<Cut> {
    let RecoveryError::Wal(wal) = err else {
        return None;
    };
    let (path, position) = match wal {
        WalError::Corrupt { path, position, .. } | WalError::Replay { path, position, .. } => {
            (path, *position)
        }
        // A bad header or a gap: that whole segment (or the one missing)
        // and everything after it.
        WalError::BadSegment { path, .. } => (path, 0),
        WalError::Io { .. } | WalError::RecordTooLarge(_) => return None,
    };
    let id = segment::parse_name(path.file_name()?.to_str()?)?;
    Some(Cut {
        segment: id,
        position,
    })
}

/// Checks one shard; writes its report lines and returns (problems, cut).
fn verify_one(
    layout: &Layout,
    i: usize,
    floor: u64,
    out: &mut impl Write,
) -> std::io::Result<(usize, Option<Cut>)> {
    let report = verify_shard(
        &read_only(layout, i),
        &limits(),
        &layout.snapshot_dir(i),
        floor,
    );
    let mut problems = 0;
    for s in &report.snapshots {
        match &s.result {
            Ok(n) => writeln!(
                out,
                "shard {i}: snapshot {}: ok (start offset {}, {n} instance(s))",
                s.path.display(),
                s.start_offset
            )?,
            Err(why) => {
                problems += 1;
                writeln!(
                    out,
                    "shard {i}: snapshot {}: DAMAGED: {why}",
                    s.path.display()
                )?;
            }
        }
    }
    let mut cut = None;
    match &report.recovery {
        Ok(r) => {
            let from = r
                .snapshot_start
                .map_or(String::new(), |s| format!(" on top of the snapshot at {s}"));
            writeln!(
                out,
                "shard {i}: WAL: ok ({} segment(s), {} record(s) replayed{from}, last offset {})",
                r.wal.segments.len(),
                r.wal.records,
                r.wal.last_offset
            )?;
            if let Some(t) = &r.wal.torn {
                writeln!(
                    out,
                    "shard {i}: WAL: note: torn tail in {} at byte {} ({}); never acknowledged, \
                     start-up cuts it off",
                    t.path.display(),
                    t.position,
                    t.reason
                )?;
            }
        }
        Err(e) => {
            problems += 1;
            cut = cut_for(e);
            writeln!(out, "shard {i}: DAMAGED: {e}")?;
        }
    }
    Ok((problems, cut))
}

fn verify(root: &Path, repair: bool, out: &mut impl Write) -> u8 {
    let layout = match DataDir::inspect(root) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rstmdb wal verify: {e}");
            return EXIT_UNUSABLE;
        }
    };
    // Held from before the first read when repairing, so no server starts
    // (or runs) between the check and the cut.
    let _lock = if repair {
        match DataDir::open(root, layout.shards) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("rstmdb wal verify --repair: {e}");
                return EXIT_UNUSABLE;
            }
        }
    } else {
        None
    };
    match verify_all(root, &layout, repair, out) {
        Ok(code) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("rstmdb wal verify: {e}");
            EXIT_UNUSABLE
        }
    }
}

fn verify_all(
    root: &Path,
    layout: &Layout,
    repair: bool,
    out: &mut impl Write,
) -> std::io::Result<u8> {
    writeln!(
        out,
        "data directory {}: {} shard(s) in {}",
        root.display(),
        layout.shards,
        layout.base.display()
    )?;
    let manifest = match layout.read_manifest() {
        Ok(m) => m,
        Err(e) => {
            writeln!(out, "manifest: DAMAGED: {e}")?;
            return Ok(EXIT_DAMAGED);
        }
    };
    let mut problems = 0;
    let mut unrepaired = 0;
    let backup = backup_dir(root);
    for i in 0..layout.shards {
        let floor = manifest.shards[i].wal_floor.max(manifest.history_floor);
        let (found, cut) = verify_one(layout, i, floor, out)?;
        problems += found;
        if found == 0 || !repair {
            unrepaired += found;
            continue;
        }
        unrepaired += repair_shard(layout, i, floor, found, cut, &backup, out)?;
    }
    write_result(problems, unrepaired, repair, out)
}

/// Where a repair backs up the segments it cuts: one folder per run, named by the time.
fn backup_dir(root: &Path) -> std::path::PathBuf {
    root.join(format!(
        "repair-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ))
}

/// Repairs shard `i`'s `found` problems where a WAL cut can, then verifies it again.
/// Returns how many problems are left.
fn repair_shard(
    layout: &Layout,
    i: usize,
    floor: u64,
    found: usize,
    cut: Option<Cut>,
    backup: &Path,
    out: &mut impl Write,
) -> std::io::Result<usize> {
    let Some(cut) = cut else {
        writeln!(
            out,
            "shard {i}: cannot repair: only WAL damage is repaired (a damaged snapshot is \
             skipped by start-up when an older one or the WAL covers it)"
        )?;
        return Ok(found);
    };
    let shard_backup = backup.join(format!("shard-{i:03}"));
    match cut_wal(&layout.wal_dir(i), &cut, &shard_backup) {
        Ok(moved) => {
            writeln!(
                out,
                "shard {i}: REPAIRED: WAL cut at segment {} byte {}; {moved} segment file(s) \
                 backed up in {}",
                segment::file_name(cut.segment),
                cut.position,
                shard_backup.display()
            )?;
            let (left, _) = verify_one(layout, i, floor, out)?;
            Ok(left)
        }
        Err(e) => {
            writeln!(out, "shard {i}: repair failed: {e}")?;
            Ok(found)
        }
    }
}

/// The closing `result:` line and the exit code it stands for.
fn write_result(
    problems: usize,
    unrepaired: usize,
    repair: bool,
    out: &mut impl Write,
) -> std::io::Result<u8> {
    if problems == 0 {
        writeln!(out, "result: ok")?;
        Ok(EXIT_OK)
    } else if unrepaired == 0 {
        writeln!(out, "result: {problems} problem(s) found, all repaired")?;
        Ok(EXIT_OK)
    } else {
        writeln!(
            out,
            "result: {problems} problem(s) found{}",
            if repair {
                format!(", {unrepaired} left")
            } else {
                "; `rstmdb wal verify --repair` cuts a damaged WAL at the bad record \
                 (discarding what follows, with a backup)"
                    .to_string()
            }
        )?;
        Ok(EXIT_DAMAGED)
    }
}

/// Cuts the WAL in `dir` at `cut`: backs up the damaged segment and every
/// later one into `backup`, zeroes the damaged one from the cut on (or
/// removes it when the cut is at its start) and removes the later ones.
/// Returns how many files were backed up.
fn cut_wal(dir: &Path, cut: &Cut, backup: &Path) -> Result<usize, String> {
    let ids = segment::list_ids(dir, false).map_err(|e| e.to_string())?;
    let affected: Vec<u64> = ids.into_iter().filter(|&id| id >= cut.segment).collect();
    fs::create_dir_all(backup).map_err(|e| format!("creating {}: {e}", backup.display()))?;
    for &id in &affected {
        let from = dir.join(segment::file_name(id));
        let to = backup.join(segment::file_name(id));
        fs::copy(&from, &to)
            .and_then(|_| fs::File::open(&to)?.sync_all())
            .map_err(|e| format!("backing up {}: {e}", from.display()))?;
    }
    // The backup must be durable before anything is cut: its directory,
    // the repair directory and the data directory's entry for it.
    let mut dir_to_sync = Some(backup);
    for _ in 0..3 {
        let Some(d) = dir_to_sync else { break };
        segment::sync_dir(d).map_err(|e| e.to_string())?;
        dir_to_sync = d.parent();
    }
    // Newest first, so a crash halfway leaves a contiguous log.
    for &id in affected.iter().rev() {
        let path = dir.join(segment::file_name(id));
        if id == cut.segment && cut.position >= BLOCK {
            zero_from(&path, cut.position)?;
        } else {
            fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
    }
    segment::sync_dir(dir).map_err(|e| e.to_string())?;
    Ok(affected.len())
}

/// Overwrites `path` with zeros from `pos` to its end and syncs it.
fn zero_from(path: &Path, pos: u64) -> Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let err = |e: std::io::Error| format!("cutting {}: {e}", path.display());
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    f.seek(SeekFrom::Start(pos)).map_err(err)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len.saturating_sub(pos);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(err)?;
        left -= n as u64;
    }
    f.sync_all().map_err(err)
}

/// One record on its way from a shard's reader thread to the merge.
struct Item {
    offset: u64,
    kind: u8,
    payload: Vec<u8>,
}

fn dump(
    root: &Path,
    from: u64,
    limit: Option<u64>,
    only: Option<usize>,
    out: &mut impl Write,
) -> u8 {
    let layout = match DataDir::inspect(root) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rstmdb wal dump: {e}");
            return EXIT_UNUSABLE;
        }
    };
    let shards: Vec<usize> = match only {
        Some(s) if s >= layout.shards => {
            eprintln!(
                "rstmdb wal dump: --shard {s}: the data directory has {} shard(s)",
                layout.shards
            );
            return EXIT_UNUSABLE;
        }
        Some(s) => vec![s],
        None => (0..layout.shards).collect(),
    };
    let (written, errors) = dump_merged(&layout, &shards, from, limit, out);
    let mut code = EXIT_OK;
    for e in &errors {
        eprintln!("rstmdb wal dump: {e}");
        code = EXIT_DAMAGED;
    }
    match written {
        Ok(_) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            eprintln!("rstmdb wal dump: {e}");
            EXIT_UNUSABLE
        }
    }
}

/// Reads every shard in a thread of its own and merges their records by
/// offset (each shard's offsets increase, and offsets order all shards).
/// Returns the lines written and the shards' read errors.
fn dump_merged(
    layout: &Layout,
    shards: &[usize],
    from: u64,
    limit: Option<u64>,
    out: &mut impl Write,
) -> (std::io::Result<u64>, Vec<String>) {
    std::thread::scope(|s| {
        let mut receivers = Vec::with_capacity(shards.len());
        let mut readers = Vec::with_capacity(shards.len());
        for &i in shards {
            let (tx, rx) = mpsc::sync_channel::<Item>(DUMP_QUEUE);
            let opts = read_only(layout, i);
            readers.push((
                i,
                s.spawn(move || {
                    recover(&opts, |r| {
                        if r.offset < from {
                            return Ok(());
                        }
                        tx.send(Item {
                            offset: r.offset,
                            kind: r.kind,
                            payload: r.payload.to_vec(),
                        })
                        .map_err(|_| STOPPED.to_string())
                    })
                }),
            ));
            receivers.push((i, rx));
        }
        let mut heads: Vec<Head> = receivers
            .into_iter()
            .map(|(i, rx)| (i, rx.recv().ok(), rx))
            .collect();
        let written = merge(&mut heads, limit, out);
        // Readers still sending see their channel closed and stop.
        drop(heads);
        let mut errors = Vec::new();
        for (i, h) in readers {
            match h.join() {
                Ok(Ok(r)) => {
                    if let Some(t) = r.torn {
                        tracing::debug!(shard = i, position = t.position, "torn tail");
                    }
                }
                Ok(Err(WalError::Replay { reason, .. })) if reason == STOPPED => {}
                Ok(Err(e)) => errors.push(format!("shard {i}: {e}")),
                Err(_) => errors.push(format!("shard {i}: reader thread panicked")),
            }
        }
        (written, errors)
    })
}

type Head = (usize, Option<Item>, mpsc::Receiver<Item>);

fn merge(heads: &mut [Head], limit: Option<u64>, out: &mut impl Write) -> std::io::Result<u64> {
    let mut written = 0u64;
    while limit.is_none_or(|l| written < l) {
        let Some(k) = heads
            .iter()
            .enumerate()
            .filter_map(|(k, h)| h.1.as_ref().map(|it| (it.offset, k)))
            .min()
            .map(|(_, k)| k)
        else {
            break;
        };
        let (shard, head, rx) = &mut heads[k];
        let item = head.take().expect("chosen head");
        write_line(out, *shard, &item)?;
        written += 1;
        *head = rx.recv().ok();
    }
    Ok(written)
}

/// One record as a JSON line: the entry as logged when it is JSON (it
/// always is for records the server wrote), else its bytes in hex.
fn write_line(out: &mut impl Write, shard: usize, it: &Item) -> std::io::Result<()> {
    let name = kind_name(it.kind);
    match serde_json::from_slice::<&serde_json::value::RawValue>(&it.payload) {
        Ok(raw) => writeln!(
            out,
            "{{\"offset\":{},\"shard\":{shard},\"kind\":{},\"type\":\"{name}\",\"entry\":{}}}",
            it.offset,
            it.kind,
            raw.get()
        ),
        Err(_) => {
            let hex: String = it.payload.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(
                out,
                "{{\"offset\":{},\"shard\":{shard},\"kind\":{},\"type\":\"{name}\",\"payload_hex\":\"{hex}\"}}",
                it.offset, it.kind
            )
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    use rstmdb_shards::wal_entry::kind as k;
    match kind {
        k::PUT_MACHINE => "put_machine",
        k::CREATE_INSTANCE => "create_instance",
        k::APPLY_EVENT => "apply_event",
        k::DELETE_INSTANCE => "delete_instance",
        k::FLUSH_ALL => "flush_all",
        k::BATCH_PART => "batch_part",
        k::BATCH_ABORT => "batch_abort",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn cuts_name_the_segment_and_position() {
        let wal = |e| RecoveryError::Wal(e);
        let p = PathBuf::from("/d/shard-000/wal/0000000000000003.wal");
        assert_eq!(
            cut_for(&wal(WalError::Corrupt {
                path: p.clone(),
                position: 8192,
                reason: "x".into()
            })),
            Some(Cut {
                segment: 3,
                position: 8192
            })
        );
        assert_eq!(
            cut_for(&wal(WalError::BadSegment {
                path: p,
                reason: "bad magic".into()
            })),
            Some(Cut {
                segment: 3,
                position: 0
            })
        );
        assert_eq!(
            cut_for(&wal(WalError::RecordTooLarge(1))),
            None,
            "not damage on disk"
        );
    }

    #[test]
    fn lines_are_json_with_the_entry_or_its_bytes() {
        let mut out = Vec::new();
        let it = |payload: &[u8]| Item {
            offset: 7,
            kind: 3,
            payload: payload.to_vec(),
        };
        write_line(&mut out, 1, &it(br#"{"type":"apply_event","x":[1,2]}"#)).unwrap();
        write_line(&mut out, 0, &it(b"\xff\x00")).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["entry"]["x"][1], 2);
        assert_eq!(lines[0]["type"], "apply_event");
        assert_eq!(lines[1]["payload_hex"], "ff00");
        assert_eq!(lines[1]["shard"], 0);
    }
}

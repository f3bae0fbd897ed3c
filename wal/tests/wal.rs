//! WAL round trips on a real disk (tempdir under /tmp, ext4 here; never tmpfs).

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use glommio::LocalExecutorBuilder;
use rstmdb_wal::{
    record, recover, segment, RecoveryOptions, WalError, WalWriter, WriteMode, WriterConfig,
};

const SEG: u64 = 64 * 1024;

fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T
where
{
    std::thread::spawn(f).join().expect("test thread")
}

fn opts(dir: &Path) -> RecoveryOptions {
    RecoveryOptions {
        dir: dir.to_path_buf(),
        shard: 0,
        segment_size: SEG,
        read_only: false,
    }
}

/// Writes `batches` of records (payload = offset as text) and returns the
/// writer's fsync count.
fn write(dir: &Path, first: u64, batches: &[usize], sync: bool) -> u64 {
    let flagged: Vec<(usize, bool)> = batches.iter().map(|&n| (n, sync)).collect();
    write_flagged(dir, first, &flagged)
}

/// Like `write`, with a sync flag per commit, writing to the page cache
/// (durable only once a commit syncs).
fn write_flagged(dir: &Path, first: u64, batches: &[(usize, bool)]) -> u64 {
    write_in(dir, first, batches, WriteMode::PageCache)
}

/// Like `write_flagged`, in a given write mode.
fn write_in(dir: &Path, first: u64, batches: &[(usize, bool)], mode: WriteMode) -> u64 {
    let dir = dir.to_path_buf();
    let batches = batches.to_vec();
    run(move || {
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut w = open_writer(&dir, mode).await;
                let before = w.io_stats().fsyncs;
                let mut off = first;
                for (n, sync) in batches {
                    for _ in 0..n {
                        let payload = format!("record-{off}-{}", "x".repeat((off % 700) as usize));
                        w.stage(off, 1, payload.as_bytes()).expect("stage");
                        off += 1;
                    }
                    w.commit(sync).await.expect("commit");
                }
                let fsyncs = w.io_stats().fsyncs - before;
                w.close().await.expect("close");
                fsyncs
            })
            .expect("spawn")
            .join()
            .expect("join")
    })
}

/// A writer where recovery leaves the log in `dir` (inside an executor).
async fn open_writer(dir: &Path, mode: WriteMode) -> WalWriter {
    let rec = recover(&opts(dir), |_| Ok(())).expect("recover");
    let cfg = WriterConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        segment_size: SEG,
        mode,
    };
    WalWriter::open(cfg, &rec).await.expect("open")
}

fn read_all(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut got = Vec::new();
    recover(&opts(dir), |r| {
        let text = std::str::from_utf8(r.payload).map_err(|e| e.to_string())?;
        assert!(
            text.starts_with(&format!("record-{}-", r.offset)),
            "payload mismatch at {}",
            r.offset
        );
        got.push(r.offset);
        Ok(())
    })?;
    Ok(got)
}

/// The newest segment holding records (the writer prepares the next,
/// empty one ahead of time).
fn newest_segment(dir: &Path) -> std::path::PathBuf {
    let ids = segment::list(dir).unwrap();
    ids.iter()
        .rev()
        .map(|id| dir.join(segment::file_name(*id)))
        .find(|p| std::fs::read(p).unwrap()[4096] != 0)
        .expect("a segment with records")
}

#[test]
fn records_survive_reopen_and_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let fsyncs = write(tmp.path(), 1, &[1, 5, 64, 400, 3], true);
    assert!(fsyncs >= 5, "one fsync per commit at least");
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=473).collect::<Vec<_>>());
    assert!(
        segment::list(tmp.path()).unwrap().len() >= 2,
        "small segments must rotate"
    );
    // Continue after reopening: offsets keep increasing, nothing lost.
    write(tmp.path(), 474, &[10, 10], true);
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=493).collect::<Vec<_>>());
}

#[test]
fn group_commit_is_one_fsync_per_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let fsyncs = write(tmp.path(), 1, &[64], true);
    assert_eq!(fsyncs, 1);
}

/// O_DSYNC writes: every commit is durable when its write completes (one
/// device round trip, counted as the sync), asked to sync or not; no
/// `fdatasync` comes after it. Damage to any commit but the last is then
/// damage to synced data, which recovery refuses.
#[test]
fn direct_sync_writes_are_durable_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let batches = [(2, false), (2, true), (2, false), (2, false)];
    let fsyncs = write_in(tmp.path(), 1, &batches, WriteMode::DirectSync);
    assert_eq!(fsyncs, 4, "one durable write per commit, nothing more");
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=8).collect::<Vec<_>>());
    let seg = newest_segment(tmp.path());
    flip_byte(&seg, 2 * 4096 + 40);
    match read_all(tmp.path()) {
        Err(WalError::Corrupt { position, .. }) => assert_eq!(position, 2 * 4096),
        other => panic!("expected corruption of synced data, got {other:?}"),
    }
}

/// Cuts the newest segment's last record in half and appends garbage (a
/// torn write); returns the segment.
fn tear_tail(dir: &Path) -> std::path::PathBuf {
    let seg = newest_segment(dir);
    let data = std::fs::read(&seg).unwrap();
    let end = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let mut f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(end - 10).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"garbage garbage garbage").unwrap();
    seg
}

#[test]
fn torn_tail_is_cut_and_restart_works_twice() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[3, 3], true);
    tear_tail(tmp.path());
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=5).collect::<Vec<_>>());
    // Second restart: same answer, and appends after the repair work.
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=5).collect::<Vec<_>>());
    write(tmp.path(), 6, &[2], true);
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=7).collect::<Vec<_>>());
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=7).collect::<Vec<_>>());
}

/// Every file of a directory, by name, with its bytes.
fn snapshot_dir(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn read_only_recovery_reports_a_torn_tail_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[3, 3], true);
    let seg = tear_tail(tmp.path());
    // Leftovers that normal recovery deletes are left alone too.
    std::fs::write(tmp.path().join("0000000000000009.wal.tmp"), b"x").unwrap();
    std::fs::write(tmp.path().join("0000000000000000.wal.retired"), b"y").unwrap();
    let before = snapshot_dir(tmp.path());
    let ro = RecoveryOptions {
        read_only: true,
        ..opts(tmp.path())
    };
    let mut seen = Vec::new();
    let rec = recover(&ro, |r| {
        seen.push(r.offset);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, (1..=5).collect::<Vec<_>>());
    let torn = rec.torn.expect("the torn tail is reported");
    assert_eq!(torn.path, seg);
    assert_eq!(snapshot_dir(tmp.path()), before, "read-only recovery wrote");
    // A missing directory is an error, not created.
    let missing = tmp.path().join("absent");
    assert!(recover(
        &RecoveryOptions {
            read_only: true,
            ..opts(&missing)
        },
        |_| Ok(())
    )
    .is_err());
    assert!(!missing.exists());
    // The normal recovery then repairs as before.
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=5).collect::<Vec<_>>());
}

#[test]
fn corruption_in_the_middle_is_refused_with_file_and_position() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[2, 2, 2], true);
    let seg = newest_segment(tmp.path());
    // Flip a byte inside the first record's payload (block 1, after header).
    let mut f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(&seg)
        .unwrap();
    f.seek(SeekFrom::Start(4096 + 30)).unwrap();
    f.write_all(b"Z").unwrap();
    drop(f);
    match read_all(tmp.path()) {
        Err(WalError::Corrupt { path, position, .. }) => {
            assert_eq!(path, seg);
            assert_eq!(position, 4096);
        }
        other => panic!("expected corruption error, got {other:?}"),
    }
}

fn flip_byte(seg: &Path, at: u64) {
    let mut f = OpenOptions::new().write(true).read(true).open(seg).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(b"Z").unwrap();
}

#[test]
fn damage_in_never_synced_commits_is_a_torn_tail() {
    // Power loss may persist a later unsynced commit and not an earlier one:
    // nothing in the damaged commit was ever synced, so it is a torn tail.
    let tmp = tempfile::tempdir().unwrap();
    write_flagged(
        tmp.path(),
        1,
        &[(2, true), (2, false), (2, false), (2, false)],
    );
    let seg = newest_segment(tmp.path());
    // Commit 2 starts at the second data block.
    flip_byte(&seg, 2 * 4096 + 40);
    assert_eq!(read_all(tmp.path()).unwrap(), vec![1, 2]);
    assert_eq!(
        read_all(tmp.path()).unwrap(),
        vec![1, 2],
        "stable after the repair"
    );
    write(tmp.path(), 3, &[2], true);
    assert_eq!(read_all(tmp.path()).unwrap(), vec![1, 2, 3, 4]);
}

#[test]
fn damage_that_a_later_commit_proves_durable_is_corruption() {
    // Commit 3 syncs everything before it; commit 4 records that. Damage in
    // commit 2 is then damage to synced data, even though commit 3's own
    // header (written before that sync) does not prove it.
    let tmp = tempfile::tempdir().unwrap();
    write_flagged(
        tmp.path(),
        1,
        &[(2, false), (2, false), (2, true), (2, true)],
    );
    // Page-cache commits are packed until a sync: commit 2 starts right
    // after commit 1, inside the first data block.
    let seg = newest_segment(tmp.path());
    let record_3 = record_position(&seg, 3);
    assert!(record_3 > 4096 && record_3 < 2 * 4096, "packed: {record_3}");
    flip_byte(&seg, record_3 + record::HEADER_LEN as u64 + 2);
    match read_all(tmp.path()) {
        Err(WalError::Corrupt { position, .. }) => assert_eq!(position, record_3),
        other => panic!("expected corruption, got {other:?}"),
    }
}

/// Where the record with offset `offset` starts in `seg` (found by its
/// payload, `record-{offset}-…`).
fn record_position(seg: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(seg).unwrap();
    let needle = format!("record-{offset}-");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("the record is in the segment");
    (at - record::HEADER_LEN) as u64
}

/// After a sync, the next commit starts in a fresh block: synced blocks are
/// never written again, so a torn write can only damage unsynced data.
#[test]
fn page_cache_commits_pack_until_a_sync_then_start_a_fresh_block() {
    let tmp = tempfile::tempdir().unwrap();
    write_flagged(tmp.path(), 1, &[(2, false), (2, true), (2, false)]);
    let seg = newest_segment(tmp.path());
    let (r3, r5) = (record_position(&seg, 3), record_position(&seg, 5));
    assert!(
        r3 > 4096 && r3 < 2 * 4096,
        "commit 2 packed after commit 1: {r3}"
    );
    assert_eq!(r5, 2 * 4096, "commit 3 starts the block after the sync");
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=6).collect::<Vec<_>>());
}

#[test]
fn a_torn_tail_before_a_prepared_empty_segment_is_repaired() {
    // The writer prepares segment N+1 ahead of time: after a crash the torn
    // tail is in N and N+1 is empty.
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[3, 3], true);
    let ids = segment::list(tmp.path()).unwrap();
    assert!(
        ids.len() >= 2,
        "next segment prepared in the background: {ids:?}"
    );
    let seg = newest_segment(tmp.path());
    let data = std::fs::read(&seg).unwrap();
    let end = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    flip_byte(&seg, end - 5);
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=5).collect::<Vec<_>>());
    write(tmp.path(), 6, &[1], true);
    assert_eq!(read_all(tmp.path()).unwrap(), (1..=6).collect::<Vec<_>>());
}

#[test]
fn a_missing_middle_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[400, 400, 400], true);
    let ids = segment::list(tmp.path()).unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
    std::fs::remove_file(tmp.path().join(segment::file_name(ids[1]))).unwrap();
    assert!(matches!(
        read_all(tmp.path()),
        Err(WalError::BadSegment { .. })
    ));
}

/// The sparse index lets readers start near `from`; every start must give
/// exactly the records from `from` on, live and after recovery.
#[test]
fn reads_from_any_offset_through_the_index() {
    const BIG: u64 = 4 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let froms = [1u64, 2, 77, 500, 1234, 2999, 3000, 3001];
    let check = |dir: &Path, plans: Vec<(u64, Vec<rstmdb_wal::SegmentInfo>)>| {
        for (from, plan) in plans {
            let range = rstmdb_wal::ReadRange {
                from,
                below: u64::MAX,
                limit: 100,
                max_bytes: usize::MAX,
            };
            let page = rstmdb_wal::read(dir, &plan, range).unwrap();
            let got: Vec<u64> = page.records.iter().map(|r| r.offset).collect();
            let want: Vec<u64> = (from..=3000).take(100).collect();
            assert_eq!(got, want, "from {from}");
        }
    };
    for round in 0..2 {
        let d = dir.clone();
        let plans = run(move || {
            LocalExecutorBuilder::default()
                .spawn(move || async move {
                    let o = RecoveryOptions {
                        dir: d.clone(),
                        shard: 0,
                        segment_size: BIG,
                        read_only: false,
                    };
                    let rec = recover(&o, |_| Ok(())).expect("recover");
                    let cfg = WriterConfig {
                        dir: d.clone(),
                        shard: 0,
                        segment_size: BIG,
                        mode: WriteMode::DirectSync,
                    };
                    let mut w = WalWriter::open(cfg, &rec).await.expect("open");
                    if round == 0 {
                        for off in 1..=3000u64 {
                            w.stage(off, 1, format!("r{off}-{}", "p".repeat(300)).as_bytes())
                                .unwrap();
                            if off % 3 == 0 {
                                w.commit(false).await.unwrap();
                            }
                        }
                        w.commit(true).await.unwrap();
                    }
                    let plans: Vec<_> = froms.iter().map(|&f| (f, w.read_plan(f))).collect();
                    w.close().await.unwrap();
                    plans
                })
                .unwrap()
                .join()
                .unwrap()
        });
        assert!(
            plans.iter().any(|(_, p)| p[0].start > 4096),
            "the index narrows the scan (round {round})"
        );
        check(&dir, plans);
    }
}

/// A replica's log restarted above a gap (a leader's snapshot replaced its
/// state): the old segments leave the log, recovery sees only what came
/// after, and a restart continues there.
#[test]
fn a_restarted_log_holds_only_what_came_after() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1, &[400, 400], true);
    let dir = tmp.path().to_path_buf();
    let (retired, retained) = run(move || {
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut w = open_writer(&dir, WriteMode::PageCache).await;
                let old = w.restart_at(5_000).await.expect("restart");
                let (retired, err) = segment::retire(&dir, &old);
                assert!(err.is_none(), "{err:?}");
                assert_eq!(w.segments().len(), 1, "only the new segment is left");
                for off in 5_000..5_010u64 {
                    let payload = format!("record-{off}-");
                    w.stage(off, 1, payload.as_bytes()).expect("stage");
                }
                w.commit(true).await.expect("commit");
                let retained = w.retained_from();
                w.close().await.expect("close");
                (retired.len(), retained)
            })
            .expect("spawn")
            .join()
            .expect("join")
    });
    assert!(retired >= 2, "the old segments were retired ({retired})");
    assert_eq!(retained, Some(5_000));
    assert_eq!(
        read_all(tmp.path()).unwrap(),
        (5_000..5_010).collect::<Vec<_>>()
    );
    write(tmp.path(), 5_010, &[5], true);
    assert_eq!(
        read_all(tmp.path()).unwrap(),
        (5_000..5_015).collect::<Vec<_>>()
    );
}

//! Recovery: torn tails are cut, corruption is refused with file and byte
//! position, and group commit is visible. (A different shard count:
//! tests/reshard.rs.)

mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{request_frame, Opts, Server};
use serde_json::json;

fn newest_segment(data: &Path, shard: usize) -> PathBuf {
    let dir = data.join(format!("shard-{shard:03}")).join("wal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    // The newest segment holding records (the writer prepares the next,
    // empty one ahead of time).
    segs.into_iter()
        .rev()
        .find(|p| std::fs::read(p).unwrap()[4096] != 0)
        .expect("a segment with records")
}

fn one_shard() -> Opts {
    Opts {
        shards: 1,
        ..Opts::default()
    }
}

#[test]
fn torn_tail_is_truncated_and_restart_works_twice() {
    let dir = common::data_dir("torn");
    let mut server = Server::start(dir.path(), one_shard());
    common::setup_orders(&server, 5);
    // The last record: an apply that the tear will cut in half.
    server.client().ok(
        "APPLY_EVENT",
        json!({"instance_id": "i4", "event": "TICK", "payload": {"last": true}}),
    );
    server.kill9();

    let seg = newest_segment(dir.path(), 0);
    let bytes = std::fs::read(&seg).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(end - 20).unwrap(); // cut the last record mid-payload
    drop(f);
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0xAB; 777]).unwrap(); // and append garbage after it
    drop(f);

    for round in 0..2 {
        server.restart();
        if round == 0 {
            assert!(
                server.log_text().contains("WAL torn tail cut off"),
                "{}",
                server.log_text()
            );
        }
        let mut c = server.client();
        for i in 0..5 {
            let g = c.ok("GET_INSTANCE", json!({"instance_id": format!("i{i}")}));
            assert_eq!(g["ctx"]["amount"], i, "round {round}");
            assert!(g["ctx"].get("last").is_none(), "the torn apply is gone");
        }
        // New writes work after the repair, and survive the next restart.
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": format!("after{round}"), "machine": "order", "version": 1}),
        );
    }
    server.restart();
    let mut c = server.client();
    c.ok("GET_INSTANCE", json!({"instance_id": "after0"}));
    c.ok("GET_INSTANCE", json!({"instance_id": "after1"}));
}

#[test]
fn corrupted_record_in_the_middle_refuses_to_start_naming_file_and_offset() {
    let dir = common::data_dir("corrupt");
    let mut server = Server::start(dir.path(), one_shard());
    common::setup_orders(&server, 3);
    server.stop();
    let seg = newest_segment(dir.path(), 0);
    // The first record of the segment starts at byte 4096 (after the header
    // block); flip a byte of its payload. Later records stay valid.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    f.seek(SeekFrom::Start(4096 + 40)).unwrap();
    f.write_all(b"#").unwrap();
    drop(f);
    let mut s = Server::spawn(dir.path(), one_shard());
    let (code, log) = s.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    let want = format!("corrupt WAL record in {} at byte 4096", seg.display());
    assert!(
        log.contains(&want),
        "log must name file and offset ({want}): {log}"
    );
}

#[test]
fn graceful_shutdown_exits_zero_and_keeps_everything() {
    let dir = common::data_dir("graceful");
    let mut server = Server::start(
        dir.path(),
        Opts {
            fsync: "never",
            ..Opts::default()
        },
    );
    common::setup_orders(&server, 20);
    assert_eq!(server.stop(), Some(0));
    let server = Server::start(
        dir.path(),
        Opts {
            fsync: "never",
            ..Opts::default()
        },
    );
    let l = server.client().ok("LIST_INSTANCES", json!({"limit": 100}));
    assert_eq!(l["total"], 20);
}

#[test]
fn group_commit_syncs_far_fewer_times_than_it_writes() {
    let dir = common::data_dir("groupcommit");
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 1,
            fsync: "every_write",
            ..Opts::default()
        },
    );
    common::setup_orders(&server, 64);
    let mut c = server.client();
    let before = c.ok("WAL_STATS", json!({}));
    // 64 APPLY_EVENTs pipelined in one write, all to the one shard.
    let mut bytes = Vec::new();
    for i in 0..64 {
        bytes.extend_from_slice(&request_frame(
            &format!("g{i}"),
            "APPLY_EVENT",
            &json!({"instance_id": format!("i{i}"), "event": "TICK"}),
        ));
    }
    c.send(&bytes);
    for i in 0..64 {
        let r = c.read_frame().unwrap();
        assert_eq!(r["id"], format!("g{i}"));
        assert_eq!(r["status"], "ok", "{r}");
    }
    let after = c.ok("WAL_STATS", json!({}));
    let records = after["entry_count"].as_u64().unwrap() - before["entry_count"].as_u64().unwrap();
    let fsyncs = after["io_stats"]["fsyncs"].as_u64().unwrap()
        - before["io_stats"]["fsyncs"].as_u64().unwrap();
    assert_eq!(records, 64);
    assert!(
        (1..=8).contains(&fsyncs),
        "64 records took {fsyncs} fdatasyncs: group commit is not grouping"
    );
}

/// A WAL that has lost its first segment, with no snapshot to start from,
/// is refused: replaying what is left would build a state with a hole in
/// its history (what a cluster replica's restarted WAL looks like without
/// its snapshot, or a hand-deleted segment).
#[test]
fn a_wal_without_its_beginning_and_no_snapshot_refuses_to_start() {
    let dir = common::data_dir("headless");
    let opts = Opts {
        segment_mb: 1,
        ..one_shard()
    };
    let mut server = Server::start(dir.path(), opts.clone());
    common::setup_orders(&server, 1);
    let filler = "x".repeat(8 * 1024);
    let mut c = server.client();
    for _ in 0..300 {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": "i0", "event": "TICK", "payload": {"filler": filler}}),
        );
    }
    server.stop();
    let wal = dir.path().join("shard-000").join("wal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "the log spans segments: {segs:?}");
    std::fs::remove_file(&segs[0]).unwrap();
    let mut s = Server::spawn(dir.path(), opts);
    let (code, log) = s.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("starts at segment 2, not 1"), "{log}");
}

//! The offline tools: `rstmdb wal verify [--repair]` and `rstmdb wal dump`
//! against data directories the real server wrote.

mod common;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Opts, Server};
use serde_json::{json, Value};

/// Runs `rstmdb wal ARGS…`; returns (exit code, stdout, stderr).
fn wal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rstmdb"))
        .arg("wal")
        .args(args)
        .output()
        .expect("run rstmdb wal");
    (
        out.status.code().expect("exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file below `dir`, by path, with its bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn dump_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn verify_and_dump_read_a_live_directory_without_changing_it() {
    let dir = common::data_dir("waltool-ok");
    let mut server = Server::start(
        dir.path(),
        Opts {
            extra_env: vec![("RSTMDB_COMPACT_ENABLED".into(), "0".into())],
            ..Opts::default()
        },
    );
    common::setup_orders(&server, 12);
    let mut c = server.client();
    c.ok("COMPACT", json!({"force_snapshot": true}));
    for i in 0..6 {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("i{i}"), "event": "TICK", "payload": {"n": i}}),
        );
    }
    let stats = c.ok("WAL_STATS", json!({}));

    // Beside the running server: read-only, nothing changes.
    let before = tree(dir.path());
    let (code, out, err) = wal(&["verify", s(dir.path())]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("result: ok"), "{out}");
    assert!(
        out.contains("shard 0: WAL: ok") && out.contains("shard 1: WAL: ok"),
        "{out}"
    );
    assert_eq!(out.matches(": ok (start offset").count(), 2, "{out}");
    let (code, out, err) = wal(&["dump", s(dir.path())]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tree(dir.path()), before, "the tools changed the directory");

    // Every record, once, in offset order across shards.
    let lines = dump_lines(&out);
    assert_eq!(lines.len() as u64, stats["entry_count"].as_u64().unwrap());
    let offsets: Vec<u64> = lines
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    let count = |t: &str| lines.iter().filter(|l| l["type"] == t).count();
    assert_eq!(
        (
            count("put_machine"),
            count("create_instance"),
            count("apply_event")
        ),
        (2, 12, 6)
    );
    let last = lines.last().unwrap();
    assert_eq!(last["entry"]["instance_id"], "i5");
    assert_eq!(last["entry"]["payload"]["n"], 5);
    assert_eq!(last["entry"]["type"], "apply_event");

    // --from and --limit; --shard.
    let from = offsets[5];
    let (code, out, _) = wal(&[
        "dump",
        s(dir.path()),
        "--from",
        &from.to_string(),
        "--limit",
        "3",
    ]);
    assert_eq!(code, 0);
    let page: Vec<u64> = dump_lines(&out)
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(page, offsets[5..8]);
    let (code, out, _) = wal(&["dump", s(dir.path()), "--shard", "1"]);
    assert_eq!(code, 0);
    assert!(dump_lines(&out).iter().all(|l| l["shard"] == 1));
    let (code, _, err) = wal(&["dump", s(dir.path()), "--shard", "2"]);
    assert_eq!(code, 2, "{err}");

    // A damaged snapshot is named.
    server.stop();
    let snap = std::fs::read_dir(dir.path().join("shard-001/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .expect("a snapshot");
    flip(&snap, 40);
    let (code, out, _) = wal(&["verify", s(dir.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("snapshot {}: DAMAGED", snap.display())),
        "{out}"
    );

    // Not a data directory.
    let (code, _, err) = wal(&["verify", s(&dir.path().join("shard-000"))]);
    assert_eq!(code, 2);
    assert!(err.contains("not an rstmdb data directory"), "{err}");
}

fn flip(path: &Path, at: u64) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5A]).unwrap();
}

#[test]
fn verify_names_a_corrupted_record_and_repair_cuts_the_log_there() {
    let dir = common::data_dir("waltool-bad");
    let opts = Opts {
        shards: 1,
        ..Opts::default()
    };
    let mut server = Server::start(dir.path(), opts.clone());
    // With every_write and one request at a time, each record is its own
    // commit, at its own block: PUT_MACHINE at 4096, i0 at 8192, i1 at
    // 12288, i2 at 16384.
    common::setup_orders(&server, 3);
    server.stop();
    let seg = dir.path().join("shard-000/wal/0000000000000001.wal");
    flip(&seg, 12288 + 40);
    let damaged = std::fs::read(&seg).unwrap();

    let (code, out, _) = wal(&["verify", s(dir.path())]);
    assert_eq!(code, 1, "{out}");
    let want = format!("corrupt WAL record in {} at byte 12288", seg.display());
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("--repair"), "says how to repair: {out}");
    // dump prints what precedes the damage and fails naming it.
    let (code, out, err) = wal(&["dump", s(dir.path())]);
    assert_eq!(code, 1);
    assert_eq!(dump_lines(&out).len(), 2, "put_machine and i0");
    assert!(err.contains(&want), "{err}");

    // Refused while a server holds the directory (which it cannot: the
    // server refuses to start on a corrupt log; hold the lock by hand).
    {
        let lock = std::fs::File::open(dir.path().join("LOCK")).unwrap();
        // SAFETY: flock on an open descriptor.
        assert_eq!(
            unsafe {
                libc::flock(
                    std::os::unix::io::AsRawFd::as_raw_fd(&lock),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            },
            0
        );
        let (code, _, err) = wal(&["verify", "--repair", s(dir.path())]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("in use"), "{err}");
    }

    let (code, out, _) = wal(&["verify", "--repair", s(dir.path())]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("REPAIRED"), "{out}");
    assert!(out.contains("all repaired"), "{out}");
    // The damaged segment was backed up as it was.
    let backup = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("repair-")
        })
        .expect("a backup directory");
    assert_eq!(
        std::fs::read(backup.join("shard-000/0000000000000001.wal")).unwrap(),
        damaged
    );
    let (code, out, _) = wal(&["verify", s(dir.path())]);
    assert_eq!(code, 0, "{out}");

    // Start-up now works: what came before the damage is there, the rest
    // was discarded, and new writes go on.
    let server = Server::start(dir.path(), opts);
    let mut c = server.client();
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "i0"}))["ctx"]["amount"],
        0
    );
    for gone in ["i1", "i2"] {
        let (code, _) = c.err("GET_INSTANCE", json!({"instance_id": gone}));
        assert_eq!(code, "INSTANCE_NOT_FOUND");
    }
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "after", "machine": "order", "version": 1}),
    );
}

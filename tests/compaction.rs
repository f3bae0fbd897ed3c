//! Snapshots and compaction never lose data (DECISIONS D15, D17): the
//! reference's failure (COMPACT deletes segments, restart drops instances
//! and machines) replayed against our server, automatic compaction by both
//! thresholds keeping the WAL bounded, idempotency keys surviving, and
//! SNAPSHOT_INSTANCE.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{Client, Opts, Server};
use serde_json::{json, Value};

fn segments(data: &Path, shard: usize) -> usize {
    std::fs::read_dir(data.join(format!("shard-{shard:03}")).join("wal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .count()
}

fn all_segments(data: &Path, shards: usize) -> usize {
    (0..shards).map(|s| segments(data, s)).sum()
}

fn opts(env: &[(&str, &str)]) -> Opts {
    Opts {
        shards: 2,
        segment_mb: 1,
        extra_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Opts::default()
    }
}

/// No automatic compaction: the test decides when.
const MANUAL: &[(&str, &str)] = &[("RSTMDB_COMPACT_ENABLED", "0")];

const N: usize = 320;

fn id(i: usize) -> String {
    format!("inst-{i:04}")
}

/// Every instance as GET_INSTANCE shows it (or the error code).
fn state_of_all(c: &mut Client) -> HashMap<String, Value> {
    (0..N).map(|i| (id(i), c.view_instance(&id(i)))).collect()
}

/// Creates N instances with 8 KiB contexts, touches each once with an
/// idempotency key, deletes every 40th. Returns the apply answers by id.
fn populate(c: &mut Client) -> HashMap<String, Value> {
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let blob = "x".repeat(8 * 1024);
    let mut applied = HashMap::new();
    for i in 0..N {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": id(i), "machine": "order", "version": 1,
                   "initial_ctx": {"amount": i + 1, "blob": blob}}),
        );
    }
    for i in 0..N {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": id(i), "event": "PAY", "payload": {"touched": i},
                   "idempotency_key": format!("pay-{i}")}),
        );
        applied.insert(id(i), r);
    }
    for i in (0..N).step_by(40) {
        c.ok("DELETE_INSTANCE", json!({"instance_id": id(i)}));
    }
    applied
}

/// After a restart: same states, machines there, keys remembered, events
/// apply.
fn check_after_restart(
    server: &Server,
    before: &HashMap<String, Value>,
    applied: &HashMap<String, Value>,
) {
    let mut c = server.client();
    let after = state_of_all(&mut c);
    for (k, v) in before {
        assert_eq!(&after[k], v, "instance {k} changed across the restart");
    }
    let m = c.ok("GET_MACHINE", json!({"machine": "order", "version": 1}));
    assert_eq!(m["definition"]["initial"], "created");
    // An acknowledged apply retried with its key is not applied again.
    for i in [1usize, 77, 319] {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": id(i), "event": "PAY", "payload": {"touched": i},
                   "idempotency_key": format!("pay-{i}")}),
        );
        assert_eq!(r["applied"], false, "{r}");
        assert_eq!(r["wal_offset"], applied[&id(i)]["wal_offset"]);
    }
    // A deleted instance stays deleted, with its original delete offset.
    let d = c.ok("DELETE_INSTANCE", json!({"instance_id": id(40)}));
    assert_eq!(d["deleted"], true);
}

#[test]
fn compact_deletes_segments_and_restarts_lose_nothing() {
    let dir = common::data_dir("compact");
    let mut server = Server::start(dir.path(), opts(MANUAL));
    let mut c = server.client();
    let applied = populate(&mut c);
    let segs_before = all_segments(dir.path(), 2);
    assert!(
        segs_before >= 4,
        "the data set should span several segments per shard ({segs_before})"
    );

    let entries = c.ok("WAL_STATS", json!({}))["entry_count"].clone();
    let r = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert_eq!(r["snapshots_created"], 2, "{r}");
    let deleted = r["segments_deleted"].as_u64().unwrap();
    assert!(deleted >= 2, "segments really deleted: {r}");
    assert_eq!(
        r["bytes_reclaimed"].as_u64().unwrap(),
        deleted * 1024 * 1024
    );
    let segs_after = all_segments(dir.path(), 2);
    // Each shard's writer also keeps its next segment prepared (a file,
    // not yet part of the log).
    let listed = r["wal_segments"].as_u64().unwrap() as usize;
    assert!(listed <= segs_after && segs_after <= listed + 2, "{r}");
    assert_eq!(segs_before - segs_after, deleted as usize);
    assert_eq!(r["total_snapshots"], 2);

    // Nothing changed since: no new snapshot, nothing more to delete.
    let again = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert_eq!(again["snapshots_created"], 0, "{again}");
    assert_eq!(again["segments_deleted"], 0, "{again}");

    // History that was compacted away cannot be replayed (D9); a live
    // watch is fine.
    let (code, msg) = c.err("WATCH_ALL", json!({"from_offset": 1}));
    assert_eq!(code, "BAD_REQUEST");
    assert!(msg.contains("oldest retained offset"), "{msg}");
    let mut w = server.client();
    w.ok("WATCH_ALL", json!({}));
    drop(w);

    let before = state_of_all(&mut c);
    drop(c);

    // Graceful restart.
    assert_eq!(server.stop(), Some(0));
    server.restart();
    // entry_count counts every record ever written, compacted or not.
    let stats = server.client().ok("WAL_STATS", json!({}));
    assert_eq!(stats["entry_count"], entries, "{stats}");
    check_after_restart(&server, &before, &applied);

    // More changes after the snapshot, then kill -9.
    let mut c = server.client();
    for i in (1..N).step_by(7) {
        if i % 40 != 0 {
            c.ok(
                "APPLY_EVENT",
                json!({"instance_id": id(i), "event": "SHIP"}),
            );
        }
    }
    let before = state_of_all(&mut c);
    drop(c);
    server.kill9();
    server.restart();
    check_after_restart(&server, &before, &applied);

    // And once more across a second compaction and kill -9.
    let mut c = server.client();
    let r = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert!(r["snapshots_created"].as_u64().unwrap() >= 1, "{r}");
    c.ok(
        "APPLY_EVENT",
        json!({"instance_id": id(3), "event": "SHIP"}),
    );
    let before = state_of_all(&mut c);
    drop(c);
    server.kill9();
    server.restart();
    check_after_restart(&server, &before, &applied);
    let mut c = server.client();
    let r = c.ok("CREATE_INSTANCE", json!({"instance_id": "fresh", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
    assert_eq!(r["state"], "created");
    c.ok(
        "APPLY_EVENT",
        json!({"instance_id": "fresh", "event": "PAY"}),
    );
}

#[test]
fn compact_without_force_snapshots_only_shards_without_one() {
    let dir = common::data_dir("compact-noforce");
    let server = Server::start(dir.path(), opts(MANUAL));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let r = c.ok("COMPACT", json!({}));
    assert_eq!(r["snapshots_created"], 2, "{r}");
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "a", "machine": "order", "version": 1}),
    );
    let r = c.ok("COMPACT", json!({"force_snapshot": "yes"}));
    assert_eq!(r["snapshots_created"], 0, "a non-bool force is false: {r}");
    let r = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert_eq!(r["snapshots_created"], 1, "only the changed shard: {r}");
    for k in [
        "segments_deleted",
        "bytes_reclaimed",
        "total_snapshots",
        "wal_segments",
    ] {
        assert!(r[k].is_u64(), "{k} in {r}");
    }
}

/// Writes `n` applies with 1 KiB payloads over a few instances, checking the
/// WAL's segment count as it goes; returns the largest count seen.
fn write_and_watch_segments(server: &Server, n: usize) -> usize {
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    for i in 0..8 {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": format!("w{i}"), "machine": "order", "version": 1}),
        );
    }
    let blob = "y".repeat(1024);
    let mut most = 0;
    for k in 0..n {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("w{}", k % 8), "event": "TICK", "payload": {"k": k, "blob": blob}}),
        );
        if k % 100 == 0 {
            most = most.max(all_segments(&server.data, 2));
        }
    }
    // Let the last round finish.
    std::thread::sleep(Duration::from_millis(2500));
    most.max(all_segments(&server.data, 2))
}

#[test]
fn automatic_compaction_by_event_count_bounds_the_wal() {
    let dir = common::data_dir("auto-events");
    let server = Server::start(
        dir.path(),
        opts(&[
            ("RSTMDB_COMPACT_EVENTS", "300"),
            ("RSTMDB_COMPACT_SIZE_MB", "0"),
            ("RSTMDB_COMPACT_INTERVAL", "0"),
        ]),
    );
    // 6000 commits of one ~2 KiB record, each padded to a 4 KiB block:
    // ~24 MiB of WAL, 12 segments per shard without compaction.
    let most = write_and_watch_segments(&server, 6000);
    assert!(most <= 12, "WAL stayed bounded: at most {most} segments");
    let snaps = std::fs::read_dir(dir.path().join("shard-000/snapshots"))
        .unwrap()
        .count();
    assert!((1..=2).contains(&snaps), "snapshots pruned: {snaps}");
    let mut c = server.client();
    let g = c.ok("GET_INSTANCE", json!({"instance_id": "w3"}));
    assert_eq!(g["ctx"]["k"], 5995);
}

#[test]
fn automatic_compaction_by_wal_size_bounds_the_wal() {
    let dir = common::data_dir("auto-size");
    let mut server = Server::start(
        dir.path(),
        opts(&[
            ("RSTMDB_COMPACT_EVENTS", "0"),
            ("RSTMDB_COMPACT_SIZE_MB", "2"),
            ("RSTMDB_COMPACT_INTERVAL", "0"),
        ]),
    );
    let most = write_and_watch_segments(&server, 6000);
    assert!(most <= 12, "WAL stayed bounded: at most {most} segments");
    server.kill9();
    server.restart();
    let mut c = server.client();
    let g = c.ok("GET_INSTANCE", json!({"instance_id": "w7"}));
    assert_eq!(g["ctx"]["k"], 5999);
}

#[test]
fn snapshot_instance_writes_a_readable_file() {
    let dir = common::data_dir("snap-instance");
    let server = Server::start(dir.path(), opts(MANUAL));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    c.ok("CREATE_INSTANCE", json!({"instance_id": "s1", "machine": "order", "version": 1, "initial_ctx": {"amount": 5}}));
    let a = c.ok("APPLY_EVENT", json!({"instance_id": "s1", "event": "PAY"}));
    let r = c.ok("SNAPSHOT_INSTANCE", json!({"instance_id": "s1"}));
    let sid = r["snapshot_id"].as_str().unwrap();
    assert!(sid.starts_with("snap-"), "{r}");
    assert_eq!(r["wal_offset"], a["wal_offset"]);
    assert_eq!(r["instance_id"], "s1");
    let path = dir
        .path()
        .join("instance-snapshots")
        .join(format!("{sid}.snap"));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(r["size_bytes"].as_u64().unwrap(), bytes.len() as u64);
    assert_eq!(
        r["checksum"].as_str().unwrap(),
        format!("{:08x}", crc32c::crc32c(&bytes))
    );
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["state"], "paid");
    assert_eq!(doc["ctx"]["amount"], 5);
    assert_eq!(doc["snapshot_id"], sid);
    let (code, _) = c.err("SNAPSHOT_INSTANCE", json!({"instance_id": "nope"}));
    assert_eq!(code, "INSTANCE_NOT_FOUND");
    let (code, msg) = c.err("SNAPSHOT_INSTANCE", json!({}));
    assert_eq!(code, "BAD_REQUEST");
    assert!(msg.ends_with("missing instance_id"), "{msg}");
}

fn snapshot_files(data: &Path, shard: usize) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data.join(format!("shard-{shard:03}")).join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    v.sort();
    v
}

fn flip_byte_in_the_middle(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_damaged_newest_snapshot_falls_back_to_an_older_one_and_the_wal() {
    let dir = common::data_dir("snap-fallback");
    // Retention keeps every segment, so the older snapshot stays usable.
    let env = [
        ("RSTMDB_COMPACT_ENABLED", "0"),
        ("RSTMDB_COMPACT_RETENTION_SECS", "3600"),
    ];
    let mut server = Server::start(dir.path(), opts(&env));
    let mut c = server.client();
    let applied = populate(&mut c);
    c.ok("COMPACT", json!({"force_snapshot": true}));
    for i in (1..N).step_by(3) {
        if i % 40 != 0 {
            c.ok(
                "APPLY_EVENT",
                json!({"instance_id": id(i), "event": "SHIP"}),
            );
        }
    }
    let r = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert_eq!(r["segments_deleted"], 0, "retention kept them: {r}");
    let before = state_of_all(&mut c);
    drop(c);
    assert_eq!(server.stop(), Some(0));
    for shard in 0..2 {
        let snaps = snapshot_files(dir.path(), shard);
        assert_eq!(snaps.len(), 2, "{snaps:?}");
        flip_byte_in_the_middle(snaps.last().unwrap());
    }
    server.restart();
    check_after_restart(&server, &before, &applied);
    assert!(
        server.log_text().contains("skipping damaged snapshot"),
        "{}",
        server.log_text()
    );
}

#[test]
fn no_usable_snapshot_stops_start_up_with_a_clear_message() {
    let dir = common::data_dir("snap-none-left");
    let mut server = Server::start(dir.path(), opts(MANUAL));
    let mut c = server.client();
    let applied = populate(&mut c);
    let r = c.ok("COMPACT", json!({"force_snapshot": true}));
    assert!(r["segments_deleted"].as_u64().unwrap() > 0, "{r}");
    let before = state_of_all(&mut c);
    drop(c);
    assert_eq!(server.stop(), Some(0));
    let snap = snapshot_files(dir.path(), 0).pop().unwrap();
    let good = std::fs::read(&snap).unwrap();
    flip_byte_in_the_middle(&snap);

    let mut broken = Server::spawn(dir.path(), opts(MANUAL));
    let (code, log) = broken.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("shard 0")
            && log.contains("compacted away")
            && log.contains("checksum mismatch"),
        "{log}"
    );
    drop(broken);

    // Nothing was touched: with the file repaired, everything is back.
    std::fs::write(&snap, good).unwrap();
    server.restart();
    check_after_restart(&server, &before, &applied);
}

/// A committed atomic batch must survive a restart when only one of its
/// participants has snapshotted since (its part inside the snapshot, the
/// other participant's part replayed from the WAL).
#[test]
fn an_atomic_batch_split_by_one_shards_snapshot_stays_committed() {
    use rstmdb_shards::routing::shard_for;
    let dir = common::data_dir("batch-split-snap");
    let find = |shard: usize| {
        (0..)
            .map(|i| format!("s{shard}-{i}"))
            .find(|id| shard_for(id, 2) == shard)
            .unwrap()
    };
    let (x, y) = (find(0), find(1));
    let env = [
        ("RSTMDB_COMPACT_EVENTS", "40"),
        ("RSTMDB_COMPACT_SIZE_MB", "0"),
        ("RSTMDB_COMPACT_INTERVAL", "0"),
    ];
    let mut server = Server::start(dir.path(), opts(&env));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    for id in [&x, &y] {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": id, "machine": "order", "version": 1}),
        );
    }
    // Both shards snapshot, so the batch below is after both snapshots.
    c.ok("COMPACT", json!({"force_snapshot": true}));
    let r = c.ok(
        "BATCH",
        json!({"mode": "atomic", "ops": [
            {"op": "APPLY_EVENT", "params": {"instance_id": x, "event": "TICK", "payload": {"batch": 1}}},
            {"op": "APPLY_EVENT", "params": {"instance_id": y, "event": "TICK", "payload": {"batch": 1}}}
        ]}),
    );
    assert_eq!(r["results"][1]["status"], "ok", "{r}");
    // Only shard 0 crosses the automatic threshold: it snapshots (its part
    // of the batch now inside), shard 1 does not.
    let snaps0 = snapshot_files(dir.path(), 0);
    let snaps1 = snapshot_files(dir.path(), 1);
    for k in 0..60 {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": x, "event": "TICK", "payload": {"k": k}}),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while snapshot_files(dir.path(), 0) == snaps0 {
        assert!(
            std::time::Instant::now() < deadline,
            "shard 0 never snapshotted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        snapshot_files(dir.path(), 1),
        snaps1,
        "shard 1 did not snapshot"
    );
    drop(c);
    server.kill9();
    server.restart();
    let mut c = server.client();
    let gx = c.ok("GET_INSTANCE", json!({"instance_id": x}));
    let gy = c.ok("GET_INSTANCE", json!({"instance_id": y}));
    assert_eq!(gx["ctx"]["batch"], 1, "{gx}");
    assert_eq!(
        gy["ctx"]["batch"], 1,
        "the batch's other half was undone: {gy}"
    );
}

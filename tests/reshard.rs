//! Re-sharding: starting on a data directory with a different shard count
//! redistributes everything (from snapshots and WAL) into the new layout,
//! atomically; nothing acknowledged is lost and idempotency keys still work.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{Client, Opts, Server};
use serde_json::{json, Value};

fn opts(shards: usize) -> Opts {
    Opts {
        shards,
        segment_mb: 1,
        extra_env: vec![("RSTMDB_COMPACT_ENABLED".into(), "0".into())],
        ..Opts::default()
    }
}

const N: usize = 200;

fn id(i: usize) -> String {
    format!("r-{i}")
}

fn states(c: &mut Client) -> HashMap<String, Value> {
    (0..N).map(|i| (id(i), c.view_instance(&id(i)))).collect()
}

fn meta_shards(data: &Path) -> u64 {
    let m: Value = serde_json::from_slice(&std::fs::read(data.join("meta.json")).unwrap()).unwrap();
    m["shards"].as_u64().unwrap()
}

/// Same states, keys remembered, deletes kept, machine there, writes work.
fn check(server: &Server, before: &HashMap<String, Value>, keyed: &HashMap<String, Value>) {
    let mut c = server.client();
    let after = states(&mut c);
    for (k, v) in before {
        assert_eq!(&after[k], v, "{k} changed by re-sharding");
    }
    for (k, answer) in keyed.iter().filter(|(k, _)| before[*k].is_object()) {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": k, "event": "PAY", "idempotency_key": format!("pay-{k}")}),
        );
        assert_eq!(r["applied"], false, "{r}");
        assert_eq!(r["wal_offset"], answer["wal_offset"]);
    }
    let l = c.ok("LIST_INSTANCES", json!({"limit": 1000}));
    let live = before.values().filter(|v| v.is_object()).count();
    assert_eq!(l["total"].as_u64().unwrap() as usize, live);
    c.ok("GET_MACHINE", json!({"machine": "order", "version": 1}));
}

#[test]
fn changing_the_shard_count_redistributes_everything() {
    let dir = common::data_dir("reshard");
    let mut server = Server::start(dir.path(), opts(2));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let blob = "z".repeat(2048);
    for i in 0..N {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": id(i), "machine": "order", "version": 1,
                                        "initial_ctx": {"amount": i + 1, "blob": blob}}),
        );
    }
    let mut keyed = HashMap::new();
    for i in (0..N).step_by(3) {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": id(i), "event": "PAY", "idempotency_key": format!("pay-{}", id(i))}),
        );
        keyed.insert(id(i), r);
    }
    // Part of the state in snapshots, part only in the WAL.
    c.ok("COMPACT", json!({"force_snapshot": true}));
    for i in (1..N).step_by(3) {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": id(i), "event": "PAY", "idempotency_key": format!("pay-{}", id(i))}),
        );
        keyed.insert(id(i), r);
    }
    for i in (0..N).step_by(25) {
        c.ok("DELETE_INSTANCE", json!({"instance_id": id(i)}));
    }
    let before = states(&mut c);
    drop(c);
    assert_eq!(server.stop(), Some(0));

    // 2 → 3 shards.
    let mut server = Server::start(dir.path(), opts(3));
    assert_eq!(meta_shards(dir.path()), 3);
    assert!(
        !dir.path().join("shard-000").exists(),
        "the old layout is gone"
    );
    check(&server, &before, &keyed);
    let log = server.log_text();
    assert!(log.contains("re-sharding complete"), "{log}");

    // Writes after re-sharding survive kill -9.
    let mut c = server.client();
    for i in (2..N).step_by(3) {
        if i % 25 != 0 {
            c.ok(
                "APPLY_EVENT",
                json!({"instance_id": id(i), "event": "CANCEL"}),
            );
        }
    }
    let before = states(&mut c);
    drop(c);
    server.kill9();
    server.restart();
    check(&server, &before, &keyed);
    drop(server);

    // 3 → 1 shard, from a re-sharded layout.
    let server = Server::start(dir.path(), opts(1));
    assert_eq!(meta_shards(dir.path()), 1);
    check(&server, &before, &keyed);
    let layouts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("layout-"))
        .collect();
    assert_eq!(layouts.len(), 1, "one layout left: {layouts:?}");
    let mut c = server.client();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "after", "machine": "order", "version": 1}),
    );
    // History from before the re-sharding lives in snapshots only (D9),
    // also after compaction found nothing of it to delete.
    for round in 0..2 {
        let (code, msg) = c.err("WATCH_ALL", json!({"from_offset": 1}));
        assert_eq!(code, "BAD_REQUEST");
        assert!(msg.contains("oldest retained offset"), "{msg}");
        if round == 0 {
            c.ok("COMPACT", json!({"force_snapshot": true}));
        }
    }
}

#[test]
fn a_layout_left_by_an_interrupted_resharding_is_removed() {
    let dir = common::data_dir("reshard-leftover");
    let mut server = Server::start(dir.path(), opts(2));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "kept", "machine": "order", "version": 1}),
    );
    drop(c);
    server.kill9();
    // What a crash halfway through writing a new layout leaves.
    let junk = dir.path().join("layout-4-1");
    std::fs::create_dir_all(junk.join("shard-000/snapshots")).unwrap();
    std::fs::write(
        junk.join("shard-000/snapshots/snap-00000000000000000009.snap.tmp"),
        b"x",
    )
    .unwrap();
    server.restart();
    assert!(!junk.exists());
    server
        .client()
        .ok("GET_INSTANCE", json!({"instance_id": "kept"}));
}

#[test]
fn kill_9_during_resharding_loses_nothing() {
    let dir = common::data_dir("reshard-kill");
    let mut server = Server::start(dir.path(), opts(2));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let blob = "k".repeat(4096);
    for i in 0..N {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": id(i), "machine": "order", "version": 1,
                                        "initial_ctx": {"amount": 1, "blob": blob}}),
        );
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": id(i), "event": "PAY", "payload": {"i": i}}),
        );
    }
    let before = states(&mut c);
    drop(c);
    server.kill9();
    drop(server);
    // Kill start-ups that re-shard to 3, 1, 4, … at varying moments.
    for (round, shards) in [3usize, 1, 4, 2, 3].into_iter().enumerate() {
        let mut s = Server::spawn(dir.path(), opts(shards));
        std::thread::sleep(std::time::Duration::from_millis(5 + 40 * round as u64));
        s.kill9();
        drop(s);
        let recorded = meta_shards(dir.path()) as usize;
        let server = Server::start(dir.path(), opts(recorded));
        check(&server, &before, &HashMap::new());
    }
    let server = Server::start(dir.path(), opts(3));
    check(&server, &before, &HashMap::new());
}

//! Engine semantics over RCP: paging, optimistic concurrency, idempotency
//! (D6–D8), soft delete, machines on every shard, timestamps (D22), limits.

mod common;

use std::time::Duration;

use common::{Opts, Server};
use serde_json::json;

fn start(name: &str, opts: Opts) -> (tempfile::TempDir, Server) {
    let dir = common::data_dir(name);
    let server = Server::start(dir.path(), opts);
    server.client().ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    (dir, server)
}

#[test]
fn list_instances_pages_are_stable_across_shards() {
    let (_dir, server) = start(
        "paging",
        Opts {
            shards: 3,
            fsync: "never",
            ..Opts::default()
        },
    );
    let mut c = server.client();
    for i in 0..57 {
        let state_event = if i % 3 == 0 { Some("PAY") } else { None };
        c.ok("CREATE_INSTANCE", json!({"instance_id": format!("inst-{i:03}"), "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
        if let Some(e) = state_event {
            c.ok(
                "APPLY_EVENT",
                json!({"instance_id": format!("inst-{i:03}"), "event": e}),
            );
        }
    }
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = c.ok("LIST_INSTANCES", json!({"limit": 10, "offset": offset}));
        assert_eq!(page["total"], 57);
        let items = page["instances"].as_array().unwrap().clone();
        for it in &items {
            for k in [
                "id",
                "machine",
                "version",
                "state",
                "created_at",
                "updated_at",
                "last_wal_offset",
            ] {
                assert!(it.get(k).is_some(), "summary lacks {k}: {it}");
            }
            seen.push(it["id"].as_str().unwrap().to_owned());
        }
        offset += items.len();
        assert_eq!(page["has_more"], offset < 57);
        if page["has_more"] == false {
            break;
        }
    }
    let expected: Vec<String> = (0..57).map(|i| format!("inst-{i:03}")).collect();
    assert_eq!(seen, expected, "pages cover every id once, in id order");
    let paid = c.ok("LIST_INSTANCES", json!({"state": "paid", "limit": 100}));
    assert_eq!(paid["total"], 19);
    assert_eq!(
        c.ok("LIST_INSTANCES", json!({"machine": "nope"}))["total"],
        0
    );
    let empty = c.ok("LIST_INSTANCES", json!({"limit": 0}));
    assert_eq!(empty["instances"], json!([]));
    assert_eq!(empty["has_more"], true);
    let (code, _) = c.err("LIST_INSTANCES", json!({"limit": -1}));
    assert_eq!(code, "BAD_REQUEST");
}

#[test]
fn optimistic_concurrency_on_state_and_offset() {
    let (_dir, server) = start("occ", Opts::default());
    let mut c = server.client();
    let created = c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "o", "machine": "order", "version": 1, "initial_ctx": {"amount": 5}}),
    );
    let off = created["wal_offset"].as_u64().unwrap();
    let (code, msg) = c.err(
        "APPLY_EVENT",
        json!({"instance_id": "o", "event": "PAY", "expected_wal_offset": off + 1}),
    );
    assert_eq!(code, "CONFLICT");
    assert_eq!(
        msg,
        format!(
            "core error: WAL offset conflict: expected {}, actual {off}",
            off + 1
        )
    );
    let (code, _) = c.err("APPLY_EVENT", json!({"instance_id": "o", "event": "PAY", "expected_state": "paid", "expected_wal_offset": off + 1}));
    assert_eq!(code, "CONFLICT");
    let r = c.ok("APPLY_EVENT", json!({"instance_id": "o", "event": "PAY", "expected_state": "created", "expected_wal_offset": off, "event_id": "e-1"}));
    assert_eq!(r["event_id"], "e-1");
    assert!(r["wal_offset"].as_u64().unwrap() > off);
    let g = c.ok("GET_INSTANCE", json!({"instance_id": "o"}));
    assert_eq!(g["last_event_id"], "e-1");
    assert_eq!(g["last_wal_offset"], r["wal_offset"]);
    // An apply without event_id clears last_event_id.
    c.ok("APPLY_EVENT", json!({"instance_id": "o", "event": "TICK"}));
    assert!(c
        .ok("GET_INSTANCE", json!({"instance_id": "o"}))
        .get("last_event_id")
        .is_none());
}

#[test]
fn idempotency_replays_the_original_result_and_survives_restart() {
    let (dir, mut server) = start("idem", Opts::default());
    let mut c = server.client();
    // D7: create with a key but no id routes the retry to the same instance.
    let a = c.ok("CREATE_INSTANCE", json!({"machine": "order", "version": 1, "initial_ctx": {"amount": 2}, "idempotency_key": "create-1"}));
    let b = c.ok("CREATE_INSTANCE", json!({"machine": "order", "version": 1, "initial_ctx": {"amount": 2}, "idempotency_key": "create-1"}));
    assert_eq!(a, b, "same id, state and offset");
    let id = a["instance_id"].as_str().unwrap().to_owned();
    // With an explicit id.
    let x = c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "x", "machine": "order", "version": 1, "idempotency_key": "k"}),
    );
    assert_eq!(
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": "x", "machine": "order", "version": 1, "idempotency_key": "k"})
        ),
        x
    );
    let (code, _) = c.err(
        "CREATE_INSTANCE",
        json!({"instance_id": "x", "machine": "order", "version": 1}),
    );
    assert_eq!(code, "INSTANCE_EXISTS");

    // D6: an apply replay returns the original result, applied:false, no new record.
    let first = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": id, "event": "PAY", "payload": {"p": 1}, "idempotency_key": "pay-1"}),
    );
    assert_eq!(first["applied"], true);
    let stats = c.ok("WAL_STATS", json!({}));
    let again = c.ok("APPLY_EVENT", json!({"instance_id": id, "event": "SHIP", "payload": {"p": 2}, "idempotency_key": "pay-1"}));
    assert_eq!(again["applied"], false);
    for k in ["from_state", "to_state", "ctx", "wal_offset"] {
        assert_eq!(again[k], first[k], "{k}");
    }
    assert_eq!(
        c.ok("WAL_STATS", json!({}))["entry_count"],
        stats["entry_count"],
        "a replay writes nothing"
    );
    // The same key on another instance is independent.
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "y", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    assert_eq!(
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": "y", "event": "PAY", "idempotency_key": "pay-1"})
        )["applied"],
        true
    );

    // D8: rebuilt after a crash.
    drop(c);
    server.kill9();
    server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let after = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": id, "event": "PAY", "idempotency_key": "pay-1"}),
    );
    assert_eq!(after["applied"], false);
    assert_eq!(after["wal_offset"], first["wal_offset"]);
    assert_eq!(after["ctx"], first["ctx"]);
    assert_eq!(
        c.ok(
            "CREATE_INSTANCE",
            json!({"machine": "order", "version": 1, "idempotency_key": "create-1"})
        ),
        a
    );
}

#[test]
fn soft_delete_and_recreate() {
    let (dir, mut server) = start("delete", Opts::default());
    let mut c = server.client();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "d", "machine": "order", "version": 1, "initial_ctx": {"amount": 3}}),
    );
    let del = c.ok(
        "DELETE_INSTANCE",
        json!({"instance_id": "d", "idempotency_key": "del"}),
    );
    assert_eq!(del["deleted"], true);
    assert_eq!(del["instance_id"], "d");
    let again = c.ok("DELETE_INSTANCE", json!({"instance_id": "d"}));
    assert_eq!(
        again["wal_offset"], del["wal_offset"],
        "second delete returns the original offset"
    );
    for (op, p) in [
        ("GET_INSTANCE", json!({"instance_id": "d"})),
        ("APPLY_EVENT", json!({"instance_id": "d", "event": "PAY"})),
    ] {
        let (code, msg) = c.err(op, p);
        assert_eq!(
            (code.as_str(), msg.as_str()),
            ("INSTANCE_NOT_FOUND", "core error: instance not found: d")
        );
    }
    assert_eq!(c.ok("LIST_INSTANCES", json!({}))["total"], 0);
    let re = c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "d", "machine": "order", "version": 1}),
    );
    assert_eq!(re["state"], "created");
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "d"}))["ctx"],
        json!({}),
        "fresh ctx"
    );
    // Idempotency keys of a deleted predecessor do not match the new instance.
    c.ok("CREATE_INSTANCE", json!({"instance_id": "e", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}, "idempotency_key": "ce"}));
    assert_eq!(
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": "e", "event": "PAY", "idempotency_key": "K"})
        )["applied"],
        true
    );
    c.ok("DELETE_INSTANCE", json!({"instance_id": "e"}));
    let fresh = c.ok("CREATE_INSTANCE", json!({"instance_id": "e", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}, "idempotency_key": "ce"}));
    assert_eq!(
        fresh["state"], "created",
        "the create key of the deleted instance does not replay"
    );
    let again = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": "e", "event": "PAY", "idempotency_key": "K"}),
    );
    assert_eq!(
        again["applied"], true,
        "the apply key of the deleted instance does not replay"
    );
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "e"}))["state"],
        "paid"
    );
    c.ok("DELETE_INSTANCE", json!({"instance_id": "d"}));
    drop(c);
    server.restart();
    let _ = dir;
    let mut c = server.client();
    assert_eq!(
        c.err("GET_INSTANCE", json!({"instance_id": "d"})).0,
        "INSTANCE_NOT_FOUND"
    );
    // Re-creation can be disabled.
    drop(c);
    server.kill9();
    let opts = Opts {
        extra_env: vec![("RSTMDB_ALLOW_INSTANCE_RECREATE".into(), "false".into())],
        ..Opts::default()
    };
    let server = Server::start(&server.data.clone(), opts);
    let (code, _) = server.client().err(
        "CREATE_INSTANCE",
        json!({"instance_id": "d", "machine": "order", "version": 1}),
    );
    assert_eq!(code, "INSTANCE_EXISTS");
}

#[test]
fn machines_reach_every_shard_and_survive_restart_with_timestamps() {
    let (_dir, mut server) = start(
        "machines",
        Opts {
            shards: 3,
            ..Opts::default()
        },
    );
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 7, "definition": common::order_machine()}),
    );
    // Instances on every shard can use the machine.
    for i in 0..30 {
        c.ok("CREATE_INSTANCE", json!({"instance_id": format!("m{i}"), "machine": "order", "version": 7, "initial_ctx": {"amount": 1}}));
    }
    let before = c.ok("LIST_INSTANCES", json!({"limit": 100}));
    std::thread::sleep(Duration::from_millis(20));
    drop(c);
    server.restart();
    let mut c = server.client();
    assert_eq!(
        c.ok("LIST_MACHINES", json!(null)),
        json!({"items": [{"machine": "order", "versions": [1, 7]}]})
    );
    let after = c.ok("LIST_INSTANCES", json!({"limit": 100}));
    assert_eq!(
        before, after,
        "ids, states, offsets and timestamps survive the restart (D22)"
    );
    for i in 0..30 {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("m{i}"), "event": "PAY"}),
        );
    }
    let created = after["instances"][0]["created_at"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        created > now - 600_000 && created <= now,
        "created_at is Unix ms"
    );
}

#[test]
fn machine_version_limit() {
    let opts = Opts {
        extra_env: vec![("RSTMDB_MAX_MACHINE_VERSIONS".into(), "2".into())],
        ..Opts::default()
    };
    let (_dir, server) = start("versions", opts);
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 2, "definition": common::order_machine()}),
    );
    let (code, msg) = c.err(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 3, "definition": common::order_machine()}),
    );
    assert_eq!(code, "MACHINE_VERSION_LIMIT_EXCEEDED");
    assert_eq!(
        msg,
        "machine version limit exceeded: machine 'order' already has 2 versions (limit: 2)"
    );
    // Re-putting an existing version is still fine.
    let r = c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 2, "definition": common::order_machine()}),
    );
    assert_eq!(r["created"], false);
}

#[test]
fn every_ms_policy_really_syncs() {
    let (_dir, server) = start(
        "everyms",
        Opts {
            fsync: "every_ms:20",
            ..Opts::default()
        },
    );
    let mut c = server.client();
    // Let the timer sync the PUT_MACHINE of start() first.
    std::thread::sleep(Duration::from_millis(300));
    let before = c.ok("WAL_STATS", json!({}))["io_stats"]["fsyncs"]
        .as_u64()
        .unwrap();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "t", "machine": "order", "version": 1}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = c.ok("WAL_STATS", json!({}))["io_stats"]["fsyncs"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "a write under every_ms must be synced by the timer ({before} -> {after})"
    );
}

#[test]
fn idle_connections_are_closed() {
    let opts = Opts {
        extra_env: vec![("RSTMDB_IDLE_TIMEOUT".into(), "1".into())],
        ..Opts::default()
    };
    let (_dir, server) = start("idle", opts);
    let mut c = server.client();
    assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.is_closed(), "closed after idle_timeout_secs");
    // Activity pushes the deadline on: a connection that sends a request
    // every 400 ms outlives several timeouts, then closes once quiet.
    let mut busy = server.client();
    for _ in 0..6 {
        assert_eq!(busy.ok("PING", json!({})), json!({"pong": true}));
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(busy.ok("PING", json!({})), json!({"pong": true}));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(busy.is_closed(), "closed once quiet for idle_timeout_secs");
}

#[test]
fn hostile_inputs_get_answers_not_crashes() {
    let (_dir, server) = start("hostile", Opts::default());
    let mut c = server.client();
    // A 15 MiB context: stored and read back.
    let big = "x".repeat(15 * 1024 * 1024);
    let r = c.ok("CREATE_INSTANCE", json!({"instance_id": "big", "machine": "order", "version": 1, "initial_ctx": {"blob": big, "amount": 1}}));
    assert_eq!(r["state"], "created");
    let g = c.ok("GET_INSTANCE", json!({"instance_id": "big"}));
    assert_eq!(g["ctx"]["blob"].as_str().unwrap().len(), big.len());
    // Growing it past the WAL record limit is refused cleanly, state unchanged.
    let (code, msg) = c.err("APPLY_EVENT", json!({"instance_id": "big", "event": "TICK", "payload": {"more": "y".repeat(2 * 1024 * 1024)}}));
    assert_eq!(code, "BAD_REQUEST", "{msg}");
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "big"}))["last_wal_offset"],
        g["last_wal_offset"]
    );
    // Wrong types.
    for p in [
        json!({"instance_id": "big", "event": 5}),
        json!({"instance_id": ["a"], "event": "E"}),
        json!(null),
        json!("str"),
    ] {
        assert_eq!(c.err("APPLY_EVENT", p).0, "BAD_REQUEST");
    }
    let (code, msg) = c.err(
        "CREATE_INSTANCE",
        json!({"machine": "order", "version": 1, "initial_ctx": [1]}),
    );
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "BAD_REQUEST",
            "invalid request: initial_ctx must be a JSON object"
        )
    );
    assert_eq!(
        c.err(
            "CREATE_INSTANCE",
            json!({"machine": "order", "version": 4294967296u64})
        )
        .0,
        "BAD_REQUEST"
    );
    // Deeply nested JSON: the envelope is refused (connection closed), no crash.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = format!(r#"{{"type":"request","id":"d","op":"PING","params":{deep}}}"#);
    let mut d = server.client();
    d.send(&common::frame(text.as_bytes()));
    assert!(d.read_frame().is_none());
    // A client that sends half a frame and vanishes.
    let mut h = server.client();
    let f = common::request_frame("h", "PING", &json!({}));
    h.send(&f[..10]);
    drop(h);
    // A frame declaring 16 MiB that never arrives does not block others.
    let mut t = server.client();
    let mut hdr = common::frame(b"");
    hdr[10..14].copy_from_slice(&(16u32 * 1024 * 1024).to_be_bytes());
    t.send(&hdr);
    assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "big"}))["state"],
        "created"
    );
}

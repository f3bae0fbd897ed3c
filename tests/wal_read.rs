//! WAL_READ (paging, frame-bounded pages, entry shapes) and FLUSH_ALL
//! (durable when enabled, D12).

mod common;

use common::{Opts, Server};
use serde_json::{json, Value};

fn read_all(c: &mut common::Client, limit: Option<u64>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0u64;
    loop {
        let mut p = json!({"from_offset": from});
        if let Some(l) = limit {
            p["limit"] = json!(l);
        }
        let page = c.ok("WAL_READ", p);
        let recs = page["records"].as_array().unwrap().clone();
        if recs.is_empty() {
            assert_eq!(page["next_offset"], Value::Null);
            return out;
        }
        if let Some(l) = limit {
            assert!(recs.len() as u64 <= l);
        }
        let last = recs.last().unwrap()["offset"].as_u64().unwrap();
        assert_eq!(page["next_offset"], last + 1);
        from = last + 1;
        out.extend(recs);
    }
}

#[test]
fn paging_returns_every_record_once_in_offset_order() {
    let dir = common::data_dir("walread");
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 3,
            fsync: "never",
            ..Opts::default()
        },
    );
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let mut offsets = Vec::new();
    for i in 0..40 {
        let r = c.ok("CREATE_INSTANCE", json!({"instance_id": format!("w{i}"), "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
        offsets.push(r["wal_offset"].as_u64().unwrap());
        let a = c.ok("APPLY_EVENT", json!({"instance_id": format!("w{i}"), "event": "PAY", "payload": {"i": i}, "event_id": format!("e{i}"), "idempotency_key": format!("k{i}")}));
        offsets.push(a["wal_offset"].as_u64().unwrap());
    }
    // An idempotent replay writes no record.
    let again = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": "w0", "event": "PAY", "idempotency_key": "k0"}),
    );
    assert_eq!(again["applied"], false);
    c.ok("DELETE_INSTANCE", json!({"instance_id": "w1"}));

    let all = read_all(&mut c, None);
    let small = read_all(&mut c, Some(7));
    assert_eq!(all, small, "any page size reads the same log");
    let got: Vec<u64> = all.iter().map(|r| r["offset"].as_u64().unwrap()).collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(got, sorted, "strictly increasing, no duplicate");
    // 3 put_machine (one per shard) + 40 creates + 40 applies + 1 delete.
    assert_eq!(all.len(), 3 + 80 + 1);
    for o in &offsets {
        assert!(
            got.contains(o),
            "offset {o} returned by a write is in the log"
        );
    }
    for r in &all {
        assert_eq!(r["sequence"], r["offset"]);
        let e = &r["entry"];
        match e["type"].as_str().unwrap() {
            "put_machine" => assert_eq!(e["machine"], "order"),
            "create_instance" => {
                assert_eq!(e["machine"], "order");
                assert_eq!(e["version"], 1);
                assert_eq!(e["initial_state"], "created");
            }
            "apply_event" => {
                assert_eq!(e["from_state"], "created");
                assert_eq!(e["to_state"], "paid");
                assert_eq!(e["event"], "PAY");
                assert_eq!(e["payload"]["i"], e["ctx"]["i"]);
                assert!(e["idempotency_key"].is_string() && e["event_id"].is_string());
            }
            "delete_instance" => assert_eq!(e["instance_id"], "w1"),
            other => panic!("unexpected entry type {other}"),
        }
    }
    // limit 0 → no records; from beyond the end → none; bad params.
    assert_eq!(
        c.ok("WAL_READ", json!({"from_offset": 0, "limit": 0}))["records"],
        json!([])
    );
    assert_eq!(
        c.ok("WAL_READ", json!({"from_offset": 1u64 << 60}))["next_offset"],
        Value::Null
    );
    let (code, msg) = c.err("WAL_READ", json!({"limit": 5}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("BAD_REQUEST", "invalid request: missing from_offset")
    );
    assert_eq!(
        c.err("WAL_READ", json!({"from_offset": -1})).0,
        "BAD_REQUEST"
    );
    // A non-integer limit is ignored (the reference's rule).
    assert!(
        !c.ok("WAL_READ", json!({"from_offset": 0, "limit": "x"}))["records"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_log_larger_than_a_frame_is_read_in_bounded_pages() {
    let dir = common::data_dir("walread-big");
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 2,
            fsync: "never",
            segment_mb: 8,
            ..Opts::default()
        },
    );
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let blob = "b".repeat(1024 * 1024);
    for i in 0..12 {
        c.ok("CREATE_INSTANCE", json!({"instance_id": format!("big{i}"), "machine": "order", "version": 1, "initial_ctx": {"blob": blob, "amount": 1}}));
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("big{i}"), "event": "TICK"}),
        );
    }
    // ~24 MiB of records: an unlimited read must still answer within a frame.
    let page = c.ok("WAL_READ", json!({"from_offset": 0}));
    let n = page["records"].as_array().unwrap().len();
    assert!(n > 0 && n < 2 + 24, "a bounded first page, got {n} records");
    assert!(page["next_offset"].is_u64());
    let all = read_all(&mut c, None);
    assert_eq!(
        all.len(),
        2 + 24,
        "paging returns every record exactly once"
    );
    let offsets: Vec<u64> = all.iter().map(|r| r["offset"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn flush_all_when_enabled_is_durable() {
    let dir = common::data_dir("flush");
    let opts = Opts {
        shards: 2,
        extra_env: vec![("RSTMDB_ALLOW_FLUSH_ALL".into(), "true".into())],
        ..Opts::default()
    };
    let mut server = Server::start(dir.path(), opts.clone());
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 2, "definition": common::order_machine()}),
    );
    for i in 0..10 {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": format!("f{i}"), "machine": "order", "version": 1}),
        );
    }
    c.ok("DELETE_INSTANCE", json!({"instance_id": "f0"}));
    let r = c.ok("FLUSH_ALL", json!({}));
    assert_eq!(
        r,
        json!({"flushed": true, "instances_removed": 10, "machines_removed": 2})
    );
    assert_eq!(c.ok("LIST_MACHINES", json!({})), json!({"items": []}));
    assert_eq!(c.ok("LIST_INSTANCES", json!({}))["total"], 0);
    drop(c);
    server.kill9();
    server = Server::start(dir.path(), opts);
    let mut c = server.client();
    assert_eq!(
        c.ok("LIST_MACHINES", json!({})),
        json!({"items": []}),
        "still flushed after a restart (D12)"
    );
    assert_eq!(
        c.err("GET_INSTANCE", json!({"instance_id": "f3"})).0,
        "INSTANCE_NOT_FOUND"
    );
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "f3", "machine": "order", "version": 1}),
    );
}

/// WAL_STATS `io_stats` counts the reads that WAL_READ and a watch's
/// catch-up make (rstmdb-studio shows them), and every WAL_READ entry that
/// has a time carries it as `timestamp` too, beside `ts` (the studio's
/// event history reads `timestamp`).
#[test]
fn reads_are_counted_and_entries_carry_timestamp() {
    let dir = common::data_dir("walread-io");
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 2,
            fsync: "never",
            ..Opts::default()
        },
    );
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    common::setup_orders(&server, 6);
    let mut c = server.client();
    c.ok("APPLY_EVENT", json!({"instance_id": "i1", "event": "PAY"}));
    c.ok("DELETE_INSTANCE", json!({"instance_id": "i2"}));
    let io = |c: &mut common::Client| {
        let s = c.ok("WAL_STATS", json!({}));
        (
            s["io_stats"]["reads"].as_u64().unwrap(),
            s["io_stats"]["bytes_read"].as_u64().unwrap(),
        )
    };
    let start = io(&mut c);

    let all = read_all(&mut c, None);
    let after_read = io(&mut c);
    assert!(
        after_read.0 > start.0,
        "reads counted: {start:?} -> {after_read:?}"
    );
    assert!(
        after_read.1 > start.1,
        "bytes counted: {start:?} -> {after_read:?}"
    );

    let mut timed = 0;
    for r in &all {
        let e = &r["entry"];
        if e["type"] == "put_machine" {
            assert!(e.get("timestamp").is_none(), "{e}");
            continue;
        }
        assert_eq!(e["timestamp"], e["ts"], "{e}");
        assert!(e["timestamp"].as_i64().unwrap() >= before_ms, "{e}");
        timed += 1;
    }
    assert_eq!(timed, 6 + 1 + 1, "creates, the apply and the delete");

    // A watch catching up from the start reads the log too.
    let mut w = server.client();
    w.ok("WATCH_ALL", json!({"from_offset": 0}));
    let event = w.read_frame_timeout().expect("the caught-up event");
    assert_eq!(event["type"], "event", "{event}");
    let after_watch = io(&mut c);
    assert!(
        after_watch.0 > after_read.0,
        "catch-up reads counted: {after_read:?} -> {after_watch:?}"
    );
}

//! BATCH (PROTOCOL.md §7.15, SEMANTICS.md §9): best effort, structure
//! errors, nesting, BYE inside; atomic mode refused until it is all-or-
//! nothing (D11).

mod common;

use common::{Opts, Server};
use serde_json::{json, Value};

fn start(name: &str) -> (tempfile::TempDir, Server) {
    let dir = common::data_dir(name);
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 2,
            ..Opts::default()
        },
    );
    server.client().ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    (dir, server)
}

#[test]
fn best_effort_runs_every_op_and_reports_each() {
    let (_dir, server) = start("batch");
    let mut c = server.client();
    let r = c.ok(
        "BATCH",
        json!({"mode": "best_effort", "ops": [
            {"op": "CREATE_INSTANCE", "params": {"instance_id": "b1", "machine": "order", "version": 1, "initial_ctx": {"amount": 2}}},
            {"op": "APPLY_EVENT", "params": {"instance_id": "b1", "event": "PAY"}},
            {"op": "APPLY_EVENT", "params": {"instance_id": "b1", "event": "PAY"}},
            {"op": "GET_INSTANCE", "params": {"instance_id": "b1"}},
            {"op": "CREATE_INSTANCE", "params": {"instance_id": "b2", "machine": "order", "version": 1}},
            {"op": "PING"},
            {"op": "GET_INSTANCE", "params": {"instance_id": 5}},
            {"op": "BATCH", "params": {"ops": [{"op": "GET_INSTANCE", "params": {"instance_id": "b2"}}]}}
        ]}),
    );
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 8);
    for res in results {
        assert!(
            res.get("result").is_some() && res.get("error").is_some(),
            "both keys always present: {res}"
        );
    }
    assert_eq!(results[0]["status"], "ok");
    assert_eq!(results[0]["error"], Value::Null);
    assert_eq!(results[1]["result"]["to_state"], "paid");
    assert_eq!(results[2]["status"], "error");
    assert_eq!(results[2]["result"], Value::Null);
    assert_eq!(results[2]["error"]["code"], "INVALID_TRANSITION");
    assert_eq!(results[2]["error"]["retryable"], false);
    assert_eq!(
        results[3]["result"]["state"], "paid",
        "later ops see earlier ones"
    );
    assert_eq!(results[5]["result"], json!({"pong": true}));
    assert_eq!(results[6]["error"]["code"], "BAD_REQUEST");
    assert_eq!(
        results[7]["result"]["results"][0]["result"]["state"],
        "created"
    );
    // Mode absent = best effort; empty ops.
    assert_eq!(c.ok("BATCH", json!({"ops": []})), json!({"results": []}));
}

#[test]
fn structural_errors() {
    let (_dir, server) = start("batch-structure");
    let mut c = server.client();
    let (code, msg) = c.err("BATCH", json!({"mode": "best_effort"}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("BAD_REQUEST", "invalid request: missing ops array")
    );
    let many: Vec<Value> = (0..101).map(|_| json!({"op": "PING"})).collect();
    let (_, msg) = c.err("BATCH", json!({"ops": many}));
    assert_eq!(msg, "invalid request: batch size 101 exceeds limit 100");
    // Aborts after the preceding ops ran (the reference's behaviour).
    let (_, msg) = c.err("BATCH", json!({"ops": [
        {"op": "CREATE_INSTANCE", "params": {"instance_id": "s1", "machine": "order", "version": 1}},
        {"params": {}}
    ]}));
    assert_eq!(msg, "invalid request: missing op type");
    c.ok("GET_INSTANCE", json!({"instance_id": "s1"}));
    let (_, msg) = c.err("BATCH", json!({"ops": [{"op": "NOPE"}]}));
    assert!(
        msg.starts_with("invalid request: unknown variant `NOPE`, expected one of `HELLO`"),
        "{msg}"
    );
    // Deep nesting is bounded.
    let mut nested = json!({"ops": [{"op": "PING"}]});
    for _ in 0..20 {
        nested = json!({"ops": [{"op": "BATCH", "params": nested}]});
    }
    let r = c.ok("BATCH", nested);
    let mut inner = &r;
    let mut depth = 0;
    while inner["results"][0]["status"] == "ok" {
        inner = &inner["results"][0]["result"];
        depth += 1;
    }
    assert!(depth < 20, "nesting stopped by a clear error");
    assert_eq!(inner["results"][0]["error"]["code"], "BAD_REQUEST");
}

#[test]
fn atomic_batches_are_all_or_nothing_across_shards() {
    let (_dir, server) = start("batch-atomic");
    let mut c = server.client();
    // Instances on both shards.
    let ids: Vec<String> = (0..8).map(|i| format!("at{i}")).collect();
    for id in &ids {
        c.ok("CREATE_INSTANCE", json!({"instance_id": id, "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
    }
    let shards: std::collections::HashSet<usize> = ids
        .iter()
        .map(|id| rstmdb_shards::routing::shard_for(id, 2))
        .collect();
    assert_eq!(shards.len(), 2, "the batch spans both shards");
    let mut w = server.client();
    w.ok("WATCH_ALL", json!({}));
    let before_wal = c.ok("WAL_STATS", json!({}))["entry_count"].clone();

    // A failing op anywhere (the last one) leaves no effect of any op.
    let mut ops: Vec<Value> = ids.iter().map(|id| json!({"op": "APPLY_EVENT", "params": {"instance_id": id, "event": "PAY", "payload": {"batch": 1}}})).collect();
    ops.push(json!({"op": "CREATE_INSTANCE", "params": {"instance_id": "new-1", "machine": "order", "version": 1}}));
    ops.push(json!({"op": "APPLY_EVENT", "params": {"instance_id": "at0", "event": "NOPE"}}));
    let (code, msg) = c.err("BATCH", json!({"mode": "atomic", "ops": ops}));
    assert_eq!(code, "BAD_REQUEST");
    assert!(
        msg.starts_with(
            "invalid request: atomic batch failed: op 9 (APPLY_EVENT): INVALID_TRANSITION"
        ),
        "{msg}"
    );
    for id in &ids {
        let g = c.ok("GET_INSTANCE", json!({"instance_id": id}));
        assert_eq!(g["state"], "created", "{id} untouched");
        assert_eq!(g["ctx"], json!({"amount": 1}));
    }
    assert_eq!(
        c.err("GET_INSTANCE", json!({"instance_id": "new-1"})).0,
        "INSTANCE_NOT_FOUND"
    );
    assert_eq!(
        c.ok("WAL_STATS", json!({}))["entry_count"],
        before_wal,
        "nothing logged"
    );
    w.stream
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    assert!(
        w.read_frame_timeout().is_none(),
        "no event for a failed batch"
    );

    // A successful one: later ops see earlier ones; results in order.
    let ops = json!([
        {"op": "APPLY_EVENT", "params": {"instance_id": "at0", "event": "PAY", "payload": {"b": 2}}},
        {"op": "APPLY_EVENT", "params": {"instance_id": "at1", "event": "PAY", "payload": {"b": 2}}},
        {"op": "APPLY_EVENT", "params": {"instance_id": "at0", "event": "SHIP"}},
        {"op": "GET_INSTANCE", "params": {"instance_id": "at0"}},
        {"op": "CREATE_INSTANCE", "params": {"instance_id": "new-2", "machine": "order", "version": 1}},
        {"op": "PING"}
    ]);
    let r = c.ok("BATCH", json!({"mode": "atomic", "ops": ops}));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    assert!(results.iter().all(|x| x["status"] == "ok"), "{r}");
    assert_eq!(results[2]["result"]["from_state"], "paid");
    assert_eq!(results[3]["result"]["state"], "shipped");
    assert_eq!(results[5]["result"], json!({"pong": true}));
    let g = c.ok("GET_INSTANCE", json!({"instance_id": "at0"}));
    assert_eq!(g["last_wal_offset"], results[2]["result"]["wal_offset"]);
    c.ok("GET_INSTANCE", json!({"instance_id": "new-2"}));
    let evs: Vec<u64> = (0..3)
        .filter_map(|_| w.read_frame_timeout())
        .map(|e| e["wal_offset"].as_u64().unwrap())
        .collect();
    let mut want: Vec<u64> = [0, 1, 2]
        .iter()
        .map(|&i| results[i]["result"]["wal_offset"].as_u64().unwrap())
        .collect();
    want.sort_unstable();
    assert_eq!(evs, want, "events of a committed batch, in offset order");
    // Ops that cannot be atomic are refused before anything runs.
    let (code, msg) = c.err("BATCH", json!({"mode": "atomic", "ops": [{"op": "APPLY_EVENT", "params": {"instance_id": "at2", "event": "PAY"}}, {"op": "LIST_INSTANCES"}]}));
    assert_eq!(code, "BAD_REQUEST");
    assert!(
        msg.contains("op 1 (LIST_INSTANCES) cannot be part of an atomic batch"),
        "{msg}"
    );
    assert_eq!(
        c.ok("GET_INSTANCE", json!({"instance_id": "at2"}))["state"],
        "created"
    );
}

#[test]
fn bye_inside_a_batch_closes_after_the_answer() {
    let (_dir, server) = start("batch-bye");
    let mut c = server.client();
    let r = c.ok(
        "BATCH",
        json!({"ops": [{"op": "PING"}, {"op": "BYE"}, {"op": "PING"}]}),
    );
    assert_eq!(r["results"][1]["result"], json!({"goodbye": true}));
    assert_eq!(r["results"][2]["result"], json!({"pong": true}));
    assert!(c.is_closed());
}

#[test]
fn atomic_batches_survive_restart_and_replay_to_subscribers() {
    let dir = common::data_dir("batch-atomic-restart");
    let opts = Opts {
        shards: 2,
        ..Opts::default()
    };
    let mut server = Server::start(dir.path(), opts.clone());
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    let on = |shard: usize| {
        (0..)
            .map(|i| format!("r{i}"))
            .find(|id| rstmdb_shards::routing::shard_for(id, 2) == shard)
            .unwrap()
    };
    let (x, y) = (on(0), on(1));
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": x, "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": y, "machine": "order", "version": 1}),
    );
    c.ok("DELETE_INSTANCE", json!({"instance_id": y}));
    let start = c.ok("WAL_STATS", json!({}))["latest_offset"]
        .as_u64()
        .unwrap();
    // One part changes something, the other nothing (a repeated delete):
    // both parts are logged, so the batch survives any restart.
    let r = c.ok("BATCH", json!({"mode": "atomic", "ops": [
        {"op": "APPLY_EVENT", "params": {"instance_id": x, "event": "PAY", "payload": {"p": 1}}},
        {"op": "DELETE_INSTANCE", "params": {"instance_id": y}}
    ]}));
    let pay_offset = r["results"][0]["result"]["wal_offset"].as_u64().unwrap();
    let later = c.ok("APPLY_EVENT", json!({"instance_id": x, "event": "SHIP"}));
    drop(c);
    server.stop();
    let server = Server::start(dir.path(), opts);
    let mut c = server.client();
    let g = c.ok("GET_INSTANCE", json!({"instance_id": x}));
    assert_eq!(g["state"], "shipped");
    assert_eq!(g["ctx"]["p"], 1);
    assert_eq!(g["last_wal_offset"], later["wal_offset"]);
    // A subscriber replaying the log sees the batch's transition.
    let mut s = server.client();
    s.ok("WATCH_ALL", json!({"from_offset": start}));
    s.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let e1 = s.read_frame().unwrap();
    let e2 = s.read_frame().unwrap();
    assert_eq!(
        (e1["wal_offset"].as_u64(), e1["event"].as_str()),
        (Some(pay_offset), Some("PAY"))
    );
    assert_eq!(e2["wal_offset"], later["wal_offset"]);
}

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
fn atomic_mode_is_refused_without_running_anything() {
    let (_dir, server) = start("batch-atomic");
    let mut c = server.client();
    let (code, msg) = c.err("BATCH", json!({"mode": "atomic", "ops": [
        {"op": "CREATE_INSTANCE", "params": {"instance_id": "a1", "machine": "order", "version": 1}}
    ]}));
    assert_eq!(code, "BAD_REQUEST");
    assert!(msg.contains("atomic"), "{msg}");
    assert_eq!(
        c.err("GET_INSTANCE", json!({"instance_id": "a1"})).0,
        "INSTANCE_NOT_FOUND"
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

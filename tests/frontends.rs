//! Several frontends (`server.frontends`): connections are spread over
//! them by the kernel; every behaviour that spans connections still holds —
//! subscribers see writes made through any frontend, atomic batches and
//! compaction rounds coordinate across them, the connection limit is the
//! server's, and a graceful shutdown stops them all.

mod common;

use std::time::Duration;

use common::{Opts, Server};
use serde_json::json;

fn opts() -> Opts {
    Opts {
        shards: 2,
        extra_env: vec![
            ("RSTMDB_FRONTENDS".into(), "3".into()),
            ("RSTMDB_COMPACT_ENABLED".into(), "0".into()),
        ],
        ..Opts::default()
    }
}

#[test]
fn three_frontends_behave_as_one_server() {
    let dir = common::data_dir("frontends");
    let mut server = Server::start(dir.path(), opts());
    let mut admin = server.client();
    admin.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    // Watchers on several connections (likely on different frontends).
    let mut watchers: Vec<_> = (0..6)
        .map(|_| {
            let mut w = server.client();
            w.ok("WATCH_ALL", json!({"include_ctx": false}));
            w
        })
        .collect();
    let mut writers: Vec<_> = (0..6).map(|_| server.client()).collect();
    for (k, w) in writers.iter_mut().enumerate() {
        w.ok("CREATE_INSTANCE", json!({"instance_id": format!("f{k}"), "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
        w.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("f{k}"), "event": "PAY"}),
        );
    }
    // Every watcher sees every apply, whichever frontend it came through.
    for w in watchers.iter_mut() {
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 6 {
            let ev = w.read_frame().expect("event");
            assert_eq!(ev["type"], "event", "{ev}");
            seen.insert(ev["instance_id"].as_str().unwrap().to_owned());
        }
    }
    // An atomic batch and a compaction round from different connections.
    let r = writers[0].ok(
        "BATCH",
        json!({"mode": "atomic", "ops": [
            {"op": "APPLY_EVENT", "params": {"instance_id": "f1", "event": "SHIP"}},
            {"op": "APPLY_EVENT", "params": {"instance_id": "f2", "event": "SHIP"}}
        ]}),
    );
    assert_eq!(r["results"][1]["status"], "ok", "{r}");
    let c = writers[1].ok("COMPACT", json!({"force_snapshot": true}));
    assert_eq!(c["snapshots_created"], 2, "{c}");
    // Nothing was deleted (the segments are large): history replays on
    // every frontend.
    for w in writers.iter_mut() {
        w.ok("WATCH_ALL", json!({"from_offset": 1}));
    }
    drop(watchers);
    drop(writers);
    drop(admin);
    assert_eq!(server.stop(), Some(0), "graceful shutdown of all frontends");
    server.restart();
    let mut c = server.client();
    for k in 0..6 {
        let g = c.ok("GET_INSTANCE", json!({"instance_id": format!("f{k}")}));
        let want = if k == 1 || k == 2 { "shipped" } else { "paid" };
        assert_eq!(g["state"], want);
    }
}

#[test]
fn the_connection_limit_is_the_servers_not_each_frontends() {
    let dir = common::data_dir("frontends-limit");
    let mut o = opts();
    o.extra_env
        .push(("RSTMDB_MAX_CONNECTIONS".into(), "4".into()));
    let server = Server::start(dir.path(), o);
    // Let the harness's readiness probe connection be seen closed.
    std::thread::sleep(Duration::from_millis(300));
    let mut open: Vec<_> = (0..4).map(|_| server.client()).collect();
    for c in open.iter_mut() {
        c.ok("PING", json!({}));
    }
    // The extra ones are closed without a byte, whichever frontend got them.
    for _ in 0..6 {
        let mut extra = server.client();
        extra
            .stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(extra.is_closed(), "a connection over the limit was served");
    }
    for c in open.iter_mut() {
        c.ok("PING", json!({}));
    }
}

#[test]
fn a_second_server_on_the_same_port_is_refused() {
    let dir = common::data_dir("port-taken");
    let first = Server::start(dir.path(), opts());
    let other = common::data_dir("port-taken-2");
    let mut second = Server::spawn_on(other.path(), opts(), first.addr);
    let (code, log) = second.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("cannot listen on"), "{log}");
    first.client().ok("PING", json!({}));
}

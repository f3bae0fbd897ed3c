//! Subscriptions over raw RCP: filters, include_ctx, per-subscription
//! copies, reply before events, offset order, catch-up from `from_offset`
//! (D9) joining live with no gap or duplicate while writers run, a slow
//! subscriber that resumes, idempotent replays (D6), UNWATCH.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{request_frame, Client, Opts, Server};
use serde_json::{json, Value};

fn start(name: &str, shards: usize) -> (tempfile::TempDir, Server) {
    let dir = common::data_dir(name);
    let server = Server::start(
        dir.path(),
        Opts {
            shards,
            fsync: "never",
            ..Opts::default()
        },
    );
    server.client().ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    server.client().ok(
        "PUT_MACHINE",
        json!({"machine": "other", "version": 2, "definition": common::order_machine()}),
    );
    (dir, server)
}

/// Reads events until `n` arrived or `within` passed.
fn events(c: &mut Client, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while out.len() < n && Instant::now() < deadline {
        if let Some(f) = c.read_frame_timeout() {
            assert_eq!(f["type"], "event", "only events expected here: {f}");
            out.push(f);
        }
    }
    out
}

#[test]
fn filters_ctx_and_per_subscription_copies() {
    let (_dir, server) = start("watch-filters", 2);
    let mut w = server.client();
    let all = w.ok("WATCH_ALL", json!(null));
    assert!(all["subscription_id"].as_str().unwrap().starts_with("sub-"));
    assert!(all["wal_offset"].is_u64());
    let paid = w.ok(
        "WATCH_ALL",
        json!({"to_states": ["paid"], "include_ctx": false}),
    )["subscription_id"]
        .clone();
    let other = w.ok(
        "WATCH_ALL",
        json!({"machines": ["other"], "events": ["TICK", "PAY"], "from_states": ["created"]}),
    )["subscription_id"]
        .clone();
    let mut c = server.client();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "a", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "b", "machine": "other", "version": 2, "initial_ctx": {"amount": 1}}),
    );
    let inst = w.ok("WATCH_INSTANCE", json!({"instance_id": "b"}));
    assert_eq!(inst["current_state"], "created");
    assert_eq!(inst["instance_id"], "b");
    let inst_sub = inst["subscription_id"].clone();
    let a1 = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": "a", "event": "PAY", "payload": {"x": 1}}),
    );
    let b1 = c.ok("APPLY_EVENT", json!({"instance_id": "b", "event": "TICK"}));
    let b2 = c.ok("APPLY_EVENT", json!({"instance_id": "b", "event": "PAY"}));
    // A failed apply produces nothing; an idempotent replay produces nothing (D6).
    c.err("APPLY_EVENT", json!({"instance_id": "a", "event": "PAY"}));
    let k1 = c.ok(
        "APPLY_EVENT",
        json!({"instance_id": "a", "event": "SHIP", "idempotency_key": "k"}),
    );
    assert_eq!(
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": "a", "event": "SHIP", "idempotency_key": "k"})
        )["applied"],
        false
    );

    // all: a1 b1 b2 k1; paid: a1 b2; other: b1 b2; inst: b1 b2  → 10 messages
    let got = events(&mut w, 10, Duration::from_secs(10));
    assert_eq!(got.len(), 10, "{got:#?}");
    let mut by_sub: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &got {
        by_sub
            .entry(e["subscription_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    let offs = |sub: &Value| -> Vec<u64> {
        by_sub[sub.as_str().unwrap()]
            .iter()
            .map(|e| e["wal_offset"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        offs(&all["subscription_id"]),
        vec![
            a1["wal_offset"].as_u64().unwrap(),
            b1["wal_offset"].as_u64().unwrap(),
            b2["wal_offset"].as_u64().unwrap(),
            k1["wal_offset"].as_u64().unwrap()
        ]
    );
    assert_eq!(
        offs(&paid),
        vec![
            a1["wal_offset"].as_u64().unwrap(),
            b2["wal_offset"].as_u64().unwrap()
        ]
    );
    assert_eq!(
        offs(&other),
        vec![
            b1["wal_offset"].as_u64().unwrap(),
            b2["wal_offset"].as_u64().unwrap()
        ]
    );
    assert_eq!(
        offs(&inst_sub),
        vec![
            b1["wal_offset"].as_u64().unwrap(),
            b2["wal_offset"].as_u64().unwrap()
        ]
    );
    let first = by_sub[all["subscription_id"].as_str().unwrap()][0];
    assert_eq!(first["instance_id"], "a");
    assert_eq!(first["machine"], "order");
    assert_eq!(first["version"], 1);
    assert_eq!(first["from_state"], "created");
    assert_eq!(first["to_state"], "paid");
    assert_eq!(first["event"], "PAY");
    assert_eq!(first["payload"], json!({"x": 1}));
    assert_eq!(first["ctx"], json!({"amount": 1, "x": 1}));
    assert!(
        by_sub[paid.as_str().unwrap()][0].get("ctx").is_none(),
        "include_ctx false"
    );
    assert_eq!(
        by_sub[all["subscription_id"].as_str().unwrap()][1]["payload"],
        Value::Null
    );

    // UNWATCH: removed, then unknown.
    assert_eq!(
        w.ok(
            "UNWATCH",
            json!({"subscription_id": all["subscription_id"]})
        )["removed"],
        true
    );
    assert_eq!(
        w.ok(
            "UNWATCH",
            json!({"subscription_id": all["subscription_id"]})
        )["removed"],
        false
    );
    c.ok("APPLY_EVENT", json!({"instance_id": "b", "event": "SHIP"}));
    let after = events(&mut w, 1, Duration::from_secs(5));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["subscription_id"], inst_sub);
    assert_eq!(
        w.err("WATCH_INSTANCE", json!({"instance_id": "nope"})).0,
        "INSTANCE_NOT_FOUND"
    );
    assert_eq!(
        w.err("WATCH_ALL", json!({"machines": "order"})).0,
        "BAD_REQUEST"
    );
}

#[test]
fn the_reply_comes_before_any_event_and_responses_before_their_events() {
    let (_dir, server) = start("watch-order", 1);
    let mut c = server.client();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "a", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    // WATCH and an APPLY pipelined on the same connection.
    let bytes = [
        request_frame("w", "WATCH_INSTANCE", &json!({"instance_id": "a"})),
        request_frame(
            "p",
            "APPLY_EVENT",
            &json!({"instance_id": "a", "event": "PAY"}),
        ),
    ]
    .concat();
    c.send(&bytes);
    let r1 = c.read_frame().unwrap();
    assert_eq!(
        (r1["type"].as_str(), r1["id"].as_str()),
        (Some("response"), Some("w"))
    );
    let r2 = c.read_frame().unwrap();
    assert_eq!(
        (r2["type"].as_str(), r2["id"].as_str()),
        (Some("response"), Some("p"))
    );
    let e = c.read_frame().unwrap();
    assert_eq!(e["type"], "event");
    assert_eq!(e["wal_offset"], r2["result"]["wal_offset"]);
}

/// Writers apply events while a subscriber joins with `from_offset` taken
/// mid-history: it must see exactly every event from there, in order.
#[test]
fn catch_up_from_an_offset_joins_live_with_no_gap_or_duplicate() {
    let (_dir, server) = start("watch-catchup", 2);
    let mut c = server.client();
    for i in 0..8 {
        c.ok("CREATE_INSTANCE", json!({"instance_id": format!("i{i}"), "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}));
    }
    let mut offsets = Vec::new();
    for n in 0..40 {
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("i{}", n % 8), "event": "TICK", "payload": {"n": n}}),
        );
        offsets.push(r["wal_offset"].as_u64().unwrap());
    }
    let from = offsets[15];
    // Concurrent writers while the subscriber catches up.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (addr, stop) = (server.addr, stop.clone());
        writers.push(std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut offs = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = c.ok("APPLY_EVENT", json!({"instance_id": format!("i{}", (w * 3 + n) % 8), "event": "TICK", "payload": {"w": w, "n": n}}));
                offs.push(r["wal_offset"].as_u64().unwrap());
                n += 1;
            }
            offs
        }));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut s = server.client();
    s.ok(
        "WATCH_ALL",
        json!({"from_offset": from, "events": ["TICK"]}),
    );
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let concurrent: Vec<u64> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let mut expected: Vec<u64> = offsets
        .iter()
        .copied()
        .filter(|&o| o >= from)
        .chain(concurrent)
        .collect();
    expected.sort_unstable();
    let got: Vec<u64> = events(&mut s, expected.len(), Duration::from_secs(20))
        .iter()
        .map(|e| e["wal_offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got, expected,
        "every event from `from_offset` on, in order, once"
    );
    // Live events continue after the catch-up.
    let r = c.ok("APPLY_EVENT", json!({"instance_id": "i0", "event": "TICK"}));
    let live = events(&mut s, 1, Duration::from_secs(5));
    assert_eq!(live[0]["wal_offset"], r["wal_offset"]);
}

/// A subscriber that stops reading (its socket buffers fill) must not slow
/// other clients down, and when it reads again it gets everything.
#[test]
fn a_slow_subscriber_misses_nothing_and_blocks_no_one() {
    let (_dir, server) = start("watch-slow", 2);
    let mut c = server.client();
    for i in 0..4 {
        c.ok("CREATE_INSTANCE", json!({"instance_id": format!("s{i}"), "machine": "order", "version": 1, "initial_ctx": {"amount": 1, "pad": "p".repeat(2000)}}));
    }
    let mut slow = server.client();
    slow.ok("WATCH_ALL", json!({}));
    // The subscriber does not read while 20k+ events (~50 MB) are produced,
    // more than the live window holds: it must be served from the WAL later.
    let mut offsets = Vec::new();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for n in 0..20_500 {
        let t = Instant::now();
        let r = c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("s{}", n % 4), "event": "TICK", "payload": {"n": n}}),
        );
        worst = worst.max(t.elapsed());
        offsets.push(r["wal_offset"].as_u64().unwrap());
    }
    assert!(
        worst < Duration::from_secs(5),
        "a writer waited {worst:?} behind a slow subscriber"
    );
    let _ = started;
    let got: Vec<u64> = events(&mut slow, offsets.len(), Duration::from_secs(60))
        .iter()
        .map(|e| e["wal_offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got.len(), offsets.len());
    assert_eq!(got, offsets, "in order, nothing missed, nothing twice");
}

#[test]
fn events_follow_the_jsonl_output_mode() {
    let (_dir, server) = start("watch-jsonl", 1);
    let mut s = server.client();
    s.send(&request_frame(
        "h",
        "HELLO",
        &json!({"protocol_version": 1, "wire_modes": ["jsonl"]}),
    ));
    s.send(&request_frame("w", "WATCH_ALL", &json!({})));
    let mut reader = std::io::BufReader::new(s.stream.try_clone().unwrap());
    let mut line = String::new();
    for id in ["h", "w"] {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["id"], id);
    }
    let mut c = server.client();
    c.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "j", "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    let r = c.ok("APPLY_EVENT", json!({"instance_id": "j", "event": "PAY"}));
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let e: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(e["type"], "event");
    assert_eq!(e["wal_offset"], r["wal_offset"]);
}

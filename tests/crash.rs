//! kill -9 under load, restart, and check that every acknowledged write is
//! there — and nothing that was never sent.
//!
//! 8 writer connections create instances and apply events (each apply with
//! an idempotency key) as fast as the server answers; the server is killed
//! with SIGKILL mid-load and restarted on the same data directory, for
//! `CRASH_CYCLES` cycles (default 10), each cycle checking everything
//! acknowledged in every earlier cycle. Figures are printed for
//! docs/DURABILITY.md.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Opts, Server};
use serde_json::{json, Value};

const WRITERS: usize = 8;

/// The last acknowledged state of an instance, and an unanswered write to
/// it if the crash cut one off.
#[derive(Clone, Debug)]
struct Acked {
    state: String,
    ctx: Value,
    offset: u64,
    /// (idempotency key, params) of the last acknowledged apply.
    last_apply: Option<(String, Value)>,
}

#[derive(Default)]
struct WriterLog {
    acked: HashMap<String, Acked>,
    /// The request in flight when the connection broke: (instance, op, params).
    in_flight: Option<(String, &'static str, Value)>,
    creates: u64,
    applies: u64,
    next_instance: u64,
}

fn writer(
    server_addr: std::net::SocketAddr,
    w: usize,
    cycle: usize,
    mut log: WriterLog,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut c = common::Client::connect(server_addr);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let own: Vec<String> = log.acked.keys().cloned().collect();
        let create = own.is_empty() || n.is_multiple_of(4);
        let (inst, op, params) = if create {
            let id = format!("w{w}-c{cycle}-{}", log.next_instance);
            log.next_instance += 1;
            let p = json!({"instance_id": id, "machine": "order", "version": 1, "initial_ctx": {"amount": 1, "w": w}});
            (id, "CREATE_INSTANCE", p)
        } else {
            let id = own[(n as usize * 7 + w) % own.len()].clone();
            let a = &log.acked[&id];
            let event = if a.state == "created" { "PAY" } else { "TICK" };
            let key = format!("k-{id}-{cycle}-{n}");
            let p = json!({"instance_id": id, "event": event, "payload": {"n": n, "cycle": cycle}, "idempotency_key": key});
            (id, "APPLY_EVENT", p)
        };
        let Some(r) = c.try_call(op, &params) else {
            log.in_flight = Some((inst, op, params));
            return log;
        };
        assert_eq!(r["status"], "ok", "{op} {params}: {r}");
        let res = &r["result"];
        if op == "CREATE_INSTANCE" {
            log.creates += 1;
            log.acked.insert(
                inst,
                Acked {
                    state: "created".into(),
                    ctx: params["initial_ctx"].clone(),
                    offset: res["wal_offset"].as_u64().unwrap(),
                    last_apply: None,
                },
            );
        } else {
            log.applies += 1;
            let key = params["idempotency_key"].as_str().unwrap().to_owned();
            log.acked.insert(
                inst,
                Acked {
                    state: res["to_state"].as_str().unwrap().to_owned(),
                    ctx: res["ctx"].clone(),
                    offset: res["wal_offset"].as_u64().unwrap(),
                    last_apply: Some((key, params)),
                },
            );
        }
    }
    log
}

fn cycles() -> usize {
    std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_write() {
    crash_cycles(
        "crash",
        cycles(),
        &[("RSTMDB_COMPACT_ENABLED", "0")],
        false,
        Stop::Kill9,
    );
}

/// SIGTERM under load: a graceful shutdown answers what is in flight,
/// syncs the WAL and exits 0; after the restart every acknowledged write
/// is there, with compaction running during the load.
#[test]
fn sigterm_under_load_exits_0_and_loses_no_acknowledged_write() {
    crash_cycles(
        "sigterm",
        3,
        &[
            ("RSTMDB_COMPACT_EVENTS", "200"),
            ("RSTMDB_COMPACT_INTERVAL", "0"),
        ],
        false,
        Stop::Term,
    );
}

/// With `fsync_policy: never` an acknowledged write is promised to survive
/// a crash of the process (not a power loss): the WAL is written into the
/// page cache before the reply, and kill -9 must lose none of it.
#[test]
fn kill_9_with_fsync_never_loses_no_acknowledged_write() {
    crash_cycles_with(
        "crash-never",
        cycles().min(5),
        &[("RSTMDB_COMPACT_ENABLED", "0")],
        false,
        Stop::Kill9,
        "never",
    );
}

/// SIGINT (Ctrl-C) under load: the same graceful shutdown as SIGTERM.
#[test]
fn sigint_under_load_exits_0_and_loses_no_acknowledged_write() {
    crash_cycles("sigint", 2, &[], false, Stop::Int);
}

/// How each cycle stops the server.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL: a crash.
    Kill9,
    /// SIGTERM: a graceful shutdown, which must exit 0.
    Term,
    /// SIGINT: the same, from a terminal.
    Int,
}

/// The same while snapshots and compaction run all the time: automatic
/// rounds every 50 records per shard, and a client asking for COMPACT in a
/// loop, so kills land before, during and after snapshot writes, manifest
/// updates and segment deletions.
#[test]
fn kill_9_during_snapshots_and_compaction_loses_no_acknowledged_write() {
    crash_cycles(
        "crash-compact",
        cycles(),
        &[
            ("RSTMDB_COMPACT_EVENTS", "50"),
            ("RSTMDB_COMPACT_SIZE_MB", "1"),
            ("RSTMDB_COMPACT_INTERVAL", "0"),
        ],
        true,
        Stop::Kill9,
    );
}

/// Runs writers (and a COMPACT loop if `compact`) against a server stopped
/// `how` `cycles` times, with idle connections open too, and restarted at
/// once on the same address (where the stopped server's connections still
/// linger), checking every acknowledged write after each restart.
fn crash_cycles(name: &str, cycles: usize, env: &[(&str, &str)], compact: bool, how: Stop) {
    crash_cycles_with(name, cycles, env, compact, how, "every_write");
}

/// [`crash_cycles`] under a given fsync policy.
fn crash_cycles_with(
    name: &str,
    cycles: usize,
    env: &[(&str, &str)],
    compact: bool,
    how: Stop,
    fsync: &'static str,
) {
    let dir = common::data_dir(name);
    let opts = Opts {
        shards: 2,
        fsync,
        segment_mb: 1,
        extra_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut server = Server::start(dir.path(), opts);
    server.client().ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );

    let mut logs: Vec<WriterLog> = (0..WRITERS).map(|_| WriterLog::default()).collect();
    let mut total_acked_writes = 0u64;
    let mut total_in_flight = 0u64;
    let mut compactions = 0u64;
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let compactor = compact.then(|| {
            let (addr, stop) = (server.addr, stop.clone());
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match c.try_call("COMPACT", &json!({"force_snapshot": true})) {
                        Some(r) if r["status"] == "ok" => done += 1,
                        Some(r) => panic!("COMPACT failed: {r}"),
                        None => break,
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                done
            })
        });
        let handles: Vec<_> = logs
            .drain(..)
            .enumerate()
            .map(|(w, mut log)| {
                log.in_flight = None;
                let (addr, stop) = (server.addr, stop.clone());
                std::thread::spawn(move || writer(addr, w, cycle, log, stop))
            })
            .collect();
        // Connections that sit idle through the stop.
        let idle: Vec<_> = (0..3)
            .map(|_| {
                let mut c = server.client();
                c.ok("PING", json!({}));
                c
            })
            .collect();
        // Let the load run a varying while, then stop the server mid-load.
        std::thread::sleep(Duration::from_millis(300 + 97 * (cycle as u64 % 5)));
        let signal = match how {
            Stop::Kill9 => None,
            Stop::Term => Some(libc::SIGTERM),
            Stop::Int => Some(libc::SIGINT),
        };
        match signal {
            None => server.kill9(),
            Some(sig) => {
                let log = server.log_text();
                assert_eq!(
                    server.signal(sig),
                    Some(0),
                    "exit status after signal {sig}: {log}"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        logs = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect();
        if let Some(h) = compactor {
            compactions += h.join().expect("compactor thread");
        }
        server.restart();
        drop(idle);

        let mut c = server.client();
        let mut acked_writes = 0;
        for log in &logs {
            acked_writes += log.creates + log.applies;
            let in_flight_id = log.in_flight.as_ref().map(|f| f.0.clone());
            for (id, a) in &log.acked {
                let r = c.call("GET_INSTANCE", json!({"instance_id": id}));
                assert_eq!(
                    r["status"], "ok",
                    "cycle {cycle}: acknowledged instance {id} lost: {r}"
                );
                let got = &r["result"];
                let exact = got["state"] == a.state.as_str()
                    && got["ctx"] == a.ctx
                    && got["last_wal_offset"] == a.offset;
                if Some(id) == in_flight_id.as_ref() {
                    // The unanswered apply may or may not have landed.
                    if !exact {
                        let (_, _, p) = log.in_flight.as_ref().unwrap();
                        assert_eq!(
                            got["ctx"]["n"], p["payload"]["n"],
                            "cycle {cycle}: {id} is neither acked nor in-flight state: {got}"
                        );
                        assert!(got["last_wal_offset"].as_u64().unwrap() > a.offset);
                    }
                } else {
                    assert!(exact, "cycle {cycle}: {id} differs from its last acknowledged write: {got} vs {a:?}");
                }
            }
            // Nothing that was never sent exists: the writer's next id.
            let w = logs.iter().position(|l| std::ptr::eq(l, log)).unwrap();
            let never = format!("w{w}-c{cycle}-{}", log.next_instance);
            let (code, _) = c.err("GET_INSTANCE", json!({"instance_id": never}));
            assert_eq!(code, "INSTANCE_NOT_FOUND");
            if log.in_flight.is_some() {
                total_in_flight += 1;
            }
        }
        // Idempotent retries of acknowledged applies are not applied again.
        for log in &logs {
            for (id, a) in log
                .acked
                .iter()
                .filter(|(id, _)| Some(*id) != log.in_flight.as_ref().map(|f| &f.0))
                .take(3)
            {
                if let Some((_, params)) = &a.last_apply {
                    let r = c.ok("APPLY_EVENT", params.clone());
                    assert_eq!(
                        r["applied"], false,
                        "retry of an acked apply must not apply again: {r}"
                    );
                    assert_eq!(r["wal_offset"], a.offset);
                    let g = c.ok("GET_INSTANCE", json!({"instance_id": id}));
                    assert_eq!(g["last_wal_offset"], a.offset);
                }
            }
        }
        // Bring in-flight instances back in line with the server's truth.
        for log in logs.iter_mut() {
            if let Some((id, op, _)) = log.in_flight.take() {
                let r = c.call("GET_INSTANCE", json!({"instance_id": id}));
                if r["status"] == "ok" {
                    let g = &r["result"];
                    let prev = log.acked.get(&id).and_then(|a| a.last_apply.clone());
                    log.acked.insert(
                        id,
                        Acked {
                            state: g["state"].as_str().unwrap().into(),
                            ctx: g["ctx"].clone(),
                            offset: g["last_wal_offset"].as_u64().unwrap(),
                            last_apply: if op == "APPLY_EVENT" { None } else { prev },
                        },
                    );
                } else {
                    log.acked.remove(&id);
                }
            }
        }
        total_acked_writes = acked_writes;
        let instances: usize = logs.iter().map(|l| l.acked.len()).sum();
        println!("{name} cycle {cycle}: acknowledged writes so far {acked_writes}, instances {instances}, COMPACTs answered {compactions}, lost 0");
    }
    // New writes work after the last restart.
    let mut c = server.client();
    let r = c.ok(
        "CREATE_INSTANCE",
        json!({"machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
    );
    let id = r["instance_id"].as_str().unwrap();
    c.ok("APPLY_EVENT", json!({"instance_id": id, "event": "PAY"}));
    if compact {
        assert!(compactions > 0, "no COMPACT completed");
        let snaps = std::fs::read_dir(dir.path().join("shard-000/snapshots"))
            .unwrap()
            .count();
        assert!(snaps > 0, "snapshots were written");
        let oldest = std::fs::read_dir(dir.path().join("shard-000/wal"))
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_suffix(".wal")
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
            })
            .min()
            .unwrap();
        assert!(
            oldest > 1,
            "compaction deleted segments (oldest is {oldest})"
        );
    }
    println!(
        "CRASH SUMMARY ({name}): cycles={cycles} acknowledged_writes={total_acked_writes} recovered={total_acked_writes} lost=0 in_flight_at_kill={total_in_flight} compacts={compactions}"
    );
}

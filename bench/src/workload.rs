//! The closed-loop workload runner (`rstmdb-bench run`).
//!
//! Each connection has a writer thread and a reader thread: the writer
//! keeps up to `pipeline` requests in flight (it takes a permit per
//! request, the reader returns one per response), and hands the reader the
//! send time of every request in order, so latency is measured per request
//! from its send to its answer. Requests answered during the warm-up are
//! not counted. At the end the `apply` workload checks every instance's
//! state against the applies acknowledged (a ring machine: the state is the
//! count modulo 4).

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::rcp::{encode_request, result, Conn};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// APPLY_EVENT on pre-created instances (ring machine with a guard).
    Apply,
    /// CREATE_INSTANCE of new instances.
    Create,
    /// GET_INSTANCE of pre-created instances.
    Get,
    /// APPLY_EVENT and GET_INSTANCE mixed (`--get-ratio`).
    Mixed,
    /// Atomic BATCHes of two applies on two random instances.
    Batch,
    /// Applies while `--watchers` WATCH_ALL subscribers read the events.
    Watch,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Server.
    pub addr: SocketAddr,
    /// Workload.
    pub workload: Workload,
    /// Connections.
    pub connections: usize,
    /// Requests in flight per connection.
    pub pipeline: usize,
    /// Measured time (ignored when `requests` is set).
    pub duration: Duration,
    /// Total requests instead of a duration.
    pub requests: Option<u64>,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Pre-created instances.
    pub instances: usize,
    /// Random instead of round-robin instance choice.
    pub random: bool,
    /// Filler bytes in each apply's payload and each create's context.
    pub payload_bytes: usize,
    /// Share of GETs in `mixed`.
    pub get_ratio: f64,
    /// WATCH_ALL subscribers in `watch`.
    pub watchers: usize,
    /// Server process to read CPU time from.
    pub server_pid: Option<u32>,
    /// Run the end-of-run consistency check.
    pub check: bool,
}

/// States of the ring machine every workload uses.
pub const STATES: u64 = 4;

/// A ring of [`STATES`] states, `NEXT` moves one on, behind a guard (so
/// every apply evaluates one): the end state tells how many applies landed.
pub fn ring_machine() -> Value {
    let states: Vec<String> = (0..STATES).map(|i| format!("r{i}")).collect();
    let transitions: Vec<Value> = (0..STATES)
        .map(|i| {
            json!({"from": format!("r{i}"), "event": "NEXT",
                   "to": format!("r{}", (i + 1) % STATES), "guard": "ctx.n >= 0 && !ctx.blocked"})
        })
        .collect();
    json!({"states": states, "initial": "r0", "transitions": transitions})
}

/// Per-request bookkeeping the reader needs.
struct Sent {
    at: Instant,
    /// Instance an APPLY went to (for the consistency check).
    applied_to: Option<u32>,
}

/// Shared counters of a run.
struct Totals {
    hist: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    transport: AtomicU64,
    /// Acknowledged applies per instance.
    applied: Vec<AtomicU64>,
    /// Applies sent but never answered (a transport failure): their
    /// instances cannot be checked exactly.
    uncertain: Mutex<Vec<u32>>,
    measuring: AtomicBool,
    /// Offset → ack time of applies (watch workload).
    acked_at: Mutex<std::collections::HashMap<u64, Instant>>,
}

/// xorshift: cheap, deterministic per connection.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields overall.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// Runs the workload and returns the report.
pub fn run(s: &Settings) -> Result<Value, String> {
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000_000);
    let prefix = format!("b{run_id}");
    let mut admin = Conn::connect(s.addr).map_err(|e| e.to_string())?;
    let r = admin
        .call(
            "PUT_MACHINE",
            &json!({"machine": "ring", "version": 1, "definition": ring_machine()}),
        )
        .map_err(|e| e.to_string())?;
    result(&r)?;
    let filler = "f".repeat(s.payload_bytes);
    let needs_instances = !matches!(s.workload, Workload::Create);
    let instances = if needs_instances {
        s.instances.max(1)
    } else {
        0
    };
    // Pre-create, pipelined on the admin connection.
    let mut i = 0;
    while i < instances {
        let end = (i + 256).min(instances);
        for k in i..end {
            admin
                .queue(
                    "CREATE_INSTANCE",
                    &json!({"instance_id": format!("{prefix}-{k}"), "machine": "ring", "version": 1,
                            "initial_ctx": {"n": 0}}),
                )
                .map_err(|e| e.to_string())?;
        }
        admin.flush().map_err(|e| e.to_string())?;
        for _ in i..end {
            let r = admin.read().map_err(|e| e.to_string())?;
            result(&r).map_err(|e| format!("pre-creating instances: {e}"))?;
        }
        i = end;
    }

    let totals = Arc::new(Totals {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")),
        ok: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        transport: AtomicU64::new(0),
        applied: (0..instances).map(|_| AtomicU64::new(0)).collect(),
        uncertain: Mutex::new(Vec::new()),
        measuring: AtomicBool::new(s.warmup.is_zero()),
        acked_at: Mutex::new(std::collections::HashMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let budget = Arc::new(AtomicU64::new(s.requests.unwrap_or(u64::MAX)));

    // Watchers first, so they see every event of the measured period.
    let watched = Arc::new(AtomicU64::new(0));
    let lag = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let mut watcher_threads = Vec::new();
    if s.workload == Workload::Watch {
        for _ in 0..s.watchers {
            let (addr, stop, watched, lag, totals) = (
                s.addr,
                stop.clone(),
                watched.clone(),
                lag.clone(),
                totals.clone(),
            );
            let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
            let r = c
                .call("WATCH_ALL", &json!({"include_ctx": false}))
                .map_err(|e| e.to_string())?;
            result(&r)?;
            watcher_threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(ev) = c.read() else { break };
                    if ev["type"] != "event" {
                        continue;
                    }
                    let now = Instant::now();
                    if totals.measuring.load(Ordering::Relaxed) {
                        watched.fetch_add(1, Ordering::Relaxed);
                        if let Some(off) = ev["wal_offset"].as_u64() {
                            if let Some(t) = totals.acked_at.lock().unwrap().get(&off) {
                                let us = now.saturating_duration_since(*t).as_micros() as u64;
                                let _ = lag.lock().unwrap().record(us.max(1));
                            }
                        }
                    }
                }
            }));
        }
    }

    let cpu_before = s.server_pid.and_then(cpu_seconds);
    let mut handles = Vec::new();
    for conn in 0..s.connections {
        let stream = TcpStream::connect(s.addr).map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let reader_stream = stream.try_clone().map_err(|e| e.to_string())?;
        let (permit_tx, permit_rx) = mpsc::channel::<()>();
        for _ in 0..s.pipeline.max(1) {
            let _ = permit_tx.send(());
        }
        let (sent_tx, sent_rx) = mpsc::channel::<Sent>();
        let settings = s.clone();
        let (stop_w, budget_w, prefix_w, filler_w) =
            (stop.clone(), budget.clone(), prefix.clone(), filler.clone());
        let writer = std::thread::spawn(move || {
            let mut w = BufWriter::with_capacity(1 << 16, stream);
            let mut buf = Vec::with_capacity(1024);
            let mut rng =
                0x9E37_79B9_7F4A_7C15u64 ^ (conn as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            let mut k: u64 = 0;
            let mut id: u64 = 0;
            'outer: loop {
                if permit_rx.recv().is_err() {
                    break;
                }
                // Send every request we have a permit for, then flush once.
                let mut burst = 1;
                while permit_rx.try_recv().is_ok() {
                    burst += 1;
                }
                for _ in 0..burst {
                    if stop_w.load(Ordering::Relaxed)
                        || budget_w
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                b.checked_sub(1)
                            })
                            .is_err()
                    {
                        break 'outer;
                    }
                    let pick = |rng: &mut u64, k: u64| -> u32 {
                        if settings.random {
                            (next_rand(rng) % instances.max(1) as u64) as u32
                        } else {
                            ((k * settings.connections as u64 + conn as u64)
                                % instances.max(1) as u64) as u32
                        }
                    };
                    let (op, params, applied_to) =
                        request(&settings, &prefix_w, &filler_w, conn, k, &mut rng, pick);
                    k += 1;
                    id += 1;
                    buf.clear();
                    encode_request(&mut buf, id, op, &params);
                    if sent_tx
                        .send(Sent {
                            at: Instant::now(),
                            applied_to,
                        })
                        .is_err()
                    {
                        break 'outer;
                    }
                    if w.write_all(&buf).is_err() {
                        break 'outer;
                    }
                }
                if w.flush().is_err() {
                    break;
                }
            }
            let _ = w.flush();
        });
        let (totals_r, workload) = (totals.clone(), s.workload);
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, reader_stream);
            let mut payload = Vec::new();
            while let Ok(sent) = sent_rx.recv() {
                let mut h = [0u8; 18];
                let got = r.read_exact(&mut h).and_then(|_| {
                    let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]) as usize;
                    payload.resize(len, 0);
                    r.read_exact(&mut payload)
                });
                if got.is_err() {
                    totals_r.transport.fetch_add(1, Ordering::Relaxed);
                    if let Some(i) = sent.applied_to {
                        totals_r.uncertain.lock().unwrap().push(i);
                    }
                    // Everything else in flight is unknown too.
                    while let Ok(s) = sent_rx.try_recv() {
                        if let Some(i) = s.applied_to {
                            totals_r.uncertain.lock().unwrap().push(i);
                        }
                    }
                    break;
                }
                let us = sent.at.elapsed().as_micros() as u64;
                let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                let measuring = totals_r.measuring.load(Ordering::Relaxed);
                if v["status"] == "ok" {
                    if let Some(i) = sent.applied_to {
                        totals_r.applied[i as usize].fetch_add(1, Ordering::Relaxed);
                        if workload == Workload::Watch {
                            if let Some(off) = v["result"]["wal_offset"].as_u64() {
                                totals_r
                                    .acked_at
                                    .lock()
                                    .unwrap()
                                    .insert(off, Instant::now());
                            }
                        }
                    }
                    if measuring {
                        totals_r.ok.fetch_add(1, Ordering::Relaxed);
                        let _ = totals_r.hist.lock().unwrap().record(us.max(1));
                    }
                } else if measuring {
                    let code = v["error"]["code"].as_str().unwrap_or("?").to_owned();
                    *totals_r.errors.lock().unwrap().entry(code).or_default() += 1;
                }
                if permit_tx.send(()).is_err() {
                    // The writer is done; keep reading what is in flight.
                }
            }
        });
        handles.push((writer, reader));
    }
    // Warm-up, then the measured period.
    if !s.warmup.is_zero() {
        std::thread::sleep(s.warmup);
        totals.measuring.store(true, Ordering::SeqCst);
    }
    let measured_from = Instant::now();
    let cpu_from = s.server_pid.and_then(cpu_seconds).or(cpu_before);
    if s.requests.is_none() {
        std::thread::sleep(s.duration);
        stop.store(true, Ordering::SeqCst);
    }
    for (w, r) in handles {
        let _ = w.join();
        let _ = r.join();
    }
    let elapsed = measured_from.elapsed().max(Duration::from_micros(1));
    let cpu_to = s.server_pid.and_then(cpu_seconds);
    stop.store(true, Ordering::SeqCst);
    // Wake watchers blocked in a read with one more event.
    if s.workload == Workload::Watch && instances > 0 {
        let _ = admin.call(
            "APPLY_EVENT",
            &json!({"instance_id": format!("{prefix}-0"), "event": "NEXT", "payload": {"n": 0}}),
        );
        totals.applied[0].fetch_add(1, Ordering::Relaxed);
    }
    for t in watcher_threads {
        let _ = t.join();
    }

    // Consistency: every instance's state equals its acknowledged applies
    // modulo 4 (instances with an unanswered apply are skipped).
    let mut checked = 0u64;
    let mut wrong = 0u64;
    if s.check
        && matches!(
            s.workload,
            Workload::Apply | Workload::Mixed | Workload::Watch
        )
    {
        let uncertain = totals.uncertain.lock().unwrap().clone();
        for i in 0..instances {
            if uncertain.contains(&(i as u32)) {
                continue;
            }
            let r = admin
                .call(
                    "GET_INSTANCE",
                    &json!({"instance_id": format!("{prefix}-{i}")}),
                )
                .map_err(|e| e.to_string())?;
            let want = format!("r{}", totals.applied[i].load(Ordering::Relaxed) % STATES);
            checked += 1;
            if result(&r)?["state"] != want.as_str() {
                wrong += 1;
            }
        }
    }

    let h = totals.hist.lock().unwrap();
    let ok = totals.ok.load(Ordering::Relaxed);
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let mut report = json!({
        "workload": format!("{:?}", s.workload).to_lowercase(),
        "connections": s.connections,
        "pipeline": s.pipeline,
        "seconds": elapsed.as_secs_f64(),
        "ok": ok,
        "ops_per_sec": ok as f64 / elapsed.as_secs_f64(),
        "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max()},
        "errors": *totals.errors.lock().unwrap(),
        "transport_errors": totals.transport.load(Ordering::Relaxed),
        "consistency": {"checked": checked, "wrong": wrong},
    });
    if let (Some(a), Some(b)) = (cpu_from, cpu_to) {
        report["server_cpu_seconds"] = json!(b - a);
        report["server_cpu_percent"] = json!(100.0 * (b - a) / elapsed.as_secs_f64());
    }
    if s.workload == Workload::Watch {
        let l = lag.lock().unwrap();
        let ql = |p: f64| {
            if l.is_empty() {
                0
            } else {
                l.value_at_quantile(p)
            }
        };
        report["watch"] = json!({
            "watchers": s.watchers,
            "events_delivered": watched.load(Ordering::Relaxed),
            "events_per_sec": watched.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
            "lag_us": {"p50": ql(0.5), "p99": ql(0.99), "max": l.max()},
        });
    }
    Ok(report)
}

/// The k-th request of connection `conn`: (op, params, instance applied to).
fn request(
    s: &Settings,
    prefix: &str,
    filler: &str,
    conn: usize,
    k: u64,
    rng: &mut u64,
    pick: impl Fn(&mut u64, u64) -> u32,
) -> (&'static str, Value, Option<u32>) {
    let payload = |n: u64| {
        if filler.is_empty() {
            json!({"n": n})
        } else {
            json!({"n": n, "filler": filler})
        }
    };
    let apply = |i: u32, n: u64| {
        (
            "APPLY_EVENT",
            json!({"instance_id": format!("{prefix}-{i}"), "event": "NEXT", "payload": payload(n)}),
            Some(i),
        )
    };
    match s.workload {
        Workload::Apply | Workload::Watch => {
            let i = pick(rng, k);
            apply(i, k)
        }
        Workload::Get => {
            let i = pick(rng, k);
            (
                "GET_INSTANCE",
                json!({"instance_id": format!("{prefix}-{i}")}),
                None,
            )
        }
        Workload::Mixed => {
            let i = pick(rng, k);
            // Deterministic interleaving with the requested share of GETs.
            let get = ((k as f64 + 1.0) * s.get_ratio).floor() > (k as f64 * s.get_ratio).floor();
            if get {
                (
                    "GET_INSTANCE",
                    json!({"instance_id": format!("{prefix}-{i}")}),
                    None,
                )
            } else {
                apply(i, k)
            }
        }
        Workload::Create => (
            "CREATE_INSTANCE",
            json!({"instance_id": format!("{prefix}-c{conn}-{k}"), "machine": "ring", "version": 1,
                   "initial_ctx": payload(0)}),
            None,
        ),
        Workload::Batch => {
            let a = pick(rng, k);
            let mut b = (next_rand(rng) % s.instances.max(1) as u64) as u32;
            if b == a {
                b = (b + 1) % s.instances.max(1) as u32;
            }
            (
                "BATCH",
                json!({"mode": "atomic", "ops": [
                    {"op": "APPLY_EVENT", "params": {"instance_id": format!("{prefix}-{a}"), "event": "NEXT", "payload": payload(k)}},
                    {"op": "APPLY_EVENT", "params": {"instance_id": format!("{prefix}-{b}"), "event": "NEXT", "payload": payload(k)}}
                ]}),
                None,
            )
        }
    }
}

//! The closed-loop workload runner (`rstmdb-bench run`).
//!
//! Each connection is one thread that keeps `pipeline` requests in flight:
//! it reads whatever answers have arrived, records each one's latency (from
//! its send to its answer, in request order), and sends as many new
//! requests in one write. Requests and answers are encoded and read
//! without building `serde_json::Value` trees, and each thread keeps its
//! own histogram and error counts, merged at the end: the load generator
//! shares the machine's cores with the server, so its own cost per request
//! must stay small or it, not the server, sets the figures. Requests
//! answered during the warm-up are not counted. At the end the `apply` workload checks every instance's
//! state against the applies acknowledged (a ring machine: the state is the
//! count modulo 4).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::driver::{self, ClientMode, Shared};
use crate::rcp::{result, Conn};

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
    /// How the connections are driven.
    pub client: ClientMode,
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

/// Shared state of a run (touched per request only through atomics).
pub struct Totals {
    /// Acknowledged applies per instance.
    pub applied: Vec<AtomicU64>,
    /// Applies sent but never answered (a transport failure): their
    /// instances cannot be checked exactly.
    pub uncertain: Mutex<Vec<u32>>,
    pub measuring: AtomicBool,
    /// Offset → ack time of applies (watch workload).
    pub acked_at: Mutex<std::collections::HashMap<u64, Instant>>,
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
    let prefix = run_prefix();
    let mut admin = Conn::connect(s.addr).map_err(|e| e.to_string())?;
    put_ring_machine(&mut admin)?;
    let filler = "f".repeat(s.payload_bytes);
    let needs_instances = !matches!(s.workload, Workload::Create);
    let instances = if needs_instances {
        s.instances.max(1)
    } else {
        0
    };
    pre_create(&mut admin, &prefix, instances)?;

    let totals = Arc::new(Totals {
        applied: (0..instances).map(|_| AtomicU64::new(0)).collect(),
        uncertain: Mutex::new(Vec::new()),
        measuring: AtomicBool::new(s.warmup.is_zero()),
        acked_at: Mutex::new(std::collections::HashMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let budget = Arc::new(AtomicU64::new(s.requests.unwrap_or(u64::MAX)));

    // Watchers first, so they see every event of the measured period.
    let watched = Arc::new(AtomicU64::new(0));
    let lag = Arc::new(Mutex::new(new_histogram()));
    let watcher_threads = start_watchers(s, &stop, &watched, &lag, &totals)?;

    let cpu_before = s.server_pid.and_then(cpu_seconds);
    let streams = connect_streams(s)?;
    let shared = Shared {
        settings: s.clone(),
        prefix: prefix.clone(),
        filler,
        totals: totals.clone(),
        stop: stop.clone(),
        budget: budget.clone(),
    };
    let handles = driver::start(s.client, &shared, streams);
    let (period, merged) = measure(s, &totals, &stop, cpu_before, handles)?;
    stop.store(true, Ordering::SeqCst);
    end_watchers(s, &mut admin, &prefix, &totals, instances, watcher_threads);

    let consistency = check_consistency(s, &mut admin, &prefix, &totals, instances)?;
    Ok(build_report(
        s,
        &period,
        &merged,
        consistency,
        &watched,
        &lag,
    ))
}

/// The connection threads of a run, each returning its connections' counts.
type Handles = Vec<std::thread::JoinHandle<Vec<driver::ConnReport>>>;

/// The merged counts of every connection of a run.
struct Merged {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    transport: u64,
}

/// The measured period: its length, and the CPU times read at its ends.
struct Period {
    elapsed: Duration,
    cpu_from: Option<f64>,
    cpu_to: Option<f64>,
    client_cpu_from: Option<f64>,
    client_cpu_to: Option<f64>,
}

/// A latency histogram: 1 µs to 60 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

/// An instance id prefix unique to this run, so runs on one server do not collide.
fn run_prefix() -> String {
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000_000);
    format!("b{run_id}")
}

/// Registers the ring machine every workload applies to.
fn put_ring_machine(admin: &mut Conn) -> Result<(), String> {
    let r = admin
        .call(
            "PUT_MACHINE",
            &json!({"machine": "ring", "version": 1, "definition": ring_machine()}),
        )
        .map_err(|e| e.to_string())?;
    result(&r)?;
    Ok(())
}

/// Creates instances `{prefix}-0 …`, pipelined on the admin connection 256 at a time.
fn pre_create(admin: &mut Conn, prefix: &str, instances: usize) -> Result<(), String> {
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
    Ok(())
}

/// Subscribes the `watch` workload's WATCH_ALL connections, each read by its own thread.
fn start_watchers(
    s: &Settings,
    stop: &Arc<AtomicBool>,
    watched: &Arc<AtomicU64>,
    lag: &Arc<Mutex<Histogram<u64>>>,
    totals: &Arc<Totals>,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
    let mut watcher_threads = Vec::new();
    if s.workload != Workload::Watch {
        return Ok(watcher_threads);
    }
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
            watch_events(c, &stop, &watched, &lag, &totals);
        }));
    }
    Ok(watcher_threads)
}

/// One watcher's loop: counts the events it reads while measuring, and
/// their lag behind the acknowledgement of the apply that made them.
fn watch_events(
    mut c: Conn,
    stop: &AtomicBool,
    watched: &AtomicU64,
    lag: &Mutex<Histogram<u64>>,
    totals: &Totals,
) {
    /// The fields of an event the bench reads.
    #[derive(Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(default)]
        wal_offset: Option<u64>,
    }
    let mut payload = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if c.read_raw(&mut payload).is_err() {
            break;
        }
        let Ok(ev) = serde_json::from_slice::<Event<'_>>(&payload) else {
            continue;
        };
        if ev.kind != "event" {
            continue;
        }
        let now = Instant::now();
        if totals.measuring.load(Ordering::Relaxed) {
            watched.fetch_add(1, Ordering::Relaxed);
            if let Some(off) = ev.wal_offset {
                if let Some(t) = totals.acked_at.lock().unwrap().get(&off) {
                    let us = now.saturating_duration_since(*t).as_micros() as u64;
                    let _ = lag.lock().unwrap().record(us.max(1));
                }
            }
        }
    }
}

/// Opens the measured connections (no Nagle delay, a 60 s read timeout).
fn connect_streams(s: &Settings) -> Result<Vec<TcpStream>, String> {
    let mut streams = Vec::with_capacity(s.connections);
    for _ in 0..s.connections {
        let stream = TcpStream::connect(s.addr).map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
        streams.push(stream);
    }
    Ok(streams)
}

/// Waits out the warm-up, then the measured period, which ends when every
/// connection has reported (a `--requests` run ends with its budget).
fn measure(
    s: &Settings,
    totals: &Totals,
    stop: &AtomicBool,
    cpu_before: Option<f64>,
    handles: Handles,
) -> Result<(Period, Merged), String> {
    if !s.warmup.is_zero() {
        std::thread::sleep(s.warmup);
        totals.measuring.store(true, Ordering::SeqCst);
    }
    let measured_from = Instant::now();
    let cpu_from = s.server_pid.and_then(cpu_seconds).or(cpu_before);
    let client_cpu_from = cpu_seconds(std::process::id());
    if s.requests.is_none() {
        std::thread::sleep(s.duration);
        stop.store(true, Ordering::SeqCst);
    }
    let merged = merge(handles)?;
    let period = Period {
        elapsed: measured_from.elapsed().max(Duration::from_micros(1)),
        cpu_from,
        cpu_to: s.server_pid.and_then(cpu_seconds),
        client_cpu_from,
        client_cpu_to: cpu_seconds(std::process::id()),
    };
    Ok((period, merged))
}

/// Joins the connection threads and adds up their reports.
fn merge(handles: Handles) -> Result<Merged, String> {
    let mut m = Merged {
        hist: new_histogram(),
        ok: 0,
        errors: BTreeMap::new(),
        transport: 0,
    };
    for h in handles {
        let reports = h
            .join()
            .map_err(|_| "a connection thread panicked".to_string())?;
        for c in reports {
            m.hist.add(&c.hist).expect("same bounds");
            m.ok += c.ok;
            for (code, n) in c.errors {
                *m.errors.entry(code).or_default() += n;
            }
            m.transport += c.transport;
        }
    }
    Ok(m)
}

/// Ends the watcher threads (after `stop` is set).
fn end_watchers(
    s: &Settings,
    admin: &mut Conn,
    prefix: &str,
    totals: &Totals,
    instances: usize,
    watcher_threads: Vec<std::thread::JoinHandle<()>>,
) {
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
}

/// Consistency: every instance's state equals its acknowledged applies
/// modulo 4 (instances with an unanswered apply are skipped); returns
/// (checked, wrong).
fn check_consistency(
    s: &Settings,
    admin: &mut Conn,
    prefix: &str,
    totals: &Totals,
    instances: usize,
) -> Result<(u64, u64), String> {
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
    Ok((checked, wrong))
}

/// The value at quantile `p`, or 0 for an empty histogram.
fn quantile(h: &Histogram<u64>, p: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(p)
    }
}

/// The run's report: throughput, latency, errors, consistency, CPU time
/// (the server's and the load generator's own) and the watchers' figures.
fn build_report(
    s: &Settings,
    period: &Period,
    merged: &Merged,
    (checked, wrong): (u64, u64),
    watched: &AtomicU64,
    lag: &Mutex<Histogram<u64>>,
) -> Value {
    let (h, ok, elapsed) = (&merged.hist, merged.ok, period.elapsed);
    let q = |p: f64| quantile(h, p);
    let mut report = json!({
        "workload": format!("{:?}", s.workload).to_lowercase(),
        "connections": s.connections,
        "pipeline": s.pipeline,
        "seconds": elapsed.as_secs_f64(),
        "ok": ok,
        "ops_per_sec": ok as f64 / elapsed.as_secs_f64(),
        "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max()},
        "errors": merged.errors,
        "transport_errors": merged.transport,
        "consistency": {"checked": checked, "wrong": wrong},
    });
    if let (Some(a), Some(b)) = (period.cpu_from, period.cpu_to) {
        report["server_cpu_seconds"] = json!(b - a);
        report["server_cpu_percent"] = json!(100.0 * (b - a) / elapsed.as_secs_f64());
        report["server_cpu_us_per_op"] = json!(1e6 * (b - a) / ok.max(1) as f64);
    }
    // The load generator's own CPU over the measured period (all its
    // threads), to show it was not the bottleneck.
    if let (Some(a), Some(b)) = (period.client_cpu_from, period.client_cpu_to) {
        report["client_cpu_seconds"] = json!(b - a);
        report["client_cpu_us_per_op"] = json!(1e6 * (b - a) / ok.max(1) as f64);
    }
    report["client"] = json!(format!("{:?}", s.client).to_lowercase());
    if s.workload == Workload::Watch {
        let l = lag.lock().unwrap();
        let ql = |p: f64| quantile(&l, p);
        report["watch"] = json!({
            "watchers": s.watchers,
            "events_delivered": watched.load(Ordering::Relaxed),
            "events_per_sec": watched.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
            "lag_us": {"p50": ql(0.5), "p99": ql(0.99), "max": l.max()},
        });
    }
    report
}

/// Appends the params of the k-th request of connection `conn` as JSON
/// text (ids and filler need no escaping); returns (op, instance applied
/// to). Instances `0..s.instances` are picked at random or round-robin
/// over the connections.
pub fn request(
    out: &mut Vec<u8>,
    s: &Settings,
    prefix: &str,
    filler: &str,
    conn: usize,
    k: u64,
    rng: &mut u64,
) -> (&'static str, Option<u32>) {
    match s.workload {
        Workload::Apply | Workload::Watch => {
            let i = pick(s, conn, rng, k);
            write_apply(out, prefix, filler, i, k);
            ("APPLY_EVENT", Some(i))
        }
        Workload::Get => {
            write_get(out, prefix, pick(s, conn, rng, k));
            ("GET_INSTANCE", None)
        }
        Workload::Mixed => {
            let i = pick(s, conn, rng, k);
            if is_get(k, s.get_ratio) {
                write_get(out, prefix, i);
                ("GET_INSTANCE", None)
            } else {
                write_apply(out, prefix, filler, i, k);
                ("APPLY_EVENT", Some(i))
            }
        }
        Workload::Create => {
            write_create(out, prefix, filler, conn, k);
            ("CREATE_INSTANCE", None)
        }
        Workload::Batch => {
            let a = pick(s, conn, rng, k);
            write_batch(out, s, prefix, filler, a, k, rng);
            ("BATCH", None)
        }
    }
}

/// The instance of the k-th request: random, or round-robin over the connections.
fn pick(s: &Settings, conn: usize, rng: &mut u64, k: u64) -> u32 {
    let instances = s.instances.max(1) as u64;
    if s.random {
        (next_rand(rng) % instances) as u32
    } else {
        ((k * s.connections as u64 + conn as u64) % instances) as u32
    }
}

/// Whether the k-th `mixed` request is a GET: a deterministic interleaving
/// with the requested share of GETs.
fn is_get(k: u64, get_ratio: f64) -> bool {
    ((k as f64 + 1.0) * get_ratio).floor() > (k as f64 * get_ratio).floor()
}

/// Appends an apply's or a create's payload `{"n": n}`, with the filler if any.
fn write_payload(out: &mut Vec<u8>, filler: &str, n: u64) {
    if filler.is_empty() {
        let _ = write!(out, r#"{{"n":{n}}}"#);
    } else {
        let _ = write!(out, r#"{{"n":{n},"filler":"{filler}"}}"#);
    }
}

/// Appends APPLY_EVENT params: NEXT on instance `i`.
fn write_apply(out: &mut Vec<u8>, prefix: &str, filler: &str, i: u32, n: u64) {
    let _ = write!(
        out,
        r#"{{"instance_id":"{prefix}-{i}","event":"NEXT","payload":"#
    );
    write_payload(out, filler, n);
    out.push(b'}');
}

/// Appends GET_INSTANCE params for instance `i`.
fn write_get(out: &mut Vec<u8>, prefix: &str, i: u32) {
    let _ = write!(out, r#"{{"instance_id":"{prefix}-{i}"}}"#);
}

/// Appends CREATE_INSTANCE params: a new instance per (connection, k).
fn write_create(out: &mut Vec<u8>, prefix: &str, filler: &str, conn: usize, k: u64) {
    let _ = write!(
        out,
        r#"{{"instance_id":"{prefix}-c{conn}-{k}","machine":"ring","version":1,"initial_ctx":"#
    );
    write_payload(out, filler, 0);
    out.push(b'}');
}

/// Appends atomic BATCH params: applies on instance `a` and on a second,
/// random instance other than `a`.
fn write_batch(
    out: &mut Vec<u8>,
    s: &Settings,
    prefix: &str,
    filler: &str,
    a: u32,
    k: u64,
    rng: &mut u64,
) {
    let mut b = (next_rand(rng) % s.instances.max(1) as u64) as u32;
    if b == a {
        b = (b + 1) % s.instances.max(1) as u32;
    }
    out.extend_from_slice(br#"{"mode":"atomic","ops":[{"op":"APPLY_EVENT","params":"#);
    write_apply(out, prefix, filler, a, k);
    out.extend_from_slice(br#"},{"op":"APPLY_EVENT","params":"#);
    write_apply(out, prefix, filler, b, k);
    out.extend_from_slice(b"}]}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rcp::encode_request;

    #[test]
    fn raw_requests_equal_value_encoded_ones() {
        let s = Settings {
            addr: "127.0.0.1:1".parse().unwrap(),
            workload: Workload::Batch,
            connections: 2,
            pipeline: 1,
            duration: Duration::ZERO,
            requests: None,
            warmup: Duration::ZERO,
            instances: 10,
            random: false,
            payload_bytes: 3,
            get_ratio: 0.5,
            watchers: 0,
            server_pid: None,
            check: true,
            client: ClientMode::Threads,
        };
        for w in [
            Workload::Apply,
            Workload::Get,
            Workload::Create,
            Workload::Mixed,
            Workload::Batch,
        ] {
            let s = Settings {
                workload: w,
                ..s.clone()
            };
            let mut params = Vec::new();
            let (op, _) = request(&mut params, &s, "p", "fff", 1, 7, &mut 1);
            let v: Value = serde_json::from_slice(&params).expect("valid JSON params");
            let mut raw = Vec::new();
            driver::encode_raw(&mut raw, 9, op, &params);
            let mut via_value = Vec::new();
            encode_request(&mut via_value, 9, op, &v);
            let a: Value = serde_json::from_slice(&raw[18..]).unwrap();
            let b: Value = serde_json::from_slice(&via_value[18..]).unwrap();
            assert_eq!(a, b, "{w:?}");
            assert_eq!(
                u32::from_be_bytes(raw[14..18].try_into().unwrap()),
                crc32c::crc32c(&raw[18..])
            );
        }
    }
}

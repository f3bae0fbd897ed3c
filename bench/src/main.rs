//! `rstmdb-bench`: load generation and benchmark scenarios against any
//! RCP server (ours or the reference), over TCP.
//!
//! * `load`: registers a ring machine, creates instances and applies events
//!   with pipelined connections; checks the end state of a sample.
//! * `pause`: measures APPLY latency (one connection, one request at a time)
//!   while a COMPACT snapshots everything: the longest pause a snapshot adds.
//! * `run`: a closed-loop workload (apply, create, get, mixed, batch,
//!   watch) with latency percentiles, errors by code, a consistency check
//!   and the server's CPU time; `--json` for scripts.
//! * `null-server`: answers every frame at once (the machine's ceiling).

mod driver;
mod null_glommio;
mod null_server;
mod rcp;
mod report;
mod workload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use rcp::{result, Conn};

#[derive(Parser)]
#[command(
    name = "rstmdb-bench",
    about = "Load generator and benchmarks for rstmdb"
)]
struct Cli {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7401", global = true)]
    addr: SocketAddr,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create instances and apply events, pipelined.
    Load {
        /// Instances to create (ids `b-0` … `b-{N-1}`).
        #[arg(long, default_value_t = 10_000)]
        instances: u64,
        /// Events to apply, round-robin over the instances.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Connections.
        #[arg(long, default_value_t = 4)]
        connections: u64,
        /// Requests in flight per connection.
        #[arg(long, default_value_t = 64)]
        pipeline: u64,
        /// Bytes of filler in each instance's initial context.
        #[arg(long, default_value_t = 0)]
        ctx_bytes: usize,
        /// Instances whose end state is checked (0 = all).
        #[arg(long, default_value_t = 10_000)]
        check: u64,
    },
    /// A closed-loop workload with latency percentiles.
    Run(RunArgs),
    /// Writes the markdown table of a matrix run into a document.
    Report {
        /// JSON lines written by `run --json`.
        #[arg(long)]
        input: std::path::PathBuf,
        /// Document whose bench section is replaced.
        #[arg(long)]
        into: std::path::PathBuf,
        /// Markdown put above the table (command, machine, date).
        #[arg(long, default_value = "")]
        header: String,
    },
    /// Answers every frame at once with an empty ok (the ceiling).
    NullServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7401")]
        bind: String,
        /// `threads`: a thread per connection; `glommio`: one pinned
        /// glommio executor (the floor of any server on that runtime).
        #[arg(long, value_enum, default_value = "threads")]
        runtime: NullRuntime,
    },
    /// APPLY latency while a COMPACT {force_snapshot: true} runs.
    Pause {
        /// Instances (created by `load`) the applies go to.
        #[arg(long, default_value_t = 10_000)]
        instances: u64,
        /// How long to measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// When to start the COMPACT.
        #[arg(long, default_value_t = 2000)]
        compact_at_ms: u64,
    },
}

/// The options of `run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Workload.
    #[arg(long, value_enum, default_value = "apply")]
    workload: workload::Workload,
    /// Connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 8)]
    pipeline: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Total requests (instead of a duration).
    #[arg(long)]
    requests: Option<u64>,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Pre-created instances.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    /// Pick instances at random (default: round-robin).
    #[arg(long)]
    random: bool,
    /// Filler bytes in payloads and contexts.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Share of GET_INSTANCE in `mixed`.
    #[arg(long, default_value_t = 0.5)]
    get_ratio: f64,
    /// WATCH_ALL subscribers in `watch`.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Server process whose CPU time to report.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Skip the end-of-run consistency check (the null server).
    #[arg(long)]
    no_check: bool,
    /// How the connections are driven: a thread each, or one thread
    /// for all (`evented`: a lighter client, to cross-check results).
    #[arg(long, value_enum, default_value = "threads")]
    client: driver::ClientMode,
    /// `key=value` copied into the report's `tags` (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
}

/// How the null server runs.
#[derive(Clone, Copy, clap::ValueEnum)]
enum NullRuntime {
    Threads,
    Glommio,
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::NullServer { .. }) {
        restore_sigpipe();
    }
    if let Err(e) = dispatch(cli.addr, cli.cmd) {
        eprintln!("rstmdb-bench: {e}");
        std::process::exit(1);
    }
}

/// Output piped into `head` and the like: end quietly, as a command line
/// tool does, instead of panicking on a broken pipe. (Not for the null
/// server, which writes to sockets.)
fn restore_sigpipe() {
    // SAFETY: restoring the default disposition of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs one subcommand against the server at `addr`.
fn dispatch(addr: SocketAddr, cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Load {
            instances,
            events,
            connections,
            pipeline,
            ctx_bytes,
            check,
        } => load(
            addr,
            instances,
            events,
            connections.max(1),
            pipeline.max(1),
            ctx_bytes,
            check,
        ),
        Cmd::Pause {
            instances,
            seconds,
            compact_at_ms,
        } => pause(addr, instances.max(1), seconds, compact_at_ms),
        Cmd::Run(args) => run(addr, &args),
        Cmd::NullServer { bind, runtime } => match runtime {
            NullRuntime::Threads => null_server::serve(&bind),
            NullRuntime::Glommio => null_glommio::serve(&bind),
        }
        .map_err(|e| e.to_string()),
        Cmd::Report {
            input,
            into,
            header,
        } => report::write(&input, &into, &header),
    }
}

/// `run`: the workload, its report printed (tagged), and an error when the
/// consistency check found instances that differ.
fn run(addr: SocketAddr, a: &RunArgs) -> Result<(), String> {
    let mut report = workload::run(&settings(addr, a))?;
    report["tags"] = tags(&a.tags);
    if a.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    let wrong = report["consistency"]["wrong"].as_u64().unwrap_or(0);
    if wrong > 0 {
        return Err(format!(
            "consistency check failed: {wrong} instances differ from the acknowledged applies"
        ));
    }
    Ok(())
}

/// The workload's settings from the options, clamped to sensible values.
fn settings(addr: SocketAddr, a: &RunArgs) -> workload::Settings {
    workload::Settings {
        addr,
        workload: a.workload,
        connections: a.connections.max(1),
        pipeline: a.pipeline.max(1),
        duration: Duration::from_secs_f64(a.duration.max(0.0)),
        requests: a.requests,
        warmup: Duration::from_secs_f64(a.warmup.max(0.0)),
        instances: a.instances,
        random: a.random,
        payload_bytes: a.payload_bytes,
        get_ratio: a.get_ratio.clamp(0.0, 1.0),
        watchers: a.watchers,
        server_pid: a.server_pid,
        check: !a.no_check,
        client: a.client,
    }
}

/// The `--tag key=value` options as a JSON object (a bare `key` maps to "").
fn tags(tags: &[String]) -> Value {
    let mut t = serde_json::Map::new();
    for kv in tags {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        t.insert(k.to_owned(), Value::from(v));
    }
    Value::Object(t)
}

fn print_report(r: &Value) {
    let l = &r["latency_us"];
    println!(
        "{} {}x{}: {:.0} ops/s over {:.1} s; latency µs p50 {} p90 {} p99 {} p99.9 {} max {}",
        r["workload"].as_str().unwrap_or("?"),
        r["connections"],
        r["pipeline"],
        r["ops_per_sec"].as_f64().unwrap_or(0.0),
        r["seconds"].as_f64().unwrap_or(0.0),
        l["p50"],
        l["p90"],
        l["p99"],
        l["p999"],
        l["max"]
    );
    println!(
        "errors {} transport {} consistency {}",
        r["errors"], r["transport_errors"], r["consistency"]
    );
    if let Some(cpu) = r["server_cpu_percent"].as_f64() {
        println!("server CPU {cpu:.1}%");
    }
    if let Some(w) = r.get("watch") {
        println!("watch {w}");
    }
}

use workload::{ring_machine, STATES};

fn id(i: u64) -> String {
    format!("b-{i}")
}

/// Runs `requests` (index → (op, params)) over `connections` pipelined
/// connections; returns (elapsed, errors by message).
fn run_pipelined(
    addr: SocketAddr,
    total: u64,
    connections: u64,
    pipeline: u64,
    make: Arc<dyn Fn(u64) -> (&'static str, Value) + Send + Sync>,
) -> Result<(Duration, Vec<String>), String> {
    let started = Instant::now();
    let handles: Vec<_> = (0..connections)
        .map(|c| {
            let make = make.clone();
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut conn = Conn::connect(addr).map_err(|e| e.to_string())?;
                let mut errors = Vec::new();
                // This connection's share: indexes c, c + C, c + 2C, ...
                let mut next = c;
                while next < total {
                    let mut sent = 0;
                    while sent < pipeline && next < total {
                        let (op, params) = make(next);
                        conn.queue(op, &params).map_err(|e| e.to_string())?;
                        next += connections;
                        sent += 1;
                    }
                    conn.flush().map_err(|e| e.to_string())?;
                    for _ in 0..sent {
                        let r = conn.read().map_err(|e| e.to_string())?;
                        if let Err(e) = result(&r) {
                            if errors.len() < 10 {
                                errors.push(e);
                            }
                        }
                    }
                }
                Ok(errors)
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        errors.extend(h.join().map_err(|_| "worker panicked".to_string())??);
    }
    Ok((started.elapsed(), errors))
}

/// `load`: registers the ring machine, creates the instances, applies the
/// events, then checks the end state of a sample.
fn load(
    addr: SocketAddr,
    instances: u64,
    events: u64,
    connections: u64,
    pipeline: u64,
    ctx_bytes: usize,
    check: u64,
) -> Result<(), String> {
    let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
    let r = c
        .call(
            "PUT_MACHINE",
            &json!({"machine": "ring", "version": 1, "definition": ring_machine()}),
        )
        .map_err(|e| e.to_string())?;
    result(&r)?;
    load_create(addr, instances, connections, pipeline, ctx_bytes)?;
    load_apply(addr, instances, events, connections, pipeline)?;
    load_check(&mut c, instances, events, check)
}

/// `load`'s first phase: creates instances `b-0 …`, each context with
/// `ctx_bytes` of filler.
fn load_create(
    addr: SocketAddr,
    instances: u64,
    connections: u64,
    pipeline: u64,
    ctx_bytes: usize,
) -> Result<(), String> {
    let filler = "f".repeat(ctx_bytes);
    let (t_create, errors) = run_pipelined(
        addr,
        instances,
        connections,
        pipeline,
        Arc::new(move |i| {
            let ctx = if filler.is_empty() {
                json!({"n": 0})
            } else {
                json!({"n": 0, "filler": filler})
            };
            (
                "CREATE_INSTANCE",
                json!({"instance_id": id(i), "machine": "ring", "version": 1, "initial_ctx": ctx}),
            )
        }),
    )?;
    if !errors.is_empty() {
        return Err(format!("create errors: {errors:?}"));
    }
    println!(
        "{}",
        json!({"phase": "create", "requests": instances, "seconds": t_create.as_secs_f64(),
               "per_second": instances as f64 / t_create.as_secs_f64()})
    );
    Ok(())
}

/// `load`'s second phase: applies `events` NEXTs round-robin over the instances.
fn load_apply(
    addr: SocketAddr,
    instances: u64,
    events: u64,
    connections: u64,
    pipeline: u64,
) -> Result<(), String> {
    // Event k goes to instance k % N; round-robin keeps every connection's
    // requests to one instance in order (k and k + N share a connection
    // when N is a multiple of the connection count, or are N apart in
    // sequence otherwise, far beyond any pipeline window).
    let (t_apply, errors) = run_pipelined(
        addr,
        events,
        connections,
        pipeline,
        Arc::new(move |k| {
            (
                "APPLY_EVENT",
                json!({"instance_id": id(k % instances), "event": "NEXT", "payload": {"n": k}}),
            )
        }),
    )?;
    if !errors.is_empty() {
        return Err(format!("apply errors: {errors:?}"));
    }
    println!(
        "{}",
        json!({"phase": "apply", "requests": events, "seconds": t_apply.as_secs_f64(),
               "per_second": events as f64 / t_apply.as_secs_f64()})
    );
    Ok(())
}

/// `load`'s last phase: checks `check` instances (0 = all), evenly spread,
/// against the state their share of the events leads to.
fn load_check(c: &mut Conn, instances: u64, events: u64, check: u64) -> Result<(), String> {
    // Consistency: instance i received ceil((events - i) / N) events.
    let sample = if check == 0 {
        instances
    } else {
        check.min(instances)
    };
    let step = (instances / sample.max(1)).max(1);
    let mut wrong = 0u64;
    let mut checked = 0u64;
    let mut i = 0;
    while i < instances && checked < sample {
        let got = c
            .call("GET_INSTANCE", &json!({"instance_id": id(i)}))
            .map_err(|e| e.to_string())?;
        let applied = if events > i {
            (events - i).div_ceil(instances)
        } else {
            0
        };
        let want = format!("r{}", applied % STATES);
        if result(&got)?["state"] != want.as_str() {
            wrong += 1;
        }
        checked += 1;
        i += step;
    }
    println!(
        "{}",
        json!({"phase": "check", "checked": checked, "wrong": wrong})
    );
    if wrong > 0 {
        return Err(format!(
            "{wrong} of {checked} instances are not in their expected state"
        ));
    }
    Ok(())
}

fn pause(addr: SocketAddr, instances: u64, seconds: u64, compact_at_ms: u64) -> Result<(), String> {
    let started = Instant::now();
    let window = Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)));
    let w = window.clone();
    let compactor = std::thread::spawn(move || -> Result<Value, String> {
        std::thread::sleep(Duration::from_millis(compact_at_ms));
        let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
        w.0.store(started.elapsed().as_micros() as u64, Ordering::SeqCst);
        let r = c
            .call("COMPACT", &json!({"force_snapshot": true}))
            .map_err(|e| e.to_string())?;
        w.1.store(started.elapsed().as_micros() as u64, Ordering::SeqCst);
        Ok(result(&r)?.clone())
    });
    let mut c = Conn::connect(addr).map_err(|e| e.to_string())?;
    let mut outside = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut during = outside.clone();
    let mut k = 0u64;
    let end = Duration::from_secs(seconds);
    while started.elapsed() < end {
        let t0 = Instant::now();
        let at = started.elapsed().as_micros() as u64;
        let r = c
            .call(
                "APPLY_EVENT",
                &json!({"instance_id": id(k % instances), "event": "NEXT", "payload": {"n": k}}),
            )
            .map_err(|e| e.to_string())?;
        let us = t0.elapsed().as_micros() as u64;
        result(&r)?;
        let (from, to) = (
            window.0.load(Ordering::SeqCst),
            window.1.load(Ordering::SeqCst),
        );
        // A request overlaps the compaction if it was in flight at any
        // moment between the COMPACT's start and its answer.
        let overlaps = from != u64::MAX && at + us >= from && (to == u64::MAX || at <= to);
        if overlaps { &mut during } else { &mut outside }
            .record(us.max(1))
            .ok();
        k += 1;
    }
    let report = compactor
        .join()
        .map_err(|_| "compactor panicked".to_string())??;
    let (from, to) = (
        window.0.load(Ordering::SeqCst),
        window.1.load(Ordering::SeqCst),
    );
    let summary = |h: &Histogram<u64>| {
        json!({"requests": h.len(), "p50_us": h.value_at_quantile(0.5),
               "p99_us": h.value_at_quantile(0.99), "max_us": h.max()})
    };
    println!(
        "{}",
        json!({"compact_ms": (to.saturating_sub(from)) as f64 / 1000.0, "compact_result": report,
               "apply_outside_compaction": summary(&outside),
               "apply_during_compaction": summary(&during)})
    );
    if to == u64::MAX {
        return Err("the COMPACT did not finish within the measurement".into());
    }
    Ok(())
}

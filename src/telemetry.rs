//! Prometheus metrics: the recorder, the figures collected at scrape time,
//! the per-request instruments the frontends use, and the small HTTP
//! endpoint (`metrics.enabled`, spec/CLI.md §B4).
//!
//! Names, types and labels are the reference's (`rstmdb_requests_total
//! {operation}`, `rstmdb_errors_total{code}`, …) so dashboards built for it
//! keep working. Where a figure lives in the shards (instances, WAL
//! counters) it is asked for at scrape time, one message per shard, instead
//! of being pushed per request: a scrape every few seconds costs the shards
//! nothing measurable, a push per write would.
//!
//! The endpoint runs on its own thread with blocking std sockets: it serves
//! a scrape every few seconds, and keeping it off the executors means a slow
//! scraper can never delay a request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rstmdb_shards::error::ErrorCode;
use rstmdb_shards::shard::{ShardMsg, Telemetry, GROUP_COMMIT_RECORDS, SNAPSHOT_SECONDS};

use crate::protocol::names::OPS;
use crate::service::replication_status::{self, ClusterView};

/// `rstmdb_request_duration_seconds` buckets: the reference's.
const REQUEST_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// `rstmdb_wal_fsync_duration_seconds` buckets: 50 µs (NVMe) to 1 s (a
/// struggling disk).
const FSYNC_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.25, 1.0,
];
/// `rstmdb_group_commit_records` buckets: records per commit.
const COMMIT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 8192.0,
];
/// `rstmdb_snapshot_duration_seconds` buckets.
const SNAPSHOT_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];
/// `rstmdb_subscriber_lag_offsets` buckets: WAL offsets a subscription is
/// behind after a delivery pass.
const LAG_BUCKETS: [f64; 8] = [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

/// Histogram of how far behind the released offset a subscription is after
/// each delivery pass.
pub const SUBSCRIBER_LAG: &str = "rstmdb_subscriber_lag_offsets";
/// Gauge of open subscriptions, label `type` = `instance` / `all`.
pub const SUBSCRIPTIONS_ACTIVE: &str = "rstmdb_subscriptions_active";
/// Counter of events written to subscribers, label `type`.
pub const EVENTS_FORWARDED: &str = "rstmdb_events_forwarded_total";

/// How long a scrape waits for the shards' figures before it serves the
/// previous ones (a shard deep in a group commit answers late, not never).
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histograms are compacted (the exporter leaves it to us).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// Largest HTTP request head the endpoint reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Read/write timeout per HTTP connection: a scraper that stalls is dropped.
const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder. Must run before the
/// executors start: instruments created earlier stay no-ops.
pub fn install() -> Result<PrometheusHandle, String> {
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in [
        ("rstmdb_request_duration_seconds", &REQUEST_BUCKETS[..]),
        (rstmdb_wal::FSYNC_SECONDS, &FSYNC_BUCKETS[..]),
        (GROUP_COMMIT_RECORDS, &COMMIT_BUCKETS[..]),
        (SNAPSHOT_SECONDS, &SNAPSHOT_BUCKETS[..]),
        (SUBSCRIBER_LAG, &LAG_BUCKETS[..]),
        (rstmdb_shards::shard::COMMIT_SECONDS, &REQUEST_BUCKETS[..]),
    ] {
        b = b
            .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
            .map_err(|e| format!("metrics buckets for {name}: {e}"))?;
    }
    let handle = b
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

/// HELP lines for every family we export.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("rstmdb_connections_total", "Client connections accepted");
    describe_gauge!("rstmdb_connections_active", "Client connections open");
    describe_counter!("rstmdb_requests_total", "Requests by operation");
    describe_counter!("rstmdb_errors_total", "Error responses by error code");
    describe_histogram!(
        "rstmdb_request_duration_seconds",
        Unit::Seconds,
        "Request latency inside the server, by operation"
    );
    describe_gauge!(SUBSCRIPTIONS_ACTIVE, "Open subscriptions by type");
    describe_counter!(EVENTS_FORWARDED, "Events written to subscribers by type");
    describe_gauge!("rstmdb_instances_total", "Active (not deleted) instances");
    describe_gauge!("rstmdb_machines_total", "Registered machine versions");
    describe_gauge!(
        "rstmdb_wal_entries",
        "WAL records written over the log's life"
    );
    describe_gauge!("rstmdb_wal_segments", "WAL segment files");
    describe_gauge!("rstmdb_wal_size_bytes", "WAL bytes in use");
    describe_counter!("rstmdb_wal_bytes_written_total", "WAL bytes written");
    describe_counter!("rstmdb_wal_bytes_read_total", "WAL bytes read");
    describe_counter!("rstmdb_wal_writes_total", "WAL write calls");
    describe_counter!("rstmdb_wal_reads_total", "WAL read calls");
    describe_counter!("rstmdb_wal_fsyncs_total", "WAL fdatasync calls");
    describe_gauge!(
        "rstmdb_shard_queue_depth",
        "Batches waiting in each shard's inbound channel"
    );
    describe_histogram!(
        rstmdb_wal::FSYNC_SECONDS,
        Unit::Seconds,
        "Duration of each WAL fdatasync (or O_DSYNC write, which is the sync)"
    );
    describe_histogram!(GROUP_COMMIT_RECORDS, "WAL records per group commit");
    describe_histogram!(
        rstmdb_shards::shard::COMMIT_SECONDS,
        Unit::Seconds,
        "Cluster mode: seconds from a drain's proposal to its outcome"
    );
    describe_histogram!(
        SNAPSHOT_SECONDS,
        Unit::Seconds,
        "Time from a shard snapshot's start to its file being durable"
    );
    describe_histogram!(
        SUBSCRIBER_LAG,
        "WAL offsets a subscription is behind after each delivery pass"
    );
}

/// Per-request instruments of a frontend, one handle per operation so the
/// hot path is an atomic add, never a registry lookup.
pub struct RequestMetrics {
    /// `rstmdb_requests_total{operation}`, indexed like [`OPS`].
    requests: Vec<Counter>,
    /// `rstmdb_request_duration_seconds{operation}`, indexed like [`OPS`].
    seconds: Vec<Histogram>,
    /// `rstmdb_connections_total`.
    pub connections: Counter,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestMetrics {
    /// Registers the instruments (after [`install`]).
    pub fn new() -> Self {
        Self {
            requests: OPS
                .iter()
                .map(|op| metrics::counter!("rstmdb_requests_total", "operation" => *op))
                .collect(),
            seconds: OPS
                .iter()
                .map(
                    |op| metrics::histogram!("rstmdb_request_duration_seconds", "operation" => *op),
                )
                .collect(),
            connections: metrics::counter!("rstmdb_connections_total"),
        }
    }

    /// The index [`Self::observe`] takes for an operation name (`None` for
    /// a name the protocol does not have, which never gets this far).
    pub fn op_index(op: &str) -> Option<u8> {
        OPS.iter().position(|o| *o == op).map(|i| i as u8)
    }

    /// Counts one answered request and its latency; an error answer is
    /// also counted under its code.
    pub fn observe(&self, op: u8, seconds: f64, error: Option<ErrorCode>) {
        let op = op as usize;
        self.requests[op].increment(1);
        self.seconds[op].record(seconds);
        if let Some(code) = error {
            metrics::counter!("rstmdb_errors_total", "code" => code.as_str()).increment(1);
        }
    }
}

/// Reads the figures that live elsewhere (shards, connection count) into
/// gauges and counters just before each scrape is rendered.
pub struct Collector {
    /// Each shard's inbound channel, in shard order. Weak: a shard stops
    /// when the frontends drop their senders, and this thread is never
    /// joined.
    pub shards: Vec<flume::WeakSender<ShardMsg>>,
    /// Open client connections (shared by every frontend).
    pub active_connections: Arc<AtomicUsize>,
    /// The standard `process_*` families (CPU seconds, open and max fds,
    /// resident and virtual memory, start time, threads), read from /proc.
    pub process: metrics_process::Collector,
    /// Cluster mode: the node's replication figures.
    pub cluster: Option<ClusterView>,
}

impl Collector {
    /// A collector for these shards and this connection count.
    pub fn new(
        shards: Vec<flume::WeakSender<ShardMsg>>,
        active_connections: Arc<AtomicUsize>,
        cluster: Option<ClusterView>,
    ) -> Self {
        let process = metrics_process::Collector::default();
        process.describe();
        Self {
            shards,
            active_connections,
            process,
            cluster,
        }
    }

    fn refresh(&self) {
        self.process.collect();
        if let Some(v) = &self.cluster {
            replication_status::export_metrics(v);
        }
        metrics::gauge!("rstmdb_connections_active")
            .set(self.active_connections.load(Ordering::Relaxed) as f64);
        let (tx, rx) = flume::bounded::<(usize, Telemetry)>(self.shards.len());
        let mut asked = 0;
        for (i, s) in self.shards.iter().enumerate() {
            let Some(s) = s.upgrade() else {
                return; // shutting down
            };
            metrics::gauge!("rstmdb_shard_queue_depth", "shard" => i.to_string())
                .set(s.len() as f64);
            // A full channel means a saturated shard: skip it this time
            // rather than queue a scrape behind its backlog.
            if s.try_send(ShardMsg::Telemetry(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        let deadline = std::time::Instant::now() + SHARD_ANSWER_TIMEOUT;
        let mut answers = Vec::with_capacity(asked);
        while answers.len() < asked {
            match rx.recv_deadline(deadline) {
                Ok(a) => answers.push(a),
                Err(_) => break,
            }
        }
        if answers.len() < self.shards.len() {
            // Sums over some shards would look like drops: keep the last
            // complete figures.
            tracing::debug!(
                answered = answers.len(),
                shards = self.shards.len(),
                "a shard did not answer the metrics scrape in time; serving the previous figures"
            );
            return;
        }
        let mut sum = Telemetry::default();
        let mut machines = 0;
        for (shard, t) in &answers {
            sum.instances += t.instances;
            sum.wal.entries += t.wal.entries;
            sum.wal.segments += t.wal.segments;
            sum.wal.used_bytes += t.wal.used_bytes;
            sum.wal.io.bytes_written += t.wal.io.bytes_written;
            sum.wal.io.bytes_read += t.wal.io.bytes_read;
            sum.wal.io.writes += t.wal.io.writes;
            sum.wal.io.reads += t.wal.io.reads;
            sum.wal.io.fsyncs += t.wal.io.fsyncs;
            if *shard == 0 {
                // Every shard holds every machine version.
                machines = t.machine_versions;
            }
        }
        metrics::gauge!("rstmdb_instances_total").set(sum.instances as f64);
        metrics::gauge!("rstmdb_machines_total").set(machines as f64);
        metrics::gauge!("rstmdb_wal_entries").set(sum.wal.entries as f64);
        metrics::gauge!("rstmdb_wal_segments").set(sum.wal.segments as f64);
        metrics::gauge!("rstmdb_wal_size_bytes").set(sum.wal.used_bytes as f64);
        metrics::counter!("rstmdb_wal_bytes_written_total").absolute(sum.wal.io.bytes_written);
        metrics::counter!("rstmdb_wal_bytes_read_total").absolute(sum.wal.io.bytes_read);
        metrics::counter!("rstmdb_wal_writes_total").absolute(sum.wal.io.writes);
        metrics::counter!("rstmdb_wal_reads_total").absolute(sum.wal.io.reads);
        metrics::counter!("rstmdb_wal_fsyncs_total").absolute(sum.wal.io.fsyncs);
    }
}

/// Binds the endpoint (so a taken port stops start-up) and serves it on a
/// background thread; a second thread runs the exporter's upkeep.
pub fn serve(
    bind: SocketAddr,
    handle: PrometheusHandle,
    collector: Collector,
) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(bind)
        .map_err(|e| format!("cannot listen for metrics on {bind}: {e} (metrics.bind_addr)"))?;
    let local = listener.local_addr().unwrap_or(bind);
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("starting the metrics upkeep thread: {e}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &handle, &collector) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| format!("starting the metrics thread: {e}"))?;
    Ok(local)
}

/// What the endpoint answers for a request line.
fn route(method: &str, path: &str) -> (u16, &'static str, Option<&'static str>) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return (405, TEXT, Some("Method Not Allowed"));
    }
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", None),
        "/health" | "/healthz" => (200, TEXT, Some("OK")),
        "/" => (
            200,
            "text/html; charset=utf-8",
            Some(
                "<html><head><title>rstmdb metrics</title></head><body>\
                 <h1>rstmdb metrics</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>",
            ),
        ),
        _ => (404, TEXT, Some("Not Found")),
    }
}

/// Serves one HTTP/1.x request and closes the connection.
fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    collector: &Collector,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HTTP_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                431,
                "text/plain",
                b"Request Header Fields Too Large",
                true,
            );
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return respond(&mut stream, 400, "text/plain", b"Bad Request", true);
    };
    let path = target.split('?').next().unwrap_or(target);
    let (status, ctype, body) = route(method, path);
    let head_only = method == "HEAD";
    if path == "/health" && status == 200 {
        // A cluster node is ready once it knows a leader and is caught up.
        if let Some(Err(why)) = collector
            .cluster
            .as_ref()
            .map(replication_status::readiness)
        {
            return respond(&mut stream, 503, ctype, why.as_bytes(), !head_only);
        }
    }
    match body {
        Some(b) => respond(&mut stream, status, ctype, b.as_bytes(), !head_only),
        None => {
            collector.refresh();
            let text = handle.render();
            respond(&mut stream, status, ctype, text.as_bytes(), !head_only)
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_the_reference_endpoint() {
        assert_eq!(route("GET", "/metrics").0, 200);
        assert!(route("GET", "/metrics")
            .1
            .starts_with("text/plain; version=0.0.4"));
        assert_eq!(
            route("GET", "/health"),
            (200, "text/plain; charset=utf-8", Some("OK"))
        );
        assert_eq!(route("GET", "/healthz").2, Some("OK"));
        assert!(route("GET", "/").2.unwrap().contains("/metrics"));
        assert_eq!(
            route("GET", "/nope"),
            (404, "text/plain; charset=utf-8", Some("Not Found"))
        );
        assert_eq!(route("POST", "/metrics").0, 405);
    }

    #[test]
    fn every_protocol_op_has_an_index() {
        for op in OPS {
            let i = RequestMetrics::op_index(op).unwrap();
            assert_eq!(OPS[i as usize], op);
        }
        assert_eq!(RequestMetrics::op_index("NOPE"), None);
    }
}

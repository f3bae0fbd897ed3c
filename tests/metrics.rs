//! The Prometheus endpoint: after a workload, `/metrics` parses as valid
//! Prometheus text and carries the reference's families with the values the
//! workload implies; `/health`, `/healthz`, `/` and 404 as in CLI.md §B4.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Opts, Server};
use serde_json::json;

/// One HTTP/1.1 GET; returns (status, headers, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// A series' labels other than `le`, sorted.
type Labels = Vec<(String, String)>;

/// A parsed sample: family name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses Prometheus text format 0.0.4 strictly enough to catch malformed
/// output: every sample belongs to a family declared by `# TYPE` earlier,
/// names and label syntax are valid, values are floats, histogram buckets
/// are cumulative and end with `+Inf` equal to `_count`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().unwrap_or_else(|| panic!("{}", at()));
                    let ty = parts.next().unwrap_or_else(|| panic!("{}", at()));
                    assert!(valid_name(name), "{}", at());
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                        "{}",
                        at()
                    );
                    assert!(
                        types.insert(name.to_owned(), ty.to_owned()).is_none(),
                        "family declared twice: {}",
                        at()
                    );
                }
                Some("HELP") => {
                    let name = parts.next().unwrap_or_else(|| panic!("{}", at()));
                    assert!(valid_name(name), "{}", at());
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "{}", at());
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, HashMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{}", at()));
                let mut labels = HashMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{}", at()));
                    assert!(valid_name(k), "label name: {}", at());
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("label value quoting: {}", at()));
                    labels.insert(k.to_owned(), v.to_owned());
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{}", at());
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its # TYPE: {}",
            at()
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Histogram buckets: cumulative, +Inf last and equal to _count.
    for (family, ty) in &types {
        if ty != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let mut series: HashMap<Labels, Vec<(f64, f64)>> = HashMap::new();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let le: f64 = match s.labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            let mut key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            key.sort();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} {key:?}: buckets not cumulative"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{family}: +Inf bucket");
            let count = samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count")
                        && key.iter().all(|(k, v)| s.labels.get(k) == Some(v))
                })
                .unwrap_or_else(|| panic!("{family} {key:?}: no _count"));
            assert_eq!(last.1, count.value, "{family} {key:?}: +Inf == _count");
        }
    }
    samples
}

/// The value of `name` with exactly these labels.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

#[test]
fn metrics_after_a_workload_are_valid_prometheus_text_with_the_reference_families() {
    let dir = common::data_dir("metrics");
    let port = common::free_port();
    let maddr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 2,
            extra_env: vec![
                ("RSTMDB_METRICS_ENABLED".into(), "true".into()),
                ("RSTMDB_METRICS_BIND".into(), maddr.to_string()),
            ],
            ..Opts::default()
        },
    );

    let mut watcher = server.client();
    watcher.ok("WATCH_ALL", json!({}));
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    const N: usize = 20;
    for i in 0..N {
        c.ok(
            "CREATE_INSTANCE",
            json!({"machine": "order", "version": 1, "instance_id": format!("o{i}"),
                   "initial_ctx": {"amount": 5}}),
        );
    }
    for i in 0..5 {
        c.ok(
            "APPLY_EVENT",
            json!({"instance_id": format!("o{i}"), "event": "PAY"}),
        );
    }
    c.ok("DELETE_INSTANCE", json!({"instance_id": "o19"}));
    assert_eq!(
        c.err("GET_INSTANCE", json!({"instance_id": "missing"})).0,
        "INSTANCE_NOT_FOUND"
    );
    c.err("APPLY_EVENT", json!({"instance_id": 5}));
    // The watcher receives the five transitions.
    for _ in 0..5 {
        let ev = watcher.read_frame().expect("event");
        assert_eq!(ev["type"], "event");
    }

    let (status, head, body) = get(maddr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let s = parse_exposition(&body);
    let op = |o: &str| value(&s, "rstmdb_requests_total", &[("operation", o)]);
    assert_eq!(op("CREATE_INSTANCE"), N as f64);
    assert_eq!(op("APPLY_EVENT"), 6.0);
    assert_eq!(op("PUT_MACHINE"), 1.0);
    assert_eq!(op("GET_INSTANCE"), 1.0);
    assert_eq!(op("DELETE_INSTANCE"), 1.0);
    assert_eq!(
        value(
            &s,
            "rstmdb_request_duration_seconds_count",
            &[("operation", "CREATE_INSTANCE")]
        ),
        N as f64
    );
    assert_eq!(
        value(&s, "rstmdb_errors_total", &[("code", "INSTANCE_NOT_FOUND")]),
        1.0
    );
    assert_eq!(
        value(&s, "rstmdb_errors_total", &[("code", "BAD_REQUEST")]),
        1.0
    );
    assert_eq!(value(&s, "rstmdb_instances_total", &[]), (N - 1) as f64);
    assert_eq!(value(&s, "rstmdb_machines_total", &[]), 1.0);
    // put_machine is logged by both shards; N creates, 5 applies, 1 delete.
    assert_eq!(value(&s, "rstmdb_wal_entries", &[]), (2 + N + 5 + 1) as f64);
    assert!(value(&s, "rstmdb_wal_segments", &[]) >= 2.0);
    assert!(value(&s, "rstmdb_wal_size_bytes", &[]) > 0.0);
    assert!(value(&s, "rstmdb_wal_bytes_written_total", &[]) > 0.0);
    let writes = value(&s, "rstmdb_wal_writes_total", &[]);
    assert!(writes >= 1.0);
    // every_write: every commit is synced.
    assert!(value(&s, "rstmdb_wal_fsyncs_total", &[]) >= 1.0);
    assert!(value(&s, "rstmdb_wal_fsync_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&s, "rstmdb_group_commit_records_sum", &[]) >= (2 + N + 5 + 1) as f64);
    assert!(value(&s, "rstmdb_connections_total", &[]) >= 2.0);
    assert_eq!(value(&s, "rstmdb_connections_active", &[]), 2.0);
    assert_eq!(
        value(&s, "rstmdb_subscriptions_active", &[("type", "all")]),
        1.0
    );
    assert_eq!(
        value(&s, "rstmdb_events_forwarded_total", &[("type", "all")]),
        5.0
    );
    assert_eq!(
        value(&s, "rstmdb_shard_queue_depth", &[("shard", "0")]),
        0.0
    );
    assert_eq!(
        value(&s, "rstmdb_shard_queue_depth", &[("shard", "1")]),
        0.0
    );
    // The standard process families.
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&s, "process_open_fds", &[]) > 3.0);
    assert!(value(&s, "process_threads", &[]) >= 3.0);
    assert!(value(&s, "process_start_time_seconds", &[]) > 1.6e9);
    // A counter of whole seconds (the metrics crate's counters are integers).
    assert!(value(&s, "process_cpu_seconds_total", &[]) >= 0.0);

    // A closed watcher no longer counts as subscribed.
    drop(watcher);
    c.ok("PING", json!({}));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = parse_exposition(&get(maddr, "/metrics").2);
        if value(&s, "rstmdb_subscriptions_active", &[("type", "all")]) == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "subscription still counted after its connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for path in ["/health", "/healthz"] {
        let (status, _, body) = get(maddr, path);
        assert_eq!((status, body.as_str()), (200, "OK"), "{path}");
    }
    let (status, _, body) = get(maddr, "/");
    assert_eq!(status, 200);
    assert!(body.contains("/metrics"), "{body}");
    let (status, _, body) = get(maddr, "/nope");
    assert_eq!((status, body.as_str()), (404, "Not Found"));

    // A request head over 8 KiB is refused with 431, and the endpoint goes
    // on answering.
    let mut s = TcpStream::connect(maddr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let _ = s.write_all(huge.as_bytes());
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 431"), "{raw}");
    assert_eq!(get(maddr, "/health").0, 200);
}

#[test]
fn a_taken_metrics_port_stops_start_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = common::data_dir("metrics-taken");
    let mut s = Server::spawn(
        dir.path(),
        Opts {
            extra_env: vec![
                ("RSTMDB_METRICS_ENABLED".into(), "1".into()),
                (
                    "RSTMDB_METRICS_BIND".into(),
                    taken.local_addr().unwrap().to_string(),
                ),
            ],
            ..Opts::default()
        },
    );
    let (code, log) = s.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("metrics.bind_addr"), "{log}");
}

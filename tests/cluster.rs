//! A three-node cluster of real processes on loopback (issue 17): any node
//! serves every operation; a leader killed with -9 and restarted on the
//! same ports loses no acknowledged write; a minority answers writes with
//! a retryable error instead of hanging; partitions (per-link TCP proxies
//! the test cuts) and a wrong replication token; and the clients' recorded
//! history checked for linearizability.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{data_dir, dev_certs, free_port, Client, Opts, Server};
use rstmdb_shards::lincheck::{check, Call, InstanceModel, InstanceOp, InstanceRet};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NODES: usize = 3;

/// A TCP relay for one direction of one node pair: the test cuts it to
/// partition the pair (open connections are shut, new ones refused).
struct Link {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Link {
    fn new(to: u16) -> Link {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                cs.lock().unwrap().push(inbound.try_clone().unwrap());
                cs.lock().unwrap().push(outbound.try_clone().unwrap());
                pump(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                pump(outbound, inbound);
            }
        });
        Link { port, cut, conns }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// Three nodes, each with its client address, its peer port, and a relay
/// for every link to every other node.
struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Server>,
    /// Each node's metrics endpoint.
    metrics: Vec<SocketAddr>,
    /// The token clients present (when the nodes require one).
    client_token: Option<String>,
    /// Where each node listens for its peers.
    peer_ports: Vec<u16>,
    /// `links[i][j]`: what node i dials to reach node j.
    links: Vec<Vec<Option<Link>>>,
}

impl Cluster {
    fn start(name: &str, fsync: &'static str) -> Cluster {
        Cluster::start_with(name, fsync, &|_| "secret".to_string())
    }

    fn start_with(name: &str, fsync: &'static str, token: &dyn Fn(usize) -> String) -> Cluster {
        Cluster::start_full(name, fsync, token, "", None)
    }

    /// Three nodes; `yaml` is added to every node's config file, and with
    /// `client_token` the nodes require it (and the harness presents it).
    fn start_full(
        name: &str,
        fsync: &'static str,
        token: &dyn Fn(usize) -> String,
        yaml: &str,
        client_token: Option<&str>,
    ) -> Cluster {
        Cluster::start_each(name, fsync, &|i| (token(i), yaml.to_string()), client_token)
    }

    /// Three nodes, each with its own (replication token, config lines).
    fn start_nodes(
        name: &str,
        fsync: &'static str,
        node: &dyn Fn(usize) -> (String, String),
    ) -> Cluster {
        Cluster::start_each(name, fsync, node, None)
    }

    fn start_each(
        name: &str,
        fsync: &'static str,
        node: &dyn Fn(usize) -> (String, String),
        client_token: Option<&str>,
    ) -> Cluster {
        let peer_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let links: Vec<Vec<Option<Link>>> = (0..NODES)
            .map(|i| {
                (0..NODES)
                    .map(|j| (i != j).then(|| Link::new(peer_ports[j])))
                    .collect()
            })
            .collect();
        let dirs: Vec<_> = (0..NODES)
            .map(|i| data_dir(&format!("{name}-{i}")))
            .collect();
        let metrics: Vec<SocketAddr> = (0..NODES)
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let nodes = (0..NODES)
            .map(|i| {
                let peers: Vec<String> = (0..NODES)
                    .map(|j| {
                        let port = links[i][j].as_ref().map_or(peer_ports[i], |l| l.port);
                        format!("{}=127.0.0.1:{port}", j + 1)
                    })
                    .collect();
                let config = dirs[i].path().with_extension("yaml");
                let (token, yaml) = node(i);
                let auth = client_token.map_or(String::new(), |t| {
                    let hash: String = Sha256::digest(t.as_bytes())
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    format!("auth:\n  required: true\n  token_hashes: [\"{hash}\"]\n")
                });
                std::fs::write(
                    &config,
                    format!(
                        "cluster:\n  tick_ms: 50\n  election_ticks: 10\n  heartbeat_ticks: 2\n  \
                         commit_timeout_ms: 3000\n{yaml}{auth}"
                    ),
                )
                .unwrap();
                let opts = Opts {
                    shards: 1,
                    fsync,
                    extra_env: vec![
                        ("RSTMDB_CONFIG".into(), config.display().to_string()),
                        ("RSTMDB_CLUSTER_NODE_ID".into(), (i + 1).to_string()),
                        ("RSTMDB_CLUSTER_PEERS".into(), peers.join(",")),
                        ("RSTMDB_REPL_AUTH_TOKEN".into(), token),
                        ("RSTMDB_METRICS_ENABLED".into(), "true".into()),
                        ("RSTMDB_METRICS_BIND".into(), metrics[i].to_string()),
                    ],
                    ..Opts::default()
                };
                Server::start(dirs[i].path(), opts)
            })
            .collect();
        Cluster {
            _dirs: dirs,
            nodes,
            metrics,
            links,
            client_token: client_token.map(String::from),
            peer_ports,
        }
    }

    /// Node `i`'s `/metrics` text.
    fn scrape(&self, i: usize) -> String {
        self.http_get(i, "/metrics")
    }

    /// The whole HTTP answer to `GET path` on node `i`'s metrics endpoint.
    fn http_get(&self, i: usize, path: &str) -> String {
        let mut s = TcpStream::connect(self.metrics[i]).unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    /// A client of node `i`, authenticated when the nodes require it.
    fn client(&self, i: usize) -> Client {
        let mut c = self.nodes[i].client();
        if let Some(t) = &self.client_token {
            c.ok("AUTH", json!({"method": "bearer", "token": t}));
        }
        c
    }

    fn status(&self, i: usize) -> Option<Value> {
        let stream = TcpStream::connect(self.nodes[i].addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut c = Client::from_stream(stream);
        if let Some(t) = &self.client_token {
            c.try_call("AUTH", &json!({"method": "bearer", "token": t}))?;
        }
        let r = c.try_call("REPLICATION_STATUS", &json!({}))?;
        Some(r["result"].clone())
    }

    /// The node every live node in `among` agrees leads, once there is one.
    fn leader_among(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let views: Vec<Option<u64>> = among
                .iter()
                .map(|&i| self.status(i).and_then(|s| s["leader_id"].as_u64()))
                .collect();
            if let Some(Some(l)) = views.first() {
                let l = *l as usize - 1;
                if views.iter().all(|v| *v == Some(l as u64 + 1)) && among.contains(&l) {
                    return l;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no agreed leader among {among:?}");
    }

    fn leader(&self) -> usize {
        self.leader_among(&[0, 1, 2])
    }

    /// Cuts (or heals) both directions between `a` and `b`.
    fn partition(&self, a: usize, b: usize, cut: bool) {
        self.links[a][b].as_ref().unwrap().set_cut(cut);
        self.links[b][a].as_ref().unwrap().set_cut(cut);
    }

    /// Every node's WAL, as WAL_READ lists it: (offset, entry kind, instance).
    fn wal(&self, i: usize) -> Vec<(u64, String, String)> {
        let mut c = self.nodes[i].client();
        let r = c.ok("WAL_READ", json!({"from_offset": 1, "limit": 10000}));
        r["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["entry"]["type"].as_str().unwrap_or("").to_string(),
                    e["entry"]["instance_id"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Node `i`'s whole WAL as WAL_READ returns the records.
    fn full_wal(&self, i: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let mut from = 1u64;
        let mut c = self.nodes[i].client();
        loop {
            let r = c.ok("WAL_READ", json!({"from_offset": from, "limit": 1000}));
            let recs = r["records"].as_array().unwrap().clone();
            let Some(last) = recs.last().map(|r| r["offset"].as_u64().unwrap()) else {
                return out;
            };
            from = last + 1;
            out.extend(recs);
        }
    }

    /// Waits until every node's whole WAL is the same, and returns it.
    fn converged_full_wal(&self) -> Vec<Value> {
        self.converged(|i| self.full_wal(i))
    }

    /// Waits until every node's WAL is the same, and returns it.
    fn converged_wal(&self) -> Vec<(u64, String, String)> {
        self.converged(|i| self.wal(i))
    }

    /// Waits until `read` gives the same on every node, and returns it.
    fn converged<T: PartialEq + Clone>(&self, read: impl Fn(usize) -> Vec<T>) -> Vec<T> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wals: Vec<_> = (0..NODES).map(&read).collect();
            if wals.iter().all(|w| *w == wals[0]) {
                return wals[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "the nodes' WALs never converged: {:?}",
                wals.iter().map(Vec::len).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn machine() -> Value {
    json!({
        "states": ["a", "b", "c"],
        "initial": "a",
        "transitions": [
            {"from": "a", "event": "GO", "to": "b"},
            {"from": "b", "event": "GO", "to": "c"},
            {"from": "c", "event": "BACK", "to": "a"}
        ]
    })
}

fn transitions() -> Rc<Vec<(String, String, String)>> {
    Rc::new(
        [("a", "GO", "b"), ("b", "GO", "c"), ("c", "BACK", "a")]
            .iter()
            .map(|(f, e, t)| (f.to_string(), e.to_string(), t.to_string()))
            .collect(),
    )
}

/// Sends `op` to node `i`, retrying while the cluster has no leader yet.
fn call_until_ok(c: &Cluster, i: usize, op: &str, params: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = c.nodes[i].client();
        let r = client.call(op, params.clone());
        if r["status"] == "ok" {
            return r["result"].clone();
        }
        assert!(
            r["error"]["retryable"] == true && Instant::now() < deadline,
            "{op} on node {} failed: {r}",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers the test machine through node `i` (retrying until a leader
/// serves).
fn put_machine(c: &Cluster, i: usize) {
    call_until_ok(
        c,
        i,
        "PUT_MACHINE",
        json!({"machine": "m", "version": 1, "definition": machine()}),
    );
}

/// Creates instance `id` through node `i`; its result.
fn create(c: &Cluster, i: usize, id: &str) -> Value {
    call_until_ok(
        c,
        i,
        "CREATE_INSTANCE",
        json!({"instance_id": id, "machine": "m", "version": 1}),
    )
}

#[test]
fn any_node_serves_every_operation_and_every_node_logs_the_same_records() {
    let c = Cluster::start("cluster-any", "every_write");
    let leader = c.leader();
    let followers: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
    let (f1, f2) = (followers[0], followers[1]);
    put_machine(&c, f1);
    let created = create(&c, f2, "x");
    let applied = c.nodes[f1]
        .client()
        .ok("APPLY_EVENT", json!({"instance_id": "x", "event": "GO"}));
    assert_eq!(applied["to_state"], "b");
    assert!(applied["wal_offset"].as_u64() > created["wal_offset"].as_u64());
    for n in &c.nodes {
        // Linearizable by default: a follower's read goes to the leader,
        // so it sees the write just acknowledged through another node.
        let got = n.client().ok("GET_INSTANCE", json!({"instance_id": "x"}));
        assert_eq!(got["state"], "b");
    }
    // An atomic batch through a follower, all or nothing.
    let batch = c.nodes[f2].client().call(
        "BATCH",
        json!({"mode": "atomic", "ops": [
            {"op": "APPLY_EVENT", "params": {"instance_id": "x", "event": "GO"}},
            {"op": "APPLY_EVENT", "params": {"instance_id": "x", "event": "GO"}}
        ]}),
    );
    assert_eq!(
        batch["status"], "error",
        "the second GO has no transition: {batch}"
    );
    let got = c.nodes[f2]
        .client()
        .ok("GET_INSTANCE", json!({"instance_id": "x"}));
    assert_eq!(got["state"], "b", "nothing of the failed batch took effect");
    // The same records at the same offsets on every node.
    let wal = c.converged_wal();
    let kinds: Vec<&str> = wal.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["put_machine", "create_instance", "apply_event"]);
    // REPLICATION_STATUS in the reference's shape on each role.
    let lead = c.status(leader).unwrap();
    assert_eq!(lead["role"], "primary");
    assert_eq!(lead["connected_replicas"], 2);
    assert_eq!(lead["replicas"].as_array().unwrap().len(), 2);
    let follow = c.status(f1).unwrap();
    assert_eq!(follow["role"], "replica");
    assert_eq!(follow["leader_id"], leader as u64 + 1);
    assert_eq!(
        follow["upstream"],
        c.nodes[leader].addr.to_string(),
        "the leader's client address"
    );
    // The reference's replication families, and ours.
    let text = c.scrape(leader);
    assert!(
        text.contains("rstmdb_replication_connected_replicas 2"),
        "{text}"
    );
    for family in [
        "rstmdb_replication_replica_lag_entries{replica_id=",
        "rstmdb_replication_replica_last_acked_sequence{replica_id=",
        "rstmdb_replication_entries_sent_total",
        "rstmdb_replication_sync_timeouts_total",
        "rstmdb_replication_term",
        "rstmdb_replication_elections_total",
        "rstmdb_replication_commit_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert!(c.scrape(f1).contains("rstmdb_replication_lag_entries"));
    // Readiness: every node knows the leader and is caught up.
    for i in 0..NODES {
        let health = c.http_get(i, "/health");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }
    // And the real rstmdb-cli reads it.
    let out = std::process::Command::new(common::cli_path())
        .args(["-s", &c.nodes[f1].addr.to_string(), "replication-status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("replica"), "{text}");
}

#[test]
fn watches_on_a_follower_see_transitions_committed_through_another_node() {
    let c = Cluster::start("cluster-watch", "never");
    let leader = c.leader();
    let follower = (leader + 1) % NODES;
    put_machine(&c, leader);
    create(&c, leader, "w");
    let mut watcher = c.nodes[follower].client();
    watcher.ok("WATCH_ALL", json!({}));
    c.nodes[leader]
        .client()
        .ok("APPLY_EVENT", json!({"instance_id": "w", "event": "GO"}));
    let ev = watcher.read_frame().expect("an event");
    assert_eq!(ev["type"], "event", "{ev}");
    assert_eq!(ev["instance_id"], "w");
    assert_eq!(ev["to_state"], "b");
}

#[test]
fn a_minority_answers_writes_with_a_retryable_error_and_recovers_when_healed() {
    let mut c = Cluster::start("cluster-minority", "every_write");
    let leader = c.leader();
    put_machine(&c, leader);
    let others: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
    for &o in &others {
        c.nodes[o].kill9();
    }
    let started = Instant::now();
    let r = c.nodes[leader].client().call(
        "CREATE_INSTANCE",
        json!({"instance_id": "lonely", "machine": "m", "version": 1}),
    );
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error"]["retryable"], true, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered, not hung"
    );
    // The lone node steps down (check-quorum): not ready, though alive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.http_get(leader, "/health").starts_with("HTTP/1.1 503") {
        assert!(
            Instant::now() < deadline,
            "a node without a majority stays ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.http_get(leader, "/healthz").starts_with("HTTP/1.1 200"));
    for &o in &others {
        c.nodes[o].restart();
    }
    let leader = c.leader();
    let created = call_until_ok(
        &c,
        leader,
        "CREATE_INSTANCE",
        json!({"instance_id": "back", "machine": "m", "version": 1, "idempotency_key": "k"}),
    );
    assert_eq!(created["state"], "a");
    c.converged_wal();
}

#[test]
fn a_node_with_a_wrong_replication_token_never_joins() {
    let c = Cluster::start_with("cluster-token", "never", &|i| {
        if i == 2 { "wrong" } else { "secret" }.to_string()
    });
    let leader = c.leader_among(&[0, 1]);
    assert!(leader < 2, "the intruder cannot lead");
    put_machine(&c, leader);
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.wal(2).is_empty(), "the intruder received nothing");
    let log = c.nodes[leader].log_text() + &c.nodes[2].log_text();
    assert!(
        log.contains("replication token"),
        "refusals are logged: {log}"
    );
}

/// One client's recorded calls on the instances.
type History = Vec<(usize, Call<InstanceOp, InstanceRet>)>;

/// Clients on every node apply random operations to a few instances,
/// recording each call, while `fault` runs; returns the history.
fn run_clients(addrs: Vec<SocketAddr>, clients: usize, fault: impl FnOnce()) -> History {
    const INSTANCES: usize = 4;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<History>> = Arc::default();
    let handles: Vec<_> = (0..clients)
        .map(|k| {
            let (stop, history, addrs) = (stop.clone(), history.clone(), addrs.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (k as u64 + 1);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let node = (rng % addrs.len() as u64) as usize;
                    let inst = ((rng >> 8) % INSTANCES as u64) as usize;
                    let (op, call) = match (rng >> 16) % 4 {
                        0 => (
                            InstanceOp::Create {
                                initial: "a".into(),
                            },
                            (
                                "CREATE_INSTANCE",
                                json!({"instance_id": format!("h{inst}"),
                                "machine": "m", "version": 1}),
                            ),
                        ),
                        1 => (
                            InstanceOp::Get,
                            ("GET_INSTANCE", json!({"instance_id": format!("h{inst}")})),
                        ),
                        _ => {
                            let event = if (rng >> 20).is_multiple_of(3) {
                                "BACK"
                            } else {
                                "GO"
                            };
                            n += 1;
                            (
                                InstanceOp::Apply {
                                    event: event.into(),
                                },
                                (
                                    "APPLY_EVENT",
                                    json!({"instance_id": format!("h{inst}"),
                                    "event": event, "idempotency_key": format!("c{k}-{n}")}),
                                ),
                            )
                        }
                    };
                    let invoked = start.elapsed().as_micros() as u64;
                    let answer = TcpStream::connect(addrs[node]).ok().and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                        Client::from_stream(s).try_call(call.0, &call.1)
                    });
                    let returned = start.elapsed().as_micros() as u64;
                    let ret = answer.and_then(|r| {
                        if r["status"] == "ok" {
                            let s = r["result"]["state"]
                                .as_str()
                                .or(r["result"]["to_state"].as_str())
                                .unwrap_or_default();
                            Some(InstanceRet::State(s.to_string()))
                        } else {
                            let code = r["error"]["code"].as_str().unwrap_or_default();
                            // A retryable error may hide a write that took
                            // effect: its outcome is unknown.
                            (code != "INTERNAL_ERROR").then(|| InstanceRet::Error(code.to_string()))
                        }
                    });
                    let call = Call {
                        op,
                        invoked,
                        returned: ret.map(|r| (returned, r)),
                    };
                    history.lock().unwrap().push((inst, call));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    fault();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(history).unwrap().into_inner().unwrap()
}

/// Checks every instance's history, with a final read through each node
/// (once all are up) appended after everything else.
fn check_history(c: &Cluster, mut history: History, started: Instant) {
    for inst in 0..4 {
        for n in &c.nodes {
            let invoked = started.elapsed().as_micros() as u64;
            let got = n
                .client()
                .call("GET_INSTANCE", json!({"instance_id": format!("h{inst}")}));
            let ret = if got["status"] == "ok" {
                InstanceRet::State(got["result"]["state"].as_str().unwrap().into())
            } else {
                InstanceRet::Error(got["error"]["code"].as_str().unwrap().into())
            };
            let returned = started.elapsed().as_micros() as u64;
            history.push((
                inst,
                Call {
                    op: InstanceOp::Get,
                    invoked,
                    returned: Some((returned, ret)),
                },
            ));
        }
    }
    let ok_writes = history
        .iter()
        .filter(|(_, c)| {
            !matches!(c.op, InstanceOp::Get)
                && matches!(c.returned, Some((_, InstanceRet::State(_))))
        })
        .count();
    let unknown = history.iter().filter(|(_, c)| c.returned.is_none()).count();
    eprintln!(
        "{} calls, {ok_writes} acknowledged writes, {unknown} unknown",
        history.len()
    );
    assert!(
        ok_writes >= 20,
        "the clients made progress ({ok_writes} writes)"
    );
    let model = InstanceModel {
        state: None,
        transitions: transitions(),
    };
    for inst in 0..4 {
        let calls: Vec<_> = history
            .iter()
            .filter(|(i, _)| *i == inst)
            .map(|(_, c)| c.clone())
            .collect();
        let known = calls.iter().filter(|c| c.returned.is_some()).count();
        assert!(known > 0, "instance h{inst} saw no answered call");
        if let Err(e) = check(&model, &calls) {
            panic!(
                "instance h{inst}: not linearizable ({} calls): {e}",
                calls.len()
            );
        }
    }
}

#[test]
fn kill9_of_the_leader_under_load_loses_nothing_and_the_history_is_linearizable() {
    let mut c = Cluster::start("cluster-kill", "every_write");
    let leader = c.leader();
    put_machine(&c, leader);
    let started = Instant::now();
    let addrs = c.nodes.iter().map(|n| n.addr).collect();
    let history = run_clients(addrs, 4, || {
        std::thread::sleep(Duration::from_millis(1500));
        // Restarted on the same addresses: the clients keep going.
        c.nodes[leader].restart();
        std::thread::sleep(Duration::from_millis(1500));
        let next = c.leader();
        c.nodes[next].restart();
        std::thread::sleep(Duration::from_millis(1500));
    });
    c.leader();
    c.converged_wal();
    check_history(&c, history, started);
}

#[test]
fn partitions_and_heals_under_load_keep_the_history_linearizable() {
    let c = Cluster::start("cluster-partition", "never");
    let leader = c.leader();
    put_machine(&c, leader);
    let started = Instant::now();
    let addrs = c.nodes.iter().map(|n| n.addr).collect();
    let history = run_clients(addrs, 4, || {
        std::thread::sleep(Duration::from_millis(800));
        // Isolate the leader: the others elect a new one while it may
        // still believe it leads.
        let others: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
        for &o in &others {
            c.partition(leader, o, true);
        }
        let next = c.leader_among(&others);
        assert_ne!(next, leader);
        std::thread::sleep(Duration::from_millis(1000));
        for &o in &others {
            c.partition(leader, o, false);
        }
        std::thread::sleep(Duration::from_millis(800));
        // Then cut one follower from the new leader only.
        let follower = others.iter().copied().find(|&o| o != next).unwrap();
        c.partition(next, follower, true);
        std::thread::sleep(Duration::from_millis(1000));
        c.partition(next, follower, false);
        std::thread::sleep(Duration::from_millis(500));
    });
    c.leader();
    c.converged_wal();
    check_history(&c, history, started);
}

/// What the retrying writers saw: every acknowledged apply by its
/// idempotency key (with the offset it answered), and when each came.
#[derive(Default)]
struct Acked {
    applies: Vec<(String, u64)>,
    at: Vec<Instant>,
    /// Each writer's expected final state.
    states: Vec<(String, String)>,
}

/// One writer: owns instance `w{k}`, creates it, then applies GO, GO,
/// BACK, ... each with its own idempotency key, sending a call whose
/// outcome is unknown again (same key, any node) until it gets an answer.
fn writer(k: usize, addrs: Vec<SocketAddr>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let id = format!("w{k}");
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ (k as u64 + 1);
    let mut call = |op: &str, params: Value| -> Value {
        loop {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let node = addrs[(rng % addrs.len() as u64) as usize];
            let answer = TcpStream::connect(node).ok().and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                Client::from_stream(s).try_call(op, &params)
            });
            match answer {
                Some(r) if r["status"] == "ok" => return r["result"].clone(),
                Some(r) if r["error"]["retryable"] == false => {
                    panic!("{op} {params} failed for good: {r}")
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    call(
        "CREATE_INSTANCE",
        json!({"instance_id": id, "machine": "m", "version": 1,
               "idempotency_key": format!("{id}-create")}),
    );
    let cycle = [("GO", "b"), ("GO", "c"), ("BACK", "a")];
    let mut state = "a";
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let (event, to) = cycle[n % 3];
        let key = format!("{id}-{n}");
        let r = call(
            "APPLY_EVENT",
            json!({"instance_id": id, "event": event, "idempotency_key": key}),
        );
        assert_eq!(r["to_state"], to, "{id} apply {n}: {r}");
        state = to;
        let mut a = acked.lock().unwrap();
        a.applies.push((key, r["wal_offset"].as_u64().unwrap()));
        a.at.push(Instant::now());
        n += 1;
    }
    acked.lock().unwrap().states.push((id, state.to_string()));
}

/// `CLUSTER_CYCLES` leader kills (default 2; `make cluster-test` runs 20),
/// then a rolling restart of every node, under retrying writers: nothing
/// acknowledged is lost, nothing applies twice, every node converges.
#[test]
fn leader_kill_cycles_and_a_rolling_restart_lose_nothing_and_apply_nothing_twice() {
    let cycles: usize = std::env::var("CLUSTER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut c = Cluster::start("cluster-cycles", "every_write");
    let leader = c.leader();
    put_machine(&c, leader);
    let addrs: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addr).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|k| {
            let (addrs, stop, acked) = (addrs.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || writer(k, addrs, stop, acked))
        })
        .collect();
    let mut recoveries = Vec::new();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(500));
        let leader = c.leader();
        c.nodes[leader].kill9();
        // From the moment the process is gone (an answer the old leader
        // sent just before dying is not a recovery).
        let killed = Instant::now();
        // The time from the kill to the next acknowledged write.
        let deadline = killed + Duration::from_secs(30);
        let next = loop {
            let first = acked
                .lock()
                .unwrap()
                .at
                .iter()
                .copied()
                .find(|t| *t > killed);
            if let Some(t) = first {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "no write acknowledged after a leader kill"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        recoveries.push(next - killed);
        c.nodes[leader].restart();
    }
    // A rolling restart: each node stopped and started in turn.
    for i in 0..NODES {
        std::thread::sleep(Duration::from_millis(300));
        c.nodes[i].stop();
        c.nodes[i].restart();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let wal = c.converged_full_wal();
    let acked = acked.lock().unwrap();
    let mut applied_keys = std::collections::HashMap::new();
    for r in &wal {
        if let Some(key) = r["entry"]["idempotency_key"].as_str() {
            let seen = applied_keys.insert(key.to_string(), r["offset"].as_u64().unwrap());
            assert!(seen.is_none(), "{key} applied twice");
        }
    }
    for (key, offset) in &acked.applies {
        assert_eq!(
            applied_keys.get(key),
            Some(offset),
            "acknowledged {key} at {offset} is not in the log there"
        );
    }
    for (id, state) in &acked.states {
        for n in &c.nodes {
            let got = n.client().ok("GET_INSTANCE", json!({"instance_id": id}));
            assert_eq!(got["state"], state.as_str(), "{id} on {}", n.addr);
        }
    }
    let ms: Vec<u128> = recoveries.iter().map(Duration::as_millis).collect();
    eprintln!(
        "{cycles} leader kills and a rolling restart: {} writes acknowledged, none lost or \
         applied twice; kill to next acknowledged write (ms): {ms:?}",
        acked.applies.len()
    );
    assert!(!acked.applies.is_empty());
}

/// With token auth required, a follower forwards an authenticated
/// client's writes (its AUTH replayed on the tunnel), and refuses an
/// unauthenticated one as a single node would.
#[test]
fn forwarding_carries_the_clients_authentication() {
    let c = Cluster::start_full(
        "cluster-auth",
        "never",
        &|_| "secret".into(),
        "",
        Some("tok"),
    );
    let leader = c.leader();
    let follower = (leader + 1) % NODES;
    let mut anon = c.nodes[follower].client();
    let (code, _) = anon.err(
        "PUT_MACHINE",
        json!({"machine": "m", "version": 1, "definition": machine()}),
    );
    assert_eq!(code, "UNAUTHORIZED");
    let mut authed = c.client(follower);
    authed.ok(
        "PUT_MACHINE",
        json!({"machine": "m", "version": 1, "definition": machine()}),
    );
    authed.ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "a1", "machine": "m", "version": 1}),
    );
    let got = c
        .client(leader)
        .ok("GET_INSTANCE", json!({"instance_id": "a1"}));
    assert_eq!(got["state"], "a");
}

/// `cluster.follower_reads: stale`: a node answers reads from its own
/// applied state, even with no leader reachable; writes still need one.
#[test]
fn stale_follower_reads_answer_without_a_leader() {
    let mut c = Cluster::start_full(
        "cluster-stale",
        "never",
        &|_| "secret".into(),
        "  follower_reads: stale\n",
        None,
    );
    let leader = c.leader();
    put_machine(&c, leader);
    create(&c, leader, "s1");
    let survivor = (leader + 1) % NODES;
    c.converged_wal();
    for i in 0..NODES {
        if i != survivor {
            c.nodes[i].kill9();
        }
    }
    let got = c.nodes[survivor]
        .client()
        .ok("GET_INSTANCE", json!({"instance_id": "s1"}));
    assert_eq!(got["state"], "a");
    let r = c.nodes[survivor]
        .client()
        .call("APPLY_EVENT", json!({"instance_id": "s1", "event": "GO"}));
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error"]["retryable"], true, "{r}");
}

/// The `tls:` and `replication:` keys for peer TLS with `certs`.
fn peer_tls_yaml(certs: &std::path::Path) -> String {
    let p = |f: &str| certs.join(f).display().to_string();
    format!(
        "tls:\n  cert_path: {}\n  key_path: {}\nreplication:\n  tls_enabled: true\n  \
         tls_ca_path: {}\n",
        p("server.pem"),
        p("server-key.pem"),
        p("ca.pem")
    )
}

/// `replication.tls_enabled`: peers talk TLS (Raft and tunnels alike), and
/// the cluster works as without it.
#[test]
fn peers_over_tls_elect_replicate_and_forward() {
    let certs = dev_certs("cluster-tls-certs");
    let yaml = peer_tls_yaml(certs.path());
    let c = Cluster::start_full("cluster-tls", "never", &|_| "secret".into(), &yaml, None);
    let leader = c.leader();
    let follower = (leader + 1) % NODES;
    put_machine(&c, follower);
    c.nodes[follower].client().ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "t1", "machine": "m", "version": 1}),
    );
    assert_eq!(c.converged_wal().len(), 2);
}

/// A node whose certificate the others' CA did not sign (and which does
/// not trust theirs) never joins.
#[test]
fn a_peer_with_a_certificate_from_another_ca_never_joins() {
    let good = dev_certs("cluster-ca-good");
    let other = dev_certs("cluster-ca-other");
    let yamls = [peer_tls_yaml(good.path()), peer_tls_yaml(other.path())];
    let c = Cluster::start_nodes("cluster-ca", "never", &|i| {
        ("secret".to_string(), yamls[usize::from(i == 2)].clone())
    });
    let leader = c.leader_among(&[0, 1]);
    put_machine(&c, leader);
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.wal(2).is_empty(), "the outsider received nothing");
}

/// The real clients, unchanged, against a follower: the Python client's
/// whole compatibility suite, and rstmdb-cli's writes and reads.
#[test]
fn the_real_clients_work_through_a_follower() {
    let c = Cluster::start("cluster-clients", "every_write");
    let leader = c.leader();
    let follower = c.nodes[(leader + 1) % NODES].addr;
    let python = common::tool(
        "RSTMDB_PYTHON",
        "venv/bin/python",
        "Python with rstmdb 0.2.1",
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat.py");
    let out = std::process::Command::new(python)
        .args([
            script,
            &follower.ip().to_string(),
            &follower.port().to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("python client suite: all checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::cli_path())
            .args(["-s", &follower.to_string()])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let def = machine().to_string();
    cli(&["put-machine", "-n", "cli", "-v", "1", &def]);
    cli(&["create-instance", "-m", "cli", "-V", "1", "--id", "c1"]);
    assert!(cli(&["apply-event", "--instance", "c1", "--event", "GO"]).contains("a → b"));
    assert!(cli(&["get-instance", "c1"]).contains("State: b"));
}

/// Strangers that connect to a node's peer port and never introduce
/// themselves do not stop it: it keeps committing, and once their
/// handshakes time out a follower forwards to it again.
#[test]
fn a_flood_of_silent_connections_on_the_peer_port_does_not_stop_the_node() {
    let c = Cluster::start("cluster-flood", "never");
    let leader = c.leader();
    put_machine(&c, leader);
    let strangers: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", c.peer_ports[leader])).ok())
        .collect();
    assert!(strangers.len() > 64, "the flood connected");
    // The group's own connections are established: the leader still
    // commits.
    c.nodes[leader].client().ok(
        "CREATE_INSTANCE",
        json!({"instance_id": "f1", "machine": "m", "version": 1}),
    );
    // Past the handshake timeout the strangers are gone, and a follower's
    // new tunnel to the leader goes through.
    std::thread::sleep(Duration::from_secs(6));
    let follower = (leader + 1) % NODES;
    call_until_ok(
        &c,
        follower,
        "CREATE_INSTANCE",
        json!({"instance_id": "f2", "machine": "m", "version": 1}),
    );
    drop(strangers);
}

/// A follower that was down while the leader compacted its log past it
/// catches up by a snapshot transfer: it installs the leader's state, its
/// WAL restarts there (older history is refused, never served with a gap),
/// it follows on from there, and it recovers from the installed snapshot
/// after a kill -9.
#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut c = Cluster::start_full(
        "cluster-snap",
        "every_write",
        &|_| "secret".into(),
        "  follower_reads: stale\n  raft_log_entries: 40\n",
        None,
    );
    let leader = c.leader();
    put_machine(&c, leader);
    for k in 0..10 {
        create(&c, leader, &format!("early-{k}"));
    }
    c.converged_wal();
    let behind = (leader + 1) % NODES;
    c.nodes[behind].kill9();
    // 12.5 × 40 entries: the leader stops waiting for the dead node.
    let mut client = c.client(leader);
    for k in 0..650 {
        let id = format!("late-{k}");
        client.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": id, "machine": "m", "version": 1}),
        );
        if k % 3 == 0 {
            client.ok("APPLY_EVENT", json!({"instance_id": id, "event": "GO"}));
        }
    }
    c.nodes[behind].restart();
    wait_for_install(&c, behind);
    check_follower_state(&c, behind, false);
    let sent = c.status(leader).unwrap()["groups"][0]["snapshots_sent"].clone();
    assert!(sent.as_u64().unwrap() >= 1, "the leader sent it: {sent}");
    // Older history is refused here, not served with a hole in it.
    let (code, message) = c.nodes[behind]
        .client()
        .err("WAL_READ", json!({"from_offset": 1, "limit": 10}));
    assert_eq!(code, "BAD_REQUEST", "{message}");
    assert!(message.contains("replaced by a snapshot"), "{message}");
    let (code, message) = c.nodes[behind]
        .client()
        .err("WATCH_ALL", json!({"from_offset": 1}));
    assert_eq!(code, "BAD_REQUEST", "{message}");
    // It follows on from the snapshot...
    client.ok(
        "APPLY_EVENT",
        json!({"instance_id": "late-1", "event": "GO"}),
    );
    check_follower_state(&c, behind, true);
    let installed_at = first_offset(&c, behind);
    assert!(installed_at > 650, "the snapshot holds what came before");
    let same = c.converged(|i| wal_from(&c, i, installed_at));
    assert!(!same.is_empty());
    // ...and recovers from it after a kill -9.
    c.nodes[behind].kill9();
    c.nodes[behind].restart();
    check_follower_state(&c, behind, true);
    assert_eq!(c.converged(|i| wal_from(&c, i, installed_at)), same);
}

/// The offset of the first record in node `i`'s WAL.
fn first_offset(c: &Cluster, i: usize) -> u64 {
    let r = c.nodes[i]
        .client()
        .ok("WAL_READ", json!({"from_offset": 0, "limit": 1}));
    r["records"][0]["offset"].as_u64().expect("a record")
}

/// Node `i`'s WAL records from `from` on.
fn wal_from(c: &Cluster, i: usize, from: u64) -> Vec<Value> {
    let r = c.nodes[i]
        .client()
        .ok("WAL_READ", json!({"from_offset": from, "limit": 10000}));
    r["records"].as_array().unwrap().clone()
}

/// Waits until node `i` has installed a snapshot and caught up.
fn wait_for_install(c: &Cluster, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.status(i) {
            let g = &s["groups"][0];
            let installed = g["snapshots_installed"].as_u64().unwrap_or(0);
            if installed > 0 && g["applied_index"] == g["commit_index"] {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} never installed a snapshot: {:?}",
            i + 1,
            c.status(i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node `i`'s own state (stale reads) has every instance, in the state
/// the writes left it (`moved`: with late-1 moved on), once it has caught
/// up.
fn check_follower_state(c: &Cluster, i: usize, moved: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = c.nodes[i].client();
        let wrong: Vec<String> = (0..10)
            .map(|k| (format!("early-{k}"), "a"))
            .chain((0..650).map(|k| {
                let state = if k % 3 == 0 || (moved && k == 1) {
                    "b"
                } else {
                    "a"
                };
                (format!("late-{k}"), state)
            }))
            .filter(|(id, state)| {
                let r = client.call("GET_INSTANCE", json!({"instance_id": id}));
                r["result"]["state"] != *state
            })
            .map(|(id, _)| id)
            .collect();
        if wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} differs on {} instances, e.g. {:?}",
            i + 1,
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rstmdb cluster transfer-leader` through a follower hands the leadership
/// where it is asked to, `rstmdb cluster status` prints the node's view,
/// HELLO announces the `cluster` feature, and a leader stopped with SIGTERM
/// hands its leadership over before it goes.
#[test]
fn leadership_is_handed_over_on_request_and_before_a_graceful_stop() {
    let mut c = Cluster::start("cluster-transfer", "every_write");
    let leader = c.leader();
    put_machine(&c, leader);
    create(&c, leader, "t1");
    let to = (leader + 1) % NODES;
    let via = (leader + 2) % NODES;
    let out = cluster_tool(&[
        "transfer-leader",
        "--server",
        &c.nodes[via].addr.to_string(),
        "--to",
        &(to + 1).to_string(),
    ]);
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["leader_id"], to as u64 + 1, "{out}");
    assert_eq!(c.leader(), to);
    let status: Value = serde_json::from_str(&cluster_tool(&[
        "status",
        "--server",
        &c.nodes[via].addr.to_string(),
    ]))
    .unwrap();
    assert_eq!(status["leader_id"], to as u64 + 1, "{status}");
    let hello = c.nodes[via].client().ok(
        "HELLO",
        json!({"protocol_version": 1, "features": ["cluster", "batch"]}),
    );
    assert_eq!(hello["features"], json!(["batch", "cluster"]));
    // A node that is not a voter, or a malformed target, is refused clearly.
    for bad in [json!({"to": 9}), json!({"to": "two"}), json!({"node": 2})] {
        let (code, message) = c.nodes[via].client().err("CLUSTER_TRANSFER_LEADER", bad);
        assert_eq!(code, "BAD_REQUEST", "{message}");
    }
    // A standalone server has no leadership to hand over.
    let dir = data_dir("cluster-transfer-standalone");
    let standalone = Server::start(dir.path(), Opts::default());
    let (code, message) = standalone
        .client()
        .err("CLUSTER_TRANSFER_LEADER", json!({}));
    assert_eq!(code, "BAD_REQUEST", "{message}");
    assert!(message.contains("not a cluster node"), "{message}");
    // A graceful stop of the leader hands it over first: once the process
    // has exited, the others already follow a new leader (without the
    // handover they would name the old one until an election timeout).
    assert_eq!(c.nodes[to].stop(), Some(0));
    let others: Vec<usize> = (0..NODES).filter(|&i| i != to).collect();
    let views: Vec<Value> = others
        .iter()
        .map(|&i| c.status(i).unwrap()["leader_id"].clone())
        .collect();
    assert!(
        views[0] == views[1] && views[0] != json!(to + 1) && !views[0].is_null(),
        "after the stop: {views:?}"
    );
    let next = c.leader_among(&others);
    let got = call_until_ok(
        &c,
        next,
        "APPLY_EVENT",
        json!({"instance_id": "t1", "event": "GO"}),
    );
    assert_eq!(got["to_state"], "b", "{got}");
}

/// Runs `rstmdb cluster ARGS`; its standard output (it must succeed).
fn cluster_tool(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rstmdb"))
        .arg("cluster")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rstmdb cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

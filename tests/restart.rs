//! Restarting on the same address, and refusing an address another server
//! holds. The kill -9 / SIGTERM / SIGINT restarts under load, with idle
//! connections open, are in `crash.rs` (every `Server::restart` there is on
//! the same address); here: the address checks, which must refuse a live
//! listener (client or metrics address) before any recovery, and must not
//! mistake the previous process's lingering connections for one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Opts, Server};
use serde_json::json;

fn metrics_opts(metrics: SocketAddr) -> Opts {
    Opts {
        extra_env: vec![
            ("RSTMDB_METRICS_ENABLED".into(), "true".into()),
            ("RSTMDB_METRICS_BIND".into(), metrics.to_string()),
            // Recovery's log lines show whether a refused start recovered.
            ("RUST_LOG".into(), "info".into()),
        ],
        ..Opts::default()
    }
}

fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap()
}

/// The status line of GET `path`.
fn http_status(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines().next().unwrap_or_default().to_owned()
}

/// Creates `n` instances and returns their ids (each acknowledged).
fn create(server: &Server, n: usize, tag: &str) -> Vec<String> {
    let mut c = server.client();
    (0..n)
        .map(|i| {
            let id = format!("{tag}-{i}");
            c.ok(
                "CREATE_INSTANCE",
                json!({"instance_id": id, "machine": "order", "version": 1, "initial_ctx": {"amount": 1}}),
            );
            id
        })
        .collect()
}

fn assert_all_there(server: &Server, ids: &[String]) {
    let mut c = server.client();
    for id in ids {
        c.ok("GET_INSTANCE", json!({"instance_id": id}));
    }
}

/// A second server on a live client address is refused with a message
/// naming that address, before it touches the data directory: started on
/// the first one's own data directory, it fails for the address, not for
/// the data directory's lock, and logs no recovery. The first keeps
/// answering.
#[test]
fn a_live_client_address_is_refused_before_recovery() {
    let dir = common::data_dir("addr-taken");
    let first = Server::start(dir.path(), metrics_opts(free_addr()));
    common::setup_orders(&first, 0);
    let ids = create(&first, 5, "a");

    let mut same_dir = Server::spawn_on(dir.path(), metrics_opts(free_addr()), first.addr);
    let (code, log) = same_dir.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    let expected = format!("cannot listen on {} (network.bind_addr)", first.addr);
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("another process is listening there"), "{log}");
    assert!(
        !log.contains("recover"),
        "a refused start ran recovery: {log}"
    );

    let other = common::data_dir("addr-taken-2");
    let mut other_dir = Server::spawn_on(other.path(), metrics_opts(free_addr()), first.addr);
    let (code, log) = other_dir.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(&expected), "{log}");
    assert!(
        !log.contains("recover"),
        "a refused start ran recovery: {log}"
    );

    first.client().ok("PING", json!({}));
    assert_all_there(&first, &ids);
}

/// The same for the metrics address: refused before recovery, naming the
/// address and the setting; the first server's RCP and metrics endpoints
/// keep answering.
#[test]
fn a_live_metrics_address_is_refused_before_recovery() {
    let dir = common::data_dir("metrics-taken");
    let maddr = free_addr();
    let first = Server::start(dir.path(), metrics_opts(maddr));
    assert!(http_status(maddr, "/health").contains("200"));

    let other = common::data_dir("metrics-taken-2");
    let mut second = Server::spawn(other.path(), metrics_opts(maddr));
    let (code, log) = second.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    let expected = format!("cannot listen on {maddr} (metrics.bind_addr)");
    assert!(log.contains(&expected), "{log}");
    assert!(
        !log.contains("recover"),
        "a refused start ran recovery: {log}"
    );

    first.client().ok("PING", json!({}));
    assert!(http_status(maddr, "/health").contains("200"));
}

/// Restarts at once on the same client and metrics addresses after kill -9,
/// SIGTERM and SIGINT with connections open (idle ones, and some that have
/// just been answered), each time with everything acknowledged there.
#[test]
fn restarts_on_the_same_addresses_with_connections_open() {
    let dir = common::data_dir("same-addr");
    let maddr = free_addr();
    let mut server = Server::start(dir.path(), metrics_opts(maddr));
    common::setup_orders(&server, 0);
    let mut acked = Vec::new();
    let stops: [(&str, Option<i32>); 4] = [
        ("kill9", None),
        ("sigterm", Some(libc::SIGTERM)),
        ("sigint", Some(libc::SIGINT)),
        ("kill9-again", None),
    ];
    for (name, signal) in stops {
        acked.extend(create(&server, 20, name));
        let mut open: Vec<_> = (0..8).map(|_| server.client()).collect();
        for c in open.iter_mut().take(4) {
            c.ok("GET_INSTANCE", json!({"instance_id": acked[0]}));
        }
        // A metrics connection left open too.
        let scrape = TcpStream::connect(maddr).unwrap();
        match signal {
            None => server.kill9(),
            Some(sig) => assert_eq!(server.signal(sig), Some(0), "{name}"),
        }
        let addr = server.addr;
        server.restart();
        assert_eq!(server.addr, addr);
        assert_all_there(&server, &acked);
        assert!(http_status(maddr, "/health").contains("200"), "{name}");
        drop((open, scrape));
    }
}

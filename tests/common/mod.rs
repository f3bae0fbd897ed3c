//! Black-box test harness: starts the real `rstmdb` binary on a real-disk
//! data directory and talks RCP to it over TCP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A fresh development PKI (a CA, a server certificate for 127.0.0.1 and
/// localhost, a client certificate) from the server's own `--gen-dev-certs`.
pub fn dev_certs(name: &str) -> tempfile::TempDir {
    let dir = data_dir(name);
    let out = Command::new(env!("CARGO_BIN_EXE_rstmdb"))
        .arg("--gen-dev-certs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    dir
}

/// A data directory on a real disk (target/tmp), never tmpfs: O_DIRECT must
/// really be exercised.
pub fn data_dir(name: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(base)
        .unwrap()
}

/// A port no other listener holds, below the kernel's ephemeral range
/// (32768 and up here): a port the kernel hands out for `bind(0)` can also
/// become the source port of any client socket, and a server given it could
/// then find it taken (the hostile-client tests open thousands of client
/// sockets). Each test process walks its own stretch of the range, so tests
/// running in parallel in one process never get the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    let start = (std::process::id() % 1_000) * 20;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Options for starting a server.
#[derive(Clone)]
pub struct Opts {
    pub shards: usize,
    pub fsync: &'static str,
    pub segment_mb: u64,
    pub extra_env: Vec<(String, String)>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            shards: 2,
            fsync: "every_write",
            segment_mb: 4,
            extra_env: Vec::new(),
        }
    }
}

/// A running server process.
pub struct Server {
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub opts: Opts,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Starts a server on `data` and waits until it accepts connections.
    pub fn start(data: &Path, opts: Opts) -> Server {
        let mut s = Server::spawn(data, opts);
        s.wait_ready();
        s
    }

    /// Starts a server without waiting (for start-up failure tests).
    pub fn spawn(data: &Path, opts: Opts) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Server::spawn_on(data, opts, addr)
    }

    /// Like `spawn`, on a given address.
    pub fn spawn_on(data: &Path, opts: Opts, addr: SocketAddr) -> Server {
        let log = data.with_extension(format!("{}.log", addr.port()));
        let logf = std::fs::File::create(&log).unwrap();
        // RSTMDB_TEST_WRAPPER runs the server under another program (for
        // example `strace -f -o FILE`: how the seccomp profile's list of
        // system calls was taken); kill -9 then reaches the wrapper.
        let mut cmd = match std::env::var("RSTMDB_TEST_WRAPPER") {
            Ok(w) if !w.trim().is_empty() => {
                let mut words = w.split_whitespace();
                let mut c = Command::new(words.next().expect("non-empty"));
                c.args(words).arg(env!("CARGO_BIN_EXE_rstmdb"));
                c
            }
            _ => Command::new(env!("CARGO_BIN_EXE_rstmdb")),
        };
        cmd.arg("--bind")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data)
            .arg("--shards")
            .arg(opts.shards.to_string())
            .arg("--fsync-policy")
            .arg(opts.fsync)
            .arg("--wal-segment-size-mb")
            .arg(opts.segment_mb.to_string())
            .env_remove("RSTMDB_CONFIG")
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or("warn".into()),
            )
            .env("RSTMDB_IO_MEMORY_KIB", "512")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in &opts.extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn rstmdb");
        Server {
            addr,
            data: data.to_path_buf(),
            opts,
            child: Some(child),
            log,
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.answers() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "server exited during start-up ({status}): {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not start: {}", self.log_text());
    }

    /// Whether the server answers: a PING round trip (over TLS, a bare
    /// connect). A connection alone proves little right after a restart on
    /// the same address: the killed server's listener outlives its process
    /// by a few milliseconds and still completes handshakes.
    fn answers(&self) -> bool {
        let Ok(stream) = TcpStream::connect(self.addr) else {
            return false;
        };
        let tls = self
            .opts
            .extra_env
            .iter()
            .any(|(k, v)| k == "RSTMDB_TLS_ENABLED" && !matches!(v.as_str(), "0" | "false"));
        if tls {
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut c = Client::from_stream(stream);
        c.try_call("PING", &json!({}))
            .is_some_and(|r| r["status"] == "ok")
    }

    /// Waits for the process to exit (start-up failure tests); returns its
    /// exit code and log.
    pub fn wait_exit(&mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status.code(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server still running after {within:?}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM)
    }

    /// Sends `sig` and waits for the process to exit; returns the exit code.
    pub fn signal(&mut self, sig: i32) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(c.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        panic!("server did not stop on signal {sig}");
    }

    /// Starts again on the same data directory, the same options and the
    /// same address, at once, as systemd's `Restart=` would: connections
    /// of the previous process may still linger there (TIME_WAIT), and the
    /// new one must start all the same.
    pub fn restart(&mut self) {
        self.kill9();
        let (data, opts, addr) = (self.data.clone(), self.opts.clone(), self.addr);
        *self = Server::spawn_on(&data, opts, addr);
        self.wait_ready();
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Encodes a request frame (CRC flag set).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(b"RCPX");
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn request_frame(id: &str, op: &str, params: &Value) -> Vec<u8> {
    frame(
        json!({"type": "request", "id": id, "op": op, "params": params})
            .to_string()
            .as_bytes(),
    )
}

/// A raw RCP client.
pub struct Client {
    pub stream: TcpStream,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, next_id: 1 }
    }

    /// A client over an already connected stream.
    pub fn from_stream(stream: TcpStream) -> Client {
        Client { stream, next_id: 1 }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one server frame; `None` on EOF / reset.
    pub fn read_frame(&mut self) -> Option<Value> {
        let mut h = [0u8; 18];
        // A reset connection (server killed) is an expected end here.
        if self.stream.read_exact(&mut h).is_err() {
            return None;
        }
        assert_eq!(&h[0..4], b"RCPX");
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1);
        assert_eq!(
            u16::from_be_bytes([h[6], h[7]]),
            1,
            "server frames carry the CRC flag"
        );
        assert_eq!(u16::from_be_bytes([h[8], h[9]]), 0);
        let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]) as usize;
        let crc = u32::from_be_bytes([h[14], h[15], h[16], h[17]]);
        let mut p = vec![0u8; len];
        self.stream.read_exact(&mut p).ok()?;
        assert_eq!(crc32c::crc32c(&p), crc, "server frame CRC");
        Some(serde_json::from_slice(&p).expect("server frame JSON"))
    }

    /// Reads one frame, `None` if nothing arrives within the stream's read
    /// timeout (the connection stays usable).
    pub fn read_frame_timeout(&mut self) -> Option<Value> {
        let mut first = [0u8; 1];
        match self.stream.peek(&mut first) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let saved = self.stream.read_timeout().unwrap();
                self.stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let f = self.read_frame();
                self.stream.set_read_timeout(saved).unwrap();
                f
            }
        }
    }

    /// Sends one request and returns the whole response.
    pub fn call(&mut self, op: &str, params: Value) -> Value {
        let id = self.next_id.to_string();
        self.next_id += 1;
        self.send(&request_frame(&id, op, &params));
        let r = self
            .read_frame()
            .unwrap_or_else(|| panic!("connection closed answering {op}"));
        assert_eq!(r["type"], "response");
        assert_eq!(r["id"], id.as_str());
        if r["status"] == "error" {
            let code = r["error"]["code"].as_str().unwrap();
            let retryable = retryable(code);
            assert_eq!(
                r["error"]["retryable"], retryable,
                "retryable flag of {code}"
            );
        }
        r
    }

    /// What GET_INSTANCE shows of `id`: the result, or the error code.
    pub fn view_instance(&mut self, id: &str) -> Value {
        let r = self.call("GET_INSTANCE", json!({ "instance_id": id }));
        if r["status"] == "ok" {
            r["result"].clone()
        } else {
            r["error"]["code"].clone()
        }
    }

    /// Like `call`, but `None` when the connection breaks (crash tests).
    pub fn try_call(&mut self, op: &str, params: &Value) -> Option<Value> {
        let id = self.next_id.to_string();
        self.next_id += 1;
        self.stream
            .write_all(&request_frame(&id, op, params))
            .ok()?;
        let r = self.read_frame()?;
        assert_eq!(r["id"], id.as_str());
        Some(r)
    }

    /// `call` that must succeed; returns `result`.
    pub fn ok(&mut self, op: &str, params: Value) -> Value {
        let r = self.call(op, params.clone());
        assert_eq!(r["status"], "ok", "{op} {params} failed: {r}");
        r["result"].clone()
    }

    /// `call` that must fail; returns (code, message).
    pub fn err(&mut self, op: &str, params: Value) -> (String, String) {
        let r = self.call(op, params.clone());
        assert_eq!(r["status"], "error", "{op} {params} should fail: {r}");
        (
            r["error"]["code"].as_str().unwrap().to_owned(),
            r["error"]["message"].as_str().unwrap().to_owned(),
        )
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// A client tool installed by `make tools`: `$env` if set, else
/// `.tools/<rel>`; fails clearly when it is missing.
pub fn tool(env: &str, rel: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".tools")
            .join(rel)
    });
    assert!(
        p.exists(),
        "{what} not found at {} (run `make tools`)",
        p.display()
    );
    p
}

/// The real `rstmdb-cli` 0.3.0 (`make tools`, or `RSTMDB_CLI`).
pub fn cli_path() -> PathBuf {
    tool("RSTMDB_CLI", "bin/rstmdb-cli", "rstmdb-cli 0.3.0")
}

/// What a run of `rstmdb-cli` produced.
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The fixed `retryable` flag of an error code (PROTOCOL.md §8).
pub fn retryable(code: &str) -> bool {
    matches!(
        code,
        "WAL_IO_ERROR" | "INTERNAL_ERROR" | "RATE_LIMITED" | "REPLICATION_TIMEOUT"
    )
}

/// A machine used by many tests.
/// Registers `order` v1 and creates `i0`..`i{n-1}` with `amount` = i.
pub fn setup_orders(server: &Server, n: usize) {
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": order_machine()}),
    );
    for i in 0..n {
        c.ok(
            "CREATE_INSTANCE",
            json!({"instance_id": format!("i{i}"), "machine": "order", "version": 1,
                   "initial_ctx": {"amount": i}}),
        );
    }
}

pub fn order_machine() -> Value {
    json!({
        "states": ["created", "paid", "shipped", "cancelled"],
        "initial": "created",
        "transitions": [
            {"from": "created", "event": "PAY", "to": "paid", "guard": "ctx.amount > 0 && !ctx.blocked"},
            {"from": "paid", "event": "SHIP", "to": "shipped"},
            {"from": ["created", "paid"], "event": "CANCEL", "to": "cancelled"},
            {"from": "shipped", "event": "TICK", "to": "shipped"},
            {"from": "paid", "event": "TICK", "to": "paid"},
            {"from": "created", "event": "TICK", "to": "created"}
        ]
    })
}

//! `rstmdb cluster status|transfer-leader --server ADDR`: one RCP
//! conversation with a running node (HELLO, AUTH when a token is given,
//! the request), its answer printed as JSON. Exit status: 0 answered, 1 the
//! node answered an error, 2 the node could not be reached or spoke
//! nonsense.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{ClusterCommand, ServerArgs};
use crate::protocol::frame;

/// How long the tool waits for the node (a transfer takes up to two
/// election timeouts).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Runs the command; prints the answer on stdout, a failure on stderr.
pub fn run(cmd: &ClusterCommand) -> ExitCode {
    let (server, op, params) = match cmd {
        ClusterCommand::Status { server } => (server, "REPLICATION_STATUS", json!({})),
        ClusterCommand::TransferLeader { server, to } => {
            (server, "CLUSTER_TRANSFER_LEADER", json!({ "to": to }))
        }
    };
    match ask(server, op, params) {
        Ok(Ok(result)) => {
            println!("{}", serde_json::to_string_pretty(&result).expect("JSON"));
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("rstmdb: {op} failed: {error}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("rstmdb: {}: {e}", server.server);
            ExitCode::from(2)
        }
    }
}

/// The node's answer to `op`: its result, or the error it answered.
fn ask(server: &ServerArgs, op: &str, params: Value) -> std::io::Result<Result<Value, Value>> {
    let mut conn = Conn::open(&server.server)?;
    let hello = json!({"protocol_version": 1, "client_name": "rstmdb-cluster-tool"});
    if let Err(e) = conn.call("HELLO", hello)? {
        return Ok(Err(e));
    }
    if let Some(token) = &server.token {
        if let Err(e) = conn.call("AUTH", json!({"method": "bearer", "token": token}))? {
            return Ok(Err(e));
        }
    }
    conn.call(op, params)
}

/// A blocking RCP connection in binary framing.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl Conn {
    fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            next_id: 1,
        })
    }

    /// Sends one request and reads its answer.
    fn call(&mut self, op: &str, params: Value) -> std::io::Result<Result<Value, Value>> {
        let id = self.next_id.to_string();
        self.next_id += 1;
        let request = json!({"type": "request", "id": id, "op": op, "params": params});
        let mut out = Vec::new();
        frame::encode(&serde_json::to_vec(&request).expect("JSON"), &mut out);
        self.stream.write_all(&out)?;
        let answer = self.read_frame()?;
        if answer["status"] == "ok" {
            Ok(Ok(answer["result"].clone()))
        } else {
            Ok(Err(answer["error"].clone()))
        }
    }

    /// The next frame's JSON payload.
    fn read_frame(&mut self) -> std::io::Result<Value> {
        loop {
            let decoded = frame::decode(&self.buf).map_err(std::io::Error::other)?;
            if let Some((payload, len)) = decoded {
                let value = serde_json::from_slice(&self.buf[payload]);
                self.buf.drain(..len);
                return value.map_err(std::io::Error::other);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the node closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

//! A minimal blocking RCP client for load generation: binary frames with
//! CRC32C (PROTOCOL.md §2), requests pipelined on one connection.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

/// Largest frame payload we accept back (the protocol's 16 MiB).
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Appends one request frame for `op` with `params` and request id `id`.
pub fn encode_request(out: &mut Vec<u8>, id: u64, op: &str, params: &Value) {
    let payload =
        json!({"type": "request", "id": id.to_string(), "op": op, "params": params}).to_string();
    let p = payload.as_bytes();
    out.extend_from_slice(b"RCPX");
    out.extend_from_slice(&1u16.to_be_bytes()); // version
    out.extend_from_slice(&1u16.to_be_bytes()); // flags: CRC present
    out.extend_from_slice(&0u16.to_be_bytes()); // header extension
    out.extend_from_slice(&(p.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(p).to_be_bytes());
    out.extend_from_slice(p);
}

/// One connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    next_id: u64,
    buf: Vec<u8>,
}

/// A transport failure (the connection is unusable afterwards).
#[derive(Debug)]
pub struct TransportError(pub String);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Conn {
    /// Connects with TCP_NODELAY.
    pub fn connect(addr: SocketAddr) -> Result<Conn, TransportError> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| TransportError(format!("connect {addr}: {e}")))?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let r = s.try_clone().map_err(|e| TransportError(e.to_string()))?;
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 16, r),
            writer: BufWriter::with_capacity(1 << 16, s),
            next_id: 1,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Queues a request (sent on [`Conn::flush`]); returns its id.
    pub fn queue(&mut self, op: &str, params: &Value) -> Result<u64, TransportError> {
        let id = self.next_id;
        self.next_id += 1;
        self.buf.clear();
        encode_request(&mut self.buf, id, op, params);
        self.writer
            .write_all(&self.buf)
            .map_err(|e| TransportError(format!("write: {e}")))?;
        Ok(id)
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.writer
            .flush()
            .map_err(|e| TransportError(format!("write: {e}")))
    }

    /// Reads the next message's payload into `p` (checks its CRC).
    pub fn read_raw(&mut self, p: &mut Vec<u8>) -> Result<(), TransportError> {
        let mut h = [0u8; 18];
        self.reader
            .read_exact(&mut h)
            .map_err(|e| TransportError(format!("read: {e}")))?;
        if &h[0..4] != b"RCPX" {
            return Err(TransportError("bad frame magic".into()));
        }
        let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(TransportError(format!("frame of {len} bytes")));
        }
        let crc = u32::from_be_bytes([h[14], h[15], h[16], h[17]]);
        p.resize(len, 0);
        self.reader
            .read_exact(p)
            .map_err(|e| TransportError(format!("read: {e}")))?;
        if u16::from_be_bytes([h[6], h[7]]) & 1 == 1 && crc32c::crc32c(p) != crc {
            return Err(TransportError("response CRC mismatch".into()));
        }
        Ok(())
    }

    /// Reads the next response (checks its CRC).
    pub fn read(&mut self) -> Result<Value, TransportError> {
        let mut p = Vec::new();
        self.read_raw(&mut p)?;
        serde_json::from_slice(&p).map_err(|e| TransportError(format!("response JSON: {e}")))
    }

    /// One request, waiting for its answer.
    pub fn call(&mut self, op: &str, params: &Value) -> Result<Value, TransportError> {
        self.queue(op, params)?;
        self.flush()?;
        self.read()
    }
}

/// The `result` of an ok response, or the error as text.
pub fn result(r: &Value) -> Result<&Value, String> {
    if r["status"] == "ok" {
        Ok(&r["result"])
    } else {
        Err(format!(
            "{}: {}",
            r["error"]["code"].as_str().unwrap_or("?"),
            r["error"]["message"].as_str().unwrap_or("?")
        ))
    }
}

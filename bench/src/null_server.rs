//! The null server: answers every RCP frame at once with an empty `ok`
//! result, doing no work. It shows what the machine's loopback, the
//! framing and the load generator cost by themselves: no server can beat
//! it, so "ours / null" says how close to that ceiling we are.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};

use serde::Deserialize;

/// Largest request accepted (the protocol's frame limit).
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Bytes of an RCP frame header.
pub const HEADER: usize = 18;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// Serves until the process is killed; one thread per connection.
pub fn serve(bind: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(bind)?;
    eprintln!("null server listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = connection(stream);
        });
    }
    Ok(())
}

fn connection(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(1 << 16, stream.try_clone()?);
    let mut w = BufWriter::with_capacity(1 << 16, stream);
    let mut payload = Vec::new();
    let mut out = Vec::with_capacity(256);
    loop {
        let mut h = [0u8; 18];
        r.read_exact(&mut h)?;
        if &h[0..4] != b"RCPX" {
            return Ok(());
        }
        let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]) as usize;
        if len > MAX_PAYLOAD {
            return Ok(());
        }
        payload.resize(len, 0);
        r.read_exact(&mut payload)?;
        out.clear();
        answer(&payload, &mut out);
        w.write_all(&out)?;
        // Answer everything already read before waiting for more.
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}

/// Length of the whole frame at the start of `buf` (header included), or
/// `None` while it is incomplete; an error for a bad magic or a frame over
/// the limit, which ends the connection.
pub fn frame_len(buf: &[u8]) -> std::io::Result<Option<usize>> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if &buf[0..4] != b"RCPX" {
        return Err(std::io::Error::other("bad magic"));
    }
    let len = u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::other("frame too large"));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// Appends the whole answer frame (an empty `ok` for the request's id) to
/// `out`.
pub fn answer(payload: &[u8], out: &mut Vec<u8>) {
    let id = serde_json::from_slice::<Envelope<'_>>(payload)
        .ok()
        .and_then(|e| e.id.map(|i| i.get().to_owned()))
        .unwrap_or_else(|| "null".into());
    let mut body = Vec::with_capacity(64 + id.len());
    body.extend_from_slice(br#"{"type":"response","id":"#);
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(br#","status":"ok","result":{}}"#);
    out.extend_from_slice(b"RCPX");
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
}

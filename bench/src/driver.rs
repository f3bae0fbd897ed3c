//! The load generator's connections: each keeps `pipeline` requests in
//! flight (a closed loop), records every answer's latency and checks its
//! frame. Two ways to drive them, so that a result is not an artefact of
//! one client's design:
//!
//! * `threads` (default): one thread per connection, blocking reads;
//! * `evented`: one thread drives every connection with non-blocking
//!   sockets and `poll(2)`, a far lighter client when connections are many.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::workload::{request, Settings, Totals, Workload};

/// How the connections are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientMode {
    /// One thread per connection.
    Threads,
    /// One thread for all connections (non-blocking sockets, poll).
    Evented,
}

/// Bytes read per `read` call.
const READ_CHUNK: usize = 256 * 1024;
/// Frame header length.
const HEADER: usize = 18;

/// One request in flight.
struct Sent {
    at: Instant,
    /// Instance an APPLY went to (for the consistency check).
    applied_to: Option<u32>,
}

/// The parts of an answer the bench looks at, borrowed from the frame.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<AnswerError<'a>>,
}

#[derive(Deserialize)]
struct AnswerError<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
}

/// What one connection counted.
pub struct ConnReport {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub transport: u64,
}

/// What every connection of a run shares.
#[derive(Clone)]
pub struct Shared {
    pub settings: Settings,
    pub prefix: String,
    pub filler: String,
    pub totals: Arc<Totals>,
    pub stop: Arc<AtomicBool>,
    pub budget: Arc<AtomicU64>,
}

/// One connection's closed loop: its requests in flight and buffers.
struct Conn {
    shared: Shared,
    index: usize,
    stream: TcpStream,
    rng: u64,
    k: u64,
    in_flight: VecDeque<Sent>,
    /// Encoded requests not yet written (from `written` on).
    out: Vec<u8>,
    written: usize,
    params: Vec<u8>,
    rbuf: Vec<u8>,
    filled: usize,
    pos: usize,
    /// Free slots to send requests into.
    to_send: usize,
    sending: bool,
    report: ConnReport,
    done: bool,
}

impl Conn {
    fn new(shared: Shared, index: usize, stream: TcpStream) -> Conn {
        let pipeline = shared.settings.pipeline.max(1);
        Conn {
            rng: 0x9E37_79B9_7F4A_7C15u64 ^ (index as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407),
            shared,
            index,
            stream,
            k: 0,
            in_flight: VecDeque::with_capacity(pipeline),
            out: Vec::with_capacity(64 * 1024),
            written: 0,
            params: Vec::with_capacity(1024),
            rbuf: vec![0; READ_CHUNK],
            filled: 0,
            pos: 0,
            to_send: pipeline,
            sending: true,
            report: ConnReport {
                hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                ok: 0,
                errors: BTreeMap::new(),
                transport: 0,
            },
            done: false,
        }
    }

    /// Encodes one request per free slot into `out`.
    fn fill(&mut self) {
        let sh = &self.shared;
        while self.sending && self.to_send > 0 {
            let budget = sh
                .budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1));
            if sh.stop.load(Ordering::Relaxed) || budget.is_err() {
                self.sending = false;
                break;
            }
            self.params.clear();
            let (op, applied_to) = request(
                &mut self.params,
                &sh.settings,
                &sh.prefix,
                &sh.filler,
                self.index,
                self.k,
                &mut self.rng,
            );
            self.k += 1;
            encode_raw(&mut self.out, self.k, op, &self.params);
            self.in_flight.push_back(Sent {
                at: Instant::now(),
                applied_to,
            });
            self.to_send -= 1;
        }
    }

    /// Room to read into: moves a partial frame to the front, or grows for
    /// a frame larger than the buffer.
    fn make_room(&mut self) {
        if self.pos > 0 && self.pos == self.filled {
            (self.pos, self.filled) = (0, 0);
        }
        if self.filled == self.rbuf.len() {
            if self.pos > 0 {
                self.rbuf.copy_within(self.pos..self.filled, 0);
                (self.filled, self.pos) = (self.filled - self.pos, 0);
            } else {
                self.rbuf.resize(self.rbuf.len() * 2, 0);
            }
        }
    }

    /// Accounts every complete answer buffered; frees their slots. Err when
    /// the stream is no longer usable (bad frame or an answer nobody asked
    /// for).
    fn take_answers(&mut self) -> Result<usize, ()> {
        let mut answered = 0;
        while self.filled - self.pos >= HEADER {
            let h = &self.rbuf[self.pos..self.pos + HEADER];
            let len = u32::from_be_bytes([h[10], h[11], h[12], h[13]]) as usize;
            if &h[0..4] != b"RCPX" || len > 16 * 1024 * 1024 {
                return Err(());
            }
            if self.filled - self.pos < HEADER + len {
                break;
            }
            let crc = u32::from_be_bytes([h[14], h[15], h[16], h[17]]);
            let start = self.pos + HEADER;
            if crc32c::crc32c(&self.rbuf[start..start + len]) != crc {
                return Err(());
            }
            let Some(sent) = self.in_flight.pop_front() else {
                self.report.transport += 1;
                self.done = true;
                return Ok(answered);
            };
            account(
                &self.shared,
                sent,
                &self.rbuf[start..start + len],
                &mut self.report,
            );
            self.pos += HEADER + len;
            answered += 1;
        }
        self.to_send += answered;
        Ok(answered)
    }

    /// The connection failed: every request in flight is unknown.
    fn lost(&mut self) {
        self.done = true;
        if self.in_flight.is_empty() && self.shared.stop.load(Ordering::Relaxed) {
            return;
        }
        self.report.transport += 1;
        let mut uncertain = self.shared.totals.uncertain.lock().unwrap();
        for s in self.in_flight.drain(..) {
            if let Some(i) = s.applied_to {
                uncertain.push(i);
            }
        }
    }

    /// Whether everything sent is answered and nothing more will be.
    fn finished(&self) -> bool {
        self.done || (!self.sending && self.in_flight.is_empty() && self.written == self.out.len())
    }
}

/// Accounts one answer.
fn account(sh: &Shared, sent: Sent, payload: &[u8], report: &mut ConnReport) {
    let us = sent.at.elapsed().as_micros() as u64;
    let t = &sh.totals;
    let measuring = t.measuring.load(Ordering::Relaxed);
    match serde_json::from_slice::<Answer<'_>>(payload) {
        Ok(a) if a.status == "ok" => {
            if let Some(i) = sent.applied_to {
                t.applied[i as usize].fetch_add(1, Ordering::Relaxed);
                if sh.settings.workload == Workload::Watch {
                    #[derive(Deserialize)]
                    struct Offset {
                        wal_offset: u64,
                    }
                    if let Some(o) = a
                        .result
                        .and_then(|r| serde_json::from_str::<Offset>(r.get()).ok())
                    {
                        t.acked_at
                            .lock()
                            .unwrap()
                            .insert(o.wal_offset, Instant::now());
                    }
                }
            }
            if measuring {
                report.ok += 1;
                let _ = report.hist.record(us.max(1));
            }
        }
        Ok(a) => {
            if measuring {
                let code = a.error.map_or(Cow::Borrowed("?"), |e| e.code);
                *report.errors.entry(code.into_owned()).or_default() += 1;
            }
        }
        Err(_) => {
            if measuring {
                *report.errors.entry("unparsable answer".into()).or_default() += 1;
            }
        }
    }
}

/// Starts driving `streams` in `mode`; the handles give each thread's
/// connection reports.
pub fn start(
    mode: ClientMode,
    shared: &Shared,
    streams: Vec<TcpStream>,
) -> Vec<std::thread::JoinHandle<Vec<ConnReport>>> {
    let conns: Vec<Conn> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| Conn::new(shared.clone(), i, s))
        .collect();
    match mode {
        ClientMode::Threads => conns
            .into_iter()
            .map(|c| std::thread::spawn(move || vec![blocking(c)]))
            .collect(),
        ClientMode::Evented => vec![std::thread::spawn(move || evented(conns))],
    }
}

/// One connection on its own thread: send, then block until at least one
/// answer is complete.
fn blocking(mut c: Conn) -> ConnReport {
    loop {
        c.fill();
        if !c.out.is_empty() {
            if c.stream.write_all(&c.out).is_err() {
                c.lost();
                return c.report;
            }
            c.out.clear();
        }
        if c.in_flight.is_empty() || c.done {
            return c.report;
        }
        loop {
            c.make_room();
            let filled = c.filled;
            match c.stream.read(&mut c.rbuf[filled..]) {
                Ok(0) | Err(_) => {
                    c.lost();
                    return c.report;
                }
                Ok(n) => c.filled += n,
            }
            match c.take_answers() {
                Err(()) => {
                    c.lost();
                    return c.report;
                }
                Ok(0) if !c.done => continue,
                Ok(_) => break,
            }
        }
    }
}

/// Every connection on this thread, non-blocking, woken by `poll(2)`.
fn evented(mut conns: Vec<Conn>) -> Vec<ConnReport> {
    for c in &conns {
        c.stream.set_nonblocking(true).expect("non-blocking socket");
    }
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    loop {
        for c in conns.iter_mut().filter(|c| !c.done) {
            c.fill();
            flush(c);
        }
        if conns.iter().all(Conn::finished) {
            break;
        }
        fds.clear();
        fds.extend(conns.iter().map(|c| libc::pollfd {
            fd: if c.finished() {
                -1
            } else {
                c.stream.as_raw_fd()
            },
            events: libc::POLLIN
                | if c.written < c.out.len() {
                    libc::POLLOUT
                } else {
                    0
                },
            revents: 0,
        }));
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if ready < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            for c in conns.iter_mut().filter(|c| !c.finished()) {
                c.lost();
            }
            break;
        }
        for (c, fd) in conns.iter_mut().zip(&fds) {
            if fd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                read_ready(c);
            }
        }
    }
    conns.into_iter().map(|c| c.report).collect()
}

/// Writes what it can of the connection's pending requests.
fn flush(c: &mut Conn) {
    while c.written < c.out.len() {
        match c.stream.write(&c.out[c.written..]) {
            Ok(0) => return c.lost(),
            Ok(n) => c.written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return c.lost(),
        }
    }
    c.out.clear();
    c.written = 0;
}

/// Reads what has arrived and accounts the complete answers.
fn read_ready(c: &mut Conn) {
    loop {
        c.make_room();
        let filled = c.filled;
        match c.stream.read(&mut c.rbuf[filled..]) {
            Ok(0) => return c.lost(),
            Ok(n) => c.filled += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return c.lost(),
        }
        if c.take_answers().is_err() {
            return c.lost();
        }
        if c.filled < c.rbuf.len() {
            return;
        }
    }
}

/// Appends one request frame whose params are JSON text.
pub fn encode_raw(out: &mut Vec<u8>, id: u64, op: &str, params: &[u8]) {
    use std::io::Write as _;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    let _ = write!(
        out,
        r#"{{"type":"request","id":"{id}","op":"{op}","params":"#
    );
    out.extend_from_slice(params);
    out.push(b'}');
    let len = out.len() - start - HEADER;
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    let h = &mut out[start..start + HEADER];
    h[0..4].copy_from_slice(b"RCPX");
    h[4..6].copy_from_slice(&1u16.to_be_bytes());
    h[6..8].copy_from_slice(&1u16.to_be_bytes()); // CRC present
    h[8..10].copy_from_slice(&0u16.to_be_bytes());
    h[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    h[14..18].copy_from_slice(&crc.to_be_bytes());
}

//! Forwarding a follower's requests to its group's leader (cluster mode),
//! so that every client and SDK works against any node unchanged.
//!
//! A connection on a node that does not lead, but knows who does, sends
//! each request that needs the leader — writes and linearizable reads —
//! to the leader through a *tunnel*: a connection to the leader's peer
//! port, authenticated with the replication token, that the leader serves
//! as one of its client connections. Requests go as they came (RCP
//! frames), pipelined; the answers come back in order and are written to
//! the client in its own wire mode. The client's successful AUTH is
//! replayed on a new tunnel first. Node-local operations — HELLO, AUTH,
//! PING, BYE, INFO, REPLICATION_STATUS, watches, WAL_READ, WAL_STATS,
//! COMPACT — stay on the node the client is connected to.
//!
//! A tunnel follows the leader: when the node's view of the leader
//! changes, the next forwarded cycle opens a new one. If a tunnel fails
//! mid-cycle, the requests it did not answer get a retryable error saying
//! their outcome is unknown.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::net::peer_stream::PeerStream;
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::net::peer::{self, PeerAuth};
use crate::protocol::frame;
use crate::service::replication_status::ClusterView;

/// Operations a node answers itself, leader or not.
pub const LOCAL_OPS: &[&str] = &[
    "HELLO",
    "AUTH",
    "PING",
    "BYE",
    "INFO",
    "REPLICATION_STATUS",
    "WATCH_INSTANCE",
    "WATCH_ALL",
    "UNWATCH",
    "WAL_READ",
    "WAL_STATS",
    "COMPACT",
];

/// Reads `cluster.follower_reads: stale` answers locally.
pub const READ_OPS: &[&str] = &[
    "GET_INSTANCE",
    "LIST_INSTANCES",
    "GET_MACHINE",
    "LIST_MACHINES",
];

/// How long a forwarded cycle may wait for the leader's answers (a commit
/// times out well before this).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why forwarded requests got no answer from the leader.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("replication: no leader is known now; retry")]
    NoLeader,
    /// Nothing was sent.
    #[error("replication: cannot reach the leader (node {0}): {1}; nothing was sent; retry")]
    Unreachable(u64, #[source] io::Error),
    /// Sent, but the answer was lost.
    #[error(
        "replication: the connection to the leader failed ({0}); the outcome is unknown: retry \
         with the same idempotency key"
    )]
    Broken(#[source] io::Error),
}

/// What a connection needs to forward.
#[derive(Clone)]
pub struct Forwarder {
    pub view: ClusterView,
    pub auth: PeerAuth,
    /// `cluster.follower_reads: stale`: reads are answered by the node
    /// the client is connected to, from its applied state.
    pub stale_reads: bool,
}

impl Forwarder {
    /// The leader to forward to: `None` when this node leads or knows no
    /// leader (then it answers itself: a clear retryable error for what
    /// needs a leader).
    pub fn leader(&self) -> Option<u64> {
        self.leader_id()
    }

    /// Whether `op` goes to the leader from this node now.
    pub fn forwards(&self, op: &str) -> bool {
        if LOCAL_OPS.contains(&op) || (self.stale_reads && READ_OPS.contains(&op)) {
            return false;
        }
        self.leader_id().is_some()
    }

    fn leader_id(&self) -> Option<u64> {
        let leader = self.view.status.leader.load(Ordering::Relaxed);
        (leader != 0 && leader != self.view.node_id).then_some(leader)
    }

    fn address(&self, id: u64) -> Option<&str> {
        self.view
            .peers
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, a)| a.as_str())
    }
}

/// One connection's tunnel to the leader.
pub struct Upstream {
    pub leader: u64,
    stream: PeerStream,
    rbuf: Vec<u8>,
}

impl Upstream {
    /// Opens a tunnel to `leader` and replays the client's AUTH request
    /// (its payload) if it made one.
    pub async fn open(fwd: &Forwarder, leader: u64, auth: Option<&[u8]>) -> io::Result<Upstream> {
        let addr = fwd
            .address(leader)
            .ok_or_else(|| io::Error::other(format!("no address for node {leader}")))?;
        let stream = peer::connect(addr, peer::TUNNEL_MAGIC, &fwd.auth)
            .await
            .map_err(io::Error::other)?;
        let mut up = Upstream {
            leader,
            stream,
            rbuf: Vec::new(),
        };
        if let Some(a) = auth {
            let answer = up.exchange(&[a.to_vec()]).await?;
            let ok = answer
                .first()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .is_some_and(|v| v["status"] == "ok");
            if !ok {
                return Err(io::Error::other("the leader refused the client's AUTH"));
            }
        }
        Ok(up)
    }

    /// Sends the request payloads as frames, pipelined, and returns the
    /// answers' payloads in order.
    pub async fn exchange(&mut self, payloads: &[Vec<u8>]) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for p in payloads {
            frame::encode(p, &mut out);
        }
        self.stream.write_all(&out).await?;
        let mut answers = Vec::with_capacity(payloads.len());
        let read = async {
            while answers.len() < payloads.len() {
                answers.push(self.next_answer().await?);
            }
            Ok::<_, io::Error>(())
        };
        futures_lite::future::or(read, async {
            glommio::timer::sleep(ANSWER_TIMEOUT).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the leader did not answer",
            ))
        })
        .await?;
        Ok(answers)
    }

    /// The next answer frame's payload.
    async fn next_answer(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match frame::decode(&self.rbuf) {
                Ok(Some((range, total))) => {
                    let payload = self.rbuf[range].to_vec();
                    self.rbuf.drain(..total);
                    return Ok(payload);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the leader closed the tunnel",
                ));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

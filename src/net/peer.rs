//! The peer transport of a cluster node: Raft messages between nodes over
//! glommio TCP, one connection per direction and node pair.
//!
//! **Outbound.** One task per peer connects (retrying with back-off),
//! introduces itself — magic, its node id, the replication token — and
//! then writes every frame the shard queues for that peer, coalescing what
//! is waiting into one write. While a peer is unreachable its queue is
//! emptied: raft retransmits whatever matters, so a stale message is worth
//! less than a short queue.
//!
//! **Inbound.** The listener accepts a peer, checks its token against
//! `replication.auth_token_hashes` (and the secrets file, and the hash of
//! `replication.auth_token`), answers one byte (accepted or not), then
//! decodes frames with our own bounded codec and hands each message to the
//! shard — only messages from the node that introduced itself.
//!
//! Frames are `[len u32 LE][replication::wire frame]`, at most
//! [`MAX_FRAME`] bytes.

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use rstmdb_shards::replication::wire;
use rstmdb_shards::shard::{ShardMsg, MAX_SNAPSHOT_BYTES};

use crate::net::peer_stream::PeerStream;
use crate::security::auth::Authenticator;
use crate::security::tls::PeerTls;

/// A connection carrying Raft messages.
pub const RAFT_MAGIC: &[u8; 8] = b"RSTPEER1";
/// A connection carrying a follower's forwarded client requests
/// (`net::forward`), served by the leader as a client connection.
pub const TUNNEL_MAGIC: &[u8; 8] = b"RSTTUNL1";
/// Largest frame accepted: a snapshot for a follower travels in one (an
/// append of `max_message_bytes` entries fits many times over). Frames come
/// only from authenticated peers, and a frame's buffer grows with the bytes
/// that actually arrive, never from the length prefix alone.
pub const MAX_FRAME: usize = MAX_SNAPSHOT_BYTES as usize + (1 << 20);
/// A frame buffer grown past this is given back after its frame.
const KEEP_FRAME_BUFFER: usize = 4 << 20;
/// Longest token accepted in a handshake.
const MAX_TOKEN: usize = 4096;
/// Bytes gathered into one write at most.
const WRITE_BATCH: usize = 1 << 20;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Inbound connections still in their handshake (not yet authenticated)
/// at once; more are closed at once, so a flood of strangers on the peer
/// port costs bounded memory and tasks.
const MAX_HANDSHAKING: usize = 64;
/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this node is to its peers, and whom it accepts.
#[derive(Clone)]
pub struct PeerAuth {
    pub node_id: u64,
    /// This node's client address, announced to peers (REPLICATION_STATUS
    /// names the leader's as `upstream`).
    pub client_addr: String,
    /// Client addresses peers announced, by node id.
    pub client_addrs: Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>,
    /// The token this node presents (`replication.auth_token`).
    pub token: Option<String>,
    /// Tokens accepted from peers; with none configured, any peer is.
    pub accept: Arc<Authenticator>,
    /// TLS on peer connections (`replication.tls_enabled`).
    pub tls: Option<PeerTls>,
}

/// Sends the frames queued for peer `id` at `addr` until the queue closes
/// (the shard stopped).
pub async fn send_to(id: u64, addr: String, auth: PeerAuth, frames: flume::Receiver<Vec<u8>>) {
    let mut backoff = FIRST_BACKOFF;
    let mut refused_logged = false;
    while !frames.is_disconnected() {
        match connect(&addr, RAFT_MAGIC, &auth).await {
            Ok(mut stream) => {
                backoff = FIRST_BACKOFF;
                refused_logged = false;
                tracing::info!(peer = id, %addr, "connected to peer");
                if pump(&mut stream, &frames).await.is_err() {
                    tracing::info!(peer = id, %addr, "lost the connection to peer");
                }
            }
            Err(e) => {
                if !refused_logged || e.contains("refused our token") {
                    tracing::debug!(peer = id, %addr, error = %e, "cannot reach peer");
                }
                if e.contains("refused our token") && !refused_logged {
                    tracing::error!(peer = id, %addr, "peer refused this node's replication token");
                }
                refused_logged = true;
            }
        }
        // Whatever queued meanwhile is stale; raft sends again.
        while frames.try_recv().is_ok() {}
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A connection of kind `magic` to the peer at `addr` (`HOST:PORT`):
/// TCP, TLS when configured (the host is the name verified), then this
/// node's introduction, accepted.
pub async fn connect(addr: &str, magic: &[u8; 8], auth: &PeerAuth) -> Result<PeerStream, String> {
    let resolved: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving: {e}"))?
        .next()
        .ok_or("resolves to nothing")?;
    let tcp = TcpStream::connect(resolved)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match &auth.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host} is not a name to verify: {e}"))?;
            let handshake = tls.connector.connect(name, tcp);
            let tls = with_timeout(handshake, "TLS handshake").await?;
            PeerStream::Connected(Box::new(tls))
        }
    };
    introduce(&mut stream, magic, auth).await?;
    Ok(stream)
}

/// `fut`, or an error once [`HANDSHAKE_TIMEOUT`] passes.
async fn with_timeout<T>(
    fut: impl std::future::Future<Output = std::io::Result<T>>,
    what: &str,
) -> Result<T, String> {
    futures_lite::future::or(
        async { fut.await.map_err(|e| format!("{what}: {e}")) },
        async {
            glommio::timer::sleep(HANDSHAKE_TIMEOUT).await;
            Err(format!("{what} timed out"))
        },
    )
    .await
}

/// Introduces this node on a new connection of kind `magic` and waits
/// for the peer to accept its token.
async fn introduce(
    stream: &mut PeerStream,
    magic: &[u8; 8],
    auth: &PeerAuth,
) -> Result<(), String> {
    let token = auth.token.as_deref().unwrap_or("");
    let mut hello = magic.to_vec();
    hello.extend_from_slice(&auth.node_id.to_le_bytes());
    hello.extend_from_slice(&(token.len() as u32).to_le_bytes());
    hello.extend_from_slice(token.as_bytes());
    let client = auth.client_addr.as_bytes();
    hello.push(client.len().min(255) as u8);
    hello.extend_from_slice(&client[..client.len().min(255)]);
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer[0] != 1 {
        return Err("peer refused our token".into());
    }
    Ok(())
}

/// Writes queued frames until the queue closes or the connection fails.
async fn pump(stream: &mut PeerStream, frames: &flume::Receiver<Vec<u8>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Ok(first) = frames.recv_async().await {
        buf.clear();
        put_frame(&mut buf, &first);
        while buf.len() < WRITE_BATCH {
            match frames.try_recv() {
                Ok(f) => put_frame(&mut buf, &f),
                Err(_) => break,
            }
        }
        stream.write_all(&buf).await?;
    }
    Ok(())
}

fn put_frame(buf: &mut Vec<u8>, frame: &[u8]) {
    buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    buf.extend_from_slice(frame);
}

/// Accepts peers until the executor stops; their messages go to `shard`
/// while it runs.
pub async fn accept_peers(
    listener: TcpListener,
    auth: PeerAuth,
    shard: flume::WeakSender<ShardMsg>,
    tunnels: flume::Sender<PeerStream>,
) {
    let auth = Rc::new(auth);
    let handshaking = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer failed");
                glommio::timer::sleep(FIRST_BACKOFF).await;
                continue;
            }
        };
        if handshaking.get() >= MAX_HANDSHAKING {
            tracing::debug!("too many peer handshakes in progress; closing a connection");
            continue;
        }
        handshaking.set(handshaking.get() + 1);
        let (auth, shard, tunnels) = (auth.clone(), shard.clone(), tunnels.clone());
        let handshaking = handshaking.clone();
        glommio::spawn_local(async move {
            let from = stream.peer_addr().ok();
            let introduced = introduced(stream, &auth).await;
            handshaking.set(handshaking.get() - 1);
            let served = match introduced {
                Ok(peer) => serve_peer(peer, shard, tunnels).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                tracing::info!(?from, error = %e, "peer connection closed");
            }
        })
        .detach();
    }
}

/// An inbound peer that introduced itself: its node id, whether the
/// connection is a tunnel, and the stream.
struct Introduced {
    node: u64,
    tunnel: bool,
    stream: PeerStream,
}

/// TLS if configured, then the peer's introduction, within the handshake
/// timeout.
async fn introduced(tcp: TcpStream, auth: &PeerAuth) -> Result<Introduced, String> {
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut stream = match &auth.tls {
        None => PeerStream::Plain(tcp),
        Some(tls) => {
            let tls = with_timeout(tls.acceptor.accept(tcp), "TLS handshake").await?;
            PeerStream::Accepted(Box::new(tls))
        }
    };
    let (node, tunnel) = handshake(&mut stream, auth).await?;
    stream
        .tcp()
        .set_read_timeout(None)
        .map_err(|e| e.to_string())?;
    Ok(Introduced {
        node,
        tunnel,
        stream,
    })
}

/// One introduced peer: Raft frames to the shard — or, for a tunnel, the
/// stream goes to the frontend to be served as a client connection.
async fn serve_peer(
    peer: Introduced,
    shard: flume::WeakSender<ShardMsg>,
    tunnels: flume::Sender<PeerStream>,
) -> Result<(), String> {
    let Introduced {
        node,
        tunnel,
        mut stream,
    } = peer;
    if tunnel {
        return tunnels
            .send_async(stream)
            .await
            .map_err(|_| format!("node {node}: the frontend is stopping"));
    }
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    loop {
        if stream.read_exact(&mut len).await.is_err() {
            return Ok(()); // closed
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(format!(
                "node {node} sent a frame of {n} bytes (limit {MAX_FRAME})"
            ));
        }
        read_frame(&mut stream, n, &mut body).await?;
        let (group, msg) = wire::decode(&body).map_err(|e| format!("node {node}: {e}"))?;
        if body.capacity() > KEEP_FRAME_BUFFER {
            body = Vec::new();
        }
        if group != 0 || msg.from != node {
            // A node speaks only for itself, and every node runs one group.
            tracing::warn!(
                node,
                group,
                from = msg.from,
                "dropping a peer message not from its sender's group"
            );
            continue;
        }
        let Some(tx) = shard.upgrade() else {
            return Ok(()); // the shard stopped
        };
        if tx.send_async(ShardMsg::Peer(msg)).await.is_err() {
            return Ok(());
        }
    }
}

/// Reads a frame of `n` bytes into `body`, growing it as the bytes arrive.
async fn read_frame(stream: &mut PeerStream, n: usize, body: &mut Vec<u8>) -> Result<(), String> {
    body.clear();
    let got = stream
        .take(n as u64)
        .read_to_end(body)
        .await
        .map_err(|e| e.to_string())?;
    if got != n {
        return Err(format!("a frame of {n} bytes ended after {got}"));
    }
    Ok(())
}

/// Reads a peer's introduction and answers it; the peer's node id and
/// whether the connection is a tunnel.
async fn handshake(stream: &mut PeerStream, auth: &PeerAuth) -> Result<(u64, bool), String> {
    let mut head = [0u8; 20];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let tunnel = match &head[..8] {
        m if m == RAFT_MAGIC => false,
        m if m == TUNNEL_MAGIC => true,
        _ => return Err("not an rstmdb peer (bad magic)".into()),
    };
    let node = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let token_len = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    if token_len > MAX_TOKEN {
        return Err(format!("node {node}: token of {token_len} bytes"));
    }
    let mut token = vec![0u8; token_len];
    stream
        .read_exact(&mut token)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let token = String::from_utf8_lossy(&token);
    let mut len = [0u8; 1];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut client = vec![0u8; len[0] as usize];
    stream
        .read_exact(&mut client)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let ok = !auth.accept.required() || auth.accept.authenticate("bearer", &token).is_ok();
    let _ = stream.write_all(&[ok as u8]).await;
    if !ok {
        tracing::warn!(node, "refused a peer: wrong replication token");
        return Err(format!("node {node} presented a wrong replication token"));
    }
    if let Ok(mut m) = auth.client_addrs.lock() {
        m.insert(node, String::from_utf8_lossy(&client).into_owned());
    }
    Ok((node, tunnel))
}

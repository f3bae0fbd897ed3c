//! The frontend's accept loop: bounds the connection count, terminates
//! TLS, and runs each connection (`connection`) as a task of its own until
//! shutdown.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use crate::net::connection;
use crate::net::idle::IdleWatch;
use crate::net::peer_stream::PeerStream;
use crate::service::compaction::Compactor;
use crate::service::ops::OpSettings;
use crate::service::replication_status::ClusterView;
use crate::service::router::Router;
use crate::service::subscriptions::Hub;
use crate::telemetry::RequestMetrics;
use crate::ticker::Ticker;

/// How long shutdown waits for connections to finish their current cycle.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Frontend settings.
#[derive(Clone)]
pub struct FrontendConfig {
    /// Operation settings.
    pub ops: OpSettings,
    /// `network.max_connections`.
    pub max_connections: usize,
    /// `network.idle_timeout_secs` (None = never): a connection that sends
    /// nothing for this long is closed silently (D18).
    pub idle_timeout: Option<Duration>,
    /// TLS on the listener (`tls.*`), None for plain TCP.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Cluster mode: how a follower forwards to its leader.
    pub forward: Option<crate::net::forward::Forwarder>,
    /// Request instruments, None when `metrics.enabled` is off (then the
    /// request path does no metrics work at all).
    pub metrics: Option<Arc<RequestMetrics>>,
    /// Housekeeping ticks (the idle sweeper's).
    pub ticker: Ticker,
}

/// Runs the accept loop until `shutdown` fires (or its sender is dropped),
/// then lets open connections finish their current cycle.
pub async fn serve(
    inbound: Inbound,
    router: Router,
    hub: Rc<RefCell<Hub>>,
    compactor: Arc<Compactor>,
    cfg: FrontendConfig,
    shutdown: flume::Receiver<()>,
    active: Arc<AtomicUsize>,
) {
    // Dropping this sender tells every connection to stop after its cycle.
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let idle = cfg.idle_timeout.map(IdleWatch::new);
    if let Some(watch) = &idle {
        let ticks = cfg.ticker.every(watch.sweep_every());
        glommio::spawn_local(watch.clone().sweep(ticks)).detach();
    }
    let spawner = Spawner {
        router,
        hub,
        compactor,
        cfg,
        stop: stop_rx,
        active: active.clone(),
    };
    loop {
        match next_connection(&inbound, &shutdown).await {
            Accepted::Stop => break,
            Accepted::Failed(e) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            Accepted::Client(stream) => {
                // Shared by every frontend: the limit is the server's.
                if active.fetch_add(1, Ordering::SeqCst) >= spawner.cfg.max_connections {
                    active.fetch_sub(1, Ordering::SeqCst);
                    // Over the limit: close without sending a byte (D18).
                    drop(stream);
                    continue;
                }
                spawner.spawn_client(stream, idle.as_ref().map(|w| w.register()));
            }
            Accepted::Tunnel(stream) => {
                // It carries clients a follower already counted.
                active.fetch_add(1, Ordering::SeqCst);
                spawner.spawn_tunnel(stream);
            }
        }
    }
    tracing::info!("stopped accepting; finishing open connections");
    if let Some(view) = &spawner.cfg.ops.cluster {
        hand_over_leadership(view, &spawner.router).await;
    }
    drop(stop_tx);
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    while active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// How long a stopping leader waits for another node to take over.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(3);

/// A cluster node that leads hands its leadership to the follower furthest
/// along before it stops, so that the cluster does not wait an election
/// timeout for a new leader (a rolling restart costs no failover).
async fn hand_over_leadership(view: &ClusterView, router: &Router) {
    let status = &view.status;
    if status.leader.load(Ordering::Relaxed) != view.node_id {
        return;
    }
    let handed =
        futures_lite::future::or(async { Some(router.transfer_leader(None).await) }, async {
            glommio::timer::sleep(HAND_OVER_WITHIN).await;
            None
        })
        .await;
    match handed {
        Some(Ok(_)) => tracing::info!("leadership handed over before stopping"),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "could not hand leadership over before stopping")
        }
        None => tracing::warn!("no node took leadership in time; stopping anyway"),
    }
}

/// Where connections come from.
pub struct Inbound {
    /// The client listener.
    pub clients: TcpListener,
    /// Cluster mode: followers' tunnels, from the peer listener (a closed
    /// channel when there is none).
    pub tunnels: flume::Receiver<PeerStream>,
}

/// What the accept loop got.
enum Accepted {
    Client(TcpStream),
    /// A follower's tunnel (see `net::forward`), already authenticated.
    Tunnel(PeerStream),
    Failed(std::io::Error),
    Stop,
}

async fn next_connection(inbound: &Inbound, shutdown: &flume::Receiver<()>) -> Accepted {
    let accept = async {
        match inbound.clients.accept().await {
            Ok(s) => Accepted::Client(s),
            Err(e) => Accepted::Failed(e.into()),
        }
    };
    let tunnel = async {
        match inbound.tunnels.recv_async().await {
            Ok(s) => Accepted::Tunnel(s),
            // No peer transport here: wait for the others.
            Err(_) => futures_lite::future::pending().await,
        }
    };
    let stop = async {
        let _ = shutdown.recv_async().await;
        Accepted::Stop
    };
    use futures_lite::future::or;
    or(stop, or(accept, tunnel)).await
}

/// Starts connection tasks with what they share.
struct Spawner {
    router: Router,
    hub: Rc<RefCell<Hub>>,
    compactor: Arc<Compactor>,
    cfg: FrontendConfig,
    stop: flume::Receiver<()>,
    active: Arc<AtomicUsize>,
}

impl Spawner {
    /// A client connection: TLS if configured, then served.
    fn spawn_client(&self, stream: TcpStream, idle: Option<crate::net::idle::Idle>) {
        let _ = stream.set_nodelay(true);
        let (shared, cfg) = self.parts(idle);
        let active = self.active.clone();
        glommio::spawn_local(async move {
            let ended = match cfg.tls.clone() {
                None => connection::serve(stream, shared, &cfg).await,
                Some(acceptor) => match handshake(acceptor, stream).await {
                    Ok(tls) => connection::serve(tls, shared, &cfg).await,
                    Err(e) => Err(e),
                },
            };
            finish(ended, &active);
        })
        .detach();
    }

    /// A follower's tunnel: served as it came (its TLS, if any, is the
    /// peer transport's), never forwarded again, never idle-closed.
    fn spawn_tunnel(&self, stream: PeerStream) {
        let (shared, mut cfg) = self.parts(None);
        cfg.forward = None;
        let active = self.active.clone();
        glommio::spawn_local(async move {
            finish(connection::serve(stream, shared, &cfg).await, &active);
        })
        .detach();
    }

    /// What a connection shares with the frontend, and its settings.
    fn parts(&self, idle: Option<crate::net::idle::Idle>) -> (connection::Shared, FrontendConfig) {
        if let Some(m) = &self.cfg.metrics {
            m.connections.increment(1);
        }
        let shared = connection::Shared {
            router: self.router.clone(),
            hub: self.hub.clone(),
            compactor: self.compactor.clone(),
            stop: self.stop.clone(),
            idle,
        };
        (shared, self.cfg.clone())
    }
}

/// A connection ended: logged, and uncounted.
fn finish(ended: std::io::Result<()>, active: &AtomicUsize) {
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    active.fetch_sub(1, Ordering::SeqCst);
}

/// The TLS handshake, bounded by [`crate::security::tls::HANDSHAKE_TIMEOUT`]; a
/// failure closes the connection (no RCP bytes are ever sent).
async fn handshake(
    acceptor: futures_rustls::TlsAcceptor,
    stream: glommio::net::TcpStream,
) -> std::io::Result<futures_rustls::server::TlsStream<glommio::net::TcpStream>> {
    futures_lite::future::or(acceptor.accept(stream), async {
        glommio::timer::sleep(crate::security::tls::HANDSHAKE_TIMEOUT).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        ))
    })
    .await
}

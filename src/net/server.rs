//! The frontend's accept loop: bounds the connection count, terminates
//! TLS, and runs each connection (`connection`) as a task of its own until
//! shutdown.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::net::TcpListener;

use crate::net::connection;
use crate::net::idle::IdleWatch;
use crate::service::compaction::Compactor;
use crate::service::ops::OpSettings;
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
    /// Request instruments, None when `metrics.enabled` is off (then the
    /// request path does no metrics work at all).
    pub metrics: Option<Arc<RequestMetrics>>,
    /// Housekeeping ticks (the idle sweeper's).
    pub ticker: Ticker,
}

/// Runs the accept loop until `shutdown` fires (or its sender is dropped),
/// then lets open connections finish their current cycle.
pub async fn serve(
    listener: TcpListener,
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
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = shutdown.recv_async().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Shared by every frontend: the limit is the server's.
        if active.fetch_add(1, Ordering::SeqCst) >= cfg.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            // Over the limit: close without sending a byte (D18).
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        if let Some(m) = &cfg.metrics {
            m.connections.increment(1);
        }
        let (router, cfg, active, stop, hub, compactor) = (
            router.clone(),
            cfg.clone(),
            active.clone(),
            stop_rx.clone(),
            hub.clone(),
            compactor.clone(),
        );
        let shared = connection::Shared {
            router,
            hub,
            compactor,
            stop,
            idle: idle.as_ref().map(|w| w.register()),
        };
        glommio::spawn_local(async move {
            let ended = match cfg.tls.clone() {
                None => connection::serve(stream, shared, &cfg).await,
                Some(acceptor) => match handshake(acceptor, stream).await {
                    Ok(tls) => connection::serve(tls, shared, &cfg).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
    }
    tracing::info!("stopped accepting; finishing open connections");
    drop(stop_tx);
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    while active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
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

//! Wiring a cluster node (issue 17): the shard's group settings, the peer
//! transport's queues and credentials, and what frontends report. The
//! machinery itself lives in `rstmdb_shards::shard` (the group member),
//! `net::peer` (the transport) and `service::replication_status`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rstmdb_shards::replication::ReplicaConfig;
use rstmdb_shards::shard::{ClusterShardConfig, GroupStatus, LogBounds, ShardMsg, PEER_QUEUE};
use sha2::{Digest, Sha256};

use crate::config::cluster::FollowerReads;
use crate::config::{AuthConfig, Config};
use crate::net::forward::Forwarder;
use crate::net::peer::{self, PeerAuth};
use crate::security::auth::Authenticator;
use crate::security::tls::PeerTls;
use crate::service::replication_status::ClusterView;
use crate::storage::datadir::DataDir;

/// What the transport runs with on shard 0's executor.
pub struct PeerPart {
    pub listen: SocketAddr,
    pub auth: PeerAuth,
    /// (peer id, address, the queue of frames for it).
    pub outbound: Vec<(u64, String, flume::Receiver<Vec<u8>>)>,
}

impl PeerPart {
    /// Starts the listener and one sender per peer on this executor; the
    /// listener hands messages to `shard` while it runs, and tunnels from
    /// followers to `tunnels` (the frontend serves them as clients).
    pub fn spawn(
        self,
        shard: flume::WeakSender<ShardMsg>,
        tunnels: flume::Sender<crate::net::peer_stream::PeerStream>,
    ) -> Result<(), String> {
        let listener = crate::net::listen::listener(self.listen)
            .map_err(|e| format!("cannot listen for peers on {}: {e}", self.listen))?;
        tracing::info!(addr = %self.listen, "listening for cluster peers");
        glommio::spawn_local(peer::accept_peers(
            listener,
            self.auth.clone(),
            shard,
            tunnels,
        ))
        .detach();
        for (id, addr, rx) in self.outbound {
            glommio::spawn_local(peer::send_to(id, addr, self.auth.clone(), rx)).detach();
        }
        Ok(())
    }
}

/// A cluster node's parts.
pub struct ClusterWiring {
    pub shard: ClusterShardConfig,
    pub view: ClusterView,
    pub peers: Option<PeerPart>,
    /// What connections forward with.
    pub forward: Forwarder,
}

impl ClusterWiring {
    /// The parts of this node, or `None` when it is standalone.
    pub fn build(cfg: &Config, data: &DataDir) -> Result<Option<ClusterWiring>, String> {
        let c = &cfg.cluster;
        let Some(node_id) = c.node_id else {
            return Ok(None);
        };
        let peers = c.peer_list();
        let mut queues = HashMap::new();
        let mut outbound = Vec::new();
        for p in peers.iter().filter(|p| p.id != node_id) {
            let (tx, rx) = flume::bounded(PEER_QUEUE);
            queues.insert(p.id, tx);
            outbound.push((p.id, p.addr.clone(), rx));
        }
        let status = Arc::new(GroupStatus::default());
        let client_addrs = Arc::default();
        let shard = ClusterShardConfig {
            node_id,
            voters: peers.iter().map(|p| p.id).collect(),
            raft_dir: DataDir::shard_dir_in(data.base(), 0).join("raft"),
            tick: Duration::from_millis(c.tick_ms),
            replica: ReplicaConfig {
                election_ticks: c.election_ticks,
                heartbeat_ticks: c.heartbeat_ticks,
                ..ReplicaConfig::default()
            },
            commit_timeout: Duration::from_millis(c.commit_timeout_ms),
            log_bounds: LogBounds::from_entries(c.raft_log_entries),
            limits: crate::daemon::engine_limits(cfg),
            peers: queues,
            status: status.clone(),
        };
        let view = ClusterView {
            node_id,
            peers: peers.iter().map(|p| (p.id, p.addr.clone())).collect(),
            status,
            client_addrs: Arc::clone(&client_addrs),
        };
        let mut auth = peer_auth(cfg, node_id)?;
        auth.client_addrs = client_addrs;
        auth.client_addr = advertised_client_addr(cfg, &peers, node_id);
        let forward = Forwarder {
            view: view.clone(),
            auth: auth.clone(),
            stale_reads: c.follower_reads == FollowerReads::Stale,
        };
        let part = PeerPart {
            listen: c.listen_addr()?,
            auth,
            outbound,
        };
        Ok(Some(ClusterWiring {
            shard,
            view,
            peers: Some(part),
            forward,
        }))
    }
}

/// The token this node presents and the tokens it accepts: the
/// reference's `replication.auth_token`, `auth_token_hashes` and
/// `auth_secrets_file`. A node with a token accepts its own.
fn peer_auth(cfg: &Config, node_id: u64) -> Result<PeerAuth, String> {
    let r = &cfg.replication;
    let accepted = AuthConfig {
        required: false,
        token_hashes: r.auth_token_hashes.clone(),
        secrets_file: r.auth_secrets_file.clone(),
    };
    let mut hashes = accepted.load_token_hashes().map_err(|e| {
        e.to_string()
            .replace("auth.secrets_file", "replication.auth_secrets_file")
    })?;
    if let Some(t) = &r.auth_token {
        let own = hex(&Sha256::digest(t.as_bytes()));
        if !hashes.contains(&own) {
            hashes.push(own);
        }
    }
    if hashes.is_empty() {
        tracing::warn!(
            "cluster peers are not authenticated: set replication.auth_token on every node"
        );
    }
    let tls = if r.tls_enabled {
        let (cert, key) = match (&cfg.tls.cert_path, &cfg.tls.key_path) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                unreachable!("validated: replication.tls_enabled needs tls.cert_path and key_path")
            }
        };
        let tls = PeerTls::load(cert, key, r.tls_ca_path.as_deref(), r.tls_insecure)
            .map_err(|e| format!("peer TLS: {e}"))?;
        if r.tls_insecure {
            tracing::warn!("replication.tls_insecure: peer certificates are not verified");
        }
        Some(tls)
    } else {
        None
    };
    Ok(PeerAuth {
        node_id,
        tls,
        client_addr: String::new(),
        client_addrs: Arc::default(),
        token: r.auth_token.clone(),
        accept: Arc::new(Authenticator::new(!hashes.is_empty(), &hashes)),
    })
}

/// The address clients reach this node at: `network.bind_addr`, with an
/// unspecified IP (0.0.0.0) replaced by the host of its peer address.
fn advertised_client_addr(cfg: &Config, peers: &[crate::config::cluster::Peer], me: u64) -> String {
    let bind = cfg.network.bind_addr;
    if !bind.ip().is_unspecified() {
        return bind.to_string();
    }
    let host = peers
        .iter()
        .find(|p| p.id == me)
        .and_then(|p| p.addr.rsplit_once(':').map(|(h, _)| h.to_string()))
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", bind.port())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

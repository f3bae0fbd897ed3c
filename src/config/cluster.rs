//! `cluster:` — several nodes as one replicated database (issue 17; our
//! own section, the reference has no equivalent). Absent `node_id`, the
//! server is standalone and pays nothing for the feature.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};

use serde::Deserialize;

use super::{invalid, ConfigError, EnvLayer};

/// Most nodes in a cluster (raft-rs copes with more; quorum writes do not).
pub const MAX_NODES: usize = 9;

/// Fewest entries `cluster.raft_log_entries` may name.
pub const MIN_LOG_ENTRIES: u64 = 40;

/// `cluster:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// This node's id (1 and up), one of `peers`. Default none: standalone.
    /// Env `RSTMDB_CLUSTER_NODE_ID`.
    pub node_id: Option<u64>,
    /// Every node's peer address as `ID=HOST:PORT`, this node's included.
    /// Env `RSTMDB_CLUSTER_PEERS` (comma-separated).
    pub peers: Vec<String>,
    /// Where this node listens for its peers. Default: its own entry in
    /// `peers`. Env `RSTMDB_CLUSTER_BIND`.
    pub bind_addr: Option<SocketAddr>,
    /// One tick of the groups' clocks, ms. Default 100.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower stands for election (the
    /// timeout is drawn from [n, 2n)). Default 10 (1–2 s).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats. Default 2.
    pub heartbeat_ticks: usize,
    /// How long a write waits for a majority before its caller is told the
    /// outcome is unknown (retryable), ms. Default 5000.
    pub commit_timeout_ms: u64,
    /// `linearizable` (default): a follower forwards reads to the leader,
    /// which confirms its leadership (ReadIndex) before answering.
    /// `stale`: every node answers reads from its own applied state.
    pub follower_reads: FollowerReads,
    /// Entries the group's Raft log holds before it is compacted (its file
    /// is also compacted past 64 MiB). A member more than 12.5× this many
    /// entries behind (or 256 MiB) stops holding compaction back and
    /// catches up by a snapshot transfer instead. Default 40,000.
    pub raft_log_entries: u64,
}

/// `cluster.follower_reads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FollowerReads {
    #[default]
    Linearizable,
    Stale,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            peers: Vec::new(),
            bind_addr: None,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            commit_timeout_ms: 5000,
            follower_reads: FollowerReads::Linearizable,
            raft_log_entries: 40_000,
        }
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    /// `HOST:PORT` as given (resolved when connecting).
    pub addr: String,
}

impl ClusterConfig {
    /// Whether this server is a cluster node.
    pub fn enabled(&self) -> bool {
        self.node_id.is_some()
    }

    /// The parsed `peers` (checked by [`ClusterConfig::validate`]).
    pub fn peer_list(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .filter_map(|p| parse_peer(p).ok())
            .collect()
    }

    /// Where to listen for peers.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        if let Some(a) = self.bind_addr {
            return Ok(a);
        }
        let own = self
            .peer_list()
            .into_iter()
            .find(|p| Some(p.id) == self.node_id)
            .ok_or("this node has no entry in cluster.peers")?;
        own.addr
            .to_socket_addrs()
            .map_err(|e| format!("cluster.peers: cannot resolve {}: {e}", own.addr))?
            .next()
            .ok_or_else(|| format!("cluster.peers: {} resolves to nothing", own.addr))
    }

    /// With no `node_id`, takes the id of the peer whose host is this
    /// machine's name (`host`, or `host.` followed by a domain): a
    /// StatefulSet's pods (`rstmdb-0.rstmdb-peers…`) or a compose file's
    /// services then share one configuration.
    pub fn find_self(&mut self, host: Option<&str>) {
        let Some(host) = host.filter(|h| !h.is_empty()) else {
            return;
        };
        let mine: Vec<u64> = self
            .peer_list()
            .into_iter()
            .filter(|p| {
                let name = p.addr.rsplit_once(':').map_or(&*p.addr, |(h, _)| h);
                name == host || name.strip_prefix(host).is_some_and(|d| d.starts_with('.'))
            })
            .map(|p| p.id)
            .collect();
        if let [id] = mine[..] {
            self.node_id = Some(id);
        }
    }

    pub(super) fn apply_env(&mut self, e: &mut EnvLayer<'_>) {
        e.number_opt("RSTMDB_CLUSTER_NODE_ID", &mut self.node_id);
        if let Some(v) = e.get_nonempty("RSTMDB_CLUSTER_PEERS") {
            self.peers = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        e.number_opt("RSTMDB_CLUSTER_BIND", &mut self.bind_addr);
    }

    pub(super) fn validate(&self, shards: Option<usize>) -> Result<(), ConfigError> {
        let Some(me) = self.node_id else {
            if !self.peers.is_empty() {
                return Err(invalid(
                    "cluster.node_id",
                    "cluster.peers is set but cluster.node_id is not, and no peer's host is \
                     this machine's name: give this node its id (RSTMDB_CLUSTER_NODE_ID)",
                ));
            }
            return Ok(());
        };
        let mut ids = HashSet::new();
        for p in &self.peers {
            let peer = parse_peer(p).map_err(|m| invalid("cluster.peers", m))?;
            if !ids.insert(peer.id) {
                return Err(invalid(
                    "cluster.peers",
                    format!("cluster.peers names node {} twice", peer.id),
                ));
            }
        }
        if me == 0 || !ids.contains(&me) {
            return Err(invalid(
                "cluster.node_id",
                format!(
                    "cluster.node_id {me} is not one of cluster.peers ({}); every node lists \
                     all nodes, itself included, as ID=HOST:PORT",
                    self.peers.join(", ")
                ),
            ));
        }
        if ids.len() > MAX_NODES {
            return Err(invalid(
                "cluster.peers",
                format!("at most {MAX_NODES} nodes (got {})", ids.len()),
            ));
        }
        if shards.is_some_and(|n| n != 1) {
            return Err(invalid(
                "server.shards",
                "a cluster node runs one shard (one Raft group) for now; leave server.shards \
                 unset or set it to 1",
            ));
        }
        if self.tick_ms == 0
            || self.heartbeat_ticks == 0
            || self.election_ticks <= self.heartbeat_ticks
        {
            return Err(invalid(
                "cluster.election_ticks",
                "cluster.tick_ms and cluster.heartbeat_ticks must be positive and \
                 cluster.election_ticks larger than cluster.heartbeat_ticks",
            ));
        }
        if self.raft_log_entries < MIN_LOG_ENTRIES {
            return Err(invalid(
                "cluster.raft_log_entries",
                format!("cluster.raft_log_entries must be at least {MIN_LOG_ENTRIES}"),
            ));
        }
        if self.commit_timeout_ms == 0 {
            return Err(invalid(
                "cluster.commit_timeout_ms",
                "cluster.commit_timeout_ms must be positive",
            ));
        }
        Ok(())
    }
}

/// `ID=HOST:PORT`.
fn parse_peer(s: &str) -> Result<Peer, String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer '{s}' is not ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("peer '{s}': the id must be a positive integer"))?;
    let addr = addr.trim();
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(format!("peer '{s}': the address must be HOST:PORT"));
    }
    Ok(Peer {
        id,
        addr: addr.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(me: u64) -> ClusterConfig {
        ClusterConfig {
            node_id: Some(me),
            peers: vec![
                "1=127.0.0.1:7501".into(),
                "2=127.0.0.1:7502".into(),
                "3=localhost:7503".into(),
            ],
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn a_valid_cluster_and_its_listen_address() {
        let c = three(2);
        c.validate(None).unwrap();
        assert_eq!(c.listen_addr().unwrap(), "127.0.0.1:7502".parse().unwrap());
        assert_eq!(c.peer_list().len(), 3);
        assert!(!ClusterConfig::default().enabled());
        ClusterConfig::default().validate(Some(4)).unwrap();
    }

    #[test]
    fn bad_clusters_are_refused_with_the_key() {
        let key = |c: &ClusterConfig, shards| match c.validate(shards) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key(&three(4), None), "cluster.node_id");
        assert_eq!(key(&three(1), Some(2)), "server.shards");
        let mut dup = three(1);
        dup.peers.push("1=127.0.0.1:9".into());
        assert_eq!(key(&dup, None), "cluster.peers");
        for bad in [
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=127.0.0.1",
            "1127.0.0.1:1",
            "1=:80",
        ] {
            let mut c = three(1);
            c.peers[0] = bad.into();
            assert_eq!(key(&c, None), "cluster.peers", "{bad}");
        }
        let orphan = ClusterConfig {
            peers: vec!["1=a:1".into()],
            ..ClusterConfig::default()
        };
        assert_eq!(key(&orphan, None), "cluster.node_id");
    }

    #[test]
    fn a_node_finds_its_id_by_its_host_name() {
        let mut c = ClusterConfig {
            peers: vec![
                "1=rstmdb-0.rstmdb-peers.db.svc.cluster.local:7501".into(),
                "2=rstmdb-1.rstmdb-peers.db.svc.cluster.local:7501".into(),
                "3=rstmdb-10:7501".into(),
            ],
            ..ClusterConfig::default()
        };
        c.find_self(Some("rstmdb-1"));
        assert_eq!(c.node_id, Some(2));
        c.node_id = None;
        c.find_self(Some("rstmdb-10"));
        assert_eq!(c.node_id, Some(3));
        // A prefix of another name is not a match.
        c.node_id = None;
        c.find_self(Some("rstmdb"));
        assert_eq!(c.node_id, None);
        c.find_self(None);
        assert_eq!(c.node_id, None);
    }
}

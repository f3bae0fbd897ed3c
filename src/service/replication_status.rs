//! `REPLICATION_STATUS`: the reference's shape (`role`, `primary_sequence`,
//! `replicas[]` on a primary; `upstream`, `last_applied_sequence`,
//! `lag_entries` on a replica) so `rstmdb-cli replication-status` and
//! rstmdb-studio read it, plus the cluster's own fields (`node_id`,
//! `term`, `leader_id`, per-group detail). Sequences are Raft indexes of
//! the group's log; `wal_offset` is the last record applied.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rstmdb_shards::shard::GroupStatus;
use serde_json::{json, Value};

/// What a frontend knows of its node's place in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub node_id: u64,
    /// Every node: (id, peer address).
    pub peers: Vec<(u64, String)>,
    /// Group 0's figures (one group per node for now).
    pub status: Arc<GroupStatus>,
    /// Client addresses the peers announced, by node id.
    pub client_addrs: Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>,
}

/// The answer for a standalone server, or for a cluster node.
pub fn status(view: Option<&ClusterView>) -> Value {
    let Some(v) = view else {
        return json!({"role": "standalone"});
    };
    let s = &v.status;
    let term = s.term.load(Ordering::Relaxed);
    let leader = s.leader.load(Ordering::Relaxed);
    let commit = s.commit_index.load(Ordering::Relaxed);
    let applied = s.applied_index.load(Ordering::Relaxed);
    let group = json!({
        "group": 0,
        "commit_index": commit,
        "applied_index": applied,
        "wal_offset": s.applied_offset.load(Ordering::Relaxed),
        "role": role_name(s.role.load(Ordering::Relaxed)),
        "snapshots_sent": s.snapshots_sent.load(Ordering::Relaxed),
        "snapshots_installed": s.snapshots_installed.load(Ordering::Relaxed),
    });
    let mut out = if leader == v.node_id {
        let matched = s.matched.lock().map(|m| m.clone()).unwrap_or_default();
        let replicas: Vec<Value> = matched
            .iter()
            .filter(|(id, _)| *id != v.node_id)
            .map(|(id, m)| {
                json!({
                    "replica_id": format!("node-{id}"),
                    "address": address(v, *id),
                    "last_acked_sequence": m,
                    "lag_entries": commit.saturating_sub(*m),
                })
            })
            .collect();
        let connected = matched
            .iter()
            .filter(|(id, m)| *id != v.node_id && *m > 0)
            .count();
        json!({
            "role": "primary",
            "mode": "raft",
            "primary_sequence": commit,
            "connected_replicas": connected,
            "replicas": replicas,
        })
    } else {
        json!({
            "role": "replica",
            "mode": "raft",
            "upstream": (leader != 0).then(|| client_address(v, leader)),
            "last_applied_sequence": applied,
            "primary_sequence": commit,
            "lag_entries": commit.saturating_sub(applied),
            "lag_seconds": lag_seconds(s),
        })
    };
    let obj = out.as_object_mut().expect("an object");
    obj.insert("node_id".into(), json!(v.node_id));
    obj.insert("term".into(), json!(term));
    obj.insert("leader_id".into(), json!((leader != 0).then_some(leader)));
    obj.insert(
        "elections".into(),
        json!(s.term_changes.load(Ordering::Relaxed)),
    );
    obj.insert("groups".into(), json!([group]));
    out
}

/// The client address node `id` announced, else its peer address.
fn client_address(v: &ClusterView, id: u64) -> Option<String> {
    let announced = v.client_addrs.lock().ok().and_then(|m| m.get(&id).cloned());
    announced.or_else(|| address(v, id))
}

/// How long this node has been behind what it knows committed (0 while
/// caught up).
fn lag_seconds(s: &GroupStatus) -> f64 {
    match s.behind_since_ms.load(Ordering::Relaxed) {
        0 => 0.0,
        since => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(since) as f64 / 1000.0
        }
    }
}

/// Entries a follower may trail the commit index by and still count as
/// caught up.
pub const READY_LAG_ENTRIES: u64 = 1_000;

/// Whether a cluster node is ready to serve (the metrics endpoint's
/// `/health`): it knows a leader and has applied what it knows committed,
/// give or take [`READY_LAG_ENTRIES`].
pub fn readiness(v: &ClusterView) -> Result<(), &'static str> {
    let s = &v.status;
    if s.leader.load(Ordering::Relaxed) == 0 {
        return Err("no leader known");
    }
    let commit = s.commit_index.load(Ordering::Relaxed);
    if commit.saturating_sub(s.applied_index.load(Ordering::Relaxed)) > READY_LAG_ENTRIES {
        return Err("catching up");
    }
    Ok(())
}

/// Sets the replication families at a scrape: the reference's
/// `rstmdb_replication_*` names (a leader's view of its replicas, a
/// follower's lag) and ours (term, elections, role, indexes).
pub fn export_metrics(v: &ClusterView) {
    use metrics::{counter, gauge};
    let s = &v.status;
    let leader = s.leader.load(Ordering::Relaxed);
    let commit = s.commit_index.load(Ordering::Relaxed);
    let applied = s.applied_index.load(Ordering::Relaxed);
    let matched = s.matched.lock().map(|m| m.clone()).unwrap_or_default();
    let replicas: Vec<&(u64, u64)> = matched.iter().filter(|(id, _)| *id != v.node_id).collect();
    let connected = replicas.iter().filter(|(_, m)| *m > 0).count();
    gauge!("rstmdb_replication_connected_replicas").set(connected as f64);
    for (id, m) in &replicas {
        let replica = format!("node-{id}");
        gauge!("rstmdb_replication_replica_lag_entries", "replica_id" => replica.clone())
            .set(commit.saturating_sub(*m) as f64);
        gauge!("rstmdb_replication_replica_last_acked_sequence", "replica_id" => replica)
            .set(*m as f64);
    }
    let lag = if leader == v.node_id {
        0
    } else {
        commit.saturating_sub(applied)
    };
    gauge!("rstmdb_replication_lag_entries").set(lag as f64);
    gauge!("rstmdb_replication_lag_seconds").set(lag_seconds(s));
    counter!("rstmdb_replication_entries_sent_total")
        .absolute(s.entries_sent.load(Ordering::Relaxed));
    counter!("rstmdb_replication_sync_timeouts_total")
        .absolute(s.commit_timeouts.load(Ordering::Relaxed));
    counter!("rstmdb_replication_slow_replica_disconnects_total").absolute(0);
    counter!("rstmdb_replication_snapshots_sent_total")
        .absolute(s.snapshots_sent.load(Ordering::Relaxed));
    counter!("rstmdb_replication_snapshots_installed_total")
        .absolute(s.snapshots_installed.load(Ordering::Relaxed));
    gauge!("rstmdb_replication_term").set(s.term.load(Ordering::Relaxed) as f64);
    counter!("rstmdb_replication_elections_total").absolute(s.term_changes.load(Ordering::Relaxed));
    gauge!("rstmdb_replication_role").set(f64::from(s.role.load(Ordering::Relaxed)));
    gauge!("rstmdb_replication_leader_id").set(leader as f64);
    gauge!("rstmdb_replication_commit_index").set(commit as f64);
    gauge!("rstmdb_replication_applied_index").set(applied as f64);
}

fn address(v: &ClusterView, id: u64) -> Option<String> {
    v.peers
        .iter()
        .find(|(p, _)| *p == id)
        .map(|(_, a)| a.clone())
}

fn role_name(r: u8) -> &'static str {
    match r {
        2 => "leader",
        1 => "candidate",
        3 => "pre_candidate",
        _ => "follower",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_for_standalone_leader_and_follower() {
        assert_eq!(status(None), json!({"role": "standalone"}));
        let s = Arc::new(GroupStatus::default());
        s.term.store(3, Ordering::Relaxed);
        s.leader.store(1, Ordering::Relaxed);
        s.commit_index.store(10, Ordering::Relaxed);
        s.applied_index.store(10, Ordering::Relaxed);
        *s.matched.lock().unwrap() = vec![(1, 10), (2, 7), (3, 0)];
        let mut v = ClusterView {
            node_id: 1,
            peers: vec![(1, "a:1".into()), (2, "b:2".into()), (3, "c:3".into())],
            status: s.clone(),
            client_addrs: Default::default(),
        };
        let lead = status(Some(&v));
        assert_eq!(lead["role"], "primary");
        assert_eq!(lead["connected_replicas"], 1);
        assert_eq!(lead["replicas"][0]["lag_entries"], 3);
        assert_eq!(lead["leader_id"], 1);
        v.node_id = 2;
        s.applied_index.store(8, Ordering::Relaxed);
        let follow = status(Some(&v));
        assert_eq!(follow["role"], "replica");
        assert_eq!(
            follow["upstream"], "a:1",
            "the peer address until the leader announces"
        );
        v.client_addrs.lock().unwrap().insert(1, "a:7401".into());
        assert_eq!(status(Some(&v))["upstream"], "a:7401");
        assert_eq!(readiness(&v), Ok(()));
        s.commit_index
            .store(10 + READY_LAG_ENTRIES, Ordering::Relaxed);
        s.applied_index.store(10, Ordering::Relaxed);
        assert_eq!(readiness(&v), Ok(()), "within the lag allowed");
        s.commit_index
            .store(11 + READY_LAG_ENTRIES, Ordering::Relaxed);
        assert_eq!(readiness(&v), Err("catching up"));
        s.leader.store(0, Ordering::Relaxed);
        assert_eq!(readiness(&v), Err("no leader known"));
        assert_eq!(follow["lag_entries"], 2);
    }
}

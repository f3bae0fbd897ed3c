//! Process entry: configuration, data directory, recovery, executors,
//! serving until a signal (see the crate docs for the sequence).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use glommio::{LocalExecutorBuilder, Placement};
use rstmdb_shards::engine::EngineLimits;
use rstmdb_shards::shard::{self, FsyncPolicy, Sequencer, ShardConfig, ShardMsg};
use rstmdb_wal::WriterConfig;

use crate::config::Config;
use crate::config::{self, layout};
use crate::net::{listen, server};
use crate::security::{auth, tls};
use crate::service::{compaction, ops, replication_status, router, subscriptions};
use crate::storage::datadir::DataDir;
use crate::storage::{recover, reshard};
use crate::telemetry;
use crate::ticker::Ticker;
use crate::tools::wal_tool;

/// Bound of each shard's inbound channel (batches, not requests): a full
/// channel makes frontends wait, which is the backpressure we want.
const SHARD_CHANNEL_BATCHES: usize = 4096;
/// Most commands one group commit executes.
const MAX_DRAIN_COMMANDS: usize = 8192;

/// The `rstmdb` command: the server, or one of the offline tools.
pub fn main() -> ExitCode {
    let cli = config::Cli::parse();
    match &cli.command {
        Some(config::Command::Wal(cmd)) => return wal_tool::run(cmd),
        Some(config::Command::Cluster(cmd)) => return crate::tools::cluster_tool::run(cmd),
        None => {}
    }
    if cli.print_default_config {
        let _ = std::io::stdout().write_all(config::EMBEDDED_DEFAULT.as_bytes());
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = &cli.gen_dev_certs {
        return match tls::generate_dev_certs(dir) {
            Ok(()) => {
                println!(
                    "wrote {} to {} (keys mode 0600)",
                    tls::DEV_CERT_FILES.join(", "),
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rstmdb: {e}");
                ExitCode::from(1)
            }
        };
    }
    init_logging();
    let cfg = match config::load(&cli, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration error: {e}");
            eprintln!("rstmdb: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("rstmdb: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never into log files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn fsync_policy(p: config::FsyncPolicy) -> FsyncPolicy {
    match p {
        config::FsyncPolicy::EveryWrite => FsyncPolicy::EveryWrite,
        config::FsyncPolicy::EveryN(n) => FsyncPolicy::EveryN(n),
        config::FsyncPolicy::EveryMs(n) => FsyncPolicy::EveryMs(n),
        config::FsyncPolicy::Never => FsyncPolicy::Never,
    }
}

/// An executor that cannot start almost always means io_uring is not
/// available (a container's default seccomp profile) or the locked-memory
/// limit is too small for its registered buffers: say which knob to turn.
fn executor_error(what: &str, e: impl std::fmt::Display) -> String {
    format!(
        "{what}: {e}. rstmdb needs io_uring (Linux 5.8+; in containers allow the \
         io_uring_setup/io_uring_enter/io_uring_register system calls, e.g. \
         --security-opt seccomp=unconfined) and locked memory for its I/O buffers (about \
         3 x server.io_memory_kib per executor: `ulimit -l`, systemd LimitMEMLOCK=, docker \
         --ulimit memlock=-1:-1); see README, \"Running in production\""
    )
}

/// The server: a page of named steps (the crate docs give the sequence).
fn run(cfg: Config) -> Result<(), String> {
    // Before recovery: a start refused for its address costs no recovery.
    check_addresses(&cfg)?;
    let security = Security::load(&cfg)?;
    let shards = cfg.server.shard_count();
    let storage = StorageSettings::of(&cfg);
    let mut data = DataDir::open(&cfg.storage.data_dir, shards).map_err(|e| e.to_string())?;
    if data.shards() != shards {
        reshard::reshard(&mut data, shards, &storage.limits, storage.segment_size)?;
    }
    let recovery = recover::recover_all(&data, shards, &storage.limits, storage.segment_size)?;
    let roles = layout::plan(
        cfg.server.layout,
        shards,
        cfg.server.frontend_count_for(shards),
    );
    let Wiring {
        shards: shard_parts,
        frontends: frontend_parts,
        start,
    } = Wiring::build(&cfg, &data, recovery, security, &storage)?;
    let executors = start_executors(&cfg, &roles, shard_parts, frontend_parts)?;
    start.wait()?;
    tracing::info!(addr = %cfg.network.bind_addr, shards, frontends = cfg.server.frontend_count_for(shards),
        layout = %cfg.server.layout, data_dir = %cfg.storage.data_dir.display(), "rstmdb listening");
    watch_signals(start.shutdown_tx)?;
    let outcome = join_executors(executors);
    drop(data);
    std::thread::sleep(Duration::from_millis(1));
    if outcome.is_ok() {
        tracing::info!("shutdown complete");
    }
    outcome
}

/// Refuses addresses another process listens on (see `listen`).
fn check_addresses(cfg: &Config) -> Result<(), String> {
    listen::check_free(cfg.network.bind_addr, "network.bind_addr").map_err(|e| e.to_string())?;
    if cfg.metrics.enabled {
        listen::check_free(cfg.metrics.bind_addr, "metrics.bind_addr")
            .map_err(|e| e.to_string())?;
    }
    if cfg.cluster.enabled() {
        let peer = cfg.cluster.listen_addr()?;
        listen::check_free(peer, "cluster.bind_addr").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Token check, TLS and the metrics recorder, loaded before anything starts
/// (instruments made before the recorder is installed stay no-ops).
struct Security {
    authenticator: Arc<auth::Authenticator>,
    tls: Option<futures_rustls::TlsAcceptor>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    request_metrics: Option<Arc<telemetry::RequestMetrics>>,
}

impl Security {
    fn load(cfg: &Config) -> Result<Security, String> {
        let token_hashes = cfg.auth.load_token_hashes().map_err(|e| e.to_string())?;
        let authenticator = Arc::new(auth::Authenticator::new(cfg.auth.required, &token_hashes));
        let prometheus = if cfg.metrics.enabled {
            Some(telemetry::install()?)
        } else {
            None
        };
        let request_metrics = prometheus
            .is_some()
            .then(|| Arc::new(telemetry::RequestMetrics::new()));
        let tls = tls::server_config(&cfg.tls)
            .map_err(|e| e.to_string())?
            .map(futures_rustls::TlsAcceptor::from);
        Ok(Security {
            authenticator,
            tls,
            prometheus,
            request_metrics,
        })
    }
}

/// Engine limits and WAL segment size, from `storage.*`.
struct StorageSettings {
    limits: EngineLimits,
    segment_size: u64,
}

/// The engine's limits from `storage.*`.
pub(crate) fn engine_limits(cfg: &Config) -> EngineLimits {
    EngineLimits {
        idempotency_entries: cfg.storage.idempotency_window,
        idempotency_max_age_ms: cfg
            .storage
            .idempotency_max_age()
            .map_or(0, |d| d.as_millis() as i64),
    }
}

impl StorageSettings {
    fn of(cfg: &Config) -> StorageSettings {
        StorageSettings {
            limits: engine_limits(cfg),
            segment_size: cfg.storage.wal_segment_size_mb * 1024 * 1024,
        }
    }
}

/// What one shard task needs: its recovered engine and WAL position, its
/// inbound channel, and where to say it is ready.
struct ShardPart {
    cfg: ShardConfig,
    engine: rstmdb_shards::engine::Engine,
    recovered: rstmdb_wal::Recovered,
    rx: flume::Receiver<ShardMsg>,
    seq: Sequencer,
    resume: shard::Resume,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
}

/// What one frontend task needs.
struct FrontendPart {
    index: usize,
    /// Cluster mode, frontend 0: the peer transport (it hands Raft
    /// messages to shard 0 through a sender that does not keep it alive).
    peers: Option<(crate::cluster::PeerPart, flume::WeakSender<ShardMsg>)>,
    /// Its hub's end of the shards' event channel.
    hub_rx: flume::Receiver<shard::HubMsg>,
    /// What every frontend gets alike.
    common: FrontendCommon,
    /// Fires (or closes) once every shard is ready: listen only then.
    go: flume::Receiver<()>,
    shutdown: flume::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<std::net::SocketAddr, String>>,
}

/// The start-up handshake the main thread runs: every shard ready, then
/// every frontend told to listen, then every frontend listening.
struct Start {
    shards: usize,
    frontends: usize,
    shard_ready: std::sync::mpsc::Receiver<Result<(), String>>,
    go: flume::Sender<()>,
    frontend_ready: std::sync::mpsc::Receiver<Result<std::net::SocketAddr, String>>,
    /// Dropped at the first signal (or a failed start): frontends stop.
    shutdown_tx: flume::Sender<()>,
}

impl Start {
    fn wait(&self) -> Result<(), String> {
        for _ in 0..self.shards {
            match self.shard_ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(executor_error(
                        "a shard executor exited during start-up",
                        "its io_uring could not be set up",
                    ))
                }
            }
        }
        for _ in 0..self.frontends {
            let _ = self.go.send(());
        }
        for _ in 0..self.frontends {
            match self.frontend_ready.recv() {
                Ok(Ok(addr)) => tracing::debug!(%addr, "frontend listening"),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(executor_error(
                        "a frontend executor exited during start-up",
                        "its io_uring could not be set up",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The parts of every shard and frontend, wired together: shard channels,
/// the hubs' event channels, the router, compaction and metrics.
struct Wiring {
    shards: Vec<ShardPart>,
    frontends: Vec<FrontendPart>,
    start: Start,
}

impl Wiring {
    /// A page of named steps, in the order the parts must be made: the
    /// shards' recoveries, channels and sinks, cluster, shards and router,
    /// compactor, metrics, then the frontends.
    fn build(
        cfg: &Config,
        data: &DataDir,
        recovery: recover::Recovery,
        security: Security,
        storage: &StorageSettings,
    ) -> Result<Wiring, String> {
        let recover::Recovery {
            shards: engines,
            snapshot_starts,
            records_ever,
            aborted,
            aborted_ever,
            next_offset,
            manifest,
        } = recovery;
        let recovered = shard_recoveries(engines, aborted, snapshot_starts, records_ever);
        let shards = recovered.len();
        let frontends = cfg.server.frontend_count_for(shards);
        let sinks = Sinks::new(next_offset, shards, frontends);
        let mut cluster = crate::cluster::ClusterWiring::build(cfg, data)?;
        let peers = cluster.as_mut().and_then(|c| c.peers.take());
        let common = ShardCommon {
            seq: sinks.seq.clone(),
            events: sinks.events,
            ready: sinks.shard_ready_tx,
            cluster: cluster.as_ref().map(|c| c.shard.clone()),
        };
        let (senders, shard_parts) = shard_parts(cfg, data, storage, recovered, common);
        let weak_senders: Vec<_> = senders.iter().map(|s| s.downgrade()).collect();
        let peers = peers.map(|p| (p, senders[0].downgrade()));
        let router = router::Router::new(senders, sinks.seq.clone());
        let (shared, compactor) = compactor(cfg, data, &router, aborted_ever, manifest);
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        serve_metrics(cfg, &security, weak_senders, &active, cluster.as_ref())?;
        let view = cluster.as_ref().map(|c| c.view.clone());
        let forward = cluster.as_ref().map(|c| c.forward.clone());
        let fcfg = frontend_config(cfg, security, shards, view, forward)?;
        let common = FrontendCommon {
            bind: cfg.network.bind_addr,
            router,
            fcfg,
            seq: sinks.seq,
            watching: sinks.watching,
            shared,
            compactor,
            active,
        };
        let (frontend_parts, handshake) = frontend_parts(sinks.hub_rxs, peers, common, frontends);
        let start = Start {
            shards,
            frontends,
            shard_ready: sinks.shard_ready,
            go: handshake.go,
            frontend_ready: handshake.ready,
            shutdown_tx: handshake.shutdown,
        };
        Ok(Wiring {
            shards: shard_parts,
            frontends: frontend_parts,
            start,
        })
    }
}

/// Each shard's recovered engine and WAL position with what it resumes
/// from (its undone batch parts, snapshot start, records ever written).
fn shard_recoveries(
    engines: Vec<(rstmdb_shards::engine::Engine, rstmdb_wal::Recovered)>,
    aborted: Vec<Vec<String>>,
    snapshot_starts: Vec<Option<u64>>,
    records_ever: Vec<u64>,
) -> Vec<ShardRecovery> {
    engines
        .into_iter()
        .zip(aborted)
        .zip(snapshot_starts)
        .zip(records_ever)
        .map(
            |((((engine, wal), aborted), snapshot_start), records_ever)| ShardRecovery {
                engine,
                wal,
                resume: shard::Resume {
                    aborted_batches: aborted,
                    snapshot_start,
                    records_ever,
                },
            },
        )
        .collect()
}

/// The offset sequencer, one hub channel per frontend (the shards' event
/// sink), and the channel each shard says it is ready on.
struct Sinks {
    seq: Sequencer,
    watching: Arc<std::sync::atomic::AtomicBool>,
    hub_rxs: Vec<flume::Receiver<shard::HubMsg>>,
    events: shard::EventSink,
    shard_ready_tx: std::sync::mpsc::Sender<Result<(), String>>,
    shard_ready: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Sinks {
    /// The sequencer resumes at the first offset no shard has used.
    fn new(next_offset: u64, shards: usize, frontends: usize) -> Sinks {
        let seq = Sequencer::new(next_offset, shards);
        let watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (hub_txs, hub_rxs): (Vec<_>, Vec<_>) = (0..frontends)
            .map(|_| flume::unbounded::<shard::HubMsg>())
            .unzip();
        let (shard_ready_tx, shard_ready) = std::sync::mpsc::channel();
        let events = shard::EventSink {
            watching: watching.clone(),
            tx: hub_txs,
        };
        Sinks {
            seq,
            watching,
            hub_rxs,
            events,
            shard_ready_tx,
            shard_ready,
        }
    }
}

/// The subscriptions' shared state (knowing every batch ever undone) and
/// the compactor working through the router.
fn compactor(
    cfg: &Config,
    data: &DataDir,
    router: &router::Router,
    aborted_ever: std::collections::HashSet<String>,
    manifest: crate::storage::datadir::Manifest,
) -> (Arc<subscriptions::Shared>, Arc<compaction::Compactor>) {
    let shared = Arc::new(subscriptions::Shared::default());
    shared.extend_aborted(aborted_ever);
    let compactor = Arc::new(compaction::Compactor::new(
        router.clone(),
        shared.clone(),
        compaction_settings(cfg),
        data.root().to_path_buf(),
        data.base().to_path_buf(),
        manifest,
    ));
    (shared, compactor)
}

/// Where metrics are on, the endpoint, serving from now on: it holds the
/// shards' senders weakly, so it does not keep them running.
fn serve_metrics(
    cfg: &Config,
    security: &Security,
    weak_senders: Vec<flume::WeakSender<ShardMsg>>,
    active: &Arc<std::sync::atomic::AtomicUsize>,
    cluster: Option<&crate::cluster::ClusterWiring>,
) -> Result<(), String> {
    if let Some(handle) = &security.prometheus {
        let view = cluster.map(|c| c.view.clone());
        let collector = telemetry::Collector::new(weak_senders, active.clone(), view);
        let addr = telemetry::serve(cfg.metrics.bind_addr, handle.clone(), collector)?;
        tracing::info!(%addr, "metrics endpoint listening (/metrics, /health, /healthz)");
    }
    Ok(())
}

/// What every frontend gets alike.
#[derive(Clone)]
struct FrontendCommon {
    bind: std::net::SocketAddr,
    router: router::Router,
    fcfg: server::FrontendConfig,
    seq: Sequencer,
    watching: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<subscriptions::Shared>,
    compactor: Arc<compaction::Compactor>,
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// The main thread's ends of the frontends' start-up handshake.
struct Handshake {
    go: flume::Sender<()>,
    shutdown: flume::Sender<()>,
    ready: std::sync::mpsc::Receiver<Result<std::net::SocketAddr, String>>,
}

/// Each frontend's part, one per hub channel, and the main thread's ends
/// of the channels that release, stop and hear from them.
fn frontend_parts(
    hub_rxs: Vec<flume::Receiver<shard::HubMsg>>,
    mut peers: Option<(crate::cluster::PeerPart, flume::WeakSender<ShardMsg>)>,
    common: FrontendCommon,
    frontends: usize,
) -> (Vec<FrontendPart>, Handshake) {
    let (go_tx, go) = flume::bounded::<()>(frontends);
    let (shutdown_tx, shutdown) = flume::bounded::<()>(1);
    let (frontend_ready_tx, frontend_ready) = std::sync::mpsc::channel();
    let parts = hub_rxs
        .into_iter()
        .enumerate()
        .map(|(index, hub_rx)| FrontendPart {
            index,
            peers: peers.take(),
            hub_rx,
            common: common.clone(),
            go: go.clone(),
            shutdown: shutdown.clone(),
            ready: frontend_ready_tx.clone(),
        })
        .collect();
    let handshake = Handshake {
        go: go_tx,
        shutdown: shutdown_tx,
        ready: frontend_ready,
    };
    (parts, handshake)
}

/// What every shard gets alike.
struct ShardCommon {
    seq: Sequencer,
    events: shard::EventSink,
    /// Where each shard says it serves (or why not).
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    /// Cluster mode: the group settings (one shard, one group).
    cluster: Option<shard::ClusterShardConfig>,
}

/// What recovery left for one shard.
struct ShardRecovery {
    engine: rstmdb_shards::engine::Engine,
    wal: rstmdb_wal::Recovered,
    resume: shard::Resume,
}

/// Each shard's part (its recovered engine, WAL position and settings) and
/// the senders of the shards' inbound channels, in shard order.
fn shard_parts(
    cfg: &Config,
    data: &DataDir,
    storage: &StorageSettings,
    recovered: Vec<ShardRecovery>,
    common: ShardCommon,
) -> (Vec<flume::Sender<ShardMsg>>, Vec<ShardPart>) {
    let ShardCommon {
        seq,
        events,
        ready,
        cluster,
    } = common;
    let policy = fsync_policy(cfg.storage.fsync_policy);
    recovered
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (tx, rx) = flume::bounded::<ShardMsg>(SHARD_CHANNEL_BATCHES);
            let part = ShardPart {
                cfg: ShardConfig {
                    id: i,
                    wal: WriterConfig {
                        dir: data.wal_dir(i),
                        shard: i as u32,
                        segment_size: storage.segment_size,
                        // A cluster node's WAL is written at apply, from
                        // the group's log, which is the durable copy.
                        mode: if cluster.is_some() {
                            rstmdb_wal::WriteMode::PageCache
                        } else {
                            policy.write_mode()
                        },
                    },
                    fsync: policy,
                    max_drain_commands: MAX_DRAIN_COMMANDS,
                    events: events.clone(),
                    snapshot_dir: data.snapshot_dir(i),
                    cluster: cluster.clone(),
                },
                engine: r.engine,
                recovered: r.wal,
                rx,
                seq: seq.clone(),
                resume: r.resume,
                ready: ready.clone(),
            };
            (tx, part)
        })
        .unzip()
}

/// What every frontend runs with: operation settings, limits, TLS, request
/// metrics and the housekeeping ticker.
fn frontend_config(
    cfg: &Config,
    security: Security,
    shards: usize,
    cluster: Option<replication_status::ClusterView>,
    forward: Option<crate::net::forward::Forwarder>,
) -> Result<server::FrontendConfig, String> {
    Ok(server::FrontendConfig {
        ops: ops::OpSettings {
            max_machine_versions: cfg.storage.max_machine_versions,
            allow_instance_recreate: cfg.storage.allow_instance_recreate,
            allow_flush_all: cfg.storage.allow_flush_all,
            shards,
            auth: security.authenticator,
            cluster,
        },
        max_connections: cfg.network.max_connections,
        idle_timeout: cfg.network.idle_timeout(),
        tls: security.tls,
        forward,
        metrics: security.request_metrics,
        ticker: Ticker::start().map_err(|e| format!("starting the ticker thread: {e}"))?,
    })
}

fn compaction_settings(cfg: &Config) -> compaction::Settings {
    compaction::Settings {
        auto: cfg.compaction.enabled,
        events_threshold: cfg.compaction.events_threshold,
        size_threshold_bytes: cfg.compaction.size_threshold_mb * 1024 * 1024,
        min_interval: Duration::from_secs(cfg.compaction.min_interval_secs),
        retention: Duration::from_secs(cfg.compaction.wal_retention_secs),
        keep_snapshots: cfg.compaction.keep_snapshots.max(1),
    }
}

type ExecutorHandle = glommio::ExecutorJoinHandle<Result<(), String>>;

/// One pinned executor per role of the layout, each running its shard task
/// and its frontend, whichever it has.
fn start_executors(
    cfg: &Config,
    roles: &[layout::Role],
    shard_parts: Vec<ShardPart>,
    frontend_parts: Vec<FrontendPart>,
) -> Result<Vec<(String, ExecutorHandle)>, String> {
    let cpus: Vec<usize> = glommio::CpuSet::online()
        .map(|set| set.into_iter().map(|l| l.cpu).collect())
        .unwrap_or_else(|_| vec![0]);
    let mut shard_parts: Vec<Option<ShardPart>> = shard_parts.into_iter().map(Some).collect();
    let mut frontend_parts: Vec<Option<FrontendPart>> =
        frontend_parts.into_iter().map(Some).collect();
    let mut handles = Vec::with_capacity(roles.len());
    for role in roles {
        let shard = role.shard.and_then(|i| shard_parts[i].take());
        let frontend = role.frontend.and_then(|i| frontend_parts[i].take());
        let name = role.name();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpus[role.slot % cpus.len()]))
            .name(&name)
            .io_memory(cfg.server.io_memory_kib * 1024)
            .spin_before_park(Duration::from_micros(cfg.server.spin_before_park_us))
            .spawn(move || executor_main(shard, frontend))
            .map_err(|e| executor_error(&format!("starting executor {name}"), e))?;
        handles.push((name, handle));
    }
    Ok(handles)
}

/// An executor's life: its shard as a task of its own, its frontend until
/// shutdown, then the shard until every sender to it is gone.
async fn executor_main(
    shard: Option<ShardPart>,
    frontend: Option<FrontendPart>,
) -> Result<(), String> {
    let shard = shard.map(|p| glommio::spawn_local(run_shard(p)));
    if let Some(f) = frontend {
        run_frontend(f).await;
    }
    match shard {
        Some(task) => task.await,
        None => Ok(()),
    }
}

async fn run_shard(p: ShardPart) -> Result<(), String> {
    let id = p.cfg.id;
    shard::run(p.cfg, p.engine, p.recovered, p.rx, p.seq, p.resume, p.ready)
        .await
        .map_err(|e| format!("shard {id}: {e}"))
}

/// Waits for the go, listens, serves until shutdown (with automatic
/// compaction on the first frontend), then lets a running round finish.
async fn run_frontend(f: FrontendPart) {
    if f.go.recv_async().await.is_err() {
        return; // start-up failed elsewhere
    }
    let listener = match listen::listener(f.common.bind) {
        Ok(l) => l,
        Err(e) => {
            let _ = f
                .ready
                .send(Err(format!("cannot listen on {}: {e}", f.common.bind)));
            return;
        }
    };
    // Tunnels from followers come in through the peer listener.
    let (tunnel_tx, tunnel_rx) = flume::bounded(64);
    if let Some((peers, shard)) = f.peers {
        if let Err(e) = peers.spawn(shard, tunnel_tx) {
            let _ = f.ready.send(Err(e));
            return;
        }
    }
    let _ = f
        .ready
        .send(Ok(listener.local_addr().unwrap_or(f.common.bind)));
    drop(f.ready);
    let hub = subscriptions::Hub::new(f.common.seq, f.common.watching, f.common.shared);
    let hub = std::rc::Rc::new(std::cell::RefCell::new(hub));
    glommio::spawn_local(subscriptions::run_hub(hub.clone(), f.hub_rx)).detach();
    let (auto_stop_tx, auto_stop_rx) = flume::bounded::<()>(1);
    let auto = (f.index == 0).then(|| {
        let ticks = f.common.fcfg.ticker.every(compaction::AUTO_CHECK_EVERY);
        glommio::spawn_local(f.common.compactor.clone().run_auto(auto_stop_rx, ticks))
    });
    let inbound = server::Inbound {
        clients: listener,
        tunnels: tunnel_rx,
    };
    server::serve(
        inbound,
        f.common.router,
        hub,
        f.common.compactor,
        f.common.fcfg,
        f.shutdown,
        f.common.active,
    )
    .await;
    // Then nothing of ours holds the shards' channels, and they stop.
    drop(auto_stop_tx);
    if let Some(auto) = auto {
        auto.await;
    }
}

/// The first SIGINT/SIGTERM starts a graceful shutdown, a second exits at
/// once.
fn watch_signals(shutdown_tx: flume::Sender<()>) -> Result<(), String> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // Dropped at the first signal: every frontend sees it.
            let mut shutdown_tx = Some(shutdown_tx);
            for sig in signals.forever() {
                if shutdown_tx.take().is_some() {
                    tracing::info!(
                        signal = sig,
                        "shutting down: no new connections, finishing in-flight requests"
                    );
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting immediately");
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    Ok(())
}

/// Waits for every executor; the first failure is the outcome.
fn join_executors(executors: Vec<(String, ExecutorHandle)>) -> Result<(), String> {
    let mut failed = None;
    for (name, handle) in executors {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(format!("executor {name} failed: {e}"))),
        }
    }
    failed.map_or(Ok(()), Err)
}

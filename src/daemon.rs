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
use crate::datadir::DataDir;
use crate::{
    auth, compaction, config, listen, ops, recover, reshard, router, server, subscriptions,
    telemetry, tls, wal_tool,
};

/// Bound of each shard's inbound channel (batches, not requests): a full
/// channel makes frontends wait, which is the backpressure we want.
const SHARD_CHANNEL_BATCHES: usize = 4096;
/// Most commands one group commit executes.
const MAX_DRAIN_COMMANDS: usize = 8192;

/// The `rstmdb` command: the server, or one of the offline tools.
pub fn main() -> ExitCode {
    let cli = config::Cli::parse();
    if let Some(config::Command::Wal(cmd)) = &cli.command {
        return wal_tool::run(cmd);
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

fn run(cfg: Config) -> Result<(), String> {
    // Before recovery: a start refused for its address costs no recovery.
    listen::check_free(cfg.network.bind_addr, "network.bind_addr").map_err(|e| e.to_string())?;
    if cfg.metrics.enabled {
        listen::check_free(cfg.metrics.bind_addr, "metrics.bind_addr")
            .map_err(|e| e.to_string())?;
    }
    let token_hashes = cfg.auth.load_token_hashes().map_err(|e| e.to_string())?;
    let authenticator = Arc::new(auth::Authenticator::new(cfg.auth.required, &token_hashes));
    // Before any executor starts: instruments made earlier stay no-ops.
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
    let shards = cfg.server.shard_count();
    let mut data = DataDir::open(&cfg.storage.data_dir, shards).map_err(|e| e.to_string())?;
    let segment_size = cfg.storage.wal_segment_size_mb * 1024 * 1024;
    let limits = EngineLimits {
        idempotency_entries: cfg.storage.idempotency_window,
        idempotency_max_age_ms: cfg
            .storage
            .idempotency_max_age()
            .map_or(0, |d| d.as_millis() as i64),
    };

    if data.shards() != shards {
        reshard::reshard(&mut data, shards, &limits, segment_size)?;
    }
    let recover::Recovery {
        shards: recovered,
        snapshot_starts,
        records_ever,
        aborted,
        aborted_ever,
        next_offset,
        manifest,
    } = recover::recover_all(&data, shards, &limits, segment_size)?;
    let seq = Sequencer::new(next_offset, shards);

    // Executors: the frontends on the first CPUs, shards on the following ones,
    // wrapping around when there are more executors than CPUs.
    let cpus: Vec<usize> = glommio::CpuSet::online()
        .map(|set| set.into_iter().map(|l| l.cpu).collect())
        .unwrap_or_else(|_| vec![0]);
    let cpu_for = |i: usize| cpus[i % cpus.len()];
    let io_memory = cfg.server.io_memory_kib * 1024;
    let spin = Duration::from_micros(cfg.server.spin_before_park_us);

    let watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let frontends = cfg.server.frontends;
    let (hub_txs, hub_rxs): (Vec<_>, Vec<_>) = (0..frontends)
        .map(|_| flume::unbounded::<shard::HubMsg>())
        .unzip();
    let mut senders = Vec::with_capacity(shards);
    let mut shard_handles = Vec::with_capacity(shards);
    let (shard_ready_tx, shard_ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for (i, ((((engine, rec), aborted), snapshot_start), records_ever)) in recovered
        .into_iter()
        .zip(aborted)
        .zip(snapshot_starts)
        .zip(records_ever)
        .enumerate()
    {
        let (tx, rx) = flume::bounded::<ShardMsg>(SHARD_CHANNEL_BATCHES);
        senders.push(tx);
        let scfg = ShardConfig {
            id: i,
            wal: WriterConfig {
                dir: data.wal_dir(i),
                shard: i as u32,
                segment_size,
            },
            fsync: fsync_policy(cfg.storage.fsync_policy),
            max_drain_commands: MAX_DRAIN_COMMANDS,
            events: shard::EventSink {
                watching: watching.clone(),
                tx: hub_txs.clone(),
            },
            snapshot_dir: data.snapshot_dir(i),
        };
        let seq = seq.clone();
        let ready = shard_ready_tx.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu_for(i + frontends)))
            .name(&format!("shard-{i}"))
            .io_memory(io_memory)
            .spin_before_park(spin)
            .spawn(move || async move {
                {
                    let resume = shard::Resume {
                        aborted_batches: aborted,
                        snapshot_start,
                        records_ever,
                    };
                    shard::run(scfg, engine, rec, rx, seq, resume, ready).await
                }
            })
            .map_err(|e| executor_error(&format!("starting shard {i} executor"), e))?;
        shard_handles.push(handle);
    }
    drop(shard_ready_tx);
    for _ in 0..shards {
        match shard_ready_rx.recv() {
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

    let (shutdown_tx, shutdown_rx) = flume::bounded::<()>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<std::net::SocketAddr, String>>();
    let bind = cfg.network.bind_addr;
    let fcfg = server::FrontendConfig {
        ops: ops::OpSettings {
            max_machine_versions: cfg.storage.max_machine_versions,
            allow_instance_recreate: cfg.storage.allow_instance_recreate,
            allow_flush_all: cfg.storage.allow_flush_all,
            shards,
            auth: authenticator,
        },
        max_connections: cfg.network.max_connections,
        idle_timeout: cfg.network.idle_timeout(),
        tls,
        metrics: request_metrics,
    };
    drop(hub_txs);
    let weak_senders: Vec<_> = senders.iter().map(|s| s.downgrade()).collect();
    let router = router::Router::new(senders, seq.clone());
    let compaction_settings = compaction::Settings {
        auto: cfg.compaction.enabled,
        events_threshold: cfg.compaction.events_threshold,
        size_threshold_bytes: cfg.compaction.size_threshold_mb * 1024 * 1024,
        min_interval: Duration::from_secs(cfg.compaction.min_interval_secs),
        retention: Duration::from_secs(cfg.compaction.wal_retention_secs),
        keep_snapshots: cfg.compaction.keep_snapshots.max(1),
    };
    let shared = Arc::new(subscriptions::Shared::default());
    shared.extend_aborted(aborted_ever);
    let compactor = Arc::new(compaction::Compactor::new(
        router.clone(),
        shared.clone(),
        compaction_settings,
        data.root().to_path_buf(),
        data.base().to_path_buf(),
        manifest,
    ));
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if let Some(handle) = prometheus {
        let collector = telemetry::Collector::new(weak_senders, active.clone());
        let addr = telemetry::serve(cfg.metrics.bind_addr, handle, collector)?;
        tracing::info!(%addr, "metrics endpoint listening (/metrics, /health, /healthz)");
    }
    // Frontends: each binds the client address (SO_REUSEPORT, so the kernel
    // spreads connections over them) and has its own subscription hub.
    let mut frontend_handles = Vec::with_capacity(frontends);
    for (f, hub_rx) in hub_rxs.into_iter().enumerate() {
        let (ready_tx, router, fcfg, shutdown_rx) = (
            ready_tx.clone(),
            router.clone(),
            fcfg.clone(),
            shutdown_rx.clone(),
        );
        let (seq, watching, shared, compactor, active) = (
            seq.clone(),
            watching.clone(),
            shared.clone(),
            compactor.clone(),
            active.clone(),
        );
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu_for(f)))
            .name(&format!("frontend-{f}"))
            .io_memory(io_memory)
            .spin_before_park(spin)
            .spawn(move || async move {
                let listener = match listen::listener(bind) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot listen on {bind}: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(listener.local_addr().unwrap_or(bind)));
                drop(ready_tx);
                let hub = subscriptions::Hub::new(seq, watching, shared);
                let hub = std::rc::Rc::new(std::cell::RefCell::new(hub));
                glommio::spawn_local(subscriptions::run_hub(hub.clone(), hub_rx)).detach();
                // Automatic compaction runs on the first frontend.
                let (auto_stop_tx, auto_stop_rx) = flume::bounded::<()>(1);
                let auto = (f == 0)
                    .then(|| glommio::spawn_local(compactor.clone().run_auto(auto_stop_rx)));
                server::serve(listener, router, hub, compactor, fcfg, shutdown_rx, active).await;
                // Let a running round finish; then nothing holds the shards'
                // channels and they stop.
                drop(auto_stop_tx);
                if let Some(auto) = auto {
                    auto.await;
                }
            })
            .map_err(|e| executor_error(&format!("starting frontend executor {f}"), e))?;
        frontend_handles.push(handle);
    }
    drop((ready_tx, router, compactor, shutdown_rx));

    for _ in 0..frontends {
        match ready_rx.recv() {
            Ok(Ok(addr)) => {
                tracing::debug!(%addr, "frontend listening");
            }
            Ok(Err(e)) => {
                drop(shutdown_tx);
                for h in frontend_handles {
                    let _ = h.join();
                }
                return Err(e);
            }
            Err(_) => {
                return Err(executor_error(
                    "a frontend executor exited during start-up",
                    "its io_uring could not be set up",
                ))
            }
        }
    }
    tracing::info!(addr = %bind, shards, frontends, data_dir = %cfg.storage.data_dir.display(), "rstmdb listening");

    // Signals: the first starts a graceful shutdown, a second exits at once.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            // Dropped at the first signal: every frontend sees it.
            let mut shutdown_tx = Some(shutdown_tx);
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = sig,
                        "shutting down: no new connections, finishing in-flight requests"
                    );
                    drop(shutdown_tx.take());
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting immediately");
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;

    for (f, h) in frontend_handles.into_iter().enumerate() {
        h.join()
            .map_err(|e| format!("frontend executor {f} failed: {e}"))?;
    }
    let mut failed = None;
    for (i, h) in shard_handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(format!("shard {i}: {e}")),
            Err(e) => failed = Some(format!("shard {i} executor failed: {e}")),
        }
    }
    drop(data);
    std::thread::sleep(Duration::from_millis(1));
    match failed {
        None => {
            tracing::info!("shutdown complete");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

//! Server configuration: the `Config` tree, how it is loaded and how it is
//! checked before anything starts.
//!
//! Layers, each overriding the one before (spec/CLI.md Part B, plus our
//! command-line flags, DECISIONS.md "Identity"):
//!
//! 1. built-in defaults ([`Config::default`], identical to
//!    `config/default.yaml`, see [`EMBEDDED_DEFAULT`]);
//! 2. a YAML file named by `--config`, else by `RSTMDB_CONFIG`. A missing or
//!    unparsable file is an error; unknown keys are ignored (reference
//!    behaviour: old configs carry `logging:` etc.); a known key with a value
//!    of the wrong type is an error naming the key;
//! 3. `RSTMDB_*` environment variables (spec/CLI.md B3, plus `RSTMDB_SHARDS`,
//!    `RSTMDB_FRONTENDS`, `RSTMDB_IO_MEMORY_KIB`, `RSTMDB_IDEMPOTENCY_WINDOW`
//!    and `RSTMDB_IDEMPOTENCY_MAX_AGE_SECS`), read through an injected
//!    lookup so tests never touch the process environment. Values
//!    that cannot be parsed are ignored as the reference does, but each one
//!    leaves a line in [`Config::warnings`] for the caller to log;
//! 4. command-line flags ([`Cli`]).
//!
//! [`load`] runs all layers and then [`Config::validate`], so a `Config` it
//! returns is safe to start with. Keys the reference has are spelled and
//! defaulted as in the reference so its config files keep working; the
//! `server:` section and the idempotency keys are our own.

pub mod cluster;
pub mod layout;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::config::layout::Layout;
use serde::de::{self, Deserializer, EnumAccess, MapAccess, VariantAccess, Visitor};
use serde::Deserialize;

/// The commented default configuration, byte for byte `config/default.yaml`.
/// Parsing it yields exactly [`Config::default()`] (a unit test holds the two
/// together), so it can be printed as a starting point for operators
/// (`rstmdb --print-default-config`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.yaml");

/// Largest accepted `storage.wal_segment_size_mb` (4 GiB). Segments are
/// preallocated, so a typo like `65536` would otherwise try to reserve 64 GiB
/// per shard at start-up.
pub const MAX_WAL_SEGMENT_SIZE_MB: u64 = 4096;

/// Largest accepted frontend count.
pub const MAX_FRONTENDS: usize = 64;

/// Largest accepted shard count. Each shard is a pinned executor with its own
/// WAL directory; more than this is certainly a typo.
pub const MAX_SHARDS: usize = 256;

/// The N that `RSTMDB_FSYNC_POLICY=every_n:<bad>` / `every_ms:<bad>` falls back
/// to, as in the reference.
pub const ENV_FSYNC_FALLBACK_N: u64 = 100;

/// Every environment variable [`load`] reads, in the order it reads them
/// (`RSTMDB_CONFIG` first, to find the file). A test holds this list, the
/// env layer and `config/default.yaml` together.
#[cfg(test)]
const ENV_VARS: &[&str] = &[
    "RSTMDB_CONFIG",
    "RSTMDB_SHARDS",
    "RSTMDB_FRONTENDS",
    "RSTMDB_LAYOUT",
    "RSTMDB_IO_MEMORY_KIB",
    "RSTMDB_SPIN_BEFORE_PARK_US",
    "RSTMDB_BIND",
    "RSTMDB_IDLE_TIMEOUT",
    "RSTMDB_MAX_CONNECTIONS",
    "RSTMDB_DATA",
    "RSTMDB_WAL_SEGMENT_SIZE_MB",
    "RSTMDB_FSYNC_POLICY",
    "RSTMDB_MAX_MACHINE_VERSIONS",
    "RSTMDB_ALLOW_INSTANCE_RECREATE",
    "RSTMDB_ALLOW_FLUSH_ALL",
    "RSTMDB_IDEMPOTENCY_WINDOW",
    "RSTMDB_IDEMPOTENCY_MAX_AGE_SECS",
    "RSTMDB_COMPACT_ENABLED",
    "RSTMDB_COMPACT_EVENTS",
    "RSTMDB_COMPACT_SIZE_MB",
    "RSTMDB_COMPACT_INTERVAL",
    "RSTMDB_COMPACT_RETENTION_SECS",
    "RSTMDB_COMPACT_KEEP_SNAPSHOTS",
    "RSTMDB_AUTH_REQUIRED",
    "RSTMDB_AUTH_TOKEN_HASH",
    "RSTMDB_AUTH_SECRETS_FILE",
    "RSTMDB_TLS_ENABLED",
    "RSTMDB_TLS_CERT",
    "RSTMDB_TLS_KEY",
    "RSTMDB_TLS_REQUIRE_CLIENT_CERT",
    "RSTMDB_TLS_CLIENT_CA",
    "RSTMDB_METRICS_ENABLED",
    "RSTMDB_METRICS_BIND",
    "RSTMDB_REPL_ROLE",
    "RSTMDB_REPL_MODE",
    "RSTMDB_REPL_UPSTREAM",
    "RSTMDB_REPL_SYNC_REPLICAS",
    "RSTMDB_REPL_SYNC_TIMEOUT_MS",
    "RSTMDB_REPL_AUTH_TOKEN",
    "RSTMDB_REPL_AUTH_TOKEN_HASH",
    "RSTMDB_REPL_AUTH_SECRETS_FILE",
    "RSTMDB_REPL_POLL_INTERVAL_MS",
    "RSTMDB_REPL_HEARTBEAT_INTERVAL_SECS",
    "RSTMDB_REPL_RECONNECT_DELAY_SECS",
    "RSTMDB_REPL_RECONNECT_MAX_DELAY_SECS",
    "RSTMDB_REPL_LAG_CHECK_INTERVAL_SECS",
    "RSTMDB_REPL_TLS_ENABLED",
    "RSTMDB_REPL_TLS_CA",
    "RSTMDB_REPL_TLS_INSECURE",
    "RSTMDB_CLUSTER_NODE_ID",
    "RSTMDB_CLUSTER_PEERS",
    "RSTMDB_CLUSTER_BIND",
];

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Command-line flags of the `rstmdb` daemon. The reference binary takes none;
/// ours accepts these (DECISIONS.md "Identity"). Every flag is optional and,
/// when given, beats the environment and the config file.
#[derive(Debug, Clone, Default, PartialEq, clap::Parser)]
#[command(
    name = "rstmdb",
    version,
    about = "Thread-per-core state-machine database server (wire-compatible with rstmdb 0.3.0)",
    after_help = "Configuration precedence: built-in defaults < YAML file (--config, else \
                  RSTMDB_CONFIG) < RSTMDB_* environment variables < flags.\n\
                  Run with --print-default-config for a commented file listing every key \
                  and its environment variable. Log filter: RUST_LOG (default info)."
)]
pub struct Cli {
    /// YAML config file to load (takes precedence over RSTMDB_CONFIG).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Client listener address, ip:port (network.bind_addr, RSTMDB_BIND).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<SocketAddr>,

    /// Data directory (storage.data_dir, RSTMDB_DATA).
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,

    /// Number of shard executors, 1-256 (server.shards, RSTMDB_SHARDS;
    /// default: available cores minus one, at least 1).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,

    /// WAL fsync policy: every_write, never, every_n:N or every_ms:N
    /// (storage.fsync_policy, RSTMDB_FSYNC_POLICY).
    #[arg(long, value_name = "POLICY")]
    pub fsync_policy: Option<FsyncPolicy>,

    /// WAL segment size in MiB, 1-4096 (storage.wal_segment_size_mb,
    /// RSTMDB_WAL_SEGMENT_SIZE_MB).
    #[arg(long, value_name = "MIB")]
    pub wal_segment_size_mb: Option<u64>,

    /// Print the commented default configuration (YAML) and exit.
    #[arg(long)]
    pub print_default_config: bool,

    /// Write a development CA, a server certificate for 127.0.0.1 and
    /// localhost, and a client certificate (mTLS) into DIR, then exit.
    /// For local TLS trials only.
    #[arg(long, value_name = "DIR")]
    pub gen_dev_certs: Option<PathBuf>,

    /// An offline tool instead of the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The offline tools (`rstmdb wal …`).
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum Command {
    /// Check, repair or print the write-ahead log and snapshots of a data
    /// directory (offline; see README, "Offline WAL tools").
    #[command(subcommand)]
    Wal(WalCommand),
    /// Look at or steer a running cluster through one of its nodes (see
    /// README, "Replicated cluster").
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `rstmdb cluster …`: RCP requests to a running node.
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum ClusterCommand {
    /// Print the node's view of the cluster (REPLICATION_STATUS) as JSON.
    Status {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Hand the leadership to node `--to` (default: the follower furthest
    /// along) and print the new leader; any node forwards it to the leader.
    TransferLeader {
        #[command(flatten)]
        server: ServerArgs,
        /// The node to lead.
        #[arg(long, value_name = "NODE_ID")]
        to: Option<u64>,
    },
}

/// Which node to ask, and how.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ServerArgs {
    /// The node's client address.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7401")]
    pub server: String,
    /// Bearer token, sent with AUTH when given.
    #[arg(long, env = "RSTMDB_TOKEN")]
    pub token: Option<String>,
}

/// `rstmdb wal …`.
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum WalCommand {
    /// Check every WAL segment and snapshot the way start-up reads them,
    /// changing nothing; name the first bad record of each shard with its
    /// file and byte position. Exit status: 0 intact, 1 damage found, 2 the
    /// directory could not be examined.
    Verify {
        /// The data directory (storage.data_dir).
        data_dir: PathBuf,
        /// Cut a damaged WAL at its first bad record (DECISIONS D14),
        /// after copying the affected segments into
        /// DATA_DIR/repair-<ms>/. Discards every record after the damage.
        /// Refused while a server holds the directory.
        #[arg(long)]
        repair: bool,
    },
    /// Print WAL records as JSON lines, in offset order across shards.
    Dump {
        /// The data directory (storage.data_dir).
        data_dir: PathBuf,
        /// First WAL offset to print.
        #[arg(long, value_name = "OFFSET", default_value_t = 0)]
        from: u64,
        /// Most records to print.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Only this shard's records.
        #[arg(long, value_name = "N")]
        shard: Option<usize>,
    },
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a configuration could not be loaded or is unusable. Every message names
/// the file or key at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file (or a file it names) could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file is for ("config file", "auth.secrets_file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The config file is not valid YAML or a key has a value of the wrong
    /// type; the YAML error starts with the key path (`storage.fsync_policy: …`)
    /// and ends with the line and column.
    #[error("invalid config file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error.
        #[source]
        source: serde_yaml_ng::Error,
    },

    /// A value is out of range or conflicts with another one.
    #[error("{message}")]
    Invalid {
        /// The key at fault (`storage.wal_segment_size_mb`), for callers and
        /// tests that want to tell errors apart without matching text.
        key: &'static str,
        /// What is wrong and how to fix it; names the key itself.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Fsync policy
// ---------------------------------------------------------------------------

/// When a shard's WAL is `fdatasync`ed after a group-commit write
/// (`storage.fsync_policy`). The policy decides how much acknowledged data a
/// power loss can take; a process crash alone loses nothing under any policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Sync every group-commit batch before its replies leave: every
    /// acknowledged write survives power loss. Group commit keeps this fast.
    /// The default.
    #[default]
    EveryWrite,
    /// Sync after every N written records (N ≥ 1): up to N−1 acknowledged
    /// records are at risk.
    EveryN(u64),
    /// Sync on a timer every N milliseconds (N ≥ 1) when there are unsynced
    /// writes: at most N ms of acknowledged writes are at risk. Unlike the
    /// reference this really syncs (DECISIONS.md D13).
    EveryMs(u64),
    /// Never sync while running (only on clean shutdown): fastest, for tests
    /// and throw-away data.
    Never,
}

impl FsyncPolicy {
    fn from_parts(kind: &str, n: Option<u64>) -> Result<Self, String> {
        let kind = kind.trim().to_ascii_lowercase();
        match (kind.as_str(), n) {
            ("every_write" | "everywrite", None) => Ok(Self::EveryWrite),
            ("never", None) => Ok(Self::Never),
            ("every_n", Some(0)) => Err(
                "fsync policy every_n needs N >= 1 (0 would never sync; use never for that)".into(),
            ),
            ("every_ms", Some(0)) => Err(
                "fsync policy every_ms needs N >= 1 milliseconds (use every_write to sync every write)"
                    .into(),
            ),
            ("every_n", Some(n)) => Ok(Self::EveryN(n)),
            ("every_ms", Some(n)) => Ok(Self::EveryMs(n)),
            ("every_n" | "every_ms", None) => {
                Err(format!("fsync policy {kind} needs a number N >= 1"))
            }
            ("every_write" | "everywrite" | "never", Some(_)) => {
                Err(format!("fsync policy {kind} takes no number"))
            }
            _ => Err(format!(
                "unknown fsync policy '{kind}': expected every_write, never, every_n:N or every_ms:N"
            )),
        }
    }

    /// Lenient parse for `RSTMDB_FSYNC_POLICY`, matching the reference: a bad N
    /// becomes [`ENV_FSYNC_FALLBACK_N`], anything unrecognised becomes
    /// `every_write` (the safe choice). The second value is a warning to log
    /// when the input was not taken as written. `every_n:0` is kept so that
    /// validation reports it instead of silently changing it.
    fn from_env(value: &str) -> (Self, Option<String>) {
        let v = value.trim().to_ascii_lowercase();
        match v.split_once(':') {
            Some((kind @ ("every_n" | "every_ms"), n)) => match n.trim().parse::<u64>() {
                Ok(n) if kind == "every_n" => (Self::EveryN(n), None),
                Ok(n) => (Self::EveryMs(n), None),
                Err(_) => {
                    let policy = if kind == "every_n" {
                        Self::EveryN(ENV_FSYNC_FALLBACK_N)
                    } else {
                        Self::EveryMs(ENV_FSYNC_FALLBACK_N)
                    };
                    (
                        policy,
                        Some(format!(
                            "RSTMDB_FSYNC_POLICY={value:?}: '{n}' is not a number; using {policy}"
                        )),
                    )
                }
            },
            _ if v == "every_write" || v == "everywrite" => (Self::EveryWrite, None),
            _ if v == "never" => (Self::Never, None),
            _ => (
                Self::EveryWrite,
                Some(format!(
                    "RSTMDB_FSYNC_POLICY={value:?} is not every_write, never, every_n:N or \
                     every_ms:N; using every_write"
                )),
            ),
        }
    }
}

/// Strict parse used for `--fsync-policy`: `every_write` (or `everywrite`),
/// `never`, `every_n:N`, `every_ms:N` with N ≥ 1; case-insensitive.
impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((kind, n)) => {
                let n = n
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("fsync policy '{s}': '{n}' is not a number"))?;
                Self::from_parts(kind, Some(n))
            }
            None => Self::from_parts(s, None),
        }
    }
}

/// Writes the `--fsync-policy` / env form, which [`FromStr`] reads back.
impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EveryWrite => f.write_str("every_write"),
            Self::EveryN(n) => write!(f, "every_n:{n}"),
            Self::EveryMs(n) => write!(f, "every_ms:{n}"),
            Self::Never => f.write_str("never"),
        }
    }
}

/// YAML forms: `every_write`, `never`, the reference's tags `!every_n 100` /
/// `!every_ms 100`, the map form `{every_n: 100}` that the reference's docs
/// show (but 0.3.0 cannot parse), and the flag form `every_n:100`.
impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;

        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = FsyncPolicy;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an fsync policy: every_write, never, !every_n N or !every_ms N")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<FsyncPolicy, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<FsyncPolicy, A::Error> {
                let (kind, variant): (String, _) = data.variant()?;
                match kind.as_str() {
                    "every_n" | "every_ms" => {
                        let n: u64 = variant.newtype_variant()?;
                        FsyncPolicy::from_parts(&kind, Some(n)).map_err(de::Error::custom)
                    }
                    _ => {
                        variant.unit_variant()?;
                        FsyncPolicy::from_parts(&kind, None).map_err(de::Error::custom)
                    }
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FsyncPolicy, A::Error> {
                let Some((kind, n)) = map.next_entry::<String, u64>()? else {
                    return Err(de::Error::custom(
                        "empty fsync policy map: expected {every_n: N} or {every_ms: N}",
                    ));
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "fsync policy map must have exactly one key (every_n or every_ms)",
                    ));
                }
                if kind != "every_n" && kind != "every_ms" {
                    return Err(de::Error::custom(format!(
                        "unknown fsync policy '{kind}': the map form is {{every_n: N}} or {{every_ms: N}}"
                    )));
                }
                FsyncPolicy::from_parts(&kind, Some(n)).map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_any(PolicyVisitor)
    }
}

// ---------------------------------------------------------------------------
// Replication enums
// ---------------------------------------------------------------------------

/// `replication.role`. Only `standalone` runs today; the others are accepted
/// by the parser (so reference configs load) and rejected by validation with
/// a clear message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRole {
    /// No replication (default).
    #[default]
    Standalone,
    /// Streams its WAL to replicas (not supported yet).
    Primary,
    /// Follows an upstream primary (not supported yet).
    Replica,
}

impl FromStr for ReplicationRole {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "standalone" => Ok(Self::Standalone),
            "primary" => Ok(Self::Primary),
            "replica" => Ok(Self::Replica),
            _ => Err(()),
        }
    }
}

impl fmt::Display for ReplicationRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Standalone => "standalone",
            Self::Primary => "primary",
            Self::Replica => "replica",
        })
    }
}

/// `replication.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Acknowledge before replicas confirm (default).
    #[default]
    Async,
    /// Wait for `sync_replicas` replicas before acknowledging.
    Sync,
}

impl FromStr for ReplicationMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "async" => Ok(Self::Async),
            "sync" => Ok(Self::Sync),
            _ => Err(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------

/// The whole server configuration. Every section and key may be omitted and
/// then takes its default; `config/default.yaml` lists them all.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    /// Executor layout (our own section; the reference is not thread-per-core).
    pub server: ServerConfig,
    /// Client listener.
    pub network: NetworkConfig,
    /// Data directory, WAL and durability.
    pub storage: StorageConfig,
    /// Automatic snapshots and WAL truncation.
    pub compaction: CompactionConfig,
    /// Bearer-token authentication.
    pub auth: AuthConfig,
    /// TLS / mTLS on the client listener.
    pub tls: TlsConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Replication (parsed for compatibility; only `standalone` runs).
    pub replication: ReplicationConfig,
    /// Several nodes as one replicated database (ours).
    pub cluster: cluster::ClusterConfig,
    /// Environment values that were ignored or reinterpreted while loading,
    /// one readable line each. Not a config key: [`load`] fills it so `main`
    /// can log the lines once logging is up.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// The YAML file this configuration was read from, if any (for the
    /// start-up log). Not a config key.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// `server:` — how many executors run and how much I/O memory each gets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Number of shards (1–256), each with its own WAL on an executor pinned
    /// to a core. Default `null`: the available cores minus one, at least 1
    /// (the spare core is for the kernel's network work, the blocking pool
    /// and clients on the same machine; a 2-core machine runs 1 shard). The
    /// count is recorded in the data directory; changing it later is handled
    /// (or refused) by the storage layer, never silently.
    /// Env `RSTMDB_SHARDS`, flag `--shards`.
    pub shards: Option<usize>,
    /// Number of frontends (accept, TLS, framing, routing). Default `null`:
    /// one per shard executor with the colocated layout (every executor
    /// accepts: the kernel spreads connections over them with SO_REUSEPORT),
    /// 1 with the dedicated layout. Env `RSTMDB_FRONTENDS`.
    pub frontends: Option<usize>,
    /// glommio `io_memory` per executor in KiB (registered DMA buffer memory).
    /// Default 1024. glommio pins about 3 × this per executor as locked
    /// memory, so keep it within the memlock limit (systemd `LimitMEMLOCK=`)
    /// unless the process has CAP_IPC_LOCK. Env `RSTMDB_IO_MEMORY_KIB`.
    pub io_memory_kib: usize,
    /// Microseconds an idle executor keeps polling before it sleeps. A
    /// request crosses executors twice (frontend → shard → frontend); a
    /// sleeping executor takes tens of µs to wake, a spinning one a few.
    /// Costs CPU only while the server is busy enough to have just been
    /// working; on a machine whose cores are shared with the clients that
    /// CPU is taken from them (measured on 2 cores: no gain), so the
    /// default is 0 = sleep at once. Env `RSTMDB_SPIN_BEFORE_PARK_US`.
    pub spin_before_park_us: u64,
    /// `colocated` (default): every executor owns a shard and the first
    /// `frontends` of them also accept connections, so a request for a
    /// local shard never leaves its core; `dedicated`: frontends on
    /// executors of their own (see `src/layout.rs`). Env `RSTMDB_LAYOUT`.
    pub layout: Layout,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shards: None,
            layout: Layout::default(),
            frontends: None,
            io_memory_kib: 1024,
            spin_before_park_us: 0,
        }
    }
}

impl ServerConfig {
    /// The shard count to start: `shards` if set, else the CPUs this process
    /// may run on minus one (colocated) or minus the frontends (dedicated);
    /// at least 1, at most [`MAX_SHARDS`].
    pub fn shard_count(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.shard_count_for(cores)
    }

    /// [`Self::shard_count`] for a given number of available cores.
    pub fn shard_count_for(&self, cores: usize) -> usize {
        let spare = match self.layout {
            Layout::Colocated => cores.saturating_sub(1),
            Layout::Dedicated => cores.saturating_sub(self.frontends.unwrap_or(1)),
        };
        self.shards.unwrap_or_else(|| spare.clamp(1, MAX_SHARDS))
    }

    /// The frontend count to start: `frontends` if set, else one per shard
    /// (colocated, at most [`MAX_FRONTENDS`]) or 1 (dedicated).
    pub fn frontend_count(&self) -> usize {
        self.frontend_count_for(self.shard_count())
    }

    /// [`Self::frontend_count`] for a given shard count.
    pub fn frontend_count_for(&self, shards: usize) -> usize {
        self.frontends.unwrap_or(match self.layout {
            Layout::Colocated => shards.min(MAX_FRONTENDS),
            Layout::Dedicated => 1,
        })
    }
}

/// `network:` — the client listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// Address for client connections (RCP frames / JSONL, optionally TLS).
    /// Default `127.0.0.1:7401` (local only; the container image sets
    /// `RSTMDB_BIND=0.0.0.0:7401`). Env `RSTMDB_BIND`, flag `--bind`.
    pub bind_addr: SocketAddr,
    /// Close a client connection that has been idle this many seconds, so
    /// abandoned connections do not hold slots forever. Default 300;
    /// 0 = never. Honoured, unlike the reference (DECISIONS.md D18).
    /// Env `RSTMDB_IDLE_TIMEOUT`.
    pub idle_timeout_secs: u64,
    /// Maximum open client connections; further ones are closed without a
    /// byte, as the reference does at its hard-wired 1000. Default 1000, min 1.
    /// Honoured (D18). Env `RSTMDB_MAX_CONNECTIONS`.
    pub max_connections: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            bind_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7401),
            idle_timeout_secs: 300,
            max_connections: 1000,
        }
    }
}

impl NetworkConfig {
    /// The idle timeout, `None` when disabled (`idle_timeout_secs: 0`).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

/// `storage:` — where data lives and how durable writes are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// Data directory (per-shard WALs, snapshots, shard-count marker).
    /// Default `./data`, relative to the working directory.
    /// Env `RSTMDB_DATA`, flag `--data-dir`.
    pub data_dir: PathBuf,
    /// WAL segment size in MiB (1–4096). Segments are preallocated, so this is
    /// also the disk each shard reserves up front. Default 64.
    /// Env `RSTMDB_WAL_SEGMENT_SIZE_MB`, flag `--wal-segment-size-mb`.
    pub wal_segment_size_mb: u64,
    /// When the WAL is fsynced; see [`FsyncPolicy`]. Default `every_write`.
    /// Env `RSTMDB_FSYNC_POLICY`, flag `--fsync-policy`.
    pub fsync_policy: FsyncPolicy,
    /// Versions kept per machine name; registering one more is refused.
    /// Default 0 = unlimited. Env `RSTMDB_MAX_MACHINE_VERSIONS`.
    pub max_machine_versions: u32,
    /// Whether CREATE_INSTANCE may reuse the id of a deleted instance.
    /// Default true. Env `RSTMDB_ALLOW_INSTANCE_RECREATE`.
    pub allow_instance_recreate: bool,
    /// Whether the destructive FLUSH_ALL operation is accepted. Default false.
    /// Env `RSTMDB_ALLOW_FLUSH_ALL`.
    pub allow_flush_all: bool,
    /// Idempotency keys remembered per shard (oldest evicted first). The
    /// window survives restarts (D8); a retry older than the window is applied
    /// again. Default 100000, min 1 (idempotency cannot be switched off: the
    /// protocol advertises it). Env `RSTMDB_IDEMPOTENCY_WINDOW`.
    pub idempotency_window: usize,
    /// Idempotency keys older than this many seconds are forgotten even if the
    /// window has room. Default 86400 (one day); 0 = no age limit.
    /// Env `RSTMDB_IDEMPOTENCY_MAX_AGE_SECS`.
    pub idempotency_max_age_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            wal_segment_size_mb: 64,
            fsync_policy: FsyncPolicy::EveryWrite,
            max_machine_versions: 0,
            allow_instance_recreate: true,
            allow_flush_all: false,
            idempotency_window: 100_000,
            idempotency_max_age_secs: 86_400,
        }
    }
}

impl StorageConfig {
    /// The idempotency age limit, `None` when unlimited.
    pub fn idempotency_max_age(&self) -> Option<Duration> {
        (self.idempotency_max_age_secs > 0)
            .then(|| Duration::from_secs(self.idempotency_max_age_secs))
    }
}

/// `compaction:` — automatic per-shard snapshots that let old WAL segments go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CompactionConfig {
    /// Run automatic compaction (COMPACT requests work either way).
    /// Default true. Env `RSTMDB_COMPACT_ENABLED`.
    pub enabled: bool,
    /// Compact a shard after this many WAL records since its last snapshot.
    /// Default 10000; 0 disables this trigger. Env `RSTMDB_COMPACT_EVENTS`.
    pub events_threshold: u64,
    /// Compact a shard once its WAL exceeds this many MiB.
    /// Default 100; 0 disables this trigger. Env `RSTMDB_COMPACT_SIZE_MB`.
    pub size_threshold_mb: u64,
    /// Minimum seconds between two automatic compactions of a shard, so a
    /// write burst does not snapshot continuously. Default 60.
    /// Env `RSTMDB_COMPACT_INTERVAL`.
    pub min_interval_secs: u64,
    /// Ours: WAL segments written to within this many seconds are kept
    /// even when a snapshot covers them, so subscribers can resume from
    /// recent offsets (WATCH `from_offset`) and WAL_READ sees recent
    /// history. Default 0. Env `RSTMDB_COMPACT_RETENTION_SECS`.
    pub wal_retention_secs: u64,
    /// Ours: snapshot files kept per shard (newest first; at least 1).
    /// Default 2. Env `RSTMDB_COMPACT_KEEP_SNAPSHOTS`.
    pub keep_snapshots: usize,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            events_threshold: 10_000,
            size_threshold_mb: 100,
            min_interval_secs: 60,
            wal_retention_secs: 0,
            keep_snapshots: 2,
        }
    }
}

/// `auth:` — bearer tokens, stored only as SHA-256 hashes.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct AuthConfig {
    /// Require AUTH before any other operation (watches included, D10).
    /// Default false. Env `RSTMDB_AUTH_REQUIRED`.
    pub required: bool,
    /// Accepted tokens as hex SHA-256 digests (64 hex digits; make one with
    /// `rstmdb-cli hash-token <TOKEN>`). Default empty.
    /// Env `RSTMDB_AUTH_TOKEN_HASH` appends one.
    pub token_hashes: Vec<String>,
    /// File with more hashes, one per line; blank and `#` lines skipped. Keeps
    /// hashes out of the config file. Default none.
    /// Env `RSTMDB_AUTH_SECRETS_FILE`.
    pub secrets_file: Option<PathBuf>,
}

impl AuthConfig {
    /// All accepted token hashes: `token_hashes` followed by those in
    /// `secrets_file`, lowercased, without duplicates. Reads the file, so call
    /// it at start-up (and on reload); fails if the file cannot be read, holds
    /// a line that is not a hash, or if auth is required and no hash results.
    pub fn load_token_hashes(&self) -> Result<Vec<String>, ConfigError> {
        let mut hashes: Vec<String> = Vec::new();
        let mut push = |h: &str| {
            let h = h.trim().to_ascii_lowercase();
            if !hashes.contains(&h) {
                hashes.push(h);
            }
        };
        for h in &self.token_hashes {
            push(h);
        }
        if let Some(path) = &self.secrets_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                what: "auth.secrets_file",
                path: path.clone(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                // The line itself is not echoed: it might be a plaintext token.
                if !is_sha256_hex(line) {
                    return Err(invalid(
                        "auth.secrets_file",
                        format!(
                            "auth.secrets_file {} line {}: not a SHA-256 hex digest (expected 64 hex \
                             digits, got {} characters); store hashes from `rstmdb-cli hash-token \
                             <TOKEN>`, not tokens",
                            path.display(),
                            i + 1,
                            line.chars().count()
                        ),
                    ));
                }
                push(line);
            }
        }
        if self.required && hashes.is_empty() {
            return Err(invalid(
                "auth.required",
                "auth.required is true but no token hashes were found: add auth.token_hashes or \
                 hashes to auth.secrets_file",
            ));
        }
        Ok(hashes)
    }
}

/// `tls:` — TLS on the client listener (rustls).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct TlsConfig {
    /// Serve TLS instead of plain TCP. Default false. Env `RSTMDB_TLS_ENABLED`.
    pub enabled: bool,
    /// PEM certificate chain (leaf first). Required when enabled.
    /// Env `RSTMDB_TLS_CERT`.
    pub cert_path: Option<PathBuf>,
    /// PEM private key (PKCS#1, PKCS#8 or SEC1). Required when enabled.
    /// Env `RSTMDB_TLS_KEY`.
    pub key_path: Option<PathBuf>,
    /// Require and verify client certificates (mTLS). Needs `enabled` and
    /// `client_ca_path`. Default false. Env `RSTMDB_TLS_REQUIRE_CLIENT_CERT`.
    pub require_client_cert: bool,
    /// PEM bundle of CAs that client certificates must chain to.
    /// Env `RSTMDB_TLS_CLIENT_CA`.
    pub client_ca_path: Option<PathBuf>,
}

/// `metrics:` — Prometheus text endpoint (`/metrics`, `/health`, `/healthz`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Serve metrics. Default **false** (as the reference).
    /// Env `RSTMDB_METRICS_ENABLED`.
    pub enabled: bool,
    /// Plain-HTTP address for the endpoint; it has no authentication.
    /// Default `0.0.0.0:9090`. Env `RSTMDB_METRICS_BIND`.
    pub bind_addr: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090),
        }
    }
}

/// `replication:` — the reference's replication keys. Parsed so reference
/// configs load unchanged; only `role: standalone` is supported, the rest is
/// inert until replication exists.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ReplicationConfig {
    /// `standalone` (default), `primary` or `replica`. Env `RSTMDB_REPL_ROLE`.
    pub role: ReplicationRole,
    /// `async` (default) or `sync`. Env `RSTMDB_REPL_MODE`.
    pub mode: ReplicationMode,
    /// Primary to follow, host:port (replica only). Default none.
    /// Env `RSTMDB_REPL_UPSTREAM`.
    pub upstream: Option<String>,
    /// Replicas that must confirm in sync mode. Default 1.
    /// Env `RSTMDB_REPL_SYNC_REPLICAS`.
    pub sync_replicas: u32,
    /// How long sync mode waits for confirmations, ms. Default 5000.
    /// Env `RSTMDB_REPL_SYNC_TIMEOUT_MS`.
    pub sync_timeout_ms: u64,
    /// Lag warning threshold in seconds. Default 30.
    pub max_lag_seconds: u64,
    /// Lag warning threshold in entries. Default 10000.
    pub max_lag_entries: u64,
    /// Deprecated plaintext token a replica sends. Default none; never
    /// printed by `Debug`. Env `RSTMDB_REPL_AUTH_TOKEN`.
    pub auth_token: Option<String>,
    /// Hashes of tokens a primary accepts from replicas. Default empty.
    /// Env `RSTMDB_REPL_AUTH_TOKEN_HASH` appends one.
    pub auth_token_hashes: Vec<String>,
    /// File of replica token hashes, one per line. Default none.
    /// Env `RSTMDB_REPL_AUTH_SECRETS_FILE`.
    pub auth_secrets_file: Option<PathBuf>,
    /// Replica WAL poll interval, ms. Default 10. Env `RSTMDB_REPL_POLL_INTERVAL_MS`.
    pub poll_interval_ms: u64,
    /// Heartbeat interval, s. Default 5. Env `RSTMDB_REPL_HEARTBEAT_INTERVAL_SECS`.
    pub heartbeat_interval_secs: u64,
    /// First reconnect delay, s. Default 1. Env `RSTMDB_REPL_RECONNECT_DELAY_SECS`.
    pub reconnect_delay_secs: u64,
    /// Reconnect back-off cap, s. Default 60.
    /// Env `RSTMDB_REPL_RECONNECT_MAX_DELAY_SECS`.
    pub reconnect_max_delay_secs: u64,
    /// Lag check interval, s. Default 10. Env `RSTMDB_REPL_LAG_CHECK_INTERVAL_SECS`.
    pub lag_check_interval_secs: u64,
    /// Replica→primary TLS. Default false. Env `RSTMDB_REPL_TLS_ENABLED`.
    pub tls_enabled: bool,
    /// CA bundle for verifying the primary. Default none. Env `RSTMDB_REPL_TLS_CA`.
    pub tls_ca_path: Option<PathBuf>,
    /// Skip verifying the primary's certificate. Default false.
    /// Env `RSTMDB_REPL_TLS_INSECURE`.
    pub tls_insecure: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            role: ReplicationRole::Standalone,
            mode: ReplicationMode::Async,
            upstream: None,
            sync_replicas: 1,
            sync_timeout_ms: 5000,
            max_lag_seconds: 30,
            max_lag_entries: 10_000,
            auth_token: None,
            auth_token_hashes: Vec::new(),
            auth_secrets_file: None,
            poll_interval_ms: 10,
            heartbeat_interval_secs: 5,
            reconnect_delay_secs: 1,
            reconnect_max_delay_secs: 60,
            lag_check_interval_secs: 10,
            tls_enabled: false,
            tls_ca_path: None,
            tls_insecure: false,
        }
    }
}

/// Hand-written so that `{:?}` of a config (e.g. in a start-up log) never
/// prints the plaintext `auth_token`.
impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("role", &self.role)
            .field("mode", &self.mode)
            .field("upstream", &self.upstream)
            .field("sync_replicas", &self.sync_replicas)
            .field("sync_timeout_ms", &self.sync_timeout_ms)
            .field("max_lag_seconds", &self.max_lag_seconds)
            .field("max_lag_entries", &self.max_lag_entries)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("auth_token_hashes", &self.auth_token_hashes)
            .field("auth_secrets_file", &self.auth_secrets_file)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("heartbeat_interval_secs", &self.heartbeat_interval_secs)
            .field("reconnect_delay_secs", &self.reconnect_delay_secs)
            .field("reconnect_max_delay_secs", &self.reconnect_max_delay_secs)
            .field("lag_check_interval_secs", &self.lag_check_interval_secs)
            .field("tls_enabled", &self.tls_enabled)
            .field("tls_ca_path", &self.tls_ca_path)
            .field("tls_insecure", &self.tls_insecure)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// Builds the configuration from all layers (defaults → file → env → flags)
/// and validates it. `env` looks up one environment variable; `main` passes
/// `&|k| std::env::var(k).ok()`, tests pass a map.
pub fn load(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let path = match &cli.config {
        Some(path) => Some(path.clone()),
        None => match env("RSTMDB_CONFIG") {
            Some(v) if v.trim().is_empty() => {
                warnings.push("RSTMDB_CONFIG is set but empty; no config file loaded".into());
                None
            }
            other => other.map(PathBuf::from),
        },
    };
    let mut config = match &path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.warnings = warnings;
    config.apply_env(env);
    config.apply_cli(cli);
    if config.cluster.node_id.is_none() && !config.cluster.peers.is_empty() {
        let host = env("HOSTNAME")
            .filter(|h| !h.is_empty())
            .or_else(system_hostname);
        config.cluster.find_self(host.as_deref());
    }
    config.validate()?;
    if config.cluster.enabled() {
        // One Raft group per node for now (see `cluster::ClusterConfig`).
        config.server.shards = Some(1);
    }
    Ok(config)
}

/// The machine's host name (a pod's name under Kubernetes).
fn system_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes a
    // NUL-terminated name into it (truncated if too long).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

impl Config {
    /// Parses YAML text over the built-in defaults (no env, no validation).
    /// An empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(text)
    }

    /// Reads and parses a YAML file (no env, no validation); errors name the
    /// file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "config file",
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_yaml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.config_file = Some(path.to_path_buf());
        Ok(config)
    }

    /// Applies the `RSTMDB_*` overrides of spec/CLI.md B3 (plus ours), adding a
    /// line to `warnings` for every value that was ignored or reinterpreted.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        let mut e = EnvLayer {
            env,
            warnings: &mut self.warnings,
        };

        let s = &mut self.server;
        e.number_opt("RSTMDB_SHARDS", &mut s.shards);
        e.number_opt("RSTMDB_FRONTENDS", &mut s.frontends);
        e.parsed("RSTMDB_LAYOUT", "colocated or dedicated", &mut s.layout);
        e.number("RSTMDB_IO_MEMORY_KIB", &mut s.io_memory_kib);
        e.number("RSTMDB_SPIN_BEFORE_PARK_US", &mut s.spin_before_park_us);

        let n = &mut self.network;
        e.parsed("RSTMDB_BIND", "an ip:port address", &mut n.bind_addr);
        e.number("RSTMDB_IDLE_TIMEOUT", &mut n.idle_timeout_secs);
        e.number("RSTMDB_MAX_CONNECTIONS", &mut n.max_connections);

        let st = &mut self.storage;
        e.path("RSTMDB_DATA", &mut st.data_dir);
        e.number("RSTMDB_WAL_SEGMENT_SIZE_MB", &mut st.wal_segment_size_mb);
        if let Some(v) = e.get("RSTMDB_FSYNC_POLICY") {
            let (policy, warning) = FsyncPolicy::from_env(&v);
            st.fsync_policy = policy;
            e.warnings.extend(warning);
        }
        e.number("RSTMDB_MAX_MACHINE_VERSIONS", &mut st.max_machine_versions);
        e.flag(
            "RSTMDB_ALLOW_INSTANCE_RECREATE",
            &mut st.allow_instance_recreate,
        );
        e.flag("RSTMDB_ALLOW_FLUSH_ALL", &mut st.allow_flush_all);
        e.number("RSTMDB_IDEMPOTENCY_WINDOW", &mut st.idempotency_window);
        e.number(
            "RSTMDB_IDEMPOTENCY_MAX_AGE_SECS",
            &mut st.idempotency_max_age_secs,
        );

        let c = &mut self.compaction;
        e.flag("RSTMDB_COMPACT_ENABLED", &mut c.enabled);
        e.number("RSTMDB_COMPACT_EVENTS", &mut c.events_threshold);
        e.number("RSTMDB_COMPACT_SIZE_MB", &mut c.size_threshold_mb);
        e.number("RSTMDB_COMPACT_INTERVAL", &mut c.min_interval_secs);
        e.number("RSTMDB_COMPACT_RETENTION_SECS", &mut c.wal_retention_secs);
        e.number("RSTMDB_COMPACT_KEEP_SNAPSHOTS", &mut c.keep_snapshots);

        let a = &mut self.auth;
        e.flag("RSTMDB_AUTH_REQUIRED", &mut a.required);
        e.append("RSTMDB_AUTH_TOKEN_HASH", &mut a.token_hashes);
        e.path_opt("RSTMDB_AUTH_SECRETS_FILE", &mut a.secrets_file);

        let t = &mut self.tls;
        e.flag("RSTMDB_TLS_ENABLED", &mut t.enabled);
        e.path_opt("RSTMDB_TLS_CERT", &mut t.cert_path);
        e.path_opt("RSTMDB_TLS_KEY", &mut t.key_path);
        e.flag("RSTMDB_TLS_REQUIRE_CLIENT_CERT", &mut t.require_client_cert);
        e.path_opt("RSTMDB_TLS_CLIENT_CA", &mut t.client_ca_path);

        let m = &mut self.metrics;
        e.flag("RSTMDB_METRICS_ENABLED", &mut m.enabled);
        e.parsed(
            "RSTMDB_METRICS_BIND",
            "an ip:port address",
            &mut m.bind_addr,
        );

        let r = &mut self.replication;
        e.parsed(
            "RSTMDB_REPL_ROLE",
            "a role (standalone, primary, replica)",
            &mut r.role,
        );
        e.parsed("RSTMDB_REPL_MODE", "a mode (async, sync)", &mut r.mode);
        if let Some(v) = e.get_nonempty("RSTMDB_REPL_UPSTREAM") {
            r.upstream = Some(v.trim().to_string());
        }
        e.number("RSTMDB_REPL_SYNC_REPLICAS", &mut r.sync_replicas);
        e.number("RSTMDB_REPL_SYNC_TIMEOUT_MS", &mut r.sync_timeout_ms);
        // Taken exactly as given: a token's bytes are its value.
        if let Some(v) = e.get("RSTMDB_REPL_AUTH_TOKEN") {
            r.auth_token = Some(v);
        }
        e.append("RSTMDB_REPL_AUTH_TOKEN_HASH", &mut r.auth_token_hashes);
        e.path_opt("RSTMDB_REPL_AUTH_SECRETS_FILE", &mut r.auth_secrets_file);
        e.number("RSTMDB_REPL_POLL_INTERVAL_MS", &mut r.poll_interval_ms);
        e.number(
            "RSTMDB_REPL_HEARTBEAT_INTERVAL_SECS",
            &mut r.heartbeat_interval_secs,
        );
        e.number(
            "RSTMDB_REPL_RECONNECT_DELAY_SECS",
            &mut r.reconnect_delay_secs,
        );
        e.number(
            "RSTMDB_REPL_RECONNECT_MAX_DELAY_SECS",
            &mut r.reconnect_max_delay_secs,
        );
        e.number(
            "RSTMDB_REPL_LAG_CHECK_INTERVAL_SECS",
            &mut r.lag_check_interval_secs,
        );
        e.flag("RSTMDB_REPL_TLS_ENABLED", &mut r.tls_enabled);
        e.path_opt("RSTMDB_REPL_TLS_CA", &mut r.tls_ca_path);
        e.flag("RSTMDB_REPL_TLS_INSECURE", &mut r.tls_insecure);

        self.cluster.apply_env(&mut e);
    }

    /// Applies command-line flags (the last layer).
    pub fn apply_cli(&mut self, cli: &Cli) {
        if let Some(addr) = cli.bind {
            self.network.bind_addr = addr;
        }
        if let Some(dir) = &cli.data_dir {
            self.storage.data_dir = dir.clone();
        }
        if let Some(n) = cli.shards {
            self.server.shards = Some(n);
        }
        if let Some(policy) = cli.fsync_policy {
            self.storage.fsync_policy = policy;
        }
        if let Some(mb) = cli.wal_segment_size_mb {
            self.storage.wal_segment_size_mb = mb;
        }
    }

    /// Checks that the configuration can run, returning the first problem.
    /// Does not touch the filesystem (see [`AuthConfig::load_token_hashes`]
    /// for the secrets file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if let Some(n) = s.shards {
            if n == 0 || n > MAX_SHARDS {
                return Err(invalid(
                    "server.shards",
                    format!(
                        "server.shards must be between 1 and {MAX_SHARDS} (got {n}); leave it \
                         unset to use the available cores minus one"
                    ),
                ));
            }
        }
        if let Some(f) = s.frontends.filter(|&f| f == 0 || f > MAX_FRONTENDS) {
            return Err(invalid(
                "server.frontends",
                format!("server.frontends must be between 1 and {MAX_FRONTENDS} (got {f})"),
            ));
        }
        if s.io_memory_kib == 0 {
            return Err(invalid(
                "server.io_memory_kib",
                "server.io_memory_kib must be at least 1 (default 1024)",
            ));
        }

        if self.network.max_connections == 0 {
            return Err(invalid(
                "network.max_connections",
                "network.max_connections must be at least 1 (default 1000)",
            ));
        }

        let st = &self.storage;
        if st.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "storage.data_dir",
                "storage.data_dir must not be empty (default ./data)",
            ));
        }
        if st.wal_segment_size_mb == 0 || st.wal_segment_size_mb > MAX_WAL_SEGMENT_SIZE_MB {
            return Err(invalid(
                "storage.wal_segment_size_mb",
                format!(
                    "storage.wal_segment_size_mb must be between 1 and {MAX_WAL_SEGMENT_SIZE_MB} \
                     MiB (got {}; default 64)",
                    st.wal_segment_size_mb
                ),
            ));
        }
        match st.fsync_policy {
            FsyncPolicy::EveryN(0) | FsyncPolicy::EveryMs(0) => {
                return Err(invalid(
                    "storage.fsync_policy",
                    format!(
                        "storage.fsync_policy {}: N must be at least 1 (use never to not sync, \
                         every_write to sync every write)",
                        st.fsync_policy
                    ),
                ));
            }
            _ => {}
        }
        if st.idempotency_window == 0 {
            return Err(invalid(
                "storage.idempotency_window",
                "storage.idempotency_window must be at least 1 entry per shard (default 100000); \
                 idempotency cannot be disabled",
            ));
        }

        let m = &self.metrics;
        let n = &self.network;
        if m.enabled
            && m.bind_addr.port() == n.bind_addr.port()
            && (m.bind_addr.ip() == n.bind_addr.ip()
                || m.bind_addr.ip().is_unspecified()
                || n.bind_addr.ip().is_unspecified())
        {
            return Err(invalid(
                "metrics.bind_addr",
                format!(
                    "metrics.bind_addr {} collides with network.bind_addr {}; use another port",
                    m.bind_addr, n.bind_addr
                ),
            ));
        }

        let a = &self.auth;
        for (i, h) in a.token_hashes.iter().enumerate() {
            let h = h.trim();
            // The value is not echoed: a mistake here is often a plaintext token.
            if !is_sha256_hex(h) {
                return Err(invalid(
                    "auth.token_hashes",
                    format!(
                        "auth.token_hashes entry {} is not a SHA-256 hex digest (expected 64 hex \
                         digits, got {} characters); store the output of `rstmdb-cli hash-token \
                         <TOKEN>`, not the token",
                        i + 1,
                        h.chars().count()
                    ),
                ));
            }
            if h.bytes().all(|b| b == b'0') {
                return Err(invalid(
                    "auth.token_hashes",
                    format!(
                        "auth.token_hashes entry {} is the all-zero placeholder; replace it with \
                         the hash of a real token (`rstmdb-cli hash-token <TOKEN>`)",
                        i + 1
                    ),
                ));
            }
        }
        if a.required && a.token_hashes.is_empty() && a.secrets_file.is_none() {
            return Err(invalid(
                "auth.required",
                "auth.required is true but no tokens are configured: add auth.token_hashes \
                 (RSTMDB_AUTH_TOKEN_HASH) or auth.secrets_file (RSTMDB_AUTH_SECRETS_FILE)",
            ));
        }

        let t = &self.tls;
        if t.enabled && (t.cert_path.is_none() || t.key_path.is_none()) {
            return Err(invalid(
                "tls.cert_path",
                "tls.enabled is true but tls.cert_path and tls.key_path are not both set \
                 (RSTMDB_TLS_CERT, RSTMDB_TLS_KEY)",
            ));
        }
        if t.require_client_cert && !t.enabled {
            return Err(invalid(
                "tls.require_client_cert",
                "tls.require_client_cert is true but tls.enabled is false: client certificates \
                 need TLS; enable it or drop require_client_cert",
            ));
        }
        if t.require_client_cert && t.client_ca_path.is_none() {
            return Err(invalid(
                "tls.client_ca_path",
                "tls.require_client_cert is true but tls.client_ca_path is not set: name the CA \
                 bundle client certificates must chain to (RSTMDB_TLS_CLIENT_CA)",
            ));
        }

        let r = &self.replication;
        if self.storage.allow_flush_all && r.role != ReplicationRole::Standalone {
            return Err(invalid(
                "storage.allow_flush_all",
                format!(
                    "storage.allow_flush_all cannot be used with replication.role '{}'; it needs \
                     standalone",
                    r.role
                ),
            ));
        }
        self.validate_cluster_node()?;
        if r.role != ReplicationRole::Standalone {
            return Err(invalid(
                "replication.role",
                format!(
                    "replication role '{}' is not supported yet (standalone only); set \
                     replication.role: standalone",
                    r.role
                ),
            ));
        }
        Ok(())
    }

    /// A cluster node's settings: the `cluster:` section, and what it
    /// needs of the others (a certificate for peer TLS; no FLUSH_ALL).
    fn validate_cluster_node(&self) -> Result<(), ConfigError> {
        let r = &self.replication;
        self.cluster.validate(self.server.shards)?;
        if self.cluster.enabled() && r.tls_enabled {
            if self.tls.cert_path.is_none() || self.tls.key_path.is_none() {
                return Err(invalid(
                    "replication.tls_enabled",
                    "replication.tls_enabled on a cluster node needs this node's certificate: set \
                 tls.cert_path and tls.key_path (client TLS itself may stay off)",
                ));
            }
            if r.tls_ca_path.is_none() && !r.tls_insecure {
                return Err(invalid(
                    "replication.tls_ca_path",
                    "replication.tls_enabled needs replication.tls_ca_path, the CA peers' \
                 certificates chain to (or replication.tls_insecure: true, for testing)",
                ));
            }
        }
        if self.cluster.enabled() && self.storage.allow_flush_all {
            return Err(invalid(
                "storage.allow_flush_all",
                "storage.allow_flush_all cannot be used on a cluster node",
            ));
        }
        Ok(())
    }
}

/// True for a 64-digit hex string (either case), the form of a SHA-256 digest.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Environment overrides with the reference's parsing rules, collecting a
/// warning for every value not taken as written.
struct EnvLayer<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    warnings: &'a mut Vec<String>,
}

impl EnvLayer<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    /// The value unless it is empty or blank: for paths and addresses an empty
    /// value (`VAR=` in a compose file) means "not set", not "".
    fn get_nonempty(&mut self, name: &str) -> Option<String> {
        let v = self.get(name)?;
        if v.trim().is_empty() {
            self.warnings
                .push(format!("{name} is set but empty; ignored"));
            return None;
        }
        Some(v)
    }

    /// Reference rule: `1` or case-insensitive `true` → true, anything else
    /// false. Values other than those and `0`/`false` are still read as false
    /// but leave a warning, since `yes` meaning false surprises people.
    fn flag(&mut self, name: &str, target: &mut bool) {
        let Some(v) = self.get(name) else { return };
        let t = v.trim();
        *target = t == "1" || t.eq_ignore_ascii_case("true");
        if !*target && t != "0" && !t.eq_ignore_ascii_case("false") {
            self.warnings.push(format!(
                "{name}={v:?} is read as false (only 1 or true mean true)"
            ));
        }
    }

    fn parsed<T: FromStr>(&mut self, name: &str, what: &str, target: &mut T) {
        let Some(v) = self.get(name) else { return };
        match v.trim().parse() {
            Ok(x) => *target = x,
            Err(_) => self
                .warnings
                .push(format!("{name}={v:?} is not {what}; ignored")),
        }
    }

    fn number<T: FromStr>(&mut self, name: &str, target: &mut T) {
        self.parsed(name, "a non-negative integer", target);
    }

    fn number_opt<T: FromStr>(&mut self, name: &str, target: &mut Option<T>) {
        let Some(v) = self.get(name) else { return };
        match v.trim().parse() {
            Ok(x) => *target = Some(x),
            Err(_) => self.warnings.push(format!(
                "{name}={v:?} is not a non-negative integer; ignored"
            )),
        }
    }

    fn path(&mut self, name: &str, target: &mut PathBuf) {
        if let Some(v) = self.get_nonempty(name) {
            *target = PathBuf::from(v);
        }
    }

    fn path_opt(&mut self, name: &str, target: &mut Option<PathBuf>) {
        if let Some(v) = self.get_nonempty(name) {
            *target = Some(PathBuf::from(v));
        }
    }

    fn append(&mut self, name: &str, target: &mut Vec<String>) {
        if let Some(v) = self.get_nonempty(name) {
            target.push(v.trim().to_string());
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const HASH_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const HASH_B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Defaults with one env var applied (no validation).
    fn with_env(name: &str, value: &str) -> Config {
        let mut c = Config::default();
        c.apply_env(&env_of(&[(name, value)]));
        c
    }

    fn key_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected a validation error, got {other}"),
        }
    }

    fn invalid_key(mutate: impl FnOnce(&mut Config)) -> (&'static str, String) {
        let mut c = Config::default();
        mutate(&mut c);
        let err = c.validate().expect_err("config should be invalid");
        let msg = err.to_string();
        (key_of(err), msg)
    }

    fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn cli_with_config(path: &Path) -> Cli {
        Cli {
            config: Some(path.to_path_buf()),
            ..Cli::default()
        }
    }

    #[test]
    fn defaults_match_reference() {
        let c = Config::default();
        assert_eq!(c.network.bind_addr, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.network.idle_timeout_secs, 300);
        assert_eq!(c.network.max_connections, 1000);
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.wal_segment_size_mb, 64);
        assert_eq!(c.storage.fsync_policy, FsyncPolicy::EveryWrite);
        assert_eq!(c.storage.max_machine_versions, 0);
        assert!(c.storage.allow_instance_recreate);
        assert!(!c.storage.allow_flush_all);
        assert_eq!(c.storage.idempotency_window, 100_000);
        assert_eq!(c.storage.idempotency_max_age_secs, 86_400);
        assert!(c.compaction.enabled);
        assert_eq!(c.compaction.events_threshold, 10_000);
        assert_eq!(c.compaction.size_threshold_mb, 100);
        assert_eq!(c.compaction.min_interval_secs, 60);
        assert!(!c.auth.required);
        assert!(c.auth.token_hashes.is_empty());
        assert_eq!(c.auth.secrets_file, None);
        assert_eq!(c.tls, TlsConfig::default());
        assert!(!c.tls.enabled);
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.bind_addr, "0.0.0.0:9090".parse().unwrap());
        let r = &c.replication;
        assert_eq!(r.role, ReplicationRole::Standalone);
        assert_eq!(r.mode, ReplicationMode::Async);
        assert_eq!(r.upstream, None);
        assert_eq!(r.sync_replicas, 1);
        assert_eq!(r.sync_timeout_ms, 5000);
        assert_eq!((r.max_lag_seconds, r.max_lag_entries), (30, 10_000));
        assert_eq!(r.poll_interval_ms, 10);
        assert_eq!(r.heartbeat_interval_secs, 5);
        assert_eq!(
            (r.reconnect_delay_secs, r.reconnect_max_delay_secs),
            (1, 60)
        );
        assert_eq!(r.lag_check_interval_secs, 10);
        assert!(!r.tls_enabled && !r.tls_insecure && r.tls_ca_path.is_none());
        assert_eq!(c.server.shards, None);
        assert_eq!(c.server.frontends, None);
        assert_eq!(c.server.layout, Layout::Colocated);
        assert_eq!(c.server.io_memory_kib, 1024);
        assert!(c.warnings.is_empty());
        c.validate().unwrap();
    }

    #[test]
    fn load_without_file_env_or_flags_is_default() {
        assert_eq!(load(&Cli::default(), &no_env).unwrap(), Config::default());
    }

    #[test]
    fn embedded_default_equals_builtin_defaults() {
        assert_eq!(
            Config::from_yaml(EMBEDDED_DEFAULT).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn embedded_default_documents_every_env_var() {
        for name in ENV_VARS {
            assert!(
                EMBEDDED_DEFAULT.contains(name),
                "config/default.yaml does not mention {name}"
            );
        }
    }

    #[test]
    fn a_cluster_node_without_an_id_takes_its_host_names() {
        let env = |k: &str| match k {
            "RSTMDB_CLUSTER_PEERS" => Some("1=node-a:7501,2=node-b:7501,3=node-c:7501".into()),
            "HOSTNAME" => Some("node-b".into()),
            _ => None,
        };
        let c = load(&Cli::default(), &env).unwrap();
        assert_eq!(c.cluster.node_id, Some(2));
        // No peer named after this machine: refused, saying how to fix it.
        let stranger = |k: &str| match k {
            "HOSTNAME" => Some("elsewhere".into()),
            other => env(other),
        };
        let err = load(&Cli::default(), &stranger).unwrap_err().to_string();
        assert!(err.contains("RSTMDB_CLUSTER_NODE_ID"), "{err}");
    }

    #[test]
    fn env_layer_reads_exactly_env_vars() {
        let seen = RefCell::new(Vec::new());
        let env = |k: &str| {
            seen.borrow_mut().push(k.to_string());
            None
        };
        load(&Cli::default(), &env).unwrap();
        let seen = seen.into_inner();
        assert_eq!(
            seen,
            ENV_VARS.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn example_configs_parse() {
        let dev = Config::from_yaml(include_str!("../../config/dev.yaml")).unwrap();
        dev.validate().unwrap();
        assert_eq!(dev.storage.fsync_policy, FsyncPolicy::Never);

        let prod = Config::from_yaml(include_str!("../../config/production.yaml")).unwrap();
        assert_eq!(prod.storage.fsync_policy, FsyncPolicy::EveryWrite);
        assert!(prod.metrics.enabled && prod.auth.required);
        // Shipped with a placeholder hash that must be replaced before start.
        assert_eq!(key_of(prod.validate().unwrap_err()), "auth.token_hashes");
        let mut fixed = prod.clone();
        fixed.auth.token_hashes = vec![HASH_A.into()];
        fixed.validate().unwrap();
        let secure = Config::from_yaml(include_str!("../../config/tls-auth.yaml")).unwrap();
        secure.validate().unwrap();
        assert!(secure.auth.required && secure.tls.enabled && secure.tls.require_client_cert);
        // The documented token: sha256("dev-token").
        let hashes = secure.auth.load_token_hashes().unwrap();
        assert_eq!(
            hashes,
            vec!["c91cbbedf8c712e8e2b7517ddeca8fe4fde839ebd8339e0b2001363002b37712".to_owned()]
        );
    }

    #[test]
    fn yaml_with_every_section() {
        let yaml = format!(
            r#"
server:
  shards: 3
  frontends: 1
  io_memory_kib: 2048
network:
  bind_addr: "0.0.0.0:7500"
  idle_timeout_secs: 0
  max_connections: 10
storage:
  data_dir: /var/lib/rstmdb
  wal_segment_size_mb: 16
  fsync_policy: never
  max_machine_versions: 5
  allow_instance_recreate: false
  allow_flush_all: true
  idempotency_window: 500
  idempotency_max_age_secs: 0
compaction:
  enabled: false
  events_threshold: 0
  size_threshold_mb: 7
  min_interval_secs: 1
auth:
  required: true
  token_hashes: ["{HASH_A}"]
  secrets_file: /etc/rstmdb/tokens
tls:
  enabled: true
  cert_path: /c.pem
  key_path: /k.pem
  require_client_cert: true
  client_ca_path: /ca.pem
metrics:
  enabled: true
  bind_addr: "127.0.0.1:9100"
replication:
  role: replica
  mode: sync
  upstream: "primary:7401"
  sync_replicas: 2
  sync_timeout_ms: 100
  max_lag_seconds: 3
  max_lag_entries: 4
  auth_token: s3cr3t-tok
  auth_token_hashes: ["{HASH_B}"]
  auth_secrets_file: /r.txt
  poll_interval_ms: 11
  heartbeat_interval_secs: 12
  reconnect_delay_secs: 13
  reconnect_max_delay_secs: 14
  lag_check_interval_secs: 15
  tls_enabled: true
  tls_ca_path: /rca.pem
  tls_insecure: true
"#
        );
        let c = Config::from_yaml(&yaml).unwrap();
        assert_eq!(c.server.shards, Some(3));
        assert_eq!(c.server.io_memory_kib, 2048);
        assert_eq!(c.network.bind_addr, "0.0.0.0:7500".parse().unwrap());
        assert_eq!(c.network.idle_timeout(), None);
        assert_eq!(c.network.max_connections, 10);
        assert_eq!(c.storage.data_dir, PathBuf::from("/var/lib/rstmdb"));
        assert_eq!(c.storage.wal_segment_size_mb, 16);
        assert_eq!(c.storage.fsync_policy, FsyncPolicy::Never);
        assert_eq!(c.storage.max_machine_versions, 5);
        assert!(!c.storage.allow_instance_recreate && c.storage.allow_flush_all);
        assert_eq!(c.storage.idempotency_window, 500);
        assert_eq!(c.storage.idempotency_max_age(), None);
        assert_eq!(
            c.compaction,
            CompactionConfig {
                enabled: false,
                events_threshold: 0,
                size_threshold_mb: 7,
                min_interval_secs: 1,
                wal_retention_secs: 0,
                keep_snapshots: 2,
            }
        );
        assert!(c.auth.required);
        assert_eq!(c.auth.token_hashes, vec![HASH_A.to_string()]);
        assert_eq!(
            c.auth.secrets_file,
            Some(PathBuf::from("/etc/rstmdb/tokens"))
        );
        assert_eq!(
            c.tls,
            TlsConfig {
                enabled: true,
                cert_path: Some("/c.pem".into()),
                key_path: Some("/k.pem".into()),
                require_client_cert: true,
                client_ca_path: Some("/ca.pem".into()),
            }
        );
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.bind_addr, "127.0.0.1:9100".parse().unwrap());
        let r = &c.replication;
        assert_eq!(r.role, ReplicationRole::Replica);
        assert_eq!(r.mode, ReplicationMode::Sync);
        assert_eq!(r.upstream.as_deref(), Some("primary:7401"));
        assert_eq!((r.sync_replicas, r.sync_timeout_ms), (2, 100));
        assert_eq!((r.max_lag_seconds, r.max_lag_entries), (3, 4));
        assert_eq!(r.auth_token.as_deref(), Some("s3cr3t-tok"));
        assert_eq!(r.auth_token_hashes, vec![HASH_B.to_string()]);
        assert_eq!(r.auth_secrets_file, Some(PathBuf::from("/r.txt")));
        assert_eq!(
            (
                r.poll_interval_ms,
                r.heartbeat_interval_secs,
                r.reconnect_delay_secs,
                r.reconnect_max_delay_secs,
                r.lag_check_interval_secs
            ),
            (11, 12, 13, 14, 15)
        );
        assert!(r.tls_enabled && r.tls_insecure);
        assert_eq!(r.tls_ca_path, Some(PathBuf::from("/rca.pem")));
        // The plaintext token never shows in Debug output.
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t") && debug.contains("<redacted>"));
    }

    #[test]
    fn partial_and_empty_yaml_keep_defaults() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        assert_eq!(Config::from_yaml("# nothing\n").unwrap(), Config::default());
        let c = Config::from_yaml("storage:\n  wal_segment_size_mb: 8\nauth:\n").unwrap();
        assert_eq!(c.storage.wal_segment_size_mb, 8);
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.auth, AuthConfig::default());
    }

    #[test]
    fn fsync_policy_yaml_forms() {
        let p = |v: &str| {
            Config::from_yaml(&format!("storage:\n  fsync_policy: {v}\n"))
                .map(|c| c.storage.fsync_policy)
                .map_err(|e| e.to_string())
        };
        assert_eq!(p("every_write"), Ok(FsyncPolicy::EveryWrite));
        assert_eq!(p("never"), Ok(FsyncPolicy::Never));
        assert_eq!(p("!every_n 100"), Ok(FsyncPolicy::EveryN(100)));
        assert_eq!(p("!every_ms 5"), Ok(FsyncPolicy::EveryMs(5)));
        assert_eq!(p("{every_n: 100}"), Ok(FsyncPolicy::EveryN(100)));
        assert_eq!(p("{every_ms: 5}"), Ok(FsyncPolicy::EveryMs(5)));
        assert_eq!(p("\n    every_ms: 7"), Ok(FsyncPolicy::EveryMs(7)));
        assert_eq!(p("every_n:3"), Ok(FsyncPolicy::EveryN(3)));
        assert_eq!(p("!every_write"), Ok(FsyncPolicy::EveryWrite));

        for bad in [
            "!every_n 0",
            "{every_n: 0}",
            "!every_ms 0",
            "{every_ms: 0}",
            "every_n:0",
        ] {
            let err = p(bad).unwrap_err();
            assert!(
                err.contains("storage.fsync_policy") && err.contains("N >= 1"),
                "{bad}: {err}"
            );
        }
        for bad in [
            "sometimes",
            "!every_n x",
            "!every_n",
            "{every_n: -1}",
            "{often: 3}",
            "{every_n: 1, every_ms: 2}",
            "{}",
            "5",
            "[every_n, 5]",
            "!sometimes 5",
        ] {
            let err = p(bad).unwrap_err();
            assert!(err.contains("storage.fsync_policy"), "{bad}: {err}");
        }
    }

    #[test]
    fn fsync_policy_flag_form_roundtrips() {
        for p in [
            FsyncPolicy::EveryWrite,
            FsyncPolicy::Never,
            FsyncPolicy::EveryN(7),
            FsyncPolicy::EveryMs(250),
        ] {
            assert_eq!(p.to_string().parse::<FsyncPolicy>(), Ok(p));
        }
        assert_eq!("EveryWrite".parse(), Ok(FsyncPolicy::EveryWrite));
        assert_eq!("everywrite".parse(), Ok(FsyncPolicy::EveryWrite));
        assert!("every_n:0".parse::<FsyncPolicy>().is_err());
        assert!("every_n:x".parse::<FsyncPolicy>().is_err());
        assert!("every_n".parse::<FsyncPolicy>().is_err());
        assert!("never:3".parse::<FsyncPolicy>().is_err());
        assert!("bogus".parse::<FsyncPolicy>().is_err());
        assert!("".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let c = Config::from_yaml(
            "logging:\n  level: debug\nstorage:\n  data_dir: /x\n  frobnicate: [1, 2]\nfuture: 1\n",
        )
        .unwrap();
        assert_eq!(c.storage.data_dir, PathBuf::from("/x"));
        assert_eq!(
            Config {
                storage: StorageConfig::default(),
                ..c
            },
            Config::default()
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        for (yaml, key) in [
            (
                "storage:\n  wal_segment_size_mb: big\n",
                "storage.wal_segment_size_mb",
            ),
            ("auth:\n  required: yes\n", "auth.required"),
            (
                "network:\n  bind_addr: localhost:7401\n",
                "network.bind_addr",
            ),
            (
                "network:\n  max_connections: -1\n",
                "network.max_connections",
            ),
            ("replication:\n  role: leader\n", "replication.role"),
            ("server:\n  shards: many\n", "server.shards"),
            ("storage: [1, 2]\n", "storage"),
            ("auth:\n  token_hashes: abc\n", "auth.token_hashes"),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.starts_with(key), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let err = load(&cli_with_config(&missing), &no_env).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("nope.yaml"), "{err}");

        let bad = write_file(&dir, "bad.yaml", "storage:\n  wal_segment_size_mb: big\n");
        let err = load(&cli_with_config(&bad), &no_env).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(
            msg.contains("bad.yaml") && msg.contains("storage.wal_segment_size_mb"),
            "{msg}"
        );

        let garbage = write_file(&dir, "garbage.yaml", "storage: [unclosed\n");
        let err = load(&cli_with_config(&garbage), &no_env).unwrap_err();
        assert!(err.to_string().contains("garbage.yaml"), "{err}");

        // Named by RSTMDB_CONFIG instead of the flag: same error.
        let env = env_of(&[("RSTMDB_CONFIG", missing.to_str().unwrap())]);
        assert!(matches!(
            load(&Cli::default(), &env),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn config_file_from_env_or_flag() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_file(&dir, "a.yaml", "storage:\n  wal_segment_size_mb: 8\n");
        let b = write_file(&dir, "b.yaml", "storage:\n  wal_segment_size_mb: 16\n");
        let env = env_of(&[("RSTMDB_CONFIG", a.to_str().unwrap())]);

        let c = load(&Cli::default(), &env).unwrap();
        assert_eq!(c.storage.wal_segment_size_mb, 8);
        assert_eq!(c.config_file.as_deref(), Some(a.as_path()));

        let c = load(&cli_with_config(&b), &env).unwrap();
        assert_eq!(c.storage.wal_segment_size_mb, 16);

        let c = load(&Cli::default(), &env_of(&[("RSTMDB_CONFIG", "")])).unwrap();
        assert_eq!(c.config_file, None);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn precedence_flags_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write_file(
            &dir,
            "c.yaml",
            "network:\n  bind_addr: 10.0.0.1:1000\nstorage:\n  data_dir: /file\n  \
             wal_segment_size_mb: 8\n  fsync_policy: never\nserver:\n  shards: 2\n\
             compaction:\n  min_interval_secs: 5\n",
        );
        let env = env_of(&[
            ("RSTMDB_BIND", "10.0.0.2:2000"),
            ("RSTMDB_DATA", "/env"),
            ("RSTMDB_WAL_SEGMENT_SIZE_MB", "16"),
            ("RSTMDB_FSYNC_POLICY", "every_ms:5"),
            ("RSTMDB_SHARDS", "3"),
        ]);

        let c = load(&cli_with_config(&file), &env).unwrap();
        assert_eq!(c.network.bind_addr, "10.0.0.2:2000".parse().unwrap());
        assert_eq!(c.storage.data_dir, PathBuf::from("/env"));
        assert_eq!(c.storage.wal_segment_size_mb, 16);
        assert_eq!(c.storage.fsync_policy, FsyncPolicy::EveryMs(5));
        assert_eq!(c.server.shards, Some(3));
        assert_eq!(c.compaction.min_interval_secs, 5); // file only

        let cli = Cli {
            config: Some(file.clone()),
            bind: Some("10.0.0.3:3000".parse().unwrap()),
            data_dir: Some("/flag".into()),
            shards: Some(4),
            fsync_policy: Some(FsyncPolicy::EveryN(9)),
            wal_segment_size_mb: Some(32),
            print_default_config: false,
            gen_dev_certs: None,
            command: None,
        };
        let c = load(&cli, &env).unwrap();
        assert_eq!(c.network.bind_addr, "10.0.0.3:3000".parse().unwrap());
        assert_eq!(c.storage.data_dir, PathBuf::from("/flag"));
        assert_eq!(c.storage.wal_segment_size_mb, 32);
        assert_eq!(c.storage.fsync_policy, FsyncPolicy::EveryN(9));
        assert_eq!(c.server.shards, Some(4));
    }

    #[test]
    fn cli_parses_flags() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "rstmdb",
            "--config",
            "/c.yaml",
            "--bind",
            "0.0.0.0:7401",
            "--data-dir",
            "/d",
            "--shards",
            "2",
            "--fsync-policy",
            "every_ms:10",
            "--wal-segment-size-mb",
            "8",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("/c.yaml")));
        assert_eq!(cli.bind, Some("0.0.0.0:7401".parse().unwrap()));
        assert_eq!(cli.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(cli.shards, Some(2));
        assert_eq!(cli.fsync_policy, Some(FsyncPolicy::EveryMs(10)));
        assert_eq!(cli.wal_segment_size_mb, Some(8));
        assert_eq!(Cli::try_parse_from(["rstmdb"]).unwrap(), Cli::default());
        for bad in [
            &["rstmdb", "--fsync-policy", "every_n:0"][..],
            &["rstmdb", "--fsync-policy", "sometimes"],
            &["rstmdb", "--bind", "localhost"],
            &["rstmdb", "--shards", "-1"],
            &["rstmdb", "--bogus"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn env_booleans() {
        for (v, want, warns) in [
            ("1", true, false),
            ("true", true, false),
            ("TRUE", true, false),
            ("True", true, false),
            ("0", false, false),
            ("false", false, false),
            ("yes", false, true),
            ("on", false, true),
            ("", false, true),
        ] {
            let c = with_env("RSTMDB_AUTH_REQUIRED", v);
            assert_eq!(c.auth.required, want, "{v:?}");
            assert_eq!(!c.warnings.is_empty(), warns, "{v:?}: {:?}", c.warnings);
        }
        // A false value overrides a true default.
        assert!(
            !with_env("RSTMDB_ALLOW_INSTANCE_RECREATE", "no")
                .storage
                .allow_instance_recreate
        );
    }

    #[test]
    fn env_fsync_policy_forms() {
        for (v, want, warns) in [
            ("every_write", FsyncPolicy::EveryWrite, false),
            ("everywrite", FsyncPolicy::EveryWrite, false),
            ("EVERY_WRITE", FsyncPolicy::EveryWrite, false),
            ("never", FsyncPolicy::Never, false),
            ("every_n:5", FsyncPolicy::EveryN(5), false),
            ("every_ms:20", FsyncPolicy::EveryMs(20), false),
            ("every_n:x", FsyncPolicy::EveryN(100), true),
            ("every_ms:", FsyncPolicy::EveryMs(100), true),
            ("every_n:-3", FsyncPolicy::EveryN(100), true),
            ("sometimes", FsyncPolicy::EveryWrite, true),
            ("every_n", FsyncPolicy::EveryWrite, true),
            ("", FsyncPolicy::EveryWrite, true),
        ] {
            let mut c = Config::default();
            c.storage.fsync_policy = FsyncPolicy::Never;
            c.apply_env(&env_of(&[("RSTMDB_FSYNC_POLICY", v)]));
            assert_eq!(c.storage.fsync_policy, want, "{v:?}");
            assert_eq!(!c.warnings.is_empty(), warns, "{v:?}: {:?}", c.warnings);
        }
        // every_n:0 is kept and rejected by validation rather than changed.
        let c = with_env("RSTMDB_FSYNC_POLICY", "every_n:0");
        assert_eq!(c.storage.fsync_policy, FsyncPolicy::EveryN(0));
        assert_eq!(key_of(c.validate().unwrap_err()), "storage.fsync_policy");
    }

    #[test]
    fn env_overrides_every_variable() {
        let dir = "/tmp/x";
        let env = env_of(&[
            ("RSTMDB_SHARDS", "7"),
            ("RSTMDB_FRONTENDS", "2"),
            ("RSTMDB_IO_MEMORY_KIB", "4096"),
            ("RSTMDB_BIND", "0.0.0.0:7401"),
            ("RSTMDB_IDLE_TIMEOUT", "9"),
            ("RSTMDB_MAX_CONNECTIONS", "8"),
            ("RSTMDB_DATA", dir),
            ("RSTMDB_WAL_SEGMENT_SIZE_MB", "32"),
            ("RSTMDB_FSYNC_POLICY", "never"),
            ("RSTMDB_MAX_MACHINE_VERSIONS", "3"),
            ("RSTMDB_ALLOW_INSTANCE_RECREATE", "false"),
            ("RSTMDB_ALLOW_FLUSH_ALL", "1"),
            ("RSTMDB_IDEMPOTENCY_WINDOW", "50"),
            ("RSTMDB_IDEMPOTENCY_MAX_AGE_SECS", "60"),
            ("RSTMDB_COMPACT_ENABLED", "0"),
            ("RSTMDB_COMPACT_EVENTS", "11"),
            ("RSTMDB_COMPACT_SIZE_MB", "12"),
            ("RSTMDB_COMPACT_INTERVAL", "13"),
            ("RSTMDB_AUTH_REQUIRED", "true"),
            ("RSTMDB_AUTH_TOKEN_HASH", HASH_B),
            ("RSTMDB_AUTH_SECRETS_FILE", "/s"),
            ("RSTMDB_TLS_ENABLED", "true"),
            ("RSTMDB_TLS_CERT", "/c"),
            ("RSTMDB_TLS_KEY", "/k"),
            ("RSTMDB_TLS_REQUIRE_CLIENT_CERT", "1"),
            ("RSTMDB_TLS_CLIENT_CA", "/ca"),
            ("RSTMDB_METRICS_ENABLED", "TRUE"),
            ("RSTMDB_METRICS_BIND", "127.0.0.1:9999"),
            ("RSTMDB_REPL_ROLE", "Primary"),
            ("RSTMDB_REPL_MODE", "sync"),
            ("RSTMDB_REPL_UPSTREAM", "up:1"),
            ("RSTMDB_REPL_SYNC_REPLICAS", "2"),
            ("RSTMDB_REPL_SYNC_TIMEOUT_MS", "3"),
            ("RSTMDB_REPL_AUTH_TOKEN", "tok"),
            ("RSTMDB_REPL_AUTH_TOKEN_HASH", HASH_A),
            ("RSTMDB_REPL_AUTH_SECRETS_FILE", "/rs"),
            ("RSTMDB_REPL_POLL_INTERVAL_MS", "4"),
            ("RSTMDB_REPL_HEARTBEAT_INTERVAL_SECS", "5"),
            ("RSTMDB_REPL_RECONNECT_DELAY_SECS", "6"),
            ("RSTMDB_REPL_RECONNECT_MAX_DELAY_SECS", "7"),
            ("RSTMDB_REPL_LAG_CHECK_INTERVAL_SECS", "8"),
            ("RSTMDB_REPL_TLS_ENABLED", "1"),
            ("RSTMDB_REPL_TLS_CA", "/rca"),
            ("RSTMDB_REPL_TLS_INSECURE", "true"),
        ]);
        let mut c = Config::default();
        c.auth.token_hashes.push(HASH_A.into());
        c.apply_env(&env);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            c.server,
            ServerConfig {
                shards: Some(7),
                frontends: Some(2),
                io_memory_kib: 4096,
                spin_before_park_us: 0,
                layout: Layout::Colocated,
            }
        );
        assert_eq!(
            c.network,
            NetworkConfig {
                bind_addr: "0.0.0.0:7401".parse().unwrap(),
                idle_timeout_secs: 9,
                max_connections: 8
            }
        );
        assert_eq!(
            c.storage,
            StorageConfig {
                data_dir: dir.into(),
                wal_segment_size_mb: 32,
                fsync_policy: FsyncPolicy::Never,
                max_machine_versions: 3,
                allow_instance_recreate: false,
                allow_flush_all: true,
                idempotency_window: 50,
                idempotency_max_age_secs: 60,
            }
        );
        assert_eq!(
            c.compaction,
            CompactionConfig {
                enabled: false,
                events_threshold: 11,
                size_threshold_mb: 12,
                min_interval_secs: 13,
                wal_retention_secs: 0,
                keep_snapshots: 2,
            }
        );
        assert_eq!(
            c.auth,
            AuthConfig {
                required: true,
                token_hashes: vec![HASH_A.into(), HASH_B.into()],
                secrets_file: Some("/s".into()),
            }
        );
        assert_eq!(
            c.tls,
            TlsConfig {
                enabled: true,
                cert_path: Some("/c".into()),
                key_path: Some("/k".into()),
                require_client_cert: true,
                client_ca_path: Some("/ca".into()),
            }
        );
        assert_eq!(
            c.metrics,
            MetricsConfig {
                enabled: true,
                bind_addr: "127.0.0.1:9999".parse().unwrap()
            }
        );
        assert_eq!(
            c.replication,
            ReplicationConfig {
                role: ReplicationRole::Primary,
                mode: ReplicationMode::Sync,
                upstream: Some("up:1".into()),
                sync_replicas: 2,
                sync_timeout_ms: 3,
                auth_token: Some("tok".into()),
                auth_token_hashes: vec![HASH_A.into()],
                auth_secrets_file: Some("/rs".into()),
                poll_interval_ms: 4,
                heartbeat_interval_secs: 5,
                reconnect_delay_secs: 6,
                reconnect_max_delay_secs: 7,
                lag_check_interval_secs: 8,
                tls_enabled: true,
                tls_ca_path: Some("/rca".into()),
                tls_insecure: true,
                ..ReplicationConfig::default()
            }
        );
    }

    #[test]
    fn env_unparsable_values_are_ignored_with_warning() {
        for (name, value) in [
            ("RSTMDB_SHARDS", "many"),
            ("RSTMDB_FRONTENDS", "-1"),
            ("RSTMDB_IO_MEMORY_KIB", "1k"),
            ("RSTMDB_BIND", "localhost:7401"),
            ("RSTMDB_IDLE_TIMEOUT", "5s"),
            ("RSTMDB_MAX_CONNECTIONS", ""),
            ("RSTMDB_WAL_SEGMENT_SIZE_MB", "64MB"),
            ("RSTMDB_MAX_MACHINE_VERSIONS", "99999999999"),
            ("RSTMDB_IDEMPOTENCY_WINDOW", "lots"),
            ("RSTMDB_IDEMPOTENCY_MAX_AGE_SECS", "1.5"),
            ("RSTMDB_COMPACT_EVENTS", "x"),
            ("RSTMDB_COMPACT_SIZE_MB", "x"),
            ("RSTMDB_COMPACT_INTERVAL", "x"),
            ("RSTMDB_METRICS_BIND", "9090"),
            ("RSTMDB_REPL_ROLE", "leader"),
            ("RSTMDB_REPL_MODE", "semi"),
            ("RSTMDB_REPL_SYNC_REPLICAS", "x"),
            ("RSTMDB_REPL_SYNC_TIMEOUT_MS", "x"),
            ("RSTMDB_REPL_POLL_INTERVAL_MS", "x"),
            ("RSTMDB_REPL_HEARTBEAT_INTERVAL_SECS", "x"),
            ("RSTMDB_REPL_RECONNECT_DELAY_SECS", "x"),
            ("RSTMDB_REPL_RECONNECT_MAX_DELAY_SECS", "x"),
            ("RSTMDB_REPL_LAG_CHECK_INTERVAL_SECS", "x"),
            ("RSTMDB_DATA", ""),
            ("RSTMDB_TLS_CERT", "  "),
            ("RSTMDB_AUTH_TOKEN_HASH", ""),
            ("RSTMDB_REPL_UPSTREAM", ""),
        ] {
            let mut c = with_env(name, value);
            assert_eq!(c.warnings.len(), 1, "{name}={value:?}: {:?}", c.warnings);
            assert!(c.warnings[0].contains(name), "{:?}", c.warnings);
            c.warnings.clear();
            assert_eq!(c, Config::default(), "{name}={value:?} changed the config");
        }
        // Surrounding whitespace is tolerated on numbers.
        let c = with_env("RSTMDB_WAL_SEGMENT_SIZE_MB", " 32 ");
        assert_eq!(c.storage.wal_segment_size_mb, 32);
        // The warnings survive a successful load for main to log.
        let c = load(&Cli::default(), &env_of(&[("RSTMDB_SHARDS", "many")])).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.server.shards, None);
    }

    #[test]
    fn shard_and_frontend_counts_default_by_layout() {
        let s = ServerConfig::default();
        assert_eq!(s.layout, Layout::Colocated);
        assert_eq!(s.shard_count_for(1), 1);
        assert_eq!(s.shard_count_for(2), 1);
        assert_eq!(s.shard_count_for(8), 7);
        assert_eq!(s.shard_count_for(1000), MAX_SHARDS);
        assert_eq!(s.frontend_count_for(7), 7);
        assert_eq!(s.frontend_count_for(MAX_SHARDS), MAX_FRONTENDS);
        let dedicated = ServerConfig {
            layout: Layout::Dedicated,
            frontends: Some(2),
            ..s.clone()
        };
        assert_eq!(dedicated.shard_count_for(2), 1);
        assert_eq!(dedicated.shard_count_for(8), 6);
        assert_eq!(dedicated.frontend_count_for(6), 2);
        let one = ServerConfig {
            layout: Layout::Dedicated,
            ..s.clone()
        };
        assert_eq!(one.frontend_count_for(6), 1);
        assert_eq!(one.shard_count_for(8), 7);
        let fixed = ServerConfig {
            shards: Some(3),
            ..s
        };
        assert_eq!(fixed.shard_count_for(2), 3);
        assert!(ServerConfig::default().shard_count() >= 1);
    }

    /// Makes `c` node 1 of a valid three-node cluster.
    fn cluster_node(c: &mut Config) {
        c.cluster.node_id = Some(1);
        c.cluster.peers = vec!["1=a:1".into(), "2=b:2".into(), "3=c:3".into()];
    }

    #[test]
    fn validation_errors() {
        type Mutator = Box<dyn FnOnce(&mut Config)>;
        let cases: Vec<(&str, Mutator)> = vec![
            ("server.shards", Box::new(|c| c.server.shards = Some(0))),
            ("server.shards", Box::new(|c| c.server.shards = Some(257))),
            (
                "server.frontends",
                Box::new(|c| c.server.frontends = Some(0)),
            ),
            (
                "server.io_memory_kib",
                Box::new(|c| c.server.io_memory_kib = 0),
            ),
            (
                "network.max_connections",
                Box::new(|c| c.network.max_connections = 0),
            ),
            (
                "storage.data_dir",
                Box::new(|c| c.storage.data_dir = PathBuf::new()),
            ),
            (
                "storage.wal_segment_size_mb",
                Box::new(|c| c.storage.wal_segment_size_mb = 0),
            ),
            (
                "storage.wal_segment_size_mb",
                Box::new(|c| c.storage.wal_segment_size_mb = 4097),
            ),
            (
                "storage.fsync_policy",
                Box::new(|c| c.storage.fsync_policy = FsyncPolicy::EveryN(0)),
            ),
            (
                "storage.fsync_policy",
                Box::new(|c| c.storage.fsync_policy = FsyncPolicy::EveryMs(0)),
            ),
            (
                "storage.idempotency_window",
                Box::new(|c| c.storage.idempotency_window = 0),
            ),
            (
                "metrics.bind_addr",
                Box::new(|c| {
                    c.metrics.enabled = true;
                    c.metrics.bind_addr = "0.0.0.0:7401".parse().unwrap();
                }),
            ),
            ("auth.required", Box::new(|c| c.auth.required = true)),
            (
                "auth.token_hashes",
                Box::new(|c| c.auth.token_hashes = vec!["hunter2".into()]),
            ),
            (
                "auth.token_hashes",
                Box::new(|c| c.auth.token_hashes = vec!["0".repeat(64)]),
            ),
            ("tls.cert_path", Box::new(|c| c.tls.enabled = true)),
            (
                "tls.cert_path",
                Box::new(|c| {
                    c.tls.enabled = true;
                    c.tls.cert_path = Some("/c".into());
                }),
            ),
            (
                "tls.client_ca_path",
                Box::new(|c| {
                    c.tls.enabled = true;
                    c.tls.cert_path = Some("/c".into());
                    c.tls.key_path = Some("/k".into());
                    c.tls.require_client_cert = true;
                }),
            ),
            (
                "tls.require_client_cert",
                Box::new(|c| c.tls.require_client_cert = true),
            ),
            (
                "storage.allow_flush_all",
                Box::new(|c| {
                    c.storage.allow_flush_all = true;
                    c.replication.role = ReplicationRole::Primary;
                }),
            ),
            (
                "replication.tls_enabled",
                Box::new(|c| {
                    cluster_node(c);
                    c.replication.tls_enabled = true;
                }),
            ),
            (
                "replication.tls_ca_path",
                Box::new(|c| {
                    cluster_node(c);
                    c.replication.tls_enabled = true;
                    c.tls.cert_path = Some("c.pem".into());
                    c.tls.key_path = Some("k.pem".into());
                }),
            ),
            (
                "storage.allow_flush_all",
                Box::new(|c| {
                    cluster_node(c);
                    c.storage.allow_flush_all = true;
                }),
            ),
        ];
        for (want, mutate) in cases {
            let (key, msg) = invalid_key(mutate);
            assert_eq!(key, want, "{msg}");
            assert!(msg.contains(want), "message should name {want}: {msg}");
        }

        let (key, msg) = invalid_key(|c| c.server.frontends = Some(MAX_FRONTENDS + 1));
        assert_eq!(key, "server.frontends");
        assert!(msg.contains("between 1 and"), "{msg}");

        for role in [ReplicationRole::Primary, ReplicationRole::Replica] {
            let (key, msg) = invalid_key(|c| c.replication.role = role);
            assert_eq!(key, "replication.role");
            assert!(
                msg.contains(&format!(
                    "replication role '{role}' is not supported yet (standalone only)"
                )),
                "{msg}"
            );
        }

        // The hash check does not echo what might be a plaintext token.
        let (_, msg) = invalid_key(|c| c.auth.token_hashes = vec!["hunter2".into()]);
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn valid_edge_values() {
        let mut c = Config::default();
        c.server.shards = Some(MAX_SHARDS);
        c.storage.wal_segment_size_mb = MAX_WAL_SEGMENT_SIZE_MB;
        c.storage.fsync_policy = FsyncPolicy::EveryMs(1);
        c.storage.idempotency_window = 1;
        c.auth.required = true;
        c.auth.secrets_file = Some("/run/secrets/x".into());
        c.auth.token_hashes = vec![HASH_A.to_uppercase()];
        c.tls.enabled = true;
        c.tls.cert_path = Some("/c".into());
        c.tls.key_path = Some("/k".into());
        c.tls.require_client_cert = true;
        c.tls.client_ca_path = Some("/ca".into());
        c.metrics.enabled = true;
        c.storage.allow_flush_all = true;
        c.validate().unwrap();

        // Same port on a different specific address is fine.
        let mut c = Config::default();
        c.metrics.enabled = true;
        c.metrics.bind_addr = "127.0.0.2:7401".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn load_validates() {
        let env = env_of(&[("RSTMDB_REPL_ROLE", "replica")]);
        let err = load(&Cli::default(), &env).unwrap_err();
        assert_eq!(key_of(err), "replication.role");
        let cli = Cli {
            wal_segment_size_mb: Some(0),
            ..Cli::default()
        };
        assert_eq!(
            key_of(load(&cli, &no_env).unwrap_err()),
            "storage.wal_segment_size_mb"
        );
    }

    #[test]
    fn token_hashes_from_config_and_secrets_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write_file(
            &dir,
            "tokens",
            &format!("# tokens\n\n  {}  \r\n{HASH_B}\n", HASH_A.to_uppercase()),
        );
        let auth = AuthConfig {
            required: true,
            token_hashes: vec![HASH_A.into()],
            secrets_file: Some(file),
        };
        assert_eq!(
            auth.load_token_hashes().unwrap(),
            vec![HASH_A.to_string(), HASH_B.to_string()]
        );

        let missing = AuthConfig {
            secrets_file: Some(dir.path().join("missing")),
            ..AuthConfig::default()
        };
        let err = missing.load_token_hashes().unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("auth.secrets_file"), "{err}");

        let plaintext = write_file(&dir, "plain", "# ok\nhunter2\n");
        let err = AuthConfig {
            secrets_file: Some(plaintext),
            ..AuthConfig::default()
        }
        .load_token_hashes()
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");

        let empty = write_file(&dir, "empty", "# nothing yet\n");
        let auth = AuthConfig {
            required: true,
            token_hashes: vec![],
            secrets_file: Some(empty),
        };
        // Passes the static check (a file is named) but has no hash in it.
        Config {
            auth: auth.clone(),
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(
            key_of(auth.load_token_hashes().unwrap_err()),
            "auth.required"
        );
        assert_eq!(
            AuthConfig::default().load_token_hashes().unwrap(),
            Vec::<String>::new()
        );
    }
}

//! Per-operation parameter parsing: turns a request into what the frontend
//! must do with it — answer locally, send to one shard, or fan out.
//!
//! Parameter errors follow the reference: `BAD_REQUEST` with
//! `invalid request: <serde message>`; the connection stays open.

use std::sync::Arc;

use rstmdb_shards::commands::{ApplyEvent, Command};
use rstmdb_shards::definition::MachineDef;
use rstmdb_shards::error::{ApiError, ErrorCode};
use rstmdb_shards::routing;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::security::auth::{self, Authenticator};
use crate::service::session::{Session, WireMode};
use crate::service::subscriptions::Filter;

/// Server version reported by HELLO and INFO (DECISIONS "Identity").
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Features the server announces.
pub const FEATURES: [&str; 3] = ["idempotency", "batch", "wal_read"];
/// Announced besides by a cluster node: our own `CLUSTER_*` operations.
pub const CLUSTER_FEATURE: &str = "cluster";

/// The features this server announces.
fn features(s: &OpSettings) -> Vec<&'static str> {
    let mut f = FEATURES.to_vec();
    if s.cluster.is_some() {
        f.push(CLUSTER_FEATURE);
    }
    f
}
/// Largest LIST_INSTANCES page returned at once (DECISIONS D21).
pub const MAX_LIST_PAGE: usize = 100_000;

/// Settings the op parsers need.
#[derive(Debug, Clone)]
pub struct OpSettings {
    /// `storage.max_machine_versions`.
    pub max_machine_versions: u32,
    /// `storage.allow_instance_recreate`.
    pub allow_instance_recreate: bool,
    /// `storage.allow_flush_all`.
    pub allow_flush_all: bool,
    /// Number of shards.
    pub shards: usize,
    /// Token check (`auth.*`).
    pub auth: Arc<Authenticator>,
    /// This node's place in its cluster (`None`: standalone).
    pub cluster: Option<super::replication_status::ClusterView>,
}

/// What to do with one request.
pub enum Action {
    /// Answer right away.
    Local(Result<Vec<u8>, ApiError>),
    /// Answer, then close the connection (BYE).
    Bye,
    /// Send to one shard.
    Shard(usize, Command),
    /// PUT_MACHINE: every shard logs it.
    PutMachine(Command),
    /// LIST_INSTANCES: merge every shard's sorted share.
    ListInstances {
        /// Machine filter.
        machine: Option<String>,
        /// State filter.
        state: Option<String>,
        /// Items to skip.
        offset: usize,
        /// Items to return.
        limit: usize,
    },
    /// WAL_STATS: sum every shard's figures.
    WalStats,
    /// WATCH_INSTANCE / WATCH_ALL: run by `watch::subscribe`.
    Watch(WatchSpec),
    /// UNWATCH: remove a subscription of this connection.
    Unwatch(String),
    /// BATCH: run by `batch::run` with the raw params.
    Batch(Value),
    /// FLUSH_ALL (enabled): every shard logs it and clears its state.
    FlushAll,
    /// WAL_READ: merge every shard's records in offset order.
    WalRead {
        /// First offset wanted.
        from: u64,
        /// Most records (None = as many as fit a frame).
        limit: Option<u64>,
    },
    /// COMPACT: a snapshot round (see `compaction`).
    Compact {
        /// `force_snapshot`.
        force: bool,
    },
    /// SNAPSHOT_INSTANCE: export one instance to a file.
    SnapshotInstance(usize, String),
    /// CLUSTER_TRANSFER_LEADER (ours): hand the leadership to `to`, or to
    /// the follower furthest along.
    TransferLeader { to: Option<u64> },
}

/// An operation's parameters: JSON text borrowed from the request frame
/// (the connection's path: parsed once, straight into the operation's
/// typed parameters), or a `Value` (an operation inside a BATCH).
pub enum Params<'a> {
    /// Text; `None` when absent or null.
    Raw(Option<&'a RawValue>),
    /// An already parsed value.
    Value(Value),
}

impl Params<'_> {
    /// The typed parameters. Errors read exactly as the reference's (a
    /// `serde_json` message about the value, without a text position).
    fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        match self {
            Params::Value(v) => serde_json::from_value(v).map_err(ApiError::bad_request),
            Params::Raw(raw) => {
                let text = raw.map_or("null", RawValue::get);
                serde_json::from_str(text).or_else(|_| {
                    // Refused straight from the text: decide as the
                    // reference does, from a parsed value, which differs
                    // where the text has a key twice (the value keeps the
                    // last, a typed parse refuses the duplicate). Found by
                    // the `request` fuzz target. Only failures pay for the
                    // second parse.
                    let v: Value = serde_json::from_str(text)
                        .map_err(|e| ApiError::bad_request(without_position(&e)))?;
                    serde_json::from_value(v).map_err(ApiError::bad_request)
                })
            }
        }
    }

    /// The parameters as a `Value` (operations that read them loosely).
    fn into_value(self) -> Result<Value, ApiError> {
        match self {
            Params::Value(v) => Ok(v),
            Params::Raw(None) => Ok(Value::Null),
            Params::Raw(Some(raw)) => serde_json::from_str(raw.get())
                .map_err(|e| ApiError::bad_request(without_position(&e))),
        }
    }

    fn is_null(&self) -> bool {
        match self {
            Params::Value(v) => v.is_null(),
            Params::Raw(raw) => raw.is_none(),
        }
    }
}

/// A `serde_json` error message without its " at line L column C" suffix
/// (the reference parses params from a value, where no position exists).
fn without_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match msg.strip_suffix(&suffix) {
        Some(m) => m.to_owned(),
        None => msg,
    }
}

fn local<T: Serialize>(v: &T) -> Action {
    Action::Local(Ok(
        serde_json::to_vec(v).expect("result serialization cannot fail")
    ))
}

/// Parses one request into an [`Action`].
pub fn plan(op: &str, p: Value, session: &mut Session, s: &OpSettings) -> Action {
    plan_params(op, Params::Value(p), session, s)
}

/// Parses one request whose params are still JSON text (see [`Params`]).
pub fn plan_raw(op: &str, p: Option<&RawValue>, session: &mut Session, s: &OpSettings) -> Action {
    plan_params(op, Params::Raw(p), session, s)
}

fn plan_params(op: &str, p: Params<'_>, session: &mut Session, s: &OpSettings) -> Action {
    match plan_inner(op, p, session, s) {
        Ok(a) => a,
        Err(e) => Action::Local(Err(e)),
    }
}

/// The operation table: the auth check first, then one call per operation.
fn plan_inner(
    op: &str,
    p: Params<'_>,
    session: &mut Session,
    s: &OpSettings,
) -> Result<Action, ApiError> {
    if s.auth.required() && !session.authenticated && !auth::EXEMPT_OPS.contains(&op) {
        return Err(auth::unauthorized());
    }
    Ok(match op {
        "HELLO" => hello(p, session, s)?,
        "AUTH" => authenticate(p, session, s)?,
        "PING" => local(&serde_json::json!({"pong": true})),
        "BYE" => Action::Bye,
        "INFO" => info(s),
        "REPLICATION_STATUS" => local(&super::replication_status::status(s.cluster.as_ref())),
        "CLUSTER_TRANSFER_LEADER" => transfer_leader(p, s)?,
        "PUT_MACHINE" => put_machine(p, s)?,
        "GET_MACHINE" => get_machine(p)?,
        "LIST_MACHINES" => Action::Shard(0, Command::ListMachines),
        "CREATE_INSTANCE" => create_instance(p, s)?,
        "GET_INSTANCE" => get_instance(p, s)?,
        "LIST_INSTANCES" => list_instances(p)?,
        "DELETE_INSTANCE" => delete_instance(p, s)?,
        "APPLY_EVENT" => apply_event(p, s)?,
        "WAL_STATS" => Action::WalStats,
        "FLUSH_ALL" if !s.allow_flush_all => {
            return Err(ApiError::bad_request(
                "FLUSH_ALL is disabled. Set storage.allow_flush_all=true in config to enable.",
            ))
        }
        "FLUSH_ALL" => Action::FlushAll,
        "WATCH_INSTANCE" => watch_instance(p, s)?,
        "WATCH_ALL" => watch_all(p)?,
        "UNWATCH" => unwatch(p)?,
        "BATCH" => Action::Batch(p.into_value()?),
        "REPLICATE" | "REPLICATE_ACK" => {
            return Err(ApiError::bad_request(
                "replication operations are handled internally",
            ))
        }
        "WAL_READ" => wal_read(p)?,
        "SNAPSHOT_INSTANCE" => snapshot_instance(p, s)?,
        "COMPACT" => compact(p)?,
        other => return Err(ApiError::bad_request(format!("unknown operation: {other}"))),
    })
}

/// INFO: the server's identity and limits (its features depend on `s`).
fn info(s: &OpSettings) -> Action {
    local(&serde_json::json!({
        "features": features(s),
        "max_batch_ops": 100,
        "max_frame_bytes": crate::protocol::frame::MAX_PAYLOAD,
        "protocol_version": 1,
        "server_name": "rstmdb",
        "server_version": SERVER_VERSION,
    }))
}

/// GET_MACHINE: shard 0 answers, the authority on every definition (see `router`).
fn get_machine(p: Params<'_>) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct GetMachineParams {
        machine: String,
        version: u32,
    }
    let q: GetMachineParams = p.parse()?;
    Ok(Action::Shard(
        0,
        Command::GetMachine {
            machine: q.machine,
            version: q.version,
        },
    ))
}

/// GET_INSTANCE: to the shard that owns the instance.
fn get_instance(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct GetInstanceParams {
        instance_id: String,
    }
    let q: GetInstanceParams = p.parse()?;
    Ok(Action::Shard(
        routing::shard_for(&q.instance_id, s.shards),
        Command::GetInstance {
            instance_id: q.instance_id,
        },
    ))
}

/// DELETE_INSTANCE, read loosely as the reference does: only a string
/// `instance_id` is required; an `idempotency_key` that is not a string is
/// ignored.
fn delete_instance(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    let p = p.into_value()?;
    let id = match p.get("instance_id") {
        Some(Value::String(id)) => id.clone(),
        _ => return Err(ApiError::bad_request("missing instance_id")),
    };
    let key = p
        .get("idempotency_key")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Action::Shard(
        routing::shard_for(&id, s.shards),
        Command::DeleteInstance {
            instance_id: id,
            idempotency_key: key,
        },
    ))
}

/// UNWATCH: the connection removes the subscription itself.
fn unwatch(p: Params<'_>) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct UnwatchParams {
        subscription_id: String,
    }
    let q: UnwatchParams = p.parse()?;
    Ok(Action::Unwatch(q.subscription_id))
}

/// WAL_READ, with the reference's lenient parsing: from_offset must be a
/// non-negative integer; a limit that is not one is ignored.
fn wal_read(p: Params<'_>) -> Result<Action, ApiError> {
    let p = p.into_value()?;
    let from = p
        .get("from_offset")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::bad_request("missing from_offset"))?;
    let limit = p.get("limit").and_then(Value::as_u64);
    Ok(Action::WalRead { from, limit })
}

/// SNAPSHOT_INSTANCE, read loosely: only a string `instance_id` is required.
fn snapshot_instance(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    let p = p.into_value()?;
    let id = match p.get("instance_id") {
        Some(Value::String(id)) => id.clone(),
        _ => return Err(ApiError::bad_request("missing instance_id")),
    };
    Ok(Action::SnapshotInstance(
        routing::shard_for(&id, s.shards),
        id,
    ))
}

/// COMPACT: the reference treats a non-bool force_snapshot as false.
fn compact(p: Params<'_>) -> Result<Action, ApiError> {
    Ok(Action::Compact {
        force: p
            .into_value()?
            .get("force_snapshot")
            .and_then(Value::as_bool)
            == Some(true),
    })
}

/// CLUSTER_TRANSFER_LEADER: `{"to": node_id}` (optional). A follower
/// forwards it to the leader, which answers once another node leads.
fn transfer_leader(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TransferParams {
        #[serde(default)]
        to: Option<u64>,
    }
    if s.cluster.is_none() {
        return Err(ApiError::bad_request(
            "CLUSTER_TRANSFER_LEADER: this server is not a cluster node",
        ));
    }
    let q: TransferParams = match p {
        Params::Raw(None) => TransferParams { to: None },
        p => p.parse()?,
    };
    Ok(Action::TransferLeader { to: q.to })
}

/// A subscription request.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// WATCH_INSTANCE: (owning shard, id).
    pub instance: Option<(usize, String)>,
    /// Filters of WATCH_ALL.
    pub filter: Filter,
    /// Whether events carry `ctx`.
    pub include_ctx: bool,
    /// Replay from here (D9); None = live only.
    pub from_offset: Option<u64>,
}

fn default_true() -> bool {
    true
}

fn watch_instance(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct WatchInstanceParams {
        instance_id: String,
        #[serde(default = "default_true")]
        include_ctx: bool,
        #[serde(default)]
        from_offset: Option<u64>,
    }
    let q: WatchInstanceParams = p.parse()?;
    let filter = Filter {
        instance_id: Some(q.instance_id.clone()),
        ..Filter::default()
    };
    Ok(Action::Watch(WatchSpec {
        instance: Some((routing::shard_for(&q.instance_id, s.shards), q.instance_id)),
        filter,
        include_ctx: q.include_ctx,
        from_offset: q.from_offset,
    }))
}

fn watch_all(p: Params<'_>) -> Result<Action, ApiError> {
    #[derive(Deserialize, Default)]
    struct WatchAllParams {
        #[serde(default = "default_true")]
        include_ctx: bool,
        #[serde(default)]
        from_offset: Option<u64>,
        #[serde(default)]
        machines: Option<Vec<String>>,
        #[serde(default)]
        from_states: Option<Vec<String>>,
        #[serde(default)]
        to_states: Option<Vec<String>>,
        #[serde(default)]
        events: Option<Vec<String>>,
    }
    let q: WatchAllParams = if p.is_null() {
        WatchAllParams {
            include_ctx: true,
            ..WatchAllParams::default()
        }
    } else {
        p.parse()?
    };
    let set = |v: Option<Vec<String>>| v.unwrap_or_default().into_iter().collect();
    Ok(Action::Watch(WatchSpec {
        instance: None,
        filter: Filter {
            instance_id: None,
            machines: set(q.machines),
            from_states: set(q.from_states),
            to_states: set(q.to_states),
            events: set(q.events),
        },
        include_ctx: q.include_ctx,
        from_offset: q.from_offset,
    }))
}

fn hello(p: Params<'_>, session: &mut Session, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct HelloParams {
        protocol_version: u16,
        #[serde(default)]
        #[allow(dead_code)]
        client_name: Option<String>,
        #[serde(default)]
        wire_modes: Vec<String>,
        #[serde(default)]
        features: Vec<String>,
    }
    let h: HelloParams = p.parse()?;
    if h.protocol_version != 1 {
        return Err(ApiError::new(
            ErrorCode::UnsupportedProtocol,
            format!(
                "unsupported protocol version: {} (this server speaks 1)",
                h.protocol_version
            ),
        ));
    }
    session.wire_mode = if h.wire_modes.iter().any(|m| m == "binary_json") {
        WireMode::Binary
    } else if h.wire_modes.iter().any(|m| m == "jsonl") {
        WireMode::Jsonl
    } else {
        WireMode::Binary
    };
    let features: Vec<&str> = features(s)
        .into_iter()
        .filter(|f| h.features.iter().any(|r| r == f))
        .collect();
    Ok(local(&serde_json::json!({
        "features": features,
        "protocol_version": 1,
        "server_name": "rstmdb",
        "server_version": SERVER_VERSION,
        "wire_mode": session.wire_mode.name(),
    })))
}

/// AUTH: a success authenticates the session for good; a later failure
/// does not revoke it (the reference's rule).
fn authenticate(p: Params<'_>, session: &mut Session, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct AuthParams {
        method: String,
        token: String,
    }
    let a: AuthParams = p.parse()?;
    s.auth.authenticate(&a.method, &a.token)?;
    session.authenticated = true;
    Ok(local(&serde_json::json!({"authenticated": true})))
}

fn put_machine(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct PutMachineParams {
        machine: String,
        version: u32,
        definition: Value,
        #[serde(default)]
        #[allow(dead_code)]
        checksum: Option<IgnoredAny>,
    }
    let q: PutMachineParams = p.parse()?;
    let def = MachineDef::from_json(&q.definition)
        .map(Arc::new)
        .map_err(|e| ApiError::core(ErrorCode::BadRequest, e));
    Ok(Action::PutMachine(Command::PutMachine {
        machine: q.machine,
        version: q.version,
        def,
        raw: Arc::new(q.definition),
        max_versions: s.max_machine_versions,
    }))
}

fn create_instance(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct CreateInstanceParams {
        #[serde(default)]
        instance_id: Option<String>,
        machine: String,
        version: u32,
        #[serde(default)]
        initial_ctx: Option<Value>,
        #[serde(default)]
        idempotency_key: Option<String>,
    }
    let q: CreateInstanceParams = p.parse()?;
    // DECISIONS D1: absent or null → {}, any other non-object is refused.
    let ctx = match q.initial_ctx {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(ApiError::bad_request("initial_ctx must be a JSON object")),
    };
    let id = match (q.instance_id, &q.idempotency_key) {
        (Some(id), _) => id,
        (None, Some(key)) => routing::id_from_idempotency_key(key),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Action::Shard(
        routing::shard_for(&id, s.shards),
        Command::CreateInstance {
            instance_id: id,
            machine: q.machine,
            version: q.version,
            initial_ctx: ctx,
            idempotency_key: q.idempotency_key,
            allow_recreate: s.allow_instance_recreate,
        },
    ))
}

fn list_instances(p: Params<'_>) -> Result<Action, ApiError> {
    #[derive(Deserialize, Default)]
    struct ListInstancesParams {
        #[serde(default)]
        machine: Option<String>,
        #[serde(default)]
        state: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
        #[serde(default)]
        offset: Option<u32>,
    }
    let q: ListInstancesParams = if p.is_null() {
        ListInstancesParams::default()
    } else {
        p.parse()?
    };
    Ok(Action::ListInstances {
        machine: q.machine,
        state: q.state,
        offset: q.offset.unwrap_or(0) as usize,
        limit: (q.limit.unwrap_or(100) as usize).min(MAX_LIST_PAGE),
    })
}

fn apply_event(p: Params<'_>, s: &OpSettings) -> Result<Action, ApiError> {
    #[derive(Deserialize)]
    struct ApplyEventParams {
        instance_id: String,
        event: String,
        #[serde(default)]
        payload: Value,
        #[serde(default)]
        expected_state: Option<String>,
        #[serde(default)]
        expected_wal_offset: Option<u64>,
        #[serde(default)]
        event_id: Option<String>,
        #[serde(default)]
        idempotency_key: Option<String>,
    }
    let q: ApplyEventParams = p.parse()?;
    Ok(Action::Shard(
        routing::shard_for(&q.instance_id, s.shards),
        Command::ApplyEvent(ApplyEvent {
            instance_id: q.instance_id,
            event: q.event,
            payload: q.payload,
            expected_state: q.expected_state,
            expected_wal_offset: q.expected_wal_offset,
            event_id: q.event_id,
            idempotency_key: q.idempotency_key,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every protocol op plus two unknown names.
    fn ops() -> Vec<&'static str> {
        let mut v = crate::protocol::names::OPS.to_vec();
        v.extend(["nope", ""]);
        v
    }

    fn settings() -> OpSettings {
        OpSettings {
            max_machine_versions: 0,
            allow_instance_recreate: true,
            allow_flush_all: false,
            shards: 3,
            auth: Arc::default(),
            cluster: None,
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-zA-Z_ .=!&|()\"0-9]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("instance_id".to_owned()),
                        Just("machine".to_owned()),
                        Just("version".to_owned()),
                        Just("event".to_owned()),
                        Just("payload".to_owned()),
                        Just("definition".to_owned()),
                        Just("initial_ctx".to_owned()),
                        Just("limit".to_owned()),
                        Just("offset".to_owned()),
                        Just("protocol_version".to_owned()),
                        Just("states".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Regression (found by the `request` fuzz target): a key given twice
    /// is decided as the reference decides it, from a parsed value (the
    /// last one wins), not refused by the typed parse of the raw text.
    #[test]
    fn duplicate_keys_plan_as_from_a_value() {
        let text = r#"{"instance_id": "j", "machine": "m", "version": 7, "version": 1}"#;
        let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
        let mut session = Session::default();
        match plan_raw("CREATE_INSTANCE", Some(&raw), &mut session, &settings()) {
            Action::Shard(_, Command::CreateInstance { version, .. }) => assert_eq!(version, 1),
            _ => panic!("not planned as a create"),
        }
        // A real error still reads as the reference's.
        let raw: Box<RawValue> = serde_json::from_str(r#"{"instance_id": 5}"#).unwrap();
        match plan_raw("GET_INSTANCE", Some(&raw), &mut session, &settings()) {
            Action::Local(Err(e)) => assert_eq!(
                e.message,
                "invalid request: invalid type: integer `5`, expected a string"
            ),
            _ => panic!("not refused"),
        }
    }

    proptest! {
        /// Any params for any op: an answer or a routed command, never a
        /// panic; routed commands always target an existing shard.
        #[test]
        fn plan_never_panics(op in prop::sample::select(ops()), params in json_value()) {
            let mut session = Session::default();
            match plan(op, params, &mut session, &settings()) {
                Action::Shard(s, _) => prop_assert!(s < 3),
                Action::Local(Err(e)) => prop_assert!(!e.message.is_empty()),
                _ => {}
            }
        }
    }

    #[test]
    fn initial_ctx_rules() {
        let mut s = Session::default();
        let a = plan(
            "CREATE_INSTANCE",
            serde_json::json!({"machine": "m", "version": 1}),
            &mut s,
            &settings(),
        );
        let Action::Shard(_, Command::CreateInstance { initial_ctx, .. }) = a else {
            panic!("routed")
        };
        assert_eq!(initial_ctx, serde_json::json!({}));
        let a = plan(
            "CREATE_INSTANCE",
            serde_json::json!({"machine": "m", "version": 1, "initial_ctx": 3}),
            &mut s,
            &settings(),
        );
        let Action::Local(Err(e)) = a else {
            panic!("refused")
        };
        assert_eq!(
            e.message,
            "invalid request: initial_ctx must be a JSON object"
        );
    }
}

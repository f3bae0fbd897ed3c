//! The operation names of the protocol (SPEC PROTOCOL §6), used by the
//! request layer and by the metrics' per-operation series.

/// The 25 operation names the protocol knows.
pub const OPS: [&str; 25] = [
    "HELLO",
    "AUTH",
    "PING",
    "BYE",
    "INFO",
    "REPLICATION_STATUS",
    "PUT_MACHINE",
    "GET_MACHINE",
    "LIST_MACHINES",
    "CREATE_INSTANCE",
    "GET_INSTANCE",
    "LIST_INSTANCES",
    "DELETE_INSTANCE",
    "APPLY_EVENT",
    "BATCH",
    "SNAPSHOT_INSTANCE",
    "WAL_READ",
    "WAL_STATS",
    "COMPACT",
    "WATCH_INSTANCE",
    "WATCH_ALL",
    "UNWATCH",
    "FLUSH_ALL",
    "REPLICATE",
    "REPLICATE_ACK",
];

//! Tools run by the same binary: offline (`rstmdb wal verify|dump`) and
//! against a running node (`rstmdb cluster status|transfer-leader`).

pub mod cluster_tool;
pub mod wal_tool;

//! Offline tools run by the same binary (`rstmdb wal verify|dump`).

pub mod wal_tool;

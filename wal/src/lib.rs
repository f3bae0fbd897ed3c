//! Segmented write-ahead log: O_DIRECT group-commit writer and crash recovery.
//!
//! This crate knows nothing of shards, instances or JSON: a record is an
//! offset, a kind byte and opaque payload bytes. See `docs/ARCHITECTURE.md`
//! for the on-disk format and the reasons behind it.

mod error;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod sim;
pub mod storage;
mod writer;

pub use error::WalError;
pub use reader::{read, OwnedRecord, Page, ReadRange};
pub use record::RecordRef;
pub use recovery::{recover, Recovered, RecoveryOptions, TornTail};
pub use storage::WriteMode;
pub use writer::{IoStats, ReaderIo, SegmentInfo, WalWriter, WriterConfig, FSYNC_SECONDS};

/// Largest record payload accepted: 16 MiB (the largest RCP frame) plus
/// room for the record's own envelope, so that any request that fits a
/// frame can be logged.
pub const MAX_RECORD_PAYLOAD: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Record kind reserved for the WAL's own repair records (see `recovery`).
pub const REPAIR_KIND: u8 = 0xFF;

/// Whether `path` lives on tmpfs (where O_DIRECT is unavailable).
pub fn is_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
    // zero-initialised out-parameter.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

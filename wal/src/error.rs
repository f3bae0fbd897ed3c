//! Typed errors of the WAL crate.

use std::path::PathBuf;

/// Everything that can go wrong in the WAL. Callers map these to protocol
/// errors (`WAL_IO_ERROR`) or to a refused start-up.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O call failed (write, fsync, read, create, rename ...).
    #[error("WAL I/O error on {path}: {op}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A record that is not at the torn tail of the newest segment failed its
    /// checks: the log is corrupt there. Start-up stops; nothing is skipped.
    #[error("corrupt WAL record in {path} at byte {position}: {reason}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte position of the bad record inside the file.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// A record's payload exceeds [`crate::MAX_RECORD_PAYLOAD`].
    #[error("WAL record of {0} bytes exceeds the limit of {max} bytes", max = crate::MAX_RECORD_PAYLOAD)]
    RecordTooLarge(usize),
    /// The directory holds a file we cannot use (bad segment header ...).
    #[error("invalid WAL segment {path}: {reason}")]
    BadSegment {
        /// Segment file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The visitor given to recovery refused a record (e.g. undecodable
    /// payload despite a valid CRC).
    #[error("WAL record in {path} at byte {position} could not be applied: {reason}")]
    Replay {
        /// Segment file.
        path: PathBuf,
        /// Byte position of the record.
        position: u64,
        /// The visitor's message.
        reason: String,
    },
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

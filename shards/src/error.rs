//! Error codes of the protocol (PROTOCOL.md §8) and the engine's error type.
//!
//! The engine decides which code an outcome gets, so the code table lives
//! here; the daemon only serializes it.

use serde::Serialize;

/// The 19 error codes clients can parse. Never send anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum ErrorCode {
    UnsupportedProtocol,
    BadRequest,
    Unauthorized,
    AuthFailed,
    NotFound,
    MachineNotFound,
    MachineVersionExists,
    MachineVersionLimitExceeded,
    InstanceNotFound,
    InstanceExists,
    InvalidTransition,
    GuardFailed,
    Conflict,
    WalIoError,
    InternalError,
    RateLimited,
    ReadOnlyMode,
    ReplicationTimeout,
    ReplicationError,
}

impl ErrorCode {
    /// The wire name (`INVALID_TRANSITION`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedProtocol => "UNSUPPORTED_PROTOCOL",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MachineNotFound => "MACHINE_NOT_FOUND",
            ErrorCode::MachineVersionExists => "MACHINE_VERSION_EXISTS",
            ErrorCode::MachineVersionLimitExceeded => "MACHINE_VERSION_LIMIT_EXCEEDED",
            ErrorCode::InstanceNotFound => "INSTANCE_NOT_FOUND",
            ErrorCode::InstanceExists => "INSTANCE_EXISTS",
            ErrorCode::InvalidTransition => "INVALID_TRANSITION",
            ErrorCode::GuardFailed => "GUARD_FAILED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::WalIoError => "WAL_IO_ERROR",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::ReadOnlyMode => "READ_ONLY_MODE",
            ErrorCode::ReplicationTimeout => "REPLICATION_TIMEOUT",
            ErrorCode::ReplicationError => "REPLICATION_ERROR",
        }
    }

    /// `retryable` is a fixed function of the code (PROTOCOL.md §8).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::WalIoError
                | ErrorCode::InternalError
                | ErrorCode::RateLimited
                | ErrorCode::ReplicationTimeout
        )
    }
}

/// An error answer: code plus the message clients print verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// Protocol error code.
    pub code: ErrorCode,
    /// Human-readable message (reference texts where they exist).
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `BAD_REQUEST` with the reference's `invalid request: ` prefix.
    pub fn bad_request(detail: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::BadRequest, format!("invalid request: {detail}"))
    }

    /// An engine error with the reference's `core error: ` prefix.
    pub fn core(code: ErrorCode, detail: impl std::fmt::Display) -> Self {
        ApiError::new(code, format!("core error: {detail}"))
    }

    /// `WAL_IO_ERROR` for a failed commit.
    pub fn wal(detail: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::WalIoError, format!("WAL error: {detail}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::InvalidTransition,
            ErrorCode::MachineVersionLimitExceeded,
            ErrorCode::WalIoError,
        ] {
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
    }
}

//! Bearer-token authentication (PROTOCOL.md §5, §7.2; DECISIONS D10).
//!
//! Tokens are never stored: the configuration holds lowercase-hex SHA-256
//! digests (`rstmdb-cli hash-token`), and AUTH hashes the presented token
//! and compares it with every configured digest in constant time, so the
//! answer's timing says nothing about how close a guess was.

use rstmdb_shards::error::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Operations allowed before a successful AUTH when auth is required. Every
/// other operation, WATCH_INSTANCE and WATCH_ALL included (D10), and every
/// operation inside a BATCH, needs it.
pub const EXEMPT_OPS: [&str; 4] = ["HELLO", "AUTH", "PING", "BYE"];

/// The server's token check, shared by every connection.
pub struct Authenticator {
    /// `auth.required`: operations other than [`EXEMPT_OPS`] need AUTH first.
    required: bool,
    /// Accepted token digests (raw SHA-256 bytes).
    digests: Vec<[u8; 32]>,
}

/// Digests are secrets' fingerprints: `{:?}` prints only how many there are.
impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("required", &self.required)
            .field("digests", &self.digests.len())
            .finish()
    }
}

impl Default for Authenticator {
    /// Auth not required, no tokens.
    fn default() -> Self {
        Self {
            required: false,
            digests: Vec::new(),
        }
    }
}

impl Authenticator {
    /// Builds the check from `auth.required` and the hex digests the
    /// configuration loaded (validated there: 64 hex digits each).
    ///
    /// # Panics
    /// If a digest is not 64 hex digits, or auth is required without any:
    /// configuration validation rules both out before this runs.
    pub fn new(required: bool, hex_digests: &[String]) -> Self {
        let digests: Vec<[u8; 32]> = hex_digests
            .iter()
            .map(|h| decode_hex(h).expect("token hashes are validated at start-up"))
            .collect();
        assert!(
            !required || !digests.is_empty(),
            "auth.required with no token hashes is refused at start-up"
        );
        Self { required, digests }
    }

    /// Whether operations other than [`EXEMPT_OPS`] need a prior AUTH.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The AUTH operation: `Ok` when the session may consider itself
    /// authenticated. Messages are the reference's, byte for byte.
    pub fn authenticate(&self, method: &str, token: &str) -> Result<(), ApiError> {
        if method != "bearer" {
            return Err(ApiError::new(
                ErrorCode::AuthFailed,
                format!("authentication failed: unsupported auth method: {method}"),
            ));
        }
        if !self.required {
            // The reference accepts any non-empty token when auth is off.
            if token.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::AuthFailed,
                    "authentication failed: empty token",
                ));
            }
            return Ok(());
        }
        if self.accepts(token) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::AuthFailed,
                "authentication failed: invalid token",
            ))
        }
    }

    /// True if the token's digest is configured. Compares against every
    /// digest without stopping early.
    fn accepts(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0u8);
        for d in &self.digests {
            found |= d.ct_eq(&digest);
        }
        found.into()
    }
}

/// The answer to an operation sent before AUTH when auth is required.
pub fn unauthorized() -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, "authentication required")
}

/// 64 hex digits (either case) → 32 bytes.
fn decode_hex(h: &str) -> Option<[u8; 32]> {
    let h = h.trim().as_bytes();
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in h.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rstmdb-cli hash-token secret` (sha256sum of "secret").
    const SECRET_HASH: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

    fn required() -> Authenticator {
        Authenticator::new(true, &[SECRET_HASH.to_uppercase(), "ab".repeat(32)])
    }

    fn err(r: Result<(), ApiError>) -> (String, String) {
        let e = r.unwrap_err();
        (e.code.as_str().to_owned(), e.message)
    }

    #[test]
    fn the_right_token_is_accepted_in_any_digest_case() {
        assert!(required().authenticate("bearer", "secret").is_ok());
    }

    #[test]
    fn wrong_tokens_and_methods_fail_with_the_reference_messages() {
        let a = required();
        assert_eq!(
            err(a.authenticate("bearer", "Secret")),
            (
                "AUTH_FAILED".into(),
                "authentication failed: invalid token".into()
            )
        );
        assert_eq!(
            err(a.authenticate("bearer", "")),
            (
                "AUTH_FAILED".into(),
                "authentication failed: invalid token".into()
            )
        );
        // The method is checked first, case-sensitively.
        assert_eq!(
            err(a.authenticate("Bearer", "secret")),
            (
                "AUTH_FAILED".into(),
                "authentication failed: unsupported auth method: Bearer".into()
            )
        );
    }

    #[test]
    fn without_required_auth_any_non_empty_token_passes() {
        let a = Authenticator::default();
        assert!(a.authenticate("bearer", "anything").is_ok());
        assert_eq!(
            err(a.authenticate("bearer", "")),
            (
                "AUTH_FAILED".into(),
                "authentication failed: empty token".into()
            )
        );
        assert_eq!(
            err(a.authenticate("basic", "x")).1,
            "authentication failed: unsupported auth method: basic"
        );
    }

    #[test]
    fn hex_decoding_rejects_what_is_not_a_digest() {
        assert!(decode_hex(&"g".repeat(64)).is_none());
        assert!(decode_hex(&"a".repeat(63)).is_none());
        assert_eq!(decode_hex(&"0f".repeat(32)), Some([0x0f; 32]));
    }
}

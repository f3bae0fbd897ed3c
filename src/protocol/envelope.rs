//! The JSON request envelope and response encoding (PROTOCOL.md §4).

use rstmdb_shards::error::ApiError;
use serde::Deserialize;
use serde_json::Value;

/// A request envelope. `type` must be a string (its value is not checked),
/// `id` a string, `op` a string; `params` defaults to null.
#[derive(Debug, Deserialize)]
pub struct Request {
    #[serde(rename = "type")]
    _kind: String,
    /// Echoed in the response.
    pub id: String,
    /// Operation name (exact, upper case).
    pub op: String,
    /// Operation parameters.
    #[serde(default)]
    pub params: Value,
}

/// Parses an envelope; `None` is fatal for the connection (invalid UTF-8 or
/// JSON, missing or mistyped fields).
pub fn parse(payload: &[u8]) -> Option<Request> {
    serde_json::from_slice(payload).ok()
}

/// Appends the JSON of a successful response carrying `result` (an already
/// serialized JSON object).
pub fn ok_response(id: &str, result: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(br#"{"type":"response","id":"#);
    serde_json::to_writer(&mut *out, id).expect("writing to a Vec cannot fail");
    out.extend_from_slice(br#","status":"ok","result":"#);
    out.extend_from_slice(result);
    out.push(b'}');
}

/// Appends the JSON of an error response.
pub fn error_response(id: &str, err: &ApiError, out: &mut Vec<u8>) {
    out.extend_from_slice(br#"{"type":"response","id":"#);
    serde_json::to_writer(&mut *out, id).expect("writing to a Vec cannot fail");
    out.extend_from_slice(br#","status":"error","error":"#);
    error_object(err, out);
    out.push(b'}');
}

/// Appends an error object `{"code","message","retryable"}`.
pub fn error_object(err: &ApiError, out: &mut Vec<u8>) {
    out.extend_from_slice(br#"{"code":"#);
    serde_json::to_writer(&mut *out, &err.code).expect("writing to a Vec cannot fail");
    out.extend_from_slice(br#","message":"#);
    serde_json::to_writer(&mut *out, &err.message).expect("writing to a Vec cannot fail");
    out.extend_from_slice(if err.code.retryable() {
        br#","retryable":true}"#
    } else {
        br#","retryable":false}"#
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstmdb_shards::error::ErrorCode;

    #[test]
    fn response_bytes_match_the_protocol_examples() {
        let mut out = Vec::new();
        ok_response("1", br#"{"pong":true}"#, &mut out);
        assert_eq!(
            out,
            br#"{"type":"response","id":"1","status":"ok","result":{"pong":true}}"#
        );
        let mut out = Vec::new();
        let err = ApiError::new(
            ErrorCode::InstanceNotFound,
            "core error: instance not found: x",
        );
        error_response("9", &err, &mut out);
        assert_eq!(out.len(), 147);
        assert_eq!(crc32c::crc32c(&out), 0xB3F2_48C9);
    }

    #[test]
    fn envelope_rules() {
        assert!(parse(br#"{"type":"request","id":"1","op":"PING"}"#).is_some());
        assert!(parse(br#"{"type":"x","id":"","op":"PING","extra":1}"#).is_some());
        assert!(parse(br#"{"id":"1","op":"PING"}"#).is_none());
        assert!(parse(br#"{"type":"request","id":1,"op":"PING"}"#).is_none());
        assert!(parse(br#"{"type":"request","id":"1"}"#).is_none());
        assert!(parse(b"").is_none());
        assert!(parse(b"\xff").is_none());
    }
}

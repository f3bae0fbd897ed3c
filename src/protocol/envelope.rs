//! The JSON request envelope and response encoding (PROTOCOL.md §4).

use std::borrow::Cow;

use rstmdb_shards::error::ApiError;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A request envelope, borrowed from the frame. `type` must be a string
/// (its value is not checked), `id` a string, `op` a string; absent or null
/// `params` is `None`. The params stay unparsed text here: each operation
/// parses them once, straight into its own typed parameters
/// (`ops::Params`), instead of building a `Value` tree first.
#[derive(Debug, Deserialize)]
pub struct Request<'a> {
    #[serde(rename = "type", borrow)]
    _kind: Cow<'a, str>,
    /// Echoed in the response.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Operation name (exact, upper case).
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    /// Operation parameters, as JSON text.
    #[serde(default, borrow)]
    pub params: Option<&'a RawValue>,
}

/// Parses an envelope; `None` is fatal for the connection (invalid UTF-8 or
/// JSON, missing or mistyped fields).
pub fn parse(payload: &[u8]) -> Option<Request<'_>> {
    let req: Request<'_> = serde_json::from_slice(payload).ok()?;
    // Raw text is captured without serde_json's nesting limit (128), which
    // a parse into a `Value` enforces; the reference refuses such an
    // envelope. Deep params are rare: only then is the whole payload
    // parsed the reference's way to decide.
    if let Some(p) = req.params {
        if nesting(p.get().as_bytes()) >= DEEP {
            serde_json::from_slice::<serde_json::Value>(payload).ok()?;
        }
    }
    Some(req)
}

/// Nesting at which [`parse`] checks the envelope against serde_json's
/// limit (well below it: the envelope's own object counts too).
const DEEP: usize = 100;

/// The deepest nesting of arrays and objects in JSON text (strings
/// skipped). Stops counting at [`DEEP`].
fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
                if max >= DEEP {
                    return max;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
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
        let r = parse(br#"{"type":"request","id":"a\"b","op":"GET","params":{"x": [1]}}"#).unwrap();
        assert_eq!((&*r.id, &*r.op), ("a\"b", "GET"));
        assert_eq!(r.params.unwrap().get(), r#"{"x": [1]}"#);
        assert!(
            parse(br#"{"type":"request","id":"1","op":"PING","params":null}"#)
                .unwrap()
                .params
                .is_none()
        );
        assert!(parse(br#"{"type":"request","id":"1","op":"PING","params":{"#).is_none());
        // Nesting: the same limit as a parse into a Value.
        for depth in [1, 99, 100, 120, 126, 127, 128, 129, 200, 5000] {
            let text = format!(
                r#"{{"type":"request","id":"d","op":"PING","params":{}"x\"[{{"{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let as_value = serde_json::from_slice::<serde_json::Value>(text.as_bytes()).is_ok();
            assert_eq!(parse(text.as_bytes()).is_some(), as_value, "depth {depth}");
        }
        assert_eq!(nesting(br#"[{"a":"]]]["}, [[]]]"#), 3);
        assert!(parse(br#"{"type":"x","id":"","op":"PING","extra":1}"#).is_some());
        assert!(parse(br#"{"id":"1","op":"PING"}"#).is_none());
        assert!(parse(br#"{"type":"request","id":1,"op":"PING"}"#).is_none());
        assert!(parse(br#"{"type":"request","id":"1"}"#).is_none());
        assert!(parse(b"").is_none());
        assert!(parse(b"\xff").is_none());
    }
}

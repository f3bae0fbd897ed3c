//! Every case of `tests/vectors/` (a copy of `shared/spec/vectors/`) replayed against the real binary
//! over RCP and compared with its `expected` outcome (format and comparison
//! rules in the vectors' README).

mod common;

use common::{frame, retryable, Client, Opts, Server};
use serde_json::{json, Value};

fn vectors(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("vector line"))
        .collect()
}

/// Strict JSON equality: `1`, `1.0` and `true` differ, and so do `0.0` and
/// `-0.0`; object key order is irrelevant.
fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() != y.is_f64() {
                return false;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) if x.is_f64() => p.to_bits() == q.to_bits(),
                _ => x == y,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| strict_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| strict_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Checks an error response against `{code, message}` or
/// `{code, message_prefix}`; returns a description of the mismatch.
fn error_matches(resp: &Value, expected: &Value, machine: &str) -> Result<(), String> {
    if resp["status"] != "error" {
        return Err(format!("expected error {expected}, got {resp}"));
    }
    let e = &resp["error"];
    let code = e["code"].as_str().unwrap_or_default();
    if code != expected["code"] {
        return Err(format!(
            "code {code}, expected {}; message {}",
            expected["code"], e["message"]
        ));
    }
    if e["retryable"] != retryable(code) {
        return Err(format!("retryable flag wrong for {code}"));
    }
    let msg = e["message"].as_str().unwrap_or_default();
    if let Some(m) = expected.get("message").and_then(Value::as_str) {
        let m = m.replace("{machine}", machine);
        if msg != m {
            return Err(format!("message {msg:?}, expected {m:?}"));
        }
    } else if let Some(p) = expected.get("message_prefix").and_then(Value::as_str) {
        if !(msg.starts_with(p)
            || msg
                .strip_prefix("core error: ")
                .is_some_and(|r| r.starts_with(p)))
        {
            return Err(format!("message {msg:?} does not start with {p:?}"));
        }
    }
    Ok(())
}

struct Replayer {
    client: Client,
    tag: String,
    id: u64,
}

impl Replayer {
    fn new(server: &Server) -> Self {
        let tag = format!(
            "{:x}",
            std::process::id() as u64 * 7919
                + std::time::SystemTime::now()
                    .elapsed()
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
        );
        Replayer {
            client: server.client(),
            tag,
            id: 0,
        }
    }

    fn name(&mut self, case: &str) -> String {
        format!("{}-{case}", self.tag)
    }

    /// Sends a request whose params JSON text is given verbatim.
    fn raw_call(&mut self, op: &str, params_text: &str) -> Value {
        self.id += 1;
        let text = format!(
            r#"{{"type":"request","id":"v{}","op":"{op}","params":{params_text}}}"#,
            self.id
        );
        self.client.send(&frame(text.as_bytes()));
        let r = self
            .client
            .read_frame()
            .unwrap_or_else(|| panic!("connection dropped on {op} {params_text}"));
        assert_eq!(r["id"], format!("v{}", self.id));
        r
    }

    fn call(&mut self, op: &str, params: Value) -> Value {
        self.raw_call(op, &params.to_string())
    }
}

#[test]
fn guards_definitions_and_merges_match_the_vectors() {
    let dir = common::data_dir("vectors");
    let server = Server::start(
        dir.path(),
        Opts {
            fsync: "never",
            ..Opts::default()
        },
    );
    let mut r = Replayer::new(&server);
    let mut failures = Vec::new();
    let counts = [
        vectors("guards.jsonl").len(),
        vectors("definitions.jsonl").len(),
        vectors("merge.jsonl").len(),
    ];
    assert_eq!(counts, [271, 73, 33], "every vector file read whole");

    for case in vectors("guards.jsonl") {
        let id = case["id"].as_str().unwrap().to_owned();
        if let Err(e) = guard_case(&mut r, &case) {
            failures.push(format!("{id}: {e}"));
        }
    }
    for case in vectors("definitions.jsonl") {
        let id = case["id"].as_str().unwrap().to_owned();
        if let Err(e) = definition_case(&mut r, &case) {
            failures.push(format!("{id}: {e}"));
        }
    }
    for case in vectors("merge.jsonl") {
        let id = case["id"].as_str().unwrap().to_owned();
        if let Err(e) = merge_case(&mut r, &case) {
            failures.push(format!("{id}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} vector case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn guard_case(r: &mut Replayer, case: &Value) -> Result<(), String> {
    let machine = r.name(case["id"].as_str().unwrap());
    let mut t = json!({"from": "a", "event": "GO", "to": "b"});
    if !case["guard"].is_null() {
        t["guard"] = case["guard"].clone();
    }
    let def = json!({"states": ["a", "b"], "initial": "a", "transitions": [t]});
    let put = r.call(
        "PUT_MACHINE",
        json!({"machine": machine, "version": 1, "definition": def}),
    );
    let exp = &case["expected"];
    if exp["put"] == "ok" {
        if put["status"] != "ok" {
            return Err(format!("put failed: {put}"));
        }
    } else {
        return error_matches(&put, &exp["put"], &machine);
    }
    let inst = format!("{machine}-i");
    let c = r.call(
        "CREATE_INSTANCE",
        json!({"instance_id": inst, "machine": machine, "version": 1, "initial_ctx": case["ctx"]}),
    );
    if c["status"] != "ok" {
        return Err(format!("create failed: {c}"));
    }
    let a = r.call("APPLY_EVENT", json!({"instance_id": inst, "event": "GO"}));
    match exp["apply"].as_str() {
        Some("ok") if a["status"] == "ok" => Ok(()),
        Some("GUARD_FAILED") if a["status"] == "error" && a["error"]["code"] == "GUARD_FAILED" => {
            let want =
                "core error: guard failed: guard failed for transition 'a' -> 'b' on event 'GO'";
            if a["error"]["message"] != want {
                return Err(format!("guard failure message {}", a["error"]["message"]));
            }
            Ok(())
        }
        _ => Err(format!("apply: expected {}, got {a}", exp["apply"])),
    }
}

fn definition_case(r: &mut Replayer, case: &Value) -> Result<(), String> {
    let machine = r.name(case["id"].as_str().unwrap());
    let version = case.get("version").and_then(Value::as_u64).unwrap_or(1);
    let mname = serde_json::to_string(&machine).unwrap();
    for s in case
        .get("setup")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let v = s.get("version").and_then(Value::as_u64).unwrap_or(version);
        let def_text = match s.get("definition_raw").and_then(Value::as_str) {
            Some(raw) => raw.to_owned(),
            None => s["definition"].to_string(),
        };
        let resp = r.raw_call(
            "PUT_MACHINE",
            &format!(r#"{{"machine":{mname},"version":{v},"definition":{def_text}}}"#),
        );
        if resp["status"] != "ok" {
            return Err(format!("setup put failed: {resp}"));
        }
    }
    let def_text = match case.get("definition_raw").and_then(Value::as_str) {
        Some(raw) => raw.to_owned(),
        None => case["definition"].to_string(),
    };
    let put = r.raw_call(
        "PUT_MACHINE",
        &format!(r#"{{"machine":{mname},"version":{version},"definition":{def_text}}}"#),
    );
    let exp = &case["expected"];
    if exp["put"].get("stored_checksum").is_none() {
        return error_matches(&put, &exp["put"], &machine);
    }
    if put["status"] != "ok" {
        return Err(format!("put failed: {put}"));
    }
    let res = &put["result"];
    if res["stored_checksum"] != exp["put"]["stored_checksum"]
        || res["created"] != exp["put"]["created"]
    {
        return Err(format!("put result {res}, expected {}", exp["put"]));
    }
    if res["machine"] != machine.as_str() || res["version"] != version {
        return Err(format!("put result names {res}"));
    }
    let get = r.call(
        "GET_MACHINE",
        json!({"machine": machine, "version": version}),
    );
    if get["status"] != "ok" {
        return Err(format!("get failed: {get}"));
    }
    if !strict_eq(&get["result"]["definition"], &exp["get_definition"]) {
        return Err(format!(
            "definition {}, expected {}",
            get["result"]["definition"], exp["get_definition"]
        ));
    }
    if get["result"]["checksum"] != exp["put"]["stored_checksum"] {
        return Err(format!("GET checksum {}", get["result"]["checksum"]));
    }
    Ok(())
}

fn merge_case(r: &mut Replayer, case: &Value) -> Result<(), String> {
    let machine = r.name(case["id"].as_str().unwrap());
    let def = json!({"states": ["s"], "initial": "s", "transitions": [{"from": "s", "event": "E", "to": "s"}]});
    let put = r.call(
        "PUT_MACHINE",
        json!({"machine": machine, "version": 1, "definition": def}),
    );
    if put["status"] != "ok" {
        return Err(format!("put failed: {put}"));
    }
    let inst = format!("{machine}-i");
    let mut params = json!({"instance_id": inst, "machine": machine, "version": 1});
    if let Some(ctx) = case.as_object().unwrap().get("initial_ctx") {
        params["initial_ctx"] = ctx.clone();
    }
    let c = r.call("CREATE_INSTANCE", params);
    let exp = &case["expected"];
    if exp["create"] != "ok" {
        return error_matches(&c, &exp["create"], &machine);
    }
    if c["status"] != "ok" {
        return Err(format!("create failed: {c}"));
    }
    let mut got = Vec::new();
    for p in case["payloads"].as_array().unwrap() {
        let mut params = json!({"instance_id": inst, "event": "E"});
        if let Some(payload) = p.as_object().unwrap().get("payload") {
            params["payload"] = payload.clone();
        }
        let a = r.call("APPLY_EVENT", params);
        if a["status"] != "ok" {
            return Err(format!("apply failed: {a}"));
        }
        got.push(a["result"]["ctx"].clone());
    }
    let want = exp["apply_ctx"].as_array().cloned().unwrap_or_default();
    if got.len() != want.len() || !got.iter().zip(&want).all(|(g, w)| strict_eq(g, w)) {
        return Err(format!("apply ctx {got:?}, expected {want:?}"));
    }
    let g = r.call("GET_INSTANCE", json!({"instance_id": inst}));
    if !strict_eq(&g["result"]["ctx"], &exp["get_ctx"]) {
        return Err(format!(
            "get ctx {}, expected {}",
            g["result"]["ctx"], exp["get_ctx"]
        ));
    }
    Ok(())
}

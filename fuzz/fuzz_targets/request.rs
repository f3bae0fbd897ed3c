//! The request layer: envelope parsing, then every operation's parameter
//! parsing and planning, then the planned shard command executed against a
//! real engine (one that knows a machine and an instance, so applies,
//! guards and merges are reached).
//!
//! Input: a first byte choosing the mode, then bytes. Mode even: the bytes
//! are a whole frame payload (envelope included). Mode odd: the byte picks
//! one of the 25 operations and the bytes are its `params` text, wrapped in
//! a valid envelope, so the fuzzer spends its time inside the parameters.
//! Nothing may panic; every refusal must be a typed error.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rstmdb::protocol::envelope;
use rstmdb::protocol::names::OPS;
use rstmdb::security::auth::Authenticator;
use rstmdb::service::ops::{self, Action, OpSettings};
use rstmdb::service::session::Session;
use rstmdb_shards::commands::{Command, Reply};
use rstmdb_shards::definition::MachineDef;
use rstmdb_shards::engine::{Engine, EngineLimits, Offsets};
use serde_json::{json, Value};

fn settings() -> OpSettings {
    OpSettings {
        max_machine_versions: 4,
        allow_instance_recreate: true,
        allow_flush_all: true,
        shards: 3,
        auth: Arc::new(Authenticator::new(false, &[])),
    }
}

/// An engine with machine `m` v1 (a guarded transition) and instance `i`.
fn engine() -> Engine {
    let mut e = Engine::new(&EngineLimits {
        idempotency_entries: 64,
        idempotency_max_age_ms: 0,
    });
    let def = json!({"states": ["a", "b"], "initial": "a", "transitions": [
        {"from": "a", "event": "GO", "to": "b", "guard": "ctx.n > 1 && !ctx.blocked"},
        {"from": ["a", "b"], "event": "BACK", "to": "a"}]});
    run(
        &mut e,
        Command::PutMachine {
            machine: "m".into(),
            version: 1,
            def: Ok(Arc::new(MachineDef::from_json(&def).expect("valid"))),
            raw: Arc::new(def),
            max_versions: 0,
        },
    );
    run(
        &mut e,
        Command::CreateInstance {
            instance_id: "i".into(),
            machine: "m".into(),
            version: 1,
            initial_ctx: json!({"n": 2}),
            idempotency_key: Some("k".into()),
            allow_recreate: true,
        },
    );
    e
}

fn run(e: &mut Engine, cmd: Command) -> Reply {
    let mut offsets = Offsets::new(100, 200);
    let r = e.execute(cmd, &mut offsets, 1_700_000_000_000);
    e.take_staged();
    e.commit_done();
    r
}

fn execute(action: Action) {
    match action {
        Action::Shard(shard, cmd) => {
            assert!(shard < 3, "routed outside the shards");
            run(&mut engine(), cmd);
        }
        Action::PutMachine(cmd) => {
            run(&mut engine(), cmd);
        }
        _ => {}
    }
}

fn plan_value(op: &str, params: Value, session: &mut Session, s: &OpSettings) {
    // The elements of a BATCH, one level down, as the batch runner plans
    // them.
    if op == "BATCH" {
        if let Some(list) = params.get("ops").and_then(Value::as_array) {
            for el in list.iter().take(100) {
                if let Some(name) = el.get("op").and_then(Value::as_str) {
                    let p = el.get("params").cloned().unwrap_or(Value::Null);
                    execute(ops::plan(name, p, session, s));
                }
            }
        }
    }
    execute(ops::plan(op, params, session, s));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let s = settings();
    let mut session = Session::default();
    let payload;
    let payload = if mode % 2 == 0 {
        rest
    } else {
        let op = OPS[(mode as usize / 2) % OPS.len()];
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        payload = format!(r#"{{"type":"request","id":"1","op":"{op}","params":{text}}}"#);
        payload.as_bytes()
    };
    let Some(req) = envelope::parse(payload) else {
        return;
    };
    let action = ops::plan_raw(&req.op, req.params, &mut session, &s);
    // The same params parsed from a value must plan the same way (BATCH
    // elements are planned from values).
    let value = req
        .params
        .map(|p| serde_json::from_str::<Value>(p.get()));
    let is_local_err = matches!(action, Action::Local(Err(_)));
    execute(action);
    if let Some(Ok(v)) = value {
        let mut session2 = Session::default();
        let again = ops::plan(&req.op, v.clone(), &mut session2, &s);
        assert_eq!(
            is_local_err,
            matches!(again, Action::Local(Err(_))),
            "raw and value params disagree for {} {}",
            req.op,
            v
        );
        plan_value(&req.op, v, &mut session2, &s);
    }
});

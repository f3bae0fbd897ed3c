//! Black-box protocol tests over raw TCP (PROTOCOL.md §2–§6, D4, D5).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{frame, request_frame, Client, Opts, Server};
use serde_json::{json, Value};

fn ping_payload(id: &str) -> Vec<u8> {
    json!({"type": "request", "id": id, "op": "PING", "params": {}})
        .to_string()
        .into_bytes()
}

#[test]
fn every_framing_and_envelope_error_closes_only_that_connection() {
    let dir = common::data_dir("framing");
    let server = Server::start(dir.path(), Opts::default());
    let good = frame(&ping_payload("1"));
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut f = good.clone();
    f[0] = b'X';
    cases.push(("bad magic", f));
    let mut f = good.clone();
    f[5] = 2;
    cases.push(("bad version", f));
    let mut f = good.clone();
    f[7] |= 0x10;
    cases.push(("reserved flag", f));
    let mut f = good[..18].to_vec();
    f[10..14].copy_from_slice(&(16 * 1024 * 1024 + 1u32).to_be_bytes());
    cases.push(("oversize payload", f));
    let mut f = good.clone();
    let n = f.len();
    f[n - 2] ^= 0x01;
    cases.push(("bad crc", f));
    cases.push(("invalid json", frame(b"{not json")));
    cases.push(("empty payload", frame(b"")));
    cases.push((
        "invalid utf-8",
        frame(b"{\"type\":\"request\",\"id\":\"\xff\",\"op\":\"PING\"}"),
    ));
    cases.push(("missing id", frame(br#"{"type":"request","op":"PING"}"#)));
    cases.push((
        "numeric id",
        frame(br#"{"type":"request","id":1,"op":"PING"}"#),
    ));
    cases.push(("missing type", frame(br#"{"id":"1","op":"PING"}"#)));
    cases.push(("missing op", frame(br#"{"type":"request","id":"1"}"#)));
    cases.push((
        "raw JSON line",
        b"{\"type\":\"request\",\"id\":\"1\",\"op\":\"PING\"}\n".to_vec(),
    ));
    for (name, bytes) in cases {
        let mut c = server.client();
        // A valid request first: its answer must arrive before the close.
        let mut stream = request_frame("before", "PING", &json!({}));
        stream.extend_from_slice(&bytes);
        c.send(&stream);
        let r = c
            .read_frame()
            .unwrap_or_else(|| panic!("{name}: earlier request unanswered"));
        assert_eq!(r["id"], "before", "{name}");
        assert!(
            c.read_frame().is_none(),
            "{name}: connection must be closed without a response"
        );
        // Others are still served.
        let mut other = server.client();
        assert_eq!(other.ok("PING", json!({})), json!({"pong": true}), "{name}");
    }
}

#[test]
fn crc_flag_clear_is_accepted_and_header_extension_ignored() {
    let dir = common::data_dir("crcflag");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let p = ping_payload("7");
    let mut f = frame(&p);
    f[7] = 0;
    f[14..18].copy_from_slice(&[0, 0, 0, 0]);
    c.send(&f);
    assert_eq!(c.read_frame().unwrap()["result"], json!({"pong": true}));
    let mut f = Vec::new();
    f.extend_from_slice(b"RCPX\x00\x01\x00\x01\x00\x04");
    f.extend_from_slice(&(p.len() as u32).to_be_bytes());
    f.extend_from_slice(&crc32c::crc32c(&p).to_be_bytes());
    f.extend_from_slice(b"junk");
    f.extend_from_slice(&p);
    c.send(&f);
    assert_eq!(c.read_frame().unwrap()["id"], "7");
}

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let dir = common::data_dir("pipeline");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "m", "version": 1, "definition": common::order_machine()}),
    );
    let mut bytes = Vec::new();
    let mut expect = Vec::new();
    for i in 0..50 {
        let id = format!("p{i}");
        let (op, params) = match i % 5 {
            0 => (
                "CREATE_INSTANCE",
                json!({"instance_id": format!("inst-{i}"), "machine": "m", "version": 1, "initial_ctx": {"amount": 1}}),
            ),
            1 => (
                "GET_INSTANCE",
                json!({"instance_id": format!("inst-{}", i - 1)}),
            ),
            2 => (
                "APPLY_EVENT",
                json!({"instance_id": format!("inst-{}", i - 2), "event": "PAY"}),
            ),
            3 => ("PING", json!({})),
            _ => ("LIST_INSTANCES", json!({})),
        };
        bytes.extend_from_slice(&request_frame(&id, op, &params));
        expect.push((id, op));
    }
    c.send(&bytes);
    for (id, op) in expect {
        let r = c.read_frame().expect("response");
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["status"], "ok", "{op}: {r}");
        if op == "GET_INSTANCE" {
            assert_eq!(
                r["result"]["state"], "created",
                "a read sees the create before it"
            );
        }
        if op == "APPLY_EVENT" {
            assert_eq!(r["result"]["to_state"], "paid");
        }
    }
}

#[test]
fn a_frame_split_into_tiny_writes_works() {
    let dir = common::data_dir("split");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let bytes = [
        request_frame("a", "PING", &json!({})),
        request_frame("b", "INFO", &json!({})),
    ]
    .concat();
    for chunk in bytes.chunks(3) {
        c.stream.write_all(chunk).unwrap();
        c.stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.read_frame().unwrap()["id"], "a");
    let info = c.read_frame().unwrap();
    assert_eq!(info["id"], "b");
    assert_eq!(info["result"]["max_frame_bytes"], 16777216);
    assert_eq!(info["result"]["server_name"], "rstmdb");
}

#[test]
fn unknown_op_is_bad_request_and_the_connection_stays_open() {
    // DECISIONS D4
    let dir = common::data_dir("d4");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    for op in ["NOPE", "ping", "Put_Machine"] {
        let (code, msg) = c.err(op, json!({}));
        assert_eq!(code, "BAD_REQUEST");
        assert_eq!(msg, format!("invalid request: unknown operation: {op}"));
    }
    assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
}

#[test]
fn hello_with_another_protocol_version_is_unsupported_protocol() {
    // DECISIONS D5
    let dir = common::data_dir("d5");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let (code, msg) = c.err("HELLO", json!({"protocol_version": 2}));
    assert_eq!(code, "UNSUPPORTED_PROTOCOL");
    assert!(msg.contains("unsupported protocol version: 2"), "{msg}");
    let r = c.ok("HELLO", json!({"protocol_version": 1, "client_name": "t", "wire_modes": ["binary_json"], "features": ["batch", "zzz"]}));
    assert_eq!(r["wire_mode"], "binary_json");
    assert_eq!(r["features"], json!(["batch"]));
    assert_eq!(r["protocol_version"], 1);
    let (code, _) = c.err("HELLO", json!({}));
    assert_eq!(code, "BAD_REQUEST");
}

#[test]
fn jsonl_output_mode_and_bye() {
    let dir = common::data_dir("jsonl");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    c.send(&request_frame(
        "1",
        "HELLO",
        &json!({"protocol_version": 1, "wire_modes": ["jsonl"]}),
    ));
    let mut reader = std::io::BufReader::new(c.stream.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let v: Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(v["result"]["wire_mode"], "jsonl");
    // Client→server stays binary; a BYE is answered then the connection closes,
    // and requests pipelined after it are discarded.
    let bytes = [
        request_frame("2", "PING", &json!(null)),
        request_frame("3", "BYE", &json!(null)),
        request_frame("4", "PING", &json!({})),
    ]
    .concat();
    c.send(&bytes);
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["result"],
        json!({"pong": true})
    );
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["result"],
        json!({"goodbye": true})
    );
    line.clear();
    assert_eq!(
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0),
        0,
        "closed after BYE: {line}"
    );
}

#[test]
fn operation_level_errors_keep_the_connection_and_ops_not_yet_built_answer_clearly() {
    let dir = common::data_dir("opserr");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let (code, msg) = c.err("PUT_MACHINE", json!({"machine": "m", "definition": {}}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("BAD_REQUEST", "invalid request: missing field `version`")
    );
    let (code, _) = c.err("GET_INSTANCE", json!({"instance_id": 5}));
    assert_eq!(code, "BAD_REQUEST");
    let (code, msg) = c.err("DELETE_INSTANCE", json!({}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("BAD_REQUEST", "invalid request: missing instance_id")
    );
    let (code, msg) = c.err("FLUSH_ALL", json!({}));
    assert_eq!(code, "BAD_REQUEST");
    assert_eq!(msg, "invalid request: FLUSH_ALL is disabled. Set storage.allow_flush_all=true in config to enable.");
    let (code, msg) = c.err("REPLICATE", json!({}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "BAD_REQUEST",
            "invalid request: replication operations are handled internally"
        )
    );
    let (code, msg) = c.err("SNAPSHOT_INSTANCE", json!({"instance_id": 7}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("BAD_REQUEST", "invalid request: missing instance_id")
    );
    let (code, msg) = c.err("AUTH", json!({"method": "basic", "token": "x"}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "AUTH_FAILED",
            "authentication failed: unsupported auth method: basic"
        )
    );
    let (code, msg) = c.err("AUTH", json!({"method": "bearer", "token": ""}));
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("AUTH_FAILED", "authentication failed: empty token")
    );
    assert_eq!(
        c.ok("AUTH", json!({"method": "bearer", "token": "t"})),
        json!({"authenticated": true})
    );
    assert_eq!(
        c.ok("REPLICATION_STATUS", json!(null)),
        json!({"role": "standalone"})
    );
    assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
}

#[test]
fn over_max_connections_is_closed_without_bytes() {
    const MAX: usize = 5;
    let dir = common::data_dir("maxconn");
    let opts = Opts {
        extra_env: vec![("RSTMDB_MAX_CONNECTIONS".into(), MAX.to_string())],
        ..Opts::default()
    };
    let server = Server::start(dir.path(), opts);
    // Let the server see the start-up probe connection close.
    std::thread::sleep(Duration::from_millis(300));
    let mut first: Vec<Client> = (0..MAX).map(|_| server.client()).collect();
    for c in first.iter_mut() {
        assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
    }
    // max_connections + 5: the extra five are closed without a byte, even
    // when they send a request.
    for i in 0..5 {
        let mut extra = Client::connect(server.addr);
        let _ = extra
            .stream
            .write_all(&common::request_frame("1", "PING", &json!({})));
        extra
            .stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        match extra.stream.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "extra connection {i} got bytes: {got:?}"),
            // A reset (the request arrived after the close) is a close too.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    // The first ones still work.
    for c in first.iter_mut() {
        assert_eq!(c.ok("PING", json!({})), json!({"pong": true}));
    }
    // A freed slot is usable again.
    drop(first.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut d = server.client();
    assert_eq!(d.ok("PING", json!({})), json!({"pong": true}));
}

#[test]
fn hello_switches_the_mode_from_its_own_answer_on() {
    let dir = common::data_dir("hellomode");
    let server = Server::start(dir.path(), Opts::default());
    let mut c = server.client();
    let bytes = [
        request_frame("1", "PING", &json!({})),
        request_frame(
            "2",
            "HELLO",
            &json!({"protocol_version": 1, "wire_modes": ["jsonl"]}),
        ),
        request_frame("3", "PING", &json!({})),
    ]
    .concat();
    c.send(&bytes);
    assert_eq!(
        c.read_frame().unwrap()["id"],
        "1",
        "answered in binary before the HELLO"
    );
    let mut reader = std::io::BufReader::new(c.stream.try_clone().unwrap());
    for id in ["2", "3"] {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["id"], id);
    }
}

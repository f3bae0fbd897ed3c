//! Token authentication and TLS/mTLS, driven with the real `rstmdb-cli`
//! 0.3.0 (installed by `make tools`) and with raw RCP frames.
//!
//! Certificates come from the server's own `--gen-dev-certs`, so these tests
//! also check that what it writes is accepted by a real TLS client.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cli_path, dev_certs, CliOut as Out, Client, Opts, Server};
use serde_json::json;

/// Runs `rstmdb-cli -s <server> ARGS` with `env` set (and `RSTMDB_TOKEN`
/// removed unless `env` sets it).
fn cli(server: &Server, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(cli_path());
    cmd.arg("-s")
        .arg(server.addr.to_string())
        .args(args)
        .env_remove("RSTMDB_TOKEN")
        .env_remove("RSTMDB_TLS")
        .env("HOME", server.data.as_os_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run rstmdb-cli");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn expect_ok(server: &Server, args: &[&str], env: &[(&str, &str)]) -> String {
    let o = cli(server, args, env);
    assert_eq!(
        o.code,
        0,
        "rstmdb-cli {args:?} failed: {}{}\nserver log:\n{}",
        o.stdout,
        o.stderr,
        server.log_text()
    );
    o.stdout
}

fn expect_fail(server: &Server, args: &[&str], env: &[(&str, &str)]) -> String {
    let o = cli(server, args, env);
    assert_eq!(
        o.code, 1,
        "rstmdb-cli {args:?} should fail: {}{}",
        o.stdout, o.stderr
    );
    o.stderr
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).to_str().unwrap().to_owned()
}

fn tls_env(certs: &Path, mtls: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("RSTMDB_TLS_ENABLED".to_owned(), "true".to_owned()),
        ("RSTMDB_TLS_CERT".to_owned(), path(certs, "server.pem")),
        ("RSTMDB_TLS_KEY".to_owned(), path(certs, "server-key.pem")),
    ];
    if mtls {
        env.push(("RSTMDB_TLS_REQUIRE_CLIENT_CERT".into(), "1".into()));
        env.push(("RSTMDB_TLS_CLIENT_CA".into(), path(certs, "ca.pem")));
    }
    env
}

fn start(name: &str, env: Vec<(String, String)>) -> (tempfile::TempDir, Server) {
    let dir = common::data_dir(name);
    let opts = Opts {
        shards: 1,
        extra_env: env,
        ..Opts::default()
    };
    let server = Server::start(dir.path(), opts);
    (dir, server)
}

#[test]
fn tls_with_rstmdb_cli_verifies_the_server_certificate() {
    let certs = dev_certs("tls-certs");
    let other = dev_certs("tls-other-ca");
    let (_d, server) = start("tls", tls_env(certs.path(), false));
    let ca = path(certs.path(), "ca.pem");

    assert_eq!(
        expect_ok(&server, &["--tls", "--ca-cert", &ca, "ping"], &[]).trim(),
        "PONG"
    );
    // `--ca-cert` alone implies TLS; a full round trip of writes and reads.
    expect_ok(
        &server,
        &[
            "--ca-cert",
            &ca,
            "put-machine",
            "-n",
            "m",
            "-v",
            "1",
            r#"{"states":["a","b"],"initial":"a","transitions":[{"from":"a","event":"GO","to":"b"}]}"#,
        ],
        &[],
    );
    expect_ok(
        &server,
        &[
            "--ca-cert",
            &ca,
            "create-instance",
            "-m",
            "m",
            "-V",
            "1",
            "-i",
            "i1",
        ],
        &[],
    );
    expect_ok(
        &server,
        &["--ca-cert", &ca, "apply-event", "-i", "i1", "-e", "GO"],
        &[],
    );
    let got = expect_ok(&server, &["--ca-cert", &ca, "get-instance", "i1"], &[]);
    assert!(got.contains("State: b"), "{got}");

    // A server certificate from another CA is refused by the client.
    let e = expect_fail(
        &server,
        &["--tls", "--ca-cert", &path(other.path(), "ca.pem"), "ping"],
        &[],
    );
    assert!(!e.is_empty());
    // Plain RCP to a TLS listener: no answer, the connection is closed.
    expect_fail(&server, &["ping"], &[]);
    let mut raw = Client::connect(server.addr);
    raw.send(&common::request_frame("1", "PING", &json!({})));
    // At most a TLS alert comes back, never an RCP frame, then EOF.
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut got = Vec::new();
    let ended = std::io::Read::read_to_end(&mut raw.stream, &mut got);
    assert!(ended.is_ok(), "closed by the server: {ended:?}");
    assert!(!got.starts_with(b"RCPX"), "no RCP answer: {got:?}");
    // The server keeps serving TLS clients after those failures.
    expect_ok(&server, &["--ca-cert", &ca, "ping"], &[]);
}

#[test]
fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let certs = dev_certs("mtls-certs");
    let other = dev_certs("mtls-other-ca");
    let (_d, server) = start("mtls", tls_env(certs.path(), true));
    let ca = path(certs.path(), "ca.pem");
    let good = [
        "--ca-cert",
        &ca,
        "--client-cert",
        &path(certs.path(), "client.pem"),
        "--client-key",
        &path(certs.path(), "client-key.pem"),
    ];
    let mut args = good.to_vec();
    args.push("ping");
    assert_eq!(expect_ok(&server, &args, &[]).trim(), "PONG");

    // No client certificate.
    expect_fail(&server, &["--tls", "--ca-cert", &ca, "ping"], &[]);
    // A client certificate signed by another CA.
    let (oc, ok) = (
        path(other.path(), "client.pem"),
        path(other.path(), "client-key.pem"),
    );
    expect_fail(
        &server,
        &[
            "--ca-cert",
            &ca,
            "--client-cert",
            &oc,
            "--client-key",
            &ok,
            "ping",
        ],
        &[],
    );
    expect_ok(&server, &args, &[]);
}

#[test]
fn token_auth_with_rstmdb_cli_and_hash_token_output() {
    // The hash as the CLI prints it goes straight into the config file.
    let hash = {
        let out = Command::new(cli_path())
            .args(["hash-token", "s3cret-token"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(hash.len(), 64);
    let conf_dir = common::data_dir("auth-conf");
    let conf = conf_dir.path().join("rstmdb.yaml");
    std::fs::write(
        &conf,
        format!("auth:\n  required: true\n  token_hashes:\n    - \"{hash}\"\n"),
    )
    .unwrap();
    let (_d, server) = start(
        "auth",
        vec![("RSTMDB_CONFIG".into(), conf.to_str().unwrap().into())],
    );

    let info = expect_ok(&server, &["-t", "s3cret-token", "info"], &[]);
    assert!(info.contains("server_name"), "{info}");
    expect_ok(&server, &["info"], &[("RSTMDB_TOKEN", "s3cret-token")]);

    let e = expect_fail(&server, &["-t", "wrong", "info"], &[]);
    assert!(
        e.contains("AUTH_FAILED") && e.contains("invalid token"),
        "{e}"
    );
    let e = expect_fail(&server, &["info"], &[]);
    assert!(
        e.contains("UNAUTHORIZED") && e.contains("authentication required"),
        "{e}"
    );
    // PING needs no authentication.
    assert_eq!(expect_ok(&server, &["ping"], &[]).trim(), "PONG");
    // An empty RSTMDB_TOKEN still sends AUTH, which fails.
    let e = expect_fail(&server, &["info"], &[("RSTMDB_TOKEN", "")]);
    assert!(e.contains("AUTH_FAILED"), "{e}");
}

#[test]
fn without_required_auth_an_empty_token_fails_as_in_the_reference() {
    let (_d, server) = start("auth-off", Vec::new());
    let e = expect_fail(&server, &["ping"], &[("RSTMDB_TOKEN", "")]);
    assert!(
        e.contains("AUTH_FAILED") && e.contains("empty token"),
        "{e}"
    );
    assert_eq!(
        expect_ok(&server, &["-t", "anything", "ping"], &[]).trim(),
        "PONG"
    );
}

/// The SHA-256 of "secret".
const SECRET_HASH: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

#[test]
fn every_op_but_hello_auth_ping_bye_needs_auth_watches_included() {
    let (_d, server) = start(
        "auth-ops",
        vec![
            ("RSTMDB_AUTH_REQUIRED".into(), "true".into()),
            ("RSTMDB_AUTH_TOKEN_HASH".into(), SECRET_HASH.into()),
        ],
    );
    let mut c = server.client();
    let unauthorized = (
        "UNAUTHORIZED".to_owned(),
        "authentication required".to_owned(),
    );
    c.ok("HELLO", json!({"protocol_version": 1}));
    c.ok("PING", json!({}));
    for (op, params) in [
        ("INFO", json!({})),
        ("WATCH_ALL", json!({})),
        ("WATCH_INSTANCE", json!({"instance_id": "x"})),
        ("UNWATCH", json!({"subscription_id": "x"})),
        ("GET_INSTANCE", json!({"instance_id": "x"})),
        ("LIST_MACHINES", json!({})),
        ("WAL_STATS", json!({})),
        (
            "BATCH",
            json!({"mode": "best_effort", "ops": [{"op": "PING"}]}),
        ),
        // Checked before the params: even malformed ones get UNAUTHORIZED.
        ("APPLY_EVENT", json!({})),
    ] {
        assert_eq!(c.err(op, params), unauthorized, "{op}");
    }
    assert_eq!(
        c.err("AUTH", json!({"method": "bearer", "token": "nope"})),
        (
            "AUTH_FAILED".to_owned(),
            "authentication failed: invalid token".to_owned()
        )
    );
    assert_eq!(c.err("INFO", json!({})), unauthorized);
    c.ok("AUTH", json!({"method": "bearer", "token": "secret"}));
    c.ok("INFO", json!({}));
    let sub = c.ok("WATCH_ALL", json!({}));
    assert!(sub["subscription_id"].is_string(), "{sub}");
    // A later failed AUTH does not revoke the session.
    c.err("AUTH", json!({"method": "bearer", "token": "nope"}));
    c.ok("LIST_MACHINES", json!({}));

    // Another connection is not authenticated by this one.
    let mut other = server.client();
    assert_eq!(other.err("WATCH_ALL", json!({})), unauthorized);
}

#[test]
fn start_up_refuses_incomplete_auth_and_tls_settings() {
    let refused = |name: &str, env: Vec<(&str, &str)>, expect: &str| {
        let dir = common::data_dir(name);
        let opts = Opts {
            shards: 1,
            extra_env: env
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Opts::default()
        };
        let mut s = Server::spawn(dir.path(), opts);
        let (code, log) = s.wait_exit(Duration::from_secs(30));
        assert!(matches!(code, Some(1 | 2)), "{name}: exit {code:?}: {log}");
        assert!(
            log.contains(expect),
            "{name}: expected {expect:?} in: {log}"
        );
    };
    refused(
        "no-hashes",
        vec![("RSTMDB_AUTH_REQUIRED", "1")],
        "auth.required",
    );
    refused(
        "secrets-unreadable",
        vec![
            ("RSTMDB_AUTH_REQUIRED", "1"),
            ("RSTMDB_AUTH_SECRETS_FILE", "/nonexistent/rstmdb-secrets"),
        ],
        "/nonexistent/rstmdb-secrets",
    );
    refused(
        "tls-no-key",
        vec![("RSTMDB_TLS_ENABLED", "1"), ("RSTMDB_TLS_CERT", "/x.pem")],
        "tls.key_path",
    );
    refused(
        "mtls-no-ca",
        vec![
            ("RSTMDB_TLS_ENABLED", "1"),
            ("RSTMDB_TLS_CERT", "/x.pem"),
            ("RSTMDB_TLS_KEY", "/y.pem"),
            ("RSTMDB_TLS_REQUIRE_CLIENT_CERT", "1"),
        ],
        "tls.client_ca_path",
    );
    refused(
        "tls-missing-cert",
        vec![
            ("RSTMDB_TLS_ENABLED", "1"),
            ("RSTMDB_TLS_CERT", "/nonexistent/server.pem"),
            ("RSTMDB_TLS_KEY", "/nonexistent/server-key.pem"),
        ],
        "/nonexistent/server.pem",
    );
}

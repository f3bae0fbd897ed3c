//! Compatibility with the real `rstmdb-cli` 0.3.0: drive it against the
//! real binary and assert on what it prints and its exit codes.
//!
//! The CLI is installed into `.tools/` by `make tools` (which `make test`
//! and `.ci/run` call); `RSTMDB_CLI` may point elsewhere.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{cli_path, CliOut as Out, Opts, Server};

fn cli(server: &Server, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = Command::new(cli_path());
    cmd.arg("-s")
        .arg(server.addr.to_string())
        .args(args)
        .env_remove("RSTMDB_TOKEN")
        .env("HOME", server.data.as_os_str());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run rstmdb-cli");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(server: &Server, args: &[&str]) -> String {
    let o = cli(server, args, None);
    assert_eq!(
        o.code, 0,
        "rstmdb-cli {args:?} failed: {}{}",
        o.stdout, o.stderr
    );
    o.stdout
}

fn fails(server: &Server, args: &[&str]) -> String {
    let o = cli(server, args, None);
    assert_eq!(
        o.code, 1,
        "rstmdb-cli {args:?} should exit 1: {}{}",
        o.stdout, o.stderr
    );
    o.stderr
}

const ORDER: &str = r#"{"states":["created","paid","shipped"],"initial":"created","transitions":[{"from":"created","event":"PAY","to":"paid","guard":"ctx.amount > 0 && !ctx.blocked"},{"from":"paid","event":"SHIP","to":"shipped"}],"meta":{"team":"ops"}}"#;
// The same definition with other key order and whitespace.
const ORDER_REORDERED: &str = r#"{ "meta": {"team":"ops"}, "transitions": [ {"to":"paid","event":"PAY","from":["created"],"guard":"ctx.amount > 0 && !ctx.blocked"}, {"event":"SHIP","from":"paid","to":"shipped"} ], "initial": "created", "states": ["created","paid","shipped"] }"#;

#[test]
fn rstmdb_cli_works_unchanged() {
    let dir = common::data_dir("cli");
    let server = Server::start(dir.path(), Opts::default());

    assert_eq!(ok(&server, &["ping"]), "PONG\n");
    let info: serde_json::Value = serde_json::from_str(&ok(&server, &["info"])).unwrap();
    assert_eq!(info["server_name"], "rstmdb");
    assert_eq!(info["max_batch_ops"], 100);
    assert_eq!(
        ok(&server, &["replication-status"]).trim(),
        "Server is not configured for replication"
    );

    // put-machine inline, then the same definition from a file in another key order.
    assert_eq!(
        ok(&server, &["list-machines"]).trim(),
        "No machines registered"
    );
    let out = ok(&server, &["put-machine", "-n", "order", "-v", "1", ORDER]);
    let checksum = out
        .trim()
        .strip_prefix("Created machine order v1 (checksum: ")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert_eq!(checksum.len(), 8);
    let file = dir.path().join("order.json");
    std::fs::write(&file, ORDER_REORDERED).unwrap();
    let at = format!("@{}", file.display());
    assert_eq!(
        ok(&server, &["put-machine", "-n", "order", "-v", "1", &at]).trim(),
        format!("Already exists machine order v1 (checksum: {checksum})")
    );
    let err = fails(
        &server,
        &[
            "put-machine",
            "-n",
            "order",
            "-v",
            "1",
            r#"{"states":["a"],"initial":"a","transitions":[]}"#,
        ],
    );
    assert!(
        err.contains("server error: MACHINE_VERSION_EXISTS"),
        "{err}"
    );
    let err = fails(
        &server,
        &[
            "put-machine",
            "-n",
            "bad",
            "-v",
            "1",
            r#"{"states":["a"],"initial":"x","transitions":[]}"#,
        ],
    );
    assert!(err.contains("Error: server error: BAD_REQUEST - core error: invalid machine definition: initial state 'x' not in states list"), "{err}");
    let err = fails(
        &server,
        &[
            "put-machine",
            "-n",
            "bad",
            "-v",
            "1",
            r#"{"states":["a","b"],"initial":"a","transitions":[{"from":"a","event":"E","to":"b","guard":"ctx.a ==="}]}"#,
        ],
    );
    assert!(
        err.contains("server error: BAD_REQUEST - core error: invalid guard expression"),
        "{err}"
    );
    ok(&server, &["put-machine", "-n", "order", "-v", "2", ORDER]);

    let got = ok(&server, &["get-machine", "-n", "order", "-v", "1"]);
    assert!(got.starts_with("Machine order v1\n"), "{got}");
    let def: serde_json::Value = serde_json::from_str(got.split_once('\n').unwrap().1).unwrap();
    assert_eq!(
        def["transitions"][1]["from"],
        serde_json::json!(["paid"]),
        "from normalized to an array"
    );
    assert_eq!(
        ok(&server, &["list-machines"]).trim_end(),
        "  order v2 (3 states, 2 transitions)"
    );
    let err = fails(&server, &["get-machine", "-n", "order", "-v", "9"]);
    assert!(
        err.contains("MACHINE_NOT_FOUND - core error: machine version not found: order v9"),
        "{err}"
    );

    // create-instance with and without id and ctx.
    let out = ok(
        &server,
        &[
            "create-instance",
            "-m",
            "order",
            "-V",
            "1",
            "-i",
            "o-1",
            "-c",
            r#"{"amount":10}"#,
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "Created instance o-1",
            "  Machine: order v1",
            "  State: created"
        ]
    );
    let create_offset: u64 = lines[3]
        .strip_prefix("  WAL offset: ")
        .unwrap()
        .parse()
        .unwrap();
    let out = ok(&server, &["create-instance", "-m", "order", "-V", "1"]);
    let generated = out
        .lines()
        .next()
        .unwrap()
        .strip_prefix("Created instance ")
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let err = fails(
        &server,
        &["create-instance", "-m", "order", "-V", "1", "-i", "o-1"],
    );
    assert!(err.contains("INSTANCE_EXISTS"), "{err}");
    let err = fails(
        &server,
        &["create-instance", "-m", "nope", "-V", "1", "-i", "o-x"],
    );
    assert!(err.contains("MACHINE_NOT_FOUND"), "{err}");

    // get-instance of an instance created without ctx: {} (DECISIONS D1).
    let out = ok(&server, &["get-instance", &generated]);
    assert!(out.contains("  State: created\n  Context: {}\n"), "{out}");

    // apply-event: payload merged; offsets increase.
    let out = ok(
        &server,
        &[
            "apply-event",
            "-i",
            "o-1",
            "-e",
            "PAY",
            "-p",
            r#"{"paid_by":"card"}"#,
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["Applied event PAY on o-1", "  created → paid"]);
    let apply_offset: u64 = lines[2]
        .strip_prefix("  WAL offset: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(apply_offset > create_offset);
    let out = ok(&server, &["get-instance", "o-1"]);
    assert_eq!(
        out,
        format!("Instance o-1\n  Machine: order v1\n  State: paid\n  Context: {{\n  \"amount\": 10,\n  \"paid_by\": \"card\"\n}}\n  Last WAL offset: {apply_offset}\n")
    );
    // Guard failure, OCC conflict, invalid transition.
    ok(
        &server,
        &[
            "create-instance",
            "-m",
            "order",
            "-V",
            "1",
            "-i",
            "o-2",
            "-c",
            r#"{"amount":0}"#,
        ],
    );
    let err = fails(&server, &["apply-event", "-i", "o-2", "-e", "PAY"]);
    assert!(err.contains("Error: server error: GUARD_FAILED - core error: guard failed: guard failed for transition 'created' -> 'paid' on event 'PAY'"), "{err}");
    let err = fails(
        &server,
        &[
            "apply-event",
            "-i",
            "o-1",
            "-e",
            "SHIP",
            "--expected-state",
            "created",
        ],
    );
    assert!(err.contains("Error: server error: CONFLICT - core error: state conflict: expected 'created', actual 'paid'"), "{err}");
    let err = fails(&server, &["apply-event", "-i", "o-1", "-e", "PAY"]);
    assert!(err.contains("Error: server error: INVALID_TRANSITION - core error: invalid transition: cannot apply 'PAY' in state 'paid'"), "{err}");
    let out = ok(
        &server,
        &[
            "apply-event",
            "-i",
            "o-1",
            "-e",
            "SHIP",
            "--expected-state",
            "paid",
        ],
    );
    assert!(out.contains("  paid → shipped\n"), "{out}");
    let err = fails(
        &server,
        &["apply-event", "-i", "o-1", "-e", "X", "-p", "{not json"],
    );
    assert!(err.starts_with("Error: "), "{err}");

    // compact: our real figures in the CLI's layout; both shards snapshot.
    let out = ok(&server, &["compact", "-f"]);
    assert!(
        out.starts_with("Compaction complete\n  Snapshots created: 2\n  WAL segments deleted: "),
        "{out}"
    );
    for line in [
        "  Bytes reclaimed: ",
        "  ---\n",
        "  Total snapshots: 2\n",
        "  WAL segments remaining: ",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    // Without -f only shards that have no snapshot yet take one.
    let out = ok(&server, &["compact"]);
    assert!(out.contains("  Snapshots created: 0\n"), "{out}");

    // REPL: list-instances and wal-stats.
    let o = cli(
        &server,
        &[],
        Some("list-instances\nli order paid\nwal-stats\nquit\n"),
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("Instances (3 total)\n"), "{}", o.stdout);
    for id in ["o-1", "o-2", generated.as_str()] {
        assert!(
            o.stdout.contains(&format!("  {id} (order v1) state=")),
            "{id}: {}",
            o.stdout
        );
    }
    assert!(
        o.stdout.contains("  o-1 (order v1) state=shipped"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("No instances\n"),
        "no instance is in state paid: {}",
        o.stdout
    );
    // 2 PUT_MACHINEs logged by each of the 2 shards, 3 creates, 2 applies.
    assert!(
        o.stdout.contains("WAL Statistics\n  Entries: 9\n"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("I/O Statistics\n"), "{}", o.stdout);

    // delete-instance, then it is gone.
    assert_eq!(
        ok(&server, &["delete-instance", "o-2"]),
        "Deleted instance o-2\n"
    );
    assert_eq!(
        ok(&server, &["delete-instance", "o-2"]),
        "Deleted instance o-2\n",
        "deleting twice succeeds"
    );
    let err = fails(&server, &["get-instance", "o-2"]);
    assert!(
        err.contains(
            "Error: server error: INSTANCE_NOT_FOUND - core error: instance not found: o-2"
        ),
        "{err}"
    );
    let err = fails(&server, &["delete-instance", "never-was"]);
    assert!(err.contains("INSTANCE_NOT_FOUND"), "{err}");
    let o = cli(&server, &[], Some("li\nquit\n"));
    assert!(o.stdout.contains("Instances (2 total)\n"), "{}", o.stdout);

    // An empty token is refused, as by the reference (auth disabled).
    let mut cmd = Command::new(cli_path());
    let out = cmd
        .args(["-s", &server.addr.to_string(), "-t", "", "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(cli_path())
        .args(["-s", &server.addr.to_string(), "-t", "any", "ping"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PONG\n");
}

/// A `watch-*` command running in the background.
struct Watcher {
    child: std::process::Child,
    /// Kept open: the CLI prints to stderr on Ctrl-C and panics on a
    /// closed pipe.
    stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl Watcher {
    fn start(server: &Server, args: &[&str]) -> Watcher {
        use std::io::BufRead;
        let mut child = Command::new(cli_path())
            .arg("-s")
            .arg(server.addr.to_string())
            .args(args)
            .env_remove("RSTMDB_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run rstmdb-cli watch");
        // Wait for the subscription to exist.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.starts_with("Watching"), "{args:?}: {line}");
        Watcher { child, stderr: err }
    }

    /// Ctrl-C, then the JSON lines it printed.
    fn stop(self) -> Vec<serde_json::Value> {
        use std::io::Read;
        let Watcher { child, mut stderr } = self;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let reader = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        let out = child.wait_with_output().unwrap();
        let err = reader.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.contains("Stopping watch..."), "{err}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("event JSON line"))
            .collect()
    }
}

#[test]
fn rstmdb_cli_watch_commands_wal_read_and_flush_all() {
    let dir = common::data_dir("cli-watch");
    let server = Server::start(dir.path(), Opts::default());
    ok(&server, &["put-machine", "-n", "order", "-v", "1", ORDER]);
    ok(&server, &["put-machine", "-n", "other", "-v", "1", ORDER]);
    let mut c = server.client();
    c.ok("CREATE_INSTANCE", serde_json::json!({"instance_id": "w-1", "machine": "order", "version": 1, "initial_ctx": {"amount": 3}}));
    c.ok("CREATE_INSTANCE", serde_json::json!({"instance_id": "w-2", "machine": "other", "version": 1, "initial_ctx": {"amount": 3}}));

    let watchers = vec![
        (
            "instance",
            Watcher::start(&server, &["watch-instance", "w-1"]),
        ),
        (
            "instance-no-ctx",
            Watcher::start(&server, &["watch-instance", "w-1", "--no-ctx"]),
        ),
        ("all", Watcher::start(&server, &["watch-all"])),
        (
            "machines",
            Watcher::start(&server, &["watch-all", "--machines", "other"]),
        ),
        (
            "from",
            Watcher::start(&server, &["watch-all", "--from-states", "paid"]),
        ),
        (
            "to",
            Watcher::start(
                &server,
                &["watch-all", "--to-states", "paid,shipped", "--no-ctx"],
            ),
        ),
        (
            "events",
            Watcher::start(&server, &["watch-all", "--events", "SHIP"]),
        ),
    ];
    let mut off = std::collections::HashMap::new();
    for (id, ev, key) in [
        ("w-1", "PAY", "p1"),
        ("w-2", "PAY", "p2"),
        ("w-1", "SHIP", "s1"),
        ("w-2", "SHIP", "s2"),
    ] {
        let r = c.ok(
            "APPLY_EVENT",
            serde_json::json!({"instance_id": id, "event": ev, "payload": {"k": key}}),
        );
        off.insert(key, r["wal_offset"].as_u64().unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    for (name, w) in watchers {
        let got = w.stop();
        let offsets: Vec<u64> = got
            .iter()
            .map(|e| e["wal_offset"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = match name {
            "instance" | "instance-no-ctx" => vec![off["p1"], off["s1"]],
            "all" | "to" => vec![off["p1"], off["p2"], off["s1"], off["s2"]],
            "machines" => vec![off["p2"], off["s2"]],
            "from" | "events" => vec![off["s1"], off["s2"]],
            _ => unreachable!(),
        };
        assert_eq!(offsets, want, "{name}: {got:?}");
        for e in &got {
            assert_eq!(e["type"], "event");
            assert!(e["subscription_id"].as_str().unwrap().starts_with("sub-"));
            assert_eq!(
                e.get("ctx").is_some(),
                !name.ends_with("no-ctx") && name != "to",
                "{name}: {e}"
            );
        }
        if name == "all" {
            assert_eq!(got[0]["payload"], serde_json::json!({"k": "p1"}));
            assert_eq!(got[0]["ctx"], serde_json::json!({"amount": 3, "k": "p1"}));
            assert_eq!(
                (got[0]["from_state"].as_str(), got[0]["to_state"].as_str()),
                (Some("created"), Some("paid"))
            );
        }
    }

    // unwatch from another process never finds the subscription.
    let o = cli(
        &server,
        &["unwatch", "sub-00000000-0000-0000-0000-000000000000"],
        None,
    );
    assert_eq!(o.code, 0);
    assert!(
        o.stdout
            .contains("Warning: subscription sub-00000000-0000-0000-0000-000000000000 not found"),
        "{}",
        o.stdout
    );

    // wal-read with -f and -l.
    let all = ok(&server, &["wal-read"]);
    assert!(
        all.contains("| put_machine")
            && all.contains("| create_instance")
            && all.contains("| apply_event"),
        "{all}"
    );
    assert!(
        all.contains("         Instance: w-1, Event: PAY, created → paid"),
        "{all}"
    );
    let from = off["p2"].to_string();
    let page = ok(&server, &["wal-read", "-f", &from, "-l", "2"]);
    let lines: Vec<&str> = page.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(lines.len(), 2, "{page}");
    assert!(
        lines[0].contains(&format!(" {} | apply_event", off["p2"])),
        "{page}"
    );
    assert!(
        page.contains(&format!("Next offset: {}", off["s1"] + 1)),
        "{page}"
    );

    // flush-all is refused by default.
    let err = fails(&server, &["flush-all"]);
    assert!(err.contains("Error: server error: BAD_REQUEST - invalid request: FLUSH_ALL is disabled. Set storage.allow_flush_all=true in config to enable."), "{err}");
}

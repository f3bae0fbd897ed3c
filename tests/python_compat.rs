//! The official Python client (`rstmdb` 0.2.1 from PyPI, installed into
//! `.tools/venv` by `make tools`) against the real binary: runs
//! `tests/python/compat.py` and requires it to pass.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Opts, Server};

fn python() -> PathBuf {
    common::tool(
        "RSTMDB_PYTHON",
        "venv/bin/python",
        "Python with rstmdb 0.2.1",
    )
}

#[test]
fn python_client_0_2_1_works_unchanged() {
    let dir = common::data_dir("python");
    let server = Server::start(
        dir.path(),
        Opts {
            shards: 2,
            ..Opts::default()
        },
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat.py");
    let out = Command::new(python())
        .arg(script)
        .arg(server.addr.ip().to_string())
        .arg(server.addr.port().to_string())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python suite failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("python client suite: all checks passed"),
        "{stdout}"
    );
}

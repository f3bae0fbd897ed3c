//! A full disk, for real: the data directory on a small ext4 filesystem
//! (a loop-mounted image), filled until writes fail. Writes must then get
//! `WAL_IO_ERROR` (never a crash, never a lost acknowledged write), reads
//! must go on, writes must work again once space returns, and a restart
//! must bring back everything acknowledged.
//!
//! Mounting needs root and loop devices. Where the machine cannot, the test
//! says so and returns; the simulated disk (`wal/tests/sim.rs`) covers
//! ENOSPC on every write in that case.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Opts, Server};
use serde_json::json;

/// A loop-mounted ext4 image, unmounted on drop.
struct SmallFs {
    base: PathBuf,
    mount: PathBuf,
}

impl SmallFs {
    fn new(mib: u64) -> Result<SmallFs, String> {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "enospc-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let image = base.join("fs.img");
        let mount = base.join("mnt");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(mib * 1024 * 1024).map_err(|e| e.to_string())?;
        drop(f);
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()])?;
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        )?;
        Ok(SmallFs { base, mount })
    }

    fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.mount.to_str().unwrap()).unwrap();
        // SAFETY: valid path, zeroed out-parameter of the right type.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
            st.f_bavail as u64 * st.f_frsize as u64
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if run("umount", &[self.mount.to_str().unwrap()]).is_err() {
            let _ = run("umount", &["-l", self.mount.to_str().unwrap()]);
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Fills the filesystem with a ballast file until `leave` bytes are free.
fn ballast(fs: &SmallFs, leave: u64) -> PathBuf {
    let path = fs.mount.join("ballast");
    let take = fs.free_bytes().saturating_sub(leave);
    let f = std::fs::File::create(&path).unwrap();
    // Real blocks (not a sparse file): write them.
    let chunk = vec![0xBBu8; 1 << 20];
    let mut left = take;
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    w.into_inner().unwrap().sync_all().unwrap();
    path
}

fn opts() -> Opts {
    Opts {
        shards: 1,
        segment_mb: 1,
        extra_env: vec![("RSTMDB_COMPACT_ENABLED".into(), "0".into())],
        ..Opts::default()
    }
}

#[test]
fn a_full_disk_fails_writes_clearly_keeps_reads_and_recovers_when_space_returns() {
    let fs = match SmallFs::new(48) {
        Ok(fs) => fs,
        Err(why) => {
            println!(
                "SKIPPED: cannot create a small real filesystem here ({why}); \
                 ENOSPC is covered by the simulated disk (wal/tests/sim.rs)"
            );
            return;
        }
    };
    let data = fs.mount.join("data");
    let mut server = Server::start(&data, opts());
    let mut c = server.client();
    c.ok(
        "PUT_MACHINE",
        json!({"machine": "order", "version": 1, "definition": common::order_machine()}),
    );
    // Leave room for a few segments, then write until the disk is full.
    let ballast = ballast(&fs, 6 * 1024 * 1024);
    let blob = "f".repeat(200 * 1024);
    let mut acked = Vec::new();
    let mut failure = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..10_000 {
        assert!(Instant::now() < deadline, "the disk never filled");
        let r = c.call(
            "CREATE_INSTANCE",
            json!({"instance_id": format!("i{i}"), "machine": "order", "version": 1,
                   "initial_ctx": {"n": i, "blob": blob}}),
        );
        if r["status"] == "ok" {
            acked.push(i);
        } else {
            failure = Some(r);
            break;
        }
    }
    let failure = failure.expect("a write failed");
    assert_eq!(failure["error"]["code"], "WAL_IO_ERROR", "{failure}");
    let msg = failure["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("No space left on device"),
        "the message names the cause: {msg}"
    );
    assert!(
        acked.len() > 5,
        "only {} writes before the disk filled",
        acked.len()
    );
    println!(
        "disk full after {} acknowledged creates: {msg}",
        acked.len()
    );
    // Writes keep failing clearly while the disk is full; reads go on.
    for i in 0..3 {
        let r = c.call(
            "APPLY_EVENT",
            json!({"instance_id": format!("i{}", acked[0]), "event": "TICK", "payload": {"more": blob}}),
        );
        if r["status"] == "error" {
            assert_eq!(r["error"]["code"], "WAL_IO_ERROR", "{r}");
        }
        let g = c.ok(
            "GET_INSTANCE",
            json!({"instance_id": format!("i{}", acked[i])}),
        );
        assert_eq!(g["ctx"]["n"], acked[i]);
    }
    assert_eq!(
        c.ok("LIST_INSTANCES", json!({"limit": 1}))["total"].as_u64(),
        Some(acked.len() as u64)
    );
    // Space returns: writes work again, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let after = c.call(
        "CREATE_INSTANCE",
        json!({"instance_id": "after-space", "machine": "order", "version": 1}),
    );
    assert_eq!(after["status"], "ok", "{after}");
    // Everything acknowledged survives a restart (kill -9).
    server.kill9();
    server.restart();
    let mut c = server.client();
    for i in &acked {
        let g = c.ok("GET_INSTANCE", json!({"instance_id": format!("i{i}")}));
        assert_eq!(g["ctx"]["n"], *i);
    }
    c.ok("GET_INSTANCE", json!({"instance_id": "after-space"}));
    drop(server);
    assert!(Path::new(&fs.mount).exists());
}

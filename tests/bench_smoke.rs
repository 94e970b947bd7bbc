//! Smoke test of the benchmark harness: vub-bench (examples/vub-bench.rs, built by `cargo test`)
//! drives the daemon for a moment and prints a well-formed JSON result. No figure is asserted:
//! benchmarks are not tests; this only checks the harness works.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vub_bench() -> PathBuf {
    // target/<profile>/deps/bench_smoke-HASH -> target/<profile>/examples/vub-bench
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples").join("vub-bench"))
        .unwrap()
}

#[test]
fn vub_bench_reports_json() {
    let bench = vub_bench();
    assert!(
        bench.exists(),
        "{} not built (cargo test builds examples)",
        bench.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vub.sock");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .args(["--format", "raw", "--num-queues", "2"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    for pattern in ["randrw", "writeflush", "discard"] {
        let out = Command::new(&bench)
            .arg("--socket")
            .arg(&sock)
            .args(["--pattern", pattern, "--queues", "2", "--depth", "4"])
            .args(["--duration", "0.3", "--warmup", "0.1", "--json"])
            .output()
            .unwrap();
        let _ = daemon.try_wait();
        assert!(
            out.status.success(),
            "{pattern}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["pattern"], pattern);
        assert_eq!(v["errors"], 0);
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        assert!(v["lat_p99_us"].as_f64().unwrap() >= v["lat_p50_us"].as_f64().unwrap());
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

//! End-to-end live migration: a guest (QEMU under TCG, the ci/guest image) runs a verified fio
//! workload on a disk served by our daemon while QEMU migrates it to a second QEMU on this
//! host, whose disk is served by a second daemon on the same image (started with
//! `--incoming`); then back again. Guest memory is a shared memfd on both sides, the
//! migration goes over a unix socket.
//!
//! What it proves: QEMU no longer blocks the migration (dirty logging); the source's daemon
//! drains its queues and hands the image over (flush, qcow2 metadata written back, lock
//! released) when QEMU stops the device, and the destination's takes it (lock, metadata read
//! afresh) when QEMU starts it. The guest's fio verify (crc32c, reads and writes, across
//! every migration) must pass on the last destination with no I/O error, and a qcow2 image
//! must pass `qemu-img check` afterwards.
//!
//! Skipped without the guest's prerequisites (ci/setup.sh) unless `CI` is set.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::guest::{ensure_guest, read_lossy, repo_root, tail};
use common::{create_qcow2, qemu_img_check, ChildGuard, Proc};

const IMAGE_SIZE: u64 = 256 * 1024 * 1024;
/// Longest a migration may take (TCG, a busy 2-core host).
const MIGRATE_WAIT: Duration = Duration::from_secs(90);

/// A QEMU (through ci/guest/run.sh), stopped with SIGTERM on drop: run.sh then stops QEMU.
struct Vm {
    runner: ChildGuard,
    console: PathBuf,
    qmp_path: PathBuf,
}

impl Vm {
    /// Boots the guest on `socket`; with `incoming`, waits for a migration on that URI.
    fn start(dir: &Path, name: &str, socket: &Path, incoming: Option<&str>, secs: u64) -> Vm {
        let console = dir.join(format!("{name}.console"));
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("ci/guest/run.sh"))
            .arg(socket)
            .env("VUB_GUEST_LOG", &console)
            .env("VUB_GUEST_QMP", &qmp_path)
            .env("VUB_GUEST_MIGRATE", "1")
            .env("VUB_GUEST_RECONNECT_SECS", secs.to_string())
            .env("VUB_GUEST_TIMEOUT", "280")
            .stdin(std::process::Stdio::null())
            .process_group(0);
        if let Some(uri) = incoming {
            cmd.env("VUB_GUEST_INCOMING", uri);
        }
        let runner = ChildGuard::new(cmd.spawn().expect("spawn run.sh"));
        Vm {
            runner,
            console,
            qmp_path,
        }
    }

    /// Connects to its QMP socket (waiting for it) and leaves command mode on.
    fn qmp(&mut self) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = UnixStream::connect(&self.qmp_path) {
                let mut q = Qmp {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    stream: s,
                };
                q.read(); // greeting
                q.cmd("qmp_capabilities", json!({}));
                return q;
            }
            if let Some(st) = self.runner.try_wait() {
                panic!(
                    "QEMU ended before its QMP socket appeared ({st}):\n{}",
                    tail(&read_lossy(&self.console), 40)
                );
            }
            assert!(Instant::now() < deadline, "no QMP socket");
            sleep(Duration::from_millis(50));
        }
    }

    fn console(&self) -> String {
        read_lossy(&self.console)
    }

    /// Waits for the guest to end its workload and power off; it must have passed (`what`
    /// says after what, for the failure message). Returns the console log.
    fn finish(&mut self, what: &str) -> String {
        let status = self
            .runner
            .wait_timeout(Duration::from_secs(240))
            .expect("guest did not finish");
        let console = self.console();
        assert!(
            status.success() && console.contains("E2E-STEP fio-reconnect OK"),
            "guest failed {what} ({status}):\n{}",
            tail(&console, 60)
        );
        console
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.runner.reaped() {
            self.runner.signal(libc::SIGTERM);
            let _ = self.runner.wait_timeout(Duration::from_secs(20));
        }
    }
}

/// A QMP connection.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Sends `execute` without waiting for the answer.
    fn send(&mut self, execute: &str, arguments: Value) {
        let msg = json!({"execute": execute, "arguments": arguments});
        writeln!(self.stream, "{msg}").expect("QMP write");
    }

    /// Runs `execute` and returns its "return" value (events in between are skipped).
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        self.send(execute, arguments);
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {execute} failed: {e}");
            }
        }
    }
}

/// A daemon serving `image` at `socket` (2 queues), with `extra` options.
fn daemon(dir: &Path, name: &str, image: &Path, format: &str, extra: &[&str]) -> Proc {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "2"])
        .args(extra)
        .env("RUST_LOG", "info");
    let mut p = Proc::spawn(cmd, dir, name);
    p.wait_for_socket(&socket);
    p
}

/// Starts migrating `from` to whatever listens on `uri`, at most `bandwidth` bytes/s.
fn start_migration(from: &mut Qmp, uri: &str, bandwidth: u64) {
    // Under TCG a guest busy with fio dirties memory faster than the default 300 ms of
    // downtime lets QEMU send; a short pause is fine for this test.
    from.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 2000, "max-bandwidth": bandwidth}),
    );
    from.cmd("migrate", json!({"uri": uri}));
}

/// Migrates `from` to whatever listens on `uri`; returns how long it took and the downtime
/// QEMU measured (ms).
fn migrate(from: &mut Qmp, uri: &str) -> (Duration, u64) {
    let start = Instant::now();
    start_migration(from, uri, 1 << 32);
    loop {
        let st = from.cmd("query-migrate", json!({}));
        match st["status"].as_str() {
            Some("completed") => {
                return (start.elapsed(), st["downtime"].as_u64().unwrap_or(0));
            }
            Some("failed") | Some("cancelled") => panic!("migration ended: {st}"),
            _ => {}
        }
        assert!(
            start.elapsed() < MIGRATE_WAIT,
            "migration did not complete in {MIGRATE_WAIT:?}: {st}"
        );
        sleep(Duration::from_millis(200));
    }
}

/// Waits until the guest's fio workload runs on `vm`.
fn wait_workload(vm: &mut Vm) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !vm.console().contains("E2E-RECONNECT-START") {
        if let Some(st) = vm.runner.try_wait() {
            panic!(
                "guest ended before its workload started ({st}):\n{}",
                tail(&vm.console(), 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "workload did not start:\n{}",
            tail(&vm.console(), 40)
        );
        sleep(Duration::from_millis(100));
    }
}

/// The daemon's log (it logs to stderr).
fn log_of(p: &Proc) -> String {
    p.stderr()
}

/// Every operation of a daemon in [`migrate_under_fio`]'s `in_flight` mode completes this late
/// (its I/O runs at once, the completion is held): with fio keeping each queue busy, a stop
/// finds requests in flight.
const SLOW_OPS: &str = "--inject-faults=any:delay=50";

/// Boots the guest on daemon A, then migrates it `hops` times between A's and B's QEMU
/// (A -> B -> A ...), each destination a fresh QEMU; the last one finishes the workload.
/// With `in_flight`, both daemons complete every operation late ([`SLOW_OPS`]), and each
/// source daemon must log that it drained requests in flight when QEMU stopped its queues.
fn migrate_under_fio(format: &str, hops: usize, in_flight: bool) {
    if !ensure_guest() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let image = dir.join(format!("disk.{format}"));
    if format == "qcow2" {
        create_qcow2(&image, "", &IMAGE_SIZE.to_string());
    } else {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
    }
    let slow: &[&str] = if in_flight { &[SLOW_OPS] } else { &[] };
    let mut daemons = [
        daemon(dir, "a", &image, format, slow),
        daemon(dir, "b", &image, format, &[&["--incoming"], slow].concat()),
    ];
    let sockets = [dir.join("a.sock"), dir.join("b.sock")];
    // Long enough for every hop and the boot of each destination (TCG).
    let secs = 12 + 15 * hops as u64;
    let mut vm = Vm::start(dir, "vm0", &sockets[0], None, secs);
    wait_workload(&mut vm);
    sleep(Duration::from_secs(3));
    let mut times = Vec::new();
    for hop in 1..=hops {
        let to = hop % 2;
        let uri = format!("unix:{}", dir.join(format!("mig{hop}")).display());
        let mut dest = Vm::start(dir, &format!("vm{hop}"), &sockets[to], Some(&uri), secs);
        // The destination listens once its QMP socket answers.
        let mut dest_qmp = dest.qmp();
        let st = dest_qmp.cmd("query-status", json!({}));
        assert_eq!(st["status"], "inmigrate", "destination state: {st}");
        let from = 1 - to;
        // The source's daemon may have handed over before (a boot: the BIOS's driver stops
        // the device when Linux's takes over): count from here.
        let handovers = log_of(&daemons[from]).matches("image handed over").count();
        let drains = log_of(&daemons[from])
            .matches("request(s) in flight, drained")
            .count();
        let activations = log_of(&daemons[to]).matches("image activated").count();
        let mut src_qmp = vm.qmp();
        let (took, downtime) = migrate(&mut src_qmp, &uri);
        times.push(format!("{took:.1?} (downtime {downtime} ms)"));
        // The destination resumes the guest once it has loaded the last of the state.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = dest_qmp.cmd("query-status", json!({}));
            if st["status"] == "running" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "destination after migration: {st}"
            );
            sleep(Duration::from_millis(100));
        }
        // The source's daemon handed the image over when QEMU stopped the device.
        let deadline = Instant::now() + Duration::from_secs(10);
        while log_of(&daemons[from]).matches("image handed over").count() <= handovers {
            assert!(
                Instant::now() < deadline,
                "source daemon did not hand the image over:\n{}",
                tail(&log_of(&daemons[from]), 30)
            );
            sleep(Duration::from_millis(50));
        }
        // GET_VRING_BASE found requests in flight and waited for them: without that wait
        // they would complete after the guest's memory and rings were copied, and be lost.
        if in_flight {
            let now = log_of(&daemons[from])
                .matches("request(s) in flight, drained")
                .count();
            assert!(
                now > drains,
                "hop {hop}: the source daemon's queues stopped with nothing in flight:\n{}",
                tail(&log_of(&daemons[from]), 30)
            );
        }
        // QEMU may close the connection before its answer to quit, or be gone already (it
        // has nothing left to run): either way it is what the test wants.
        let _ = writeln!(src_qmp.stream, "{}", json!({"execute": "quit"}));
        let _ = vm.runner.wait_timeout(Duration::from_secs(20));
        vm = dest;
        // Let the guest run on the new side (and the daemon take the image) before the next.
        sleep(Duration::from_secs(4));
        assert!(
            log_of(&daemons[to]).matches("image activated").count() > activations,
            "destination daemon never took the image:\n{}",
            tail(&log_of(&daemons[to]), 30)
        );
    }
    let console = vm.finish(&format!(
        "after {hops} migration(s); daemon logs:\n{}\n{}",
        tail(&log_of(&daemons[0]), 20),
        tail(&log_of(&daemons[1]), 20)
    ));
    for d in &mut daemons {
        d.terminate_ok();
    }
    if format == "qcow2" {
        let check = qemu_img_check(&image);
        assert!(
            check.clean(),
            "qemu-img check after the migrations: {check:?}"
        );
    }
    let fio: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("E2E-LOG fio ").map(|(_, r)| r.trim()))
        .collect();
    let _ = writeln!(
        std::io::stderr(),
        "e2e_migration [{format}{}]: {hops} live migration(s) under fio verify: {}; guest saw \
         no I/O error, verify passed; fio: {}",
        if in_flight { ", slow completions" } else { "" },
        times.join(", "),
        fio.join(" | ")
    );
}

/// A migration cancelled while it copies memory: the guest goes on on the source (whose daemon
/// serves on, taking the image back if QEMU's cancel stopped the device), the destination's
/// daemon never takes the image, and the guest's fio verify passes on the source.
#[test]
fn cancelled_live_migration_leaves_the_source_serving() {
    if !ensure_guest() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create image");
    let mut daemons = [
        daemon(dir, "a", &image, "raw", &[]),
        daemon(dir, "b", &image, "raw", &["--incoming"]),
    ];
    let mut vm = Vm::start(dir, "vm0", &dir.join("a.sock"), None, 25);
    wait_workload(&mut vm);
    let uri = format!("unix:{}", dir.join("mig").display());
    let mut dest = Vm::start(dir, "vm1", &dir.join("b.sock"), Some(&uri), 25);
    let _dest_qmp = dest.qmp();
    let mut qmp = vm.qmp();
    // 1 MiB/s: 512 MiB of guest memory cannot be copied before the cancel.
    start_migration(&mut qmp, &uri, 1 << 20);
    sleep(Duration::from_secs(3));
    let st = qmp.cmd("query-migrate", json!({}));
    assert_eq!(
        st["status"], "active",
        "migration state before the cancel: {st}"
    );
    qmp.cmd("migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = qmp.cmd("query-migrate", json!({}));
        if st["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "migration not cancelled: {st}");
        sleep(Duration::from_millis(100));
    }
    assert_eq!(qmp.cmd("query-status", json!({}))["status"], "running");
    // QEMU 10 stops and restarts the device when it cancels (turning dirty logging off):
    // the source's daemon may hand the image over then, but must take it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = log_of(&daemons[0]);
        if a.matches("image activated").count() >= a.matches("image handed over").count() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source's daemon did not take the image back:\n{}",
            tail(&a, 20)
        );
        sleep(Duration::from_millis(100));
    }
    drop(dest);
    vm.finish("after a cancelled migration");
    // The destination's daemon never opened the image.
    let b = log_of(&daemons[1]);
    assert!(!b.contains("image activated"), "{}", tail(&b, 20));
    for d in &mut daemons {
        d.terminate_ok();
    }
}

/// Raw image: there and back again.
#[test]
fn live_migration_raw() {
    migrate_under_fio("raw", 2, false);
}

/// qcow2 (the engine caches metadata: the destination must read it afresh after the source's
/// daemon wrote it back): five migrations, back and forth.
#[test]
fn live_migration_qcow2() {
    migrate_under_fio("qcow2", 5, false);
}

/// Every stop of the device finds requests in flight (each completes 50 ms late, and fio keeps
/// both queues busy): GET_VRING_BASE must wait until they are back on the used ring.
#[test]
fn live_migration_with_requests_in_flight() {
    migrate_under_fio("qcow2", 2, true);
}

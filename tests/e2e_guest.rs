//! End-to-end test: boot a real Linux guest (QEMU, TCG) whose virtio-blk disk
//! is served by our `vhost-user-blk` daemon, and run fio (crc32c verify over
//! both virtqueues), ext4, fstrim and umount inside it, on a raw and on a qcow2
//! image; grow the disk online through the daemon's control socket and check
//! the guest sees the new capacity (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG ->
//! QEMU -> config interrupt); and check that fstrim gave the host back the
//! blocks of a deleted file.
//!
//! The guest is built by `ci/guest/build.sh` and booted by `ci/guest/run.sh`;
//! the in-guest steps live in `ci/guest/init`.  Prerequisites are installed
//! by `ci/setup.sh`.  When they are missing the test is skipped with a loud
//! message, unless the `CI` environment variable is set, in which case it
//! fails.
//!
//! Environment knobs passed through to the scripts: `VUB_GUEST_DIR`,
//! `VUB_GUEST_TIMEOUT`, `VUB_GUEST_ACCEL`, `VUB_GUEST_VERBOSE`.
//!
//! The guest console log is watched while the guest runs: when the guest
//! prints `E2E-WAIT-RESIZE <sectors>`, the test sends `resize` to the daemon's
//! control socket and the guest polls its disk size until it grows.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;

use common::guest::{ensure_guest, read_lossy, repo_root, tail};

/// Markers the guest prints for each step that passed (see ci/guest/init).
const STEPS: &[&str] = &[
    "modules",
    "disk",
    "fio-verify",
    "write-zeroes",
    "ext4",
    "fstrim",
    "umount",
    "resize",
];

const IMAGE_SIZE: u64 = 256 * 1024 * 1024;
/// What the disk is grown to while the guest runs.
const RESIZED: u64 = 320 * 1024 * 1024;
const SOCKET_WAIT: Duration = Duration::from_secs(10);
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// run.sh kills qemu after VUB_GUEST_TIMEOUT seconds (default 300); the test
/// gives it this much longer before it gives up on run.sh itself.
const RUN_SLACK: Duration = Duration::from_secs(60);

/// Kills and reaps the child when dropped, e.g. on a panic: SIGKILL, or with
/// `term_first` SIGTERM and up to 20 s to clean up (run.sh stops its qemu on
/// SIGTERM) before SIGKILL.
struct ChildGuard {
    child: Option<Child>,
    name: &'static str,
    term_first: bool,
}

impl ChildGuard {
    fn new(child: Child, name: &'static str) -> Self {
        ChildGuard {
            child: Some(child),
            name,
            term_first: false,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already taken")
    }

    fn pid(&mut self) -> u32 {
        self.child().id()
    }

    /// Waits up to `limit` for the child to exit; `None` if it is still running.
    fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait failed") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.term_first && self.child.is_some() {
            if let Ok(None) = self.child().try_wait() {
                let pid = self.pid();
                eprintln!("e2e_guest: stopping {} (pid {pid})", self.name);
                // SAFETY: kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                let _ = self.wait_timeout(Duration::from_secs(20));
            }
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                eprintln!("e2e_guest: killing {} (pid {})", self.name, child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

#[test]
fn guest_fio_ext4_fstrim() {
    guest_run("raw");
}

/// The same run on a qcow2 image: fstrim frees clusters, which the flush at the clean stop
/// punches out of the image file.
#[test]
fn guest_fio_ext4_fstrim_qcow2() {
    guest_run("qcow2");
}

/// The scratch file ci/guest/init writes before the resize and deletes and trims after it.
const SCRATCH: u64 = 32 * 1024 * 1024;

fn guest_run(format: &str) {
    if !ensure_guest() {
        return;
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("disk.img");
    let socket = tmp.path().join("vub.sock");
    let control = tmp.path().join("ctl.sock");
    let daemon_log = tmp.path().join("daemon.log");
    let console_log = tmp.path().join("console.log");

    // A sparse 256 MiB raw image, or an empty qcow2 of that size.
    if format == "qcow2" {
        common::create_qcow2(&image, "", &IMAGE_SIZE.to_string());
    } else {
        File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
    }

    let log_file = File::create(&daemon_log).expect("daemon log");
    let daemon = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--control-socket")
        .arg(&control)
        .arg("--blk-file")
        .arg(&image)
        .args(["--format", format, "--num-queues", "2"])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn vhost-user-blk");
    let mut daemon = ChildGuard::new(daemon, "vhost-user-blk");
    let started_daemon = Instant::now();

    // Wait for the listening sockets (the control socket is bound after the
    // vhost-user one).
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() || !control.exists() {
        if let Some(status) = daemon.child().try_wait().expect("try_wait") {
            panic!(
                "vhost-user-blk exited before creating its sockets ({status}); log:\n{}",
                read_lossy(&daemon_log)
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "sockets {} and {} did not appear within {SOCKET_WAIT:?}; daemon log:\n{}",
                socket.display(),
                control.display(),
                read_lossy(&daemon_log)
            );
        }
        sleep(Duration::from_millis(50));
    }

    eprintln!(
        "e2e_guest: daemon socket ready after {:.1?}",
        started_daemon.elapsed()
    );

    // Boot the guest in the background; run.sh exits 0 only on "E2E-RESULT PASS".
    // Meanwhile watch the console for the guest asking for the resize.
    let run = repo_root().join("ci/guest/run.sh");
    let started = Instant::now();
    let guest_timeout = std::env::var("VUB_GUEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let run_limit = Duration::from_secs(guest_timeout) + RUN_SLACK;
    let runner = Command::new("bash")
        .arg(&run)
        .arg(&socket)
        .env("VUB_GUEST_LOG", &console_log)
        .env("VUB_GUEST_RESIZE", "1")
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C meant for cargo reaches it only
        // through the guard.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", run.display()));
    let mut runner = ChildGuard::new(runner, "ci/guest/run.sh");
    runner.term_first = true;

    // (guest sectors before, ctl output) once the resize was requested, and the image's
    // allocated bytes just before (the guest's scratch file written, not yet trimmed).
    let mut resize: Option<(u64, Result<serde_json::Value, String>)> = None;
    let mut before_trim = 0;
    let status = loop {
        if let Some(status) = runner.child().try_wait().expect("try_wait") {
            runner.child = None;
            break status;
        }
        if started.elapsed() > run_limit {
            panic!(
                "ci/guest/run.sh still running after {run_limit:?}\n--- console log tail ---\n{}",
                tail(&read_lossy(&console_log), 80)
            );
        }
        if resize.is_none() {
            let console = read_lossy(&console_log);
            let asked = console
                .lines()
                .find_map(|l| l.trim().strip_prefix("E2E-WAIT-RESIZE "))
                .map(|n| n.trim().parse::<u64>());
            if let Some(sectors) = asked {
                let sectors = sectors.expect("E2E-WAIT-RESIZE with a sector count");
                eprintln!(
                    "e2e_guest: guest waits for the resize after {:.1?} ({sectors} sectors)",
                    started.elapsed()
                );
                before_trim = common::allocated_blocks(&image) * 512;
                resize = Some((sectors, ctl_resize(&control, RESIZED)));
            }
        }
        sleep(Duration::from_millis(100));
    };
    eprintln!("e2e_guest: guest run took {:.1?}", started.elapsed());
    let console = read_lossy(&console_log);
    let context = || {
        format!(
            "\n--- console log tail ---\n{}\n--- daemon log tail ---\n{}",
            tail(&console, 80),
            tail(&read_lossy(&daemon_log), 80)
        )
    };
    // The resize request first: if it failed, that explains a failed guest run.
    let (sectors_before, reply) = resize.unwrap_or_else(|| {
        panic!(
            "the guest never printed E2E-WAIT-RESIZE ({status}){}",
            context()
        )
    });
    assert_eq!(
        sectors_before * 512,
        IMAGE_SIZE,
        "guest disk size before the resize{}",
        context()
    );
    let reply =
        reply.unwrap_or_else(|e| panic!("resize through the control socket: {e}{}", context()));
    assert_eq!(reply["size"], RESIZED, "resize reply {reply}{}", context());
    assert_eq!(
        reply["frontend_notified"],
        true,
        "QEMU must have been sent CONFIG_CHANGE_MSG: {reply}{}",
        context()
    );
    assert!(status.success(), "guest run failed ({status}){}", context());
    for step in STEPS {
        let marker = format!("E2E-STEP {step} OK");
        assert!(
            console.lines().any(|l| l.trim() == marker),
            "missing '{marker}' in the console log{}",
            context()
        );
    }
    assert!(
        console.lines().any(|l| l.trim() == "E2E-RESULT PASS"),
        "missing 'E2E-RESULT PASS'{}",
        context()
    );
    let grown = format!(
        "E2E-LOG resized from {} to {} sectors",
        IMAGE_SIZE / 512,
        RESIZED / 512
    );
    assert!(
        console.lines().any(|l| l.trim() == grown),
        "missing '{grown}'{}",
        context()
    );

    // The daemon's counters saw the guest's I/O on both virtqueues.
    let stats = ctl_json(&control, &["stats"]).unwrap_or_else(|e| panic!("ctl stats: {e}"));
    assert_eq!(stats["image"]["virtual_size"], RESIZED, "{stats}");
    for q in 0..2 {
        let req = &stats["queues"][q]["requests"];
        assert!(
            req["write"].as_u64().unwrap_or(0) > 0 && req["read"].as_u64().unwrap_or(0) > 0,
            "queue {q} carried no reads or writes: {stats}"
        );
        assert_eq!(stats["queues"][q]["in_flight"], 0, "{stats}");
    }

    // The daemon must shut down cleanly on SIGTERM.
    let pid = daemon.pid();
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid} failed");
    let term_sent = Instant::now();
    let exited = daemon.wait_timeout(EXIT_WAIT);
    eprintln!(
        "e2e_guest: daemon exit after SIGTERM took {:.1?}",
        term_sent.elapsed()
    );
    match exited {
        Some(status) => assert!(
            status.success(),
            "vhost-user-blk exited with {status} after SIGTERM; log:\n{}",
            tail(&read_lossy(&daemon_log), 80)
        ),
        None => panic!(
            "vhost-user-blk did not exit within {EXIT_WAIT:?} of SIGTERM; log:\n{}",
            tail(&read_lossy(&daemon_log), 80)
        ),
    }

    // fstrim gave the deleted scratch file's space back to the host (a raw image's holes are
    // punched at the discard, a qcow2's freed clusters at the flush of the clean stop); what
    // the guest wrote after it (the resize step's last MiB, ext4's own updates) is small.
    let after = common::allocated_blocks(&image) * 512;
    eprintln!(
        "e2e_guest: {format} image allocated {before_trim} bytes before fstrim, {after} after"
    );
    assert!(
        after + SCRATCH * 3 / 4 <= before_trim,
        "{format}: fstrim of a {SCRATCH}-byte deleted file gave back too little: allocated \
         {before_trim} bytes before, {after} after"
    );

    if format == "qcow2" {
        let check = common::qemu_img_check(&image);
        assert!(
            check.clean(),
            "qemu-img check after the guest run:\n{}",
            check.output
        );
    } else {
        // The image has the size it was grown to (the daemon must not truncate it).
        let len = fs::metadata(&image).expect("stat image").len();
        assert_eq!(len, RESIZED, "image size after the resize");
    }
}

/// Runs `vhost-user-blk ctl --control-socket SOCKET --json ARGS...` and parses
/// its output (the ctl client gives up after 30 s without a reply).
fn ctl_json(control: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("ctl")
        .arg("--control-socket")
        .arg(control)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "ctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ctl_resize(control: &Path, size: u64) -> Result<serde_json::Value, String> {
    ctl_json(control, &["resize", &size.to_string()])
}

/// Starts the daemon on `image` (of `format`) at `socket`, appending to `log`, and waits for
/// the socket.
fn start_daemon_format(image: &Path, format: &str, socket: &Path, log: &Path) -> ChildGuard {
    let _ = fs::remove_file(socket);
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon log");
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket-path")
        .arg(socket)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "2"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn vhost-user-blk");
    let mut guard = ChildGuard::new(child, "vhost-user-blk");
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if let Some(status) = guard.child().try_wait().expect("try_wait") {
            panic!("daemon exited early ({status}):\n{}", read_lossy(log));
        }
        assert!(
            Instant::now() < deadline,
            "socket did not appear:\n{}",
            read_lossy(log)
        );
        sleep(Duration::from_millis(20));
    }
    guard
}

/// The image a restart test serves.
#[derive(Clone, Copy, Debug)]
enum RestartImage {
    Raw,
    /// A fresh qcow2: every first write allocates.
    Qcow2,
    /// A qcow2 over a raw backing file full of data: every first write copies on write.
    Qcow2Backing,
}

/// Backend restart under a live guest: the guest runs a verified write workload (fio with
/// crc32c verify, and a loop that zeroes and discards slots and reads them back) while the
/// daemon is SIGKILLed and restarted; QEMU reconnects (reconnect-ms) and the in-flight
/// requests are resubmitted from the inflight region. The guest must see no I/O error and
/// every verify must pass: a completed write, discard or write-zeroes must survive a kill,
/// flushed or not. `VUB_RECONNECT_RESTARTS` (default 5) sets the number of restarts; the long
/// mode is `VUB_RECONNECT_RESTARTS=20 cargo test --test e2e_guest restarts`.
#[test]
fn guest_survives_daemon_restarts() {
    restarts_under_guest(RestartImage::Raw);
}

/// The same on a fresh qcow2 image (allocating writes: mappings made since the last flush
/// live in the daemon's memory and its mapping journal).
#[test]
fn guest_survives_daemon_restarts_qcow2() {
    restarts_under_guest(RestartImage::Qcow2);
}

/// The same on a qcow2 image over a raw backing file (copy-on-write).
#[test]
fn guest_survives_daemon_restarts_qcow2_backing_file() {
    restarts_under_guest(RestartImage::Qcow2Backing);
}

fn restarts_under_guest(kind: RestartImage) {
    if !ensure_guest() {
        return;
    }
    let restarts: u32 = std::env::var("VUB_RECONNECT_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("vub.sock");
    let daemon_log = tmp.path().join("daemon.log");
    let console_log = tmp.path().join("console.log");
    let (image, format) = match kind {
        RestartImage::Raw => {
            let image = tmp.path().join("disk.img");
            File::create(&image)
                .and_then(|f| f.set_len(IMAGE_SIZE))
                .expect("create image");
            (image, "raw")
        }
        RestartImage::Qcow2 | RestartImage::Qcow2Backing => {
            let image = tmp.path().join("disk.qcow2");
            let mut opts = String::new();
            if let RestartImage::Qcow2Backing = kind {
                let base = common::create_image(tmp.path(), "base.raw", IMAGE_SIZE, Some(7));
                opts = format!("backing_file={},backing_fmt=raw", base.display());
            }
            common::create_qcow2(&image, &opts, &IMAGE_SIZE.to_string());
            (image, "qcow2")
        }
    };
    let mut daemon = start_daemon_format(&image, format, &socket, &daemon_log);

    // fio runs long enough for every restart (one every ~2 s) plus margin.
    let fio_secs = 10 + 2 * u64::from(restarts);
    let runner = Command::new("bash")
        .arg(repo_root().join("ci/guest/run.sh"))
        .arg(&socket)
        .env("VUB_GUEST_LOG", &console_log)
        .env("VUB_GUEST_RECONNECT", "1")
        .env("VUB_GUEST_RECONNECT_SECS", fio_secs.to_string())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn run.sh");
    let mut runner = ChildGuard::new(runner, "run.sh");
    runner.term_first = true;

    // Wait for the workload to start.
    let deadline = Instant::now() + Duration::from_secs(240);
    while !read_lossy(&console_log).contains("E2E-RECONNECT-START") {
        if let Some(status) = runner.wait_timeout(Duration::from_millis(100)) {
            panic!(
                "guest ended before the workload started ({status}):\n{}",
                tail(&read_lossy(&console_log), 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "workload did not start:\n{}",
            tail(&read_lossy(&console_log), 40)
        );
    }
    sleep(Duration::from_secs(2));
    for i in 0..restarts {
        let pid = daemon.pid();
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        assert!(
            daemon.wait_timeout(EXIT_WAIT).is_some(),
            "daemon did not die"
        );
        drop(daemon);
        daemon = start_daemon_format(&image, format, &socket, &daemon_log);
        eprintln!("e2e_guest: restart {}/{restarts} done", i + 1);
        sleep(Duration::from_millis(1500));
    }
    let status = runner
        .wait_timeout(Duration::from_secs(300))
        .expect("guest did not finish");
    let console = read_lossy(&console_log);
    let log = read_lossy(&daemon_log);
    assert!(
        status.success() && console.contains("E2E-STEP fio-reconnect OK"),
        "guest failed across {restarts} daemon restarts ({status}):\n{}\ndaemon log tail:\n{}",
        tail(&console, 60),
        tail(&log, 30)
    );
    let connects = log.matches("frontend connected").count();
    assert!(
        connects > restarts as usize,
        "QEMU reconnected only {connects} times for {restarts} restarts:\n{}",
        tail(&log, 30)
    );
    // QEMU hands the inflight region (back) at every start of the device: each connection
    // must have had it accepted, or a restart could not recover in-flight requests.
    let regions = log.matches("inflight region set").count();
    assert!(
        regions >= connects,
        "only {regions} of {connects} connections set an inflight region:\n{}",
        tail(&log, 30)
    );
    let resubmitted = log.matches("resubmitting").count();
    let replayed: Vec<&str> = log.lines().filter(|l| l.contains("replayed")).collect();
    let fio: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("E2E-LOG fio ").map(|(_, r)| r.trim()))
        .collect();
    let zloop: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("E2E-LOG zero-loop: ").map(|(_, r)| r.trim()))
        .collect();
    if format == "qcow2" {
        // A clean shutdown writes everything back and clears the dirty bit.
        daemon.term_first = true;
        drop(daemon);
        // Panics with the report unless the check passes.
        common::qemu_img(&["check".as_ref(), image.as_os_str()]);
    }
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "e2e_guest [{kind:?}]: {restarts} daemon restarts under a running fio verify: guest saw \
         no I/O error, verify passed; {connects} connections, {resubmitted} queue(s) \
         resubmitted in-flight requests, {} journal replay(s); zero loop: {}; fio: {}",
        replayed.len(),
        zloop.join(" | "),
        fio.join(" | ")
    );
}

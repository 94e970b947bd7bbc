//! End-to-end test: boot a real Linux guest (QEMU, TCG) whose virtio-blk disk
//! is served by our `vhost-user-blk` daemon, and run fio (crc32c verify over
//! both virtqueues), ext4, fstrim and umount inside it.
//!
//! The guest is built by `ci/guest/build.sh` and booted by `ci/guest/run.sh`;
//! the in-guest steps live in `ci/guest/init`.  Prerequisites are installed
//! by `ci/setup.sh`.  When they are missing the test is skipped with a loud
//! message, unless the `CI` environment variable is set, in which case it
//! fails.
//!
//! Environment knobs passed through to the scripts: `VUB_GUEST_DIR`,
//! `VUB_GUEST_TIMEOUT`, `VUB_GUEST_ACCEL`, `VUB_GUEST_VERBOSE`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Markers the guest prints for each step that passed (see ci/guest/init).
const STEPS: &[&str] = &[
    "modules",
    "disk",
    "fio-verify",
    "write-zeroes",
    "ext4",
    "fstrim",
    "umount",
];

const IMAGE_SIZE: u64 = 256 * 1024 * 1024;
const SOCKET_WAIT: Duration = Duration::from_secs(10);
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Kills (SIGKILL) and reaps the child when dropped, e.g. on a panic.
struct ChildGuard {
    child: Option<Child>,
    name: &'static str,
}

impl ChildGuard {
    fn new(child: Child, name: &'static str) -> Self {
        ChildGuard {
            child: Some(child),
            name,
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
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                eprintln!("e2e_guest: killing {} (pid {})", self.name, child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Skip the test (return `false`) or, under CI, fail it.
fn prerequisites_missing(why: &str) -> bool {
    let ci = std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false);
    if ci {
        panic!("e2e guest prerequisites missing under CI: {why}\nrun ci/setup.sh");
    }
    // Written straight to the stderr handle: libtest captures `eprintln!` of
    // passing tests, and this message must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n\
         ****************************************************************\n\
         * e2e_guest SKIPPED: run ci/setup.sh                           *\n\
         ****************************************************************\n\
         reason: {why}\n"
    );
    false
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Builds the guest (a no-op when it is up to date).  Returns `false` when the
/// test must be skipped.
fn ensure_guest() -> bool {
    if !in_path("qemu-system-x86_64") {
        return prerequisites_missing("qemu-system-x86_64 not found in PATH");
    }
    let build = repo_root().join("ci/guest/build.sh");
    let out = Command::new("bash")
        .arg(&build)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", build.display()));
    if !out.status.success() {
        return prerequisites_missing(&format!(
            "{} failed ({}):\n{}{}",
            build.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    true
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).replace('\r', "")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn guest_fio_ext4_fstrim() {
    if !ensure_guest() {
        return;
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("disk.img");
    let socket = tmp.path().join("vub.sock");
    let daemon_log = tmp.path().join("daemon.log");
    let console_log = tmp.path().join("console.log");

    // A sparse 256 MiB raw image.
    File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create image");

    let log_file = File::create(&daemon_log).expect("daemon log");
    let daemon = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .args(["--format", "raw", "--num-queues", "2"])
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

    // Wait for the listening socket.
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if let Some(status) = daemon.child().try_wait().expect("try_wait") {
            panic!(
                "vhost-user-blk exited before creating its socket ({status}); log:\n{}",
                read_lossy(&daemon_log)
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "socket {} did not appear within {SOCKET_WAIT:?}; daemon log:\n{}",
                socket.display(),
                read_lossy(&daemon_log)
            );
        }
        sleep(Duration::from_millis(50));
    }

    eprintln!(
        "e2e_guest: daemon socket ready after {:.1?}",
        started_daemon.elapsed()
    );

    // Boot the guest; run.sh exits 0 only on "E2E-RESULT PASS".
    let run = repo_root().join("ci/guest/run.sh");
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(&run)
        .arg(&socket)
        .env("VUB_GUEST_LOG", &console_log)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", run.display()));
    eprintln!("e2e_guest: guest run took {:.1?}", started.elapsed());
    let console = read_lossy(&console_log);
    let context = || {
        format!(
            "\n--- console log tail ---\n{}\n--- daemon log tail ---\n{}",
            tail(&console, 80),
            tail(&read_lossy(&daemon_log), 80)
        )
    };
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

    // The image must still have its size (the daemon must not truncate it).
    let len = fs::metadata(&image).expect("stat image").len();
    assert_eq!(len, IMAGE_SIZE, "image size changed");
}

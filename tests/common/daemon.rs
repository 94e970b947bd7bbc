//! The daemon under test as a child process: our `vhost-user-blk` binary by default, or
//! qemu-storage-daemon when `VUB_TEST_BACKEND=qsd`. [`Daemon`] waits for its socket and kills
//! it in `Drop`, so no test can leak a process.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::{ChildGuard, WAIT_TIMEOUT};

/// Which backend the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Our `vhost-user-blk` binary (default).
    Ours,
    /// qemu-storage-daemon, selected with `VUB_TEST_BACKEND=qsd` (binary overridable with
    /// `VUB_QSD_BIN`). Used to validate the tests themselves against a reference backend.
    Qsd,
}

/// The backend `VUB_TEST_BACKEND` selects (unset or "ours": our binary, "qsd").
pub fn backend() -> Backend {
    match std::env::var("VUB_TEST_BACKEND") {
        Err(std::env::VarError::NotPresent) => Backend::Ours,
        Ok(v) if v.is_empty() || v == "ours" => Backend::Ours,
        Ok(v) if v == "qsd" => Backend::Qsd,
        Ok(v) => panic!("VUB_TEST_BACKEND={v:?} is not supported (use \"qsd\" or leave it unset)"),
        Err(e) => panic!("VUB_TEST_BACKEND is not valid unicode: {e}"),
    }
}

/// Daemon options, mirroring the `vhost-user-blk` CLI.
#[derive(Clone, Debug, Default)]
pub struct DaemonConfig {
    /// `--read-only`.
    pub read_only: bool,
    /// `--num-queues`.
    pub num_queues: Option<u32>,
    /// Not supported by the QSD vhost-user-blk export; ignored there.
    pub queue_size: Option<u32>,
    /// Not supported by the QSD vhost-user-blk export; ignored there.
    pub serial: Option<String>,
    /// `--logical-block-size`.
    pub logical_block_size: Option<u32>,
    /// `--direct`.
    pub direct: bool,
    /// `--writethrough`.
    pub writethrough: bool,
    /// Extra arguments for our binary (ignored for QSD).
    pub extra_args: Vec<String>,
}

impl DaemonConfig {
    /// The defaults: writable, the daemon's own queue count and sizes.
    pub fn new() -> Self {
        Self::default()
    }
    /// `--read-only`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    /// `--num-queues N`.
    pub fn num_queues(mut self, n: u32) -> Self {
        self.num_queues = Some(n);
        self
    }
    /// `--logical-block-size N`.
    pub fn logical_block_size(mut self, n: u32) -> Self {
        self.logical_block_size = Some(n);
        self
    }
    /// `--serial S`.
    pub fn serial(mut self, s: &str) -> Self {
        self.serial = Some(s.to_string());
        self
    }
    /// One more argument for our binary.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }
}

/// A running backend process. Killed (SIGKILL) and reaped on drop if still running.
pub struct Daemon {
    child: ChildGuard,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its log file (stdout and stderr).
    pub log_path: PathBuf,
    /// Which backend it is.
    pub backend: Backend,
}

/// How a daemon start relates to other daemons started in the same directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// The test's only daemon on a raw file ([`Daemon::start`]): a fresh log at debug level;
    /// qemu-storage-daemon exports the file node itself.
    Single,
    /// One of a series on the same directory ([`Daemon::start_format`]: restarts, crash
    /// loops): a stale socket from a killed predecessor is removed first (otherwise the wait
    /// for the socket would return before the new process has bound it), the log is appended
    /// to behind a header line (the logs of every incarnation are kept in one file) at info
    /// level; qemu-storage-daemon exports a format node on top of the file node.
    Series,
}

/// `VUB_TEST_DIRECT=1`: every daemon of ours serves with `--direct` (ci/test runs the qcow2
/// oracle and crash suites once more this way).
pub fn direct_mode() -> bool {
    std::env::var("VUB_TEST_DIRECT").is_ok_and(|v| v == "1")
}

/// The command line that starts `backend` serving `image` in `format` on `socket` with `cfg`
/// (qemu-storage-daemon has no equivalent of the queue size, serial and extra arguments and
/// ignores them).
fn backend_command(
    backend: Backend,
    socket: &Path,
    image: &Path,
    format: &str,
    cfg: &DaemonConfig,
    start: Start,
) -> Command {
    match backend {
        Backend::Ours => {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
            cmd.arg("--socket-path")
                .arg(socket)
                .arg("--blk-file")
                .arg(image)
                .arg("--format")
                .arg(format);
            if cfg.read_only {
                cmd.arg("--read-only");
            }
            if let Some(n) = cfg.num_queues {
                cmd.arg("--num-queues").arg(n.to_string());
            }
            if let Some(n) = cfg.queue_size {
                cmd.arg("--queue-size").arg(n.to_string());
            }
            if let Some(s) = &cfg.serial {
                cmd.arg("--serial").arg(s);
            }
            if let Some(n) = cfg.logical_block_size {
                cmd.arg("--logical-block-size").arg(n.to_string());
            }
            if cfg.direct || direct_mode() {
                cmd.arg("--direct");
            }
            if cfg.writethrough {
                cmd.arg("--writethrough");
            }
            cmd.args(&cfg.extra_args);
            if start == Start::Single {
                cmd.arg("-v");
            }
            cmd
        }
        Backend::Qsd => {
            let bin = std::env::var("VUB_QSD_BIN").unwrap_or_else(|_| "qemu-storage-daemon".into());
            let mut cmd = Command::new(bin);
            // QEMU option syntax uses ',' as separator; our temp paths never contain one.
            let img = image.to_str().expect("utf-8 image path");
            let sock = socket.to_str().expect("utf-8 socket path");
            assert!(!img.contains(',') && !sock.contains(','));
            let ro = if cfg.read_only { ",read-only=on" } else { "" };
            let mut file = format!("driver=file,node-name=f0,filename={img}");
            let node = match start {
                Start::Single => {
                    file.push_str(",discard=unmap");
                    file.push_str(ro);
                    if cfg.direct {
                        file.push_str(",cache.direct=on");
                    }
                    cmd.arg("--blockdev").arg(file);
                    "f0"
                }
                Start::Series => {
                    file.push_str(ro);
                    cmd.arg("--blockdev")
                        .arg(file)
                        .arg("--blockdev")
                        .arg(format!("driver={format},node-name=n0,file=f0{ro}"));
                    "n0"
                }
            };
            let mut export = format!(
                "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={sock},writable={}",
                if cfg.read_only { "off" } else { "on" }
            );
            if let Some(n) = cfg.num_queues {
                export.push_str(&format!(",num-queues={n}"));
            }
            if start == Start::Single {
                if let Some(n) = cfg.logical_block_size {
                    export.push_str(&format!(",logical-block-size={n}"));
                }
                if cfg.writethrough {
                    export.push_str(",writethrough=on");
                }
            }
            cmd.arg("--export").arg(export);
            cmd
        }
    }
}

impl Daemon {
    /// Spawn the backend serving `image` on `dir/vhost-user-blk.sock` and wait (≤ 10 s) for the
    /// socket to appear. Panics (with the daemon's log) if it exits or never creates the socket.
    pub fn start(dir: &Path, image: &Path, cfg: &DaemonConfig) -> Daemon {
        Self::spawn(dir, image, "raw", cfg, Start::Single)
    }

    /// Like [`Daemon::start`], but with an explicit image format (`"raw"` or `"qcow2"`), for
    /// one of a series of daemons on the same directory: a stale socket from a killed
    /// predecessor is removed first, and the log is appended to. With
    /// `VUB_TEST_BACKEND=qsd`, qemu-storage-daemon is started with a `qcow2` (or `raw`) node on
    /// top of the file node.
    pub fn start_format(dir: &Path, image: &Path, format: &str, cfg: &DaemonConfig) -> Daemon {
        Self::spawn(dir, image, format, cfg, Start::Series)
    }

    fn spawn(dir: &Path, image: &Path, format: &str, cfg: &DaemonConfig, start: Start) -> Daemon {
        let backend = backend();
        let socket = dir.join("vhost-user-blk.sock");
        let log_path = dir.join("daemon.log");
        let log = match start {
            Start::Single => File::create(&log_path).expect("create daemon log file"),
            Start::Series => {
                let _ = fs::remove_file(&socket);
                let mut log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .expect("open daemon log file");
                let _ = writeln!(log, "===== start {format} {} =====", image.display());
                log
            }
        };
        let cmd = backend_command(backend, &socket, image, format, cfg, start);
        Daemon::spawn_command(cmd, backend, socket, log_path, log)
    }

    /// Spawns `cmd` (a `backend` process that will listen on `socket`) with its stdout and
    /// stderr to `log` (open on `log_path`), and waits (≤ 10 s) for the socket. Panics (with
    /// the log) if it exits or never creates the socket. For tests that need a command line
    /// of their own (e.g. qemu-storage-daemon with particular nodes).
    pub fn spawn_command(
        mut cmd: Command,
        backend: Backend,
        socket: PathBuf,
        log_path: PathBuf,
        log: File,
    ) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {backend:?} backend ({cmd:?}): {e}"));
        let mut d = Daemon {
            child: ChildGuard::new(child),
            socket,
            log_path,
            backend,
        };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&mut self) {
        match self.child.wait_for_socket(&self.socket, WAIT_TIMEOUT) {
            Ok(()) => {}
            Err(Some(status)) => panic!(
                "{:?} backend exited with {status} before creating socket {}\n--- log ---\n{}",
                self.backend,
                self.socket.display(),
                self.log()
            ),
            Err(None) => panic!(
                "socket {} did not appear within {:?}\n--- log ---\n{}",
                self.socket.display(),
                WAIT_TIMEOUT,
                self.log()
            ),
        }
    }

    /// Its pid (while not reaped).
    pub fn pid(&self) -> libc::pid_t {
        self.child.pid()
    }

    /// Its log so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// Sends it `sig`; panics if that fails.
    pub fn signal(&self, sig: libc::c_int) {
        self.child.signal(sig);
    }

    /// Panics (with the log) if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait() {
            panic!(
                "{:?} backend exited unexpectedly with {status}\n--- log ---\n{}",
                self.backend,
                self.log()
            );
        }
    }

    /// Wait ≤ 10 s for the process to exit and reap it.
    pub fn wait_exit(&mut self, why: &str) -> ExitStatus {
        self.child.wait_timeout(WAIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "{:?} backend did not exit within {:?} after {why}\n--- log ---\n{}",
                self.backend,
                WAIT_TIMEOUT,
                self.log()
            )
        })
    }

    /// SIGTERM, wait ≤ 10 s, return the exit status (the process is reaped).
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit("SIGTERM")
    }

    /// SIGTERM and assert a clean exit with status 0.
    pub fn terminate_ok(self) {
        let backend = self.backend;
        let log_path = self.log_path.clone();
        let status = self.terminate();
        assert!(
            status.success(),
            "{backend:?} backend exited with {status} after SIGTERM, expected 0\n--- log ---\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit("SIGKILL");
    }

    /// Non-blocking: has the process exited? (Reaps it if so.)
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let running = !self.child.reaped();
        self.child.kill();
        if running && std::thread::panicking() {
            eprintln!(
                "--- {:?} backend log ({}) ---\n{}",
                self.backend,
                self.log_path.display(),
                self.log()
            );
        }
    }
}

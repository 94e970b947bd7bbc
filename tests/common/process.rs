//! Child processes that cannot outlive their test: [`ChildGuard`] (kill and reap on drop,
//! bounded waits), [`Proc`] (a guarded process whose stdout and stderr go to files) and
//! [`run_bin`] (our binary run to completion).

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::WAIT_TIMEOUT;

/// Whether `path` is a unix socket.
pub fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// A child process, SIGKILLed and reaped on drop if it is still running.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        ChildGuard(Some(child))
    }

    /// Whether it has been reaped (its exit status was collected).
    pub fn reaped(&self) -> bool {
        self.0.is_none()
    }

    /// Its pid; panics once it has been reaped (the pid may belong to another process then).
    pub fn pid(&self) -> libc::pid_t {
        self.0.as_ref().expect("child already reaped").id() as libc::pid_t
    }

    /// Sends it `sig`; panics if that fails.
    #[track_caller]
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Non-blocking: its exit status if it has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.0.as_mut()?.try_wait().expect("try_wait")?;
        self.0 = None;
        Some(status)
    }

    /// Waits up to `timeout` for it to exit (and reaps it); None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for `path` to become a socket. `Err(Some(status))`: the process
    /// exited first (and is reaped); `Err(None)`: the time ran out.
    pub fn wait_for_socket(
        &mut self,
        path: &Path,
        timeout: Duration,
    ) -> Result<(), Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_socket(path) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                return Err(Some(status));
            }
            if Instant::now() >= deadline {
                return Err(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs it if it is still running (it cannot ignore that, so the wait is short), then
    /// reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A spawned process whose stdout and stderr go to files. Killed (SIGKILL) and reaped on drop;
/// on a panic its output is printed.
pub struct Proc {
    child: ChildGuard,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its output in `dir/NAME.stdout` and `dir/NAME.stderr`.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out).expect("create stdout file"))
            .stderr(File::create(&err).expect("create stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Proc {
            child: ChildGuard::new(child),
            out,
            err,
        }
    }

    /// Its pid (while not reaped).
    pub fn pid(&self) -> libc::pid_t {
        self.child.pid()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.err).unwrap_or_default()).into_owned()
    }

    /// Non-blocking: its exit status if it has exited (it is reaped then).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    /// Waits (bounded) for the process to exit.
    #[track_caller]
    pub fn wait_exit(&mut self, why: &str) -> ExitStatus {
        self.child.wait_timeout(WAIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "process did not exit within {WAIT_TIMEOUT:?} ({why})\n--- stderr ---\n{}",
                self.stderr()
            )
        })
    }

    /// Sends it `sig`.
    #[track_caller]
    pub fn signal(&self, sig: libc::c_int) {
        self.child.signal(sig);
    }

    /// SIGTERM and require a clean exit (status 0).
    #[track_caller]
    pub fn terminate_ok(&mut self) {
        self.signal(libc::SIGTERM);
        let s = self.wait_exit("SIGTERM");
        assert!(
            s.success(),
            "daemon exited with {s} after SIGTERM\n--- stderr ---\n{}",
            self.stderr()
        );
    }

    /// Waits (bounded) for `path` to be a socket; panics with the log if the process exits.
    #[track_caller]
    pub fn wait_for_socket(&mut self, path: &Path) {
        match self.child.wait_for_socket(path, WAIT_TIMEOUT) {
            Ok(()) => {}
            Err(Some(s)) => panic!(
                "daemon exited ({s}) before creating {}\n--- stderr ---\n{}",
                path.display(),
                self.stderr()
            ),
            Err(None) => panic!(
                "{} did not appear within {WAIT_TIMEOUT:?}\n--- stderr ---\n{}",
                path.display(),
                self.stderr()
            ),
        }
    }

    /// Panics (with its stderr) if it has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_wait() {
            panic!(
                "daemon exited unexpectedly ({s})\n--- stderr ---\n{}",
                self.stderr()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- child stdout ---\n{}\n--- child stderr ---\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

/// Runs our binary with `args` to completion (bounded; its output in files in `dir`) and
/// returns (status, stdout, stderr).
pub fn run_bin(dir: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.args(args);
    let mut p = Proc::spawn(cmd, dir, "run");
    let s = p.wait_exit(&format!("{args:?}"));
    (s, p.stdout(), p.stderr())
}

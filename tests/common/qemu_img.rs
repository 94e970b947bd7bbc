//! qemu-img and qemu-io, the reference implementation the tests check images against.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Panic message when `tool` (qemu-img, qemu-io) cannot be started.
fn missing(tool: &str, e: std::io::Error) -> String {
    format!("cannot run {tool} (install qemu-utils: ci/setup.sh): {e}")
}

/// Runs `qemu-img ARGS` in `dir` (None: the test's working directory), the one place that
/// starts qemu-img: bounded by the time qemu-img needs (it does not block on anything
/// external, a lock conflict included), standard input closed.
#[track_caller]
fn run<S: AsRef<OsStr>>(dir: Option<&Path>, args: &[S]) -> Output {
    let mut cmd = Command::new("qemu-img");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}", missing("qemu-img", e)))
}

/// Panics with qemu-img's output unless it succeeded; returns its standard output.
#[track_caller]
fn succeeded<S: AsRef<OsStr>>(args: &[S], out: &Output) -> String {
    assert!(
        out.status.success(),
        "qemu-img {:?} failed ({}): {}{}",
        args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img ARGS` and returns what it did, success or not (for tests that inspect a
/// failure, e.g. a lock conflict).
#[track_caller]
pub fn qemu_img_output<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(None, args)
}

/// [`qemu_img_output`] with `dir` as the working directory: qemu-img resolves a relative
/// data file name against it (our engine, like QEMU for backing files, against the image's
/// directory).
#[track_caller]
pub fn qemu_img_output_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    run(Some(dir), args)
}

/// Runs `qemu-img ARGS`, which must succeed (else panics with its output); returns its
/// standard output.
#[track_caller]
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    succeeded(args, &run(None, args))
}

/// [`qemu_img`] with `dir` as the working directory (see [`qemu_img_output_in`]).
#[track_caller]
pub fn qemu_img_in<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> String {
    succeeded(args, &run(Some(dir), args))
}

/// Result of `qemu-img check`: exit code (0 clean, 1 check failed, 2 corruption, 3 leaks only)
/// and the combined output.
#[derive(Debug)]
pub struct QemuImgCheck {
    /// Exit status.
    pub code: i32,
    /// stdout and stderr.
    pub output: String,
}

impl QemuImgCheck {
    /// Exit status 0 and "No errors were found": no corruption, no leaks.
    pub fn clean(&self) -> bool {
        self.code == 0 && self.output.contains("No errors were found")
    }
    /// Number of leaked clusters reported ("N leaked clusters were found"), 0 if none.
    pub fn leaked(&self) -> u64 {
        self.output
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_suffix(" leaked clusters were found on the image.")
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Runs `qemu-img check -f qcow2 IMAGE` and returns its exit code and output.
pub fn qemu_img_check(image: &Path) -> QemuImgCheck {
    let out = qemu_img_output(&[
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        image.as_os_str(),
    ]);
    QemuImgCheck {
        code: out.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img create -q -f qcow2 [-o OPTS] IMAGE SIZE` (no `-o` when `opts` is empty), which
/// must succeed.
#[track_caller]
pub fn create_qcow2(image: impl AsRef<Path>, opts: &str, size: &str) {
    let mut args = vec![
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
    ];
    if !opts.is_empty() {
        args.extend(["-o".as_ref(), OsStr::new(opts)]);
    }
    args.extend([image.as_ref().as_os_str(), size.as_ref()]);
    qemu_img(&args);
}

/// Runs `qemu-io ARGS` to its end and returns what it did, success or not; the one place,
/// with [`qemu_io_interactive`], that starts qemu-io. Like qemu-img, it does not block on
/// anything external; standard input is closed, so it runs only the `-c` commands.
#[track_caller]
pub fn qemu_io_output<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new("qemu-io")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}", missing("qemu-io", e)))
}

/// `qemu-io -f qcow2 -c CMD... IMAGE`, which must succeed, every command included (see
/// [`qemu_io_opts`]).
#[track_caller]
pub fn qemu_io(image: &Path, cmds: &[&str]) {
    qemu_io_opts(image, &[], cmds);
}

/// `qemu-io -f qcow2 OPTS -c CMD... IMAGE`; panics with its output unless it succeeded and
/// no command printed a failure (e.g. a `read -P` that found other bytes).
#[track_caller]
pub fn qemu_io_opts(image: &Path, opts: &[&str], cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    args.extend_from_slice(opts);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image.to_str().expect("image path is UTF-8"));
    let out = qemu_io_output(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {text}"
    );
}

/// Starts `qemu-io ARGS` waiting for commands on a piped standard input, its output
/// discarded: it keeps its image open (and locked as QEMU locks it) until that input closes
/// or it is killed. The caller owns the child (wrap it in a [`super::ChildGuard`]).
#[track_caller]
pub fn qemu_io_interactive<S: AsRef<OsStr>>(args: &[S]) -> Child {
    Command::new("qemu-io")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}", missing("qemu-io", e)))
}

//! QEMU-compatible image locks (src/image/lock.rs), against the real QEMU programs in both
//! directions:
//!
//! * the bytes the daemon locks on an image, its backing files and its data file are the bytes
//!   a QEMU guest (qemu-system-x86_64 -S with a virtio-blk-pci disk) locks on the same files,
//!   read back the way QEMU tests them (F_OFD_GETLK from another open file description);
//! * qemu-img commands get the same answer on an image our daemon serves as on one a QEMU guest
//!   uses, and the ones the issue names are refused;
//! * qemu-storage-daemon and a second daemon of ours cannot write an image we serve, and an
//!   image they serve makes our daemon exit 1 with one line naming it, before it writes
//!   anything (a dirty qcow2 is left unrepaired);
//! * read-only serving shares with readers; backing files and data files are held the way QEMU
//!   holds them; `--locking off` warns and locks nothing; a block device is locked too;
//! * live migration handover: `--incoming` holds nothing until the device starts; stopping
//!   every started queue (GET_VRING_BASE) flushes, clears the qcow2 dirty bit and releases the
//!   locks; starting a queue again takes them back.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// Bound for every process run here on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The bytes in 0..300 (QEMU's 100..=104 and 200..=204, libvirt's 0) that another open file
/// description holds a lock on: what QEMU's `F_OFD_GETLK` test sees.
fn locked_bytes(path: &Path) -> Vec<u64> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (0..300u64)
        .filter(|&b| {
            // SAFETY: flock is plain old data; all-zero is valid (OFD locks need l_pid 0).
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = b as libc::off_t;
            fl.l_len = 1;
            // SAFETY: F_OFD_GETLK reads and rewrites the live local flock; the fd is open.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
            libc::c_int::from(fl.l_type) != libc::F_UNLCK
        })
        .collect()
}

/// The locked bytes of each file.
fn locked_files(files: &[&Path]) -> Vec<Vec<u64>> {
    files.iter().map(|f| locked_bytes(f)).collect()
}

/// A finished process run by [`run`].
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion (at most [`DEADLINE`]; killed and a panic after that).
#[track_caller]
fn run(cmd: &mut Command) -> Ran {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    let mut child = ChildGuard::new(
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(err.try_clone().expect("dup"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    );
    // Past the deadline the guard kills and reaps it as the panic unwinds.
    let status = child
        .wait_timeout(DEADLINE)
        .unwrap_or_else(|| panic!("{cmd:?} did not finish within {DEADLINE:?}"));
    let read = |f: &mut File| {
        let mut t = String::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_string(&mut t).expect("read output");
        t
    };
    Ran {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `qemu-img ARGS`, success or not (refusals for a lock are what these tests look at).
#[track_caller]
fn qemu_img_run(args: &[&str]) -> Ran {
    qemu_img_output(args).into()
}

/// Our daemon serving `image` from its own directory `dir/name` (socket and log there).
fn serve(dir: &Path, name: &str, image: &Path, format: &str, args: &[&str]) -> Daemon {
    let sub = dir.join(name);
    fs::create_dir_all(&sub).expect("mkdir");
    let mut cfg = DaemonConfig::new().num_queues(1);
    for a in args {
        cfg = cfg.arg(a);
    }
    Daemon::start_format(&sub, image, format, &cfg)
}

/// The lock a writer fails to get when someone else refuses to share writing.
const WRITE: &str = "\"write\" lock";
/// The lock a user that refuses to share writing fails to get when someone else writes.
const SHARED_WRITE: &str = "shared \"write\" lock";

/// Runs our daemon on `image`, which must refuse it: exit 1, nothing on stdout, one line on
/// stderr saying that `held` is in use because we failed to get the `lock` ([`WRITE`] or
/// [`SHARED_WRITE`]), no socket left. Returns the line.
#[track_caller]
fn ours_refused(
    dir: &Path,
    image: &Path,
    format: &str,
    args: &[&str],
    held: &Path,
    lock: &str,
) -> String {
    let sock = dir.join("refused.sock");
    let r = run(Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "1"])
        .args(args));
    let ctx = format!(
        "{format} {args:?}: {}, stdout {:?}, stderr {:?}",
        r.status, r.stdout, r.stderr
    );
    assert_eq!(r.status.code(), Some(1), "{ctx}");
    assert_eq!(r.stdout, "", "{ctx}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {ctx}");
    let line = r.stderr.trim_end().to_string();
    assert!(line.starts_with("vhost-user-blk: error: "), "{ctx}");
    assert!(
        line.contains(&format!("{} is in use by another process", held.display())),
        "the line should name {} as in use: {ctx}",
        held.display()
    );
    assert!(line.contains(&format!("failed to get {lock}")), "{ctx}");
    assert!(!sock.exists(), "a refused start left its socket behind");
    line
}

/// qemu-storage-daemon with `image` as a file node under a `format` node, exported.
fn qsd_command(image: &Path, format: &str, writable: bool, sock: &Path) -> Command {
    let ro = if writable { "" } else { ",read-only=on" };
    let block_device = fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
    let protocol = if block_device { "host_device" } else { "file" };
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver={protocol},node-name=f0,filename={}{ro}",
            s(image)
        ))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=n0,file=f0{ro}"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable={}",
            s(sock),
            if writable { "on" } else { "off" }
        ));
    cmd
}

/// qemu-storage-daemon serving `image`, from `dir/name`, once its export listens (its nodes
/// and their locks are set up before that).
fn qsd(dir: &Path, name: &str, image: &Path, format: &str, writable: bool) -> Daemon {
    let sub = dir.join(name);
    fs::create_dir_all(&sub).expect("mkdir");
    let sock = sub.join("qsd.sock");
    let log_path = sub.join("qsd.log");
    let log = File::create(&log_path).expect("create qsd log");
    let cmd = qsd_command(image, format, writable, &sock);
    Daemon::spawn_command(cmd, Backend::Qsd, sock, log_path, log)
}

/// qemu-storage-daemon must fail to open `image` writable because another process does not
/// share writing.
#[track_caller]
fn qsd_refused(dir: &Path, image: &Path, format: &str) {
    let sock = dir.join("qsd-refused.sock");
    let r = run(&mut qsd_command(image, format, true, &sock));
    assert!(
        !r.status.success(),
        "qemu-storage-daemon exited {} on a held image: {}",
        r.status,
        r.text()
    );
    assert!(
        r.stderr.contains(&format!("Failed to get {WRITE}")),
        "{}: {}",
        image.display(),
        r.stderr
    );
}

/// A QEMU guest using a disk (stopped at the first instruction: its block devices are open
/// and locked as in a running guest). Killed on drop.
struct Guest {
    child: Child,
}

impl Guest {
    /// Starts it and waits until each of `files` is locked and the locks stay the same for a
    /// few polls. None (after `skip_unless_ci`) without qemu-system-x86_64.
    fn start(image: &Path, format: &str, read_only: bool, files: &[&Path]) -> Option<Guest> {
        let ro = if read_only { ",readonly=on" } else { "" };
        let spawned = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-S",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-monitor", "none", "-serial", "none", "-drive"])
            .arg(format!(
                "file={},format={format},if=none,id=d0{ro}",
                s(image)
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                skip_unless_ci(&format!("cannot run qemu-system-x86_64: {e}"));
                return None;
            }
        };
        let mut g = Guest { child };
        let until = Instant::now() + DEADLINE;
        let (mut last, mut same) = (Vec::new(), 0);
        while same < 5 {
            if let Some(st) = g.child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = g.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("qemu-system-x86_64 exited with {st}: {err}");
            }
            assert!(
                Instant::now() < until,
                "QEMU did not lock {files:?}: {last:?}"
            );
            let now = locked_files(files);
            if now.iter().all(|b| !b.is_empty()) && now == last {
                same += 1;
            } else {
                same = 0;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(g)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Our own child, by its handle; SIGKILL cannot be ignored, so wait() returns.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image of [`SIZE`] at `dir/name`, with `opts` for qemu-img create (`-b`, `-o`).
fn qcow2(dir: &Path, name: &str, opts: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[s(&p), "16M"]);
    qemu_img(&args);
    p
}

/// A raw and a qcow2 image of [`SIZE`] in `dir` with their format names, each paired with
/// its element of `with`.
fn raw_and_qcow2<T>(dir: &Path, seed: u64, with: [T; 2]) -> [(PathBuf, &'static str, T); 2] {
    let [r, q] = with;
    [
        (create_image(dir, "disk.img", SIZE, Some(seed)), "raw", r),
        (qcow2(dir, "disk.qcow2", &[]), "qcow2", q),
    ]
}

/// `ov.qcow2` over `mid.qcow2` over `base.raw`, all in `dir`; returns them top first.
fn chain(dir: &Path) -> [PathBuf; 3] {
    let base = create_image(dir, "base.raw", SIZE, Some(3));
    let mid = qcow2(dir, "mid.qcow2", &["-b", s(&base), "-F", "raw"]);
    let ov = qcow2(dir, "ov.qcow2", &["-b", s(&mid), "-F", "qcow2"]);
    [ov, mid, base]
}

/// A qcow2 image `df.qcow2` with the external data file `data.raw`; returns both.
fn with_data_file(dir: &Path) -> [PathBuf; 2] {
    let data = dir.join("data.raw");
    let opt = format!("data_file={}", s(&data));
    [qcow2(dir, "df.qcow2", &["-o", &opt]), data]
}

/// Sets the dirty bit (incompatible feature bit 0, header offset 72) of a v3 qcow2.
fn set_dirty_bit(image: &Path) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("open");
    let mut word = [0u8; 8];
    f.seek(SeekFrom::Start(72)).expect("seek");
    f.read_exact(&mut word).expect("read header");
    let v = u64::from_be_bytes(word) | 1;
    f.seek(SeekFrom::Start(72)).expect("seek");
    f.write_all(&v.to_be_bytes()).expect("write header");
}

// ---------------------------------------------------------------------------------------------
// The bytes, compared with a QEMU guest
// ---------------------------------------------------------------------------------------------

#[test]
fn locked_bytes_are_those_of_a_qemu_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = create_image(d, "disk.img", SIZE, Some(1));
    let plain = qcow2(d, "plain.qcow2", &[]);
    let chain = chain(d);
    let df = with_data_file(d);
    let configs: [(&str, &[PathBuf], &str); 4] = [
        ("raw", std::slice::from_ref(&raw), "raw"),
        ("qcow2", std::slice::from_ref(&plain), "qcow2"),
        ("qcow2 over qcow2 over raw", &chain, "qcow2"),
        ("qcow2 with a data file", &df, "qcow2"),
    ];
    for (name, files, format) in configs {
        let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        for read_only in [false, true] {
            let what = format!("{name}{}", if read_only { ", read-only" } else { "" });
            let Some(guest) = Guest::start(files[0], format, read_only, &files) else {
                return;
            };
            let qemu = locked_files(&files);
            drop(guest);
            assert!(
                locked_files(&files).iter().all(Vec::is_empty),
                "{what}: QEMU gone"
            );
            let args: &[&str] = if read_only { &["--read-only"] } else { &[] };
            let daemon = serve(d, "ours", files[0], format, args);
            let ours = locked_files(&files);
            daemon.terminate_ok();
            eprintln!("{what}: QEMU {qemu:?}, ours {ours:?}");
            assert_eq!(ours, qemu, "{what}: bytes locked on {files:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------------------------

/// The qemu-img commands the issue names, for an image of `format` (commit needs a backing
/// file); `{}` stands for the image.
fn qemu_img_commands(format: &str) -> Vec<Vec<String>> {
    let mut cmds = vec![
        vec!["info", "-f", format, "{}"],
        vec!["check", "-f", format, "{}"],
        vec!["snapshot", "-c", "s1", "-f", format, "{}"],
        vec!["resize", "-f", format, "{}", "+1M"],
    ];
    if format == "qcow2" {
        cmds.push(vec!["commit", "-f", format, "{}"]);
    }
    cmds.into_iter()
        .map(|c| c.into_iter().map(str::to_string).collect())
        .collect()
}

/// Runs each command on `image` and returns (command, exit code, stderr).
fn qemu_img_outcomes(image: &Path, format: &str) -> Vec<(String, Option<i32>, String)> {
    qemu_img_commands(format)
        .into_iter()
        .map(|c| {
            let args: Vec<&str> = c
                .iter()
                .map(|a| if a == "{}" { s(image) } else { a })
                .collect();
            let r = qemu_img_run(&args);
            (c.join(" "), r.status.code(), r.stderr)
        })
        .collect()
}

#[test]
fn qemu_img_gets_the_answers_a_qemu_guest_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = create_image(d, "disk.img", SIZE, Some(2));
    let [ov, _, base] = chain(d);
    let base_before = read_file(&base);
    for (image, format) in [(&raw, "raw"), (&ov, "qcow2")] {
        for read_only in [false, true] {
            let what = format!("{format}{}", if read_only { ", read-only" } else { "" });
            let Some(guest) = Guest::start(image, format, read_only, &[image]) else {
                return;
            };
            let qemu = qemu_img_outcomes(image, format);
            drop(guest);
            let args: &[&str] = if read_only { &["--read-only"] } else { &[] };
            let daemon = serve(d, "ours", image, format, args);
            let ours = qemu_img_outcomes(image, format);
            // -U shares everything and tests nothing: always allowed.
            let forced = qemu_img_run(&["info", "-U", "-f", format, s(image)]);
            daemon.terminate_ok();
            for (q, o) in qemu.iter().zip(&ours) {
                eprintln!("{what}: qemu-img {}: QEMU {:?}, ours {:?}", q.0, q.1, o.1);
            }
            assert_eq!(
                ours, qemu,
                "{what}: qemu-img against our daemon and a QEMU guest"
            );
            assert!(
                forced.status.success(),
                "{what}: info -U: {}",
                forced.text()
            );
            assert!(
                forced.stdout.contains("virtual size: 16 MiB"),
                "{}",
                forced.stdout
            );

            // What the issue asks for, spelled out: writers are refused always, readers of a
            // qcow2 while it is written too. (QEMU's `info`/`check` on a raw image take no
            // lock at all, so nothing can refuse them; `check` fails on raw for its own
            // reason.)
            for (cmd, code, err) in &ours {
                let writer = ["snapshot", "resize", "commit"]
                    .iter()
                    .any(|w| cmd.starts_with(w));
                let expect = if writer {
                    Some("Failed to get \"write\" lock")
                } else if format == "qcow2" && !read_only {
                    Some("Failed to get shared \"write\" lock")
                } else {
                    None
                };
                match expect {
                    Some(msg) => assert!(
                        *code == Some(1) && err.contains(msg),
                        "{what}: qemu-img {cmd}: exit {code:?}, {err}"
                    ),
                    None => assert!(
                        !err.contains("lock"),
                        "{what}: qemu-img {cmd} refused by a lock: {err}"
                    ),
                }
            }
        }
    }
    // The refused commands changed nothing, and without a user they work.
    assert_eq!(
        read_file(&base),
        base_before,
        "commit reached the backing file"
    );
    let info = qemu_img(&["info", "-f", "qcow2", s(&ov)]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    let snaps = qemu_img(&["snapshot", "-l", "-f", "qcow2", s(&ov)]);
    assert!(!snaps.contains("s1"), "{snaps}");
    assert!(qemu_img_check(&ov).clean());
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon and a second daemon
// ---------------------------------------------------------------------------------------------

#[test]
fn an_image_qsd_serves_makes_the_daemon_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // QSD's raw export shares writing (it does not lock byte 201), its qcow2 node does not:
    // so a writer of ours finds QSD writing (101) on raw, refusing to share writing on qcow2.
    for (image, format, lock) in raw_and_qcow2(d, 4, [SHARED_WRITE, WRITE]) {
        let image = &image;
        let writer = qsd(d, "qsd", image, format, true);
        let before = read_file(image);
        ours_refused(d, image, format, &[], image, lock);
        ours_refused(d, image, format, &["--read-only"], image, SHARED_WRITE);
        assert_eq!(
            read_file(image),
            before,
            "{format}: a refused start changed the image"
        );
        writer.terminate_ok();
        // Once QSD is gone the same start works: the refusal was its lock.
        serve(d, "ours", image, format, &[]).terminate_ok();

        // Readers share: a read-only QSD and a read-only daemon together. A writer is then
        // refused (for raw by our reader: QSD's raw export shares everything).
        let qsd_ro = qsd(d, "qsd", image, format, false);
        let reader = serve(d, "reader", image, format, &["--read-only"]);
        ours_refused(d, image, format, &[], image, WRITE);
        reader.terminate_ok();
        qsd_ro.terminate_ok();
    }
}

#[test]
fn a_served_image_refuses_qsd_and_a_second_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (image, format, _) in raw_and_qcow2(d, 5, [WRITE; 2]) {
        let image = &image;
        let mut first = serve(d, "first", image, format, &[]);
        qsd_refused(d, image, format);
        ours_refused(d, image, format, &[], image, WRITE);
        ours_refused(d, image, format, &["--read-only"], image, SHARED_WRITE);
        // The first daemon still serves.
        first.assert_running();
        let mut c = Client::simple(&first.socket);
        let data = pattern(6, MIB, 8192);
        c.q(0).write_ok(MIB, &data);
        assert_bytes_eq(&c.q(0).read_ok(MIB, 8192), &data, MIB, "after the refusals");
        drop(c);
        first.terminate_ok();

        // Served read-only, it shares with readers (QSD, another daemon, qemu-img) and keeps
        // writers out.
        let first = serve(d, "first", image, format, &["--read-only"]);
        let second = serve(d, "second", image, format, &["--read-only"]);
        let qsd_ro = qsd(d, "qsd", image, format, false);
        let info = qemu_img_run(&["info", "-f", format, s(image)]);
        assert!(info.status.success(), "{format}: {}", info.text());
        qsd_refused(d, image, format);
        ours_refused(d, image, format, &[], image, WRITE);
        for daemon in [first, second, qsd_ro] {
            daemon.terminate_ok();
        }
    }
}

#[test]
fn a_held_dirty_qcow2_is_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = qcow2(d, "dirty.qcow2", &[]);
    let r = Ran::from(qemu_io_output(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 7 0 128k",
        s(&image),
    ]));
    assert!(r.status.success(), "qemu-io: {}", r.text());
    set_dirty_bit(&image);
    // Unheld, opening it writes (the refcount repair), so the check below can fail.
    let copy = d.join("copy.qcow2");
    fs::copy(&image, &copy).expect("copy");
    let daemon = serve(d, "copy", &copy, "qcow2", &[]);
    assert_ne!(
        read_file(&copy),
        read_file(&image),
        "opening a dirty copy wrote nothing"
    );
    daemon.terminate_ok();

    let reader = qsd(d, "qsd", &image, "qcow2", false);
    let before = read_file(&image);
    ours_refused(d, &image, "qcow2", &[], &image, WRITE);
    assert_eq!(
        read_file(&image),
        before,
        "the refused daemon wrote to the held image"
    );
    reader.terminate_ok();
    serve(d, "ours", &image, "qcow2", &[]).terminate_ok();
    assert!(qemu_img_check(&image).clean());
}

// ---------------------------------------------------------------------------------------------
// Backing files and data files
// ---------------------------------------------------------------------------------------------

#[test]
fn backing_and_data_files_are_held_as_qemu_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [ov, mid, base] = chain(d);
    // Serving the overlay: its backing files can be read, not written, and serve as the base
    // of another served overlay.
    let daemon = serve(d, "ov", &ov, "qcow2", &[]);
    let info = qemu_img_run(&["info", "-f", "raw", s(&base)]);
    assert!(info.status.success(), "{}", info.text());
    let info = qemu_img_run(&["info", "-f", "qcow2", s(&mid)]);
    assert!(info.status.success(), "{}", info.text());
    qsd_refused(d, &base, "raw");
    qsd_refused(d, &mid, "qcow2");
    let ov2 = qcow2(d, "ov2.qcow2", &["-b", s(&mid), "-F", "qcow2"]);
    let other = serve(d, "ov2", &ov2, "qcow2", &[]);
    other.terminate_ok();
    daemon.terminate_ok();
    // A backing file someone writes makes the daemon exit 1, naming it.
    let writer = qsd(d, "qsd", &base, "raw", true);
    let line = ours_refused(d, &ov, "qcow2", &[], &base, SHARED_WRITE);
    assert!(line.contains("backing file"), "{line}");
    writer.terminate_ok();

    // The data file is held as the image is: while we write it, nobody else writes it or
    // opens it refusing to share writing; a writer of it keeps us out.
    let [df, data] = with_data_file(d);
    let daemon = serve(d, "df", &df, "qcow2", &[]);
    qsd_refused(d, &data, "raw");
    ours_refused(d, &data, "raw", &[], &data, WRITE);
    ours_refused(d, &data, "raw", &["--read-only"], &data, SHARED_WRITE);
    daemon.terminate_ok();
    let writer = qsd(d, "qsd", &data, "raw", true);
    let line = ours_refused(d, &df, "qcow2", &[], &data, SHARED_WRITE);
    assert!(line.contains("data file"), "{line}");
    writer.terminate_ok();
    serve(d, "df", &df, "qcow2", &[]).terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// --locking, block devices
// ---------------------------------------------------------------------------------------------

#[test]
fn locking_off_warns_and_locks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = create_image(d, "disk.img", SIZE, Some(7));
    for mode in ["auto", "on"] {
        let daemon = serve(d, mode, &raw, "raw", &["--locking", mode]);
        assert_eq!(locked_bytes(&raw), vec![100, 101, 201], "--locking {mode}");
        daemon.terminate_ok();
    }
    let daemon = serve(d, "off", &raw, "raw", &["--locking", "off"]);
    assert!(
        locked_bytes(&raw).is_empty(),
        "--locking off locked something"
    );
    let log = daemon.log();
    assert!(
        log.contains("WARN") && log.contains("image locking is off"),
        "no warning: {log}"
    );
    // Nothing keeps a writer out now.
    let other = qsd(d, "qsd", &raw, "raw", true);
    other.terminate_ok();
    daemon.terminate_ok();
    let r = run(Command::new(BIN).args(["--locking", "maybe", "--blk-file", s(&raw)]));
    assert_eq!(r.status.code(), Some(2), "{}", r.text());
    assert!(r.stderr.contains("--locking"), "{}", r.stderr);
}

#[test]
fn a_block_device_is_locked_like_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = create_image(d, "backing.img", SIZE, Some(8));
    let lo = match LoopDev::attach(&backing) {
        Ok(l) => l,
        Err(why) => return skip_unless_ci(&why),
    };
    let daemon = serve(d, "ours", &lo.dev, "raw", &[]);
    assert_eq!(locked_bytes(&lo.dev), vec![100, 101, 201]);
    qsd_refused(d, &lo.dev, "raw");
    ours_refused(d, &lo.dev, "raw", &[], &lo.dev, WRITE);
    daemon.terminate_ok();
    assert!(locked_bytes(&lo.dev).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Live migration handover
// ---------------------------------------------------------------------------------------------

/// A migration destination's daemon (`--incoming`) holds no lock until its device starts; the
/// first request takes the locks a serving daemon holds; GET_VRING_BASE on every started queue
/// (QEMU stopping the device) hands the image over: the locks go and a qcow2 is left clean
/// (`qemu-img check` without -U opens it, so nothing is held, and finds no error); a frontend
/// starting the device again gets it back, with what was written before.
#[test]
fn handover_releases_the_image_and_takes_it_back() {
    use common::raw::{RawClient, S_OK, T_IN, T_OUT};
    let dir = tempfile::tempdir().unwrap();
    for (image, format, ()) in raw_and_qcow2(dir.path(), 11, [(), ()]) {
        let d = serve(
            dir.path(),
            &format!("in-{format}"),
            &image,
            format,
            &["--incoming"],
        );
        assert!(
            locked_bytes(&image).is_empty(),
            "{format}: --incoming locked {:?}",
            locked_bytes(&image)
        );
        let mut c = RawClient::connect(&d.socket);
        let data = pattern(12, 0, 8192);
        c.data()[..8192].copy_from_slice(&data);
        assert_eq!(c.request(T_OUT, 8, 8192, None), S_OK, "{format}: write");
        let serving = locked_bytes(&image);
        assert!(
            serving.contains(&101) && serving.contains(&201),
            "{format}: {serving:?}"
        );
        let base = c.stop();
        assert!(
            locked_bytes(&image).is_empty(),
            "{format}: still locked after the stop: {:?}",
            locked_bytes(&image)
        );
        if format == "qcow2" {
            let check = qemu_img_check(&image);
            assert!(check.clean(), "{format}: after the handover: {check:?}");
        }
        assert!(d.log().contains("image handed over"), "{}", d.log());
        // The frontend starts the device again (a cancelled migration, a resumed VM).
        c.reconnect(&d.socket, base);
        c.data()[..8192].fill(0);
        assert_eq!(c.request(T_IN, 8, 8192, None), S_OK, "{format}: read");
        assert_bytes_eq(
            &c.data()[..8192],
            &data,
            8 * 512,
            "read back after the handover",
        );
        assert_eq!(locked_bytes(&image), serving, "{format}: locks taken back");
        drop(c);
        d.terminate_ok();
    }
}

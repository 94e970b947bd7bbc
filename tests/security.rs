//! Security properties: the daemon runs unprivileged, sockets get the requested owner, group
//! and mode (the control socket its own, by default the daemon's user only), another user is
//! refused where the permissions say so, and the daemon never replaces something at the socket
//! path that is not a stale socket.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern, ChildGuard, Client, Proc, WAIT_TIMEOUT};

/// nobody and nogroup (65534 on Debian).
const NOBODY: u32 = 65534;
/// A user and group with no name and no membership anywhere.
const STRANGER: u32 = 4_000_000_001;

/// Whether the test runs as root (needed to chown and to act as another user); if not, skips
/// (or fails under CI) with `why`.
fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    common::skip_unless_ci(why);
    false
}

/// Makes `cmd` run as `uid`:`gid` with no supplementary groups.
fn run_as(cmd: &mut Command, uid: u32, gid: u32) -> &mut Command {
    // SAFETY: setgroups/setgid/setuid are async-signal-safe and only affect the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Connects to the unix socket at `path` as `uid`:`gid` (no supplementary groups), in a child
/// process: the kernel's permission check as another user sees it, which the test itself
/// (root) would bypass. The connection is closed again at once.
fn connect_as(uid: u32, gid: u32, path: &Path) -> std::io::Result<()> {
    /// The child exits with this plus connect's errno when connect fails.
    const CONNECT_FAILED: i32 = 100;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "{}", path.display());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let mut cmd = Command::new("true");
    run_as(&mut cmd, uid, gid);
    // SAFETY: socket, connect and _exit are async-signal-safe; addr is a copy owned by the
    // hook. A failed connect ends the child with its errno, so that it cannot be mistaken for
    // a failure to switch users or to exec (those make spawn fail).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0
                || libc::connect(
                    fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) != 0
            {
                let errno = *libc::__errno_location();
                libc::_exit(CONNECT_FAILED + errno.min(100));
            }
            Ok(())
        })
    };
    let mut child = ChildGuard::new(cmd.stdin(Stdio::null()).spawn().unwrap());
    let st = child.wait_timeout(WAIT_TIMEOUT).expect("the child exits");
    match st.code() {
        Some(0) => Ok(()),
        Some(c) if c > CONNECT_FAILED => Err(std::io::Error::from_raw_os_error(c - CONNECT_FAILED)),
        _ => panic!("connecting as {uid}:{gid}: child {st}"),
    }
}

#[track_caller]
fn assert_refused(uid: u32, gid: u32, path: &Path, what: &str) {
    match connect_as(uid, gid, path) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
        other => panic!("{what}: {uid}:{gid} must get EACCES, got {other:?}"),
    }
}

#[track_caller]
fn assert_allowed(uid: u32, gid: u32, path: &Path, what: &str) {
    if let Err(e) = connect_as(uid, gid, path) {
        panic!("{what}: {uid}:{gid} must be able to connect: {e}");
    }
}

#[track_caller]
fn assert_owner_group_mode(path: &Path, uid: u32, gid: u32, mode: u32) {
    let m = std::fs::metadata(path).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (uid, gid, mode),
        "{}: (owner, group, mode)",
        path.display()
    );
}

/// A daemon serving a 1 MiB image with a vhost-user and a control socket in a directory that
/// every user may search (so that only the sockets' own permissions decide who can connect).
struct Served {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    ctl: PathBuf,
    daemon: Proc,
}

fn serve_with(args: &[&str]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = common::create_image(dir.path(), "disk.img", 1 << 20, None);
    let sock = dir.path().join("vub.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut cmd = bin();
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .arg("--blk-file")
        .arg(&img)
        .args(["--format", "raw", "--num-queues", "1"])
        .args(args);
    let mut daemon = Proc::spawn(cmd, dir.path(), "daemon");
    daemon.wait_for_socket(&sock);
    daemon.wait_for_socket(&ctl);
    Served {
        _dir: dir,
        sock,
        ctl,
        daemon,
    }
}

/// Waits (bounded) for `path` to be the daemon's socket.
#[track_caller]
fn wait_for(path: &Path, d: &mut ChildGuard) {
    match d.wait_for_socket(path, WAIT_TIMEOUT) {
        Ok(()) => {}
        Err(Some(st)) => panic!("daemon exited early: {st}"),
        Err(None) => panic!("{} did not appear", path.display()),
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
}

#[test]
fn runs_unprivileged_and_serves_io() {
    if !root_or_skip("needs root to drop privileges") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::chown(&img, Some(NOBODY), Some(NOBODY)).unwrap();
    let sock = dir.path().join("vub.sock");
    let mut cmd = bin();
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .args([
            "--format",
            "raw",
            "--num-queues",
            "1",
            "--socket-mode",
            "0666",
        ])
        .stdin(Stdio::null());
    run_as(&mut cmd, NOBODY, NOBODY);
    let mut d = ChildGuard::new(cmd.spawn().unwrap());
    wait_for(&sock, &mut d);
    assert_eq!(std::fs::metadata(&sock).unwrap().uid(), NOBODY);
    // The daemon really runs as nobody.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );

    let mut c = Client::simple(&sock);
    let data = pattern(3, 4096, 64 * 1024);
    c.q(0).write_ok(4096, &data);
    assert_eq!(c.q(0).read_ok(4096, data.len()), data);
    drop(c);
    d.signal(libc::SIGTERM);
    let st = d.wait_timeout(WAIT_TIMEOUT).expect("exit after SIGTERM");
    assert!(st.success(), "{st}");
    assert_eq!(
        &std::fs::read(&img).unwrap()[4096..4096 + data.len()],
        &data[..]
    );
}

/// The default: both sockets belong to the daemon's user with mode 0600, another user is
/// refused on both, and the log says who can connect and how to let a VMM user in.
#[test]
fn by_default_only_the_daemons_user_can_connect() {
    if !root_or_skip("needs root to act as another user") {
        return;
    }
    let mut s = serve_with(&[]);
    assert_owner_group_mode(&s.sock, 0, 0, 0o600);
    assert_owner_group_mode(&s.ctl, 0, 0, 0o600);
    assert_refused(NOBODY, NOBODY, &s.sock, "vhost-user socket");
    assert_refused(NOBODY, NOBODY, &s.ctl, "control socket");
    assert_allowed(0, 0, &s.ctl, "control socket");
    s.daemon.terminate_ok();
    let log = s.daemon.stderr();
    for line in [
        format!(
            "vhost-user socket {}: owner root, group root, mode 0600: only user root can \
             connect (a VMM running as another user, e.g. libvirt's QEMU as libvirt-qemu, gets \
             \"Permission denied\": see --socket-owner, --socket-group, --socket-mode)",
            s.sock.display()
        ),
        format!(
            "control socket {}: owner root, group root, mode 0600: only user root can connect\n",
            s.ctl.display()
        ),
    ] {
        assert!(log.contains(&line), "log lacks {line:?}:\n{log}");
    }
}

/// Handing the vhost-user socket to the VMM's user (as libvirt needs) leaves the control socket
/// to the daemon's user: the VMM can connect to the disk but cannot resize it.
#[test]
fn the_vmm_user_gets_the_disk_socket_but_not_the_control_socket() {
    if !root_or_skip("needs root to chown") {
        return;
    }
    let mut s = serve_with(&["--socket-owner", "nobody", "--socket-group", "nogroup"]);
    assert_owner_group_mode(&s.sock, NOBODY, NOBODY, 0o600);
    assert_owner_group_mode(&s.ctl, 0, 0, 0o600);
    assert_allowed(NOBODY, NOBODY, &s.sock, "vhost-user socket given to nobody");
    assert_refused(NOBODY, NOBODY, &s.ctl, "control socket");
    assert_refused(
        STRANGER,
        STRANGER,
        &s.sock,
        "vhost-user socket owned by nobody",
    );

    // What an operator sees running `ctl` as the VMM's user, and as the daemon's user.
    let mut ctl = bin();
    ctl.arg("ctl")
        .arg("--control-socket")
        .arg(&s.ctl)
        .args(["resize", "2M"]);
    run_as(&mut ctl, NOBODY, NOBODY);
    let out = ctl.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let out = bin()
        .arg("ctl")
        .arg("--control-socket")
        .arg(&s.ctl)
        .args(["--json", "stats"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats["image"]["virtual_size"],
        1 << 20,
        "resize was refused"
    );

    s.daemon.terminate_ok();
    let log = s.daemon.stderr();
    let line = format!(
        "vhost-user socket {}: owner nobody, group nogroup, mode 0600: only user nobody can \
         connect\n",
        s.sock.display()
    );
    assert!(log.contains(&line), "log lacks {line:?}:\n{log}");
}

/// --socket-* and --control-socket-* each set only their own socket, and a group with mode
/// 0660 lets exactly that group's members in.
#[test]
fn each_socket_gets_its_own_owner_group_and_mode() {
    if !root_or_skip("needs root to chown") {
        return;
    }
    let mut s = serve_with(&[
        "--socket-group",
        "nogroup",
        "--socket-mode",
        "0660",
        "--control-socket-owner",
        "nobody",
        "--control-socket-group",
        &STRANGER.to_string(),
        "--control-socket-mode",
        "0640",
    ]);
    assert_owner_group_mode(&s.sock, 0, NOBODY, 0o660);
    assert_owner_group_mode(&s.ctl, NOBODY, STRANGER, 0o640);
    // The vhost-user socket: nogroup's members in, others out.
    assert_allowed(
        STRANGER,
        NOBODY,
        &s.sock,
        "vhost-user socket, group nogroup",
    );
    assert_refused(
        STRANGER,
        STRANGER,
        &s.sock,
        "vhost-user socket, other group",
    );
    // The control socket: its owner in; its group has no write permission, so out.
    assert_allowed(NOBODY, NOBODY, &s.ctl, "control socket owner");
    assert_refused(
        STRANGER + 1,
        STRANGER,
        &s.ctl,
        "control socket group (0640)",
    );
    assert_refused(STRANGER + 1, STRANGER + 1, &s.ctl, "control socket, other");
    s.daemon.terminate_ok();
}

#[test]
fn control_socket_options_need_a_control_socket() {
    for args in [
        &["--control-socket-owner", "0"][..],
        &["--control-socket-group", "0"],
        &["--control-socket-mode", "0660"],
    ] {
        let out = bin()
            .args(["--socket-path", "/tmp/x.sock", "--blk-file", "/tmp/y"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--control-socket <PATH>"), "{args:?}: {err}");
    }
}

#[test]
fn unknown_owner_is_a_clean_error() {
    for (option, kind) in [
        ("--socket-owner", "user"),
        ("--socket-group", "group"),
        ("--control-socket-owner", "user"),
        ("--control-socket-group", "group"),
    ] {
        let out = bin()
            .args(["--socket-path", "/tmp/x.sock", "--blk-file", "/tmp/y"])
            .args(["--control-socket", "/tmp/z.sock"])
            .args([option, "no-such-name-xyz"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("no {kind} 'no-such-name-xyz'")) && err.contains(option),
            "{option}: {err}"
        );
    }
}

#[test]
fn never_replaces_a_symlink_or_file_at_the_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.path().join("vub.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = bin()
        .arg("--socket-path")
        .arg(&link)
        .arg("--blk-file")
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn no_file_descriptor_leak_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("vub.sock");
    let mut d = ChildGuard::new(
        bin()
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img)
            .args(["--format", "raw", "--num-queues", "4"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, &mut d);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    let connect = || {
        let mut c = Client::simple(&sock);
        c.q(0).write_ok(0, &pattern(1, 0, 4096));
    };
    // One connection first, so lazily created things exist in both counts.
    connect();
    let settle = |want: Option<usize>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = fds();
        while want.is_some_and(|w| n > w) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            n = fds();
        }
        n
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = settle(None);
    for _ in 0..10 {
        connect();
    }
    let after = settle(Some(before));
    assert!(
        after <= before,
        "open fds grew from {before} to {after} over 10 connections"
    );
}

//! Security properties: the daemon runs unprivileged, sockets get the requested owner, group
//! and mode, and it never replaces something at the socket path that is not a stale socket.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern, ChildGuard, Client, WAIT_TIMEOUT};

const NOBODY: u32 = 65534;

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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip_unless_ci("needs root to drop privileges");
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
    // SAFETY: setgroups/setgid/setuid are async-signal-safe and only affect the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

#[test]
fn sockets_get_owner_group_and_mode() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip_unless_ci("needs root to chown");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("vub.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut d = ChildGuard::new(
        bin()
            .arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .arg("--blk-file")
            .arg(&img)
            .args(["--socket-owner", "65534", "--socket-group", "nogroup"])
            .args(["--socket-mode", "0660"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, &mut d);
    wait_for(&ctl, &mut d);
    for p in [&sock, &ctl] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.uid(), NOBODY, "{}", p.display());
        assert_eq!(
            m.gid(),
            NOBODY,
            "{} (nogroup is 65534 on Debian)",
            p.display()
        );
        assert_eq!(m.mode() & 0o777, 0o660, "{}", p.display());
    }
}

#[test]
fn unknown_owner_is_a_clean_error() {
    let out = bin()
        .args(["--socket-path", "/tmp/x.sock", "--blk-file", "/tmp/y"])
        .args(["--socket-owner", "no-such-user-xyz"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no user 'no-such-user-xyz'"), "{err}");
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

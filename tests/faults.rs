//! Host I/O errors, EIO and ENOSPC (injected with the hidden `--inject-faults` option): the
//! affected guest requests complete with IOERR, the daemon keeps serving, service resumes
//! when the faults stop, and qcow2 images stay consistent. (Real ENOSPC from a full file
//! system is in tests/enospc.rs.)

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{pattern, qemu_img, qemu_img_check, Client, Daemon, DaemonConfig};

const KIB: u64 = 1024;

fn make_image(dir: &Path, format: &str) -> std::path::PathBuf {
    let img = dir.join(format!("disk.{format}"));
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        img.as_os_str(),
        "16M".as_ref(),
    ]);
    img
}

/// Writes 40 blocks one at a time while writes 11..=20 fail with `errno` (named `name` in
/// the fault spec): each failed request completes with IOERR (-EIO from the client,
/// whatever the host errno), the daemon logs the host error, and everything else reads back.
fn write_faults(format: &str, name: &str, errno: i32) {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), format);
    let cfg = DaemonConfig::new()
        .arg("--inject-faults")
        .arg(&format!("write:{name}:after=10:count=10"));
    let daemon = Daemon::start_format(dir.path(), &img, format, &cfg);
    let mut c = Client::simple(&daemon.socket);
    let mut failed = Vec::new();
    for i in 0..40u64 {
        let data = pattern(i, i * 64 * KIB, 16 * 1024);
        let done = c.q(0).write(i * 64 * KIB, &data);
        if done.ret != 0 {
            assert_eq!(done.ret, -libc::EIO, "write {i}: {}", done.errno_name());
            failed.push(i);
        }
    }
    assert_eq!(failed, (10..20).collect::<Vec<_>>(), "{format}");
    assert_eq!(c.q(0).flush().ret, 0);
    for i in 0..40u64 {
        let got = c.q(0).read_ok(i * 64 * KIB, 16 * 1024);
        if failed.contains(&i) {
            // Never written: still zeros (no half-written data from a failed request).
            assert!(got.iter().all(|&b| b == 0), "{format}: block {i} has data");
        } else {
            assert_eq!(
                got,
                pattern(i, i * 64 * KIB, 16 * 1024),
                "{format}: block {i}"
            );
        }
    }
    drop(c);
    // The host error reached the log as what it was.
    let host = std::io::Error::from_raw_os_error(errno).to_string();
    let log = daemon.log();
    assert_eq!(log.matches(&host).count(), 10, "{format}: {name}: {log}");
    daemon.terminate_ok();
    if format == "qcow2" {
        let check = qemu_img_check(&img);
        assert!(
            check.clean(),
            "qemu-img check after injected {name}: {check:?}"
        );
    }
}

#[test]
fn write_eio_raw() {
    write_faults("raw", "eio", libc::EIO);
}

#[test]
fn write_eio_qcow2() {
    write_faults("qcow2", "eio", libc::EIO);
}

#[test]
fn write_enospc_raw_and_qcow2() {
    for format in ["raw", "qcow2"] {
        write_faults(format, "enospc", libc::ENOSPC);
    }
}

#[test]
fn failed_flush_is_reported_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "qcow2");
    let cfg = DaemonConfig::new()
        .arg("--inject-faults")
        .arg("flush:eio:count=1");
    let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &cfg);
    let mut c = Client::simple(&daemon.socket);
    let data = pattern(7, 0, 64 * 1024);
    c.q(0).write_ok(0, &data);
    assert_eq!(c.q(0).flush().ret, -libc::EIO, "first flush must fail");
    assert_eq!(c.q(0).flush().ret, 0, "second flush must succeed");
    drop(c);
    // After a crash the flushed data must be there.
    daemon.kill();
    let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    assert_eq!(c.q(0).read_ok(0, data.len()), data);
    drop(c);
    daemon.terminate_ok();
    assert!(qemu_img_check(&img).clean());
}

#[test]
fn read_eio_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "raw");
    let cfg = DaemonConfig::new()
        .arg("--inject-faults")
        .arg("read:eio:after=1:count=2");
    let daemon = Daemon::start_format(dir.path(), &img, "raw", &cfg);
    let mut c = Client::simple(&daemon.socket);
    let data = pattern(9, 4096, 4096);
    c.q(0).write_ok(4096, &data);
    let r: Vec<i32> = (0..5)
        .map(|_| c.q(0).read(4096, 4096).map(|_| 0).unwrap_or_else(|d| d.ret))
        .collect();
    assert_eq!(r, vec![0, -libc::EIO, -libc::EIO, 0, 0]);
    assert_eq!(c.q(0).read_ok(4096, 4096), data);
    drop(c);
    daemon.terminate_ok();
}

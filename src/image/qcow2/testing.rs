//! Helpers for the qcow2 unit tests: `qemu-img` as the oracle, and a data pattern.

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img ARGS`, asserting success; returns its standard output.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed by this test (install qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE` (the oracle's own image layouts).
pub fn qemu_img_create(path: &Path, opts: &str, size: &str) {
    let p = path.to_str().expect("UTF-8 test path");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, size]);
}

/// Asserts that `qemu-img check` finds no errors in `path`, and no leaks unless `leaks_ok`
/// (exit code 3: a crash may leak clusters).
pub fn assert_qemu_img_check(path: &Path, leaks_ok: bool) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is needed by this test (install qemu-utils)");
    let code = out.status.code();
    assert!(
        code == Some(0) || (leaks_ok && code == Some(3)),
        "{}: {code:?}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Deterministic bytes for guest offset `off` (differs per 512-byte sector and per offset).
pub fn pattern(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|k| ((off >> 9) ^ (k * 31) ^ (off >> 20)) as u8)
        .collect()
}

//! The vhost-user protocol through a raw frontend (`common::raw::RawClient`) against the real
//! daemon:
//!
//! * inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the daemon is SIGKILLed
//!   with requests deterministically in flight (the test-only fault layer makes a write hang),
//!   a new daemon gets the same guest memory, rings and inflight region, and every request
//!   must complete exactly once, in order, with its data on disk.
//!
//! All of this is specific to our daemon (fault injection, log lines), so it is skipped with
//! `VUB_TEST_BACKEND=qsd`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::raw::*;
use common::{
    assert_bytes_eq, backend, create_image, pattern, qemu_img, qemu_img_check, read_file, Backend,
    Daemon, DaemonConfig, SECTOR, WAIT_TIMEOUT,
};

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;

/// True (after saying so) when the tests run against another backend.
fn skip_other_backend() -> bool {
    if backend() == Backend::Qsd {
        eprintln!("skipped: exercises our daemon's fault injection and log");
        return true;
    }
    false
}

/// Waits (≤ 10 s) until the daemon's log contains `needle`.
#[track_caller]
fn wait_for_log(d: &Daemon, needle: &str) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not log {needle:?} within {WAIT_TIMEOUT:?}\n--- log ---\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The log of the latest daemon started with `Daemon::start_format` (which appends every
/// incarnation's log to one file, each after a `===== start` line).
fn latest_log(d: &Daemon) -> String {
    let log = d.log();
    match log.rfind("===== start") {
        Some(i) => log[i..].to_string(),
        None => log,
    }
}

// ---------------------------------------------------------------------------------------------
// Inflight I/O tracking across a daemon crash
// ---------------------------------------------------------------------------------------------

/// Queue size of the inflight tests: room for 10 requests in flight (3 descriptors each).
const QSIZE: u16 = 32;
/// Writes submitted.
const N: usize = 8;
/// Writes that complete before the fault layer makes the next one hang.
const DONE_BEFORE: usize = 3;
const BLOCK: usize = 4 * KIB;

/// Disk offset of write `i`: every other 4 KiB block, so no two writes touch.
fn offset(i: usize) -> u64 {
    (2 * i * BLOCK) as u64
}

fn data(i: usize) -> Vec<u8> {
    pattern(100 + i as u64, offset(i), BLOCK)
}

/// Queue 0 of an inflight region (vhost-user.rst "Inflight I/O tracking", split virtqueues:
/// `features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16`, then
/// `desc_num` entries of `inflight u8, padding [u8; 5], next u16, counter u64`).
#[derive(Debug)]
struct InflightQueue {
    version: u16,
    desc_num: u16,
    used_idx: u16,
    /// Heads marked in flight, in the order they were taken (by counter).
    inflight: Vec<u16>,
}

fn inflight_queue0(region: &[u8]) -> InflightQueue {
    let u16_at = |o: usize| u16::from_le_bytes([region[o], region[o + 1]]);
    let desc_num = u16_at(10);
    assert!(
        region.len() >= 16 + 16 * usize::from(desc_num),
        "inflight region of {} bytes for {desc_num} entries",
        region.len()
    );
    let mut inflight: Vec<(u64, u16)> = (0..desc_num)
        .filter(|&h| region[16 + 16 * usize::from(h)] != 0)
        .map(|h| {
            let e = 16 + 16 * usize::from(h);
            let counter = u64::from_le_bytes(region[e + 8..e + 16].try_into().unwrap());
            (counter, h)
        })
        .collect();
    inflight.sort_unstable();
    InflightQueue {
        version: u16_at(8),
        desc_num,
        used_idx: u16_at(14),
        inflight: inflight.into_iter().map(|(_, h)| h).collect(),
    }
}

/// How the frontend sets the queue's base (SET_VRING_BASE) on the new connection.
#[derive(Clone, Copy, Debug)]
enum Base {
    /// To the used index, as QEMU does when the connection to the backend broke.
    UsedIdx,
    /// To the avail index the dead daemon had reached: only the inflight region tells the
    /// new daemon that requests are outstanding; it must rewind by itself.
    AvailIdx,
}

fn make_image(dir: &Path, format: &str) -> PathBuf {
    match format {
        "raw" => create_image(dir, "disk.img", MIB, None),
        _ => {
            let img = dir.join("disk.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
            img
        }
    }
}

/// N writes. The first DONE_BEFORE complete, followed by a FLUSH (a qcow2 write that was not
/// flushed may legitimately be lost in a crash); the others are in flight (taken by the
/// worker, the first of them hanging in the fault layer) when the daemon is SIGKILLed. A new
/// daemon without faults gets the same memory, rings and inflight region. Checks that the dead
/// daemon's inflight region shows exactly the outstanding requests, that every request is on
/// the used ring exactly once and in submission order with status OK, that the resubmission
/// was logged, and that the data reads back.
fn inflight_recovery(format: &str, base: Base) {
    if skip_other_backend() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), format);
    let faulty = DaemonConfig::new()
        .num_queues(1)
        .arg("--inject-faults")
        .arg(&format!("write:hang:after={DONE_BEFORE}"));
    let d1 = Daemon::start_format(dir.path(), &img, format, &faulty);
    let opts = RawOpts {
        queue_size: QSIZE,
        protocol_features: PF_REPLY_ACK,
        inflight: true,
        ..RawOpts::default()
    };
    let mut c = RawClient::connect_with(&d1.socket, opts);
    for i in 0..N {
        c.data()[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&data(i));
    }
    let writes: Vec<RawReq> = (0..N)
        .map(|i| c.req(T_OUT, offset(i) / SECTOR, i * BLOCK, BLOCK))
        .collect();
    let flush = c.req(T_FLUSH, 0, 0, 0);

    let mut heads: Vec<u16> = writes[..DONE_BEFORE].iter().map(|r| c.submit(r)).collect();
    heads.push(c.submit(&flush));
    c.kick();
    let completed = heads.len() as u16;
    c.wait_used(completed);
    // One avail index update for the rest, so the worker takes all of them before it runs
    // the first, which hangs.
    heads.extend(writes[DONE_BEFORE..].iter().map(|r| c.submit(r)));
    c.kick();
    wait_for_log(&d1, "hangs until the process is killed");
    d1.kill();

    let (used_idx, avail_idx) = (c.used_idx(), c.avail_idx());
    assert_eq!(used_idx, completed, "completions before the kill");
    let region = inflight_queue0(&c.inflight_region());
    assert_eq!((region.version, region.desc_num), (1, QSIZE), "{region:?}");
    assert_eq!(region.used_idx, completed, "{region:?}");
    assert_eq!(
        region.inflight,
        heads[usize::from(completed)..],
        "the dead daemon's inflight region must show exactly the outstanding requests, in \
         the order they were taken"
    );

    let d2 = Daemon::start_format(dir.path(), &img, format, &DaemonConfig::new().num_queues(1));
    let vring_base = match base {
        Base::UsedIdx => used_idx,
        Base::AvailIdx => avail_idx,
    };
    c.reconnect(&d2.socket, vring_base);
    c.kick();
    c.wait_used(avail_idx);
    // A read after them: completions are in order on a queue, so a duplicate completion of
    // a resubmitted request would land before this one.
    let read = c.req(T_IN, offset(0) / SECTOR, N * BLOCK, BLOCK);
    heads.push(c.submit(&read));
    c.kick();
    c.wait_used(avail_idx + 1);
    let used = c.completions(0, c.used_idx());
    assert_eq!(
        used.iter().map(|u| u.head).collect::<Vec<_>>(),
        heads,
        "every request on the used ring exactly once, in submission order ({base:?})"
    );
    for (i, u) in used.iter().enumerate() {
        assert_eq!(u.status, S_OK, "request {i} ({u:?})");
    }
    assert!(
        used[..used.len() - 1].iter().all(|u| u.len == 1),
        "a write's or flush's used length is its status byte: {used:?}"
    );
    assert_eq!(
        used[used.len() - 1].len,
        BLOCK as u32 + 1,
        "a read's: data and status"
    );
    assert_bytes_eq(
        &c.data()[N * BLOCK..(N + 1) * BLOCK],
        &data(0),
        offset(0),
        "read after recovery",
    );
    let region = inflight_queue0(&c.inflight_region());
    assert!(region.inflight.is_empty(), "after recovery: {region:?}");
    assert_eq!(region.used_idx, avail_idx + 1, "after recovery: {region:?}");

    let log = latest_log(&d2);
    let outstanding = N - DONE_BEFORE;
    assert!(
        log.contains(&format!(
            "queue 0: resubmitting {outstanding} in-flight request(s)"
        )),
        "{log}"
    );
    let rewind = format!("rewinding the avail index from {avail_idx} to {used_idx}");
    match base {
        Base::UsedIdx => assert!(!log.contains("rewinding"), "{log}"),
        Base::AvailIdx => assert!(log.contains(&rewind), "{log}"),
    }

    for i in 0..N {
        assert_eq!(
            c.request(T_IN, offset(i) / SECTOR, BLOCK, None),
            S_OK,
            "read back {i}"
        );
        assert_bytes_eq(
            &c.data()[..BLOCK],
            &data(i),
            offset(i),
            "data after recovery",
        );
    }
    drop(c);
    d2.terminate_ok();
    if format == "raw" {
        let file = read_file(&img);
        for i in 0..N {
            let o = offset(i) as usize;
            assert_bytes_eq(&file[o..o + BLOCK], &data(i), offset(i), "image file");
        }
    } else {
        let check = qemu_img_check(&img);
        assert!(check.clean(), "{}", check.output);
    }
}

#[test]
fn inflight_requests_resubmitted_after_crash_frontend_rewinds() {
    inflight_recovery("raw", Base::UsedIdx);
}

#[test]
fn inflight_requests_resubmitted_after_crash_daemon_rewinds() {
    inflight_recovery("raw", Base::AvailIdx);
}

#[test]
fn inflight_requests_resubmitted_after_crash_qcow2() {
    inflight_recovery("qcow2", Base::AvailIdx);
}

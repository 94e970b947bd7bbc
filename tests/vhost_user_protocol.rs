//! The vhost-user protocol through a raw frontend (`common::raw::RawClient`) against the real
//! daemon:
//!
//! * inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the daemon is SIGKILLed
//!   with requests deterministically in flight (the test-only fault layer makes a write hang),
//!   a new daemon gets the same guest memory, rings and inflight region, and every request
//!   must complete exactly once, in order, with its data on disk;
//! * conformance: offered features and protocol features, the queue count, the configuration
//!   space and its writable `writeback` byte;
//! * hostile memory tables: overlapping regions, updates while the queue runs, buffers
//!   outside every region;
//! * live migration: the dirty log (SET_LOG_BASE) is marked for every byte the daemon writes
//!   into guest memory while VHOST_F_LOG_ALL is acked, and GET_VRING_BASE answers only once
//!   every request taken from the queue is on the used ring.
//!
//! All of this is specific to our daemon (fault injection, log lines), so it is skipped with
//! `VUB_TEST_BACKEND=qsd`.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::raw::*;
use common::{
    assert_bytes_eq, backend, create_image, create_qcow2, pattern, qemu_img_check, read_file,
    Backend, Daemon, DaemonConfig, SECTOR, WAIT_TIMEOUT,
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

/// A temporary directory with a 1 MiB raw image (`pattern(seed)`, or zeros) served by a
/// one-queue daemon; None (after saying so) with another backend.
fn one_queue_daemon(seed: Option<u64>) -> Option<(tempfile::TempDir, PathBuf, Daemon)> {
    if skip_other_backend() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", MIB, seed);
    let d = Daemon::start(dir.path(), &img, &DaemonConfig::new().num_queues(1));
    Some((dir, img, d))
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
const N: usize = 7;
/// Writes that complete before the fault layer makes the next one hang or stall.
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
            create_qcow2(img.to_str().unwrap(), "", "1M");
            img
        }
    }
}

/// How the dead daemon left its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outstanding {
    /// Write DONE_BEFORE hangs holding the worker: it is in flight, the avail entry right
    /// after the used index, and the writes after it are still on the avail ring.
    Tail,
    /// Write DONE_BEFORE never completes but the worker goes on: the writes after it complete
    /// first, so the one in-flight request sits *before* completed ones in the avail ring.
    Hole,
}

/// N writes. The first DONE_BEFORE complete, followed by a FLUSH (a qcow2 write that was not
/// flushed may legitimately be lost in a crash); then the rest are submitted and the daemon
/// is SIGKILLed with some of them in flight (see [`Outstanding`]). A new daemon without faults
/// gets the same memory, rings and inflight region. Checks that the dead daemon's inflight
/// region shows exactly the outstanding requests, that every request is on the used ring
/// exactly once with status OK (the ones before the kill in order), that the resubmission was
/// logged, and that the data reads back.
fn inflight_recovery(format: &str, base: Base, outstanding: Outstanding) {
    if skip_other_backend() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), format);
    let fault = match outstanding {
        Outstanding::Tail => format!("write:hang:after={DONE_BEFORE}"),
        Outstanding::Hole => format!("write:stall:after={DONE_BEFORE}:count=1"),
    };
    let faulty = DaemonConfig::new()
        .num_queues(1)
        .arg("--inject-faults")
        .arg(&fault);
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
    let flushed = heads.len() as u16;
    c.wait_used(flushed);
    // One avail index update for the rest.
    heads.extend(writes[DONE_BEFORE..].iter().map(|r| c.submit(r)));
    c.kick();
    let (completed, in_flight) = match outstanding {
        Outstanding::Tail => {
            wait_for_log(&d1, "hangs until the process is killed");
            (flushed, vec![heads[usize::from(flushed)]])
        }
        Outstanding::Hole => {
            wait_for_log(&d1, "never completes");
            let completed = flushed + (N - DONE_BEFORE - 1) as u16;
            c.wait_used(completed);
            (completed, vec![heads[usize::from(flushed)]])
        }
    };
    d1.kill();

    let (used_idx, avail_idx) = (c.used_idx(), c.avail_idx());
    assert_eq!(used_idx, completed, "completions before the kill");
    let region = inflight_queue0(&c.inflight_region());
    assert_eq!((region.version, region.desc_num), (1, QSIZE), "{region:?}");
    assert_eq!(region.used_idx, completed, "{region:?}");
    assert_eq!(
        region.inflight, in_flight,
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
    // A read after them: a duplicate completion of a resubmitted request, or a chain taken
    // again from the avail ring, would show up as an extra used entry (the read's would
    // then not be the last).
    let read = c.req(T_IN, offset(0) / SECTOR, N * BLOCK, BLOCK);
    heads.push(c.submit(&read));
    c.kick();
    c.wait_used(avail_idx + 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.used_idx(), avail_idx + 1, "no extra completions");
    let used = c.completions(0, c.used_idx());
    let used_heads: Vec<u16> = used.iter().map(|u| u.head).collect();
    let before = usize::from(flushed);
    // The engine completes requests in any order (a FLUSH covers the writes completed before it
    // was taken, as in QEMU), so the batch before the outstanding writes is compared as a set.
    let mut first: Vec<u16> = used_heads[..before].to_vec();
    let mut first_expected: Vec<u16> = heads[..before].to_vec();
    first.sort_unstable();
    first_expected.sort_unstable();
    assert_eq!(
        first, first_expected,
        "completions before the writes left in flight"
    );
    let mut rest = used_heads[before..used_heads.len() - 1].to_vec();
    let mut expected = heads[before..heads.len() - 1].to_vec();
    rest.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        rest, expected,
        "every request on the used ring exactly once ({base:?}, {outstanding:?}): {used:?}"
    );
    assert_eq!(used_heads.last(), heads.last(), "the read last: {used:?}");
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
    assert!(
        log.contains(&format!(
            "queue 0: resubmitting {} in-flight request(s)",
            in_flight.len()
        )),
        "{log}"
    );
    // Every chain the dead daemon took is on the used ring or in flight: the new one goes on
    // from there, whatever base the frontend set.
    let next = used_idx + in_flight.len() as u16;
    if vring_base == next {
        assert!(!log.contains("moving the avail index"), "{log}");
    } else {
        let moved = format!("moving the avail index from {vring_base} to {next}");
        assert!(log.contains(&moved), "{log}");
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
    inflight_recovery("raw", Base::UsedIdx, Outstanding::Tail);
}

#[test]
fn inflight_requests_resubmitted_after_crash_daemon_rewinds() {
    inflight_recovery("raw", Base::AvailIdx, Outstanding::Tail);
}

#[test]
fn inflight_requests_resubmitted_after_crash_qcow2() {
    inflight_recovery("qcow2", Base::AvailIdx, Outstanding::Tail);
}

/// Requests complete out of order: the one left in flight is followed by completed ones, so
/// it cannot be found by rewinding the avail ring; it must be run again by its head.
#[test]
fn inflight_request_before_completed_ones_resubmitted_by_head() {
    inflight_recovery("raw", Base::UsedIdx, Outstanding::Hole);
}

#[test]
fn inflight_request_before_completed_ones_resubmitted_by_head_daemon_rewinds() {
    inflight_recovery("raw", Base::AvailIdx, Outstanding::Hole);
}

/// After a crash with nothing in flight, QEMU can only derive the base it sends with
/// SET_VRING_BASE from a used index it may not have read since the device started (it cannot
/// ask the dead backend): a stale value far behind the rings. The inflight region says every
/// chain before the used index completed, so the new daemon must start from there: neither
/// refuse the ring nor run completed chains again.
#[test]
fn stale_vring_base_after_a_crash_is_corrected_from_the_inflight_region() {
    let Some((_dir, _img, d1)) = one_queue_daemon(None) else {
        return;
    };
    let opts = RawOpts {
        queue_size: QSIZE,
        protocol_features: PF_REPLY_ACK,
        inflight: true,
        ..RawOpts::default()
    };
    let mut c = RawClient::connect_with(&d1.socket, opts);
    const DONE: u16 = 5;
    for i in 0..usize::from(DONE) {
        c.data()[..BLOCK].copy_from_slice(&data(i));
        assert_eq!(c.request(T_OUT, offset(i) / SECTOR, BLOCK, None), S_OK);
    }
    assert_eq!(c.used_idx(), DONE);
    let dir = d1.log_path.parent().unwrap().to_path_buf();
    let img = dir.join("disk.img");
    d1.kill();
    let d2 = Daemon::start_format(&dir, &img, "raw", &DaemonConfig::new().num_queues(1));
    c.reconnect(&d2.socket, 0);
    let read = c.req(T_IN, offset(DONE as usize - 1) / SECTOR, BLOCK, BLOCK);
    let head = c.submit(&read);
    c.kick();
    c.wait_used(DONE + 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.used_idx(), DONE + 1, "completed chains ran again");
    let used = c.completions(DONE, DONE + 1);
    assert_eq!((used[0].head, used[0].status), (head, S_OK), "{used:?}");
    assert_bytes_eq(
        &c.data()[BLOCK..2 * BLOCK],
        &data(usize::from(DONE) - 1),
        offset(usize::from(DONE) - 1),
        "read after the reconnection",
    );
    let log = latest_log(&d2);
    assert!(
        log.contains(&format!("moving the avail index from 0 to {DONE}")),
        "{log}"
    );
    drop(c);
    d2.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// Conformance: features, protocol features, queue count, configuration space
// ---------------------------------------------------------------------------------------------

/// Protocol features for the conformance tests: CONFIG for GET/SET_CONFIG, MQ for
/// GET_QUEUE_NUM, REPLY_ACK so every setup message and SET_CONFIG is checked.
fn conformance_opts(features: u64) -> RawOpts {
    RawOpts {
        features,
        protocol_features: PF_CONFIG | PF_MQ | PF_REPLY_ACK,
        ..RawOpts::default()
    }
}

#[test]
fn offered_features_protocol_features_and_queue_count() {
    if skip_other_backend() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", MIB, None);
    for read_only in [false, true] {
        let mut cfg = DaemonConfig::new().num_queues(3);
        if read_only {
            cfg = cfg.read_only();
        }
        let d = Daemon::start(dir.path(), &img, &cfg);
        let mut c = RawClient::connect_with(&d.socket, conformance_opts(DEFAULT_FEATURES));
        let f = c.device_features;
        for (name, bit) in [
            ("VERSION_1", F_VERSION_1),
            ("SEG_MAX", F_SEG_MAX),
            ("BLK_SIZE", F_BLK_SIZE),
            ("TOPOLOGY", F_TOPOLOGY),
            ("FLUSH", F_FLUSH),
            ("CONFIG_WCE", F_CONFIG_WCE),
            ("MQ", F_MQ),
            ("DISCARD", F_DISCARD),
            ("WRITE_ZEROES", F_WRITE_ZEROES),
            ("RING_EVENT_IDX", F_RING_EVENT_IDX),
            ("RING_INDIRECT_DESC", F_RING_INDIRECT_DESC),
            ("PROTOCOL_FEATURES", F_PROTOCOL_FEATURES),
            ("LOG_ALL", F_LOG_ALL),
        ] {
            assert!(f & bit != 0, "feature {name} not offered: {f:#x}");
        }
        assert_eq!(f & F_RO != 0, read_only, "RO offered: {f:#x}");
        let pf = c.protocol_features;
        for (name, bit) in [
            ("MQ", PF_MQ),
            ("REPLY_ACK", PF_REPLY_ACK),
            ("CONFIG", PF_CONFIG),
            ("CONFIGURE_MEM_SLOTS", PF_CONFIGURE_MEM_SLOTS),
            ("INFLIGHT_SHMFD", PF_INFLIGHT_SHMFD),
            ("LOG_SHMFD", PF_LOG_SHMFD),
        ] {
            assert!(
                pf & bit != 0,
                "protocol feature {name} not offered: {pf:#x}"
            );
        }
        assert_eq!(c.get_u64(GET_QUEUE_NUM), 3, "GET_QUEUE_NUM");
        drop(c);
        d.terminate_ok();
    }
}

/// Offsets in struct virtio_blk_config (virtio 1.2, 5.2.4).
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const GEOMETRY: usize = 16;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const UNUSED0: usize = 33;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    pub const UNUSED1: usize = 57;
    /// Up to and including unused1 (before the secure-erase fields).
    pub const LEN: usize = 60;
}

fn u32_at(c: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(c[o..o + 4].try_into().unwrap())
}

fn u16_at(c: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(c[o..o + 2].try_into().unwrap())
}

#[test]
fn config_space_reports_the_device() {
    if skip_other_backend() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB and 9 sectors: 512-byte blocks keep every sector, 4 KiB blocks round down.
    let size = 8 * MIB + 9 * SECTOR;
    let img = create_image(dir.path(), "disk.img", size, None);
    for (queue_size, lbs, capacity) in [
        (None, 512u32, size / SECTOR),
        (Some(64u32), 4096, (8 * MIB + 4096) / SECTOR),
    ] {
        let mut cfg = DaemonConfig::new().num_queues(2).logical_block_size(lbs);
        cfg.queue_size = queue_size;
        let d = Daemon::start(dir.path(), &img, &cfg);
        let mut rc = RawClient::connect_with(&d.socket, conformance_opts(DEFAULT_FEATURES));
        let what = format!("--queue-size {queue_size:?} --logical-block-size {lbs}");
        let c = &rc.get_config(0, cfg::LEN as u32);
        assert_eq!(c.len(), cfg::LEN, "{what}: GET_CONFIG size");
        assert_eq!(
            u64::from_le_bytes(c[cfg::CAPACITY..8].try_into().unwrap()),
            capacity,
            "{what}: capacity"
        );
        assert_eq!(
            u32_at(c, cfg::SIZE_MAX),
            0,
            "{what}: size_max (not offered)"
        );
        // The default --queue-size is 256.
        let qs = queue_size.unwrap_or(256);
        assert_eq!(u32_at(c, cfg::SEG_MAX), qs - 2, "{what}: seg_max");
        assert_eq!(
            u32_at(c, cfg::GEOMETRY),
            0,
            "{what}: geometry (not offered)"
        );
        assert_eq!(u32_at(c, cfg::BLK_SIZE), lbs, "{what}: blk_size");
        assert_eq!(c[cfg::PHYSICAL_BLOCK_EXP], 0, "{what}: physical_block_exp");
        assert_eq!(c[cfg::ALIGNMENT_OFFSET], 0, "{what}: alignment_offset");
        assert_eq!(u16_at(c, cfg::MIN_IO_SIZE), 1, "{what}: min_io_size");
        assert_eq!(u32_at(c, cfg::OPT_IO_SIZE), 0, "{what}: opt_io_size");
        assert_eq!(c[cfg::WRITEBACK], 1, "{what}: writeback (the default)");
        assert_eq!(c[cfg::UNUSED0], 0, "{what}: unused0");
        assert_eq!(u16_at(c, cfg::NUM_QUEUES), 2, "{what}: num_queues");
        // The daemon's limits (src/virtio_blk/config.rs: 2 GiB and 32 segments per
        // request), a whole number of logical blocks; alignment: the raw image's 4 KiB.
        let lbs_sectors = lbs / SECTOR as u32;
        for (name, o) in [
            ("max_discard_sectors", cfg::MAX_DISCARD_SECTORS),
            ("max_write_zeroes_sectors", cfg::MAX_WRITE_ZEROES_SECTORS),
        ] {
            assert_eq!(u32_at(c, o), 1 << 22, "{what}: {name}");
            assert_eq!(u32_at(c, o) % lbs_sectors, 0, "{what}: {name}");
        }
        assert_eq!(
            u32_at(c, cfg::MAX_DISCARD_SEG),
            32,
            "{what}: max_discard_seg"
        );
        assert_eq!(
            u32_at(c, cfg::MAX_WRITE_ZEROES_SEG),
            32,
            "{what}: max_write_zeroes_seg"
        );
        assert_eq!(
            u32_at(c, cfg::DISCARD_SECTOR_ALIGNMENT),
            8,
            "{what}: discard_sector_alignment"
        );
        assert_eq!(
            c[cfg::WRITE_ZEROES_MAY_UNMAP],
            1,
            "{what}: write_zeroes_may_unmap"
        );
        assert_eq!(&c[cfg::UNUSED1..cfg::LEN], &[0; 3], "{what}: unused1");
        drop(rc);
        d.terminate_ok();
    }
}

#[test]
fn writeback_byte_switches_the_cache_mode() {
    let Some((_dir, _img, d)) = one_queue_daemon(None) else {
        return;
    };

    let mut c =
        RawClient::connect_with(&d.socket, conformance_opts(DEFAULT_FEATURES | F_CONFIG_WCE));
    let wb = cfg::WRITEBACK as u32;
    assert_eq!(c.get_config(wb, 1), [1], "write-back by default");
    assert_eq!(
        c.set_config(wb, &[0]).expect("SET_CONFIG"),
        0,
        "to write-through"
    );
    assert_eq!(c.get_config(wb, 1), [0], "after switching to write-through");
    assert_eq!(
        c.get_config(0, cfg::LEN as u32)[cfg::WRITEBACK],
        0,
        "in the whole space"
    );
    c.data()[..4096].fill(0x5A);
    assert_eq!(
        c.request(T_OUT, 0, 4096, None),
        S_OK,
        "write in write-through mode"
    );
    assert_eq!(
        c.set_config(wb, &[1]).expect("SET_CONFIG"),
        0,
        "back to write-back"
    );
    assert_eq!(c.get_config(wb, 1), [1], "after switching back");
    drop(c);

    // CONFIG_WCE without FLUSH: the device must be (and report) write-through.
    let mut c = RawClient::connect_with(
        &d.socket,
        conformance_opts((DEFAULT_FEATURES | F_CONFIG_WCE) & !F_FLUSH),
    );
    assert_eq!(c.get_config(wb, 1), [0], "CONFIG_WCE acked without FLUSH");
    drop(c);

    // Writes the device does not allow (a read-only field; the writeback byte without
    // CONFIG_WCE, which QEMU forwards whenever the guest changes it) are ignored: the
    // configuration stays as it was and the connection keeps working. Failing them would
    // make vhost-user-backend drop the connection, a disconnect the guest could trigger.
    let mut c = RawClient::connect_with(&d.socket, conformance_opts(DEFAULT_FEATURES));
    let before = c.get_config(0, cfg::LEN as u32);
    assert_eq!(
        c.set_config(0, &[0xff; 8]).expect("SET_CONFIG"),
        0,
        "capacity write"
    );
    assert_eq!(
        c.set_config(wb, &[0]).expect("SET_CONFIG"),
        0,
        "writeback write without CONFIG_WCE"
    );
    assert_eq!(
        c.get_config(0, cfg::LEN as u32),
        before,
        "configuration unchanged"
    );
    write_read_back(&mut c, 8, 77);
    drop(c);
    assert!(
        d.log()
            .contains("ignoring a write of 8 config byte(s) at offset 0"),
        "{}",
        d.log()
    );
    d.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// Hostile memory tables
// ---------------------------------------------------------------------------------------------

/// Protocol features for the memory table tests: REPLY_ACK to see each message's result,
/// CONFIGURE_MEM_SLOTS for ADD/REM_MEM_REG.
fn memory_opts() -> RawOpts {
    RawOpts {
        protocol_features: PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS,
        ..RawOpts::default()
    }
}

/// Writes `pattern(seed)` to `sector` through `c` and reads it back.
#[track_caller]
fn write_read_back(c: &mut RawClient, sector: u64, seed: u64) {
    let w = pattern(seed, sector * SECTOR, 4096);
    c.data()[..4096].copy_from_slice(&w);
    assert_eq!(c.request(T_OUT, sector, 4096, None), S_OK, "write");
    c.data()[..4096].fill(0);
    assert_eq!(c.request(T_IN, sector, 4096, None), S_OK, "read");
    assert_bytes_eq(&c.data()[..4096], &w, sector * SECTOR, "read back");
}

#[test]
fn overlapping_memory_regions_are_refused() {
    let Some((_dir, _img, mut d)) = one_queue_daemon(Some(21)) else {
        return;
    };
    let half = MEM_LEN as u64 / 2;

    // SET_MEM_TABLE: the second region's guest range starts inside the first's.
    let mut c = RawClient::connect_with(&d.socket, memory_opts());
    write_read_back(&mut c, 0, 1);
    let a = c.mem().addr();
    let fd = c.mem().fd();
    let table = mem_table(&[[a, half, a, 0], [a + half / 2, half, a + half, half]]);
    // Refused: an error status, or the connection closed.
    let r = c.ack(SET_MEM_TABLE, &table, &[fd, fd]);
    assert!(!matches!(r, Ok(0)), "overlapping SET_MEM_TABLE accepted");
    drop(c);
    d.assert_running();

    // ADD_MEM_REG of a region overlapping the table's.
    let mut c = RawClient::connect_with(&d.socket, memory_opts());
    let a = c.mem().addr();
    let fd = c.mem().fd();
    let r = c.ack(ADD_MEM_REG, &mem_region([a + half, half, a, 0]), &[fd]);
    assert!(!matches!(r, Ok(0)), "overlapping ADD_MEM_REG accepted");
    drop(c);
    d.assert_running();

    // The next client is served correctly.
    let mut c = RawClient::connect(&d.socket);
    assert_eq!(c.request(T_IN, 64, 4096, None), S_OK, "read");
    assert_bytes_eq(
        &c.data()[..4096],
        &pattern(21, 64 * SECTOR, 4096),
        64 * SECTOR,
        "read",
    );
    write_read_back(&mut c, 8, 2);
    drop(c);
    d.terminate_ok();
}

/// Reads 4 KiB at `sector` into the start of `buf` through `c` and checks it holds `expected`.
#[track_caller]
fn read_into(c: &mut RawClient, buf: &mut GuestMem, sector: u64, expected: &[u8], what: &str) {
    let req = RawReq {
        req_type: T_IN,
        sector,
        data: Some((buf.addr(), 4096)),
        seg: None,
    };
    assert_eq!(c.run(&req), S_OK, "{what}");
    assert_bytes_eq(buf.bytes(0, 4096), expected, sector * SECTOR, what);
}

#[test]
fn memory_table_updates_while_the_queue_runs() {
    let Some((_dir, img, mut d)) = one_queue_daemon(Some(22)) else {
        return;
    };
    let mut c = RawClient::connect_with(&d.socket, memory_opts());
    let mut extra = GuestMem::new(MIB as usize);
    let (extra_addr, extra_fd) = (extra.addr(), extra.fd());
    let in_extra = |req_type, sector| RawReq {
        req_type,
        sector,
        data: Some((extra_addr, 4096)),
        seg: None,
    };
    write_read_back(&mut c, 0, 1);

    // Buffers outside every region (another mapping of ours the daemon was not given, and
    // one running past the end of guest memory) fail with IOERR, write nothing, and the
    // queue goes on.
    extra.bytes(0, 4096).fill(0x77);
    assert_eq!(
        c.run(&in_extra(T_IN, 16)),
        S_IOERR,
        "read into unknown memory"
    );
    assert_eq!(
        c.run(&in_extra(T_OUT, 16)),
        S_IOERR,
        "write from unknown memory"
    );
    let straddling = c.req(T_OUT, 16, MAX_DATA - 512, 512);
    let straddling = RawReq {
        data: straddling.data.map(|(addr, _)| (addr, 4096)),
        ..straddling
    };
    assert_eq!(
        c.run(&straddling),
        S_IOERR,
        "write running past guest memory"
    );
    assert_eq!(
        c.request(T_IN, 16, 4096, None),
        S_OK,
        "read after the failures"
    );
    assert_bytes_eq(
        &c.data()[..4096],
        &pattern(22, 16 * SECTOR, 4096),
        16 * SECTOR,
        "untouched",
    );

    // ADD_MEM_REG while the queue runs: the region works at once.
    let st = c.ack(ADD_MEM_REG, &mem_region(extra.region()), &[extra_fd]);
    assert_eq!(st.expect("ADD_MEM_REG"), 0, "ADD_MEM_REG");
    let expected = pattern(22, 16 * SECTOR, 4096);
    read_into(
        &mut c,
        &mut extra,
        16,
        &expected,
        "read into the added region",
    );
    let w = pattern(3, 24 * SECTOR, 4096);
    extra.bytes(0, 4096).copy_from_slice(&w);
    assert_eq!(
        c.run(&in_extra(T_OUT, 24)),
        S_OK,
        "write from the added region"
    );
    write_read_back(&mut c, 32, 4);

    // REM_MEM_REG: gone again.
    let st = c.ack(REM_MEM_REG, &mem_region(extra.region()), &[]);
    assert_eq!(st.expect("REM_MEM_REG"), 0, "REM_MEM_REG");
    assert_eq!(
        c.run(&in_extra(T_IN, 16)),
        S_IOERR,
        "read into the removed region"
    );
    write_read_back(&mut c, 40, 5);

    // SET_MEM_TABLE with both regions, then with the first only, between requests.
    let main = c.mem().region();
    let main_fd = c.mem().fd();
    // Sorted by guest address: vhost-user-backend (vm-memory) refuses an unsorted table.
    let mut regions = [(main, main_fd), (extra.region(), extra_fd)];
    regions.sort_by_key(|(r, _)| r[0]);
    let both = mem_table(&[regions[0].0, regions[1].0]);
    assert_eq!(
        c.ack(SET_MEM_TABLE, &both, &[regions[0].1, regions[1].1])
            .expect("SET_MEM_TABLE"),
        0
    );
    read_into(
        &mut c,
        &mut extra,
        24,
        &w,
        "read into the region the table added",
    );
    write_read_back(&mut c, 48, 6);
    let only_main = mem_table(&[main]);
    assert_eq!(
        c.ack(SET_MEM_TABLE, &only_main, &[main_fd])
            .expect("SET_MEM_TABLE"),
        0
    );
    assert_eq!(
        c.run(&in_extra(T_IN, 24)),
        S_IOERR,
        "read into the region the table dropped"
    );
    write_read_back(&mut c, 56, 7);

    drop(c);
    d.assert_running();
    d.terminate_ok();
    let file = read_file(&img);
    let o = (24 * SECTOR) as usize;
    assert_bytes_eq(&file[o..o + 4096], &w, 24 * SECTOR, "image file");
}

// ---------------------------------------------------------------------------------------------
// Live migration: dirty log, stop means drained
// ---------------------------------------------------------------------------------------------

/// The frontend's dirty log (one bit per 4 KiB page of guest physical memory), as a memfd.
struct DirtyLog {
    file: std::fs::File,
    /// Bytes of log: enough for every page up to the end of the client's guest memory (whose
    /// guest addresses are its virtual addresses, so this is a large, sparse file).
    len: u64,
}

impl DirtyLog {
    fn new(c: &RawClient) -> DirtyLog {
        use std::os::fd::FromRawFd;
        let end = c.data_addr(0) + MAX_DATA as u64;
        let len = (end / 4096).div_ceil(8) + 1;
        // SAFETY: memfd_create with a NUL-terminated name; the fd returned is ours.
        let fd = unsafe { libc::memfd_create(c"dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        DirtyLog { file, len }
    }

    /// SET_LOG_BASE: hands the log to the daemon (which replies).
    fn install(&self, c: &mut RawClient) {
        use std::os::fd::AsRawFd;
        let mut p = self.len.to_le_bytes().to_vec();
        p.extend_from_slice(&0u64.to_le_bytes());
        c.call(SET_LOG_BASE, &p, &[self.file.as_raw_fd()])
            .expect("SET_LOG_BASE");
    }

    /// Whether the page holding guest address `addr` is marked.
    fn dirty(&self, addr: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let page = addr / 4096;
        let mut b = [0u8; 1];
        self.file.read_exact_at(&mut b, page / 8).unwrap();
        b[0] & (1 << (page % 8)) != 0
    }
}

/// With VHOST_F_LOG_ALL acked and a log installed, what the daemon writes into guest memory
/// is marked: data read from the disk (which io_uring writes straight into guest memory),
/// GET_ID data, status bytes and the used ring; data it only reads (a write's payload) is
/// not. Without LOG_ALL the data pages are left alone (no logging cost outside a migration).
#[test]
fn dirty_log_marks_what_the_daemon_writes_into_guest_memory() {
    let Some((_dir, _img, d)) = one_queue_daemon(Some(5)) else {
        return;
    };
    for log_all in [true, false] {
        let mut c = RawClient::connect_with(
            &d.socket,
            RawOpts {
                features: DEFAULT_FEATURES | if log_all { F_LOG_ALL } else { 0 },
                protocol_features: PF_LOG_SHMFD,
                ..RawOpts::default()
            },
        );
        let log = DirtyLog::new(&c);
        log.install(&mut c);
        // A read into data pages 4..8, a write from pages 16..20, GET_ID into page 24.
        let read = c.req(T_IN, 0, 4 * 4096, 4 * 4096);
        assert_eq!(c.run(&read), S_OK);
        let write = c.req(T_OUT, 64, 16 * 4096, 4 * 4096);
        assert_eq!(c.run(&write), S_OK);
        let id = c.req(T_GET_ID, 0, 24 * 4096, 20);
        assert_eq!(c.run(&id), S_OK);
        let page = |p: usize| c.data_addr(p * 4096);
        // The rings and status bytes sit below the data (the used ring in the first page).
        let used_ring = c.data_addr(0) - DATA_OFF as u64;
        assert!(
            log.dirty(used_ring),
            "used ring not marked (log_all {log_all})"
        );
        for p in 4..8 {
            assert_eq!(
                log.dirty(page(p)),
                log_all,
                "read data page {p} (log_all {log_all})"
            );
        }
        assert!(
            log.dirty(page(24)),
            "GET_ID page (written through vm-memory)"
        );
        for p in 16..20 {
            assert!(!log.dirty(page(p)), "write payload page {p} marked");
        }
        assert!(!log.dirty(page(40)), "an untouched page is marked");
    }
}

/// GET_VRING_BASE stops the queue only after every request taken from it has completed: right
/// after the reply, the used index equals the base it returns (QEMU then migrates the rings
/// and guest memory; a request completing later would be lost or land in the wrong VM).
#[test]
fn get_vring_base_answers_once_every_taken_request_completed() {
    let Some((_dir, _img, d)) = one_queue_daemon(Some(6)) else {
        return;
    };
    let mut taken = 0;
    for round in 0..10 {
        let mut c = RawClient::connect_with(
            &d.socket,
            RawOpts {
                queue_size: 64,
                ..RawOpts::default()
            },
        );
        let n = 20;
        for i in 0..n {
            let r = c.req(T_IN, (i * 64) as u64 % 1024, i * 64 * KIB, 64 * KIB);
            c.submit(&r);
        }
        c.kick();
        // Give the worker a moment to take some, not all, of them (varied per round).
        std::thread::sleep(Duration::from_micros(50 * round));
        let base = c.stop();
        let used = c.used_idx();
        assert_eq!(
            used, base,
            "round {round}: GET_VRING_BASE answered {base} with only {used} request(s) on the \
             used ring"
        );
        for u in c.completions(0, used) {
            assert_eq!(u.status, S_OK, "round {round}: request {u:?}");
        }
        taken += usize::from(base);
    }
    assert!(taken > 0, "no round had a request taken before the stop");
}

/// The same with reads that hold the queue's worker for 100 ms each (`--inject-faults
/// read:delay=100`): GET_VRING_BASE arrives while a request is surely taken and not yet
/// completed, so the answer must wait for it. Answering at once (no drain) fails here.
#[test]
fn get_vring_base_waits_for_a_slow_request_in_flight() {
    if skip_other_backend() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", MIB, Some(7));
    let d = Daemon::start(
        dir.path(),
        &img,
        &DaemonConfig::new()
            .num_queues(1)
            .arg("--inject-faults")
            .arg("read:delay=100"),
    );
    let mut c = RawClient::connect(&d.socket);
    for i in 0..3 {
        let r = c.req(T_IN, (i * 8) as u64, i * 4 * KIB, 4 * KIB);
        c.submit(&r);
    }
    c.kick();
    // The worker takes the first read and holds it for 100 ms.
    std::thread::sleep(Duration::from_millis(30));
    let base = c.stop();
    let used = c.used_idx();
    assert!(base >= 1, "no request was taken before the stop");
    assert_eq!(
        used, base,
        "GET_VRING_BASE answered {base} with only {used} request(s) on the used ring"
    );
    for u in c.completions(0, used) {
        assert_eq!(u.status, S_OK, "request {u:?}");
    }
    wait_for_log(&d, "request(s) in flight, drained in");
}

//! End-to-end tests driving the daemon through libblkio's `virtio-blk-vhost-user` driver.
//!
//! Each test makes its own temp dir, raw image and daemon process (see tests/common/daemon.rs).
//! Run against qemu-storage-daemon instead of our binary with `VUB_TEST_BACKEND=qsd`.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use blkio::{Errno, ReqFlags};
use common::*;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn eio() -> i32 {
    -libc::EIO
}

/// Assert that a request that reached the device failed with VIRTIO_BLK_S_IOERR.
#[track_caller]
fn assert_ioerr(d: &Done, what: &str) {
    assert_eq!(
        d.ret,
        eio(),
        "{what}: expected -EIO (VIRTIO_BLK_S_IOERR), got {}",
        d.errno_name()
    );
    assert!(
        d.msg.is_none(),
        "{what}: failed on the client side, not in the device: {:?}",
        d.msg
    );
}

#[track_caller]
fn assert_ok(d: &Done, what: &str) {
    assert_eq!(d.ret, 0, "{what} failed: {}", d.errno_name());
}

// ---------------------------------------------------------------------------------------------
// 1. multi-queue
// ---------------------------------------------------------------------------------------------

#[test]
fn multiqueue_concurrent_writes_and_cross_queue_reads() {
    const NQ: usize = 2;
    const REQS: usize = 8; // in flight per queue
    const REQ_LEN: usize = 64 * KIB as usize;
    const REGION: u64 = (REQS * REQ_LEN) as u64; // per queue
    let size = 4 * MIB;

    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(1));
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().num_queues(NQ as u32));
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: NQ as i32,
            ..Default::default()
        },
    );
    assert_eq!(c.queues.len(), NQ);
    assert_eq!(
        c.get_i32("max-queues"),
        NQ as i32,
        "max-queues should equal --num-queues"
    );

    // Queue i owns disk region [base(i), base(i) + REGION), interleaved with a gap so that
    // data written into the wrong place is caught. Request j of queue i uses seed 100*i + j.
    let base = |i: usize| MIB + i as u64 * 2 * REGION;
    let seed = |i: usize, j: usize| 100 * (i as u64 + 1) + j as u64;
    let expected = |i: usize, j: usize| {
        let off = base(i) + (j * REQ_LEN) as u64;
        (off, pattern(seed(i, j), off, REQ_LEN))
    };

    let barrier = std::sync::Barrier::new(NQ);
    std::thread::scope(|s| {
        for q in c.queues.iter_mut() {
            let barrier = &barrier;
            s.spawn(move || {
                let i = q.index;
                // All REQS writes in flight at once on this queue, concurrently with the other
                // queue's thread.
                let writes: Vec<Req> = (0..REQS)
                    .map(|j| {
                        let (offset, data) = expected(i, j);
                        Req::Write {
                            offset,
                            data,
                            flags: ReqFlags::empty(),
                        }
                    })
                    .collect();
                for (j, (d, _)) in q.batch(&writes).iter().enumerate() {
                    assert_ok(d, &format!("queue {i} write {j}"));
                }
                barrier.wait();
                // Read the *other* queue's region, again all in flight at once.
                let other = (i + 1) % NQ;
                let reads: Vec<Req> = (0..REQS)
                    .map(|j| Req::Read {
                        offset: expected(other, j).0,
                        len: REQ_LEN,
                    })
                    .collect();
                for (j, (d, data)) in q.batch(&reads).into_iter().enumerate() {
                    assert_ok(&d, &format!("queue {i} read {j} of queue {other}'s data"));
                    let (off, exp) = expected(other, j);
                    assert_bytes_eq(
                        &data.unwrap(),
                        &exp,
                        off,
                        &format!("queue {i} reading queue {other}'s write {j}"),
                    );
                }
            });
        }
    });

    // Mixed batch on one queue: reads of both regions + untouched area in flight together.
    let q0 = c.q(0);
    let res = q0.batch(&[
        Req::Read {
            offset: 0,
            len: REQ_LEN,
        },
        Req::Read {
            offset: base(1) + REQ_LEN as u64,
            len: REQ_LEN,
        },
        Req::Read {
            offset: base(0),
            len: REQ_LEN,
        },
    ]);
    assert_bytes_eq(
        res[0].1.as_ref().unwrap(),
        &pattern(1, 0, REQ_LEN),
        0,
        "untouched area",
    );
    assert_bytes_eq(
        res[1].1.as_ref().unwrap(),
        &expected(1, 1).1,
        expected(1, 1).0,
        "queue 1 write 1",
    );
    assert_bytes_eq(
        res[2].1.as_ref().unwrap(),
        &expected(0, 0).1,
        expected(0, 0).0,
        "queue 0 write 0",
    );

    drop(c);
    daemon.terminate_ok();

    let mut model = pattern(1, 0, size as usize);
    for i in 0..NQ {
        for j in 0..REQS {
            let (off, data) = expected(i, j);
            model[off as usize..off as usize + REQ_LEN].copy_from_slice(&data);
        }
    }
    assert_bytes_eq(&read_file(&img), &model, 0, "image file after SIGTERM");
}

/// Large reads are split across the queue worker and its helper thread (virtio_blk::split):
/// every byte must still land in the right place, including odd sizes and cuts inside a
/// request.
#[test]
fn large_read_batches_return_exact_bytes() {
    let size = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(7));
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::new(&daemon.socket, &ClientOpts::default());
    let model = pattern(7, 0, size as usize);
    // The client's buffer holds 1 MiB per batch.
    let reads = [
        (0u64, 512 * KIB as usize),
        (3 * MIB + 512, 256 * KIB as usize + 512),
        (5 * MIB, 200 * KIB as usize),
        (15 * MIB - 24 * KIB, 24 * KIB as usize),
    ];
    for single in [true, false] {
        let batches: Vec<Vec<Req>> = if single {
            reads
                .iter()
                .map(|&(offset, len)| vec![Req::Read { offset, len }])
                .collect()
        } else {
            vec![reads
                .iter()
                .map(|&(offset, len)| Req::Read { offset, len })
                .collect()]
        };
        for batch in batches {
            for (req, (d, data)) in batch.iter().zip(c.q(0).batch(&batch)) {
                let Req::Read { offset, len } = *req else {
                    unreachable!()
                };
                assert_ok(&d, &format!("read of {len} bytes at {offset}"));
                let o = offset as usize;
                assert_bytes_eq(&data.unwrap(), &model[o..o + len], offset, "large read");
            }
        }
    }
    drop(c);
    daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// 2. flush
// ---------------------------------------------------------------------------------------------

#[test]
fn flush_succeeds_and_data_survives_sigkill() {
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, None);
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    // blkio completes flushes locally (without sending them) when the device does not offer
    // VIRTIO_BLK_F_FLUSH. The only feature-dependent thing blkio exposes is "flush-needed"
    // (config.writeback if VIRTIO_BLK_F_CONFIG_WCE was negotiated, else the FLUSH bit), so for
    // our daemon (writeback cache by default) require it. qemu-storage-daemon offers CONFIG_WCE
    // but reports writeback=0, so it is not checked there.
    if daemon.backend == Backend::Ours {
        assert!(
            c.get_bool("flush-needed"),
            "device advertises no volatile write cache (no VIRTIO_BLK_F_FLUSH, or CONFIG_WCE with writeback=0)"
        );
    }

    let a = pattern(7, 0, 128 * KIB as usize);
    let b_off = MIB + 3 * SECTOR;
    let b = pattern(8, b_off, 5 * SECTOR as usize);
    let q = c.q(0);
    q.write_ok(0, &a);
    q.write_ok(b_off, &b);
    assert_ok(&q.flush(), "flush");
    // FUA write: blkio emulates it with write + flush on virtio-blk.
    let fua_off = MIB + 64 * KIB;
    let fua = pattern(9, fua_off, 4 * KIB as usize);
    assert_ok(&q.write_flags(fua_off, &fua, ReqFlags::FUA), "FUA write");
    // A flush with nothing dirty is fine too.
    assert_ok(&q.flush(), "second flush");

    // Kill hard while the client is still connected: nothing may be held back in the daemon.
    daemon.kill();
    drop(c);

    let file = read_file(&img);
    assert_eq!(file.len() as u64, size, "image size changed");
    assert_bytes_eq(&file[..a.len()], &a, 0, "flushed write A");
    assert_bytes_eq(
        &file[b_off as usize..b_off as usize + b.len()],
        &b,
        b_off,
        "flushed write B",
    );
    assert_bytes_eq(
        &file[fua_off as usize..fua_off as usize + fua.len()],
        &fua,
        fua_off,
        "FUA write",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. discard
// ---------------------------------------------------------------------------------------------

#[test]
fn discard_reads_back_zeros_and_punches_hole() {
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(3));
    let punch_supported = fs_supports_punch_hole(dir.path());
    let blocks_before = allocated_blocks(&img);
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);

    let align = c.get_i32("discard-alignment") as u64;
    assert!(
        align > 0 && MIB.is_multiple_of(align),
        "unexpected discard-alignment {align}"
    );

    let (d_off, d_len) = (MIB, MIB);
    discard_range(&mut c, d_off, d_len);
    let q = c.q(0);

    let mut model = pattern(3, 0, size as usize);
    model[d_off as usize..(d_off + d_len) as usize].fill(0);
    assert_bytes_eq(
        &q.read_all(0, size),
        &model,
        0,
        "device contents after discard",
    );

    drop(c);
    daemon.terminate_ok();

    let file = read_file(&img);
    assert_eq!(
        file.len() as u64,
        size,
        "discard changed the image file size"
    );
    assert_bytes_eq(&file, &model, 0, "image file after discard");
    let blocks_after = allocated_blocks(&img);
    if punch_supported {
        assert!(
            blocks_after + d_len / 512 <= blocks_before,
            "discard did not deallocate space: st_blocks {blocks_before} -> {blocks_after} \
             (expected a drop of at least {})",
            d_len / 512
        );
    } else {
        eprintln!("filesystem cannot punch holes; skipping the st_blocks check");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. write-zeroes
// ---------------------------------------------------------------------------------------------

#[test]
fn write_zeroes_with_and_without_unmap() {
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(4));
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    let max_wz = c.get_u64("max-write-zeroes-len");
    assert!(
        max_wz == 0 || max_wz >= 256 * KIB,
        "max-write-zeroes-len {max_wz} too small for this test"
    );

    // (offset, len, flags): sub-4K-block ranges and a large aligned one, with and without the
    // unmap flag (blkio sets VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP unless NO_UNMAP is given).
    let cases = [
        (3 * SECTOR, 5 * SECTOR, ReqFlags::empty()),
        (64 * KIB + SECTOR, 70 * SECTOR, ReqFlags::NO_UNMAP),
        (512 * KIB, 256 * KIB, ReqFlags::empty()),
        (MIB, 256 * KIB, ReqFlags::NO_UNMAP),
        (MIB + 300 * KIB + 7 * SECTOR, SECTOR, ReqFlags::empty()),
        (size - SECTOR, SECTOR, ReqFlags::NO_UNMAP),
    ];
    let mut model = pattern(4, 0, size as usize);
    let q = c.q(0);
    for (off, len, flags) in cases {
        assert_ok(
            &q.write_zeroes(off, len, flags),
            &format!("write-zeroes [{off}, +{len}) flags {flags:?}"),
        );
        model[off as usize..(off + len) as usize].fill(0);
    }
    assert_bytes_eq(
        &q.read_all(0, size),
        &model,
        0,
        "device contents after write-zeroes",
    );

    // Data can be written again over zeroed (possibly unmapped) ranges.
    let re = pattern(44, 512 * KIB, 8 * KIB as usize);
    q.write_ok(512 * KIB, &re);
    model[512 * KIB as usize..(512 * KIB) as usize + re.len()].copy_from_slice(&re);
    assert_bytes_eq(
        &q.read_ok(512 * KIB, 256 * KIB as usize),
        &model[512 * KIB as usize..768 * KIB as usize],
        512 * KIB,
        "rewrite after write-zeroes",
    );

    drop(c);
    daemon.terminate_ok();
    let file = read_file(&img);
    assert_eq!(
        file.len() as u64,
        size,
        "write-zeroes changed the image file size"
    );
    assert_bytes_eq(&file, &model, 0, "image file after write-zeroes");
}

// ---------------------------------------------------------------------------------------------
// 5. read-only
// ---------------------------------------------------------------------------------------------

#[test]
fn read_only_rejects_modifications() {
    let size = MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(5));
    let before = read_file(&img);
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().read_only());

    // A client that does not declare itself read-only must be refused by blkio at start() —
    // which only happens if the device advertises VIRTIO_BLK_F_RO.
    let b = connect(&daemon.socket, false).expect("connect to read-only daemon");
    match start(b, 1, CLIENT_QUEUE_SIZE) {
        Ok(_) => panic!(
            "start() as a writable client succeeded: device does not advertise VIRTIO_BLK_F_RO"
        ),
        Err(e) => assert_eq!(e.errno(), Errno::ROFS, "unexpected start() error: {e}"),
    }
    daemon.assert_running();

    // The next (read-only) client is served normally.
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(c.get_u64("capacity"), size);
    let q = c.q(0);
    assert_bytes_eq(
        &q.read_all(0, size),
        &before,
        0,
        "read from read-only device",
    );
    assert_ok(&q.flush(), "flush on read-only device");

    // NOTE: with `read-only` set, blkio fails these in the client (EBADF) without sending them to
    // the device, and a non-read-only blkio client cannot start at all (checked above), so the
    // daemon's own IOERR for writes on a RO disk is not observable through blkio.
    let w = q.write(0, &pattern(55, 0, 4096));
    assert_ne!(w.ret, 0, "write on read-only device succeeded");
    let wz = q.write_zeroes(4096, 4096, ReqFlags::empty());
    assert_ne!(wz.ret, 0, "write-zeroes on read-only device succeeded");
    let dc = q.discard(8192, 4096);
    assert_ne!(dc.ret, 0, "discard on read-only device succeeded");
    // Still serving after the rejected requests.
    assert_bytes_eq(
        &q.read_ok(0, 16 * KIB as usize),
        &before[..16 * KIB as usize],
        0,
        "read after rejected writes",
    );

    drop(c);
    daemon.terminate_ok();
    assert_bytes_eq(
        &read_file(&img),
        &before,
        0,
        "read-only image file modified",
    );
}

// ---------------------------------------------------------------------------------------------
// 6. out-of-range requests
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_range_requests_fail_and_daemon_keeps_serving() {
    let size = MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(6));
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    assert_eq!(c.get_u64("capacity"), size);
    let q = c.q(0);
    let cap = size;
    let sec = SECTOR as usize;

    // Entirely past the end.
    assert_ioerr(&q.read(cap, sec).unwrap_err(), "read at capacity");
    assert_ioerr(&q.write(cap, &[0x11; 512]), "write at capacity");
    assert_ioerr(
        &q.read(cap + 100 * MIB, 4096).unwrap_err(),
        "read far past capacity",
    );
    // Straddling the end.
    assert_ioerr(
        &q.read(cap - SECTOR, 2 * sec).unwrap_err(),
        "read straddling the end",
    );
    assert_ioerr(
        &q.write(cap - SECTOR, &[0x22; 1024]),
        "write straddling the end",
    );
    assert_ioerr(
        &q.write_zeroes(cap - SECTOR, 2 * SECTOR, ReqFlags::empty()),
        "write-zeroes straddling the end",
    );
    assert_ioerr(
        &q.discard(cap - SECTOR, 2 * SECTOR),
        "discard straddling the end",
    );
    assert_ioerr(
        &q.write_zeroes(cap, SECTOR, ReqFlags::NO_UNMAP),
        "write-zeroes at capacity",
    );
    assert_ioerr(&q.discard(cap, SECTOR), "discard at capacity");
    // Largest representable sector (2^55 - 1): its *end* offset, (sector + 1) * 512, is 2^64
    // and wraps to 0 in naive u64 arithmetic.
    let huge = (u64::MAX / SECTOR) * SECTOR;
    assert_ioerr(&q.read(huge, sec).unwrap_err(), "read at sector 2^55-1");
    assert_ioerr(&q.write(huge, &[0x33; 512]), "write at sector 2^55-1");
    // Sector 2^54 (byte offset 2^63, negative as an i64/off_t).
    assert_ioerr(
        &q.write((1u64 << 54) * SECTOR, &[0x44; 512]),
        "write at sector 2^54",
    );
    // (Not write-zeroes/discard at sector 2^55-1: blkio computes start + len unchecked and
    // panics with "attempt to add with overflow" in debug builds.)
    assert_ioerr(
        &q.write_zeroes((1u64 << 54) * SECTOR, SECTOR, ReqFlags::empty()),
        "write-zeroes at sector 2^54",
    );
    assert_ioerr(
        &q.discard((1u64 << 54) * SECTOR, SECTOR),
        "discard at sector 2^54",
    );

    daemon.assert_running();

    // Valid requests still work afterwards, including the last sector.
    let last = pattern(66, cap - SECTOR, sec);
    q.write_ok(cap - SECTOR, &last);
    assert_bytes_eq(
        &q.read_ok(cap - SECTOR, sec),
        &last,
        cap - SECTOR,
        "last sector",
    );
    let first = q.read_ok(0, 4096);
    assert_bytes_eq(
        &first,
        &pattern(6, 0, 4096),
        0,
        "first sectors unchanged by failed requests",
    );

    drop(c);
    daemon.terminate_ok();
    let file = read_file(&img);
    assert_eq!(
        file.len() as u64,
        size,
        "out-of-range requests changed the image file size"
    );
    let mut model = pattern(6, 0, size as usize);
    model[(cap - SECTOR) as usize..].copy_from_slice(&last);
    assert_bytes_eq(&file, &model, 0, "image file after out-of-range requests");
}

// ---------------------------------------------------------------------------------------------
// 7. sequential clients on one daemon
// ---------------------------------------------------------------------------------------------

#[test]
fn sequential_clients_see_previous_data() {
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, None);
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().num_queues(2));
    let chunk = 96 * KIB;
    let region = |i: u64| {
        (
            i * 256 * KIB + 3 * SECTOR,
            pattern(70 + i, i * 256 * KIB + 3 * SECTOR, chunk as usize),
        )
    };

    for i in 0..3u64 {
        // Alternate the number of queues used, to check the backend resets per-connection state.
        let nq = if i == 1 { 2 } else { 1 };
        let mut c = Client::new(
            &daemon.socket,
            &ClientOpts {
                num_queues: nq,
                ..Default::default()
            },
        );
        assert_eq!(c.get_u64("capacity"), size, "client {i}: capacity");
        let qi = (nq - 1) as usize;
        let q = c.q(qi);
        for prev in 0..i {
            let (off, data) = region(prev);
            assert_bytes_eq(
                &q.read_ok(off, chunk as usize),
                &data,
                off,
                &format!("client {i} reading client {prev}'s data"),
            );
        }
        let (off, data) = region(i);
        q.write_ok(off, &data);
        assert_bytes_eq(
            &q.read_ok(off, chunk as usize),
            &data,
            off,
            &format!("client {i} read-back"),
        );
        drop(c);
        daemon.assert_running();
    }

    // A fourth client that connects and goes away without ever starting its queues.
    let b = connect(&daemon.socket, false).expect("connect-only client");
    drop(b);
    daemon.assert_running();
    // ...and one more that verifies everything.
    let mut c = Client::simple(&daemon.socket);
    for i in 0..3 {
        let (off, data) = region(i);
        assert_bytes_eq(
            &c.q(0).read_ok(off, chunk as usize),
            &data,
            off,
            &format!("final client reading client {i}'s data"),
        );
    }
    drop(c);

    daemon.terminate_ok();
    let file = read_file(&img);
    for i in 0..3 {
        let (off, data) = region(i);
        assert_bytes_eq(
            &file[off as usize..(off + chunk) as usize],
            &data,
            off,
            &format!("image file, client {i}'s data"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. capacity / geometry
// ---------------------------------------------------------------------------------------------

#[test]
fn capacity_matches_image_size() {
    let size = 3 * MIB + 7 * SECTOR; // odd number of sectors
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(8));
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    assert_eq!(c.get_u64("capacity"), size, "capacity property (bytes)");
    assert_eq!(
        c.get_i32("request-alignment"),
        512,
        "default logical block size"
    );
    // Last sector is readable and holds the file's data.
    let last = c.q(0).read_ok(size - SECTOR, SECTOR as usize);
    assert_bytes_eq(
        &last,
        &pattern(8, size - SECTOR, SECTOR as usize),
        size - SECTOR,
        "last sector",
    );
    drop(c);
    daemon.terminate_ok();
}

#[test]
fn capacity_with_4k_logical_block_size() {
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(9));
    let daemon = Daemon::start(
        dir.path(),
        &img,
        &DaemonConfig::new().logical_block_size(4096),
    );
    let mut c = Client::simple(&daemon.socket);
    // virtio-blk capacity is always in 512-byte units, independent of blk_size.
    assert_eq!(c.get_u64("capacity"), size, "capacity property (bytes)");
    assert_eq!(
        c.get_i32("request-alignment"),
        4096,
        "blk_size from --logical-block-size"
    );
    let q = c.q(0);
    let data = pattern(90, 8192, 8192);
    q.write_ok(8192, &data);
    assert_bytes_eq(
        &q.read_ok(4096, 16384),
        &[
            pattern(9, 4096, 4096),
            data.clone(),
            pattern(9, 16384, 4096),
        ]
        .concat(),
        4096,
        "4K-aligned I/O",
    );
    drop(c);
    daemon.terminate_ok();
    assert_bytes_eq(&read_file(&img)[8192..16384], &data, 8192, "image file");
}

#[test]
fn capacity_rounds_down_partial_sector() {
    if backend() == Backend::Qsd {
        // QEMU rounds the size *up* to whole sectors; our contract is file size / 512.
        eprintln!("skipped for qemu-storage-daemon (rounds capacity up)");
        return;
    }
    let size = MIB + 100;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(10));
    let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    assert_eq!(
        c.get_u64("capacity"),
        MIB,
        "capacity must be floor(file size / 512) sectors"
    );
    assert_ioerr(
        &c.q(0).read(MIB, SECTOR as usize).unwrap_err(),
        "read of the partial tail sector",
    );
    drop(c);
    daemon.terminate_ok();
    assert_eq!(read_file(&img).len() as u64, size, "file size changed");
}

// GET_ID (--serial): blkio 0.5 has no API to issue VIRTIO_BLK_T_GET_ID, so it is not tested here.

// ---------------------------------------------------------------------------------------------
// 9. queue-count negotiation
// ---------------------------------------------------------------------------------------------

#[test]
fn too_many_queues_is_refused_cleanly() {
    let size = MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(11));
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().num_queues(2));

    let b = connect(&daemon.socket, false).expect("connect");
    assert_eq!(
        b.get_i32("max-queues").unwrap(),
        2,
        "max-queues should equal --num-queues"
    );
    match start(b, 3, CLIENT_QUEUE_SIZE) {
        Ok(_) => panic!("starting 3 queues on a 2-queue device succeeded"),
        Err(e) => assert_eq!(e.errno(), Errno::INVAL, "unexpected error: {e}"),
    }
    daemon.assert_running();

    // The daemon then serves a well-behaved client using all of its queues.
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    let data = pattern(12, 4096, 8192);
    c.q(1).write_ok(4096, &data);
    assert_bytes_eq(
        &c.q(0).read_ok(4096, 8192),
        &data,
        4096,
        "write on queue 1, read on queue 0",
    );
    drop(c);
    daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// Requests blkio will not send: use the minimal raw vhost-user frontend (common::raw)
// ---------------------------------------------------------------------------------------------

#[test]
fn read_only_device_rejects_writes_itself() {
    use common::raw::*;
    let size = MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(13));
    let before = read_file(&img);
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().read_only());

    let mut c = RawClient::connect(&daemon.socket);
    assert!(
        c.device_features & F_RO != 0,
        "device does not offer VIRTIO_BLK_F_RO"
    );
    // Reads work.
    assert_eq!(
        c.request(T_IN, 8, 4096, None),
        S_OK,
        "read on read-only device"
    );
    assert_bytes_eq(&c.data()[..4096], &before[4096..8192], 4096, "raw read");
    // Writes, write-zeroes (with and without unmap) and discards fail in the device.
    c.data()[..4096].fill(0x5A);
    assert_eq!(
        c.request(T_OUT, 8, 4096, None),
        S_IOERR,
        "write on read-only device"
    );
    assert_eq!(
        c.request(T_WRITE_ZEROES, 0, 0, Some((16, 8, 1))),
        S_IOERR,
        "write-zeroes(unmap) on read-only device"
    );
    assert_eq!(
        c.request(T_WRITE_ZEROES, 0, 0, Some((32, 8, 0))),
        S_IOERR,
        "write-zeroes on read-only device"
    );
    assert_eq!(
        c.request(T_DISCARD, 0, 0, Some((48, 8, 0))),
        S_IOERR,
        "discard on read-only device"
    );
    // Flush is harmless and succeeds.
    assert_eq!(
        c.request(T_FLUSH, 0, 0, None),
        S_OK,
        "flush on read-only device"
    );
    // Data unchanged as seen by the device.
    assert_eq!(
        c.request(T_IN, 0, 64 * 1024, None),
        S_OK,
        "read after rejected writes"
    );
    assert_bytes_eq(
        &c.data()[..64 * 1024],
        &before[..64 * 1024],
        0,
        "device contents after rejected writes",
    );
    drop(c);
    daemon.assert_running();
    daemon.terminate_ok();
    assert_bytes_eq(
        &read_file(&img),
        &before,
        0,
        "read-only image file modified",
    );
}

#[test]
fn get_id_returns_serial() {
    use common::raw::*;
    if backend() == Backend::Qsd {
        eprintln!(
            "skipped for qemu-storage-daemon (no serial option on the vhost-user-blk export)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", MIB, None);
    for (serial, expected) in [
        ("vub-serial-42", b"vub-serial-42\0\0\0\0\0\0\0".to_vec()),
        // Exactly 20 bytes: no NUL terminator (virtio spec).
        ("ABCDEFGHIJ0123456789", b"ABCDEFGHIJ0123456789".to_vec()),
    ] {
        let daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new().serial(serial));
        let mut c = RawClient::connect(&daemon.socket);
        c.data()[..20].fill(0xEE);
        assert_eq!(c.request(T_GET_ID, 0, 20, None), S_OK, "GET_ID");
        assert_eq!(
            &c.data()[..20],
            &expected[..],
            "GET_ID payload for serial {serial:?}"
        );
        drop(c);
        daemon.terminate_ok();
    }
}

#[test]
fn unknown_request_type_is_unsupported() {
    use common::raw::*;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", MIB, Some(14));
    let mut daemon = Daemon::start(dir.path(), &img, &DaemonConfig::new());
    let mut c = RawClient::connect(&daemon.socket);
    // 0x4242 is not a virtio-blk request type.
    assert_eq!(
        c.request(0x4242, 0, 512, None),
        S_UNSUPP,
        "unknown request type"
    );
    // The queue keeps working afterwards: read, and a write (this also proves the raw client's
    // OUT path works, so the S_IOERR in read_only_device_rejects_writes_itself is meaningful).
    assert_eq!(
        c.request(T_IN, 0, 512, None),
        S_OK,
        "read after unsupported request"
    );
    assert_bytes_eq(&c.data()[..512], &pattern(14, 0, 512), 0, "raw read");
    let w = pattern(15, 8 * SECTOR, 4096);
    c.data()[..4096].copy_from_slice(&w);
    assert_eq!(c.request(T_OUT, 8, 4096, None), S_OK, "raw write");
    assert_eq!(c.request(T_FLUSH, 0, 0, None), S_OK, "raw flush");
    drop(c);
    daemon.assert_running();
    daemon.terminate_ok();
    assert_bytes_eq(
        &read_file(&img)[4096..8192],
        &w,
        4096,
        "image file after raw write",
    );
}

/// Keeps `depth` requests in flight on every queue, refilling each slot as soon as its request
/// completes (the way fio and the benchmark client drive a queue), for `rounds` write+read
/// pairs per slot, and checks every read. Each slot owns its own blocks, so every read has
/// exactly one expected content. A lost notification in either direction stalls a queue and
/// fails the 10 s completion wait.
fn stream_and_verify(format: &str, num_queues: usize, depth: usize, rounds: u64) {
    const BLOCK: usize = 4096;
    const BLOCKS_PER_SLOT: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let size = (num_queues * depth) as u64 * BLOCKS_PER_SLOT * BLOCK as u64;
    let img = if format == "qcow2" {
        let p = dir.path().join("disk.qcow2");
        create_qcow2(&p, "", &size.to_string());
        p
    } else {
        create_image(dir.path(), "disk.img", size, Some(7))
    };
    let cfg = DaemonConfig::new().num_queues(num_queues as u32);
    let daemon = Daemon::start_format(dir.path(), &img, format, &cfg);
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: num_queues as i32,
            ..Default::default()
        },
    );
    std::thread::scope(|s| {
        for q in c.queues.iter_mut() {
            s.spawn(move || {
                let qi = q.index;
                let buf = q.buf().as_mut_ptr();
                // Slot j's disk block for round r, and the bytes written there.
                let slot_base = |j: usize| (qi * depth + j) as u64 * BLOCKS_PER_SLOT;
                let offset = |j: usize, r: u64| (slot_base(j) + r % BLOCKS_PER_SLOT) * BLOCK as u64;
                let data = |j: usize, r: u64| {
                    pattern(((qi * depth + j) as u64) << 32 | r, offset(j, r), BLOCK)
                };
                // user_data = slot; per slot: round and whether the write is done.
                let mut state = vec![(0u64, false); depth];
                let submit = |q: &mut Queue, j: usize, r: u64, read: bool| {
                    // SAFETY: slot j's BLOCK bytes lie inside this queue's buffer (depth *
                    // BLOCK <= QUEUE_BUF_SIZE), and no other request uses them meanwhile.
                    let p = unsafe { buf.add(j * BLOCK) };
                    if read {
                        // SAFETY: see `p`.
                        unsafe { std::ptr::write_bytes(p, 0xEE, BLOCK) };
                        q.q.read(offset(j, r), p, BLOCK, j, ReqFlags::empty());
                    } else {
                        let d = data(j, r);
                        // SAFETY: see `p`; `d` is a separate Vec of BLOCK bytes.
                        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), p, BLOCK) };
                        q.q.write(offset(j, r), p, BLOCK, j, ReqFlags::empty());
                    }
                };
                for j in 0..depth {
                    submit(q, j, 0, false);
                }
                let mut open = depth;
                while open > 0 {
                    for d in q.wait(1) {
                        assert_ok(&d, &format!("queue {qi} slot {}", d.user_data));
                        let j = d.user_data;
                        let (r, written) = state[j];
                        if written {
                            // SAFETY: as in `submit`; the read has completed.
                            let got =
                                unsafe { std::slice::from_raw_parts(buf.add(j * BLOCK), BLOCK) };
                            assert_bytes_eq(
                                got,
                                &data(j, r),
                                offset(j, r),
                                &format!("queue {qi} slot {j} round {r}"),
                            );
                            if r + 1 == rounds {
                                open -= 1;
                                continue;
                            }
                            state[j] = (r + 1, false);
                            submit(q, j, r + 1, false);
                        } else {
                            state[j] = (r, true);
                            submit(q, j, r, true);
                        }
                    }
                }
            });
        }
    });
    drop(c);
    daemon.terminate_ok();
}

/// The worker hands completions back every few requests of a batch (`NOTIFY_EVERY` in
/// backend.rs) while the client refills the queue: nothing may stall or be lost.
#[test]
fn streaming_at_depth_raw_one_queue() {
    stream_and_verify("raw", 1, 32, 600);
}

#[test]
fn streaming_at_depth_qcow2_one_queue() {
    stream_and_verify("qcow2", 1, 32, 600);
}

#[test]
fn streaming_at_depth_qcow2_two_queues() {
    stream_and_verify("qcow2", 2, 16, 600);
}

// ---------------------------------------------------------------------------------------------
// Thin provisioning: discard policy, freed qcow2 clusters, detect-zeroes
// ---------------------------------------------------------------------------------------------

const CHUNK: u64 = 512 * KIB;

/// Writes `pattern(seed)` (or zeros) over `[off, off + len)` in chunks the queue buffer holds.
fn fill(q: &mut Queue, off: u64, len: u64, seed: Option<u64>) {
    let mut o = off;
    while o < off + len {
        let n = CHUNK.min(off + len - o);
        let data = match seed {
            Some(s) => pattern(s, o, n as usize),
            None => vec![0; n as usize],
        };
        q.write_ok(o, &data);
        o += n;
    }
}

/// Discards `[off, off + len)` in pieces no longer than the device's max-discard-len.
fn discard_range(c: &mut Client, off: u64, len: u64) {
    let max = c.get_u64("max-discard-len");
    let step = if max == 0 {
        len
    } else {
        max.min(len) / SECTOR * SECTOR
    };
    let q = c.q(0);
    let mut o = off;
    while o < off + len {
        let n = step.min(off + len - o);
        assert_ok(&q.discard(o, n), &format!("discard [{o:#x}, +{n:#x})"));
        o += n;
    }
}

/// Two flushes: the first makes the unmapping durable, the second returns the freed clusters
/// once no request that started before the first one is still running.
fn flush_twice(q: &mut Queue) {
    assert_ok(&q.flush(), "flush");
    assert_ok(&q.flush(), "second flush");
}

#[track_caller]
fn assert_zeros(data: &[u8], base: u64, what: &str) {
    if let Some(i) = data.iter().position(|&b| b != 0) {
        panic!("{what}: nonzero byte at {:#x}", base + i as u64);
    }
}

/// A temp dir for the thin-provisioning tests (our options, st_blocks): None, after saying
/// why, against qemu-storage-daemon or where holes cannot be punched (outside CI).
fn thin_provisioning_dir() -> Option<tempfile::TempDir> {
    if backend() == Backend::Qsd {
        eprintln!("skipped for qemu-storage-daemon (our options)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    if !fs_supports_punch_hole(dir.path()) {
        skip_unless_ci("the temp dir's file system cannot punch holes");
        return None;
    }
    Some(dir)
}

/// A new qcow2 image `disk.qcow2` of `size` in `dir`, served with the defaults, and a client.
fn serve_new_qcow2(dir: &std::path::Path, size: &str) -> (std::path::PathBuf, Daemon, Client) {
    let img = dir.join("disk.qcow2");
    create_qcow2(&img, "", size);
    let daemon = Daemon::start_format(dir, &img, "qcow2", &DaemonConfig::new());
    let c = Client::simple(&daemon.socket);
    (img, daemon, c)
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// A qcow2 discard gives the space back to the host file system (clusters freed by the
/// flush are punched), reads back zeros, and the freed clusters are reused before the file
/// grows; the image stays clean for qemu-img.
#[test]
fn qcow2_discard_gives_space_back_and_reuses_it() {
    let Some(dir) = thin_provisioning_dir() else {
        return;
    };
    let (img, daemon, mut c) = serve_new_qcow2(dir.path(), "128M");
    fill(c.q(0), 0, 64 * MIB, Some(61));
    flush_twice(c.q(0));
    let full = allocated_blocks(&img);

    let (d_off, d_len) = (8 * MIB, 48 * MIB);
    discard_range(&mut c, d_off, d_len);
    flush_twice(c.q(0));
    let after = allocated_blocks(&img);
    let want = d_len / 512 * 9 / 10;
    assert!(
        after + want <= full,
        "discarding {d_len:#x} bytes freed too little: st_blocks {full} -> {after} (want a \
         drop of at least {want})"
    );

    let q = c.q(0);
    assert_bytes_eq(
        &q.read_all(0, d_off),
        &pattern(61, 0, d_off as usize),
        0,
        "before",
    );
    assert_zeros(&q.read_all(d_off, d_len), d_off, "discarded range");
    let tail = 64 * MIB - (d_off + d_len);
    assert_bytes_eq(
        &q.read_all(d_off + d_len, tail),
        &pattern(61, d_off + d_len, tail as usize),
        d_off + d_len,
        "after",
    );

    // New data goes into the freed clusters, not past the end of the file.
    let len = file_len(&img);
    fill(q, 64 * MIB, d_len, Some(62));
    flush_twice(q);
    let grown = file_len(&img).saturating_sub(len);
    assert!(
        grown <= MIB,
        "writing {d_len:#x} bytes after freeing as many grew the file by {grown:#x}"
    );
    assert_bytes_eq(
        &q.read_all(64 * MIB, d_len),
        &pattern(62, 64 * MIB, d_len as usize),
        64 * MIB,
        "rewritten",
    );
    drop(c);
    daemon.terminate_ok();
    let check = qemu_img_check(&img);
    assert!(check.clean(), "qemu-img check:\n{}", check.output);
}

/// `--discard ignore` (QEMU's discard=ignore): a discard completes and changes nothing.
#[test]
fn discard_ignore_keeps_data_and_space() {
    if backend() == Backend::Qsd {
        eprintln!("skipped for qemu-storage-daemon (our option)");
        return;
    }
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "disk.img", size, Some(63));
    let before = allocated_blocks(&img);
    let cfg = DaemonConfig::new().arg("--discard").arg("ignore");
    let daemon = Daemon::start(dir.path(), &img, &cfg);
    let mut c = Client::simple(&daemon.socket);
    discard_range(&mut c, MIB, 2 * MIB);
    assert_ok(&c.q(0).flush(), "flush");
    assert_bytes_eq(
        &c.q(0).read_all(0, size),
        &pattern(63, 0, size as usize),
        0,
        "after an ignored discard",
    );
    drop(c);
    daemon.terminate_ok();
    assert_eq!(
        allocated_blocks(&img),
        before,
        "an ignored discard changed the allocation"
    );
}

/// `--detect-zeroes`: an all-zero write becomes a write-zeroes. `on` keeps zeros from
/// allocating qcow2 clusters (the default `off` allocates them: the control); `unmap` also
/// frees the clusters an all-zero write covers. A write that is not all zeros is data.
#[test]
fn detect_zeroes_on_and_unmap() {
    let Some(dir) = thin_provisioning_dir() else {
        return;
    };
    let growth_of_zero_writes = |mode: &str| {
        let img = dir.path().join(format!("zeros-{mode}.qcow2"));
        create_qcow2(&img, "", "64M");
        let cfg = DaemonConfig::new().arg("--detect-zeroes").arg(mode);
        let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &cfg);
        let mut c = Client::simple(&daemon.socket);
        let len = file_len(&img);
        fill(c.q(0), 0, 16 * MIB, None);
        flush_twice(c.q(0));
        let grown = file_len(&img) - len;
        assert_zeros(&c.q(0).read_all(0, 16 * MIB), 0, "zero writes");
        drop(c);
        daemon.terminate_ok();
        let check = qemu_img_check(&img);
        assert!(check.clean(), "{mode}: qemu-img check:\n{}", check.output);
        grown
    };
    let off = growth_of_zero_writes("off");
    assert!(
        off >= 16 * MIB,
        "control: zero writes without detection grew the file by {off:#x}"
    );
    let on = growth_of_zero_writes("on");
    assert!(
        on <= MIB,
        "--detect-zeroes on: zero writes grew the file by {on:#x}"
    );

    // unmap: zeros over written data free its clusters; a mostly-zero write stays data.
    let img = dir.path().join("unmap.qcow2");
    create_qcow2(&img, "", "64M");
    let cfg = DaemonConfig::new().arg("--detect-zeroes").arg("unmap");
    let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &cfg);
    let mut c = Client::simple(&daemon.socket);
    let q = c.q(0);
    fill(q, 0, 16 * MIB, Some(64));
    flush_twice(q);
    let full = allocated_blocks(&img);
    fill(q, 0, 12 * MIB, None);
    let mut almost = vec![0u8; 64 * KIB as usize];
    almost[64 * KIB as usize - 1] = 0xa5;
    q.write_ok(12 * MIB, &almost);
    flush_twice(q);
    let after = allocated_blocks(&img);
    let want = 12 * MIB / 512 * 9 / 10;
    assert!(
        after + want <= full,
        "--detect-zeroes unmap freed too little: st_blocks {full} -> {after} (want {want})"
    );
    assert_zeros(&q.read_all(0, 12 * MIB), 0, "zeroed range");
    assert_bytes_eq(
        &q.read_ok(12 * MIB, almost.len()),
        &almost,
        12 * MIB,
        "mostly zero",
    );
    let rest = 16 * MIB - 12 * MIB - 64 * KIB;
    assert_bytes_eq(
        &q.read_all(12 * MIB + 64 * KIB, rest),
        &pattern(64, 12 * MIB + 64 * KIB, rest as usize),
        12 * MIB + 64 * KIB,
        "untouched",
    );
    drop(c);
    daemon.terminate_ok();
    let check = qemu_img_check(&img);
    assert!(check.clean(), "unmap: qemu-img check:\n{}", check.output);
}

/// Clusters freed at the end of a qcow2 image are cut off the file: discarding the last
/// data written shrinks the file, the image stays clean, and new data grows it again and
/// survives a restart.
#[test]
fn qcow2_discard_at_the_end_shrinks_the_file() {
    let Some(dir) = thin_provisioning_dir() else {
        return;
    };
    let (img, daemon, mut c) = serve_new_qcow2(dir.path(), "128M");
    // One queue writing in order: host clusters follow guest offsets. The L2 table is
    // allocated at the first flush, so after the first 8 MiB.
    fill(c.q(0), 0, 8 * MIB, Some(71));
    flush_twice(c.q(0));
    fill(c.q(0), 8 * MIB, 56 * MIB, Some(71));
    flush_twice(c.q(0));
    let full = file_len(&img);
    discard_range(&mut c, 32 * MIB, 32 * MIB);
    flush_twice(c.q(0));
    // Freed clusters are reused from the bottom: this one does not stop the cut.
    let late = pattern(74, 100 * MIB, 4096);
    c.q(0).write_ok(100 * MIB, &late);
    flush_twice(c.q(0));
    let cut = file_len(&img);
    assert!(
        cut + 31 * MIB <= full,
        "discarding the last 32 MiB written left the file at {cut:#x} bytes (was {full:#x}); \
         daemon log:\n{}",
        daemon.log()
    );
    let q = c.q(0);
    assert_bytes_eq(
        &q.read_all(0, 32 * MIB),
        &pattern(71, 0, 32 * MIB as usize),
        0,
        "kept",
    );
    assert_zeros(&q.read_all(32 * MIB, 32 * MIB), 32 * MIB, "discarded tail");
    assert_bytes_eq(&q.read_ok(100 * MIB, 4096), &late, 100 * MIB, "late write");
    // The cut clusters are handed out again (as fresh: they read as zeros around a write).
    let part = pattern(72, 40 * MIB + 4096, 8192);
    q.write_ok(40 * MIB + 4096, &part);
    fill(q, 48 * MIB, 8 * MIB, Some(73));
    flush_twice(q);
    assert!(file_len(&img) > cut, "new data did not grow the file");
    drop(c);
    daemon.terminate_ok();
    let check = qemu_img_check(&img);
    assert!(check.clean(), "qemu-img check:\n{}", check.output);

    let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &DaemonConfig::new());
    let mut c = Client::simple(&daemon.socket);
    let q = c.q(0);
    let mut want = vec![0u8; 16 * MIB as usize];
    want[4096..4096 + part.len()].copy_from_slice(&part);
    want[8 * MIB as usize..].copy_from_slice(&pattern(73, 48 * MIB, 8 * MIB as usize));
    assert_bytes_eq(
        &q.read_all(40 * MIB, 16 * MIB),
        &want,
        40 * MIB,
        "after restart",
    );
    assert_bytes_eq(
        &q.read_all(0, 32 * MIB),
        &pattern(71, 0, 32 * MIB as usize),
        0,
        "kept",
    );
    assert_bytes_eq(&q.read_ok(100 * MIB, 4096), &late, 100 * MIB, "late write");
    drop(c);
    daemon.terminate_ok();
}

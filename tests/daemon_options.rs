//! Daemon options through the real binary (started as a child process) and a libblkio client, one
//! section per option: `--direct`, `--writethrough`, `--queue-size`, the shutdown signals, a raw
//! block device (a loop device) and `--logical-block-size 4096`.
//!
//! Requests libblkio cannot send go through other frontends: a chain with more data segments than
//! `seg_max` (which only fits in a ring through an indirect descriptor table) through the small
//! `indirect` frontend at the end of this file; writes to a read-only disk and unaligned requests
//! through `common::raw`.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Errno, ReqFlags};
use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Generous bound for waits on a loaded 2-core machine (exit after a signal, log lines).
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A temporary directory on the file system of the target directory. /tmp may be a tmpfs,
/// which refuses O_DIRECT; the target directory is on the machine's disk.
fn disk_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir in CARGO_TARGET_TMPDIR")
}

/// Err(why) unless files in `dir` can be opened with O_DIRECT and written 512 bytes at a
/// 512-byte offset from a 512-byte aligned buffer (what `--direct` with the default logical
/// block size needs).
fn direct_io_512(dir: &Path) -> Result<(), String> {
    let path = dir.join("o_direct-probe");
    fs::write(&path, [0u8; 1024]).map_err(|e| format!("create {}: {e}", path.display()))?;
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    let buf = vec![0x5Au8; 8192];
    let at = buf.as_ptr().align_offset(4096);
    let written = opened.and_then(|f| f.write_at(&buf[at..at + 512], 512));
    let _ = fs::remove_file(&path);
    match written {
        Ok(512) => Ok(()),
        Ok(n) => Err(format!("an O_DIRECT write of 512 bytes wrote {n}")),
        Err(e) => Err(format!(
            "O_DIRECT write of 512 bytes at 512 in {}: {e}",
            dir.display()
        )),
    }
}

/// Polls `ready` every 10 ms until it returns Some, for at most `DEADLINE`; panics with
/// `what` and the daemon's log after that.
#[track_caller]
fn wait_until<T>(d: &mut Daemon, what: &str, mut ready: impl FnMut(&mut Daemon) -> Option<T>) -> T {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = ready(d) {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{what}: not within {DEADLINE:?}\n--- log ---\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the daemon's log contains `needle` (the daemon must keep running).
#[track_caller]
fn wait_for_log(d: &mut Daemon, needle: &str) {
    wait_until(d, &format!("{needle:?} in the log"), |d| {
        d.assert_running();
        d.log().contains(needle).then_some(())
    })
}

/// A raw image of `size` bytes holding `pattern(seed, ..)`, created in `dir` and served with
/// `cfg`.
fn serve_raw(dir: &Path, size: u64, seed: u64, cfg: &DaemonConfig) -> (PathBuf, Daemon) {
    let img = create_image(dir, "disk.img", size, Some(seed));
    let daemon = Daemon::start(dir, &img, cfg);
    (img, daemon)
}

/// The fds (as names in /proc/PID/fd) the process has open on `path`.
fn fds_on(pid: libc::pid_t, path: &Path) -> Vec<String> {
    let want = fs::canonicalize(path).expect("canonicalize image path");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            (fs::read_link(e.path()).ok()? == want).then(|| e.file_name().to_string_lossy().into())
        })
        .collect()
}

/// The open-file flags of fd `fd` of process `pid` (the octal `flags:` of its fdinfo).
fn fd_flags(pid: libc::pid_t, fd: &str) -> i32 {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("read fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap_or_else(|| panic!("no flags in fdinfo: {info}"));
    i32::from_str_radix(flags.trim(), 8).expect("octal fdinfo flags")
}

/// One vectored request whose data segments are `(offset in the queue's buffer, length)`.
#[derive(Clone, Debug)]
struct VecReq {
    write: bool,
    disk: u64,
    segs: Vec<(usize, usize)>,
}

impl VecReq {
    fn len(&self) -> usize {
        self.segs.iter().map(|s| s.1).sum()
    }
}

/// Submits all `reqs` at once on `q` (user_data = index), waits for them, and returns their
/// completions in submission order. Write data must already be in the buffer (`scatter`).
fn submit_all(q: &mut Queue, reqs: &[VecReq]) -> Vec<Done> {
    let iovs: Vec<Vec<libc::iovec>> = reqs
        .iter()
        .map(|r| {
            r.segs
                .iter()
                .map(|&(off, len)| libc::iovec {
                    iov_base: q.buf()[off..off + len].as_mut_ptr().cast(),
                    iov_len: len,
                })
                .collect()
        })
        .collect();
    for (i, (r, iov)) in reqs.iter().zip(&iovs).enumerate() {
        let (ptr, cnt) = (iov.as_ptr(), iov.len() as u32);
        if r.write {
            q.q.writev(r.disk, ptr, cnt, i, ReqFlags::empty());
        } else {
            q.q.readv(r.disk, ptr, cnt, i, ReqFlags::empty());
        }
    }
    // `iovs` stays alive until every request completed: blkio reads the arrays lazily.
    let mut done = q.wait(reqs.len());
    drop(iovs);
    done.sort_by_key(|d| d.user_data);
    done
}

/// Copies `data` into the buffer segments `segs` of `q`, in order.
fn scatter(q: &mut Queue, segs: &[(usize, usize)], data: &[u8]) {
    let mut pos = 0;
    for &(off, len) in segs {
        q.buf()[off..off + len].copy_from_slice(&data[pos..pos + len]);
        pos += len;
    }
    assert_eq!(pos, data.len(), "segments do not cover the data");
}

/// Concatenates the buffer segments `segs` of `q`.
fn gather(q: &mut Queue, segs: &[(usize, usize)]) -> Vec<u8> {
    segs.iter()
        .flat_map(|&(off, len)| q.buf()[off..off + len].to_vec())
        .collect()
}

#[track_caller]
fn assert_all_ok(done: &[Done], reqs: &[VecReq], what: &str) {
    for (d, r) in done.iter().zip(reqs) {
        assert_eq!(d.ret, 0, "{what}: {r:?} failed: {}", d.errno_name());
    }
}

/// Submits `r` alone and asserts that it succeeds.
#[track_caller]
fn submit_ok(q: &mut Queue, r: &VecReq, what: &str) {
    let one = std::slice::from_ref(r);
    assert_all_ok(&submit_all(q, one), one, what);
}

/// The single-segment read of `len` bytes at `disk` into `q`'s buffer at `off`.
fn read_at(q: &mut Queue, disk: u64, off: usize, len: usize) -> Vec<u8> {
    let r = VecReq {
        write: false,
        disk,
        segs: vec![(off, len)],
    };
    q.buf()[off..off + len].fill(0xEE);
    submit_ok(q, &r, "read");
    q.buf()[off..off + len].to_vec()
}

/// `n` segments of `seg` bytes laid out in *reverse* order in the buffer, from `base` on, so
/// a device that mixed up the segment order would produce different bytes.
fn reversed_segments(base: usize, n: usize, seg: usize) -> Vec<(usize, usize)> {
    (0..n).map(|i| (base + (n - 1 - i) * seg, seg)).collect()
}

// ---------------------------------------------------------------------------------------------
// --direct
// ---------------------------------------------------------------------------------------------

/// The writes of one queue's batch: aligned and unaligned guest buffers (page-aligned,
/// 512-aligned, odd addresses), lengths that are multiples of 512 but not of 4096, and
/// vectored requests mixing aligned and unaligned segments. Disk offsets are relative to the
/// queue's region; buffer offsets are within the queue's buffer. No two requests overlap.
fn direct_batch() -> Vec<VecReq> {
    let w = |disk: u64, segs: Vec<(usize, usize)>| VecReq {
        write: true,
        disk,
        segs,
    };
    vec![
        w(0, vec![(0, 4096)]),
        w(8 * KIB + 512, vec![(8192 + 512, 1536)]),
        w(16 * KIB + 1024, vec![(20 * 1024 + 1, 512)]),
        w(32 * KIB, vec![(40 * 1024 + 7, 64 * 1024 + 512)]),
        w(128 * KIB + 512, vec![(160 * 1024 + 3 * 512 + 3, 3 * 4096)]),
        w(
            256 * KIB + 512,
            vec![
                (300 * 1024, 4096),
                (310 * 1024 + 1, 512),
                (320 * 1024 + 512, 1024),
                (330 * 1024 + 5, 2048),
            ],
        ),
        w(320 * KIB, vec![(400 * 1024, 8192), (416 * 1024, 4096)]),
        w(384 * KIB + 3584, reversed_segments(448 * 1024 + 9, 7, 512)),
    ]
}

/// Runs the `direct_batch` writes at `region` on `q`, then reads the whole region back with
/// unaligned buffers in one batch of several reads, and checks it against `model` (the
/// region's expected contents, updated here).
fn direct_io_on_queue(q: &mut Queue, region: u64, seed: u64, model: &mut [u8]) {
    let reqs: Vec<VecReq> = direct_batch()
        .into_iter()
        .map(|mut r| {
            r.disk += region;
            r
        })
        .collect();
    for r in &reqs {
        let data = pattern(seed, r.disk, r.len());
        scatter(q, &r.segs, &data);
        let at = (r.disk - region) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    }
    assert_all_ok(&submit_all(q, &reqs), &reqs, "O_DIRECT write batch");

    // Read back: four reads of 128 KiB in one batch, into disjoint buffers at odd addresses,
    // one of them vectored with uneven (but 512-multiple) segments.
    let (chunk, stride) = (128 * 1024, 200 * 1024);
    let reads: Vec<VecReq> = (0..4)
        .map(|i| VecReq {
            write: false,
            disk: region + (i * chunk) as u64,
            segs: if i == 2 {
                let b = i * stride + 11;
                vec![(b, 512), (b + 4096, chunk - 2048), (b + chunk + 4096, 1536)]
            } else {
                vec![(i * stride + 1 + i, chunk)]
            },
        })
        .collect();
    for r in &reads {
        for &(o, l) in &r.segs {
            q.buf()[o..o + l].fill(0xEE);
        }
    }
    assert_all_ok(&submit_all(q, &reads), &reads, "O_DIRECT read batch");
    for r in &reads {
        let at = (r.disk - region) as usize;
        assert_bytes_eq(
            &gather(q, &r.segs),
            &model[at..at + r.len()],
            r.disk,
            &format!("queue {} O_DIRECT read-back", q.index),
        );
    }
}

#[test]
fn direct_serves_unaligned_buffers_on_two_queues() {
    let dir = disk_tempdir();
    if let Err(why) = direct_io_512(dir.path()) {
        skip_unless_ci(&format!(
            "--direct needs a file system with O_DIRECT: {why}"
        ));
        return;
    }
    const SEED: u64 = 0xD1;
    let size = 8 * MIB;
    let region = |i: usize| i as u64 * 4 * MIB;
    let cfg = DaemonConfig {
        direct: true,
        ..DaemonConfig::new().num_queues(2)
    };
    let (img, daemon) = serve_raw(dir.path(), size, SEED, &cfg);
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );

    // Every handle the daemon has on the image really is O_DIRECT.
    let fds = fds_on(daemon.pid(), &img);
    assert!(!fds.is_empty(), "the daemon has no fd on {}", img.display());
    for fd in &fds {
        assert_ne!(
            fd_flags(daemon.pid(), fd) & libc::O_DIRECT,
            0,
            "image fd {fd} is not O_DIRECT"
        );
    }

    // Both queues at once, each on its own thread and its own 4 MiB region.
    let full = pattern(SEED, 0, size as usize);
    let mut models: Vec<Vec<u8>> = (0..2)
        .map(|i| full[region(i) as usize..(region(i) + 512 * KIB) as usize].to_vec())
        .collect();
    std::thread::scope(|s| {
        for (q, model) in c.queues.iter_mut().zip(models.iter_mut()) {
            s.spawn(move || {
                let r = region(q.index);
                direct_io_on_queue(q, r, 0x100 + q.index as u64, model)
            });
        }
    });

    // Across queues: queue 1 reads what queue 0 wrote, into a buffer at an odd address.
    let q1 = c.q(1);
    let got = read_at(q1, region(0), 4097, 512 * KIB as usize);
    assert_bytes_eq(
        &got,
        &models[0],
        region(0),
        "queue 0's data read on queue 1",
    );
    assert_eq!(c.q(0).flush().ret, 0, "FLUSH with --direct");

    drop(c);
    daemon.terminate_ok();
    let file = read_file(&img);
    let mut expected = full;
    for (i, m) in models.iter().enumerate() {
        let r = region(i) as usize;
        expected[r..r + m.len()].copy_from_slice(m);
    }
    assert_bytes_eq(&file, &expected, 0, "image file after O_DIRECT I/O");
}

/// `--direct` on qcow2: guest data moves through an O_DIRECT descriptor on both queues at
/// once (guest buffers aligned, odd and split: `direct_io_on_queue`), alongside the buffered
/// one that carries metadata; what the queues wrote is what `qemu-img` reads, and the image
/// is clean.
/// `--cache` takes QEMU's mode names: none and directsync open the image with O_DIRECT,
/// writethrough and directsync start in write-through mode, writeback is the default; and it
/// cannot be combined with the options it stands for.
#[test]
fn cache_modes_set_o_direct_and_write_through() {
    let dir = disk_tempdir();
    if let Err(why) = direct_io_512(dir.path()) {
        skip_unless_ci(&format!(
            "--cache none needs a file system with O_DIRECT: {why}"
        ));
        return;
    }
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img, "", "8M");
    for (mode, direct, through) in [
        ("none", true, false),
        ("writeback", false, false),
        ("writethrough", false, true),
        ("directsync", true, true),
    ] {
        let cfg = DaemonConfig::new().arg("--cache").arg(mode);
        let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &cfg);
        let fds = fds_on(daemon.pid(), &img);
        let with_o_direct = fds
            .iter()
            .filter(|fd| fd_flags(daemon.pid(), fd) & libc::O_DIRECT != 0)
            .count();
        assert_eq!(with_o_direct > 0, direct, "--cache {mode}: {fds:?}");
        let log = daemon.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("serving "))
            .unwrap_or_default()
            .to_string();
        let wanted = if through {
            "write-through"
        } else {
            "write-back"
        };
        assert!(line.contains(wanted), "--cache {mode}: {line}");
        daemon.terminate_ok();
    }
    let check = qemu_img_check(&img);
    assert!(check.clean(), "{}", check.output);
    for clash in ["--direct", "--writethrough"] {
        let p = img.to_str().unwrap();
        let (st, _, err) = run_bin(dir.path(), &["--blk-file", p, "--cache", "none", clash]);
        assert_eq!(st.code(), Some(2), "--cache none {clash}: {err}");
        assert!(err.contains("--cache"), "{err}");
    }
}

#[test]
fn direct_qcow2_moves_guest_data_with_o_direct() {
    let dir = disk_tempdir();
    if let Err(why) = direct_io_512(dir.path()) {
        skip_unless_ci(&format!(
            "--direct needs a file system with O_DIRECT: {why}"
        ));
        return;
    }
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img, "", "8M");
    let region = |i: usize| i as u64 * 4 * MIB;
    let cfg = DaemonConfig {
        direct: true,
        ..DaemonConfig::new().num_queues(2)
    };
    let daemon = Daemon::start_format(dir.path(), &img, "qcow2", &cfg);
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    let mut models: Vec<Vec<u8>> = (0..2).map(|_| vec![0u8; 512 * KIB as usize]).collect();
    std::thread::scope(|s| {
        for (q, model) in c.queues.iter_mut().zip(models.iter_mut()) {
            s.spawn(move || {
                let r = region(q.index);
                // Twice: first allocating, then overwriting in place.
                direct_io_on_queue(q, r, 0x200 + q.index as u64, model);
                direct_io_on_queue(q, r, 0x300 + q.index as u64, model);
            });
        }
    });
    let fds = fds_on(daemon.pid(), &img);
    let direct = fds
        .iter()
        .filter(|fd| fd_flags(daemon.pid(), fd) & libc::O_DIRECT != 0)
        .count();
    assert!(direct >= 1, "no O_DIRECT handle on the image among {fds:?}");
    assert!(
        direct < fds.len(),
        "metadata goes through a buffered handle: {fds:?}"
    );
    assert_eq!(c.q(0).flush().ret, 0, "FLUSH with --direct");
    drop(c);
    daemon.terminate_ok();

    let check = qemu_img_check(&img);
    assert!(check.clean(), "{}", check.output);
    let raw = dir.path().join("disk.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let disk = read_file(&raw);
    for (i, m) in models.iter().enumerate() {
        let r = region(i) as usize;
        assert_bytes_eq(
            &disk[r..r + m.len()],
            m,
            r as u64,
            "qcow2 after O_DIRECT I/O",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// --writethrough
// ---------------------------------------------------------------------------------------------

/// `strace -f` attached to a running process, recording write system calls.
struct Strace {
    child: Child,
    out: PathBuf,
}

impl Strace {
    /// Attaches to every thread of `pid` (and the threads it starts later); returns once all
    /// of its current threads are traced. None if strace is not installed.
    fn attach(pid: libc::pid_t, out: PathBuf) -> Option<Strace> {
        let child = match Command::new("strace")
            .args(["-f", "-qq", "-s", "0", "-e", "signal=none"])
            .args(["-e", "trace=pwrite64,pwritev,pwritev2"])
            .arg("-o")
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot run strace: {e}"),
        };
        let mut s = Strace { child, out };
        let tracer = s.child.id().to_string();
        let until = Instant::now() + DEADLINE;
        loop {
            let traced = fs::read_dir(format!("/proc/{pid}/task"))
                .expect("list threads")
                .filter_map(|t| fs::read_to_string(t.ok()?.path().join("status")).ok())
                .all(|st| {
                    st.lines()
                        .any(|l| l.strip_prefix("TracerPid:").map(str::trim) == Some(&tracer))
                });
            if traced {
                return Some(s);
            }
            if let Some(st) = s.child.try_wait().expect("try_wait strace") {
                panic!("strace exited with {st} before attaching to {pid}");
            }
            assert!(
                Instant::now() < until,
                "strace did not attach within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Detaches (SIGINT) and returns the trace.
    fn finish(mut self) -> String {
        // SAFETY: kill() on the pid of our own, not yet reaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0, "kill strace: {}", std::io::Error::last_os_error());
        let _ = self.child.wait();
        fs::read_to_string(&self.out).expect("read strace output")
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The write system calls to any of `fds` in an `strace -f` trace, as (syscall, durable):
/// durable means the call carried RWF_DSYNC.
fn image_writes(trace: &str, fds: &[String]) -> Vec<(String, bool)> {
    trace
        .lines()
        .filter_map(|l| {
            let call = l.split_whitespace().nth(1)?;
            let (name, args) = call.split_once('(')?;
            let fd = args.split(',').next()?;
            (name.starts_with("pwrite") && fds.iter().any(|f| f == fd))
                .then(|| (name.to_string(), l.contains("RWF_DSYNC")))
        })
        .collect()
}

/// Serves with and without `--writethrough`, on both I/O engines: the writeback byte the
/// client reads through GET_CONFIG, that written data is in the file as soon as the write
/// completes (before any FLUSH), and, with `--aio sync` where strace is available (io_uring
/// requests are not system calls), that every image write in write-through mode is a
/// pwritev2(RWF_DSYNC) and none in write-back mode is. (The io_uring engine's RWF_DSYNC is
/// checked by the power-loss harness, which records each write's flags.)
#[test]
fn writethrough_reports_no_writeback_and_writes_with_dsync() {
    let mut strace_missing = false;
    for (writethrough, aio) in [
        (false, "sync"),
        (true, "sync"),
        (false, "io_uring"),
        (true, "io_uring"),
    ] {
        let mode = if writethrough {
            "write-through"
        } else {
            "write-back"
        };
        let dir = disk_tempdir();
        let cfg = DaemonConfig {
            writethrough,
            ..DaemonConfig::new().num_queues(1).arg("--aio").arg(aio)
        };
        let (img, mut daemon) = serve_raw(dir.path(), 2 * MIB, 0x77, &cfg);
        wait_for_log(&mut daemon, &format!("(cache: {mode})"));
        let mut c = Client::simple(&daemon.socket);
        // blkio sets `flush-needed` from the config space's writeback byte (CONFIG_WCE is
        // offered), i.e. the byte GET_CONFIG returned.
        assert_eq!(
            c.get_bool("flush-needed"),
            !writethrough,
            "{mode}: writeback byte of the config space"
        );

        let trace = dir.path().join("strace.out");
        let strace = if aio == "sync" {
            let s = Strace::attach(daemon.pid(), trace);
            strace_missing |= s.is_none();
            s
        } else {
            None
        };
        let file = File::open(&img).expect("open image");
        const WRITES: u64 = 8;
        for i in 0..WRITES {
            let off = 64 * KIB * i + 512 * i;
            let data = pattern(0x700 + i, off, 4096 + 512 * i as usize);
            c.q(0).write_ok(off, &data);
            // No FLUSH was sent: the bytes are in the file (at least its page cache) once
            // the write completed.
            let mut got = vec![0u8; data.len()];
            file.read_exact_at(&mut got, off).expect("pread image");
            assert_bytes_eq(&got, &data, off, &format!("{mode}: file right after write"));
        }
        if let Some(s) = strace {
            let fds = fds_on(daemon.pid(), &img);
            let writes = image_writes(&s.finish(), &fds);
            assert!(
                writes.len() as u64 >= WRITES,
                "{mode}: expected at least {WRITES} writes to image fds {fds:?}, traced {writes:?}"
            );
            assert!(
                writes.iter().all(|w| w.1 == writethrough),
                "{mode}: image writes with RWF_DSYNC should be {writethrough}: {writes:?}"
            );
        }
        drop(c);
        daemon.terminate_ok();
    }
    if strace_missing {
        skip_unless_ci("strace is not installed: RWF_DSYNC of write-through writes not checked");
    }
}

// ---------------------------------------------------------------------------------------------
// --queue-size
// ---------------------------------------------------------------------------------------------

#[test]
fn queue_size_bounds_the_ring_and_seg_max() {
    use common::raw::{S_IOERR, S_OK, T_OUT};
    const SEG: usize = 512;
    for n in [64u32, 1024] {
        let seg_max = n as usize - 2;
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * MIB;
        let cfg = DaemonConfig {
            queue_size: Some(n),
            ..DaemonConfig::new().num_queues(1)
        };
        let (img, mut daemon) = serve_raw(dir.path(), size, 0x51, &cfg);

        // A ring larger than the maximum is refused by the device (a REPLY_ACK error to
        // SET_VRING_NUM, which blkio reports as EIO) when the client sets it up.
        let b = connect(&daemon.socket, false).expect("connect");
        match start(b, 1, 2 * n as i32) {
            Ok(_) => panic!("--queue-size {n}: a ring of {} entries was accepted", 2 * n),
            Err(e) => assert_eq!(e.errno(), Errno::IO, "--queue-size {n}: ring of 2N: {e}"),
        }
        daemon.assert_running();

        // A ring of exactly N works, and seg_max (blkio's max-segments) is N - 2.
        let mut c = Client::new(
            &daemon.socket,
            &ClientOpts {
                queue_size: n as i32,
                ..Default::default()
            },
        );
        assert_eq!(
            c.get_i32("max-segments") as usize,
            seg_max,
            "--queue-size {n}: seg_max"
        );
        // seg_max segments (N descriptors with header and status: the whole ring) work.
        let q = c.q(0);
        let disk = MIB + 512;
        let data = pattern(0x500 + u64::from(n), disk, seg_max * SEG);
        let w = VecReq {
            write: true,
            disk,
            segs: reversed_segments(0, seg_max, SEG),
        };
        scatter(q, &w.segs, &data);
        submit_ok(q, &w, "write of seg_max segments");
        let r = VecReq {
            write: false,
            disk,
            segs: reversed_segments(3, seg_max, SEG),
        };
        q.buf()[..(seg_max + 1) * SEG].fill(0xEE);
        submit_ok(q, &r, "read of seg_max segments");
        assert_bytes_eq(
            &gather(q, &r.segs),
            &data,
            disk,
            "seg_max-segment read-back",
        );
        drop(c);

        // One segment more only fits through an indirect table: the device refuses it.
        let mut raw = indirect::Frontend::connect(&daemon.socket, n as u16);
        let fresh = pattern(0x600 + u64::from(n), 0, (seg_max + 1) * SEG);
        raw.data()[..fresh.len()].copy_from_slice(&fresh);
        let sector = 2 * MIB / SECTOR;
        assert_eq!(
            raw.request(T_OUT, sector, seg_max + 1, SEG),
            S_IOERR,
            "--queue-size {n}: a write of seg_max + 1 segments"
        );
        let mut now = vec![0u8; (seg_max + 1) * SEG];
        File::open(&img)
            .and_then(|f| f.read_exact_at(&mut now, 2 * MIB))
            .expect("pread image");
        assert_bytes_eq(
            &now,
            &pattern(0x51, 2 * MIB, now.len()),
            2 * MIB,
            "the refused write changed the image",
        );
        // The same write with seg_max segments through an indirect table works.
        assert_eq!(
            raw.request(T_OUT, sector, seg_max, SEG),
            S_OK,
            "--queue-size {n}: an indirect write of seg_max segments"
        );
        drop(raw);
        daemon.terminate_ok();

        let mut expected = pattern(0x51, 0, size as usize);
        expected[disk as usize..disk as usize + data.len()].copy_from_slice(&data);
        let at = (2 * MIB) as usize;
        expected[at..at + seg_max * SEG].copy_from_slice(&fresh[..seg_max * SEG]);
        assert_bytes_eq(
            &read_file(&img),
            &expected,
            0,
            "image after --queue-size I/O",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// SIGINT with no frontend and SIGHUP with a connected frontend that has just written: exit
/// status 0, both sockets removed, the data in the image.
#[test]
fn sigint_and_sighup_exit_cleanly_and_remove_the_sockets() {
    for (sig, name, connected) in [
        (libc::SIGINT, "SIGINT", false),
        (libc::SIGHUP, "SIGHUP", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl.sock");
        let cfg = DaemonConfig::new()
            .num_queues(2)
            .arg("--control-socket")
            .arg(ctl.to_str().expect("utf-8 path"));
        let (img, mut daemon) = serve_raw(dir.path(), MIB, 0x31, &cfg);
        wait_for_log(&mut daemon, "serving ");
        let data = pattern(0x32, 64 * KIB, 8192);
        let client = connected.then(|| {
            let mut c = Client::new(
                &daemon.socket,
                &ClientOpts {
                    num_queues: 2,
                    ..Default::default()
                },
            );
            c.q(1).write_ok(64 * KIB, &data);
            c
        });
        daemon.signal(sig);
        let st = daemon.wait_exit(name);
        assert_eq!(
            st.code(),
            Some(0),
            "{name}: exit status {st}\n{}",
            daemon.log()
        );
        assert!(
            !daemon.socket.exists(),
            "{name}: vhost-user socket left behind"
        );
        assert!(!ctl.exists(), "{name}: control socket left behind");
        drop(client);
        if connected {
            assert_bytes_eq(
                &read_file(&img)[64 * KIB as usize..64 * KIB as usize + 8192],
                &data,
                64 * KIB,
                &format!("{name}: image after exit"),
            );
        }
    }
}

/// Byte 72..80 of a qcow2 v3 header: the incompatible feature bits (bit 0 dirty, bit 1
/// corrupt).
/// A SIGTERM the moment the socket appears (while the daemon may still be setting up) is a
/// clean shutdown too: the daemon takes the signals over before it creates any file, so the
/// default action (death by the signal, socket left behind) never applies.
#[test]
fn sigterm_during_startup_still_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::create_image(dir.path(), "disk.img", MIB, None);
    let sock = dir.path().join("vub.sock");
    for round in 0..50 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&img)
            .args(["--format", "raw", "--num-queues", "1"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Signal the instant the socket exists (no sleep: the window is microseconds).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no socket"
            );
            std::hint::spin_loop();
        }
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(0), "round {round}: {st}");
        assert!(!sock.exists(), "round {round}: socket left behind");
    }
}

fn qcow2_incompatible_features(image: &Path) -> u64 {
    let mut b = [0u8; 8];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut b, 72))
        .expect("read qcow2 header");
    u64::from_be_bytes(b)
}

/// SIGTERM while a client is connected and its writes (allocating clusters and L2 tables,
/// never flushed) have just completed: exit 0, socket removed, and the qcow2 image is
/// consistent and holds the data, i.e. the daemon wrote its cached metadata back and cleared
/// the dirty bit at shutdown.
#[test]
fn sigterm_with_a_connected_client_leaves_a_clean_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().expect("utf-8 path");
    let size = 64 * MIB;
    create_qcow2(img_s, "", &size.to_string());
    let mut daemon = Daemon::start_format(
        dir.path(),
        &img,
        "qcow2",
        &DaemonConfig::new().num_queues(2).arg("-v"),
    );
    wait_for_log(&mut daemon, "serving ");
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    // Scattered writes on both queues, each allocating clusters (refcounts, L2 entries):
    // partial clusters, one across a cluster boundary, far apart, and the last sector.
    let writes: [(usize, u64, usize); 6] = [
        (0, 0, 4096),
        (1, 64 * KIB - 512, 1024),
        (0, 5 * MIB + 3 * 512, 70 * 1024),
        (1, 17 * MIB, 256 * 1024),
        (0, 40 * MIB + 4096, 512),
        (1, size - 512, 512),
    ];
    let mut model = vec![0u8; size as usize];
    for (i, &(q, off, len)) in writes.iter().enumerate() {
        let data = pattern(0x40 + i as u64, off, len);
        c.q(q).write_ok(off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert_ne!(
        qcow2_incompatible_features(&img) & 1,
        0,
        "the dirty bit is not set while the daemon has unflushed allocations"
    );

    daemon.signal(libc::SIGTERM);
    let st = daemon.wait_exit("SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM: exit status {st}\n{}",
        daemon.log()
    );
    assert!(!daemon.socket.exists(), "SIGTERM: socket left behind");
    drop(c);

    assert_eq!(
        qcow2_incompatible_features(&img) & 3,
        0,
        "dirty or corrupt bit set after a clean shutdown"
    );
    let check = qemu_img_check(&img);
    assert!(
        check.clean(),
        "qemu-img check after SIGTERM:\n{}",
        check.output
    );
    let raw = dir.path().join("disk.raw");
    let raw_s = raw.to_str().expect("utf-8 path");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", img_s, raw_s]);
    assert_bytes_eq(&read_file(&raw), &model, 0, "qcow2 contents after SIGTERM");
}

// ---------------------------------------------------------------------------------------------
// Raw block device (loop device)
// ---------------------------------------------------------------------------------------------

#[test]
fn loop_block_device_serves_io_discard_and_write_zeroes() {
    const SEED: u64 = 0xB1;
    let size = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let backing = create_image(dir.path(), "backing.img", size, Some(SEED));
    let lo = match LoopDev::attach(&backing) {
        Ok(l) => l,
        Err(why) => return skip_unless_ci(&why),
    };
    let mut model = pattern(SEED, 0, size as usize);

    let daemon = Daemon::start(dir.path(), &lo.dev, &DaemonConfig::new().num_queues(2));
    let mut c = Client::new(
        &daemon.socket,
        &ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(
        c.get_u64("capacity"),
        size,
        "capacity of {}",
        lo.dev.display()
    );

    // Writes on both queues at once, then each queue reads the other's data.
    let areas = [(MIB + 512, 300 * 1024), (33 * MIB - 4096, 200 * 1024)];
    std::thread::scope(|s| {
        for (q, &(off, len)) in c.queues.iter_mut().zip(&areas) {
            s.spawn(move || {
                for k in 0..4u64 {
                    let at = off + k * len as u64;
                    q.write_ok(at, &pattern(0x900 + k, at, len));
                }
            });
        }
    });
    for (i, &(off, len)) in areas.iter().enumerate() {
        for k in 0..4u64 {
            let at = (off + k * len as u64) as usize;
            model[at..at + len].copy_from_slice(&pattern(0x900 + k, at as u64, len));
        }
        let (start, end) = (off as usize - 4096, off as usize + 4 * len + 4096);
        assert_bytes_eq(
            &c.q(1 - i).read_all(start as u64, (end - start) as u64),
            &model[start..end],
            start as u64,
            &format!("area {i} read on the other queue"),
        );
    }

    // DISCARD and WRITE_ZEROES (with and without unmap) read back as zeros, the neighbouring
    // bytes stay intact.
    let align = (c.get_i32("discard-alignment") as u64).max(SECTOR);
    let q = c.q(0);
    let zeroed: [(u64, u64, Option<ReqFlags>); 5] = [
        (8 * MIB, MIB, None),
        (10 * MIB + 8 * align, 4 * align, None),
        (12 * MIB + 3 * 512, 5 * 512, Some(ReqFlags::empty())),
        (14 * MIB, MIB + 4096, Some(ReqFlags::NO_UNMAP)),
        (20 * MIB + 512, 64 * KIB, Some(ReqFlags::NO_UNMAP)),
    ];
    for &(off, len, wz) in &zeroed {
        let d = match wz {
            None => q.discard(off, len),
            Some(flags) => q.write_zeroes(off, len, flags),
        };
        assert_eq!(d.ret, 0, "{wz:?} [{off}, +{len}): {}", d.errno_name());
        model[off as usize..(off + len) as usize].fill(0);
        let (start, end) = (off - 8192, off + len + 8192);
        assert_bytes_eq(
            &q.read_all(start, end - start),
            &model[start as usize..end as usize],
            start,
            &format!(
                "around {} [{off}, +{len})",
                if wz.is_some() {
                    "write-zeroes"
                } else {
                    "discard"
                }
            ),
        );
    }
    assert_eq!(q.flush().ret, 0, "FLUSH on a block device");
    assert_bytes_eq(&q.read_all(0, size), &model, 0, "whole device");
    drop(c);
    daemon.terminate_ok();
    // The daemon has exited (it flushes the device, and closing the last handle of a block
    // device syncs it), so the loop driver has passed everything on to the backing file.
    assert_bytes_eq(&read_file(&backing), &model, 0, "backing file");

    // Read-only: reads are served, every modification fails in the device.
    use common::raw::*;
    let mut daemon = Daemon::start(dir.path(), &lo.dev, &DaemonConfig::new().read_only());
    let mut c = RawClient::connect(&daemon.socket);
    assert_ne!(
        c.device_features & F_RO,
        0,
        "read-only device without VIRTIO_BLK_F_RO"
    );
    assert_eq!(c.request(T_IN, 16, 4096, None), S_OK, "read, read-only");
    assert_bytes_eq(
        &c.data()[..4096],
        &model[8192..12288],
        8192,
        "read-only read",
    );
    c.data()[..4096].fill(0x5A);
    assert_eq!(
        c.request(T_OUT, 16, 4096, None),
        S_IOERR,
        "write, read-only"
    );
    let seg = Some((64, 8, 0));
    assert_eq!(
        c.request(T_DISCARD, 0, 0, seg),
        S_IOERR,
        "discard, read-only"
    );
    assert_eq!(
        c.request(T_WRITE_ZEROES, 0, 0, seg),
        S_IOERR,
        "write-zeroes, read-only"
    );
    assert_eq!(c.request(T_FLUSH, 0, 0, None), S_OK, "flush, read-only");
    daemon.assert_running();
    drop(c);
    daemon.terminate_ok();
    assert_bytes_eq(
        &read_file(&backing),
        &model,
        0,
        "backing file after read-only",
    );
}

// ---------------------------------------------------------------------------------------------
// --logical-block-size 4096 (capacity and aligned I/O: tests/blkio_client.rs)
// ---------------------------------------------------------------------------------------------

/// Requests aligned to 512 but not to 4096 fail in the device and touch nothing; libblkio
/// refuses to send them itself, so they go through the raw frontend.
#[test]
fn logical_block_size_4096_refuses_512_aligned_requests() {
    use common::raw::*;
    let size = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new().logical_block_size(4096).num_queues(1);
    let (img, mut daemon) = serve_raw(dir.path(), size, 0x4B, &cfg);
    let before = read_file(&img);
    let mut c = RawClient::connect(&daemon.socket);
    c.data()[..8192].fill(0xC3);
    let cases = [
        ("read at sector 1", T_IN, 1, 4096, None),
        ("read of 512 bytes", T_IN, 8, 512, None),
        ("write at sector 9", T_OUT, 9, 4096, None),
        ("write of 4096 + 512 bytes", T_OUT, 16, 4608, None),
        (
            "write-zeroes at sector 4",
            T_WRITE_ZEROES,
            0,
            0,
            Some((4, 8, 0)),
        ),
        ("discard of 7 sectors", T_DISCARD, 0, 0, Some((8, 7, 0))),
    ];
    for (what, t, sector, len, seg) in cases {
        assert_eq!(c.request(t, sector, len, seg), S_IOERR, "{what}");
    }
    daemon.assert_running();
    // Aligned requests work (away from the ranges above, which must stay untouched).
    assert_eq!(c.request(T_OUT, 24, 4096, None), S_OK, "aligned write");
    assert_eq!(c.request(T_IN, 24, 8192, None), S_OK, "aligned read");
    let mut expected = before;
    expected[12288..16384].fill(0xC3);
    assert_bytes_eq(
        &c.data()[..8192],
        &expected[12288..20480],
        12288,
        "read-back",
    );
    drop(c);
    daemon.terminate_ok();
    assert_bytes_eq(
        &read_file(&img),
        &expected,
        0,
        "image after refused requests",
    );
}

// ---------------------------------------------------------------------------------------------
// A vhost-user frontend that sends each request through an indirect descriptor table
// ---------------------------------------------------------------------------------------------

/// The one frontend here that can put more descriptors in a chain than the ring has entries
/// (libblkio uses direct descriptors only, so its chains can never exceed seg_max). One
/// split virtqueue of a chosen size, one request at a time, polling the used ring; guest
/// addresses equal our virtual addresses in one shared memfd region.
mod indirect {
    use super::common::WAIT_TIMEOUT;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{fence, Ordering};
    use std::time::Instant;

    use vhost::vhost_user::message::{
        FrontendReq, VhostUserMemory, VhostUserMemoryRegion, VhostUserU64, VhostUserVringAddr,
        VhostUserVringAddrFlags, VhostUserVringState,
    };
    use vhost::vhost_user::VhostUserVirtioFeatures;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{ByteValued, FileOffset, MmapRegion};

    /// VIRTIO_F_VERSION_1 and VIRTIO_RING_F_INDIRECT_DESC.
    const VIRTIO_FEATURES: u64 = 1 << 32 | 1 << 28;
    /// Descriptor flags NEXT, WRITE and INDIRECT, in this order.
    const DESC_FLAGS: [u16; 3] = [1, 2, 4];

    /// Layout of the shared region: the descriptor table from 0, the avail and used rings
    /// (room for 1024 entries each), the indirect table, the request header, its status byte,
    /// and the data.
    const MEM_LEN: usize = 1 << 20;
    const AVAIL: usize = 16 << 10;
    const USED: usize = 20 << 10;
    const TABLE: usize = 32 << 10;
    const HEADER: usize = 64 << 10;
    const STATUS: usize = HEADER + 16;
    const DATA: usize = 128 << 10;

    pub struct Frontend {
        sock: UnixStream,
        /// Start of `region`, the memory shared with the daemon.
        mem: *mut u8,
        region: MmapRegion<()>,
        qsize: u16,
        kick: OwnedFd,
        call: OwnedFd,
        next_avail: u16,
    }

    /// Takes ownership of a new descriptor returned by a libc call (checked for failure).
    fn owned(fd: RawFd, what: &str) -> OwnedFd {
        assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    impl Frontend {
        /// Sends one vhost-user message (protocol version 1) with `body`, passing `fd` along.
        fn msg(&mut self, req: FrontendReq, body: &[u8], fd: Option<RawFd>) {
            let mut bytes = [u32::from(req), 1, body.len() as u32]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>();
            bytes.extend_from_slice(body);
            let Some(fd) = fd else {
                return self.sock.write_all(&bytes).expect("vhost-user write");
            };
            let mut iov = libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: bytes.len(),
            };
            let mut control = [0u64; 4];
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = &mut iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
            // SAFETY: `control` (32 bytes, 8-aligned) holds CMSG_SPACE(4) = 24 bytes, so the
            // first header and its 4-byte payload are inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            }
            // SAFETY: every pointer in `hdr` refers to a live local buffer of the stated size.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
            let err = std::io::Error::last_os_error();
            assert_eq!(n, bytes.len() as isize, "sendmsg {req:?}: {err}");
        }

        /// Sends a request whose reply carries one u64, and returns that.
        fn ask(&mut self, req: FrontendReq) -> u64 {
            self.msg(req, &[], None);
            let mut reply = [0u8; 20];
            self.sock.read_exact(&mut reply).expect("vhost-user reply");
            assert_eq!(reply[..4], u32::from(req).to_le_bytes(), "reply to {req:?}");
            assert_eq!(
                reply[8..12],
                8u32.to_le_bytes(),
                "size of the reply to {req:?}"
            );
            u64::from_le_bytes(reply[12..].try_into().expect("8 bytes"))
        }

        /// Connects and sets up virtqueue 0 with `qsize` entries and indirect descriptors.
        pub fn connect(socket: &Path, qsize: u16) -> Frontend {
            assert!(qsize <= 1024, "the layout has room for 1024 ring entries");
            let sock = UnixStream::connect(socket).expect("connect vhost-user socket");
            sock.set_read_timeout(Some(WAIT_TIMEOUT)).expect("timeout");
            // SAFETY: memfd_create with a valid NUL-terminated name; `owned` checks the result.
            let memfd = unsafe { libc::memfd_create(c"indirect".as_ptr(), libc::MFD_CLOEXEC) };
            let memfd = std::fs::File::from(owned(memfd, "memfd_create"));
            memfd.set_len(MEM_LEN as u64).expect("size the memfd");
            let region = MmapRegion::<()>::from_file(FileOffset::new(memfd, 0), MEM_LEN)
                .expect("map the memfd");
            let flags = libc::EFD_CLOEXEC | libc::EFD_NONBLOCK;
            // SAFETY: eventfd has no memory preconditions.
            let (kick, call) = unsafe { (libc::eventfd(0, flags), libc::eventfd(0, flags)) };
            let mut f = Frontend {
                sock,
                mem: region.as_ptr(),
                region,
                qsize,
                kick: owned(kick, "eventfd"),
                call: owned(call, "eventfd"),
                next_avail: 0,
            };
            // Guest addresses are our virtual addresses.
            let base = f.mem as u64;
            f.msg(FrontendReq::SET_OWNER, &[], None);
            let offered = f.ask(FrontendReq::GET_FEATURES);
            let wanted = VIRTIO_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            assert_eq!(offered & wanted, wanted, "features {offered:#x}");
            f.msg(
                FrontendReq::SET_FEATURES,
                VhostUserU64::new(wanted).as_slice(),
                None,
            );
            f.ask(FrontendReq::GET_PROTOCOL_FEATURES);
            let none = VhostUserU64::new(0);
            f.msg(FrontendReq::SET_PROTOCOL_FEATURES, none.as_slice(), None);
            let mut table = VhostUserMemory::new(1).as_slice().to_vec();
            let region = VhostUserMemoryRegion::new(base, MEM_LEN as u64, base, 0);
            table.extend_from_slice(region.as_slice());
            let memfd = f
                .region
                .file_offset()
                .expect("file-backed")
                .file()
                .as_raw_fd();
            f.msg(FrontendReq::SET_MEM_TABLE, &table, Some(memfd));
            let num = VhostUserVringState::new(0, qsize.into());
            f.msg(FrontendReq::SET_VRING_NUM, num.as_slice(), None);
            let first = VhostUserVringState::new(0, 0);
            f.msg(FrontendReq::SET_VRING_BASE, first.as_slice(), None);
            let (used, avail) = (base + USED as u64, base + AVAIL as u64);
            let addr =
                VhostUserVringAddr::new(0, VhostUserVringAddrFlags::empty(), base, used, avail, 0);
            f.msg(FrontendReq::SET_VRING_ADDR, addr.as_slice(), None);
            let (kick, call) = (f.kick.as_raw_fd(), f.call.as_raw_fd());
            f.msg(FrontendReq::SET_VRING_KICK, none.as_slice(), Some(kick));
            f.msg(FrontendReq::SET_VRING_CALL, none.as_slice(), Some(call));
            let on = VhostUserVringState::new(0, 1);
            f.msg(FrontendReq::SET_VRING_ENABLE, on.as_slice(), None);
            // A request with a reply orders everything above before the first kick.
            f.ask(FrontendReq::GET_FEATURES);
            f
        }

        /// The shared region from `off` on.
        fn at(&mut self, off: usize, len: usize) -> &mut [u8] {
            assert!(off + len <= MEM_LEN);
            // SAFETY: in bounds of our mapping (checked); the daemon only touches it while a
            // request is in flight, and then we only poll the used index (`used_idx`).
            unsafe { std::slice::from_raw_parts_mut(self.mem.add(off), len) }
        }

        fn used_idx(&self) -> u16 {
            // SAFETY: USED + 2 is inside our mapping and 2-aligned; volatile because the
            // daemon writes it.
            unsafe { std::ptr::read_volatile(self.mem.add(USED + 2).cast::<u16>()) }
        }

        /// The data area: segment `i` of a request is `data()[i * seg_len..][..seg_len]`.
        pub fn data(&mut self) -> &mut [u8] {
            self.at(DATA, MEM_LEN - DATA)
        }

        /// Writes a descriptor at `off`; its address is given as an offset in the region.
        fn put_desc(&mut self, off: usize, addr: usize, len: usize, flags: u16, next: u16) {
            let d = Descriptor::new(self.mem as u64 + addr as u64, len as u32, flags, next);
            self.at(off, 16).copy_from_slice(d.as_slice());
        }

        /// Sends request `req_type` at `sector` with `nseg` device-readable data segments of
        /// `seg_len` bytes (so: a write) as one indirect table, waits (≤ 10 s) and returns the
        /// status byte.
        pub fn request(&mut self, req_type: u32, sector: u64, nseg: usize, seg_len: usize) -> u8 {
            let [next, write, indirect] = DESC_FLAGS;
            let entries = nseg + 2;
            assert!(TABLE + 16 * entries <= HEADER && DATA + nseg * seg_len <= MEM_LEN);
            let header = [u64::from(req_type), sector];
            let header: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.at(HEADER, 16).copy_from_slice(&header);
            self.at(STATUS, 1)[0] = 0xFF;
            self.put_desc(TABLE, HEADER, 16, next, 1);
            for i in 0..nseg {
                let at = TABLE + 16 * (i + 1);
                self.put_desc(at, DATA + i * seg_len, seg_len, next, (i + 2) as u16);
            }
            self.put_desc(TABLE + 16 * (nseg + 1), STATUS, 1, write, 0);
            self.put_desc(0, TABLE, 16 * entries, indirect, 0);

            // Publish descriptor 0 in the avail ring, then the new avail index, then kick.
            let slot = AVAIL + 4 + 2 * usize::from(self.next_avail % self.qsize);
            self.at(slot, 2).copy_from_slice(&0u16.to_le_bytes());
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            let idx = self.next_avail.to_le_bytes();
            self.at(AVAIL + 2, 2).copy_from_slice(&idx);
            fence(Ordering::SeqCst);
            let mut kick = std::fs::File::from(self.kick.try_clone().expect("dup kick"));
            kick.write_all(&1u64.to_ne_bytes()).expect("kick");

            let until = Instant::now() + WAIT_TIMEOUT;
            while self.used_idx() != self.next_avail {
                assert!(
                    Instant::now() < until,
                    "request not completed in {WAIT_TIMEOUT:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            fence(Ordering::SeqCst);
            self.at(STATUS, 1)[0]
        }
    }
}

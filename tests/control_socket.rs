//! The daemon run like a real service: the control socket (docs/CONTROL.md), the `ctl`
//! client, socket permissions, sd_notify, `--fd` and systemd socket activation,
//! `--print-capabilities` and the setup-error exits.
//!
//! Every test spawns the real binary (no in-process shortcuts), talks to it through its
//! sockets, and checks what it reports against I/O done by an independent vhost-user client
//! (libblkio, see tests/common). Every wait is bounded and every child process is killed by a
//! guard when a test fails.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{create_qcow2, is_socket, pattern, qemu_img, run_bin, Client, ClientOpts, Proc};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
const WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

// ---------------------------------------------------------------------------------------------
// A daemon with a control socket, and a control client
// ---------------------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
    daemon: Proc,
}

/// Creates a `size`-byte raw image (filled with pattern 7) and serves it with two queues and a
/// control socket, plus `extra` options.
fn setup(size: u64, extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = common::create_image(dir.path(), "disk.img", size, Some(7));
    let mut args = vec!["--format", "raw"];
    args.extend_from_slice(extra);
    serve(dir, image, &args)
}

/// Serves `image` with `args` (plus socket paths, two queues and -v).
fn serve(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Setup {
    let sock = dir.path().join("vub.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .arg("--blk-file")
        .arg(&image)
        .args(["--num-queues", "2", "-v"])
        .args(args);
    let mut daemon = Proc::spawn(cmd, dir.path(), "daemon");
    daemon.wait_for_socket(&sock);
    daemon.wait_for_socket(&ctl);
    Setup {
        dir,
        image,
        sock,
        ctl,
        daemon,
    }
}

/// One control-socket connection.
struct Ctl {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Ctl {
    #[track_caller]
    fn connect(path: &Path) -> Ctl {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Ctl { stream, reader }
    }

    /// Reads one reply line (bounded by the read timeout); `None` at end of stream.
    #[track_caller]
    fn read_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading a control reply: {e}"));
        if n == 0 {
            return None;
        }
        assert!(
            line.ends_with('\n'),
            "reply not newline-terminated: {line:?}"
        );
        assert_eq!(
            line.trim_end_matches('\n').lines().count(),
            1,
            "reply spans lines: {line:?}"
        );
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"));
        assert!(v["ok"].is_boolean(), "reply without a boolean 'ok': {v}");
        Some(v)
    }

    /// Sends raw bytes (a newline is not added) and reads one reply.
    #[track_caller]
    fn raw(&mut self, bytes: &[u8]) -> Value {
        self.stream
            .write_all(bytes)
            .expect("write to the control socket");
        self.read_reply()
            .unwrap_or_else(|| panic!("control socket closed instead of answering {bytes:?}"))
    }

    #[track_caller]
    fn req(&mut self, v: Value) -> Value {
        let mut line = v.to_string();
        line.push('\n');
        self.raw(line.as_bytes())
    }

    /// Sends a request that must succeed; returns its `result`.
    #[track_caller]
    fn ok(&mut self, v: Value) -> Value {
        let r = self.req(v.clone());
        assert_eq!(r["ok"], json!(true), "request {v} failed: {r}");
        assert!(r.get("result").is_some(), "success without a result: {r}");
        r["result"].clone()
    }

    /// Sends a line that must be refused; returns the error message.
    #[track_caller]
    fn refused(&mut self, line: &[u8]) -> String {
        let r = self.raw(line);
        assert_eq!(
            r["ok"],
            json!(false),
            "{:?} was accepted: {r}",
            String::from_utf8_lossy(line)
        );
        let e = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error reply without an error string: {r}"))
            .to_owned();
        assert!(!e.is_empty() && !e.contains('\n'), "error message {e:?}");
        e
    }

    /// True when the daemon has closed the connection (end of stream, or a reset because it
    /// closed with bytes of ours still unread).
    fn closed(&mut self) -> bool {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    fn stats(&mut self) -> Value {
        self.ok(json!({"command": "stats"}))
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{v} is not an unsigned integer"))
}

/// A blkio client with `queues` queues.
fn client(sock: &Path, queues: i32) -> Client {
    Client::new(
        sock,
        &ClientOpts {
            num_queues: queues,
            ..ClientOpts::default()
        },
    )
}

/// Checks the vhost-user socket still serves I/O: a fresh client writes and reads back.
#[track_caller]
fn assert_serves_io(sock: &Path, offset: u64) {
    let mut c = client(sock, 1);
    let data = pattern(99, offset, 4096);
    c.q(0).write_ok(offset, &data);
    let got = c.q(0).read_ok(offset, 4096);
    common::assert_bytes_eq(
        &got,
        &data,
        offset,
        "read back after a control-socket error",
    );
}

// ---------------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------------

#[test]
fn stats_count_the_io_a_client_does() {
    let mut s = setup(16 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);

    let before = ctl.stats();
    assert_eq!(before["connected"], json!(false), "{before}");
    assert_eq!(before["image"]["format"], json!("raw"));
    assert_eq!(n(&before["image"]["virtual_size"]), 16 * MIB);
    assert_eq!(before["image"]["read_only"], json!(false));
    assert!(before["uptime_s"].as_f64().unwrap() >= 0.0);
    let queues = before["queues"].as_array().expect("queues array");
    assert_eq!(queues.len(), 2, "one entry per queue: {before}");
    for (i, q) in queues.iter().enumerate() {
        assert_eq!(n(&q["queue"]), i as u64);
        for k in ["read", "write", "flush", "discard", "write_zeroes", "other"] {
            assert_eq!(n(&q["requests"][k]), 0, "queue {i} {k} before any I/O");
        }
        assert_eq!(n(&q["in_flight"]), 0);
        assert_eq!(q["latency_us"]["p50"].as_f64(), Some(0.0), "no samples yet");
    }

    let mut c = client(&s.sock, 2);
    let during = ctl.stats();
    assert_eq!(during["connected"], json!(true), "{during}");

    // Queue 0: 5 writes of 4 KiB, 3 reads of 8 KiB, 1 flush.
    for i in 0..5u64 {
        c.q(0).write_ok(i * 4096, &pattern(1, i * 4096, 4096));
    }
    for i in 0..3u64 {
        c.q(0).read_ok(i * 8192, 8192);
    }
    assert_eq!(c.q(0).flush().ret, 0, "guest flush");
    // Queue 1: 2 writes of 64 KiB, 4 reads of 512 bytes, issued as one batch.
    let mut reqs = Vec::new();
    for i in 0..2u64 {
        let off = MIB + i * 65536;
        reqs.push(common::Req::Write {
            offset: off,
            data: pattern(2, off, 65536),
            flags: blkio::ReqFlags::empty(),
        });
    }
    for i in 0..4u64 {
        reqs.push(common::Req::Read {
            offset: 2 * MIB + i * 512,
            len: 512,
        });
    }
    for (d, _) in c.q(1).batch(&reqs) {
        assert_eq!(d.ret, 0, "queue 1 request failed: {}", d.errno_name());
    }

    let after = ctl.stats();
    let q0 = &after["queues"][0];
    let q1 = &after["queues"][1];
    let expect = [
        // (queue, reads, writes, flushes, bytes read, bytes written)
        (q0, 3, 5, 1, 3 * 8192, 5 * 4096),
        (q1, 4, 2, 0, 4 * 512, 2 * 65536),
    ];
    for (i, (q, r, w, f, br, bw)) in expect.into_iter().enumerate() {
        assert_eq!(n(&q["requests"]["read"]), r, "queue {i} reads: {q}");
        assert_eq!(n(&q["requests"]["write"]), w, "queue {i} writes: {q}");
        assert_eq!(n(&q["requests"]["flush"]), f, "queue {i} flushes: {q}");
        assert_eq!(n(&q["requests"]["discard"]), 0, "queue {i}: {q}");
        assert_eq!(n(&q["bytes_read"]), br, "queue {i} bytes read: {q}");
        assert_eq!(n(&q["bytes_written"]), bw, "queue {i} bytes written: {q}");
        assert_eq!(n(&q["errors"]), 0, "queue {i} errors: {q}");
        assert_eq!(n(&q["dropped"]), 0, "queue {i} dropped: {q}");
        assert_eq!(
            n(&q["in_flight"]),
            0,
            "queue {i} in flight after completion: {q}"
        );
        let lat = &q["latency_us"];
        let (p50, p99, p999) = (
            lat["p50"].as_f64().unwrap(),
            lat["p99"].as_f64().unwrap(),
            lat["p99.9"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0, "queue {i} p50 latency is zero after I/O: {lat}");
        assert!(
            p50 <= p99 && p99 <= p999,
            "queue {i} quantiles not ordered: {lat}"
        );
    }
    let total = |key: &str| -> u64 {
        after["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| n(&q[key]))
            .sum()
    };
    assert_eq!(total("bytes_read"), 3 * 8192 + 4 * 512);
    assert_eq!(total("bytes_written"), 5 * 4096 + 2 * 65536);
    assert!(
        n(&after["image"]["flushes"]) > n(&before["image"]["flushes"]),
        "the guest flush is counted in image.flushes: {after}"
    );
    assert!(
        after["image"]["details"]["allocated_bytes"]
            .as_u64()
            .is_some(),
        "raw images report allocated bytes: {after}"
    );

    // The counters outlive the connection and accumulate over the next one.
    drop(c);
    let mut c = client(&s.sock, 1);
    c.q(0).read_ok(0, 4096);
    let later = ctl.stats();
    assert_eq!(n(&later["queues"][0]["requests"]["read"]), 4, "{later}");
    assert_eq!(n(&later["queues"][0]["bytes_read"]), 3 * 8192 + 4096);
    drop(c);
    s.daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// flush
// ---------------------------------------------------------------------------------------------

#[test]
fn flush_succeeds_and_is_counted() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    let before = ctl.stats();
    assert!(
        before["image"]["seconds_since_last_flush"].is_null(),
        "no flush yet: {before}"
    );
    let f0 = n(&before["image"]["flushes"]);

    assert_eq!(ctl.ok(json!({"command": "flush"})), json!({}));
    let after = ctl.stats();
    assert_eq!(n(&after["image"]["flushes"]), f0 + 1, "{after}");
    let age = after["image"]["seconds_since_last_flush"]
        .as_f64()
        .unwrap_or_else(|| panic!("seconds_since_last_flush after a flush: {after}"));
    assert!(age >= 0.0);

    // Data a client wrote is in the file after a control flush, while the client is connected.
    let mut c = client(&s.sock, 1);
    let data = pattern(5, 8192, 4096);
    c.q(0).write_ok(8192, &data);
    ctl.ok(json!({"command": "flush"}));
    assert_eq!(n(&ctl.stats()["image"]["flushes"]), f0 + 2);
    let file = common::read_file(&s.image);
    common::assert_bytes_eq(&file[8192..12288], &data, 8192, "image file after flush");
    drop(c);
    s.daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// resize
// ---------------------------------------------------------------------------------------------

#[test]
fn resize_grows_a_raw_image_and_new_clients_see_it() {
    let mut s = setup(8 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    let old = common::read_file(&s.image);

    // With a client connected: libblkio does not negotiate BACKEND_REQ, so the daemon has no
    // channel to tell it about the change; the reply says so.
    let c = client(&s.sock, 1);
    assert_eq!(c.get_u64("capacity"), 8 * MIB);
    let r = ctl.ok(json!({"command": "resize", "size": 16 * MIB}));
    assert_eq!(n(&r["size"]), 16 * MIB, "{r}");
    assert_eq!(n(&r["previous_size"]), 8 * MIB, "{r}");
    assert_eq!(r["frontend_notified"], json!(false), "{r}");
    assert_eq!(
        fs::metadata(&s.image).unwrap().len(),
        16 * MIB,
        "file grown"
    );
    assert_eq!(n(&ctl.stats()["image"]["virtual_size"]), 16 * MIB);
    drop(c);

    // A client connecting afterwards sees the new capacity and can use the new space.
    let mut c = client(&s.sock, 1);
    assert_eq!(c.get_u64("capacity"), 16 * MIB, "capacity after resize");
    let tail = 16 * MIB - 4096;
    assert_eq!(
        c.q(0).read_ok(tail, 4096),
        vec![0u8; 4096],
        "grown area reads as zeros"
    );
    let data = pattern(3, tail, 4096);
    c.q(0).write_ok(tail, &data);
    common::assert_bytes_eq(&c.q(0).read_ok(tail, 4096), &data, tail, "new area");
    let head = c.q(0).read_all(0, 8 * MIB);
    common::assert_bytes_eq(&head, &old, 0, "old contents after resize");

    // Refusals leave everything as it was.
    let e = ctl.refused(format!("{}\n", json!({"command": "resize", "size": 8 * MIB})).as_bytes());
    assert!(e.contains("shrink"), "shrinking: {e}");
    let e = ctl
        .refused(format!("{}\n", json!({"command": "resize", "size": 32 * MIB + 100})).as_bytes());
    assert!(e.contains("multiple of"), "unaligned size: {e}");
    let e = ctl.refused(b"{\"command\":\"resize\"}\n");
    assert!(e.contains("size"), "missing size: {e}");
    let e = ctl.refused(b"{\"command\":\"resize\",\"size\":-1}\n");
    assert!(e.starts_with("bad request"), "negative size: {e}");
    let e = ctl.refused(b"{\"command\":\"resize\",\"size\":\"20G\"}\n");
    assert!(e.starts_with("bad request"), "size as a string: {e}");
    assert_eq!(fs::metadata(&s.image).unwrap().len(), 16 * MIB);
    assert_eq!(n(&ctl.stats()["image"]["virtual_size"]), 16 * MIB);

    // The same size again is accepted and changes nothing.
    let r = ctl.ok(json!({"command": "resize", "size": 16 * MIB}));
    assert_eq!(n(&r["previous_size"]), 16 * MIB);
    assert_eq!(fs::metadata(&s.image).unwrap().len(), 16 * MIB);
    drop(c);
    s.daemon.terminate_ok();
    assert_eq!(
        fs::metadata(&s.image).unwrap().len(),
        16 * MIB,
        "size after shutdown"
    );
}

#[test]
fn resize_respects_block_size_and_read_only() {
    let mut s = setup(8 * MIB, &["--logical-block-size", "4096"]);
    let mut ctl = Ctl::connect(&s.ctl);
    let e = ctl
        .refused(format!("{}\n", json!({"command": "resize", "size": 8 * MIB + 512})).as_bytes());
    assert!(
        e.contains("4096"),
        "size not a multiple of the logical block size: {e}"
    );
    ctl.ok(json!({"command": "resize", "size": 8 * MIB + 4096}));
    assert_eq!(fs::metadata(&s.image).unwrap().len(), 8 * MIB + 4096);
    s.daemon.terminate_ok();

    let mut s = setup(8 * MIB, &["--read-only"]);
    let mut ctl = Ctl::connect(&s.ctl);
    let e = ctl.refused(format!("{}\n", json!({"command": "resize", "size": 16 * MIB})).as_bytes());
    assert!(e.contains("read-only"), "read-only disk: {e}");
    assert_eq!(fs::metadata(&s.image).unwrap().len(), 8 * MIB);
    s.daemon.terminate_ok();
}

/// `qemu-img info --output=json` of an image.
fn qemu_img_info(image: &Path) -> Value {
    let out = qemu_img(&["info".as_ref(), "--output=json".as_ref(), image.as_os_str()]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

#[test]
fn resize_grows_a_qcow2_image_online() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = image.to_str().unwrap();
    create_qcow2(img, "", "16M");
    let mut s = serve(dir, image, &["--format", "qcow2"]);
    let mut ctl = Ctl::connect(&s.ctl);
    assert_eq!(ctl.stats()["image"]["format"], json!("qcow2"));

    // Shrinking is refused with a one-line error and changes nothing.
    let r = ctl.req(json!({"command": "resize", "size": 8 * MIB}));
    assert_eq!(r["ok"], json!(false), "{r}");
    assert_eq!(n(&ctl.stats()["image"]["virtual_size"]), 16 * MIB);

    let r = ctl.req(json!({"command": "resize", "size": 32 * MIB}));
    assert_eq!(r["ok"], json!(true), "qcow2 resize: {r}");
    assert_eq!(n(&r["result"]["size"]), 32 * MIB, "{r}");
    assert_eq!(n(&ctl.stats()["image"]["virtual_size"]), 32 * MIB);
    let mut c = client(&s.sock, 1);
    assert_eq!(c.get_u64("capacity"), 32 * MIB);
    let off = 32 * MIB - 4096;
    let data = pattern(8, off, 4096);
    c.q(0).write_ok(off, &data);
    common::assert_bytes_eq(&c.q(0).read_ok(off, 4096), &data, off, "qcow2 grown area");
    drop(c);
    s.daemon.terminate_ok();
    let info = qemu_img_info(&s.image);
    assert_eq!(
        n(&info["virtual-size"]),
        32 * MIB,
        "qemu-img sees the new size"
    );
    // `qemu-img check` exits non-zero on errors and on leaks.
    qemu_img(&["check".as_ref(), s.image.as_os_str()]);
}

/// `stats` on a qcow2 image shows the guest data it holds next to the host space it takes:
/// both grow with allocating writes and drop once a discard has been flushed.
#[test]
fn qcow2_stats_show_data_and_the_space_a_discard_gives_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(image.to_str().unwrap(), "", "64M");
    let s = serve(dir, image, &["--format", "qcow2"]);
    let mut ctl = Ctl::connect(&s.ctl);
    let details = |ctl: &mut Ctl| ctl.stats()["image"]["details"].clone();
    let empty = details(&mut ctl);
    assert_eq!(n(&empty["data_bytes"]), 0, "{empty}");

    let mut c = client(&s.sock, 1);
    for i in 0..32u64 {
        c.q(0)
            .write_ok(i * 256 * 1024, &pattern(9, i * 256 * 1024, 256 * 1024));
    }
    assert_eq!(c.q(0).flush().ret, 0);
    let full = details(&mut ctl);
    assert_eq!(n(&full["data_bytes"]), 8 * MIB, "8 MiB written: {full}");
    assert!(n(&full["allocated_bytes"]) >= 8 * MIB, "{full}");

    assert_eq!(c.q(0).discard(0, 6 * MIB).ret, 0);
    for _ in 0..2 {
        assert_eq!(c.q(0).flush().ret, 0);
    }
    let after = details(&mut ctl);
    assert_eq!(
        n(&after["data_bytes"]),
        2 * MIB,
        "6 of 8 MiB discarded: {after}"
    );
    assert!(
        n(&after["allocated_bytes"]) + 5 * MIB <= n(&full["allocated_bytes"]),
        "host space not given back: {full} -> {after}"
    );
}

// ---------------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn qcow2_bitmaps_track_client_writes_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = image.to_str().unwrap();
    create_qcow2(img, "", "16M");
    qemu_img(&["bitmap", "--add", img, "backup-0"]);
    let mut s = serve(dir, image, &["--format", "qcow2"]);
    let mut ctl = Ctl::connect(&s.ctl);
    let list = |ctl: &mut Ctl| ctl.ok(json!({"command": "bitmaps"}))["bitmaps"].clone();
    assert_eq!(
        list(&mut ctl),
        json!([{"name": "backup-0", "granularity": 65536, "enabled": true,
                "inconsistent": false, "dirty_bytes": 0}])
    );
    let mut c = client(&s.sock, 1);
    c.q(0).write_ok(MIB, &pattern(1, MIB, 4096));
    c.q(0).write_ok(5 * MIB + 4096, &pattern(2, 5 * MIB, 65536));
    // 64 KiB granules: one for the first write, two for the unaligned second.
    assert_eq!(list(&mut ctl)[0]["dirty_bytes"], json!(3 * 65536));
    assert_eq!(
        ctl.ok(json!({"command": "bitmap-clear", "name": "backup-0"})),
        json!({})
    );
    assert_eq!(list(&mut ctl)[0]["dirty_bytes"], json!(0));
    c.q(0).write_ok(0, &pattern(3, 0, 512));
    assert_eq!(list(&mut ctl)[0]["dirty_bytes"], json!(65536));
    // `ctl bitmaps` prints a table; `--json` (before or after the action) the result.
    let p = s.ctl.to_str().unwrap().to_owned();
    let ctl_bin = |args: &[&str]| {
        let mut all = vec!["ctl", "--control-socket", &p];
        all.extend_from_slice(args);
        let (st, out, err) = run_bin(s.dir.path(), &all);
        assert!(st.success(), "ctl {args:?}: {st}: {err}");
        out
    };
    let table = ctl_bin(&["bitmaps"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "name",
                "granularity",
                "enabled",
                "inconsistent",
                "dirty",
                "bytes"
            ],
            vec!["backup-0", "65536", "yes", "no", "65536"],
        ],
        "{table}"
    );
    for args in [&["--json", "bitmaps"][..], &["bitmaps", "--json"]] {
        let out = ctl_bin(args);
        let v: Value = serde_json::from_str(out.trim()).expect("ctl bitmaps --json prints JSON");
        assert_eq!(
            v["bitmaps"][0]["dirty_bytes"],
            json!(65536),
            "{args:?}: {out}"
        );
    }
    drop(c);
    s.daemon.terminate_ok();
    let info = qemu_img_info(&s.image);
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["flags"],
        json!(["auto"]),
        "stored at shutdown, not left in use: {info}"
    );
}

#[test]
fn bad_requests_get_error_replies_and_the_daemon_keeps_serving() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    let cases: &[(&[u8], &str)] = &[
        (b"this is not json\n", "bad request"),
        (b"{\"command\": \"stats\"\n", "bad request"),
        (b"[]\n", "bad request"),
        (b"null\n", "bad request"),
        (b"42\n", "bad request"),
        (b"{}\n", "command"),
        (b"{\"command\": \"reboot\"}\n", "unknown variant"),
        (b"{\"command\": 7}\n", "bad request"),
        (b"{\"command\": \"STATS\"}\n", "unknown variant"),
        (
            b"{\"command\": \"stats\", \"verbose\": true}\n",
            "unknown field",
        ),
        (
            b"{\"command\": \"resize\", \"size\": 1, \"force\": true}\n",
            "unknown field",
        ),
        (
            b"{\"command\": \"stats\", \"format\": \"xml\"}\n",
            "unknown stats format",
        ),
        (
            b"{\"command\": \"bitmap-clear\", \"name\": \"nope\"}\n",
            "nope",
        ),
    ];
    for (line, want) in cases {
        let e = ctl.refused(line);
        assert!(
            e.contains(want),
            "{:?}: error {e:?} should mention {want:?}",
            String::from_utf8_lossy(line)
        );
        // Still the same connection, still answering.
        ctl.stats();
    }
    // Blank lines are skipped without a reply: the next reply belongs to the next request.
    let r = ctl.raw(b"\n  \n{\"command\":\"bitmaps\"}\n");
    assert_eq!(r, json!({"ok": true, "result": {"bitmaps": []}}));
    // Several requests in one write get one reply each, in order.
    ctl.stream
        .write_all(b"{\"command\":\"flush\"}\nnonsense\n{\"command\":\"bitmaps\"}\n")
        .unwrap();
    assert_eq!(ctl.read_reply().unwrap()["ok"], json!(true));
    assert_eq!(ctl.read_reply().unwrap()["ok"], json!(false));
    assert_eq!(ctl.read_reply().unwrap()["ok"], json!(true));

    s.daemon.assert_running();
    assert_serves_io(&s.sock, 0);
    s.daemon.terminate_ok();
}

/// Every key of a request is checked, also for commands without parameters.
#[test]
fn unknown_fields_on_parameterless_commands_are_refused() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    for line in [
        &b"{\"command\": \"flush\", \"bogus\": 1}\n"[..],
        b"{\"command\": \"bitmaps\", \"bogus\": 1}\n",
    ] {
        let r = ctl.raw(line);
        assert_eq!(
            r["ok"],
            json!(false),
            "{:?} must be refused (unknown field), got {r}",
            String::from_utf8_lossy(line)
        );
    }
    s.daemon.terminate_ok();
}

/// Bytes that are not UTF-8 are a malformed request like any other: an error reply, and the
/// connection stays open (src/control/server.rs: "A malformed line gets an error reply and the
/// connection stays open").
#[test]
fn invalid_utf8_gets_an_error_reply_and_the_connection_stays_open() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    ctl.stream
        .write_all(b"{\"command\": \"\xff\xfe\"}\n")
        .unwrap();
    let r = ctl.read_reply();
    assert!(
        matches!(&r, Some(v) if v["ok"] == json!(false)),
        "a line that is not UTF-8 got {r:?} instead of an error reply"
    );
    ctl.stats();
    s.daemon.terminate_ok();
}

#[test]
fn line_length_limit_is_64_kib() {
    let mut s = setup(4 * MIB, &[]);
    const LIMIT: usize = 64 * 1024;

    // Exactly 64 KiB including the newline: accepted.
    let mut ctl = Ctl::connect(&s.ctl);
    let mut line = br#"{"command": "stats"}"#.to_vec();
    line.resize(LIMIT - 1, b' ');
    line.push(b'\n');
    let r = ctl.raw(&line);
    assert_eq!(r["ok"], json!(true), "a 64 KiB line is accepted: {r}");

    // One byte more: refused, and that connection is closed.
    let mut line = br#"{"command": "stats"}"#.to_vec();
    line.resize(LIMIT, b' ');
    line.push(b'\n');
    let e = ctl.refused(&line);
    assert!(e.contains("longer than 65536"), "{e}");
    assert!(ctl.closed(), "connection closed after an over-long line");

    // A huge line without a newline at all: the daemon does not buffer it all.
    let mut ctl = Ctl::connect(&s.ctl);
    let big = vec![b'x'; 1 << 20];
    let writer = {
        let mut w = ctl.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            // Fails with EPIPE/ECONNRESET once the daemon hangs up; that is expected.
            let _ = w.write_all(&big);
        })
    };
    let r = ctl.read_reply().expect("an error reply to a 1 MiB line");
    assert_eq!(r["ok"], json!(false), "{r}");
    writer.join().unwrap();

    // Other connections and the disk are unaffected.
    Ctl::connect(&s.ctl).stats();
    s.daemon.assert_running();
    assert_serves_io(&s.sock, 0);
    s.daemon.terminate_ok();
}

#[test]
fn at_most_16_control_clients() {
    let mut s = setup(4 * MIB, &[]);
    let mut conns: Vec<Ctl> = (0..16).map(|_| Ctl::connect(&s.ctl)).collect();
    for c in conns.iter_mut() {
        c.stats();
    }
    let mut extra = Ctl::connect(&s.ctl);
    let r = extra
        .read_reply()
        .expect("a reply before the connection is closed");
    assert_eq!(r, json!({"ok": false, "error": "too many control clients"}));
    assert!(extra.closed());

    // Once a client leaves, a new one is served (the slot is freed when its thread ends).
    drop(conns.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        // Until the slot is freed the daemon answers "too many control clients" and closes at
        // once, so the request may meet a closed socket (EPIPE on write, ECONNRESET on read
        // because the daemon closed with our request unread): both count as "not yet".
        let c = Ctl::connect(&s.ctl);
        let mut stream = &c.stream;
        let mut reply = String::new();
        let served = stream.write_all(b"{\"command\": \"stats\"}\n").is_ok()
            && BufReader::new(stream).read_line(&mut reply).is_ok()
            && serde_json::from_str::<Value>(&reply).is_ok_and(|v| v["ok"] == json!(true));
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no control slot freed: last reply {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conns);
    s.daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// One Prometheus sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks the text exposition format line by line and returns the samples.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        matches!(chars.next(), Some(c) if ok_first(c))
            && chars.all(|c| ok_first(c) || c.is_ascii_digit())
    }
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kw = parts.next().unwrap();
            let name = parts.next().unwrap_or_default();
            let arg = parts.next().unwrap_or_default();
            assert!(is_name(name, true), "comment names a bad metric: {line:?}");
            match kw {
                "HELP" => assert!(!arg.is_empty(), "empty HELP: {line:?}"),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "summary", "histogram", "untyped"].contains(&arg),
                        "bad TYPE: {line:?}"
                    );
                    typed.insert(name.to_owned());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "malformed comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?} is not a number"));
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, after) = rest
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(is_name(k, false), "bad label name {k:?} in {line:?}");
                    let end = after
                        .find('"')
                        .unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
                    labels.push((k.to_owned(), after[..end].to_owned()));
                    rest = &after[end + 1..];
                    if let Some(r) = rest.strip_prefix(',') {
                        rest = r;
                    } else {
                        assert!(rest.is_empty(), "junk after a label in {line:?}");
                    }
                }
                (name, labels)
            }
        };
        assert!(is_name(name, true), "bad metric name in {line:?}");
        assert!(
            typed.contains(name),
            "sample before its # TYPE line: {line:?}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .2
}

#[test]
fn prometheus_output_parses_and_matches_the_io() {
    let mut s = setup(4 * MIB, &[]);
    let mut c = client(&s.sock, 2);
    for i in 0..3u64 {
        c.q(1).write_ok(i * 4096, &pattern(4, i * 4096, 4096));
    }
    c.q(0).read_ok(0, 65536);
    let mut ctl = Ctl::connect(&s.ctl);
    let text = ctl.ok(json!({"command": "stats", "format": "prometheus"}));
    let text = text.as_str().expect("prometheus result is a string");
    let samples = parse_prometheus(text);
    let req = "vhost_user_blk_requests_total";
    assert_eq!(
        sample(&samples, req, &[("queue", "1"), ("kind", "write")]),
        3.0
    );
    assert_eq!(
        sample(&samples, req, &[("queue", "0"), ("kind", "read")]),
        1.0
    );
    assert_eq!(
        sample(&samples, req, &[("queue", "0"), ("kind", "write")]),
        0.0
    );
    assert_eq!(
        sample(
            &samples,
            "vhost_user_blk_written_bytes_total",
            &[("queue", "1")]
        ),
        3.0 * 4096.0
    );
    assert_eq!(
        sample(
            &samples,
            "vhost_user_blk_read_bytes_total",
            &[("queue", "0")]
        ),
        65536.0
    );
    assert_eq!(
        sample(&samples, "vhost_user_blk_in_flight", &[("queue", "0")]),
        0.0
    );
    assert!(
        sample(
            &samples,
            "vhost_user_blk_latency_seconds",
            &[("queue", "1"), ("quantile", "0.5")]
        ) > 0.0
    );
    assert_eq!(
        sample(&samples, "vhost_user_blk_virtual_size_bytes", &[]),
        (4 * MIB) as f64
    );

    // `ctl stats --format prometheus` prints the same text.
    let ctl_path = s.ctl.to_str().unwrap().to_owned();
    let (st, out, err) = run_bin(
        s.dir.path(),
        &[
            "ctl",
            "--control-socket",
            &ctl_path,
            "stats",
            "--format",
            "prometheus",
        ],
    );
    assert!(st.success(), "ctl stats --format prometheus: {st} {err}");
    let samples = parse_prometheus(&out);
    assert_eq!(
        sample(&samples, req, &[("queue", "1"), ("kind", "write")]),
        3.0
    );
    drop(c);
    s.daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// The ctl client
// ---------------------------------------------------------------------------------------------

#[test]
fn ctl_subcommand_talks_to_the_daemon() {
    let mut s = setup(16 * MIB, &[]);
    let p = s.ctl.to_str().unwrap().to_owned();
    let dir = s.dir.path().to_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--control-socket", &p];
        all.extend_from_slice(args);
        run_bin(&dir, &all)
    };

    let mut c = client(&s.sock, 1);
    for i in 0..4u64 {
        c.q(0).write_ok(i * 4096, &pattern(6, i * 4096, 4096));
    }

    // Table.
    let (st, out, err) = ctl(&["stats"]);
    assert!(st.success(), "ctl stats: {st}: {err}");
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("raw disk, 16777216 bytes, frontend connected; flushes "),
        "summary line: {out}"
    );
    assert!(
        out.contains("\nimage: allocated_bytes "),
        "image line: {out}"
    );
    let header = out
        .lines()
        .find(|l| l.trim_start().starts_with("queue"))
        .unwrap_or_else(|| panic!("no header line: {out}"));
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "queue", "reads", "writes", "flushes", "discards", "wzeroes", "rd", "MiB", "wr", "MiB",
            "errors", "infl", "p50", "us", "p99", "us", "p99.9", "us"
        ]
    );
    // Only queues that did something are listed: queue 0 with 4 writes.
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("queue"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 1, "one active queue: {out}");
    assert_eq!(
        &rows[0][..3],
        ["0", "0", "4"],
        "queue 0: 0 reads, 4 writes: {out}"
    );

    // JSON.
    let (st, out, err) = ctl(&["--json", "stats"]);
    assert!(st.success(), "ctl --json stats: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("ctl --json stats prints JSON");
    assert_eq!(n(&v["queues"][0]["requests"]["write"]), 4);
    assert_eq!(out.trim().lines().count(), 1, "one line of JSON");
    // --json after the action, as the README writes it, does the same.
    let (st, out, err) = ctl(&["stats", "--json"]);
    assert!(st.success(), "ctl stats --json: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("ctl stats --json prints JSON");
    assert_eq!(n(&v["queues"][0]["requests"]["write"]), 4);
    assert_eq!(out.trim().lines().count(), 1, "one line of JSON");

    // flush.
    let (st, out, err) = ctl(&["flush"]);
    assert!(st.success(), "ctl flush: {err}");
    assert_eq!(out.trim(), "{}");
    let (st, out, _) = ctl(&["--json", "flush"]);
    assert!(st.success());
    assert_eq!(out.trim(), "{}");

    // resize 128M.
    let (st, out, err) = ctl(&["resize", "128M"]);
    assert!(st.success(), "ctl resize 128M: {err}");
    let v: Value = serde_json::from_str(&out).expect("ctl resize prints JSON");
    assert_eq!(n(&v["size"]), 128 * MIB);
    assert_eq!(n(&v["previous_size"]), 16 * MIB);
    assert_eq!(fs::metadata(&s.image).unwrap().len(), 128 * MIB);

    // A refusal: exit 1, one line on stderr, nothing on stdout.
    let (st, out, err) = ctl(&["resize", "64M"]);
    assert_eq!(st.code(), Some(1), "ctl resize 64M (shrink): {err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "one-line error: {err:?}");
    assert!(
        err.starts_with("vhost-user-blk ctl: error: ")
            && err.contains("daemon refused: shrinking is refused"),
        "{err}"
    );

    // bitmaps on a raw image.
    let (st, out, _) = ctl(&["--json", "bitmaps"]);
    assert!(st.success());
    assert_eq!(out.trim(), r#"{"bitmaps":[]}"#);
    let (st, out, _) = ctl(&["bitmaps"]);
    assert!(st.success());
    assert_eq!(out, "no persistent dirty bitmaps\n");

    // A bad size is a command-line error (exit 2) and never reaches the daemon.
    let (st, _, err) = ctl(&["resize", "12Q"]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("12Q"), "{err}");

    // No daemon at that path: exit 1 with one line naming the socket.
    let missing = dir.join("nobody-here.sock");
    let (st, out, err) = run_bin(
        &dir,
        &[
            "ctl",
            "--control-socket",
            missing.to_str().unwrap(),
            "stats",
        ],
    );
    assert_eq!(st.code(), Some(1), "ctl against a missing socket: {err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "one-line error: {err:?}");
    assert!(
        err.starts_with("vhost-user-blk ctl: error: control socket ")
            && err.contains("nobody-here.sock")
            && err.contains("No such file"),
        "{err}"
    );
    drop(c);
    s.daemon.terminate_ok();
}

#[test]
fn ctl_watch_refreshes_with_rates() {
    let mut s = setup(4 * MIB, &[]);
    let mut cmd = Command::new(BIN);
    cmd.arg("ctl")
        .arg("--control-socket")
        .arg(&s.ctl)
        .arg("watch");
    let mut w = Proc::spawn(cmd, s.dir.path(), "watch");
    // stdout is line-buffered: wait until the header and both queue rows are there.
    let table_rows = |out: &str| -> Option<Vec<String>> {
        let header = out.lines().position(|l| l.contains("reads/s"))?;
        let rows: Vec<String> = out
            .lines()
            .skip(header + 1)
            .take(2)
            .map(String::from)
            .collect();
        (rows.len() == 2).then_some(rows)
    };
    let deadline = Instant::now() + WAIT;
    let rows = loop {
        if let Some(rows) = table_rows(&w.stdout()) {
            break rows;
        }
        assert!(w.try_wait().is_none(), "ctl watch exited: {}", w.stderr());
        assert!(
            Instant::now() < deadline,
            "no table from ctl watch: {:?}",
            w.stdout()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = w.stdout();
    assert!(
        out.starts_with("\x1b[2J\x1b[H"),
        "clears the screen: {out:?}"
    );
    // With rates every queue is listed, busy or not.
    assert!(rows[0].trim_start().starts_with('0'), "{out:?}");
    assert!(rows[1].trim_start().starts_with('1'), "{out:?}");
    w.signal(libc::SIGTERM);
    w.wait_exit("SIGTERM to ctl watch");

    // When the daemon goes away, watch ends with an error instead of spinning.
    let mut cmd = Command::new(BIN);
    cmd.arg("ctl")
        .arg("--control-socket")
        .arg(&s.ctl)
        .arg("watch");
    let mut w = Proc::spawn(cmd, s.dir.path(), "watch2");
    s.daemon.terminate_ok();
    let st = w.wait_exit("daemon gone");
    assert_eq!(st.code(), Some(1), "{}", w.stderr());
}

// ---------------------------------------------------------------------------------------------
// Sockets: permissions, --fd, systemd socket activation
// ---------------------------------------------------------------------------------------------

#[test]
fn sockets_are_0600_by_default_and_each_has_its_own_mode() {
    let mut s = setup(MIB, &[]);
    assert_eq!(mode_of(&s.sock), 0o600, "vhost-user socket");
    assert_eq!(mode_of(&s.ctl), 0o600, "control socket");
    s.daemon.terminate_ok();
    assert!(
        !s.sock.exists() && !s.ctl.exists(),
        "sockets removed on exit"
    );

    // Each socket has its own mode: --socket-mode (which the VMM's user may need) does not
    // reach the control socket, nor --control-socket-mode the vhost-user socket.
    for (args, sock_mode, ctl_mode) in [
        (["--socket-mode", "0660"], 0o660, 0o600),
        (["--control-socket-mode", "0640"], 0o600, 0o640),
    ] {
        let mut s = setup(MIB, &args);
        assert_eq!(
            (mode_of(&s.sock), mode_of(&s.ctl)),
            (sock_mode, ctl_mode),
            "(vhost-user, control) socket modes with {args:?}"
        );
        // No temporary names are left next to them.
        let names: Vec<String> = fs::read_dir(s.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "leftover temporary sockets: {names:?}");
        s.daemon.terminate_ok();
    }
}

/// Clears FD_CLOEXEC on `fd` (in a pre_exec hook: async-signal-safe calls only).
fn clear_cloexec(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn fd_option_serves_an_inherited_listener() {
    let dir = tempfile::tempdir().unwrap();
    let image = common::create_image(dir.path(), "disk.img", 4 * MIB, Some(9));
    let sock = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.arg("--fd")
        .arg(fd.to_string())
        .arg("--blk-file")
        .arg(&image)
        .args(["--format", "raw", "--num-queues", "1"]);
    // SAFETY: the hook only calls fcntl.
    unsafe { cmd.pre_exec(move || clear_cloexec(fd)) };
    let mut d = Proc::spawn(cmd, dir.path(), "daemon");
    let mut c = client(&sock, 1);
    assert_eq!(c.get_u64("capacity"), 4 * MIB);
    let expect = pattern(9, 0, 4096);
    common::assert_bytes_eq(&c.q(0).read_ok(0, 4096), &expect, 0, "read through --fd");
    drop(c);
    assert!(
        d.stderr().contains(&format!("on fd {fd}")),
        "{}",
        d.stderr()
    );
    d.terminate_ok();
    // The daemon did not create the path, so it leaves it alone.
    assert!(
        is_socket(&sock),
        "the inherited socket's path must not be removed"
    );
}

#[test]
fn systemd_socket_activation() {
    let dir = tempfile::tempdir().unwrap();
    let image = common::create_image(dir.path(), "disk.img", 4 * MIB, Some(10));
    let sock = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o600)).unwrap();
    let fd = listener.as_raw_fd();

    // LISTEN_PID must be the daemon's own pid: a shell sets it to $$ and execs the daemon.
    let activated = |name: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(BIN)
            .arg("--blk-file")
            .arg(&image)
            .args(["--format", "raw", "--num-queues", "1"])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "vhost-user-blk")
            .env_remove("LISTEN_PID");
        // SAFETY: the hook only calls dup2/fcntl. dup2 leaves fd 3 without FD_CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    return clear_cloexec(3);
                }
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Proc::spawn(cmd, dir.path(), name)
    };
    // Like systemd with Accept=no: the socket outlives each instance of the service, and the
    // next instance serves on it. Shutting an instance down must leave the shared socket
    // listening (a frontend reconnecting in between is queued, not refused).
    for round in 0..2 {
        let mut d = activated(&format!("daemon-{round}"));
        let mut c = client(&sock, 1);
        let expect = pattern(10, 4096, 4096);
        common::assert_bytes_eq(
            &c.q(0).read_ok(4096, 4096),
            &expect,
            4096,
            "socket-activated read",
        );
        drop(c);
        assert!(d.stderr().contains("on fd 3"), "{}", d.stderr());
        // Who can connect to the inherited socket, and where that is decided.
        let access = format!("vhost-user socket {}: owner ", sock.display());
        let log = d.stderr();
        assert!(
            log.lines().any(|l| l.contains(&access)
                && l.contains("mode 0600: only user ")
                && l.ends_with("see the socket unit's SocketUser=, SocketGroup=, SocketMode=)")),
            "{log}"
        );
        d.terminate_ok();
        assert!(
            is_socket(&sock),
            "the activated socket's path must not be removed"
        );
        let queued = std::os::unix::net::UnixStream::connect(&sock);
        assert!(
            queued.is_ok(),
            "after the daemon exited the shared socket must still accept connections: {queued:?}"
        );
        let (_, _) = listener.accept().unwrap();
    }

    // LISTEN_PID naming another process: the variables are not for us.
    let (st, _, err) = {
        let mut cmd = Command::new(BIN);
        cmd.arg("--blk-file")
            .arg(&image)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_PID", "1");
        let mut p = Proc::spawn(cmd, dir.path(), "wrong-pid");
        let st = p.wait_exit("LISTEN_PID of another process");
        (st, p.stdout(), p.stderr())
    };
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("one of --socket-path or --fd is required"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------------------

/// Receives datagrams until one contains `want` (bounded); returns everything received.
fn recv_until(rx: &UnixDatagram, want: &str, got: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m| m.lines().any(|l| l == want)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {want} within {WAIT:?}; received {got:?}"
        );
        rx.set_read_timeout(Some(left)).unwrap();
        match rx.recv(&mut buf) {
            Ok(k) => got.push(String::from_utf8_lossy(&buf[..k]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
}

fn notify_run(notify_socket: &std::ffi::OsStr, rx: &UnixDatagram) {
    let dir = tempfile::tempdir().unwrap();
    let image = common::create_image(dir.path(), "disk.img", MIB, None);
    let sock = dir.path().join("vub.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&image)
        .args(["--format", "raw", "--num-queues", "1"])
        .env("NOTIFY_SOCKET", notify_socket);
    let mut d = Proc::spawn(cmd, dir.path(), "daemon");
    let mut got = Vec::new();
    recv_until(rx, "READY=1", &mut got);
    // Ready means ready: the socket is in place when READY=1 arrives.
    assert!(is_socket(&sock), "READY=1 before the socket exists");
    let ready = got
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(
        ready.contains("STATUS="),
        "READY=1 comes with a STATUS: {ready:?}"
    );

    // A frontend connecting shows in STATUS.
    let c = client(&sock, 1);
    recv_until(rx, "STATUS=serving a frontend", &mut got);
    drop(c);
    d.terminate_ok();
    recv_until(rx, "STOPPING=1", &mut got);
}

#[test]
fn sd_notify_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&path).unwrap();
    notify_run(path.as_os_str(), &rx);

    // The abstract namespace ("@name"), as systemd uses it.
    let name = format!("vub-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let rx = UnixDatagram::bind_addr(&addr).unwrap();
    notify_run(std::ffi::OsStr::new(&format!("@{name}")), &rx);
}

// ---------------------------------------------------------------------------------------------
// --print-capabilities and setup errors
// ---------------------------------------------------------------------------------------------

#[test]
fn print_capabilities_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (st, out, err) = run_bin(dir.path(), &["--print-capabilities"]);
    assert!(st.success(), "{err}");
    assert_eq!(
        out,
        "{\"type\":\"block\",\"features\":[\"read-only\",\"blk-file\"]}\n"
    );
    assert_eq!(err, "");
}

/// A setup error: exit status 1 and exactly one line `vhost-user-blk: error: ...` on stderr
/// that mentions every string in `names`.
#[track_caller]
fn assert_setup_error(dir: &Path, args: &[&str], names: &[&str]) -> String {
    let (st, out, err) = run_bin(dir, args);
    assert_eq!(st.code(), Some(1), "{args:?}: status {st}, stderr {err:?}");
    assert_eq!(out, "", "{args:?}: nothing on stdout");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: one-line error, got {err:?}"
    );
    assert!(
        err.starts_with("vhost-user-blk: error: "),
        "{args:?}: {err:?}"
    );
    for name in names {
        assert!(
            err.contains(name),
            "{args:?}: error should name {name:?}: {err:?}"
        );
    }
    err
}

#[test]
fn setup_errors_exit_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let image = s(&common::create_image(d, "disk.img", MIB, None));
    let sock = s(&d.join("vub.sock"));

    // Missing image.
    let missing = s(&d.join("missing.img"));
    assert_setup_error(
        d,
        &["--socket-path", &sock, "--blk-file", &missing],
        &[&missing],
    );
    assert!(!Path::new(&sock).exists(), "no socket left behind");

    // The socket path is a regular file: refused, and the file is untouched.
    let regular = d.join("regular");
    fs::write(&regular, b"precious").unwrap();
    let err = assert_setup_error(
        d,
        &["--socket-path", &s(&regular), "--blk-file", &image],
        &[&s(&regular), "not a socket"],
    );
    assert!(err.contains("cannot listen on"), "{err}");
    assert_eq!(fs::read(&regular).unwrap(), b"precious");

    // The socket's directory does not exist.
    let nodir = s(&d.join("no/such/dir/vub.sock"));
    assert_setup_error(
        d,
        &["--socket-path", &nodir, "--blk-file", &image],
        &[&nodir],
    );

    // --fd that is not a socket / not open.
    assert_setup_error(
        d,
        &["--fd", "0", "--blk-file", &image],
        &["fd 0", "not a socket"],
    );
    assert_setup_error(d, &["--fd", "999", "--blk-file", &image], &["fd 999"]);

    // Neither --socket-path nor --fd (and no socket activation).
    assert_setup_error(d, &["--blk-file", &image], &["--socket-path", "--fd"]);

    // Conflicting options: the same one-line setup error (exit 1), naming both options.
    assert_setup_error(
        d,
        &["--socket-path", &sock, "--fd", "3", "--blk-file", &image],
        &["--socket-path", "--fd"],
    );
    assert!(!Path::new(&sock).exists());
    assert_setup_error(
        d,
        &[
            "--socket-path",
            &sock,
            "--null-size",
            "1M",
            "--blk-file",
            &image,
        ],
        &["--null-size", "--blk-file"],
    );

    // Options that cannot work are refused before --create makes a file.
    let created = d.join("created.img");
    for (option, value, error) in [
        ("--queue-size", "100", "queue size 100"),
        ("--logical-block-size", "1024", "logical block size 1024"),
    ] {
        assert_setup_error(
            d,
            &[
                "--socket-path",
                &sock,
                "--blk-file",
                &s(&created),
                "--create",
                "1M",
                option,
                value,
            ],
            &[error],
        );
    }
    assert!(
        !created.exists(),
        "a refused start must not create the image"
    );

    // A live socket at the path: refused, and the other daemon keeps it.
    let live = d.join("live.sock");
    let _other = UnixListener::bind(&live).unwrap();
    assert_setup_error(
        d,
        &["--socket-path", &s(&live), "--blk-file", &image],
        &[&s(&live), "another process is listening"],
    );
    assert!(is_socket(&live));
}

/// A control socket that cannot be bound is a setup error like the vhost-user socket's, and
/// the daemon must not leave its already-bound vhost-user socket behind when it gives up.
#[test]
fn control_socket_setup_error_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let image = s(&common::create_image(d, "disk.img", MIB, None));
    let sock = d.join("vub.sock");
    let regular = d.join("ctl-is-a-file");
    fs::write(&regular, b"x").unwrap();
    assert_setup_error(
        d,
        &[
            "--socket-path",
            &s(&sock),
            "--control-socket",
            &s(&regular),
            "--blk-file",
            &image,
        ],
        &[&s(&regular), "not a socket"],
    );
    assert_eq!(fs::read(&regular).unwrap(), b"x");
    assert!(
        !sock.exists(),
        "the vhost-user socket {} was left behind after the control socket failed",
        sock.display()
    );
}

/// The stale socket of a killed daemon is replaced on the next start, for both sockets.
#[test]
fn stale_sockets_of_a_killed_daemon_are_replaced() {
    let s = setup(MIB, &[]);
    let Setup {
        dir,
        image,
        sock,
        ctl,
        mut daemon,
    } = s;
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit("SIGKILL");
    assert!(
        is_socket(&sock) && is_socket(&ctl),
        "SIGKILL leaves both sockets"
    );
    let mut s = serve(dir, image, &["--format", "raw"]);
    // The old socket files are still there, so wait for the start-up log line instead (it is
    // printed once both sockets are bound).
    let deadline = Instant::now() + WAIT;
    while !s.daemon.stderr().contains("serving ") {
        s.daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "daemon did not start: {}",
            s.daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ctl::connect(&s.ctl).stats();
    assert_serves_io(&s.sock, 0);
    s.daemon.terminate_ok();
}

// ---------------------------------------------------------------------------------------------
// activate, deactivate: the migration handover driven by a management tool (issue 13)
// ---------------------------------------------------------------------------------------------

/// What `qemu-img info` (without `-U`: it needs the image unshared for writing) says when the
/// daemon holds the image.
const HELD: &str = "Failed to get shared \"write\" lock";

/// `qemu-img info IMAGE` without `-U`: Ok(stdout) when it could open the image, Err(stderr).
fn qemu_img_info_unshared(image: &Path) -> Result<String, String> {
    let out = common::qemu_img_output(&["info".as_ref(), image.as_os_str()]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Asserts the daemon holds qcow2 `image`: `qemu-img info` is refused for the write lock.
/// (On a raw image qemu-img info needs no lock a writer denies, as with a QEMU guest.)
#[track_caller]
fn assert_held(image: &Path, when: &str) {
    match qemu_img_info_unshared(image) {
        Ok(out) => panic!("{when}: qemu-img info opened the image the daemon serves: {out}"),
        Err(e) => assert!(e.contains(HELD), "{when}: {e}"),
    }
}

/// Whether another open file description holds a lock on any of `path`'s bytes 0..300
/// (QEMU's lock bytes and libvirt's byte 0; what QEMU's `F_OFD_GETLK` test sees).
fn locked(path: &Path) -> bool {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock is plain old data; all-zero is valid (OFD locks need l_pid 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 300;
    // SAFETY: F_OFD_GETLK reads and rewrites the live local flock; the fd is open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// The qcow2 header's incompatible feature bits (bit 0: dirty, bit 1: corrupt).
fn qcow2_incompatible(image: &Path) -> u64 {
    let b = fs::read(image).expect("read the qcow2 image");
    u64::from_be_bytes(b[72..80].try_into().unwrap())
}

/// Waits until `stats` says no frontend is connected (the daemon has then forgotten the
/// queues the last one started).
fn wait_disconnected(ctl: &mut Ctl) {
    let deadline = Instant::now() + WAIT;
    while ctl.stats()["connected"] != json!(false) {
        assert!(Instant::now() < deadline, "the frontend is still connected");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `vhost-user-blk ctl --json ACTION` against `s`; returns the status, the result (when
/// it succeeded) and stderr.
fn ctl_json(s: &Setup, action: &str) -> (std::process::ExitStatus, Value, String) {
    let (st, out, err) = run_bin(
        s.dir.path(),
        &[
            "ctl",
            "--control-socket",
            s.ctl.to_str().unwrap(),
            "--json",
            action,
        ],
    );
    let v = if st.success() {
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("ctl {action}: {out:?}: {e}"))
    } else {
        Value::Null
    };
    (st, v, err)
}

/// With no frontend connected, `ctl deactivate` hands a qcow2 image over (qemu-img can open
/// it, it is clean, its dirty bit cleared) and `ctl activate` takes it back (qemu-img is
/// refused again). Both are idempotent and say so.
#[test]
fn deactivate_hands_the_image_over_and_activate_takes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "", "16M");
    let mut s = serve(dir, image, &["--format", "qcow2"]);
    let mut ctl = Ctl::connect(&s.ctl);
    // Allocating writes, so the image is dirty with metadata only the daemon has cached.
    let mut c = client(&s.sock, 1);
    for i in 0..4u64 {
        let off = i * 3 * MIB;
        c.q(0).write_ok(off, &pattern(21, off, 8192));
    }
    drop(c);
    wait_disconnected(&mut ctl);
    assert_eq!(ctl.stats()["active"], json!(true));
    assert_eq!(
        qcow2_incompatible(&s.image) & 1,
        1,
        "the dirty bit should be set before the handover (else its clearing proves nothing)"
    );
    assert_held(&s.image, "before deactivate");

    let (st, r, err) = ctl_json(&s, "deactivate");
    assert!(st.success(), "ctl deactivate: {st}: {err}");
    assert_eq!(r, json!({"active": false, "changed": true}));
    assert_eq!(ctl.stats()["active"], json!(false));
    let (st, out, err) = run_bin(
        s.dir.path(),
        &["ctl", "--control-socket", s.ctl.to_str().unwrap(), "stats"],
    );
    assert!(st.success(), "ctl stats: {err}");
    assert!(
        out.lines()
            .next()
            .unwrap_or_default()
            .contains("no frontend, image inactive (handed over); flushes "),
        "{out}"
    );
    if let Err(e) = qemu_img_info_unshared(&s.image) {
        panic!("qemu-img info after deactivate: {e}");
    }
    assert_eq!(
        qcow2_incompatible(&s.image) & 3,
        0,
        "dirty or corrupt bit set after the handover"
    );
    let check = common::qemu_img_check(&s.image);
    assert!(check.clean(), "qemu-img check after deactivate: {check:?}");
    // Idempotent.
    assert_eq!(
        ctl.ok(json!({"command": "deactivate"})),
        json!({"active": false, "changed": false})
    );

    let (st, r, err) = ctl_json(&s, "activate");
    assert!(st.success(), "ctl activate: {st}: {err}");
    assert_eq!(r, json!({"active": true, "changed": true}));
    assert_eq!(
        ctl.ok(json!({"command": "activate"})),
        json!({"active": true, "changed": false})
    );
    assert_eq!(ctl.stats()["active"], json!(true));
    assert_held(&s.image, "after activate");
    // It serves what was written before the handover.
    let mut c = client(&s.sock, 1);
    for i in 0..4u64 {
        let off = i * 3 * MIB;
        common::assert_bytes_eq(
            &c.q(0).read_ok(off, 8192),
            &pattern(21, off, 8192),
            off,
            "after deactivate and activate",
        );
    }
    drop(c);
    s.daemon.terminate_ok();
    assert!(common::qemu_img_check(&s.image).clean());
}

/// `activate` fails with the in-use message while another process holds the image, changing
/// nothing, and succeeds once it has gone.
#[test]
fn activate_fails_while_another_process_holds_the_image() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    assert_eq!(
        ctl.ok(json!({"command": "deactivate"}))["changed"],
        json!(true)
    );
    // qemu-io keeps the image open, writable and unshared, while it waits for commands.
    let mut holder = common::ChildGuard::new(common::qemu_io_interactive(&[
        "-f",
        "raw",
        s.image.to_str().unwrap(),
    ]));
    assert!(!locked(&s.image), "still locked after deactivate");
    let deadline = Instant::now() + WAIT;
    while !locked(&s.image) {
        assert!(Instant::now() < deadline, "qemu-io did not lock the image");
        assert!(holder.try_wait().is_none(), "qemu-io exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = ctl.refused(b"{\"command\":\"activate\"}\n");
    assert!(
        e.starts_with("activate failed: image ")
            && e.contains("is in use by another process")
            && e.contains(s.image.to_str().unwrap()),
        "{e}"
    );
    assert_eq!(ctl.stats()["active"], json!(false));
    let (st, _, err) = ctl_json(&s, "activate");
    assert_eq!(st.code(), Some(1), "ctl activate with a holder: {err}");
    assert!(err.contains("is in use by another process"), "{err}");

    holder.kill();
    assert!(!locked(&s.image), "a failed activate left locks behind");
    assert_eq!(
        ctl.ok(json!({"command": "activate"})),
        json!({"active": true, "changed": true})
    );
    assert!(locked(&s.image), "activate took no lock");
    assert_serves_io(&s.sock, 0);
    s.daemon.terminate_ok();
}

/// `deactivate` is refused, naming the queues, while a client has them started; the image
/// stays held and I/O goes on.
#[test]
fn deactivate_is_refused_while_a_client_runs_its_queues() {
    let mut s = setup(4 * MIB, &[]);
    let mut ctl = Ctl::connect(&s.ctl);
    // A ring the frontend started counts as started at once, before its worker first ran
    // (which on a busy host can come later than this request): its first request would
    // otherwise take the image back from whoever has it then.
    {
        use common::raw::{RawClient, S_OK, T_IN};
        let mut raw = RawClient::connect(&s.sock);
        let e = ctl.refused(b"{\"command\":\"deactivate\"}\n");
        assert!(e.contains("the frontend has queue(s) 0 started"), "{e}");
        assert_eq!(raw.request(T_IN, 0, 4096, None), S_OK);
        assert_eq!(&raw.data()[..4096], &pattern(7, 0, 4096)[..]);
    }
    wait_disconnected(&mut ctl);
    let mut c = client(&s.sock, 2);
    // Queue 0 has run requests; queue 1 is started but has not seen one yet.
    c.q(0).write_ok(0, &pattern(31, 0, 4096));
    let e = ctl.refused(b"{\"command\":\"deactivate\"}\n");
    assert_eq!(
        e,
        "deactivate refused: the frontend has queue(s) 0, 1 started; stop them first \
         (pause the VM) or disconnect the frontend"
    );
    c.q(1).write_ok(4096, &pattern(31, 4096, 4096));
    let (st, _, err) = ctl_json(&s, "deactivate");
    assert_eq!(
        st.code(),
        Some(1),
        "ctl deactivate with running queues: {err}"
    );
    assert!(err.contains("deactivate refused: "), "{err}");
    assert_eq!(ctl.stats()["active"], json!(true));
    assert!(locked(&s.image), "a refused deactivate released the image");
    for q in 0..2 {
        let off = q as u64 * 4096;
        common::assert_bytes_eq(
            &c.q(q).read_ok(off, 4096),
            &pattern(31, off, 4096),
            off,
            "after a refused deactivate",
        );
        c.q(q).write_ok(MIB + off, &pattern(32, off, 4096));
    }
    drop(c);
    // Once the client is gone the same request succeeds.
    wait_disconnected(&mut ctl);
    assert_eq!(
        ctl.ok(json!({"command": "deactivate"}))["changed"],
        json!(true)
    );
    assert!(!locked(&s.image), "still locked after deactivate");
    s.daemon.terminate_ok();
}

/// After `deactivate`, a client that connects and does I/O takes the image back by itself: it
/// reads what was written before, and what another program wrote meanwhile (the qcow2
/// metadata is read afresh).
#[test]
fn a_client_after_deactivate_reactivates_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, "", "16M");
    let mut s = serve(dir, image, &["--format", "qcow2"]);
    let mut ctl = Ctl::connect(&s.ctl);
    let mut c = client(&s.sock, 1);
    c.q(0).write_ok(0, &pattern(41, 0, 65536));
    drop(c);
    wait_disconnected(&mut ctl);
    assert_eq!(
        ctl.ok(json!({"command": "deactivate"}))["changed"],
        json!(true)
    );
    // Another program writes (and allocates) while the daemon has let go.
    let out = common::qemu_io_output(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 5M 64k",
        s.image.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "qemu-io on the handed-over image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ctl.stats()["active"], json!(false));

    let mut c = client(&s.sock, 1);
    common::assert_bytes_eq(
        &c.q(0).read_ok(0, 65536),
        &pattern(41, 0, 65536),
        0,
        "written before the deactivate",
    );
    common::assert_bytes_eq(
        &c.q(0).read_ok(5 * MIB, 65536),
        &[0x5a; 65536],
        5 * MIB,
        "written by qemu-io while inactive",
    );
    c.q(0).write_ok(9 * MIB, &pattern(42, 9 * MIB, 4096));
    assert_eq!(ctl.stats()["active"], json!(true));
    assert_held(&s.image, "after the client's I/O");
    assert!(
        s.daemon.stderr().contains("image activated"),
        "{}",
        s.daemon.stderr()
    );
    drop(c);
    s.daemon.terminate_ok();
    let check = common::qemu_img_check(&s.image);
    assert!(check.clean(), "{check:?}");
}

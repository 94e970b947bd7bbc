// Shared helpers for the integration tests.
//
// * `Daemon` spawns the backend under test (our `vhost-user-blk` binary by default, or
//   qemu-storage-daemon when `VUB_TEST_BACKEND=qsd`), waits for its socket, and kills it in
//   `Drop` so no test can leak a process.
// * `Client` is a thin synchronous wrapper around the `blkio` crate's `virtio-blk-vhost-user`
//   driver, with one I/O buffer per queue carved out of a single mapped memory region.
// * Image helpers: deterministic data patterns, file creation/reading, byte comparison with a
//   useful failure message.
//
// Every wait in here is bounded (10 s) and panics with a message that says what was awaited.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Upper bound for every wait: socket appearance, child exit, I/O completion.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

pub const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------------------------
// Backend selection and process management
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Our `vhost-user-blk` binary (default).
    Ours,
    /// qemu-storage-daemon, selected with `VUB_TEST_BACKEND=qsd` (binary overridable with
    /// `VUB_QSD_BIN`). Used to validate the tests themselves against a reference backend.
    Qsd,
}

/// For a test whose prerequisite (root, a mount, a tool) is missing: prints `SKIPPED: why`
/// so a developer's partial run still passes, or panics when `CI` is set. `ci/test` (the
/// README's test command, which installs every prerequisite and runs as root) sets `CI`, so
/// in the full suite nothing is skipped silently.
pub fn skip_unless_ci(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED: {why}");
}

pub fn backend() -> Backend {
    match std::env::var("VUB_TEST_BACKEND") {
        Err(std::env::VarError::NotPresent) => Backend::Ours,
        Ok(v) if v.is_empty() || v == "ours" => Backend::Ours,
        Ok(v) if v == "qsd" => Backend::Qsd,
        Ok(v) => panic!("VUB_TEST_BACKEND={v:?} is not supported (use \"qsd\" or leave it unset)"),
        Err(e) => panic!("VUB_TEST_BACKEND is not valid unicode: {e}"),
    }
}

/// Daemon options, mirroring the `vhost-user-blk` CLI.
#[derive(Clone, Debug, Default)]
pub struct DaemonConfig {
    pub read_only: bool,
    pub num_queues: Option<u32>,
    /// Not supported by the QSD vhost-user-blk export; ignored there.
    pub queue_size: Option<u32>,
    /// Not supported by the QSD vhost-user-blk export; ignored there.
    pub serial: Option<String>,
    pub logical_block_size: Option<u32>,
    pub direct: bool,
    pub writethrough: bool,
    /// Extra arguments for our binary (ignored for QSD).
    pub extra_args: Vec<String>,
}

impl DaemonConfig {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    pub fn num_queues(mut self, n: u32) -> Self {
        self.num_queues = Some(n);
        self
    }
    pub fn logical_block_size(mut self, n: u32) -> Self {
        self.logical_block_size = Some(n);
        self
    }
    pub fn serial(mut self, s: &str) -> Self {
        self.serial = Some(s.to_string());
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }
}

/// A running backend process. Killed (SIGKILL) and reaped on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub backend: Backend,
}

fn backend_command(backend: Backend, socket: &Path, image: &Path, cfg: &DaemonConfig) -> Command {
    match backend {
        Backend::Ours => {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
            cmd.arg("--socket-path")
                .arg(socket)
                .arg("--blk-file")
                .arg(image)
                .arg("--format")
                .arg("raw");
            if cfg.read_only {
                cmd.arg("--read-only");
            }
            if let Some(n) = cfg.num_queues {
                cmd.arg("--num-queues").arg(n.to_string());
            }
            if let Some(n) = cfg.queue_size {
                cmd.arg("--queue-size").arg(n.to_string());
            }
            if let Some(s) = &cfg.serial {
                cmd.arg("--serial").arg(s);
            }
            if let Some(n) = cfg.logical_block_size {
                cmd.arg("--logical-block-size").arg(n.to_string());
            }
            if cfg.direct {
                cmd.arg("--direct");
            }
            if cfg.writethrough {
                cmd.arg("--writethrough");
            }
            cmd.args(&cfg.extra_args);
            cmd.arg("-v");
            cmd
        }
        Backend::Qsd => {
            let bin = std::env::var("VUB_QSD_BIN").unwrap_or_else(|_| "qemu-storage-daemon".into());
            let mut cmd = Command::new(bin);
            // QEMU option syntax uses ',' as separator; our temp paths never contain one.
            let img = image.to_str().expect("utf-8 image path");
            let sock = socket.to_str().expect("utf-8 socket path");
            assert!(!img.contains(',') && !sock.contains(','));
            let mut blockdev = format!("driver=file,node-name=f0,filename={img},discard=unmap");
            if cfg.read_only {
                blockdev.push_str(",read-only=on");
            }
            if cfg.direct {
                blockdev.push_str(",cache.direct=on");
            }
            let mut export = format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable={}",
                if cfg.read_only { "off" } else { "on" }
            );
            if let Some(n) = cfg.num_queues {
                export.push_str(&format!(",num-queues={n}"));
            }
            if let Some(n) = cfg.logical_block_size {
                export.push_str(&format!(",logical-block-size={n}"));
            }
            if cfg.writethrough {
                export.push_str(",writethrough=on");
            }
            cmd.arg("--blockdev")
                .arg(blockdev)
                .arg("--export")
                .arg(export);
            cmd
        }
    }
}

impl Daemon {
    /// Spawn the backend serving `image` on `dir/vhost-user-blk.sock` and wait (≤ 10 s) for the
    /// socket to appear. Panics (with the daemon's log) if it exits or never creates the socket.
    pub fn start(dir: &Path, image: &Path, cfg: &DaemonConfig) -> Daemon {
        let backend = backend();
        let socket = dir.join("vhost-user-blk.sock");
        let log_path = dir.join("daemon.log");
        let log = File::create(&log_path).expect("create daemon log file");
        let mut cmd = backend_command(backend, &socket, image, cfg);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {backend:?} backend ({cmd:?}): {e}"));
        let mut d = Daemon {
            child: Some(child),
            socket,
            log_path,
            backend,
        };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Ok(md) = fs::symlink_metadata(&self.socket) {
                if md.file_type().is_socket() {
                    return;
                }
            }
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                panic!(
                    "{:?} backend exited with {status} before creating socket {}\n--- log ---\n{}",
                    self.backend,
                    self.socket.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "socket {} did not appear within {:?}\n--- log ---\n{}",
                    self.socket.display(),
                    WAIT_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("daemon already reaped").id() as libc::pid_t
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    pub fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Panics (with the log) if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
            panic!(
                "{:?} backend exited unexpectedly with {status}\n--- log ---\n{}",
                self.backend,
                self.log()
            );
        }
    }

    /// Wait ≤ 10 s for the process to exit and reap it.
    fn wait_exit(&mut self, why: &str) -> ExitStatus {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{:?} backend did not exit within {:?} after {why}\n--- log ---\n{}",
                    self.backend,
                    WAIT_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait ≤ 10 s, return the exit status (the process is reaped).
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit("SIGTERM")
    }

    /// SIGTERM and assert a clean exit with status 0.
    pub fn terminate_ok(self) {
        let backend = self.backend;
        let log_path = self.log_path.clone();
        let status = self.terminate();
        assert!(
            status.success(),
            "{backend:?} backend exited with {status} after SIGTERM, expected 0\n--- log ---\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit("SIGKILL");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(None) = child.try_wait() {
                // SIGKILL our own child by pid; cannot be ignored, so wait() returns promptly.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            }
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- {:?} backend log ({}) ---\n{}",
                    self.backend,
                    self.log_path.display(),
                    self.log()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Image helpers
// ---------------------------------------------------------------------------------------------

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Deterministic data for the disk range `[offset, offset + len)` tagged with `seed`. Every
/// 8-byte word depends on its absolute disk offset, so misplaced or mixed-up data is detected.
/// `offset` and `len` must be multiples of 8.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    assert!(offset.is_multiple_of(8) && len.is_multiple_of(8));
    let mut v = Vec::with_capacity(len);
    for i in 0..(len / 8) as u64 {
        let o = offset + i * 8;
        v.extend_from_slice(&splitmix64(seed.rotate_left(40) ^ o).to_le_bytes());
    }
    v
}

/// Create `dir/name` of `size` bytes filled with `pattern(seed, 0, size)` (or zeros if `seed`
/// is None, written out so the blocks are allocated) and fsync it.
pub fn create_image(dir: &Path, name: &str, size: u64, seed: Option<u64>) -> PathBuf {
    let path = dir.join(name);
    let mut f = File::create(&path).expect("create image");
    let aligned = size / 8 * 8;
    let data = match seed {
        Some(s) => pattern(s, 0, aligned as usize),
        None => vec![0u8; aligned as usize],
    };
    f.write_all(&data).expect("write image");
    f.write_all(&vec![0xA5u8; (size - aligned) as usize])
        .expect("write image tail");
    f.sync_all().expect("fsync image");
    path
}

pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Compare byte slices; on mismatch report the first differing disk offset and the number of
/// differing bytes instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], base_offset: u64, what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length differs (actual {}, expected {})",
        actual.len(),
        expected.len()
    );
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap();
        let count = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
        let end = (first + 16).min(actual.len());
        panic!(
            "{what}: data mismatch at disk offset {} (sector {}), {count} bytes differ; \
             actual[..16]={:02x?} expected[..16]={:02x?}",
            base_offset + first as u64,
            (base_offset + first as u64) / SECTOR,
            &actual[first..end],
            &expected[first..end]
        );
    }
}

/// Number of 512-byte blocks allocated to the file (st_blocks).
pub fn allocated_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks()
}

/// Does the filesystem holding `dir` support FALLOC_FL_PUNCH_HOLE (and reflect it in st_blocks)?
pub fn fs_supports_punch_hole(dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let p = dir.join("punch-probe");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create probe");
    (&f).write_all(&vec![1u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    let before = allocated_blocks(&p);
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            1 << 20,
        )
    };
    let after = allocated_blocks(&p);
    drop(f);
    let _ = fs::remove_file(&p);
    rc == 0 && after < before
}

// ---------------------------------------------------------------------------------------------
// blkio client
// ---------------------------------------------------------------------------------------------

/// Default virtqueue size requested by the tests' client. blkio's own default is 256; 128 is what
/// QEMU's vhost-user-blk device historically uses and is accepted by every backend.
pub const CLIENT_QUEUE_SIZE: i32 = 128;

/// Per-queue I/O buffer size (bytes).
pub const QUEUE_BUF_SIZE: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub num_queues: i32,
    pub queue_size: i32,
    pub read_only: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 1,
            queue_size: CLIENT_QUEUE_SIZE,
            read_only: false,
        }
    }
}

/// Result of one request: `ret` is 0 on success or a negative errno. For requests that reached
/// the device, virtio-driver maps VIRTIO_BLK_S_IOERR -> -EIO, VIRTIO_BLK_S_UNSUPP -> -ENOTSUP
/// and anything else -> -EPROTO. Client-side rejections (e.g. writes with `read-only` set ->
/// -EBADF, missing feature -> -ENOTSUP, unaligned -> -EINVAL) carry an error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
    pub msg: Option<String>,
}

impl Done {
    fn from_completion(c: &Completion) -> Done {
        let msg = if c.error_msg.is_null() {
            None
        } else {
            Some(
                unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        Done {
            user_data: c.user_data,
            ret: c.ret,
            msg,
        }
    }

    pub fn errno_name(&self) -> String {
        if self.ret == 0 {
            "success".into()
        } else {
            format!(
                "{} ({}){}",
                self.ret,
                std::io::Error::from_raw_os_error(-self.ret),
                self.msg
                    .as_ref()
                    .map(|m| format!(" [client-side: {m}]"))
                    .unwrap_or_default()
            )
        }
    }
}

/// One virtqueue plus a private slice of the mapped buffer region. `Send`, so it can be moved to
/// (or borrowed mutably by) another thread.
pub struct Queue {
    pub q: Blkioq,
    pub index: usize,
    buf: *mut u8,
    buf_len: usize,
}

// SAFETY: `buf` points into a mapped memory region owned by the `Client`, which outlives every
// `Queue` (the Client owns the queues); each Queue has a disjoint slice.
unsafe impl Send for Queue {}

/// A request description for batched submission.
#[derive(Clone, Debug)]
pub enum Req {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ReqFlags,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl Queue {
    pub fn buf(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    /// Wait (≤ 10 s overall) for exactly `n` completions and return them.
    pub fn wait(&mut self, n: usize) -> Vec<Done> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut got = 0;
        let mut out = Vec::with_capacity(n);
        while got < n {
            let mut timeout = deadline.saturating_duration_since(Instant::now());
            let k = self
                .q
                .do_io(&mut comps[got..], n - got, Some(&mut timeout), None)
                .unwrap_or_else(|e| {
                    panic!(
                        "queue {}: do_io waiting for {} of {n} completions failed: {} (errno {:?}) \
                         — backend hung or disconnected?",
                        self.index,
                        n - got,
                        e,
                        e.errno()
                    )
                });
            for c in &comps[got..got + k] {
                out.push(Done::from_completion(unsafe { c.assume_init_ref() }));
            }
            got += k;
        }
        out
    }

    /// Submit all `reqs` at once (all in flight together; user_data = index), wait for all of
    /// them, return `(ret, read data)` per request in submission order. Data for reads and writes
    /// is laid out back-to-back in this queue's buffer.
    pub fn batch(&mut self, reqs: &[Req]) -> Vec<(Done, Option<Vec<u8>>)> {
        let mut offs = Vec::with_capacity(reqs.len());
        let mut pos = 0usize;
        for r in reqs {
            offs.push(pos);
            let len = match r {
                Req::Read { len, .. } => *len,
                Req::Write { data, .. } => data.len(),
                _ => 0,
            };
            pos += len;
        }
        assert!(
            pos <= self.buf_len,
            "batch needs {pos} bytes of buffer, have {}",
            self.buf_len
        );
        assert!(
            reqs.len() <= CLIENT_QUEUE_SIZE as usize / 2,
            "too many requests in one batch"
        );
        for (i, r) in reqs.iter().enumerate() {
            let p = unsafe { self.buf.add(offs[i]) };
            match r {
                Req::Read { offset, len } => {
                    unsafe { std::ptr::write_bytes(p, 0xEE, *len) };
                    self.q.read(*offset, p, *len, i, ReqFlags::empty());
                }
                Req::Write {
                    offset,
                    data,
                    flags,
                } => {
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                    self.q.write(*offset, p, data.len(), i, *flags);
                }
                Req::WriteZeroes { offset, len, flags } => {
                    self.q.write_zeroes(*offset, *len, i, *flags)
                }
                Req::Discard { offset, len } => self.q.discard(*offset, *len, i, ReqFlags::empty()),
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
            }
        }
        let done = self.wait(reqs.len());
        let mut res: Vec<Option<Done>> = vec![None; reqs.len()];
        for d in done {
            assert!(
                d.user_data < reqs.len(),
                "completion with unknown user_data {}",
                d.user_data
            );
            assert!(
                res[d.user_data].is_none(),
                "duplicate completion for request {}",
                d.user_data
            );
            let idx = d.user_data;
            res[idx] = Some(d);
        }
        res.into_iter()
            .enumerate()
            .map(|(i, d)| {
                let d = d.unwrap();
                let data = match &reqs[i] {
                    Req::Read { len, .. } if d.ret == 0 => Some(
                        unsafe { std::slice::from_raw_parts(self.buf.add(offs[i]), *len) }.to_vec(),
                    ),
                    _ => None,
                };
                (d, data)
            })
            .collect()
    }

    fn one(&mut self, r: Req) -> (Done, Option<Vec<u8>>) {
        self.batch(&[r]).pop().unwrap()
    }

    /// Read; Err(completion) on failure.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Done> {
        match self.one(Req::Read { offset, len }) {
            (d, Some(data)) if d.ret == 0 => Ok(data),
            (d, _) => Err(d),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Done {
        self.one(Req::Write {
            offset,
            data: data.to_vec(),
            flags: ReqFlags::empty(),
        })
        .0
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: ReqFlags) -> Done {
        self.one(Req::Write {
            offset,
            data: data.to_vec(),
            flags,
        })
        .0
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: ReqFlags) -> Done {
        self.one(Req::WriteZeroes { offset, len, flags }).0
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Done {
        self.one(Req::Discard { offset, len }).0
    }

    pub fn flush(&mut self) -> Done {
        self.one(Req::Flush).0
    }

    /// Read and panic on failure.
    #[track_caller]
    pub fn read_ok(&mut self, offset: u64, len: usize) -> Vec<u8> {
        self.read(offset, len).unwrap_or_else(|d| {
            panic!(
                "read of {len} bytes at offset {offset} failed: {}",
                d.errno_name()
            )
        })
    }

    /// Read a large range in chunks of at most half the buffer.
    #[track_caller]
    pub fn read_all(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let chunk = (self.buf_len / 2) as u64;
        let mut out = Vec::with_capacity(len as usize);
        let mut o = offset;
        while o < offset + len {
            let n = chunk.min(offset + len - o);
            out.extend(self.read_ok(o, n as usize));
            o += n;
        }
        out
    }

    #[track_caller]
    pub fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let d = self.write(offset, data);
        assert_eq!(
            d.ret,
            0,
            "write of {} bytes at offset {offset} failed: {}",
            data.len(),
            d.errno_name()
        );
    }
}

/// A started blkio `virtio-blk-vhost-user` instance.
pub struct Client {
    // Field order matters for drop: queues first, then the Blkio.
    pub queues: Vec<Queue>,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

/// Create a blkio instance and connect it (vhost-user handshake) without starting it.
pub fn connect(socket: &Path, read_only: bool) -> Result<Blkio, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
    // Must be set before connect(); if the device offers VIRTIO_BLK_F_RO and this is false,
    // start() fails with EROFS. If true, blkio rejects writes/discard/write-zeroes itself with
    // EBADF without sending them to the device.
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    Ok(b)
}

/// Configure queues on a connected instance and start it, then map one buffer region.
pub fn start(mut b: Blkio, num_queues: i32, queue_size: i32) -> Result<Client, blkio::Error> {
    b.set_i32("num-queues", num_queues)?;
    b.set_i32("queue-size", queue_size)?;
    let outcome = b.start()?;
    let total = QUEUE_BUF_SIZE * outcome.queues.len();
    let region = b.alloc_mem_region(total)?;
    b.map_mem_region(&region)?;
    let queues = outcome
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| Queue {
            q,
            index: i,
            buf: (region.addr + i * QUEUE_BUF_SIZE) as *mut u8,
            buf_len: QUEUE_BUF_SIZE,
        })
        .collect();
    Ok(Client {
        queues,
        region,
        blkio: b,
    })
}

impl Client {
    pub fn try_new(socket: &Path, opts: &ClientOpts) -> Result<Client, blkio::Error> {
        let b = connect(socket, opts.read_only)?;
        start(b, opts.num_queues, opts.queue_size)
    }

    #[track_caller]
    pub fn new(socket: &Path, opts: &ClientOpts) -> Client {
        Self::try_new(socket, opts).unwrap_or_else(|e| {
            panic!(
                "blkio client failed to connect/start on {}: {e} (errno {:?})",
                socket.display(),
                e.errno()
            )
        })
    }

    /// Single-queue read/write client.
    #[track_caller]
    pub fn simple(socket: &Path) -> Client {
        Self::new(socket, &ClientOpts::default())
    }

    pub fn q(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("get_u64({name}): {e}"))
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("get_i32({name}): {e}"))
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("get_bool({name}): {e}"))
    }
}

// No Drop impl on purpose: fields drop in declaration order (queues, then the Blkio, which closes
// the vhost-user socket and frees the region). Explicitly unmapping would send
// VHOST_USER_REM_MEM_REG, which is not what a disconnecting frontend normally does.

// ---------------------------------------------------------------------------------------------
// Minimal raw vhost-user frontend
// ---------------------------------------------------------------------------------------------

/// A deliberately minimal, synchronous vhost-user-blk frontend (one split virtqueue, one request
/// at a time, polling the used ring). It exists to send requests blkio refuses to send: writes,
/// discards and write-zeroes to a device that advertises VIRTIO_BLK_F_RO (blkio fails them
/// client-side), and VIRTIO_BLK_T_GET_ID / unknown request types (no blkio API).
///
/// Uses VHOST_USER_SET_MEM_TABLE with one memfd region whose guest addresses equal our virtual
/// addresses, acks no EVENT_IDX / indirect descriptors, and no protocol features.
pub mod raw {
    use super::WAIT_TIMEOUT;
    use std::io::{Read, Write};
    use std::os::unix::io::{AsRawFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{fence, Ordering};
    use std::time::Instant;

    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const T_DISCARD: u32 = 11;
    pub const T_WRITE_ZEROES: u32 = 13;

    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;

    pub const F_RO: u64 = 1 << 5;
    const F_BLK_SIZE: u64 = 1 << 6;
    const F_FLUSH: u64 = 1 << 9;
    const F_DISCARD: u64 = 1 << 13;
    const F_WRITE_ZEROES: u64 = 1 << 14;
    const F_PROTOCOL_FEATURES: u64 = 1 << 30;
    const F_VERSION_1: u64 = 1 << 32;

    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
    const SET_OWNER: u32 = 3;
    const SET_MEM_TABLE: u32 = 5;
    const SET_VRING_NUM: u32 = 8;
    const SET_VRING_ADDR: u32 = 9;
    const SET_VRING_BASE: u32 = 10;
    const SET_VRING_KICK: u32 = 12;
    const SET_VRING_CALL: u32 = 13;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_VRING_ENABLE: u32 = 18;

    const QSIZE: u16 = 16;
    const MEM_LEN: usize = 2 << 20;
    const DESC_OFF: usize = 0;
    const AVAIL_OFF: usize = 1024;
    const USED_OFF: usize = 2048;
    const HDR_OFF: usize = 4096;
    const STATUS_OFF: usize = 4096 + 256;
    const SEG_OFF: usize = 4096 + 512;
    pub const DATA_OFF: usize = 8192;
    pub const MAX_DATA: usize = MEM_LEN - DATA_OFF;

    pub struct RawClient {
        sock: UnixStream,
        mem: *mut u8,
        kick: RawFd,
        call: RawFd,
        avail_idx: u16,
        /// Features the device offered (before our masking).
        pub device_features: u64,
    }

    impl Drop for RawClient {
        fn drop(&mut self) {
            unsafe {
                libc::munmap(self.mem.cast(), MEM_LEN);
                libc::close(self.kick);
                libc::close(self.call);
            }
        }
    }

    fn eventfd() -> RawFd {
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        fd
    }

    impl RawClient {
        fn send(&mut self, req: u32, payload: &[u8], fd: Option<RawFd>) {
            let mut msg = Vec::with_capacity(12 + payload.len());
            msg.extend_from_slice(&req.to_le_bytes());
            msg.extend_from_slice(&1u32.to_le_bytes()); // version 1
            msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            msg.extend_from_slice(payload);
            match fd {
                None => self
                    .sock
                    .write_all(&msg)
                    .unwrap_or_else(|e| panic!("vhost-user send {req}: {e}")),
                Some(fd) => unsafe {
                    let mut iov = libc::iovec {
                        iov_base: msg.as_mut_ptr().cast(),
                        iov_len: msg.len(),
                    };
                    let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
                    let mut cbuf = vec![0u8; space];
                    let mut mh: libc::msghdr = std::mem::zeroed();
                    mh.msg_iov = &mut iov;
                    mh.msg_iovlen = 1;
                    mh.msg_control = cbuf.as_mut_ptr().cast();
                    mh.msg_controllen = space as _;
                    let c = libc::CMSG_FIRSTHDR(&mh);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
                    let n = libc::sendmsg(self.sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL);
                    assert_eq!(
                        n as usize,
                        msg.len(),
                        "vhost-user sendmsg {req}: {}",
                        std::io::Error::last_os_error()
                    );
                },
            }
        }

        fn recv_u64(&mut self, req: u32) -> u64 {
            let mut hdr = [0u8; 12];
            self.sock
                .read_exact(&mut hdr)
                .unwrap_or_else(|e| panic!("vhost-user reply to {req}: {e}"));
            let r = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
            assert_eq!(r, req, "reply for wrong request");
            assert_eq!(size, 8, "unexpected reply size for request {req}");
            let mut v = [0u8; 8];
            self.sock.read_exact(&mut v).unwrap();
            u64::from_le_bytes(v)
        }

        fn get_u64(&mut self, req: u32) -> u64 {
            self.send(req, &[], None);
            self.recv_u64(req)
        }

        /// Connect and set up virtqueue 0 (accepting VIRTIO_BLK_F_RO if offered).
        pub fn connect(socket: &Path) -> RawClient {
            let sock = UnixStream::connect(socket)
                .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
            sock.set_read_timeout(Some(WAIT_TIMEOUT)).unwrap();
            sock.set_write_timeout(Some(WAIT_TIMEOUT)).unwrap();
            let memfd =
                unsafe { libc::memfd_create(c"raw-vhost-user".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(
                memfd >= 0,
                "memfd_create: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(unsafe { libc::ftruncate(memfd, MEM_LEN as i64) }, 0);
            let mem = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MEM_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    memfd,
                    0,
                )
            };
            assert_ne!(
                mem,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            let mut c = RawClient {
                sock,
                mem: mem.cast(),
                kick: eventfd(),
                call: eventfd(),
                avail_idx: 0,
                device_features: 0,
            };
            let base = c.mem as u64;

            c.send(SET_OWNER, &[], None);
            c.device_features = c.get_u64(GET_FEATURES);
            assert!(
                c.device_features & F_PROTOCOL_FEATURES != 0,
                "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
            );
            let acked = c.device_features
                & (F_VERSION_1
                    | F_PROTOCOL_FEATURES
                    | F_RO
                    | F_BLK_SIZE
                    | F_FLUSH
                    | F_DISCARD
                    | F_WRITE_ZEROES);
            c.send(SET_FEATURES, &acked.to_le_bytes(), None);
            let _ = c.get_u64(GET_PROTOCOL_FEATURES);
            c.send(SET_PROTOCOL_FEATURES, &0u64.to_le_bytes(), None);

            // One memory region: guest address == our virtual address.
            let mut mt = Vec::new();
            mt.extend_from_slice(&1u32.to_le_bytes());
            mt.extend_from_slice(&0u32.to_le_bytes());
            for v in [base, MEM_LEN as u64, base, 0u64] {
                mt.extend_from_slice(&v.to_le_bytes());
            }
            c.send(SET_MEM_TABLE, &mt, Some(memfd));
            unsafe { libc::close(memfd) };

            let state = |num: u32| [0u32.to_le_bytes(), num.to_le_bytes()].concat();
            c.send(SET_VRING_NUM, &state(QSIZE as u32), None);
            c.send(SET_VRING_BASE, &state(0), None);
            let mut addr = Vec::new();
            addr.extend_from_slice(&0u32.to_le_bytes()); // index
            addr.extend_from_slice(&0u32.to_le_bytes()); // flags
            for v in [
                base + DESC_OFF as u64,
                base + USED_OFF as u64,
                base + AVAIL_OFF as u64,
                0,
            ] {
                addr.extend_from_slice(&v.to_le_bytes());
            }
            c.send(SET_VRING_ADDR, &addr, None);
            let (kick, call) = (c.kick, c.call);
            c.send(SET_VRING_KICK, &0u64.to_le_bytes(), Some(kick));
            c.send(SET_VRING_CALL, &0u64.to_le_bytes(), Some(call));
            c.send(SET_VRING_ENABLE, &state(1), None);
            // No REPLY_ACK: use a request with a reply as a barrier so that everything above has
            // been processed before the first kick.
            let _ = c.get_u64(GET_FEATURES);
            c
        }

        fn put<T: Copy>(&mut self, off: usize, v: T) {
            unsafe { std::ptr::write_volatile(self.mem.add(off).cast::<T>(), v) }
        }

        fn get<T: Copy>(&self, off: usize) -> T {
            unsafe { std::ptr::read_volatile(self.mem.add(off).cast::<T>()) }
        }

        pub fn data(&mut self) -> &mut [u8] {
            unsafe { std::slice::from_raw_parts_mut(self.mem.add(DATA_OFF), MAX_DATA) }
        }

        fn set_desc(&mut self, i: usize, off: usize, len: u32, write: bool, next: Option<u16>) {
            let d = DESC_OFF + 16 * i;
            self.put(d, self.mem as u64 + off as u64);
            self.put(d + 8, len);
            let flags: u16 = (if next.is_some() { 1 } else { 0 }) | (if write { 2 } else { 0 });
            self.put(d + 12, flags);
            self.put(d + 14, next.unwrap_or(0));
        }

        /// Submit one request and wait (≤ 10 s) for it. `data_len` bytes at `data()` are the
        /// payload (device-readable for OUT, device-writable for IN/GET_ID); `seg` is a
        /// discard/write-zeroes segment. Returns the status byte.
        pub fn request(
            &mut self,
            req_type: u32,
            sector: u64,
            data_len: usize,
            seg: Option<(u64, u32, u32)>,
        ) -> u8 {
            assert!(data_len <= MAX_DATA);
            self.put(HDR_OFF, req_type);
            self.put(HDR_OFF + 4, 0u32);
            self.put(HDR_OFF + 8, sector);
            self.put(STATUS_OFF, 0xffu8);
            let device_writes = matches!(req_type, T_IN | T_GET_ID);
            let mut n = 0;
            self.set_desc(0, HDR_OFF, 16, false, Some(1));
            n += 1;
            if let Some((s, num, flags)) = seg {
                self.put(SEG_OFF, s);
                self.put(SEG_OFF + 8, num);
                self.put(SEG_OFF + 12, flags);
                self.set_desc(n, SEG_OFF, 16, false, Some(n as u16 + 1));
                n += 1;
            } else if data_len > 0 {
                self.set_desc(
                    n,
                    DATA_OFF,
                    data_len as u32,
                    device_writes,
                    Some(n as u16 + 1),
                );
                n += 1;
            }
            self.set_desc(n, STATUS_OFF, 1, true, None);

            let slot = AVAIL_OFF + 4 + 2 * (self.avail_idx % QSIZE) as usize;
            self.put(slot, 0u16);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.put(AVAIL_OFF + 2, self.avail_idx);
            fence(Ordering::SeqCst);
            let one = 1u64.to_ne_bytes();
            assert_eq!(unsafe { libc::write(self.kick, one.as_ptr().cast(), 8) }, 8);

            let deadline = Instant::now() + WAIT_TIMEOUT;
            while self.get::<u16>(USED_OFF + 2) != self.avail_idx {
                assert!(
                    Instant::now() < deadline,
                    "raw vhost-user request type {req_type} sector {sector} not completed within {WAIT_TIMEOUT:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            fence(Ordering::SeqCst);
            self.get::<u8>(STATUS_OFF)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for the crash-consistency and ENOSPC tests (tests/crash_consistency.rs,
// tests/enospc.rs). Appended; nothing above depends on them.
// ---------------------------------------------------------------------------------------------

impl Daemon {
    /// Like [`Daemon::start`], but with an explicit image format (`"raw"` or `"qcow2"`), a
    /// stale socket from a killed predecessor removed first (otherwise the wait for the socket
    /// would return before the new process has bound it), and the log appended to (so the logs
    /// of every incarnation of a crash loop are kept in one file). With
    /// `VUB_TEST_BACKEND=qsd`, qemu-storage-daemon is started with a `qcow2` (or `raw`) node on
    /// top of the file node.
    pub fn start_format(dir: &Path, image: &Path, format: &str, cfg: &DaemonConfig) -> Daemon {
        let backend = backend();
        let socket = dir.join("vhost-user-blk.sock");
        let log_path = dir.join("daemon.log");
        let _ = fs::remove_file(&socket);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open daemon log file");
        let _ = writeln!(log, "===== start {format} {} =====", image.display());
        let mut cmd = match backend {
            Backend::Ours => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
                cmd.arg("--socket-path")
                    .arg(&socket)
                    .arg("--blk-file")
                    .arg(image)
                    .arg("--format")
                    .arg(format);
                if cfg.read_only {
                    cmd.arg("--read-only");
                }
                if let Some(n) = cfg.num_queues {
                    cmd.arg("--num-queues").arg(n.to_string());
                }
                if let Some(n) = cfg.queue_size {
                    cmd.arg("--queue-size").arg(n.to_string());
                }
                if let Some(n) = cfg.logical_block_size {
                    cmd.arg("--logical-block-size").arg(n.to_string());
                }
                if cfg.direct {
                    cmd.arg("--direct");
                }
                if cfg.writethrough {
                    cmd.arg("--writethrough");
                }
                cmd.args(&cfg.extra_args);
                cmd
            }
            Backend::Qsd => {
                let bin =
                    std::env::var("VUB_QSD_BIN").unwrap_or_else(|_| "qemu-storage-daemon".into());
                let mut cmd = Command::new(bin);
                let img = image.to_str().expect("utf-8 image path");
                let sock = socket.to_str().expect("utf-8 socket path");
                assert!(!img.contains(',') && !sock.contains(','));
                let ro = if cfg.read_only { ",read-only=on" } else { "" };
                cmd.arg("--blockdev")
                    .arg(format!("driver=file,node-name=f0,filename={img}{ro}"))
                    .arg("--blockdev")
                    .arg(format!("driver={format},node-name=n0,file=f0{ro}"))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},\
                         writable={}{}",
                        if cfg.read_only { "off" } else { "on" },
                        cfg.num_queues
                            .map(|n| format!(",num-queues={n}"))
                            .unwrap_or_default()
                    ));
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to spawn {backend:?} backend ({cmd:?}): {e}"));
        let mut d = Daemon {
            child: Some(child),
            socket,
            log_path,
            backend,
        };
        d.wait_for_socket();
        d
    }

    /// Non-blocking: has the process exited? (Reaps it if so.)
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child_mut().try_wait().expect("try_wait");
        if st.is_some() {
            self.child = None;
        }
        st
    }
}

/// Result of `qemu-img check`: exit code (0 clean, 1 check failed, 2 corruption, 3 leaks only)
/// and the combined output.
#[derive(Debug)]
pub struct QemuImgCheck {
    pub code: i32,
    pub output: String,
}

impl QemuImgCheck {
    pub fn clean(&self) -> bool {
        self.code == 0 && self.output.contains("No errors were found")
    }
    /// Number of leaked clusters reported ("N leaked clusters were found"), 0 if none.
    pub fn leaked(&self) -> u64 {
        self.output
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_suffix(" leaked clusters were found on the image.")
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Run `qemu-img check [-f fmt] image` (bounded by the time qemu-img needs; it does not block on
/// anything external) and return its exit code and output.
pub fn qemu_img_check(image: &Path) -> QemuImgCheck {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg("-f")
        .arg("qcow2")
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img check: {e}"));
    QemuImgCheck {
        code: out.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Run `qemu-img` with `args`, panicking with its output on failure.
#[track_caller]
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?} failed: {text}");
    text
}

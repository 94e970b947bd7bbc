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
}

/// A running backend process. Killed (SIGKILL) and reaped on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub backend: Backend,
}

fn backend_command(
    backend: Backend,
    socket: &Path,
    image: &Path,
    cfg: &DaemonConfig,
) -> Command {
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
            cmd.arg("--blockdev").arg(blockdev).arg("--export").arg(export);
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
    assert!(offset % 8 == 0 && len % 8 == 0);
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
    f.write_all(&vec![0xA5u8; (size - aligned) as usize]).expect("write image tail");
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
        let first = actual.iter().zip(expected).position(|(a, b)| a != b).unwrap();
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
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8>, flags: ReqFlags },
    WriteZeroes { offset: u64, len: u64, flags: ReqFlags },
    Discard { offset: u64, len: u64 },
    Flush,
}

impl Queue {
    pub fn buf(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    /// Wait (≤ 10 s overall) for exactly `n` completions and return them.
    pub fn wait(&mut self, n: usize) -> Vec<Done> {
        let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
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
        assert!(pos <= self.buf_len, "batch needs {pos} bytes of buffer, have {}", self.buf_len);
        assert!(reqs.len() <= CLIENT_QUEUE_SIZE as usize / 2, "too many requests in one batch");
        for (i, r) in reqs.iter().enumerate() {
            let p = unsafe { self.buf.add(offs[i]) };
            match r {
                Req::Read { offset, len } => {
                    unsafe { std::ptr::write_bytes(p, 0xEE, *len) };
                    self.q.read(*offset, p, *len, i, ReqFlags::empty());
                }
                Req::Write { offset, data, flags } => {
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
            assert!(d.user_data < reqs.len(), "completion with unknown user_data {}", d.user_data);
            assert!(res[d.user_data].is_none(), "duplicate completion for request {}", d.user_data);
            let idx = d.user_data;
            res[idx] = Some(d);
        }
        res.into_iter()
            .enumerate()
            .map(|(i, d)| {
                let d = d.unwrap();
                let data = match &reqs[i] {
                    Req::Read { len, .. } if d.ret == 0 => {
                        Some(unsafe { std::slice::from_raw_parts(self.buf.add(offs[i]), *len) }.to_vec())
                    }
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
        self.one(Req::Write { offset, data: data.to_vec(), flags: ReqFlags::empty() }).0
    }

    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: ReqFlags) -> Done {
        self.one(Req::Write { offset, data: data.to_vec(), flags }).0
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
            panic!("read of {len} bytes at offset {offset} failed: {}", d.errno_name())
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
        assert_eq!(d.ret, 0, "write of {} bytes at offset {offset} failed: {}", data.len(), d.errno_name());
    }
}

/// A started blkio `virtio-blk-vhost-user` instance.
pub struct Client {
    // Field order matters for drop: queues, then region/blkio.
    pub queues: Vec<Queue>,
    region: MemoryRegion,
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
    Ok(Client { queues, region, blkio: b })
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

impl Drop for Client {
    fn drop(&mut self) {
        // Drop the queues first, then unmap the region; the Blkio (socket) goes last, which
        // disconnects from the backend.
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
    }
}

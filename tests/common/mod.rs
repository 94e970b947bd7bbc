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
        let cmd = backend_command(backend, &socket, image, cfg);
        Daemon::spawn(cmd, backend, socket, log_path, log)
    }

    /// Spawns `cmd` (a `backend` process that will listen on `socket`) with its stdout and
    /// stderr to `log` (open on `log_path`), and waits (≤ 10 s) for the socket. Panics (with
    /// the log) if it exits or never creates the socket.
    pub fn spawn(
        mut cmd: Command,
        backend: Backend,
        socket: PathBuf,
        log_path: PathBuf,
        log: File,
    ) -> Daemon {
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
    pub fn wait_exit(&mut self, why: &str) -> ExitStatus {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
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

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    /// Err(why) when this cannot be done here (not root, no losetup, no loop devices).
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("loop devices need root".into());
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDev { dev: dev.into() })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

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

/// A deliberately minimal, synchronous vhost-user-blk frontend: one split virtqueue, driven by
/// polling its used ring. It exists to do what blkio will not:
///
/// * send requests blkio refuses to send: writes, discards and write-zeroes to a device that
///   advertises VIRTIO_BLK_F_RO (blkio fails them client-side), VIRTIO_BLK_T_GET_ID, unknown
///   request types, data buffers outside guest memory;
/// * speak the protocol message by message: features, protocol features, the configuration
///   space, memory table updates ([`RawClient::send`], [`RawClient::call`], [`RawClient::ack`]);
/// * keep several requests in flight ([`RawClient::submit`], [`RawClient::kick`]) and, with
///   inflight I/O tracking ([`RawOpts::inflight`]), reconnect to a new daemon with the same
///   guest memory, rings and inflight region ([`RawClient::reconnect`]), as QEMU does when its
///   backend restarts.
///
/// Guest memory is one memfd region whose guest addresses equal our virtual addresses. Acks no
/// EVENT_IDX and no indirect descriptors. Each request uses a slot of three descriptors (head
/// `3 * slot`: header, then data or a segment, then the status byte) with its own header and
/// status byte, so up to `queue_size / 3` requests can be in flight.
pub mod raw {
    use super::WAIT_TIMEOUT;
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

    // Virtio feature bits (virtio 1.2, 5.2.3 and 6).
    pub const F_SEG_MAX: u64 = 1 << 2;
    pub const F_RO: u64 = 1 << 5;
    pub const F_BLK_SIZE: u64 = 1 << 6;
    pub const F_FLUSH: u64 = 1 << 9;
    pub const F_TOPOLOGY: u64 = 1 << 10;
    pub const F_CONFIG_WCE: u64 = 1 << 11;
    pub const F_MQ: u64 = 1 << 12;
    pub const F_DISCARD: u64 = 1 << 13;
    pub const F_WRITE_ZEROES: u64 = 1 << 14;
    pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const F_RING_EVENT_IDX: u64 = 1 << 29;
    pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const F_VERSION_1: u64 = 1 << 32;
    /// The virtio features [`RawOpts::default`] acks (those of them the device offers).
    pub const DEFAULT_FEATURES: u64 = F_VERSION_1
        | F_PROTOCOL_FEATURES
        | F_RO
        | F_BLK_SIZE
        | F_FLUSH
        | F_DISCARD
        | F_WRITE_ZEROES;

    // Protocol feature bits (vhost-user.rst, "Protocol features").
    pub const PF_MQ: u64 = 1 << 0;
    pub const PF_REPLY_ACK: u64 = 1 << 3;
    pub const PF_CONFIG: u64 = 1 << 9;
    pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

    // Frontend message types (vhost-user.rst, "Front-end message types").
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;

    const FLAG_VERSION: u32 = 0x1;
    const FLAG_REPLY: u32 = 0x4;
    const FLAG_NEED_REPLY: u32 = 0x8;

    /// Size of the guest memory region every client has.
    pub const MEM_LEN: usize = 2 << 20;
    /// Largest queue size the ring layout below has room for.
    pub const MAX_QUEUE_SIZE: u16 = 64;
    const DESC_OFF: usize = 0;
    const AVAIL_OFF: usize = 1024;
    const USED_OFF: usize = 2048;
    /// Request headers, 16 bytes per slot.
    const HDR_OFF: usize = 4096;
    /// Discard / write-zeroes segments, 16 bytes per slot.
    const SEG_OFF: usize = 4096 + 512;
    /// Status bytes, one per slot.
    const STATUS_OFF: usize = 4096 + 1024;
    pub const DATA_OFF: usize = 8192;
    pub const MAX_DATA: usize = MEM_LEN - DATA_OFF;

    /// A shared memory region backed by a memfd and mapped into this process; its guest
    /// address is its address here. Unmapped on drop.
    pub struct GuestMem {
        fd: OwnedFd,
        ptr: *mut u8,
        len: usize,
    }

    impl GuestMem {
        /// A zeroed region of `len` bytes.
        pub fn new(len: usize) -> GuestMem {
            // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
            let raw = unsafe { libc::memfd_create(c"raw-vhost-user".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
            // SAFETY: `raw` was just created and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            File::from(fd.try_clone().expect("dup memfd"))
                .set_len(len as u64)
                .expect("size the memfd");
            // SAFETY: a new shared mapping of our own memfd, which is `len` bytes long; it is
            // unmapped only in Drop.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            GuestMem {
                fd,
                ptr: ptr.cast(),
                len,
            }
        }

        /// Guest address of the first byte.
        pub fn addr(&self) -> u64 {
            self.ptr as u64
        }

        /// The memfd.
        pub fn fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }

        /// The region as vhost-user messages describe it: `[guest address, size, our address,
        /// offset in the fd]`.
        pub fn region(&self) -> [u64; 4] {
            [self.addr(), self.len as u64, self.addr(), 0]
        }

        /// The bytes `off..off + len`.
        pub fn bytes(&mut self, off: usize, len: usize) -> &mut [u8] {
            assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
            // SAFETY: the range is inside our live mapping (checked above) and borrowed
            // mutably from `self`. The daemon writes only where requests point; tests read
            // a buffer only after its request completed.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
        }

        fn put<T: Copy>(&self, off: usize, v: T) {
            assert!(off + std::mem::size_of::<T>() <= self.len);
            // SAFETY: inside our live mapping (checked above); a volatile write, because the
            // daemon shares this memory.
            unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<T>(), v) }
        }

        fn get<T: Copy>(&self, off: usize) -> T {
            assert!(off + std::mem::size_of::<T>() <= self.len);
            // SAFETY: inside our live mapping (checked above); a volatile read, because the
            // daemon writes this memory concurrently.
            unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<T>()) }
        }
    }

    impl Drop for GuestMem {
        fn drop(&mut self) {
            // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped only here.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// A SET_MEM_TABLE payload for `regions`, each `[guest address, size, our address, fd
    /// offset]` (one fd per region goes with the message).
    pub fn mem_table(regions: &[[u64; 4]]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes()); // padding
        for v in regions.iter().flatten() {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// An ADD_MEM_REG / REM_MEM_REG payload for one region (see [`mem_table`]).
    pub fn mem_region(region: [u64; 4]) -> Vec<u8> {
        let mut p = 0u64.to_le_bytes().to_vec(); // padding
        for v in region {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// How [`RawClient::connect_with`] sets up the connection.
    #[derive(Clone, Copy, Debug)]
    pub struct RawOpts {
        /// Virtqueue size: a power of two, at most [`MAX_QUEUE_SIZE`].
        pub queue_size: u16,
        /// Virtio features to ack (only those the device offers are acked).
        pub features: u64,
        /// Protocol features to ack (only those the backend offers are acked). With
        /// REPLY_ACK, every setup message after SET_PROTOCOL_FEATURES is checked.
        pub protocol_features: u64,
        /// Inflight I/O tracking: ack INFLIGHT_SHMFD, GET_INFLIGHT_FD on the first connection
        /// and SET_INFLIGHT_FD on every connection (QEMU's order: before the memory table).
        pub inflight: bool,
    }

    impl Default for RawOpts {
        fn default() -> Self {
            RawOpts {
                queue_size: 16,
                features: DEFAULT_FEATURES,
                protocol_features: 0,
                inflight: false,
            }
        }
    }

    /// One request for [`RawClient::submit`].
    #[derive(Clone, Copy, Debug)]
    pub struct RawReq {
        /// `T_IN`, `T_OUT`, ... (or anything else, to test refusal).
        pub req_type: u32,
        /// The header's sector.
        pub sector: u64,
        /// The data buffer: guest address and length (device-writable for IN and GET_ID).
        pub data: Option<(u64, u32)>,
        /// Instead of data: one discard / write-zeroes segment (sector, sectors, flags).
        pub seg: Option<(u64, u32, u32)>,
    }

    /// One used ring entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Used {
        /// Descriptor head of the request.
        pub head: u16,
        /// Bytes the device says it wrote.
        pub len: u32,
        /// The request's status byte now (0xff: the device did not write it).
        pub status: u8,
    }

    /// One frontend connection with its guest memory, virtqueue 0 and (optionally) inflight
    /// region; see the module documentation.
    pub struct RawClient {
        sock: UnixStream,
        mem: GuestMem,
        kick: OwnedFd,
        call: OwnedFd,
        opts: RawOpts,
        avail_idx: u16,
        next_slot: u16,
        /// Protocol features acked on this connection.
        acked_protocol: u64,
        /// The inflight region GET_INFLIGHT_FD returned (fd and the reply's payload), handed
        /// back with SET_INFLIGHT_FD on every connection.
        inflight: Option<(OwnedFd, Vec<u8>)>,
        /// Features the device offered (before our masking).
        pub device_features: u64,
        /// Protocol features the backend offered.
        pub protocol_features: u64,
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn open(socket: &Path) -> UnixStream {
        let sock = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        sock.set_read_timeout(Some(WAIT_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(WAIT_TIMEOUT)).unwrap();
        sock
    }

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// A msghdr for one iovec and the control buffer `control` (u64s: aligned for cmsghdr).
    fn msghdr(iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
        // SAFETY: an all-zero msghdr is valid (no buffers).
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(control) as _;
        mh
    }

    fn u64_of(b: &[u8]) -> u64 {
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    impl RawClient {
        /// Connects with [`RawOpts::default`] and sets up virtqueue 0 (accepting
        /// VIRTIO_BLK_F_RO if offered).
        pub fn connect(socket: &Path) -> RawClient {
            Self::connect_with(socket, RawOpts::default())
        }

        /// Connects with `opts` and sets up virtqueue 0 with fresh guest memory.
        pub fn connect_with(socket: &Path, opts: RawOpts) -> RawClient {
            assert!(
                opts.queue_size.is_power_of_two()
                    && (4..=MAX_QUEUE_SIZE).contains(&opts.queue_size),
                "queue size {}",
                opts.queue_size
            );
            let mut c = RawClient {
                sock: open(socket),
                mem: GuestMem::new(MEM_LEN),
                kick: eventfd(),
                call: eventfd(),
                opts,
                avail_idx: 0,
                next_slot: 0,
                acked_protocol: 0,
                inflight: None,
                device_features: 0,
                protocol_features: 0,
            };
            c.setup(0);
            c
        }

        /// Connects to (a new daemon on) `socket` as a frontend does after its backend died:
        /// the same guest memory, rings, eventfds and inflight region, with the queue's base
        /// (SET_VRING_BASE) set to `vring_base`. QEMU sends the used index there when the old
        /// connection broke (it could not ask for the base); the avail index is what a
        /// frontend that never rewinds would send.
        pub fn reconnect(&mut self, socket: &Path, vring_base: u16) {
            self.sock = open(socket);
            self.setup(vring_base);
        }

        fn setup(&mut self, vring_base: u16) {
            self.send(SET_OWNER, &[], &[]);
            self.device_features = self.get_u64(GET_FEATURES);
            assert!(
                self.device_features & F_PROTOCOL_FEATURES != 0,
                "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
            );
            let acked = self.device_features & self.opts.features;
            self.send(SET_FEATURES, &acked.to_le_bytes(), &[]);
            self.protocol_features = self.get_u64(GET_PROTOCOL_FEATURES);
            let wanted = self.opts.protocol_features
                | if self.opts.inflight {
                    PF_INFLIGHT_SHMFD
                } else {
                    0
                };
            self.acked_protocol = wanted & self.protocol_features;
            assert!(
                !self.opts.inflight || self.acked_protocol & PF_INFLIGHT_SHMFD != 0,
                "backend lacks INFLIGHT_SHMFD"
            );
            let acked_protocol = self.acked_protocol;
            self.send(SET_PROTOCOL_FEATURES, &acked_protocol.to_le_bytes(), &[]);
            if self.opts.inflight {
                self.set_inflight();
            }
            let table = mem_table(&[self.mem.region()]);
            let memfd = self.mem.fd();
            self.setup_msg(SET_MEM_TABLE, &table, &[memfd]);

            let state = |num: u16| [0u32.to_le_bytes(), u32::from(num).to_le_bytes()].concat();
            self.setup_msg(SET_VRING_NUM, &state(self.opts.queue_size), &[]);
            self.setup_msg(SET_VRING_BASE, &state(vring_base), &[]);
            let base = self.mem.addr();
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
            self.setup_msg(SET_VRING_ADDR, &addr, &[]);
            let (kick, call) = (self.kick.as_raw_fd(), self.call.as_raw_fd());
            self.setup_msg(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick]);
            self.setup_msg(SET_VRING_CALL, &0u64.to_le_bytes(), &[call]);
            self.setup_msg(SET_VRING_ENABLE, &state(1), &[]);
            // A request with a reply as a barrier, so that everything above has been
            // processed before the first kick.
            let _ = self.get_u64(GET_FEATURES);
        }

        /// GET_INFLIGHT_FD for one queue (first connection only), then SET_INFLIGHT_FD.
        fn set_inflight(&mut self) {
            if self.inflight.is_none() {
                let mut p = [0u8; 24];
                p[16..18].copy_from_slice(&1u16.to_le_bytes()); // num_queues
                p[18..20].copy_from_slice(&self.opts.queue_size.to_le_bytes());
                let (reply, mut fds) = self
                    .call(GET_INFLIGHT_FD, &p, &[])
                    .unwrap_or_else(|e| panic!("GET_INFLIGHT_FD: {e}"));
                assert_eq!(reply.len(), 24, "GET_INFLIGHT_FD reply size");
                assert!(u64_of(&reply[0..8]) > 0, "GET_INFLIGHT_FD: no region");
                assert_eq!(fds.len(), 1, "GET_INFLIGHT_FD reply fds");
                self.inflight = Some((fds.remove(0), reply));
            }
            let (fd, payload) = self
                .inflight
                .as_ref()
                .map(|(fd, p)| (fd.as_raw_fd(), p.clone()))
                .expect("an inflight region");
            self.setup_msg(SET_INFLIGHT_FD, &payload, &[fd]);
        }

        /// A setup message: checked with REPLY_ACK when that was negotiated, else just sent.
        fn setup_msg(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) {
            if self.acked_protocol & PF_REPLY_ACK != 0 {
                let status = self
                    .ack(req, payload, fds)
                    .unwrap_or_else(|e| panic!("vhost-user request {req}: {e}"));
                assert_eq!(status, 0, "vhost-user request {req} failed");
            } else {
                self.send(req, payload, fds);
            }
        }

        fn send_msg(
            &mut self,
            req: u32,
            flags: u32,
            payload: &[u8],
            fds: &[RawFd],
        ) -> io::Result<()> {
            let mut msg = Vec::with_capacity(12 + payload.len());
            msg.extend_from_slice(&req.to_le_bytes());
            msg.extend_from_slice(&(FLAG_VERSION | flags).to_le_bytes());
            msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            msg.extend_from_slice(payload);
            if fds.is_empty() {
                return self.sock.write_all(&msg);
            }
            let fd_bytes = std::mem::size_of_val(fds) as u32;
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
            let mut cbuf = vec![0u64; space.div_ceil(8)];
            let mut iov = iovec(&mut msg);
            let mh = msghdr(&mut iov, &mut cbuf);
            // SAFETY: `mh` points at `cbuf`, which has room for one cmsghdr carrying `fds`
            // (CMSG_SPACE above), so the first header and its data are inside it; `iov`
            // points at `msg`; all live across the sendmsg call.
            let n = unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
                libc::sendmsg(self.sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            self.sock.write_all(&msg[n as usize..])
        }

        /// Reads the reply to `req`: its payload and the fds that came with it.
        fn recv_reply(&mut self, req: u32) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
            const MAX_FDS: usize = 8;
            let mut hdr = [0u8; 12];
            let mut cbuf = [0u64; 16]; // >= CMSG_SPACE(8 fds), aligned for cmsghdr
            let mut iov = iovec(&mut hdr);
            let mut mh = msghdr(&mut iov, &mut cbuf);
            // SAFETY: `iov` points at `hdr` and `msg_control` at `cbuf`, both live locals of
            // the sizes given.
            let n =
                unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut fds = Vec::new();
            // SAFETY: the kernel filled `cbuf` with `msg_controllen` bytes of control
            // messages; CMSG_FIRSTHDR/NXTHDR stay inside them, and SCM_RIGHTS data are fds
            // now owned by us (each taken once).
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&mh);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c).cast::<RawFd>();
                        let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                        for i in 0..(len / std::mem::size_of::<RawFd>()).min(MAX_FDS) {
                            fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&mh, c);
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed instead of a reply to {req}"),
                ));
            }
            self.sock.read_exact(&mut hdr[n as usize..])?;
            let r = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
            assert_eq!(r, req, "reply for wrong request");
            assert!(
                flags & FLAG_REPLY != 0,
                "reply to {req} without the reply flag"
            );
            let mut payload = vec![0u8; size as usize];
            self.sock.read_exact(&mut payload)?;
            Ok((payload, fds))
        }

        /// Sends a message that has no reply; panics if the connection is gone.
        pub fn send(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) {
            self.send_msg(req, 0, payload, fds)
                .unwrap_or_else(|e| panic!("vhost-user send {req}: {e}"));
        }

        /// Sends a message that has a reply (the GET_* messages) and returns the reply's
        /// payload and fds.
        pub fn call(
            &mut self,
            req: u32,
            payload: &[u8],
            fds: &[RawFd],
        ) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
            self.send_msg(req, 0, payload, fds)?;
            self.recv_reply(req)
        }

        /// Sends a message with NEED_REPLY (REPLY_ACK must have been negotiated) and returns
        /// the backend's status (0: success). An error means the backend closed the
        /// connection (or did not answer within 10 s).
        pub fn ack(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<u64> {
            self.send_msg(req, FLAG_NEED_REPLY, payload, fds)?;
            let (reply, _) = self.recv_reply(req)?;
            assert_eq!(reply.len(), 8, "REPLY_ACK payload size for request {req}");
            Ok(u64_of(&reply))
        }

        /// Sends `req` and returns its u64 reply (GET_FEATURES, GET_QUEUE_NUM, ...).
        pub fn get_u64(&mut self, req: u32) -> u64 {
            let (reply, _) = self
                .call(req, &[], &[])
                .unwrap_or_else(|e| panic!("vhost-user request {req}: {e}"));
            assert_eq!(reply.len(), 8, "unexpected reply size for request {req}");
            u64_of(&reply)
        }

        /// GET_CONFIG of `size` bytes at `offset` (needs protocol feature CONFIG): the bytes
        /// of the reply after its offset/size/flags header (empty: the backend failed it).
        pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
            let mut p = Vec::new();
            for v in [offset, size, 0] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p.resize(12 + size as usize, 0);
            let (reply, _) = self
                .call(GET_CONFIG, &p, &[])
                .unwrap_or_else(|e| panic!("GET_CONFIG: {e}"));
            assert!(
                reply.len() >= 12,
                "GET_CONFIG reply of {} bytes",
                reply.len()
            );
            let got = u32::from_le_bytes(reply[4..8].try_into().unwrap()) as usize;
            assert_eq!(got, reply.len() - 12, "GET_CONFIG reply size field");
            reply[12..].to_vec()
        }

        /// SET_CONFIG of `data` at `offset` with NEED_REPLY (needs CONFIG and REPLY_ACK);
        /// returns the backend's status, or an error if it closed the connection.
        pub fn set_config(&mut self, offset: u32, data: &[u8]) -> io::Result<u64> {
            let mut p = Vec::new();
            for v in [offset, data.len() as u32, 0] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p.extend_from_slice(data);
            self.ack(SET_CONFIG, &p, &[])
        }

        /// The guest memory.
        pub fn mem(&mut self) -> &mut GuestMem {
            &mut self.mem
        }

        /// The data area (guest memory from [`DATA_OFF`]).
        pub fn data(&mut self) -> &mut [u8] {
            self.mem.bytes(DATA_OFF, MAX_DATA)
        }

        /// Guest address of `data()[off]`.
        pub fn data_addr(&self, off: usize) -> u64 {
            assert!(off < MAX_DATA);
            self.mem.addr() + (DATA_OFF + off) as u64
        }

        /// A request whose data buffer is `data()[off..off + len]` (none if `len` is 0).
        pub fn req(&self, req_type: u32, sector: u64, off: usize, len: usize) -> RawReq {
            assert!(off + len <= MAX_DATA);
            RawReq {
                req_type,
                sector,
                data: (len > 0).then(|| (self.data_addr(off), len as u32)),
                seg: None,
            }
        }

        fn slots(&self) -> u16 {
            self.opts.queue_size / 3
        }

        fn set_desc(&mut self, i: u16, addr: u64, len: u32, write: bool, next: Option<u16>) {
            let d = DESC_OFF + 16 * usize::from(i);
            self.mem.put(d, addr);
            self.mem.put(d + 8, len);
            let flags: u16 = u16::from(next.is_some()) | if write { 2 } else { 0 };
            self.mem.put(d + 12, flags);
            self.mem.put(d + 14, next.unwrap_or(0));
        }

        /// Puts `req` on the avail ring in the next free slot and returns its descriptor
        /// head. The device does not see it before [`Self::kick`].
        pub fn submit(&mut self, req: &RawReq) -> u16 {
            let in_flight = self.avail_idx.wrapping_sub(self.used_idx());
            assert!(
                in_flight < self.slots(),
                "{in_flight} requests in flight: no free slot"
            );
            let slot = self.next_slot;
            self.next_slot = (slot + 1) % self.slots();
            let s = usize::from(slot);
            let base = self.mem.addr();
            let head = 3 * slot;
            self.mem.put(HDR_OFF + 16 * s, req.req_type);
            self.mem.put(HDR_OFF + 16 * s + 4, 0u32);
            self.mem.put(HDR_OFF + 16 * s + 8, req.sector);
            self.mem.put(STATUS_OFF + s, 0xffu8);
            let hdr_addr = base + (HDR_OFF + 16 * s) as u64;
            self.set_desc(head, hdr_addr, 16, false, Some(head + 1));
            let mut last = head + 1;
            if let Some((sector, num, flags)) = req.seg {
                let seg = SEG_OFF + 16 * s;
                self.mem.put(seg, sector);
                self.mem.put(seg + 8, num);
                self.mem.put(seg + 12, flags);
                self.set_desc(last, base + seg as u64, 16, false, Some(last + 1));
                last += 1;
            } else if let Some((addr, len)) = req.data {
                let device_writes = matches!(req.req_type, T_IN | T_GET_ID);
                self.set_desc(last, addr, len, device_writes, Some(last + 1));
                last += 1;
            }
            self.set_desc(last, base + (STATUS_OFF + s) as u64, 1, true, None);
            let pos = usize::from(self.avail_idx % self.opts.queue_size);
            self.mem.put(AVAIL_OFF + 4 + 2 * pos, head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            head
        }

        /// Publishes every submitted request (the avail index) and kicks the queue.
        pub fn kick(&mut self) {
            fence(Ordering::SeqCst);
            self.mem.put(AVAIL_OFF + 2, self.avail_idx);
            fence(Ordering::SeqCst);
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local to our own eventfd.
            let n = unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
            assert_eq!(n, 8, "kick: {}", io::Error::last_os_error());
        }

        /// Number of requests submitted so far (mod 2^16): the next avail index.
        pub fn avail_idx(&self) -> u16 {
            self.avail_idx
        }

        /// The used index the device last published.
        pub fn used_idx(&self) -> u16 {
            let idx = self.mem.get::<u16>(USED_OFF + 2);
            fence(Ordering::SeqCst);
            idx
        }

        /// Waits (≤ 10 s) until the used index reaches (or passes) `idx`.
        #[track_caller]
        pub fn wait_used(&self, idx: u16) {
            let deadline = Instant::now() + WAIT_TIMEOUT;
            while (self.used_idx().wrapping_sub(idx) as i16) < 0 {
                assert!(
                    Instant::now() < deadline,
                    "used index still {} after {WAIT_TIMEOUT:?}, waiting for {idx}",
                    self.used_idx()
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }

        /// The used ring entries `from..to` (at most a queue's worth), with each request's
        /// status byte as it is now.
        pub fn completions(&self, from: u16, to: u16) -> Vec<Used> {
            let n = to.wrapping_sub(from);
            assert!(n <= self.opts.queue_size, "{n} used entries requested");
            (0..n)
                .map(|i| {
                    let pos = usize::from(from.wrapping_add(i) % self.opts.queue_size);
                    let e = USED_OFF + 4 + 8 * pos;
                    let head = self.mem.get::<u32>(e) as u16;
                    let slot = usize::from(head / 3);
                    let status = if head.is_multiple_of(3) && slot < usize::from(self.slots()) {
                        self.mem.get::<u8>(STATUS_OFF + slot)
                    } else {
                        0xff
                    };
                    Used {
                        head,
                        len: self.mem.get::<u32>(e + 4),
                        status,
                    }
                })
                .collect()
        }

        /// Submits `req`, kicks and waits (≤ 10 s) for it; returns its status byte. Only with
        /// nothing else in flight.
        #[track_caller]
        pub fn run(&mut self, req: &RawReq) -> u8 {
            let head = self.submit(req);
            self.kick();
            let idx = self.avail_idx;
            self.wait_used(idx);
            let done = self.completions(idx.wrapping_sub(1), idx);
            assert_eq!(
                done[0].head, head,
                "completed a request that was not submitted"
            );
            done[0].status
        }

        /// Submits one request and waits (≤ 10 s) for it. `data_len` bytes at `data()` are the
        /// payload (device-readable for OUT, device-writable for IN/GET_ID); `seg` is a
        /// discard/write-zeroes segment. Returns the status byte.
        #[track_caller]
        pub fn request(
            &mut self,
            req_type: u32,
            sector: u64,
            data_len: usize,
            seg: Option<(u64, u32, u32)>,
        ) -> u8 {
            let mut req = self.req(
                req_type,
                sector,
                0,
                if seg.is_some() { 0 } else { data_len },
            );
            req.seg = seg;
            self.run(&req)
        }

        /// The whole inflight region as it is now (empty without [`RawOpts::inflight`]).
        pub fn inflight_region(&self) -> Vec<u8> {
            let Some((fd, payload)) = &self.inflight else {
                return Vec::new();
            };
            let size = u64_of(&payload[0..8]) as usize;
            let offset = u64_of(&payload[8..16]);
            let f = File::from(fd.try_clone().expect("dup inflight fd"));
            let mut buf = vec![0u8; size];
            f.read_exact_at(&mut buf, offset)
                .expect("read the inflight region");
            buf
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
        let cmd = match backend {
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
        Daemon::spawn(cmd, backend, socket, log_path, log)
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

//! The libblkio client: a thin synchronous wrapper around the `blkio` crate's
//! `virtio-blk-vhost-user` driver, an independent vhost-user-blk frontend, with one I/O buffer
//! per queue carved out of a single mapped memory region.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Instant;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::WAIT_TIMEOUT;

/// Default virtqueue size requested by the tests' client. blkio's own default is 256; 128 is what
/// QEMU's vhost-user-blk device historically uses and is accepted by every backend.
pub const CLIENT_QUEUE_SIZE: i32 = 128;

/// Per-queue I/O buffer size (bytes).
pub const QUEUE_BUF_SIZE: usize = 1 << 20;

/// How [`Client::new`] sets up the blkio instance.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    /// Queues to start.
    pub num_queues: i32,
    /// Entries per queue.
    pub queue_size: i32,
    /// blkio's `read-only` (it then refuses writes itself).
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
    /// The request's user_data (its index in a batch).
    pub user_data: usize,
    /// 0 or a negative errno.
    pub ret: i32,
    /// blkio's message for a client-side refusal.
    pub msg: Option<String>,
}

impl Done {
    fn from_completion(c: &Completion) -> Done {
        let msg = if c.error_msg.is_null() {
            None
        } else {
            Some(
                // SAFETY: libblkio sets a non-null error_msg to a NUL-terminated string that
                // lives until the next call on the queue; it is copied here at once.
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

    /// The result in words: "success", or the errno with its name (and blkio's message for a
    /// client-side refusal).
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
    /// The blkio queue.
    pub q: Blkioq,
    /// Its index.
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
    /// This queue's I/O buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: `buf..buf + buf_len` is this queue's own slice of the Client's mapped region
        // (see `Send` above), borrowed mutably through `self`; no request is in flight
        // between calls (`batch` waits for all of its completions).
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
                // SAFETY: do_io initialised the first `k` entries it was given.
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
            // SAFETY: offs[i] + the request's length <= buf_len (asserted above), so `p` and
            // the bytes written through it below stay inside this queue's buffer; requests
            // get disjoint ranges and none is in flight yet.
            let p = unsafe { self.buf.add(offs[i]) };
            match r {
                Req::Read { offset, len } => {
                    // SAFETY: see `p`.
                    unsafe { std::ptr::write_bytes(p, 0xEE, *len) };
                    self.q.read(*offset, p, *len, i, ReqFlags::empty());
                }
                Req::Write {
                    offset,
                    data,
                    flags,
                } => {
                    // SAFETY: see `p`; `data` is a separate Vec, so the ranges do not overlap.
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
                    // SAFETY: the read completed (every request of the batch has), and its
                    // range lies inside this queue's buffer (asserted above).
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

    /// Writes `data` at `offset` and returns the completion.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Done {
        self.one(Req::Write {
            offset,
            data: data.to_vec(),
            flags: ReqFlags::empty(),
        })
        .0
    }

    /// Writes `data` at `offset` with request `flags` (e.g. FUA) and returns the completion.
    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: ReqFlags) -> Done {
        self.one(Req::Write {
            offset,
            data: data.to_vec(),
            flags,
        })
        .0
    }

    /// Write-zeroes of `len` bytes at `offset` (`flags`: NO_UNMAP, ...).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: ReqFlags) -> Done {
        self.one(Req::WriteZeroes { offset, len, flags }).0
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Done {
        self.one(Req::Discard { offset, len }).0
    }

    /// Flushes the device.
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

    /// Writes and panics on failure.
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
    /// The started queues, each with its slice of `region`.
    pub queues: Vec<Queue>,
    /// The mapped buffer region.
    pub region: MemoryRegion,
    /// The blkio instance.
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
    /// Connects to `socket` and starts with `opts`.
    pub fn try_new(socket: &Path, opts: &ClientOpts) -> Result<Client, blkio::Error> {
        let b = connect(socket, opts.read_only)?;
        start(b, opts.num_queues, opts.queue_size)
    }

    /// Like [`Client::try_new`], panicking (with the errno) on failure.
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

    /// Queue `i`.
    pub fn q(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }

    /// blkio property `name` (e.g. "capacity"); panics if it cannot be read.
    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("get_u64({name}): {e}"))
    }

    /// blkio property `name` (e.g. "num-queues"); panics if it cannot be read.
    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("get_i32({name}): {e}"))
    }

    /// blkio property `name` (e.g. "read-only"); panics if it cannot be read.
    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("get_bool({name}): {e}"))
    }
}

// No Drop impl on purpose: fields drop in declaration order (queues, then the Blkio, which closes
// the vhost-user socket and frees the region). Explicitly unmapping would send
// VHOST_USER_REM_MEM_REG, which is not what a disconnecting frontend normally does.

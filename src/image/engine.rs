//! The per-queue I/O engine: requests are submitted, run concurrently, and complete on their
//! own, in any order.
//!
//! Each queue worker owns one [`IoEngine`] ([`super::BlockImage::engine`]). The request layer
//! (`virtio_blk::request`) submits every request it takes from the virtqueue with a tag (the
//! descriptor head) and, whenever the engine's [`IoEngine::event_fd`] fires or it polls,
//! reaps finished requests and returns them to the used ring. Nothing waits for a batch: a
//! slow request never holds back the ones behind it.
//!
//! Engines:
//! - the io_uring engines of raw (`raw::ring`) and qcow2 (`qcow2::ring`) images, one ring per
//!   queue, its completions signalled on an eventfd that sits in the worker's epoll set;
//! - [`SyncEngine`], which runs each request to completion inside `submit` through the
//!   synchronous [`ImageQueue`] interface: the fallback where io_uring is unavailable
//!   (`--aio sync`, an old kernel, a seccomp policy), and the engine of the null device.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::uring::Ring;
use super::{GuestMem, GuestSlice, ImageQueue};
use crate::error::UnknownValue;

/// The guest buffers of one request, with the guest memory map they point into kept alive for
/// as long as the request is in flight (a memory table update may replace the map meanwhile;
/// the old one stays mapped while anything holds it).
pub struct GuestBuffers {
    /// Keeps the mappings `iov` points into alive.
    _mem: Arc<GuestMem>,
    iov: Vec<libc::iovec>,
    len: u64,
}

// SAFETY: the iovecs point into guest memory mappings owned by `_mem`, which is shared memory
// safe to access from any thread; they are only read or written through engine I/O while the
// buffers (and so `_mem`) live.
unsafe impl Send for GuestBuffers {}

impl GuestBuffers {
    /// Buffers made of `slices`, which must all point into `mem`'s mappings.
    pub fn new(mem: Arc<GuestMem>, slices: &[GuestSlice<'_>]) -> GuestBuffers {
        let iov: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            })
            .collect();
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        GuestBuffers {
            _mem: mem,
            iov,
            len,
        }
    }

    /// The buffers as `iovec`s (valid while `self` lives).
    pub fn iov(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for zero-length buffers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers as volatile slices, for synchronous code.
    pub fn slices(&self) -> Vec<GuestSlice<'_>> {
        self.iov
            .iter()
            .map(|v| {
                // SAFETY: each iovec was built from a valid guest memory slice of `iov_len`
                // bytes in a mapping `_mem` keeps alive; the returned slices borrow `self`.
                unsafe { VolatileSlice::new(v.iov_base as *mut u8, v.iov_len) }
            })
            .collect()
    }
}

/// Which engine queues get (`--aio`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// io_uring, falling back to [`Aio::Sync`] with a log line where it is unavailable.
    #[default]
    IoUring,
    /// Each request runs to completion on the worker ([`SyncEngine`]).
    Sync,
}

impl std::str::FromStr for Aio {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, UnknownValue> {
        match s {
            "io_uring" => Ok(Aio::IoUring),
            "sync" => Ok(Aio::Sync),
            _ => Err(UnknownValue::new("--aio", s, "io_uring or sync")),
        }
    }
}

impl Aio {
    /// A ring for one queue, or `None` for the synchronous engine: asked for, or io_uring is
    /// unavailable (said once in the log).
    pub fn ring(self) -> io::Result<Option<Ring>> {
        if self == Aio::Sync {
            return Ok(None);
        }
        match Ring::new() {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    log::warn!(
                        "io_uring is unavailable ({e}); requests run one at a time on each \
                         queue's worker (the synchronous engine)"
                    )
                });
                Ok(None)
            }
        }
    }
}

/// A request for the engine.
pub enum EngineOp {
    /// Read `bufs.len()` bytes at `offset` into `bufs`.
    Read {
        /// Byte offset in the virtual disk.
        offset: u64,
        /// Destination.
        bufs: GuestBuffers,
    },
    /// Write `bufs` at `offset`; with `durable`, on stable storage when it completes.
    Write {
        /// Byte offset in the virtual disk.
        offset: u64,
        /// Source.
        bufs: GuestBuffers,
        /// Write-through.
        durable: bool,
    },
    /// Make every write completed before this was submitted durable.
    Flush,
    /// Discard these `(offset, len)` ranges, in order; with `durable`, on stable storage
    /// when it completes.
    Discard {
        /// The ranges.
        segs: Vec<(u64, u64)>,
        /// Write-through.
        durable: bool,
    },
    /// Make these `(offset, len, unmap)` ranges read as zeros, in order; with `durable`, on
    /// stable storage when it completes.
    WriteZeroes {
        /// The ranges.
        segs: Vec<(u64, u64, bool)>,
        /// Write-through.
        durable: bool,
    },
}

/// One queue's engine. Never shared between threads.
pub trait IoEngine: Send {
    /// Starts `op`. Its result comes back from [`IoEngine::reap`] with `tag`. Offsets and
    /// lengths have been checked against the virtual disk by the caller. A ring engine may
    /// only queue it: the next [`IoEngine::reap`] hands everything queued to the kernel, so
    /// the caller reaps after each batch of submissions (a worker's pass ends with one), and
    /// a pass's requests reach the kernel in one system call.
    fn submit(&mut self, tag: u16, op: EngineOp);

    /// Appends the results of finished requests to `out` and does whatever work their
    /// completions allow (never blocks).
    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>);

    /// An eventfd that becomes readable when [`IoEngine::reap`] has something to do; `None`
    /// for engines that finish every request inside `submit`.
    fn event_fd(&self) -> Option<RawFd> {
        None
    }

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Whether requests run one after another inside `submit` (see
    /// [`ImageQueue::sequential`]).
    fn sequential(&self) -> bool {
        false
    }

    /// Hands what [`IoEngine::submit`] queued to the kernel now (what the next reap would do),
    /// so that the first requests of a long pass do not wait for the last to be prepared.
    fn submit_queued(&mut self) {}

    /// Whether [`IoEngine::reap`] has something to return now, found without a system call
    /// (a busy-polling worker checks it between passes). False when it cannot tell cheaply.
    fn completions_ready(&mut self) -> bool {
        false
    }
}

/// Runs each request to completion inside `submit` through an [`ImageQueue`].
pub struct SyncEngine {
    q: Box<dyn ImageQueue>,
    done: Vec<(u16, io::Result<()>)>,
}

impl SyncEngine {
    /// The synchronous engine over `q`.
    pub fn new(q: Box<dyn ImageQueue>) -> SyncEngine {
        SyncEngine {
            q,
            done: Vec::new(),
        }
    }
}

/// Runs `op` to completion through `q`.
pub fn run_sync(q: &mut dyn ImageQueue, op: EngineOp) -> io::Result<()> {
    match op {
        EngineOp::Read { offset, bufs } => q.read(offset, &bufs.slices()),
        EngineOp::Write {
            offset,
            bufs,
            durable,
        } => q.write(offset, &bufs.slices(), durable),
        EngineOp::Flush => q.flush(),
        EngineOp::Discard { segs, durable } => segs
            .iter()
            .try_for_each(|&(o, l)| q.discard(o, l))
            .and_then(|()| if durable { q.flush() } else { Ok(()) }),
        EngineOp::WriteZeroes { segs, durable } => segs
            .iter()
            .try_for_each(|&(o, l, unmap)| q.write_zeroes(o, l, unmap))
            .and_then(|()| if durable { q.flush() } else { Ok(()) }),
    }
}

impl IoEngine for SyncEngine {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        let r = run_sync(&mut *self.q, op);
        self.done.push((tag, r));
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn sequential(&self) -> bool {
        self.q.sequential()
    }
}

/// Helpers for engine tests: guest memory, buffers in it, and running requests to the end.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::{EngineOp, GuestBuffers, IoEngine};
    use crate::image::{unlogged, GuestMem};

    /// `len` bytes of guest memory at guest address 0 (page aligned).
    pub fn memory(len: usize) -> Arc<GuestMem> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap())
    }

    /// Buffers over guest ranges `(address, len)`.
    pub fn buffers(mem: &Arc<GuestMem>, ranges: &[(u64, usize)]) -> GuestBuffers {
        let slices: Vec<_> = ranges
            .iter()
            .map(|&(a, l)| unlogged(&mem.get_slice(GuestAddress(a), l).unwrap()))
            .collect();
        GuestBuffers::new(mem.clone(), &slices)
    }

    /// Writes `data` into guest memory at `addr`.
    pub fn put(mem: &GuestMem, addr: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn get(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Submits `ops` (tagged 0..) and reaps until all finished (at most 10 s); returns the
    /// results by tag. Between reaps it sleeps as a queue worker does: until the engine's
    /// completion eventfd fires (engines without one finish in `submit`). So a request that
    /// needs another reap but gets no event, which would stall a guest, fails the test.
    pub fn run(engine: &mut dyn IoEngine, ops: Vec<EngineOp>) -> Vec<std::io::Result<()>> {
        let n = ops.len();
        for (i, op) in ops.into_iter().enumerate() {
            engine.submit(i as u16, op);
        }
        engine.submit_queued();
        let mut results: Vec<Option<std::io::Result<()>>> = (0..n).map(|_| None).collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            out.clear();
            engine.reap(&mut out);
            for (tag, r) in out.drain(..) {
                results[usize::from(tag)] = Some(r);
            }
            if results.iter().all(|r| r.is_some()) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "engine did not finish");
            match engine.event_fd() {
                Some(fd) => {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
                    assert!(r != 0, "engine did not finish: no completion event came");
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        assert_eq!(engine.in_flight(), 0);
        results.into_iter().map(|r| r.unwrap()).collect()
    }
}

//! The io_uring engine of raw images: every read and write of a queue in flight at once, each
//! completing on its own.
//!
//! - Buffered small requests first try `preadv2`/`pwritev2(RWF_NOWAIT)`: data already in the
//!   page cache (or room to write there) is copied at once on the worker, the cheapest way
//!   there is. Only what would block goes to the ring, so an uncached file sees the queue's
//!   whole depth while a cached one (tmpfs) pays no io_uring round trip.
//! - With O_DIRECT, requests go to the ring; guest buffers that are not aligned for O_DIRECT
//!   go through an aligned bounce buffer of their own.
//! - FLUSH is an io_uring `fsync(DATASYNC)`: reads go on while it runs.
//! - Discard and write-zeroes run on the worker (`fallocate`, `BLKDISCARD`, `BLKZEROOUT`);
//!   in write-through mode an `fsync` follows through the ring.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, types};
use log::warn;

use super::RawQueue;
use crate::image::engine::{EngineOp, GuestBuffers, IoEngine};
use crate::image::storage::{advance, AlignedBuf, Dir};
use crate::image::uring::Ring;
use crate::image::ImageQueue;

/// Buffered requests up to this size try the non-blocking copy first; larger ones go to the
/// ring, where the kernel's workers copy them in parallel.
const NOWAIT_MAX: u64 = 64 << 10;

/// Most iovecs one ring entry carries (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

enum Kind {
    Read,
    Write { durable: bool },
    Fsync { record: Option<u64> },
}

/// One request (or the fsync of one) in the ring.
struct RingOp {
    tag: u16,
    kind: Kind,
    offset: u64,
    /// The guest buffers (kept alive until completion).
    bufs: Option<GuestBuffers>,
    /// What is still to transfer (advanced past short transfers).
    iov: Vec<libc::iovec>,
    /// Bytes transferred so far, of `total`.
    done: u64,
    total: u64,
    bounce: Option<AlignedBuf>,
}

// SAFETY: the raw pointers in `iov` point into `bufs` (whose guest memory guard the op owns)
// or into `bounce`, which the op owns; the op moves between threads only with its owner.
unsafe impl Send for RingOp {}

/// The io_uring engine of one queue of a raw image.
pub struct RawRing {
    sync: RawQueue,
    ring: Ring,
    ops: Vec<Option<RingOp>>,
    free: Vec<usize>,
    done: Vec<(u16, io::Result<()>)>,
    /// Ops in the ring.
    busy: usize,
}

impl RawRing {
    /// The engine over `sync` (this queue's synchronous handle, which it also uses for what
    /// does not go through the ring).
    pub fn new(sync: RawQueue, ring: Ring) -> RawRing {
        RawRing {
            sync,
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            busy: 0,
        }
    }

    fn slot(&mut self, op: RingOp) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// Puts op `i` (with what remains of it) in the ring; on failure finishes it with the
    /// error.
    fn start(&mut self, i: usize) {
        let fd = types::Fd(self.sync.file.fd());
        let Some(op) = self.ops[i].as_ref() else {
            return;
        };
        let entry = match op.kind {
            Kind::Read => {
                let n = op.iov.len().min(IOV_MAX) as u32;
                opcode::Readv::new(fd, op.iov.as_ptr(), n)
                    .offset(op.offset + op.done)
                    .build()
            }
            Kind::Write { durable } => {
                let n = op.iov.len().min(IOV_MAX) as u32;
                opcode::Writev::new(fd, op.iov.as_ptr(), n)
                    .offset(op.offset + op.done)
                    .rw_flags(if durable { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Kind::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(i as u64);
        // SAFETY: the entry points at `op.iov` (a heap array owned by the op, which stays in
        // its slot, unmoved and unmodified, until this entry's completion is reaped) and at
        // the buffers it describes (guest memory kept mapped by `op.bufs`, or `op.bounce`).
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => self.busy += 1,
            Err(e) => self.finish(i, Err(e)),
        }
    }

    /// Ends op `i` with `r`: copies bounced reads back, records writes and syncs for the
    /// power-loss harness, and queues the result.
    fn finish(&mut self, i: usize, r: io::Result<()>) {
        let Some(op) = self.ops.get_mut(i).and_then(|o| o.take()) else {
            return;
        };
        self.free.push(i);
        let file = &self.sync.file;
        if r.is_ok() {
            match op.kind {
                Kind::Read => {
                    if let (Some(b), Some(bufs)) = (&op.bounce, &op.bufs) {
                        copy_out(b, bufs);
                    }
                }
                Kind::Write { durable } if file.recorded() => {
                    let data = match (&op.bounce, &op.bufs) {
                        (Some(b), _) => b.bytes(op.total as usize).to_vec(),
                        (None, Some(bufs)) => gather(bufs),
                        _ => Vec::new(),
                    };
                    file.record_write(op.offset, &data, durable);
                }
                Kind::Write { .. } => {}
                Kind::Fsync { record } => file.record_sync_done(record),
            }
        }
        self.done.push((op.tag, r));
    }

    /// A completion of op `i` with result `res`.
    fn complete(&mut self, i: usize, res: i32) {
        self.busy = self.busy.saturating_sub(1);
        let Some(op) = self.ops.get_mut(i).and_then(|o| o.as_mut()) else {
            warn!("io_uring completion for unknown op {i}");
            return;
        };
        if res < 0 {
            match -res {
                libc::EAGAIN | libc::EINTR => return self.start(i),
                libc::EINVAL if self.sync.direct && !matches!(op.kind, Kind::Fsync { .. }) => {
                    // O_DIRECT refused the buffers' alignment: run it again synchronously,
                    // through the bounce buffer.
                    return self.redo_sync(i);
                }
                e => return self.finish(i, Err(io::Error::from_raw_os_error(e))),
            }
        }
        if let Kind::Fsync { .. } = op.kind {
            return self.finish(i, Ok(()));
        }
        let n = res as u64;
        op.done += n;
        if op.done >= op.total {
            return self.finish(i, Ok(()));
        }
        if n == 0 {
            let r = match op.kind {
                Kind::Read => {
                    // End of file: the rest reads as zeros.
                    for v in &op.iov {
                        // SAFETY: each remaining iovec is a live buffer of iov_len bytes.
                        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
                    }
                    Ok(())
                }
                _ => Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write made no progress",
                )),
            };
            return self.finish(i, r);
        }
        // Short transfer: the rest goes back into the ring.
        let first = advance(&mut op.iov, 0, n as usize);
        op.iov.drain(..first);
        self.start(i);
    }

    /// Runs op `i` again, whole and synchronously, through the queue's own path (which
    /// bounces buffers O_DIRECT refused and records what it writes).
    fn redo_sync(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i).and_then(|o| o.take()) else {
            return;
        };
        self.free.push(i);
        warn!("O_DIRECT rejected guest buffer alignment; using a bounce buffer");
        self.sync.mem_align = self.sync.mem_align.max(4096);
        let r = match (&op.kind, &op.bufs) {
            (Kind::Read, Some(b)) => self.sync.read(op.offset, &b.slices()),
            (Kind::Write { durable }, Some(b)) => self.sync.write(op.offset, &b.slices(), *durable),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        };
        self.done.push((op.tag, r));
    }

    fn rw(&mut self, tag: u16, offset: u64, bufs: GuestBuffers, write: bool, durable: bool) {
        let total = bufs.len();
        if total == 0 {
            return self.done.push((tag, Ok(())));
        }
        if write {
            if let Err(e) = self.sync.guard(offset, &bufs.slices()) {
                return self.done.push((tag, Err(e)));
            }
        }
        let dir = if write {
            Dir::Write { durable }
        } else {
            Dir::Read
        };
        let mut done = 0u64;
        let mut iov = bufs.iov().to_vec();
        if !self.sync.direct && !durable && total <= NOWAIT_MAX {
            match self.sync.file.transfer_nowait(&iov, offset, dir) {
                Ok(n) if n as u64 >= total => return self.done.push((tag, Ok(()))),
                Ok(0) if !write => {
                    // End of file at once: zeros.
                    for v in &iov {
                        // SAFETY: each iovec is a live guest buffer of iov_len bytes, kept
                        // mapped by `bufs`.
                        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
                    }
                    return self.done.push((tag, Ok(())));
                }
                Ok(n) => {
                    done = n as u64;
                    let first = advance(&mut iov, 0, n);
                    iov.drain(..first);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return self.done.push((tag, Err(e))),
            }
        }
        let mut bounce = None;
        if self.sync.direct && !self.sync.aligned(&bufs.slices()) {
            let mut b = AlignedBuf::default();
            match b.get(total as usize, self.sync.mem_align) {
                Ok(buf) => {
                    if write {
                        let mut pos = 0;
                        for s in bufs.slices() {
                            s.copy_to(&mut buf[pos..pos + s.len()]);
                            pos += s.len();
                        }
                    }
                    iov = vec![libc::iovec {
                        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: total as usize,
                    }];
                }
                Err(e) => return self.done.push((tag, Err(e))),
            }
            bounce = Some(b);
        }
        let kind = if write {
            Kind::Write { durable }
        } else {
            Kind::Read
        };
        let i = self.slot(RingOp {
            tag,
            kind,
            offset,
            bufs: Some(bufs),
            iov,
            done,
            total,
            bounce,
        });
        self.start(i);
    }

    fn fsync(&mut self, tag: u16) {
        let record = self.sync.file.record_sync_start();
        let i = self.slot(RingOp {
            tag,
            kind: Kind::Fsync { record },
            offset: 0,
            bufs: None,
            iov: Vec::new(),
            done: 0,
            total: 0,
            bounce: None,
        });
        self.start(i);
    }
}

/// Copies a bounced read into the guest buffers.
fn copy_out(b: &AlignedBuf, bufs: &GuestBuffers) {
    let src = b.bytes(bufs.len() as usize);
    let mut pos = 0;
    for s in bufs.slices() {
        s.copy_from(&src[pos..pos + s.len()]);
        pos += s.len();
    }
}

/// The bytes of guest buffers, in order (for recording a write).
fn gather(bufs: &GuestBuffers) -> Vec<u8> {
    let mut v = vec![0u8; bufs.len() as usize];
    let mut pos = 0;
    for s in bufs.slices() {
        s.copy_to(&mut v[pos..pos + s.len()]);
        pos += s.len();
    }
    v
}

impl IoEngine for RawRing {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        match op {
            EngineOp::Read { offset, bufs } => self.rw(tag, offset, bufs, false, false),
            EngineOp::Write {
                offset,
                bufs,
                durable,
            } => self.rw(tag, offset, bufs, true, durable),
            EngineOp::Flush => self.fsync(tag),
            EngineOp::Discard { segs, durable } => {
                match segs.iter().try_for_each(|&(o, l)| self.sync.discard(o, l)) {
                    Ok(()) if durable => self.fsync(tag),
                    r => self.done.push((tag, r)),
                }
            }
            EngineOp::WriteZeroes { segs, durable } => {
                let r = segs
                    .iter()
                    .try_for_each(|&(o, l, unmap)| self.sync.write_zeroes(o, l, unmap));
                match r {
                    Ok(()) if durable => self.fsync(tag),
                    r => self.done.push((tag, r)),
                }
            }
        }
        if let Err(e) = self.ring.submit() {
            warn!("io_uring submission failed: {e}");
        }
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        let mut completions = Vec::new();
        self.ring
            .reap(|ud, res| completions.push((ud as usize, res)));
        for (i, res) in completions {
            self.complete(i, res);
        }
        if let Err(e) = self.ring.submit() {
            warn!("io_uring submission failed: {e}");
        }
        out.append(&mut self.done);
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.ring.event_fd())
    }

    fn in_flight(&self) -> usize {
        self.busy + self.done.len()
    }
}

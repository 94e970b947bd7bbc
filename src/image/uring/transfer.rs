//! Running positional transfers (a file range to or from guest buffers) on a queue's ring, for
//! every format: the engines decide what to transfer where, this module moves the bytes.
//!
//! A transfer, started with [`Transfers::start`]:
//! - buffered and small: first tries `preadv2`/`pwritev2(RWF_NOWAIT)` on the worker: data in
//!   the page cache (or room to write there) costs no ring round trip, and only what would
//!   block goes to the ring;
//! - with O_DIRECT, guest buffers not aligned for it go through an aligned bounce buffer of
//!   the transfer's own (and a buffer alignment the kernel refuses with `EINVAL` raises the
//!   alignment used from then on and bounces the transfer);
//! - a short transfer is resubmitted for the rest; a read reaching the end of the file fills
//!   the rest with zeros;
//! - writes and syncs are recorded for the power-loss harness when the file is.
//!
//! Each transfer carries an owner token; [`Transfers::reap`] returns `(owner, result)` for
//! every transfer that ended.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, types};
use log::warn;

use super::Ring;
use crate::image::storage::{advance, AlignedBuf, Dir, HostFile};

/// Buffered transfers up to this size try the non-blocking copy first; larger ones go to the
/// ring, where the kernel's workers copy them in parallel.
const NOWAIT_MAX: u64 = 64 << 10;

/// Most iovecs one ring entry carries (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// A transfer to start.
pub struct Transfer {
    /// The file.
    pub file: Arc<HostFile>,
    /// Byte offset in the file.
    pub offset: u64,
    /// The guest buffers, which the caller keeps alive and unmoved until the transfer ends.
    pub iov: Vec<libc::iovec>,
    /// Read or write.
    pub dir: Dir,
    /// Returned with the result.
    pub owner: usize,
}

enum Kind {
    Transfer(Dir),
    Fsync { record: Option<u64> },
}

/// A transfer (or fsync) in progress.
struct Op {
    owner: usize,
    file: Arc<HostFile>,
    kind: Kind,
    offset: u64,
    /// The guest buffers, for bounce copies, zero fills and recording.
    guest: Vec<libc::iovec>,
    /// What is still to transfer (advanced past short transfers).
    iov: Vec<libc::iovec>,
    /// Bytes done before the ring (non-blocking copy), then in all, of `total`.
    early: u64,
    done: u64,
    total: u64,
    bounce: Option<AlignedBuf>,
}

// SAFETY: the raw pointers in `guest` and `iov` point into guest memory the owner keeps mapped
// until the transfer ends, or into `bounce`, which the op owns; an op moves between threads
// only with the engine that owns it.
unsafe impl Send for Op {}

/// A slab of values addressed by index, reusing freed slots (ring user data are indices).
pub struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Stores `v`; returns its index.
    pub fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(v);
                i
            }
            None => {
                self.items.push(Some(v));
                self.items.len() - 1
            }
        }
    }

    /// The value at `i`.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(|o| o.as_mut())
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the value at `i` out, freeing the slot.
    pub fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i).and_then(|o| o.take());
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
}

/// Completion order injected for tests (`VUB_INJECT_REORDER`, see [`Reorder::from_env`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reorder {
    /// Completions are processed as the kernel delivers them.
    Off,
    /// Every completion is held until nothing else is in the ring, and the held ones are
    /// then processed last first.
    Reverse,
    /// Held the same way, then processed in a shuffled order.
    Random,
}

impl Reorder {
    /// The process's setting: `VUB_INJECT_REORDER=reverse|random` (a test hook, read once;
    /// anything else is off). It makes the engines see completions in orders the kernel
    /// rarely produces, to test that data and metadata stay right whatever the order.
    pub fn from_env() -> Reorder {
        static MODE: OnceLock<Reorder> = OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("VUB_INJECT_REORDER").as_deref() {
            Ok("reverse") => {
                warn!("VUB_INJECT_REORDER: ring completions are held and reversed (test hook)");
                Reorder::Reverse
            }
            Ok("random") => {
                warn!("VUB_INJECT_REORDER: ring completions are held and shuffled (test hook)");
                Reorder::Random
            }
            _ => Reorder::Off,
        })
    }
}

/// The transfers of one queue, on its ring.
pub struct Transfers {
    ring: Ring,
    ops: Slab<Op>,
    /// Ended transfers: (owner, result).
    ended: Vec<(usize, io::Result<()>)>,
    /// Ops in the ring.
    busy: usize,
    /// Memory alignment O_DIRECT needs (`None`: buffered).
    direct: Option<usize>,
    /// Injected completion order, and the completions held for it: (op, result).
    reorder: Reorder,
    held: Vec<(usize, i32)>,
    /// xorshift state for [`Reorder::Random`].
    shuffle: u64,
}

impl Drop for Transfers {
    /// Waits for the transfers still in the ring: the kernel may write into their buffers
    /// (guest memory, bounce buffers, an engine's cluster buffers) until they end, so none
    /// of them may be freed before (`Ring::push`'s contract). Engines are dropped with
    /// requests in flight only when a queue stops without them (GET_VRING_BASE gave up
    /// waiting).
    fn drop(&mut self) {
        let mut out = Vec::new();
        while self.busy > 0 {
            if let Err(e) = self.wait() {
                warn!(
                    "waiting for {} transfer(s) in the ring to end: {e}",
                    self.busy
                );
                return;
            }
            self.reap(&mut out);
            out.clear();
        }
    }
}

impl Transfers {
    /// Transfers on `ring`; `direct` is the memory alignment of O_DIRECT files (`None` for
    /// buffered ones).
    pub fn new(ring: Ring, direct: Option<usize>) -> Transfers {
        Transfers {
            ring,
            ops: Slab::default(),
            ended: Vec::new(),
            busy: 0,
            direct,
            reorder: Reorder::from_env(),
            held: Vec::new(),
            shuffle: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Sets the injected completion order (tests).
    pub fn set_reorder(&mut self, r: Reorder) {
        self.reorder = r;
    }

    /// The ring's completion eventfd.
    pub fn event_fd(&self) -> RawFd {
        self.ring.event_fd()
    }

    /// Whether the ring holds completions to reap, or transfers ended without it (a load of
    /// the completion queue's indices, no system call).
    pub fn completions_ready(&mut self) -> bool {
        !self.ended.is_empty() || self.ring.has_completions()
    }

    /// Whether transfers ended without the ring (non-blocking copies, errors at the start)
    /// wait for [`Transfers::reap`]: no completion event comes for them.
    pub fn ended_at_once(&self) -> bool {
        !self.ended.is_empty()
    }

    /// Transfers not yet returned by [`Transfers::reap`].
    pub fn pending(&self) -> usize {
        self.busy + self.ended.len()
    }

    /// Starts `t`. Its end (maybe at once) is returned by the next [`Transfers::reap`].
    pub fn start(&mut self, t: Transfer) {
        let total: u64 = t.iov.iter().map(|v| v.iov_len as u64).sum();
        let mut op = Op {
            owner: t.owner,
            file: t.file,
            kind: Kind::Transfer(t.dir),
            offset: t.offset,
            iov: t.iov.clone(),
            guest: t.iov,
            early: 0,
            done: 0,
            total,
            bounce: None,
        };
        if total == 0 {
            return self.ended.push((op.owner, Ok(())));
        }
        let durable = matches!(t.dir, Dir::Write { durable: true });
        if self.direct.is_none() && !durable && total <= NOWAIT_MAX {
            match op.file.transfer_nowait(&op.iov, op.offset, t.dir) {
                Ok(n) if n as u64 >= total => return self.ended.push((op.owner, Ok(()))),
                Ok(0) if t.dir == Dir::Read => {
                    // End of file at once: zeros.
                    zero(&op.iov);
                    return self.ended.push((op.owner, Ok(())));
                }
                Ok(n) => {
                    op.early = n as u64;
                    op.done = n as u64;
                    let first = advance(&mut op.iov, 0, n);
                    op.iov.drain(..first);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return self.ended.push((op.owner, Err(e))),
            }
        }
        if let Some(align) = self.direct {
            if !aligned(&op.iov, align) {
                if let Err(e) = bounce(&mut op, align) {
                    return self.ended.push((op.owner, Err(e)));
                }
            }
        }
        let i = self.ops.insert(op);
        self.push(i);
    }

    /// Starts an `fsync(DATASYNC)` of `file`; reads and writes go on while it runs.
    pub fn fsync(&mut self, file: Arc<HostFile>, owner: usize) {
        let record = file.record_sync_start();
        let i = self.ops.insert(Op {
            owner,
            file,
            kind: Kind::Fsync { record },
            offset: 0,
            guest: Vec::new(),
            iov: Vec::new(),
            early: 0,
            done: 0,
            total: 0,
            bounce: None,
        });
        self.push(i);
    }

    /// Waits until the ring has a completion to reap (something must be in the ring).
    pub fn wait(&mut self) -> io::Result<()> {
        if self.busy == 0 {
            return Ok(());
        }
        self.ring.wait()
    }

    /// Hands what was started to the kernel.
    pub fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            warn!("io_uring submission failed: {e}");
        }
    }

    /// Processes the ring's completions and appends every transfer that ended, as (owner,
    /// result), to `out`.
    pub fn reap(&mut self, out: &mut Vec<(usize, io::Result<()>)>) {
        let mut completions = Vec::new();
        self.ring
            .reap(|ud, res| completions.push((ud as usize, res)));
        self.busy = self.busy.saturating_sub(completions.len());
        if self.reorder != Reorder::Off {
            self.held.append(&mut completions);
            if self.busy == 0 {
                completions = std::mem::take(&mut self.held);
                self.reorder_held(&mut completions);
            }
        }
        // `complete` may put an op back in the ring (a short transfer): busy again.
        for (i, res) in completions {
            self.complete(i, res);
        }
        self.submit();
        out.append(&mut self.ended);
    }

    fn reorder_held(&mut self, c: &mut [(usize, i32)]) {
        match self.reorder {
            Reorder::Off => {}
            Reorder::Reverse => c.reverse(),
            Reorder::Random => {
                for k in (1..c.len()).rev() {
                    self.shuffle ^= self.shuffle << 13;
                    self.shuffle ^= self.shuffle >> 7;
                    self.shuffle ^= self.shuffle << 17;
                    c.swap(k, (self.shuffle % (k as u64 + 1)) as usize);
                }
            }
        }
    }

    /// Puts op `i` (what remains of it) in the ring; on failure ends it with the error.
    fn push(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let fd = types::Fd(op.file.fd());
        let n = op.iov.len().min(IOV_MAX) as u32;
        let entry = match op.kind {
            Kind::Transfer(Dir::Read) => opcode::Readv::new(fd, op.iov.as_ptr(), n)
                .offset(op.offset + op.done)
                .build(),
            Kind::Transfer(Dir::Write { durable }) => opcode::Writev::new(fd, op.iov.as_ptr(), n)
                .offset(op.offset + op.done)
                .rw_flags(if durable { libc::RWF_DSYNC } else { 0 })
                .build(),
            Kind::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(i as u64);
        // SAFETY: the entry points at `op.iov` (a heap array owned by the op, which stays in
        // its slot, unmoved and unmodified, until this entry's completion is reaped) and at
        // the buffers it describes (guest memory the owner keeps mapped, or `op.bounce`).
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => self.busy += 1,
            Err(e) => self.end(i, Err(e)),
        }
    }

    /// A completion of op `i` with result `res`.
    fn complete(&mut self, i: usize, res: i32) {
        let direct = self.direct;
        let Some(op) = self.ops.get_mut(i) else {
            warn!("io_uring completion for unknown op {i}");
            return;
        };
        if res < 0 {
            match -res {
                libc::EAGAIN | libc::EINTR => return self.push(i),
                libc::EINVAL if direct.is_some() && op.bounce.is_none() && op.done == 0 => {
                    // O_DIRECT refused the buffers' alignment: bounce them, with a stricter
                    // alignment from now on.
                    if let Kind::Transfer(_) = op.kind {
                        warn!("O_DIRECT rejected guest buffer alignment; using a bounce buffer");
                        let align = direct.unwrap_or(4096).max(4096);
                        self.direct = Some(align);
                        let r = bounce(op, align);
                        return match r {
                            Ok(()) => self.push(i),
                            Err(e) => self.end(i, Err(e)),
                        };
                    }
                    return self.end(i, Err(io::Error::from_raw_os_error(libc::EINVAL)));
                }
                e => return self.end(i, Err(io::Error::from_raw_os_error(e))),
            }
        }
        let dir = match op.kind {
            Kind::Fsync { .. } => return self.end(i, Ok(())),
            Kind::Transfer(d) => d,
        };
        let n = res as u64;
        op.done += n;
        if op.done >= op.total {
            return self.end(i, Ok(()));
        }
        if n == 0 {
            if dir == Dir::Read {
                // End of file: the rest reads as zeros.
                zero(&op.iov);
                return self.end(i, Ok(()));
            }
            let e = io::Error::new(io::ErrorKind::WriteZero, "write made no progress");
            return self.end(i, Err(e));
        }
        // Short transfer: the rest goes back into the ring.
        let first = advance(&mut op.iov, 0, n as usize);
        op.iov.drain(..first);
        self.push(i);
    }

    /// Ends op `i` with `r`: copies bounced reads out, records writes and syncs.
    fn end(&mut self, i: usize, r: io::Result<()>) {
        let Some(op) = self.ops.remove(i) else {
            return;
        };
        if r.is_ok() {
            match op.kind {
                Kind::Transfer(Dir::Read) => {
                    if let Some(b) = &op.bounce {
                        // The first `early` bytes went to the guest directly.
                        let bytes = b.bytes(op.total as usize);
                        let rest = sub_iov(&op.guest, op.early, op.total - op.early);
                        scatter(bytes.get(op.early as usize..).unwrap_or_default(), &rest);
                    }
                }
                Kind::Transfer(Dir::Write { durable }) if op.file.recorded() => {
                    let data = match &op.bounce {
                        Some(b) => b.bytes(op.total as usize).to_vec(),
                        None => gather(&op.guest),
                    };
                    let early = op.early as usize;
                    op.file
                        .record_write(op.offset + op.early, &data[early..], durable);
                }
                Kind::Transfer(Dir::Write { .. }) => {}
                Kind::Fsync { record } => op.file.record_sync_done(record),
            }
        }
        self.ended.push((op.owner, r));
    }
}

/// True if every buffer of `iov` is aligned to `align` in address and length.
fn aligned(iov: &[libc::iovec], align: usize) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
}

/// Moves what remains of `op` to an aligned bounce buffer of its own (filled from the guest
/// for a write).
fn bounce(op: &mut Op, align: usize) -> io::Result<()> {
    let mut b = AlignedBuf::default();
    let total = op.total as usize;
    let buf = b.get(total, align)?;
    if let Kind::Transfer(Dir::Write { .. }) = op.kind {
        let data = gather(&op.guest);
        buf[..data.len()].copy_from_slice(&data);
    }
    let done = op.done as usize;
    op.iov = vec![libc::iovec {
        // SAFETY: done < total, the buffer's length.
        iov_base: unsafe { buf.as_mut_ptr().add(done) } as *mut libc::c_void,
        iov_len: total - done,
    }];
    op.bounce = Some(b);
    Ok(())
}

/// Fills the buffers of `iov` with zeros.
fn zero(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: each iovec is a live writable buffer of iov_len bytes (guest memory the
        // owner keeps mapped, or a bounce buffer).
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

/// The bytes of the buffers of `iov`, in order.
fn gather(iov: &[libc::iovec]) -> Vec<u8> {
    let mut out = Vec::with_capacity(iov.iter().map(|v| v.iov_len).sum());
    for v in iov {
        // SAFETY: each iovec is a live buffer of iov_len bytes (see `zero`).
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
    out
}

/// Copies `src` into the buffers of `iov`, in order.
fn scatter(src: &[u8], iov: &[libc::iovec]) {
    let mut pos = 0;
    for v in iov {
        let n = v.iov_len.min(src.len().saturating_sub(pos));
        // SAFETY: each iovec is a live writable buffer of iov_len >= n bytes (see `zero`);
        // `src[pos..pos + n]` is in bounds and does not overlap guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src[pos..].as_ptr(), v.iov_base as *mut u8, n) };
        pos += n;
    }
}

/// The iovecs of bytes `[pos, pos + len)` of the buffers `iov`.
pub fn sub_iov(iov: &[libc::iovec], pos: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let end = pos + len;
    let mut base = 0u64;
    for v in iov {
        let vlen = v.iov_len as u64;
        let (lo, hi) = (pos.max(base), end.min(base + vlen));
        if lo < hi {
            out.push(libc::iovec {
                // SAFETY: lo - base < vlen: the pointer stays inside the same buffer.
                iov_base: unsafe { (v.iov_base as *mut u8).add((lo - base) as usize) }
                    as *mut libc::c_void,
                iov_len: (hi - lo) as usize,
            });
        }
        base += vlen;
        if base >= end {
            break;
        }
    }
    out
}

/// Fills bytes `[pos, pos + len)` of the buffers `iov` with zeros.
pub fn zero_range(iov: &[libc::iovec], pos: u64, len: u64) {
    zero(&sub_iov(iov, pos, len));
}

/// Copies `src` into bytes `[pos, pos + src.len())` of the buffers `iov` describes.
pub fn copy_to_range(iov: &[libc::iovec], pos: u64, src: &[u8]) {
    scatter(src, &sub_iov(iov, pos, src.len() as u64));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transfers too large for the non-blocking copy go to the ring; with [`Reorder::Reverse`]
    /// they end last first, each with its own bytes.
    #[test]
    fn reverse_reorder_ends_transfers_last_first() {
        const N: usize = 4;
        const LEN: usize = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..N * LEN).map(|i| (i / LEN) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(HostFile::new(
            std::fs::File::open(&path).unwrap(),
            None,
            "f",
        ));
        let mut t = Transfers::new(Ring::new().unwrap(), None);
        t.set_reorder(Reorder::Reverse);
        let mut bufs = vec![vec![0u8; LEN]; N];
        for (k, b) in bufs.iter_mut().enumerate() {
            t.start(Transfer {
                file: file.clone(),
                offset: (k * LEN) as u64,
                iov: vec![libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: LEN,
                }],
                dir: Dir::Read,
                owner: k,
            });
        }
        t.submit();
        let mut out = Vec::new();
        while out.len() < N {
            t.wait().unwrap();
            t.reap(&mut out);
        }
        let order: Vec<usize> = out.iter().map(|(o, _)| *o).collect();
        assert_eq!(order, vec![3, 2, 1, 0]);
        assert!(out.iter().all(|(_, r)| r.is_ok()));
        for (k, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&x| x == k as u8 + 1),
                "transfer {k} got other bytes"
            );
        }
    }
}

//! Host file I/O below the image formats: every read, write, sync and deallocation of an image
//! file goes through a [`HostFile`], so that no format touches a `File` directly and the
//! power-loss harness can record them all ([`record`]).
//!
//! Also here: the `iovec` transfer loop shared by the formats, and the aligned buffers O_DIRECT
//! needs.

pub mod record;

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use record::Op;
pub use record::{mutated, Recorder};

use super::GuestSlice;

/// Largest number of iovecs one `preadv`/`pwritev` call accepts.
pub const IOV_MAX: usize = 1024;

/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `BLKSSZGET`: `_IO(0x12, 104)`.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// An image file (or block device) opened by a format, with its recording tap if the image is
/// recorded. Cloning with [`HostFile::try_clone`] duplicates the descriptor (each queue
/// worker has its own) and keeps the tap.
pub struct HostFile {
    file: File,
    tap: Option<(Arc<Recorder>, u32)>,
    /// On a file system in memory (tmpfs, ramfs): see [`HostFile::transfer_nowait`].
    in_memory: bool,
    /// The file system refused an `RWF_NOWAIT` read / write (`EOPNOTSUPP`): not tried again.
    /// Relaxed: a hint; a stale value costs one refused system call.
    no_nowait: [AtomicBool; 2],
}

/// True if `file` lives on a file system kept in memory, where a write never waits for a
/// device (`TMPFS_MAGIC`, `RAMFS_MAGIC`).
fn in_memory(file: &File) -> bool {
    // SAFETY: fstatfs fills the zero-initialised struct we own from our open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0 && matches!(st.f_type, 0x0102_1994 | 0x8584_58f6)
}

/// Direction of a positional transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Into memory.
    Read,
    /// From memory; with `durable`, on stable storage when it completes (`RWF_DSYNC`).
    Write {
        /// Write-through.
        durable: bool,
    },
}

impl HostFile {
    /// Wraps `file`; with a recorder, its writes and syncs are recorded under `name`.
    pub fn new(file: File, recorder: Option<&Arc<Recorder>>, name: &str) -> HostFile {
        HostFile {
            in_memory: in_memory(&file),
            file,
            tap: recorder.map(|r| (r.clone(), r.file(name))),
            no_nowait: Default::default(),
        }
    }

    /// Another descriptor of the same file (same tap).
    pub fn try_clone(&self) -> io::Result<HostFile> {
        Ok(HostFile {
            file: self.file.try_clone()?,
            tap: self.tap.clone(),
            in_memory: self.in_memory,
            no_nowait: [
                AtomicBool::new(self.no_nowait[0].load(Ordering::Relaxed)),
                AtomicBool::new(self.no_nowait[1].load(Ordering::Relaxed)),
            ],
        })
    }

    /// The file's metadata.
    pub fn metadata(&self) -> io::Result<Metadata> {
        self.file.metadata()
    }

    /// The underlying file, for what is not I/O (locks, identity). Never write through it.
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// The descriptor (for io_uring submissions; see [`HostFile::record_write`]).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// True if this file is being recorded.
    pub fn recorded(&self) -> bool {
        self.tap.is_some()
    }

    fn issue(&self, op: impl FnOnce() -> Op) -> Option<u64> {
        self.tap.as_ref().map(|(r, f)| r.issue(*f, op()))
    }

    fn done(&self, id: Option<u64>, durable: bool) {
        if let (Some((r, _)), Some(id)) = (&self.tap, id) {
            r.done(id, durable);
        }
    }

    /// Records a write made outside this type (an io_uring submission) as issued and
    /// completed; call it after the completion, with the bytes written.
    pub fn record_write(&self, off: u64, data: &[u8], durable: bool) {
        let id = self.issue(|| Op::Write {
            off,
            data: data.into(),
        });
        self.done(id, durable);
    }

    /// Records the start of a sync made outside this type (an io_uring fsync); pass the
    /// result to [`HostFile::record_sync_done`] when it completes.
    pub fn record_sync_start(&self) -> Option<u64> {
        self.tap.as_ref().map(|(r, f)| r.sync_start(*f))
    }

    /// Records the completion of a sync started with [`HostFile::record_sync_start`].
    pub fn record_sync_done(&self, id: Option<u64>) {
        if let (Some((r, _)), Some(id)) = (&self.tap, id) {
            r.sync_done(id);
        }
    }

    /// One `preadv2`/`pwritev2` with `RWF_NOWAIT`: transfers what can be done without
    /// blocking (data in the page cache, room to write) and returns how many bytes that was;
    /// `Err` with `EAGAIN` when nothing could be, or `EOPNOTSUPP` where the file system
    /// refuses the flag (remembered: not tried again on this descriptor). A short count is not
    /// an error. On a file system in memory (tmpfs, ramfs), which refuses the flag, the
    /// transfer is done without it: it is a copy that waits for no device, cheaper here than
    /// a trip through the ring's worker threads.
    pub fn transfer_nowait(&self, iovs: &[libc::iovec], off: u64, dir: Dir) -> io::Result<usize> {
        let cnt = iovs.len().min(IOV_MAX) as libc::c_int;
        let o =
            libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let k = usize::from(matches!(dir, Dir::Write { .. }));
        let flags = if self.in_memory {
            0
        } else if self.no_nowait[k].load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        } else {
            libc::RWF_NOWAIT
        };
        loop {
            // SAFETY: the caller's iovecs point at live buffers of the stated lengths (guest
            // memory under its guard, or ours) for the duration of the call.
            let r = unsafe {
                match dir {
                    Dir::Read => libc::preadv2(self.fd(), iovs.as_ptr(), cnt, o, flags),
                    Dir::Write { .. } => libc::pwritev2(self.fd(), iovs.as_ptr(), cnt, o, flags),
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    self.no_nowait[k].store(true, Ordering::Relaxed);
                }
                return Err(e);
            }
            let n = r as usize;
            if n > 0 && matches!(dir, Dir::Write { .. }) && self.tap.is_some() {
                let mut data = gather(iovs);
                data.truncate(n);
                self.record_write(off, &data, false);
            }
            return Ok(n);
        }
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        transfer_all(self.fd(), &mut iov, off, Dir::Read)
    }

    /// Writes all of `buf` at `off`.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let id = self.issue(|| Op::Write {
            off,
            data: buf.into(),
        });
        let mut iov = [libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        let r = transfer_all(self.fd(), &mut iov, off, Dir::Write { durable: false });
        if r.is_ok() {
            self.done(id, false);
        }
        r
    }

    /// Transfers all of `iovs` at `off` (see [`transfer_all`]). The iovecs must point at
    /// memory valid for the call (guest memory under its guard, or our own buffers).
    pub fn transfer(&self, iovs: &mut [libc::iovec], off: u64, dir: Dir) -> io::Result<()> {
        let id = match dir {
            Dir::Read => None,
            Dir::Write { .. } => self.issue(|| Op::Write {
                off,
                data: gather(iovs).into(),
            }),
        };
        let r = transfer_all(self.fd(), iovs, off, dir);
        if r.is_ok() {
            self.done(id, matches!(dir, Dir::Write { durable: true }));
        }
        r
    }

    /// Reads into one guest slice from `off` (zeros past the end of the file).
    pub fn read_slice(&self, off: u64, s: &GuestSlice<'_>) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        }];
        self.transfer(&mut iov, off, Dir::Read)
    }

    /// Writes one guest slice at `off`.
    pub fn write_slice(&self, off: u64, s: &GuestSlice<'_>) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        }];
        self.transfer(&mut iov, off, Dir::Write { durable: false })
    }

    /// `fdatasync`: every write completed before this is durable when it returns.
    pub fn sync_data(&self) -> io::Result<()> {
        let id = self.tap.as_ref().map(|(r, f)| r.sync_start(*f));
        self.file.sync_data()?;
        if let (Some((r, _)), Some(id)) = (&self.tap, id) {
            r.sync_done(id);
        }
        Ok(())
    }

    /// `fsync` (data and metadata such as the size).
    pub fn sync_all(&self) -> io::Result<()> {
        let id = self.tap.as_ref().map(|(r, f)| r.sync_start(*f));
        self.file.sync_all()?;
        if let (Some((r, _)), Some(id)) = (&self.tap, id) {
            r.sync_done(id);
        }
        Ok(())
    }

    /// A named durability point: `fdatasync`, unless a test switched this point off to show
    /// that the power-loss harness catches its absence ([`record::set_mutation`]).
    pub fn sync_point(&self, name: &'static str) -> io::Result<()> {
        if mutated(name) {
            return Ok(());
        }
        self.sync_data()
    }

    /// Sets the file's size.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let id = self.issue(|| Op::SetLen(len));
        self.file.set_len(len)?;
        self.done(id, false);
        Ok(())
    }

    /// `fallocate(mode)` over `[off, off + len)`, retried on EINTR. Punching and zeroing
    /// modes are recorded as zeroing the range.
    pub fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let zeroes = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let id = if zeroes {
            self.issue(|| Op::Zero { off, len })
        } else {
            None
        };
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate on a descriptor we own, with plain integer arguments; it
            // touches no memory of ours.
            let r = unsafe { libc::fallocate(self.fd(), mode, o, l) };
            if r == 0 {
                self.done(id, false);
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Deallocates `[off, off + len)`, the size kept (`FALLOC_FL_PUNCH_HOLE |
    /// FALLOC_FL_KEEP_SIZE`): the range reads as zeros and its blocks go back to the file
    /// system.
    pub fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }

    /// `BLKDISCARD` (deallocate) on a block device.
    pub fn blk_discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.blk_ioctl(BLKDISCARD, off, len)
    }

    /// `BLKZEROOUT` (make read as zeros) on a block device.
    pub fn blk_zeroout(&self, off: u64, len: u64) -> io::Result<()> {
        self.blk_ioctl(BLKZEROOUT, off, len)
    }

    fn blk_ioctl(&self, req: libc::c_ulong, off: u64, len: u64) -> io::Result<()> {
        let id = self.issue(|| Op::Zero { off, len });
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s from the pointer, which points to a
        // live local array.
        let r = unsafe { libc::ioctl(self.fd(), req, range.as_ptr()) };
        if r == 0 {
            self.done(id, false);
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Size of the regular file or block device in bytes.
    pub fn size(&self) -> io::Result<u64> {
        // SAFETY: lseek on a valid, owned fd; it only moves the file offset, which we never
        // use (all I/O is positional).
        let end = unsafe { libc::lseek(self.fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(end as u64)
    }
}

/// The bytes `iovs` describe, in order (for recording a write).
fn gather(iovs: &[libc::iovec]) -> Vec<u8> {
    let mut v = Vec::with_capacity(iovs.iter().map(|i| i.iov_len).sum());
    for i in iovs {
        // SAFETY: the caller of `HostFile::transfer` guarantees every iovec points at
        // `iov_len` readable bytes for the duration of the call.
        v.extend_from_slice(unsafe {
            std::slice::from_raw_parts(i.iov_base as *const u8, i.iov_len)
        });
    }
    v
}

/// Advances `iovs` past `n` bytes, dropping fully consumed entries. Returns the new start index.
pub fn advance(iovs: &mut [libc::iovec], mut start: usize, mut n: usize) -> usize {
    while n > 0 && start < iovs.len() {
        let iov = &mut iovs[start];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            start += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            iov.iov_len -= n;
            n = 0;
        }
    }
    start
}

/// Transfers all of `iovs` at `offset`, looping over short transfers and EINTR. A read that
/// hits end-of-file fills the rest with zeros. Not recorded: use [`HostFile::transfer`].
pub fn transfer_all(
    fd: RawFd,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    dir: Dir,
) -> io::Result<()> {
    let mut start = 0;
    while start < iovs.len() {
        let cnt = (iovs.len() - start).min(IOV_MAX) as libc::c_int;
        let ptr = iovs[start..].as_ptr();
        let off = offset as libc::off_t;
        // SAFETY: every iovec points into live guest memory or a buffer of ours of the stated
        // length (guaranteed by the caller for the duration of this call); cnt <= IOV_MAX.
        let r = unsafe {
            match dir {
                Dir::Read => libc::preadv(fd, ptr, cnt, off),
                Dir::Write { durable: false } => libc::pwritev(fd, ptr, cnt, off),
                Dir::Write { durable: true } => libc::pwritev2(fd, ptr, cnt, off, libc::RWF_DSYNC),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if dir == Dir::Read {
                for iov in &iovs[start..] {
                    // SAFETY: as above, each iovec is a live writable buffer of iov_len bytes.
                    unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 0, iov.iov_len) };
                }
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write made no progress",
            ));
        }
        offset += r as u64;
        start = advance(iovs, start, r as usize);
    }
    Ok(())
}

/// A reusable list of `iovec`s, emptied after every system call.
#[derive(Default)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the raw pointers inside are only set and used within one call of the owner's method,
// on the calling thread, and cleared before it returns; between calls the vector is empty.
unsafe impl Send for IoVecs {}

/// A heap buffer aligned for O_DIRECT, grown on demand and reused.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    align: usize,
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
            align: 1,
        }
    }
}

// SAFETY: the buffer is exclusively owned heap memory; nothing else holds its pointer.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Makes the buffer at least `len` bytes, aligned to `align` (at least 4096), and returns
    /// it.
    pub fn get(&mut self, len: usize, align: usize) -> io::Result<&mut [u8]> {
        let align = align.max(4096);
        if self.len < len || self.align < align {
            self.free();
            let size = len.max(1).next_multiple_of(align);
            let layout = std::alloc::Layout::from_size_align(size, align)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: layout has non-zero size (rounded up to a non-zero alignment).
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            self.ptr = ptr;
            self.len = size;
            self.align = align;
        }
        // SAFETY: ptr points to `self.len >= len` initialised (zeroed at allocation, then only
        // written through slices) bytes we own exclusively; the borrow of self ties the lifetime.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    /// The first `len` bytes (at most the buffer's size), as last written.
    pub fn bytes(&self, len: usize) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: ptr points to `self.len` initialised bytes we own; the borrow of self ties
        // the lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.len)) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr was allocated by `get` with exactly this size and alignment.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.len, self.align),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// (memory alignment, offset alignment) that O_DIRECT I/O on this file needs.
pub fn direct_alignment(file: &File, block_device: bool) -> (usize, usize) {
    if block_device {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to a live local.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut ssz) };
        if r == 0 && ssz > 0 {
            return (ssz as usize, ssz as usize);
        }
        return (4096, 4096);
    }
    // SAFETY: statx with an empty path and AT_EMPTY_PATH reads the open fd's attributes into
    // a zero-initialised struct we own.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the path is a valid NUL-terminated empty string.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_mem_align > 0 {
        return (
            stx.stx_dio_mem_align as usize,
            stx.stx_dio_offset_align.max(1) as usize,
        );
    }
    // Unknown: assume the common 512-byte logical sector; a misjudged memory alignment is
    // caught by EINVAL and retried through the bounce buffer.
    (512, 512)
}

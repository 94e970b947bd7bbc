//! Shared harness code for the vhost-user-blk fuzz targets (see docs/FUZZING.md).
//!
//! - [`CheckedQueue`]: an [`ImageQueue`] wrapper that panics when the request layer hands the
//!   image an offset/length outside the device capacity or not aligned to the logical block
//!   size (the bug class the virtio-blk targets hunt), then forwards to the real image.
//! - [`MemDisk`] / [`MemImage`]: an in-memory disk (and `BlockImage` for the backend target).
//! - [`virtio_blk`]: drives `RequestHandler::process_queue` over fuzzer-built guest memory.
//! - [`vhost_user`]: drives a full `VhostUserDaemon` + `BlkBackend` over a unix socket.

use std::io;
use std::sync::{Arc, Mutex};

use vhost_user_blk::image::{slices_len, BlockImage, GuestSlice, ImageQueue};

pub mod vhost_user;
pub mod virtio_blk;

/// True when `VUB_FUZZ_DEBUG` is set: the harnesses then print what each input did (for
/// checking seeds; leave it unset while fuzzing).
pub fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("VUB_FUZZ_DEBUG").is_some())
}

/// Little cursor over the fuzzer's bytes: every read succeeds (zeros past the end).
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
    /// True once every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// Next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// Next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// Up to `n` next bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = start.saturating_add(n);
        &self.data[start..end]
    }
    /// Everything not consumed yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// Checks every offset/length the request layer gives the image against the device's
/// capacity and logical block size, then forwards to `inner`.
///
/// `ImageQueue`'s contract says callers have validated ranges; a violation is a bug in
/// `virtio_blk::request`, so it panics (which libFuzzer reports as a crash).
pub struct CheckedQueue {
    /// Capacity the device advertises, in bytes.
    pub capacity: u64,
    /// Logical block size (offsets and lengths must be multiples of it).
    pub lbs: u64,
    /// Whether the device is read-only (then nothing may write).
    pub read_only: bool,
    /// The real image queue.
    pub inner: Box<dyn ImageQueue>,
}

impl CheckedQueue {
    fn check(&self, what: &str, offset: u64, len: u64) {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= self.capacity),
            "BUG: {what} offset {offset} len {len} past the capacity {}",
            self.capacity
        );
        assert!(
            offset.is_multiple_of(self.lbs) && len.is_multiple_of(self.lbs),
            "BUG: {what} offset {offset} len {len} not aligned to the {}-byte block size",
            self.lbs
        );
    }

    fn check_writable(&self, what: &str) {
        assert!(!self.read_only, "BUG: {what} on a read-only device");
    }
}

impl ImageQueue for CheckedQueue {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.check("read", offset, slices_len(bufs));
        self.inner.read(offset, bufs)
    }
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()> {
        self.check_writable("write");
        self.check("write", offset, slices_len(bufs));
        self.inner.write(offset, bufs, durable)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable("discard");
        self.check("discard", offset, len);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable("write_zeroes");
        self.check("write_zeroes", offset, len);
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// An in-memory disk; `data.len()` is its size. Out-of-range access panics (`CheckedQueue`
/// normally catches it first with a clearer message).
#[derive(Clone)]
pub struct MemDisk {
    /// The disk's bytes.
    pub data: Arc<Mutex<Vec<u8>>>,
}

impl MemDisk {
    /// A disk of `size` bytes with a recognisable pattern.
    pub fn new(size: usize) -> Self {
        MemDisk {
            data: Arc::new(Mutex::new((0..size).map(|i| (i % 251) as u8).collect())),
        }
    }
}

fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
    offset as usize..(offset + len) as usize
}

impl ImageQueue for MemDisk {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        let mut pos = offset;
        for b in bufs {
            b.copy_from(&data[range(pos, b.len() as u64)]);
            pos += b.len() as u64;
        }
        Ok(())
    }
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], _durable: bool) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        let mut pos = offset;
        for b in bufs {
            b.copy_to(&mut data[range(pos, b.len() as u64)]);
            pos += b.len() as u64;
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.data.lock().unwrap()[range(offset, len)].fill(0);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.data.lock().unwrap()[range(offset, len)].fill(0);
        Ok(())
    }
}

/// A `BlockImage` over a [`MemDisk`] whose queue handles are [`CheckedQueue`]s.
pub struct MemImage {
    /// The shared disk.
    pub disk: MemDisk,
    /// Capacity the device advertises (bytes, a multiple of `lbs`).
    pub capacity: u64,
    /// Logical block size.
    pub lbs: u64,
    /// Read-only device.
    pub read_only: bool,
}

impl BlockImage for MemImage {
    fn virtual_size(&self) -> u64 {
        self.disk.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn format_name(&self) -> &'static str {
        "fuzz-mem"
    }
    fn discard_granularity(&self) -> u64 {
        4096
    }
    fn queue_handle(&self) -> io::Result<Box<dyn ImageQueue>> {
        Ok(Box::new(CheckedQueue {
            capacity: self.capacity,
            lbs: self.lbs,
            read_only: self.read_only,
            inner: Box::new(self.disk.clone()),
        }))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

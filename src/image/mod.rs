//! Disk images: the storage under the virtio-blk device.
//!
//! An image is opened once per daemon ([`BlockImage`]) and hands out one [`ImageQueue`] per
//! virtqueue worker, so that each worker has its own file handle and scratch state and the I/O
//! path takes no lock shared by all queues. The request layer (`virtio_blk`) only ever talks to
//! these two traits; formats (raw, qcow2) plug in underneath.

pub mod engine;
pub mod fault;
pub mod format;
pub mod lock;
pub mod null;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod storage;
pub mod uring;

use std::io;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::{GuestMemoryMmap, VolatileSlice};

pub use format::{
    create_image, open_image, open_image_cached, open_image_locked, ImageFormat, ImageOptions,
};
pub use lock::{ImageLocks, Locking};

/// One contiguous piece of guest memory taking part in a data transfer.
///
/// The slice points into the guest's mapped memory; it stays valid while the request that
/// produced it holds its guest-memory guard.
pub type GuestSlice<'a> = VolatileSlice<'a, ()>;

/// Guest memory as the backend maps it. Each region carries the dirty log the frontend may
/// install for a live migration (`VHOST_USER_SET_LOG_BASE`); writes through vm-memory (status
/// bytes, GET_ID data, the used ring) mark it themselves, data the engines write through raw
/// pointers is marked by the request layer (`virtio_blk::chain::mark_written`) when its
/// request completes.
///
/// Defined here, below the request layer, because the engines keep the map alive while a
/// request is in flight ([`engine::GuestBuffers`]); `virtio_blk` re-exports it.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;

/// The same bytes as `s`, without its dirty-log bitmap: a [`GuestSlice`]. The engines read
/// into guest buffers through raw pointers (`preadv`, io_uring), which no bitmap would see
/// anyway; the request layer logs those bytes once the request completes.
pub fn unlogged<'m>(s: &VolatileSlice<'m, BitmapMmapRegion>) -> GuestSlice<'m> {
    // SAFETY: `s` is a valid slice of `s.len()` bytes of guest memory mapped for at least
    // 'm (the lifetime of the memory map it was taken from); the new slice covers exactly
    // those bytes for the same lifetime, and volatile slices may alias.
    unsafe { VolatileSlice::new(s.ptr_guard_mut().as_ptr(), s.len()) }
}

/// Format-specific figures for the control socket's `stats`; `None` where a format has no
/// such thing.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageStats {
    /// Host bytes the image occupies (allocated blocks of the file).
    pub allocated_bytes: Option<u64>,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// Host clusters in use (qcow2).
    pub allocated_clusters: Option<u64>,
    /// Guest data the image holds: host clusters in use that are not metadata, in bytes
    /// (qcow2 without an external data file). Next to `allocated_bytes`, it shows what
    /// punching freed clusters gave back.
    pub data_bytes: Option<u64>,
    /// Host clusters free for reuse in the free-cluster bitmap (qcow2).
    pub free_clusters: Option<u64>,
    /// Metadata tables modified since the last flush (qcow2).
    pub dirty_tables: Option<u64>,
}

/// A persistent dirty bitmap of an image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Whether writes update it.
    pub enabled: bool,
    /// Whether it may be stale (in use by a crashed writer, or marked inconsistent).
    pub inconsistent: bool,
    /// Bytes of the disk marked dirty (set bits times the granularity), when the bitmap is
    /// maintained.
    pub dirty_bytes: Option<u64>,
}

/// A disk image shared by all queue workers of a device.
pub trait BlockImage: Send + Sync {
    /// Size of the disk the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// True when the image was opened read-only.
    fn read_only(&self) -> bool;

    /// Short name of the image format, for logs ("raw", "qcow2", ...).
    fn format_name(&self) -> &'static str;

    /// Granularity in bytes at which discard can really free space (used to fill in the
    /// discard alignment the device advertises).
    fn discard_granularity(&self) -> u64;

    /// Opens an independent synchronous I/O handle for one queue worker.
    fn queue_handle(&self) -> io::Result<Box<dyn ImageQueue>>;

    /// Opens the I/O engine of one queue worker. The default runs each request to completion
    /// on the worker ([`engine::SyncEngine`]); images with an io_uring engine override it.
    fn engine(&self) -> io::Result<Box<dyn engine::IoEngine>> {
        Ok(Box::new(engine::SyncEngine::new(self.queue_handle()?)))
    }

    /// Makes every write that has completed so far durable.
    fn flush(&self) -> io::Result<()>;

    /// Grows the image to `new_size` bytes (online resize). Callers refuse shrinking.
    fn resize(&self, _new_size: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} images cannot be resized", self.format_name()),
        ))
    }

    /// Format-specific statistics.
    fn stats(&self) -> ImageStats {
        ImageStats::default()
    }

    /// The image's persistent dirty bitmaps.
    fn bitmaps(&self) -> Vec<BitmapInfo> {
        Vec::new()
    }

    /// Clears the named bitmap (starts a new incremental-backup epoch).
    fn clear_bitmap(&self, name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no bitmap named '{name}'"),
        ))
    }

    /// Clean shutdown: makes everything durable and leaves the image consistent on disk (for
    /// qcow2, clears the dirty bit). Called once no queue worker is running any more.
    fn close(&self) -> io::Result<()> {
        self.flush()
    }
}

/// The I/O handle one queue worker uses; never shared between threads.
///
/// Offsets and lengths are in bytes of the virtual disk and have been checked by the caller to
/// lie within [`BlockImage::virtual_size`].
pub trait ImageQueue: Send {
    /// Reads `bufs.len()` buffers' worth of bytes starting at `offset`, in order.
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()>;

    /// Writes the buffers at `offset`. With `durable`, the data is on stable storage when this
    /// returns (write-through cache mode).
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()>;

    /// Makes every write completed so far (on any queue) durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Tells the image the range is no longer needed; its contents become unspecified but
    /// reading it must not return another range's data. Implementations that cannot free space
    /// may do nothing.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes the range read back as zeros. With `unmap`, the image may free the space.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// Whether each op costs real time (a copy through the page cache, metadata work). The
    /// request handler then returns completions to the driver every few requests instead of
    /// once the queue is empty, so the driver refills the queue while the rest runs. Images
    /// whose ops cost nothing (null) say `false`.
    fn sequential(&self) -> bool {
        true
    }
}

/// Total length in bytes of a list of guest slices.
pub fn slices_len(bufs: &[GuestSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

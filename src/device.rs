//! What outlives frontend connections: the image, the device parameters, the counters.
//!
//! # Handover (live migration)
//!
//! A migrating VM has two daemons on one image, each under its own QEMU: the source's serves
//! until QEMU stops the device at the migration's final stop, the destination's from when its
//! QEMU starts the device. Only one may write, and the destination must see everything the
//! source wrote, metadata included. So the device is *active* (image open, write lock held)
//! or *inactive* (image closed and unlocked; an [`InactiveImage`] stands in, with the size
//! and features the configuration space needs). [`Device::deactivate`] runs when the
//! frontend has stopped every queue it started (after each has drained): it flushes,
//! closes (qcow2: metadata written back, dirty bit cleared) and releases the locks.
//! [`Device::activate`] runs when a started queue first has work: it opens the image again,
//! locked, so that whatever another daemon changed meanwhile is read afresh (retrying
//! briefly while the other side still holds the lock). `--incoming` starts inactive.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::info;

use crate::error::{Error, Result};
use crate::image::{BlockImage, ImageLocks};
use crate::stats::{now_ns, QueueCounters};
use crate::sync::lock;
use crate::vhost_user::Connection;
use crate::virtio_blk::DeviceParams;

/// Opens the image again, locked (for [`Device::activate`]).
pub type Reopen = Box<dyn Fn() -> Result<(Arc<dyn BlockImage>, ImageLocks)> + Send + Sync>;

/// How long [`Device::activate`] retries while another process holds the image.
const ACTIVATE_RETRY: Duration = Duration::from_secs(5);

/// The image of an inactive device: it knows what the configuration space needs and refuses
/// I/O (a queue worker retries on its next kick).
pub struct InactiveImage {
    size: u64,
    read_only: bool,
    format: &'static str,
    discard_granularity: u64,
}

impl InactiveImage {
    /// Stands in for `image` (which may then be closed).
    pub fn of(image: &dyn BlockImage) -> InactiveImage {
        InactiveImage {
            size: image.virtual_size(),
            read_only: image.read_only(),
            format: image.format_name(),
            discard_granularity: image.discard_granularity(),
        }
    }
    /// Says the device serves read-only or not (the peeked image may have been opened
    /// read-only whatever the device serves).
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }
}

impl BlockImage for InactiveImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format_name(&self) -> &'static str {
        self.format
    }

    fn discard_granularity(&self) -> u64 {
        self.discard_granularity
    }

    fn queue_handle(&self) -> io::Result<Box<dyn crate::image::ImageQueue>> {
        Err(io::Error::other(
            "the image is inactive (handed over, or --incoming before the device started)",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`Device::activate`] and [`Device::deactivate`] change, under one lock.
struct Handover {
    /// The image's locks while active.
    locks: ImageLocks,
    /// `None`: the device cannot be reopened (library users, tests) and never deactivates.
    reopen: Option<Reopen>,
}

/// Default busy-poll time after a batch (QEMU's iothread `poll-max-ns` default is 32 µs).
pub const DEFAULT_POLL_NS: u64 = 32_000;

/// The served disk, shared by the connection loop, every connection's backend and the
/// control socket.
pub struct Device {
    /// The image being served (an [`InactiveImage`] while inactive).
    image: RwLock<Arc<dyn BlockImage>>,
    /// Whether the image is open and locked for serving (see the module docs).
    active: AtomicBool,
    handover: Mutex<Handover>,
    /// Device parameters (config space, limits).
    pub params: Arc<DeviceParams>,
    /// Maximum virtqueue size.
    pub queue_size: usize,
    /// Default cache mode (true = write-back).
    pub writeback: bool,
    /// How long a worker busy-polls its queue for more requests after a batch (0: never).
    pub poll_ns: u64,
    /// One set of counters per queue, accumulated over all connections.
    pub queues: Vec<Arc<QueueCounters>>,
    /// The current frontend connection (control path only).
    connection: Mutex<Option<Arc<Connection>>>,
    /// Flushes requested outside the guest (control socket, disconnects).
    pub host_flushes: AtomicU64,
    /// [`now_ns`] of the last host-requested flush (0: never).
    pub last_host_flush_ns: AtomicU64,
    /// When the device was created.
    pub started: Instant,
    /// Serialises online resizes (control path only).
    pub resize_lock: Mutex<()>,
}

impl Device {
    /// A device serving `image` with `params`.
    pub fn new(
        image: Arc<dyn BlockImage>,
        params: DeviceParams,
        queue_size: usize,
        writeback: bool,
    ) -> Self {
        let queues = (0..params.num_queues)
            .map(|_| Arc::new(QueueCounters::default()))
            .collect();
        Device {
            image: RwLock::new(image),
            active: AtomicBool::new(true),
            handover: Mutex::new(Handover {
                locks: ImageLocks::default(),
                reopen: None,
            }),
            params: Arc::new(params),
            queue_size,
            writeback,
            poll_ns: DEFAULT_POLL_NS,
            queues,
            connection: Mutex::new(None),
            host_flushes: AtomicU64::new(0),
            last_host_flush_ns: AtomicU64::new(0),
            started: Instant::now(),
            resize_lock: Mutex::new(()),
        }
    }

    /// Makes the device able to hand its image over: `locks` are held now (empty: inactive,
    /// as for `--incoming`), `reopen` opens the image again for [`Device::activate`].
    pub fn set_handover(&self, locks: ImageLocks, reopen: Reopen, active: bool) {
        let mut h = lock(&self.handover);
        h.locks = locks;
        h.reopen = Some(reopen);
        if !active {
            let standin = InactiveImage::of(&*self.image());
            *self.image.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(standin);
        }
        // Release: pairs with the Acquire in `is_active`; the image was swapped first.
        self.active.store(active, Ordering::Release);
    }

    /// The image being served.
    pub fn image(&self) -> Arc<dyn BlockImage> {
        self.image.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the image is open and locked for serving.
    pub fn is_active(&self) -> bool {
        // Acquire: a worker that sees `true` then sees the image `activate` stored.
        self.active.load(Ordering::Acquire)
    }

    /// Opens and locks the image again after [`Device::deactivate`] (or `--incoming`), reading
    /// all its metadata afresh; retries for a while when another process still holds it.
    pub fn activate(&self) -> Result<()> {
        let mut h = lock(&self.handover);
        if self.is_active() {
            return Ok(());
        }
        let Some(reopen) = &h.reopen else {
            return Ok(());
        };
        let deadline = Instant::now() + ACTIVATE_RETRY;
        let (image, locks) = loop {
            match reopen() {
                Ok(r) => break r,
                Err(e @ Error::ImageInUse { .. }) if Instant::now() < deadline => {
                    log::debug!("activating: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        let size = self.params.capacity_sectors() << crate::virtio_blk::config::SECTOR_SHIFT;
        if image.virtual_size() != size {
            // Serving a different size than the guest was told would misplace its data.
            return Err(Error::InvalidOption(format!(
                "the image is {} bytes now, the device {size}: refusing to serve it",
                image.virtual_size()
            )));
        }
        *self.image.write().unwrap_or_else(|e| e.into_inner()) = image;
        h.locks = locks;
        self.active.store(true, Ordering::Release);
        info!("image activated: reopened and locked for serving");
        Ok(())
    }

    /// Hands the image over: flushes it, closes it (qcow2: metadata written back, dirty bit
    /// cleared) and releases its locks, so that another daemon can take it. Call only when no
    /// queue has a request in flight and every queue worker has dropped its engine. A device
    /// that cannot be reopened only flushes.
    pub fn deactivate(&self) -> io::Result<()> {
        let mut h = lock(&self.handover);
        if !self.is_active() {
            return Ok(());
        }
        let image = self.image();
        if h.reopen.is_none() {
            return image.flush();
        }
        image.close()?;
        let standin: Arc<dyn BlockImage> = Arc::new(InactiveImage::of(&*image));
        self.active.store(false, Ordering::Release);
        *self.image.write().unwrap_or_else(|e| e.into_inner()) = standin;
        drop(image);
        h.locks.deactivate();
        h.locks = ImageLocks::default();
        info!("image handed over: flushed, closed and unlocked (all queues stopped)");
        Ok(())
    }

    /// Flushes the image on behalf of the host (not the guest) and counts it.
    pub fn flush(&self) -> io::Result<()> {
        self.image().flush()?;
        self.host_flushes.fetch_add(1, Ordering::Relaxed);
        self.last_host_flush_ns.store(now_ns(), Ordering::Relaxed);
        Ok(())
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        lock(&self.connection).is_some()
    }

    /// Records the current connection (None when no frontend is connected).
    pub fn set_connection(&self, connection: Option<Arc<Connection>>) {
        *lock(&self.connection) = connection;
    }

    /// Tells the connected frontend that the configuration space changed. Returns whether a
    /// frontend was told (false: none connected, or it has no backend channel).
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let conn = lock(&self.connection).clone();
        match conn {
            Some(c) => c.notify_config_change(),
            None => Ok(false),
        }
    }
}

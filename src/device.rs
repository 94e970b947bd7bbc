//! What outlives frontend connections: the image, the device parameters, the counters.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::image::BlockImage;
use crate::stats::{now_ns, QueueCounters};
use crate::sync::lock;
use crate::vhost_user::Connection;
use crate::virtio_blk::DeviceParams;

/// Default busy-poll time after a batch (QEMU's iothread `poll-max-ns` default is 32 µs).
pub const DEFAULT_POLL_NS: u64 = 32_000;

/// The served disk, shared by the connection loop, every connection's backend and the
/// control socket.
pub struct Device {
    /// The image being served.
    pub image: Arc<dyn BlockImage>,
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
            image,
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

    /// Flushes the image on behalf of the host (not the guest) and counts it.
    pub fn flush(&self) -> io::Result<()> {
        self.image.flush()?;
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

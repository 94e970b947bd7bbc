//! What outlives frontend connections: the image, the device parameters, the counters.

use std::sync::Arc;

use crate::image::BlockImage;
use crate::stats::QueueCounters;
use crate::virtio_blk::DeviceParams;

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
    /// One set of counters per queue, accumulated over all connections.
    pub queues: Vec<Arc<QueueCounters>>,
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
            queues,
        }
    }
}

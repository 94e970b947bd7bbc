//! What outlives frontend connections: the image, the device parameters, the counters.
//!
//! # Handover (live migration)
//!
//! A migrating VM has two daemons on one image, each under its own QEMU: the source's serves
//! until QEMU stops the device at the migration's final stop, the destination's from when its
//! QEMU starts the device. Only one may write, and the destination must see everything the
//! source wrote, metadata included. So the device is *active* (image open, write lock held)
//! or *inactive* (image closed and unlocked; an [`InactiveImage`] stands in, with the size
//! and features the configuration space needs). The handover ([`Device::stop_queue`]) runs when the
//! frontend has stopped every queue it started (after each has drained): it flushes,
//! closes (qcow2: metadata written back, dirty bit cleared) and releases the locks.
//! Activation ([`Device::start_queue`]) runs when a started queue first has work: it opens the image again,
//! locked, so that whatever another daemon changed meanwhile is read afresh (waiting, in the
//! lock layer, up to `image::lock::HANDOVER_GRACE` while the other side still holds the
//! lock). `--incoming` starts inactive.
//!
//! The control socket's `activate` and `deactivate` (docs/CONTROL.md) drive the same two
//! steps for a management tool. A deactivate is refused while any queue is started: the
//! device keeps the set of started queues itself ([`Device::start_queue`],
//! [`Device::stop_queue`]), changed only under the handover lock together with the
//! activation or deactivation it causes, so "no queue started" and "image closed" are
//! decided in one critical section and a worker never runs on a closed image.
//!
//! # Lock order
//!
//! `Device::handover` first, then a queue worker's mutex, then the backend's epoll list, then
//! `Device::connection` and `Device::image` (each held only to clone or swap an `Arc`). A
//! queue worker takes the handover lock (in [`Device::start_queue`]) before its own mutex and
//! never while holding it; the control socket takes only the handover lock.
//!
//! A queue joins the started set at its worker's first pass once the frontend made it ready
//! and enabled (vhost-user-backend runs that pass as soon as the ring is enabled, without
//! waiting for the guest's kick, but on a busy host that can come measurably later). So a
//! control deactivate also refuses while the relay has seen the frontend start a ring
//! (`Connection::rings_started`: SET_VRING_KICK until GET_VRING_BASE or a reset). That check
//! is what makes the refusal prompt and deterministic; what keeps a worker off a closed image
//! is the started set and the activation in `start_queue`, both under the handover lock.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::info;

use crate::error::{Error, Result};
use crate::image::lock::{HANDOVER_GRACE, RELEASE_GRACE};
use crate::image::{BlockImage, ImageLocks};
use crate::stats::{now_ns, QueueCounters};
use crate::sync::{self, lock};
use crate::vhost_user::Connection;
use crate::virtio_blk::DeviceParams;

/// Opens the image again, locked (for an activation, [`Device::start_queue`] and
/// [`Device::activate_now`]), waiting up to the given grace for another process to let it go
/// (`image::lock::with_locks`).
pub type Reopen = Box<dyn Fn(Duration) -> Result<(Arc<dyn BlockImage>, ImageLocks)> + Send + Sync>;

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

/// What a control-socket `activate` or `deactivate` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The device changed state.
    Changed,
    /// The device was in that state already (nothing done).
    Already,
}

/// Why a control-socket `deactivate` did not hand the image over.
#[derive(Debug, thiserror::Error)]
pub enum DeactivateError {
    /// The frontend has started queues: their workers may use the image at any moment.
    #[error(
        "refused: the frontend has queue(s) {0} started; stop them first (pause the VM) or \
         disconnect the frontend"
    )]
    QueuesStarted(String),
    /// A device without a way to reopen its image (library use) never closes it.
    #[error("refused: this device cannot reopen its image, so it does not hand it over")]
    NotReopenable,
    /// The flush or the close failed; the image stays open and locked.
    #[error("failed: {0} (the image stays open and locked)")]
    Close(io::Error),
}

/// What activation and handover change, under one lock.
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
    /// Queues the current frontend started and has not stopped (GET_VRING_BASE) since, one
    /// bit each: a queue counts as started once its worker ran it while it was ready and
    /// enabled. Changed only under `handover`; read without it on the I/O path. A set bit
    /// implies `active` (see the module docs).
    queues_started: AtomicU64,
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
            queues_started: AtomicU64::new(0),
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
    /// as for `--incoming`), `reopen` opens the image again at each activation.
    pub fn set_handover(&self, locks: ImageLocks, reopen: Reopen, active: bool) {
        let mut h = lock(&self.handover);
        h.locks = locks;
        h.reopen = Some(reopen);
        if !active {
            let standin = InactiveImage::of(&*self.image());
            *sync::write(&self.image) = Arc::new(standin);
        }
        // Release: pairs with the Acquire in `is_active`; the image was swapped first.
        self.active.store(active, Ordering::Release);
    }

    /// The image being served.
    pub fn image(&self) -> Arc<dyn BlockImage> {
        sync::read(&self.image).clone()
    }

    /// Whether the image is open and locked for serving.
    pub fn is_active(&self) -> bool {
        // Acquire: a worker that sees `true` then sees the image `activate` stored.
        self.active.load(Ordering::Acquire)
    }

    /// The control socket's `activate`: like the activation of a queue start
    /// ([`Device::start_queue`]), but waits only the short [`RELEASE_GRACE`] a start waits
    /// for a holder that is going away: the management tool decides when the other side has
    /// let go, and wants a prompt answer when it has not.
    pub fn activate_now(&self) -> Result<Transition> {
        self.activate_locked(&mut lock(&self.handover), RELEASE_GRACE)
    }

    /// Opens and locks the image again after a handover (or `--incoming`), reading all its
    /// metadata afresh; the lock layer waits up to `grace` while another process still holds
    /// it.
    fn activate_locked(&self, h: &mut Handover, grace: Duration) -> Result<Transition> {
        if self.is_active() {
            return Ok(Transition::Already);
        }
        let Some(reopen) = &h.reopen else {
            return Ok(Transition::Already);
        };
        let (image, locks) = reopen(grace)?;
        let size = self.params.capacity_sectors() << crate::virtio_blk::config::SECTOR_SHIFT;
        if image.virtual_size() != size {
            // Serving a different size than the guest was told would misplace its data.
            return Err(Error::InvalidOption(format!(
                "the image is {} bytes now, the device {size}: refusing to serve it",
                image.virtual_size()
            )));
        }
        *sync::write(&self.image) = image;
        h.locks = locks;
        self.active.store(true, Ordering::Release);
        info!("image activated: reopened and locked for serving");
        Ok(Transition::Changed)
    }

    /// The control socket's `deactivate`: hands the image over as the last queue stop does,
    /// but only while no queue is started (refused otherwise, nothing changed).
    pub fn deactivate_idle(&self) -> std::result::Result<Transition, DeactivateError> {
        let mut h = lock(&self.handover);
        // Rings the frontend started whose worker has not run yet count too: their first
        // request would take the image back from whoever has it by then.
        let rings = lock(&self.connection)
            .as_ref()
            .map_or(0, |c| c.rings_started());
        let started = self.queues_started.load(Ordering::Relaxed) | rings;
        if started != 0 {
            return Err(DeactivateError::QueuesStarted(queue_list(started)));
        }
        if !self.is_active() {
            return Ok(Transition::Already);
        }
        if h.reopen.is_none() {
            return Err(DeactivateError::NotReopenable);
        }
        // No queue is started, so no worker has an engine: a worker that has one keeps its
        // queue's bit set until `stop_queue` has dropped every engine (or the connection
        // ended and took them along).
        self.deactivate_locked(&mut h, "control socket")
            .map_err(DeactivateError::Close)
    }

    /// Hands the image over: flushes it, closes it (qcow2: metadata written back, dirty bit
    /// cleared) and releases its locks, so that another daemon can take it. Call only when no
    /// queue has a request in flight and every queue worker has dropped its engine. A device
    /// that cannot be reopened only flushes.
    fn deactivate_locked(&self, h: &mut Handover, why: &str) -> io::Result<Transition> {
        if !self.is_active() {
            return Ok(Transition::Already);
        }
        let image = self.image();
        if h.reopen.is_none() {
            image.flush()?;
            return Ok(Transition::Already);
        }
        image.close()?;
        let standin: Arc<dyn BlockImage> = Arc::new(InactiveImage::of(&*image));
        self.active.store(false, Ordering::Release);
        *sync::write(&self.image) = standin;
        drop(image);
        h.locks.deactivate();
        h.locks = ImageLocks::default();
        info!("image handed over: flushed, closed and unlocked ({why})");
        Ok(Transition::Changed)
    }

    /// Whether queue `q` is started (lock-free: the worker's check before each pass).
    pub fn queue_started(&self, q: usize) -> bool {
        // Relaxed: a set bit was set by the queue's own worker thread, under `handover`.
        self.queues_started.load(Ordering::Relaxed) & queue_bit(q) != 0
    }

    /// Marks queue `q` started, first taking the image back when the device is inactive
    /// (waiting up to [`HANDOVER_GRACE`] for another process to let it go, with the handover
    /// lock held). `ready` runs under the handover lock and says
    /// whether the frontend really has the queue started (ready and enabled): false leaves
    /// everything as it was and returns `Ok(false)`.
    pub fn start_queue(&self, q: usize, ready: impl FnOnce() -> bool) -> Result<bool> {
        let mut h = lock(&self.handover);
        if !ready() {
            return Ok(false);
        }
        self.activate_locked(&mut h, HANDOVER_GRACE)?;
        self.queues_started
            .fetch_or(queue_bit(q), Ordering::Relaxed);
        Ok(true)
    }

    /// Marks queue `q` stopped (after it drained). When it was the last started queue,
    /// `release` runs (it must drop every worker's engine) and the image is handed over
    /// (flushed, closed, unlocked), both under the handover lock, so that neither a control
    /// `deactivate` nor a queue start sees the set empty while an engine still exists.
    pub fn stop_queue(&self, q: usize, release: impl FnOnce()) -> io::Result<()> {
        let mut h = lock(&self.handover);
        let bit = queue_bit(q);
        let before = self.queues_started.fetch_and(!bit, Ordering::Relaxed);
        if before & bit == 0 || before & !bit != 0 {
            return Ok(());
        }
        release();
        self.deactivate_locked(&mut h, "all queues stopped")
            .map(|_| ())
    }

    /// The frontend went away without stopping its queues: once its workers and engines are
    /// gone (`release`), no queue is started any more. The image stays as it is (a
    /// reconnecting frontend resumes on it); a control `deactivate` may hand it over now.
    pub fn frontend_gone(&self, release: impl FnOnce()) {
        let _h = lock(&self.handover);
        release();
        self.queues_started.store(0, Ordering::Relaxed);
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

/// Queue `q`'s bit in `Device::queues_started` (0 past 63: the backend offers at most 64 queues).
fn queue_bit(q: usize) -> u64 {
    u32::try_from(q)
        .ok()
        .and_then(|q| 1u64.checked_shl(q))
        .unwrap_or(0)
}

/// The queues of a `queues_started` mask, e.g. "0, 1".
fn queue_list(mask: u64) -> String {
    (0..64u32)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::image::null::NullImage;
    use crate::virtio_blk::DeviceOptions;

    const SIZE: u64 = 1 << 20;

    /// A two-queue device over a null image, without a way to reopen it (as library users
    /// make them).
    fn plain_device() -> Device {
        let params = DeviceParams::new(&DeviceOptions {
            size: SIZE,
            logical_block_size: 512,
            discard_granularity: 4096,
            num_queues: 2,
            queue_size: 16,
            read_only: false,
            serial: "",
        })
        .unwrap();
        Device::new(Arc::new(NullImage::new(SIZE)), params, 16, true)
    }

    /// [`plain_device`] with a reopen that counts its calls.
    fn device(opens: Arc<AtomicUsize>) -> Device {
        let d = plain_device();
        let reopen: Reopen = Box::new(move |_| {
            opens.fetch_add(1, Ordering::Relaxed);
            Ok((
                Arc::new(NullImage::new(SIZE)) as Arc<dyn BlockImage>,
                ImageLocks::default(),
            ))
        });
        d.set_handover(ImageLocks::default(), reopen, true);
        d
    }

    #[test]
    fn control_deactivate_is_refused_while_a_queue_is_started() {
        let opens = Arc::new(AtomicUsize::new(0));
        let d = device(opens.clone());
        assert!(d.start_queue(0, || true).unwrap());
        assert!(d.start_queue(1, || true).unwrap());
        let e = d.deactivate_idle().unwrap_err();
        assert!(
            matches!(e, DeactivateError::QueuesStarted(ref q) if q == "0, 1"),
            "{e}"
        );
        assert!(d.is_active(), "a refused deactivate changed the device");
        // Stopping one queue is not enough; the last stop hands the image over itself,
        // releasing the engines first.
        let mut released = 0;
        d.stop_queue(1, || released += 1).unwrap();
        assert_eq!(released, 0, "engines released while queue 0 runs");
        assert!(d.deactivate_idle().is_err());
        d.stop_queue(0, || released += 1).unwrap();
        assert_eq!(released, 1);
        assert!(!d.is_active());
        // Idempotent, and reported as such.
        assert_eq!(d.deactivate_idle().unwrap(), Transition::Already);
        assert_eq!(opens.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn control_activate_and_a_queue_start_both_take_the_image_back() {
        let opens = Arc::new(AtomicUsize::new(0));
        let d = device(opens.clone());
        assert_eq!(d.deactivate_idle().unwrap(), Transition::Changed);
        assert!(!d.is_active());
        assert!(
            d.image().queue_handle().is_err(),
            "an inactive image serves"
        );
        assert_eq!(d.activate_now().unwrap(), Transition::Changed);
        assert_eq!(d.activate_now().unwrap(), Transition::Already);
        assert_eq!(opens.load(Ordering::Relaxed), 1);
        assert!(d.image().queue_handle().is_ok());

        assert_eq!(d.deactivate_idle().unwrap(), Transition::Changed);
        // A queue the frontend has not started leaves the device alone.
        assert!(!d.start_queue(0, || false).unwrap());
        assert!(!d.is_active() && !d.queue_started(0));
        assert!(d.start_queue(0, || true).unwrap());
        assert!(d.is_active() && d.queue_started(0));
        assert_eq!(opens.load(Ordering::Relaxed), 2);

        // A frontend that goes away without stopping its queues leaves the image active, and
        // a control deactivate possible once its engines are gone.
        let mut released = false;
        d.frontend_gone(|| released = true);
        assert!(released && d.is_active() && !d.queue_started(0));
        assert_eq!(d.deactivate_idle().unwrap(), Transition::Changed);
    }

    #[test]
    fn a_ring_the_frontend_started_refuses_deactivate_before_its_worker_ran() {
        let d = device(Arc::new(AtomicUsize::new(0)));
        let conn = Arc::new(Connection::default());
        d.set_connection(Some(conn.clone()));
        conn.ring_kick_set(1);
        let e = d.deactivate_idle().unwrap_err();
        assert!(
            matches!(e, DeactivateError::QueuesStarted(ref q) if q == "1"),
            "{e}"
        );
        conn.ring_stopped(Some(1));
        assert_eq!(d.deactivate_idle().unwrap(), Transition::Changed);
    }

    #[test]
    fn a_device_that_cannot_reopen_refuses_to_deactivate() {
        let d = plain_device();
        assert!(matches!(
            d.deactivate_idle(),
            Err(DeactivateError::NotReopenable)
        ));
        assert!(d.is_active());
        assert_eq!(d.activate_now().unwrap(), Transition::Already);
    }

    #[test]
    fn an_activation_reopens_once_and_leaves_the_wait_to_the_lock_layer() {
        // A holder that never lets go: each activation opens once, with the grace it may
        // wait (the queue start's longer one, the control socket's short one), and fails.
        let graces = Arc::new(Mutex::new(Vec::new()));
        let seen = graces.clone();
        let reopen: Reopen = Box::new(move |grace| {
            lock(&seen).push(grace);
            Err(Error::ImageInUse {
                what: "image",
                path: "disk.img".into(),
                reason: "held".into(),
            })
        });
        let d = plain_device();
        d.set_handover(ImageLocks::default(), reopen, false);
        assert!(matches!(
            d.start_queue(0, || true),
            Err(Error::ImageInUse { .. })
        ));
        assert!(!d.is_active() && !d.queue_started(0));
        assert!(matches!(d.activate_now(), Err(Error::ImageInUse { .. })));
        assert_eq!(*lock(&graces), [HANDOVER_GRACE, RELEASE_GRACE]);
    }
}

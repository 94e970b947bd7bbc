//! The vhost-user backend: glue between vhost-user-backend's event loop and the virtio-blk
//! device model.
//!
//! One [`BlkBackend`] exists per frontend connection (a reconnecting frontend gets fresh state).
//! It implements the `&self` [`VhostUserBackend`] trait with one worker thread per virtqueue;
//! each worker owns its [`RequestHandler`] (its own image handle and buffers). The handler sits
//! behind a per-worker `Mutex` only because the trait hands us `&self`: each mutex is locked by
//! exactly one thread, so it is never contended and no lock is shared by all queues.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::connection::Connection;
use super::inflight::QueueTracker;
use crate::device::Device;
use crate::sync::lock;
use crate::virtio_blk::config::{features, WRITEBACK_OFFSET};
use crate::virtio_blk::{chains_waiting, ChainTracker, GuestMem};
use crate::virtio_blk::{DeviceParams, DeviceState, RequestHandler};

/// Largest number of queues: vhost-user-backend maps queues to threads with a 64-bit mask.
pub const MAX_QUEUES: usize = 64;

/// Requests of a batch after which the driver is told about their completions when the
/// image runs a batch one request at a time ([`crate::image::ImageQueue::sequential`]). The
/// driver, often asleep waiting, then refills the queue while the rest of the batch runs
/// instead of after it. Why 4: docs/PERFORMANCE.md, "Early completions".
const NOTIFY_EVERY: usize = 4;

/// How long GET_VRING_BASE waits for a stopped queue's requests to complete before it answers
/// anyway (with a warning): a request stuck in the kernel must not hang the frontend forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Guest memory as vhost-user-backend shares it with us (with the regions' dirty logs).
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// A virtqueue over that memory.
type Vring = VringRwLock<GuestMemAtomic>;

/// One queue worker's private state.
struct Worker {
    /// Created on the first kick, so that idle queues cost no file handle.
    handler: Option<RequestHandler>,
    /// Generation of the inflight region this worker has recovered from (0: none yet).
    inflight_gen: u64,
    /// Counter for the order in which chains are taken (inflight tracking).
    counter: u64,
}

/// Records chains in the inflight region as they are taken and returned.
struct Tracker<'a> {
    queue: Option<QueueTracker<'a>>,
    counter: &'a mut u64,
}

impl ChainTracker for Tracker<'_> {
    fn taken(&mut self, head: u16) {
        if let Some(q) = &self.queue {
            q.begin(head, *self.counter);
            *self.counter += 1;
        }
    }

    fn returning(&mut self, head: u16) {
        if let Some(q) = &self.queue {
            q.batch(head);
        }
    }

    fn returned(&mut self, head: u16, used_idx: u16) {
        if let Some(q) = &self.queue {
            q.complete(head, used_idx);
        }
    }
}

/// The vhost-user-blk backend for one frontend connection.
pub struct BlkBackend {
    device: Arc<Device>,
    conn: Arc<Connection>,
    params: Arc<DeviceParams>,
    state: Arc<DeviceState>,
    mem: GuestMemAtomic,
    event_idx: AtomicBool,
    /// A refused config write was logged at warn level (later ones go to debug: the guest
    /// can repeat them at will).
    config_write_refused: AtomicBool,
    workers: Vec<Mutex<Worker>>,
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    /// Raw fds of exit-event consumers handed to vhost-user-backend (which leaks them).
    handed_out: Mutex<Vec<RawFd>>,
    /// Queue workers processing their queue right now (touched once per wake-up).
    busy_workers: AtomicUsize,
    /// CPUs this process may run on.
    cpus: usize,
    /// The workers' epoll handlers (set once the connection's daemon exists), where each
    /// worker registers its engine's completion eventfd.
    epoll: Mutex<Vec<Arc<VringEpollHandler<Arc<BlkBackend>>>>>,
}

/// Counts a worker as busy in [`BlkBackend::busy_workers`] while it lives.
struct BusyWorker<'a>(&'a AtomicUsize);

impl<'a> BusyWorker<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        BusyWorker(counter)
    }

    /// Busy workers, this one included.
    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for BusyWorker<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BlkBackend {
    /// A backend serving `device`; `mem` must be the same `GuestMemoryAtomic` given to the
    /// `VhostUserDaemon`, so memory table updates are seen here.
    pub fn new(
        device: Arc<Device>,
        conn: Arc<Connection>,
        mem: GuestMemAtomic,
    ) -> io::Result<Self> {
        let params = device.params.clone();
        let n = usize::from(params.num_queues);
        let mut workers = Vec::with_capacity(n);
        let mut exit_events = Vec::with_capacity(n);
        for _ in 0..n {
            workers.push(Mutex::new(Worker {
                handler: None,
                inflight_gen: 0,
                counter: 0,
            }));
            exit_events.push(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?);
        }
        Ok(BlkBackend {
            state: Arc::new(DeviceState::new(device.writeback)),
            device,
            conn,
            params,
            mem,
            event_idx: AtomicBool::new(false),
            config_write_refused: AtomicBool::new(false),
            workers,
            exit_events,
            handed_out: Mutex::new(Vec::new()),
            busy_workers: AtomicUsize::new(0),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            epoll: Mutex::new(Vec::new()),
        })
    }

    /// Hands over the workers' epoll handlers, so that a worker can add its engine's
    /// completion eventfd to its own epoll set when it creates the engine.
    pub fn set_epoll_handlers(&self, handlers: Vec<Arc<VringEpollHandler<Arc<BlkBackend>>>>) {
        *lock(&self.epoll) = handlers;
    }

    /// The epoll event id of queue `q`'s engine completions (above the queue and exit ids,
    /// which vhost-user-backend reserves).
    fn completion_event(&self, q: usize) -> u64 {
        u64::from(self.params.num_queues) + 1 + q as u64
    }

    /// Per-connection device state (cache mode, acked features).
    pub fn state(&self) -> &Arc<DeviceState> {
        &self.state
    }

    /// Ends a connection's queue processing: stops the workers, drops `daemon` (the
    /// connection's `VhostUserDaemon`, which joins its worker threads) and then closes the fds
    /// vhost-user-backend leaked. The daemon's connection loop and the vhost_user fuzz target
    /// both tear down through this, so they cannot drift apart (a teardown without the fd
    /// cleanup runs out of fds after enough connections).
    pub fn finish_connection<D>(&self, daemon: D) {
        self.stop_workers();
        drop(daemon);
        // The epoll handlers hold the backend: dropping them breaks that cycle, so the
        // backend, and with it every queue's engine (ring, eventfd, image handles), goes
        // when the connection does. The device forgets the queues this frontend started
        // only once their engines are gone (a control `deactivate` may follow at once).
        self.device.frontend_gone(|| {
            lock(&self.epoll).clear();
            for w in &self.workers {
                lock(w).handler = None;
            }
        });
        self.close_leaked_fds();
    }

    /// Closes the exit-event fds vhost-user-backend leaked (see `exit_event`). Call only after
    /// the `VhostUserDaemon` has been dropped, i.e. every worker thread and its epoll are gone.
    fn close_leaked_fds(&self) {
        let fds = std::mem::take(&mut *lock(&self.handed_out));
        for fd in fds {
            // SAFETY: each fd is an exit-event consumer clone we created in `exit_event` and
            // that vhost-user-backend converted with `into_raw_fd` into its worker's epoll and
            // never closes; the workers and their epolls are gone, so nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Tells every worker thread to exit.
    pub fn stop_workers(&self) {
        for (_, notifier) in &self.exit_events {
            if let Err(e) = notifier.notify() {
                warn!("cannot signal a worker to exit: {e}");
            }
        }
    }

    /// Marks queue `q` started (a no-op when it already is) and, the first time a queue starts
    /// on an inactive device, takes the image back (`Device::start_queue`). Returns false when
    /// the queue must not run: it is not started (a stray event after GET_VRING_BASE), or the
    /// image cannot be activated (logged; the next kick retries).
    fn start_queue(&self, vring: &Vring, q: usize) -> bool {
        // A started queue's device is active: a control `deactivate` is refused while any
        // queue is started, and the last queue's stop clears its bit before deactivating.
        if self.device.queue_started(q) && self.device.is_active() {
            return true;
        }
        let ready = || {
            let st = vring.get_ref();
            st.get_queue().ready() && st.is_enabled()
        };
        match self.device.start_queue(q, ready) {
            Ok(started) => started,
            Err(e) => {
                log::error!("queue {q}: cannot take the image for serving: {e}");
                false
            }
        }
    }

    /// GET_VRING_BASE: waits until every request taken from queue `q` has completed and is on
    /// the used ring (the frontend reads the ring's indexes next, and a migration copies
    /// guest memory after this answer: a request completing later would be lost). Its worker
    /// keeps reaping on its engine's completion events meanwhile: the queue no longer takes
    /// chains (vhost-user-backend marked it not ready) but still returns them.
    fn drain(&self, q: usize) {
        let Some(worker) = self.workers.get(q) else {
            return;
        };
        let start = Instant::now();
        // Requests taken from the ring and not yet returned, read before waiting for the
        // worker's pass (which may hold some). Relaxed: only logged.
        let at_stop = self
            .device
            .queues
            .get(q)
            .map_or(0, |c| c.in_flight.load(Ordering::Relaxed));
        loop {
            let n = lock(worker).handler.as_ref().map_or(0, |h| h.in_flight());
            if n == 0 {
                break;
            }
            if start.elapsed() >= DRAIN_TIMEOUT {
                warn!(
                    "queue {q}: {n} request(s) still in flight after {}s; answering \
                     GET_VRING_BASE without them",
                    DRAIN_TIMEOUT.as_secs()
                );
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if at_stop > 0 {
            info!(
                "queue {q}: stopped with {at_stop} request(s) in flight, drained in {:?}",
                start.elapsed()
            );
        }
    }

    /// After queue `q` stopped and drained: when it was the last started queue, drops every
    /// worker's engine and hands the image over (`Device::stop_queue`). A failed handover is
    /// logged, not returned: the frontend still gets its ring base, and the image stays open
    /// and locked (no other daemon can take it half-written).
    fn stop_queue(&self, q: usize) {
        // Every started queue is stopped and drained when `release` runs: no engine has a
        // request in flight.
        let release = || {
            let handlers = lock(&self.epoll).clone();
            for (i, w) in self.workers.iter().enumerate() {
                let Some(h) = lock(w).handler.take() else {
                    continue;
                };
                if let (Some(fd), Some(e)) = (h.event_fd(), handlers.get(i)) {
                    let ev = self.completion_event(i);
                    if let Err(err) = e.unregister_listener(fd, EventSet::IN, ev) {
                        debug!("queue {i}: unregistering the engine's completions: {err}");
                    }
                }
            }
        };
        if let Err(e) = self.device.stop_queue(q, release) {
            log::error!("cannot hand the image over (it stays open and locked): {e}");
        }
    }

    fn process_vring(&self, vring: &Vring, thread_id: usize) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Err(io::Error::other(format!("no worker {thread_id}")));
        };
        // Before the worker's mutex: `stop_queue` takes the two the other way round (lock
        // order: crate::device).
        if !self.start_queue(vring, thread_id) {
            return Ok(());
        }
        // Each worker mutex is only ever locked by its own thread, and by GET_VRING_BASE
        // (drain, handover) between the worker's passes.
        let mut worker = lock(worker);
        if worker.handler.is_none() {
            // A failure (e.g. out of fds) is retried on the next kick rather than ending
            // this queue's worker thread.
            let engine = match self.device.image().engine() {
                Ok(q) => q,
                Err(e) => {
                    warn!("queue {thread_id}: cannot open an image handle: {e}");
                    return Ok(());
                }
            };
            let counters = self
                .device
                .queues
                .get(thread_id)
                .cloned()
                .unwrap_or_default();
            let handler =
                RequestHandler::new(engine, self.params.clone(), self.state.clone(), counters);
            if let Some(fd) = handler.event_fd() {
                let handlers = lock(&self.epoll);
                let ev = self.completion_event(thread_id);
                match handlers.get(thread_id) {
                    Some(h) => {
                        if let Err(e) = h.register_listener(fd, EventSet::IN, ev) {
                            warn!("queue {thread_id}: cannot watch the engine's completions: {e}");
                            return Ok(());
                        }
                    }
                    None => {
                        warn!("queue {thread_id}: no epoll handler for the engine's completions");
                        return Ok(());
                    }
                }
            }
            worker.handler = Some(handler);
        }
        let mut mem = self.mem.memory().into_inner();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut vring = vring.get_mut();
        let (gen, region) = self.conn.inflight();
        let qidx = u16::try_from(thread_id).unwrap_or(u16::MAX);
        let qtracker = region.as_ref().and_then(|r| r.queue(qidx));
        let worker = &mut *worker;
        if gen != worker.inflight_gen {
            worker.inflight_gen = gen;
            if let Some(t) = &qtracker {
                let (heads, counter) = recover_queue(t, vring.get_queue_mut(), &mem, qidx);
                worker.counter = counter;
                if let Some(h) = worker.handler.as_mut() {
                    h.resubmit(heads);
                }
            }
        }
        let Some(handler) = worker.handler.as_mut() else {
            return Ok(());
        };
        let mut tracker = Tracker {
            queue: qtracker,
            counter: &mut worker.counter,
        };
        let busy = BusyWorker::enter(&self.busy_workers);
        let sequential = handler.sequential();
        loop {
            // Tell the driver about completions every few requests only when it has a CPU to
            // refill the queue on meanwhile: each busy queue's worker and driver need one.
            // When they outnumber the CPUs, early wake-ups only preempt the workers (measured:
            // docs/PERFORMANCE.md, "Early completions").
            let spare_cpu = busy.count() * 2 <= self.cpus;
            handler.set_notify_every(if sequential && spare_cpu {
                NOTIFY_EVERY
            } else {
                0
            });
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("disable notification: {e}")))?;
            }
            let run = {
                let current: &GuestMem = &mem;
                let mut changed = || self.conn.memory_settles(&self.mem, current);
                handler.process_queue(vring.get_queue_mut(), &mem, &mut tracker, &mut changed)
            };
            if run.memory_changed {
                mem = self.mem.memory().into_inner();
                continue;
            }
            let used = run.used;
            if used
                && vring
                    .needs_notification()
                    .map_err(|e| io::Error::other(format!("needs notification: {e}")))?
            {
                vring.signal_used_queue()?;
            }
            if run.more {
                continue;
            }
            // Busy-poll the avail ring and the engine's completion queue a little before going
            // back to sleep: a driver keeping a queue busy adds the next request within
            // microseconds, and a deep queue's next completion is as close; catching either
            // here saves a wake-up and its system calls (like QEMU's adaptive iothread
            // polling).
            if event_idx && used && self.device.poll_ns > 0 {
                let q = vring.get_queue();
                let deadline = Instant::now() + Duration::from_nanos(self.device.poll_ns);
                let mut more = false;
                while Instant::now() < deadline {
                    // New chains, or completions of the engine: either is a reason to go
                    // round again at once rather than sleep and be woken for it.
                    if chains_waiting(q, &mem) || handler.completions_ready() {
                        more = true;
                        break;
                    }
                    std::hint::spin_loop();
                }
                if more {
                    continue;
                }
            }
            if !event_idx
                || !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("enable notification: {e}")))?
            {
                break;
            }
            // More is announced but this pass took nothing: the avail index is bogus (more
            // than a queue's worth ahead) or the queue was stopped. Looping would spin forever
            // holding the vring lock; the next kick retries. (A pass after one that returned
            // `more` always takes something: `more` means chains were waiting. Otherwise
            // chains added while the avail event was stale would be left without a kick.)
            if !used {
                debug!("queue {thread_id}: avail index announces chains that cannot be taken");
                break;
            }
        }
        Ok(())
    }
}

/// Brings queue `qidx` in line with the inflight region after a (re)connection
/// (vhost-user.rst, "Inflight I/O tracking"): the requests that were in flight are returned,
/// in the order they were first taken, to be run again by head. They need not be the avail
/// entries right after the used index: requests complete out of order.
///
/// The avail index is set to the used index plus their number, whatever SET_VRING_BASE said,
/// since every chain taken before is now on the used ring or among them (libvhost-user does
/// the same). A frontend whose connection broke cannot ask the dead backend for the index;
/// QEMU then sends one derived from a used index it may not have read since the start, which
/// points far behind the avail ring (the worker would refuse the ring as "more descriptors
/// to process than queue size") or, worse, re-offers chains that already completed.
///
/// Returns the heads and the next counter value (none and 0 when the region says nothing
/// about this queue).
fn recover_queue(
    t: &QueueTracker<'_>,
    queue: &mut Queue,
    mem: &GuestMem,
    qidx: u16,
) -> (Vec<u16>, u64) {
    let used = match queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(u) => u.0,
        Err(e) => {
            warn!("queue {qidx}: cannot read the used index for inflight recovery: {e}");
            return (Vec::new(), 0);
        }
    };
    let Some((heads, next_counter)) = t.recover(used) else {
        return (Vec::new(), 0);
    };
    // Fewer heads than the queue size: recover() lists each descriptor at most once.
    let avail = used.wrapping_add(u16::try_from(heads.len()).unwrap_or(u16::MAX));
    if queue.next_avail() != avail {
        info!(
            "queue {qidx}: moving the avail index from {} to {avail}, past the chains \
             completed or in flight",
            queue.next_avail()
        );
        queue.set_next_avail(avail);
    }
    if !heads.is_empty() {
        info!(
            "queue {qidx}: resubmitting {} in-flight request(s)",
            heads.len()
        );
    }
    (heads, next_counter)
}

impl VhostUserBackend for BlkBackend {
    // vhost-user-backend installs the frontend's dirty log (SET_LOG_BASE) into each region's
    // bitmap; the unit bitmap would panic there.
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.params.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        self.device.queue_size
    }

    fn features(&self) -> u64 {
        // LOG_ALL: we log every write into guest memory while the frontend asks (live
        // migration; see `chain::mark_written`).
        self.params.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
        self.state.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // The backend channel carries CONFIG_CHANGE_MSG after an online resize (sent by
            // the interposer, which keeps its own duplicate of the channel).
            | VhostUserProtocolFeatures::BACKEND_REQ
            // GET/SET_INFLIGHT_FD are answered by the interposer (vhost-user-backend has no
            // support); workers keep the region current.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The dirty log is shared memory (SET_LOG_BASE with an fd), which
            // vhost-user-backend maps into the regions' bitmaps; without it QEMU refuses to
            // migrate the VM.
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.state
            .writeback
            .store(self.device.writeback, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // virtio-blk: with CONFIG_WCE negotiated but FLUSH not, writeback MUST read 0 (the
        // device is write-through then, see DeviceState::write_back).
        let acked = self.state.acked_features.load(Ordering::Relaxed);
        let wb = if acked & features::CONFIG_WCE != 0 && acked & features::FLUSH == 0 {
            false
        } else {
            self.state.writeback.load(Ordering::Relaxed)
        };
        self.params.read_config(wb, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.state.acked_features.load(Ordering::Relaxed) & features::CONFIG_WCE != 0;
        if offset == WRITEBACK_OFFSET && buf.len() == 1 && wce {
            let wb = buf[0] != 0;
            debug!(
                "guest set cache mode to {}",
                if wb { "write-back" } else { "write-through" }
            );
            self.state.writeback.store(wb, Ordering::Relaxed);
            return Ok(());
        }
        // Ignored, not failed: vhost-user-backend ends the whole connection when set_config
        // fails, and QEMU forwards the guest's writes of the writeback byte whether or not
        // CONFIG_WCE was negotiated, so an error here would let a guest disconnect its own
        // disk at will. The virtio spec has the device ignore writes to read-only fields.
        let msg = format!(
            "ignoring a write of {} config byte(s) at offset {offset}: only the writeback \
             byte (with CONFIG_WCE negotiated) is writable",
            buf.len()
        );
        if self.config_write_refused.swap(true, Ordering::Relaxed) {
            debug!("{msg}");
        } else {
            warn!("{msg}");
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemAtomic) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the handler updates in place.
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // vhost-user-backend validated the index against the vrings.
        let q = queue_index as usize;
        if q >= self.workers.len() {
            return Ok(());
        }
        self.drain(q);
        self.stop_queue(q);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.params.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exit_events.get(thread_index)?;
        match (c.try_clone(), n.try_clone()) {
            (Ok(c), Ok(n)) => {
                // vhost-user-backend turns the consumer into a raw fd for its epoll and never
                // closes it: remember it, and close it once the worker is gone.
                lock(&self.handed_out).push(c.as_raw_fd());
                Some((c, n))
            }
            _ => {
                warn!("cannot clone the exit event of worker {thread_index}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // A queue's kick, or its engine's completions: either way the worker reaps what is
        // done and takes what is available. Kicks are numbered within the thread's vrings
        // (one per thread, see queues_per_thread); completions by queue.
        let vring = if u64::from(device_event) == self.completion_event(thread_id) {
            vrings.first()
        } else if u64::from(device_event) < u64::from(self.params.num_queues) {
            vrings.get(usize::from(device_event))
        } else {
            None
        };
        let Some(vring) = vring else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event} on worker {thread_id}"
            )));
        };
        self.process_vring(vring, thread_id)
    }
}

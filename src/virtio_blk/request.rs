//! Executing virtio-blk requests from a virtqueue on the queue's [`IoEngine`].
//!
//! [`RequestHandler`] owns one queue's engine. For each descriptor chain it validates
//! everything the virtio spec asks a device to check and submits the request to the engine;
//! when the engine reports it finished, it writes the status byte and returns the chain to the
//! used ring. Requests complete in whatever order they finish. A malformed chain costs that
//! request an error status (or, when not even a status byte can be found, an empty used
//! entry): never a panic, never a stuck queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{
    byte_addr, gather, mark_written, scatter, slices, ChainError, ChainLayout, Segment,
};
use super::config::{
    features, status, DetectZeroes, DeviceParams, DiscardPolicy, ID_BYTES, SECTOR_SHIFT,
    SECTOR_SIZE, SEG_FLAG_UNMAP,
};
use super::header::{DwzSegment, RequestHeader, RequestType};
use crate::image::engine::{EngineOp, GuestBuffers, IoEngine};
use crate::image::{GuestMem, GuestSlice};
use crate::stats::{now_ns, QueueCounters, ReqKind};

/// Size of the request header in the device-readable stream.
const HEADER_LEN: u64 = RequestHeader::LEN as u64;
/// Size of one discard / write-zeroes segment.
const DWZ_SEG_LEN: u64 = DwzSegment::LEN as u64;

/// Per-connection device state shared by the queue workers (read on every request, written
/// only by the vhost-user control thread).
#[derive(Debug)]
pub struct DeviceState {
    /// Virtio features the driver acknowledged.
    pub acked_features: AtomicU64,
    /// The `writeback` byte of the configuration space (CONFIG_WCE).
    pub writeback: AtomicBool,
}

impl DeviceState {
    /// Fresh state for a new connection; `writeback` is the configured default cache mode.
    pub fn new(writeback: bool) -> Self {
        DeviceState {
            acked_features: AtomicU64::new(0),
            writeback: AtomicBool::new(writeback),
        }
    }

    /// Whether writes may complete before they are durable. Without a negotiated FLUSH
    /// feature the driver cannot flush, so the device must be write-through.
    pub fn write_back(&self) -> bool {
        self.acked_features.load(Ordering::Relaxed) & features::FLUSH != 0
            && self.writeback.load(Ordering::Relaxed)
    }

    fn acked(&self, feature: u64) -> bool {
        self.acked_features.load(Ordering::Relaxed) & feature != 0
    }

    /// Whether the frontend is logging dirty guest memory (a live migration runs): it acked
    /// `VHOST_F_LOG_ALL`. QEMU waits for the reply to that SET_FEATURES before it starts
    /// copying memory, and the store is made before the reply is sent, so a completion that
    /// runs after the copying started sees it (Relaxed: the feature word is the only data).
    pub fn logging(&self) -> bool {
        self.acked(features::LOG_ALL)
    }
}

/// Outcome of one request: status byte, data bytes written into the guest's buffers, and
/// data bytes transferred to or from the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Done {
    status: u8,
    written: u64,
    transferred: u64,
}

impl Done {
    fn ok(written: u64) -> Self {
        Done {
            status: status::OK,
            written,
            transferred: written,
        }
    }
    fn wrote(transferred: u64) -> Self {
        Done {
            status: status::OK,
            written: 0,
            transferred,
        }
    }
    fn err(status: u8) -> Self {
        Done {
            status,
            written: 0,
            transferred: 0,
        }
    }
}

/// What preparing a request leads to.
enum Step {
    /// Finished (an error, or a request executed on the spot).
    Done(Done),
    /// A request for the engine, and the outcome to report if it succeeds.
    Io(EngineOp, Done),
}

/// A request the engine is running.
struct Pending {
    status_addr: Option<GuestAddress>,
    kind: ReqKind,
    done: Done,
    start: Instant,
    /// What it is, for the log line if it fails.
    what: &'static str,
    offset: u64,
    len: u64,
}

/// Largest read or write accepted (larger ones fail with IOERR).
pub const MAX_REQUEST_BYTES: u64 = 128 << 20;

/// Most requests taken in one pass before completions are looked at.
const MAX_PASS: usize = 256;

/// A pass hands the requests it queued on a ring engine to the kernel every this many (and
/// at its end): one system call per batch instead of one per request, while the first
/// requests of a long pass need not wait for the last to be prepared (docs/PERFORMANCE.md,
/// "Submitting in batches").
const SUBMIT_BATCH: usize = 8;

/// Whether the driver has made chains available that `queue` has not taken yet (an
/// unreadable avail index counts as none).
pub fn chains_waiting(queue: &Queue, mem: &GuestMem) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Observes descriptor chains being taken from and returned to a queue (used for vhost-user
/// inflight I/O tracking).
pub trait ChainTracker {
    /// Chain `head` was taken from the avail ring.
    fn taken(&mut self, head: u16);
    /// Chain `head` is about to be put on the used ring (called before the used index moves).
    fn returning(&mut self, head: u16);
    /// Chain `head` was put on the used ring, whose index is now `used_idx`.
    fn returned(&mut self, head: u16, used_idx: u16);
}

/// No tracking.
impl ChainTracker for () {
    fn taken(&mut self, _head: u16) {}
    fn returning(&mut self, _head: u16) {}
    fn returned(&mut self, _head: u16, _used_idx: u16) {}
}

/// Executes one queue's requests.
pub struct RequestHandler {
    engine: Box<dyn IoEngine>,
    /// Requests in flight in the engine, by descriptor head.
    pending: Vec<Option<Pending>>,
    /// The device-writable segments of each request in flight, by descriptor head (reused,
    /// so that keeping them costs no allocation): what [`mark_written`] logs when it
    /// completes while the frontend logs dirty memory.
    written: Vec<Vec<Segment>>,
    /// Results reaped from the engine (reused).
    reaped: Vec<(u16, io::Result<()>)>,
    params: Arc<DeviceParams>,
    state: Arc<DeviceState>,
    layout: ChainLayout,
    counters: Arc<QueueCounters>,
    /// The request being prepared referenced an address outside guest memory.
    bad_address: bool,
    /// Heads to run again before taking new chains: the requests that were in flight when the
    /// previous backend stopped, in the order it took them.
    resubmit: std::collections::VecDeque<u16>,
    /// With a sequential engine: requests after which [`RequestHandler::process_queue`]
    /// returns so the caller can tell the driver about their completions (`None`: only when
    /// the queue is empty).
    notify_every: Option<usize>,
}

/// What one [`RequestHandler::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Some chain went to the used ring (the driver may need a notification).
    pub used: bool,
    /// A chain referenced memory the current map lacks, and the map has since changed: the
    /// chain was put back and the queue must be processed again with the new map.
    pub memory_changed: bool,
    /// The call stopped after the number of requests set by
    /// [`RequestHandler::set_notify_every`] while more chains were waiting: notify the driver,
    /// then call again (the next call takes at least one chain, unless the avail index is
    /// bogus).
    pub more: bool,
}

impl RequestHandler {
    /// A handler for one queue.
    pub fn new(
        engine: Box<dyn IoEngine>,
        params: Arc<DeviceParams>,
        state: Arc<DeviceState>,
        counters: Arc<QueueCounters>,
    ) -> Self {
        RequestHandler {
            engine,
            pending: Vec::new(),
            written: Vec::new(),
            reaped: Vec::new(),
            params,
            state,
            layout: ChainLayout::default(),
            counters,
            bad_address: false,
            resubmit: std::collections::VecDeque::new(),
            notify_every: None,
        }
    }

    /// Makes [`RequestHandler::process_queue`] return after every `n` requests when more
    /// chains are waiting (with [`QueueRun::more`] set), so that their completions reach the
    /// driver while later requests still run. Worth it when the engine runs requests one
    /// after another inside `submit` ([`IoEngine::sequential`]) and the driver has a CPU to
    /// run on meanwhile: a driver that went to sleep waiting for completions then wakes and
    /// refills the queue while the rest run instead of after them. `0` turns it off.
    pub fn set_notify_every(&mut self, n: usize) {
        self.notify_every = (n > 0).then_some(n.min(MAX_PASS));
    }

    /// Queues `heads` (chains the previous backend took from the avail ring but never
    /// completed) to be run before any new chain is taken.
    pub fn resubmit(&mut self, heads: impl IntoIterator<Item = u16>) {
        self.resubmit.extend(heads);
    }

    /// Whether the engine runs requests one after another ([`IoEngine::sequential`]).
    pub fn sequential(&self) -> bool {
        self.engine.sequential()
    }

    /// The engine's completion eventfd, if it has one.
    pub fn event_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.engine.event_fd()
    }

    /// Whether the engine has completions to return now ([`IoEngine::completions_ready`]).
    pub fn completions_ready(&mut self) -> bool {
        self.engine.completions_ready()
    }

    /// Requests in flight in the engine.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// This queue's counters.
    pub fn counters(&self) -> &Arc<QueueCounters> {
        &self.counters
    }

    /// Returns the requests the engine has finished to the used ring, then takes every
    /// available chain of `queue` (as long as fewer than a queue's worth are in flight) and
    /// submits it to the engine. Requests complete in the order they finish.
    ///
    /// A chain whose buffers lie outside `mem` may be racing a memory table update (a frontend
    /// may kick before the update sent just before has been applied): then `memory_changed` is
    /// asked whether the map has changed meanwhile, and if so the chain is put back and the
    /// call returns so the caller can retry with the new map. Otherwise the chain fails.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
        tracker: &mut impl ChainTracker,
        memory_changed: &mut dyn FnMut() -> bool,
    ) -> QueueRun {
        let mut used_any = self.complete_reaped(queue, mem, tracker);
        let mut taken = 0usize;
        let mut queued = 0usize;
        let cap = usize::from(queue.size()).max(1);
        loop {
            // Early completions: with a sequential engine, hand back what is done every few
            // requests while more are waiting (their requests already finished in `submit`).
            if let Some(n) = self.notify_every {
                if taken >= n {
                    used_any |= self.complete_reaped(queue, mem, tracker);
                    if !self.resubmit.is_empty() || chains_waiting(queue, mem) {
                        return QueueRun {
                            used: used_any,
                            memory_changed: false,
                            more: true,
                        };
                    }
                    taken = 0;
                }
            }
            if self.engine.in_flight() >= cap || taken >= MAX_PASS {
                break;
            }
            let start = Instant::now();
            let resubmitted = self.resubmit.pop_front();
            let head = match resubmitted {
                Some(head) => {
                    self.layout.load_head(
                        mem,
                        GuestAddress(queue.desc_table()),
                        queue.size(),
                        head,
                    );
                    head
                }
                None => {
                    let Some(chain) = queue.pop_descriptor_chain(&**mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    self.layout.load(chain);
                    head
                }
            };
            tracker.taken(head);
            self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let header = self.header(mem);
            let status_addr = if self.layout.writable_len == 0 {
                None
            } else {
                byte_addr(&self.layout.writable, self.layout.writable_len - 1)
            };
            self.bad_address = false;
            let (kind, step) = match status_addr {
                // Without a status byte there is nothing to report: don't execute.
                None => (ReqKind::Other, Step::Done(Done::err(status::IOERR))),
                Some(_) => self.prepare(mem, header, self.layout.writable_len - 1),
            };
            match step {
                Step::Io(op, done) => {
                    let (what, offset, len) = match &op {
                        EngineOp::Read { offset, bufs } => ("read", *offset, bufs.len()),
                        EngineOp::Write { offset, bufs, .. } => ("write", *offset, bufs.len()),
                        EngineOp::Flush => ("flush", 0, 0),
                        EngineOp::Discard { .. } => ("discard", 0, 0),
                        EngineOp::WriteZeroes { .. } => ("write-zeroes", 0, 0),
                    };
                    let slot = usize::from(head);
                    if self.pending.len() <= slot {
                        self.pending.resize_with(slot + 1, || None);
                        self.written.resize_with(slot + 1, Vec::new);
                    }
                    // Kept whether or not logging is on now: it may start before the
                    // request completes.
                    self.written[slot].clear();
                    self.written[slot].extend_from_slice(&self.layout.writable);
                    self.pending[slot] = Some(Pending {
                        status_addr,
                        kind,
                        done,
                        start,
                        what,
                        offset,
                        len,
                    });
                    self.engine.submit(head, op);
                    queued += 1;
                    if queued >= SUBMIT_BATCH {
                        self.engine.submit_queued();
                        queued = 0;
                    }
                    if self.engine.event_fd().is_none() {
                        // An engine without completion events finished it inside `submit`:
                        // return it now, so such engines complete in the order taken.
                        used_any |= self.complete_reaped(queue, mem, tracker);
                    }
                }
                Step::Done(_) if self.bad_address && memory_changed() => {
                    // Put the chain back: it is taken again with the new map.
                    match resubmitted {
                        Some(head) => self.resubmit.push_front(head),
                        None => queue.set_next_avail(queue.next_avail().wrapping_sub(1)),
                    }
                    self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return QueueRun {
                        used: used_any,
                        memory_changed: true,
                        more: false,
                    };
                }
                Step::Done(done) => {
                    if self.state.logging() {
                        mark_written(mem, &self.layout.writable);
                    }
                    self.finish(queue, mem, tracker, head, status_addr, kind, done, start);
                    used_any = true;
                }
            }
            taken += 1;
        }
        used_any |= self.complete_reaped(queue, mem, tracker);
        QueueRun {
            used: used_any,
            memory_changed: false,
            more: false,
        }
    }

    /// Returns every request the engine has finished to the used ring; true if any.
    fn complete_reaped(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        tracker: &mut impl ChainTracker,
    ) -> bool {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        self.engine.reap(&mut reaped);
        let any = !reaped.is_empty();
        for (head, r) in reaped.drain(..) {
            let Some(p) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(|p| p.take())
            else {
                warn!("engine finished request {head}, which is not in flight");
                continue;
            };
            let done = match r {
                Ok(()) => p.done,
                Err(e) => {
                    warn!(
                        "{} of {} bytes at offset {} failed: {e}",
                        p.what, p.len, p.offset
                    );
                    Done::err(status::IOERR)
                }
            };
            if p.kind == ReqKind::Flush && done.status == status::OK {
                self.counters
                    .last_flush_ns
                    .store(now_ns(), Ordering::Relaxed);
            }
            if self.state.logging() {
                if let Some(segs) = self.written.get(usize::from(head)) {
                    mark_written(mem, segs);
                }
            }
            self.finish(
                queue,
                mem,
                tracker,
                head,
                p.status_addr,
                p.kind,
                done,
                p.start,
            );
        }
        self.reaped = reaped;
        any
    }

    /// The loaded chain's request header, read once per chain: the layout's error for a
    /// malformed chain, or why the header cannot be read.
    fn header(&self, mem: &GuestMem) -> Result<RequestHeader, ChainError> {
        if let Some(e) = self.layout.error {
            return Err(e);
        }
        let mut hdr = [0u8; RequestHeader::LEN];
        gather(mem, &self.layout.readable, 0, &mut hdr)?;
        Ok(RequestHeader::parse(&hdr))
    }

    /// Writes the status byte, returns the chain to the used ring and counts it.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        tracker: &mut impl ChainTracker,
        head: u16,
        status_addr: Option<GuestAddress>,
        kind: ReqKind,
        done: Done,
        start: Instant,
    ) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        let len = match status_addr {
            None => {
                warn!("dropping a request without a status byte");
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                0
            }
            Some(addr) => {
                if mem.write_obj(done.status, addr).is_err() {
                    warn!("cannot write a request's status byte: bad guest address");
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    0
                } else {
                    self.counters.complete(
                        kind,
                        done.transferred,
                        done.status != status::OK,
                        start.elapsed(),
                    );
                    // The used length counts the data we wrote plus the status byte; it fits
                    // in u32 because the chain iterator caps chains at 4 GiB.
                    u32::try_from(done.written + 1).unwrap_or(u32::MAX)
                }
            }
        };
        tracker.returning(head);
        if let Err(e) = queue.add_used(mem, head, len) {
            warn!("cannot return descriptor {head} to the used ring: {e}");
        } else {
            tracker.returned(head, queue.next_used());
        }
    }

    /// Validates the loaded chain and either finishes it (errors, flush, discard, ...) or
    /// returns the read/write to run, with the outcome to report if it succeeds.
    fn prepare(
        &mut self,
        mem: &Arc<GuestMem>,
        header: Result<RequestHeader, ChainError>,
        status_pos: u64,
    ) -> (ReqKind, Step) {
        let header = match header {
            Ok(h) => h,
            Err(e @ ChainError::ReadableAfterWritable) => {
                debug!("malformed descriptor chain: {e:?}");
                return (ReqKind::Other, Step::Done(Done::err(status::IOERR)));
            }
            Err(e) => {
                self.bad_address = e == ChainError::BadGuestAddress;
                debug!("request header missing or unreadable");
                return (ReqKind::Other, Step::Done(Done::err(status::IOERR)));
            }
        };
        let step = match header.kind {
            RequestType::In => return (ReqKind::Read, self.read(mem, header, status_pos)),
            RequestType::Out => return (ReqKind::Write, self.write(mem, header)),
            RequestType::Flush => self.flush(header),
            RequestType::GetId => Step::Done(self.get_id(mem, status_pos)),
            RequestType::Discard if self.state.acked(features::DISCARD) => {
                self.discard_or_zero(mem, false)
            }
            RequestType::WriteZeroes if self.state.acked(features::WRITE_ZEROES) => {
                self.discard_or_zero(mem, true)
            }
            other => {
                debug!("unsupported request type {:#x}", other.raw());
                Step::Done(Done::err(status::UNSUPP))
            }
        };
        (header.kind.stats_kind(), step)
    }

    /// Checks that `len` bytes at `sector` are block-aligned and inside the disk.
    fn range_ok(&self, sector: u64, len: u64) -> bool {
        let lbs = u64::from(self.params.logical_block_size);
        let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
            return false;
        };
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        offset.is_multiple_of(lbs)
            && len.is_multiple_of(lbs)
            && end <= self.params.capacity_sectors() << SECTOR_SHIFT
    }

    fn read(&mut self, mem: &Arc<GuestMem>, h: RequestHeader, status_pos: u64) -> Step {
        let fail = Step::Done(Done::err(status::IOERR));
        // A read carries nothing device-readable but its header.
        if self.layout.readable_len != HEADER_LEN {
            debug!("IN request with device-readable data");
            return fail;
        }
        let len = status_pos;
        let Some(bufs) = self.data_buffers(mem, h, false, len) else {
            return fail;
        };
        let op = EngineOp::Read {
            offset: h.sector << SECTOR_SHIFT,
            bufs: GuestBuffers::new(mem.clone(), &bufs),
        };
        Step::Io(op, Done::ok(len))
    }

    /// Checks the range of a read (`write == false`) or write of `len` bytes and returns its
    /// data buffers: the device-writable bytes before the status byte, or the device-readable
    /// bytes after the header. `None` (and a debug line) for anything invalid.
    fn data_buffers<'m>(
        &mut self,
        mem: &'m GuestMem,
        h: RequestHeader,
        write: bool,
        len: u64,
    ) -> Option<Vec<GuestSlice<'m>>> {
        let what = if write { "OUT" } else { "IN" };
        // SIZE_MAX is not offered, so only this bounds a request (and so the bounce buffer a
        // guest can make us allocate); Linux sends at most a few MiB.
        if len > MAX_REQUEST_BYTES {
            debug!("{what} of {len} bytes exceeds {MAX_REQUEST_BYTES}");
            return None;
        }
        if !self.range_ok(h.sector, len) {
            debug!(
                "{what} out of range or unaligned: sector {} len {len}",
                h.sector
            );
            return None;
        }
        let (segs, start) = if write {
            (&self.layout.readable, HEADER_LEN)
        } else {
            (&self.layout.writable, 0)
        };
        let mut bufs = Vec::new();
        match slices(mem, segs, start, len, &mut bufs) {
            Ok(n) if n <= self.params.seg_max as usize => Some(bufs),
            Ok(n) => {
                debug!("{what} with {n} segments > seg_max");
                None
            }
            Err(e) => {
                self.bad_address = e == ChainError::BadGuestAddress;
                debug!("{what} buffers: {e:?}");
                None
            }
        }
    }

    fn write(&mut self, mem: &Arc<GuestMem>, h: RequestHeader) -> Step {
        let fail = Step::Done(Done::err(status::IOERR));
        if self.params.read_only {
            debug!("write to a read-only disk refused");
            return fail;
        }
        // A write carries nothing device-writable but its status byte.
        if self.layout.writable_len != 1 {
            debug!("OUT request with device-writable data");
            return fail;
        }
        let len = self.layout.readable_len - HEADER_LEN.min(self.layout.readable_len);
        let Some(bufs) = self.data_buffers(mem, h, true, len) else {
            return fail;
        };
        let offset = h.sector << SECTOR_SHIFT;
        let durable = !self.state.write_back();
        if self.params.detect_zeroes != DetectZeroes::Off && all_zero(&bufs) {
            // The guest's buffers are read once here; what it writes there afterwards is
            // as racy as any write of a buffer still in flight.
            let unmap = self.params.detect_zeroes == DetectZeroes::Unmap
                && self.params.discard == DiscardPolicy::Unmap;
            let op = EngineOp::WriteZeroes {
                segs: vec![(offset, len, unmap)],
                durable,
            };
            return Step::Io(op, Done::wrote(len));
        }
        let op = EngineOp::Write {
            offset,
            bufs: GuestBuffers::new(mem.clone(), &bufs),
            durable,
        };
        Step::Io(op, Done::wrote(len))
    }

    fn flush(&mut self, h: RequestHeader) -> Step {
        if h.sector != 0 {
            debug!("FLUSH with non-zero sector {}", h.sector);
            return Step::Done(Done::err(status::IOERR));
        }
        if self.params.read_only {
            return Step::Done(Done::ok(0));
        }
        Step::Io(EngineOp::Flush, Done::ok(0))
    }

    fn get_id(&mut self, mem: &GuestMem, status_pos: u64) -> Done {
        let n = (status_pos as usize).min(ID_BYTES);
        match scatter(mem, &self.layout.writable, 0, &self.params.serial[..n]) {
            Ok(()) => Done::ok(n as u64),
            Err(_) => Done::err(status::IOERR),
        }
    }

    /// DISCARD (`zero == false`) or WRITE_ZEROES. Every segment is validated before any is
    /// executed, so a bad segment never leaves the request half-applied. In write-through
    /// mode the engine makes them durable before it completes them.
    fn discard_or_zero(&mut self, mem: &GuestMem, zero: bool) -> Step {
        let err = |st| Step::Done(Done::err(st));
        if self.params.read_only {
            debug!("discard/write-zeroes on a read-only disk refused");
            return err(status::IOERR);
        }
        let data_len = self.layout.readable_len.saturating_sub(HEADER_LEN);
        let (max_seg, max_sectors) = if zero {
            (
                self.params.max_write_zeroes_seg,
                self.params.max_write_zeroes_sectors,
            )
        } else {
            (self.params.max_discard_seg, self.params.max_discard_sectors)
        };
        if data_len == 0 || !data_len.is_multiple_of(DWZ_SEG_LEN) {
            debug!("discard/write-zeroes with {data_len} bytes of segments");
            return err(status::IOERR);
        }
        let nseg = data_len / DWZ_SEG_LEN;
        if nseg > u64::from(max_seg) {
            debug!("discard/write-zeroes with {nseg} segments > {max_seg}");
            return err(status::IOERR);
        }
        // Validate all segments first; reported status follows the spec's order: an unknown
        // flag (or unmap on discard) is UNSUPP, a bad range IOERR. The segments are read from
        // guest memory once: what was validated is what runs, whatever the guest writes there
        // meanwhile.
        let mut segments = Vec::with_capacity(nseg as usize);
        let mut bad_range = false;
        for i in 0..nseg {
            let Some(segment) = self.dwz_segment(mem, i) else {
                return err(status::IOERR);
            };
            segments.push(segment);
            let DwzSegment {
                sector,
                num_sectors: num,
                flags,
            } = segment;
            if flags & !SEG_FLAG_UNMAP != 0 || (!zero && flags & SEG_FLAG_UNMAP != 0) {
                debug!("discard/write-zeroes with unsupported flags {flags:#x}");
                return err(status::UNSUPP);
            }
            if num > max_sectors || !self.range_ok(sector, u64::from(num) << SECTOR_SHIFT) {
                bad_range = true;
            }
        }
        if bad_range {
            debug!("discard/write-zeroes out of range, unaligned or too large");
            return err(status::IOERR);
        }
        // In write-through mode the engine makes them durable before completing them.
        let durable = !self.state.write_back();
        let unmap_allowed = self.params.discard == DiscardPolicy::Unmap;
        if !zero && !unmap_allowed {
            // --discard ignore: validated, and nothing done (as QEMU's discard=ignore).
            return Step::Done(Done::ok(0));
        }
        let op = if zero {
            EngineOp::WriteZeroes {
                segs: segments
                    .iter()
                    .map(|s| {
                        (
                            s.sector << SECTOR_SHIFT,
                            u64::from(s.num_sectors) << SECTOR_SHIFT,
                            unmap_allowed && s.flags & SEG_FLAG_UNMAP != 0,
                        )
                    })
                    .collect(),
                durable,
            }
        } else {
            EngineOp::Discard {
                segs: segments
                    .iter()
                    .map(|s| {
                        (
                            s.sector << SECTOR_SHIFT,
                            u64::from(s.num_sectors) << SECTOR_SHIFT,
                        )
                    })
                    .collect(),
                durable,
            }
        };
        Step::Io(op, Done::ok(0))
    }

    /// Reads segment `i` of a discard / write-zeroes request.
    fn dwz_segment(&self, mem: &GuestMem, i: u64) -> Option<DwzSegment> {
        let mut s = [0u8; DwzSegment::LEN];
        gather(
            mem,
            &self.layout.readable,
            HEADER_LEN + i * DWZ_SEG_LEN,
            &mut s,
        )
        .ok()?;
        Some(DwzSegment::parse(&s))
    }
}

/// True if every byte of `bufs` is zero (`--detect-zeroes`).
fn all_zero(bufs: &[GuestSlice<'_>]) -> bool {
    let mut chunk = [0u8; 4096];
    bufs.iter().all(|b| {
        let mut at = 0;
        while at < b.len() {
            let n = (b.len() - at).min(chunk.len());
            let Ok(part) = b.subslice(at, n) else {
                return false;
            };
            part.copy_to(&mut chunk[..n]);
            if chunk[..n].iter().any(|&x| x != 0) {
                return false;
            }
            at += n;
        }
        true
    })
}

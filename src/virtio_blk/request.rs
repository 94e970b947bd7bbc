//! Executing virtio-blk requests from a virtqueue against an [`ImageQueue`].
//!
//! [`RequestHandler`] owns one queue's image handle and scratch buffers. For each descriptor
//! chain it validates everything the virtio spec asks a device to check, runs the I/O, writes
//! the status byte and returns the chain to the used ring. A malformed chain costs that request
//! an error status (or, when not even a status byte can be found, an empty used entry): never a
//! panic, never a stuck queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{byte_addr, gather, scatter, slices, ChainError, ChainLayout, GuestMem};
use super::config::{
    features, status, DeviceParams, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEG_FLAG_UNMAP,
};
use super::header::{DwzSegment, RequestHeader, RequestType};
use crate::image::{slices_len, BatchOp, GuestSlice, ImageQueue};
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
enum Step<'m> {
    /// Finished (an error, or a request executed on the spot).
    Done(Done),
    /// A read or write to run in a batch, and the outcome to report if it succeeds.
    Io(BatchOp<'m>, Done),
}

/// A request waiting for its batch to run.
struct Pending {
    head: u16,
    status_addr: Option<GuestAddress>,
    kind: ReqKind,
    done: Done,
    start: Instant,
}

/// Largest read or write accepted (larger ones fail with IOERR).
pub const MAX_REQUEST_BYTES: u64 = 128 << 20;

/// Most reads/writes gathered into one batch.
const MAX_BATCH: usize = 256;

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
    image: Box<dyn ImageQueue>,
    /// The helper thread (with a second handle on the image) for large read batches
    /// ([`super::split`]); `None` on a single-CPU host.
    helper: Option<super::split::SplitHelper>,
    params: Arc<DeviceParams>,
    state: Arc<DeviceState>,
    layout: ChainLayout,
    counters: Arc<QueueCounters>,
    /// The request being prepared referenced an address outside guest memory.
    bad_address: bool,
    /// Reads/writes per batch after which [`RequestHandler::process_queue`] returns so the
    /// caller can tell the driver about them (`None`: only when the queue is empty).
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
    /// The call stopped after a batch of the size set by
    /// [`RequestHandler::set_notify_every`] while more chains were waiting: notify the driver,
    /// then call again (the next call takes at least one chain, unless the avail index is
    /// bogus).
    pub more: bool,
}

impl RequestHandler {
    /// A handler for one queue.
    pub fn new(
        image: Box<dyn ImageQueue>,
        params: Arc<DeviceParams>,
        state: Arc<DeviceState>,
        counters: Arc<QueueCounters>,
    ) -> Self {
        RequestHandler {
            image,
            helper: None,
            params,
            state,
            layout: ChainLayout::default(),
            counters,
            bad_address: false,
            notify_every: None,
        }
    }

    /// Makes [`RequestHandler::process_queue`] return after each batch of `n` reads/writes
    /// when more chains are waiting (with [`QueueRun::more`] set), so that their completions
    /// reach the driver while later requests still run. Worth it when the image runs a batch
    /// one request after another ([`ImageQueue::sequential`]) and the driver has a CPU to
    /// run on meanwhile: a driver that went to sleep waiting for completions then wakes and
    /// refills the queue during the rest of the batch instead of after it. `0` turns it off.
    pub fn set_notify_every(&mut self, n: usize) {
        self.notify_every = (n > 0).then_some(n.min(MAX_BATCH));
    }

    /// Whether the image runs a batch one request after another
    /// ([`ImageQueue::sequential`]).
    pub fn sequential(&self) -> bool {
        self.image.sequential()
    }

    /// Lets large read batches run half on a helper thread that owns `helper`, a second
    /// handle on the same image ([`super::split`]). Without it (or if the thread cannot be
    /// started) batches run on the worker alone.
    pub fn with_helper(mut self, helper: Box<dyn ImageQueue>) -> Self {
        match super::split::SplitHelper::new(helper) {
            Ok(h) => self.helper = Some(h),
            Err(e) => debug!("no read helper thread: {e}"),
        }
        self
    }

    /// This queue's counters.
    pub fn counters(&self) -> &Arc<QueueCounters> {
        &self.counters
    }

    /// Processes every available chain of `queue`.
    ///
    /// A chain whose buffers lie outside `mem` may be racing a memory table update (a frontend
    /// may kick before the update sent just before has been applied): then `memory_changed` is
    /// asked whether the map has changed meanwhile, and if so the chain is put back and the
    /// call returns so the caller can retry with the new map. Otherwise the chain fails.
    ///
    /// Consecutive reads and writes are gathered into a batch that the image may run
    /// concurrently ([`ImageQueue::run_batch`]); any other request first completes the batch
    /// before it, so it orders after everything taken before it. Requests are returned to the
    /// used ring in the order they were taken.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        tracker: &mut impl ChainTracker,
        memory_changed: &mut dyn FnMut() -> bool,
    ) -> QueueRun {
        let mut used_any = false;
        let mut pending: Vec<Pending> = Vec::new();
        let mut ops: Vec<BatchOp<'_>> = Vec::new();
        let mut results: Vec<io::Result<()>> = Vec::new();
        let limit = self.notify_every.unwrap_or(MAX_BATCH);
        loop {
            let full = pending.len() >= limit;
            let chain = if full {
                None
            } else {
                queue.pop_descriptor_chain(mem)
            };
            let Some(chain) = chain else {
                if pending.is_empty() {
                    break;
                }
                self.complete_batch(queue, mem, tracker, &mut pending, &mut ops, &mut results);
                used_any = true;
                // Return early only if chains are waiting: after the last batch the caller
                // busy-polls for the driver's next requests instead.
                if full && self.notify_every.is_some() && chains_waiting(queue, mem) {
                    return QueueRun {
                        used: true,
                        memory_changed: false,
                        more: true,
                    };
                }
                continue;
            };
            let head = chain.head_index();
            tracker.taken(head);
            self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            self.layout.load(chain);
            let header = self.header(mem);
            let status_addr = if self.layout.writable_len == 0 {
                None
            } else {
                byte_addr(&self.layout.writable, self.layout.writable_len - 1)
            };
            // Anything but a read or write orders after the batch before it: run the batch
            // before executing it.
            if !pending.is_empty() && !header.is_ok_and(|h| h.kind.is_read_or_write()) {
                self.complete_batch(queue, mem, tracker, &mut pending, &mut ops, &mut results);
            }
            self.bad_address = false;
            let (kind, step) = match status_addr {
                // Without a status byte there is nothing to report: don't execute.
                None => (ReqKind::Other, Step::Done(Done::err(status::IOERR))),
                Some(_) => self.prepare(mem, header, self.layout.writable_len - 1),
            };
            let io_op = match step {
                Step::Io(op, done) => Some((op, done)),
                Step::Done(_) if self.bad_address && memory_changed() => {
                    if !pending.is_empty() {
                        self.complete_batch(
                            queue,
                            mem,
                            tracker,
                            &mut pending,
                            &mut ops,
                            &mut results,
                        );
                    }
                    // Put the chain back: it is taken again with the new map.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return QueueRun {
                        used: used_any,
                        memory_changed: true,
                        more: false,
                    };
                }
                Step::Done(done) => {
                    // Keep completions in the order chains were taken (a read/write that
                    // failed validation, or a chain without a status byte, must not overtake
                    // the batch before it): inflight recovery relies on it.
                    if !pending.is_empty() {
                        self.complete_batch(
                            queue,
                            mem,
                            tracker,
                            &mut pending,
                            &mut ops,
                            &mut results,
                        );
                    }
                    self.finish(queue, mem, tracker, head, status_addr, kind, done, start);
                    used_any = true;
                    None
                }
            };
            if let Some((op, done)) = io_op {
                ops.push(op);
                pending.push(Pending {
                    head,
                    status_addr,
                    kind,
                    done,
                    start,
                });
            }
        }
        QueueRun {
            used: used_any,
            memory_changed: false,
            more: false,
        }
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

    /// Runs the batched reads/writes and returns their chains in order.
    fn complete_batch<'m>(
        &mut self,
        queue: &mut Queue,
        mem: &'m GuestMem,
        tracker: &mut impl ChainTracker,
        pending: &mut Vec<Pending>,
        ops: &mut Vec<BatchOp<'m>>,
        results: &mut Vec<io::Result<()>>,
    ) {
        results.clear();
        match &self.helper {
            Some(h) if super::split::worth_splitting(ops) => {
                super::split::run_split(self.image.as_mut(), h, ops, results)
            }
            _ => self.image.run_batch(ops, results),
        }
        for (i, p) in pending.drain(..).enumerate() {
            let done = match results.get(i) {
                Some(Ok(())) => p.done,
                Some(Err(e)) => {
                    let op = &ops[i];
                    warn!(
                        "{} of {} bytes at offset {} failed: {e}",
                        if op.write { "write" } else { "read" },
                        slices_len(&op.bufs),
                        op.offset
                    );
                    Done::err(status::IOERR)
                }
                None => Done::err(status::IOERR),
            };
            self.finish(
                queue,
                mem,
                tracker,
                p.head,
                p.status_addr,
                p.kind,
                done,
                p.start,
            );
        }
        ops.clear();
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
    fn prepare<'m>(
        &mut self,
        mem: &'m GuestMem,
        header: Result<RequestHeader, ChainError>,
        status_pos: u64,
    ) -> (ReqKind, Step<'m>) {
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
        let done = match header.kind {
            RequestType::In => return (ReqKind::Read, self.read(mem, header, status_pos)),
            RequestType::Out => return (ReqKind::Write, self.write(mem, header)),
            RequestType::Flush => self.flush(header),
            RequestType::GetId => self.get_id(mem, status_pos),
            RequestType::Discard if self.state.acked(features::DISCARD) => {
                self.discard_or_zero(mem, false)
            }
            RequestType::WriteZeroes if self.state.acked(features::WRITE_ZEROES) => {
                self.discard_or_zero(mem, true)
            }
            other => {
                debug!("unsupported request type {:#x}", other.raw());
                Done::err(status::UNSUPP)
            }
        };
        (header.kind.stats_kind(), Step::Done(done))
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

    fn read<'m>(&mut self, mem: &'m GuestMem, h: RequestHeader, status_pos: u64) -> Step<'m> {
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
        let op = BatchOp {
            offset: h.sector << SECTOR_SHIFT,
            bufs,
            write: false,
            durable: false,
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

    fn write<'m>(&mut self, mem: &'m GuestMem, h: RequestHeader) -> Step<'m> {
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
        let op = BatchOp {
            offset: h.sector << SECTOR_SHIFT,
            bufs,
            write: true,
            durable: !self.state.write_back(),
        };
        Step::Io(op, Done::wrote(len))
    }

    fn flush(&mut self, h: RequestHeader) -> Done {
        if h.sector != 0 {
            debug!("FLUSH with non-zero sector {}", h.sector);
            return Done::err(status::IOERR);
        }
        if self.params.read_only {
            return Done::ok(0);
        }
        match self.image.flush() {
            Ok(()) => {
                self.counters
                    .last_flush_ns
                    .store(now_ns(), Ordering::Relaxed);
                Done::ok(0)
            }
            Err(e) => {
                warn!("flush failed: {e}");
                Done::err(status::IOERR)
            }
        }
    }

    fn get_id(&mut self, mem: &GuestMem, status_pos: u64) -> Done {
        let n = (status_pos as usize).min(ID_BYTES);
        match scatter(mem, &self.layout.writable, 0, &self.params.serial[..n]) {
            Ok(()) => Done::ok(n as u64),
            Err(_) => Done::err(status::IOERR),
        }
    }

    /// DISCARD (`zero == false`) or WRITE_ZEROES. Every segment is validated before any is
    /// executed, so a bad segment never leaves the request half-applied.
    fn discard_or_zero(&mut self, mem: &GuestMem, zero: bool) -> Done {
        if self.params.read_only {
            debug!("discard/write-zeroes on a read-only disk refused");
            return Done::err(status::IOERR);
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
            return Done::err(status::IOERR);
        }
        let nseg = data_len / DWZ_SEG_LEN;
        if nseg > u64::from(max_seg) {
            debug!("discard/write-zeroes with {nseg} segments > {max_seg}");
            return Done::err(status::IOERR);
        }
        // Validate all segments first; reported status follows the spec's order: an unknown
        // flag (or unmap on discard) is UNSUPP, a bad range IOERR. The segments are read from
        // guest memory once: what was validated is what runs, whatever the guest writes there
        // meanwhile.
        let mut segments = Vec::with_capacity(nseg as usize);
        let mut bad_range = false;
        for i in 0..nseg {
            let Some(segment) = self.dwz_segment(mem, i) else {
                return Done::err(status::IOERR);
            };
            segments.push(segment);
            let DwzSegment {
                sector,
                num_sectors: num,
                flags,
            } = segment;
            if flags & !SEG_FLAG_UNMAP != 0 || (!zero && flags & SEG_FLAG_UNMAP != 0) {
                debug!("discard/write-zeroes with unsupported flags {flags:#x}");
                return Done::err(status::UNSUPP);
            }
            if num > max_sectors || !self.range_ok(sector, u64::from(num) << SECTOR_SHIFT) {
                bad_range = true;
            }
        }
        if bad_range {
            debug!("discard/write-zeroes out of range, unaligned or too large");
            return Done::err(status::IOERR);
        }
        for DwzSegment {
            sector,
            num_sectors: num,
            flags,
        } in segments
        {
            let (off, len) = (sector << SECTOR_SHIFT, u64::from(num) << SECTOR_SHIFT);
            let r = if zero {
                self.image
                    .write_zeroes(off, len, flags & SEG_FLAG_UNMAP != 0)
            } else {
                self.image.discard(off, len)
            };
            if let Err(e) = r {
                warn!("discard/write-zeroes of {len} bytes at {off} failed: {e}");
                return Done::err(status::IOERR);
            }
        }
        if !self.state.write_back() {
            if let Err(e) = self.image.flush() {
                warn!("write-through flush after discard/write-zeroes failed: {e}");
                return Done::err(status::IOERR);
            }
        }
        Done::ok(0)
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

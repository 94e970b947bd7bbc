//! Harness for `RequestHandler::process_queue` over fuzzer-built guest memory.
//!
//! Input layout (every byte optional: missing bytes read as zero):
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | flags: bit0 4096-byte logical blocks (else 512), bit1 read-only, bit2 write-back cache, bit3 ack FLUSH, bit4 ack DISCARD, bit5 ack WRITE_ZEROES, bit6 EVENT_IDX, bit7 raw image opened as auto-probed (sector-0 guard) |
//! | 1 | bits0-2: queue size = 2 << n (2..256); bits3-7: disk size in 4 KiB units - 1 |
//! | 2 | extra disk size in 16-byte units (so capacities that are not block multiples occur) |
//! | 3..5 | initial next_avail / next_used (u16 LE) |
//! | 5.. | copied into guest memory at GPA 0 |
//!
//! Guest memory: [0, 64K) and [64K, 128K) (adjacent regions, so buffers can straddle the
//! boundary), a hole, then [256K, 260K). The split queue sits at GPA 0: descriptor table
//! (16 * size bytes), then the avail ring, then the used ring (4-byte aligned), so a short
//! input controls the descriptors, the avail ring and the data right after them.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use vhost_user_blk::image::engine::SyncEngine;
use vhost_user_blk::image::ImageQueue;
use vhost_user_blk::stats::{QueueCounters, ReqKind};
use vhost_user_blk::virtio_blk::config::features;
use vhost_user_blk::virtio_blk::request::ChainTracker;
use vhost_user_blk::virtio_blk::{
    DeviceOptions, DeviceParams, DeviceState, GuestMem, RequestHandler,
};

/// Records the heads `process_queue` takes from the avail ring and returns to the used ring.
#[derive(Default)]
struct Track {
    taken: Vec<u16>,
    returned: Vec<u16>,
    /// The head announced by `returning` last (a return whose `add_used` failed, e.g. for a
    /// head past the ring, stays announced and is never `returned`).
    returning: Option<u16>,
}

impl ChainTracker for Track {
    fn taken(&mut self, head: u16) {
        self.taken.push(head);
    }
    fn returning(&mut self, head: u16) {
        // The inflight region's batch bookkeeping: announced before the used ring moves.
        self.returning = Some(head);
    }
    fn returned(&mut self, head: u16, _used_idx: u16) {
        assert_eq!(
            self.returning.take(),
            Some(head),
            "returned({head}) without returning({head}) right before it"
        );
        self.returned.push(head);
    }
}

use crate::Bytes;

/// Device configuration decoded from the input's first bytes.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Logical block size.
    pub lbs: u32,
    /// Read-only device.
    pub read_only: bool,
    /// Write-back cache state.
    pub writeback: bool,
    /// Acked virtio features.
    pub acked: u64,
    /// EVENT_IDX on the queue.
    pub event_idx: bool,
    /// Raw image: open as auto-detected (turns on the qcow2-magic guard).
    pub probed: bool,
    /// Queue size.
    pub queue_size: u16,
    /// Image file / disk size in bytes (before rounding to blocks).
    pub disk_size: u64,
    /// Initial ring position.
    pub start: u16,
}

impl Setup {
    /// Decodes the header bytes.
    pub fn decode(b: &mut Bytes<'_>) -> Setup {
        let f = b.u8();
        let q = b.u8();
        let extra = b.u8();
        let start = b.u16();
        let mut acked = features::VERSION_1 | features::SEG_MAX | features::BLK_SIZE;
        if f & 8 != 0 {
            acked |= features::FLUSH | features::CONFIG_WCE;
        }
        if f & 16 != 0 {
            acked |= features::DISCARD;
        }
        if f & 32 != 0 {
            acked |= features::WRITE_ZEROES;
        }
        if f & 64 != 0 {
            acked |= features::RING_EVENT_IDX;
        }
        Setup {
            lbs: if f & 1 != 0 { 4096 } else { 512 },
            read_only: f & 2 != 0,
            writeback: f & 4 != 0,
            acked,
            event_idx: f & 64 != 0,
            probed: f & 128 != 0,
            queue_size: 2u16 << (q & 7),
            disk_size: (u64::from(q >> 3) + 1) * 4096 + u64::from(extra) * 16,
            start,
        }
    }
}

/// Guest memory layout used by the virtio-blk targets.
pub fn guest_memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x4_0000), 0x1000),
    ])
    .expect("guest memory")
}

/// Runs one input. `make_image(setup, capacity_bytes)` returns the image queue the handler
/// uses (already wrapped in a `CheckedQueue` by the caller if it wants range checks).
pub fn run(data: &[u8], make_image: impl FnOnce(&Setup, &DeviceParams) -> Box<dyn ImageQueue>) {
    let mut b = Bytes::new(data);
    let setup = Setup::decode(&mut b);
    let params = DeviceParams::new(&DeviceOptions {
        size: setup.disk_size,
        logical_block_size: setup.lbs,
        discard_granularity: 4096,
        num_queues: 1,
        queue_size: setup.queue_size.max(4),
        read_only: setup.read_only,
        serial: "fuzz-serial",
    })
    .expect("valid device params");
    let mem = Arc::new(guest_memory());
    let image = make_image(&setup, &params);
    let state = Arc::new(DeviceState::new(setup.writeback));
    state.acked_features.store(setup.acked, Ordering::Relaxed);
    let counters = Arc::new(QueueCounters::default());
    let mut handler = RequestHandler::new(
        Box::new(SyncEngine::new(image)),
        Arc::new(params),
        state,
        counters.clone(),
    );
    let handled = || {
        ReqKind::ALL
            .iter()
            .map(|&k| counters.requests(k))
            .sum::<u64>()
            + counters.dropped.load(Ordering::Relaxed)
    };

    // Fill guest memory with the rest of the input.
    let rest = b.rest();
    let n = rest.len().min(0x2_0000);
    vm_memory::Bytes::write_slice(&*mem, &rest[..n], GuestAddress(0)).expect("fill guest memory");

    let size = u64::from(setup.queue_size);
    let desc = 0u64;
    let avail = desc + 16 * size;
    let used = (avail + 6 + 2 * size).next_multiple_of(4);
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(setup.queue_size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(setup.event_idx);
    queue.set_next_avail(setup.start);
    queue.set_next_used(setup.start);
    queue.set_ready(true);
    assert!(queue.is_valid(&*mem), "harness built an invalid queue");

    // Handing completions back every few requests (as the daemon does for images that run a
    // batch sequentially) is chosen by the low bits of the start position: 0 = off.
    handler.set_notify_every(usize::from(setup.start % 8));
    let mut track = Track::default();
    let mut used_any = false;
    let mut passes = 0u32;
    let mut after_more = false;
    loop {
        let before = queue.next_avail();
        let run = handler.process_queue(&mut queue, &mem, &mut track, &mut || false);
        used_any |= run.used;
        passes += 1;
        // `more` promises that chains are waiting: the daemon's worker loop relies on the
        // next pass taking one (else it could stop with chains nobody kicks for).
        // (Unless the avail index is bogus, more than a queue's worth ahead: then the
        // worker stops, as for any pass that takes nothing.)
        let sane = queue
            .avail_idx(&*mem, Ordering::Acquire)
            .is_ok_and(|a| (a - Wrapping(before)).0 <= setup.queue_size);
        if after_more && sane {
            assert_ne!(before, queue.next_avail(), "BUG: nothing taken after `more`");
        }
        if !run.more {
            break;
        }
        after_more = true;
        assert!(passes <= u32::from(setup.queue_size) + 1, "BUG: `more` forever");
    }
    if crate::debug() {
        let kinds: Vec<String> = ReqKind::ALL
            .iter()
            .map(|&k| format!("{}={}", k.name(), counters.requests(k)))
            .collect();
        eprintln!(
            "virtio_blk: {setup:?}: {} errors={} dropped={}",
            kinds.join(" "),
            counters.errors.load(Ordering::Relaxed),
            counters.dropped.load(Ordering::Relaxed)
        );
    }

    // Every chain popped from the avail ring must have been returned to the used ring, except
    // those whose head index is >= the queue size: virtio-queue pops them, but the used ring
    // cannot name them (`add_used` refuses), so they are lost by construction (a driver bug).
    let popped = (Wrapping(queue.next_avail()) - Wrapping(setup.start)).0;
    let returned = (Wrapping(queue.next_used()) - Wrapping(setup.start)).0;
    assert_eq!(usize::from(popped), track.taken.len(), "BUG: tracker missed a taken chain");
    assert_eq!(usize::from(returned), track.returned.len(), "BUG: tracker missed a return");
    // Completions keep the order chains were taken (inflight recovery relies on it).
    let valid: Vec<u16> = track
        .taken
        .iter()
        .copied()
        .filter(|&h| h < setup.queue_size)
        .collect();
    assert_eq!(
        valid, track.returned,
        "BUG: chains returned to the used ring differ from (or are out of the order of) those taken"
    );
    assert_eq!(
        u64::from(popped),
        handled(),
        "BUG: popped chains and handled (completed + dropped) requests differ"
    );
    assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0, "BUG: in_flight leaked");
    assert_eq!(used_any, popped > 0, "BUG: process_queue's return value");
    // A second pass must terminate too (the device's writes may have changed the avail ring).
    let mut track = Track::default();
    handler.process_queue(&mut queue, &mem, &mut track, &mut || false);
    let popped = (Wrapping(queue.next_avail()) - Wrapping(setup.start)).0;
    let returned = (Wrapping(queue.next_used()) - Wrapping(setup.start)).0;
    assert!(returned <= popped, "BUG: more chains returned than popped (second pass)");
}

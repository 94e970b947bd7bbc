//! Request handling driven through virtio-queue's `MockSplitQueue`: well-formed requests in
//! many descriptor layouts, and hostile chains.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::{features, req_type, serial_bytes, status, DeviceOptions, DeviceParams};
use super::{DeviceState, GuestMem, RequestHandler};
use crate::image::engine::SyncEngine;
use crate::image::{GuestSlice, ImageQueue};
use crate::stats::{QueueCounters, ReqKind};

const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const DISK: usize = 64 * 1024;

/// An in-memory disk that records calls.
#[derive(Clone, Default)]
struct MemDisk {
    data: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl MemDisk {
    fn new() -> Self {
        let d = MemDisk::default();
        *d.data.lock().unwrap() = (0..DISK).map(|i| (i % 251) as u8).collect();
        d
    }
    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }
    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl ImageQueue for MemDisk {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_from(&data[pos..pos + b.len()]);
            pos += b.len();
        }
        self.log.lock().unwrap().push(format!("read {offset}"));
        Ok(())
    }
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()> {
        // A write to the last sector "fails", to exercise per-request errors.
        if offset == DISK as u64 - 512 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut data = self.data.lock().unwrap();
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_to(&mut data[pos..pos + b.len()]);
            pos += b.len();
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("write {offset} durable={durable}"));
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.lock().unwrap().push("flush".into());
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        self.log
            .lock()
            .unwrap()
            .push(format!("discard {offset} {len}"));
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        self.log
            .lock()
            .unwrap()
            .push(format!("zero {offset} {len} unmap={unmap}"));
        Ok(())
    }
}

fn params() -> DeviceParams {
    DeviceParams::new(&DeviceOptions {
        serial: "serial-1234",
        ..options()
    })
    .unwrap()
}

/// The options of the test disk: 512-byte blocks, one queue of 16.
fn options() -> DeviceOptions<'static> {
    DeviceOptions {
        size: DISK as u64,
        logical_block_size: 512,
        discard_granularity: 4096,
        num_queues: 1,
        queue_size: 16,
        read_only: false,
        serial: "",
    }
}

struct Rig {
    mem: Arc<GuestMem>,
    disk: MemDisk,
    handler: RequestHandler,
    state: Arc<DeviceState>,
}

impl Rig {
    fn new(p: DeviceParams) -> Self {
        Self::with_image(p, |disk, _| Box::new(disk))
    }

    /// A rig whose handler runs on `image(disk, guest memory)` instead of the disk itself.
    fn with_image(
        p: DeviceParams,
        image: impl FnOnce(MemDisk, GuestMem) -> Box<dyn ImageQueue>,
    ) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10_0000),
                (GuestAddress(0x10_0000), 0x10_0000),
            ])
            .unwrap(),
        );
        let disk = MemDisk::new();
        let state = Arc::new(DeviceState::new(true));
        state.acked_features.store(
            p.features() & !features::RO | features::FLUSH,
            Ordering::Relaxed,
        );
        let handler = RequestHandler::new(
            Box::new(SyncEngine::new(image(disk.clone(), (*mem).clone()))),
            Arc::new(p),
            state.clone(),
            Arc::new(QueueCounters::default()),
        );
        Rig {
            mem,
            disk,
            handler,
            state,
        }
    }

    fn header(&self, addr: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Submits one chain; returns (used len, status byte at `status_addr`).
    fn submit(&mut self, descs: &[(u64, u32, u16)], status_addr: u64) -> (u32, u8) {
        self.mem
            .write_obj(0xffu8, GuestAddress(status_addr))
            .unwrap();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let vq = MockSplitQueue::new(&*self.mem, 16);
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(
            self.handler
                .process_queue(&mut q, &self.mem, &mut (), &mut || false)
                .used
        );
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.id(), 0);
        let st: u8 = self.mem.read_obj(GuestAddress(status_addr)).unwrap();
        (used.len(), st)
    }

    fn fill(&self, addr: u64, byte: u8, len: usize) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn write_then_read_in_classic_layout() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 8);
    r.fill(0x2000, 0xab, 1024);
    let (len, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 1024, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!((len, st), (1, status::OK));
    assert_eq!(r.disk.bytes(4096, 1024), vec![0xab; 1024]);
    assert_eq!(
        r.disk.bytes(4096 + 1024, 1),
        vec![((4096 + 1024) % 251) as u8]
    );

    r.header(0x1000, req_type::IN, 8);
    r.fill(0x4000, 0, 1024);
    let (len, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x4000, 1024, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!((len, st), (1025, status::OK));
    assert_eq!(r.read_mem(0x4000, 1024), vec![0xab; 1024]);
}

#[test]
fn merged_and_split_layouts_work() {
    let mut r = Rig::new(params());
    // Header and data in one descriptor, data continuing in a second one that starts in the
    // middle of a sector.
    r.header(0x1000, req_type::OUT, 2);
    r.fill(0x1010, 0x11, 300);
    r.fill(0x5000, 0x22, 212);
    let (len, st) = r.submit(
        &[
            (0x1000, 16 + 300, 0),
            (0x5000, 212, 0),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!((len, st), (1, status::OK));
    let mut want = vec![0x11; 300];
    want.extend(vec![0x22; 212]);
    assert_eq!(r.disk.bytes(1024, 512), want);

    // Read data and status byte in one writable descriptor; header split in two.
    r.mem.write_slice(&[0u8; 8], GuestAddress(0x6000)).unwrap(); // type IN + ioprio
    r.mem
        .write_slice(&2u64.to_le_bytes(), GuestAddress(0x7000))
        .unwrap();
    let (len, st) = r.submit(
        &[(0x6000, 8, 0), (0x7000, 8, 0), (0x8000, 513, F_WRITE)],
        0x8000 + 512,
    );
    assert_eq!((len, st), (513, status::OK));
    assert_eq!(r.read_mem(0x8000, 512), want);
}

#[test]
fn data_crossing_a_guest_memory_region_boundary() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    r.fill(0xff000, 0x5a, 0x2000);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0xff000, 0x2000, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::OK);
    assert_eq!(r.disk.bytes(0, 0x2000), vec![0x5a; 0x2000]);
}

#[test]
fn indirect_descriptor_table_is_followed() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 4);
    r.fill(0x2000, 0x77, 512);
    // Indirect table at 0x9000: header, data, status.
    let table = [
        SplitDescriptor::new(0x1000, 16, 1, 1),
        SplitDescriptor::new(0x2000, 512, 1, 2),
        SplitDescriptor::new(0x3000, 1, F_WRITE, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        r.mem
            .write_obj(
                RawDescriptor::from(*d),
                GuestAddress(0x9000 + 16 * i as u64),
            )
            .unwrap();
    }
    let (len, st) = r.submit(&[(0x9000, 48, F_INDIRECT)], 0x3000);
    assert_eq!((len, st), (1, status::OK));
    assert_eq!(r.disk.bytes(2048, 512), vec![0x77; 512]);
}

#[test]
fn short_header_is_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    let (len, st) = r.submit(&[(0x1000, 8, 0), (0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!((len, st), (1, status::IOERR));
    assert!(r.disk.calls().is_empty());
}

#[test]
fn chain_without_status_byte_is_returned_empty() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    r.fill(0x2000, 0x99, 512);
    let (len, st) = r.submit(&[(0x1000, 16, 0), (0x2000, 512, 0)], 0x3000);
    assert_eq!(len, 0);
    assert_eq!(st, 0xff, "nothing may be written");
    assert!(r.disk.calls().is_empty());
    assert_eq!(r.handler.counters().dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn read_into_device_readable_buffers_is_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::IN, 0);
    r.fill(0x2000, 0xee, 512);
    let (len, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!((len, st), (1, status::IOERR));
    assert_eq!(
        r.read_mem(0x2000, 512),
        vec![0xee; 512],
        "guest buffer untouched"
    );
    assert!(r.disk.calls().is_empty());
}

#[test]
fn write_with_device_writable_data_is_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 512, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

#[test]
fn readable_after_writable_is_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::IN, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 512, F_WRITE),
            (0x4000, 16, 0),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

#[test]
fn huge_and_unmapped_buffers_are_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::IN, 0);
    // Data descriptor far outside guest memory, with a huge length.
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x4000_0000, 0xffff_0000, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    // In range of the disk but the buffer runs off the end of guest memory.
    r.header(0x1000, req_type::IN, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x1ff000, 0x2000, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    // Address that wraps around u64.
    r.header(0x1000, req_type::OUT, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (u64::MAX - 511, 512, 0),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

#[test]
fn out_of_range_sectors_are_ioerr() {
    let mut r = Rig::new(params());
    let last = (DISK / 512) as u64;
    for sector in [last, last - 1, u64::MAX, u64::MAX / 512, 1 << 55] {
        r.header(0x1000, req_type::IN, sector);
        let (len, st) = r.submit(
            &[
                (0x1000, 16, 0),
                (0x2000, 1024, F_WRITE),
                (0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!((len, st), (1, status::IOERR), "sector {sector}");
        r.header(0x1000, req_type::OUT, sector);
        let (_, st) = r.submit(
            &[(0x1000, 16, 0), (0x2000, 1024, 0), (0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(st, status::IOERR, "sector {sector}");
    }
    // The very last sector alone is fine.
    r.header(0x1000, req_type::IN, last - 1);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 512, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::OK);
    assert_eq!(r.disk.calls(), vec![format!("read {}", DISK - 512)]);
}

#[test]
fn data_not_a_multiple_of_512_is_ioerr() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 500, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    r.header(0x1000, req_type::IN, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 513, F_WRITE),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

#[test]
fn unaligned_to_4k_logical_blocks_is_ioerr() {
    let p = DeviceParams::new(&DeviceOptions {
        logical_block_size: 4096,
        ..options()
    })
    .unwrap();
    let mut r = Rig::new(p);
    r.header(0x1000, req_type::OUT, 1);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 4096, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    r.header(0x1000, req_type::OUT, 8);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    r.header(0x1000, req_type::OUT, 8);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 4096, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::OK);
}

#[test]
fn more_segments_than_seg_max_is_ioerr() {
    // queue size 4 => seg_max 2.
    let p = DeviceParams::new(&DeviceOptions {
        queue_size: 4,
        ..options()
    })
    .unwrap();
    assert_eq!(p.seg_max, 2);
    let mut r = Rig::new(p);
    r.header(0x1000, req_type::OUT, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 512, 0),
            (0x4000, 512, 0),
            (0x6000, 512, 0),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
    r.header(0x1000, req_type::OUT, 0);
    let (_, st) = r.submit(
        &[
            (0x1000, 16, 0),
            (0x2000, 512, 0),
            (0x4000, 512, 0),
            (0x3000, 1, F_WRITE),
        ],
        0x3000,
    );
    assert_eq!(st, status::OK);
}

#[test]
fn unknown_type_is_unsupp_and_flush_checks_sector() {
    let mut r = Rig::new(params());
    for kind in [2u32, 3, 7, 10, 14, 16, 0x8000_0001, u32::MAX] {
        r.header(0x1000, kind, 0);
        let (_, st) = r.submit(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)], 0x3000);
        assert_eq!(st, status::UNSUPP, "type {kind:#x}");
    }
    r.header(0x1000, req_type::FLUSH, 5);
    let (_, st) = r.submit(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!(st, status::IOERR);
    for kind in [req_type::FLUSH, req_type::FLUSH_OUT] {
        r.header(0x1000, kind, 0);
        let (_, st) = r.submit(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)], 0x3000);
        assert_eq!(st, status::OK);
    }
    assert_eq!(r.disk.calls(), vec!["flush", "flush"]);
}

#[test]
fn get_id_returns_serial() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::GET_ID, 0);
    r.fill(0x2000, 0xff, 20);
    let (len, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 20, F_WRITE), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!((len, st), (21, status::OK));
    assert_eq!(r.read_mem(0x2000, 20), serial_bytes("serial-1234").to_vec());
}

#[test]
fn read_only_refuses_every_write_like_request() {
    let p = DeviceParams::new(&DeviceOptions {
        read_only: true,
        ..options()
    })
    .unwrap();
    let mut r = Rig::new(p);
    let before = r.disk.bytes(0, DISK);
    r.header(0x1000, req_type::OUT, 0);
    r.fill(0x2000, 0x42, 512);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    for kind in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        r.header(0x1000, kind, 0);
        dwz_segment(&r, 0x2000, 0, 8, 0);
        let (_, st) = r.submit(
            &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(st, status::IOERR);
    }
    r.header(0x1000, req_type::FLUSH, 0);
    let (_, st) = r.submit(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!(st, status::OK);
    assert_eq!(r.disk.bytes(0, DISK), before);
    assert!(r.disk.calls().is_empty());
}

fn dwz_segment(r: &Rig, addr: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    r.mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_and_write_zeroes_flags() {
    let mut r = Rig::new(params());
    // DISCARD with unmap: UNSUPP.
    r.header(0x1000, req_type::DISCARD, 0);
    dwz_segment(&r, 0x2000, 0, 8, 1);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::UNSUPP);
    // Unknown flag on either: UNSUPP.
    for kind in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        r.header(0x1000, kind, 0);
        dwz_segment(&r, 0x2000, 0, 8, 2);
        let (_, st) = r.submit(
            &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(st, status::UNSUPP);
    }
    assert!(r.disk.calls().is_empty());
    // Valid: discard, write-zeroes with and without unmap.
    r.header(0x1000, req_type::DISCARD, 0);
    dwz_segment(&r, 0x2000, 8, 8, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::OK);
    r.header(0x1000, req_type::WRITE_ZEROES, 0);
    dwz_segment(&r, 0x2000, 16, 1, 0);
    dwz_segment(&r, 0x2010, 32, 2, 1);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 32, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::OK);
    assert_eq!(
        r.disk.calls(),
        vec![
            "discard 4096 4096",
            "zero 8192 512 unmap=false",
            "zero 16384 1024 unmap=true"
        ]
    );
    assert_eq!(r.disk.bytes(16384, 1024), vec![0; 1024]);
}

#[test]
fn bad_discard_segment_applies_nothing() {
    let mut r = Rig::new(params());
    let last = (DISK / 512) as u64;
    r.header(0x1000, req_type::WRITE_ZEROES, 0);
    dwz_segment(&r, 0x2000, 0, 8, 0);
    dwz_segment(&r, 0x2010, last - 4, 8, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 32, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    // Sector overflow.
    r.header(0x1000, req_type::DISCARD, 0);
    dwz_segment(&r, 0x2000, u64::MAX - 2, 8, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    // Segment data not a multiple of 16, or none.
    r.header(0x1000, req_type::DISCARD, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 24, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    r.header(0x1000, req_type::DISCARD, 0);
    let (_, st) = r.submit(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)], 0x3000);
    assert_eq!(st, status::IOERR);
    // Too many segments (max 32).
    r.header(0x1000, req_type::DISCARD, 0);
    for i in 0..33 {
        dwz_segment(&r, 0x2000 + 16 * i, i, 1, 0);
    }
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 33 * 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

/// A disk whose first discard also rewrites a discard segment in guest memory, as a guest
/// racing the device could.
struct RewritesSegment {
    disk: MemDisk,
    mem: GuestMem,
    /// Where the segment is, and the sector to put there.
    rewrite: Option<(u64, u64)>,
}

impl ImageQueue for RewritesSegment {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.disk.read(offset, bufs)
    }
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()> {
        self.disk.write(offset, bufs, durable)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if let Some((addr, sector)) = self.rewrite.take() {
            self.mem.write_obj(sector, GuestAddress(addr)).unwrap();
        }
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.disk.write_zeroes(offset, len, unmap)
    }
}

#[test]
fn discard_runs_the_segments_it_validated() {
    // While the first segment is discarded, the second one is rewritten to lie past the end
    // of the disk: the request must still run the second segment as validated.
    let past_end = (DISK / 512) as u64 + 1024;
    let mut r = Rig::with_image(params(), |disk, mem| {
        Box::new(RewritesSegment {
            disk,
            mem,
            rewrite: Some((0x2010, past_end)),
        })
    });
    r.header(0x1000, req_type::DISCARD, 0);
    dwz_segment(&r, 0x2000, 0, 8, 0);
    dwz_segment(&r, 0x2010, 16, 8, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 32, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::OK);
    assert_eq!(r.disk.calls(), vec!["discard 0 4096", "discard 8192 4096"]);
}

#[test]
fn discard_not_negotiated_is_unsupp() {
    let mut r = Rig::new(params());
    r.state
        .acked_features
        .store(features::VERSION_1 | features::FLUSH, Ordering::Relaxed);
    r.header(0x1000, req_type::DISCARD, 0);
    dwz_segment(&r, 0x2000, 0, 8, 0);
    let (_, st) = r.submit(
        &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(st, status::UNSUPP);
}

#[test]
fn write_through_makes_writes_durable() {
    let mut r = Rig::new(params());
    r.header(0x1000, req_type::OUT, 0);
    r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    r.state.writeback.store(false, Ordering::Relaxed);
    r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    r.header(0x1000, req_type::WRITE_ZEROES, 0);
    dwz_segment(&r, 0x2000, 0, 8, 0);
    r.submit(
        &[(0x1000, 16, 0), (0x2000, 16, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    // Without FLUSH negotiated the device must be write-through even with writeback set.
    r.state.writeback.store(true, Ordering::Relaxed);
    r.state
        .acked_features
        .store(features::VERSION_1, Ordering::Relaxed);
    r.header(0x1000, req_type::OUT, 0);
    r.submit(
        &[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)],
        0x3000,
    );
    assert_eq!(
        r.disk.calls(),
        vec![
            "write 0 durable=false",
            "write 0 durable=true",
            "zero 0 4096 unmap=false",
            "flush",
            "write 0 durable=true"
        ]
    );
}

#[test]
fn many_chains_in_one_kick_all_complete() {
    let mut r = Rig::new(params());
    let vq = MockSplitQueue::new(&*r.mem, 16);
    let mut raw = Vec::new();
    for i in 0..5u64 {
        let h = 0x1000 + i * 0x100;
        r.header(h, req_type::OUT, i);
        raw.push(RawDescriptor::from(SplitDescriptor::new(h, 16, 1, 0)));
        raw.push(RawDescriptor::from(SplitDescriptor::new(0x2000, 512, 1, 0)));
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            0x3000 + i,
            1,
            F_WRITE,
            0,
        )));
    }
    // Link each triple.
    for (i, d) in raw.iter_mut().enumerate() {
        let s = SplitDescriptor::from(*d);
        let last = i % 3 == 2;
        *d = RawDescriptor::from(SplitDescriptor::new(
            s.addr().0,
            s.len(),
            if last { s.flags() & !1 } else { s.flags() | 1 },
            if last { 0 } else { i as u16 + 1 },
        ));
    }
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(
        r.handler
            .process_queue(&mut q, &r.mem, &mut (), &mut || false)
            .used
    );
    for i in 0..5 {
        let used = vq.used().ring().ref_at(i).unwrap().load();
        assert_eq!(used.id(), (i * 3) as u32);
        assert_eq!(used.len(), 1);
    }
    let c = r.handler.counters();
    assert_eq!(c.requests(ReqKind::Write), 5);
    assert_eq!(c.bytes_written.load(Ordering::Relaxed), 5 * 512);
    assert_eq!(c.errors.load(Ordering::Relaxed), 0);
    assert_eq!(c.in_flight.load(Ordering::Relaxed), 0);
}

#[test]
fn requests_of_every_kind_complete_with_their_own_status() {
    let mut r = Rig::new(params());
    let vq = MockSplitQueue::new(&*r.mem, 32);
    // Chains: write s0, write s1, read s0, flush, write (last sector: fails), read s1.
    let kinds = [
        (req_type::OUT, 0u64),
        (req_type::OUT, 1),
        (req_type::IN, 0),
        (req_type::FLUSH, 0),
        (req_type::OUT, (DISK / 512 - 1) as u64),
        (req_type::IN, 1),
    ];
    let mut raw = Vec::new();
    for (i, &(kind, sector)) in kinds.iter().enumerate() {
        let h = 0x1000 + i as u64 * 0x100;
        r.header(h, kind, sector);
        let data = 0x10000 + i as u64 * 0x1000;
        let st = 0x3000 + i as u64;
        let n = raw.len() as u16;
        let link = |d: SplitDescriptor, last: bool, idx: u16| {
            RawDescriptor::from(SplitDescriptor::new(
                d.addr().0,
                d.len(),
                if last { d.flags() } else { d.flags() | 1 },
                if last { 0 } else { idx + 1 },
            ))
        };
        raw.push(link(SplitDescriptor::new(h, 16, 0, 0), false, n));
        match kind {
            req_type::OUT => {
                r.fill(data, 0x40 + i as u8, 512);
                raw.push(link(SplitDescriptor::new(data, 512, 0, 0), false, n + 1));
                raw.push(link(SplitDescriptor::new(st, 1, F_WRITE, 0), true, n + 2));
            }
            req_type::IN => {
                raw.push(link(
                    SplitDescriptor::new(data, 512, F_WRITE, 0),
                    false,
                    n + 1,
                ));
                raw.push(link(SplitDescriptor::new(st, 1, F_WRITE, 0), true, n + 2));
            }
            _ => raw.push(link(SplitDescriptor::new(st, 1, F_WRITE, 0), true, n + 1)),
        }
    }
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(
        r.handler
            .process_queue(&mut q, &r.mem, &mut (), &mut || false)
            .used
    );
    let calls = r.disk.calls();
    assert_eq!(
        calls,
        vec![
            "write 0 durable=false",
            "write 512 durable=false",
            "read 0",
            "flush",
            "read 512"
        ],
        "the failing write does not reach the log"
    );
    // The synchronous engine completes them in the order taken, each with its status.
    let statuses: Vec<u8> = (0..6)
        .map(|i| r.mem.read_obj(GuestAddress(0x3000 + i)).unwrap())
        .collect();
    assert_eq!(statuses, vec![0, 0, 0, 0, status::IOERR, 0]);
    let heads: Vec<u32> = (0..6)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(heads, vec![0, 3, 6, 9, 11, 14]);
    let lens: Vec<u32> = (0..6)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().len())
        .collect();
    assert_eq!(lens, vec![1, 1, 513, 1, 1, 513]);
    // Sector 1 reads back what was written.
    assert_eq!(r.read_mem(0x10000 + 5 * 0x1000, 512), vec![0x41; 512]);
    assert_eq!(r.handler.counters().in_flight.load(Ordering::Relaxed), 0);
}

#[test]
fn invalid_requests_complete_beside_valid_ones() {
    let mut r = Rig::new(params());
    let vq = MockSplitQueue::new(&*r.mem, 16);
    // OUT sector 0 (valid), OUT past the end (fails validation), chain without status byte.
    let last = (DISK / 512) as u64;
    r.header(0x1000, req_type::OUT, 0);
    r.header(0x1100, req_type::OUT, last);
    r.header(0x1200, req_type::OUT, 1);
    let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
    let raw = [
        d(0x1000, 16, 1, 1),
        d(0x2000, 512, 1, 2),
        d(0x3000, 1, F_WRITE, 0),
        d(0x1100, 16, 1, 4),
        d(0x2000, 512, 1, 5),
        d(0x3001, 1, F_WRITE, 0),
        d(0x1200, 16, 1, 7),
        d(0x2000, 512, 0, 0),
    ];
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(
        r.handler
            .process_queue(&mut q, &r.mem, &mut (), &mut || false)
            .used
    );
    let heads: Vec<u32> = (0..3)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(
        heads,
        vec![0, 3, 6],
        "the synchronous engine completes in the order taken"
    );
    let st: Vec<u8> = (0..2)
        .map(|i| r.mem.read_obj(GuestAddress(0x3000 + i)).unwrap())
        .collect();
    assert_eq!(st, vec![status::OK, status::IOERR]);
}

#[test]
fn chain_outside_memory_is_put_back_when_the_map_changed() {
    let mut r = Rig::new(params());
    let vq = MockSplitQueue::new(&*r.mem, 16);
    r.header(0x1000, req_type::OUT, 0);
    let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
    // Data outside guest memory: as if the region were added by an update not yet applied.
    vq.add_desc_chains(
        &[
            d(0x1000, 16, 1, 1),
            d(0x4000_0000, 512, 1, 2),
            d(0x3000, 1, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut asked = 0;
    let run = r.handler.process_queue(&mut q, &r.mem, &mut (), &mut || {
        asked += 1;
        true
    });
    assert_eq!(asked, 1);
    assert!(run.memory_changed && !run.used);
    assert_eq!(q.next_avail(), 0, "the chain was put back");
    assert_eq!(r.handler.counters().in_flight.load(Ordering::Relaxed), 0);
    // Without a map change it fails with IOERR as before.
    let run = r
        .handler
        .process_queue(&mut q, &r.mem, &mut (), &mut || false);
    assert!(run.used && !run.memory_changed);
    let st: u8 = r.mem.read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(st, status::IOERR);
    assert!(r.disk.calls().is_empty());
}

/// Adds `n` one-sector write chains (header, data, status byte) to `vq`.
fn add_write_chains(r: &Rig, vq: &MockSplitQueue<'_, GuestMem>, n: u64) {
    let mut raw = Vec::new();
    for i in 0..n {
        let h = 0x1000 + i * 0x100;
        r.header(h, req_type::OUT, i);
        let first = raw.len() as u16;
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            h,
            16,
            1,
            first + 1,
        )));
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            0x2000,
            512,
            1,
            first + 2,
        )));
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            0x3000 + i,
            1,
            F_WRITE,
            0,
        )));
    }
    vq.add_desc_chains(&raw, 0).unwrap();
}

#[test]
fn notify_every_returns_after_every_n_requests_while_chains_wait() {
    let mut r = Rig::new(params());
    let vq = MockSplitQueue::new(&*r.mem, 32);
    add_write_chains(&r, &vq, 10);
    let mut q: Queue = vq.create_queue().unwrap();
    r.handler.set_notify_every(4);
    let mut runs = Vec::new();
    loop {
        let run = r
            .handler
            .process_queue(&mut q, &r.mem, &mut (), &mut || false);
        runs.push((run.used, run.more, q.next_used()));
        if !run.more {
            break;
        }
    }
    // Two early returns with 4 completions each on the used ring, then the last 2.
    assert_eq!(
        runs,
        vec![(true, true, 4), (true, true, 8), (true, false, 10)]
    );
    assert_eq!(r.disk.calls().len(), 10);
    for i in 0..10 {
        let used = vq.used().ring().ref_at(i).unwrap().load();
        assert_eq!((used.id(), used.len()), ((i * 3) as u32, 1));
    }
    assert_eq!(r.handler.counters().requests(ReqKind::Write), 10);
}

#[test]
fn notify_every_does_not_return_early_when_nothing_waits() {
    // N requests with nothing behind them end the call normally (the caller then polls for
    // the driver's next requests), and with the setting off all are taken in one call.
    for (every, chains) in [(4, 4), (0, 10)] {
        let mut r = Rig::new(params());
        let vq = MockSplitQueue::new(&*r.mem, 32);
        add_write_chains(&r, &vq, chains);
        let mut q: Queue = vq.create_queue().unwrap();
        r.handler.set_notify_every(every);
        let run = r
            .handler
            .process_queue(&mut q, &r.mem, &mut (), &mut || false);
        assert!(run.used && !run.more);
        assert_eq!(q.next_used(), chains as u16);
        assert_eq!(r.disk.calls().len(), chains as usize);
    }
}

//! The io_uring engine of qcow2 images: a queue's reads and overwrites all in flight at once,
//! each completing on its own.
//!
//! A read or write is first planned (plan.rs: host extents from the L2 tables, no data I/O);
//! the plan's extents then run as transfers on the queue's ring (`uring::transfer`), and the
//! request completes when the last of them does. Zero extents are filled at once.
//!
//! A write into a cluster the image leaves to its backing chain is a copy-on-write in two
//! steps: the backing bytes around the request's are read into a cluster buffer (which holds
//! the request's bytes already), then the cluster is written and its entry published. A
//! compressed cluster (in the image or a backing image) is read in the ring and inflated on
//! the worker when the request's other extents have ended.
//!
//! What a plan cannot express runs on the queue's synchronous handle, on the worker, while
//! the ring's requests go on: writes that copy a shared or compressed cluster of the image
//! or allocate with extended L2 or a data file (or any write without a mapping journal, or
//! in write-through mode, which flush before completing), discard and write-zeroes. Each completes before the next request is taken. Since the synchronous path
//! finishes every reservation it makes before it returns, the worker never waits for itself.
//!
//! A flush with other requests of the queue in flight and no metadata to write back is a
//! sync of the data file in the ring, while the queue goes on; any other flush runs on the
//! worker.
//!
//! An L2 table a request needs and the cache lacks is claimed (a loading marker in its slot)
//! and read in the ring, or copied at once when the host page cache has it; the request
//! waits for it and the queue goes on.
//!
//! Reuse: a request in the ring may still read or write the host cluster its plan named after
//! another request unmapped it. Clusters a flush frees are handed out again only once every
//! request that started before is done (the module docs' "Reuse" rule): the engine keeps the
//! start epochs of its requests in flight and publishes the oldest in its slot.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cache::Claim;
use super::compress;
use super::flush::DataSync;
use super::header::Compression;
use super::journal::HeldCredit;
use super::l2::{Entry, L2Entry, L2Table, SubclusterBitmap};
use super::plan::{Extent, Plan, Source, WriteExtent};
use super::{Backing, GuestOffset, Qcow2Queue, Qcow2Shared, DATA_SYNC_POINT};
use crate::image::engine::{run_sync, EngineOp, GuestBuffers, IoEngine};
use crate::image::storage::{mutated, Dir, HostFile};
use crate::image::uring::transfer::{
    copy_to_range, sub_iov, zero_range, Slab, Transfer, Transfers,
};
use crate::image::uring::Ring;

/// Bytes of inflated compressed clusters an engine keeps (`Qcow2Ring::inflated`).
const INFLATED_BYTES: usize = 1 << 20;

/// The start epochs of a queue's requests in flight, and the slot where the oldest is
/// published for reclaim.
struct Epochs {
    slot: Arc<AtomicU64>,
    /// Epoch -> requests in flight that started in it.
    open: BTreeMap<u64, usize>,
}

impl Epochs {
    /// Records a request starting now and returns its epoch. The slot holds the oldest epoch
    /// in flight, never later than this request's, before the request looks up any mapping.
    fn begin(&mut self, shared: &Qcow2Shared) -> u64 {
        let e = shared.epoch.load(Ordering::SeqCst);
        *self.open.entry(e).or_insert(0) += 1;
        let oldest = self.open.keys().next().copied().unwrap_or(e);
        self.slot.store(oldest, Ordering::SeqCst);
        // Pairs with the fence in `Qcow2Shared::reclaim`, as in `begin_request`.
        std::sync::atomic::fence(Ordering::SeqCst);
        e
    }

    /// A request that started in epoch `e` is done.
    fn end(&mut self, e: u64) {
        if let Some(n) = self.open.get_mut(&e) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&e);
            }
        }
        let oldest = self.open.keys().next().copied().unwrap_or(0);
        // Release: what the finished requests did happens before a reclaim that sees the
        // slot move on.
        self.slot.store(oldest, Ordering::Release);
    }
}

/// A guest cluster a write is giving a host cluster: its entry is reserved (the table
/// pinned) until the data is written, then published, or restored if the write failed.
struct Alloc {
    table: Arc<L2Table>,
    /// Word of the entry in the table.
    w: usize,
    /// Guest cluster index.
    cluster: u64,
    /// The entry before the reservation.
    old: L2Entry,
    host: u64,
    credit: Option<HeldCredit>,
}

/// A request whose extents (or whose data sync, for a flush) are in the ring.
struct Req {
    tag: u16,
    /// Keeps the guest buffers mapped until the last extent ends (none for a flush).
    bufs: Option<GuestBuffers>,
    /// Extents still in the ring.
    left: usize,
    /// The first error of an extent.
    result: io::Result<()>,
    /// The epoch the request started in (a flush looks up no mapping: none).
    epoch: Option<u64>,
    /// A flush's bookkeeping, done when its sync completes.
    sync: Option<DataSync>,
    /// An L2 table being read into `buffers[0]` (no guest request: nothing completes).
    load: Option<TableLoad>,
    /// Clusters to publish when the data is written.
    allocs: Vec<Alloc>,
    /// Whole-cluster buffers (zeros or backing bytes around the request's bytes) of
    /// allocations into clusters that may hold old data, and of copies-on-write.
    buffers: Vec<Vec<u8>>,
    /// Where `buffers` go once the backing bytes of copies-on-write are read into them (the
    /// extents in the ring are those reads until then).
    then_write: Vec<u64>,
    /// Request bytes copied over the backing bytes in `buffers` before they are written:
    /// (buffer, request offset, offset in the buffer, length).
    then_copy: Vec<(usize, u64, usize, usize)>,
    /// Compressed clusters being read, inflated when every extent has ended.
    inflate: Vec<Inflate>,
}

/// A compressed cluster a request reads part of.
struct Inflate {
    /// The chain member it is stored in (plan.rs, `Source::Compressed`), and where.
    depth: usize,
    at: u64,
    /// Its stored bytes, as read.
    input: Vec<u8>,
    /// The part the request needs: `[in_off, in_off + len)` of the cluster.
    in_off: usize,
    len: usize,
    to: Dest,
}

/// Where inflated bytes go.
enum Dest {
    /// The request's guest buffers, at this request offset.
    Guest(u64),
    /// Whole-cluster buffer `.0`, at this offset (a copy-on-write).
    Buffer(usize, usize),
}

/// How a chain member's compressed clusters are read and inflated.
struct Packed {
    /// Its image file (buffered).
    file: Arc<HostFile>,
    kind: Compression,
    cluster_size: usize,
}

/// The whole-cluster buffers of a write (copies-on-write, allocations into clusters that may
/// hold old data): written at their host offsets once the backing reads `fills` (buffer
/// index, extents at offsets in that buffer) have filled them in and the request's bytes
/// `recopy` (buffer, request offset, offset in the buffer, length) are copied over those.
#[derive(Default)]
struct Cow {
    buffers: Vec<(Vec<u8>, u64)>,
    fills: Vec<(usize, Vec<Extent>)>,
    recopy: Vec<(usize, u64, usize, usize)>,
}

/// An L2 table the engine is reading into the cache slot it claimed.
struct TableLoad {
    /// L1 index.
    i: usize,
    /// The slot's loading marker.
    marker: Arc<L2Table>,
    /// Host offset of the table.
    at: u64,
}

/// The io_uring engine of one queue of a qcow2 image.
pub(super) struct Qcow2Ring {
    shared: Arc<Qcow2Shared>,
    /// The queue's synchronous handle, for what plans do not cover.
    sync: Qcow2Queue,
    /// The file guest data lives in, as the ring reads and writes it (O_DIRECT with
    /// `--direct`).
    data: Arc<HostFile>,
    /// The data files of the backing chain, by layer (plan.rs, `Source::Backing`); opened
    /// with O_DIRECT under `--direct` where the layer allows it (`direct_layer`).
    backing: Vec<Arc<HostFile>>,
    /// The image file, as L2 tables are read from it.
    meta: Arc<HostFile>,
    /// By chain depth (0: this image), where compressed clusters are read from; `None` for
    /// a raw backing file.
    packed: Vec<Option<Packed>>,
    /// The clusters inflated last, by chain depth and stored offset, oldest first (at most
    /// `INFLATED_BYTES` of them, and at least one): reads of the rest of a cluster, as a
    /// guest reading a compressed image in order makes them, need no read or inflation.
    /// The daemon never writes compressed clusters, so stored bytes at an offset never
    /// change while the image is open (and locked).
    inflated: VecDeque<((usize, u64), Vec<u8>)>,
    /// Compressed clusters inflated, and parts of them served from `inflated`.
    inflations: u64,
    inflated_hits: u64,
    /// Requests waiting for an L2 table this engine is loading, by L1 index.
    waiting: HashMap<usize, Vec<(u16, EngineOp)>>,
    /// Requests in `waiting`.
    waiting_n: usize,
    /// Table loads in `reqs` (not guest requests; each has requests waiting for it).
    loads: usize,
    /// Tables whose load in the ring failed: requests needing them load them synchronously,
    /// which reports the problem as any load does.
    failed_loads: HashSet<usize>,
    io: Transfers,
    reqs: Slab<Req>,
    epochs: Epochs,
    /// Entries this engine holds reserved (in requests in the ring).
    reserved: usize,
    /// Requests waiting for an entry someone else (or this engine) holds reserved.
    parked: VecDeque<(u16, EngineOp)>,
    /// Requests that ended without the ring.
    done: Vec<(u16, io::Result<()>)>,
    /// Transfer results (reused).
    ended: Vec<(usize, io::Result<()>)>,
    /// Reads and writes run from a plan, requests run on the synchronous path, and flushes
    /// that only synced data in the ring.
    planned: u64,
    synchronous: u64,
    ring_flushes: u64,
    /// L2 tables loaded, and of those read in the ring (the others were in the page cache).
    table_loads: u64,
    ring_loads: u64,
    /// A table's bytes, for loads from the page cache (reused).
    table_buf: Vec<u8>,
}

impl Qcow2Ring {
    /// The engine of a queue: `sync` is its synchronous handle, `data` its descriptor of the
    /// file guest data lives in (opened with O_DIRECT for `--direct`, whose buffer alignment
    /// `direct` gives).
    pub(super) fn new(
        shared: Arc<Qcow2Shared>,
        sync: Qcow2Queue,
        data: HostFile,
        direct: Option<usize>,
        ring: Ring,
    ) -> io::Result<Qcow2Ring> {
        let meta = Arc::new(shared.file.try_clone()?);
        let packed_of = |s: &Qcow2Shared, file: Arc<HostFile>| Packed {
            file,
            kind: s.hdr.compression,
            cluster_size: s.cluster_size() as usize,
        };
        // With O_DIRECT, the backing chain's data is read with it too (as QEMU's cache=none
        // does for the whole chain), where the layer allows it.
        let layer_file = |f: &HostFile, size: Option<u64>| -> io::Result<Arc<HostFile>> {
            match direct.and_then(|_| direct_layer(f, size)) {
                Some(d) => Ok(Arc::new(d)),
                None => Ok(Arc::new(f.try_clone()?)),
            }
        };
        let mut packed = vec![Some(packed_of(&shared, meta.clone()))];
        let mut backing = Vec::new();
        let mut layer = &shared.backing;
        while let Some(b) = layer {
            match b {
                Backing::Raw { file, size } => {
                    backing.push(layer_file(file, Some(*size))?);
                    packed.push(None);
                    break;
                }
                Backing::Qcow2(s) => {
                    // Reads end at its virtual size, which may be off a 512-byte boundary.
                    backing.push(layer_file(s.data_io(), Some(b.size()))?);
                    packed.push(Some(packed_of(s, Arc::new(s.file.try_clone()?))));
                    layer = &s.backing;
                }
            }
        }
        let slot = shared.register_slot();
        Ok(Qcow2Ring {
            shared,
            sync,
            data: Arc::new(data),
            backing,
            meta,
            packed,
            inflated: VecDeque::new(),
            inflations: 0,
            inflated_hits: 0,
            waiting: HashMap::new(),
            waiting_n: 0,
            loads: 0,
            failed_loads: HashSet::new(),
            io: Transfers::new(ring, direct),
            reqs: Slab::default(),
            epochs: Epochs {
                slot,
                open: BTreeMap::new(),
            },
            reserved: 0,
            parked: VecDeque::new(),
            done: Vec::new(),
            ended: Vec::new(),
            planned: 0,
            synchronous: 0,
            ring_flushes: 0,
            table_loads: 0,
            ring_loads: 0,
            table_buf: Vec::new(),
        })
    }

    /// Starts `op`, or parks it while an entry it needs is reserved or a table it needs is
    /// being loaded.
    fn start(&mut self, tag: u16, op: EngineOp) {
        let Some(op) = self.with_tables(tag, op) else {
            return;
        };
        match op {
            EngineOp::Read { offset, bufs } => self.read(tag, offset, bufs),
            EngineOp::Write {
                offset,
                bufs,
                durable,
            } => self.write(tag, offset, bufs, durable),
            EngineOp::Flush => self.flush(tag),
            op => self.run_sync(tag, op),
        }
    }

    /// A flush. With other requests of the queue in flight and no metadata changed since the
    /// last flush, only the data file needs a sync, which runs in the ring while the queue
    /// goes on. Otherwise it runs on the worker: with nothing else in flight there is nothing
    /// to hold back, and a metadata write-back waits for reserved entries.
    fn flush(&mut self, tag: u16) {
        let clean = if self.shared.read_only || self.idle() {
            None
        } else {
            self.shared.begin_data_sync()
        };
        let Some(sync) = clean else {
            return self.run_sync(tag, EngineOp::Flush);
        };
        let r = self.reqs.insert(Req {
            tag,
            bufs: None,
            left: 1,
            result: Ok(()),
            epoch: None,
            sync: Some(sync),
            load: None,
            allocs: Vec::new(),
            buffers: Vec::new(),
            then_write: Vec::new(),
            then_copy: Vec::new(),
            inflate: Vec::new(),
        });
        self.ring_flushes += 1;
        if mutated(DATA_SYNC_POINT) {
            // The power-loss harness's mutation run: this durability point is switched off.
            return self.finish(r);
        }
        self.io.fsync(self.data.clone(), r);
    }

    /// Makes sure the L2 tables a read or write needs are in memory, so that planning it does
    /// no I/O: `Some(op)` when they are. Otherwise a missing table is read in the ring (the
    /// request waits for it while the queue's other requests go on) or is being read by
    /// another thread (the request is parked), and `op` starts again when it is there.
    fn with_tables(&mut self, tag: u16, op: EngineOp) -> Option<EngineOp> {
        let (offset, len) = match &op {
            EngineOp::Read { offset, bufs } | EngineOp::Write { offset, bufs, .. } => {
                (*offset, bufs.len())
            }
            _ => return Some(op),
        };
        if len == 0 {
            return Some(op);
        }
        let first = self.shared.locate(GuestOffset(offset)).0;
        let last = self
            .shared
            .locate(GuestOffset(offset.saturating_add(len - 1)))
            .0;
        for i in first..=last {
            if self.failed_loads.contains(&i) {
                continue;
            }
            if let Some(w) = self.waiting.get_mut(&i) {
                w.push((tag, op));
                self.waiting_n += 1;
                return None;
            }
            match self.shared.claim_table(i) {
                Ok(Claim::Ready) => {}
                Ok(Claim::Loading) => {
                    self.parked.push_back((tag, op));
                    return None;
                }
                Ok(Claim::Claimed { marker, at }) => {
                    let Err(load) = self.load_cached(TableLoad { i, marker, at }) else {
                        continue;
                    };
                    self.load_table(load);
                    self.waiting.insert(i, vec![(tag, op)]);
                    self.waiting_n += 1;
                    return None;
                }
                Err(e) => {
                    self.done.push((tag, Err(e)));
                    return None;
                }
            }
        }
        Some(op)
    }

    /// Loads the table of `load` at once if the host page cache has all of it (one
    /// `RWF_NOWAIT` read: a copy, cheaper than a trip through the ring, whose buffered reads
    /// may go to its worker threads); otherwise gives `load` back for the ring.
    fn load_cached(&mut self, load: TableLoad) -> Result<(), TableLoad> {
        let mut buf = std::mem::take(&mut self.table_buf);
        buf.resize(self.shared.cluster_size() as usize, 0);
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let r = match self.meta.transfer_nowait(&iov, load.at, Dir::Read) {
            Ok(n) if n == buf.len() => {
                self.table_loads += 1;
                self.table_loaded(load, Ok(()), &buf);
                Ok(())
            }
            _ => Err(load),
        };
        self.table_buf = buf;
        r
    }

    /// Reads the table of `load` in the ring; [`Qcow2Ring::finish`] puts it in the cache.
    fn load_table(&mut self, load: TableLoad) {
        let at = load.at;
        let r = self.reqs.insert(Req {
            tag: 0,
            bufs: None,
            left: 1,
            result: Ok(()),
            epoch: None,
            sync: None,
            load: Some(load),
            allocs: Vec::new(),
            buffers: vec![vec![0u8; self.shared.cluster_size() as usize]],
            then_write: Vec::new(),
            then_copy: Vec::new(),
            inflate: Vec::new(),
        });
        let Some(buf) = self.reqs.get_mut(r).and_then(|q| q.buffers.first_mut()) else {
            return;
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        self.table_loads += 1;
        self.ring_loads += 1;
        self.loads += 1;
        self.io.start(Transfer {
            file: self.meta.clone(),
            offset: at,
            iov: vec![iov],
            dir: Dir::Read,
            owner: r,
        });
    }

    /// A table read by [`Qcow2Ring::load_table`] ended: into the cache with it (checked as
    /// any load), and the requests that waited for it start again.
    fn table_loaded(&mut self, load: TableLoad, read: io::Result<()>, bytes: &[u8]) {
        let shared = &self.shared;
        let table = read.and_then(|()| shared.table_from_bytes(load.i, load.at, bytes));
        // No write-back from here: the flush would wait for this engine's reservations.
        if let Err(e) = shared.finish_load(load.i, &load.marker, table, false) {
            log::debug!("L2 table {} in the ring: {e}", load.i);
            self.failed_loads.insert(load.i);
        }
        let waiting = self.waiting.remove(&load.i).unwrap_or_default();
        self.waiting_n -= waiting.len();
        self.parked.extend(waiting);
    }

    /// True when no request of this queue is in flight or waiting (completed ones not yet
    /// reaped do not count: nothing waits for them).
    fn idle(&self) -> bool {
        self.reqs.is_empty() && self.parked.is_empty() && self.waiting_n == 0
    }

    /// Runs `op` on the synchronous handle. That path waits for reserved entries (and a
    /// flush waits for all of them), so first this engine's own reservations are brought to
    /// an end: the worker must never wait for itself.
    fn run_sync(&mut self, tag: u16, op: EngineOp) {
        self.drain();
        self.synchronous += 1;
        let r = run_sync(&mut self.sync, op);
        self.done.push((tag, r));
    }

    /// Waits for the ring until this engine holds no reserved entry and loads no table.
    fn drain(&mut self) {
        // Its table loads too: the synchronous path would wait for a table this engine is
        // loading (the loading marker in its slot), and only this worker reaps the load.
        while self.reserved > 0 || self.loads > 0 {
            if let Err(e) = self.io.wait() {
                log::warn!("waiting for the ring: {e}");
                std::thread::yield_now();
            }
            self.complete();
        }
    }

    fn read(&mut self, tag: u16, offset: u64, bufs: GuestBuffers) {
        let epoch = self.epochs.begin(&self.shared);
        match self.shared.plan_read(offset, bufs.len()) {
            Ok(Plan::Ready(plan)) => {
                let xs = plan.iter().map(|e| (e.pos, e.len, e.src)).collect();
                self.launch(tag, bufs, epoch, xs, Cow::default(), Vec::new(), Dir::Read)
            }
            Ok(Plan::Busy) => {
                self.epochs.end(epoch);
                self.parked
                    .push_back((tag, EngineOp::Read { offset, bufs }));
            }
            Ok(Plan::Sync) => {
                self.epochs.end(epoch);
                self.run_sync(tag, EngineOp::Read { offset, bufs });
            }
            Err(e) => {
                self.epochs.end(epoch);
                self.done.push((tag, Err(e)));
            }
        }
    }

    fn write(&mut self, tag: u16, offset: u64, bufs: GuestBuffers, durable: bool) {
        let op = |bufs| EngineOp::Write {
            offset,
            bufs,
            durable,
        };
        // Write-through, or no journal: the write must flush before it completes (see
        // `Qcow2Queue::mapping_request`), which the synchronous path does.
        if durable || self.shared.journal.is_none() {
            return self.run_sync(tag, op(bufs));
        }
        let epoch = self.epochs.begin(&self.shared);
        let planned = self
            .shared
            .check_writable()
            .and_then(|()| self.shared.plan_write(offset, bufs.len()));
        let plan = match planned {
            Ok(Plan::Ready(plan)) => plan,
            Ok(Plan::Busy) => {
                self.epochs.end(epoch);
                return self.parked.push_back((tag, op(bufs)));
            }
            Ok(Plan::Sync) => {
                self.epochs.end(epoch);
                return self.run_sync(tag, op(bufs));
            }
            Err(e) => {
                self.epochs.end(epoch);
                return self.done.push((tag, Err(e)));
            }
        };
        // The backing bytes each copy-on-write needs, planned before anything is reserved.
        let mut copies = Vec::new();
        for x in &plan {
            if let WriteExtent::Allocate {
                pos,
                in_off,
                from_backing: true,
                ..
            } = *x
            {
                let cluster_guest = offset + pos - in_off;
                match self.shared.plan_copy(cluster_guest) {
                    Ok(Plan::Ready(reads)) => copies.push(reads),
                    // An entry the plan does not understand: the synchronous path reports it.
                    Ok(_) => {
                        self.epochs.end(epoch);
                        return self.run_sync(tag, op(bufs));
                    }
                    Err(e) => {
                        self.epochs.end(epoch);
                        return self.done.push((tag, Err(e)));
                    }
                }
            }
        }
        let allocs = match self.reserve(&plan) {
            Ok(Some(a)) => a,
            Ok(None) => {
                self.epochs.end(epoch);
                return self.parked.push_back((tag, op(bufs)));
            }
            Err(e) => {
                self.epochs.end(epoch);
                return self.done.push((tag, Err(e)));
            }
        };
        if let Err(e) = self.shared.mark_bitmaps(offset, bufs.len()) {
            self.release(allocs);
            self.epochs.end(epoch);
            return self.done.push((tag, Err(e)));
        }
        let cs = self.shared.cluster_size();
        let mut buffers = Vec::new();
        let mut fills = Vec::new();
        let mut recopy = Vec::new();
        let mut copies = copies.into_iter();
        let mut xs = Vec::with_capacity(plan.len());
        let mut k = 0;
        for x in &plan {
            match *x {
                WriteExtent::Data { pos, len, host } => xs.push((pos, len, Source::Data(host))),
                WriteExtent::Allocate {
                    pos,
                    len,
                    in_off,
                    from_backing,
                    ..
                } => {
                    let (host, fresh) = allocs[k].1;
                    k += 1;
                    if from_backing {
                        // Copy-on-write: the backing file's bytes of the cluster, the
                        // request's copied over them once they are read (and now, in case
                        // there is nothing to read); written whole.
                        let mut b = vec![0u8; cs as usize];
                        let (at, n) = (in_off as usize, len as usize);
                        copy_in(&bufs, pos, &mut b[at..at + n]);
                        let reads = copies.next().unwrap_or_default();
                        if !reads.is_empty() {
                            recopy.push((buffers.len(), pos, at, n));
                        }
                        fills.push((buffers.len(), reads));
                        buffers.push((b, host));
                    } else if fresh {
                        // Past the end of the file at open: the rest of the cluster reads as
                        // zeros already. Only the request's bytes are written.
                        xs.push((pos, len, Source::Data(host + in_off)));
                    } else {
                        // A reused cluster may hold old data: write it whole.
                        let mut b = vec![0u8; cs as usize];
                        copy_in(&bufs, pos, &mut b[in_off as usize..(in_off + len) as usize]);
                        buffers.push((b, host));
                    }
                }
            }
        }
        // Give each new cluster its blocks first, on the worker (one cheap call each): a
        // write in the ring past the end of the file, or into a hole, takes the inode's lock
        // exclusively in ext4 and goes to the ring's worker threads, where such writes queue
        // behind each other. Into allocated blocks it runs beside the others. Best effort:
        // without fallocate the writes still land (the range reads as zeros either way).
        for (a, _) in &allocs {
            let _ = self.data.fallocate(0, a.host, cs);
        }
        let allocs = allocs.into_iter().map(|(a, _)| a).collect();
        let dir = Dir::Write { durable: false };
        let cow = Cow {
            buffers,
            fills,
            recopy,
        };
        self.launch(tag, bufs, epoch, xs, cow, allocs, dir);
    }

    /// Reserves the entries of `plan`'s allocations and gives each a host cluster (with
    /// whether it is fresh). `None` (nothing held) if an entry changed or is reserved: park.
    #[allow(clippy::type_complexity)]
    fn reserve(&mut self, plan: &[WriteExtent]) -> io::Result<Option<Vec<(Alloc, (u64, bool))>>> {
        let n = plan
            .iter()
            .filter(|x| matches!(x, WriteExtent::Allocate { .. }))
            .count();
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        let shared = self.shared.clone();
        // Setting the dirty bit and a full journal both take the flush lock, and a flush waits
        // for every reserved entry: only with none of ours held.
        if !shared.dirty_on_disk.load(Ordering::Acquire) {
            self.drain();
            shared.ensure_dirty()?;
        }
        let mut credits = Vec::with_capacity(n);
        if let Some(j) = &shared.journal {
            for _ in 0..n {
                match j.try_credit() {
                    Some(c) => credits.push(c.hold()),
                    None => {
                        self.drain();
                        match shared.credit() {
                            Ok(Some(c)) => credits.push(c.hold()),
                            Ok(None) => {}
                            Err(e) => {
                                for c in credits {
                                    drop(j.redeem(c));
                                }
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
        let mut taken: Vec<(Alloc, (u64, bool))> = Vec::with_capacity(n);
        let mut credits = credits.into_iter();
        for x in plan {
            let WriteExtent::Allocate { i, j, seen, .. } = *x else {
                continue;
            };
            let t = match shared.table(i) {
                Ok(t) => arc_swap::Guard::into_inner(t),
                Err(err) => {
                    self.release(taken);
                    return Err(err);
                }
            };
            let w = j * shared.words;
            if !t.pin() {
                self.release(taken);
                return Ok(None);
            }
            if !t.reserve(w, seen) {
                t.unpin();
                self.release(taken);
                return Ok(None);
            }
            self.reserved += 1;
            let gc = (i as u64) * shared.l2_entries() + j as u64;
            let alloc = Alloc {
                table: t,
                w,
                cluster: gc,
                old: seen,
                host: 0,
                credit: credits.next(),
            };
            match shared.alloc_data(gc << shared.cluster_bits) {
                Ok(hf) => {
                    let mut alloc = alloc;
                    alloc.host = hf.0;
                    taken.push((alloc, hf));
                }
                Err(err) => {
                    self.release(vec![(alloc, (0, false))]);
                    self.release(taken);
                    return Err(err);
                }
            }
        }
        Ok(Some(taken))
    }

    /// Gives up reservations taken by [`Qcow2Ring::reserve`] before any data was written:
    /// the entries go back to what they were, host clusters back to the allocator (at the
    /// next flush), credits back to the journal.
    fn release(&mut self, allocs: Vec<(Alloc, (u64, bool))>) {
        for (a, (host, _)) in allocs {
            self.unreserve(a, host != 0);
        }
    }

    /// Ends the reservation of `a` without publishing it.
    fn unreserve(&mut self, a: Alloc, release_host: bool) {
        a.table.store_entry(a.w, a.old);
        a.table.unpin();
        self.reserved -= 1;
        if release_host {
            self.shared.release_data(a.host);
        }
        if let (Some(j), Some(c)) = (&self.shared.journal, a.credit) {
            drop(j.redeem(c));
        }
    }

    /// Starts request `tag`: extents `(pos, len, source)` of `bufs`, and the whole-cluster
    /// buffers of `cow`; `allocs` are published when all are done.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        tag: u16,
        bufs: GuestBuffers,
        epoch: u64,
        xs: Vec<(u64, u64, Source)>,
        cow: Cow,
        allocs: Vec<Alloc>,
        dir: Dir,
    ) {
        let Cow {
            buffers,
            fills,
            recopy,
        } = cow;
        self.planned += 1;
        let iov = bufs.iov().to_vec();
        let moved = xs.iter().filter(|x| x.2 != Source::Zero).count();
        let reads: usize = fills.iter().map(|(_, f)| f.len()).sum();
        let (bufs_owned, hosts): (Vec<Vec<u8>>, Vec<u64>) = buffers.into_iter().unzip();
        // The buffers are written now, or when the reads that fill them end.
        let (first, now, then_write) = if reads == 0 {
            (moved + hosts.len(), hosts, Vec::new())
        } else {
            (moved + reads, Vec::new(), hosts)
        };
        let r = self.reqs.insert(Req {
            tag,
            bufs: Some(bufs),
            left: first,
            result: Ok(()),
            epoch: Some(epoch),
            sync: None,
            load: None,
            allocs,
            buffers: bufs_owned,
            then_write,
            then_copy: recopy,
            inflate: Vec::new(),
        });
        for (pos, len, src) in xs {
            match src {
                Source::Zero => zero_range(&iov, pos, len),
                Source::Compressed { .. } => self.start_inflate(r, src, len, Dest::Guest(pos)),
                _ => self.start_extent(r, src, sub_iov(&iov, pos, len), dir),
            }
        }
        for (b, extents) in fills {
            let Some(buf) = self.reqs.get_mut(r).and_then(|q| q.buffers.get_mut(b)) else {
                continue;
            };
            // plan_copy's extents lie within the cluster, which the buffer holds whole; the
            // buffer stays in the request, unmoved, until the request ends.
            let iovs: Vec<libc::iovec> = extents
                .iter()
                .map(|e| {
                    let at = &mut buf[e.pos as usize..(e.pos + e.len) as usize];
                    libc::iovec {
                        iov_base: at.as_mut_ptr().cast(),
                        iov_len: at.len(),
                    }
                })
                .collect();
            for (e, v) in extents.iter().zip(iovs) {
                match e.src {
                    Source::Compressed { .. } => {
                        let to = Dest::Buffer(b, e.pos as usize);
                        self.start_inflate(r, e.src, e.len, to)
                    }
                    _ => self.start_extent(r, e.src, vec![v], Dir::Read),
                }
            }
        }
        self.write_buffers(r, now);
        if first == 0 {
            self.finish(r);
        }
    }

    /// Starts the transfer of one extent of request `r` between `iov` and `src`.
    fn start_extent(&mut self, r: usize, src: Source, iov: Vec<libc::iovec>, dir: Dir) {
        let (file, offset) = match src {
            Source::Data(h) => (self.data.clone(), h),
            Source::Backing { layer, at } => match self.backing.get(layer) {
                Some(b) => (b.clone(), at),
                None => {
                    // Planned only through the chain the engine has.
                    return self.end_extent(r, Err(io::Error::from_raw_os_error(libc::EIO)));
                }
            },
            Source::Zero | Source::Compressed { .. } => return self.end_extent(r, Ok(())),
        };
        self.io.start(Transfer {
            file,
            offset,
            iov,
            dir,
            owner: r,
        });
    }

    /// Starts reading the compressed cluster of `src` for request `r`, whose bytes `len`
    /// bytes from its `in_off` go `to` once it is inflated (counted in its `left`).
    fn start_inflate(&mut self, r: usize, src: Source, len: u64, to: Dest) {
        let Source::Compressed {
            depth,
            at,
            stored,
            in_off,
        } = src
        else {
            return self.end_extent(r, Ok(()));
        };
        if let Some(k) = self
            .inflated
            .iter()
            .position(|(key, _)| *key == (depth, at))
        {
            self.inflated_hits += 1;
            let (in_off, len) = (in_off as usize, len as usize);
            let res = match (self.reqs.get_mut(r), self.inflated.get(k)) {
                (Some(req), Some((_, c))) => match c.get(in_off..in_off + len) {
                    Some(part) => deliver(req, &to, part),
                    None => Err(io::Error::from_raw_os_error(libc::EIO)),
                },
                _ => Ok(()),
            };
            return self.end_extent(r, res);
        }
        let Some(Some(p)) = self.packed.get(depth) else {
            // Planned only in the chain's qcow2 members, which the engine has.
            return self.end_extent(r, Err(io::Error::from_raw_os_error(libc::EIO)));
        };
        // A compressed cluster never needs more input than a cluster plus a sector of
        // slack; a larger length is corrupt but harmless to cap (as the synchronous path).
        let n = (stored as usize).min(p.cluster_size + 1024);
        let file = p.file.clone();
        let mut input = vec![0u8; n];
        let iov = libc::iovec {
            iov_base: input.as_mut_ptr().cast(),
            iov_len: n,
        };
        let Some(req) = self.reqs.get_mut(r) else {
            return;
        };
        // The input's heap buffer does not move with the `Inflate` holding it.
        req.inflate.push(Inflate {
            depth,
            at,
            input,
            in_off: in_off as usize,
            len: len as usize,
            to,
        });
        self.io.start(Transfer {
            file,
            offset: at,
            iov: vec![iov],
            dir: Dir::Read,
            owner: r,
        });
    }

    /// Inflates the compressed clusters request `r` read and copies the parts it needs.
    fn inflate(&mut self, r: usize) -> io::Result<()> {
        let Some(req) = self.reqs.get_mut(r) else {
            return Ok(());
        };
        for c in std::mem::take(&mut req.inflate) {
            let key = (c.depth, c.at);
            let k = match self.inflated.iter().position(|(k, _)| *k == key) {
                // Inflated meanwhile for another request.
                Some(k) => k,
                None => {
                    let Some(Some(p)) = self.packed.get(c.depth) else {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    };
                    // Room for it: the oldest go (chain members may differ in cluster size).
                    let mut kept: usize = self.inflated.iter().map(|(_, b)| b.len()).sum();
                    let mut out = Vec::new();
                    while kept + p.cluster_size > INFLATED_BYTES {
                        let Some((_, b)) = self.inflated.pop_front() else {
                            break;
                        };
                        kept -= b.len();
                        out = b;
                    }
                    out.resize(p.cluster_size, 0);
                    compress::decompress(p.kind, &c.input, &mut out)?;
                    self.inflations += 1;
                    self.inflated.push_back((key, out));
                    self.inflated.len() - 1
                }
            };
            let part = self
                .inflated
                .get(k)
                .and_then(|(_, b)| b.get(c.in_off..c.in_off + c.len));
            match part {
                Some(part) => deliver(req, &c.to, part)?,
                None => return Err(io::Error::from_raw_os_error(libc::EIO)),
            }
        }
        Ok(())
    }

    /// Writes request `r`'s whole-cluster buffers at `hosts` (counted in its `left`).
    fn write_buffers(&mut self, r: usize, hosts: Vec<u64>) {
        let whole: Vec<libc::iovec> = match self.reqs.get_mut(r) {
            Some(req) => req
                .buffers
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                })
                .collect(),
            None => Vec::new(),
        };
        for (v, host) in whole.into_iter().zip(hosts) {
            self.io.start(Transfer {
                file: self.data.clone(),
                offset: host,
                iov: vec![v],
                dir: Dir::Write { durable: false },
                owner: r,
            });
        }
    }

    /// One extent of request `r` ended with `res`.
    fn end_extent(&mut self, r: usize, res: io::Result<()>) {
        let Some(req) = self.reqs.get_mut(r) else {
            return;
        };
        if req.result.is_ok() {
            req.result = res;
        }
        req.left = req.left.saturating_sub(1);
        if req.left > 0 {
            return;
        }
        if req.result.is_ok() && !req.inflate.is_empty() {
            let inflated = self.inflate(r);
            let Some(req) = self.reqs.get_mut(r) else {
                return;
            };
            req.result = inflated;
        }
        let Some(req) = self.reqs.get_mut(r) else {
            return;
        };
        if req.result.is_ok() && !req.then_write.is_empty() {
            // The copies-on-write's backing bytes are in: the request's go over them, then
            // the clusters are written.
            for (b, pos, at, n) in std::mem::take(&mut req.then_copy) {
                if let (Some(guest), Some(out)) = (&req.bufs, req.buffers.get_mut(b)) {
                    if let Some(out) = out.get_mut(at..at + n) {
                        copy_in(guest, pos, out);
                    }
                }
            }
            let hosts = std::mem::take(&mut req.then_write);
            req.left = hosts.len();
            return self.write_buffers(r, hosts);
        }
        self.finish(r);
    }

    /// Request `r` has all its data written or read: publishes its allocations (or, if
    /// anything failed, gives them up) and completes it.
    fn finish(&mut self, r: usize) {
        let Some(mut req) = self.reqs.remove(r) else {
            return;
        };
        if let Some(load) = req.load.take() {
            self.loads -= 1;
            let bytes = req.buffers.pop().unwrap_or_default();
            return self.table_loaded(load, req.result, &bytes);
        }
        let ok = req.result.is_ok();
        for a in req.allocs {
            if ok {
                let credit = match (&self.shared.journal, a.credit) {
                    (Some(j), Some(c)) => Some(j.redeem(c)),
                    _ => None,
                };
                let new = Entry::new(L2Entry::owned(a.host), SubclusterBitmap::ALL_ALLOCATED);
                self.shared.publish(&a.table, a.w, a.cluster, new, credit);
                a.table.unpin();
                self.reserved -= 1;
            } else {
                self.unreserve(a, true);
            }
        }
        if let Some(e) = req.epoch {
            self.epochs.end(e);
        }
        if let (true, Some(sync)) = (ok, req.sync) {
            self.shared.end_data_sync(sync);
        }
        drop(req.bufs);
        self.done.push((req.tag, req.result));
    }

    /// Processes the ring's completions.
    fn complete(&mut self) {
        let mut ended = std::mem::take(&mut self.ended);
        self.io.reap(&mut ended);
        for (r, res) in ended.drain(..) {
            self.end_extent(r, res);
        }
        self.ended = ended;
    }

    /// Starts parked requests again (each parks anew if its entry is still reserved).
    fn retry_parked(&mut self) {
        for _ in 0..self.parked.len() {
            let Some((tag, op)) = self.parked.pop_front() else {
                break;
            };
            self.start(tag, op);
        }
    }
}

/// A backing layer's data file opened again with O_DIRECT, for the ring's reads. `None`
/// (read it buffered) where the file system refuses O_DIRECT or a read could be unaligned:
/// offsets that need more than 512-byte alignment (guest extents are 512-byte multiples), or
/// a layer whose size (`size`: a raw file's, a qcow2 image's virtual size) ends off a 512-byte
/// boundary (its last read would).
/// Compressed clusters, at any byte offset, are read buffered.
fn direct_layer(file: &HostFile, size: Option<u64>) -> Option<HostFile> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.fd()))
        .ok()?;
    let block_device = f.metadata().ok()?.file_type().is_block_device();
    let (_, offset_align) = crate::image::storage::direct_alignment(&f, block_device);
    if offset_align > 512 || size.is_some_and(|s| s % 512 != 0) {
        return None;
    }
    Some(HostFile::new(f, None, "backing"))
}

/// Copies inflated bytes `part` where they go in request `req`.
fn deliver(req: &mut Req, to: &Dest, part: &[u8]) -> io::Result<()> {
    match *to {
        Dest::Guest(pos) => {
            if let Some(b) = &req.bufs {
                copy_to_range(b.iov(), pos, part);
            }
            Ok(())
        }
        Dest::Buffer(b, at) => match req.buffers.get_mut(b).and_then(|b| b.get_mut(at..)) {
            Some(out) if out.len() >= part.len() => {
                out[..part.len()].copy_from_slice(part);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        },
    }
}

/// Copies request bytes `[pos, pos + out.len())` of `bufs` into `out`.
fn copy_in(bufs: &GuestBuffers, pos: u64, out: &mut [u8]) {
    let mut at = 0;
    for v in sub_iov(bufs.iov(), pos, out.len() as u64) {
        // SAFETY: the iovec is a live guest buffer of iov_len bytes, kept mapped by `bufs`;
        // `out[at..at + iov_len]` is in bounds (the iovecs cover out.len() bytes).
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.iov_base as *const u8,
                out[at..].as_mut_ptr(),
                v.iov_len,
            )
        };
        at += v.iov_len;
    }
}

impl Drop for Qcow2Ring {
    /// A queue stopping with requests in flight (GET_VRING_BASE gave up waiting for them, or
    /// a test): the ring finishes them first, so that every entry they reserved is published
    /// or restored. A reserved entry left behind would make every later flush, and so the
    /// image's close, wait for it forever. Requests not yet started are dropped; their
    /// guest resubmits them (inflight tracking).
    fn drop(&mut self) {
        while self.io.pending() > 0 {
            if let Err(e) = self.io.wait() {
                log::warn!("stopping a queue with requests in flight: {e}");
                return;
            }
            self.complete();
        }
        if self.reserved > 0 {
            log::warn!(
                "a queue stopped holding {} reserved L2 entries",
                self.reserved
            );
        }
    }
}

impl IoEngine for Qcow2Ring {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        // Handed to the kernel by the next `reap`, with the rest of the pass.
        self.start(tag, op);
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        loop {
            self.complete();
            if !self.parked.is_empty() {
                self.retry_parked();
                // Parked on another queue's reservation with nothing of ours in the ring, no
                // completion will come to retry it: wait here for that queue (which never
                // waits for us while it holds a reservation).
                while !self.parked.is_empty() && self.reqs.is_empty() {
                    std::thread::yield_now();
                    self.retry_parked();
                }
            }
            // What completions moved on (a copy-on-write's cluster write after its reads,
            // parked requests started again) goes to the kernel now: the worker may sleep
            // after this.
            self.io.submit();
            // And what of it ended at once (a non-blocking copy) is handled now: no event
            // comes for it.
            if !self.io.ended_at_once() {
                break;
            }
        }
        out.append(&mut self.done);
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.io.event_fd())
    }

    fn submit_queued(&mut self) {
        self.io.submit();
    }

    fn completions_ready(&mut self) -> bool {
        !self.done.is_empty() || self.io.completions_ready()
    }

    fn in_flight(&self) -> usize {
        self.reqs.len() - self.loads + self.waiting_n + self.parked.len() + self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::Qcow2Ring;
    use crate::image::engine::testing::{buffers, get, memory, put, run};
    use crate::image::engine::{EngineOp, IoEngine};
    use crate::image::options::{ImageFormat, ImageOptions};
    use crate::image::qcow2::testing::{assert_qemu_img_check, pattern, qemu_img, qemu_img_create};
    use crate::image::qcow2::{l2, GuestOffset, Qcow2Image};
    use crate::image::uring::Ring;
    use crate::image::GuestMem;

    const MIB: u64 = 1 << 20;

    /// Opens `path` with a mapping journal in `/dev/shm` (default), buffered or O_DIRECT.
    fn open(path: &Path, direct: bool) -> Qcow2Image {
        Qcow2Image::open(&ImageOptions {
            direct,
            ..ImageOptions::new(path.to_owned(), ImageFormat::Qcow2)
        })
        .unwrap()
    }

    /// The io_uring engine of a queue of `img` (as `BlockImage::engine` makes it).
    fn engine(img: &Qcow2Image) -> Qcow2Ring {
        let ring = Ring::new().unwrap();
        let (data, align) = match &img.direct {
            Some((f, align)) => (f.try_clone().unwrap(), Some(*align)),
            None => (img.shared.data_io().try_clone().unwrap(), None),
        };
        Qcow2Ring::new(img.shared.clone(), img.queue().unwrap(), data, align, ring).unwrap()
    }

    /// The whole guest disk, read through `qemu-img` (the oracle).
    fn oracle(path: &Path, dir: &Path) -> Vec<u8> {
        let raw = dir.join("oracle.raw");
        let _ = std::fs::remove_file(&raw);
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        std::fs::read(raw).unwrap()
    }

    /// Writes that allocate (synchronous path), then overwrites of the same clusters and
    /// reads over allocated and unallocated clusters all in flight at once (the ring), with
    /// guest buffers split in pieces, buffered and O_DIRECT (one buffer unaligned for it):
    /// every read returns what the oracle reads, and the image stays clean.
    #[test]
    fn overwrites_and_reads_run_in_the_ring() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img.qcow2");
            qemu_img_create(&path, "cluster_size=65536", "8M");
            let img = open(&path, direct);
            let mut e = engine(&img);
            assert!(e.event_fd().is_some());
            let mem = memory(4 << 20);
            // Allocate clusters 0, 2, 4, .. 14 (each write covers one cluster in two pieces).
            let mut ops = Vec::new();
            for i in 0..8u64 {
                let off = i * 2 * 65536;
                put(&mem, i * 65536, &pattern(off, 65536));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(i * 65536, 4096), (i * 65536 + 4096, 61440)]),
                    durable: false,
                });
            }
            assert!(run(&mut e, ops).iter().all(|r| r.is_ok()));
            // Overwrite parts of them in place, one through an unaligned buffer.
            let mut ops = Vec::new();
            for i in 0..8u64 {
                let off = i * 2 * 65536 + 8192;
                let at = MIB + i * 65536 + u64::from(i == 3);
                put(&mem, at, &pattern(off ^ 0xabc, 16384));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(at, 16384)]),
                    durable: false,
                });
            }
            // And reads spanning allocated and unallocated clusters.
            for i in 0..4u64 {
                ops.push(EngineOp::Read {
                    offset: i * 4 * 65536 + 32768,
                    bufs: buffers(
                        &mem,
                        &[
                            (2 * MIB + i * 262144, 4096),
                            (2 * MIB + i * 262144 + 4096, 126976),
                        ],
                    ),
                });
            }
            let results = run(&mut e, ops);
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            assert_eq!((e.planned, e.synchronous), (20, 0), "everything planned");
            // Read everything back through the engine, a cluster at a time.
            let mut got = Vec::new();
            for i in 0..16u64 {
                let r = run(
                    &mut e,
                    vec![EngineOp::Read {
                        offset: i * 65536,
                        bufs: buffers(&mem, &[(3 * MIB, 65536)]),
                    }],
                );
                assert!(r[0].is_ok(), "{r:?}");
                got.extend(get(&mem, 3 * MIB, 65536));
            }
            let flush = run(&mut e, vec![EngineOp::Flush]);
            assert!(flush[0].is_ok());
            drop(e);
            img.close().unwrap();
            drop(img);
            assert_qemu_img_check(&path, false);
            let want = oracle(&path, dir.path());
            assert_eq!(got, want[..16 * 65536], "direct={direct}");
            // The concurrent reads saw the data of the first writes or of the overwrites:
            // check the parts the overwrites did not touch.
            for i in 0..8u64 {
                let off = (i * 2 * 65536) as usize;
                assert_eq!(&want[off..off + 8192], &pattern(off as u64, 8192)[..]);
                assert_eq!(
                    &want[off + 8192..off + 24576],
                    &pattern((off as u64 + 8192) ^ 0xabc, 16384)[..]
                );
            }
        }
    }

    fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
        let mut c = std::process::Command::new("qemu-io");
        c.args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c
            .arg(path)
            .output()
            .expect("qemu-io (qemu-utils) is needed");
        assert!(out.status.success(), "qemu-io {cmds:?}: {out:?}");
    }

    /// Reads the whole disk through the engine in 96 KiB requests at 32 KiB offsets (so they
    /// straddle clusters and subclusters), two guest pieces each, all in flight at once.
    fn read_all(e: &mut Qcow2Ring, size: u64) -> Vec<u8> {
        let mem = memory((size + (1 << 20)) as usize);
        let chunk = 96 * 1024;
        let mut ops = Vec::new();
        let mut off = 0;
        while off < size {
            let len = chunk.min(size - off);
            let first = (len / 2) & !511;
            ops.push(EngineOp::Read {
                offset: off,
                bufs: buffers(
                    &mem,
                    &[(off, first as usize), (off + first, (len - first) as usize)],
                ),
            });
            off += len;
        }
        let results = run(e, ops);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        get(&mem, 0, size as usize)
    }

    /// Every kind of mapping a plan covers (data, zero clusters and subclusters, unallocated
    /// over a raw backing file, past the backing file's end, through a qcow2 backing image
    /// over that, compressed clusters in the image or a backing image), with and without
    /// extended L2, reads through the ring as the oracle reads it, with no synchronous path.
    #[test]
    fn every_mapping_reads_like_the_oracle() {
        for extended in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.raw");
            // 2.5 MiB of backing under a 4 MiB disk.
            std::fs::write(&base, pattern(0x77, 5 << 19)).unwrap();
            let img = dir.path().join("img.qcow2");
            let opts = format!(
                "cluster_size=65536,extended_l2={},backing_file={},backing_fmt=raw",
                if extended { "on" } else { "off" },
                base.display()
            );
            qemu_img_create(&img, &opts, "4M");
            qemu_io(
                &img,
                "qcow2",
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 70k 4k",
                    "write -z 128k 64k",
                    "write -z 200k 2k",
                    "write -P 0x33 2560k 100k",
                    "write -P 0x44 3m 8k",
                ],
            );
            let want = oracle(&img, dir.path());
            let q = open(&img, false);
            let mut e = engine(&q);
            let got = read_all(&mut e, 4 * MIB);
            assert!(
                got == want,
                "extended={extended}: reads differ from the oracle"
            );
            assert_eq!(e.synchronous, 0, "all planned");
            drop(e);
            drop(q);

            // An overlay over this image (over the raw file): planned through the chain.
            let top = dir.path().join("top.qcow2");
            let opts = format!("backing_file={},backing_fmt=qcow2", img.display());
            qemu_img_create(&top, &opts, "4M");
            qemu_io(&top, "qcow2", &["write -P 0x66 1m 64k", "write -z 2m 4k"]);
            let q = open(&top, false);
            let mut e = engine(&q);
            let got = read_all(&mut e, 4 * MIB);
            assert!(
                got == oracle(&top, dir.path()),
                "extended={extended}: chain reads differ"
            );
            assert_eq!(e.synchronous, 0, "chain reads planned");
            drop(e);
            drop(q);

            // Compressed clusters (zlib, and zstd with extended L2), in the image or in its
            // backing image, buffered and O_DIRECT: read and inflated in the ring too.
            let comp = dir.path().join("comp.qcow2");
            let kind = if extended { "zstd" } else { "zlib" };
            qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={kind}"),
                img.to_str().unwrap(),
                comp.to_str().unwrap(),
            ]);
            let over = dir.path().join("over.qcow2");
            let opts = format!("backing_file={},backing_fmt=qcow2", comp.display());
            qemu_img_create(&over, &opts, "4M");
            qemu_io(&over, "qcow2", &["write -P 0x55 1m 64k"]);
            for (path, name) in [(&comp, "compressed"), (&over, "over compressed")] {
                for direct in [false, true] {
                    let q = open(path, direct);
                    let mut e = engine(&q);
                    let got = read_all(&mut e, 4 * MIB);
                    assert!(
                        got == oracle(path, dir.path()),
                        "{name} {kind} direct={direct}: reads differ"
                    );
                    assert_eq!(e.synchronous, 0, "{name}: planned");
                }
            }
        }
    }

    /// Allocating writes run in the ring too: several 4 KiB writes into the same unallocated
    /// cluster at once (the later ones wait for the first one's reservation, then write in
    /// place), writes into fresh clusters, and into clusters reused after a discard (which
    /// held other data: the rest of the cluster must read as zeros, not as the old data).
    /// Partial writes into clusters the image leaves to its backing chain (a qcow2 image
    /// over a raw file, or the same flattened with every cluster compressed), all in flight
    /// at once: over data of either layer, past the end of
    /// the chain, two into one cluster, one over a whole cluster, one across two clusters.
    /// Each copy-on-write reads the backing bytes around the request in the ring, writes the
    /// cluster and publishes it; none takes the synchronous path. The disk reads as the
    /// writes over the chain, buffered and O_DIRECT, and the image checks clean.
    #[test]
    fn copies_on_write_run_in_the_ring() {
        for (direct, packed) in [(false, false), (true, false), (false, true), (true, true)] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.raw");
            std::fs::write(&base, pattern(0x5a, 3 << 20)).unwrap();
            let mid = dir.path().join("mid.qcow2");
            let opts = format!("backing_file={},backing_fmt=raw", base.display());
            qemu_img_create(&mid, &opts, "4M");
            qemu_io(
                &mid,
                "qcow2",
                &["write -P 0x21 0 256k", "write -z 320k 64k"],
            );
            let mid = if packed {
                // The same bytes, every cluster compressed (zstd), no backing file.
                let c = dir.path().join("packed.qcow2");
                let (m, c_) = (mid.to_str().unwrap(), c.to_str().unwrap());
                let o = ["-o", "compression_type=zstd"];
                qemu_img(&["convert", "-c", "-O", "qcow2", o[0], o[1], m, c_]);
                c
            } else {
                mid
            };
            let top = dir.path().join("top.qcow2");
            let opts = format!(
                "cluster_size=65536,backing_file={},backing_fmt=qcow2",
                mid.display()
            );
            qemu_img_create(&top, &opts, "4M");
            let mut want = oracle(&top, dir.path());
            let img = open(&top, direct);
            let mut e = engine(&img);
            let mem = memory(4 << 20);
            let writes: [(u64, usize); 8] = [
                (4096, 4096),                // over the qcow2 layer
                (65536 + 512, 1024),         // the same, unaligned in the cluster
                (330 * 1024, 4096),          // a zero cluster of the middle image
                (MIB + 8192, 8192),          // over the raw layer
                (MIB + 40960, 4096),         // the same cluster again
                (2 * MIB, 65536),            // a whole cluster
                (3 * MIB - 4096, 8192),      // across two clusters and the raw file's end
                (3 * MIB + 65536 + 100, 50), // past the end of the chain
            ];
            let mut ops = Vec::new();
            for (k, &(off, len)) in writes.iter().enumerate() {
                let addr = k as u64 * 65536;
                let data = pattern(off ^ 0xc0, len);
                put(&mem, addr, &data);
                want[off as usize..off as usize + len].copy_from_slice(&data);
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(addr, len)]),
                    durable: false,
                });
            }
            // Under --direct the chain's data files are read with O_DIRECT too.
            for f in &e.backing {
                // SAFETY: F_GETFL on an open descriptor reads its flags.
                let flags = unsafe { libc::fcntl(f.fd(), libc::F_GETFL) };
                assert_eq!(
                    flags & libc::O_DIRECT != 0,
                    direct,
                    "backing layer O_DIRECT"
                );
            }
            let r = run(&mut e, ops);
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            assert_eq!(
                e.synchronous, 0,
                "direct={direct} packed={packed}: no synchronous path"
            );
            assert_eq!(e.reserved, 0);
            let got = read_all(&mut e, 4 * MIB);
            assert!(got == want, "direct={direct} packed={packed}: reads differ");
            let r = run(&mut e, vec![EngineOp::Flush]);
            assert!(r[0].is_ok());
            drop(e);
            img.close().unwrap();
            drop(img);
            assert_qemu_img_check(&top, false);
            assert!(
                oracle(&top, dir.path()) == want,
                "direct={direct} packed={packed}: the oracle differs"
            );
        }
    }

    /// An engine dropped with allocating writes and copies-on-write in its ring (a queue
    /// that stopped without them) lets them end first: no entry stays reserved, so the
    /// image's close (whose flush waits for reserved entries) returns, and the image checks
    /// clean with every write in it.
    #[test]
    fn an_engine_dropped_with_writes_in_flight_finishes_them() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, pattern(0x3c, 2 << 20)).unwrap();
        let path = dir.path().join("img.qcow2");
        let opts = format!("backing_file={},backing_fmt=raw", base.display());
        qemu_img_create(&path, &opts, "4M");
        let mut want = oracle(&path, dir.path());
        let img = Arc::new(open(&path, false));
        let mut e = engine(&img);
        let mem = memory(1 << 20);
        // One write completed first: its table has a change to write back, so the close's
        // flush reads every entry of it.
        let first = 3 << 20;
        let data = pattern(first, 4096);
        put(&mem, 64 << 10, &data);
        want[first as usize..first as usize + 4096].copy_from_slice(&data);
        let r = run(
            &mut e,
            vec![EngineOp::Write {
                offset: first,
                bufs: buffers(&mem, &[(64 << 10, 4096)]),
                durable: false,
            }],
        );
        assert!(r[0].is_ok());
        for k in 0..8u64 {
            // Over the backing file (copy-on-write) and past its end (zeros around).
            let off = k * (512 << 10) + 4096;
            let data = pattern(off, 4096);
            put(&mem, k * 4096, &data);
            want[off as usize..off as usize + 4096].copy_from_slice(&data);
            let bufs = buffers(&mem, &[(k * 4096, 4096)]);
            e.submit(
                k as u16,
                EngineOp::Write {
                    offset: off,
                    bufs,
                    durable: false,
                },
            );
        }
        e.submit_queued();
        assert!(e.reserved > 0, "writes in flight");
        let (tx, rx) = std::sync::mpsc::channel();
        let closing = img.clone();
        std::thread::spawn(move || {
            drop(e);
            tx.send(closing.close().map_err(|e| e.to_string())).unwrap();
        });
        let closed = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert!(
            matches!(closed, Ok(Ok(()))),
            "close after the drop: {closed:?}"
        );
        drop(img);
        assert_qemu_img_check(&path, false);
        assert!(
            oracle(&path, dir.path()) == want,
            "the writes are in the image"
        );
    }

    /// A guest reading a compressed image in order, 4 KiB at a time (one request after the
    /// other, as a boot does): each cluster is read and inflated once, the rest of its reads
    /// are served from the inflated copy, and all read what the oracle reads.
    #[test]
    fn reads_in_order_inflate_each_compressed_cluster_once() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        std::fs::write(&raw, pattern(0x42, 1 << 20)).unwrap();
        let path = dir.path().join("packed.qcow2");
        let (r, p) = (raw.to_str().unwrap(), path.to_str().unwrap());
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", r, p]);
        let want = std::fs::read(&raw).unwrap();
        let img = open(&path, false);
        let mut e = engine(&img);
        let mem = memory(1 << 20);
        for k in 0..256u64 {
            let op = EngineOp::Read {
                offset: k * 4096,
                bufs: buffers(&mem, &[(k * 4096, 4096)]),
            };
            assert!(run(&mut e, vec![op])[0].is_ok());
        }
        assert!(get(&mem, 0, 1 << 20) == want, "reads differ");
        assert_eq!((e.inflations, e.inflated_hits), (16, 240));
        assert_eq!(e.synchronous, 0);
    }

    /// A compressed cluster whose stored bytes are garbage fails its read (an I/O error for
    /// the guest), not the engine: the other reads of the same batch return the right data.
    #[test]
    fn a_corrupt_compressed_cluster_fails_only_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        std::fs::write(&raw, pattern(0x99, 4 << 20)).unwrap();
        let path = dir.path().join("packed.qcow2");
        let (r, p) = (raw.to_str().unwrap(), path.to_str().unwrap());
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", r, p]);
        let want = std::fs::read(&raw).unwrap();
        // The stored bytes of the last 32 clusters become garbage (0xff is no valid start of
        // a deflate stream).
        let img = open(&path, false);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        for k in 32..64u64 {
            let s = &img.shared;
            let (i, j, _) = s.locate(GuestOffset(k * 65536));
            let entry = s.try_load_entry(&s.table(i).unwrap(), j).unwrap();
            let Ok(l2::Mapping::Compressed { offset, .. }) = s.decode(entry.word) else {
                panic!("cluster {k} is not compressed");
            };
            f.write_all_at(&[0xff; 16], offset).unwrap();
        }
        drop(f);
        let mut e = engine(&img);
        let mem = memory(4 << 20);
        let ops = (0..64u64)
            .map(|k| EngineOp::Read {
                offset: k * 65536,
                bufs: buffers(&mem, &[(k * 65536, 65536)]),
            })
            .collect();
        let r = run(&mut e, ops);
        let failed: Vec<usize> = (0..64).filter(|&k| r[k].is_err()).collect();
        assert_eq!(
            failed,
            (32..64).collect::<Vec<_>>(),
            "the corrupt clusters fail"
        );
        for (k, res) in r.iter().enumerate() {
            match res {
                Ok(()) => assert!(
                    get(&mem, k as u64 * 65536, 65536)[..] == want[k * 65536..(k + 1) * 65536],
                    "cluster {k} reads wrong"
                ),
                Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}"),
            }
        }
        assert_eq!(e.synchronous, 0);
    }

    /// A discard (synchronous path) behind a read whose L2 table this engine is loading in
    /// the ring: the discard waits for the load instead of waiting forever on the table's
    /// loading marker, which only this worker could clear.
    #[test]
    fn a_discard_behind_a_table_load_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, "cluster_size=65536", "8G");
        let at = 512 * MIB + 65536;
        qemu_io(&path, "qcow2", &[&format!("write -P 7 {at} 64k")]);
        let img = Arc::new(open(&path, false));
        img.set_cache_bytes(4 * 65536);
        drop_from_page_cache(&path);
        let mut e = engine(&img);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = memory(MIB as usize);
            let read = EngineOp::Read {
                offset: at,
                bufs: buffers(&mem, &[(0, 4096)]),
            };
            let discard = EngineOp::Discard {
                segs: vec![(at, 65536)],
                durable: false,
            };
            let r = run(&mut e, vec![read, discard]);
            let ok = r.iter().all(|r| r.is_ok());
            tx.send((ok, e.ring_loads)).unwrap();
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(30));
        let Ok((ok, ring_loads)) = got else {
            panic!("the queue hung: {got:?}");
        };
        assert!(ok, "both requests succeed");
        assert!(ring_loads >= 1, "the table was loaded in the ring");
    }

    #[test]
    fn allocating_writes_run_in_the_ring_and_never_expose_old_data() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img.qcow2");
            qemu_img_create(&path, "cluster_size=65536", "8M");
            // Old data in guest clusters 8..12, then discarded: their host clusters go back
            // to the allocator at the next flush.
            qemu_io(&path, "qcow2", &["write -P 0xaa 512k 256k"]);
            let len_before = std::fs::metadata(&path).unwrap().len();
            let img = open(&path, direct);
            let mut e = engine(&img);
            let discard = EngineOp::Discard {
                segs: vec![(512 * 1024, 256 * 1024)],
                durable: false,
            };
            let r = run(&mut e, vec![discard, EngineOp::Flush]);
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            let (planned, synchronous) = (e.planned, e.synchronous);
            let mem = memory(4 << 20);
            let mut ops = Vec::new();
            // Four writes into guest cluster 0, four into cluster 20..23 each (one per
            // cluster), all at once.
            for k in 0..4u64 {
                let off = k * 8192 + 4096;
                put(&mem, k * 4096, &pattern(off, 4096));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(k * 4096, 4096)]),
                    durable: false,
                });
            }
            for k in 0..4u64 {
                let off = (20 + k) * 65536 + 12288;
                put(&mem, MIB + k * 4096, &pattern(off, 4096));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(MIB + k * 4096, 4096)]),
                    durable: false,
                });
            }
            let r = run(&mut e, ops);
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            assert_eq!(
                e.synchronous, synchronous,
                "no write took the synchronous path"
            );
            assert_eq!(e.planned - planned, 8);
            assert_eq!(e.reserved, 0);
            let r = run(&mut e, vec![EngineOp::Flush]);
            assert!(r[0].is_ok());
            drop(e);
            img.close().unwrap();
            drop(img);
            assert_qemu_img_check(&path, false);
            let disk = oracle(&path, dir.path());
            let mut want = vec![0u8; 8 << 20];
            for k in 0..4u64 {
                let off = (k * 8192 + 4096) as usize;
                want[off..off + 4096].copy_from_slice(&pattern(off as u64, 4096));
                let off = ((20 + k) * 65536 + 12288) as usize;
                want[off..off + 4096].copy_from_slice(&pattern(off as u64, 4096));
            }
            assert!(
                disk == want,
                "direct={direct}: disk differs (old data exposed?)"
            );
            // The four discarded clusters were reused: of the five allocated, only one grew
            // the file.
            let len_after = std::fs::metadata(&path).unwrap().len();
            assert!(
                len_after <= len_before + 65536,
                "file grew from {len_before} to {len_after}: freed clusters not reused"
            );
        }
    }

    /// Writes 256 MiB (1 MiB requests of `pattern(0, ..)`) through `e`, then submits a read
    /// of that data (tag 1), a flush (tag 0) and 7 more reads (tags 2..=8). Returns the guest
    /// memory.
    fn write_then_flush_and_read(e: &mut Qcow2Ring) -> Arc<GuestMem> {
        let mem = memory(4 * MIB as usize);
        put(&mem, 0, &pattern(0, MIB as usize));
        let writes = (0..256u64)
            .map(|k| EngineOp::Write {
                offset: k * MIB,
                bufs: buffers(&mem, &[(0, MIB as usize)]),
                durable: false,
            })
            .collect();
        assert!(run(e, writes).iter().all(|r| r.is_ok()));
        assert_eq!(e.synchronous, 0, "the writes ran in the ring");
        let read = |k: u64| EngineOp::Read {
            offset: k * 7 * MIB,
            bufs: buffers(&mem, &[(MIB + k * 4096, 4096)]),
        };
        // A read in flight first: an idle queue flushes on the worker (nothing to hold back).
        e.submit(1, read(1));
        e.submit(0, EngineOp::Flush);
        for k in 2..=8u64 {
            e.submit(k as u16, read(k));
        }
        mem
    }

    /// Reaps until `n` requests completed, all successfully; returns their tags in the
    /// order they completed.
    fn completion_order(e: &mut Qcow2Ring, n: usize) -> Vec<u16> {
        let mut order = Vec::new();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while order.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "engine did not finish"
            );
            e.reap(&mut out);
            for (tag, r) in out.drain(..) {
                assert!(r.is_ok(), "request {tag}: {r:?}");
                order.push(tag);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        order
    }

    /// The reads of [`write_then_flush_and_read`] returned the data written.
    fn check_reads(mem: &GuestMem) {
        for k in 1..=8u64 {
            let got = get(mem, MIB + k * 4096, 4096);
            assert_eq!(got, pattern(0, MIB as usize)[..4096], "read {k}");
        }
    }

    /// A flush with no metadata to write back syncs the data in the ring, and the queue's
    /// requests behind it go on meanwhile: with 256 MiB of overwrites dirty in the page
    /// cache (on a disk file system, so the sync has real work), reads submitted after the
    /// flush complete before it. Synchronously, the flush would complete first.
    #[test]
    fn a_flush_with_clean_metadata_does_not_hold_back_reads() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img.qcow2");
        qemu_img_create(&path, "cluster_size=65536,preallocation=metadata", "256M");
        let img = open(&path, false);
        let mut e = engine(&img);
        let mem = write_then_flush_and_read(&mut e);
        let order = completion_order(&mut e, 9);
        assert_eq!(order.last(), Some(&0), "completion order {order:?}");
        assert_eq!(e.synchronous, 0, "no flush on the worker");
        assert_eq!(e.ring_flushes, 1, "the flush synced in the ring");
        check_reads(&mem);
        drop(e);
        img.close().unwrap();
        drop(img);
        assert_qemu_img_check(&path, false);
    }

    /// Syncs `path` and drops its pages from the host page cache.
    fn drop_from_page_cache(path: &Path) {
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: fadvise on a descriptor we own; it touches no memory of ours.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
    }

    /// L2 tables not in memory are loaded without blocking the queue: 16 reads, each needing
    /// another table (not in the page cache) of an 8 GiB image whose cache holds 4, start 16
    /// table loads (in the ring, or from the page cache) and no synchronous work; then writes (overwrites and
    /// allocations) into tables evicted meanwhile, loaded again from the page cache.
    /// Everything reads back as qemu-io has it, and the image stays clean.
    #[test]
    fn missing_l2_tables_load_in_the_ring() {
        const GIB: u64 = 1 << 30;
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img.qcow2");
            qemu_img_create(&path, "cluster_size=65536", "8G");
            // One table maps 512 MiB: data in each of the 16.
            let cmds: Vec<String> = (0..16u64)
                .map(|k| format!("write -P {} {} 64k", k + 1, k * 512 * MIB + 65536))
                .collect();
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&path, "qcow2", &cmds);
            let img = open(&path, direct);
            img.set_cache_bytes(4 * 65536);
            // After the open, whose reads bring neighbouring tables in with readahead.
            drop_from_page_cache(&path);
            let mut e = engine(&img);
            let mem = memory(4 * MIB as usize);
            let reads = |k: u64| EngineOp::Read {
                offset: k * 512 * MIB + 65536 + 4096,
                bufs: buffers(&mem, &[(k * 8192, 8192)]),
            };
            for k in 0..16u64 {
                e.submit(k as u16, reads(k));
            }
            // Each table loaded once by the engine, none on the worker. Most loads go to the
            // ring; a table the kernel's readahead (for an earlier load) brought into the page
            // cache is copied from there instead, so only the first load is sure to.
            assert_eq!(e.table_loads, 16, "a load per table");
            assert!(e.ring_loads >= 1, "loads in the ring");
            assert_eq!(e.in_flight(), 16);
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while out.len() < 16 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "engine did not finish"
                );
                e.reap(&mut out);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
            for k in 0..16u64 {
                assert_eq!(
                    get(&mem, k * 8192, 8192),
                    vec![k as u8 + 1; 8192],
                    "read {k}"
                );
            }
            assert_eq!(e.synchronous, 0);
            // Overwrites and allocations into tables mostly evicted by now.
            let mut ops = Vec::new();
            for k in 0..16u64 {
                put(&mem, MIB + k * 4096, &[0x40 + k as u8; 4096]);
                ops.push(EngineOp::Write {
                    offset: k * 512 * MIB + 65536 + if k % 2 == 0 { 0 } else { GIB / 8 },
                    bufs: buffers(&mem, &[(MIB + k * 4096, 4096)]),
                    durable: false,
                });
            }
            assert!(run(&mut e, ops).iter().all(|r| r.is_ok()));
            assert!(e.table_loads > 16, "evicted tables loaded again");
            assert!(run(&mut e, vec![EngineOp::Flush])[0].is_ok());
            drop(e);
            img.close().unwrap();
            drop(img);
            assert_qemu_img_check(&path, false);
            let checks: Vec<String> = (0..16u64)
                .map(|k| {
                    let at = k * 512 * MIB + 65536 + if k % 2 == 0 { 0 } else { GIB / 8 };
                    format!("read -P {} {at} 4k", 0x40 + k)
                })
                .collect();
            let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
            qemu_io(&path, "qcow2", &checks);
        }
    }
}

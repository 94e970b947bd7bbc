//! qcow2 images.
//!
//! # Concurrency
//!
//! All queues share one [`Qcow2Shared`]; nothing on the read, overwrite or allocation path
//! takes a lock that all queues contend on:
//!
//! - The active L1 table is a `Vec<AtomicU64>`; it only changes during flush (which gives
//!   dirty L2 tables their host cluster), open-time repair and online resize. Its length
//!   is fixed at open with room to grow (`MIN_L1_CAPACITY`), so a resize only raises the
//!   atomic count of entries in use and never moves memory a request may be reading.
//! - L2 tables live in a bounded cache: one `ArcSwap<L2Table>` slot per L1 entry, read with
//!   a guard that touches no shared reference count. A table in memory is authoritative
//!   and written back at flush. Loading first claims the slot with a "loading" marker, so
//!   only a table that is not in memory is ever read from the image. Past the budget
//!   ([`Qcow2Image::set_cache_bytes`]) a second-chance clock evicts tables that are clean,
//!   not being written by a flush and not pinned; whoever modifies entries pins the table
//!   first (one atomic state word, see `l2::L2Table`), so an in-memory change can never
//!   be dropped. A thread still holding an evicted table only reads it (its contents equal
//!   the image's) or, failing to pin it, looks the slot up again. When dirty tables keep
//!   the cache over budget, the loading thread writes them back with a flush if none is
//!   running.
//! - Allocating a guest cluster (or copying it on write) CASes its L2 entry from the observed
//!   value to `l2::RESERVED`. The winner writes the new cluster (old contents merged with
//!   the new data; for a fresh cluster past the end of the file whose old contents read as
//!   zeros, only the request's bytes) and then stores the final entry with Release
//!   ordering; anyone seeing `RESERVED` yields until it is final. So a cluster is never
//!   allocated twice and no entry points at unwritten data.
//! - Extended L2 entries (32 subclusters per cluster, a bitmap word after each entry word):
//!   a write to an unallocated or exclusively owned (COPIED, uncompressed) cluster writes
//!   only the subclusters it touches, at a fresh host cluster or in place. A partly
//!   touched subcluster that was not allocated is completed from its old contents
//!   (backing file or zeros) at subcluster granularity; the touched subclusters' allocation
//!   bits are set and their zero bits cleared, the others keep their state. Shared or
//!   compressed clusters are copied whole (all subclusters allocated). Write-zeroes sets
//!   the zero bits of the whole subclusters in its range. Changing only the bitmap also
//!   reserves the entry word, which then returns to its old value; so after reserving, a
//!   writer rereads the bitmap instead of trusting the pair it saw before. A write whose
//!   subclusters are all allocated is an in-place overwrite.
//! - On the read and in-place overwrite paths nothing shared is written: the L2 lookup, the
//!   overlap check (`alloc::Clusters::is_meta`) and the cache's use bit (written only when
//!   the clock hand has cleared it) are loads.
//! - Host cluster accounting (refcounts, free bitmap, metadata bitmap) is in
//!   `alloc::Clusters`: atomics in fixed-size segments reached through a preallocated
//!   array of `OnceLock`s, so lookups are lock-free and growing never blocks readers.
//!
//! # Rules
//!
//! The rules this module keeps (crash safety and the dirty bit, the mapping journal, writes
//! completing in any order, reuse of freed clusters, overlap protection, hostile images) are
//! written once, in docs/ARCHITECTURE.md, section "qcow2"; each file's doc names the part it
//! implements.

mod alloc;
mod bitmap;
mod cache;
mod compress;
mod flush;
pub mod header;
mod holes;
mod io;
pub mod journal;
mod l2;
mod open;
mod plan;
mod read;
mod rebuild;
mod reclaim;
mod refcount;
mod replay;
mod resize;
mod ring;
#[cfg(test)]
mod testing;
mod write;
mod zero;

use std::fs::{File, OpenOptions};
use std::io as stdio;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use log::{debug, error, info, warn};
use vm_memory::VolatileSlice;

use self::alloc::{Clusters, HostCluster};
use self::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use self::l2::{BadEntry, Entry, L1Entry, L2Entry, L2Table, Mapping, SubclusterBitmap};
use super::engine::{Aio, IoEngine, SyncEngine};
use super::lock::{self, Role};
use super::options::ImageOptions;
use super::storage::{HostFile, Recorder};
use super::{BlockImage, GuestSlice, ImageQueue, ImageStats};
use crate::error::{Error, Result};
use crate::sync::lock;

/// Most host clusters a writable image may have (refcounts are kept in memory, 8 bytes per
/// cluster: 2 GiB at this limit, which is 16 TiB of 64 KiB clusters).
const MAX_HOST_CLUSTERS: u64 = 1 << 28;

/// The durability point of a flush's guest data sync (a power-loss mutation name).
const DATA_SYNC_POINT: &str = "qcow2.flush.data";

/// Default budget of the in-memory L2 table cache: 32 MiB (512 tables of 64 KiB, which map
/// 256 GiB of guest space).
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

/// Fewest L2 tables the cache keeps, whatever the budget.
const MIN_CACHE_TABLES: usize = 4;

/// L2 tables that fit in `bytes` (one table takes one cluster in memory).
fn cache_tables_for(bytes: u64, cluster_bits: u32) -> usize {
    usize::try_from(bytes >> cluster_bits)
        .unwrap_or(usize::MAX)
        .max(MIN_CACHE_TABLES)
}

/// Deepest backing chain we follow.
const MAX_BACKING_DEPTH: u32 = 16;

/// L1 entries reserved in memory at open beyond the image's own L1 size, so that online
/// resize can grow the L1 table without reallocating the slot arrays that requests read
/// lock-free (16 bytes per entry: 1 MiB; 32 TiB of guest disk with 64 KiB clusters).
const MIN_L1_CAPACITY: usize = 1 << 16;

/// Header offset of the virtual size; `l1_size` (4 bytes) follows the 4-byte crypt method
/// at 32, then `l1_table_offset` (8 bytes) at 40.
const OFF_SIZE: u64 = 24;

/// A byte offset in the guest's virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuestOffset(pub u64);

fn corrupt(msg: impl std::fmt::Display) -> stdio::Error {
    stdio::Error::new(
        stdio::ErrorKind::InvalidData,
        format!("qcow2 metadata corrupt: {msg}"),
    )
}

/// Per-queue scratch buffers.
#[derive(Default)]
struct Scratch {
    cluster: Vec<u8>,
    comp_in: Vec<u8>,
    comp_out: Vec<u8>,
}

/// The image below a qcow2 image.
enum Backing {
    Raw { file: HostFile, size: u64 },
    Qcow2(Arc<Qcow2Shared>),
}

impl Backing {
    fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(s) => s.size.load(Ordering::Acquire),
        }
    }

    /// Reads guest bytes `[off, off + len)` into request bytes `[pos, pos + len)`.
    fn read(
        &self,
        scratch: &mut Scratch,
        off: u64,
        len: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let size = self.size();
        let have = if off >= size { 0 } else { len.min(size - off) };
        if have > 0 {
            match self {
                Backing::Raw { file, .. } => {
                    io::for_each_piece(bufs, pos, have, |p, pp| file.read_slice(off + pp, &p))?
                }
                Backing::Qcow2(s) => s.read_range(s.data_io(), scratch, off, have, bufs, pos)?,
            }
        }
        if have < len {
            io::zero_pieces(bufs, pos + have, len - have)?;
        }
        Ok(())
    }
}

/// State changed only under the flush lock.
struct MetaState {
    /// Active L1 table offset and the clusters allocated to it.
    l1_offset: u64,
    l1_clusters: u64,
    /// Refcount table offset, clusters and entries.
    rt_offset: u64,
    rt_clusters: u32,
    rt: Vec<u64>,
    /// Current incompatible / autoclear feature bits as on disk.
    incompatible: u64,
    autoclear: u64,
    /// `rt` changed in memory and is not yet written (survives a failed flush, so the retry
    /// writes it even though nothing changes in it then).
    rt_dirty: bool,
    /// The refcount table moved and the header does not point at it yet.
    rt_moved: bool,
    /// Reused buffers for encoding refcount blocks at flush (values, then bytes).
    rc_values: Vec<u64>,
    rc_bytes: Vec<u8>,
}

/// State of a qcow2 image shared by all its queues.
pub struct Qcow2Shared {
    /// The open-time free clusters being checked in the background (holes.rs).
    holes: Arc<holes::HoleCheck>,
    path: PathBuf,
    file: HostFile,
    hdr: Header,
    cluster_bits: u32,
    /// Virtual disk size; grows (under `state`) on online resize.
    size: AtomicU64,
    read_only: bool,
    extended: bool,
    /// Words per guest cluster in an L2 table (1, or 2 with extended L2).
    words: usize,
    /// The active L1 table: `l1_len` entries in use, the rest (reserved capacity for online
    /// resize, see [`MIN_L1_CAPACITY`]) zero.
    l1: Vec<AtomicU64>,
    /// L1 entries in use (the on-disk `l1_size`); grows under `state`.
    l1_len: AtomicUsize,
    /// L2 table cache: one slot per L1 entry, holding the table or [`Qcow2Shared::absent`].
    l2: Vec<ArcSwap<L2Table>>,
    /// The placeholder in slots whose table is not in memory.
    absent: Arc<L2Table>,
    /// Most L2 tables kept in memory (a soft limit: pinned and dirty tables stay).
    cache_tables: AtomicUsize,
    /// L2 tables in memory.
    loaded: AtomicUsize,
    /// Clock hand of the eviction scan (a slot index).
    hand: AtomicUsize,
    /// Bit per L1 index: the table was checked when first loaded; an evicted table is
    /// reloaded from what we wrote (or checked) ourselves, so reloads skip the check.
    checked: Box<[AtomicU64]>,
    /// Host cluster accounting; `None` when read-only.
    clusters: Option<Clusters>,
    /// Clusters of the file at open (a partial last cluster counts): on-disk L2 entries
    /// must not reference clusters at or past this.
    file_clusters: u64,
    backing: Option<Backing>,
    /// External data file (`data_file` incompatible feature): guest data lives there at
    /// the host offsets the L2 entries give (QEMU maps them 1:1 to guest offsets) and is
    /// not refcounted; the image file holds metadata only.
    data_file: Option<HostFile>,
    /// `data_file_raw` (autoclear bit 1): the data file must stay a valid raw image of the
    /// disk at all times (every entry mapped 1:1, zeroes and discards done in the file).
    data_raw: bool,
    /// Persistent dirty bitmaps (the top image only).
    bitmaps: Option<bitmap::Bitmaps>,
    state: Mutex<MetaState>,
    /// The dirty bit is set on disk (or the image is v2, which has none: then always true).
    dirty_on_disk: AtomicBool,
    /// Metadata changed in memory since the last flush.
    meta_dirty: AtomicBool,
    /// The L1 table changed in memory since the last flush.
    l1_dirty: AtomicBool,
    /// Overlap protection tripped: refuse all further writes.
    corrupt: AtomicBool,
    /// Host clusters to unreference once the next flush has made their unmapping durable.
    pending: Mutex<Vec<HostCluster>>,
    /// Request epoch: bumped each time a flush drops clusters to refcount zero.
    epoch: AtomicU64,
    /// One slot per queue handle: the epoch at which its current request started, 0 when
    /// idle (see "Reuse" in the module documentation).
    slots: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
    /// Clusters at refcount zero, tagged with the epoch they were freed in, that requests
    /// in flight since before then may still access: not yet in the free bitmap.
    deferred: Mutex<Vec<(u64, HostCluster)>>,
    /// The mapping journal (writable top-level images; see journal.rs). Without one, a
    /// writable image writes its metadata back before completing any request that changed a
    /// mapping (`Qcow2Queue`), so a daemon crash still loses nothing completed.
    journal: Option<journal::Journal>,
    /// Without a journal: mapping changes published so far ([`Qcow2Shared::publish`]), and
    /// how many of them a completed flush has written back (a flush covers every change
    /// published before it started).
    published: AtomicU64,
    written_back: AtomicU64,
    /// Held for the whole of an online resize (resize.rs), which takes the flush lock only
    /// for its steps.
    resizing: Mutex<()>,
}

pub use super::options::JournalMode;

/// The default journal directory.
pub const DEFAULT_JOURNAL_DIR: &str = "/dev/shm";

fn be64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

impl Qcow2Shared {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.hdr.l2_entries()
    }

    fn clusters(&self) -> stdio::Result<&Clusters> {
        self.clusters
            .as_ref()
            .ok_or_else(|| stdio::Error::from_raw_os_error(libc::EROFS))
    }

    /// Decodes an L2 entry. With an external data file, host offset 0 is a real offset
    /// (marked by COPIED, as the spec allows only there).
    fn decode(&self, entry: L2Entry) -> std::result::Result<Mapping, BadEntry> {
        if self.data_file.is_some()
            && !entry.is_reserved()
            && !entry.is_compressed()
            && entry.host_offset() == 0
            && entry.is_copied()
        {
            return entry
                .with_copied(false)
                .decode(self.cluster_bits, self.extended)
                .map(|m| match m {
                    Mapping::Unallocated => Mapping::Data(0),
                    m => m,
                });
        }
        entry.decode(self.cluster_bits, self.extended)
    }

    /// Entry `i` of the L1 table in memory (Acquire: the table it names is written).
    #[inline]
    fn l1_entry(&self, i: usize) -> L1Entry {
        L1Entry(self.l1[i].load(Ordering::Acquire))
    }

    /// Sets entry `i` of the L1 table in memory (Release); written back by the next flush
    /// if the caller marks `l1_dirty`.
    fn set_l1_entry(&self, i: usize, e: L1Entry) {
        self.l1[i].store(e.0, Ordering::Release);
    }

    /// True if uncompressed `entry` maps a host cluster (with an external data file, offset
    /// 0 with COPIED counts).
    #[inline]
    fn has_host(&self, entry: L2Entry) -> bool {
        !entry.is_compressed()
            && (entry.host_offset() != 0 || (self.data_file.is_some() && entry.is_copied()))
    }

    /// The file guest data lives in: the external data file, or the image file.
    fn data_io(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Syncs guest data (the data file, if separate) before metadata that points at it.
    fn sync_guest_data(&self) -> stdio::Result<()> {
        match &self.data_file {
            Some(f) => f.sync_point(DATA_SYNC_POINT),
            None => self.file.sync_point(DATA_SYNC_POINT),
        }
    }

    /// Deallocates host bytes `[host, host + len)` of the external data file (best effort:
    /// file systems without hole punching keep the bytes; the entries no longer map them).
    fn punch_data(&self, host: u64, len: u64) {
        let Some(f) = &self.data_file else { return };
        if let Err(e) = f.punch_hole(host, len) {
            log::debug!(
                "{}: punching the data file at {host:#x}: {e}",
                self.path.display()
            );
        }
    }

    /// True if the guest cluster described by `entry` reads as zeros throughout.
    fn reads_as_zeros(&self, entry: Entry) -> bool {
        let Entry { word, bitmap } = entry;
        if word.is_compressed() || word.is_reserved() {
            return false;
        }
        if self.extended {
            !self.has_host(word)
                && bitmap.allocated() == 0
                && (self.backing.is_none() || bitmap.is_all_zero())
        } else {
            word.zero_flag() || (!self.has_host(word) && self.backing.is_none())
        }
    }
}

impl Drop for Qcow2Shared {
    fn drop(&mut self) {
        match self.close() {
            Ok(()) => {
                // Closed cleanly: the journal holds nothing the image lacks.
                if let Some(j) = &self.journal {
                    if j.pending() == 0 {
                        j.remove();
                    }
                }
            }
            Err(e) => error!(
                "{}: closing the qcow2 image failed: {e}",
                self.path.display()
            ),
        }
    }
}

/// A qcow2 image opened for serving.
pub struct Qcow2Image {
    shared: Arc<Qcow2Shared>,
    /// Which engine the queues get.
    aio: Aio,
    /// With `--direct`: a descriptor of the file guest data lives in opened with O_DIRECT
    /// (each queue's engine transfers guest data through a clone of it), and the buffer
    /// alignment it needs. Metadata stays buffered (see ring.rs).
    direct: Option<(HostFile, usize)>,
}

impl Qcow2Image {
    /// Opens the qcow2 image described by `opts`.
    pub fn open(opts: &ImageOptions) -> Result<Qcow2Image> {
        let shared = Qcow2Shared::open(
            &opts.path,
            opts.read_only,
            0,
            &opts.journal,
            opts.recorder.as_ref(),
        )?;
        let direct = if opts.direct {
            Some(open::open_direct(&shared, opts)?)
        } else {
            None
        };
        Ok(Qcow2Image {
            shared: Arc::new(shared),
            aio: opts.aio,
            direct,
        })
    }

    /// This queue's synchronous handle.
    fn queue(&self) -> stdio::Result<Qcow2Queue> {
        Ok(Qcow2Queue {
            file: self.shared.data_io().try_clone()?,
            slot: self.shared.register_slot(),
            shared: self.shared.clone(),
            scratch: Scratch::default(),
        })
    }

    /// Creates a new, empty version 3 qcow2 image of `size` bytes (64 KiB clusters, 16-bit
    /// refcounts). Fails if the file exists.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let cerr = |source| Error::CreateImage {
            path: path.to_owned(),
            source,
        };
        let cb = 16u32;
        let cs = 1u64 << cb;
        let l1_size = size.div_ceil(cs * (cs / 8));
        if l1_size * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidOption(format!(
                "qcow2 size {size} is too large"
            )));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let total = 3 + l1_clusters;
        let hdr = header::build_fresh(cb, size, l1_size as u32, 3 * cs, cs, 1);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(cerr)?;
        let mut rt = vec![0u8; cs as usize];
        rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
        let mut rb = vec![0u8; cs as usize];
        refcount::encode_block(&vec![1; total as usize], 4, &mut rb);
        file.write_all_at(&hdr, 0).map_err(cerr)?;
        file.write_all_at(&rt, cs).map_err(cerr)?;
        file.write_all_at(&rb, 2 * cs).map_err(cerr)?;
        file.set_len(total * cs).map_err(cerr)?;
        file.sync_all().map_err(cerr)
    }

    /// Sets the budget of the in-memory L2 table cache in bytes (default
    /// [`DEFAULT_CACHE_BYTES`]; at least 4 tables are kept). Clean tables beyond it are
    /// evicted (and re-read on next use); when dirty tables keep the cache over budget they
    /// are written back with a flush. Tables in use or not yet written may exceed it briefly.
    pub fn set_cache_bytes(&self, bytes: u64) {
        self.shared.set_cache_bytes(bytes);
    }

    /// The L2 cache budget in bytes (rounded to whole tables).
    pub fn cache_bytes(&self) -> u64 {
        (self.shared.cache_tables.load(Ordering::Relaxed) as u64) << self.shared.cluster_bits
    }

    /// Flushes all metadata and clears the dirty bit: call on clean shutdown. The image
    /// stays usable (the next metadata change sets the dirty bit again). Dropping the last
    /// reference to the image does the same, logging errors.
    pub fn close(&self) -> stdio::Result<()> {
        self.shared.close()
    }
}

impl BlockImage for Qcow2Image {
    fn virtual_size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> stdio::Result<()> {
        self.shared.resize(new_size)
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn discard_granularity(&self) -> u64 {
        self.shared.cluster_size()
    }

    fn queue_handle(&self) -> stdio::Result<Box<dyn ImageQueue>> {
        Ok(Box::new(self.queue()?))
    }

    fn engine(&self) -> stdio::Result<Box<dyn IoEngine>> {
        let sync = self.queue()?;
        let Some(ring) = self.aio.ring()? else {
            if self.direct.is_some() {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!("without io_uring, qcow2 guest data goes through the page cache")
                });
            }
            return Ok(Box::new(SyncEngine::new(Box::new(sync))));
        };
        let (data, align) = match &self.direct {
            Some((f, align)) => (f.try_clone()?, Some(*align)),
            None => (self.shared.data_io().try_clone()?, None),
        };
        let engine = ring::Qcow2Ring::new(self.shared.clone(), sync, data, align, ring)?;
        Ok(Box::new(engine))
    }

    fn flush(&self) -> stdio::Result<()> {
        self.shared.flush()
    }

    fn close(&self) -> stdio::Result<()> {
        self.shared.close()
    }

    fn bitmaps(&self) -> Vec<super::BitmapInfo> {
        let s = &self.shared;
        s.bitmaps
            .as_ref()
            .map(|b| b.info(s.size.load(Ordering::Acquire)))
            .unwrap_or_default()
    }

    fn clear_bitmap(&self, name: &str) -> stdio::Result<()> {
        let s = &self.shared;
        match &s.bitmaps {
            Some(b) if !s.read_only => b.clear(name),
            Some(_) => Err(stdio::Error::from_raw_os_error(libc::EROFS)),
            None => Err(stdio::Error::new(
                stdio::ErrorKind::NotFound,
                format!("no bitmap named '{name}'"),
            )),
        }
    }

    fn stats(&self) -> ImageStats {
        use std::os::unix::fs::MetadataExt;
        let s = &self.shared;
        let (allocated, data, free) = match s.clusters.as_ref() {
            Some(c) => {
                let (a, m, f) = c.usage();
                // With an external data file, guest data is not in the image's clusters.
                let data = s.data_file.is_none().then(|| (a - m) * s.cluster_size());
                (Some(a), data, Some(f))
            }
            None => (None, None, None),
        };
        let dirty =
            s.l2.iter()
                .take(s.l1_len.load(Ordering::Acquire))
                .filter(|t| t.load().is_dirty())
                .count() as u64;
        ImageStats {
            allocated_bytes: s.file.metadata().ok().map(|m| m.blocks() * 512),
            cluster_size: Some(s.cluster_size()),
            allocated_clusters: allocated,
            data_bytes: data,
            free_clusters: free,
            dirty_tables: Some(dirty),
        }
    }
}

/// One queue's handle on a qcow2 image.
struct Qcow2Queue {
    shared: Arc<Qcow2Shared>,
    /// This handle's own descriptor of the file guest data lives in (the external data
    /// file, or the image file).
    file: HostFile,
    scratch: Scratch,
    /// This handle's request slot (epoch its current request started at, 0 when idle).
    slot: Arc<AtomicU64>,
}

impl Qcow2Queue {
    /// Runs one request with the handle's slot published (see the reuse rule).
    fn request<T>(&mut self, f: impl FnOnce(&Qcow2Shared, &HostFile, &mut Scratch) -> T) -> T {
        self.shared.begin_request(&self.slot);
        let r = f(&self.shared, &self.file, &mut self.scratch);
        self.shared.end_request(&self.slot);
        r
    }

    /// Runs a request that may change mappings. Without a mapping journal, changed
    /// metadata is written back before the request completes, so that a crash of the
    /// daemon cannot lose a mapping the guest was told about (journal.rs). Flushing outside
    /// the request: the data is written, so clusters the flush frees need not wait for us.
    fn mapping_request(
        &mut self,
        durable: bool,
        f: impl FnOnce(&Qcow2Shared, &HostFile, &mut Scratch) -> stdio::Result<()>,
    ) -> stdio::Result<()> {
        self.request(f)?;
        let s = &self.shared;
        // Without a journal: this request may have changed a mapping, or written in place
        // into a cluster another queue mapped a moment ago; either way, once every mapping
        // published so far is written back, it survives a crash.
        if durable
            || (s.journal.is_none()
                && s.written_back.load(Ordering::Acquire) < s.published.load(Ordering::Acquire))
        {
            s.flush()?;
        }
        Ok(())
    }
}

impl ImageQueue for Qcow2Queue {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> stdio::Result<()> {
        let len = super::slices_len(bufs);
        self.request(|s, file, scratch| s.read_range(file, scratch, offset, len, bufs, 0))
    }

    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> stdio::Result<()> {
        self.mapping_request(durable, |s, file, scratch| {
            s.write_range(file, scratch, offset, bufs)
        })
    }

    fn flush(&mut self) -> stdio::Result<()> {
        self.shared.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> stdio::Result<()> {
        self.mapping_request(false, |s, _, _| s.discard_range(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> stdio::Result<()> {
        self.mapping_request(false, |s, file, scratch| {
            s.write_zeroes_range(file, scratch, offset, len)
        })
    }
}

/// Internal entry points for the criterion benchmarks (`benches/qcow2.rs`) and the
/// `qcow2-open-bench` example. **Not a stable API**: it may change or disappear in any
/// release.
#[cfg(any(test, feature = "bench"))]
pub mod bench_support;

#[cfg(test)]
mod tests {
    use super::bench_support::Image;
    use super::testing::{assert_qemu_img_check, pattern, qemu_img_create};
    use super::Qcow2Image;

    const CS: u64 = 64 << 10;
    const SPAN: u64 = CS * (CS / 8);

    /// Reuse rule: a cluster freed while a request was in flight is not handed out again
    /// until that request has finished.
    #[test]
    fn freed_cluster_waits_for_requests_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.qcow2");
        Qcow2Image::create(&path, 16 * CS).unwrap();
        let mut a = Image::open(&path, false).unwrap();
        let b = Image::from_shared(a.shared.clone());
        a.write(0, &mut pattern(0, CS as usize)).unwrap();
        a.flush().unwrap();
        let x = a.lookup(0).unwrap().unwrap();
        // B starts a request (it could have looked up guest cluster 0 -> x).
        a.shared.begin_request(&b.slot);
        a.shared.discard_range(0, CS).unwrap();
        a.flush().unwrap();
        a.flush().unwrap();
        let cx = super::alloc::HostCluster(x / CS);
        assert_eq!(a.shared.clusters().unwrap().get(cx), 0, "unreferenced");
        a.write(CS, &mut pattern(CS, CS as usize)).unwrap();
        assert_ne!(
            a.lookup(CS).unwrap(),
            Some(x),
            "reused under a request in flight"
        );
        // B finishes: the next flush frees x for good.
        a.shared.end_request(&b.slot);
        a.flush().unwrap();
        a.write(2 * CS, &mut pattern(2 * CS, CS as usize)).unwrap();
        assert_eq!(a.lookup(2 * CS).unwrap(), Some(x), "reused once idle");
        // A request that starts after the free does not hold it back.
        a.shared.discard_range(2 * CS, CS).unwrap();
        a.flush().unwrap();
        a.shared.begin_request(&b.slot);
        a.flush().unwrap();
        a.write(3 * CS, &mut pattern(3 * CS, CS as usize)).unwrap();
        a.shared.end_request(&b.slot);
        assert_eq!(
            a.lookup(3 * CS).unwrap(),
            Some(x),
            "not held back by a later request"
        );
        a.close().unwrap();
    }

    /// Overlap protection tripping on the copy-on-write path (entry reserved) fails the
    /// request, refuses later writes and writes the corrupt bit once the entry is released.
    #[test]
    fn overlap_on_reserved_entry_marks_corrupt() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.qcow2");
        Qcow2Image::create(&path, 16 * CS).unwrap();
        let mut a = Image::open(&path, false).unwrap();
        a.write(0, &mut pattern(0, CS as usize)).unwrap();
        a.flush().unwrap();
        let x = a.lookup(0).unwrap().unwrap();
        {
            // A preallocated zero cluster (reused in place by copy-on-write) whose host
            // cluster has become metadata.
            let t = a.shared.table(0).unwrap();
            assert!(t.pin());
            t.entries[0].store(x | super::l2::COPIED | super::l2::ZERO, Ordering::Release);
            t.mark_dirty(0);
            t.unpin();
            let c = a.shared.clusters().unwrap();
            c.set_meta(super::alloc::HostCluster(x / CS), true);
        }
        let e = a.write(512, &mut vec![1u8; 512]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        let hdr = std::fs::read(&path).unwrap();
        assert_eq!(hdr[79] & 2, 2, "corrupt bit written");
        assert!(a.write(CS, &mut vec![1u8; 512]).is_err(), "writes refused");
        // The entry was restored, not left reserved: flush completes.
        a.flush().unwrap();
    }

    /// Writes from several threads over many more L2 tables than a 4-table cache holds,
    /// with flushes in between, and checks every byte before and after a reopen.
    /// A flush writes a table that already has its own cluster only where it changed (its
    /// dirty pieces). Writes spread over every piece of two tables, several flushes, each
    /// followed by a copy of the file as a crash would leave it: every flushed write must be
    /// in the copy, and everything in the image after a clean close.
    #[test]
    fn in_place_table_writes_keep_every_changed_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.qcow2");
        Qcow2Image::create(&path, 2 * SPAN).unwrap();
        let mut img = Image::open(&path, false).unwrap();
        // 64 KiB tables: 16 pieces of 4 KiB, each mapping SPAN / 16 of the disk.
        let piece_span = SPAN / 16;
        let mut written: Vec<u64> = Vec::new();
        for round in 0..4u64 {
            for table in 0..2u64 {
                for piece in (round % 2..16).step_by(2 - (round as usize % 2)) {
                    let o = table * SPAN + piece * piece_span + (round * 5 + piece) % 8 * CS;
                    let mut d = pattern(o ^ round, 4096);
                    img.write(o, &mut d).unwrap();
                    written.retain(|&x| x != o);
                    written.push(o);
                }
            }
            // Rewrite one entry in a piece of its own too (a one-piece flush).
            let lone = SPAN + 11 * piece_span + 9 * CS;
            img.write(lone, &mut pattern(lone, 4096)).unwrap();
            written.retain(|&x| x != lone);
            written.push(lone);
            // Unmap a cluster in an odd piece during an even round, which writes only even
            // pieces: only the discard makes that piece dirty.
            let gone = 13 * piece_span + 12 * CS;
            if round == 0 {
                img.write(gone, &mut pattern(gone, 4096)).unwrap();
                img.flush().unwrap();
            } else if round == 2 {
                img.shared.discard_range(gone, CS).unwrap();
            }
            img.flush().unwrap();
            let copy = dir.path().join(format!("crash-{round}.qcow2"));
            std::fs::copy(&path, &copy).unwrap();
            let mut c = Image::open(&copy, false).unwrap();
            for &o in &written {
                let mut back = vec![0u8; 4096];
                c.read(o, &mut back).unwrap();
                let want = if o == lone {
                    pattern(o, 4096)
                } else {
                    // The last round that wrote `o`.
                    let r = (0..=round)
                        .rev()
                        .find(|&r| {
                            (0..2u64).any(|t| {
                                (r % 2..16)
                                    .step_by(2 - (r as usize % 2))
                                    .any(|p| t * SPAN + p * piece_span + (r * 5 + p) % 8 * CS == o)
                            })
                        })
                        .unwrap();
                    pattern(o ^ r, 4096)
                };
                assert_eq!(back, want, "round {round}: flushed write at {o:#x} lost");
            }
            if round >= 2 {
                assert_eq!(c.lookup(gone).unwrap(), None, "round {round}: discard lost");
            }
            c.close().unwrap();
        }
        img.close().unwrap();
        drop(img);
        assert_qemu_img_check(&path, false);
    }

    /// Refcount blocks are written in place only where they changed (4 KiB pieces). With
    /// 64-bit refcounts a 64 KiB block has 16 pieces of 512 clusters (32 MiB of host file):
    /// grow the file over several pieces with flushes in between, and check the file as a
    /// crash after each flush would leave it with qemu-img (leaks allowed, no errors), and
    /// the closed image (clean).
    #[test]
    fn refcount_pieces_written_in_place_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.qcow2");
        qemu_img_create(&path, "refcount_bits=64", "1G");
        let mut img = Image::open(&path, false).unwrap();
        let mut d = vec![0u8; 1 << 20];
        for round in 0..5u64 {
            // 24 MiB per round, scattered: new clusters land in the next refcount pieces.
            for k in 0..24u64 {
                let o = ((k * 37 + round * 11) % 1000) << 20;
                d.fill((round * 24 + k) as u8);
                img.write(o, &mut d).unwrap();
            }
            img.flush().unwrap();
            let copy = dir.path().join(format!("crash-{round}.qcow2"));
            std::fs::copy(&path, &copy).unwrap();
            assert_qemu_img_check(&copy, true);
        }
        img.close().unwrap();
        drop(img);
        assert_qemu_img_check(&path, false);
    }

    /// Free clusters of a clean image go back into use once the background check found them
    /// unreferenced (and a flush picked the result up); until then new clusters come from
    /// the end of the file.
    #[test]
    fn checked_holes_are_reused_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.qcow2");
        Qcow2Image::create(&path, 64 * CS).unwrap();
        let mut img = Image::open(&path, false).unwrap();
        for k in 0..4u64 {
            img.write(k * CS, &mut pattern(k * CS, CS as usize))
                .unwrap();
        }
        img.flush().unwrap();
        let hole = img.lookup(CS).unwrap().unwrap();
        img.shared.discard_range(CS, CS).unwrap();
        img.close().unwrap();
        drop(img);
        let mut img = Image::open(&path, false).unwrap();
        let end = std::fs::metadata(&path).unwrap().len();
        img.write(10 * CS, &mut pattern(10 * CS, 4096)).unwrap();
        assert!(
            img.lookup(10 * CS).unwrap().unwrap() >= end,
            "before the check, allocation goes to the end"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut g = 11;
        loop {
            img.flush().unwrap();
            img.write(g * CS, &mut pattern(g * CS, 4096)).unwrap();
            if img.lookup(g * CS).unwrap() == Some(hole) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the hole was never reused"
            );
            assert!(g < 63, "the hole was never reused");
            g += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Data written before the reuse is intact.
        for k in [0u64, 2, 3] {
            let mut back = vec![0u8; CS as usize];
            img.read(k * CS, &mut back).unwrap();
            assert_eq!(back, pattern(k * CS, CS as usize));
        }
        img.close().unwrap();
    }

    #[test]
    fn small_l2_cache_never_loses_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        Qcow2Image::create(&path, 24 * SPAN).unwrap();
        let img = Image::open(&path, false).unwrap();
        img.set_cache_bytes(0);
        let shared = img.shared.clone();
        let offs = |t: u64| -> Vec<u64> {
            (0..96u64)
                .map(|k| ((k * 7 + t * 3) % 24) * SPAN + ((k * 13 + t) % 64) * CS + t * 4096)
                .collect()
        };
        std::thread::scope(|sc| {
            for t in 0..3u64 {
                let shared = shared.clone();
                sc.spawn(move || {
                    let mut q = Image::from_shared(shared);
                    for (n, o) in offs(t).into_iter().enumerate() {
                        let mut d = pattern(o, 4096);
                        q.write(o, &mut d).unwrap();
                        let mut back = vec![0u8; 4096];
                        q.read(o, &mut back).unwrap();
                        assert_eq!(back, pattern(o, 4096), "read back at {o:#x}");
                        if n % 17 == 0 {
                            q.flush().unwrap();
                        }
                    }
                });
            }
        });
        let check = |img: &mut Image| {
            for t in 0..3u64 {
                for o in offs(t) {
                    let mut back = vec![0u8; 4096];
                    img.read(o, &mut back).unwrap();
                    assert_eq!(back, pattern(o, 4096), "at {o:#x}");
                }
            }
        };
        let mut img = img;
        check(&mut img);
        img.flush().unwrap();
        // Reading everything again goes through evictions and reloads of clean tables.
        check(&mut img);
        assert!(img.loaded_tables() <= 8, "{} tables", img.loaded_tables());
        img.close().unwrap();
        drop(shared);
        drop(img);
        let mut img = Image::open(&path, false).unwrap();
        check(&mut img);
    }

    /// Extended L2 (needs `qemu-img`): an allocating write that saw the entry before another
    /// queue wrote other subclusters of the same (owned) cluster must neither complete a
    /// subcluster that is now allocated from its old contents nor drop the other queue's
    /// allocation bits, although the entry word is back to the value it saw.
    #[test]
    fn subcluster_write_rereads_bitmap_after_reserving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        qemu_img_create(&path, "extended_l2=on", "1M");
        let sub = CS / 32;
        let mut a = Image::open(&path, false).unwrap();
        a.write(0, &mut vec![1u8; sub as usize]).unwrap();
        let s = a.shared.clone();
        let t = s.table(0).unwrap();
        let seen = s.load_entry(&t, 0);
        assert_eq!(seen.bitmap, super::SubclusterBitmap(1));
        // Another queue writes part of subcluster 1 and all of subcluster 2 meanwhile.
        a.write(sub + 1000, &mut vec![2u8; (2 * sub - 1000) as usize])
            .unwrap();
        let both = super::Entry::new(seen.word, super::SubclusterBitmap(0b111));
        assert_eq!(s.load_entry(&t, 0), both);
        // Our write, with what we saw before: 100 bytes at the start of subcluster 1.
        let mut d = [3u8; 100];
        let bufs = [vm_memory::VolatileSlice::from(&mut d[..])];
        let mut scratch = super::Scratch::default();
        s.write_reserved(
            &s.file,
            &mut scratch,
            &t,
            0,
            seen,
            sub,
            100,
            &bufs,
            0,
            &mut None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.load_entry(&t, 0), both, "allocation bits kept");
        let mut back = vec![0u8; 3 * sub as usize];
        a.read(0, &mut back).unwrap();
        let mut want = vec![1u8; sub as usize];
        want.extend(vec![3u8; 100]);
        want.extend(vec![0u8; 900]);
        want.extend(vec![2u8; (2 * sub - 1000) as usize]);
        assert!(back == want, "another queue's data was overwritten");
        drop(t);
        a.close().unwrap();
    }
}

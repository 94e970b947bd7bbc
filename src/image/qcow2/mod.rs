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
//! # Crash safety
//!
//! The dirty bit is set in the on-disk header (and synced) before the first metadata change
//! after open. A flush syncs data, writes refcount blocks and L2 tables, syncs, writes the L1
//! table and header fields, and syncs again; L2 tables are snapshotted before the first sync,
//! so every entry written points at data that was durable first. Clusters unmapped by
//! discard or copy-on-write are unreferenced only after the flush that made the unmapping
//! durable, so on-disk refcounts are never lower than the on-disk references. A dirty image
//! opened writable has its refcounts rebuilt from the metadata. A copy-on-write or discard
//! puts the old host clusters on the pending list only after the new entry is stored and
//! its table marked dirty, so the flush that unreferences them is one that wrote the table.
//!
//! A crash of the daemon alone (the host and its page cache survive) must not lose a write
//! that completed: its data is in the file, and its new L2 entry, not yet written back, is in
//! the mapping journal (journal.rs), appended before the entry is stored. A restarted daemon
//! replays the journal onto the dirty image after rebuilding the refcounts (replay.rs).
//! Without a journal (`--no-journal`), a write, discard or write-zeroes flushes before it
//! completes whenever a mapping changed since the last completed flush (its own, or one it
//! may have written through).
//!
//! # Reuse
//!
//! A request may have looked up a mapping before a discard or copy-on-write replaced it and
//! still be reading or writing the old host cluster. So a cluster freed by a flush is
//! handed out again only after every request that was in flight when it was freed has
//! finished: each queue handle owns a slot (an `AtomicU64` registered at `queue_handle`)
//! where it publishes the epoch its current request started at (0 when idle; one store and
//! a fence per request, no shared write). A flush that drops clusters to refcount zero bumps
//! the epoch and keeps them in a deferred list tagged with the old epoch; each flush moves
//! to the free bitmap those whose tag is below the start epoch of every busy slot. Freed
//! clusters are also no longer metadata at once, so overlap protection does not fire for
//! a late write to an old L2 table cluster.
//!
//! # Hostile images
//!
//! At open, metadata structures (header, L1, refcount table and blocks, active L2 tables,
//! snapshot and bitmap structures) must lie inside the file and must not share clusters.
//! An L2 table is checked when first loaded into a writable image: every host cluster an
//! entry references must lie inside the file, must not be metadata and must have a nonzero
//! refcount; otherwise the request fails and nothing is written or unreferenced.
//! Overlap protection (refusing guest data writes to metadata) only sets an in-memory flag
//! while an entry may be reserved; the header's corrupt bit is written once nothing is
//! reserved, or by the next flush or close.

mod alloc;
mod bitmap;
mod compress;
pub mod header;
mod holes;
mod io;
pub mod journal;
mod l2;
mod plan;
mod rebuild;
mod refcount;
mod replay;
mod resize;
mod ring;
#[cfg(test)]
mod testing;

use std::fs::{File, OpenOptions};
use std::io as stdio;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Guard};

use log::{debug, error, info, warn};
use vm_memory::VolatileSlice;

use self::alloc::{Clusters, HostCluster};
use self::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use self::l2::{
    L2Table, Mapping, ALL_ALLOC, ALL_ZERO, COMPRESSED, COPIED, OFFSET_MASK, RESERVED, ZERO,
};
use super::engine::{Aio, IoEngine, SyncEngine};
use super::format::ImageOptions;
use super::lock::{self, Role};
use super::storage::{HostFile, Recorder};
use super::{BlockImage, GuestSlice, ImageQueue, ImageStats};
use crate::error::{Error, Result};

/// Most host clusters a writable image may have (refcounts are kept in memory, 8 bytes per
/// cluster: 2 GiB at this limit, which is 16 TiB of 64 KiB clusters).
const MAX_HOST_CLUSTERS: u64 = 1 << 28;

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

/// A byte offset in the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostOffset(pub u64);

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

/// Where a writable image keeps its mapping journal (see journal.rs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JournalMode {
    /// In `/dev/shm`; if that cannot be used, warn and write metadata through instead.
    #[default]
    Default,
    /// In this directory (tmpfs or ramfs); failing to use it is an error.
    Dir(PathBuf),
    /// No journal: metadata is written back before a request that changed a mapping
    /// completes.
    Off,
}

/// The default journal directory.
pub const DEFAULT_JOURNAL_DIR: &str = "/dev/shm";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

    /// Opens an image file; `depth` counts backing levels above it. `journal` applies to a
    /// writable image only.
    fn open(
        path: &Path,
        read_only: bool,
        depth: u32,
        journal: &JournalMode,
        recorder: Option<&Arc<Recorder>>,
    ) -> Result<Qcow2Shared> {
        let inval = |reason: String| Error::InvalidImage {
            path: path.to_owned(),
            reason,
        };
        let open_err = |source| Error::OpenImage {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(inval("qcow2 images must be regular files".into()));
        }
        lock::claim(&file, path, Role::qcow2(depth == 0, !read_only))?;
        let file = HostFile::new(file, recorder, "image");
        let file_len = meta.len();
        let mut head = vec![0u8; file_len.min(2 << 20) as usize];
        io::read_bytes(&file, 0, &mut head).map_err(open_err)?;
        let hdr = Header::parse(&head, file_len).map_err(inval)?;
        let cs = hdr.cluster_size();
        let data_raw = hdr.incompatible & header::INCOMPAT_DATA_FILE != 0
            && hdr.autoclear & header::AUTOCLEAR_DATA_RAW != 0;
        let data_file = if hdr.incompatible & header::INCOMPAT_DATA_FILE != 0 {
            let Some(name) = &hdr.data_file else {
                return Err(inval(
                    "the image uses an external data file but does not name it".into(),
                ));
            };
            if hdr.nb_snapshots > 0 {
                // Data clusters are not refcounted, so nothing would protect the snapshot's
                // data from being overwritten in place (QEMU refuses to create these).
                return Err(inval(
                    "internal snapshots in an image with an external data file are not \
                     supported"
                        .into(),
                ));
            }
            if data_raw && hdr.backing_file.is_some() {
                return Err(inval(
                    "an image with a raw external data file (data_file_raw) cannot have a \
                     backing file"
                        .into(),
                ));
            }
            let f = open_data_file(path, file.as_file(), name, read_only)?;
            Some(HostFile::new(f, recorder, "data"))
        } else {
            None
        };
        if !read_only && hdr.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(inval(
                "the image is marked corrupt; repair it with 'qemu-img check -r all' or open it \
                 read-only"
                    .into(),
            ));
        }
        // L1 table.
        let mut l1_bytes = vec![0u8; hdr.l1_size as usize * 8];
        io::read_bytes(&file, hdr.l1_table_offset, &mut l1_bytes).map_err(open_err)?;
        let l1_len = hdr.l1_size as usize;
        // Read-only images never grow: no reserve for them.
        let capacity = if read_only {
            l1_len
        } else {
            l1_len.max(MIN_L1_CAPACITY.min((header::MAX_L1_BYTES / 8) as usize))
        };
        let mut l1 = Vec::with_capacity(capacity);
        for i in 0..l1_len {
            let e = be64_at(&l1_bytes, i);
            check_l1_entry(e, cs, file_len).map_err(|m| inval(format!("L1 entry {i}: {m}")))?;
            l1.push(AtomicU64::new(e));
        }
        l1.resize_with(capacity, || AtomicU64::new(0));
        // Backing file.
        let backing = match &hdr.backing_file {
            None => None,
            Some(name) => Some(open_backing(
                path,
                name,
                hdr.backing_format.as_deref(),
                depth,
            )?),
        };
        let rt_len = hdr.refcount_table_clusters as usize * cs as usize / 8;
        let mut rt_bytes = vec![0u8; rt_len * 8];
        io::read_bytes(&file, hdr.refcount_table_offset, &mut rt_bytes).map_err(open_err)?;
        let rt: Vec<u64> = (0..rt_len).map(|i| be64_at(&rt_bytes, i)).collect();
        let state = MetaState {
            l1_offset: hdr.l1_table_offset,
            l1_clusters: (u64::from(hdr.l1_size) * 8).div_ceil(cs),
            rt_offset: hdr.refcount_table_offset,
            rt_clusters: hdr.refcount_table_clusters,
            rt,
            incompatible: hdr.incompatible,
            rt_dirty: false,
            rt_moved: false,
            autoclear: hdr.autoclear,
            rc_values: Vec::new(),
            rc_bytes: Vec::new(),
        };
        let words = if hdr.extended_l2() { 2 } else { 1 };
        let absent = Arc::new(L2Table::placeholder());
        let l2 = (0..capacity)
            .map(|_| ArcSwap::new(absent.clone()))
            .collect();
        let cache_tables = cache_tables_for(DEFAULT_CACHE_BYTES, hdr.cluster_bits);
        let hdr_size = hdr.size;
        let mut s = Qcow2Shared {
            path: path.to_owned(),
            file,
            cluster_bits: hdr.cluster_bits,
            size: AtomicU64::new(hdr.size),
            read_only,
            extended: hdr.extended_l2(),
            words,
            l1,
            l1_len: AtomicUsize::new(l1_len),
            l2,
            absent,
            cache_tables: AtomicUsize::new(cache_tables),
            loaded: AtomicUsize::new(0),
            hand: AtomicUsize::new(0),
            checked: (0..capacity.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            clusters: None,
            file_clusters: file_len.div_ceil(cs),
            backing,
            data_file,
            data_raw,
            bitmaps: None,
            state: Mutex::new(state),
            dirty_on_disk: AtomicBool::new(hdr.version == 2),
            meta_dirty: AtomicBool::new(false),
            l1_dirty: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(1),
            slots: Mutex::new(Vec::new()),
            deferred: Mutex::new(Vec::new()),
            holes: Arc::default(),
            journal: None,
            published: AtomicU64::new(0),
            written_back: AtomicU64::new(0),
            resizing: Mutex::new(()),
            hdr,
        };
        if !read_only {
            let opened = open_journal(path, s.file.as_file(), s.cluster_bits, journal)?;
            let recovered = opened.as_ref().map_or(&[][..], |o| &o.recovered[..]);
            s.setup_writable(file_len, recovered).map_err(|e| match e {
                rebuild::OpenError::Invalid(r) => inval(r),
                rebuild::OpenError::Io(source) => open_err(source),
            })?;
            if let Some(o) = opened {
                // Whatever the file held is durable in the image now (or was stale).
                o.journal.start();
                debug!(
                    "{}: mapping journal {}",
                    path.display(),
                    o.journal.path().display()
                );
                s.journal = Some(o.journal);
            }
        }
        // Bitmaps are kept only when the extension is marked consistent (autoclear bit 0;
        // an older writer that did not know them cleared it).
        if let Some(ext) = s.hdr.bitmaps {
            if depth == 0 && s.hdr.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                let load = !read_only;
                s.bitmaps = Some(
                    bitmap::Bitmaps::open(&s.file, ext, s.cluster_bits, hdr_size, file_len, load)
                        .map_err(|e| inval(format!("bitmaps: {e}")))?,
                );
            }
        }
        Ok(s)
    }

    /// Loads (or rebuilds) refcounts for a writable open. A dirty image first gets the
    /// mapping changes `recovered` from the journal of the daemon that left it dirty.
    fn setup_writable(
        &mut self,
        file_len: u64,
        recovered: &[journal::Record],
    ) -> std::result::Result<(), rebuild::OpenError> {
        let dirty = self.hdr.incompatible & INCOMPAT_DIRTY != 0;
        if !dirty && !recovered.is_empty() {
            warn!(
                "{}: ignoring {} journaled mapping change(s): the image was closed cleanly \
                 since they were recorded",
                self.path.display(),
                recovered.len()
            );
        }
        // Refcounts are kept in memory, 8 bytes per host cluster: bound that.
        if file_len >> self.cluster_bits > MAX_HOST_CLUSTERS {
            return Err(rebuild::OpenError::Invalid(format!(
                "image file too large to open writable with {}-byte clusters ({} clusters, \
                 limit {MAX_HOST_CLUSTERS})",
                self.cluster_size(),
                file_len >> self.cluster_bits
            )));
        }
        let (rc, meta_clusters) = if dirty {
            warn!(
                "{}: image was not closed cleanly; rebuilding refcounts",
                self.path.display()
            );
            rebuild::rebuild(self, file_len)?
        } else {
            rebuild::load(self, file_len)?
        };
        let cs = self.cluster_size();
        let end = file_len
            .div_ceil(cs)
            .max(rc.iter().rposition(|&v| v != 0).map_or(0, |p| p as u64 + 1));
        let clusters = Clusters::new(rc, end, self.refcount_piece_shift());
        for c in meta_clusters {
            clusters.set_meta(c, true);
        }
        if !dirty {
            // Refcounts were trusted: keep the free clusters out of use until a background
            // check has made sure no table references them (holes.rs).
            let holes = clusters.take_holes();
            if holes.iter().any(|&w| w != 0) {
                let active = self.l1.iter().map(|e| e.load(Ordering::Relaxed)).collect();
                let l1s = rebuild::all_l1s(self, file_len, active)?;
                let file = self
                    .file
                    .as_file()
                    .try_clone()
                    .map_err(rebuild::OpenError::Io)?;
                holes::spawn(
                    file,
                    holes::Geometry {
                        cluster_bits: self.cluster_bits,
                        extended: self.extended,
                        data_file: self.data_file.is_some(),
                    },
                    l1s.into_iter().map(|(l1, _)| l1).collect(),
                    holes,
                    self.holes.clone(),
                );
            }
        }
        self.clusters = Some(clusters);
        if dirty {
            if !recovered.is_empty() {
                let n = replay::apply(self, recovered)?;
                info!(
                    "{}: replayed {n} mapping change(s) that requests had completed with \
                     before the previous daemon stopped",
                    self.path.display()
                );
            }
            rebuild::fix_copied_flags(self)?;
            if let Some(c) = &self.clusters {
                c.dirty_all();
            }
            self.dirty_on_disk.store(true, Ordering::Release);
            self.meta_dirty.store(true, Ordering::Release);
            self.close().map_err(rebuild::OpenError::Io)?;
            info!("{}: refcounts repaired", self.path.display());
        }
        Ok(())
    }

    /// Registers a request slot for a new queue handle.
    fn register_slot(&self) -> Arc<AtomicU64> {
        let slot = Arc::new(AtomicU64::new(0));
        let mut slots = lock(&self.slots);
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Publishes in the handle's own slot that a request starts now. Lock-free: one load of
    /// the epoch, one store and a fence.
    fn begin_request(&self, slot: &AtomicU64) {
        let e = self.epoch.load(Ordering::SeqCst);
        slot.store(e, Ordering::SeqCst);
        // Pairs with the fence in `reclaim`: either the reclaiming flush sees this slot, or
        // this request sees every unmapping made before that flush (so it cannot touch a
        // cluster the flush frees).
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The handle's current request has finished.
    fn end_request(&self, slot: &AtomicU64) {
        slot.store(0, Ordering::Release);
    }

    /// Moves deferred clusters whose freeing every request still in flight started after
    /// into the free bitmap.
    fn reclaim(&self, clusters: &Clusters) {
        let mut deferred = lock(&self.deferred);
        if deferred.is_empty() {
            return;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let oldest = lock(&self.slots)
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|s| s.load(Ordering::SeqCst))
            .filter(|&e| e != 0)
            .min();
        let mut ready = Vec::new();
        deferred.retain(|&(tag, c)| {
            // A request that started at epoch `e > tag` began after the freeing flush
            // bumped the epoch, so it saw the unmapping.
            let done = oldest.is_none_or(|e| e > tag);
            if done {
                ready.push(c.0);
            }
            !done
        });
        drop(deferred);
        ready.sort_unstable();
        ready.dedup();
        self.truncate_freed_tail(clusters, &mut ready);
        self.punch_freed(&ready);
        for c in ready {
            clusters.make_free(HostCluster(c));
        }
    }

    /// Cuts free clusters at the end of the image off the file and lowers the end of the
    /// image, so the file shrinks: from the top down, clusters in `ready` (sorted; they are
    /// removed from it) or taken out of the free bitmap, down to the highest one in use.
    /// The end is frozen while the file is cut: an allocation at the end meanwhile would
    /// write past the cut and lose its data to it. Then nobody can be handed the cut
    /// clusters until the end has moved down, and they are fresh again (zeros past EOF).
    fn truncate_freed_tail(&self, clusters: &Clusters, ready: &mut Vec<u64>) {
        let end = clusters.end();
        let mut to = end;
        while to > 1 {
            let c = to - 1;
            if ready.last() == Some(&c) {
                ready.pop();
            } else if !clusters.take_free(HostCluster(c)) {
                break;
            }
            to = c;
        }
        if to == end {
            return;
        }
        let cut = clusters.freeze_end(end)
            && match self.file.set_len(to << self.cluster_bits) {
                Ok(()) => {
                    clusters.thaw_end(to);
                    true
                }
                Err(e) => {
                    clusters.thaw_end(end);
                    log::debug!("{}: truncating freed clusters: {e}", self.path.display());
                    false
                }
            };
        if !cut {
            // Back where they came from; those from `ready` join the rest in the bitmap.
            ready.extend(to..end);
            ready.sort_unstable();
            ready.dedup();
        }
    }

    /// Gives the host file system the space of clusters about to enter the free bitmap
    /// (thin provisioning, like QEMU's discard=unmap). Safe for the same reason reuse is:
    /// no durable metadata maps them and no request still uses them; a punched cluster
    /// handed out again is written whole. Before they are free, so nobody writes them
    /// meanwhile. Best effort: a file system without hole punching keeps the bytes.
    /// `clusters` must be sorted.
    fn punch_freed(&self, clusters: &[u64]) {
        if clusters.is_empty() {
            return;
        }
        let cs = self.cluster_size();
        let mut i = 0;
        while i < clusters.len() {
            let mut j = i + 1;
            while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
                j += 1;
            }
            let (start, len) = (clusters[i] << self.cluster_bits, (j - i) as u64 * cs);
            if let Err(e) = self.file.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            ) {
                log::debug!(
                    "{}: punching freed clusters at {start:#x}: {e}",
                    self.path.display()
                );
            }
            i = j;
        }
    }

    fn clusters(&self) -> stdio::Result<&Clusters> {
        self.clusters
            .as_ref()
            .ok_or_else(|| stdio::Error::from_raw_os_error(libc::EROFS))
    }

    /// The L2 table for L1 index `i`, loading it if it is not in memory.
    ///
    /// The returned guard keeps the table alive (even if it is evicted meanwhile) without
    /// touching a shared reference count. Modifying entries needs [`L2Table::pin`]; if that
    /// fails the table was evicted and the caller looks it up again.
    fn table(&self, i: usize) -> stdio::Result<Guard<Arc<L2Table>>> {
        let slot = self
            .l2
            .get(i)
            .ok_or_else(|| corrupt(format!("L1 index {i} out of range")))?;
        loop {
            let cur = slot.load();
            if !Arc::ptr_eq(&cur, &self.absent) {
                if cur.is_loading() {
                    // Another thread is reading it from the image.
                    drop(cur);
                    std::thread::yield_now();
                    continue;
                }
                cur.touch();
                return Ok(cur);
            }
            // Claim the slot with a loading marker first, then read: only a table that is
            // not in memory is read from the image, and nobody can change it meanwhile (a
            // table that was written and evicted while a slower reader was still reading
            // the old bytes could otherwise come back stale).
            let marker = Arc::new(L2Table::loading());
            let prev = slot.compare_and_swap(&self.absent, marker.clone());
            if !Arc::ptr_eq(&prev, &self.absent) {
                continue;
            }
            drop(prev);
            match self.read_table(i) {
                Ok(t) => slot.store(Arc::new(t)),
                Err(e) => {
                    marker.fail_loading();
                    slot.store(self.absent.clone());
                    return Err(e);
                }
            }
            let n = self.loaded.fetch_add(1, Ordering::AcqRel) + 1;
            if n > self.cache_tables.load(Ordering::Relaxed) {
                self.shrink_cache(i);
            }
        }
    }

    /// Reads and checks table `i` from the image (zeros if it has no cluster yet).
    fn read_table(&self, i: usize) -> stdio::Result<L2Table> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let l1e = self.l1[i].load(Ordering::Acquire);
        let off = l1e & OFFSET_MASK;
        let cs = self.cluster_size() as usize;
        let (cw, cm) = (i / 64, 1u64 << (i % 64));
        if off == 0 {
            // From now on only we write this table: a reload after eviction reads back what
            // we wrote (entries pointing at clusters allocated since open) unchecked.
            self.checked[cw].fetch_or(cm, Ordering::AcqRel);
            return Ok(L2Table::from_bytes(&vec![0u8; cs]));
        }
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(cs, 0);
            io::read_bytes(&self.file, off, &mut buf)?;
            if self.checked[cw].load(Ordering::Acquire) & cm != 0 {
                return Ok(L2Table::from_bytes(&buf));
            }
            // Bits that must be clear in a plain entry (unallocated, or data with an aligned
            // offset): such entries skip the full decode, which is most of a load's cost.
            let bad = !(COPIED | OFFSET_MASK) | (self.cluster_size() - 1);
            for g in 0..self.l2_entries() as usize {
                let e = be64_at(&buf, g * self.words);
                let r = if !self.extended && e & bad == 0 && (e == 0 || e & OFFSET_MASK != 0) {
                    self.check_refs(e)
                } else {
                    let b = if self.extended {
                        be64_at(&buf, g * 2 + 1)
                    } else {
                        0
                    };
                    self.check_entry(e, b).and_then(|()| self.check_refs(e))
                };
                r.map_err(|m| corrupt(format!("L2 table at {off:#x}, entry {g}: {m}")))?;
            }
            self.checked[cw].fetch_or(cm, Ordering::AcqRel);
            Ok(L2Table::from_bytes(&buf))
        })
    }

    /// Evicts clean, unpinned tables (second-chance clock) until the cache is within its
    /// budget. If dirty tables keep it over budget, writes them back with a flush (only if no
    /// flush is running: nobody waits here) and tries once more. `keep` is the slot just
    /// loaded by the caller.
    fn shrink_cache(&self, keep: usize) {
        if self.evict_some(keep) {
            return;
        }
        if self.read_only {
            return;
        }
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        let r = self.flush_with(&mut st);
        drop(st);
        match r {
            Ok(()) => {
                self.evict_some(keep);
            }
            Err(e) => log::debug!("{}: L2 cache write-back failed: {e}", self.path.display()),
        }
    }

    /// One or two sweeps of the clock; true once the cache is within budget.
    fn evict_some(&self, keep: usize) -> bool {
        let n = self.l1_len.load(Ordering::Acquire);
        let budget = self.cache_tables.load(Ordering::Relaxed);
        if n == 0 {
            return true;
        }
        for _ in 0..2 * n {
            if self.loaded.load(Ordering::Acquire) <= budget {
                return true;
            }
            let i = self.hand.fetch_add(1, Ordering::Relaxed) % n;
            if i == keep {
                continue;
            }
            let slot = &self.l2[i];
            let cur = slot.load();
            if Arc::ptr_eq(&cur, &self.absent) || cur.take_referenced() {
                continue;
            }
            if !cur.try_evict() {
                continue;
            }
            let prev = slot.compare_and_swap(&*cur, self.absent.clone());
            if Arc::ptr_eq(&prev, &*cur) {
                self.loaded.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.loaded.load(Ordering::Acquire) <= budget
    }

    /// Sets the L2 cache budget in bytes (rounded down to whole tables, at least 4).
    fn set_cache_bytes(&self, bytes: u64) {
        self.cache_tables.store(
            cache_tables_for(bytes, self.cluster_bits),
            Ordering::Relaxed,
        );
        if self.loaded.load(Ordering::Acquire) > self.cache_tables.load(Ordering::Relaxed) {
            self.shrink_cache(usize::MAX);
        }
    }

    /// Checks the host clusters an on-disk entry (of a table being loaded for the first
    /// time, writable images only) references: inside the file, not metadata, and with a
    /// nonzero refcount. Otherwise a write could land in metadata, or a discard or
    /// copy-on-write would drop a reference the entry never held (e.g. the header's).
    fn check_refs(&self, e: u64) -> std::result::Result<(), String> {
        let Some(clusters) = &self.clusters else {
            return Ok(());
        };
        let one = |c: HostCluster| -> std::result::Result<(), String> {
            let at = c.0 << self.cluster_bits;
            if c.0 >= self.file_clusters {
                return Err(format!(
                    "references host cluster {at:#x} past the end of the file"
                ));
            }
            if c.0 == 0 || clusters.is_meta(c) {
                return Err(format!(
                    "references host cluster {at:#x}, which holds metadata"
                ));
            }
            if clusters.get(c) == 0 {
                return Err(format!(
                    "references host cluster {at:#x}, whose refcount is 0"
                ));
            }
            Ok(())
        };
        if self.data_file.is_some() {
            // Data clusters live in the data file, unrefcounted; QEMU never compresses there.
            if e & COMPRESSED != 0 {
                return Err("compressed cluster in an image with an external data file".into());
            }
            return Ok(());
        }
        if e & COMPRESSED == 0 {
            let off = e & OFFSET_MASK;
            if off == 0 {
                return Ok(());
            }
            return one(HostCluster(off >> self.cluster_bits));
        }
        self.entry_refs(e).into_iter().try_for_each(one)
    }

    fn check_entry(&self, e: u64, b: u64) -> std::result::Result<(), String> {
        let m = self.decode(e)?;
        if self.extended {
            match m {
                Mapping::Compressed { .. } if b != 0 => {
                    return Err("compressed cluster with a subcluster bitmap".into())
                }
                _ => {}
            }
            if (b & ALL_ALLOC) & (b >> 32) != 0 {
                return Err("subcluster both allocated and zero".into());
            }
            if b & ALL_ALLOC != 0 && m == Mapping::Unallocated {
                return Err("allocated subclusters without a host offset".into());
            }
        }
        Ok(())
    }

    /// Loads entry `g` of a table (both words with extended L2), waiting out reservations.
    fn load_entry(&self, t: &L2Table, g: usize) -> (u64, u64) {
        let w = g * self.words;
        loop {
            let e = t.entries[w].load(Ordering::Acquire);
            if e == RESERVED {
                std::thread::yield_now();
                continue;
            }
            if !self.extended {
                return (e, 0);
            }
            let b = t.entries[w + 1].load(Ordering::Acquire);
            if t.entries[w].load(Ordering::Acquire) == e {
                return (e, b);
            }
        }
    }

    fn locate(&self, guest: GuestOffset) -> (usize, usize, u64) {
        let c = guest.0 >> self.cluster_bits;
        let n = self.l2_entries();
        (
            (c / n) as usize,
            (c % n) as usize,
            guest.0 & (self.cluster_size() - 1),
        )
    }

    /// Reads guest bytes `[off, off + len)` into request bytes starting at `pos`.
    fn read_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        len: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let cs = self.cluster_size();
        let mut done = 0;
        while done < len {
            let g = off + done;
            let (i, j, in_off) = self.locate(GuestOffset(g));
            let n = (cs - in_off).min(len - done);
            let (e, b) = self.load_entry(&**self.table(i)?, j);
            self.read_in_cluster(file, scratch, g - in_off, e, b, in_off, n, bufs, pos + done)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `[in_off, in_off + n)` of the guest cluster at `cluster_guest` described by
    /// entry (`e`, `b`) into request bytes at `pos`.
    #[allow(clippy::too_many_arguments)]
    fn read_in_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        e: u64,
        b: u64,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let m = self.decode(e).map_err(corrupt)?;
        if self.extended {
            if let Mapping::Data(_) | Mapping::Unallocated = m {
                // Subcluster by subcluster.
                let scs = self.cluster_size() / l2::SUBCLUSTERS;
                let mut done = 0;
                while done < n {
                    let o = in_off + done;
                    let sc = o / scs;
                    let k = (scs - o % scs).min(n - done);
                    let sm = plan::subcluster(m, b, sc).map_err(corrupt)?;
                    self.read_mapped(file, scratch, cluster_guest, sm, o, k, bufs, pos + done)?;
                    done += k;
                }
                return Ok(());
            }
        }
        self.read_mapped(file, scratch, cluster_guest, m, in_off, n, bufs, pos)
    }

    #[allow(clippy::too_many_arguments)]
    fn read_mapped(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        m: Mapping,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        match m {
            Mapping::Unallocated => match &self.backing {
                Some(bk) => bk.read(scratch, cluster_guest + in_off, n, bufs, pos),
                None => io::zero_pieces(bufs, pos, n),
            },
            Mapping::Zero => io::zero_pieces(bufs, pos, n),
            Mapping::Data(h) => {
                io::for_each_piece(bufs, pos, n, |p, pp| file.read_slice(h + in_off + pp, &p))
            }
            Mapping::Compressed { .. } if self.data_file.is_some() => Err(corrupt(
                "compressed cluster in an image with an external data file",
            )),
            Mapping::Compressed { offset, len } => {
                let cs = self.cluster_size() as usize;
                // A compressed cluster never needs more input than a cluster plus a sector
                // of slack; a larger length is corrupt but harmless to cap.
                let len = (len as usize).min(cs + 1024);
                scratch.comp_in.resize(len, 0);
                io::read_bytes(file, offset, &mut scratch.comp_in)?;
                scratch.comp_out.resize(cs, 0);
                compress::decompress(
                    self.hdr.compression,
                    &scratch.comp_in,
                    &mut scratch.comp_out,
                )?;
                let s = in_off as usize;
                io::copy_to_pieces(bufs, pos, &scratch.comp_out[s..s + n as usize])
            }
        }
    }

    fn check_writable(&self) -> stdio::Result<()> {
        if self.read_only {
            return Err(stdio::Error::from_raw_os_error(libc::EROFS));
        }
        if self.corrupt.load(Ordering::Acquire) {
            return Err(stdio::Error::other(
                "qcow2: image marked corrupt after a metadata overlap; writes refused",
            ));
        }
        Ok(())
    }

    /// Sets the dirty bit on disk (and clears autoclear bits we do not maintain) before the
    /// first metadata change.
    fn ensure_dirty(&self) -> stdio::Result<()> {
        if self.dirty_on_disk.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = lock(&self.state);
        self.ensure_dirty_locked(&mut st)
    }

    fn ensure_dirty_locked(&self, st: &mut MetaState) -> stdio::Result<()> {
        if self.dirty_on_disk.load(Ordering::Acquire) {
            return Ok(());
        }
        st.incompatible |= INCOMPAT_DIRTY;
        io::write_bytes(
            &self.file,
            header::OFF_INCOMPATIBLE,
            &st.incompatible.to_be_bytes(),
        )?;
        if st.autoclear != 0 {
            // The only autoclear feature we maintain is "bitmaps consistent": we keep the
            // bitmaps consistent by having marked them all in use at open.
            let mut keep = if self.hdr.bitmaps.is_some() {
                header::AUTOCLEAR_BITMAPS
            } else {
                0
            };
            if self.data_raw {
                // We keep the data file a raw image of the disk.
                keep |= header::AUTOCLEAR_DATA_RAW;
            }
            st.autoclear &= keep;
            io::write_bytes(
                &self.file,
                header::OFF_AUTOCLEAR,
                &st.autoclear.to_be_bytes(),
            )?;
        }
        self.file.sync_point("qcow2.dirty-bit.set")?;
        self.dirty_on_disk.store(true, Ordering::Release);
        Ok(())
    }

    /// Overlap protection: refuses guest data writes to metadata clusters.
    ///
    /// Only sets the in-memory corrupt flag (later writes are refused at once): the caller
    /// may hold a `RESERVED` entry that a flush holding `state` waits for, so the header bit
    /// is written by [`Qcow2Shared::persist_corrupt`] once nothing is reserved, or by the
    /// next flush or close.
    fn check_overlap(&self, host: u64) -> stdio::Result<()> {
        if self.data_file.is_some() {
            // Guest data goes to the data file, which holds no metadata.
            return Ok(());
        }
        let c = HostCluster(host >> self.cluster_bits);
        if c.0 == 0 || self.clusters()?.is_meta(c) {
            if !self.corrupt.swap(true, Ordering::AcqRel) {
                error!(
                    "{}: guest write would overwrite metadata at {:#x}; marking the image \
                     corrupt",
                    self.path.display(),
                    host
                );
            }
            return Err(stdio::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Writes the corrupt bit to the header if overlap protection tripped. Takes `state`:
    /// never call it while holding a `RESERVED` entry.
    fn persist_corrupt(&self) {
        if self.corrupt.load(Ordering::Acquire) {
            let mut st = lock(&self.state);
            self.persist_corrupt_locked(&mut st);
        }
    }

    fn persist_corrupt_locked(&self, st: &mut MetaState) {
        if !self.corrupt.load(Ordering::Acquire) || st.incompatible & INCOMPAT_CORRUPT != 0 {
            return;
        }
        st.incompatible |= INCOMPAT_CORRUPT;
        if self.hdr.version >= 3 {
            let r = io::write_bytes(
                &self.file,
                header::OFF_INCOMPATIBLE,
                &st.incompatible.to_be_bytes(),
            )
            .and_then(|()| self.file.sync_point("qcow2.corrupt-bit"));
            if let Err(e) = r {
                error!(
                    "{}: writing the corrupt bit failed: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// Host clusters an entry holds a reference to.
    fn entry_refs(&self, e: u64) -> Vec<HostCluster> {
        if self.data_file.is_some() {
            // Data clusters in an external data file are not refcounted.
            return Vec::new();
        }
        l2::host_clusters(e, self.cluster_bits, self.extended)
            .map(HostCluster)
            .collect()
    }

    /// Bitmap of the subclusters that bytes `[in_off, in_off + n)` of a cluster touch
    /// (allocation bit positions; 0 without extended L2). `n` must be nonzero.
    fn touched(&self, in_off: u64, n: u64) -> u64 {
        if !self.extended {
            return 0;
        }
        let scs = self.cluster_size() / l2::SUBCLUSTERS;
        let first = in_off / scs;
        let last = (in_off + n - 1) / scs;
        ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1)
    }

    /// True if a write to the subclusters `mask` of the cluster (`e`, `b`) may go straight
    /// to its host cluster without changing the entry.
    fn in_place(&self, e: u64, b: u64, mask: u64) -> bool {
        e & COPIED != 0
            && self.has_host(e)
            && if self.extended {
                b & mask == mask
            } else {
                e & ZERO == 0
            }
    }

    /// Writes request bytes `[pos, pos + n)` to guest offset `g` (within one cluster).
    ///
    /// With extended L2, a cluster that is unallocated or exclusively owned (COPIED, not
    /// compressed) is written subcluster by subcluster: only the subclusters the request
    /// touches are written and marked allocated (see [`Qcow2Shared::write_subclusters`]).
    /// Shared and compressed clusters are copied whole.
    fn write_in_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        g: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let (i, j, in_off) = self.locate(GuestOffset(g));
        let mask = self.touched(in_off, n);
        let (mut credit, mut credited) = (None, false);
        loop {
            let t = self.table(i)?;
            let (e, b) = self.load_entry(&t, j);
            if self.in_place(e, b, mask) {
                let h = e & OFFSET_MASK;
                if let Err(err) = self.check_overlap(h) {
                    drop(t);
                    self.persist_corrupt();
                    return Err(err);
                }
                return io::write_pieces(file, h + in_off, bufs, pos, n);
            }
            // Before reserving: setting the dirty bit and taking a journal credit may wait
            // for a flush, and a flush waits for reserved entries.
            self.ensure_dirty()?;
            if !credited {
                credit = self.credit()?;
                credited = true;
                // The entry may have changed while we waited: look again.
                continue;
            }
            if let Some(r) =
                self.write_reserved(file, scratch, &t, j, e, b, g, n, bufs, pos, &mut credit)
            {
                return r;
            }
            std::thread::yield_now();
        }
    }

    /// The allocating part of [`Qcow2Shared::write_in_cluster`]: reserves entry `j` of table
    /// `t`, last seen as (`e`, `b`), writes the request's data and stores the new entry.
    /// `None` if the table was evicted or the entry changed since (look it up again).
    #[allow(clippy::too_many_arguments)]
    fn write_reserved(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        t: &L2Table,
        j: usize,
        e: u64,
        b: u64,
        g: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
        credit: &mut Option<journal::Credit<'_>>,
    ) -> Option<stdio::Result<()>> {
        let w = j * self.words;
        let in_off = g & (self.cluster_size() - 1);
        let mask = self.touched(in_off, n);
        // Pinned, the table cannot be evicted while we change it.
        if !t.pin() {
            return None;
        }
        if t.entries[w]
            .compare_exchange(e, RESERVED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            t.unpin();
            return None;
        }
        // The entry word may have come back to the value we saw after someone else changed
        // only the bitmap (a subcluster write keeps the host offset), so the bitmap we saw
        // may be stale: reread it now that nobody else can change it.
        let b = if self.extended {
            t.entries[w + 1].load(Ordering::Acquire)
        } else {
            b
        };
        let by_subcluster =
            self.extended && e & COMPRESSED == 0 && (e & OFFSET_MASK == 0 || e & COPIED != 0);
        let r = if by_subcluster {
            self.write_subclusters(file, scratch, g - in_off, e, b, in_off, n, bufs, pos)
                .map(|new_e| (new_e, (b | mask) & !(mask << 32)))
        } else {
            self.cow_cluster(file, scratch, g - in_off, e, b, in_off, n, bufs, pos)
                .map(|new_e| (new_e, ALL_ALLOC))
        };
        let r = match r {
            Ok((new_e, new_b)) if new_e == e && (!self.extended || new_b == b) => {
                // All touched subclusters were allocated after all: written in place,
                // nothing changed.
                t.entries[w].store(e, Ordering::Release);
                Ok(())
            }
            Ok((new_e, new_b)) => {
                self.publish(t, w, g >> self.cluster_bits, new_e, new_b, credit.take());
                // Only now, with the new entry stored and the table dirty, may the old host
                // clusters go to `pending`: a flush that takes them then also writes this
                // table (it snapshots dirty tables after taking `pending`), so they are
                // unreferenced only once the on-disk entry no longer points at them. (A
                // fresh allocation or a subcluster write has nothing to unreference and
                // takes no shared lock.)
                if new_e & OFFSET_MASK != e & OFFSET_MASK || e & COMPRESSED != 0 {
                    let refs = self.entry_refs(e);
                    if !refs.is_empty() {
                        lock(&self.pending).extend(refs);
                    }
                }
                Ok(())
            }
            Err(err) => {
                t.entries[w].store(e, Ordering::Release);
                Err(err)
            }
        };
        t.unpin();
        if r.is_err() {
            // Overlap protection may have tripped while we held the reservation; the header
            // bit is written only now that nothing waits on us.
            self.persist_corrupt();
        }
        Some(r)
    }

    /// Makes a new value of the reserved entry at word `w` of `t` (guest cluster `cluster`)
    /// visible: marks the table dirty, appends the change to the mapping journal, then stores
    /// the bitmap word and last the entry word, which ends the reservation. The order is the
    /// journal protocol's (journal.rs): a flush that reads the journal cursor after the append
    /// finds the table dirty, and changes of one entry reach the journal in their order.
    fn publish(
        &self,
        t: &L2Table,
        w: usize,
        cluster: u64,
        new_e: u64,
        new_b: u64,
        credit: Option<journal::Credit<'_>>,
    ) {
        t.mark_dirty(w);
        self.meta_dirty.store(true, Ordering::Release);
        if self.journal.is_none() {
            self.published.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(c) = credit {
            c.commit(journal::Record {
                cluster,
                entry: new_e,
                bitmap: if self.extended { new_b } else { 0 },
            });
        }
        if self.extended {
            t.entries[w + 1].store(new_b, Ordering::Release);
        }
        t.entries[w].store(new_e, Ordering::Release);
    }

    /// A journal credit for one mapping change (`None` without a journal). Taken before the
    /// entry is reserved: when the journal is full this writes the metadata back (a flush),
    /// which waits for reserved entries.
    fn credit(&self) -> stdio::Result<Option<journal::Credit<'_>>> {
        let Some(j) = &self.journal else {
            return Ok(None);
        };
        loop {
            if j.pressure() {
                // Make room before writers have to wait, if no flush is running already.
                if let Ok(mut st) = self.state.try_lock() {
                    if let Err(e) = self.flush_with(&mut st) {
                        debug!("{}: journal write-back failed: {e}", self.path.display());
                    }
                }
            }
            if let Some(c) = j.try_credit() {
                return Ok(Some(c));
            }
            // Full: a flush makes every record durable and frees the ring.
            self.flush()?;
            if let Some(c) = j.try_credit() {
                return Ok(Some(c));
            }
            std::thread::yield_now();
        }
    }

    /// Extended L2: writes request bytes `[pos, pos + n)` to `[in_off, in_off + n)` of the
    /// guest cluster at `cluster_guest`, described by (`e`, `b`), which is unallocated (a
    /// host cluster is allocated) or exclusively owned (written in place). Only the touched
    /// subclusters are written: a partly touched subcluster that was not allocated is
    /// completed from its old contents (backing file or zeros), one that was is written
    /// only where the request covers it. Returns the new entry word; the caller reserved the
    /// entry and sets the touched subclusters' allocation bits.
    #[allow(clippy::too_many_arguments)]
    fn write_subclusters(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        e: u64,
        b: u64,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<u64> {
        let keep = e & OFFSET_MASK != 0;
        self.write_to_target(cluster_guest, e, keep, |host, fresh| {
            self.fill_subclusters(file, scratch, cluster_guest, e, b, host, fresh, in_off, n)?;
            io::write_pieces(file, host + in_off, bufs, pos, n)
        })
    }

    /// Completes, at `host`, the parts of the first and last subclusters of `[in_off, in_off
    /// + n)` that the request does not cover and that do not hold data yet, from their old
    /// contents (see [`Qcow2Shared::write_subclusters`]).
    #[allow(clippy::too_many_arguments)]
    fn fill_subclusters(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        e: u64,
        b: u64,
        host: u64,
        fresh: bool,
        in_off: u64,
        n: u64,
    ) -> stdio::Result<()> {
        let scs = self.cluster_size() / l2::SUBCLUSTERS;
        let first = in_off / scs;
        let last = (in_off + n - 1) / scs;
        let end = in_off + n;
        // The parts of the first and last touched subclusters outside the request.
        for (sc, from, to) in [(first, first * scs, in_off), (last, end, (last + 1) * scs)] {
            if from == to || b & (1 << sc) != 0 {
                // Nothing to complete, or the subcluster already holds its data.
                continue;
            }
            if fresh && (b & (1 << (sc + 32)) != 0 || self.backing.is_none()) {
                // Old contents are zeros and so are the bytes of a cluster past the end of
                // the file: nothing to write, the file stays sparse.
                continue;
            }
            let mut buf = std::mem::take(&mut scratch.cluster);
            buf.resize((to - from) as usize, 0);
            let r = (|| {
                let s = [VolatileSlice::from(&mut buf[..])];
                self.read_in_cluster(file, scratch, cluster_guest, e, b, from, to - from, &s, 0)?;
                io::write_bytes(file, host + from, &buf)
            })();
            scratch.cluster = buf;
            r?;
        }
        Ok(())
    }

    /// Runs `write(host, fresh)` against the host cluster a rewrite of the guest cluster at
    /// `cluster_guest` (entry `e`) goes to: its current one with `keep`, else a new one
    /// ([`Qcow2Shared::alloc_data`]; `fresh` as there). Overlap protection is checked first.
    /// A new cluster is released (at the next flush) if anything fails. Returns the new
    /// entry word.
    fn write_to_target(
        &self,
        cluster_guest: u64,
        e: u64,
        keep: bool,
        write: impl FnOnce(u64, bool) -> stdio::Result<()>,
    ) -> stdio::Result<u64> {
        let (host, fresh) = if keep {
            (e & OFFSET_MASK, false)
        } else {
            self.alloc_data(cluster_guest)?
        };
        let r = self.check_overlap(host).and_then(|()| write(host, fresh));
        if r.is_err() && !keep {
            self.release_data(host);
        }
        r.map(|()| host | COPIED)
    }

    /// Builds the new contents of a guest cluster (old contents with the request's bytes
    /// merged in), writes them to its new (or, if exclusively owned, its current) host
    /// cluster and returns the new L2 entry. The entry is reserved by the caller.
    #[allow(clippy::too_many_arguments)]
    fn cow_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        e: u64,
        b: u64,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<u64> {
        let cs = self.cluster_size();
        let keep = e & COPIED != 0 && e & COMPRESSED == 0 && e & OFFSET_MASK != 0;
        let zeros = self.reads_as_zeros(e, b);
        self.write_to_target(cluster_guest, e, keep, |host, fresh| {
            if fresh && zeros {
                // The new cluster's bytes already read as zeros (holes or past EOF) and so do
                // the old contents: write only the request's bytes, straight from guest
                // memory. No read, no copy, no write amplification, and the file stays sparse.
                return io::write_pieces(file, host + in_off, bufs, pos, n);
            }
            let mut buf = std::mem::take(&mut scratch.cluster);
            buf.resize(cs as usize, 0);
            let r = (|| {
                if n < cs {
                    if zeros {
                        buf.fill(0);
                    } else {
                        let whole = [VolatileSlice::from(&mut buf[..])];
                        self.read_in_cluster(file, scratch, cluster_guest, e, b, 0, cs, &whole, 0)?;
                    }
                }
                io::copy_from_pieces(bufs, pos, &mut buf[in_off as usize..(in_off + n) as usize])?;
                io::write_bytes(file, host, &buf)
            })();
            scratch.cluster = buf;
            r
        })
    }

    /// Decodes an L2 entry. With an external data file, host offset 0 is a real offset
    /// (marked by COPIED, as the spec allows only there).
    fn decode(&self, e: u64) -> std::result::Result<Mapping, String> {
        if self.data_file.is_some()
            && e != RESERVED
            && e & (COMPRESSED | OFFSET_MASK) == 0
            && e & COPIED != 0
        {
            return l2::decode(e & !COPIED, self.cluster_bits, self.extended).map(|m| match m {
                Mapping::Unallocated => Mapping::Data(0),
                m => m,
            });
        }
        l2::decode(e, self.cluster_bits, self.extended)
    }

    /// True if uncompressed entry `e` maps a host cluster (with an external data file, offset
    /// 0 with COPIED counts).
    fn has_host(&self, e: u64) -> bool {
        e & COMPRESSED == 0
            && (e & OFFSET_MASK != 0 || (self.data_file.is_some() && e & COPIED != 0))
    }

    /// A host cluster for new guest data of the cluster at `cluster_guest`, and whether it is
    /// fresh (never used since open, past the end of the file at open: reads as zeros). With
    /// an external data file, the cluster at the same offset of the data file (as QEMU
    /// maps them), never fresh (it may hold old data).
    fn alloc_data(&self, cluster_guest: u64) -> stdio::Result<(u64, bool)> {
        if self.data_file.is_some() {
            return Ok((cluster_guest, false));
        }
        let (c, fresh) = self.clusters()?.alloc_fresh(false)?;
        Ok((c.0 << self.cluster_bits, fresh))
    }

    /// Gives back a host cluster from [`Qcow2Shared::alloc_data`] that was not used (at the
    /// next flush).
    fn release_data(&self, host: u64) {
        if self.data_file.is_none() {
            lock(&self.pending).push(HostCluster(host >> self.cluster_bits));
        }
    }

    /// The file guest data lives in: the external data file, or the image file.
    fn data_io(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Syncs guest data (the data file, if separate) before metadata that points at it.
    fn sync_guest_data(&self) -> stdio::Result<()> {
        match &self.data_file {
            Some(f) => f.sync_point("qcow2.flush.data"),
            None => self.file.sync_point("qcow2.flush.data"),
        }
    }

    /// Deallocates host bytes `[host, host + len)` of the external data file (best effort:
    /// file systems without hole punching keep the bytes; the entries no longer map them).
    fn punch_data(&self, host: u64, len: u64) {
        let Some(f) = &self.data_file else { return };
        if let Err(e) = f.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            host,
            len,
        ) {
            log::debug!(
                "{}: punching the data file at {host:#x}: {e}",
                self.path.display()
            );
        }
    }

    /// True if the guest cluster described by (`e`, `b`) reads as zeros throughout.
    fn reads_as_zeros(&self, e: u64, b: u64) -> bool {
        if e & COMPRESSED != 0 || e == RESERVED {
            return false;
        }
        if self.extended {
            !self.has_host(e)
                && b & ALL_ALLOC == 0
                && (self.backing.is_none() || b & ALL_ZERO == ALL_ZERO)
        } else {
            e & ZERO != 0 || (!self.has_host(e) && self.backing.is_none())
        }
    }

    /// Sets a whole guest cluster's entry to (`new_e`, `new_b`), dropping its old host
    /// references after the next flush.
    fn set_cluster(&self, g: u64, new_e: u64, new_b: u64) -> stdio::Result<()> {
        let (i, j, _) = self.locate(GuestOffset(g));
        let w = j * self.words;
        let (mut credit, mut credited) = (None, false);
        loop {
            let t = self.table(i)?;
            let (e, b) = self.load_entry(&t, j);
            if e == new_e && b == new_b {
                return Ok(());
            }
            self.ensure_dirty()?;
            if !credited {
                credit = self.credit()?;
                credited = true;
                continue;
            }
            if !t.pin() {
                std::thread::yield_now();
                continue;
            }
            if t.entries[w]
                .compare_exchange(e, RESERVED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                t.unpin();
                continue;
            }
            self.publish(&t, w, g >> self.cluster_bits, new_e, new_b, credit.take());
            t.unpin();
            let refs = self.entry_refs(e);
            if !refs.is_empty() {
                lock(&self.pending).extend(refs);
            }
            if self.has_host(e) && !self.has_host(new_e) {
                // No longer mapped: free the space in the data file (as QEMU passes discards
                // through to it). Without a data file the cluster is reused instead.
                self.punch_data(e & OFFSET_MASK, self.cluster_size());
            }
            return Ok(());
        }
    }

    /// Entry values for a whole cluster that reads as zeros.
    fn zero_entry(&self) -> Option<(u64, u64)> {
        if self.extended {
            Some((0, ALL_ZERO))
        } else if self.hdr.version >= 3 {
            Some((ZERO, 0))
        } else if self.backing.is_none() {
            Some((0, 0))
        } else {
            None
        }
    }

    fn write_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        bufs: &[GuestSlice<'_>],
    ) -> stdio::Result<()> {
        self.check_writable()?;
        let len = super::slices_len(bufs);
        self.mark_bitmaps(off, len)?;
        let cs = self.cluster_size();
        let mut done = 0;
        while done < len {
            let g = off + done;
            let n = (cs - (g & (cs - 1))).min(len - done);
            self.write_in_cluster(file, scratch, g, n, bufs, done)?;
            done += n;
        }
        Ok(())
    }

    fn discard_range(&self, off: u64, len: u64) -> stdio::Result<()> {
        self.check_writable()?;
        self.mark_bitmaps(off, len)?;
        let cs = self.cluster_size();
        let first = off.div_ceil(cs);
        let size = self.size.load(Ordering::Acquire);
        let end = (off + len).min(size);
        // The last partial cluster of the disk counts as whole when the range reaches the end.
        let last = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if self.data_raw {
            // The data file must stay the disk's raw image: keep every mapping and
            // deallocate the data in the file, which then reads as zeros, like the disk.
            for c in first..last {
                let (i, j, _) = self.locate(GuestOffset(c * cs));
                let (e, _) = self.load_entry(&**self.table(i)?, j);
                if self.has_host(e) {
                    self.punch_data(e & OFFSET_MASK, cs);
                }
            }
            return Ok(());
        }
        let (ne, nb) = if self.backing.is_some() {
            match self.zero_entry() {
                Some(z) => z,
                None => return Ok(()),
            }
        } else {
            (0, 0)
        };
        for c in first..last {
            self.set_cluster(c * cs, ne, nb)?;
        }
        Ok(())
    }

    fn write_zeroes_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        len: u64,
    ) -> stdio::Result<()> {
        self.check_writable()?;
        self.mark_bitmaps(off, len)?;
        let cs = self.cluster_size();
        let end = off + len;
        let mut g = off;
        // With a raw data file the zeros must be in the file: write them (no zero flags).
        let zero = if self.data_raw {
            None
        } else {
            self.zero_entry()
        };
        let size = self.size.load(Ordering::Acquire);
        while g < end {
            let in_off = g & (cs - 1);
            let n = (cs - in_off).min(end - g);
            let whole = in_off == 0 && (n == cs || g + n == size);
            match zero {
                Some((ze, zb)) if whole => self.set_cluster(g, ze, zb)?,
                _ if self.extended
                    && !self.data_raw
                    && self.zero_in_cluster(file, scratch, g, n)? => {}
                _ => self.write_zero_bytes(file, scratch, g, n)?,
            }
            g += n;
        }
        Ok(())
    }

    /// Records a guest change of `[off, off + len)` in the enabled persistent bitmaps.
    fn mark_bitmaps(&self, off: u64, len: u64) -> stdio::Result<()> {
        match &self.bitmaps {
            Some(b) => b.mark(&self.file, off, len),
            None => Ok(()),
        }
    }

    /// Writes `n` zero bytes at guest offset `g` (within one cluster).
    fn write_zero_bytes(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        g: u64,
        n: u64,
    ) -> stdio::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut zeros = vec![0u8; n as usize];
        let s = [VolatileSlice::from(&mut zeros[..])];
        self.write_in_cluster(file, scratch, g, n, &s, 0)
    }

    /// Extended L2: zeroes `[g, g + n)` (within one cluster) by setting the zero bits of the
    /// whole subclusters inside it and writing zero bytes only to the partial subclusters
    /// at its ends. False (nothing done) if no subcluster is whole or the cluster is
    /// compressed.
    fn zero_in_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        g: u64,
        n: u64,
    ) -> stdio::Result<bool> {
        let scs = self.cluster_size() / l2::SUBCLUSTERS;
        let in_off = g & (self.cluster_size() - 1);
        let end = in_off + n;
        let first = in_off.div_ceil(scs);
        // The last partial subcluster of the disk counts as whole when the range reaches the
        // end.
        let last = if g + n == self.size.load(Ordering::Acquire) {
            end.div_ceil(scs)
        } else {
            end / scs
        };
        if first >= last {
            return Ok(false);
        }
        let mask = ((1u64 << last) - 1) & !((1u64 << first) - 1);
        if !self.zero_subclusters(g - in_off, mask)? {
            return Ok(false);
        }
        let head = first * scs - in_off;
        self.write_zero_bytes(file, scratch, g, head)?;
        let tail = end.saturating_sub(last * scs);
        self.write_zero_bytes(file, scratch, g + n - tail, tail)?;
        Ok(true)
    }

    /// Extended L2: makes subclusters `mask` of the guest cluster at `g` read as zeros:
    /// sets their zero bits and clears their allocation bits (a host cluster stays
    /// referenced by the entry). False if the cluster is compressed (it has no bitmap).
    fn zero_subclusters(&self, g: u64, mask: u64) -> stdio::Result<bool> {
        let (i, j, _) = self.locate(GuestOffset(g));
        let w = j * self.words;
        let (mut credit, mut credited) = (None, false);
        loop {
            let t = self.table(i)?;
            let (e, b) = self.load_entry(&t, j);
            if e & COMPRESSED != 0 {
                return Ok(false);
            }
            if b & mask == 0 && (b >> 32) & mask == mask {
                return Ok(true);
            }
            self.ensure_dirty()?;
            if !credited {
                credit = self.credit()?;
                credited = true;
                continue;
            }
            if !t.pin() {
                std::thread::yield_now();
                continue;
            }
            if t.entries[w]
                .compare_exchange(e, RESERVED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                t.unpin();
                continue;
            }
            // Reread: the bitmap may have changed while the entry word kept its value.
            let b = t.entries[w + 1].load(Ordering::Acquire);
            let new_b = (b & !mask) | (mask << 32);
            self.publish(&t, w, g >> self.cluster_bits, e, new_b, credit.take());
            t.unpin();
            return Ok(true);
        }
    }

    /// Makes all completed writes and metadata changes durable.
    fn flush(&self) -> stdio::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = lock(&self.state);
        let r = self.flush_with(&mut st);
        drop(st);
        // Written tables are clean now: bring the L2 cache back within its budget.
        if r.is_ok()
            && self.loaded.load(Ordering::Acquire) > self.cache_tables.load(Ordering::Relaxed)
        {
            self.evict_some(usize::MAX);
        }
        r
    }

    /// Flush with the flush lock held: writes the metadata back if any changed (else only
    /// syncs data), and drops the journal records the flush made durable.
    fn flush_with(&self, st: &mut MetaState) -> stdio::Result<()> {
        self.persist_corrupt_locked(st);
        // Journal protocol (journal.rs): the cursor is read, and every record below it
        // committed, before the dirty tables are snapshotted.
        let upto = self.journal.as_ref().map(|j| {
            let c = j.cursor();
            j.wait_committed(c);
            c
        });
        // Likewise without a journal: changes published before this are in the snapshot.
        let published = self.published.load(Ordering::Acquire);
        let r = if self.meta_dirty.swap(false, Ordering::AcqRel) {
            let r = self.flush_locked(st);
            if r.is_err() {
                self.meta_dirty.store(true, Ordering::Release);
            }
            r
        } else {
            // Nothing changed since the last completed flush, which wrote every change
            // recorded before this cursor.
            self.sync_guest_data()
        };
        if r.is_ok() {
            if let (Some(j), Some(c)) = (&self.journal, upto) {
                j.advance(c);
            }
            self.written_back.fetch_max(published, Ordering::AcqRel);
        }
        r
    }

    fn flush_locked(&self, st: &mut MetaState) -> stdio::Result<()> {
        let clusters = self.clusters()?;
        if let Some(h) = self.holes.take_checked() {
            let n = clusters.release_holes(&h);
            debug!(
                "{}: {n} checked free cluster(s) back in use",
                self.path.display()
            );
        }
        self.ensure_dirty_locked(st)?;
        let cs = self.cluster_size() as usize;
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut unref_after: Vec<HostCluster> = Vec::new();
        // 1. Snapshot dirty L2 tables, giving each a host cluster it owns. A table written in
        //    place is written only where it changed (its dirty pieces); a table that gets a
        //    new cluster is written whole.
        let mut tables: Vec<(usize, u64, u64)> = Vec::new();
        let mut snap: Vec<Arc<L2Table>> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut snap_err = None;
        let l1_len = self.l1_len.load(Ordering::Acquire);
        for (i, slot) in self.l2.iter().take(l1_len).enumerate() {
            let t = slot.load();
            if Arc::ptr_eq(&t, &self.absent) {
                continue;
            }
            let Some(mut pieces) = t.begin_write() else {
                continue;
            };
            // Being written, the table cannot be evicted until `end_write`.
            snap.push(Guard::into_inner(t));
            let Some(t) = snap.last() else { continue };
            let l1e = self.l1[i].load(Ordering::Acquire);
            if l1e & COPIED == 0 || l1e & OFFSET_MASK == 0 {
                let c = match clusters.alloc(true) {
                    Ok(c) => c,
                    Err(e) => {
                        // Leave through the common failure path below, which makes the
                        // snapshotted tables dirty again and keeps `pending`.
                        snap_err = Some(e);
                        break;
                    }
                };
                if l1e & OFFSET_MASK != 0 {
                    unref_after.push(HostCluster((l1e & OFFSET_MASK) >> self.cluster_bits));
                }
                self.l1[i].store((c.0 << self.cluster_bits) | COPIED, Ordering::Release);
                self.l1_dirty.store(true, Ordering::Release);
                pieces = u64::MAX;
            }
            let at = buf.len();
            buf.resize(at + cs, 0);
            while !t.to_bytes(&mut buf[at..]) {
                std::thread::yield_now();
            }
            tables.push((i, self.l1[i].load(Ordering::Acquire) & OFFSET_MASK, pieces));
        }
        let r = (|| {
            if let Some(e) = snap_err.take() {
                return Err(e);
            }
            // 2. Data first.
            self.sync_guest_data()?;
            // 3. Refcount blocks (allocating blocks and growing the table as needed).
            self.write_refcounts(st, clusters, &mut unref_after)?;
            // 4. L2 tables (their changed pieces).
            for (k, &(_, off, pieces)) in tables.iter().enumerate() {
                let piece = snap[k].piece_bytes();
                for (start, end) in io::piece_runs(pieces, piece, cs) {
                    io::write_bytes(&self.file, off + start as u64, &buf[k * cs..][start..end])?;
                }
            }
            self.file.sync_point("qcow2.flush.tables")?;
            // 5. L1 table.
            if self.l1_dirty.swap(false, Ordering::AcqRel) {
                let mut l1b = Vec::with_capacity(l1_len * 8);
                for e in self.l1.iter().take(l1_len) {
                    l1b.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
                }
                if let Err(e) = io::write_bytes(&self.file, st.l1_offset, &l1b) {
                    self.l1_dirty.store(true, Ordering::Release);
                    return Err(e);
                }
                self.file.sync_point("qcow2.flush.l1")?;
            }
            Ok(())
        })();
        for t in &snap {
            t.end_write(r.is_ok());
        }
        if let Err(e) = r {
            lock(&self.pending).extend(pending);
            lock(&self.pending).extend(unref_after);
            return Err(e);
        }
        // 6. The unmappings are durable: drop the references.
        if !pending.is_empty() || !unref_after.is_empty() {
            // `pending` holds clusters guest data entries referenced: never metadata (loads
            // refuse such entries; this is the last line of defence). Leaking a cluster is
            // harmless, dropping a metadata cluster's reference is not.
            let guarded = pending
                .into_iter()
                .filter(|&c| {
                    let meta = c.0 == 0 || clusters.is_meta(c);
                    if meta {
                        error!(
                            "{}: not unreferencing metadata cluster {:#x} unmapped from guest \
                             data",
                            self.path.display(),
                            c.0 << self.cluster_bits
                        );
                    }
                    !meta
                })
                .collect::<Vec<_>>();
            let mut zero = Vec::new();
            for c in guarded.into_iter().chain(unref_after) {
                match clusters.unref_keep(c) {
                    Ok(true) => zero.push(c),
                    Ok(false) => {}
                    // The unmapping is durable already; the cluster stays referenced.
                    Err(e) => error!("{}: {e}", self.path.display()),
                }
            }
            if !zero.is_empty() {
                // Requests that started before this bump may still use these clusters.
                let tag = self.epoch.fetch_add(1, Ordering::SeqCst);
                lock(&self.deferred).extend(zero.into_iter().map(|c| (tag, c)));
            }
            self.meta_dirty.store(true, Ordering::Release);
        }
        self.reclaim(clusters);
        Ok(())
    }

    /// Writes dirty refcount blocks; allocates missing blocks and grows the refcount table
    /// (refcount blocks and tables account for themselves).
    /// log2 of refcount entries per refcount block.
    fn block_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.hdr.refcount_order
    }

    /// log2 of refcount entries per dirty-tracking piece: one 4 KiB page of refcounts, or
    /// the whole block when blocks are smaller.
    fn refcount_piece_shift(&self) -> u32 {
        self.block_shift().min(15 - self.hdr.refcount_order)
    }

    fn write_refcounts(
        &self,
        st: &mut MetaState,
        clusters: &Clusters,
        unref_after: &mut Vec<HostCluster>,
    ) -> stdio::Result<()> {
        let cs = self.cluster_size();
        // Dirty refcounts are tracked per piece (4 KiB of a refcount block, or the whole
        // block): a block that already has its cluster is written only where it changed.
        let pps = self.block_shift() - self.refcount_piece_shift(); // log2 pieces per block
        let piece_bytes = cs >> pps;
        let mut pieces: std::collections::BTreeSet<u64> =
            clusters.take_dirty_pieces().into_iter().collect();
        if pieces.is_empty() && !st.rt_dirty && !st.rt_moved {
            return Ok(());
        }
        let r = (|| {
            loop {
                let mut changed = false;
                let max_b = pieces.iter().next_back().map_or(0, |&p| p >> pps);
                if max_b as usize >= st.rt.len() {
                    let want = ((max_b + 1) * 2).max(st.rt.len() as u64 * 2);
                    let n = (want * 8).div_ceil(cs);
                    if n * cs > header::MAX_REFTABLE_BYTES * 8 {
                        return Err(stdio::Error::other("qcow2: refcount table too large"));
                    }
                    let start = clusters.alloc_contiguous(n)?;
                    let old = HostCluster(st.rt_offset >> self.cluster_bits);
                    for k in 0..st.rt_clusters as u64 {
                        unref_after.push(HostCluster(old.0 + k));
                    }
                    st.rt.resize((n * cs / 8) as usize, 0);
                    st.rt_offset = start.0 << self.cluster_bits;
                    st.rt_clusters = n as u32;
                    st.rt_dirty = true;
                    st.rt_moved = true;
                    changed = true;
                }
                let blocks: std::collections::BTreeSet<u64> =
                    pieces.iter().map(|&p| p >> pps).collect();
                for b in blocks {
                    if (b as usize) < st.rt.len() && st.rt[b as usize] == 0 {
                        let c = clusters.alloc(true)?;
                        st.rt[b as usize] = c.0 << self.cluster_bits;
                        st.rt_dirty = true;
                        changed = true;
                        // A new block's cluster holds anything: write all of it.
                        pieces.extend((b << pps)..((b + 1) << pps));
                    }
                }
                pieces.extend(clusters.take_dirty_pieces());
                if !changed && pieces.iter().all(|&p| ((p >> pps) as usize) < st.rt.len()) {
                    break;
                }
            }
            let mut vals = std::mem::take(&mut st.rc_values);
            let mut out = std::mem::take(&mut st.rc_bytes);
            // Runs of consecutive dirty pieces within one block, each one write.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &p in &pieces {
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == p && (p >> pps) == (*first >> pps) => {
                        *n += 1
                    }
                    _ => runs.push((p, 1)),
                }
            }
            let r = runs.iter().try_for_each(|&(first, n)| {
                clusters.piece_values_into(first, n, &mut vals);
                let len = (n * piece_bytes) as usize;
                out.resize(len, 0);
                refcount::encode_block(&vals, self.hdr.refcount_order, &mut out[..len]);
                let in_block = (first & ((1 << pps) - 1)) * piece_bytes;
                io::write_bytes(
                    &self.file,
                    st.rt[(first >> pps) as usize] + in_block,
                    &out[..len],
                )
            });
            st.rc_values = vals;
            st.rc_bytes = out;
            r?;
            // No sync orders a new refcount block before the table entry that points at it:
            // refcounts are only ever written while the image is dirty (durable since before
            // the first metadata change), and a dirty image gets its refcounts rebuilt at
            // open, dropping table entries that point outside the file (rebuild.rs). The
            // power-loss harness checks this.
            if st.rt_dirty {
                let mut tb = Vec::with_capacity(st.rt.len() * 8);
                for e in &st.rt {
                    tb.extend_from_slice(&e.to_be_bytes());
                }
                io::write_bytes(&self.file, st.rt_offset, &tb)?;
                st.rt_dirty = false;
            }
            if st.rt_moved {
                self.file.sync_point("qcow2.refcount-table.moved")?;
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&st.rt_offset.to_be_bytes());
                f[8..].copy_from_slice(&st.rt_clusters.to_be_bytes());
                io::write_bytes(&self.file, header::OFF_REFCOUNT_TABLE, &f)?;
                st.rt_moved = false;
            }
            Ok(())
        })();
        if r.is_err() {
            // Whole blocks again: a block given a cluster by this failed flush may be only
            // partly written there.
            let blocks: std::collections::BTreeSet<u64> =
                pieces.iter().map(|&p| p >> pps).collect();
            for b in blocks {
                for p in (b << pps)..((b + 1) << pps) {
                    clusters.redirty_piece(p);
                }
            }
        }
        r
    }

    /// Flushes until no metadata is left dirty: unreferences at the end of a flush dirty
    /// refcount blocks again, a few rounds settle.
    fn flush_settled(&self) -> stdio::Result<()> {
        for _ in 0..4 {
            self.flush()?;
            if !self.meta_dirty.load(Ordering::Acquire) {
                break;
            }
        }
        Ok(())
    }

    /// Flushes everything and clears the dirty bit.
    fn close(&self) -> stdio::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_settled()?;
        if !self.corrupt.load(Ordering::Acquire) {
            self.store_bitmaps()?;
        }
        let mut st = lock(&self.state);
        self.persist_corrupt_locked(&mut st);
        if self.hdr.version >= 3
            && self.dirty_on_disk.load(Ordering::Acquire)
            && !self.meta_dirty.load(Ordering::Acquire)
            && !self.corrupt.load(Ordering::Acquire)
        {
            st.incompatible &= !INCOMPAT_DIRTY;
            io::write_bytes(
                &self.file,
                header::OFF_INCOMPATIBLE,
                &st.incompatible.to_be_bytes(),
            )?;
            self.file.sync_point("qcow2.close.dirty-bit")?;
            self.dirty_on_disk.store(false, Ordering::Release);
        }
        Ok(())
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

fn check_l1_entry(e: u64, cs: u64, file_len: u64) -> std::result::Result<(), String> {
    if e & !(OFFSET_MASK | COPIED) != 0 {
        return Err(format!("{e:#x} has reserved bits set"));
    }
    let off = e & OFFSET_MASK;
    if !off.is_multiple_of(cs) {
        return Err(format!("L2 table offset {off:#x} is not cluster aligned"));
    }
    if off != 0 && off + cs > file_len.next_multiple_of(cs) {
        return Err(format!(
            "L2 table offset {off:#x} is past the end of the file"
        ));
    }
    Ok(())
}

/// Opens the mapping journal of a writable image as `mode` asks; `None` means there is none
/// and metadata is written through instead (see [`JournalMode`]).
fn open_journal(
    image: &Path,
    file: &File,
    cluster_bits: u32,
    mode: &JournalMode,
) -> Result<Option<journal::Opened>> {
    let dir = match mode {
        JournalMode::Off => return Ok(None),
        JournalMode::Default => Path::new(DEFAULT_JOURNAL_DIR),
        JournalMode::Dir(d) => d.as_path(),
    };
    match journal::Journal::open(dir, file, cluster_bits) {
        Ok(o) => Ok(Some(o)),
        Err(e) if *mode == JournalMode::Default => {
            warn!(
                "{}: no mapping journal in {DEFAULT_JOURNAL_DIR} ({e}); writing metadata back \
                 before completing each request that changes a mapping instead (slower; \
                 --journal-dir chooses another tmpfs directory)",
                image.display()
            );
            Ok(None)
        }
        Err(e) => Err(Error::InvalidOption(format!(
            "--journal-dir {}: {e}",
            dir.display()
        ))),
    }
}

/// Opens the external data file `name` of the image at `image` (a relative name is relative
/// to the image's directory, as for backing files). It must be a regular file or a block
/// device other than the image itself (guest writes into the image file would overwrite
/// its metadata).
fn open_data_file(image: &Path, image_file: &File, name: &str, read_only: bool) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::InvalidImage {
            path: image.to_owned(),
            reason: format!("data file '{name}' is not a plain file name"),
        });
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(p)
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .map_err(|source| Error::OpenImage {
            path: path.clone(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| Error::OpenImage {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: &str| Error::InvalidImage {
        path: path.clone(),
        reason: format!("external data file: {reason}"),
    };
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(bad("not a regular file or block device"));
    }
    let img = image_file.metadata().map_err(|source| Error::OpenImage {
        path: image.to_owned(),
        source,
    })?;
    if (img.dev(), img.ino()) == (meta.dev(), meta.ino()) {
        return Err(bad("it is the image file itself"));
    }
    lock::claim(&file, &path, Role::data_file(!read_only))?;
    Ok(file)
}

fn open_backing(overlay: &Path, name: &str, format: Option<&str>, depth: u32) -> Result<Backing> {
    let inval = |reason: String| Error::InvalidImage {
        path: overlay.to_owned(),
        reason,
    };
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(inval(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} images"
        )));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(inval(format!(
            "backing file '{name}' is not a plain file name"
        )));
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_owned()
    } else {
        overlay.parent().unwrap_or_else(|| Path::new(".")).join(p)
    };
    match format {
        Some("qcow2") => Ok(Backing::Qcow2(Arc::new(Qcow2Shared::open(
            &path,
            true,
            depth + 1,
            &JournalMode::Off,
            None,
        )?))),
        Some("raw") => {
            let file = File::open(&path).map_err(|source| Error::OpenImage {
                path: path.clone(),
                source,
            })?;
            lock::claim(&file, &path, Role::Backing)?;
            let size = file
                .metadata()
                .map_err(|source| Error::OpenImage {
                    path: path.clone(),
                    source,
                })?
                .len();
            Ok(Backing::Raw {
                file: HostFile::new(file, None, "backing"),
                size,
            })
        }
        Some(f) => Err(inval(format!(
            "backing file '{name}' has format '{f}'; only qcow2 and raw backing files are supported"
        ))),
        None => Err(inval(format!(
            "backing file '{name}' has no recorded format; refusing to probe it (set one with \
             'qemu-img rebase -u -b {name} -F raw|qcow2')"
        ))),
    }
}

/// Opens the file guest data lives in (the image, or its external data file) again with
/// O_DIRECT, through `/proc/self/fd` so that no path is looked up twice. Returns it with the
/// memory alignment O_DIRECT needs; refuses file systems without O_DIRECT and files that need
/// a larger offset alignment than guest data extents have.
fn open_direct(shared: &Qcow2Shared, opts: &ImageOptions) -> Result<(HostFile, usize)> {
    let invalid = |reason: String| Error::InvalidImage {
        path: opts.path.clone(),
        reason,
    };
    let data = shared.data_io();
    let file = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", data.fd()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => {
                invalid("the file system does not support O_DIRECT (--direct)".into())
            }
            _ => Error::OpenImage {
                path: opts.path.clone(),
                source: e,
            },
        })?;
    let block_device = file
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device());
    let (mem_align, offset_align) = super::raw::direct_alignment(&file, block_device);
    // Guest data extents start at a multiple of the logical block size within a (sub)cluster.
    let granule = if shared.extended {
        shared.cluster_size() / l2::SUBCLUSTERS
    } else {
        shared.cluster_size()
    };
    let align = u64::from(opts.logical_block_size).min(granule);
    if offset_align as u64 > align {
        return Err(invalid(format!(
            "O_DIRECT on this file needs {offset_align}-byte aligned I/O, but guest data may sit \
             at {align}-byte multiples; use --logical-block-size {offset_align} (if the \
             clusters are at least that large) or drop --direct"
        )));
    }
    let recorder = opts.recorder.as_ref();
    let name = if shared.data_file.is_some() {
        "data"
    } else {
        "image"
    };
    Ok((HostFile::new(file, recorder, name), mem_align))
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
            Some(open_direct(&shared, opts)?)
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
#[doc(hidden)]
pub mod bench_support {
    use std::io as stdio;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use vm_memory::VolatileSlice;

    use super::alloc::{self, HostCluster};
    use super::l2::{self, Mapping};
    use super::{GuestOffset, Qcow2Shared, Scratch};
    use crate::error::Result;

    /// Host cluster accounting on its own (no image file).
    pub struct Clusters(alloc::Clusters);

    impl Clusters {
        /// `used` clusters with refcount 1 followed by `free` clusters with refcount 0
        /// (64 KiB clusters with 16-bit refcounts: 2^15 refcounts per block).
        pub fn new(used: u64, free: u64) -> Clusters {
            let mut rc = vec![1u64; used as usize];
            rc.resize((used + free) as usize, 0);
            Clusters(alloc::Clusters::new(rc, used + free, 15))
        }

        /// Allocates a cluster (free bitmap first, then the end); returns its index.
        pub fn alloc(&self) -> stdio::Result<u64> {
            self.0.alloc(false).map(|c| c.0)
        }

        /// Drops the reference taken by [`Clusters::alloc`]; the cluster becomes free.
        pub fn release(&self, c: u64) -> stdio::Result<()> {
            self.0.unref(HostCluster(c))
        }

        /// The overlap check run on every guest overwrite.
        pub fn is_meta(&self, c: u64) -> bool {
            self.0.is_meta(HostCluster(c))
        }

        /// Refcount of cluster `c`.
        pub fn refcount(&self, c: u64) -> u64 {
            self.0.get(HostCluster(c))
        }
    }

    /// A qcow2 image opened through the engine, with one private queue context.
    pub struct Image {
        pub(crate) shared: Arc<Qcow2Shared>,
        scratch: Scratch,
        pub(crate) slot: Arc<AtomicU64>,
    }

    impl Image {
        /// Opens the image at `path` (repairing it first if it is dirty and writable).
        pub fn open(path: &Path, read_only: bool) -> Result<Image> {
            Image::open_journaled(path, read_only, &super::JournalMode::Off)
        }

        /// Opens the image at `path` with a mapping journal as `journal` says (replaying
        /// what an earlier user of the image left in it).
        pub fn open_journaled(
            path: &Path,
            read_only: bool,
            journal: &super::JournalMode,
        ) -> Result<Image> {
            let shared = Arc::new(Qcow2Shared::open(path, read_only, 0, journal, None)?);
            Ok(Image {
                slot: shared.register_slot(),
                shared,
                scratch: Scratch::default(),
            })
        }

        /// Another handle (own scratch buffers) on the same image, as a second queue.
        #[cfg(test)]
        pub(crate) fn from_shared(shared: Arc<Qcow2Shared>) -> Image {
            Image {
                slot: shared.register_slot(),
                shared,
                scratch: Scratch::default(),
            }
        }

        /// Cluster size in bytes.
        pub fn cluster_size(&self) -> u64 {
            self.shared.cluster_size()
        }

        /// Guest size in bytes.
        pub fn size(&self) -> u64 {
            self.shared.size.load(Ordering::Acquire)
        }

        /// Host offset of the guest byte at `guest` for a plain data cluster (L2 lookup,
        /// loading the table on first use); `None` for anything else.
        pub fn lookup(&self, guest: u64) -> stdio::Result<Option<u64>> {
            let s = &self.shared;
            let (i, j, in_off) = s.locate(GuestOffset(guest));
            let (e, _) = s.load_entry(&**s.table(i)?, j);
            match l2::decode(e, s.cluster_bits, s.extended) {
                Ok(Mapping::Data(h)) => Ok(Some(h + in_off)),
                _ => Ok(None),
            }
        }

        /// Writes `data` at guest offset `off`.
        pub fn write(&mut self, off: u64, data: &mut [u8]) -> stdio::Result<()> {
            let s = [VolatileSlice::from(data)];
            self.shared.begin_request(&self.slot);
            let r = self
                .shared
                .write_range(&self.shared.file, &mut self.scratch, off, &s);
            self.shared.end_request(&self.slot);
            r
        }

        /// Reads `buf.len()` bytes at guest offset `off`.
        pub fn read(&mut self, off: u64, buf: &mut [u8]) -> stdio::Result<()> {
            let len = buf.len() as u64;
            let s = [VolatileSlice::from(buf)];
            self.shared.begin_request(&self.slot);
            let r = self
                .shared
                .read_range(&self.shared.file, &mut self.scratch, off, len, &s, 0);
            self.shared.end_request(&self.slot);
            r
        }

        /// Marks the first `n` L2 tables currently in memory dirty (as a write would);
        /// returns how many were marked.
        pub fn dirty_tables(&self, n: usize) -> usize {
            let mut k = 0;
            for slot in &self.shared.l2 {
                if k == n {
                    break;
                }
                let t = slot.load();
                if t.pin() {
                    t.mark_all_dirty();
                    t.unpin();
                    k += 1;
                }
            }
            if k > 0 {
                self.shared.meta_dirty.store(true, Ordering::Release);
            }
            k
        }

        /// L2 tables in memory.
        pub fn loaded_tables(&self) -> usize {
            self.shared.loaded.load(Ordering::Acquire)
        }

        /// Sets the L2 cache budget (see [`super::Qcow2Image::set_cache_bytes`]).
        pub fn set_cache_bytes(&self, bytes: u64) {
            self.shared.set_cache_bytes(bytes);
        }

        /// Flushes (data sync, dirty refcount blocks and L2 tables, L1).
        pub fn flush(&self) -> stdio::Result<()> {
            self.shared.flush()
        }

        /// Clean close: flush and clear the dirty bit.
        pub fn close(&self) -> stdio::Result<()> {
            self.shared.close()
        }

        /// Discards guest bytes `[off, off + len)`.
        #[cfg(test)]
        pub(crate) fn discard(&mut self, off: u64, len: u64) -> stdio::Result<()> {
            self.shared.begin_request(&self.slot);
            let r = self.shared.discard_range(off, len);
            self.shared.end_request(&self.slot);
            r
        }

        /// Makes guest bytes `[off, off + len)` read as zeros.
        #[cfg(test)]
        pub(crate) fn write_zeroes(&mut self, off: u64, len: u64) -> stdio::Result<()> {
            self.shared.begin_request(&self.slot);
            let r = self
                .shared
                .write_zeroes_range(&self.shared.file, &mut self.scratch, off, len);
            self.shared.end_request(&self.slot);
            r
        }

        /// The mapping journal's file, if the image has a journal.
        #[cfg(test)]
        pub(crate) fn journal_path(&self) -> Option<std::path::PathBuf> {
            self.shared.journal.as_ref().map(|j| j.path().to_owned())
        }
    }
}

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
            t.entries[0].store(x | super::COPIED | super::ZERO, Ordering::Release);
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
        let (e, b) = s.load_entry(&t, 0);
        assert_eq!(b, 1);
        // Another queue writes part of subcluster 1 and all of subcluster 2 meanwhile.
        a.write(sub + 1000, &mut vec![2u8; (2 * sub - 1000) as usize])
            .unwrap();
        assert_eq!(s.load_entry(&t, 0), (e, 0b111));
        // Our write, with what we saw before: 100 bytes at the start of subcluster 1.
        let mut d = [3u8; 100];
        let bufs = [vm_memory::VolatileSlice::from(&mut d[..])];
        let mut scratch = super::Scratch::default();
        s.write_reserved(
            &s.file,
            &mut scratch,
            &t,
            0,
            e,
            b,
            sub,
            100,
            &bufs,
            0,
            &mut None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.load_entry(&t, 0), (e, 0b111), "allocation bits kept");
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

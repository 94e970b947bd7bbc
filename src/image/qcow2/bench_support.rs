//! Internal entry points for the criterion benchmarks (`benches/qcow2.rs`) and the
//! `qcow2-open-bench` example. **Not a stable API**: it may change or disappear in any
//! release.

use std::io as stdio;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::alloc::{self, HostCluster};
use super::l2::Mapping;
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
        let word = s.load_entry(&**s.table(i)?, j).word;
        match word.decode(s.cluster_bits, s.extended) {
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

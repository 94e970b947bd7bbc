//! The L2 table cache: loading a table (checked against the image), eviction under the
//! budget, and checking entries before they are trusted.

use super::l2::{COPIED, OFFSET_MASK};
use super::*;

/// What [`Qcow2Shared::claim_table`] found in a table's cache slot.
pub(super) enum Claim {
    /// The table is in memory.
    Ready,
    /// Someone else is reading it from the image.
    Loading,
    /// The caller holds the slot (with this marker) and must read the table from host offset
    /// `at`, then call [`Qcow2Shared::finish_load`].
    Claimed { marker: Arc<L2Table>, at: u64 },
}

impl Qcow2Shared {
    /// The L2 table for L1 index `i`, loading it if it is not in memory.
    ///
    /// The returned guard keeps the table alive (even if it is evicted meanwhile) without
    /// touching a shared reference count. Modifying entries needs [`L2Table::pin`]; if that
    /// fails the table was evicted and the caller looks it up again.
    pub(super) fn table(&self, i: usize) -> stdio::Result<Guard<Arc<L2Table>>> {
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
            self.finish_load(i, &marker, self.read_table(i), true)?;
        }
    }

    /// Claims the cache slot of table `i` for an asynchronous load (the io_uring engine's).
    /// A table without a cluster is made at once (zeros, no I/O).
    pub(super) fn claim_table(&self, i: usize) -> stdio::Result<Claim> {
        let slot = self
            .l2
            .get(i)
            .ok_or_else(|| corrupt(format!("L1 index {i} out of range")))?;
        let cur = slot.load();
        if !Arc::ptr_eq(&cur, &self.absent) {
            return Ok(if cur.is_loading() {
                Claim::Loading
            } else {
                Claim::Ready
            });
        }
        drop(cur);
        let marker = Arc::new(L2Table::loading());
        let prev = slot.compare_and_swap(&self.absent, marker.clone());
        if !Arc::ptr_eq(&prev, &self.absent) {
            return Ok(Claim::Loading);
        }
        let at = self.l1_entry(i).l2_offset();
        if at == 0 {
            self.finish_load(i, &marker, self.read_table(i), false)?;
            return Ok(Claim::Ready);
        }
        Ok(Claim::Claimed { marker, at })
    }

    /// Puts table `i`, read into the slot claimed with `marker`, in the cache (or, if reading
    /// or checking it failed, empties the slot and returns the error). Past the budget, evicts
    /// clean tables, and with `write_back` may flush dirty ones (never from a queue engine
    /// that may hold reservations: the flush would wait for them).
    pub(super) fn finish_load(
        &self,
        i: usize,
        marker: &Arc<L2Table>,
        table: stdio::Result<L2Table>,
        write_back: bool,
    ) -> stdio::Result<()> {
        let slot = &self.l2[i];
        match table {
            Ok(t) => slot.store(Arc::new(t)),
            Err(e) => {
                marker.fail_loading();
                slot.store(self.absent.clone());
                return Err(e);
            }
        }
        let n = self.loaded.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.cache_tables.load(Ordering::Relaxed) {
            if write_back {
                self.shrink_cache(i);
            } else {
                self.evict_some(i);
            }
        }
        Ok(())
    }

    /// Reads and checks table `i` from the image (zeros if it has no cluster yet).
    pub(super) fn read_table(&self, i: usize) -> stdio::Result<L2Table> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let off = self.l1_entry(i).l2_offset();
        let cs = self.cluster_size() as usize;
        if off == 0 {
            // From now on only we write this table: a reload after eviction reads back what
            // we wrote (entries pointing at clusters allocated since open) unchecked.
            self.checked[i / 64].fetch_or(1u64 << (i % 64), Ordering::AcqRel);
            return Ok(L2Table::from_bytes(&vec![0u8; cs]));
        }
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(cs, 0);
            io::read_bytes(&self.file, off, &mut buf)?;
            self.table_from_bytes(i, off, &buf)
        })
    }

    /// Table `i`, read from host offset `off`: its entries checked, unless an earlier load
    /// (or this daemon's own writing) vouched for it.
    pub(super) fn table_from_bytes(
        &self,
        i: usize,
        off: u64,
        buf: &[u8],
    ) -> stdio::Result<L2Table> {
        let (cw, cm) = (i / 64, 1u64 << (i % 64));
        if self.checked[cw].load(Ordering::Acquire) & cm != 0 {
            return Ok(L2Table::from_bytes(buf));
        }
        // Bits that must be clear in a plain entry (unallocated, or data with an aligned
        // offset): such entries skip the full decode, which is most of a load's cost.
        let bad = !(COPIED | OFFSET_MASK) | (self.cluster_size() - 1);
        for g in 0..self.l2_entries() as usize {
            let entry = L2Entry(be64_at(buf, g * self.words));
            let plain = entry.0 & bad == 0 && (entry.0 == 0 || entry.host_offset() != 0);
            let r = if !self.extended && plain {
                self.check_refs(entry)
            } else {
                let bitmap = SubclusterBitmap(if self.extended {
                    be64_at(buf, g * 2 + 1)
                } else {
                    0
                });
                self.check_entry(Entry::new(entry, bitmap))
                    .and_then(|()| self.check_refs(entry))
            };
            r.map_err(|m| corrupt(format!("L2 table at {off:#x}, entry {g}: {m}")))?;
        }
        self.checked[cw].fetch_or(cm, Ordering::AcqRel);
        Ok(L2Table::from_bytes(buf))
    }

    /// Evicts clean, unpinned tables (second-chance clock) until the cache is within its
    /// budget. If dirty tables keep it over budget, writes them back with a flush (only if no
    /// flush is running: nobody waits here) and tries once more. `keep` is the slot just
    /// loaded by the caller.
    pub(super) fn shrink_cache(&self, keep: usize) {
        if self.evict_some(keep) {
            return;
        }
        if self.read_only {
            return;
        }
        let Some(mut st) = crate::sync::try_lock(&self.state) else {
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
    pub(super) fn evict_some(&self, keep: usize) -> bool {
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
    pub(super) fn set_cache_bytes(&self, bytes: u64) {
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
    pub(super) fn check_refs(&self, entry: L2Entry) -> std::result::Result<(), BadEntry> {
        let Some(clusters) = &self.clusters else {
            return Ok(());
        };
        let one = |c: HostCluster| -> std::result::Result<(), BadEntry> {
            let at = c.0 << self.cluster_bits;
            if c.0 >= self.file_clusters {
                return Err(BadEntry::PastEnd(at));
            }
            if c.0 == 0 || clusters.is_meta(c) {
                return Err(BadEntry::Metadata(at));
            }
            if clusters.get(c) == 0 {
                return Err(BadEntry::Unreferenced(at));
            }
            Ok(())
        };
        if self.data_file.is_some() {
            // Data clusters live in the data file, unrefcounted; QEMU never compresses there.
            if entry.is_compressed() {
                return Err(BadEntry::CompressedInDataFile);
            }
            return Ok(());
        }
        if !entry.is_compressed() {
            let off = entry.host_offset();
            if off == 0 {
                return Ok(());
            }
            return one(HostCluster(off >> self.cluster_bits));
        }
        self.entry_refs(entry).into_iter().try_for_each(one)
    }

    /// Checks an entry read from the image (or the journal) before it is trusted: its word
    /// decodes and, with extended L2, its bitmap agrees with it.
    pub(super) fn check_entry(&self, entry: Entry) -> std::result::Result<(), BadEntry> {
        let m = self.decode(entry.word)?;
        let bitmap = entry.bitmap;
        if self.extended {
            match m {
                Mapping::Compressed { .. } if bitmap != SubclusterBitmap::EMPTY => {
                    return Err(BadEntry::CompressedWithBitmap)
                }
                _ => {}
            }
            if bitmap.allocated() & bitmap.zeroed() != 0 {
                return Err(BadEntry::AllocatedAndZero);
            }
            if bitmap.allocated() != 0 && m == Mapping::Unallocated {
                return Err(BadEntry::AllocatedWithoutOffset);
            }
        }
        Ok(())
    }

    /// Loads entry `g` of a table (the bitmap too with extended L2), waiting out
    /// reservations.
    pub(super) fn load_entry(&self, table: &L2Table, g: usize) -> Entry {
        loop {
            if let Some(entry) = self.try_load_entry(table, g) {
                return entry;
            }
            std::thread::yield_now();
        }
    }

    /// Loads entry `g` of a table (the bitmap too with extended L2); `None` while it is
    /// reserved.
    #[inline]
    pub(super) fn try_load_entry(&self, table: &L2Table, g: usize) -> Option<Entry> {
        let w = g * self.words;
        loop {
            let word = L2Entry(table.entries[w].load(Ordering::Acquire));
            if word.is_reserved() {
                return None;
            }
            if !self.extended {
                return Some(Entry::plain(word));
            }
            let bitmap = SubclusterBitmap(table.entries[w + 1].load(Ordering::Acquire));
            if table.entries[w].load(Ordering::Acquire) == word.0 {
                return Some(Entry::new(word, bitmap));
            }
        }
    }
}

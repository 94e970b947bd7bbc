//! Flush: guest data synced, then dirty L2 tables, refcounts and the L1 table written back
//! in order, and the clusters the flush unmapped unreferenced; and the clean close.

use super::*;

/// What a flush covers: the journal cursor and publication count read when it started.
pub(super) struct DataSync {
    upto: Option<u64>,
    published: u64,
}

impl Qcow2Shared {
    /// Makes all completed writes and metadata changes durable.
    pub(super) fn flush(&self) -> stdio::Result<()> {
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

    /// Starts a flush that has no metadata to write back, for an engine that syncs the
    /// guest data itself without blocking its queue. `None` when metadata changed since the
    /// last completed flush, when another flush holds the flush lock (waiting for it would
    /// block the queue), or when the image is read-only: then [`Qcow2Shared::flush`].
    ///
    /// Why syncing the data is then enough: a change is published (write.rs) by marking
    /// `meta_dirty` before its journal record is committed, so `meta_dirty` found clear
    /// under the flush lock means the last flush that cleared it came after every record
    /// below the cursor read here, snapshotted their tables after that, and completed (a
    /// failed flush sets it again). Its syncs made those changes, and the data they map,
    /// durable; what is left is the data written since.
    pub(super) fn begin_data_sync(&self) -> Option<DataSync> {
        if self.read_only {
            return None;
        }
        let mut st = crate::sync::try_lock(&self.state)?;
        let covered = self.flush_covers(&mut st);
        if self.meta_dirty.load(Ordering::Acquire) {
            return None;
        }
        Some(covered)
    }

    /// A flush (begun by [`Qcow2Shared::begin_data_sync`] or [`Qcow2Shared::flush_with`])
    /// completed: drops the journal records it covers.
    pub(super) fn end_data_sync(&self, sync: DataSync) {
        if let (Some(j), Some(c)) = (&self.journal, sync.upto) {
            j.advance(c);
        }
        self.written_back
            .fetch_max(sync.published, Ordering::AcqRel);
    }

    /// Flush with the flush lock held: writes the metadata back if any changed (else only
    /// syncs data), and drops the journal records the flush made durable.
    pub(super) fn flush_with(&self, st: &mut MetaState) -> stdio::Result<()> {
        let covered = self.flush_covers(st);
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
            self.end_data_sync(covered);
        }
        r
    }

    /// The start of every flush, under the flush lock: the corrupt bit made durable if it is
    /// due, and what the flush will cover. Journal protocol (journal.rs): the cursor is read,
    /// and every record below it committed, before the dirty tables are snapshotted; likewise
    /// without a journal, changes published before this are in the snapshot.
    fn flush_covers(&self, st: &mut MetaState) -> DataSync {
        self.persist_corrupt_locked(st);
        let upto = self.journal.as_ref().map(|j| {
            let c = j.cursor();
            j.wait_committed(c);
            c
        });
        let published = self.published.load(Ordering::Acquire);
        DataSync { upto, published }
    }

    pub(super) fn flush_locked(&self, st: &mut MetaState) -> stdio::Result<()> {
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
            let l1e = self.l1_entry(i);
            if !l1e.is_copied() || l1e.l2_offset() == 0 {
                let c = match clusters.alloc(true) {
                    Ok(c) => c,
                    Err(e) => {
                        // Leave through the common failure path below, which makes the
                        // snapshotted tables dirty again and keeps `pending`.
                        snap_err = Some(e);
                        break;
                    }
                };
                if l1e.l2_offset() != 0 {
                    unref_after.push(HostCluster(l1e.l2_offset() >> self.cluster_bits));
                }
                self.set_l1_entry(i, L1Entry::owned(c.0 << self.cluster_bits));
                self.l1_dirty.store(true, Ordering::Release);
                pieces = u64::MAX;
            }
            let at = buf.len();
            buf.resize(at + cs, 0);
            while !t.to_bytes(&mut buf[at..]) {
                std::thread::yield_now();
            }
            tables.push((i, self.l1_entry(i).l2_offset(), pieces));
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
    pub(super) fn block_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.hdr.refcount_order
    }

    /// log2 of refcount entries per dirty-tracking piece: one 4 KiB page of refcounts, or
    /// the whole block when blocks are smaller.
    pub(super) fn refcount_piece_shift(&self) -> u32 {
        self.block_shift().min(15 - self.hdr.refcount_order)
    }

    pub(super) fn write_refcounts(
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
    pub(super) fn flush_settled(&self) -> stdio::Result<()> {
        for _ in 0..4 {
            self.flush()?;
            if !self.meta_dirty.load(Ordering::Acquire) {
                break;
            }
        }
        Ok(())
    }

    /// Flushes everything and clears the dirty bit.
    pub(super) fn close(&self) -> stdio::Result<()> {
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

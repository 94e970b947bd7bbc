//! Writing guest data: overwrites in place, allocation and copy-on-write under a reserved
//! entry, publishing the new entry (journal first), the dirty bit and overlap protection.

use std::ops::ControlFlow;

use super::*;

impl Qcow2Shared {
    pub(super) fn check_writable(&self) -> stdio::Result<()> {
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
    pub(super) fn ensure_dirty(&self) -> stdio::Result<()> {
        if self.dirty_on_disk.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = lock(&self.state);
        self.ensure_dirty_locked(&mut st)
    }

    pub(super) fn ensure_dirty_locked(&self, st: &mut MetaState) -> stdio::Result<()> {
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
    pub(super) fn check_overlap(&self, host: u64) -> stdio::Result<()> {
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
    pub(super) fn persist_corrupt(&self) {
        if self.corrupt.load(Ordering::Acquire) {
            let mut st = lock(&self.state);
            self.persist_corrupt_locked(&mut st);
        }
    }

    pub(super) fn persist_corrupt_locked(&self, st: &mut MetaState) {
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
    pub(super) fn entry_refs(&self, entry: L2Entry) -> Vec<HostCluster> {
        if self.data_file.is_some() {
            // Data clusters in an external data file are not refcounted.
            return Vec::new();
        }
        entry
            .host_clusters(self.cluster_bits, self.extended)
            .map(HostCluster)
            .collect()
    }

    /// Bitmap of the subclusters that bytes `[in_off, in_off + n)` of a cluster touch
    /// (allocation bit positions; 0 without extended L2). `n` must be nonzero.
    pub(super) fn touched(&self, in_off: u64, n: u64) -> u64 {
        if !self.extended {
            return 0;
        }
        let scs = self.cluster_size() / l2::SUBCLUSTERS;
        let first = in_off / scs;
        let last = (in_off + n - 1) / scs;
        ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1)
    }

    /// True if a write to the subclusters `mask` of the cluster described by `entry` may go
    /// straight to its host cluster without changing the entry.
    #[inline]
    pub(super) fn in_place(&self, entry: Entry, mask: u64) -> bool {
        let Entry { word, bitmap } = entry;
        word.is_copied()
            && self.has_host(word)
            && if self.extended {
                bitmap.allocated() & mask == mask
            } else {
                !word.zero_flag()
            }
    }

    /// Writes request bytes `[pos, pos + n)` to guest offset `g` (within one cluster).
    ///
    /// With extended L2, a cluster that is unallocated or exclusively owned (COPIED, not
    /// compressed) is written subcluster by subcluster: only the subclusters the request
    /// touches are written and marked allocated (see [`Qcow2Shared::write_subclusters`]).
    /// Shared and compressed clusters are copied whole.
    pub(super) fn write_in_cluster(
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
            let table = self.table(i)?;
            let entry = self.load_entry(&table, j);
            if self.in_place(entry, mask) {
                let host = entry.word.host_offset();
                if let Err(err) = self.check_overlap(host) {
                    drop(table);
                    self.persist_corrupt();
                    return Err(err);
                }
                return io::write_pieces(file, host + in_off, bufs, pos, n);
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
            if let Some(r) = self.write_reserved(
                file,
                scratch,
                &table,
                j,
                entry,
                g,
                n,
                bufs,
                pos,
                &mut credit,
            ) {
                return r;
            }
            std::thread::yield_now();
        }
    }

    /// The allocating part of [`Qcow2Shared::write_in_cluster`]: reserves entry `j` of
    /// `table`, last seen as `seen`, writes the request's data and stores the new entry.
    /// `None` if the table was evicted or the entry changed since (look it up again).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_reserved(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        table: &L2Table,
        j: usize,
        seen: Entry,
        g: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
        credit: &mut Option<journal::Credit<'_>>,
    ) -> Option<stdio::Result<()>> {
        let w = j * self.words;
        let in_off = g & (self.cluster_size() - 1);
        let mask = self.touched(in_off, n);
        let old_word = seen.word;
        // Pinned, the table cannot be evicted while we change it.
        if !table.pin() {
            return None;
        }
        if !table.reserve(w, old_word) {
            table.unpin();
            return None;
        }
        // The entry word may have come back to the value we saw after someone else changed
        // only the bitmap (a subcluster write keeps the host offset), so the bitmap we saw
        // may be stale: reread it now that nobody else can change it.
        let old = if self.extended {
            Entry::new(
                old_word,
                SubclusterBitmap(table.entries[w + 1].load(Ordering::Acquire)),
            )
        } else {
            seen
        };
        let by_subcluster = self.extended
            && !old_word.is_compressed()
            && (old_word.host_offset() == 0 || old_word.is_copied());
        let cluster_guest = g - in_off;
        let r = if by_subcluster {
            self.write_subclusters(file, scratch, cluster_guest, old, in_off, n, bufs, pos)
                .map(|word| Entry::new(word, old.bitmap.with_allocated(mask)))
        } else {
            self.cow_cluster(file, scratch, cluster_guest, old, in_off, n, bufs, pos)
                .map(|word| Entry::new(word, SubclusterBitmap::ALL_ALLOCATED))
        };
        let r = match r {
            Ok(new) if new.word == old_word && (!self.extended || new.bitmap == old.bitmap) => {
                // All touched subclusters were allocated after all: written in place,
                // nothing changed.
                table.store_entry(w, old_word);
                Ok(())
            }
            Ok(new) => {
                let cluster = g >> self.cluster_bits;
                self.publish(table, w, cluster, new, credit.take());
                // Only now, with the new entry stored and the table dirty, may the old host
                // clusters go to `pending`: a flush that takes them then also writes this
                // table (it snapshots dirty tables after taking `pending`), so they are
                // unreferenced only once the on-disk entry no longer points at them. (A
                // fresh allocation or a subcluster write has nothing to unreference and
                // takes no shared lock.)
                if new.word.host_offset() != old_word.host_offset() || old_word.is_compressed() {
                    let refs = self.entry_refs(old_word);
                    if !refs.is_empty() {
                        lock(&self.pending).extend(refs);
                    }
                }
                Ok(())
            }
            Err(err) => {
                table.store_entry(w, old_word);
                Err(err)
            }
        };
        table.unpin();
        if r.is_err() {
            // Overlap protection may have tripped while we held the reservation; the header
            // bit is written only now that nothing waits on us.
            self.persist_corrupt();
        }
        Some(r)
    }

    /// Makes `new`, the new value of the reserved entry at word `w` of `table` (guest cluster
    /// `cluster`), visible: marks the table dirty, appends the change to the mapping journal, then stores
    /// the bitmap word and last the entry word, which ends the reservation. The order is the
    /// journal protocol's (journal.rs): a flush that reads the journal cursor after the append
    /// finds the table dirty, and changes of one entry reach the journal in their order.
    pub(super) fn publish(
        &self,
        table: &L2Table,
        w: usize,
        cluster: u64,
        new: Entry,
        credit: Option<journal::Credit<'_>>,
    ) {
        table.mark_dirty(w);
        self.meta_dirty.store(true, Ordering::Release);
        if self.journal.is_none() {
            self.published.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(c) = credit {
            c.commit(journal::Record {
                cluster,
                entry: new.word.0,
                bitmap: if self.extended { new.bitmap.0 } else { 0 },
            });
        }
        if self.extended {
            table.store_bitmap(w, new.bitmap);
        }
        table.store_entry(w, new.word);
    }

    /// A journal credit for one mapping change (`None` without a journal). Taken before the
    /// entry is reserved: when the journal is full this writes the metadata back (a flush),
    /// which waits for reserved entries.
    pub(super) fn credit(&self) -> stdio::Result<Option<journal::Credit<'_>>> {
        let Some(j) = &self.journal else {
            return Ok(None);
        };
        loop {
            if j.pressure() {
                // Make room before writers have to wait, if no flush is running already.
                if let Some(mut st) = crate::sync::try_lock(&self.state) {
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
    /// guest cluster at `cluster_guest`, described by `entry`, which is unallocated (a
    /// host cluster is allocated) or exclusively owned (written in place). Only the touched
    /// subclusters are written: a partly touched subcluster that was not allocated is
    /// completed from its old contents (backing file or zeros), one that was is written
    /// only where the request covers it. Returns the new entry word; the caller reserved the
    /// entry and sets the touched subclusters' allocation bits.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_subclusters(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        entry: Entry,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<L2Entry> {
        let keep = entry.word.host_offset() != 0;
        self.write_to_target(cluster_guest, entry.word, keep, |host, fresh| {
            self.fill_subclusters(file, scratch, cluster_guest, entry, host, fresh, in_off, n)?;
            io::write_pieces(file, host + in_off, bufs, pos, n)
        })
    }

    /// Completes, at `host`, the parts of the first and last subclusters of `[in_off, in_off
    /// + n)` that the request does not cover and that do not hold data yet, from their old
    /// contents (see [`Qcow2Shared::write_subclusters`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fill_subclusters(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        entry: Entry,
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
            if from == to || entry.bitmap.is_allocated(sc) {
                // Nothing to complete, or the subcluster already holds its data.
                continue;
            }
            if fresh && (entry.bitmap.is_zero(sc) || self.backing.is_none()) {
                // Old contents are zeros and so are the bytes of a cluster past the end of
                // the file: nothing to write, the file stays sparse.
                continue;
            }
            let mut buf = std::mem::take(&mut scratch.cluster);
            buf.resize((to - from) as usize, 0);
            let r = (|| {
                let s = [VolatileSlice::from(&mut buf[..])];
                self.read_in_cluster(file, scratch, cluster_guest, entry, from, to - from, &s, 0)?;
                io::write_bytes(file, host + from, &buf)
            })();
            scratch.cluster = buf;
            r?;
        }
        Ok(())
    }

    /// Runs `write(host, fresh)` against the host cluster a rewrite of the guest cluster at
    /// `cluster_guest` (entry word `word`) goes to: its current one with `keep`, else a new one
    /// ([`Qcow2Shared::alloc_data`]; `fresh` as there). Overlap protection is checked first.
    /// A new cluster is released (at the next flush) if anything fails. Returns the new
    /// entry word.
    pub(super) fn write_to_target(
        &self,
        cluster_guest: u64,
        word: L2Entry,
        keep: bool,
        write: impl FnOnce(u64, bool) -> stdio::Result<()>,
    ) -> stdio::Result<L2Entry> {
        let (host, fresh) = if keep {
            (word.host_offset(), false)
        } else {
            self.alloc_data(cluster_guest)?
        };
        let r = self.check_overlap(host).and_then(|()| write(host, fresh));
        if r.is_err() && !keep {
            self.release_data(host);
        }
        r.map(|()| L2Entry::owned(host))
    }

    /// Builds the new contents of a guest cluster (old contents with the request's bytes
    /// merged in), writes them to its new (or, if exclusively owned, its current) host
    /// cluster and returns the new L2 entry. The entry is reserved by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cow_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        entry: Entry,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<L2Entry> {
        let cs = self.cluster_size();
        let word = entry.word;
        let keep = word.is_copied() && !word.is_compressed() && word.host_offset() != 0;
        let zeros = self.reads_as_zeros(entry);
        self.write_to_target(cluster_guest, word, keep, |host, fresh| {
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
                        self.read_in_cluster(
                            file,
                            scratch,
                            cluster_guest,
                            entry,
                            0,
                            cs,
                            &whole,
                            0,
                        )?;
                    }
                }
                io::copy_from_pieces(bufs, pos, &mut buf[in_off as usize..(in_off + n) as usize])?;
                io::write_bytes(file, host, &buf)
            })();
            scratch.cluster = buf;
            r
        })
    }

    /// A host cluster for new guest data of the cluster at `cluster_guest`, and whether it is
    /// fresh (never used since open, past the end of the file at open: reads as zeros). With
    /// an external data file, the cluster at the same offset of the data file (as QEMU
    /// maps them), never fresh (it may hold old data).
    pub(super) fn alloc_data(&self, cluster_guest: u64) -> stdio::Result<(u64, bool)> {
        if self.data_file.is_some() {
            return Ok((cluster_guest, false));
        }
        let (c, fresh) = self.clusters()?.alloc_fresh(false)?;
        Ok((c.0 << self.cluster_bits, fresh))
    }

    /// Gives back a host cluster from [`Qcow2Shared::alloc_data`] that was not used (at the
    /// next flush).
    pub(super) fn release_data(&self, host: u64) {
        if self.data_file.is_none() {
            lock(&self.pending).push(HostCluster(host >> self.cluster_bits));
        }
    }

    /// Sets a whole guest cluster's entry to `new`, dropping its old host references after
    /// the next flush.
    pub(super) fn set_cluster(&self, g: u64, new: Entry) -> stdio::Result<()> {
        let settled = |entry| {
            if entry == new {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let ControlFlow::Continue(old) = self.change_entry(g, settled, |_| new)? else {
            return Ok(());
        };
        let refs = self.entry_refs(old);
        if !refs.is_empty() {
            lock(&self.pending).extend(refs);
        }
        if self.has_host(old) && !self.has_host(new.word) {
            // No longer mapped: free the space in the data file (as QEMU passes discards
            // through to it). Without a data file the cluster is reused instead.
            self.punch_data(old.host_offset(), self.cluster_size());
        }
        Ok(())
    }

    /// Changes the entry of the guest cluster at `g` without writing data: sets the dirty
    /// bit and takes a journal credit first (either may wait for a flush, which waits for
    /// reserved entries, so never while holding one), looks at the entry again after
    /// waiting, reserves it and publishes `change(entry)`. `settled` is asked each time the
    /// entry is looked at; `Break(r)` ends it there with nothing changed.
    /// `Continue(old entry word)` once the new one is published.
    pub(super) fn change_entry<R>(
        &self,
        g: u64,
        mut settled: impl FnMut(Entry) -> ControlFlow<R>,
        change: impl FnOnce(Entry) -> Entry,
    ) -> stdio::Result<ControlFlow<R, L2Entry>> {
        let (i, j, _) = self.locate(GuestOffset(g));
        let w = j * self.words;
        let (mut credit, mut credited) = (None, false);
        loop {
            let table = self.table(i)?;
            let seen = self.load_entry(&table, j);
            if let ControlFlow::Break(r) = settled(seen) {
                return Ok(ControlFlow::Break(r));
            }
            self.ensure_dirty()?;
            if !credited {
                credit = self.credit()?;
                credited = true;
                continue;
            }
            if !table.pin() {
                std::thread::yield_now();
                continue;
            }
            if !table.reserve(w, seen.word) {
                table.unpin();
                continue;
            }
            // Reread: the bitmap may have changed while the entry word kept its value.
            let old = if self.extended {
                Entry::new(
                    seen.word,
                    SubclusterBitmap(table.entries[w + 1].load(Ordering::Acquire)),
                )
            } else {
                seen
            };
            let new = change(old);
            let cluster = g >> self.cluster_bits;
            self.publish(&table, w, cluster, new, credit.take());
            table.unpin();
            return Ok(ControlFlow::Continue(old.word));
        }
    }

    /// The entry for a whole cluster that reads as zeros (`None` if there is none: v2 with
    /// a backing file).
    pub(super) fn zero_entry(&self) -> Option<Entry> {
        if self.extended {
            Some(Entry::new(L2Entry::UNALLOCATED, SubclusterBitmap::ALL_ZERO))
        } else if self.hdr.version >= 3 {
            Some(Entry::plain(L2Entry::ZERO))
        } else if self.backing.is_none() {
            Some(Entry::plain(L2Entry::UNALLOCATED))
        } else {
            None
        }
    }

    pub(super) fn write_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        bufs: &[GuestSlice<'_>],
    ) -> stdio::Result<()> {
        self.check_writable()?;
        let len = crate::image::slices_len(bufs);
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
}

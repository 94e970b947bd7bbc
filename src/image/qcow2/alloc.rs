//! Host cluster accounting: in-memory refcounts, the free-cluster bitmap, the metadata-cluster
//! bitmap (overlap protection), dirty bits per piece of a refcount block and the
//! end-of-image cursor.
//!
//! # Layout (lock-free)
//!
//! Per-cluster state lives in [`Segment`]s of [`SEG_CLUSTERS`] clusters each. A fixed
//! top-level array, sized for [`MAX_HOST_CLUSTERS`](super::MAX_HOST_CLUSTERS), holds one
//! `OnceLock<Box<Segment>>` per segment. Looking a cluster up is one acquire load of its
//! slot plus the atomic itself: no lock, and no shared counter is written by readers (the
//! overlap check on every guest overwrite only loads). Growing the image initialises more
//! segments; `OnceLock` settles races, and segments are always initialised in ascending order
//! (a thread only initialises segment `s` after every segment below it), so "segment `s`
//! exists" implies "all segments below `s` exist".
//!
//! Dirty bits are kept per *piece* of a refcount block (the refcounts of `2^piece_shift`
//! clusters: 4 KiB of a refcount block, or the whole block when it is smaller), so a flush
//! writes only the pages of a block that changed. They are stored in the segment holding the
//! piece's first cluster, so they need no separately grown array whatever the piece size.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Index of a host cluster (host offset >> cluster_bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

/// log2 of the clusters per segment.
pub const SEG_BITS: u32 = 16;
/// Clusters per segment.
pub const SEG_CLUSTERS: u64 = 1 << SEG_BITS;
const SEG_MASK: u64 = SEG_CLUSTERS - 1;
/// 64-bit bitmap words per segment.
const SEG_WORDS: usize = (SEG_CLUSTERS / 64) as usize;
/// Segments in the top-level array.
const MAX_SEGS: usize = (super::MAX_HOST_CLUSTERS >> SEG_BITS) as usize;

/// Per-cluster state of `SEG_CLUSTERS` consecutive host clusters.
struct Segment {
    /// Refcount of each cluster.
    rc: Box<[AtomicU64]>,
    /// Bit set: cluster below `end` with refcount 0 that may be allocated.
    free: Box<[AtomicU64]>,
    /// Bit set: cluster holds qcow2 metadata; guest data must never be written there.
    meta: Box<[AtomicU64]>,
    /// Bit set: refcount piece changed since last written (for the pieces whose first
    /// cluster is in this segment).
    dirty_pieces: Box<[AtomicU64]>,
}

fn atomics(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Segment {
    fn new(dirty_words: usize) -> Box<Segment> {
        Box::new(Segment {
            rc: atomics(SEG_CLUSTERS as usize),
            free: atomics(SEG_WORDS),
            meta: atomics(SEG_WORDS),
            dirty_pieces: atomics(dirty_words),
        })
    }
}

/// Host cluster accounting shared by all queues.
pub struct Clusters {
    /// One slot per segment; initialised in ascending order.
    segs: Box<[OnceLock<Box<Segment>>]>,
    /// Number of initialised segments (a lower bound while one is being added).
    nsegs: AtomicUsize,
    /// First cluster never handed out: allocation past the free bitmap bumps this.
    end: AtomicU64,
    /// Number of set bits in `free` (an upper bound while a claim is in progress).
    free_count: AtomicU64,
    /// Word index where the next free-bitmap scan starts.
    hint: AtomicUsize,
    /// log2 of refcount entries per dirty-tracking piece (see the module doc).
    piece_shift: u32,
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {msg}"))
}

fn too_many() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        format!(
            "qcow2: image reached the limit of {} host clusters",
            super::MAX_HOST_CLUSTERS
        ),
    )
}

/// Bit of `Clusters::end` set while a truncation has frozen the end (cluster numbers stay
/// far below it).
const END_FROZEN: u64 = 1 << 63;

#[inline]
fn bit(c: u64) -> (usize, u64) {
    (((c & SEG_MASK) / 64) as usize, 1u64 << (c % 64))
}

impl Clusters {
    /// Accounting for an image whose used clusters end at `end`, with the given refcounts
    /// (`rc.len()` may be less than `end`: the rest are zero), tracking dirty refcounts in
    /// pieces of `2^piece_shift` clusters. Refcounts at or past
    /// [`MAX_HOST_CLUSTERS`](super::MAX_HOST_CLUSTERS) are ignored (callers check the limit).
    pub fn new(rc: Vec<u64>, end: u64, piece_shift: u32) -> Clusters {
        let segs: Box<[OnceLock<Box<Segment>>]> = (0..MAX_SEGS).map(|_| OnceLock::new()).collect();
        let c = Clusters {
            segs,
            nsegs: AtomicUsize::new(0),
            end: AtomicU64::new(end),
            free_count: AtomicU64::new(0),
            hint: AtomicUsize::new(0),
            piece_shift,
        };
        let top = end.max(rc.len() as u64).min(super::MAX_HOST_CLUSTERS);
        if top > 0 {
            let _ = c.seg_for(top - 1);
        }
        let mut free_count = 0;
        for (s, chunk) in rc.chunks(SEG_CLUSTERS as usize).enumerate() {
            let Some(seg) = c.segs.get(s).and_then(|x| x.get()) else {
                break;
            };
            for (a, &v) in seg.rc.iter().zip(chunk) {
                a.store(v, Ordering::Relaxed);
            }
        }
        // Cluster 0 is the header: never free even if its refcount says so.
        for s in 0..c.nsegs.load(Ordering::Acquire) {
            let Some(seg) = c.segs[s].get() else { break };
            let base = (s as u64) << SEG_BITS;
            let lo = base.max(1);
            let hi = (base + SEG_CLUSTERS).min(end);
            for k in lo..hi {
                if seg.rc[(k & SEG_MASK) as usize].load(Ordering::Relaxed) == 0 {
                    let (w, m) = bit(k);
                    seg.free[w].fetch_or(m, Ordering::Relaxed);
                    free_count += 1;
                }
            }
        }
        c.free_count.store(free_count, Ordering::Release);
        c
    }

    /// Words of dirty-piece bits per segment.
    fn dirty_words(&self) -> usize {
        if self.piece_shift >= SEG_BITS {
            1
        } else {
            (1usize << (SEG_BITS - self.piece_shift)).div_ceil(64)
        }
    }

    /// The segment of cluster `c` if it exists.
    #[inline]
    fn seg(&self, c: u64) -> Option<&Segment> {
        self.segs.get((c >> SEG_BITS) as usize)?.get().map(|b| &**b)
    }

    /// The segment of cluster `c`, creating it (and every segment below it) if needed.
    fn seg_for(&self, c: u64) -> io::Result<&Segment> {
        let s = (c >> SEG_BITS) as usize;
        let slot = self.segs.get(s).ok_or_else(too_many)?;
        if let Some(seg) = slot.get() {
            return Ok(seg);
        }
        let dw = self.dirty_words();
        for k in self.nsegs.load(Ordering::Acquire)..s {
            self.segs[k].get_or_init(|| Segment::new(dw));
        }
        let seg = slot.get_or_init(|| Segment::new(dw));
        self.nsegs.fetch_max(s + 1, Ordering::AcqRel);
        Ok(seg)
    }

    /// Where the dirty bit of piece `b` lives: (segment index, word, mask).
    fn piece_bit(&self, b: u64) -> (u64, usize, u64) {
        let first = b << self.piece_shift;
        let s = first >> SEG_BITS;
        let k = if self.piece_shift >= SEG_BITS {
            0
        } else {
            (first & SEG_MASK) >> self.piece_shift
        };
        (s, (k / 64) as usize, 1u64 << (k % 64))
    }

    fn mark_piece(&self, c: u64) {
        let (s, w, m) = self.piece_bit(c >> self.piece_shift);
        if let Some(seg) = self.segs.get(s as usize).and_then(|x| x.get()) {
            seg.dirty_pieces[w].fetch_or(m, Ordering::AcqRel);
        }
    }

    /// Refcount of cluster `c`.
    pub fn get(&self, c: HostCluster) -> u64 {
        self.seg(c.0).map_or(0, |s| {
            s.rc[(c.0 & SEG_MASK) as usize].load(Ordering::Acquire)
        })
    }

    /// (clusters in use, metadata clusters among them, clusters free in the free bitmap),
    /// for statistics (a linear scan; a snapshot of moving counts).
    pub fn usage(&self) -> (u64, u64, u64) {
        let end = self.end();
        let (mut used, mut meta) = (0u64, 0u64);
        for s in 0..self.nsegs.load(Ordering::Acquire) {
            let base = (s as u64) << SEG_BITS;
            if base >= end {
                break;
            }
            let Some(seg) = self.segs[s].get() else { break };
            let n = (end - base).min(SEG_CLUSTERS) as usize;
            used += seg.rc[..n]
                .iter()
                .filter(|a| a.load(Ordering::Relaxed) != 0)
                .count() as u64;
            meta += seg.meta[..n.div_ceil(64)]
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum::<u64>();
        }
        (used, meta, self.free_count.load(Ordering::Relaxed))
    }

    /// First cluster never handed out.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire) & !END_FROZEN
    }

    /// Takes `n` new clusters at the end of the image; waits while the end is frozen.
    fn bump_end(&self, n: u64) -> u64 {
        let mut e = self.end.load(Ordering::Acquire);
        loop {
            if e & END_FROZEN != 0 {
                // A truncation is cutting the file (one system call); yield to it.
                std::thread::yield_now();
                e = self.end.load(Ordering::Acquire);
                continue;
            }
            // AcqRel: the clusters' refcount stores that follow are ordered after the claim.
            match self
                .end
                .compare_exchange_weak(e, e + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return e,
                Err(now) => e = now,
            }
        }
    }

    /// Claims a free cluster (or a new one at the end), gives it refcount 1 and, with
    /// `meta`, marks it as a metadata cluster.
    pub fn alloc(&self, meta: bool) -> io::Result<HostCluster> {
        self.alloc_fresh(meta).map(|(c, _)| c)
    }

    /// Like [`Clusters::alloc`], and also tells whether the cluster is fresh: taken from the
    /// end, so never handed out since open and past the end of the file as it was at open
    /// (its bytes in the file are zeros or past EOF). A cluster from the free bitmap is not
    /// fresh: it may hold old data.
    pub fn alloc_fresh(&self, meta: bool) -> io::Result<(HostCluster, bool)> {
        let (c, fresh) = match self.claim_free() {
            Some(c) => (c, false),
            None => (self.bump_end(1), true),
        };
        let seg = self.seg_for(c)?;
        seg.rc[(c & SEG_MASK) as usize].store(1, Ordering::Release);
        if meta {
            let (w, m) = bit(c);
            seg.meta[w].fetch_or(m, Ordering::AcqRel);
        }
        self.mark_piece(c);
        Ok((HostCluster(c), fresh))
    }

    /// Freezes the end of the image at `at`: until [`Clusters::thaw_end`], nobody takes
    /// new clusters at the end (they wait), so clusters at or past a lower point can be cut
    /// off the file. False, with nothing changed, if the end is no longer `at`.
    pub fn freeze_end(&self, at: u64) -> bool {
        self.end
            .compare_exchange(at, at | END_FROZEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends a freeze, setting the end to `to`: the frozen end, or lower once the clusters
    /// from `to` on (refcount zero, not in the free bitmap) are gone from the file, to be
    /// handed out again as fresh.
    pub fn thaw_end(&self, to: u64) {
        // Release: the truncation happened before anyone can take the clusters again.
        self.end.store(to, Ordering::Release);
    }

    /// Allocates `n` contiguous new clusters at the end of the image, as metadata.
    pub fn alloc_contiguous(&self, n: u64) -> io::Result<HostCluster> {
        let start = self.bump_end(n);
        for c in start..start + n {
            let seg = self.seg_for(c)?;
            seg.rc[(c & SEG_MASK) as usize].store(1, Ordering::Release);
            let (w, m) = bit(c);
            seg.meta[w].fetch_or(m, Ordering::AcqRel);
            self.mark_piece(c);
        }
        Ok(HostCluster(start))
    }

    /// Takes a cluster out of the free bitmap, if there is one.
    pub fn claim_free(&self) -> Option<u64> {
        if self.free_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let words = self.nsegs.load(Ordering::Acquire) * SEG_WORDS;
        if words == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed) % words;
        for i in 0..words {
            let w = (start + i) % words;
            let seg = self.segs[w / SEG_WORDS].get()?;
            let word = &seg.free[w % SEG_WORDS];
            let mut v = word.load(Ordering::Acquire);
            while v != 0 {
                let bit = v.trailing_zeros() as u64;
                let prev = word.fetch_and(!(1 << bit), Ordering::AcqRel);
                if prev & (1 << bit) != 0 {
                    self.free_count.fetch_sub(1, Ordering::AcqRel);
                    if w != start {
                        self.hint.store(w, Ordering::Relaxed);
                    }
                    return Some(w as u64 * 64 + bit);
                }
                v = prev & !(1 << bit);
            }
        }
        None
    }

    /// Takes the specific cluster `c` out of the free bitmap and gives it refcount 1 (journal
    /// replay: a mapping the journal restores references a cluster the rebuilt refcounts
    /// found unreferenced). False, with nothing changed, if `c` is not free.
    pub fn claim(&self, c: HostCluster) -> bool {
        if !self.take_free(c) {
            return false;
        }
        if let Some(seg) = self.seg(c.0) {
            seg.rc[(c.0 & SEG_MASK) as usize].store(1, Ordering::Release);
        }
        self.mark_piece(c.0);
        true
    }

    /// Takes the specific cluster `c` out of the free bitmap, refcount still zero, so that
    /// nobody allocates it; [`Clusters::make_free`] puts it back. False if `c` is not free.
    pub fn take_free(&self, c: HostCluster) -> bool {
        let Some(seg) = self.seg(c.0) else {
            return false;
        };
        let (w, m) = bit(c.0);
        if seg.free[w].fetch_and(!m, Ordering::AcqRel) & m == 0 {
            return false;
        }
        self.free_count.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// Drops one reference to cluster `c`; at zero the cluster becomes free for allocation
    /// (callers only do this once the unmapping is durable).
    pub fn unref(&self, c: HostCluster) -> io::Result<()> {
        if self.unref_keep(c)? {
            self.make_free(c);
        }
        Ok(())
    }

    /// Drops one reference to cluster `c`. Returns true if the refcount reached zero: the
    /// cluster is then no longer metadata but is *not* yet free for allocation; the caller
    /// hands it to [`Clusters::make_free`] once nobody can still be using it.
    pub fn unref_keep(&self, c: HostCluster) -> io::Result<bool> {
        let seg = self
            .seg(c.0)
            .ok_or_else(|| corrupt(format!("refcount of cluster {} would drop below zero", c.0)))?;
        let r = seg.rc[(c.0 & SEG_MASK) as usize].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |v| v.checked_sub(1),
        );
        match r {
            Err(_) => Err(corrupt(format!(
                "refcount of cluster {} would drop below zero",
                c.0
            ))),
            Ok(prev) => {
                self.mark_piece(c.0);
                if prev == 1 && c.0 != 0 {
                    let (w, m) = bit(c.0);
                    seg.meta[w].fetch_and(!m, Ordering::AcqRel);
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Puts cluster `c` (refcount zero, dropped by [`Clusters::unref_keep`]) in the free
    /// bitmap, so it can be allocated again.
    pub fn make_free(&self, c: HostCluster) {
        let Some(seg) = self.seg(c.0) else { return };
        if c.0 == 0 || seg.rc[(c.0 & SEG_MASK) as usize].load(Ordering::Acquire) != 0 {
            return;
        }
        let (w, m) = bit(c.0);
        if seg.free[w].fetch_or(m, Ordering::AcqRel) & m == 0 {
            self.free_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes every cluster out of the free bitmap and returns them as a bitmap (bit `c` of
    /// word `c / 64`): the holes a clean image had at open, kept from allocation until
    /// `holes::check` has made sure nothing references them (their refcount on disk may be
    /// wrong). Clusters freed later go to the free bitmap as usual.
    pub fn take_holes(&self) -> Vec<u64> {
        let nsegs = self.nsegs.load(Ordering::Acquire);
        let mut out = vec![0u64; nsegs * SEG_WORDS];
        for s in 0..nsegs {
            let Some(seg) = self.segs[s].get() else { break };
            for (w, word) in seg.free.iter().enumerate() {
                let v = word.swap(0, Ordering::AcqRel);
                if v != 0 {
                    self.free_count
                        .fetch_sub(u64::from(v.count_ones()), Ordering::AcqRel);
                    out[s * SEG_WORDS + w] = v;
                }
            }
        }
        out
    }

    /// Puts the clusters of the `holes` bitmap (from [`Clusters::take_holes`]) that still
    /// have refcount zero back into the free bitmap; returns how many.
    pub fn release_holes(&self, holes: &[u64]) -> u64 {
        let mut n = 0;
        for (w, &v) in holes.iter().enumerate() {
            let mut v = v;
            while v != 0 {
                let k = u64::from(v.trailing_zeros());
                v &= v - 1;
                let c = HostCluster(w as u64 * 64 + k);
                if self.get(c) == 0 && !self.is_meta(c) {
                    self.make_free(c);
                    n += 1;
                }
            }
        }
        n
    }

    /// Releases metadata cluster `c` that nothing references on disk any more and no request
    /// ever reads (an old L1 table, a bitmap data cluster): no longer metadata, one reference
    /// dropped, and at refcount zero straight into the free bitmap (no reuse epoch needed).
    pub fn release_meta(&self, c: HostCluster) -> io::Result<()> {
        self.set_meta(c, false);
        if self.unref_keep(c)? {
            self.make_free(c);
        }
        Ok(())
    }

    /// Marks cluster `c` as metadata (or not). Clusters past the limit are ignored.
    pub fn set_meta(&self, c: HostCluster, on: bool) {
        let Ok(seg) = self.seg_for(c.0) else { return };
        let (w, m) = bit(c.0);
        if on {
            seg.meta[w].fetch_or(m, Ordering::AcqRel);
        } else {
            seg.meta[w].fetch_and(!m, Ordering::AcqRel);
        }
    }

    /// True if cluster `c` holds metadata. Lock-free and write-free: this runs on every
    /// guest overwrite.
    #[inline]
    pub fn is_meta(&self, c: HostCluster) -> bool {
        let (w, m) = bit(c.0);
        self.seg(c.0)
            .is_some_and(|s| s.meta[w].load(Ordering::Acquire) & m != 0)
    }

    /// Returns and clears the dirty piece indices (ascending).
    pub fn take_dirty_pieces(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for s in 0..self.nsegs.load(Ordering::Acquire) {
            let Some(seg) = self.segs[s].get() else { break };
            for (w, word) in seg.dirty_pieces.iter().enumerate() {
                if word.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut v = word.swap(0, Ordering::AcqRel);
                while v != 0 {
                    let k = v.trailing_zeros() as u64;
                    let first =
                        ((s as u64) << SEG_BITS) + ((w as u64 * 64 + k) << self.piece_shift);
                    out.push(first >> self.piece_shift);
                    v &= !(1 << k);
                }
            }
        }
        out
    }

    /// Marks piece `b` dirty again (after a failed write).
    pub fn redirty_piece(&self, b: u64) {
        let (s, w, m) = self.piece_bit(b);
        let Ok(seg) = self.seg_for(s << SEG_BITS) else {
            return;
        };
        seg.dirty_pieces[w].fetch_or(m, Ordering::AcqRel);
    }

    /// Marks every piece up to the end of the image dirty.
    pub fn dirty_all(&self) {
        let end = self.end();
        for b in 0..=(end >> self.piece_shift) {
            self.redirty_piece(b);
        }
    }

    /// Refcounts of the clusters described by piece `b`.
    #[cfg(test)]
    pub fn piece_values(&self, b: u64) -> Vec<u64> {
        let mut out = Vec::new();
        self.piece_values_into(b, 1, &mut out);
        out
    }

    /// Refcounts of the clusters described by the `count` pieces from piece `b` on, into a
    /// reused vector (a flush encodes many pieces; a fresh vector each time is a fresh
    /// mapping, zeroed, every time).
    pub fn piece_values_into(&self, b: u64, count: u64, out: &mut Vec<u64>) {
        let n = count << self.piece_shift;
        out.clear();
        out.resize(n as usize, 0);
        let first = b << self.piece_shift;
        let mut c = first;
        while c < first + n {
            let seg_end = ((c >> SEG_BITS) + 1) << SEG_BITS;
            let hi = seg_end.min(first + n);
            if let Some(seg) = self.seg(c) {
                let lo_i = (c & SEG_MASK) as usize;
                let cnt = (hi - c) as usize;
                for (o, a) in out[(c - first) as usize..][..cnt]
                    .iter_mut()
                    .zip(&seg.rc[lo_i..lo_i + cnt])
                {
                    *o = a.load(Ordering::Acquire);
                }
            }
            c = hi;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_prefers_free_then_end_and_grows() {
        let c = Clusters::new(vec![1, 1, 0, 1], 4, 15);
        assert_eq!(c.alloc(false).unwrap(), HostCluster(2));
        assert_eq!(c.alloc(false).unwrap(), HostCluster(4));
        for _ in 0..5000 {
            c.alloc(false).unwrap();
        }
        assert_eq!(c.end(), 5005);
        assert_eq!(c.get(HostCluster(5004)), 1);
        c.unref(HostCluster(3)).unwrap();
        assert!(c.unref(HostCluster(3)).is_err());
        assert_eq!(c.alloc(true).unwrap(), HostCluster(3));
        assert!(c.is_meta(HostCluster(3)));
        assert!(!c.take_dirty_pieces().is_empty());
        assert!(c.take_dirty_pieces().is_empty());
    }

    #[test]
    fn a_frozen_end_holds_allocations_until_thawed_lower() {
        let c = std::sync::Arc::new(Clusters::new(vec![1, 1, 0, 0, 0], 5, 15));
        assert!(c.take_free(HostCluster(4)) && c.take_free(HostCluster(3)));
        assert!(!c.take_free(HostCluster(3)), "taken twice");
        assert!(!c.freeze_end(6), "froze an end that is not the end");
        assert!(c.freeze_end(5));
        assert_eq!(c.end(), 5);
        let c2 = c.clone();
        let h = std::thread::spawn(move || {
            let a = c2.alloc(false).unwrap();
            (a, c2.alloc(false).unwrap())
        });
        // Cluster 2 is free: the first allocation takes it; the second must wait.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !h.is_finished(),
            "an allocation at the end went past the freeze"
        );
        c.thaw_end(3);
        assert_eq!(h.join().unwrap(), (HostCluster(2), HostCluster(3)));
        assert_eq!(c.end(), 4);
    }

    #[test]
    fn concurrent_allocs_are_distinct() {
        let rc: Vec<u64> = (0..2000).map(|i| (i % 2) as u64).collect();
        let c = std::sync::Arc::new(Clusters::new(rc, 2000, 15));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| c.alloc(false).unwrap().0)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn segments_boundaries_and_blocks() {
        // Small blocks (2^15 clusters): two per segment.
        let c = Clusters::new(vec![1; 10], 10, 15);
        let last = SEG_CLUSTERS * 3 + 5;
        c.set_meta(HostCluster(last), true);
        assert!(c.is_meta(HostCluster(last)));
        assert!(!c.is_meta(HostCluster(last + 1)));
        assert!(!c.is_meta(HostCluster(SEG_CLUSTERS * 100)));
        assert_eq!(c.get(HostCluster(SEG_CLUSTERS * 100)), 0);
        c.take_dirty_pieces();
        let start = c.alloc_contiguous(SEG_CLUSTERS + 3).unwrap();
        assert_eq!(start, HostCluster(10));
        assert_eq!(c.take_dirty_pieces(), vec![0, 1, 2]);
        let v = c.piece_values(1);
        assert_eq!(v.len(), 1 << 15);
        assert!(v.iter().all(|&x| x == 1));
        c.unref(HostCluster(SEG_CLUSTERS + 1)).unwrap();
        assert_eq!(c.take_dirty_pieces(), vec![2]);
        assert_eq!(c.alloc(false).unwrap(), HostCluster(SEG_CLUSTERS + 1));
        c.redirty_piece(7);
        assert_eq!(c.take_dirty_pieces(), vec![2, 7]);
        // Huge blocks (2^18 clusters): one per four segments, bit in the first segment.
        let c = Clusters::new(vec![1; 3], 3, 18);
        c.take_dirty_pieces();
        let h = HostCluster(SEG_CLUSTERS * 5 + 9);
        c.set_meta(h, true);
        c.unref(HostCluster(2)).unwrap();
        c.set_meta(h, false);
        c.redirty_piece(1);
        assert_eq!(c.take_dirty_pieces(), vec![0, 1]);
        let v = c.piece_values(0);
        assert_eq!(v.len(), 1 << 18);
        assert_eq!(&v[..4], &[1, 1, 0, 0]);
        let (used, meta, free) = c.usage();
        assert_eq!((used, meta, free), (2, 0, 1));
    }

    #[test]
    fn holes_are_kept_from_allocation_until_released() {
        let c = Clusters::new(vec![1, 0, 1, 0, 0, 1], 6, 15);
        let holes = c.take_holes();
        assert_eq!(holes[0], 0b11010);
        // Held back: allocation goes to the end.
        assert_eq!(c.alloc(false).unwrap(), HostCluster(6));
        // A cluster freed now is reusable at once.
        c.unref(HostCluster(2)).unwrap();
        assert_eq!(c.alloc(false).unwrap(), HostCluster(2));
        // Cluster 3 turned out to be in use: only 1 and 4 are released.
        let mut checked = holes.clone();
        checked[0] &= !(1 << 3);
        assert_eq!(c.release_holes(&checked), 2);
        let mut got = vec![c.alloc(false).unwrap().0, c.alloc(false).unwrap().0];
        got.sort();
        assert_eq!(got, vec![1, 4]);
        assert_eq!(c.alloc(false).unwrap(), HostCluster(7));
    }

    #[test]
    fn limit_is_an_error_not_a_panic() {
        let c = Clusters::new(vec![1], 1, 15);
        c.end
            .store(super::super::MAX_HOST_CLUSTERS, Ordering::Release);
        assert!(c.alloc(false).is_err());
        assert!(c.alloc_contiguous(4).is_err());
        c.set_meta(HostCluster(super::super::MAX_HOST_CLUSTERS + 1), true);
        assert!(!c.is_meta(HostCluster(super::super::MAX_HOST_CLUSTERS + 1)));
    }
}

//! Host cluster accounting: in-memory refcounts, the free-cluster bitmap, the metadata-cluster
//! bitmap (overlap protection), per-refcount-block dirty bits and the end-of-image cursor.
//!
//! All per-cluster state is in atomics inside one `RwLock`; queues only take the read side.
//! The write side is taken only to grow the arrays when the image grows past their capacity,
//! which grows geometrically so that is rare.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// Index of a host cluster (host offset >> cluster_bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

struct Maps {
    /// Refcount of each host cluster below the capacity.
    rc: Vec<AtomicU64>,
    /// Bit set: cluster below `end` with refcount 0 that may be allocated.
    free: Vec<AtomicU64>,
    /// Bit set: cluster holds qcow2 metadata; guest data must never be written there.
    meta: Vec<AtomicU64>,
    /// Bit set: refcount block (by block index) changed since last written.
    dirty_blocks: Vec<AtomicU64>,
}

fn atomics(n: usize) -> impl Iterator<Item = AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0))
}

/// Host cluster accounting shared by all queues.
pub struct Clusters {
    maps: RwLock<Maps>,
    /// First cluster never handed out: allocation past the free bitmap bumps this.
    end: AtomicU64,
    /// Number of set bits in `free` (an upper bound while a claim is in progress).
    free_count: AtomicU64,
    /// Word index where the next free-bitmap scan starts.
    hint: AtomicUsize,
    /// log2 of refcount entries per refcount block.
    block_shift: u32,
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {msg}"))
}

impl Clusters {
    /// Accounting for an image whose used clusters end at `end`, with the given refcounts
    /// (`rc.len()` may be less than `end`: the rest are zero).
    pub fn new(rc: Vec<u64>, end: u64, block_shift: u32) -> Clusters {
        let cap = (end as usize).max(rc.len()) * 5 / 4 + 1024;
        let maps = Maps {
            rc: (0..cap)
                .map(|i| AtomicU64::new(rc.get(i).copied().unwrap_or(0)))
                .collect(),
            free: atomics(cap.div_ceil(64)).collect(),
            meta: atomics(cap.div_ceil(64)).collect(),
            dirty_blocks: atomics((cap >> block_shift).div_ceil(64) + 1).collect(),
        };
        let mut free_count = 0;
        // Cluster 0 is the header: never free even if its refcount says so.
        for c in 1..end as usize {
            if maps.rc[c].load(Ordering::Relaxed) == 0 {
                maps.free[c / 64].fetch_or(1 << (c % 64), Ordering::Relaxed);
                free_count += 1;
            }
        }
        Clusters {
            maps: RwLock::new(maps),
            end: AtomicU64::new(end),
            free_count: AtomicU64::new(free_count),
            hint: AtomicUsize::new(0),
            block_shift,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure cluster `c` is below the capacity.
    fn ensure(&self, c: u64) -> RwLockReadGuard<'_, Maps> {
        {
            let m = self.read();
            if (c as usize) < m.rc.len() {
                return m;
            }
        }
        {
            let mut m = self.maps.write().unwrap_or_else(|e| e.into_inner());
            let cap = m.rc.len();
            if c as usize >= cap {
                let new_cap = (c as usize + 1).max(cap * 2);
                m.rc.extend(atomics(new_cap - cap));
                let words = new_cap.div_ceil(64);
                let fl = m.free.len();
                m.free.extend(atomics(words - fl));
                let ml = m.meta.len();
                m.meta.extend(atomics(words - ml));
                let bw = (new_cap >> self.block_shift).div_ceil(64) + 1;
                let dl = m.dirty_blocks.len();
                m.dirty_blocks.extend(atomics(bw - dl));
            }
        }
        self.read()
    }

    fn mark_block(&self, m: &Maps, c: u64) {
        let b = (c >> self.block_shift) as usize;
        m.dirty_blocks[b / 64].fetch_or(1 << (b % 64), Ordering::AcqRel);
    }

    /// Refcount of cluster `c`.
    pub fn get(&self, c: HostCluster) -> u64 {
        let m = self.read();
        m.rc.get(c.0 as usize)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// (clusters in use, clusters free in the free bitmap), for statistics (a linear scan).
    pub fn usage(&self) -> (u64, u64) {
        let m = self.read();
        let end = (self.end() as usize).min(m.rc.len());
        let used = m.rc[..end]
            .iter()
            .filter(|a| a.load(Ordering::Relaxed) != 0)
            .count() as u64;
        (used, self.free_count.load(Ordering::Relaxed))
    }

    /// First cluster never handed out.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Claims a free cluster (or a new one at the end), gives it refcount 1 and, with
    /// `meta`, marks it as a metadata cluster.
    pub fn alloc(&self, meta: bool) -> io::Result<HostCluster> {
        let c = match self.claim_free() {
            Some(c) => c,
            None => self.end.fetch_add(1, Ordering::AcqRel),
        };
        let m = self.ensure(c);
        m.rc[c as usize].store(1, Ordering::Release);
        if meta {
            m.meta[c as usize / 64].fetch_or(1 << (c % 64), Ordering::AcqRel);
        }
        self.mark_block(&m, c);
        Ok(HostCluster(c))
    }

    /// Allocates `n` contiguous new clusters at the end of the image, as metadata.
    pub fn alloc_contiguous(&self, n: u64) -> io::Result<HostCluster> {
        let start = self.end.fetch_add(n, Ordering::AcqRel);
        let m = self.ensure(start + n);
        for c in start..start + n {
            m.rc[c as usize].store(1, Ordering::Release);
            m.meta[c as usize / 64].fetch_or(1 << (c % 64), Ordering::AcqRel);
            self.mark_block(&m, c);
        }
        Ok(HostCluster(start))
    }

    fn claim_free(&self) -> Option<u64> {
        if self.free_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let m = self.read();
        let words = m.free.len();
        let start = self.hint.load(Ordering::Relaxed) % words.max(1);
        for i in 0..words {
            let w = (start + i) % words;
            let mut v = m.free[w].load(Ordering::Acquire);
            while v != 0 {
                let bit = v.trailing_zeros() as u64;
                let prev = m.free[w].fetch_and(!(1 << bit), Ordering::AcqRel);
                if prev & (1 << bit) != 0 {
                    self.free_count.fetch_sub(1, Ordering::AcqRel);
                    self.hint.store(w, Ordering::Relaxed);
                    return Some(w as u64 * 64 + bit);
                }
                v = prev & !(1 << bit);
            }
        }
        None
    }

    /// Drops one reference to cluster `c`; at zero the cluster becomes free for allocation
    /// (callers only do this once the unmapping is durable).
    pub fn unref(&self, c: HostCluster) -> io::Result<()> {
        let m = self.ensure(c.0);
        let i = c.0 as usize;
        let r = m.rc[i].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        match r {
            Err(_) => Err(corrupt(format!(
                "refcount of cluster {} would drop below zero",
                c.0
            ))),
            Ok(prev) => {
                self.mark_block(&m, c.0);
                if prev == 1 && c.0 != 0 {
                    m.meta[i / 64].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
                    m.free[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
                    self.free_count.fetch_add(1, Ordering::AcqRel);
                }
                Ok(())
            }
        }
    }

    /// Marks cluster `c` as metadata (or not).
    pub fn set_meta(&self, c: HostCluster, on: bool) {
        let m = self.ensure(c.0);
        let i = c.0 as usize;
        if on {
            m.meta[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
        } else {
            m.meta[i / 64].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    /// True if cluster `c` holds metadata.
    pub fn is_meta(&self, c: HostCluster) -> bool {
        let m = self.read();
        let i = c.0 as usize;
        m.meta
            .get(i / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Returns and clears the dirty refcount block indices.
    pub fn take_dirty_blocks(&self) -> Vec<u64> {
        let m = self.read();
        let mut out = Vec::new();
        for (w, word) in m.dirty_blocks.iter().enumerate() {
            let mut v = word.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                v &= !(1 << b);
            }
        }
        out
    }

    /// Marks refcount block `b` dirty again (after a failed write).
    pub fn redirty_block(&self, b: u64) {
        let m = self.ensure((b + 1) << self.block_shift);
        m.dirty_blocks[b as usize / 64].fetch_or(1 << (b % 64), Ordering::AcqRel);
    }

    /// Marks every refcount block up to the end of the image dirty.
    pub fn dirty_all(&self) {
        let end = self.end();
        for b in 0..=(end >> self.block_shift) {
            self.redirty_block(b);
        }
    }

    /// Refcounts of the clusters described by refcount block `b`.
    pub fn block_values(&self, b: u64) -> Vec<u64> {
        let n = 1u64 << self.block_shift;
        let m = self.read();
        (b * n..(b + 1) * n)
            .map(|c| {
                m.rc.get(c as usize)
                    .map_or(0, |a| a.load(Ordering::Acquire))
            })
            .collect()
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
        assert!(!c.take_dirty_blocks().is_empty());
        assert!(c.take_dirty_blocks().is_empty());
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
}

//! The cluster reuse rule: request epochs per queue slot, and the freed clusters a flush
//! returns to the free bitmap once no request that may still use them is running; their space
//! goes back to the host file system on the way (hole punching, or truncating the end).

use super::*;

impl Qcow2Shared {
    /// Registers a request slot for a new queue handle.
    pub(super) fn register_slot(&self) -> Arc<AtomicU64> {
        let slot = Arc::new(AtomicU64::new(0));
        let mut slots = lock(&self.slots);
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Publishes in the handle's own slot that a request starts now. Lock-free: one load of
    /// the epoch, one store and a fence.
    pub(super) fn begin_request(&self, slot: &AtomicU64) {
        let e = self.epoch.load(Ordering::SeqCst);
        slot.store(e, Ordering::SeqCst);
        // Pairs with the fence in `reclaim`: either the reclaiming flush sees this slot, or
        // this request sees every unmapping made before that flush (so it cannot touch a
        // cluster the flush frees).
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The handle's current request has finished.
    pub(super) fn end_request(&self, slot: &AtomicU64) {
        slot.store(0, Ordering::Release);
    }

    /// Moves deferred clusters whose freeing every request still in flight started after
    /// into the free bitmap.
    pub(super) fn reclaim(&self, clusters: &Clusters) {
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
    pub(super) fn truncate_freed_tail(&self, clusters: &Clusters, ready: &mut Vec<u64>) {
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
    pub(super) fn punch_freed(&self, clusters: &[u64]) {
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
            if let Err(e) = self.file.punch_hole(start, len) {
                log::debug!(
                    "{}: punching freed clusters at {start:#x}: {e}",
                    self.path.display()
                );
            }
            i = j;
        }
    }
}

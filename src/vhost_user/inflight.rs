//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, vhost-user.rst "Inflight
//! I/O tracking"), for split virtqueues.
//!
//! The backend keeps, in a shared memory region the frontend holds on to across backend
//! restarts, which descriptor heads it has taken from each queue and not yet returned. After a
//! crash and restart the frontend hands the region back (`SET_INFLIGHT_FD`), and each queue's
//! in-flight requests are resubmitted in the order they were first taken, so every request the
//! guest submitted completes exactly once.
//!
//! Region layout, per queue (aligned to 64 bytes): `features: u64, version: u16,
//! desc_num: u16, last_batch_head: u16, used_idx: u16`, then `desc_num` 16-byte entries
//! `inflight: u8, padding: [u8; 5], next: u16, counter: u64`.
//!
//! Our workers complete each queue's requests in the order they took them, so the in-flight
//! requests of a queue are always the avail-ring entries right after the used index, and the
//! frontend (which rewinds the avail index to the used index when the backend dies) offers
//! them again in that order. Recovery checks the region against that and logs any difference.
//! The region is sealed against shrinking, so a frontend cannot make our accesses fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use log::{info, warn};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// Alignment of each queue's part of the region.
const QUEUE_ALIGN: usize = 64;
/// Queue header size.
const QHDR: usize = 16;
/// Size of one descriptor state entry.
const DESC: usize = 16;
/// Region format version.
const VERSION: u16 = 1;
/// Largest queue size we accept.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues we accept.
pub const MAX_QUEUES: u16 = 1024;

/// Bytes of one queue's part of the region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (QHDR + DESC * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// The shared inflight region of one connection.
pub struct InflightRegion {
    file: File,
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
    mmap_size: u64,
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || num_queues > MAX_QUEUES || queue_size == 0 || queue_size > MAX_QUEUE_SIZE
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inflight region for {num_queues} queues of {queue_size}"),
        ));
    }
    Ok(())
}

fn map_err(e: vm_memory::mmap::MmapRegionError) -> io::Error {
    io::Error::other(format!("mapping the inflight region: {e}"))
}

impl InflightRegion {
    /// A fresh, zeroed region for `num_queues` queues of `queue_size` entries, in a memfd
    /// sealed against shrinking (`GET_INFLIGHT_FD`).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Self> {
        check_geometry(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is ours.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-user-blk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        // SAFETY: fcntl on our own fd; the seals only restrict later size changes.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let region = Self::map(file, 0, size as u64, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = region.queue_base(q);
            region.put(base + 8, VERSION);
            region.put(base + 10, queue_size);
        }
        Ok(region)
    }

    /// Maps a region the frontend handed back (`SET_INFLIGHT_FD`). Refuses a file that could
    /// shrink under us or is smaller than the mapping.
    pub fn open(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        check_geometry(num_queues, queue_size)?;
        let need = queue_region_size(queue_size) as u64 * u64::from(num_queues);
        if mmap_size < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region of {mmap_size} bytes, need {need}"),
            ));
        }
        // SAFETY: F_GET_SEALS only reads the fd's seal set.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight fd is not sealed against shrinking",
            ));
        }
        let len = file.metadata()?.len();
        if mmap_offset
            .checked_add(mmap_size)
            .is_none_or(|end| end > len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight mapping {mmap_offset}+{mmap_size} past the file's {len} bytes"),
            ));
        }
        Self::map(file, mmap_offset, mmap_size, num_queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let len =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, offset), len)
            .map_err(map_err)?;
        Ok(InflightRegion {
            file,
            map,
            num_queues,
            queue_size,
            mmap_size: size,
        })
    }

    /// The memfd backing the region (sent to the frontend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the mapping in bytes.
    pub fn mmap_size(&self) -> u64 {
        self.mmap_size
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_base(&self, q: u16) -> usize {
        queue_region_size(self.queue_size) * usize::from(q)
    }

    fn put<T: vm_memory::ByteValued>(&self, off: usize, v: T) {
        // Offsets are computed from the checked geometry and always inside the mapping.
        if self.map.as_volatile_slice().write_obj(v, off).is_err() {
            warn!("inflight region write out of bounds at {off}");
        }
    }

    fn get<T: vm_memory::ByteValued + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .read_obj(off)
            .unwrap_or_default()
    }

    /// The tracker for queue `q`, if the region covers it.
    pub fn queue(&self, q: u16) -> Option<QueueTracker<'_>> {
        (q < self.num_queues).then(|| QueueTracker {
            region: self,
            base: self.queue_base(q),
        })
    }
}

/// Inflight bookkeeping of one queue.
pub struct QueueTracker<'a> {
    region: &'a InflightRegion,
    base: usize,
}

impl QueueTracker<'_> {
    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.region.queue_size).then(|| self.base + QHDR + DESC * usize::from(head))
    }

    /// Records that `head` was taken from the avail ring as the `counter`-th request.
    pub fn begin(&self, head: u16, counter: u64) {
        if let Some(d) = self.desc(head) {
            self.region.put(d + 8, counter);
            self.region.put(d, 1u8);
        }
    }

    /// Records that `head` is about to be returned to the used ring, as a batch of one
    /// (spec steps 1-3 for supplying used buffers: `desc[head].next = last_batch_head`,
    /// `last_batch_head = head`). Must be called before the used ring's index moves, so that a
    /// crash right after it moved finds this head as the last batch.
    pub fn batch(&self, head: u16) {
        if let Some(d) = self.desc(head) {
            let last: u16 = self.region.get(self.base + 12);
            self.region.put(d + 6, last);
            self.region.put(self.base + 12, head);
        }
    }

    /// Records that `head` was returned to the used ring, whose index is now `used_idx`
    /// (steps 5-6: clear the in-flight mark, then store the used index). If we die between
    /// the used ring's move and this, recovery sees the used ring one ahead of the recorded
    /// index and clears the last batch, `head`.
    pub fn complete(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            self.region.put(d, 0u8);
            self.region.put(self.base + 14, used_idx);
        }
    }

    /// After a restart: reconciles the last batch with the used ring's index `used_ring_idx`,
    /// clears every in-flight mark, and returns the heads that were in flight, in the order
    /// they were taken, plus the next counter value to use. `None` when the queue's region
    /// held no tracking (never initialized, or for another queue size): it now starts afresh
    /// and says nothing about the queue.
    pub fn recover(&self, used_ring_idx: u16) -> Option<(Vec<u16>, u64)> {
        let r = self.region;
        let version: u16 = r.get(self.base + 8);
        let desc_num: u16 = r.get(self.base + 10);
        if version == 0 || desc_num != r.queue_size {
            // Version 0 is a buffer nobody initialized (as libvhost-user treats it); a
            // different entry count is not a region for this queue. Neither says anything
            // about in-flight requests: start this queue's tracking afresh.
            if version != 0 {
                warn!(
                    "inflight region has {desc_num} entries for a queue of {}; ignoring it",
                    r.queue_size
                );
            }
            for off in (self.base..self.base + queue_region_size(r.queue_size)).step_by(8) {
                r.put(off, 0u64);
            }
            r.put(self.base + 8, VERSION);
            r.put(self.base + 10, r.queue_size);
            r.put(self.base + 14, used_ring_idx);
            return None;
        }
        let recorded: u16 = r.get(self.base + 14);
        if recorded != used_ring_idx {
            // Completions of the last batch reached the used ring but not the region.
            let mut batch = used_ring_idx.wrapping_sub(recorded);
            let mut head: u16 = r.get(self.base + 12);
            while batch > 0 {
                let Some(d) = self.desc(head) else { break };
                r.put(d, 0u8);
                head = r.get(d + 6);
                batch -= 1;
            }
            r.put(self.base + 14, used_ring_idx);
        }
        let mut inflight = Vec::new();
        let mut next_counter = 0u64;
        for head in 0..r.queue_size {
            let Some(d) = self.desc(head) else { break };
            let counter: u64 = r.get(d + 8);
            next_counter = next_counter.max(counter.saturating_add(1));
            if r.get::<u8>(d) != 0 {
                inflight.push((counter, head));
                r.put(d, 0u8);
            }
        }
        inflight.sort_unstable();
        if !inflight.is_empty() {
            info!(
                "{} request(s) were in flight when the previous backend stopped",
                inflight.len()
            );
        }
        Some((inflight.into_iter().map(|(_, h)| h).collect(), next_counter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_and_recover() {
        let r = InflightRegion::create(2, 8).unwrap();
        assert_eq!(r.mmap_size(), 2 * queue_region_size(8) as u64);
        let q = r.queue(1).unwrap();
        q.begin(3, 10);
        q.begin(5, 11);
        q.begin(1, 12);
        q.complete(3, 1);
        // Reopen through the fd, as after a restart.
        let file = r.file().try_clone().unwrap();
        let r2 = InflightRegion::open(file, 0, r.mmap_size(), 2, 8).unwrap();
        let (heads, next) = r2.queue(1).unwrap().recover(1).unwrap();
        assert_eq!(heads, vec![5, 1]);
        assert_eq!(next, 13);
        // Queue 0 untouched; marks were cleared.
        assert_eq!(
            r2.queue(0).unwrap().recover(0).unwrap().0,
            Vec::<u16>::new()
        );
        assert_eq!(
            r2.queue(1).unwrap().recover(1).unwrap().0,
            Vec::<u16>::new()
        );
        assert!(r2.queue(2).is_none());
    }

    /// A crash at every point of returning a request, while another head that was returned
    /// earlier (and so is the stale `last_batch_head`) has been taken again: recovery must
    /// keep exactly the requests the used ring has not got.
    #[test]
    fn crash_at_each_step_of_a_completion() {
        // Returns the region after: head 1 taken, returned (used idx 1), taken again; head 2
        // taken; then the first `steps` of returning head 2 (1: batch, 2: used idx moved,
        // 3: complete).
        let run = |steps: u32| {
            let r = InflightRegion::create(1, 4).unwrap();
            let q = r.queue(0).unwrap();
            q.begin(1, 0);
            q.batch(1);
            q.complete(1, 1);
            q.begin(1, 1);
            q.begin(2, 2);
            let mut used = 1;
            if steps >= 1 {
                q.batch(2);
            }
            if steps >= 2 {
                used = 2; // the used ring now holds head 2
            }
            if steps >= 3 {
                q.complete(2, 2);
            }
            let (heads, next) = q.recover(used).unwrap();
            assert_eq!(next, 3);
            heads
        };
        assert_eq!(run(0), vec![1, 2], "nothing returned yet");
        assert_eq!(run(1), vec![1, 2], "batch recorded, used ring not moved");
        assert_eq!(run(2), vec![1], "used ring moved, region not updated");
        assert_eq!(run(3), vec![1], "fully returned");
    }

    #[test]
    fn uninitialized_or_mismatched_queue_regions_start_afresh() {
        let r = InflightRegion::create(2, 8).unwrap();
        let q0 = r.queue(0).unwrap();
        q0.begin(3, 7);
        r.put(8, 0u16); // queue 0: version 0, as in a buffer nobody initialized
        let q1 = r.queue(1).unwrap();
        q1.begin(4, 9);
        r.put(queue_region_size(8) + 10, 16u16); // queue 1: entry count of another size
        assert_eq!(q0.recover(5), None);
        assert_eq!(q1.recover(5), None);
        // Both are usable afterwards.
        q0.begin(2, 0);
        assert_eq!(q0.recover(5), Some((vec![2], 1)));
    }

    #[test]
    fn refuses_unsealed_or_short_fds() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        f.set_len(4096).unwrap();
        assert!(
            InflightRegion::open(f, 0, 4096, 1, 8).is_err(),
            "not sealed"
        );
        let r = InflightRegion::create(1, 8).unwrap();
        let f = r.file().try_clone().unwrap();
        assert!(
            InflightRegion::open(f, 0, 1 << 20, 1, 8).is_err(),
            "past EOF"
        );
        let f = r.file().try_clone().unwrap();
        assert!(InflightRegion::open(f, 0, 16, 1, 8).is_err(), "too small");
        assert!(InflightRegion::create(0, 8).is_err());
        assert!(InflightRegion::create(1, 0).is_err());
    }
}

//! The io_uring engine of raw images: every read and write of a queue in flight at once, each
//! completing on its own. A request is one transfer (`uring::transfer`: non-blocking copies
//! first when buffered, bounce buffers for O_DIRECT, short transfers resubmitted).
//!
//! - FLUSH is an io_uring `fsync(DATASYNC)`: reads go on while it runs.
//! - Discard and write-zeroes run on the worker (`fallocate`, `BLKDISCARD`, `BLKZEROOUT`);
//!   in write-through mode an `fsync` follows through the ring.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::RawQueue;
use crate::image::engine::{EngineOp, GuestBuffers, IoEngine};
use crate::image::storage::{Dir, HostFile};
use crate::image::uring::transfer::{Transfer, Transfers};
use crate::image::uring::Ring;
use crate::image::ImageQueue;

/// The io_uring engine of one queue of a raw image.
pub struct RawRing {
    sync: RawQueue,
    file: Arc<HostFile>,
    io: Transfers,
    /// Guest buffers of the requests in flight, by tag (kept mapped until they end).
    bufs: Vec<Option<GuestBuffers>>,
    /// Requests that ended without the ring.
    done: Vec<(u16, io::Result<()>)>,
    /// Transfer results (reused).
    ended: Vec<(usize, io::Result<()>)>,
}

impl RawRing {
    /// The engine over `sync` (this queue's synchronous handle, which it also uses for what
    /// does not go through the ring).
    pub fn new(sync: RawQueue, ring: Ring) -> io::Result<RawRing> {
        let direct = sync.direct.then_some(sync.mem_align);
        Ok(RawRing {
            file: Arc::new(sync.file.try_clone()?),
            sync,
            io: Transfers::new(ring, direct),
            bufs: Vec::new(),
            done: Vec::new(),
            ended: Vec::new(),
        })
    }

    fn rw(&mut self, tag: u16, offset: u64, bufs: GuestBuffers, dir: Dir) {
        if matches!(dir, Dir::Write { .. }) {
            if let Err(e) = self.sync.guard(offset, &bufs.slices()) {
                return self.done.push((tag, Err(e)));
            }
        }
        self.io.start(Transfer {
            file: self.file.clone(),
            offset,
            iov: bufs.iov().to_vec(),
            dir,
            owner: usize::from(tag),
        });
        let slot = usize::from(tag);
        if self.bufs.len() <= slot {
            self.bufs.resize_with(slot + 1, || None);
        }
        self.bufs[slot] = Some(bufs);
    }
}

impl IoEngine for RawRing {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        match op {
            EngineOp::Read { offset, bufs } => self.rw(tag, offset, bufs, Dir::Read),
            EngineOp::Write {
                offset,
                bufs,
                durable,
            } => self.rw(tag, offset, bufs, Dir::Write { durable }),
            EngineOp::Flush => self.io.fsync(self.file.clone(), usize::from(tag)),
            EngineOp::Discard { segs, durable } => {
                match segs.iter().try_for_each(|&(o, l)| self.sync.discard(o, l)) {
                    Ok(()) if durable => self.io.fsync(self.file.clone(), usize::from(tag)),
                    r => self.done.push((tag, r)),
                }
            }
            EngineOp::WriteZeroes { segs, durable } => {
                let r = segs
                    .iter()
                    .try_for_each(|&(o, l, unmap)| self.sync.write_zeroes(o, l, unmap));
                match r {
                    Ok(()) if durable => self.io.fsync(self.file.clone(), usize::from(tag)),
                    r => self.done.push((tag, r)),
                }
            }
        }
        // Handed to the kernel by the next `reap`, with the rest of the pass.
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        self.io.reap(&mut self.ended);
        for (owner, r) in self.ended.drain(..) {
            if let Some(b) = self.bufs.get_mut(owner) {
                *b = None;
            }
            // Owners are tags, which are u16.
            out.push((owner as u16, r));
        }
        out.append(&mut self.done);
    }

    fn submit_queued(&mut self) {
        self.io.submit();
    }

    fn completions_ready(&mut self) -> bool {
        !self.done.is_empty() || self.io.completions_ready()
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.io.event_fd())
    }

    fn in_flight(&self) -> usize {
        self.io.pending() + self.done.len()
    }
}

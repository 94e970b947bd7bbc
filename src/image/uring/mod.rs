//! One queue's io_uring, with its completions signalled on an eventfd that the queue worker's
//! epoll watches, and a wake-up that other threads can post on the same eventfd.

pub mod transfer;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{cqueue, squeue, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Submission queue entries per ring.
const ENTRIES: u32 = 256;

/// A per-queue io_uring.
pub struct Ring {
    ring: IoUring,
    event: Arc<EventFd>,
    /// Entries pushed and not yet submitted to the kernel.
    unsubmitted: usize,
}

/// Lets another thread wake a queue worker (its ring's eventfd fires).
#[derive(Clone)]
pub struct Waker(Arc<EventFd>);

impl Waker {
    /// Wakes the worker: its engine's `reap` runs soon.
    pub fn wake(&self) {
        // A full counter (never in practice) already means "wake up".
        let _ = self.0.write(1);
    }
}

impl Ring {
    /// A ring whose completions write to a fresh eventfd. Fails where io_uring is unavailable
    /// (old kernel, seccomp).
    pub fn new() -> io::Result<Ring> {
        let ring = IoUring::new(ENTRIES)?;
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Ring {
            ring,
            event,
            unsubmitted: 0,
        })
    }

    /// The eventfd for the worker's epoll set.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// A handle other threads use to wake this ring's worker.
    pub fn waker(&self) -> Waker {
        Waker(self.event.clone())
    }

    /// Queues `entry`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer and iovec array the entry points at must stay valid, and not be moved,
    /// until its completion has been reaped ([`Ring::reap`]).
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive its completion.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands queued entries to the kernel (without waiting).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            // Interrupted, or the kernel is short of memory or has a full completion queue:
            // the entries stay queued and the next call (after a reap) submits them.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Calls `f(user_data, result)` for every completion, after clearing the eventfd (a
    /// completion that arrives meanwhile fires it again).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        let _ = self.event.read();
        loop {
            let mut any = false;
            for c in self.ring.completion() {
                any = true;
                let c: cqueue::Entry = c;
                f(c.user_data(), c.result());
            }
            if !any {
                break;
            }
        }
    }

    /// Submits what is queued and waits until at least one completion is waiting.
    pub fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// True if completions are waiting (a load of the completion queue's indices, no system
    /// call: for busy polling).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }
}

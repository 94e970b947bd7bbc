//! A queue engine's background flusher: flushes that write metadata back run on a thread of
//! their own, so the queue's worker goes on taking and completing requests meanwhile.
//!
//! Writing metadata back is a sequence of writes and syncs that must stay in order
//! (flush.rs). Run on the worker, it would hold back every request behind it for as long as
//! the syncs take on the disk. The io_uring engine (ring.rs) hands such a flush to its
//! flusher instead, which runs [`Qcow2Shared::flush`] and then wakes the worker through a
//! `dup` of the engine's completion eventfd; the worker collects the result on its next
//! reap. Flushes run one after another, in the order they were handed over.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Qcow2Shared;
use crate::sync::lock;

/// Results the flusher thread has produced and the worker has not collected yet.
#[derive(Default)]
struct Finished {
    results: Mutex<Vec<(u16, io::Result<()>)>>,
    /// Number of entries in `results`, readable without the lock.
    count: AtomicUsize,
}

/// The flusher of one queue engine.
pub(super) struct Flusher {
    /// Tags of flushes to run (closed on drop, which ends the thread).
    jobs: Option<Sender<u16>>,
    finished: Arc<Finished>,
    thread: Option<JoinHandle<()>>,
    /// Flushes handed over and not yet collected.
    pending: usize,
}

impl Flusher {
    /// Starts the flusher thread of an engine whose completion eventfd is `wake` (the thread
    /// writes a `dup` of it after each flush).
    pub(super) fn new(image: Arc<Qcow2Shared>, wake: RawFd) -> io::Result<Flusher> {
        // SAFETY: `wake` is the engine's open eventfd; F_DUPFD_CLOEXEC only reads it, and the
        // result is checked before use.
        let dup = unsafe { libc::fcntl(wake, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(dup) };
        let (jobs, rx) = mpsc::channel::<u16>();
        let finished = Arc::new(Finished::default());
        let out = finished.clone();
        let thread = std::thread::Builder::new()
            .name("vub-flusher".into())
            .spawn(move || {
                for tag in rx {
                    let r = image.flush();
                    let mut results = lock(&out.results);
                    results.push((tag, r));
                    // Under the lock, so the count never runs below what `collect` takes.
                    // Release: a worker that sees the count (Acquire in `ready`) finds the
                    // result.
                    out.count.fetch_add(1, Ordering::Release);
                    drop(results);
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: `wake` is an open eventfd this thread owns; write reads 8 bytes
                    // from a live local buffer.
                    let n = unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), 8) };
                    if n < 0 {
                        log::warn!(
                            "flusher: cannot wake the queue's worker: {}",
                            io::Error::last_os_error()
                        );
                    }
                }
            })?;
        Ok(Flusher {
            jobs: Some(jobs),
            finished,
            thread: Some(thread),
            pending: 0,
        })
    }

    /// Hands flush `tag` to the thread; false if the thread is gone (run it elsewhere).
    pub(super) fn start(&mut self, tag: u16) -> bool {
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(tag).is_ok());
        if sent {
            self.pending += 1;
        }
        sent
    }

    /// Flushes handed over and not collected yet.
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// True when a finished flush waits to be collected.
    pub(super) fn ready(&self) -> bool {
        // Acquire: pairs with the thread's Release after pushing the result.
        self.finished.count.load(Ordering::Acquire) > 0
    }

    /// Moves the finished flushes' results to `out`.
    pub(super) fn collect(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        if !self.ready() {
            return;
        }
        let mut results = lock(&self.finished.results);
        // Relaxed: the lock orders it with the thread's push and count update.
        self.finished
            .count
            .fetch_sub(results.len(), Ordering::Relaxed);
        self.pending = self.pending.saturating_sub(results.len());
        out.append(&mut results);
    }
}

impl Drop for Flusher {
    /// Waits for the flushes handed over to finish: an engine that is gone leaves nothing
    /// running on the image (a handover closes it next).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("flusher thread panicked");
            }
        }
    }
}

//! Large read batches split across two image handles on two threads.
//!
//! A queue worker runs its batch synchronously, so one queue reading big buffers copies at the
//! speed of one CPU (page cache to guest memory), while QEMU's io_uring spreads such copies over
//! kernel worker threads. A read batch of at least [`SPLIT_MIN_BYTES`] (of operations
//! averaging [`SPLIT_MIN_AVG_BYTES`]) is therefore cut in two
//! halves by bytes (an operation crossing the middle is cut too, at a 4 KiB boundary of its
//! own offset) and the second half runs on the queue's helper thread ([`SplitHelper`], which
//! owns a second image handle) while the worker runs the first. Each handle is used by one
//! thread only, and the worker waits for the helper's half before the batch completes, so
//! nothing is shared beyond what two queues already share. Writes are never split (their
//! ordering and durability stay simple).

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::image::{slices_len, BatchOp, GuestSlice, ImageQueue};

/// Read batches of at least this many bytes are split across two threads...
pub const SPLIT_MIN_BYTES: u64 = 128 << 10;

/// ...if their operations average at least this many bytes. Batches of small reads lose
/// more to the handoff and to a third busy thread than the copies gain (measured on 2 CPUs:
/// 4 KiB random reads at QD32 fell from about 480k to 415k IOPS when split).
pub const SPLIT_MIN_AVG_BYTES: u64 = 32 << 10;

/// The split point is a multiple of this many bytes from the start of the operation it cuts.
const SPLIT_ALIGN: u64 = 4096;

/// Whether `ops` is a read batch worth splitting.
pub fn worth_splitting(ops: &[BatchOp<'_>]) -> bool {
    if ops.is_empty() || ops.iter().any(|o| o.write) {
        return false;
    }
    let total: u64 = ops.iter().map(|o| slices_len(&o.bufs)).sum();
    total >= SPLIT_MIN_BYTES && total / ops.len() as u64 >= SPLIT_MIN_AVG_BYTES
}

/// Operations handed to the helper thread, their borrow of guest memory erased.
struct HelperOps(Vec<BatchOp<'static>>);

// SAFETY: the guest slices point into guest memory that the worker keeps mapped (it holds the
// memory guard) until `run_split` returns, and `run_split` does not return (or unwind) before
// the helper has handed the operations back or died (see `Pending`). Both threads only copy
// into the slices through volatile accesses or the kernel, never through Rust references, so
// concurrent access (even if the guest passed overlapping buffers) is not a data race in our
// address space.
unsafe impl Send for HelperOps {}

/// The helper's answer: the operations it ran (dropped by the worker) and their results.
type Reply = (HelperOps, Vec<io::Result<()>>);

/// A queue's helper thread for split read batches, owning a second image handle. Dropping it
/// stops and joins the thread.
pub struct SplitHelper {
    jobs: Option<mpsc::Sender<HelperOps>>,
    replies: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

impl SplitHelper {
    /// Starts the helper thread for `image` (a second handle on the queue's image).
    pub fn new(mut image: Box<dyn ImageQueue>) -> io::Result<SplitHelper> {
        let (jobs, job_rx) = mpsc::channel::<HelperOps>();
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name("read_helper".into())
            .spawn(move || {
                for ops in job_rx {
                    let mut r = Vec::with_capacity(ops.0.len());
                    image.run_batch(&ops.0, &mut r);
                    if reply_tx.send((ops, r)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(SplitHelper {
            jobs: Some(jobs),
            replies,
            thread: Some(thread),
        })
    }
}

impl Drop for SplitHelper {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A job in the helper's hands: waits for it when dropped, so the worker never leaves
/// `run_split` (not even by unwinding) while the helper may still touch guest memory.
struct Pending<'h> {
    helper: &'h SplitHelper,
    waited: bool,
}

impl Pending<'_> {
    /// The helper's results (empty if it died).
    fn wait(&mut self) -> Vec<io::Result<()>> {
        if self.waited {
            return Vec::new();
        }
        self.waited = true;
        // An error means the helper thread is gone (it panicked): it dropped the job with
        // it and touches nothing any more.
        match self.helper.replies.recv() {
            Ok((ops, r)) => {
                drop(ops);
                r
            }
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Splits `bufs` (covering `len` bytes) after `cut` bytes.
fn split_bufs<'a>(
    bufs: &[GuestSlice<'a>],
    cut: u64,
) -> Option<(Vec<GuestSlice<'a>>, Vec<GuestSlice<'a>>)> {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut pos = 0u64;
    for b in bufs {
        let len = b.len() as u64;
        if pos + len <= cut {
            head.push(*b);
        } else if pos >= cut {
            tail.push(*b);
        } else {
            let k = (cut - pos) as usize;
            head.push(b.subslice(0, k).ok()?);
            tail.push(b.subslice(k, b.len() - k).ok()?);
        }
        pos += len;
    }
    Some((head, tail))
}

/// The two halves of `ops`, each operation tagged with the index of the op it came from.
type Halves<'a> = (Vec<BatchOp<'a>>, Vec<usize>, Vec<BatchOp<'a>>, Vec<usize>);

fn halves<'a>(ops: &[BatchOp<'a>]) -> Option<Halves<'a>> {
    let total: u64 = ops.iter().map(|o| slices_len(&o.bufs)).sum();
    let mid = total / 2;
    let (mut a, mut ai, mut b, mut bi) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut pos = 0u64;
    for (i, op) in ops.iter().enumerate() {
        let len = slices_len(&op.bufs);
        let cut = mid.saturating_sub(pos) / SPLIT_ALIGN * SPLIT_ALIGN;
        let piece = |offset, bufs| BatchOp {
            offset,
            bufs,
            write: op.write,
            durable: op.durable,
        };
        if pos + len <= mid || cut >= len {
            a.push(piece(op.offset, op.bufs.clone()));
            ai.push(i);
        } else if pos >= mid || cut == 0 {
            b.push(piece(op.offset, op.bufs.clone()));
            bi.push(i);
        } else {
            let (head, tail) = split_bufs(&op.bufs, cut)?;
            a.push(piece(op.offset, head));
            ai.push(i);
            b.push(piece(op.offset + cut, tail));
            bi.push(i);
        }
        pos += len;
    }
    Some((a, ai, b, bi))
}

/// Runs the read batch `ops`, half of its bytes on `main` (this thread) and half on the
/// helper thread. Pushes one result per operation onto `results`: an operation fails if any
/// of its parts failed.
pub fn run_split(
    main: &mut dyn ImageQueue,
    helper: &SplitHelper,
    ops: &[BatchOp<'_>],
    results: &mut Vec<io::Result<()>>,
) {
    let Some((a, ai, b, bi)) = halves(ops) else {
        return main.run_batch(ops, results);
    };
    if a.is_empty() || b.is_empty() {
        return main.run_batch(ops, results);
    }
    let Some(jobs) = &helper.jobs else {
        return main.run_batch(ops, results);
    };
    // SAFETY: only the lifetime changes (same layout). The borrow of guest memory it erases
    // outlives every use: `Pending` makes this function wait for the helper to hand the
    // operations back (or to die with them) before it returns or unwinds.
    let b: Vec<BatchOp<'static>> = unsafe { std::mem::transmute(b) };
    if let Err(mpsc::SendError(b)) = jobs.send(HelperOps(b)) {
        // The helper is gone: run everything here.
        drop(b);
        return main.run_batch(ops, results);
    }
    let mut pending = Pending {
        helper,
        waited: false,
    };
    let mut ra = Vec::with_capacity(a.len());
    main.run_batch(&a, &mut ra);
    let rb = pending.wait();
    let mut errs: Vec<Option<io::Error>> = (0..ops.len()).map(|_| None).collect();
    let mut fail = |i: usize, r: Option<io::Result<()>>| {
        let e = match r {
            Some(Ok(())) => return,
            Some(Err(e)) => e,
            None => io::Error::other("no result for a split read"),
        };
        if let Some(slot) = errs.get_mut(i) {
            slot.get_or_insert(e);
        }
    };
    let mut ra = ra.into_iter();
    for &i in &ai {
        fail(i, ra.next());
    }
    let mut rb = rb.into_iter();
    for &i in &bi {
        fail(i, rb.next());
    }
    results.extend(errs.into_iter().map(|e| e.map_or(Ok(()), Err)));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::VolatileSlice;

    use super::*;

    /// Reads from a shared byte vector; fails reads touching `bad` (a byte offset).
    struct Mem {
        data: Arc<Vec<u8>>,
        bad: Option<u64>,
        calls: Calls,
    }

    impl ImageQueue for Mem {
        fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
            let len = slices_len(bufs);
            self.calls.lock().unwrap().push((offset, len));
            if self.bad.is_some_and(|b| b >= offset && b < offset + len) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let mut pos = offset as usize;
            for b in bufs {
                b.copy_from(&self.data[pos..pos + b.len()]);
                pos += b.len();
            }
            Ok(())
        }
        fn write(&mut self, _: u64, _: &[GuestSlice<'_>], _: bool) -> io::Result<()> {
            unreachable!("only reads are split")
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
    }

    /// (offset, length) of every read either handle ran.
    type Calls = Arc<Mutex<Vec<(u64, u64)>>>;

    fn mems(bad: Option<u64>) -> (Mem, Mem, Calls) {
        let data: Arc<Vec<u8>> = Arc::new((0..8 << 20).map(|i: u32| (i % 251) as u8).collect());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let m = |bad| Mem {
            data: data.clone(),
            bad,
            calls: calls.clone(),
        };
        (m(None), m(bad), calls)
    }

    #[test]
    fn split_reads_return_the_same_bytes_and_use_both_handles() {
        // Ops of uneven sizes with several buffers each, one crossing the middle.
        let sizes = [
            (0u64, vec![4096usize, 300 << 10]),
            (3 << 20, vec![512 << 10, 100 << 10]),
        ];
        let mut storage: Vec<Vec<u8>> = sizes
            .iter()
            .flat_map(|(_, b)| b.iter().map(|&n| vec![0u8; n]))
            .collect();
        let mut slices: Vec<GuestSlice<'_>> = storage
            .iter_mut()
            .map(|v| VolatileSlice::from(&mut v[..]))
            .collect();
        let mut ops = Vec::new();
        for (off, b) in &sizes {
            let bufs: Vec<_> = slices.drain(..b.len()).collect();
            ops.push(BatchOp {
                offset: *off,
                bufs,
                write: false,
                durable: false,
            });
        }
        assert!(worth_splitting(&ops));
        let (mut a, b, calls) = mems(None);
        let mut results = Vec::new();
        let helper = SplitHelper::new(Box::new(b)).unwrap();
        run_split(&mut a, &helper, &ops, &mut results);
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.is_ok()));
        drop(ops);
        let expect =
            |off: usize, n: usize| -> Vec<u8> { (off..off + n).map(|i| (i % 251) as u8).collect() };
        assert_eq!(storage[0], expect(0, 4096));
        assert_eq!(storage[1], expect(4096, 300 << 10));
        assert_eq!(storage[2], expect(3 << 20, 512 << 10));
        assert_eq!(storage[3], expect((3 << 20) + (512 << 10), 100 << 10));
        // The second op was cut: three calls, and the cut is 4 KiB aligned.
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert!(calls.iter().all(|&(o, _)| o % 4096 == 0), "{calls:?}");
    }

    #[test]
    fn a_failed_half_fails_only_its_operation() {
        let mut x = vec![0u8; 600 << 10];
        let mut y = vec![0u8; 600 << 10];
        let ops = vec![
            BatchOp {
                offset: 0,
                bufs: vec![VolatileSlice::from(&mut x[..])],
                write: false,
                durable: false,
            },
            BatchOp {
                offset: 1 << 20,
                bufs: vec![VolatileSlice::from(&mut y[..])],
                write: false,
                durable: false,
            },
        ];
        // The helper (second half) fails reads of the second op's last byte.
        let (mut a, b, _) = mems(Some((1 << 20) + (600 << 10) - 1));
        let mut results = Vec::new();
        let helper = SplitHelper::new(Box::new(b)).unwrap();
        run_split(&mut a, &helper, &ops, &mut results);
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
    }

    #[test]
    fn small_or_write_batches_are_not_split() {
        let mut x = vec![0u8; 64 << 10];
        let small = BatchOp {
            offset: 0,
            bufs: vec![VolatileSlice::from(&mut x[..])],
            write: false,
            durable: false,
        };
        assert!(!worth_splitting(&[small]));
        // 64 small reads: enough bytes, but too small on average.
        let mut many: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4096]).collect();
        let smalls: Vec<BatchOp<'_>> = many
            .iter_mut()
            .map(|v| BatchOp {
                offset: 0,
                bufs: vec![VolatileSlice::from(&mut v[..])],
                write: false,
                durable: false,
            })
            .collect();
        assert!(!worth_splitting(&smalls));
        let mut big = vec![0u8; 1 << 20];
        let w = BatchOp {
            offset: 0,
            bufs: vec![VolatileSlice::from(&mut big[..])],
            write: true,
            durable: false,
        };
        assert!(!worth_splitting(&[w]));
    }
}

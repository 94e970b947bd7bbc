//! Fault injection for tests (`--inject-faults SPEC`, hidden from `--help`).
//!
//! Wraps an image so that chosen operations fail with a chosen errno, to test that host I/O
//! errors reach the guest as IOERR, that the daemon keeps serving, and that the image stays
//! consistent; or so that they never finish, to stop the daemon with requests deterministically
//! in flight (inflight recovery tests); or so that they are slow, to have requests in flight
//! whenever the frontend stops a queue (migration drain tests). SPEC is
//! `OP:ERRNO[:after=N][:count=M]`:
//!
//! - `OP`: `read`, `write`, `flush`, `discard`, `write-zeroes` or `any`;
//! - `ERRNO`: `eio`, `enospc`, `edquot` or a number: the operation fails with that errno; or
//!   `hang`: the operation logs `injected fault: OP operation #K hangs until the process is
//!   killed` (K counts matching operations from 0) and then sleeps forever, holding its queue's
//!   worker (a SIGTERM then ends the daemon only through the shutdown watchdog; tests SIGKILL);
//!   or `delay=MS`: the operation completes MS milliseconds late (an engine with completion
//!   events runs it at once and holds its completion, so it is in flight meanwhile while the
//!   worker goes on; a synchronous operation holds its thread for MS first);
//! - `after=N`: let the first N matching operations through (default 0);
//! - `count=M`: fail (or hang) M operations, then let everything through again (default 0 =
//!   forever).
//!
//! Operations are counted across all queues.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;

use super::engine::{EngineOp, IoEngine};
use super::{BitmapInfo, BlockImage, GuestSlice, ImageQueue, ImageStats};
use crate::error::UnknownValue;

/// Which operations a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes (from the guest or the host).
    Flush,
    /// Discards.
    Discard,
    /// Write-zeroes.
    WriteZeroes,
    /// Everything.
    Any,
}

/// What a faulted operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Fails with this errno.
    Fail(i32),
    /// Never returns: sleeps until the process is killed.
    Hang,
    /// Never completes, but holds only itself: the queue's worker goes on with later
    /// requests, which complete before it (out-of-order completion). Where the operation runs
    /// synchronously (host-side flushes, sync image handles) it hangs like [`FaultAction::Hang`].
    Stall,
    /// Completes this many milliseconds late.
    Delay(u64),
}

/// A parsed `--inject-faults` specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    /// Operations that fail.
    pub op: FaultOp,
    /// What they do instead of running.
    pub action: FaultAction,
    /// Matching operations let through before failing starts.
    pub after: u64,
    /// How many fail (0: all from then on).
    pub count: u64,
}

/// Why an `--inject-faults` specification is refused (clap prints it after "invalid value").
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    /// An operation, errno or option name that is not one of those accepted.
    #[error(transparent)]
    Unknown(#[from] UnknownValue),
    /// A part whose number does not parse, e.g. `delay=x` or `after=-1`.
    #[error("bad {what} in '{part}'")]
    BadNumber {
        /// What the number counts: "milliseconds" or "number".
        what: &'static str,
        /// The part as given.
        part: String,
    },
    /// An option without `=`.
    #[error("bad fault option '{0}' (expected after=N or count=M)")]
    BadOption(String),
}

impl FaultSpecError {
    fn bad_number(what: &'static str, part: &str) -> Self {
        FaultSpecError::BadNumber {
            what,
            part: part.to_owned(),
        }
    }
}

impl std::str::FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<Self, FaultSpecError> {
        let mut parts = s.split(':');
        let op = match parts.next().unwrap_or_default() {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "flush" => FaultOp::Flush,
            "discard" => FaultOp::Discard,
            "write-zeroes" => FaultOp::WriteZeroes,
            "any" => FaultOp::Any,
            other => {
                return Err(UnknownValue::new(
                    "fault operation",
                    other,
                    "read, write, flush, discard, write-zeroes or any",
                )
                .into())
            }
        };
        let action = match parts.next().unwrap_or_default() {
            "eio" => FaultAction::Fail(libc::EIO),
            "enospc" => FaultAction::Fail(libc::ENOSPC),
            "edquot" => FaultAction::Fail(libc::EDQUOT),
            "hang" => FaultAction::Hang,
            "stall" => FaultAction::Stall,
            a if a.starts_with("delay=") => {
                let ms = &a["delay=".len()..];
                FaultAction::Delay(
                    ms.parse()
                        .map_err(|_| FaultSpecError::bad_number("milliseconds", a))?,
                )
            }
            n => FaultAction::Fail(n.parse().map_err(|_| {
                UnknownValue::new(
                    "errno",
                    n,
                    "eio, enospc, edquot, hang, stall, delay=MS or a number",
                )
            })?),
        };
        let mut spec = FaultSpec {
            op,
            action,
            after: 0,
            count: 0,
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| FaultSpecError::BadOption(p.to_owned()))?;
            let v: u64 = v
                .parse()
                .map_err(|_| FaultSpecError::bad_number("number", p))?;
            match k {
                "after" => spec.after = v,
                "count" => spec.count = v,
                _ => return Err(UnknownValue::new("fault option", k, "after or count").into()),
            }
        }
        Ok(spec)
    }
}

/// Shared counter of matching operations.
struct Injector {
    spec: FaultSpec,
    seen: AtomicU64,
}

/// What happens to one operation.
enum Verdict {
    Run,
    Fail(io::Error),
    Stall,
    Delay(Duration),
}

impl Injector {
    fn decide(&self, op: FaultOp) -> Verdict {
        if self.spec.op != FaultOp::Any && self.spec.op != op {
            return Verdict::Run;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let failing = n >= self.spec.after
            && (self.spec.count == 0 || n < self.spec.after.saturating_add(self.spec.count));
        match self.spec.action {
            _ if !failing => Verdict::Run,
            FaultAction::Fail(errno) => Verdict::Fail(io::Error::from_raw_os_error(errno)),
            FaultAction::Hang => hang(op, n),
            FaultAction::Stall => {
                warn!("injected fault: {op:?} operation #{n} never completes");
                Verdict::Stall
            }
            FaultAction::Delay(ms) => Verdict::Delay(Duration::from_millis(ms)),
        }
    }

    /// For operations that run synchronously: a stall holds the thread like a hang.
    fn check(&self, op: FaultOp) -> io::Result<()> {
        match self.decide(op) {
            Verdict::Run => Ok(()),
            Verdict::Delay(d) => {
                std::thread::sleep(d);
                Ok(())
            }
            Verdict::Fail(e) => Err(e),
            Verdict::Stall => hang(op, self.seen.load(Ordering::Relaxed)),
        }
    }
}

fn hang(op: FaultOp, n: u64) -> ! {
    warn!("injected fault: {op:?} operation #{n} hangs until the process is killed");
    loop {
        // park() may return spuriously; nothing ever unparks this thread.
        std::thread::park();
    }
}

/// An image whose operations fail as the spec says.
pub struct FaultImage {
    inner: Arc<dyn BlockImage>,
    injector: Arc<Injector>,
}

impl FaultImage {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockImage>, spec: FaultSpec) -> Self {
        FaultImage {
            inner,
            injector: Arc::new(Injector {
                spec,
                seen: AtomicU64::new(0),
            }),
        }
    }
}

impl BlockImage for FaultImage {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn discard_granularity(&self) -> u64 {
        self.inner.discard_granularity()
    }

    fn queue_handle(&self) -> io::Result<Box<dyn ImageQueue>> {
        Ok(Box::new(FaultQueue {
            inner: self.inner.queue_handle()?,
            injector: self.injector.clone(),
        }))
    }
    fn engine(&self) -> io::Result<Box<dyn IoEngine>> {
        let inner = self.inner.engine()?;
        let waker = match inner.event_fd() {
            Some(fd) => {
                // SAFETY: `fd` is the inner engine's open event fd; dup only reads it, and the
                // new descriptor is checked and then owned by the waker.
                let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `dup` is a fresh descriptor nothing else owns.
                Some(Arc::new(unsafe { OwnedFd::from_raw_fd(dup) }))
            }
            None => None,
        };
        Ok(Box::new(FaultEngine {
            inner,
            injector: self.injector.clone(),
            failed: Vec::new(),
            stalled: Vec::new(),
            waker,
            due: HashMap::new(),
            held: Vec::new(),
        }))
    }
    fn flush(&self) -> io::Result<()> {
        self.injector.check(FaultOp::Flush)?;
        self.inner.flush()
    }
    fn resize(&self, new_size: u64) -> io::Result<()> {
        self.inner.resize(new_size)
    }
    fn stats(&self) -> ImageStats {
        self.inner.stats()
    }
    fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.inner.bitmaps()
    }
    fn clear_bitmap(&self, name: &str) -> io::Result<()> {
        self.inner.clear_bitmap(name)
    }
    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }
}

struct FaultQueue {
    inner: Box<dyn ImageQueue>,
    injector: Arc<Injector>,
}

impl ImageQueue for FaultQueue {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.injector.check(FaultOp::Read)?;
        self.inner.read(offset, bufs)
    }
    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()> {
        self.injector.check(FaultOp::Write)?;
        self.inner.write(offset, bufs, durable)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.injector.check(FaultOp::Flush)?;
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.injector.check(FaultOp::Discard)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.injector.check(FaultOp::WriteZeroes)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// The fault layer over a queue's engine: a faulted request fails (or hangs, holding the
/// queue's worker) instead of reaching the engine, or completes late.
struct FaultEngine {
    inner: Box<dyn IoEngine>,
    injector: Arc<Injector>,
    failed: Vec<(u16, io::Result<()>)>,
    stalled: Vec<EngineOp>,
    /// A `dup` of the inner engine's completion event fd (None: it has none), written when a
    /// delayed completion falls due so that the worker reaps it.
    waker: Option<Arc<OwnedFd>>,
    /// When each delayed request (by tag) may complete.
    due: HashMap<u16, Instant>,
    /// Delayed completions the inner engine returned early.
    held: Vec<(Instant, u16, io::Result<()>)>,
}

/// Wakes the worker watching `fd` (an eventfd) after `delay`.
fn wake_after(fd: Arc<OwnedFd>, delay: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is an open eventfd this thread keeps alive; write reads 8 bytes from a
        // live local buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            warn!(
                "injected delay: cannot wake the worker: {}",
                io::Error::last_os_error()
            );
        }
    });
}

impl IoEngine for FaultEngine {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        let kind = match &op {
            EngineOp::Read { .. } => FaultOp::Read,
            EngineOp::Write { .. } => FaultOp::Write,
            EngineOp::Flush => FaultOp::Flush,
            EngineOp::Discard { .. } => FaultOp::Discard,
            EngineOp::WriteZeroes { .. } => FaultOp::WriteZeroes,
        };
        match self.injector.decide(kind) {
            Verdict::Run => self.inner.submit(tag, op),
            Verdict::Fail(e) => self.failed.push((tag, Err(e))),
            // Held here (with its guest buffers) until the process ends.
            Verdict::Stall => self.stalled.push(op),
            Verdict::Delay(d) => match &self.waker {
                Some(fd) => {
                    self.due.insert(tag, Instant::now() + d);
                    wake_after(fd.clone(), d);
                    self.inner.submit(tag, op);
                }
                None => {
                    std::thread::sleep(d);
                    self.inner.submit(tag, op);
                }
            },
        }
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        out.append(&mut self.failed);
        let start = out.len();
        self.inner.reap(out);
        if self.due.is_empty() && self.held.is_empty() {
            return;
        }
        for (tag, r) in out.drain(start..).collect::<Vec<_>>() {
            match self.due.remove(&tag) {
                Some(at) => self.held.push((at, tag, r)),
                None => out.push((tag, r)),
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let (_, tag, r) = self.held.swap_remove(i);
                out.push((tag, r));
            } else {
                i += 1;
            }
        }
    }

    fn event_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.inner.event_fd()
    }

    fn in_flight(&self) -> usize {
        self.failed.len() + self.stalled.len() + self.held.len() + self.inner.in_flight()
    }

    fn sequential(&self) -> bool {
        self.inner.sequential()
    }

    fn submit_queued(&mut self) {
        self.inner.submit_queued();
    }

    fn completions_ready(&mut self) -> bool {
        !self.failed.is_empty() || self.inner.completions_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s: FaultSpec = "write:eio:after=3:count=2".parse().unwrap();
        assert_eq!(s.op, FaultOp::Write);
        assert_eq!(
            (s.action, s.after, s.count),
            (FaultAction::Fail(libc::EIO), 3, 2)
        );
        assert_eq!(
            "flush:28".parse::<FaultSpec>().unwrap().action,
            FaultAction::Fail(28)
        );
        let h: FaultSpec = "write:hang:after=3".parse().unwrap();
        assert_eq!(
            (h.op, h.action, h.after, h.count),
            (FaultOp::Write, FaultAction::Hang, 3, 0)
        );
        assert!("any:hang".parse::<FaultSpec>().is_ok());
        assert_eq!(
            "any:delay=5".parse::<FaultSpec>().unwrap().action,
            FaultAction::Delay(5)
        );
        assert_eq!(
            "any:delay=x".parse::<FaultSpec>().unwrap_err(),
            FaultSpecError::bad_number("milliseconds", "delay=x")
        );
        let hung = "write:hung".parse::<FaultSpec>().unwrap_err();
        assert!(matches!(&hung, FaultSpecError::Unknown(u) if u.what == "errno"));
        assert_eq!(
            hung.to_string(),
            "unknown errno 'hung' (expected eio, enospc, edquot, hang, stall, delay=MS or a number)"
        );
        assert!(matches!(
            "write".parse::<FaultSpec>(),
            Err(FaultSpecError::Unknown(u)) if u.value.is_empty()
        ));
        assert!(matches!(
            "nope:eio".parse::<FaultSpec>(),
            Err(FaultSpecError::Unknown(u)) if u.what == "fault operation"
        ));
        assert!(matches!(
            "read:eio:x=1".parse::<FaultSpec>(),
            Err(FaultSpecError::Unknown(u)) if u.what == "fault option" && u.value == "x"
        ));
        assert_eq!(
            "read:eio:after".parse::<FaultSpec>().unwrap_err(),
            FaultSpecError::BadOption("after".into())
        );
        assert_eq!(
            "read:eio:count=-1"
                .parse::<FaultSpec>()
                .unwrap_err()
                .to_string(),
            "bad number in 'count=-1'"
        );
    }

    #[test]
    fn window_of_failures() {
        let inj = Injector {
            spec: "write:eio:after=2:count=2".parse().unwrap(),
            seen: AtomicU64::new(0),
        };
        let r: Vec<bool> = (0..6).map(|_| inj.check(FaultOp::Write).is_ok()).collect();
        assert_eq!(r, vec![true, true, false, false, true, true]);
        assert!(inj.check(FaultOp::Read).is_ok(), "other ops untouched");
    }

    #[test]
    fn a_delayed_operation_runs_late() {
        let inj = Injector {
            spec: "read:delay=30:count=1".parse().unwrap(),
            seen: AtomicU64::new(0),
        };
        let start = Instant::now();
        assert!(inj.check(FaultOp::Read).is_ok());
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}

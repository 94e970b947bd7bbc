//! Live counters: per-queue request statistics with a latency histogram.
//!
//! Each queue worker owns one [`QueueCounters`] and is its only writer (relaxed atomic adds on
//! its own cache lines); the control socket reads them at any time. The counters live as long
//! as the daemon, so they accumulate across frontend connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process (a monotonic clock for timestamps kept
/// in atomics). Never 0, so 0 can mean "never".
pub fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Sub-buckets per power of two in the latency histogram (relative error <= 1/SUB).
const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;
/// Buckets cover 1 ns .. 2^40 ns (~18 minutes).
const BUCKETS: usize = 41 * SUB;

/// Kinds of request counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqKind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID, unsupported types and malformed chains.
    Other,
}

impl ReqKind {
    /// All kinds, in reporting order.
    pub const ALL: [ReqKind; 6] = [
        ReqKind::Read,
        ReqKind::Write,
        ReqKind::Flush,
        ReqKind::Discard,
        ReqKind::WriteZeroes,
        ReqKind::Other,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ReqKind::Read => "read",
            ReqKind::Write => "write",
            ReqKind::Flush => "flush",
            ReqKind::Discard => "discard",
            ReqKind::WriteZeroes => "write_zeroes",
            ReqKind::Other => "other",
        }
    }
}

/// A log-linear latency histogram of atomics.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    let ns = ns.max(1);
    let log = 63 - ns.leading_zeros();
    let idx = if log < SUB_BITS {
        ns as usize
    } else {
        let sub = ((ns >> (log - SUB_BITS)) as usize) & (SUB - 1);
        (log as usize) * SUB + sub
    };
    idx.min(BUCKETS - 1)
}

/// Upper bound (ns) of the values that fall into bucket `idx`.
fn bucket_upper(idx: usize) -> u64 {
    let log = (idx / SUB) as u32;
    if log < SUB_BITS {
        return idx as u64;
    }
    let sub = (idx % SUB) as u64;
    ((SUB as u64 + sub + 1) << (log - SUB_BITS)) - 1
}

impl Histogram {
    /// Counts one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the bucket counts.
    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// The `p`-quantile (0..=1) in nanoseconds, as the upper bound of its bucket (0 if empty).
    pub fn quantile(counts: &[u64], p: f64) -> u64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(i);
            }
        }
        bucket_upper(counts.len() - 1)
    }
}

/// Counters of one virtqueue.
#[derive(Default)]
pub struct QueueCounters {
    requests: [AtomicU64; 6],
    /// Bytes read for the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written by the guest.
    pub bytes_written: AtomicU64,
    /// Requests completed with IOERR or UNSUPP.
    pub errors: AtomicU64,
    /// Chains returned without a status (no status byte).
    pub dropped: AtomicU64,
    /// Requests being executed right now.
    pub in_flight: AtomicU64,
    /// [`now_ns`] of the last successful flush (0: never).
    pub last_flush_ns: AtomicU64,
    /// Completion latency of every request.
    pub latency: Histogram,
}

impl QueueCounters {
    /// Counts a completed request.
    pub fn complete(&self, kind: ReqKind, bytes: u64, error: bool, latency: Duration) {
        self.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
        match kind {
            ReqKind::Read => self.bytes_read.fetch_add(bytes, Ordering::Relaxed),
            ReqKind::Write => self.bytes_written.fetch_add(bytes, Ordering::Relaxed),
            _ => 0,
        };
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(latency);
    }

    /// Number of completed requests of `kind`.
    pub fn requests(&self, kind: ReqKind) -> u64 {
        self.requests[kind as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for ns in [1u64, 2, 3, 4, 5, 7, 8, 100, 1000, 12345, 1 << 30, 1 << 39] {
            let b = bucket_of(ns);
            assert!(b >= last, "bucket order at {ns}");
            last = b;
            assert!(bucket_upper(b) >= ns, "upper bound of {ns}");
            // Relative error at most 1/SUB.
            assert!(
                bucket_upper(b) - ns <= ns / SUB as u64 + 1,
                "precision at {ns}"
            );
        }
    }

    #[test]
    fn quantiles_follow_samples() {
        let h = Histogram::default();
        for _ in 0..990 {
            h.record(Duration::from_micros(10));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(5));
        }
        let s = h.snapshot();
        let p50 = Histogram::quantile(&s, 0.5);
        let p999 = Histogram::quantile(&s, 0.999);
        assert!((10_000..=12_500).contains(&p50), "p50 {p50}");
        assert!((5_000_000..=6_250_000).contains(&p999), "p99.9 {p999}");
        assert_eq!(Histogram::quantile(&[0; 4], 0.5), 0);
    }

    #[test]
    fn complete_counts_kinds_bytes_and_errors() {
        let c = QueueCounters::default();
        c.complete(ReqKind::Read, 4096, false, Duration::from_micros(3));
        c.complete(ReqKind::Write, 512, true, Duration::from_micros(3));
        assert_eq!(c.requests(ReqKind::Read), 1);
        assert_eq!(c.requests(ReqKind::Write), 1);
        assert_eq!(c.bytes_read.load(Ordering::Relaxed), 4096);
        assert_eq!(c.bytes_written.load(Ordering::Relaxed), 512);
        assert_eq!(c.errors.load(Ordering::Relaxed), 1);
    }
}

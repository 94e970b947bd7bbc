//! vub-bench: a vhost-user-blk load generator built on libblkio (the `blkio` crate).
//!
//! Measures a vhost-user-blk backend (ours, qemu-storage-daemon, anything) without a VM:
//! one thread per virtqueue keeps `--depth` requests in flight for `--duration` seconds and
//! records every request's latency. Prints a table row, or one JSON object with `--json`.
//!
//! ```sh
//! cargo run --release --example vub-bench -- --socket /tmp/vub.sock \
//!     --pattern randread --bs 4096 --depth 32 --queues 1 --duration 10
//! ```

// A benchmark tool: a failed setup step ends the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use clap::Parser;

/// vhost-user-blk load generator (libblkio client).
#[derive(Parser, Debug, Clone)]
struct Args {
    /// vhost-user socket of the backend.
    #[arg(long)]
    socket: String,
    /// randread | randwrite | read | write | randrw | writeflush | discard | readflush
    /// (one slot of each queue writes and flushes in turn, the others read at random)
    #[arg(long, default_value = "randread")]
    pattern: String,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 70)]
    read_pct: u32,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Number of queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds to run before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes of the disk to use (default: all of it).
    #[arg(long)]
    range: Option<u64>,
    /// Stop after this many bytes of requests (all queues, warm-up included); --duration is
    /// then an upper bound and the rates cover the measured part.
    #[arg(long)]
    bytes: Option<u64>,
    /// Label printed with the result.
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object instead of a table row.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Read,
    Write,
    Discard,
}

/// xorshift64*: cheap, deterministic per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct ThreadResult {
    ops: u64,
    /// Operations completed over the whole run, warm-up and tail included.
    ops_total: u64,
    bytes: u64,
    errors: u64,
    lat_ns: Vec<u32>,
    /// Seconds of the measurement window this thread ran in (less than --duration when
    /// --bytes ended it early).
    window: f64,
}

fn pick_op(args: &Args, rng: &mut Rng, slot: usize) -> Op {
    match args.pattern.as_str() {
        "readflush" if slot == 0 => Op::Write,
        "randread" | "read" | "readflush" => Op::Read,
        "randwrite" | "write" | "writeflush" => Op::Write,
        "discard" => Op::Discard,
        "randrw" => {
            if (rng.next() % 100) < u64::from(args.read_pct) {
                Op::Read
            } else {
                Op::Write
            }
        }
        p => panic!("unknown pattern {p}"),
    }
}

fn run_queue(
    args: Args,
    mut q: blkio::Blkioq,
    buf: usize,
    qi: usize,
    capacity: u64,
    issued: Arc<AtomicU64>,
) -> ThreadResult {
    let bs = args.bs as u64;
    let range = args.range.unwrap_or(capacity).min(capacity) / bs * bs;
    let blocks = range / bs;
    let sequential = matches!(args.pattern.as_str(), "read" | "write" | "discard");
    // Slots whose writes are each followed by a flush.
    let flushes = |slot: usize| match args.pattern.as_str() {
        "writeflush" => true,
        "readflush" => slot == 0,
        _ => false,
    };
    let flush_each = args.pattern == "writeflush";
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (qi as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    // Sequential streams of different queues start at different places.
    let mut cursor = (blocks / args.queues.max(1) as u64) * qi as u64;
    let depth = if flush_each { 1 } else { args.depth };
    let mut started = vec![Instant::now(); depth];
    let mut flushing = vec![false; depth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let mut res = ThreadResult {
        ops: 0,
        ops_total: 0,
        bytes: 0,
        errors: 0,
        lat_ns: Vec::with_capacity(1 << 20),
        window: 0.0,
    };
    // Whether another request fits in --bytes (always without it).
    let claim = || match args.bytes {
        Some(limit) => issued.fetch_add(bs, Ordering::Relaxed) < limit,
        None => true,
    };

    let mut submit =
        |q: &mut blkio::Blkioq, slot: usize, rng: &mut Rng, started: &mut [Instant]| {
            let block = if sequential {
                let b = cursor % blocks;
                cursor += 1;
                b
            } else {
                rng.next() % blocks
            };
            let off = block * bs;
            let ptr = (buf + slot * args.bs) as *mut u8;
            started[slot] = Instant::now();
            match pick_op(&args, rng, slot) {
                Op::Read => q.read(off, ptr, args.bs, slot, ReqFlags::empty()),
                Op::Write => q.write(off, ptr, args.bs, slot, ReqFlags::empty()),
                Op::Discard => q.discard(off, bs, slot, ReqFlags::empty()),
            }
        };

    let mut inflight = 0;
    for slot in 0..depth {
        if !claim() {
            break;
        }
        submit(&mut q, slot, &mut rng, &mut started);
        inflight += 1;
    }
    let mut stopping = false;
    let mut last_done = Instant::now();
    while inflight > 0 {
        let n = match q.do_io(&mut completions, 1, None, None) {
            Ok(n) => n,
            Err(e) => panic!("do_io: {}", e.message()),
        };
        let now = Instant::now();
        last_done = now;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            if c.ret != 0 {
                res.errors += 1;
            }
            if flushes(slot) && !flushing[slot] {
                // The write is done; now its flush (the pair counts as one op).
                flushing[slot] = true;
                q.flush(slot, ReqFlags::empty());
                continue;
            }
            flushing[slot] = false;
            res.ops_total += 1;
            if now >= warm_end && now < end {
                res.ops += 1;
                res.bytes += bs;
                let lat = now.duration_since(started[slot]).as_nanos();
                res.lat_ns.push(lat.min(u32::MAX as u128) as u32);
            }
            if now >= end || (!stopping && !claim()) {
                stopping = true;
            }
            if stopping {
                inflight -= 1;
            } else {
                submit(&mut q, slot, &mut rng, &mut started);
            }
        }
    }
    res.window = last_done
        .min(end)
        .saturating_duration_since(warm_end)
        .as_secs_f64();
    res
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

fn main() {
    let args = Args::parse();
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    b.set_str("path", &args.socket).expect("path");
    b.connect()
        .unwrap_or_else(|e| panic!("connect to {}: {}", args.socket, e.message()));
    b.set_i32("num-queues", args.queues as i32)
        .expect("num-queues");
    let outcome = b
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let capacity = b.get_u64("capacity").expect("capacity");
    let align = b.get_i32("mem-region-alignment").unwrap_or(4096).max(1) as usize;
    let per_q = (args.bs * args.depth.max(1)).next_multiple_of(align);
    let region = b
        .alloc_mem_region(per_q * args.queues)
        .unwrap_or_else(|e| panic!("alloc_mem_region: {}", e.message()));
    b.map_mem_region(&region).expect("map_mem_region");
    // Recognisable, non-zero data for writes.
    // SAFETY: the region is `per_q * queues` bytes of mapped memory we own.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, per_q * args.queues) };

    let start = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = outcome
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let a = args.clone();
            let buf = region.addr + i * per_q;
            let issued = Arc::clone(&issued);
            std::thread::spawn(move || run_queue(a, q, buf, i, capacity, issued))
        })
        .collect();
    let mut ops = 0;
    let mut ops_total = 0;
    let mut bytes = 0;
    let mut errors = 0;
    let mut lat = Vec::new();
    let mut window: f64 = 0.0;
    for h in handles {
        let r = h.join().expect("worker thread");
        ops += r.ops;
        ops_total += r.ops_total;
        bytes += r.bytes;
        errors += r.errors;
        lat.extend(r.lat_ns);
        window = window.max(r.window);
    }
    let _wall = start.elapsed();
    lat.sort_unstable();
    let secs = if args.bytes.is_some() {
        window
    } else {
        args.duration
    };
    // A run that --bytes ended during the warm-up measured nothing.
    let secs_or_1 = if secs > 0.0 { secs } else { 1.0 };
    let iops = ops as f64 / secs_or_1;
    let mibs = bytes as f64 / secs_or_1 / (1024.0 * 1024.0);
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&l| f64::from(l)).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let (p50, p99, p999) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
    );
    if args.json {
        println!(
            "{{\"label\":\"{}\",\"pattern\":\"{}\",\"bs\":{},\"depth\":{},\"queues\":{},\"seconds\":{},\"ops\":{},\"ops_total\":{},\"errors\":{},\"iops\":{:.0},\"mib_s\":{:.1},\"lat_mean_us\":{:.1},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1}}}",
            args.label, args.pattern, args.bs, args.depth, args.queues, secs, ops, ops_total, errors, iops, mibs, mean, p50, p99, p999
        );
    } else {
        println!(
            "{:<20} {:<10} bs={:<7} qd={:<3} q={:<2} {:>10.0} IOPS {:>9.1} MiB/s  lat us: mean {:>8.1} p50 {:>8.1} p99 {:>8.1} p99.9 {:>8.1}  errors {}",
            args.label, args.pattern, args.bs, args.depth, args.queues, iops, mibs, mean, p50, p99, p999, errors
        );
    }
    if errors > 0 {
        std::process::exit(1);
    }
}

//! qcow2 engine microbenchmarks (criterion).
//!
//! ```sh
//! cargo bench --features bench --bench qcow2 -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Images are created in `/dev/shm` when it exists (so the numbers measure the engine, not
//! the disk), else in the temporary directory. Uses the engine's internal
//! `bench_support` module, which is not a stable API.

// A benchmark: a failed setup step ends the run with its message; criterion_group!
// defines an undocumented public function.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use vhost_user_blk::image::qcow2::bench_support::{Clusters, Image};
use vhost_user_blk::image::qcow2::Qcow2Image;

const CS: u64 = 64 << 10;
/// Guest bytes mapped by one L2 table (64 KiB clusters, 8192 entries).
const L2_SPAN: u64 = CS * (CS / 8);

fn scratch_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(&shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("temporary directory")
}

/// A fresh image of `size` bytes with one sector written at each of `offsets`, flushed.
fn image_with(dir: &tempfile::TempDir, size: u64, offsets: &[u64]) -> Image {
    let path = dir.path().join("bench.qcow2");
    let _ = std::fs::remove_file(&path);
    Qcow2Image::create(&path, size).expect("create image");
    let mut img = Image::open(&path, false).expect("open image");
    let mut sector = [0xa5u8; 512];
    for &o in offsets {
        img.write(o, &mut sector).expect("write");
    }
    img.flush().expect("flush");
    img
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn l2_lookup(c: &mut Criterion) {
    let dir = scratch_dir();
    // 16 Ki allocated clusters spread over 32 L2 tables (16 GiB of guest space).
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let span = 32 * L2_SPAN / CS;
    let mut clusters: Vec<u64> = (0..16384).map(|_| rng.next() % span).collect();
    clusters.sort_unstable();
    clusters.dedup();
    let offsets: Vec<u64> = clusters.iter().map(|&k| k * CS).collect();
    let img = image_with(&dir, 64 << 30, &offsets);
    let mut probe: Vec<u64> = offsets.iter().map(|&o| o + 4096).collect();
    // Random order over the allocated clusters.
    for i in (1..probe.len()).rev() {
        probe.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut k = 0usize;
    c.bench_function("l2_lookup/allocated", |b| {
        b.iter(|| {
            k = (k + 1) % probe.len();
            black_box(img.lookup(black_box(probe[k])).expect("lookup"))
        })
    });
    c.bench_function("l2_lookup/overlap_check", |b| {
        let cl = Clusters::new(1 << 20, 0);
        let mut k = 0u64;
        b.iter(|| {
            k = (k + 7919) & ((1 << 20) - 1);
            black_box(cl.is_meta(black_box(k)))
        })
    });
}

fn alloc_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("cluster_alloc");
    for threads in [1u64, 2, 4] {
        g.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                let cl = Arc::new(Clusters::new(1024, 0));
                let per = iters.div_ceil(t);
                let start = Instant::now();
                let hs: Vec<_> = (0..t)
                    .map(|_| {
                        let cl = cl.clone();
                        std::thread::spawn(move || {
                            for _ in 0..per {
                                black_box(cl.alloc().expect("alloc"));
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().expect("thread");
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn free_bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("free_bitmap");
    // Everything free: the first word has a free bit.
    let cl = Clusters::new(1, 1 << 20);
    g.bench_function("claim_release/dense", |b| {
        b.iter(|| {
            let k = cl.alloc().expect("alloc");
            cl.release(black_box(k)).expect("release");
        })
    });
    // One free cluster near the end of 1 Mi used ones: the scan hint must find it again.
    let cl = Clusters::new(1 << 20, 0);
    let last = cl.alloc().expect("alloc");
    cl.release(last).expect("release");
    g.bench_function("claim_release/sparse", |b| {
        b.iter(|| {
            let k = cl.alloc().expect("alloc");
            cl.release(black_box(k)).expect("release");
        })
    });
    g.finish();
}

fn flush_tables(c: &mut Criterion) {
    let dir = scratch_dir();
    // 256 L2 tables, one allocated cluster each.
    let offsets: Vec<u64> = (0..256).map(|k| k * L2_SPAN).collect();
    let img = image_with(&dir, 256 * L2_SPAN, &offsets);
    assert_eq!(img.loaded_tables(), 256);
    let mut g = c.benchmark_group("flush_dirty_l2");
    g.measurement_time(Duration::from_secs(3));
    for n in [1usize, 16, 256] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                img.dirty_tables(n);
                img.flush().expect("flush");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, l2_lookup, alloc_threads, free_bitmap, flush_tables);
criterion_main!(benches);

//! Open/repair time and memory of a large qcow2 image.
//!
//! Creates a 1 TiB qcow2 image (64 KiB clusters, `qemu-img create`), gives it the metadata of
//! 64 GiB of allocated data by writing one 512-byte sector into each of 1,048,576 random
//! distinct clusters through the engine (fresh clusters are written sparsely, so the file
//! stays small), closes it, then measures in fresh child processes:
//!
//! - a clean writable open (target < 100 ms), and RSS after it;
//! - RSS after reading one sector from every allocated cluster;
//! - a writable open with the dirty bit set, i.e. a refcount rebuild from L1/L2 (target < 2 s).
//!
//! ```sh
//! cargo run --release --features bench --example qcow2-open-bench -- [--dir DIR] [--clusters N] [--keep]
//!     [--image PATH] [--cache-mib N]
//! ```
//!
//! `--image` measures an image kept by an earlier `--keep` run instead of creating one;
//! `--cache-mib` sets the L2 cache budget (default: the engine's, 32 MiB).
//!
//! `--dir` defaults to /dev/shm when it has room, else the temporary directory. Uses the
//! engine's internal `bench_support` module, which is not a stable API.

// A benchmark tool: a failed setup step ends the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use vhost_user_blk::image::qcow2::bench_support::Image;

const CS: u64 = 64 << 10;
const SIZE: u64 = 1 << 40;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// (VmRSS, VmHWM) in KiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The `i`-th allocated guest cluster: a bijection on the 2^24 clusters of the disk (odd
/// multipliers and a xorshift, all modulo 2^24), so the first N are distinct.
fn cluster(i: u64) -> u64 {
    let mask = SIZE / CS - 1;
    let mut x = i.wrapping_mul(0x9e37_79b1) & mask;
    x ^= x >> 12;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d) & mask
}

fn clusters(count: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..count).map(cluster).collect();
    v.sort_unstable();
    v.dedup();
    // Spread the order again (sorting made it sequential).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn free_bytes(dir: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

fn usage(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "apparent {:.1} GiB, on disk (du) {:.1} MiB",
            m.len() as f64 / (1u64 << 30) as f64,
            (m.blocks() * 512) as f64 / (1u64 << 20) as f64
        ),
        Err(e) => format!("? ({e})"),
    }
}

fn populate(path: &Path, count: u64) -> R<()> {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
        .arg(path)
        .arg(SIZE.to_string())
        .status()?;
    if !st.success() {
        return Err("qemu-img create failed".into());
    }
    let list = clusters(count);
    let t = Instant::now();
    let mut img = Image::open(path, false)?;
    let mut sector = [0x5au8; 512];
    for (k, &c) in list.iter().enumerate() {
        sector[..8].copy_from_slice(&c.to_le_bytes());
        img.write(c * CS, &mut sector)?;
        if (k + 1) % (1 << 18) == 0 {
            img.flush()?;
        }
    }
    img.close()?;
    drop(img);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "populate: {} allocating 512-byte writes in {secs:.2} s ({:.0} writes/s), image {}",
        list.len(),
        list.len() as f64 / secs,
        usage(path)
    );
    Ok(())
}

/// Child: one measurement phase on an existing image.
fn phase(which: &str, path: &Path, count: u64, cache: Option<u64>) -> R<()> {
    let (rss0, _) = rss();
    let t = Instant::now();
    let mut img = Image::open(path, false)?;
    let open = t.elapsed();
    if let Some(mib) = cache {
        img.set_cache_bytes(mib << 20);
    }
    let (rss1, hwm1) = rss();
    let target = if which == "dirty" { 2000.0 } else { 100.0 };
    let ms = open.as_secs_f64() * 1e3;
    println!(
        "{which} open: {ms:.1} ms (target < {target} ms: {}), RSS {} -> {} (peak {})",
        if ms < target { "ok" } else { "MISSED" },
        mib(rss0),
        mib(rss1),
        mib(hwm1)
    );
    if which == "clean" {
        let list = clusters(count);
        let mut buf = [0u8; 512];
        let t = Instant::now();
        for &c in &list {
            img.read(c * CS, &mut buf)?;
            if buf[..8] != c.to_le_bytes() {
                return Err(format!("cluster {c} reads back wrong data").into());
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let (rss2, hwm2) = rss();
        println!(
            "read one sector of each of {} clusters: {secs:.2} s ({:.0} reads/s), {} L2 tables \
             in memory, RSS {} (peak {})",
            list.len(),
            list.len() as f64 / secs,
            img.loaded_tables(),
            mib(rss2),
            mib(hwm2)
        );
    }
    let t = Instant::now();
    img.close()?;
    drop(img);
    println!("{which} close: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

fn set_dirty(path: &Path) -> R<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72)?;
    let v = u64::from_be_bytes(b) | 1;
    f.write_all_at(&v.to_be_bytes(), 72)?;
    f.sync_all()?;
    Ok(())
}

/// Runs the three measurement phases, each in a fresh child process.
fn measure(path: &Path, count: u64, cache: Option<u64>) -> R<()> {
    let me = std::env::current_exe()?;
    let child = |w: &str| -> R<()> {
        let mut cmd = Command::new(&me);
        cmd.args(["--clusters", &count.to_string()]);
        if let Some(c) = cache {
            cmd.args(["--cache-mib", &c.to_string()]);
        }
        let st = cmd.args(["--phase", w]).arg(path).status()?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("{w} phase failed").into())
        }
    };
    child("clean")?;
    set_dirty(path)?;
    child("dirty")?;
    child("clean")?;
    Ok(())
}

fn run() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir: Option<PathBuf> = None;
    let mut count: u64 = 1 << 20;
    let mut keep = false;
    let mut child: Option<(String, PathBuf)> = None;
    let mut existing: Option<PathBuf> = None;
    let mut cache: Option<u64> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().map(PathBuf::from),
            "--clusters" => count = it.next().ok_or("--clusters N")?.parse()?,
            "--keep" => keep = true,
            "--image" => existing = it.next().map(PathBuf::from),
            "--cache-mib" => cache = Some(it.next().ok_or("--cache-mib N")?.parse()?),
            "--phase" => {
                let w = it.next().ok_or("--phase WHICH PATH")?.clone();
                let p = it.next().ok_or("--phase WHICH PATH")?;
                child = Some((w, PathBuf::from(p)));
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if let Some((w, p)) = child {
        return phase(&w, &p, count, cache);
    }
    if let Some(p) = existing {
        // Measure an image kept by an earlier `--keep` run (same `--clusters`).
        return measure(&p, count, cache);
    }
    // Sparse data: one 4 KiB page per written sector on tmpfs, plus metadata.
    let need = count * 4096 + (512 << 20);
    let dir = dir.unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if free_bytes(&shm) > need * 2 {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    if free_bytes(&dir) < need {
        return Err(format!(
            "{} has {} MiB free, need about {} MiB",
            dir.display(),
            free_bytes(&dir) >> 20,
            need >> 20
        )
        .into());
    }
    let path = dir.join(format!("qcow2-open-bench-{}.qcow2", std::process::id()));
    println!(
        "image: {} (1 TiB, 64 KiB clusters, {count} allocated clusters)",
        path.display()
    );
    let r = (|| -> R<()> {
        populate(&path, count)?;
        measure(&path, count, cache)
    })();
    if !keep {
        let _ = std::fs::remove_file(&path);
    }
    r
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcow2-open-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Image files and data for the tests: the one deterministic data pattern, image creation
//! and reading, byte comparison with a useful failure message, allocation checks.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::SECTOR;

/// SplitMix64's output function: a well-mixed 64-bit value from `x` (the generator behind
/// every data pattern and pseudo-random choice in the tests).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `out` with the deterministic data of the disk range starting at `offset`, tagged
/// with `seed`: byte `o` of the disk is byte `o % 8` of a word that depends on `seed` and on
/// `o` rounded down to 8, so misplaced or mixed-up data is detected. Any offset and length.
pub fn fill_pattern(out: &mut [u8], seed: u64, offset: u64) {
    let key = seed.rotate_left(40);
    let mut o = offset;
    let mut rest = out;
    while !rest.is_empty() {
        let word = splitmix64(key ^ (o & !7)).to_le_bytes();
        let skip = (o % 8) as usize;
        let n = (8 - skip).min(rest.len());
        rest[..n].copy_from_slice(&word[skip..skip + n]);
        rest = &mut rest[n..];
        o += n as u64;
    }
}

/// The data [`fill_pattern`] puts at `[offset, offset + len)` for `seed`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed, offset);
    v
}

/// Create `dir/name` of `size` bytes filled with `pattern(seed, 0, size)` (or zeros if `seed`
/// is None, written out so the blocks are allocated) and fsync it.
pub fn create_image(dir: &Path, name: &str, size: u64, seed: Option<u64>) -> PathBuf {
    let path = dir.join(name);
    let mut f = File::create(&path).expect("create image");
    let aligned = size / 8 * 8;
    let data = match seed {
        Some(s) => pattern(s, 0, aligned as usize),
        None => vec![0u8; aligned as usize],
    };
    f.write_all(&data).expect("write image");
    f.write_all(&vec![0xA5u8; (size - aligned) as usize])
        .expect("write image tail");
    f.sync_all().expect("fsync image");
    path
}

/// The whole file; panics (naming it) if it cannot be read.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Compare byte slices; on mismatch report the first differing disk offset and the number of
/// differing bytes instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], base_offset: u64, what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length differs (actual {}, expected {})",
        actual.len(),
        expected.len()
    );
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap();
        let count = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
        let end = (first + 16).min(actual.len());
        panic!(
            "{what}: data mismatch at disk offset {} (sector {}), {count} bytes differ; \
             actual[..16]={:02x?} expected[..16]={:02x?}",
            base_offset + first as u64,
            (base_offset + first as u64) / SECTOR,
            &actual[first..end],
            &expected[first..end]
        );
    }
}

/// Number of 512-byte blocks allocated to the file (st_blocks).
pub fn allocated_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks()
}

/// Does the filesystem holding `dir` support FALLOC_FL_PUNCH_HOLE (and reflect it in st_blocks)?
pub fn fs_supports_punch_hole(dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let p = dir.join("punch-probe");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create probe");
    (&f).write_all(&vec![1u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    let before = allocated_blocks(&p);
    // SAFETY: fallocate takes no pointers; `f` is an open file we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            1 << 20,
        )
    };
    let after = allocated_blocks(&p);
    drop(f);
    let _ = fs::remove_file(&p);
    rc == 0 && after < before
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    /// The device node (`/dev/loopN`).
    pub dev: PathBuf,
}

impl LoopDev {
    /// Err(why) when this cannot be done here (not root, no losetup, no loop devices).
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("loop devices need root".into());
        }
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDev { dev: dev.into() })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

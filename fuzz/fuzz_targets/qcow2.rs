//! qcow2: open an image made of fuzzer bytes with `ImageFormat::Qcow2`, run reads, writes,
//! discards, write-zeroes and flushes on it, close it, reopen it and check what was written.
//!
//! Until the qcow2 engine lands `open_image` refuses qcow2 and this target only checks that
//! refusing does not panic; once it lands, the same target exercises the engine.
//!
//! Input layout: byte 0: bits0-5 number of operations n, bit6 open read-only, bit7 use
//! 4096-byte logical blocks; then n operations of 8 bytes; the rest is the image file.
//! Operation: `kind: u8` (mod 5: read, write, discard, write-zeroes, flush), `blocks: u8`
//! (length = blocks + 1 logical blocks), `flags: u8` (bit0 durable / unmap, bit1 split the
//! buffer into two iovecs), `fill: u8` (the byte written), `block: u32 LE` (offset in logical
//! blocks, taken modulo the disk size). Ranges are clamped into the disk, as the request layer
//! guarantees for every `ImageQueue` call.
//!
//! Oracles: no panic (in particular no out-of-bounds slicing / arithmetic overflow on hostile
//! headers); a read right after a successful write or write-zeroes returns that data or zeros;
//! after close and reopen, the last data written to each block reads back.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhost_user_blk::image::{open_image, GuestSlice, ImageFormat, ImageOptions};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vub_fuzz::Bytes;

/// Largest single transfer: 256 blocks of 4 KiB.
const BUF: usize = 256 * 4096;

fn image_path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk.qcow2");
        (dir, path)
    })
    .1
}

fn guest() -> &'static GuestMemoryMmap<()> {
    static MEM: OnceLock<GuestMemoryMmap<()>> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BUF)]).expect("memory"))
}

/// One or two slices covering `len` bytes of guest memory.
fn bufs(len: usize, split: bool) -> Vec<GuestSlice<'static>> {
    let mem = guest();
    if split && len > 512 {
        let first = len / 2 / 512 * 512;
        vec![
            mem.get_slice(GuestAddress(0), first).expect("slice"),
            mem.get_slice(GuestAddress(first as u64), len - first)
                .expect("slice"),
        ]
    } else {
        vec![mem.get_slice(GuestAddress(0), len).expect("slice")]
    }
}

fn fill(len: usize, byte: u8) {
    let s = guest().get_slice(GuestAddress(0), len).expect("slice");
    s.copy_from(&vec![byte; len]);
}

fn contents(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    guest()
        .get_slice(GuestAddress(0), len)
        .expect("slice")
        .copy_to(&mut v);
    v
}

#[derive(Clone, Copy)]
struct Op {
    kind: u8,
    blocks: u64,
    flags: u8,
    fill: u8,
    block: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let head = b.u8();
    let nops = usize::from(head & 0x3f);
    let read_only = head & 0x40 != 0;
    let lbs: u64 = if head & 0x80 != 0 { 4096 } else { 512 };
    let ops: Vec<Op> = (0..nops)
        .map(|_| Op {
            kind: b.u8() % 5,
            blocks: u64::from(b.u8()) + 1,
            flags: b.u8(),
            fill: b.u8(),
            block: u64::from(b.u32()),
        })
        .collect();
    // An image names its external data file, which is opened writable: keep the fuzzer's
    // images from writing to files outside the scratch directory (a relative name stays in
    // it; the engine refuses the image file itself, directories and devices).
    let image = b.rest();
    if let Ok(h) = vhost_user_blk::image::qcow2::header::Header::parse(image, image.len() as u64) {
        if h
            .data_file
            .as_deref()
            .is_some_and(|n| n.starts_with('/') || n.contains(".."))
        {
            return;
        }
    }
    let path = image_path();
    std::fs::write(path, image).expect("write image file");
    let opts = ImageOptions {
        path: path.clone(),
        format: ImageFormat::Qcow2,
        read_only,
        direct: false,
        logical_block_size: lbs as u32,
        journal: vhost_user_blk::image::qcow2::JournalMode::Off,
        ..ImageOptions::new(path.clone(), ImageFormat::Qcow2)
    };
    let image = match open_image(&opts) {
        Ok(image) => image,
        Err(e) => {
            if vub_fuzz::debug() {
                eprintln!("qcow2: open failed: {e}");
            }
            return;
        }
    };
    if vub_fuzz::debug() {
        eprintln!(
            "qcow2: opened, {} bytes, {} ops, stats {:?}",
            image.virtual_size(),
            ops.len(),
            image.stats()
        );
    }
    assert_eq!(image.read_only(), read_only);
    let blocks_total = image.virtual_size() / lbs;
    if blocks_total == 0 {
        let _ = image.close();
        return;
    }
    let Ok(mut q) = image.queue_handle() else {
        return;
    };
    // What each block (index in logical blocks) must read back as after reopening.
    let mut shadow: BTreeMap<u64, u8> = BTreeMap::new();
    for op in &ops {
        let block = op.block % blocks_total;
        let n = op.blocks.min(blocks_total - block).min((BUF as u64) / lbs);
        let (off, len) = (block * lbs, n * lbs);
        let flag = op.flags & 1 != 0;
        let split = op.flags & 2 != 0;
        match op.kind {
            0 => {
                let _ = q.read(off, &bufs(len as usize, split));
            }
            1 if !read_only => {
                fill(len as usize, op.fill);
                if q.write(off, &bufs(len as usize, split), flag).is_ok() {
                    fill(len as usize, !op.fill);
                    if q.read(off, &bufs(len as usize, split)).is_ok() {
                        assert!(
                            contents(len as usize).iter().all(|&x| x == op.fill),
                            "BUG: read after write at {off} len {len} returned other data"
                        );
                    }
                    for i in block..block + n {
                        shadow.insert(i, op.fill);
                    }
                } else {
                    // A failed write leaves the range unspecified.
                    for i in block..block + n {
                        shadow.remove(&i);
                    }
                }
            }
            2 if !read_only => {
                let _ = q.discard(off, len);
                for i in block..block + n {
                    shadow.remove(&i);
                }
            }
            3 if !read_only => {
                if q.write_zeroes(off, len, flag).is_ok() {
                    fill(len as usize, 0xa5);
                    if q.read(off, &bufs(len as usize, split)).is_ok() {
                        assert!(
                            contents(len as usize).iter().all(|&x| x == 0),
                            "BUG: read after write-zeroes at {off} len {len} is not zero"
                        );
                    }
                    for i in block..block + n {
                        shadow.insert(i, 0);
                    }
                } else {
                    for i in block..block + n {
                        shadow.remove(&i);
                    }
                }
            }
            _ => {
                let _ = q.flush();
            }
        }
    }
    drop(q);
    if image.close().is_err() || read_only {
        return;
    }
    drop(image);
    // Reopen: everything written must have survived the close.
    let image = match open_image(&opts) {
        Ok(image) => image,
        Err(_) if shadow.is_empty() => return,
        Err(e) => {
            panic!("BUG: an image that accepted writes and closed cleanly cannot be reopened: {e}")
        }
    };
    let Ok(mut q) = image.queue_handle() else {
        return;
    };
    for (&blk, &byte) in &shadow {
        fill(lbs as usize, !byte);
        if q.read(blk * lbs, &bufs(lbs as usize, false)).is_ok() {
            assert!(
                contents(lbs as usize).iter().all(|&x| x == byte),
                "BUG: block {blk} lost its data across close/reopen"
            );
        }
    }
    if vub_fuzz::debug() {
        eprintln!("qcow2: reopened and checked {} blocks", shadow.len());
    }
    let _ = image.close();
});

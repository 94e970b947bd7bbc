//! Raw images: regular files and block devices, byte for byte the guest's disk.
//!
//! - Reads and writes go straight between guest memory and the file with `preadv`/`pwritev`.
//!   In write-through mode writes use `pwritev2(RWF_DSYNC)`, so each is durable on completion.
//! - DISCARD punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`, or `BLKDISCARD` on a
//!   block device); a file system that cannot punch holes makes it a no-op, which virtio allows.
//! - WRITE_ZEROES uses `FALLOC_FL_ZERO_RANGE` (or a punched hole with UNMAP; `BLKZEROOUT` on a
//!   block device) and falls back to writing zeros.
//! - FLUSH is `fdatasync`.
//! - With O_DIRECT, guest buffers that are not aligned to the file's memory alignment go through
//!   a per-queue aligned bounce buffer.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, warn};

use super::engine::{Aio, IoEngine, SyncEngine};
use super::lock::{self, Role};
use super::options::{ImageOptions, QCOW2_MAGIC};

mod ring;
use super::storage::{AlignedBuf, Dir, HostFile, IoVecs};
use super::{slices_len, BlockImage, GuestSlice, ImageQueue, ImageStats};
use crate::error::{Error, Result};

/// Chunk size of the zero-writing fallback of write-zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image shared by all queues.
pub struct RawImage {
    path: PathBuf,
    file: HostFile,
    size: AtomicU64,
    read_only: bool,
    direct: bool,
    block_device: bool,
    /// Memory alignment O_DIRECT needs for guest buffers (1 without O_DIRECT).
    mem_align: usize,
    /// Refuse writes that would make sector 0 look like a qcow2 header (auto-detected raw).
    guard_magic: bool,
    /// Which engine the queues get.
    aio: Aio,
}

impl RawImage {
    /// Opens the file at `opts.path`. `probed` says the format was auto-detected, which turns on
    /// the sector-0 guard described in [`super::format`].
    pub fn open(opts: &ImageOptions, probed: bool) -> Result<Self> {
        let path = &opts.path;
        let open_err = |source| Error::OpenImage {
            path: path.clone(),
            source,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::InvalidImage {
                    path: path.clone(),
                    reason: "the file system does not support O_DIRECT (--direct)".into(),
                }
            } else {
                open_err(e)
            }
        })?;
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(Error::InvalidImage {
                path: path.clone(),
                reason: "not a regular file or block device".into(),
            });
        }
        lock::claim(&file, path, Role::raw(!opts.read_only))?;
        let file = HostFile::new(file, opts.recorder.as_ref(), "image");
        let size = file.size().map_err(open_err)?;
        let (mem_align, offset_align) = if opts.direct {
            super::storage::direct_alignment(file.as_file(), block_device)
        } else {
            (1, 1)
        };
        if offset_align > opts.logical_block_size as usize {
            return Err(Error::InvalidImage {
                path: path.clone(),
                reason: format!(
                    "O_DIRECT needs {offset_align}-byte aligned I/O; use --logical-block-size \
                     {offset_align} or drop --direct"
                ),
            });
        }
        debug!(
            "opened raw image {} ({} bytes, block device: {}, O_DIRECT mem align {})",
            path.display(),
            size,
            block_device,
            mem_align
        );
        Ok(RawImage {
            path: path.clone(),
            file,
            size: AtomicU64::new(size),
            read_only: opts.read_only,
            direct: opts.direct,
            block_device,
            mem_align,
            guard_magic: probed && !opts.read_only,
            aio: opts.aio,
        })
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sync_queue(&self) -> io::Result<RawQueue> {
        Ok(RawQueue {
            file: self.file.try_clone()?,
            direct: self.direct,
            block_device: self.block_device,
            mem_align: self.mem_align,
            guard_magic: self.guard_magic,
            iovecs: IoVecs::default(),
            bounce: AlignedBuf::default(),
        })
    }
}

impl BlockImage for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn stats(&self) -> ImageStats {
        use std::os::unix::fs::MetadataExt;
        ImageStats {
            allocated_bytes: self.file.metadata().ok().map(|m| m.blocks() * 512),
            ..ImageStats::default()
        }
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is read-only",
            ));
        }
        if self.block_device {
            // A block device cannot be grown from here, but the operator may have grown it
            // (e.g. lvextend): accept sizes up to what the device now has.
            let actual = self.file.size()?;
            if new_size > actual {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block device has only {actual} bytes; grow the device first"),
                ));
            }
        } else {
            self.file.set_len(new_size)?;
            self.file.sync_all()?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn discard_granularity(&self) -> u64 {
        4096
    }

    fn queue_handle(&self) -> io::Result<Box<dyn ImageQueue>> {
        Ok(Box::new(self.sync_queue()?))
    }

    fn engine(&self) -> io::Result<Box<dyn IoEngine>> {
        let q = self.sync_queue()?;
        match self.aio.ring()? {
            Some(ring) => Ok(Box::new(ring::RawRing::new(q, ring)?)),
            None => Ok(Box::new(SyncEngine::new(Box::new(q)))),
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

/// One queue's handle on a raw image.
struct RawQueue {
    file: HostFile,
    direct: bool,
    block_device: bool,
    mem_align: usize,
    guard_magic: bool,
    iovecs: IoVecs,
    bounce: AlignedBuf,
}

impl RawQueue {
    /// The sector-0 guard of an auto-detected raw image (see [`super::format`]): EPERM for a
    /// write of the qcow2 magic to offset 0.
    fn guard(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if !self.guard_magic || offset != 0 {
            return Ok(());
        }
        let mut head = [0u8; 4];
        let mut pos = 0;
        for b in bufs {
            let n = b.len().min(head.len() - pos);
            b.subslice(0, n)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
                .copy_to(&mut head[pos..pos + n]);
            pos += n;
            if pos == head.len() {
                break;
            }
        }
        if pos == head.len() && head == QCOW2_MAGIC {
            warn!(
                "refused a guest write of the qcow2 magic to sector 0 of an auto-detected raw \
                 image (use --format raw to allow it)"
            );
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn aligned(&self, bufs: &[GuestSlice<'_>]) -> bool {
        let a = self.mem_align;
        bufs.iter().all(|b| {
            (b.ptr_guard().as_ptr() as usize).is_multiple_of(a) && b.len().is_multiple_of(a)
        })
    }

    /// preadv/pwritev straight on guest memory.
    fn direct_io(&mut self, offset: u64, bufs: &[GuestSlice<'_>], dir: Dir) -> io::Result<()> {
        let iovecs = &mut self.iovecs.0;
        iovecs.clear();
        for b in bufs {
            let base = match dir {
                Dir::Read => b.ptr_guard_mut().as_ptr(),
                Dir::Write { .. } => b.ptr_guard().as_ptr() as *mut u8,
            };
            iovecs.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        let r = self.file.transfer(iovecs, offset, dir);
        iovecs.clear();
        r
    }

    /// Transfer through the aligned bounce buffer (O_DIRECT with unaligned guest buffers).
    fn bounce_io(&mut self, offset: u64, bufs: &[GuestSlice<'_>], dir: Dir) -> io::Result<()> {
        let total = slices_len(bufs) as usize;
        if total == 0 {
            return Ok(());
        }
        let buf = self.bounce.get(total, self.mem_align)?;
        if let Dir::Write { .. } = dir {
            let mut pos = 0;
            for b in bufs {
                b.copy_to(&mut buf[pos..pos + b.len()]);
                pos += b.len();
            }
        }
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: total,
        }];
        self.file.transfer(&mut iov, offset, dir)?;
        if dir == Dir::Read {
            let mut pos = 0;
            for b in bufs {
                b.copy_from(&buf[pos..pos + b.len()]);
                pos += b.len();
            }
        }
        Ok(())
    }

    fn io(&mut self, offset: u64, bufs: &[GuestSlice<'_>], dir: Dir) -> io::Result<()> {
        if !self.direct || self.aligned(bufs) {
            match self.direct_io(offset, bufs, dir) {
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file wanted a stricter memory alignment than we knew; bounce from
                    // now on for this queue.
                    warn!("O_DIRECT rejected guest buffer alignment; using a bounce buffer");
                    self.mem_align = self.mem_align.max(4096);
                }
                r => return r,
            }
        }
        self.bounce_io(offset, bufs, dir)
    }

    /// Writes zeros over the range with ordinary writes (the fallback).
    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = (len as usize).min(ZERO_CHUNK);
        let buf = self.bounce.get(chunk, self.mem_align)?;
        buf.fill(0);
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(chunk);
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            self.file
                .transfer(&mut iov, offset + done, Dir::Write { durable: false })?;
            done += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

impl ImageQueue for RawQueue {
    fn read(&mut self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.io(offset, bufs, Dir::Read)
    }

    fn write(&mut self, offset: u64, bufs: &[GuestSlice<'_>], durable: bool) -> io::Result<()> {
        self.guard(offset, bufs)?;
        self.io(offset, bufs, Dir::Write { durable })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // A zero-length segment is valid and discards nothing (fallocate would say EINVAL).
        if len == 0 {
            return Ok(());
        }
        let r = if self.block_device {
            self.file.blk_discard(offset, len)
        } else {
            self.file.punch_hole(offset, len)
        };
        match r {
            Err(e) if unsupported(&e) => {
                debug!("discard not supported by the host file: {e}");
                Ok(())
            }
            r => r,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let r = if self.block_device {
            self.file.blk_zeroout(offset, len)
        } else {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            let first = if unmap { punch } else { zero };
            match self.file.fallocate(first, offset, len) {
                Err(e) if unsupported(&e) && !unmap => self.file.fallocate(punch, offset, len),
                Err(e) if unsupported(&e) => self.file.fallocate(zero, offset, len),
                r => r,
            }
        };
        match r {
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                self.write_zero_bytes(offset, len)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::options::ImageFormat;
    use vm_memory::VolatileSlice;

    fn image(dir: &Path, size: u64, direct: bool, probed: bool) -> RawImage {
        let path = dir.join("disk.img");
        if !path.exists() {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(size).unwrap();
        }
        let opts = ImageOptions {
            direct,
            ..ImageOptions::new(path, ImageFormat::Raw)
        };
        RawImage::open(&opts, probed).unwrap()
    }

    fn write(q: &mut dyn ImageQueue, off: u64, data: &mut [u8]) -> io::Result<()> {
        q.write(off, &[VolatileSlice::from(data)], false)
    }

    fn read(q: &mut dyn ImageQueue, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        q.read(off, &[VolatileSlice::from(&mut buf[..])]).unwrap();
        buf
    }

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn scattered_buffers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20, false, false);
        let mut q = img.queue_handle().unwrap();
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1536];
        q.write(
            4096,
            &[
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ],
            true,
        )
        .unwrap();
        let got = read(q.as_mut(), 4096, 2048);
        assert_eq!(&got[..512], &a[..]);
        assert_eq!(&got[512..], &b[..]);
        // Another queue handle sees the same data.
        let mut q2 = img.queue_handle().unwrap();
        assert_eq!(read(q2.as_mut(), 4096, 2048), got);
    }

    #[test]
    fn discard_punches_a_hole_and_keeps_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 4 << 20, false, false);
        let mut q = img.queue_handle().unwrap();
        write(q.as_mut(), 0, &mut vec![7u8; 4 << 20]).unwrap();
        img.flush().unwrap();
        // Zero-length segments succeed and touch nothing, like zero-length write-zeroes.
        q.discard(4096, 0).unwrap();
        q.write_zeroes(4096, 0, true).unwrap();
        let before = allocated_bytes(img.path());
        q.discard(1 << 20, 2 << 20).unwrap();
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 4 << 20);
        assert!(allocated_bytes(img.path()) < before, "no space was freed");
        assert_eq!(read(q.as_mut(), 1 << 20, 2 << 20), vec![0u8; 2 << 20]);
        assert_eq!(read(q.as_mut(), 0, 4096), vec![7u8; 4096]);
        assert_eq!(read(q.as_mut(), 3 << 20, 4096), vec![7u8; 4096]);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20, false, false);
        let mut q = img.queue_handle().unwrap();
        write(q.as_mut(), 0, &mut vec![9u8; 1 << 20]).unwrap();
        q.write_zeroes(4096, 8192, false).unwrap();
        q.write_zeroes(65536, 512, true).unwrap();
        let got = read(q.as_mut(), 0, 1 << 20);
        assert!(got[..4096].iter().all(|&b| b == 9));
        assert!(got[4096..12288].iter().all(|&b| b == 0));
        assert!(got[12288..65536].iter().all(|&b| b == 9));
        assert!(got[65536..66048].iter().all(|&b| b == 0));
        assert!(got[66048..].iter().all(|&b| b == 9));
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 1 << 20);
    }

    #[test]
    fn zero_fallback_writes_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20, false, false);
        let mut q = RawQueue {
            file: img.file.try_clone().unwrap(),
            direct: false,
            block_device: false,
            mem_align: 1,
            guard_magic: false,
            iovecs: IoVecs::default(),
            bounce: AlignedBuf::default(),
        };
        write(&mut q, 0, &mut vec![3u8; 3 << 20 >> 2]).unwrap();
        q.write_zero_bytes(512, 2048).unwrap();
        let got = read(&mut q, 0, 4096);
        assert!(got[..512].iter().all(|&b| b == 3));
        assert!(got[512..2560].iter().all(|&b| b == 0));
    }

    #[test]
    fn direct_io_with_unaligned_guest_buffers_bounces() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20, true, false);
        let mut q = img.queue_handle().unwrap();
        // A buffer starting at an odd address forces the bounce path.
        let mut backing = vec![0u8; 4096 + 1];
        for (i, b) in backing.iter_mut().enumerate() {
            *b = (i % 13) as u8;
        }
        let (_, unaligned) = backing.split_at_mut(1);
        write(q.as_mut(), 8192, unaligned).unwrap();
        let mut out = vec![0u8; 4096 + 3];
        q.read(8192, &[VolatileSlice::from(&mut out[3..])]).unwrap();
        assert_eq!(&out[3..], &backing[1..]);
        // Read back through a non-direct handle to see the bytes really reached the file.
        let plain = std::fs::read(img.path()).unwrap();
        assert_eq!(&plain[8192..8192 + 4096], &backing[1..]);
    }

    #[test]
    fn read_past_end_of_file_returns_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8192, false, false);
        let mut q = img.queue_handle().unwrap();
        // The file shrinks behind our back: reads past EOF give zeros, not garbage.
        img.file.set_len(4096).unwrap();
        assert_eq!(read(q.as_mut(), 4096, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn probed_raw_refuses_qcow2_magic_at_sector_0() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8192, false, true);
        let mut q = img.queue_handle().unwrap();
        let mut data = vec![0u8; 512];
        data[..4].copy_from_slice(&QCOW2_MAGIC);
        let e = write(q.as_mut(), 0, &mut data).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert_eq!(read(q.as_mut(), 0, 4), vec![0u8; 4]);
        // Elsewhere, or split over buffers at a different offset, it is just data.
        write(q.as_mut(), 512, &mut data).unwrap();
        // Magic split across two buffers at offset 0 is still caught.
        let (mut a, mut b) = (data[..2].to_vec(), data[2..].to_vec());
        let e = q
            .write(
                0,
                &[
                    VolatileSlice::from(&mut a[..]),
                    VolatileSlice::from(&mut b[..]),
                ],
                false,
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // An explicitly raw image allows it.
        let img2 = image(dir.path(), 8192, false, false);
        let mut q2 = img2.queue_handle().unwrap();
        write(q2.as_mut(), 0, &mut data).unwrap();
    }

    /// Reads and writes through the io_uring engine, buffered and O_DIRECT: all in flight
    /// at once, aligned buffers straight to the ring, an unaligned one through a bounce
    /// buffer, write-through writes, a read past what was written.
    #[test]
    fn requests_run_through_the_io_uring_engine() {
        use crate::image::engine::testing::{buffers, get, memory, put, run};
        use crate::image::engine::EngineOp;
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let img = image(dir.path(), 4 << 20, direct, false);
            let mut e = img.engine().unwrap();
            assert!(e.event_fd().is_some(), "io_uring engine");
            let mem = memory(1 << 20);
            let mut ops = Vec::new();
            for i in 0..8u64 {
                put(&mem, i * 8192, &vec![i as u8 + 1; 8192]);
                // Two pieces each.
                ops.push(EngineOp::Write {
                    offset: i * 65536,
                    bufs: buffers(&mem, &[(i * 8192, 4096), (i * 8192 + 4096, 4096)]),
                    durable: i % 2 == 0,
                });
            }
            // Unaligned for O_DIRECT: bounced.
            put(&mem, 0x80001, &[0x99; 4096]);
            ops.push(EngineOp::Write {
                offset: 1 << 20,
                bufs: buffers(&mem, &[(0x80001, 4096)]),
                durable: false,
            });
            let results = run(e.as_mut(), ops);
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            let mut ops = Vec::new();
            for i in 0..9u64 {
                let off = if i == 8 { 1 << 20 } else { i * 65536 };
                ops.push(EngineOp::Read {
                    offset: off,
                    bufs: buffers(&mem, &[(0xc0000 + i * 8192, 8192)]),
                });
            }
            ops.push(EngineOp::Flush);
            let results = run(e.as_mut(), ops);
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            for i in 0..8u64 {
                assert_eq!(
                    get(&mem, 0xc0000 + i * 8192, 8192),
                    vec![i as u8 + 1; 8192],
                    "op {i} direct={direct}"
                );
            }
            assert_eq!(get(&mem, 0xc0000 + 8 * 8192, 4096), vec![0x99u8; 4096]);
            assert_eq!(get(&mem, 0xc0000 + 8 * 8192 + 4096, 4096), vec![0u8; 4096]);
        }
    }

    /// The sector-0 guard of an auto-detected raw image holds on the io_uring engine too,
    /// while the other writes go on.
    #[test]
    fn guarded_write_at_offset_0_through_the_io_uring_engine() {
        use crate::image::engine::testing::{buffers, memory, put, run};
        use crate::image::engine::EngineOp;
        let dir = tempfile::tempdir().unwrap();
        // O_DIRECT and auto-detected (sector-0 guard on).
        let img = image(dir.path(), 1 << 20, true, true);
        let mut e = img.engine().unwrap();
        let mem = memory(1 << 20);
        let mut magic = vec![0u8; 4096];
        magic[..4].copy_from_slice(&QCOW2_MAGIC);
        put(&mem, 0, &magic);
        let mut ops = vec![EngineOp::Write {
            offset: 0,
            bufs: buffers(&mem, &[(0, 4096)]),
            durable: false,
        }];
        for i in 1..4u64 {
            put(&mem, i * 4096, &vec![0x10 + i as u8; 4096]);
            ops.push(EngineOp::Write {
                offset: i * 8192,
                bufs: buffers(&mem, &[(i * 4096, 4096)]),
                durable: false,
            });
        }
        let results = run(e.as_mut(), ops);
        assert_eq!(
            results[0].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(results[1..].iter().all(|r| r.is_ok()), "{results:?}");
        let file = std::fs::read(img.path()).unwrap();
        assert!(file[..4096].iter().all(|&b| b == 0), "guarded write landed");
        for i in 1..4usize {
            assert!(file[i * 8192..i * 8192 + 4096]
                .iter()
                .all(|&b| b == 0x10 + i as u8));
        }
    }
}

//! The io_uring engine of qcow2 images: a queue's reads and overwrites all in flight at once,
//! each completing on its own.
//!
//! A read or write is first planned (plan.rs: host extents from the L2 tables, no data I/O);
//! the plan's extents then run as transfers on the queue's ring (`uring::transfer`), and the
//! request completes when the last of them does. Zero extents are filled at once.
//!
//! What a plan cannot express runs on the queue's synchronous handle, on the worker, while
//! the ring's requests go on: reads of compressed clusters or through a qcow2 backing file,
//! writes that allocate or copy a cluster (or any write without a mapping journal, or in
//! write-through mode, which flush before completing), discard, write-zeroes and flush. Each
//! completes before the next request is taken. Since the synchronous path finishes every
//! reservation it makes before it returns, the worker never waits for itself.
//!
//! Reuse: a request in the ring may still read or write the host cluster its plan named after
//! another request unmapped it. Clusters a flush frees are handed out again only once every
//! request that started before is done (the module docs' "Reuse" rule): the engine keeps the
//! start epochs of its requests in flight and publishes the oldest in its slot.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::plan::{Extent, Source};
use super::{Backing, Qcow2Queue, Qcow2Shared};
use crate::image::engine::{run_sync, EngineOp, GuestBuffers, IoEngine};
use crate::image::storage::{Dir, HostFile};
use crate::image::uring::transfer::{sub_iov, zero_range, Slab, Transfer, Transfers};
use crate::image::uring::Ring;
use crate::image::ImageQueue;

/// The start epochs of a queue's requests in flight, and the slot where the oldest is
/// published for reclaim.
struct Epochs {
    slot: Arc<AtomicU64>,
    /// Epoch -> requests in flight that started in it.
    open: BTreeMap<u64, usize>,
}

impl Epochs {
    /// Records a request starting now and returns its epoch. The slot holds the oldest epoch
    /// in flight, never later than this request's, before the request looks up any mapping.
    fn begin(&mut self, shared: &Qcow2Shared) -> u64 {
        let e = shared.epoch.load(Ordering::SeqCst);
        *self.open.entry(e).or_insert(0) += 1;
        let oldest = self.open.keys().next().copied().unwrap_or(e);
        self.slot.store(oldest, Ordering::SeqCst);
        // Pairs with the fence in `Qcow2Shared::reclaim`, as in `begin_request`.
        std::sync::atomic::fence(Ordering::SeqCst);
        e
    }

    /// A request that started in epoch `e` is done.
    fn end(&mut self, e: u64) {
        if let Some(n) = self.open.get_mut(&e) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&e);
            }
        }
        let oldest = self.open.keys().next().copied().unwrap_or(0);
        // Release: what the finished requests did happens before a reclaim that sees the
        // slot move on.
        self.slot.store(oldest, Ordering::Release);
    }
}

/// A request whose extents are in the ring.
struct Req {
    tag: u16,
    /// Keeps the guest buffers mapped until the last extent ends.
    bufs: GuestBuffers,
    /// Extents still in the ring.
    left: usize,
    /// The first error of an extent.
    result: io::Result<()>,
    epoch: u64,
}

/// The io_uring engine of one queue of a qcow2 image.
pub(super) struct Qcow2Ring {
    shared: Arc<Qcow2Shared>,
    /// The queue's synchronous handle, for what plans do not cover.
    sync: Qcow2Queue,
    /// The file guest data lives in, as the ring reads and writes it (O_DIRECT with
    /// `--direct`).
    data: Arc<HostFile>,
    /// The raw backing file, if any.
    backing: Option<Arc<HostFile>>,
    io: Transfers,
    reqs: Slab<Req>,
    epochs: Epochs,
    /// Requests that ended without the ring.
    done: Vec<(u16, io::Result<()>)>,
    /// Transfer results (reused).
    ended: Vec<(usize, io::Result<()>)>,
    /// Reads and writes run from a plan, and on the synchronous path.
    planned: u64,
    synchronous: u64,
}

impl Qcow2Ring {
    /// The engine of a queue: `sync` is its synchronous handle, `data` its descriptor of the
    /// file guest data lives in (opened with O_DIRECT for `--direct`, whose buffer alignment
    /// `direct` gives).
    pub(super) fn new(
        shared: Arc<Qcow2Shared>,
        sync: Qcow2Queue,
        data: HostFile,
        direct: Option<usize>,
        ring: Ring,
    ) -> io::Result<Qcow2Ring> {
        let backing = match &shared.backing {
            Some(Backing::Raw { file, .. }) => Some(Arc::new(file.try_clone()?)),
            _ => None,
        };
        let slot = shared.register_slot();
        Ok(Qcow2Ring {
            shared,
            sync,
            data: Arc::new(data),
            backing,
            io: Transfers::new(ring, direct),
            reqs: Slab::default(),
            epochs: Epochs {
                slot,
                open: BTreeMap::new(),
            },
            done: Vec::new(),
            ended: Vec::new(),
            planned: 0,
            synchronous: 0,
        })
    }

    fn read(&mut self, tag: u16, offset: u64, bufs: GuestBuffers) {
        let epoch = self.epochs.begin(&self.shared);
        match self.shared.plan_read(offset, bufs.len()) {
            Ok(Some(plan)) => self.run(tag, bufs, epoch, &plan, Dir::Read),
            Ok(None) => {
                self.epochs.end(epoch);
                self.synchronous += 1;
                let r = self.sync.read(offset, &bufs.slices());
                self.done.push((tag, r));
            }
            Err(e) => {
                self.epochs.end(epoch);
                self.done.push((tag, Err(e)));
            }
        }
    }

    fn write(&mut self, tag: u16, offset: u64, bufs: GuestBuffers, durable: bool) {
        // Write-through, or no journal: the write must flush before it completes (see
        // `Qcow2Queue::mapping_request`), which the synchronous path does.
        if !durable && self.shared.journal.is_some() {
            let epoch = self.epochs.begin(&self.shared);
            let planned = self
                .shared
                .check_writable()
                .and_then(|()| self.shared.plan_overwrite(offset, bufs.len()));
            match planned {
                Ok(Some(plan)) => {
                    if let Err(e) = self.shared.mark_bitmaps(offset, bufs.len()) {
                        self.epochs.end(epoch);
                        return self.done.push((tag, Err(e)));
                    }
                    let dir = Dir::Write { durable: false };
                    return self.run(tag, bufs, epoch, &plan, dir);
                }
                Ok(None) => self.epochs.end(epoch),
                Err(e) => {
                    self.epochs.end(epoch);
                    return self.done.push((tag, Err(e)));
                }
            }
        }
        self.synchronous += 1;
        let r = self.sync.write(offset, &bufs.slices(), durable);
        self.done.push((tag, r));
    }

    /// Starts the extents of `plan` over `bufs` as transfers in direction `dir`.
    fn run(&mut self, tag: u16, bufs: GuestBuffers, epoch: u64, plan: &[Extent], dir: Dir) {
        self.planned += 1;
        let iov = bufs.iov().to_vec();
        let transfers = plan
            .iter()
            .filter(|e| !matches!(e.src, Source::Zero))
            .count();
        let r = self.reqs.insert(Req {
            tag,
            bufs,
            left: transfers,
            result: Ok(()),
            epoch,
        });
        for e in plan {
            let (file, offset) = match e.src {
                Source::Zero => {
                    zero_range(&iov, e.pos, e.len);
                    continue;
                }
                Source::Data(h) => (self.data.clone(), h),
                Source::Backing(at) => match &self.backing {
                    Some(b) => (b.clone(), at),
                    None => {
                        // Planned only with a raw backing file, which the engine has.
                        self.end_extent(r, Err(io::Error::from_raw_os_error(libc::EIO)));
                        continue;
                    }
                },
            };
            self.io.start(Transfer {
                file,
                offset,
                iov: sub_iov(&iov, e.pos, e.len),
                dir,
                owner: r,
            });
        }
        if transfers == 0 {
            self.finish(r);
        }
    }

    /// One extent of request `r` ended with `res`.
    fn end_extent(&mut self, r: usize, res: io::Result<()>) {
        let Some(req) = self.reqs.get_mut(r) else {
            return;
        };
        if req.result.is_ok() {
            req.result = res;
        }
        req.left = req.left.saturating_sub(1);
        if req.left == 0 {
            self.finish(r);
        }
    }

    fn finish(&mut self, r: usize) {
        if let Some(req) = self.reqs.remove(r) {
            self.epochs.end(req.epoch);
            drop(req.bufs);
            self.done.push((req.tag, req.result));
        }
    }
}

impl IoEngine for Qcow2Ring {
    fn submit(&mut self, tag: u16, op: EngineOp) {
        match op {
            EngineOp::Read { offset, bufs } => self.read(tag, offset, bufs),
            EngineOp::Write {
                offset,
                bufs,
                durable,
            } => self.write(tag, offset, bufs, durable),
            op => {
                let r = run_sync(&mut self.sync, op);
                self.done.push((tag, r));
            }
        }
        self.io.submit();
    }

    fn reap(&mut self, out: &mut Vec<(u16, io::Result<()>)>) {
        let mut ended = std::mem::take(&mut self.ended);
        self.io.reap(&mut ended);
        for (r, res) in ended.drain(..) {
            self.end_extent(r, res);
        }
        self.ended = ended;
        out.append(&mut self.done);
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.io.event_fd())
    }

    fn in_flight(&self) -> usize {
        self.reqs.len() + self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::Qcow2Ring;
    use crate::image::engine::testing::{buffers, get, memory, put, run};
    use crate::image::engine::{EngineOp, IoEngine};
    use crate::image::format::{ImageFormat, ImageOptions};
    use crate::image::qcow2::testing::{assert_qemu_img_check, pattern, qemu_img, qemu_img_create};
    use crate::image::qcow2::Qcow2Image;
    use crate::image::uring::Ring;

    const MIB: u64 = 1 << 20;

    /// Opens `path` with a mapping journal in `/dev/shm` (default), buffered or O_DIRECT.
    fn open(path: &Path, direct: bool) -> Qcow2Image {
        Qcow2Image::open(&ImageOptions {
            direct,
            ..ImageOptions::new(path.to_owned(), ImageFormat::Qcow2)
        })
        .unwrap()
    }

    /// The io_uring engine of a queue of `img` (as `BlockImage::engine` makes it).
    fn engine(img: &Qcow2Image) -> Qcow2Ring {
        let ring = Ring::new().unwrap();
        let (data, align) = match &img.direct {
            Some((f, align)) => (f.try_clone().unwrap(), Some(*align)),
            None => (img.shared.data_io().try_clone().unwrap(), None),
        };
        Qcow2Ring::new(img.shared.clone(), img.queue().unwrap(), data, align, ring).unwrap()
    }

    /// The whole guest disk, read through `qemu-img` (the oracle).
    fn oracle(path: &Path, dir: &Path) -> Vec<u8> {
        let raw = dir.join("oracle.raw");
        let _ = std::fs::remove_file(&raw);
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        std::fs::read(raw).unwrap()
    }

    /// Writes that allocate (synchronous path), then overwrites of the same clusters and
    /// reads over allocated and unallocated clusters all in flight at once (the ring), with
    /// guest buffers split in pieces, buffered and O_DIRECT (one buffer unaligned for it):
    /// every read returns what the oracle reads, and the image stays clean.
    #[test]
    fn overwrites_and_reads_run_in_the_ring() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img.qcow2");
            qemu_img_create(&path, "cluster_size=65536", "8M");
            let img = open(&path, direct);
            let mut e = engine(&img);
            assert!(e.event_fd().is_some());
            let mem = memory(4 << 20);
            // Allocate clusters 0, 2, 4, .. 14 (each write covers one cluster in two pieces).
            let mut ops = Vec::new();
            for i in 0..8u64 {
                let off = i * 2 * 65536;
                put(&mem, i * 65536, &pattern(off, 65536));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(i * 65536, 4096), (i * 65536 + 4096, 61440)]),
                    durable: false,
                });
            }
            assert!(run(&mut e, ops).iter().all(|r| r.is_ok()));
            // Overwrite parts of them in place, one through an unaligned buffer.
            let mut ops = Vec::new();
            for i in 0..8u64 {
                let off = i * 2 * 65536 + 8192;
                let at = MIB + i * 65536 + u64::from(i == 3);
                put(&mem, at, &pattern(off ^ 0xabc, 16384));
                ops.push(EngineOp::Write {
                    offset: off,
                    bufs: buffers(&mem, &[(at, 16384)]),
                    durable: false,
                });
            }
            // And reads spanning allocated and unallocated clusters.
            for i in 0..4u64 {
                ops.push(EngineOp::Read {
                    offset: i * 4 * 65536 + 32768,
                    bufs: buffers(
                        &mem,
                        &[
                            (2 * MIB + i * 262144, 4096),
                            (2 * MIB + i * 262144 + 4096, 126976),
                        ],
                    ),
                });
            }
            let results = run(&mut e, ops);
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            assert_eq!(
                (e.planned, e.synchronous),
                (12, 8),
                "overwrites and reads planned"
            );
            // Read everything back through the engine, a cluster at a time.
            let mut got = Vec::new();
            for i in 0..16u64 {
                let r = run(
                    &mut e,
                    vec![EngineOp::Read {
                        offset: i * 65536,
                        bufs: buffers(&mem, &[(3 * MIB, 65536)]),
                    }],
                );
                assert!(r[0].is_ok(), "{r:?}");
                got.extend(get(&mem, 3 * MIB, 65536));
            }
            let flush = run(&mut e, vec![EngineOp::Flush]);
            assert!(flush[0].is_ok());
            drop(e);
            img.close().unwrap();
            drop(img);
            assert_qemu_img_check(&path, false);
            let want = oracle(&path, dir.path());
            assert_eq!(got, want[..16 * 65536], "direct={direct}");
            // The concurrent reads saw the data of the first writes or of the overwrites:
            // check the parts the overwrites did not touch.
            for i in 0..8u64 {
                let off = (i * 2 * 65536) as usize;
                assert_eq!(&want[off..off + 8192], &pattern(off as u64, 8192)[..]);
                assert_eq!(
                    &want[off + 8192..off + 24576],
                    &pattern((off as u64 + 8192) ^ 0xabc, 16384)[..]
                );
            }
        }
    }

    fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
        let mut c = std::process::Command::new("qemu-io");
        c.args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c
            .arg(path)
            .output()
            .expect("qemu-io (qemu-utils) is needed");
        assert!(out.status.success(), "qemu-io {cmds:?}: {out:?}");
    }

    /// Reads the whole disk through the engine in 96 KiB requests at 32 KiB offsets (so they
    /// straddle clusters and subclusters), two guest pieces each, all in flight at once.
    fn read_all(e: &mut Qcow2Ring, size: u64) -> Vec<u8> {
        let mem = memory((size + (1 << 20)) as usize);
        let chunk = 96 * 1024;
        let mut ops = Vec::new();
        let mut off = 0;
        while off < size {
            let len = chunk.min(size - off);
            let first = (len / 2) & !511;
            ops.push(EngineOp::Read {
                offset: off,
                bufs: buffers(
                    &mem,
                    &[(off, first as usize), (off + first, (len - first) as usize)],
                ),
            });
            off += len;
        }
        let results = run(e, ops);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        get(&mem, 0, size as usize)
    }

    /// Every kind of mapping a plan covers (data, zero clusters and subclusters, unallocated
    /// over a raw backing file, past the backing file's end), with and without extended L2,
    /// reads through the ring as the oracle reads it; compressed clusters and a qcow2
    /// backing file go the synchronous way and read the same.
    #[test]
    fn every_mapping_reads_like_the_oracle() {
        for extended in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.raw");
            // 2.5 MiB of backing under a 4 MiB disk.
            std::fs::write(&base, pattern(0x77, 5 << 19)).unwrap();
            let img = dir.path().join("img.qcow2");
            let opts = format!(
                "cluster_size=65536,extended_l2={},backing_file={},backing_fmt=raw",
                if extended { "on" } else { "off" },
                base.display()
            );
            qemu_img_create(&img, &opts, "4M");
            qemu_io(
                &img,
                "qcow2",
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 70k 4k",
                    "write -z 128k 64k",
                    "write -z 200k 2k",
                    "write -P 0x33 2560k 100k",
                    "write -P 0x44 3m 8k",
                ],
            );
            let want = oracle(&img, dir.path());
            let q = open(&img, false);
            let mut e = engine(&q);
            let got = read_all(&mut e, 4 * MIB);
            assert!(
                got == want,
                "extended={extended}: reads differ from the oracle"
            );
            assert_eq!(e.synchronous, 0, "all planned");
            drop(e);
            drop(q);

            // Compressed clusters, and the overlay over a qcow2 base.
            let comp = dir.path().join("comp.qcow2");
            qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                img.to_str().unwrap(),
                comp.to_str().unwrap(),
            ]);
            let top = dir.path().join("top.qcow2");
            let opts = format!("backing_file={},backing_fmt=qcow2", comp.display());
            qemu_img_create(&top, &opts, "4M");
            qemu_io(&top, "qcow2", &["write -P 0x55 1m 64k"]);
            for (path, name) in [(&comp, "compressed"), (&top, "qcow2 backing")] {
                let q = open(path, false);
                let mut e = engine(&q);
                let got = read_all(&mut e, 4 * MIB);
                assert!(got == oracle(path, dir.path()), "{name}: reads differ");
                assert!(e.synchronous > 0, "{name}: synchronous path");
            }
        }
    }
}

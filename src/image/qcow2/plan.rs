//! Turning a guest request into an I/O plan: the extents of host I/O (and zero fills) that
//! carry it out, computed from the L2 tables without touching data. The io_uring engine
//! (`ring.rs`) executes plans; what a plan cannot express (a write to a compressed or shared
//! cluster, or with extended L2 or a data file) runs on the synchronous path instead. A
//! compressed cluster is an extent too: its stored bytes, inflated by the engine.
//!
//! Reads through a backing chain are planned through it: a guest range the image leaves
//! unallocated is planned in its backing image, down to the layer that has it, and names that
//! layer's data file. A copy-on-write is planned as the backing bytes around the request's.
//!
//! Planning takes no lock and writes nothing shared: it only loads entries. An L2 table not in
//! memory would be read first, the one blocking step; the engine loads missing tables of the
//! image in its ring before it plans (ring.rs), so that happens only to a table evicted in
//! between, or to a table of a backing image (read-only, loaded once and kept while the cache
//! has room).

use std::io as stdio;

use super::l2::{self, BadEntry, L2Entry, Mapping, SubclusterBitmap};
use super::{Backing, GuestOffset, Qcow2Shared};

/// What planning found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan<T> {
    /// The plan.
    Ready(T),
    /// An entry the request needs is reserved (a write in progress, maybe this queue's own):
    /// plan again once it is done.
    Busy,
    /// The request needs the synchronous path.
    Sync,
}

/// One cluster's part of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WriteExtent {
    /// Overwrite in place: request bytes `[pos, pos + len)` go to this host offset.
    Data { pos: u64, len: u64, host: u64 },
    /// The guest cluster (L1 index `i`, L2 index `j`, entry word `seen`) has no host cluster:
    /// give it one, write request bytes `[pos, pos + len)` at `in_off` in it, with what the
    /// cluster reads as around them (zeros, or with `from_backing` the backing file's bytes:
    /// a copy-on-write), then publish the entry.
    Allocate {
        pos: u64,
        len: u64,
        in_off: u64,
        i: usize,
        j: usize,
        seen: L2Entry,
        from_backing: bool,
    },
}

/// Where the bytes of one extent of a request come from or go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// This host offset of the file guest data lives in (the image or its data file).
    Data(u64),
    /// Offset `at` of the data file of backing layer `layer`: 0 is the image's backing file,
    /// 1 that file's backing file, and so on; a raw layer is its own data file.
    Backing { layer: usize, at: u64 },
    /// Zeros (reads only).
    Zero,
    /// Bytes `[in_off, in_off + len)` of the compressed cluster stored at `at` (at most
    /// `stored` bytes) in the image file of chain member `depth`: 0 is the image itself, `d`
    /// its `d`-th backing image. Read, then inflated on the worker.
    Compressed {
        depth: usize,
        at: u64,
        stored: u64,
        in_off: u64,
    },
}

/// Bytes `[pos, pos + len)` of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    /// Offset in the request.
    pub pos: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where they are.
    pub src: Source,
}

/// Appends `e` to `plan`, merging it with the last extent where they are contiguous on both
/// sides (so a request over consecutive host clusters becomes one I/O).
fn push(plan: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = plan.last_mut() {
        let joined = match (last.src, e.src) {
            (Source::Data(a), Source::Data(b)) => a + last.len == b,
            (Source::Backing { layer: l, at: a }, Source::Backing { layer: m, at: b }) => {
                l == m && a + last.len == b
            }
            (Source::Zero, Source::Zero) => true,
            _ => false,
        };
        if joined && last.pos + last.len == e.pos {
            last.len += e.len;
            return;
        }
    }
    plan.push(e);
}

/// The mapping of subcluster `sc` of a cluster mapped by `m` (data or unallocated) with
/// extended L2 bitmap `bitmap`.
pub(super) fn subcluster(
    m: Mapping,
    bitmap: SubclusterBitmap,
    sc: u64,
) -> Result<Mapping, BadEntry> {
    if bitmap.is_allocated(sc) {
        match m {
            Mapping::Data(h) => Ok(Mapping::Data(h)),
            _ => Err(BadEntry::SubclusterWithoutOffset),
        }
    } else if bitmap.is_zero(sc) {
        Ok(Mapping::Zero)
    } else {
        Ok(Mapping::Unallocated)
    }
}

impl<T> Plan<T> {
    /// The same verdict for a plan of another kind (`Ready` itself has nothing to carry over).
    fn unready<U>(self) -> Option<Plan<U>> {
        match self {
            Plan::Ready(_) => None,
            Plan::Busy => Some(Plan::Busy),
            Plan::Sync => Some(Plan::Sync),
        }
    }
}

impl Qcow2Shared {
    /// The plan of a read of guest bytes `[off, off + len)`, or `Sync` when part of it needs
    /// the synchronous path (an entry the plan does not understand: the synchronous path
    /// reports it).
    pub(super) fn plan_read(&self, off: u64, len: u64) -> stdio::Result<Plan<Vec<Extent>>> {
        let mut plan = Vec::new();
        Ok(match self.plan_range(&mut plan, off, len, 0, 0)? {
            Plan::Ready(()) => Plan::Ready(plan),
            p => p.unready().unwrap_or(Plan::Sync),
        })
    }

    /// Adds the extents of guest bytes `[off, off + len)` of this image, at request offset
    /// `pos`, to `plan`. `depth` is this image's place in the chain being planned: 0 for the
    /// image a request is for, `d` for its `d`-th backing image (whose data is layer `d - 1`).
    fn plan_range(
        &self,
        plan: &mut Vec<Extent>,
        off: u64,
        len: u64,
        pos: u64,
        depth: usize,
    ) -> stdio::Result<Plan<()>> {
        let cs = self.cluster_size();
        let mut done = 0;
        while done < len {
            let g = off + done;
            let (i, j, in_off) = self.locate(GuestOffset(g));
            let n = (cs - in_off).min(len - done);
            let Some(entry) = self.try_load_entry(&**self.table(i)?, j) else {
                return Ok(Plan::Busy);
            };
            let Ok(m) = self.decode(entry.word) else {
                return Ok(Plan::Sync);
            };
            let cluster_guest = g - in_off;
            if self.extended && matches!(m, Mapping::Data(_) | Mapping::Unallocated) {
                let scs = cs / l2::SUBCLUSTERS;
                let mut sub = 0;
                while sub < n {
                    let o = in_off + sub;
                    let sc = o / scs;
                    let k = (scs - o % scs).min(n - sub);
                    let Ok(sm) = subcluster(m, entry.bitmap, sc) else {
                        return Ok(Plan::Sync);
                    };
                    let at = pos + done + sub;
                    let p = self.plan_mapped(plan, cluster_guest + o, sm, k, at, depth)?;
                    if let Some(p) = p.unready() {
                        return Ok(p);
                    }
                    sub += k;
                }
            } else {
                let p = self.plan_mapped(plan, g, m, n, pos + done, depth)?;
                if let Some(p) = p.unready() {
                    return Ok(p);
                }
            }
            done += n;
        }
        Ok(Plan::Ready(()))
    }

    /// Adds the extents of guest bytes `[g, g + n)` (within one cluster), mapped by `m`, at
    /// request offset `pos`.
    fn plan_mapped(
        &self,
        plan: &mut Vec<Extent>,
        g: u64,
        m: Mapping,
        n: u64,
        pos: u64,
        depth: usize,
    ) -> stdio::Result<Plan<()>> {
        let in_off = g & (self.cluster_size() - 1);
        let src = match m {
            Mapping::Data(h) if depth == 0 => Source::Data(h + in_off),
            Mapping::Data(h) => Source::Backing {
                layer: depth - 1,
                at: h + in_off,
            },
            Mapping::Zero => Source::Zero,
            Mapping::Unallocated => return self.plan_backing(plan, g, n, pos, depth),
            // Not allowed there: the synchronous path reports it.
            Mapping::Compressed { .. } if self.data_file.is_some() => return Ok(Plan::Sync),
            Mapping::Compressed { offset, len } => Source::Compressed {
                depth,
                at: offset,
                stored: len,
                in_off,
            },
        };
        push(plan, Extent { pos, len: n, src });
        Ok(Plan::Ready(()))
    }

    /// Adds the extents of guest bytes `[g, g + n)` as this image's backing file has them (zeros
    /// without one, and past its end), at request offset `pos`.
    fn plan_backing(
        &self,
        plan: &mut Vec<Extent>,
        g: u64,
        n: u64,
        pos: u64,
        depth: usize,
    ) -> stdio::Result<Plan<()>> {
        let have = match &self.backing {
            Some(b) if g < b.size() => n.min(b.size() - g),
            _ => 0,
        };
        if have > 0 {
            match &self.backing {
                Some(Backing::Raw { .. }) => push(
                    plan,
                    Extent {
                        pos,
                        len: have,
                        src: Source::Backing {
                            layer: depth,
                            at: g,
                        },
                    },
                ),
                Some(Backing::Qcow2(s)) => {
                    if let Some(p) = s.plan_range(plan, g, have, pos, depth + 1)?.unready() {
                        return Ok(p);
                    }
                }
                None => {}
            }
        }
        if have < n {
            let zeros = Extent {
                pos: pos + have,
                len: n - have,
                src: Source::Zero,
            };
            push(plan, zeros);
        }
        Ok(Plan::Ready(()))
    }

    /// The plan of a copy-on-write's reads: the backing file's bytes of the whole guest
    /// cluster at `cluster_guest`, at their offsets in the cluster. The request's bytes are
    /// copied over them once they are in: one read of the cluster, where reading only around
    /// the request would take two. Zero extents are left out: the cluster buffer starts as
    /// zeros.
    pub(super) fn plan_copy(&self, cluster_guest: u64) -> stdio::Result<Plan<Vec<Extent>>> {
        let mut plan = Vec::new();
        let p = self.plan_backing(&mut plan, cluster_guest, self.cluster_size(), 0, 0)?;
        if let Some(p) = p.unready() {
            return Ok(p);
        }
        plan.retain(|e| e.src != Source::Zero);
        Ok(Plan::Ready(plan))
    }

    /// The plan of a write of guest bytes `[off, off + len)`: in-place overwrites of clusters
    /// the image owns exclusively, and allocations of clusters with no host cluster (zeros
    /// around the request's bytes, or a copy-on-write from the backing file), without extended
    /// L2 or a data file. Anything else (a shared or compressed cluster to copy, subclusters)
    /// is for the synchronous path. A target that is metadata trips overlap protection (an
    /// error).
    pub(super) fn plan_write(&self, off: u64, len: u64) -> stdio::Result<Plan<Vec<WriteExtent>>> {
        let cs = self.cluster_size();
        let mut plan = Vec::new();
        let mut done = 0;
        while done < len {
            let g = off + done;
            let (i, j, in_off) = self.locate(GuestOffset(g));
            let n = (cs - in_off).min(len - done);
            let Some(entry) = self.try_load_entry(&**self.table(i)?, j) else {
                return Ok(Plan::Busy);
            };
            if self.in_place(entry, self.touched(in_off, n)) {
                let h = entry.word.host_offset();
                if let Err(err) = self.check_overlap(h) {
                    self.persist_corrupt();
                    return Err(err);
                }
                match plan.last_mut() {
                    Some(WriteExtent::Data { pos, len, host })
                        if *pos + *len == done && *host + *len == h + in_off =>
                    {
                        *len += n;
                    }
                    _ => plan.push(WriteExtent::Data {
                        pos: done,
                        len: n,
                        host: h + in_off,
                    }),
                }
            } else if !self.extended
                && self.data_file.is_none()
                && !self.has_host(entry.word)
                && !entry.word.is_compressed()
            {
                // Nothing under a zero cluster, and nothing left of the cluster to copy when
                // the request covers it.
                let from_backing = !self.reads_as_zeros(entry) && n < cs;
                plan.push(WriteExtent::Allocate {
                    pos: done,
                    len: n,
                    in_off,
                    i,
                    j,
                    seen: entry.word,
                    from_backing,
                });
            } else {
                return Ok(Plan::Sync);
            }
            done += n;
        }
        Ok(Plan::Ready(plan))
    }
}

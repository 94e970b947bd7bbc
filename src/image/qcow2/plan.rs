//! Turning a guest request into an I/O plan: the extents of host I/O (and zero fills) that
//! carry it out, computed from the L2 tables without touching data. The io_uring engine
//! (`ring.rs`) executes plans; what a plan cannot express (a compressed cluster, a qcow2
//! backing file, a write that changes a mapping) runs on the synchronous path instead.
//!
//! Planning takes no lock and writes nothing shared: it only loads entries. An L2 table not in
//! memory would be read first, the one blocking step; the engine loads missing tables in its
//! ring before it plans (ring.rs), so that happens only to a table evicted in between.

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
    /// The guest cluster (L1 index `i`, L2 index `j`, entry word `seen`) reads as zeros and
    /// has no host cluster: give it one, write request bytes `[pos, pos + len)` at `in_off` in it
    /// (zeros around them), then publish the entry.
    Allocate {
        pos: u64,
        len: u64,
        in_off: u64,
        i: usize,
        j: usize,
        seen: L2Entry,
    },
}

/// Where the bytes of one extent of a request come from or go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// This host offset of the file guest data lives in (the image or its data file).
    Data(u64),
    /// This offset of the raw backing file.
    Backing(u64),
    /// Zeros (reads only).
    Zero,
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
            (Source::Backing(a), Source::Backing(b)) => a + last.len == b,
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

impl Qcow2Shared {
    /// The plan of a read of guest bytes `[off, off + len)`, or `None` when part of it needs
    /// the synchronous path (a compressed cluster, a qcow2 backing file, an entry the plan
    /// does not understand: the synchronous path reports it).
    pub(super) fn plan_read(&self, off: u64, len: u64) -> stdio::Result<Plan<Vec<Extent>>> {
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
                    if !self.plan_mapped(&mut plan, cluster_guest, sm, o, k, done + sub) {
                        return Ok(Plan::Sync);
                    }
                    sub += k;
                }
            } else if !self.plan_mapped(&mut plan, cluster_guest, m, in_off, n, done) {
                return Ok(Plan::Sync);
            }
            done += n;
        }
        Ok(Plan::Ready(plan))
    }

    /// Adds the extents of bytes `[in_off, in_off + n)` of the guest cluster at
    /// `cluster_guest`, mapped by `m`, at request offset `pos`. False if they need the
    /// synchronous path.
    fn plan_mapped(
        &self,
        plan: &mut Vec<Extent>,
        cluster_guest: u64,
        m: Mapping,
        in_off: u64,
        n: u64,
        pos: u64,
    ) -> bool {
        match m {
            Mapping::Data(h) => push(
                plan,
                Extent {
                    pos,
                    len: n,
                    src: Source::Data(h + in_off),
                },
            ),
            Mapping::Zero => push(
                plan,
                Extent {
                    pos,
                    len: n,
                    src: Source::Zero,
                },
            ),
            Mapping::Unallocated => match &self.backing {
                None => push(
                    plan,
                    Extent {
                        pos,
                        len: n,
                        src: Source::Zero,
                    },
                ),
                Some(Backing::Raw { size, .. }) => {
                    let at = cluster_guest + in_off;
                    let have = if at >= *size { 0 } else { n.min(size - at) };
                    if have > 0 {
                        push(
                            plan,
                            Extent {
                                pos,
                                len: have,
                                src: Source::Backing(at),
                            },
                        );
                    }
                    if have < n {
                        push(
                            plan,
                            Extent {
                                pos: pos + have,
                                len: n - have,
                                src: Source::Zero,
                            },
                        );
                    }
                }
                Some(Backing::Qcow2(_)) => return false,
            },
            Mapping::Compressed { .. } => return false,
        }
        true
    }

    /// The plan of a write of guest bytes `[off, off + len)`: in-place overwrites of clusters
    /// the image owns exclusively, and allocations of clusters that read as zeros and have
    /// no host cluster (without extended L2 or a data file). Anything else (copy-on-write,
    /// subclusters, a backing file to copy from) is for the synchronous path. A target that
    /// is metadata trips overlap protection (an error).
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
                && self.reads_as_zeros(entry)
            {
                plan.push(WriteExtent::Allocate {
                    pos: done,
                    len: n,
                    in_off,
                    i,
                    j,
                    seen: entry.word,
                });
            } else {
                return Ok(Plan::Sync);
            }
            done += n;
        }
        Ok(Plan::Ready(plan))
    }
}

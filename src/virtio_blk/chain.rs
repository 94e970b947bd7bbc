//! Reading a descriptor chain without assuming its layout.
//!
//! A virtio-blk request is a stream of device-readable bytes (16-byte header, then data for
//! writes) followed by a stream of device-writable bytes (data for reads, then one status byte).
//! The driver may split or merge these across descriptors any way it likes, so this module
//! flattens the chain into two segment lists and offers byte-range access into each.
//! Every guest address is checked against the guest memory map; nothing here panics on guest
//! input.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::image::{unlogged, GuestMem, GuestSlice};

/// Marks every device-writable byte of a chain (`segs`) dirty in the frontend's migration log,
/// if it installed one. Called when a request completes while logging is on: its data and
/// status byte may have been written by any route, including ones that bypass vm-memory. The
/// whole writable part is marked, which may include bytes left unwritten (a short read):
/// marking a page that did not change only costs the frontend one more page to send.
pub fn mark_written(mem: &GuestMem, segs: &[Segment]) {
    for seg in segs {
        // A segment (or its rest) outside guest memory was never written: its request failed.
        for s in
            GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize).map_while(Result::ok)
        {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

/// One descriptor's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain cannot be read as a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// A range is outside the segments (the chain is too short for the request).
    OutOfSegments,
    /// A buffer is not in guest memory.
    BadGuestAddress,
}

/// A chain flattened into its readable and writable byte streams. Reused between requests
/// to avoid allocating on the I/O path.
#[derive(Debug, Default)]
pub struct ChainLayout {
    /// Device-readable segments, in order.
    pub readable: Vec<Segment>,
    /// Device-writable segments, in order.
    pub writable: Vec<Segment>,
    /// Total device-readable bytes.
    pub readable_len: u64,
    /// Total device-writable bytes.
    pub writable_len: u64,
    /// Set when the chain breaks the readable-then-writable rule.
    pub error: Option<ChainError>,
}

impl ChainLayout {
    /// Replaces the contents with the descriptors of `chain`.
    pub fn load<M>(&mut self, chain: DescriptorChain<M>)
    where
        M: Deref<Target = GuestMem>,
    {
        self.load_descriptors(chain);
    }

    /// Replaces the contents with the chain starting at descriptor `head` of the table at
    /// `desc_table` (of `queue_size` entries), for requests that are not taken from the avail
    /// ring: those resubmitted after a backend restart.
    pub fn load_head(
        &mut self,
        mem: &GuestMem,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) {
        self.load_descriptors(HeadChain::new(mem, desc_table, queue_size, head));
    }

    fn load_descriptors(&mut self, descriptors: impl Iterator<Item = Descriptor>) {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.error = None;
        for desc in descriptors {
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                self.writable.push(seg);
                self.writable_len += u64::from(seg.len);
            } else if !self.writable.is_empty() {
                self.error = Some(ChainError::ReadableAfterWritable);
            } else {
                self.readable.push(seg);
                self.readable_len += u64::from(seg.len);
            }
        }
    }
}

/// The descriptors of the chain starting at a given head, walked with the same limits as a
/// chain popped from the avail ring: at most a table's worth of descriptors (so a loop ends),
/// one level of indirection, a table entry count that fits, and fewer than 2^32 bytes in all
/// (virtio 1.2, 2.7.5). A descriptor that breaks a rule, or cannot be read, ends the chain
/// there; the request then lacks its status byte or data and fails its checks.
struct HeadChain<'m> {
    mem: &'m GuestMem,
    table: GuestAddress,
    entries: u16,
    next: u16,
    /// Descriptors still allowed.
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'m> HeadChain<'m> {
    fn new(mem: &'m GuestMem, table: GuestAddress, entries: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table,
            entries,
            next: head,
            ttl: entries,
            indirect: false,
            bytes: 0,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let addr = self.table.0.checked_add(u64::from(index) * DESC_SIZE)?;
        self.mem.read_obj::<Descriptor>(GuestAddress(addr)).ok()
    }
}

/// Size of a split-ring descriptor.
const DESC_SIZE: u64 = 16;

impl Iterator for HeadChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.entries {
            return None;
        }
        let mut desc = self.read(self.next)?;
        if desc.refers_to_indirect_table() {
            // Only from the descriptor table, to a table of whole descriptors.
            if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
                return None;
            }
            let entries = u16::try_from(u64::from(desc.len()) / DESC_SIZE).ok()?;
            self.table = desc.addr();
            self.entries = entries;
            self.ttl = entries;
            self.next = 0;
            self.indirect = true;
            if entries == 0 {
                return None;
            }
            desc = self.read(0)?;
            if desc.refers_to_indirect_table() {
                return None;
            }
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

/// Calls `f(addr, len)` for each piece of `segs` covering the byte range `[start, start + len)`
/// of the segment stream. Returns the number of segments touched.
fn for_each_piece(
    segs: &[Segment],
    start: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, u64) -> Result<(), ChainError>,
) -> Result<usize, ChainError> {
    if len == 0 {
        return Ok(0);
    }
    let end = start.checked_add(len).ok_or(ChainError::OutOfSegments)?;
    let mut pos = 0u64;
    let mut touched = 0;
    for seg in segs {
        let seg_end = pos + u64::from(seg.len);
        if seg_end > start && pos < end {
            let from = start.max(pos);
            let to = end.min(seg_end);
            let addr = seg
                .addr
                .0
                .checked_add(from - pos)
                .ok_or(ChainError::BadGuestAddress)?;
            f(GuestAddress(addr), to - from)?;
            touched += 1;
        }
        pos = seg_end;
        if pos >= end {
            return Ok(touched);
        }
    }
    Err(ChainError::OutOfSegments)
}

/// Guest address of byte `pos` of the segment stream.
pub fn byte_addr(segs: &[Segment], pos: u64) -> Option<GuestAddress> {
    let mut addr = None;
    for_each_piece(segs, pos, 1, |a, _| {
        addr = Some(a);
        Ok(())
    })
    .ok()?;
    addr
}

/// Copies `out.len()` bytes from offset `start` of the segment stream into `out`.
pub fn gather(
    mem: &GuestMem,
    segs: &[Segment],
    start: u64,
    out: &mut [u8],
) -> Result<(), ChainError> {
    let mut pos = 0usize;
    for_each_piece(segs, start, out.len() as u64, |addr, n| {
        let n = n as usize;
        mem.read_slice(&mut out[pos..pos + n], addr)
            .map_err(|_| ChainError::BadGuestAddress)?;
        pos += n;
        Ok(())
    })?;
    Ok(())
}

/// Copies `data` into the segment stream at offset `start`.
pub fn scatter(
    mem: &GuestMem,
    segs: &[Segment],
    start: u64,
    data: &[u8],
) -> Result<(), ChainError> {
    let mut pos = 0usize;
    for_each_piece(segs, start, data.len() as u64, |addr, n| {
        let n = n as usize;
        mem.write_slice(&data[pos..pos + n], addr)
            .map_err(|_| ChainError::BadGuestAddress)?;
        pos += n;
        Ok(())
    })?;
    Ok(())
}

/// Appends to `out` the guest memory slices covering `[start, start + len)` of the segment
/// stream, split where guest memory regions end. Returns the number of descriptors touched.
pub fn slices<'m>(
    mem: &'m GuestMem,
    segs: &[Segment],
    start: u64,
    len: u64,
    out: &mut Vec<GuestSlice<'m>>,
) -> Result<usize, ChainError> {
    for_each_piece(segs, start, len, |addr, n| {
        let n = usize::try_from(n).map_err(|_| ChainError::BadGuestAddress)?;
        for s in GuestMemoryBackend::get_slices(mem, addr, n) {
            out.push(unlogged(&s.map_err(|_| ChainError::BadGuestAddress)?));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap()
    }

    #[test]
    fn gather_spans_segments() {
        let m = mem();
        m.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        m.write_slice(&[4, 5], GuestAddress(0x200)).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 2,
            },
        ];
        let mut out = [0u8; 4];
        gather(&m, &segs, 1, &mut out).unwrap();
        assert_eq!(out, [2, 3, 4, 5]);
        let mut too_long = [0u8; 5];
        assert_eq!(
            gather(&m, &segs, 1, &mut too_long),
            Err(ChainError::OutOfSegments)
        );
    }

    #[test]
    fn slices_split_at_region_boundary() {
        let m = mem();
        let segs = [Segment {
            addr: GuestAddress(0xff00),
            len: 0x200,
        }];
        let mut out = Vec::new();
        assert_eq!(slices(&m, &segs, 0, 0x200, &mut out), Ok(1));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len() + out[1].len(), 0x200);
    }

    #[test]
    fn slices_outside_memory_fail() {
        let m = mem();
        let segs = [Segment {
            addr: GuestAddress(0x1f000),
            len: 0x2000,
        }];
        let mut out = Vec::new();
        assert_eq!(
            slices(&m, &segs, 0, 0x2000, &mut out),
            Err(ChainError::BadGuestAddress)
        );
        let wrap = [Segment {
            addr: GuestAddress(u64::MAX - 1),
            len: 16,
        }];
        assert!(slices(&m, &wrap, 4, 8, &mut out).is_err());
        let mut b = [0u8; 8];
        assert!(gather(&m, &wrap, 4, &mut b).is_err());
    }
}

#[cfg(test)]
mod head_chain_tests {
    use super::*;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const TABLE: u64 = 0x1000;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        m.write_obj(d, GuestAddress(table + DESC_SIZE * u64::from(i)))
            .unwrap();
    }

    fn load(m: &GuestMem, size: u16, head: u16) -> ChainLayout {
        let mut l = ChainLayout::default();
        l.load_head(m, GuestAddress(TABLE), size, head);
        l
    }

    #[test]
    fn direct_chain_from_any_head() {
        let m = mem();
        put(&m, TABLE, 5, 0x4000, 16, NEXT, 2);
        put(&m, TABLE, 2, 0x5000, 512, NEXT | WRITE, 7);
        put(&m, TABLE, 7, 0x6000, 1, WRITE, 0);
        let l = load(&m, 8, 5);
        assert_eq!(l.readable_len, 16);
        assert_eq!(l.writable_len, 513);
        assert_eq!(l.writable.len(), 2);
        assert_eq!(l.error, None);
    }

    #[test]
    fn loops_and_bad_heads_end_the_chain() {
        let m = mem();
        put(&m, TABLE, 0, 0x4000, 16, NEXT, 1);
        put(&m, TABLE, 1, 0x5000, 16, NEXT, 0);
        // At most a table's worth of descriptors.
        assert_eq!(load(&m, 4, 0).readable.len(), 4);
        assert_eq!(load(&m, 4, 4).readable_len, 0);
        // A next index outside the table ends the chain.
        put(&m, TABLE, 2, 0x4000, 16, NEXT, 9);
        assert_eq!(load(&m, 4, 2).readable.len(), 1);
    }

    #[test]
    fn one_level_of_indirection() {
        let m = mem();
        let ind = 0x2000;
        put(&m, TABLE, 3, ind, 3 * 16, INDIRECT, 0);
        put(&m, ind, 0, 0x4000, 16, NEXT, 1);
        put(&m, ind, 1, 0x5000, 4096, NEXT | WRITE, 2);
        put(&m, ind, 2, 0x6000, 1, WRITE, 0);
        let l = load(&m, 8, 3);
        assert_eq!((l.readable_len, l.writable_len), (16, 4097));
        // Nested indirection and a table that is not whole descriptors are refused.
        put(&m, ind, 0, 0x3000, 16, INDIRECT, 0);
        assert_eq!(
            load(&m, 8, 3).readable.len() + load(&m, 8, 3).writable.len(),
            0
        );
        put(&m, TABLE, 4, ind, 40, INDIRECT, 0);
        assert_eq!(load(&m, 8, 4).readable_len, 0);
    }

    #[test]
    fn chains_of_4_gib_or_more_end() {
        let m = mem();
        put(&m, TABLE, 0, 0x4000, u32::MAX, NEXT, 1);
        put(&m, TABLE, 1, 0x5000, 2, WRITE, 0);
        let l = load(&m, 4, 0);
        assert_eq!((l.readable.len(), l.writable.len()), (1, 0));
    }
}

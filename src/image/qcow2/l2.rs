//! L1/L2 entries and in-memory L2 tables.
//!
//! An L2 table lives in memory as atomics once touched, so queues read and update entries
//! without a lock. Allocation of a guest cluster is serialised per entry by compare-and-swap
//! from the observed value to [`RESERVED`]; see `super` for the protocol.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// L1/L2 flag: the cluster's refcount is exactly one (may be written in place).
pub const COPIED: u64 = 1 << 63;
/// L2 flag: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 standard descriptor flag: the cluster reads as zeros (v3, not with extended L2).
pub const ZERO: u64 = 1;
/// Mask of the host offset bits 9..=55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Sentinel stored in an L2 entry while one queue allocates the cluster. No valid entry has
/// this value (compressed together with COPIED is invalid), and loading one is refused.
pub const RESERVED: u64 = u64::MAX;
/// Extended L2 bitmap: all 32 subclusters allocated.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Extended L2 bitmap: all 32 subclusters read as zeros.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// Number of subclusters of a cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// How a piece of a guest cluster is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored uncompressed at this host offset (of the cluster start).
    Data(u64),
    /// Stored compressed: host byte offset and compressed length in bytes.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Bytes of compressed data (upper bound, sector granular).
        len: u64,
    },
}

/// Why an L1 or L2 entry read from an image is refused (the message follows "L1 entry N: "
/// or "L2 table at X, entry N: ").
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadEntry {
    /// An L1 entry with bits set outside the offset and COPIED.
    #[error("{0:#x} has reserved bits set")]
    L1ReservedBits(u64),
    /// An L1 entry whose L2 table offset is not cluster aligned.
    #[error("L2 table offset {0:#x} is not cluster aligned")]
    L2TableUnaligned(u64),
    /// An L1 entry whose L2 table lies past the end of the file.
    #[error("L2 table offset {0:#x} is past the end of the file")]
    L2TablePastEnd(u64),
    /// An L2 entry holding [`RESERVED`].
    #[error("entry holds the allocation sentinel")]
    Sentinel,
    /// A compressed L2 entry with COPIED set.
    #[error("compressed entry {0:#x} has the COPIED flag")]
    CompressedCopied(u64),
    /// A standard L2 entry with reserved bits set.
    #[error("entry {0:#x} has reserved bits set")]
    ReservedBits(u64),
    /// A standard L2 entry with COPIED but no host offset.
    #[error("entry {0:#x}: COPIED without a host offset")]
    CopiedWithoutOffset(u64),
    /// A standard L2 entry whose host offset is not cluster aligned.
    #[error("host offset {0:#x} is not cluster aligned")]
    HostUnaligned(u64),
    /// Extended L2: a compressed cluster with a nonzero subcluster bitmap.
    #[error("compressed cluster with a subcluster bitmap")]
    CompressedWithBitmap,
    /// Extended L2: a subcluster marked both allocated and zero.
    #[error("subcluster both allocated and zero")]
    AllocatedAndZero,
    /// Extended L2: allocated subclusters in an entry without a host offset.
    #[error("allocated subclusters without a host offset")]
    AllocatedWithoutOffset,
    /// Extended L2: the subcluster read is allocated but the entry has no host offset.
    #[error("allocated subcluster without host offset")]
    SubclusterWithoutOffset,
    /// A compressed cluster in an image whose data lives in an external data file.
    #[error("compressed cluster in an image with an external data file")]
    CompressedInDataFile,
    /// The entry references a host cluster (byte offset) past the end of the file.
    #[error("references host cluster {0:#x} past the end of the file")]
    PastEnd(u64),
    /// The entry references a host cluster (byte offset) that holds metadata.
    #[error("references host cluster {0:#x}, which holds metadata")]
    Metadata(u64),
    /// The entry references a host cluster (byte offset) whose refcount is 0.
    #[error("references host cluster {0:#x}, whose refcount is 0")]
    Unreferenced(u64),
}

/// `word` (an L1 or L2 entry) with COPIED set or cleared.
#[inline]
const fn set_copied(word: u64, copied: bool) -> u64 {
    if copied {
        word | COPIED
    } else {
        word & !COPIED
    }
}

/// An L1 table entry (qcow2.txt, "L1 table entry"): the offset of an L2 table in bits 9-55
/// (0: none yet), and COPIED in bit 63 when that table's refcount is exactly one (it may be
/// rewritten in place).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An L1 entry pointing at the L2 table at byte offset `table`, owned exclusively.
    #[inline]
    pub const fn owned(table: u64) -> L1Entry {
        L1Entry(table | COPIED)
    }

    /// Byte offset of the L2 table in the image file, 0 for none.
    #[inline]
    pub const fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Bit 63 (COPIED): the L2 table's refcount is exactly one.
    #[inline]
    pub const fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The entry with COPIED set or cleared.
    #[inline]
    pub const fn with_copied(self, copied: bool) -> L1Entry {
        L1Entry(set_copied(self.0, copied))
    }

    /// Checks an entry read from the image: no reserved bits, and a table offset that is
    /// cluster aligned (`cs` bytes) and inside a file of `file_len` bytes.
    pub fn check(self, cs: u64, file_len: u64) -> Result<(), BadEntry> {
        if self.0 & !(OFFSET_MASK | COPIED) != 0 {
            return Err(BadEntry::L1ReservedBits(self.0));
        }
        let off = self.l2_offset();
        if !off.is_multiple_of(cs) {
            return Err(BadEntry::L2TableUnaligned(off));
        }
        if off != 0 && off + cs > file_len.next_multiple_of(cs) {
            return Err(BadEntry::L2TablePastEnd(off));
        }
        Ok(())
    }
}

/// The first word of an L2 entry as qcow2.txt defines it: a standard cluster descriptor
/// (host offset in bits 9-55, the all-zeros flag in bit 0 without extended L2) or, with bit
/// 62, a compressed cluster descriptor; bit 63 (COPIED) says the refcount is exactly one.
/// In memory it may also hold the allocation sentinel [`L2Entry::RESERVED`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Unallocated, no flags: reads from the backing file, or as zeros.
    pub const UNALLOCATED: L2Entry = L2Entry(0);
    /// Standard descriptor with only the all-zeros flag (no host cluster).
    pub const ZERO: L2Entry = L2Entry(ZERO);

    /// A standard entry mapping the host cluster at byte offset `host`, owned exclusively
    /// (COPIED): what a write publishes after allocating or rewriting a cluster.
    #[inline]
    pub const fn owned(host: u64) -> L2Entry {
        L2Entry(host | COPIED)
    }

    /// True for the allocation sentinel.
    #[inline]
    pub const fn is_reserved(self) -> bool {
        self.0 == RESERVED
    }

    /// Bit 62: a compressed cluster descriptor.
    #[inline]
    pub const fn is_compressed(self) -> bool {
        self.0 & COMPRESSED != 0
    }

    /// Bit 63 (COPIED): the cluster's refcount is exactly one, it may be written in place.
    #[inline]
    pub const fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// Bit 0 of a standard descriptor: the cluster reads as zeros (v3, not with extended
    /// L2, where the bitmap says it per subcluster).
    #[inline]
    pub const fn zero_flag(self) -> bool {
        self.0 & ZERO != 0
    }

    /// Bits 9-55 of a standard descriptor: the host cluster's byte offset, 0 for none (with
    /// an external data file, 0 with COPIED is a real offset). Meaningless when compressed.
    #[inline]
    pub const fn host_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// The entry with COPIED set or cleared.
    #[inline]
    pub const fn with_copied(self, copied: bool) -> L2Entry {
        L2Entry(set_copied(self.0, copied))
    }

    /// Decodes the entry (standard descriptor or compressed). For extended L2 entries the
    /// caller consults the subcluster bitmap for standard clusters.
    pub fn decode(self, cluster_bits: u32, extended: bool) -> Result<Mapping, BadEntry> {
        let entry = self.0;
        if self.is_reserved() {
            return Err(BadEntry::Sentinel);
        }
        if self.is_compressed() {
            if self.is_copied() {
                return Err(BadEntry::CompressedCopied(entry));
            }
            let x = 62 - (cluster_bits - 8);
            let offset = entry & ((1u64 << x) - 1);
            let sectors = (entry & ((1u64 << 62) - 1)) >> x;
            let end_sector = (offset & !511) + (sectors + 1) * 512;
            return Ok(Mapping::Compressed {
                offset,
                len: end_sector - offset,
            });
        }
        let reserved_bits = if extended {
            0x3f00_0000_0000_01ff
        } else {
            0x3f00_0000_0000_01fe
        };
        if entry & reserved_bits != 0 {
            return Err(BadEntry::ReservedBits(entry));
        }
        let host = self.host_offset();
        if !extended && self.zero_flag() {
            return Ok(Mapping::Zero);
        }
        if host == 0 {
            if self.is_copied() {
                return Err(BadEntry::CopiedWithoutOffset(entry));
            }
            return Ok(Mapping::Unallocated);
        }
        if host & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(BadEntry::HostUnaligned(host));
        }
        Ok(Mapping::Data(host))
    }

    /// Host clusters (indices) whose refcount the entry holds: its data cluster (also for a
    /// zero cluster that keeps one), the clusters a compressed cluster's bytes span, or none
    /// (unallocated, or a compressed entry that does not decode).
    pub fn host_clusters(self, cluster_bits: u32, extended: bool) -> RangeInclusive<u64> {
        let none = RangeInclusive::new(1, 0);
        if self.is_compressed() {
            match self.decode(cluster_bits, extended) {
                Ok(Mapping::Compressed { offset, len }) => {
                    compressed_clusters(offset, len, cluster_bits)
                }
                _ => none,
            }
        } else if self.host_offset() != 0 {
            let c = self.host_offset() >> cluster_bits;
            c..=c
        } else {
            none
        }
    }
}

/// The second word of an extended L2 entry (qcow2.txt, "Extended L2 Entries"): bit `k` says
/// subcluster `k` (0..32) is allocated, bit `32 + k` that it reads as zeros. Always 0
/// without extended L2 entries. Masks taken and returned by the methods name subclusters
/// by their allocation bit (bit `k` for subcluster `k`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// No subcluster allocated or zero (also the word without extended L2).
    pub const EMPTY: SubclusterBitmap = SubclusterBitmap(0);
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(ALL_ALLOC);
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap(ALL_ZERO);

    /// The allocated subclusters.
    #[inline]
    pub const fn allocated(self) -> u64 {
        self.0 & ALL_ALLOC
    }

    /// The subclusters that read as zeros.
    #[inline]
    pub const fn zeroed(self) -> u64 {
        self.0 >> 32
    }

    /// True if every subcluster reads as zeros.
    #[inline]
    pub const fn is_all_zero(self) -> bool {
        self.0 & ALL_ZERO == ALL_ZERO
    }

    /// True if subcluster `sc` is allocated.
    #[inline]
    pub const fn is_allocated(self, sc: u64) -> bool {
        self.0 & (1 << sc) != 0
    }

    /// True if subcluster `sc` reads as zeros.
    #[inline]
    pub const fn is_zero(self, sc: u64) -> bool {
        self.0 & (1 << (sc + 32)) != 0
    }

    /// The bitmap with subclusters `mask` allocated (their zero bits cleared).
    #[inline]
    pub const fn with_allocated(self, mask: u64) -> SubclusterBitmap {
        SubclusterBitmap((self.0 | mask) & !(mask << 32))
    }

    /// The bitmap with subclusters `mask` reading as zeros (their allocation bits cleared).
    #[inline]
    pub const fn with_zeroed(self, mask: u64) -> SubclusterBitmap {
        SubclusterBitmap((self.0 & !mask) | (mask << 32))
    }
}

/// An L2 entry as read from a table: its first word and, with extended L2 entries, its
/// subcluster bitmap ([`SubclusterBitmap::EMPTY`] without). Kept together because every
/// decision about a guest cluster (how it reads, whether a write may go in place, whether
/// it changed) needs both words, and a pair of loose values invites swapping or dropping
/// the bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The entry's first word: host offset, flags, or the allocation sentinel.
    pub word: L2Entry,
    /// The subcluster bitmap (extended L2 only; [`SubclusterBitmap::EMPTY`] otherwise).
    pub bitmap: SubclusterBitmap,
}

impl Entry {
    /// The entry with first word `word` and subcluster bitmap `bitmap`.
    #[inline]
    pub const fn new(word: L2Entry, bitmap: SubclusterBitmap) -> Entry {
        Entry { word, bitmap }
    }

    /// The entry with first word `word` and an empty bitmap (as without extended L2).
    #[inline]
    pub const fn plain(word: L2Entry) -> Entry {
        Entry::new(word, SubclusterBitmap::EMPTY)
    }
}

/// Host clusters (indices) holding the data of a compressed cluster.
pub fn compressed_clusters(offset: u64, len: u64, cluster_bits: u32) -> RangeInclusive<u64> {
    let first = offset >> cluster_bits;
    let last = (offset + len.max(1) - 1) >> cluster_bits;
    first..=last
}

/// The entries of an L2 table as stored in the file (`table` is the whole cluster), in order:
/// each entry's first word and, with extended L2 entries, its subcluster bitmap (else empty).
pub fn table_entries(table: &[u8], extended: bool) -> impl Iterator<Item = Entry> + '_ {
    let width = if extended { 16 } else { 8 };
    table.chunks_exact(width).map(move |raw| {
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_be_bytes(bytes)
        };
        Entry::new(
            L2Entry(word(0)),
            SubclusterBitmap(if extended { word(1) } else { 0 }),
        )
    })
}

/// Smallest write-back piece of an L2 table: one page, so a partial table write never makes
/// the host read-modify-write a page.
const MIN_PIECE: usize = 4096;

/// Table state: evicted from the cache (never modified again).
const EVICTED: u64 = 1 << 63;
/// Table state: changed since it was last written to the image.
const DIRTY: u64 = 1 << 62;
/// Table state: a flush has snapshotted the table and is writing it.
const WRITING: u64 = 1 << 61;
/// Table state: being read from the image by the thread that put it in its cache slot;
/// others wait for it.
const LOADING: u64 = 1 << 60;
/// Table state: number of threads pinned to modify entries.
const PINS: u64 = LOADING - 1;

/// An L2 table in memory.
///
/// Modifying entries requires a pin ([`L2Table::pin`]), which fails once the table has been
/// evicted from the cache: a thread holding a stale table then reloads it. Eviction
/// ([`L2Table::try_evict`]) succeeds only for a table that is unpinned, not dirty and not being
/// written by a flush, i.e. whose contents equal the image's. All of that is one atomic word,
/// so the checks and the transition are a single compare-and-swap.
pub struct L2Table {
    /// Entries; with extended L2 two words per guest cluster (entry, subcluster bitmap).
    pub entries: Box<[AtomicU64]>,
    state: AtomicU64,
    /// Which pieces ([`L2Table::piece_bytes`]) of the table changed since it was last
    /// written: a flush that writes the table in place writes only those.
    dirty_pieces: AtomicU64,
    /// Used since the cache's clock hand last passed (second chance).
    referenced: AtomicBool,
}

impl L2Table {
    /// A table of `words` zero entries.
    #[cfg(test)]
    pub fn zeroed(words: usize) -> L2Table {
        L2Table {
            entries: (0..words).map(|_| AtomicU64::new(0)).collect(),
            state: AtomicU64::new(0),
            dirty_pieces: AtomicU64::new(0),
            referenced: AtomicBool::new(true),
        }
    }

    /// A table that stands for "not loaded": evicted from the start, so it can never be
    /// pinned or modified.
    pub fn placeholder() -> L2Table {
        L2Table {
            entries: Box::new([]),
            state: AtomicU64::new(EVICTED),
            dirty_pieces: AtomicU64::new(0),
            referenced: AtomicBool::new(false),
        }
    }

    /// A marker without entries that holds a cache slot while its table is read from the
    /// image: others wait, nobody can pin or evict it. The loader replaces it with the real
    /// table, or (on failure) calls [`L2Table::fail_loading`] and empties the slot.
    pub fn loading() -> L2Table {
        L2Table {
            entries: Box::new([]),
            state: AtomicU64::new(LOADING),
            dirty_pieces: AtomicU64::new(0),
            referenced: AtomicBool::new(false),
        }
    }

    /// A table from its on-disk big-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> L2Table {
        L2Table {
            entries: bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    AtomicU64::new(u64::from_be_bytes(a))
                })
                .collect(),
            state: AtomicU64::new(0),
            dirty_pieces: AtomicU64::new(0),
            referenced: AtomicBool::new(true),
        }
    }

    /// Loading failed: the table stays "loading" for anyone who still sees it (they wait
    /// until the loader has taken it out of its slot) and can never be used.
    pub fn fail_loading(&self) {
        self.state.fetch_or(EVICTED, Ordering::AcqRel);
    }

    /// True while the table is being loaded (or its loading failed).
    pub fn is_loading(&self) -> bool {
        self.state.load(Ordering::Acquire) & LOADING != 0
    }

    /// Pins the table for modification; false if it was evicted (reload it).
    pub fn pin(&self) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & (EVICTED | LOADING) == 0 && s & PINS < PINS).then_some(s + 1)
            })
            .is_ok()
    }

    /// Releases a pin taken by [`L2Table::pin`].
    pub fn unpin(&self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }

    /// Bytes of one write-back piece: a 4 KiB page, or 1/64 of the table for tables over
    /// 256 KiB (the dirty-piece mask has 64 bits).
    pub fn piece_bytes(&self) -> usize {
        (self.entries.len() * 8 / 64).max(MIN_PIECE)
    }

    /// Marks the table changed at entry word `word` (the caller holds a pin and has stored
    /// the word). The piece bit is set before the table's dirty bit, so a flush that sees
    /// the table dirty also sees the piece.
    pub fn mark_dirty(&self, word: usize) {
        let piece = word * 8 / self.piece_bytes();
        self.dirty_pieces
            .fetch_or(1u64 << piece.min(63), Ordering::AcqRel);
        self.state.fetch_or(DIRTY, Ordering::AcqRel);
    }

    /// Marks the whole table changed.
    #[cfg(any(test, feature = "bench"))]
    pub fn mark_all_dirty(&self) {
        self.dirty_pieces.store(u64::MAX, Ordering::Release);
        self.state.fetch_or(DIRTY, Ordering::AcqRel);
    }

    /// True if the table holds changes not yet written (or being written).
    pub fn is_dirty(&self) -> bool {
        self.state.load(Ordering::Acquire) & (DIRTY | WRITING) != 0
    }

    /// Flush: if the table is dirty, clears that and marks it being written; returns the
    /// mask of pieces changed since the last write (bit k: bytes `k * piece_bytes()..`), or
    /// None if it was clean. Changes made from now on mark it dirty again. The mask is taken
    /// after the dirty bit is cleared, so a change racing with this is either in the mask or
    /// makes the table dirty again (or both: then it is written twice, harmlessly).
    pub fn begin_write(&self) -> Option<u64> {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & DIRTY != 0).then_some((s & !DIRTY) | WRITING)
            })
            .ok()?;
        Some(self.dirty_pieces.swap(0, Ordering::AcqRel))
    }

    /// Flush: the write started by [`L2Table::begin_write`] finished (`ok`) or failed (the
    /// table is dirty again, all of it: the failed write may have moved the table to a new
    /// cluster whose contents are unknown).
    pub fn end_write(&self, ok: bool) {
        if ok {
            self.state.fetch_and(!WRITING, Ordering::AcqRel);
        } else {
            self.dirty_pieces.store(u64::MAX, Ordering::Release);
            let _ = self
                .state
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    Some((s & !WRITING) | DIRTY)
                });
        }
    }

    /// Evicts the table if it is clean, unpinned and not being written. After this it can
    /// never be pinned again.
    pub fn try_evict(&self) -> bool {
        self.state
            .compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records a use for the cache's second-chance policy (writes only when the bit was
    /// cleared by the clock hand, so hot tables are not written on every request).
    pub fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Clears the use bit; returns whether it was set.
    pub fn take_referenced(&self) -> bool {
        self.referenced.load(Ordering::Relaxed) && self.referenced.swap(false, Ordering::Relaxed)
    }

    /// Reserves the entry whose first word is word `w` if it still holds `seen` (a
    /// compare-and-swap to [`RESERVED`]); false if it changed meanwhile.
    #[inline]
    pub fn reserve(&self, w: usize, seen: L2Entry) -> bool {
        self.entries[w]
            .compare_exchange(seen.0, RESERVED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stores `e` as the first word at word `w` (Release): publishes an entry, or ends a
    /// reservation by putting back the old one.
    #[inline]
    pub fn store_entry(&self, w: usize, e: L2Entry) {
        self.entries[w].store(e.0, Ordering::Release);
    }

    /// Stores `b` as the subcluster bitmap of the extended entry at word `w` (Release).
    #[inline]
    pub fn store_bitmap(&self, w: usize, b: SubclusterBitmap) {
        self.entries[w + 1].store(b.0, Ordering::Release);
    }

    /// Serialises the current entries into `out` (big-endian). Returns false if some entry
    /// still holds [`RESERVED`] (the caller waits and retries).
    pub fn to_bytes(&self, out: &mut [u8]) -> bool {
        for (i, e) in self.entries.iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            if v == RESERVED {
                return false;
            }
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_standard_and_zero() {
        assert_eq!(L2Entry(0).decode(16, false), Ok(Mapping::Unallocated));
        assert_eq!(L2Entry(ZERO).decode(16, false), Ok(Mapping::Zero));
        assert_eq!(
            L2Entry(COPIED | 0x30000).decode(16, false),
            Ok(Mapping::Data(0x30000))
        );
        assert!(L2Entry(COPIED | 0x30200).decode(16, false).is_err());
        assert!(L2Entry(COPIED).decode(16, false).is_err());
        assert!(L2Entry(RESERVED).decode(16, false).is_err());
        assert!(L2Entry(1 << 58).decode(16, false).is_err());
        // Extended L2: bit 0 is reserved.
        assert!(L2Entry(ZERO).decode(16, true).is_err());
    }

    #[test]
    fn table_entries_in_both_layouts() {
        let mut t = Vec::new();
        for w in [COPIED | 0x30000, 0xff, 0x50000, 0] {
            t.extend_from_slice(&u64::to_be_bytes(w));
        }
        let plain: Vec<_> = table_entries(&t, false).collect();
        assert_eq!(
            plain,
            [(COPIED | 0x30000, 0), (0xff, 0), (0x50000, 0), (0, 0)]
                .map(|(word, bitmap)| Entry::new(L2Entry(word), SubclusterBitmap(bitmap)))
        );
        let extended: Vec<_> = table_entries(&t, true).collect();
        assert_eq!(
            extended,
            [(COPIED | 0x30000, 0xff), (0x50000, 0)]
                .map(|(word, bitmap)| Entry::new(L2Entry(word), SubclusterBitmap(bitmap)))
        );
    }

    #[test]
    fn host_clusters_of_each_entry_kind() {
        let none = |r: std::ops::RangeInclusive<u64>| r.count() == 0;
        assert!(none(L2Entry(0).host_clusters(16, false)), "unallocated");
        assert_eq!(L2Entry(COPIED | 0x30000).host_clusters(16, false), 3..=3);
        // A zero cluster that keeps its host cluster still holds its refcount.
        assert_eq!(L2Entry(0x30000 | ZERO).host_clusters(16, false), 3..=3);
        // Compressed: offset 0xfff0, one additional sector: bytes 0xfe00..0x10200 minus the
        // in-sector offset, i.e. clusters 0 and 1.
        let e = COMPRESSED | (1u64 << 54) | 0xfff0;
        assert_eq!(L2Entry(e).host_clusters(16, false), 0..=1);
        assert!(
            none(L2Entry(COMPRESSED | COPIED).host_clusters(16, false)),
            "invalid"
        );
    }

    #[test]
    fn decode_compressed() {
        // cluster_bits 16: x = 54; two additional sectors, offset 0x10100.
        let e = COMPRESSED | (2u64 << 54) | 0x10100;
        assert_eq!(
            L2Entry(e).decode(16, false),
            Ok(Mapping::Compressed {
                offset: 0x10100,
                len: 3 * 512 - 0x100
            })
        );
        assert_eq!(compressed_clusters(0xfff0, 0x20, 16), 0..=1);
    }

    #[test]
    fn dirty_pieces_follow_the_changed_entries() {
        // 64 KiB table: 16 pieces of 4 KiB (512 entries each).
        let t = L2Table::zeroed(8192);
        assert_eq!(t.piece_bytes(), 4096);
        t.mark_dirty(0);
        t.mark_dirty(511);
        t.mark_dirty(512);
        t.mark_dirty(8191);
        assert_eq!(t.begin_write(), Some(1 | 2 | 1 << 15));
        t.end_write(true);
        assert!(!t.is_dirty());
        t.mark_all_dirty();
        assert_eq!(t.begin_write(), Some(u64::MAX));
        t.end_write(true);
        // 2 MiB table: 64 pieces of 32 KiB.
        let big = L2Table::zeroed(1 << 18);
        assert_eq!(big.piece_bytes(), 32 << 10);
        big.mark_dirty((1 << 18) - 1);
        assert_eq!(big.begin_write(), Some(1 << 63));
        // 4 KiB table (small clusters): one piece.
        let small = L2Table::zeroed(512);
        small.mark_dirty(511);
        assert_eq!(small.begin_write(), Some(1));
    }

    #[test]
    fn table_states() {
        let t = L2Table::zeroed(4);
        assert!(t.pin());
        assert!(!t.try_evict(), "pinned");
        t.mark_dirty(3);
        t.unpin();
        assert!(!t.try_evict(), "dirty");
        assert_eq!(t.begin_write(), Some(1));
        assert_eq!(t.begin_write(), None);
        assert!(t.is_dirty());
        assert!(!t.try_evict(), "being written");
        t.end_write(false);
        assert!(t.is_dirty());
        assert_eq!(
            t.begin_write(),
            Some(u64::MAX),
            "a failed write rewrites everything"
        );
        t.end_write(true);
        assert!(!t.is_dirty());
        assert!(t.try_evict());
        assert!(!t.pin(), "evicted tables cannot be modified");
        assert!(!L2Table::placeholder().pin());
        let l = L2Table::from_bytes(&[0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert!(!l.is_loading());
        assert_eq!(l.entries[0].load(Ordering::Relaxed), 0x100);
        assert_eq!(l.entries[1].load(Ordering::Relaxed), 2);
        let l = L2Table::loading();
        assert!(l.is_loading() && !l.pin() && !l.try_evict());
        l.fail_loading();
        assert!(l.is_loading() && !l.pin() && !l.try_evict());
        assert!(t.take_referenced());
        assert!(!t.take_referenced());
        t.touch();
        assert!(t.take_referenced());
    }
}

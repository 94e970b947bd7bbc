//! Persistent dirty bitmaps (the qcow2 "bitmaps" extension, qcow2.txt "Bitmaps").
//!
//! At a writable open every usable bitmap (type "dirty tracking", no unknown flags, no
//! incompatible extra data, a table that matches the disk size, not already `in_use`) is
//! loaded into memory, one atomic bit per granule. Every write, discard and write-zeroes
//! sets the bits of the enabled (`auto`) ones before any data moves. The on-disk copies
//! stay flagged `in_use` while the image is open writable, as the spec asks of bitmaps that
//! are not in sync with memory; a clean close stores them (data clusters, then the table,
//! then refcounts, then the directory with `in_use` cleared), so `qemu-img bitmap` and QEMU
//! incremental backup can use them afterwards. A bitmap that cannot be maintained keeps its
//! `in_use` flag when it is enabled, so it is never silently stale; a disabled one we do
//! not understand is left untouched.
//!
//! Guest writes only load and `fetch_or` bit words (and read one atomic flag): no lock. A
//! write that finds the on-disk directory not marked `in_use` (after a close that left the
//! image usable) marks it again, synced, before it proceeds.

use crate::image::storage::HostFile;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::alloc::HostCluster;
use super::header::BitmapsExt;
use super::io as qio;
use super::{be64_at, lock, Qcow2Shared};
use crate::image::BitmapInfo;

/// Directory entry flag: not saved consistently.
const FLAG_IN_USE: u32 = 1;
/// Directory entry flag: enabled (tracks every write).
const FLAG_AUTO: u32 = 2;
/// Directory entry flag: unknown extra data may be ignored.
const FLAG_EXTRA_COMPAT: u32 = 4;
/// Bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry: offset bits 9..55.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry with no cluster: reads as all ones.
const TABLE_ALL_ONES: u64 = 1;
/// Most bits kept in memory for all bitmaps of an image together (128 MiB; a hostile image
/// with many huge bitmaps must not exhaust memory); bitmaps past it are not maintained.
const MAX_BITS: u64 = 1 << 30;

/// One bitmap of the directory.
pub struct Bitmap {
    /// Name (lossily decoded if not UTF-8).
    pub name: String,
    /// log2 of the bytes per bit.
    granularity_bits: u32,
    /// Offset of this bitmap's entry in the directory.
    entry_off: usize,
    table_offset: u64,
    /// Flags as found at open.
    flags: u32,
    /// One bit per granule, when we maintain the bitmap.
    bits: Option<Box<[AtomicU64]>>,
    /// The bitmap table (entries as on disk), when maintained; rewritten by [`store`].
    table: Mutex<Vec<u64>>,
}

impl Bitmap {
    fn enabled(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Sets the bits covering guest bytes `[off, off + len)` (`len > 0`).
    fn mark(&self, off: u64, len: u64) {
        let Some(bits) = &self.bits else {
            return;
        };
        let first = off >> self.granularity_bits;
        let last = (off + len - 1) >> self.granularity_bits;
        let mut b = first;
        while b <= last {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (last - b + lo).min(63);
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if let Some(word) = bits.get(w) {
                // Load first: most writes hit granules already dirty, and a plain load keeps
                // the cache line shared between queues.
                if word.load(Ordering::SeqCst) & mask != mask {
                    word.fetch_or(mask, Ordering::SeqCst);
                }
            }
            b += hi - lo + 1;
        }
    }

    /// Bytes of guest data marked dirty.
    fn dirty_bytes(&self, size: u64) -> Option<u64> {
        let bits = self.bits.as_ref()?;
        let n: u64 = bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        Some((n << self.granularity_bits).min(size))
    }
}

/// The bitmaps of one image.
pub struct Bitmaps {
    directory_offset: u64,
    /// The directory as last written (held while storing: see [`Bitmaps::mark`]).
    dir: Mutex<Vec<u8>>,
    /// The bitmaps, in directory order.
    pub list: Vec<Bitmap>,
    /// The on-disk directory flags every maintained bitmap `in_use`.
    in_use_on_disk: AtomicBool,
    /// Opened writable (bitmaps loaded and maintained).
    writable: bool,
}

/// Bitmap table entries a bitmap of `size` bytes of disk needs.
fn table_entries(size: u64, granularity_bits: u32, cluster_bits: u32) -> u64 {
    let bits = size.div_ceil(1 << granularity_bits);
    bits.div_ceil(8).div_ceil(1 << cluster_bits)
}

impl Bitmaps {
    /// Reads the bitmap directory. With `load`, loads the bits of every usable bitmap and
    /// flags in use (synced) every bitmap we maintain or that is enabled.
    ///
    /// The directory's placement was validated by `rebuild::bitmaps`; entries are checked
    /// again here, so a malformed one is reported, never trusted.
    pub fn open(
        file: &HostFile,
        ext: BitmapsExt,
        cluster_bits: u32,
        size: u64,
        file_len: u64,
        load: bool,
    ) -> io::Result<Bitmaps> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let cs = 1u64 << cluster_bits;
        let mut dir = vec![0u8; ext.directory_size as usize];
        qio::read_bytes(file, ext.directory_offset, &mut dir)?;
        let mut list = Vec::new();
        let mut off = 0usize;
        let mut total_bits = 0u64;
        for k in 0..ext.nb_bitmaps {
            let e = dir
                .get(off..off + 24)
                .ok_or_else(|| bad(format!("bitmap directory entry {k} is truncated")))?;
            let table_offset = be64_at(e, 0);
            let table_size = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
            let flags = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
            let kind = e[16];
            let granularity_bits = u32::from(e[17]);
            let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
            let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as usize;
            let name_at = off + 24 + extra;
            let name = dir
                .get(name_at..name_at + name_size)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .ok_or_else(|| bad(format!("bitmap directory entry {k} is malformed")))?;
            let usable = flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_COMPAT) == 0
                && flags & FLAG_IN_USE == 0
                && kind == TYPE_DIRTY_TRACKING
                && (9..=31).contains(&granularity_bits)
                && (extra == 0 || flags & FLAG_EXTRA_COMPAT != 0)
                && u64::from(table_size) == table_entries(size, granularity_bits, cluster_bits)
                && total_bits + size.div_ceil(1 << granularity_bits) <= MAX_BITS;
            let mut bm = Bitmap {
                name,
                granularity_bits,
                entry_off: off,
                table_offset,
                flags,
                bits: None,
                table: Mutex::new(Vec::new()),
            };
            if load && usable {
                match load_bits(file, &bm, table_size, cs, size, file_len) {
                    Ok((table, bits)) => {
                        total_bits += bits.len() as u64 * 64;
                        bm.table = Mutex::new(table);
                        bm.bits = Some(bits);
                    }
                    Err(m) => log::warn!("bitmap '{}' is not maintained: {m}", bm.name),
                }
            } else if load && flags & FLAG_IN_USE == 0 && flags & FLAG_AUTO != 0 {
                log::warn!(
                    "bitmap '{}' cannot be maintained (unsupported type, flags, granularity, \
                     extra data or size); it is marked in use (inconsistent)",
                    bm.name
                );
            }
            list.push(bm);
            off = (off + 24 + extra + name_size).next_multiple_of(8);
        }
        let b = Bitmaps {
            directory_offset: ext.directory_offset,
            dir: Mutex::new(dir),
            list,
            in_use_on_disk: AtomicBool::new(false),
            writable: load,
        };
        if load {
            b.set_in_use(file)?;
        }
        Ok(b)
    }

    /// Flags in use, on disk and synced, every bitmap we maintain or that is enabled.
    fn set_in_use(&self, file: &HostFile) -> io::Result<()> {
        let mut dir = lock(&self.dir);
        if self.in_use_on_disk.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut any = false;
        for bm in &self.list {
            if bm.bits.is_some() || bm.enabled() {
                dir[bm.entry_off + 15] |= FLAG_IN_USE as u8;
                any = true;
            }
        }
        if any {
            qio::write_bytes(file, self.directory_offset, &dir)?;
            file.sync_point("qcow2.bitmap.in-use")?;
        }
        self.in_use_on_disk.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Records a change of guest bytes `[off, off + len)` in every enabled bitmap. Call
    /// before the change is made.
    pub fn mark(&self, file: &HostFile, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for bm in self.list.iter().filter(|b| b.enabled()) {
            bm.mark(off, len);
        }
        // After setting the bits: a store that cleared the flag first either sees our bits
        // or we see the flag cleared and mark the directory again (waiting for the store).
        if !self.in_use_on_disk.load(Ordering::SeqCst) {
            self.set_in_use(file)?;
        }
        Ok(())
    }

    /// Per-bitmap information for the control socket.
    pub fn info(&self, size: u64) -> Vec<BitmapInfo> {
        self.list
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1u64.checked_shl(b.granularity_bits).unwrap_or(0),
                enabled: b.enabled() && b.bits.is_some(),
                // Left in use by another writer, or enabled but not maintained by us (then
                // we flagged it in use).
                inconsistent: b.flags & FLAG_IN_USE != 0
                    || (self.writable && b.bits.is_none() && b.enabled()),
                dirty_bytes: b.dirty_bytes(size),
            })
            .collect()
    }

    /// Clears every bit of the named bitmap.
    pub fn clear(&self, name: &str) -> io::Result<()> {
        let bm = self.list.iter().find(|b| b.name == name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no bitmap named '{name}'"))
        })?;
        let bits = bm.bits.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bitmap '{name}' is not maintained (inconsistent or unsupported); remove it \
                     with 'qemu-img bitmap --remove'"
                ),
            )
        })?;
        for w in bits.iter() {
            w.store(0, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Why a bitmap's table or data cannot be loaded (the bitmap is then not maintained).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// Reading the table or a data cluster failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Table entry (index) with reserved bits set.
    #[error("table entry {0} has reserved bits set")]
    ReservedBits(usize),
    /// Table entry (index) pointing at an unaligned offset or past the end of the file.
    #[error("table entry {0} points outside the file")]
    OutsideFile(usize),
}

/// Reads a bitmap's table and data into memory.
fn load_bits(
    file: &HostFile,
    bm: &Bitmap,
    table_size: u32,
    cs: u64,
    size: u64,
    file_len: u64,
) -> Result<(Vec<u64>, Box<[AtomicU64]>), LoadError> {
    let mut tb = vec![0u8; table_size as usize * 8];
    qio::read_bytes(file, bm.table_offset, &mut tb)?;
    let table: Vec<u64> = (0..table_size as usize).map(|i| be64_at(&tb, i)).collect();
    let nbits = size.div_ceil(1 << bm.granularity_bits);
    let nbytes = nbits.div_ceil(8) as usize;
    let mut data = vec![0u8; nbytes.next_multiple_of(8)];
    for (i, &e) in table.iter().enumerate() {
        let at = i * cs as usize;
        let end = (at + cs as usize).min(nbytes);
        let chunk = &mut data[at..end];
        let off = e & TABLE_OFFSET_MASK;
        if e & !(TABLE_OFFSET_MASK | TABLE_ALL_ONES) != 0 || (off != 0 && e & TABLE_ALL_ONES != 0) {
            return Err(LoadError::ReservedBits(i));
        }
        if off == 0 {
            if e & TABLE_ALL_ONES != 0 {
                chunk.fill(0xff);
            }
            continue;
        }
        if !off.is_multiple_of(cs) || off + cs > file_len.next_multiple_of(cs) {
            return Err(LoadError::OutsideFile(i));
        }
        qio::read_bytes(file, off, chunk)?;
    }
    // Bits past the end of the disk must stay zero.
    if !nbits.is_multiple_of(8) {
        data[nbytes - 1] &= (1u8 << (nbits % 8)) - 1;
    }
    for b in data.iter_mut().skip(nbytes) {
        *b = 0;
    }
    let words = data
        .chunks_exact(8)
        .map(|c| {
            AtomicU64::new(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]))
        })
        .collect();
    Ok((table, words))
}

impl Qcow2Shared {
    /// Flags the maintained bitmaps in use on disk again (after a failed store).
    fn bitmaps_set_in_use(&self) -> io::Result<()> {
        match &self.bitmaps {
            Some(b) => b.set_in_use(&self.file),
            None => Ok(()),
        }
    }

    /// Stores every maintained bitmap and clears its `in_use` flag (clean close). Holds the
    /// directory lock throughout, so a write arriving meanwhile waits and flags them in
    /// use again. Metadata ordering: data clusters and tables are written and synced, the
    /// clusters they no longer use are released, refcounts are flushed, and only then is the
    /// directory rewritten without `in_use`.
    pub(super) fn store_bitmaps(&self) -> io::Result<()> {
        let Some(bms) = &self.bitmaps else {
            return Ok(());
        };
        let clusters = self.clusters()?;
        let mut dir = lock(&bms.dir);
        // Nothing maintained, or stored already with no write since (a write flags them in
        // use again first).
        if !bms.list.iter().any(|b| b.bits.is_some()) || !bms.in_use_on_disk.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        // Writers that set bits from now on find the flag clear and wait for `dir`.
        bms.in_use_on_disk.store(false, Ordering::SeqCst);
        let cs = self.cluster_size() as usize;
        let size = self.size.load(Ordering::Acquire);
        let mut released = Vec::new();
        let r = (|| {
            for bm in &bms.list {
                let Some(bits) = &bm.bits else { continue };
                let nbytes = size.div_ceil(1 << bm.granularity_bits).div_ceil(8) as usize;
                let mut bytes = Vec::with_capacity(bits.len() * 8);
                for w in bits.iter() {
                    bytes.extend_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
                }
                bytes.truncate(nbytes);
                let mut table = lock(&bm.table);
                let mut buf = vec![0u8; cs];
                let mut moved = false;
                for (i, entry) in table.iter_mut().enumerate() {
                    let chunk = bytes.get(i * cs..((i + 1) * cs).min(nbytes)).unwrap_or(&[]);
                    let old = *entry & TABLE_OFFSET_MASK;
                    if chunk.iter().all(|&b| b == 0) {
                        if old != 0 {
                            released.push(HostCluster(old >> self.cluster_bits));
                        }
                        *entry = 0;
                        continue;
                    }
                    let owned =
                        old != 0 && clusters.get(HostCluster(old >> self.cluster_bits)) == 1;
                    let at = if owned {
                        old
                    } else {
                        if old != 0 {
                            released.push(HostCluster(old >> self.cluster_bits));
                        }
                        self.meta_dirty.store(true, Ordering::Release);
                        moved = true;
                        clusters.alloc(true)?.0 << self.cluster_bits
                    };
                    buf[..chunk.len()].copy_from_slice(chunk);
                    buf[chunk.len()..].fill(0);
                    qio::write_bytes(&self.file, at, &buf)?;
                    *entry = at;
                }
                if moved {
                    // The table must not point at a data cluster before its contents are on
                    // disk (found by the power-loss harness: QEMU's check then counts a
                    // reference past the end of the file).
                    self.file.sync_point("qcow2.bitmap.store-data")?;
                }
                let mut tb = Vec::with_capacity(table.len() * 8);
                for e in table.iter() {
                    tb.extend_from_slice(&e.to_be_bytes());
                }
                qio::write_bytes(&self.file, bm.table_offset, &tb)?;
            }
            self.file.sync_point("qcow2.bitmap.store-tables")?;
            // The tables no longer point at the released clusters, durably.
            for &c in &released {
                clusters.release_meta(c)?;
                self.meta_dirty.store(true, Ordering::Release);
            }
            released.clear();
            self.flush_settled()?;
            for bm in bms.list.iter().filter(|b| b.bits.is_some()) {
                dir[bm.entry_off + 15] &= !(FLAG_IN_USE as u8);
            }
            // No sync of its own: the caller (close) clears the dirty bit next and syncs both.
            // Clearing `in_use` only ever claims what the synced tables already hold, and a
            // write after this flags them in use again (synced) before it changes anything,
            // so no crash can pair a clear flag with a change the tables miss.
            qio::write_bytes(&self.file, bms.directory_offset, &dir)
        })();
        if r.is_err() {
            // Whether the directory on disk still flags them in use is unknown: leave
            // `in_use_on_disk` clear, so the next write flags them again first, and the next
            // close stores them again.
            drop(dir);
            let _ = self.bitmaps_set_in_use();
        }
        r
    }
}

//! Discard and write-zeroes: unmapping clusters, zero flags and zeroed subclusters.

use std::ops::ControlFlow;

use super::*;

impl Qcow2Shared {
    pub(super) fn discard_range(&self, off: u64, len: u64) -> stdio::Result<()> {
        self.check_writable()?;
        self.mark_bitmaps(off, len)?;
        let cs = self.cluster_size();
        let first = off.div_ceil(cs);
        let size = self.size.load(Ordering::Acquire);
        let end = (off + len).min(size);
        // The last partial cluster of the disk counts as whole when the range reaches the end.
        let last = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if self.data_raw {
            // The data file must stay the disk's raw image: keep every mapping and
            // deallocate the data in the file, which then reads as zeros, like the disk.
            for c in first..last {
                let (i, j, _) = self.locate(GuestOffset(c * cs));
                let word = self.load_entry(&**self.table(i)?, j).word;
                if self.has_host(word) {
                    self.punch_data(word.host_offset(), cs);
                }
            }
            return Ok(());
        }
        let new = if self.backing.is_some() {
            match self.zero_entry() {
                Some(zero) => zero,
                None => return Ok(()),
            }
        } else {
            Entry::plain(L2Entry::UNALLOCATED)
        };
        for c in first..last {
            self.set_cluster(c * cs, new)?;
        }
        Ok(())
    }

    pub(super) fn write_zeroes_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        len: u64,
    ) -> stdio::Result<()> {
        self.check_writable()?;
        self.mark_bitmaps(off, len)?;
        let cs = self.cluster_size();
        let end = off + len;
        let mut g = off;
        // With a raw data file the zeros must be in the file: write them (no zero flags).
        let zero = if self.data_raw {
            None
        } else {
            self.zero_entry()
        };
        let size = self.size.load(Ordering::Acquire);
        while g < end {
            let in_off = g & (cs - 1);
            let n = (cs - in_off).min(end - g);
            let whole = in_off == 0 && (n == cs || g + n == size);
            match zero {
                Some(zero) if whole => self.set_cluster(g, zero)?,
                _ if self.extended
                    && !self.data_raw
                    && self.zero_in_cluster(file, scratch, g, n)? => {}
                _ => self.write_zero_bytes(file, scratch, g, n)?,
            }
            g += n;
        }
        Ok(())
    }

    /// Records a guest change of `[off, off + len)` in the enabled persistent bitmaps.
    pub(super) fn mark_bitmaps(&self, off: u64, len: u64) -> stdio::Result<()> {
        match &self.bitmaps {
            Some(b) => b.mark(&self.file, off, len),
            None => Ok(()),
        }
    }

    /// Writes `n` zero bytes at guest offset `g` (within one cluster).
    pub(super) fn write_zero_bytes(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        g: u64,
        n: u64,
    ) -> stdio::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut zeros = vec![0u8; n as usize];
        let s = [VolatileSlice::from(&mut zeros[..])];
        self.write_in_cluster(file, scratch, g, n, &s, 0)
    }

    /// Extended L2: zeroes `[g, g + n)` (within one cluster) by setting the zero bits of the
    /// whole subclusters inside it and writing zero bytes only to the partial subclusters
    /// at its ends. False (nothing done) if no subcluster is whole or the cluster is
    /// compressed.
    pub(super) fn zero_in_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        g: u64,
        n: u64,
    ) -> stdio::Result<bool> {
        let scs = self.cluster_size() / l2::SUBCLUSTERS;
        let in_off = g & (self.cluster_size() - 1);
        let end = in_off + n;
        let first = in_off.div_ceil(scs);
        // The last partial subcluster of the disk counts as whole when the range reaches the
        // end.
        let last = if g + n == self.size.load(Ordering::Acquire) {
            end.div_ceil(scs)
        } else {
            end / scs
        };
        if first >= last {
            return Ok(false);
        }
        let mask = ((1u64 << last) - 1) & !((1u64 << first) - 1);
        if !self.zero_subclusters(g - in_off, mask)? {
            return Ok(false);
        }
        let head = first * scs - in_off;
        self.write_zero_bytes(file, scratch, g, head)?;
        let tail = end.saturating_sub(last * scs);
        self.write_zero_bytes(file, scratch, g + n - tail, tail)?;
        Ok(true)
    }

    /// Extended L2: makes subclusters `mask` of the guest cluster at `g` read as zeros:
    /// sets their zero bits and clears their allocation bits (a host cluster stays
    /// referenced by the entry). False if the cluster is compressed (it has no bitmap).
    pub(super) fn zero_subclusters(&self, g: u64, mask: u64) -> stdio::Result<bool> {
        let settled = |entry: Entry| {
            let bitmap = entry.bitmap;
            if entry.word.is_compressed() {
                ControlFlow::Break(false)
            } else if bitmap.allocated() & mask == 0 && bitmap.zeroed() & mask == mask {
                ControlFlow::Break(true)
            } else {
                ControlFlow::Continue(())
            }
        };
        let r = self.change_entry(g, settled, |old| {
            Entry::new(old.word, old.bitmap.with_zeroed(mask))
        })?;
        Ok(match r {
            ControlFlow::Break(done) => done,
            ControlFlow::Continue(_) => true,
        })
    }
}

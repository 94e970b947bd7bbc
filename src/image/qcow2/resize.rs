//! Online resize: growing the virtual disk.
//!
//! Three steps, each durable before the next, so that a crash at any point leaves an image
//! that reads as the old disk or as the new one, never anything else:
//!
//! 1. The L1 table grows: in place when its clusters have room (the new entries are zeroed
//!    on disk), otherwise it is written whole to newly allocated clusters. Then one header
//!    write switches `l1_size` and `l1_table_offset`, still with the old virtual size (an L1
//!    table larger than the disk needs is valid). Synced.
//! 2. If a backing file reaches past the old size, its part of the grown area is made to
//!    read as zeros, as QEMU does: zero entries (or zero bytes where the format has no zero
//!    flag), written back with a flush. Beyond the old size they are invisible.
//! 3. One header write records the new size. Synced.
//!
//! Before step 2 made the zeros durable, a crash after step 3 could expose the backing
//! file's old data in the new space (the entries lived only in memory).
//!
//! The guest cannot reach the new area before this returns: the caller publishes the new
//! capacity afterwards.

use std::io as stdio;
use std::sync::atomic::Ordering;

use log::error;

use super::alloc::HostCluster;
use super::{header, io, lock, Qcow2Shared, Scratch, OFF_SIZE};

/// Header offset of `l1_size` (4 bytes; `l1_table_offset`, 8 bytes, follows).
const OFF_L1_SIZE: u64 = 36;

impl Qcow2Shared {
    /// Grows the virtual disk to `new_size` bytes (online resize; see the module doc).
    pub(super) fn resize(&self, new_size: u64) -> stdio::Result<()> {
        let invalid = |m: String| stdio::Error::new(stdio::ErrorKind::InvalidInput, m);
        self.check_writable()?;
        // One resize at a time: the steps below release the flush lock in between.
        let _resizing = lock(&self.resizing);
        let old_size = self.size.load(Ordering::Acquire);
        if new_size < old_size {
            return Err(invalid(format!(
                "shrinking a qcow2 image is not supported ({new_size} < {old_size})"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        if self.data_raw {
            return Err(invalid(
                "resizing a qcow2 image with a raw external data file (data_file_raw) is not \
                 supported"
                    .into(),
            ));
        }
        if self.hdr.bitmaps.is_some() {
            // Bitmap tables are sized for the disk: QEMU rejects bitmaps whose table does not
            // match the image size, so growing would silently invalidate them.
            return Err(invalid(
                "resizing a qcow2 image with persistent dirty bitmaps is not supported".into(),
            ));
        }
        let cs = self.cluster_size();
        let need = new_size.div_ceil(cs * self.l2_entries());
        if need * 8 > header::MAX_L1_BYTES {
            return Err(invalid(format!(
                "{new_size} bytes is too large for {cs}-byte clusters (L1 table limit)"
            )));
        }
        let need = need as usize;
        if need > self.l1.len() {
            return Err(invalid(format!(
                "growing past {} bytes needs a daemon restart (L1 capacity reserved at open)",
                self.l1.len() as u64 * cs * self.l2_entries()
            )));
        }
        self.grow_l1(need)?;
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
        if backing_end > old_size {
            let mut scratch = Scratch::default();
            self.write_zeroes_range(&self.file, &mut scratch, old_size, backing_end - old_size)?;
            // Durable before the header's new size exposes the area (a named point, so the
            // power-loss harness can show it is needed).
            if !crate::image::storage::mutated("qcow2.resize.grown-zeroes") {
                self.flush()?;
            }
        }
        let st = lock(&self.state);
        io::write_bytes(&self.file, OFF_SIZE, &new_size.to_be_bytes())?;
        self.file.sync_point("qcow2.resize.size")?;
        self.size.store(new_size, Ordering::Release);
        drop(st);
        Ok(())
    }

    /// Step 1: makes the L1 table `need` entries long on disk and in the header (the virtual
    /// size unchanged), and in memory.
    fn grow_l1(&self, need: usize) -> stdio::Result<()> {
        let mut st = lock(&self.state);
        self.ensure_dirty_locked(&mut st)?;
        let old_len = self.l1_len.load(Ordering::Acquire);
        if need <= old_len {
            return Ok(());
        }
        let cs = self.cluster_size();
        let need_clusters = (need as u64 * 8).div_ceil(cs);
        if need_clusters > st.l1_clusters {
            // Move the table: write all of it to new clusters, then switch the header.
            let clusters = self.clusters()?;
            let start = clusters.alloc_contiguous(need_clusters)?;
            let new_off = start.0 << self.cluster_bits;
            let mut b = vec![0u8; (need_clusters * cs) as usize];
            for (k, e) in self.l1.iter().take(old_len).enumerate() {
                b[k * 8..k * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            let release = |first: u64, n: u64| {
                for c in (first..first + n).map(HostCluster) {
                    // Nothing reads an L1 table from disk once open (it lives in memory),
                    // and the header does not point at this one.
                    if let Err(e) = clusters.release_meta(c) {
                        error!("{}: {e}", self.path.display());
                    }
                }
            };
            if let Err(e) = io::write_bytes(&self.file, new_off, &b)
                .and_then(|()| self.file.sync_point("qcow2.resize.moved-l1-table"))
            {
                release(start.0, need_clusters);
                return Err(e);
            }
            let mut h = [0u8; 12];
            h[..4].copy_from_slice(&(need as u32).to_be_bytes());
            h[4..].copy_from_slice(&new_off.to_be_bytes());
            let r = io::write_bytes(&self.file, OFF_L1_SIZE, &h)
                .and_then(|()| self.file.sync_point("qcow2.resize.l1-header"));
            if let Err(e) = r {
                // The header may or may not point at the new table now: refuse further
                // writes (both tables stay referenced, a leak at worst) rather than maintain
                // the wrong one.
                error!(
                    "{}: switching to the grown L1 table failed: {e}; refusing writes",
                    self.path.display()
                );
                self.corrupt.store(true, Ordering::Release);
                return Err(e);
            }
            release(st.l1_offset >> self.cluster_bits, st.l1_clusters);
            st.l1_offset = new_off;
            st.l1_clusters = need_clusters;
            self.meta_dirty.store(true, Ordering::Release);
        } else {
            // Room in the current clusters: zero the new entries, then switch the header.
            let zeros = vec![0u8; (need - old_len) * 8];
            io::write_bytes(&self.file, st.l1_offset + old_len as u64 * 8, &zeros)?;
            self.file.sync_point("qcow2.resize.zeroed-l1-entries")?;
            io::write_bytes(&self.file, OFF_L1_SIZE, &(need as u32).to_be_bytes())?;
            self.file.sync_point("qcow2.resize.l1-header")?;
        }
        self.l1_len.store(need, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::bench_support::Image;
    use super::super::testing::{assert_qemu_img_check, qemu_img, qemu_img_create};
    use super::super::JournalMode;

    const MIB: u64 = 1 << 20;

    /// A resize over a larger backing file, then the image file exactly as it stands when
    /// the resize returns, opened as a crash would leave it (a copy: no journal, no flush
    /// after the resize): the grown area must read as zeros, in our reader and in QEMU's,
    /// and the copy must be consistent. Before the fix the zero entries were in memory only
    /// and the copy showed the backing file's data.
    fn grown_area_is_zero_in_the_file_when_resize_returns(extended: bool, backing_fmt: &str) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(format!("base.{backing_fmt}"));
        let p = |x: &Path| x.to_str().unwrap().to_owned();
        if backing_fmt == "raw" {
            std::fs::write(&base, vec![0x5au8; (8 * MIB) as usize]).unwrap();
        } else {
            qemu_img_create(&base, "cluster_size=65536", "8M");
            let io = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x5a 0 8M", &p(&base)])
                .output()
                .expect("qemu-io");
            assert!(io.status.success(), "{io:?}");
        }
        let top = dir.path().join("top.qcow2");
        qemu_img_create(
            &top,
            &format!(
                "extended_l2={},backing_file={},backing_fmt={backing_fmt}",
                if extended { "on" } else { "off" },
                p(&base)
            ),
            "2M",
        );
        let img = Image::open_journaled(&top, false, &JournalMode::Off).unwrap();
        img.shared.resize(6 * MIB + 4096).unwrap();
        let copy = dir.path().join("crash.qcow2");
        std::fs::copy(&top, &copy).unwrap();
        drop(img);
        assert_qemu_img_check(&copy, true);
        let mut c = Image::open_journaled(&copy, false, &JournalMode::Off).unwrap();
        assert_eq!(c.size(), 6 * MIB + 4096, "the copy has the new size");
        let mut head = vec![0u8; (2 * MIB) as usize];
        c.read(0, &mut head).unwrap();
        assert!(
            head.iter().all(|&b| b == 0x5a),
            "old area reads the backing file"
        );
        let mut grown = vec![0u8; (4 * MIB + 4096) as usize];
        c.read(2 * MIB, &mut grown).unwrap();
        assert!(
            grown.iter().all(|&b| b == 0),
            "grown area exposes backing data"
        );
        drop(c);
        let raw = dir.path().join("crash.raw");
        qemu_img(&["convert", "-O", "raw", &p(&copy), &p(&raw)]);
        let all = std::fs::read(&raw).unwrap();
        assert!(
            all[(2 * MIB) as usize..].iter().all(|&b| b == 0),
            "QEMU reads backing data in the grown area"
        );
    }

    #[test]
    fn resize_over_raw_backing_zeroes_durably() {
        grown_area_is_zero_in_the_file_when_resize_returns(false, "raw");
    }

    #[test]
    fn resize_over_raw_backing_zeroes_durably_extended_l2() {
        grown_area_is_zero_in_the_file_when_resize_returns(true, "raw");
    }

    #[test]
    fn resize_over_qcow2_backing_zeroes_durably() {
        grown_area_is_zero_in_the_file_when_resize_returns(false, "qcow2");
    }

    #[test]
    fn resize_over_qcow2_backing_zeroes_durably_extended_l2() {
        grown_area_is_zero_in_the_file_when_resize_returns(true, "qcow2");
    }
}

//! Reading guest data: mapping lookups and the synchronous read path.

use super::*;

impl Qcow2Shared {
    pub(super) fn locate(&self, guest: GuestOffset) -> (usize, usize, u64) {
        let c = guest.0 >> self.cluster_bits;
        let n = self.l2_entries();
        (
            (c / n) as usize,
            (c % n) as usize,
            guest.0 & (self.cluster_size() - 1),
        )
    }

    /// Reads guest bytes `[off, off + len)` into request bytes starting at `pos`.
    pub(super) fn read_range(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        off: u64,
        len: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let cs = self.cluster_size();
        let mut done = 0;
        while done < len {
            let g = off + done;
            let (i, j, in_off) = self.locate(GuestOffset(g));
            let n = (cs - in_off).min(len - done);
            let entry = self.load_entry(&**self.table(i)?, j);
            self.read_in_cluster(
                file,
                scratch,
                g - in_off,
                entry,
                in_off,
                n,
                bufs,
                pos + done,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Reads `[in_off, in_off + n)` of the guest cluster at `cluster_guest` described by
    /// `entry` into request bytes at `pos`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_in_cluster(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        entry: Entry,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        let m = self.decode(entry.word).map_err(corrupt)?;
        if self.extended {
            if let Mapping::Data(_) | Mapping::Unallocated = m {
                // Subcluster by subcluster.
                let scs = self.cluster_size() / l2::SUBCLUSTERS;
                let mut done = 0;
                while done < n {
                    let o = in_off + done;
                    let sc = o / scs;
                    let k = (scs - o % scs).min(n - done);
                    let sm = plan::subcluster(m, entry.bitmap, sc).map_err(corrupt)?;
                    self.read_mapped(file, scratch, cluster_guest, sm, o, k, bufs, pos + done)?;
                    done += k;
                }
                return Ok(());
            }
        }
        self.read_mapped(file, scratch, cluster_guest, m, in_off, n, bufs, pos)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_mapped(
        &self,
        file: &HostFile,
        scratch: &mut Scratch,
        cluster_guest: u64,
        m: Mapping,
        in_off: u64,
        n: u64,
        bufs: &[GuestSlice<'_>],
        pos: u64,
    ) -> stdio::Result<()> {
        match m {
            Mapping::Unallocated => match &self.backing {
                Some(bk) => bk.read(scratch, cluster_guest + in_off, n, bufs, pos),
                None => io::zero_pieces(bufs, pos, n),
            },
            Mapping::Zero => io::zero_pieces(bufs, pos, n),
            Mapping::Data(h) => {
                io::for_each_piece(bufs, pos, n, |p, pp| file.read_slice(h + in_off + pp, &p))
            }
            Mapping::Compressed { .. } if self.data_file.is_some() => Err(corrupt(
                "compressed cluster in an image with an external data file",
            )),
            Mapping::Compressed { offset, len } => {
                let cs = self.cluster_size() as usize;
                // A compressed cluster never needs more input than a cluster plus a sector
                // of slack; a larger length is corrupt but harmless to cap.
                let len = (len as usize).min(cs + 1024);
                scratch.comp_in.resize(len, 0);
                io::read_bytes(file, offset, &mut scratch.comp_in)?;
                scratch.comp_out.resize(cs, 0);
                compress::decompress(
                    self.hdr.compression,
                    &scratch.comp_in,
                    &mut scratch.comp_out,
                )?;
                let s = in_off as usize;
                io::copy_to_pieces(bufs, pos, &scratch.comp_out[s..s + n as usize])
            }
        }
    }
}

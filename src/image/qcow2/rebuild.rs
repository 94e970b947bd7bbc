//! Open-time refcount handling for writable images: loading the on-disk refcounts, or
//! rebuilding them from the metadata when the image is dirty, and finding the metadata
//! clusters that overlap protection guards.

use std::io;
use std::sync::atomic::Ordering;

use super::alloc::HostCluster;
use super::l2::{L1Entry, L2Entry, OFFSET_MASK};
use super::{be64_at, io as qio, refcount, Qcow2Shared};

/// Why a writable open failed.
pub enum OpenError {
    /// The image's metadata is invalid (message for the user).
    Invalid(String),
    /// Reading the image failed.
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

type R<T> = std::result::Result<T, OpenError>;

fn invalid<T>(msg: String) -> R<T> {
    Err(OpenError::Invalid(msg))
}

/// Internal snapshots: (L1 table offset, L1 entries), and the snapshot table length.
fn snapshots(s: &Qcow2Shared, file_len: u64) -> R<(u64, Vec<(u64, u32)>)> {
    let h = &s.hdr;
    if h.nb_snapshots == 0 {
        return Ok((0, Vec::new()));
    }
    let avail = (file_len - h.snapshots_offset).min(64 << 20) as usize;
    let mut buf = vec![0u8; avail];
    qio::read_bytes(&s.file, h.snapshots_offset, &mut buf)?;
    let mut off = 0usize;
    let mut out = Vec::new();
    for k in 0..h.nb_snapshots {
        if off + 40 > buf.len() {
            return invalid(format!(
                "snapshot table entry {k} runs past the end of the file"
            ));
        }
        let e = &buf[off..];
        let l1_off = be64_at(e, 0);
        let l1_size = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
        let id_len = u16::from_be_bytes([e[12], e[13]]) as usize;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as usize;
        let extra = u32::from_be_bytes([e[36], e[37], e[38], e[39]]) as usize;
        let used = 40 + extra + id_len + name_len;
        let len = used.next_multiple_of(8);
        // The padding of the last entry may lie past the end of the file.
        if extra > 1 << 16 || off + used > buf.len() {
            return invalid(format!("snapshot table entry {k} is malformed"));
        }
        let cs = s.cluster_size();
        if u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES
            || !l1_off.is_multiple_of(cs)
            || l1_off
                .checked_add(u64::from(l1_size) * 8)
                .is_none_or(|end| end > file_len)
        {
            return invalid(format!("snapshot {k} has an invalid L1 table"));
        }
        out.push((l1_off, l1_size));
        off += len;
    }
    Ok((off as u64, out))
}

fn read_l1(s: &Qcow2Shared, off: u64, n: u32) -> R<Vec<u64>> {
    let mut b = vec![0u8; n as usize * 8];
    qio::read_bytes(&s.file, off, &mut b)?;
    Ok((0..n as usize).map(|i| be64_at(&b, i)).collect())
}

/// Clusters covered by `[off, off + len)`.
fn span(s: &Qcow2Shared, off: u64, len: u64) -> std::ops::Range<u64> {
    let cb = s.cluster_bits;
    (off >> cb)..((off + len.max(1)).div_ceil(1 << cb))
}

/// Metadata areas that are not L2 tables or refcount blocks, as (offset, length, what):
/// header, L1, refcount table, snapshot table, snapshot L1 tables and bitmap structures.
fn fixed_meta(s: &Qcow2Shared, file_len: u64) -> R<Vec<(u64, u64, &'static str)>> {
    let h = &s.hdr;
    let cs = s.cluster_size();
    let mut v = vec![
        (0, cs, "the header"),
        (h.l1_table_offset, u64::from(h.l1_size) * 8, "the L1 table"),
        (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            "the refcount table",
        ),
    ];
    let (tlen, snaps) = snapshots(s, file_len)?;
    if tlen > 0 {
        v.push((h.snapshots_offset, tlen, "the snapshot table"));
    }
    for (o, n) in snaps {
        if n > 0 {
            v.push((o, u64::from(n) * 8, "a snapshot L1 table"));
        }
    }
    v.extend(
        bitmaps(s, file_len)?
            .into_iter()
            .map(|(o, l)| (o, l, "a persistent bitmap structure")),
    );
    Ok(v)
}

/// Refuses metadata structures that share a host cluster or lie past the end of the file:
/// writing one of them back (refcount blocks, L2 tables, L1) would overwrite the other.
/// `areas` are (offset, length, what); empty areas are ignored.
fn check_meta_layout(s: &Qcow2Shared, file_len: u64, areas: &[(u64, u64, &'static str)]) -> R<()> {
    let cs = s.cluster_size();
    let nclusters = file_len.div_ceil(cs);
    let mut owners: Vec<(u64, &'static str)> = Vec::new();
    for &(o, l, what) in areas {
        if l == 0 {
            continue;
        }
        for c in span(s, o, l) {
            if c >= nclusters {
                return invalid(format!(
                    "{what} (cluster {:#x}) lies past the end of the file",
                    c * cs
                ));
            }
            owners.push((c, what));
        }
    }
    owners.sort_unstable();
    for w in owners.windows(2) {
        if w[0].0 == w[1].0 {
            return invalid(format!(
                "metadata overlap: cluster {:#x} is used by {} and by {}; repair with \
                 'qemu-img check -r all'",
                w[0].0 * cs,
                w[0].1,
                w[1].1
            ));
        }
    }
    Ok(())
}

/// Every metadata area of the active image: the fixed ones, refcount blocks and the active
/// L2 tables.
fn all_meta(s: &Qcow2Shared, file_len: u64, rt: &[u64]) -> R<Vec<(u64, u64, &'static str)>> {
    let cs = s.cluster_size();
    let mut v = fixed_meta(s, file_len)?;
    for &e in rt {
        if e != 0 {
            v.push((e, cs, "a refcount block"));
        }
    }
    for e in &s.l1 {
        let off = L1Entry(e.load(Ordering::Relaxed)).l2_offset();
        if off != 0 {
            v.push((off, cs, "an L2 table"));
        }
    }
    Ok(v)
}

/// Areas used by persistent bitmaps: the directory, each bitmap table and each bitmap data
/// cluster.
pub fn bitmaps(s: &Qcow2Shared, file_len: u64) -> R<Vec<(u64, u64)>> {
    let Some(ext) = s.hdr.bitmaps else {
        return Ok(Vec::new());
    };
    let cs = s.cluster_size();
    let mut dir = vec![0u8; ext.directory_size as usize];
    qio::read_bytes(&s.file, ext.directory_offset, &mut dir)?;
    let mut v = vec![(ext.directory_offset, ext.directory_size)];
    let mut off = 0usize;
    for k in 0..ext.nb_bitmaps {
        if off + 24 > dir.len() {
            return invalid(format!("bitmap directory entry {k} is truncated"));
        }
        let e = &dir[off..];
        let table_off = be64_at(e, 0);
        let table_size = u32::from_be_bytes([e[8], e[9], e[10], e[11]]) as u64;
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as usize;
        let used = 24 + extra + name_size;
        if extra > 1 << 16 || off + used > dir.len() {
            return invalid(format!("bitmap directory entry {k} is malformed"));
        }
        if table_size * 8 > super::header::MAX_L1_BYTES
            || !table_off.is_multiple_of(cs)
            || table_off == 0
            || table_off
                .checked_add(table_size * 8)
                .is_none_or(|end| end > file_len)
        {
            return invalid(format!("bitmap {k} has an invalid bitmap table"));
        }
        v.push((table_off, table_size * 8));
        let mut tb = vec![0u8; table_size as usize * 8];
        qio::read_bytes(&s.file, table_off, &mut tb)?;
        for i in 0..table_size as usize {
            let d = be64_at(&tb, i) & OFFSET_MASK;
            if d != 0 {
                if !d.is_multiple_of(cs)
                    || d.checked_add(cs)
                        .is_none_or(|end| end > file_len.next_multiple_of(cs))
                {
                    return invalid(format!("bitmap {k} table entry {i} is invalid"));
                }
                v.push((d, cs));
            }
        }
        off += used.next_multiple_of(8);
    }
    Ok(v)
}

fn rt_entries(s: &Qcow2Shared, file_len: u64) -> R<Vec<u64>> {
    let st = super::lock(&s.state);
    let cs = s.cluster_size();
    for (i, &e) in st.rt.iter().enumerate() {
        if !rt_entry_valid(e, cs, file_len) {
            return invalid(format!("refcount table entry {i} ({e:#x}) is invalid"));
        }
    }
    Ok(st.rt.clone())
}

fn rt_entry_valid(e: u64, cs: u64, file_len: u64) -> bool {
    e & (cs - 1) == 0
        && (e == 0
            || e.checked_add(cs)
                .is_some_and(|end| end <= file_len.next_multiple_of(cs)))
}

/// The refcount table of a dirty image, whose refcounts are about to be rebuilt: an entry
/// that points outside the file is dropped (the table is rewritten by the repair) instead of
/// refusing the image. A crash can leave one where a new refcount block never reached the
/// disk (older versions did not sync the block before the table entry; QEMU repairs the same).
fn rt_entries_dirty(s: &Qcow2Shared, file_len: u64) -> Vec<u64> {
    let mut st = super::lock(&s.state);
    let cs = s.cluster_size();
    for i in 0..st.rt.len() {
        let e = st.rt[i];
        if !rt_entry_valid(e, cs, file_len) {
            log::warn!(
                "{}: refcount table entry {i} ({e:#x}) points outside the file; dropped by \
                 the repair",
                s.path.display()
            );
            st.rt[i] = 0;
            st.rt_dirty = true;
        }
    }
    st.rt.clone()
}

/// Loads refcounts from the image. Returns the refcounts of the clusters of the file and
/// the metadata clusters.
pub fn load(s: &Qcow2Shared, file_len: u64) -> R<(Vec<u64>, Vec<HostCluster>)> {
    let cs = s.cluster_size();
    let nclusters = file_len.div_ceil(cs) as usize;
    let per_block = ((cs * 8) >> s.hdr.refcount_order) as usize;
    let mut rc = vec![0u64; nclusters];
    let mut meta = Vec::new();
    let rt = rt_entries(s, file_len)?;
    let mut buf = vec![0u8; cs as usize];
    for (i, &e) in rt.iter().enumerate() {
        if e == 0 || i * per_block >= nclusters {
            continue;
        }
        qio::read_bytes(&s.file, e, &mut buf)?;
        let vals = refcount::decode_block(&buf, s.hdr.refcount_order);
        let base = i * per_block;
        let n = per_block.min(nclusters - base);
        rc[base..base + n].copy_from_slice(&vals[..n]);
    }
    let areas = all_meta(s, file_len, &rt)?;
    check_meta_layout(s, file_len, &areas)?;
    for (o, l, _) in areas {
        if l > 0 {
            meta.extend(span(s, o, l).map(HostCluster));
        }
    }
    for m in &meta {
        if rc.get(m.0 as usize).copied().unwrap_or(0) == 0 {
            return invalid(format!(
                "metadata cluster {:#x} has refcount 0; repair with 'qemu-img check -r all'",
                m.0 * cs
            ));
        }
    }
    Ok((rc, meta))
}

/// Rebuilds refcounts by walking all metadata.
pub fn rebuild(s: &Qcow2Shared, file_len: u64) -> R<(Vec<u64>, Vec<HostCluster>)> {
    let cs = s.cluster_size();
    let nclusters = file_len.div_ceil(cs);
    let mut rc = vec![0u64; nclusters as usize];
    let mut meta = Vec::new();
    let mut add = |c: u64, is_meta: bool, rc: &mut Vec<u64>| -> R<()> {
        if c >= nclusters {
            return invalid(format!(
                "reference to cluster {:#x} past the end of the file",
                c * cs
            ));
        }
        rc[c as usize] += 1;
        if is_meta {
            meta.push(HostCluster(c));
        }
        Ok(())
    };
    let rt = rt_entries_dirty(s, file_len);
    check_meta_layout(s, file_len, &all_meta(s, file_len, &rt)?)?;
    for (o, l, _) in fixed_meta(s, file_len)? {
        for c in span(s, o, l) {
            add(c, true, &mut rc)?;
        }
    }
    for e in rt {
        if e != 0 {
            add(e / cs, true, &mut rc)?;
        }
    }
    let active: Vec<u64> = s.l1.iter().map(|e| e.load(Ordering::Relaxed)).collect();
    let l1s = all_l1s(s, file_len, active)?;
    walk_l2(s, file_len, l1s, |c, is_table, is_active| {
        add(c, is_table && is_active, &mut rc)
    })?;
    let max = if s.hdr.refcount_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << s.hdr.refcount_order)) - 1
    };
    if let Some(c) = rc.iter().position(|&v| v > max) {
        return invalid(format!(
            "cluster {:#x} has more references than the refcount width allows",
            c as u64 * cs
        ));
    }
    Ok((rc, meta))
}

/// Every L1 table of the image: `active` (the active one, marked true) and each internal
/// snapshot's (false).
pub fn all_l1s(s: &Qcow2Shared, file_len: u64, active: Vec<u64>) -> R<Vec<(Vec<u64>, bool)>> {
    let (_, snaps) = snapshots(s, file_len)?;
    let mut l1s = vec![(active, true)];
    for (o, n) in snaps {
        l1s.push((read_l1(s, o, n)?, false));
    }
    Ok(l1s)
}

/// Reads every L2 table the L1 tables `l1s` reference, checking each entry, and calls
/// `visit(cluster, is_table, is_active)` for each cluster referenced: the L2 table itself,
/// then the host clusters of its data entries (none with an external data file, whose data
/// clusters are not refcounted).
pub fn walk_l2(
    s: &Qcow2Shared,
    file_len: u64,
    l1s: Vec<(Vec<u64>, bool)>,
    mut visit: impl FnMut(u64, bool, bool) -> R<()>,
) -> R<()> {
    let cs = s.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    for (l1, is_active) in l1s {
        for (i, e) in l1.into_iter().enumerate() {
            let e = L1Entry(e);
            e.check(cs, file_len)
                .map_err(|m| OpenError::Invalid(format!("L1 entry {i}: {m}")))?;
            let off = e.l2_offset();
            if off == 0 {
                continue;
            }
            visit(off / cs, true, is_active)?;
            qio::read_bytes(&s.file, off, &mut buf)?;
            for (g, entry) in super::l2::table_entries(&buf, s.extended).enumerate() {
                s.check_entry(entry).map_err(|m| {
                    OpenError::Invalid(format!("L2 table at {off:#x}, entry {g}: {m}"))
                })?;
                // Data clusters in an external data file are not refcounted here.
                if s.data_file.is_none() {
                    for c in entry.word.host_clusters(s.cluster_bits, s.extended) {
                        visit(c, false, is_active)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the data entry `le` should have COPIED set: its cluster's refcount is 1, or it
/// lives in an external data file (not refcounted; QEMU always sets COPIED there).
fn data_copied(s: &Qcow2Shared, clusters: &super::alloc::Clusters, le: L2Entry) -> bool {
    s.data_file.is_some() || clusters.get(HostCluster(le.host_offset() >> s.cluster_bits)) == 1
}

/// After a rebuild: makes the COPIED flags of the active L1 and L2 tables match the
/// refcounts (qemu-img check treats a mismatch as an error).
pub fn fix_copied_flags(s: &Qcow2Shared) -> R<()> {
    let clusters = s.clusters()?;
    let cb = s.cluster_bits;
    let mut buf = vec![0u8; s.cluster_size() as usize];
    for i in 0..s.l1.len() {
        let e = s.l1_entry(i);
        let off = e.l2_offset();
        if off == 0 {
            continue;
        }
        let want = clusters.get(HostCluster(off >> cb)) == 1;
        if e.is_copied() != want {
            s.set_l1_entry(i, e.with_copied(want));
            s.l1_dirty.store(true, Ordering::Release);
        }
        // Check the on-disk table in a reused buffer; only a table that needs a change is
        // loaded (and kept) in memory.
        let mut wrong = false;
        qio::read_bytes(&s.file, off, &mut buf)?;
        for g in 0..s.l2_entries() as usize {
            let le = L2Entry(be64_at(&buf, g * s.words));
            if le.is_compressed() || le.host_offset() == 0 {
                continue;
            }
            if le.is_copied() != data_copied(s, clusters, le) {
                wrong = true;
                break;
            }
        }
        if !wrong {
            continue;
        }
        let t = loop {
            let t = s.table(i)?;
            if t.pin() {
                break t;
            }
            std::thread::yield_now();
        };
        for g in 0..s.l2_entries() as usize {
            let w = g * s.words;
            let le = L2Entry(t.entries[w].load(Ordering::Acquire));
            if le.is_compressed() || le.host_offset() == 0 {
                continue;
            }
            let want = data_copied(s, clusters, le);
            if le.is_copied() != want {
                t.store_entry(w, le.with_copied(want));
                t.mark_dirty(w);
            }
        }
        t.unpin();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::super::bench_support::Image;
    use super::super::header;
    use super::super::testing::{assert_qemu_img_check, pattern, qemu_img_create};

    /// Power-loss regression (found by tests/power_loss.rs): a crash left a refcount table
    /// entry pointing at a new refcount block that never reached the disk (past the end of
    /// the file). The image is dirty, so its refcounts are rebuilt anyway: the open repairs it
    /// instead of refusing it, and the data is intact.
    #[test]
    fn dirty_image_with_a_refcount_table_entry_past_eof_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.qcow2");
        qemu_img_create(&path, "cluster_size=65536", "16M");
        let mut img = Image::open(&path, false).unwrap();
        img.write(0, &mut pattern(0, 128 << 10)).unwrap();
        img.close().unwrap();
        drop(img);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut h = [0u8; 8];
        f.read_exact_at(&mut h, header::OFF_REFCOUNT_TABLE).unwrap();
        let rt = u64::from_be_bytes(h);
        let len = f.metadata().unwrap().len();
        // Entry 1 (clusters 32768..) -> a cluster well past the end; and the dirty bit.
        f.write_all_at(
            &(len + (1 << 20)).next_multiple_of(1 << 16).to_be_bytes(),
            rt + 8,
        )
        .unwrap();
        f.read_exact_at(&mut h, header::OFF_INCOMPATIBLE).unwrap();
        let inc = u64::from_be_bytes(h) | super::super::header::INCOMPAT_DIRTY;
        f.write_all_at(&inc.to_be_bytes(), header::OFF_INCOMPATIBLE)
            .unwrap();
        drop(f);
        let mut img = Image::open(&path, false).expect("a dirty image is repaired, not refused");
        let mut back = vec![0u8; 128 << 10];
        img.read(0, &mut back).unwrap();
        assert!(back == pattern(0, 128 << 10), "data lost by the repair");
        img.close().unwrap();
        drop(img);
        assert_qemu_img_check(&path, false);
    }
}

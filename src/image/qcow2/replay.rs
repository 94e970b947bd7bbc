//! Replaying the mapping journal (journal.rs) onto a dirty image at open.
//!
//! The daemon that left the image dirty completed requests whose mapping changes were in its
//! memory and its journal but not in the image. After the refcounts have been rebuilt from the
//! image as found, each guest cluster the journal names gets the value of its last record:
//! the new entry's host cluster, found unreferenced by the rebuild, is claimed; the old entry's
//! clusters are unreferenced after the flush that writes the new entry, as for any unmapping.
//! The caller then writes everything back (refcounts included) and clears the dirty bit.
//!
//! The journal is this daemon's own private file, but it is checked like image metadata: a
//! record that names a cluster outside the disk, does not decode, or maps a host cluster that
//! lies outside the file, holds metadata or is referenced by something else is skipped with an
//! error line, and the image keeps that cluster's old mapping.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use log::error;

use super::alloc::HostCluster;
use super::journal::Record;
use super::l2::{BadEntry, Entry, L2Entry, SubclusterBitmap};
use super::rebuild::OpenError;
use super::{lock, GuestOffset, Qcow2Shared};

/// Applies the last record of each guest cluster; returns how many were applied.
pub fn apply(s: &Qcow2Shared, records: &[Record]) -> Result<usize, OpenError> {
    let mut last: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for r in records {
        last.insert(r.cluster, (r.entry, r.bitmap));
    }
    let mut applied = 0;
    for (&cluster, &(word, bitmap)) in &last {
        let entry = Entry::new(L2Entry(word), SubclusterBitmap(bitmap));
        match apply_one(s, cluster, entry)? {
            Ok(()) => applied += 1,
            Err(why) => error!(
                "{}: journal record for guest cluster {cluster} ({word:#x}, {bitmap:#x}) \
                 skipped: {why}",
                s.path.display()
            ),
        }
    }
    Ok(applied)
}

/// Why a journal record is not applied (it is skipped with this message in the log).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Refused {
    /// The guest cluster's byte offset does not fit in 64 bits.
    #[error("guest cluster out of range")]
    GuestRange,
    /// The guest cluster lies beyond the L1 table.
    #[error("outside the L1 table")]
    OutsideL1,
    /// A reservation or compressed entry: the daemon never journals those.
    #[error("not an entry the daemon writes")]
    NotWritten,
    /// A subcluster bitmap word in an image without extended L2 entries.
    #[error("bitmap word without extended L2")]
    BitmapWithoutExtendedL2,
    /// The entry itself is malformed.
    #[error(transparent)]
    Entry(#[from] BadEntry),
    /// A newly referenced host cluster (index) lies outside the file.
    #[error("host cluster {0} outside the file")]
    OutsideFile(u64),
    /// A newly referenced host cluster (index) holds metadata.
    #[error("host cluster {0} holds metadata")]
    Metadata(u64),
    /// A newly referenced host cluster (index) is referenced by another entry.
    #[error("host cluster {0} is referenced already")]
    Referenced(u64),
    /// A newly referenced host cluster (index) could not be claimed.
    #[error("host cluster {0} is not free")]
    NotFree(u64),
}

/// Applies one record; the inner error says why a record is refused.
fn apply_one(
    s: &Qcow2Shared,
    cluster: u64,
    new_entry: Entry,
) -> Result<Result<(), Refused>, OpenError> {
    let n = s.l2_entries();
    let Some(guest) = cluster.checked_mul(s.cluster_size()) else {
        return Ok(Err(Refused::GuestRange));
    };
    if cluster / n >= s.l1_len.load(Ordering::Acquire) as u64 {
        return Ok(Err(Refused::OutsideL1));
    }
    let Entry { word, bitmap } = new_entry;
    if word.is_reserved() || word.is_compressed() {
        return Ok(Err(Refused::NotWritten));
    }
    if !s.extended && bitmap != SubclusterBitmap::EMPTY {
        return Ok(Err(Refused::BitmapWithoutExtendedL2));
    }
    if let Err(m) = s.check_entry(new_entry) {
        return Ok(Err(m.into()));
    }
    let (i, j, _) = s.locate(GuestOffset(guest));
    let table = s.table(i)?;
    let old_entry = s.load_entry(&table, j);
    if old_entry == new_entry {
        return Ok(Ok(()));
    }
    let clusters = s.clusters()?;
    let old = s.entry_refs(old_entry.word);
    let new: Vec<HostCluster> = s
        .entry_refs(word)
        .into_iter()
        .filter(|c| !old.contains(c))
        .collect();
    for &c in &new {
        if c.0 == 0 || c.0 >= s.file_clusters {
            return Ok(Err(Refused::OutsideFile(c.0)));
        }
        if clusters.is_meta(c) {
            return Ok(Err(Refused::Metadata(c.0)));
        }
        if clusters.get(c) != 0 {
            return Ok(Err(Refused::Referenced(c.0)));
        }
    }
    for (k, &c) in new.iter().enumerate() {
        if !clusters.claim(c) {
            // Not free after all (cannot happen after the checks above): give back what
            // this record claimed.
            for &d in &new[..k] {
                let _ = clusters.unref(d);
            }
            return Ok(Err(Refused::NotFree(c.0)));
        }
    }
    if !table.pin() {
        // A table just loaded at open is never evicted before it is used.
        return Err(OpenError::Invalid(
            "L2 table evicted during journal replay".into(),
        ));
    }
    let w = j * s.words;
    table.mark_dirty(w);
    if s.extended {
        table.store_bitmap(w, bitmap);
    }
    table.store_entry(w, word);
    table.unpin();
    s.meta_dirty.store(true, Ordering::Release);
    let gone: Vec<HostCluster> = old
        .into_iter()
        .filter(|c| !s.entry_refs(word).contains(c))
        .collect();
    if !gone.is_empty() {
        lock(&s.pending).extend(gone);
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::bench_support::Image;
    use super::super::testing::{assert_qemu_img_check, pattern, qemu_img, qemu_img_create};
    use super::super::JournalMode;

    const CS: u64 = 64 << 10;

    /// What a guest range should read as after the crash.
    enum Want {
        Data(u64),
        Zeros,
        Backing,
    }

    fn backing_byte(off: u64) -> u8 {
        (off / 512) as u8 ^ 0x5a
    }

    fn check(img: &mut Image, ranges: &[(u64, u64, Want)]) -> Result<(), String> {
        for (off, len, want) in ranges {
            let mut got = vec![0u8; *len as usize];
            img.read(*off, &mut got).map_err(|e| e.to_string())?;
            let exp: Vec<u8> = match want {
                Want::Data(tag) => pattern(off ^ tag, *len as usize),
                Want::Zeros => vec![0; *len as usize],
                Want::Backing => (0..*len).map(|k| backing_byte(off + k)).collect(),
            };
            if got != exp {
                return Err(format!("{off:#x}+{len:#x} differs"));
            }
        }
        Ok(())
    }

    /// Writes a raw backing file whose every sector carries `backing_byte`.
    fn make_backing(path: &Path, size: u64) {
        let data: Vec<u8> = (0..size).map(backing_byte).collect();
        std::fs::write(path, data).unwrap();
    }

    /// A daemon crash (no flush, no close: the image stays dirty and the journal keeps its
    /// records) after changes of every kind on `path`, then a reopen: everything the
    /// requests completed with must read back, and the image must be clean and leak-free
    /// after a close. The same crash state opened without the journal must lose some of
    /// it (otherwise this test could not tell replay from luck).
    fn crash_then_replay(path: &Path, backing: bool) {
        let over = if backing { Want::Backing } else { Want::Zeros };
        let mut img = Image::open_journaled(path, false, &JournalMode::Default).unwrap();
        let journal = img.journal_path().expect("journal in /dev/shm");
        // Flushed: two whole clusters of data.
        img.write(0, &mut pattern(0, 2 * CS as usize)).unwrap();
        img.write(8 * CS, &mut pattern(8 * CS, CS as usize))
            .unwrap();
        img.flush().unwrap();
        // Completed but not flushed: a partial allocating write (copy-on-write from the
        // backing file, or zeros), a multi-cluster write, a discard and a write-zeroes of
        // flushed data, and an overwrite of a discarded cluster.
        img.write(3 * CS + 512, &mut pattern((3 * CS + 512) ^ 1, 4096))
            .unwrap();
        img.write(5 * CS, &mut pattern((5 * CS) ^ 2, 2 * CS as usize))
            .unwrap();
        img.discard(0, CS).unwrap();
        img.write_zeroes(8 * CS, CS).unwrap();
        img.write(CS, &mut pattern(CS ^ 3, 4096)).unwrap();
        img.discard(CS, CS).unwrap();
        img.write(CS + 8192, &mut pattern((CS + 8192) ^ 4, 512))
            .unwrap();
        let want = [
            (0, CS, Want::Zeros),
            (CS, 8192, Want::Zeros),
            (CS + 8192, 512, Want::Data(4)),
            (2 * CS, CS, over_copy(&over)),
            (3 * CS, 512, over_copy(&over)),
            (3 * CS + 512, 4096, Want::Data(1)),
            (3 * CS + 4608, CS - 4608, over_copy(&over)),
            (5 * CS, 2 * CS, Want::Data(2)),
            (8 * CS, CS, Want::Zeros),
        ];
        check(&mut img, &want).expect("before the crash");
        std::mem::forget(img);
        // The premise: the image alone (a copy has another inode, so no journal) lacks them.
        let copy = path.with_extension("copy");
        std::fs::copy(path, &copy).unwrap();
        {
            let mut c = Image::open_journaled(&copy, false, &JournalMode::Off).unwrap();
            assert!(
                check(&mut c, &want).is_err(),
                "the unflushed changes were in the image already: the test proves nothing"
            );
        }
        let mut img = Image::open_journaled(path, false, &JournalMode::Default).unwrap();
        check(&mut img, &want).expect("after replay");
        img.close().unwrap();
        drop(img);
        assert!(!journal.exists(), "a clean close removes the journal");
        assert_qemu_img_check(path, false);
        let mut img = Image::open_journaled(path, false, &JournalMode::Off).unwrap();
        check(&mut img, &want).expect("after a clean close and reopen");
    }

    fn over_copy(w: &Want) -> Want {
        match w {
            Want::Backing => Want::Backing,
            _ => Want::Zeros,
        }
    }

    #[test]
    fn replay_restores_completed_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        qemu_img_create(&p, "cluster_size=65536", "64M");
        crash_then_replay(&p, false);
    }

    #[test]
    fn replay_over_a_raw_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.raw");
        make_backing(&b, 64 << 20);
        let p = dir.path().join("o.qcow2");
        qemu_img_create(
            &p,
            &format!("backing_file={},backing_fmt=raw", b.display()),
            "64M",
        );
        crash_then_replay(&p, true);
    }

    #[test]
    fn replay_over_a_qcow2_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("b.raw");
        make_backing(&raw, 64 << 20);
        let b = dir.path().join("b.qcow2");
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            b.to_str().unwrap(),
        ]);
        let p = dir.path().join("o.qcow2");
        qemu_img_create(
            &p,
            &format!("backing_file={},backing_fmt=qcow2", b.display()),
            "64M",
        );
        crash_then_replay(&p, true);
    }

    #[test]
    fn replay_with_extended_l2_over_a_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.raw");
        make_backing(&b, 64 << 20);
        let p = dir.path().join("x.qcow2");
        qemu_img_create(
            &p,
            &format!(
                "extended_l2=on,backing_file={},backing_fmt=raw",
                b.display()
            ),
            "64M",
        );
        crash_then_replay(&p, true);
    }

    #[test]
    fn replay_over_compressed_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("z.raw");
        make_backing(&raw, 64 << 20);
        let p = dir.path().join("c.qcow2");
        // Every cluster compressed (the backing pattern compresses well): first writes copy
        // on write and free them; what was never written reads as that pattern.
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        crash_then_replay(&p, true);
    }

    /// A journal record that maps a metadata cluster (a damaged or foreign journal) is
    /// skipped: the image keeps its old mapping and stays consistent.
    #[test]
    fn a_record_mapping_metadata_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.qcow2");
        qemu_img_create(&p, "cluster_size=65536", "64M");
        let mut img = Image::open_journaled(&p, false, &JournalMode::Default).unwrap();
        img.write(0, &mut pattern(0, 4096)).unwrap();
        img.flush().unwrap();
        // Guest cluster 2 -> host cluster 1 (the refcount table of a fresh qemu-img image).
        let f = std::fs::File::open(&p).unwrap();
        let journal = super::super::journal::Journal::open(Path::new("/dev/shm"), &f, 16)
            .unwrap()
            .journal;
        std::mem::forget(img);
        // Append a hostile record after the ones the crashed daemon left.
        let rec = super::Record {
            cluster: 2,
            entry: super::super::l2::COPIED | CS,
            bitmap: 0,
        };
        journal.force_append_for_test(rec);
        drop(journal);
        let mut img = Image::open_journaled(&p, false, &JournalMode::Default).unwrap();
        assert_eq!(img.lookup(2 * CS).unwrap(), None, "hostile record applied");
        let mut back = vec![0u8; 4096];
        img.read(0, &mut back).unwrap();
        assert_eq!(back, pattern(0, 4096));
        img.close().unwrap();
        drop(img);
        assert_qemu_img_check(&p, false);
    }
}

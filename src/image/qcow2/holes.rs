//! The holes of a clean image: clusters whose refcount on disk is zero when the image is
//! opened for writing.
//!
//! A clean open trusts the refcounts (reading every L2 table would cost the open time the
//! repair path pays). But in a corrupt image a cluster that an L2 entry still maps can have
//! refcount zero, and handing it out would overwrite that guest data. So the holes are taken
//! out of the free bitmap at open ([`Clusters::take_holes`](super::alloc::Clusters)), and a
//! background thread reads every L2 table (active and snapshot) from the file and drops from
//! the set each hole some entry references, logging it as corruption. The rest go back into
//! the free bitmap at the next flush after the check ([`HoleCheck::take_checked`]); until
//! then new clusters come from the end of the file. A referenced hole is never reused: the
//! table that maps it is refused when it is loaded ("refcount is 0"), as before, and
//! `qemu-img check -r all` repairs the image.
//!
//! Nothing else allocates from the holes while the check runs, so what it reads is either the
//! open-time state or a newer one that references only clusters that were not holes; a table
//! torn by a concurrent write-back mixes the two. Either way every reference to a hole that
//! existed at open is seen.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};

use super::l2::{self, L1Entry};

/// The result slot of one image's hole check.
#[derive(Default)]
pub struct HoleCheck {
    ready: AtomicBool,
    checked: Mutex<Option<Vec<u64>>>,
}

impl HoleCheck {
    /// The holes found unreferenced (a bitmap, bit `c` of word `c / 64`), once the check has
    /// finished; `None` before that and after the first call that got them.
    pub fn take_checked(&self) -> Option<Vec<u64>> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        super::lock(&self.checked).take()
    }
}

/// What the check needs to decode L2 tables, copied from the image at open.
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (two words per guest cluster).
    pub extended: bool,
    /// Data clusters live in an external data file (not refcounted here).
    pub data_file: bool,
}

/// Starts the check of `holes` against the L2 tables the L1 tables `l1s` map, in a thread
/// reading `file`; the result lands in `out`. An I/O error ends the check without a result:
/// the holes then stay out of use for this session (the file only grows a little more).
pub fn spawn(file: File, geo: Geometry, l1s: Vec<Vec<u64>>, holes: Vec<u64>, out: Arc<HoleCheck>) {
    let spawned = std::thread::Builder::new()
        .name("qcow2-holes".into())
        .spawn(move || match check(&file, &geo, &l1s, holes) {
            Ok((checked, found)) => {
                let n: u32 = checked.iter().map(|w| w.count_ones()).sum();
                info!(
                    "qcow2: {n} free cluster(s) checked unreferenced{}",
                    if found > 0 {
                        format!("; {found} referenced cluster(s) with refcount 0 kept out of use")
                    } else {
                        String::new()
                    }
                );
                *super::lock(&out.checked) = Some(checked);
                out.ready.store(true, Ordering::Release);
            }
            Err(e) => warn!("qcow2: checking the free clusters failed ({e}); not reusing them"),
        });
    if let Err(e) = spawned {
        warn!("qcow2: cannot start the free-cluster check ({e}); not reusing free clusters");
    }
}

/// Clears from `holes` every cluster an entry of the tables references; returns the rest
/// and how many were referenced.
fn check(
    file: &File,
    geo: &Geometry,
    l1s: &[Vec<u64>],
    mut holes: Vec<u64>,
) -> std::io::Result<(Vec<u64>, u64)> {
    let cs = 1u64 << geo.cluster_bits;
    let mut found = 0u64;
    let mut hit = |c: u64, holes: &mut Vec<u64>, what: &str| {
        let (w, m) = ((c / 64) as usize, 1u64 << (c % 64));
        if let Some(word) = holes.get_mut(w) {
            if *word & m != 0 {
                *word &= !m;
                found += 1;
                warn!(
                    "qcow2: cluster {:#x} is referenced ({what}) but its refcount is 0: the \
                     image is corrupt ('qemu-img check -r all' repairs it); not reusing it",
                    c << geo.cluster_bits
                );
            }
        }
    };
    let mut buf = vec![0u8; cs as usize];
    for l1 in l1s {
        for &e in l1 {
            let off = L1Entry(e).l2_offset();
            if off == 0 || !off.is_multiple_of(cs) {
                continue;
            }
            hit(off >> geo.cluster_bits, &mut holes, "as an L2 table");
            file.read_exact_at(&mut buf, off)?;
            if geo.data_file {
                continue;
            }
            for entry in l2::table_entries(&buf, geo.extended) {
                for c in entry.word.host_clusters(geo.cluster_bits, geo.extended) {
                    hit(c, &mut holes, "by an L2 entry");
                }
            }
        }
    }
    Ok((holes, found))
}

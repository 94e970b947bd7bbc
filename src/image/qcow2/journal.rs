//! The mapping journal: L2 entry changes that requests have completed with but that no flush
//! has written to the image yet, kept where they survive a crash of the daemon process.
//!
//! # Why
//!
//! Guest data reaches the image file (the host page cache) before a request completes, but
//! a new L2 entry lives only in the daemon's memory until the next flush writes the metadata
//! back. A daemon killed in between (SIGKILL, abort, OOM kill) under a guest that keeps
//! running would lose the mapping of writes the guest was told had completed: they would read
//! back as their old contents. What a host crash may lose is governed by FLUSH; a crash of the
//! daemon alone must lose nothing completed.
//!
//! # Where
//!
//! The journal is a small file in a memory-backed file system (tmpfs or ramfs; `/dev/shm` by
//! default), shared-mapped by the daemon. A record is a few stores into that mapping, so a
//! mapping change costs no I/O and no system call. The file outlives the process, so a
//! restarted daemon finds it; it does not outlive the host, and it must not: after a power
//! loss the data a record maps may not have reached the disk, and only what a FLUSH made
//! durable may be trusted. That is why a directory on persistent storage is refused.
//!
//! # Format
//!
//! One header page, then a ring of [`CAPACITY`] 32-byte records: the record's sequence
//! number, the guest cluster index, the entry word and the extended-L2 bitmap word (0 without
//! extended L2). Sequence numbers start at 1; record `s` lives in slot `s % CAPACITY`, and its
//! sequence word is stored last (Release), so a slot whose sequence word is not `s` holds no
//! record `s` (never written, or an older lap's record).
//!
//! - `cursor` (in the header): the next sequence number to hand out.
//! - `head`: every record below it describes a change that a completed flush has made durable
//!   in the image. Records in `[head, cursor)` whose sequence word is set are the journal.
//!
//! # Protocol (see `super` for the write path)
//!
//! A writer takes a [`Credit`] before it reserves an entry (a credit may wait for a flush to
//! free room, so it must never be taken while holding a reservation a flush waits for). With
//! the entry reserved and the new value computed, it marks the table dirty, then appends the
//! record ([`Credit::commit`]), then stores the entry (which ends the reservation), and only
//! then completes the request. Records of one entry are therefore in the order of its changes.
//!
//! A flush reads `cursor` first ([`Journal::cursor`]), waits until every record below it is
//! committed ([`Journal::wait_committed`]), and then snapshots the dirty tables: a record
//! below that cursor was appended after its table was marked dirty, so the snapshot holds its
//! change. When the flush has completed, [`Journal::advance`] moves `head` there.
//!
//! Replay ([`Journal::open`] returns the records) applies, per guest cluster, the value of its
//! last record on top of the image as found on disk: records are whole entry values, not
//! deltas, so a record whose change a flush already wrote is applied again harmlessly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Records in the ring.
pub const CAPACITY: u64 = 1 << 15;
/// Bytes of one record.
const RECORD: usize = 32;
/// Bytes of the header (one page; records start after it).
const HEADER: usize = 4096;
/// Total size of the journal file.
const FILE_LEN: usize = HEADER + CAPACITY as usize * RECORD;
/// "VUBJRNL1".
const MAGIC: u64 = 0x5655_424a_524e_4c31;
const VERSION: u64 = 1;

/// Header words (index of each u64 in the header page).
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_DEV: usize = 2;
const H_INO: usize = 3;
const H_BIRTH: usize = 4;
const H_CLUSTER_BITS: usize = 5;
const H_CAPACITY: usize = 6;
const H_HEAD: usize = 7;
const H_CURSOR: usize = 8;

/// `statfs` magic numbers of the memory-backed file systems a journal may live on.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6_u32 as i64;

/// One journaled change: guest cluster `cluster` has entry (`entry`, `bitmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Guest cluster index (guest offset >> cluster_bits).
    pub cluster: u64,
    /// The L2 entry's first word.
    pub entry: u64,
    /// The extended L2 subcluster bitmap (0 without extended L2).
    pub bitmap: u64,
}

/// Who an image file is: a journal belongs to exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    /// Birth time in nanoseconds where the file system records one (an inode number can be
    /// reused by a new file; its birth time then differs), else 0.
    birth: u64,
}

impl Identity {
    fn of(file: &File) -> io::Result<Identity> {
        let m = file.metadata()?;
        let birth = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            birth,
        })
    }
}

/// True if `dir` is on tmpfs or ramfs.
pub fn memory_backed(dir: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory for one
    // `statfs` structure, which the call fills in on success.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and initialised the structure.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// A shared mapping of the journal file.
struct Mapping {
    ptr: *mut u8,
}

// SAFETY: the mapping is only accessed through atomics (`word`), which are safe to share
// between threads; the pointer itself is never changed after creation.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File) -> io::Result<Mapping> {
        // SAFETY: maps FILE_LEN bytes of a file we opened read-write and sized to FILE_LEN;
        // the kernel picks the address. The mapping is released in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast() })
    }

    /// The `i`-th 64-bit word of the file.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < FILE_LEN / 8, "journal word {i} out of range");
        // SAFETY: the mapping is FILE_LEN bytes long, page aligned (so every 8-byte word is
        // aligned), lives as long as `self`, and is only ever accessed through atomics.
        unsafe { &*self.ptr.add(i * 8).cast::<AtomicU64>() }
    }

    fn header(&self, w: usize) -> &AtomicU64 {
        self.word(w)
    }

    /// Word `k` (0..4) of the slot of sequence number `seq`.
    fn slot(&self, seq: u64, k: usize) -> &AtomicU64 {
        let slot = (seq % CAPACITY) as usize;
        self.word((HEADER + slot * RECORD) / 8 + k)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; nothing refers to it any more
        // (words borrow `self`).
        unsafe { libc::munmap(self.ptr.cast(), FILE_LEN) };
    }
}

/// The journal of one writable qcow2 image.
pub struct Journal {
    path: PathBuf,
    map: Mapping,
    id: Identity,
    cluster_bits: u32,
    /// Record slots that may still be claimed: `CAPACITY - (cursor - head)` minus the credits
    /// handed out and not yet committed or returned.
    avail: AtomicI64,
    /// Keeps the file open for the journal's lifetime.
    _file: File,
}

/// What [`Journal::open`] found.
pub struct Opened {
    /// The journal; it accepts records once [`Journal::start`] has been called.
    pub journal: Journal,
    /// Records a previous daemon left for this image, in order (empty if none, or if the file
    /// was written for another image).
    pub recovered: Vec<Record>,
}

impl Journal {
    /// Opens (or creates) the journal of `image` in `dir` and reads the records an earlier
    /// daemon left for the same image. Nothing is written: the records stay in the file until
    /// [`Journal::start`], so a crash before they are durable in the image finds them again.
    pub fn open(dir: &Path, image: &File, cluster_bits: u32) -> io::Result<Opened> {
        if !memory_backed(dir)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not on tmpfs or ramfs: the mapping journal must not outlive the \
                     host, whose crash may lose the data it describes",
                    dir.display()
                ),
            ));
        }
        let id = Identity::of(image)?;
        let path = dir.join(format!("vhost-user-blk-{:x}-{}.journal", id.dev, id.ino));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let m = file.metadata()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !m.is_file() || m.uid() != me || m.mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} exists but is not a private file of this user",
                    path.display()
                ),
            ));
        }
        let sized = m.len() == FILE_LEN as u64;
        if !sized {
            file.set_len(FILE_LEN as u64)?;
        }
        let j = Journal {
            path,
            map: Mapping::new(&file)?,
            id,
            cluster_bits,
            avail: AtomicI64::new(0),
            _file: file,
        };
        let recovered = if sized { j.read_records() } else { Vec::new() };
        Ok(Opened {
            journal: j,
            recovered,
        })
    }

    /// The records of a journal written for this image, in order; empty if the header does
    /// not match.
    fn read_records(&self) -> Vec<Record> {
        let h = |w| self.map.header(w).load(Ordering::Acquire);
        if h(H_MAGIC) != MAGIC
            || h(H_VERSION) != VERSION
            || h(H_DEV) != self.id.dev
            || h(H_INO) != self.id.ino
            || h(H_BIRTH) != self.id.birth
            || h(H_CLUSTER_BITS) != u64::from(self.cluster_bits)
            || h(H_CAPACITY) != CAPACITY
        {
            return Vec::new();
        }
        let (head, cursor) = (h(H_HEAD), h(H_CURSOR));
        if head == 0 || cursor < head || cursor - head > CAPACITY {
            return Vec::new();
        }
        (head..cursor)
            .filter(|&s| self.map.slot(s, 0).load(Ordering::Acquire) == s)
            .map(|s| Record {
                cluster: self.map.slot(s, 1).load(Ordering::Acquire),
                entry: self.map.slot(s, 2).load(Ordering::Acquire),
                bitmap: self.map.slot(s, 3).load(Ordering::Acquire),
            })
            .collect()
    }

    /// Empties the journal (whatever it held is durable in the image, or belonged to another
    /// image) and starts accepting records.
    pub fn start(&self) {
        let hw = |w, v| self.map.header(w).store(v, Ordering::Release);
        // Invalidate the header first: a crash in the middle leaves no journal, not a mix.
        hw(H_MAGIC, 0);
        // Sequence numbers restart at 1 and a slot is trusted when its sequence word equals
        // the number looked for: clear them all.
        for s in 0..CAPACITY {
            self.map.slot(s, 0).store(0, Ordering::Relaxed);
        }
        hw(H_VERSION, VERSION);
        hw(H_DEV, self.id.dev);
        hw(H_INO, self.id.ino);
        hw(H_BIRTH, self.id.birth);
        hw(H_CLUSTER_BITS, u64::from(self.cluster_bits));
        hw(H_CAPACITY, CAPACITY);
        hw(H_HEAD, 1);
        hw(H_CURSOR, 1);
        hw(H_MAGIC, MAGIC);
        self.avail.store(CAPACITY as i64, Ordering::Release);
    }

    /// Takes one record slot for a change about to be made, if the ring has room.
    pub fn try_credit(&self) -> Option<Credit<'_>> {
        if self.avail.fetch_sub(1, Ordering::AcqRel) > 0 {
            Some(Credit { journal: self })
        } else {
            self.avail.fetch_add(1, Ordering::AcqRel);
            None
        }
    }

    /// True once the ring is three quarters full: time to flush before writers wait.
    pub fn pressure(&self) -> bool {
        self.avail.load(Ordering::Acquire) < (CAPACITY / 4) as i64
    }

    /// The next sequence number to be handed out. A flush reads it before it snapshots the
    /// dirty tables.
    pub fn cursor(&self) -> u64 {
        self.map.header(H_CURSOR).load(Ordering::Acquire)
    }

    /// Waits until every record below `upto` has been committed (appending takes a few
    /// stores, no I/O).
    pub fn wait_committed(&self, upto: u64) {
        let head = self.map.header(H_HEAD).load(Ordering::Acquire);
        for s in head..upto {
            while self.map.slot(s, 0).load(Ordering::Acquire) != s {
                std::thread::yield_now();
            }
        }
    }

    /// A completed flush made every change recorded below `to` durable: drop those records.
    pub fn advance(&self, to: u64) {
        let old = self.map.header(H_HEAD).fetch_max(to, Ordering::AcqRel);
        if to > old {
            self.avail.fetch_add((to - old) as i64, Ordering::AcqRel);
        }
    }

    /// Records not yet made durable by a flush.
    pub fn pending(&self) -> u64 {
        self.cursor() - self.map.header(H_HEAD).load(Ordering::Acquire)
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file (after a clean close, when it holds nothing).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("removing {}: {e}", self.path.display());
        }
    }

    /// Appends a record without a credit, as a crashed daemon could have left it.
    #[cfg(test)]
    pub fn force_append_for_test(&self, r: Record) {
        self.append(r);
    }

    fn append(&self, r: Record) {
        let s = self.map.header(H_CURSOR).fetch_add(1, Ordering::AcqRel);
        self.map.slot(s, 1).store(r.cluster, Ordering::Relaxed);
        self.map.slot(s, 2).store(r.entry, Ordering::Relaxed);
        self.map.slot(s, 3).store(r.bitmap, Ordering::Relaxed);
        // Last, with Release: whoever sees the sequence word sees the fields.
        self.map.slot(s, 0).store(s, Ordering::Release);
    }
}

/// The right to append one record ([`Journal::try_credit`]); returned to the ring if dropped
/// unused.
pub struct Credit<'a> {
    journal: &'a Journal,
}

impl Credit<'_> {
    /// Appends the record. Call it with the entry still reserved and its table already
    /// marked dirty, before storing the new entry (see the module documentation).
    pub fn commit(self, r: Record) {
        self.journal.append(r);
        std::mem::forget(self);
    }

    /// Keeps the slot across an asynchronous step, without borrowing the journal: the
    /// returned token must go back through [`Journal::redeem`] (to commit, or to give the
    /// slot back by dropping the credit).
    pub fn hold(self) -> HeldCredit {
        std::mem::forget(self);
        HeldCredit(())
    }
}

/// A record slot taken with [`Journal::try_credit`] and kept by [`Credit::hold`].
#[must_use = "a held credit must be redeemed, or its slot is lost until the next flush"]
#[derive(Debug)]
pub struct HeldCredit(());

impl Journal {
    /// The credit `held` stands for, again.
    pub fn redeem(&self, held: HeldCredit) -> Credit<'_> {
        let HeldCredit(()) = held;
        Credit { journal: self }
    }
}

impl Drop for Credit<'_> {
    fn drop(&mut self) {
        self.journal.avail.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> File {
        let p = dir.join("img");
        std::fs::write(&p, b"x").unwrap();
        File::open(&p).unwrap()
    }

    fn shm() -> PathBuf {
        PathBuf::from("/dev/shm")
    }

    #[test]
    fn records_survive_reopen_and_start_empties() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let o = Journal::open(&shm(), &img, 16).unwrap();
        assert!(o.recovered.is_empty());
        let j = o.journal;
        j.start();
        for k in 0..5u64 {
            j.try_credit().unwrap().commit(Record {
                cluster: k,
                entry: 100 + k,
                bitmap: k,
            });
        }
        // A credit taken but never committed is not a record.
        let c = j.try_credit().unwrap();
        let c0 = j.cursor();
        j.advance(3);
        std::mem::forget(c);
        let path = j.path().to_owned();
        drop(j);
        let o = Journal::open(&shm(), &img, 16).unwrap();
        let got: Vec<u64> = o.recovered.iter().map(|r| r.cluster).collect();
        assert_eq!(got, vec![2, 3, 4], "records from head on");
        assert_eq!(c0, 6);
        // Another cluster size: not this journal.
        let o2 = Journal::open(&shm(), &img, 12).unwrap();
        assert!(o2.recovered.is_empty());
        drop(o2);
        o.journal.start();
        assert_eq!(o.journal.pending(), 0);
        drop(o);
        let o = Journal::open(&shm(), &img, 16).unwrap();
        assert!(o.recovered.is_empty(), "started journals hold nothing");
        o.journal.remove();
        assert!(!path.exists());
    }

    #[test]
    fn credits_bound_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let j = Journal::open(&shm(), &img, 16).unwrap().journal;
        assert!(j.try_credit().is_none(), "no records before start");
        j.start();
        let mut held = Vec::new();
        while let Some(c) = j.try_credit() {
            held.push(c);
        }
        assert_eq!(held.len() as u64, CAPACITY);
        assert!(j.pressure());
        for (k, c) in held.into_iter().enumerate() {
            c.commit(Record {
                cluster: k as u64,
                entry: 1,
                bitmap: 0,
            });
        }
        assert!(j.try_credit().is_none());
        let c0 = j.cursor();
        j.wait_committed(c0);
        j.advance(c0);
        assert!(!j.pressure());
        assert!(j.try_credit().is_some());
        j.remove();
    }

    #[test]
    fn refuses_persistent_directories() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let img = image(dir.path());
        assert!(
            !memory_backed(dir.path()).unwrap(),
            "test premise: the source tree is on persistent storage"
        );
        assert!(memory_backed(&shm()).unwrap(), "/dev/shm is tmpfs");
        let e = Journal::open(dir.path(), &img, 16).err().unwrap();
        assert!(e.to_string().contains("tmpfs"), "{e}");
    }
}

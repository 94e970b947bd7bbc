//! Image locks compatible with QEMU's, so that QEMU, qemu-img, qemu-storage-daemon and this
//! daemon see each other's use of an image.
//!
//! # What QEMU does (block/file-posix.c, include/block/block-common.h)
//!
//! QEMU's block layer gives every user of a node *permissions* it takes and *shared
//! permissions* it allows others to take, from four bits (`BLK_PERM_*`, block-common.h):
//!
//! | bit | value | name |
//! | --- | --- | --- |
//! | 0 | `0x01` | consistent read |
//! | 1 | `0x02` | write |
//! | 2 | `0x04` | write unchanged |
//! | 3 | `0x08` | resize |
//!
//! (QEMU 6.1 and older also lock bytes 104/204 for a fifth bit, "graph mod", since removed;
//! nothing checks them any more.)
//!
//! The file driver (file-posix.c, `raw_apply_lock_bytes`, `raw_check_lock_bytes`) mirrors them
//! onto the image file as one-byte *shared* (`F_RDLCK`) open-file-description locks
//! (`F_OFD_SETLK`), which conflict between processes and between separate `open()`s, but not
//! between `dup`s of one descriptor:
//!
//! - byte `100 + i` (`RAW_LOCK_PERM_BASE`) is locked while the holder *has* permission bit i;
//! - byte `200 + i` (`RAW_LOCK_SHARED_BASE`) is locked while the holder does *not share* bit i.
//!
//! Bytes below 100 are left to libvirt (it uses byte 0). Because every lock is a shared lock,
//! taking one never fails; a conflict is found by testing: after locking its own bytes, an
//! opener asks `F_OFD_GETLK` whether a write lock could be placed on
//!
//! - byte `200 + i` for each permission i it wants: someone else refuses to share it
//!   ("Failed to get \"write\" lock");
//! - byte `100 + i` for each permission i it does not share: someone else has it
//!   ("Failed to get shared \"write\" lock").
//!
//! Locking first and testing second means two processes opening at the same moment can both
//! fail, but never both succeed. When the permissions change, the union of old and new is
//! locked before the test, and the bytes no longer needed are released only after it passed
//! (so a failed change leaves the old locks as they were).
//!
//! # What we lock, and why
//!
//! We hold what a running QEMU guest (`-drive ... -device virtio-blk-pci`) holds on the same
//! files. That follows from the permissions QEMU's block layer derives (block.c:
//! `bdrv_default_perms_for_storage` for image and data files, `bdrv_default_perms_for_cow` for
//! backing files, `raw_child_perm` in raw-format.c) from what the device asks for
//! (`blkconf_apply_backend_options`: consistent read, plus write unless read-only; shares
//! consistent read, write unchanged and resize, not write). Measured with QEMU 10.0 from
//! `/proc/locks` and checked against our daemon by tests/image_locks.rs:
//!
//! | file | permissions | not shared | bytes |
//! | --- | --- | --- | --- |
//! | raw image, writable | consistent read, write | write | 100, 101, 201 |
//! | raw image, read-only | consistent read | write | 100, 201 |
//! | qcow2 image, writable | consistent read, write, resize | write, resize | 100, 101, 103, 201, 203 |
//! | qcow2 image, read-only | consistent read | write, resize | 100, 201, 203 |
//! | external data file | as its qcow2 image | as its qcow2 image | as its qcow2 image |
//! | backing file (raw or qcow2) | consistent read | write, resize | 100, 201, 203 |
//!
//! The qcow2 image takes resize because its driver may grow the file to allocate clusters; a
//! raw image does not (the guest cannot change its size; QEMU takes resize only for the moment
//! of a `block_resize`, and so does nothing here: byte 101 already keeps every other writer
//! out). Consequences, the same as with a QEMU guest:
//!
//! - Serving writable, byte 201 makes every opener that wants to write fail: QEMU,
//!   qemu-storage-daemon, a second daemon, `qemu-img snapshot/commit/resize` ("Failed to get
//!   \"write\" lock"); byte 101 makes every opener that does not share write fail: a reader
//!   such as `qemu-img info/check` of a qcow2 image ("Failed to get shared \"write\" lock").
//!   `qemu-img info -U` shares everything and tests nothing, so it works. (`qemu-img info` and
//!   `check` open a *raw* image with no permissions at all, so they test no byte and work on
//!   a raw image a QEMU guest is writing too; nothing we could lock would stop them.)
//! - Serving read-only, only byte 201 (and 203 for qcow2) refuses others: other readers
//!   (qemu-img info, a read-only QEMU or daemon) are allowed, writers are refused.
//! - Backing files refuse writers (`qemu-img commit` into them, a writable open) while anyone
//!   can read them, including other overlays on the same base.
//!
//! # Lifetime and later changes
//!
//! A lock belongs to the open file description it was taken on: it lasts until the last
//! descriptor of that description (the image's, a queue's `dup`, or the [`ImageLock`]'s own
//! `dup`) is closed, and the kernel drops it when the process dies. So the locks of an image
//! last exactly as long as the image is open, with no bookkeeping. [`ImageLock`] keeps a `dup`
//! to change them later: [`ImageLocks::downgrade`] keeps only consistent read and shares
//! everything (what a migration source must hold so that the destination can take the write
//! lock), [`ImageLocks::deactivate`] drops everything (what QEMU holds on an inactive image:
//! a migration source after handover, an `-incoming` destination), and
//! [`ImageLocks::activate`] takes the serving permissions back, or fails and changes nothing
//! if someone else holds them now.
//!
//! # How the files get locked
//!
//! The files are locked where they are opened (raw.rs; qcow2: the image, its backing files
//! and its data file), right after `open()` and before anything is read or written: a dirty
//! qcow2 is repaired at open, which must not happen to an image someone else is using. Those
//! places call [`claim`]; it locks only inside [`with_locks`], which the daemon's
//! [`super::format::open_image_locked`] wraps around the whole open, and hands back every
//! lock taken as one [`ImageLocks`]. The scope is per thread and implicit so that the qcow2
//! engine needs no extra parameter threaded through its recursive opens; an open outside a
//! scope (the library's tests, fuzzers, benchmarks) takes no locks.
//!
//! # `--locking`
//!
//! QEMU's `locking=on|off|auto` option, default `auto`. QEMU's `auto` locks when the kernel
//! has OFD locks (Linux >= 3.15) and silently does not otherwise; its `on` then falls back to
//! POSIX locks, which any `close()` of any descriptor of the file in the process drops. We
//! do not use those: `auto` without OFD locks warns and runs unlocked, `on` without them is an
//! error. A file system that refuses the locks (`ENOLCK`, e.g. NFS without a lock manager)
//! fails the open in both modes, as with QEMU, with a message pointing at `--locking off`.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::error::{Error, Result, UnknownValue};

/// First byte of the permission bytes (`RAW_LOCK_PERM_BASE` in QEMU's file-posix.c).
pub const PERM_BASE: u64 = 100;
/// First byte of the not-shared permission bytes (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: u64 = 200;

/// `BLK_PERM_CONSISTENT_READ`: reads see a complete, self-consistent disk.
pub const CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`: may change the visible contents.
pub const WRITE: u8 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`: may write without changing the visible contents.
pub const WRITE_UNCHANGED: u8 = 0x04;
/// `BLK_PERM_RESIZE`: may change the size.
pub const RESIZE: u8 = 0x08;
/// `BLK_PERM_ALL`.
pub const ALL: u8 = 0x0f;

/// QEMU's names of the permission bits (`bdrv_perm_names`), used in its messages and ours.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The `locking=` option of QEMU's file driver, as `--locking`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock; fail if the kernel has no OFD locks.
    On,
    /// Do not lock (file systems without OFD locks).
    Off,
    /// Lock if the kernel has OFD locks, else run unlocked with a warning (QEMU's default).
    #[default]
    Auto,
}

impl std::str::FromStr for Locking {
    type Err = UnknownValue;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            "auto" => Ok(Locking::Auto),
            _ => Err(UnknownValue::new("locking mode", s, "on, off or auto")),
        }
    }
}

/// What a file is to the served disk; decides the permissions taken on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A raw image (regular file or block device): the disk itself.
    RawImage {
        /// Served writable.
        writable: bool,
    },
    /// A qcow2 image file: metadata, and the data unless it has an external data file.
    Qcow2Image {
        /// Served writable.
        writable: bool,
    },
    /// A qcow2 image's external data file.
    DataFile {
        /// Its image is served writable.
        writable: bool,
    },
    /// A backing file (raw or qcow2) of a qcow2 image; never written.
    Backing,
}

impl Role {
    /// A qcow2 file of a chain: the served image at the top, a backing file below it.
    pub fn qcow2(top: bool, writable: bool) -> Role {
        if top {
            Role::Qcow2Image { writable }
        } else {
            Role::Backing
        }
    }

    /// A raw image, writable or not.
    pub fn raw(writable: bool) -> Role {
        Role::RawImage { writable }
    }

    /// A qcow2 image's data file, writable with its image or not.
    pub fn data_file(writable: bool) -> Role {
        Role::DataFile { writable }
    }

    /// What the file is called in messages.
    fn noun(self) -> &'static str {
        match self {
            Role::RawImage { .. } | Role::Qcow2Image { .. } => "image",
            Role::DataFile { .. } => "data file",
            Role::Backing => "backing file",
        }
    }
}

/// Permissions taken and shared, as QEMU's `perm`/`shared_perm` bit masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Permissions held (locked at `PERM_BASE + bit`).
    pub perm: u8,
    /// Permissions others may hold (the others are locked at `SHARED_BASE + bit`).
    pub shared: u8,
}

impl Perms {
    /// Holds nothing and shares everything: no byte locked (QEMU's inactive nodes).
    pub const INACTIVE: Perms = Perms {
        perm: 0,
        shared: ALL,
    };

    /// What a QEMU guest holds on a file in this role (see the module documentation).
    pub fn of(role: Role) -> Perms {
        let writing = |writable: bool, extra: u8| {
            if writable {
                CONSISTENT_READ | WRITE | extra
            } else {
                CONSISTENT_READ
            }
        };
        match role {
            Role::RawImage { writable } => Perms {
                perm: writing(writable, 0),
                shared: CONSISTENT_READ | WRITE_UNCHANGED | RESIZE,
            },
            Role::Qcow2Image { writable } | Role::DataFile { writable } => Perms {
                perm: writing(writable, RESIZE),
                shared: CONSISTENT_READ | WRITE_UNCHANGED,
            },
            Role::Backing => Perms {
                perm: CONSISTENT_READ,
                shared: CONSISTENT_READ | WRITE_UNCHANGED,
            },
        }
    }

    /// The same without writing: write and resize are neither held nor refused to others
    /// (what a migration source holds so that the destination can take them).
    pub fn without_write(self) -> Perms {
        Perms {
            perm: self.perm & !(WRITE | RESIZE),
            shared: ALL,
        }
    }

    /// The permission bits not shared.
    pub fn unshared(self) -> u8 {
        !self.shared & ALL
    }

    /// The lock bytes these permissions hold, ascending.
    pub fn bytes(self) -> Vec<u64> {
        Held::of(self).bytes()
    }
}

/// The bits whose bytes one open file description has locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    perm: u8,
    unshared: u8,
}

impl Held {
    fn of(p: Perms) -> Held {
        Held {
            perm: p.perm & ALL,
            unshared: p.unshared(),
        }
    }

    fn union(self, o: Held) -> Held {
        Held {
            perm: self.perm | o.perm,
            unshared: self.unshared | o.unshared,
        }
    }

    fn contains(self, o: Held) -> bool {
        self.union(o) == self
    }

    /// (bit index, byte, is it locked) for every byte QEMU may lock.
    fn slots(self) -> impl Iterator<Item = (usize, u64, bool)> {
        let perm =
            (0..NAMES.len()).map(move |i| (i, PERM_BASE + i as u64, self.perm >> i & 1 == 1));
        let unshared =
            (0..NAMES.len()).map(move |i| (i, SHARED_BASE + i as u64, self.unshared >> i & 1 == 1));
        perm.chain(unshared)
    }

    fn bytes(self) -> Vec<u64> {
        self.slots().filter(|s| s.2).map(|s| s.1).collect()
    }
}

/// `fcntl(F_OFD_SETLK)` of one byte: `F_RDLCK` to lock it (shared), `F_UNLCK` to release it.
fn set_byte(file: &File, byte: u64, kind: libc::c_int) -> io::Result<()> {
    let mut fl = flock(byte, kind);
    // SAFETY: F_OFD_SETLK reads the flock struct through the pointer, which points to a live,
    // fully initialised local; the fd is valid for the lifetime of `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fcntl(F_OFD_GETLK)` for a write lock on one byte: true if another open file description
/// holds a lock there (our own description's locks never conflict with it).
fn byte_taken(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and rewrites the flock struct through the pointer, which
    // points to a live, fully initialised local; the fd is valid for the lifetime of `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type) != libc::F_UNLCK)
}

fn flock(byte: u64, kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (and OFD locks require
    // l_pid to be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Whether the kernel supports OFD locks on this file (`EINVAL` from `F_OFD_GETLK` says it
/// does not know the command).
fn ofd_supported(file: &File) -> bool {
    !matches!(byte_taken(file, PERM_BASE), Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// The locks on one file: a `dup` of the descriptor they were taken on, the permissions
/// serving needs, and what is locked now.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    role: Role,
    active: Perms,
    held: Held,
}

impl ImageLock {
    /// Takes the permissions of `role` on `file` (opened from `path`), or fails without
    /// holding anything if another process's locks conflict.
    pub fn acquire(file: &File, path: &Path, role: Role) -> Result<ImageLock> {
        let mut lock = ImageLock::inactive(file, path, role)?;
        lock.activate()?;
        Ok(lock)
    }

    /// Prepares the locks of `role` on `file` without taking any (an image opened for an
    /// incoming migration); [`ImageLock::activate`] takes them.
    pub fn inactive(file: &File, path: &Path, role: Role) -> Result<ImageLock> {
        let file = file.try_clone().map_err(|source| Error::OpenImage {
            path: path.to_owned(),
            source,
        })?;
        Ok(ImageLock {
            file,
            path: path.to_owned(),
            role,
            active: Perms::of(role),
            held: Held::default(),
        })
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The permissions whose bytes are locked now.
    pub fn held(&self) -> Perms {
        Perms {
            perm: self.held.perm,
            shared: !self.held.unshared & ALL,
        }
    }

    /// Takes the serving permissions (back).
    pub fn activate(&mut self) -> Result<()> {
        self.set(self.active)
    }

    /// Changes the locked permissions to `new`. Giving permissions up cannot fail; taking one
    /// fails if another process conflicts, and then leaves the locks as they were.
    pub fn set(&mut self, new: Perms) -> Result<()> {
        let old = self.held;
        let target = Held::of(new);
        if !old.contains(target) {
            let tried = self
                .apply(old.union(target), false)
                .and_then(|()| self.check(new));
            if let Err(e) = tried {
                self.release_to(old);
                return Err(e);
            }
        }
        self.release_to(target);
        debug!(
            "{} {}: lock bytes {:?}",
            self.role.noun(),
            self.path.display(),
            self.held.bytes()
        );
        Ok(())
    }

    /// Locks every byte of `want` not locked yet; with `unlock`, also releases every locked
    /// byte not in `want`. `self.held` follows each byte that changed.
    fn apply(&mut self, want: Held, unlock: bool) -> Result<()> {
        for (i, byte, wanted) in want.slots() {
            let bit = 1u8 << i;
            let field = if byte < SHARED_BASE {
                &mut self.held.perm
            } else {
                &mut self.held.unshared
            };
            let locked = *field & bit != 0;
            if wanted && !locked {
                set_byte(&self.file, byte, libc::F_RDLCK)
                    .map_err(|e| lock_failed(&self.path, self.role, byte, e))?;
                *field |= bit;
            } else if unlock && locked && !wanted {
                set_byte(&self.file, byte, libc::F_UNLCK)
                    .map_err(|e| lock_failed(&self.path, self.role, byte, e))?;
                *field &= !bit;
            }
        }
        Ok(())
    }

    /// Releases everything beyond `target`; releasing cannot conflict, so a failure (which
    /// would be the kernel's) is only logged.
    fn release_to(&mut self, target: Held) {
        if let Err(e) = self.apply(target, true) {
            warn!("{e}");
        }
    }

    /// Fails if another process refuses to share a permission of `new`, or holds one `new`
    /// does not share.
    fn check(&self, new: Perms) -> Result<()> {
        for (i, byte, wanted) in Held::of(new).slots() {
            // A wanted permission conflicts with its not-shared byte, and a refused one with
            // its permission byte.
            let probe = if byte < SHARED_BASE {
                SHARED_BASE + i as u64
            } else {
                PERM_BASE + i as u64
            };
            let taken = wanted
                && byte_taken(&self.file, probe)
                    .map_err(|e| lock_failed(&self.path, self.role, probe, e))?;
            if taken {
                let what = if byte < SHARED_BASE { "" } else { "shared " };
                return Err(Error::ImageInUse {
                    what: self.role.noun(),
                    path: self.path.clone(),
                    reason: format!("failed to get {what}\"{}\" lock", NAMES[i]),
                });
            }
        }
        Ok(())
    }
}

fn lock_failed(path: &Path, role: Role, byte: u64, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Error::ImageInUse {
            what: role.noun(),
            path: path.to_owned(),
            reason: format!("byte {byte} is locked exclusively"),
        },
        _ => Error::Lock {
            path: path.to_owned(),
            reason: format!(
                "lock byte {byte}: {e} (a file system without OFD locks needs --locking off)"
            ),
        },
    }
}

/// Every lock of one served disk: its image, data file and backing files.
#[derive(Debug, Default)]
pub struct ImageLocks {
    locks: Vec<ImageLock>,
}

impl ImageLocks {
    /// The files and their locks, in the order they were opened (the image first).
    pub fn iter(&self) -> impl Iterator<Item = &ImageLock> {
        self.locks.iter()
    }

    /// True when nothing is locked or will be (`--locking off`, or no image).
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Takes the serving permissions on every file; if one conflicts, the others are put back
    /// as they were and the error names the file.
    pub fn activate(&mut self) -> Result<()> {
        self.set_each(|l| l.active)
    }

    /// Gives up writing everywhere, keeping consistent read: another process may now take the
    /// write lock (a migration destination).
    pub fn downgrade(&mut self) {
        self.release_each(|l| l.active.without_write());
    }

    /// Releases every byte (QEMU's inactive image).
    pub fn deactivate(&mut self) {
        self.release_each(|_| Perms::INACTIVE);
    }

    /// Moves each lock to `target(lock)`, which only gives permissions up.
    fn release_each(&mut self, target: impl Fn(&ImageLock) -> Perms) {
        for l in &mut self.locks {
            let t = Held::of(target(l));
            // Never take a byte here: only what is both held and in the target stays.
            l.release_to(Held {
                perm: l.held.perm & t.perm,
                unshared: l.held.unshared & t.unshared,
            });
        }
    }

    fn set_each(&mut self, target: impl Fn(&ImageLock) -> Perms) -> Result<()> {
        let before: Vec<Perms> = self.locks.iter().map(ImageLock::held).collect();
        for i in 0..self.locks.len() {
            let t = target(&self.locks[i]);
            if let Err(e) = self.locks[i].set(t) {
                for (l, &p) in self.locks[..i].iter_mut().zip(&before) {
                    l.release_to(Held::of(p));
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The locking context of the open in progress on this thread (see [`with_locks`]).
struct Scope {
    locking: Locking,
    /// Take the locks now (else prepare them for a later [`ImageLocks::activate`]).
    active: bool,
    /// Whether files are locked: decided at the first file from `locking` and the kernel.
    enabled: Option<bool>,
    /// When a conflicting lock stops being waited for and the open fails (the open's start
    /// plus its grace: one bound for all its files).
    deadline: Instant,
    locks: Vec<ImageLock>,
}

/// How long the daemon's start and a control `activate` wait for a conflicting lock to go
/// away before they give up.
///
/// A daemon killed with I/O in flight does not drop its locks when its process is reaped: the
/// kernel tears its io_uring down afterwards, and the in-flight requests keep the image's open
/// file description (and so its OFD locks) alive until they have finished. A restart (a
/// supervisor's, or a test's) that follows at once would find the image "in use" by a process
/// that no longer exists. Waiting for that is also what makes the restart safe: once the locks
/// are gone, no write of the dead daemon can still land under the new one.
pub const RELEASE_GRACE: Duration = Duration::from_secs(3);

/// How long a queue start on an inactive device (`Device::start_queue`: a migration's
/// destination, or a device handed over with `ctl deactivate`) waits for the image's
/// previous holder to let it go: the only wait on that path, the device does not retry.
/// Longer than [`RELEASE_GRACE`]: the frontend has started the device and cannot be asked to
/// come back later (a failure leaves the queue idle until its next kick), and the holder,
/// e.g. a migration source, is expected to let go.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(8);

/// How often a waiting start tests the locks again.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// [`ImageLock::acquire`], tried again until `deadline` while another holder conflicts.
fn acquire_until(file: &File, path: &Path, role: Role, deadline: Instant) -> Result<ImageLock> {
    let mut logged = false;
    loop {
        match ImageLock::acquire(file, path, role) {
            Err(e @ Error::ImageInUse { .. }) if Instant::now() < deadline => {
                if !logged {
                    let left = deadline.saturating_duration_since(Instant::now());
                    debug!("{e}; waiting up to {left:?} for the holder to go away");
                    logged = true;
                }
                std::thread::sleep(RETRY_EVERY);
            }
            r => return r,
        }
    }
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Runs `open` so that every file [`claim`]ed during it on this thread is locked (taken now
/// if `active`, else only prepared), and returns what it returned with those locks. A file
/// another process holds is tried again until `grace` has passed since `open` began (one
/// bound for the image, its backing files and its data file together; see
/// [`RELEASE_GRACE`], [`HANDOVER_GRACE`]). If `open` fails, the locks taken so far are
/// released with the descriptors the failed open drops.
pub fn with_locks<T>(
    locking: Locking,
    active: bool,
    grace: Duration,
    open: impl FnOnce() -> Result<T>,
) -> Result<(T, ImageLocks)> {
    /// Puts the enclosing scope back even if `open` unwinds.
    struct Restore(Option<Option<Scope>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(prev) = self.0.take() {
                SCOPE.with(|s| *s.borrow_mut() = prev);
            }
        }
    }
    let scope = Scope {
        locking,
        active,
        enabled: None,
        deadline: Instant::now() + grace,
        locks: Vec::new(),
    };
    let mut restore = Restore(Some(SCOPE.with(|s| s.replace(Some(scope)))));
    let result = open();
    let ours = SCOPE.with(|s| s.replace(restore.0.take().flatten()));
    let locks = ours.map(|s| s.locks).unwrap_or_default();
    result.map(|t| (t, ImageLocks { locks }))
}

/// Locks `file` (just opened from `path`) for `role`, if an open under [`with_locks`] is in
/// progress on this thread; does nothing otherwise. Call it before anything is written.
pub fn claim(file: &File, path: &Path, role: Role) -> Result<()> {
    SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(scope) = s.as_mut() else {
            return Ok(());
        };
        let enabled = match scope.enabled {
            Some(e) => e,
            None => {
                let e = decide(scope.locking, file, path)?;
                scope.enabled = Some(e);
                e
            }
        };
        if !enabled {
            return Ok(());
        }
        let lock = if scope.active {
            acquire_until(file, path, role, scope.deadline)?
        } else {
            ImageLock::inactive(file, path, role)?
        };
        scope.locks.push(lock);
        Ok(())
    })
}

/// Whether to lock at all, from `--locking` and whether the kernel has OFD locks.
fn decide(locking: Locking, file: &File, path: &Path) -> Result<bool> {
    match locking {
        Locking::Off => Ok(false),
        _ if ofd_supported(file) => Ok(true),
        Locking::On => Err(Error::Lock {
            path: path.to_owned(),
            reason: "this kernel has no OFD locks (F_OFD_SETLK); use --locking off".into(),
        }),
        Locking::Auto => {
            warn!(
                "this kernel has no OFD locks (F_OFD_SETLK): images are not locked, nothing \
                 stops another process from writing them"
            );
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(dir: &tempfile::TempDir, name: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        p
    }

    /// A separate open of `path` (its own open file description, as another process's).
    fn open(path: &Path) -> File {
        File::open(path).unwrap()
    }

    /// The bytes 0..300 another open file description sees locked.
    fn locked_bytes(path: &Path) -> Vec<u64> {
        let probe = open(path);
        (0..300)
            .filter(|&b| byte_taken(&probe, b).unwrap())
            .collect()
    }

    fn in_use(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(e @ Error::ImageInUse { .. }) => e.to_string(),
            other => panic!("expected an in-use error, got {other:?}"),
        }
    }

    #[test]
    fn roles_lock_the_bytes_a_qemu_guest_locks() {
        // Measured from /proc/locks with QEMU 10.0 (see the module documentation).
        let cases = [
            (Role::RawImage { writable: true }, vec![100, 101, 201]),
            (Role::RawImage { writable: false }, vec![100, 201]),
            (
                Role::Qcow2Image { writable: true },
                vec![100, 101, 103, 201, 203],
            ),
            (Role::Qcow2Image { writable: false }, vec![100, 201, 203]),
            (
                Role::DataFile { writable: true },
                vec![100, 101, 103, 201, 203],
            ),
            (Role::DataFile { writable: false }, vec![100, 201, 203]),
            (Role::Backing, vec![100, 201, 203]),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (role, bytes) in cases {
            assert_eq!(Perms::of(role).bytes(), bytes, "{role:?}");
            let path = tmpfile(&dir, "img");
            let file = open(&path);
            let lock = ImageLock::acquire(&file, &path, role).unwrap();
            assert_eq!(locked_bytes(&path), bytes, "{role:?} on the file");
            assert_eq!(lock.held(), Perms::of(role));
            drop(lock);
            // The image's own descriptor keeps them: they belong to its open file description.
            assert_eq!(
                locked_bytes(&path),
                bytes,
                "{role:?} after the lock's dup closed"
            );
            drop(file);
            assert_eq!(
                locked_bytes(&path),
                Vec::<u64>::new(),
                "{role:?} after close"
            );
        }
    }

    /// Does `second` (another process's open) get its locks while `first` holds its own?
    /// Err is the in-use message.
    fn second_after_first(first: Role, second: Role) -> std::result::Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = tmpfile(&dir, "img");
        let (a, b) = (open(&path), open(&path));
        let first_lock = ImageLock::acquire(&a, &path, first).unwrap();
        let r = ImageLock::acquire(&b, &path, second).map(drop);
        drop((first_lock, a));
        if r.is_err() {
            // A refused open leaves nothing locked on its (still open) descriptor.
            assert!(
                locked_bytes(&path).is_empty(),
                "{second:?} left locks behind"
            );
        }
        drop(b);
        r.map_err(|e| in_use(Err::<(), _>(e)))
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let qcow2 = |writable| Role::Qcow2Image { writable };
        let raw = |writable| Role::RawImage { writable };
        // A writer after anyone: the first does not share write.
        for first in [
            qcow2(true),
            qcow2(false),
            raw(true),
            raw(false),
            Role::Backing,
        ] {
            for second in [qcow2(true), raw(true), Role::DataFile { writable: true }] {
                let msg = second_after_first(first, second).unwrap_err();
                assert!(msg.contains("failed to get \"write\" lock"), "{msg}");
                assert!(msg.contains("in use"), "{msg}");
            }
        }
        // A reader after a writer: it refuses to share write, which the first holds.
        for first in [qcow2(true), raw(true)] {
            for second in [qcow2(false), raw(false), Role::Backing] {
                let msg = second_after_first(first, second).unwrap_err();
                assert!(msg.contains("failed to get shared \"write\" lock"), "{msg}");
            }
        }
        // Readers share with readers, and backing files with each other.
        for first in [qcow2(false), raw(false), Role::Backing] {
            for second in [qcow2(false), raw(false), Role::Backing] {
                second_after_first(first, second).unwrap();
            }
        }
    }

    /// Releases every QEMU byte `file`'s open file description holds.
    fn drop_locks(file: &File) {
        for b in Held::of(Perms {
            perm: ALL,
            shared: 0,
        })
        .bytes()
        {
            set_byte(file, b, libc::F_UNLCK).unwrap();
        }
    }

    #[test]
    fn downgrade_lets_another_writer_in_and_activate_takes_it_back() {
        let roles = [
            Role::Qcow2Image { writable: true },
            Role::DataFile { writable: true },
            Role::Backing,
        ];
        for full_release in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let paths = ["img", "data", "base"].map(|n| tmpfile(&dir, n));
            let ours = paths.each_ref().map(|p| open(p));
            let theirs = paths.each_ref().map(|p| open(p));
            let mut locks = ImageLocks {
                locks: (0..3)
                    .map(|i| ImageLock::acquire(&ours[i], &paths[i], roles[i]).unwrap())
                    .collect(),
            };
            in_use(ImageLock::acquire(&theirs[0], &paths[0], roles[0]));

            // Downgraded, only consistent read stays; deactivated, nothing.
            let kept = if full_release {
                locks.deactivate();
                Perms::INACTIVE
            } else {
                locks.downgrade();
                Perms {
                    perm: CONSISTENT_READ,
                    shared: ALL,
                }
            };
            for l in locks.iter() {
                assert_eq!(l.held(), kept);
                assert_eq!(
                    locked_bytes(l.path()),
                    kept.bytes(),
                    "{}",
                    l.path().display()
                );
            }
            // Another process can now open the image and data file writable ...
            let mut other = ImageLocks {
                locks: (0..2)
                    .map(|i| ImageLock::acquire(&theirs[i], &paths[i], roles[i]).unwrap())
                    .collect(),
            };
            // ... so taking the write lock back fails, names the file and changes nothing.
            let msg = in_use(locks.activate());
            assert!(msg.contains("image") && msg.contains("/img"), "{msg}");
            assert!(locks.iter().all(|l| l.held() == kept));
            // Once only the data file is still held elsewhere, the image's lock, taken first,
            // is put back when the data file's fails.
            other.locks[0].set(Perms::INACTIVE).unwrap();
            let msg = in_use(locks.activate());
            assert!(msg.contains("data file") && msg.contains("/data"), "{msg}");
            assert!(locks.iter().all(|l| l.held() == kept));
            other.deactivate();
            locks.activate().unwrap();
            for (l, role) in locks.iter().zip(roles) {
                assert_eq!(l.held(), Perms::of(role));
                assert_eq!(locked_bytes(l.path()), Perms::of(role).bytes());
            }
            in_use(ImageLock::acquire(&theirs[1], &paths[1], roles[1]));
        }
    }

    #[test]
    fn claim_locks_only_inside_a_scope_and_not_with_locking_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = tmpfile(&dir, "img");
        let file = open(&path);
        let role = Role::RawImage { writable: true };
        claim(&file, &path, role).unwrap();
        assert!(locked_bytes(&path).is_empty(), "outside a scope");
        let ((), locks) = with_locks(Locking::Off, true, Duration::ZERO, || {
            claim(&file, &path, role)
        })
        .unwrap();
        assert!(
            locks.is_empty() && locked_bytes(&path).is_empty(),
            "--locking off"
        );
        for locking in [Locking::On, Locking::Auto] {
            let ((), locks) =
                with_locks(locking, true, Duration::ZERO, || claim(&file, &path, role)).unwrap();
            assert_eq!(locks.iter().count(), 1);
            assert_eq!(locked_bytes(&path), vec![100, 101, 201], "{locking:?}");
            drop(locks);
            drop_locks(&file);
        }
        // An inactive scope (an incoming migration) prepares the locks without taking them.
        let ((), mut locks) = with_locks(Locking::Auto, false, Duration::ZERO, || {
            claim(&file, &path, role)
        })
        .unwrap();
        assert!(locked_bytes(&path).is_empty(), "inactive");
        locks.activate().unwrap();
        assert_eq!(locked_bytes(&path), vec![100, 101, 201], "activated");
        drop(locks);
        drop_locks(&file);
        // A failed open hands back no locks, and the scope ends with it.
        let other = open(&path);
        let failed = with_locks(Locking::Auto, true, Duration::ZERO, || -> Result<()> {
            claim(&other, &path, Role::Backing)?;
            Err(Error::InvalidOption("x".into()))
        });
        assert!(failed.is_err());
        drop(other);
        assert!(locked_bytes(&path).is_empty(), "after the failed open");
        claim(&file, &path, role).unwrap();
        assert!(locked_bytes(&path).is_empty(), "the scope ended");
    }

    #[test]
    fn an_active_open_waits_out_a_holder_that_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = tmpfile(&dir, "img");
        let role = Role::RawImage { writable: true };
        let theirs = open(&path);
        let held = ImageLock::acquire(&theirs, &path, role).unwrap();
        let ours = open(&path);
        let msg = in_use(with_locks(Locking::Auto, true, Duration::ZERO, || {
            claim(&ours, &path, role)
        }));
        assert!(msg.contains("failed to get \"write\" lock"), "{msg}");
        // The holder goes away while the open waits: the open then succeeds.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
            drop(theirs);
        });
        let ((), locks) = with_locks(Locking::Auto, true, Duration::from_secs(10), || {
            claim(&ours, &path, role)
        })
        .unwrap();
        release.join().unwrap();
        assert_eq!(locks.iter().count(), 1);
        assert_eq!(locked_bytes(&path), vec![100, 101, 201]);
        // A holder that stays is still refused once the grace has passed.
        let other = open(&path);
        let msg = in_use(with_locks(
            Locking::Auto,
            true,
            Duration::from_millis(100),
            || claim(&other, &path, role),
        ));
        assert!(msg.contains("failed to get \"write\" lock"), "{msg}");
    }

    #[test]
    fn the_grace_bounds_the_whole_open_not_each_file() {
        // Another process holds an image and its backing file, and lets go of the image 1.5 s
        // into the open's 2 s grace, never of the backing file: the open gives up at 2 s, not
        // 2 s after it got the image.
        let dir = tempfile::tempdir().unwrap();
        let paths = [tmpfile(&dir, "img"), tmpfile(&dir, "backing")];
        let role = Role::RawImage { writable: true };
        // Their open file descriptions and locks, per file (a lock goes with the last of them).
        let mut theirs: Vec<(File, ImageLock)> = paths
            .iter()
            .map(|p| {
                let f = open(p);
                let l = ImageLock::acquire(&f, p, role).unwrap();
                (f, l)
            })
            .collect();
        let first = theirs.remove(0);
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            drop(first);
        });
        let ours: Vec<File> = paths.iter().map(|p| open(p)).collect();
        let start = Instant::now();
        let msg = in_use(with_locks(
            Locking::Auto,
            true,
            Duration::from_secs(2),
            || {
                ours.iter()
                    .zip(&paths)
                    .try_for_each(|(f, p)| claim(f, p, role))
            },
        ));
        let took = start.elapsed();
        release.join().unwrap();
        assert!(msg.contains("backing"), "{msg}");
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "the open took {took:?}"
        );
        drop(theirs);
    }

    #[test]
    fn locking_parses_qemu_vocabulary() {
        assert_eq!("on".parse(), Ok(Locking::On));
        assert_eq!("off".parse(), Ok(Locking::Off));
        assert_eq!("auto".parse(), Ok(Locking::Auto));
        assert_eq!(
            "yes".parse::<Locking>().unwrap_err().to_string(),
            "unknown locking mode 'yes' (expected on, off or auto)"
        );
        assert_eq!(Locking::default(), Locking::Auto);
    }
}

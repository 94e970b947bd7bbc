//! Recording the writes and durability points of host files, for the power-loss harness
//! (tests/power_loss.rs, `ci/power-loss`).
//!
//! A [`Recorder`] attached to an image's files (`ImageOptions::recorder`) logs, in one
//! timeline, every write the daemon issues to them (offset and bytes) and when it completed,
//! every range it zeroes or deallocates, every size change, and every `fdatasync`/`fsync` with
//! when it started and when it completed. From that log the harness rebuilds the states a host
//! crash could leave: what a completed sync made durable, plus any subset of the rest, in any
//! order, each write possibly torn.
//!
//! The same module holds the *mutations*: named durability points ([`HostFile::sync_point`])
//! that a test can switch off, to show that the harness notices when one is missing.
//!
//! [`HostFile::sync_point`]: super::HostFile::sync_point

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What was done to a recorded file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Bytes written at an offset.
    Write {
        /// Byte offset in the file.
        off: u64,
        /// The bytes.
        data: Arc<[u8]>,
    },
    /// A range made to read as zeros (hole punched, zero range, or zeros written by the
    /// device).
    Zero {
        /// Byte offset in the file.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The file's size set (truncated or extended).
    SetLen(u64),
}

/// One entry of the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An operation was issued (it may be partly on disk from now on).
    Issue {
        /// Operation id, unique per recorder.
        id: u64,
        /// Which file (index in [`Recorder::files`]).
        file: u32,
        /// What.
        op: Op,
    },
    /// Operation `id` completed. With `durable` (an `RWF_DSYNC` write, `fsync` semantics)
    /// it is on stable storage now.
    Done {
        /// Operation id.
        id: u64,
        /// Durable on completion.
        durable: bool,
    },
    /// A sync of `file` started: everything completed before this is durable once the
    /// matching [`Event::SyncDone`] is seen.
    SyncStart {
        /// Sync id, unique per recorder.
        id: u64,
        /// Which file.
        file: u32,
    },
    /// Sync `id` completed.
    SyncDone {
        /// Sync id.
        id: u64,
    },
    /// A mark the test adds to the timeline (guest-level requests and their completions).
    Mark(String),
}

/// The timeline of one image's files.
#[derive(Default, Debug)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    files: Mutex<Vec<String>>,
    next: AtomicU64,
}

impl Recorder {
    /// A new, empty recorder.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// Registers a file under `name`; returns its index.
    pub fn file(&self, name: &str) -> u32 {
        let mut f = crate::sync::lock(&self.files);
        if let Some(i) = f.iter().position(|n| n == name) {
            return i as u32;
        }
        f.push(name.to_owned());
        (f.len() - 1) as u32
    }

    /// Names of the registered files, by index.
    pub fn files(&self) -> Vec<String> {
        crate::sync::lock(&self.files).clone()
    }

    /// Number of events so far.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.events).len()
    }

    /// True before the first event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the timeline so far.
    pub fn events(&self) -> Vec<Event> {
        crate::sync::lock(&self.events).clone()
    }

    /// Appends a test mark to the timeline.
    pub fn mark(&self, m: impl Into<String>) {
        self.push(Event::Mark(m.into()));
    }

    fn push(&self, e: Event) {
        crate::sync::lock(&self.events).push(e);
    }

    pub(super) fn issue(&self, file: u32, op: Op) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.push(Event::Issue { id, file, op });
        id
    }

    pub(super) fn done(&self, id: u64, durable: bool) {
        self.push(Event::Done { id, durable });
    }

    pub(super) fn sync_start(&self, file: u32) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.push(Event::SyncStart { id, file });
        id
    }

    pub(super) fn sync_done(&self, id: u64) {
        self.push(Event::SyncDone { id });
    }
}

/// Whether any mutation is switched on (checked first, so the common case is one load).
static ANY_MUTATION: AtomicBool = AtomicBool::new(false);

fn mutations() -> &'static Mutex<HashSet<&'static str>> {
    static M: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    M.get_or_init(Mutex::default)
}

/// Switches off the durability point `name` (testing only: see the module documentation).
#[doc(hidden)]
pub fn set_mutation(name: &'static str, on: bool) {
    let mut m = crate::sync::lock(mutations());
    if on {
        m.insert(name);
    } else {
        m.remove(name);
    }
    ANY_MUTATION.store(!m.is_empty(), Ordering::Release);
}

/// True if the durability point `name` is switched off.
pub fn mutated(name: &str) -> bool {
    ANY_MUTATION.load(Ordering::Acquire) && crate::sync::lock(mutations()).contains(name)
}

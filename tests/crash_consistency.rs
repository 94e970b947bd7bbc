//! Crash consistency: "never lose a write".
//!
//! For each image kind (raw; qcow2 with 64 KiB clusters; qcow2 with 4 KiB clusters; qcow2 over a
//! raw backing file; qcow2 whose clusters all start compressed, so first writes copy-on-write and
//! free the old host clusters; qcow2 with extended L2 over a raw backing file, so writes allocate
//! single subclusters; qcow2 with an external data file) a loop:
//!
//!   1. start the daemon on the image (after a SIGKILL the qcow2 dirty bit makes it rebuild the
//!      refcounts on open),
//!   2. read back the whole work region and check it against the model (below),
//!   3. run a verified write workload on several virtqueues at once (random 512-byte-aligned
//!      offsets, random sizes 4 KiB..256 KiB, FLUSH at random points; every 512-byte sector of
//!      every write carries a header with the write id and the sector number, the rest derived
//!      from a seed, so any sector read back names the write it came from and is checked in
//!      full),
//!   4. SIGKILL the daemon at a random moment while I/O is in flight (after a random delay,
//!      just after the N-th FLUSH was submitted, or after the N-th write completed),
//!   5. for qcow2, `qemu-img check` the killed image: leaks are fine, anything else is not.
//!
//! The model: writes in flight at the same time never overlap, so the writes to each sector are
//! totally ordered. The process-crash rule: a SIGKILL of the daemon alone (the host and its page
//! cache survive) must not lose any write that had completed, flushed or not (docs/RELIABILITY.md;
//! for qcow2 the mapping journal carries the unflushed mapping changes across the restart). So a
//! write must survive once it has completed. (With VUB_TEST_BACKEND=qsd the weaker FLUSH rule is
//! checked instead: QSD keeps unflushed qcow2 metadata in memory only, so a kill loses completed
//! writes there.) After a crash each sector must hold the last write to it that must survive, or
//! any write to it that came later (completed or still in flight); never an older value, never a
//! mix, never garbage. What was read back becomes the sector's new baseline.
//!
//! After the loop: restart, verify, SIGTERM (exit 0), `qemu-img check` (errors fail, leaks are
//! reported), restart, verify the whole disk, SIGTERM, and `qemu-img check` must say "No errors
//! were found".
//!
//! A SIGKILL leaves the host page cache intact, so this exercises the daemon's own state
//! (in-memory qcow2 metadata, write-back ordering, repair on open), not power loss.
//!
//! Quick mode (default): 20 kills per image kind. Long mode:
//!
//!   VUB_CRASH_KILLS=200 CARGO_TARGET_DIR=/work/target-crash \
//!       cargo test --test crash_consistency -- --nocapture --test-threads=1
//!
//! VUB_CRASH_SEED=N replays a run (the seed of each image kind is printed); with
//! VUB_TEST_BACKEND=qsd the same checks run against qemu-storage-daemon (validates the test).

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::tagged::*;
use common::*;

const MIB: u64 = 1 << 20;
/// Virtual disk size.
const DISK: u64 = 64 * MIB;
/// Writes land in `[0, REGION)`; it is read back and checked after every kill.
const REGION: u64 = 32 * MIB;
const REGION_SECTORS: u64 = REGION / SECTOR;
/// Virtqueues (one I/O thread each) and requests in flight per queue.
const NQ: usize = 4;
const DEPTH: usize = 4;
/// Largest write; each in-flight slot owns this much of its queue's buffer.
const MAX_WRITE: usize = 256 << 10;
const MIN_WRITE: usize = 4 << 10;
/// One FLUSH per this many requests, on average.
const FLUSH_EVERY: u64 = 12;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and sector contents
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct WriteInfo {
    sector: u64,
    nsec: u64,
    queue: usize,
    /// Event number of the successful completion.
    completed_at: Option<u64>,
}

struct Model {
    seed: u64,
    initial: Initial,
    /// Per sector of the region: the baseline (last value read back, or the initial contents)
    /// and the writes since then, in order.
    base: Vec<u32>,
    after: Vec<Vec<u32>>,
    /// Index = write id; id 0 is the initial contents.
    writes: Vec<WriteInfo>,
    /// Event counter: write completions and flush submissions.
    event: u64,
    /// Writes with `completed_at < durable_mark` are covered by a completed FLUSH.
    durable_mark: u64,
    /// Sector ranges of writes in flight.
    inflight: Vec<(u64, u64)>,
    flushes_submitted: u64,
    flushes_completed: u64,
    writes_completed: u64,
    // Totals over the whole run.
    total_writes_acked: u64,
    total_flushes_acked: u64,
}

impl Model {
    fn new(seed: u64, initial: Initial) -> Model {
        Model {
            seed,
            initial,
            base: vec![0; REGION_SECTORS as usize],
            after: vec![Vec::new(); REGION_SECTORS as usize],
            writes: vec![WriteInfo::default()],
            event: 0,
            durable_mark: 0,
            inflight: Vec::new(),
            flushes_submitted: 0,
            flushes_completed: 0,
            writes_completed: 0,
            total_writes_acked: 0,
            total_flushes_acked: 0,
        }
    }

    /// True if write `id` must survive a crash of the daemon: it completed (or, for QSD,
    /// a FLUSH covering it completed).
    fn durable(&self, id: u32) -> bool {
        let completed = self.writes[id as usize].completed_at;
        if backend() == Backend::Qsd {
            completed.is_some_and(|c| c < self.durable_mark)
        } else {
            completed.is_some()
        }
    }

    /// Acceptable values of sector `s` now.
    fn acceptable(&self, s: usize) -> Vec<u32> {
        let after = &self.after[s];
        match after.iter().rposition(|&id| self.durable(id)) {
            Some(k) => after[k..].to_vec(),
            None => std::iter::once(self.base[s])
                .chain(after.iter().copied())
                .collect(),
        }
    }
}

#[derive(Default, Debug)]
struct Verified {
    sectors: u64,
    /// Sectors whose writes were required to survive (completed; for QSD, flushed).
    durable_sectors: u64,
    /// Sectors that read back a write acknowledged but not flushed / lost one (allowed).
    unflushed_new: u64,
    unflushed_old: u64,
    /// Distinct writes seen intact in at least one sector.
    writes_seen: u64,
}

/// Checks `data` (the region read back) against the model and makes it the new baseline.
fn verify(model: &mut Model, data: &[u8], what: &str) -> Result<Verified, String> {
    assert_eq!(data.len() as u64, REGION);
    let mut v = Verified::default();
    let mut errors = Vec::new();
    let mut nerr = 0u64;
    let mut seen = HashSet::new();
    for s in 0..REGION_SECTORS as usize {
        let sec = &data[s * SECTOR as usize..(s + 1) * SECTOR as usize];
        let acceptable = model.acceptable(s);
        let got = decode(sec, model.seed, s as u64, model.initial);
        let ok = matches!(&got, Ok(id) if acceptable.contains(id));
        if !ok {
            nerr += 1;
            if errors.len() < 8 {
                let describe = |id: u32| {
                    let w = &model.writes[id as usize];
                    format!(
                        "#{id}(q{} sectors {}+{} {}{})",
                        w.queue,
                        w.sector,
                        w.nsec,
                        match w.completed_at {
                            Some(c) => format!("completed@{c}"),
                            None => "not completed".into(),
                        },
                        if model.durable(id) {
                            " MUST-SURVIVE"
                        } else {
                            ""
                        }
                    )
                };
                errors.push(format!(
                    "sector {s} (offset {:#x}): read {}; acceptable: [{}]; baseline #{}; writes \
                     since: [{}]",
                    s as u64 * SECTOR,
                    match &got {
                        Ok(id) => format!("write #{id}"),
                        Err(e) => e.clone(),
                    },
                    acceptable
                        .iter()
                        .map(|id| format!("#{id}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    model.base[s],
                    model.after[s]
                        .iter()
                        .map(|&id| describe(id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            continue;
        }
        let id = got.unwrap();
        v.sectors += 1;
        if !model.after[s].is_empty() {
            let last = *model.after[s].last().unwrap();
            if acceptable.len() == 1 && acceptable[0] != model.base[s] {
                v.durable_sectors += 1;
            } else if id == last && id != model.base[s] {
                v.unflushed_new += 1;
            } else if !model.durable(id) && id != last {
                v.unflushed_old += 1;
            }
        }
        if id != 0 {
            seen.insert(id);
        }
        model.base[s] = id;
        model.after[s].clear();
    }
    v.writes_seen = seen.len() as u64;
    if nerr > 0 {
        return Err(format!(
            "{what}: {nerr} of {REGION_SECTORS} sectors hold an unacceptable value \
             (durable_mark {}, {} writes issued); first ones:\n  {}",
            model.durable_mark,
            model.writes.len() - 1,
            errors.join("\n  ")
        ));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

enum Slot {
    Free,
    Write(u32),
    Flush(u64),
}

/// Outcome of one I/O thread.
#[derive(Default)]
struct ThreadOut {
    /// A request failed while the daemon was alive (a bug), with a description.
    failure: Option<String>,
}

/// Drives one virtqueue until `stop`, then (once `killed`) collects what completed before the
/// kill and returns. Every wait is bounded: no completion for 10 s while the daemon is alive is
/// reported as a hang.
fn io_thread(
    q: &mut Queue,
    qi: usize,
    model: &Mutex<Model>,
    stop: &AtomicBool,
    killed: &AtomicBool,
    seed: u64,
) -> ThreadOut {
    let mut rng = Rng(seed);
    let mut slots: Vec<Slot> = (0..DEPTH).map(|_| Slot::Free).collect();
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut last_progress = Instant::now();
    let mut out = ThreadOut::default();
    let buf = q.buf().as_mut_ptr();
    const { assert!(DEPTH * MAX_WRITE <= QUEUE_BUF_SIZE) };
    loop {
        if !stop.load(Ordering::Acquire) && out.failure.is_none() {
            for (i, slot) in slots.iter_mut().enumerate() {
                if !matches!(slot, Slot::Free) {
                    continue;
                }
                if rng.range(0, FLUSH_EVERY) == 0 {
                    let mut m = model.lock().unwrap();
                    let mark = m.event;
                    m.event += 1;
                    m.flushes_submitted += 1;
                    drop(m);
                    *slot = Slot::Flush(mark);
                    q.q.flush(i, ReqFlags::empty());
                    continue;
                }
                let nsec = rng.range(MIN_WRITE as u64 / SECTOR, MAX_WRITE as u64 / SECTOR + 1);
                let sector = rng.range(0, REGION_SECTORS - nsec + 1);
                let mut m = model.lock().unwrap();
                if m.inflight
                    .iter()
                    .any(|&(s, n)| sector < s + n && s < sector + nsec)
                {
                    continue; // try another range next round
                }
                let id = u32::try_from(m.writes.len()).expect("too many writes");
                m.writes.push(WriteInfo {
                    sector,
                    nsec,
                    queue: qi,
                    completed_at: None,
                });
                for s in sector..sector + nsec {
                    m.after[s as usize].push(id);
                }
                m.inflight.push((sector, nsec));
                let mseed = m.seed;
                drop(m);
                // SAFETY: slot i owns bytes [i * MAX_WRITE, (i + 1) * MAX_WRITE) of this
                // queue's buffer, and it is free (no request in flight uses it).
                let data = unsafe {
                    std::slice::from_raw_parts_mut(buf.add(i * MAX_WRITE), nsec as usize * 512)
                };
                for k in 0..nsec {
                    let o = k as usize * SECTOR as usize;
                    fill_sector(&mut data[o..o + SECTOR as usize], mseed, id, sector + k);
                }
                *slot = Slot::Write(id);
                q.q.write(
                    sector * SECTOR,
                    data.as_ptr(),
                    data.len(),
                    i,
                    ReqFlags::empty(),
                );
            }
        }
        let busy = slots.iter().any(|s| !matches!(s, Slot::Free));
        if !busy && (stop.load(Ordering::Acquire) || out.failure.is_some()) {
            return out;
        }
        let is_killed = killed.load(Ordering::Acquire);
        let mut timeout = Duration::from_millis(if is_killed { 0 } else { 20 });
        let min = if is_killed || !busy { 0 } else { 1 };
        let n = match q.q.do_io(&mut comps, min, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => {
                if is_killed {
                    return out;
                }
                out.failure = Some(format!("queue {qi}: do_io failed: {e}"));
                return out;
            }
        };
        if n > 0 {
            last_progress = Instant::now();
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let i = c.user_data;
            let slot = std::mem::replace(&mut slots[i], Slot::Free);
            let mut m = model.lock().unwrap();
            match slot {
                Slot::Free => {
                    out.failure = Some(format!("queue {qi}: completion for free slot {i}"));
                }
                Slot::Write(id) => {
                    let (s0, n0) = (m.writes[id as usize].sector, m.writes[id as usize].nsec);
                    let pos = m.inflight.iter().position(|&r| r == (s0, n0)).unwrap();
                    m.inflight.swap_remove(pos);
                    if c.ret == 0 {
                        let ev = m.event;
                        m.event += 1;
                        m.writes[id as usize].completed_at = Some(ev);
                        m.writes_completed += 1;
                        m.total_writes_acked += 1;
                    } else if out.failure.is_none() {
                        out.failure = Some(format!(
                            "queue {qi}: write #{id} of {} sectors at sector {s0} failed with {}",
                            n0, c.ret
                        ));
                    }
                }
                Slot::Flush(mark) => {
                    if c.ret == 0 {
                        m.durable_mark = m.durable_mark.max(mark);
                        m.flushes_completed += 1;
                        m.total_flushes_acked += 1;
                    } else if out.failure.is_none() {
                        out.failure = Some(format!("queue {qi}: FLUSH failed with {}", c.ret));
                    }
                }
            }
        }
        if is_killed {
            // Everything the daemon completed before it died has been collected.
            return out;
        }
        if busy && last_progress.elapsed() > WAIT_TIMEOUT {
            out.failure = Some(format!(
                "queue {qi}: no completion within {WAIT_TIMEOUT:?} with requests in flight \
                 (daemon hung?)"
            ));
            return out;
        }
    }
}

/// How the daemon is killed in one iteration.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// After this many milliseconds of I/O.
    Delay(u64),
    /// This many microseconds after the n-th FLUSH (counted from the start of the workload)
    /// was submitted.
    AfterFlush(u64, u64),
    /// Right after the n-th write completed.
    AfterWrites(u64),
}

// ---------------------------------------------------------------------------------------------
// Image kinds and the loop
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2,
    Qcow2Cluster4k,
    Qcow2Backing,
    /// Every cluster starts compressed: the first write to each copies it (copy-on-write of a
    /// cluster without the COPIED flag, whose old host cluster is freed after a flush).
    Qcow2Compressed,
    /// Extended L2 over a raw backing file: writes allocate and fill single subclusters.
    Qcow2ExtendedL2Backing,
    /// Guest data in an external data file (not refcounted), metadata in the image.
    Qcow2DataFile,
}

impl Kind {
    fn is_qcow2(self) -> bool {
        self != Kind::Raw
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
            Kind::Qcow2Cluster4k => "qcow2-4k-clusters",
            Kind::Qcow2Backing => "qcow2-backing-file",
            Kind::Qcow2Compressed => "qcow2-compressed",
            Kind::Qcow2ExtendedL2Backing => "qcow2-extended-l2-backing-file",
            Kind::Qcow2DataFile => "qcow2-data-file",
        }
    }
}

fn kills_wanted() -> u64 {
    match std::env::var("VUB_CRASH_KILLS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("VUB_CRASH_KILLS={v:?} is not a number")),
        Err(_) => 20,
    }
}

fn base_seed(kind: Kind) -> u64 {
    let s = match std::env::var("VUB_CRASH_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("VUB_CRASH_SEED={v:?} is not a number")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        }
    };
    splitmix64(s ^ kind as u64)
}

fn make_image(dir: &Path, kind: Kind, seed: u64) -> (PathBuf, Initial) {
    let img = dir.join(format!(
        "disk.{}",
        if kind.is_qcow2() { "qcow2" } else { "raw" }
    ));
    let p = img.to_str().unwrap();
    let size = DISK.to_string();
    match kind {
        Kind::Raw => {
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(DISK).unwrap();
            (img, Initial::Zeros)
        }
        Kind::Qcow2 => {
            create_qcow2(p, "", &size);
            (img, Initial::Zeros)
        }
        Kind::Qcow2Cluster4k => {
            create_qcow2(p, "cluster_size=4096", &size);
            (img, Initial::Zeros)
        }
        Kind::Qcow2Backing | Kind::Qcow2ExtendedL2Backing => {
            let base = dir.join("base.raw");
            let data = initial_contents(Initial::Backing, seed, 0, DISK as usize);
            std::fs::write(&base, &data).unwrap();
            let ext = if kind == Kind::Qcow2ExtendedL2Backing {
                "extended_l2=on"
            } else {
                "extended_l2=off"
            };
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                ext,
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                p,
                &size,
            ]);
            (img, Initial::Backing)
        }
        Kind::Qcow2DataFile => {
            let data = dir.join("disk.data");
            create_qcow2(p, &format!("data_file={}", data.to_str().unwrap()), &size);
            (img, Initial::Zeros)
        }
        Kind::Qcow2Compressed => {
            let base = dir.join("base.raw");
            let data = initial_contents(Initial::Compressed, seed, 0, DISK as usize);
            std::fs::write(&base, &data).unwrap();
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                base.to_str().unwrap(),
                p,
            ]);
            std::fs::remove_file(&base).unwrap();
            let info = qemu_img(&["check", p]);
            assert!(
                info.contains("compressed clusters") && !info.contains(", 0.00% compressed"),
                "qemu-img convert -c made no compressed clusters:\n{info}"
            );
            (img, Initial::Compressed)
        }
    }
}

/// Connects, retrying briefly (≤ 1 s): qemu-storage-daemon creates its socket before it
/// listens on it. Our daemon listens before the socket path appears, so it connects at once.
fn connect_client(d: &Daemon, opts: &ClientOpts) -> Client {
    for _ in 0..50 {
        if let Ok(c) = Client::try_new(&d.socket, opts) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Client::new(&d.socket, opts)
}

/// Reads the whole region on one queue.
fn read_region(client: &mut Client) -> Vec<u8> {
    client.q(0).read_all(0, REGION)
}

/// On failure: keep a copy of the image for post-mortem and return its path.
fn keep_image(img: &Path, kind: Kind, tag: &str) -> String {
    let dst = std::env::temp_dir().join(format!(
        "vub-crash-{}-{}-{tag}.img",
        kind.name(),
        std::process::id()
    ));
    match std::fs::copy(img, &dst) {
        Ok(_) => dst.display().to_string(),
        Err(e) => format!("<copy failed: {e}>"),
    }
}

fn log_tail(d: &Path) -> String {
    let s = std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn crash_loop(kind: Kind) {
    crash_loop_with(kind, &[]);
}

/// The crash loop with extra daemon arguments.
fn crash_loop_with(kind: Kind, args: &[&str]) {
    let started = Instant::now();
    let kills = kills_wanted();
    let seed = base_seed(kind);
    eprintln!(
        "[{}] seed {seed} (replay with VUB_CRASH_SEED; per-kind seed derived), {kills} kills",
        kind.name()
    );
    let dir = tempfile::tempdir().unwrap();
    let (img, initial) = make_image(dir.path(), kind, seed);
    let format = if kind.is_qcow2() { "qcow2" } else { "raw" };
    let cfg = args
        .iter()
        .fold(DaemonConfig::new().num_queues(NQ as u32), |c, a| c.arg(a));
    let model = Mutex::new(Model::new(seed, initial));
    let mut rng = Rng(seed ^ 0xC0FFEE);
    let mut total = Verified::default();
    let mut leaks_after_kill = Vec::new();
    let copts = ClientOpts {
        num_queues: NQ as i32,
        ..ClientOpts::default()
    };

    let mut check_after_kill = |iter: u64| {
        if !kind.is_qcow2() {
            return;
        }
        let c = qemu_img_check(&img);
        // 0: clean, 3: leaks only. 2 (corruption) or 1 (check failed) is a bug: the design
        // says on-disk refcounts are never lower than on-disk references.
        if c.code != 0 && c.code != 3 {
            let kept = keep_image(&img, kind, &format!("kill{iter}"));
            panic!(
                "[{}] after kill {iter}: qemu-img check exit {} (image kept at {kept}):\n{}\n\
                 --- daemon log tail ---\n{}",
                kind.name(),
                c.code,
                c.output,
                log_tail(dir.path())
            );
        }
        leaks_after_kill.push(c.leaked());
    };

    for iter in 0..kills {
        let mut d = Daemon::start_format(dir.path(), &img, format, &cfg);
        let mut client = connect_client(&d, &copts);
        let data = read_region(&mut client);
        match verify(
            &mut model.lock().unwrap(),
            &data,
            &format!("[{}] read-back after kill {iter}", kind.name()),
        ) {
            Ok(v) => {
                total.sectors += v.sectors;
                total.durable_sectors += v.durable_sectors;
                total.unflushed_new += v.unflushed_new;
                total.unflushed_old += v.unflushed_old;
                total.writes_seen += v.writes_seen;
            }
            Err(e) => {
                let kept = keep_image(&img, kind, &format!("verify{iter}"));
                panic!(
                    "{e}\nimage kept at {kept}\n--- daemon log tail ---\n{}",
                    log_tail(dir.path())
                );
            }
        }

        let kill_at = match rng.range(0, 3) {
            0 => KillAt::Delay(rng.range(5, 250)),
            1 => KillAt::AfterFlush(rng.range(1, 8), rng.range(0, 1500)),
            _ => KillAt::AfterWrites(rng.range(1, 300)),
        };
        {
            let mut m = model.lock().unwrap();
            m.flushes_submitted = 0;
            m.flushes_completed = 0;
            m.writes_completed = 0;
        }
        let stop = AtomicBool::new(false);
        let killed = AtomicBool::new(false);
        let mut outs = Vec::new();
        std::thread::scope(|sc| {
            let handles: Vec<_> = client
                .queues
                .iter_mut()
                .enumerate()
                .map(|(qi, q)| {
                    let (model, stop, killed) = (&model, &stop, &killed);
                    let tseed = rng.next();
                    sc.spawn(move || io_thread(q, qi, model, stop, killed, tseed))
                })
                .collect();
            // Wait for the kill moment (bounded), watching for the daemon dying by itself.
            let deadline = Instant::now() + WAIT_TIMEOUT;
            let t0 = Instant::now();
            loop {
                if let Some(st) = d.exited() {
                    stop.store(true, Ordering::Release);
                    killed.store(true, Ordering::Release);
                    outs.push(ThreadOut {
                        failure: Some(format!(
                            "daemon exited by itself with {st} during the workload"
                        )),
                    });
                    break;
                }
                let (fs, wc) = {
                    let m = model.lock().unwrap();
                    (m.flushes_submitted, m.writes_completed)
                };
                let now = match kill_at {
                    KillAt::Delay(ms) => t0.elapsed() >= Duration::from_millis(ms),
                    KillAt::AfterFlush(n, us) => {
                        if fs >= n {
                            std::thread::sleep(Duration::from_micros(us));
                            true
                        } else {
                            false
                        }
                    }
                    KillAt::AfterWrites(n) => wc >= n,
                };
                // A thread that saw a failure stops submitting: kill now too.
                let failed = handles.iter().any(|h| h.is_finished());
                if now || failed || Instant::now() >= deadline {
                    d.signal(libc::SIGKILL);
                    stop.store(true, Ordering::Release);
                    // Reap: after this no completion can appear any more.
                    let t = Instant::now();
                    while d.exited().is_none() {
                        assert!(t.elapsed() < WAIT_TIMEOUT, "SIGKILLed daemon did not exit");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    killed.store(true, Ordering::Release);
                    break;
                }
                if matches!(kill_at, KillAt::AfterWrites(_)) {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            for h in handles {
                outs.push(h.join().expect("I/O thread panicked"));
            }
        });
        drop(client);
        drop(d);
        if let Some(f) = outs.iter().find_map(|o| o.failure.clone()) {
            panic!(
                "[{}] iteration {iter} ({kill_at:?}): {f}\n--- daemon log tail ---\n{}",
                kind.name(),
                log_tail(dir.path())
            );
        }
        {
            let mut m = model.lock().unwrap();
            m.inflight.clear();
            eprintln!(
                "[{}] kill {}/{kills} {kill_at:?}: {} writes / {} flushes acked before the kill",
                kind.name(),
                iter + 1,
                m.writes_completed,
                m.flushes_completed
            );
        }
        check_after_kill(iter);
    }

    // Final: verify, clean shutdown, check; reopen, verify everything, clean shutdown, check.
    let mut d = Daemon::start_format(dir.path(), &img, format, &cfg);
    let mut client = connect_client(&d, &copts);
    let data = read_region(&mut client);
    if let Err(e) = verify(
        &mut model.lock().unwrap(),
        &data,
        &format!("[{}] read-back after the last kill", kind.name()),
    ) {
        let kept = keep_image(&img, kind, "final");
        panic!(
            "{e}\nimage kept at {kept}\n--- daemon log tail ---\n{}",
            log_tail(dir.path())
        );
    }
    // One more flushed write per queue, so the clean shutdown has something to write back.
    client.q(0).write_ok(REGION, &vec![0x5Au8; 64 << 10]);
    assert_eq!(client.q(0).flush().ret, 0, "final FLUSH failed");
    d.assert_running();
    drop(client);
    d.terminate_ok();
    let first_check = if kind.is_qcow2() {
        let c = qemu_img_check(&img);
        assert!(
            c.code == 0 || c.code == 3,
            "[{}] qemu-img check after the first clean shutdown: exit {}\n{}",
            kind.name(),
            c.code,
            c.output
        );
        Some(c)
    } else {
        None
    };

    let d = Daemon::start_format(dir.path(), &img, format, &cfg);
    let mut client = connect_client(&d, &copts);
    let data = read_region(&mut client);
    let v = verify(
        &mut model.lock().unwrap(),
        &data,
        &format!("[{}] read-back after clean shutdown", kind.name()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let rest = client.q(0).read_all(REGION, DISK - REGION);
    assert_bytes_eq(
        &rest[..64 << 10],
        &vec![0x5Au8; 64 << 10],
        REGION,
        "final marker write",
    );
    for (k, sec) in rest.chunks(SECTOR as usize).enumerate().skip(128) {
        let s = REGION_SECTORS + k as u64;
        let want_zero = initial == Initial::Zeros;
        let ok = if want_zero {
            sec.iter().all(|&b| b == 0)
        } else {
            decode(sec, seed, s, initial) == Ok(0)
        };
        assert!(
            ok,
            "[{}] sector {s} outside the work region changed",
            kind.name()
        );
    }
    drop(client);
    d.terminate_ok();
    if kind.is_qcow2() {
        let c = qemu_img_check(&img);
        // qemu (without lazy_refcounts) never repairs leaks from a crash by itself, so with
        // the reference backend leaks stay; our daemon rebuilds refcounts on a dirty open.
        let qsd_leaks_only = backend() == Backend::Qsd && c.code == 3;
        assert!(
            c.clean() || qsd_leaks_only,
            "[{}] qemu-img check after clean shutdown + reopen + clean shutdown: exit {}\n{}",
            kind.name(),
            c.code,
            c.output
        );
    }

    let m = model.lock().unwrap();
    let leaks_seen = leaks_after_kill.iter().filter(|&&l| l > 0).count();
    let summary = format!(
        "crash_consistency [{}]: {kills} SIGKILLs, {} writes / {} flushes acknowledged, {} \
         writes issued; {} sector checks ({} of them required a completed write, {} read an \
         unflushed new write, {} an older value), {} distinct writes seen intact; final check \
         {} sectors{}; qemu-img check after kills: {} with leaks (max {} clusters){}; {:.1} s\n",
        kind.name(),
        m.total_writes_acked,
        m.total_flushes_acked,
        m.writes.len() - 1,
        total.sectors,
        total.durable_sectors,
        total.unflushed_new,
        total.unflushed_old,
        total.writes_seen,
        v.sectors,
        if kind.is_qcow2() {
            ", qemu-img check clean"
        } else {
            ""
        },
        leaks_seen,
        leaks_after_kill.iter().max().copied().unwrap_or(0),
        match &first_check {
            Some(c) => format!(
                "; after the first clean shutdown: exit {} ({} leaked)",
                c.code,
                c.leaked()
            ),
            None => String::new(),
        },
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(summary.as_bytes());
}

#[test]
fn crash_raw() {
    crash_loop(Kind::Raw);
}

#[test]
fn crash_qcow2() {
    crash_loop(Kind::Qcow2);
}

#[test]
fn crash_qcow2_4k_clusters() {
    crash_loop(Kind::Qcow2Cluster4k);
}

#[test]
fn crash_qcow2_backing_file() {
    crash_loop(Kind::Qcow2Backing);
}

#[test]
fn crash_qcow2_compressed() {
    crash_loop(Kind::Qcow2Compressed);
}

#[test]
fn crash_qcow2_extended_l2_backing_file() {
    crash_loop(Kind::Qcow2ExtendedL2Backing);
}

#[test]
fn crash_qcow2_data_file() {
    crash_loop(Kind::Qcow2DataFile);
}

/// Without a mapping journal the daemon writes metadata back before completing a request that
/// changed a mapping: completed writes must survive a kill all the same.
#[test]
fn crash_qcow2_backing_file_without_journal() {
    crash_loop_with(Kind::Qcow2Backing, &["--no-journal"]);
}

// ---------------------------------------------------------------------------------------------
// Every kind of completed change survives a kill: writes, discards, write-zeroes
// ---------------------------------------------------------------------------------------------

/// What a 4 KiB block of the region holds in the exact model of the sequential test below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Initial,
    Zeros,
    /// `common::pattern(tag, offset, ..)`.
    Data(u64),
}

const BLK: u64 = 4096;

fn expected_block(b: Block, blk: u64, seed: u64, initial: Initial) -> Vec<u8> {
    let off = blk * BLK;
    match b {
        Block::Zeros => vec![0; BLK as usize],
        Block::Data(tag) => pattern(tag, off, BLK as usize),
        Block::Initial => initial_contents(initial, seed, off / SECTOR, BLK as usize),
    }
}

/// Rounds of sequential operations (writes, discards, write-zeroes with and without unmap,
/// an occasional FLUSH), each round ended by a SIGKILL right after the last operation
/// completed; after every restart the whole region must match an exact model: nothing that
/// completed may be lost, flushed or not. Then a clean shutdown and `qemu-img check`.
fn completed_changes_survive_kills(kind: Kind) {
    const ROUNDS: u64 = 6;
    const OPS: u64 = 48;
    let seed = base_seed(kind) ^ 0xD15C_A4D5;
    eprintln!("[{}] seed {seed}", kind.name());
    let dir = tempfile::tempdir().unwrap();
    let (img, initial) = make_image(dir.path(), kind, seed);
    let format = if kind.is_qcow2() { "qcow2" } else { "raw" };
    let cluster = if kind == Kind::Qcow2Cluster4k {
        4096
    } else {
        65536
    };
    let nblk = REGION / BLK;
    let mut model = vec![Block::Initial; nblk as usize];
    let mut rng = Rng(seed);
    let cfg = DaemonConfig::new();
    let verify_exact = |client: &mut Client, model: &[Block], what: &str| {
        let data = read_region(client);
        let bad: Vec<String> = (0..nblk)
            .filter(|&b| {
                data[(b * BLK) as usize..((b + 1) * BLK) as usize]
                    != expected_block(model[b as usize], b, seed, initial)[..]
            })
            .take(8)
            .map(|b| {
                format!(
                    "block {b} (offset {:#x}): want {:?}",
                    b * BLK,
                    model[b as usize]
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "[{}] {what}: completed changes lost:\n  {}\n--- daemon log ---\n{}",
            kind.name(),
            bad.join("\n  "),
            log_tail(dir.path())
        );
    };
    for round in 0..=ROUNDS {
        let d = Daemon::start_format(dir.path(), &img, format, &cfg);
        let mut client = connect_client(&d, &ClientOpts::default());
        verify_exact(&mut client, &model, &format!("after kill {round}"));
        if round == ROUNDS {
            drop(client);
            d.terminate_ok();
            break;
        }
        let q = client.q(0);
        for op in 0..OPS {
            let tag = round * 1000 + op + 1;
            match rng.range(0, 10) {
                0..=5 => {
                    let b = rng.range(0, nblk - 32);
                    let n = rng.range(1, 33);
                    let data = pattern(tag, b * BLK, (n * BLK) as usize);
                    q.write_ok(b * BLK, &data);
                    model[b as usize..(b + n) as usize].fill(Block::Data(tag));
                }
                6 | 7 => {
                    let per = cluster / BLK;
                    let c = rng.range(0, REGION / cluster - 4);
                    let n = rng.range(1, 5);
                    let d = q.discard(c * cluster, n * cluster);
                    assert_eq!(d.ret, 0, "discard: {}", d.errno_name());
                    model[(c * per) as usize..((c + n) * per) as usize].fill(Block::Zeros);
                }
                k => {
                    let b = rng.range(0, nblk - 32);
                    let n = rng.range(1, 33);
                    let flags = if k == 8 {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    let d = q.write_zeroes(b * BLK, n * BLK, flags);
                    assert_eq!(d.ret, 0, "write-zeroes: {}", d.errno_name());
                    model[b as usize..(b + n) as usize].fill(Block::Zeros);
                }
            }
            if rng.range(0, 16) == 0 {
                assert_eq!(q.flush().ret, 0, "FLUSH failed");
            }
        }
        drop(client);
        d.kill();
        if kind.is_qcow2() {
            let c = qemu_img_check(&img);
            assert!(
                c.clean() || c.code == 3,
                "[{}] qemu-img check after kill {round}: {}",
                kind.name(),
                c.output
            );
        }
    }
    if kind.is_qcow2() {
        let c = qemu_img_check(&img);
        assert!(
            c.clean(),
            "[{}] after the clean shutdown: {}",
            kind.name(),
            c.output
        );
    }
}

#[test]
fn completed_changes_survive_kills_raw() {
    completed_changes_survive_kills(Kind::Raw);
}

#[test]
fn completed_changes_survive_kills_qcow2() {
    completed_changes_survive_kills(Kind::Qcow2);
}

#[test]
fn completed_changes_survive_kills_qcow2_4k_clusters() {
    completed_changes_survive_kills(Kind::Qcow2Cluster4k);
}

#[test]
fn completed_changes_survive_kills_qcow2_backing_file() {
    completed_changes_survive_kills(Kind::Qcow2Backing);
}

#[test]
fn completed_changes_survive_kills_qcow2_compressed() {
    completed_changes_survive_kills(Kind::Qcow2Compressed);
}

#[test]
fn completed_changes_survive_kills_qcow2_extended_l2_backing_file() {
    completed_changes_survive_kills(Kind::Qcow2ExtendedL2Backing);
}

#[test]
fn completed_changes_survive_kills_qcow2_data_file() {
    completed_changes_survive_kills(Kind::Qcow2DataFile);
}

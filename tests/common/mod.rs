//! Shared helpers for the integration tests, one file per kind:
//!
//! * [`daemon`]: [`Daemon`], the backend under test as a child process (our binary, or
//!   qemu-storage-daemon with `VUB_TEST_BACKEND=qsd`), killed on drop.
//! * [`client`]: [`Client`], a synchronous libblkio frontend with one buffer per queue.
//! * [`guest`]: the end-to-end test guest (build, prerequisites, console log).
//! * [`raw`]: `RawClient`, a minimal vhost-user frontend for what libblkio will not send.
//! * [`image`]: the one deterministic data [`pattern`], image files, byte comparison.
//! * [`process`]: child processes that cannot outlive their test ([`ChildGuard`], [`Proc`],
//!   [`run_bin`]).
//! * [`tagged`]: sectors that name the write they came from (the crash tests' data).
//! * [`qemu_img`]: the one way to run `qemu-img` ([`qemu_img`], [`qemu_img_output`], with an
//!   `_in` variant of each for another working directory),
//!   `qemu-img check` and `create_qcow2`; and the one way to run `qemu-io` ([`qemu_io`],
//!   [`qemu_io_opts`], [`qemu_io_output`], [`qemu_io_interactive`]).
//!
//! Every wait in here is bounded (10 s) and panics with a message that says what was awaited.

// Each test crate uses a different subset of the helpers.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod daemon;
pub mod guest;
pub mod image;
pub mod process;
pub mod qemu_img;
pub mod raw;
pub mod tagged;

use std::time::Duration;

pub use client::*;
pub use daemon::*;
pub use image::*;
pub use process::*;
pub use qemu_img::*;

/// Upper bound for every wait: socket appearance, child exit, I/O completion.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of a virtio-blk sector.
pub const SECTOR: u64 = 512;

/// For a test whose prerequisite (root, a mount, a tool) is missing: prints `SKIPPED: why`
/// so a developer's partial run still passes, or panics when `CI` is set. `ci/test` (the
/// README's test command, which installs every prerequisite and runs as root) sets `CI`, so
/// in the full suite nothing is skipped silently.
pub fn skip_unless_ci(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED: {why}");
}

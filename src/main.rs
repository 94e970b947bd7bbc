//! `vhost-user-blk`: serve a disk image to a VM over the vhost-user protocol.
//!
//! Command line follows QEMU's vhost-user "Backend program conventions" for type `block`
//! (`--socket-path`/`--fd`, `--print-capabilities`, `--blk-file`, `--read-only`), plus our own
//! options. See README.md for examples.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use log::info;

use vhost_user_blk::control::{self, client as ctl, Request};
use vhost_user_blk::device::{Device, InactiveImage};
use vhost_user_blk::image::engine::Aio;
use vhost_user_blk::image::fault::{FaultImage, FaultSpec};
use vhost_user_blk::image::lock::RELEASE_GRACE;
use vhost_user_blk::image::null::NullImage;
use vhost_user_blk::image::qcow2::JournalMode;
use vhost_user_blk::image::{
    create_image, open_image_cached, open_image_locked, BlockImage, ImageFormat, ImageLocks,
    ImageOptions, Locking,
};
use vhost_user_blk::server::{
    bind_socket_with, handle_signals, listener_from_fd, listener_path, log_access, lookup_group,
    lookup_user, systemd_listen_fd, ListenOn, Server, Shutdown, SocketPerms,
};
use vhost_user_blk::vhost_user::MAX_QUEUES;
use vhost_user_blk::virtio_blk::{DetectZeroes, DeviceOptions, DeviceParams, DiscardPolicy};
use vhost_user_blk::{notify, Error, Result};

/// Capabilities printed by `--print-capabilities` (vhost-user.rst, type "block").
const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

/// Default number of queues offered. QEMU gives the guest one queue per vCPU by default and
/// refuses to start if the backend offers fewer, so offer the most we can; unused queues cost
/// an idle thread each and no file handle.
const DEFAULT_QUEUES: u16 = MAX_QUEUES as u16;

/// Serve a raw or qcow2 disk image to a virtual machine as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-blk",
    version,
    about,
    long_about = None,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Also serve a control socket (JSON lines: stats, flush, resize, bitmaps, activate,
    /// deactivate) at this path, owned by the daemon's user with mode 0600 unless
    /// --control-socket-owner/-group/-mode say otherwise. See docs/CONTROL.md.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Owner (user name or uid) of the control socket (needs privilege). Default: the
    /// daemon's user, whatever --socket-owner says: whoever can connect can resize the disk.
    #[arg(long, value_name = "USER", value_parser = lookup_user, requires = "control_socket")]
    control_socket_owner: Option<u32>,

    /// Group (name or gid) of the control socket, e.g. a monitoring group together with
    /// --control-socket-mode 0660. Default: the daemon's group.
    #[arg(long, value_name = "GROUP", value_parser = lookup_group, requires = "control_socket")]
    control_socket_group: Option<u32>,

    /// Permissions of the control socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode,
          requires = "control_socket")]
    control_socket_mode: u32,

    /// Listen for the VMM on this unix socket path (created with --socket-owner,
    /// --socket-group and --socket-mode).
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// Use this already-listening unix socket fd instead of --socket-path. Without either,
    /// a systemd socket-activation fd (LISTEN_FDS) is used.
    #[arg(long, value_name = "FD")]
    fd: Option<i32>,

    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// The disk image (regular file or block device) to serve.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["print_capabilities", "null_size"]
    )]
    blk_file: Option<PathBuf>,

    /// Serve a null device of this size instead of an image (reads return without touching
    /// guest memory, writes are dropped): the transport ceiling for benchmarks.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    null_size: Option<u64>,

    /// Serve the disk read-only: every write-like request fails with IOERR.
    #[arg(long)]
    read_only: bool,

    /// Image format. `auto` serves raw unless the file starts with the qcow2 magic, which it
    /// refuses (never guesses qcow2).
    #[arg(long, value_name = "FORMAT", default_value = "auto", value_parser = ImageFormat::from_str)]
    format: ImageFormat,

    /// Lock the image (and its backing and data files) as QEMU does, so QEMU, qemu-img and
    /// other daemons cannot write it while it is served: on, off (file systems without OFD
    /// locks; warns), or auto (on when the kernel has OFD locks).
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = Locking::from_str)]
    locking: Locking,

    /// Start as the destination of a live migration: read only what the device configuration
    /// needs, hold no lock and cache no metadata until the frontend starts the device (after
    /// the source's daemon handed the image over). See README, "Live migration".
    #[arg(long)]
    incoming: bool,

    /// Create the image with this size (e.g. 1G, 512M, 10737418240) if it does not exist.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    create: Option<u64>,

    /// Number of virtqueues offered (1..=64), each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    num_queues: u16,

    /// Maximum virtqueue size (a power of two, 4..=32768); seg_max is this minus 2.
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,

    /// Serial number returned to the guest by GET_ID (at most 20 bytes are used).
    #[arg(long, value_name = "STRING", default_value = "")]
    serial: String,

    /// Logical block size the guest sees: 512 or 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    logical_block_size: u32,

    /// qcow2: bytes of L2 tables kept in memory (e.g. 64M). Each MiB covers 8 GiB of guest
    /// space with 64 KiB clusters; the default 32M covers 256 GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    metadata_cache: Option<u64>,

    /// After each batch, busy-poll the queue this many microseconds for more requests before
    /// sleeping (0 disables polling: lowest CPU use, higher latency).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 32)]
    poll_us: u64,

    /// Testing only: make operations fail, e.g. write:eio:after=100:count=10 (see
    /// src/image/fault.rs).
    #[arg(long, value_name = "SPEC", hide = true)]
    inject_faults: Option<FaultSpec>,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,

    /// What a guest discard does: unmap frees the space in the image and gives it back to
    /// the host file system (thin provisioning); ignore completes it without doing anything
    /// (and write-zeroes never unmaps).
    #[arg(long, value_name = "POLICY", value_enum, default_value = "unmap")]
    discard: DiscardPolicy,

    /// What a write of all zero bytes becomes: off (written as is), on (a write-zeroes: a
    /// zero cluster in qcow2), unmap (also frees the space, with --discard unmap).
    #[arg(long, value_name = "MODE", value_enum, default_value = "off")]
    detect_zeroes: DetectZeroes,

    /// QEMU's cache modes: none (= --direct), writeback (the default), writethrough
    /// (= --writethrough), directsync (= --direct --writethrough).
    #[arg(long, value_name = "MODE", value_enum, conflicts_with_all = ["direct", "writethrough"])]
    cache: Option<CacheMode>,

    /// I/O engine of each queue: io_uring (every request in flight at once; falls back to
    /// sync, with a warning, where io_uring is unavailable) or sync (one request at a time on
    /// the queue's worker).
    #[arg(long, value_name = "ENGINE", default_value = "io_uring", value_parser = Aio::from_str)]
    aio: Aio,

    /// qcow2: directory (tmpfs or ramfs) of the mapping journal, which keeps the mapping
    /// changes of completed writes until a flush writes them to the image, so that they
    /// survive a crash of the daemon. Default /dev/shm (if unusable: --no-journal, with a
    /// warning).
    #[arg(long, value_name = "DIR", conflicts_with = "no_journal")]
    journal_dir: Option<PathBuf>,

    /// qcow2: no mapping journal; instead write metadata back before completing every
    /// request that changes a mapping (slower; completed writes still survive a crash of
    /// the daemon).
    #[arg(long)]
    no_journal: bool,

    /// Start in write-through mode: every write is durable before it completes. By default
    /// the cache is write-back and the guest flushes; the guest can switch (CONFIG_WCE).
    #[arg(long)]
    writethrough: bool,

    /// Owner (user name or uid) of the --socket-path socket, e.g. the user the VMM runs as
    /// (libvirt-qemu for libvirt on Debian; needs privilege). Default: the daemon's user.
    #[arg(long, value_name = "USER", value_parser = lookup_user)]
    socket_owner: Option<u32>,

    /// Group (name or gid) of the --socket-path socket, e.g. the VMM's group together with
    /// --socket-mode 0660. Default: the daemon's group.
    #[arg(long, value_name = "GROUP", value_parser = lookup_group)]
    socket_group: Option<u32>,

    /// Permissions of the socket created by --socket-path, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

/// Subcommands (instead of serving a disk).
#[derive(Subcommand, Debug)]
enum Command {
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
    /// Print the man page (roff) to stdout.
    Manpage,
    /// Print shell completions to stdout.
    Completions {
        /// Shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

/// Arguments of `ctl`.
#[derive(Args, Debug)]
struct CtlArgs {
    /// The daemon's --control-socket.
    #[arg(long, value_name = "PATH")]
    control_socket: PathBuf,
    /// Print the raw JSON result instead of a table (before or after the action).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: CtlAction,
}

/// What to ask the daemon.
#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Per-queue and image statistics.
    Stats {
        /// Output format: table (default), or prometheus text exposition.
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// Refresh the statistics table once a second, with rates.
    Watch,
    /// Write everything back to stable storage now.
    Flush,
    /// Grow the disk online (the guest is told through the vhost-user backend channel).
    Resize {
        /// New size (e.g. 20G); shrinking is refused.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// List persistent dirty bitmaps.
    Bitmaps,
    /// Clear a persistent dirty bitmap (start a new incremental-backup epoch).
    BitmapClear {
        /// Bitmap name.
        name: String,
    },
    /// Reopen and relock the image for serving (migration handover; see docs/CONTROL.md).
    Activate,
    /// Flush, close and unlock the image so another process can take it; refused while the
    /// frontend has queues started.
    Deactivate,
}

fn run_ctl(args: CtlArgs) -> Result<()> {
    let sock = &args.control_socket;
    let request = match &args.action {
        CtlAction::Watch => return ctl::watch(sock),
        CtlAction::Stats { format } => match format.as_deref() {
            Some("prometheus") => {
                let r = ctl::call(
                    sock,
                    &Request::Stats {
                        format: Some("prometheus".into()),
                    },
                )?;
                print!("{}", r.as_str().unwrap_or_default());
                return Ok(());
            }
            None | Some("table") => Request::Stats { format: None },
            Some(f) => return Err(Error::InvalidOption(format!("unknown --format {f}"))),
        },
        CtlAction::Flush => Request::Flush {},
        CtlAction::Resize { size } => Request::Resize { size: *size },
        CtlAction::Bitmaps => Request::Bitmaps {},
        CtlAction::BitmapClear { name } => Request::BitmapClear { name: name.clone() },
        CtlAction::Activate => Request::Activate {},
        CtlAction::Deactivate => Request::Deactivate {},
    };
    let result = ctl::call(sock, &request)?;
    if args.json {
        println!("{result}");
    } else if matches!(args.action, CtlAction::Stats { .. }) {
        print!("{}", ctl::stats_table(&result, None));
    } else if matches!(args.action, CtlAction::Bitmaps) {
        print!("{}", ctl::bitmaps_table(&result)?);
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    }
    Ok(())
}

/// Why a size or a mode on the command line is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum ArgError {
    /// A letter after the number other than K, M, G, T.
    #[error("unknown size suffix in '{0}'")]
    SizeSuffix(String),
    /// No number.
    #[error("'{0}' is not a size")]
    NotASize(String),
    /// Zero, or more than 64 bits.
    #[error("size '{0}' is zero or too large")]
    SizeRange(String),
    /// Not an octal mode of at most 0777.
    #[error("'{0}' is not an octal permission mode")]
    Mode(String),
}

/// `--cache`: QEMU's names for the combinations of O_DIRECT and write-through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CacheMode {
    /// O_DIRECT, write-back (the guest flushes): libvirt's cache='none'.
    None,
    /// Host page cache, write-back.
    Writeback,
    /// Host page cache, every write durable before it completes.
    Writethrough,
    /// O_DIRECT, every write durable before it completes.
    Directsync,
}

impl Cli {
    /// Folds `--cache` into `--direct` and `--writethrough` (clap refuses combining them).
    fn apply_cache_mode(mut self) -> Cli {
        if let Some(c) = self.cache {
            self.direct = matches!(c, CacheMode::None | CacheMode::Directsync);
            self.writethrough = matches!(c, CacheMode::Writethrough | CacheMode::Directsync);
        }
        self
    }
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024, optional "iB"/"B").
fn parse_size(s: &str) -> std::result::Result<u64, ArgError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(ArgError::SizeSuffix(s.to_owned())),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| ArgError::NotASize(s.to_owned()))?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| ArgError::SizeRange(s.to_owned()))
}

fn parse_mode(s: &str) -> std::result::Result<u32, ArgError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|&m| m <= 0o777)
        .ok_or_else(|| ArgError::Mode(s.to_owned()))
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

/// What opens the served image, again at each activation after a handover
/// (`Device::start_queue`, `Device::activate_now`).
struct Opener {
    null_size: Option<u64>,
    opts: ImageOptions,
    metadata_cache: Option<u64>,
    locking: Locking,
    faults: Option<FaultSpec>,
}

impl Opener {
    /// Opens the image for serving, locked (see `image::lock`), waiting up to `grace` for
    /// another process to let it go.
    fn open(&self, grace: Duration) -> Result<(Arc<dyn BlockImage>, ImageLocks)> {
        if let Some(size) = self.null_size {
            return Ok((Arc::new(NullImage::new(size)), ImageLocks::default()));
        }
        let (image, locks) =
            open_image_locked(&self.opts, self.metadata_cache, self.locking, grace)?;
        let image: Arc<dyn BlockImage> = match self.faults {
            Some(spec) => {
                log::warn!("injecting faults: {spec:?}");
                Arc::new(FaultImage::new(image, spec))
            }
            None => image,
        };
        Ok((image, locks))
    }

    /// For `--incoming`: what the device configuration needs, read without locks, metadata
    /// repair or writes (read-only), then closed. The image's owner may be writing it.
    fn peek(&self) -> Result<InactiveImage> {
        if let Some(size) = self.null_size {
            return Ok(InactiveImage::of(&NullImage::new(size)));
        }
        let mut opts = self.opts.clone();
        opts.read_only = true;
        opts.direct = false;
        let image = open_image_cached(&opts, None)?;
        let mut standin = InactiveImage::of(&*image);
        standin.set_read_only(self.opts.read_only);
        Ok(standin)
    }
}

/// The path of the image the options name and what opens it (with --create, the image is
/// created first if it does not exist).
fn opener(cli: &Cli) -> Result<(PathBuf, Opener)> {
    let opener = |opts| Opener {
        null_size: cli.null_size,
        opts,
        metadata_cache: cli.metadata_cache,
        locking: cli.locking,
        faults: cli.inject_faults,
    };
    if cli.null_size.is_some() {
        let path = PathBuf::from("null");
        return Ok((path.clone(), opener(ImageOptions::new(path, cli.format))));
    }
    let path = cli
        .blk_file
        .clone()
        .ok_or_else(|| Error::InvalidOption("--blk-file is required".into()))?;
    if let Some(size) = cli.create {
        if path.exists() {
            info!("{} exists; --create ignored", path.display());
        } else {
            if cli.read_only {
                return Err(Error::InvalidOption(
                    "--create makes an empty image; it makes no sense with --read-only".into(),
                ));
            }
            create_image(&path, cli.format, size)?;
            info!("created {} ({size} bytes)", path.display());
        }
    }
    let opts = ImageOptions {
        path: path.clone(),
        format: cli.format,
        read_only: cli.read_only,
        direct: cli.direct,
        logical_block_size: cli.logical_block_size,
        journal: match (&cli.journal_dir, cli.no_journal) {
            (_, true) => JournalMode::Off,
            (Some(d), false) => JournalMode::Dir(d.clone()),
            (None, false) => JournalMode::Default,
        },
        recorder: None,
        aio: cli.aio,
    };
    Ok((path, opener(opts)))
}

fn run(cli: Cli) -> Result<()> {
    // Signals are taken over first, before any file or socket is created: a SIGTERM that
    // arrives while the image is opened or the socket bound then still means "shut down
    // cleanly" (the loop sees the request and returns at once), not death by the default
    // action with the socket left behind.
    let shutdown = Arc::new(Shutdown::new()?);
    handle_signals(shutdown.clone())?;
    let listen = match (cli.socket_path.clone(), cli.fd) {
        (Some(p), None) => ListenOn::Path(p),
        (None, Some(fd)) => ListenOn::Fd(fd),
        (None, None) => match systemd_listen_fd() {
            Some(fd) => ListenOn::Fd(fd),
            None => {
                return Err(Error::InvalidOption(
                    "one of --socket-path or --fd is required (or systemd socket activation)"
                        .into(),
                ))
            }
        },
        (Some(_), Some(_)) => {
            return Err(Error::InvalidOption(
                "--socket-path and --fd are mutually exclusive".into(),
            ))
        }
    };

    // Conflicting options are checked here rather than by clap, so that they get the same
    // one-line error as every other setup problem, and before --create makes a file.
    if cli.null_size.is_some() && cli.blk_file.is_some() {
        return Err(Error::InvalidOption(
            "--null-size and --blk-file are mutually exclusive".into(),
        ));
    }
    DeviceParams::check_geometry(cli.logical_block_size, cli.num_queues, cli.queue_size)?;
    let (path, opener) = opener(&cli)?;
    // --incoming: nothing is opened for serving until the frontend starts the device.
    let (image, locks) = if cli.incoming {
        let standin: Arc<dyn BlockImage> = Arc::new(opener.peek()?);
        (standin, ImageLocks::default())
    } else {
        opener.open(RELEASE_GRACE)?
    };
    let mut params = DeviceParams::new(&DeviceOptions {
        size: image.virtual_size(),
        logical_block_size: cli.logical_block_size,
        discard_granularity: image.discard_granularity(),
        num_queues: cli.num_queues,
        queue_size: cli.queue_size,
        read_only: cli.read_only,
        serial: &cli.serial,
    })?;
    params.discard = cli.discard;
    params.detect_zeroes = cli.detect_zeroes;

    let perms = SocketPerms {
        mode: cli.socket_mode,
        uid: cli.socket_owner,
        gid: cli.socket_group,
    };
    // The control socket has its own owner, group and mode, by default the daemon's user
    // only: giving the vhost-user socket to the VMM's user must not let the VMM resize the
    // disk or drive other control operations.
    let control_perms = SocketPerms {
        mode: cli.control_socket_mode,
        uid: cli.control_socket_owner,
        gid: cli.control_socket_group,
    };
    // The control socket first: if the vhost-user socket then fails, remove the control
    // socket again, so a failed start leaves nothing behind.
    let control_listener = match &cli.control_socket {
        Some(p) => Some(bind_socket_with(p, control_perms)?),
        None => None,
    };
    let bound = match &listen {
        ListenOn::Path(p) => bind_socket_with(p, perms).map(|l| (l, Some(p.clone()))),
        ListenOn::Fd(fd) => listener_from_fd(*fd).map(|l| (l, None)),
    };
    let (listener, socket_path) = match bound {
        Ok(b) => b,
        Err(e) => {
            if let Some(p) = &cli.control_socket {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    info!(
        "serving {} ({}, {} bytes{}) on {} with {} queues of {} (cache: {})",
        path.display(),
        image.format_name(),
        params.capacity_sectors() * 512,
        if cli.read_only { ", read-only" } else { "" },
        match &listen {
            ListenOn::Path(p) => p.display().to_string(),
            ListenOn::Fd(fd) => format!("fd {fd}"),
        },
        cli.num_queues,
        cli.queue_size,
        if cli.writethrough {
            "write-through"
        } else {
            "write-back"
        },
    );
    // Who can connect, so that a VMM that hangs on "Permission denied" is one log line away
    // from the reason. An inherited socket is described too (when it has a path): its
    // creator, e.g. a systemd socket unit, chose its permissions.
    let private_hint = match &listen {
        ListenOn::Path(_) => {
            "a VMM running as another user, e.g. libvirt's QEMU as libvirt-qemu, gets \
             \"Permission denied\": see --socket-owner, --socket-group, --socket-mode"
        }
        ListenOn::Fd(_) => {
            "a VMM running as another user gets \"Permission denied\": see the socket \
             unit's SocketUser=, SocketGroup=, SocketMode="
        }
    };
    if let Some(p) = socket_path.clone().or_else(|| listener_path(&listener)) {
        log_access("vhost-user socket", &p, Some(private_hint));
    }
    if let Some(p) = &cli.control_socket {
        log_access("control socket", p, None);
    }
    let mut device = Device::new(
        image,
        params,
        usize::from(cli.queue_size),
        !cli.writethrough,
    );
    device.poll_ns = cli.poll_us.saturating_mul(1000);
    device.set_handover(
        locks,
        Box::new(move |grace| opener.open(grace)),
        !cli.incoming,
    );
    if cli.incoming {
        info!("incoming migration: the image stays closed and unlocked until the device starts");
    }
    let device = Arc::new(device);
    if let Some(l) = control_listener {
        control::spawn(l, device.clone()).map_err(|e| Error::io("start control socket", e))?;
    }
    let server = Server { device, shutdown };
    if let Err(e) = notify::notify("READY=1\nSTATUS=waiting for a frontend") {
        log::warn!("sd_notify failed: {e}");
    }
    let result = server.serve(listener);
    for path in socket_path.iter().chain(cli.control_socket.iter()) {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn main() -> ExitCode {
    let cli = Cli::parse().apply_cache_mode();
    match cli.command {
        Some(Command::Ctl(args)) => {
            return match run_ctl(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vhost-user-blk ctl: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Manpage) => {
            let page = clap_mangen::Man::new(Cli::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vhost-user-blk: error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "vhost-user-blk",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-blk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("01777").is_err());
    }

    #[test]
    fn cli_conflicts_are_rejected() {
        // --socket-path with --fd and --null-size with --blk-file parse; `run` refuses them
        // with a one-line error (tests/control_socket.rs::setup_errors_exit_with_one_line).
        assert!(Cli::try_parse_from(["x", "--socket-path", "a"]).is_err());
        assert!(Cli::try_parse_from(["x", "--print-capabilities"]).is_ok());
        assert!(Cli::try_parse_from(["x", "--blk-file", "f", "--num-queues", "65"]).is_err());
        assert!(Cli::try_parse_from(["x", "--blk-file", "f", "--format", "vmdk"]).is_err());
    }
}

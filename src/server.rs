//! The listening socket, the per-connection loop and clean shutdown on signals.
//!
//! The daemon listens on one unix socket for its whole life and serves one frontend at a time.
//! Each accepted connection gets a fresh [`BlkBackend`] (fresh features, cache mode, vrings and
//! worker threads); when the frontend goes away the workers are stopped and joined, the image
//! is flushed, and the next connection is accepted. A VM reboot or a QEMU restart with
//! `reconnect-ms` therefore just works.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{error, info, warn};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::notify;
use crate::sync::lock;
use crate::vhost_user::{interposer, BlkBackend, Connection};

/// Where the listening socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenOn {
    /// Bind a new socket at this path.
    Path(PathBuf),
    /// Use an already-listening socket passed as this fd (`--fd` or systemd `LISTEN_FDS`).
    Fd(RawFd),
}

/// Who may use a socket the daemon creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits.
    pub mode: u32,
    /// Owner to give the socket (None: the daemon's user).
    pub uid: Option<u32>,
    /// Group to give the socket (None: the daemon's group).
    pub gid: Option<u32>,
}

/// Why a `--socket-owner` or `--socket-group` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name has a NUL byte.
    #[error("bad {kind} name '{name}'")]
    BadName {
        /// "user" or "group".
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// No such user or group.
    #[error("no {kind} '{name}'")]
    NotFound {
        /// "user" or "group".
        kind: &'static str,
        /// The name given.
        name: String,
    },
}

/// Resolves a user name or number to a uid.
pub fn lookup_user(name: &str) -> std::result::Result<u32, LookupError> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = c_name("user", name)?;
    // SAFETY: getpwnam reads a NUL-terminated string; the returned record is only read
    // before any other call that could overwrite it (start-up, single-threaded).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(not_found("user", name));
    }
    // SAFETY: pw is non-null and points to libc's static passwd record.
    Ok(unsafe { (*pw).pw_uid })
}

/// Resolves a group name or number to a gid.
pub fn lookup_group(name: &str) -> std::result::Result<u32, LookupError> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = c_name("group", name)?;
    // SAFETY: as for getpwnam above.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(not_found("group", name));
    }
    // SAFETY: gr is non-null and points to libc's static group record.
    Ok(unsafe { (*gr).gr_gid })
}

fn c_name(kind: &'static str, name: &str) -> std::result::Result<CString, LookupError> {
    CString::new(name).map_err(|_| LookupError::BadName {
        kind,
        name: name.to_owned(),
    })
}

fn not_found(kind: &'static str, name: &str) -> LookupError {
    LookupError::NotFound {
        kind,
        name: name.to_owned(),
    }
}

/// Binds a unix socket at `path` with permissions, owner and group from `perms`.
///
/// A leftover socket file nobody listens on (a crashed daemon's) is replaced; a live socket or
/// any other kind of file at `path` is an error, so we never hijack another daemon's socket or
/// delete a user's file.
pub fn bind_socket_with(path: &Path, perms: SocketPerms) -> Result<UnixListener> {
    let mode = perms.mode;
    let sock_err = |reason: String| Error::Socket {
        path: path.display().to_string(),
        reason,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(sock_err("another process is listening on it".into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("removing stale socket {}", path.display());
                fs::remove_file(path).map_err(|e| sock_err(format!("remove stale socket: {e}")))?;
            }
            Err(e) => return Err(sock_err(format!("cannot check existing socket: {e}"))),
        },
        Ok(_) => return Err(sock_err("path exists and is not a socket".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e.to_string())),
    }
    // Bind and listen under a temporary name, set the mode, then rename into place: the path
    // appears only once it accepts connections with the final permissions (a client that
    // waits for the path never sees ECONNREFUSED), and the socket is created with no
    // permissions for others, so nobody can connect before the chmod.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    // SAFETY: umask only changes this process's file creation mask; called during start-up.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&tmp);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| sock_err(e.to_string()))?;
    let placed = std::os::unix::fs::chown(&tmp, perms.uid, perms.gid)
        .map_err(|e| sock_err(format!("chown: {e}")))
        .and_then(|()| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .map_err(|e| sock_err(format!("chmod {mode:o}: {e}")))
        })
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| sock_err(format!("rename: {e}"))));
    if placed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    placed.map(|()| listener)
}

/// Who may connect to a unix socket: its owner, group and permission bits.
///
/// Connecting to a unix socket needs write permission on the socket file, checked like any
/// file access: the owner's bits for the owner, the group's bits for members of the group, the
/// others' bits for everybody else (root needs none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Owner of the socket file.
    pub uid: u32,
    /// Group of the socket file.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

impl SocketAccess {
    /// The owner, group and mode of the socket file at `path`.
    pub fn of_path(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        Ok(SocketAccess {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        })
    }

    /// True if no user but the owner (and root) can connect.
    pub fn owner_only(&self) -> bool {
        self.mode & 0o022 == 0
    }

    /// Who can connect, for the start-up log: "owner U, group G, mode M: WHO can connect".
    pub fn describe(&self) -> String {
        let (user, group) = (user_name(self.uid), group_name(self.gid));
        let (u, g, o) = (
            self.mode & 0o200 != 0,
            self.mode & 0o020 != 0,
            self.mode & 0o002 != 0,
        );
        let who = match (u, g, o) {
            (true, true, true) => "every user can".to_owned(),
            (_, _, true) => {
                let mut but = Vec::new();
                if !u {
                    but.push(format!("user {user}"));
                }
                if !g {
                    but.push(format!("group {group}"));
                }
                format!("every user but {} can", but.join(" and "))
            }
            (true, false, false) => format!("only user {user} can"),
            (true, true, false) => format!("user {user} and group {group} can"),
            (false, true, false) => format!("group {group} (not user {user}) can"),
            (false, false, false) => "only root can".to_owned(),
        };
        format!(
            "owner {user}, group {group}, mode {:04o}: {who} connect",
            self.mode
        )
    }
}

/// The name of user `uid`, or the number if it has none.
fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns null or libc's static passwd record; only the main thread
    // looks up users and groups, and the name is copied before the next lookup.
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return uid.to_string();
    }
    // SAFETY: pw is non-null, so pw_name is a NUL-terminated string in that record.
    let name = unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) };
    name.to_string_lossy().into_owned()
}

/// The name of group `gid`, or the number if it has none.
fn group_name(gid: u32) -> String {
    // SAFETY: as for getpwuid in `user_name`.
    let gr = unsafe { libc::getgrgid(gid) };
    if gr.is_null() {
        return gid.to_string();
    }
    // SAFETY: gr is non-null, so gr_name is a NUL-terminated string in that record.
    let name = unsafe { std::ffi::CStr::from_ptr((*gr).gr_name) };
    name.to_string_lossy().into_owned()
}

/// Logs at info level who can connect to the socket `what` at `path`. `private_hint` is
/// added when only the daemon's own user can: it says how to let a VMM running as another
/// user in, since that VMM otherwise just sees "Permission denied" (and, retrying, hangs).
pub fn log_access(what: &str, path: &Path, private_hint: Option<&str>) {
    match SocketAccess::of_path(path) {
        Ok(access) => {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            let hint = match private_hint {
                Some(h) if access.owner_only() && access.uid == me => format!(" ({h})"),
                _ => String::new(),
            };
            info!("{what} {}: {}{hint}", path.display(), access.describe());
        }
        Err(e) => warn!("cannot stat {what} {}: {e}", path.display()),
    }
}

/// The path a listening unix socket is bound to, if it has one (not abstract or unnamed).
pub fn listener_path(listener: &UnixListener) -> Option<PathBuf> {
    listener
        .local_addr()
        .ok()?
        .as_pathname()
        .map(Path::to_path_buf)
}

/// Takes over an inherited listening unix socket.
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener> {
    let sock_err = |reason: String| Error::Socket {
        path: format!("fd {fd}"),
        reason,
    };
    if fd < 0 {
        return Err(sock_err("not a valid file descriptor".into()));
    }
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, a live local.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut val as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(sock_err(format!(
            "not a socket: {}",
            io::Error::last_os_error()
        )));
    }
    if val == 0 {
        return Err(sock_err("socket is not listening".into()));
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut domain as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 || domain != libc::AF_UNIX {
        return Err(sock_err("not a unix domain socket".into()));
    }
    // SAFETY: fcntl on an fd we just checked is an open socket.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd is an open, listening unix socket handed to us to own (--fd / systemd);
    // nothing else in this process uses it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// The listening fd passed by systemd socket activation, if any (`LISTEN_PID` is us and
/// `LISTEN_FDS` >= 1: the first one, fd 3). Clears the variables so children don't inherit them.
pub fn systemd_listen_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || n == 0 {
        return None;
    }
    if n > 1 {
        warn!("LISTEN_FDS={n}: using only the first socket (fd 3)");
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    Some(3)
}

/// Coordinates shutdown between the signal thread and the connection loop.
///
/// The connection loop waits for a frontend in `poll` on the listening socket and an eventfd;
/// a shutdown request writes the eventfd. The listening socket itself is never shut down: with
/// `--fd` or systemd socket activation it is shared with the service manager, which keeps
/// accepting connections on it for the next instance of the daemon.
pub struct Shutdown {
    requested: AtomicBool,
    /// Handle to close the current frontend connection, if one is being served.
    conn: Mutex<Option<ShutdownHandle>>,
    /// Written once shutdown is requested; wakes the connection loop's `poll`.
    wake: EventFd,
}

impl Shutdown {
    /// A shutdown coordinator with its wake-up eventfd.
    pub fn new() -> Result<Self> {
        Ok(Shutdown {
            requested: AtomicBool::new(false),
            conn: Mutex::new(None),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
                .map_err(|e| Error::io("create the shutdown eventfd", e))?,
        })
    }

    /// True once shutdown was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks the connection loop to stop: closes the current connection (its workers then
    /// stop) and wakes a pending `accept`.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        if let Some(h) = lock(&self.conn).as_ref() {
            h.shutdown();
        }
        if let Err(e) = self.wake.write(1) {
            error!("waking the connection loop for shutdown failed: {e}");
        }
    }

    /// Waits until `listener` has a connection to accept (true) or shutdown is requested
    /// (false).
    fn wait_for_frontend(&self, listener: &UnixListener) -> bool {
        loop {
            if self.requested() {
                return false;
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two valid pollfd entries of a live local array.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("waiting for a frontend failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[1].revents != 0 {
                return !self.requested();
            }
            if fds[0].revents != 0 {
                return true;
            }
        }
    }

    fn set_conn(&self, handle: Option<ShutdownHandle>) {
        *lock(&self.conn) = handle;
        // A request that came in before the handle was stored must still close it.
        if self.requested() {
            self.request();
        }
    }
}

/// Everything needed to serve connections.
pub struct Server {
    /// The disk being served.
    pub device: Arc<Device>,
    /// Shared with the signal thread.
    pub shutdown: Arc<Shutdown>,
}

impl Server {
    /// Serves frontends one after another until shutdown is requested, then closes the image
    /// (after every worker has stopped).
    pub fn serve(&self, listener: UnixListener) -> Result<()> {
        let relay = RelaySocket::new()?;
        while !self.shutdown.requested() {
            self.serve_one(&listener, &relay)?;
        }
        info!("shutting down: closing the image");
        let _ = notify::notify("STOPPING=1");
        self.device
            .image()
            .close()
            .map_err(|e| Error::io("closing the image", e))
    }

    /// Accepts one frontend and serves it until it disconnects.
    fn serve_one(&self, listener: &UnixListener, relay: &RelaySocket) -> Result<()> {
        if !self.shutdown.wait_for_frontend(listener) {
            return Ok(());
        }
        let frontend = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if !self.shutdown.requested() && e.kind() != io::ErrorKind::Interrupted {
                    // Accept failures (e.g. out of fds) are transient: report and try again.
                    warn!("accepting a frontend failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok(());
            }
        };
        info!("frontend connected");
        let _ = notify::notify("STATUS=serving a frontend");
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let conn = Arc::new(Connection::default());
        let backend = Arc::new(
            BlkBackend::new(self.device.clone(), conn.clone(), mem.clone())
                .map_err(|e| Error::io("create backend", e))?,
        );
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), mem)
            .map_err(Error::VhostUser)?;
        backend.set_epoll_handlers(daemon.get_epoll_handlers());
        // vhost-user-backend talks to our relay, which talks to the frontend.
        daemon
            .start_client(&relay.path_str)
            .map_err(Error::VhostUser)?;
        let handler_side = relay.accept()?;
        let relay_threads = interposer::start(frontend, handler_side, conn.clone())
            .map_err(|e| Error::io("start relay", e))?;
        self.device.set_connection(Some(conn));
        self.shutdown.set_conn(daemon.shutdown_handle());
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => info!("frontend connection ended: {e}"),
        }
        self.shutdown.set_conn(None);
        backend.finish_connection(daemon);
        // Only now, with its workers gone and its queues forgotten: `connected: false` in
        // `stats` tells a management tool that a control `deactivate` will not be refused
        // for started queues.
        self.device.set_connection(None);
        let _ = notify::notify("STATUS=waiting for a frontend");
        for t in relay_threads {
            let _ = t.join();
        }
        if let Err(e) = self.device.flush() {
            error!("flush after disconnect failed: {e}");
        }
        Ok(())
    }
}

/// The private socket vhost-user-backend connects to, in a fresh 0700 directory. Only a
/// connection from this very process is accepted.
struct RelaySocket {
    dir: PathBuf,
    path_str: String,
    listener: UnixListener,
}

impl RelaySocket {
    fn new() -> Result<Self> {
        let mut template = std::env::temp_dir()
            .join("vhost-user-blk.XXXXXX")
            .into_os_string()
            .into_vec();
        template.push(0);
        // SAFETY: mkdtemp rewrites the XXXXXX of the NUL-terminated buffer we own in place.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr() as *mut libc::c_char) };
        if p.is_null() {
            return Err(Error::io(
                "create a private directory for the relay socket",
                io::Error::last_os_error(),
            ));
        }
        template.pop();
        let dir = PathBuf::from(std::ffi::OsString::from_vec(template));
        let path = dir.join("handler.sock");
        let listener = UnixListener::bind(&path).map_err(|e| Error::Socket {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::InvalidOption("temporary directory path is not UTF-8".into()))?
            .to_owned();
        Ok(RelaySocket {
            dir,
            path_str,
            listener,
        })
    }

    /// Accepts vhost-user-backend's connection, refusing any other process.
    fn accept(&self) -> Result<UnixStream> {
        loop {
            let (s, _) = self
                .listener
                .accept()
                .map_err(|e| Error::io("accept on the relay socket", e))?;
            if peer_pid(&s) == Some(std::process::id() as libc::pid_t) {
                return Ok(s);
            }
            warn!("refused a foreign connection to the private relay socket");
        }
    }
}

impl Drop for RelaySocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path_str);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Process id of the peer of a connected unix socket.
fn peer_pid(s: &UnixStream) -> Option<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a live local.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

/// How long the signal thread waits for a clean shutdown before giving up.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts
/// later) and starts a thread that waits for them and requests shutdown. If the connection
/// loop has not finished within 20 s (`SHUTDOWN_TIMEOUT`; a worker stuck in I/O), the process
/// exits with status 1 without closing the image. Call before any other thread is started.
pub fn handle_signals(shutdown: Arc<Shutdown>) -> Result<()> {
    // SAFETY: sigset manipulation on a zeroed local set; pthread_sigmask only changes this
    // thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(Error::io("block signals", io::Error::from_raw_os_error(r)));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads the set (a live local copy) and writes one c_int.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r != 0 {
                error!("sigwait failed: {}", io::Error::from_raw_os_error(r));
                std::process::exit(1);
            }
            info!("received signal {sig}, shutting down");
            shutdown.request();
            std::thread::sleep(SHUTDOWN_TIMEOUT);
            error!(
                "shutdown did not finish within {}s; exiting without closing the image",
                SHUTDOWN_TIMEOUT.as_secs()
            );
            std::process::exit(1);
        })
        .map_err(|e| Error::io("start signal thread", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_says_who_can_connect() {
        // uid 0 and gid 0 are named root on every Linux system; 4000000000 has no name.
        for (uid, mode, who) in [
            (0, 0o600, "only user root can"),
            (4_000_000_000, 0o660, "user 4000000000 and group root can"),
            (0, 0o060, "group root (not user root) can"),
            (0, 0o666, "every user can"),
            (0, 0o646, "every user but group root can"),
            (0, 0o000, "only root can"),
            // Read and execute bits do not matter for connecting.
            (0, 0o755, "only user root can"),
        ] {
            let owner = if uid == 0 {
                "root".into()
            } else {
                uid.to_string()
            };
            assert_eq!(
                SocketAccess { uid, gid: 0, mode }.describe(),
                format!("owner {owner}, group root, mode {mode:04o}: {who} connect")
            );
        }
    }

    #[test]
    fn owner_only_means_no_group_or_other_write() {
        let a = |mode| SocketAccess {
            uid: 0,
            gid: 0,
            mode,
        };
        assert!(a(0o600).owner_only());
        assert!(a(0o644).owner_only());
        assert!(!a(0o620).owner_only());
        assert!(!a(0o602).owner_only());
    }
}

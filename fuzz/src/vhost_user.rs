//! Harness for the vhost-user control path: a real `VhostUserDaemon` running our `BlkBackend`
//! over an in-memory disk, fed fuzzer-built vhost-user messages on a unix socket.
//!
//! Per input, exactly what `Server::serve_one` builds for one frontend: a `Device` over the
//! in-memory disk, a fresh `BlkBackend` + `VhostUserDaemon` connected to a private relay socket
//! (one per process, in a temp dir), and the `interposer` relaying between that and the
//! "frontend" (one end of a `UnixStream::pair()`; the harness holds the other end). The input
//! is decoded into messages written to the frontend end, replies are drained, then the
//! connection is closed and the daemon, its queue workers and the relay threads are joined. A hang anywhere shows
//! up as a libFuzzer timeout (run with `-timeout=N`), a panic in any thread as a crash.
//!
//! Input layout: byte 0 picks the device (bit0 4096-byte blocks, bit1 read-only, bit2
//! write-back default, bits3-4 number of queues - 1), then records until the input ends:
//!
//! - `ctl` byte, `ctl >> 6 == 0 or 1`: one message.
//!   `code: u8`, `flags: u8`, `size: u16 LE`, then `min(size, 4096)` payload bytes.
//!   The header's flags are `1 | (flags & 0xc)` (version 1, REPLY/NEED_REPLY bits) unless
//!   `flags & 0x80`, then `flags & 0x3f` verbatim (bad versions, reserved bits).
//!   The header's size is the payload length actually sent, unless `ctl & 0x10`, then it is
//!   `size` verbatim (short/long messages). With `ctl & 1`, `1 + ((ctl >> 1) & 3)` fds go
//!   along: eventfds for SET_VRING_KICK/CALL/ERR (the kick ones are remembered), a unix socket
//!   for SET_BACKEND_REQ_FD, otherwise dups of the guest-memory memfd (for SET_MEM_TABLE /
//!   ADD_MEM_REG / SET_INFLIGHT_FD / SET_LOG_*).
//!   With `ctl & 8`, every remembered kick eventfd is signalled after the message.
//! - `ctl >> 6 == 2`: guest-memory poke: `offset: u16 LE` (times 16), `len: u8`, `len` bytes
//!   written into the memfd (which SET_MEM_TABLE can map as guest memory).
//! - `ctl >> 6 == 3`: signal every remembered kick eventfd.
//!
//! After a kick the harness waits (at most 20 ms) until the queue workers have consumed the
//! kick eventfds, so that the rings get processed before the next message.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use vhost_user_blk::device::Device;
use vhost_user_blk::stats::ReqKind;
use vhost_user_blk::vhost_user::{interposer, BlkBackend, Connection};
use vhost_user_blk::virtio_blk::{DeviceOptions, DeviceParams};

use crate::{Bytes, MemDisk, MemImage};

/// Size of the memfd offered as guest memory.
pub const MEMFD_SIZE: u64 = 1 << 20;
/// Most messages one input may send.
const MAX_MESSAGES: usize = 128;

/// vhost-user request codes that carry an fd we want to be an eventfd.
const SET_VRING_KICK: u8 = 12;
const SET_VRING_CALL: u8 = 13;
const SET_VRING_ERR: u8 = 14;
/// ... and a socket for the backend channel.
const SET_BACKEND_REQ_FD: u8 = 21;

/// The private socket vhost-user-backend connects to (the relay's handler side), for the
/// whole process, like the daemon's `RelaySocket`.
struct RelaySocket {
    _dir: tempfile::TempDir,
    path: String,
    listener: UnixListener,
}

fn relay_socket() -> &'static Mutex<RelaySocket> {
    static SOCKET: OnceLock<Mutex<RelaySocket>> = OnceLock::new();
    SOCKET.get_or_init(|| {
        // A peer closing the connection must give EPIPE, not kill the fuzzer.
        // SAFETY: setting SIGPIPE's disposition to SIG_IGN has no memory-safety impact.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handler.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        Mutex::new(RelaySocket {
            _dir: dir,
            path: path.to_str().expect("utf-8 temp path").to_owned(),
            listener,
        })
    })
}

fn memfd() -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe {
        libc::memfd_create(
            c"vub-fuzz-guest".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd is a fresh, valid fd nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEMFD_SIZE).expect("memfd size");
    // Sealed against shrinking, as the daemon requires of an inflight region: the same fd
    // passed with SET_INFLIGHT_FD is then accepted, so the fuzzer reaches inflight recovery
    // (on a region whose contents it controls) and not only its refusal.
    // SAFETY: fcntl on our own fd; the seal only forbids shrinking it.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert!(r >= 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
    f
}

/// Reads whatever replies are waiting, without blocking.
fn drain(stream: &UnixStream) {
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: recv into a live local buffer of the stated length.
        let r = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r <= 0 {
            return;
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let cfg = b.u8();
    let lbs: u32 = if cfg & 1 != 0 { 4096 } else { 512 };
    let read_only = cfg & 2 != 0;
    let writeback = cfg & 4 != 0;
    let num_queues = u16::from((cfg >> 3) & 3) + 1;
    let disk_size = 64 * 1024;
    let params = DeviceParams::new(&DeviceOptions {
        size: disk_size,
        logical_block_size: lbs,
        discard_granularity: 4096,
        num_queues,
        queue_size: 256,
        read_only,
        serial: "fuzz-serial",
    })
    .expect("params");
    let image = Arc::new(MemImage {
        disk: MemDisk::new(disk_size as usize),
        capacity: params.capacity_sectors() * 512,
        lbs: u64::from(lbs),
        read_only,
    });

    let device = Arc::new(Device::new(image, params, 256, writeback));

    // What `Server::serve_one` does, with a socket pair standing in for the accepted frontend.
    let (client, frontend) = UnixStream::pair().expect("socketpair");
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let conn = Arc::new(Connection::default());
    let backend = Arc::new(
        BlkBackend::new(device.clone(), conn.clone(), mem.clone()).expect("backend"),
    );
    let mut daemon =
        VhostUserDaemon::new("vub-fuzz".into(), backend.clone(), mem).expect("daemon");
    let relay = relay_socket().lock().unwrap_or_else(|e| e.into_inner());
    daemon.start_client(&relay.path).expect("connect to relay socket");
    let (handler_side, _) = relay.listener.accept().expect("accept on relay socket");
    drop(relay);
    let relay_threads =
        interposer::start(frontend, handler_side, conn.clone()).expect("start relay");
    device.set_connection(Some(conn));

    let guest = memfd();
    let mut kicks: Vec<EventFd> = Vec::new();
    let mut other_events: Vec<EventFd> = Vec::new();
    let mut channels: Vec<(UnixStream, UnixStream)> = Vec::new();
    let mut keep: Vec<File> = Vec::new();
    let mut sent = 0usize;
    // Signals every kick eventfd, then gives the queue workers up to 20 ms to pick the kicks
    // up (an eventfd stops polling readable once the worker has read it), so that the ring is
    // processed before the next message rather than racing with the teardown.
    let kick_all = |kicks: &Vec<EventFd>| {
        for k in kicks {
            let _ = k.write(1);
        }
        let deadline = Instant::now() + Duration::from_millis(20);
        for k in kicks {
            loop {
                let mut pfd = libc::pollfd {
                    fd: k.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one live pollfd we own, no timeout.
                let r = unsafe { libc::poll(&mut pfd, 1, 0) };
                if r <= 0 || Instant::now() >= deadline {
                    break;
                }
                std::thread::yield_now();
            }
        }
    };
    while !b.is_empty() && sent < MAX_MESSAGES {
        let ctl = b.u8();
        match ctl >> 6 {
            2 => {
                let off = u64::from(b.u16()) * 16;
                let len = usize::from(b.u8());
                let bytes = b.take(len);
                let _ = guest.write_at(bytes, off % MEMFD_SIZE);
                continue;
            }
            3 => {
                kick_all(&kicks);
                continue;
            }
            _ => {}
        }
        let code = b.u8();
        let fl = b.u8();
        let size = b.u16();
        let payload = b.take(usize::from(size).min(4096));
        let flags: u32 = if fl & 0x80 != 0 {
            u32::from(fl & 0x3f)
        } else {
            1 | u32::from(fl & 0xc)
        };
        let hdr_size: u32 = if ctl & 0x10 != 0 {
            u32::from(size)
        } else {
            payload.len() as u32
        };
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&u32::from(code).to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&hdr_size.to_le_bytes());
        msg.extend_from_slice(payload);

        let mut fds: Vec<RawFd> = Vec::new();
        if ctl & 1 != 0 {
            let n = 1 + usize::from((ctl >> 1) & 3);
            for _ in 0..n {
                match code {
                    SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
                        fds.push(e.as_raw_fd());
                        if code == SET_VRING_KICK {
                            kicks.push(e);
                        } else {
                            other_events.push(e);
                        }
                    }
                    SET_BACKEND_REQ_FD => {
                        let (ours, theirs) = UnixStream::pair().expect("socketpair");
                        fds.push(theirs.as_raw_fd());
                        channels.push((ours, theirs));
                    }
                    _ => {
                        let f = guest.try_clone().expect("dup memfd");
                        fds.push(f.as_raw_fd());
                        keep.push(f);
                    }
                }
            }
        }
        let r = if fds.is_empty() {
            (&client).write_all(&msg)
        } else {
            match client.send_with_fds(&[&msg[..]], &fds) {
                Ok(n) if n < msg.len() => (&client).write_all(&msg[n..]),
                Ok(_) => Ok(()),
                Err(e) => Err(io::Error::from(e)),
            }
        };
        sent += 1;
        if r.is_err() {
            // The daemon closed the connection (it rejected a message): the input is done.
            break;
        }
        if ctl & 8 != 0 {
            kick_all(&kicks);
        }
        drain(&client);
    }

    // Hang up and tear everything down as `Server::serve_one` does.
    let _ = client.shutdown(std::net::Shutdown::Both);
    drop(client);
    let _ = daemon.wait();
    device.set_connection(None);
    backend.finish_connection(daemon);
    for t in relay_threads {
        t.join().expect("relay thread panicked");
    }
    let _ = device.flush();
    if crate::debug() {
        let done: Vec<String> = device
            .queues
            .iter()
            .map(|q| {
                let n: u64 = ReqKind::ALL.iter().map(|&k| q.requests(k)).sum();
                format!("{n} (errors {})", q.errors.load(Ordering::Relaxed))
            })
            .collect();
        eprintln!(
            "vhost_user: {sent} messages sent, {} in the input; requests per queue: {}",
            if b.is_empty() { "all" } else { "not all" },
            done.join(", ")
        );
    }
    drop(kicks);
    drop(other_events);
    drop(channels);
    drop(keep);
}

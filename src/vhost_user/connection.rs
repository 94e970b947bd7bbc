//! The state of one frontend connection that lives outside vhost-user-backend: what the
//! [`interposer`](super::interposer) learned while relaying (the backend channel, whether
//! REPLY_ACK was negotiated, the inflight region, when the memory table last changed) and the
//! way back to the frontend ([`Connection::notify_config_change`]).
//!
//! One [`Connection`] exists per accepted frontend; the relay writes it, the queue workers and
//! the control socket read it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use log::debug;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::inflight::InflightRegion;
use super::interposer::{
    BACKEND_CONFIG_CHANGE_MSG, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, HDR,
};
use crate::stats::now_ns;
use crate::sync::lock;
use crate::virtio_blk::GuestMem;

/// How long a memory table update counts as recent for [`Connection::memory_settles`].
const MEM_MSG_RECENT: Duration = Duration::from_secs(1);
/// How long [`Connection::memory_settles`] waits for the shared memory map to change.
const MEM_SETTLE_WAIT: Duration = Duration::from_millis(200);
/// Bound on a frontend's answer to `CONFIG_CHANGE_MSG` (and on sending it).
const BACKEND_CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the relay learned about one connection, and the way back to the frontend.
#[derive(Default)]
pub struct Connection {
    /// Our duplicate of the backend-to-frontend channel, once the frontend sent it.
    backend_req: Mutex<Option<UnixStream>>,
    /// REPLY_ACK was negotiated: the frontend answers `CONFIG_CHANGE_MSG`.
    reply_ack: AtomicBool,
    /// The inflight region the frontend gave us (SET_INFLIGHT_FD), if any.
    inflight: ArcSwapOption<InflightRegion>,
    /// Bumped each time a region is set, so workers notice and recover.
    inflight_gen: AtomicU64,
    /// Regions handed out by GET_INFLIGHT_FD, kept until the frontend sets one.
    offered: Mutex<Option<Arc<InflightRegion>>>,
    /// A duplicate of the frontend connection (owned, so its number cannot be reused while we
    /// hold it), to see unread messages.
    frontend: Mutex<Option<OwnedFd>>,
    /// [`now_ns`] when the last memory table message was relayed (0: never).
    last_mem_msg_ns: AtomicU64,
    /// Rings the frontend gave a kick (SET_VRING_KICK) and has not stopped (GET_VRING_BASE)
    /// since, one bit each: started in vhost-user.rst's sense, even before their first kick.
    rings: AtomicU64,
}

impl Connection {
    /// The relay saw SET_VRING_KICK for ring `index` (it starts).
    pub fn ring_kick_set(&self, index: u64) {
        if let Some(bit) = 1u64.checked_shl(u32::try_from(index).unwrap_or(u32::MAX)) {
            self.rings.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// The relay saw GET_VRING_BASE for ring `index` (it stops), or, with `None`, a reset.
    pub fn ring_stopped(&self, index: Option<u64>) {
        let bit = match index {
            Some(i) => 1u64
                .checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
                .unwrap_or(0),
            None => u64::MAX,
        };
        self.rings.fetch_and(!bit, Ordering::Relaxed);
    }

    /// The rings the frontend started and has not stopped, one bit each (see `rings`).
    pub fn rings_started(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }

    /// Called when a request referenced memory the worker's map `current` lacks. If a memory
    /// table update may be on its way (messages not yet read from the frontend, or one relayed
    /// in the last second), waits up to 200 ms for the shared map to change and returns whether
    /// it did. The frontend may legitimately kick a queue right after sending an update without
    /// waiting for its reply; the kick (an eventfd) can then overtake the update.
    pub fn memory_settles(&self, mem: &GuestMemoryAtomic<GuestMem>, current: &GuestMem) -> bool {
        let recent = {
            let t = self.last_mem_msg_ns.load(Ordering::Acquire);
            t != 0 && u128::from(now_ns().saturating_sub(t)) < MEM_MSG_RECENT.as_nanos()
        };
        if !recent && !self.frontend_has_unread() {
            return false;
        }
        let deadline = Instant::now() + MEM_SETTLE_WAIT;
        loop {
            if !std::ptr::eq(
                &*mem.memory() as *const GuestMem,
                current as *const GuestMem,
            ) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn frontend_has_unread(&self) -> bool {
        let guard = lock(&self.frontend);
        let Some(fd) = guard.as_ref() else {
            return false;
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, a live local; the fd is our
        // own duplicate of the frontend socket, open while the guard is held.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        r == 0 && n > 0
    }

    /// The current inflight region and its generation.
    pub fn inflight(&self) -> (u64, Option<Arc<InflightRegion>>) {
        let gen = self.inflight_gen.load(Ordering::Acquire);
        (gen, self.inflight.load_full())
    }

    /// Tells the frontend the configuration space changed (e.g. the capacity grew), so it
    /// re-reads it and notifies the guest. Returns `Ok(false)` when the frontend gave us no
    /// backend channel (it did not negotiate BACKEND_REQ).
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let mut guard = lock(&self.backend_req);
        let Some(sock) = guard.as_mut() else {
            return Ok(false);
        };
        let result = Self::send_config_change(sock, self.reply_ack.load(Ordering::Acquire));
        if result.is_err() {
            // The channel may now be out of step (a late reply): stop using it.
            *guard = None;
        }
        result.map(|()| true)
    }

    fn send_config_change(sock: &mut UnixStream, need_reply: bool) -> io::Result<()> {
        let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        let mut msg = [0u8; HDR];
        msg[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        sock.write_all(&msg)?;
        if need_reply {
            let mut reply = [0u8; HDR + 8];
            sock.read_exact(&mut reply)?;
            let req = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
            let rflags = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&reply[HDR..]);
            if req != BACKEND_CONFIG_CHANGE_MSG || rflags & FLAG_REPLY == 0 {
                return Err(io::Error::other("unexpected reply to CONFIG_CHANGE_MSG"));
            }
            if u64::from_le_bytes(v) != 0 {
                return Err(io::Error::other("frontend failed CONFIG_CHANGE_MSG"));
            }
        }
        Ok(())
    }

    /// Keeps a duplicate of the frontend's socket, to see whether it has unread messages.
    pub(super) fn set_frontend(&self, frontend: Option<OwnedFd>) {
        *lock(&self.frontend) = frontend;
    }

    /// Notes that a memory table message is being relayed now.
    pub(super) fn memory_message(&self) {
        self.last_mem_msg_ns.store(now_ns(), Ordering::Release);
    }

    /// Notes whether REPLY_ACK was negotiated (SET_PROTOCOL_FEATURES).
    pub(super) fn set_reply_ack(&self, reply_ack: bool) {
        self.reply_ack.store(reply_ack, Ordering::Release);
    }

    /// Keeps the backend channel the frontend sent (SET_BACKEND_REQ_FD), with bounded waits:
    /// a frontend that never answers CONFIG_CHANGE_MSG must not hang the control socket.
    pub(super) fn set_backend_req(&self, sock: Option<UnixStream>) {
        debug!("frontend set the backend channel: {}", sock.is_some());
        if let Some(sock) = &sock {
            let _ = sock.set_read_timeout(Some(BACKEND_CHANNEL_TIMEOUT));
            let _ = sock.set_write_timeout(Some(BACKEND_CHANNEL_TIMEOUT));
        }
        *lock(&self.backend_req) = sock;
    }

    /// Keeps a region handed out by GET_INFLIGHT_FD until the frontend sets one.
    pub(super) fn offer_inflight(&self, region: InflightRegion) {
        *lock(&self.offered) = Some(Arc::new(region));
    }

    /// Makes `region` (SET_INFLIGHT_FD) the one workers track and recover from.
    pub(super) fn set_inflight(&self, region: InflightRegion) {
        self.inflight.store(Some(Arc::new(region)));
        self.inflight_gen.fetch_add(1, Ordering::AcqRel);
        *lock(&self.offered) = None;
    }
}

//! A vhost-user message interposer between the frontend and vhost-user-backend's handler.
//!
//! vhost-user-backend runs the protocol, but its `Backend` type (the backend-to-frontend
//! channel) cannot send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, which online resize needs. So
//! the daemon does not hand the frontend's socket to vhost-user-backend directly: it connects
//! vhost-user-backend to a private socket of its own and relays every message, unchanged,
//! between the two, with the file descriptors they carry. While relaying it keeps a duplicate
//! of the backend channel passed in `SET_BACKEND_REQ_FD` and notes whether REPLY_ACK was
//! negotiated (in the connection's [`Connection`]), so
//! [`Connection::notify_config_change`] can send the message itself.
//!
//! Only the control plane goes through here (a few dozen messages per connection, plus memory
//! table updates); virtqueue kicks and calls are eventfds that never touch the relay.
//! Messages are framed by their 12-byte header; a payload over [`MAX_PAYLOAD`] ends the
//! connection.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::connection::Connection;
use super::inflight::InflightRegion;
use crate::sync::lock;

/// Largest payload relayed (vhost-user messages are far smaller).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one message may carry.
const MAX_FDS: usize = 32;
/// Header size: request, flags, size (three little-endian u32).
pub(super) const HDR: usize = 12;

/// `VHOST_USER_SET_MEM_TABLE`.
const SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_SET_LOG_BASE`.
const SET_LOG_BASE: u32 = 6;
/// `VHOST_USER_ADD_MEM_REG`.
const ADD_MEM_REG: u32 = 37;
/// `VHOST_USER_REM_MEM_REG`.
const REM_MEM_REG: u32 = 38;
/// `VHOST_USER_SET_PROTOCOL_FEATURES`.
const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
pub(super) const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Protocol feature bit REPLY_ACK.
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
/// Header flag: protocol version 1.
pub(super) const FLAG_VERSION: u32 = 0x1;
/// Header flag: this is a reply.
pub(super) const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply.
pub(super) const FLAG_NEED_REPLY: u32 = 0x8;

/// `VHOST_USER_GET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
const SET_INFLIGHT_FD: u32 = 32;
/// VHOST_USER_RESET_OWNER: every ring stops.
const RESET_OWNER: u32 = 4;
/// VHOST_USER_GET_VRING_BASE: the ring stops.
const GET_VRING_BASE: u32 = 11;
/// VHOST_USER_SET_VRING_KICK: the ring starts (payload: index in bits 0..8).
const SET_VRING_KICK: u32 = 12;
/// VHOST_USER_RESET_DEVICE: every ring stops.
const RESET_DEVICE: u32 = 34;
/// Size of `VhostUserInflight` (mmap_size, mmap_offset, num_queues, queue_size, padding).
const INFLIGHT_MSG: usize = 24;

/// One framed message with its descriptors.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[HDR..]
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut bytes = vec![0u8; HDR];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: bytes.as_mut_ptr() as *mut libc::c_void,
        iov_len: HDR,
    }];
    // SAFETY: the iovec points to `bytes`, HDR writable bytes we own for this call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; we are their only owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = sock;
    r.read_exact(&mut bytes[n..])?;
    let size = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes"),
        ));
    }
    bytes.resize(HDR + size, 0);
    r.read_exact(&mut bytes[HDR..])?;
    Ok(Some(Message { bytes, fds }))
}

fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = if raw.is_empty() {
        0
    } else {
        sock.send_with_fds(&[&msg.bytes[..]], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
    };
    let mut w = sock;
    w.write_all(&msg.bytes[sent..])
}

/// What to do with a relayed message.
enum Action {
    /// Pass it on.
    Forward,
    /// Answered here: send this reply back to the sender instead (or nothing).
    Answered(Option<Message>),
    /// A message we refuse to pass on: end the connection.
    Close,
}

/// Relays messages from `from` to `to` until either side closes; `inspect` sees each one
/// first and may answer it itself. Writes to the frontend are serialised by `frontend_lock`.
fn relay(
    from: UnixStream,
    to: UnixStream,
    name: &'static str,
    frontend_lock: Arc<Mutex<()>>,
    to_is_frontend: bool,
    mut inspect: impl FnMut(&Message) -> Action,
) {
    let write_locked = |sock: &UnixStream, msg: &Message| {
        let _g = lock(&frontend_lock);
        write_message(sock, msg)
    };
    loop {
        match read_message(&from) {
            Ok(Some(msg)) => {
                let r = match inspect(&msg) {
                    Action::Forward if to_is_frontend => write_locked(&to, &msg),
                    Action::Forward => write_message(&to, &msg),
                    // Only frontend requests are answered here, so the reply goes back to
                    // the frontend (`from`).
                    Action::Answered(Some(reply)) => write_locked(&from, &reply),
                    Action::Answered(None) => Ok(()),
                    Action::Close => break,
                };
                if let Err(e) = r {
                    debug!("{name}: forwarding failed: {e}");
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                warn!("{name}: {e}; closing the connection");
                break;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Starts relaying between the `frontend` connection and the `handler`'s socket. Returns the
/// two relay threads (they end when either side disconnects); what the relay learns goes
/// into `conn`.
pub fn start(
    frontend: UnixStream,
    handler: UnixStream,
    conn: Arc<Connection>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let (f2, h2) = (frontend.try_clone()?, handler.try_clone()?);
    conn.set_frontend(frontend.try_clone().ok().map(OwnedFd::from));
    let lock = Arc::new(Mutex::new(()));
    let lock2 = lock.clone();
    let to_handler = std::thread::Builder::new()
        .name("vhost-relay-rx".into())
        .spawn(move || {
            relay(frontend, handler, "frontend->handler", lock, false, |msg| {
                inspect_frontend(&conn, msg)
            })
        })?;
    let to_frontend = std::thread::Builder::new()
        .name("vhost-relay-tx".into())
        .spawn(move || {
            relay(h2, f2, "handler->frontend", lock2, true, |_| {
                Action::Forward
            })
        })?;
    Ok([to_handler, to_frontend])
}

/// A reply to `req` with `payload` and `fds`.
fn reply(req: &Message, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
    let mut bytes = Vec::with_capacity(HDR + payload.len());
    bytes.extend_from_slice(&req.request().to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    Message { bytes, fds }
}

/// Parses a `VhostUserInflight` payload: (mmap_size, mmap_offset, num_queues, queue_size).
fn parse_inflight(p: &[u8]) -> Option<(u64, u64, u16, u16)> {
    let p = p.get(..20)?;
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&p[i..i + 8]);
        u64::from_le_bytes(a)
    };
    Some((
        u64_at(0),
        u64_at(8),
        u16::from_le_bytes([p[16], p[17]]),
        u16::from_le_bytes([p[18], p[19]]),
    ))
}

fn inflight_payload(mmap_size: u64, num_queues: u16, queue_size: u16) -> [u8; INFLIGHT_MSG] {
    let mut p = [0u8; INFLIGHT_MSG];
    p[0..8].copy_from_slice(&mmap_size.to_le_bytes());
    p[16..18].copy_from_slice(&num_queues.to_le_bytes());
    p[18..20].copy_from_slice(&queue_size.to_le_bytes());
    p
}

/// GET_INFLIGHT_FD: a fresh region for the geometry the frontend asks for.
fn get_inflight(conn: &Connection, msg: &Message) -> Message {
    let region = parse_inflight(msg.payload())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
        .and_then(|(_, _, nq, qs)| InflightRegion::create(nq, qs));
    match region.and_then(|r| Ok((r.file().try_clone()?, r))) {
        Ok((file, region)) => {
            let payload =
                inflight_payload(region.mmap_size(), region.num_queues(), region.queue_size());
            conn.offer_inflight(region);
            reply(msg, &payload, vec![OwnedFd::from(file)])
        }
        Err(e) => {
            warn!("GET_INFLIGHT_FD refused: {e}");
            // A zero mmap_size tells the frontend there is no region.
            reply(msg, &[0u8; INFLIGHT_MSG], Vec::new())
        }
    }
}

/// SET_INFLIGHT_FD: map the region the frontend hands (back) to us.
fn set_inflight(conn: &Connection, msg: &Message) -> Option<Message> {
    let result = match (parse_inflight(msg.payload()), msg.fds.first()) {
        (Some((size, offset, nq, qs)), Some(fd)) => fd
            .try_clone()
            .and_then(|fd| InflightRegion::open(std::fs::File::from(fd), offset, size, nq, qs)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SET_INFLIGHT_FD without a payload or fd",
        )),
    };
    let status: u64 = match result {
        Ok(region) => {
            info!(
                "inflight region set: {} queue(s) of {} entries",
                region.num_queues(),
                region.queue_size()
            );
            conn.set_inflight(region);
            0
        }
        Err(e) => {
            warn!("SET_INFLIGHT_FD refused: {e}");
            1
        }
    };
    (msg.flags() & FLAG_NEED_REPLY != 0).then(|| reply(msg, &status.to_le_bytes(), Vec::new()))
}

/// Why a memory table message is refused.
#[derive(Debug, thiserror::Error)]
enum MemRegionError {
    /// The region's fd cannot be examined.
    #[error("cannot stat memory region {region}'s fd: {source}")]
    Stat { region: usize, source: io::Error },
    /// Mapping the region would reach past the end of its file.
    #[error(
        "memory region {region} ({size} bytes at offset {offset}) runs past the end of its \
         {file_size}-byte file"
    )]
    PastEnd {
        region: usize,
        size: u64,
        offset: u64,
        file_size: i64,
    },
}

/// Checks that every memory region of a SET_MEM_TABLE / ADD_MEM_REG message, and the dirty log
/// of a SET_LOG_BASE, lies inside the file passed for it. A region mapped past the end of its
/// file faults (SIGBUS) on the first access, which would kill the daemon; such a message ends
/// the connection instead.
fn check_mem_regions(msg: &Message) -> Result<(), MemRegionError> {
    let p = msg.payload();
    let u64_at = |i: usize| -> Option<u64> {
        let b = p.get(i..i + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    };
    // Region layout: guest_phys_addr, memory_size, userspace_addr, mmap_offset (u64 each).
    let regions: Vec<(u64, u64)> = match msg.request() {
        SET_MEM_TABLE => {
            let n = p
                .get(0..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .unwrap_or(0)
                .min(MAX_FDS);
            (0..n)
                .map(|r| {
                    let base = 8 + r * 32;
                    (
                        u64_at(base + 8).unwrap_or(0),
                        u64_at(base + 24).unwrap_or(0),
                    )
                })
                .collect()
        }
        ADD_MEM_REG => vec![(u64_at(16).unwrap_or(0), u64_at(32).unwrap_or(0))],
        // VhostUserLog: mmap_size, mmap_offset.
        SET_LOG_BASE => vec![(u64_at(0).unwrap_or(0), u64_at(8).unwrap_or(0))],
        _ => return Ok(()),
    };
    for (i, &(size, offset)) in regions.iter().enumerate() {
        let Some(fd) = msg.fds.get(i) else {
            // vhost-user-backend refuses a region without its fd itself.
            continue;
        };
        // SAFETY: `struct stat` is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `struct stat` into `st`, a live local, for an fd we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(MemRegionError::Stat {
                region: i,
                source: io::Error::last_os_error(),
            });
        }
        let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        let end = offset.checked_add(size);
        if is_file && end.is_none_or(|e| e > st.st_size as u64) {
            return Err(MemRegionError::PastEnd {
                region: i,
                size,
                offset,
                file_size: st.st_size,
            });
        }
    }
    Ok(())
}

fn inspect_frontend(conn: &Connection, msg: &Message) -> Action {
    if matches!(msg.request(), SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG) {
        conn.memory_message();
    }
    if matches!(msg.request(), SET_MEM_TABLE | ADD_MEM_REG | SET_LOG_BASE) {
        if let Err(e) = check_mem_regions(msg) {
            warn!("refusing the frontend's memory table or dirty log: {e}; closing the connection");
            return Action::Close;
        }
    }
    match msg.request() {
        GET_INFLIGHT_FD => return Action::Answered(Some(get_inflight(conn, msg))),
        SET_INFLIGHT_FD => return Action::Answered(set_inflight(conn, msg)),
        _ => {}
    }
    match msg.request() {
        SET_PROTOCOL_FEATURES if msg.flags() & FLAG_REPLY == 0 => {
            if let Some(b) = msg.payload().get(..8) {
                let mut v = [0u8; 8];
                v.copy_from_slice(b);
                let features = u64::from_le_bytes(v);
                conn.set_reply_ack(features & PROTOCOL_F_REPLY_ACK != 0);
            }
        }
        SET_BACKEND_REQ_FD => {
            let dup = msg
                .fds
                .first()
                .and_then(|fd| fd.try_clone().ok())
                .map(UnixStream::from);
            conn.set_backend_req(dup);
        }
        // Which rings the frontend has started, for the control socket's `deactivate` (which
        // refuses while any is). Safety does not rest on this: a ring's worker activates the
        // device before it runs.
        SET_VRING_KICK => {
            if let Some(v) = payload_u64(msg) {
                conn.ring_kick_set(v & 0xff);
            }
        }
        GET_VRING_BASE => {
            if let Some(v) = payload_u64(msg) {
                // struct vhost_vring_state: index (u32), num (u32).
                conn.ring_stopped(Some(v & 0xffff_ffff));
            }
        }
        RESET_OWNER | RESET_DEVICE => conn.ring_stopped(None),
        _ => {}
    }
    Action::Forward
}

/// The first 8 payload bytes, little-endian.
fn payload_u64(msg: &Message) -> Option<u64> {
    let b = msg.payload().get(..8)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn relays_messages_and_fds_both_ways() {
        let (vmm, frontend) = UnixStream::pair().unwrap();
        let (handler, daemon) = UnixStream::pair().unwrap();
        let threads = start(frontend, handler, Arc::new(Connection::default())).unwrap();
        // A message with a payload and an fd, sent in two pieces.
        let (a, _b) = UnixStream::pair().unwrap();
        let m = msg(5, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        vmm.send_with_fds(&[&m[..4]], &[a.as_raw_fd()]).unwrap();
        (&vmm).write_all(&m[4..]).unwrap();
        let got = read_message(&daemon).unwrap().unwrap();
        assert_eq!(got.bytes, m);
        assert_eq!(got.fds.len(), 1);
        // And a reply back.
        let r = msg(5, 1 | FLAG_REPLY, &[9; 8]);
        (&daemon).write_all(&r).unwrap();
        let got = read_message(&vmm).unwrap().unwrap();
        assert_eq!(got.bytes, r);
        drop(vmm);
        for t in threads {
            t.join().unwrap();
        }
        // The daemon side sees the end of the connection.
        assert!(read_message(&daemon).unwrap().is_none());
    }

    #[test]
    fn the_relay_tracks_which_rings_are_started() {
        let (vmm, frontend) = UnixStream::pair().unwrap();
        let (handler, daemon) = UnixStream::pair().unwrap();
        let conn = Arc::new(Connection::default());
        let threads = start(frontend, handler, conn.clone()).unwrap();
        let relay = |m: Vec<u8>| {
            (&vmm).write_all(&m).unwrap();
            assert_eq!(read_message(&daemon).unwrap().unwrap().bytes, m);
        };
        // SET_VRING_KICK for rings 0 and 2 (ring 2 without an fd: bit 8, polling).
        relay(msg(SET_VRING_KICK, 1, &0u64.to_le_bytes()));
        relay(msg(SET_VRING_KICK, 1, &(2u64 | 0x100).to_le_bytes()));
        assert_eq!(conn.rings_started(), 0b101);
        // GET_VRING_BASE of ring 2 (index, num).
        relay(msg(GET_VRING_BASE, 1, &[2, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(conn.rings_started(), 0b001);
        relay(msg(RESET_DEVICE, 1, &[]));
        assert_eq!(conn.rings_started(), 0);
        drop(vmm);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn oversized_payload_closes_the_connection() {
        let (vmm, frontend) = UnixStream::pair().unwrap();
        let (handler, daemon) = UnixStream::pair().unwrap();
        let threads = start(frontend, handler, Arc::new(Connection::default())).unwrap();
        let mut m = msg(1, 1, &[]);
        m[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&vmm).write_all(&m).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert!(read_message(&daemon).unwrap().is_none());
    }

    #[test]
    fn config_change_goes_over_the_backend_channel() {
        let (vmm, frontend) = UnixStream::pair().unwrap();
        let (handler, daemon) = UnixStream::pair().unwrap();
        let conn = Arc::new(Connection::default());
        let _threads = start(frontend, handler, conn.clone()).unwrap();
        assert!(!conn.notify_config_change().unwrap(), "no channel yet");
        // Negotiate REPLY_ACK, then hand over the backend channel.
        (&vmm)
            .write_all(&msg(
                SET_PROTOCOL_FEATURES,
                1,
                &PROTOCOL_F_REPLY_ACK.to_le_bytes(),
            ))
            .unwrap();
        read_message(&daemon).unwrap().unwrap();
        let (ours, vmm_side) = UnixStream::pair().unwrap();
        let m = msg(SET_BACKEND_REQ_FD, 1, &[]);
        vmm.send_with_fds(&[&m[..]], &[ours.as_raw_fd()]).unwrap();
        drop(ours);
        read_message(&daemon).unwrap().unwrap();
        let frontend_thread = std::thread::spawn(move || {
            let got = read_message(&vmm_side).unwrap().unwrap();
            assert_eq!(got.request(), BACKEND_CONFIG_CHANGE_MSG);
            assert_ne!(got.flags() & FLAG_NEED_REPLY, 0);
            (&vmm_side)
                .write_all(&msg(
                    BACKEND_CONFIG_CHANGE_MSG,
                    1 | FLAG_REPLY,
                    &0u64.to_le_bytes(),
                ))
                .unwrap();
        });
        assert!(conn.notify_config_change().unwrap());
        frontend_thread.join().unwrap();
        drop(vmm);
    }

    /// Relays `m` with `fd` through a fresh interposer: what reaches the backend's side
    /// (None: the connection was closed instead).
    fn relayed(m: &[u8], fd: RawFd) -> Option<Vec<u8>> {
        let (vmm, frontend) = UnixStream::pair().unwrap();
        let (handler, daemon) = UnixStream::pair().unwrap();
        let _threads = start(frontend, handler, Arc::new(Connection::default())).unwrap();
        vmm.send_with_fds(&[m], &[fd]).unwrap();
        read_message(&daemon).unwrap().map(|got| got.bytes)
    }

    #[test]
    fn memory_region_past_its_file_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("mem")).unwrap();
        f.set_len(4096).unwrap();
        // ADD_MEM_REG: padding, then guest_phys_addr, memory_size, userspace_addr,
        // mmap_offset.
        let region = |size: u64| {
            let mut p = vec![0u8; 8];
            for v in [0u64, size, 0x7000_0000, 0] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            msg(ADD_MEM_REG, 1, &p)
        };
        assert_eq!(relayed(&region(1 << 20), f.as_raw_fd()), None, "forwarded");
        // A region that fits is forwarded.
        let m = region(4096);
        assert_eq!(relayed(&m, f.as_raw_fd()), Some(m));
    }

    #[test]
    fn dirty_log_past_its_file_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("log")).unwrap();
        f.set_len(4096).unwrap();
        // VhostUserLog: mmap_size, mmap_offset.
        let log = |size: u64, offset: u64| {
            let mut p = size.to_le_bytes().to_vec();
            p.extend_from_slice(&offset.to_le_bytes());
            msg(SET_LOG_BASE, 1, &p)
        };
        for bad in [log(8192, 0), log(4096, 1), log(u64::MAX, 2)] {
            assert_eq!(relayed(&bad, f.as_raw_fd()), None, "forwarded");
        }
        let good = log(4096, 0);
        assert_eq!(relayed(&good, f.as_raw_fd()), Some(good));
    }
}

//! A deliberately minimal, synchronous vhost-user-blk frontend: one split virtqueue, driven by
//! polling its used ring. It exists to do what blkio will not:
//!
//! * send requests blkio refuses to send: writes, discards and write-zeroes to a device that
//!   advertises VIRTIO_BLK_F_RO (blkio fails them client-side), VIRTIO_BLK_T_GET_ID, unknown
//!   request types, data buffers outside guest memory;
//! * speak the protocol message by message: features, protocol features, the configuration
//!   space, memory table updates ([`RawClient::send`], [`RawClient::call`], [`RawClient::ack`]);
//! * keep several requests in flight ([`RawClient::submit`], [`RawClient::kick`]) and, with
//!   inflight I/O tracking ([`RawOpts::inflight`]), reconnect to a new daemon with the same
//!   guest memory, rings and inflight region ([`RawClient::reconnect`]), as QEMU does when its
//!   backend restarts.
//!
//! Guest memory is one memfd region whose guest addresses equal our virtual addresses. Acks no
//! EVENT_IDX and no indirect descriptors. Each request uses a slot of three descriptors (head
//! `3 * slot`: header, then data or a segment, then the status byte) with its own header and
//! status byte, so up to `queue_size / 3` requests can be in flight.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use super::WAIT_TIMEOUT;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

// Virtio feature bits (virtio 1.2, 5.2.3 and 6).
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// VHOST_F_LOG_ALL (vhost): the frontend logs dirty memory.
pub const F_LOG_ALL: u64 = 1 << 26;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
/// The virtio features [`RawOpts::default`] acks (those of them the device offers).
pub const DEFAULT_FEATURES: u64 =
    F_VERSION_1 | F_PROTOCOL_FEATURES | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;

// Protocol feature bits (vhost-user.rst, "Protocol features").
pub const PF_MQ: u64 = 1 << 0;
pub const PF_LOG_SHMFD: u64 = 1 << 1;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

// Frontend message types (vhost-user.rst, "Front-end message types").
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;
pub const SET_CONFIG: u32 = 25;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Size of the guest memory region every client has.
pub const MEM_LEN: usize = 2 << 20;
/// Largest queue size the ring layout below has room for.
pub const MAX_QUEUE_SIZE: u16 = 64;
const DESC_OFF: usize = 0;
const AVAIL_OFF: usize = 1024;
const USED_OFF: usize = 2048;
/// Request headers, 16 bytes per slot.
const HDR_OFF: usize = 4096;
/// Discard / write-zeroes segments, 16 bytes per slot.
const SEG_OFF: usize = 4096 + 512;
/// Status bytes, one per slot.
const STATUS_OFF: usize = 4096 + 1024;
pub const DATA_OFF: usize = 8192;
pub const MAX_DATA: usize = MEM_LEN - DATA_OFF;

/// A shared memory region backed by a memfd and mapped into this process; its guest
/// address is its address here. Unmapped on drop.
pub struct GuestMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    /// A zeroed region of `len` bytes.
    pub fn new(len: usize) -> GuestMem {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"raw-vhost-user".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `raw` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone().expect("dup memfd"))
            .set_len(len as u64)
            .expect("size the memfd");
        // SAFETY: a new shared mapping of our own memfd, which is `len` bytes long; it is
        // unmapped only in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        GuestMem {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    /// Guest address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The region as vhost-user messages describe it: `[guest address, size, our address,
    /// offset in the fd]`.
    pub fn region(&self) -> [u64; 4] {
        [self.addr(), self.len as u64, self.addr(), 0]
    }

    /// The bytes `off..off + len`.
    pub fn bytes(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside our live mapping (checked above) and borrowed
        // mutably from `self`. The daemon writes only where requests point; tests read
        // a buffer only after its request completed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }

    fn put<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: inside our live mapping (checked above); a volatile write, because the
        // daemon shares this memory.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<T>(), v) }
    }

    fn get<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: inside our live mapping (checked above); a volatile read, because the
        // daemon writes this memory concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<T>()) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A SET_MEM_TABLE payload for `regions`, each `[guest address, size, our address, fd
/// offset]` (one fd per region goes with the message).
pub fn mem_table(regions: &[[u64; 4]]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes()); // padding
    for v in regions.iter().flatten() {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// An ADD_MEM_REG / REM_MEM_REG payload for one region (see [`mem_table`]).
pub fn mem_region(region: [u64; 4]) -> Vec<u8> {
    let mut p = 0u64.to_le_bytes().to_vec(); // padding
    for v in region {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// How [`RawClient::connect_with`] sets up the connection.
#[derive(Clone, Copy, Debug)]
pub struct RawOpts {
    /// Virtqueue size: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// Virtio features to ack (only those the device offers are acked).
    pub features: u64,
    /// Protocol features to ack (only those the backend offers are acked). With
    /// REPLY_ACK, every setup message after SET_PROTOCOL_FEATURES is checked.
    pub protocol_features: u64,
    /// Inflight I/O tracking: ack INFLIGHT_SHMFD, GET_INFLIGHT_FD on the first connection
    /// and SET_INFLIGHT_FD on every connection (QEMU's order: before the memory table).
    pub inflight: bool,
}

impl Default for RawOpts {
    fn default() -> Self {
        RawOpts {
            queue_size: 16,
            features: DEFAULT_FEATURES,
            protocol_features: 0,
            inflight: false,
        }
    }
}

/// One request for [`RawClient::submit`].
#[derive(Clone, Copy, Debug)]
pub struct RawReq {
    /// `T_IN`, `T_OUT`, ... (or anything else, to test refusal).
    pub req_type: u32,
    /// The header's sector.
    pub sector: u64,
    /// The data buffer: guest address and length (device-writable for IN and GET_ID).
    pub data: Option<(u64, u32)>,
    /// Instead of data: one discard / write-zeroes segment (sector, sectors, flags).
    pub seg: Option<(u64, u32, u32)>,
}

/// One used ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Descriptor head of the request.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
    /// The request's status byte now (0xff: the device did not write it).
    pub status: u8,
}

/// One frontend connection with its guest memory, virtqueue 0 and (optionally) inflight
/// region; see the module documentation.
pub struct RawClient {
    sock: UnixStream,
    mem: GuestMem,
    kick: OwnedFd,
    call: OwnedFd,
    opts: RawOpts,
    avail_idx: u16,
    next_slot: u16,
    /// Protocol features acked on this connection.
    acked_protocol: u64,
    /// The inflight region GET_INFLIGHT_FD returned (fd and the reply's payload), handed
    /// back with SET_INFLIGHT_FD on every connection.
    inflight: Option<(OwnedFd, Vec<u8>)>,
    /// Features the device offered (before our masking).
    pub device_features: u64,
    /// Protocol features the backend offered.
    pub protocol_features: u64,
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open(socket: &Path) -> UnixStream {
    let sock =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    sock.set_read_timeout(Some(WAIT_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(WAIT_TIMEOUT)).unwrap();
    sock
}

fn iovec(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// A msghdr for one iovec and the control buffer `control` (u64s: aligned for cmsghdr).
fn msghdr(iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (no buffers).
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(control) as _;
    mh
}

fn u64_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

impl RawClient {
    /// Connects with [`RawOpts::default`] and sets up virtqueue 0 (accepting
    /// VIRTIO_BLK_F_RO if offered).
    pub fn connect(socket: &Path) -> RawClient {
        Self::connect_with(socket, RawOpts::default())
    }

    /// Connects with `opts` and sets up virtqueue 0 with fresh guest memory.
    pub fn connect_with(socket: &Path, opts: RawOpts) -> RawClient {
        assert!(
            opts.queue_size.is_power_of_two() && (4..=MAX_QUEUE_SIZE).contains(&opts.queue_size),
            "queue size {}",
            opts.queue_size
        );
        let mut c = RawClient {
            sock: open(socket),
            mem: GuestMem::new(MEM_LEN),
            kick: eventfd(),
            call: eventfd(),
            opts,
            avail_idx: 0,
            next_slot: 0,
            acked_protocol: 0,
            inflight: None,
            device_features: 0,
            protocol_features: 0,
        };
        c.setup(0);
        c
    }

    /// Connects to (a new daemon on) `socket` as a frontend does after its backend died:
    /// the same guest memory, rings, eventfds and inflight region, with the queue's base
    /// (SET_VRING_BASE) set to `vring_base`. QEMU sends the used index there when the old
    /// connection broke (it could not ask for the base); the avail index is what a
    /// frontend that never rewinds would send.
    pub fn reconnect(&mut self, socket: &Path, vring_base: u16) {
        self.sock = open(socket);
        self.setup(vring_base);
    }

    fn setup(&mut self, vring_base: u16) {
        self.send(SET_OWNER, &[], &[]);
        self.device_features = self.get_u64(GET_FEATURES);
        assert!(
            self.device_features & F_PROTOCOL_FEATURES != 0,
            "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
        );
        let acked = self.device_features & self.opts.features;
        self.send(SET_FEATURES, &acked.to_le_bytes(), &[]);
        self.protocol_features = self.get_u64(GET_PROTOCOL_FEATURES);
        let wanted = self.opts.protocol_features
            | if self.opts.inflight {
                PF_INFLIGHT_SHMFD
            } else {
                0
            };
        self.acked_protocol = wanted & self.protocol_features;
        assert!(
            !self.opts.inflight || self.acked_protocol & PF_INFLIGHT_SHMFD != 0,
            "backend lacks INFLIGHT_SHMFD"
        );
        let acked_protocol = self.acked_protocol;
        self.send(SET_PROTOCOL_FEATURES, &acked_protocol.to_le_bytes(), &[]);
        if self.opts.inflight {
            self.set_inflight();
        }
        let table = mem_table(&[self.mem.region()]);
        let memfd = self.mem.fd();
        self.setup_msg(SET_MEM_TABLE, &table, &[memfd]);

        let state = |num: u16| [0u32.to_le_bytes(), u32::from(num).to_le_bytes()].concat();
        self.setup_msg(SET_VRING_NUM, &state(self.opts.queue_size), &[]);
        self.setup_msg(SET_VRING_BASE, &state(vring_base), &[]);
        let base = self.mem.addr();
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes()); // index
        addr.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [
            base + DESC_OFF as u64,
            base + USED_OFF as u64,
            base + AVAIL_OFF as u64,
            0,
        ] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        self.setup_msg(SET_VRING_ADDR, &addr, &[]);
        let (kick, call) = (self.kick.as_raw_fd(), self.call.as_raw_fd());
        self.setup_msg(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick]);
        self.setup_msg(SET_VRING_CALL, &0u64.to_le_bytes(), &[call]);
        self.setup_msg(SET_VRING_ENABLE, &state(1), &[]);
        // A request with a reply as a barrier, so that everything above has been
        // processed before the first kick.
        let _ = self.get_u64(GET_FEATURES);
    }

    /// GET_INFLIGHT_FD for one queue (first connection only), then SET_INFLIGHT_FD.
    fn set_inflight(&mut self) {
        if self.inflight.is_none() {
            let mut p = [0u8; 24];
            p[16..18].copy_from_slice(&1u16.to_le_bytes()); // num_queues
            p[18..20].copy_from_slice(&self.opts.queue_size.to_le_bytes());
            let (reply, mut fds) = self
                .call(GET_INFLIGHT_FD, &p, &[])
                .unwrap_or_else(|e| panic!("GET_INFLIGHT_FD: {e}"));
            assert_eq!(reply.len(), 24, "GET_INFLIGHT_FD reply size");
            assert!(u64_of(&reply[0..8]) > 0, "GET_INFLIGHT_FD: no region");
            assert_eq!(fds.len(), 1, "GET_INFLIGHT_FD reply fds");
            self.inflight = Some((fds.remove(0), reply));
        }
        let (fd, payload) = self
            .inflight
            .as_ref()
            .map(|(fd, p)| (fd.as_raw_fd(), p.clone()))
            .expect("an inflight region");
        self.setup_msg(SET_INFLIGHT_FD, &payload, &[fd]);
    }

    /// A setup message: checked with REPLY_ACK when that was negotiated, else just sent.
    fn setup_msg(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) {
        if self.acked_protocol & PF_REPLY_ACK != 0 {
            let status = self
                .ack(req, payload, fds)
                .unwrap_or_else(|e| panic!("vhost-user request {req}: {e}"));
            assert_eq!(status, 0, "vhost-user request {req} failed");
        } else {
            self.send(req, payload, fds);
        }
    }

    fn send_msg(&mut self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&(FLAG_VERSION | flags).to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            return self.sock.write_all(&msg);
        }
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        let mut iov = iovec(&mut msg);
        let mh = msghdr(&mut iov, &mut cbuf);
        // SAFETY: `mh` points at `cbuf`, which has room for one cmsghdr carrying `fds`
        // (CMSG_SPACE above), so the first header and its data are inside it; `iov`
        // points at `msg`; all live across the sendmsg call.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
            libc::sendmsg(self.sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.sock.write_all(&msg[n as usize..])
    }

    /// Reads the reply to `req`: its payload and the fds that came with it.
    fn recv_reply(&mut self, req: u32) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        const MAX_FDS: usize = 8;
        let mut hdr = [0u8; 12];
        let mut cbuf = [0u64; 16]; // >= CMSG_SPACE(8 fds), aligned for cmsghdr
        let mut iov = iovec(&mut hdr);
        let mut mh = msghdr(&mut iov, &mut cbuf);
        // SAFETY: `iov` points at `hdr` and `msg_control` at `cbuf`, both live locals of
        // the sizes given.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `cbuf` with `msg_controllen` bytes of control
        // messages; CMSG_FIRSTHDR/NXTHDR stay inside them, and SCM_RIGHTS data are fds
        // now owned by us (each taken once).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..(len / std::mem::size_of::<RawFd>()).min(MAX_FDS) {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed instead of a reply to {req}"),
            ));
        }
        self.sock.read_exact(&mut hdr[n as usize..])?;
        let r = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        assert_eq!(r, req, "reply for wrong request");
        assert!(
            flags & FLAG_REPLY != 0,
            "reply to {req} without the reply flag"
        );
        let mut payload = vec![0u8; size as usize];
        self.sock.read_exact(&mut payload)?;
        Ok((payload, fds))
    }

    /// Sends a message that has no reply; panics if the connection is gone.
    pub fn send(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) {
        self.send_msg(req, 0, payload, fds)
            .unwrap_or_else(|e| panic!("vhost-user send {req}: {e}"));
    }

    /// Sends a message that has a reply (the GET_* messages) and returns the reply's
    /// payload and fds.
    pub fn call(
        &mut self,
        req: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.send_msg(req, 0, payload, fds)?;
        self.recv_reply(req)
    }

    /// Sends a message with NEED_REPLY (REPLY_ACK must have been negotiated) and returns
    /// the backend's status (0: success). An error means the backend closed the
    /// connection (or did not answer within 10 s).
    pub fn ack(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<u64> {
        self.send_msg(req, FLAG_NEED_REPLY, payload, fds)?;
        let (reply, _) = self.recv_reply(req)?;
        assert_eq!(reply.len(), 8, "REPLY_ACK payload size for request {req}");
        Ok(u64_of(&reply))
    }

    /// Sends `req` and returns its u64 reply (GET_FEATURES, GET_QUEUE_NUM, ...).
    pub fn get_u64(&mut self, req: u32) -> u64 {
        let (reply, _) = self
            .call(req, &[], &[])
            .unwrap_or_else(|e| panic!("vhost-user request {req}: {e}"));
        assert_eq!(reply.len(), 8, "unexpected reply size for request {req}");
        u64_of(&reply)
    }

    /// GET_CONFIG of `size` bytes at `offset` (needs protocol feature CONFIG): the bytes
    /// of the reply after its offset/size/flags header (empty: the backend failed it).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [offset, size, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.resize(12 + size as usize, 0);
        let (reply, _) = self
            .call(GET_CONFIG, &p, &[])
            .unwrap_or_else(|e| panic!("GET_CONFIG: {e}"));
        assert!(
            reply.len() >= 12,
            "GET_CONFIG reply of {} bytes",
            reply.len()
        );
        let got = u32::from_le_bytes(reply[4..8].try_into().unwrap()) as usize;
        assert_eq!(got, reply.len() - 12, "GET_CONFIG reply size field");
        reply[12..].to_vec()
    }

    /// SET_CONFIG of `data` at `offset` with NEED_REPLY (needs CONFIG and REPLY_ACK);
    /// returns the backend's status, or an error if it closed the connection.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> io::Result<u64> {
        let mut p = Vec::new();
        for v in [offset, data.len() as u32, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(data);
        self.ack(SET_CONFIG, &p, &[])
    }

    /// The guest memory.
    pub fn mem(&mut self) -> &mut GuestMem {
        &mut self.mem
    }

    /// The data area (guest memory from [`DATA_OFF`]).
    pub fn data(&mut self) -> &mut [u8] {
        self.mem.bytes(DATA_OFF, MAX_DATA)
    }

    /// Guest address of `data()[off]`.
    pub fn data_addr(&self, off: usize) -> u64 {
        assert!(off < MAX_DATA);
        self.mem.addr() + (DATA_OFF + off) as u64
    }

    /// A request whose data buffer is `data()[off..off + len]` (none if `len` is 0).
    pub fn req(&self, req_type: u32, sector: u64, off: usize, len: usize) -> RawReq {
        assert!(off + len <= MAX_DATA);
        RawReq {
            req_type,
            sector,
            data: (len > 0).then(|| (self.data_addr(off), len as u32)),
            seg: None,
        }
    }

    fn slots(&self) -> u16 {
        self.opts.queue_size / 3
    }

    fn set_desc(&mut self, i: u16, addr: u64, len: u32, write: bool, next: Option<u16>) {
        let d = DESC_OFF + 16 * usize::from(i);
        self.mem.put(d, addr);
        self.mem.put(d + 8, len);
        let flags: u16 = u16::from(next.is_some()) | if write { 2 } else { 0 };
        self.mem.put(d + 12, flags);
        self.mem.put(d + 14, next.unwrap_or(0));
    }

    /// Puts `req` on the avail ring in the next free slot and returns its descriptor
    /// head. The device does not see it before [`Self::kick`].
    pub fn submit(&mut self, req: &RawReq) -> u16 {
        let in_flight = self.avail_idx.wrapping_sub(self.used_idx());
        assert!(
            in_flight < self.slots(),
            "{in_flight} requests in flight: no free slot"
        );
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % self.slots();
        let s = usize::from(slot);
        let base = self.mem.addr();
        let head = 3 * slot;
        self.mem.put(HDR_OFF + 16 * s, req.req_type);
        self.mem.put(HDR_OFF + 16 * s + 4, 0u32);
        self.mem.put(HDR_OFF + 16 * s + 8, req.sector);
        self.mem.put(STATUS_OFF + s, 0xffu8);
        let hdr_addr = base + (HDR_OFF + 16 * s) as u64;
        self.set_desc(head, hdr_addr, 16, false, Some(head + 1));
        let mut last = head + 1;
        if let Some((sector, num, flags)) = req.seg {
            let seg = SEG_OFF + 16 * s;
            self.mem.put(seg, sector);
            self.mem.put(seg + 8, num);
            self.mem.put(seg + 12, flags);
            self.set_desc(last, base + seg as u64, 16, false, Some(last + 1));
            last += 1;
        } else if let Some((addr, len)) = req.data {
            let device_writes = matches!(req.req_type, T_IN | T_GET_ID);
            self.set_desc(last, addr, len, device_writes, Some(last + 1));
            last += 1;
        }
        self.set_desc(last, base + (STATUS_OFF + s) as u64, 1, true, None);
        let pos = usize::from(self.avail_idx % self.opts.queue_size);
        self.mem.put(AVAIL_OFF + 4 + 2 * pos, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        head
    }

    /// Publishes every submitted request (the avail index) and kicks the queue.
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        self.mem.put(AVAIL_OFF + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local to our own eventfd.
        let n = unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8, "kick: {}", io::Error::last_os_error());
    }

    /// Number of requests submitted so far (mod 2^16): the next avail index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index the device last published.
    pub fn used_idx(&self) -> u16 {
        let idx = self.mem.get::<u16>(USED_OFF + 2);
        fence(Ordering::SeqCst);
        idx
    }

    /// Waits (≤ 10 s) until the used index reaches (or passes) `idx`.
    #[track_caller]
    pub fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        while (self.used_idx().wrapping_sub(idx) as i16) < 0 {
            assert!(
                Instant::now() < deadline,
                "used index still {} after {WAIT_TIMEOUT:?}, waiting for {idx}",
                self.used_idx()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The used ring entries `from..to` (at most a queue's worth), with each request's
    /// status byte as it is now.
    pub fn completions(&self, from: u16, to: u16) -> Vec<Used> {
        let n = to.wrapping_sub(from);
        assert!(n <= self.opts.queue_size, "{n} used entries requested");
        (0..n)
            .map(|i| {
                let pos = usize::from(from.wrapping_add(i) % self.opts.queue_size);
                let e = USED_OFF + 4 + 8 * pos;
                let head = self.mem.get::<u32>(e) as u16;
                let slot = usize::from(head / 3);
                let status = if head.is_multiple_of(3) && slot < usize::from(self.slots()) {
                    self.mem.get::<u8>(STATUS_OFF + slot)
                } else {
                    0xff
                };
                Used {
                    head,
                    len: self.mem.get::<u32>(e + 4),
                    status,
                }
            })
            .collect()
    }

    /// Submits `req`, kicks and waits (≤ 10 s) for it; returns its status byte. Only with
    /// nothing else in flight.
    #[track_caller]
    pub fn run(&mut self, req: &RawReq) -> u8 {
        let head = self.submit(req);
        self.kick();
        let idx = self.avail_idx;
        self.wait_used(idx);
        let done = self.completions(idx.wrapping_sub(1), idx);
        assert_eq!(
            done[0].head, head,
            "completed a request that was not submitted"
        );
        done[0].status
    }

    /// Submits one request and waits (≤ 10 s) for it. `data_len` bytes at `data()` are the
    /// payload (device-readable for OUT, device-writable for IN/GET_ID); `seg` is a
    /// discard/write-zeroes segment. Returns the status byte.
    #[track_caller]
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        data_len: usize,
        seg: Option<(u64, u32, u32)>,
    ) -> u8 {
        let mut req = self.req(
            req_type,
            sector,
            0,
            if seg.is_some() { 0 } else { data_len },
        );
        req.seg = seg;
        self.run(&req)
    }

    /// GET_VRING_BASE of queue 0: stops it and returns the backend's next avail index.
    pub fn stop(&mut self) -> u16 {
        let (reply, _) = self
            .call(GET_VRING_BASE, &[0u8; 8], &[])
            .unwrap_or_else(|e| panic!("GET_VRING_BASE: {e}"));
        assert_eq!(reply.len(), 8, "GET_VRING_BASE reply size");
        u16::try_from(u32::from_le_bytes(reply[4..8].try_into().expect("4 bytes")))
            .expect("a 16-bit ring index")
    }

    /// The whole inflight region as it is now (empty without [`RawOpts::inflight`]).
    pub fn inflight_region(&self) -> Vec<u8> {
        let Some((fd, payload)) = &self.inflight else {
            return Vec::new();
        };
        let size = u64_of(&payload[0..8]) as usize;
        let offset = u64_of(&payload[8..16]);
        let f = File::from(fd.try_clone().expect("dup inflight fd"));
        let mut buf = vec![0u8; size];
        f.read_exact_at(&mut buf, offset)
            .expect("read the inflight region");
        buf
    }
}

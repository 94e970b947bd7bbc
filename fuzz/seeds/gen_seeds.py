#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/seeds/<target>/ (run from anywhere; output is
deterministic, the generated files are committed). Input layouts: see fuzz/src/*.rs and
fuzz/fuzz_targets/qcow2.rs."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13


def save(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


class Guest:
    """Guest memory image starting at GPA 0 with a split queue of `size` entries at 0."""

    def __init__(self, size=8):
        self.size = size
        self.mem = bytearray(0x2000)
        self.avail = 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) // 4 * 4
        self.ndesc = 0
        self.navail = 0
        self.data = 0x400  # next free data address

    def put(self, addr, b):
        self.mem[addr:addr + len(b)] = b

    def alloc(self, n):
        a = self.data
        self.data += (n + 15) // 16 * 16
        return a

    def desc(self, addr, length, flags, nxt=0):
        i = self.ndesc
        self.ndesc += 1
        self.put(16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        return i

    def chain(self, descs):
        """descs: list of (addr, len, flags); linked with NEXT; head added to the avail ring."""
        first = self.ndesc
        for k, (a, l, f) in enumerate(descs):
            last = k == len(descs) - 1
            self.desc(a, l, f | (0 if last else NEXT), 0 if last else first + k + 1)
        self.put(self.avail + 4 + 2 * self.navail, struct.pack("<H", first))
        self.navail += 1
        self.put(self.avail + 2, struct.pack("<H", self.navail))

    def indirect_chain(self, descs):
        table = self.alloc(16 * len(descs))
        for k, (a, l, f) in enumerate(descs):
            last = k == len(descs) - 1
            self.put(table + 16 * k,
                     struct.pack("<QIHH", a, l, f | (0 if last else NEXT), 0 if last else k + 1))
        head = self.desc(table, 16 * len(descs), INDIRECT)
        self.put(self.avail + 4 + 2 * self.navail, struct.pack("<H", head))
        self.navail += 1
        self.put(self.avail + 2, struct.pack("<H", self.navail))

    def header(self, kind, sector):
        a = self.alloc(16)
        self.put(a, struct.pack("<IIQ", kind, 0, sector))
        return a

    def image(self):
        end = max(self.data, self.used + 8 * self.size + 6)
        return bytes(self.mem[:end])


def requests(g, which):
    st = lambda: (g.alloc(1), 1, WRITE)
    if "out" in which:
        h = g.header(T_OUT, 8)
        d = g.alloc(1024)
        g.put(d, bytes([0xab]) * 1024)
        g.chain([(h, 16, 0), (d, 1024, 0), st()])
    if "in" in which:
        h = g.header(T_IN, 8)
        g.chain([(h, 16, 0), (g.alloc(512), 512, WRITE), (g.alloc(512), 512, WRITE), st()])
    if "flush" in which:
        g.chain([(g.header(T_FLUSH, 0), 16, 0), st()])
    if "get_id" in which:
        g.chain([(g.header(T_GET_ID, 0), 16, 0), (g.alloc(20), 20, WRITE), st()])
    if "discard" in which:
        h = g.header(T_DISCARD, 0)
        seg = g.alloc(32)
        g.put(seg, struct.pack("<QII", 8, 8, 0) + struct.pack("<QII", 64, 16, 0))
        g.chain([(h, 16, 0), (seg, 32, 0), st()])
    if "write_zeroes" in which:
        h = g.header(T_WZ, 0)
        seg = g.alloc(16)
        g.put(seg, struct.pack("<QII", 16, 8, 1))
        g.chain([(h, 16, 0), (seg, 16, 0), st()])
    if "indirect" in which:
        h = g.header(T_IN, 0)
        g.indirect_chain([(h, 16, 0), (g.alloc(4096), 4096, WRITE), st()])


def virtio_blk_input(which, flags=0x38, qbits=2, disk_units=15):
    g = Guest(size=2 << qbits)
    requests(g, which)
    hdr = bytes([flags, qbits | (disk_units << 3), 0]) + struct.pack("<H", 0)
    return hdr + g.image(), g


ALL = ["out", "in", "flush", "get_id", "discard", "write_zeroes", "indirect"]


def virtio_blk_seeds(target):
    for w in ALL:
        save(target, w, virtio_blk_input([w])[0])
    save(target, "all", virtio_blk_input(ALL, qbits=4)[0])
    save(target, "all_4k_blocks", virtio_blk_input(ALL, flags=0x39, qbits=4)[0])
    save(target, "all_event_idx_writeback", virtio_blk_input(ALL, flags=0x7c, qbits=4)[0])


# ---------------------------------------------------------------------------------------
# vhost_user


def msg(code, payload=b"", flags=0, fds=0, kick=False):
    ctl = 0
    if fds:
        ctl |= 1 | ((fds - 1) << 1)
    if kick:
        ctl |= 8
    return bytes([ctl, code, flags]) + struct.pack("<H", len(payload)) + payload


def poke_aligned(offset, data):
    out = b""
    while data:
        chunk, data = data[:240], data[240:]
        out += bytes([0x80]) + struct.pack("<HB", offset // 16, len(chunk)) + chunk
        offset += 240
    return out


VIRTIO_FEATURES = (1 << 32) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | \
    (1 << 12) | (1 << 13) | (1 << 14) | (1 << 28) | (1 << 30)
EVENT_IDX = 1 << 29
PROTO_MQ, PROTO_REPLY_ACK, PROTO_CONFIG, PROTO_MEM_SLOTS = 1 << 0, 1 << 3, 1 << 9, 1 << 15
PROTO_BACKEND_REQ, PROTO_INFLIGHT = 1 << 5, 1 << 12
USER_ADDR = 0x7f00_0000_0000


def vhost_user_seeds():
    u64 = lambda v: struct.pack("<Q", v)
    base = b""
    base += msg(1)  # GET_FEATURES
    base += msg(15)  # GET_PROTOCOL_FEATURES
    base += msg(2, u64(VIRTIO_FEATURES))  # SET_FEATURES
    base += msg(16, u64(PROTO_MQ | PROTO_REPLY_ACK | PROTO_CONFIG | PROTO_MEM_SLOTS))
    base += msg(3)  # SET_OWNER
    base += msg(17)  # GET_QUEUE_NUM
    base += msg(24, struct.pack("<III", 0, 60, 0) + bytes(60))  # GET_CONFIG
    base += msg(36)  # GET_MAX_MEM_SLOTS
    save("vhost_user", "handshake", bytes([0x08]) + base)
    save("vhost_user", "set_config_wce",
         bytes([0x00]) + base + msg(25, struct.pack("<III", 32, 1, 0) + b"\x01"))

    mem_table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, USER_ADDR, 0)
    for name, features, reply, extra in [
            ("io", VIRTIO_FEATURES, 0, False),
            ("io_event_idx_need_reply", VIRTIO_FEATURES | EVENT_IDX, 8, False),
            ("io_inflight_backend_req", VIRTIO_FEATURES | EVENT_IDX, 8, True)]:
        g = Guest(size=32)
        requests(g, ALL)
        s = bytes([0x08])  # 2 queues
        s += msg(1) + msg(15)
        s += msg(2, u64(features), reply)
        proto = PROTO_MQ | PROTO_REPLY_ACK | PROTO_CONFIG | PROTO_MEM_SLOTS
        if extra:
            proto |= PROTO_BACKEND_REQ | PROTO_INFLIGHT
        s += msg(16, u64(proto), reply)
        s += msg(3, b"", reply)
        if extra:
            s += msg(21, b"", reply, fds=1)  # SET_BACKEND_REQ_FD (a socket)
            s += msg(31, struct.pack("<QQHH", 0, 0, 2, g.size) + bytes(4))  # GET_INFLIGHT_FD
            # SET_INFLIGHT_FD: the region lives in the memfd, past the guest's rings
            s += msg(32, struct.pack("<QQHH", 0x10000, 0x80000, 2, g.size) + bytes(4), reply,
                     fds=1)
        s += poke_aligned(0, g.image())
        s += msg(5, mem_table, reply, fds=1)  # SET_MEM_TABLE
        s += msg(8, struct.pack("<II", 0, g.size), reply)  # SET_VRING_NUM
        s += msg(9, struct.pack("<IIQQQQ", 0, 0, USER_ADDR, USER_ADDR + g.used,
                                USER_ADDR + g.avail, 0), reply)  # SET_VRING_ADDR
        s += msg(10, struct.pack("<II", 0, 0), reply)  # SET_VRING_BASE
        s += msg(13, u64(0), reply, fds=1)  # SET_VRING_CALL
        s += msg(12, u64(0), reply, fds=1)  # SET_VRING_KICK
        s += msg(18, struct.pack("<II", 0, 1), reply, kick=True)  # SET_VRING_ENABLE + kick
        s += msg(11, struct.pack("<II", 0, 0), reply)  # GET_VRING_BASE
        save("vhost_user", name, s)

    # Memory slots instead of a table: ADD_MEM_REG / REM_MEM_REG.
    region = struct.pack("<Q", 0) + struct.pack("<QQQQ", 0, 1 << 20, USER_ADDR, 0)
    s = bytes([0x00]) + base + msg(37, region, 8, fds=1) + msg(38, region, 8)
    save("vhost_user", "mem_slots", s)


# ---------------------------------------------------------------------------------------
# qcow2: a minimal valid version 3 image (no backing file, no snapshots) of 1 MiB with
# 4 KiB clusters, plus a version 2 one; the ops write, read, discard and zero a few blocks.

def qcow2_image(version=3, cluster_bits=12, size=1 << 20, data_cluster=True):
    cs = 1 << cluster_bits
    # Layout (clusters): 0 header, 1 refcount table, 2 refcount block, 3 L1 table,
    # 4 L2 table, 5 one data cluster mapped at guest offset 0.
    n_clusters = 6 if data_cluster else 4
    img = bytearray(cs * n_clusters)
    l2_entries = cs // 8
    l1_size = (size + l2_entries * cs - 1) // (l2_entries * cs)
    hdr_len = 104 if version == 3 else 72
    h = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, 0, 0, cluster_bits, size, 0,
                    l1_size, 3 * cs, 1 * cs, 1, 0, 0)
    if version == 3:
        h += struct.pack(">QQQII", 0, 0, 0, 4, hdr_len)  # features, refcount_order=4
    img[0:len(h)] = h
    img[hdr_len:hdr_len + 8] = bytes(8)  # end of header extensions
    img[cs:cs + 8] = struct.pack(">Q", 2 * cs)  # refcount table -> block
    for c in range(n_clusters):
        img[2 * cs + 2 * c:2 * cs + 2 * c + 2] = struct.pack(">H", 1)
    copied = 1 << 63
    if data_cluster:
        img[3 * cs:3 * cs + 8] = struct.pack(">Q", 4 * cs | copied)  # L1[0] -> L2
        img[4 * cs:4 * cs + 8] = struct.pack(">Q", 5 * cs | copied)  # L2[0] -> data
        img[5 * cs:6 * cs] = bytes([0x5a]) * cs
    return bytes(img)


def qcow2_ops(ops, read_only=False, lbs4k=False):
    head = len(ops) | (0x40 if read_only else 0) | (0x80 if lbs4k else 0)
    out = bytes([head])
    for kind, blocks, flags, fill, block in ops:
        out += bytes([kind, blocks - 1, flags, fill]) + struct.pack("<I", block)
    return out


def qcow2_seeds():
    ops = [(0, 8, 0, 0, 0), (1, 8, 2, 0x11, 0), (0, 8, 2, 0, 0), (1, 16, 1, 0x22, 100),
           (2, 8, 0, 0, 8), (3, 8, 1, 0, 200), (3, 8, 0, 0, 300), (4, 1, 0, 0, 0),
           (1, 200, 0, 0x33, 1000), (0, 256, 2, 0, 990)]
    save("qcow2", "v3_rw", qcow2_ops(ops) + qcow2_image())
    save("qcow2", "v3_ro", qcow2_ops(ops[:3], read_only=True) + qcow2_image())
    save("qcow2", "v2_rw", qcow2_ops(ops) + qcow2_image(version=2))
    save("qcow2", "v3_empty_4k", qcow2_ops(ops, lbs4k=True) + qcow2_image(data_cluster=False))


if __name__ == "__main__":
    virtio_blk_seeds("virtio_blk")
    virtio_blk_seeds("virtio_blk_raw")
    vhost_user_seeds()
    qcow2_seeds()

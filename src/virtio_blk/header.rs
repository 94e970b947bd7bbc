//! The request header and the discard / write-zeroes segment, decoded from the bytes the
//! driver wrote (`struct virtio_blk_outhdr` and `struct virtio_blk_discard_write_zeroes` of
//! the `virtio-bindings` crate, little-endian).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{virtio_blk_discard_write_zeroes, virtio_blk_outhdr};

use super::config::req_type;
use crate::stats::ReqKind;

/// What a request asks for (the header's `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN.
    In,
    /// VIRTIO_BLK_T_OUT.
    Out,
    /// VIRTIO_BLK_T_FLUSH (or the legacy FLUSH_OUT).
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Anything else: this raw type.
    Unsupported(u32),
}

impl RequestType {
    /// The type a raw header `type` names.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            req_type::IN => RequestType::In,
            req_type::OUT => RequestType::Out,
            req_type::FLUSH | req_type::FLUSH_OUT => RequestType::Flush,
            req_type::GET_ID => RequestType::GetId,
            req_type::DISCARD => RequestType::Discard,
            req_type::WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// The raw header `type` (FLUSH for both flush values).
    pub fn raw(self) -> u32 {
        match self {
            RequestType::In => req_type::IN,
            RequestType::Out => req_type::OUT,
            RequestType::Flush => req_type::FLUSH,
            RequestType::GetId => req_type::GET_ID,
            RequestType::Discard => req_type::DISCARD,
            RequestType::WriteZeroes => req_type::WRITE_ZEROES,
            RequestType::Unsupported(raw) => raw,
        }
    }

    /// Whether it is a read or a write (the requests run in batches).
    pub fn is_read_or_write(self) -> bool {
        matches!(self, RequestType::In | RequestType::Out)
    }

    /// The kind the statistics count it as.
    pub fn stats_kind(self) -> ReqKind {
        match self {
            RequestType::In => ReqKind::Read,
            RequestType::Out => ReqKind::Write,
            RequestType::Flush => ReqKind::Flush,
            RequestType::Discard => ReqKind::Discard,
            RequestType::WriteZeroes => ReqKind::WriteZeroes,
            RequestType::GetId | RequestType::Unsupported(_) => ReqKind::Other,
        }
    }
}

/// Copies `N` bytes at `offset` of `bytes` (the caller's offsets are those of a struct the
/// slice is the size of).
fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[offset..offset + N]);
    a
}

/// The request header, the first bytes of every request's device-readable stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// What the request asks for.
    pub kind: RequestType,
    /// The sector (512 bytes, whatever the logical block size) it starts at.
    pub sector: u64,
}

impl RequestHeader {
    /// Size of the header in the stream.
    pub const LEN: usize = size_of::<virtio_blk_outhdr>();

    /// Decodes the header bytes (`ioprio` is ignored).
    pub fn parse(bytes: &[u8; Self::LEN]) -> Self {
        RequestHeader {
            kind: RequestType::from_raw(u32::from_le_bytes(field(
                bytes,
                offset_of!(virtio_blk_outhdr, type_),
            ))),
            sector: u64::from_le_bytes(field(bytes, offset_of!(virtio_blk_outhdr, sector))),
        }
    }
}

/// One segment of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwzSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`SEG_FLAG_UNMAP`).
    pub flags: u32,
}

impl DwzSegment {
    /// Size of a segment in the stream.
    pub const LEN: usize = size_of::<virtio_blk_discard_write_zeroes>();

    /// Decodes a segment.
    pub fn parse(bytes: &[u8; Self::LEN]) -> Self {
        type Seg = virtio_blk_discard_write_zeroes;
        DwzSegment {
            sector: u64::from_le_bytes(field(bytes, offset_of!(Seg, sector))),
            num_sectors: u32::from_le_bytes(field(bytes, offset_of!(Seg, num_sectors))),
            flags: u32::from_le_bytes(field(bytes, offset_of!(Seg, flags))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_segment_decode_the_spec_layout() {
        // virtio 1.2, 5.2.6: le32 type, le32 reserved (ioprio), le64 sector; segments are
        // le64 sector, le32 num_sectors, le32 flags.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&13u32.to_le_bytes());
        h[4..8].copy_from_slice(&7u32.to_le_bytes());
        h[8..16].copy_from_slice(&0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(
            RequestHeader::parse(&h),
            RequestHeader {
                kind: RequestType::WriteZeroes,
                sector: 0x1234_5678_9abc
            }
        );
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&99u64.to_le_bytes());
        s[8..12].copy_from_slice(&8u32.to_le_bytes());
        s[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            DwzSegment::parse(&s),
            DwzSegment {
                sector: 99,
                num_sectors: 8,
                flags: 1
            }
        );
    }

    #[test]
    fn request_types_map_both_ways() {
        for raw in [0, 1, 4, 8, 11, 13, 2, 99] {
            assert_eq!(RequestType::from_raw(raw).raw(), raw);
        }
        assert_eq!(RequestType::from_raw(5), RequestType::Flush);
        assert_eq!(RequestType::from_raw(2), RequestType::Unsupported(2));
    }
}

//! virtio-blk feature bits, request types and the device configuration space
//! (virtio 1.2, section 5.2 "Block Device").

use std::sync::atomic::{AtomicU64, Ordering};

/// Size of a sector in virtio-blk requests, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Shift of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Feature bits (virtio-blk and transport) this device can offer.
pub mod features {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology information is available.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// Device can toggle its cache between writeback and writethrough modes.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Device supports multiqueue.
    pub const MQ: u64 = 1 << 12;
    /// Device can support discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Device can support write zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Driver can use indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Compliance with virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types (the `type` field of the request header).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Legacy name of flush some drivers use.
    pub const FLUSH_OUT: u32 = 5;
    /// Get the device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

/// The `unmap` flag of a discard / write-zeroes segment.
pub const SEG_FLAG_UNMAP: u32 = 1;

/// Offset of the `writeback` byte in the configuration space.
pub const WRITEBACK_OFFSET: u32 = 32;

/// Size of the configuration space layout we fill in (up to and including the secure-erase
/// fields, which we leave zero). Reads past it return zeros.
pub const CONFIG_LEN: usize = 72;

/// Everything the configuration space and the request validator need to know about the disk.
///
/// Only the capacity can change while the device runs (online resize); it is an atomic read
/// on every request.
#[derive(Debug)]
pub struct DeviceParams {
    /// Capacity in 512-byte sectors.
    capacity_sectors: AtomicU64,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// Maximum number of data segments per request.
    pub seg_max: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Disk is read-only.
    pub read_only: bool,
    /// Maximum sectors of one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Maximum sectors of one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Optimal I/O size in logical blocks (0 = none).
    pub opt_io_size: u32,
    /// GET_ID answer (NUL-padded, at most 20 bytes).
    pub serial: [u8; ID_BYTES],
}

impl DeviceParams {
    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors.load(Ordering::Acquire)
    }

    /// Changes the capacity (online resize); the caller notifies the driver.
    pub fn set_capacity_sectors(&self, sectors: u64) {
        self.capacity_sectors.store(sectors, Ordering::Release);
    }

    /// Virtio feature bits the device offers (transport bits included).
    pub fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::TOPOLOGY
            | features::FLUSH
            | features::CONFIG_WCE
            | features::MQ
            | features::DISCARD
            | features::WRITE_ZEROES
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC;
        if self.read_only {
            f |= features::RO;
        }
        f
    }

    /// Builds the configuration space with the given `writeback` byte.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut c, 0, &self.capacity_sectors().to_le_bytes());
        // size_max (8) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        put(&mut c, 12, &self.seg_max.to_le_bytes());
        // geometry (16..20) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
        put(&mut c, 20, &self.logical_block_size.to_le_bytes());
        // topology: physical_block_exp 0, alignment_offset 0, min_io_size 1 block.
        put(&mut c, 26, &1u16.to_le_bytes());
        put(&mut c, 28, &self.opt_io_size.to_le_bytes());
        c[WRITEBACK_OFFSET as usize] = u8::from(writeback);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &self.max_discard_sectors.to_le_bytes());
        put(&mut c, 40, &self.max_discard_seg.to_le_bytes());
        put(&mut c, 44, &self.discard_sector_alignment.to_le_bytes());
        put(&mut c, 48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(&mut c, 52, &self.max_write_zeroes_seg.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Answers a GET_CONFIG of `size` bytes at `offset`: exactly `size` bytes, zeros past the
    /// fields we define.
    pub fn read_config(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space(writeback);
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(out.len());
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

/// Largest sector count we accept in one discard or write-zeroes segment (2 GiB).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// Largest number of segments in one discard or write-zeroes request.
pub const MAX_DWZ_SEG: u32 = 32;

impl DeviceParams {
    /// Checks the options that do not depend on the image (logical block size, queue count
    /// and size), so they can be refused before an image is created or opened.
    pub fn check_geometry(
        logical_block_size: u32,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), String> {
        if logical_block_size != 512 && logical_block_size != 4096 {
            return Err(format!(
                "logical block size {logical_block_size} (expected 512 or 4096)"
            ));
        }
        if queue_size < 4 || !queue_size.is_power_of_two() {
            return Err(format!(
                "queue size {queue_size} (expected a power of two >= 4)"
            ));
        }
        if num_queues == 0 {
            return Err("number of queues 0".into());
        }
        Ok(())
    }

    /// Parameters for a disk of `size` bytes served with the given options. The capacity is
    /// rounded down to whole logical blocks. Errors name what is wrong.
    pub fn new(
        size: u64,
        logical_block_size: u32,
        discard_granularity: u64,
        num_queues: u16,
        queue_size: u16,
        read_only: bool,
        serial: &str,
    ) -> Result<Self, String> {
        Self::check_geometry(logical_block_size, num_queues, queue_size)?;
        let lbs = u64::from(logical_block_size);
        let usable = size / lbs * lbs;
        if usable == 0 {
            return Err(format!(
                "image of {size} bytes is smaller than one {lbs}-byte block"
            ));
        }
        let lbs_sectors = logical_block_size / SECTOR_SIZE as u32;
        let align = (discard_granularity.max(lbs) / SECTOR_SIZE).min(u64::from(MAX_DWZ_SECTORS));
        Ok(DeviceParams {
            capacity_sectors: AtomicU64::new(usable >> SECTOR_SHIFT),
            logical_block_size,
            seg_max: u32::from(queue_size) - 2,
            num_queues,
            read_only,
            max_discard_sectors: MAX_DWZ_SECTORS / lbs_sectors * lbs_sectors,
            max_discard_seg: MAX_DWZ_SEG,
            discard_sector_alignment: align as u32,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS / lbs_sectors * lbs_sectors,
            max_write_zeroes_seg: MAX_DWZ_SEG,
            opt_io_size: 0,
            serial: serial_bytes(serial),
        })
    }
}

/// Makes the 20-byte GET_ID answer from a serial string (truncated, NUL-padded).
pub fn serial_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let b = serial.as_bytes();
    let n = b.len().min(ID_BYTES);
    id[..n].copy_from_slice(&b[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DeviceParams {
        DeviceParams {
            capacity_sectors: AtomicU64::new(2048),
            logical_block_size: 4096,
            seg_max: 126,
            num_queues: 4,
            read_only: false,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            opt_io_size: 0,
            serial: serial_bytes("disk0"),
        }
    }

    #[test]
    fn config_layout_matches_spec_offsets() {
        let c = params().config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(&c[16..20], &[0, 0, 0, 0]);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(c[33], 0);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 32);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(&c[57..72], &[0u8; 15]);
        assert_eq!(params().config_space(false)[32], 0);
    }

    #[test]
    fn read_config_returns_exactly_requested_size() {
        let p = params();
        assert_eq!(p.read_config(true, 0, 60).len(), 60);
        let big = p.read_config(true, 0, 256);
        assert_eq!(big.len(), 256);
        assert!(big[CONFIG_LEN..].iter().all(|&b| b == 0));
        assert_eq!(p.read_config(true, 32, 1), vec![1]);
        assert_eq!(p.read_config(true, 1000, 4), vec![0; 4]);
    }

    #[test]
    fn ro_feature_only_when_read_only() {
        let mut p = params();
        assert_eq!(p.features() & features::RO, 0);
        p.read_only = true;
        assert_ne!(p.features() & features::RO, 0);
    }

    #[test]
    fn new_rounds_capacity_and_checks_options() {
        let p = DeviceParams::new(10_000, 4096, 65536, 2, 256, false, "x").unwrap();
        assert_eq!(p.capacity_sectors(), 16);
        assert_eq!(p.seg_max, 254);
        assert_eq!(p.discard_sector_alignment, 128);
        assert_eq!(p.max_discard_sectors % 8, 0);
        assert!(DeviceParams::new(10_000, 1024, 0, 2, 256, false, "").is_err());
        assert!(DeviceParams::new(10_000, 512, 0, 2, 100, false, "").is_err());
        assert!(DeviceParams::new(100, 512, 0, 2, 256, false, "").is_err());
        assert!(DeviceParams::new(4096, 512, 0, 0, 256, false, "").is_err());
    }

    #[test]
    fn serial_is_truncated_and_padded() {
        assert_eq!(&serial_bytes("ab")[..3], b"ab\0");
        assert_eq!(
            serial_bytes("0123456789abcdefghijXYZ"),
            *b"0123456789abcdefghij"
        );
    }
}

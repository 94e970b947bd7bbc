//! virtio-blk feature bits, request types and the device configuration space
//! (virtio 1.2, section 5.2 "Block Device").
//!
//! The numbers and the configuration space layout come from the `virtio-bindings` crate
//! (rust-vmm's bindings of Linux's `virtio_blk.h`), so none is written out by hand here.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{self as vb, virtio_blk_config};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Size of a sector in virtio-blk requests, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Shift of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// Feature bits (virtio-blk and transport) this device can offer.
pub mod features {
    use super::vb;

    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    /// Device is read-only.
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    /// Topology information is available.
    pub const TOPOLOGY: u64 = 1 << vb::VIRTIO_BLK_F_TOPOLOGY;
    /// Device can toggle its cache between writeback and writethrough modes.
    pub const CONFIG_WCE: u64 = 1 << vb::VIRTIO_BLK_F_CONFIG_WCE;
    /// Device supports multiqueue.
    pub const MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
    /// Device can support discard command.
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    /// Device can support write zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
    /// Driver can use indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << super::VIRTIO_RING_F_INDIRECT_DESC;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << super::VIRTIO_RING_F_EVENT_IDX;
    /// Compliance with virtio 1.x.
    pub const VERSION_1: u64 = 1 << super::VIRTIO_F_VERSION_1;
    /// `VHOST_F_LOG_ALL`: the frontend logs dirty guest memory (live migration). A vhost
    /// feature rather than a virtio-blk one: offered by the vhost-user backend, not by
    /// [`super::DeviceParams::features`].
    pub const LOG_ALL: u64 = 1 << 26;
}

/// Request types (the `type` field of the request header).
pub mod req_type {
    use super::vb;

    /// Read.
    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    /// Write.
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    /// Flush the write cache.
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    /// Legacy name of flush some drivers use (`VIRTIO_BLK_T_FLUSH_OUT`, no longer in Linux's
    /// header and so not in the bindings).
    pub const FLUSH_OUT: u32 = 5;
    /// Get the device ID string.
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    /// Discard ranges.
    pub const DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Status byte values.
pub mod status {
    use super::vb;

    /// Success.
    pub const OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
    /// Device or driver error.
    pub const IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
}

/// The `unmap` flag of a discard / write-zeroes segment.
pub const SEG_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Offset of the `writeback` byte (`wce`) in the configuration space.
pub const WRITEBACK_OFFSET: u32 = offset_of!(virtio_blk_config, wce) as u32;

/// Size of the configuration space layout (`struct virtio_blk_config`, up to and including
/// the zoned characteristics, which we leave zero). Reads past it return zeros.
pub const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// The configuration space as the driver reads it: `struct virtio_blk_config` with every
/// field little-endian.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct ConfigSpace(pub virtio_blk_config);

// SAFETY: `virtio_blk_config` is a `#[repr(C)]` struct of integers and arrays of integers
// with no padding (the bindings assert each field's offset and the total size), so every
// byte pattern is a valid value and every byte of a value is initialised; `ConfigSpace` is
// `#[repr(transparent)]` over it.
unsafe impl ByteValued for ConfigSpace {}

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
    /// `--discard`: whether a discard (and a write-zeroes' unmap flag) frees space.
    pub discard: DiscardPolicy,
    /// `--detect-zeroes`: what a write of all zero bytes becomes.
    pub detect_zeroes: DetectZeroes,
}

/// `--discard` (QEMU's `discard=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscardPolicy {
    /// Discards complete without doing anything; write-zeroes never unmaps.
    Ignore,
    /// Discards free the space in the image and give it back to the host file system.
    #[default]
    Unmap,
}

/// `--detect-zeroes` (QEMU's `detect-zeroes=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectZeroes {
    /// Writes are written as they come.
    #[default]
    Off,
    /// A write of all zero bytes becomes a write-zeroes (a zero cluster in qcow2).
    On,
    /// Like `on`, and the space is freed too (with `--discard unmap`).
    Unmap,
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
    pub fn config_space(&self, writeback: bool) -> ConfigSpace {
        // size_max and geometry stay 0: VIRTIO_BLK_F_SIZE_MAX and VIRTIO_BLK_F_GEOMETRY are not
        // offered. Topology: physical_block_exp 0, alignment_offset 0, min_io_size 1 block.
        ConfigSpace(virtio_blk_config {
            capacity: self.capacity_sectors().to_le(),
            seg_max: self.seg_max.to_le(),
            blk_size: self.logical_block_size.to_le(),
            min_io_size: 1u16.to_le(),
            opt_io_size: self.opt_io_size.to_le(),
            wce: u8::from(writeback),
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: self.max_discard_sectors.to_le(),
            max_discard_seg: self.max_discard_seg.to_le(),
            discard_sector_alignment: self.discard_sector_alignment.to_le(),
            max_write_zeroes_sectors: self.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: self.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        })
    }

    /// Answers a GET_CONFIG of `size` bytes at `offset`: exactly `size` bytes, zeros past the
    /// fields we define.
    pub fn read_config(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space(writeback);
        let space = config.as_slice();
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

/// Why device options are refused (the text names the option and the value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// A logical block size other than 512 or 4096.
    #[error("logical block size {0} (expected 512 or 4096)")]
    LogicalBlockSize(u32),
    /// A queue size that is not a power of two of at least 4.
    #[error("queue size {0} (expected a power of two >= 4)")]
    QueueSize(u16),
    /// No queues.
    #[error("number of queues 0")]
    NoQueues,
    /// An image smaller than one logical block.
    #[error("image of {size} bytes is smaller than one {block}-byte block")]
    TooSmall {
        /// Image size in bytes.
        size: u64,
        /// Logical block size in bytes.
        block: u64,
    },
}

/// What [`DeviceParams::new`] builds the parameters from.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions<'a> {
    /// Size of the image in bytes (rounded down to whole logical blocks).
    pub size: u64,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// Granularity at which the image can really free space (discard alignment).
    pub discard_granularity: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum virtqueue size (a power of two >= 4; `seg_max` is two less).
    pub queue_size: u16,
    /// Serve the disk read-only.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes are used).
    pub serial: &'a str,
}

impl DeviceParams {
    /// Checks the options that do not depend on the image (logical block size, queue count
    /// and size), so they can be refused before an image is created or opened.
    pub fn check_geometry(
        logical_block_size: u32,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), ParamsError> {
        if logical_block_size != 512 && logical_block_size != 4096 {
            return Err(ParamsError::LogicalBlockSize(logical_block_size));
        }
        if queue_size < 4 || !queue_size.is_power_of_two() {
            return Err(ParamsError::QueueSize(queue_size));
        }
        if num_queues == 0 {
            return Err(ParamsError::NoQueues);
        }
        Ok(())
    }

    /// Parameters for a disk served with `opts`. The capacity is rounded down to whole
    /// logical blocks.
    pub fn new(opts: &DeviceOptions<'_>) -> Result<Self, ParamsError> {
        Self::check_geometry(opts.logical_block_size, opts.num_queues, opts.queue_size)?;
        let lbs = u64::from(opts.logical_block_size);
        let usable = opts.size / lbs * lbs;
        if usable == 0 {
            return Err(ParamsError::TooSmall {
                size: opts.size,
                block: lbs,
            });
        }
        let lbs_sectors = opts.logical_block_size / SECTOR_SIZE as u32;
        let align =
            (opts.discard_granularity.max(lbs) / SECTOR_SIZE).min(u64::from(MAX_DWZ_SECTORS));
        Ok(DeviceParams {
            capacity_sectors: AtomicU64::new(usable >> SECTOR_SHIFT),
            logical_block_size: opts.logical_block_size,
            seg_max: u32::from(opts.queue_size) - 2,
            num_queues: opts.num_queues,
            read_only: opts.read_only,
            max_discard_sectors: MAX_DWZ_SECTORS / lbs_sectors * lbs_sectors,
            max_discard_seg: MAX_DWZ_SEG,
            discard_sector_alignment: align as u32,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS / lbs_sectors * lbs_sectors,
            max_write_zeroes_seg: MAX_DWZ_SEG,
            opt_io_size: 0,
            serial: serial_bytes(opts.serial),
            discard: DiscardPolicy::default(),
            detect_zeroes: DetectZeroes::default(),
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
            discard: DiscardPolicy::Unmap,
            detect_zeroes: DetectZeroes::Off,
        }
    }

    #[test]
    fn config_layout_matches_spec_offsets() {
        // The offsets of virtio 1.2, 5.2.4, written out here to check the bindings' layout.
        let space = params().config_space(true);
        let c = space.as_slice();
        assert_eq!(c.len(), 96);
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
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 1);
        assert_eq!(&c[57..96], &[0u8; 39]);
        assert_eq!(params().config_space(false).as_slice()[32], 0);
        assert_eq!(WRITEBACK_OFFSET, 32);
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
        let opts = DeviceOptions {
            size: 10_000,
            logical_block_size: 4096,
            discard_granularity: 65536,
            num_queues: 2,
            queue_size: 256,
            read_only: false,
            serial: "x",
        };
        let p = DeviceParams::new(&opts).unwrap();
        assert_eq!(p.capacity_sectors(), 16);
        assert_eq!(p.seg_max, 254);
        assert_eq!(p.discard_sector_alignment, 128);
        assert_eq!(p.max_discard_sectors % 8, 0);
        let refused = |o: DeviceOptions<'_>| DeviceParams::new(&o).unwrap_err();
        assert_eq!(
            refused(DeviceOptions {
                logical_block_size: 1024,
                ..opts
            }),
            ParamsError::LogicalBlockSize(1024)
        );
        assert_eq!(
            refused(DeviceOptions {
                logical_block_size: 512,
                queue_size: 100,
                ..opts
            }),
            ParamsError::QueueSize(100)
        );
        assert_eq!(
            refused(DeviceOptions {
                size: 100,
                logical_block_size: 512,
                ..opts
            }),
            ParamsError::TooSmall {
                size: 100,
                block: 512
            }
        );
        assert_eq!(
            refused(DeviceOptions {
                size: 4096,
                logical_block_size: 512,
                num_queues: 0,
                ..opts
            }),
            ParamsError::NoQueues
        );
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

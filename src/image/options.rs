//! What to open and how: the image's format and the options every format takes. Below the
//! formats (raw and qcow2 read their options from here; `format` chooses between them), so no
//! format depends on the module that picks it.

use std::path::PathBuf;
use std::sync::Arc;

use super::engine::Aio;
use super::storage::Recorder;
use crate::error::UnknownValue;

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Image format as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Detect: raw unless the file starts with a known magic (which is then refused).
    Auto,
    /// A raw disk image or block device.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = UnknownValue;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ImageFormat::Auto),
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(UnknownValue::new("format", s, "raw, qcow2 or auto")),
        }
    }
}

/// How to open an image. `ImageOptions::new(path, format)` gives the defaults for the rest.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Path of the image file or block device.
    pub path: PathBuf,
    /// Requested format.
    pub format: ImageFormat,
    /// Open read-only.
    pub read_only: bool,
    /// Use O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Logical block size the guest will see; with `direct` it must be a multiple of the file's
    /// O_DIRECT offset alignment.
    pub logical_block_size: u32,
    /// qcow2: where completed mapping changes are journaled until a flush writes them back.
    pub journal: JournalMode,
    /// Testing: record every write and sync of the image's files (the power-loss harness).
    pub recorder: Option<Arc<Recorder>>,
    /// Which I/O engine the queues get.
    pub aio: Aio,
}

impl ImageOptions {
    /// Options for `path` in `format`: writable, buffered, 512-byte blocks, the default
    /// mapping journal, not recorded.
    pub fn new(path: impl Into<PathBuf>, format: ImageFormat) -> ImageOptions {
        ImageOptions {
            path: path.into(),
            format,
            read_only: false,
            direct: false,
            logical_block_size: 512,
            journal: JournalMode::Default,
            recorder: None,
            aio: Aio::default(),
        }
    }
}

/// Where a writable image keeps its mapping journal (see qcow2/journal.rs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JournalMode {
    /// In `/dev/shm`; if that cannot be used, warn and write metadata through instead.
    #[default]
    Default,
    /// In this directory (tmpfs or ramfs); failing to use it is an error.
    Dir(PathBuf),
    /// No journal: metadata is written back before a request that changed a mapping
    /// completes.
    Off,
}

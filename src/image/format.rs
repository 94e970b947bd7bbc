//! Choosing, creating and opening an image in the right format.
//!
//! Format detection is deliberately limited. A raw image's first sector belongs to the guest, and
//! a guest can write anything there, including the qcow2 magic. Reinterpreting such a disk as
//! qcow2 on the next start would hand the guest's bytes to the qcow2 parser (and, with a crafted
//! backing-file name, could expose host files). So:
//!
//! - `--format raw` and `--format qcow2` are taken at their word.
//! - `--format auto` (the default) serves a file as raw only if it does not start with the qcow2
//!   magic. A file that does start with the magic is refused with a message asking for an
//!   explicit `--format`; it is never silently opened as qcow2.
//! - An image served as auto-detected raw refuses guest writes that would put the qcow2 magic at
//!   offset 0 (those fail with IOERR), so a disk we probed as raw can never turn into one that
//!   probes as something else.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::warn;

use super::lock::{self, ImageLocks, Locking};
use super::qcow2::Qcow2Image;
use super::raw::RawImage;
use super::BlockImage;
use crate::error::{Error, Result};

pub use super::options::{ImageFormat, ImageOptions, QCOW2_MAGIC};

/// Creates a new image of `size` bytes at `path`: a sparse file for raw, an empty version 3
/// image with 64 KiB clusters for qcow2. Fails if it exists.
pub fn create_image(path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    match format {
        ImageFormat::Raw | ImageFormat::Auto => {}
        ImageFormat::Qcow2 => return Qcow2Image::create(path, size),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::CreateImage {
            path: path.to_owned(),
            source,
        })?;
    file.set_len(size).map_err(|source| Error::CreateImage {
        path: path.to_owned(),
        source,
    })?;
    file.sync_all().map_err(|source| Error::CreateImage {
        path: path.to_owned(),
        source,
    })
}

/// Reads the first bytes of the file to tell whether it carries the qcow2 magic.
fn has_qcow2_magic(path: &Path) -> Result<bool> {
    let mut file = File::open(path).map_err(|source| Error::OpenImage {
        path: path.to_owned(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::OpenImage {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(magic == QCOW2_MAGIC)
}

/// Opens the image described by `opts` for serving, locked as QEMU locks its images (see
/// [`super::lock`]): the image, its backing files and its data file are locked right after
/// each is opened, before anything is written, and stay locked as long as they are open.
/// A file another process holds is waited for until `grace` has passed since the open began
/// ([`lock::RELEASE_GRACE`] at a start, [`lock::HANDOVER_GRACE`] at a queue start's
/// activation). Returns the locks too, to give write access up and take it back later
/// (migration).
pub fn open_image_locked(
    opts: &ImageOptions,
    metadata_cache: Option<u64>,
    locking: Locking,
    grace: Duration,
) -> Result<(Arc<dyn BlockImage>, ImageLocks)> {
    if locking == Locking::Off {
        warn!(
            "image locking is off (--locking off): nothing stops another process from writing \
             {} while it is served",
            opts.path.display()
        );
    }
    lock::with_locks(locking, true, grace, || {
        open_image_cached(opts, metadata_cache)
    })
}

/// Opens the image described by `opts`, without locks (tests and tools that manage their
/// files themselves; the daemon uses [`open_image_locked`]).
pub fn open_image(opts: &ImageOptions) -> Result<Arc<dyn BlockImage>> {
    open_image_cached(opts, None)
}

/// Opens the image described by `opts`, without locks; for qcow2, `metadata_cache` bytes of L2
/// tables are kept in memory (default [`super::qcow2::DEFAULT_CACHE_BYTES`]).
pub fn open_image_cached(
    opts: &ImageOptions,
    metadata_cache: Option<u64>,
) -> Result<Arc<dyn BlockImage>> {
    match opts.format {
        ImageFormat::Raw => Ok(Arc::new(RawImage::open(opts, false)?)),
        ImageFormat::Auto => {
            if has_qcow2_magic(&opts.path)? {
                return Err(Error::InvalidImage {
                    path: opts.path.clone(),
                    reason: "starts with the qcow2 magic; refusing to guess the format: pass \
                             --format qcow2, or --format raw if it is a raw disk"
                        .into(),
                });
            }
            Ok(Arc::new(RawImage::open(opts, true)?))
        }
        ImageFormat::Qcow2 => {
            let image = Qcow2Image::open(opts)?;
            if let Some(bytes) = metadata_cache {
                image.set_cache_bytes(bytes);
            }
            Ok(Arc::new(image))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &Path, format: ImageFormat) -> ImageOptions {
        ImageOptions::new(path, format)
    }

    #[test]
    fn auto_refuses_qcow2_magic_and_raw_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data = vec![0u8; 4096];
        data[..4].copy_from_slice(&QCOW2_MAGIC);
        std::fs::write(&path, &data).unwrap();
        let err = open_image(&opts(&path, ImageFormat::Auto))
            .err()
            .expect("auto must refuse");
        assert!(err.to_string().contains("qcow2 magic"), "{err}");
        let img = open_image(&opts(&path, ImageFormat::Raw)).unwrap();
        assert_eq!(img.virtual_size(), 4096);
        assert_eq!(img.format_name(), "raw");
    }

    #[test]
    fn create_makes_sparse_file_and_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.img");
        create_image(&path, ImageFormat::Auto, 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
        let img = open_image(&opts(&path, ImageFormat::Auto)).unwrap();
        assert_eq!(img.virtual_size(), 1 << 30);
        assert!(create_image(&path, ImageFormat::Raw, 4096).is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = open_image(&opts(Path::new("/nonexistent/x.img"), ImageFormat::Raw))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
    }
}

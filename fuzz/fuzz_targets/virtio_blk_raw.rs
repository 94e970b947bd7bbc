//! Like `virtio_blk`, but the requests run against the real raw image engine
//! (`vhost_user_blk::image::raw::RawImage`) on a small temp file, still behind the range
//! checker. The file is re-created (zeroed, fuzzer-chosen size) for every input.
//! Input layout: see `vub_fuzz::virtio_blk` (flags bit7 opens the image as auto-probed raw,
//! which turns on the qcow2-magic guard for sector 0).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhost_user_blk::image::raw::RawImage;
use vhost_user_blk::image::{BlockImage, ImageFormat, ImageOptions};
use vub_fuzz::CheckedQueue;

fn image_path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk.raw");
        (dir, path)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    vub_fuzz::virtio_blk::run(data, |setup, params| {
        let path = image_path();
        let f = std::fs::File::create(path).expect("create image");
        f.set_len(setup.disk_size).expect("size image");
        drop(f);
        let opts = ImageOptions {
            path: path.clone(),
            format: if setup.probed { ImageFormat::Auto } else { ImageFormat::Raw },
            read_only: setup.read_only,
            direct: false,
            logical_block_size: setup.lbs,
            journal: vhost_user_blk::image::qcow2::JournalMode::Off,
            ..ImageOptions::new(path.clone(), ImageFormat::Raw)
        };
        let img = RawImage::open(&opts, setup.probed).expect("open raw image");
        assert_eq!(img.virtual_size(), setup.disk_size);
        Box::new(CheckedQueue {
            capacity: params.capacity_sectors() * 512,
            lbs: u64::from(params.logical_block_size),
            read_only: params.read_only,
            inner: img.queue_handle().expect("queue handle"),
        })
    });
});

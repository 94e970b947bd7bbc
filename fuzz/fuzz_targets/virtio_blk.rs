//! virtio-blk request parsing and execution from arbitrary descriptor chains over arbitrary
//! guest memory, against an in-memory disk that checks every range it is given.
//! Input layout: see `vub_fuzz::virtio_blk`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vub_fuzz::{CheckedQueue, MemDisk};

fuzz_target!(|data: &[u8]| {
    vub_fuzz::virtio_blk::run(data, |setup, params| {
        Box::new(CheckedQueue {
            capacity: params.capacity_sectors() * 512,
            lbs: u64::from(params.logical_block_size),
            read_only: params.read_only,
            inner: Box::new(MemDisk::new(setup.disk_size as usize)),
        })
    });
});

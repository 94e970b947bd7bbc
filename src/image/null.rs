//! The null image: a device that stores nothing, for measuring the transport ceiling
//! (the counterpart of qemu's `null-co` driver). Reads leave the guest buffers untouched (like
//! `null-co` with its default `read-zeroes=off`), writes are dropped.

use std::io;

use super::{BlockImage, GuestSlice, ImageQueue};

/// A null device of a given size.
pub struct NullImage {
    size: u64,
}

impl NullImage {
    /// A null device of `size` bytes.
    pub fn new(size: u64) -> Self {
        NullImage { size }
    }
}

impl BlockImage for NullImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "null"
    }

    fn discard_granularity(&self) -> u64 {
        4096
    }

    fn queue_handle(&self) -> io::Result<Box<dyn ImageQueue>> {
        Ok(Box::new(NullQueue))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

struct NullQueue;

impl ImageQueue for NullQueue {
    fn read(&mut self, _offset: u64, _bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        Ok(())
    }

    fn write(&mut self, _offset: u64, _bufs: &[GuestSlice<'_>], _durable: bool) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }

    fn sequential(&self) -> bool {
        // Nothing takes time: the whole batch completes at once anyway.
        false
    }
}

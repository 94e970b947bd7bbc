//! vhost-user-blk: a vhost-user block device backend serving raw and qcow2 images.
//!
//! Layering (see docs/ARCHITECTURE.md):
//! - [`image`]: disk images behind the [`image::BlockImage`] / [`image::ImageQueue`] traits.
//! - [`virtio_blk`]: virtio-blk request parsing and execution, knows nothing about sockets.
//! - [`backend`]: the vhost-user backend, one worker thread per virtqueue.
//! - [`server`]: listening socket, connection loop and signal handling.

#![deny(missing_docs)]

pub mod backend;
pub mod control;
pub mod ctl;
pub mod device;
pub mod error;
pub mod image;
pub mod inflight;
pub mod interposer;
pub mod notify;
pub mod server;
pub mod stats;
pub mod virtio_blk;

pub use error::{Error, Result};

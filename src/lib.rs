//! vhost-user-blk: a vhost-user block device backend serving raw and qcow2 images.
//!
//! Layering (see docs/ARCHITECTURE.md), from the guest's side down:
//! - [`server`]: listening socket, connection loop and signal handling.
//! - [`vhost_user`]: one frontend connection: the backend with one worker thread per
//!   virtqueue, the message relay, per-connection state, inflight tracking.
//! - [`virtio_blk`]: virtio-blk request parsing and execution, knows nothing about sockets.
//! - [`image`]: disk images behind the [`image::BlockImage`] / [`image::ImageQueue`] traits.
//!
//! Beside them: [`device`] (what outlives connections), [`control`] (the control socket's
//! server and client), [`stats`], [`notify`] (sd_notify), [`error`], [`sync`].

pub mod control;
pub mod device;
pub mod error;
pub mod image;
pub mod notify;
pub mod server;
pub mod stats;
pub mod sync;
pub mod vhost_user;
pub mod virtio_blk;

pub use error::{Error, Result};

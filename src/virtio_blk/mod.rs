//! The virtio-blk device model: configuration space, request parsing and execution.
//!
//! This layer knows nothing about sockets or vhost-user: it takes descriptor chains from a
//! virtqueue and guest memory, and runs requests against an [`crate::image::ImageQueue`].

pub mod chain;
pub mod config;
pub mod header;
pub mod request;

#[cfg(test)]
mod tests;

pub use crate::image::{unlogged, GuestMem};
pub use config::{DetectZeroes, DeviceOptions, DeviceParams, DiscardPolicy};
pub use request::{chains_waiting, ChainTracker, DeviceState, QueueRun, RequestHandler};

//! The vhost-user side of one frontend connection.
//!
//! - [`backend`]: [`BlkBackend`], vhost-user-backend's `VhostUserBackend` for one connection:
//!   features, the configuration space, one worker thread per virtqueue.
//! - [`interposer`]: the relay between the frontend's socket and vhost-user-backend's handler,
//!   which answers what vhost-user-backend cannot (inflight fds) and watches what the backend
//!   needs to know.
//! - [`connection`]: [`Connection`], the per-connection state the relay fills in and the way
//!   back to the frontend (`CONFIG_CHANGE_MSG`).
//! - [`inflight`]: the inflight I/O tracking region.
//!
//! Listening, accepting and tearing a connection down belong to [`crate::server`].

pub mod backend;
pub mod connection;
pub mod inflight;
pub mod interposer;

pub use backend::{BlkBackend, GuestMemAtomic, MAX_QUEUES};
pub use connection::Connection;

//! The control socket (docs/CONTROL.md): JSON lines over a unix socket, next to the
//! vhost-user one, for statistics, flushes, online resize and dirty bitmaps.
//!
//! - [`protocol`]: the requests and replies both sides exchange.
//! - [`server`]: the daemon's side, one thread per client; never on the I/O path.
//! - [`client`]: the `vhost-user-blk ctl` side: one request, the reply rendered as a table or
//!   JSON.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{Reply, Request};
pub use server::spawn;

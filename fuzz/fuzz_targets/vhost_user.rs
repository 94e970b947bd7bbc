//! The vhost-user message sequence handled by `VhostUserDaemon` + our `BlkBackend`, over a
//! real unix socket. Input layout: see `vub_fuzz::vhost_user`. Run with `-timeout=` so that a
//! hung daemon is reported.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vub_fuzz::vhost_user::run(data);
});

//! The crate's error type: every failure that ends the daemon or refuses an image carries the
//! file or option at fault, so the one-line exit message names the problem.

use std::io;
use std::path::PathBuf;

/// Errors raised while setting up or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file could not be opened.
    #[error("cannot open image {path}: {source}")]
    OpenImage {
        /// Path of the image.
        path: PathBuf,
        /// Underlying OS error.
        source: io::Error,
    },
    /// The image file could not be created.
    #[error("cannot create image {path}: {source}")]
    CreateImage {
        /// Path of the image.
        path: PathBuf,
        /// Underlying OS error.
        source: io::Error,
    },
    /// The image is not usable with the requested options.
    #[error("image {path}: {reason}")]
    InvalidImage {
        /// Path of the image.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds locks on the file that conflict with ours (QEMU-compatible
    /// image locks, `image::lock`).
    #[error("{what} {path} is in use by another process: {reason}")]
    ImageInUse {
        /// "image", "backing file" or "data file".
        what: &'static str,
        /// Path of the file.
        path: PathBuf,
        /// Which lock could not be had, in QEMU's words.
        reason: String,
    },
    /// The file could not be locked for a reason other than another user.
    #[error("cannot lock {path}: {reason}")]
    Lock {
        /// Path of the file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An image format this build does not serve.
    #[error("image {path}: format {format} is not supported")]
    UnsupportedFormat {
        /// Path of the image.
        path: PathBuf,
        /// The format name.
        format: String,
    },
    /// Options that contradict each other or are out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// Device options out of range (block size, queues, an image too small for them).
    #[error("invalid option: {0}")]
    Device(#[from] crate::virtio_blk::config::ParamsError),
    /// The listening socket could not be set up.
    #[error("cannot listen on {path}: {reason}")]
    Socket {
        /// Socket path or fd description.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The daemon refused a control request (its message).
    #[error("daemon refused: {0}")]
    ControlRefused(String),
    /// The daemon's reply to a control request made no sense.
    #[error("bad reply from the daemon: {0}")]
    ControlReply(serde_json::Error),
    /// A control request could not be encoded.
    #[error("cannot encode the control request: {0}")]
    ControlEncode(serde_json::Error),
    /// The vhost-user daemon framework failed.
    #[error("vhost-user: {0}")]
    VhostUser(vhost_user_backend::Error),
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying OS error.
        source: io::Error,
    },
}

/// A command-line value that is not one of the names an option accepts (`FromStr` of the
/// option's type; clap prints it after "invalid value").
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{value}' (expected {expected})")]
pub struct UnknownValue {
    /// What the value names, e.g. "format" or "--aio".
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// The names accepted, for the message.
    pub expected: &'static str,
}

impl UnknownValue {
    /// `value` is not a `what`; `expected` lists the accepted names.
    pub fn new(what: &'static str, value: &str, expected: &'static str) -> Self {
        UnknownValue {
            what,
            value: value.to_owned(),
            expected,
        }
    }
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

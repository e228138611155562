//! virtio-vsock in userspace (device id 19), with the host side exposed as
//! Unix sockets the way Firecracker's "hybrid vsock" does. See `muxer` for
//! the host protocol and `device` for the queues.

pub mod device;
pub mod muxer;
pub mod packet;

pub use device::Vsock;

use std::path::PathBuf;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket path is taken.
    #[error("vsock socket path {0} already exists")]
    SocketExists(PathBuf),
    /// Binding the host socket failed.
    #[error("cannot bind the vsock socket {path}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd, timerfd or socket operation failed.
    #[error("vsock i/o")]
    Io(#[source] std::io::Error),
}

#[cfg(test)]
mod device_tests;

//! vessel-net: the rtnetlink vessel needs, on both sides of the VM.
//!
//! Every function acts on the network namespace of the calling *thread*
//! (a netlink socket belongs to the namespace it was opened in); the host
//! side joins the container's namespace first.
//!
//! Host side (the shim, inside the container's network namespace):
//! - [`interfaces`]: what the engine set up (every link but `lo`: kind,
//!   MAC, MTU, addresses, static routes), convertible to the guest's
//!   [`Interface`] with [`HostInterface::to_config`];
//! - [`redirect`] / [`remove_redirect`]: tc `mirred` redirects between the
//!   engine's interface and the VMM's tap (an ingress qdisc with one
//!   match-all filter per direction), the model of Kata's `tcfilter` and
//!   firecracker-containerd's tc-redirect-tap;
//! - [`link_by_name`], [`set_up`], [`delete_link`].
//!
//! The host side needs the `host` feature (the agent leaves it off).
//!
//! Guest side (the agent): [`loopback_up`] and [`configure`], which gives
//! the guest's network devices the names, MACs, MTUs, addresses and routes
//! of a [`NetworkConfig`], in as few system calls as it can (guest system
//! calls are expensive on some hosts): one socket, one link dump, and all
//! changes in one datagram.

mod guest;
#[cfg(feature = "host")]
mod host;
// Without `host`, the requests only the host sends are unused.
#[cfg_attr(not(feature = "host"), allow(dead_code))]
mod nl;
#[cfg(feature = "host")]
mod tc;

use std::io;

pub use guest::{configure, loopback_up};
#[cfg(feature = "host")]
pub use host::{delete_link, interfaces, link_by_name, set_up, HostInterface, LinkKind};
#[cfg(feature = "host")]
pub use tc::{classifier_in_use, redirect, remove_redirect};
pub use vessel_proto::network::{
    ConfigError, Interface, IpNet, MacAddr, NetworkConfig, Route, MAX_INTERFACES,
};

/// Errors of vessel-net.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened, written or read.
    #[error("netlink socket")]
    Socket(#[source] io::Error),
    /// The kernel refused a request.
    #[error("{what}: {}{}", io::Error::from_raw_os_error(*errno), .message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// The request, described.
        what: String,
        /// The kernel's errno (positive).
        errno: i32,
        /// The kernel's extended-ack text, when it gave one.
        message: Option<String>,
    },
    /// A reply could not be decoded.
    #[error("malformed netlink reply: {0}")]
    Decode(String),
    /// A dump was interrupted by a concurrent change, more than once.
    #[error("netlink dump interrupted by concurrent changes")]
    DumpInterrupted,
    /// The configuration was refused before anything was changed.
    #[error("invalid network configuration")]
    Config(#[from] ConfigError),
    /// The configuration has more interfaces than the guest has devices.
    #[error("the configuration has {wanted} interfaces but the guest has {found} network devices")]
    MissingLinks {
        /// Interfaces in the configuration.
        wanted: usize,
        /// Network devices in the guest (besides `lo`).
        found: usize,
    },
    /// An interface name the kernel would refuse.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// The interface has no Ethernet MAC address, so a guest device cannot
    /// take its place.
    #[error("interface {0} has no Ethernet MAC address")]
    NoMac(String),
}

impl Error {
    fn kernel(what: &str, code: i32, message: Option<String>) -> Error {
        Error::Kernel {
            what: what.to_string(),
            errno: code.checked_neg().unwrap_or(i32::MAX),
            message,
        }
    }

    /// The kernel's errno, for [`Error::Kernel`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Result of vessel-net.
pub type Result<T> = std::result::Result<T, Error>;

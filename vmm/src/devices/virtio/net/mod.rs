//! virtio-net (device id 1) in userspace over a tap device.
//!
//! The hosts vessel targets have `/dev/net/tun` but no vhost-net, so the
//! VMM moves frames itself: RX reads frames from the tap (which prepends a
//! 12-byte `virtio_net_hdr_v1`) into the guest's receive buffers, merging
//! buffers (`VIRTIO_NET_F_MRG_RXBUF`) for large frames; TX gathers a
//! descriptor chain (header + frame) and `writev`s it to the tap. Checksum
//! and segmentation offloads are negotiated both ways, so a 64 KiB TCP
//! segment crosses the boundary in one piece: the guest's `HOST_TSO*`
//! lets it send them, its `GUEST_CSUM`/`GUEST_TSO*` become the tap's
//! `TUNSETOFFLOAD` flags.
//!
//! A device may have no backend (`--net none`): the link is down and TX
//! frames are dropped. Templates hold such devices; a clone binds its own
//! tap at restore, and the guest hears about the link coming up through a
//! configuration-change interrupt.
//!
//! Everything in the queues comes from the guest: descriptor directions,
//! addresses and chain lengths are checked, a malformed chain is returned
//! unused and counted ([`NetStats`]), never a panic.

pub mod device;
pub mod tap;

#[cfg(test)]
mod tests;

use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};

pub use device::Net;
pub use tap::{Tap, TapError};

/// virtio device id of a network card.
pub const DEVICE_ID: u32 = 1;
/// `virtio_net_hdr_v1` (with `num_buffers`), the header in front of every
/// frame in both directions (VERSION_1 always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Offset of `gso_type` in the header.
pub const GSO_TYPE_OFFSET: usize = 1;
/// Largest frame (without header) either way: a 64 KiB GSO segment plus
/// Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;
/// Largest header + frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Most virtio-net devices per VM.
pub const MAX_NETS: usize = 8;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    pub use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
    };
}

/// What the device offers (VERSION_1 is added by the transport).
pub fn offered_features() -> u64 {
    use features::*;
    [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ]
    .iter()
    .fold(
        1u64 << crate::devices::virtio::VIRTIO_F_VERSION_1,
        |f, b| f | (1u64 << b),
    )
}

/// What the device offers with offloads turned off (`--net ...,offload=off`,
/// for measurements): no checksum or segmentation offload either way, so
/// the guest checksums and segments every packet itself.
pub fn offered_features_without_offloads() -> u64 {
    use features::*;
    let offloads = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ]
    .iter()
    .fold(0u64, |f, b| f | (1u64 << b));
    offered_features() & !offloads
}

/// The tap's `TUNSETOFFLOAD` flags for the features the driver acked:
/// what the guest accepts on receive. TSO needs checksum offload too.
pub fn tap_offload_flags(acked: u64) -> libc::c_uint {
    use features::*;
    let has = |b: u32| acked & (1u64 << b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// Errors of the virtio-net configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The `--net` argument does not parse.
    #[error("invalid --net {arg:?}: {reason}")]
    Parse {
        /// The argument.
        arg: String,
        /// Why.
        reason: String,
    },
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd could not be created.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Where a device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// Create (or open) the tap of this name in the VMM's network namespace.
    Tap(String),
    /// An open tap fd inherited from the parent.
    Fd(RawFd),
    /// No backend: link down.
    None,
}

/// One `--net` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend.
    pub backend: NetBackend,
    /// The guest's MAC; random (locally administered) when not given at
    /// boot, the snapshot's when not given at restore.
    pub mac: Option<[u8; 6]>,
    /// Offer checksum and segmentation offloads (`offload=off`: not).
    /// A restored device keeps what its driver acked in the snapshot.
    pub offload: bool,
}

impl NetConfig {
    /// Parses `tap=NAME`, `fd=N` or `none`, each with optional `,mac=MAC`
    /// and `,offload=on|off`.
    pub fn parse(arg: &str) -> Result<NetConfig, NetError> {
        let err = |reason: &str| NetError::Parse {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = arg.split(',');
        let first = parts.next().unwrap_or_default();
        let backend = match first.split_once('=') {
            Some(("tap", name)) => {
                if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
                    return Err(err("a tap name has 1 to 15 bytes"));
                }
                NetBackend::Tap(name.to_string())
            }
            Some(("fd", n)) => {
                let fd: RawFd = n.parse().map_err(|_| err("fd must be a number"))?;
                if fd < 3 {
                    return Err(err("fd must be 3 or more"));
                }
                NetBackend::Fd(fd)
            }
            None if first == "none" => NetBackend::None,
            _ => return Err(err("expected tap=NAME, fd=N or none")),
        };
        let mut mac = None;
        let mut offload = None;
        for p in parts {
            match p.split_once('=') {
                Some(("mac", m)) if mac.is_none() => {
                    mac = Some(parse_mac(m).ok_or_else(|| err("mac must be xx:xx:xx:xx:xx:xx"))?)
                }
                Some(("offload", v)) if offload.is_none() => {
                    offload = Some(match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(err("offload is on or off")),
                    })
                }
                _ => return Err(err(&format!("unknown or repeated option {p:?}"))),
            }
        }
        if let Some(m) = mac {
            if m[0] & 1 != 0 {
                return Err(err("a multicast mac cannot be an interface address"));
            }
        }
        Ok(NetConfig {
            backend,
            mac,
            offload: offload.unwrap_or(true),
        })
    }
}

impl NetConfig {
    /// For `fd=N`: checks that fd N is open, before the VMM opens files of
    /// its own (a closed N could otherwise be reused by one of them and
    /// then mistaken for the tap).
    pub fn check_inherited_fd(&self) -> Result<(), NetError> {
        if let NetBackend::Fd(fd) = self.backend {
            // SAFETY: F_GETFD only reads the fd's flags.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(NetError::Tap(TapError::BadFd {
                    fd,
                    reason: format!("not open ({})", std::io::Error::last_os_error()),
                }));
            }
        }
        Ok(())
    }
}

/// Parses `xx:xx:xx:xx:xx:xx`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC the usual way.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom(2) writes at most 6 bytes into our array.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        // No entropy: still unique enough per process for a link-local MAC.
        let pid = std::process::id().to_le_bytes();
        mac[2..].copy_from_slice(&pid);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Counters of one device, for logs and tests.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes (without header) written to the tap.
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes (without header) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Malformed TX chains dropped.
    pub tx_malformed: AtomicU64,
    /// Malformed RX chains returned unused.
    pub rx_malformed: AtomicU64,
    /// TX frames dropped without a backend or on a tap error.
    pub tx_dropped: AtomicU64,
    /// RX frames dropped (too large for the guest's buffers, tap errors).
    pub rx_dropped: AtomicU64,
    /// Times RX stopped reading the tap for lack of guest buffers.
    pub rx_no_buffers: AtomicU64,
    /// TX frames that were GSO segments (the tap segments them).
    pub tx_gso_frames: AtomicU64,
    /// RX frames that were GSO segments (the guest takes them whole).
    pub rx_gso_frames: AtomicU64,
    /// Largest TX frame (header included).
    pub tx_max_len: AtomicU64,
    /// Largest RX frame (header included).
    pub rx_max_len: AtomicU64,
}

/// The device's part of a snapshot. The backend is host state and never
/// saved: a restore binds whatever its `--net` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC in config space.
    pub mac: [u8; 6],
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Whether config space said LINK_UP (a backend was bound).
    pub link_up: bool,
    /// The queues when the device was active.
    pub queues: Option<Vec<crate::devices::virtio::mmio::QueueSnapshot>>,
}

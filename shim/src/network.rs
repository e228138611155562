//! The container's network: the engine's interfaces wired into the VM.
//!
//! The sandbox's monitor runs in the container's network namespace (see
//! [`crate::netns`]), where the engine put its interfaces (a veth from
//! netavark, CNI or docker's libnetwork; macvlan, ipvlan). For each one
//! vessel starts the VMM with a tap of its own in that namespace (a
//! virtio-net device in the guest with the interface's MAC) and joins the
//! two with tc `mirred` redirects both ways (ingress of the interface to
//! egress of the tap and back: the model of Kata's `tcfilter` and
//! firecracker-containerd's tc-redirect-tap). The guest's interface then
//! gets the interface's addresses, routes and MTU from the agent, so the
//! container holds exactly the address the engine gave it and the
//! engine's port publishing (DNAT, proxies) reaches it unchanged.
//!
//! The interface keeps its addresses on the host side: the host's stack in
//! that namespace never sees the traffic (the redirect takes every frame
//! at ingress), so nothing answers twice.
//!
//! The taps are not persistent: they disappear with the VMM. [`Wiring::
//! disconnect`] removes the ingress qdiscs (and their filters) vessel added
//! to the engine's interfaces.

use vessel_net::{HostInterface, LinkKind, NetworkConfig};

/// Errors wiring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Netlink failed.
    #[error("{what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: vessel_net::Error,
    },
    /// An interface vessel cannot connect to a VM.
    #[error(
        "network interface {name} is a {kind}: vessel can connect veth, macvlan, ipvlan (L2) \
         and Ethernet devices to the container's VM"
    )]
    Unsupported {
        /// Interface name.
        name: String,
        /// Its link kind.
        kind: String,
    },
    /// The VMM did not create the tap.
    #[error("the VMM's tap {0} is missing")]
    NoTap(String),
}

/// `net` (a VMM `--net` value) with `,offload=off` when `offload` is
/// false.
pub fn with_offload(net: String, offload: bool) -> String {
    if offload {
        net
    } else {
        format!("{net},offload=off")
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(vessel_net::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// One engine interface and the tap standing for it.
#[derive(Debug)]
struct Link {
    iface: HostInterface,
    tap: String,
}

/// The network of one sandbox: the engine's interfaces in the monitor's
/// network namespace and their taps.
#[derive(Debug, Default)]
pub struct Wiring {
    links: Vec<Link>,
    config: NetworkConfig,
}

impl Wiring {
    /// Reads the interfaces of the current network namespace and plans a
    /// tap for each one that is up; refuses a kind that cannot be wired.
    pub fn plan() -> Result<Wiring, NetworkError> {
        let found = vessel_net::interfaces().map_err(nl("listing network interfaces"))?;
        let mut w = Wiring::default();
        for iface in found {
            // A new namespace holds down fallback tunnel devices (tunl0,
            // sit0, ...) where their modules are loaded; what an engine
            // sets up is up.
            if !iface.admin_up {
                tracing::debug!("{}: down, not wired", iface.name);
                continue;
            }
            let i = w.links.len();
            let kind = match &iface.kind {
                LinkKind::Veth | LinkKind::Macvlan | LinkKind::Ipvlan | LinkKind::Device => None,
                LinkKind::Bridge => Some("bridge"),
                LinkKind::Macvtap => Some("macvtap"),
                LinkKind::Tun => Some("tun/tap"),
                LinkKind::Dummy => Some("dummy"),
                LinkKind::Other(k) => Some(k.as_str()),
            };
            if let Some(kind) = kind {
                return Err(NetworkError::Unsupported {
                    name: iface.name,
                    kind: kind.to_string(),
                });
            }
            // An ipvlan in L3 mode has no Ethernet address of its own.
            let config = iface.to_config().map_err(|_| NetworkError::Unsupported {
                name: iface.name.clone(),
                kind: "link without an Ethernet address".into(),
            })?;
            w.config.interfaces.push(config);
            w.links.push(Link {
                iface,
                tap: format!("vessel-tap{i}"),
            });
        }
        Ok(w)
    }

    /// Whether there is nothing to wire.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// How many interfaces (and VM network devices) there are.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// The VMM's `--net` values, one per interface, in order.
    pub fn vmm_args(&self, offload: bool) -> Vec<String> {
        self.links
            .iter()
            .zip(&self.config.interfaces)
            .map(|(l, c)| with_offload(format!("tap={},mac={}", l.tap, c.mac), offload))
            .collect()
    }

    /// Joins each interface to its tap (which the VMM created): the tap
    /// up, redirects both ways.
    pub fn connect(&self) -> Result<(), NetworkError> {
        for l in &self.links {
            let tap = vessel_net::link_by_name(&l.tap)
                .map_err(nl(format!("finding {}", l.tap)))?
                .ok_or_else(|| NetworkError::NoTap(l.tap.clone()))?;
            vessel_net::set_up(tap).map_err(nl(format!("setting {} up", l.tap)))?;
            vessel_net::redirect(l.iface.index, tap)
                .map_err(nl(format!("redirecting {} to {}", l.iface.name, l.tap)))?;
            vessel_net::redirect(tap, l.iface.index)
                .map_err(nl(format!("redirecting {} to {}", l.tap, l.iface.name)))?;
            tracing::debug!(iface = l.iface.name, tap = l.tap, "connected");
        }
        Ok(())
    }

    /// Removes what [`Wiring::connect`] added to the engine's interfaces
    /// (best effort: an engine may already have removed them).
    pub fn disconnect(&self) {
        for l in &self.links {
            if let Err(e) = vessel_net::remove_redirect(l.iface.index) {
                tracing::debug!("removing the redirect of {}: {e}", l.iface.name);
            }
        }
    }

    /// What the agent applies to the guest's interfaces, in the same
    /// order as [`Wiring::vmm_args`].
    pub fn guest_config(&self) -> &NetworkConfig {
        &self.config
    }
}

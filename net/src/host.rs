//! Host side: what the engine put in the container's network namespace.

use std::net::IpAddr;

use netlink_packet_core::Parseable;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use vessel_proto::network::{valid_interface_name, Interface, IpNet, MacAddr, Route};

use crate::nl::{
    ifinfomsg, Msg, Netlink, AF_UNSPEC, IFF_UP, IFLA_IFNAME, RTM_DELLINK, RTM_GETADDR, RTM_GETLINK,
    RTM_GETROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RT_TABLE_MAIN,
};
use crate::{Error, Result};

/// Attempts at a consistent set of dumps.
const DUMP_ATTEMPTS: usize = 3;

/// What kind of device a link is (`IFLA_INFO_KIND`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// veth (netavark, CNI bridge, docker).
    Veth,
    /// Linux bridge.
    Bridge,
    /// macvlan.
    Macvlan,
    /// macvtap.
    Macvtap,
    /// ipvlan (L2 or L3; no MAC of its own in L3 mode).
    Ipvlan,
    /// tun or tap (the kernel reports both as `tun`).
    Tun,
    /// dummy.
    Dummy,
    /// No kind reported: a hardware (or virtio) device.
    Device,
    /// Anything else, by the kernel's name.
    Other(String),
}

/// A link of the container's network namespace, with what a guest device
/// needs to take its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// ifindex.
    pub index: u32,
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Device kind.
    pub kind: LinkKind,
    /// Ethernet address (`None` for links without a 6-byte one).
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub admin_up: bool,
    /// Operationally up (`IFLA_OPERSTATE` up, or unknown with a carrier).
    pub oper_up: bool,
    /// IPv4 and IPv6 addresses, IPv6 link-local ones left out.
    pub addresses: Vec<IpNet>,
    /// Routes of the main table through this link, without those the
    /// kernel derives from the addresses (`proto kernel`) and link-local
    /// ones: the default route and other static routes.
    pub routes: Vec<Route>,
}

impl HostInterface {
    /// The guest interface that takes this one's place: same name, MAC,
    /// MTU, addresses and routes. [`Error::NoMac`] for a link without an
    /// Ethernet address (an ipvlan in L3 mode, a tun device).
    pub fn to_config(&self) -> Result<Interface> {
        let mac = self.mac.ok_or_else(|| Error::NoMac(self.name.clone()))?;
        Ok(Interface {
            name: self.name.clone(),
            mac,
            mtu: self.mtu,
            addresses: self.addresses.clone(),
            routes: self.routes.clone(),
        })
    }
}

fn decode(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Decode(format!("{what}: {e}"))
}

fn kind_of(info: &[LinkInfo]) -> LinkKind {
    let Some(kind) = info.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    }) else {
        return LinkKind::Device;
    };
    match kind {
        InfoKind::Veth => LinkKind::Veth,
        InfoKind::Bridge => LinkKind::Bridge,
        InfoKind::MacVlan => LinkKind::Macvlan,
        InfoKind::MacVtap => LinkKind::Macvtap,
        InfoKind::IpVlan => LinkKind::Ipvlan,
        InfoKind::Tun => LinkKind::Tun,
        InfoKind::Dummy => LinkKind::Dummy,
        other => LinkKind::Other(other.to_string()),
    }
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

/// Every link of the calling thread's network namespace except loopback,
/// by ifindex, with its addresses and static routes (see
/// [`HostInterface`]). Three dumps on one socket; repeated when a change
/// meanwhile made the kernel mark a dump inconsistent.
pub fn interfaces() -> Result<Vec<HostInterface>> {
    let mut nl = Netlink::open(true)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match read_interfaces(&mut nl) {
            Err(Error::DumpInterrupted) if attempt < DUMP_ATTEMPTS => {
                tracing::debug!(attempt, "netlink dump interrupted, retrying");
            }
            other => return other,
        }
    }
}

fn read_interfaces(nl: &mut Netlink) -> Result<Vec<HostInterface>> {
    let mut out = Vec::new();
    let req = Msg::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0), "list links");
    nl.dump(req, |ty, payload| {
        if ty != RTM_NEWLINK {
            return Ok(());
        }
        let msg = LinkMessage::parse(payload).map_err(|e| decode("link message", e))?;
        if msg.header.flags.contains(LinkFlags::Loopback) {
            return Ok(());
        }
        out.push(host_interface(&msg));
        Ok(())
    })?;
    out.sort_by_key(|i| i.index);

    // struct ifaddrmsg, family AF_UNSPEC: both families.
    let req = Msg::new(
        RTM_GETADDR,
        0,
        &[AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0],
        "list addresses",
    );
    nl.dump(req, |ty, payload| {
        if ty != RTM_NEWADDR {
            return Ok(());
        }
        let msg = AddressMessage::parse(payload).map_err(|e| decode("address message", e))?;
        let Some(iface) = out.iter_mut().find(|i| i.index == msg.header.index) else {
            return Ok(());
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
        // peer's on point-to-point links); IPv6 has only IFA_ADDRESS.
        let mut local = None;
        let mut address = None;
        for a in &msg.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        if let Some(addr) = local.or(address) {
            if !is_ipv6_link_local(&addr) {
                iface.addresses.push(IpNet {
                    addr,
                    prefix_len: msg.header.prefix_len,
                });
            }
        }
        Ok(())
    })?;

    // struct rtmsg, family AF_UNSPEC: both families, every table.
    let req = Msg::new(RTM_GETROUTE, 0, &[AF_UNSPEC; 12], "list routes");
    nl.dump(req, |ty, payload| {
        if ty != RTM_NEWROUTE {
            return Ok(());
        }
        let msg = RouteMessage::parse(payload).map_err(|e| decode("route message", e))?;
        let h = &msg.header;
        if h.kind != RouteType::Unicast || h.protocol == RouteProtocol::Kernel {
            return Ok(());
        }
        let mut table = u32::from(h.table);
        let (mut dst, mut gateway, mut oif, mut metric) = (None, None, None, None);
        for a in &msg.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(d) => dst = route_ip(d),
                RouteAttribute::Gateway(g) => gateway = route_ip(g),
                RouteAttribute::Oif(o) => oif = Some(*o),
                RouteAttribute::Priority(p) => metric = Some(*p),
                RouteAttribute::MultiPath(_) => {
                    tracing::warn!("multipath route left out: {msg:?}");
                }
                _ => {}
            }
        }
        if table != u32::from(RT_TABLE_MAIN) {
            return Ok(());
        }
        let Some(iface) = oif.and_then(|o| out.iter_mut().find(|i| i.index == o)) else {
            return Ok(());
        };
        let destination = match dst {
            Some(addr) if h.destination_prefix_length > 0 || !addr.is_unspecified() => {
                if is_ipv6_link_local(&addr) {
                    return Ok(());
                }
                Some(IpNet {
                    addr,
                    prefix_len: h.destination_prefix_length,
                })
            }
            _ => None,
        };
        if destination.is_none() && gateway.is_none() {
            // A default route straight onto the link (no next hop): the
            // guest gets it as "0.0.0.0/0 dev eth0".
            let unspecified: IpAddr =
                if h.address_family == netlink_packet_route::AddressFamily::Inet6 {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                };
            iface.routes.push(Route {
                destination: Some(IpNet {
                    addr: unspecified,
                    prefix_len: 0,
                }),
                gateway: None,
                metric,
            });
            return Ok(());
        }
        iface.routes.push(Route {
            destination,
            gateway,
            metric,
        });
        Ok(())
    })?;
    Ok(out)
}

fn host_interface(msg: &LinkMessage) -> HostInterface {
    let mut iface = HostInterface {
        index: msg.header.index,
        name: String::new(),
        kind: LinkKind::Device,
        mac: None,
        mtu: 0,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        oper_up: false,
        addresses: Vec::new(),
        routes: Vec::new(),
    };
    let mut oper = None;
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => iface.name = n.clone(),
            LinkAttribute::Address(mac) => {
                iface.mac = <[u8; 6]>::try_from(mac.as_slice()).ok().map(MacAddr);
            }
            LinkAttribute::Mtu(m) => iface.mtu = *m,
            LinkAttribute::LinkInfo(info) => iface.kind = kind_of(info),
            LinkAttribute::OperState(s) => oper = Some(*s),
            _ => {}
        }
    }
    iface.oper_up = match oper {
        Some(State::Up) => true,
        Some(State::Unknown) | None => {
            iface.admin_up && msg.header.flags.contains(LinkFlags::LowerUp)
        }
        Some(_) => false,
    };
    iface
}

/// The ifindex of the link called `name`, or `None` if there is none.
pub fn link_by_name(name: &str) -> Result<Option<u32>> {
    if !valid_interface_name(name) {
        return Err(Error::InvalidName(name.chars().take(64).collect()));
    }
    let mut nl = Netlink::open(true)?;
    let mut req = Msg::new(
        RTM_GETLINK,
        0,
        &ifinfomsg(0, 0, 0),
        format!("find link {name}"),
    );
    req.attr_str(IFLA_IFNAME, name);
    let mut index = None;
    match nl.get(req, |ty, payload| {
        if ty == RTM_NEWLINK && payload.len() >= 8 {
            index = Some(u32::from_ne_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
    }) {
        Ok(()) => Ok(index),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets link `index` up.
pub fn set_up(index: u32) -> Result<()> {
    let mut nl = Netlink::open(true)?;
    nl.request(Msg::new(
        RTM_NEWLINK,
        0,
        &ifinfomsg(index, IFF_UP, IFF_UP),
        format!("set link {index} up"),
    ))
}

/// Deletes link `index` (for a veth, both ends).
pub fn delete_link(index: u32) -> Result<()> {
    let mut nl = Netlink::open(true)?;
    nl.request(Msg::new(
        RTM_DELLINK,
        0,
        &ifinfomsg(index, 0, 0),
        format!("delete link {index}"),
    ))
}

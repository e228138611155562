//! Guest side: bring `lo` up and configure the virtio-net devices.

use std::net::IpAddr;

use vessel_proto::network::{Interface, IpNet, NetworkConfig, Route};

use crate::nl::{
    self, ifinfomsg, Msg, Netlink, AF_INET, AF_INET6, IFA_ADDRESS, IFA_FLAGS, IFA_F_NODAD,
    IFA_LOCAL, IFF_LOOPBACK, IFF_UP, IFINFOMSG_LEN, IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU,
    NLM_F_CREATE, NLM_F_REPLACE, RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_PRIORITY, RTM_GETLINK,
    RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RTN_UNICAST, RTPROT_BOOT, RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE, RT_TABLE_MAIN,
};
use crate::{Error, Result};

/// `lo` is the first device of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Brings `lo` up (the kernel then adds 127.0.0.1/8 and ::1): a netlink
/// socket, one request and its acknowledgement.
pub fn loopback_up() -> Result<()> {
    let mut nl = Netlink::open(false)?;
    nl.request(set_flags(LOOPBACK_IFINDEX, IFF_UP, "set lo up"))
}

fn set_flags(index: u32, flags: u32, what: &str) -> Msg {
    Msg::new(RTM_NEWLINK, 0, &ifinfomsg(index, flags, IFF_UP), what)
}

/// A guest network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) up: bool,
    /// Current MAC, when the device has a 6-byte one.
    pub(crate) mac: Option<[u8; 6]>,
    /// Current MTU.
    pub(crate) mtu: Option<u32>,
}

/// Every device but loopback, by ifindex (virtio-net devices in probe
/// order, which is the VMM's slot order).
fn links(nl: &mut Netlink) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let req = Msg::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0), "list links");
    nl.dump(req, |ty, payload| {
        if ty != RTM_NEWLINK {
            return Ok(());
        }
        if payload.len() < IFINFOMSG_LEN {
            return Err(Error::Decode("short link message".into()));
        }
        let index = u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]);
        let flags = u32::from_ne_bytes([payload[8], payload[9], payload[10], payload[11]]);
        if flags & IFF_LOOPBACK != 0 {
            return Ok(());
        }
        let mut link = Link {
            index,
            name: String::new(),
            up: flags & IFF_UP != 0,
            mac: None,
            mtu: None,
        };
        for a in nl::attrs(&payload[IFINFOMSG_LEN..]) {
            let v = a.value();
            match a.kind() {
                IFLA_IFNAME => link.name = nl::c_string(v),
                IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(v).ok(),
                IFLA_MTU => {
                    link.mtu = <[u8; 4]>::try_from(v).ok().map(u32::from_ne_bytes);
                }
                _ => {}
            }
        }
        out.push(link);
        Ok(())
    })?;
    out.sort_by_key(|l| l.index);
    Ok(out)
}

/// Applies `config`: the i-th interface to the i-th guest device (by
/// ifindex, loopback excluded). Each device is renamed, gets its MAC and
/// MTU, and is brought up; then every address is added (IPv6 ones without
/// duplicate address detection, so they are usable at once), then the
/// routes without a gateway, then those with one (whose gateway is now
/// reachable). Adding is replacing, so applying a configuration twice is
/// harmless. An empty configuration makes no system call.
///
/// The configuration is validated first; a configuration with more
/// interfaces than the guest has devices is [`Error::MissingLinks`]. The
/// first request the kernel refuses is returned as [`Error::Kernel`]
/// (the others are still applied).
pub fn configure(config: &NetworkConfig) -> Result<()> {
    config.validate()?;
    if config.interfaces.is_empty() {
        return Ok(());
    }
    let mut nl = Netlink::open(false)?;
    let links = links(&mut nl)?;
    if links.len() < config.interfaces.len() {
        return Err(Error::MissingLinks {
            wanted: config.interfaces.len(),
            found: links.len(),
        });
    }
    let mut msgs = plan(config, &links);
    nl.batch(&mut msgs)
}

/// The requests that apply `config` to `links` (already checked to be
/// enough), in order.
pub(crate) fn plan(config: &NetworkConfig, links: &[Link]) -> Vec<Msg> {
    let pairs: Vec<(&Interface, &Link)> = config.interfaces.iter().zip(links).collect();
    let configured = &links[..pairs.len()];
    let mut msgs = Vec::new();
    // A new name that another device holds now (names are unique per
    // namespace): every configured device, and every other device holding
    // one of the new names, first gets a temporary name. The others keep
    // theirs.
    let clash = pairs.iter().any(|(iface, link)| {
        links
            .iter()
            .any(|other| other.index != link.index && other.name == iface.name)
    });
    for link in links {
        let is_configured = configured.iter().any(|c| c.index == link.index);
        let holds_new_name = pairs.iter().any(|(i, _)| i.name == link.name);
        let to_temporary = clash && (is_configured || holds_new_name);
        let renamed = to_temporary
            || pairs
                .iter()
                .any(|(i, l)| l.index == link.index && i.name != link.name);
        if link.up && renamed {
            // A device must be down to be renamed.
            msgs.push(set_flags(link.index, 0, &format!("set {} down", link.name)));
        }
        if to_temporary {
            let mut m = set_flags(link.index, 0, &format!("rename {}", link.name));
            m.attr_str(IFLA_IFNAME, &format!("vesseltmp{}", link.index));
            msgs.push(m);
        }
    }
    // Only what differs is set: a MAC change alone runs the kernel's
    // address-change notifiers (IPv6 among them), expensive guest kernel
    // work on some hosts, and the host normally starts the VMM with the
    // right MAC already.
    for (iface, link) in &pairs {
        let rename = clash || iface.name != link.name;
        let set_mac = link.mac != Some(iface.mac.0);
        let set_mtu = iface.mtu != 0 && link.mtu != Some(iface.mtu);
        // Down now, or taken down above to be renamed.
        let set_up = !link.up || rename;
        if !(rename || set_mac || set_mtu || set_up) {
            continue;
        }
        let mut m = set_flags(
            link.index,
            IFF_UP,
            &format!("configure device {} as {}", link.name, iface.name),
        );
        if rename {
            m.attr_str(IFLA_IFNAME, &iface.name);
        }
        if set_mac {
            m.attr(IFLA_ADDRESS, &iface.mac.0);
        }
        if set_mtu {
            m.attr_u32(IFLA_MTU, iface.mtu);
        }
        msgs.push(m);
    }
    for (iface, link) in &pairs {
        for a in &iface.addresses {
            msgs.push(add_address(link.index, &iface.name, a));
        }
    }
    // On-link routes first: gateways may need them.
    for with_gateway in [false, true] {
        for (iface, link) in &pairs {
            for r in iface
                .routes
                .iter()
                .filter(|r| r.gateway.is_some() == with_gateway)
            {
                msgs.push(add_route(link.index, &iface.name, r));
            }
        }
    }
    msgs
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn add_address(index: u32, name: &str, a: &IpNet) -> Msg {
    let flags = if a.addr.is_ipv6() { IFA_F_NODAD } else { 0 };
    // struct ifaddrmsg: family, prefixlen, flags (8 bits), scope, index.
    let mut h = [0u8; 8];
    h[0] = family(&a.addr);
    h[1] = a.prefix_len;
    h[2] = flags as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    let mut m = Msg::new(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        &h,
        format!("add address {a} to {name}"),
    );
    let bytes = ip_bytes(&a.addr);
    m.attr(IFA_LOCAL, &bytes).attr(IFA_ADDRESS, &bytes);
    if flags != 0 {
        m.attr_u32(IFA_FLAGS, flags);
    }
    m
}

fn add_route(index: u32, name: &str, r: &Route) -> Msg {
    let af = if r.is_ipv6() { AF_INET6 } else { AF_INET };
    let dst_len = r.destination.map_or(0, |d| d.prefix_len);
    let scope = if r.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags (32 bits).
    let h = [
        af,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    let what = format!(
        "add route to {} via {} on {name}",
        r.destination
            .map_or_else(|| "default".to_string(), |d| d.to_string()),
        r.gateway
            .map_or_else(|| "link".to_string(), |g| g.to_string()),
    );
    let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &h, what);
    if let Some(d) = &r.destination {
        m.attr(RTA_DST, &ip_bytes(&d.addr));
    }
    if let Some(g) = &r.gateway {
        m.attr(RTA_GATEWAY, &ip_bytes(g));
    }
    m.attr_u32(RTA_OIF, index);
    if let Some(metric) = r.metric {
        m.attr_u32(RTA_PRIORITY, metric);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Parseable;
    use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
    };
    use vessel_proto::network::MacAddr;

    fn config() -> NetworkConfig {
        NetworkConfig {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 7]),
                mtu: 1400,
                addresses: vec![
                    IpNet {
                        addr: "10.0.0.2".parse().unwrap(),
                        prefix_len: 24,
                    },
                    IpNet {
                        addr: "fd00::2".parse().unwrap(),
                        prefix_len: 64,
                    },
                ],
                routes: vec![
                    Route {
                        destination: None,
                        gateway: Some("10.0.0.1".parse().unwrap()),
                        metric: Some(5),
                    },
                    Route {
                        destination: Some(IpNet {
                            addr: "192.168.7.0".parse().unwrap(),
                            prefix_len: 24,
                        }),
                        gateway: None,
                        metric: None,
                    },
                ],
            }],
        }
    }

    fn link(index: u32, name: &str, up: bool) -> Link {
        Link {
            index,
            name: name.into(),
            up,
            mac: None,
            mtu: None,
        }
    }

    #[test]
    fn only_what_differs_is_set() {
        let c = config();
        let same = Link {
            mac: Some(c.interfaces[0].mac.0),
            mtu: Some(1400),
            ..link(2, "eth0", true)
        };
        // Nothing to change on the link: addresses and routes only.
        let msgs = plan(&c, std::slice::from_ref(&same));
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        // A different MTU only.
        let mut msgs = plan(
            &c,
            &[Link {
                mtu: Some(1500),
                ..same
            }],
        );
        let (_, p) = payload(&mut msgs[0]);
        let l = LinkMessage::parse(&p[..]).unwrap();
        assert_eq!(l.attributes, vec![LinkAttribute::Mtu(1400)]);
    }

    /// The payload (after the netlink header) and type of a request.
    fn payload(m: &mut Msg) -> (u16, Vec<u8>) {
        let b = m.bytes(1);
        (u16::from_ne_bytes([b[4], b[5]]), b[16..].to_vec())
    }

    #[test]
    fn plan_encodes_link_addresses_and_routes() {
        let mut msgs = plan(&config(), &[link(2, "eth0", false)]);
        assert_eq!(msgs.len(), 5, "{msgs:?}");
        let (ty, p) = payload(&mut msgs[0]);
        assert_eq!(ty, RTM_NEWLINK);
        let l = LinkMessage::parse(&p[..]).unwrap();
        assert_eq!(l.header.index, 2);
        assert_eq!(l.header.flags, LinkFlags::Up);
        assert_eq!(l.header.change_mask, LinkFlags::Up);
        // Same name: not renamed.
        assert_eq!(
            l.attributes,
            vec![
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 7]),
                LinkAttribute::Mtu(1400)
            ]
        );
        let (ty, p) = payload(&mut msgs[2]);
        assert_eq!(ty, RTM_NEWADDR);
        let a = AddressMessage::parse(&p[..]).unwrap();
        assert_eq!((a.header.index, a.header.prefix_len), (2, 64));
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert!(a.attributes.contains(&AddressAttribute::Local(v6)));
        assert!(a.attributes.contains(&AddressAttribute::Address(v6)));
        assert!(a
            .attributes
            .contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
        // The on-link route comes before the gateway route.
        let (ty, p) = payload(&mut msgs[3]);
        assert_eq!(ty, RTM_NEWROUTE);
        let r = RouteMessage::parse(&p[..]).unwrap();
        assert_eq!(r.header.scope, RouteScope::Link);
        assert_eq!(r.header.destination_prefix_length, 24);
        assert!(r
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                "192.168.7.0".parse().unwrap()
            ))));
        let (_, p) = payload(&mut msgs[4]);
        let r = RouteMessage::parse(&p[..]).unwrap();
        assert_eq!(r.header.destination_prefix_length, 0);
        assert_eq!(r.header.protocol, RouteProtocol::Boot);
        assert_eq!(r.header.kind, RouteType::Unicast);
        assert_eq!(r.header.scope, RouteScope::Universe);
        assert_eq!(
            r.attributes,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet("10.0.0.1".parse().unwrap())),
                RouteAttribute::Oif(2),
                RouteAttribute::Priority(5),
            ]
        );
    }

    #[test]
    fn renaming_an_up_device_takes_it_down_first() {
        let mut msgs = plan(&config(), &[link(3, "enp0s1", true)]);
        let (_, p) = payload(&mut msgs[0]);
        let down = LinkMessage::parse(&p[..]).unwrap();
        assert_eq!(down.header.flags, LinkFlags::empty());
        assert_eq!(down.header.change_mask, LinkFlags::Up);
        let (_, p) = payload(&mut msgs[1]);
        let l = LinkMessage::parse(&p[..]).unwrap();
        assert_eq!(l.attributes[0], LinkAttribute::IfName("eth0".into()));
    }

    #[test]
    fn swapped_names_go_through_temporary_names() {
        let mut c = config();
        let mut second = c.interfaces[0].clone();
        second.name = "eth0".into();
        c.interfaces[0].name = "eth1".into();
        c.interfaces.push(second);
        let mut msgs = plan(&c, &[link(2, "eth0", false), link(3, "eth1", false)]);
        let names: Vec<String> = msgs
            .iter_mut()
            .filter_map(|m| {
                let (ty, p) = payload(m);
                (ty == RTM_NEWLINK).then(|| LinkMessage::parse(&p[..]).unwrap())
            })
            .filter_map(|l| {
                l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })
            })
            .collect();
        assert_eq!(names, ["vesseltmp2", "vesseltmp3", "eth1", "eth0"]);
    }

    #[test]
    fn a_new_name_held_by_an_unconfigured_device_is_freed() {
        let mut c = config();
        c.interfaces[0].name = "eth1".into();
        let links = [
            link(2, "eth0", false),
            link(3, "eth1", true),
            link(4, "eth2", false),
        ];
        let mut msgs = plan(&c, &links);
        let heads: Vec<(u32, Option<String>)> = msgs
            .iter_mut()
            .filter_map(|m| {
                let (ty, p) = payload(m);
                (ty == RTM_NEWLINK).then(|| LinkMessage::parse(&p[..]).unwrap())
            })
            .map(|l| {
                let name = l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                });
                (l.header.index, name)
            })
            .collect();
        // eth1 (up) is taken down and renamed; eth2 is left alone.
        assert_eq!(
            heads,
            [
                (2, Some("vesseltmp2".into())),
                (3, None),
                (3, Some("vesseltmp3".into())),
                (2, Some("eth1".into())),
            ]
        );
    }
}

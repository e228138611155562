//! Network configuration of the guest: what the host read from the
//! container's network namespace (one entry per interface the engine set
//! up there), for the agent to apply to the guest's virtio-net devices.
//!
//! ```text
//! {"interfaces":[{"name":"eth0","mac":"02:42:ac:11:00:02","mtu":1500,
//!   "addresses":["172.17.0.2/16"],
//!   "routes":[{"destination":null,"gateway":"172.17.0.1","metric":null}]}]}
//! ```
//!
//! The i-th interface goes to the i-th guest network device (in the order
//! of the VMM's `--net` options). Everything here comes from the host and
//! is checked by [`NetworkConfig::validate`] before the agent applies it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most interfaces one configuration may hold.
pub const MAX_INTERFACES: usize = 16;
/// Most addresses per interface.
pub const MAX_ADDRESSES: usize = 64;
/// Most routes per interface.
pub const MAX_ROUTES: usize = 256;
/// Longest interface name in bytes (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;
/// Smallest MTU accepted (IPv4's minimum); 0 means "keep the device's".
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted.
pub const MAX_MTU: u32 = 65535;

/// Body of [`crate::RequestBody::ConfigureNetwork`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// One entry per guest network device, in device order.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
}

/// One interface: the guest device gets this name, MAC, MTU, addresses
/// and routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name in the guest (at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// Link-layer address.
    pub mac: MacAddr,
    /// MTU; 0 keeps the device's default.
    #[serde(default)]
    pub mtu: u32,
    /// Addresses with their prefix lengths (IPv4 and IPv6).
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// Routes through this interface (main table).
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// An address and its prefix length, written `10.88.0.2/16` in JSON (a
/// string rather than an object: each struct the agent deserializes costs
/// kilobytes of code in its binary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length: at most 32 (IPv4) or 128 (IPv6).
    pub prefix_len: u8,
}

impl IpNet {
    /// Whether the prefix length fits the address family.
    pub fn is_valid(&self) -> bool {
        self.prefix_len <= max_prefix(&self.addr)
    }

    /// Whether `ip` is inside this network (same family, same prefix).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A string that is not `address/prefix length`.
#[derive(Debug, thiserror::Error)]
#[error("invalid address/prefix {0:?}")]
pub struct IpNetParseError(String);

impl FromStr for IpNet {
    type Err = IpNetParseError;

    /// `addr/prefix_len`; the prefix length is not checked against the
    /// family here ([`IpNet::is_valid`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IpNetParseError(s.chars().take(64).collect());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(IpNet {
            addr: addr.parse().map_err(|_| bad())?,
            prefix_len: len.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits).min(a.len() * 8);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[whole] & mask) == (b[whole] & mask)
}

/// A route. Without `destination` it is the default route of its family;
/// without `gateway` the destination is on the link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination network; `None`: default route (`0.0.0.0/0`, `::/0`).
    #[serde(default)]
    pub destination: Option<IpNet>,
    /// Next hop; `None`: directly on the link.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Route priority (metric).
    #[serde(default)]
    pub metric: Option<u32>,
}

impl Route {
    /// Whether this is an IPv6 route (from its destination, else its
    /// gateway).
    pub fn is_ipv6(&self) -> bool {
        self.destination
            .map(|d| d.addr.is_ipv6())
            .or(self.gateway.map(|g| g.is_ipv6()))
            .unwrap_or(false)
    }
}

/// A 48-bit MAC address, written `02:42:ac:11:00:02` in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A string that is not a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(s.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a [`NetworkConfig`] was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// More than [`MAX_INTERFACES`] interfaces.
    #[error("{0} interfaces (at most {MAX_INTERFACES})")]
    TooManyInterfaces(usize),
    /// A name the kernel would refuse, or a duplicate.
    #[error("interface {index}: invalid name {name:?}")]
    Name {
        /// Position in the configuration.
        index: usize,
        /// The name (cut to 64 characters).
        name: String,
    },
    /// A multicast or all-zero MAC.
    #[error("interface {name}: unusable MAC address {mac}")]
    Mac {
        /// Interface name.
        name: String,
        /// The address.
        mac: MacAddr,
    },
    /// MTU out of range.
    #[error("interface {name}: MTU {mtu} out of range ({MIN_MTU}..={MAX_MTU}, or 0)")]
    Mtu {
        /// Interface name.
        name: String,
        /// The MTU.
        mtu: u32,
    },
    /// Too many addresses or routes.
    #[error("interface {name}: too many {what} ({count})")]
    TooMany {
        /// Interface name.
        name: String,
        /// "addresses" or "routes".
        what: &'static str,
        /// How many.
        count: usize,
    },
    /// A prefix length beyond the family's width.
    #[error("interface {name}: prefix length {prefix_len} too long for {addr}")]
    Prefix {
        /// Interface name.
        name: String,
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// A route whose destination and gateway are of different families, or
    /// that has neither.
    #[error("interface {name}: invalid route {route}")]
    Route {
        /// Interface name.
        name: String,
        /// The route, described.
        route: String,
    },
}

/// Whether the kernel accepts `name` as an interface name
/// (`dev_valid_name`): 1 to 15 bytes, not `.` or `..`, no `/`, `:`,
/// whitespace or NUL.
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl NetworkConfig {
    /// Checks every field an agent must not trust: counts, names, MACs,
    /// MTUs, prefix lengths and route families.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.len() > MAX_INTERFACES {
            return Err(ConfigError::TooManyInterfaces(self.interfaces.len()));
        }
        for (index, iface) in self.interfaces.iter().enumerate() {
            let duplicate = self.interfaces[..index]
                .iter()
                .any(|other| other.name == iface.name);
            if !valid_interface_name(&iface.name) || duplicate {
                return Err(ConfigError::Name {
                    index,
                    name: iface.name.chars().take(64).collect(),
                });
            }
            iface.validate()?;
        }
        Ok(())
    }
}

impl Interface {
    /// The per-interface part of [`NetworkConfig::validate`] (the name is
    /// assumed valid).
    fn validate(&self) -> Result<(), ConfigError> {
        let name = || self.name.clone();
        let mac = self.mac.0;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(ConfigError::Mac {
                name: name(),
                mac: self.mac,
            });
        }
        if self.mtu != 0 && !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(ConfigError::Mtu {
                name: name(),
                mtu: self.mtu,
            });
        }
        for (what, count, max) in [
            ("addresses", self.addresses.len(), MAX_ADDRESSES),
            ("routes", self.routes.len(), MAX_ROUTES),
        ] {
            if count > max {
                return Err(ConfigError::TooMany {
                    name: name(),
                    what,
                    count,
                });
            }
        }
        let nets = self
            .addresses
            .iter()
            .chain(self.routes.iter().filter_map(|r| r.destination.as_ref()));
        for net in nets {
            if !net.is_valid() {
                return Err(ConfigError::Prefix {
                    name: name(),
                    addr: net.addr,
                    prefix_len: net.prefix_len,
                });
            }
        }
        for r in &self.routes {
            let families_differ = matches!(
                (r.destination, r.gateway),
                (Some(d), Some(g)) if d.addr.is_ipv4() != g.is_ipv4()
            );
            if families_differ || (r.destination.is_none() && r.gateway.is_none()) {
                return Err(ConfigError::Route {
                    name: name(),
                    route: format!("{r:?}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn iface() -> Interface {
        Interface {
            name: "eth0".into(),
            mac: MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2]),
            mtu: 1500,
            addresses: vec![
                IpNet {
                    addr: Ipv4Addr::new(172, 17, 0, 2).into(),
                    prefix_len: 16,
                },
                IpNet {
                    addr: "fd00::2".parse().unwrap(),
                    prefix_len: 64,
                },
            ],
            routes: vec![Route {
                destination: None,
                gateway: Some(Ipv4Addr::new(172, 17, 0, 1).into()),
                metric: None,
            }],
        }
    }

    #[test]
    fn wire_format() {
        let c = NetworkConfig {
            interfaces: vec![Interface {
                addresses: vec![iface().addresses[0]],
                ..iface()
            }],
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"interfaces":[{"name":"eth0","mac":"02:42:ac:11:00:02","mtu":1500,"addresses":["172.17.0.2/16"],"routes":[{"destination":null,"gateway":"172.17.0.1","metric":null}]}]}"#
        );
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), c);
        // Optional fields default.
        let min: NetworkConfig =
            serde_json::from_str(r#"{"interfaces":[{"name":"e","mac":"02:00:00:00:00:01"}]}"#)
                .unwrap();
        assert_eq!(min.interfaces[0].mtu, 0);
        assert!(min.interfaces[0].routes.is_empty());
        assert_eq!(
            serde_json::from_str::<NetworkConfig>("{}").unwrap(),
            NetworkConfig::default()
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "02:AB:cd:00:ff:10".parse::<MacAddr>().unwrap(),
            MacAddr([2, 0xab, 0xcd, 0, 0xff, 0x10])
        );
        for bad in [
            "",
            "02:ab",
            "02:ab:cd:00:ff:10:11",
            "2:ab:cd:00:ff:10",
            "02-ab-cd-00-ff-10",
            "0x:ab:cd:00:ff:10",
            "+2:ab:cd:00:ff:10",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MacAddr>(r#""zz""#).is_err());
        assert!(serde_json::from_str::<MacAddr>("[1,2,3,4,5,6]").is_err());
    }

    #[test]
    fn ip_net_parsing() {
        let n: IpNet = "fd00::1/64".parse().unwrap();
        assert_eq!(n.to_string(), "fd00::1/64");
        assert_eq!(n.prefix_len, 64);
        // Too long for the family, but parsed: validate() refuses it.
        assert!(!"10.0.0.1/33".parse::<IpNet>().unwrap().is_valid());
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0.1/+1",
            "10.0.0.1/256",
            "x/1",
            "10.0.0.1/1/2",
            "10.0.0.1/0001",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<IpNet>(r#"{"addr":"10.0.0.1","prefix_len":8}"#).is_err());
    }

    #[test]
    fn contains() {
        let net = IpNet {
            addr: Ipv4Addr::new(10, 88, 0, 2).into(),
            prefix_len: 16,
        };
        assert!(net.contains(&Ipv4Addr::new(10, 88, 255, 1).into()));
        assert!(!net.contains(&Ipv4Addr::new(10, 89, 0, 1).into()));
        assert!(!net.contains(&Ipv6Addr::LOCALHOST.into()));
        let odd = IpNet {
            addr: Ipv4Addr::new(10, 0, 0, 130).into(),
            prefix_len: 25,
        };
        assert!(odd.contains(&Ipv4Addr::new(10, 0, 0, 255).into()));
        assert!(!odd.contains(&Ipv4Addr::new(10, 0, 0, 127).into()));
        let v6 = IpNet {
            addr: "fd00:1::5".parse().unwrap(),
            prefix_len: 64,
        };
        assert!(v6.contains(&"fd00:1::1".parse().unwrap()));
        assert!(!v6.contains(&"fd00:2::1".parse().unwrap()));
        let all = IpNet {
            addr: Ipv4Addr::UNSPECIFIED.into(),
            prefix_len: 0,
        };
        assert!(all.contains(&Ipv4Addr::new(1, 2, 3, 4).into()));
    }

    #[test]
    fn validation() {
        let ok = NetworkConfig {
            interfaces: vec![iface()],
        };
        ok.validate().unwrap();
        NetworkConfig::default().validate().unwrap();

        let with = |f: &dyn Fn(&mut Interface)| {
            let mut i = iface();
            f(&mut i);
            NetworkConfig {
                interfaces: vec![i],
            }
            .validate()
            .unwrap_err()
        };
        for name in [
            "",
            "a/b",
            "a:b",
            "a b",
            ".",
            "..",
            "abcdefghijklmnop",
            "a\0",
        ] {
            let e = with(&|i| i.name = name.into());
            assert!(matches!(e, ConfigError::Name { .. }), "{name:?}: {e}");
        }
        assert!(matches!(
            with(&|i| i.mac = MacAddr([1, 0, 0, 0, 0, 1])),
            ConfigError::Mac { .. }
        ));
        assert!(matches!(
            with(&|i| i.mac = MacAddr::default()),
            ConfigError::Mac { .. }
        ));
        assert!(matches!(with(&|i| i.mtu = 67), ConfigError::Mtu { .. }));
        assert!(matches!(with(&|i| i.mtu = 70000), ConfigError::Mtu { .. }));
        assert!(matches!(
            with(&|i| i.addresses[0].prefix_len = 33),
            ConfigError::Prefix { .. }
        ));
        assert!(matches!(
            with(&|i| i.addresses[1].prefix_len = 129),
            ConfigError::Prefix { .. }
        ));
        assert!(matches!(
            with(&|i| i.routes[0].destination = Some(i.addresses[1])),
            ConfigError::Route { .. }
        ));
        assert!(matches!(
            with(&|i| i.routes[0].gateway = None),
            ConfigError::Route { .. }
        ));
        assert!(matches!(
            with(&|i| i.routes[0].destination = Some(IpNet {
                addr: Ipv4Addr::UNSPECIFIED.into(),
                prefix_len: 40
            })),
            ConfigError::Prefix { .. }
        ));
        assert!(matches!(
            with(&|i| i.addresses = vec![i.addresses[0]; MAX_ADDRESSES + 1]),
            ConfigError::TooMany { .. }
        ));
        let many = NetworkConfig {
            interfaces: vec![iface(); MAX_INTERFACES + 1],
        };
        assert_eq!(
            many.validate(),
            Err(ConfigError::TooManyInterfaces(MAX_INTERFACES + 1))
        );
        let dup = NetworkConfig {
            interfaces: vec![iface(), iface()],
        };
        assert!(matches!(
            dup.validate(),
            Err(ConfigError::Name { index: 1, .. })
        ));
    }
}

//! vessel-net against the kernel of the machine running the tests, each
//! test inside network namespaces it creates (the host's own interfaces
//! are never touched). They need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and
//! `ip`/`tc`/`ping`; without root they are skipped with a message.
//!
//! A network namespace belongs to a thread: each test runs its body on a
//! fresh thread that first calls `unshare(CLONE_NEWNET)`; commands it
//! starts inherit that namespace. A second namespace (the "outside" of a
//! veth pair) is a `sleep` process started with `unshare -n`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vessel_net::{Interface, IpNet, LinkKind, MacAddr, NetworkConfig, Route};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `body` on a new thread in a new network namespace; skipped (with a
/// message) when not root.
fn in_netns(body: impl FnOnce() + Send + 'static) {
    if !is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        body();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// Runs a command in the calling thread's namespace; panics on failure.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac_of(name: &str) -> MacAddr {
    let out = sh(&format!("ip -o link show dev {name}"));
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap();
    mac.parse().unwrap()
}

/// `ioctl(TUNSETIFF)`: a tap device `name` that lives while the file is
/// open.
fn open_tap(name: &str) -> File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // struct ifreq: the name, then the flags in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which
    // `ifr` is, for the duration of the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tun
}

/// A second network namespace: a `sleep` in its own one.
struct OtherNetns(Child);

impl OtherNetns {
    fn new() -> OtherNetns {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the child has its own namespace.
        let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/net", child.id()));
            if matches!(&theirs, Ok(t) if *t != mine) {
                break;
            }
            assert!(Instant::now() < deadline, "unshare -n did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        OtherNetns(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Runs `cmd` in that namespace.
    fn sh(&self, cmd: &str) -> String {
        sh(&format!(
            "nsenter --net=/proc/{}/ns/net sh -c '{cmd}'",
            self.pid()
        ))
    }
}

impl Drop for OtherNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn interfaces_reads_kinds_addresses_and_static_routes() {
    in_netns(|| {
        sh("ip link set lo up
            ip link add veth0 type veth peer name veth1
            ip link set veth0 mtu 1450
            ip addr add 10.1.0.2/24 dev veth0
            ip addr add fd01::2/64 dev veth0 nodad
            ip link set veth0 up
            ip link set veth1 up
            ip route add default via 10.1.0.1
            ip route add 10.9.0.0/16 via 10.1.0.3 metric 7
            ip route add 192.168.77.0/24 dev veth0
            ip -6 route add default via fd01::1
            ip link add br0 type bridge
            ip link add mv0 link veth1 type macvlan mode bridge");
        let _tap = open_tap("tap0");
        let all = vessel_net::interfaces().unwrap();
        let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["veth1", "veth0", "br0", "mv0", "tap0"], "{all:#?}");
        let kind = |n: &str| all.iter().find(|i| i.name == n).unwrap().kind.clone();
        assert_eq!(kind("veth1"), LinkKind::Veth);
        assert_eq!(kind("br0"), LinkKind::Bridge);
        assert_eq!(kind("mv0"), LinkKind::Macvlan);
        assert_eq!(kind("tap0"), LinkKind::Tun);

        let v = all.iter().find(|i| i.name == "veth0").unwrap();
        assert_eq!(Some(v.index), vessel_net::link_by_name("veth0").unwrap());
        assert_eq!(v.mac, Some(mac_of("veth0")));
        assert_eq!(v.mtu, 1450);
        assert!(v.admin_up && v.oper_up, "{v:?}");
        // No link-local address.
        assert_eq!(v.addresses, [net("10.1.0.2/24"), net("fd01::2/64")]);
        // No kernel routes (10.1.0.0/24, fd01::/64, fe80::/64).
        let mut routes = v.routes.clone();
        routes.sort_by_key(|r| format!("{r:?}"));
        let want = [
            Route {
                destination: None,
                gateway: Some(ip("10.1.0.1")),
                metric: None,
            },
            Route {
                destination: None,
                gateway: Some(ip("fd01::1")),
                metric: Some(1024),
            },
            Route {
                destination: Some(net("10.9.0.0/16")),
                gateway: Some(ip("10.1.0.3")),
                metric: Some(7),
            },
            Route {
                destination: Some(net("192.168.77.0/24")),
                gateway: None,
                metric: None,
            },
        ];
        let mut want = want.to_vec();
        want.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(routes, want);
        let config = v.to_config().unwrap();
        assert_eq!(config.name, "veth0");
        assert_eq!(config.mtu, 1450);
        NetworkConfig {
            interfaces: vec![config],
        }
        .validate()
        .unwrap();
        let veth1 = all.iter().find(|i| i.name == "veth1").unwrap();
        assert!(veth1.addresses.is_empty() && veth1.routes.is_empty());
    });
}

#[test]
fn link_helpers() {
    in_netns(|| {
        assert_eq!(vessel_net::link_by_name("nope0").unwrap(), None);
        assert!(matches!(
            vessel_net::link_by_name("bad/name"),
            Err(vessel_net::Error::InvalidName(_))
        ));
        sh("ip link add va type veth peer name vb");
        let va = vessel_net::link_by_name("va").unwrap().unwrap();
        vessel_net::set_up(va).unwrap();
        assert!(sh("ip -o link show dev va").contains(",UP"));
        vessel_net::delete_link(va).unwrap();
        assert_eq!(vessel_net::link_by_name("vb").unwrap(), None);
        let e = vessel_net::set_up(va).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
        assert!(e.to_string().contains(&format!("set link {va} up")), "{e}");
    });
}

/// The guest's side of a ping through the tap: answers ARP requests for
/// `me` and ICMP echo requests to it, with `mac`, until `until`.
fn answer_pings(tap: &mut File, me: [u8; 4], mac: [u8; 6], until: Instant) -> usize {
    let mut answered = 0;
    let mut buf = [0u8; 2048];
    // SAFETY: F_SETFL on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(tap.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    while Instant::now() < until {
        let n = match tap.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("tap read: {e}"),
        };
        let f = &buf[..n];
        if n < 42 {
            continue;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let mut out = f.to_vec();
        out[0..6].copy_from_slice(&f[6..12]);
        out[6..12].copy_from_slice(&mac);
        if ethertype == 0x0806 && f[21] == 1 && f[38..42] == me {
            // ARP request for us: reply.
            out[21] = 2;
            out[22..28].copy_from_slice(&mac);
            out[28..32].copy_from_slice(&me);
            out[32..42].copy_from_slice(&f[22..32]);
        } else if ethertype == 0x0800 && f[23] == 1 && f[30..34] == me && f[34] == 8 {
            // ICMP echo request to us: reply (swap addresses, type 0).
            out[26..30].copy_from_slice(&f[30..34]);
            out[30..34].copy_from_slice(&f[26..30]);
            let ihl = usize::from(f[14] & 0xf) * 4;
            let icmp = 14 + ihl;
            out[icmp] = 0;
            out[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
            let sum = checksum(&out[icmp..n]);
            out[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
            answered += 1;
        } else {
            continue;
        }
        tap.write_all(&out).unwrap();
    }
    answered
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn redirect_moves_frames_between_veth_and_tap() {
    in_netns(|| {
        // Inside: veth "eth0" (the engine's end) and the VMM's tap; outside:
        // the peer with the "bridge" address.
        let outside = OtherNetns::new();
        sh(&format!(
            "ip link add eth0 type veth peer name peer0
             ip link set peer0 netns {}
             ip link set eth0 up",
            outside.pid()
        ));
        outside.sh("ip addr add 10.5.0.1/24 dev peer0 && ip link set peer0 up");
        let mut tap = open_tap("vessel-tap0");
        let eth0 = vessel_net::link_by_name("eth0").unwrap().unwrap();
        let tap0 = vessel_net::link_by_name("vessel-tap0").unwrap().unwrap();
        vessel_net::set_up(tap0).unwrap();
        vessel_net::redirect(eth0, tap0).unwrap();
        vessel_net::redirect(tap0, eth0).unwrap();
        // Again: replaced, not doubled.
        vessel_net::redirect(eth0, tap0).unwrap();
        let filters = sh("tc filter show dev eth0 ingress");
        assert_eq!(filters.matches("mirred").count(), 1, "{filters}");
        assert!(
            filters.contains("Redirect to device vessel-tap0"),
            "{filters}"
        );
        let filters = sh("tc filter show dev vessel-tap0 ingress");
        assert!(filters.contains("Redirect to device eth0"), "{filters}");
        eprintln!("classifier: {:?}", vessel_net::classifier_in_use());

        // The "guest" (this thread, through the tap fd) answers as
        // 10.5.0.2 with eth0's MAC, as the guest device would.
        let mac = mac_of("eth0").0;
        let pid = outside.pid();
        let ping = std::thread::spawn(move || {
            Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args(["busybox", "ping", "-c", "2", "-W", "3", "10.5.0.2"])
                .output()
                .unwrap()
        });
        let answered = answer_pings(
            &mut tap,
            [10, 5, 0, 2],
            mac,
            Instant::now() + Duration::from_secs(3),
        );
        let out = ping.join().unwrap();
        assert!(
            out.status.success(),
            "ping through the redirects failed ({answered} answered): {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(answered >= 2);

        vessel_net::remove_redirect(eth0).unwrap();
        vessel_net::remove_redirect(tap0).unwrap();
        assert_eq!(sh("tc filter show dev eth0 ingress"), "");
        assert!(!sh("tc qdisc show dev eth0").contains("ingress"));
        // Nothing left to remove: still fine.
        vessel_net::remove_redirect(eth0).unwrap();
        let e = vessel_net::redirect(eth0, 9999).unwrap_err();
        assert!(e.to_string().contains("redirect filter"), "{e}");
        vessel_net::remove_redirect(eth0).unwrap();
    });
}

fn guest_config() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: MacAddr([0x02, 0x42, 0x0a, 0x03, 0, 2]),
            mtu: 1400,
            addresses: vec![net("10.3.0.2/24"), net("fd03::2/64")],
            routes: vec![
                Route {
                    destination: None,
                    gateway: Some(ip("10.3.0.1")),
                    metric: None,
                },
                Route {
                    destination: Some(net("10.30.0.0/16")),
                    gateway: Some(ip("10.3.0.9")),
                    metric: Some(5),
                },
                Route {
                    destination: Some(net("192.168.50.0/24")),
                    gateway: None,
                    metric: None,
                },
                Route {
                    destination: None,
                    gateway: Some(ip("fd03::1")),
                    metric: None,
                },
            ],
        }],
    }
}

#[test]
fn configure_sets_name_mac_mtu_addresses_and_routes() {
    in_netns(|| {
        vessel_net::loopback_up().unwrap();
        assert!(sh("ip -o addr show dev lo").contains("127.0.0.1/8"));
        sh("busybox ping -c 1 -W 2 127.0.0.1");
        // Two devices, as a guest with two virtio-net devices has (the
        // second stays untouched by a one-interface configuration), both
        // up: the first is taken down to be renamed.
        sh("ip link add dev0 type veth peer name dev1 && ip link set dev0 up && ip link set dev1 up");
        let config = guest_config();
        vessel_net::configure(&config).unwrap();
        let link = sh("ip -o link show dev eth0");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(link.contains("link/ether 02:42:0a:03:00:02"), "{link}");
        let addrs = sh("ip -o addr show dev eth0");
        assert!(addrs.contains("inet 10.3.0.2/24"), "{addrs}");
        assert!(addrs.contains("inet6 fd03::2/64"), "{addrs}");
        // Usable at once: no duplicate address detection (the kernel's own
        // link-local address still goes through it).
        let ours = |addrs: &str| -> Vec<String> {
            addrs
                .lines()
                .filter(|l| !l.contains("scope link"))
                .map(str::to_string)
                .collect()
        };
        assert!(
            ours(&addrs).iter().all(|l| !l.contains("tentative")),
            "{addrs}"
        );
        let routes = sh("ip route show");
        assert!(routes.contains("default via 10.3.0.1 dev eth0"), "{routes}");
        assert!(
            routes.contains("10.30.0.0/16 via 10.3.0.9 dev eth0 metric 5"),
            "{routes}"
        );
        assert!(
            routes.contains("192.168.50.0/24 dev eth0 scope link"),
            "{routes}"
        );
        let routes6 = sh("ip -6 route show");
        assert!(
            routes6.contains("default via fd03::1 dev eth0"),
            "{routes6}"
        );
        // What interfaces() reads back is what was configured.
        let back = vessel_net::interfaces().unwrap();
        let eth0 = back.iter().find(|i| i.name == "eth0").unwrap();
        assert_eq!(eth0.addresses, config.interfaces[0].addresses);
        assert_eq!(eth0.routes.len(), 4, "{:?}", eth0.routes);
        // Applying it again changes nothing and succeeds.
        vessel_net::configure(&config).unwrap();
        assert_eq!(ours(&sh("ip -o addr show dev eth0")), ours(&addrs));
        // Nothing configured: nothing touched.
        vessel_net::configure(&NetworkConfig::default()).unwrap();
    });
}

#[test]
fn configure_errors() {
    in_netns(|| {
        sh("ip link add dev0 type veth peer name dev1");
        let mut config = guest_config();
        let mut second = config.interfaces[0].clone();
        second.name = "eth1".into();
        second.mac = MacAddr([2, 0, 0, 0, 0, 9]);
        second.addresses = vec![net("10.4.0.2/24")];
        second.routes.clear();
        let mut third = second.clone();
        third.name = "eth2".into();
        config.interfaces.push(second);
        config.interfaces.push(third);
        let e = vessel_net::configure(&config).unwrap_err();
        assert!(
            matches!(
                e,
                vessel_net::Error::MissingLinks {
                    wanted: 3,
                    found: 2
                }
            ),
            "{e}"
        );
        // Nothing was changed.
        assert!(sh("ip -o link").contains("dev0"));
        config.interfaces[0].addresses[0].prefix_len = 40;
        let e = vessel_net::configure(&config).unwrap_err();
        assert!(matches!(e, vessel_net::Error::Config(_)), "{e}");
        // A gateway nothing reaches: the kernel's refusal names the route.
        let mut config = guest_config();
        config.interfaces[0].routes = vec![Route {
            destination: None,
            gateway: Some(ip("172.31.0.1")),
            metric: None,
        }];
        let e = vessel_net::configure(&config).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e}");
        assert!(
            e.to_string()
                .contains("add route to default via 172.31.0.1 on eth0"),
            "{e}"
        );
        // The rest was applied.
        assert!(sh("ip -o addr show dev eth0").contains("10.3.0.2/24"));
    });
}

#[test]
fn configure_swaps_names() {
    in_netns(|| {
        sh("ip link add eth0 type veth peer name eth1 && ip link set eth0 up");
        let first = vessel_net::link_by_name("eth0").unwrap().unwrap();
        let second = vessel_net::link_by_name("eth1").unwrap().unwrap();
        let (low, high) = (first.min(second), first.max(second));
        let iface = |name: &str, last: u8| Interface {
            name: name.into(),
            mac: MacAddr([2, 0, 0, 0, 0, last]),
            mtu: 0,
            addresses: vec![],
            routes: vec![],
        };
        // The lower ifindex gets the name the higher one has now.
        let low_name = if low == first { "eth1" } else { "eth0" };
        let high_name = if low_name == "eth1" { "eth0" } else { "eth1" };
        let config = NetworkConfig {
            interfaces: vec![iface(low_name, 1), iface(high_name, 2)],
        };
        vessel_net::configure(&config).unwrap();
        assert_eq!(vessel_net::link_by_name(low_name).unwrap(), Some(low));
        assert_eq!(vessel_net::link_by_name(high_name).unwrap(), Some(high));
        assert_eq!(mac_of(low_name), MacAddr([2, 0, 0, 0, 0, 1]));
        assert!(sh(&format!("ip -o link show dev {low_name}")).contains(",UP"));
    });
}

#[test]
fn configure_large_config_in_several_datagrams() {
    in_netns(|| {
        sh("ip link add dev0 type veth peer name dev1 && ip link set dev0 up && ip link set dev1 up");
        let iface = |n: u8| Interface {
            name: format!("eth{n}"),
            mac: MacAddr([2, 0, 0, 0, 1, n]),
            mtu: 1500,
            addresses: (0..vessel_proto::network::MAX_ADDRESSES as u8)
                .map(|i| net(&format!("10.{n}.{i}.1/24")))
                .collect(),
            // About 36 KiB of requests in all: two datagrams.
            routes: (0..=255u8)
                .map(|i| Route {
                    destination: Some(net(&format!("172.{}.{i}.0/24", 16 + n))),
                    gateway: Some(ip(&format!("10.{n}.{}.254", i % 64))),
                    metric: Some(u32::from(i)),
                })
                .collect(),
        };
        let config = NetworkConfig {
            interfaces: vec![iface(0), iface(1)],
        };
        vessel_net::configure(&config).unwrap();
        for n in 0..2 {
            let addrs = sh(&format!("ip -4 -o addr show dev eth{n}"));
            assert_eq!(addrs.lines().count(), 64, "{addrs}");
            let routes = sh(&format!("ip -4 route show dev eth{n} proto boot"));
            assert_eq!(routes.lines().count(), 256, "{routes}");
        }
    });
}

//! virtio-net unit tests: the `--net` syntax, feature negotiation, RX
//! buffer merging, malformed chains both ways (queues built in guest
//! memory with virtio-queue's mock), and a real tap in a private network
//! namespace.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{RXQ, TXQ};
use super::features::*;
use super::*;
use crate::devices::virtio::{Interrupt, VirtioDevice};

const MIB: u64 = 1 << 20;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap()
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Chains of (addr, len, writable) descriptors, added to `q` starting at
/// descriptor `first`; returns the next free descriptor index.
fn add_chains(
    q: &MockSplitQueue<'_, GuestMemoryMmap>,
    first: u16,
    chains: &[&[(u64, u32, bool)]],
) -> u16 {
    let mut raw = Vec::new();
    let mut i = first;
    for chain in chains {
        for (j, &(addr, len, writable)) in chain.iter().enumerate() {
            let mut flags = if writable { WRITE } else { 0 };
            if j + 1 < chain.len() {
                flags |= NEXT;
            }
            raw.push(RawDescriptor::from(Descriptor::new(
                addr,
                len,
                flags,
                i + 1,
            )));
            i += 1;
        }
    }
    q.add_desc_chains(&raw, first).unwrap();
    i
}

fn active_net<'a>(
    mem: &'a GuestMemoryMmap,
    features: u64,
    tap: Option<Tap>,
) -> (
    Net,
    MockSplitQueue<'a, GuestMemoryMmap>,
    MockSplitQueue<'a, GuestMemoryMmap>,
    Arc<Interrupt>,
) {
    let rx = MockSplitQueue::create(mem, GuestAddress(MIB), 256);
    let tx = MockSplitQueue::create(mem, GuestAddress(2 * MIB), 256);
    let queues: Vec<Queue> = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    let mut net = Net::new([2, 0, 0, 0, 0, 1], tap).unwrap();
    net.set_acked_features(features);
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    net.activate(mem.clone(), irq.clone(), queues).unwrap();
    (net, rx, tx, irq)
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i * 7 + 3) as u8));
    f
}

#[test]
fn net_arguments() {
    let c = NetConfig::parse("tap=vessel-tap0,mac=02:00:00:00:00:2a").unwrap();
    assert_eq!(c.backend, NetBackend::Tap("vessel-tap0".into()));
    assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 0x2a]));
    assert_eq!(NetConfig::parse("fd=7").unwrap().backend, NetBackend::Fd(7));
    let n = NetConfig::parse("none").unwrap();
    assert_eq!((n.backend, n.mac), (NetBackend::None, None));
    for bad in [
        "",
        "tap=",
        "tap=averyveryverylongname",
        "fd=1",
        "fd=x",
        "none,mac=01:00:00:00:00:01",
        "none,mac=02:00:00:00:00",
        "none,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02",
        "tap=a,foo=1",
        "bridge=br0",
        "none,offload=no",
        "none,offload=off,offload=on",
    ] {
        assert!(NetConfig::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(c.offload, "offloads are on by default");
    assert!(!NetConfig::parse("none,offload=off").unwrap().offload);
    let m = random_mac();
    assert_eq!(m[0] & 3, 2, "locally administered unicast");
    assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
}

#[test]
fn offload_flags_follow_acked_features() {
    assert_eq!(tap_offload_flags(0), 0);
    // TSO without checksum offload is meaningless: nothing.
    assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM
    );
    let all =
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    assert_eq!(
        tap_offload_flags(all),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    // Host-side features do not change what the tap may send us.
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)),
        0
    );
    let offered = offered_features();
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        crate::devices::virtio::VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(offered & bit(b), 0, "feature {b} not offered");
    }
    // The driver cannot ack what was not offered.
    let mut n = Net::new([2, 0, 0, 0, 0, 1], None).unwrap();
    n.set_acked_features(u64::MAX);
    assert_eq!(n.save_state().acked_features, offered);
}

#[test]
fn config_space_mac_and_link_status() {
    let n = Net::new([2, 1, 2, 3, 4, 5], None).unwrap();
    let mut cfg = [0xffu8; 8];
    n.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 1, 2, 3, 4, 5, 0, 0], "no backend: link down");
    let mut tail = [0xffu8; 4];
    n.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    n.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn mergeable_rx_fills_several_buffers_and_sets_num_buffers() {
    let mem = memory();
    let feats = bit(VIRTIO_NET_F_MRG_RXBUF) | bit(crate::devices::virtio::VIRTIO_F_VERSION_1);
    let (mut net, rx, _tx, irq) = active_net(&mem, feats, None);
    // Four 1536-byte buffers, the first split into header + rest.
    add_chains(
        &rx,
        0,
        &[
            &[(4 * MIB, 12, true), (4 * MIB + 12, 1524, true)],
            &[(5 * MIB, 1536, true)],
            &[(6 * MIB, 1536, true)],
            &[(7 * MIB, 1536, true)],
        ],
    );
    let f = frame(4000);
    assert!(net.inject_rx(&f));
    // 4012 bytes: 1536 + 1536 + 940.
    assert_eq!(rx.used().idx().load(), 3);
    let used: Vec<(u32, u32)> = (0..3)
        .map(|i| {
            let e = rx.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert_eq!(used, vec![(0, 1536), (2, 1536), (3, 940)]);
    let nb: u16 = mem
        .read_obj(GuestAddress(4 * MIB + NUM_BUFFERS_OFFSET as u64))
        .unwrap();
    assert_eq!(u16::from_le(nb), 3);
    let mut got = vec![0u8; 1524];
    mem.read_slice(&mut got, GuestAddress(4 * MIB + 12))
        .unwrap();
    assert_eq!(got, f[12..1536]);
    let mut got = vec![0u8; 940];
    mem.read_slice(&mut got, GuestAddress(6 * MIB)).unwrap();
    assert_eq!(got, f[3072..]);
    // The fourth buffer is still the guest's for the next frame.
    assert!(net.inject_rx(&frame(100)));
    let e = rx.used().ring().ref_at(3).unwrap().load();
    assert_eq!((e.id(), e.len()), (4, 112));
    // Not enough buffers: nothing is taken or published.
    assert!(!net.inject_rx(&frame(100)));
    assert_eq!(rx.used().idx().load(), 4);
    // Interrupts were not raised by inject (the event loop path does that).
    let _ = irq;
}

#[test]
fn rx_without_mergeable_buffers_uses_one_chain() {
    let mem = memory();
    let (mut net, rx, _tx, _) =
        active_net(&mem, bit(crate::devices::virtio::VIRTIO_F_VERSION_1), None);
    add_chains(
        &rx,
        0,
        &[&[(4 * MIB, 1526, true)], &[(5 * MIB, 65550, true)]],
    );
    // Too large for the first buffer: dropped, the buffer kept.
    assert!(!net.inject_rx(&frame(3000)));
    assert_eq!(rx.used().idx().load(), 0);
    assert!(net.inject_rx(&frame(1000)));
    let e = rx.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 1012));
    let nb: u16 = mem
        .read_obj(GuestAddress(4 * MIB + NUM_BUFFERS_OFFSET as u64))
        .unwrap();
    assert_eq!(u16::from_le(nb), 1);
    // A 64 KiB segment fits the big buffer in one piece.
    assert!(net.inject_rx(&frame(65536)));
    let e = rx.used().ring().ref_at(1).unwrap().load();
    assert_eq!((e.id(), e.len()), (1, 65548));
}

#[test]
fn malformed_rx_chains_are_returned_and_counted() {
    let mem = memory();
    let feats = bit(VIRTIO_NET_F_MRG_RXBUF);
    let (mut net, rx, _tx, _) = active_net(&mem, feats, None);
    add_chains(
        &rx,
        0,
        &[
            &[(4 * MIB, 1536, false)],       // read-only
            &[(u64::MAX - 100, 1536, true)], // outside memory
            &[(16 * MIB - 100, 1536, true)], // runs past the end
            &[(4 * MIB, 8, true)],           // smaller than the header
            &[(4 * MIB, 0, true)],           // no bytes at all
            &[(5 * MIB, 1536, true)],        // fine
        ],
    );
    for _ in 0..5 {
        assert!(!net.inject_rx(&frame(64)));
    }
    assert!(net.inject_rx(&frame(64)));
    let stats = net.stats();
    assert_eq!(stats.rx_malformed.load(Ordering::Relaxed), 5);
    assert_eq!(rx.used().idx().load(), 6);
    for i in 0..5 {
        assert_eq!(rx.used().ring().ref_at(i).unwrap().load().len(), 0);
    }
    assert_eq!(rx.used().ring().ref_at(5).unwrap().load().len(), 76);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mem = memory();
    let (mut net, _rx, tx, _) = active_net(&mem, 0, None);
    add_chains(
        &tx,
        0,
        &[
            &[(4 * MIB, 12, false), (4 * MIB + 12, 100, true)], // write-only part
            &[(4 * MIB, 12, false)],                            // header only
            &[(4 * MIB, 0, false)],                             // zero length
            &[(4 * MIB, 12, false), (u64::MAX - 10, 100, false)], // outside memory
            &[(4 * MIB, 12, false), (5 * MIB, 65536 + 100, false)], // too large
            &[(4 * MIB, 12, false), (5 * MIB, 1000, false)],    // fine (no backend)
        ],
    );
    net.kick();
    let stats = net.stats();
    assert_eq!(stats.tx_malformed.load(Ordering::Relaxed), 5);
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 1, "no backend");
    assert_eq!(tx.used().idx().load(), 6, "every chain is given back");
}

#[test]
fn hostile_queue_state_does_not_panic() {
    let mem = memory();
    let (mut net, rx, tx, _) = active_net(&mem, bit(VIRTIO_NET_F_MRG_RXBUF), None);
    // The guest claims 1000 chains are available in a 256-entry ring and
    // points descriptors at themselves.
    for q in [&rx, &tx] {
        q.avail().idx().store(1000u16.to_le());
        let d = RawDescriptor::from(Descriptor::new(4 * MIB, 4096, WRITE | NEXT, 0));
        for i in 0..256 {
            q.desc_table().store(i, d).unwrap();
        }
    }
    net.kick();
    let _ = net.inject_rx(&frame(60000));
    let _ = net.inject_rx(&frame(100));
}

#[test]
fn snapshot_state_round_trip_and_link_change() {
    let mem = memory();
    let (net, _rx, _tx, _) = active_net(&mem, bit(VIRTIO_NET_F_MRG_RXBUF), None);
    let st = net.save_state();
    assert!(!st.link_up);
    assert_eq!(st.queues.as_ref().map(Vec::len), Some(2));
    let json = serde_json::to_string(&st).unwrap();
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
    let mut n2 = Net::new([2, 9, 9, 9, 9, 9], None).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    n2.restore_state(&back, mem.clone(), irq.clone()).unwrap();
    assert!(n2.is_activated());
    // Same link state: nothing to announce.
    n2.announce_link_change();
    assert_eq!(irq.status(), 0);
    // Saved with the link up, restored without a backend: announced.
    let mut up = back.clone();
    up.link_up = true;
    let mut n3 = Net::new([2, 9, 9, 9, 9, 9], None).unwrap();
    n3.restore_state(&up, mem.clone(), irq.clone()).unwrap();
    n3.announce_link_change();
    assert_ne!(
        irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // Queues outside guest memory are refused.
    let mut bad = back;
    if let Some(q) = bad.queues.as_mut() {
        q[0].desc_table = u64::MAX - 10;
    }
    let mut n4 = Net::new([2, 9, 9, 9, 9, 9], None).unwrap();
    assert!(n4.restore_state(&bad, mem, irq).is_err());
}

/// Runs `f` on a thread of its own in a new network namespace (namespaces
/// are per thread), or skips when this process may not create one.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    let t = std::thread::spawn(move || {
        // SAFETY: unshare(2) only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: no /dev/net/tun");
            return;
        }
        f();
    });
    t.join().expect("netns thread");
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args:?}");
}

#[test]
fn real_tap_offloads_rx_and_tx() {
    in_private_netns(|| {
        let tap = Tap::open_named("vtest0").expect("open tap");
        assert_eq!(tap.name(), "vtest0");
        // Every flag combination the device can ask for is accepted.
        for acked in [
            0,
            bit(VIRTIO_NET_F_GUEST_CSUM),
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6),
        ] {
            tap.set_offload(tap_offload_flags(acked))
                .expect("TUNSETOFFLOAD");
        }
        assert!(
            tap.set_offload(0x8000_0000).is_err(),
            "unknown offload accepted"
        );
        // A second open of an attached tap fails clearly (EBUSY).
        let e = Tap::open_named("vtest0").unwrap_err();
        assert!(
            matches!(
                e,
                TapError::Ioctl {
                    what: "TUNSETIFF",
                    ..
                }
            ),
            "{e}"
        );
        // A persistent tap made beforehand (as `ip tuntap add` does) is
        // opened with our flags and set up.
        ip(&["tuntap", "add", "vtest1", "mode", "tap"]);
        let t1 = Tap::open_named("vtest1").expect("open a persistent tap");
        t1.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
            .expect("offloads on a persistent tap");
        let out = std::process::Command::new("ip")
            .args(["link", "show", "vtest1"])
            .output()
            .expect("ip link show");
        assert!(String::from_utf8_lossy(&out.stdout).contains(",UP"));
        drop(t1);
        // The link is up; give the host side an address.
        ip(&["addr", "add", "10.0.9.1/24", "dev", "vtest0"]);
        let mem = memory();
        let feats = bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4);
        let (mut net, rx, tx, _) = active_net(&mem, feats, Some(tap));

        // TX: a broadcast UDP datagram to 10.0.9.1:9999 reaches a socket
        // bound in this namespace.
        let sock = std::net::UdpSocket::bind("10.0.9.1:9999").expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let payload = b"hello from the guest";
        let pkt = udp_frame([10, 0, 9, 2], [10, 0, 9, 1], 9999, payload);
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(4 * MIB))
            .unwrap();
        mem.write_slice(&pkt, GuestAddress(4 * MIB + 0x100))
            .unwrap();
        add_chains(
            &tx,
            0,
            &[&[
                (4 * MIB, 12, false),
                (4 * MIB + 0x100, pkt.len() as u32, false),
            ]],
        );
        net.kick();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram from the device");
        assert_eq!(&buf[..n], payload);
        assert_eq!(from.to_string(), "10.0.9.2:4444");
        assert_eq!(net.stats().tx_frames.load(Ordering::Relaxed), 1);

        // RX: the host answers 10.0.9.2, so it ARPs for it on the tap
        // (among whatever else it sends there, e.g. IPv6 neighbour
        // discovery): 32 buffers, one of them gets the ARP request.
        let bufs: Vec<Vec<(u64, u32, bool)>> = (0..32)
            .map(|i| vec![(8 * MIB + i * 0x1000, 1536, true)])
            .collect();
        let refs: Vec<&[(u64, u32, bool)]> = bufs.iter().map(Vec::as_slice).collect();
        add_chains(&rx, 0, &refs);
        let _ = sock.send_to(b"x", "10.0.9.2:4444");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut arp = None;
        while arp.is_none() && std::time::Instant::now() < deadline {
            net.kick();
            for i in 0..rx.used().idx().load().min(32) {
                let e = rx.used().ring().ref_at(usize::from(i)).unwrap().load();
                let mut eth = [0u8; VNET_HDR_LEN + 14];
                mem.read_slice(&mut eth, GuestAddress(8 * MIB + u64::from(e.id()) * 0x1000))
                    .unwrap();
                if eth[VNET_HDR_LEN + 12..] == [0x08, 0x06] {
                    arp = Some(eth);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let eth = arp.expect("no ARP request from the tap");
        assert_eq!(u16::from_le_bytes([eth[10], eth[11]]), 1, "num_buffers");
        assert_eq!(
            &eth[VNET_HDR_LEN..VNET_HDR_LEN + 6],
            &[0xff; 6],
            "broadcast"
        );
    });
}

/// An Ethernet broadcast frame with an IPv4/UDP datagram (UDP checksum 0:
/// none) from port 4444.
fn udp_frame(src: [u8; 4], dst: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([2, 0, 0, 0, 0, 1]);
    f.extend([0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend(src);
    ip.extend(dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend(ip);
    f.extend(4444u16.to_be_bytes());
    f.extend(port.to_be_bytes());
    f.extend(((8 + payload.len()) as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// A tap fd opened by hand (as a parent process would), with `flags`.
fn raw_tap(name: &str, flags: i32) -> std::os::fd::RawFd {
    let path = std::ffi::CString::new("/dev/net/tun").unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open /dev/net/tun");
    // SAFETY: a zeroed ifreq is valid; the name fits (checked by the caller's choice).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as i16;
    // SAFETY: TUNSETIFF reads and writes our ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    fd
}

#[test]
fn inherited_tap_fds() {
    in_private_netns(|| {
        let good = raw_tap("vfd0", libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        let tap = Tap::from_fd(good).expect("adopt a vnet tap fd");
        assert_eq!(tap.name(), "vfd0");
        tap.set_offload(libc::TUN_F_CSUM).expect("offloads");
        let bad = raw_tap("vfd1", libc::IFF_TAP | libc::IFF_NO_PI);
        let e = Tap::from_fd(bad).unwrap_err().to_string();
        assert!(e.contains("IFF_VNET_HDR"), "{e}");
        let cfg = NetConfig::parse(&format!("fd={good}")).unwrap();
        assert!(cfg.check_inherited_fd().is_ok());
        let closed = NetConfig::parse("fd=1000000").unwrap();
        assert!(closed.check_inherited_fd().is_err());
        drop(tap);
    });
}

#[test]
fn inherited_fd_must_be_a_vnet_tap() {
    let f = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    let e = Tap::from_fd(fd).unwrap_err().to_string();
    assert!(e.contains("not a tap"), "{e}");
    assert!(Tap::from_fd(1).is_err());
    let _ = (RXQ, TXQ);
}

#[test]
fn offloads_off_offers_and_accepts_none() {
    let mut n = Net::new([2, 0, 0, 0, 0, 7], None)
        .unwrap()
        .without_offloads();
    let avail = n.avail_features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_eq!(avail & (1 << bit), 0, "bit {bit} offered");
    }
    assert_ne!(avail & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    // A driver acking more than offered gets only what was offered.
    n.set_acked_features(offered_features());
    assert_eq!(tap_offload_flags(n.save_state().acked_features), 0);
}

#[test]
fn a_full_tx_queue_yields_to_the_event_loop() {
    let mem = memory();
    let (mut net, _rx, tx, _) = active_net(&mem, 0, None);
    let chains: Vec<Vec<(u64, u32, bool)>> =
        (0..256).map(|_| vec![(4 * MIB, 112, false)]).collect();
    let refs: Vec<&[(u64, u32, bool)]> = chains.iter().map(Vec::as_slice).collect();
    add_chains(&tx, 0, &refs);
    net.kick();
    assert_eq!(tx.used().idx().load(), 256);
    // The budget ran out on the last chain: the TX queue event is set
    // again, so the event loop comes back for anything posted meanwhile.
    assert_eq!(net.queue_events()[TXQ].read().unwrap(), 1);
}

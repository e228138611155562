//! The agent's side of networking, against one booted VM: `lo` is up in
//! the VM's network namespace, which containers share by default (ping
//! and a TCP connection to 127.0.0.1 from a container); `ConfigureNetwork`
//! with an empty configuration succeeds, one with more interfaces than the
//! guest has devices and an invalid one get clear `InvalidRequest` errors.
//!
//! When the VMM has virtio-net (`--net tap=NAME`) and the test runs as
//! root, the VM also gets one device on a tap in a network namespace the
//! test creates: `ConfigureNetwork` then sets its name, MTU,
//! addresses and routes, a container's `ip addr` and `ip route` show them,
//! and the test pings the guest through the tap.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vessel_proto::client::AgentClient;
use vessel_proto::container::{StdioSpec, StdioStream};
use vessel_proto::network::{Interface, IpNet, MacAddr, NetworkConfig, Route};
use vessel_proto::ErrorCode;
use vessel_tests::cli::busybox_rootfs;
use vessel_tests::guest::{self, attach, drain, remote_code};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

const ROOTFS: &str = "/run/rootfs";
const APPLETS: [&str; 9] = [
    "sh", "ip", "ping", "nc", "cat", "echo", "sleep", "grep", "true",
];
/// The tap the VMM creates in the test's network namespace.
const TAP: &str = "vessel-tap0";
/// The guest address on the tap's network, and the tap's own.
const GUEST_IP: &str = "10.7.0.2";
const HOST_IP: &str = "10.7.0.1";

/// A container spec running `args` as root with Docker's default
/// capabilities (NET_RAW for ping), sharing the VM's network namespace.
fn spec(args: &[&str]) -> Value {
    let caps = json!(["CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_KILL"]);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}]
        }
    })
}

/// Runs a container to completion; returns its exit status and stdout.
fn run(c: &mut AgentClient, vm: &VmProcess, id: &str, script: &str) -> (i32, String) {
    let out = drain(attach(vm, id, None, StdioStream::Stdout));
    let stdio = StdioSpec {
        stdout: true,
        ..StdioSpec::default()
    };
    let req = guest::create_req(id, ROOTFS, spec(&["sh", "-c", script]), stdio);
    c.create_container(req)
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let exit = c
        .wait_process(id, None)
        .unwrap_or_else(|e| panic!("wait {id}: {e}"));
    c.delete_container(id, false)
        .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    (exit.status, out.join().unwrap())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Whether this `vessel-vmm` has virtio-net (`--net`).
fn vmm_has_net(art: &Artifacts) -> bool {
    Command::new(&art.vmm)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--net"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

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

#[test]
fn loopback_and_configure_network() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let with_device = vmm_has_net(&art) && is_root();
    if !with_device {
        eprintln!("no virtio-net device: the VMM has no --net, or not root");
    }
    // The VMM (and its tap) live in a network namespace of this thread's
    // own, so the host's interfaces are never touched.
    std::thread::spawn(move || {
        if with_device {
            // SAFETY: unshare only changes this thread's namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        }
        body(&art, with_device);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn body(art: &Artifacts, with_device: bool) {
    let root = TempDir::new("net-agent");
    busybox_rootfs(&root.0, &APPLETS);
    let mut opts = VmOptions {
        shares: vec![format!("rootfs={}", root.0.display())],
        ..VmOptions::default()
    };
    if with_device {
        // The MAC the configuration has, as the host starts it (the netns
        // tests cover changing it).
        opts.vmm_args = vec!["--net".into(), format!("tap={TAP},mac=02:42:0a:07:00:02")];
    }
    let mut vm = VmProcess::spawn(art, &opts).expect("spawn vessel-vmm");
    let mut c = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    c.set_timeout(Some(Duration::from_secs(600))).unwrap();
    c.mount("rootfs", ROOTFS, true)
        .expect("mount the rootfs share");

    // lo is up before anything asked for it: ping and TCP over 127.0.0.1
    // from a container sharing the VM's network namespace.
    let (status, out) = run(
        &mut c,
        &vm,
        "lo",
        "exec 2>&1
         ip addr show dev lo
         ping -c 1 -W 5 127.0.0.1 >/dev/null && echo PING-OK
         nc -l -p 7777 >/tmp/got &
         sleep 1
         echo over-tcp | nc 127.0.0.1 7777
         sleep 1
         cat /tmp/got",
    );
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("inet 127.0.0.1/8"), "{out}");
    assert!(out.contains("inet6 ::1/128"), "{out}");
    assert!(out.contains("PING-OK"), "{out}");
    assert!(out.contains("over-tcp"), "{out}");

    // An empty configuration changes nothing.
    c.configure_network(&NetworkConfig::default())
        .expect("empty ConfigureNetwork");

    let devices = usize::from(with_device);
    let iface = Interface {
        name: "eth0".into(),
        mac: MacAddr([0x02, 0x42, 0x0a, 0x07, 0x00, 0x02]),
        mtu: 1400,
        addresses: vec![net(&format!("{GUEST_IP}/24")), net("fd07::2/64")],
        routes: vec![
            Route {
                destination: None,
                gateway: Some(HOST_IP.parse().unwrap()),
                metric: None,
            },
            Route {
                destination: Some(net("10.70.0.0/16")),
                gateway: Some("10.7.0.9".parse().unwrap()),
                metric: Some(20),
            },
        ],
    };
    // More interfaces than devices.
    let too_many = NetworkConfig {
        interfaces: (0..=devices)
            .map(|i| Interface {
                name: format!("eth{i}"),
                ..iface.clone()
            })
            .collect(),
    };
    let (code, msg) = remote_code(c.configure_network(&too_many));
    assert_eq!(code, ErrorCode::InvalidRequest, "{msg}");
    assert!(
        msg.contains(&format!(
            "has {} interfaces but the guest has {devices} network devices",
            devices + 1
        )),
        "{msg}"
    );
    // Invalid: refused before anything is touched.
    let bad = NetworkConfig {
        interfaces: vec![Interface {
            name: "eth/0".into(),
            ..iface.clone()
        }],
    };
    let (code, msg) = remote_code(c.configure_network(&bad));
    assert_eq!(code, ErrorCode::InvalidRequest, "{msg}");
    assert!(msg.contains("invalid name"), "{msg}");
    // The guest's network is still only lo.
    let (status, out) = run(&mut c, &vm, "links", "ip -o link");
    assert_eq!(status, 0, "{out}");
    assert_eq!(out.lines().count(), 1 + devices, "{out}");

    if with_device {
        configure_device(&mut c, &vm, &iface);
    }
    drop(c);
    drop(vm);
}

/// Configures the VM's one device and checks it from a container and
/// through the tap.
fn configure_device(c: &mut AgentClient, vm: &VmProcess, iface: &Interface) {
    let config = NetworkConfig {
        interfaces: vec![iface.clone()],
    };
    let t = std::time::Instant::now();
    c.configure_network(&config).expect("ConfigureNetwork");
    eprintln!(
        "ConfigureNetwork (MTU, up, 2 addresses, 2 routes): {:?}",
        t.elapsed()
    );
    // Twice: the same result.
    let t = std::time::Instant::now();
    c.configure_network(&config)
        .expect("ConfigureNetwork again");
    eprintln!("ConfigureNetwork again: {:?}", t.elapsed());
    let (status, out) = run(
        c,
        vm,
        "addr",
        "ip addr show dev eth0; ip route; ip -6 route",
    );
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("link/ether 02:42:0a:07:00:02"), "{out}");
    assert!(out.contains("mtu 1400"), "{out}");
    assert!(out.contains(&format!("inet {GUEST_IP}/24")), "{out}");
    assert!(out.contains("inet6 fd07::2/64"), "{out}");
    assert!(
        out.contains(&format!("default via {HOST_IP} dev eth0")),
        "{out}"
    );
    assert!(out.contains("10.70.0.0/16 via 10.7.0.9 dev eth0"), "{out}");
    // The host end of the tap answers and reaches the guest.
    sh(&format!(
        "ip addr add {HOST_IP}/24 dev {TAP} && ip link set {TAP} up && ip link set lo up"
    ));
    let ping = Command::new("busybox")
        .args(["ping", "-c", "3", "-W", "10", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping {GUEST_IP} through {TAP}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    eprintln!(
        "{}",
        String::from_utf8_lossy(&ping.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
}

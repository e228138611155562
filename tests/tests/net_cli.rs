//! The container's network through the `vessel` CLI, without an engine:
//! the test builds what an engine would (a network namespace holding one
//! end of a veth pair with an IPv4 and an IPv6 address and a default
//! route; the other end in a "peer" namespace, standing for the bridge's
//! host side, with an HTTP server) and hands the namespace to vessel by
//! path, as podman and CNI do.
//!
//! Checks: the guest's interface has the veth's name, MAC, MTU and
//! addresses and the default route (and, in a second namespace, a
//! macvlan and a veth: two interfaces, more than the template has, so a
//! cold-booted VM); the container fetches a page from the
//! peer over IPv4 and IPv6, and serves one the peer fetches; a detached
//! container's tap and tc redirect are gone after `delete` (the namespace,
//! which is the "engine's", stays with its veth); a spec without a network
//! namespace runs with loopback only; a link that is down is left alone;
//! a namespace path that is not a
//! network namespace and an interface vessel cannot wire (a bridge) fail
//! with a clear error and leave nothing.
//!
//! Fetches are bounded with busybox `timeout` (see `vessel_tests::net`).
//!
//! Traffic stays between namespaces the test creates. Needs /dev/kvm,
//! iproute2 (`ip`, `tc`), nsenter and Debian's `busybox-static`.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_tests::cli::{busybox_rootfs, runc_spec, text, CliEnv};
use vessel_tests::engines::Netns;
use vessel_tests::kvm_available_or_skip;
use vessel_tests::net::{fetch, HttpServer};

const APPLETS: [&str; 9] = [
    "sh", "ip", "wget", "httpd", "cat", "echo", "sleep", "ping", "timeout",
];
const PAGE: &str = "hello from the peer\n";
const SERVED: &str = "served from the guest\n";

/// `ip ARGS...`, which must succeed.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
}

/// stdout of a command that must succeed.
fn out(c: &mut Command) -> String {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(o.status.success(), "{c:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// The spec of `args` in the container's namespace at `netns` (or, with
/// `None`, without a network namespace: host networking).
fn spec(env: &CliEnv, args: &[&str], netns: Option<&str>) -> Value {
    let mut s = runc_spec(&env.tmp.join("rootfs"), args);
    let list = s["linux"]["namespaces"].as_array_mut().expect("namespaces");
    list.retain(|n| n["type"] != "network");
    if let Some(p) = netns {
        list.push(json!({"type": "network", "path": p}));
    }
    s
}

/// The `ip -o` lines of the interface `dev` in namespace `ns`, reduced to
/// what must agree with the guest: name, MAC, MTU, global addresses.
fn host_view(ns: &str, dev: &str) -> (String, String, Vec<String>) {
    let link = out(Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]));
    let addrs = out(Command::new("ip").args(["-n", ns, "-o", "addr", "show", dev]));
    parse_view(&link, &addrs)
}

/// (MAC, MTU, sorted global addresses) from `ip -o link` and `ip -o addr`
/// output of one interface.
fn parse_view(link: &str, addrs: &str) -> (String, String, Vec<String>) {
    let words: Vec<&str> = link.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    let mut a: Vec<String> = addrs
        .lines()
        .filter(|l| l.contains("scope global"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            w.get(i + 1).map(|s| s.to_string())
        })
        .collect();
    a.sort();
    (after("link/ether"), after("mtu"), a)
}

#[test]
fn veth_in_the_namespace_is_wired_into_the_vm() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("netcli", "");
    let rootfs = env.tmp.join("rootfs");
    busybox_rootfs(&rootfs, &APPLETS);
    fs::create_dir_all(rootfs.join("www")).expect("www");
    fs::write(rootfs.join("www/index.html"), SERVED).expect("index");

    // The "engine's" namespaces: ctr (the container's) and peer.
    let peer = Netns::new("netcli-peer");
    let ctr = Netns::new("netcli-ctr");
    ip(&[
        "-n", &peer.name, "link", "add", "vh", "type", "veth", "peer", "name", "eth0", "netns",
        &ctr.name,
    ]);
    ip(&["-n", &peer.name, "addr", "add", "10.77.0.1/24", "dev", "vh"]);
    ip(&[
        "-n",
        &peer.name,
        "addr",
        "add",
        "fd77::1/64",
        "dev",
        "vh",
        "nodad",
    ]);
    ip(&["-n", &peer.name, "link", "set", "vh", "up"]);
    ip(&["-n", &ctr.name, "link", "set", "eth0", "mtu", "1400"]);
    ip(&[
        "-n",
        &ctr.name,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &ctr.name,
        "addr",
        "add",
        "fd77::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &ctr.name, "link", "set", "eth0", "up"]);
    // Down links (as the fallback tunnels a new namespace may hold) are
    // not wired: with one template network slot, two would not fit.
    ip(&[
        "-n", &ctr.name, "link", "add", "down0", "type", "veth", "peer", "name", "down1",
    ]);
    ip(&[
        "-n",
        &ctr.name,
        "route",
        "add",
        "default",
        "via",
        "10.77.0.1",
    ]);
    let www = env.tmp.join("peer-www");
    let _server = HttpServer::start(&peer, 8080, &www, PAGE);
    let want = host_view(&ctr.name, "eth0");
    let ns_path = ctr.path.to_string_lossy().into_owned();

    // A foreground container: its view of eth0, a page over IPv4 and IPv6.
    let script = "ip -o link show eth0; echo ==; ip -o addr show eth0; echo ==; ip route; \
                  echo ==; timeout 20 wget -q -O - http://10.77.0.1:8080/index.html; echo ==; \
                  timeout 20 wget -q -O - 'http://[fd77::1]:8080/index.html'";
    let b = env.write_bundle("b-view", &spec(&env, &["sh", "-c", script], Some(&ns_path)));
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "net-view"]);
    eprintln!("run with a veth: {:?}", t.elapsed());
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "stdout {stdout}\nstderr {}",
        text(&o.stderr)
    );
    let parts: Vec<&str> = stdout.split("==\n").collect();
    assert_eq!(parts.len(), 5, "{stdout}");
    assert!(parts[0].contains("eth0"), "{stdout}");
    assert_eq!(
        parse_view(parts[0], parts[1]),
        want,
        "guest view vs the namespace's"
    );
    assert!(
        parts[2]
            .lines()
            .any(|l| l.starts_with("default via 10.77.0.1")),
        "{stdout}"
    );
    assert_eq!(parts[3], PAGE, "IPv4 fetch: {stdout}");
    assert_eq!(parts[4], PAGE, "IPv6 fetch: {stdout}");

    // A detached container serving a page; the peer fetches it.
    let b = env.write_bundle(
        "b-serve",
        &spec(
            &env,
            &["httpd", "-f", "-p", "80", "-h", "/www"],
            Some(&ns_path),
        ),
    );
    env.run_detached(&b, "net-serve");
    let fetched = fetch(
        &peer,
        "http://10.77.0.2/index.html",
        Duration::from_secs(60),
    );
    assert_eq!(fetched.as_deref(), Some(SERVED), "fetch from the guest");
    let taps = out(Command::new("ip").args(["-n", &ctr.name, "-o", "link"]));
    assert!(taps.contains("vessel-tap0"), "{taps}");
    env.ok(&["kill", "net-serve", "KILL"]);
    env.ok(&["delete", "--force", "net-serve"]);
    let links = out(Command::new("ip").args(["-n", &ctr.name, "-o", "link"]));
    assert!(!links.contains("vessel-tap"), "tap left: {links}");
    let qdiscs = out(Command::new("tc").args(["-n", &ctr.name, "qdisc", "show", "dev", "eth0"]));
    assert!(!qdiscs.contains("ingress"), "ingress qdisc left: {qdiscs}");
    assert_eq!(host_view(&ctr.name, "eth0"), want, "the veth changed");

    // No network namespace in the spec: loopback only (and the template's
    // unused network device, down).
    let b = env.write_bundle(
        "b-hostnet",
        &spec(
            &env,
            &[
                "sh",
                "-c",
                "ip -o addr; timeout 3 wget -q -O - http://10.77.0.1:8080/ || echo unreachable",
            ],
            None,
        ),
    );
    let (stdout, _) = env.ok(&["run", "--bundle", &b, "net-host"]);
    assert!(stdout.contains("127.0.0.1"), "{stdout}");
    assert!(!stdout.contains("10.77."), "{stdout}");
    assert!(stdout.contains("unreachable"), "{stdout}");

    // A macvlan (as CNI's macvlan plugin makes): its parent is a veth
    // whose other end is a port of a bridge in the peer namespace.
    let mv = Netns::new("netcli-mv");
    ip(&["-n", &peer.name, "link", "add", "br0", "type", "bridge"]);
    ip(&[
        "-n",
        &peer.name,
        "addr",
        "add",
        "10.79.0.1/24",
        "dev",
        "br0",
    ]);
    ip(&["-n", &peer.name, "link", "set", "br0", "up"]);
    ip(&[
        "-n", &peer.name, "link", "add", "vp", "master", "br0", "type", "veth", "peer", "name",
        "vq",
    ]);
    ip(&["-n", &peer.name, "link", "set", "vp", "up"]);
    ip(&["-n", &peer.name, "link", "set", "vq", "up"]);
    ip(&[
        "-n", &peer.name, "link", "add", "mv0", "link", "vq", "type", "macvlan", "mode", "bridge",
    ]);
    ip(&["-n", &peer.name, "link", "set", "mv0", "netns", &mv.name]);
    ip(&["-n", &mv.name, "addr", "add", "10.79.0.2/24", "dev", "mv0"]);
    ip(&["-n", &mv.name, "link", "set", "mv0", "up"]);
    // And a second interface: more than the template's one network
    // device, so this sandbox is cold-booted with two.
    ip(&[
        "-n", &peer.name, "link", "add", "vz", "type", "veth", "peer", "name", "eth1", "netns",
        &mv.name,
    ]);
    ip(&["-n", &peer.name, "addr", "add", "10.80.0.1/24", "dev", "vz"]);
    ip(&["-n", &peer.name, "link", "set", "vz", "up"]);
    ip(&["-n", &mv.name, "addr", "add", "10.80.0.2/24", "dev", "eth1"]);
    ip(&["-n", &mv.name, "link", "set", "eth1", "up"]);
    let want_mv = host_view(&mv.name, "mv0");
    let want_eth1 = host_view(&mv.name, "eth1");
    let script = "ip -o link show mv0; echo ==; ip -o addr show mv0; echo ==; \
                  timeout 20 wget -q -O - http://10.79.0.1:8080/index.html; echo ==; \
                  ip -o link show eth1; echo ==; ip -o addr show eth1; echo ==; \
                  timeout 20 wget -q -O - http://10.80.0.1:8080/index.html";
    let b = env.write_bundle(
        "b-macvlan",
        &spec(
            &env,
            &["sh", "-c", script],
            Some(&mv.path.to_string_lossy()),
        ),
    );
    let o = env.output(&["run", "--bundle", &b, "net-macvlan"]);
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "stdout {stdout}\nstderr {}",
        text(&o.stderr)
    );
    let parts: Vec<&str> = stdout.split("==\n").collect();
    assert_eq!(parts.len(), 6, "{stdout}");
    assert_eq!(
        parse_view(parts[0], parts[1]),
        want_mv,
        "macvlan: guest vs namespace"
    );
    assert_eq!(parts[2], PAGE, "fetch over the macvlan: {stdout}");
    assert_eq!(
        parse_view(parts[3], parts[4]),
        want_eth1,
        "eth1: guest vs namespace"
    );
    assert_eq!(parts[5], PAGE, "fetch over eth1: {stdout}");

    // Bad input: a path that is not a network namespace.
    let not_ns = env.tmp.join("not-a-netns");
    fs::write(&not_ns, "").expect("write");
    let b = env.write_bundle(
        "b-notns",
        &spec(&env, &["true"], Some(&not_ns.to_string_lossy())),
    );
    let err = env.fails(&["run", "--bundle", &b, "net-bad"]);
    assert!(err.contains("is not a network namespace"), "{err}");

    // Bad input: an interface vessel cannot wire.
    let odd = Netns::new("netcli-odd");
    ip(&["-n", &odd.name, "link", "add", "br7", "type", "bridge"]);
    ip(&["-n", &odd.name, "link", "set", "br7", "up"]);
    let b = env.write_bundle(
        "b-odd",
        &spec(&env, &["true"], Some(&odd.path.to_string_lossy())),
    );
    let err = env.fails(&["run", "--bundle", &b, "net-odd"]);
    assert!(err.contains("br7") && err.contains("bridge"), "{err}");
    let links = out(Command::new("ip").args(["-n", &odd.name, "-o", "link"]));
    assert!(!links.contains("vessel-tap"), "tap left: {links}");

    assert!(env.vmms().is_empty(), "VMMs left");
    assert!(
        env.root_entries().is_empty(),
        "state left: {:?}",
        env.root_entries()
    );
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

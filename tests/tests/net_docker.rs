//! docker's default bridge network (docker0, its iptables rules and
//! docker-proxy, all inside the test's network namespace; libnetwork
//! fills the container's namespace from its prestart hook) with runc and
//! with vessel, the same checks for both:
//!
//! - a container fetches a page from an HTTP server the test runs on the
//!   bridge's host address, by a name docker wrote to its `/etc/hosts`
//!   (`--add-host`);
//! - a detached container serves a page; the test fetches it through the
//!   published port (`-p`), and a second container of the same runtime
//!   fetches it from the first one's address;
//! - the container's `eth0` has the address and MAC docker assigned;
//! - after `rm`, no container, VMM, monitor or state entry.
//!
//! Needs Debian's docker.io, containerd, runc, iptables, iproute2,
//! busybox-static, and /dev/kvm.

use std::path::Path;
use std::time::{Duration, Instant};

use vessel_tests::docker::{Dockerd, DOCKER};
use vessel_tests::engines::{
    busybox_image_tar, leaks, poll_until, require_tools, Checks, RuntimePair,
};
use vessel_tests::net::{eth0_has, fetch, HttpServer};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir};

const IMAGE: &str = "vessel-busybox:1";
/// docker0's address (docker's default bridge).
const GATEWAY: &str = "172.17.0.1";
const PAGE: &str = "page of the bridge host";

/// The checks for runtime `rt` (`runcw` or `vessel`); `port` is its
/// published host port.
fn network_checks(d: &Dockerd, rt: &str, port: u16, checks: &mut Checks) {
    let web = format!("web-{rt}");
    let serve = "mkdir -p /tmp/www && echo served-by-$(hostname) > /tmp/www/index.html && \
                 exec httpd -f -p 80 -h /tmp/www";
    let publish = format!("{port}:80");
    let t = d.docker(
        &[
            "run",
            "-d",
            "--runtime",
            rt,
            "--name",
            &web,
            "--hostname",
            &web,
            "-p",
            &publish,
            IMAGE,
            "sh",
            "-c",
            serve,
        ],
        300,
    );
    checks.record(&format!("{rt}: run -d web"), t.ok("run -d").map(|_| ()));
    let ip = d
        .inspect(&web, "{{.NetworkSettings.IPAddress}}")
        .unwrap_or_default();
    let want = format!("served-by-{web}\n");
    let ns = d.ns.as_ref().expect("dockerd's netns");

    checks.run(&format!("{rt}: published port"), || {
        let url = format!("http://{GATEWAY}:{port}/index.html");
        let got = fetch(ns, &url, Duration::from_secs(60));
        match got {
            Some(g) if g == want => Ok(()),
            other => Err(format!("{url}: got {other:?}, want {want:?}")),
        }
    });

    checks.run(&format!("{rt}: address and MAC"), || {
        let assigned = d.inspect(
            &web,
            "{{.NetworkSettings.IPAddress}}/{{.NetworkSettings.IPPrefixLen}} {{.NetworkSettings.MacAddress}}",
        )?;
        let t = d.docker(&["exec", &web, "ip", "-o", "addr", "show", "eth0"], 120);
        let addr = t.ok("exec ip addr")?.stdout.clone();
        let t = d.docker(&["exec", &web, "ip", "-o", "link", "show", "eth0"], 120);
        let link = t.ok("exec ip link")?.stdout.clone();
        eth0_has("docker", &assigned, &addr, &link)
    });

    checks.run(
        &format!("{rt}: host by name, container to container"),
        || {
            let script = format!(
                "timeout 20 wget -q -O - http://bridgehost:8080/index.html; echo; \
             timeout 20 wget -q -O - http://{ip}/index.html"
            );
            let add_host = format!("bridgehost:{GATEWAY}");
            let t = d.docker(
                &[
                    "run",
                    "--rm",
                    "--runtime",
                    rt,
                    "--add-host",
                    &add_host,
                    IMAGE,
                    "sh",
                    "-c",
                    &script,
                ],
                300,
            );
            let out = t.ok("run --rm client")?.stdout.clone();
            let expected = format!("{PAGE}\n{want}");
            if out == expected {
                Ok(())
            } else {
                Err(format!("got {out:?}, want {expected:?}"))
            }
        },
    );

    let t = d.docker(&["rm", "-f", &web], 120);
    checks.record(&format!("{rt}: rm web"), t.ok("rm -f").map(|_| ()));
}

#[test]
fn docker_bridge_network_with_vessel_like_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("dockerd", "docker.io"),
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("busybox", "busybox-static"),
    ]);
    assert!(
        Path::new(DOCKER).exists(),
        "{DOCKER} missing: install Debian's docker.io"
    );
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let tmp = TempDir::new("net-docker");
    let tag = format!("netdocker-{}", std::process::id());
    let pair = RuntimePair::write(&art, &tmp.0, &tag, &[], &[]);
    let tar = busybox_image_tar(&tmp.0);
    let www = tmp.0.join("www");
    let t0 = Instant::now();
    // docker's defaults: the docker0 bridge, iptables rules, docker-proxy.
    let d = Dockerd::start(
        "netdocker",
        tmp,
        &[("runcw", &pair.runc.path), ("vessel", &pair.vessel.path)],
        &tag,
        &[],
    );
    let t = d.docker(
        &[
            "import",
            "-c",
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            &tar.to_string_lossy(),
            IMAGE,
        ],
        120,
    );
    t.ok("docker import").unwrap_or_else(|e| panic!("{e}"));
    let _server = HttpServer::start(d.ns.as_ref().expect("dockerd's netns"), 8080, &www, PAGE);
    let mut checks = Checks::new();
    network_checks(&d, "runcw", 18080, &mut checks);
    network_checks(&d, "vessel", 18081, &mut checks);
    let runtime_root = d.runtime_root();
    checks.run("docker ps -a empty", || {
        let left = d.containers();
        left.is_empty()
            .then_some(())
            .ok_or(format!("left: {left:?}"))
    });
    checks.run("nothing left behind", || {
        let found = poll_until(Duration::from_secs(20), || {
            leaks::find(&tag, &[], &[&runtime_root])
                .is_empty()
                .then_some(())
        });
        found.ok_or_else(|| format!("{:?}", leaks::find(&tag, &[], &[&runtime_root])))
    });
    eprintln!("docker network test: {:?}", t0.elapsed());
    drop(d);
    checks.finish(&[]);
}

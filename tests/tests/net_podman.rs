//! podman's default bridge network (netavark, its firewall rules and port
//! publishing, all inside the test's network namespace) with runc and with
//! vessel, the same checks for both:
//!
//! - a container fetches a page from an HTTP server the test runs on the
//!   bridge's host address, by a name podman wrote to its `/etc/hosts`
//!   (`--add-host`);
//! - a detached container serves a page; the test fetches it through the
//!   published port (`-p`), and a second container of the same runtime
//!   fetches it from the first one's address;
//! - the container's `eth0` has the address and MAC podman assigned;
//! - after `rm`, no VMM, no network namespace of podman's and no tap.
//!
//! Needs podman, conmon, netavark, runc, iproute2, nsenter, busybox-static
//! and /dev/kvm.

use std::time::{Duration, Instant};

use vessel_tests::engines::{leaks, require_tools, Checks};
use vessel_tests::net::{eth0_has, fetch, HttpServer};
use vessel_tests::podman::{Podman, Rt, IMAGE, SHORT, START};
use vessel_tests::{kvm_available_or_skip, Artifacts};

/// podman's default network's gateway (the bridge's host address).
const GATEWAY: &str = "10.88.0.1";
const PAGE: &str = "page of the bridge host";

/// The checks for one runtime; `port` is its published host port.
fn network_checks(p: &Podman, rt: Rt, port: u16, checks: &mut Checks) {
    let rn = rt.name();
    let web = format!("web-{rn}");
    let serve = "mkdir -p /tmp/www && echo served-by-$(hostname) > /tmp/www/index.html && \
                 exec httpd -f -p 80 -h /tmp/www";
    let publish = format!("{port}:80");
    let t = p.with(
        rt,
        &[
            "run",
            "-d",
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
        START,
    );
    checks.record(&format!("{rn}: run -d web"), t.ok("run -d").map(|_| ()));
    let ip = p
        .inspect(&web, "{{.NetworkSettings.IPAddress}}")
        .unwrap_or_default();
    let want = format!("served-by-{web}\n");

    checks.run(&format!("{rn}: published port"), || {
        let url = format!("http://{GATEWAY}:{port}/index.html");
        let got = fetch(&p.netns, &url, Duration::from_secs(60));
        match got {
            Some(g) if g == want => Ok(()),
            other => Err(format!("{url}: got {other:?}, want {want:?}")),
        }
    });

    checks.run(&format!("{rn}: address and MAC"), || {
        let assigned = p.inspect(
            &web,
            "{{.NetworkSettings.IPAddress}}/{{.NetworkSettings.IPPrefixLen}} {{.NetworkSettings.MacAddress}}",
        )?;
        let t = p.podman(&["exec", &web, "ip", "-o", "addr", "show", "eth0"], SHORT);
        let addr = t.ok("exec ip addr")?.stdout.clone();
        let t = p.podman(&["exec", &web, "ip", "-o", "link", "show", "eth0"], SHORT);
        let link = t.ok("exec ip link")?.stdout.clone();
        eth0_has("podman", &assigned, &addr, &link)
    });

    checks.run(
        &format!("{rn}: host by name, container to container"),
        || {
            let script = format!(
                "timeout 20 wget -q -O - http://bridgehost:8080/index.html; echo; \
             timeout 20 wget -q -O - http://{ip}/index.html"
            );
            let add_host = format!("bridgehost:{GATEWAY}");
            let t = p.with(
                rt,
                &[
                    "run",
                    "--rm",
                    "--add-host",
                    &add_host,
                    IMAGE,
                    "sh",
                    "-c",
                    &script,
                ],
                START,
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

    let t = p.podman(&["rm", "-f", "-t", "0", &web], SHORT);
    checks.record(&format!("{rn}: rm web"), t.ok("rm -f").map(|_| ()));
}

#[test]
fn podman_bridge_network_with_vessel_like_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("podman", "podman"),
        ("conmon", "conmon"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("busybox", "busybox-static"),
    ]);
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let p = Podman::new(&art, "netpod");
    p.import_busybox().unwrap_or_else(|e| panic!("{e}"));
    let netns_files = || -> Vec<String> {
        leaks::entries(std::path::Path::new("/run/netns"))
            .into_iter()
            .filter(|n| n.starts_with("netns-"))
            .collect()
    };
    let netns_before = netns_files();
    // The bridge host's server listens on every address of the test's
    // namespace (podman creates the bridge with the first container).
    let www = p.tmp.join("www");
    let _server = HttpServer::start(&p.netns, 8080, &www, PAGE);
    let mut checks = Checks::new();
    network_checks(&p, Rt::Runc, 18080, &mut checks);
    network_checks(&p, Rt::Vessel, 18081, &mut checks);

    checks.run("nothing left", || {
        let mut left: Vec<String> = netns_files()
            .into_iter()
            .filter(|n| !netns_before.contains(n))
            .map(|n| format!("network namespace /run/netns/{n}"))
            .collect();
        left.extend(
            leaks::kill_tagged(&p.tag)
                .iter()
                .map(|p| format!("process {p}")),
        );
        left.extend(
            leaks::entries(&p.vessel_state)
                .iter()
                .map(|e| format!("state {e}")),
        );
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(", "))
        }
    });
    eprintln!("podman network test: {:?}", t0.elapsed());
    checks.finish(&[]);
}

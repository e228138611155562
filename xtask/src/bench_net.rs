//! `cargo xtask bench net [SECONDS]`: TCP throughput both ways and ping
//! round-trip time between a container and the bridge's host address,
//! vessel against runc on the same bridge in the same run, with the
//! virtio-net offloads (checksum, TSO, merged receive buffers) and without.
//!
//! Method: a "peer" network namespace holds a bridge with 10.78.0.1/24 and
//! an `iperf3 -s` (Debian's iperf3) bound to it; each runtime's container
//! gets a namespace of its own with a veth whose other end is a port of
//! that bridge (what netavark or CNI's bridge plugin build), handed to the
//! runtime by path. One container per runtime and mode runs, in this order,
//! `iperf3 -c 10.78.0.1 -t SECONDS` (container to host), the same with
//! `-R` (host to container), and `ping -c 20 -i 0.2 10.78.0.1`; the
//! figures are iperf3's receiver-side MiB/s and ping's average. The root
//! file system is busybox with iperf3 and the libraries `ldd` lists. runc
//! "without offloads" has TSO, GSO, GRO and checksum offload turned off on
//! its veth with ethtool; vessel's comes from a sandbox configuration with
//! `net_offload = false` (the virtio-net device offers no offload, so the
//! guest segments and checksums every packet itself). Everything stays in
//! the namespaces the bench creates.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use vessel_tests::engines::Netns;
use vessel_tests::{Artifacts, TempDir};

use crate::build;

/// One measured configuration.
struct Row {
    runtime: &'static str,
    offloads: bool,
    up_mib_s: f64,
    down_mib_s: f64,
    ping_ms: f64,
    wall_s: f64,
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !o.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// Copies `bin` and the libraries `ldd` lists for it into `rootfs` at
/// their host paths.
fn copy_with_libs(bin: &Path, rootfs: &Path) -> Result<()> {
    let o = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let mut files = vec![bin.to_path_buf()];
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            files.push(p);
        }
    }
    for f in files {
        let real = fs::canonicalize(&f).with_context(|| format!("resolving {}", f.display()))?;
        let dest = rootfs.join(f.strip_prefix("/").unwrap_or(&f));
        if let Some(d) = dest.parent() {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        fs::copy(&real, &dest).with_context(|| format!("copying {}", real.display()))?;
    }
    Ok(())
}

/// Receiver-side MiB/s from iperf3's text output (`-f M`).
fn iperf_mib_s(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "MBytes/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// ping's average round trip (`min/avg/max = a/b/c ms`).
fn ping_avg_ms(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.split_whitespace().next()?;
    nums.split('/').nth(1)?.parse().ok()
}

pub fn run(root: &Path, secs: u32) -> Result<()> {
    if secs == 0 {
        bail!("need at least one second per transfer");
    }
    crate::kernel::install_missing(
        &["iperf3", "runc", "busybox-static", "ethtool", "iproute2"],
        "iperf3 (the load), runc (the reference), busybox (the image), ethtool (runc without offloads)",
    )?;
    let a = build::all(root)?;
    let tmp = TempDir::new("bench-net");
    let rootfs = tmp.0.join("rootfs");
    vessel_tests::cli::busybox_rootfs(&rootfs, &["sh", "ping", "echo"]);
    let iperf3 = Path::new("/usr/bin/iperf3");
    copy_with_libs(iperf3, &rootfs)?;

    let peer = Netns::new("bnet-peer");
    ip(&["-n", &peer.name, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &peer.name,
        "addr",
        "add",
        "10.78.0.1/24",
        "dev",
        "br0",
    ])?;
    ip(&["-n", &peer.name, "link", "set", "br0", "up"])?;
    let mut server = peer
        .command(iperf3)
        .args(["-s", "-B", "10.78.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let result = measure(&a, &tmp.0, &rootfs, &peer, secs);
    let _ = server.kill();
    let _ = server.wait();
    let rows = result?;

    println!(
        "bench net ({secs} s per iperf3 direction, 20 pings; container <-> bridge host 10.78.0.1):"
    );
    println!(
        "{:<8} {:<9} {:>14} {:>14} {:>10} {:>8}",
        "runtime", "offloads", "ctr->host MiB/s", "host->ctr MiB/s", "ping ms", "wall s"
    );
    for r in &rows {
        println!(
            "{:<8} {:<9} {:>14.2} {:>14.2} {:>10.3} {:>8.1}",
            r.runtime,
            if r.offloads { "on" } else { "off" },
            r.up_mib_s,
            r.down_mib_s,
            r.ping_ms,
            r.wall_s
        );
    }
    let find = |rt: &str, off: bool| rows.iter().find(|r| r.runtime == rt && r.offloads == off);
    for off in [true, false] {
        if let (Some(v), Some(r)) = (find("vessel", off), find("runc", off)) {
            println!(
                "offloads {}: runc/vessel throughput ctr->host {:.0}x, host->ctr {:.0}x; \
                 vessel/runc ping {:.0}x",
                if off { "on" } else { "off" },
                r.up_mib_s / v.up_mib_s,
                r.down_mib_s / v.down_mib_s,
                v.ping_ms / r.ping_ms
            );
        }
    }
    Ok(())
}

fn measure(a: &Artifacts, tmp: &Path, rootfs: &Path, peer: &Netns, secs: u32) -> Result<Vec<Row>> {
    let t = secs.to_string();
    let script = format!(
        "iperf3 -c 10.78.0.1 -f M -t {t}; echo ==; iperf3 -c 10.78.0.1 -f M -t {t} -R; echo ==; \
         ping -c 20 -i 0.2 10.78.0.1"
    );
    let templates = vessel_tests::workspace_root().join("target/vessel/bench-templates");
    let vessel = a.vmm.with_file_name("vessel");
    let mut rows = Vec::new();
    for (i, (runtime, offloads)) in [
        ("runc", true),
        ("vessel", true),
        ("runc", false),
        ("vessel", false),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = Netns::new(&format!("bnet-{i}"));
        let veth = format!("bn{i}");
        ip(&[
            "-n", &peer.name, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &ns.name,
        ])?;
        ip(&[
            "-n", &peer.name, "link", "set", &veth, "master", "br0", "up",
        ])?;
        let addr = format!("10.78.0.{}/24", 10 + i);
        ip(&["-n", &ns.name, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            "10.78.0.1",
        ])?;
        if !offloads && runtime == "runc" {
            for dev_ns in [&ns.name, &peer.name] {
                let dev = if dev_ns == &ns.name {
                    "eth0"
                } else {
                    veth.as_str()
                };
                let st = Command::new("ip")
                    .args(["netns", "exec", dev_ns, "ethtool", "-K", dev])
                    .args([
                        "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off",
                    ])
                    .stdout(Stdio::null())
                    .status()
                    .context("running ethtool")?;
                if !st.success() {
                    bail!("ethtool -K {dev} in {dev_ns} failed");
                }
            }
        }
        let mut spec = vessel_tests::cli::runc_spec(rootfs, &["sh", "-c", &script]);
        spec["process"]["env"] = json!(["PATH=/bin:/usr/bin", "HOME=/"]);
        // ping needs a raw socket; iperf3 a writable /tmp.
        let caps = json!(["CAP_NET_RAW", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = caps.clone();
        }
        if let Some(m) = spec["mounts"].as_array_mut() {
            m.push(
                json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                          "options": ["nosuid", "nodev", "size=16m"]}),
            );
        }
        let list = spec["linux"]["namespaces"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("spec without namespaces"))?;
        list.retain(|n| n["type"] != "network");
        list.push(json!({"type": "network", "path": ns.path}));
        let bundle = tmp.join(format!("bundle-{i}"));
        fs::create_dir_all(&bundle)?;
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        let id = format!("bnet{i}");
        let mut cmd = match runtime {
            "runc" => {
                let mut c = Command::new("runc");
                c.arg("--root").arg(tmp.join("runc-root"));
                c
            }
            _ => {
                let config = tmp.join(format!("vessel-{i}.toml"));
                let extra = format!(
                    "net_offload = {offloads}\nrun_dir = {:?}\n",
                    tmp.join("vessel-run")
                );
                fs::write(&config, a.vessel_config(&templates, &extra))?;
                let mut c = Command::new(&vessel);
                c.arg("--root")
                    .arg(tmp.join("vessel-root"))
                    .arg("--config")
                    .arg(&config);
                c
            }
        };
        cmd.args(["run", "--bundle"]).arg(&bundle).arg(&id);
        let t0 = Instant::now();
        let o = cmd
            .stdin(Stdio::null())
            .output()
            .context("running the container")?;
        let wall_s = t0.elapsed().as_secs_f64();
        let out = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!(
                "{runtime} (offloads {offloads}): {}; stdout {out}; stderr {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let parts: Vec<&str> = out.split("==\n").collect();
        let parse = || -> Option<Row> {
            Some(Row {
                runtime,
                offloads,
                up_mib_s: iperf_mib_s(parts.first()?)?,
                down_mib_s: iperf_mib_s(parts.get(1)?)?,
                ping_ms: ping_avg_ms(parts.get(2)?)?,
                wall_s,
            })
        };
        let row = parse().ok_or_else(|| anyhow!("{runtime}: cannot read the figures in {out}"))?;
        eprintln!(
            "bench net: {runtime}, offloads {offloads}: {:.2} / {:.2} MiB/s, ping {:.3} ms",
            row.up_mib_s, row.down_mib_s, row.ping_ms
        );
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_and_ping() {
        let iperf = "[  5]   0.00-10.00  sec  1.10 GBytes   112 MBytes/sec    0             sender\n\
                     [  5]   0.00-10.00  sec  1.10 GBytes   111.5 MBytes/sec                  receiver\n";
        assert_eq!(iperf_mib_s(iperf), Some(111.5));
        let ping = "20 packets transmitted, 20 packets received, 0% packet loss\n\
                    round-trip min/avg/max = 0.049/0.072/0.101 ms\n";
        assert_eq!(ping_avg_ms(ping), Some(0.072));
    }
}

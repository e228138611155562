//! `cargo xtask bench`: performance figures, each printed with its method.
//!
//! `bench boot`: cold-boot the guest N times (default 3) and print the median
//! of every boot milestone. Milestones come from the VMM's JSON log (its own
//! monotonic clock, see vmm/src/timeline.rs); "host sees agent" is measured
//! by the launching process around spawn → first successful agent
//! connection. As a same-run reference, the time to spawn and reap a trivial
//! host process (`/bin/true`) is measured too, so the ratio says how many
//! host process starts one microVM boot costs on this machine today.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vessel_tests::{VmOptions, VmProcess, BOOT_TIMEOUT};

use crate::build;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None | Some("boot") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of runs")?,
                None => 3,
            };
            boot(root, runs)
        }
        Some(other) => bail!("unknown benchmark {other:?} (available: boot)"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn boot(root: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("need at least one run");
    }
    let a = build::all(root)?;
    let milestones = [
        "vm_setup_done",
        "first_vcpu_entry",
        "first_serial_byte",
        "agent_ready",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); milestones.len() + 1];
    let mut guest_init = Vec::new();
    for i in 0..runs {
        let mut vm =
            VmProcess::spawn(&a, &VmOptions::default()).context("cannot start vessel-vmm")?;
        let mut client = vm.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
        let host_ready = vm.started.elapsed().as_secs_f64() * 1000.0;
        let pong = client.ping().context("ping")?;
        client.shutdown().context("shutdown")?;
        let status = vm
            .wait_exit(Duration::from_secs(60))
            .ok_or_else(|| anyhow!("VM did not stop"))?;
        let tl = vm.timeline();
        for (j, m) in milestones.iter().enumerate() {
            if let Some((_, ms)) = tl.iter().find(|(n, _)| n == m) {
                samples[j].push(*ms);
            }
        }
        samples[milestones.len()].push(host_ready);
        if let Some(ms) = pong.init_started_ms {
            guest_init.push(ms as f64);
        }
        println!(
            "run {}: agent answered after {host_ready:.0} ms (exit {status})",
            i + 1
        );
    }

    // Same-run reference: a trivial host process start.
    let t = Instant::now();
    let n_ref = 20;
    for _ in 0..n_ref {
        Command::new("/bin/true").status().context("/bin/true")?;
    }
    let host_proc_ms = t.elapsed().as_secs_f64() * 1000.0 / f64::from(n_ref);

    let total = median(samples[milestones.len()].clone());
    println!();
    println!("cold boot to agent ready, median of {runs} runs (128 MiB, 1 vCPU)");
    println!("method: vessel-vmm JSON log milestones (ms since VMM process start) + host-side spawn->agent reply");
    println!("{:<28} {:>10} {:>8}", "milestone", "ms", "share");
    for (j, m) in milestones.iter().enumerate() {
        let v = median(samples[j].clone());
        println!("{:<28} {:>10.1} {:>7.1}%", m, v, 100.0 * v / total);
    }
    if !guest_init.is_empty() {
        println!(
            "{:<28} {:>10.1}   (guest CLOCK_BOOTTIME when /init started)",
            "guest: kernel boot to /init",
            median(guest_init)
        );
    }
    println!(
        "{:<28} {:>10.1} {:>7.1}%",
        "host sees agent (total)", total, 100.0
    );
    println!(
        "reference: host process spawn+wait {host_proc_ms:.2} ms; boot = {:.0}x a host process start",
        total / host_proc_ms
    );
    let json = serde_json::json!({
        "benchmark": "boot",
        "runs": runs,
        "median_ms": milestones.iter().enumerate().map(|(j, m)| (m.to_string(), median(samples[j].clone()))).collect::<std::collections::BTreeMap<_,_>>(),
        "host_sees_agent_ms": total,
        "reference_host_process_ms": host_proc_ms,
    });
    let out = root.join("target/vessel/bench-boot.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

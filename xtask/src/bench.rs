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
            boot(root, runs, args.get(2).map(String::as_str).unwrap_or(""))
        }
        Some("profile") => match args.get(1).map(String::as_str) {
            Some("run") => crate::bench_profile::run(root),
            Some("exec") => crate::bench_profile::exec(root),
            Some("steps") => crate::bench_profile::steps(root),
            Some("restore") => crate::bench_profile::restore(root),
            cmdline => profile(root, cmdline.unwrap_or("")),
        },
        Some("floor") => {
            let budget_ms = match args.get(1) {
                Some(n) => n.parse().context("milliseconds per figure")?,
                None => 1000,
            };
            crate::bench_floor::run(root, budget_ms)
        }
        Some("restore") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of runs")?,
                None => 10,
            };
            restore(root, runs)
        }
        Some("density") => {
            let n = match args.get(1) {
                Some(n) => n.parse().context("number of idle sandboxes")?,
                None => 50,
            };
            density(root, n)
        }
        Some("run") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of runs")?,
                None => 10,
            };
            crate::bench_run::run(root, runs)
        }
        Some("fs") => {
            let mib = match args.get(1) {
                Some(n) => n.parse().context("file size in MiB")?,
                None => 8,
            };
            crate::bench_fs::run(root, mib)
        }
        Some("engines") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of rounds")?,
                None => 5,
            };
            crate::bench_engines::run(root, runs)
        }
        Some("podman") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of runs")?,
                None => 5,
            };
            crate::bench_podman::run(root, runs)
        }
        Some("net") => {
            let secs = match args.get(1) {
                Some(n) => n.parse().context("seconds per transfer")?,
                None => 10,
            };
            crate::bench_net::run(root, secs)
        }
        Some("shim") => {
            let runs = match args.get(1) {
                Some(n) => n.parse().context("number of rounds")?,
                None => 5,
            };
            crate::bench_shim::run(root, runs)
        }
        Some(other) => {
            bail!(
                "unknown benchmark {other:?} (available: boot, profile [run|exec|steps|restore|CMDLINE], restore, density, run, floor, fs, podman, engines, net, shim)"
            )
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn boot(root: &Path, runs: usize, cmdline: &str) -> Result<()> {
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
    let mut agent_init = Vec::new();
    let mut cpu_at_ready = Vec::new();
    for i in 0..runs {
        let mut vm = VmProcess::spawn(
            &a,
            &VmOptions {
                cmdline: cmdline.to_string(),
                ..VmOptions::default()
            },
        )
        .context("cannot start vessel-vmm")?;
        let mut client = vm.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
        let host_ready = vm.started.elapsed().as_secs_f64() * 1000.0;
        if let Some(ms) = vessel_shim::sandbox::process_cpu_ms(vm.pid()) {
            cpu_at_ready.push(ms);
        }
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
            if let Some(l) = pong.listening_ms {
                agent_init.push(l.saturating_sub(ms) as f64);
            }
        }
        println!(
            "run {}: agent answered after {host_ready:.0} ms, VMM CPU time {:.0} ms (exit {status})",
            i + 1,
            cpu_at_ready.last().copied().unwrap_or(f64::NAN)
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
            median(guest_init.clone())
        );
    }
    if !agent_init.is_empty() {
        println!(
            "{:<28} {:>10.1}   (guest clock, agent from /init to listening on vsock)",
            "guest: agent set-up",
            median(agent_init.clone())
        );
    }
    println!(
        "{:<28} {:>10.1} {:>7.1}%",
        "host sees agent (total)", total, 100.0
    );
    println!(
        "{:<28} {:>10.1}   (VMM user+system CPU time at agent ready: the emulated guest\n{:<41}kernel runs as the vCPU thread's system time, so this is less\n{:<41}sensitive to other load on the host than wall time)",
        "VMM CPU time to ready",
        median(cpu_at_ready.clone()),
        "",
        ""
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
        "vmm_cpu_ms_at_ready": median(cpu_at_ready),
        "guest_kernel_to_init_ms": median(guest_init),
        "guest_agent_setup_ms": median(agent_init),
        "reference_host_process_ms": host_proc_ms,
    });
    let out = root.join("target/vessel/bench-boot.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

/// `bench profile [CMDLINE]`: one cold boot with the VMM's rip sampler
/// (1 kHz per vCPU), symbolized with the kernel build's System.map. Shows
/// where guest time goes, including early boot that `initcall_debug` cannot
/// time. `bench profile run`, `exec` and `steps` profile the container
/// path instead (xtask/src/bench_profile.rs).
fn profile(root: &Path, cmdline: &str) -> Result<()> {
    let a = build::all(root)?;
    let map_path = a.kernel.with_file_name("System.map");
    let symbols = load_system_map(&map_path)?;
    let out = root.join("target/vessel/boot-profile.txt");
    let opts = VmOptions {
        cmdline: cmdline.to_string(),
        vmm_args: vec!["--profile-rip".into(), out.display().to_string()],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::spawn(&a, &opts).context("cannot start vessel-vmm")?;
    let mut client = vm.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
    let total_ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    client.shutdown().context("shutdown")?;
    vm.wait_exit(Duration::from_secs(60))
        .ok_or_else(|| anyhow!("VM did not stop"))?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let (rows, samples) = by_symbol(&symbols, parse_histogram(&text));
    println!("boot profile: {samples} samples of guest rip (1 per ms per vCPU), agent ready after {total_ms:.0} ms");
    println!("method: vessel-vmm --profile-rip interrupts KVM_RUN with a signal every 1 ms and reads rip; symbols from {}", map_path.display());
    print_rows(&rows, samples, 50);
    println!("raw histogram: {}", out.display());
    Ok(())
}

/// The `<rip hex> <count>` lines of a `--profile-rip` histogram.
pub(crate) fn parse_histogram(text: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    text.lines().filter_map(|line| {
        let mut it = line.split_whitespace();
        let rip = u64::from_str_radix(it.next()?, 16).ok()?;
        let count = it.next()?.parse().ok()?;
        Some((rip, count))
    })
}

/// Samples `(rip, count)` summed per symbol, highest count first, and their
/// total.
pub(crate) fn by_symbol(
    symbols: &[(u64, String)],
    samples: impl IntoIterator<Item = (u64, u64)>,
) -> (Vec<(&str, u64)>, u64) {
    let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut total = 0;
    for (rip, count) in samples {
        total += count;
        *counts.entry(symbolize(symbols, rip)).or_default() += count;
    }
    let mut rows: Vec<_> = counts.into_iter().collect();
    rows.sort_by_key(|r| (std::cmp::Reverse(r.1), r.0));
    (rows, total)
}

/// The `top` rows of [`by_symbol`] with their share of `total`.
pub(crate) fn print_rows(rows: &[(&str, u64)], total: u64, top: usize) {
    println!("{:>7} {:>6}  symbol", "samples", "share");
    for (sym, n) in rows.iter().take(top) {
        println!(
            "{n:>7} {:>5.1}%  {sym}",
            100.0 * *n as f64 / total.max(1) as f64
        );
    }
}

/// Text symbols of a System.map, sorted by address.
pub(crate) fn load_system_map(path: &Path) -> Result<Vec<(u64, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (build the kernel with `cargo xtask kernel`)",
            path.display()
        )
    })?;
    let mut syms: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?;
            let name = it.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
        })
        .collect();
    syms.sort();
    Ok(syms)
}

/// Guest user-space samples are reported under this name.
pub(crate) const USER_SPACE: &str = "[guest user space]";

fn symbolize(symbols: &[(u64, String)], rip: u64) -> &str {
    if rip < 0xffff_8000_0000_0000 {
        return USER_SPACE;
    }
    match symbols.partition_point(|(a, _)| *a <= rip) {
        0 => "[unknown kernel address]",
        i => &symbols[i - 1].1,
    }
}

/// One `/proc/PID/smaps_rollup` field, in KiB.
pub(crate) fn smaps_kib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A template made by [`build_template`]: its cold boot, how long the
/// guest took to settle, and the snapshot.
pub(crate) struct BuiltTemplate {
    pub cold_ms: f64,
    pub settle: Duration,
    pub snapshot_ms: f64,
}

/// Cold-boots a VM and snapshots it into `snap` (replaced), as `vessel
/// template build` does: one Ping, no open connection, a guest that has
/// settled.
pub(crate) fn build_template(a: &vessel_tests::Artifacts, snap: &Path) -> Result<BuiltTemplate> {
    let _ = std::fs::remove_dir_all(snap);
    let opts = VmOptions {
        api_sock: true,
        ..VmOptions::default()
    };
    let mut template = VmProcess::spawn(a, &opts).context("cannot start vessel-vmm")?;
    let client = template.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
    let cold_ms = template.started.elapsed().as_secs_f64() * 1000.0;
    let settle =
        vessel_shim::sandbox::settle_for_snapshot(template.pid(), client, Duration::from_secs(30))?;
    let t = Instant::now();
    let answer = template
        .api(&format!("snapshot {}", snap.display()))
        .context("snapshot request")?;
    if !answer.starts_with("OK") {
        bail!("snapshot failed: {answer}");
    }
    let snapshot_ms = t.elapsed().as_secs_f64() * 1000.0;
    template
        .connect()
        .and_then(|mut c| c.shutdown())
        .context("template shutdown")?;
    template
        .wait_exit(Duration::from_secs(60))
        .ok_or_else(|| anyhow!("template did not stop"))?;
    Ok(BuiltTemplate {
        cold_ms,
        settle,
        snapshot_ms,
    })
}

/// `bench restore [N]`: one cold boot (the reference, same run), a snapshot
/// of it, then N restores one after another, each timed from spawning
/// `vessel-vmm --restore` to the agent's first answer on a new connection.
/// Also each clone's memory from smaps_rollup right after that answer.
fn restore(root: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("need at least one run");
    }
    let a = build::all(root)?;
    let snap = root.join("target/vessel/bench-template");
    let BuiltTemplate {
        cold_ms,
        settle,
        snapshot_ms,
    } = build_template(&a, &snap)?;

    let mut total = Vec::new();
    let mut setup = Vec::new();
    let mut private = Vec::new();
    let mut rss = Vec::new();
    for i in 0..runs {
        let cid = 10 + i as u32;
        let mut vm = VmProcess::restore(&a, &snap, cid).context("cannot start a clone")?;
        let mut c = vm
            .connect_and_ping(Duration::from_secs(60))
            .map_err(|e| anyhow!(e))?;
        total.push(vm.started.elapsed().as_secs_f64() * 1000.0);
        if let Some((_, ms)) = vm
            .timeline()
            .into_iter()
            .find(|(n, _)| n == "vm_setup_done")
        {
            setup.push(ms);
        }
        private.push(smaps_kib(vm.pid(), "Private_Dirty").unwrap_or(f64::NAN) / 1024.0);
        rss.push(smaps_kib(vm.pid(), "Rss").unwrap_or(f64::NAN) / 1024.0);
        c.shutdown().context("clone shutdown")?;
        vm.wait_exit(Duration::from_secs(60))
            .ok_or_else(|| anyhow!("clone did not stop"))?;
    }
    let _ = std::fs::remove_dir_all(&snap);
    let med = median(total.clone());
    println!();
    println!("template restore to agent answer, {runs} restores of one snapshot (128 MiB, 1 vCPU)");
    println!("method: spawn `vessel-vmm --restore` -> first successful CONNECT + Ping on a new connection (host wall time); the cold boot of the template in the same run is the reference");
    println!("{:<36} {:>10.1}", "cold boot to agent ready (ms)", cold_ms);
    println!(
        "{:<36} {:>10.1}   (after waiting {:.1} s for the guest to go idle)",
        "snapshot (ms)",
        snapshot_ms,
        settle.as_secs_f64()
    );
    println!(
        "{:<36} {:>10.1}",
        "restore: VMM set-up done (ms)",
        median(setup.clone())
    );
    println!(
        "{:<36} {:>10.1}   (min {:.1}, max {:.1}; target <= 50)",
        "restore to agent answer (ms)",
        med,
        total.iter().copied().fold(f64::INFINITY, f64::min),
        total.iter().copied().fold(0.0, f64::max)
    );
    println!("{:<36} {:>10.0}x", "cold boot / restore", cold_ms / med);
    println!(
        "{:<36} {:>10.1}   (Private_Dirty of the VMM after the first answer; Rss {:.1})",
        "clone private memory (MiB)",
        median(private.clone()),
        median(rss.clone())
    );
    let json = serde_json::json!({
        "benchmark": "restore",
        "runs": runs,
        "cold_boot_ms": cold_ms,
        "snapshot_ms": snapshot_ms,
        "settle_ms": settle.as_secs_f64() * 1000.0,
        "restore_setup_ms": median(setup),
        "restore_to_answer_ms": med,
        "restore_to_answer_all_ms": total,
        "clone_private_dirty_mib": median(private),
        "clone_rss_mib": median(rss),
    });
    let out = root.join("target/vessel/bench-restore.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

/// Restores one clone and times spawn -> first answer; returns the clone
/// (still running), its client and the time.
fn timed_restore(
    a: &vessel_tests::Artifacts,
    snap: &Path,
    cid: u32,
) -> Result<(VmProcess, vessel_proto::client::AgentClient, f64)> {
    let mut vm = VmProcess::restore(a, snap, cid).context("cannot start a clone")?;
    let c = vm
        .connect_and_ping(Duration::from_secs(120))
        .map_err(|e| anyhow!(e))?;
    let ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    Ok((vm, c, ms))
}

/// When the steady-state idle window of `bench density` starts, counted
/// from the last sandbox's start, and how long it is (seconds).
const IDLE_SETTLE_S: u64 = 60;
const IDLE_STEADY_S: u64 = 30;

/// `bench density [N]`: restore latency with no other sandbox running (5
/// restores, the reference), then with N idle sandboxes running (5 more),
/// and the memory the N idle ones use: VMM Rss and Private_Dirty from
/// smaps_rollup, and the host's MemAvailable before and after; their idle
/// CPU right after start and in steady state (from `IDLE_SETTLE_S`).
fn density(root: &Path, n: usize) -> Result<()> {
    let a = build::all(root)?;
    let snap = root.join("target/vessel/bench-density-template");
    build_template(&a, &snap)?;

    let probe = |base: u32| -> Result<Vec<f64>> {
        let mut t = Vec::new();
        for i in 0..5 {
            let (mut vm, mut c, ms) = timed_restore(&a, &snap, base + i)?;
            t.push(ms);
            c.shutdown().context("probe shutdown")?;
            vm.wait_exit(Duration::from_secs(60))
                .ok_or_else(|| anyhow!("probe clone did not stop"))?;
        }
        Ok(t)
    };
    let mem_available = || -> f64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let alone = probe(100)?;
    let avail_before = mem_available();
    let mut idle = Vec::with_capacity(n);
    let mut start_times = Vec::with_capacity(n);
    for i in 0..n {
        let (vm, c, ms) = timed_restore(&a, &snap, 1000 + i as u32)?;
        start_times.push(ms);
        idle.push((vm, c));
    }
    let all_started = Instant::now();
    // Let them settle, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let loaded = probe(200)?;
    let avail_after = mem_available();
    let rss: Vec<f64> = idle
        .iter()
        .map(|(vm, _)| smaps_kib(vm.pid(), "Rss").unwrap_or(f64::NAN) / 1024.0)
        .collect();
    let private: Vec<f64> = idle
        .iter()
        .map(|(vm, _)| smaps_kib(vm.pid(), "Private_Dirty").unwrap_or(f64::NAN) / 1024.0)
        .collect();
    let cpu = |idle: &[(VmProcess, vessel_proto::client::AgentClient)]| -> f64 {
        idle.iter()
            .filter_map(|(vm, _)| vessel_shim::sandbox::process_cpu_ms(vm.pid()))
            .sum()
    };
    // Right after start: the guests still run work their restore and
    // first request set off (timers of the template's boot, deferred
    // work): what a sandbox costs in its first seconds.
    let cpu_before = cpu(&idle);
    std::thread::sleep(Duration::from_secs(5));
    let cpu_after = cpu(&idle);
    // Steady state: from a minute after the last start, for 30 s.
    std::thread::sleep(Duration::from_secs(IDLE_SETTLE_S).saturating_sub(all_started.elapsed()));
    let steady_before = cpu(&idle);
    std::thread::sleep(Duration::from_secs(IDLE_STEADY_S));
    let steady_after = cpu(&idle);
    for (mut vm, mut c) in idle {
        let _ = c.shutdown();
        let _ = vm.wait_exit(Duration::from_secs(60));
    }
    let _ = std::fs::remove_dir_all(&snap);

    let (m_alone, m_loaded) = (median(alone.clone()), median(loaded.clone()));
    println!();
    println!("density: {n} idle sandboxes restored from one template (128 MiB, 1 vCPU each)");
    println!("method: restore -> first answer, median of 5, with no other sandbox and then with {n} idle ones running; memory from /proc/PID/smaps_rollup and /proc/meminfo");
    println!(
        "{:<44} {:>10.1}",
        "restore, nothing else running (ms)", m_alone
    );
    println!(
        "{:<44} {:>10.1}",
        format!("restore, {n} idle sandboxes running (ms)"),
        m_loaded
    );
    println!("{:<44} {:>10.2}x", "slowdown", m_loaded / m_alone);
    println!(
        "{:<44} {:>10.1}",
        "starting the idle ones, median (ms)",
        median(start_times.clone())
    );
    println!(
        "{:<44} {:>10.1}",
        "per idle sandbox: VMM Rss (MiB)",
        median(rss.clone())
    );
    println!(
        "{:<44} {:>10.1}",
        "per idle sandbox: Private_Dirty (MiB)",
        median(private.clone())
    );
    println!(
        "{:<44} {:>10.1}",
        "host MemAvailable drop per sandbox (MiB)",
        (avail_before - avail_after) / n.max(1) as f64
    );
    let first = (cpu_after - cpu_before) / 5000.0;
    let steady = (steady_after - steady_before) / (IDLE_STEADY_S as f64 * 1000.0);
    println!(
        "{:<44} {:>10.2}",
        "idle CPU, all together, first 5 s (cores)", first
    );
    println!(
        "{:<44} {:>10.2}",
        format!("idle CPU, all together, steady {IDLE_STEADY_S} s (cores)"),
        steady
    );
    println!(
        "{:<44} {:>10.2}   (target <= 1 ms/s)",
        "idle CPU per sandbox, steady (ms/s)",
        steady * 1000.0 / n.max(1) as f64
    );
    println!("method: utime+stime of the VMM processes (all threads) over a 5 s window 2 s after the last start, then over {IDLE_STEADY_S} s from {IDLE_SETTLE_S} s after it (guests' boot-time timers and the work a restore sets off have run out by then)");
    let json = serde_json::json!({
        "benchmark": "density",
        "idle_sandboxes": n,
        "restore_alone_ms": alone,
        "restore_loaded_ms": loaded,
        "slowdown": m_loaded / m_alone,
        "rss_mib_median": median(rss),
        "private_dirty_mib_median": median(private),
        "mem_available_drop_mib_per_sandbox": (avail_before - avail_after) / n.max(1) as f64,
        "idle_cpu_cores_first_5s": first,
        "idle_cpu_cores_steady": steady,
        "idle_cpu_ms_per_s_per_sandbox_steady": steady * 1000.0 / n.max(1) as f64,
    });
    let out = root.join("target/vessel/bench-density.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

//! `cargo xtask bench run [N]`: the container path end to end, against runc
//! on the same bundle in the same invocation.
//!
//! Method: one busybox bundle (read-only root, pid/mount/ipc/uts/network
//! namespaces, no terminal) running `true`. A VM template is built first
//! (`vessel template build`, timed: that is the one cold boot). Then, after
//! one warm-up run of each, N rounds alternate `vessel run` and `runc run`
//! of the bundle, each timed from spawn to exit of the CLI process; the
//! table shows medians and the ratio. Each round also runs vessel with
//! `rootfs_dax_mib = 32` (the rootfs share has a DAX window; its own
//! template, built and timed beforehand). Finally `CONCURRENT` (10) `vessel run`
//! start at once: each one's latency and the wall time of the batch,
//! against the sequential median.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench::median;
use crate::build;

const CONCURRENT: usize = 10;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bundle's `config.json`: what `runc spec` gives, minus the terminal,
/// with the root read-only and `true` as the process.
fn config() -> serde_json::Value {
    let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bench",
        "process": {
            "terminal": false,
            "args": ["true"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Runs `cmd` with no stdio, returning its wall time in milliseconds;
/// fails unless it exits 0.
fn timed(cmd: &mut Command) -> Result<f64> {
    let desc = format!("{cmd:?}");
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {desc}"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "{desc} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

pub fn run(root: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("need at least one run");
    }
    crate::kernel::install_missing(
        &["runc", "busybox-static"],
        "runc (the reference) and busybox (the bundle)",
    )?;
    let runc = Path::new("/usr/sbin/runc");
    let busybox = Path::new("/bin/busybox");
    let a = build::all(root)?;
    let vessel = root.join("target/release/vessel");
    let dir =
        Scratch(std::env::temp_dir().join(format!("vessel-bench-run-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let bundle = dir.0.join("bundle");
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).with_context(|| format!("creating {d}"))?;
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).context("copying busybox")?;
    for applet in ["sh", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .with_context(|| format!("linking {applet}"))?;
    }
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config())?,
    )
    .context("writing config.json")?;
    let config = dir.0.join("config.toml");
    std::fs::write(&config, a.vessel_config(&dir.0.join("templates"), ""))
        .context("writing config.toml")?;
    let config_dax = dir.0.join("config-dax.toml");
    std::fs::write(
        &config_dax,
        a.vessel_config(&dir.0.join("templates"), "rootfs_dax_mib = 32\n"),
    )
    .context("writing config-dax.toml")?;
    let vessel_root = dir.0.join("vessel-root");
    let runc_root = dir.0.join("runc-root");
    let vessel_with = |config: &Path, args: &[&str]| {
        let mut c = Command::new(&vessel);
        c.arg("--root")
            .arg(&vessel_root)
            .arg("--config")
            .arg(config)
            .args(args);
        c
    };
    let vessel_cmd = |args: &[&str]| vessel_with(&config, args);
    let bundle_s = bundle.to_string_lossy().into_owned();
    let vessel_run = |id: &str| {
        let mut c = vessel_cmd(&["run", "--bundle", &bundle_s, id]);
        c.current_dir(&bundle);
        c
    };
    let vessel_dax_run = |id: &str| vessel_with(&config_dax, &["run", "--bundle", &bundle_s, id]);
    let runc_run = |id: &str| {
        let mut c = Command::new(runc);
        c.arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle", &bundle_s, id]);
        c
    };

    eprintln!("bench run: building the VM template (one cold boot)");
    let template_ms = timed(&mut vessel_cmd(&["template", "build", "--rebuild"]))?;
    let template_dax_ms = timed(&mut vessel_with(
        &config_dax,
        &["template", "build", "--rebuild"],
    ))?;
    eprintln!("bench run: warm-up");
    timed(&mut vessel_run("warm-vessel"))?;
    timed(&mut vessel_dax_run("warm-dax"))?;
    timed(&mut runc_run("warm-runc"))?;
    let (mut v, mut d, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        v.push(timed(&mut vessel_run(&format!("v{i}")))?);
        d.push(timed(&mut vessel_dax_run(&format!("d{i}")))?);
        r.push(timed(&mut runc_run(&format!("r{i}")))?);
        eprintln!(
            "bench run: round {i}: vessel {:.0} ms, vessel (rootfs DAX) {:.0} ms, runc {:.1} ms",
            v[i], d[i], r[i]
        );
    }

    eprintln!("bench run: {CONCURRENT} concurrent vessel run");
    let t = Instant::now();
    let children = (0..CONCURRENT)
        .map(|i| {
            let started = Instant::now();
            vessel_run(&format!("c{i}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map(|c| (c, started))
                .context("spawning vessel run")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut each = Vec::new();
    let mut failures = Vec::new();
    for (child, started) in children {
        let out = child.wait_with_output().context("waiting for vessel run")?;
        each.push(started.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
    }
    let batch_ms = t.elapsed().as_secs_f64() * 1000.0;
    if !failures.is_empty() {
        bail!("{} concurrent runs failed: {failures:?}", failures.len());
    }

    let (mv, md, mr) = (median(v.clone()), median(d.clone()), median(r.clone()));
    let mc = median(each.clone());
    println!();
    println!("run: `true` in a busybox bundle, vessel run (VM restored from a template) vs runc run, same bundle, same invocation");
    println!("method: CLI spawn -> exit, median of {runs} alternating rounds after one warm-up each; then {CONCURRENT} vessel run started at once");
    println!(
        "{:<48} {:>10.1}",
        "vessel template build, one cold boot (ms)", template_ms
    );
    println!("{:<48} {:>10.1}", "vessel run true, median (ms)", mv);
    println!(
        "{:<48} {:>10.1}",
        "vessel template build, rootfs DAX (ms)", template_dax_ms
    );
    println!(
        "{:<48} {:>10.1}",
        "vessel run true, rootfs DAX 32 MiB, median (ms)", md
    );
    println!("{:<48} {:>10.1}", "runc run true, median (ms)", mr);
    println!("{:<48} {:>10.1}x", "vessel / runc", mv / mr);
    println!("{:<48} {:>10.1}x", "vessel (rootfs DAX) / runc", md / mr);
    println!(
        "{:<48} {:>10.1}",
        format!("{CONCURRENT} concurrent vessel run: median each (ms)"),
        mc
    );
    println!(
        "{:<48} {:>10.1}",
        format!("{CONCURRENT} concurrent vessel run: batch wall (ms)"),
        batch_ms
    );
    println!(
        "{:<48} {:>10.2}x",
        "concurrent median / sequential median",
        mc / mv
    );
    let json = serde_json::json!({
        "benchmark": "run",
        "runs": runs,
        "template_build_ms": template_ms,
        "vessel_run_ms": v,
        "runc_run_ms": r,
        "vessel_median_ms": mv,
        "template_build_dax_ms": template_dax_ms,
        "vessel_dax_run_ms": d,
        "vessel_dax_median_ms": md,
        "runc_median_ms": mr,
        "ratio": mv / mr,
        "concurrent": CONCURRENT,
        "concurrent_each_ms": each,
        "concurrent_batch_ms": batch_ms,
    });
    let out = root.join("target/vessel/bench-run.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

//! `cargo xtask bench run [N]`: the container path end to end, against runc
//! on the same bundle in the same invocation (issue 17, "container start in
//! seconds").
//!
//! Method: one busybox bundle (read-only root, pid/mount/ipc/uts/network
//! namespaces, no terminal) running `true`. A VM template is built first
//! (`vessel template build`, timed: that is the one cold boot). Then, after
//! one warm-up of each, N rounds alternate vessel and runc, each CLI timed
//! from spawn to exit; the table shows medians, ratios and the issue's
//! targets. Each round times:
//! - `run` of the bundle (and vessel with `rootfs_dax_mib = 0`: the rootfs
//!   share without its default DAX window, files copied through FUSE; its
//!   own template, built and timed beforehand);
//! - `create` (it returns once the container is `created`, which `state` then
//!   confirms), then `start` until `state` says `stopped` (polled every
//!   10 ms, at most 60 s), then `delete`.
//!
//! Then one container per runtime runs `sleep 1000` (a second bundle), and N
//! rounds alternate `exec ID true` into them; they are killed (`kill ID 9`)
//! and deleted (`delete --force`). Finally `CONCURRENT` (10) `run` start at
//! once, vessel then runc: each one's latency and the batch's wall time,
//! against the sequential median.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vessel_tests::Artifacts;

use crate::bench::median;
use crate::build;

const CONCURRENT: usize = 10;
const RUNC: &str = "/usr/sbin/runc";
/// How long a `state` poll waits for the wanted status.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
const STATE_POLL: Duration = Duration::from_millis(10);

/// A scratch directory removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    /// `$TMPDIR/vessel-bench-NAME-PID`, emptied.
    pub(crate) fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vessel-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host's 1, 5 and 15 minute load averages (`/proc/loadavg`): other
/// work on this host moves every figure, and the guest kernel's most.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The bundle's `config.json`: what `runc spec` gives, minus the terminal,
/// with the root read-only and `args` as the process.
fn config(args: &[&str]) -> serde_json::Value {
    let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bench",
        "process": {
            "terminal": false,
            "args": args,
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

/// Writes a bundle in `dir` whose read-only rootfs holds busybox (with the
/// `sh`, `true` and `sleep` applets) and whose process is `args`; returns
/// the rootfs path.
pub(crate) fn write_bundle(dir: &Path, args: &[&str]) -> Result<PathBuf> {
    crate::kernel::install_missing(&["busybox-static"], "busybox (the bundle)")?;
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).with_context(|| format!("creating {d}"))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copying busybox")?;
    for applet in ["sh", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .with_context(|| format!("linking {applet}"))?;
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config(args))?,
    )
    .context("writing config.json")?;
    Ok(rootfs)
}

/// Writes a vessel configuration (`a.vessel_config` with templates under
/// `dir/templates` plus `extra`) to `dir/name`.
pub(crate) fn write_config(a: &Artifacts, dir: &Path, name: &str, extra: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, a.vessel_config(&dir.join("templates"), extra))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A runc-style CLI (vessel or runc) with its own state root. Its output
/// goes to a log file, so a process left running (a container's monitor)
/// holds no pipe of ours.
pub(crate) struct Cli {
    bin: PathBuf,
    global: Vec<OsString>,
    log: PathBuf,
}

impl Cli {
    /// `vessel --root DIR/vessel-root --config CONFIG`.
    pub(crate) fn vessel(root: &Path, dir: &Path, config: &Path) -> Cli {
        Cli {
            bin: root.join("target/release/vessel"),
            global: vec![
                "--root".into(),
                dir.join("vessel-root").into(),
                "--config".into(),
                config.into(),
            ],
            log: dir.join("cli.log"),
        }
    }

    /// `runc --root DIR/runc-root`.
    pub(crate) fn runc(dir: &Path) -> Cli {
        Cli {
            bin: RUNC.into(),
            global: vec!["--root".into(), dir.join("runc-root").into()],
            log: dir.join("cli.log"),
        }
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(&self.global).args(args);
        c
    }

    /// Runs the CLI with `args`, returning its wall time in milliseconds;
    /// fails (with what it wrote) unless it exits 0.
    pub(crate) fn timed(&self, args: &[&str]) -> Result<f64> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let from = log.seek(SeekFrom::End(0)).context("seeking the CLI log")?;
        let mut cmd = self.cmd(args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().context("CLI log")?)
            .stderr(log.try_clone().context("CLI log")?);
        let desc = format!("{cmd:?}");
        let t = Instant::now();
        let status = cmd.status().with_context(|| format!("cannot run {desc}"))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.success() {
            let mut text = String::new();
            let _ = log
                .seek(SeekFrom::Start(from))
                .and_then(|_| log.read_to_string(&mut text));
            bail!("{desc} failed with {status}: {}", text.trim());
        }
        Ok(ms)
    }

    /// The `status` of `state ID`.
    pub(crate) fn status(&self, id: &str) -> Result<String> {
        let out = self
            .cmd(&["state", id])
            .stdin(Stdio::null())
            .output()
            .context("running state")?;
        if !out.status.success() {
            bail!(
                "state {id} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let state: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing the state JSON")?;
        Ok(state["status"].as_str().unwrap_or_default().to_string())
    }

    /// Polls `state ID` every 10 ms until it says `want` (at most 60 s);
    /// returns the milliseconds since `since`.
    pub(crate) fn wait_for(&self, id: &str, want: &str, since: Instant) -> Result<f64> {
        loop {
            let status = self.status(id)?;
            if status == want {
                return Ok(since.elapsed().as_secs_f64() * 1000.0);
            }
            if since.elapsed() > STATE_TIMEOUT {
                bail!("{id} is still {status:?}, not {want:?}, after {STATE_TIMEOUT:?}");
            }
            std::thread::sleep(STATE_POLL);
        }
    }

    /// `kill ID 9` and `delete --force ID`, errors ignored (clean-up).
    pub(crate) fn remove(&self, id: &str) {
        let _ = self.timed(&["kill", id, "9"]);
        let _ = self.timed(&["delete", "--force", id]);
    }
}

/// One create → start → stopped cycle of `id`, deleted at the end.
struct Lifecycle {
    create_ms: f64,
    start_cli_ms: f64,
    start_to_stopped_ms: f64,
}

fn lifecycle(cli: &Cli, bundle: &str, id: &str) -> Result<Lifecycle> {
    let create_ms = cli.timed(&["create", "--bundle", bundle, id])?;
    let status = cli.status(id)?;
    if status != "created" {
        bail!("{id} is {status:?} after create, not \"created\"");
    }
    let t = Instant::now();
    let start_cli_ms = cli.timed(&["start", id])?;
    let start_to_stopped_ms = cli.wait_for(id, "stopped", t)?;
    cli.timed(&["delete", id])?;
    Ok(Lifecycle {
        create_ms,
        start_cli_ms,
        start_to_stopped_ms,
    })
}

/// Starts a container of the `sleep 1000` bundle and waits until it runs.
pub(crate) fn start_sleeper(cli: &Cli, bundle: &str, id: &str) -> Result<()> {
    cli.timed(&["create", "--bundle", bundle, id])?;
    cli.timed(&["start", id])?;
    cli.wait_for(id, "running", Instant::now())?;
    Ok(())
}

/// `exec ID true` into a running `sleep` container of each runtime: one
/// warm-up, then `runs` alternating rounds. The containers are removed
/// whatever happens.
fn exec_rounds(
    vessel: &Cli,
    runc: &Cli,
    bundle: &str,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let result = (|| {
        start_sleeper(vessel, bundle, "vx")?;
        start_sleeper(runc, bundle, "rx")?;
        vessel.timed(&["exec", "vx", "true"])?;
        runc.timed(&["exec", "rx", "true"])?;
        let (mut v, mut r) = (Vec::new(), Vec::new());
        for i in 0..runs {
            v.push(vessel.timed(&["exec", "vx", "true"])?);
            r.push(runc.timed(&["exec", "rx", "true"])?);
            eprintln!(
                "bench run: exec round {i}: vessel {:.0} ms, runc {:.1} ms",
                v[i], r[i]
            );
        }
        Ok((v, r))
    })();
    vessel.remove("vx");
    runc.remove("rx");
    result
}

/// `CONCURRENT` `run` of the bundle started at once: each one's latency and
/// the batch's wall time.
fn concurrent(cli: &Cli, bundle: &str, prefix: &str) -> Result<(Vec<f64>, f64)> {
    let t = Instant::now();
    let children = (0..CONCURRENT)
        .map(|i| {
            let started = Instant::now();
            cli.cmd(&["run", "--bundle", bundle, &format!("{prefix}{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map(|c| (c, started))
                .context("spawning run")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut each = Vec::new();
    let mut failures = Vec::new();
    for (child, started) in children {
        let out = child.wait_with_output().context("waiting for run")?;
        each.push(started.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
    }
    let batch_ms = t.elapsed().as_secs_f64() * 1000.0;
    if !failures.is_empty() {
        bail!("{} concurrent runs failed: {failures:?}", failures.len());
    }
    Ok((each, batch_ms))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// One table row: vessel and runc medians, their ratio, the target.
fn row(label: &str, v: f64, r: f64, target: &str) {
    println!("{label:<44} {v:>10.1} {r:>10.1} {:>8.1}x  {target}", v / r);
}

pub fn run(root: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("need at least one run");
    }
    crate::kernel::install_missing(
        &["runc", "busybox-static"],
        "runc (the reference) and busybox (the bundle)",
    )?;
    let a = build::all(root)?;
    let dir = Scratch::new("run");
    let bundle = dir.0.join("bundle");
    write_bundle(&bundle, &["true"])?;
    let sleep_bundle = dir.0.join("bundle-sleep");
    write_bundle(&sleep_bundle, &["sleep", "1000"])?;
    let config = write_config(&a, &dir.0, "config.toml", "")?;
    let config_nodax = write_config(&a, &dir.0, "config-nodax.toml", "rootfs_dax_mib = 0\n")?;
    let vessel = Cli::vessel(root, &dir.0, &config);
    let nodax = Cli::vessel(root, &dir.0, &config_nodax);
    let runc = Cli::runc(&dir.0);
    let b = bundle.to_string_lossy().into_owned();
    let sleep_b = sleep_bundle.to_string_lossy().into_owned();
    let timed_run = |cli: &Cli, id: &str| cli.timed(&["run", "--bundle", &b, id]);

    let load_before = loadavg();
    eprintln!("bench run: building the VM template (one cold boot)");
    let template_ms = vessel.timed(&["template", "build", "--rebuild"])?;
    let template_nodax_ms = nodax.timed(&["template", "build", "--rebuild"])?;
    eprintln!("bench run: warm-up");
    timed_run(&vessel, "warm-vessel")?;
    timed_run(&nodax, "warm-nodax")?;
    timed_run(&runc, "warm-runc")?;
    lifecycle(&vessel, &b, "warm-vessel-create")?;
    lifecycle(&runc, &b, "warm-runc-create")?;
    let (mut v, mut d, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut vl, mut rl) = (Vec::new(), Vec::new());
    for i in 0..runs {
        v.push(timed_run(&vessel, &format!("v{i}"))?);
        d.push(timed_run(&nodax, &format!("d{i}"))?);
        r.push(timed_run(&runc, &format!("r{i}"))?);
        vl.push(lifecycle(&vessel, &b, &format!("vc{i}"))?);
        rl.push(lifecycle(&runc, &b, &format!("rc{i}"))?);
        eprintln!(
            "bench run: round {i}: run: vessel {:.0} ms, vessel (no rootfs DAX) {:.0} ms, runc {:.1} ms; create: vessel {:.0} ms, runc {:.1} ms; start -> stopped: vessel {:.0} ms, runc {:.1} ms",
            v[i], d[i], r[i], vl[i].create_ms, rl[i].create_ms, vl[i].start_to_stopped_ms, rl[i].start_to_stopped_ms
        );
    }
    eprintln!("bench run: exec into running `sleep 1000` containers");
    let (ve, re) = exec_rounds(&vessel, &runc, &sleep_b, runs)?;
    eprintln!("bench run: {CONCURRENT} concurrent run, vessel then runc");
    let (each, batch_ms) = concurrent(&vessel, &b, "c")?;
    let (runc_each, runc_batch_ms) = concurrent(&runc, &b, "rc-c")?;
    let load_after = loadavg();

    let pick = |l: &[Lifecycle], f: fn(&Lifecycle) -> f64| l.iter().map(f).collect::<Vec<_>>();
    let (vc, rc) = (pick(&vl, |l| l.create_ms), pick(&rl, |l| l.create_ms));
    let (vs, rs) = (
        pick(&vl, |l| l.start_to_stopped_ms),
        pick(&rl, |l| l.start_to_stopped_ms),
    );
    let (vsc, rsc) = (pick(&vl, |l| l.start_cli_ms), pick(&rl, |l| l.start_cli_ms));
    let (mv, md, mr) = (median(v.clone()), median(d.clone()), median(r.clone()));
    let (mvc, mrc) = (median(vc.clone()), median(rc.clone()));
    let (mvs, mrs) = (median(vs.clone()), median(rs.clone()));
    let (mve, mre) = (median(ve.clone()), median(re.clone()));
    let (mc, mrcc) = (median(each.clone()), median(runc_each.clone()));
    let batch_ratio = batch_ms / mv;
    println!();
    println!("run: busybox bundles, vessel (VM restored from a template) vs runc, same bundles, same invocation");
    println!("method: CLI spawn -> exit, median of {runs} alternating rounds after one warm-up each; start -> stopped polls `state` every 10 ms; exec goes into a running `sleep 1000` container of each runtime; then {CONCURRENT} `run` started at once (vessel, then runc)");
    println!("host load average (1/5/15 min) before: {load_before}, after: {load_after}");
    println!(
        "{:<44} {:>10.1}",
        "vessel template build, one cold boot (ms)", template_ms
    );
    println!(
        "{:<44} {:>10.1}",
        "vessel template build, no rootfs DAX (ms)", template_nodax_ms
    );
    println!(
        "{:<44} {:>10} {:>10} {:>9}  issue 17 target",
        "median (ms)", "vessel", "runc", "ratio"
    );
    row(
        "run true",
        mv,
        mr,
        &format!("ratio <= 40x: {}", verdict(mv / mr <= 40.0)),
    );
    row("run true, no rootfs DAX window", md, mr, "");
    row(
        "create (returns once `created`)",
        mvc,
        mrc,
        &format!("vessel <= 500 ms: {}", verdict(mvc <= 500.0)),
    );
    row("start -> state `stopped`", mvs, mrs, "");
    row(
        "  of which the start CLI",
        median(vsc.clone()),
        median(rsc.clone()),
        "",
    );
    row(
        "exec true (running container)",
        mve,
        mre,
        &format!("ratio <= 20x: {}", verdict(mve / mre <= 20.0)),
    );
    row(
        &format!("{CONCURRENT} concurrent run: median each"),
        mc,
        mrcc,
        "",
    );
    row(
        &format!("{CONCURRENT} concurrent run: batch wall"),
        batch_ms,
        runc_batch_ms,
        "",
    );
    println!(
        "{:<44} {:>9.2}x {:>9.2}x {:>9}  vessel <= 6x: {}",
        "concurrent batch wall / sequential median",
        batch_ratio,
        runc_batch_ms / mr,
        "",
        verdict(batch_ratio <= 6.0)
    );
    println!(
        "{:<44} {:>9.2}x {:>9.2}x",
        "concurrent median each / sequential median",
        mc / mv,
        mrcc / mr
    );
    let mut json = serde_json::json!({
        "benchmark": "run",
        "runs": runs,
        "template_build_ms": template_ms,
        "vessel_run_ms": v,
        "runc_run_ms": r,
        "vessel_median_ms": mv,
        "template_build_nodax_ms": template_nodax_ms,
        "vessel_nodax_run_ms": d,
        "vessel_nodax_median_ms": md,
        "runc_median_ms": mr,
        "ratio": mv / mr,
        "vessel_create_ms": vc,
        "runc_create_ms": rc,
        "vessel_create_median_ms": mvc,
        "runc_create_median_ms": mrc,
        "vessel_start_cli_ms": vsc,
        "runc_start_cli_ms": rsc,
        "vessel_start_to_stopped_ms": vs,
        "runc_start_to_stopped_ms": rs,
        "vessel_start_to_stopped_median_ms": mvs,
        "runc_start_to_stopped_median_ms": mrs,
        "vessel_exec_ms": ve,
        "runc_exec_ms": re,
        "vessel_exec_median_ms": mve,
        "runc_exec_median_ms": mre,
        "exec_ratio": mve / mre,
        "concurrent": CONCURRENT,
        "concurrent_each_ms": each,
        "concurrent_batch_ms": batch_ms,
        "concurrent_batch_over_sequential": batch_ratio,
        "runc_concurrent_each_ms": runc_each,
        "runc_concurrent_batch_ms": runc_batch_ms,
        "targets": {
            "run_ratio_max": 40.0,
            "run_ratio_met": mv / mr <= 40.0,
            "create_max_ms": 500.0,
            "create_met": mvc <= 500.0,
            "exec_ratio_max": 20.0,
            "exec_ratio_met": mve / mre <= 20.0,
            "concurrent_batch_over_sequential_max": 6.0,
            "concurrent_met": batch_ratio <= 6.0,
        },
    });
    // Outside the macro, which reaches its recursion limit.
    json["loadavg_before"] = load_before.into();
    json["loadavg_after"] = load_after.into();
    let out = root.join("target/vessel/bench-run.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

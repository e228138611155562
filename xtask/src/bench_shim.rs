//! `cargo xtask bench shim [N]`: containerd 1.6 with vessel's shim v2
//! against runc, in one run of one containerd.
//!
//! Method: a private containerd (`vessel_tests::containerd`: its own
//! network namespace, root, state and socket) with
//! `containerd-shim-vessel-v2` on its PATH and `VESSEL_CONFIG` (templates
//! on) and `VESSEL_SHIM_ROOT` in its environment, which every shim and the
//! `vessel` binary the runc shim runs inherit; the busybox image (umoci
//! layout) in namespaces `default` and `k8s.io`, and a "pause" image built
//! from it; the CRI plugin with handlers `runc` (`io.containerd.runc.v2`)
//! and `vessel` (`io.containerd.vessel.v2`) and a CNI bridge + host-local
//! network inside containerd's namespace (as tests/tests/cri.rs).
//!
//! 1. `ctr run --rm IMAGE ID true`, timed from spawning `ctr` to its exit,
//!    through: the runc shim with runc (the reference); vessel's shim v2
//!    (`--runtime io.containerd.vessel.v2`); the runc shim with vessel as
//!    its runc binary (`--runc-binary target/release/vessel --runc-root
//!    DIR`). One warm-up each (vessel's first run builds its VM template),
//!    then N rounds alternating the three; median and min.
//! 2. A CRI pod with 1 and with 3 busybox `sleep` containers, handler
//!    `runc` and handler `vessel`: the time from calling RunPodSandbox to
//!    the last StartContainer's answer (CreateContainer and StartContainer
//!    one container after the other, as the kubelet does), then, 2 s later,
//!    the host memory of the pod: the sum of `Pss` in
//!    `/proc/PID/smaps_rollup` over the pod's shim (`-id <sandbox id>`)
//!    and every process below it (runc: the pause and container
//!    processes; vessel: the monitors and `vessel-vmm`), plus any other
//!    process carrying the bench's tag that is not containerd (a VMM
//!    reparented away from the shim). Then StopPodSandbox and
//!    RemovePodSandbox, and the bench waits for the pod's processes to
//!    go. N pods per row (no warm-up: the `ctr` runs warmed both
//!    runtimes); a row whose pod fails prints `n/a: <error>` and the bench
//!    goes on. A row of pods with no container (the sandbox alone:
//!    RunPodSandbox's time, the pause container's memory) comes first.
//!
//! Ratios are vessel over runc, both from this run. Every call has a
//! timeout (ctr 300 s, CRI 120 s).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vessel_tests::containerd::{Containerd, Options, IMAGE};
use vessel_tests::cri::{self, pb, Cri, K8S_NS, PAUSE_IMAGE};
use vessel_tests::engines::{leaks, poll_until, TAG_VAR};
use vessel_tests::{Artifacts, TempDir};

use crate::bench::{median, smaps_kib};
use crate::build;

/// The shim v2's runtime name.
const VESSEL_RUNTIME: &str = "io.containerd.vessel.v2";
/// The CNI network's name.
const CNI_NET: &str = "vessel-bench-shim";
/// The pods' subnet, inside containerd's network namespace only.
const SUBNET: &str = "10.91.0.0/24";
/// Bound of one `ctr` call.
const CTR_SECS: u64 = 300;
/// Bound of one CRI call (a VM boots in RunPodSandbox).
const CRI_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between the last container running and the memory sample.
const SETTLE: Duration = Duration::from_secs(2);

/// A way of running `ctr run --rm ... true`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Runc,
    Shim,
    RuncVessel,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Runc, Mode::Shim, Mode::RuncVessel];

    fn label(self) -> &'static str {
        match self {
            Mode::Runc => "runc shim + runc (reference)",
            Mode::Shim => "vessel shim v2",
            Mode::RuncVessel => "runc shim + vessel (--runc-binary)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Runc => "runc",
            Mode::Shim => "vessel_shim_v2",
            Mode::RuncVessel => "runc_shim_vessel",
        }
    }
}

/// Samples of one row, or why the row has none.
#[derive(Default)]
struct Row {
    secs: Vec<f64>,
    /// Pss of the pod's processes, MiB: total, shim, VMM, others.
    pss: Vec<Pss>,
    error: Option<String>,
}

#[derive(Clone, Copy, Default)]
struct Pss {
    shim: f64,
    vmm: f64,
    other: f64,
    procs: usize,
}

impl Pss {
    fn total(&self) -> f64 {
        self.shim + self.vmm + self.other
    }
}

pub fn run(root: &Path, rounds: usize) -> Result<()> {
    if rounds == 0 {
        bail!("bench shim needs at least one round");
    }
    crate::kernel::install_missing(
        &[
            "containerd",
            "runc",
            "umoci",
            "busybox-static",
            "iproute2",
            "containernetworking-plugins",
        ],
        "containerd and its runc shim (the reference), umoci and busybox (the image), CNI plugins (the pods' network)",
    )?;
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            bail!("/usr/lib/cni/{plugin} is missing (Debian's containernetworking-plugins)");
        }
    }
    let art = build::all(root)?;
    let shim = root.join("target/release/containerd-shim-vessel-v2");
    let vessel = root.join("target/release/vessel");
    for b in [&shim, &vessel] {
        if !b.is_file() {
            bail!("{} missing (cargo xtask build)", b.display());
        }
    }
    let t_all = Instant::now();
    let tmp = TempDir::new("bench-shim");
    let dir = tmp.0.clone();
    let tag = format!("bench-shim-{}", std::process::id());
    let (c, client) = setup(&art, tmp, &dir, &tag, &shim)?;
    let result = measure(&c, &client, &dir, &vessel, rounds);
    // What a failed step left in k8s.io (the fixture's drop cleans the
    // default namespace and the tagged processes).
    for p in client.list_pod_sandbox().unwrap_or_default() {
        let stop = client.stop_pod_sandbox(&p.id);
        let rm = client.remove_pod_sandbox(&p.id);
        eprintln!("cleanup: sandbox {}: stop {stop:?}, remove {rm:?}", p.id);
    }
    let (ctr_rows, pod_rows) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerd log:\n{}", c.log());
            return Err(e);
        }
    };
    drop(client);
    drop(c);
    report(root, rounds, &ctr_rows, &pod_rows, t_all.elapsed())
}

/// containerd with the CRI plugin and the vessel shim, the images, and a
/// CRI client once CRI knows them.
fn setup(
    art: &Artifacts,
    tmp: TempDir,
    dir: &Path,
    tag: &str,
    shim: &Path,
) -> Result<(Containerd, Cri)> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(shim, bin.join("containerd-shim-vessel-v2"))
        .context("linking the shim into containerd's PATH")?;
    // The templates of this worktree's tests, shared by the shim and by
    // vessel under the runc shim.
    let templates = vessel_tests::workspace_root().join("target/vessel/test-templates");
    let config = dir.join("vessel.toml");
    fs::write(&config, art.vessel_config(&templates, ""))?;
    let cni_conf = dir.join("cni-conf");
    let ipam_dir = dir.join("cni-ipam");
    fs::create_dir_all(&cni_conf)?;
    let bridge = format!("vbsh{}", std::process::id() % 100_000);
    fs::write(
        cni_conf.join("10-vessel-bench-shim.conflist"),
        cri::cni_conflist(CNI_NET, &bridge, SUBNET, &ipam_dir),
    )?;
    let opts = Options {
        bin: Some(&bin),
        env: vec![
            ("VESSEL_CONFIG", config.display().to_string()),
            (
                "VESSEL_SHIM_ROOT",
                dir.join("shim-root").display().to_string(),
            ),
        ],
        extra_config: cri::containerd_config(&cni_conf),
        tagged: true,
    };
    let t = Instant::now();
    let c = Containerd::start(tmp, tag, "bshim", &opts);
    let work = dir.join("image");
    fs::create_dir_all(&work)?;
    c.import_busybox(&work, K8S_NS);
    c.ctr(
        &[
            "images",
            "import",
            "--base-name",
            "docker.io/library/vessel-busybox",
            &work.join("layout.tar").to_string_lossy(),
        ],
        120,
    )
    .ok("ctr images import (default namespace)")
    .map_err(anyhow::Error::msg)?;
    cri::import_pause(&c, &work).map_err(anyhow::Error::msg)?;
    let client = Cri::connect(&c.sock)
        .map_err(|e| anyhow::anyhow!("CRI connect: {e}"))?
        .with_timeout(CRI_TIMEOUT);
    let mut version = client.version();
    if version.is_err() {
        poll_until(Duration::from_secs(30), || {
            version = client.version();
            version.is_ok().then_some(())
        });
    }
    version.map_err(|e| anyhow::anyhow!("CRI Version: {e}"))?;
    for image in [IMAGE, PAUSE_IMAGE] {
        let known = poll_until(Duration::from_secs(30), || {
            matches!(client.image_status(image), Ok(Some(_))).then_some(())
        });
        if known.is_none() {
            bail!("CRI does not know {image} after 30 s");
        }
    }
    eprintln!(
        "bench shim: containerd, images and CRI ready in {:.1?}",
        t.elapsed()
    );
    Ok((c, client))
}

type CtrRows = Vec<(Mode, Row)>;
type PodRows = Vec<(&'static str, usize, Row)>;

fn measure(
    c: &Containerd,
    cri: &Cri,
    dir: &Path,
    vessel: &Path,
    rounds: usize,
) -> Result<(CtrRows, PodRows)> {
    let runc_root = dir.join("runc-root").display().to_string();
    let vessel_s = vessel.display().to_string();
    let mut n = 0;
    let mut ctr_run = |mode: Mode| -> std::result::Result<f64, String> {
        n += 1;
        let id = format!("bshim-{}-{n}", mode.key());
        let mut args = vec!["run", "--rm"];
        match mode {
            Mode::Runc => {}
            Mode::Shim => args.extend(["--runtime", VESSEL_RUNTIME]),
            Mode::RuncVessel => args.extend([
                "--runc-binary",
                vessel_s.as_str(),
                "--runc-root",
                runc_root.as_str(),
            ]),
        }
        args.extend([IMAGE, id.as_str(), "true"]);
        let t = c.ctr(&args, CTR_SECS);
        if t.code() != 0 {
            // A failed run may leave its task and container.
            let _ = c.ctr(&["task", "rm", "-f", &id], 60);
            let _ = c.ctr(&["containers", "rm", &id], 60);
            return Err(t.describe(&format!("ctr run ({})", mode.label())));
        }
        Ok(t.took.as_secs_f64())
    };

    let mut ctr_rows: CtrRows = Mode::ALL.iter().map(|&m| (m, Row::default())).collect();
    let t = Instant::now();
    for (mode, row) in &mut ctr_rows {
        match ctr_run(*mode) {
            Ok(s) => eprintln!("warm-up {}: {s:.3} s", mode.label()),
            Err(e) => {
                eprintln!("warm-up {}: {e}", mode.label());
                row.error = Some(e);
            }
        }
    }
    eprintln!(
        "bench shim: warm-up (vessel's template build included) {:.1?}",
        t.elapsed()
    );
    for i in 0..rounds {
        let mut line = Vec::new();
        for (mode, row) in &mut ctr_rows {
            if row.error.is_some() {
                continue;
            }
            match ctr_run(*mode) {
                Ok(s) => {
                    line.push(format!("{} {s:.3} s", mode.key()));
                    row.secs.push(s);
                }
                Err(e) => {
                    eprintln!("{e}");
                    row.error = Some(e);
                }
            }
        }
        eprintln!("ctr round {}: {}", i + 1, line.join(", "));
    }

    let logs = dir.join("pod-logs");
    let mut pod_rows: PodRows = Vec::new();
    for handler in ["runc", "vessel"] {
        for size in [0, 1, 3] {
            let mut row = Row::default();
            for i in 0..rounds {
                let name = format!("bshim-{handler}-{size}-{i}");
                let log_dir = logs.join(&name);
                fs::create_dir_all(&log_dir)?;
                match pod(c, cri, handler, size, &name, &log_dir) {
                    Ok((s, pss)) => {
                        eprintln!(
                            "pod {handler} x{size} #{}: all running after {s:.3} s, Pss {:.1} MiB \
                             (shim {:.1}, VMM {:.1}, other {:.1}; {} processes)",
                            i + 1,
                            pss.total(),
                            pss.shim,
                            pss.vmm,
                            pss.other,
                            pss.procs
                        );
                        row.secs.push(s);
                        row.pss.push(pss);
                    }
                    Err(e) => {
                        eprintln!("pod {handler} x{size} #{}: {e}", i + 1);
                        row.error = Some(e);
                        break;
                    }
                }
            }
            pod_rows.push((handler, size, row));
        }
    }
    Ok((ctr_rows, pod_rows))
}

/// One pod of `size` containers with `handler`: seconds from RunPodSandbox
/// to the last container started, and the pod's Pss; the pod is gone
/// afterwards (also after an error).
fn pod(
    c: &Containerd,
    cri: &Cri,
    handler: &str,
    size: usize,
    name: &str,
    log_dir: &Path,
) -> std::result::Result<(f64, Pss), String> {
    let cfg = cri::pod_config(
        name,
        &format!("uid-{name}-{}", std::process::id()),
        name,
        log_dir,
    );
    let t0 = Instant::now();
    let id = cri
        .run_pod_sandbox(&cfg, handler)
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    let result = (|| {
        let mut ids = Vec::new();
        for k in 0..size {
            let cname = format!("c{k}");
            let ccfg =
                cri::container_config(&cname, IMAGE, &["sleep", "100000"], &format!("{cname}.log"));
            let cid = cri
                .create_container(&id, &ccfg, &cfg)
                .map_err(|e| format!("CreateContainer {cname}: {e}"))?;
            cri.start_container(&cid)
                .map_err(|e| format!("StartContainer {cname}: {e}"))?;
            ids.push(cid);
        }
        let secs = t0.elapsed().as_secs_f64();
        for cid in &ids {
            match cri.container_status(cid) {
                Ok(s) if s.state == pb::ContainerState::ContainerRunning as i32 => {}
                other => return Err(format!("container {cid} not running: {other:?}")),
            }
        }
        std::thread::sleep(SETTLE);
        Ok((secs, pod_pss(c, &id)?))
    })();
    let stop = cri.stop_pod_sandbox(&id);
    let rm = cri.remove_pod_sandbox(&id);
    let gone = poll_until(Duration::from_secs(30), || {
        pod_processes(c, &id).is_empty().then_some(())
    });
    if gone.is_none() {
        eprintln!(
            "warning: pod {name}'s processes still there 30 s after RemovePodSandbox: {:?}",
            pod_processes(c, &id)
        );
    }
    let (secs, pss) = result?;
    stop.map_err(|e| format!("StopPodSandbox: {e}"))?;
    rm.map_err(|e| format!("RemovePodSandbox: {e}"))?;
    Ok((secs, pss))
}

/// Every process's parent (from `/proc/PID/stat`).
fn parents() -> BTreeMap<i32, i32> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            out.insert(pid, ppid);
        }
    }
    out
}

fn cmdline(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// The pod's processes: its shim (a `containerd-shim` with `-id <pod>`),
/// all below it, and any other process with the bench's tag except
/// containerd and the shims of other pods.
fn pod_processes(c: &Containerd, pod: &str) -> BTreeSet<i32> {
    let tagged = leaks::tagged_processes(&c.tag);
    let is_shim = |cmd: &str| cmd.contains("containerd-shim");
    let shims: Vec<i32> = tagged
        .iter()
        .filter(|(_, cmd)| {
            let w: Vec<&str> = cmd.split_whitespace().collect();
            is_shim(cmd) && w.windows(2).any(|p| p[0] == "-id" && p[1] == pod)
        })
        .map(|(p, _)| *p)
        .collect();
    let parents = parents();
    let mut set: BTreeSet<i32> = shims.iter().copied().collect();
    loop {
        let before = set.len();
        for (&pid, ppid) in &parents {
            if set.contains(ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    let daemon = c.pid().and_then(|p| i32::try_from(p).ok());
    for (pid, cmd) in &tagged {
        if Some(*pid) != daemon && !is_shim(cmd) && !cmd.starts_with("ctr ") {
            set.insert(*pid);
        }
    }
    set
}

/// The Pss of [`pod_processes`], by kind.
fn pod_pss(c: &Containerd, pod: &str) -> std::result::Result<Pss, String> {
    let procs = pod_processes(c, pod);
    if !procs
        .iter()
        .any(|&p| cmdline(p).contains("containerd-shim"))
    {
        return Err(format!("no shim process with -id {pod} (tag {TAG_VAR})"));
    }
    let mut pss = Pss::default();
    for &pid in &procs {
        let Ok(upid) = u32::try_from(pid) else {
            continue;
        };
        // A kernel thread or a process gone meanwhile has none.
        let Some(kib) = smaps_kib(upid, "Pss") else {
            continue;
        };
        let mib = kib / 1024.0;
        let cmd = cmdline(pid);
        let exe = cmd.split_whitespace().next().unwrap_or("");
        if cmd.contains("containerd-shim") {
            pss.shim += mib;
        } else if exe.ends_with("vessel-vmm") {
            pss.vmm += mib;
        } else {
            pss.other += mib;
        }
        pss.procs += 1;
    }
    Ok(pss)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::min)
}

fn report(
    root: &Path,
    rounds: usize,
    ctr_rows: &CtrRows,
    pod_rows: &PodRows,
    took: Duration,
) -> Result<()> {
    let mut json = serde_json::Map::new();
    println!();
    println!(
        "bench shim: containerd 1.6, one daemon for every row; busybox image; {rounds} rounds; \
         ratios are vessel / runc from this run; load average at the end {}",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "1. `ctr run --rm IMAGE ID true`, ctr spawn to exit (median: the upper middle when N is even); one warm-up each, then {rounds} \
         rounds alternating the three:"
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9}",
        "runtime", "median", "min", "vs runc"
    );
    let reference = ctr_rows
        .iter()
        .find(|(m, _)| *m == Mode::Runc)
        .map(|(_, r)| median(r.secs.clone()))
        .unwrap_or(f64::NAN);
    for (mode, row) in ctr_rows {
        if let Some(e) = &row.error {
            println!("{:<36} n/a: {e}", mode.label());
            json.insert(
                format!("ctr_{}", mode.key()),
                serde_json::json!({ "error": e }),
            );
            continue;
        }
        let (m, lo) = (median(row.secs.clone()), min(&row.secs));
        println!(
            "{:<36} {m:>8.3}s {lo:>8.3}s {:>8.1}x",
            mode.label(),
            m / reference
        );
        json.insert(
            format!("ctr_{}", mode.key()),
            serde_json::json!({"secs": row.secs, "median_s": m, "min_s": lo, "vs_runc": m / reference}),
        );
    }
    println!();
    println!(
        "2. CRI pod of 0 (the sandbox alone), 1 or 3 busybox `sleep` containers: RunPodSandbox \
         to the last StartContainer answered ({rounds} pods per row);"
    );
    println!(
        "   Pss (MiB, median over the pods, {} s after) of the pod's shim and every process \
         below it (runc: pause + containers; vessel: monitors + vessel-vmm):",
        SETTLE.as_secs()
    );
    println!(
        "{:<8} {:>4} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "handler", "ctrs", "median", "min", "vs runc", "Pss MiB", "vs runc", "shim", "VMM", "other"
    );
    let find = |h: &str, size: usize| {
        pod_rows
            .iter()
            .find(|(hh, s, r)| *hh == h && *s == size && r.error.is_none())
            .map(|(_, _, r)| r)
    };
    for (handler, size, row) in pod_rows {
        let key = format!("pod_{handler}_{size}");
        if let Some(e) = &row.error {
            println!("{handler:<8} {size:>4} n/a: {e}");
            json.insert(key, serde_json::json!({ "error": e }));
            continue;
        }
        let m = median(row.secs.clone());
        let lo = min(&row.secs);
        let part = |f: fn(&Pss) -> f64| median(row.pss.iter().map(f).collect());
        let (total, shim, vmm, other) = (
            part(Pss::total),
            part(|p| p.shim),
            part(|p| p.vmm),
            part(|p| p.other),
        );
        let (rt, rp) = match find("runc", *size) {
            Some(r) => (
                m / median(r.secs.clone()),
                total / median(r.pss.iter().map(Pss::total).collect()),
            ),
            None => (f64::NAN, f64::NAN),
        };
        println!(
            "{handler:<8} {size:>4} {m:>8.3}s {lo:>8.3}s {rt:>7.1}x {total:>9.1} {rp:>7.1}x \
             {shim:>8.1} {vmm:>8.1} {other:>8.1}"
        );
        json.insert(
            key,
            serde_json::json!({"secs": row.secs, "median_s": m, "min_s": lo, "vs_runc": rt,
                "pss_mib": row.pss.iter().map(Pss::total).collect::<Vec<_>>(),
                "pss_median_mib": total, "pss_vs_runc": rp,
                "pss_shim_mib": shim, "pss_vmm_mib": vmm, "pss_other_mib": other}),
        );
    }
    println!();
    println!("whole bench: {:.0} s", took.as_secs_f64());
    let out = root.join("target/vessel/bench-shim.json");
    if let Some(d) = out.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!("(also written to {})", out.display());
    Ok(())
}

//! Kubernetes' CRI on containerd 1.6 (Debian's `containerd`), driven over
//! its gRPC API (`runtime.v1`) by the test client `vessel_tests::cri`:
//! one pod of two busybox containers, checked by [`pod_checks`] with the
//! runtime handler `runc`, and with `vessel` (runtime
//! `io.containerd.vessel.v2`, the shim v2: one VM for the pod).
//!
//! The test starts its own containerd in a network namespace (see
//! `vessel_tests::containerd`) whose CRI plugin has:
//! - `sandbox_image` a local "pause" image: the busybox image with
//!   `sleep` as its entrypoint (no registry is reachable);
//! - the runtime handlers `runc` (`io.containerd.runc.v2`) and `vessel`
//!   (`io.containerd.vessel.v2`, with `containerd-shim-vessel-v2` on
//!   containerd's PATH and `VESSEL_CONFIG`/`VESSEL_SHIM_ROOT` in its
//!   environment, as `shim_v2` does);
//! - CNI from Debian's `containernetworking-plugins` (`/usr/lib/cni`) with a
//!   `bridge` + `host-local` conflist the test writes into its own
//!   directory: the bridge is created in containerd's network namespace,
//!   never the host's (checked), without masquerading or port mappings,
//!   and host-local keeps its leases in the test's directory.
//!
//! What [`pod_checks`] does, with the time of each step printed as
//! `cri-timing handler=H step=S ms=N` (for a bench to read): RunPodSandbox,
//! CreateContainer/StartContainer of a web server (busybox `httpd` on
//! 127.0.0.1) and of an idle `sleep`, ExecSync in each (`uname -r`, the
//! exit code of `sh -c 'exit 3'`), the idle one fetches the web server's
//! page over localhost, both have the pod's hostname and the same IPC and
//! network namespaces, the pod's IP comes from the CNI bridge's subnet and
//! is the containers' `eth0`, one shim process serves the pod (and with
//! `vessel` one `vessel-vmm`), ContainerStats reports memory, the log file
//! is in CRI's format (`<RFC3339Nano> stdout F <line>`); StopContainer of
//! the idle one (SIGKILL after its grace period: 137) and RemoveContainer
//! (then NotFound); bad input (ExecSync
//! in an unknown container: NotFound; CreateContainer in a sandbox that
//! does not exist: an error, nothing created); StopPodSandbox,
//! RemovePodSandbox, and then no container, sandbox, task, shim, mount,
//! network namespace, IP lease or CNI result of the pod is left.
//!
//! Needs Debian's `containerd`, `runc`, `umoci`, `busybox-static`,
//! `iproute2` and `containernetworking-plugins`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vessel_tests::containerd::{Containerd, Options, IMAGE};
use vessel_tests::cri::{self, pb, Code, Cri, K8S_NS, PAUSE_IMAGE};
use vessel_tests::engines::{leaks, output_within, poll_until, require_tools};
use vessel_tests::{kvm_available_or_skip, workspace_root, Artifacts, TempDir};

/// containerd namespace of CRI's images and containers.
/// The sandbox ("pause") image the test builds and imports.
/// The CNI network's name (also the prefix of its cached results).
const CNI_NET: &str = "vessel-cri";
/// The pod subnet of the bridge, inside the test's network namespace only.
const SUBNET_PREFIX: &str = "10.89.0.";
/// The web container's port on the pod's localhost.
const PORT: u16 = 8080;
/// The page the web container serves.
const PAGE: &str = "hello-from-the-web-container";

/// What [`pod_checks`] needs to know besides the client.
struct PodEnv<'a> {
    c: &'a Containerd,
    /// The test's directory (mounts, logs, IPAM leases are under it).
    dir: &'a Path,
    /// Expected `uname -r` in the containers.
    release: String,
    /// The CNI bridge's name.
    bridge: String,
    /// host-local's lease directory.
    ipam_dir: PathBuf,
    /// `/var/lib/cni/results` entries before the pod.
    results_before: BTreeSet<String>,
    /// Directories that must be empty once the pod is gone: containerd's
    /// task bundles of namespace k8s.io, the vessel shim's state root.
    state_roots: Vec<PathBuf>,
}

/// Records each step's time as `cri-timing handler=H step=S ms=N`.
struct Steps {
    handler: String,
    last: Instant,
    start: Instant,
}

impl Steps {
    fn new(handler: &str) -> Steps {
        let now = Instant::now();
        Steps {
            handler: handler.into(),
            last: now,
            start: now,
        }
    }

    /// Prints the time since the previous step.
    fn done(&mut self, step: &str) {
        let now = Instant::now();
        eprintln!(
            "cri-timing handler={} step={step} ms={}",
            self.handler,
            now.duration_since(self.last).as_millis()
        );
        self.last = now;
    }

    /// Prints the time since the first step.
    fn total(&self, step: &str) {
        eprintln!(
            "cri-timing handler={} step={step} ms={}",
            self.handler,
            self.start.elapsed().as_millis()
        );
    }
}

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    leaks::entries(dir).into_iter().collect()
}

fn host_release() -> String {
    let o = Command::new("uname").arg("-r").output().expect("uname -r");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Whether `ts` looks like an RFC 3339 time with nanoseconds
/// (`2026-12-07T15:40:01.123456789Z` or with a `+hh:mm` offset).
fn is_rfc3339_nano(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (ts.ends_with('Z') || ts[19..].contains(['+', '-']))
}

/// Checks that CRI's log at `path` has a line `<RFC3339Nano> stdout F <line>`.
fn check_log(path: &Path, line: &str) -> Result<(), String> {
    let mut text = String::new();
    let found = poll_until(Duration::from_secs(10), || {
        text = fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .any(|l| {
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                f.len() == 4
                    && is_rfc3339_nano(f[0])
                    && f[1] == "stdout"
                    && f[2] == "F"
                    && f[3] == line
            })
            .then_some(())
    });
    found.ok_or_else(|| {
        format!(
            "{}: no `<RFC3339Nano> stdout F {line}` line in {text:?}",
            path.display()
        )
    })
}

/// One pod of two containers through CRI with runtime handler `handler`:
/// what failed, one line each (see the module's doc).
fn pod_checks(cri: &Cri, handler: &str, env: &PodEnv<'_>) -> Vec<String> {
    let mut failures = Vec::new();
    let mut fail = |f: String| {
        eprintln!("FAILED [{handler}]: {f}");
        failures.push(f);
    };
    let mut steps = Steps::new(handler);
    let logs = env.dir.join(format!("logs-{handler}"));
    fs::create_dir_all(&logs).expect("mkdir logs");
    let hostname = format!("pod-{handler}");
    let pod_cfg = cri::pod_config(
        &format!("cri-{handler}"),
        &format!("uid-{handler}-{}", std::process::id()),
        &hostname,
        &logs,
    );
    let pod = match cri.run_pod_sandbox(&pod_cfg, handler) {
        Ok(p) => p,
        Err(e) => {
            fail(format!("RunPodSandbox: {e}"));
            for l in leftovers(cri, env, None) {
                fail(l);
            }
            return failures;
        }
    };
    steps.done("RunPodSandbox");
    // CRI's network namespace of the pod (a bind mount under /run/netns),
    // which the leak check expects gone afterwards.
    let netns = pod_netns(cri, &pod);
    match &netns {
        Ok(p) if p.exists() => eprintln!("pod {pod}: netns {}", p.display()),
        other => fail(format!("the pod's network namespace: {other:?}")),
    }

    let web_cmd = format!(
        "echo serving; mkdir -p /tmp/www && echo {PAGE} > /tmp/www/index.html \
         && exec httpd -f -p 127.0.0.1:{PORT} -h /tmp/www"
    );
    let web_cfg = cri::container_config("web", IMAGE, &["sh", "-c", &web_cmd], "web.log");
    let idle_cfg = cri::container_config(
        "idle",
        IMAGE,
        &["sh", "-c", "echo idle; exec sleep 100000"],
        "idle.log",
    );
    let mut ids = Vec::new();
    let mut started = 0;
    for cfg in [&web_cfg, &idle_cfg] {
        let name = cfg
            .metadata
            .as_ref()
            .map_or("", |m| m.name.as_str())
            .to_string();
        match cri.create_container(&pod, cfg, &pod_cfg) {
            Ok(id) => {
                steps.done(&format!("CreateContainer-{name}"));
                match cri.start_container(&id) {
                    Ok(()) => {
                        steps.done(&format!("StartContainer-{name}"));
                        started += 1;
                    }
                    Err(e) => fail(format!("StartContainer {name}: {e}")),
                }
                ids.push(id);
            }
            Err(e) => fail(format!("CreateContainer {name}: {e}")),
        }
    }
    steps.total("all-running");
    if started < 2 {
        eprintln!("[{handler}] the checks of running containers skipped: {started} of 2 started");
    } else {
        container_checks(
            cri, handler, env, &pod, &ids, &hostname, &mut fail, &mut steps,
        );
        match check_log(&logs.join("web.log"), "serving") {
            Ok(()) => {}
            Err(e) => fail(e),
        }
        steps.done("log");

        // One container stopped and removed on its own: `sleep` as PID 1
        // ignores SIGTERM, so SIGKILL ends it after the 1 s grace period.
        let idle = ids.pop().unwrap_or_default();
        match cri.stop_container(&idle, 1) {
            Ok(()) => steps.done("StopContainer"),
            Err(e) => fail(format!("StopContainer idle: {e}")),
        }
        match cri.container_status(&idle) {
            Ok(s)
                if s.state == pb::ContainerState::ContainerExited as i32 && s.exit_code == 137 => {}
            other => fail(format!(
                "idle after StopContainer: {other:?}, want exited, 137"
            )),
        }
        match cri.remove_container(&idle) {
            Ok(()) => steps.done("RemoveContainer"),
            Err(e) => fail(format!("RemoveContainer idle: {e}")),
        }
        match cri.container_status(&idle) {
            Err(e) if e.code == Code::NotFound => {}
            other => fail(format!(
                "idle after RemoveContainer: {other:?}, want NotFound"
            )),
        }
        match cri.list_containers(&pod) {
            Ok(l) if l.iter().map(|c| &c.id).eq(ids.iter()) => {}
            other => fail(format!("containers of the pod: {other:?}, want {ids:?}")),
        }
    }

    // Bad input.
    match cri.exec_sync("no-such-container", &["true"], Duration::from_secs(5)) {
        Err(e) if e.code == Code::NotFound => {}
        other => fail(format!(
            "ExecSync in an unknown container: {other:?}, want NotFound"
        )),
    }
    let before = cri.list_containers("").map(|l| l.len());
    match cri.create_container("no-such-sandbox", &idle_cfg, &pod_cfg) {
        Err(e) if e.code == Code::NotFound => {}
        other => fail(format!(
            "CreateContainer in an unknown sandbox: {other:?}, want NotFound"
        )),
    }
    let after = cri.list_containers("").map(|l| l.len());
    if before != after {
        fail(format!(
            "CreateContainer in an unknown sandbox: containers {before:?} before, {after:?} after"
        ));
    }
    steps.done("bad-input");

    match cri.stop_pod_sandbox(&pod) {
        Ok(()) => steps.done("StopPodSandbox"),
        Err(e) => fail(format!("StopPodSandbox: {e}")),
    }
    for id in &ids {
        match cri.container_status(id) {
            Ok(s) if s.state == pb::ContainerState::ContainerExited as i32 => {}
            other => fail(format!("{id} after StopPodSandbox: {other:?}, want exited")),
        }
    }
    match cri.remove_pod_sandbox(&pod) {
        Ok(()) => steps.done("RemovePodSandbox"),
        Err(e) => fail(format!("RemovePodSandbox: {e}")),
    }
    steps.total("pod-lifetime");
    for l in leftovers(cri, env, netns.ok().as_deref()) {
        fail(l);
    }
    failures
}

/// The checks on the pod's two running containers `ids` (web, idle).
#[allow(clippy::too_many_arguments)]
fn container_checks(
    cri: &Cri,
    handler: &str,
    env: &PodEnv<'_>,
    pod: &str,
    ids: &[String],
    hostname: &str,
    fail: &mut impl FnMut(String),
    steps: &mut Steps,
) {
    let (web, idle) = (&ids[0], &ids[1]);
    let exec = |id: &str, cmd: &[&str]| cri.exec_sync(id, cmd, Duration::from_secs(20));
    for (name, id) in [("web", web), ("idle", idle)] {
        match cri.container_status(id) {
            Ok(s) if s.state == pb::ContainerState::ContainerRunning as i32 => {}
            other => fail(format!("{name}: status {other:?}, want running")),
        }
        match exec(id, &["uname", "-r"]) {
            Ok(r) if r.exit_code == 0 && r.stdout.trim() == env.release => {}
            other => fail(format!(
                "{name}: uname -r: {other:?}, want {:?}",
                env.release
            )),
        }
        match exec(id, &["sh", "-c", "exit 3"]) {
            Ok(r) if r.exit_code == 3 => {}
            other => fail(format!("{name}: sh -c 'exit 3': {other:?}, want exit 3")),
        }
    }
    steps.done("ExecSync");

    // The idle container reaches the web server over the pod's localhost.
    let url = format!("http://127.0.0.1:{PORT}/");
    let mut last = None;
    let got = poll_until(Duration::from_secs(30), || {
        let r = exec(idle, &["timeout", "5", "wget", "-q", "-O", "-", &url]);
        let ok = matches!(&r, Ok(r) if r.exit_code == 0 && r.stdout.trim() == PAGE);
        last = Some(r);
        ok.then_some(())
    });
    if got.is_none() {
        fail(format!("idle: wget {url}: {last:?}, want {PAGE:?}"));
    }
    steps.done("localhost-fetch");

    let same = |what: &str, cmd: &[&str], want: Option<&str>, fail: &mut dyn FnMut(String)| {
        let a = exec(web, cmd).map(|r| r.stdout.trim().to_string());
        let b = exec(idle, cmd).map(|r| r.stdout.trim().to_string());
        match (&a, &b) {
            (Ok(a), Ok(b)) if a == b && !a.is_empty() && want.is_none_or(|w| w == a) => {}
            _ => fail(format!(
                "{what}: web {a:?}, idle {b:?}, want the same{}",
                want.map(|w| format!(" {w:?}")).unwrap_or_default()
            )),
        }
    };
    same("hostname", &["hostname"], Some(hostname), fail);
    same(
        "IPC namespace",
        &["readlink", "/proc/self/ns/ipc"],
        None,
        fail,
    );
    same(
        "network namespace",
        &["readlink", "/proc/self/ns/net"],
        None,
        fail,
    );

    // Each container has its own PID namespace (Kubernetes' default).
    let pid_ns = |id: &str| exec(id, &["readlink", "/proc/self/ns/pid"]).map(|r| r.stdout);
    match (pid_ns(web), pid_ns(idle)) {
        (Ok(a), Ok(b)) if a != b && !a.trim().is_empty() => {}
        other => fail(format!(
            "PID namespaces: {other:?}, want two different ones"
        )),
    }

    // The pod's IP: from the bridge's subnet, and the containers' eth0.
    match cri.pod_sandbox_status(pod) {
        Ok(s) => {
            let ip = s.network.map(|n| n.ip).unwrap_or_default();
            eprintln!("pod {pod}: ip {ip:?}, handler {:?}", s.runtime_handler);
            if !ip.starts_with(SUBNET_PREFIX) {
                fail(format!("pod IP {ip:?} is not in {SUBNET_PREFIX}0/24"));
            }
            match exec(web, &["ip", "-4", "-o", "addr", "show", "eth0"]) {
                Ok(r) if r.stdout.contains(&format!(" {ip}/24 ")) => {}
                other => fail(format!("eth0 of the pod: {other:?}, want {ip}/24")),
            }
            if !env.ipam_dir.join(CNI_NET).join(&ip).exists() {
                fail(format!(
                    "no host-local lease {ip} in {}",
                    env.ipam_dir.join(CNI_NET).display()
                ));
            }
            if s.state != pb::PodSandboxState::SandboxReady as i32 {
                fail(format!("pod state {}, want ready", s.state));
            }
        }
        Err(e) => fail(format!("PodSandboxStatus: {e}")),
    }
    if let Some(ns) = env.c.netns() {
        let inside = output_within(
            Command::new("ip").args(["-n", &ns.name, "link", "show", &env.bridge]),
            Duration::from_secs(10),
        );
        if inside.ok("ip link show").is_err() {
            fail(format!(
                "bridge {} not in the test's netns: {}",
                env.bridge, inside.stderr
            ));
        }
    }
    let host = output_within(
        Command::new("ip").args(["link", "show", &env.bridge]),
        Duration::from_secs(10),
    );
    if host.ok("ip link show").is_ok() {
        fail(format!(
            "bridge {} is on the host: {}",
            env.bridge, host.stdout
        ));
    }
    steps.done("namespaces-and-network");

    // One shim for the pod (and with vessel one VMM).
    let procs = leaks::tagged_processes(&env.c.tag);
    let shims: Vec<_> = procs
        .iter()
        .filter(|(_, c)| c.contains("containerd-shim"))
        .collect();
    if shims.len() != 1 {
        fail(format!(
            "{} shim processes for the pod, want 1: {shims:?}",
            shims.len()
        ));
    }
    if handler == "vessel" {
        let vmms: Vec<_> = procs
            .iter()
            .filter(|(_, c)| c.contains("vessel-vmm"))
            .collect();
        if vmms.len() != 1 {
            fail(format!(
                "{} vessel-vmm processes for the pod, want 1: {vmms:?}",
                vmms.len()
            ));
        }
    }

    for (name, id) in [("web", web), ("idle", idle)] {
        match cri.container_stats(id) {
            Ok(s) => {
                let m = s.memory.unwrap_or_default();
                let ws = m.working_set_bytes.as_ref().map_or(0, |v| v.value);
                let usage = m.usage_bytes.as_ref().map_or(0, |v| v.value);
                eprintln!("{name}: ContainerStats memory working set {ws}, usage {usage}");
                if ws == 0 && usage == 0 {
                    fail(format!("{name}: ContainerStats without memory: {m:?}"));
                }
            }
            Err(e) => fail(format!("{name}: ContainerStats: {e}")),
        }
    }
    steps.done("ContainerStats");

    // UpdateContainerResources: a new memory limit, seen in the
    // container's own cgroup.
    let limit: i64 = 48 << 20;
    let updated = cri.update_container_resources(
        idle,
        pb::LinuxContainerResources {
            memory_limit_in_bytes: limit,
            ..Default::default()
        },
    );
    // The container's own cgroup: v2 in the guest; v1 or v2 as the host
    // has it with runc.
    let max =
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes";
    match (updated, exec(idle, &["sh", "-c", max])) {
        (Ok(()), Ok(r)) if r.stdout.trim() == limit.to_string() => {}
        other => fail(format!(
            "UpdateContainerResources memory {limit}: {other:?}"
        )),
    }
    steps.done("UpdateContainerResources");
}

/// The network namespace path in the verbose PodSandboxStatus of `pod`.
fn pod_netns(cri: &Cri, pod: &str) -> Result<PathBuf, String> {
    let info = cri.pod_sandbox_info(pod).map_err(|e| e.to_string())?;
    let json = info.get("info").ok_or("no `info` in the verbose status")?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("info: {e}"))?;
    // containerd 1.6: the network namespace of the sandbox's runtime spec.
    v.pointer("/runtimeSpec/linux/namespaces")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))
        .and_then(|n| n.get("path"))
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        // /var/run is /run: the mount table names the latter.
        .map(|p| fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)))
        .ok_or_else(|| format!("no network namespace path in {json:.300}"))
}

/// What the pod (whose network namespace was `netns`) left behind, one
/// line each (polled for 20 s).
fn leftovers(cri: &Cri, env: &PodEnv<'_>, netns: Option<&Path>) -> Vec<String> {
    let find = || -> Vec<String> {
        let mut f = Vec::new();
        match cri.list_containers("") {
            Ok(l) if l.is_empty() => {}
            other => f.push(format!("CRI containers: {other:?}")),
        }
        match cri.list_pod_sandbox() {
            Ok(l) if l.is_empty() => {}
            other => f.push(format!("CRI sandboxes: {other:?}")),
        }
        for what in ["containers", "tasks"] {
            let l = env.c.ctr(&["-n", K8S_NS, what, "ls", "-q"], 30).stdout;
            if !l.trim().is_empty() {
                f.push(format!("{what} in {K8S_NS}: {l:?}"));
            }
        }
        // containerd carries the tag too (its shims inherit it from it).
        let daemon = env.c.pid().map(|p| format!("process {p}:"));
        let roots: Vec<&Path> = env.state_roots.iter().map(PathBuf::as_path).collect();
        let mut l = leaks::find(&env.c.tag, &[env.dir], &roots);
        if let Some(d) = &daemon {
            l.retain(|x| !x.starts_with(d.as_str()));
        }
        f.extend(l);
        if let Some(n) = netns {
            if n.exists() {
                f.push(format!("netns {}", n.display()));
            }
            f.extend(
                leaks::mounts_under(&[n])
                    .into_iter()
                    .map(|m| format!("mount {m}")),
            );
        }
        let results = dir_entries(Path::new("/var/lib/cni/results"));
        f.extend(
            results
                .difference(&env.results_before)
                .filter(|r| r.starts_with(CNI_NET))
                .map(|r| format!("CNI result {r}")),
        );
        for d in leaks::entries(&env.ipam_dir.join(CNI_NET)) {
            if d.parse::<std::net::IpAddr>().is_ok() {
                f.push(format!("IP lease {d}"));
            }
        }
        f
    };
    let mut last = Vec::new();
    let clean = poll_until(Duration::from_secs(20), || {
        last = find();
        last.is_empty().then_some(())
    });
    if clean.is_some() {
        Vec::new()
    } else {
        last.into_iter()
            .map(|l| format!("left behind: {l}"))
            .collect()
    }
}

#[test]
fn cri_pod_with_runc_and_vessel() {
    require_tools(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("umoci", "umoci"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ]);
    for plugin in ["bridge", "host-local", "loopback"] {
        assert!(
            Path::new("/usr/lib/cni").join(plugin).exists(),
            "/usr/lib/cni/{plugin} is missing: install Debian's containernetworking-plugins"
        );
    }
    // vessel's handler needs /dev/kvm (skipped only with VESSEL_SKIP_KVM=1).
    let with_vessel = kvm_available_or_skip();
    let tmp = TempDir::new("cri");
    let dir = tmp.0.clone();
    let tag = format!("cri-{}", std::process::id());
    let bridge = format!("vcri{}", std::process::id() % 100_000);
    let cni_conf = dir.join("cni-conf");
    let ipam_dir = dir.join("cni-ipam");
    fs::create_dir_all(&cni_conf).expect("mkdir cni-conf");
    fs::write(
        cni_conf.join("10-vessel-cri.conflist"),
        cri::cni_conflist(CNI_NET, &bridge, &format!("{SUBNET_PREFIX}0/24"), &ipam_dir),
    )
    .expect("write conflist");

    // The vessel handler, wired as in shim_v2: the shim on containerd's
    // PATH, its config and state root in containerd's environment.
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    let shim_root = dir.join("shim-root");
    let mut shim_env = Vec::new();
    let mut guest = None;
    let shim = workspace_root().join("target/release/containerd-shim-vessel-v2");
    match Artifacts::locate() {
        Ok(art) if shim.exists() => {
            std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-vessel-v2"))
                .expect("symlink");
            let config = dir.join("vessel.toml");
            fs::write(&config, art.vessel_config(&dir.join("templates"), "")).expect("vessel.toml");
            shim_env.push(("VESSEL_CONFIG", config.display().to_string()));
            shim_env.push(("VESSEL_SHIM_ROOT", shim_root.display().to_string()));
            guest = Some(vessel_tests::guest_release(&art.kernel));
        }
        other => {
            let why = other
                .err()
                .unwrap_or_else(|| format!("{} missing", shim.display()));
            assert!(!with_vessel, "{why} (run `cargo xtask build`)");
            eprintln!("handler vessel not wired: {why}");
        }
    }
    let opts = Options {
        bin: Some(&bin),
        env: shim_env,
        extra_config: cri::containerd_config(&cni_conf),
        tagged: true,
    };
    let t0 = Instant::now();
    let c = Containerd::start(tmp, &tag, "cri", &opts);
    let results_before = dir_entries(Path::new("/var/lib/cni/results"));
    eprintln!(
        "cri-timing step=containerd-start ms={}",
        t0.elapsed().as_millis()
    );
    let work = dir.join("image");
    fs::create_dir_all(&work).expect("mkdir image");
    c.import_busybox(&work, K8S_NS);
    cri::import_pause(&c, &work).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("cri-timing step=images ms={}", t0.elapsed().as_millis());

    let client = Cri::connect(&c.sock).unwrap_or_else(|e| panic!("CRI connect: {e}"));
    // The CRI service answers once its plugin is initialized.
    let mut version = client.version();
    if version.is_err() {
        poll_until(Duration::from_secs(30), || {
            version = client.version();
            version.is_ok().then_some(())
        });
    }
    eprintln!("CRI Version: {version:?}");
    let mut failures = Vec::new();
    match &version {
        Ok((name, _, api)) if name == "containerd" && api == "v1" => {}
        other => failures.push(format!("Version: {other:?}, want containerd and v1")),
    }
    // CRI learns of imported images through containerd's events.
    for image in [IMAGE, PAUSE_IMAGE] {
        let mut last = Ok(None);
        let known = poll_until(Duration::from_secs(30), || {
            last = client.image_status(image);
            matches!(last, Ok(Some(_))).then_some(())
        });
        assert!(
            known.is_some(),
            "CRI does not know {image}: {last:?}\n{}",
            c.log()
        );
    }

    let mut env = PodEnv {
        c: &c,
        dir: &dir,
        release: String::new(),
        bridge,
        ipam_dir,
        results_before,
        state_roots: vec![
            dir.join("state/io.containerd.runtime.v2.task").join(K8S_NS),
            shim_root.clone(),
        ],
    };
    let mut handlers = vec![("runc", host_release())];
    if with_vessel {
        handlers.push(("vessel", guest.clone().unwrap_or_default()));
    }
    for (handler, release) in handlers {
        env.release = release;
        // A VM boots in each sandbox: minutes on the slowest hosts.
        let slow;
        let cri = if handler == "vessel" {
            slow = Cri::connect(&c.sock)
                .unwrap_or_else(|e| panic!("CRI connect: {e}"))
                .with_timeout(Duration::from_secs(300));
            &slow
        } else {
            &client
        };
        let f = pod_checks(cri, handler, &env);
        failures.extend(f.into_iter().map(|f| format!("[{handler}] {f}")));
    }
    if !failures.is_empty() {
        eprintln!("containerd log:\n{}", c.log());
        eprintln!("{}", c.shim_logs(K8S_NS));
        // The fixture's drop cleans containerd's default namespace only:
        // take down through CRI what a failed check left (its network
        // namespace in /run/netns above all).
        for p in client.list_pod_sandbox().unwrap_or_default() {
            let stop = client.stop_pod_sandbox(&p.id);
            let rm = client.remove_pod_sandbox(&p.id);
            eprintln!("cleanup: sandbox {}: stop {stop:?}, remove {rm:?}", p.id);
        }
    }
    drop(client);
    drop(c);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

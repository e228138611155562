//! Fault injection through the `vessel` CLI, against one template: the
//! container's `vessel-vmm` or its monitor killed with SIGKILL while the
//! container runs, the VMM killed during an exec (which must end, non-zero)
//! and while the container is only created.
//! Each time `state` says `stopped`, the pid in `--pid-file` (the monitor)
//! exits (137 where the container was killed), `exec` fails at once,
//! `delete` succeeds without `--force`, and nothing is left: no VMM, no
//! monitor, nothing under `--root` or the run directory.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vessel_tests::cli::{busybox_rootfs, processes_mentioning, read_pid, reap, runc_spec, CliEnv};
use vessel_tests::kvm_available_or_skip;

/// The pid of container `id`'s VMM (its serial log lives in the state
/// directory, which is on the VMM's command line).
fn vmm_of(env: &CliEnv, id: &str) -> i32 {
    let dir = env.root.join(id).to_string_lossy().into_owned() + "/";
    let pids = processes_mentioning("vessel-vmm", &dir);
    assert_eq!(pids.len(), 1, "VMMs of {id}: {pids:?}");
    pids[0]
}

/// `vessel VERB --bundle BUNDLE --pid-file F ID` (`VERB`: `run -d` or
/// `create`), which must succeed; the monitor's pid from `F`.
fn launch(env: &CliEnv, verb: &str, bundle: &str, id: &str) -> i32 {
    let pf = env.tmp.join(format!("{id}.pid"));
    let pf_arg = pf.to_string_lossy().into_owned();
    let mut args: Vec<&str> = verb.split(' ').collect();
    args.extend(["--bundle", bundle, "--pid-file", &pf_arg, id]);
    let (st, err) = env.detached(&args);
    assert!(st.success(), "{verb} {id}: {err}");
    read_pid(Path::new(&pf))
}

fn kill9(pid: i32) {
    // SAFETY: kill with a pid and a signal number only.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
}

/// Polls `state ID` until it says `stopped` (at most `limit`).
fn wait_stopped(env: &CliEnv, id: &str, limit: Duration) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = env.state(id);
        if s["status"] == "stopped" {
            return s;
        }
        assert!(t.elapsed() < limit, "{id} not stopped after {limit:?}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `exec` into the dead container fails, `delete` (no --force) succeeds,
/// and nothing of it is left.
fn check_gone(env: &CliEnv, id: &str) {
    let t = Instant::now();
    let o = env.output(&["exec", id, "true"]);
    assert!(!o.status.success(), "exec into dead {id} succeeded");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "exec into dead {id} took {:?}",
        t.elapsed()
    );
    let o = env.output(&["delete", id]);
    assert!(
        o.status.success(),
        "delete {id}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!env.output(&["state", id]).status.success());
    let dir = env.root.join(id).to_string_lossy().into_owned() + "/";
    let t = Instant::now();
    loop {
        let left = processes_mentioning(&dir, "");
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "processes of {id} left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !env.root_entries().contains(&id.to_string()),
        "{:?}",
        env.root_entries()
    );
}

#[test]
fn killed_vmms_and_monitors_leave_a_stopped_container_and_nothing_else() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("faults", "");
    busybox_rootfs(&env.tmp.join("rootfs"), &["sleep", "true"]);
    let b = env.write_bundle(
        "sleeper",
        &runc_spec(&env.tmp.join("rootfs"), &["sleep", "1000"]),
    );
    let pid_file = |id: &str| env.tmp.join(format!("{id}.pid"));

    // 1. The VMM of a running container dies.
    let monitor = launch(&env, "run -d", &b, "vmm-running");
    assert_eq!(env.state("vmm-running")["status"], "running");
    kill9(vmm_of(&env, "vmm-running"));
    assert_eq!(reap(monitor, Duration::from_secs(60)), 137);
    let s = wait_stopped(&env, "vmm-running", Duration::from_secs(30));
    assert_eq!(s["exitStatus"].as_i64(), Some(137), "{s}");
    check_gone(&env, "vmm-running");

    // 2. The monitor of a running container dies: its VMM goes too.
    let monitor = launch(&env, "run -d", &b, "monitor-running");
    let vmm = vmm_of(&env, "monitor-running");
    kill9(monitor);
    assert_eq!(reap(monitor, Duration::from_secs(60)), 137);
    // The test is the subreaper (CliEnv::new): the orphaned VMM becomes
    // our child, and it must end by itself (its parent-death signal).
    assert_eq!(
        reap(vmm, Duration::from_secs(30)),
        137,
        "the VMM {vmm} outlived its monitor"
    );
    wait_stopped(&env, "monitor-running", Duration::from_secs(30));
    check_gone(&env, "monitor-running");

    // 3. The VMM dies during an exec: the exec ends too, non-zero.
    let monitor = launch(&env, "run -d", &b, "vmm-exec");
    // `--pid-file` is written once the exec's process runs in the guest.
    let exec_pf = pid_file("vmm-exec-process");
    let mut exec = env
        .cmd(&[
            "exec",
            "--pid-file",
            &exec_pf.to_string_lossy(),
            "vmm-exec",
            "sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vessel exec");
    let t = Instant::now();
    while !exec_pf.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the exec did not start in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill9(vmm_of(&env, "vmm-exec"));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = exec.try_wait().expect("wait for vessel exec") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "vessel exec still runs 30 s after its VMM died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "exec into a killed VM: {status}");
    assert_eq!(reap(monitor, Duration::from_secs(60)), 137);
    wait_stopped(&env, "vmm-exec", Duration::from_secs(30));
    check_gone(&env, "vmm-exec");

    // 4. The VMM of a created (never started) container dies.
    let monitor = launch(&env, "create", &b, "vmm-created");
    kill9(vmm_of(&env, "vmm-created"));
    reap(monitor, Duration::from_secs(60));
    wait_stopped(&env, "vmm-created", Duration::from_secs(30));
    let o = env.output(&["start", "vmm-created"]);
    assert!(!o.status.success(), "start of a dead container succeeded");
    check_gone(&env, "vmm-created");

    assert!(env.vmms().is_empty(), "VMMs left: {:?}", env.vmms());
    assert!(
        env.monitors().is_empty(),
        "monitors left: {:?}",
        env.monitors()
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.run_entries().is_empty(), "{:?}", env.run_entries());
}

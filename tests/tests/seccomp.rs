//! seccomp in containers, against one booted microVM with a busybox root
//! filesystem over virtio-fs. Three container starts and one exec:
//!
//! 0. No filter: the baseline of a dd doing 2000 system calls.
//! 1. Docker's default profile (`tests/data/seccomp-docker-default.json`,
//!    rendered from moby's `profiles/seccomp/default.json` for a container
//!    with Docker's default capabilities by `tests/data/render-docker-seccomp.py`),
//!    with `noNewPrivileges`: a busybox workload (ls, cat, a shell loop,
//!    mkdir and a file in /tmp) works; `unshare -U` (no capability needed
//!    without seccomp) fails with EPERM; an exec into the container runs
//!    under the same filter and is refused the same way.
//! 2. A deny-list profile without `noNewPrivileges` (loaded before the
//!    capabilities are dropped): `mkdir` fails with the profile's errnoRet
//!    (EREMOTEIO), `sync` is SCMP_ACT_KILL_PROCESS -> status 159 (128+31).
//! 3. Invalid profiles (argument index 6, unknown operator, unknown action,
//!    SCMP_ACT_NOTIFY) fail `create` with a clear error and leave nothing
//!    behind.
//!
//! Output checks look for marker lines, never for the whole output.
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_proto::container::{
    CreateContainerRequest, ExecProcessRequest, SignalProcessRequest, StdioSpec, StdioStream,
};
use vessel_proto::ErrorCode;
use vessel_tests::cli::busybox_rootfs;
use vessel_tests::guest::{self, drain, read_guest, read_until, remote_code};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

/// Where the test mounts the rootfs share in the guest.
const ROOTFS: &str = "/run/rootfs";

const APPLETS: [&str; 14] = [
    "sh", "cat", "echo", "sleep", "ls", "grep", "mkdir", "mount", "unshare", "sync", "true", "id",
    "dd", "time",
];

/// 1000 one-byte reads and writes: the cost of the filter per system call
/// (busybox `time` prints `real\t0m 1.23s`).
const DD: &str = "time dd if=/dev/zero of=/dev/null bs=1 count=1000";

/// Docker's default capabilities.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A runc-like `config.json` running `args` under `seccomp`.
fn spec(args: &[&str], seccomp: Value) -> Value {
    let caps = json!(DEFAULT_CAPS);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "sec",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "network"}],
            "resources": {"pids": {"limit": 64}},
            "seccomp": seccomp
        }
    })
}

fn create_req(id: &str, spec: Value, stdout: bool) -> CreateContainerRequest {
    let stdio = StdioSpec {
        stdout,
        ..StdioSpec::default()
    };
    guest::create_req(id, ROOTFS, spec, stdio)
}

/// Attaches the stdout of `id`/`exec`.
fn attach_stdout(vm: &VmProcess, id: &str, exec: Option<&str>) -> UnixStream {
    guest::attach(vm, id, exec, StdioStream::Stdout)
}

/// The line of `out` that starts with `prefix`.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {out:?}"))
}

/// The duration `time` reported (`real\t0m 1.23s`).
fn dd_seconds(out: &str) -> Option<f64> {
    let l = out.lines().find(|l| l.starts_with("real"))?;
    let mut w = l.split_whitespace().skip(1);
    let min: f64 = w.next()?.strip_suffix('m')?.parse().ok()?;
    let sec: f64 = w.next()?.strip_suffix('s')?.parse().ok()?;
    Some(min * 60.0 + sec)
}

fn docker_profile() -> Value {
    let path = vessel_tests::workspace_root().join("tests/data/seccomp-docker-default.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("docker profile")
}

/// The workload run under Docker's profile; every step prints a marker.
const WORKLOAD: &str = "exec 2>&1
time dd if=/dev/zero of=/dev/null bs=1 count=1000
ls / >/dev/null && echo LS=ok
grep '^Seccomp' /proc/self/status
i=0; while [ $i -lt 20 ]; do i=$((i+1)); done; echo LOOP=$i
mkdir /tmp/d && echo hello > /tmp/d/f && echo CAT=$(cat /tmp/d/f)
( true ) && echo SUBSHELL=ok
unshare -U true; echo UNSHARE=$?
echo WORKLOAD_DONE
exec sleep 1000";

#[test]
fn seccomp_profiles_apply_in_containers() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = TempDir::new("seccomp");
    busybox_rootfs(&root.0, &APPLETS);
    let opts = VmOptions {
        mem_mib: 256,
        shares: vec![format!("rootfs={}", root.0.display())],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::spawn(&art, &opts).expect("spawn vessel-vmm");
    let mut c = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    c.set_timeout(Some(Duration::from_secs(600))).unwrap();
    c.mount("rootfs", ROOTFS, false)
        .expect("mount the rootfs share");
    let mounts_before = read_guest(&mut c, "/proc/self/mountinfo").expect("mountinfo");
    let mut ids: Vec<String> = Vec::new();

    // 0. Baseline without a filter: dd's time per system call.
    let id = "plain";
    let mut s = spec(&["sh", "-c", &format!("exec 2>&1; {DD}")], json!(null));
    s["linux"].as_object_mut().expect("linux").remove("seccomp");
    let out = drain(attach_stdout(&vm, id, None));
    c.create_container(create_req(id, s, true))
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let exit = c.wait_process(id, None).expect("wait plain");
    c.delete_container(id, false).expect("delete plain");
    let got = out.join().unwrap();
    assert_eq!(exit.status, 0, "{got}");
    let dd_plain = dd_seconds(&got);
    ids.push(id.into());

    // 1. Docker's default profile: the workload works, unshare is refused.
    let id = "docker";
    let mut out = attach_stdout(&vm, id, None);
    let t = Instant::now();
    c.create_container(create_req(
        id,
        spec(&["sh", "-c", WORKLOAD], docker_profile()),
        true,
    ))
    .unwrap_or_else(|e| panic!("create {id}: {e}"));
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let got = read_until(&mut out, "WORKLOAD_DONE");
    eprintln!(
        "docker profile: workload done after {:?}:\n{got}",
        t.elapsed()
    );
    assert_eq!(line(&got, "LS="), "LS=ok");
    let dd_docker = dd_seconds(&got);
    // Seccomp: 2 (filter mode), one filter.
    assert_eq!(
        line(&got, "Seccomp:").split_whitespace().nth(1),
        Some("2"),
        "{got}"
    );
    assert_eq!(line(&got, "LOOP="), "LOOP=20");
    assert_eq!(line(&got, "CAT="), "CAT=hello");
    assert_eq!(line(&got, "SUBSHELL="), "SUBSHELL=ok");
    assert_ne!(line(&got, "UNSHARE="), "UNSHARE=0", "{got}");
    assert!(
        got.lines()
            .any(|l| l.starts_with("unshare:") && l.contains("Operation not permitted")),
        "unshare -U was not refused with EPERM: {got}"
    );

    // An exec runs under the same filter.
    let exec_out = drain(attach_stdout(&vm, id, Some("e1")));
    c.exec_process(ExecProcessRequest {
        id: id.into(),
        exec_id: "e1".into(),
        process: json!({
            "args": ["sh", "-c", "exec 2>&1; grep '^Seccomp:' /proc/self/status; unshare -U true; echo EXEC_UNSHARE=$?; mkdir /tmp/e && echo EXEC_MKDIR=ok"],
            "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        }),
        stdio: StdioSpec {
            stdout: true,
            ..StdioSpec::default()
        },
    })
    .expect("exec");
    let exit = c.wait_process(id, Some("e1")).expect("wait exec");
    let eout = exec_out.join().unwrap();
    eprintln!("exec under the docker profile: {exit:?}:\n{eout}");
    assert_eq!(exit.status, 0, "{eout}");
    assert_eq!(
        line(&eout, "Seccomp:").split_whitespace().nth(1),
        Some("2"),
        "{eout}"
    );
    assert_ne!(line(&eout, "EXEC_UNSHARE="), "EXEC_UNSHARE=0", "{eout}");
    assert!(eout.contains("Operation not permitted"), "{eout}");
    assert_eq!(line(&eout, "EXEC_MKDIR="), "EXEC_MKDIR=ok");
    c.signal_process(SignalProcessRequest {
        id: id.into(),
        exec_id: None,
        signal: 9,
        all: false,
    })
    .expect("kill -9");
    assert_eq!(c.wait_process(id, None).expect("wait").status, 137);
    c.delete_container(id, false).expect("delete docker");
    drop(out);
    ids.push(id.into());

    // 2. Deny-list without noNewPrivileges: custom errno, KILL_PROCESS.
    let id = "deny";
    let deny = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 121},
            {"names": ["sync", "syncfs"], "action": "SCMP_ACT_KILL_PROCESS"}
        ]
    });
    let mut s = spec(
        &[
            "sh",
            "-c",
            &format!("exec 2>&1; {DD}; mkdir /tmp/x; echo MKDIR=$?; echo BEFORE_SYNC; exec sync"),
        ],
        deny,
    );
    s["process"]["noNewPrivileges"] = json!(false);
    let out = drain(attach_stdout(&vm, id, None));
    c.create_container(create_req(id, s, true))
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let exit = c.wait_process(id, None).expect("wait deny");
    c.delete_container(id, false).expect("delete deny");
    let got = out.join().unwrap();
    eprintln!("deny-list: {exit:?}:\n{got}");
    assert!(got.contains("Remote I/O error"), "mkdir's errno: {got}");
    assert_eq!(line(&got, "MKDIR="), "MKDIR=1");
    assert!(got.contains("BEFORE_SYNC"), "{got}");
    assert_eq!((exit.status, exit.signal), (159, Some(31)), "{got}");
    ids.push(id.into());
    eprintln!(
        "dd, 1000 x (read + write), seconds: no filter {dd_plain:?}, deny-list {:?}, docker default {dd_docker:?}",
        dd_seconds(&got)
    );

    // 3. Invalid profiles: create fails, nothing is left behind.
    let bad = |syscalls: Value| json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": syscalls});
    for (i, (profile, want_code, want)) in [
        (
            bad(json!([{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}])),
            ErrorCode::InvalidRequest,
            "argument index 6 out of 0..=5",
        ),
        (
            bad(json!([{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_ABOUT"}]}])),
            ErrorCode::InvalidRequest,
            "SCMP_CMP_ABOUT",
        ),
        (
            bad(json!([{"names": ["read"], "action": "SCMP_ACT_MAYBE"}])),
            ErrorCode::InvalidRequest,
            "unknown action \"SCMP_ACT_MAYBE\"",
        ),
        (
            bad(json!([{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}])),
            ErrorCode::Unsupported,
            "SCMP_ACT_NOTIFY",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("bad{i}");
        let (code, msg) =
            remote_code(c.create_container(create_req(&id, spec(&["true"], profile), false)));
        eprintln!("invalid profile {i}: {code:?}: {msg}");
        assert_eq!(code, want_code, "{msg}");
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        ids.push(id);
    }

    // Nothing left behind.
    for id in &ids {
        assert!(
            read_guest(&mut c, &format!("/sys/fs/cgroup/vessel/{id}/cgroup.procs")).is_err(),
            "cgroup of {id} left behind"
        );
        let (code, _) = remote_code(c.container_state(id));
        assert_eq!(code, ErrorCode::NotFound);
    }
    let mounts_after = read_guest(&mut c, "/proc/self/mountinfo").expect("mountinfo");
    assert_eq!(mounts_before, mounts_after);

    c.shutdown().expect("shutdown");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("VMM did not exit after Shutdown");
    assert!(
        status.success(),
        "VMM exit status {status}: {}",
        vm.stderr()
    );
}

//! Boots one microVM with a busybox root filesystem shared over virtio-fs
//! and checks containers against that one boot: create+start+wait of
//! `true` (timed) and `exit 3`; `kill -9` of a sleeping container -> 137;
//! stdout and stderr kept apart; stdin piped through `cat`; env, cwd and
//! hostname applied; an exec sees the init's pid namespace; a read-only
//! rootfs refuses writes; without CAP_CHOWN `chown` fails; a memory limit
//! OOM-kills and the status says so; terminal mode with a resize; a rootfs
//! share mounted by the agent itself; bad input gets clear errors; after
//! delete no cgroup and no mount is left in the guest.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_proto::client::AgentClient;
use vessel_proto::container::{
    ContainerStatus, CreateContainerRequest, ExecProcessRequest, ProcessExit,
    ResizeTerminalRequest, RootfsSource, SignalProcessRequest, StdioSpec, StdioStream,
};
use vessel_proto::ErrorCode;
use vessel_tests::cli::busybox_rootfs;
use vessel_tests::guest::{self, attach, drain, read_guest, read_until, remote_code};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

/// Where the test mounts the rootfs share in the guest.
const ROOTFS: &str = "/run/rootfs";

const APPLETS: [&str; 15] = [
    "sh", "cat", "echo", "sleep", "chown", "touch", "hostname", "pwd", "true", "ls", "id", "env",
    "mount", "grep", "stty",
];

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

/// A runc-like `config.json` running `args`.
fn spec(args: &[&str]) -> Value {
    let caps = json!(DEFAULT_CAPS);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "ctr",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "network"}, {"type": "cgroup"}],
            "resources": {"pids": {"limit": 64}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus"]
        }
    })
}

/// A `CreateContainer` of `id` in the rootfs the test mounted.
fn create_req(id: &str, spec: Value, stdio: StdioSpec) -> CreateContainerRequest {
    guest::create_req(id, ROOTFS, spec, stdio)
}

/// Output and exit of one container run.
struct Run {
    exit: ProcessExit,
    out: String,
    err: String,
    create: Duration,
    create_guest_us: u64,
    /// `StartContainer` answered (the process was executed).
    start: Duration,
    start_to_exit: Duration,
}

/// Runs a container to completion: attach stdout/stderr (and stdin when
/// given), create, start, feed stdin, wait, delete.
fn run(c: &mut AgentClient, vm: &VmProcess, id: &str, spec: Value, stdin: Option<&[u8]>) -> Run {
    let out = drain(attach(vm, id, None, StdioStream::Stdout));
    let err = drain(attach(vm, id, None, StdioStream::Stderr));
    let input = stdin.map(|_| attach(vm, id, None, StdioStream::Stdin));
    let stdio = StdioSpec {
        stdin: stdin.is_some(),
        stdout: true,
        stderr: true,
        terminal: false,
    };
    let t = Instant::now();
    let created = c
        .create_container(create_req(id, spec, stdio))
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    let create = t.elapsed();
    assert!(created.pid > 1);
    let t = Instant::now();
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let start = t.elapsed();
    if let (Some(mut s), Some(bytes)) = (input, stdin) {
        s.write_all(bytes).unwrap();
        // Dropping the stream closes it: EOF for the process.
    }
    let exit = c
        .wait_process(id, None)
        .unwrap_or_else(|e| panic!("wait {id}: {e}"));
    let start_to_exit = t.elapsed();
    c.delete_container(id, false)
        .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    Run {
        exit,
        out: out.join().unwrap(),
        err: err.join().unwrap(),
        create,
        create_guest_us: created.elapsed_us,
        start,
        start_to_exit,
    }
}

/// The guest kernel's lines about crashed user processes, for messages.
fn kernel_faults(vm: &VmProcess) -> String {
    vm.serial_output()
        .lines()
        .filter(|l| {
            l.contains("segfault") || l.contains("trap") || l.contains("general protection")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn containers_run_in_the_guest() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = TempDir::new("ctr");
    busybox_rootfs(&root.0, &APPLETS);
    let opts = VmOptions {
        mem_mib: 256,
        // The same tree twice: once mounted by the test for most
        // containers, once mounted by the agent for one container (tag).
        shares: vec![
            format!("rootfs={}", root.0.display()),
            format!("rootfs2={}", root.0.display()),
        ],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::spawn(&art, &opts).expect("spawn vessel-vmm");
    let mut c = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", vm.started.elapsed());
    c.set_timeout(Some(Duration::from_secs(600))).unwrap();
    c.mount("rootfs", ROOTFS, false)
        .expect("mount the rootfs share");
    let mounts_before = read_guest(&mut c, "/proc/self/mountinfo").expect("mountinfo");
    let mut ids = Vec::new();

    // `true`, timed: create, start -> exit; the full spec (twice), then
    // with a network namespace of its own (by default containers share the
    // VM's), then a minimal one (pid + mount, /proc only).
    let mut own_net = spec(&["true"]);
    own_net["annotations"] = json!({"vessel.netns": "private"});
    let mut minimal = spec(&["true"]);
    minimal["linux"] = json!({"namespaces": [{"type": "pid"}, {"type": "mount"}]});
    minimal["mounts"] = json!([{"destination": "/proc", "type": "proc", "source": "proc"}]);
    minimal["hostname"] = json!(null);
    for (i, (what, s)) in [
        ("full", spec(&["true"])),
        ("full", spec(&["true"])),
        ("own netns", own_net),
        ("minimal", minimal),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("true{i}");
        let r = run(&mut c, &vm, &id, s, None);
        assert_eq!(r.exit.status, 0, "{}", r.err);
        eprintln!(
            "true ({what}): create {:?} (guest {} ms), start {:?}, start->exit {:?}, total {:?}",
            r.create,
            r.create_guest_us / 1000,
            r.start,
            r.start_to_exit,
            r.create + r.start_to_exit
        );
        ids.push(id);
    }

    // A rootfs share the agent mounts itself (and unmounts on delete).
    let mut req = create_req(
        "tagged",
        spec(&["sh", "-c", "exit 5"]),
        StdioSpec::default(),
    );
    req.rootfs = RootfsSource {
        tag: Some("rootfs2".into()),
        path: "/run/vessel/tagged/rootfs".into(),
    };
    c.create_container(req).expect("create with a rootfs tag");
    c.start_container("tagged").expect("start tagged");
    assert_eq!(c.wait_process("tagged", None).expect("wait").status, 5);
    c.delete_container("tagged", false).expect("delete tagged");
    ids.push("tagged".into());

    // Exit codes.
    let r = run(&mut c, &vm, "exit3", spec(&["sh", "-c", "exit 3"]), None);
    assert_eq!((r.exit.status, r.exit.signal), (3, None), "{}", r.err);
    ids.push("exit3".into());

    // stdout and stderr apart.
    let r = run(
        &mut c,
        &vm,
        "io",
        spec(&["sh", "-c", "echo out; echo err >&2; echo out2"]),
        None,
    );
    assert_eq!(r.exit.status, 0);
    assert_eq!(r.out, "out\nout2\n");
    assert_eq!(r.err, "err\n");
    ids.push("io".into());

    // stdin through cat.
    let r = run(&mut c, &vm, "cat", spec(&["cat"]), Some(b"hello stdin\n"));
    assert_eq!(r.exit.status, 0, "{}", r.err);
    assert_eq!(r.out, "hello stdin\n");
    ids.push("cat".into());

    // env, cwd, hostname.
    let mut s = spec(&["sh", "-c", "echo $FOO; pwd; hostname"]);
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["cwd"] = json!("/tmp");
    s["hostname"] = json!("ctr-env");
    let r = run(&mut c, &vm, "env", s, None);
    assert_eq!(r.exit.status, 0, "{}", r.err);
    assert_eq!(r.out, "bar\n/tmp\nctr-env\n");
    ids.push("env".into());

    // Read-only rootfs.
    let r = run(
        &mut c,
        &vm,
        "ro",
        spec(&["sh", "-c", "echo x > /newfile"]),
        None,
    );
    assert_ne!(r.exit.status, 0);
    assert!(r.err.contains("Read-only file system"), "{}", r.err);
    assert!(!root.0.join("newfile").exists());
    ids.push("ro".into());

    // Capabilities: chown works with CAP_CHOWN, fails without.
    let chown = ["sh", "-c", "touch /tmp/f && chown 1:1 /tmp/f"];
    let r = run(&mut c, &vm, "chown-ok", spec(&chown), None);
    assert_eq!(r.exit.status, 0, "{}", r.err);
    let mut s = spec(&chown);
    let caps: Vec<&str> = DEFAULT_CAPS
        .iter()
        .copied()
        .filter(|c| *c != "CAP_CHOWN")
        .collect();
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set] = json!(caps);
    }
    let r = run(&mut c, &vm, "chown-no", s, None);
    assert_ne!(r.exit.status, 0);
    assert!(r.err.contains("Operation not permitted"), "{}", r.err);
    ids.extend(["chown-ok".to_string(), "chown-no".to_string()]);

    // A long-running container: state, exec into it, ps, kill -9 -> 137.
    let id = "sleeper";
    c.create_container(create_req(
        id,
        spec(&["sleep", "1000"]),
        StdioSpec::default(),
    ))
    .expect("create sleeper");
    let st = c.container_state(id).unwrap();
    assert_eq!(st.status, ContainerStatus::Created);
    let (code, msg) = remote_code(c.exec_process(ExecProcessRequest {
        id: id.into(),
        exec_id: "early".into(),
        process: json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
        stdio: StdioSpec::default(),
    }));
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    c.start_container(id).expect("start sleeper");
    let (code, msg) = remote_code(c.start_container(id));
    assert_eq!(code, ErrorCode::FailedPrecondition, "start twice: {msg}");
    eprintln!("start twice: {msg}");
    assert_eq!(
        c.container_state(id).unwrap().status,
        ContainerStatus::Running
    );
    let out = drain(attach(&vm, id, Some("e1"), StdioStream::Stdout));
    let t = Instant::now();
    let pid = c
        .exec_process(ExecProcessRequest {
            id: id.into(),
            exec_id: "e1".into(),
            process: json!({
                "args": ["sh", "-c", "echo $$; cat /proc/1/cmdline; echo; hostname"],
                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
            }),
            stdio: StdioSpec {
                stdout: true,
                ..StdioSpec::default()
            },
        })
        .expect("exec");
    let exec_exit = c.wait_process(id, Some("e1")).expect("wait exec");
    eprintln!("exec: start->exit {:?}", t.elapsed());
    assert!(pid > 1);
    assert_eq!(
        exec_exit.status,
        0,
        "exec: {exec_exit:?}; {}",
        kernel_faults(&vm)
    );
    let out = out.join().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    let ns_pid: i32 = lines[0].parse().unwrap_or_else(|_| panic!("{out:?}"));
    assert!(
        ns_pid > 1 && ns_pid < 100,
        "exec's pid in the container: {ns_pid}"
    );
    assert_eq!(lines[1], "sleep\u{0}1000\u{0}", "{out:?}");
    assert_eq!(lines[2], "ctr");
    // Once waited for, an exec's id is free again (as containerd reuses
    // exec ids after their exit).
    c.exec_process(ExecProcessRequest {
        id: id.into(),
        exec_id: "e1".into(),
        process: json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
        stdio: StdioSpec::default(),
    })
    .expect("exec id reused after its wait");
    let again = c.wait_process(id, Some("e1")).expect("wait reused exec");
    assert_eq!(again.status, 0, "{again:?}");
    let (code, msg) = remote_code(c.exec_process(ExecProcessRequest {
        id: id.into(),
        exec_id: "e2".into(),
        process: json!({"args": ["nosuchprogram"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
        stdio: StdioSpec::default(),
    }));
    assert_eq!(code, ErrorCode::Internal);
    assert!(msg.contains("executable file not found"), "{msg}");
    let pids = c.list_processes(id).unwrap();
    let st = c.container_state(id).unwrap();
    assert_eq!(pids, vec![st.pid], "ps");
    let (code, msg) = remote_code(c.delete_container(id, false));
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    // Duplicate id.
    let (code, msg) =
        remote_code(c.create_container(create_req(id, spec(&["true"]), StdioSpec::default())));
    assert_eq!(code, ErrorCode::AlreadyExists, "{msg}");
    c.signal_process(SignalProcessRequest {
        id: id.into(),
        exec_id: None,
        signal: 9,
        all: false,
    })
    .expect("kill -9");
    let exit = c.wait_process(id, None).expect("wait sleeper");
    assert_eq!(
        (exit.status, exit.signal, exit.oom_killed),
        (137, Some(9), false)
    );
    let st = c.container_state(id).unwrap();
    assert_eq!(st.status, ContainerStatus::Stopped);
    assert_eq!(st.exit.map(|e| e.status), Some(137));
    let (code, _) = remote_code(c.start_container(id));
    assert_eq!(code, ErrorCode::FailedPrecondition);
    c.delete_container(id, false).expect("delete sleeper");
    ids.push(id.into());

    // Terminal mode: a guest pty, its size from consoleSize, then resized.
    let mut s = spec(&["sh", "-c", "stty size; read x; stty size"]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    let mut term = attach(&vm, "tty", None, StdioStream::Terminal);
    let stdio = StdioSpec {
        terminal: true,
        ..StdioSpec::default()
    };
    c.create_container(create_req("tty", s, stdio))
        .expect("create tty");
    c.start_container("tty").expect("start tty");
    read_until(&mut term, "24 80");
    c.resize_terminal(ResizeTerminalRequest {
        id: "tty".into(),
        exec_id: None,
        rows: 30,
        cols: 100,
    })
    .expect("resize");
    term.write_all(b"\n").unwrap();
    read_until(&mut term, "30 100");
    let exit = c.wait_process("tty", None).expect("wait tty");
    assert_eq!(exit.status, 0);
    c.delete_container("tty", false).expect("delete tty");
    ids.push("tty".into());

    // A created (never started) container is deleted without force.
    c.create_container(create_req("created", spec(&["true"]), StdioSpec::default()))
        .expect("create");
    c.delete_container("created", false)
        .expect("delete a created container");
    ids.push("created".into());

    // Bad input.
    let (code, msg) = remote_code(c.start_container("nope"));
    assert_eq!(code, ErrorCode::NotFound);
    assert!(msg.contains("nope"), "{msg}");
    let (code, _) = remote_code(c.wait_process("nope", None));
    assert_eq!(code, ErrorCode::NotFound);
    let (code, msg) = remote_code(c.create_container(create_req(
        "bad-spec",
        json!({"process": {"args": [], "cwd": "/"}}),
        StdioSpec::default(),
    )));
    assert_eq!(code, ErrorCode::InvalidRequest, "{msg}");
    let mut missing = create_req("no-rootfs", spec(&["true"]), StdioSpec::default());
    missing.rootfs.path = "/nonexistent".into();
    let (code, msg) = remote_code(c.create_container(missing));
    assert_eq!(code, ErrorCode::Internal);
    eprintln!("missing rootfs: {msg}");
    let (code, msg) = remote_code(c.create_container(create_req(
        "no-exe",
        spec(&["nosuchprogram"]),
        StdioSpec::default(),
    )));
    assert_eq!(code, ErrorCode::Internal);
    assert!(msg.contains("executable file not found"), "{msg}");
    let (code, msg) = remote_code(c.create_container(create_req(
        "no-stdout",
        spec(&["true"]),
        StdioSpec {
            stdout: true,
            ..StdioSpec::default()
        },
    )));
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    ids.extend(["bad-spec", "no-rootfs", "no-exe", "no-stdout"].map(String::from));

    // Memory limit: OOM-killed, and the status says so. Last of the
    // workloads: right after it, an exec has been seen to die with SIGSEGV
    // (under investigation; see the issue notes), so the other checks do
    // not run in a guest that just went through an OOM kill.
    let mut s = spec(&[
        "sh",
        "-c",
        "x=0123456789abcdef; while true; do x=$x$x; done",
    ]);
    s["linux"]["resources"]["memory"] = json!({"limit": 6 << 20, "swap": 6 << 20});
    let t = Instant::now();
    let r = run(&mut c, &vm, "oom", s, None);
    eprintln!("oom container ended after {:?}: {:?}", t.elapsed(), r.exit);
    assert_eq!(r.exit.status, 137, "{}", r.err);
    assert!(r.exit.oom_killed, "{:?}", r.exit);
    ids.push("oom".into());

    // Nothing left behind: no container cgroup, the agent's mounts as
    // before, every id free again.
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

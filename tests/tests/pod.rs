//! Pods through the `vessel` CLI (`create --sandbox SB`, issue 16): a
//! sandbox container (`sleep`) and a second container created inside the
//! sandbox's VM, joining its IPC and UTS namespaces by the paths an engine
//! would give (`/proc/<sandbox pid>/ns/...`). One `vessel-vmm` for both;
//! same IPC and UTS namespace, distinct mount namespaces and root file
//! systems (a file written on the host in the second rootfs is seen by the
//! second container only); its files are mounted in the VMM's mount
//! namespace only, and unmounted by its delete; kill + delete of the
//! second container leaves the sandbox running; its bind mounts, pause,
//! resume and ps work; a third container joins the sandbox's pid and
//! network namespaces and exits with 137 when the sandbox's VM is killed;
//! a member the guest refuses after its files were mounted leaves nothing;
//! a sandbox that does not exist, or one that is itself a member, is a
//! clear error that leaves nothing; at the end no VMM, state, socket or
//! mount is left.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::time::{Duration, Instant};

use serde_json::json;
use vessel_tests::cli::{busybox_rootfs, read_pid, reap, runc_spec, CliEnv};
use vessel_tests::kvm_available_or_skip;

const APPLETS: [&str; 5] = ["sh", "sleep", "cat", "readlink", "true"];

/// `vessel exec ID args...`, which must succeed; its trimmed stdout.
fn exec(env: &CliEnv, id: &str, args: &[&str]) -> String {
    let mut a = vec!["exec", id];
    a.extend_from_slice(args);
    env.ok(&a).0.trim().to_string()
}

/// Mount points in `pid`'s mount namespace whose path contains `needle`.
fn mounts_of(pid: i32, needle: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_second_container_runs_in_the_sandbox_vm() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("pod", "");
    let (r1, r2) = (env.tmp.join("rootfs-sb"), env.tmp.join("rootfs-c2"));
    busybox_rootfs(&r1, &APPLETS);
    busybox_rootfs(&r2, &APPLETS);

    // The sandbox.
    let b1 = env.write_bundle("b-sb", &runc_spec(&r1, &["sleep", "1000"]));
    let sb_pidfile = env.tmp.join("sb.pid");
    let t = Instant::now();
    let (st, err) = env.detached(&[
        "create",
        "--bundle",
        &b1,
        "--pid-file",
        &sb_pidfile.to_string_lossy(),
        "sb",
    ]);
    assert!(st.success(), "create sb: {err}");
    env.ok(&["start", "sb"]);
    eprintln!("sandbox created and started: {:?}", t.elapsed());
    let sb_pid = read_pid(&sb_pidfile);
    let vmms = env.vmms();
    assert_eq!(vmms.len(), 1, "{vmms:?}");

    // Bad input: a sandbox that does not exist.
    let mut s2 = runc_spec(&r2, &["sleep", "1000"]);
    let b_bad = env.write_bundle("b-bad", &s2);
    let e = env.fails(&["create", "--sandbox", "nosuch", "--bundle", &b_bad, "c3"]);
    assert!(
        e.contains("sandbox container") && e.contains("nosuch") && e.contains("does not exist"),
        "{e}"
    );
    assert_eq!(env.root_entries(), ["sb"], "{:?}", env.root_entries());

    // The second container: the sandbox's IPC and UTS namespaces (its host
    // name is the sandbox's: no hostname of its own), a mount and pid
    // namespace of its own.
    s2.as_object_mut().unwrap().remove("hostname");
    // Host bind mounts of its own (engines give /etc/hosts and volumes so).
    let (vol, greeting) = (env.tmp.join("vol"), env.tmp.join("greeting"));
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(&greeting, "hello bind\n").unwrap();
    let mounts = s2["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/vol", "type": "bind", "source": vol,
                       "options": ["rbind", "rw"]}));
    mounts.push(
        json!({"destination": "/etc/greeting", "type": "bind", "source": greeting,
                       "options": ["bind", "ro"]}),
    );
    s2["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "network"},
        {"type": "ipc", "path": format!("/proc/{sb_pid}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{sb_pid}/ns/uts")},
    ]);
    let b2 = env.write_bundle("b-c2", &s2);
    let c2_pidfile = env.tmp.join("c2.pid");
    let t = Instant::now();
    let (st, err) = env.detached(&[
        "create",
        "--sandbox",
        "sb",
        "--bundle",
        &b2,
        "--pid-file",
        &c2_pidfile.to_string_lossy(),
        "c2",
    ]);
    assert!(st.success(), "create --sandbox sb c2: {err}");
    env.ok(&["start", "c2"]);
    eprintln!(
        "second container created and started in the sandbox: {:?}",
        t.elapsed()
    );
    let c2_pid = read_pid(&c2_pidfile);
    assert_eq!(env.state("c2")["status"], "running");
    assert_eq!(env.vmms(), vmms, "one VMM for the pod");
    // Its files are mounted in the VMM's mount namespace, not in ours.
    let stage = env.state("c2")["pod"]["stage"]
        .as_str()
        .unwrap()
        .to_string();
    let stage = format!("/sb/mounts/{stage}/rootfs");
    assert_eq!(mounts_of(vmms[0], &stage).len(), 1, "{stage}");
    assert!(mounts_of(std::process::id() as i32, &stage).is_empty());

    // Shared IPC and UTS namespaces, distinct mount namespaces.
    let ns = |id: &str, t: &str| exec(&env, id, &["readlink", &format!("/proc/self/ns/{t}")]);
    assert_eq!(ns("sb", "ipc"), ns("c2", "ipc"));
    assert_eq!(ns("sb", "uts"), ns("c2", "uts"));
    assert_ne!(ns("sb", "mnt"), ns("c2", "mnt"));
    // Distinct root file systems: a file written on the host in the second
    // one is seen there only.
    std::fs::write(r2.join("tmp/from-host"), "hello pod\n").unwrap();
    assert_eq!(exec(&env, "c2", &["cat", "/tmp/from-host"]), "hello pod");
    let o = env.output(&["exec", "sb", "cat", "/tmp/from-host"]);
    assert!(!o.status.success(), "the sandbox sees c2's file");
    // Its bind mounts: read-only and read-write, written through to the host.
    assert_eq!(exec(&env, "c2", &["cat", "/etc/greeting"]), "hello bind");
    exec(&env, "c2", &["sh", "-c", "echo from-c2 > /vol/out"]);
    assert_eq!(
        std::fs::read_to_string(vol.join("out")).unwrap(),
        "from-c2\n"
    );
    let o = env.output(&["exec", "c2", "sh", "-c", "echo x > /etc/greeting"]);
    assert!(!o.status.success(), "a read-only bind is writable");
    // Pause, resume and ps reach the member in the sandbox's VM.
    env.ok(&["pause", "c2"]);
    assert_eq!(env.state("c2")["status"], "paused");
    env.ok(&["resume", "c2"]);
    let (ps, _) = env.ok(&["ps", "--format", "json", "c2"]);
    let pids: Vec<i32> = serde_json::from_str(&ps).expect("ps JSON");
    assert_eq!(pids.len(), 1, "{pids:?}");
    // A member the guest refuses (after its files were mounted in the
    // VMM): a clear error, and nothing of it is left.
    let mut bad = runc_spec(&r2, &["true"]);
    bad["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/vol", "type": "bind", "source": vol,
                     "options": ["rbind", "rw"]}));
    bad["linux"]["sysctl"] = json!({"vm.overcommit_memory": "1"});
    let b_refused = env.write_bundle("b-refused", &bad);
    let e = env.fails(&["create", "--sandbox", "sb", "--bundle", &b_refused, "c4"]);
    assert!(e.contains("not in a separate kernel namespace"), "{e}");
    let mut left = env.root_entries();
    left.sort();
    assert_eq!(left, ["c2", "sb"]);
    let staged: Vec<_> = std::fs::read_dir(env.root.join("sb/mounts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(mounts_of(vmms[0], "/sb/mounts/").len(), 3);
    // A member cannot be a sandbox.
    let e = env.fails(&["create", "--sandbox", "c2", "--bundle", &b_bad, "c9"]);
    assert!(e.contains("runs in the sandbox of sb"), "{e}");

    // Killing and deleting the second container leaves the sandbox running.
    env.ok(&["kill", "c2", "KILL"]);
    assert_eq!(reap(c2_pid, Duration::from_secs(60)), 137);
    assert_eq!(env.state("c2")["status"], "stopped");
    env.ok(&["delete", "c2"]);
    assert!(
        mounts_of(vmms[0], &stage).is_empty(),
        "c2's rootfs is still mounted"
    );
    assert_eq!(env.root_entries(), ["sb"]);
    assert_eq!(env.state("sb")["status"], "running");
    assert_eq!(exec(&env, "sb", &["cat", "/proc/self/comm"]), "cat");
    assert_eq!(env.vmms(), vmms);

    // A third container joins the sandbox's pid namespace (a pod sharing
    // its process namespace) and the pod's network namespace, given as CRI
    // does (a CNI path on the host): its pid 1 is the sandbox's init.
    let mut s3 = runc_spec(&r2, &["sleep", "1000"]);
    s3.as_object_mut().unwrap().remove("hostname");
    s3["linux"]["namespaces"] = json!([
        {"type": "mount"}, {"type": "uts"}, {"type": "ipc"},
        {"type": "pid", "path": format!("/proc/{sb_pid}/ns/pid")},
        {"type": "network", "path": "/var/run/netns/cni-pod-test"},
    ]);
    let b3 = env.write_bundle("b-c3", &s3);
    let c3_pidfile = env.tmp.join("c3.pid");
    let (st, err) = env.detached(&[
        "create",
        "--sandbox",
        "sb",
        "--bundle",
        &b3,
        "--pid-file",
        &c3_pidfile.to_string_lossy(),
        "c3",
    ]);
    assert!(st.success(), "create --sandbox sb c3: {err}");
    env.ok(&["start", "c3"]);
    let c3_pid = read_pid(&c3_pidfile);
    assert_eq!(
        exec(&env, "c3", &["cat", "/proc/1/cmdline"]),
        "sleep\u{0}1000\u{0}".trim()
    );
    assert_eq!(ns("sb", "pid"), ns("c3", "pid"));
    assert_eq!(ns("sb", "net"), ns("c3", "net"));
    assert_ne!(ns("sb", "ipc"), ns("c3", "ipc"));

    // The whole pod goes: ending the VM ends the member too (137).
    env.ok(&["kill", "sb", "KILL"]);
    assert_eq!(reap(sb_pid, Duration::from_secs(60)), 137);
    assert_eq!(reap(c3_pid, Duration::from_secs(60)), 137);
    assert_eq!(env.state("c3")["status"], "stopped");
    env.ok(&["delete", "c3"]);
    env.ok(&["delete", "sb"]);
    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(env.run_entries().is_empty(), "{:?}", env.run_entries());
    let mine = mounts_of(std::process::id() as i32, &env.tmp.to_string_lossy());
    assert!(mine.is_empty(), "mounts left: {mine:?}");
}

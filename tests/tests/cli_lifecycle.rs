//! The runc lifecycle through the `vessel` binary, against a config file
//! pointing at this build's artifacts (templates on, so every container
//! after the first is restored from the template): `run` of
//! `echo hi; exit 3` prints and exits 3; `run` of `true` (timed);
//! `create` + `state` + `start` + `kill KILL` -> the monitor (the pid in
//! `--pid-file`) exits 137 and the state is `stopped`; `delete` of a running
//! container without `--force` fails, `run --detach` + `delete --force`
//! cleans up, a created container is deleted without `--force`; bad input (missing config.json, duplicate id, start of an
//! unknown id) fails and leaves nothing behind; at the end no VMM of the
//! test runs and `--root` is empty.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_tests::cli::{busybox_rootfs, read_pid, reap, runc_spec, text, CliEnv};
use vessel_tests::kvm_available_or_skip;

const APPLETS: [&str; 6] = ["sh", "echo", "true", "sleep", "cat", "awk"];

/// A bundle named `name` running `args` in the shared root file system.
fn bundle(env: &CliEnv, name: &str, args: &[&str]) -> String {
    env.write_bundle(name, &runc_spec(&env.tmp.join("rootfs"), args))
}

#[test]
fn runc_lifecycle_through_the_microvm() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("cli", "");
    busybox_rootfs(&env.tmp.join("rootfs"), &APPLETS);

    // Foreground run: output and exit status (the first one builds the
    // template).
    let b = bundle(&env, "b-hi", &["sh", "-c", "echo hi; exit 3"]);
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "hi"]);
    eprintln!(
        "first vessel run (template build included unless another test built it): {:?}",
        t.elapsed()
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );

    let b = bundle(&env, "b-true", &["true"]);
    let t = Instant::now();
    // --no-new-keyring is accepted (the guest kernel has no keyrings).
    // A 64-hex id under a root as long as dockerd's: the socket paths
    // must still fit.
    let long_id = "0123456789abcdef".repeat(4);
    let o = env.output(&["run", "--no-new-keyring", "--bundle", &b, &long_id]);
    let took = t.elapsed();
    assert!(
        o.status.success(),
        "run true: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("vessel run true (restored from the template): {took:?}");

    // Host bind mounts (a read-write directory, a read-only directory, a
    // read-only file, and binds with a propagation and no type, as in
    // runtime-tools' validation, under a shared rootfsPropagation), masked
    // paths, sysctls (podman's and docker's defaults, an IPC one,
    // kernel.domainname) with a read-only root and /proc/sys, and the pids
    // limit, in one container.
    let rw = env.tmp.join("host-rw");
    let ro = env.tmp.join("host-ro");
    let prop = env.tmp.join("host-prop");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&prop).unwrap();
    std::fs::write(ro.join("in"), "from the host\n").unwrap();
    std::fs::write(prop.join("f"), "propagated\n").unwrap();
    let greeting = env.tmp.join("greeting");
    std::fs::write(&greeting, "hello file\n").unwrap();
    let script = "echo written > /data/out && echo rw-ok; \
                  (echo x > /ro/new) 2>/dev/null && echo ro-WRITABLE || echo ro-refused; \
                  cat /ro/in /etc/greeting /mnt/shared/f /mnt/rshared/f; \
                  awk '$5 ~ /^\\/mnt\\// { sub(/:[0-9]+$/, \"\", $7); print $5, $7 }' /proc/self/mountinfo; \
                  cd /proc/sys; echo $(cat net/ipv4/ping_group_range net/ipv4/ip_unprivileged_port_start \
                    kernel/shm_rmid_forced kernel/domainname); cd /; \
                  (echo 0 > /proc/sys/kernel/shm_rmid_forced) 2>/dev/null && echo sys-WRITABLE || echo sys-ro; \
                  [ -s /proc/kcore ] && echo kcore-visible || echo kcore-masked; \
                  cat /sys/fs/cgroup/pids.max; \
                  for i in 1 2 3 4 5 6; do sleep 1 & done; wait; echo no-pids-limit";
    let mut s = runc_spec(&env.tmp.join("rootfs"), &["sh", "-c", script]);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/data", "type": "bind", "source": rw,
                       "options": ["rbind", "rw"]}));
    mounts.push(json!({"destination": "/ro", "type": "bind", "source": ro,
                       "options": ["bind", "ro"]}));
    mounts.push(json!({"destination": "/etc/greeting", "source": greeting,
                       "options": ["bind", "ro", "nosuid"]}));
    // No cgroup namespace asked for (podman, docker on v1 hosts): the
    // cgroup mount still shows the container's own limits.
    mounts.push(
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                       "options": ["nosuid", "noexec", "nodev", "ro"]}),
    );
    let tmpfs_like = ["nosuid", "strictatime", "mode=755", "size=1k"];
    for (dest, typ, opts) in [
        ("/mnt/shared", "", ["bind", "shared"]),
        ("/mnt/rshared", "none", ["rbind", "rshared"]),
        ("/mnt/private", "", ["bind", "private"]),
    ] {
        let options: Vec<&str> = tmpfs_like.iter().chain(&opts).copied().collect();
        mounts.push(json!({"destination": dest, "type": typ, "source": &prop,
                           "options": options}));
    }
    // What docker asks for when a volume is shared.
    s["linux"]["rootfsPropagation"] = json!("rshared");
    s["linux"]["resources"] = json!({"pids": {"limit": 4}});
    s["linux"]["sysctl"] = json!({
        "net.ipv4.ping_group_range": "0 2147483647",
        "net.ipv4.ip_unprivileged_port_start": "0",
        "kernel.shm_rmid_forced": "1",
        "kernel.domainname": "vessel.test",
    });
    let b = env.write_bundle("b-binds", &s);
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "binds"]);
    eprintln!("vessel run with 6 bind mounts: {:?}", t.elapsed());
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(
        out,
        "rw-ok\nro-refused\nfrom the host\nhello file\npropagated\npropagated\n\
         /mnt/shared shared\n/mnt/rshared shared\n/mnt/private -\n\
         0 2147483647 0 1 vessel.test\nsys-ro\nkcore-masked\n4\n",
        "stderr: {err}"
    );
    // busybox sh gives up when fork fails (the 4th process of the cgroup).
    assert!(!o.status.success() && err.contains("fork"), "{err}");
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    assert!(!ro.join("new").exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&*env.tmp.to_string_lossy()),
        "host mounts left behind: {mountinfo}"
    );
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );

    // create, state, start, kill -> stopped, 137; the sandbox runs in the
    // host cgroup `linux.cgroupsPath` names, removed on delete.
    let cg = format!("/vessel-test-{}/sleep", std::process::id());
    let mut s = runc_spec(&env.tmp.join("rootfs"), &["sleep", "1000"]);
    s["linux"]["cgroupsPath"] = json!(cg);
    // Host hooks get the state on stdin (docker's network set-up is one).
    let hook = |name: &str| {
        let out = env.tmp.join(format!("hook.{name}"));
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())],
               "timeout": 30})
    };
    s["hooks"] = json!({"prestart": [hook("prestart")], "createRuntime": [hook("createRuntime")],
                        "poststart": [hook("poststart")], "poststop": [hook("poststop")]});
    let b = env.write_bundle("b-sleep", &s);
    let hook_state = |name: &str| -> Value {
        let f = env.tmp.join(format!("hook.{name}"));
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} hook state {text:?}: {e}"))
    };
    let pid_file = env.tmp.join("sleep.pid");
    let pf = pid_file.to_string_lossy().into_owned();
    let (st, err) = env.detached(&["create", "--bundle", &b, "--pid-file", &pf, "sleep"]);
    assert!(st.success(), "create: {err}");
    let pid: i32 = read_pid(Path::new(&pid_file));
    let s = env.state("sleep");
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("created"), Some(i64::from(pid)))
    );
    assert_eq!(s["bundle"].as_str(), Some(b.as_str()));
    for name in ["prestart", "createRuntime"] {
        let h = hook_state(name);
        assert_eq!(
            (h["status"].as_str(), h["pid"].as_i64()),
            (Some("creating"), Some(i64::from(pid))),
            "{h}"
        );
    }
    // The spec asks for a network namespace: the sandbox (monitor and VMM)
    // has a new one, where the prestart hook found it.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let vmm = env.vmms();
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    for h in ["memory", "pids", "cpu", "unified"] {
        let procs = Path::new("/sys/fs/cgroup")
            .join(h)
            .join(&cg[1..])
            .join("cgroup.procs");
        if !Path::new("/sys/fs/cgroup").join(h).is_dir() {
            continue; // not this host's layout (pure v2 has no `memory` dir)
        }
        let list =
            std::fs::read_to_string(&procs).unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
        for p in [pid, vmm[0]] {
            assert!(
                list.lines().any(|l| l.trim() == p.to_string()),
                "pid {p} not in {}: {list}",
                procs.display()
            );
        }
    }
    // A duplicate id is refused and leaves the first container alone.
    let (st, err) = env.detached(&["create", "--bundle", &b, "sleep"]);
    assert!(!st.success() && err.contains("already exists"), "{err}");
    let o = env.output(&["start", "sleep"]);
    assert!(
        o.status.success(),
        "start: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(env.state("sleep")["status"], "running");
    assert_eq!(hook_state("poststart")["status"], "running");
    let o = env.output(&["start", "sleep"]);
    assert!(!o.status.success());
    let o = env.output(&["delete", "sleep"]);
    assert!(
        !o.status.success(),
        "delete of a running container succeeded"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("not stopped"));
    assert_eq!(env.state("sleep")["status"], "running");
    let o = env.output(&["kill", "sleep", "KILL"]);
    assert!(
        o.status.success(),
        "kill: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(reap(pid, Duration::from_secs(120)), 137);
    let s = env.state("sleep");
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("stopped"), Some(0))
    );
    assert_eq!(s["exitStatus"].as_i64(), Some(137));
    let o = env.output(&["delete", "sleep"]);
    assert!(
        o.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(hook_state("poststop")["status"], "stopped");
    // Both levels vessel created are gone, in every hierarchy.
    let top = format!("vessel-test-{}", std::process::id());
    for h in ["memory", "pids", "cpu", "unified", ""] {
        let dir = Path::new("/sys/fs/cgroup").join(h).join(&top);
        assert!(!dir.exists(), "host cgroup left: {}", dir.display());
    }

    // run --detach, then delete --force of the running container.
    let pf = env.tmp.join("force.pid").to_string_lossy().into_owned();
    let (st, err) = env.detached(&["run", "-d", "--bundle", &b, "--pid-file", &pf, "force"]);
    assert!(st.success(), "run -d: {err}");
    let pid: i32 = read_pid(Path::new(&pf));
    assert_eq!(env.state("force")["status"], "running");
    let o = env.output(&["delete", "--force", "force"]);
    assert!(
        o.status.success(),
        "delete -f: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(reap(pid, Duration::from_secs(60)), 137);
    assert!(!env.output(&["state", "force"]).status.success());

    // A created container that never started is deleted without --force.
    let pf = env.tmp.join("created.pid").to_string_lossy().into_owned();
    let (st, err) = env.detached(&["create", "--bundle", &b, "--pid-file", &pf, "created"]);
    assert!(st.success(), "create: {err}");
    let pid: i32 = read_pid(Path::new(&pf));
    let o = env.output(&["delete", "created"]);
    assert!(
        o.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    reap(pid, Duration::from_secs(60));
    assert!(!env.output(&["state", "created"]).status.success());

    // Bad input fails and leaves nothing behind.
    let empty = env.tmp.join("b-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (st, err) = env.detached(&["create", "--bundle", &empty.to_string_lossy(), "bad"]);
    assert!(!st.success() && err.contains("config.json"), "{err}");
    // Host descriptors cannot cross into the VM: refused before anything
    // starts.
    let err = env.fails(&["run", "--preserve-fds", "1", "--bundle", &b, "fds"]);
    assert!(err.contains("--preserve-fds is not supported"), "{err}");
    let o = env.output(&["start", "nosuch"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

/// A child process killed and reaped when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// First host id of the test's user namespace (container ids 0..65536).
const USERNS_BASE: u32 = 100_000;

/// `chown -hR uid:gid dir`.
fn chown_tree(dir: &Path, id: u32) {
    std::os::unix::fs::lchown(dir, Some(id), Some(id))
        .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    if dir.is_symlink() || !dir.is_dir() {
        return;
    }
    for e in std::fs::read_dir(dir).unwrap() {
        chown_tree(&e.unwrap().path(), id);
    }
}

/// A container in a user namespace, the way podman's `--userns` or
/// Kubernetes' `hostUsers: false` asks for one: the bundle's root file
/// system is owned by the first mapped host id, one file stays owned by
/// the host's root. Inside, the process is uid 0 of its namespace with
/// every capability there, yet it cannot write the host root's file, cannot
/// make device nodes, and what it creates belongs to the mapped id on the
/// host; sysfs (the VM's network namespace is not the container's) comes
/// from a bind of the guest's. Its sysctls apply: the IPC one in its own
/// IPC namespace, `kernel.domainname` as `setdomainname`, the `net.*` one
/// in the VM's network namespace (written by the agent, the container's
/// root could not; its gids are the container's, as with runc, so
/// `0 10` is written as the guest's `100000 100010` and read back inside
/// as `0 10`). An exec joins the same user namespace and runs as its
/// uid 0 too, not as the guest's root.
///
/// The second container also names a network namespace by path (as podman
/// and CNI do): its VMM runs in that namespace. A host cgroup namespace
/// by path is refused.
#[test]
fn user_namespace_maps_ids() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("cli-userns", "");
    let rootfs = env.tmp.join("rootfs");
    busybox_rootfs(
        &rootfs,
        &[
            "sh", "echo", "cat", "id", "stat", "mknod", "ls", "hostname", "sleep",
        ],
    );
    chown_tree(&rootfs, USERNS_BASE);
    let host_root_file = rootfs.join("etc/host-root");
    std::fs::write(&host_root_file, "host\n").unwrap();
    std::os::unix::fs::lchown(&host_root_file, Some(0), Some(0)).unwrap();

    let script = "read a b c < /proc/self/uid_map; echo uid_map $a $b $c; \
                  read a b c < /proc/self/gid_map; echo gid_map $a $b $c; \
                  echo id $(id -u) $(id -g); hostname; \
                  echo made > /made-inside && echo create-ok; \
                  echo owner $(stat -c %u:%g /etc/host-root); \
                  (echo x >> /etc/host-root) 2>/dev/null && echo host-root-WRITABLE || echo host-root-refused; \
                  mknod /tmp/mem c 1 1 2>/dev/null && echo mknod-ALLOWED || echo mknod-refused; \
                  echo x > /dev/null && echo dev-null-ok; \
                  ls /sys/kernel > /dev/null && echo sysfs-ok; \
                  cd /proc/sys; echo $(cat net/ipv4/ping_group_range kernel/shm_rmid_forced \
                    kernel/domainname); cd /; \
                  [ -s /proc/kcore ] && echo kcore-visible || echo kcore-masked";
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SYS_ADMIN",
        "CAP_KILL"
    ]);
    let map = json!([{"containerID": 0, "hostID": USERNS_BASE, "size": 65536}]);
    let spec = |args: Value| {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": rootfs, "readonly": false},
            "hostname": "userns",
            "process": {
                "terminal": false,
                "args": args,
                "env": ["PATH=/bin"],
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
                "oomScoreAdj": -100
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                               {"type": "uts"}, {"type": "user"}],
                "uidMappings": map,
                "gidMappings": map,
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": {"net.ipv4.ping_group_range": "0 10",
                           "kernel.shm_rmid_forced": "1",
                           "kernel.domainname": "userns.test"}
            }
        })
    };

    let b = env.write_bundle("b-userns", &spec(json!(["sh", "-c", script])));
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "userns"]);
    eprintln!("vessel run in a user namespace: {:?}", t.elapsed());
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out,
        format!(
            "uid_map 0 {USERNS_BASE} 65536\ngid_map 0 {USERNS_BASE} 65536\nid 0 0\nuserns\n\
             create-ok\nowner 65534:65534\nhost-root-refused\nmknod-refused\ndev-null-ok\n\
             sysfs-ok\n0 10 1 userns.test\nkcore-masked\n"
        ),
        "stderr: {err}"
    );
    // What the container's root made belongs to the mapped id on the host.
    let made = std::fs::metadata(rootfs.join("made-inside")).expect("file made inside");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((made.uid(), made.gid()), (USERNS_BASE, USERNS_BASE));
    assert_eq!(std::fs::read_to_string(&host_root_file).unwrap(), "host\n");

    // An exec joins the user namespace as its root, not as the guest's.
    // The engine's network namespace: one of a process of ours.
    let holder = KillOnDrop(
        std::process::Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .spawn()
            .expect("unshare --net (util-linux)"),
    );
    let holder = &holder.0;
    let netns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns_of(holder.id()) == netns_of(std::process::id()) {
        assert!(
            Instant::now() < deadline,
            "unshare --net did not take effect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = spec(json!(["sleep", "1000"]));
    let netns_path = format!("/proc/{}/ns/net", holder.id());
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network", "path": netns_path}));
    let b = env.write_bundle("b-userns-sleep", &s);
    let vmm = env.run_detached(&b, "userns-exec");
    assert_eq!(
        netns_of(u32::try_from(vmm).unwrap()),
        netns_of(holder.id()),
        "the VMM runs in the network namespace of the spec"
    );
    let o = env.output(&[
        "exec",
        "userns-exec",
        "sh",
        "-c",
        "read a b c < /proc/self/uid_map; echo $a $b $c; echo id $(id -u) $(id -g); \
         (echo x >> /etc/host-root) 2>/dev/null && echo host-root-WRITABLE || echo host-root-refused",
    ]);
    assert_eq!(
        text(&o.stdout),
        format!("0 {USERNS_BASE} 65536\nid 0 0\nhost-root-refused\n"),
        "stderr: {}",
        text(&o.stderr)
    );
    env.ok(&["delete", "--force", "userns-exec"]);

    // Other namespaces of the host cannot be joined from a VM.
    let mut s = spec(json!(["true"]));
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "cgroup", "path": "/proc/self/ns/cgroup"}));
    let b = env.write_bundle("b-hostns", &s);
    let err = env.fails(&["run", "--bundle", &b, "hostns"]);
    assert!(err.contains("host's cgroup namespace"), "{err}");

    // A map that does not cover the process's uid is refused up front.
    let mut bad = spec(json!(["true"]));
    bad["process"]["user"]["uid"] = json!(70000);
    let b = env.write_bundle("b-userns-bad", &bad);
    let err = env.fails(&["run", "--bundle", &b, "userns-bad"]);
    assert!(err.contains("not in linux.uidMappings"), "{err}");

    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

/// With `rootfs_dax_mib`, the root file system share has a DAX window (in
/// the template too, so the key differs): the container's binaries are
/// mapped from the host's page cache, which shows as the VMM mapping the
/// rootfs's busybox (FUSE SETUPMAPPING) while the container runs.
#[test]
fn rootfs_through_a_dax_window() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("cli-dax", "rootfs_dax_mib = 32\n");
    let rootfs = env.tmp.join("rootfs");
    busybox_rootfs(&rootfs, &APPLETS);
    let b = env.write_bundle(
        "b-dax",
        &runc_spec(
            &rootfs,
            &["sh", "-c", "cat /etc/hostname-file; exec sleep 1000"],
        ),
    );
    std::fs::write(rootfs.join("etc/hostname-file"), "via dax\n").unwrap();
    let vmm = env.run_detached(&b, "dax");
    let busybox = rootfs.join("bin/busybox");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{vmm}/maps")).unwrap();
        if maps.contains(&*busybox.to_string_lossy()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM never mapped {} into the DAX window",
            busybox.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = env.output(&["exec", "dax", "cat", "/etc/hostname-file"]);
    assert_eq!(text(&o.stdout), "via dax\n", "stderr: {}", text(&o.stderr));
    env.ok(&["delete", "--force", "dax"]);
    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

/// `-v`/`--version` and `-h`/`--help` answer everywhere, as runc's do
/// (engines run `RUNTIME --version` to show it in their info).
#[test]
fn version_and_help_flags_answer_like_runc() {
    let env = CliEnv::new("cli-flags", "");
    for args in [&["-v"][..], &["--version"]] {
        let (out, _) = env.ok(args);
        assert!(out.starts_with("vessel version "), "{args:?}: {out}");
        assert!(out.contains("\nspec: "), "{args:?}: {out}");
    }
    for args in [
        &["-h"][..],
        &["--help"],
        &["create", "-h"],
        &["exec", "--help"],
        &["delete", "-h"],
    ] {
        let (out, _) = env.ok(args);
        assert!(out.contains("Usage: vessel"), "{args:?}: {out}");
    }
}

//! Tests of the host cgroup module: path forms, and real cgroups on this
//! host (as root), removed by a guard even when an assertion fails.
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

fn fs_path(spec: &str) -> Result<CgroupPath, CgroupError> {
    CgroupPath::parse(Some(spec), false, "ctr")
}

fn sd_path(spec: Option<&str>) -> Result<String, CgroupError> {
    CgroupPath::parse(spec, true, "ID").map(|p| {
        assert!(!p.relative);
        p.path
    })
}

#[test]
fn cgroupfs_paths() {
    let abs = |p: &str| CgroupPath {
        relative: false,
        path: p.into(),
    };
    let rel = |p: &str| CgroupPath {
        relative: true,
        path: p.into(),
    };
    assert_eq!(fs_path("/a/b/c").unwrap(), abs("a/b/c"));
    assert_eq!(fs_path("/a//b/./c/").unwrap(), abs("a/b/c"));
    assert_eq!(fs_path("a/b").unwrap(), rel("a/b"));
    assert_eq!(
        fs_path("/libpod_parent/libpod-1234").unwrap().to_string(),
        "/libpod_parent/libpod-1234"
    );
    assert_eq!(CgroupPath::parse(None, false, "ctr").unwrap(), rel("ctr"));
    assert_eq!(
        CgroupPath::parse(Some(""), false, "ctr").unwrap(),
        rel("ctr")
    );
    for bad in ["/a/../b", "..", "../x", "/", "//", ".", "/a\0b"] {
        let e = fs_path(bad).unwrap_err();
        assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad:?}: {e}");
    }
    assert!(fs_path("/a/../b").unwrap_err().to_string().contains("'..'"));
}

#[test]
fn systemd_paths() {
    assert_eq!(
        sd_path(Some("system.slice:docker:ID")).unwrap(),
        "system.slice/docker-ID.scope"
    );
    assert_eq!(
        sd_path(Some("machine-libpod.slice:libpod:ID")).unwrap(),
        "machine.slice/machine-libpod.slice/libpod-ID.scope"
    );
    assert_eq!(
        sd_path(Some("a-b-c.slice:p:ID")).unwrap(),
        "a.slice/a-b.slice/a-b-c.slice/p-ID.scope"
    );
    assert_eq!(
        sd_path(Some(":docker:ID")).unwrap(),
        "system.slice/docker-ID.scope"
    );
    assert_eq!(sd_path(Some("-.slice:p:ID")).unwrap(), "p-ID.scope");
    assert_eq!(
        sd_path(Some("system.slice:p:pod.slice")).unwrap(),
        "system.slice/pod.slice"
    );
    assert_eq!(sd_path(None).unwrap(), "system.slice/runc-ID.scope");
    assert_eq!(sd_path(Some("")).unwrap(), "system.slice/runc-ID.scope");
    for bad in [
        "system.slice",
        "a:b",
        "a:b:c:d",
        "system:p:ID",
        ".slice:p:ID",
        "a--b.slice:p:ID",
        "-a.slice:p:ID",
        "a/b.slice:p:ID",
        "system.slice:p:",
        "system.slice:p:a/b",
        "system.slice:p:../x",
    ] {
        let e = sd_path(Some(bad)).unwrap_err();
        assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad:?}: {e}");
    }
}

const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
const HYBRID_CGROUP: &str = "\
12:net_cls,net_prio:/
9:name=systemd:/user.slice/s.scope
4:memory:/process_api/abc
3:cpuset:/
2:cpu,cpuacct:/
0::/user.slice/s.scope
";

#[test]
fn hybrid_hierarchies() {
    let h = hierarchies_from(HYBRID_MOUNTINFO, HYBRID_CGROUP).unwrap();
    let got: Vec<(&str, &str, &str)> = h
        .iter()
        .map(|h| (h.name.as_str(), h.mount.to_str().unwrap(), h.own.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "name=systemd",
                "/sys/fs/cgroup/systemd",
                "/user.slice/s.scope"
            ),
            ("memory", "/sys/fs/cgroup/memory", "/process_api/abc"),
            ("cpuset", "/sys/fs/cgroup/cpuset", "/"),
            ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct", "/"),
            ("", "/sys/fs/cgroup/unified", "/user.slice/s.scope"),
        ]
    );
    assert!(h[4].is_v2());
}

#[test]
fn pure_v2_hierarchy_and_escapes() {
    let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n\
              31 23 0:26 /a\\040b /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
    let h = hierarchies_from(mi, "0::/init.scope\n").unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].mount, Path::new("/sys/fs/cgroup"));
    let only_bind = "31 23 0:26 /a\\040b /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
    let h = hierarchies_from(only_bind, "0::/a b/c\n").unwrap();
    assert_eq!(h[0].mount, Path::new("/mnt/my cg"));
    assert_eq!(h[0].mount_root, "/a b");
    assert!(matches!(
        hierarchies_from("", "0::/\n"),
        Err(CgroupError::NoHierarchy)
    ));
}

/// A scratch directory standing in for a mounted hierarchy.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vessel-cgtest-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fake(name: &str, mount: &Path, root: &str, own: &str) -> Hierarchy {
    Hierarchy {
        name: name.into(),
        mount: mount.to_path_buf(),
        mount_root: root.into(),
        own: own.into(),
    }
}

#[test]
fn mount_root_and_relative_paths() {
    let s = Scratch::new("root");
    // The hierarchy mounted from /docker/abc (a cgroup namespace).
    let h = [fake("name=x", &s.0, "/docker/abc", "/docker/abc/own")];
    let e = HostCgroup::create_in(&h, &fs_path("/other/x").unwrap()).unwrap_err();
    assert!(matches!(e, CgroupError::OutsideMount { .. }), "{e}");
    assert!(e.to_string().contains("/other/x"), "{e}");
    // Relative: below our own cgroup (v1 rule).
    fs::create_dir(s.0.join("own")).unwrap();
    let cg = HostCgroup::create_in(&h, &fs_path("a/b").unwrap()).unwrap();
    let st = cg.state().clone();
    assert_eq!(st.dirs[0].leaf, s.0.join("own/a/b"));
    // `own` existed: only a and a/b were created, and only they go.
    assert_eq!(st.dirs[0].created, [s.0.join("own/a"), s.0.join("own/a/b")]);
    HostCgroup::from_state(st).remove().unwrap();
    assert!(s.0.join("own").is_dir());
    assert!(!s.0.join("own/a").exists());
}

#[test]
fn pure_v2_enables_controllers_from_the_parent_of_our_cgroup() {
    let s = Scratch::new("v2");
    fs::create_dir_all(s.0.join("user.slice/s.scope")).unwrap();
    fs::write(s.0.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    fs::write(s.0.join("user.slice/cgroup.controllers"), "memory\n").unwrap();
    fs::write(s.0.join("user.slice/cgroup.subtree_control"), "memory\n").unwrap();
    let h = [fake("", &s.0, "/", "/user.slice/s.scope")];
    let cg = HostCgroup::create_in(&h, &fs_path("ctr").unwrap()).unwrap();
    assert_eq!(cg.leaf(""), Some(s.0.join("user.slice/ctr").as_path()));
    // A plain file keeps the last write; the root got all three.
    assert_eq!(
        fs::read_to_string(s.0.join("cgroup.subtree_control")).unwrap(),
        "+pids"
    );
    // Already enabled: not written again.
    assert_eq!(
        fs::read_to_string(s.0.join("user.slice/cgroup.subtree_control")).unwrap(),
        "memory\n"
    );
    cg.remove().unwrap();
    assert!(!s.0.join("user.slice/ctr").exists());
}

#[test]
fn cpu_resources() {
    assert_eq!(shares_to_weight(2), 1);
    assert_eq!(shares_to_weight(1024), 39);
    assert_eq!(shares_to_weight(262_144), 10_000);
    assert_eq!(shares_to_weight(0), 1);
    let spec = serde_json::json!({"linux": {"resources": {"cpu": {
        "shares": 512, "cpus": "0", "mems": "", "quota": 1000}}}});
    assert_eq!(
        CpuResources::from_spec(&spec),
        CpuResources {
            shares: Some(512),
            cpus: Some("0".into()),
            mems: None
        }
    );
    assert_eq!(
        CpuResources::from_spec(&serde_json::json!({})),
        CpuResources::default()
    );
}

#[test]
fn state_round_trips() {
    let st = HostCgroupState {
        path: fs_path("/a/b").unwrap(),
        dirs: vec![CgroupDir {
            hierarchy: "memory".into(),
            leaf: "/sys/fs/cgroup/memory/a/b".into(),
            created: vec!["/sys/fs/cgroup/memory/a/b".into()],
        }],
    };
    let json = serde_json::to_string(&st).unwrap();
    assert_eq!(
        json,
        r#"{"path":{"relative":false,"path":"a/b"},"dirs":[{"hierarchy":"memory","leaf":"/sys/fs/cgroup/memory/a/b","created":["/sys/fs/cgroup/memory/a/b"]}]}"#
    );
    assert_eq!(serde_json::from_str::<HostCgroupState>(&json).unwrap(), st);
}

// --- Against this host's cgroups (root needed). ---

/// A unique top-level name for one test.
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "vessel-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Kills its children and removes its cgroups however the test ends.
#[derive(Default)]
struct Guard {
    cgroups: Vec<HostCgroupState>,
    children: Vec<Child>,
}

impl Guard {
    fn create(&mut self, path: &CgroupPath) -> HostCgroup {
        let cg = HostCgroup::create(path).expect("create host cgroup (are we root?)");
        self.cgroups.push(cg.state().clone());
        cg
    }

    fn spawn(&mut self, cmd: &mut Command) -> i32 {
        let child = cmd.spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        self.children.push(child);
        pid
    }

    fn reap(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.reap();
        for st in self.cgroups.drain(..).rev() {
            if let Err(e) = HostCgroup::from_state(st).remove() {
                eprintln!("guard: {e}");
            }
        }
    }
}

/// `/proc/<pid>/cgroup` as (hierarchy, path) pairs.
fn proc_cgroup(pid: i32) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            f.next();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

fn all_gone(st: &HostCgroupState) {
    for d in &st.dirs {
        for c in &d.created {
            assert!(!c.exists(), "{} left behind", c.display());
        }
    }
}

#[test]
fn host_sleep_joins_every_hierarchy_and_cgroup_goes() {
    let mut g = Guard::default();
    let top = unique("every");
    let path = fs_path(&format!("/{top}/sandbox")).unwrap();
    let cg = g.create(&path);
    let hs = hierarchies().unwrap();
    assert_eq!(cg.state().dirs.len(), hs.len());
    for d in &cg.state().dirs {
        assert_eq!(d.created.len(), 2, "{d:?}");
        assert!(d.leaf.is_dir());
    }
    let pid = g.spawn(Command::new("sleep").arg("30"));
    cg.add_pid(pid).unwrap();
    let want = format!("/{top}/sandbox");
    let seen = proc_cgroup(pid);
    for h in &hs {
        let (_, p) = seen.iter().find(|(n, _)| *n == h.name).unwrap();
        assert_eq!(*p, want, "hierarchy {:?}", h.name);
    }
    let usage = memory_usage(&cg);
    eprintln!("memory usage of a group holding `sleep`: {usage:?} bytes");
    g.reap();
    let st = cg.state().clone();
    cg.remove().unwrap();
    all_gone(&st);
    g.cgroups.clear();
}

/// `memory.usage_in_bytes` (v1) or `memory.current` (v2) of the group.
fn memory_usage(cg: &HostCgroup) -> Option<u64> {
    [("memory", "memory.usage_in_bytes"), ("", "memory.current")]
        .iter()
        .filter_map(|(h, f)| fs::read_to_string(cg.leaf(h)?.join(f)).ok())
        .find_map(|s| s.trim().parse().ok())
}

#[test]
fn host_memory_of_children_is_charged_to_the_group() {
    let mut g = Guard::default();
    let cg = g.create(&fs_path(&format!("/{}", unique("mem"))).unwrap());
    // Moved while waiting on stdin, then allocates 64 MiB in a child.
    let pid = g.spawn(
        Command::new("sh")
            .args(["-c", "read x; awk 'BEGIN { s = \"a\"; while (length(s) < 67108864) s = s s; print \"ok\"; fflush(); system(\"sleep 30\") }'"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    cg.add_pid(pid).unwrap();
    let before = memory_usage(&cg).unwrap();
    let child = g.children.last_mut().unwrap();
    use std::io::{BufRead, Write};
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ok\n");
    let after = memory_usage(&cg).unwrap();
    eprintln!(
        "memory usage: {before} bytes with `sh` moved in, {after} after its awk child took 64 MiB"
    );
    assert!(after >= before + (60 << 20), "{before} -> {after}");
}

#[test]
fn host_remove_kills_what_is_left() {
    let mut g = Guard::default();
    let cg = g.create(&fs_path(&format!("/{}", unique("kill"))).unwrap());
    let pid = g.spawn(Command::new("sleep").arg("30"));
    cg.add_pid(pid).unwrap();
    // Reap the child as it dies, as init does for a real VMM.
    let mut child = g.children.pop().unwrap();
    let waiter = thread::spawn(move || child.wait());
    let st = cg.state().clone();
    let t = Instant::now();
    cg.remove().unwrap();
    eprintln!("remove with a live process took {:?}", t.elapsed());
    all_gone(&st);
    g.cgroups.clear();
    let status = waiter.join().unwrap().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn host_existing_parent_stays() {
    let mut g = Guard::default();
    let top = format!("/{}", unique("parent"));
    let parent = g.create(&fs_path(&top).unwrap());
    let child = g.create(&fs_path(&format!("{top}/c")).unwrap());
    for d in &child.state().dirs {
        assert_eq!(d.created, std::slice::from_ref(&d.leaf));
    }
    let st = child.state().clone();
    child.remove().unwrap();
    g.cgroups.retain(|s| *s != st);
    for d in &parent.state().dirs {
        assert!(d.leaf.is_dir());
        assert!(!d.leaf.join("c").exists());
    }
}

#[test]
fn host_systemd_form() {
    let mut g = Guard::default();
    let slice = format!("vesseltest{}", std::process::id());
    let spec = format!("{slice}-pod.slice:libpod:ID");
    let path = CgroupPath::parse(Some(&spec), true, "x").unwrap();
    assert_eq!(
        path.path,
        format!("{slice}.slice/{slice}-pod.slice/libpod-ID.scope")
    );
    let cg = g.create(&path);
    let pid = g.spawn(Command::new("sleep").arg("30"));
    cg.add_pid(pid).unwrap();
    let want = format!("/{}", path.path);
    assert!(proc_cgroup(pid).iter().all(|(_, p)| *p == want));
    g.reap();
    let st = cg.state().clone();
    cg.remove().unwrap();
    all_gone(&st);
    g.cgroups.clear();
}

#[test]
fn host_apply_cpu() {
    let mut g = Guard::default();
    let cg = g.create(&fs_path(&format!("/{}", unique("cpu"))).unwrap());
    let res = CpuResources {
        shares: Some(512),
        cpus: Some("0".into()),
        mems: Some("0".into()),
    };
    cg.apply_cpu(&res).unwrap();
    let read = |h: &str, f: &str| cg.leaf(h).map(|l| fs::read_to_string(l.join(f)).unwrap());
    if let Some(s) = read("cpu", "cpu.shares") {
        assert_eq!(s.trim(), "512");
    }
    if let Some(s) = read("cpuset", "cpuset.cpus") {
        assert_eq!(s.trim(), "0");
    }
}

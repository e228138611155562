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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_tests::{kvm_available_or_skip, Artifacts};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const APPLETS: [&str; 4] = ["sh", "echo", "true", "sleep"];

/// A runc-like `config.json` (no terminal, read-only root) running `args`
/// in the busybox root filesystem at `rootfs`.
fn spec(rootfs: &Path, args: &[&str]) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": true},
        "hostname": "cli",
        "process": {
            "terminal": false,
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
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
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
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

struct Env {
    bin: PathBuf,
    config: PathBuf,
    root: PathBuf,
    tmp: PathBuf,
    rootfs: PathBuf,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs to completion, capturing output.
    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run vessel")
    }

    /// Runs a command that leaves a monitor behind (which inherits stdio):
    /// stdout to /dev/null, stderr through a file.
    fn detached(&self, args: &[&str]) -> (ExitStatus, String) {
        let err = self.tmp.join("stderr.txt");
        let f = File::create(&err).unwrap();
        let st = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(f)
            .status()
            .expect("run vessel");
        (st, std::fs::read_to_string(&err).unwrap_or_default())
    }

    /// A bundle named `name` running `args`.
    fn bundle(&self, name: &str, args: &[&str]) -> String {
        let dir = self.tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&spec(&self.rootfs, args)).unwrap(),
        )
        .unwrap();
        dir.to_string_lossy().into_owned()
    }

    fn state(&self, id: &str) -> Value {
        let o = self.output(&["state", id]);
        assert!(
            o.status.success(),
            "state {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("state JSON")
    }

    fn root_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Reaps `pid` (our child: we are a subreaper) within `timeout`; its
/// exit code as a shell reports it.
fn reap(pid: i32, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a pid, with a pointer to a local int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            return 128 + libc::WTERMSIG(status);
        }
        assert!(r == 0, "waitpid {pid}: {}", std::io::Error::last_os_error());
        assert!(Instant::now() < deadline, "monitor {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of vessel-vmm processes whose arguments mention `needle`.
fn vmms_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("vessel-vmm") && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn runc_lifecycle_through_the_microvm() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let bin = art.vmm.with_file_name("vessel");
    assert!(
        bin.is_file(),
        "{} missing (cargo xtask build)",
        bin.display()
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install Debian's busybox-static"
    );
    // Monitors of detached containers are reparented to us, so we can
    // check their exit status like an engine's shim does.
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let tmp = TempDir(std::env::temp_dir().join(format!("vessel-cli-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let rootfs = tmp.0.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let config = tmp.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "vmm = {:?}\nkernel = {:?}\ninitrd = {:?}\ntemplate_dir = {:?}\ntemplates = true\n",
            art.vmm,
            art.kernel,
            art.initrd,
            tmp.0.join("templates")
        ),
    )
    .unwrap();
    let env = Env {
        bin,
        config,
        root: tmp.0.join("root"),
        tmp: tmp.0.clone(),
        rootfs,
    };

    // Foreground run: output and exit status (the first one builds the
    // template).
    let b = env.bundle("b-hi", &["sh", "-c", "echo hi; exit 3"]);
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "hi"]);
    eprintln!(
        "first vessel run (template build included): {:?}",
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

    let b = env.bundle("b-true", &["true"]);
    let t = Instant::now();
    let o = env.output(&["run", "--bundle", &b, "true"]);
    let took = t.elapsed();
    assert!(
        o.status.success(),
        "run true: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("vessel run true (restored from the template): {took:?}");

    // create, state, start, kill -> stopped, 137.
    let b = env.bundle("b-sleep", &["sleep", "1000"]);
    let pid_file = env.tmp.join("sleep.pid");
    let pf = pid_file.to_string_lossy().into_owned();
    let (st, err) = env.detached(&["create", "--bundle", &b, "--pid-file", &pf, "sleep"]);
    assert!(st.success(), "create: {err}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let s = env.state("sleep");
    assert_eq!(
        (s["status"].as_str(), s["pid"].as_i64()),
        (Some("created"), Some(i64::from(pid)))
    );
    assert_eq!(s["bundle"].as_str(), Some(b.as_str()));
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

    // run --detach, then delete --force of the running container.
    let pf = env.tmp.join("force.pid").to_string_lossy().into_owned();
    let (st, err) = env.detached(&["run", "-d", "--bundle", &b, "--pid-file", &pf, "force"]);
    assert!(st.success(), "run -d: {err}");
    let pid: i32 = std::fs::read_to_string(&pf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
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
    let pid: i32 = std::fs::read_to_string(&pf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
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
    let o = env.output(&["start", "nosuch"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let root = env.root.to_string_lossy().into_owned();
    assert!(vmms_mentioning(&root).is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

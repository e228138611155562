//! The `vessel` binary driven the way an engine drives runc: a private
//! `--root`, a config file pointing at this build's artifacts (templates
//! on), bundles written from JSON, and a guard that leaves nothing behind
//! when a test fails half-way.
//!
//! All environments share one template directory,
//! `target/vessel/test-templates`: a template's key covers the VMM,
//! kernel, initramfs and VM shape, so a new build gets a new template, and
//! the test files after the first restore from it instead of paying for
//! another cold boot (about a minute on PVM hosts).
//!
//! [`CliEnv`]'s `Drop` force-deletes every container still under its
//! `--root`, then kills any process (VMM, monitor) whose command line still
//! mentions its private directory, and removes the directory. A passing
//! test asserts itself that nothing was left (its own checks must see the
//! leak first); the guard is for the failing and the interrupted ones.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Artifacts;

/// A private `--root`, config file and scratch directory for `vessel`.
pub struct CliEnv {
    /// The `vessel` binary under test.
    pub bin: PathBuf,
    /// The `--config` file.
    pub config: PathBuf,
    /// The `--root` state directory.
    pub root: PathBuf,
    /// Scratch directory holding everything above; removed on drop.
    pub tmp: PathBuf,
    /// Artifacts the config points at.
    pub art: Artifacts,
}

impl CliEnv {
    /// A new environment under `$TMPDIR/vessel-{name}-{pid}`; `extra_config`
    /// is appended to the config file (TOML lines; `templates = true`
    /// unless it says otherwise). Makes this process a
    /// child subreaper, so detached monitors are reparented to the test,
    /// which can then check their exit status like an engine's shim does.
    /// Panics (fails the test) when an artifact or busybox is missing.
    pub fn new(name: &str, extra_config: &str) -> CliEnv {
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
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
        let tmp = std::env::temp_dir().join(format!("vessel-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        let templates = crate::workspace_root().join("target/vessel/test-templates");
        let config = tmp.join("config.toml");
        // Sandbox sockets in the environment's own run directory, so a
        // test can check that nothing is left there either.
        let extra_config = if extra_config.contains("run_dir =") {
            extra_config.to_string()
        } else {
            format!("{extra_config}\nrun_dir = {:?}\n", tmp.join("run"))
        };
        fs::write(&config, art.vessel_config(&templates, &extra_config))
            .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        CliEnv {
            bin,
            config,
            // As long as dockerd's default (`/var/run/docker/runtime-runc/moby`
            // + 64-hex ids): socket paths must not depend on it.
            root: tmp.join("root/var/run/docker/runtime-runc/moby"),
            tmp,
            art,
        }
    }

    /// `vessel --root R --config C args...` with stdin from /dev/null.
    pub fn cmd(&self, args: &[&str]) -> Command {
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
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run vessel")
    }

    /// Runs a command that must succeed; its stdout and how long it took.
    pub fn ok(&self, args: &[&str]) -> (String, Duration) {
        let t = Instant::now();
        let o = self.output(args);
        let took = t.elapsed();
        assert!(
            o.status.success(),
            "vessel {args:?} failed: {}",
            text(&o.stderr)
        );
        (text(&o.stdout), took)
    }

    /// Runs a command that must fail with status 1 (as runc does); its
    /// stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.output(args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "vessel {args:?} succeeded");
        assert_eq!(o.status.code(), Some(1), "vessel {args:?}: {err}");
        err
    }

    /// Runs a command that leaves a process behind (a monitor, which
    /// inherits stdio): stdout to /dev/null, stderr through a file, so
    /// waiting for the command does not wait for the monitor.
    pub fn detached(&self, args: &[&str]) -> (ExitStatus, String) {
        let err = self.tmp.join("stderr.txt");
        let f = File::create(&err).unwrap_or_else(|e| panic!("{}: {e}", err.display()));
        let st = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(f)
            .status()
            .expect("run vessel");
        (st, fs::read_to_string(&err).unwrap_or_default())
    }

    /// `vessel run -d --bundle BUNDLE ID`, which must succeed (its time is
    /// printed: the first run of a configuration builds the template);
    /// the pid of the container's VMM, the only one of this environment.
    pub fn run_detached(&self, bundle: &str, id: &str) -> i32 {
        let t = Instant::now();
        let (st, err) = self.detached(&["run", "-d", "--bundle", bundle, id]);
        assert!(st.success(), "run -d {id}: {err}");
        eprintln!(
            "run -d {id} (template build included unless another test built it): {:?}",
            t.elapsed()
        );
        let vmms = self.vmms();
        assert_eq!(vmms.len(), 1, "VMMs after run -d {id}: {vmms:?}");
        vmms[0]
    }

    /// Writes `spec` as `<tmp>/<name>/config.json`; the bundle's path.
    pub fn write_bundle(&self, name: &str, spec: &Value) -> String {
        let dir = self.tmp.join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let json = serde_json::to_vec_pretty(spec).expect("serialize config.json");
        fs::write(dir.join("config.json"), json).expect("write config.json");
        dir.to_string_lossy().into_owned()
    }

    /// `vessel state ID`, which must succeed, as JSON.
    pub fn state(&self, id: &str) -> Value {
        let (out, _) = self.ok(&["state", id]);
        serde_json::from_str(&out).expect("state JSON")
    }

    /// Names under `--root` (containers; nothing else lives there).
    pub fn root_entries(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sandbox socket directories left in the environment's run directory.
    pub fn run_entries(&self) -> Vec<String> {
        fs::read_dir(self.tmp.join("run"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `vessel-vmm` processes of this environment.
    pub fn vmms(&self) -> Vec<i32> {
        processes_mentioning("vessel-vmm", &self.root.to_string_lossy())
    }

    /// Monitors (`vessel ... monitor` / `exec-monitor`) of this environment.
    pub fn monitors(&self) -> Vec<i32> {
        processes_mentioning("monitor", &self.root.to_string_lossy())
    }
}

impl Drop for CliEnv {
    fn drop(&mut self) {
        let left = self.root_entries();
        for id in &left {
            let _ = self
                .cmd(&["delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let me = std::process::id() as i32;
        let needle = self.tmp.to_string_lossy().into_owned();
        let stray: Vec<i32> = processes_mentioning(&needle, "")
            .into_iter()
            .filter(|&p| p != me)
            .collect();
        for &pid in &stray {
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !left.is_empty() || !stray.is_empty() {
            eprintln!(
                "cleanup: force-deleted containers {left:?}, killed processes {stray:?} of {needle}"
            );
        }
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Lossy UTF-8.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tiny root file system in `dir`: a copy of the static `/bin/busybox`,
/// `applets` linked to it, and the usual mount points.
pub fn busybox_rootfs(dir: &Path, applets: &[&str]) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (apt-get install busybox-static)"
    );
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    for a in applets {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).expect("applet link");
    }
}

/// A runc-like `config.json` (no terminal, read-only root) running `args`
/// in the busybox root filesystem at `rootfs`.
pub fn runc_spec(rootfs: &Path, args: &[&str]) -> Value {
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

/// The pid written to a `--pid-file`.
pub fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reaps `pid` (a child of ours: see [`CliEnv::new`]) within `timeout`;
/// its exit code as a shell reports it (128+N for signal N).
pub fn reap(pid: i32, timeout: Duration) -> i32 {
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
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of processes whose command line mentions both needles.
pub fn processes_mentioning(a: &str, b: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(a) && cmd.contains(b) {
            out.push(pid);
        }
    }
    out
}

//! `vessel features`, `pause`, `resume`, `update` and `events` through the
//! `vessel` binary, against real microVMs (templates on), with two
//! containers:
//!
//! 1. `res` runs a shell loop that writes an increasing counter to
//!    `/count` in its (writable, virtio-fs shared) root file system once a
//!    second, without forking (`read -t 1` on a fifo as the sleep), so the
//!    host reads the counter straight from the bundle. `events --stats`
//!    parses and shows memory in use; `events --interval 1s` streams stats
//!    lines; `update --pids-limit --memory` shows up in the stats; an update
//!    the kernel refuses changes nothing; `pause` -> `state` says paused
//!    and the counter stops; `resume` -> it advances again; a second pause,
//!    then `kill KILL` of the paused container -> the monitor exits 137.
//! 2. `res2` (`sleep`) is paused and removed with `delete --force`.
//!
//! Errors: unknown id for every command, pause/resume/update/events of a
//! stopped container, resume of a running one, a second pause. At the end
//! no VMM of the test runs and `--root` is empty. Latencies of the CLI
//! commands (process start to exit) are printed.
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

const APPLETS: [&str; 4] = ["sh", "mkfifo", "sleep", "cat"];

/// The counter loop: no fork per iteration (a fifo opened read-write never
/// blocks the open, and `read -t 1` on it waits one second).
const COUNTER: &str = "mkfifo /tmp/tick; i=0; while true; do i=$((i+1)); \
                       echo $i > /count; read -t 1 x <> /tmp/tick; done";

/// A small `config.json` (pid + mount namespaces, writable root) running
/// `args` in the busybox root file system at `rootfs`.
fn spec(rootfs: &Path, args: &[&str], resources: Value) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": false},
        "process": {
            "terminal": false,
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=1m"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}],
            "resources": resources
        }
    })
}

struct Env {
    bin: PathBuf,
    config: PathBuf,
    root: PathBuf,
    tmp: PathBuf,
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

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run vessel")
    }

    /// Runs a command that must succeed; returns stdout and how long it took.
    fn ok(&self, args: &[&str]) -> (String, Duration) {
        let t = Instant::now();
        let o = self.output(args);
        let took = t.elapsed();
        assert!(
            o.status.success(),
            "vessel {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (String::from_utf8_lossy(&o.stdout).into_owned(), took)
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.output(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "vessel {args:?} succeeded");
        assert_eq!(o.status.code(), Some(1), "vessel {args:?}: {err}");
        err
    }

    /// Runs a command that leaves a monitor behind (which inherits stdio).
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

    /// A bundle named `name` with its own copy of the root file system.
    fn bundle(&self, name: &str, args: &[&str], resources: Value) -> (String, PathBuf) {
        let dir = self.tmp.join(name);
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&spec(&rootfs, args, resources)).unwrap(),
        )
        .unwrap();
        (dir.to_string_lossy().into_owned(), rootfs)
    }

    fn status(&self, id: &str) -> String {
        let (out, _) = self.ok(&["state", id]);
        let v: Value = serde_json::from_str(&out).expect("state JSON");
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// `events --stats`: the `data` object, and how long it took.
    fn stats(&self, id: &str) -> (Value, Duration) {
        let (out, took) = self.ok(&["events", "--stats", id]);
        assert_eq!(out.lines().count(), 1, "{out}");
        let v: Value = serde_json::from_str(&out).expect("events --stats JSON");
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], id);
        (v["data"].clone(), took)
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

/// A running `vessel events` whose JSON lines arrive on a channel.
struct EventStream {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl EventStream {
    fn start(env: &Env, args: &[&str]) -> EventStream {
        let mut child = env.cmd(args).stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("event JSON");
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        EventStream { child, lines }
    }

    fn next(&self, timeout: Duration) -> Value {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no event line within {timeout:?}: {e}"))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counter the container writes, once it reads as a number.
fn counter(rootfs: &Path) -> Option<u64> {
    for _ in 0..20 {
        if let Ok(s) = std::fs::read_to_string(rootfs.join("count")) {
            if let Ok(n) = s.trim().parse() {
                return Some(n);
            }
        }
        // Caught between the truncation and the write.
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

/// Waits until the counter exceeds `above`; returns its value.
fn counter_above(rootfs: &Path, above: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = counter(rootfs).filter(|&n| n > above) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter did not pass {above} within {timeout:?} (now {:?})",
            counter(rootfs)
        );
        std::thread::sleep(Duration::from_millis(200));
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

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn pause_resume_update_events_features() {
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
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let tmp = TempDir(std::env::temp_dir().join(format!("vessel-res-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).unwrap();
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
    };

    // features: no VM needed.
    let (out, took) = env.ok(&["features"]);
    let f: Value = serde_json::from_str(&out).expect("features JSON");
    eprintln!("vessel features: {took:?}");
    assert_eq!(f["linux"]["cgroup"]["v2"], true);
    assert_eq!(f["linux"]["cgroup"]["v1"], false);
    assert_eq!(f["linux"]["seccomp"]["enabled"], true);
    assert!(f["ociVersionMax"]
        .as_str()
        .is_some_and(|v| v.starts_with("1.")));
    assert!(f["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .contains(&json!("pid")));

    // Unknown ids.
    for args in [
        &["pause", "nosuch"][..],
        &["resume", "nosuch"],
        &["update", "--pids-limit", "5", "nosuch"],
        &["events", "--stats", "nosuch"],
    ] {
        let err = env.fails(args);
        assert!(err.contains("does not exist"), "{args:?}: {err}");
    }
    // Bad flags fail before any container is looked at.
    let err = env.fails(&["update", "--memory", "12x", "nosuch"]);
    assert!(err.contains("invalid size"), "{err}");

    // The counter container (the first run builds the template).
    let (b, rootfs) = env.bundle(
        "b-res",
        &["sh", "-c", COUNTER],
        json!({"pids": {"limit": 64}}),
    );
    let pf = env.tmp.join("res.pid");
    let t = Instant::now();
    let (st, err) = env.detached(&[
        "run",
        "-d",
        "--bundle",
        &b,
        "--pid-file",
        &pf.to_string_lossy(),
        "res",
    ]);
    assert!(st.success(), "run -d: {err}");
    eprintln!("run -d res (template build included): {:?}", t.elapsed());
    let pid = read_pid(&pf);
    let c0 = counter_above(&rootfs, 1, Duration::from_secs(120));
    assert_eq!(env.status("res"), "running");

    // Stats once, then a stream of two lines.
    let (data, took) = env.stats("res");
    eprintln!("events --stats: {took:?}");
    let mem = data["memory"]["usage"]["usage"].as_u64().unwrap_or(0);
    assert!(mem > 0, "memory usage {data}");
    assert!(
        data["cpu"]["usage"]["total"].as_u64().unwrap_or(0) > 0,
        "{data}"
    );
    assert!(data["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{data}");
    assert_eq!(data["pids"]["limit"], 64);
    let stream = EventStream::start(&env, &["events", "--interval", "1s", "res"]);
    for _ in 0..2 {
        let l = stream.next(Duration::from_secs(30));
        assert!(l["type"] == "stats" && l["id"] == "res", "{l}");
    }
    drop(stream);

    // update: new limits show up; a refused value changes nothing.
    let (_, took) = env.ok(&["update", "--pids-limit", "7", "--memory", "48m", "res"]);
    eprintln!("update --pids-limit --memory: {took:?}");
    let (data, _) = env.stats("res");
    assert_eq!(data["pids"]["limit"], 7, "{data}");
    assert_eq!(data["memory"]["usage"]["limit"], 48 << 20, "{data}");
    let err = env.fails(&["update", "--memory", "40m", "--cpuset-cpus", "63", "res"]);
    eprintln!("refused update: {}", err.trim());
    assert!(err.contains("cpuset"), "{err}");
    let err = env.fails(&["update", "--blkio-weight", "500", "res"]);
    eprintln!("blkio weight: {}", err.trim());
    let resources = env.tmp.join("resources.json");
    std::fs::write(&resources, r#"{"pids":{"limit":9},"cpu":{"shares":512}}"#).unwrap();
    env.ok(&["update", "-r", &resources.to_string_lossy(), "res"]);
    let (data, _) = env.stats("res");
    assert_eq!(data["memory"]["usage"]["limit"], 48 << 20, "{data}");
    assert_eq!(data["pids"]["limit"], 9, "{data}");

    // pause: the counter stops.
    let err = env.fails(&["resume", "res"]);
    assert!(err.contains("not paused"), "{err}");
    let (_, took) = env.ok(&["pause", "res"]);
    eprintln!("pause: {took:?}");
    assert_eq!(env.status("res"), "paused");
    let err = env.fails(&["pause", "res"]);
    assert!(err.contains("already paused"), "{err}");
    let c1 = counter(&rootfs).unwrap();
    assert!(c1 >= c0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counter(&rootfs), Some(c1), "the counter moved while paused");
    // Stats work on a paused container.
    let (data, _) = env.stats("res");
    assert!(data["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0);
    // resume: it advances again.
    let (_, took) = env.ok(&["resume", "res"]);
    eprintln!("resume: {took:?}");
    assert_eq!(env.status("res"), "running");
    counter_above(&rootfs, c1, Duration::from_secs(30));

    // Latencies: three more cycles, CLI process start to exit (`state`,
    // which does not reach the guest, as the reference).
    let mut lat: [Vec<Duration>; 4] = Default::default();
    for i in 0..3 {
        lat[0].push(env.ok(&["state", "res"]).1);
        lat[1].push(env.ok(&["pause", "res"]).1);
        lat[2].push(env.ok(&["resume", "res"]).1);
        let limit = (20 + i).to_string();
        lat[3].push(env.ok(&["update", "--pids-limit", &limit, "res"]).1);
    }
    for (name, mut l) in ["state", "pause", "resume", "update"].into_iter().zip(lat) {
        l.sort();
        eprintln!(
            "latency {name}: median {:?} (min {:?}, max {:?})",
            l[1], l[0], l[2]
        );
    }

    // kill of a paused container.
    env.ok(&["pause", "res"]);
    env.ok(&["kill", "res", "KILL"]);
    assert_eq!(reap(pid, Duration::from_secs(120)), 137);
    assert_eq!(env.status("res"), "stopped");
    for args in [
        &["pause", "res"][..],
        &["resume", "res"],
        &["update", "--pids-limit", "5", "res"],
        &["events", "--stats", "res"],
    ] {
        let err = env.fails(args);
        assert!(
            err.contains("not running") || err.contains("stopped") || err.contains("not paused"),
            "{args:?}: {err}"
        );
    }
    env.ok(&["delete", "res"]);

    // delete --force of a paused container.
    let (b, _) = env.bundle("b-sleep", &["sleep", "1000"], json!({}));
    let pf = env.tmp.join("res2.pid");
    let (st, err) = env.detached(&[
        "run",
        "-d",
        "--bundle",
        &b,
        "--pid-file",
        &pf.to_string_lossy(),
        "res2",
    ]);
    assert!(st.success(), "run -d: {err}");
    let pid = read_pid(&pf);
    let (_, took) = env.ok(&["pause", "res2"]);
    eprintln!("pause (sleep): {took:?}");
    assert_eq!(env.status("res2"), "paused");
    let err = env.fails(&["delete", "res2"]);
    assert!(err.contains("not stopped"), "{err}");
    let (_, took) = env.ok(&["delete", "--force", "res2"]);
    eprintln!("delete --force (paused): {took:?}");
    assert_eq!(reap(pid, Duration::from_secs(60)), 137);
    assert!(!env.output(&["state", "res2"]).status.success());

    let root = env.root.to_string_lossy().into_owned();
    assert!(vmms_mentioning(&root).is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
}

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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_tests::cli::{busybox_rootfs, read_pid, reap, CliEnv};
use vessel_tests::kvm_available_or_skip;

const APPLETS: [&str; 4] = ["sh", "mkfifo", "sleep", "cat"];

/// The counter loop: no fork per iteration (a fifo opened read-write never
/// blocks the open, and `read -t 1` on it waits one second). `1<>` writes
/// over the old number without truncating first (numbers only grow), so a
/// pause can never freeze the file empty between a truncation and a write.
const COUNTER: &str = "mkfifo /tmp/tick; i=0; while true; do i=$((i+1)); \
                       echo $i 1<> /count; read -t 1 x <> /tmp/tick; done";

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

/// A bundle named `name` with its own copy of the root file system
/// (the counter lives in it); the bundle and the root file system.
fn bundle(env: &CliEnv, name: &str, args: &[&str], resources: Value) -> (String, PathBuf) {
    let rootfs = env.tmp.join(name).join("rootfs");
    busybox_rootfs(&rootfs, &APPLETS);
    (
        env.write_bundle(name, &spec(&rootfs, args, resources)),
        rootfs,
    )
}

/// The `status` field of `vessel state`.
fn status(env: &CliEnv, id: &str) -> String {
    env.state(id)["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `events --stats`: the `data` object, and how long it took.
fn stats(env: &CliEnv, id: &str) -> (Value, Duration) {
    let (out, took) = env.ok(&["events", "--stats", id]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(&out).expect("events --stats JSON");
    assert_eq!(v["type"], "stats");
    assert_eq!(v["id"], id);
    (v["data"].clone(), took)
}

/// A running `vessel events` whose JSON lines arrive on a channel.
struct EventStream {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl EventStream {
    fn start(env: &CliEnv, args: &[&str]) -> EventStream {
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

#[test]
fn pause_resume_update_events_features() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("res", "");

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
    let (b, rootfs) = bundle(
        &env,
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
    eprintln!(
        "run -d res (template build included unless another test built it): {:?}",
        t.elapsed()
    );
    let pid = read_pid(&pf);
    let c0 = counter_above(&rootfs, 1, Duration::from_secs(120));
    assert_eq!(status(&env, "res"), "running");

    // Stats once, then a stream of two lines.
    let (data, took) = stats(&env, "res");
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
    let (data, _) = stats(&env, "res");
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
    let (data, _) = stats(&env, "res");
    assert_eq!(data["memory"]["usage"]["limit"], 48 << 20, "{data}");
    assert_eq!(data["pids"]["limit"], 9, "{data}");

    // pause: the counter stops.
    let err = env.fails(&["resume", "res"]);
    assert!(err.contains("not paused"), "{err}");
    let (_, took) = env.ok(&["pause", "res"]);
    eprintln!("pause: {took:?}");
    assert_eq!(status(&env, "res"), "paused");
    let err = env.fails(&["pause", "res"]);
    assert!(err.contains("already paused"), "{err}");
    let c1 = counter(&rootfs).unwrap();
    assert!(c1 >= c0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counter(&rootfs), Some(c1), "the counter moved while paused");
    // Stats work on a paused container.
    let (data, _) = stats(&env, "res");
    assert!(data["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0);
    // resume: it advances again.
    let (_, took) = env.ok(&["resume", "res"]);
    eprintln!("resume: {took:?}");
    assert_eq!(status(&env, "res"), "running");
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
    assert_eq!(status(&env, "res"), "stopped");
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
    let (b, _) = bundle(&env, "b-sleep", &["sleep", "1000"], json!({}));
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
    assert_eq!(status(&env, "res2"), "paused");
    let err = env.fails(&["delete", "res2"]);
    assert!(err.contains("not stopped"), "{err}");
    let (_, took) = env.ok(&["delete", "--force", "res2"]);
    eprintln!("delete --force (paused): {took:?}");
    assert_eq!(reap(pid, Duration::from_secs(60)), 137);
    assert!(!env.output(&["state", "res2"]).status.success());

    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

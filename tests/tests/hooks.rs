//! OCI hooks, vessel against runc on the same bundle: the order hooks run
//! in over create, start, kill and delete, the state each gets on stdin
//! (status, id, pid, bundle), and what a failing or timed-out hook does to
//! the lifecycle (poststart as the runtime spec and runc 1.2 run it:
//! runc 1.1 runs it in `create`, see [`as_runc_1_2`]). vessel runs `prestart`, `createRuntime`, `poststart` and
//! `poststop` on the host with the monitor's pid (whose network namespace
//! the VM's is); `createContainer` and `startContainer` would run inside
//! the VM, so vessel refuses them with a clear error where runc runs them.
//! After every failure nothing is left: no container, VMM, socket.
//!
//! Needs Debian's `runc` and `busybox-static`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_tests::cli::{busybox_rootfs, runc_spec, CliEnv};
use vessel_tests::kvm_available_or_skip;

/// One runtime under test, with its own state root and hook log directory.
struct Rt<'a> {
    name: &'static str,
    env: &'a CliEnv,
    runc_root: PathBuf,
}

impl Rt<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        if self.name == "vessel" {
            return self.env.cmd(args);
        }
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(&self.runc_root)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs a command whose children may keep stdio open: stdout to
    /// /dev/null, stderr through a file.
    fn run(&self, args: &[&str]) -> (ExitStatus, String) {
        let err = self.env.tmp.join(format!("{}.stderr", self.name));
        let f = File::create(&err).unwrap_or_else(|e| panic!("{}: {e}", err.display()));
        let st = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(f)
            .status()
            .unwrap_or_else(|e| panic!("{} {args:?}: {e}", self.name));
        (st, fs::read_to_string(&err).unwrap_or_default())
    }

    fn state(&self, id: &str) -> Option<Value> {
        let o = self.cmd(&["state", id]).output().expect("state");
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).expect("state JSON"))
    }

    /// Waits (bounded) until `id` is stopped.
    fn wait_stopped(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self
            .state(id)
            .and_then(|s| s["status"].as_str().map(String::from))
            != Some("stopped".into())
        {
            assert!(
                Instant::now() < deadline,
                "{}: {id} did not stop",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `delete --force`, ignoring the outcome (clean-up).
    fn force_delete(&self, id: &str) {
        let _ = self.run(&["delete", "--force", id]);
    }

    fn log_dir(&self, case: &str) -> PathBuf {
        let d = self.env.tmp.join(format!("log-{}-{case}", self.name));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}

/// A hook that saves its stdin as `<dir>/<kind>.json`, appends `kind` to
/// `<dir>/order`, then runs `then` (shell).
fn hook(dir: &Path, kind: &str, then: &str, timeout: Option<u64>) -> Value {
    let script = format!(
        "cat > {d}/{kind}.json; echo {kind} >> {d}/order; {then}",
        d = dir.display()
    );
    let mut h = json!({"path": "/bin/sh", "args": ["sh", "-c", script]});
    if let Some(t) = timeout {
        h["timeout"] = json!(t);
    }
    h
}

fn order(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("order"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// The parts of a hook's state that must agree between runtimes: status,
/// id, whether the bundle is the container's own (each runtime has its own
/// bundle directory), and whether the pid is the container's (`pid` of
/// `state` while it ran) or absent/zero.
fn hook_state(dir: &Path, kind: &str, container_pid: i64, own_bundle: &str) -> Value {
    let f = dir.join(format!("{kind}.json"));
    let text = fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    let s: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{kind} state {text:?}: {e}"));
    let pid = match s["pid"].as_i64() {
        None | Some(0) => "none",
        Some(p) if p == container_pid => "the container's",
        Some(_) => "another",
    };
    let bundle = match s["bundle"].as_str() {
        Some(b) if b == own_bundle => json!("the container's"),
        _ => s["bundle"].clone(),
    };
    json!({"status": s["status"], "id": s["id"], "bundle": bundle, "pid": pid,
           "ociVersion": s["ociVersion"].is_string()})
}

fn bundle(env: &CliEnv, name: &str, hooks: Value) -> String {
    let mut s = runc_spec(&env.tmp.join("rootfs"), &["sleep", "1000"]);
    s["hooks"] = hooks;
    env.write_bundle(name, &s)
}

/// runc 1.0 and 1.1 run poststart hooks in `create`, before the
/// container's process starts, with the state `created`, and fail `create`
/// when one fails; the runtime spec (and runc since 1.2) runs them in
/// `start`, after the process started (state `running`, the container's
/// pid), and a failure only logs a warning. vessel does what the spec
/// says: this turns runc 1.1's outcome of `case` into that.
fn as_runc_1_2(case: &str, mut o: Outcome) -> Outcome {
    if case == "poststart fails" {
        o.steps = ["create", "start", "kill", "delete"]
            .iter()
            .map(|s| (s.to_string(), true))
            .collect();
    }
    for (kind, state) in o.order.iter().zip(o.states.iter_mut()) {
        if kind == "poststart" {
            state["status"] = json!("running");
            state["pid"] = json!("the container's");
        }
    }
    o
}

/// What one runtime did with one case, compared across runtimes.
#[derive(Debug, PartialEq)]
struct Outcome {
    steps: Vec<(String, bool)>,
    order: Vec<String>,
    states: Vec<Value>,
    left: bool,
}

#[test]
fn hooks_match_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    assert!(
        Command::new("runc").arg("--version").output().is_ok(),
        "runc is missing: install Debian's runc"
    );
    let env = CliEnv::new("hooks", "");
    busybox_rootfs(&env.tmp.join("rootfs"), &["sh", "sleep", "cat"]);
    let rts = [
        Rt {
            name: "runc",
            env: &env,
            runc_root: env.tmp.join("runc-root"),
        },
        Rt {
            name: "vessel",
            env: &env,
            runc_root: PathBuf::new(),
        },
    ];
    let host_kinds = ["prestart", "createRuntime", "poststart", "poststop"];
    let version = Command::new("runc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let runc_1_1 =
        version.starts_with("runc version 1.1.") || version.starts_with("runc version 1.0.");
    eprintln!("reference: {}", version.lines().next().unwrap_or("runc"));

    // Each case: hooks built for a log directory, then create, start,
    // kill, delete, stopping at the first failing step (a failing step
    // ends in `delete --force`).
    type Hooks = fn(&Path) -> Value;
    let cases: [(&str, Hooks); 5] = [
        ("all host hooks", |d| {
            json!({"prestart": [hook(d, "prestart", "", None)],
                   "createRuntime": [hook(d, "createRuntime", "", None)],
                   "poststart": [hook(d, "poststart", "", None)],
                   "poststop": [hook(d, "poststop", "", None)]})
        }),
        ("prestart fails", |d| {
            json!({"prestart": [hook(d, "prestart", "echo prestart-broke >&2; exit 3", None)],
                   "createRuntime": [hook(d, "createRuntime", "", None)],
                   "poststop": [hook(d, "poststop", "", None)]})
        }),
        ("createRuntime times out", |d| {
            json!({"createRuntime": [hook(d, "createRuntime", "sleep 30", Some(1))],
                   "poststop": [hook(d, "poststop", "", None)]})
        }),
        ("poststart fails", |d| {
            json!({"poststart": [hook(d, "poststart", "exit 4", None)],
                   "poststop": [hook(d, "poststop", "", None)]})
        }),
        (
            "poststop fails",
            |d| json!({"poststop": [hook(d, "poststop", "exit 5", None)]}),
        ),
    ];
    for (i, (case, hooks)) in cases.iter().enumerate() {
        let mut seen = Vec::new();
        for rt in &rts {
            let dir = rt.log_dir(&i.to_string());
            let b = bundle(&env, &format!("b-{}-{i}", rt.name), hooks(&dir));
            let id = format!("hooks{i}");
            let pf = env.tmp.join(format!("{}-{i}.pid", rt.name));
            let pfs = pf.to_string_lossy().into_owned();
            let t = Instant::now();
            let mut steps = Vec::new();
            let mut pid = 0;
            let mut errors = String::new();
            for step in ["create", "start", "kill", "delete"] {
                let (st, err) = match step {
                    "create" => rt.run(&["create", "--bundle", &b, "--pid-file", &pfs, &id]),
                    "kill" => rt.run(&["kill", &id, "KILL"]),
                    other => rt.run(&[other, &id]),
                };
                errors.push_str(&err);
                steps.push((step.to_string(), st.success()));
                if step == "create" && st.success() {
                    pid = fs::read_to_string(&pf)
                        .ok()
                        .and_then(|p| p.trim().parse().ok())
                        .unwrap_or(0);
                }
                if step == "kill" && st.success() {
                    rt.wait_stopped(&id);
                }
                if !st.success() {
                    rt.force_delete(&id);
                    break;
                }
            }
            let left = rt.state(&id).is_some();
            let order = order(&dir);
            let states = order.iter().map(|k| hook_state(&dir, k, pid, &b)).collect();
            eprintln!(
                "{case} with {}: steps {steps:?}, hooks {order:?} in {:?}; errors: {}",
                rt.name,
                t.elapsed(),
                errors.trim()
            );
            if rt.name == "vessel" {
                if *case == "prestart fails" {
                    assert!(errors.contains("prestart-broke"), "{errors}");
                }
                if *case == "createRuntime times out" {
                    assert!(errors.contains("timed out"), "{errors}");
                    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
                }
                assert!(env.vmms().is_empty(), "{case}: VMMs left");
                assert!(env.root_entries().is_empty(), "{case}: state left");
                assert!(env.run_entries().is_empty(), "{case}: sockets left");
            }
            seen.push(Outcome {
                steps,
                order,
                states,
                left,
            });
        }
        let runc = if runc_1_1 {
            as_runc_1_2(case, seen.remove(0))
        } else {
            seen.remove(0)
        };
        assert_eq!(
            runc, seen[0],
            "{case}: runc (left) and vessel (right) differ"
        );
        if i == 0 {
            assert_eq!(seen[0].order, host_kinds, "{case}");
        }
    }

    // createContainer and startContainer run inside the container's
    // namespaces, which are in the VM: runc runs them, vessel refuses the
    // bundle before anything starts. (runc resolves a createContainer
    // hook before pivot_root, so the host's /bin/sh runs it and writes the
    // host's log; a startContainer hook runs after it.)
    let dir = rts[0].log_dir("createContainer");
    let b = bundle(
        &env,
        "b-createContainer",
        json!({"createContainer": [hook(&dir, "createContainer", "", None)]}),
    );
    let (st, err) = rts[0].run(&["create", "--bundle", &b, "in-ns"]);
    assert!(st.success(), "runc with a createContainer hook: {err}");
    assert_eq!(order(&dir), ["createContainer"]);
    rts[0].force_delete("in-ns");
    for kind in ["createContainer", "startContainer"] {
        let b = bundle(
            &env,
            &format!("b-{kind}"),
            json!({ kind: [hook(&dir, kind, "", None)] }),
        );
        let (st, err) = rts[1].run(&["create", "--bundle", &b, "in-ns"]);
        assert!(!st.success(), "vessel ran a {kind} hook");
        assert!(
            err.contains(&format!("cannot run {kind} hooks")),
            "{kind}: {err}"
        );
        assert!(rts[1].state("in-ns").is_none());
        assert!(env.vmms().is_empty() && env.root_entries().is_empty());
    }
}

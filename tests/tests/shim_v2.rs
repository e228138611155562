//! containerd 1.6 (Debian's `containerd`) runs vessel through its own shim
//! v2, `containerd-shim-vessel-v2` (runtime `io.containerd.vessel.v2`):
//! `ctr run --rm --runtime io.containerd.vessel.v2` of `uname -r` prints
//! the guest kernel's release, `sh -c 'exit 3'` exits 3; stdin reaches the
//! task and its EOF too; a `binary://` logger gets stdout and stderr; an
//! OOM kill shows as `/tasks/oom` in `ctr events`; `task ps`; an exec id
//! used twice and a kill of a stopped task are refused with containerd's
//! codes; a VM killed under a task gives exit 137; a task survives a
//! containerd restart; a shim killed with SIGKILL is cleaned up by
//! containerd's `shim delete`. Afterwards no task, container, shim,
//! `vessel-vmm`, monitor, socket or state is left. (The behaviours shared
//! with runc, exec with and without a pty, metrics, pause/resume, kill,
//! are compared with runc's in `engine_containerd`.)
//!
//! The test starts its own containerd in a network namespace with its own
//! root, state and socket (as `engine_containerd` does), with the shim on
//! its PATH and the test's tag, `VESSEL_CONFIG` and `VESSEL_SHIM_ROOT` in
//! its environment, which every shim it starts inherits.
//!
//! Needs Debian's `containerd`, `umoci`, `busybox-static` and `iproute2`.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use vessel_tests::containerd::{Containerd, Options, IMAGE};
use vessel_tests::engines::{leaks, poll_until, require_tools, wait_within, Timed};
use vessel_tests::{kvm_available_or_skip, workspace_root, Artifacts, TempDir};

const RUNTIME: &str = "io.containerd.vessel.v2";

/// Task sockets in the shim's socket directory, except `known`.
fn shim_sockets(known: &[String]) -> Vec<String> {
    fs::read_dir("/run/vessel-shim")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".sock"))
        .map(|p| format!("socket {p}"))
        .filter(|s| !known.contains(s))
        .collect()
}

/// Runs `cmd` with `input` on its stdin (then closed), output captured,
/// for at most `secs`.
fn with_stdin(mut cmd: Command, input: &str, secs: u64) -> Result<(i32, String), String> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(input.as_bytes());
    }
    let mut out = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let st = wait_within(&mut child, Duration::from_secs(secs))
        .ok_or_else(|| format!("did not exit within {secs} s"))?;
    let out = reader.join().unwrap_or_default();
    Ok((st.code().unwrap_or(-1), out))
}

/// What only the shim v2 path has (the behaviours shared with runc are
/// compared in `engine_containerd`): stdin EOF, a `binary://` logger, a
/// TaskOOM event, `task ps`, and the errors of bad requests.
fn shim_specifics(c: &Containerd, failures: &mut Vec<String>) {
    let events_log = c.tmp.0.join("events.log");
    let mut events = c
        .ctr_cmd(&["events"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&events_log).expect("events.log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ctr events");

    // stdin: ctr closes its end of the FIFO at EOF of its own; cat ends.
    let cmd = c.ctr_cmd(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "stdin",
        "sh",
        "-c",
        "cat; echo after-eof",
    ]);
    match with_stdin(cmd, "from-stdin\n", 300) {
        Ok((0, out)) if out == "from-stdin\nafter-eof\n" => {}
        other => failures.push(format!("run with stdin then EOF: {other:?}")),
    }

    // binary:// logger: fd 3 and 4 are the task's stdout and stderr.
    let logger = c.tmp.0.join("logger.sh");
    let logged = c.tmp.0.join("logged");
    fs::write(
        &logger,
        "#!/bin/sh\ncat <&3 5>&- > \"$2.out\" &\ncat <&4 5>&- > \"$2.err\" &\nexec 5>&-\nwait\n",
    )
    .expect("write logger");
    fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod logger");
    let uri = format!("binary://{}?path={}", logger.display(), logged.display());
    let t = c.ctr(
        &[
            "run",
            "--rm",
            "--log-uri",
            &uri,
            "--runtime",
            RUNTIME,
            IMAGE,
            "logged",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2",
        ],
        300,
    );
    let read = |ext: &str| fs::read_to_string(logged.with_extension(ext)).unwrap_or_default();
    let got = poll_until(Duration::from_secs(10), || {
        (read("out") == "to-out\n" && read("err") == "to-err\n").then_some(())
    });
    if t.code() != 0 || got.is_none() {
        failures.push(format!(
            "binary:// logger: {}; out {:?} err {:?}",
            t.describe("run"),
            read("out"),
            read("err")
        ));
    }

    // OOM: a shell that doubles a string until its 32 MiB limit kills it.
    let t = c.ctr(
        &[
            "run",
            "--rm",
            "--memory-limit",
            "33554432",
            "--runtime",
            RUNTIME,
            IMAGE,
            "oom",
            "sh",
            "-c",
            "x=aaaaaaaa; while :; do x=$x$x; done",
        ],
        300,
    );
    let oom = poll_until(Duration::from_secs(10), || {
        let l = fs::read_to_string(&events_log).unwrap_or_default();
        l.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("\"oom\""))
            .then_some(())
    });
    if t.code() != 137 || oom.is_none() {
        failures.push(format!(
            "OOM kill: {} (want 137); events: {:?}",
            t.describe("run"),
            fs::read_to_string(&events_log).unwrap_or_default()
        ));
    }

    // A running task: a duplicate exec id, `task ps`, then kill of the
    // stopped task. (ctr 1.6 has no `task update`: Update is driven by
    // the CRI test.)
    let t = c.ctr(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "upd",
            "sleep",
            "1000",
        ],
        300,
    );
    if let Err(e) = t.ok("run -d") {
        failures.push(e);
    } else {
        let first = c.ctr(
            &[
                "task",
                "exec",
                "-d",
                "--exec-id",
                "dup",
                "upd",
                "sleep",
                "100",
            ],
            60,
        );
        let second = c.ctr(
            &["task", "exec", "-d", "--exec-id", "dup", "upd", "true"],
            60,
        );
        if first.code() != 0 || second.code() == 0 || !second.stderr.contains("already exists") {
            failures.push(format!(
                "exec id used twice: first {}, second {}",
                first.describe("exec"),
                second.describe("exec")
            ));
        }
        let ps = c.ctr(&["task", "ps", "upd"], 60);
        if ps.code() != 0 || ps.stdout.lines().count() < 3 {
            failures.push(format!("task ps: {}", ps.describe("ps")));
        }
        let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", "upd"], 60);
        let stopped = poll_until(Duration::from_secs(60), || {
            (c.status("upd").ok()? == "STOPPED").then_some(())
        });
        let again = c.ctr(&["task", "kill", "-s", "SIGTERM", "upd"], 60);
        if stopped.is_none() || again.code() == 0 || !again.stderr.contains("not found") {
            failures.push(format!(
                "kill of a stopped task: stopped {stopped:?}, {}",
                again.describe("kill")
            ));
        }
        let _ = c.ctr(&["task", "rm", "-f", "upd"], 60);
        let _ = c.ctr(&["containers", "rm", "upd"], 60);
    }
    let _ = events.kill();
    let _ = events.wait();
}

/// Lifetime and failure: the VM dying under a task (exit 137), a
/// containerd restart (the shim and its task live on and answer), and a
/// shim killed with SIGKILL (containerd's `shim delete` cleans up).
fn lifetime_and_failure(c: &mut Containerd, failures: &mut Vec<String>) {
    let tag = c.tag.clone();
    let procs = |needles: &[&str]| -> Vec<i32> {
        leaks::tagged_processes(&tag)
            .into_iter()
            .filter(|(_, l)| needles.iter().all(|n| l.contains(n)))
            .map(|(p, _)| p)
            .collect()
    };
    let kill9 = |pids: &[i32]| {
        for &p in pids {
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    };
    let stopped = |c: &Containerd, id: &str| {
        poll_until(Duration::from_secs(60), || {
            (c.status(id).ok()? == "STOPPED").then_some(())
        })
        .is_some()
    };
    let run_d = |c: &Containerd, id: &str| -> Result<(), String> {
        c.ctr(
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                id,
                "sleep",
                "1000",
            ],
            300,
        )
        .ok("run -d")
        .map(|_| ())
    };

    // The VM dies (its VMM killed): the task exits 137.
    match run_d(c, "vmdie") {
        Err(e) => failures.push(format!("vmdie: {e}")),
        Ok(()) => {
            let vmms = procs(&["vessel-vmm"]);
            kill9(&vmms);
            let st = stopped(c, "vmdie");
            let rm = c.ctr(&["task", "rm", "vmdie"], 60);
            if vmms.len() != 1 || !st || !rm.stderr.contains("137") {
                failures.push(format!(
                    "VM killed under a task: vmms {vmms:?}, stopped {st}, {}",
                    rm.describe("task rm")
                ));
            }
            let _ = c.ctr(&["containers", "rm", "vmdie"], 60);
        }
    }

    // containerd restarts: the task runs on and answers.
    match run_d(c, "keep") {
        Err(e) => failures.push(format!("keep: {e}")),
        Ok(()) => {
            c.restart();
            let status = c.status("keep");
            let exec = c.ctr(
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    "after",
                    "keep",
                    "echo",
                    "still-here",
                ],
                60,
            );
            let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", "keep"], 60);
            let st = stopped(c, "keep");
            let rm = c.ctr(&["task", "rm", "keep"], 60);
            if status.as_deref() != Ok("RUNNING")
                || exec.stdout.trim() != "still-here"
                || !st
                || rm.code() != 0
            {
                let log = fs::read_to_string(c.tmp.0.join("containerd.log")).unwrap_or_default();
                let about: Vec<&str> = log.lines().filter(|l| l.contains("keep")).collect();
                failures.push(format!(
                    "after a containerd restart: status {status:?}, {}, stopped {st}, {}; \
                     containerd's log about it:\n{}",
                    exec.describe("exec"),
                    rm.describe("task rm"),
                    about.join("\n")
                ));
            }
            let _ = c.ctr(&["containers", "rm", "keep"], 60);
        }
    }

    // The shim is killed: containerd runs `shim delete`, which ends the
    // task's VM and monitor.
    match run_d(c, "orphan") {
        Err(e) => failures.push(format!("orphan: {e}")),
        Ok(()) => {
            let shim = procs(&["containerd-shim-vessel-v2", "-id orphan", "serve"]);
            kill9(&shim);
            let gone = poll_until(Duration::from_secs(60), || {
                (c.status("orphan").ok().as_deref() != Some("RUNNING")).then_some(())
            });
            let _ = c.ctr(&["task", "rm", "-f", "orphan"], 60);
            let _ = c.ctr(&["containers", "rm", "orphan"], 60);
            let vmm_gone = poll_until(Duration::from_secs(30), || {
                procs(&["vessel-vmm"]).is_empty().then_some(())
            });
            if shim.len() != 1 || gone.is_none() || vmm_gone.is_none() {
                failures.push(format!(
                    "shim killed: shim {shim:?}, task gone {gone:?}, VMM gone {vmm_gone:?}; \
                     processes {:?}",
                    leaks::tagged_processes(&tag)
                ));
            }
        }
    }
}

#[test]
fn ctr_runs_tasks_through_the_vessel_shim() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("umoci", "umoci"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ]);
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let release_dir = workspace_root().join("target/release");
    let shim = release_dir.join("containerd-shim-vessel-v2");
    assert!(
        shim.exists() && release_dir.join("vessel").exists(),
        "{} or vessel missing (run `cargo xtask build`)",
        shim.display()
    );
    let tmp = TempDir::new("shim-v2");
    let tag = format!("shimv2-{}", std::process::id());
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-vessel-v2")).expect("symlink");
    let config = tmp.0.join("vessel.toml");
    fs::write(&config, art.vessel_config(&tmp.0.join("templates"), "")).expect("vessel.toml");
    let shim_root = tmp.0.join("shim-root");
    let work = tmp.0.join("image");
    fs::create_dir_all(&work).expect("mkdir image");
    let want = vessel_tests::guest_release(&art.kernel);
    let tmp_path = tmp.0.clone();

    let sockets_before = shim_sockets(&[]);
    let opts = Options {
        bin: Some(&bin),
        env: vec![
            ("VESSEL_CONFIG", config.display().to_string()),
            ("VESSEL_SHIM_ROOT", shim_root.display().to_string()),
        ],
        tagged: true,
        ..Options::default()
    };
    let mut c = Containerd::start(tmp, &tag, "shimv2", &opts);
    c.import_busybox(&work, "default");

    let run = |id: &str, cmd: &[&str]| -> Timed {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        c.ctr(&args, 300)
    };
    let mut failures = Vec::new();
    let t = run("uname", &["uname", "-r"]);
    let got = t.stdout.trim().to_string();
    eprintln!("uname -r: {got:?} (want {want:?}) in {:.1?}", t.took);
    if t.status.map(|s| s.code()) != Some(Some(0)) || got != want {
        failures.push(format!(
            "uname -r: status {:?}, stdout {:?}, stderr {:?}; want {want:?}",
            t.status, t.stdout, t.stderr
        ));
    }
    let t = run("exit3", &["sh", "-c", "exit 3"]);
    eprintln!("exit 3: {:?} in {:.1?}", t.status, t.took);
    if t.status.map(|s| s.code()) != Some(Some(3)) {
        failures.push(format!(
            "sh -c 'exit 3': status {:?}, stderr {:?}",
            t.status, t.stderr
        ));
    }
    shim_specifics(&c, &mut failures);
    lifetime_and_failure(&mut c, &mut failures);
    let (tasks, containers) = (c.list("task"), c.list("containers"));
    if !tasks.is_empty() || !containers.is_empty() {
        failures.push(format!("left: tasks {tasks:?}, containers {containers:?}"));
    }
    // containerd carries the tag too (its shims inherit it from it).
    let daemon = c.pid().map(|p| format!("process {p}:"));
    let find = || -> Vec<String> {
        let mut f = leaks::find(&tag, &[&tmp_path], &[shim_root.as_path()]);
        if let Some(d) = &daemon {
            f.retain(|l| !l.starts_with(d.as_str()));
        }
        f.extend(shim_sockets(&sockets_before));
        f
    };
    if poll_until(Duration::from_secs(20), || find().is_empty().then_some(())).is_none() {
        failures.push(format!("left behind: {:?}", find()));
    }
    if !failures.is_empty() {
        eprintln!("containerd log:\n{}", c.log());
        eprintln!("{}", c.shim_logs("default"));
    }
    drop(c);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

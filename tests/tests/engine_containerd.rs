//! containerd 1.6 (Debian's `containerd`) with its default configuration
//! runs vessel through `ctr run --runc-binary <wrapper>`: every behaviour
//! below is run once with runc and once with vessel, and the two are
//! compared: same stdout, same exit status, same task states. The same
//! behaviours are then run through vessel's own shim v2
//! (`ctr run --runtime io.containerd.vessel.v2`, the shim found on
//! containerd's PATH) and compared with runc's again.
//!
//! The test starts its own containerd inside a network namespace it
//! created (entered with `nsenter --net`, see `engines::Netns`) with its
//! own `--config`: root, state and gRPC socket under the test's temp dir
//! (the CRI plugin needs `restrict_oom_score_adj = true` on these hosts).
//! `--runc-root` keeps the runtime's state there too. The image is built
//! locally: umoci init/new/unpack, the busybox root copied in, repack, the
//! OCI layout tarred and `ctr images import`ed.
//!
//! Behaviours: one `run --rm` whose shell prints many facts at once
//! (`--read-only`, `--cap-drop`, `--memory-limit`, a bind mount, a tmpfs,
//! `--env`, `--cwd`, `--seccomp`, capabilities, hostname) and exits 7; one
//! `run -d` task for `task ls`, `task exec`, `task exec -t` (a pty,
//! resized), `task kill -s SIGUSR1` (seen in its log), `task metrics`,
//! `pause`/`resume`, SIGTERM (ignored by pid 1) then SIGKILL (exit 137),
//! `task start` again and `task rm -f` of the running task; `run -t --rm`
//! on a pty with a resize. Every runtime call is logged by a wrapper
//! script and the vessel calls are printed. At the end no container, task,
//! `vessel-vmm`, monitor, mount, socket or state entry is left.
//!
//! CRI (the runc runtime's `BinaryName` option) is not driven here: Debian
//! has no crictl.
//!
//! Needs Debian's `containerd`, `runc`, `umoci`, `busybox-static` and
//! `iproute2`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vessel_tests::containerd::{Containerd, Options, IMAGE};
use vessel_tests::engines::{
    compare, exits, leaks, poll_until, require_tools, wait_within, Checks, Observed, Pty,
    RuntimePair, Timed, DAEMON_SCRIPT, TTY_SCRIPT,
};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir};

/// The image `ctr images import` makes of the umoci layout.
/// Checks that fail with vessel and that the lead could not fix in time:
/// reported loudly, not asserted (see /work/notes/engine-findings.md).
const KNOWN_FAILING: &[&str] = &[];

/// The `run --rm` task's script: many facts at once, then exit 7.
const FACTS: &str = r#"echo "uid=$(id -u):$(id -g) cwd=$(pwd) foo=$FOO"
echo "host=$(hostname)"
touch /rofile 2>&1
echo "x=$(cat /x/f)"
echo "tmpfs=$(grep ' /t ' /proc/mounts | cut -d' ' -f3)"
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status
echo "mem=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status
exit 7"#;

fn run_cmd(t: Timed, what: &str) -> Result<(), String> {
    t.ok(what).map(|_| ())
}

/// Borrowed views of owned arguments.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Polls `task ls` until task `id` has `want` as its status.
fn wait_status(c: &Containerd, id: &str, want: &str, secs: u64) -> Result<String, String> {
    let mut last = String::new();
    poll_until(Duration::from_secs(secs), || {
        last = c.status(id).unwrap_or_else(|e| e);
        (last == want).then(|| last.clone())
    })
    .ok_or_else(|| format!("{id}: status {last:?} after {secs} s, expected {want:?}"))
}

/// Polls the file `log` until it contains `needle`.
fn wait_log(log: &Path, needle: &str, secs: u64) -> Result<(), String> {
    let mut last = String::new();
    poll_until(Duration::from_secs(secs), || {
        last = fs::read_to_string(log).unwrap_or_default();
        last.contains(needle).then_some(())
    })
    .ok_or_else(|| {
        format!(
            "{}: {last:?} lacks {needle:?} after {secs} s",
            log.display()
        )
    })
}

/// Drives `cmd` (a `-t` ctr command) on a 24x80 pty: waits for `ready`, resizes
/// to 40x120, types `hi`, expects `got:hi`; the container's lines and the
/// exit status.
fn on_pty(mut cmd: Command, secs: u64) -> Result<String, String> {
    let pty = Pty::open(24, 80).map_err(|e| format!("pty: {e}"))?;
    let mut child = pty.spawn(&mut cmd).map_err(|e| format!("spawn ctr: {e}"))?;
    let run = || -> Result<String, String> {
        pty.read_until(Duration::from_secs(secs), |s| s.contains("ready"))?;
        // The client's own first resize (to the terminal's size at start)
        // can still be on its way: a resize sent before it lands would be
        // undone (seen with docker 20.10 `exec -it` and runc).
        std::thread::sleep(Duration::from_secs(2));
        pty.resize(40, 120).map_err(|e| format!("resize: {e}"))?;
        std::thread::sleep(Duration::from_millis(500));
        pty.write("hi\n").map_err(|e| format!("type: {e}"))?;
        pty.read_until(Duration::from_secs(30), |s| s.contains("got:hi"))
    };
    let shown = run();
    let st = wait_within(&mut child, Duration::from_secs(30));
    let shown = shown?;
    let code = st.and_then(|s| s.code()).unwrap_or(-1);
    let text = shown.replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Ok(format!("{} exit={code}", lines.join("|")))
}

/// Every behaviour with the runtime that `ctr run` flags `runtime` select
/// (the runc shim with a wrapper as its runc binary, or vessel's shim v2);
/// `rt` names it in ids and file names.
fn behaviours(c: &Containerd, rt: &str, runtime: &[String], hostdir: &Path) -> Observed {
    let mut out: Observed = Vec::new();
    let bind = format!(
        "type=bind,src={},dst=/x,options=rbind:ro",
        hostdir.display()
    );
    let with = |pre: &[&str], post: &[&str]| -> Vec<String> {
        pre.iter()
            .map(|s| s.to_string())
            .chain(runtime.iter().cloned())
            .chain(post.iter().map(|s| s.to_string()))
            .collect()
    };

    let id_rm = format!("rm-{rt}");
    let args = with(
        &["run", "--rm"],
        &[
            "--read-only",
            "--cap-drop",
            "CAP_NET_RAW",
            "--memory-limit",
            "67108864",
            "--env",
            "FOO=bar",
            "--cwd",
            "/tmp",
            "--mount",
            &bind,
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/t,options=nosuid:nodev",
            "--seccomp",
            IMAGE,
            &id_rm,
            "sh",
            "-c",
            FACTS,
        ],
    );
    let t = c.ctr(&strs(&args), 300);
    eprintln!("[{rt}] run --rm took {:.1?}", t.took);
    // ctr sets no hostname: runc leaves the one the UTS namespace
    // inherited (the host's); compared on its own.
    let facts = exits(&t, "run --rm", 7);
    let host = facts.clone().map(|o| {
        o.lines()
            .filter(|l| l.starts_with("host="))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let rest = facts.map(|o| {
        o.lines()
            .filter(|l| !l.starts_with("host="))
            .collect::<Vec<_>>()
            .join("\n")
    });
    out.push(("run --rm (options, exit 7)", rest));
    out.push(("hostname when the spec sets none", host));

    let id = format!("d-{rt}");
    let n = id.as_str();
    let log = c.tmp.0.join(format!("{id}.out"));
    let log_uri = format!("file://{}", log.display());
    let args = with(
        &["run", "-d", "--log-uri", &log_uri],
        &[IMAGE, n, "sh", "-c", DAEMON_SCRIPT],
    );
    let t = c.ctr(&strs(&args), 300);
    eprintln!("[{rt}] run -d took {:.1?}", t.took);
    let started = run_cmd(t, "run -d").and_then(|()| wait_log(&log, "started", 60));
    out.push(("run -d", started.clone().map(|()| "started".into())));
    if let Err(e) = started {
        let _ = c.ctr(&["task", "rm", "-f", n], 60);
        let _ = c.ctr(&["containers", "rm", n], 60);
        for name in [
            "task ls running",
            "task exec",
            "task exec -t",
            "kill -s SIGUSR1",
            "task metrics",
            "pause",
            "resume",
            "SIGTERM ignored by pid 1",
            "SIGKILL: exit 137",
            "task start again",
            "task rm -f running",
        ] {
            out.push((name, Err(format!("no task: {e}"))));
        }
    } else {
        out.push(("task ls running", c.status(n)));
        let t = c.ctr(
            &[
                "task",
                "exec",
                "--exec-id",
                "e1",
                n,
                "sh",
                "-c",
                "echo exec-out; echo exec-err >&2; exit 5",
            ],
            120,
        );
        out.push((
            "task exec",
            exits(&t, "task exec", 5).map(|o| format!("out={o:?} err={:?}", t.stderr)),
        ));
        let exec_t = on_pty(
            c.ctr_cmd(&[
                "task",
                "exec",
                "-t",
                "--exec-id",
                "e2",
                n,
                "sh",
                "-c",
                TTY_SCRIPT,
            ]),
            120,
        );
        if exec_t.is_err() {
            leaks::release_stuck(&c.tag);
        }
        out.push(("task exec -t", exec_t));
        let usr1 = run_cmd(
            c.ctr(&["task", "kill", "-s", "SIGUSR1", n], 60),
            "kill USR1",
        )
        .and_then(|()| wait_log(&log, "got-usr1", 30))
        .and_then(|()| c.status(n));
        out.push(("kill -s SIGUSR1", usr1));
        let t = c.ctr(&["task", "metrics", n], 60);
        out.push((
            "task metrics",
            t.ok("task metrics").and_then(|t| {
                if t.stdout.contains(n) && t.stdout.contains("memory") {
                    Ok("has memory".to_string())
                } else {
                    Err(format!("metrics printed {:?}", t.stdout))
                }
            }),
        ));
        out.push((
            "pause",
            run_cmd(c.ctr(&["task", "pause", n], 60), "pause").and_then(|()| c.status(n)),
        ));
        out.push((
            "resume",
            run_cmd(c.ctr(&["task", "resume", n], 60), "resume").and_then(|()| c.status(n)),
        ));
        let term = run_cmd(
            c.ctr(&["task", "kill", "-s", "SIGTERM", n], 60),
            "kill TERM",
        )
        .and_then(|()| {
            std::thread::sleep(Duration::from_secs(2));
            c.status(n)
        });
        out.push(("SIGTERM ignored by pid 1", term));
        let kill = run_cmd(
            c.ctr(&["task", "kill", "-s", "SIGKILL", n], 60),
            "kill KILL",
        )
        .and_then(|()| wait_status(c, n, "STOPPED", 60))
        .and_then(|s| {
            let t = c.ctr(&["task", "rm", n], 60);
            t.ok("task rm")?;
            let code = if t.stderr.contains("exit code 137") {
                "137"
            } else {
                "?"
            };
            Ok(format!(
                "{s} exit {code} ({})",
                t.stderr.trim().len().min(1)
            ))
        });
        out.push(("SIGKILL: exit 137", kill));
        let t = c.ctr(&["task", "start", "-d", n], 300);
        eprintln!("[{rt}] task start took {:.1?}", t.took);
        out.push((
            "task start again",
            run_cmd(t, "task start").and_then(|()| wait_status(c, n, "RUNNING", 60)),
        ));
        let removed = run_cmd(c.ctr(&["task", "rm", "-f", n], 120), "task rm -f")
            .and_then(|()| run_cmd(c.ctr(&["containers", "rm", n], 60), "containers rm"))
            .and_then(|()| {
                if c.list("containers").iter().any(|x| x == n) {
                    Err(format!("{n} still listed"))
                } else {
                    Ok("gone".to_string())
                }
            });
        out.push(("task rm -f running", removed));
    }

    let id_it = format!("it-{rt}");
    let args = with(
        &["run", "-t", "--rm"],
        &[IMAGE, &id_it, "sh", "-c", TTY_SCRIPT],
    );
    let r = on_pty(c.ctr_cmd(&strs(&args)), 300);
    if r.is_err() {
        // The client was killed: --rm did not happen.
        leaks::release_stuck(&c.tag);
        let _ = c.ctr(&["task", "rm", "-f", &id_it], 30);
        let _ = c.ctr(&["containers", "rm", &id_it], 30);
    }
    out.push(("run -t (pty, resize)", r));
    out
}

#[test]
fn containerd_runs_vessel_like_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("umoci", "umoci"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ]);
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let tmp = TempDir::new("engine-containerd");
    let tag = format!("containerd-{}", std::process::id());
    let pair = RuntimePair::write(&art, &tmp.0, &tag, &[], &[]);
    let (w_runc, w_vessel) = (&pair.runc, &pair.vessel);
    let hostdir = tmp.0.join("hostdir");
    fs::create_dir_all(&hostdir).expect("mkdir hostdir");
    fs::write(hostdir.join("f"), "from-host").expect("write hostdir/f");
    let runc_root = tmp.0.join("runc-root");
    let vessel_root = tmp.0.join("vessel-root");
    let work = tmp.0.join("image");
    fs::create_dir_all(&work).expect("mkdir image");

    // containerd finds vessel's shim v2 on its PATH; the shim runs the
    // `vessel` next to it with the wrapper pair's configuration. The tag
    // in containerd's environment reaches every shim and what they start.
    let release = vessel_tests::workspace_root().join("target/release");
    let shim = release.join("containerd-shim-vessel-v2");
    assert!(
        shim.exists(),
        "{} missing (run `cargo xtask build`)",
        shim.display()
    );
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-vessel-v2")).expect("symlink");
    let shim_root = tmp.0.join("shim-root");

    let t0 = Instant::now();
    let tmp_path = tmp.0.clone();
    let opts = Options {
        bin: Some(&bin),
        env: vec![
            ("VESSEL_CONFIG", pair.config.display().to_string()),
            ("VESSEL_SHIM_ROOT", shim_root.display().to_string()),
        ],
        tagged: true,
        ..Options::default()
    };
    let c = Containerd::start(tmp, &tag, "containerd", &opts);
    c.import_busybox(&work, "default");

    let shim_flags = |bin: &Path, root: &Path| -> Vec<String> {
        vec![
            "--runc-binary".into(),
            bin.display().to_string(),
            "--runc-root".into(),
            root.display().to_string(),
        ]
    };
    let runc_seen = behaviours(&c, "runc", &shim_flags(&w_runc.path, &runc_root), &hostdir);
    let vessel_seen = behaviours(
        &c,
        "vessel",
        &shim_flags(&w_vessel.path, &vessel_root),
        &hostdir,
    );
    let v2 = [
        "--runtime".to_string(),
        "io.containerd.vessel.v2".to_string(),
    ];
    let v2_seen = behaviours(&c, "v2", &v2, &hostdir);

    let mut checks = Checks::new();
    for ((name, r), (_, v)) in runc_seen.iter().zip(vessel_seen.iter()) {
        checks.record(name, compare(r, v));
    }
    for ((name, r), (_, v)) in runc_seen.iter().zip(v2_seen.iter()) {
        checks.record(&format!("shim v2: {name}"), compare(r, v));
    }
    checks.run("ctr containers and tasks empty", || {
        let (t, k) = (c.list("task"), c.list("containers"));
        (t.is_empty() && k.is_empty())
            .then_some(())
            .ok_or(format!("tasks {t:?}, containers {k:?}"))
    });
    // The shim passes --root <runc-root>/<namespace>.
    let vroot = vessel_root.join("default");
    // containerd itself carries the tag.
    let daemon = c.pid().map(|p| format!("process {p}:"));
    let find = || {
        let mut f = leaks::find(&tag, &[], &[&vroot, &shim_root.join("default")]);
        if let Some(d) = &daemon {
            f.retain(|l| !l.starts_with(d.as_str()));
        }
        f
    };
    checks.run("nothing left behind", || {
        let found = poll_until(Duration::from_secs(20), || find().is_empty().then_some(()));
        found.ok_or_else(|| format!("{:?}", find()))
    });
    eprintln!("vessel verbs the shim used: {:?}", w_vessel.verbs());
    for call in w_vessel.calls() {
        eprintln!("vessel argv: {call}");
    }
    eprintln!("engine test took {:.1?}", t0.elapsed());
    drop(c);
    checks.run("no mounts left", || {
        let m = leaks::mounts_under(&[&tmp_path]);
        m.is_empty().then_some(()).ok_or(format!("{m:?}"))
    });
    checks.finish(KNOWN_FAILING);
}

//! docker 20.10 (Debian's `docker.io`) with its default configuration runs
//! vessel: every behaviour below is run once with runc and once with
//! vessel (`dockerd --add-runtime vessel=<wrapper>`, `docker run
//! --runtime vessel`) and the two are compared: same stdout, same exit
//! status, same state transitions.
//!
//! The test starts its own dockerd inside a network namespace it created
//! (entered with `nsenter --net`, see `engines::Netns`), with a private
//! `--data-root`, `-H unix://…`, `--bridge none --iptables=false` and an
//! `--exec-root` longer than the default `/var/run/docker`: the runtime
//! gets `--root <exec-root>/runtime-runc/moby` and 64-hex container ids,
//! the case that once put vessel's sockets past the 108-byte limit.
//! dockerd starts its own managed containerd under the exec root.
//!
//! Behaviours: one `run --rm` whose shell prints many facts at once
//! (`--read-only`, `--user`, `--cap-drop`, `--memory`, `--pids-limit`,
//! `-v hostdir:/x`, `--tmpfs`, `-e`, `-w`, `--hostname`, `--init`, the
//! default capability and seccomp profiles) and exits 7; one `run -d`
//! container for `inspect`, `logs`, `exec`, `exec -it` (a pty, resized),
//! `kill -s USR1`, `stats`, `pause`/`unpause`, `stop -t 2` (pid 1 ignores
//! SIGTERM, so SIGKILL after the timeout: exit 137), `start` again and
//! `rm -f` of the running container; `run -it --rm` on a pty with a
//! resize. Every runtime call is logged by a wrapper script (its argv), and
//! the vessel calls are printed at the end. At the end no container, no
//! `vessel-vmm`, monitor, mount, socket or state entry of the test is left.
//!
//! Needs Debian's `docker.io`, `containerd`, `runc`, `busybox-static` and
//! `iproute2`; the docker client used is the 20.10 one from `docker.io`,
//! by path (another client on `$PATH` may be a different version).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use vessel_tests::docker::Dockerd;
use vessel_tests::docker::DOCKER;
use vessel_tests::engines::{
    busybox_image_tar, compare, exits, leaks, poll_until, require_tools, wait_within, Checks,
    Observed, Pty, RuntimePair, DAEMON_SCRIPT, TTY_SCRIPT,
};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir};

/// The image `docker import` makes of the busybox root.
const IMAGE: &str = "vessel-busybox:1";
/// Checks that fail with vessel and that the lead could not fix in time:
/// reported loudly, not asserted (see /work/notes/engine-findings.md).
const KNOWN_FAILING: &[&str] = &[];

/// The `run --rm` container's script: many facts at once, then exit 7.
const FACTS: &str = r#"echo "uid=$(id -u):$(id -g) cwd=$(pwd) foo=$FOO host=$(hostname)"
touch /rofile 2>&1
echo "x=$(cat /x/f)"
echo "tmpfs=$(grep ' /t ' /proc/mounts | cut -d' ' -f3)"
grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status
echo "mem=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
echo "pids=$(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)"
grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status
echo "pid1=$(tr '\0' ' ' </proc/1/cmdline)"
exit 7"#;

/// Polls `inspect` until the container's `.State.Status` is `want`.
fn wait_status(d: &Dockerd, name: &str, want: &str, secs: u64) -> Result<(), String> {
    let mut last = String::new();
    let got = poll_until(Duration::from_secs(secs), || {
        last = d
            .inspect(name, "{{.State.Status}}")
            .unwrap_or_else(|e| e.to_string());
        (last == want).then_some(())
    });
    got.ok_or_else(|| format!("{name}: status {last:?} after {secs} s, expected {want:?}"))
}

/// Polls `docker logs` until it contains `needle`; the logs.
fn wait_logs(d: &Dockerd, name: &str, needle: &str, secs: u64) -> Result<String, String> {
    let mut last = String::new();
    poll_until(Duration::from_secs(secs), || {
        let t = d.docker(&["logs", name], 30);
        last = format!("{}{}", t.stdout, t.stderr);
        last.contains(needle).then(|| t.stdout.clone())
    })
    .ok_or_else(|| format!("{name}: logs {last:?} lack {needle:?} after {secs} s"))
}

/// Drives `args` (a `-it` docker command) on a 24x80 pty: waits for `ready`,
/// resizes to 40x120, types `hi`, expects the new size and `got:hi`; the
/// terminal's text (carriage returns dropped) and the exit status.
fn on_pty(d: &Dockerd, args: &[&str], secs: u64) -> Result<String, String> {
    let pty = Pty::open(24, 80).map_err(|e| format!("pty: {e}"))?;
    let mut child = pty
        .spawn(&mut d.docker_cmd(args))
        .map_err(|e| format!("spawn docker: {e}"))?;
    let run = || -> Result<String, String> {
        pty.read_until(Duration::from_secs(secs), |s| s.contains("ready"))?;
        // The client's own first resize (to the terminal's size at start)
        // can still be on its way: a resize sent before it lands would be
        // undone (seen with docker 20.10 `exec -it` and runc).
        std::thread::sleep(Duration::from_secs(2));
        pty.resize(40, 120).map_err(|e| format!("resize: {e}"))?;
        // The client reads the new size on SIGWINCH and sends it on.
        std::thread::sleep(Duration::from_millis(500));
        pty.write("hi\n").map_err(|e| format!("type: {e}"))?;
        pty.read_until(Duration::from_secs(30), |s| s.contains("got:hi"))
    };
    let shown = run();
    let st = wait_within(&mut child, Duration::from_secs(30));
    let shown = shown?;
    let code = st.and_then(|s| s.code()).unwrap_or(-1);
    let text: String = shown.replace('\r', "");
    // Echo of the typed line aside, what the container printed.
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Ok(format!("{} exit={code}", lines.join("|")))
}

/// Every behaviour with runtime `rt`.
fn behaviours(d: &Dockerd, rt: &str, hostdir: &Path) -> Observed {
    let mut out: Observed = Vec::new();
    let x = format!("{}:/x", hostdir.display());

    // run --rm with many options at once.
    let t = d.docker(
        &[
            "run",
            "--rm",
            "--runtime",
            rt,
            "--read-only",
            "--user",
            "1000:1000",
            "--cap-drop",
            "NET_RAW",
            "--memory",
            "64m",
            "--pids-limit",
            "50",
            "-v",
            &x,
            "--tmpfs",
            "/t",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "--hostname",
            "hn",
            "--init",
            IMAGE,
            "sh",
            "-c",
            FACTS,
        ],
        300,
    );
    out.push(("run --rm (options, exit 7)", exits(&t, "run --rm", 7)));
    eprintln!("[{rt}] run --rm took {:.1?}", t.took);

    // One detached container for the rest.
    let name = format!("d-{rt}");
    let n = name.as_str();
    let t = d.docker(
        &[
            "run",
            "-d",
            "--runtime",
            rt,
            "--name",
            n,
            IMAGE,
            "sh",
            "-c",
            DAEMON_SCRIPT,
        ],
        300,
    );
    eprintln!("[{rt}] run -d took {:.1?}", t.took);
    let started = t
        .ok("run -d")
        .map(|_| ())
        .and_then(|()| wait_logs(d, n, "started", 60).map(|_| ()));
    out.push(("run -d", started.clone().map(|()| "started".into())));
    if let Err(e) = started {
        let _ = d.docker(&["rm", "-f", n], 60);
        for c in [
            "inspect running",
            "exec",
            "exec -it",
            "kill -s USR1",
            "stats",
            "pause",
            "unpause",
            "stop -t 2 (SIGKILL after timeout)",
            "start again",
            "rm -f running",
        ] {
            out.push((c, Err(format!("no container: {e}"))));
        }
    } else {
        out.push((
            "inspect running",
            d.inspect(
                n,
                "{{.State.Status}} {{.State.Running}} {{.State.Paused}} {{.HostConfig.Runtime}}",
            )
            .map(|s| s.replace(rt, "RUNTIME")),
        ));
        let t = d.docker(
            &[
                "exec",
                n,
                "sh",
                "-c",
                "echo exec-out; echo exec-err >&2; exit 5",
            ],
            120,
        );
        out.push((
            "exec",
            exits(&t, "exec", 5).map(|o| format!("out={o:?} err={:?}", t.stderr)),
        ));
        let exec_it = on_pty(d, &["exec", "-it", n, "sh", "-c", TTY_SCRIPT], 120);
        if exec_it.is_err() {
            leaks::release_stuck(&d.tag);
        }
        out.push(("exec -it", exec_it));
        let killed = d
            .docker(&["kill", "-s", "USR1", n], 60)
            .ok("kill -s USR1")
            .map(|_| ())
            .and_then(|()| wait_logs(d, n, "got-usr1", 30))
            .and_then(|_| d.inspect(n, "{{.State.Status}}"));
        out.push(("kill -s USR1", killed));
        let t = d.docker(
            &[
                "stats",
                "--no-stream",
                "--format",
                "{{.Name}} {{.MemUsage}}",
                n,
            ],
            60,
        );
        out.push((
            "stats",
            t.ok("stats").and_then(|t| {
                let s = t.stdout.trim();
                if s.starts_with(n) && s.contains('/') {
                    Ok(format!("{} line", s.lines().count()))
                } else {
                    Err(format!("stats printed {s:?}"))
                }
            }),
        ));
        let paused = d
            .docker(&["pause", n], 60)
            .ok("pause")
            .map(|_| ())
            .and_then(|()| d.inspect(n, "{{.State.Status}} {{.State.Paused}}"));
        out.push(("pause", paused));
        let resumed = d
            .docker(&["unpause", n], 60)
            .ok("unpause")
            .map(|_| ())
            .and_then(|()| d.inspect(n, "{{.State.Status}} {{.State.Paused}}"));
        out.push(("unpause", resumed));
        let t = d.docker(&["stop", "-t", "2", n], 120);
        let stopped = t.ok("stop").map(|_| ()).and_then(|()| {
            if t.took < Duration::from_secs(2) {
                return Err(format!(
                    "stop returned after {:.1?}, before the 2 s timeout",
                    t.took
                ));
            }
            d.inspect(n, "{{.State.Status}} {{.State.ExitCode}}")
        });
        out.push(("stop -t 2 (SIGKILL after timeout)", stopped));
        let t = d.docker(&["start", n], 300);
        eprintln!("[{rt}] start took {:.1?}", t.took);
        let again = t
            .ok("start")
            .map(|_| ())
            .and_then(|()| wait_status(d, n, "running", 60))
            .and_then(|()| d.inspect(n, "{{.State.Status}} {{.RestartCount}}"));
        out.push(("start again", again));
        let t = d.docker(&["rm", "-f", n], 120);
        let removed = t.ok("rm -f").map(|_| ()).and_then(|()| {
            if d.containers().iter().any(|c| c == n) {
                Err(format!("{n} still listed after rm -f"))
            } else {
                Ok("gone".to_string())
            }
        });
        out.push(("rm -f running", removed));
    }

    // Interactive run on a pty, resized while it runs.
    let it = format!("it-{rt}");
    let r = on_pty(
        d,
        &[
            "run",
            "-it",
            "--rm",
            "--runtime",
            rt,
            "--name",
            &it,
            IMAGE,
            "sh",
            "-c",
            TTY_SCRIPT,
        ],
        300,
    );
    if r.is_err() {
        // The client was killed: --rm did not happen.
        let _ = d.docker(&["rm", "-f", &it], 60);
    }
    out.push(("run -it (pty, resize)", r));
    out
}

#[test]
fn docker_runs_vessel_like_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("dockerd", "docker.io"),
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ]);
    assert!(
        Path::new(DOCKER).exists(),
        "{DOCKER} missing: install Debian's docker.io"
    );
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let tmp = TempDir::new("engine-docker");
    let tag = format!("docker-{}", std::process::id());
    let pair = RuntimePair::write(&art, &tmp.0, &tag, &[], &[]);
    let (w_runc, w_vessel) = (&pair.runc, &pair.vessel);
    let hostdir = tmp.0.join("hostdir");
    fs::create_dir_all(&hostdir).expect("mkdir hostdir");
    fs::write(hostdir.join("f"), "from-host").expect("write hostdir/f");
    let tar = busybox_image_tar(&tmp.0);

    let t0 = Instant::now();
    let tmp_path = tmp.0.clone();
    let d = Dockerd::start(
        "docker",
        tmp,
        &[("runcw", &w_runc.path), ("vessel", &w_vessel.path)],
        &tag,
        &["--bridge", "none", "--iptables=false", "--ip-masq=false"],
    );
    let t = d.docker(
        &[
            "import",
            "-c",
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            &tar.to_string_lossy(),
            IMAGE,
        ],
        120,
    );
    t.ok("docker import").unwrap_or_else(|e| panic!("{e}"));

    let runc_seen = behaviours(&d, "runcw", &hostdir);
    let vessel_seen = behaviours(&d, "vessel", &hostdir);

    let mut checks = Checks::new();
    for ((name, r), (_, v)) in runc_seen.iter().zip(vessel_seen.iter()) {
        checks.record(name, compare(r, v));
    }
    let runtime_root = d.runtime_root();
    checks.run("runtime --root is the long exec-root one", || {
        let want = format!("--root {}", runtime_root.display());
        let calls = w_vessel.calls();
        if !calls.is_empty() && calls.iter().all(|c| c.starts_with(&want)) {
            Ok(())
        } else {
            Err(format!("vessel calls lack {want:?}: {calls:?}"))
        }
    });
    checks.run("docker ps -a empty", || {
        let left = d.containers();
        left.is_empty()
            .then_some(())
            .ok_or(format!("left: {left:?}"))
    });
    checks.run("nothing left behind", || {
        let found = poll_until(Duration::from_secs(20), || {
            let f = leaks::find(&tag, &[], &[&runtime_root]);
            f.is_empty().then_some(())
        });
        found.ok_or_else(|| format!("{:?}", leaks::find(&tag, &[], &[&runtime_root])))
    });

    eprintln!("vessel verbs dockerd used: {:?}", w_vessel.verbs());
    for c in w_vessel.calls() {
        eprintln!("vessel argv: {c}");
    }
    eprintln!("engine test took {:.1?}", t0.elapsed());
    drop(d);
    checks.run("no mounts left", || {
        let m = leaks::mounts_under(&[&tmp_path]);
        m.is_empty().then_some(()).ok_or(format!("{m:?}"))
    });
    checks.finish(KNOWN_FAILING);
}

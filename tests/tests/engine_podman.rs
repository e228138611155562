//! podman 4.3 (Debian's, through conmon, its default) runs vessel: every
//! behaviour of issue 14 is run with runc and with vessel by the same
//! podman, and the two are compared (stdout, exit code, state).
//!
//! The engine is the test's own ([`vessel_tests::podman::Podman`]: private
//! storage, containers.conf, runtime state and network namespace; runc by
//! path, vessel by its containers.conf name; every runtime call logged with
//! its time and exit code, printed at the end). The image is a local busybox
//! image (`podman import` of a tar of Debian's static busybox).
//!
//! Containers per runtime (a vessel container costs 5-30 s to start here):
//! one `run --rm` of a shell printing many facts, writing to stderr and
//! exiting 3 (`--read-only --user --cap-drop --cap-add --memory --pids-limit
//! -v --tmpfs -e -w --hostname --init`); `create` + `start` of a
//! long-running container used for `exec`, `exec -it`, default capabilities
//! and seccomp, `pause`, `unpause`, `stats`, `inspect`, `logs` and `stop -t
//! 2` (SIGTERM ignored by a pid 1 without a handler, then SIGKILL: 137); a
//! container that traps USR1 for `kill -s USR1`, then `kill` (SIGKILL: 137);
//! one for `rm -f` of a stuck container; `run -it` driven through a pty,
//! with a resize. At the end: podman's `ps -a` is empty and nothing is left
//! (no tagged process, `vessel-vmm`, mount, socket, state entry or podman
//! network namespace), and
//! podman called vessel with the same verbs as runc.
//!
//! Needs podman, conmon, netavark, catatonit, runc (Debian packages, `.ci/run`
//! installs them) and /dev/kvm.

use std::fmt::Debug;
use std::fs;
use std::time::{Duration, Instant};

use vessel_tests::engines::{leaks, poll_until, require_tools, same, wait_within, Checks, Pty};
use vessel_tests::podman::{Podman, Rt, IMAGE, SHORT, START};
use vessel_tests::{kvm_available_or_skip, Artifacts};

/// Checks that fail with vessel today and are reported, not asserted (see
/// /work/notes/engine-findings.md for each). Keep this empty when possible.
const KNOWN_FAILING: &[&str] = &[];

/// The lines of two outputs that differ, as `runc X / vessel Y`.
fn differing_lines(runc: &str, vessel: &str) -> Vec<String> {
    let (r, v): (Vec<&str>, Vec<&str>) = (runc.lines().collect(), vessel.lines().collect());
    (0..r.len().max(v.len()))
        .filter(|&i| r.get(i) != v.get(i))
        .map(|i| format!("runc {:?} / vessel {:?}", r.get(i), v.get(i)))
        .collect()
}

/// Runs `f` for runc, then for vessel, and compares the two observations.
fn both<T: PartialEq + Debug>(
    what: &str,
    mut f: impl FnMut(Rt) -> Result<T, String>,
) -> Result<(), String> {
    let r = f(Rt::Runc).map_err(|e| format!("runc: {e}"))?;
    let v = f(Rt::Vessel).map_err(|e| format!("vessel: {e}"))?;
    same(what, r, v)
}

/// Fails unless `got` is `want` (for the runc side's expectations, and the
/// vessel side's too).
fn expect<T: PartialEq + Debug>(what: &str, want: T, got: T) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("{what}: expected {want:?}, got {got:?}"))
    }
}

/// A shell printing facts about its container, one per line, the same
/// with runc (host cgroup v1) and vessel (guest cgroup v2). Shell builtins
/// only, but for `id`: each process costs the vessel guest 0.5-2 s here.
const FACTS: &str = r#"id
echo cwd=$PWD foo=$FOO
read h < /proc/sys/kernel/hostname; echo hostname=$h
( : > /rootfile ) 2>/dev/null && echo root=writable || echo root=read-only
read m < /x/marker; echo x=$m
echo from-container > /x/out && echo x-write=ok
while read -r dev mnt fs rest; do [ "$mnt" = /t ] && echo t=$dev $fs; done < /proc/mounts
echo tmp > /t/f && echo t-write=ok
while read -r k v; do
  case $k in CapInh:|CapPrm:|CapEff:|CapBnd:|CapAmb:|NoNewPrivs:|Seccomp:) echo $k $v ;; esac
done < /proc/self/status
m=; n=
{ read m < /sys/fs/cgroup/memory.max || read m < /sys/fs/cgroup/memory/memory.limit_in_bytes; } 2>/dev/null
{ read n < /sys/fs/cgroup/pids.max || read n < /sys/fs/cgroup/pids/pids.max; } 2>/dev/null
echo memory.max=$m pids.max=$n
read c < /proc/1/comm; echo pid1=$c
echo done
echo oops >&2
exit 3"#;

/// The long-running container's command: says it started, ignores nothing
/// (a pid 1 without handlers: SIGTERM has no effect), sleeps.
const LONG: &str = "echo started; exec sleep 1000";

/// A shell that reports USR1 and otherwise waits (pid 1: TERM ignored)
/// without a loop of forks (each costs the guest about 0.2 s of emulated
/// kernel time).
const TRAPS: &str = "trap 'echo got-usr1' USR1; sleep 1000 & echo ready; while :; do wait $!; done";

#[test]
fn podman_runs_vessel_like_runc() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("podman", "podman"),
        ("conmon", "conmon"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("tar", "tar"),
    ]);
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let p = Podman::new(&art, "podman");
    p.import_busybox().unwrap_or_else(|e| panic!("{e}"));
    let hostdir = p.tmp.join("hostdir");
    fs::create_dir_all(&hostdir).expect("hostdir");
    // `--user 1000` writes there.
    fs::set_permissions(
        &hostdir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod hostdir");
    fs::write(hostdir.join("marker"), "from-host\n").expect("marker");

    // podman 4 names each container's network namespace
    // /run/netns/netns-<uuid> (the host's /run: only the network namespace
    // is the test's): none of ours may be left.
    let netns_files = || -> Vec<String> {
        leaks::entries(std::path::Path::new("/run/netns"))
            .into_iter()
            .filter(|n| n.starts_with("netns-"))
            .collect()
    };
    let netns_before = netns_files();
    let mut checks = Checks::new();

    // run --rm: output, stderr, exit code.
    // One `run --rm` per runtime, with many options: its shell prints the
    // facts, writes to stderr and exits 3.
    let x = format!("{}:/x", hostdir.display());
    let mut facts = Vec::new();
    for rt in [Rt::Runc, Rt::Vessel] {
        let _ = fs::remove_file(hostdir.join("out"));
        let t = p.with(
            rt,
            &[
                "run",
                "--rm",
                "--read-only",
                "--user",
                "1000:1000",
                "--cap-drop",
                "ALL",
                "--cap-add",
                "CHOWN",
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
                "hh",
                "--init",
                IMAGE,
                "sh",
                "-c",
                FACTS,
            ],
            START,
        );
        eprintln!("{} run --rm (facts): {:.1?}", rt.name(), t.took);
        let host = fs::read_to_string(hostdir.join("out")).unwrap_or_default();
        facts.push((t, host));
    }
    checks.run("run-rm-output-exit", || {
        for (rt, (t, _)) in [Rt::Runc, Rt::Vessel].into_iter().zip(&facts) {
            let got = (
                t.code(),
                t.stdout.ends_with("done\n"),
                t.stderr.contains("oops"),
            );
            expect(&format!("{} run --rm", rt.name()), (3, true, true), got)
                .map_err(|e| format!("{e}; {}", t.describe("run --rm")))?;
        }
        Ok(())
    });
    // The container's own cgroup limits, as the container sees them in
    // /sys/fs/cgroup (a check of its own: the rest of the facts must not
    // hide behind it).
    let is_limits = |l: &&str| l.starts_with("memory.max=");
    checks.run("cgroup-limits-visible", || {
        let lines: Vec<Vec<&str>> = facts
            .iter()
            .map(|(t, _)| t.stdout.lines().filter(is_limits).collect())
            .collect();
        expect(
            "runc",
            vec!["memory.max=67108864 pids.max=50"],
            lines[0].clone(),
        )?;
        same("limits seen inside", &lines[0], &lines[1])
    });
    checks.run("run-rm-options", || {
        let (r, v) = (&facts[0], &facts[1]);
        let keep = |out: &str| -> String {
            out.lines()
                .filter(|l| !is_limits(l))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let mut diff = differing_lines(&keep(&r.0.stdout), &keep(&v.0.stdout));
        if r.1 != v.1 {
            diff.push(format!(
                "host file written through -v: runc {:?}, vessel {:?}",
                r.1, v.1
            ));
        }
        if r.1 != "from-container\n" {
            diff.push(format!("runc wrote {:?} through -v", r.1));
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(diff.join("; "))
        }
    });

    // create + start: the long-running container of each runtime.
    let long = |rt: Rt| format!("long-{}", rt.name());
    checks.run("create-start-states", || {
        both("states", |rt| {
            let name = long(rt);
            let t = p.with(
                rt,
                &["create", "--name", &name, IMAGE, "sh", "-c", LONG],
                START,
            );
            t.ok("create")?;
            let created = p.inspect(&name, "{{.State.Status}}")?;
            let t = p.with(rt, &["start", &name], START);
            eprintln!("{} start: {:.1?}", rt.name(), t.took);
            t.ok("start")?;
            let running = p.inspect(&name, "{{.State.Status}} {{.State.Running}}")?;
            let pid = p.inspect(&name, "{{.State.Pid}}")?;
            let pid_ok = pid.parse::<i64>().map(|n| n > 0).unwrap_or(false);
            expect(
                "states",
                ("created", "running true", true),
                (created.as_str(), running.as_str(), pid_ok),
            )?;
            Ok((created, running, pid_ok))
        })
    });

    checks.run("exec", || {
        both("exec", |rt| {
            let t = p.with(
                rt,
                &[
                    "exec",
                    "-e",
                    "E=1",
                    "-w",
                    "/tmp",
                    &long(rt),
                    "sh",
                    "-c",
                    "echo out $E $PWD; echo err >&2; exit 4",
                ],
                SHORT,
            );
            expect(
                "exec",
                (4, "out 1 /tmp\n", true),
                (t.code(), t.stdout.as_str(), t.stderr.contains("err")),
            )
            .map_err(|e| format!("{e}; {}", t.describe("exec")))?;
            Ok((t.code(), t.stdout.clone()))
        })
    });

    checks.run("exec-user", || {
        both("exec --user", |rt| {
            let t = p.with(
                rt,
                &["exec", "--user", "65534", &long(rt), "id", "-u"],
                SHORT,
            );
            t.ok("exec --user")?;
            Ok(t.stdout.clone())
        })
    });

    checks.run("exec-it", || {
        both("exec -it", |rt| {
            let pty = Pty::open(25, 90).map_err(|e| e.to_string())?;
            let name = long(rt);
            let runtime = p.runtime_arg(rt);
            let mut child = pty
                .spawn(&mut p.cmd(&["--runtime", &runtime, "exec", "-it", &name, "sh"]))
                .map_err(|e| e.to_string())?;
            let r = terminal_session(&pty, 6);
            let st = wait_within(&mut child, SHORT);
            let (tty, size) = r?;
            let code = st.and_then(|s| s.code());
            expect(
                "exec -it",
                (true, Some(6)),
                (tty.starts_with("/dev/pts/"), code),
            )?;
            Ok((size, code))
        })
    });

    // Default capability and seccomp profiles, from an exec.
    checks.run("default-caps-seccomp", || {
        both("profiles", |rt| {
            let t = p.with(
                rt,
                &[
                    "exec",
                    &long(rt),
                    "grep",
                    "-E",
                    "^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):",
                    "/proc/self/status",
                ],
                SHORT,
            );
            t.ok("exec grep")?;
            Ok(t.stdout.clone())
        })
    });

    checks.run("pause-unpause", || {
        both("pause", |rt| {
            let name = long(rt);
            p.with(rt, &["pause", &name], SHORT).ok("pause")?;
            let paused = p.inspect(&name, "{{.State.Status}} {{.State.Paused}}")?;
            p.with(rt, &["unpause", &name], SHORT).ok("unpause")?;
            let after = p.inspect(&name, "{{.State.Status}} {{.State.Paused}}")?;
            // It still answers after unpause.
            let t = p.with(rt, &["exec", &name, "echo", "alive"], SHORT);
            t.ok("exec after unpause")?;
            expect(
                "pause",
                ("paused true", "running false", "alive\n"),
                (paused.as_str(), after.as_str(), t.stdout.as_str()),
            )?;
            Ok((paused, after))
        })
    });

    checks.run("stats", || {
        both("stats", |rt| {
            let t = p.with(
                rt,
                &[
                    "stats",
                    "--no-stream",
                    "--format",
                    "{{.Name}} {{.PIDs}} {{.MemUsage}}",
                    &long(rt),
                ],
                SHORT,
            );
            t.ok("stats")?;
            let line = t.stdout.trim().to_string();
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pids: u64 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
            if pids == 0 || !line.contains('/') {
                return Err(format!("stats line {line:?}: no pids or memory usage"));
            }
            Ok(fields
                .first()
                .map(|n| n.to_string())
                .unwrap_or_default()
                .replace(rt.name(), "RT"))
        })
    });

    checks.run("logs", || {
        both("logs", |rt| {
            let t = p.with(rt, &["logs", &long(rt)], SHORT);
            t.ok("logs")?;
            Ok(t.stdout.clone())
        })
    });

    checks.run("stop-timeout-137", || {
        both("stop", |rt| {
            let name = long(rt);
            let t = p.with(rt, &["stop", "-t", "2", &name], SHORT);
            t.ok("stop")?;
            let st = p.inspect(&name, "{{.State.Status}} {{.State.ExitCode}}")?;
            eprintln!("{} stop -t 2: {:.1?}", rt.name(), t.took);
            expect("stop", "exited 137", st.as_str())?;
            if t.took < Duration::from_secs(2) {
                return Err(format!("stop took {:?}: SIGTERM was not ignored", t.took));
            }
            p.with(rt, &["rm", &name], SHORT).ok("rm")?;
            Ok(st)
        })
    });

    checks.run("kill-signal-and-kill", || {
        both("kill", |rt| {
            let name = format!("traps-{}", rt.name());
            p.with(
                rt,
                &["run", "-d", "--name", &name, IMAGE, "sh", "-c", TRAPS],
                START,
            )
            .ok("run -d")?;
            poll_until(SHORT, || {
                let t = p.podman(&["logs", &name], SHORT);
                t.stdout.contains("ready").then_some(())
            })
            .ok_or("never printed ready")?;
            p.with(rt, &["kill", "-s", "USR1", &name], SHORT)
                .ok("kill -s USR1")?;
            let logs = poll_until(SHORT, || {
                let t = p.podman(&["logs", &name], SHORT);
                t.stdout.contains("got-usr1").then_some(t.stdout)
            })
            .ok_or("USR1 not seen by the container")?;
            p.with(rt, &["kill", &name], SHORT).ok("kill")?;
            p.wait_status(&name, "exited", SHORT)?;
            let code = p.inspect(&name, "{{.State.ExitCode}}")?;
            p.with(rt, &["rm", &name], SHORT).ok("rm")?;
            expect("kill exit code", "137", code.as_str())?;
            Ok((logs, code))
        })
    });

    checks.run("rm-f-stuck", || {
        both("rm -f", |rt| {
            let name = format!("stuck-{}", rt.name());
            p.with(
                rt,
                &["run", "-d", "--name", &name, IMAGE, "sleep", "1000"],
                START,
            )
            .ok("run -d")?;
            let t = p.with(rt, &["rm", "-f", "-t", "2", &name], SHORT);
            t.ok("rm -f")?;
            let gone = p.podman(
                &["ps", "-a", "-q", "--filter", &format!("name={name}")],
                SHORT,
            );
            Ok(gone.stdout.trim().to_string())
        })
    });

    checks.run("run-it-resize", || {
        both("run -it", |rt| {
            let pty = Pty::open(30, 100).map_err(|e| e.to_string())?;
            let runtime = p.runtime_arg(rt);
            let mut child = pty
                .spawn(&mut p.cmd(&["--runtime", &runtime, "run", "-it", "--rm", IMAGE, "sh"]))
                .map_err(|e| e.to_string())?;
            let r = terminal_session(&pty, 7);
            let st = wait_within(&mut child, SHORT);
            let (tty, sizes) = r?;
            let code = st.and_then(|s| s.code());
            expect("run -it", (true, Some(7)), (tty.starts_with("/dev/"), code))?;
            Ok((sizes, code))
        })
    });

    // Containers a failed check left: podman removes them (its `rm -f` is
    // one of the behaviours), then nothing may be left at all.
    let t = p.podman(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"], SHORT);
    if !t.stdout.trim().is_empty() {
        eprintln!("containers left by failed checks:\n{}", t.stdout);
    }
    checks.run("rm-af-leftovers", || {
        p.podman(&["rm", "-af", "-t", "2"], START)
            .ok("rm -af")
            .map(|_| ())
    });
    checks.run("no-leftovers", || {
        let t = p.podman(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"], SHORT);
        t.ok("ps -a")?;
        let mut left: Vec<String> = t
            .stdout
            .lines()
            .map(|l| format!("podman ps -a: {l}"))
            .collect();
        left.extend(
            netns_files()
                .into_iter()
                .filter(|n| !netns_before.contains(n))
                .map(|n| format!("network namespace /run/netns/{n}")),
        );
        left.extend(leaks::find(
            &p.tag,
            &[&p.vessel_state, &p.runc_state],
            &[&p.vessel_state, &p.runc_state],
        ));
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left behind: {left:#?}"))
        }
    });

    // The calls podman made, for the record (and the findings file).
    for rt in [Rt::Runc, Rt::Vessel] {
        let w = p.wrapper(rt);
        eprintln!(
            "--- {} calls by podman ({}): verbs {:?}",
            rt.name(),
            w.calls().len(),
            w.verbs()
        );
        for c in w.timed_calls() {
            eprintln!("  {c}");
        }
    }
    checks.record(
        "same-runtime-verbs",
        same("verbs podman used", p.runc.verbs(), p.vessel.verbs()),
    );
    eprintln!("podman engine test: {:.1?}", t0.elapsed());
    drop(p);
    checks.finish(KNOWN_FAILING);
}

/// Drives an interactive shell on `pty`: waits for the prompt, prints the
/// tty name and size, resizes the terminal, prints the size again, exits
/// with `code`. Returns the tty name and the two sizes.
fn terminal_session(pty: &Pty, code: u8) -> Result<(String, (String, String)), String> {
    let long = Duration::from_secs(180);
    pty.read_until(long, |s| s.contains("# "))
        .map_err(|e| format!("no prompt: {e}"))?;
    pty.write("echo tty=$(tty)= size=$(stty size)= mark-$((6*7))\n")
        .map_err(|e| e.to_string())?;
    let first = pty
        .read_until(SHORT, |s| s.contains("mark-42"))
        .map_err(|e| format!("first answer: {e}"))?;
    let tty = between(&first, "tty=", "=").unwrap_or_default();
    let size1 = between(&first, "size=", "=").unwrap_or_default();
    let (rows, cols) = size1
        .split_once(' ')
        .and_then(|(r, c)| Some((r.parse::<u16>().ok()?, c.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("no size in {first:?}"))?;
    pty.resize(rows + 10, cols + 20)
        .map_err(|e| e.to_string())?;
    // The resize travels engine -> runtime -> terminal asynchronously: ask
    // again until it shows (bounded).
    let want = format!("{} {}", rows + 10, cols + 20);
    let mut size2 = String::new();
    for n in 0..20 {
        pty.write(&format!("echo size=$(stty size)= mark-{n}x$((5*5))\n"))
            .map_err(|e| e.to_string())?;
        let mark = format!("mark-{n}x25");
        let out = pty
            .read_until(SHORT, |s| s.contains(&mark))
            .map_err(|e| format!("size after resize: {e}"))?;
        size2 = between(&out, "size=", "=").unwrap_or_default();
        if size2 == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    pty.write(&format!("exit {code}\n"))
        .map_err(|e| e.to_string())?;
    if size2 != want {
        return Err(format!(
            "size {size1:?} then {size2:?} after resizing to {want:?}"
        ));
    }
    Ok((tty, (size1, size2)))
}

/// The text between the first `start` followed by a non-`$` character and
/// the next `end` (skips the echoed command line, which has `$(`).
fn between(s: &str, start: &str, end: &str) -> Option<String> {
    let mut rest = s;
    while let Some(i) = rest.find(start) {
        let after = rest.get(i + start.len()..)?;
        if !after.starts_with('$') {
            let j = after.find(end)?;
            return Some(after.get(..j)?.to_string());
        }
        rest = after;
    }
    None
}

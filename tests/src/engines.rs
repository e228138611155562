//! What the engine end-to-end tests (podman, docker, containerd) share:
//!
//! - [`Netns`]: a network namespace the test creates and deletes, and
//!   commands run inside it. `nsenter --net` is used rather than
//!   `ip netns exec`, which also remounts `/sys` for the new namespace and so
//!   hides `/sys/fs/cgroup`: runc then fails with "no cgroup mount found in
//!   mountinfo" (measured with podman 4.3 + runc 1.1.5 here).
//! - [`busybox_image_rootfs`] / [`tar_dir`]: the root file system of a
//!   busybox image (Debian's static busybox with every applet linked) and
//!   its tar, for `podman import`, `docker import` or umoci.
//! - [`RuntimeWrapper`]: a shell script between the engine and the runtime
//!   that logs every call's argv (and, when it ends, its time and exit code) (the issue asks for it: that is how engine
//!   calls vessel does not handle are found), keeps a copy of each bundle's
//!   `config.json`, tags the runtime's processes with an environment
//!   variable (see [`TAG_VAR`]) and passes fixed leading arguments
//!   (`--root`, `--config`).
//! - [`Checks`]: named checks, so the first failure does not hide the rest,
//!   with a list of known failures that are reported loudly, not asserted.
//! - Leak checks ([`leaks`]): processes carrying the tag (a `vessel-vmm`, a
//!   monitor, a runtime call that never returned), mounts and sockets under
//!   the test's directories, state left under a runtime's `--root`.
//! - [`Pty`]: a pseudo-terminal to drive `run -it` / `exec -it` with, and
//!   to resize.
//! - [`output_within`]: run a command with a time bound, killing it when the
//!   bound passes (every wait of these tests is bounded).

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Environment variable the wrappers set on every runtime call; its value
/// (a per-test tag) is inherited by everything the runtime leaves running
/// (vessel's monitor and `vessel-vmm`), which is how leaks are found even
/// when their command lines name no test directory.
pub const TAG_VAR: &str = "VESSEL_ENGINE_TEST";

/// Panics, naming the Debian packages to install, when a tool is missing.
/// `tools` are (binary name, Debian package) pairs.
pub fn require_tools(tools: &[(&str, &str)]) {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(bin, pkg)| format!("{bin} (Debian package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing tools: {}; .ci/run installs them (apt-get install)",
        missing.join(", ")
    );
}

/// The first `name` on `$PATH` (plus the sbin directories root has).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .collect();
    dirs.iter().map(|d| Path::new(d).join(name)).find(|p| {
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// A network namespace created for one test (`vessel-<engine>-<pid>`), with
/// its loopback up; deleted on drop. The engine runs inside it, so its
/// bridge and firewall rules never reach the host's interfaces.
pub struct Netns {
    /// Name under `/run/netns`.
    pub name: String,
    /// `/run/netns/<name>`.
    pub path: PathBuf,
}

impl Netns {
    /// Creates `vessel-<engine>-<pid>` (deleting a stale one of that name
    /// first) and brings its loopback up. Panics when `ip` fails.
    pub fn new(engine: &str) -> Netns {
        let name = format!("vessel-{engine}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add (Debian package iproute2)");
        assert!(st.success(), "ip netns add {name}: {st}");
        let ns = Netns {
            path: Path::new("/run/netns").join(&name),
            name,
        };
        let st = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip -n {} link set lo up: {st}", ns.name);
        ns
    }

    /// `program` run inside the namespace (`nsenter --net=PATH -- program`);
    /// mounts, pid namespace and the rest stay the host's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// The root file system of a busybox image in `dir`: Debian's static
/// `/bin/busybox` with every applet it lists linked to it, `/etc/passwd`
/// and `/etc/group` (root and nobody), and the usual mount points.
pub fn busybox_image_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static"
    );
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "etc", "root", "run", "var/tmp",
    ] {
        let p = dir.join(d);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod /tmp");
    fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .unwrap_or_else(|e| panic!("{}: {e}", link.display()));
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .expect("write /etc/passwd");
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("write /etc/group");
}

/// `tar -C dir -cf out .` (numeric owners, so the image does not depend on
/// the host's user names).
pub fn tar_dir(dir: &Path, out: &Path) {
    let st = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(st.success(), "tar of {}: {st}", dir.display());
}

/// The busybox image root ([`busybox_image_rootfs`]) built in
/// `work/busybox-rootfs` and packed as `work/busybox.tar`; the tar's path.
pub fn busybox_image_tar(work: &Path) -> PathBuf {
    let rootfs = work.join("busybox-rootfs");
    busybox_image_rootfs(&rootfs);
    let tar = work.join("busybox.tar");
    tar_dir(&rootfs, &tar);
    tar
}

/// A runtime wrapper script: what an engine is told the runtime is.
#[derive(Clone, Debug)]
pub struct RuntimeWrapper {
    /// The script.
    pub path: PathBuf,
    /// One line per call: the arguments the engine passed, space-joined,
    /// written when the call starts. `<log>.times` gets a line per call
    /// when it ends: `<ms> ms, exit <code>: <arguments>`.
    pub log: PathBuf,
    /// Copies of each bundle's `config.json`, named `<last argument>.json`
    /// (the container id for `create`/`run`).
    pub specs: PathBuf,
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl RuntimeWrapper {
    /// Writes the script at `path`: it appends its arguments to `log`,
    /// copies `<--bundle>/config.json` into `specs` when there is a bundle,
    /// exports [`TAG_VAR`]`=tag`, runs `target leading... "$@"` (as a child,
    /// not with `exec`, to time it), logs the time and exit code and exits
    /// with that code.
    pub fn write(
        path: &Path,
        target: &Path,
        leading: &[&str],
        log: &Path,
        specs: &Path,
        tag: &str,
    ) -> RuntimeWrapper {
        fs::create_dir_all(specs).unwrap_or_else(|e| panic!("{}: {e}", specs.display()));
        let lead: Vec<String> = leading.iter().map(|a| shell_quote(a)).collect();
        let script = format!(
            r#"#!/bin/sh
# Written by vessel's engine tests: logs each call, then runs the runtime.
printf '%s\n' "$*" >> {log}
b=; prev=; last=
for a in "$@"; do
    case "$prev" in --bundle|-b) b="$a" ;; esac
    case "$a" in --bundle=*) b="${{a#--bundle=}}" ;; esac
    prev="$a"; last="$a"
done
if [ -n "$b" ] && [ -f "$b/config.json" ]; then
    cp "$b/config.json" {specs}/"$last".json 2>/dev/null
fi
export {TAG_VAR}={tag}
start=$(date +%s%N)
{target} {lead} "$@"
rc=$?
end=$(date +%s%N)
printf '%s ms, exit %s: %s\n' $(( (end - start) / 1000000 )) $rc "$*" >> {times}
exit $rc
"#,
            log = shell_quote(&log.to_string_lossy()),
            times = shell_quote(&format!("{}.times", log.to_string_lossy())),
            specs = shell_quote(&specs.to_string_lossy()),
            tag = shell_quote(tag),
            target = shell_quote(&target.to_string_lossy()),
            lead = lead.join(" "),
        );
        fs::write(path, script).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        RuntimeWrapper {
            path: path.to_path_buf(),
            log: log.to_path_buf(),
            specs: specs.to_path_buf(),
        }
    }

    /// The calls that ended so far, with their time and exit code.
    pub fn timed_calls(&self) -> Vec<String> {
        fs::read_to_string(format!("{}.times", self.log.display()))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls logged so far.
    pub fn calls(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls logged after the first `skip` (see [`RuntimeWrapper::calls`]).
    pub fn calls_since(&self, skip: usize) -> Vec<String> {
        self.calls().into_iter().skip(skip).collect()
    }

    /// The distinct verbs (first argument not starting with `-`, skipping
    /// the values of the wrapper's known global flags) seen so far.
    pub fn verbs(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for call in self.calls() {
            let mut words = call.split_whitespace();
            let mut verb = None;
            while let Some(w) = words.next() {
                if matches!(w, "--root" | "--log" | "--log-format" | "--config") {
                    words.next();
                } else if !w.starts_with('-') {
                    verb = Some(w.to_string());
                    break;
                }
            }
            if let Some(v) = verb {
                if !out.contains(&v) {
                    out.push(v);
                }
            }
        }
        out
    }
}

/// The two runtimes an engine test compares, each behind an argv-logging
/// [`RuntimeWrapper`] in `dir`: runc as installed, and this build's vessel
/// with a config file of its own (templates in the directory all tests
/// share), so the engine's default configuration calls them as it calls
/// runc.
pub struct RuntimePair {
    /// The runc wrapper (`dir/runc-wrapper`, calls in `dir/runc-argv.log`).
    pub runc: RuntimeWrapper,
    /// The vessel wrapper (`dir/vessel-wrapper`, calls in `dir/vessel-argv.log`).
    pub vessel: RuntimeWrapper,
    /// vessel's config file.
    pub config: PathBuf,
}

impl RuntimePair {
    /// Writes both wrappers and vessel's config into `dir`; `runc_lead` and
    /// `vessel_lead` are extra leading arguments (e.g. a private `--root`).
    /// Panics when runc or this build's `vessel` is missing.
    pub fn write(
        art: &crate::Artifacts,
        dir: &Path,
        tag: &str,
        runc_lead: &[&str],
        vessel_lead: &[&str],
    ) -> RuntimePair {
        let vessel_bin = art.vmm.with_file_name("vessel");
        assert!(
            vessel_bin.is_file(),
            "{} missing (cargo xtask build)",
            vessel_bin.display()
        );
        let runc_bin = which("runc").expect("runc is missing: apt-get install runc");
        let templates = crate::workspace_root().join("target/vessel/test-templates");
        let config = dir.join("vessel.toml");
        fs::write(&config, art.vessel_config(&templates, ""))
            .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let runc = RuntimeWrapper::write(
            &dir.join("runc-wrapper"),
            &runc_bin,
            runc_lead,
            &dir.join("runc-argv.log"),
            &dir.join("runc-specs"),
            tag,
        );
        let cfg = config.to_string_lossy().into_owned();
        let mut lead: Vec<&str> = vessel_lead.to_vec();
        lead.extend(["--config", cfg.as_str()]);
        let vessel = RuntimeWrapper::write(
            &dir.join("vessel-wrapper"),
            &vessel_bin,
            &lead,
            &dir.join("vessel-argv.log"),
            &dir.join("vessel-specs"),
            tag,
        );
        RuntimePair {
            runc,
            vessel,
            config,
        }
    }
}

/// Named checks: each runs even when an earlier one failed; panics are
/// caught and count as failures. [`Checks::finish`] fails the test with
/// every failure, except those named in its `known_failing` list, which
/// are printed loudly instead.
#[derive(Default)]
pub struct Checks {
    results: Vec<(String, Result<(), String>, Duration)>,
}

impl Checks {
    /// No checks yet.
    pub fn new() -> Checks {
        Checks::default()
    }

    /// Runs check `name`; prints its outcome and time at once.
    pub fn run(&mut self, name: &str, f: impl FnOnce() -> Result<(), String>) {
        let t = Instant::now();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(format!("panicked: {}", panic_text(&*p))),
        };
        let took = t.elapsed();
        match &r {
            Ok(()) => eprintln!("check {name}: ok ({took:.1?})"),
            Err(e) => eprintln!("check {name}: FAILED ({took:.1?}): {e}"),
        }
        self.results.push((name.to_string(), r, took));
    }

    /// Records check `name`'s outcome computed elsewhere.
    pub fn record(&mut self, name: &str, r: Result<(), String>) {
        self.run(name, || r);
    }

    /// Whether check `name` ran and passed.
    pub fn passed(&self, name: &str) -> bool {
        self.results.iter().any(|(n, r, _)| n == name && r.is_ok())
    }

    /// Prints a summary; panics listing every failed check not in
    /// `known_failing`. A known failure that passed is reported too (the
    /// list should shrink), without failing the test.
    pub fn finish(self, known_failing: &[&str]) {
        let mut failed = Vec::new();
        let mut known = Vec::new();
        for (name, r, _) in &self.results {
            match r {
                Err(e) if known_failing.contains(&name.as_str()) => {
                    known.push(format!("{name}: {e}"))
                }
                Err(e) => failed.push(format!("{name}: {e}")),
                Ok(()) if known_failing.contains(&name.as_str()) => eprintln!(
                    "NOTE: check {name} is listed as known failing but passed: remove it from the list"
                ),
                Ok(()) => {}
            }
        }
        let total: Duration = self.results.iter().map(|(_, _, d)| *d).sum();
        eprintln!(
            "{} checks, {} failed, {} known failing, {total:.1?} in checks",
            self.results.len(),
            failed.len(),
            known.len()
        );
        for k in &known {
            eprintln!("!!! KNOWN FAILING (reported, not asserted): {k}");
        }
        assert!(
            failed.is_empty(),
            "{} check(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Compares two values of a check, in a message naming both sides.
pub fn same<T: PartialEq + std::fmt::Debug>(what: &str, runc: T, vessel: T) -> Result<(), String> {
    if runc == vessel {
        Ok(())
    } else {
        Err(format!("{what}: runc {runc:?}, vessel {vessel:?}"))
    }
}

/// What one runtime did in each behaviour of an engine test: (check
/// name, observed facts or what went wrong).
pub type Observed = Vec<(&'static str, Result<String, String>)>;

/// A behaviour passes when runc's run passed and vessel's shows the same.
pub fn compare(
    runc: &Result<String, String>,
    vessel: &Result<String, String>,
) -> Result<(), String> {
    match (runc, vessel) {
        (Err(e), _) => Err(format!("runc itself failed: {e}")),
        (Ok(_), Err(e)) => Err(format!("vessel: {e}")),
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Ok(a), Ok(b)) => Err(format!("runc showed {a:?}, vessel {b:?}")),
    }
}

/// Fails unless `t` exited with `code` in time; its stdout.
pub fn exits(t: &Timed, what: &str, code: i32) -> Result<String, String> {
    if t.code() == code {
        Ok(t.stdout.clone())
    } else {
        Err(format!("expected exit {code}; {}", t.describe(what)))
    }
}

/// The `run -d` container of the docker and containerd tests: pid 1 is a
/// shell without a SIGTERM handler that answers SIGUSR1.
pub const DAEMON_SCRIPT: &str =
    "trap 'echo got-usr1' USR1; echo started; while :; do sleep 1; done";

/// The terminal containers' script: says it is ready (and on a tty),
/// reads a line, waits (at most 20 s) until the terminal is 40x120 (the
/// test resizes it before typing; engines pass the resize on
/// asynchronously), prints the size and the line, exits 4.
pub const TTY_SCRIPT: &str = r#"tty >/dev/null && echo is-tty; echo ready
read l
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    n=$(stty size 2>/dev/null); [ "$n" = "40 120" ] && break; sleep 1
done
echo "size $n"; echo "got:$l"; exit 4"#;

/// Output of a command run within a time bound.
#[derive(Debug)]
pub struct Timed {
    /// Exit status; `None` when the bound passed (the command was killed).
    pub status: Option<ExitStatus>,
    /// Its stdout (lossy UTF-8).
    pub stdout: String,
    /// Its stderr (lossy UTF-8).
    pub stderr: String,
    /// How long it ran.
    pub took: Duration,
    /// True when the command exited but something it started still held
    /// its stdout or stderr open after a grace period (the reader gave up).
    pub stdio_held: bool,
}

impl Timed {
    /// The exit code, or -1 for a timeout, 128+N for signal N.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self.status {
            None => -1,
            Some(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        }
    }

    /// Ok when the command exited 0 in time.
    pub fn ok(&self, what: &str) -> Result<&Timed, String> {
        if self.status.is_some_and(|s| s.success()) {
            Ok(self)
        } else {
            Err(self.describe(what))
        }
    }

    /// One line: what, exit, time, stderr.
    pub fn describe(&self, what: &str) -> String {
        let exit = match self.status {
            None => format!("timed out after {:.1?} (killed)", self.took),
            Some(s) => format!("{s} after {:.1?}", self.took),
        };
        format!(
            "{what}: {exit}{}; stdout {:?}; stderr {:?}",
            if self.stdio_held {
                " (stdio held open by a leftover process)"
            } else {
                ""
            },
            self.stdout,
            self.stderr.trim()
        )
    }
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) for at
/// most `timeout`, killing it when the bound passes. Output that a process
/// left behind keeps open is read for at most 2 s more after the command
/// exits ([`Timed::stdio_held`]).
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Timed {
    let t = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Timed {
                status: None,
                stdout: String::new(),
                stderr: format!("cannot spawn {cmd:?}: {e}"),
                took: t.elapsed(),
                stdio_held: false,
            }
        }
    };
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_within(&mut child, timeout);
    let grace = Duration::from_secs(2);
    let (stdout, held_out) = collect(&out, grace);
    let (stderr, held_err) = collect(&err, grace);
    Timed {
        status,
        stdout,
        stderr,
        took: t.elapsed(),
        stdio_held: status.is_some() && (held_out || held_err),
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

fn collect(rx: &mpsc::Receiver<Vec<u8>>, grace: Duration) -> (String, bool) {
    match rx.recv_timeout(grace) {
        Ok(b) => (String::from_utf8_lossy(&b).into_owned(), false),
        Err(_) => (String::new(), true),
    }
}

/// Waits up to `timeout` for `child`; kills and reaps it when the bound
/// passes (then `None`).
pub fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Leak checks: what a test must not leave behind.
pub mod leaks {
    use super::*;

    /// Processes whose environment has [`TAG_VAR`]`=tag`: `pid comm
    /// cmdline` each.
    pub fn tagged_processes(tag: &str) -> Vec<(i32, String)> {
        let needle = format!("{TAG_VAR}={tag}");
        let me = std::process::id() as i32;
        let mut out = Vec::new();
        let Ok(dir) = fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.filter_map(Result::ok) {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                out.push((pid, cmd.trim().to_string()));
            }
        }
        out
    }

    /// SIGKILLs every process [`tagged_processes`] finds; their pids.
    pub fn kill_tagged(tag: &str) -> Vec<i32> {
        let pids: Vec<i32> = tagged_processes(tag).into_iter().map(|(p, _)| p).collect();
        for &pid in &pids {
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        pids
    }

    /// After a pty check failed: SIGKILLs the runtime's exec-monitors
    /// (tagged `tag`), which may hold the engine shim's pipe and with it
    /// every later call on the container, so the remaining checks still
    /// run; what it killed.
    pub fn release_stuck(tag: &str) -> Vec<i32> {
        let stuck: Vec<i32> = tagged_processes(tag)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("exec-monitor"))
            .map(|(p, _)| p)
            .collect();
        for &p in &stuck {
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if !stuck.is_empty() {
            eprintln!("!!! killed exec-monitors {stuck:?} left after a failed pty check");
        }
        stuck
    }

    /// The end of an engine daemon's guard, once the engine removed what
    /// it could: SIGTERM to the daemon `child` (`what`; SIGKILL after 30 s),
    /// SIGKILL to the runtime's processes (tagged `tag`) and to any process
    /// still mentioning the test's directory `dir`, then unmounts what is
    /// left under `dir`. What it killed.
    pub fn stop_daemon(child: Option<Child>, what: &str, tag: &str, dir: &Path) -> Vec<i32> {
        if let Some(mut child) = child {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill with a pid and a signal number only.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if wait_within(&mut child, Duration::from_secs(30)).is_none() {
                eprintln!("{what} did not stop on SIGTERM within 30 s: killed");
            }
        }
        let mut killed = kill_tagged(tag);
        let needle = dir.to_string_lossy().into_owned();
        let me = std::process::id() as i32;
        for p in crate::cli::processes_mentioning(&needle, "") {
            if p != me {
                // SAFETY: kill with a pid and a signal number only.
                unsafe { libc::kill(p, libc::SIGKILL) };
                killed.push(p);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let mounts = unmount_under(dir);
        if !mounts.is_empty() {
            eprintln!("cleanup: unmounted {mounts:?}");
        }
        killed
    }

    /// Mount points in this process's mount namespace that lie under any
    /// of `dirs`.
    pub fn mounts_under(dirs: &[&Path]) -> Vec<String> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mountinfo)
            .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
            .collect()
    }

    fn unescape_mountinfo(s: &str) -> String {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    }

    /// Detaches (`umount2(MNT_DETACH)`) every mount under `dir`, deepest
    /// first; the mount points it detached.
    pub fn unmount_under(dir: &Path) -> Vec<String> {
        let mut mounts = mounts_under(&[dir]);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts.dedup();
        for m in &mounts {
            if let Ok(c) = std::ffi::CString::new(m.as_bytes()) {
                // SAFETY: umount2 with a valid C string and a flag.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        mounts
    }

    /// Unix sockets (files of socket type) anywhere under `dir`.
    pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.filter_map(Result::ok) {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_socket() {
                    out.push(e.path());
                } else if ft.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out
    }

    /// Entries of a directory (a runtime's `--root`: one per container).
    pub fn entries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything left behind, one line each: processes tagged `tag`
    /// (`vessel-vmm`, monitors, runtime calls), `vessel-vmm` processes whose
    /// command line names one of `dirs`, mounts, sockets and entries under
    /// each of `state_roots` (a runtime's `--root` and `dirs` alike).
    pub fn find(tag: &str, dirs: &[&Path], state_roots: &[&Path]) -> Vec<String> {
        let mut out: Vec<String> = tagged_processes(tag)
            .into_iter()
            .map(|(p, c)| format!("process {p}: {c}"))
            .collect();
        for d in dirs {
            for p in crate::cli::processes_mentioning("vessel-vmm", &d.to_string_lossy()) {
                let line = format!("vessel-vmm {p} naming {}", d.display());
                if !out.iter().any(|l| l.starts_with(&format!("process {p}:"))) {
                    out.push(line);
                }
            }
        }
        out.extend(mounts_under(dirs).into_iter().map(|m| format!("mount {m}")));
        for d in state_roots {
            out.extend(
                sockets_under(d)
                    .into_iter()
                    .map(|s| format!("socket {}", s.display())),
            );
            out.extend(
                entries(d)
                    .into_iter()
                    .map(|e| format!("state {}/{e}", d.display())),
            );
        }
        out
    }
}

/// A pseudo-terminal: the test holds the master, a command gets the slave
/// as its controlling terminal and stdio (what a user's shell gives
/// `podman run -it` / `docker run -it`).
pub struct Pty {
    master: OwnedFd,
    slave: PathBuf,
}

impl Pty {
    /// A new pty of `rows` x `cols`.
    pub fn open(rows: u16, cols: u16) -> io::Result<Pty> {
        // SAFETY: posix_openpt with flags only; the result is checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: grantpt/unlockpt on our pty master.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes at most name.len() bytes into name.
        let r = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string into name.
        let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let pty = Pty {
            master,
            slave: PathBuf::from(slave.to_string_lossy().into_owned()),
        };
        // SAFETY: F_SETFL with integer flags on our descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        pty.resize(rows, cols)?;
        Ok(pty)
    }

    /// Sets the window size (the kernel sends SIGWINCH to the terminal's
    /// foreground process group).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct we own.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Spawns `cmd` in a new session with the slave as its controlling
    /// terminal, stdin, stdout and stderr.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let open = || {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.slave)
        };
        let (i, o, e) = (open()?, open()?, open()?);
        // SAFETY: the closure only calls async-signal-safe functions
        // (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.stdin(i).stdout(o).stderr(e).pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// Writes `s` to the terminal (what a user types).
    pub fn write(&self, s: &str) -> io::Result<()> {
        let mut left = s.as_bytes();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !left.is_empty() {
            // SAFETY: write from a valid buffer of the given length.
            let n =
                unsafe { libc::write(self.master.as_raw_fd(), left.as_ptr().cast(), left.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock || Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            left = left.get(n.unsigned_abs()..).unwrap_or_default();
        }
        Ok(())
    }

    /// Reads what the terminal shows until `seen` says the text so far is
    /// complete or `timeout` passes; everything read (also on timeout,
    /// inside the error).
    pub fn read_until(
        &self,
        timeout: Duration,
        seen: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if seen(&text) {
                return Ok(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {timeout:?}; terminal showed {text:?}"
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().min(200)).unwrap_or(200);
            // SAFETY: poll on one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r <= 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            // SAFETY: read into a buffer of the given length.
            let n =
                unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                got.extend_from_slice(buf.get(..n.unsigned_abs()).unwrap_or_default());
            } else if n == 0 || pfd.revents & libc::POLLHUP != 0 {
                // Every slave closed: nothing more will come.
                let text = String::from_utf8_lossy(&got).into_owned();
                return if seen(&text) {
                    Ok(text)
                } else {
                    Err(format!("terminal closed; it showed {text:?}"))
                };
            }
        }
    }

    /// The master's descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.master.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_logs_copies_spec_and_tags() {
        let dir = crate::TempDir::new("engines-wrapper");
        let bundle = dir.0.join("bundle");
        fs::create_dir_all(&bundle).unwrap();
        fs::write(bundle.join("config.json"), "{}").unwrap();
        let w = RuntimeWrapper::write(
            &dir.0.join("wrap"),
            Path::new("/bin/sh"),
            &["-c", "echo \"$VESSEL_ENGINE_TEST:$*\"", "sh"],
            &dir.0.join("argv.log"),
            &dir.0.join("specs"),
            "t'1",
        );
        let o = Command::new(&w.path)
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("id1")
            .output()
            .unwrap();
        assert!(o.status.success());
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("t'1:create --bundle {} id1\n", bundle.display())
        );
        assert_eq!(
            w.calls(),
            vec![format!("create --bundle {} id1", bundle.display())]
        );
        assert_eq!(w.verbs(), vec!["create".to_string()]);
        let timed = w.timed_calls();
        assert!(
            timed.len() == 1 && timed[0].contains(" ms, exit 0: create --bundle"),
            "{timed:?}"
        );
        assert!(w.specs.join("id1.json").exists());
    }

    #[test]
    fn checks_collect_failures_and_known_ones() {
        let mut c = Checks::new();
        c.run("a", || Ok(()));
        c.run("b", || Err("no".into()));
        c.run("c", || panic!("boom"));
        assert!(c.passed("a") && !c.passed("b"));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.finish(&["b"])));
        let msg = panic_text(&*r.unwrap_err());
        assert!(
            msg.contains("c: panicked: boom") && !msg.contains("b: no"),
            "{msg}"
        );
    }

    #[test]
    fn output_within_kills_at_the_bound() {
        let t = output_within(Command::new("sleep").arg("10"), Duration::from_millis(300));
        assert!(
            t.status.is_none() && t.took < Duration::from_secs(5),
            "{t:?}"
        );
        let t = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(
            (t.code(), t.stdout.as_str(), t.stderr.as_str()),
            (3, "out\n", "err\n")
        );
    }

    #[test]
    fn pty_runs_a_shell_and_resizes() {
        let pty = Pty::open(24, 80).unwrap();
        let mut child = pty
            .spawn(Command::new("sh").args(["-c", "stty size; read x; stty size; exit 5"]))
            .unwrap();
        pty.read_until(Duration::from_secs(10), |s| s.contains("24 80"))
            .unwrap();
        pty.resize(40, 120).unwrap();
        pty.write("go\n").unwrap();
        pty.read_until(Duration::from_secs(10), |s| s.contains("40 120"))
            .unwrap();
        let st = wait_within(&mut child, Duration::from_secs(10)).unwrap();
        assert_eq!(st.code(), Some(5));
    }
}

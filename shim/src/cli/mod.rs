//! The container lifecycle: `create`, `start`, `run`, `state`, `kill`,
//! `delete`, and the hidden `monitor` command.
//!
//! `vessel create` starts a **monitor**: the `vessel` binary again
//! (`vessel monitor ID --bundle B --ready-fd N`), in a session of its own.
//! The monitor owns the sandbox: it restores (or boots) the VM with the
//! bundle's rootfs shared as [`ROOTFS_TAG`], relays the stdio `vessel
//! create` was given to the container's stdio streams, creates the
//! container, and says `ok` (or `error MESSAGE`) on the pipe. `vessel
//! create` then writes `state.json` (pid = the monitor) and `--pid-file`.
//! The monitor waits for the container's init, shuts the VM down, records
//! `stopped` with the exit status, and exits with that status, so the pid
//! in `--pid-file` behaves like runc's container process.
//!
//! `<root>/<id>/` holds the state, the lock, the VM's logs and `vmm.pid`;
//! its sockets (`vsock.sock`, `api.sock`) are in the short
//! [`Store::sandbox_dir`], whatever the length of `--root`.
//!
//! Terminal containers (`process.terminal`): the monitor sends a host pty
//! master to `--console-socket` before it says `ok`, or, for a foreground
//! `run` without a socket, relays the terminal stream to the caller's
//! terminal (see `tty`). `exec` and `ps` are in `exec`.

pub mod exec;
mod stdio;
mod tty;

pub mod events;
pub mod features;
pub mod resources;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use vessel_proto::client::AgentClient;
use vessel_proto::container::{CreateContainerRequest, RootfsSource, SignalProcessRequest};
use vessel_proto::AGENT_PORT;

use vessel_shim::binds;
use vessel_shim::bundle::Bundle;
use vessel_shim::config::Config;
use vessel_shim::sandbox::{Dirs, HostSide, Sandbox, Templates, MOUNTS_TAG, ROOTFS_TAG};
use vessel_shim::signal;
use vessel_shim::state::{self, ContainerState, Op, Status, Store, OCI_VERSION};

/// Where the agent mounts the rootfs share in the guest.
const GUEST_ROOTFS: &str = "/run/vessel/rootfs";
/// Where the agent mounts the share of host bind mount sources.
const GUEST_MOUNTS: &str = "/run/vessel/mounts";
/// The VMM's pid, written by the monitor.
const VMM_PID_FILE: &str = "vmm.pid";
/// How long the agent may take for create/start (guest kernels are slow
/// where ring 0 is emulated).
const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `delete --force` waits for the monitor after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The vsock socket of container `id`'s sandbox.
fn vsock_path(store: &Store, id: &str) -> Result<PathBuf> {
    Ok(store.sandbox_dir(id)?.join("vsock.sock"))
}

fn connect(store: &Store, id: &str) -> Result<AgentClient> {
    let uds = vsock_path(store, id)?;
    AgentClient::connect(&uds, AGENT_PORT, Duration::from_secs(10))
        .with_context(|| format!("cannot reach the sandbox of container {id}"))
}

/// Whether the monitor recorded in `s` still runs: same pid and the same
/// start time (a recycled pid is another process), not a zombie.
fn monitor_alive(s: &ContainerState) -> bool {
    s.pid_start
        .is_some_and(|start| state::same_process(s.pid, start))
}

/// The state as it really is: a container whose monitor is gone is stopped.
fn effective(mut s: ContainerState) -> ContainerState {
    if s.status != Status::Stopped && !monitor_alive(&s) {
        s.status = Status::Stopped;
        s.pid = 0;
    }
    s
}

/// `vessel state`.
pub fn state(store: &Store, id: &str) -> Result<()> {
    let s = effective(store.load(id)?);
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// A state for `vessel list` (monitor checked).
pub fn load_effective(store: &Store, id: &str) -> Result<ContainerState> {
    Ok(effective(store.load(id)?))
}

fn send_signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) on a pid we checked belongs to our process; no
        // memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Records the VMM's pid and start time in `dir` for [`kill_vmm`].
fn write_vmm_pid(dir: &Path, pid: u32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    let start = state::process_start(pid).context("the VMM exited")?;
    std::fs::write(dir.join(VMM_PID_FILE), format!("{pid} {start}\n")).context("writing vmm.pid")
}

/// Kills the VMM of `dir` (from `vmm.pid`) if that very process still runs.
fn kill_vmm(dir: &Path) {
    let Some((pid, start)) = std::fs::read_to_string(dir.join(VMM_PID_FILE))
        .ok()
        .and_then(|s| {
            let (p, t) = s.trim().split_once(' ')?;
            Some((p.parse::<i32>().ok()?, t.parse::<u64>().ok()?))
        })
    else {
        return;
    };
    if state::same_process(pid, start) {
        send_signal(pid, libc::SIGKILL);
        wait_until(Duration::from_secs(10), || !state::same_process(pid, start));
    }
}

/// Polls `done` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `pid` to `path` atomically (like runc).
fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("invalid pid file {}", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing pid file {}", path.display()))
}

/// `vessel create`: returns the monitor (still our child). A terminal
/// container needs `console_socket` unless it runs in the `foreground`.
#[allow(clippy::too_many_arguments)]
pub fn create(
    store: &Store,
    cfg: &Config,
    globals: &[OsString],
    id: &str,
    bundle: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
    foreground: bool,
) -> Result<Child> {
    state::validate_id(id)?;
    cfg.check_artifacts()?;
    let b = Bundle::load(bundle)?;
    if b.terminal && console_socket.is_none() && !foreground {
        bail!("cannot allocate tty if vessel will detach without setting console socket");
    }
    if !b.terminal && console_socket.is_some() {
        bail!("cannot use console socket if vessel will not detach or allocate tty");
    }
    let console_socket = console_socket.map(std::path::absolute).transpose()?;
    let (dir, lock) = store.create(id)?;
    let mut child: Option<Child> = None;
    let result = (|| -> Result<()> {
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        let wfd: RawFd = writer.as_raw_fd();
        let exe = std::env::current_exe().context("finding the vessel binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(globals)
            .arg("monitor")
            .arg(id)
            .arg("--bundle")
            .arg(&b.dir)
            .arg("--ready-fd")
            .arg(wfd.to_string());
        if let Some(s) = &console_socket {
            cmd.arg("--console-socket").arg(s);
            // The container's stdio is the pty: like runc, keep nothing of
            // the caller's stdio, or a caller reading our output until EOF
            // (`out=$(vessel create ...)`, dockerd, containerd's shim)
            // waits as long as the container lives.
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        // SAFETY: runs in the child between fork and exec; setsid(2) and
        // fcntl(2) are async-signal-safe and touch no memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let c = child.insert(cmd.spawn().context("starting the sandbox monitor")?);
        drop(writer);
        let mut line = String::new();
        BufReader::new(reader)
            .read_line(&mut line)
            .context("waiting for the sandbox monitor")?;
        let line = line.trim_end();
        if line != "ok" {
            bail!(
                "{}",
                line.strip_prefix("error ")
                    .unwrap_or("the sandbox monitor exited before the container was created")
            );
        }
        let pid = c.id();
        let pid_i = i32::try_from(pid).context("pid out of range")?;
        let pid_start = state::process_start(pid_i).ok_or_else(|| {
            anyhow!("the sandbox monitor exited right after creating the container")
        })?;
        let st = ContainerState {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            pid: pid_i,
            status: Status::Created,
            bundle: b.dir.clone(),
            rootfs: b.rootfs.clone(),
            created: state::rfc3339(SystemTime::now()),
            owner: String::new(),
            annotations: b.annotations.clone(),
            exit_status: None,
            pid_start: Some(pid_start),
        };
        store.save(&st, &lock)?;
        if let Some(p) = pid_file {
            write_pid_file(p, pid)?;
        }
        Ok(())
    })();
    match (result, child) {
        (Ok(()), Some(c)) => Ok(c),
        (Ok(()), None) => Err(anyhow!("internal error: no monitor")),
        (Err(e), c) => {
            if let Some(mut c) = c {
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_vmm(&dir);
            let _ = store.remove(id, lock);
            Err(e)
        }
    }
}

/// `vessel start`.
pub fn start(store: &Store, id: &str) -> Result<()> {
    let lock = store.lock(id)?;
    let mut s = effective(store.load(id)?);
    s.status.check(Op::Start, id)?;
    let mut c = connect(store, id)?;
    c.set_timeout(Some(AGENT_TIMEOUT))?;
    c.start_container(id)
        .with_context(|| format!("starting container {id}"))?;
    s.status = Status::Running;
    store.save(&s, &lock)?;
    Ok(())
}

/// `vessel kill`.
pub fn kill(store: &Store, id: &str, sig: Option<&str>, all: bool) -> Result<()> {
    let signal = signal::parse(sig.unwrap_or("SIGTERM"))?;
    let s = effective(store.load(id)?);
    s.status.check(Op::Kill, id)?;
    let mut c = connect(store, id)?;
    c.signal_process(SignalProcessRequest {
        id: id.into(),
        exec_id: None,
        signal,
        all,
    })
    .with_context(|| format!("signalling container {id}"))?;
    Ok(())
}

/// `vessel delete [--force]`.
pub fn delete(store: &Store, id: &str, force: bool) -> Result<()> {
    let lock = store.lock(id)?;
    let s = store.load(id).ok().map(effective);
    if let Some(s) = s.as_ref().filter(|_| !force) {
        s.status.check(Op::Delete, id)?;
    }
    // The monitor takes the lock to record `stopped`: let it.
    drop(lock);
    let dir = store.dir(id)?;
    if let Some(s) = s.filter(|s| s.status != Status::Stopped) {
        let alive = || monitor_alive(&s);
        if let Ok(mut c) = connect(store, id) {
            let killed = c.signal_process(SignalProcessRequest {
                id: id.into(),
                exec_id: None,
                signal: libc::SIGKILL,
                all: true,
            });
            if killed.is_err() {
                let _ = c.delete_container(id, true);
            }
        }
        if !wait_until(STOP_TIMEOUT, || !alive()) {
            tracing::warn!("the monitor of {id} did not stop; killing it");
            send_signal(s.pid, libc::SIGKILL);
            wait_until(Duration::from_secs(10), || !alive());
        }
    }
    kill_vmm(&dir);
    let lock = store.lock(id)?;
    store.remove(id, lock)?;
    Ok(())
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(255),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        _ => 255,
    }
}

/// `vessel run [--detach]`. A foreground terminal container without a
/// console socket uses the caller's terminal (raw mode until it exits).
#[allow(clippy::too_many_arguments)]
pub fn run(
    store: &Store,
    cfg: &Config,
    globals: &[OsString],
    id: &str,
    bundle: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
    detach: bool,
) -> Result<ExitCode> {
    let own_tty = !detach && console_socket.is_none() && Bundle::load(bundle)?.terminal;
    let _raw = own_tty.then(tty::RawMode::stdin);
    let mut child = create(
        store,
        cfg,
        globals,
        id,
        bundle,
        pid_file,
        console_socket,
        !detach,
    )?;
    if let Err(e) = start(store, id) {
        let _ = delete(store, id, true);
        let _ = child.wait();
        return Err(e);
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    forward_signals(store, id);
    let status = child.wait().context("waiting for the container")?;
    // Like runc: a foreground container is deleted once it exits.
    delete(store, id, true)?;
    Ok(ExitCode::from(exit_code(status)))
}

/// Signals a foreground `vessel run` forwards to the container's init.
const FORWARDED: [i32; 6] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks [`FORWARDED`] in this process and forwards each one that arrives
/// to container `id` from a thread (like runc's foreground `run`).
fn forward_signals(store: &Store, id: &str) {
    let (store, id) = (store.clone(), id.to_string());
    forward_to(&id.clone(), move |sig| {
        if let Err(e) = kill(&store, &id, Some(&sig.to_string()), false) {
            tracing::warn!("forwarding signal {sig} to {id}: {e:#}");
        }
    });
}

/// Blocks [`FORWARDED`] in this process and calls `send` with each one
/// that arrives, from a thread (`what` names the target in logs).
fn forward_to(what: &str, mut send: impl FnMut(i32) + Send + 'static) {
    // SAFETY: sigset_t is plain data; zeroed is a valid value that
    // sigemptyset then initializes.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is a local we own; the calls only write to it and to
    // this thread's signal mask (inherited by the thread spawned below).
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        tracing::warn!("cannot forward signals to {what}");
        return;
    }
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: sigwait reads the set we built and writes one int.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        send(sig);
    });
}

/// Whether our stdin is worth relaying (open and not /dev/null).
fn stdin_wanted() -> bool {
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    let null = std::fs::metadata("/dev/null").ok();
    !(meta.file_type().is_char_device() && null.is_some_and(|n| n.rdev() == meta.rdev()))
}

/// Copies `src` to `dst` until EOF; keeps draining when `dst` fails so the
/// container never blocks on a reader that went away.
fn relay(mut src: impl Read, mut dst: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    let mut ok = true;
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if ok && dst.write_all(&buf[..n]).and_then(|()| dst.flush()).is_err() {
                    ok = false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// The pieces of a created container the monitor keeps.
struct Monitored {
    sb: Sandbox,
    client: AgentClient,
    relays: stdio::Relays,
}

fn setup(
    store: &Store,
    cfg: &Config,
    id: &str,
    bundle: &Path,
    console: Option<&Path>,
) -> Result<Monitored> {
    let b = Bundle::load(bundle)?;
    let dir = store.dir(id)?;
    let sockets = store.create_sandbox_dir(id)?;
    let dirs = Dirs {
        dir: &dir,
        sockets: &sockets,
    };
    let mut spec = b.spec.clone();
    if b.readonly {
        // The guest cannot write a read-only share: make the mount points
        // here, as runc does before its read-only remount.
        binds::make_mount_points(&spec, &b.dir, &b.rootfs)?;
    }
    let stage = dir.join("mounts");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let netns = vessel_shim::netns::take(&mut spec)?;
    let host = HostSide {
        stage: Some(
            std::ffi::CString::new(stage.as_os_str().as_encoded_bytes())
                .context("the state directory's path contains NUL")?,
        ),
        binds: binds::plan(&mut spec, &b.dir, &stage, GUEST_MOUNTS)?,
        netns,
    };
    let shares = [
        format!(
            "{ROOTFS_TAG}={}{}{}",
            b.rootfs.display(),
            if b.readonly { ",ro" } else { "" },
            vessel_shim::sandbox::rootfs_dax(cfg)
        ),
        format!("{MOUNTS_TAG}={}", stage.display()),
    ];
    let t0 = Instant::now();
    let (mut sb, mut client) = if cfg.templates {
        let (tpl, _) = Templates::new(cfg).ensure(false)?;
        Sandbox::restore(cfg, &tpl, dirs, &shares, &host, b.hostname.clone())?
    } else {
        Sandbox::boot(cfg, dirs, &shares, &host)?
    };
    drop(host.netns);
    tracing::debug!("{id}: sandbox ready after {:?}", t0.elapsed());
    let created = (|| -> Result<stdio::Relays> {
        write_vmm_pid(&dir, sb.pid())?;
        if !host.binds.is_empty() {
            client.set_timeout(Some(AGENT_TIMEOUT))?;
            client
                .mount(MOUNTS_TAG, GUEST_MOUNTS, false)
                .context("mounting the bind mount share in the guest")?;
        }
        let (mut end, mut size) = (None, None);
        if b.terminal {
            let given = spec["process"]["consoleSize"]
                .as_object()
                .and_then(|s| Some((s.get("height")?.as_u64()?, s.get("width")?.as_u64()?)))
                .and_then(|(h, w)| Some((u16::try_from(h).ok()?, u16::try_from(w).ok()?)));
            match console {
                Some(sock) => {
                    size = given;
                    end = Some(tty::HostEnd::Console(tty::send_console(sock, size)?));
                }
                None => {
                    size = tty::caller_winsize().or(given);
                    end = Some(tty::HostEnd::Caller);
                }
            }
            if let Some((rows, cols)) = size {
                spec["process"]["consoleSize"] = serde_json::json!({"height": rows, "width": cols});
            }
        }
        let attached = stdio::Attached::attach(&sb.uds, id, None, b.terminal)?;
        client.set_timeout(Some(AGENT_TIMEOUT))?;
        let c = client
            .create_container(CreateContainerRequest {
                id: id.into(),
                rootfs: RootfsSource {
                    tag: Some(ROOTFS_TAG.into()),
                    path: GUEST_ROOTFS.into(),
                },
                spec,
                stdio: attached.spec(),
            })
            .context("creating the container")?;
        tracing::debug!(
            "{id}: container created after {:?} (in the guest: {} ms)",
            t0.elapsed(),
            c.elapsed_us / 1000
        );
        if !c.ignored.is_empty() {
            tracing::info!("{id}: not applied in the guest: {}", c.ignored.join(", "));
        }
        attached.relay(end, size, stdio::Resizer::new(&sb.uds, id, None))
    })();
    match created {
        Ok(relays) => Ok(Monitored { sb, client, relays }),
        Err(e) => {
            sb.kill();
            let _ = std::fs::remove_file(dir.join(VMM_PID_FILE));
            Err(e)
        }
    }
}

/// The hidden `vessel monitor` command (see the module documentation).
pub fn monitor(
    store: &Store,
    cfg: &Config,
    id: &str,
    bundle: &Path,
    console: Option<&Path>,
    ready_fd: RawFd,
) -> ExitCode {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if ready_fd < 3 || unsafe { libc::fcntl(ready_fd, libc::F_GETFD) } < 0 {
        tracing::error!("monitor: --ready-fd {ready_fd} is not an open descriptor");
        return ExitCode::from(1);
    }
    // SAFETY: the descriptor is open (checked above) and is the pipe's
    // write end `vessel create` left to us alone; we take ownership once.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ready_fd) });
    let mut m = match setup(store, cfg, id, bundle, console) {
        Ok(m) => m,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            let _ = writeln!(ready, "error {msg}");
            return ExitCode::from(1);
        }
    };
    let _ = writeln!(ready, "ok");
    drop(ready);

    let status = match m
        .client
        .set_timeout(None)
        .and_then(|()| m.client.wait_process(id, None))
    {
        Ok(exit) => exit.status,
        Err(e) => {
            tracing::error!("{id}: waiting for the container: {e}");
            255
        }
    };
    tracing::debug!("{id}: exited with {status}");
    // Let the last output through (a child holding the stream open past
    // init's exit must not keep us here).
    m.relays.drain(stdio::DRAIN_TIMEOUT);
    if let Err(e) = m.sb.shutdown(&mut m.client, Duration::from_secs(30)) {
        tracing::warn!("{id}: stopping the sandbox: {e}");
    }
    tracing::debug!("{id}: sandbox stopped");
    if let Ok(dir) = store.dir(id) {
        let _ = std::fs::remove_file(dir.join(VMM_PID_FILE));
    }
    if let Ok(lock) = store.lock(id) {
        if let Ok(mut s) = store.load(id) {
            s.status = Status::Stopped;
            s.pid = 0;
            s.exit_status = Some(status);
            if let Err(e) = store.save(&s, &lock) {
                tracing::warn!("{id}: recording the exit: {e}");
            }
        }
    }
    ExitCode::from(u8::try_from(status).unwrap_or(255))
}

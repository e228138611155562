//! `vessel exec`, the hidden `vessel exec-monitor`, and `vessel ps`.
//!
//! An exec reaches the container's VM through the sandbox's vsock socket
//! in the state directory (`<root>/<id>/vsock.sock`), like `start` and
//! `kill`: it attaches the new process's stdio streams, sends
//! `ExecProcess` (the agent joins the container's namespaces and cgroup),
//! relays stdio, waits with `WaitProcess` on a connection of its own, and
//! exits with the process's status (128+N after signal N).
//!
//! In the foreground, `vessel exec` does that itself and forwards
//! HUP/INT/QUIT/TERM/USR1/USR2 to the process. With `--detach` it starts
//! `vessel exec-monitor` (in a session of its own, with our stdio), which
//! does the same; once the process runs, `vessel exec` writes the
//! exec-monitor's pid to `--pid-file` and returns: that pid lives as long
//! as the process and exits with its status, like runc's exec'd process
//! for conmon or containerd's shim.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vessel_proto::container::{ExecProcessRequest, SignalProcessRequest};
use vessel_shim::bundle::Bundle;
use vessel_shim::state::{Op, Store};

use super::stdio::{Attached, Resizer, DRAIN_TIMEOUT};
use super::tty::{self, HostEnd, RawMode};
use super::{connect, forward_to, load_effective, vsock_path, write_pid_file, AGENT_TIMEOUT};

/// `vessel exec` (runc's flags).
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Container id.
    pub id: String,
    /// Command and arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// OCI process JSON.
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Allocate a pty.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Detach.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the host pid that stands for the process here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long, short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Add a capability to the bounding, effective and permitted sets.
    #[arg(long, short = 'c')]
    pub cap: Vec<String>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// SELinux label (accepted; the guest applies none).
    #[arg(long)]
    pub process_label: Option<String>,
    /// AppArmor profile (accepted; the guest applies none).
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Pass N extra file descriptors (not supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// The hidden `vessel exec-monitor`: runs one exec for a detached
/// `vessel exec`.
#[derive(Debug, clap::Args)]
pub struct ExecMonitorArgs {
    /// Container id.
    pub id: String,
    /// The exec's id.
    #[arg(long)]
    pub exec_id: String,
    /// The OCI process JSON (removed once read).
    #[arg(long)]
    pub process_file: PathBuf,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Pipe to report the start on.
    #[arg(long)]
    pub ready_fd: i32,
}

/// The OCI process of an exec: `--process FILE`, or the container's own
/// process with runc's overrides.
fn build_process(a: &ExecArgs, bundle: &Path) -> Result<Value> {
    if let Some(path) = &a.process {
        let text = std::fs::read(path)
            .with_context(|| format!("reading process file {}", path.display()))?;
        let mut p: Value = serde_json::from_slice(&text)
            .with_context(|| format!("parsing process file {}", path.display()))?;
        if !p.is_object() {
            bail!("process file {}: not a JSON object", path.display());
        }
        if a.tty {
            p["terminal"] = Value::Bool(true);
        }
        return Ok(p);
    }
    if a.command.is_empty() {
        bail!("exec args cannot be empty");
    }
    let b = Bundle::load(bundle).context("loading the container's bundle")?;
    let mut p = b.spec.get("process").cloned().unwrap_or_else(|| json!({}));
    p["args"] = json!(a.command);
    p["terminal"] = Value::Bool(a.tty);
    if let Some(obj) = p.as_object_mut() {
        obj.remove("consoleSize");
    }
    if let Some(cwd) = &a.cwd {
        p["cwd"] = json!(cwd);
    }
    if !a.env.is_empty() {
        let mut env: Vec<String> = p["env"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|e| e.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for kv in &a.env {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
            env.push(kv.clone());
        }
        p["env"] = json!(env);
    }
    if !p["user"].is_object() {
        p["user"] = json!({"uid": 0, "gid": 0});
    }
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u.as_str(), None),
        };
        let uid: u32 = uid
            .parse()
            .with_context(|| format!("invalid --user {u:?}: use UID[:GID] (numbers)"))?;
        p["user"]["uid"] = json!(uid);
        if let Some(g) = gid {
            let gid: u32 = g
                .parse()
                .with_context(|| format!("invalid --user {u:?}: use UID[:GID] (numbers)"))?;
            p["user"]["gid"] = json!(gid);
        }
    }
    if !a.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(a.additional_gids);
    }
    if !a.cap.is_empty() {
        if !p["capabilities"].is_object() {
            p["capabilities"] = json!({});
        }
        for set in ["bounding", "effective", "permitted"] {
            let mut caps: Vec<Value> = p["capabilities"][set]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in &a.cap {
                let c = c.to_ascii_uppercase();
                let c = if c.starts_with("CAP_") {
                    c
                } else {
                    format!("CAP_{c}")
                };
                if !caps.iter().any(|v| v.as_str() == Some(&c)) {
                    caps.push(json!(c));
                }
            }
            p["capabilities"][set] = Value::Array(caps);
        }
    }
    if a.no_new_privs {
        p["noNewPrivileges"] = Value::Bool(true);
    }
    if let Some(l) = &a.process_label {
        p["selinuxLabel"] = json!(l);
    }
    if let Some(ap) = &a.apparmor {
        p["apparmorProfile"] = json!(ap);
    }
    Ok(p)
}

/// A fresh exec id (unique per container: pid and time).
fn new_exec_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("exec-{}-{nanos:x}", std::process::id())
}

/// A running exec: its guest pid, and what it takes to wait for it.
struct Session {
    uds: PathBuf,
    id: String,
    exec_id: String,
    pid: i32,
    relays: super::stdio::Relays,
}

/// Attaches stdio, starts the exec, relays. `console`: where a terminal
/// process's pty master goes (None: our own stdio).
fn start_exec(
    uds: &Path,
    id: &str,
    exec_id: &str,
    mut process: Value,
    console: Option<&Path>,
) -> Result<Session> {
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let mut end = None;
    let mut size = None;
    if terminal {
        match console {
            Some(sock) => {
                end = Some(HostEnd::Console(tty::send_console(sock, None)?));
            }
            None => {
                size = tty::caller_winsize();
                end = Some(HostEnd::Caller);
            }
        }
        if let Some((rows, cols)) = size {
            process["consoleSize"] = json!({"height": rows, "width": cols});
        }
    }
    let attached = Attached::attach(uds, id, Some(exec_id), terminal)?;
    let mut c = vessel_proto::client::AgentClient::connect(
        uds,
        vessel_proto::AGENT_PORT,
        Duration::from_secs(10),
    )
    .with_context(|| format!("cannot reach the sandbox of container {id}"))?;
    c.set_timeout(Some(AGENT_TIMEOUT))?;
    let pid = c
        .exec_process(ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            process,
            stdio: attached.spec(),
        })
        .with_context(|| format!("exec in container {id}"))?;
    let relays = attached.relay(end, size, Resizer::new(uds, id, Some(exec_id)))?;
    Ok(Session {
        uds: uds.to_path_buf(),
        id: id.into(),
        exec_id: exec_id.into(),
        pid,
        relays,
    })
}

impl Session {
    /// Waits for the process; its status (255 if the sandbox went away).
    fn wait(self) -> i32 {
        let r = vessel_proto::client::AgentClient::connect(
            &self.uds,
            vessel_proto::AGENT_PORT,
            Duration::from_secs(10),
        )
        .and_then(|mut c| {
            c.set_timeout(None)?;
            c.wait_process(&self.id, Some(&self.exec_id))
        });
        let status = match r {
            Ok(exit) => exit.status,
            Err(e) => {
                tracing::error!("{}: waiting for exec {}: {e}", self.id, self.exec_id);
                255
            }
        };
        self.relays.drain(DRAIN_TIMEOUT);
        status
    }
}

fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(255))
}

/// `vessel exec`.
pub fn exec(store: &Store, globals: &[OsString], a: &ExecArgs) -> Result<ExitCode> {
    if a.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: host descriptors cannot be passed into the VM");
    }
    let s = load_effective(store, &a.id)?;
    s.status.check(Op::Exec, &a.id)?;
    let process = build_process(a, &s.bundle)?;
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    if terminal && a.detach && a.console_socket.is_none() {
        bail!("cannot allocate tty if vessel will detach without setting console socket");
    }
    if !terminal && a.console_socket.is_some() {
        bail!("cannot use console socket if vessel will not detach or allocate tty");
    }
    let uds = vsock_path(store, &a.id)?;
    let exec_id = new_exec_id();
    if a.detach {
        return detach(store, globals, a, &exec_id, &process);
    }
    let _raw = (terminal && a.console_socket.is_none()).then(RawMode::stdin);
    let session = start_exec(&uds, &a.id, &exec_id, process, a.console_socket.as_deref())?;
    tracing::debug!("{}: exec {exec_id} runs as guest pid {}", a.id, session.pid);
    if let Some(p) = &a.pid_file {
        write_pid_file(p, std::process::id())?;
    }
    let (store2, id, eid) = (store.clone(), a.id.clone(), exec_id.clone());
    forward_to(&a.id, move |sig| {
        let r = connect(&store2, &id).and_then(|mut c| {
            c.signal_process(SignalProcessRequest {
                id: id.clone(),
                exec_id: Some(eid.clone()),
                signal: sig,
                all: false,
            })
            .map_err(anyhow::Error::from)
        });
        if let Err(e) = r {
            tracing::warn!("forwarding signal {sig} to exec {eid} of {id}: {e:#}");
        }
    });
    Ok(exit_code(session.wait()))
}

/// `vessel exec --detach`: starts an exec-monitor and returns once the
/// process runs.
fn detach(
    store: &Store,
    globals: &[OsString],
    a: &ExecArgs,
    exec_id: &str,
    process: &Value,
) -> Result<ExitCode> {
    let dir = store.dir(&a.id)?;
    let file = dir.join(format!("{exec_id}.process.json"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("writing {}", file.display()))?;
    f.write_all(&serde_json::to_vec(process)?)
        .with_context(|| format!("writing {}", file.display()))?;
    drop(f);
    let result = (|| -> Result<u32> {
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        let wfd: RawFd = writer.as_raw_fd();
        let exe = std::env::current_exe().context("finding the vessel binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(globals)
            .arg("exec-monitor")
            .arg(&a.id)
            .arg("--exec-id")
            .arg(exec_id)
            .arg("--process-file")
            .arg(&file)
            .arg("--ready-fd")
            .arg(wfd.to_string());
        if let Some(s) = &a.console_socket {
            cmd.arg("--console-socket").arg(std::path::absolute(s)?);
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
        let mut child = cmd.spawn().context("starting the exec monitor")?;
        drop(writer);
        let mut line = String::new();
        let read = BufReader::new(reader)
            .read_line(&mut line)
            .context("waiting for the exec monitor");
        let line = line.trim_end();
        if read.is_err() || !line.starts_with("ok") {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{}",
                line.strip_prefix("error ")
                    .unwrap_or("the exec monitor exited before the process started")
            );
        }
        // Not waited for: it outlives us (reparented), like runc's process.
        Ok(child.id())
    })();
    let _ = std::fs::remove_file(&file);
    let pid = result?;
    if let Some(p) = &a.pid_file {
        write_pid_file(p, pid)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The hidden `vessel exec-monitor` command.
pub fn exec_monitor(store: &Store, a: &ExecMonitorArgs) -> ExitCode {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if a.ready_fd < 3 || unsafe { libc::fcntl(a.ready_fd, libc::F_GETFD) } < 0 {
        tracing::error!(
            "exec-monitor: --ready-fd {} is not an open descriptor",
            a.ready_fd
        );
        return ExitCode::from(1);
    }
    // SAFETY: the descriptor is open (checked above) and is the pipe's
    // write end `vessel exec` left to us alone; we take ownership once.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(a.ready_fd) });
    let started = (|| -> Result<Session> {
        let text = std::fs::read(&a.process_file)
            .with_context(|| format!("reading {}", a.process_file.display()))?;
        let _ = std::fs::remove_file(&a.process_file);
        let process: Value = serde_json::from_slice(&text).context("parsing the process")?;
        let uds = vsock_path(store, &a.id)?;
        start_exec(
            &uds,
            &a.id,
            &a.exec_id,
            process,
            a.console_socket.as_deref(),
        )
    })();
    let session = match started {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            let _ = writeln!(ready, "error {msg}");
            return ExitCode::from(1);
        }
    };
    let _ = writeln!(ready, "ok {}", session.pid);
    drop(ready);
    exit_code(session.wait())
}

/// `vessel ps`: the guest pids of the container's processes (from its
/// cgroup). `json`: a JSON array like runc; `table`: PID and the command
/// line read from the guest's /proc (runc runs the host's `ps` instead,
/// which cannot see into the VM, so `ps` arguments are refused).
pub fn ps(store: &Store, id: &str, format: &str, ps_args: &[String]) -> Result<()> {
    if !matches!(format, "table" | "json") {
        bail!("invalid format option {format:?}: use table or json");
    }
    let s = load_effective(store, id)?;
    s.status.check(Op::Inspect, id)?;
    let mut c = connect(store, id)?;
    c.set_timeout(Some(AGENT_TIMEOUT))?;
    let pids = c
        .list_processes(id)
        .with_context(|| format!("listing the processes of {id}"))?;
    if format == "json" {
        println!("{}", serde_json::to_string(&pids)?);
        return Ok(());
    }
    if !ps_args.is_empty() {
        bail!("ps arguments are not supported: the processes run in the container's VM, where the host's ps cannot see them");
    }
    println!("{:>8}  CMD", "PID");
    for pid in pids {
        let cmd = c
            .read_file(vessel_proto::ReadFileRequest {
                path: format!("/proc/{pid}/cmdline"),
                max_len: 4096,
                offset: 0,
                discard: false,
            })
            .map(|d| {
                d.data
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|_| "?".into());
        println!("{pid:>8}  {cmd}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ExecArgs,
    }

    fn args(v: &[&str]) -> ExecArgs {
        T::try_parse_from(std::iter::once("exec").chain(v.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn process_follows_runc_overrides() {
        let d = std::env::temp_dir().join(format!("vessel-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        let spec = json!({"root": {"path": "rootfs"}, "process": {
            "args": ["init"], "env": ["PATH=/bin", "FOO=old"], "cwd": "/",
            "user": {"uid": 0, "gid": 5}, "consoleSize": {"height": 1, "width": 1},
            "capabilities": {"bounding": ["CAP_KILL"]}}});
        std::fs::write(d.join("config.json"), spec.to_string()).unwrap();
        let a = args(&[
            "-e",
            "FOO=new",
            "--cwd",
            "/tmp",
            "-u",
            "1000",
            "--cap",
            "net_raw",
            "-t",
            "--no-new-privs",
            "box",
            "sh",
            "-c",
            "echo hi",
        ]);
        assert_eq!(a.id, "box");
        let p = build_process(&a, &d).unwrap();
        assert_eq!(p["args"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(p["env"], json!(["PATH=/bin", "FOO=new"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"], json!({"uid": 1000, "gid": 5}));
        assert_eq!(p["terminal"], true);
        assert_eq!(p["noNewPrivileges"], true);
        assert!(p.get("consoleSize").is_none());
        assert_eq!(
            p["capabilities"]["bounding"],
            json!(["CAP_KILL", "CAP_NET_RAW"])
        );
        assert_eq!(p["capabilities"]["effective"], json!(["CAP_NET_RAW"]));
        let p = build_process(&args(&["-u", "7:8", "box", "id"]), &d).unwrap();
        assert_eq!(p["user"], json!({"uid": 7, "gid": 8}));
        assert!(build_process(&args(&["-u", "x", "box", "id"]), &d).is_err());
        assert!(build_process(&args(&["box"]), &d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}

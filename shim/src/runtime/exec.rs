//! Execs: a new process in a running container.
//!
//! An exec reaches the container's VM through the sandbox's vsock socket
//! (like `start` and `kill`): it attaches the new process's stdio streams,
//! sends `ExecProcess` (the agent joins the container's namespaces and
//! cgroup), relays stdio, waits with `WaitProcess` on the same connection,
//! and exits with the process's status (128+N after signal N).
//!
//! In the foreground, [`Runtime::exec`] does that itself and forwards
//! HUP/INT/QUIT/TERM/USR1/USR2 to the process. Detached, it starts an
//! exec-monitor (`vessel exec-monitor`, in a session of its own, with our
//! stdio), which does the same ([`monitor`]); once the process runs, the
//! exec-monitor's pid goes to the pid file: that pid lives as long as the
//! process and exits with its status, like runc's exec'd process for
//! conmon or containerd's shim.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use vessel_proto::container::ExecProcessRequest;

use super::stdio::{Attached, Resizer, DRAIN_TIMEOUT};
use super::tty::{self, HostEnd, RawMode};
use super::{
    forward_signals, invalid, write_pid_file, Context, Result, Runtime, RuntimeError, AGENT_TIMEOUT,
};
use crate::bundle::Bundle;
use crate::state::Op;

/// What an exec runs: runc's `exec` flags.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// Command and arguments (unless `process`).
    pub command: Vec<String>,
    /// An OCI process JSON file.
    pub process: Option<PathBuf>,
    /// Allocate a pty.
    pub tty: bool,
    /// Detach.
    pub detach: bool,
    /// Where the host pid standing for the process goes.
    pub pid_file: Option<PathBuf>,
    /// Where a terminal process's pty master goes.
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    pub env: Vec<String>,
    /// uid[:gid].
    pub user: Option<String>,
    /// Additional gids.
    pub additional_gids: Vec<u32>,
    /// Capabilities added to the bounding, effective and permitted sets.
    pub cap: Vec<String>,
    /// Set no_new_privileges.
    pub no_new_privs: bool,
    /// SELinux label (the guest applies none).
    pub process_label: Option<String>,
    /// AppArmor profile (the guest applies none).
    pub apparmor: Option<String>,
}

/// The OCI process of an exec: `--process FILE`, or the container's own
/// process with runc's overrides.
pub fn build_process(a: &ExecOptions, bundle: &Path) -> Result<Value> {
    if let Some(path) = &a.process {
        let text =
            std::fs::read(path).with_ctx(|| format!("reading process file {}", path.display()))?;
        let mut p: Value = serde_json::from_slice(&text).map_err(|e| {
            RuntimeError::Invalid(format!("parsing process file {}: {e}", path.display()))
        })?;
        if !p.is_object() {
            return invalid(format!(
                "process file {}: not a JSON object",
                path.display()
            ));
        }
        if a.tty {
            p["terminal"] = Value::Bool(true);
        }
        return Ok(p);
    }
    if a.command.is_empty() {
        return invalid("exec args cannot be empty");
    }
    let b = Bundle::load(bundle)?;
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
        let bad_user =
            || RuntimeError::Invalid(format!("invalid --user {u:?}: use UID[:GID] (numbers)"));
        let uid: u32 = uid.parse().map_err(|_| bad_user())?;
        p["user"]["uid"] = json!(uid);
        if let Some(g) = gid {
            let gid: u32 = g.parse().map_err(|_| bad_user())?;
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
    /// The connection `ExecProcess` went over; `WaitProcess` goes over it
    /// too (a new connection costs a vsock handshake and an agent thread
    /// hand-over: 30–40 ms of guest time on PVM hosts).
    agent: vessel_proto::client::AgentClient,
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
    .with_ctx(|| format!("cannot reach the sandbox of container {id}"))?;
    c.set_timeout(Some(AGENT_TIMEOUT))
        .ctx("setting the agent timeout")?;
    let pid = c
        .exec_process(ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            process,
            stdio: attached.spec(),
        })
        .with_ctx(|| format!("exec in container {id}"))?;
    let relays = attached.relay(end, size, Resizer::new(uds, id, Some(exec_id)))?;
    Ok(Session {
        uds: uds.to_path_buf(),
        id: id.into(),
        exec_id: exec_id.into(),
        pid,
        relays,
        agent: c,
    })
}

impl Session {
    /// Waits for the process; its status (255 if the sandbox went away).
    fn wait(mut self) -> i32 {
        let mut r = self
            .agent
            .set_timeout(None)
            .and_then(|()| self.agent.wait_process(&self.id, Some(&self.exec_id)));
        if let Err(e) = &r {
            // The connection broke before the answer: once more on a new
            // one (the agent keeps an exec's status until a wait was
            // answered).
            tracing::debug!(
                "{}: waiting for exec {}: {e}; reconnecting",
                self.id,
                self.exec_id
            );
            r = vessel_proto::client::AgentClient::connect(
                &self.uds,
                vessel_proto::AGENT_PORT,
                Duration::from_secs(10),
            )
            .and_then(|mut c| {
                c.set_timeout(None)?;
                c.wait_process(&self.id, Some(&self.exec_id))
            });
        }
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

impl Runtime {
    /// `exec`: runs a process in running container `id`. In the
    /// foreground: its exit code. Detached: 0 once it runs.
    pub fn exec(&self, id: &str, a: &ExecOptions) -> Result<u8> {
        let s = self.state(id)?;
        s.status.check(Op::Exec, id)?;
        let process = build_process(a, &s.bundle)?;
        let terminal = process["terminal"].as_bool().unwrap_or(false);
        if terminal && a.detach && a.console_socket.is_none() {
            return invalid(
                "cannot allocate tty if vessel will detach without setting console socket",
            );
        }
        if !terminal && a.console_socket.is_some() {
            return invalid("cannot use console socket if vessel will not detach or allocate tty");
        }
        let uds = self.vsock_path(id)?;
        let exec_id = new_exec_id();
        if a.detach {
            let pid = self.detach(id, a, &exec_id, &process)?;
            if let Some(p) = &a.pid_file {
                write_pid_file(p, pid)?;
            }
            return Ok(0);
        }
        let _raw = (terminal && a.console_socket.is_none()).then(RawMode::stdin);
        let session = start_exec(&uds, id, &exec_id, process, a.console_socket.as_deref())?;
        tracing::debug!("{id}: exec {exec_id} runs as guest pid {}", session.pid);
        if let Some(p) = &a.pid_file {
            write_pid_file(p, std::process::id())?;
        }
        let (rt, target, eid) = (self.clone(), id.to_string(), exec_id.clone());
        forward_signals(id, move |sig| {
            if let Err(e) = rt.signal(&target, Some(&eid), sig, false) {
                tracing::warn!("forwarding signal {sig} to exec {eid} of {target}: {e}");
            }
        });
        Ok(status_code(session.wait()))
    }

    /// Starts an exec-monitor for a detached exec and returns its pid once
    /// the process runs.
    fn detach(&self, id: &str, a: &ExecOptions, exec_id: &str, process: &Value) -> Result<u32> {
        // Not waited for: it outlives us (reparented), like runc's process.
        let child = self.exec_monitored(id, exec_id, process, a.console_socket.as_deref(), None)?;
        Ok(child.id())
    }

    /// Starts process `exec_id` (the OCI `process` object) in running
    /// container `id` under an exec-monitor, in a session of its own, and
    /// returns the monitor once the process runs: it lives as long as the
    /// process and exits with its status (the containerd shim's exec). Its
    /// stdio is `stdio` (else ours), or a pty whose master goes to
    /// `console_socket` for a terminal process.
    pub fn exec_monitored(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
        console_socket: Option<&Path>,
        stdio: Option<&[OwnedFd; 3]>,
    ) -> Result<Child> {
        crate::state::validate_id(exec_id)?;
        self.state(id)?.status.check(Op::Exec, id)?;
        let terminal = process["terminal"].as_bool().unwrap_or(false);
        if terminal && console_socket.is_none() {
            return invalid("a terminal exec needs a console socket");
        }
        if !terminal && console_socket.is_some() {
            return invalid("cannot use a console socket without a terminal");
        }
        let dir = self.store.dir(id)?;
        let file = dir.join(format!("{exec_id}.process.json"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| f.write_all(process.to_string().as_bytes()));
        written.with_ctx(|| format!("writing {}", file.display()))?;
        let args: Vec<OsString> = vec![
            "exec-monitor".into(),
            id.into(),
            "--exec-id".into(),
            exec_id.into(),
            "--process-file".into(),
            file.clone().into(),
        ];
        // The exec-monitor stays in our cgroup: it only relays.
        let result = self.launcher.start(
            &args,
            console_socket,
            stdio,
            Vec::new(),
            "exec monitor",
            "the exec monitor exited before the process started",
        );
        let _ = std::fs::remove_file(&file);
        result
    }
}

fn status_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

/// The hidden `vessel exec-monitor` command: starts process `exec_id`
/// (its JSON in `process_file`, removed once read), reports `ok PID` on
/// `ready_fd`, waits, and returns the process's exit code.
pub fn monitor(
    rt: &Runtime,
    id: &str,
    exec_id: &str,
    process_file: &Path,
    console_socket: Option<&Path>,
    ready_fd: RawFd,
) -> u8 {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if ready_fd < 3 || unsafe { libc::fcntl(ready_fd, libc::F_GETFD) } < 0 {
        tracing::error!("exec-monitor: --ready-fd {ready_fd} is not an open descriptor");
        return 1;
    }
    // SAFETY: the descriptor is open (checked above) and is the pipe's
    // write end the starting `vessel exec` left to us alone; we take
    // ownership once.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ready_fd) });
    let started = (|| -> Result<Session> {
        let text = std::fs::read(process_file)
            .with_ctx(|| format!("reading {}", process_file.display()))?;
        let _ = std::fs::remove_file(process_file);
        let process: Value = serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::Invalid(format!("parsing the process: {e}")))?;
        let uds = rt.vsock_path(id)?;
        start_exec(&uds, id, exec_id, process, console_socket)
    })();
    let session = match started {
        Ok(s) => s,
        Err(e) => {
            let msg = super::error_chain(&e).replace('\n', " ");
            let _ = writeln!(ready, "error {msg}");
            return 1;
        }
    };
    let _ = writeln!(ready, "ok {}", session.pid);
    drop(ready);
    status_code(session.wait())
}

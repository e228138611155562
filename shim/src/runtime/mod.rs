//! The container lifecycle, once, for every front end (the runc-compatible
//! CLI today; the containerd shim and `vessel machine` reuse it).
//!
//! [`Runtime::create`] starts a **monitor**: the `vessel` binary again
//! (`vessel monitor ID --bundle B --ready-fd N`, see [`Launcher`]), in a
//! session of its own. The monitor ([`monitor::run`]) owns the sandbox: it
//! restores (or boots) the VM with the bundle's rootfs shared as
//! [`ROOTFS_TAG`], relays the stdio `create` was given to the container's
//! stdio streams, creates the container, and says `ok` (or `error
//! MESSAGE`) on the pipe. `create` then writes `state.json` (pid = the
//! monitor, with its start time) and `--pid-file`. The monitor waits for
//! the container's init, shuts the VM down, records `stopped` with the exit
//! status, and exits with that status, so the pid in `--pid-file` behaves
//! like runc's container process.
//!
//! Every operation loads the state, checks it with [`Status::check`] (the
//! one place that says which status allows what), does its work through
//! the agent, and saves the new state under the container's lock.
//!
//! `<root>/<id>/` holds the state, the lock, the VM's logs and `vmm.pid`;
//! the sockets (`vsock.sock`, `api.sock`) are in the short
//! [`Store::sandbox_dir`], whatever the length of `--root`.
//!
//! Terminal containers (`process.terminal`): the monitor sends a host pty
//! master to `--console-socket` before it says `ok`, or, for a foreground
//! `run` without a socket, relays the terminal stream to the caller's
//! terminal (see [`tty`]). Execs are in [`exec`].

pub mod exec;
pub mod monitor;
pub mod pod;
mod stdio;
pub mod tty;

use std::ffi::{CStr, CString, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::container::SignalProcessRequest;
use vessel_proto::resources::{ResourcesUpdate, Stats};
use vessel_proto::{ErrorCode, AGENT_PORT};

use crate::binds::BindError;
use crate::bundle::{Bundle, BundleError};
use crate::cgroup::{CgroupError, CgroupPath, CpuResources, HostCgroup};
use crate::config::{Config, ConfigError};
use crate::hooks::HookError;
use crate::netns::NetnsError;
use crate::sandbox::SandboxError;
use crate::signal::SignalError;
use crate::state::{self, ContainerState, Op, StateError, Status, Store, OCI_VERSION};

pub use crate::sandbox::{MOUNTS_TAG, ROOTFS_TAG};

/// The VMM's pid and start time, written by the monitor.
const VMM_PID_FILE: &str = "vmm.pid";
/// Left by `kill ID KILL` before it ends the VM: the monitor then reports
/// the container as killed by SIGKILL (137).
const KILLED_FILE: &str = "killed";
/// How long the agent may take for create/start (guest kernels are slow
/// where ring 0 is emulated).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `delete --force` waits for the monitor after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the container lifecycle. Messages are what the CLI prints
/// (the binary adds the chain of causes).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store refused (unknown id, id taken, wrong status).
    #[error(transparent)]
    State(#[from] StateError),
    /// The bundle cannot be used.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be started or stopped.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A host bind mount cannot be set up.
    #[error(transparent)]
    Binds(#[from] BindError),
    /// The engine's network namespace cannot be used.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The engine's interfaces cannot be wired into the VM.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// Not a signal.
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The host cgroup cannot be set up or removed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The agent refused a request or could not be reached.
    #[error("{what}")]
    Agent {
        /// What was asked.
        what: String,
        /// Why it failed.
        #[source]
        source: ClientError,
    },
    /// A host file, pipe or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The request itself is wrong (flags, process JSON).
    #[error("{0}")]
    Invalid(String),
    /// The sandbox monitor reported a failure (its message).
    #[error("{0}")]
    Monitor(String),
    /// A pod container names a sandbox container that does not exist.
    #[error("sandbox container {0:?} does not exist")]
    NoSandbox(String),
}

/// Results of the lifecycle.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Adds what was being done to a lower-level error.
pub trait Context<T> {
    /// With a fixed description.
    fn ctx(self, what: impl Into<String>) -> Result<T>;
    /// With a description built only on failure.
    fn with_ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| RuntimeError::Io {
            what: what.into(),
            source,
        })
    }
    fn with_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Io {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, ClientError> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| RuntimeError::Agent {
            what: what.into(),
            source,
        })
    }
    fn with_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RuntimeError::Agent {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(std::io::Error::from).ctx(what)
    }
    fn with_ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(std::io::Error::from).with_ctx(what)
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(RuntimeError::Invalid(msg.into()))
}

/// How monitors are started: this program again, with the global flags
/// (root, config, logging) of the command that starts them.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The `vessel` binary.
    pub exe: PathBuf,
    /// Global flags, placed before the hidden subcommand.
    pub globals: Vec<OsString>,
}

impl Launcher {
    /// Starts `exe globals... args... [--console-socket S] --ready-fd N`
    /// in a session of its own, in the cgroups whose `cgroup.procs` files
    /// are `procs` (so everything it starts is accounted there), and waits
    /// until it says `ok` on the ready pipe. Its error message (or `gone`
    /// if it says nothing) otherwise, with the child killed and reaped.
    ///
    /// With a console socket the process's stdio is a pty: like runc, it
    /// keeps nothing of the caller's stdio, or a caller reading our output
    /// until EOF (`out=$(vessel create ...)`, dockerd, containerd's shim)
    /// would wait as long as the process lives.
    fn start(
        &self,
        args: &[OsString],
        console_socket: Option<&Path>,
        stdio: Option<&[std::os::fd::OwnedFd; 3]>,
        procs: Vec<CString>,
        what: &str,
        gone: &str,
    ) -> Result<Child> {
        let (reader, writer) = std::io::pipe().ctx("creating a pipe")?;
        let ready = writer.as_raw_fd();
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.globals).args(args);
        if let Some(s) = console_socket {
            let s = std::path::absolute(s).ctx("resolving the console socket path")?;
            cmd.arg("--console-socket")
                .arg(s)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        } else if let Some([i, o, e]) = stdio {
            let dup =
                |fd: &std::os::fd::OwnedFd| fd.try_clone().ctx("duplicating a stdio descriptor");
            cmd.stdin(dup(i)?).stdout(dup(o)?).stderr(dup(e)?);
        }
        cmd.arg("--ready-fd").arg(ready.to_string());
        // SAFETY: runs in the child between fork and exec; setsid(2),
        // fcntl(2) and `join_cgroup`'s calls are async-signal-safe and
        // allocate nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::fcntl(ready, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for p in &procs {
                    join_cgroup(p)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_ctx(|| format!("starting the {what}"))?;
        drop(writer);
        let mut line = String::new();
        let read = BufReader::new(reader).read_line(&mut line);
        let line = line.trim_end();
        if read.is_ok() && line.starts_with("ok") {
            return Ok(child);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(RuntimeError::Monitor(
            line.strip_prefix("error ").unwrap_or(gone).to_string(),
        ))
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs` (writing `0` means "me", in v1 and v2). Only system calls: safe
/// between fork and exec.
fn join_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: open(2) of a NUL-terminated path we own, write(2) of a
    // static byte, close(2) of the descriptor we opened; no allocation.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// What `create` needs besides the bundle.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Write the monitor's pid here (atomically).
    pub pid_file: Option<PathBuf>,
    /// Where a terminal container's pty master goes.
    pub console_socket: Option<PathBuf>,
    /// A foreground `run`: a terminal container may use the caller's
    /// terminal instead of a console socket.
    pub foreground: bool,
    /// The monitor's stdin, stdout and stderr (which it relays to the
    /// container's) instead of the caller's: the containerd shim passes
    /// the FIFOs containerd gave it. Ignored with a console socket.
    pub stdio: Option<std::sync::Arc<[std::os::fd::OwnedFd; 3]>>,
    /// Create the container inside the VM of this running container (a
    /// pod member, see [`pod`]) instead of a VM of its own.
    pub sandbox: Option<String>,
}

/// The lifecycle over one state store and configuration.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Container state under `--root`.
    pub store: Store,
    /// Artifacts and sandbox shape.
    pub cfg: Config,
    /// How monitors are started.
    pub launcher: Launcher,
    /// `linux.cgroupsPath` is in systemd's `slice:prefix:name` form
    /// (runc's `--systemd-cgroup`).
    pub systemd_cgroup: bool,
}

impl Runtime {
    /// The vsock socket of `id`'s VM: its own, or its sandbox's for a pod
    /// member.
    pub fn vsock_path(&self, id: &str) -> Result<PathBuf> {
        let vm = match self.store.load(id) {
            Ok(ContainerState { pod: Some(p), .. }) => p.sandbox,
            _ => id.to_string(),
        };
        Ok(self.store.sandbox_dir(&vm)?.join("vsock.sock"))
    }

    /// A control connection to `id`'s agent.
    pub fn connect(&self, id: &str) -> Result<AgentClient> {
        let uds = self.vsock_path(id)?;
        AgentClient::connect(&uds, AGENT_PORT, Duration::from_secs(10))
            .with_ctx(|| format!("cannot reach the sandbox of container {id}"))
    }

    /// The state as it really is: a container whose monitor is gone is
    /// stopped.
    pub fn state(&self, id: &str) -> Result<ContainerState> {
        Ok(effective(self.store.load(id)?))
    }

    /// Every container's state (unreadable ones are skipped with a warning).
    pub fn list(&self) -> Result<Vec<ContainerState>> {
        let mut states = Vec::new();
        for id in self.store.ids()? {
            match self.state(&id) {
                Ok(s) => states.push(s),
                Err(e) => tracing::warn!("skipping {id}: {e}"),
            }
        }
        Ok(states)
    }

    /// `create`: starts the monitor, which creates the container in its
    /// VM; returns the monitor (still our child). A terminal container
    /// needs a console socket unless it runs in the foreground.
    ///
    /// With [`CreateOptions::sandbox`], [`Runtime::create_in`] that one.
    pub fn create(&self, id: &str, b: &Bundle, o: &CreateOptions) -> Result<Child> {
        if let Some(sb) = &o.sandbox {
            return self.create_in(sb, id, b, o);
        }
        state::validate_id(id)?;
        self.cfg.check_artifacts()?;
        self.check_stdio(b, o)?;
        crate::hooks::refuse_in_container(&b.spec)?;
        let (dir, lock) = self.store.create(id)?;
        let mut child: Option<Child> = None;
        let mut cgroup: Option<HostCgroup> = None;
        let result = (|| -> Result<()> {
            let cg = cgroup.insert(self.host_cgroup(id, b)?);
            let procs = cg
                .state()
                .dirs
                .iter()
                .map(|d| CString::new(d.leaf.join("cgroup.procs").into_os_string().into_vec()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| RuntimeError::Invalid("a cgroup path contains NUL".into()))?;
            let args: Vec<OsString> = vec![
                "monitor".into(),
                id.into(),
                "--bundle".into(),
                b.dir.clone().into(),
            ];
            let c = self.launcher.start(
                &args,
                o.console_socket.as_deref(),
                o.stdio.as_deref(),
                procs,
                "sandbox monitor",
                "the sandbox monitor exited before the container was created",
            )?;
            let c = child.insert(c);
            self.save_created(id, b, o, c.id(), &lock, Some(cg.state().clone()), None)
        })();
        match (result, child) {
            (Ok(()), Some(c)) => Ok(c),
            (Ok(()), None) => Err(RuntimeError::Monitor("no monitor".into())),
            (Err(e), c) => {
                if let Some(mut c) = c {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                kill_vmm(&dir);
                if let Some(cg) = cgroup {
                    if let Err(e) = cg.remove() {
                        tracing::warn!("{id}: removing the host cgroup: {e}");
                    }
                }
                let _ = self.store.remove(id, lock);
                // As runc, which destroys a container whose creation
                // failed and runs its poststop hooks (a failure is logged).
                let state = hook_state(id, b, "stopped", 0);
                let r = crate::hooks::of_kind(&b.spec, "poststop")
                    .and_then(|h| crate::hooks::run("poststop", &h, &state));
                if let Err(e) = r {
                    tracing::warn!("{id}: {}", error_chain(&e));
                }
                Err(e)
            }
        }
    }

    /// Refuses stdio options that do not fit the bundle (runc's words).
    fn check_stdio(&self, b: &Bundle, o: &CreateOptions) -> Result<()> {
        if b.terminal && o.console_socket.is_none() && !o.foreground {
            return invalid(
                "cannot allocate tty if vessel will detach without setting console socket",
            );
        }
        if !b.terminal && o.console_socket.is_some() {
            return invalid("cannot use console socket if vessel will not detach or allocate tty");
        }
        Ok(())
    }

    /// Writes the state of a container just created by monitor `pid`, and
    /// the pid file.
    #[allow(clippy::too_many_arguments)]
    fn save_created(
        &self,
        id: &str,
        b: &Bundle,
        o: &CreateOptions,
        pid: u32,
        lock: &state::Lock,
        host_cgroup: Option<crate::cgroup::HostCgroupState>,
        pod: Option<state::PodMember>,
    ) -> Result<()> {
        let pid_i = i32::try_from(pid)
            .map_err(|_| RuntimeError::Monitor(format!("pid {pid} out of range")))?;
        let pid_start = state::process_start(pid_i).ok_or_else(|| {
            RuntimeError::Monitor("the monitor exited right after creating the container".into())
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
            oom_killed: false,
            pid_start: Some(pid_start),
            host_cgroup,
            hooks: b.spec.get("hooks").cloned().filter(|h| !h.is_null()),
            pod,
        };
        self.store.save(&st, lock)?;
        if let Some(p) = &o.pid_file {
            write_pid_file(p, pid)?;
        }
        Ok(())
    }

    /// `start`.
    pub fn start(&self, id: &str) -> Result<()> {
        let lock = self.store.lock(id)?;
        let mut s = self.state(id)?;
        s.status.check(Op::Start, id)?;
        let mut c = self.connect(id)?;
        c.set_timeout(Some(AGENT_TIMEOUT))
            .ctx("setting the agent timeout")?;
        c.start_container(id)
            .with_ctx(|| format!("starting container {id}"))?;
        s.status = Status::Running;
        self.store.save(&s, &lock)?;
        drop(lock);
        // After the process started, as the runtime spec and runc 1.2 do
        // (runc 1.1 ran them in `create`, with the state `created`).
        self.run_hooks(&s, "poststart");
        Ok(())
    }

    /// Runs hooks of `kind` from the saved state (post* hooks: a failure
    /// is logged, as the runtime spec says).
    fn run_hooks(&self, s: &ContainerState, kind: &str) {
        let Some(spec) = &s.hooks else {
            return;
        };
        let spec = serde_json::json!({ "hooks": spec });
        let state = state_json(s);
        let r =
            crate::hooks::of_kind(&spec, kind).and_then(|h| crate::hooks::run(kind, &h, &state));
        if let Err(e) = r {
            tracing::warn!("{}: {}", s.id, error_chain(&e));
        }
    }

    /// `kill`: `signal` to the init (or, with `all`, every process).
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let s = self.state(id)?;
        s.status.check(Op::Kill, id)?;
        // A pod member shares its VM: only its own processes get the signal.
        if signal == libc::SIGKILL && s.pod.is_none() {
            // Every process of the container lives in its VM: ending the
            // VM kills them all at once, with no guest kernel work (which
            // is slow where it is emulated; engines wait only a few
            // seconds for the pid in --pid-file to die).
            return self.kill_sandbox(id);
        }
        match self.signal(id, None, signal, all) {
            // The init exited and the monitor has not recorded it yet:
            // runc's words, which engines match ("container not running").
            Err(RuntimeError::Agent {
                source: ClientError::Remote(r),
                ..
            }) if r.code == ErrorCode::FailedPrecondition => {
                Err(StateError::InvalidState("container not running".into()).into())
            }
            other => other,
        }
    }

    /// Ends container `id`'s VM (SIGKILL to its VMM); its monitor then
    /// exits with 137.
    fn kill_sandbox(&self, id: &str) -> Result<()> {
        let dir = self.store.dir(id)?;
        std::fs::write(dir.join(KILLED_FILE), b"")
            .with_ctx(|| format!("writing {}", dir.join(KILLED_FILE).display()))?;
        kill_vmm(&dir);
        Ok(())
    }

    /// Sends `signal` to process `exec_id` (None: init) of `id`.
    pub fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()> {
        let mut c = self.connect(id)?;
        c.signal_process(SignalProcessRequest {
            id: id.into(),
            exec_id: exec_id.map(str::to_string),
            signal,
            all,
        })
        .with_ctx(|| format!("signalling container {id}"))?;
        Ok(())
    }

    /// `delete [--force]`: stops what still runs (with `force`) and
    /// removes every trace of the container.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let lock = self.store.lock(id)?;
        let s = self.store.load(id).ok().map(effective);
        if let Some(s) = s.as_ref().filter(|_| !force) {
            s.status.check(Op::Delete, id)?;
        }
        // The monitor takes the lock to record `stopped`: let it.
        drop(lock);
        let dir = self.store.dir(id)?;
        let pod = s.as_ref().and_then(|s| s.pod.clone());
        if let Some(s) = s.filter(|s| s.status != Status::Stopped) {
            let alive = || monitor_alive(&s);
            let stopped = match &pod {
                // Its VM is its sandbox's: only its processes end.
                Some(_) => self.signal(id, None, libc::SIGKILL, true),
                None => self.kill_sandbox(id),
            };
            if let Err(e) = stopped {
                tracing::warn!("{id}: {}", error_chain(&e));
            }
            if !wait_until(STOP_TIMEOUT, || !alive()) {
                tracing::warn!("the monitor of {id} did not stop; killing it");
                send_signal(s.pid, libc::SIGKILL);
                wait_until(Duration::from_secs(10), || !alive());
            }
        }
        kill_vmm(&dir);
        if let Some(p) = &pod {
            self.remove_member(id, p);
        }
        let lock = self.store.lock(id)?;
        if let Ok(mut s) = self.store.load(id) {
            if let Some(cg) = s.host_cgroup.take() {
                HostCgroup::from_state(cg).remove()?;
            }
            s.status = Status::Stopped;
            s.pid = 0;
            self.run_hooks(&s, "poststop");
        }
        self.store.remove(id, lock)?;
        Ok(())
    }

    /// Creates the host cgroup `linux.cgroupsPath` names (runc's default
    /// when it is empty) and gives it the spec's CPU weight and cpuset.
    fn host_cgroup(&self, id: &str, b: &Bundle) -> Result<HostCgroup> {
        let path = b.spec["linux"]["cgroupsPath"].as_str();
        let path = CgroupPath::parse(path, self.systemd_cgroup, id)?;
        let cg = HostCgroup::create(&path)?;
        if let Err(e) = cg.apply_cpu(&CpuResources::from_spec(&b.spec)) {
            let _ = cg.remove();
            return Err(e.into());
        }
        Ok(cg)
    }

    /// `pause`: freezes the container's cgroup in the guest.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.transition(id, Op::Pause, Status::Paused, |c| {
            c.pause_container(id)
                .with_ctx(|| format!("pausing container {id}"))
        })
    }

    /// `resume`: thaws a paused container.
    pub fn resume(&self, id: &str) -> Result<()> {
        self.transition(id, Op::Resume, Status::Running, |c| {
            c.resume_container(id)
                .with_ctx(|| format!("resuming container {id}"))
        })
    }

    /// Under the lock: checks `op`, runs `work` on the agent, records `to`.
    fn transition(
        &self,
        id: &str,
        op: Op,
        to: Status,
        work: impl FnOnce(&mut AgentClient) -> Result<()>,
    ) -> Result<()> {
        let lock = self.store.lock(id)?;
        let mut s = self.state(id)?;
        s.status.check(op, id)?;
        let mut c = self.connect(id)?;
        c.set_timeout(Some(AGENT_TIMEOUT))
            .ctx("setting the agent timeout")?;
        work(&mut c)?;
        s.status = to;
        self.store.save(&s, &lock)?;
        Ok(())
    }

    /// `update`: new resource limits, applied in the guest.
    pub fn update(&self, id: &str, resources: ResourcesUpdate) -> Result<()> {
        let _lock = self.store.lock(id)?;
        self.state(id)?.status.check(Op::Update, id)?;
        let mut c = self.connect(id)?;
        c.set_timeout(Some(AGENT_TIMEOUT))
            .ctx("setting the agent timeout")?;
        c.update_container(id, resources)
            .with_ctx(|| format!("updating container {id}"))
    }

    /// The container's statistics and OOM kill count, from the guest.
    pub fn stats(&self, c: &mut AgentClient, id: &str) -> Result<(Stats, u64)> {
        let st = c
            .container_stats(id)
            .with_ctx(|| format!("reading the statistics of container {id}"))?;
        Ok((st.stats, st.oom_kills))
    }

    /// A connection for repeated questions about a running container
    /// (`events`, `ps`), after checking its status.
    pub fn inspect(&self, id: &str) -> Result<AgentClient> {
        self.state(id)?.status.check(Op::Inspect, id)?;
        let mut c = self.connect(id)?;
        c.set_timeout(Some(AGENT_TIMEOUT))
            .ctx("setting the agent timeout")?;
        Ok(c)
    }

    /// The guest pids of the container's processes.
    pub fn pids(&self, id: &str) -> Result<(Vec<i32>, AgentClient)> {
        let mut c = self.inspect(id)?;
        let pids = c
            .list_processes(id)
            .with_ctx(|| format!("listing the processes of {id}"))?;
        Ok((pids, c))
    }

    /// Whether `id` still exists and is not stopped.
    pub fn still_running(&self, id: &str) -> bool {
        self.state(id).is_ok_and(|s| s.status != Status::Stopped)
    }

    /// `run`: create, start, and (unless `detach`) wait and delete, like
    /// runc; the exit code a shell would report. A foreground terminal
    /// container without a console socket uses the caller's terminal (raw
    /// mode until it exits).
    pub fn run(&self, id: &str, b: &Bundle, o: &CreateOptions, detach: bool) -> Result<u8> {
        let own_tty = !detach && o.console_socket.is_none() && b.terminal;
        let _raw = own_tty.then(tty::RawMode::stdin);
        let o = CreateOptions {
            foreground: !detach,
            ..o.clone()
        };
        let mut child = self.create(id, b, &o)?;
        if let Err(e) = self.start(id) {
            let _ = self.delete(id, true);
            let _ = child.wait();
            return Err(e);
        }
        if detach {
            return Ok(0);
        }
        let rt = self.clone();
        let target = id.to_string();
        forward_signals(id, move |sig| {
            if let Err(e) = rt.kill(&target, sig, false) {
                tracing::warn!("forwarding signal {sig} to {target}: {e}");
            }
        });
        let status = child.wait().ctx("waiting for the container")?;
        // Like runc: a foreground container is deleted once it exits.
        self.delete(id, true)?;
        Ok(exit_code(status))
    }
}

/// The state hooks get on stdin (the runtime spec's state).
fn state_json(s: &ContainerState) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": s.oci_version,
        "id": s.id,
        "status": s.status.as_str(),
        "pid": s.pid,
        "bundle": s.bundle,
        "annotations": s.annotations,
    })
}

/// The state of container `id` (bundle `b`) with `status` and `pid`, for
/// hooks run before `state.json` exists.
pub(crate) fn hook_state(id: &str, b: &Bundle, status: &str, pid: u32) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": id,
        "status": status,
        "pid": pid,
        "bundle": b.dir,
        "annotations": b.annotations,
    })
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

fn send_signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a pid and a signal number; no memory is
        // involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Records the VMM's pid and start time in `dir` for [`kill_vmm`].
fn write_vmm_pid(dir: &Path, pid: u32) -> Result<()> {
    let gone = || RuntimeError::Monitor("the VMM exited".into());
    let pid = i32::try_from(pid).map_err(|_| gone())?;
    let start = state::process_start(pid).ok_or_else(gone)?;
    std::fs::write(dir.join(VMM_PID_FILE), format!("{pid} {start}\n")).ctx("writing vmm.pid")
}

/// The VMM's pid and start time recorded in `dir` (`vmm.pid`).
fn read_vmm_pid(dir: &Path) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(dir.join(VMM_PID_FILE)).ok()?;
    let (p, t) = s.trim().split_once(' ')?;
    Some((p.parse::<i32>().ok()?, t.parse::<u64>().ok()?))
}

/// Kills the VMM of `dir` (from `vmm.pid`) if that very process still runs.
fn kill_vmm(dir: &Path) {
    let Some((pid, start)) = read_vmm_pid(dir) else {
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
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        return invalid(format!("invalid pid file {}", path.display()));
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_ctx(|| format!("writing pid file {}", path.display()))
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(255),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        _ => 255,
    }
}

/// Signals a foreground `run` or `exec` forwards to its process.
const FORWARDED: [i32; 6] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks [`FORWARDED`] in this process and calls `send` with each one
/// that arrives, from a thread (`what` names the target in logs), like
/// runc's foreground `run`.
pub fn forward_signals(what: &str, mut send: impl FnMut(i32) + Send + 'static) {
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

/// `e` and its causes in one line, `: `-separated (what the monitors
/// report to the command that started them).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

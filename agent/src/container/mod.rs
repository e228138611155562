//! Containers inside the guest: create (runc create), start, exec, signal,
//! wait, state, delete, list processes.
//!
//! One operation per function below, each: look the container up, check
//! that its state allows the operation, do it. A container's init is made
//! with one `clone3` (its namespaces, its cgroup and a pidfd at once), sets
//! itself up from a [`spec::InitPlan`] ([`child`]), reports ready and
//! blocks on a pipe until `StartContainer`. An exec joins the init's
//! namespaces through that pidfd (`setns`, one call for all of them) and
//! starts in the container's cgroup the same way. Exit statuses come from
//! the [`crate::reaper::Reaper`].
//!
//! A pod container joins its sandbox's namespaces by path
//! (`linux.namespaces[].path`, ipc/uts/pid/network/cgroup): the paths are
//! opened and checked (`NS_GET_NSTYPE`) first, then a short-lived thread
//! `setns`es into them and clones the init, which so starts inside them
//! (pid included, as `setns(CLONE_NEWPID)` applies to the thread's
//! children: no double fork as in runc's nsexec).

pub mod cgroup;
pub mod child;
pub mod oci;
pub mod resources;
pub mod seccomp;
pub mod spawner;
pub mod spec;
pub mod stats;
pub mod stdio;
pub mod trace;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

#[cfg(test)]
use vessel_proto::container::StdioSpec;
use vessel_proto::container::{
    runc_exit_status, valid_id, AttachStdioRequest, ContainerCreated, ContainerRef, ContainerState,
    ContainerStatus, CreateContainerRequest, DeleteContainerRequest, ExecProcessRequest,
    ProcessExit, ProcessRef, ResizeTerminalRequest, SignalProcessRequest,
};
use vessel_proto::{ErrorCode, ErrorReply, MountRequest};

use crate::reaper::{ExitCell, Reaper};
use cgroup::Cgroup;
use child::{
    ChildFds, ExecPtrs, Report, Step, REPORT_ERROR, REPORT_EXEC, REPORT_READY, REPORT_STARTED,
};
use spec::{InitPlan, ProcessPlan, SpecError};

/// Stack of the short-lived thread that creates an exec's process (it
/// enters the container's pid namespace for its children only).
pub const EXEC_THREAD_STACK: usize = 128 * 1024;

fn reply(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

fn internal(message: impl Into<String>) -> ErrorReply {
    reply(ErrorCode::Internal, message)
}

fn from_spec(e: SpecError) -> ErrorReply {
    let mut msg = e.to_string();
    if let Some(s) = std::error::Error::source(&e) {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
    }
    let code = match e {
        SpecError::Unsupported(_) => ErrorCode::Unsupported,
        _ => ErrorCode::InvalidRequest,
    };
    reply(code, msg)
}

fn errno_str(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// A process of a container.
#[derive(Debug)]
struct Proc {
    pid: libc::pid_t,
    exit: Arc<ExitCell>,
    /// pty master (terminal mode), for resizing.
    pty: Option<OwnedFd>,
}

/// Mutable part of a container.
#[derive(Debug, Default)]
struct Inner {
    started: bool,
    /// Write end of the start pipe, until started.
    start: Option<OwnedFd>,
    /// Read end of init's status pipe, until started.
    status: Option<OwnedFd>,
    execs: HashMap<String, Proc>,
    /// Frozen by `PauseContainer` (see [`resources`]).
    paused: bool,
}

/// One container.
#[derive(Debug)]
pub struct Container {
    id: String,
    init: Proc,
    pidfd: OwnedFd,
    /// Namespaces an exec joins with setns (all but pid).
    join_flags: libc::c_int,
    /// The init has its own pid namespace (an exec enters it too).
    pid_ns: bool,
    /// The init has its own user namespace (`join_flags` has it).
    userns: bool,
    cgroup: Cgroup,
    /// Where the agent mounted the rootfs tag (unmounted on delete).
    rootfs_mount: Option<String>,
    /// The init's seccomp filter, loaded by execs too.
    seccomp: Option<Arc<seccomp::Filter>>,
    inner: Mutex<Inner>,
}

impl Container {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self, inner: &Inner) -> ContainerStatus {
        if self.init.exit.get().is_some() {
            ContainerStatus::Stopped
        } else if inner.paused {
            ContainerStatus::Paused
        } else if inner.started {
            ContainerStatus::Running
        } else {
            ContainerStatus::Created
        }
    }

    fn exit_of(&self, raw: i32) -> ProcessExit {
        let (status, signal) = runc_exit_status(raw).unwrap_or((raw, None));
        ProcessExit {
            status,
            signal,
            oom_killed: signal == Some(libc::SIGKILL) && self.cgroup.oom_killed(),
        }
    }
}

enum Slot {
    /// Being created: the id is taken.
    Creating,
    Ready(Arc<Container>),
}

/// Every container of the guest, and stdio streams waiting for theirs.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Slot>>,
    stdio: stdio::Pending,
}

static CONTAINERS: OnceLock<Containers> = OnceLock::new();

/// The guest's containers.
pub fn global() -> &'static Containers {
    CONTAINERS.get_or_init(Containers::default)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ErrorReply> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal(format!("pipe: {e}")))
}

/// /dev/null, opened once, for stdio that has no stream.
fn dev_null() -> Result<RawFd, ErrorReply> {
    static NULL: OnceLock<Result<OwnedFd, String>> = OnceLock::new();
    NULL.get_or_init(|| {
        crate::init::open_raw_mode(c"/dev/null", libc::O_RDWR | libc::O_CLOEXEC, 0)
            .map_err(|e| format!("cannot open /dev/null: {e}"))
    })
    .as_ref()
    .map(|f| f.as_raw_fd())
    .map_err(|e| internal(e.clone()))
}

/// Reads one report; `None` on EOF (the child executed, or died).
fn read_report(status: &mut File) -> Result<Option<Report>, ErrorReply> {
    let mut b = [0u8; Report::SIZE];
    let mut got = 0;
    while got < b.len() {
        match status.read(&mut b[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(internal(format!("status pipe: {e}"))),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got < b.len() {
        return Err(internal("truncated report from the container process"));
    }
    Ok(Some(Report::from_bytes(&b)))
}

/// Reads reports until EOF after the child was let go: `Ok` when it reached
/// `execve` and the pipe closed (the program runs), else the failed step's
/// report, or `None` when it died before reaching `execve`.
fn wait_exec(status: &mut File) -> Result<(), Option<Report>> {
    let mut reached_exec = false;
    loop {
        match read_report(status) {
            Ok(None) if reached_exec => return Ok(()),
            Ok(None) | Err(_) => return Err(None),
            Ok(Some(r)) if r.kind == REPORT_EXEC => reached_exec = true,
            Ok(Some(r)) => return Err(Some(r)),
        }
    }
}

/// What a failed step was doing, for the error message.
fn describe(r: &Report, init: Option<&InitPlan>, p: &ProcessPlan) -> String {
    let i = r.index as usize;
    let step = Step::from_u32(r.step);
    let what = match step {
        Some(Step::Mount | Step::MountPoint | Step::MountRemount | Step::MountPropagation) => {
            let m = init.and_then(|p| p.mounts.get(i));
            let dest = m.map_or("?", |m| m.destination.as_str());
            let action = match step {
                Some(Step::MountPoint) => "create mount point",
                Some(Step::MountRemount) => "remount with options",
                Some(Step::MountPropagation) => "set propagation of",
                _ => "mount",
            };
            format!("{action} {dest}")
        }
        Some(Step::Device) => format!(
            "create device {}",
            init.and_then(|p| p.devices.get(i))
                .map_or("?".into(), |d| d.path.to_string_lossy().into_owned())
        ),
        Some(Step::MaskedPath) => format!(
            "mask {}",
            init.and_then(|p| p.masked_paths.get(i))
                .map_or("?".into(), |d| d.to_string_lossy().into_owned())
        ),
        Some(Step::ReadonlyPath) => format!(
            "make {} read-only",
            init.and_then(|p| p.readonly_paths.get(i))
                .map_or("?".into(), |d| d.to_string_lossy().into_owned())
        ),
        Some(Step::Sysctl) => format!(
            "write sysctl {}",
            init.and_then(|p| p.sysctls.get(i))
                .map_or("?".into(), |d| d.0.to_string_lossy().into_owned())
        ),
        Some(Step::Cwd) => format!("chdir to cwd {}", p.cwd.to_string_lossy()),
        Some(Step::Seccomp) => "load the seccomp filter".into(),
        Some(Step::ExecLookup) => {
            return format!(
                "exec: {:?}: executable file not found in $PATH ({})",
                p.args.first().map_or("".into(), |a| a.to_string_lossy()),
                errno_str(r.errno)
            )
        }
        Some(Step::Exec) => format!(
            "exec {}",
            p.exec_candidates
                .get(i)
                .map_or("?".into(), |c| c.to_string_lossy())
        ),
        Some(s) => format!("{s:?}"),
        None => format!("step {}", r.step),
    };
    format!("cannot {what}: {}", errno_str(r.errno))
}

impl Containers {
    fn get(&self, id: &str) -> Result<Arc<Container>, ErrorReply> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(reply(
                ErrorCode::FailedPrecondition,
                format!("container {id} is being created"),
            )),
            None => Err(reply(
                ErrorCode::NotFound,
                format!("container {id} does not exist"),
            )),
        }
    }

    /// `AttachStdio`: keeps the connection for the process it names.
    pub fn attach_stdio(&self, req: &AttachStdioRequest, fd: OwnedFd) -> Result<(), ErrorReply> {
        if !valid_id(&req.id) || req.exec_id.as_deref().is_some_and(|e| !valid_id(e)) {
            return Err(reply(
                ErrorCode::InvalidRequest,
                "invalid container or exec id",
            ));
        }
        self.stdio
            .attach(req, fd)
            .map_err(|m| reply(ErrorCode::FailedPrecondition, m))
    }

    /// Takes the stdout stream attached for `id` (server tests).
    #[cfg(test)]
    pub fn take_stdio_for_test(&self, id: &str, spec: StdioSpec) -> Result<OwnedFd, String> {
        self.stdio.take(id, None, spec, false)?.std[1]
            .take()
            .ok_or_else(|| "no stdout".to_string())
    }

    /// `CreateContainer`.
    pub fn create(&self, req: CreateContainerRequest) -> Result<ContainerCreated, ErrorReply> {
        let id = req.id.clone();
        if !valid_id(&id) {
            return Err(reply(
                ErrorCode::InvalidRequest,
                format!("invalid container id {id:?}"),
            ));
        }
        {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return Err(reply(
                    ErrorCode::AlreadyExists,
                    format!("container {id} already exists"),
                ));
            }
            map.insert(id.clone(), Slot::Creating);
        }
        let result = self.create_inner(req);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((c, created)) => {
                map.insert(id, Slot::Ready(Arc::new(c)));
                Ok(created)
            }
            Err(e) => {
                map.remove(&id);
                drop(map);
                self.stdio.forget(&id);
                Err(e)
            }
        }
    }

    fn create_inner(
        &self,
        req: CreateContainerRequest,
    ) -> Result<(Container, ContainerCreated), ErrorReply> {
        let started = Instant::now();
        trace::mark("create");
        let t0 = crate::init::boottime_ms();
        let id = req.id;
        let spec = spec::parse_spec(req.spec).map_err(from_spec)?;
        let plan = Arc::new(spec::init_plan(&spec, &req.rootfs.path).map_err(from_spec)?);
        drop(spec);
        write_vm_sysctls(&plan)?;
        let taken = self
            .stdio
            .take(&id, None, req.stdio, plan.process.terminal)
            .map_err(|m| reply(ErrorCode::FailedPrecondition, m))?;
        let rootfs_mount = match &req.rootfs.tag {
            Some(tag) => {
                crate::fs::mount_share(&MountRequest {
                    tag: tag.clone(),
                    target: req.rootfs.path.clone(),
                    read_only: false,
                    dax: false,
                })?;
                Some(req.rootfs.path.clone())
            }
            None => None,
        };
        let undo_mount = |m: &Option<String>| {
            if let Some(path) = m {
                let _ = nix::mount::umount2(path.as_str(), nix::mount::MntFlags::MNT_DETACH);
            }
        };
        let joins = match open_joins(&plan.joins) {
            Ok(j) => j,
            Err(e) => {
                undo_mount(&rootfs_mount);
                return Err(e);
            }
        };
        trace::mark("parsed");
        let t_parsed = crate::init::boottime_ms();
        let cgroup = match Cgroup::create(&id, &plan.cgroup_writes) {
            Ok(c) => c,
            Err(e) => {
                undo_mount(&rootfs_mount);
                return Err(internal(crate::container::chain(&e)));
            }
        };
        trace::mark("cgroup");
        let t_cgroup = crate::init::boottime_ms();
        let spawned = spawn_init(&plan, joins, taken, &cgroup);
        if crate::init::debug() {
            crate::init::log_fmt(format_args!(
                "container {id}: parse+mount {} ms, cgroup {} ms, clone+set-up {} ms (at {} ms), seccomp {} instructions",
                t_parsed.saturating_sub(t0),
                t_cgroup.saturating_sub(t_parsed),
                crate::init::boottime_ms().saturating_sub(t_cgroup),
                crate::init::boottime_ms(),
                plan.process.seccomp.as_ref().map_or(0, |f| f.program().len())
            ));
        }
        let (init, pidfd, start, status) = match spawned {
            Ok(v) => v,
            Err(e) => {
                let _ = cgroup.remove();
                undo_mount(&rootfs_mount);
                return Err(e);
            }
        };
        // An exec enters the init's namespaces, joined ones included.
        let joined = plan.joins.iter().fold(0, |f, (t, _)| f | t);
        let mut join_flags = (plan.clone_flags as libc::c_int | joined) & !libc::CLONE_NEWPID;
        if plan.cgroup_ns {
            join_flags |= libc::CLONE_NEWCGROUP;
        }
        let c = Container {
            id,
            init,
            pidfd,
            join_flags,
            pid_ns: plan.clone_flags & libc::CLONE_NEWPID as u64 != 0
                || joined & libc::CLONE_NEWPID != 0,
            userns: plan.userns.is_some(),
            cgroup,
            rootfs_mount,
            seccomp: plan.process.seccomp.clone(),
            inner: Mutex::new(Inner {
                started: false,
                start: Some(start),
                status: Some(status),
                execs: HashMap::new(),
                paused: false,
            }),
        };
        trace::mark("created");
        let created = ContainerCreated {
            pid: c.init.pid,
            ignored: plan.ignored.clone(),
            elapsed_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        Ok((c, created))
    }

    /// `StartContainer`.
    pub fn start(&self, req: &ContainerRef) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        let mut inner = c.lock();
        match c.status(&inner) {
            ContainerStatus::Created => {}
            s => {
                return Err(reply(
                    ErrorCode::FailedPrecondition,
                    format!("container {} is {s:?}, not created: cannot start it", c.id)
                        .to_lowercase(),
                ))
            }
        }
        let (Some(start), Some(status)) = (inner.start.take(), inner.status.take()) else {
            return Err(internal("container has no start pipe"));
        };
        inner.started = true;
        let mut start = File::from(start);
        trace::mark("start");
        start
            .write_all(&[1])
            .map_err(|e| internal(format!("cannot start the container: {e}")))?;
        drop(start);
        let t_start = crate::init::boottime_ms();
        let mut status = File::from(status);
        let result = wait_exec(&mut status);
        if crate::init::debug() {
            let now = crate::init::boottime_ms();
            crate::init::log_fmt(format_args!(
                "container {}: exec took {} ms (at {now} ms)",
                c.id,
                now.saturating_sub(t_start)
            ));
        }
        match result {
            Ok(()) => Ok(()),
            Err(Some(r)) => Err(internal(format!(
                "container {}: {}",
                c.id,
                describe_exec(&r)
            ))),
            Err(None) => Err(internal(format!(
                "container {}: the process died before it could be executed",
                c.id
            ))),
        }
    }

    /// `ExecProcess`. On failure the streams attached for this exec are
    /// dropped too, so a failed exec leaves nothing waiting.
    pub fn exec(&self, req: ExecProcessRequest) -> Result<i32, ErrorReply> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let result = self.exec_inner(req);
        if result.is_err() {
            self.stdio.forget_process(&id, &exec_id);
        }
        result
    }

    fn exec_inner(&self, req: ExecProcessRequest) -> Result<i32, ErrorReply> {
        let c = self.get(&req.id)?;
        if !valid_id(&req.exec_id) {
            return Err(reply(
                ErrorCode::InvalidRequest,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let process = spec::parse_process(req.process).map_err(from_spec)?;
        let mut plan = spec::process_plan(&process).map_err(from_spec)?;
        plan.seccomp = c.seccomp.clone();
        let plan = Arc::new(plan);
        let mut inner = c.lock();
        if c.status(&inner) != ContainerStatus::Running {
            return Err(reply(
                ErrorCode::FailedPrecondition,
                format!("container {} is not running", c.id),
            ));
        }
        if inner.execs.contains_key(&req.exec_id) {
            return Err(reply(
                ErrorCode::AlreadyExists,
                format!(
                    "process {} already exists in container {}",
                    req.exec_id, c.id
                ),
            ));
        }
        let taken = self
            .stdio
            .take(&c.id, Some(&req.exec_id), req.stdio, plan.terminal)
            .map_err(|m| reply(ErrorCode::FailedPrecondition, m))?;
        let proc = spawn_exec(&c, &plan, taken)?;
        let pid = proc.pid;
        inner.execs.insert(req.exec_id, proc);
        Ok(pid)
    }

    /// `SignalProcess`.
    pub fn signal(&self, req: &SignalProcessRequest) -> Result<(), ErrorReply> {
        if !(1..=64).contains(&req.signal) {
            return Err(reply(
                ErrorCode::InvalidRequest,
                format!("invalid signal {}", req.signal),
            ));
        }
        let c = self.get(&req.id)?;
        let inner = c.lock();
        if req.all {
            return c
                .cgroup
                .signal_all(req.signal)
                .map_err(|e| internal(format!("cannot signal the container: {e}")));
        }
        match &req.exec_id {
            None => {
                if c.init.exit.get().is_some() {
                    return Err(reply(
                        ErrorCode::FailedPrecondition,
                        format!("container {} is stopped", c.id),
                    ));
                }
                // SAFETY: pidfd_send_signal on the pidfd we hold: no pid
                // reuse race.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        c.pidfd.as_raw_fd(),
                        req.signal,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if r != 0 {
                    return Err(internal(format!(
                        "cannot signal init: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            Some(e) => {
                let p = inner.execs.get(e).ok_or_else(|| {
                    reply(ErrorCode::NotFound, format!("process {e} does not exist"))
                })?;
                if p.exit.get().is_some() {
                    return Err(reply(
                        ErrorCode::FailedPrecondition,
                        format!("process {e} has exited"),
                    ));
                }
                // SAFETY: kill(2) with plain integers; the pid is not
                // reaped (no status yet), so it cannot have been reused.
                if unsafe { libc::kill(p.pid, req.signal) } != 0 {
                    return Err(internal(format!(
                        "cannot signal process {e}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
        }
        Ok(())
    }

    /// `WaitProcess`: blocks until the process has exited. An exec's entry
    /// is removed once its status has been delivered (its id is free
    /// again, its pty closed), so long-lived containers do not accumulate
    /// them.
    pub fn wait(&self, req: &ProcessRef) -> Result<ProcessExit, ErrorReply> {
        let c = self.get(&req.id)?;
        let cell = match &req.exec_id {
            None => c.init.exit.clone(),
            Some(e) => c
                .lock()
                .execs
                .get(e)
                .map(|p| p.exit.clone())
                .ok_or_else(|| reply(ErrorCode::NotFound, format!("process {e} does not exist")))?,
        };
        let raw = cell.wait();
        if let Some(e) = &req.exec_id {
            let mut inner = c.lock();
            if inner
                .execs
                .get(e)
                .is_some_and(|p| Arc::ptr_eq(&p.exit, &cell))
            {
                inner.execs.remove(e);
            }
        }
        Ok(c.exit_of(raw))
    }

    /// `State`.
    pub fn state(&self, req: &ContainerRef) -> Result<ContainerState, ErrorReply> {
        let c = self.get(&req.id)?;
        let inner = c.lock();
        Ok(ContainerState {
            id: c.id.clone(),
            status: c.status(&inner),
            pid: c.init.pid,
            exit: c.init.exit.get().map(|raw| c.exit_of(raw)),
        })
    }

    /// `ListProcesses`.
    pub fn processes(&self, req: &ContainerRef) -> Result<Vec<i32>, ErrorReply> {
        let c = self.get(&req.id)?;
        c.cgroup
            .pids()
            .map_err(|e| internal(format!("cannot list processes: {e}")))
    }

    /// `ResizeTerminal`.
    pub fn resize(&self, req: &ResizeTerminalRequest) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        let inner = c.lock();
        let pty = match &req.exec_id {
            None => c.init.pty.as_ref(),
            Some(e) => inner.execs.get(e).and_then(|p| p.pty.as_ref()),
        };
        let pty =
            pty.ok_or_else(|| reply(ErrorCode::FailedPrecondition, "the process has no terminal"))?;
        stdio::resize(pty, req.rows, req.cols).map_err(|e| internal(format!("resize: {e}")))
    }

    /// `DeleteContainer`.
    pub fn delete(&self, req: &DeleteContainerRequest) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        {
            let mut inner = c.lock();
            let status = c.status(&inner);
            if matches!(status, ContainerStatus::Running | ContainerStatus::Paused) && !req.force {
                return Err(reply(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "container {} is {}: stop it first or delete it with force",
                        c.id,
                        if status == ContainerStatus::Paused {
                            "paused"
                        } else {
                            "running"
                        }
                    ),
                ));
            }
            // A created init waiting for start exits when the pipe closes.
            inner.start = None;
            inner.status = None;
            if status != ContainerStatus::Stopped {
                let _ = c.cgroup.signal_all(libc::SIGKILL);
            }
            // SIGKILL ends frozen processes too; thaw anyway so that
            // nothing stays frozen should a kill have failed.
            if inner.paused {
                resources::thaw_after_kill(&c.cgroup);
                inner.paused = false;
            }
        }
        c.init.exit.wait();
        {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&c.id);
        }
        self.stdio.forget(&c.id);
        // Processes that outlived init (no pid namespace) go too.
        let _ = c.cgroup.signal_all(libc::SIGKILL);
        let mut errors = Vec::new();
        if let Err(e) = c.cgroup.remove() {
            errors.push(format!("cannot remove cgroup {}: {e}", c.cgroup.path));
        }
        if let Some(path) = &c.rootfs_mount {
            if let Err(e) = nix::mount::umount2(path.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                errors.push(format!("cannot unmount {path}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(internal(errors.join("; ")))
        }
    }
}

/// The message of an error report after exec.
fn describe_exec(r: &Report) -> String {
    match Step::from_u32(r.step) {
        Some(Step::Exec) => format!("exec failed: {}", errno_str(r.errno)),
        Some(Step::Seccomp) => format!("cannot load the seccomp filter: {}", errno_str(r.errno)),
        _ => format!("step {} failed: {}", r.step, errno_str(r.errno)),
    }
}

/// Error message with its causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut s = e.source();
    while let Some(c) = s {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        s = c.source();
    }
    msg
}

/// A pty pair: (master, slave).
type Pty = (OwnedFd, OwnedFd);

/// A socket pair for the child to send its container pty's master back:
/// (ours, the child's), close-on-exec.
fn pty_socket() -> Result<(OwnedFd, OwnedFd), ErrorReply> {
    let mut sv = [-1 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into a live array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(internal(format!(
            "cannot create a socket pair: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: two fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// The master the child sent on `sock` (its pty in the container's devpts),
/// if it sent one; the child has already run past that step.
fn received_master(sock: &OwnedFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut out = None;
    for c in msg.cmsgs().ok()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: a descriptor just received, owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                out.get_or_insert(fd);
            }
        }
    }
    out
}

/// Descriptors for fds 0..2 of a new process, and the pty if any.
fn stdio_fds(
    taken: &stdio::Taken,
    plan: &ProcessPlan,
) -> Result<([RawFd; 3], Option<Pty>), ErrorReply> {
    if plan.terminal {
        let (master, slave) = stdio::open_pty(plan.console_size)
            .map_err(|e| internal(format!("cannot open a pty: {e}")))?;
        let s = slave.as_raw_fd();
        return Ok(([s, s, s], Some((master, slave))));
    }
    let null = dev_null()?;
    let pick = |f: &Option<OwnedFd>| f.as_ref().map_or(null, |f| f.as_raw_fd());
    Ok((
        [
            pick(&taken.std[0]),
            pick(&taken.std[1]),
            pick(&taken.std[2]),
        ],
        None,
    ))
}

/// Creates a container's init; returns it with its pidfd, the start
/// pipe's write end and the status pipe's read end, once the init
/// reported ready.
fn spawn_init(
    plan: &Arc<InitPlan>,
    joins: Vec<(libc::c_int, OwnedFd)>,
    mut taken: stdio::Taken,
    cgroup: &Cgroup,
) -> Result<(Proc, OwnedFd, OwnedFd, OwnedFd), ErrorReply> {
    let reaper = Reaper::get().map_err(internal)?;
    let (status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let userns_sync = plan.userns.as_ref().map(|_| pipe()).transpose()?;
    let (std, pty) = stdio_fds(&taken, &plan.process)?;
    let pty_sock = pty.as_ref().map(|_| pty_socket()).transpose()?;
    let (sync_r, sync_w) = userns_sync.unzip();
    let (pty_master, pty_slave) = pty.unzip();
    let (pty_ours, pty_child) = pty_sock.unzip();
    let fds = ChildFds {
        stdio: std,
        tty: pty_slave.is_some(),
        status: status_w.as_raw_fd(),
        start: Some(start_r.as_raw_fd()),
        join: None,
        userns: plan.userns.is_some(),
        userns_sync: sync_r.as_ref().map(AsRawFd::as_raw_fd),
        pty_sock: pty_child.as_ref().map(AsRawFd::as_raw_fd),
        bounding: spawner::FULL_BOUNDING,
    };
    let term_conn = taken.terminal.take();
    // What the child reads or inherits stays with the holder thread, which
    // sleeps in clone3 until the child has executed the process (after
    // start) or exited, then drops it all and ends. The child shares the
    // agent's memory (see child::spawn_vfork): nothing of it is copied.
    let held = (status_w, start_r, sync_r, taken, pty_slave, pty_child);
    let ids = Arc::new(child::SpawnIds::default());
    let clone_error: Arc<Mutex<Option<String>>> = Arc::default();
    let cgroup_fd = cgroup.fd();
    // Held until the pid is watched: the reaper cannot reap the init
    // before (its status would be lost). Released before anything waits
    // for an exit.
    let mut watch = reaper.lock();
    let holder = {
        let (plan, ids, clone_error) = (plan.clone(), ids.clone(), clone_error.clone());
        move |bounding| {
            // A thread that joined namespaces is not reused.
            let reusable = joins.is_empty();
            let fds = ChildFds { bounding, ..fds };
            let result = enter(&joins).and_then(|()| {
                let ptrs = ExecPtrs::new(&plan.process);
                trace::mark("clone");
                // SAFETY: the child runs only `child::run_init`, which
                // neither allocates nor locks, writes only its stack, and
                // never returns; `plan`, `fds`, `ptrs` and the descriptors
                // of `held` live in this thread, which sleeps until the
                // child has executed the process or exited.
                unsafe {
                    child::spawn_vfork(plan.clone_flags, Some(cgroup_fd), &ids, &mut || {
                        child::run_init(&plan, &fds, &ptrs)
                    })
                }
                .map(drop)
                .map_err(|e| format!("cannot create the container process: {e}"))
            });
            if let Err(e) = result {
                *clone_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            }
            // The status pipe's last write end: the agent sees EOF after
            // a failure, or once the process runs.
            drop(held);
            reusable
        }
    };
    spawner::spawn(bounding_of(&plan.process), EXEC_THREAD_STACK, holder)
        .map_err(|e| internal(format!("cannot start a thread: {e}")))?;
    let mut status = File::from(status_r);
    // The first report (the init's STARTED, or EOF) comes after the clone,
    // when the pid is stored.
    let first = read_report(&mut status);
    let pid = ids.pid.load(Ordering::Acquire);
    if pid <= 0 {
        drop(watch);
        let why = clone_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        return Err(internal(why.unwrap_or_else(|| {
            "the container process was not created".to_string()
        })));
    }
    let exit = watch.watch(pid);
    drop(watch);
    // SAFETY: clone3 stored a new pidfd that nothing else owns (the holder
    // only wrote it).
    let pidfd = unsafe { OwnedFd::from_raw_fd(ids.pidfd.load(Ordering::Acquire)) };
    let report = match first {
        Ok(Some(r)) if r.kind == REPORT_STARTED => match (&plan.userns, sync_w) {
            (Some(ns), Some(sync_w)) => {
                match set_up_userns(pid, ns, &plan.process).and_then(|()| {
                    File::from(sync_w)
                        .write_all(&[1])
                        .map_err(|e| format!("cannot release the container process: {e}"))
                }) {
                    // Dropping the sync pipe unread made the child exit.
                    Err(e) => Err(internal(e)),
                    Ok(()) => read_report(&mut status),
                }
            }
            _ => read_report(&mut status),
        },
        other => other,
    };
    let failure = match report {
        Ok(Some(r)) if r.kind == REPORT_READY => None,
        Ok(Some(r)) if r.kind == REPORT_ERROR => Some(describe(&r, Some(plan), &plan.process)),
        Ok(Some(r)) => Some(format!("unexpected report {r:?}")),
        Ok(None) => Some("the container process died during set-up".into()),
        Err(e) => Some(e.message),
    };
    if let Some(message) = failure {
        // SAFETY: the pid is ours and not reaped yet (watched).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        exit.wait();
        return Err(internal(message));
    }
    let master = pty_master.map(|agent_master| {
        pty_ours
            .as_ref()
            .and_then(received_master)
            .unwrap_or(agent_master)
    });
    let pty = relay_terminal(master, term_conn)?;
    Ok((
        Proc { pid, exit, pty },
        pidfd,
        start_w,
        OwnedFd::from(status),
    ))
}

/// The bounding set `p` keeps (all when it sets no capabilities).
fn bounding_of(p: &ProcessPlan) -> u64 {
    p.caps
        .as_ref()
        .map_or(spawner::FULL_BOUNDING, |c| c.bounding)
}

/// Enters the namespaces a container joins (ipc, uts, network and cgroup
/// for the calling thread, pid for its children), so that the init cloned
/// next inherits them all before its mounts. Called on the init's holder
/// thread, which ends afterwards: the agent's other threads never are in
/// them.
fn enter(joins: &[(libc::c_int, OwnedFd)]) -> Result<(), String> {
    for (typ, fd) in joins {
        // SAFETY: setns on a namespace descriptor we hold, of the type we
        // checked; it changes this thread.
        if unsafe { libc::setns(fd.as_raw_fd(), *typ) } != 0 {
            return Err(format!(
                "cannot join the {} namespace: {}",
                ns_name(*typ),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// `NS_GET_NSTYPE` (linux/nsfs.h): the `CLONE_NEW*` type of a namespace
/// file.
const NS_GET_NSTYPE: u32 = 0xb703;

/// The spec's name of namespace type `typ`.
fn ns_name(typ: libc::c_int) -> &'static str {
    match typ {
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWNET => "network",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUSER => "user",
        _ => "unknown",
    }
}

/// Opens the namespaces a container joins (`linux.namespaces[].path`),
/// checking that each is a namespace of the type the spec says: two
/// system calls per path, and nothing is entered yet.
fn open_joins(
    joins: &[(libc::c_int, std::ffi::CString)],
) -> Result<Vec<(libc::c_int, OwnedFd)>, ErrorReply> {
    joins
        .iter()
        .map(|(typ, path)| {
            let fail = |why: String| {
                reply(
                    ErrorCode::InvalidRequest,
                    format!(
                        "cannot join the {} namespace at {}: {why}",
                        ns_name(*typ),
                        path.to_string_lossy()
                    ),
                )
            };
            // SAFETY: open(2) of a NUL-terminated path we own.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(fail(std::io::Error::last_os_error().to_string()));
            }
            // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an ioctl without argument on a descriptor we own.
            let got = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
            if got != *typ {
                return Err(fail(format!("not a {} namespace", ns_name(*typ))));
            }
            Ok((*typ, fd))
        })
        .collect()
}

/// The `net.*` sysctls of a network namespace the container shares with
/// the VM: the agent's own namespace, written here before the container's
/// process exists (a process in a user namespace could not write them).
fn write_vm_sysctls(plan: &InitPlan) -> Result<(), ErrorReply> {
    for (path, value) in &plan.vm_sysctls {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| internal(format!("cannot write sysctl {path}: {e}")))?;
    }
    Ok(())
}

/// What the agent does for an init in a new user namespace before letting
/// it go on: its id maps (only a process with the capabilities over the
/// guest's ids may write them), and the rlimits and oom_score_adj it could
/// no longer raise or lower itself in there.
fn set_up_userns(pid: libc::pid_t, ns: &spec::UserNs, p: &ProcessPlan) -> Result<(), String> {
    let write = |file: &str, value: &[u8]| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value))
            .map_err(|e| format!("cannot write {file} of the container process: {e}"))
    };
    write("uid_map", ns.uid_map.as_bytes())?;
    write("gid_map", ns.gid_map.as_bytes())?;
    if let Some(v) = &p.oom_score_adj {
        write("oom_score_adj", v.as_bytes())?;
    }
    for (resource, limit) in &p.rlimits {
        // SAFETY: prlimit64 on our (unreaped) child with a valid rlimit.
        let r = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                pid,
                *resource,
                limit as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        };
        if r != 0 {
            return Err(format!(
                "cannot set rlimit {resource} of the container process: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn relay_terminal(
    master: Option<OwnedFd>,
    conn: Option<OwnedFd>,
) -> Result<Option<OwnedFd>, ErrorReply> {
    match (master, conn) {
        (Some(m), Some(c)) => stdio::relay(m, c)
            .map(Some)
            .map_err(|e| internal(format!("cannot relay the terminal: {e}"))),
        (m, _) => Ok(m),
    }
}

/// Creates an exec's process in `c`'s namespaces and cgroup, and waits
/// until it has executed.
fn spawn_exec(
    c: &Container,
    plan: &Arc<ProcessPlan>,
    mut taken: stdio::Taken,
) -> Result<Proc, ErrorReply> {
    let reaper = Reaper::get().map_err(internal)?;
    let (status_r, status_w) = pipe()?;
    let (std, pty) = stdio_fds(&taken, plan)?;
    let pty_sock = pty.as_ref().map(|_| pty_socket()).transpose()?;
    let fds = ChildFds {
        stdio: std,
        tty: pty.is_some(),
        status: status_w.as_raw_fd(),
        start: None,
        join: Some((c.pidfd.as_raw_fd(), c.join_flags)),
        userns: c.userns,
        userns_sync: None,
        pty_sock: pty_sock.as_ref().map(|(_, c)| c.as_raw_fd()),
        bounding: spawner::FULL_BOUNDING,
    };
    let pidfd = c.pidfd.as_raw_fd();
    let pid_ns = c.pid_ns;
    let cgroup_fd = c.cgroup.fd();
    // A thread of its own enters the pid namespace (for its children
    // only) and ends: no other thread's children land in the container.
    // What the child uses stays open here until the thread has answered,
    // which is after the child executed the process or exited.
    let (tx, rx) = std::sync::mpsc::channel();
    let job = {
        let plan = plan.clone();
        move |bounding| {
            let fds = ChildFds { bounding, ..fds };
            let spawned = (|| -> Result<(libc::pid_t, RawFd, Arc<ExitCell>), String> {
                if pid_ns {
                    // SAFETY: setns on the pidfd the caller holds open;
                    // CLONE_NEWPID only changes where this thread's
                    // children are created.
                    if unsafe { libc::setns(pidfd, libc::CLONE_NEWPID) } != 0 {
                        return Err(format!(
                            "cannot enter the pid namespace: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                }
                let ptrs = ExecPtrs::new(&plan);
                // Held until the pid is watched: the reaper cannot reap
                // the process before (its status would be lost).
                let mut watch = reaper.lock();
                let ids = child::SpawnIds::default();
                // SAFETY: the child runs only `child::run_exec`, which
                // neither allocates nor locks, writes only its stack, and
                // never returns; `plan`, `fds` and `ptrs` live in this
                // thread, which sleeps until the child has executed the
                // process or exited.
                let (pid, child_pidfd) = unsafe {
                    child::spawn_vfork(0, Some(cgroup_fd), &ids, &mut || {
                        child::run_exec(&plan, &fds, &ptrs)
                    })
                }
                .map_err(|e| format!("cannot create the process: {e}"))?;
                Ok((pid, child_pidfd, watch.watch(pid)))
            })();
            let _ = tx.send(spawned);
            !pid_ns || spawner::restore_pid_ns()
        }
    };
    let spawned = spawner::spawn(bounding_of(plan), EXEC_THREAD_STACK, job)
        .map_err(|e| format!("cannot start a thread: {e}"))
        .and_then(|()| {
            rx.recv()
                .map_err(|_| "the exec thread ended without an answer".to_string())?
        });
    let (pid, child_pidfd, exit) = spawned.map_err(internal)?;
    // SAFETY: clone3 stored a new pidfd that nothing else owns; we only
    // need it closed.
    drop(unsafe { OwnedFd::from_raw_fd(child_pidfd) });
    drop(status_w);
    let term_conn = taken.terminal.take();
    drop(taken);
    let mut status = File::from(status_r);
    if let Err(r) = wait_exec(&mut status) {
        let raw = exit.wait();
        return Err(internal(match r {
            Some(r) => describe(&r, None, plan),
            None => format!("the process died before it could be executed (wait status {raw:#x})"),
        }));
    }
    let master = pty.map(|(agent_master, _slave)| {
        pty_sock
            .as_ref()
            .and_then(|(ours, _)| received_master(ours))
            .unwrap_or(agent_master)
    });
    let pty = relay_terminal(master, term_conn)?;
    Ok(Proc { pid, exit, pty })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_namespaces_are_checked() {
        let ipc = c"/proc/self/ns/ipc".to_owned();
        let fds = open_joins(&[(libc::CLONE_NEWIPC, ipc.clone())]).unwrap();
        assert_eq!(fds.len(), 1);
        for (typ, path, why) in [
            (libc::CLONE_NEWUTS, ipc, "not a uts namespace"),
            (
                libc::CLONE_NEWPID,
                c"/nonexistent/ns".to_owned(),
                "No such file",
            ),
            (
                libc::CLONE_NEWNET,
                c"/proc/self/status".to_owned(),
                "not a network namespace",
            ),
        ] {
            let e = open_joins(&[(typ, path)]).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains(why), "{}", e.message);
        }
    }

    #[test]
    fn reports_are_described() {
        let p = spec::process_plan(
            &spec::parse_process(
                serde_json::json!({"args": ["nosuch"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            )
            .unwrap(),
        )
        .unwrap();
        let r = Report {
            kind: REPORT_ERROR,
            step: Step::ExecLookup as u32,
            index: 0,
            errno: libc::ENOENT,
        };
        let m = describe(&r, None, &p);
        assert!(m.contains("\"nosuch\": executable file not found"), "{m}");
        let r = Report {
            step: Step::Cwd as u32,
            errno: libc::ENOENT,
            ..r
        };
        assert!(describe(&r, None, &p).starts_with("cannot chdir to cwd /: "));
    }

    #[test]
    fn unknown_containers_are_not_found() {
        let cs = Containers::default();
        let e = cs.state(&ContainerRef { id: "nope".into() }).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("nope"));
        let e = cs
            .create(CreateContainerRequest {
                id: "../x".into(),
                rootfs: vessel_proto::container::RootfsSource {
                    tag: None,
                    path: "/".into(),
                },
                spec: serde_json::json!({}),
                stdio: StdioSpec::default(),
            })
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        // A bad spec leaves nothing behind: the id is free again.
        let bad = || CreateContainerRequest {
            id: "c".into(),
            rootfs: vessel_proto::container::RootfsSource {
                tag: None,
                path: "/".into(),
            },
            spec: serde_json::json!({"process": {"args": [], "cwd": "/"}}),
            stdio: StdioSpec::default(),
        };
        assert_eq!(
            cs.create(bad()).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            cs.create(bad()).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert!(cs.map.lock().unwrap().is_empty());
    }
}

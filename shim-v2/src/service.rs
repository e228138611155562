//! The `containerd.task.v2.Task` service over [`Runtime`]: one container
//! per task, each a `vessel monitor` child of this daemon whose exit status
//! is the container's (so Wait is a `waitpid`); each exec a `vessel
//! exec-monitor` child likewise. A CRI pod's tasks share one shim: the
//! sandbox (pause) container's Create starts the pod's VM, and each later
//! container of the pod is created inside that VM (`CreateOptions::sandbox`). Events go to containerd in order through
//! one publisher thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status as TaskStatus, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{CodedOutputStream, MessageDyn, MessageField};
use containerd_shim_protos::shim::events::{Envelope, ForwardRequest};
use containerd_shim_protos::ttrpc::{self, Code, TtrpcContext};
use containerd_shim_protos::{topics, Client, EventsClient, Task};
use serde_json::Value;
use vessel_proto::resources::{ResourcesUpdate, Stats};
use vessel_shim::bundle::Bundle;
use vessel_shim::runtime::{error_chain, CreateOptions, Runtime, RuntimeError};
use vessel_shim::state::{StateError, Status};

use crate::{mount, stdio};

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// An exit: status and time.
#[derive(Clone, Debug)]
struct Exit {
    status: u32,
    at: Timestamp,
}

/// Where a process ended, shared by its reaper and Wait.
#[derive(Debug, Default)]
struct ExitCell {
    exit: Mutex<Option<Exit>>,
    cv: Condvar,
}

impl ExitCell {
    fn get(&self) -> Option<Exit> {
        lock(&self.exit).clone()
    }

    fn set(&self, e: Exit) {
        *lock(&self.exit) = Some(e);
        self.cv.notify_all();
    }

    fn wait(&self) -> Exit {
        let mut g = lock(&self.exit);
        loop {
            if let Some(e) = g.as_ref() {
                return e.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One process of a task: its init, or an exec.
struct Proc {
    paths: stdio::Paths,
    /// An exec's OCI process (the init's is the bundle's).
    spec: Option<Value>,
    /// The host pid that stands for it (its monitor); 0 until started.
    pid: u32,
    started: bool,
    exit: Arc<ExitCell>,
    io: Option<Arc<Mutex<stdio::Io>>>,
}

impl Proc {
    fn new(paths: stdio::Paths, spec: Option<Value>) -> Proc {
        Proc {
            paths,
            spec,
            pid: 0,
            started: false,
            exit: Arc::new(ExitCell::default()),
            io: None,
        }
    }

    fn status(&self, container: Option<Status>) -> TaskStatus {
        if self.exit.get().is_some() {
            return TaskStatus::STOPPED;
        }
        match container {
            None if self.started => TaskStatus::RUNNING,
            None => TaskStatus::CREATED,
            Some(Status::Stopped) => TaskStatus::STOPPED,
            Some(Status::Creating | Status::Created) => TaskStatus::CREATED,
            Some(Status::Running) => TaskStatus::RUNNING,
            Some(Status::Paused) => TaskStatus::PAUSED,
        }
    }
}

/// One task (container): its init and its execs.
struct TaskEntry {
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl TaskEntry {
    /// Process `exec_id` ("" = the init); the caller checked it exists
    /// (see `Service::with_proc`).
    fn proc(&self, exec_id: &str) -> &Proc {
        if exec_id.is_empty() {
            &self.init
        } else {
            &self.execs[exec_id]
        }
    }
}

/// The service's state, shared with the ttrpc server threads.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Runtime,
    namespace: String,
    socket: PathBuf,
    /// The inode of the socket file we listen on.
    socket_ino: u64,
    tasks: Mutex<HashMap<String, TaskEntry>>,
    events: Mutex<mpsc::Sender<(&'static str, Any)>>,
    consoles: AtomicU64,
    shutdown: (Mutex<bool>, Condvar),
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// containerd's error code for a runtime error.
fn rpc(e: RuntimeError) -> ttrpc::Error {
    let code = match &e {
        RuntimeError::State(StateError::NotFound) => Code::NOT_FOUND,
        RuntimeError::State(StateError::Exists(_)) => Code::ALREADY_EXISTS,
        RuntimeError::State(StateError::InvalidState(_)) => Code::FAILED_PRECONDITION,
        RuntimeError::State(StateError::InvalidId(_))
        | RuntimeError::Bundle(_)
        | RuntimeError::Invalid(_) => Code::INVALID_ARGUMENT,
        RuntimeError::NoSandbox(_) => Code::NOT_FOUND,
        _ => Code::INTERNAL,
    };
    status(code, error_chain(&e))
}

fn not_found(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("task {id} not found"))
}

fn exec_not_found(id: &str, exec_id: &str) -> ttrpc::Error {
    status(
        Code::NOT_FOUND,
        format!("exec {exec_id} of task {id} not found"),
    )
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INTERNAL, e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An event as containerd's envelope carries it.
fn any(event: &dyn MessageDyn) -> Option<Any> {
    let mut a = Any::new();
    a.type_url = event.descriptor_dyn().full_name().to_string();
    a.value = event.write_to_bytes_dyn().ok()?;
    Some(a)
}

/// Sends queued events to containerd (`$TTRPC_ADDRESS`) in order, over
/// one connection (made again after a failure); each is tried twice.
fn publisher(namespace: String, rx: mpsc::Receiver<(&'static str, Any)>) {
    let addr = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let mut client: Option<EventsClient> = None;
    for (topic, event) in rx {
        let mut env = Envelope::new();
        env.timestamp = MessageField::some(now());
        env.namespace = namespace.clone();
        env.topic = topic.to_string();
        env.event = MessageField::some(event);
        let mut req = ForwardRequest::new();
        req.envelope = MessageField::some(env);
        let mut last = String::new();
        for _ in 0..2 {
            if client.is_none() {
                match Client::connect(&format!("unix://{addr}")) {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                }
            }
            let Some(c) = &client else { continue };
            match c.forward(ttrpc::context::with_timeout(5_000_000_000), &req) {
                Ok(_) => {
                    last.clear();
                    break;
                }
                Err(e) => {
                    last = e.to_string();
                    client = None;
                }
            }
        }
        if !last.is_empty() {
            tracing::warn!("publishing {topic}: {last}");
        }
    }
}

/// The exit status of a monitor, as a shell reports it.
fn exit_code(r: std::io::Result<std::process::ExitStatus>, what: &str) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    match r {
        Ok(s) => s
            .code()
            .map(|c| c as u32)
            .or(s.signal().map(|n| 128 + n as u32))
            .unwrap_or(255),
        Err(e) => {
            tracing::warn!("{what}: waiting for the monitor: {e}");
            255
        }
    }
}

impl Service {
    /// A service for `namespace`'s tasks, listening on `socket`.
    pub fn new(rt: Runtime, namespace: String, socket: PathBuf, socket_ino: u64) -> Service {
        let (tx, rx) = mpsc::channel();
        let ns = namespace.clone();
        std::thread::spawn(move || publisher(ns, rx));
        Service {
            inner: Arc::new(Inner {
                rt,
                namespace,
                socket,
                socket_ino,
                tasks: Mutex::new(HashMap::new()),
                events: Mutex::new(tx),
                consoles: AtomicU64::new(0),
                shutdown: (Mutex::new(false), Condvar::new()),
            }),
        }
    }

    /// Removes our socket file, unless it is gone already and its path
    /// is another shim's now.
    pub fn remove_socket(&self) {
        use std::os::unix::fs::MetadataExt;
        let s = &self.inner.socket;
        if std::fs::symlink_metadata(s).is_ok_and(|m| m.ino() == self.inner.socket_ino) {
            let _ = std::fs::remove_file(s);
        }
    }

    /// Blocks until Shutdown.
    pub fn wait_shutdown(&self) {
        let (m, cv) = &self.inner.shutdown;
        let mut done = lock(m);
        while !*done {
            done = cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, TaskEntry>> {
        lock(&self.inner.tasks)
    }

    /// Queues `event` on `topic` for containerd.
    fn publish(&self, topic: &'static str, event: &dyn MessageDyn) {
        if let Some(a) = any(event) {
            let _ = lock(&self.inner.events).send((topic, a));
        }
    }

    /// A console socket path for a terminal process, next to the task
    /// socket (Unix socket paths are short).
    fn console_path(&self) -> PathBuf {
        let n = self.inner.consoles.fetch_add(1, Ordering::Relaxed);
        self.inner.socket.with_extension(format!("{n}.tty"))
    }

    /// The process `exec_id` ("" = init) of task `id`, through `f`.
    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut TaskEntry, &str) -> ttrpc::Result<T>,
    ) -> ttrpc::Result<T> {
        let mut tasks = self.tasks();
        let t = tasks.get_mut(id).ok_or_else(|| not_found(id))?;
        if !exec_id.is_empty() && !t.execs.contains_key(exec_id) {
            return Err(exec_not_found(id, exec_id));
        }
        f(t, exec_id)
    }

    /// Waits for a monitor in a thread: records the exit, ends the stdio
    /// relays, publishes TaskOOM (the init, when its cgroup's OOM killer
    /// ended it) and TaskExit.
    fn reap(
        &self,
        id: String,
        exec_id: String,
        mut child: Child,
        exit: Arc<ExitCell>,
        io: Arc<Mutex<stdio::Io>>,
    ) {
        let svc = self.clone();
        std::thread::spawn(move || {
            let code = exit_code(child.wait(), &id);
            let e = Exit {
                status: code,
                at: now(),
            };
            lock(&io).finish();
            if exec_id.is_empty() && svc.inner.rt.state(&id).is_ok_and(|s| s.oom_killed) {
                let mut ev = TaskOOM::new();
                ev.container_id = id.clone();
                svc.publish(topics::TASK_OOM_EVENT_TOPIC, &ev);
            }
            exit.set(e.clone());
            let mut ev = TaskExit::new();
            ev.container_id = id.clone();
            ev.id = if exec_id.is_empty() { id } else { exec_id };
            ev.pid = child.id();
            ev.exit_status = e.status;
            ev.exited_at = MessageField::some(e.at);
            svc.publish(topics::TASK_EXIT_EVENT_TOPIC, &ev);
        });
    }

    fn start_exec(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let (paths, spec) = self.with_proc(id, exec_id, |t, e| {
            let p = t.execs.get(e).ok_or_else(|| exec_not_found(id, e))?;
            if p.started {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {e} of task {id} was already started"),
                ));
            }
            Ok((p.paths.clone(), p.spec.clone().unwrap_or(Value::Null)))
        })?;
        let prepared =
            stdio::Prepared::new(&paths, &self.console_path(), exec_id, &self.inner.namespace)
                .map_err(internal)?;
        let child = self
            .inner
            .rt
            .exec_monitored(
                id,
                exec_id,
                &spec,
                prepared.console_socket.as_deref(),
                prepared.fds.as_deref(),
            )
            .map_err(rpc)?;
        let pid = child.id();
        let io = match prepared.started(exec_id) {
            Ok(io) => Arc::new(Mutex::new(io)),
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(internal(e));
            }
        };
        let exit = {
            let mut tasks = self.tasks();
            let p = tasks
                .get_mut(id)
                .and_then(|t| t.execs.get_mut(exec_id))
                .ok_or_else(|| exec_not_found(id, exec_id))?;
            p.pid = pid;
            p.started = true;
            p.io = Some(io.clone());
            p.exit.clone()
        };
        self.reap(id.into(), exec_id.into(), child, exit, io);
        let mut ev = TaskExecStarted::new();
        ev.container_id = id.into();
        ev.exec_id = exec_id.into();
        ev.pid = pid;
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, &ev);
        Ok(pid)
    }
}

/// CRI's annotations: what a container is, and its pod's sandbox id.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The sandbox whose VM a CRI pod's container is created in (its pod's
/// sandbox container, a task of this shim: `start` groups a pod's tasks
/// in one shim); `None` for a sandbox or a container outside a pod.
fn pod_sandbox(b: &Bundle) -> Option<String> {
    let a = &b.spec["annotations"];
    (a[CONTAINER_TYPE].as_str() == Some("container"))
        .then(|| a[SANDBOX_ID].as_str().map(str::to_string))
        .flatten()
}

/// A task's cgroup statistics as containerd's cgroup v2 `Metrics`
/// (`io.containerd.cgroups.v2.Metrics`; the protos crate only generates
/// the v1 message, so it is encoded here, field numbers from containerd's
/// `cgroup2/stats/metrics.proto`).
fn metrics_v2(st: &Stats, oom_kills: u64) -> Vec<u8> {
    fn message(fields: &[(u32, u64)]) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut buf);
            for &(n, v) in fields {
                if v != 0 {
                    let _ = os.write_uint64(n, v);
                }
            }
            let _ = os.flush();
        }
        buf
    }
    let m = &st.memory;
    let raw = |k: &str| m.raw.get(k).copied().unwrap_or(0);
    let pids = message(&[(1, st.pids.current), (2, st.pids.limit)]);
    let cpu = message(&[
        (1, st.cpu.usage.total / 1000),
        (2, st.cpu.usage.user / 1000),
        (3, st.cpu.usage.kernel / 1000),
        (4, st.cpu.throttling.periods),
        (5, st.cpu.throttling.throttled_periods),
        (6, st.cpu.throttling.throttled_time / 1000),
    ]);
    let mut mem: Vec<(u32, u64)> = [
        "anon",
        "file",
        "kernel_stack",
        "slab",
        "sock",
        "shmem",
        "file_mapped",
        "file_dirty",
        "file_writeback",
        "anon_thp",
        "inactive_anon",
        "active_anon",
        "inactive_file",
        "active_file",
        "unevictable",
        "slab_reclaimable",
        "slab_unreclaimable",
        "pgfault",
        "pgmajfault",
    ]
    .iter()
    .enumerate()
    .map(|(i, k)| (i as u32 + 1, raw(k)))
    .collect();
    let either = |a: &str, b: &str, c: &str| raw(a).max(raw(b).saturating_add(raw(c)));
    mem.extend([
        (
            20,
            either(
                "workingset_refault",
                "workingset_refault_anon",
                "workingset_refault_file",
            ),
        ),
        (
            21,
            either(
                "workingset_activate",
                "workingset_activate_anon",
                "workingset_activate_file",
            ),
        ),
        (22, raw("workingset_nodereclaim")),
        (23, raw("pgrefill")),
        (24, raw("pgscan")),
        (25, raw("pgsteal")),
        (26, raw("pgactivate")),
        (27, raw("pgdeactivate")),
        (28, raw("pglazyfree")),
        (29, raw("pglazyfreed")),
        (30, raw("thp_fault_alloc")),
        (31, raw("thp_collapse_alloc")),
        (32, m.usage.usage),
        (33, m.usage.limit),
        (34, m.swap.usage.saturating_sub(m.usage.usage)),
        (36, m.usage.max),
    ]);
    let memory = message(&mem);
    let events = message(&[(3, m.usage.failcnt), (5, oom_kills)]);
    let mut buf = Vec::new();
    {
        let mut os = CodedOutputStream::vec(&mut buf);
        for (n, b) in [(1, &pids), (2, &cpu), (4, &memory), (8, &events)] {
            let _ = os.write_bytes(n, b);
        }
        let _ = os.flush();
    }
    buf
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(status(Code::UNIMPLEMENTED, "checkpoints are not supported"));
        }
        if self.tasks().contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {} already exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let rootfs_mounted = !req.rootfs.is_empty();
        if rootfs_mounted {
            mount::mount_all(&req.rootfs, &bundle.join("rootfs")).map_err(|e| {
                // What was mounted before the failing one comes off again.
                mount::unmount_rootfs(&bundle);
                internal(e)
            })?;
        }
        let paths = stdio::Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = (|| {
            let b = Bundle::load(&bundle).map_err(|e| rpc(e.into()))?;
            let prepared =
                stdio::Prepared::new(&paths, &self.console_path(), &req.id, &self.inner.namespace)
                    .map_err(internal)?;
            let o = CreateOptions {
                stdio: prepared.fds.clone(),
                console_socket: prepared.console_socket.clone(),
                sandbox: pod_sandbox(&b),
                ..CreateOptions::default()
            };
            let mut child = self.inner.rt.create(&req.id, &b, &o).map_err(rpc)?;
            match prepared.started(&req.id) {
                Ok(io) => Ok((child, io)),
                Err(e) => {
                    let _ = self.inner.rt.delete(&req.id, true);
                    let _ = child.wait();
                    Err(internal(e))
                }
            }
        })();
        let (child, io) = match created {
            Ok(c) => c,
            Err(e) => {
                if rootfs_mounted {
                    mount::unmount_rootfs(&bundle);
                }
                return Err(e);
            }
        };
        let pid = child.id();
        let io = Arc::new(Mutex::new(io));
        let mut init = Proc::new(paths, None);
        init.pid = pid;
        init.started = true;
        init.io = Some(io.clone());
        let exit = init.exit.clone();
        self.tasks().insert(
            req.id.clone(),
            TaskEntry {
                bundle: bundle.clone(),
                rootfs_mounted,
                init,
                execs: HashMap::new(),
            },
        );
        self.reap(req.id.clone(), String::new(), child, exit, io);
        let mut ev = TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut tio = TaskIO::new();
        tio.stdin = req.stdin.clone();
        tio.stdout = req.stdout.clone();
        tio.stderr = req.stderr.clone();
        tio.terminal = req.terminal;
        ev.io = MessageField::some(tio);
        ev.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, &ev);
        let mut r = CreateTaskResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pid = if req.exec_id.is_empty() {
            let pid = self.with_proc(&req.id, "", |t, _| Ok(t.init.pid))?;
            self.inner.rt.start(&req.id).map_err(rpc)?;
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            self.publish(topics::TASK_START_EVENT_TOPIC, &ev);
            pid
        } else {
            self.start_exec(&req.id, &req.exec_id)?
        };
        let mut r = StartResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let exit = self.with_proc(&req.id, &req.exec_id, |t, e| Ok(t.proc(e).exit.clone()))?;
        let e = exit.wait();
        let mut r = WaitResponse::new();
        r.exit_status = e.status;
        r.exited_at = MessageField::some(e.at);
        Ok(r)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("bad signal {}", req.signal)))?;
        let (exited, started) = self.with_proc(&req.id, &req.exec_id, |t, e| {
            let p = t.proc(e);
            Ok((p.exit.get().is_some(), p.started))
        })?;
        if exited {
            // The runc shim's answer: containerd treats it as "gone".
            return Err(status(Code::NOT_FOUND, "process already finished"));
        }
        if !started {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("exec {} of task {} is not started", req.exec_id, req.id),
            ));
        }
        if req.exec_id.is_empty() {
            self.inner.rt.kill(&req.id, signal, req.all).map_err(rpc)?;
        } else {
            self.inner
                .rt
                .signal(&req.id, Some(&req.exec_id), signal, false)
                .map_err(rpc)?;
        }
        Ok(Empty::new())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        if !req.exec_id.is_empty() {
            let p = self.with_proc(&req.id, &req.exec_id, |t, e| {
                let p = &t.execs[e];
                if p.started && p.exit.get().is_none() {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {e} of task {} is still running", req.id),
                    ));
                }
                Ok(t.execs.remove(e))
            })?;
            let mut r = DeleteResponse::new();
            if let Some(p) = p {
                let e = p.exit.get().unwrap_or(Exit {
                    status: 0,
                    at: now(),
                });
                r.pid = p.pid;
                r.exit_status = e.status;
                r.exited_at = MessageField::some(e.at);
            }
            return Ok(r);
        }
        let (exit, pid) =
            self.with_proc(&req.id, "", |t, _| Ok((t.init.exit.get(), t.init.pid)))?;
        // A created task (never started) may be deleted; a running one not.
        let st = self.inner.rt.state(&req.id).map_err(rpc)?;
        if exit.is_none() && st.status != Status::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {} is still running", req.id),
            ));
        }
        self.inner.rt.delete(&req.id, true).map_err(rpc)?;
        let t = self.tasks().remove(&req.id);
        // A created task's monitor was killed by the forced delete: its
        // reaper records the exit.
        let exit = match (exit, t.as_ref()) {
            (Some(e), _) => e,
            (None, Some(t)) => t.init.exit.wait(),
            (None, None) => Exit {
                status: 137,
                at: now(),
            },
        };
        if let Some(t) = t.filter(|t| t.rootfs_mounted) {
            mount::unmount_rootfs(&t.bundle);
        }
        let mut ev = TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.id = req.id.clone();
        ev.pid = pid;
        ev.exit_status = exit.status;
        ev.exited_at = MessageField::some(exit.at.clone());
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, &ev);
        let mut r = DeleteResponse::new();
        r.pid = pid;
        r.exit_status = exit.status;
        r.exited_at = MessageField::some(exit.at);
        Ok(r)
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let container = if req.exec_id.is_empty() {
            Some(self.inner.rt.state(&req.id).map_err(rpc)?.status)
        } else {
            None
        };
        self.with_proc(&req.id, &req.exec_id, |t, e| {
            let p = t.proc(e);
            let mut r = StateResponse::new();
            r.id = if e.is_empty() {
                req.id.clone()
            } else {
                e.to_string()
            };
            r.exec_id = e.to_string();
            r.bundle = t.bundle.display().to_string();
            r.pid = p.pid;
            r.stdin = p.paths.stdin.clone();
            r.stdout = p.paths.stdout.clone();
            r.stderr = p.paths.stderr.clone();
            r.terminal = p.paths.terminal;
            r.status = p.status(container).into();
            if let Some(x) = p.exit.get() {
                r.exit_status = x.status;
                r.exited_at = MessageField::some(x.at);
            }
            Ok(r)
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        vessel_shim::state::validate_id(&req.exec_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec: Value = req
            .spec
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?
            .filter(Value::is_object)
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec needs an OCI process spec"))?;
        let mut spec = spec;
        spec["terminal"] = Value::Bool(req.terminal);
        self.with_proc(&req.id, "", |t, _| {
            if t.init.exit.get().is_some() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("task {} is stopped", req.id),
                ));
            }
            if t.execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} of task {} already exists", req.exec_id, req.id),
                ));
            }
            let paths = stdio::Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            t.execs
                .insert(req.exec_id.clone(), Proc::new(paths, Some(spec)));
            Ok(())
        })?;
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, &ev);
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let io = self.with_proc(&req.id, &req.exec_id, |t, e| {
            let p = t.proc(e);
            p.io.clone()
                .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the process is not started"))
        })?;
        let (rows, cols) = (
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        );
        lock(&io)
            .resize(rows, cols)
            .map_err(|e| status(Code::FAILED_PRECONDITION, format!("resizing the pty: {e}")))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let io = self.with_proc(&req.id, &req.exec_id, |t, e| {
            let p = t.proc(e);
            Ok(p.io.clone())
        })?;
        if let Some(io) = io.filter(|_| req.stdin) {
            lock(&io).close_stdin();
        }
        Ok(Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.with_proc(&req.id, "", |_, _| Ok(()))?;
        let (pids, _) = self.inner.rt.pids(&req.id).map_err(rpc)?;
        let mut r = PidsResponse::new();
        for pid in pids {
            let mut p = ProcessInfo::new();
            p.pid = u32::try_from(pid).unwrap_or(0);
            r.processes.push(p);
        }
        Ok(r)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.with_proc(&req.id, "", |_, _| Ok(()))?;
        self.inner.rt.pause(&req.id).map_err(rpc)?;
        let mut ev = TaskPaused::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, &ev);
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.with_proc(&req.id, "", |_, _| Ok(()))?;
        self.inner.rt.resume(&req.id).map_err(rpc)?;
        let mut ev = TaskResumed::new();
        ev.container_id = req.id.clone();
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, &ev);
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.with_proc(&req.id, "", |_, _| Ok(()))?;
        let resources: ResourcesUpdate = req
            .resources
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("resources: {e}")))?
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update needs resources"))?;
        self.inner.rt.update(&req.id, resources).map_err(rpc)?;
        Ok(Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.with_proc(&req.id, "", |_, _| Ok(()))?;
        let mut c = self.inner.rt.inspect(&req.id).map_err(rpc)?;
        let (st, oom) = self.inner.rt.stats(&mut c, &req.id).map_err(rpc)?;
        let mut a = Any::new();
        a.type_url = "io.containerd.cgroups.v2.Metrics".into();
        a.value = metrics_v2(&st, oom);
        let mut r = StatsResponse::new();
        r.stats = MessageField::some(a);
        Ok(r)
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoints are not supported by vessel",
        ))
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = self.tasks().get(&req.id).map(|t| t.init.pid).unwrap_or(0);
        r.version = env!("CARGO_PKG_VERSION").into();
        Ok(r)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if !self.tasks().is_empty() {
            return Ok(Empty::new());
        }
        self.remove_socket();
        let svc = self.clone();
        // Reply first, then stop serving.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let (m, cv) = &svc.inner.shutdown;
            *lock(m) = true;
            cv.notify_all();
        });
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedInputStream;

    /// Field number → varint of one encoded message (nested messages as
    /// their bytes' length).
    fn fields(b: &[u8]) -> HashMap<u32, (u64, Vec<u8>)> {
        let mut out = HashMap::new();
        let mut is = CodedInputStream::from_bytes(b);
        while !is.eof().unwrap() {
            let tag = is.read_raw_varint32().unwrap();
            let (n, wire) = (tag >> 3, tag & 7);
            if wire == 0 {
                out.insert(n, (is.read_raw_varint64().unwrap(), Vec::new()));
            } else {
                let v = is.read_bytes().unwrap();
                out.insert(n, (0, v));
            }
        }
        out
    }

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let mut st = Stats::default();
        st.pids.current = 3;
        st.pids.limit = 100;
        st.cpu.usage.total = 5_000_000;
        st.cpu.usage.user = 3_000_000;
        st.memory.usage.usage = 4096;
        st.memory.usage.limit = 1 << 20;
        st.memory.swap.usage = 4096 + 512;
        st.memory.raw.insert("anon".into(), 1024);
        st.memory.raw.insert("pgfault".into(), 77);
        st.memory.raw.insert("workingset_refault_anon".into(), 2);
        st.memory.raw.insert("workingset_refault_file".into(), 5);
        let m = fields(&metrics_v2(&st, 2));
        let pids = fields(&m[&1].1);
        assert_eq!((pids[&1].0, pids[&2].0), (3, 100));
        let cpu = fields(&m[&2].1);
        assert_eq!((cpu[&1].0, cpu[&2].0), (5000, 3000));
        let mem = fields(&m[&4].1);
        assert_eq!(mem[&1].0, 1024);
        assert_eq!(mem[&18].0, 77);
        assert_eq!(mem[&20].0, 7);
        assert_eq!((mem[&32].0, mem[&33].0, mem[&34].0), (4096, 1 << 20, 512));
        assert!(!mem.contains_key(&2), "zero fields are left out");
        let ev = fields(&m[&8].1);
        assert_eq!(ev[&5].0, 2);
    }
}

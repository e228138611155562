//! The `containerd.task.v2.Task` service over [`Runtime`]: one container
//! per task, each a `vessel monitor` child of this daemon whose exit status
//! is the container's (so Wait is a `waitpid`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::{
    ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, KillRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, Status as TaskStatus, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim::events::{Envelope, ForwardRequest};
use containerd_shim_protos::ttrpc::{self, Code, TtrpcContext};
use containerd_shim_protos::{Client, EventsClient, Task};
use vessel_shim::bundle::Bundle;
use vessel_shim::runtime::{error_chain, CreateOptions, Runtime, RuntimeError};
use vessel_shim::state::{StateError, Status};

use crate::mount;

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

/// One task (container).
#[derive(Debug)]
struct TaskEntry {
    bundle: PathBuf,
    pid: u32,
    stdin: String,
    stdout: String,
    stderr: String,
    rootfs_mounted: bool,
    exit: Arc<(Mutex<Option<Exit>>, Condvar)>,
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
    tasks: Mutex<HashMap<String, TaskEntry>>,
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
        _ => Code::INTERNAL,
    };
    status(code, error_chain(&e))
}

fn not_found(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("task {id} not found"))
}

fn no_exec() -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, "exec processes are not supported yet")
}

/// Opens a stdio FIFO containerd created (its reader or writer is already
/// open or opens soon; O_RDWR never blocks on a FIFO). `/dev/null` when
/// containerd passes none.
fn open_stdio(path: &str) -> std::io::Result<OwnedFd> {
    let f: File = if path.is_empty() {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
    } else {
        OpenOptions::new().read(true).write(true).open(path)?
    };
    Ok(f.into())
}

impl Service {
    /// A service for `namespace`'s tasks, listening on `socket`.
    pub fn new(rt: Runtime, namespace: String, socket: PathBuf) -> Service {
        Service {
            inner: Arc::new(Inner {
                rt,
                namespace,
                socket,
                tasks: Mutex::new(HashMap::new()),
                shutdown: (Mutex::new(false), Condvar::new()),
            }),
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

    /// Publishes `event` on `topic` to containerd (`$TTRPC_ADDRESS`);
    /// failures are logged.
    fn publish(&self, topic: &str, event: &dyn containerd_shim_protos::protobuf::MessageDyn) {
        let r = (|| -> Result<(), String> {
            let addr = std::env::var("TTRPC_ADDRESS").map_err(|e| e.to_string())?;
            let client = Client::connect(&format!("unix://{addr}")).map_err(|e| e.to_string())?;
            let client = EventsClient::new(client);
            let mut any = Any::new();
            any.type_url = event.descriptor_dyn().full_name().to_string();
            any.value = event.write_to_bytes_dyn().map_err(|e| e.to_string())?;
            let mut env = Envelope::new();
            env.timestamp = MessageField::some(now());
            env.namespace = self.inner.namespace.clone();
            env.topic = topic.to_string();
            env.event = MessageField::some(any);
            let mut req = ForwardRequest::new();
            req.envelope = MessageField::some(env);
            client
                .forward(ttrpc::context::with_timeout(5_000_000_000), &req)
                .map_err(|e| e.to_string())?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    /// Waits for the monitor in a thread, records the exit and publishes
    /// TaskExit.
    fn reap(&self, id: String, mut child: Child, exit: Arc<(Mutex<Option<Exit>>, Condvar)>) {
        let svc = self.clone();
        std::thread::spawn(move || {
            let code = match child.wait() {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    s.code()
                        .map(|c| c as u32)
                        .or(s.signal().map(|n| 128 + n as u32))
                        .unwrap_or(255)
                }
                Err(e) => {
                    tracing::warn!("{id}: waiting for the monitor: {e}");
                    255
                }
            };
            let e = Exit {
                status: code,
                at: now(),
            };
            {
                let (m, cv) = &*exit;
                *lock(m) = Some(e.clone());
                cv.notify_all();
            }
            let mut ev = TaskExit::new();
            ev.container_id = id.clone();
            ev.id = id;
            ev.pid = child.id();
            ev.exit_status = e.status;
            ev.exited_at = MessageField::some(e.at);
            svc.publish(containerd_shim_protos::topics::TASK_EXIT_EVENT_TOPIC, &ev);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if req.terminal {
            return Err(status(
                Code::UNIMPLEMENTED,
                "terminal tasks are not supported yet",
            ));
        }
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
                status(Code::INTERNAL, e.to_string())
            })?;
        }
        let created = (|| {
            let b = Bundle::load(&bundle).map_err(|e| rpc(e.into()))?;
            let fds = [
                open_stdio(&req.stdin),
                open_stdio(&req.stdout),
                open_stdio(&req.stderr),
            ];
            let [i, o, e] = fds;
            let open = |r: std::io::Result<OwnedFd>| {
                r.map_err(|e| status(Code::INTERNAL, format!("opening a stdio FIFO: {e}")))
            };
            let o = CreateOptions {
                stdio: Some(Arc::new([open(i)?, open(o)?, open(e)?])),
                ..CreateOptions::default()
            };
            self.inner.rt.create(&req.id, &b, &o).map_err(rpc)
        })();
        let child = match created {
            Ok(c) => c,
            Err(e) => {
                if rootfs_mounted {
                    mount::unmount_rootfs(&bundle);
                }
                return Err(e);
            }
        };
        let pid = child.id();
        let exit = Arc::new((Mutex::new(None), Condvar::new()));
        self.tasks().insert(
            req.id.clone(),
            TaskEntry {
                bundle,
                pid,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                rootfs_mounted,
                exit: exit.clone(),
            },
        );
        self.reap(req.id.clone(), child, exit);
        let mut r = CreateTaskResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let pid = self
            .tasks()
            .get(&req.id)
            .map(|t| t.pid)
            .ok_or_else(|| not_found(&req.id))?;
        self.inner.rt.start(&req.id).map_err(rpc)?;
        let mut r = StartResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let exit = self
            .tasks()
            .get(&req.id)
            .map(|t| t.exit.clone())
            .ok_or_else(|| not_found(&req.id))?;
        let (m, cv) = &*exit;
        let mut g = lock(m);
        let e = loop {
            if let Some(e) = g.as_ref() {
                break e.clone();
            }
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        };
        let mut r = WaitResponse::new();
        r.exit_status = e.status;
        r.exited_at = MessageField::some(e.at);
        Ok(r)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        if !self.tasks().contains_key(&req.id) {
            return Err(not_found(&req.id));
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(Code::INVALID_ARGUMENT, "signal out of range"))?;
        self.inner.rt.kill(&req.id, signal, req.all).map_err(rpc)?;
        Ok(Empty::new())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let (exit, pid) = {
            let tasks = self.tasks();
            let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            let exit = lock(&t.exit.0).clone();
            (exit, t.pid)
        };
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
        let exit = match (exit, t.as_ref()) {
            (Some(e), _) => e,
            (None, Some(t)) => {
                // The monitor was killed by the forced delete: wait for it.
                let (m, cv) = &*t.exit;
                let mut g = lock(m);
                while g.is_none() {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                g.clone().unwrap_or(Exit {
                    status: 137,
                    at: now(),
                })
            }
            (None, None) => Exit {
                status: 137,
                at: now(),
            },
        };
        if let Some(t) = t.filter(|t| t.rootfs_mounted) {
            mount::unmount_rootfs(&t.bundle);
        }
        let mut r = DeleteResponse::new();
        r.pid = pid;
        r.exit_status = exit.status;
        r.exited_at = MessageField::some(exit.at);
        Ok(r)
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let tasks = self.tasks();
        let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let exit = lock(&t.exit.0).clone();
        let st = self.inner.rt.state(&req.id).map_err(rpc)?;
        let mut r = StateResponse::new();
        r.id = req.id.clone();
        r.bundle = t.bundle.display().to_string();
        r.pid = t.pid;
        r.stdin = t.stdin.clone();
        r.stdout = t.stdout.clone();
        r.stderr = t.stderr.clone();
        let s = match (&exit, st.status) {
            (Some(_), _) | (_, Status::Stopped) => TaskStatus::STOPPED,
            (_, Status::Creating | Status::Created) => TaskStatus::CREATED,
            (_, Status::Running) => TaskStatus::RUNNING,
            (_, Status::Paused) => TaskStatus::PAUSED,
        };
        r.status = s.into();
        if let Some(e) = exit {
            r.exit_status = e.status;
            r.exited_at = MessageField::some(e.at);
        }
        Ok(r)
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = self.tasks().get(&req.id).map(|t| t.pid).unwrap_or(0);
        Ok(r)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if !self.tasks().is_empty() {
            return Ok(Empty::new());
        }
        let _ = std::fs::remove_file(&self.inner.socket);
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

//! `containerd-shim-vessel-v2`: containerd's shim v2 (runtime
//! `io.containerd.vessel.v2`) over vessel's runtime library.
//!
//! containerd runs the binary three ways (with the bundle as working
//! directory and `-namespace NS -address A -publish-binary P -id ID`):
//!
//! - `start`: binds the task socket, spawns the daemon (this binary again,
//!   `serve`, in a session of its own, inheriting the listener), prints the
//!   socket address and exits;
//! - the daemon serves containerd's `containerd.task.v2.Task` service over
//!   ttrpc on that socket (see [`service`]) and publishes events to
//!   `$TTRPC_ADDRESS`;
//! - `delete`: cleans up after a shim that died, and prints a
//!   `DeleteResponse`.
//!
//! First slice: one container per task and per shim (no pod grouping), no
//! exec, no terminal. The lifecycle is the library's: each task is one
//! `vessel monitor` (the `vessel` binary next to this one), whose exit
//! status is the container's.

mod mount;
mod service;
mod stdio;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use sha2::{Digest, Sha256};
use vessel_shim::config::Config;
use vessel_shim::runtime::{Launcher, Runtime};
use vessel_shim::state::Store;

/// Where task sockets are made (short: Unix socket paths are limited).
const SOCKET_DIR: &str = "/run/vessel-shim";
/// The runtime's state root for containerd namespace NS: `STATE_ROOT/NS`.
/// `$VESSEL_SHIM_ROOT` overrides it (tests).
const STATE_ROOT: &str = "/run/vessel-shim/state";

/// Errors of the shim's own commands.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// Bad command line.
    #[error("usage: {0}")]
    Usage(String),
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime library failed.
    #[error(transparent)]
    Runtime(#[from] vessel_shim::runtime::RuntimeError),
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] vessel_shim::config::ConfigError),
    /// ttrpc failed.
    #[error("ttrpc: {0}")]
    Ttrpc(#[from] containerd_shim_protos::ttrpc::Error),
    /// protobuf encoding failed.
    #[error("protobuf: {0}")]
    Protobuf(#[from] containerd_shim_protos::protobuf::Error),
}

/// Adds what was being done to an I/O error.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

/// containerd's flags (Go `flag` syntax: `-name value`, `-debug`).
#[derive(Debug, Default)]
pub struct Flags {
    /// containerd namespace.
    pub namespace: String,
    /// containerd's gRPC address.
    pub address: String,
    /// Task (container) id.
    pub id: String,
    /// `-bundle` (delete), else the working directory.
    pub bundle: Option<PathBuf>,
    /// `-debug`.
    pub debug: bool,
    /// `start`, `delete` or `serve` (ours).
    pub action: String,
    /// `serve`'s socket path.
    pub socket: Option<PathBuf>,
}

impl Flags {
    fn parse(args: &[OsString]) -> Result<Flags, ShimError> {
        let mut f = Flags::default();
        let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
        while let Some(a) = it.next() {
            let name = a.trim_start_matches('-');
            if a.starts_with('-') {
                let (name, inline) = match name.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (name, None),
                };
                if name == "debug" || name == "v" {
                    f.debug = true;
                    continue;
                }
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| ShimError::Usage(format!("-{name} needs a value")))?,
                };
                match name {
                    "namespace" => f.namespace = value,
                    "address" => f.address = value,
                    "id" => f.id = value,
                    "bundle" => f.bundle = Some(value.into()),
                    "socket" => f.socket = Some(value.into()),
                    // -publish-binary: events go over $TTRPC_ADDRESS instead.
                    _ => {}
                }
            } else {
                f.action = a;
            }
        }
        if f.action.is_empty() {
            return Err(ShimError::Usage(
                "containerd-shim-vessel-v2 -namespace NS -address A -id ID start|delete".into(),
            ));
        }
        Ok(f)
    }

    /// The bundle: `-bundle`, else the working directory (containerd runs
    /// the shim there).
    fn bundle(&self) -> Result<PathBuf, ShimError> {
        match &self.bundle {
            Some(b) => Ok(b.clone()),
            None => std::env::current_dir().map_err(io("finding the bundle (working directory)")),
        }
    }
}

/// The runtime over this namespace's state root, starting monitors with
/// the `vessel` binary next to this one (`$VESSEL_BINARY` overrides it).
pub fn runtime(namespace: &str) -> Result<Runtime, ShimError> {
    let cfg = Config::load(None)?;
    let root = state_root(namespace);
    let exe = match std::env::var_os("VESSEL_BINARY") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(io("finding this binary"))?
            .with_file_name("vessel"),
    };
    let store = Store::with_run_dir(&root, &cfg.run_dir);
    Ok(Runtime {
        store,
        cfg,
        launcher: Launcher {
            exe,
            globals: vec!["--root".into(), root.into()],
        },
        systemd_cgroup: false,
    })
}

/// The runtime's `--root` for containerd namespace `namespace`.
fn state_root(namespace: &str) -> PathBuf {
    std::env::var_os("VESSEL_SHIM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(STATE_ROOT))
        .join(namespace)
}

/// The annotation CRI puts on every container of a pod (the sandbox's
/// own included): the pod's sandbox id.
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The id a task's shim is shared by: its pod's sandbox id when CRI
/// created it (so one shim serves the whole pod, as containerd's runc
/// shim groups them), else its own.
fn group_id(f: &Flags, bundle: &Path) -> String {
    let spec = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    spec.as_ref()
        .and_then(|s| s["annotations"][SANDBOX_ID_ANNOTATION].as_str())
        .filter(|g| vessel_shim::state::validate_id(g).is_ok())
        .map_or_else(|| f.id.clone(), str::to_string)
}

/// The task socket of (containerd address, namespace, group id), as the
/// Go shims derive theirs.
fn socket_path(f: &Flags, group: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(format!("{}/{}/{}", f.address, f.namespace, group));
    let hex: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Path::new(SOCKET_DIR).join(format!("{hex}.sock"))
}

/// `start`: binds the socket, spawns the daemon with it, prints the
/// address.
fn start(f: &Flags, args: &[OsString]) -> Result<(), ShimError> {
    let bundle = f.bundle()?;
    let sock = socket_path(f, &group_id(f, &bundle));
    std::fs::create_dir_all(SOCKET_DIR).map_err(io(format!("creating {SOCKET_DIR}")))?;
    if UnixStream::connect(&sock).is_ok() {
        // The pod's shim runs: containerd talks to it for this task too.
        return print_address(&sock);
    }
    // A stale socket of a dead shim (containerd retries `start`).
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io(format!("binding {}", sock.display())))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle.join("shim.log"))
        .map_err(io("opening the shim log"))?;
    let exe = std::env::current_exe().map_err(io("finding this binary"))?;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(exe);
    for a in args.iter().filter(|a| a.to_str() != Some("start")) {
        cmd.arg(a);
    }
    cmd.arg("-socket")
        .arg(&sock)
        .arg("serve")
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: runs in the child between fork and exec; setsid(2) and
    // fcntl(2) are async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The daemon inherits the listener under the same number.
    cmd.env("VESSEL_SHIM_LISTEN_FD", fd.to_string());
    cmd.spawn().map_err(io("starting the shim daemon"))?;
    print_address(&sock)
}

/// Tells containerd where the shim listens.
fn print_address(sock: &Path) -> Result<(), ShimError> {
    let mut out = std::io::stdout().lock();
    write!(out, "unix://{}", sock.display())
        .and_then(|()| out.flush())
        .map_err(io("writing the address"))
}

/// `delete`: what is left of a task whose shim died: the container (its
/// VM, monitor, state), the rootfs mount, the socket.
fn delete(f: &Flags) -> Result<(), ShimError> {
    let bundle = f.bundle()?;
    let rt = runtime(&f.namespace)?;
    if let Err(e) = rt.delete(&f.id, true) {
        tracing::warn!("{}: {e}", f.id);
    }
    mount::unmount_rootfs(&bundle);
    let sock = socket_path(f, &group_id(f, &bundle));
    if UnixStream::connect(&sock).is_err() {
        let _ = std::fs::remove_file(sock);
    }
    let _ = std::fs::remove_dir(state_root(&f.namespace));
    let mut r = DeleteResponse::new();
    r.exit_status = 137;
    r.exited_at = containerd_shim_protos::protobuf::MessageField::some(service::now());
    let bytes = r.write_to_bytes()?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(io("writing the delete response"))?;
    Ok(())
}

/// The daemon: serves the Task service on the inherited listener until
/// Shutdown.
fn serve(f: &Flags) -> Result<(), ShimError> {
    let fd: i32 = std::env::var("VESSEL_SHIM_LISTEN_FD")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ShimError::Usage("serve needs VESSEL_SHIM_LISTEN_FD".into()))?;
    let sock = f
        .socket
        .clone()
        .ok_or_else(|| ShimError::Usage("serve needs -socket".into()))?;
    let rt = runtime(&f.namespace)?;
    // The socket file this daemon owns: once it is gone (Shutdown), a new
    // shim for the same id may bind the path again, and ours must not
    // take that one away.
    let ino = std::fs::metadata(&sock)
        .map_err(io(format!("reading {}", sock.display())))?
        .ino();
    let svc = service::Service::new(rt, f.namespace.clone(), sock.clone(), ino);
    let methods = containerd_shim_protos::create_task(std::sync::Arc::new(svc.clone()));
    let mut server = containerd_shim_protos::ttrpc::Server::new()
        .add_listener(fd)?
        .register_service(methods);
    server.start()?;
    svc.wait_shutdown();
    server.shutdown();
    svc.remove_socket();
    // The namespace's state root, if no other shim uses it.
    let _ = std::fs::remove_dir(state_root(&f.namespace));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flags = match Flags::parse(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-vessel-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = if flags.debug { "debug" } else { "info" };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .try_init();
    let r = match flags.action.as_str() {
        "start" => start(&flags, &args),
        "delete" => delete(&flags),
        "serve" => serve(&flags),
        other => Err(ShimError::Usage(format!("unknown action {other:?}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}: {e}", flags.action);
            eprintln!("containerd-shim-vessel-v2: {e}");
            ExitCode::FAILURE
        }
    }
}

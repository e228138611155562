//! The monitor: the process that owns one container's sandbox for its
//! whole life (started by [`super::Runtime::create`], see the module
//! documentation there).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vessel_proto::client::AgentClient;
use vessel_proto::container::{CreateContainerRequest, RootfsSource};

use super::{stdio, tty, write_vmm_pid, Context, Result, Runtime, VMM_PID_FILE};
use super::{AGENT_TIMEOUT, MOUNTS_TAG, ROOTFS_TAG};
use crate::binds;
use crate::bundle::Bundle;
use crate::network::Wiring;
use crate::sandbox::{Dirs, HostSide, Sandbox, Templates};
use crate::state::Status;

/// Where the agent mounts the rootfs share in the guest.
const GUEST_ROOTFS: &str = "/run/vessel/rootfs";
/// Where the agent mounts the share of host bind mount sources.
pub(super) const GUEST_MOUNTS: &str = "/run/vessel/mounts";
/// In a sandbox's state directory while its guest has the share of host
/// bind mounts mounted at [`GUEST_MOUNTS`] (pod members need it too).
pub(super) const GUEST_MOUNTS_FILE: &str = "guest-mounts";

/// The pieces of a created container the monitor keeps.
struct Monitored {
    sb: Sandbox,
    client: AgentClient,
    relays: stdio::Relays,
    wiring: Wiring,
}

fn setup(rt: &Runtime, id: &str, bundle: &Path, console: Option<&Path>) -> Result<Monitored> {
    let (store, cfg) = (&rt.store, &rt.cfg);
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
    std::fs::create_dir_all(&stage).with_ctx(|| format!("creating {}", stage.display()))?;
    // The sandbox's network namespace is the monitor's own (the VMM
    // inherits it): the engine's, given by path (podman, CNI), or a new one
    // when the spec asks for a network namespace (docker fills it from a
    // prestart hook that finds it at /proc/<monitor>/ns/net).
    let own_netns = match crate::netns::take(&mut spec)? {
        Some(fd) => {
            crate::netns::enter(std::os::fd::AsRawFd::as_raw_fd(&fd))
                .ctx("joining the engine's network namespace")?;
            true
        }
        None if crate::netns::wanted(&spec) => {
            crate::netns::unshare().ctx("creating the sandbox's network namespace")?;
            true
        }
        None => false,
    };
    let hook_state = super::hook_state(id, &b, "creating", std::process::id());
    for kind in ["prestart", "createRuntime"] {
        crate::hooks::run(kind, &crate::hooks::of_kind(&b.spec, kind)?, &hook_state)?;
    }
    // The engine's interfaces are in place once its hooks ran (docker's
    // libnetwork fills the namespace from a prestart hook).
    let wiring = if own_netns {
        Wiring::plan()?
    } else {
        tracing::warn!(
            "{id}: the spec has no network namespace (host networking): a VM cannot share \
             the host's network stack, the container gets loopback only"
        );
        Wiring::default()
    };
    let host = HostSide {
        stage: Some(
            std::ffi::CString::new(stage.as_os_str().as_encoded_bytes()).map_err(|_| {
                super::RuntimeError::Invalid("the state directory's path contains NUL".into())
            })?,
        ),
        binds: binds::plan(&mut spec, &b.dir, &stage, GUEST_MOUNTS)?,
        nets: wiring.vmm_args(cfg.net_offload),
    };
    let shares = [
        format!(
            "{ROOTFS_TAG}={}{}{}",
            b.rootfs.display(),
            if b.readonly { ",ro" } else { "" },
            crate::sandbox::rootfs_dax(cfg)
        ),
        format!("{MOUNTS_TAG}={}", stage.display()),
    ];
    let t0 = Instant::now();
    // A template has `net_slots` network devices: more interfaces need a
    // VM booted with them.
    let from_template = cfg.templates && wiring.len() <= usize::from(cfg.net_slots);
    if cfg.templates && !from_template {
        tracing::info!(
            "{id}: {} network interfaces, templates have {}: cold boot (raise net_slots in \
             the configuration to restore such sandboxes from a template)",
            wiring.len(),
            cfg.net_slots
        );
    }
    let (mut sb, mut client) = if from_template {
        let (tpl, _) = Templates::new(cfg).ensure(false)?;
        // Without a `hostname`, a new UTS namespace keeps its parent's name:
        // the host's, as with runc.
        let hostname = b.hostname.clone().or_else(host_name);
        Sandbox::restore(cfg, &tpl, dirs, &shares, &host, hostname)?
    } else {
        Sandbox::boot(cfg, dirs, &shares, &host)?
    };
    tracing::debug!("{id}: sandbox ready after {:?}", t0.elapsed());
    let created = (|| -> Result<stdio::Relays> {
        write_vmm_pid(&dir, sb.pid())?;
        if !wiring.is_empty() {
            // Wired before the container's process exists, after the
            // engine's hooks (see above).
            wiring.connect()?;
            client
                .set_timeout(Some(AGENT_TIMEOUT))
                .and_then(|()| client.configure_network(wiring.guest_config()))
                .ctx("configuring the guest's network")?;
        }
        if !host.binds.is_empty() {
            client
                .set_timeout(Some(AGENT_TIMEOUT))
                .and_then(|()| client.mount(MOUNTS_TAG, GUEST_MOUNTS, false))
                .ctx("mounting the bind mount share in the guest")?;
            std::fs::write(dir.join(GUEST_MOUNTS_FILE), b"")
                .ctx("recording the guest's mount of the bind mount share")?;
        }
        create_in_guest(
            &mut client,
            &sb.uds,
            id,
            spec,
            b.terminal,
            console,
            RootfsSource {
                tag: Some(ROOTFS_TAG.into()),
                path: GUEST_ROOTFS.into(),
            },
            t0,
        )
    })();
    match created {
        Ok(relays) => Ok(Monitored {
            sb,
            client,
            relays,
            wiring,
        }),
        Err(e) => {
            sb.kill();
            wiring.disconnect();
            let _ = std::fs::remove_file(dir.join(VMM_PID_FILE));
            Err(e)
        }
    }
}

/// Creates container `id` in the guest of `client` (vsock socket `uds`):
/// its terminal (console socket or the caller's) or stdio streams, then
/// `CreateContainer` with `rootfs`; returns the running relays. `t0` is
/// when the creation began (for the debug log).
#[allow(clippy::too_many_arguments)]
pub(super) fn create_in_guest(
    client: &mut AgentClient,
    uds: &Path,
    id: &str,
    mut spec: serde_json::Value,
    terminal: bool,
    console: Option<&Path>,
    rootfs: RootfsSource,
    t0: Instant,
) -> Result<stdio::Relays> {
    let (mut end, mut size) = (None, None);
    if terminal {
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
    let attached = stdio::Attached::attach(uds, id, None, terminal)?;
    client
        .set_timeout(Some(AGENT_TIMEOUT))
        .ctx("setting the agent timeout")?;
    let c = client
        .create_container(CreateContainerRequest {
            id: id.into(),
            rootfs,
            spec,
            stdio: attached.spec(),
        })
        .ctx("creating the container")?;
    tracing::debug!(
        "{id}: container created after {:?} (in the guest: {} ms)",
        t0.elapsed(),
        c.elapsed_us / 1000
    );
    if !c.ignored.is_empty() {
        tracing::info!("{id}: not applied in the guest: {}", c.ignored.join(", "));
    }
    attached.relay(end, size, stdio::Resizer::new(uds, id, None))
}

/// The hidden `vessel monitor` command (see the module documentation):
/// creates the container, reports on `ready_fd`, waits for it, and
/// returns its exit code (the monitor's own).
pub fn run(rt: &Runtime, id: &str, bundle: &Path, console: Option<&Path>, ready_fd: RawFd) -> u8 {
    let store = &rt.store;
    let Some(ready) = take_ready_fd(ready_fd) else {
        return 1;
    };
    let Some(mut m) = report_ready(ready, setup(rt, id, bundle, console)) else {
        return 1;
    };

    let mut oom_killed = false;
    let status = match m
        .client
        .set_timeout(None)
        .and_then(|()| m.client.wait_process(id, None))
    {
        Ok(exit) => {
            oom_killed = exit.oom_killed;
            exit.status
        }
        // `kill ID KILL` ended the whole VM (see `Runtime::kill`).
        Err(_)
            if store
                .dir(id)
                .is_ok_and(|d| d.join(super::KILLED_FILE).exists()) =>
        {
            128 + libc::SIGKILL
        }
        // The VM died under the container (its VMM killed, a guest kernel
        // panic): every process in it is gone, as after SIGKILL.
        Err(e) if m.sb.vmm_exited(Duration::from_secs(2)) => {
            tracing::warn!("{id}: the VM stopped under the container ({e})");
            128 + libc::SIGKILL
        }
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
    m.wiring.disconnect();
    tracing::debug!("{id}: sandbox stopped");
    if let Ok(dir) = store.dir(id) {
        let _ = std::fs::remove_file(dir.join(VMM_PID_FILE));
        let _ = std::fs::remove_file(dir.join(GUEST_MOUNTS_FILE));
    }
    record_exit(store, id, status, oom_killed)
}

/// The monitor's end of the ready pipe (`--ready-fd`), if it is one.
pub(super) fn take_ready_fd(ready_fd: RawFd) -> Option<std::fs::File> {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if ready_fd < 3 || unsafe { libc::fcntl(ready_fd, libc::F_GETFD) } < 0 {
        tracing::error!("monitor: --ready-fd {ready_fd} is not an open descriptor");
        return None;
    }
    // SAFETY: the descriptor is open (checked above) and is the pipe's
    // write end `vessel create` left to us alone; we take ownership once.
    Some(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(ready_fd)
    }))
}

/// Says `ok` or `error MESSAGE` on the ready pipe (and closes it).
pub(super) fn report_ready<T>(mut ready: std::fs::File, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => {
            let _ = writeln!(ready, "ok");
            Some(v)
        }
        Err(e) => {
            let msg = super::error_chain(&e).replace('\n', " ");
            let _ = writeln!(ready, "error {msg}");
            None
        }
    }
}

/// Records that `id` stopped with `status` (its init killed by the OOM
/// killer when `oom_killed`); the monitor's exit code.
pub(super) fn record_exit(
    store: &crate::state::Store,
    id: &str,
    status: i32,
    oom_killed: bool,
) -> u8 {
    if let Ok(lock) = store.lock(id) {
        if let Ok(mut s) = store.load(id) {
            s.status = Status::Stopped;
            s.pid = 0;
            s.exit_status = Some(status);
            s.oom_killed = oom_killed;
            if let Err(e) = store.save(&s, &lock) {
                tracing::warn!("{id}: recording the exit: {e}");
            }
        }
    }
    u8::try_from(status).unwrap_or(255)
}

/// This host's name (`uname -n`), if it has one.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string()).filter(|n| !n.is_empty())
}

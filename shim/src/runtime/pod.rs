//! Pods: a container created inside the VM of another, running, container
//! (its **sandbox**), as containerd's CRI wants for the containers of a
//! pod (`vessel create --sandbox SB`, [`Runtime::create_in`]).
//!
//! A pod member has the same lifecycle as any container: a monitor
//! (`vessel monitor ID --bundle B --sandbox SB`) is its pid, creates it,
//! waits for its init (`WaitProcess` on the sandbox's agent) and exits
//! with its status; `start`, `state`, `kill`, `exec`, `pause`, `resume`,
//! `update`, `stats`, `ps` reach the sandbox's agent because
//! [`Runtime::vsock_path`] follows the state's [`PodMember::sandbox`].
//! The monitor does not own the VM: it boots nothing, and its exit leaves
//! the VM running. If the VM dies, the member's wait fails and it exits
//! with 137.
//!
//! **Root file system and binds.** The guest cannot hot-plug virtio-fs
//! devices, and a template fixes the tags, so a member's files go through
//! the sandbox's existing share of host bind mounts ([`MOUNTS_TAG`], the
//! staging directory `<root>/<sandbox>/mounts`): the member gets the
//! directory `<stage>/c<pid>-<time>/` there, with `rootfs/` and `m/<n>`
//! (its bind mounts) as mount points. The sources are mounted on them
//! *only in the VMM's private mount namespace* (where its FUSE server
//! resolves paths): `open_tree(OPEN_TREE_CLONE)` in ours, then a forked
//! child `setns`es into the VMM's namespace and `move_mount`s the trees
//! there. Nothing is mounted in the host's namespace, so nothing can leak
//! there; the mounts vanish with the VMM, and `delete` unmounts them
//! (`umount2(MNT_DETACH)` from the VMM's namespace) and removes the
//! directory. No shared-propagation mount is needed. The guest mounts the
//! share at [`GUEST_MOUNTS`] once (recorded by
//! [`super::monitor::GUEST_MOUNTS_FILE`]) and the agent pivots into
//! `/run/vessel/mounts/<that name>/rootfs`. Members get no DAX window (the
//! rootfs share's window is the sandbox's).
//!
//! **Namespaces.** A member's `linux.namespaces[].path` that names the
//! sandbox (`/proc/<sandbox pid>/ns/<type>`, the pid being the sandbox's
//! monitor, i.e. the task pid an engine sees) becomes the guest path
//! `/proc/<guest pid of the sandbox's init>/ns/<type>`, which the agent
//! joins. A `network` path may be any path (CRI gives the pod's CNI
//! namespace on the host, which is the sandbox VM's network): it becomes
//! the sandbox's network namespace in the guest (the VM's, unless the
//! sandbox has a private one).
//!
//! **Lifetime.** The VM is the sandbox's: it ends when the sandbox's init
//! exits, or with `kill SB KILL` / `delete --force SB`; every member then
//! exits with 137 and is deleted as usual. Deleting a member never stops
//! the VM. Members run in the sandbox's host cgroup (the VMM's) and get a
//! guest cgroup of their own.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::container::RootfsSource;
use vessel_proto::{ErrorCode, AGENT_PORT};

use super::monitor::{
    create_in_guest, record_exit, report_ready, take_ready_fd, GUEST_MOUNTS, GUEST_MOUNTS_FILE,
};
use super::{
    invalid, read_vmm_pid, stdio, Context, CreateOptions, Result, Runtime, RuntimeError,
    AGENT_TIMEOUT, MOUNTS_TAG,
};
use crate::binds;
use crate::bundle::Bundle;
use crate::state::{self, ContainerState, PodMember, StateError, Status};

/// A new name for a member's directory in the sandbox's staging
/// directory: never the name of an earlier member (the guest may have
/// cached entries of that one), known before the monitor starts (so a
/// failed create can remove what the monitor made).
fn new_stage_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("c{}-{nanos:x}", std::process::id())
}

/// The `/proc/PID/ns/` file of namespace type `typ` (spec names).
fn ns_file(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "ipc" => "ipc",
        "uts" => "uts",
        "pid" => "pid",
        "network" => "net",
        "cgroup" => "cgroup",
        _ => return None,
    })
}

/// Rewrites the namespace paths of a member's spec (see the module
/// documentation): `/proc/<host_pid>/ns/T` of sandbox `sandbox` (and any
/// `network` path) become `/proc/<guest_pid>/ns/T`; any other path is an
/// error, as are paths of mount, user and time namespaces.
pub fn translate_namespaces(
    spec: &mut Value,
    sandbox: &str,
    host_pid: i32,
    guest_pid: i32,
) -> Result<()> {
    let Some(list) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    else {
        return Ok(());
    };
    for ns in list {
        let Some(path) = ns.get("path").and_then(Value::as_str).map(str::to_string) else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        let typ = ns.get("type").and_then(Value::as_str).unwrap_or_default();
        let Some(file) = ns_file(typ) else {
            return invalid(format!(
                "a container in sandbox {sandbox} cannot join the {typ} namespace at {path}"
            ));
        };
        let of_sandbox = path == format!("/proc/{host_pid}/ns/{file}");
        if !of_sandbox && typ != "network" {
            return invalid(format!(
                "the {typ} namespace at {path} is not sandbox {sandbox}'s \
                 (/proc/{host_pid}/ns/{file}): a container in a VM can only join its sandbox's"
            ));
        }
        ns["path"] = Value::String(format!("/proc/{guest_pid}/ns/{file}"));
    }
    Ok(())
}

/// `fork`s a child that enters the mount namespace of process `pid` and
/// runs `work` there (only system calls: no allocation, no lock), and
/// waits for it. Refuses a process that shares our mount namespace (what
/// `work` mounts would land in the host's).
fn in_mount_ns(pid: i32, work: &dyn Fn() -> std::io::Result<()>) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    let ours = std::fs::metadata("/proc/self/ns/mnt")?;
    let theirs = ns.metadata()?;
    if ours.ino() == theirs.ino() && ours.dev() == theirs.dev() {
        return Err(std::io::Error::other(
            "the VMM has no mount namespace of its own",
        ));
    }
    let fd = ns.as_raw_fd();
    // SAFETY: fork(2); the child only calls setns(2), `work` (system
    // calls only, as documented) and _exit(2), never returning.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: setns on a descriptor inherited from the parent.
        let code = if unsafe { libc::setns(fd, libc::CLONE_NEWNS) } != 0 {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            match work() {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            }
        };
        // SAFETY: ends the forked child without running anything of the
        // parent's (no destructors, no atexit handlers).
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing one int.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else if libc::WIFEXITED(status) {
        Err(std::io::Error::from_raw_os_error(libc::WEXITSTATUS(status)))
    } else {
        Err(std::io::Error::other("the mount helper was killed"))
    }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Invalid(format!("{} contains NUL", p.display())))
}

/// The pieces of a created member its monitor keeps.
struct Member {
    client: AgentClient,
    relays: stdio::Relays,
}

impl Runtime {
    /// `create` of container `id` inside the VM of running container
    /// `sandbox` (see the module documentation); returns its monitor (our
    /// child), like [`Runtime::create`]. An unknown sandbox is
    /// [`RuntimeError::NoSandbox`]; nothing is left behind on failure.
    pub fn create_in(
        &self,
        sandbox: &str,
        id: &str,
        b: &Bundle,
        o: &CreateOptions,
    ) -> Result<Child> {
        state::validate_id(id)?;
        self.check_stdio(b, o)?;
        crate::hooks::refuse_in_container(&b.spec)?;
        self.sandbox_of(sandbox)?;
        let (_dir, lock) = self.store.create(id)?;
        let pod = PodMember {
            sandbox: sandbox.into(),
            stage: new_stage_name(),
        };
        let mut child: Option<Child> = None;
        let result = (|| -> Result<()> {
            let args = vec![
                "monitor".into(),
                id.into(),
                "--bundle".into(),
                b.dir.clone().into(),
                "--sandbox".into(),
                sandbox.into(),
                "--stage".into(),
                pod.stage.clone().into(),
            ];
            let c = self.launcher.start(
                &args,
                o.console_socket.as_deref(),
                o.stdio.as_deref(),
                Vec::new(),
                "pod container monitor",
                "the monitor exited before the container was created",
            )?;
            let c = child.insert(c);
            self.save_created(id, b, o, c.id(), &lock, None, Some(pod.clone()))
        })();
        match (result, child) {
            (Ok(()), Some(c)) => Ok(c),
            (Ok(()), None) => Err(RuntimeError::Monitor("no monitor".into())),
            (Err(e), c) => {
                if let Some(mut c) = c {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                // Whatever a monitor that said `ok`, or died half-way, left.
                self.remove_member(id, &pod);
                let _ = self.store.remove(id, lock);
                Err(e)
            }
        }
    }

    /// The state of sandbox container `sandbox` and its VMM's pid, if it
    /// can take members: it exists, is not a member itself, and its VM
    /// runs.
    pub fn sandbox_of(&self, sandbox: &str) -> Result<(ContainerState, i32)> {
        let s = match self.state(sandbox) {
            Ok(s) => s,
            Err(RuntimeError::State(StateError::NotFound)) => {
                return Err(RuntimeError::NoSandbox(sandbox.into()))
            }
            Err(e) => return Err(e),
        };
        if let Some(p) = &s.pod {
            return invalid(format!(
                "container {sandbox} runs in the sandbox of {}: use that one",
                p.sandbox
            ));
        }
        if s.status == Status::Stopped {
            return Err(StateError::InvalidState(format!(
                "sandbox container {sandbox} is stopped: its VM is gone"
            ))
            .into());
        }
        let dir = self.store.dir(sandbox)?;
        match read_vmm_pid(&dir).filter(|&(pid, start)| state::same_process(pid, start)) {
            Some((pid, _)) => Ok((s, pid)),
            None => Err(StateError::InvalidState(format!(
                "the VM of sandbox container {sandbox} is not running"
            ))
            .into()),
        }
    }

    /// The ids of the members of sandbox `sandbox` that still exist
    /// (whatever their status), sorted.
    pub fn members(&self, sandbox: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .ids()?
            .into_iter()
            .filter(|id| {
                self.store
                    .load(id)
                    .is_ok_and(|s| s.pod.is_some_and(|p| p.sandbox == sandbox))
            })
            .collect())
    }

    /// The host directory of member `pod`'s mount points.
    fn member_stage(&self, pod: &PodMember) -> Result<PathBuf> {
        Ok(self
            .store
            .dir(&pod.sandbox)?
            .join("mounts")
            .join(&pod.stage))
    }

    /// Mounts the sandbox's share of host mounts in its guest unless it
    /// is already (the sandbox had bind mounts, or another member did it).
    fn ensure_guest_mounts(&self, sandbox: &str, client: &mut AgentClient) -> Result<()> {
        let _lock = self.store.lock(sandbox)?;
        let marker = self.store.dir(sandbox)?.join(GUEST_MOUNTS_FILE);
        if marker.exists() {
            return Ok(());
        }
        client
            .mount(MOUNTS_TAG, GUEST_MOUNTS, false)
            .ctx("mounting the share of host mounts in the sandbox's guest")?;
        std::fs::write(&marker, b"").with_ctx(|| format!("writing {}", marker.display()))
    }

    /// Removes what member `id` has in its sandbox (best effort, logged):
    /// the container in the guest, its mounts in the VMM's namespace and
    /// its directory.
    pub(super) fn remove_member(&self, id: &str, pod: &PodMember) {
        let client = self.store.sandbox_dir(&pod.sandbox).ok().and_then(|d| {
            AgentClient::connect(&d.join("vsock.sock"), AGENT_PORT, Duration::from_secs(10)).ok()
        });
        if let Some(mut c) = client {
            let r = c
                .set_timeout(Some(AGENT_TIMEOUT))
                .and_then(|()| c.delete_container(id, true));
            match r {
                Ok(()) => {}
                Err(ClientError::Remote(r)) if r.code == ErrorCode::NotFound => {}
                Err(e) => tracing::warn!("{id}: deleting the container in the guest: {e}"),
            }
        }
        let Ok(stage) = self.member_stage(pod) else {
            return;
        };
        let vmm = self
            .store
            .dir(&pod.sandbox)
            .ok()
            .and_then(|d| read_vmm_pid(&d))
            .filter(|&(pid, start)| state::same_process(pid, start));
        if let Some((vmm, _)) = vmm {
            let mut targets = vec![stage.join("rootfs")];
            if let Ok(entries) = std::fs::read_dir(stage.join("m")) {
                targets.extend(entries.filter_map(|e| Some(e.ok()?.path())));
            }
            let targets: Vec<CString> = targets.iter().filter_map(|t| cpath(t).ok()).collect();
            let r = in_mount_ns(vmm, &|| {
                for t in &targets {
                    // SAFETY: umount2 of a C string; a target that is no
                    // mount point fails harmlessly.
                    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
                }
                Ok(())
            });
            if let Err(e) = r {
                tracing::warn!("{id}: unmounting in the VMM's namespace: {e}");
            }
        }
        // Only mount points here: nothing is mounted in our namespace.
        match std::fs::remove_dir_all(&stage) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{id}: removing {}: {e}", stage.display()),
        }
    }
}

/// Sets up member `id` of `sandbox` in the monitor (see the module
/// documentation); on failure nothing of it is left.
fn setup_member(
    rt: &Runtime,
    id: &str,
    pod: &PodMember,
    bundle: &Path,
    console: Option<&Path>,
) -> Result<Member> {
    let sandbox = pod.sandbox.as_str();
    // One plain name (the same rule as ids).
    state::validate_id(&pod.stage)?;
    let t0 = Instant::now();
    let b = Bundle::load(bundle)?;
    let (sb, vmm) = rt.sandbox_of(sandbox)?;
    let uds = rt.store.sandbox_dir(sandbox)?.join("vsock.sock");
    let mut client = AgentClient::connect(&uds, AGENT_PORT, Duration::from_secs(10))
        .with_ctx(|| format!("cannot reach the VM of sandbox {sandbox}"))?;
    client
        .set_timeout(Some(AGENT_TIMEOUT))
        .ctx("setting the agent timeout")?;
    let guest_pid = client
        .container_state(sandbox)
        .with_ctx(|| format!("asking for sandbox {sandbox}'s init"))?
        .pid;
    let mut spec = b.spec.clone();
    translate_namespaces(&mut spec, sandbox, sb.pid, guest_pid)?;
    if b.readonly {
        binds::make_mount_points(&spec, &b.dir, &b.rootfs)?;
    }
    let stage = rt.member_stage(pod)?;
    let guest = format!("{GUEST_MOUNTS}/{}", pod.stage);
    let made = (|| -> Result<stdio::Relays> {
        let _ = std::fs::remove_dir_all(&stage);
        for d in [stage.join("rootfs"), stage.join("m")] {
            std::fs::create_dir_all(&d).with_ctx(|| format!("creating {}", d.display()))?;
        }
        let host_binds = binds::plan(&mut spec, &b.dir, &stage.join("m"), &format!("{guest}/m"))?;
        let hook_state = super::hook_state(id, &b, "creating", std::process::id());
        for kind in ["prestart", "createRuntime"] {
            crate::hooks::run(kind, &crate::hooks::of_kind(&b.spec, kind)?, &hook_state)?;
        }
        let mut trees: Vec<(OwnedFd, CString)> = Vec::new();
        let root = cpath(&b.rootfs)?;
        trees.push((
            binds::clone_tree(&root, true, b.readonly)
                .with_ctx(|| format!("cloning the mount of {}", b.rootfs.display()))?,
            cpath(&stage.join("rootfs"))?,
        ));
        for hb in &host_binds {
            let (tree, dst) = hb.clone_tree().ctx("cloning a bind mount's source")?;
            trees.push((tree, dst.to_owned()));
        }
        in_mount_ns(vmm, &|| {
            for (tree, dst) in &trees {
                binds::attach_tree(tree, dst)?;
            }
            Ok(())
        })
        .with_ctx(|| format!("mounting the container's files in sandbox {sandbox}'s VMM"))?;
        drop(trees);
        rt.ensure_guest_mounts(sandbox, &mut client)?;
        create_in_guest(
            &mut client,
            &uds,
            id,
            spec,
            b.terminal,
            console,
            RootfsSource {
                tag: None,
                path: format!("{guest}/rootfs"),
            },
            t0,
        )
    })();
    match made {
        Ok(relays) => Ok(Member { client, relays }),
        Err(e) => {
            rt.remove_member(id, pod);
            Err(e)
        }
    }
}

/// The hidden `vessel monitor ID --sandbox SB --stage NAME` command:
/// creates member `id` in `pod`'s VM, reports on `ready_fd`, waits for
/// its init and returns its exit code (137 when the VM went away).
pub fn run_member(
    rt: &Runtime,
    id: &str,
    pod: &PodMember,
    bundle: &Path,
    console: Option<&Path>,
    ready_fd: std::os::fd::RawFd,
) -> u8 {
    let sandbox = &pod.sandbox;
    let Some(ready) = take_ready_fd(ready_fd) else {
        return 1;
    };
    let Some(mut m) = report_ready(ready, setup_member(rt, id, pod, bundle, console)) else {
        return 1;
    };
    let (status, oom_killed) = match m
        .client
        .set_timeout(None)
        .and_then(|()| m.client.wait_process(id, None))
    {
        Ok(exit) => (exit.status, exit.oom_killed),
        Err(e) => {
            tracing::info!("{id}: the VM of sandbox {sandbox} is gone ({e}): exit 137");
            (128 + libc::SIGKILL, false)
        }
    };
    m.relays.drain(stdio::DRAIN_TIMEOUT);
    record_exit(&rt.store, id, status, oom_killed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_the_entries_naming_the_sandbox() {
        let root = std::env::temp_dir().join(format!("vessel-pod-members-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = state::Store::with_run_dir(&root, root.join("run"));
        let rt = Runtime {
            store: store.clone(),
            cfg: crate::config::Config::defaults(Path::new("/nonexistent")),
            launcher: super::super::Launcher {
                exe: "/nonexistent".into(),
                globals: Vec::new(),
            },
            systemd_cgroup: false,
        };
        for (id, sandbox) in [
            ("sb", None),
            ("a", Some("sb")),
            ("b", Some("other")),
            ("c", Some("sb")),
        ] {
            let (_, lock) = store.create(id).unwrap();
            let s = ContainerState {
                oci_version: state::OCI_VERSION.into(),
                id: id.into(),
                pid: 0,
                status: Status::Stopped,
                bundle: "/b".into(),
                rootfs: "/b/rootfs".into(),
                created: String::new(),
                owner: String::new(),
                annotations: Default::default(),
                exit_status: None,
                oom_killed: false,
                pid_start: None,
                host_cgroup: None,
                hooks: None,
                pod: sandbox.map(|sb| PodMember {
                    sandbox: sb.into(),
                    stage: format!("c-{id}"),
                }),
            };
            store.save(&s, &lock).unwrap();
        }
        assert_eq!(rt.members("sb").unwrap(), ["a", "c"]);
        assert!(rt.members("a").unwrap().is_empty());
        // A member's agent is its sandbox's.
        assert_eq!(rt.vsock_path("a").unwrap(), rt.vsock_path("sb").unwrap());
        assert_ne!(rt.vsock_path("b").unwrap(), rt.vsock_path("sb").unwrap());
        // An unknown sandbox is its own error.
        assert!(matches!(
            rt.sandbox_of("nosuch"),
            Err(RuntimeError::NoSandbox(_))
        ));
        assert!(rt
            .sandbox_of("a")
            .unwrap_err()
            .to_string()
            .contains("runs in the sandbox of sb"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn namespace_paths_of_the_sandbox_become_guest_paths() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "mount"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]}});
        translate_namespaces(&mut spec, "sb", 42, 7).unwrap();
        let ns = &spec["linux"]["namespaces"];
        assert_eq!(ns[0], json!({"type": "pid"}));
        assert_eq!(ns[2]["path"], "/proc/7/ns/ipc");
        assert_eq!(ns[3]["path"], "/proc/7/ns/uts");
        assert_eq!(ns[4]["path"], "/proc/7/ns/net");
        for (bad, why) in [
            (
                json!({"type": "ipc", "path": "/proc/43/ns/ipc"}),
                "not sandbox sb's",
            ),
            (
                json!({"type": "uts", "path": "/run/utsns/x"}),
                "not sandbox sb's",
            ),
            (
                json!({"type": "mount", "path": "/proc/42/ns/mnt"}),
                "cannot join the mount",
            ),
        ] {
            let mut spec = json!({"linux": {"namespaces": [bad]}});
            let e = translate_namespaces(&mut spec, "sb", 42, 7).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}

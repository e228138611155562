//! From an OCI runtime spec to a plan: plain data (C strings, flag words,
//! bit masks) that the child process applies with raw system calls and no
//! allocation. Everything that can be refused is refused here, in the
//! agent, before any process exists; this part needs no root and no VM and
//! is unit-tested.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Component, Path};
use std::sync::Arc;

use super::oci::{IdMapping, Process, Resources, Spec};
use super::seccomp::{self, SeccompError};

/// `PATH` when the process's environment has none (runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors in a spec or process object.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not a valid OCI document.
    #[error("invalid OCI {what}")]
    Json {
        /// "config.json" or "process".
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A required field is missing or a value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A feature this agent does not implement, where ignoring it would
    /// change what the container is allowed to do.
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl From<SeccompError> for SpecError {
    fn from(e: SeccompError) -> SpecError {
        match e {
            SeccompError::Unsupported(m) => SpecError::Unsupported(format!("linux.seccomp: {m}")),
            e => SpecError::Invalid(super::chain(&e)),
        }
    }
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

fn cstring(what: &str, s: &str) -> Result<CString, SpecError> {
    CString::new(s).map_err(|_| invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// One mount to make in the child, before `pivot_root`.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOp {
    /// Source (a path for bind mounts, a name otherwise).
    pub source: CString,
    /// Absolute target in the agent's view: rootfs + destination.
    pub target: CString,
    /// Filesystem type (`None` for bind mounts).
    pub fstype: Option<CString>,
    /// Flags of the first `mount` call.
    pub flags: libc::c_ulong,
    /// Filesystem data (comma-separated options the flags do not cover).
    pub data: Option<CString>,
    /// A bind mount with flags (ro, nosuid, ...) that need a remount.
    pub remount_flags: Option<libc::c_ulong>,
    /// Propagation to set afterwards (MS_PRIVATE, MS_SLAVE, ... | MS_REC).
    pub propagation: libc::c_ulong,
    /// The destination, for messages.
    pub destination: String,
}

/// A device node to create (before `pivot_root`).
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceOp {
    /// rootfs + path.
    pub path: CString,
    /// The guest's node of the same path, bind-mounted instead of `mknod`
    /// in a user namespace (where `mknod` of devices is not permitted).
    pub guest_path: CString,
    /// S_IFCHR/S_IFBLK/S_IFIFO | permission bits.
    pub mode: libc::mode_t,
    /// makedev(major, minor).
    pub dev: libc::dev_t,
    /// Owner.
    pub uid: libc::uid_t,
    /// Group.
    pub gid: libc::gid_t,
}

/// The five capability sets as bit masks (bit N = capability N).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

/// What the child applies to itself just before `execve`, for both a
/// container's init and an exec.
#[derive(Debug)]
pub struct ProcessPlan {
    /// argv.
    pub args: Vec<CString>,
    /// envp.
    pub env: Vec<CString>,
    /// Candidate executables, in `PATH` order (or argv[0] alone if it
    /// holds a `/`).
    pub exec_candidates: Vec<CString>,
    /// Working directory.
    pub cwd: CString,
    /// User.
    pub uid: libc::uid_t,
    /// Group.
    pub gid: libc::gid_t,
    /// Additional groups.
    pub additional_gids: Vec<libc::gid_t>,
    /// umask (default 0022).
    pub umask: libc::mode_t,
    /// Capabilities; `None` leaves them as they are (all of root's).
    pub caps: Option<CapSets>,
    /// `prctl(PR_SET_NO_NEW_PRIVS)`.
    pub no_new_privileges: bool,
    /// (resource, limits).
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    /// Value for /proc/self/oom_score_adj.
    pub oom_score_adj: Option<CString>,
    /// Run on a pty.
    pub terminal: bool,
    /// Initial terminal size (rows, cols).
    pub console_size: Option<(u16, u16)>,
    /// Seccomp filter (the container's `linux.seccomp`, for execs too).
    pub seccomp: Option<Arc<seccomp::Filter>>,
}

/// A user namespace's id maps, as written to `/proc/PID/uid_map` and
/// `gid_map` by the agent (the child cannot write its own: it has no
/// capability over the guest's ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNs {
    /// `uid_map` contents: one "inside outside count" line per range.
    pub uid_map: String,
    /// `gid_map` contents.
    pub gid_map: String,
}

/// Everything a container's init applies.
#[derive(Debug)]
pub struct InitPlan {
    /// CLONE_NEW* flags for `clone3` (the cgroup namespace is unshared
    /// after the child is in its cgroup: see [`InitPlan::cgroup_ns`]).
    pub clone_flags: u64,
    /// Unshare a cgroup namespace once inside the container's cgroup.
    pub cgroup_ns: bool,
    /// Namespaces to join instead of creating (`linux.namespaces[].path`,
    /// a pod container joining its sandbox's): (CLONE_NEW* type, path),
    /// entered with `setns` before the init is cloned (see
    /// `container::spawn_init`).
    pub joins: Vec<(libc::c_int, CString)>,
    /// A user namespace (`CLONE_NEWUSER` is in `clone_flags`).
    pub userns: Option<UserNs>,
    /// The root filesystem (absolute guest path).
    pub rootfs: CString,
    /// Propagation of the container's mount tree (default rprivate).
    pub rootfs_propagation: libc::c_ulong,
    /// Mounts, in spec order.
    pub mounts: Vec<MountOp>,
    /// Device nodes (defaults when /dev is a fresh tmpfs, plus the spec's).
    pub devices: Vec<DeviceOp>,
    /// Symlinks (target, link path) to create in /dev.
    pub dev_symlinks: Vec<(CString, CString)>,
    /// Remount / read-only after pivot_root.
    pub readonly_root: bool,
    /// Paths to hide (after pivot_root).
    pub masked_paths: Vec<CString>,
    /// Paths to make read-only (after pivot_root).
    pub readonly_paths: Vec<CString>,
    /// Host name (UTS namespace).
    pub hostname: Option<CString>,
    /// Domain name (UTS namespace).
    pub domainname: Option<CString>,
    /// Sysctls the child writes, in the container's own namespaces, after
    /// its `/proc` is mounted and before anything is made read-only (see
    /// [`AFTER_PIVOT`]): (/proc/sys path, value).
    pub sysctls: Vec<(CString, CString)>,
    /// `net.*` sysctls of a network namespace shared with the VM, which the
    /// agent writes itself before the child exists (a child in a user
    /// namespace may not write the VM's): (/proc/sys path, value).
    pub vm_sysctls: Vec<(String, String)>,
    /// cgroup v2 files to write: (file name, value).
    pub cgroup_writes: Vec<(String, String)>,
    /// The process.
    pub process: ProcessPlan,
    /// Present but not applied (reported to the host).
    pub ignored: Vec<String>,
}

/// What the child does after `pivot_root`, in runc's order: the host and
/// domain names, then the sysctls (the container's `/proc` is mounted and
/// `/proc/sys` still writable), then the read-only paths (which usually
/// include `/proc/sys`), the masked paths, and last the read-only root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `sethostname`.
    Hostname,
    /// `setdomainname`.
    Domainname,
    /// [`InitPlan::sysctls`].
    Sysctls,
    /// [`InitPlan::readonly_paths`].
    ReadonlyPaths,
    /// [`InitPlan::masked_paths`].
    MaskedPaths,
    /// [`InitPlan::readonly_root`].
    ReadonlyRoot,
}

/// The order of [`Finish`] steps the child follows.
pub const AFTER_PIVOT: [Finish; 6] = [
    Finish::Hostname,
    Finish::Domainname,
    Finish::Sysctls,
    Finish::ReadonlyPaths,
    Finish::MaskedPaths,
    Finish::ReadonlyRoot,
];

/// IPC namespace sysctls besides `fs.mqueue.*` (runc's list).
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Where a sysctl of the spec is applied.
#[derive(Debug, PartialEq, Eq)]
enum SysctlTarget {
    /// Written by the child in its own namespace.
    Child,
    /// Written by the agent: the VM's network namespace.
    Vm,
    /// `kernel.domainname`: `setdomainname` (the same value, and allowed in
    /// a user namespace, where the UTS sysctl files are not writable).
    Domainname,
}

/// A sysctl name in dotted form (`sysctl.d(5)`: a name whose first
/// separator is `/` uses `/` between components and may hold dots inside
/// one, as in `net/ipv4/conf/eth0.100/rp_filter`), and its path under
/// `/proc/sys`.
fn sysctl_names(key: &str) -> (String, String) {
    let slash_form = key
        .find(['.', '/'])
        .is_some_and(|i| key.as_bytes()[i] == b'/');
    let swap = |s: &str| {
        s.chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                c => c,
            })
            .collect::<String>()
    };
    if slash_form {
        (swap(key), format!("/proc/sys/{key}"))
    } else {
        (key.to_string(), format!("/proc/sys/{}", swap(key)))
    }
}

/// Checks a sysctl the way runc does (only sysctls of a namespace the
/// container has), and says who applies it. Unlike runc, `net.*` is
/// allowed without a network namespace of the container's own: the
/// container then shares the VM's, which serves this container alone.
fn sysctl_target(
    name: &str,
    clone_flags: u64,
    private_netns: bool,
) -> Result<SysctlTarget, SpecError> {
    let has = |flag: libc::c_int| clone_flags & u64::try_from(flag).unwrap_or(0) != 0;
    if IPC_SYSCTLS.contains(&name) || name.starts_with("fs.mqueue.") {
        return if has(libc::CLONE_NEWIPC) {
            Ok(SysctlTarget::Child)
        } else {
            Err(invalid(format!(
                "sysctl {name:?} needs an ipc namespace in linux.namespaces"
            )))
        };
    }
    if name.starts_with("net.") {
        return Ok(if private_netns {
            SysctlTarget::Child
        } else {
            SysctlTarget::Vm
        });
    }
    if has(libc::CLONE_NEWUTS) {
        match name {
            "kernel.domainname" => return Ok(SysctlTarget::Domainname),
            "kernel.hostname" => {
                return Err(invalid(
                    "sysctl \"kernel.hostname\" conflicts with the hostname field",
                ))
            }
            _ => {}
        }
    }
    Err(invalid(format!(
        "sysctl {name:?} is not in a separate kernel namespace"
    )))
}

/// `net.ipv4.ping_group_range` of a container in a user namespace, whose
/// gids are the container's (runc's child writes it from inside, and the
/// kernel reads the gids in the writer's namespace), as the guest's gids
/// the agent writes; a gid outside `linux.gidMappings` is refused, as the
/// kernel refuses it (EINVAL).
fn guest_gid_range(value: &str, maps: &[IdMapping]) -> Result<String, SpecError> {
    let bad = || invalid(format!("sysctl net.ipv4.ping_group_range {value:?}"));
    let mut out = Vec::new();
    for g in value.split_whitespace() {
        let g: u32 = g.parse().map_err(|_| bad())?;
        let m = maps
            .iter()
            .find(|m| {
                g >= m.container_id && u64::from(g) < u64::from(m.container_id) + u64::from(m.size)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "sysctl net.ipv4.ping_group_range: gid {g} is not in linux.gidMappings"
                ))
            })?;
        out.push((g - m.container_id + m.host_id).to_string());
    }
    if out.len() != 2 {
        return Err(bad());
    }
    Ok(out.join(" "))
}

/// Most lines a kernel's `uid_map` takes (Linux 4.15 and later).
const MAX_ID_MAP_LINES: usize = 340;

/// The `uid_map`/`gid_map` text of `mappings`, checked the way the kernel
/// and runc check them, so that a bad map is refused with a reason before
/// any process exists: at least one range, no empty range, no range that
/// wraps past 2^32, no two ranges overlapping inside or outside, and
/// container id 0 mapped (the container's init becomes root of its user
/// namespace before it sets up its mounts, as runc's does).
fn id_map(kind: &str, mappings: Option<&[IdMapping]>) -> Result<String, SpecError> {
    let mappings = mappings.unwrap_or_default();
    if mappings.is_empty() {
        return Err(invalid(format!(
            "a user namespace needs linux.{kind}Mappings"
        )));
    }
    if mappings.len() > MAX_ID_MAP_LINES {
        return Err(invalid(format!(
            "linux.{kind}Mappings has {} ranges (the kernel takes at most {MAX_ID_MAP_LINES})",
            mappings.len()
        )));
    }
    let end = |start: u32, size: u32| u64::from(start) + u64::from(size);
    for (i, m) in mappings.iter().enumerate() {
        if m.size == 0 {
            return Err(invalid(format!("linux.{kind}Mappings[{i}] has size 0")));
        }
        if end(m.container_id, m.size) > 1 << 32 || end(m.host_id, m.size) > 1 << 32 {
            return Err(invalid(format!(
                "linux.{kind}Mappings[{i}] runs past the largest {kind}"
            )));
        }
        for (j, o) in mappings[..i].iter().enumerate() {
            let overlap =
                |a: u32, b: u32| u64::from(a) < end(b, o.size) && u64::from(b) < end(a, m.size);
            if overlap(m.container_id, o.container_id) || overlap(m.host_id, o.host_id) {
                return Err(invalid(format!(
                    "linux.{kind}Mappings[{i}] overlaps linux.{kind}Mappings[{j}]"
                )));
            }
        }
    }
    if !mappings.iter().any(|m| m.container_id == 0) {
        return Err(invalid(format!(
            "linux.{kind}Mappings does not map {kind} 0 of the container"
        )));
    }
    Ok(mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect())
}

/// `rootfs` + `dest`, refusing relative destinations and `..`.
fn in_root(rootfs: &str, dest: &Path) -> Result<String, SpecError> {
    if !dest.is_absolute() {
        return Err(invalid(format!(
            "mount destination {} is not absolute",
            dest.display()
        )));
    }
    let mut out = rootfs.trim_end_matches('/').to_string();
    for c in dest.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                out.push('/');
                out.push_str(
                    n.to_str()
                        .ok_or_else(|| invalid(format!("path {} is not UTF-8", dest.display())))?,
                );
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(format!("path {} contains '..'", dest.display())))
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Splits mount options into (flags, clear flags, propagation, data,
/// unsupported), runc's table.
pub fn parse_mount_options(
    options: &[String],
) -> (libc::c_ulong, libc::c_ulong, Vec<String>, Vec<String>) {
    let mut flags: libc::c_ulong = 0;
    let mut propagation: libc::c_ulong = 0;
    let mut data = Vec::new();
    let mut unsupported = Vec::new();
    for o in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
            "defaults" => (0, 0),
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "suid" => (0, libc::MS_NOSUID),
            "nosuid" => (libc::MS_NOSUID, 0),
            "dev" => (0, libc::MS_NODEV),
            "nodev" => (libc::MS_NODEV, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "noexec" => (libc::MS_NOEXEC, 0),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "atime" => (0, libc::MS_NOATIME),
            "noatime" => (libc::MS_NOATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                propagation = propagation_flags(o).unwrap_or(0);
                continue;
            }
            "tmpcopyup" | "idmap" | "ridmap" | "rro" | "rrw" | "rnosuid" | "rnodev" | "rnoexec"
            | "rnoatime" | "rrelatime" | "rstrictatime" | "nosymfollow" | "rnosymfollow"
            | "recursive" => {
                unsupported.push(o.clone());
                continue;
            }
            _ => {
                data.push(o.clone());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    let _ = &mut data;
    (flags, propagation, data, unsupported)
}

fn propagation_flags(name: &str) -> Option<libc::c_ulong> {
    Some(match name {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

/// Capability names (without `CAP_`, as oci-spec displays them) by number.
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Highest capability number this agent knows (CAP_CHECKPOINT_RESTORE).
pub const CAP_LAST: u32 = 40;

/// The bit of a capability name (`CAP_CHOWN` or `CHOWN`).
pub fn cap_number(name: &str) -> Option<u32> {
    let bare = name.strip_prefix("CAP_").unwrap_or(name);
    CAP_NAMES
        .iter()
        .position(|n| *n == bare)
        .and_then(|i| u32::try_from(i).ok())
}

fn cap_mask(set: &Option<Vec<String>>) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for name in set.iter().flatten() {
        let n = cap_number(name).ok_or_else(|| invalid(format!("unknown capability {name}")))?;
        mask |= 1u64 << n;
    }
    Ok(mask)
}

/// `RLIMIT_*` names by resource number (Linux, x86_64 and generic).
const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    RLIMIT_NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| libc::c_int::try_from(i).ok())
}

/// Parses an OCI `process` object (for exec).
pub fn parse_process(value: serde_json::Value) -> Result<Process, SpecError> {
    serde_json::from_value(value).map_err(|source| SpecError::Json {
        what: "process",
        source,
    })
}

/// Builds the process part of a plan.
pub fn process_plan(p: &Process) -> Result<ProcessPlan, SpecError> {
    let args: Vec<String> = p.args.clone().unwrap_or_default();
    let Some(argv0) = args.first() else {
        return Err(invalid("process.args must not be empty"));
    };
    if argv0.is_empty() {
        return Err(invalid("process.args[0] is empty"));
    }
    let env: Vec<String> = p.env.clone().unwrap_or_default();
    for e in &env {
        if !e.contains('=') {
            return Err(invalid(format!("env entry {e:?} has no '='")));
        }
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let exec_candidates = if argv0.contains('/') {
        vec![cstring("process.args[0]", argv0)?]
    } else {
        path.split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| {
                cstring(
                    "PATH entry",
                    &format!("{}/{argv0}", d.trim_end_matches('/')),
                )
            })
            .collect::<Result<_, _>>()?
    };
    let cwd = p.cwd.as_str();
    if !cwd.starts_with('/') {
        return Err(invalid(format!("process.cwd {cwd:?} is not absolute")));
    }
    let user = &p.user;
    if user.username.is_some() {
        // Windows only in the spec; a name cannot be resolved without the
        // image's /etc/passwd.
        return Err(SpecError::Unsupported("process.user.username".into()));
    }
    let caps = match &p.capabilities {
        None => None,
        Some(c) => Some(CapSets {
            bounding: cap_mask(&c.bounding)?,
            effective: cap_mask(&c.effective)?,
            permitted: cap_mask(&c.permitted)?,
            inheritable: cap_mask(&c.inheritable)?,
            ambient: cap_mask(&c.ambient)?,
        }),
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits.iter().flatten() {
        let resource =
            rlimit_resource(&r.typ).ok_or_else(|| invalid(format!("unknown rlimit {}", r.typ)))?;
        if r.soft > r.hard {
            return Err(invalid(format!(
                "rlimit {}: soft {} exceeds hard {}",
                r.typ, r.soft, r.hard
            )));
        }
        rlimits.push((
            resource,
            libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            },
        ));
    }
    let oom_score_adj = match p.oom_score_adj {
        None => None,
        Some(v) if (-1000..=1000).contains(&v) => Some(cstring("oomScoreAdj", &v.to_string())?),
        Some(v) => return Err(invalid(format!("oomScoreAdj {v} out of -1000..=1000"))),
    };
    Ok(ProcessPlan {
        args: args
            .iter()
            .map(|a| cstring("argument", a))
            .collect::<Result<_, _>>()?,
        env: env
            .iter()
            .map(|e| cstring("env entry", e))
            .collect::<Result<_, _>>()?,
        exec_candidates,
        cwd: cstring("cwd", cwd)?,
        uid: user.uid,
        gid: user.gid,
        additional_gids: user.additional_gids.clone().unwrap_or_default(),
        umask: user.umask.unwrap_or(0o022) & 0o777,
        caps,
        no_new_privileges: p.no_new_privileges.unwrap_or(false),
        rlimits,
        oom_score_adj,
        terminal: p.terminal.unwrap_or(false),
        console_size: p
            .console_size
            .and_then(|b| Some((u16::try_from(b.height).ok()?, u16::try_from(b.width).ok()?))),
        seccomp: None,
    })
}

/// cgroup v2 writes for `linux.resources`, runc's conversions.
pub fn cgroup_writes(
    r: &Resources,
    ignored: &mut Vec<String>,
) -> Result<Vec<(String, String)>, SpecError> {
    fn limit(v: i64) -> String {
        if v < 0 {
            "max".into()
        } else {
            v.to_string()
        }
    }
    let mut w = Vec::new();
    if let Some(m) = &r.memory {
        if let Some(l) = m.limit {
            w.push(("memory.max".into(), limit(l)));
        }
        if let Some(l) = m.reservation {
            w.push(("memory.low".into(), limit(l)));
        }
        // OCI's swap is memory + swap; cgroup v2 limits swap alone.
        match (m.swap, m.limit) {
            (Some(s), _) if s < 0 => w.push(("memory.swap.max".into(), "max".into())),
            (Some(s), Some(l)) if l >= 0 => {
                if s < l {
                    return Err(invalid(format!(
                        "memory.swap {s} is less than memory.limit {l}"
                    )));
                }
                w.push(("memory.swap.max".into(), (s - l).to_string()));
            }
            (Some(_), _) => {
                return Err(invalid("memory.swap needs a memory.limit"));
            }
            (None, _) => {}
        }
        if m.kernel.is_some() || m.kernel_tcp.is_some() || m.swappiness.is_some() {
            ignored.push("linux.resources.memory.{kernel,kernelTCP,swappiness}".into());
        }
    }
    if let Some(p) = &r.pids {
        w.push(("pids.max".into(), limit(p.limit)));
    }
    if let Some(c) = &r.cpu {
        if let Some(shares) = c.shares {
            if shares > 0 {
                // runc: weight = 1 + (shares - 2) * 9999 / 262142.
                let s = shares.clamp(2, 262_144);
                w.push((
                    "cpu.weight".into(),
                    (1 + (s - 2) * 9999 / 262_142).to_string(),
                ));
            }
        }
        match (c.quota, c.period) {
            (None, None) => {}
            (q, p) => {
                let quota = match q {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".into(),
                };
                w.push((
                    "cpu.max".into(),
                    format!("{quota} {}", p.unwrap_or(100_000)),
                ));
            }
        }
        if let Some(cpus) = &c.cpus {
            w.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = &c.mems {
            w.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(u) = &r.unified {
        let mut keys: Vec<_> = u.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.contains('/') || k.starts_with('.') || k.is_empty() {
                return Err(invalid(format!("unified cgroup key {k:?}")));
            }
            w.push((k.clone(), v.clone()));
        }
    }
    for (present, name) in [
        (r.block_io.is_some(), "linux.resources.blockIO"),
        (
            r.hugepage_limits.is_some(),
            "linux.resources.hugepageLimits",
        ),
        (r.network.is_some(), "linux.resources.network"),
        (r.rdma.is_some(), "linux.resources.rdma"),
    ] {
        if present {
            ignored.push(name.into());
        }
    }
    for (k, v) in &w {
        if v.contains('\n') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!("cgroup value for {k} contains a newline")));
        }
    }
    Ok(w)
}

/// Default device nodes when /dev is a fresh tmpfs: (name, major, minor).
const DEFAULT_DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Default /dev symlinks: (target, name).
const DEFAULT_DEV_LINKS: [(&str, &str); 5] = [
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Parses `config.json`.
pub fn parse_spec(value: serde_json::Value) -> Result<Spec, SpecError> {
    serde_json::from_value(value).map_err(|source| SpecError::Json {
        what: "config.json",
        source,
    })
}

/// Annotation asking for a network namespace of the container's own
/// (value `private`); by default the container shares the VM's.
pub const NETNS_ANNOTATION: &str = "vessel.netns";

/// Builds the plan of a container's init; `rootfs` is the absolute guest
/// path of its root filesystem.
///
/// A `network` namespace in the spec is *shared with the VM* unless the
/// annotation [`NETNS_ANNOTATION`] is `private`: the VM is the network
/// sandbox (its NICs live in the guest's namespace, as in Kata), and a
/// fresh network namespace costs seconds of emulated kernel time on PVM
/// hosts while giving the container nothing but a loopback device.
pub fn init_plan(spec: &Spec, rootfs: &str) -> Result<InitPlan, SpecError> {
    if !rootfs.starts_with('/') {
        return Err(invalid(format!("rootfs {rootfs:?} is not absolute")));
    }
    let mut ignored = Vec::new();
    let process = spec
        .process
        .as_ref()
        .ok_or_else(|| invalid("config.json has no process"))?;
    let mut process = process_plan(process)?;
    let linux = spec
        .linux
        .as_ref()
        .ok_or_else(|| invalid("config.json has no linux section"))?;
    if let Some(profile) = &linux.seccomp {
        process.seccomp = Some(Arc::new(seccomp::compile(profile)?));
    }
    let private_netns = spec
        .annotations
        .as_ref()
        .and_then(|a| a.get(NETNS_ANNOTATION))
        .is_some_and(|v| v == "private");

    let mut clone_flags = 0u64;
    let mut cgroup_ns = false;
    let mut joins: Vec<(libc::c_int, CString)> = Vec::new();
    let mut seen = HashMap::new();
    for ns in linux.namespaces.iter().flatten() {
        let typ = ns.typ.as_str();
        if seen.insert(typ, ()).is_some() {
            return Err(invalid(format!("namespace {typ} listed twice")));
        }
        if let Some(p) = &ns.path {
            // Joined before the init is cloned, so the init itself is in
            // them (a pid namespace too: setns(CLONE_NEWPID) applies to
            // the children of the thread that made it).
            let flag = match typ {
                "ipc" => libc::CLONE_NEWIPC,
                "uts" => libc::CLONE_NEWUTS,
                "pid" => libc::CLONE_NEWPID,
                "network" => libc::CLONE_NEWNET,
                "cgroup" => libc::CLONE_NEWCGROUP,
                "mount" | "user" | "time" => {
                    return Err(SpecError::Unsupported(format!(
                        "joining the {typ} namespace at {p}"
                    )))
                }
                other => return Err(invalid(format!("unknown namespace type {other:?}"))),
            };
            if !p.starts_with('/') {
                return Err(invalid(format!(
                    "the path of the {typ} namespace {p:?} is not absolute"
                )));
            }
            joins.push((flag, cstring("namespace path", p)?));
            continue;
        }
        let flag = match typ {
            "mount" => libc::CLONE_NEWNS,
            "pid" => libc::CLONE_NEWPID,
            "uts" => libc::CLONE_NEWUTS,
            "ipc" => libc::CLONE_NEWIPC,
            "network" if private_netns => libc::CLONE_NEWNET,
            "network" => {
                ignored.push(format!(
                    "linux.namespaces network (shared with the VM; annotation {NETNS_ANNOTATION}=private for a new one)"
                ));
                0
            }
            "cgroup" => {
                cgroup_ns = true;
                0
            }
            "user" => libc::CLONE_NEWUSER,
            "time" => return Err(SpecError::Unsupported("time namespaces".into())),
            other => return Err(invalid(format!("unknown namespace type {other:?}"))),
        };
        clone_flags |= u64::try_from(flag).unwrap_or(0);
    }
    // Namespaces the container has, made or joined (what sysctls and the
    // host name need).
    let ns_flags = joins
        .iter()
        .fold(clone_flags, |f, (t, _)| f | u64::try_from(*t).unwrap_or(0));
    let joined_cgroup = joins.iter().any(|(t, _)| *t == libc::CLONE_NEWCGROUP);
    let userns = if clone_flags & libc::CLONE_NEWUSER as u64 != 0 {
        Some(UserNs {
            uid_map: id_map("uid", linux.uid_mappings.as_deref())?,
            gid_map: id_map("gid", linux.gid_mappings.as_deref())?,
        })
    } else {
        if linux.uid_mappings.as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings.as_ref().is_some_and(|m| !m.is_empty())
        {
            return Err(invalid(
                "uidMappings/gidMappings need a user namespace in linux.namespaces",
            ));
        }
        None
    };
    if userns.is_some() {
        let mapped = |map: &[IdMapping], id: u32| {
            map.iter().any(|m| {
                id >= m.container_id
                    && u64::from(id) < u64::from(m.container_id) + u64::from(m.size)
            })
        };
        let uids = linux.uid_mappings.as_deref().unwrap_or_default();
        let gids = linux.gid_mappings.as_deref().unwrap_or_default();
        if !mapped(uids, process.uid) {
            return Err(invalid(format!(
                "process.user.uid {} is not in linux.uidMappings",
                process.uid
            )));
        }
        for g in std::iter::once(&process.gid).chain(&process.additional_gids) {
            if !mapped(gids, *g) {
                return Err(invalid(format!(
                    "gid {g} of process.user is not in linux.gidMappings"
                )));
            }
        }
    }
    if clone_flags & libc::CLONE_NEWNS as u64 == 0 {
        return Err(SpecError::Unsupported(
            "containers without a mount namespace".into(),
        ));
    }
    let hostname = spec.hostname.as_deref().filter(|h| !h.is_empty());
    let domainname = spec.domainname.as_deref().filter(|h| !h.is_empty());
    if (hostname.is_some() || domainname.is_some()) && ns_flags & libc::CLONE_NEWUTS as u64 == 0 {
        return Err(invalid("hostname needs a uts namespace"));
    }
    for (name, v) in [("hostname", hostname), ("domainname", domainname)] {
        if v.is_some_and(|v| v.len() > 64) {
            return Err(invalid(format!("{name} is longer than 64 bytes")));
        }
    }

    let rootfs_propagation = match linux.rootfs_propagation.as_deref() {
        None | Some("") => libc::MS_PRIVATE | libc::MS_REC,
        Some(p) => {
            propagation_flags(p).ok_or_else(|| invalid(format!("rootfsPropagation {p:?}")))?
        }
    };

    let mut mounts = Vec::new();
    let mut dev_is_tmpfs = false;
    for m in spec.mounts.iter().flatten() {
        let dest = Path::new(&m.destination);
        let target = in_root(rootfs, dest)?;
        let options = m.options.clone().unwrap_or_default();
        let idmapped = m.uid_mappings.as_ref().is_some_and(|v| !v.is_empty())
            || m.gid_mappings.as_ref().is_some_and(|v| !v.is_empty())
            || options.iter().any(|o| o == "idmap" || o == "ridmap");
        if idmapped {
            // Ignoring it would give the container other owners than asked.
            return Err(SpecError::Unsupported(format!(
                "idmapped mount on {}",
                dest.display()
            )));
        }
        let (mut flags, propagation, data, unsupported) = parse_mount_options(&options);
        for u in unsupported {
            ignored.push(format!("mount option {u} on {}", dest.display()));
        }
        let mut typ = m.typ.clone().unwrap_or_default();
        let bind = flags & libc::MS_BIND != 0 || typ == "bind";
        let source = m
            .source
            .as_deref()
            .unwrap_or(if bind { "" } else { typ.as_str() })
            .to_string();
        if bind && !source.starts_with('/') {
            return Err(invalid(format!(
                "bind mount on {} needs an absolute guest source",
                dest.display()
            )));
        }
        if typ == "cgroup" {
            // Only the unified hierarchy exists in the guest.
            typ = "cgroup2".into();
        }
        if typ == "cgroup2" {
            // The container must find its own cgroup (memory.max,
            // pids.max) at the mount point, as runc arranges by binding its
            // cgroup directory there: a cgroup namespace rooted at the
            // container's cgroup gives exactly that, and hides the VM's
            // other cgroups.
            cgroup_ns = true;
        }
        if dest == Path::new("/dev") && typ == "tmpfs" {
            dev_is_tmpfs = true;
        }
        let (fstype, remount_flags) = if bind {
            flags |= libc::MS_BIND;
            let extra = flags & !(libc::MS_BIND | libc::MS_REC);
            (
                None,
                (extra != 0).then_some(extra | libc::MS_BIND | libc::MS_REMOUNT),
            )
        } else {
            if typ.is_empty() {
                return Err(invalid(format!("mount on {} has no type", dest.display())));
            }
            (Some(cstring("mount type", &typ)?), None)
        };
        let data = (!data.is_empty() && !bind)
            .then(|| cstring("mount options", &data.join(",")))
            .transpose()?;
        mounts.push(MountOp {
            source: cstring("mount source", &source)?,
            target: cstring("mount destination", &target)?,
            fstype,
            flags: if bind {
                flags & (libc::MS_BIND | libc::MS_REC)
            } else {
                flags
            },
            data,
            remount_flags,
            propagation,
            destination: dest.display().to_string(),
        });
    }

    let mut devices = Vec::new();
    let mut dev_symlinks = Vec::new();
    let root_prefix = rootfs.trim_end_matches('/');
    if dev_is_tmpfs {
        for (name, major, minor) in DEFAULT_DEVICES {
            devices.push(DeviceOp {
                path: cstring("device", &format!("{root_prefix}/dev/{name}"))?,
                guest_path: cstring("device", &format!("/dev/{name}"))?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(major, minor),
                uid: 0,
                gid: 0,
            });
        }
        for (target, name) in DEFAULT_DEV_LINKS {
            dev_symlinks.push((
                cstring("symlink", target)?,
                cstring("symlink", &format!("{root_prefix}/dev/{name}"))?,
            ));
        }
    }
    for d in linux.devices.iter().flatten() {
        let kind = match d.typ.as_str() {
            "c" | "u" => libc::S_IFCHR,
            "b" => libc::S_IFBLK,
            "p" => libc::S_IFIFO,
            other => return Err(invalid(format!("device {} type {other:?}", d.path))),
        };
        let (Ok(major), Ok(minor)) = (u32::try_from(d.major), u32::try_from(d.minor)) else {
            return Err(invalid(format!("device {} numbers", d.path)));
        };
        let path = in_root(rootfs, Path::new(&d.path))?;
        // A spec device replaces a default one of the same path.
        devices.retain(|x| x.path.as_bytes() != path.as_bytes());
        devices.push(DeviceOp {
            path: cstring("device", &path)?,
            guest_path: cstring("device", &in_root("/", Path::new(&d.path))?)?,
            mode: kind | (d.file_mode.unwrap_or(0o666) & 0o7777),
            dev: libc::makedev(major, minor),
            uid: d.uid.unwrap_or(0),
            gid: d.gid.unwrap_or(0),
        });
    }

    let paths = |list: &Option<Vec<String>>| -> Result<Vec<CString>, SpecError> {
        list.iter()
            .flatten()
            .map(|p| {
                let joined = in_root("/", Path::new(p))?;
                cstring("path", &joined)
            })
            .collect()
    };
    let mut sysctls = Vec::new();
    let mut vm_sysctls = Vec::new();
    let mut domainname = domainname.map(str::to_string);
    if let Some(s) = &linux.sysctl {
        let mut keys: Vec<_> = s.iter().collect();
        keys.sort();
        for (k, v) in keys {
            let (name, path) = sysctl_names(k);
            let normal = Path::new(&path)
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if name.split('.').any(str::is_empty) || !normal {
                return Err(invalid(format!("sysctl {k:?}")));
            }
            if v.contains('\0') {
                return Err(invalid(format!(
                    "sysctl {k:?}: the value contains a NUL byte"
                )));
            }
            match sysctl_target(&name, ns_flags, private_netns)? {
                SysctlTarget::Child => {
                    sysctls.push((cstring("sysctl", &path)?, cstring("sysctl value", v)?));
                }
                SysctlTarget::Vm if userns.is_some() && name == "net.ipv4.ping_group_range" => {
                    let gids = linux.gid_mappings.as_deref().unwrap_or_default();
                    vm_sysctls.push((path, guest_gid_range(v, gids)?));
                }
                SysctlTarget::Vm => vm_sysctls.push((path, v.clone())),
                SysctlTarget::Domainname => {
                    // What the kernel keeps of a write: up to a newline.
                    let d = v.split('\n').next().unwrap_or_default();
                    if d.len() > 64 {
                        return Err(invalid("sysctl kernel.domainname is longer than 64 bytes"));
                    }
                    domainname = Some(d.to_string());
                }
            }
        }
    }
    let cgroup_writes = match &linux.resources {
        Some(r) => cgroup_writes(r, &mut ignored)?,
        None => Vec::new(),
    };

    for (present, name) in [
        (spec.hooks.is_some(), "hooks"),
        (linux.cgroups_path.is_some(), "linux.cgroupsPath"),
        (
            linux
                .resources
                .as_ref()
                .is_some_and(|r| r.devices.is_some()),
            "linux.resources.devices",
        ),
        (linux.intel_rdt.is_some(), "linux.intelRdt"),
        (linux.personality.is_some(), "linux.personality"),
        (linux.mount_label.is_some(), "linux.mountLabel"),
    ] {
        if present {
            ignored.push(name.into());
        }
    }
    if let Some(p) = &spec.process {
        for (present, name) in [
            (p.apparmor_profile.is_some(), "process.apparmorProfile"),
            (p.selinux_label.is_some(), "process.selinuxLabel"),
            (p.scheduler.is_some(), "process.scheduler"),
            (p.io_priority.is_some(), "process.ioPriority"),
        ] {
            if present {
                ignored.push(name.into());
            }
        }
    }

    Ok(InitPlan {
        clone_flags,
        // A joined cgroup namespace is kept as it is.
        cgroup_ns: cgroup_ns && !joined_cgroup,
        joins,
        userns,
        rootfs: cstring("rootfs", rootfs)?,
        rootfs_propagation,
        mounts,
        devices,
        dev_symlinks,
        readonly_root: spec.root.as_ref().and_then(|r| r.readonly).unwrap_or(false),
        masked_paths: paths(&linux.masked_paths)?,
        readonly_paths: paths(&linux.readonly_paths)?,
        hostname: hostname.map(|h| cstring("hostname", h)).transpose()?,
        domainname: domainname.map(|h| cstring("domainname", &h)).transpose()?,
        sysctls,
        vm_sysctls,
        cgroup_writes,
        process,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "process": {
                "args": ["sh", "-c", "exit 3"],
                "env": ["PATH=/bin:/usr/bin", "A=b"],
                "cwd": "/tmp",
                "user": {"uid": 1, "gid": 2, "additionalGids": [3], "umask": 7},
                "capabilities": {
                    "bounding": ["CAP_KILL", "CAP_CHOWN"],
                    "effective": ["CAP_KILL"],
                    "permitted": ["CAP_KILL"]
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
                "noNewPrivileges": true
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/data", "type": "bind", "source": "/mnt/data",
                 "options": ["rbind", "ro", "rprivate"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                               {"type": "ipc"}, {"type": "network"}, {"type": "cgroup"}],
                "resources": {
                    "memory": {"limit": 8388608, "swap": 8388608},
                    "pids": {"limit": 32},
                    "cpu": {"shares": 1024, "quota": 50000, "period": 100000}
                },
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}
            }
        })
    }

    fn plan(v: serde_json::Value) -> Result<InitPlan, SpecError> {
        init_plan(&parse_spec(v)?, "/run/c/rootfs")
    }

    #[test]
    fn a_full_spec_becomes_a_plan() {
        let p = plan(base()).unwrap();
        let ns = (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
            as u64;
        assert_eq!(p.clone_flags, ns);
        assert!(p.cgroup_ns);
        assert!(p.readonly_root);
        assert_eq!(p.hostname.as_deref(), Some(c"box"));
        assert_eq!(p.mounts.len(), 4);
        let dev = &p.mounts[1];
        assert_eq!(dev.target.as_c_str(), c"/run/c/rootfs/dev");
        assert_eq!(dev.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(dev.data.as_deref(), Some(c"mode=755,size=65536k"));
        let bind = &p.mounts[2];
        assert_eq!(bind.fstype, None);
        assert_eq!(bind.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(
            bind.remount_flags,
            Some(libc::MS_RDONLY | libc::MS_BIND | libc::MS_REMOUNT)
        );
        assert_eq!(bind.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(p.mounts[3].fstype.as_deref(), Some(c"cgroup2"));
        // /dev is a tmpfs: default devices and links are made.
        assert_eq!(p.devices.len(), 6);
        assert_eq!(p.devices[0].path.as_c_str(), c"/run/c/rootfs/dev/null");
        assert_eq!(p.dev_symlinks.len(), 5);
        assert_eq!(p.masked_paths, vec![c"/proc/kcore".to_owned()]);
        assert_eq!(
            p.cgroup_writes,
            vec![
                ("memory.max".to_string(), "8388608".to_string()),
                ("memory.swap.max".into(), "0".into()),
                ("pids.max".into(), "32".into()),
                ("cpu.weight".into(), "39".into()),
                ("cpu.max".into(), "50000 100000".into()),
            ]
        );
        assert_eq!(p.ignored.len(), 1, "{:?}", p.ignored);
        assert!(p.ignored[0].starts_with("linux.namespaces network (shared"));
        // seccomp is compiled (an allow-all profile: arch checks + ret).
        assert!(p
            .process
            .seccomp
            .as_ref()
            .is_some_and(|f| f.program().len() < 10));
        // With the annotation, a network namespace of its own.
        let mut v = base();
        v["annotations"] = json!({NETNS_ANNOTATION: "private"});
        let p = plan(v).unwrap();
        assert_eq!(p.clone_flags, ns | libc::CLONE_NEWNET as u64);
        let pr = &p.process;
        assert_eq!(
            pr.exec_candidates,
            vec![c"/bin/sh".to_owned(), c"/usr/bin/sh".to_owned()]
        );
        assert_eq!((pr.uid, pr.gid, pr.umask), (1, 2, 7));
        assert_eq!(pr.additional_gids, vec![3]);
        let caps = pr.caps.unwrap();
        assert_eq!(caps.bounding, (1 << 5) | 1);
        assert_eq!(caps.effective, 1 << 5);
        assert_eq!(caps.ambient, 0);
        assert!(pr.no_new_privileges);
        assert_eq!(pr.rlimits.len(), 1);
        assert_eq!(pr.rlimits[0].1.rlim_cur, 512);
    }

    /// A patch with a user namespace, `uid_map` as given and a wide gid map.
    #[test]
    fn a_cgroup_mount_shows_the_container_its_own_cgroup() {
        // podman and docker on cgroup v1 hosts ask for no cgroup namespace
        // but mount cgroup at /sys/fs/cgroup: the container still gets one,
        // so memory.max and pids.max are its own.
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]);
        assert!(plan(v.clone()).unwrap().cgroup_ns);
        v["mounts"].as_array_mut().unwrap().pop();
        assert!(!plan(v).unwrap().cgroup_ns);
    }

    fn userns(uid_map: serde_json::Value) -> serde_json::Value {
        json!({"linux": {
            "namespaces": [{"type": "mount"}, {"type": "user"}, {"type": "uts"}],
            "uidMappings": uid_map,
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
        }})
    }

    #[test]
    fn namespace_paths_are_joined() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([
            {"type": "pid", "path": "/proc/7/ns/pid"}, {"type": "mount"},
            {"type": "uts", "path": "/proc/7/ns/uts"}, {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "network", "path": "/proc/7/ns/net"},
            {"type": "cgroup", "path": "/proc/7/ns/cgroup"}
        ]);
        v["linux"]["sysctl"] = json!({"kernel.shmmax": "1000"});
        let p = plan(v).unwrap();
        // Only the mount namespace is new; the others are joined in order.
        assert_eq!(p.clone_flags, libc::CLONE_NEWNS as u64);
        let types: Vec<_> = p.joins.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            types,
            [
                libc::CLONE_NEWPID,
                libc::CLONE_NEWUTS,
                libc::CLONE_NEWIPC,
                libc::CLONE_NEWNET,
                libc::CLONE_NEWCGROUP
            ]
        );
        assert_eq!(p.joins[2].1.as_c_str(), c"/proc/7/ns/ipc");
        // A joined cgroup namespace is not replaced by a new one, even with
        // a cgroup mount; the hostname and ipc sysctls go to the joined ones.
        assert!(!p.cgroup_ns);
        assert_eq!(p.hostname.as_deref(), Some(c"box"));
        assert_eq!(p.sysctls.len(), 1);
        assert!(p.ignored.is_empty(), "{:?}", p.ignored);
    }

    #[test]
    fn a_user_namespace_becomes_id_maps() {
        let mut v = base();
        merge(
            &mut v,
            &json!({"linux": {
                "namespaces": [{"type": "mount"}, {"type": "user"}, {"type": "uts"}],
                "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 1},
                                {"containerID": 1, "hostID": 200001, "size": 65535}],
                "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
            }}),
        );
        let p = plan(v).unwrap();
        assert_ne!(p.clone_flags & libc::CLONE_NEWUSER as u64, 0);
        assert_eq!(
            p.userns,
            Some(UserNs {
                uid_map: "0 100000 1\n1 200001 65535\n".into(),
                gid_map: "0 100000 65536\n".into(),
            })
        );
        // Devices keep the guest's path for binding.
        assert!(p
            .devices
            .iter()
            .all(|d| d.guest_path.to_bytes().starts_with(b"/dev/")));
        assert!(plan(base()).unwrap().userns.is_none());
        // ping_group_range names the container's gids: the agent writes
        // the guest's.
        let mut v = base();
        merge(
            &mut v,
            &userns(json!([{"containerID": 0, "hostID": 100000, "size": 65536}])),
        );
        v["process"]["user"] = json!({"uid": 0, "gid": 0});
        v["linux"]["sysctl"] = json!({"net.ipv4.ping_group_range": "0\t10"});
        assert_eq!(
            plan(v.clone()).unwrap().vm_sysctls,
            vec![(
                "/proc/sys/net/ipv4/ping_group_range".to_string(),
                "100000 100010".to_string()
            )]
        );
        v["linux"]["sysctl"] = json!({"net.ipv4.ping_group_range": "0 2147483647"});
        let e = plan(v).unwrap_err().to_string();
        assert!(
            e.contains("gid 2147483647 is not in linux.gidMappings"),
            "{e}"
        );
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("args", json!({"process": {"args": [], "cwd": "/"}})),
            ("cwd", json!({"process": {"args": ["a"], "cwd": "rel"}})),
            (
                "env",
                json!({"process": {"args": ["a"], "cwd": "/", "env": ["NOEQUALS"]}}),
            ),
            (
                "destination",
                json!({"mounts": [{"destination": "rel", "type": "tmpfs"}]}),
            ),
            (
                "'..'",
                json!({"mounts": [{"destination": "/a/../../etc", "type": "tmpfs"}]}),
            ),
            (
                "absolute guest source",
                json!({"mounts": [{"destination": "/a", "type": "bind", "source": "rel"}]}),
            ),
            (
                "needs linux.uidMappings",
                json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "user"}]}}),
            ),
            (
                "need a user namespace",
                json!({"linux": {"namespaces": [{"type": "mount"}],
                    "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 10}]}}),
            ),
            (
                "uidMappings[0] has size 0",
                userns(json!([{"containerID": 0, "hostID": 1000, "size": 0}])),
            ),
            (
                "runs past the largest uid",
                userns(json!([{"containerID": 0, "hostID": 4294967295u32, "size": 2}])),
            ),
            (
                "uidMappings[1] overlaps linux.uidMappings[0]",
                userns(json!([{"containerID": 0, "hostID": 1000, "size": 10},
                              {"containerID": 100, "hostID": 1005, "size": 10}])),
            ),
            (
                "idmapped mount on /data",
                json!({"mounts": [{"destination": "/data", "type": "bind", "source": "/d",
                    "options": ["rbind"],
                    "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}]}),
            ),
            (
                "does not map uid 0",
                userns(json!([{"containerID": 1, "hostID": 1000, "size": 10}])),
            ),
            (
                "process.user.uid 1 is not in",
                userns(json!([{"containerID": 0, "hostID": 1000, "size": 1}])),
            ),
            (
                "mount namespace",
                json!({"linux": {"namespaces": [{"type": "pid"}]}}),
            ),
            (
                "linux.seccomp: syscalls[0]: argument index 7 out of 0..=5",
                json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_KILL",
                     "args": [{"index": 7, "value": 0, "op": "SCMP_CMP_EQ"}]}]}}}),
            ),
            (
                "unknown variant `SCMP_CMP_XX`",
                json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                    {"names": ["read"], "action": "SCMP_ACT_KILL",
                     "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_XX"}]}]}}}),
            ),
            (
                "joining the mount namespace at /proc/1/ns/mnt",
                json!({"linux": {"namespaces": [{"type": "mount", "path": "/proc/1/ns/mnt"}]}}),
            ),
            (
                "joining the user namespace",
                json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "user", "path": "/proc/1/ns/user"}]}}),
            ),
            (
                "is not absolute",
                json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "ipc", "path": "ns/ipc"}]}}),
            ),
            (
                "twice",
                json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "mount"}]}}),
            ),
            (
                "soft",
                json!({"process": {"args": ["a"], "cwd": "/", "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}}),
            ),
            (
                "swap",
                json!({"linux": {"resources": {"memory": {"limit": 100, "swap": 50}}}}),
            ),
            (
                "\"kernel.sem\" needs an ipc namespace",
                json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "uts"}],
                    "sysctl": {"kernel.sem": "250 32000 32 128"}}}),
            ),
            (
                "\"kernel.domainname\" is not in a separate kernel namespace",
                json!({"hostname": "", "linux": {"namespaces": [{"type": "mount"}],
                    "sysctl": {"kernel.domainname": "x"}}}),
            ),
            (
                "conflicts with the hostname field",
                json!({"linux": {"sysctl": {"kernel.hostname": "x"}}}),
            ),
            (
                "\"vm.overcommit_memory\" is not in a separate",
                json!({"linux": {"sysctl": {"vm.overcommit_memory": "1"}}}),
            ),
            (
                "\"kernel.core_pattern\" is not in a separate",
                json!({"linux": {"sysctl": {"kernel/core_pattern": "|/x"}}}),
            ),
            // Named net.*, but a path out of /proc/sys/net.
            (
                "sysctl \"net/../kernel/core_pattern\"",
                json!({"linux": {"sysctl": {"net/../kernel/core_pattern": "|/x"}}}),
            ),
            (
                "sysctl \"net.//.kernel.core_pattern\"",
                json!({"linux": {"sysctl": {"net.//.kernel.core_pattern": "|/x"}}}),
            ),
            (
                "sysctl \"net..x\"",
                json!({"linux": {"sysctl": {"net..x": "1"}}}),
            ),
            (
                "unknown capability CAP_NOPE",
                json!({"process": {"args": ["a"], "cwd": "/", "capabilities": {"bounding": ["CAP_NOPE"]}}}),
            ),
        ];
        for (needle, patch) in cases {
            let mut v = base();
            merge(&mut v, &patch);
            let e = match plan(v) {
                Err(e) => e,
                Ok(_) => panic!("{needle}: accepted"),
            };
            let msg = format!(
                "{e} {:?}",
                std::error::Error::source(&e).map(|s| s.to_string())
            );
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        assert!(matches!(plan(json!("x")), Err(SpecError::Json { .. })));
        assert!(plan(json!({"ociVersion": "1"})).is_err());
    }

    /// Replaces top-level keys (and the keys of `process`/`linux` one
    /// level down) of `v` with those of `patch`.
    fn merge(v: &mut serde_json::Value, patch: &serde_json::Value) {
        for (k, pv) in patch.as_object().unwrap() {
            match (v.get_mut(k), pv) {
                (Some(serde_json::Value::Object(o)), serde_json::Value::Object(po))
                    if k == "process" || k == "linux" =>
                {
                    for (k2, v2) in po {
                        o.insert(k2.clone(), v2.clone());
                    }
                }
                _ => {
                    v[k] = pv.clone();
                }
            }
        }
    }

    #[test]
    fn mount_options_follow_runc() {
        let o =
            |s: &[&str]| parse_mount_options(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&["ro", "rw"]).0, 0);
        assert_eq!(
            o(&["nosuid", "nodev", "noexec"]).0,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
        );
        assert_eq!(o(&["rslave"]).1, libc::MS_SLAVE | libc::MS_REC);
        assert_eq!(o(&["mode=1777", "size=1m"]).2, vec!["mode=1777", "size=1m"]);
        assert_eq!(o(&["tmpcopyup"]).3, vec!["tmpcopyup"]);
    }

    /// The default sysctls of podman (`ping_group_range`) and docker
    /// (`ip_unprivileged_port_start`) and the IPC and UTS ones: who writes
    /// each, where, and before what.
    #[test]
    fn sysctls_are_written_before_anything_is_read_only() {
        let at = |f: Finish| AFTER_PIVOT.iter().position(|x| *x == f).unwrap();
        for later in [
            Finish::ReadonlyPaths,
            Finish::MaskedPaths,
            Finish::ReadonlyRoot,
        ] {
            assert!(at(Finish::Sysctls) < at(later), "{later:?}");
        }
        // runc: a kernel.domainname sysctl overrides the domainname field.
        assert!(at(Finish::Domainname) < at(Finish::Sysctls));
        assert_eq!(at(Finish::ReadonlyRoot), AFTER_PIVOT.len() - 1);

        let mut v = base();
        v["domainname"] = json!("field.example");
        v["linux"]["sysctl"] = json!({
            "net.ipv4.ping_group_range": "0 2147483647",
            "net.ipv4.ip_unprivileged_port_start": "0",
            "net/ipv4/conf/eth0.100/rp_filter": "1",
            "kernel.shm_rmid_forced": "1",
            "fs.mqueue.msg_max": "20",
            "kernel.domainname": "sysctl.example\n",
        });
        let p = plan(v.clone()).unwrap();
        assert_eq!(
            p.sysctls,
            vec![
                (c"/proc/sys/fs/mqueue/msg_max".to_owned(), c"20".to_owned()),
                (
                    c"/proc/sys/kernel/shm_rmid_forced".to_owned(),
                    c"1".to_owned()
                ),
            ]
        );
        let vm = |p: &str, v: &str| (p.to_string(), v.to_string());
        assert_eq!(
            p.vm_sysctls,
            vec![
                vm("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
                vm("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
                vm("/proc/sys/net/ipv4/conf/eth0.100/rp_filter", "1"),
            ]
        );
        assert_eq!(p.domainname.as_deref(), Some(c"sysctl.example"));
        // A network namespace of the container's own: the child writes
        // net.* there.
        v["annotations"] = json!({NETNS_ANNOTATION: "private"});
        let p = plan(v).unwrap();
        assert!(p.vm_sysctls.is_empty());
        assert_eq!(p.sysctls.len(), 5);
        assert_eq!(
            p.sysctls[2],
            (
                c"/proc/sys/net/ipv4/ip_unprivileged_port_start".to_owned(),
                c"0".to_owned()
            )
        );
        // Without a network namespace in the spec (host network): the VM's.
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}]);
        v["linux"]["sysctl"] = json!({"net.ipv4.ping_group_range": "0 0"});
        assert_eq!(plan(v).unwrap().vm_sysctls.len(), 1);
    }

    /// runtime-tools' propagation mounts: no type (or "none") and bind or
    /// rbind in the options is a bind mount; tmpfs options are dropped and
    /// the propagation is applied after the remount with the flags.
    #[test]
    fn binds_without_a_type_keep_their_propagation() {
        let mut v = base();
        v["mounts"] = json!([
            {"destination": "/mnt/etc-shared", "type": "", "source": "/g/0",
             "options": ["nosuid", "strictatime", "mode=755", "size=1k", "bind", "shared"]},
            {"destination": "/mnt/etc-rslave", "type": "none", "source": "/g/1",
             "options": ["rbind", "rslave"]},
            {"destination": "/mnt/etc-private", "source": "/g/2",
             "options": ["bind", "private"]},
        ]);
        v["linux"]["rootfsPropagation"] = json!("rshared");
        let p = plan(v).unwrap();
        assert_eq!(p.rootfs_propagation, libc::MS_SHARED | libc::MS_REC);
        let [shared, rslave, private] = &p.mounts[..] else {
            panic!("{:?}", p.mounts)
        };
        assert_eq!(shared.fstype, None);
        assert_eq!(shared.source.as_c_str(), c"/g/0");
        assert_eq!(shared.flags, libc::MS_BIND);
        assert_eq!(shared.data, None);
        assert_eq!(
            shared.remount_flags,
            Some(libc::MS_NOSUID | libc::MS_STRICTATIME | libc::MS_BIND | libc::MS_REMOUNT)
        );
        assert_eq!(shared.propagation, libc::MS_SHARED);
        assert_eq!(rslave.fstype, None);
        assert_eq!(rslave.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(rslave.remount_flags, None);
        assert_eq!(rslave.propagation, libc::MS_SLAVE | libc::MS_REC);
        assert_eq!(private.propagation, libc::MS_PRIVATE);
        assert!(
            p.ignored.iter().all(|i| !i.contains("mount")),
            "{:?}",
            p.ignored
        );
    }

    #[test]
    fn capability_names_map_to_numbers() {
        assert_eq!(cap_number("CAP_CHOWN"), Some(0));
        assert_eq!(cap_number("SYS_ADMIN"), Some(21));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(CAP_LAST));
        assert_eq!(cap_number("CAP_NOPE"), None);
        // oci-spec's names all map.
        let all: serde_json::Value = json!(CAP_NAMES
            .iter()
            .map(|n| format!("CAP_{n}"))
            .collect::<Vec<_>>());
        let p =
            parse_process(json!({"args": ["a"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "capabilities": {"bounding": all}}))
                .unwrap();
        let caps = process_plan(&p).unwrap().caps.unwrap();
        assert_eq!(caps.bounding, (1u64 << (CAP_LAST + 1)) - 1);
    }

    #[test]
    fn exec_process_without_path_uses_the_default() {
        let p = parse_process(json!({"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
            .unwrap();
        let plan = process_plan(&p).unwrap();
        assert_eq!(plan.exec_candidates.len(), DEFAULT_PATH.split(':').count());
        assert_eq!(plan.exec_candidates[5].as_c_str(), c"/bin/ls");
        assert_eq!(plan.umask, 0o022);
        assert!(plan.caps.is_none());
        let p = parse_process(json!({"args": ["./x"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
            .unwrap();
        assert_eq!(
            process_plan(&p).unwrap().exec_candidates,
            vec![c"./x".to_owned()]
        );
    }
}

//! The subset of the OCI runtime spec (`config.json`) the agent reads, as
//! plain serde types.
//!
//! Not the `oci-spec` crate: its `Process` pulls in the `regex` engine
//! (for `execCPUAffinity`), which made the static agent 2.9 MB instead of
//! 0.6 MB, and the agent is unpacked from the initramfs by an emulated
//! guest kernel on some hosts. Field names follow the spec (camelCase);
//! fields the agent does not apply but must not ignore silently are kept
//! as raw JSON so that they can be reported; other unknown fields are
//! ignored, as the spec asks.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

/// `config.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `root`.
    pub root: Option<Root>,
    /// `mounts`.
    pub mounts: Option<Vec<Mount>>,
    /// `process`.
    pub process: Option<Process>,
    /// `hostname`.
    pub hostname: Option<String>,
    /// `domainname`.
    pub domainname: Option<String>,
    /// `hooks` (not run).
    pub hooks: Option<Value>,
    /// `annotations`.
    pub annotations: Option<HashMap<String, String>>,
    /// `linux`.
    pub linux: Option<Linux>,
}

/// `root`.
#[derive(Debug, Default, Deserialize)]
pub struct Root {
    // `path` is on the host: the host maps it to a share and names it in
    // `CreateContainer.rootfs`.
    /// Read-only root.
    pub readonly: Option<bool>,
}

/// One entry of `mounts`.
#[derive(Debug, Deserialize)]
pub struct Mount {
    /// Absolute path in the container.
    pub destination: String,
    /// Filesystem type.
    #[serde(rename = "type")]
    pub typ: Option<String>,
    /// Source (a guest path for bind mounts).
    pub source: Option<String>,
    /// Options (flags and filesystem data).
    pub options: Option<Vec<String>>,
    /// An idmapped mount's uid ranges (refused).
    #[serde(rename = "uidMappings")]
    pub uid_mappings: Option<Vec<IdMapping>>,
    /// An idmapped mount's gid ranges (refused).
    #[serde(rename = "gidMappings")]
    pub gid_mappings: Option<Vec<IdMapping>>,
}

/// `process` (also the body of an exec).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Run on a pty.
    pub terminal: Option<bool>,
    /// Initial pty size.
    pub console_size: Option<ConsoleSize>,
    /// User.
    #[serde(default)]
    pub user: User,
    /// argv.
    pub args: Option<Vec<String>>,
    /// Environment (`NAME=value`).
    pub env: Option<Vec<String>>,
    /// Working directory (absolute).
    pub cwd: String,
    /// Capability sets.
    pub capabilities: Option<Capabilities>,
    /// Resource limits.
    pub rlimits: Option<Vec<Rlimit>>,
    /// `prctl(PR_SET_NO_NEW_PRIVS)`.
    pub no_new_privileges: Option<bool>,
    /// /proc/self/oom_score_adj.
    pub oom_score_adj: Option<i32>,
    /// Not applied.
    pub apparmor_profile: Option<Value>,
    /// Not applied.
    pub selinux_label: Option<Value>,
    /// Not applied.
    pub scheduler: Option<Value>,
    /// Not applied.
    pub io_priority: Option<Value>,
}

/// `process.consoleSize`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct ConsoleSize {
    /// Rows.
    #[serde(default)]
    pub height: u64,
    /// Columns.
    #[serde(default)]
    pub width: u64,
}

/// `process.user`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// uid.
    #[serde(default)]
    pub uid: u32,
    /// gid.
    #[serde(default)]
    pub gid: u32,
    /// umask.
    pub umask: Option<u32>,
    /// Supplementary groups.
    pub additional_gids: Option<Vec<u32>>,
    /// Windows only; refused.
    pub username: Option<String>,
}

/// `process.capabilities`: capability names (`CAP_*`) per set.
#[derive(Debug, Default, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Option<Vec<String>>,
    /// Effective set.
    pub effective: Option<Vec<String>>,
    /// Inheritable set.
    pub inheritable: Option<Vec<String>>,
    /// Permitted set.
    pub permitted: Option<Vec<String>>,
    /// Ambient set.
    pub ambient: Option<Vec<String>>,
}

/// One entry of `process.rlimits`.
#[derive(Debug, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_*`.
    #[serde(rename = "type")]
    pub typ: String,
    /// Hard limit.
    #[serde(default)]
    pub hard: u64,
    /// Soft limit.
    #[serde(default)]
    pub soft: u64,
}

/// `linux`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    /// Namespaces.
    pub namespaces: Option<Vec<Namespace>>,
    /// cgroup limits.
    pub resources: Option<Resources>,
    /// Not applied (containers live in /sys/fs/cgroup/vessel/<id>).
    pub cgroups_path: Option<Value>,
    /// Device nodes.
    pub devices: Option<Vec<Device>>,
    /// Not applied yet.
    pub seccomp: Option<Value>,
    /// Propagation of the container's mount tree.
    pub rootfs_propagation: Option<String>,
    /// Paths hidden from the container.
    pub masked_paths: Option<Vec<String>>,
    /// Paths made read-only.
    pub readonly_paths: Option<Vec<String>>,
    /// Not applied.
    pub mount_label: Option<Value>,
    /// Not applied.
    pub intel_rdt: Option<Value>,
    /// Not applied.
    pub personality: Option<Value>,
    /// sysctls (name -> value).
    pub sysctl: Option<HashMap<String, String>>,
    /// User namespace: container uid ranges and the guest uids they map to.
    pub uid_mappings: Option<Vec<IdMapping>>,
    /// User namespace: container gid ranges and the guest gids they map to.
    pub gid_mappings: Option<Vec<IdMapping>>,
}

/// One range of `linux.uidMappings` / `linux.gidMappings`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdMapping {
    /// First id inside the container.
    #[serde(rename = "containerID")]
    pub container_id: u32,
    /// First id outside (in the guest, which sees the host's ids through
    /// virtio-fs).
    #[serde(rename = "hostID")]
    pub host_id: u32,
    /// Number of ids.
    pub size: u32,
}

/// One entry of `linux.namespaces`.
#[derive(Debug, Deserialize)]
pub struct Namespace {
    /// pid, network, mount, ipc, uts, user, cgroup, time.
    #[serde(rename = "type")]
    pub typ: String,
    /// Join this namespace instead of creating one: a guest path (the
    /// host translates a pod container's paths to its sandbox's
    /// `/proc/<guest pid>/ns/<type>`); ipc, uts, pid, network and cgroup.
    pub path: Option<String>,
}

/// One entry of `linux.devices`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Path in the container.
    pub path: String,
    /// c, b, u or p.
    #[serde(rename = "type")]
    pub typ: String,
    /// Major number.
    #[serde(default)]
    pub major: i64,
    /// Minor number.
    #[serde(default)]
    pub minor: i64,
    /// Permission bits.
    pub file_mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
}

/// `linux.resources`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Memory.
    pub memory: Option<Memory>,
    /// CPU.
    pub cpu: Option<Cpu>,
    /// Pids.
    pub pids: Option<Pids>,
    /// Raw cgroup v2 files.
    pub unified: Option<HashMap<String, String>>,
    /// Device cgroup rules (not applied: no eBPF device filter yet).
    pub devices: Option<Value>,
    /// Not applied.
    #[serde(rename = "blockIO")]
    pub block_io: Option<Value>,
    /// Not applied.
    pub hugepage_limits: Option<Value>,
    /// Not applied.
    pub network: Option<Value>,
    /// Not applied.
    pub rdma: Option<Value>,
}

/// `linux.resources.memory`.
#[derive(Debug, Default, Deserialize)]
pub struct Memory {
    /// memory.max.
    pub limit: Option<i64>,
    /// memory.low.
    pub reservation: Option<i64>,
    /// Memory + swap.
    pub swap: Option<i64>,
    /// cgroup v1 only.
    pub kernel: Option<i64>,
    /// cgroup v1 only.
    #[serde(rename = "kernelTCP")]
    pub kernel_tcp: Option<i64>,
    /// cgroup v1 only.
    pub swappiness: Option<u64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Default, Deserialize)]
pub struct Cpu {
    /// cpu.weight (converted).
    pub shares: Option<u64>,
    /// cpu.max quota.
    pub quota: Option<i64>,
    /// cpu.max period.
    pub period: Option<u64>,
    /// cpuset.cpus.
    pub cpus: Option<String>,
    /// cpuset.mems.
    pub mems: Option<String>,
}

/// `linux.resources.pids`.
#[derive(Debug, Default, Deserialize)]
pub struct Pids {
    /// pids.max (negative: no limit).
    #[serde(default)]
    pub limit: i64,
}

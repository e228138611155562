//! `vessel features`: the OCI runtime features document
//! (runtime-spec `features.md`), printed without starting a VM.
//!
//! The data lives here, in the host binary, and not in `vessel-proto`:
//! only the CLI prints it, it must not need a sandbox, and the protocol
//! crate is linked into the static guest agent, which should not carry
//! host-only tables. It describes what the agent applies (see
//! `agent/CONTAINERS.md`); keep the two in step.

use serde_json::{json, Value};

/// Oldest `ociVersion` accepted.
const OCI_VERSION_MIN: &str = "1.0.0";

/// Mount options the agent applies (flags, propagation) — others are
/// passed to the file system as data, except the recursive and id-mapped
/// ones, which are reported as ignored.
const MOUNT_OPTIONS: [&str; 31] = [
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

/// Capabilities by number (0..=40, CAP_CHECKPOINT_RESTORE last).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The features document.
pub fn document() -> Value {
    json!({
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": vessel_shim::state::OCI_VERSION,
        // Run on the host (see shim/src/hooks.rs); createContainer and
        // startContainer would run inside the VM and are refused.
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": &MOUNT_OPTIONS[..],
        "linux": {
            // time namespaces are refused.
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": &CAPABILITIES[..],
            "cgroup": {
                "v1": false,
                "v2": true,
                "systemd": false,
                "systemdUser": false,
                "rdma": false
            },
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW",
                    "SCMP_ACT_ERRNO",
                    "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE",
                    "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ",
                    "SCMP_CMP_GE",
                    "SCMP_CMP_GT",
                    "SCMP_CMP_LE",
                    "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ",
                    "SCMP_CMP_NE"
                ],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}}
        },
        "annotations": {
            "vessel.version": env!("CARGO_PKG_VERSION"),
            "vessel.netns": "shared (default) | private: a network namespace of its own in the guest"
        }
    })
}

/// `vessel features`.
pub fn features() -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&document())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_the_spec_fields() {
        let d = document();
        assert_eq!(d["ociVersionMax"], vessel_shim::state::OCI_VERSION);
        assert_eq!(d["linux"]["cgroup"]["v1"], false);
        assert_eq!(d["linux"]["cgroup"]["v2"], true);
        let actions = d["linux"]["seccomp"]["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 8);
        assert!(!actions.iter().any(|a| a == "SCMP_ACT_NOTIFY"));
        assert_eq!(
            d["linux"]["seccomp"]["operators"].as_array().unwrap().len(),
            7
        );
        assert_eq!(d["linux"]["capabilities"][40], "CAP_CHECKPOINT_RESTORE");
        let ns = d["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().any(|n| n == "user"));
        assert!(!ns.iter().any(|n| n == "time"));
    }
}

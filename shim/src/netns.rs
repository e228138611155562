//! Namespaces that a bundle asks to *join* by path (`linux.namespaces[].path`).
//!
//! Such a path names a namespace of the host, which a process in the guest
//! cannot enter. One of them has a meaning for a VM all the same: podman,
//! CNI and Kubernetes hand the runtime a network namespace they have set up
//! (`/run/netns/...`) and expect the container's traffic to go through it.
//! As in Kata, the VM is the container's network sandbox: the sandbox's
//! monitor joins that network namespace and its VMM inherits it (a spec
//! that asks for a network namespace without a path gets a new one
//! instead, [`unshare`]), so the host side of the VM's networking lives
//! where the engine set things up (and where hooks find it),
//! and the spec the agent sees asks for the VM's network namespace (no
//! path). Every other type given with a path is refused with a reason
//! before anything starts: a pid, ipc, uts, mount or user namespace of the
//! host cannot be shared with a process in another kernel.
//!
//! [`crate::network`] then wires the interfaces the engine put in that
//! namespace into the VM.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, Linux 4.11).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Errors with namespace paths.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A namespace other than network given with a path.
    #[error(
        "config.json: linux.namespaces: joining the host's {typ} namespace at {path} is not \
         possible: the container runs in its own VM (only a network namespace can be given \
         by path; the VM is started in it)"
    )]
    Unsupported {
        /// Namespace type.
        typ: String,
        /// The path given.
        path: String,
    },
    /// The path cannot be opened.
    #[error("network namespace {}: {source}", path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a network namespace.
    #[error("{} is not a network namespace", path.display())]
    NotNetns {
        /// The path given.
        path: PathBuf,
    },
}

/// Takes the network namespace path out of `spec` (the entry stays, without
/// its path: the container shares the VM's network namespace) and opens it;
/// refuses every other namespace given by path.
pub fn take(spec: &mut Value) -> Result<Option<OwnedFd>, NetnsError> {
    let Some(list) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    else {
        return Ok(None);
    };
    let mut found = None;
    for ns in list.iter_mut() {
        let Some(path) = ns
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let typ = ns.get("type").and_then(Value::as_str).unwrap_or_default();
        if typ != "network" {
            return Err(NetnsError::Unsupported {
                typ: typ.into(),
                path: path.into(),
            });
        }
        found = Some(open(Path::new(path))?);
        if let Some(o) = ns.as_object_mut() {
            o.remove("path");
        }
    }
    Ok(found)
}

/// Opens `path` and checks that it is a network namespace.
fn open(path: &Path) -> Result<OwnedFd, NetnsError> {
    let file = std::fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.into(),
        source,
    })?;
    // SAFETY: an ioctl without argument on a descriptor we own.
    let typ = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if typ != libc::CLONE_NEWNET {
        return Err(NetnsError::NotNetns { path: path.into() });
    }
    Ok(OwnedFd::from(file))
}

/// Whether `spec` asks for a network namespace of its own (an entry
/// without a path).
pub fn wanted(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|l| {
            l.iter()
                .any(|ns| ns["type"] == "network" && ns["path"].as_str().is_none_or(str::is_empty))
        })
}

/// Moves the calling thread (and what it starts later) into a new network
/// namespace.
pub fn unshare() -> std::io::Result<()> {
    // SAFETY: unshare(2) with a flag; no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread (and what it starts later) into the network
/// namespace `fd` (one system call).
pub fn enter(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor the parent keeps open until exec.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn network_path_is_taken_and_others_refused() {
        // Our own network namespace stands in for an engine's.
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/proc/self/ns/net"}
        ]}});
        let fd = take(&mut spec).unwrap();
        assert!(fd.is_some());
        assert_eq!(
            spec["linux"]["namespaces"][1],
            json!({"type": "network"}),
            "the agent gets the entry without its path"
        );
        assert!(
            take(&mut json!({"linux": {"namespaces": [{"type": "pid"}]}}))
                .unwrap()
                .is_none()
        );

        let e = take(&mut json!({"linux": {"namespaces": [
            {"type": "ipc", "path": "/proc/self/ns/ipc"}
        ]}}))
        .unwrap_err();
        assert!(e.to_string().contains("host's ipc namespace"), "{e}");
        let e = take(&mut json!({"linux": {"namespaces": [
            {"type": "network", "path": "/proc/self/ns/uts"}
        ]}}))
        .unwrap_err();
        assert!(matches!(e, NetnsError::NotNetns { .. }), "{e}");
        let e = take(&mut json!({"linux": {"namespaces": [
            {"type": "network", "path": "/nonexistent/netns"}
        ]}}))
        .unwrap_err();
        assert!(matches!(e, NetnsError::Open { .. }), "{e}");
    }
}

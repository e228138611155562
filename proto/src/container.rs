//! Container requests: create, start, exec, signal, wait, state, delete,
//! list processes, and stdio streams.
//!
//! The OCI `config.json` travels as JSON inside `CreateContainer` (the agent
//! parses it); an exec's OCI `process` object likewise. Process stdio does
//! not travel in frames: each stream is its own vsock connection, attached
//! with [`AttachStdioRequest`] *before* the process is created (see the
//! crate README), and then carries raw bytes.

use serde::{Deserialize, Serialize};

/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 128;

/// Where the container's root filesystem comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSource {
    /// virtio-fs tag to mount on `path` first (unmounted again on delete);
    /// `None`: `path` already holds the root filesystem (e.g. a share
    /// mounted with `Mount`, or a directory inside one).
    #[serde(default)]
    pub tag: Option<String>,
    /// Absolute guest path of the root filesystem.
    pub path: String,
}

/// Which stdio streams the host attached for a process; the others are
/// connected to /dev/null. With `terminal: true` in the OCI process, only
/// [`StdioStream::Terminal`] is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioSpec {
    /// A [`StdioStream::Stdin`] stream was attached.
    #[serde(default)]
    pub stdin: bool,
    /// A [`StdioStream::Stdout`] stream was attached.
    #[serde(default)]
    pub stdout: bool,
    /// A [`StdioStream::Stderr`] stream was attached.
    #[serde(default)]
    pub stderr: bool,
    /// A [`StdioStream::Terminal`] stream was attached.
    #[serde(default)]
    pub terminal: bool,
}

/// `CreateContainer`: like `runc create`. Answered with
/// `ContainerCreated` once the init process exists in its namespaces and
/// cgroup, has applied the spec, and waits for `StartContainer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainerRequest {
    /// Container id (1..=[`MAX_ID_LEN`] bytes of `[A-Za-z0-9_.-]`).
    pub id: String,
    /// Root filesystem.
    pub rootfs: RootfsSource,
    /// The bundle's OCI `config.json`.
    pub spec: serde_json::Value,
    /// Attached stdio streams.
    #[serde(default)]
    pub stdio: StdioSpec,
}

/// Answer to `CreateContainer`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerCreated {
    /// Guest pid of the container's init process.
    pub pid: i32,
    /// Spec fields present but not applied by this agent (e.g.
    /// `hooks`), so the host can warn or refuse.
    #[serde(default)]
    pub ignored: Vec<String>,
    /// Guest time spent creating, in microseconds.
    #[serde(default)]
    pub elapsed_us: u64,
}

/// `ExecProcess`: like `runc exec`: a new process in a running container's
/// namespaces and cgroup, started at once. Answered with `ProcessStarted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecProcessRequest {
    /// Container id.
    pub id: String,
    /// Id of the new process, unique within the container.
    pub exec_id: String,
    /// The OCI `process` object (args, env, cwd, user, capabilities, ...).
    pub process: serde_json::Value,
    /// Attached stdio streams.
    #[serde(default)]
    pub stdio: StdioSpec,
}

/// `SignalProcess`: like `runc kill`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalProcessRequest {
    /// Container id.
    pub id: String,
    /// An exec's id, or `None` for the container's init.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Signal number (1..=64).
    pub signal: i32,
    /// Signal every process of the container (`runc kill --all`).
    #[serde(default)]
    pub all: bool,
}

/// Names a container (`StartContainer`, `State`, `ListProcesses`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// Container id.
    pub id: String,
}

/// `DeleteContainer`: like `runc delete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteContainerRequest {
    /// Container id.
    pub id: String,
    /// Kill a running container first (`runc delete --force`).
    #[serde(default)]
    pub force: bool,
}

/// Names a process (`WaitProcess`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Container id.
    pub id: String,
    /// An exec's id, or `None` for the container's init.
    #[serde(default)]
    pub exec_id: Option<String>,
}

/// How a process ended (answer to `WaitProcess`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExit {
    /// Exit status as runc reports it: the exit code, or 128+N when killed
    /// by signal N.
    pub status: i32,
    /// The signal that killed it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The container's cgroup recorded an OOM kill (memory.events
    /// `oom_kill`) and the process was killed by SIGKILL.
    #[serde(default)]
    pub oom_killed: bool,
}

/// Lifecycle state, as in `runc state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    /// Init waits for `StartContainer`.
    Created,
    /// Init runs the user's process.
    Running,
    /// Init has exited.
    Stopped,
    /// Frozen (`PauseContainer`) until `ResumeContainer`.
    Paused,
}

/// Answer to `State`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Lifecycle state.
    pub status: ContainerStatus,
    /// Guest pid of init.
    pub pid: i32,
    /// How init ended, once stopped.
    #[serde(default)]
    pub exit: Option<ProcessExit>,
}

/// One stdio stream of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StdioStream {
    /// Host -> process; the host closes the stream for EOF.
    Stdin,
    /// Process -> host; closed when the process (and its children holding
    /// it) closes it.
    Stdout,
    /// Process -> host.
    Stderr,
    /// Both ways: the guest pty's master side (terminal mode).
    Terminal,
}

/// `AttachStdio`: the first and only frame on a fresh connection; after the
/// `StdioAttached` answer the connection carries raw bytes of `stream`. The
/// host must not send bytes before it has read the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachStdioRequest {
    /// Container id (of a container about to be created, or existing).
    pub id: String,
    /// Exec id, or `None` for the container's init.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Which stream this connection carries.
    pub stream: StdioStream,
}

/// `ResizeTerminal`: window size of a process's pty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeTerminalRequest {
    /// Container id.
    pub id: String,
    /// Exec id, or `None` for init.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Whether `id` is a valid container or exec id: 1..=[`MAX_ID_LEN`] bytes
/// of ASCII letters, digits, `_`, `.`, `-`, not starting with `.`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The exit status runc reports for a raw `wait(2)` status: the exit code,
/// or 128+N for a process killed by signal N. `None` for a status that is
/// neither (stopped/continued).
pub fn runc_exit_status(raw: i32) -> Option<(i32, Option<i32>)> {
    let sig = raw & 0x7f;
    if sig == 0 {
        Some(((raw >> 8) & 0xff, None))
    } else if sig != 0x7f {
        Some((128 + sig, Some(sig)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_request, RequestBody};

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "c1", "my-ctr_2.x", &"x".repeat(MAX_ID_LEN)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn wait_statuses_map_like_runc() {
        // WIFEXITED with code 3.
        assert_eq!(runc_exit_status(3 << 8), Some((3, None)));
        assert_eq!(runc_exit_status(0), Some((0, None)));
        // Killed by SIGKILL (9), with and without a core dump bit.
        assert_eq!(runc_exit_status(9), Some((137, Some(9))));
        assert_eq!(runc_exit_status(11 | 0x80), Some((139, Some(11))));
        // Stopped by SIGSTOP: not an exit.
        assert_eq!(runc_exit_status((19 << 8) | 0x7f), None);
    }

    #[test]
    fn container_requests_wire_format() {
        let r = decode_request(
            br#"{"id":1,"body":{"CreateContainer":{"id":"c","rootfs":{"path":"/r"},"spec":{"ociVersion":"1.0.2"}}}}"#,
        )
        .unwrap();
        match r.body {
            RequestBody::CreateContainer(c) => {
                assert_eq!(c.rootfs.tag, None);
                assert_eq!(c.stdio, StdioSpec::default());
                assert_eq!(c.spec["ociVersion"], "1.0.2");
            }
            other => panic!("{other:?}"),
        }
        let r = decode_request(
            br#"{"id":2,"body":{"SignalProcess":{"id":"c","signal":9,"all":true}}}"#,
        )
        .unwrap();
        assert_eq!(
            r.body,
            RequestBody::SignalProcess(SignalProcessRequest {
                id: "c".into(),
                exec_id: None,
                signal: 9,
                all: true
            })
        );
        let r = decode_request(
            br#"{"id":3,"body":{"AttachStdio":{"id":"c","exec_id":"e","stream":"Stdout"}}}"#,
        )
        .unwrap();
        assert!(matches!(r.body, RequestBody::AttachStdio(a) if a.stream == StdioStream::Stdout));
        let s = serde_json::to_string(&ContainerStatus::Created).unwrap();
        assert_eq!(s, r#""created""#);
    }
}

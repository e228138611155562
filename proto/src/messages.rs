//! Request and response types.
//!
//! Wire format (the JSON inside a frame):
//!
//! ```text
//! {"id":1,"body":"Ping"}
//! {"id":1,"body":{"Pong":{"agent_version":"0.1.0","protocol_version":1,"uname":{..}}}}
//! {"id":2,"body":"Shutdown"}
//! {"id":2,"body":"ShuttingDown"}
//! {"id":3,"body":{"Error":{"code":"Unsupported","message":".."}}}
//! {"id":4,"body":{"Mount":{"tag":"rootfs","target":"/mnt/rootfs","read_only":true}}}
//! {"id":4,"body":"Mounted"}
//! {"id":5,"body":{"ReadFile":{"path":"/mnt/rootfs/etc/os-release","max_len":4096}}}
//! {"id":5,"body":{"FileData":{"data":[73,68],"len":2,"eof":true,"fnv1a":..,"elapsed_us":..}}}
//! ```
//!
//! Bodies are externally tagged enums: a variant without data is a bare
//! string, a variant with data a one-key object. To grow the protocol, add
//! variants (an agent that does not know one answers it with
//! [`ErrorCode::Unsupported`], see [`decode_request`]) and add fields only
//! with `#[serde(default)]`; never rename or repurpose a variant or a field;
//! bump [`crate::PROTOCOL_VERSION`] on incompatible changes.

use serde::{Deserialize, Serialize};

use crate::container::{
    AttachStdioRequest, ContainerCreated, ContainerRef, ContainerState, CreateContainerRequest,
    DeleteContainerRequest, ExecProcessRequest, ProcessExit, ProcessRef, ResizeTerminalRequest,
    SignalProcessRequest,
};
use crate::network::NetworkConfig;
use crate::resources::{ContainerStats, UpdateContainerRequest};

/// A request from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// What the host asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Liveness and identity: agent version and guest uname.
    Ping,
    /// Sync filesystems and stop the VM (a guest reboot, which ends the VMM
    /// with status 0).
    Shutdown,
    /// Mount a virtio-fs share; answered with `Mounted`.
    Mount(MountRequest),
    /// Diagnostic: read (part of) a guest file; answered with `FileData`.
    ReadFile(ReadFileRequest),
    /// Diagnostic: like `ReadFile`, but through a shared read-only `mmap`
    /// of the range (page faults instead of `read(2)` copies; with a DAX
    /// mount the pages are the host's). `offset` must be page aligned, and
    /// the file must not shrink meanwhile. Answered with `FileData`.
    MmapReadFile(ReadFileRequest),
    /// Diagnostic: create or truncate a guest file and write bytes to it;
    /// answered with `Written`.
    WriteFile(WriteFileRequest),
    /// Sent first to a VM restored from a snapshot: mix fresh host entropy
    /// into the guest RNG and force a reseed (so clones of one snapshot do
    /// not produce the same random numbers), and optionally set the host
    /// name.
    Restored(RestoredRequest),
    /// `len` bytes from the guest's `getrandom(2)` (at most
    /// [`MAX_RANDOM_LEN`]).
    GetRandom {
        /// Number of bytes.
        len: u32,
    },
    /// Create a container whose init waits for `StartContainer`; answered
    /// with `ContainerCreated`.
    CreateContainer(CreateContainerRequest),
    /// Let a created container's init exec the user's process; answered
    /// with `Started`.
    StartContainer(ContainerRef),
    /// Start another process in a running container; answered with
    /// `ProcessStarted`.
    ExecProcess(ExecProcessRequest),
    /// Send a signal; answered with `Signalled`.
    SignalProcess(SignalProcessRequest),
    /// Wait until a process has exited; answered with `Exited`. Blocks the
    /// connection: use a connection of its own.
    WaitProcess(ProcessRef),
    /// A container's state; answered with `ContainerState`.
    State(ContainerRef),
    /// Remove a stopped (or, with `force`, any) container; answered with
    /// `Deleted`.
    DeleteContainer(DeleteContainerRequest),
    /// Guest pids of the container's processes; answered with `Processes`.
    ListProcesses(ContainerRef),
    /// Turn this connection into a stdio stream; answered with
    /// `StdioAttached`, then raw bytes.
    AttachStdio(AttachStdioRequest),
    /// Set a process's terminal size; answered with `Resized`.
    ResizeTerminal(ResizeTerminalRequest),
    /// Freeze a running container (cgroup v2 freezer); answered with
    /// `Paused`.
    PauseContainer(ContainerRef),
    /// Thaw a paused container; answered with `Resumed`.
    ResumeContainer(ContainerRef),
    /// Change a container's cgroup limits (all or nothing); answered with
    /// `Updated`.
    UpdateContainer(UpdateContainerRequest),
    /// A container's cgroup statistics; answered with `ContainerStats`.
    ContainerStats(ContainerRef),
    /// Give the guest's network devices the names, MACs, MTUs, addresses
    /// and routes of the interfaces the host read from the container's
    /// network namespace (the i-th interface to the i-th device); answered
    /// with `NetworkConfigured`. An empty list changes nothing.
    ConfigureNetwork(NetworkConfig),
}

/// Smallest entropy a `Restored` request must carry.
pub const MIN_RESTORE_ENTROPY: usize = 32;
/// Largest entropy a `Restored` request may carry.
pub const MAX_RESTORE_ENTROPY: usize = 4096;
/// Largest `GetRandom` request.
pub const MAX_RANDOM_LEN: u32 = 4096;

/// Body of [`RequestBody::Restored`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredRequest {
    /// Fresh random bytes from the host ([`MIN_RESTORE_ENTROPY`] to
    /// [`MAX_RESTORE_ENTROPY`]).
    pub entropy: Vec<u8>,
    /// New host name (at most 64 bytes), or keep the current one.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Most bytes a `ReadFile` returns inline (a JSON array of numbers takes up
/// to 4 bytes per byte, and frames are limited to [`crate::MAX_FRAME`]).
pub const MAX_INLINE_READ: u64 = 128 * 1024;

/// Mount the virtio-fs share `tag` on `target` in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    /// The share's tag (`--fs TAG=..` of the VMM).
    pub tag: String,
    /// Absolute mount point; created (with its parents) if missing.
    pub target: String,
    /// Mount read-only in the guest.
    #[serde(default)]
    pub read_only: bool,
    /// Mount with `dax=always`: file data is mapped from the device's DAX
    /// window instead of copied into the guest page cache. The mount fails
    /// if the device has no window (`--fs TAG=DIR,dax`). Without it the
    /// kernel's default per-file mode applies, in which a share that has a
    /// window still uses DAX for every file (the VMM marks them all).
    #[serde(default, skip_serializing_if = "is_false")]
    pub dax: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Read up to `max_len` bytes of `path` from `offset` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Most bytes to read; at most [`MAX_INLINE_READ`] unless `discard`.
    pub max_len: u64,
    /// Where to start reading.
    #[serde(default)]
    pub offset: u64,
    /// Read and checksum but do not return the bytes (no size limit): for
    /// measuring read throughput in the guest.
    #[serde(default)]
    pub discard: bool,
}

/// Write `data` to `path` (created with mode 0644, or truncated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Bytes to write.
    pub data: Vec<u8>,
}

/// Answer to `ReadFile`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The bytes read (empty with `discard`).
    pub data: Vec<u8>,
    /// How many bytes were read.
    pub len: u64,
    /// The end of the file was reached before `max_len` bytes.
    pub eof: bool,
    /// [`fnv1a`] of the bytes read.
    pub fnv1a: u64,
    /// Guest time from open to the last read, in microseconds.
    pub elapsed_us: u64,
}

/// 64-bit FNV-1a, continuing from `state` (start with [`FNV1A_INIT`]): a
/// checksum both sides compute without extra dependencies.
pub fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state
}

/// Initial state of [`fnv1a`].
pub const FNV1A_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// A response from the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered (0 when the request had no readable id).
    pub id: u64,
    /// The answer.
    pub body: ResponseBody,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// Answer to `Ping`.
    Pong(PingReply),
    /// Answer to `Shutdown`; the VM stops right after.
    ShuttingDown,
    /// Answer to `Restored`: the RNG was reseeded (and the host name set).
    Restored,
    /// Answer to `GetRandom`.
    Random(Vec<u8>),
    /// Answer to `Mount`.
    Mounted,
    /// Answer to `ReadFile`.
    FileData(FileData),
    /// Answer to `WriteFile`: bytes written.
    Written(u64),
    /// Answer to `CreateContainer`.
    ContainerCreated(ContainerCreated),
    /// Answer to `StartContainer`: the user's process was executed.
    Started,
    /// Answer to `ExecProcess`: guest pid of the new process.
    ProcessStarted {
        /// Guest pid.
        pid: i32,
    },
    /// Answer to `SignalProcess`.
    Signalled,
    /// Answer to `WaitProcess`.
    Exited(ProcessExit),
    /// Answer to `State`.
    ContainerState(ContainerState),
    /// Answer to `DeleteContainer`.
    Deleted,
    /// Answer to `ListProcesses`: guest pids.
    Processes(Vec<i32>),
    /// Answer to `AttachStdio`: raw bytes follow.
    StdioAttached,
    /// Answer to `ResizeTerminal`.
    Resized,
    /// The request failed or was not understood.
    Error(ErrorReply),
    /// Answer to `PauseContainer`: every process is frozen.
    Paused,
    /// Answer to `ResumeContainer`: thawed.
    Resumed,
    /// Answer to `UpdateContainer`.
    Updated,
    /// Answer to `ContainerStats`.
    ContainerStats(ContainerStats),
    /// Answer to `ConfigureNetwork`: every interface is configured and up.
    NetworkConfigured,
}

/// Error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame or request could not be decoded.
    InvalidRequest,
    /// The request type is unknown to this agent.
    Unsupported,
    /// The operation failed inside the guest.
    Internal,
    /// No container or process with that id.
    NotFound,
    /// A container or process with that id exists already.
    AlreadyExists,
    /// The container is not in a state that allows the operation (e.g.
    /// `StartContainer` twice, deleting a running container).
    FailedPrecondition,
    /// A code this side does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Class of error.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

/// The guest's `uname(2)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uname {
    /// e.g. "Linux".
    pub sysname: String,
    /// Host name.
    pub nodename: String,
    /// Kernel release.
    pub release: String,
    /// Kernel version string.
    pub version: String,
    /// Machine, e.g. "x86_64".
    pub machine: String,
}

/// Answer to `Ping`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// `vessel-agent` version.
    pub agent_version: String,
    /// Protocol version the agent speaks.
    pub protocol_version: u32,
    /// The guest's uname.
    pub uname: Uname,
    /// Guest CLOCK_BOOTTIME (ms) when the agent started as /init.
    #[serde(default)]
    pub init_started_ms: Option<u64>,
    /// Guest CLOCK_BOOTTIME (ms) when the agent started listening.
    #[serde(default)]
    pub listening_ms: Option<u64>,
}

/// A request that could not be decoded, and what to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The request's id when the body was a JSON object with a numeric
    /// `id`, else 0.
    pub id: u64,
    /// The error to send back.
    pub error: ErrorReply,
}

impl Rejected {
    /// The response that answers the rejected request.
    pub fn into_response(self) -> Response {
        Response {
            id: self.id,
            body: ResponseBody::Error(self.error),
        }
    }
}

/// Decodes one request frame body; never panics, whatever the input.
///
/// A body that is JSON with a numeric `id` and a `body` this side does not
/// know (a request type from a newer host) is rejected with its id and
/// [`ErrorCode::Unsupported`]; anything else that does not decode is
/// [`ErrorCode::InvalidRequest`].
pub fn decode_request(body: &[u8]) -> Result<Request, Rejected> {
    let err = match serde_json::from_slice::<Request>(body) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    // Error path only: look at the JSON generically to keep the id and tell
    // an unknown request type apart from garbage.
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let id = value
        .as_ref()
        .and_then(|v| v.get("id"))
        .and_then(serde_json::Value::as_u64);
    let has_body = value.as_ref().and_then(|v| v.get("body")).is_some();
    let (code, what) = if id.is_some() && has_body {
        (ErrorCode::Unsupported, "unsupported request")
    } else {
        (ErrorCode::InvalidRequest, "invalid request")
    };
    Err(Rejected {
        id: id.unwrap_or(0),
        error: ErrorReply {
            code,
            message: format!("{what}: {err}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        for (body, json) in [
            (RequestBody::Ping, r#"{"id":3,"body":"Ping"}"#),
            (RequestBody::Shutdown, r#"{"id":3,"body":"Shutdown"}"#),
        ] {
            let r = Request { id: 3, body };
            assert_eq!(serde_json::to_string(&r).unwrap(), json);
            assert_eq!(decode_request(json.as_bytes()).unwrap(), r);
        }
        // The one-key-object spelling of a unit variant decodes too.
        let r = decode_request(br#"{"id":4,"body":{"Ping":null}}"#).unwrap();
        assert_eq!(r.body, RequestBody::Ping);
        let e = Response {
            id: 2,
            body: ResponseBody::Error(ErrorReply {
                code: ErrorCode::Unsupported,
                message: "x".into(),
            }),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"id":2,"body":{"Error":{"code":"Unsupported","message":"x"}}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
        let s = serde_json::to_string(&Response {
            id: 5,
            body: ResponseBody::ShuttingDown,
        })
        .unwrap();
        assert_eq!(s, r#"{"id":5,"body":"ShuttingDown"}"#);
    }

    #[test]
    fn restore_requests_wire_format() {
        let r = Request {
            id: 1,
            body: RequestBody::Restored(RestoredRequest {
                entropy: vec![1, 2],
                hostname: Some("h".into()),
            }),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"id":1,"body":{"Restored":{"entropy":[1,2],"hostname":"h"}}}"#
        );
        assert_eq!(decode_request(json.as_bytes()).unwrap(), r);
        let no_host = decode_request(br#"{"id":1,"body":{"Restored":{"entropy":[3]}}}"#).unwrap();
        assert!(matches!(
            no_host.body,
            RequestBody::Restored(RestoredRequest { hostname: None, .. })
        ));
        let g = decode_request(br#"{"id":2,"body":{"GetRandom":{"len":16}}}"#).unwrap();
        assert_eq!(g.body, RequestBody::GetRandom { len: 16 });
        let s = serde_json::to_string(&ResponseBody::Random(vec![9])).unwrap();
        assert_eq!(s, r#"{"Random":[9]}"#);
    }

    #[test]
    fn filesystem_requests_wire_format() {
        let r = Request {
            id: 4,
            body: RequestBody::Mount(MountRequest {
                tag: "rootfs".into(),
                target: "/mnt/r".into(),
                read_only: true,
                dax: false,
            }),
        };
        let json =
            r#"{"id":4,"body":{"Mount":{"tag":"rootfs","target":"/mnt/r","read_only":true}}}"#;
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
        let dax = r#"{"tag":"t","target":"/m","dax":true}"#;
        let m: MountRequest = serde_json::from_str(dax).unwrap();
        assert!(m.dax && !m.read_only);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"tag":"t","target":"/m","read_only":false,"dax":true}"#
        );
        assert_eq!(decode_request(json.as_bytes()).unwrap(), r);
        // Optional fields default.
        let r =
            decode_request(br#"{"id":5,"body":{"ReadFile":{"path":"/a","max_len":3}}}"#).unwrap();
        assert_eq!(
            r.body,
            RequestBody::ReadFile(ReadFileRequest {
                path: "/a".into(),
                max_len: 3,
                offset: 0,
                discard: false
            })
        );
        let r = decode_request(br#"{"id":6,"body":{"Mount":{"tag":"t","target":"/m"}}}"#).unwrap();
        assert!(matches!(r.body, RequestBody::Mount(m) if !m.read_only));
        let s = serde_json::to_string(&Response {
            id: 4,
            body: ResponseBody::Mounted,
        })
        .unwrap();
        assert_eq!(s, r#"{"id":4,"body":"Mounted"}"#);
    }

    #[test]
    fn configure_network_wire_format() {
        let r = decode_request(
            br#"{"id":8,"body":{"ConfigureNetwork":{"interfaces":[{"name":"eth0","mac":"02:00:00:00:00:01","mtu":1500,"addresses":["fd00::2/64"],"routes":[{"gateway":"fd00::1"}]}]}}}"#,
        )
        .unwrap();
        match r.body {
            RequestBody::ConfigureNetwork(c) => {
                assert_eq!(c.interfaces[0].addresses[0].prefix_len, 64);
                assert_eq!(c.interfaces[0].routes[0].destination, None);
                c.validate().unwrap();
            }
            other => panic!("{other:?}"),
        }
        let empty = Request {
            id: 9,
            body: RequestBody::ConfigureNetwork(NetworkConfig::default()),
        };
        let json = serde_json::to_string(&empty).unwrap();
        assert_eq!(
            json,
            r#"{"id":9,"body":{"ConfigureNetwork":{"interfaces":[]}}}"#
        );
        assert_eq!(decode_request(json.as_bytes()).unwrap(), empty);
        let s = serde_json::to_string(&ResponseBody::NetworkConfigured).unwrap();
        assert_eq!(s, r#""NetworkConfigured""#);
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(FNV1A_INIT, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV1A_INIT, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fnv1a(fnv1a(FNV1A_INIT, b"fo"), b"obar"),
            0x8594_4171_f739_67e8
        );
    }

    #[test]
    fn unknown_request_type_is_rejected_with_its_id() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"body":{"Frobnicate":{}}}"#).is_err());
        for json in [
            r#"{"id":7,"body":{"Frobnicate":{"x":1}}}"#,
            r#"{"id":7,"body":"Frobnicate"}"#,
        ] {
            let r = decode_request(json.as_bytes()).unwrap_err();
            assert_eq!(r.id, 7);
            assert_eq!(r.error.code, ErrorCode::Unsupported);
            assert!(
                r.error.message.contains("Frobnicate"),
                "{}",
                r.error.message
            );
            let resp = r.into_response();
            assert_eq!(resp.id, 7);
            assert!(matches!(resp.body, ResponseBody::Error(_)));
        }
    }

    #[test]
    fn garbage_is_an_invalid_request() {
        for body in [
            &b"not json"[..],
            b"",
            b"[]",
            b"{}",
            br#"{"id":"x","body":"Ping"}"#,
            br#"{"id":-1,"body":"Ping"}"#,
            br#"{"id":5}"#,
            b"\xff\xfe",
        ] {
            let r = decode_request(body).unwrap_err();
            assert_eq!(r.error.code, ErrorCode::InvalidRequest, "{body:?}");
        }
        assert_eq!(decode_request(br#"{"id":5}"#).unwrap_err().id, 5);
    }

    #[test]
    fn unknown_error_code_decodes() {
        let r: Response =
            serde_json::from_str(r#"{"id":1,"body":{"Error":{"code":"Newer","message":"m"}}}"#)
                .unwrap();
        assert!(matches!(r.body, ResponseBody::Error(e) if e.code == ErrorCode::Unknown));
    }

    #[test]
    fn ping_reply_without_optional_fields_decodes() {
        let json = r##"{"id":1,"body":{"Pong":{"agent_version":"0.1.0","protocol_version":1,
            "uname":{"sysname":"Linux","nodename":"","release":"6.12","version":"#1","machine":"x86_64"}}}}"##;
        let r: Response = serde_json::from_str(json).unwrap();
        match r.body {
            ResponseBody::Pong(p) => {
                assert_eq!(p.uname.release, "6.12");
                assert_eq!(p.init_started_ms, None);
            }
            other => panic!("{other:?}"),
        }
    }
}

//! A small, blocking client of Kubernetes' CRI (`runtime.v1`, as containerd
//! 1.6's CRI plugin serves it on containerd's own gRPC socket), for the CRI
//! tests: Debian has no cri-tools.
//!
//! What it is: the CRI messages the tests use, declared by hand with
//! `prost` from k8s.io/cri-api's `runtime/v1/api.proto` (field numbers as
//! there; a message here may leave out fields, which protobuf skips on
//! decode), and unary gRPC calls framed by hand over one HTTP/2 connection
//! (`h2`) on the unix socket, driven by a current-thread tokio runtime that
//! the client owns. Every call is bounded by a timeout (sent as
//! `grpc-timeout` too); a call that does not answer in time fails with
//! [`Code::DeadlineExceeded`].
//!
//! Why not a crate with generated bindings: `k8s-cri` 0.11 (tonic 0.14 with
//! its default features, serde, both `v1` and `v1alpha2`) brings 100 crates
//! into a fresh lockfile and needs `protoc` at build time; tonic 0.14 alone
//! with `channel` and `codegen` and no TLS, 60; this client's dependencies,
//! 34 — of which this workspace already had all but 13.
//!
//! Its cost, measured on the project's 2-core machine (December 2026):
//! - crates added to Cargo.lock: 13 — `prost` and `prost-derive` 0.14.6,
//!   `h2` 0.4.21, `http` 1.6.0, `tokio` 1.54.1 (`rt`, `net`, `time`),
//!   `tokio-util` 0.7.20, `mio` 1.2.5, `socket2` 0.6.5, `slab`, `fnv`,
//!   `atomic-waker`, `futures-core`, `futures-sink`;
//! - build time (debug, as `cargo test` builds): about 18 s of compile
//!   units — tokio 6.0 s, h2 5.4 s, prost-derive 1.9 s, http 1.5 s, each
//!   other crate under 1 s; `cargo build -p vessel-tests --tests` took
//!   39 s of wall time from a clean state of those 13 crates and
//!   vessel-tests against 18 s with only vessel-tests cleaned, i.e. about
//!   20 s more (load average about 3: two other builds shared the cores).
//!
//! They are optional dependencies of `vessel-tests` behind its `cri`
//! feature, which the crate's dev-dependency on itself and `xtask` (for
//! `cargo xtask bench shim`) switch on: the tests and xtask build them, no
//! shipped binary ever does.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// How long a call may take unless the caller says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The CRI messages the tests use (package `runtime.v1`).
#[allow(missing_docs)]
pub mod pb {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    /// Namespace modes of [`NamespaceOption`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum NamespaceMode {
        Pod = 0,
        Container = 1,
        Node = 2,
        Target = 3,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespaceOption {
        #[prost(enumeration = "NamespaceMode", tag = "1")]
        pub network: i32,
        #[prost(enumeration = "NamespaceMode", tag = "2")]
        pub pid: i32,
        #[prost(enumeration = "NamespaceMode", tag = "3")]
        pub ipc: i32,
        #[prost(string, tag = "4")]
        pub target_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxSandboxSecurityContext {
        #[prost(message, optional, tag = "1")]
        pub namespace_options: Option<NamespaceOption>,
        #[prost(bool, tag = "4")]
        pub readonly_rootfs: bool,
        #[prost(bool, tag = "6")]
        pub privileged: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxSandboxSecurityContext>,
        #[prost(map = "string, string", tag = "3")]
        pub sysctls: HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "7")]
        pub annotations: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerSecurityContext {
        #[prost(bool, tag = "2")]
        pub privileged: bool,
        #[prost(message, optional, tag = "3")]
        pub namespace_options: Option<NamespaceOption>,
        #[prost(bool, tag = "7")]
        pub readonly_rootfs: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerConfig {
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxContainerSecurityContext>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "2")]
        pub image: Option<ImageSpec>,
        #[prost(string, repeated, tag = "3")]
        pub command: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub args: Vec<String>,
        #[prost(string, tag = "5")]
        pub working_dir: String,
        #[prost(message, repeated, tag = "6")]
        pub envs: Vec<KeyValue>,
        #[prost(map = "string, string", tag = "9")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "10")]
        pub annotations: HashMap<String, String>,
        #[prost(string, tag = "11")]
        pub log_path: String,
        #[prost(bool, tag = "14")]
        pub tty: bool,
        #[prost(message, optional, tag = "15")]
        pub linux: Option<LinuxContainerConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub config: Option<ContainerConfig>,
        #[prost(message, optional, tag = "3")]
        pub sandbox_config: Option<PodSandboxConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerResponse {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }
    /// Start, Remove and Stop (with `timeout`) of a container.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerIdRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        /// StopContainer's grace period in seconds (field 2 there).
        #[prost(int64, tag = "2")]
        pub timeout: i64,
    }
    /// Stop and Remove of a sandbox; Status with `verbose`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }
    /// The Linux resources UpdateContainerResources sets (the fields the
    /// tests use).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerResources {
        #[prost(int64, tag = "1")]
        pub cpu_period: i64,
        #[prost(int64, tag = "2")]
        pub cpu_quota: i64,
        #[prost(int64, tag = "3")]
        pub cpu_shares: i64,
        #[prost(int64, tag = "4")]
        pub memory_limit_in_bytes: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateContainerResourcesRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(message, optional, tag = "2")]
        pub linux: Option<LinuxContainerResources>,
    }
    /// Every response without fields the tests read.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, repeated, tag = "2")]
        pub cmd: Vec<String>,
        #[prost(int64, tag = "3")]
        pub timeout: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncResponse {
        #[prost(bytes = "vec", tag = "1")]
        pub stdout: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub stderr: Vec<u8>,
        #[prost(int32, tag = "3")]
        pub exit_code: i32,
    }

    /// States of a container.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ContainerState {
        ContainerCreated = 0,
        ContainerRunning = 1,
        ContainerExited = 2,
        ContainerUnknown = 3,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(enumeration = "ContainerState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(int64, tag = "5")]
        pub started_at: i64,
        #[prost(int64, tag = "6")]
        pub finished_at: i64,
        #[prost(int32, tag = "7")]
        pub exit_code: i32,
        #[prost(message, optional, tag = "8")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "9")]
        pub image_ref: String,
        #[prost(string, tag = "10")]
        pub reason: String,
        #[prost(string, tag = "11")]
        pub message: String,
        #[prost(string, tag = "15")]
        pub log_path: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<ContainerStatus>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UInt64Value {
        #[prost(uint64, tag = "1")]
        pub value: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerAttributes {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CpuUsage {
        #[prost(int64, tag = "1")]
        pub timestamp: i64,
        #[prost(message, optional, tag = "2")]
        pub usage_core_nano_seconds: Option<UInt64Value>,
        #[prost(message, optional, tag = "3")]
        pub usage_nano_cores: Option<UInt64Value>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MemoryUsage {
        #[prost(int64, tag = "1")]
        pub timestamp: i64,
        #[prost(message, optional, tag = "2")]
        pub working_set_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "3")]
        pub available_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "4")]
        pub usage_bytes: Option<UInt64Value>,
        #[prost(message, optional, tag = "5")]
        pub rss_bytes: Option<UInt64Value>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStats {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<ContainerAttributes>,
        #[prost(message, optional, tag = "2")]
        pub cpu: Option<CpuUsage>,
        #[prost(message, optional, tag = "3")]
        pub memory: Option<MemoryUsage>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatsResponse {
        #[prost(message, optional, tag = "1")]
        pub stats: Option<ContainerStats>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStateValue {
        #[prost(enumeration = "ContainerState", tag = "1")]
        pub state: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<ContainerStateValue>,
        #[prost(string, tag = "3")]
        pub pod_sandbox_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<ContainerFilter>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "4")]
        pub image: Option<ImageSpec>,
        #[prost(enumeration = "ContainerState", tag = "6")]
        pub state: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }

    /// States of a pod sandbox.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum PodSandboxState {
        SandboxReady = 0,
        SandboxNotready = 1,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandbox {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(string, tag = "7")]
        pub runtime_handler: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxResponse {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<PodSandbox>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxNetworkStatus {
        #[prost(string, tag = "1")]
        pub ip: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(message, optional, tag = "5")]
        pub network: Option<PodSandboxNetworkStatus>,
        #[prost(string, tag = "9")]
        pub runtime_handler: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        /// With `verbose`: containerd's key `info`, a JSON document.
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    /// ImageService's ImageStatus (field 1 an [`ImageSpec`]).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }
}

/// gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Code {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The code of a `grpc-status` number (unknown numbers: `Unknown`).
    pub fn from_i32(n: i32) -> Code {
        use Code::*;
        const ALL: [Code; 17] = [
            Ok,
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ];
        usize::try_from(n)
            .ok()
            .and_then(|i| ALL.get(i).copied())
            .unwrap_or(Unknown)
    }
}

/// A failed call: the server's status, or the client's own (`Unavailable`
/// for a broken connection, `DeadlineExceeded` for a call out of time,
/// `Internal` for an answer it could not read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// gRPC status code.
    pub code: Code,
    /// Its message (`grpc-message`, percent-decoded).
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

fn err(code: Code, message: impl Into<String>) -> Error {
    Error {
        code,
        message: message.into(),
    }
}

/// A call's result.
pub type Result<T> = std::result::Result<T, Error>;

/// What [`Cri::exec_sync`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecResult {
    /// The command's exit code.
    pub exit_code: i32,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
}

/// A CRI client on one HTTP/2 connection to containerd's socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    send: h2::client::SendRequest<Bytes>,
    timeout: Duration,
}

const RUNTIME: &str = "/runtime.v1.RuntimeService/";
const IMAGE: &str = "/runtime.v1.ImageService/";

impl Cri {
    /// Connects to the gRPC socket `sock` (containerd's own), within
    /// `CALL_TIMEOUT`; each later call has [`CALL_TIMEOUT`] unless
    /// [`Cri::with_timeout`] changes it.
    pub fn connect(sock: &Path) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| err(Code::Internal, format!("tokio runtime: {e}")))?;
        let sock = sock.to_path_buf();
        let send = rt.block_on(async {
            let connect = async {
                let io = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
                    err(
                        Code::Unavailable,
                        format!("connect {}: {e}", sock.display()),
                    )
                })?;
                let (send, conn) = h2::client::handshake(io)
                    .await
                    .map_err(|e| err(Code::Unavailable, format!("HTTP/2 handshake: {e}")))?;
                // Driven whenever the runtime runs, i.e. during each call.
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(send)
            };
            tokio::time::timeout(CALL_TIMEOUT, connect)
                .await
                .unwrap_or_else(|_| Err(err(Code::DeadlineExceeded, "connect: no answer")))
        })?;
        Ok(Cri {
            rt,
            send,
            timeout: CALL_TIMEOUT,
        })
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Cri {
        self.timeout = timeout;
        self
    }

    /// One unary call of `method` (a full path such as
    /// `/runtime.v1.RuntimeService/Version`) within `timeout`.
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp> {
        let fut = unary::<Req, Resp>(self.send.clone(), method, req, timeout);
        self.rt.block_on(async {
            tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(err(
                        Code::DeadlineExceeded,
                        format!("{method}: no answer within {timeout:?}"),
                    ))
                })
        })
    }

    fn rt<Req: Message, Resp: Message + Default>(&self, method: &str, req: &Req) -> Result<Resp> {
        self.call(&format!("{RUNTIME}{method}"), req, self.timeout)
    }

    /// Version: `(runtime_name, runtime_version, runtime_api_version)`.
    pub fn version(&self) -> Result<(String, String, String)> {
        let r: pb::VersionResponse = self.rt(
            "Version",
            &pb::VersionRequest {
                version: "v1".into(),
            },
        )?;
        Ok((r.runtime_name, r.runtime_version, r.runtime_api_version))
    }

    /// RunPodSandbox with runtime handler `handler` (`""`: the default):
    /// the sandbox's id.
    pub fn run_pod_sandbox(&self, config: &pb::PodSandboxConfig, handler: &str) -> Result<String> {
        let r: pb::RunPodSandboxResponse = self.rt(
            "RunPodSandbox",
            &pb::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            },
        )?;
        Ok(r.pod_sandbox_id)
    }

    /// PodSandboxStatus of `pod_id`.
    pub fn pod_sandbox_status(&self, pod_id: &str) -> Result<pb::PodSandboxStatus> {
        let r: pb::PodSandboxStatusResponse = self.rt(
            "PodSandboxStatus",
            &pb::PodSandboxIdRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: false,
            },
        )?;
        r.status
            .ok_or_else(|| err(Code::Internal, "PodSandboxStatus: no status"))
    }

    /// PodSandboxStatus of `pod_id` with `verbose`: its `info` map
    /// (containerd 1.6: key `info`, JSON with `pid`, `netNamespacePath`,
    /// `runtimeSpec`, ...).
    pub fn pod_sandbox_info(&self, pod_id: &str) -> Result<HashMap<String, String>> {
        let r: pb::PodSandboxStatusResponse = self.rt(
            "PodSandboxStatus",
            &pb::PodSandboxIdRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: true,
            },
        )?;
        Ok(r.info)
    }

    /// ListPodSandbox (unfiltered).
    pub fn list_pod_sandbox(&self) -> Result<Vec<pb::PodSandbox>> {
        let r: pb::ListPodSandboxResponse =
            self.rt("ListPodSandbox", &pb::ListPodSandboxRequest {})?;
        Ok(r.items)
    }

    /// StopPodSandbox.
    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let _: pb::Empty = self.rt(
            "StopPodSandbox",
            &pb::PodSandboxIdRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: false,
            },
        )?;
        Ok(())
    }

    /// RemovePodSandbox.
    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let _: pb::Empty = self.rt(
            "RemovePodSandbox",
            &pb::PodSandboxIdRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: false,
            },
        )?;
        Ok(())
    }

    /// CreateContainer in pod `pod_id` (whose config was `sandbox`): the
    /// container's id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &pb::ContainerConfig,
        sandbox: &pb::PodSandboxConfig,
    ) -> Result<String> {
        let r: pb::CreateContainerResponse = self.rt(
            "CreateContainer",
            &pb::CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(sandbox.clone()),
            },
        )?;
        Ok(r.container_id)
    }

    fn container_call(&self, method: &str, id: &str, timeout: i64) -> Result<()> {
        let _: pb::Empty = self.rt(
            method,
            &pb::ContainerIdRequest {
                container_id: id.into(),
                timeout,
            },
        )?;
        Ok(())
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> Result<()> {
        self.container_call("StartContainer", id, 0)
    }

    /// StopContainer with a grace period of `timeout_s` seconds (then
    /// SIGKILL).
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        self.container_call("StopContainer", id, timeout_s)
    }

    /// UpdateContainerResources with new Linux resources.
    pub fn update_container_resources(
        &self,
        id: &str,
        linux: pb::LinuxContainerResources,
    ) -> Result<()> {
        let _: pb::Empty = self.rt(
            "UpdateContainerResources",
            &pb::UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(linux),
            },
        )?;
        Ok(())
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.container_call("RemoveContainer", id, 0)
    }

    /// ExecSync of `cmd` in container `id`, which CRI ends after
    /// `timeout` (whole seconds, at least 1); the call itself may take
    /// 30 s longer.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecResult> {
        let secs = timeout.as_secs().max(1);
        let r: pb::ExecSyncResponse = self.call(
            &format!("{RUNTIME}ExecSync"),
            &pb::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: i64::try_from(secs).unwrap_or(i64::MAX),
            },
            Duration::from_secs(secs + 30),
        )?;
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// ContainerStatus of `id`.
    pub fn container_status(&self, id: &str) -> Result<pb::ContainerStatus> {
        let r: pb::ContainerStatusResponse = self.rt(
            "ContainerStatus",
            &pb::ContainerIdRequest {
                container_id: id.into(),
                timeout: 0,
            },
        )?;
        r.status
            .ok_or_else(|| err(Code::Internal, "ContainerStatus: no status"))
    }

    /// ContainerStats of `id`.
    pub fn container_stats(&self, id: &str) -> Result<pb::ContainerStats> {
        let r: pb::ContainerStatsResponse = self.rt(
            "ContainerStats",
            &pb::ContainerIdRequest {
                container_id: id.into(),
                timeout: 0,
            },
        )?;
        r.stats
            .ok_or_else(|| err(Code::Internal, "ContainerStats: no stats"))
    }

    /// ListContainers, of pod `pod_id` only unless it is `""`.
    pub fn list_containers(&self, pod_id: &str) -> Result<Vec<pb::Container>> {
        let r: pb::ListContainersResponse = self.rt(
            "ListContainers",
            &pb::ListContainersRequest {
                filter: Some(pb::ContainerFilter {
                    pod_sandbox_id: pod_id.into(),
                    ..Default::default()
                }),
            },
        )?;
        Ok(r.containers)
    }

    /// ImageService's ImageStatus: the image's id, `None` when CRI does
    /// not know `image`.
    pub fn image_status(&self, image: &str) -> Result<Option<String>> {
        let r: pb::ImageStatusResponse = self.call(
            &format!("{IMAGE}ImageStatus"),
            &pb::ImageStatusRequest {
                image: Some(pb::ImageSpec {
                    image: image.into(),
                }),
            },
            self.timeout,
        )?;
        Ok(r.image.map(|i| i.id).filter(|id| !id.is_empty()))
    }
}

/// Kubernetes' default namespaces: the pod's network and IPC namespaces,
/// a PID namespace per container.
pub fn default_namespaces() -> pb::NamespaceOption {
    pb::NamespaceOption {
        network: pb::NamespaceMode::Pod as i32,
        pid: pb::NamespaceMode::Container as i32,
        ipc: pb::NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// A minimal pod config: metadata (`name`, `uid`, namespace `default`),
/// `hostname`, `log_directory`, and a Linux security context with
/// [`default_namespaces`].
pub fn pod_config(
    name: &str,
    uid: &str,
    hostname: &str,
    log_directory: &Path,
) -> pb::PodSandboxConfig {
    pb::PodSandboxConfig {
        metadata: Some(pb::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: hostname.into(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(pb::LinuxPodSandboxConfig {
            security_context: Some(pb::LinuxSandboxSecurityContext {
                namespace_options: Some(default_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A minimal container config: `name`, `image`, `command` (the image's
/// entrypoint is replaced), `log_path` (relative to the pod's log
/// directory) and, as the kubelet sends them, the container's namespace
/// options ([`default_namespaces`]: CRI reads the container's, not the
/// pod's, and without them joins the sandbox's PID namespace).
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> pb::ContainerConfig {
    pb::ContainerConfig {
        metadata: Some(pb::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(pb::ImageSpec {
            image: image.into(),
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        linux: Some(pb::LinuxContainerConfig {
            security_context: Some(pb::LinuxContainerSecurityContext {
                namespace_options: Some(default_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// containerd namespace of CRI's images and containers.
pub const K8S_NS: &str = "k8s.io";

/// The sandbox ("pause") image [`import_pause`] builds and imports.
pub const PAUSE_IMAGE: &str = "docker.io/library/vessel-pause:pause";

/// The CRI plugin's configuration (inside its table, for
/// `containerd::Options::extra_config`): [`PAUSE_IMAGE`] as the sandbox
/// image, the runtime handlers `runc` (`io.containerd.runc.v2`, the
/// default) and `vessel` (`io.containerd.vessel.v2`), CNI plugins from
/// Debian's `/usr/lib/cni` with the conflists of `cni_conf`.
pub fn containerd_config(cni_conf: &Path) -> String {
    format!(
        r#"  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vessel]
      runtime_type = "io.containerd.vessel.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{}"
"#,
        cni_conf.display()
    )
}

/// A CNI conflist named `name`: a `bridge` (created in the network
/// namespace of containerd, gateway, no masquerading, no port mappings) on
/// `subnet` (`10.89.0.0/24`) with `host-local` leases in `ipam_dir`.
pub fn cni_conflist(name: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "{name}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{subnet}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}],
        "dataDir": "{}"
      }}
    }}
  ]
}}
"#,
        ipam_dir.display()
    )
}

/// Builds the pause image from the busybox layout that
/// `Containerd::import_busybox(work, ..)` left in `work` (its image with
/// `sleep` as the entrypoint, tagged `pause`) and imports it into
/// namespace [`K8S_NS`] as [`PAUSE_IMAGE`].
pub fn import_pause(
    c: &crate::containerd::Containerd,
    work: &Path,
) -> std::result::Result<(), String> {
    use crate::engines::output_within;
    let layout = work.join("layout");
    let image = format!("{}:1", layout.display());
    output_within(
        std::process::Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--tag",
            "pause",
            "--config.entrypoint",
            "/bin/sleep",
            "--config.cmd",
            "1000000000",
        ]),
        Duration::from_secs(60),
    )
    .ok("umoci config")?;
    let tar = work.join("pause.tar");
    crate::engines::tar_dir(&layout, &tar);
    c.ctr(
        &[
            "-n",
            K8S_NS,
            "images",
            "import",
            "--base-name",
            "docker.io/library/vessel-pause",
            &tar.to_string_lossy(),
        ],
        120,
    )
    .ok("ctr images import")?;
    Ok(())
}

/// `grpc-timeout` of `d`: milliseconds, at most 8 digits.
fn grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// `%XX` escapes of `grpc-message` decoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status in `h` (`grpc-status`, `grpc-message`), if it has one.
fn status_of(h: &http::HeaderMap) -> Option<(Code, String)> {
    let code = h
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((Code::from_i32(code), msg))
}

async fn unary<Req: Message, Resp: Message + Default>(
    send: h2::client::SendRequest<Bytes>,
    method: &str,
    req: &Req,
    timeout: Duration,
) -> Result<Resp> {
    let broken =
        |what: &str, e: h2::Error| err(Code::Unavailable, format!("{method}: {what}: {e}"));
    let mut send = send.ready().await.map_err(|e| broken("connection", e))?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout(timeout))
        .body(())
        .map_err(|e| err(Code::Internal, format!("{method}: request: {e}")))?;
    let (response, mut body) = send
        .send_request(request, false)
        .map_err(|e| broken("send", e))?;
    let msg = req.encode_to_vec();
    let len = u32::try_from(msg.len()).map_err(|_| err(Code::Internal, "message too long"))?;
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.put_u8(0);
    frame.put_u32(len);
    frame.put_slice(&msg);
    body.send_data(frame.freeze(), true)
        .map_err(|e| broken("send", e))?;

    let response = response.await.map_err(|e| broken("response", e))?;
    let (parts, mut rx) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(err(
            Code::Unknown,
            format!("{method}: HTTP status {}", parts.status),
        ));
    }
    // A "trailers-only" answer carries the status in its headers.
    if let Some((code, message)) = status_of(&parts.headers) {
        if code != Code::Ok {
            return Err(Error { code, message });
        }
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.map_err(|e| broken("body", e))?;
        let _ = rx.flow_control().release_capacity(chunk.len());
        buf.put_slice(&chunk);
    }
    let trailers = rx.trailers().await.map_err(|e| broken("trailers", e))?;
    match trailers
        .as_ref()
        .and_then(status_of)
        .or_else(|| status_of(&parts.headers))
    {
        Some((Code::Ok, _)) => {}
        Some((code, message)) => return Err(Error { code, message }),
        None => return Err(err(Code::Internal, format!("{method}: no grpc-status"))),
    }
    if buf.len() < 5 {
        return Err(err(Code::Internal, format!("{method}: no message")));
    }
    if buf[0] != 0 {
        return Err(err(Code::Internal, format!("{method}: compressed message")));
    }
    let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let body = buf
        .get(5..5 + n)
        .ok_or_else(|| err(Code::Internal, format!("{method}: short message")))?;
    Resp::decode(body).map_err(|e| err(Code::Internal, format!("{method}: decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("a%20b%3A c"), "a b: c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn timeouts_fit_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_secs(60)), "60000m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn codes_map_from_numbers() {
        assert_eq!(Code::from_i32(5), Code::NotFound);
        assert_eq!(Code::from_i32(99), Code::Unknown);
    }
}

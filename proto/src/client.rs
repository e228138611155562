//! Host-side client of the agent, through the VMM's hybrid vsock socket:
//! connect to the Unix socket, send `CONNECT <port>\n`, read `OK <port>\n`,
//! then exchange frames.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::container::{
    AttachStdioRequest, ContainerCreated, ContainerRef, ContainerState, CreateContainerRequest,
    DeleteContainerRequest, ExecProcessRequest, ProcessExit, ProcessRef, ResizeTerminalRequest,
    SignalProcessRequest, StdioStream,
};
use crate::frame::{read_frame, read_frame_bytes, write_frame, write_frame_bytes, FrameError};
use crate::messages::{
    ErrorReply, FileData, MountRequest, PingReply, ReadFileRequest, Request, RequestBody, Response,
    ResponseBody, RestoredRequest, WriteFileRequest,
};
use crate::network::NetworkConfig;
use crate::resources::{ContainerStats, ResourcesUpdate, UpdateContainerRequest};

/// Longest handshake answer line accepted (`OK 4294967295` is 13 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

/// Pause between attempts of [`AgentClient::wait_ready`].
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Read/write timeout of a client returned by [`AgentClient::wait_ready`]
/// (change it with [`AgentClient::set_timeout`]).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM closed the connection without `OK`: nothing listens on the
    /// port in the guest yet (or the vsock driver is not up).
    #[error("the agent is not listening yet")]
    NotReady,
    /// The socket file does not exist or refuses connections.
    #[error("cannot connect to the VMM socket")]
    Connect(#[source] io::Error),
    /// The handshake or a reply did not come in time, or
    /// [`AgentClient::wait_ready`] ran out of time.
    #[error("timed out waiting for the agent")]
    Timeout,
    /// The peer said something that is not our protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("agent error ({:?}): {}", .0.code, .0.message)]
    Remote(ErrorReply),
    /// Framing or decoding failed.
    #[error("frame")]
    Frame(#[from] FrameError),
    /// I/O on the socket failed.
    #[error("i/o error")]
    Io(#[from] io::Error),
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Maps a frame error, turning socket timeouts into [`ClientError::Timeout`].
fn frame_err(e: FrameError) -> ClientError {
    match e {
        FrameError::Io(io) if is_timeout(&io) => ClientError::Timeout,
        other => ClientError::Frame(other),
    }
}

/// A connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
}

/// Reads the handshake answer one byte at a time, so that nothing after the
/// newline (the agent's first frame) is consumed. `None`: the stream closed
/// before a whole line.
fn read_line(stream: &mut UnixStream) -> Result<Option<String>, ClientError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HANDSHAKE_LINE {
                    return Err(ClientError::Protocol("handshake line too long".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) if is_timeout(&e) => return Err(ClientError::Timeout),
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ClientError::Protocol("handshake line is not UTF-8".into()))
}

/// Checks the handshake answer: `OK <host port>`.
fn check_ok_line(line: &str) -> Result<(), ClientError> {
    match line.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(()),
        _ => Err(ClientError::Protocol(format!(
            "unexpected handshake answer {line:?}"
        ))),
    }
}

impl AgentClient {
    /// Connects to `port` in the guest through the VMM socket at `uds_path`.
    /// `timeout` bounds the handshake and every later read and write.
    ///
    /// Errors: [`ClientError::Connect`] when the socket is missing or
    /// refuses, [`ClientError::NotReady`] when the VMM closes the stream
    /// without `OK` (nothing listens on `port` in the guest yet),
    /// [`ClientError::Timeout`], [`ClientError::Protocol`] for any other
    /// answer, [`ClientError::Io`].
    pub fn connect(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let stream = UnixStream::connect(uds_path).map_err(ClientError::Connect)?;
        let mut client = AgentClient { stream, next_id: 1 };
        client.set_timeout(Some(timeout))?;
        let stream = &mut client.stream;
        if let Err(e) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
            // The VMM may drop the stream before reading the request.
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::NotReady,
                _ if is_timeout(&e) => ClientError::Timeout,
                _ => ClientError::Io(e),
            });
        }
        match read_line(stream)? {
            None => Err(ClientError::NotReady),
            Some(line) => {
                check_ok_line(&line)?;
                Ok(client)
            }
        }
    }

    /// Retries [`AgentClient::connect`] every [`RETRY_INTERVAL`] while the
    /// socket file is missing, refuses connections, or the agent does not
    /// listen yet ([`ClientError::NotReady`]), until `timeout` has passed in
    /// all ([`ClientError::Timeout`]). Other errors end the wait at once. The
    /// returned client uses [`DEFAULT_IO_TIMEOUT`].
    pub fn wait_ready(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            // Once the VMM has taken the stream, the guest may need a while to
            // answer: the handshake gets all the time that is left.
            match Self::connect(uds_path, port, left) {
                Ok(mut c) => {
                    c.set_timeout(Some(DEFAULT_IO_TIMEOUT))?;
                    return Ok(c);
                }
                Err(ClientError::NotReady) => {}
                Err(ClientError::Connect(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(RETRY_INTERVAL.min(left));
        }
    }

    /// Sets the read and write timeout of later calls (`None`: no timeout).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        // A zero timeout is an error for the socket API: use the smallest one.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Sends a request and waits for its response. An `Error` answer is
    /// `Ok(ResponseBody::Error(..))`; a response whose id is not the
    /// request's is a [`ClientError::Protocol`] error.
    pub fn call(&mut self, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        write_frame(&mut self.stream, &Request { id, body }).map_err(frame_err)?;
        let resp: Response = read_frame(&mut self.stream).map_err(frame_err)?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                resp.id
            )));
        }
        Ok(resp.body)
    }

    /// Sends a raw JSON frame body and returns the decoded answer, whatever
    /// its id (for tests of the agent's input checks).
    pub fn call_raw_json(&mut self, json: &str) -> Result<ResponseBody, ClientError> {
        write_frame_bytes(&mut self.stream, json.as_bytes()).map_err(frame_err)?;
        let body = read_frame_bytes(&mut self.stream).map_err(frame_err)?;
        let resp: Response = serde_json::from_slice(&body).map_err(FrameError::Json)?;
        Ok(resp.body)
    }

    /// `Ping`: the agent's version and the guest's uname.
    pub fn ping(&mut self) -> Result<PingReply, ClientError> {
        match self.call(RequestBody::Ping)? {
            ResponseBody::Pong(p) => Ok(p),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Ping: {other:?}"
            ))),
        }
    }

    /// `Restored`: reseed the guest RNG with `entropy` and set the host name.
    pub fn restored(
        &mut self,
        entropy: Vec<u8>,
        hostname: Option<String>,
    ) -> Result<(), ClientError> {
        match self.call(RequestBody::Restored(RestoredRequest { entropy, hostname }))? {
            ResponseBody::Restored => Ok(()),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Restored: {other:?}"
            ))),
        }
    }

    /// `Mount`: mounts virtio-fs share `tag` on `target` in the guest.
    pub fn mount(&mut self, tag: &str, target: &str, read_only: bool) -> Result<(), ClientError> {
        self.mount_request(MountRequest {
            tag: tag.to_string(),
            target: target.to_string(),
            read_only,
            dax: false,
        })
    }

    /// `Mount` with every option (e.g. `dax`).
    pub fn mount_request(&mut self, req: MountRequest) -> Result<(), ClientError> {
        match self.call(RequestBody::Mount(req))? {
            ResponseBody::Mounted => Ok(()),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Mount: {other:?}"
            ))),
        }
    }

    /// `GetRandom`: `len` bytes from the guest's RNG.
    pub fn get_random(&mut self, len: u32) -> Result<Vec<u8>, ClientError> {
        match self.call(RequestBody::GetRandom { len })? {
            ResponseBody::Random(b) => Ok(b),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to GetRandom: {other:?}"
            ))),
        }
    }

    /// `ReadFile`: reads (or with `discard`, only checksums) up to
    /// `max_len` bytes of a guest file.
    pub fn read_file(&mut self, req: ReadFileRequest) -> Result<FileData, ClientError> {
        match self.call(RequestBody::ReadFile(req))? {
            ResponseBody::FileData(d) => Ok(d),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to ReadFile: {other:?}"
            ))),
        }
    }

    /// `MmapReadFile`: like [`AgentClient::read_file`], through `mmap`.
    pub fn mmap_read_file(&mut self, req: ReadFileRequest) -> Result<FileData, ClientError> {
        match self.call(RequestBody::MmapReadFile(req))? {
            ResponseBody::FileData(d) => Ok(d),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to MmapReadFile: {other:?}"
            ))),
        }
    }

    /// `WriteFile`: creates or truncates a guest file and writes `data`.
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<u64, ClientError> {
        let req = WriteFileRequest {
            path: path.to_string(),
            data: data.to_vec(),
        };
        match self.call(RequestBody::WriteFile(req))? {
            ResponseBody::Written(n) => Ok(n),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to WriteFile: {other:?}"
            ))),
        }
    }

    /// Calls `body` and maps the answer with `pick` (an `Error` answer is
    /// [`ClientError::Remote`], anything `pick` refuses a protocol error).
    fn expect<T>(
        &mut self,
        what: &str,
        body: RequestBody,
        pick: impl FnOnce(ResponseBody) -> Result<T, Box<ResponseBody>>,
    ) -> Result<T, ClientError> {
        match self.call(body)? {
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => pick(other).map_err(|other| {
                ClientError::Protocol(format!("unexpected answer to {what}: {other:?}"))
            }),
        }
    }

    /// `CreateContainer`.
    pub fn create_container(
        &mut self,
        req: CreateContainerRequest,
    ) -> Result<ContainerCreated, ClientError> {
        self.expect(
            "CreateContainer",
            RequestBody::CreateContainer(req),
            |b| match b {
                ResponseBody::ContainerCreated(c) => Ok(c),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `StartContainer`.
    pub fn start_container(&mut self, id: &str) -> Result<(), ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect(
            "StartContainer",
            RequestBody::StartContainer(r),
            |b| match b {
                ResponseBody::Started => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ExecProcess`: returns the guest pid.
    pub fn exec_process(&mut self, req: ExecProcessRequest) -> Result<i32, ClientError> {
        self.expect("ExecProcess", RequestBody::ExecProcess(req), |b| match b {
            ResponseBody::ProcessStarted { pid } => Ok(pid),
            other => Err(Box::new(other)),
        })
    }

    /// `SignalProcess`.
    pub fn signal_process(&mut self, req: SignalProcessRequest) -> Result<(), ClientError> {
        self.expect(
            "SignalProcess",
            RequestBody::SignalProcess(req),
            |b| match b {
                ResponseBody::Signalled => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `WaitProcess` (blocks until the process exits; mind the timeout).
    pub fn wait_process(
        &mut self,
        id: &str,
        exec_id: Option<&str>,
    ) -> Result<ProcessExit, ClientError> {
        let r = ProcessRef {
            id: id.into(),
            exec_id: exec_id.map(str::to_string),
        };
        self.expect("WaitProcess", RequestBody::WaitProcess(r), |b| match b {
            ResponseBody::Exited(e) => Ok(e),
            other => Err(Box::new(other)),
        })
    }

    /// `State`.
    pub fn container_state(&mut self, id: &str) -> Result<ContainerState, ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect("State", RequestBody::State(r), |b| match b {
            ResponseBody::ContainerState(s) => Ok(s),
            other => Err(Box::new(other)),
        })
    }

    /// `DeleteContainer`.
    pub fn delete_container(&mut self, id: &str, force: bool) -> Result<(), ClientError> {
        let r = DeleteContainerRequest {
            id: id.into(),
            force,
        };
        self.expect(
            "DeleteContainer",
            RequestBody::DeleteContainer(r),
            |b| match b {
                ResponseBody::Deleted => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ListProcesses`: guest pids.
    pub fn list_processes(&mut self, id: &str) -> Result<Vec<i32>, ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect(
            "ListProcesses",
            RequestBody::ListProcesses(r),
            |b| match b {
                ResponseBody::Processes(p) => Ok(p),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ResizeTerminal`.
    pub fn resize_terminal(&mut self, req: ResizeTerminalRequest) -> Result<(), ClientError> {
        self.expect(
            "ResizeTerminal",
            RequestBody::ResizeTerminal(req),
            |b| match b {
                ResponseBody::Resized => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `PauseContainer`: freezes every process of the container.
    pub fn pause_container(&mut self, id: &str) -> Result<(), ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect(
            "PauseContainer",
            RequestBody::PauseContainer(r),
            |b| match b {
                ResponseBody::Paused => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ResumeContainer`: thaws a paused container.
    pub fn resume_container(&mut self, id: &str) -> Result<(), ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect(
            "ResumeContainer",
            RequestBody::ResumeContainer(r),
            |b| match b {
                ResponseBody::Resumed => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `UpdateContainer`: applies every limit in `resources`, or none.
    pub fn update_container(
        &mut self,
        id: &str,
        resources: ResourcesUpdate,
    ) -> Result<(), ClientError> {
        let r = UpdateContainerRequest {
            id: id.into(),
            resources,
        };
        self.expect(
            "UpdateContainer",
            RequestBody::UpdateContainer(r),
            |b| match b {
                ResponseBody::Updated => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ContainerStats`: cgroup statistics and the OOM kill count.
    pub fn container_stats(&mut self, id: &str) -> Result<ContainerStats, ClientError> {
        let r = ContainerRef { id: id.into() };
        self.expect(
            "ContainerStats",
            RequestBody::ContainerStats(r),
            |b| match b {
                ResponseBody::ContainerStats(s) => Ok(s),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `ConfigureNetwork`: names, MACs, MTUs, addresses and routes of the
    /// guest's network devices (the i-th interface to the i-th device).
    pub fn configure_network(&mut self, config: &NetworkConfig) -> Result<(), ClientError> {
        self.expect(
            "ConfigureNetwork",
            RequestBody::ConfigureNetwork(config.clone()),
            |b| match b {
                ResponseBody::NetworkConfigured => Ok(()),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `AttachStdio` on this (fresh) connection: returns the raw stream
    /// that from now on carries the process's `stream` bytes.
    pub fn attach_stdio(
        mut self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
    ) -> Result<UnixStream, ClientError> {
        let r = AttachStdioRequest {
            id: id.into(),
            exec_id: exec_id.map(str::to_string),
            stream,
        };
        self.expect("AttachStdio", RequestBody::AttachStdio(r), |b| match b {
            ResponseBody::StdioAttached => Ok(()),
            other => Err(Box::new(other)),
        })?;
        Ok(self.stream)
    }

    /// `Shutdown`: the agent answers, syncs and reboots the guest, which
    /// ends the VMM with status 0.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        match self.call(RequestBody::Shutdown)? {
            ResponseBody::ShuttingDown => Ok(()),
            ResponseBody::Error(e) => Err(ClientError::Remote(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Shutdown: {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ErrorCode;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    /// A socket path in a private directory, removed with the directory
    /// when dropped.
    struct SockPath(PathBuf);

    impl std::ops::Deref for SockPath {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for SockPath {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for SockPath {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn sock_path() -> SockPath {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vessel-proto-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SockPath(dir.join("s.sock"))
    }

    fn pong(id: u64) -> Response {
        Response {
            id,
            body: ResponseBody::Pong(PingReply {
                agent_version: "t".into(),
                ..Default::default()
            }),
        }
    }

    /// Accepts one stream and reads its 13-byte `CONNECT 1024\n` line.
    fn accept_connect(l: &UnixListener) -> (UnixStream, Vec<u8>) {
        let (mut s, _) = l.accept().unwrap();
        let mut got = vec![0u8; 13];
        s.read_exact(&mut got).unwrap();
        (s, got)
    }

    /// A fake VMM for one stream: reads `CONNECT`, writes `answer`, then
    /// (when `reply` is given) answers one request. Returns the `CONNECT`
    /// line it got.
    fn fake_vmm(
        answer: &'static [u8],
        reply: Option<fn(u64) -> Response>,
    ) -> (SockPath, JoinHandle<Vec<u8>>) {
        let path = sock_path();
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, got) = accept_connect(&l);
            s.write_all(answer).unwrap();
            if let Some(reply) = reply {
                let req: Request = read_frame(&mut s).unwrap();
                write_frame(&mut s, &reply(req.id)).unwrap();
            }
            got
        });
        (path, h)
    }

    fn connect(path: &Path) -> Result<AgentClient, ClientError> {
        AgentClient::connect(path, 1024, Duration::from_secs(5))
    }

    #[test]
    fn handshake_ok_then_ping() {
        let (path, h) = fake_vmm(b"OK 1073741824\n", Some(pong));
        let mut c = connect(&path).unwrap();
        assert_eq!(c.ping().unwrap().agent_version, "t");
        assert_eq!(h.join().unwrap(), b"CONNECT 1024\n");
    }

    #[test]
    fn handshake_does_not_read_past_the_newline() {
        // The OK line and a frame arrive in one write: the frame must be
        // left intact for the frame reader.
        let path = sock_path();
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = accept_connect(&l);
            let mut out = b"OK 5\n".to_vec();
            write_frame(&mut out, &pong(42)).unwrap();
            s.write_all(&out).unwrap();
        });
        let mut c = connect(&path).unwrap();
        let r: Response = read_frame(&mut c.stream).unwrap();
        assert_eq!(r, pong(42));
        h.join().unwrap();
    }

    #[test]
    fn closed_without_ok_is_not_ready() {
        let (path, h) = fake_vmm(b"", None);
        let r = connect(&path);
        assert!(matches!(r, Err(ClientError::NotReady)), "{r:?}");
        h.join().unwrap();
    }

    #[test]
    fn partial_line_then_close_is_not_ready() {
        let (path, h) = fake_vmm(b"OK 12", None);
        let r = connect(&path);
        assert!(matches!(r, Err(ClientError::NotReady)), "{r:?}");
        h.join().unwrap();
    }

    #[test]
    fn garbage_answer_is_a_protocol_error() {
        for answer in [&b"HELLO\n"[..], b"OK\n", b"OK x\n", b"ok 5\n", b"OK 5 6\n"] {
            let (path, h) = fake_vmm(answer, None);
            let r = connect(&path);
            assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
            h.join().unwrap();
        }
    }

    #[test]
    fn endless_answer_line_is_a_protocol_error() {
        let (path, h) = fake_vmm(&[b'A'; 200], None);
        let r = connect(&path);
        assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
        h.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out() {
        let path = sock_path();
        let _l = UnixListener::bind(&path).unwrap();
        let r = AgentClient::connect(&path, 1024, Duration::from_millis(50));
        assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
    }

    #[test]
    fn mismatched_response_id_is_a_protocol_error() {
        let (path, h) = fake_vmm(b"OK 7\n", Some(|id| pong(id + 1)));
        let mut c = connect(&path).unwrap();
        assert!(matches!(c.ping(), Err(ClientError::Protocol(_))));
        h.join().unwrap();
    }

    #[test]
    fn error_answer_is_a_remote_error() {
        let reply = |id| Response {
            id,
            body: ResponseBody::Error(ErrorReply {
                code: ErrorCode::Internal,
                message: "no".into(),
            }),
        };
        let (path, h) = fake_vmm(b"OK 7\n", Some(reply));
        let mut c = connect(&path).unwrap();
        match c.shutdown() {
            Err(ClientError::Remote(e)) => assert_eq!(e.message, "no"),
            other => panic!("{other:?}"),
        }
        h.join().unwrap();
    }

    #[test]
    fn missing_socket_times_out() {
        let r = AgentClient::wait_ready(
            Path::new("/nonexistent/x.sock"),
            1024,
            Duration::from_millis(100),
        );
        assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
    }

    #[test]
    fn wait_ready_retries_until_the_agent_listens() {
        // The socket appears late; the VMM then closes two streams without
        // OK (agent not listening yet) and answers the third.
        let path = sock_path();
        let p = path.to_path_buf();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            let l = UnixListener::bind(&p).unwrap();
            for _ in 0..2 {
                drop(accept_connect(&l));
            }
            let (mut s, _) = accept_connect(&l);
            s.write_all(b"OK 3\n").unwrap();
            let req: Request = read_frame(&mut s).unwrap();
            write_frame(&mut s, &pong(req.id)).unwrap();
        });
        let t = Instant::now();
        let mut c = AgentClient::wait_ready(&path, 1024, Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(60));
        assert_eq!(c.ping().unwrap().agent_version, "t");
        h.join().unwrap();
    }

    #[test]
    fn wait_ready_stops_on_other_errors() {
        let (path, h) = fake_vmm(b"NO\n", None);
        let r = AgentClient::wait_ready(&path, 1024, Duration::from_secs(5));
        assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
        h.join().unwrap();
    }
}

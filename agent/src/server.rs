//! The vsock server: accept connections, one thread each, and answer
//! requests. Connection handling is generic over `Read + Write` (and the
//! accept loop over any source of connections), so it is tested on the host
//! with Unix sockets.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, connect, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use vessel_proto::frame::{read_frame_bytes, write_frame};
use vessel_proto::{
    decode_request, ErrorCode, ErrorReply, FrameError, PingReply, Request, RequestBody, Response,
    ResponseBody, Uname, HOST_CID, PROTOCOL_VERSION, READY_PORT,
};

use crate::init::{boottime_ms, log, log_fmt};

/// `VMADDR_CID_ANY`.
const CID_ANY: u32 = u32::MAX;

/// Stack of a connection thread: requests are small and serde_json limits
/// nesting to 128 levels.
const CONN_STACK: usize = 256 * 1024;

/// Read buffer of a connection: a whole small frame (header and body) then
/// costs one `read`.
const CONN_READ_BUF: usize = 4096;

/// What request handlers need.
pub struct Context {
    /// Verbose logging (`vessel.debug`).
    pub debug: bool,
    /// Guest CLOCK_BOOTTIME (ms) when /init started.
    pub init_started_ms: u64,
    /// Guest CLOCK_BOOTTIME (ms) when the listener was ready.
    pub listening_ms: Option<u64>,
    /// Stops the VM after `Shutdown` was answered. Production: [`power_off`];
    /// tests inject a stub so they do not reboot the host.
    pub shutdown: Box<dyn Fn() + Send + Sync>,
    /// Applies a `Restored` request (entropy, host name). Production:
    /// [`crate::restore::apply`]; tests inject a stub (it needs root and
    /// changes the machine).
    pub restored: RestoredFn,
}

/// See [`Context::restored`].
pub type RestoredFn = Box<dyn Fn(&[u8], Option<&str>) -> Result<(), String> + Send + Sync>;

/// Creates the vsock listener on `port` (any CID): three system calls.
pub fn listen(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))?;
    nix::sys::socket::listen(&fd, Backlog::new(64)?)?;
    Ok(fd)
}

/// Tells a waiting host that we listen: connect to the host's ready port
/// and close. Without a host listener this is one refused connect.
pub fn announce_ready() {
    let Ok(fd) = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return;
    };
    let _ = connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, READY_PORT));
}

/// Accepted vsock connections, forever.
pub struct Incoming {
    listener: OwnedFd,
}

impl Incoming {
    /// Accepts on `listener`.
    pub fn new(listener: OwnedFd) -> Incoming {
        Incoming { listener }
    }
}

impl Iterator for Incoming {
    type Item = io::Result<File>;

    fn next(&mut self) -> Option<io::Result<File>> {
        loop {
            match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else
                // owns; the File takes ownership.
                Ok(fd) => return Some(Ok(unsafe { File::from_raw_fd(fd) })),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

/// Serves every connection from `incoming`, each in its own thread. Accept
/// errors are logged (the first of a run, or all with `debug`) and, when
/// they repeat (e.g. out of descriptors), slowed down.
pub fn serve<S, I>(incoming: I, ctx: Arc<Context>)
where
    S: Read + Write + Into<OwnedFd> + Send + 'static,
    I: IntoIterator<Item = io::Result<S>>,
{
    let mut consecutive_errors = 0u32;
    for conn in incoming {
        match conn {
            Ok(stream) => {
                consecutive_errors = 0;
                spawn_connection(stream, ctx.clone());
            }
            Err(e) => {
                consecutive_errors += 1;
                if consecutive_errors == 1 || ctx.debug {
                    log_fmt(format_args!("accept: {e}"));
                }
                if consecutive_errors > 3 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Serves one connection in a new thread. A panic in the handler is caught
/// and ends only that connection: PID 1 must never exit.
fn spawn_connection<S: Read + Write + Into<OwnedFd> + Send + 'static>(
    stream: S,
    ctx: Arc<Context>,
) {
    if ctx.debug {
        log_fmt(format_args!("connection accepted at {} ms", boottime_ms()));
    }
    let spawned = std::thread::Builder::new()
        .stack_size(CONN_STACK)
        .spawn(move || {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handle_connection(stream, &ctx)
            }));
            if served.is_err() {
                log("connection handler panicked; connection dropped");
            }
        });
    if let Err(e) = spawned {
        log_fmt(format_args!("cannot start a connection thread: {e}"));
    }
}

fn error(id: u64, code: ErrorCode, message: String) -> Response {
    Response {
        id,
        body: ResponseBody::Error(ErrorReply { code, message }),
    }
}

/// Serves one connection until the peer closes it, the stream is out of
/// step with the framing, or it becomes a process's stdio (`AttachStdio`).
pub fn handle_connection<S: Read + Write + Into<OwnedFd>>(stream: S, ctx: &Context) {
    let mut reader = BufReader::with_capacity(CONN_READ_BUF, stream);
    loop {
        let body = match read_frame_bytes(&mut reader) {
            Ok(body) => body,
            Err(FrameError::Closed) => return,
            Err(e) => {
                let desync = e.is_desync();
                // Answer when the peer may still read: not after an I/O error.
                if !matches!(e, FrameError::Io(_)) {
                    let reply = error(0, ErrorCode::InvalidRequest, e.to_string());
                    if write_frame(reader.get_mut(), &reply).is_err() {
                        return;
                    }
                }
                if desync {
                    if ctx.debug {
                        log_fmt(format_args!("closing connection: {e}"));
                    }
                    return;
                }
                continue;
            }
        };
        let req = match decode_request(&body) {
            Ok(req) => req,
            Err(rejected) => {
                if ctx.debug {
                    log_fmt(format_args!("rejected request: {}", rejected.error.message));
                }
                if write_frame(reader.get_mut(), &rejected.into_response()).is_err() {
                    return;
                }
                continue;
            }
        };
        if let RequestBody::AttachStdio(a) = &req.body {
            // Bytes after the request, before its answer, would be lost.
            if !reader.buffer().is_empty() {
                let body = ResponseBody::Error(ErrorReply {
                    code: ErrorCode::InvalidRequest,
                    message: "data sent before the AttachStdio answer".into(),
                });
                let _ = write_frame(reader.get_mut(), &Response { id: req.id, body });
                return;
            }
            attach_stdio(reader.into_inner().into(), req.id, a);
            return;
        }
        let (response, after) = dispatch_request(req, ctx);
        if write_frame(reader.get_mut(), &response).is_err() {
            return;
        }
        if let Some(action) = after {
            action();
        }
    }
}

type After<'a> = Option<&'a (dyn Fn() + Send + Sync)>;

/// Hands a connection over as a stdio stream. The stream is registered
/// *before* the answer is written, so a host that sends `CreateContainer`
/// right after reading the answer always finds it; the answer goes out on
/// a duplicate of the descriptor.
fn attach_stdio(fd: OwnedFd, id: u64, req: &vessel_proto::container::AttachStdioRequest) {
    let mut conn = File::from(fd);
    let attached = conn
        .try_clone()
        .map_err(|e| ErrorReply {
            code: ErrorCode::Internal,
            message: format!("cannot duplicate the connection: {e}"),
        })
        .and_then(|dup| crate::container::global().attach_stdio(req, dup.into()));
    let body = attached.map_or_else(ResponseBody::Error, |()| ResponseBody::StdioAttached);
    let _ = write_frame(&mut conn, &Response { id, body });
}

/// Answers one decoded request.
pub fn dispatch_request(req: Request, ctx: &Context) -> (Response, After<'_>) {
    let containers = crate::container::global();
    let (body, after): (ResponseBody, After<'_>) = match req.body {
        RequestBody::Ping => (
            ResponseBody::Pong(PingReply {
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                protocol_version: PROTOCOL_VERSION,
                uname: uname(),
                init_started_ms: Some(ctx.init_started_ms),
                listening_ms: ctx.listening_ms,
            }),
            None,
        ),
        RequestBody::Shutdown => {
            log("shutting down");
            (ResponseBody::ShuttingDown, Some(&*ctx.shutdown))
        }
        RequestBody::Restored(r) => match (ctx.restored)(&r.entropy, r.hostname.as_deref()) {
            Ok(()) => (ResponseBody::Restored, None),
            Err(message) => (
                ResponseBody::Error(ErrorReply {
                    code: ErrorCode::Internal,
                    message,
                }),
                None,
            ),
        },
        RequestBody::GetRandom { len } => match crate::restore::random(len) {
            Ok(b) => (ResponseBody::Random(b), None),
            Err(message) => (
                ResponseBody::Error(ErrorReply {
                    code: ErrorCode::InvalidRequest,
                    message,
                }),
                None,
            ),
        },
        RequestBody::Mount(m) => (
            answer(crate::fs::mount_share(&m).map(|()| ResponseBody::Mounted)),
            None,
        ),
        RequestBody::ReadFile(r) => (
            answer(crate::fs::read_file(&r).map(ResponseBody::FileData)),
            None,
        ),
        RequestBody::WriteFile(w) => (
            answer(crate::fs::write_file(&w).map(ResponseBody::Written)),
            None,
        ),
        RequestBody::CreateContainer(c) => (
            answer(containers.create(c).map(ResponseBody::ContainerCreated)),
            None,
        ),
        RequestBody::StartContainer(r) => (
            answer(containers.start(&r).map(|()| ResponseBody::Started)),
            None,
        ),
        RequestBody::ExecProcess(r) => (
            answer(
                containers
                    .exec(r)
                    .map(|pid| ResponseBody::ProcessStarted { pid }),
            ),
            None,
        ),
        RequestBody::SignalProcess(r) => (
            answer(containers.signal(&r).map(|()| ResponseBody::Signalled)),
            None,
        ),
        RequestBody::WaitProcess(r) => {
            (answer(containers.wait(&r).map(ResponseBody::Exited)), None)
        }
        RequestBody::State(r) => (
            answer(containers.state(&r).map(ResponseBody::ContainerState)),
            None,
        ),
        RequestBody::DeleteContainer(r) => (
            answer(containers.delete(&r).map(|()| ResponseBody::Deleted)),
            None,
        ),
        RequestBody::ListProcesses(r) => (
            answer(containers.processes(&r).map(ResponseBody::Processes)),
            None,
        ),
        RequestBody::ResizeTerminal(r) => (
            answer(containers.resize(&r).map(|()| ResponseBody::Resized)),
            None,
        ),
        // Handled in `handle_connection` (it takes the connection over);
        // reaching here means it came through `dispatch` alone.
        RequestBody::AttachStdio(_) => (
            ResponseBody::Error(ErrorReply {
                code: ErrorCode::InvalidRequest,
                message: "AttachStdio must be the first request of a connection".into(),
            }),
            None,
        ),
    };
    (Response { id: req.id, body }, after)
}

fn answer(result: Result<ResponseBody, ErrorReply>) -> ResponseBody {
    result.unwrap_or_else(ResponseBody::Error)
}

fn uname() -> Uname {
    match nix::sys::utsname::uname() {
        Ok(u) => Uname {
            sysname: u.sysname().to_string_lossy().into_owned(),
            nodename: u.nodename().to_string_lossy().into_owned(),
            release: u.release().to_string_lossy().into_owned(),
            version: u.version().to_string_lossy().into_owned(),
            machine: u.machine().to_string_lossy().into_owned(),
        },
        Err(_) => Uname::default(),
    }
}

/// Syncs filesystems and reboots: with `reboot=k` the guest resets through
/// the keyboard controller, which the VMM treats as a clean exit (status 0).
/// Returns only if the reboot failed.
pub fn power_off() {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log_fmt(format_args!("reboot: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vessel_proto::frame::{read_frame, write_frame_bytes};
    use vessel_proto::Request;

    fn ctx(shutdowns: Arc<AtomicUsize>) -> Context {
        Context {
            debug: false,
            init_started_ms: 5,
            listening_ms: Some(6),
            shutdown: Box::new(move || {
                shutdowns.fetch_add(1, Ordering::SeqCst);
            }),
            restored: Box::new(|entropy, hostname| {
                crate::restore::check(entropy, hostname)?;
                if hostname == Some("fail") {
                    return Err("injected".into());
                }
                Ok(())
            }),
        }
    }

    #[test]
    fn restored_and_get_random() {
        use vessel_proto::RestoredRequest;
        let (out, _) = run(|s| {
            for (id, entropy, hostname) in [
                (1, vec![5u8; 32], Some("c1".to_string())),
                (2, vec![5u8; 8], None),
                (3, vec![5u8; 32], Some("fail".to_string())),
            ] {
                let body = RequestBody::Restored(RestoredRequest { entropy, hostname });
                write_frame(s, &Request { id, body }).unwrap();
            }
            write_frame(
                s,
                &Request {
                    id: 4,
                    body: RequestBody::GetRandom { len: 24 },
                },
            )
            .unwrap();
            write_frame(
                s,
                &Request {
                    id: 5,
                    body: RequestBody::GetRandom { len: 1 << 20 },
                },
            )
            .unwrap();
        });
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].body, ResponseBody::Restored);
        assert_eq!(error_code(&out[1]), Some(ErrorCode::Internal));
        assert_eq!(error_code(&out[2]), Some(ErrorCode::Internal));
        assert!(matches!(&out[3].body, ResponseBody::Random(b) if b.len() == 24));
        assert_eq!(error_code(&out[4]), Some(ErrorCode::InvalidRequest));
    }

    fn ping(id: u64) -> Request {
        Request {
            id,
            body: RequestBody::Ping,
        }
    }

    /// Runs `handle_connection` on one end of a socket pair, writes what
    /// `frames` writes on the other, then half-closes and collects every
    /// response. Returns them and how often shutdown was called.
    fn run(frames: impl FnOnce(&mut UnixStream)) -> (Vec<Response>, usize) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = ctx(count.clone());
        let server = std::thread::spawn(move || handle_connection(a, &c));
        frames(&mut b);
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        while let Ok(r) = read_frame::<_, Response>(&mut b) {
            out.push(r);
        }
        server.join().unwrap();
        (out, count.load(Ordering::SeqCst))
    }

    fn error_code(r: &Response) -> Option<ErrorCode> {
        match &r.body {
            ResponseBody::Error(e) => Some(e.code),
            _ => None,
        }
    }

    #[test]
    fn attach_stdio_registers_the_stream_before_answering() {
        use vessel_proto::container::{AttachStdioRequest, StdioSpec, StdioStream};
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = ctx(Arc::new(AtomicUsize::new(0)));
        let req = Request {
            id: 7,
            body: RequestBody::AttachStdio(AttachStdioRequest {
                id: "unit-attach".into(),
                exec_id: None,
                stream: StdioStream::Stdout,
            }),
        };
        write_frame(&mut b, &req).unwrap();
        // The handler returns once the connection is handed over.
        handle_connection(a, &c);
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!((r.id, r.body), (7, ResponseBody::StdioAttached));
        let spec = StdioSpec {
            stdout: true,
            ..StdioSpec::default()
        };
        let taken = crate::container::global()
            .take_stdio_for_test("unit-attach", spec)
            .unwrap();
        // Bytes written to the taken stream reach the host raw.
        let mut out = File::from(taken);
        out.write_all(b"raw").unwrap();
        drop(out);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"raw");
    }

    #[test]
    fn ping_and_shutdown() {
        let (out, shutdowns) = run(|s| {
            write_frame(s, &ping(1)).unwrap();
            let shutdown = Request {
                id: 2,
                body: RequestBody::Shutdown,
            };
            write_frame(s, &shutdown).unwrap();
        });
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].id, 1);
        match &out[0].body {
            ResponseBody::Pong(p) => {
                assert_eq!(p.uname.sysname, "Linux");
                assert_eq!(p.uname, uname());
                assert_eq!(p.agent_version, env!("CARGO_PKG_VERSION"));
                assert_eq!(p.protocol_version, PROTOCOL_VERSION);
                assert_eq!(p.init_started_ms, Some(5));
                assert_eq!(p.listening_ms, Some(6));
            }
            other => panic!("{other:?}"),
        }
        let want = Response {
            id: 2,
            body: ResponseBody::ShuttingDown,
        };
        assert_eq!(out[1], want);
        assert_eq!(shutdowns, 1);
    }

    #[test]
    fn shutdown_runs_after_the_reply_is_sent() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let tx = std::sync::Mutex::new(tx);
        let c = Context {
            shutdown: Box::new(move || {
                // Blocks the handler until the test has read the reply.
                let _ = tx.lock().map(|t| t.send(()));
                std::thread::sleep(Duration::from_millis(50));
            }),
            ..ctx(Arc::new(AtomicUsize::new(0)))
        };
        let server = std::thread::spawn(move || handle_connection(a, &c));
        let req = Request {
            id: 9,
            body: RequestBody::Shutdown,
        };
        write_frame(&mut b, &req).unwrap();
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!(r.body, ResponseBody::ShuttingDown);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(b);
        server.join().unwrap();
    }

    #[test]
    fn unknown_type_bad_json_and_empty_frames_keep_the_connection() {
        let (out, shutdowns) = run(|s| {
            write_frame_bytes(s, br#"{"id":4,"body":{"Frobnicate":{}}}"#).unwrap();
            write_frame_bytes(s, b"not json").unwrap();
            s.write_all(&0u32.to_be_bytes()).unwrap();
            write_frame_bytes(s, br#"{"id":"x"}"#).unwrap();
            write_frame(s, &ping(5)).unwrap();
        });
        assert_eq!(out.len(), 5, "{out:?}");
        assert_eq!(out[0].id, 4);
        assert_eq!(error_code(&out[0]), Some(ErrorCode::Unsupported));
        for r in &out[1..4] {
            assert_eq!(error_code(r), Some(ErrorCode::InvalidRequest), "{r:?}");
        }
        assert_eq!(out[4].id, 5);
        assert!(matches!(out[4].body, ResponseBody::Pong(_)));
        assert_eq!(shutdowns, 0);
    }

    #[test]
    fn deeply_nested_json_is_rejected_without_overflowing_the_stack() {
        // Served in a thread with the production stack size.
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = Arc::new(ctx(Arc::new(AtomicUsize::new(0))));
        spawn_connection(a, c);
        write_frame_bytes(&mut b, nested.as_bytes()).unwrap();
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!(error_code(&r), Some(ErrorCode::InvalidRequest));
        write_frame(&mut b, &ping(3)).unwrap();
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!(r.id, 3);
    }

    #[test]
    fn oversized_frame_is_answered_and_closed() {
        let (out, _) = run(|s| {
            s.write_all(&u32::MAX.to_be_bytes()).unwrap();
            s.write_all(b"junk after").unwrap();
        });
        assert_eq!(out.len(), 1);
        assert_eq!(error_code(&out[0]), Some(ErrorCode::InvalidRequest));
        assert!(matches!(&out[0].body, ResponseBody::Error(e) if e.message.contains("exceeds")));
    }

    #[test]
    fn truncated_frame_is_answered_and_closed() {
        let (out, _) = run(|s| {
            write_frame(s, &ping(1)).unwrap();
            s.write_all(&100u32.to_be_bytes()).unwrap();
            s.write_all(b"{\"id\":").unwrap();
        });
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0].body, ResponseBody::Pong(_)));
        assert!(matches!(&out[1].body, ResponseBody::Error(e) if e.message.contains("truncated")));
    }

    #[test]
    fn truncated_header_is_answered_and_closed() {
        let (out, _) = run(|s| s.write_all(&[0, 0]).unwrap());
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].body, ResponseBody::Error(e) if e.message.contains("truncated")));
    }

    #[test]
    fn peer_gone_mid_conversation_ends_the_handler() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = ctx(Arc::new(AtomicUsize::new(0)));
        let server = std::thread::spawn(move || handle_connection(a, &c));
        write_frame(&mut b, &ping(1)).unwrap();
        drop(b);
        server.join().unwrap();
    }

    #[test]
    fn panicking_handler_is_contained() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = Context {
            shutdown: Box::new(|| panic!("injected")),
            ..ctx(Arc::new(AtomicUsize::new(0)))
        };
        spawn_connection(a, Arc::new(c));
        let req = Request {
            id: 1,
            body: RequestBody::Shutdown,
        };
        write_frame(&mut b, &req).unwrap();
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!(r.body, ResponseBody::ShuttingDown);
        // The handler panicked after replying: the connection is closed.
        assert!(matches!(
            read_frame::<_, Response>(&mut b),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn concurrent_connections_are_served() {
        let dir = std::env::temp_dir().join(format!("vessel-agent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let c = Arc::new(ctx(Arc::new(AtomicUsize::new(0))));
        let server = std::thread::spawn(move || serve(listener.incoming().take(3), c));
        // Three clients connected at once, each waiting for its first reply
        // while the others are open, then interleaving requests.
        let mut clients: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        for round in 0..5u64 {
            for (i, s) in clients.iter_mut().enumerate() {
                write_frame(s, &ping(round * 10 + i as u64)).unwrap();
            }
            for (i, s) in clients.iter_mut().enumerate() {
                let r: Response = read_frame(s).unwrap();
                assert_eq!(r.id, round * 10 + i as u64);
            }
        }
        drop(clients);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

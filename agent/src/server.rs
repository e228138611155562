//! The vsock server: a pool of threads that accept connections and answer
//! requests, one connection per thread at a time. Connection handling is
//! generic over `Read + Write` (and the pool over any [`Accept`]or), so it
//! is tested on the host with Unix sockets.
//!
//! Why a pool: creating a thread (clone, stack mmap and mprotect, first
//! page faults) costs tens of milliseconds of guest kernel time on hosts
//! where ring 0 is emulated, and a thread created per connection put that
//! on the path of every request, most visibly the first one after a
//! snapshot restore. Pool threads exist already in the snapshot. Exactly
//! one of them (the leader) waits in `accept`; vsock's accept wait is not
//! exclusive, so several threads in `accept` would all wake up for each
//! connection. The leader hands the role to a waiting follower as soon as
//! it has a connection, and serves it; a new thread is created only when
//! every thread is busy with a connection.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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

/// A listening socket that pool threads accept connections from.
pub trait Accept: Send + Sync + 'static {
    /// A connection.
    type Conn: Read + Write + Into<OwnedFd> + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> io::Result<Self::Conn>;
}

/// The agent's vsock listener.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Accepts on `fd` (see [`listen`]).
    pub fn new(fd: OwnedFd) -> VsockListener {
        VsockListener { fd }
    }
}

impl Accept for VsockListener {
    type Conn = File;

    fn accept(&self) -> io::Result<File> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else
                // owns; the File takes ownership.
                Ok(fd) => return Ok(unsafe { File::from_raw_fd(fd) }),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Threads waiting to become the leader (beyond these, a thread whose
/// connection ends exits). With the leader, this many connections can
/// arrive at once without a thread being created for them.
pub const SPARE_THREADS: usize = 2;

/// Consecutive accept errors after which a thread slows down.
const ACCEPT_ERRORS_BEFORE_BACKOFF: u32 = 3;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Default)]
struct PoolState {
    /// A thread is in `accept`.
    leader: bool,
    /// Threads waiting to become the leader.
    followers: usize,
}

struct Pool<A: Accept> {
    listener: A,
    ctx: Arc<Context>,
    state: Mutex<PoolState>,
    next_leader: Condvar,
}

impl<A: Accept> Pool<A> {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Nothing panics while holding the lock; a poisoned state is fine.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until this thread is the leader. False: enough threads wait
    /// already, this one should end (never for a `permanent` one).
    fn become_leader(&self, permanent: bool) -> bool {
        let mut st = self.lock();
        while st.leader {
            if !permanent && st.followers >= SPARE_THREADS {
                return false;
            }
            st.followers += 1;
            st = self
                .next_leader
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
            st.followers -= 1;
        }
        st.leader = true;
        true
    }

    /// Gives up the leader role: to a waiting follower, or to a new thread
    /// when none waits.
    fn hand_over(self: &Arc<Self>) {
        let mut st = self.lock();
        st.leader = false;
        if st.followers > 0 {
            drop(st);
            self.next_leader.notify_one();
            return;
        }
        drop(st);
        if let Err(e) = spawn_worker(self.clone(), false) {
            // This thread takes the role again after its connection.
            log_fmt(format_args!("cannot start a server thread: {e}"));
        }
    }
}

/// Serves connections from `listener` with a pool of threads, forever. The
/// calling thread is one of them and never leaves.
pub fn serve<A: Accept>(listener: A, ctx: Arc<Context>) {
    let pool = Arc::new(Pool {
        listener,
        ctx,
        state: Mutex::new(PoolState::default()),
        next_leader: Condvar::new(),
    });
    for _ in 0..SPARE_THREADS {
        if let Err(e) = spawn_worker(pool.clone(), false) {
            log_fmt(format_args!("cannot start a server thread: {e}"));
        }
    }
    work(&pool, true);
}

fn spawn_worker<A: Accept>(pool: Arc<Pool<A>>, permanent: bool) -> io::Result<()> {
    std::thread::Builder::new()
        .stack_size(CONN_STACK)
        .spawn(move || work(&pool, permanent))
        .map(drop)
}

/// One pool thread: lead (accept), hand over, serve, repeat. Accept
/// errors are logged (the first of a run, or all with `debug`) and, when
/// they repeat (e.g. out of descriptors), slowed down; the leader keeps its
/// role meanwhile, so failing accepts never start threads.
fn work<A: Accept>(pool: &Arc<Pool<A>>, permanent: bool) {
    let mut buf = vec![0u8; CONN_READ_BUF];
    while pool.become_leader(permanent) {
        let mut consecutive_errors = 0u32;
        let stream = loop {
            match pool.listener.accept() {
                Ok(stream) => break stream,
                Err(e) => {
                    consecutive_errors += 1;
                    if consecutive_errors == 1 || pool.ctx.debug {
                        log_fmt(format_args!("accept: {e}"));
                    }
                    if consecutive_errors > ACCEPT_ERRORS_BEFORE_BACKOFF {
                        std::thread::sleep(ACCEPT_BACKOFF);
                    }
                }
            }
        };
        pool.hand_over();
        serve_connection(stream, &pool.ctx, &mut buf);
    }
}

/// Serves one connection on this thread. A panic in the handler is caught
/// and ends only that connection: PID 1 must never exit.
fn serve_connection<S: Read + Write + Into<OwnedFd>>(stream: S, ctx: &Context, buf: &mut [u8]) {
    if ctx.debug {
        log_fmt(format_args!("connection accepted at {} ms", boottime_ms()));
    }
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle_connection_with(stream, ctx, buf)
    }));
    if served.is_err() {
        log("connection handler panicked; connection dropped");
    }
}

fn error(id: u64, code: ErrorCode, message: String) -> Response {
    Response {
        id,
        body: ResponseBody::Error(ErrorReply { code, message }),
    }
}

/// Serves one connection until the peer closes it or the stream is out of
/// step with the framing.
#[cfg(test)]
pub fn handle_connection<S: Read + Write + Into<OwnedFd>>(stream: S, ctx: &Context) {
    let mut buf = vec![0u8; CONN_READ_BUF];
    handle_connection_with(stream, ctx, &mut buf);
}

/// [`handle_connection`] with the caller's read buffer: pool threads keep
/// one for all their connections, because a buffer allocated and freed per
/// connection costs an `mmap` and a `munmap` (musl's allocator returns an
/// empty group to the kernel) plus page faults on fresh pages, each of them
/// expensive guest kernel work on some hosts.
fn handle_connection_with<S: Read + Write + Into<OwnedFd>>(
    stream: S,
    ctx: &Context,
    buf: &mut [u8],
) {
    let mut reader = Buffered::new(stream, buf);
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
            if reader.buffered() > 0 {
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

/// A buffered reader over a borrowed buffer (std's `BufReader` owns its
/// buffer). A small frame, header and body, costs one `read`.
struct Buffered<'a, S> {
    inner: S,
    buf: &'a mut [u8],
    pos: usize,
    filled: usize,
}

impl<'a, S: Read> Buffered<'a, S> {
    fn new(inner: S, buf: &'a mut [u8]) -> Self {
        Buffered {
            inner,
            buf,
            pos: 0,
            filled: 0,
        }
    }

    fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Bytes read from the stream but not consumed yet.
    fn buffered(&self) -> usize {
        self.filled - self.pos
    }

    fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Read> Read for Buffered<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.filled {
            // Large reads bypass the buffer, like std's BufReader.
            if out.len() >= self.buf.len() {
                return self.inner.read(out);
            }
            self.filled = self.inner.read(self.buf)?;
            self.pos = 0;
        }
        let available = &self.buf[self.pos..self.filled];
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.pos += n;
        Ok(n)
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
        RequestBody::MmapReadFile(r) => (
            answer(crate::fs::mmap_read_file(&r).map(ResponseBody::FileData)),
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
        RequestBody::PauseContainer(r) => (
            answer(containers.pause(&r).map(|()| ResponseBody::Paused)),
            None,
        ),
        RequestBody::ResumeContainer(r) => (
            answer(containers.resume(&r).map(|()| ResponseBody::Resumed)),
            None,
        ),
        RequestBody::UpdateContainer(r) => (
            answer(containers.update(&r).map(|()| ResponseBody::Updated)),
            None,
        ),
        RequestBody::ContainerStats(r) => (
            answer(containers.stats(&r).map(ResponseBody::ContainerStats)),
            None,
        ),
        RequestBody::ConfigureNetwork(c) => (
            answer(crate::net::configure(&c).map(|()| ResponseBody::NetworkConfigured)),
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
        spawn_served(a, c);
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
        spawn_served(a, Arc::new(c));
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

    /// Serves one connection in a thread with the production stack size.
    fn spawn_served<S: Read + Write + Into<OwnedFd> + Send + 'static>(
        stream: S,
        ctx: Arc<Context>,
    ) {
        std::thread::Builder::new()
            .stack_size(CONN_STACK)
            .spawn(move || serve_connection(stream, &ctx, &mut vec![0u8; CONN_READ_BUF]))
            .unwrap();
    }

    impl Accept for UnixListener {
        type Conn = UnixStream;

        fn accept(&self) -> io::Result<UnixStream> {
            UnixListener::accept(self).map(|(s, _)| s)
        }
    }

    #[test]
    fn concurrent_connections_are_served() {
        let dir = std::env::temp_dir().join(format!("vessel-agent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let c = Arc::new(ctx(Arc::new(AtomicUsize::new(0))));
        // The pool never returns; the thread ends with the test process.
        std::thread::spawn(move || serve(listener, c));
        // More clients at once than the pool has spare threads, each
        // waiting for its first reply while the others are open, then
        // interleaving requests.
        let n = SPARE_THREADS as u64 + 3;
        for generation in 0..2u64 {
            let mut clients: Vec<UnixStream> = (0..n)
                .map(|_| UnixStream::connect(&path).unwrap())
                .collect();
            for round in 0..5u64 {
                for (i, s) in clients.iter_mut().enumerate() {
                    write_frame(s, &ping(generation * 1000 + round * 10 + i as u64)).unwrap();
                }
                for (i, s) in clients.iter_mut().enumerate() {
                    let r: Response = read_frame(s).unwrap();
                    assert_eq!(r.id, generation * 1000 + round * 10 + i as u64);
                }
            }
            // Closed connections free their threads for the next ones.
            drop(clients);
        }
        // One after another: served by the threads that are left.
        for i in 0..5u64 {
            let mut s = UnixStream::connect(&path).unwrap();
            write_frame(&mut s, &ping(i)).unwrap();
            let r: Response = read_frame(&mut s).unwrap();
            assert_eq!(r.id, i);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pool_keeps_one_leader_and_bounded_followers() {
        struct Never;
        impl Accept for Never {
            type Conn = UnixStream;
            fn accept(&self) -> io::Result<UnixStream> {
                Err(io::Error::other("unused"))
            }
        }
        let pool = Arc::new(Pool {
            listener: Never,
            ctx: Arc::new(ctx(Arc::new(AtomicUsize::new(0)))),
            state: Mutex::new(PoolState::default()),
            next_leader: Condvar::new(),
        });
        assert!(pool.become_leader(false));
        // With a leader and SPARE_THREADS followers, another thread ends.
        pool.lock().followers = SPARE_THREADS;
        assert!(!pool.become_leader(false));
        // Handing over to a waiting follower clears the role and starts no
        // thread (`Never` would fail any accept).
        pool.lock().followers = 1;
        pool.hand_over();
        assert!(!pool.lock().leader);
    }

    #[test]
    fn accept_errors_keep_the_leader_and_later_connections_work() {
        struct Flaky {
            script: Mutex<std::collections::VecDeque<io::Result<UnixStream>>>,
        }
        impl Accept for Flaky {
            type Conn = UnixStream;
            fn accept(&self) -> io::Result<UnixStream> {
                loop {
                    if let Some(next) = self.script.lock().unwrap().pop_front() {
                        return next;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut script: std::collections::VecDeque<io::Result<UnixStream>> =
            (0..2).map(|_| Err(io::Error::other("injected"))).collect();
        script.push_back(Ok(a));
        let listener = Flaky {
            script: Mutex::new(script),
        };
        let c = Arc::new(ctx(Arc::new(AtomicUsize::new(0))));
        std::thread::spawn(move || serve(listener, c));
        write_frame(&mut b, &ping(1)).unwrap();
        let r: Response = read_frame(&mut b).unwrap();
        assert_eq!(r.id, 1);
    }

    #[test]
    fn buffered_reader_across_small_reads_and_a_small_buffer() {
        /// Hands out at most 3 bytes per read.
        struct Trickle(std::io::Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(3);
                self.0.read(&mut out[..n])
            }
        }
        let mut wire = Vec::new();
        for id in 0..4 {
            write_frame(&mut wire, &ping(id)).unwrap();
        }
        let mut buf = [0u8; 8];
        let mut r = Buffered::new(Trickle(std::io::Cursor::new(wire)), &mut buf);
        for id in 0..4 {
            let req: Request = read_frame(&mut r).unwrap();
            assert_eq!(req.id, id);
        }
        assert!(matches!(
            read_frame::<_, Request>(&mut r),
            Err(FrameError::Closed)
        ));
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
}

//! The vsock server: accept connections, one thread each, and answer
//! requests. Connection handling is generic over `Read + Write` so it is
//! tested on the host with Unix socket pairs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{
    accept4, bind, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use vessel_proto::frame::{read_frame_bytes, write_frame};
use vessel_proto::{
    ErrorCode, ErrorReply, FrameError, PingReply, Request, RequestBody, Response, ResponseBody,
    Uname, PROTOCOL_VERSION,
};

use crate::init::{boottime_ms, log};

/// `VMADDR_CID_ANY`.
const CID_ANY: u32 = u32::MAX;

/// What request handlers need.
pub struct Context {
    /// Verbose logging.
    pub debug: bool,
    /// Guest CLOCK_BOOTTIME (ms) when /init started.
    pub init_started_ms: u64,
    /// Guest CLOCK_BOOTTIME (ms) when the listener was ready.
    pub listening_ms: OnceLock<u64>,
    /// Powers the VM off (tests inject a stub).
    pub shutdown: Box<dyn Fn() + Send + Sync>,
}

/// Creates the vsock listener.
pub fn listen(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(CID_ANY, port),
    )?;
    nix::sys::socket::listen(&fd, Backlog::new(64)?)?;
    Ok(fd)
}

/// Accepts connections forever, one thread per connection.
pub fn serve(listener: OwnedFd, ctx: Context) -> ! {
    let _ = ctx.listening_ms.set(boottime_ms());
    announce_ready();
    let ctx = Arc::new(ctx);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut consecutive_errors = 0u32;
    loop {
        match accept4(raw, SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                consecutive_errors = 0;
                // SAFETY: accept4 returned a new file descriptor that nothing
                // else owns.
                let stream = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                let ctx = ctx.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            handle_connection(stream, &ctx)
                        }));
                        if r.is_err() {
                            log("connection handler panicked; connection dropped");
                        }
                    });
                if let Err(e) = spawned {
                    log(&format!("cannot start a connection thread: {e}"));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                consecutive_errors += 1;
                if consecutive_errors == 1 || ctx.debug {
                    log(&format!("accept: {e}"));
                }
                if consecutive_errors > 3 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// Tells a waiting host that we listen: connect to the host's ready port
/// and close. Without a host listener this is one refused connect.
fn announce_ready() {
    let Ok(fd) = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return;
    };
    let addr = VsockAddr::new(vessel_proto::HOST_CID, vessel_proto::READY_PORT);
    let _ = nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
}

fn error(id: u64, code: ErrorCode, message: String) -> Response {
    Response {
        id,
        body: ResponseBody::Error(ErrorReply { code, message }),
    }
}

/// Serves one connection until the peer closes it or the stream is unusable.
pub fn handle_connection<S: Read + Write>(mut stream: S, ctx: &Context) {
    loop {
        let body = match read_frame_bytes(&mut stream) {
            Ok(b) => b,
            Err(FrameError::Closed) => return,
            Err(e) => {
                // The stream may be out of step with frame boundaries: answer
                // once and close.
                if !matches!(e, FrameError::Io(_)) {
                    let _ = write_frame(
                        &mut stream,
                        &error(0, ErrorCode::InvalidRequest, e.to_string()),
                    );
                }
                if ctx.debug {
                    log(&format!("closing connection: {e}"));
                }
                return;
            }
        };
        let (response, after) = dispatch(&body, ctx);
        if write_frame(&mut stream, &response).is_err() {
            return;
        }
        if let Some(action) = after {
            action();
        }
    }
}

type After<'a> = Option<&'a (dyn Fn() + Send + Sync)>;

/// Decodes one frame body and answers it; the second value is an action to
/// run after the reply was sent.
pub fn dispatch<'a>(body: &[u8], ctx: &'a Context) -> (Response, After<'a>) {
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            // Tell an unknown request type apart from garbage, keeping the id.
            let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
            let id = value
                .as_ref()
                .and_then(|v| v.get("id"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let code = if value.as_ref().and_then(|v| v.get("body")).is_some() {
                ErrorCode::Unsupported
            } else {
                ErrorCode::InvalidRequest
            };
            return (error(id, code, format!("cannot decode request: {e}")), None);
        }
    };
    match req.body {
        RequestBody::Ping => (
            Response {
                id: req.id,
                body: ResponseBody::Pong(PingReply {
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    protocol_version: PROTOCOL_VERSION,
                    uname: uname(),
                    init_started_ms: Some(ctx.init_started_ms),
                    listening_ms: ctx.listening_ms.get().copied(),
                }),
            },
            None,
        ),
        RequestBody::Shutdown => (
            Response {
                id: req.id,
                body: ResponseBody::ShuttingDown,
            },
            Some(&*ctx.shutdown),
        ),
    }
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

/// Syncs filesystems and reboots; the VMM treats the reset as a clean exit.
pub fn power_off() {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log(&format!("reboot: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vessel_proto::frame::{read_frame, write_frame_bytes};

    fn ctx(counter: Arc<AtomicUsize>) -> Context {
        Context {
            debug: false,
            init_started_ms: 5,
            listening_ms: OnceLock::new(),
            shutdown: Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        }
    }

    fn run(frames: impl FnOnce(&mut UnixStream) + Send + 'static) -> (Vec<Response>, usize) {
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

    #[test]
    fn ping_and_shutdown() {
        let (out, shutdowns) = run(|s| {
            write_frame(
                s,
                &Request {
                    id: 1,
                    body: RequestBody::Ping,
                },
            )
            .unwrap();
            write_frame(
                s,
                &Request {
                    id: 2,
                    body: RequestBody::Shutdown,
                },
            )
            .unwrap();
        });
        assert_eq!(out.len(), 2);
        match &out[0].body {
            ResponseBody::Pong(p) => {
                assert_eq!(p.uname.sysname, "Linux");
                assert_eq!(p.init_started_ms, Some(5));
                assert_eq!(out[0].id, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            out[1],
            Response {
                id: 2,
                body: ResponseBody::ShuttingDown
            }
        );
        assert_eq!(shutdowns, 1);
    }

    #[test]
    fn unknown_type_and_bad_json_keep_the_connection() {
        let (out, _) = run(|s| {
            write_frame_bytes(s, br#"{"id":4,"body":{"Frobnicate":{}}}"#).unwrap();
            write_frame_bytes(s, b"not json").unwrap();
            write_frame(
                s,
                &Request {
                    id: 5,
                    body: RequestBody::Ping,
                },
            )
            .unwrap();
        });
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[0].body, ResponseBody::Error(e) if e.code == ErrorCode::Unsupported));
        assert_eq!(out[0].id, 4);
        assert!(
            matches!(&out[1].body, ResponseBody::Error(e) if e.code == ErrorCode::InvalidRequest)
        );
        assert!(matches!(out[2].body, ResponseBody::Pong(_)));
    }

    #[test]
    fn oversized_frame_is_answered_and_closed() {
        let (out, _) = run(|s| {
            s.write_all(&u32::MAX.to_be_bytes()).unwrap();
            s.write_all(b"junk after").unwrap();
        });
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].body, ResponseBody::Error(e) if e.message.contains("exceeds")));
    }

    #[test]
    fn truncated_frame_is_answered_and_closed() {
        let (out, _) = run(|s| {
            s.write_all(&100u32.to_be_bytes()).unwrap();
            s.write_all(b"{\"id\":").unwrap();
        });
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].body, ResponseBody::Error(e) if e.message.contains("truncated")));
    }
}

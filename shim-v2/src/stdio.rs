//! A process's stdio as containerd passes it: FIFO paths (`ctr`, CRI's
//! log copier), or a log URI (`binary://LOGGER?k=v`, `file:///PATH`), and a
//! pty when the process has a terminal.
//!
//! - **stdout/stderr** FIFOs are opened here and given to the (exec-)
//!   monitor as its stdout/stderr: the relay from the guest writes into
//!   them with no copy in the shim.
//! - **stdin** is relayed by a thread from the FIFO into a pipe that is the
//!   monitor's stdin, so that the client closing its end of the FIFO
//!   (`ctr run` at EOF of its own stdin), CloseIO, or the process's end
//!   closes the pipe and the process reads EOF. The FIFO is opened
//!   read-only and non-blocking (the open neither blocks nor fails when
//!   the client has not opened its end yet), and the relay polls it: a
//!   FIFO reports hang-up only once a writer that came after our open has
//!   gone, so "no writer yet" is not taken for EOF.
//! - **terminal**: the monitor sends the host pty's master to a console
//!   socket of ours (as runc does for the runc shim); threads copy stdin
//!   FIFO → master and master → stdout FIFO; ResizePty sets the master's
//!   window size, which the monitor forwards to the guest.
//! - **`binary://`**: the logger is started as containerd's shims do
//!   (`CONTAINER_ID`, `CONTAINER_NAMESPACE`; fd 3 stdout, fd 4 stderr, fd 5
//!   closed by the logger when it is ready, waited for at most 10 s).
//! - **`file://`**: the file is opened for append (created 0640) and is the
//!   process's stdout and stderr.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a `binary://` logger may take to say it is ready.
const LOGGER_READY: Duration = Duration::from_secs(10);

/// The stdio containerd gave a process.
#[derive(Clone, Debug, Default)]
pub struct Paths {
    /// stdin FIFO ("" = none).
    pub stdin: String,
    /// stdout FIFO or log URI.
    pub stdout: String,
    /// stderr FIFO ("" with a log URI or a terminal).
    pub stderr: String,
    /// The process has a pty.
    pub terminal: bool,
}

/// A stdio failure.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StdioError {
    what: String,
    source: std::io::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StdioError {
    let what = what.into();
    move |source| StdioError { what, source }
}

type Result<T> = std::result::Result<T, StdioError>;

/// What the monitor of a process gets: its stdio, or a console socket.
pub struct Prepared {
    /// stdin, stdout, stderr of the monitor (without a terminal).
    pub fds: Option<Arc<[OwnedFd; 3]>>,
    /// The console socket's path (terminal).
    pub console_socket: Option<PathBuf>,
    console: Option<UnixListener>,
    stdin_fifo: Option<File>,
    stdin_pipe: Option<File>,
    stdout_fifo: Option<File>,
    logger: Option<Child>,
}

impl Prepared {
    /// Opens `p`'s FIFOs, or starts its logger, or binds a console socket
    /// at `console_at` (a terminal process).
    pub fn new(p: &Paths, console_at: &Path, id: &str, namespace: &str) -> Result<Prepared> {
        let mut r = Prepared {
            fds: None,
            console_socket: None,
            console: None,
            stdin_fifo: None,
            stdin_pipe: None,
            stdout_fifo: None,
            logger: None,
        };
        if !p.stdin.is_empty() {
            r.stdin_fifo = Some(open_stdin_fifo(&p.stdin)?);
        }
        if p.terminal {
            let _ = std::fs::remove_file(console_at);
            let l = UnixListener::bind(console_at)
                .map_err(err(format!("binding {}", console_at.display())))?;
            l.set_nonblocking(true)
                .map_err(err("setting the console socket non-blocking"))?;
            r.console = Some(l);
            r.console_socket = Some(console_at.to_path_buf());
            if !p.stdout.is_empty() {
                r.stdout_fifo = Some(open_fifo(&p.stdout)?);
            }
            return Ok(r);
        }
        let stdin: OwnedFd = if r.stdin_fifo.is_some() {
            let (rd, wr) = std::io::pipe().map_err(err("creating the stdin pipe"))?;
            r.stdin_pipe = Some(File::from(OwnedFd::from(wr)));
            rd.into()
        } else {
            null()?
        };
        let (out, errf) = if let Some(rest) = p.stdout.strip_prefix("binary://") {
            let (logger, out, errf) = start_logger(rest, id, namespace)?;
            r.logger = Some(logger);
            (out, errf)
        } else if let Some(path) = p.stdout.strip_prefix("file://") {
            let f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)
                .map_err(err(format!("opening the log file {path}")))?;
            let f2 = f.try_clone().map_err(err("duplicating the log file"))?;
            (OwnedFd::from(f), OwnedFd::from(f2))
        } else {
            let o = if p.stdout.is_empty() {
                null()?
            } else {
                open_fifo(&p.stdout)?.into()
            };
            let e = if p.stderr.is_empty() {
                null()?
            } else {
                open_fifo(&p.stderr)?.into()
            };
            (o, e)
        };
        r.fds = Some(Arc::new([stdin, out, errf]));
        Ok(r)
    }

    /// After the monitor started the process: takes the pty master from
    /// the console socket, starts the relays, and gives back what CloseIO
    /// and ResizePty need.
    pub fn started(mut self, id: &str) -> Result<Io> {
        // The monitor's own descriptors are its now.
        self.fds = None;
        let stop = StopPipe::new()?;
        let mut io = Io {
            stop: Mutex::new(Some(stop.writer)),
            master: None,
            logger: self.logger.take(),
        };
        if let Some(l) = self.console.take() {
            let master = receive_master(&l, id)?;
            if let Some(p) = &self.console_socket {
                let _ = std::fs::remove_file(p);
            }
            let master = Arc::new(File::from(master));
            if let Some(fifo) = self.stdin_fifo.take() {
                let dst = master
                    .try_clone()
                    .map_err(err("duplicating the pty master"))?;
                spawn_copy(fifo, dst, Some(stop.reader), id, "stdin");
            }
            if let Some(out) = self.stdout_fifo.take() {
                let src = master
                    .try_clone()
                    .map_err(err("duplicating the pty master"))?;
                spawn_copy(src, out, None, id, "terminal output");
            }
            io.master = Some(master);
        } else if let (Some(fifo), Some(pipe)) = (self.stdin_fifo.take(), self.stdin_pipe.take()) {
            spawn_copy(fifo, pipe, Some(stop.reader), id, "stdin");
        }
        Ok(io)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.console.is_some() {
            if let Some(p) = &self.console_socket {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some(mut l) = self.logger.take() {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
}

/// The running process's stdio: CloseIO and ResizePty act on it.
pub struct Io {
    stop: Mutex<Option<OwnedFd>>,
    master: Option<Arc<File>>,
    logger: Option<Child>,
}

impl Io {
    /// CloseIO: ends the stdin relay, so the process reads EOF.
    pub fn close_stdin(&self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// ResizePty: the pty's new size (the monitor forwards it).
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        let Some(m) = &self.master else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the process has no terminal",
            ));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live pointer.
        if unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// After the process exited: ends the stdin relay and lets the logger
    /// finish (it reads EOF once the monitor's copies are closed).
    pub fn finish(&mut self) {
        self.close_stdin();
        if let Some(mut l) = self.logger.take() {
            std::thread::spawn(move || {
                let _ = l.wait();
            });
        }
    }
}

fn null() -> Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(err("opening /dev/null"))
}

/// Opens a FIFO containerd created. O_RDWR never blocks on a FIFO and
/// never reads EOF while we hold it; O_NONBLOCK keeps a path that is not
/// a FIFO (or a FIFO on a stuck file system) from hanging us, and is
/// cleared again after the open.
fn open_fifo(path: &str) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err(format!("opening the FIFO {path}")))?;
    // SAFETY: fcntl(F_GETFL/F_SETFL) on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(StdioError {
                what: format!("clearing O_NONBLOCK on {path}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(f)
}

/// A pipe whose write end's close wakes a relay blocked in poll.
struct StopPipe {
    reader: OwnedFd,
    writer: OwnedFd,
}

impl StopPipe {
    fn new() -> Result<StopPipe> {
        let (r, w) = std::io::pipe().map_err(err("creating a pipe"))?;
        Ok(StopPipe {
            reader: r.into(),
            writer: w.into(),
        })
    }
}

/// Opens a stdin FIFO for reading without blocking (see the module
/// documentation); the descriptor stays non-blocking.
fn open_stdin_fifo(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err(format!("opening the stdin FIFO {path}")))
}

/// Copies `src` to `dst` in a thread until EOF or an error on either, or
/// until `stop`'s write end is closed (`src` may be non-blocking when
/// `stop` is given).
fn spawn_copy(
    mut src: impl Read + AsRawFd + Send + 'static,
    mut dst: impl Write + Send + 'static,
    stop: Option<OwnedFd>,
    id: &str,
    what: &'static str,
) {
    let id = id.to_string();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            if let Some(stop) = &stop {
                if !wait_readable(src.as_raw_fd(), stop.as_raw_fd()) {
                    break;
                }
            }
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => {
                    // EIO: the pty's other side is gone.
                    tracing::debug!("{id}: {what} relay: {e}");
                    break;
                }
            }
        }
    });
}

/// Polls `fd` and `stop`: true when `fd` is readable (or hung up), false
/// once `stop`'s writer is closed.
fn wait_readable(fd: RawFd, stop: RawFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll(2) on an array of two pollfd we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Accepts the monitor's connection on the console socket (it connected
/// before it reported the process started) and receives the pty master.
fn receive_master(l: &UnixListener, id: &str) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let deadline = Instant::now() + Duration::from_secs(10);
    let conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err(format!("{id}: accepting on the console socket"))(e)),
        }
    };
    conn.set_nonblocking(false)
        .map_err(err("setting the console connection blocking"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err("setting a timeout on the console connection"))?;
    let mut name = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| StdioError {
        what: format!("{id}: receiving the pty master"),
        source: e.into(),
    })?;
    let mut got: Option<OwnedFd> = None;
    for c in msg.cmsgs().map_err(|e| StdioError {
        what: format!("{id}: reading the console message"),
        source: e.into(),
    })? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS gave us this descriptor; we own it
                // from here (each is taken once).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| StdioError {
        what: format!("{id}: the console message carried no descriptor"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

/// Starts a `binary://` logger: `rest` is `PATH[?k=v&...]`; returns it
/// and the write ends of its stdout and stderr pipes.
fn start_logger(rest: &str, id: &str, namespace: &str) -> Result<(Child, OwnedFd, OwnedFd)> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = percent_decode(path);
    if !path.starts_with('/') {
        return Err(StdioError {
            what: format!("log URI binary://{rest}: the logger path is not absolute"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    let mut args = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        args.push(percent_decode(k));
        if !v.is_empty() {
            args.push(percent_decode(v));
        }
    }
    let (out_r, out_w) = std::io::pipe().map_err(err("creating the logger's stdout pipe"))?;
    let (err_r, err_w) = std::io::pipe().map_err(err("creating the logger's stderr pipe"))?;
    let (mut ready_r, ready_w) =
        std::io::pipe().map_err(err("creating the logger's ready pipe"))?;
    let fds: [RawFd; 3] = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(&path);
    cmd.args(&args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the child between fork and exec; dup2(2) and
    // fcntl(2) are async-signal-safe and allocate nothing. The targets
    // 3..=5 may collide with the sources, so the sources are moved above
    // 10 first.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (i, fd) in fds.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD, 10);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*h);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(err(format!("starting the logger {path}")))?;
    drop((out_r, err_r, ready_w));
    // Ready once the logger closed fd 5 (EOF), or wrote to it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(ready_r.read(&mut b));
    });
    if rx.recv_timeout(LOGGER_READY).is_err() {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        return Err(StdioError {
            what: format!("the logger {path} did not get ready within {LOGGER_READY:?}"),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        });
    }
    Ok((child, out_w.into(), err_w.into()))
}

/// `%XX` escapes of a URI component.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_components_are_decoded() {
        assert_eq!(percent_decode("/usr/bin/my%20logger"), "/usr/bin/my logger");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%42"), "AB");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}

//! Terminals on the host side of a terminal process (`process.terminal`).
//!
//! The guest agent owns the process's real pty (in the guest) and relays
//! its master over one vsock stream (`StdioStream::Terminal`). On the host
//! that stream is connected to one of:
//!
//! - a **console** (`--console-socket`): we open a host pty, send its
//!   master to the socket with `SCM_RIGHTS` exactly like runc (one message,
//!   the data is the name `/dev/ptmx`, one descriptor), and relay between
//!   the host slave (raw mode: the guest pty does the line discipline) and
//!   the stream. The engine (conmon, containerd) owns the master;
//! - the **caller's terminal** (foreground `run -t` / `exec -t` without a
//!   socket): the relay reads our stdin and writes our stdout; the caller's
//!   terminal is put in raw mode by the foreground command ([`RawMode`]).
//!
//! Window size: the host side polls `TIOCGWINSZ` on its end (the console
//! slave, or our terminal) every [`WINSIZE_POLL`] and sends
//! `ResizeTerminal` when it changes. Polling is host-only work; the guest
//! only sees real changes. (SIGWINCH does not reach us: the host pty is not
//! our controlling terminal, and the monitor runs in a session of its own.)

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Context, Result};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// How often the window size is checked.
pub const WINSIZE_POLL: Duration = Duration::from_millis(200);

/// The host end of a terminal process.
pub enum HostEnd {
    /// The slave of a pty whose master went to `--console-socket`.
    Console(OwnedFd),
    /// Our own stdin/stdout (the caller's terminal, or pipes).
    Caller,
}

fn cloexec(fd: &OwnedFd) -> Result<()> {
    // SAFETY: fcntl(F_SETFD) on a descriptor we own; no memory involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx("fcntl(FD_CLOEXEC)");
    }
    Ok(())
}

/// Opens a host pty, sends its master to the Unix socket `socket` (like
/// runc: `SCM_RIGHTS`, data `/dev/ptmx`) and returns the slave, in raw
/// mode, with the window size `size` (rows, cols) if given.
pub fn send_console(socket: &Path, size: Option<(u16, u16)>) -> Result<OwnedFd> {
    let ws = size.map(|(rows, cols)| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pty = nix::pty::openpty(ws.as_ref(), None::<&Termios>).ctx("opening a pty")?;
    cloexec(&pty.master)?;
    cloexec(&pty.slave)?;
    let mut t = tcgetattr(&pty.slave).ctx("tcgetattr on the pty")?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).ctx("setting the pty to raw mode")?;
    let conn = UnixStream::connect(socket)
        .with_ctx(|| format!("connecting to the console socket {}", socket.display()))?;
    let name = b"/dev/ptmx";
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_ctx(|| format!("sending the pty master to {}", socket.display()))?;
    // The master is the engine's now; ours closes here.
    drop(pty.master);
    Ok(pty.slave)
}

/// The window size of terminal `fd` as (rows, cols), if it is a terminal
/// with a size set.
pub fn winsize(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to a live pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The caller's terminal size (stdin, else stdout), if any.
pub fn caller_winsize() -> Option<(u16, u16)> {
    winsize(std::io::stdin().as_fd()).or_else(|| winsize(std::io::stdout().as_fd()))
}

/// Raw mode on our stdin while it lives (restored on drop), when stdin is
/// a terminal.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal.
    pub fn stdin() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if let Err(e) = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw) {
            tracing::warn!("cannot put the terminal in raw mode: {e}");
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

/// Relays a terminal stream: `conn` <-> the host end. Returns a receiver
/// that gets one message when the process's output has ended (EOF on
/// `conn`). `resize(rows, cols)` is called when the host end's window size
/// differs from the last one the guest got (`initial` first), polled until
/// the output ends.
pub fn relay(
    conn: UnixStream,
    end: HostEnd,
    initial: Option<(u16, u16)>,
    mut resize: impl FnMut(u16, u16) + Send + 'static,
) -> Result<std::sync::mpsc::Receiver<()>> {
    let (input, output, size_fd): (File, File, OwnedFd) = match end {
        HostEnd::Console(slave) => (
            File::from(slave.try_clone().ctx("duplicating the pty")?),
            File::from(slave.try_clone().ctx("duplicating the pty")?),
            slave,
        ),
        HostEnd::Caller => {
            let i = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .ctx("duplicating stdin")?;
            let o = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .ctx("duplicating stdout")?;
            let s = if winsize(i.as_fd()).is_some() {
                i.try_clone()
            } else {
                o.try_clone()
            }
            .ctx("duplicating the terminal")?;
            (File::from(i), File::from(o), s)
        }
    };
    let to_guest = conn.try_clone().ctx("duplicating the terminal stream")?;
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let done = done.clone();
        std::thread::spawn(move || {
            super::relay(conn, output);
            done.store(true, Ordering::SeqCst);
            let _ = tx.send(());
        });
    }
    // Ends at EOF/EIO on the host end (the engine closed the master), or
    // with the process (exit of the command).
    std::thread::spawn(move || super::relay(input, to_guest));
    std::thread::spawn(move || {
        let mut last = initial;
        while !done.load(Ordering::SeqCst) {
            let now = winsize(size_fd.as_fd());
            if now != last {
                if let Some((rows, cols)) = now {
                    resize(rows, cols);
                }
                last = now;
            }
            std::thread::sleep(WINSIZE_POLL);
        }
    });
    Ok(rx)
}

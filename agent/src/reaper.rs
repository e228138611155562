//! Reaping: PID 1 adopts every orphaned process and must wait for it, or
//! zombies pile up; and the agent must hand each container process's exit
//! status to whoever waits for it.
//!
//! Until the first container, a SIGCHLD handler collects every exited
//! child: one system call at start (`rt_sigaction`) against about twenty
//! for a thread, and nothing polls. The first container process switches
//! to [`Reaper`]: a thread that sleeps in `read` on a pipe, which the same
//! handler now writes one byte to instead of reaping. The thread then reaps
//! every exited child, hands the status of each *watched* pid (container
//! inits and execs) to its [`ExitCell`], and drops the others (orphans).
//!
//! Watching is race-free: the process is created while the reaper's table
//! is locked ([`Reaper::spawn_watched`]) and the reaper thread needs that
//! lock to deliver a status, so a child that exits at once is still found.
//! A table entry is removed when its status is delivered, so a pid that
//! the kernel reuses later cannot receive an old status.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Write end of the wake-up pipe once [`Reaper`] runs, else -1.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Stack of the reaper thread.
const REAPER_STACK: usize = 64 * 1024;

/// Installs the SIGCHLD handler. `SA_RESTART` keeps the other threads'
/// blocking calls (accept, read) from failing with EINTR; `SA_NOCLDSTOP`
/// skips stop/continue notifications.
pub fn install() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_sigchld),
        SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls waitpid or write (async-signal-safe)
    // and saves and restores errno; it touches no locks, allocations or
    // shared data but an atomic.
    unsafe { sigaction(Signal::SIGCHLD, &action) }.map(drop)
}

extern "C" fn on_sigchld(_signal: libc::c_int) {
    let saved = Errno::last_raw();
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) of one byte from the stack to a non-blocking
        // pipe that is never closed; a full pipe already means "wake up".
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    } else {
        reap_all();
    }
    Errno::set_raw(saved);
}

/// Collects every child that has exited, without blocking; returns how
/// many. Signals coalesce, so one SIGCHLD may stand for several children.
pub fn reap_all() -> usize {
    let mut reaped = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(_) => reaped += 1,
        }
    }
}

/// Where the exit status of one watched process is delivered.
#[derive(Debug, Default)]
pub struct ExitCell {
    status: Mutex<Option<i32>>,
    cond: Condvar,
}

impl ExitCell {
    /// The raw wait status once the process has exited.
    pub fn get(&self) -> Option<i32> {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the process has exited; returns its raw wait status.
    pub fn wait(&self) -> i32 {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = *g {
                return s;
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn set(&self, raw: i32) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(raw);
        self.cond.notify_all();
    }
}

/// The reaper thread's table of watched pids.
pub struct Reaper {
    watched: Mutex<HashMap<libc::pid_t, Arc<ExitCell>>>,
}

static REAPER: OnceLock<Result<Reaper, String>> = OnceLock::new();

impl Reaper {
    /// The reaper, started on first use.
    pub fn get() -> Result<&'static Reaper, String> {
        REAPER
            .get_or_init(Reaper::start)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn start() -> Result<Reaper, String> {
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("reaper pipe: {e}"))?;
        // The read end blocks; only the handler's end must not.
        nix::fcntl::fcntl(
            &rx,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| format!("reaper pipe: {e}"))?;
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(REAPER_STACK)
            .spawn(move || reaper_thread(rx))
            .map_err(|e| format!("reaper thread: {e}"))?;
        let fd = tx.as_raw_fd();
        // The write end lives for the rest of the agent's life.
        std::mem::forget(tx);
        WAKE_FD.store(fd, Ordering::Release);
        // Children that exited before the switch were reaped by the
        // handler; wake the thread once in case one slipped in between.
        let b = 1u8;
        // SAFETY: one byte from the stack to the pipe created above.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        Ok(Reaper {
            watched: Mutex::new(HashMap::new()),
        })
    }

    /// Locks the table: create the process while holding the guard, then
    /// [`Watch::watch`] its pid.
    pub fn lock(&self) -> Watch<'_> {
        Watch(self.watched.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The locked table of watched pids.
pub struct Watch<'a>(MutexGuard<'a, HashMap<libc::pid_t, Arc<ExitCell>>>);

impl Watch<'_> {
    /// Delivers `pid`'s exit status to the returned cell.
    pub fn watch(&mut self, pid: libc::pid_t) -> Arc<ExitCell> {
        let cell = Arc::new(ExitCell::default());
        self.0.insert(pid, cell.clone());
        cell
    }
}

fn reaper_thread(wake: OwnedFd) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reads into a stack buffer from the pipe we own.
        let n = unsafe { libc::read(wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && Errno::last() != Errno::EINTR {
            crate::init::log_fmt(format_args!("reaper: read: {}", Errno::last()));
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        crate::container::trace::mark("reaper");
        let Ok(reaper) = Reaper::get() else { continue };
        loop {
            let mut raw: libc::c_int = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let cell = reaper.lock().0.remove(&pid);
            if let Some(cell) = cell {
                cell.set(raw);
                if crate::init::debug() {
                    crate::init::log_fmt(format_args!(
                        "pid {pid} exited (status {raw:#x}) at {} ms",
                        crate::init::boottime_ms()
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether `pid` still exists (a zombie does, until reaped).
    fn exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    /// One test for both modes: the handler is process-wide.
    #[test]
    fn handler_reaps_then_thread_delivers_statuses() {
        install().unwrap();
        let pids: Vec<u32> = (0..3)
            .map(|_| std::process::Command::new("true").spawn().unwrap().id())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| exists(p)) {
            assert!(Instant::now() < deadline, "children were not reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reap_all(), 0);

        // Thread mode: a watched child's status arrives in its cell, an
        // unwatched one is reaped all the same.
        let reaper = Reaper::get().unwrap();
        let cell = {
            let mut w = reaper.lock();
            // Not waited for through `Child`: the reaper collects it.
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new("sh")
                .args(["-c", "exit 7"])
                .spawn()
                .unwrap();
            w.watch(child.id() as libc::pid_t)
        };
        let orphan = std::process::Command::new("true").spawn().unwrap().id();
        assert_eq!(cell.wait(), 7 << 8);
        assert_eq!(cell.get(), Some(7 << 8));
        let deadline = Instant::now() + Duration::from_secs(10);
        while exists(orphan) {
            assert!(Instant::now() < deadline, "unwatched child not reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

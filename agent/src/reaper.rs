//! Reaping: PID 1 adopts every orphaned process and must wait for it, or
//! zombies pile up.
//!
//! A SIGCHLD handler collects every exited child. That is one system call at
//! start (`rt_sigaction`), against about twenty for a dedicated reaper
//! thread (stack mapping, clone, signal masks), and nothing polls. Nothing
//! but orphans is a child of the agent yet; once the agent starts container
//! processes whose exit status it must report, reaping moves to one place
//! that hands each status to whoever waits for that pid (a thread blocked
//! in `sigwait`/`signalfd`, started with the first container).

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Installs the SIGCHLD handler. `SA_RESTART` keeps the other threads'
/// blocking calls (accept, read) from failing with EINTR; `SA_NOCLDSTOP`
/// skips stop/continue notifications.
pub fn install() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_sigchld),
        SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls waitpid (async-signal-safe) and saves
    // and restores errno; it touches no locks, allocations or shared data.
    unsafe { sigaction(Signal::SIGCHLD, &action) }.map(drop)
}

extern "C" fn on_sigchld(_signal: libc::c_int) {
    let saved = Errno::last_raw();
    reap_all();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether `pid` still exists (a zombie does, until reaped).
    fn exists(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn exited_children_are_reaped_by_the_handler() {
        install().unwrap();
        let pids: Vec<u32> = (0..3)
            .map(|_| std::process::Command::new("true").spawn().unwrap().id())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| exists(p)) {
            assert!(Instant::now() < deadline, "children were not reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Nothing is left to reap.
        assert_eq!(reap_all(), 0);
    }
}

//! Reaping orphans: PID 1 adopts every orphaned process and must wait for it.
//!
//! SIGCHLD is blocked in every thread (the mask is set before any other
//! thread starts and is inherited); one thread waits for it with sigwait and
//! then collects every exited child. Nothing polls.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Blocks SIGCHLD and starts the reaper thread. Call before other threads start.
pub fn start() -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            if set.wait().is_err() {
                continue;
            }
            reap_all();
        })?;
    Ok(())
}

/// Collects every child that has exited, without blocking.
pub fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

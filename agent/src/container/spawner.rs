//! Threads that create container processes, started from a thread whose
//! capability bounding set is already the usual container's.
//!
//! A container's process drops every capability outside its spec's
//! bounding set, one `prctl(PR_CAPBSET_DROP)` each, and each commits new
//! credentials: on PVM hosts, where guest kernel code is emulated, the 38
//! drops of a typical spec took 150–370 ms of a container start and of
//! every exec. Credentials (and so the bounding set) are per thread and a
//! new thread inherits its creator's: the factory thread started by
//! [`prepare`] drops everything outside [`DEFAULT_BOUNDING`] once, at
//! agent start-up (so a template has it done), and threads it spawns start
//! with that set, their clone3 children too; such a child only drops the
//! few capabilities its spec keeps out of the default set. A spec wanting
//! more than the default (e.g. a privileged container) gets a thread with
//! the agent's full set, as before. Effective and permitted capabilities
//! are untouched: the thread and the child before `execve` stay fully
//! privileged.
//!
//! Threads are kept for the next job: starting one (stack mapping, guard
//! page, signal stack, their page faults) took 60–80 ms of guest time on
//! PVM hosts, at every create and every exec. A job says whether it left
//! its thread as it found it (namespaces restored); such a thread waits
//! for the next job, up to [`MAX_IDLE`] of them. [`prepare`] starts
//! [`PRESTARTED`] of them, so a template's clones have them ready.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock, PoisonError};

use super::spec::CAP_LAST;

/// runc's default capabilities, which docker, podman and containerd give a
/// container unless told otherwise: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP.
pub const DEFAULT_BOUNDING: u64 = bits(&[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31]);

/// Every capability the agent knows.
pub const FULL_BOUNDING: u64 = (1u64 << (CAP_LAST + 1)) - 1;

const fn bits(caps: &[u32]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < caps.len() {
        m |= 1u64 << caps[i];
        i += 1;
    }
    m
}

/// A job gets its thread's bounding set and returns whether the thread may
/// run another job (it restored what it changed of the thread).
type Job = Box<dyn FnOnce(u64) -> bool + Send>;

/// The factory thread's queue of (job, stack size).
type Queue = Mutex<Sender<(Job, usize)>>;

/// The queue, or `None` when the factory could not start.
static FACTORY: OnceLock<Option<Queue>> = OnceLock::new();

/// Threads waiting for a job: their stack size and their queue.
static IDLE: Mutex<Vec<(usize, Sender<Job>)>> = Mutex::new(Vec::new());

/// At most this many threads wait for jobs; more end after their job.
pub const MAX_IDLE: usize = 4;

/// Threads [`prepare`] starts for the first jobs.
pub const PRESTARTED: usize = 2;

/// Starts the factory thread, once, and [`PRESTARTED`] idle threads with
/// `stack` bytes of stack. Without the factory (an error is logged) every
/// thread starts with the full set.
pub fn prepare(stack: usize) {
    AGENT_PID_NS.get_or_init(|| {
        std::fs::File::open("/proc/self/ns/pid")
            .map(std::os::fd::OwnedFd::from)
            .ok()
    });
    FACTORY.get_or_init(|| {
        let (tx, rx) = channel::<(Job, usize)>();
        let (ready_tx, ready_rx) = channel();
        let started = std::thread::Builder::new()
            .name("spawner".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let dropped = drop_outside(DEFAULT_BOUNDING);
                let ok = dropped.is_ok();
                let _ = ready_tx.send(dropped);
                if !ok {
                    return;
                }
                for (job, stack) in rx {
                    let spawned = std::thread::Builder::new()
                        .stack_size(stack)
                        .spawn(move || pooled(job, stack));
                    if let Err(e) = spawned {
                        // The job is dropped unrun: its caller sees its
                        // channel or pipe close.
                        crate::init::log_fmt(format_args!("spawner: cannot start a thread: {e}"));
                    }
                }
            });
        let result = started
            .map_err(|e| e.to_string())
            .and_then(|_| ready_rx.recv().map_err(|e| e.to_string())?);
        match result {
            Ok(()) => {
                for _ in 0..PRESTARTED {
                    let idle: Job = Box::new(|_| true);
                    let _ = tx.send((idle, stack));
                }
                Some(Mutex::new(tx))
            }
            Err(e) => {
                crate::init::log_fmt(format_args!("spawner: {e}"));
                None
            }
        }
    });
}

/// The agent's own pid namespace, opened by [`prepare`].
static AGENT_PID_NS: OnceLock<Option<std::os::fd::OwnedFd>> = OnceLock::new();

/// Points the calling thread's children back at the agent's own pid
/// namespace (after a `setns(CLONE_NEWPID)` into a container's); false
/// when it cannot, and the thread must not be reused.
pub fn restore_pid_ns() -> bool {
    use std::os::fd::AsRawFd;
    match AGENT_PID_NS.get() {
        // SAFETY: setns on a namespace descriptor we hold open; it only
        // changes where this thread's children are created.
        Some(Some(fd)) => unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) == 0 },
        _ => false,
    }
}

/// A factory-made thread: runs `job`, then, while the jobs leave it
/// reusable and fewer than [`MAX_IDLE`] threads wait, waits for more.
fn pooled(mut job: Job, stack: usize) {
    loop {
        if !job(DEFAULT_BOUNDING) {
            return;
        }
        let (tx, rx) = channel();
        {
            let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push((stack, tx));
        }
        match rx.recv() {
            Ok(next) => job = next,
            Err(_) => return,
        }
    }
}

/// Drops every capability outside `keep` from the calling thread's
/// bounding set (EINVAL: one this kernel lacks).
fn drop_outside(keep: u64) -> Result<(), String> {
    for cap in 0..=CAP_LAST {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments; it changes this thread.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(format!(
                    "cannot drop capability {cap} from the bounding set: {e}"
                ));
            }
        }
    }
    Ok(())
}

/// Runs `job` on a thread with `stack` bytes of stack: a waiting one or a
/// new one. The thread has the bounding set `job` is given:
/// [`DEFAULT_BOUNDING`] when `wanted` fits in it and the factory runs, else
/// [`FULL_BOUNDING`] (a thread of its own, never reused). `job` returns
/// whether it left the thread as it found it.
pub fn spawn(
    wanted: u64,
    stack: usize,
    job: impl FnOnce(u64) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let mut job: Job = Box::new(job);
    if wanted & !DEFAULT_BOUNDING == 0 {
        if let Some(Some(factory)) = FACTORY.get() {
            // A waiting thread of this stack size, else a new one.
            loop {
                let waiting = {
                    let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
                    let i = idle.iter().rposition(|(s, _)| *s == stack);
                    i.map(|i| idle.swap_remove(i).1)
                };
                let Some(tx) = waiting else { break };
                match tx.send(job) {
                    Ok(()) => return Ok(()),
                    // That thread is gone: try another.
                    Err(back) => job = back.0,
                }
            }
            let tx = factory.lock().unwrap_or_else(PoisonError::into_inner);
            match tx.send((job, stack)) {
                Ok(()) => return Ok(()),
                // The factory is gone: a thread of our own.
                Err(back) => job = back.0 .0,
            }
        }
    }
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || {
            job(FULL_BOUNDING);
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_runcs() {
        let names = [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "NET_BIND_SERVICE",
            "NET_RAW",
            "SYS_CHROOT",
            "MKNOD",
            "AUDIT_WRITE",
            "SETFCAP",
        ];
        let from_names = names.iter().fold(0u64, |m, n| {
            m | 1u64 << crate::container::spec::cap_number(n).expect("known capability")
        });
        assert_eq!(DEFAULT_BOUNDING, from_names);
        assert_eq!(DEFAULT_BOUNDING & !FULL_BOUNDING, 0);
        // CAP_SYS_ADMIN (21) and CAP_NET_ADMIN (12) are not in it.
        assert_eq!(DEFAULT_BOUNDING & (1 << 21 | 1 << 12), 0);
    }
}

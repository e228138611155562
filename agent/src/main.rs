//! `vessel-agent`: PID 1 inside a vessel microVM.
//!
//! It mounts the basic filesystems, reaps orphans, and serves the host over
//! vsock port [`vessel_proto::AGENT_PORT`]. Guest kernel code is expensive on
//! some hosts (emulated ring 0: about half a millisecond per system call), so
//! the start-up path makes as few system calls as it can. PID 1 must never
//! exit (the kernel would panic): every error is logged and survived.
//!
//! The binary has no std runtime start-up (`no_main`): std's would poll
//! fds 0..2, ignore SIGPIPE and set up a stack-overflow handler with an
//! alternate signal stack for the main thread and for every thread spawned
//! later, about a dozen system calls at start and three more per connection,
//! none of which PID 1 needs. The kernel already does not deliver signals
//! with a default action to PID 1 (so SIGPIPE cannot kill it), and a stack
//! overflow ends PID 1 either way. Unit tests use the normal test harness.

#![cfg_attr(not(test), no_main)]
// Under the test harness the entry point is compiled out.
#![cfg_attr(test, allow(dead_code))]

mod container;
mod fs;
mod init;
mod net;
mod reaper;
mod restore;
mod server;

use std::sync::Arc;
use std::time::Duration;

/// Attempts at creating the vsock listener, [`LISTEN_RETRY`] apart.
const LISTEN_ATTEMPTS: u32 = 50;
const LISTEN_RETRY: Duration = Duration::from_millis(100);

/// Entry point called by the C runtime (musl's `__libc_start_main`).
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    // A panic must not unwind into C, and PID 1 must not return.
    if std::panic::catch_unwind(run).is_err() {
        init::log("fatal: the agent panicked, powering off");
    }
    server::power_off();
    loop {
        // SAFETY: pause has no preconditions; it just waits for a signal.
        unsafe { libc::pause() };
    }
}

/// Sets up the guest and serves the host; returns only if there is no
/// vsock listener.
fn run() {
    let init_started_ms = init::boottime_ms();
    let debug = init::setup();
    init::DEBUG.store(debug, std::sync::atomic::Ordering::Relaxed);
    container::trace::open(debug);
    if let Err(e) = reaper::install() {
        init::log_error(&e);
    }
    net::loopback_up();
    net::tune_tcp();
    // Before the snapshot of a template: what every container's cgroup
    // and capability bounding set need is then done once.
    if let Err(e) = container::cgroup::prepare() {
        init::log_fmt(format_args!("cgroups: {e}"));
    }
    container::spawner::prepare(container::EXEC_THREAD_STACK);
    let Some(listener) = listen(debug) else {
        init::log("fatal: no vsock listener, powering off");
        return;
    };
    let listening_ms = init::boottime_ms();
    server::announce_ready();
    init::log_fmt(format_args!(
        "{} ready on vsock port {} ({listening_ms} ms)",
        env!("CARGO_PKG_VERSION"),
        vessel_proto::AGENT_PORT
    ));
    let ctx = Arc::new(server::Context {
        debug,
        init_started_ms,
        listening_ms: Some(listening_ms),
        shutdown: Box::new(server::power_off),
        restored: Box::new(restore::apply),
    });
    server::serve(server::VsockListener::new(listener), ctx);
}

/// Creates the vsock listener. The vsock driver is probed before /init
/// runs, so the first attempt normally succeeds; a late driver gets a few
/// seconds.
fn listen(debug: bool) -> Option<std::os::fd::OwnedFd> {
    for attempt in 0..LISTEN_ATTEMPTS {
        match server::listen(vessel_proto::AGENT_PORT) {
            Ok(listener) => return Some(listener),
            Err(e) => {
                if attempt == 0 || debug {
                    init::log_fmt(format_args!(
                        "cannot listen on vsock port {}: {e}",
                        vessel_proto::AGENT_PORT
                    ));
                }
                std::thread::sleep(LISTEN_RETRY);
            }
        }
    }
    None
}

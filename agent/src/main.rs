//! `vessel-agent`: PID 1 inside a vessel microVM.
//!
//! It mounts the basic filesystems, reaps orphans, and serves the host over
//! vsock port [`vessel_proto::AGENT_PORT`]. Guest kernel code is expensive on
//! some hosts (emulated ring 0: about half a millisecond per syscall), so the
//! start-up path makes as few system calls as it can. PID 1 must never exit
//! (the kernel would panic): every error is logged and survived.

mod init;
mod reaper;
mod server;

use std::time::Duration;

fn main() {
    let started_ms = init::boottime_ms();
    let debug = init::setup();
    if let Err(e) = reaper::start() {
        init::log(&format!("cannot start the reaper: {e}"));
    }
    let ctx = server::Context {
        debug,
        init_started_ms: started_ms,
        listening_ms: std::sync::OnceLock::new(),
        shutdown: Box::new(server::power_off),
    };
    // The vsock driver is probed before /init runs, so the first attempt
    // normally succeeds; retry briefly in case it is late, then give up by
    // powering off, so the host sees the VM end instead of a silent hang.
    for attempt in 0..50 {
        match server::listen(vessel_proto::AGENT_PORT) {
            Ok(listener) => server::serve(listener, ctx),
            Err(e) => {
                if attempt == 0 || debug {
                    init::log(&format!(
                        "cannot listen on vsock port {}: {e}",
                        vessel_proto::AGENT_PORT
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    init::log("fatal: no vsock listener, powering off");
    server::power_off();
}

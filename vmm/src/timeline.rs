//! Boot timeline: monotonic milestones since process start, logged with
//! `tracing` under the `timeline` target (and kept for `--timeline-json`).

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// A boot milestone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Milestone {
    /// `main` started.
    ProcessStart,
    /// VM, memory, devices and kernel are set up.
    VmSetupDone,
    /// The boot vCPU entered the guest for the first time.
    FirstVcpuEntry,
    /// The guest wrote its first byte to the serial port.
    FirstSerialByte,
    /// The agent accepted the first host connection.
    AgentReady,
}

impl Milestone {
    /// Name used in logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Milestone::ProcessStart => "process_start",
            Milestone::VmSetupDone => "vm_setup_done",
            Milestone::FirstVcpuEntry => "first_vcpu_entry",
            Milestone::FirstSerialByte => "first_serial_byte",
            Milestone::AgentReady => "agent_ready",
        }
    }
}

struct Timeline {
    start: Instant,
    marks: Mutex<Vec<(Milestone, f64)>>,
}

static TIMELINE: OnceLock<Timeline> = OnceLock::new();

fn timeline() -> &'static Timeline {
    TIMELINE.get_or_init(|| Timeline {
        start: Instant::now(),
        marks: Mutex::new(Vec::new()),
    })
}

/// Starts the clock (call first thing in `main`).
pub fn start() {
    mark(Milestone::ProcessStart);
}

/// Records `m` once (later calls for the same milestone are ignored) and logs it.
pub fn mark(m: Milestone) {
    let t = timeline();
    let ms = t.start.elapsed().as_secs_f64() * 1000.0;
    let Ok(mut marks) = t.marks.lock() else {
        return;
    };
    if marks.iter().any(|(x, _)| *x == m) {
        return;
    }
    marks.push((m, ms));
    drop(marks);
    tracing::info!(target: "timeline", milestone = m.name(), ms = format!("{ms:.1}"), "boot timeline");
}

/// Milliseconds since [`start`] (for diagnostics that are not milestones,
/// e.g. per-packet vsock traces).
pub fn elapsed_ms() -> f64 {
    timeline().start.elapsed().as_secs_f64() * 1000.0
}

/// CPU time of the whole process (all threads, vCPUs included), in
/// milliseconds: with guest kernel code emulated on the vCPU threads, this
/// measures guest work independently of how busy the host is.
pub fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass, nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// Milestones recorded so far, in order, as (name, milliseconds since start).
pub fn snapshot() -> Vec<(&'static str, f64)> {
    timeline()
        .marks
        .lock()
        .map(|m| m.iter().map(|(x, ms)| (x.name(), *ms)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_recorded_once_in_order() {
        start();
        mark(Milestone::VmSetupDone);
        mark(Milestone::VmSetupDone);
        let s = snapshot();
        assert_eq!(s.iter().filter(|(n, _)| *n == "vm_setup_done").count(), 1);
        let pos_start = s.iter().position(|(n, _)| *n == "process_start").unwrap();
        let pos_setup = s.iter().position(|(n, _)| *n == "vm_setup_done").unwrap();
        assert!(pos_start < pos_setup);
        assert!(s[pos_start].1 <= s[pos_setup].1);
    }
}

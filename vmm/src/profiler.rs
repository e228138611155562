//! A sampling profiler for guest code: where does a boot spend its time?
//!
//! When enabled (`vessel-vmm --profile-rip FILE`), a kicker thread sends a
//! real-time signal to every vCPU thread at a fixed interval. The signal
//! interrupts `KVM_RUN` (the handler does nothing, `SA_RESTART` is not set),
//! the vCPU thread reads the guest's `rip` and counts it, and re-enters the
//! guest. At exit the histogram is written as `<rip hex> <count>` lines,
//! highest count first; `cargo xtask bench profile` maps the addresses to
//! kernel symbols with the build's `System.map`. The first
//! [`MAX_SEQUENCE`] samples are also written in order, as
//! `<ms since VMM start> <rip hex>` lines, to `FILE.seq`: that shows *when*
//! the guest runs what (e.g. the steps between a host request and the
//! guest's answer).
//!
//! On hosts where guest ring 0 is emulated (PVM) boot time is dominated by
//! kernel code, and a sample every millisecond attributes it precisely,
//! including the early set-up that `initcall_debug` cannot see. The cost is
//! one extra exit per interval; nothing of this runs unless enabled.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

static ENABLED: AtomicBool = AtomicBool::new(false);
static SAMPLES: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);
static SEQUENCE: Mutex<Vec<(f64, u64)>> = Mutex::new(Vec::new());

/// Samples kept in order (about 17 minutes of one vCPU).
pub const MAX_SEQUENCE: usize = 1 << 20;

/// The kick signal: one above the first real-time signal, which stays free
/// for other vCPU kicks.
fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Turns sampling on; call before the vCPU threads start.
pub fn enable() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    if let Ok(mut s) = SAMPLES.lock() {
        *s = Some(HashMap::new());
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether sampling is on (checked by vCPU threads after an interrupted run).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Counts one sample.
pub fn record(rip: u64) {
    if let Ok(mut s) = SAMPLES.lock() {
        if let Some(map) = s.as_mut() {
            *map.entry(rip).or_default() += 1;
        }
    }
    if let Ok(mut seq) = SEQUENCE.lock() {
        if seq.len() < MAX_SEQUENCE {
            seq.push((crate::timeline::elapsed_ms(), rip));
        }
    }
}

/// Writes the histogram, highest count first.
pub fn write(path: &Path) -> std::io::Result<u64> {
    let mut rows: Vec<(u64, u64)> = match SAMPLES.lock() {
        Ok(s) => s
            .as_ref()
            .map(|m| m.iter().map(|(r, c)| (*r, *c)).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut total = 0;
    for (rip, count) in rows {
        writeln!(out, "{rip:016x} {count}")?;
        total += count;
    }
    out.flush()?;
    let mut seq_path = path.as_os_str().to_owned();
    seq_path.push(".seq");
    let mut out = std::io::BufWriter::new(std::fs::File::create(seq_path)?);
    if let Ok(seq) = SEQUENCE.lock() {
        for (ms, rip) in seq.iter() {
            writeln!(out, "{ms:.2} {rip:016x}")?;
        }
    }
    out.flush()?;
    Ok(total)
}

/// Sends the kick signal to a set of threads until dropped.
pub struct Kicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    /// Starts kicking the threads `ids` every `interval`. The caller keeps
    /// those threads joinable (their JoinHandles alive, not joined) until the
    /// `Kicker` is dropped, which keeps every `pthread_t` valid.
    pub fn start(ids: &[libc::pthread_t], interval: Duration) -> std::io::Result<Self> {
        let ids = ids.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sig = kick_signal();
        let thread = std::thread::Builder::new()
            .name("rip-sampler".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    for &id in &ids {
                        // SAFETY: `id` belongs to a thread the caller keeps
                        // joinable until this thread has been joined (Drop
                        // below), so the pthread_t is valid; the signal has a
                        // no-op handler installed by `enable`.
                        unsafe { libc::pthread_kill(id, sig) };
                    }
                    std::thread::sleep(interval);
                }
            })?;
        Ok(Kicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! One named thread per vCPU with a small Running/Paused state machine.
//!
//! Pausing: the controller sets the thread's pause flag and sends it the
//! kick signal. The signal handler sets `kvm_run.immediate_exit` of the
//! vCPU running on that thread, so `KVM_RUN` returns `EINTR` whether the
//! signal lands while the vCPU is in the guest or just before it enters;
//! the loop then sees the flag, completes any in-flight I/O exit, reports
//! `Paused` and waits for commands (save, resume).

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::vcpu::{Vcpu, VcpuError, VcpuStop};
use super::vcpu_state::{SaveCaps, VcpuState};

/// How long a vCPU thread may take to answer a pause or save request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU that runs on this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: the first real-time signal.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_sig: libc::c_int) {
    // A const-initialised thread local without destructor: safe to touch
    // from a signal handler.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points into the kvm_run mapping of the vCPU owned by
        // this thread; the thread clears the pointer before that mapping
        // goes away. A byte store is atomic on x86.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only does a
        // volatile byte store through a thread-local pointer.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as *const () as usize;
        // No SA_RESTART: the point is to interrupt KVM_RUN.
        action.sa_flags = 0;
        // SAFETY: valid signal number and a fully initialised sigaction.
        if unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) } != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

enum Command {
    Save(SaveCaps, Sender<Result<VcpuState, VcpuError>>),
    Resume,
}

/// The controller's end of one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    pause: Arc<AtomicBool>,
    commands: Sender<Command>,
    paused: Receiver<()>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Starts `vcpu` in a thread named `vcpuN`. When the vCPU stops for
    /// good, its reason goes to `stops` and `stop_evt` is written.
    /// With `start_paused`, the thread parks before the first `KVM_RUN`
    /// until [`VcpuHandle::resume`].
    ///
    /// `slice`: the thread asks the host scheduler for time slices this
    /// long (see [`request_slice`]); `None` keeps the default.
    pub fn spawn(
        mut vcpu: Vcpu,
        stops: Sender<VcpuStop>,
        stop_evt: Arc<EventFd>,
        start_paused: bool,
        slice: Option<std::time::Duration>,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler()?;
        let id = vcpu.id();
        let pause = Arc::new(AtomicBool::new(start_paused));
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (paused_tx, paused_rx) = mpsc::channel();
        let flag = pause.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Some(slice) = slice {
                    if let Err(e) = request_slice(slice) {
                        tracing::debug!("vcpu{id}: no custom time slice: {e}");
                    }
                }
                IMMEDIATE_EXIT.with(|c| c.set(vcpu.immediate_exit_ptr()));
                let stop = vcpu_loop(&mut vcpu, &flag, &cmd_rx, &paused_tx);
                IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
                if let Some(stop) = stop {
                    let _ = stops.send(stop);
                    let _ = stop_evt.write(1);
                }
            })?;
        Ok(VcpuHandle {
            id,
            pause,
            commands: cmd_tx,
            paused: paused_rx,
            thread,
        })
    }

    /// The thread's pthread id; valid while this handle lives (dropping
    /// the handle detaches the thread, after which the id may be reused).
    pub fn pthread(&self) -> libc::pthread_t {
        self.thread.as_pthread_t()
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Asks the vCPU to pause and waits until it has.
    pub fn pause(&self) -> Result<(), VcpuError> {
        if !self.pause.swap(true, Ordering::SeqCst) {
            // SAFETY: pthread_kill on a thread we created and have not
            // joined; the kick signal has a handler installed.
            let rc = unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
            if rc != 0 {
                return Err(VcpuError::NoAnswer(self.id));
            }
        }
        self.paused
            .recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| VcpuError::NoAnswer(self.id))
    }

    /// Waits for a vCPU that was started paused to report it.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        self.paused
            .recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| VcpuError::NoAnswer(self.id))
    }

    /// Saves the state of the (paused) vCPU.
    pub fn save(&self, caps: &SaveCaps) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Save(caps.clone(), tx))
            .map_err(|_| VcpuError::NoAnswer(self.id))?;
        rx.recv_timeout(ANSWER_TIMEOUT)
            .map_err(|_| VcpuError::NoAnswer(self.id))?
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
        let _ = self.commands.send(Command::Resume);
    }
}

/// Runs until the vCPU stops (`Some`) or the controller is gone (`None`).
fn vcpu_loop(
    vcpu: &mut Vcpu,
    pause: &AtomicBool,
    commands: &Receiver<Command>,
    paused: &Sender<()>,
) -> Option<VcpuStop> {
    let mut first_entry = true;
    loop {
        if pause.load(Ordering::SeqCst) {
            vcpu.complete_pending_io();
            let _ = paused.send(());
            loop {
                match commands.recv() {
                    Ok(Command::Save(caps, reply)) => {
                        let _ = reply.send(vcpu.save_state(&caps));
                    }
                    Ok(Command::Resume) => break,
                    Err(_) => return None,
                }
            }
            continue;
        }
        if first_entry {
            first_entry = false;
            if vcpu.id() == 0 {
                crate::timeline::mark(crate::timeline::Milestone::FirstVcpuEntry);
            }
        }
        match vcpu.run_once() {
            Ok(None) => {}
            Ok(Some(stop)) => return Some(stop),
            Err(e) => return Some(VcpuStop::Error(e)),
        }
    }
}

/// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks the host's fair scheduler (EEVDF, Linux 6.12+) for time slices of
/// `slice` for the calling thread: `sched_setattr` with `SCHED_OTHER` and
/// `sched_runtime`, a per-thread attribute any process may set for itself
/// (the kernel clamps it to 0.1–100 ms); the thread keeps its nice value,
/// and no host-wide setting changes.
///
/// On PVM hosts a switch between two guests' vCPU threads is expensive:
/// with more running vCPUs than cores, 8 concurrent `vessel run` took
/// 27.8 s at the default slice (3 ms) and 14.5 s with 100 ms slices (the
/// ideal on 2 cores: 10.5 s). Older kernels ignore the runtime of a fair
/// thread or refuse it (EINVAL): either way nothing else changes.
pub fn request_slice(slice: std::time::Duration) -> std::io::Result<()> {
    // sched_setattr sets the nice value too: keep the thread's own (on
    // Linux PRIO_PROCESS with 0 means the calling thread).
    // SAFETY: getpriority with plain integers; errno is cleared first, as
    // -1 is also a valid answer.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(std::io::Error::last_os_error());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr on the calling thread (0) with a valid,
    // fully initialized sched_attr of the size it declares.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

//! A vCPU: initial state and the run loop.
//!
//! [`Vcpu::handle_internal_error`] is the one place that holds the exit
//! assists for PVM hosts (see `crate::host`): there, guest ring 0 is emulated
//! and the emulator cannot execute `int3` (used by the kernel for static keys
//! and alternatives patching) or `fwait`; KVM then reports an emulation
//! failure with the instruction bytes. We emulate those two instructions
//! here. On hardware KVM these exits never happen, so the assists are inert.

use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::{BusAction, DeviceBus};
use crate::timeline::{self, Milestone};

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const BP_VECTOR: u8 = 3;
const INT3_OPCODE: u8 = 0xcc;
const FWAIT_OPCODE: u8 = 0x9b;

/// Errors of vCPU set-up and execution.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vcpu {id}: {what}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saved vCPU state is inconsistent.
    #[error("vcpu {id}: invalid saved state: {what}")]
    BadState {
        /// vCPU index.
        id: u8,
        /// What is wrong.
        what: &'static str,
    },
    /// The vCPU thread did not answer a pause or save request.
    #[error("vcpu {0}: thread did not answer (stopped or stuck)")]
    NoAnswer(u8),
    /// Building the MSR list failed.
    #[error("vcpu {0}: cannot build the MSR list")]
    Msrs(u8),
    /// The guest executed something neither KVM nor we can emulate.
    #[error("vcpu {id}: emulation failure at rip {rip:#x}, instruction bytes [{bytes}]")]
    EmulationFailure {
        /// vCPU index.
        id: u8,
        /// Guest instruction pointer.
        rip: u64,
        /// Instruction bytes as hex.
        bytes: String,
    },
    /// KVM reported an internal error we cannot handle.
    #[error("vcpu {id}: KVM internal error, suberror {suberror}, rip {rip:#x}")]
    Internal {
        /// vCPU index.
        id: u8,
        /// KVM suberror.
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// VM entry failed.
    #[error("vcpu {id}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// vCPU index.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit reason the VMM does not handle.
    #[error("vcpu {id}: unhandled exit {exit} at rip {rip:#x}")]
    UnhandledExit {
        /// vCPU index.
        id: u8,
        /// Exit reason.
        exit: String,
        /// Guest instruction pointer.
        rip: u64,
    },
}

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest rebooted or powered off (i8042 reset, system event): clean exit.
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// A fatal error.
    Error(VcpuError),
}

/// What an emulation failure calls for.
#[derive(Debug, PartialEq, Eq)]
pub enum Assist {
    /// `int3`: skip it and inject #BP.
    Int3,
    /// `fwait`: skip it (no pending x87 exceptions to deliver).
    Fwait,
    /// Nothing we can do; the instruction bytes if KVM reported them.
    Fatal(Vec<u8>),
}

/// Decides what to do about a `KVM_EXIT_INTERNAL_ERROR`, from the raw
/// `internal` exit data (untrusted in the sense that it is only as good as
/// what the host kernel reported: every length is checked).
pub fn classify_internal_error(suberror: u32, ndata: u32, data: &[u64; 16]) -> Assist {
    if suberror != KVM_INTERNAL_ERROR_EMULATION || ndata < 2 {
        return Assist::Fatal(Vec::new());
    }
    // Layout of struct kvm_emulation_failure after suberror/ndata:
    // u64 flags; u8 insn_size; u8 insn_bytes[15].
    let flags = data[0];
    if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0 {
        return Assist::Fatal(Vec::new());
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let size = usize::from(raw[0]).min(15);
    let bytes = raw[1..=size].to_vec();
    match bytes.first() {
        Some(&INT3_OPCODE) => Assist::Int3,
        Some(&FWAIT_OPCODE) => Assist::Fwait,
        _ => Assist::Fatal(bytes),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: Arc<DeviceBus>,
    assists: u64,
}

impl Vcpu {
    /// Wraps a KVM vCPU.
    pub fn new(id: u8, fd: VcpuFd, bus: Arc<DeviceBus>) -> Self {
        Vcpu {
            id,
            fd,
            bus,
            assists: 0,
        }
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets `kvm_run.immediate_exit`.
    pub(crate) fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Address of `kvm_run.immediate_exit`, for the kick signal handler.
    pub(crate) fn immediate_exit_ptr(&mut self) -> *mut u8 {
        std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit)
    }

    /// Completes an in-flight MMIO/PIO exit without entering the guest
    /// (`KVM_RUN` with `immediate_exit` set), so that the state read next is
    /// consistent. Called before saving.
    pub(crate) fn complete_pending_io(&mut self) {
        self.set_immediate_exit(true);
        let _ = self.fd.run();
        self.set_immediate_exit(false);
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; for the boot vCPU (`entry` given)
    /// also the long-mode registers at the kernel entry point. Other vCPUs
    /// wait for INIT/SIPI from the guest in the in-kernel LAPIC.
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        cpu_count: u8,
        entry: Option<u64>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = base_cpuid.clone();
        cpuid::patch_cpuid(&mut cpuid, self.id, cpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs().map_err(|_| VcpuError::Msrs(self.id))?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            tracing::debug!(vcpu = self.id, set, "not every boot MSR was accepted");
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm_err("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        if let Some(entry) = entry {
            let sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::long_mode_sregs(sregs))
                .map_err(self.kvm_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Runs the vCPU until the guest resets or something fatal happens.
    pub fn run(&mut self) -> VcpuStop {
        if self.id == 0 {
            timeline::mark(Milestone::FirstVcpuEntry);
        }
        loop {
            match self.run_once() {
                Ok(None) => continue,
                Ok(Some(stop)) => return stop,
                Err(e) => return VcpuStop::Error(e),
            }
        }
    }

    /// One `KVM_RUN` and the handling of its exit. `Ok(None)`: carry on
    /// (also after an interruption by the kick signal).
    pub(crate) fn run_once(&mut self) -> Result<Option<VcpuStop>, VcpuError> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (see vcpu_thread): the caller checks why.
                self.set_immediate_exit(false);
                if crate::profiler::enabled() {
                    crate::profiler::record(self.rip());
                }
                return Ok(None);
            }
            Err(source) => {
                return Err(VcpuError::Kvm {
                    id,
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => self.bus.pio_read(port, data),
            VcpuExit::IoOut(port, data) => {
                if self.bus.pio_write(port, data) == BusAction::Reset {
                    return Ok(Some(VcpuStop::GuestReset));
                }
            }
            VcpuExit::MmioRead(addr, data) => self.bus.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => self.bus.mmio_write(addr, data),
            VcpuExit::Hlt | VcpuExit::Intr => {}
            VcpuExit::Shutdown => return Ok(Some(VcpuStop::TripleFault)),
            VcpuExit::SystemEvent(kind, _)
                if kind == KVM_SYSTEM_EVENT_RESET || kind == KVM_SYSTEM_EVENT_SHUTDOWN =>
            {
                return Ok(Some(VcpuStop::GuestReset));
            }
            VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { id, reason }),
            VcpuExit::InternalError => {
                self.handle_internal_error()?;
            }
            other => {
                let exit = format!("{other:?}");
                return Err(VcpuError::UnhandledExit {
                    id,
                    exit,
                    rip: self.rip(),
                });
            }
        }
        Ok(None)
    }

    /// The exit assists (see the module documentation).
    fn handle_internal_error(&mut self) -> Result<(), VcpuError> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit reason was KVM_EXIT_INTERNAL_ERROR, so
        // `internal` is the union member KVM filled in; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let assist = classify_internal_error(internal.suberror, internal.ndata, &internal.data);
        let mut regs = self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?;
        match assist {
            Assist::Int3 => {
                regs.rip += 1;
                self.fd
                    .set_regs(&regs)
                    .map_err(self.kvm_err("KVM_SET_REGS"))?;
                let mut events = self
                    .fd
                    .get_vcpu_events()
                    .map_err(self.kvm_err("KVM_GET_VCPU_EVENTS"))?;
                events.exception.injected = 1;
                events.exception.nr = BP_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                self.fd
                    .set_vcpu_events(&events)
                    .map_err(self.kvm_err("KVM_SET_VCPU_EVENTS"))?;
            }
            Assist::Fwait => {
                regs.rip += 1;
                self.fd
                    .set_regs(&regs)
                    .map_err(self.kvm_err("KVM_SET_REGS"))?;
            }
            Assist::Fatal(bytes) if !bytes.is_empty() => {
                return Err(VcpuError::EmulationFailure {
                    id: self.id,
                    rip: regs.rip,
                    bytes: hex(&bytes),
                })
            }
            Assist::Fatal(_) => {
                return Err(VcpuError::Internal {
                    id: self.id,
                    suberror: internal.suberror,
                    rip: regs.rip,
                })
            }
        }
        self.assists += 1;
        if self.assists.is_power_of_two() {
            tracing::debug!(
                vcpu = self.id,
                assists = self.assists,
                "emulation assists so far"
            );
        }
        Ok(())
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_with(bytes: &[u8], flags: u64) -> [u64; 16] {
        let mut raw = [0u8; 16];
        raw[0] = bytes.len() as u8;
        raw[1..=bytes.len()].copy_from_slice(bytes);
        let mut d = [0u64; 16];
        d[0] = flags;
        d[1] = u64::from_le_bytes(raw[..8].try_into().unwrap());
        d[2] = u64::from_le_bytes(raw[8..].try_into().unwrap());
        d
    }

    #[test]
    fn int3_and_fwait_are_assisted() {
        assert_eq!(
            classify_internal_error(1, 3, &data_with(&[0xcc], 1)),
            Assist::Int3
        );
        assert_eq!(
            classify_internal_error(1, 3, &data_with(&[0x9b, 0x90], 1)),
            Assist::Fwait
        );
    }

    #[test]
    fn everything_else_is_fatal() {
        assert_eq!(
            classify_internal_error(1, 3, &data_with(&[0x0f, 0x01, 0xd0], 1)),
            Assist::Fatal(vec![0x0f, 0x01, 0xd0])
        );
        // Wrong suberror, no instruction bytes flag, too little data.
        assert_eq!(
            classify_internal_error(2, 3, &data_with(&[0xcc], 1)),
            Assist::Fatal(vec![])
        );
        assert_eq!(
            classify_internal_error(1, 3, &data_with(&[0xcc], 0)),
            Assist::Fatal(vec![])
        );
        assert_eq!(
            classify_internal_error(1, 1, &data_with(&[0xcc], 1)),
            Assist::Fatal(vec![])
        );
        // A bogus length is clamped, never out of bounds.
        let mut d = data_with(&[0x90], 1);
        d[1] = (d[1] & !0xff) | 0xff;
        assert!(matches!(
            classify_internal_error(1, 3, &d),
            Assist::Fatal(_)
        ));
    }

    #[test]
    fn lvt_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10;
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }
}

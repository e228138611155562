//! Saving and restoring one vCPU's KVM state for snapshots.
//!
//! Restore order (as Firecracker does it): CPUID, MSRs, sregs, regs,
//! FPU/XSAVE, XCRS, LAPIC, the TSC deadline MSR again (KVM ignores it while
//! the LAPIC is not in TSC-deadline mode), vcpu events, MP state.
//!
//! MSRs: the list is what `KVM_GET_MSR_INDEX_LIST` reports, filtered to the
//! ones `KVM_GET_MSRS` actually returns on this host (it stops at the first
//! one it refuses; we drop that one and go on). On restore an MSR that
//! `KVM_SET_MSRS` refuses is skipped with a warning naming it, rather than
//! failing the restore: the same code then works on hosts (such as PVM)
//! that list MSRs they cannot set.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::vcpu::{Vcpu, VcpuError};

/// `MSR_IA32_TSC_DEADLINE`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// What the host supports, read once per snapshot.
#[derive(Clone, Debug, Default)]
pub struct SaveCaps {
    /// `KVM_GET_MSR_INDEX_LIST`.
    pub msr_list: Vec<u32>,
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
}

/// `kvm_fpu` in serialisable form (kvm-bindings has no serde for it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    /// Back to the KVM struct; `None` when the register arrays have the wrong length.
    pub fn to_kvm(&self) -> Option<kvm_fpu> {
        Some(kvm_fpu {
            fpr: self.fpr.clone().try_into().ok()?,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self.xmm.clone().try_into().ok()?,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// CPUID as set on this vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs (index, value).
    pub msrs: Vec<kvm_msr_entry>,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: FpuState,
    /// XSAVE area, when KVM supports it.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, when KVM supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

impl Vcpu {
    fn kerr(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id();
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// The MSRs of `list` that this vCPU returns, with their values.
    fn save_msrs(&self, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut out = Vec::with_capacity(list.len());
        let mut rest: Vec<u32> = list.to_vec();
        while !rest.is_empty() {
            let chunk: Vec<kvm_msr_entry> = rest
                .iter()
                .take(KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuError::Msrs(self.id()))?;
            let got = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(self.kerr("KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..got.min(chunk.len())]);
            if got < chunk.len() {
                // Entry `got` was refused: leave it out and continue after it.
                tracing::debug!(
                    vcpu = self.id(),
                    msr = format_args!("{:#x}", chunk[got].index),
                    "KVM_GET_MSRS refuses this listed MSR; not saved"
                );
                rest.drain(..=got);
            } else {
                rest.drain(..chunk.len());
            }
        }
        Ok(out)
    }

    /// Sets `entries`, skipping (and naming) any that KVM refuses.
    fn restore_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let mut rest = entries;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuError::Msrs(self.id()))?;
            let set = self
                .fd()
                .set_msrs(&msrs)
                .map_err(self.kerr("KVM_SET_MSRS"))?;
            if set < chunk.len() {
                tracing::warn!(
                    vcpu = self.id(),
                    msr = format_args!("{:#x}", chunk[set].index),
                    "KVM_SET_MSRS refuses this saved MSR; skipped"
                );
                rest = &rest[set + 1..];
            } else {
                rest = &rest[chunk.len()..];
            }
        }
        Ok(())
    }

    /// Saves the vCPU's state. It must not be running (its thread calls
    /// this while paused, after completing any pending I/O with an
    /// immediate-exit `KVM_RUN`).
    pub fn save_state(&self, caps: &SaveCaps) -> Result<VcpuState, VcpuError> {
        let fd = self.fd();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kerr("KVM_GET_CPUID2"))?;
        let msrs = self.save_msrs(&caps.msr_list)?;
        let xsave = if caps.xsave {
            Some(fd.get_xsave().map_err(self.kerr("KVM_GET_XSAVE"))?)
        } else {
            None
        };
        let xcrs = if caps.xcrs {
            Some(fd.get_xcrs().map_err(self.kerr("KVM_GET_XCRS"))?)
        } else {
            None
        };
        Ok(VcpuState {
            id: self.id(),
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: fd.get_regs().map_err(self.kerr("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(self.kerr("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&fd.get_fpu().map_err(self.kerr("KVM_GET_FPU"))?),
            xsave,
            xcrs,
            lapic: fd.get_lapic().map_err(self.kerr("KVM_GET_LAPIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(self.kerr("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(self.kerr("KVM_GET_MP_STATE"))?,
        })
    }

    /// Restores a saved state into this (fresh) vCPU.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let fd = self.fd();
        let id = self.id();
        if s.id != id {
            return Err(VcpuError::BadState {
                id,
                what: "vcpu id does not match",
            });
        }
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::BadState {
            id,
            what: "too many CPUID entries",
        })?;
        fd.set_cpuid2(&cpuid).map_err(self.kerr("KVM_SET_CPUID2"))?;
        self.restore_msrs(&s.msrs)?;
        fd.set_sregs(&s.sregs).map_err(self.kerr("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(self.kerr("KVM_SET_REGS"))?;
        let fpu = s.fpu.to_kvm().ok_or(VcpuError::BadState {
            id,
            what: "FPU register arrays have the wrong length",
        })?;
        fd.set_fpu(&fpu).map_err(self.kerr("KVM_SET_FPU"))?;
        if let Some(xsave) = &s.xsave {
            // SAFETY: `xsave` is a whole kvm_xsave (4 KiB) that KVM only
            // reads; it came from KVM_GET_XSAVE of the same size.
            unsafe { fd.set_xsave(xsave) }.map_err(self.kerr("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &s.xcrs {
            fd.set_xcrs(xcrs).map_err(self.kerr("KVM_SET_XCRS"))?;
        }
        fd.set_lapic(&s.lapic).map_err(self.kerr("KVM_SET_LAPIC"))?;
        let deadline: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .filter(|e| e.index == MSR_IA32_TSC_DEADLINE)
            .copied()
            .collect();
        self.restore_msrs(&deadline)?;
        fd.set_vcpu_events(&s.events)
            .map_err(self.kerr("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(self.kerr("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_round_trip() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 9,
            ..Default::default()
        };
        f.fpr[3][5] = 7;
        f.xmm[15][0] = 0xaa;
        let s = FpuState::from(&f);
        let json = serde_json::to_string(&s).unwrap();
        let back: FpuState = serde_json::from_str(&json).unwrap();
        let k = back.to_kvm().unwrap();
        assert_eq!(k.fcw, 0x37f);
        assert_eq!(k.fpr[3][5], 7);
        assert_eq!(k.xmm[15][0], 0xaa);
        let mut bad = back.clone();
        bad.xmm.pop();
        assert!(bad.to_kvm().is_none());
    }
}

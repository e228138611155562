//! What kind of KVM host we run on.
//!
//! On ordinary hosts KVM uses VMX (Intel) or SVM (AMD). On cloud VMs without
//! nested virtualization, `/dev/kvm` may come from the `kvm_pvm` module
//! (Pagetable-based Virtual Machine), which emulates guest ring 0. Such a
//! guest needs CPU features the emulator cannot execute switched off on its
//! command line. Nothing else in vessel depends on the host kind: the vCPU
//! exit assists (see `vstate::vcpu`) only act on exits that would otherwise be
//! fatal, so they are harmless everywhere.

use std::path::Path;

/// The kind of KVM host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization (Intel VMX or AMD SVM).
    Hardware,
    /// `kvm_pvm`: no VMX/SVM, guest kernel code is emulated.
    Pvm,
}

/// Guest kernel switches for PVM hosts: features the ring-0 emulator cannot
/// execute, page-table isolation, and the read-only remapping of kernel data
/// (`rodata=off`: about 4 s of emulated page-table work at boot there; the
/// isolation boundary is the VM, not the guest kernel's self-protection).
/// `cx16`: the emulator fails on a ring-0 `lock cmpxchg16b` (SLUB's
/// lockless freelist uses it when the CPU has it; seen at boot of the
/// kernel built with FUSE/virtio-fs/DAX).
/// `clocksource=kvm-clock`: a restored guest's TSC does not continue from
/// the saved value here (the TSC MSR we restore does not take), so with the
/// TSC as clocksource guest time jumped by the time the snapshot spent on
/// disk, and the guest spent tens of milliseconds (growing with the
/// snapshot's age: one NTP `second_overflow` per second) catching up its
/// timekeeping, expiring every timer and reseeding its RNG before it
/// answered anything. kvmclock is restored from the snapshot, so guest time
/// continues where it stopped.
/// `no-kvmapf`: restoring the async page fault MSR makes KVM send the
/// guest a "wake all" notification, and the guest walks all 256 buckets of
/// its sleeper table under spinlocks: milliseconds of emulated work at the
/// start of every restore, for a feature that only pays off when host
/// memory is swapped.
pub const PVM_CMDLINE: &str = "clocksource=kvm-clock no-kvmapf rodata=off noxsave nopti clearcpuid=smap,smep,popcnt,fsgsbase,invpcid,pcid,pku,umip,rdpid,clflushopt,clwb,avx,avx2,avx512f,bmi1,bmi2,erms,fsrm,movbe,rtm,hle,cx16";

/// vCPU threads' time slice on PVM hosts (the most the kernel allows).
pub const PVM_VCPU_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

impl HostKind {
    /// Detects the host kind: `kvm_pvm` loaded, or no VMX/SVM in CPUID, means PVM.
    pub fn detect() -> HostKind {
        Self::from_facts(
            Path::new("/sys/module/kvm_pvm").exists(),
            cpu_has_vmx(),
            cpu_has_svm(),
        )
    }

    /// The decision itself, separated for tests.
    pub fn from_facts(pvm_module: bool, vmx: bool, svm: bool) -> HostKind {
        if pvm_module || !(vmx || svm) {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }

    /// Parses `auto`, `pvm` or `hardware` (for `--host-kind`).
    pub fn parse(s: &str) -> Option<Option<HostKind>> {
        match s {
            "auto" => Some(None),
            "pvm" => Some(Some(HostKind::Pvm)),
            "hardware" | "vmx" | "svm" => Some(Some(HostKind::Hardware)),
            _ => None,
        }
    }

    /// The host scheduler time slice vCPU threads ask for: long on PVM
    /// hosts, where switching between guests' vCPU threads is expensive
    /// (`vstate::vcpu_thread::request_slice`); the default elsewhere.
    pub fn vcpu_slice(self) -> Option<std::time::Duration> {
        match self {
            HostKind::Hardware => None,
            HostKind::Pvm => Some(PVM_VCPU_SLICE),
        }
    }

    /// Extra kernel command line for this host kind.
    pub fn kernel_cmdline(self) -> &'static str {
        match self {
            HostKind::Hardware => "",
            HostKind::Pvm => PVM_CMDLINE,
        }
    }
}

fn cpu_has_vmx() -> bool {
    let r = std::arch::x86_64::__cpuid(1);
    r.ecx & (1 << 5) != 0
}

fn cpu_has_svm() -> bool {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext < 0x8000_0001 {
        return false;
    }
    let r = std::arch::x86_64::__cpuid(0x8000_0001);
    r.ecx & (1 << 2) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        assert_eq!(HostKind::from_facts(false, true, false), HostKind::Hardware);
        assert_eq!(HostKind::from_facts(false, false, true), HostKind::Hardware);
        assert_eq!(HostKind::from_facts(false, false, false), HostKind::Pvm);
        assert_eq!(HostKind::from_facts(true, true, false), HostKind::Pvm);
        assert_eq!(HostKind::Hardware.kernel_cmdline(), "");
        assert!(HostKind::Pvm.kernel_cmdline().contains("clearcpuid="));
    }

    #[test]
    fn parse_flag() {
        assert_eq!(HostKind::parse("auto"), Some(None));
        assert_eq!(HostKind::parse("pvm"), Some(Some(HostKind::Pvm)));
        assert_eq!(HostKind::parse("hardware"), Some(Some(HostKind::Hardware)));
        assert_eq!(HostKind::parse("x"), None);
    }
}

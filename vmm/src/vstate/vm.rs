//! The KVM VM: capabilities check, in-kernel irqchip and PIT, memory slots,
//! irqfds and ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::KVM_TSS_ADDRESS;

/// Errors of VM set-up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Unexpected KVM API version.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability vessel needs is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{what}")]
    Kvm {
        /// The operation that failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Too many memory regions.
    #[error("too many guest memory regions")]
    TooManyRegions,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM virtual machine.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

const REQUIRED_CAPS: [(Cap, &str); 8] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

impl Vm {
    /// Opens `/dev/kvm`, checks capabilities and creates a VM with an
    /// in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd })
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_def = kvm_userspace_memory_region {
                slot: u32::try_from(slot).map_err(|_| VmError::TooManyRegions)?,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping
            // owned by `mem`, which outlives the VM (the builder keeps both
            // for the whole life of the process).
            unsafe { self.fd.set_user_memory_region(region_def) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Routes `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// Makes KVM signal `evt` (instead of exiting) when the guest writes
    /// `datamatch` (4 bytes) to the MMIO address `addr`.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    /// The CPUID entries KVM supports.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }

    /// Size of the `kvm_run` mapping (for diagnostics).
    pub fn vcpu_mmap_size(&self) -> Result<usize, VmError> {
        self.kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))
    }
}

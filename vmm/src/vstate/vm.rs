//! The KVM VM: capabilities check, in-kernel irqchip and PIT, memory slots,
//! irqfds and ioeventfds.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
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
    /// Saved VM state is inconsistent.
    #[error("invalid saved VM state: {0}")]
    BadState(&'static str),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// VM-wide KVM state of a snapshot: the in-kernel irqchip (both PICs and
/// the IOAPIC), the PIT and kvmclock. LAPICs are per vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (channel state and flags).
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
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

    /// Registers a DAX window as memory slot `slot` at guest-physical
    /// `guest_addr`.
    pub fn register_dax_window(
        &self,
        slot: u32,
        window: &crate::devices::virtio::fs::dax::DaxWindow,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: window.guest_addr(),
            memory_size: window.len(),
            userspace_addr: window.host_addr(),
            flags: 0,
        };
        // SAFETY: the window's reservation is a live mapping for as long as
        // the window exists, and the builder keeps it for the life of the
        // VM. The VMM never touches that memory itself: the pages behind it
        // are replaced with mmap(MAP_FIXED), which KVM follows through its
        // MMU notifier.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (DAX window)"))
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

    /// The MSRs KVM saves and restores (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))
    }

    /// Whether KVM has `cap`.
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.kvm.check_extension(cap)
    }

    /// Saves irqchip, PIT and clock. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores irqchip, PIT and clock (before the vCPUs are restored).
    /// The clock continues from the saved value: guest time does not jump
    /// by the time the snapshot spent on disk (flags are cleared, so KVM
    /// does not apply a realtime correction).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let chips = [
            (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
            (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
            (KVM_IRQCHIP_IOAPIC, &state.ioapic),
        ];
        for (id, chip) in chips {
            if chip.chip_id != id {
                return Err(VmError::BadState("irqchip ids do not match"));
            }
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Size of the `kvm_run` mapping (for diagnostics).
    pub fn vcpu_mmap_size(&self) -> Result<usize, VmError> {
        self.kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))
    }
}

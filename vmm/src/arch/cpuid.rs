//! CPUID as each vCPU sees it: KVM's supported set with per-vCPU topology.
//!
//! On PVM hosts `KVM_SET_CPUID2` is accepted but the guest sees the host
//! CPUID anyway, which is why the host-kind detection adds `clearcpuid=` to
//! the kernel command line there (see `crate::host`).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const ECX_TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Adjusts `cpuid` for vCPU `cpu_id` of `cpu_count`.
pub fn patch_cpuid(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(cpu_count) << 16);
                entry.ecx |= ECX_HYPERVISOR_BIT;
                // The in-kernel LAPIC emulates the TSC deadline timer.
                entry.ecx |= ECX_TSC_DEADLINE_BIT;
                if cpu_count > 1 {
                    entry.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                // EAX[31:26]: cores per package - 1.
                entry.eax =
                    (entry.eax & 0x03ff_ffff) | (u32::from(cpu_count.saturating_sub(1)) << 26);
            }
            LEAF_EXT_TOPOLOGY => {
                // One thread per core, cpu_count cores in one package.
                entry.edx = u32::from(cpu_id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = 8;
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        patch_cpuid(&mut cpuid, 3, 4);
        let e = &cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x1234);
        assert_ne!(e.ecx & ECX_HYPERVISOR_BIT, 0);
        let t = &cpuid.as_slice()[1];
        assert_eq!(t.edx, 3);
        assert_eq!(t.ebx, 4);
    }
}

//! Guest physical memory layout (the same on every host kind).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)
//! 0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8000  setup_data chain (RNG seed)
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, PDPT at 0xa000, PD at 0xb000 (identity map of 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer + MP config table
//! 0x0010_0000  start of high memory (the kernel ELF loads at its p_paddr)
//!   ...        initramfs at the top of low RAM
//! 0xc000_0000  MMIO gap (virtio-mmio devices at 0xd000_0000) up to 4 GiB
//! 0x1_0000_0000 RAM above the gap when the guest has more than 3 GiB
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Where the `setup_data` chain starts.
pub const SETUP_DATA_START: u64 = 0x8000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Page tables: PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Page tables: PD (512 x 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length including the NUL (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IRQ of the first virtio-mmio device (0-4 are taken by PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IRQ we hand out (IOAPIC pins 0..23).
pub const MAX_IRQ: u32 = 23;
/// IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IOAPIC MMIO address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO address.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for real-mode emulation on VMX; unused by a 64-bit guest
/// but KVM wants it placed below 4 GiB and outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 4 * 8);
    assert!(SETUP_DATA_START >= ZERO_PAGE_START + 4096);
    assert!(PML4_START > BOOT_STACK_POINTER);
    assert!(CMDLINE_START > PDE_START + 4096);
    assert!(EBDA_START > CMDLINE_START + CMDLINE_MAX_SIZE as u64);
    assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && VIRTIO_MMIO_BASE < IOAPIC_ADDR);
};

/// Guest RAM regions for `mem_size` bytes of memory, split around the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        assert_eq!(r.iter().map(|(_, s)| s).sum::<u64>(), 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }
}

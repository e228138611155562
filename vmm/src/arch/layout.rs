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
//!   ...        virtio-fs DAX windows: from the first 1 GiB boundary at or
//!              above both 4 GiB and the end of RAM, each 1 GiB aligned
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

/// Alignment of each virtio-fs DAX window (the guest hot-adds it as
/// device memory; 1 GiB keeps it clear of any section or huge page rule).
pub const DAX_WINDOW_ALIGN: u64 = 1 << 30;
/// First KVM memory slot used for DAX windows (RAM uses 0 and 1).
pub const DAX_FIRST_SLOT: u32 = 16;

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

/// Where the DAX windows start: the first [`DAX_WINDOW_ALIGN`] boundary at
/// or above both the end of RAM and the end of the MMIO gap (4 GiB).
pub fn dax_windows_start(mem_size: u64) -> u64 {
    let ram_end = ram_regions(mem_size)
        .last()
        .map_or(0, |&(start, size)| start + size);
    ram_end.max(MMIO_GAP_END).next_multiple_of(DAX_WINDOW_ALIGN)
}

/// Guest-physical placement of DAX windows of the given sizes (in slot
/// order, `None` for devices without one), one after the other, each
/// aligned to [`DAX_WINDOW_ALIGN`].
pub fn dax_window_addresses(mem_size: u64, sizes: &[Option<u64>]) -> Vec<Option<u64>> {
    let mut next = dax_windows_start(mem_size);
    sizes
        .iter()
        .map(|size| {
            size.map(|len| {
                let addr = next;
                next = (addr + len).next_multiple_of(DAX_WINDOW_ALIGN);
                addr
            })
        })
        .collect()
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

    #[test]
    fn dax_windows_lie_above_ram_and_the_gap() {
        assert_eq!(dax_windows_start(256 << 20), MMIO_GAP_END);
        assert_eq!(dax_windows_start(3 << 30), MMIO_GAP_END);
        // 4 GiB of RAM ends at 5 GiB (1 GiB above the gap).
        assert_eq!(dax_windows_start(4 << 30), 5 << 30);
        assert_eq!(dax_windows_start((4 << 30) + 4096), 6 << 30);
        let a = dax_window_addresses(
            256 << 20,
            &[Some(256 << 20), None, Some(3 << 30), Some(2 << 20)],
        );
        assert_eq!(a, vec![Some(4 << 30), None, Some(5 << 30), Some(8 << 30)]);
        for mem in [128u64 << 20, 3 << 30, 5 << 30] {
            let start = dax_windows_start(mem);
            for (base, size) in ram_regions(mem) {
                assert!(base + size <= start);
            }
            assert!(start >= MMIO_GAP_END && start.is_multiple_of(DAX_WINDOW_ALIGN));
        }
    }
}

//! Intel MultiProcessor Specification 1.4 table, so the guest finds its
//! vCPUs and the IOAPIC without ACPI.
//!
//! The table is built as plain bytes (every field little-endian, no padding
//! per the spec) and written to the EBDA where the kernel scans for `_MP_`.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, MAX_IRQ};

const MPF_INTEL_SIZE: usize = 16;
const MPC_TABLE_SIZE: usize = 44;
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MPC_APIC_USABLE: u8 = 1;
/// Most vCPUs one table describes (APIC ids are 8 bits; the IOAPIC takes one).
pub const MAX_SUPPORTED_CPUS: u8 = 254;

/// Errors while building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many or zero vCPUs.
    #[error("the MP table supports 1..={MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// Writing to guest memory failed.
    #[error("writing the MP table to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Builds the floating pointer structure followed by the configuration table,
/// as it must appear at guest physical address `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    // Configuration table: header, then entries.
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entry_count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entry_count += 1;
    for irq in 0..=MAX_IRQ as u8 {
        // Default polarity and trigger for the bus (ISA: active high, edge).
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let table_len = MPC_TABLE_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"VESSEL  "); // OEM id, 8 bytes
    table.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(table.len(), MPC_TABLE_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + MPF_INTEL_SIZE as u64;
    let mut mpf = Vec::with_capacity(MPF_INTEL_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, patched below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into the EBDA.
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MPC_CPU_SIZE: usize = 20;
    const MPC_ENTRY_SIZE: usize = 8;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 8, MAX_SUPPORTED_CPUS] {
            let t = build(EBDA_START, cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..MPF_INTEL_SIZE]), 0);
            let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(u64::from(ptr), EBDA_START + 16);
            let table = &t[MPF_INTEL_SIZE..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            let expected = cpus as usize + 1 + 1 + (MAX_IRQ as usize + 1) + 2;
            assert_eq!(count, expected);
            assert_eq!(
                len,
                MPC_TABLE_SIZE
                    + cpus as usize * MPC_CPU_SIZE
                    + (expected - cpus as usize) * MPC_ENTRY_SIZE
            );
            // Must fit below the end of the EBDA / start of the VGA hole.
            assert!(EBDA_START + t.len() as u64 <= 0xa0000 || cpus > 32);
        }
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, 255).is_err());
    }
}

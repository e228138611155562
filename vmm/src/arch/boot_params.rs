//! The Linux x86 boot protocol for a 64-bit direct entry: the zero page
//! (`struct boot_params`) with the e820 map, the command line and initramfs
//! pointers, and a `setup_data` chain carrying an RNG seed so the guest's
//! CRNG is ready at once instead of waiting for entropy.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use super::layout::{
    low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END,
    MMIO_GAP_START, SETUP_DATA_START, ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `setup_data` type of an RNG seed.
pub const SETUP_RNG_SEED: u32 = 9;
/// Size of the seed we pass.
pub const RNG_SEED_LEN: usize = 32;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Boot protocol 2.12: the oldest that knows every field we fill.
const BOOT_PROTOCOL_VERSION: u16 = 0x020c;

/// Errors while writing boot data to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The command line does not fit.
    #[error("kernel command line is {0} bytes, the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// More e820 entries than the zero page holds (cannot happen with our layout).
    #[error("too many e820 entries")]
    TooManyE820,
    /// Writing to guest memory failed.
    #[error("writing boot data to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Where the initramfs was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdLocation {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u32,
}

/// The e820 map for a guest with `mem_size` bytes of RAM: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Builds the zero page for a 64-bit direct entry.
pub fn build_zero_page(
    mem_size: u64,
    cmdline_len_with_nul: usize,
    initrd: Option<InitrdLocation>,
    setup_data_addr: Option<u64>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.version = BOOT_PROTOCOL_VERSION;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    // CMDLINE_START is a small constant, it fits in 32 bits.
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = u32::try_from(cmdline_len_with_nul.saturating_sub(1))
        .map_err(|_| BootParamsError::CmdlineTooLong(cmdline_len_with_nul))?;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr).map_err(|_| BootParamsError::TooManyE820)?;
        params.hdr.ramdisk_size = initrd.size;
    }
    if let Some(addr) = setup_data_addr {
        params.hdr.setup_data = addr;
    }
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820);
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
        };
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| BootParamsError::TooManyE820)?;
    Ok(params)
}

/// `struct setup_data` (next, type, len) followed by the seed bytes.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RngSeedSetupData {
    next: u64,
    type_: u32,
    len: u32,
    seed: [u8; RNG_SEED_LEN],
}

// SAFETY: plain old data made only of integers and a byte array, no padding
// (8 + 4 + 4 header bytes followed by 32 bytes), any bit pattern is valid.
unsafe impl ByteValued for RngSeedSetupData {}

/// Writes the command line, the RNG seed `setup_data` and the zero page.
pub fn write_boot_data<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    cmdline: &str,
    initrd: Option<InitrdLocation>,
    rng_seed: [u8; RNG_SEED_LEN],
) -> Result<(), BootParamsError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootParamsError::CmdlineNul);
    }
    let len_with_nul = cmdline.len() + 1;
    if len_with_nul > CMDLINE_MAX_SIZE {
        return Err(BootParamsError::CmdlineTooLong(len_with_nul));
    }
    let mut bytes = Vec::with_capacity(len_with_nul);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootParamsError::GuestMemory)?;

    let seed = RngSeedSetupData {
        next: 0,
        type_: SETUP_RNG_SEED,
        len: RNG_SEED_LEN as u32,
        seed: rng_seed,
    };
    mem.write_obj(seed, GuestAddress(SETUP_DATA_START))
        .map_err(BootParamsError::GuestMemory)?;

    let params = build_zero_page(mem_size, len_with_nul, initrd, Some(SETUP_DATA_START))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::GuestMemory)
}

/// Fresh host entropy for the guest's RNG seed.
pub fn host_rng_seed() -> std::io::Result<[u8; RNG_SEED_LEN]> {
    let mut seed = [0u8; RNG_SEED_LEN];
    let mut filled = 0;
    while filled < seed.len() {
        let rest = &mut seed[filled..];
        // SAFETY: the pointer and length describe a writable slice we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n.unsigned_abs();
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_mmio_gap() {
        let map = e820_map(6 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(map[3], (MMIO_GAP_END, (6 << 30) - MMIO_GAP_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn zero_page_fields() {
        let initrd = InitrdLocation {
            addr: 0x700_0000,
            size: 12345,
        };
        let p = build_zero_page(128 << 20, 11, Some(initrd), Some(SETUP_DATA_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 10);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 12345);
        assert_eq!({ p.hdr.setup_data }, SETUP_DATA_START);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn boot_data_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seed = [7u8; RNG_SEED_LEN];
        write_boot_data(&mem, 128 << 20, "console=ttyS0 quiet", None, seed).unwrap();
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        let sd: RngSeedSetupData = mem.read_obj(GuestAddress(SETUP_DATA_START)).unwrap();
        assert_eq!({ sd.type_ }, SETUP_RNG_SEED);
        assert_eq!({ sd.len }, 32);
        assert_eq!({ sd.next }, 0);
        assert_eq!(sd.seed, seed);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.setup_data }, SETUP_DATA_START);
        assert_eq!({ p.hdr.cmdline_size }, 19);
    }

    #[test]
    fn bad_command_lines_are_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_data(&mem, 128 << 20, &long, None, [0; 32]),
            Err(BootParamsError::CmdlineTooLong(_))
        ));
        assert!(matches!(
            write_boot_data(&mem, 128 << 20, "a\0b", None, [0; 32]),
            Err(BootParamsError::CmdlineNul)
        ));
    }

    #[test]
    fn host_seed_is_random() {
        assert_ne!(host_rng_seed().unwrap(), host_rng_seed().unwrap());
    }
}

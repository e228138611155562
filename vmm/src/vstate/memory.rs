//! Guest memory: anonymous private mappings laid out by `arch::layout`.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::ram_regions;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed or the regions are invalid.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Create {
        /// Requested size.
        mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Allocates `mem_size` bytes of guest RAM.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| (GuestAddress(addr), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Create {
        mib: mem_size >> 20,
        source,
    })
}

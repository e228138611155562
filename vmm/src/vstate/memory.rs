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

/// One guest RAM region as stored in a snapshot's memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Errors saving or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file could not be created, written, opened or sized.
    #[error("memory file {path}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is smaller than the regions the state describes.
    #[error("memory file {path} is {actual} bytes, the snapshot needs {needed}")]
    TooSmall {
        /// Path.
        path: String,
        /// Actual size.
        actual: u64,
        /// Size the regions need.
        needed: u64,
    },
    /// The saved region list is unusable.
    #[error("invalid memory regions in the snapshot: {0}")]
    BadRegions(&'static str),
    /// mmap failed.
    #[error("cannot map the memory file")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
}

const PAGE: usize = 4096;

/// Writes guest RAM to `path`, region after region. All-zero pages are left
/// as holes (the file is sparse), so a 128 MiB guest that touched 20 MiB
/// costs about 20 MiB of disk. The caller must keep the guest from writing
/// (vCPUs and devices paused).
pub fn save_memory(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
) -> Result<Vec<MemoryRegionState>, MemoryFileError> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len())
            .map_err(|_| MemoryFileError::BadRegions("region larger than the address space"))?;
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`; the guest is paused, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut run_start: Option<usize> = None;
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let zero = page.iter().all(|b| *b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(i * PAGE),
                (true, Some(start)) => {
                    file.write_all_at(&bytes[start..i * PAGE], offset + start as u64)
                        .map_err(io)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            file.write_all_at(&bytes[start..], offset + start as u64)
                .map_err(io)?;
        }
        regions.push(MemoryRegionState {
            guest_addr: region.start_addr().0,
            size: region.len(),
            file_offset: offset,
        });
        offset += region.len();
    }
    file.set_len(offset).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(regions)
}

/// Maps the memory file at `path` as guest RAM, privately (copy-on-write):
/// pages the guest only reads stay shared with the page cache of the file,
/// and with every other VM restored from it; pages it writes become private
/// to this VM and never reach the file.
pub fn map_memory_file(
    path: &std::path::Path,
    regions: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    use std::sync::Arc;
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let actual = file.metadata().map_err(io)?.len();
    let mut needed = 0u64;
    for r in regions {
        if r.size == 0 || r.size % PAGE as u64 != 0 || r.file_offset % PAGE as u64 != 0 {
            return Err(MemoryFileError::BadRegions("unaligned or empty region"));
        }
        let end = r
            .file_offset
            .checked_add(r.size)
            .ok_or(MemoryFileError::BadRegions("region overflows"))?;
        needed = needed.max(end);
    }
    if regions.is_empty() {
        return Err(MemoryFileError::BadRegions("no memory regions"));
    }
    if actual < needed {
        return Err(MemoryFileError::TooSmall {
            path: path.display().to_string(),
            actual,
            needed,
        });
    }
    let file = Arc::new(file);
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size)
            .map_err(|_| MemoryFileError::BadRegions("region larger than the address space"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(MemoryFileError::Mmap)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or(
            MemoryFileError::BadRegions("region wraps the address space"),
        )?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out)
        .map_err(|_| MemoryFileError::BadRegions("regions overlap or are out of order"))
}

/// Opts guest RAM into KSM (`MADV_MERGEABLE`): on hosts that run KSM
/// (`/sys/kernel/mm/ksm/run` = 1), identical pages of different VMs are
/// merged copy-on-write. Off by default: scanning costs host CPU, and
/// merging leaks timing information between guests (a write to a merged
/// page is slower), which a multi-tenant host may not want.
pub fn mark_mergeable(mem: &GuestMemoryMmap) -> std::io::Result<()> {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    for region in mem.iter() {
        let len = usize::try_from(region.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the range is one guest RAM mapping owned by `mem` for the
        // VM's lifetime; MADV_MERGEABLE changes no contents.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_MERGEABLE) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn save_and_map_private() {
        let dir = std::env::temp_dir().join(format!("vessel-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 32 << 10),
        ])
        .unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress((1 << 20) + 0x7fff))
            .unwrap();
        let regions = save_memory(&mem, &path).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].file_offset, 64 << 10);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 96 << 10);

        let a = map_memory_file(&path, &regions).unwrap();
        let b = map_memory_file(&path, &regions).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            b.read_obj::<u8>(GuestAddress((1 << 20) + 0x7fff)).unwrap(),
            0x55
        );
        // Copy-on-write: a write is private to one mapping, never in the file.
        a.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let c = map_memory_file(&path, &regions).unwrap();
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );

        // A short file is refused.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(matches!(
            map_memory_file(&path, &regions),
            Err(MemoryFileError::TooSmall { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

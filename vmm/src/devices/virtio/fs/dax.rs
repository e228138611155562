//! The virtio-fs DAX window ("cache" shared memory region, shmid 0).
//!
//! A [`DaxWindow`] is a range of host virtual memory reserved with an
//! anonymous `PROT_NONE` mapping and given to KVM as a memory slot at a
//! guest-physical address outside RAM (see `arch::layout::dax_windows_start`).
//! The guest's FUSE client asks the server to map file ranges into it
//! (SETUPMAPPING) and to drop them again (REMOVEMAPPING); [`DaxHandler`]
//! does that with `mmap(MAP_FIXED)` of the host file over part of the
//! reservation, and with a fresh anonymous `PROT_NONE` mapping to remove
//! it. KVM's MMU notifiers see each replacement, so the guest reads the
//! host's page cache pages directly.
//!
//! The guest is untrusted: every offset and length it sends is checked
//! against the window (page aligned, non-empty, no overflow, inside) before
//! any `mmap`, so a request can never replace host memory outside the
//! reservation. The reservation is never `munmap`ed while a handler exists
//! (handlers hold an `Arc`), so `MAP_FIXED` cannot land on memory that was
//! reused for something else.
//!
//! Guest accesses to parts of the window that are not mapped, to file pages
//! past the end of a file, or writes to a read-only mapping make `KVM_RUN`
//! fail with `EFAULT`: the VM stops. Only the (misbehaving) guest is hurt.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::transport::FsCacheReqHandler;

/// Granule of the guest's FUSE DAX code (`FUSE_DAX_SZ`): windows are a
/// multiple of it.
pub const DAX_CHUNK: u64 = 2 << 20;
/// Window size of a share given as `dax` without a size.
pub const DEFAULT_DAX_WINDOW: u64 = 256 << 20;
/// Largest window of one share.
pub const MAX_DAX_WINDOW: u64 = 64 << 30;
/// Host page size the offsets must be aligned to.
const PAGE: u64 = 4096;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Checks that `[offset, offset + len)` is a non-empty, page-aligned range
/// inside a window of `window_len` bytes. All arithmetic is overflow-safe:
/// the values come from the guest.
pub fn check_range(window_len: u64, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 || !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(einval());
    }
    match offset.checked_add(len) {
        Some(end) if end <= window_len => Ok(()),
        _ => Err(einval()),
    }
}

/// A reserved range of host memory backing one device's DAX window.
pub struct DaxWindow {
    /// Host address of the reservation (an integer: the memory is never
    /// accessed by the VMM, only remapped).
    addr: usize,
    len: u64,
    /// Guest-physical address the window is registered at.
    guest_addr: u64,
    setups: AtomicU64,
    removals: AtomicU64,
}

impl std::fmt::Debug for DaxWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaxWindow")
            .field("guest_addr", &format_args!("{:#x}", self.guest_addr))
            .field("len", &self.len)
            .finish()
    }
}

/// Maps `len` bytes of inaccessible, unreserved anonymous memory at `addr`
/// (`MAP_FIXED` when `addr` is not null).
///
/// # Safety
/// With a non-null `addr`, `[addr, addr + len)` must lie inside a mapping
/// owned by the caller that nothing else in the process uses.
unsafe fn map_none(addr: *mut libc::c_void, len: usize) -> io::Result<*mut libc::c_void> {
    let fixed = if addr.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: the caller guarantees a fixed range is ours; an anonymous
    // PROT_NONE mapping carries no data.
    let p = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

impl DaxWindow {
    /// Reserves `len` bytes (a non-zero multiple of [`DAX_CHUNK`]) to be
    /// registered at guest-physical `guest_addr`.
    pub fn new(guest_addr: u64, len: u64) -> io::Result<DaxWindow> {
        if len == 0 || !len.is_multiple_of(DAX_CHUNK) || len > MAX_DAX_WINDOW {
            return Err(einval());
        }
        let size = usize::try_from(len).map_err(|_| einval())?;
        // SAFETY: a null address lets the kernel pick a free range.
        let p = unsafe { map_none(std::ptr::null_mut(), size) }?;
        Ok(DaxWindow {
            addr: p as usize,
            len,
            guest_addr,
            setups: AtomicU64::new(0),
            removals: AtomicU64::new(0),
        })
    }

    /// Window length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical address of the window.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Host address of the reservation (for the KVM memory slot).
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    /// Number of successful SETUPMAPPING requests so far.
    pub fn setups(&self) -> u64 {
        self.setups.load(Ordering::Relaxed)
    }

    /// Number of ranges removed by REMOVEMAPPING so far.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Relaxed)
    }

    /// Maps `len` bytes of `fd` from `foffset` at window offset `moffset`,
    /// read-only unless `writable`.
    pub fn map(
        &self,
        fd: RawFd,
        foffset: u64,
        moffset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<()> {
        check_range(self.len, moffset, len)?;
        if !foffset.is_multiple_of(PAGE) {
            return Err(einval());
        }
        let foffset = libc::off_t::try_from(foffset).map_err(|_| einval())?;
        // Both fit: checked against the window, whose length is a usize.
        let (moffset, size) = (moffset as usize, len as usize);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: [addr + moffset, + size) lies inside our reservation
        // (checked above), which lives as long as `self` and is used by
        // nothing but KVM; MAP_FIXED replaces only pages of it.
        let p = unsafe {
            libc::mmap(
                (self.addr + moffset) as *mut libc::c_void,
                size,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                foffset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.setups.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Replaces `[moffset, moffset + len)` with inaccessible memory.
    pub fn unmap(&self, moffset: u64, len: u64) -> io::Result<()> {
        check_range(self.len, moffset, len)?;
        // SAFETY: the range lies inside our reservation (checked above).
        unsafe {
            map_none(
                (self.addr + moffset as usize) as *mut libc::c_void,
                len as usize,
            )
        }?;
        Ok(())
    }

    /// Drops every mapping (device reset): host files are no longer held.
    pub fn unmap_all(&self) -> io::Result<()> {
        self.unmap(0, self.len)
    }
}

impl Drop for DaxWindow {
    fn drop(&mut self) {
        // SAFETY: the reservation is ours; no handler holds it any more
        // (they hold an Arc). KVM drops its own references through its MMU
        // notifier when the range goes away.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// The server's SETUPMAPPING/REMOVEMAPPING back end for one device.
pub struct DaxHandler {
    window: Arc<DaxWindow>,
    read_only: bool,
}

impl DaxHandler {
    /// A handler mapping into `window`; with `read_only` no mapping is ever
    /// writable (a second line behind `ConfinedFs`).
    pub fn new(window: Arc<DaxWindow>, read_only: bool) -> DaxHandler {
        DaxHandler { window, read_only }
    }
}

impl FsCacheReqHandler for DaxHandler {
    fn map(
        &mut self,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: u64,
        fd: RawFd,
    ) -> io::Result<()> {
        let writable = flags & SetupmappingFlags::WRITE.bits() != 0;
        if writable && self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let r = self.window.map(fd, foffset, moffset, len, writable);
        if let Err(e) = &r {
            tracing::debug!(
                foffset,
                moffset,
                len,
                flags,
                "virtio-fs: SETUPMAPPING failed: {e}"
            );
        }
        r
    }

    fn unmap(&mut self, requests: Vec<RemovemappingOne>) -> io::Result<()> {
        for r in requests {
            // virtiofsd's convention: length ~0 at offset 0 means everything.
            let (moffset, len) = if r.moffset == 0 && r.len == u64::MAX {
                (0, self.window.len)
            } else {
                (r.moffset, r.len)
            };
            self.window.unmap(moffset, len)?;
            self.window.removals.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn ranges_are_checked_against_the_window() {
        let w = 4 << 20;
        assert!(check_range(w, 0, w).is_ok());
        assert!(check_range(w, 2 << 20, 2 << 20).is_ok());
        assert!(check_range(w, w - PAGE, PAGE).is_ok());
        for (off, len) in [
            (0, 0),
            (0, w + PAGE),
            (w, PAGE),
            (w - PAGE, 2 * PAGE),
            (1, PAGE),
            (0, PAGE + 1),
            (u64::MAX - PAGE + 1, PAGE),
            (PAGE, u64::MAX - PAGE + 1),
            (!(PAGE - 1), !(PAGE - 1)),
        ] {
            assert!(check_range(w, off, len).is_err(), "{off:#x}+{len:#x}");
        }
    }

    #[test]
    fn window_sizes() {
        assert!(DaxWindow::new(1 << 32, 0).is_err());
        assert!(DaxWindow::new(1 << 32, DAX_CHUNK + PAGE).is_err());
        assert!(DaxWindow::new(1 << 32, MAX_DAX_WINDOW + DAX_CHUNK).is_err());
        let w = DaxWindow::new(1 << 32, DAX_CHUNK).unwrap();
        assert_eq!((w.len(), w.guest_addr()), (DAX_CHUNK, 1 << 32));
    }

    /// Reads one byte of the reservation (the test plays the guest).
    fn peek(w: &DaxWindow, off: u64) -> u8 {
        assert!(off < w.len);
        // SAFETY: the test mapped a file page there just before.
        unsafe { std::ptr::read_volatile((w.addr + off as usize) as *const u8) }
    }

    #[test]
    fn map_and_unmap_file_pages() {
        let path = std::env::temp_dir().join(format!("vessel-dax-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        drop(f);
        let ro = std::fs::File::open(&path).unwrap();
        let window = Arc::new(DaxWindow::new(1 << 32, DAX_CHUNK).unwrap());
        let mut h = DaxHandler::new(window.clone(), false);
        let read = SetupmappingFlags::READ.bits();
        h.map(PAGE, 2 * PAGE, 2 * PAGE, read, ro.as_raw_fd())
            .unwrap();
        assert_eq!(peek(&window, 2 * PAGE), data[PAGE as usize]);
        assert_eq!(peek(&window, 4 * PAGE - 1), data[3 * PAGE as usize - 1]);
        assert_eq!(window.setups(), 1);
        // Bad requests change nothing.
        for (fo, mo, len) in [
            (0, DAX_CHUNK, PAGE),
            (0, DAX_CHUNK - PAGE, 2 * PAGE),
            (1, 0, PAGE),
            (0, 1, PAGE),
            (!(PAGE - 1), 0, PAGE),
            (0, !(PAGE - 1), 2 * PAGE),
        ] {
            assert!(h.map(fo, mo, len, read, ro.as_raw_fd()).is_err());
        }
        // A writable mapping of a read-only fd fails in mmap; a read-only
        // share refuses it before.
        let write = read | SetupmappingFlags::WRITE.bits();
        assert!(h.map(0, 0, PAGE, write, ro.as_raw_fd()).is_err());
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut h_ro = DaxHandler::new(window.clone(), true);
        let e = h_ro.map(0, 0, PAGE, write, rw.as_raw_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        h.map(0, 0, PAGE, write, rw.as_raw_fd()).unwrap();
        assert_eq!(peek(&window, 0), data[0]);
        assert_eq!(window.setups(), 2);

        assert!(h
            .unmap(vec![RemovemappingOne {
                moffset: DAX_CHUNK,
                len: PAGE
            }])
            .is_err());
        h.unmap(vec![RemovemappingOne {
            moffset: 2 * PAGE,
            len: 2 * PAGE,
        }])
        .unwrap();
        h.unmap(vec![RemovemappingOne {
            moffset: 0,
            len: u64::MAX,
        }])
        .unwrap();
        assert_eq!(window.removals(), 2);
        // The host file is no longer mapped in this process.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(path.to_str().unwrap()), "{maps}");
        let _ = std::fs::remove_file(&path);
    }
}

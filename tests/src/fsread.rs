//! Whole-file reads for the virtio-fs tests and `cargo xtask bench fs`:
//! in the guest through the agent (`ReadFile`/`MmapReadFile` with
//! `discard`: 1 MiB `pread`s or one shared mapping, FNV-1a over every
//! byte, timed on the guest clock), and on the host with the same loop, so
//! the two sides do the same work per byte. Plus what the DAX checks need:
//! mounting a share and the VMM's mappings of a host file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::{fnv1a, MountRequest, ReadFileRequest, FNV1A_INIT};

/// Read size of one `pread`, the agent's for a discarding `ReadFile`.
const CHUNK: usize = 1 << 20;

/// One whole-file read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadTiming {
    /// Bytes read.
    pub len: u64,
    /// FNV-1a of the bytes.
    pub fnv1a: u64,
    /// Seconds from open to the last byte (guest clock for guest reads).
    pub secs: f64,
}

impl ReadTiming {
    /// Throughput in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.len as f64 / (1 << 20) as f64 / self.secs.max(1e-9)
    }
}

/// Reads the guest file `path` whole in the guest (`mmap` or `read(2)`),
/// discarding the bytes; the agent times it with the guest clock.
pub fn guest_read(c: &mut AgentClient, path: &str, mmap: bool) -> Result<ReadTiming, ClientError> {
    let req = ReadFileRequest {
        path: path.into(),
        max_len: u64::MAX,
        offset: 0,
        discard: true,
    };
    let d = if mmap {
        c.mmap_read_file(req)?
    } else {
        c.read_file(req)?
    };
    Ok(ReadTiming {
        len: d.len,
        fnv1a: d.fnv1a,
        secs: d.elapsed_us as f64 / 1e6,
    })
}

/// Reads the host file `path` whole the way the agent does (1 MiB
/// `pread`s into one buffer, FNV-1a over every byte), timed with the host
/// clock.
pub fn host_read(path: &Path) -> io::Result<ReadTiming> {
    let start = Instant::now();
    let file = File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut sum = FNV1A_INIT;
    let mut len = 0u64;
    loop {
        let n = match file.read_at(&mut buf, len) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sum = fnv1a(sum, &buf[..n]);
        len += n as u64;
    }
    Ok(ReadTiming {
        len,
        fnv1a: sum,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Evicts `path` from the host page cache as far as an unprivileged
/// process can without touching system settings: write back its dirty
/// pages (`fdatasync`), then `posix_fadvise(POSIX_FADV_DONTNEED)` over the
/// whole file. Pages another process has mapped stay; see
/// [`resident_fraction`] for what is left.
pub fn drop_host_cache(path: &Path) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(path)?;
    file.sync_data()?;
    // SAFETY: posix_fadvise only reads its arguments; the fd is open.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The fraction of `path`'s pages in the host page cache (`mincore` over a
/// read-only mapping, which does not fault pages in).
pub fn resident_fraction(path: &Path) -> io::Result<f64> {
    let file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::other("file too large to map"))?;
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: a new read-only shared mapping chosen by the kernel; it is
    // never read, only passed to mincore, and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `p` maps `len` bytes; `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    if rc != 0 {
        return Err(err);
    }
    let resident = vec.iter().filter(|b| **b & 1 != 0).count();
    Ok(resident as f64 / vec.len() as f64)
}

/// Mounts virtio-fs share `tag` on the guest directory `target` through the
/// agent (`dax`: `dax=always`).
pub fn mount_share(
    c: &mut AgentClient,
    tag: &str,
    target: &str,
    read_only: bool,
    dax: bool,
) -> Result<(), ClientError> {
    c.mount_request(MountRequest {
        tag: tag.into(),
        target: target.into(),
        read_only,
        dax,
    })
}

/// Lines of `/proc/PID/maps` of the VMM `pid` that map the host `file`
/// (DAX mappings of a share's file).
pub fn vmm_mappings(pid: u32, file: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let name = file.to_string_lossy();
    maps.lines()
        .filter(|l| l.ends_with(name.as_ref()))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_read_sums_like_the_agent_and_cache_drop_works() {
        let dir = crate::TempDir::new("fsread");
        let path = dir.0.join("f");
        let data = crate::pattern(3 * CHUNK + 123, 7);
        std::fs::write(&path, &data).unwrap();
        let r = host_read(&path).unwrap();
        assert_eq!(r.len, data.len() as u64);
        assert_eq!(r.fnv1a, fnv1a(FNV1A_INIT, &data));
        assert!(resident_fraction(&path).unwrap() > 0.99);
        drop_host_cache(&path).unwrap();
        // Some file systems (tmpfs) cannot drop pages: only check the
        // answer is a fraction.
        let left = resident_fraction(&path).unwrap();
        assert!((0.0..=1.0).contains(&left), "{left}");
    }
}

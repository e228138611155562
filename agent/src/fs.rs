//! Filesystem requests: mount a virtio-fs share, and the small diagnostic
//! `ReadFile`/`WriteFile` the host uses to check that data flows. Each does
//! the fewest system calls it can: the mount is tried before its mount
//! point is created, and files are read with large buffers.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use vessel_proto::{
    fnv1a, ErrorCode, ErrorReply, FileData, MountRequest, ReadFileRequest, WriteFileRequest,
    FNV1A_INIT, MAX_INLINE_READ,
};

use crate::init::open_raw_mode;

/// Longest virtio-fs tag.
const TAG_MAX_LEN: usize = 36;
/// Read size of a discarding `ReadFile`.
const DISCARD_CHUNK: usize = 1 << 20;

fn invalid(message: String) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::InvalidRequest,
        message,
    }
}

fn failed(message: String) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::Internal,
        message,
    }
}

fn absolute_path(path: &str) -> Result<CString, ErrorReply> {
    if !path.starts_with('/') {
        return Err(invalid(format!("path {path:?} is not absolute")));
    }
    CString::new(path).map_err(|_| invalid(format!("path {path:?} contains a NUL byte")))
}

/// Creates `dir` and missing parents (mode 0755).
fn mkdir_p(dir: &str) -> Result<(), Errno> {
    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(Errno::ENOENT) => {
            let parent = match dir.trim_end_matches('/').rsplit_once('/') {
                Some((p, _)) if !p.is_empty() => p,
                _ => return Err(Errno::ENOENT),
            };
            mkdir_p(parent)?;
            match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Mounts virtio-fs share `tag` on `target`: one `mount` when the mount
/// point exists. With `dax`, the mount asks for `dax=always` (and fails
/// with `EINVAL` when the device has no DAX window).
pub fn mount_share(req: &MountRequest) -> Result<(), ErrorReply> {
    if req.tag.is_empty() || req.tag.len() > TAG_MAX_LEN || req.tag.contains('\0') {
        return Err(invalid(format!("invalid tag {:?}", req.tag)));
    }
    absolute_path(&req.target)?;
    let flags = if req.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let data = req.dax.then_some("dax=always");
    let attempt = || {
        mount(
            Some(req.tag.as_str()),
            req.target.as_str(),
            Some("virtiofs"),
            flags,
            data,
        )
    };
    let result = match attempt() {
        Err(Errno::ENOENT) => mkdir_p(&req.target).and_then(|()| attempt()),
        other => other,
    };
    result.map_err(|e| {
        let dax = if req.dax {
            " with dax=always (does the device have a DAX window?)"
        } else {
            ""
        };
        failed(format!(
            "cannot mount {} on {}{dax}: {e}",
            req.tag, req.target
        ))
    })
}

/// Reads up to `max_len` bytes of a file from `offset` on (`pread`).
pub fn read_file(req: &ReadFileRequest) -> Result<FileData, ErrorReply> {
    let path = absolute_path(&req.path)?;
    if !req.discard && req.max_len > MAX_INLINE_READ {
        return Err(invalid(format!(
            "max_len {} exceeds {MAX_INLINE_READ} (use discard)",
            req.max_len
        )));
    }
    let start = Instant::now();
    let fd = open_raw_mode(&path, libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY, 0)
        .map_err(|e| failed(format!("cannot open {}: {e}", req.path)))?;
    let file = File::from(fd);
    let max = usize::try_from(req.max_len).unwrap_or(usize::MAX);
    let chunk = if req.discard {
        max.min(DISCARD_CHUNK)
    } else {
        max
    };
    let mut buf = vec![0u8; chunk];
    let mut out = FileData {
        fnv1a: FNV1A_INIT,
        ..FileData::default()
    };
    let mut total = 0usize;
    while total < max {
        let want = (max - total).min(buf.len());
        let dst = if req.discard {
            &mut buf[..want]
        } else {
            &mut buf[total..total + want]
        };
        let at = req.offset.saturating_add(total as u64);
        let n = match file.read_at(dst, at) {
            Ok(0) => {
                out.eof = true;
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(format!("cannot read {}: {e}", req.path))),
        };
        out.fnv1a = fnv1a(out.fnv1a, &dst[..n]);
        total += n;
    }
    out.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    out.len = total as u64;
    if !req.discard {
        buf.truncate(total);
        out.data = buf;
    }
    Ok(out)
}

/// Like [`read_file`], through a shared read-only mapping of the range:
/// each page reaches the process by a page fault (with a DAX mount, a
/// mapping of the host's page) instead of a `read(2)` copy.
pub fn mmap_read_file(req: &ReadFileRequest) -> Result<FileData, ErrorReply> {
    let path = absolute_path(&req.path)?;
    if !req.discard && req.max_len > MAX_INLINE_READ {
        return Err(invalid(format!(
            "max_len {} exceeds {MAX_INLINE_READ} (use discard)",
            req.max_len
        )));
    }
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if !req.offset.is_multiple_of(page) {
        return Err(invalid(format!(
            "offset {} is not a multiple of the page size",
            req.offset
        )));
    }
    let start = Instant::now();
    let fd = open_raw_mode(&path, libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY, 0)
        .map_err(|e| failed(format!("cannot open {}: {e}", req.path)))?;
    let file = File::from(fd);
    let size = file
        .metadata()
        .map_err(|e| failed(format!("cannot stat {}: {e}", req.path)))?
        .len();
    let len = size.saturating_sub(req.offset).min(req.max_len);
    let mut out = FileData {
        fnv1a: FNV1A_INIT,
        eof: req.offset.saturating_add(len) >= size,
        len,
        ..FileData::default()
    };
    if len > 0 {
        let map_len = usize::try_from(len).map_err(|_| invalid("range too large".into()))?;
        let offset =
            libc::off_t::try_from(req.offset).map_err(|_| invalid("offset too large".into()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared read-only mapping chosen by the kernel;
        // nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(failed(format!(
                "cannot map {}: {}",
                req.path,
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `p` maps `map_len` readable bytes of the file until the
        // munmap below; the caller promised the file does not shrink.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, map_len) };
        for chunk in bytes.chunks(DISCARD_CHUNK) {
            out.fnv1a = fnv1a(out.fnv1a, chunk);
        }
        if !req.discard {
            out.data = bytes.to_vec();
        }
        // SAFETY: unmaps exactly the mapping made above; `bytes` is not
        // used any more.
        unsafe { libc::munmap(p, map_len) };
    }
    out.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(out)
}

/// Creates or truncates a file and writes `data` to it.
pub fn write_file(req: &WriteFileRequest) -> Result<u64, ErrorReply> {
    let path = absolute_path(&req.path)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOCTTY;
    let fd = open_raw_mode(&path, flags, 0o644)
        .map_err(|e| failed(format!("cannot open {} for writing: {e}", req.path)))?;
    File::from(fd)
        .write_all(&req.data)
        .map_err(|e| failed(format!("cannot write {}: {e}", req.path)))?;
    Ok(req.data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-agent-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn read_and_write_round_trip() {
        let d = tmp("rw");
        let p = d.join("f").to_str().unwrap().to_string();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let w = WriteFileRequest {
            path: p.clone(),
            data: data.clone(),
        };
        assert_eq!(write_file(&w).unwrap(), data.len() as u64);
        let r = read_file(&ReadFileRequest {
            path: p.clone(),
            max_len: 1000,
            offset: 0,
            discard: false,
        })
        .unwrap();
        assert_eq!(r.data, &data[..1000]);
        assert_eq!((r.len, r.eof), (1000, false));
        assert_eq!(r.fnv1a, fnv1a(FNV1A_INIT, &data[..1000]));
        let r = read_file(&ReadFileRequest {
            path: p.clone(),
            max_len: 1000,
            offset: 299_500,
            discard: false,
        })
        .unwrap();
        assert_eq!(r.data, &data[299_500..]);
        assert_eq!((r.len, r.eof), (500, true));
        let r = read_file(&ReadFileRequest {
            path: p.clone(),
            max_len: u64::MAX,
            offset: 0,
            discard: true,
        })
        .unwrap();
        assert!(r.data.is_empty());
        assert_eq!((r.len, r.eof), (data.len() as u64, true));
        assert_eq!(r.fnv1a, fnv1a(FNV1A_INIT, &data));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_requests_are_refused() {
        let too_big = ReadFileRequest {
            path: "/etc/hostname".into(),
            max_len: MAX_INLINE_READ + 1,
            offset: 0,
            discard: false,
        };
        assert_eq!(
            read_file(&too_big).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let relative = ReadFileRequest {
            path: "etc/hostname".into(),
            max_len: 1,
            offset: 0,
            discard: false,
        };
        assert_eq!(
            read_file(&relative).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let missing = ReadFileRequest {
            path: "/nonexistent/x".into(),
            max_len: 1,
            offset: 0,
            discard: false,
        };
        let e = read_file(&missing).unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("No such file"), "{}", e.message);
        for tag in ["", &"x".repeat(37)] {
            let m = MountRequest {
                tag: tag.to_string(),
                target: "/mnt/x".into(),
                read_only: false,
                dax: false,
            };
            assert_eq!(mount_share(&m).unwrap_err().code, ErrorCode::InvalidRequest);
        }
    }

    #[test]
    fn mmap_read_matches_read() {
        let d = tmp("mmap");
        let p = d.join("f").to_str().unwrap().to_string();
        let data: Vec<u8> = (0..300_001u32).map(|i| (i % 249) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        for (offset, max_len, discard) in [(0, u64::MAX, true), (4096, 1000, false), (0, 0, true)] {
            let req = ReadFileRequest {
                path: p.clone(),
                max_len,
                offset,
                discard,
            };
            let a = read_file(&req).unwrap();
            let b = mmap_read_file(&req).unwrap();
            assert_eq!((a.len, a.fnv1a, &a.data), (b.len, b.fnv1a, &b.data));
            assert_eq!(a.eof, b.eof, "{offset} {max_len}");
        }
        let bad = ReadFileRequest {
            path: p.clone(),
            max_len: 10,
            offset: 1,
            discard: false,
        };
        assert_eq!(
            mmap_read_file(&bad).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn mkdir_p_creates_parents() {
        let d = tmp("mkdirp");
        let deep = d.join("a/b/c");
        mkdir_p(deep.to_str().unwrap()).unwrap();
        assert!(deep.is_dir());
        mkdir_p(deep.to_str().unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! The rootfs mounts containerd passes in Create (a snapshotter's overlay
//! or bind mount), mounted on `<bundle>/rootfs` as the runc shim does.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use containerd_shim_protos::api::Mount;

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
#[error("mounting {kind} {source_path} on {target}: {err}")]
pub struct MountError {
    kind: String,
    source_path: String,
    target: String,
    err: std::io::Error,
}

/// Splits containerd's options into mount(2) flags and data.
fn flags_and_data(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn cstr(s: &[u8]) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Mounts `mounts` one over the other on `target`.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let (flags, data) = flags_and_data(&m.options);
        let fail = |err| MountError {
            kind: m.type_.clone(),
            source_path: m.source.clone(),
            target: target.display().to_string(),
            err,
        };
        let src = cstr(m.source.as_bytes()).map_err(fail)?;
        let tgt = cstr(target.as_os_str().as_bytes()).map_err(fail)?;
        let kind = cstr(m.type_.as_bytes()).map_err(fail)?;
        let data = cstr(data.as_bytes()).map_err(fail)?;
        // SAFETY: mount(2) with NUL-terminated strings that live across
        // the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                kind.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Unmounts whatever is mounted on `<bundle>/rootfs` (lazily; errors other
/// than "not mounted" are logged).
pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    let Ok(t) = cstr(target.as_os_str().as_bytes()) else {
        return;
    };
    loop {
        // SAFETY: umount2(2) of a NUL-terminated path that lives across
        // the call.
        let r = unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!("unmounting {}: {e}", target.display());
            }
            return;
        }
    }
}

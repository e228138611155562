//! Bind mounts from the host: the sources of a bundle's `bind`/`rbind`
//! mounts are host paths, but the container lives in a VM. Like Kata's
//! shared directory, every source is bind-mounted on the host into one
//! staging directory, which the VM sees through a second virtio-fs share
//! ([`crate::sandbox::MOUNTS_TAG`]); the spec given to the agent names the
//! staged copy (`<guest staging dir>/<n>`) as the mount's source, and the
//! agent bind-mounts it into the container with the spec's options.
//!
//! The host mounts are made in a private mount namespace of the VMM
//! process itself (between fork and exec, see [`HostBind::apply`]), so they
//! exist only for the VMM's FUSE server and vanish with it: nothing is
//! mounted in the host's namespace and nothing can leak, whatever way the
//! VMM ends. A mount the spec marks `ro` is also read-only on the host (a
//! read-only bind), so the host kernel refuses writes even if the guest
//! kernel were subverted; the guest mounts it read-only too.
//!
//! Sources are resolved on the host (following symlinks: they come from the
//! engine, not from the guest); a relative source is relative to the
//! bundle, as with runc. A missing source is an error before anything
//! starts.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// Errors planning bind mounts.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A mount entry is malformed.
    #[error("config.json: mounts[{index}]: {msg}")]
    Invalid {
        /// Index in `mounts`.
        index: usize,
        /// What is wrong.
        msg: String,
    },
    /// The source cannot be used.
    #[error("bind mount source {}: {source}", path.display())]
    Source {
        /// The source as resolved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The staging directory cannot be prepared.
    #[error("preparing {}: {source}", path.display())]
    Stage {
        /// What was being created.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One host bind mount into the staging directory.
#[derive(Debug, Clone)]
pub struct HostBind {
    src: CString,
    dst: CString,
    recursive: bool,
    readonly: bool,
}

/// `mount(2)`; `src` and `fstype` are always null-or-valid here.
fn sys_mount(src: *const libc::c_char, dst: &CStr, flags: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: `src` is null or points to a NUL-terminated string that
    // outlives the call, `dst` is a valid C string, type and data are null
    // (allowed for bind and propagation changes).
    let r = unsafe { libc::mount(src, dst.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `struct mount_attr` of `mount_setattr(2)` (not in the libc crate).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `MOUNT_ATTR_RDONLY`.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `AT_RECURSIVE`.
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Makes the mount at `dst` and every mount below it read-only
/// (`mount_setattr`, Linux 5.12); where that call does not exist, only the
/// top mount (a read-only bind remount).
fn readonly_recursive(dst: &CStr) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a C string and a pointer to a live
    // mount_attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            dst.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    sys_mount(
        std::ptr::null(),
        dst,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
    )
}

impl HostBind {
    /// Makes a private mount namespace for the calling process and the
    /// mounts of `binds` in it. Meant for the VMM's child between fork and
    /// exec (see `Command::pre_exec`): only system calls, no allocation.
    ///
    /// The staging directory `stage` itself becomes a read-only bind of
    /// itself first: the guest sees it through a read-write share (for the
    /// read-write binds), and without this it could create files of any
    /// size next to the mount points, in the host's `/run`. Does nothing
    /// without a `stage` and `binds`.
    pub fn apply(stage: Option<&CStr>, binds: &[HostBind]) -> std::io::Result<()> {
        if stage.is_none() && binds.is_empty() {
            return Ok(());
        }
        // SAFETY: unshare with a flag only.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Nothing we mount may propagate back to the host's namespace.
        sys_mount(std::ptr::null(), c"/", libc::MS_REC | libc::MS_SLAVE)?;
        if let Some(stage) = stage {
            sys_mount(stage.as_ptr(), stage, libc::MS_BIND)?;
            sys_mount(
                std::ptr::null(),
                stage,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            )?;
        }
        for b in binds {
            let rec = if b.recursive { libc::MS_REC } else { 0 };
            sys_mount(b.src.as_ptr(), &b.dst, libc::MS_BIND | rec)?;
            if b.readonly && b.recursive {
                readonly_recursive(&b.dst)?;
            } else if b.readonly {
                sys_mount(
                    std::ptr::null(),
                    &b.dst,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                )?;
            }
        }
        Ok(())
    }
}

/// `OPEN_TREE_CLONE` of `open_tree(2)`.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `MOVE_MOUNT_F_EMPTY_PATH` of `move_mount(2)`.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// A detached copy of the mount at `src` (and, with `recursive`, of the
/// mounts below it), read-only when `readonly`: `open_tree(2)` with
/// `OPEN_TREE_CLONE`, made in the caller's mount namespace, to be attached
/// in another one with [`attach_tree`] (how a pod container's rootfs and
/// binds reach the mount namespace of a VMM that already runs).
pub fn clone_tree(src: &CStr, recursive: bool, readonly: bool) -> std::io::Result<OwnedFd> {
    let rec = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: open_tree with a C string; returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | rec,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    if readonly {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: mount_setattr on our descriptor with an empty path and
        // a pointer to a live mount_attr of the size we pass.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint | rec,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(tree)
}

/// Attaches the detached tree `tree` ([`clone_tree`]) on `dst` in the
/// caller's mount namespace. Only a system call: safe in a forked child.
pub fn attach_tree(tree: &OwnedFd, dst: &CStr) -> std::io::Result<()> {
    // SAFETY: move_mount from our descriptor (empty path) onto a C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl HostBind {
    /// A detached copy of this bind's source ([`clone_tree`]) and the
    /// mount point it goes on.
    pub fn clone_tree(&self) -> std::io::Result<(OwnedFd, &CStr)> {
        Ok((
            clone_tree(&self.src, self.recursive, self.readonly)?,
            &self.dst,
        ))
    }
}

/// `openat2(dirfd, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
/// `path` resolved as if `dirfd` were `/` (symlinks and `..` cannot leave it).
fn open_in_root(root: &OwnedFd, path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain old data; all-zero is its neutral value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid descriptor, a C string and a pointer to
    // a live open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates `rel` (relative to the root file system `root`) and its missing
/// parents, resolving every existing component inside the root (the image
/// is untrusted: a symlink in it cannot make us create anything outside).
/// The last component becomes an empty file when `file`.
fn create_in_root(root: &OwnedFd, rel: &Path, file: bool) -> std::io::Result<()> {
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut prefix = PathBuf::new();
    for (i, name) in names.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(name);
        match open_in_root(root, &prefix) {
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let dir = if parent.as_os_str().is_empty() {
            root.try_clone()?
        } else {
            open_in_root(root, &parent)?
        };
        let c = CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let last = i + 1 == names.len();
        // SAFETY: *at calls on a descriptor we own with a C string; the
        // name is a single component, so nothing is resolved but `dir`.
        let r = unsafe {
            if last && file {
                let fd = libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd.min(0)
            } else {
                libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755)
            }
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// For a read-only root file system, which the guest cannot write: creates
/// the destinations of `spec`'s mounts that are missing from `rootfs`, on
/// the host, the way runc creates them before it remounts the root
/// read-only. A bind mount of a file gets an empty file, anything else a
/// directory. Destinations below another mount of the spec are left to the
/// agent (they live in that mount, not in the image). Call before [`plan`]
/// (it reads the original sources).
pub fn make_mount_points(spec: &Value, bundle: &Path, rootfs: &Path) -> Result<(), BindError> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Ok(());
    };
    let root = std::fs::File::open(rootfs)
        .map(OwnedFd::from)
        .map_err(|source| BindError::Source {
            path: rootfs.to_path_buf(),
            source,
        })?;
    let mut seen: Vec<PathBuf> = Vec::new();
    for (index, m) in mounts.iter().enumerate() {
        let Some(dest) = m["destination"].as_str().map(PathBuf::from) else {
            continue;
        };
        if dest.components().any(|c| c == Component::ParentDir) {
            return Err(BindError::Invalid {
                index,
                msg: "destination contains ..".into(),
            });
        }
        let below_another = seen.iter().any(|d| dest != *d && dest.starts_with(d));
        seen.push(dest.clone());
        if below_another {
            continue;
        }
        let file = bind_kind(m).is_some()
            && m["source"]
                .as_str()
                .and_then(|s| std::fs::metadata(bundle.join(s)).ok())
                .is_some_and(|md| !md.is_dir());
        create_in_root(&root, &dest, file).map_err(|source| BindError::Stage {
            path: rootfs.join(dest.strip_prefix("/").unwrap_or(&dest)),
            source,
        })?;
    }
    Ok(())
}

/// Whether mount entry `m` is a bind mount, and with `rbind`.
fn bind_kind(m: &Value) -> Option<bool> {
    let opts: Vec<&str> = m["options"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rbind = opts.contains(&"rbind");
    (m["type"].as_str() == Some("bind") || rbind || opts.contains(&"bind")).then_some(rbind)
}

/// Plans the bind mounts of `spec` (rewriting their sources in place to
/// `guest_stage/<n>`), creating each mount point `stage/<n>` on the host.
/// `bundle` resolves relative sources. Returns the host mounts to make.
pub fn plan(
    spec: &mut Value,
    bundle: &Path,
    stage: &Path,
    guest_stage: &str,
) -> Result<Vec<HostBind>, BindError> {
    let mut out = Vec::new();
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return Ok(out);
    };
    for (index, m) in mounts.iter_mut().enumerate() {
        let Some(recursive) = bind_kind(m) else {
            continue;
        };
        let invalid = |msg: &str| BindError::Invalid {
            index,
            msg: msg.into(),
        };
        let source = m["source"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("a bind mount needs a source"))?;
        let readonly = m["options"]
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("ro")));
        let given = bundle.join(source);
        let resolved = std::fs::canonicalize(&given).map_err(|source| BindError::Source {
            path: given.clone(),
            source,
        })?;
        let meta = std::fs::metadata(&resolved).map_err(|source| BindError::Source {
            path: resolved.clone(),
            source,
        })?;
        let n = out.len();
        let point = stage.join(n.to_string());
        let made = if meta.is_dir() {
            std::fs::create_dir_all(&point)
        } else {
            std::fs::File::create(&point).map(drop)
        };
        made.map_err(|source| BindError::Stage {
            path: point.clone(),
            source,
        })?;
        let cstr = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("a path contains NUL"))
        };
        out.push(HostBind {
            src: cstr(&resolved)?,
            dst: cstr(&point)?,
            recursive,
            readonly,
        });
        m["source"] = Value::String(format!("{}/{n}", guest_stage.trim_end_matches('/')));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-binds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn plans_binds_and_rewrites_sources() {
        let d = tmp("plan");
        let bundle = d.join("bundle");
        let stage = d.join("stage");
        std::fs::create_dir_all(bundle.join("data")).unwrap();
        std::fs::create_dir_all(&stage).unwrap();
        std::fs::write(d.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "source": d.join("resolv.conf"),
             "options": ["bind", "nosuid"]},
        ]});
        let binds = plan(&mut spec, &bundle, &stage, "/run/vessel/mounts/").unwrap();
        assert_eq!(binds.len(), 2);
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/vessel/mounts/0");
        assert_eq!(spec["mounts"][2]["source"], "/run/vessel/mounts/1");
        assert!(binds[0].recursive && binds[0].readonly);
        assert!(!binds[1].recursive && !binds[1].readonly);
        assert_eq!(
            binds[0].src.to_bytes(),
            std::fs::canonicalize(bundle.join("data"))
                .unwrap()
                .as_os_str()
                .as_bytes()
        );
        assert!(stage.join("0").is_dir());
        assert!(stage.join("1").is_file());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// runtime-tools' propagation mounts: a bind is recognised by its
    /// options whatever the type ("" or "none"); a tmpfs with a
    /// propagation is not a bind.
    #[test]
    fn binds_without_a_type_are_planned() {
        let d = tmp("untyped");
        let src = d.join("src");
        let stage = d.join("stage");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&stage).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/a", "type": "", "source": &src,
             "options": ["nosuid", "strictatime", "mode=755", "size=1k", "bind", "shared"]},
            {"destination": "/b", "type": "none", "source": &src,
             "options": ["rbind", "rshared"]},
            {"destination": "/c", "type": "tmpfs", "source": "tmpfs", "options": ["shared"]},
        ]});
        let binds = plan(&mut spec, &d, &stage, "/g").unwrap();
        assert_eq!(binds.len(), 2);
        assert!(!binds[0].recursive && binds[1].recursive);
        assert_eq!(spec["mounts"][0]["source"], "/g/0");
        assert_eq!(spec["mounts"][1]["source"], "/g/1");
        assert_eq!(spec["mounts"][2]["source"], "tmpfs");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mount_points_stay_inside_the_root() {
        let d = tmp("points");
        let rootfs = d.join("rootfs");
        let outside = d.join("outside");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An image with symlinks pointing out of it, absolutely and by `..`.
        std::os::unix::fs::symlink(&outside, rootfs.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", rootfs.join("etc/rel")).unwrap();
        let file = d.join("file");
        std::fs::write(&file, "x").unwrap();
        let spec = json!({"mounts": [
            {"destination": "/data/deep", "type": "bind", "source": &outside},
            {"destination": "/etc/f", "type": "bind", "source": &file},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
        ]});
        make_mount_points(&spec, &d, &rootfs).unwrap();
        assert!(rootfs.join("data/deep").is_dir());
        assert!(rootfs.join("etc/f").is_file());
        assert!(rootfs.join("dev").is_dir());
        // Below another mount: left to the agent.
        assert!(!rootfs.join("dev/pts").exists());
        // Symlinks resolve inside the root, where their targets do not
        // exist: an error, and nothing is created outside.
        for dest in ["/abs/x", "/etc/rel/y"] {
            let spec = json!({"mounts": [{"destination": dest, "type": "tmpfs"}]});
            let e = make_mount_points(&spec, &d, &rootfs).unwrap_err();
            assert!(e.to_string().contains("File exists"), "{e}");
        }
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        let bad = json!({"mounts": [{"destination": "/a/../../b", "type": "tmpfs"}]});
        assert!(make_mount_points(&bad, &d, &rootfs).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The host mounts in a child's own namespace: visible to it,
    /// read-only where asked, absent from ours. Needs root (as vessel).
    #[test]
    fn apply_mounts_in_a_private_namespace() {
        use std::os::unix::process::CommandExt;
        let d = tmp("apply");
        let src = d.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "data\n").unwrap();
        let stage = d.join("stage");
        std::fs::create_dir_all(&stage).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/ro", "type": "bind", "source": &src, "options": ["rbind", "ro"]},
            {"destination": "/rw", "type": "bind", "source": &src, "options": ["bind"]},
        ]});
        let binds = plan(&mut spec, &d, &stage, "/g").unwrap();
        let script = format!(
            "cat {s}/0/f; (: > {s}/0/new) 2>/dev/null && echo ro-writable || echo ro-refused; \
             echo more >> {s}/1/f && echo rw-ok; \
             (: > {s}/beside) 2>/dev/null && echo stage-writable || echo stage-refused",
            s = stage.display()
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &script]);
        let stage_c = CString::new(stage.as_os_str().as_bytes()).unwrap();
        // SAFETY: the closure only makes system calls (see `apply`).
        unsafe {
            cmd.pre_exec(move || HostBind::apply(Some(&stage_c), &binds));
        }
        let out = cmd.output().expect("run sh with the mounts");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "data\nro-refused\nrw-ok\nstage-refused\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(src.join("f")).unwrap(),
            "data\nmore\n"
        );
        assert!(!src.join("new").exists());
        assert!(!stage.join("beside").exists());
        let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!ours.contains(&*stage.to_string_lossy()), "{ours}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_source_and_no_source_are_errors() {
        let d = tmp("bad");
        let mut spec = json!({"mounts": [
            {"destination": "/x", "type": "bind", "source": "/nonexistent/vessel-test"}]});
        let e = plan(&mut spec, &d, &d, "/g").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vessel-test"), "{e}");
        let mut spec = json!({"mounts": [{"destination": "/x", "options": ["rbind"]}]});
        let e = plan(&mut spec, &d, &d, "/g").unwrap_err();
        assert!(e.to_string().contains("mounts[0]"), "{e}");
        assert!(std::fs::read_dir(&d).unwrap().next().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! Early set-up of PID 1: mounts, console, kernel command line, logging.
//!
//! Every system call here runs guest kernel code, which some hosts emulate
//! (about half a millisecond each), so nothing is probed: mount points that
//! the initramfs provides are mounted on directly, a directory is only
//! created when a mount reports it missing, and /proc/cmdline is read with
//! one `read`.

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};

/// Kernel command-line word that turns on verbose logging.
pub const DEBUG_FLAG: &str = "vessel.debug";

/// Verbose logging is on (set once at start from [`DEBUG_FLAG`]).
pub static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether verbose logging is on.
pub fn debug() -> bool {
    DEBUG.load(std::sync::atomic::Ordering::Relaxed)
}

/// Errors of the early set-up; each is logged, none stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A filesystem could not be mounted.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// Mount point.
        target: &'static str,
        /// Filesystem type.
        fstype: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// A mount point could not be created.
    #[error("cannot create {target}")]
    Mkdir {
        /// Mount point.
        target: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// The console could not be opened for fds 0..2.
    #[error("cannot open /dev/console")]
    Console(#[source] std::io::Error),
    /// The root could not be made a mount with a parent (containers then
    /// cannot pivot_root).
    #[error("cannot re-mount the root ({what})")]
    Root {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// /proc/cmdline could not be read.
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
}

/// Guest CLOCK_BOOTTIME in milliseconds (through the vDSO: no system call).
pub fn boottime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let ms = i128::from(t.tv_sec()) * 1000 + i128::from(t.tv_nsec()) / 1_000_000;
            u64::try_from(ms).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Writes one line to the console with a single `write` (stderr is
/// /dev/console for PID 1). Keep lines few and short: every byte goes out
/// through the emulated serial port.
pub fn log(msg: &str) {
    log_fmt(format_args!("{msg}"));
}

/// [`log`] for format arguments. A line that fits is composed on the stack,
/// so logging does not make the allocator map memory.
pub fn log_fmt(args: std::fmt::Arguments<'_>) {
    const PREFIX: &[u8] = b"vessel-agent: ";
    let mut buf = [0u8; 256];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let fits = cur.write_all(PREFIX).is_ok()
        && cur.write_fmt(args).is_ok()
        && cur.write_all(b"\n").is_ok();
    let mut stderr = std::io::stderr();
    let _ = if fits {
        let n = usize::try_from(cur.position()).unwrap_or(0);
        stderr.write_all(&buf[..n])
    } else {
        stderr.write_all(format!("vessel-agent: {args}\n").as_bytes())
    };
}

/// Logs an error with its chain of causes.
pub fn log_error(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    log(&msg);
}

/// One filesystem to mount at start.
struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// The mount point is known to be missing (it lives inside a filesystem
    /// mounted just before): create it without trying the mount first.
    mkdir_first: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const fn spec(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
) -> MountSpec {
    MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
        mkdir_first: false,
    }
}

/// What PID 1 mounts, in order (parents before children).
const MOUNTS: [MountSpec; 7] = [
    spec("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None),
    spec("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
    spec(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ),
    // A fresh devtmpfs has no pts directory.
    MountSpec {
        mkdir_first: true,
        ..spec(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
    },
    // sysfs provides /sys/fs/cgroup when the kernel has cgroups.
    spec(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        None,
    ),
    spec(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=0755"),
    ),
    spec(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        Some("mode=1777"),
    ),
];

fn mkdir(target: &'static str) -> Result<(), InitError> {
    match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(errno) => Err(InitError::Mkdir { target, errno }),
    }
}

/// Mounts one filesystem. Already mounted (EBUSY) is success; a missing
/// mount point is created and the mount tried once more.
fn mount_one(m: &MountSpec) -> Result<(), InitError> {
    if m.mkdir_first {
        mkdir(m.target)?;
    }
    let attempt = || mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data);
    let result = match attempt() {
        Err(Errno::ENOENT) if !m.mkdir_first => {
            mkdir(m.target)?;
            attempt()
        }
        other => other,
    };
    match result {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(errno) => Err(InitError::Mount {
            target: m.target,
            fstype: m.fstype,
            errno,
        }),
    }
}

/// `openat(AT_FDCWD, path, flags)` as one raw system call. Pass
/// `O_CLOEXEC` in `flags` unless the descriptor is to be inherited: musl's
/// `open()` follows an `O_CLOEXEC` open with a redundant `fcntl(F_SETFD)`
/// (for kernels older than 2.6.23), which costs a system call here.
fn open_raw(path: &CStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    open_raw_mode(path, flags, 0)
}

/// [`open_raw`] with the `mode` that `O_CREAT` uses.
pub fn open_raw_mode(
    path: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> std::io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call;
    // openat with these arguments only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            libc::c_uint::from(mode),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes sure fds 0, 1 and 2 are open: the kernel opens /dev/console for
/// /init when the initramfs has it, so normally this is one `poll`. (std's
/// runtime would do the same check, but would open /dev/null, which does
/// not exist before devtmpfs is mounted, and abort.)
fn ensure_stdio() -> Result<(), InitError> {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of 3 pollfd structures that the kernel
    // may write to during the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
    if n <= 0 {
        // None closed (or poll failed, then there is nothing better to do).
        return Ok(());
    }
    let missing: Vec<libc::c_int> = fds
        .iter()
        .filter(|p| p.revents & libc::POLLNVAL != 0)
        .map(|p| p.fd)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Not close-on-exec: stdio is inherited by what PID 1 starts. The
    // kernel hands out the lowest free number, so this is often fd 0 itself.
    let console =
        open_raw(c"/dev/console", libc::O_RDWR | libc::O_NOCTTY).map_err(InitError::Console)?;
    let console = std::os::fd::IntoRawFd::into_raw_fd(console);
    for fd in missing.into_iter().filter(|&fd| fd != console) {
        // SAFETY: dup2 of a descriptor we own onto a standard descriptor
        // number that is not open; no Rust object owns either number.
        if unsafe { libc::dup2(console, fd) } < 0 {
            return Err(InitError::Console(std::io::Error::last_os_error()));
        }
    }
    if console > 2 {
        // SAFETY: `console` is ours (from open_raw above) and was only
        // copied onto 0..2, so closing it leaves those open.
        drop(unsafe { OwnedFd::from_raw_fd(console) });
    }
    Ok(())
}

/// Whether `cmdline` holds [`DEBUG_FLAG`] as a word (or `vessel.debug=1`).
pub fn debug_flag(cmdline: &[u8]) -> bool {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .any(|w| w == DEBUG_FLAG.as_bytes() || w == b"vessel.debug=1")
}

/// Reads /proc/cmdline with one `read` (x86 command lines are at most
/// 2 KiB) and looks for [`DEBUG_FLAG`].
fn read_debug_flag() -> Result<bool, InitError> {
    let fd =
        open_raw(c"/proc/cmdline", libc::O_RDONLY | libc::O_CLOEXEC).map_err(InitError::Cmdline)?;
    let mut buf = [0u8; 4096];
    let n = File::from(fd).read(&mut buf).map_err(InitError::Cmdline)?;
    Ok(debug_flag(&buf[..n]))
}

/// Where the initramfs root is bind-mounted before it is moved onto `/`.
const ROOT_BIND: &CStr = c"/.vessel-root";

/// Makes the agent's root a mount with a parent, so that containers can
/// `pivot_root`: the kernel refuses `pivot_root` while the caller's root is
/// the initramfs itself (the one mount without a parent). A bind mount of
/// the initramfs moved on top of `/`, then `chroot` into it (what
/// `switch_root` does, without copying anything): six system calls, before
/// anything else is mounted.
fn make_root_pivotable() -> Result<(), InitError> {
    let step = |what: &'static str, r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(InitError::Root {
                what,
                errno: Errno::last(),
            })
        }
    };
    // SAFETY: (whole block) system calls on NUL-terminated literals.
    unsafe {
        if libc::mkdir(ROOT_BIND.as_ptr(), 0o700) != 0 && Errno::last() != Errno::EEXIST {
            return Err(InitError::Root {
                what: "mkdir",
                errno: Errno::last(),
            });
        }
        let null = std::ptr::null();
        step(
            "bind",
            libc::mount(
                c"/".as_ptr(),
                ROOT_BIND.as_ptr(),
                null,
                libc::MS_BIND,
                null.cast(),
            ),
        )?;
        step("chdir", libc::chdir(ROOT_BIND.as_ptr()))?;
        step(
            "move",
            libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                null,
                libc::MS_MOVE,
                null.cast(),
            ),
        )?;
        step("chroot", libc::chroot(c".".as_ptr()))?;
        step("chdir", libc::chdir(c"/".as_ptr()))?;
        // The (now plain) directory in the bound initramfs.
        libc::rmdir(ROOT_BIND.as_ptr());
    }
    Ok(())
}

/// Mounts the basic filesystems, makes sure stdio is open on the console,
/// and returns whether `vessel.debug` is on the kernel command line.
/// Failures are logged and survived.
pub fn setup() -> bool {
    let mut errors = Vec::new();
    if let Err(e) = make_root_pivotable() {
        errors.push(e);
    }
    for m in &MOUNTS {
        if let Err(e) = mount_one(m) {
            errors.push(e);
        }
    }
    // After the mounts: if the kernel could not give us a console, devtmpfs
    // now provides /dev/console.
    if let Err(e) = ensure_stdio() {
        errors.push(e);
    }
    let debug = read_debug_flag().unwrap_or_else(|e| {
        errors.push(e);
        false
    });
    for e in &errors {
        log_error(e);
    }
    debug
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_flag_is_a_whole_word() {
        assert!(debug_flag(b"console=ttyS0 vessel.debug reboot=k\n"));
        assert!(debug_flag(b"vessel.debug\n"));
        assert!(debug_flag(b"a vessel.debug=1"));
        assert!(!debug_flag(b"console=ttyS0 reboot=k\n"));
        assert!(!debug_flag(b"vessel.debugger x.vessel.debug"));
        assert!(!debug_flag(b""));
    }

    #[test]
    fn mounts_are_ordered_parents_first() {
        for (i, m) in MOUNTS.iter().enumerate() {
            for parent in &MOUNTS[i + 1..] {
                assert!(
                    !m.target.starts_with(&format!("{}/", parent.target)),
                    "{} is mounted before its parent {}",
                    m.target,
                    parent.target
                );
            }
        }
    }

    #[test]
    fn open_raw_opens_and_reports_errors() {
        let fd = open_raw(c"/proc/self/cmdline", libc::O_RDONLY | libc::O_CLOEXEC).unwrap();
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let mut buf = [0u8; 64];
        assert!(File::from(fd).read(&mut buf).unwrap() > 0);
        let e = open_raw(c"/nonexistent/x", libc::O_RDONLY).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn long_lines_are_logged_whole() {
        // Only checks that neither path panics; the output goes to stderr.
        log_fmt(format_args!("short {}", 1));
        log(&"x".repeat(1000));
    }

    #[test]
    fn error_chain_is_logged_in_one_line() {
        let e = InitError::Mount {
            target: "/proc",
            fstype: "proc",
            errno: Errno::EPERM,
        };
        assert_eq!(e.to_string(), "cannot mount proc on /proc");
        assert!(std::error::Error::source(&e).is_some());
    }
}

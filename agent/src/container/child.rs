//! The cloned child: applies a plan to itself and executes the process.
//!
//! The child is created with a raw `clone3` (namespaces, cgroup and a
//! pidfd in one system call) that shares the agent's memory, vfork-style
//! ([`spawn_vfork`]): it runs on a stack of its own while the thread that
//! created it sleeps, and the agent's other threads go on in the same
//! memory. The child therefore never allocates, never locks, never panics
//! and never unwinds, and writes nothing but its stack: it only reads the
//! plan the parent built (C strings, flag words) and makes raw system
//! calls. Failures are reported to the parent as a fixed-size [`Report`]
//! on the status pipe, followed by `_exit(127)`; right before `execve` the
//! child reports [`REPORT_EXEC`], and a successful `execve` closes the
//! (close-on-exec) pipe, which the parent sees as EOF.

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::spec::{CapSets, Finish, InitPlan, MountOp, ProcessPlan, AFTER_PIVOT, CAP_LAST};

/// `CLONE_INTO_CGROUP` (Linux 5.7).
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Which step failed, in a [`Report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    /// unshare(CLONE_NEWCGROUP).
    CgroupNs = 1,
    /// setns into the container (exec).
    Setns,
    /// setsid / controlling terminal.
    Session,
    /// dup2 of stdio.
    Stdio,
    /// Making the mount tree private.
    RootPropagation,
    /// Bind-mounting the rootfs onto itself.
    RootBind,
    /// A spec mount (index).
    Mount,
    /// Creating a mount point (index).
    MountPoint,
    /// Remounting a bind mount with its flags (index).
    MountRemount,
    /// Setting a mount's propagation (index).
    MountPropagation,
    /// mknod (index).
    Device,
    /// /dev symlink (index).
    DevSymlink,
    /// pivot_root and detaching the old root.
    PivotRoot,
    /// A masked path (index).
    MaskedPath,
    /// A read-only path (index).
    ReadonlyPath,
    /// Remounting / read-only.
    ReadonlyRoot,
    /// sethostname.
    Hostname,
    /// setdomainname.
    Domainname,
    /// A sysctl (index).
    Sysctl,
    /// oom_score_adj.
    OomScoreAdj,
    /// An rlimit (index).
    Rlimit,
    /// Dropping from the bounding set.
    CapBounding,
    /// setgroups.
    Setgroups,
    /// setresgid.
    Setgid,
    /// setresuid.
    Setuid,
    /// capset.
    Capset,
    /// Raising ambient capabilities.
    Ambient,
    /// PR_SET_NO_NEW_PRIVS.
    NoNewPrivs,
    /// chdir to the process's cwd.
    Cwd,
    /// The executable is not found in PATH.
    ExecLookup,
    /// execve (index into the candidates).
    Exec,
    /// Loading the seccomp filter.
    Seccomp,
    /// Waiting for the user namespace's id maps, then becoming its root.
    UserNs,
}

impl Step {
    /// From the wire value.
    pub fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        const ALL: [Step; 33] = [
            CgroupNs,
            Setns,
            Session,
            Stdio,
            RootPropagation,
            RootBind,
            Mount,
            MountPoint,
            MountRemount,
            MountPropagation,
            Device,
            DevSymlink,
            PivotRoot,
            MaskedPath,
            ReadonlyPath,
            ReadonlyRoot,
            Hostname,
            Domainname,
            Sysctl,
            OomScoreAdj,
            Rlimit,
            CapBounding,
            Setgroups,
            Setgid,
            Setuid,
            Capset,
            Ambient,
            NoNewPrivs,
            Cwd,
            ExecLookup,
            Exec,
            Seccomp,
            UserNs,
        ];
        ALL.into_iter().find(|s| *s as u32 == v)
    }
}

/// Report kind: the init is set up and waits for start.
pub const REPORT_READY: u32 = 1;
/// Report kind: a step failed.
pub const REPORT_ERROR: u32 = 2;
/// Report kind: everything applied, `execve` comes next. EOF without it
/// means the child died before (e.g. a signal).
pub const REPORT_EXEC: u32 = 3;
/// Report kind: the init runs (its first words: the agent learns its pid
/// then); in a new user namespace it now waits for the agent's id maps.
pub const REPORT_STARTED: u32 = 4;

/// What the child writes on the status pipe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// [`REPORT_READY`] or [`REPORT_ERROR`].
    pub kind: u32,
    /// [`Step`] as u32.
    pub step: u32,
    /// Index of the mount, path, ... within its list.
    pub index: u32,
    /// errno.
    pub errno: i32,
}

impl Report {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// Decodes a report read from the pipe.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Report {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Report {
            kind: u32::from_ne_bytes(word(0)),
            step: u32::from_ne_bytes(word(4)),
            index: u32::from_ne_bytes(word(8)),
            errno: i32::from_ne_bytes(word(12)),
        }
    }

    fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        b[4..8].copy_from_slice(&self.step.to_ne_bytes());
        b[8..12].copy_from_slice(&self.index.to_ne_bytes());
        b[12..16].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }
}

/// Descriptors the child uses (all open in the parent at clone time).
#[derive(Clone, Copy)]
pub struct ChildFds {
    /// Becomes fds 0, 1, 2.
    pub stdio: [RawFd; 3],
    /// fd 0 is a pty slave: make it the controlling terminal.
    pub tty: bool,
    /// Write end of the status pipe (close-on-exec).
    pub status: RawFd,
    /// Read end of the start pipe (init only).
    pub start: Option<RawFd>,
    /// (pidfd of the container's init, namespaces to join) for an exec.
    pub join: Option<(RawFd, libc::c_int)>,
    /// The process runs in a user namespace: it always sets its ids (its
    /// ids from before are unmapped there) and binds devices instead of
    /// making them.
    pub userns: bool,
    /// Init in a new user namespace: read end of the pipe on which the
    /// agent says (one byte) that it has written the id maps, rlimits and
    /// oom_score_adj, none of which the child may set itself there.
    pub userns_sync: Option<RawFd>,
    /// Terminal mode: the child's end of a socket pair. The child opens a
    /// pty in the container's own devpts (`/dev/ptmx` after pivot_root or
    /// setns), so `tty` and `ttyname` work inside, and sends the master
    /// back over it; if it cannot, it keeps the agent's pty (`stdio`).
    pub pty_sock: Option<RawFd>,
    /// The bounding set the child starts with (its thread's, see
    /// `spawner`): it drops only what of it the spec leaves out.
    pub bounding: u64,
}

/// argv and envp as NULL-terminated pointer arrays into a
/// [`ProcessPlan`]'s strings. Built in the parent (it allocates).
pub struct ExecPtrs {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecPtrs {
    /// Pointers into `p`, which must outlive the clone.
    pub fn new(p: &ProcessPlan) -> ExecPtrs {
        let ptrs = |v: &[std::ffi::CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ExecPtrs {
            argv: ptrs(&p.args),
            envp: ptrs(&p.env),
        }
    }
}

/// The child's stack in [`spawn_vfork`]: the `run_*` functions keep their
/// buffers small; what is never touched costs nothing.
const VFORK_STACK: usize = 256 * 1024;

/// Creates a child that shares the agent's memory (`CLONE_VM`) and runs
/// `child` on a stack of its own, while the calling thread sleeps until
/// the child has executed a program or exited (`CLONE_VFORK`), as
/// `posix_spawn` does. Returns the child's pid and pidfd then.
///
/// Unlike a fork nothing of the agent is copied: a fork copies its page
/// tables, every page the child then writes faults, and its `execve`
/// tears the copy down again. On PVM hosts, where the guest kernel is
/// emulated, fork+exit+wait costs ~280 ms in a container, vfork+exit+wait
/// ~60 ms.
///
/// # Safety
///
/// `child` must not return (it executes a program or `_exit`s; a return
/// exits with 127). It runs in the agent's memory while the agent's other
/// threads go on: it must follow this module's rules (no allocation, no
/// locks, no unwinding) and write nothing but its own stack, the calling
/// thread's `errno` (that thread sleeps) and the descriptors it owns.
/// Everything it reads must stay alive until this returns, which the
/// sleeping caller ensures.
#[cfg(target_arch = "x86_64")]
pub unsafe fn spawn_vfork(
    flags: u64,
    cgroup: Option<RawFd>,
    ids: &SpawnIds,
    child: &mut dyn FnMut(),
) -> std::io::Result<(libc::pid_t, RawFd)> {
    // SAFETY: an anonymous private mapping; checked below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            VFORK_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // The lowest page stays unmapped-like: an overflow faults instead of
    // writing below the mapping.
    // SAFETY: the first page of our own mapping.
    unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) };
    let mut args = CloneArgs {
        flags: flags
            | libc::CLONE_PIDFD as u64
            | libc::CLONE_PARENT_SETTID as u64
            | libc::CLONE_VM as u64
            | libc::CLONE_VFORK as u64,
        pidfd: ids.pidfd.as_ptr() as u64,
        parent_tid: ids.pid.as_ptr() as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack as u64,
        stack_size: VFORK_STACK as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(fd).unwrap_or(0);
    }
    let mut child = child;
    let arg: *mut &mut dyn FnMut() = &mut child;
    let ret: i64;
    // SAFETY: clone3 with a valid clone_args of the size passed; `ids`,
    // `child` and the stack outlive the call (CLONE_VFORK: it returns only
    // once the child has left this memory). In the child (rax == 0) the
    // kernel has set rsp to the top of the new stack (16-byte aligned, so
    // the call leaves the callee the ABI's alignment); r12/r13 survive the
    // syscall; `vfork_entry` never returns (ud2 if it did).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &mut args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") vfork_entry as *const (),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // SAFETY: our mapping; the child no longer runs on it.
    unsafe { libc::munmap(stack, VFORK_STACK) };
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(
            i32::try_from(-ret).unwrap_or(libc::EINVAL),
        ));
    }
    Ok((
        libc::pid_t::try_from(ret).unwrap_or(-1),
        ids.pidfd.load(std::sync::atomic::Ordering::Acquire),
    ))
}

/// Where [`spawn_vfork`]'s `clone3` stores the child's pid and pidfd, which
/// the kernel does before the child runs: another thread can read them as
/// soon as the child has said anything (e.g. on its status pipe), while the
/// calling thread still sleeps.
#[derive(Debug)]
pub struct SpawnIds {
    /// The child's pid (0 until the clone).
    pub pid: std::sync::atomic::AtomicI32,
    /// Its pidfd (-1 until the clone).
    pub pidfd: std::sync::atomic::AtomicI32,
}

impl Default for SpawnIds {
    fn default() -> Self {
        SpawnIds {
            pid: std::sync::atomic::AtomicI32::new(0),
            pidfd: std::sync::atomic::AtomicI32::new(-1),
        }
    }
}

/// The child's first Rust frame in [`spawn_vfork`].
extern "C" fn vfork_entry(arg: *mut &mut dyn FnMut()) -> ! {
    // SAFETY: `arg` points at the closure reference in the sleeping
    // parent's frame (see spawn_vfork).
    let child = unsafe { &mut *arg };
    child();
    // SAFETY: _exit ends the child; `child` was to execute or exit.
    unsafe { libc::_exit(127) }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn report(fd: RawFd, r: Report) {
    let b = r.to_bytes();
    // SAFETY: writes 16 bytes from a stack buffer to a descriptor we hold.
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}

/// Reports a failed step and exits.
fn fail(fd: RawFd, step: Step, index: usize, err: i32) -> ! {
    report(
        fd,
        Report {
            kind: REPORT_ERROR,
            step: step as u32,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            errno: err,
        },
    );
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(127) }
}

fn cptr(s: &CStr) -> *const libc::c_char {
    s.as_ptr()
}

fn opt_ptr(s: Option<&std::ffi::CString>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), |s| s.as_ptr())
}

/// mount(2); Err(errno).
fn mount(
    source: *const libc::c_char,
    target: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> Result<(), i32> {
    // SAFETY: every pointer is NULL or a NUL-terminated string owned by
    // the plan, which outlives the call.
    let r = unsafe { libc::mount(source, target, fstype, flags, data.cast()) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Creates `path` and its missing parents (0755), without allocating; with
/// `file`, the last component is created as an empty file.
fn mkdir_p(path: &CStr, file: bool) -> Result<(), i32> {
    let bytes = path.to_bytes();
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut i = 1;
    while i <= bytes.len() {
        if i == bytes.len() || bytes[i] == b'/' {
            let saved = buf[i];
            buf[i] = 0;
            let last = i == bytes.len();
            let p = buf.as_ptr().cast::<libc::c_char>();
            // SAFETY: `buf` holds a NUL-terminated prefix of the path.
            let r = unsafe {
                if last && file {
                    let fd = libc::open(
                        p,
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                        0
                    } else {
                        -1
                    }
                } else {
                    libc::mkdir(p, 0o755)
                }
            };
            if r != 0 && errno() != libc::EEXIST {
                return Err(errno());
            }
            buf[i] = saved;
        }
        i += 1;
    }
    Ok(())
}

fn do_mount(m: &MountOp, userns: bool) -> Result<(), (Step, i32)> {
    let attempt = || {
        mount(
            cptr(&m.source),
            cptr(&m.target),
            opt_ptr(m.fstype.as_ref()),
            m.flags,
            opt_ptr(m.data.as_ref()),
        )
    };
    let mut remount_flags = m.remount_flags;
    let first = match attempt() {
        Err(libc::ENOENT) => {
            // The mount point is missing (a missing bind source is ENOENT
            // too and fails again below). A file bind needs a file.
            let file = m.fstype.is_none() && !is_dir(&m.source);
            mkdir_p(&m.target, file).map_err(|e| (Step::MountPoint, e))?;
            attempt()
        }
        r => r,
    };
    match first {
        Ok(()) => {}
        Err(libc::EPERM) if userns => {
            // A filesystem this user namespace may not mount: bind the
            // guest's instead, with the flags the spec asked for.
            let fallback = USERNS_BIND_FALLBACKS
                .iter()
                .find(|(fs, _)| m.fstype.as_deref() == Some(*fs));
            let Some((_, guest)) = fallback else {
                return Err((Step::Mount, libc::EPERM));
            };
            mount(
                guest.as_ptr(),
                cptr(&m.target),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
            .map_err(|e| (Step::Mount, e))?;
            let wanted =
                m.flags & (libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
            remount_flags = (wanted != 0).then_some(wanted | libc::MS_BIND | libc::MS_REMOUNT);
        }
        Err(e) => return Err((Step::Mount, e)),
    }
    if let Some(flags) = remount_flags {
        let remount = |flags| {
            mount(
                std::ptr::null(),
                cptr(&m.target),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        match remount(flags) {
            // Flags the user namespace may not drop (see `kept_flags`).
            Err(libc::EPERM) if userns => remount(flags | kept_flags(&m.target)),
            r => r,
        }
        .map_err(|e| (Step::MountRemount, e))?;
    }
    if m.propagation != 0 {
        mount(
            std::ptr::null(),
            cptr(&m.target),
            std::ptr::null(),
            m.propagation,
            std::ptr::null(),
        )
        .map_err(|e| (Step::MountPropagation, e))?;
    }
    Ok(())
}

/// Makes the mount that holds `path` private (not recursively): `path`
/// itself if it is a mount point, else its nearest ancestor that is (the
/// kernel answers EINVAL for a directory that is not one). No allocation.
fn make_holder_private(path: &CStr) -> Result<(), i32> {
    let bytes = path.to_bytes();
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut len = bytes.len();
    loop {
        buf[len] = 0;
        let p = buf.as_ptr().cast::<libc::c_char>();
        let r = mount(
            std::ptr::null(),
            p,
            std::ptr::null(),
            libc::MS_PRIVATE,
            std::ptr::null(),
        );
        match r {
            Err(libc::EINVAL) if len > 1 => {
                // Up one component; "/" last.
                len = buf[..len].iter().rposition(|&b| b == b'/').unwrap_or(0);
                if len == 0 {
                    len = 1;
                }
            }
            r => return r,
        }
    }
}

fn is_dir(path: &CStr) -> bool {
    // SAFETY: an all-zero stat is a valid value for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is writable.
    let r = unsafe { libc::stat(path.as_ptr(), &mut st) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn write_file(path: &CStr, value: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: writes from a live slice to the descriptor just opened.
    let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    let err = errno();
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(fd) };
    if n < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

fn check(fd: RawFd, step: Step, index: usize, r: libc::c_int) {
    if r != 0 {
        fail(fd, step, index, errno());
    }
}

/// Session, controlling terminal, stdio.
fn setup_stdio(fds: &ChildFds, new_session: bool) {
    // SAFETY: (whole block) plain system calls on descriptors the parent
    // keeps open until the child has executed or exited.
    unsafe {
        if (new_session || fds.tty) && libc::setsid() < 0 {
            fail(fds.status, Step::Session, 0, errno());
        }
        // With a pty socket the controlling terminal is chosen later
        // (`container_pty`).
        if fds.tty && fds.pty_sock.is_none() {
            check(
                fds.status,
                Step::Session,
                1,
                libc::ioctl(fds.stdio[0], libc::TIOCSCTTY, 0),
            );
        }
        for (target, &fd) in fds.stdio.iter().enumerate() {
            let target = libc::c_int::try_from(target).unwrap_or(0);
            if libc::dup2(fd, target) < 0 {
                fail(fds.status, Step::Stdio, 0, errno());
            }
        }
    }
}

/// oom_score_adj and rlimits of `p`, applied to the calling process.
fn apply_limits(st: RawFd, p: &ProcessPlan) {
    if let Some(v) = &p.oom_score_adj {
        if let Err(e) = write_file(c"/proc/self/oom_score_adj", v.as_bytes()) {
            fail(st, Step::OomScoreAdj, 0, e);
        }
    }
    for (i, (resource, limit)) in p.rlimits.iter().enumerate() {
        // SAFETY: prlimit64 on ourselves with a valid rlimit struct.
        let r = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                *resource,
                limit as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        };
        if r != 0 {
            fail(st, Step::Rlimit, i, errno());
        }
    }
}

/// Init in a new user namespace: waits until the agent has written the id
/// maps, then becomes uid and gid 0 of the namespace, so that the set-up
/// (mount points, device files) creates files as the container's root
/// rather than as an unmapped id.
fn become_userns_root(st: RawFd, sync: RawFd) {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a stack buffer from a descriptor we hold.
    let n = unsafe { libc::read(sync, b.as_mut_ptr().cast(), 1) };
    if n != 1 {
        // The agent gave up (it reports why): nothing to say.
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(127) };
    }
    // Raw calls, not libc's (see run_process).
    // SAFETY: credential system calls with plain integers.
    unsafe {
        let r = libc::syscall(libc::SYS_setresgid, 0, 0, 0);
        check(st, Step::UserNs, 0, r as libc::c_int);
        let r = libc::syscall(libc::SYS_setresuid, 0, 0, 0);
        check(st, Step::UserNs, 1, r as libc::c_int);
    }
}

/// The flags a bind remount must keep from the mount at `path`: in a user
/// namespace the kernel locks nosuid, nodev, noexec, read-only and the
/// atime flags of mounts inherited from the guest, and refuses (EPERM) a
/// remount that would drop them; without one, dropping them would quietly
/// loosen the mount. 0 when `path` cannot be examined.
fn kept_flags(path: &CStr) -> libc::c_ulong {
    // SAFETY: an all-zero statvfs is a valid value for the kernel to fill.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `sv` is writable.
    if unsafe { libc::statvfs(path.as_ptr(), &mut sv) } != 0 {
        return 0;
    }
    // statvfs(3)'s ST_* bits (the libc crate has no ST_RELATIME for musl).
    let table: [(libc::c_ulong, libc::c_ulong); 7] = [
        (1, libc::MS_RDONLY),
        (2, libc::MS_NOSUID),
        (4, libc::MS_NODEV),
        (8, libc::MS_NOEXEC),
        (1024, libc::MS_NOATIME),
        (2048, libc::MS_NODIRATIME),
        (4096, libc::MS_RELATIME),
    ];
    table
        .iter()
        .filter(|(st, _)| sv.f_flag & st != 0)
        .fold(0, |acc, (_, ms)| acc | ms)
}

/// Filesystems a user namespace may not mount unless it owns the matching
/// namespace (sysfs: network; cgroup2: cgroup; mqueue: ipc), with the
/// guest's mount that runc-style set-up binds instead.
const USERNS_BIND_FALLBACKS: [(&CStr, &CStr); 3] = [
    (c"sysfs", c"/sys"),
    (c"cgroup2", c"/sys/fs/cgroup"),
    (c"mqueue", c"/dev/mqueue"),
];

/// The container's init: everything of `plan`, then wait for start, then
/// exec. Never returns.
pub fn run_init(plan: &InitPlan, fds: &ChildFds, ptrs: &ExecPtrs) -> ! {
    let st = fds.status;
    super::trace::mark("child");
    report(
        st,
        Report {
            kind: REPORT_STARTED,
            ..Report::default()
        },
    );
    if let Some(sync) = fds.userns_sync {
        become_userns_root(st, sync);
    }
    // SAFETY: (whole block) raw system calls on the plan's NUL-terminated
    // strings and on plain integers; see the module documentation.
    unsafe {
        // Device nodes get exactly the modes of the plan.
        libc::umask(0);
        if plan.cgroup_ns {
            check(st, Step::CgroupNs, 0, libc::unshare(libc::CLONE_NEWCGROUP));
        }
    }
    setup_stdio(fds, true);
    super::trace::mark("stdio");
    let root = plan.rootfs.as_c_str();
    if let Err(e) = mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        plan.rootfs_propagation,
        std::ptr::null(),
    ) {
        fail(st, Step::RootPropagation, 0, e);
    }
    let shared = plan.rootfs_propagation & libc::MS_SHARED != 0;
    if shared {
        // A shared rootfsPropagation (docker asks for one when a volume is
        // shared): as runc, the mount holding the root file system becomes
        // private again, or pivot_root refuses (EINVAL: a shared parent)
        // and the bind below would propagate.
        if let Err(e) = make_holder_private(root) {
            fail(st, Step::RootPropagation, 1, e);
        }
    }
    if let Err(e) = mount(
        root.as_ptr(),
        root.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ) {
        fail(st, Step::RootBind, 0, e);
    }
    super::trace::mark("rootfs");
    for (i, m) in plan.mounts.iter().enumerate() {
        if let Err((step, e)) = do_mount(m, fds.userns) {
            fail(st, step, i, e);
        }
        super::trace::mark("mount");
    }
    for (i, d) in plan.devices.iter().enumerate() {
        if fds.userns {
            // No mknod of devices in a user namespace: bind the guest's
            // node (runc does the same).
            if let Err(e) = mkdir_p(&d.path, true).and_then(|()| {
                mount(
                    d.guest_path.as_ptr(),
                    d.path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            }) {
                fail(st, Step::Device, i, e);
            }
            continue;
        }
        // SAFETY: NUL-terminated path from the plan.
        let r = unsafe { libc::mknod(d.path.as_ptr(), d.mode, d.dev) };
        if r != 0 && errno() != libc::EEXIST {
            fail(st, Step::Device, i, errno());
        }
        if d.uid != 0 || d.gid != 0 {
            // SAFETY: as above.
            check(st, Step::Device, i, unsafe {
                libc::chown(d.path.as_ptr(), d.uid, d.gid)
            });
        }
    }
    for (i, (target, link)) in plan.dev_symlinks.iter().enumerate() {
        // SAFETY: NUL-terminated strings from the plan.
        let r = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
        if r != 0 && errno() != libc::EEXIST {
            fail(st, Step::DevSymlink, i, errno());
        }
    }
    super::trace::mark("devices");
    // pivot_root(".", ".") then detach the old root stacked below: no
    // directory for the old root is needed (runc's way).
    // SAFETY: system calls on NUL-terminated literals and plan strings.
    unsafe {
        // With shared mounts, the old root is reached through a descriptor
        // (mount(2) of "." would act on the new root below it).
        let old_root = if shared {
            libc::open(
                c"/".as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        } else {
            -1
        };
        if shared && old_root < 0 {
            fail(st, Step::PivotRoot, 5, errno());
        }
        check(st, Step::PivotRoot, 0, libc::chdir(root.as_ptr()));
        let r = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr());
        if r != 0 {
            fail(st, Step::PivotRoot, 1, errno());
        }
        if shared {
            check(st, Step::PivotRoot, 6, libc::fchdir(old_root));
            libc::close(old_root);
            // The old root's unmount must not propagate to its peers.
            if let Err(e) = mount(
                std::ptr::null(),
                c".".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) {
                fail(st, Step::PivotRoot, 4, e);
            }
        }
        check(
            st,
            Step::PivotRoot,
            2,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        );
        check(st, Step::PivotRoot, 3, libc::chdir(c"/".as_ptr()));
    }
    super::trace::mark("pivot");
    for step in AFTER_PIVOT {
        super::trace::mark("finish");
        match step {
            Finish::Hostname => set_name(st, Step::Hostname, plan.hostname.as_deref(), false),
            Finish::Domainname => {
                set_name(st, Step::Domainname, plan.domainname.as_deref(), true);
            }
            Finish::Sysctls => write_sysctls(st, plan),
            Finish::ReadonlyPaths => readonly_paths(st, plan),
            Finish::MaskedPaths => mask_paths(st, plan),
            Finish::ReadonlyRoot => readonly_root(st, plan),
        }
    }
    // In a new user namespace the agent has set the limits.
    run_process(&plan.process, fds, ptrs, fds.userns_sync.is_none())
}

/// `sethostname` or (`domain`) `setdomainname` of `name`, if any.
fn set_name(st: RawFd, step: Step, name: Option<&CStr>, domain: bool) {
    let Some(n) = name else { return };
    // SAFETY: pointer and length of a plan string.
    let r = unsafe {
        if domain {
            libc::setdomainname(n.as_ptr(), n.to_bytes().len())
        } else {
            libc::sethostname(n.as_ptr(), n.to_bytes().len())
        }
    };
    check(st, step, 0, r);
}

/// The plan's sysctls, through the container's `/proc/sys`.
fn write_sysctls(st: RawFd, plan: &InitPlan) {
    for (i, (path, value)) in plan.sysctls.iter().enumerate() {
        if let Err(e) = write_file(path, value.as_bytes()) {
            fail(st, Step::Sysctl, i, e);
        }
    }
}

/// Read-only binds of the plan's read-only paths (missing ones skipped).
fn readonly_paths(st: RawFd, plan: &InitPlan) {
    for (i, p) in plan.readonly_paths.iter().enumerate() {
        match mount(
            p.as_ptr(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) {
            Ok(()) => {
                let flags = libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_REC
                    | kept_flags(p);
                if let Err(e) = mount(
                    p.as_ptr(),
                    p.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) {
                    fail(st, Step::ReadonlyPath, i, e);
                }
            }
            Err(libc::ENOENT) => {}
            Err(e) => fail(st, Step::ReadonlyPath, i, e),
        }
    }
}

/// Hides the plan's masked paths: /dev/null over a file, an empty
/// read-only tmpfs over a directory (missing ones skipped).
fn mask_paths(st: RawFd, plan: &InitPlan) {
    for (i, p) in plan.masked_paths.iter().enumerate() {
        match mount(
            c"/dev/null".as_ptr(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) {
            Ok(()) | Err(libc::ENOENT) => {}
            Err(libc::ENOTDIR) => {
                if let Err(e) = mount(
                    c"tmpfs".as_ptr(),
                    p.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                ) {
                    fail(st, Step::MaskedPath, i, e);
                }
            }
            Err(e) => fail(st, Step::MaskedPath, i, e),
        }
    }
}

/// Remounts `/` read-only if the plan says so.
fn readonly_root(st: RawFd, plan: &InitPlan) {
    if plan.readonly_root {
        if let Err(e) = mount(
            c"/".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(c"/"),
            std::ptr::null(),
        ) {
            fail(st, Step::ReadonlyRoot, 0, e);
        }
    }
}

/// An exec: join the container's namespaces, then the process part.
/// Never returns.
pub fn run_exec(plan: &ProcessPlan, fds: &ChildFds, ptrs: &ExecPtrs) -> ! {
    // Before setns into a user namespace: in there, raising a hard rlimit
    // or lowering oom_score_adj would be refused.
    if fds.userns {
        apply_limits(fds.status, plan);
    }
    if let Some((pidfd, flags)) = fds.join {
        // SAFETY: setns on the pidfd the parent holds open.
        check(fds.status, Step::Setns, 0, unsafe {
            libc::setns(pidfd, flags)
        });
    }
    setup_stdio(fds, false);
    run_process(plan, fds, ptrs, !fds.userns)
}

/// Drops from the bounding set what the spec leaves out of `held` (the
/// set this process starts with).
fn drop_bounding(st: RawFd, caps: &CapSets, held: u64) {
    for cap in 0..=CAP_LAST {
        if held & !caps.bounding & (1u64 << cap) != 0 {
            // SAFETY: prctl with integer arguments.
            let r =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
            // EINVAL: a capability this kernel does not have.
            if r != 0 && errno() != libc::EINVAL {
                fail(st, Step::CapBounding, cap as usize, errno());
            }
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capset(st: RawFd, caps: &CapSets) {
    let lo = |m: u64| (m & 0xffff_ffff) as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        CapData {
            effective: lo(caps.effective),
            permitted: lo(caps.permitted),
            inheritable: lo(caps.inheritable),
        },
        CapData {
            effective: hi(caps.effective),
            permitted: hi(caps.permitted),
            inheritable: hi(caps.inheritable),
        },
    ];
    // SAFETY: a v3 header and two data structs, as capset(2) expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        fail(st, Step::Capset, 0, errno());
    }
    // Like runc, only what permitted and inheritable both hold is raised
    // (the kernel refuses the rest with EPERM; runc warns and goes on):
    // runc's default spec lists ambient capabilities without inheritable.
    let ambient = caps.ambient & caps.permitted & caps.inheritable;
    for cap in 0..=CAP_LAST {
        if ambient & (1u64 << cap) != 0 {
            // SAFETY: prctl with integer arguments.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    libc::c_ulong::from(cap),
                    0,
                    0,
                )
            };
            if r != 0 {
                fail(st, Step::Ambient, cap as usize, errno());
            }
        }
    }
}

/// Installs the process's seccomp filter, if any.
fn load_seccomp(st: RawFd, p: &ProcessPlan) {
    if let Some(f) = &p.seccomp {
        if let Err(e) = f.load() {
            fail(st, Step::Seccomp, 0, e);
        }
    }
}

/// Sends descriptor `fd` over the Unix socket `sock` (SCM_RIGHTS, one
/// byte of data); no allocation.
fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), libc::c_int> {
    // Room for one cmsghdr with one int (CMSG_SPACE(4) = 24 on 64-bit),
    // aligned like a cmsghdr.
    let mut space = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: the control buffer is 32 bytes, enough for CMSG_SPACE(4);
    // CMSG_FIRSTHDR/CMSG_DATA point into it, and sendmsg reads the
    // header, iovec and buffer, all alive for the call.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(libc::EINVAL);
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

/// Terminal mode with a pty socket: open a pty in the container's devpts
/// (now our `/dev`), make its slave fds 0..2 (keeping the window size the
/// agent's pty was given), send the master to the agent; without a usable
/// `/dev/ptmx` keep the agent's pty. Then make fd 0 the controlling
/// terminal.
fn container_pty(fds: &ChildFds) {
    let Some(sock) = fds.pty_sock else {
        return;
    };
    let st = fds.status;
    // SAFETY: (whole block) plain system calls on descriptors we own or
    // the parent keeps open, and on a local winsize.
    unsafe {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        let master = libc::open(c"/dev/ptmx".as_ptr(), flags);
        if master >= 0 {
            let unlock: libc::c_int = 0;
            let slave = if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) == 0 {
                libc::ioctl(master, libc::TIOCGPTPEER, flags)
            } else {
                -1
            };
            if slave >= 0 {
                let mut ws: libc::winsize = std::mem::zeroed();
                if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 {
                    libc::ioctl(master, libc::TIOCSWINSZ, &ws);
                }
                for target in 0..3 {
                    if libc::dup2(slave, target) < 0 {
                        fail(st, Step::Stdio, 1, errno());
                    }
                }
                libc::close(slave);
                if let Err(e) = send_fd(sock, master) {
                    fail(st, Step::Session, 2, e);
                }
            }
            libc::close(master);
        }
        libc::close(sock);
        check(st, Step::Session, 1, libc::ioctl(0, libc::TIOCSCTTY, 0));
    }
}

/// The part common to init and exec: limits (unless set already), user,
/// capabilities, cwd, then
/// (init) report ready and wait for start, then execve.
fn run_process(p: &ProcessPlan, fds: &ChildFds, ptrs: &ExecPtrs, limits: bool) -> ! {
    let st = fds.status;
    super::trace::mark("process");
    container_pty(fds);
    if limits {
        apply_limits(st, p);
    }
    // Like runc: without no_new_privs the filter is loaded while the
    // process still has CAP_SYS_ADMIN (before the capabilities and the
    // user change); with it, as late as possible (right before execve).
    if !p.no_new_privileges {
        load_seccomp(st, p);
    }
    if let Some(caps) = &p.caps {
        drop_bounding(st, caps, fds.bounding);
    }
    super::trace::mark("bounding");
    // Raw system calls, not libc's wrappers: musl applies setgroups and
    // setres[ug]id to every thread of the process (__synccall), and after
    // a raw clone3 its thread list still names the agent's threads, which
    // do not exist here. The signal to the first of them fails, musl turns
    // the call into a no-op that returns 1, and the step failed with a
    // stale errno ("cannot Setgroups: No such file or directory") whenever
    // the agent had other threads alive at clone time. The kernel call
    // changes this (only) thread, which is all the child has.
    // SAFETY: (whole block) credential system calls with plain integers and
    // a live slice.
    unsafe {
        if p.uid != 0 && p.caps.is_some() {
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        }
        let r = libc::syscall(
            libc::SYS_setgroups,
            p.additional_gids.len(),
            p.additional_gids.as_ptr(),
        );
        check(st, Step::Setgroups, 0, r as libc::c_int);
        // In a user namespace the ids from before may be unmapped (an
        // exec's are the agent's): set them even when they are 0.
        if p.gid != 0 || fds.userns {
            let r = libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid);
            check(st, Step::Setgid, 0, r as libc::c_int);
        }
        if p.uid != 0 || fds.userns {
            let r = libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid);
            check(st, Step::Setuid, 0, r as libc::c_int);
        }
    }
    if let Some(caps) = &p.caps {
        capset(st, caps);
    }
    // SAFETY: (whole block) prctl/umask/chdir/access with plan strings.
    unsafe {
        if p.no_new_privileges {
            check(
                st,
                Step::NoNewPrivs,
                0,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            );
        }
        libc::umask(p.umask);
        check(st, Step::Cwd, 0, libc::chdir(p.cwd.as_ptr()));
    }
    super::trace::mark("credentials");
    let mut chosen = None;
    let mut last_err = libc::ENOENT;
    for (i, c) in p.exec_candidates.iter().enumerate() {
        // SAFETY: NUL-terminated candidate path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            chosen = Some((i, c));
            break;
        }
        let e = errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last_err = e;
        }
    }
    let Some((index, path)) = chosen else {
        fail(st, Step::ExecLookup, 0, last_err);
    };
    if let Some(start) = fds.start {
        report(
            st,
            Report {
                kind: REPORT_READY,
                ..Report::default()
            },
        );
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into a stack buffer.
        let n = unsafe { libc::read(start, b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            // The agent closed the pipe without starting us: deleted.
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(0) };
        }
    }
    super::trace::mark("exec");
    report(
        st,
        Report {
            kind: REPORT_EXEC,
            ..Report::default()
        },
    );
    if p.no_new_privileges {
        load_seccomp(st, p);
    }
    // SAFETY: argv/envp are NULL-terminated arrays of pointers into the
    // plan's strings, alive for the whole life of this child.
    unsafe { libc::execve(path.as_ptr(), ptrs.argv.as_ptr(), ptrs.envp.as_ptr()) };
    fail(st, Step::Exec, index, errno())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let r = Report {
            kind: REPORT_ERROR,
            step: Step::Mount as u32,
            index: 3,
            errno: libc::EPERM,
        };
        assert_eq!(Report::from_bytes(&r.to_bytes()), r);
        assert_eq!(Step::from_u32(Step::Exec as u32), Some(Step::Exec));
        assert_eq!(Step::from_u32(Step::CgroupNs as u32), Some(Step::CgroupNs));
        assert_eq!(Step::from_u32(0), None);
        assert_eq!(Step::from_u32(999), None);
    }

    #[test]
    fn mkdir_p_makes_parents_and_files() {
        let d = std::env::temp_dir().join(format!("vessel-child-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dir = std::ffi::CString::new(format!("{}/a/b", d.display())).unwrap();
        mkdir_p(&dir, false).unwrap();
        assert!(d.join("a/b").is_dir());
        let file = std::ffi::CString::new(format!("{}/c/f", d.display())).unwrap();
        mkdir_p(&file, true).unwrap();
        assert!(d.join("c/f").is_file());
        mkdir_p(&file, true).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! The VMM's system call allowlist.
//!
//! Everything the guest sends (virtio queues, vsock packets, FUSE requests,
//! MMIO and port writes) is parsed by this process, so a parser bug is a
//! hostile guest's way onto the host. Once the VM is set up (kernel or
//! snapshot loaded, devices created, sockets bound) and before any vCPU
//! runs, [`install`] loads one filter on every thread of the process
//! (`SECCOMP_FILTER_FLAG_TSYNC`; threads started later inherit it): a call
//! outside [`ALLOWED`] kills the whole VMM (`SECCOMP_RET_KILL_PROCESS`), and
//! the host side sees the VMM die, as with any other crash.
//!
//! What stays allowed is what running a VM needs: `KVM_RUN` and the other
//! ioctls, event loops, the vsock and API Unix sockets, taps, the virtio-fs
//! passthrough (file system calls relative to descriptors the share root
//! was opened from), its worker threads, DAX mappings, snapshots written
//! into an existing directory. What is gone includes `execve`, `ptrace`,
//! `mount` and the other namespace and privilege calls (`unshare` only
//! with `CLONE_FS`, which a virtio-fs worker uses on itself), `bpf`, module
//! and kexec loading, `process_vm_*`, keyrings, `io_uring` and new sockets
//! other than Unix ones.
//!
//! `--seccomp log` lets everything through but logs calls outside the list
//! (the kernel's audit record `type=1326`, in `dmesg`): that is how the
//! list is kept complete (`cargo xtask test` with `VESSEL_VMM_SECCOMP=log`,
//! then `dmesg | grep type=1326`). `--seccomp off` (or `--no-seccomp`)
//! installs nothing, for debugging only.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What [`install`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A call outside the list kills the VMM (the default).
    Kill,
    /// A call outside the list is allowed and logged (audit, `dmesg`).
    Log,
    /// No filter (debugging only).
    Off,
}

/// Why the filter could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules or the kernel the program.
    #[error("seccomp filter: {0}")]
    Filter(#[from] seccompiler::Error),
    /// seccompiler's backend refused the rules.
    #[error("seccomp rules: {0}")]
    Backend(#[from] seccompiler::BackendError),
}

/// System calls the VMM makes once it runs, whatever the device set. Kept
/// sorted by name; each group says who needs it.
pub const ALLOWED: &[libc::c_long] = &[
    // Memory: allocator, thread stacks, DAX windows, balloon, snapshots.
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_msync,
    libc::SYS_munmap,
    // Threads (virtio-fs workers start when the guest activates a share)
    // and their synchronisation.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_get_robust_list,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    // vCPU threads ask for long time slices on PVM hosts
    // (vstate::vcpu_thread::request_slice), keeping their nice value.
    libc::SYS_getpriority,
    libc::SYS_sched_setattr,
    // Signals: vCPU kicks, the rip sampler, shutdown.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_tgkill,
    libc::SYS_kill,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    // Event loops and wake-ups.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // KVM, taps (TUNSETOFFLOAD), terminal queries of logging.
    libc::SYS_ioctl,
    // Descriptors: reads and writes of eventfds, sockets, taps, files.
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    // vsock and API Unix sockets (connections to the host-side listeners
    // the vsock device makes for guest-initiated streams).
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    // virtio-fs passthrough: everything relative to descriptors under the
    // share root (see devices/virtio/fs/confine.rs), and snapshots.
    libc::SYS_copy_file_range,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getuid,
    libc::SYS_linkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_readlinkat,
    libc::SYS_renameat2,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    // The same through the older calls the standard library uses for
    // snapshots (directory, files, atomic rename), and the passthrough's
    // umask around node creation.
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_rmdir,
    libc::SYS_umask,
    libc::SYS_unlink,
    // Capabilities of the virtio-fs workers (dropped per thread).
    libc::SYS_capget,
    libc::SYS_capset,
    // Randomness (hash maps).
    libc::SYS_getrandom,
];

/// A rule that first argument equals `value`.
fn first_arg_is(value: u64) -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])?])
}

/// The filter for `mode` (`None` for [`Mode::Off`]).
pub fn program(mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // A virtio-fs worker detaches its cwd and root from the other threads.
    rules.insert(libc::SYS_unshare, first_arg_is(libc::CLONE_FS as u64)?);
    // Unix sockets only: the vsock device connects guest-initiated streams
    // to the host's `UDS_PORT` listeners.
    rules.insert(libc::SYS_socket, first_arg_is(libc::AF_UNIX as u64)?);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(Some(filter.try_into()?))
}

/// Loads the filter for `mode` on every thread of the process.
pub fn install(mode: Mode) -> Result<(), SeccompError> {
    if let Some(p) = program(mode)? {
        seccompiler::apply_filter_all_threads(&p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_no_duplicates_and_none_of_the_dangerous_calls() {
        let mut seen = std::collections::BTreeSet::new();
        for nr in ALLOWED {
            assert!(seen.insert(nr), "system call {nr} listed twice");
        }
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_open_by_handle_at,
            libc::SYS_socket,
            libc::SYS_io_uring_setup,
            libc::SYS_keyctl,
            libc::SYS_add_key,
        ] {
            assert!(
                !ALLOWED.contains(&nr),
                "system call {nr} must not be allowed"
            );
        }
    }

    #[test]
    fn programs_build_for_every_mode() {
        assert!(program(Mode::Off).unwrap().is_none());
        for mode in [Mode::Kill, Mode::Log] {
            let p = program(mode).unwrap().unwrap();
            assert!(
                p.len() > ALLOWED.len(),
                "{mode:?}: {} instructions",
                p.len()
            );
        }
    }

    /// A forked child loads the kill filter: an allowed call works, the
    /// first call outside the list ends the child with SIGSYS.
    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        let p = program(Mode::Kill).unwrap().unwrap();
        // SAFETY: the child only makes raw system calls (the program was
        // built before the fork) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            if seccompiler::apply_filter(&p).is_err() {
                // SAFETY: _exit ends the child.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: getpid is allowed and has no preconditions.
            if unsafe { libc::getpid() } <= 0 {
                // SAFETY: as above.
                unsafe { libc::_exit(4) };
            }
            // SAFETY: getppid is not on the list: the kernel kills us here.
            unsafe { libc::getppid() };
            // SAFETY: _exit ends the child (not reached).
            unsafe { libc::_exit(5) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x}"
        );
    }

    /// The log filter on a thread of its own: calls outside the list still
    /// work (and reach the audit log).
    #[test]
    fn the_log_filter_loads_and_lets_calls_through() {
        std::thread::spawn(|| {
            let p = program(Mode::Log).unwrap().unwrap();
            seccompiler::apply_filter(&p).unwrap();
            // Allowed, and a logged one: both still work.
            // SAFETY: getpid and getppid have no preconditions.
            assert!(unsafe { libc::getpid() } > 0);
            // SAFETY: as above.
            assert!(unsafe { libc::getppid() } >= 0);
        })
        .join()
        .unwrap();
    }
}

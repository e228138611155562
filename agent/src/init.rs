//! Early set-up of PID 1: mounts and logging.

use std::io::Write;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};

/// Guest CLOCK_BOOTTIME in milliseconds.
pub fn boottime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

/// Writes one line to the console (stderr is /dev/console for PID 1).
pub fn log(msg: &str) {
    let line = format!("vessel-agent: {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    mkdir: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn mounts() -> [MountSpec; 7] {
    [
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
            mkdir: false,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
            mkdir: false,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
            mkdir: false,
        },
        MountSpec {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
            mkdir: true,
        },
        MountSpec {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
            mkdir: false,
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=0755"),
            mkdir: false,
        },
        MountSpec {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=1777"),
            mkdir: false,
        },
    ]
}

/// Mounts the basic filesystems; returns whether `vessel.debug` is on the
/// kernel command line. Mount points that the initramfs provides are not
/// probed first (each probe is a syscall); only those inside freshly mounted
/// filesystems are created.
pub fn setup() -> bool {
    let mut failures = Vec::new();
    for m in mounts() {
        if m.mkdir {
            if let Err(e) = nix::unistd::mkdir(m.target, Mode::from_bits_truncate(0o755)) {
                if e != nix::errno::Errno::EEXIST {
                    failures.push(format!("mkdir {}: {e}", m.target));
                }
            }
        }
        if let Err(e) = mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            if e != nix::errno::Errno::EBUSY {
                failures.push(format!("mount {} on {}: {e}", m.fstype, m.target));
            }
        }
    }
    let debug = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "vessel.debug"))
        .unwrap_or(false);
    for f in failures {
        log(&f);
    }
    if debug {
        log("mounts done");
    }
    debug
}

//! cgroup v2 for containers: `/sys/fs/cgroup/vessel/<id>`, limits from
//! `linux.resources`, kill, list, OOM events, removal.
//!
//! Files are opened relative to the cgroup's directory descriptor, which
//! is also what `clone3(CLONE_INTO_CGROUP)` starts the process in: no
//! `cgroup.procs` write and no extra system call per process.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;

/// Parent of every container's cgroup.
pub const ROOT: &str = "/sys/fs/cgroup/vessel";

/// Controllers handed down to every container when the kernel has them:
/// those of its statistics and OOM events.
const CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// Controllers handed down on first use of one of their files (a limit at
/// create or update, e.g. `cpu.max`, `cpuset.cpus`, `io.weight`). Each
/// enabled controller adds its files to every new cgroup (a `mkdir` costs
/// more), and with `cpu` every container is a scheduling group of its own,
/// so each wake-up and sleep updates the load of every level of the
/// hierarchy: about a fifth of the guest kernel's time during a container
/// start on PVM hosts, where guest kernel code is emulated. Containers
/// without such limits need none of them (`cpu.stat` is always there).
const LAZY: [&str; 3] = ["cpu", "cpuset", "io"];

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &str, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        what,
        path: path.to_string(),
        source,
    }
}

/// Writes `+CONTROLLER ...` for those of `wanted` the kernel has into the
/// root's and [`ROOT`]'s `cgroup.subtree_control`.
fn enable(wanted: &[&str]) -> Result<(), String> {
    let available = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map_err(|e| format!("cannot read /sys/fs/cgroup/cgroup.controllers: {e}"))?;
    let line = wanted
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if !line.is_empty() {
        for dir in ["/sys/fs/cgroup", ROOT] {
            let path = format!("{dir}/cgroup.subtree_control");
            std::fs::write(&path, &line)
                .map_err(|e| format!("cannot write {line:?} to {path}: {e}"))?;
        }
    }
    Ok(())
}

/// Creates [`ROOT`] with the controllers of [`CONTROLLERS`], once. The
/// agent calls it at start-up (so a template has it done); a failure there
/// is reported again by the first container's creation.
pub fn prepare() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        match std::fs::create_dir(ROOT) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {ROOT}: {e}")),
        }
        enable(&CONTROLLERS)
    })
    .clone()
}

/// The controller of [`LAZY`] that `file` belongs to, if any (not for the
/// files every cgroup has: `cpu.stat`, `*.pressure`).
fn lazy_controller(file: &str) -> Option<usize> {
    let (controller, rest) = file.split_once('.')?;
    if rest == "pressure" || file == "cpu.stat" {
        return None;
    }
    LAZY.iter().position(|c| *c == controller)
}

/// Hands controller `LAZY[i]` down, once.
fn enable_lazy(i: usize) -> std::io::Result<()> {
    static DONE: [OnceLock<Result<(), String>>; LAZY.len()] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    DONE[i]
        .get_or_init(|| enable(&[LAZY[i]]))
        .clone()
        .map_err(std::io::Error::other)
}

/// One container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    /// Absolute path.
    pub path: String,
    dir: OwnedFd,
}

impl Cgroup {
    /// Creates the cgroup of container `id` and writes `limits` into it.
    /// An existing directory (left by a crashed earlier container of the
    /// same id) is an error.
    pub fn create(id: &str, limits: &[(String, String)]) -> Result<Cgroup, CgroupError> {
        prepare().map_err(|m| io_err("cannot set up", ROOT, std::io::Error::other(m)))?;
        let path = format!("{ROOT}/{id}");
        std::fs::create_dir(&path).map_err(|e| io_err("cannot create", &path, e))?;
        let dir = match open_dir(&path) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                return Err(io_err("cannot open", &path, e));
            }
        };
        let cg = Cgroup { path, dir };
        for (file, value) in limits {
            if let Err(e) = cg.write(file, value.as_bytes()) {
                // A missing swap controller (no CONFIG_SWAP) is not an error
                // for a limit of zero swap.
                if file == "memory.swap.max" && e.raw_os_error() == Some(libc::ENOENT) {
                    continue;
                }
                let _ = cg.remove();
                return Err(io_err(
                    "cannot write",
                    &format!("{}/{file} ({value})", cg.path),
                    e,
                ));
            }
        }
        Ok(cg)
    }

    /// The directory descriptor (for `CLONE_INTO_CGROUP`).
    pub fn fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// Opens one file of the cgroup (`O_CLOEXEC` is added).
    pub fn open_at(&self, file: &str, flags: libc::c_int) -> std::io::Result<std::fs::File> {
        if let Some(i) = lazy_controller(file) {
            enable_lazy(i)?;
        }
        let name =
            CString::new(file).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: openat relative to our directory fd with a NUL-terminated
        // name; the returned descriptor is owned by the File.
        let fd =
            unsafe { libc::openat(self.dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// Writes one cgroup file.
    pub fn write(&self, file: &str, value: &[u8]) -> std::io::Result<()> {
        self.open_at(file, libc::O_WRONLY)?.write_all(value)
    }

    /// Reads one cgroup file.
    pub fn read(&self, file: &str) -> std::io::Result<String> {
        let mut s = String::new();
        self.open_at(file, libc::O_RDONLY)?.read_to_string(&mut s)?;
        Ok(s)
    }

    /// Guest pids of every process in the cgroup.
    pub fn pids(&self) -> std::io::Result<Vec<i32>> {
        Ok(self
            .read("cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Sends `signal` to every process in the cgroup (SIGKILL through
    /// `cgroup.kill`: one write, no race with forks).
    pub fn signal_all(&self, signal: i32) -> std::io::Result<()> {
        if signal == libc::SIGKILL && self.write("cgroup.kill", b"1").is_ok() {
            return Ok(());
        }
        for pid in self.pids()? {
            // SAFETY: kill(2) with plain integers.
            if unsafe { libc::kill(pid, signal) } != 0 && Errno::last() != Errno::ESRCH {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Whether the kernel OOM-killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        self.read("memory.events")
            .map(|s| oom_kills(&s) > 0)
            .unwrap_or(false)
    }

    /// Removes the (empty) cgroup, waiting a little for exiting processes.
    pub fn remove(&self) -> std::io::Result<()> {
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)))
    }
}

fn open_dir(path: &str) -> std::io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    crate::init::open_raw_mode(&c, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)
}

/// The `oom_kill` count of a memory.events file.
pub fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .filter_map(|l| l.strip_prefix("oom_kill "))
        .filter_map(|v| v.trim().parse().ok())
        .next()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_files_enable_their_controller() {
        let lazy = |f| lazy_controller(f).map(|i| LAZY[i]);
        assert_eq!(lazy("cpu.weight"), Some("cpu"));
        assert_eq!(lazy("cpu.max"), Some("cpu"));
        assert_eq!(lazy("cpuset.cpus"), Some("cpuset"));
        assert_eq!(lazy("io.weight"), Some("io"));
        assert_eq!(lazy("cpu.stat"), None);
        assert_eq!(lazy("cpu.pressure"), None);
        assert_eq!(lazy("memory.max"), None);
        assert_eq!(lazy("pids.max"), None);
        assert_eq!(lazy("cgroup.procs"), None);
    }

    #[test]
    fn oom_kill_count_is_parsed() {
        let e = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(e), 1);
        assert_eq!(oom_kills("oom 0\noom_kill 0\n"), 0);
        assert_eq!(oom_kills(""), 0);
    }
}

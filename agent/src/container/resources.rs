//! `PauseContainer`, `ResumeContainer` and `UpdateContainer`: the cgroup
//! v2 freezer and live changes of a container's limits (`runc pause`,
//! `runc resume`, `runc update`).
//!
//! Freezing writes `cgroup.freeze` and waits until `cgroup.events` says
//! `frozen 1` (poll(2) on the file wakes when it changes). SIGKILL still
//! ends frozen processes on cgroup v2, so `kill` and `delete --force` work
//! on a paused container; delete thaws the (then empty) cgroup as well.
//!
//! An update is turned into a list of cgroup file writes first (refusing
//! bad values before anything is touched); each file's old value is read
//! before it is written, and when the kernel refuses a value the files
//! already written get their old values back: all or nothing.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vessel_proto::container::{ContainerRef, ContainerStatus};
use vessel_proto::resources::{ResourcesUpdate, UpdateContainerRequest};
use vessel_proto::{ErrorCode, ErrorReply};

use super::cgroup::Cgroup;
use super::{internal, reply, Containers};

/// How long freezing or thawing may take (the guest kernel can be slow).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest `cpuset.cpus`/`cpuset.mems` value accepted.
const MAX_CPUSET_LEN: usize = 256;

/// The `frozen` value of a `cgroup.events` file.
fn frozen_value(events: &str) -> Option<bool> {
    events
        .lines()
        .filter_map(|l| l.strip_prefix("frozen "))
        .map(|v| v.trim() == "1")
        .next()
}

/// Waits until `cgroup.events` says `frozen` is `want`.
fn wait_frozen(cg: &Cgroup, want: bool, timeout: Duration) -> std::io::Result<()> {
    let f = cg.open_at("cgroup.events", libc::O_RDONLY)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    loop {
        let n = f.read_at(&mut buf, 0)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if frozen_value(&text) == Some(want) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "cgroup.events did not say frozen {} within {timeout:?}",
                    u8::from(want)
                ),
            ));
        }
        // kernfs wakes pollers of cgroup.events with POLLPRI when it
        // changes; the short timeout is only a safety net.
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.min(Duration::from_millis(100)).as_millis();
        // SAFETY: poll on one pollfd we own, for a bounded time.
        let r = unsafe { libc::poll(&mut pfd, 1, i32::try_from(ms).unwrap_or(100)) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Freezes (`true`) or thaws the cgroup and waits until the kernel says
/// it is done.
fn set_frozen(cg: &Cgroup, frozen: bool) -> std::io::Result<()> {
    cg.write("cgroup.freeze", if frozen { b"1" } else { b"0" })?;
    wait_frozen(cg, frozen, FREEZE_TIMEOUT)
}

/// Thaws a cgroup whose processes were just killed (delete --force of a
/// paused container); errors are ignored, the cgroup goes away next.
pub(super) fn thaw_after_kill(cg: &Cgroup) {
    let _ = cg.write("cgroup.freeze", b"0");
}

/// One cgroup file to write in an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// cgroup file name.
    pub file: &'static str,
    /// Value to write.
    pub value: String,
    /// Skip (rather than fail) when the file does not exist (a value the
    /// user did not ask for explicitly).
    pub optional: bool,
}

fn w(file: &'static str, value: String) -> Write {
    Write {
        file,
        value,
        optional: false,
    }
}

/// A limit as cgroup v2 writes it: negative is `max`.
fn limit(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// runc's conversion of cgroup v1 CPU shares to `cpu.weight`.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + (s - 2) * 9999 / 262_142
}

/// runc's conversion of a blkio weight (10..=1000) to `io.weight`.
pub fn blkio_to_io_weight(weight: u16) -> u64 {
    1 + (u64::from(weight).saturating_sub(10)) * 9999 / 990
}

/// The bytes of a `memory.max`-like value, `None` for `max`.
fn parse_limit(s: &str) -> Option<i64> {
    match s.trim() {
        "max" => None,
        v => v.parse().ok(),
    }
}

fn check_cpuset(what: &str, v: &str) -> Result<(), String> {
    let ok = v.len() <= MAX_CPUSET_LEN
        && v.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b',' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {v:?}: use a list like 0-2,4 (digits, ',' and '-')"
        ))
    }
}

/// The cgroup writes for `r`, with runc's update semantics: 0 (or an
/// empty string) leaves a value unchanged, a negative limit means `max`.
/// `current` reads a cgroup file (for the values an update combines with:
/// `cpu.max`, and `memory.max` for a swap limit). Errors are the user's.
pub fn update_writes(
    r: &ResourcesUpdate,
    current: impl Fn(&str) -> Option<String>,
) -> Result<Vec<Write>, String> {
    let mut out = Vec::new();
    if let Some(m) = &r.memory {
        let mem = m.limit.filter(|&l| l != 0);
        if let Some(l) = mem {
            out.push(w("memory.max", limit(l)));
        }
        if let Some(l) = m.reservation.filter(|&l| l != 0) {
            out.push(w("memory.low", limit(l)));
        }
        match m.swap.filter(|&s| s != 0) {
            Some(s) if s < 0 => out.push(w("memory.swap.max", "max".into())),
            Some(s) => {
                let mem = match mem {
                    Some(l) => Some(l).filter(|&l| l > 0),
                    None => current("memory.max").as_deref().and_then(parse_limit),
                };
                let Some(mem) = mem else {
                    return Err("cannot set a memory+swap limit without a memory limit".into());
                };
                if s < mem {
                    return Err(format!(
                        "memory+swap limit {s} is less than the memory limit {mem}"
                    ));
                }
                // No swap at all (memory+swap = memory, what containerd's
                // CRI asks with every memory limit) holds in a guest
                // without swap accounting: skipped there, as at create.
                out.push(Write {
                    optional: s == mem,
                    ..w("memory.swap.max", (s - mem).to_string())
                });
            }
            // runc: an unlimited memory limit lifts the swap limit too.
            None if mem.is_some_and(|l| l < 0) => out.push(Write {
                optional: true,
                ..w("memory.swap.max", "max".into())
            }),
            None => {}
        }
    }
    if let Some(c) = &r.cpu {
        if let Some(s) = c.shares.filter(|&s| s != 0) {
            out.push(w("cpu.weight", shares_to_weight(s).to_string()));
        }
        let quota = c.quota.filter(|&q| q != 0);
        let period = c.period.filter(|&p| p != 0);
        if quota.is_some() || period.is_some() {
            let cur = current("cpu.max").unwrap_or_default();
            let mut it = cur.split_whitespace();
            let (cur_q, cur_p) = (it.next().unwrap_or("max"), it.next().unwrap_or("100000"));
            let q = match quota {
                Some(q) => limit(q),
                None => cur_q.to_string(),
            };
            let p = match period {
                Some(p) => p.to_string(),
                None => cur_p.to_string(),
            };
            out.push(w("cpu.max", format!("{q} {p}")));
        }
        if let Some(cpus) = c.cpus.as_deref().filter(|v| !v.is_empty()) {
            check_cpuset("cpuset.cpus", cpus)?;
            out.push(w("cpuset.cpus", cpus.to_string()));
        }
        if let Some(mems) = c.mems.as_deref().filter(|v| !v.is_empty()) {
            check_cpuset("cpuset.mems", mems)?;
            out.push(w("cpuset.mems", mems.to_string()));
        }
    }
    if let Some(p) = r.pids.as_ref().filter(|p| p.limit != 0) {
        out.push(w("pids.max", limit(p.limit)));
    }
    if let Some(wt) = r.block_io.as_ref().and_then(|b| b.weight) {
        if wt != 0 {
            if !(10..=1000).contains(&wt) {
                return Err(format!("blkio weight {wt} is out of range 10..1000"));
            }
            out.push(w(
                "io.weight",
                format!("default {}", blkio_to_io_weight(wt)),
            ));
        }
    }
    Ok(out)
}

/// The value to write back to restore `file` from what reading it gave.
fn restore_value(file: &str, old: &str) -> String {
    let first = old.lines().next().unwrap_or("").trim();
    match file {
        // "default 100" then per-device lines: restore the default.
        "io.weight" => first.to_string(),
        _ if first.is_empty() => "\n".into(),
        _ => first.to_string(),
    }
}

/// Error class for a refused write.
fn write_error(file: &str, value: &str, e: &std::io::Error) -> ErrorReply {
    let (code, why) = match e.raw_os_error() {
        Some(libc::ENOENT) => (
            ErrorCode::Unsupported,
            match file {
                "io.weight" => {
                    "the guest has no block I/O controller (it has no block devices)".to_string()
                }
                f if f.starts_with("memory.swap") => {
                    "the guest kernel has no swap (no swap accounting)".to_string()
                }
                f => format!("the guest kernel has no {f}"),
            },
        ),
        Some(libc::EINVAL | libc::ERANGE | libc::EBUSY | libc::EOVERFLOW) => {
            (ErrorCode::InvalidRequest, e.to_string())
        }
        _ => (ErrorCode::Internal, e.to_string()),
    };
    reply(
        code,
        format!("cannot set {file} to {value:?}: {why}; no limit was changed"),
    )
}

/// Applies `writes` in order; on a refusal, restores the files written so
/// far (in reverse order) and returns the error.
fn apply(cg: &Cgroup, writes: &[Write]) -> Result<(), ErrorReply> {
    let mut done: Vec<(&'static str, String)> = Vec::new();
    let undo = |done: &[(&'static str, String)]| {
        for (file, old) in done.iter().rev() {
            let _ = cg.write(file, old.as_bytes());
        }
    };
    for wr in writes {
        let old = match cg.read(wr.file) {
            Ok(old) => old,
            Err(e) if wr.optional && e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                undo(&done);
                return Err(write_error(wr.file, &wr.value, &e));
            }
        };
        if let Err(e) = cg.write(wr.file, wr.value.as_bytes()) {
            undo(&done);
            return Err(write_error(wr.file, &wr.value, &e));
        }
        done.push((wr.file, restore_value(wr.file, &old)));
    }
    Ok(())
}

impl Containers {
    /// `PauseContainer`: freezes a running container.
    pub fn pause(&self, req: &ContainerRef) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        let mut inner = c.lock();
        match c.status(&inner) {
            ContainerStatus::Running => {}
            ContainerStatus::Paused => {
                return Err(reply(
                    ErrorCode::FailedPrecondition,
                    format!("container {} is already paused", c.id),
                ))
            }
            s => {
                return Err(reply(
                    ErrorCode::FailedPrecondition,
                    format!("container {} is not running ({s:?})", c.id).to_lowercase(),
                ))
            }
        }
        if let Err(e) = set_frozen(&c.cgroup, true) {
            // Leave it running rather than half frozen.
            let _ = c.cgroup.write("cgroup.freeze", b"0");
            return Err(internal(format!("cannot freeze container {}: {e}", c.id)));
        }
        inner.paused = true;
        Ok(())
    }

    /// `ResumeContainer`: thaws a paused container.
    pub fn resume(&self, req: &ContainerRef) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        let mut inner = c.lock();
        if c.status(&inner) != ContainerStatus::Paused {
            return Err(reply(
                ErrorCode::FailedPrecondition,
                format!("container {} is not paused", c.id),
            ));
        }
        set_frozen(&c.cgroup, false)
            .map_err(|e| internal(format!("cannot thaw container {}: {e}", c.id)))?;
        inner.paused = false;
        Ok(())
    }

    /// `UpdateContainer`: all of the new limits, or none.
    pub fn update(&self, req: &UpdateContainerRequest) -> Result<(), ErrorReply> {
        let c = self.get(&req.id)?;
        let inner = c.lock();
        if c.status(&inner) == ContainerStatus::Stopped {
            return Err(reply(
                ErrorCode::FailedPrecondition,
                format!("container {} is stopped: cannot update it", c.id),
            ));
        }
        let writes = update_writes(&req.resources, |f| c.cgroup.read(f).ok())
            .map_err(|m| reply(ErrorCode::InvalidRequest, m))?;
        apply(&c.cgroup, &writes)?;
        drop(inner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_proto::resources::{BlockIoUpdate, CpuUpdate, MemoryUpdate, PidsUpdate};

    fn files(ws: &[Write]) -> Vec<(&str, &str)> {
        ws.iter().map(|w| (w.file, w.value.as_str())).collect()
    }

    #[test]
    fn frozen_is_read_from_cgroup_events() {
        assert_eq!(frozen_value("populated 1\nfrozen 1\n"), Some(true));
        assert_eq!(frozen_value("populated 1\nfrozen 0\n"), Some(false));
        assert_eq!(frozen_value("populated 1\n"), None);
    }

    #[test]
    fn updates_become_cgroup_writes() {
        let r = ResourcesUpdate {
            memory: Some(MemoryUpdate {
                limit: Some(64 << 20),
                reservation: Some(0),
                swap: Some(128 << 20),
            }),
            cpu: Some(CpuUpdate {
                shares: Some(1024),
                quota: Some(50_000),
                period: None,
                cpus: Some("0".into()),
                mems: Some(String::new()),
            }),
            pids: Some(PidsUpdate { limit: 20 }),
            block_io: None,
        };
        let cur = |f: &str| (f == "cpu.max").then(|| "max 200000\n".to_string());
        let ws = update_writes(&r, cur).unwrap();
        assert_eq!(
            files(&ws),
            vec![
                ("memory.max", "67108864"),
                ("memory.swap.max", "67108864"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 200000"),
                ("cpuset.cpus", "0"),
                ("pids.max", "20"),
            ]
        );
        // Unlimited memory lifts swap too (optional write); -1 pids is max.
        let r = ResourcesUpdate {
            memory: Some(MemoryUpdate {
                limit: Some(-1),
                ..Default::default()
            }),
            pids: Some(PidsUpdate { limit: -1 }),
            ..Default::default()
        };
        let ws = update_writes(&r, |_| None).unwrap();
        assert_eq!(
            files(&ws),
            vec![
                ("memory.max", "max"),
                ("memory.swap.max", "max"),
                ("pids.max", "max")
            ]
        );
        assert!(ws[1].optional && !ws[0].optional);
        // Period alone keeps the quota.
        let r = ResourcesUpdate {
            cpu: Some(CpuUpdate {
                period: Some(10_000),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ws = update_writes(&r, |_| Some("20000 100000".into())).unwrap();
        assert_eq!(files(&ws), vec![("cpu.max", "20000 10000")]);
        // Nothing asked, nothing written.
        assert!(update_writes(&ResourcesUpdate::default(), |_| None)
            .unwrap()
            .is_empty());
        let ws = update_writes(
            &ResourcesUpdate {
                block_io: Some(BlockIoUpdate { weight: Some(500) }),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap();
        assert_eq!(files(&ws), vec![("io.weight", "default 4950")]);
    }

    #[test]
    fn bad_updates_are_refused_before_any_write() {
        let swap_only = ResourcesUpdate {
            memory: Some(MemoryUpdate {
                swap: Some(1 << 20),
                ..Default::default()
            }),
            ..Default::default()
        };
        // No memory limit: neither in the update nor in the cgroup.
        assert!(update_writes(&swap_only, |_| Some("max\n".into())).is_err());
        // The current memory limit is used.
        let ws = update_writes(&swap_only, |_| Some("524288\n".into())).unwrap();
        assert_eq!(files(&ws), vec![("memory.swap.max", "524288")]);
        assert!(update_writes(&swap_only, |_| Some("4194304\n".into())).is_err());
        // memory+swap equal to memory: zero swap, optional.
        let no_swap = ResourcesUpdate {
            memory: Some(MemoryUpdate {
                limit: Some(1 << 20),
                swap: Some(1 << 20),
                ..MemoryUpdate::default()
            }),
            ..ResourcesUpdate::default()
        };
        let ws = update_writes(&no_swap, |_| None).unwrap();
        assert_eq!(
            files(&ws),
            vec![("memory.max", "1048576"), ("memory.swap.max", "0")]
        );
        assert!(ws[1].optional && !ws[0].optional);
        for cpus in ["0\n1", "a", "0;1", &"1".repeat(300)] {
            let r = ResourcesUpdate {
                cpu: Some(CpuUpdate {
                    cpus: Some(cpus.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert!(update_writes(&r, |_| None).is_err(), "{cpus:?}");
        }
        for weight in [1, 5, 1001] {
            let r = ResourcesUpdate {
                block_io: Some(BlockIoUpdate {
                    weight: Some(weight),
                }),
                ..Default::default()
            };
            assert!(update_writes(&r, |_| None).is_err(), "{weight}");
        }
    }

    #[test]
    fn old_values_are_restorable() {
        assert_eq!(restore_value("memory.max", "max\n"), "max");
        assert_eq!(restore_value("cpu.max", "max 100000\n"), "max 100000");
        assert_eq!(restore_value("cpuset.cpus", "\n"), "\n");
        assert_eq!(
            restore_value("io.weight", "default 100\n8:0 200\n"),
            "default 100"
        );
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10000);
    }
}

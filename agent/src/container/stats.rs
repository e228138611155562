//! `ContainerStats`: a container's cgroup v2 counters in the shape of
//! runc's `events --stats` (`cpu.stat`, `memory.current/max/peak/stat/
//! events`, `memory.swap.current/max`, `pids.current/max`), plus the
//! `oom_kill` count the host watches for `oom` events.
//!
//! Ten small file reads (about 30 system calls); files the guest kernel
//! lacks (swap without `CONFIG_SWAP`, `memory.peak` on old kernels) read
//! as zero.

use std::collections::BTreeMap;

use vessel_proto::container::ContainerRef;
use vessel_proto::resources::{
    ContainerStats, CpuStats, CpuUsage, MemoryEntry, MemoryStats, PidsStats, Stats, Throttling,
};
use vessel_proto::ErrorReply;

use super::cgroup::oom_kills;
use super::Containers;

/// `key value` lines (cpu.stat, memory.stat, memory.events) as a map;
/// lines that do not parse are skipped.
pub fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single-value file: `max` is `u64::MAX`, missing or bad is `None`.
fn single(text: Option<String>) -> Option<u64> {
    match text?.trim() {
        "max" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

/// Builds the statistics from `read` (a cgroup file's text, `None` when
/// it cannot be read).
pub fn collect(read: impl Fn(&str) -> Option<String>) -> ContainerStats {
    let cpu = flat_keyed(&read("cpu.stat").unwrap_or_default());
    let us = |k: &str| cpu.get(k).copied().unwrap_or(0).saturating_mul(1000);
    let cpu = CpuStats {
        usage: CpuUsage {
            total: us("usage_usec"),
            kernel: us("system_usec"),
            user: us("user_usec"),
        },
        throttling: Throttling {
            periods: cpu.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: cpu.get("nr_throttled").copied().unwrap_or(0),
            throttled_time: us("throttled_usec"),
        },
    };
    let raw = flat_keyed(&read("memory.stat").unwrap_or_default());
    let events_text = read("memory.events").unwrap_or_default();
    let events = flat_keyed(&events_text);
    let usage = single(read("memory.current")).unwrap_or(0);
    let limit = single(read("memory.max")).unwrap_or(u64::MAX);
    let swap_usage = single(read("memory.swap.current"));
    let swap_limit = single(read("memory.swap.max"));
    let swap = MemoryEntry {
        // runc on cgroup v2: swap is reported as memory + swap.
        usage: usage.saturating_add(swap_usage.unwrap_or(0)),
        limit: match swap_limit {
            Some(s) if s != u64::MAX && limit != u64::MAX => limit.saturating_add(s),
            Some(_) => u64::MAX,
            // No swap in the guest: memory + swap is memory.
            None => limit,
        },
        max: 0,
        failcnt: 0,
    };
    let memory = MemoryStats {
        cache: raw.get("file").copied().unwrap_or(0),
        usage: MemoryEntry {
            limit,
            usage,
            max: single(read("memory.peak")).unwrap_or(0),
            failcnt: events.get("max").copied().unwrap_or(0),
        },
        swap,
        raw,
    };
    let pids = PidsStats {
        current: single(read("pids.current")).unwrap_or(0),
        // runc: 0 is "no limit".
        limit: match single(read("pids.max")) {
            Some(u64::MAX) | None => 0,
            Some(l) => l,
        },
    };
    ContainerStats {
        stats: Stats { cpu, memory, pids },
        oom_kills: oom_kills(&events_text),
    }
}

impl Containers {
    /// `ContainerStats`.
    pub fn stats(&self, req: &ContainerRef) -> Result<ContainerStats, ErrorReply> {
        let c = self.get(&req.id)?;
        Ok(collect(|f| c.cgroup.read(f).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_become_runc_stats() {
        let files: BTreeMap<&str, &str> = [
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 7\nnr_throttled 2\nthrottled_usec 30\n",
            ),
            ("memory.current", "4096\n"),
            ("memory.max", "8388608\n"),
            ("memory.peak", "12288\n"),
            ("memory.stat", "anon 1024\nfile 2048\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("pids.max", "max\n"),
        ]
        .into_iter()
        .collect();
        let s = collect(|f| files.get(f).map(|s| s.to_string()));
        assert_eq!(s.oom_kills, 1);
        let st = s.stats;
        assert_eq!(
            (st.cpu.usage.total, st.cpu.usage.user, st.cpu.usage.kernel),
            (1_500_000, 1_000_000, 500_000)
        );
        assert_eq!(st.cpu.throttling.throttled_periods, 2);
        assert_eq!(st.cpu.throttling.throttled_time, 30_000);
        assert_eq!(st.memory.usage.usage, 4096);
        assert_eq!(st.memory.usage.limit, 8_388_608);
        assert_eq!(st.memory.usage.max, 12288);
        assert_eq!(st.memory.usage.failcnt, 3);
        assert_eq!(st.memory.cache, 2048);
        assert_eq!(st.memory.raw.get("anon"), Some(&1024));
        // No swap files: memory + swap is memory.
        assert_eq!(
            (st.memory.swap.usage, st.memory.swap.limit),
            (4096, 8_388_608)
        );
        assert_eq!((st.pids.current, st.pids.limit), (2, 0));
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["memory"]["usage"]["usage"], 4096);
        assert_eq!(json["cpu"]["usage"]["total"], 1_500_000);
    }

    #[test]
    fn missing_files_read_as_zero_or_unlimited() {
        let s = collect(|_| None);
        assert_eq!(s.oom_kills, 0);
        assert_eq!(s.stats.memory.usage.limit, u64::MAX);
        assert_eq!(s.stats.pids.limit, 0);
    }
}

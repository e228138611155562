//! `vessel update`'s flags (runc's), turned into a resources update for
//! the runtime, which applies it in the guest (`UpdateContainer`, see
//! `agent/CONTAINERS.md`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use vessel_proto::resources::{
    BlockIoUpdate, CpuUpdate, MemoryUpdate, PidsUpdate, ResourcesUpdate,
};

use vessel_shim::runtime::Runtime;

/// `vessel update` arguments (runc's).
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Container id.
    pub id: String,
    /// OCI `linux.resources` JSON file, or "-" for stdin (the other flags
    /// are then ignored, like runc).
    #[arg(long, short = 'r')]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes (suffixes k, m, g, t; -1: unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit in bytes.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory + swap limit in bytes (-1: unlimited swap).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// CPU shares (relative weight).
    #[arg(long, visible_alias = "cpu-share")]
    pub cpu_shares: Option<u64>,
    /// CPU CFS hard limit in microseconds per period (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPUs allowed (e.g. 0-2,4).
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes allowed.
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Most processes in the container (-1: unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Block I/O weight, 10..1000.
    #[arg(long)]
    pub blkio_weight: Option<u16>,
}

/// A byte size like runc's: digits with an optional k/m/g/t/p suffix
/// (binary multiples, an optional trailing `b`/`ib`), or `-1`.
pub fn parse_size(s: &str) -> Result<i64> {
    let t = s.trim();
    if t == "-1" {
        return Ok(-1);
    }
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let digits = digits.trim_end();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid size {s:?}: use bytes, optionally with k, m, g or t, or -1");
    }
    let n: i64 = digits
        .parse()
        .with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

/// The resources an `update` asks for.
fn requested(a: &UpdateArgs) -> Result<ResourcesUpdate> {
    if let Some(path) = &a.resources {
        let mut text = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading resources from stdin")?;
        } else {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        return serde_json::from_str(&text).context("invalid resources JSON");
    }
    let size = |v: &Option<String>, what: &str| -> Result<Option<i64>> {
        v.as_deref()
            .map(parse_size)
            .transpose()
            .with_context(|| format!("--{what}"))
    };
    let memory = MemoryUpdate {
        limit: size(&a.memory, "memory")?,
        reservation: size(&a.memory_reservation, "memory-reservation")?,
        swap: size(&a.memory_swap, "memory-swap")?,
    };
    let cpu = CpuUpdate {
        shares: a.cpu_shares,
        quota: a.cpu_quota,
        period: a.cpu_period,
        cpus: a.cpuset_cpus.clone(),
        mems: a.cpuset_mems.clone(),
    };
    Ok(ResourcesUpdate {
        memory: (memory != MemoryUpdate::default()).then_some(memory),
        cpu: (cpu != CpuUpdate::default()).then_some(cpu),
        pids: a.pids_limit.map(|limit| PidsUpdate { limit }),
        block_io: a.blkio_weight.map(|w| BlockIoUpdate { weight: Some(w) }),
    })
}

/// `vessel update`.
pub fn update(rt: &Runtime, a: &UpdateArgs) -> Result<()> {
    let resources = requested(a)?;
    Ok(rt.update(&a.id, resources)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_runc() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert_eq!(parse_size("-1").unwrap(), -1);
        for bad in ["", "m", "-2", "1.5m", "12x", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}

//! `vessel events [--stats] [--interval D] ID`, like runc: one JSON object
//! per line. `--stats` prints one `{"type":"stats","id":..,"data":{..}}`
//! and exits; otherwise a stats line every interval and an
//! `{"type":"oom","id":..}` line whenever the container's `oom_kill`
//! count grows, until the container stops.
//!
//! The guest pushes nothing: the OOM count is polled (one
//! `ContainerStats` request per [`OOM_POLL`], a few milliseconds of guest
//! time each), so an OOM shows up within about a second.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use vessel_shim::runtime::Runtime;

/// How often the OOM count is checked between stats lines.
const OOM_POLL: Duration = Duration::from_secs(1);

/// `vessel events` arguments (runc's).
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Container id.
    pub id: String,
    /// Print statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between stats lines (Go duration: 500ms, 5s, 1m).
    #[arg(long, default_value = "5s")]
    pub interval: String,
}

/// A Go-style duration: a sequence of number+unit (`ns`, `us`, `ms`, `s`,
/// `m`, `h`), e.g. `1m30s`, `250ms`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        bail!("invalid duration {s:?}");
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: f64 = num
            .parse()
            .with_context(|| format!("invalid duration {s:?}"))?;
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!("invalid duration {s:?}: unit {unit:?} (use ms, s, m or h)"),
        };
        total += n * secs;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).with_context(|| format!("invalid duration {s:?}"))
}

/// Whether an OOM kill happened since the last poll (the first poll only
/// sets the baseline, like runc, which reports OOMs from its start on).
pub fn oom_grew(last: Option<u64>, now: u64) -> bool {
    last.is_some_and(|n| now > n)
}

fn print_line(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// `vessel events`.
pub fn events(rt: &Runtime, a: &EventsArgs) -> Result<()> {
    let id = a.id.as_str();
    let interval = parse_duration(&a.interval)?;
    if interval.is_zero() {
        bail!("--interval must be greater than 0");
    }
    let mut c = rt.inspect(id)?;
    let stats_line =
        |st: &vessel_proto::resources::Stats| json!({"type": "stats", "id": id, "data": st});
    if a.stats {
        let (st, _) = rt.stats(&mut c, id)?;
        return print_line(&stats_line(&st));
    }
    let mut last_oom: Option<u64> = None;
    let mut next_stats = Instant::now();
    loop {
        let (st, oom_kills) = match rt.stats(&mut c, id) {
            Ok(st) => st,
            // The sandbox went away with the container: the stream ends.
            Err(_) if !rt.still_running(id) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if oom_grew(last_oom, oom_kills) {
            print_line(&json!({"type": "oom", "id": id}))?;
        }
        last_oom = Some(oom_kills);
        let now = Instant::now();
        if now >= next_stats {
            print_line(&stats_line(&st))?;
            next_stats = now + interval;
        }
        let wait = next_stats
            .saturating_duration_since(Instant::now())
            .min(OOM_POLL);
        std::thread::sleep(wait);
        if !rt.still_running(id) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_events_need_a_baseline_and_growth() {
        assert!(!oom_grew(None, 3));
        assert!(!oom_grew(Some(3), 3));
        assert!(oom_grew(Some(3), 4));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "5", "s", "5x", "-1s", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

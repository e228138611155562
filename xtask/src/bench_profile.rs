//! `cargo xtask bench profile run|exec|steps|restore`: where guest time
//! goes in one `vessel run true` and in one `vessel exec ID true`, the
//! guest's own step timeline of one create + start (`steps`, see
//! [`steps`]), and a template restore up to the agent's first answer
//! (`restore`, see [`restore`]).
//!
//! Method: a configuration with `profile_dir = DIR`, so every VMM samples
//! its guest's rip (1 per ms per vCPU) and writes `DIR/<container id>.rip`
//! (histogram) and `DIR/<id>.rip.seq` (`<ms since VMM start> <rip hex>`)
//! when it stops. A VM template is built first (a cold boot).
//! - `run`: one warm-up `vessel run` of a busybox bundle running `true`,
//!   then the profiled one; its histogram covers the VMM's whole life
//!   (restore to exit).
//! - `exec`: a container of the bundle with a sleeping init (`sh` waiting
//!   for `sleep 1000`, ending on SIGTERM) is created and started, gets one
//!   warm-up `vessel exec ID true`, then the profiled one, and is stopped
//!   with `kill ID TERM`: its VM shuts down and writes the profile (`kill ID
//!   9` ends the whole VM at once, before it writes), then it is deleted.
//!   Only the `.rip.seq` samples inside the exec's window are kept. The
//!   window is host wall time converted to the VMM's clock: the VMM's start
//!   is the wall-clock timestamp of a `boot timeline` line of its JSON log
//!   minus that line's `ms` (microsecond timestamps); if the log cannot be
//!   read, the create's start stands in for it (the VMM starts a few ms
//!   later, so the window would then sit that much late).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use vessel_tests::VmProcess;

use crate::bench::{by_symbol, load_system_map, parse_histogram, print_rows, USER_SPACE};
use crate::bench_run::{start_sleeper, write_bundle, write_config, Cli, Scratch};
use crate::build;

const TOP: usize = 40;

/// What both modes share: artifacts, symbols, a bundle running `args`, a
/// vessel CLI whose VMMs write profiles into `profiles`, its template built.
struct Setup {
    symbols: Vec<(u64, String)>,
    dir: Scratch,
    bundle: String,
    profiles: PathBuf,
    vessel: Cli,
}

fn setup(root: &Path, name: &str, args: &[&str]) -> Result<Setup> {
    let a = build::all(root)?;
    let symbols = load_system_map(&a.kernel.with_file_name("System.map"))?;
    let dir = Scratch::new(name);
    let bundle = dir.0.join("bundle");
    write_bundle(&bundle, args)?;
    let profiles = dir.0.join("profiles");
    std::fs::create_dir_all(&profiles).context("creating the profile directory")?;
    let config = write_config(
        &a,
        &dir.0,
        "config.toml",
        &format!("profile_dir = {profiles:?}\n"),
    )?;
    let vessel = Cli::vessel(root, &dir.0, &config);
    eprintln!("bench profile: building the VM template (one cold boot)");
    vessel.timed(&["template", "build", "--rebuild"])?;
    Ok(Setup {
        symbols,
        bundle: bundle.to_string_lossy().into_owned(),
        dir,
        profiles,
        vessel,
    })
}

/// Waits until the VMM of container `id` has written its profile (the
/// `.rip.seq` file, written last, exists and stops growing); returns the
/// `.rip` path.
fn wait_profile(profiles: &Path, id: &str) -> Result<PathBuf> {
    let rip = profiles.join(format!("{id}.rip"));
    let seq = profiles.join(format!("{id}.rip.seq"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let len = std::fs::metadata(&seq).ok().map(|m| m.len());
        if len.is_some() && len == last {
            return Ok(rip);
        }
        if Instant::now() > deadline {
            bail!("no profile at {} after 60 s", seq.display());
        }
        last = len;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Keeps a copy of the raw profile files in target/vessel (the scratch
/// directory goes away).
fn keep(root: &Path, rip: &Path, name: &str) -> Result<PathBuf> {
    let out = root.join("target/vessel").join(name);
    std::fs::copy(rip, &out).with_context(|| format!("copying {}", rip.display()))?;
    let mut seq = rip.as_os_str().to_owned();
    seq.push(".seq");
    let mut seq_out = out.as_os_str().to_owned();
    seq_out.push(".seq");
    std::fs::copy(&seq, &seq_out).context("copying the .rip.seq file")?;
    Ok(out)
}

fn print_profile(symbols: &[(u64, String)], samples: impl IntoIterator<Item = (u64, u64)>) {
    let (rows, total) = by_symbol(symbols, samples);
    let user = rows
        .iter()
        .find(|(s, _)| *s == USER_SPACE)
        .map_or(0, |r| r.1);
    print_rows(&rows, total, TOP);
    println!(
        "{total} samples; guest user space: {user} ({:.1}%)",
        100.0 * user as f64 / total.max(1) as f64
    );
}

/// `bench profile run`: one profiled `vessel run` of `true`.
pub fn run(root: &Path) -> Result<()> {
    let s = setup(root, "profile-run", &["true"])?;
    s.vessel.timed(&["run", "--bundle", &s.bundle, "warm"])?;
    let ms = s.vessel.timed(&["run", "--bundle", &s.bundle, "prof"])?;
    let rip = wait_profile(&s.profiles, "prof")?;
    let text =
        std::fs::read_to_string(&rip).with_context(|| format!("reading {}", rip.display()))?;
    let kept = keep(root, &rip, "profile-run.rip")?;
    println!();
    println!(
        "profile run: one `vessel run` of `true` (after a warm-up), {ms:.0} ms CLI spawn -> exit"
    );
    println!("method: profile_dir in the vessel config: the container's VMM samples guest rip every 1 ms per vCPU over its whole life (restore from the template -> VM exit); symbols from the kernel's System.map");
    print_profile(&s.symbols, parse_histogram(&text));
    println!("raw: {} (and .seq)", kept.display());
    Ok(())
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp
/// (`2026-12-07T19:22:16.224355Z`, what the VMM's JSON log writes).
fn rfc3339_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// The wall-clock start of a VMM (seconds since the epoch), from the first
/// `boot timeline` line of its JSON log: timestamp minus `ms`.
fn vmm_start(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let ms: f64 = v["fields"]["ms"].as_str()?.parse().ok()?;
        Some(rfc3339_secs(v["timestamp"].as_str()?)? - ms / 1000.0)
    })
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `bench profile exec`: one profiled `vessel exec ID true` into a running
/// `sleep` container, only the samples inside the exec's window.
pub fn exec(root: &Path) -> Result<()> {
    // An init that ends on SIGTERM (`kill ID 9` would end the whole VM
    // at once, before its VMM writes the profile).
    let sleeper = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"];
    let s = setup(root, "profile-exec", &sleeper)?;
    let id = "prof";
    let result = (|| {
        let create_start = epoch_secs();
        start_sleeper(&s.vessel, &s.bundle, id)?;
        s.vessel.timed(&["exec", id, "true"])?;
        let from = epoch_secs();
        let ms = s.vessel.timed(&["exec", id, "true"])?;
        let to = epoch_secs();
        let log = s.dir.0.join("vessel-root").join(id).join("vmm.log");
        let logged_start = vmm_start(&log);
        // The VM stops, writing its profile, once the container's init has
        // exited.
        s.vessel.timed(&["kill", id, "TERM"])?;
        s.vessel.wait_for(id, "stopped", Instant::now())?;
        let rip = wait_profile(&s.profiles, id)?;
        Ok::<_, anyhow::Error>((create_start, logged_start, from, to, ms, rip))
    })();
    s.vessel.remove(id);
    let (create_start, logged_start, from, to, ms, rip) = result?;
    let kept = keep(root, &rip, "profile-exec.rip")?;
    let mut seq = rip.into_os_string();
    seq.push(".seq");
    let seq = PathBuf::from(seq);
    let text =
        std::fs::read_to_string(&seq).with_context(|| format!("reading {}", seq.display()))?;
    let (start, how) = match logged_start {
        Some(t) => (
            t,
            format!(
                "the VMM's JSON log (it started {:.1} ms after the create did)",
                (t - create_start) * 1000.0
            ),
        ),
        None => (
            create_start,
            "the create's start (VMM log unreadable: the window sits a few ms late)".into(),
        ),
    };
    let (lo, hi) = ((from - start) * 1000.0, (to - start) * 1000.0);
    let mut whole = 0u64;
    let samples: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let (t, rip) = l.split_once(' ')?;
            Some((t.parse::<f64>().ok()?, u64::from_str_radix(rip, 16).ok()?))
        })
        .inspect(|_| whole += 1)
        .filter(|(t, _)| (lo..=hi).contains(t))
        .map(|(_, rip)| (rip, 1))
        .collect();
    println!();
    println!("profile exec: one `vessel exec ID true` into a running container whose init sleeps (after a warm-up exec), {ms:.0} ms CLI spawn -> exit");
    println!("method: profile_dir in the vessel config; the container's VMM samples guest rip every 1 ms per vCPU and writes them in order when it stops (after `kill ID TERM`: init exits, the VM shuts down); kept: the samples between the exec CLI's spawn and exit, {lo:.0}..{hi:.0} ms on the VMM's clock, whose start comes from {how}; {whole} samples over the VM's whole life (create included)");
    if samples.is_empty() {
        bail!(
            "no samples in {lo:.0}..{hi:.0} ms of {} ({whole} samples in all)",
            seq.display()
        );
    }
    print_profile(&s.symbols, samples);
    println!("raw (whole VM life): {} (and .seq)", kept.display());
    Ok(())
}

/// `bench profile restore`: where the guest's time goes between a
/// template restore and the agent's first answer (what `bench restore`
/// times). One template, one profiled restore + Ping, then shutdown; the
/// samples up to the answer are kept.
pub fn restore(root: &Path) -> Result<()> {
    let a = build::all(root)?;
    let symbols = load_system_map(&a.kernel.with_file_name("System.map"))?;
    let dir = Scratch::new("profile-restore");
    let snap = dir.0.join("template");
    eprintln!("bench profile restore: building the template (one cold boot)");
    crate::bench::build_template(&a, &snap)?;
    let rip = dir.0.join("restore.rip");
    let args = ["--profile-rip".to_string(), rip.display().to_string()];
    let mut vm =
        VmProcess::restore_with_args(&a, &snap, 3000, &args).context("cannot start the clone")?;
    let mut c = vm
        .connect_and_ping(Duration::from_secs(60))
        .map_err(|e| anyhow!(e))?;
    let ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    c.shutdown().context("clone shutdown")?;
    vm.wait_exit(Duration::from_secs(60))
        .ok_or_else(|| anyhow!("the clone did not stop"))?;
    let seq = dir.0.join("restore.rip.seq");
    let text =
        std::fs::read_to_string(&seq).with_context(|| format!("reading {}", seq.display()))?;
    let kept = keep(root, &rip, "profile-restore.rip")?;
    let samples: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let (t, rip) = l.split_once(' ')?;
            Some((t.parse::<f64>().ok()?, u64::from_str_radix(rip, 16).ok()?))
        })
        .filter(|(t, _)| *t <= ms)
        .map(|(_, rip)| (rip, 1))
        .collect();
    println!();
    println!("profile restore: one `vessel-vmm --restore` of a fresh template, {ms:.0} ms from spawn to the agent's first answer (Ping on a new connection)");
    println!("method: the clone runs with --profile-rip (guest rip every 1 ms per vCPU, on the VMM's clock from its start); kept: the samples up to the answer; symbols from the kernel's System.map");
    print_profile(&symbols, samples);
    println!("raw (whole clone life): {} (and .seq)", kept.display());
    Ok(())
}

/// `bench profile steps`: the guest's own timeline of one `create` and
/// `start` of `true`. The template is built with `guest_cmdline =
/// "vessel.debug printk.devkmsg=on"`, so the agent and the container's
/// child write `vessel-step NAME MICROSECONDS` lines (guest CLOCK_BOOTTIME)
/// to /dev/kmsg, which the sandbox's `serial.log` keeps; the table shows
/// each step's guest time since the one before. Printing to the serial
/// console costs guest time too (about a millisecond a line here).
pub fn steps(root: &Path) -> Result<()> {
    let a = build::all(root)?;
    let dir = Scratch::new("profile-steps");
    let bundle = dir.0.join("bundle");
    write_bundle(&bundle, &["true"])?;
    let bundle = bundle.to_string_lossy().into_owned();
    let config = write_config(
        &a,
        &dir.0,
        "config.toml",
        "guest_cmdline = \"vessel.debug printk.devkmsg=on\"\n",
    )?;
    let vessel = Cli::vessel(root, &dir.0, &config);
    eprintln!("bench profile steps: building the VM template (one cold boot)");
    vessel.timed(&["template", "build", "--rebuild"])?;
    vessel.timed(&["run", "--bundle", &bundle, "warm"])?;
    let create_ms = vessel.timed(&["create", "--bundle", &bundle, "steps"])?;
    let t = Instant::now();
    vessel.timed(&["start", "steps"])?;
    let stopped_ms = vessel.wait_for("steps", "stopped", t);
    let log = dir.0.join("vessel-root/steps/serial.log");
    let text = std::fs::read(&log).with_context(|| format!("reading {}", log.display()));
    vessel.remove("steps");
    let stopped_ms = stopped_ms?;
    let steps = parse_steps(&String::from_utf8_lossy(&text?));
    if steps.is_empty() {
        bail!("no vessel-step lines in {}", log.display());
    }
    println!();
    println!("profile steps: one `vessel create` ({create_ms:.0} ms) and `start` -> `stopped` ({stopped_ms:.0} ms) of `true`, guest time per step");
    println!("method: template built with guest_cmdline = \"vessel.debug printk.devkmsg=on\"; the agent and the container's child write `vessel-step NAME µs` (CLOCK_BOOTTIME) to /dev/kmsg at each point, read back from the sandbox's serial.log; a row is the time since the row before (each line itself costs ~1 ms of console output)");
    println!("{:<14} {:>10} {:>10}", "step", "+ms", "total ms");
    let first = steps[0].1;
    let mut prev = first;
    for (name, us) in &steps {
        println!(
            "{name:<14} {:>10.1} {:>10.1}",
            us.saturating_sub(prev) as f64 / 1000.0,
            us.saturating_sub(first) as f64 / 1000.0
        );
        prev = *us;
    }
    Ok(())
}

/// The `vessel-step NAME US` lines of a serial log, in order.
fn parse_steps(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("vessel-step ")? + "vessel-step ".len()..];
            let mut it = rest.split_whitespace();
            let name = it.next()?.to_string();
            let us = it.next()?.parse().ok()?;
            Some((name, us))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_are_found_in_a_serial_log() {
        let log = "[   13.1] vessel-step create 12565991\nvessel-agent: connection accepted\n\
                   [   13.2] vessel-step parsed 12754270\nvessel-step broken x\n";
        assert_eq!(
            parse_steps(log),
            vec![
                ("create".to_string(), 12_565_991),
                ("parsed".to_string(), 12_754_270)
            ]
        );
    }
}

//! The balloon gives freed guest memory back to the host: a container
//! (through `vessel run --detach`, sandbox restored from a template with the
//! default `balloon = true`) fills 32 MiB of a tmpfs, waits, deletes the
//! file and idles. The VMM's Rss (from `/proc/PID/smaps_rollup`) must rise
//! by most of the 32 MiB and then fall back by most of it once the guest's
//! free page reporting has told the VMM, which `MADV_DONTNEED`s the pages.
//!
//! Both phases run at the speed of the guest kernel, which is emulated on
//! PVM hosts: filling and freeing the tmpfs move 0.3-0.5 MiB/s there (and
//! less when the host is busy), and the Rss falls in 2 MiB steps as the
//! freed pages merge into 2 MiB blocks and are reported (one report per
//! 2 s at most). So the test has no fixed deadline for either phase; it
//! fails when the Rss stops moving towards the phase's goal for
//! [`STALL`], which is what a balloon that does not report looks like.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::time::{Duration, Instant};

use serde_json::json;
use vessel_tests::cli::{busybox_rootfs, CliEnv};
use vessel_tests::kvm_available_or_skip;

const FILL_MIB: u64 = 32;
/// How long the Rss may stay away from a new extreme before a phase fails.
const STALL: Duration = Duration::from_secs(90);
/// An upper bound for each phase, however slowly the guest progresses.
const PHASE_LIMIT: Duration = Duration::from_secs(900);

/// Rss of `pid` in MiB.
fn rss_mib(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: f64 = text
        .lines()
        .find(|l| l.starts_with("Rss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// How a phase ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The goal was met.
    Reached,
    /// The Rss reached no new high or low for [`STALL`].
    Stalled,
    /// [`PHASE_LIMIT`] passed.
    TimedOut,
    /// The VMM went away.
    Gone,
}

/// A phase's outcome, the highest Rss it saw and the last (MiB).
#[derive(Debug)]
struct Phase {
    outcome: Outcome,
    high: f64,
    now: f64,
}

/// Samples the Rss of `vmm` every 250 ms, starting from `from`, until
/// `done(highest so far, now)`, or until it has reached no new high or low
/// (by 0.5 MiB: smaller moves are noise) for [`STALL`].
fn follow(vmm: i32, from: f64, done: impl Fn(f64, f64) -> bool) -> Phase {
    let start = Instant::now();
    let (mut high, mut now) = (from, from);
    // The range the Rss has covered, widened only by moves of 0.5 MiB or
    // more, so a slow steady rise or fall counts as progress.
    let (mut top, mut bottom) = (from, from);
    let mut moved = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Some(rss) = rss_mib(vmm) else {
            return Phase {
                outcome: Outcome::Gone,
                high,
                now,
            };
        };
        now = rss;
        high = high.max(now);
        if now >= top + 0.5 || now <= bottom - 0.5 {
            top = top.max(now);
            bottom = bottom.min(now);
            moved = Instant::now();
        }
        if done(high, now) {
            return Phase {
                outcome: Outcome::Reached,
                high,
                now,
            };
        }
        if moved.elapsed() >= STALL {
            return Phase {
                outcome: Outcome::Stalled,
                high,
                now,
            };
        }
        if start.elapsed() >= PHASE_LIMIT {
            return Phase {
                outcome: Outcome::TimedOut,
                high,
                now,
            };
        }
    }
}

#[test]
fn balloon_returns_freed_guest_memory() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("balloon", "balloon = true\n");
    busybox_rootfs(&env.tmp.join("bundle/rootfs"), &["sh", "dd", "rm", "sleep"]);
    let script = format!(
        "dd if=/dev/zero of=/scratch/fill bs=1M count={FILL_MIB} 2>/dev/null; \
         sleep 5; rm /scratch/fill; sleep 1000"
    );
    let spec = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {
            "terminal": false,
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=1m"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "size=48m"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    let b = env.write_bundle("bundle", &spec);
    let vmm = env.run_detached(&b, "fill");

    let started = rss_mib(vmm).expect("VMM Rss");
    let want = FILL_MIB as f64 * 0.75;
    // The fill: the Rss rises.
    let t = Instant::now();
    let fill = follow(vmm, started, |high, _| high - started >= want);
    eprintln!(
        "VMM Rss {started:.1} MiB after start; filling: {fill:?} after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    if fill.outcome != Outcome::Reached {
        env.ok(&["delete", "--force", "fill"]);
        panic!(
            "filling {FILL_MIB} MiB in the guest raised the VMM's Rss only from {started:.1} to {:.1} MiB: {fill:?}",
            fill.high
        );
    }
    // The rest of the fill, then the guest frees the file: the Rss falls
    // back from its peak.
    let t = Instant::now();
    let free = follow(vmm, fill.now, |high, now| high - now >= want);
    eprintln!(
        "after the guest freed the file: {free:?} after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    env.ok(&["delete", "--force", "fill"]);
    assert!(
        free.outcome == Outcome::Reached,
        "the VMM's Rss did not fall by {want:.0} MiB after the guest freed {FILL_MIB} MiB: peak {:.1}, then {:.1} MiB ({:?})",
        free.high,
        free.now,
        free.outcome
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.vmms().is_empty() {
        assert!(Instant::now() < deadline, "VMM left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! The balloon gives freed guest memory back to the host: a container
//! (through `vessel run --detach`, sandbox restored from a template with the
//! default `balloon = true`) fills 48 MiB of a tmpfs, waits, deletes the
//! file and idles. The VMM's Rss (from `/proc/PID/smaps_rollup`) must rise
//! by most of the 48 MiB and then fall back by most of it once the guest's
//! free page reporting has told the VMM, which `MADV_DONTNEED`s the pages.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::time::{Duration, Instant};

use serde_json::json;
use vessel_tests::cli::{busybox_rootfs, CliEnv};
use vessel_tests::kvm_available_or_skip;

const FILL_MIB: u64 = 48;

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

#[test]
#[ignore = "fails: Rss rises 40+ MiB but does not fall within 150 s when the container itself frees the file; by hand (rm through vessel exec) it falls 70 -> 23 MiB; suspect freed pages parked on the guest per-cpu lists; cargo xtask test --test balloon -- --ignored"]
fn balloon_returns_freed_guest_memory() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("balloon", "balloon = true\n");
    busybox_rootfs(&env.tmp.join("bundle/rootfs"), &["sh", "dd", "rm", "sleep"]);
    let script = format!(
        "dd if=/dev/zero of=/scratch/fill bs=1M count={FILL_MIB} 2>/dev/null; \
         sleep 15; rm /scratch/fill; sleep 1000"
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
             "options": ["nosuid", "nodev", "size=64m"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    let b = env.write_bundle("bundle", &spec);
    let t = Instant::now();
    let (st, err) = env.detached(&["run", "--detach", "--bundle", &b, "fill"]);
    assert!(st.success(), "run -d: {err}");
    eprintln!(
        "run -d (template build included unless another test built it): {:?}",
        t.elapsed()
    );
    let vmms = env.vmms();
    assert_eq!(vmms.len(), 1, "VMMs of the container: {vmms:?}");
    let vmm = vmms[0];

    // Sample Rss: the peak while the file exists, then wait for it to fall.
    let started = rss_mib(vmm).expect("VMM Rss");
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut peak = started;
    let mut last = started;
    let mut returned = false;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let Some(now) = rss_mib(vmm) else { break };
        last = now;
        peak = peak.max(now);
        if peak - started >= FILL_MIB as f64 * 0.75 && peak - now >= FILL_MIB as f64 * 0.75 {
            returned = true;
            break;
        }
    }
    eprintln!("VMM Rss: {started:.1} MiB after start, peak {peak:.1} MiB, then {last:.1} MiB");
    env.ok(&["delete", "--force", "fill"]);
    assert!(
        peak - started >= FILL_MIB as f64 * 0.75,
        "filling {FILL_MIB} MiB in the guest raised the VMM's Rss only from {started:.1} to {peak:.1} MiB"
    );
    assert!(
        returned,
        "the VMM's Rss did not fall after the guest freed {FILL_MIB} MiB: peak {peak:.1}, last {last:.1} MiB"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.vmms().is_empty() {
        assert!(Instant::now() < deadline, "VMM left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

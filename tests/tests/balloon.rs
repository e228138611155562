//! The balloon gives freed guest memory back to the host: a container
//! (through `vessel run --detach`, sandbox restored from a template with the
//! default `balloon = true`) fills 48 MiB of a tmpfs, waits, deletes the
//! file and idles. The VMM's Rss (from `/proc/PID/smaps_rollup`) must rise
//! by most of the 48 MiB and then fall back by most of it once the guest's
//! free page reporting has told the VMM, which `MADV_DONTNEED`s the pages.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vessel_tests::{kvm_available_or_skip, Artifacts};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// The one vessel-vmm whose arguments mention `needle`.
fn vmm_mentioning(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("vessel-vmm") && c.contains(needle)
                })
                .unwrap_or(false)
        })
}

#[test]
#[ignore = "written, not yet verified on a VM: cargo test -p vessel-tests --test balloon -- --ignored"]
fn balloon_returns_freed_guest_memory() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let bin = art.vmm.with_file_name("vessel");
    assert!(
        bin.is_file(),
        "{} missing (cargo xtask build)",
        bin.display()
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install Debian's busybox-static"
    );
    let tmp = TempDir(std::env::temp_dir().join(format!("vessel-balloon-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let bundle = tmp.0.join("bundle");
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "proc", "dev", "scratch"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "dd", "rm", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
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
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    let config = tmp.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "vmm = {:?}\nkernel = {:?}\ninitrd = {:?}\ntemplate_dir = {:?}\ntemplates = true\nballoon = true\n",
            art.vmm,
            art.kernel,
            art.initrd,
            tmp.0.join("templates")
        ),
    )
    .unwrap();
    let root = tmp.0.join("root");
    let vessel = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let b = bundle.to_string_lossy().into_owned();
    let o = vessel(&["run", "--detach", "--bundle", &b, "fill"])
        .output()
        .expect("run vessel");
    assert!(
        o.status.success(),
        "run -d: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let root_s = root.to_string_lossy().into_owned();
    let vmm = vmm_mentioning(&root_s).expect("no VMM for the container");

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
    let o = vessel(&["delete", "--force", "fill"])
        .output()
        .expect("run vessel");
    assert!(
        o.status.success(),
        "delete -f: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        peak - started >= FILL_MIB as f64 * 0.75,
        "filling {FILL_MIB} MiB in the guest raised the VMM's Rss only from {started:.1} to {peak:.1} MiB"
    );
    assert!(
        returned,
        "the VMM's Rss did not fall after the guest freed {FILL_MIB} MiB: peak {peak:.1}, last {last:.1} MiB"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while vmm_mentioning(&root_s).is_some() {
        assert!(Instant::now() < deadline, "VMM left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

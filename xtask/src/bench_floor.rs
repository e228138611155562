//! `cargo xtask bench floor [BUDGET_MS]`: the physical floor inside a
//! container on this host, against the same program on the host.
//!
//! Method: `vessel-floor` (bench-guest/, a static musl binary) is copied
//! into a busybox bundle's read-only rootfs next to `floor.dat` (16 MiB,
//! written and synced by xtask). It runs once directly on the host (ROOT =
//! the rootfs directory: the reference), then once as the process of `vessel
//! run` (ROOT = `/`, the rootfs is the virtio-fs share with
//! `rootfs_dax_mib = 0`: every file read is a FUSE request; the VM comes
//! from a template built first). Between the two, xtask reads `floor.dat`
//! on the host, so the container's cold file faults find it in the host's
//! page cache. Each figure loops over one operation until BUDGET_MS (default
//! 1000) have passed or the operation runs out of fresh material and prints
//! the mean per operation; see bench-guest/src/main.rs for each operation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::bench_run::{loadavg, write_bundle, write_config, Cli, Scratch};
use crate::{build, initramfs};

/// The figures `vessel-floor` prints: its name, what it measures, and what
/// a C prototype measured in a container on these hosts.
const FIGURES: [(&str, &str, &str); 10] = [
    ("syscall_getppid", "system call (getppid loop)", "0.3 ms"),
    (
        "anon_page_fault",
        "anonymous page fault (fresh mmap)",
        "2.6-3 ms",
    ),
    (
        "file_page_fault_cold",
        "file page fault, cold (rootfs)",
        "3.7 ms",
    ),
    (
        "file_page_fault_cached",
        "file page fault, cached (rootfs)",
        "",
    ),
    (
        "file_page_sequential_cold",
        "file page, cold, sequential (per page)",
        "",
    ),
    (
        "pread_4k_o_direct",
        "pread 4 KiB O_DIRECT (FUSE round trip)",
        "18-25 ms",
    ),
    ("open_close", "open + close of a rootfs file", "54-70 ms"),
    ("stat_missing", "stat of a missing path", "30-39 ms"),
    ("fork_exit_wait", "fork + exit + wait", "280-320 ms"),
    (
        "vfork_exec_wait",
        "vfork + exec + wait (static binary)",
        "700-860 ms",
    ),
];

const DATA_MIB: usize = 16;

/// One figure: microseconds per operation and the number of operations.
type Figure = std::result::Result<(f64, u64), String>;

/// The `floor NAME US OPS` (or `floor NAME error MSG`) lines of `out`.
fn parse(out: &str) -> BTreeMap<String, Figure> {
    out.lines()
        .filter_map(|l| l.strip_prefix("floor "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            let fig = match rest.strip_prefix("error ") {
                Some(e) => Err(e.to_string()),
                None => {
                    let (us, n) = rest.split_once(' ')?;
                    Ok((us.parse().ok()?, n.parse().ok()?))
                }
            };
            Some((name.to_string(), fig))
        })
        .collect()
}

fn cell(f: Option<&Figure>) -> String {
    match f {
        Some(Ok((us, _))) => format!("{us:.1}"),
        Some(Err(_)) => "error".into(),
        None => "missing".into(),
    }
}

pub fn run(root: &Path, budget_ms: u64) -> Result<()> {
    let a = build::all(root)?;
    let floor = initramfs::build_static(root, "vessel-bench-guest", "vessel-floor")?;
    let dir = Scratch::new("floor");
    let bundle = dir.0.join("bundle");
    let budget = budget_ms.to_string();
    let rootfs = write_bundle(&bundle, &["/vessel-floor", "/", &budget])?;
    std::fs::copy(&floor, rootfs.join("vessel-floor")).context("copying vessel-floor")?;
    let data = rootfs.join("floor.dat");
    let mut f = std::fs::File::create(&data).context("creating floor.dat")?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    for _ in 0..DATA_MIB {
        f.write_all(&chunk).context("writing floor.dat")?;
    }
    // Clean pages only: the host run's cold pass can drop them.
    f.sync_all().context("syncing floor.dat")?;
    drop(f);
    let config = write_config(&a, &dir.0, "config.toml", "rootfs_dax_mib = 0\n")?;
    let vessel = Cli::vessel(root, &dir.0, &config);

    eprintln!("bench floor: building the VM template (one cold boot)");
    vessel.timed(&["template", "build", "--rebuild"])?;
    let load_before = loadavg();
    eprintln!("bench floor: on the host");
    let host = std::process::Command::new(&floor)
        .arg(&rootfs)
        .arg(&budget)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", floor.display()))?;
    if !host.status.success() {
        bail!("vessel-floor on the host failed with {}", host.status);
    }
    std::fs::read(&data).context("reading floor.dat into the host page cache")?;
    eprintln!("bench floor: in a container (vessel run)");
    let guest = vessel
        .cmd(&["run", "--bundle", &bundle.to_string_lossy(), "floor"])
        .stdin(Stdio::null())
        .output()
        .context("running vessel run")?;
    if !guest.status.success() {
        bail!(
            "vessel run of vessel-floor failed with {}: {}",
            guest.status,
            String::from_utf8_lossy(&guest.stderr).trim()
        );
    }
    let load_after = loadavg();
    let host = parse(&String::from_utf8_lossy(&host.stdout));
    let guest = parse(&String::from_utf8_lossy(&guest.stdout));

    let size_kib = std::fs::metadata(&floor)
        .map(|m| m.len() / 1024)
        .unwrap_or(0);
    println!();
    println!("floor: basic kernel operations in a vessel container (guest kernel emulated) vs the same static binary on the host");
    println!("method: vessel-floor ({size_kib} KiB, musl) loops over each operation for about {budget_ms} ms (or until fresh material runs out), mean per operation; container run with `vessel run` (rootfs = virtio-fs share, no DAX; {DATA_MIB} MiB floor.dat), host run directly on the bundle's rootfs directory first; file faults touch one page per 64 KiB (fault-around) with MADV_RANDOM, one fault each; cold = after POSIX_FADV_DONTNEED in the running kernel (container: host page cache warm; host: read from disk); sequential = every page in order with read-ahead, time per page; stat uses a new missing name each time; vfork+exec is posix_spawn (musl: CLONE_VM|CLONE_VFORK) of vessel-floor --noop");
    println!("host load average (1/5/15 min) before: {load_before}, after: {load_after}");
    println!(
        "{:<40} {:>12} {:>10} {:>9}  C prototype (container)",
        "per operation (µs)", "container", "host", "ratio"
    );
    let mut json = serde_json::Map::new();
    for (name, label, proto) in FIGURES {
        let (g, h) = (guest.get(name), host.get(name));
        let ratio = match (g, h) {
            (Some(Ok((g, _))), Some(Ok((h, _)))) => Some(g / h),
            _ => None,
        };
        println!(
            "{label:<40} {:>12} {:>10} {:>9}  {proto}",
            cell(g),
            cell(h),
            ratio.map_or(String::new(), |r| format!("{r:.0}x"))
        );
        let side = |f: Option<&Figure>| match f {
            Some(Ok((us, n))) => serde_json::json!({"us_per_op": us, "ops": n}),
            Some(Err(e)) => serde_json::json!({"error": e}),
            None => serde_json::Value::Null,
        };
        json.insert(
            name.to_string(),
            serde_json::json!({"container": side(g), "host": side(h), "ratio": ratio}),
        );
    }
    for (side, figs) in [("container", &guest), ("host", &host)] {
        for (name, f) in figs {
            if let Err(e) = f {
                println!("{side} {name}: {e}");
            }
        }
    }
    let json = serde_json::json!({
        "benchmark": "floor",
        "budget_ms": budget_ms,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "data_mib": DATA_MIB,
        "binary_kib": size_kib,
        "figures": json,
    });
    let out = root.join("target/vessel/bench-floor.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

//! `cargo xtask bench fs [MiB]`: read throughput of one file in the guest
//! through virtio-fs with a DAX window, through virtio-fs without one, and
//! on the host, in the same run.
//!
//! Method: two copies of a pseudo-random file of MiB MiB (default 8) in one
//! host directory, shared with ONE booted VM (256 MiB or more, 1 vCPU) by
//! two devices: `dax` (a window the file fits in, mounted `dax=always`) and
//! `plain` (no window); each guest path reads its own copy, so neither
//! profits from the other's host page cache. Every read is a whole-file
//! read with 1 MiB `pread`s and FNV-1a over every byte: in the guest by the
//! agent (`ReadFile` with `discard`, timed with the guest clock), on the
//! host by the same loop (host clock). Each path is read twice: "cold" is
//! the first read, after the file's host page cache was dropped (fdatasync,
//! then `posix_fadvise(DONTNEED)`: the only way without touching host
//! settings; the resident fraction left is printed) and, in the guest,
//! before the guest ever read it; "warm" is the second read right after.
//! Every read's checksum must match the host's bytes. The host wall time of
//! each guest request (vsock round trip included) is printed next to the
//! guest-clock figure.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vessel_proto::client::AgentClient;
use vessel_proto::{fnv1a, FNV1A_INIT};
use vessel_tests::fsread::{
    drop_host_cache, guest_read, host_read, mount_share, resident_fraction, vmm_mappings,
    ReadTiming,
};
use vessel_tests::{pattern, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

use crate::build;

/// One measured read.
struct Row {
    method: &'static str,
    pass: &'static str,
    timing: ReadTiming,
    /// Host wall time of the request (guest reads), seconds.
    wall_secs: f64,
    /// Fraction of the file in the host page cache just before the read.
    host_resident: f64,
}

/// Reads `host_file` (seen by the guest as `guest_path`, or read on the
/// host when `guest` is None) twice: cold, after dropping its host page
/// cache, then warm.
fn cold_and_warm(
    method: &'static str,
    host_file: &Path,
    mut guest: Option<(&mut AgentClient, &str)>,
    want: (u64, u64),
) -> Result<Vec<Row>> {
    drop_host_cache(host_file)
        .with_context(|| format!("dropping the page cache of {}", host_file.display()))?;
    let mut rows = Vec::new();
    for pass in ["cold", "warm"] {
        let host_resident = resident_fraction(host_file)
            .with_context(|| format!("mincore of {}", host_file.display()))?;
        let t = Instant::now();
        let timing = match guest.as_mut() {
            Some((c, path)) => {
                guest_read(c, path, false).with_context(|| format!("guest read of {path}"))?
            }
            None => host_read(host_file)
                .with_context(|| format!("host read of {}", host_file.display()))?,
        };
        let wall_secs = t.elapsed().as_secs_f64();
        if (timing.len, timing.fnv1a) != want {
            bail!(
                "{method} {pass}: read {} bytes with FNV-1a {:#x}, the file has {} bytes with {:#x}",
                timing.len,
                timing.fnv1a,
                want.0,
                want.1
            );
        }
        eprintln!(
            "bench fs: {method}, {pass}: {:.2} MiB/s ({:.2} s)",
            timing.mib_per_s(),
            timing.secs
        );
        rows.push(Row {
            method,
            pass,
            timing,
            wall_secs,
            host_resident,
        });
    }
    Ok(rows)
}

pub fn run(root: &Path, mib: u64) -> Result<()> {
    if mib == 0 {
        bail!("need a file size of at least 1 MiB");
    }
    let a = build::all(root)?;
    let dir = TempDir::new("bench-fs");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let len = usize::try_from(mib << 20).context("file size")?;
    let bytes = pattern(len, 5);
    let want = (bytes.len() as u64, fnv1a(FNV1A_INIT, &bytes));
    let files = ["host.bin", "plain.bin", "dax.bin"].map(|n| data.join(n));
    for f in &files {
        std::fs::write(f, &bytes).with_context(|| format!("writing {}", f.display()))?;
    }
    drop(bytes);
    // The whole file fits in the window, so the warm pass needs no new
    // mappings; the guest keeps a plain read's pages in its page cache.
    let window_mib = (mib.div_ceil(2) * 2 + 2).max(64);
    let opts = VmOptions {
        mem_mib: (2 * mib + 128).max(256),
        shares: vec![
            format!("dax={},dax={window_mib}M", data.display()),
            format!("plain={}", data.display()),
        ],
        ..VmOptions::default()
    };
    eprintln!("bench fs: booting one VM ({} MiB)", opts.mem_mib);
    let mut vm = VmProcess::spawn(&a, &opts).context("cannot start vessel-vmm")?;
    let mut c = vm.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
    let boot_ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    c.set_timeout(Some(Duration::from_secs(3600)))
        .context("agent timeout")?;
    mount_share(&mut c, "dax", "/mnt/dax", true, true).context("mounting the DAX share")?;
    mount_share(&mut c, "plain", "/mnt/plain", true, false).context("mounting the plain share")?;

    let mut rows = cold_and_warm("host", &files[0], None, want)?;
    rows.extend(cold_and_warm(
        "guest virtio-fs, no DAX",
        &files[1],
        Some((&mut c, "/mnt/plain/plain.bin")),
        want,
    )?);
    rows.extend(cold_and_warm(
        "guest virtio-fs, DAX",
        &files[2],
        Some((&mut c, "/mnt/dax/dax.bin")),
        want,
    )?);
    // The DAX path must really have mapped the file, the plain one not.
    let dax_maps = vmm_mappings(vm.pid(), &files[2]).len();
    let plain_maps = vmm_mappings(vm.pid(), &files[1]).len();
    c.shutdown().context("shutdown")?;
    vm.wait_exit(Duration::from_secs(120))
        .ok_or_else(|| anyhow!("VM did not stop"))?;
    if dax_maps == 0 || plain_maps != 0 {
        bail!("the VMM maps dax.bin {dax_maps} times and plain.bin {plain_maps} times: the DAX path was not used as intended");
    }

    let rate = |method: &str, pass: &str| {
        rows.iter()
            .find(|r| r.method == method && r.pass == pass)
            .map_or(f64::NAN, |r| r.timing.mib_per_s())
    };
    println!();
    println!("fs: read throughput of a {mib} MiB file, one VM (booted once, {boot_ms:.0} ms; {} MiB, 1 vCPU), DAX window {window_mib} MiB", opts.mem_mib);
    println!("method: whole-file read, 1 MiB pread()s + FNV-1a over every byte (guest: agent ReadFile with discard, guest clock; host: same loop, host clock); cold = first read after fdatasync + posix_fadvise(DONTNEED) of the host file (and the guest's first read of it), warm = the read right after; checksums checked");
    println!(
        "{:<26} {:<5} {:>10} {:>10} {:>12} {:>12}",
        "method", "pass", "MiB/s", "seconds", "host wall s", "host cached"
    );
    for r in &rows {
        println!(
            "{:<26} {:<5} {:>10.2} {:>10.3} {:>12.3} {:>11.0}%",
            r.method,
            r.pass,
            r.timing.mib_per_s(),
            r.timing.secs,
            r.wall_secs,
            100.0 * r.host_resident
        );
    }
    let (dax, plain, host) = ("guest virtio-fs, DAX", "guest virtio-fs, no DAX", "host");
    for pass in ["cold", "warm"] {
        println!(
            "{pass}: DAX / no DAX {:.2}x, host / DAX {:.1}x, host / no DAX {:.1}x",
            rate(dax, pass) / rate(plain, pass),
            rate(host, pass) / rate(dax, pass),
            rate(host, pass) / rate(plain, pass)
        );
    }
    let json = serde_json::json!({
        "benchmark": "fs",
        "file_mib": mib,
        "guest_mem_mib": opts.mem_mib,
        "dax_window_mib": window_mib,
        "boot_ms": boot_ms,
        "reads": rows.iter().map(|r| serde_json::json!({
            "method": r.method,
            "pass": r.pass,
            "mib_per_s": r.timing.mib_per_s(),
            "secs": r.timing.secs,
            "host_wall_secs": r.wall_secs,
            "host_cached_fraction": r.host_resident,
        })).collect::<Vec<_>>(),
        "dax_over_plain": {
            "cold": rate(dax, "cold") / rate(plain, "cold"),
            "warm": rate(dax, "warm") / rate(plain, "warm"),
        },
    });
    let out = root.join("target/vessel/bench-fs.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("written {}", out.display());
    Ok(())
}

//! `cargo xtask demo`: boot a microVM, ask the agent for the guest's uname,
//! print it with the boot timeline, and shut the VM down.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vessel_tests::{VmOptions, VmProcess, BOOT_TIMEOUT};

use crate::build;

pub fn run(root: &Path) -> Result<()> {
    let a = build::all(root)?;
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: vessel needs KVM");
    }
    println!("booting a microVM (kernel {}) ...", a.kernel.display());
    let mut vm = VmProcess::spawn(&a, &VmOptions::default()).context("cannot start vessel-vmm")?;
    let mut client = vm.wait_ready(BOOT_TIMEOUT).map_err(|e| anyhow!(e))?;
    let ready = vm.started.elapsed();
    let pong = client.ping().context("ping")?;
    let u = &pong.uname;
    println!();
    println!(
        "guest `uname -a`, answered by vessel-agent {} over vsock:",
        pong.agent_version
    );
    println!(
        "  {} {} {} {} {}",
        u.sysname, u.nodename, u.release, u.version, u.machine
    );
    println!();
    println!("boot timeline (ms since vessel-vmm started):");
    for (name, ms) in vm.timeline() {
        println!("  {name:<20} {ms:>10.1}");
    }
    println!(
        "  {:<20} {:>10.1}",
        "host sees agent",
        ready.as_secs_f64() * 1000.0
    );
    client.shutdown().context("shutdown")?;
    let t = Instant::now();
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .ok_or_else(|| anyhow!("the VM did not stop after Shutdown"))?;
    println!();
    println!(
        "VM shut down in {:.0} ms, vessel-vmm exit status {status}",
        t.elapsed().as_secs_f64() * 1000.0
    );
    if !status.success() {
        bail!("vessel-vmm exited with {status}: {}", vm.stderr());
    }
    Ok(())
}

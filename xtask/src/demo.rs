//! `cargo xtask demo`: install what is missing, build everything, make a
//! small OCI bundle (a static busybox root file system) and run it through
//! `vessel run`, the way a user of runc would: the container prints
//! `uname -a`, lists `/` and cats `/etc/os-release`, all inside its microVM.
//!
//! The VM template lives in `target/vessel/demo/templates`, so only the
//! first demo on a machine pays for the cold boot.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use crate::build;

/// What the container runs.
const SCRIPT: &str = "echo '$ uname -a'; uname -a; \
                      echo; echo '$ ls /'; ls /; \
                      echo; echo '$ cat /etc/os-release'; cat /etc/os-release";

/// The demo image's `/etc/os-release`: the file the container cats, so the
/// output shows it came from the bundle, not from the host.
const OS_RELEASE: &str = "NAME=\"vessel demo\"\nID=vessel-demo\n\
                          PRETTY_NAME=\"vessel demo image (static busybox)\"\n";

pub fn run(root: &Path) -> Result<()> {
    crate::kernel::install_missing(&["busybox-static"], "busybox for the demo image")?;
    let a = build::all(root)?;
    ensure!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: vessel needs KVM"
    );
    let vessel = root.join("target/release/vessel");
    let dir = root.join("target/vessel/demo");
    let bundle = dir.join("bundle");
    make_bundle(&bundle)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, a.vessel_config(&dir.join("templates"), ""))
        .context("writing the demo's config.toml")?;

    let id = format!("demo-{}", std::process::id());
    let first = !dir.join("templates").exists();
    println!(
        "$ vessel --root {root} --config {config} run --bundle {bundle} {id}",
        root = dir.join("root").display(),
        config = config.display(),
        bundle = bundle.display(),
    );
    if first {
        println!("(first run on this machine: builds the VM template with one cold boot)");
    }
    println!();
    let t = Instant::now();
    let status = Command::new(&vessel)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--config")
        .arg(&config)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .status()
        .with_context(|| format!("running {}", vessel.display()))?;
    let took = t.elapsed();
    println!();
    if !status.success() {
        bail!("vessel run exited with {status}");
    }
    println!(
        "the container ran in its own microVM; `vessel run` took {:.2} s{}",
        took.as_secs_f64(),
        if first {
            " (template build included)"
        } else {
            " (restored from the template)"
        }
    );
    Ok(())
}

/// A bundle at `bundle`: `rootfs/` with static busybox and its applets,
/// and runc's default `config.json` (from `vessel spec`'s generator) running
/// [`SCRIPT`] without a terminal.
fn make_bundle(bundle: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let rootfs = bundle.join("rootfs");
    if bundle.exists() {
        std::fs::remove_dir_all(bundle)
            .with_context(|| format!("removing the old {}", bundle.display()))?;
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).with_context(|| format!("creating /{d}"))?;
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).context("copying /bin/busybox")?;
    for applet in ["sh", "echo", "uname", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .with_context(|| format!("linking {applet}"))?;
    }
    std::fs::write(rootfs.join("etc/os-release"), OS_RELEASE).context("writing os-release")?;
    let mut spec = vessel_shim::spec::default_spec();
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["sh", "-c", SCRIPT]);
    spec["hostname"] = json!("vessel-demo");
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).context("serializing config.json")?,
    )
    .context("writing config.json")
}

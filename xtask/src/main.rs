//! `cargo xtask`: build orchestration for vessel.
//!
//! ```text
//! cargo xtask kernel       build (or reuse the cached) guest kernel
//! cargo xtask initramfs    build the static agent and the initramfs
//! cargo xtask build        kernel + initramfs + release binaries
//! cargo xtask demo         build everything and boot a microVM
//! cargo xtask test         build everything and run the whole test suite
//! cargo xtask lint         rustfmt --check and clippy -D warnings
//! cargo xtask bench boot [N [CMDLINE]]   cold-boot N times and print the median breakdown
//! cargo xtask bench profile [CMDLINE]    one boot with the rip sampler, top kernel functions
//! ```

mod bench;
mod build;
mod demo;
mod initramfs;
mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <kernel|initramfs|build|demo|test|lint|bench [boot]>";

fn main() {
    if let Err(e) = run() {
        let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
        eprintln!("xtask: error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("kernel") => {
            let path = kernel::build(&root)?;
            println!("{}", path.display());
        }
        Some("initramfs") => {
            let path = build::initramfs(&root)?;
            println!("{}", path.display());
        }
        Some("build") => {
            let a = build::all(&root)?;
            println!("vmm:       {}", a.vmm.display());
            println!("kernel:    {}", a.kernel.display());
            println!("initramfs: {}", a.initrd.display());
        }
        Some("demo") => demo::run(&root)?,
        Some("test") => test(&root, &args[1..])?,
        Some("lint") => lint(&root)?,
        Some("bench") => bench::run(&root, &args[1..])?,
        Some("-h" | "--help" | "help") | None => println!("{USAGE}"),
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
    Ok(())
}

/// The workspace root (xtask lives in `<root>/xtask`).
fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Runs `cmd`, failing with its description if it does not exit 0.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo xtask test`: build the artifacts, then run every test of the workspace.
fn test(root: &Path, extra: &[String]) -> Result<()> {
    let a = build::all(root)?;
    if !Path::new("/dev/kvm").exists() && std::env::var("VESSEL_SKIP_KVM").as_deref() != Ok("1") {
        bail!("/dev/kvm is missing: the end-to-end tests boot real microVMs (set VESSEL_SKIP_KVM=1 to skip them explicitly)");
    }
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--all-targets"])
        .args(extra)
        .env("VESSEL_VMM", &a.vmm)
        .env("VESSEL_KERNEL", &a.kernel)
        .env("VESSEL_INITRD", &a.initrd);
    run_cmd(&mut cmd)
}

/// `cargo xtask lint`: formatting and clippy, warnings are errors.
fn lint(root: &Path) -> Result<()> {
    run_cmd(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    run_cmd(cargo().current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

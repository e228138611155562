//! `cargo xtask`: build orchestration for vessel.
//!
//! ```text
//! cargo xtask kernel       build (or reuse the cached) guest kernel
//! cargo xtask initramfs    build the static agent and the initramfs
//! cargo xtask build        kernel + initramfs + release binaries
//! cargo xtask install [--prefix P]   install binaries and guest artifacts (default /usr/local)
//! cargo xtask demo         build everything and boot a microVM
//! cargo xtask test [ARGS]  build everything and run the whole test suite
//!                          (or the targets ARGS select: `--test cli_lifecycle`)
//! cargo xtask lint         rustfmt --check and clippy -D warnings
//! cargo xtask bench boot [N [CMDLINE]]   cold-boot N times and print the median breakdown
//! cargo xtask bench profile [CMDLINE]    one boot with the rip sampler, top kernel functions
//! cargo xtask bench profile run          rip profile of one `vessel run true` (template clone)
//! cargo xtask bench profile exec         rip profile of one `vessel exec ID true`, exec window only
//! cargo xtask bench profile steps        the guest's step timeline of one create + start (vessel-step)
//! cargo xtask bench restore [N]          template restore to agent ready vs a cold boot
//! cargo xtask bench density [N]          N idle sandboxes: memory, idle CPU, start slowdown
//! cargo xtask bench run [N]              run, create, start, exec: vessel vs runc, and 10 concurrent
//! cargo xtask bench floor [BUDGET_MS]    syscall, faults, FUSE, fork, exec in a container vs the host
//! cargo xtask bench fs [MiB]             file read throughput: guest DAX, guest no DAX, host
//! cargo xtask bench podman [N]           `podman run --rm IMG true`, vessel vs runc, same podman
//! cargo xtask bench engines [N]          podman, docker and ctr `run --rm true`: vessel vs runc, one run
//! cargo xtask bench net [SECONDS]       iperf3 both ways and ping, container <-> bridge: vessel vs runc
//! cargo xtask bench shim [N]            containerd: `ctr run --rm true` and CRI pods of 1 and 3, shim v2 vs runc
//! ```

mod bench;
mod bench_engines;
mod bench_floor;
mod bench_fs;
mod bench_net;
mod bench_podman;
mod bench_profile;
mod bench_run;
mod bench_shim;
mod build;
mod demo;
mod initramfs;
mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <kernel|initramfs|build|install [--prefix P]|demo|test|lint|bench [boot|profile|restore|density|run|floor|fs|podman|engines|net|shim]>";

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
        Some("install") => install(&root, &args[1..])?,
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

/// `cargo xtask test [CARGO TEST ARGS]`: build the artifacts, then run every
/// test of the workspace, or only the targets the extra arguments select
/// (`--test cli_lifecycle`, `-p vessel-agent --lib`, ...).
fn test(root: &Path, extra: &[String]) -> Result<()> {
    let a = build::all(root)?;
    if !Path::new("/dev/kvm").exists() && std::env::var("VESSEL_SKIP_KVM").as_deref() != Ok("1") {
        bail!("/dev/kvm is missing: the end-to-end tests boot real microVMs (set VESSEL_SKIP_KVM=1 to skip them explicitly)");
    }
    let mut cmd = cargo();
    // Every test file runs even after one fails, so a failure does not
    // hide the others' results.
    cmd.current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"]);
    if !selects_targets(extra) {
        cmd.arg("--all-targets");
    }
    cmd.args(extra)
        .env("VESSEL_VMM", &a.vmm)
        .env("VESSEL_KERNEL", &a.kernel)
        .env("VESSEL_INITRD", &a.initrd);
    run_cmd(&mut cmd)
}

/// Whether cargo test arguments name their own targets: `--all-targets` would
/// widen the selection back to everything.
fn selects_targets(args: &[String]) -> bool {
    const FLAGS: [&str; 10] = [
        "--test",
        "--tests",
        "--lib",
        "--bin",
        "--bins",
        "--example",
        "--examples",
        "--bench",
        "--benches",
        "--doc",
    ];
    args.iter().take_while(|a| *a != "--").any(|a| {
        FLAGS
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
    })
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

/// `cargo xtask install [--prefix P]`: builds everything and installs the
/// layout `vessel` expects by default: `P/bin/{vessel,vessel-vmm,containerd-shim-vessel-v2}` and
/// `P/share/vessel/{vmlinux,initramfs.cpio}` (P defaults to /usr/local).
/// Files are replaced atomically (copy next to the target, then rename), so
/// a running VMM or container keeps its old files.
fn install(root: &Path, args: &[String]) -> Result<()> {
    let prefix = match args {
        [] => PathBuf::from("/usr/local"),
        [flag, p] if flag == "--prefix" => PathBuf::from(p),
        _ => bail!("usage: cargo xtask install [--prefix P]"),
    };
    let a = build::all(root)?;
    let bin = prefix.join("bin");
    let share = prefix.join("share/vessel");
    let items = [
        (a.vmm.clone(), bin.join("vessel-vmm"), 0o755),
        (
            root.join("target/release/vessel"),
            bin.join("vessel"),
            0o755,
        ),
        (
            root.join("target/release/containerd-shim-vessel-v2"),
            bin.join("containerd-shim-vessel-v2"),
            0o755,
        ),
        (a.kernel.clone(), share.join("vmlinux"), 0o644),
        (a.initrd.clone(), share.join("initramfs.cpio"), 0o644),
    ];
    for (from, to, mode) in items {
        let dir = to.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = to.with_extension("xtask-tmp");
        std::fs::copy(&from, &tmp)
            .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        std::fs::rename(&tmp, &to).with_context(|| format!("installing {}", to.display()))?;
        println!("installed {}", to.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::selects_targets;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn target_flags_disable_all_targets() {
        assert!(!selects_targets(&[]));
        assert!(!selects_targets(&args(&["--", "--nocapture"])));
        assert!(!selects_targets(&args(&["-p", "vessel-agent"])));
        assert!(selects_targets(&args(&["--test", "cli_lifecycle"])));
        assert!(selects_targets(&args(&[
            "--test=boot",
            "--",
            "--nocapture"
        ])));
        assert!(selects_targets(&args(&["-p", "vessel-agent", "--lib"])));
        // After `--` the words belong to the test binary.
        assert!(!selects_targets(&args(&["--", "--test"])));
    }
}

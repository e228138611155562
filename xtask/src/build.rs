//! Building every artifact a microVM needs.

use std::path::{Path, PathBuf};

use anyhow::Result;
use vessel_tests::Artifacts;

use crate::{cargo, initramfs, kernel, run_cmd};

/// Builds the static agent and the initramfs; returns the initramfs path.
pub fn initramfs(root: &Path) -> Result<PathBuf> {
    let agent = initramfs::build_agent(root)?;
    let out = root.join("target/vessel/initramfs.cpio");
    initramfs::build(root, &agent, &out)?;
    Ok(out)
}

/// Builds kernel, initramfs and the release host binaries.
pub fn all(root: &Path) -> Result<Artifacts> {
    let kernel = kernel::build(root)?;
    let initrd = initramfs(root)?;
    run_cmd(cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "vessel-vmm",
        "-p",
        "vessel-shim",
        "-p",
        "vessel-shim-v2",
    ]))?;
    Ok(Artifacts {
        vmm: root.join("target/release/vessel-vmm"),
        kernel,
        initrd,
    })
}

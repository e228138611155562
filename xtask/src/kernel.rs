//! The guest kernel: Debian's `linux-source-6.12`, `tinyconfig` plus
//! `guest-kernel/config.fragment`, patched with `guest-kernel/patches/*.patch`,
//! built as an uncompressed ELF `vmlinux`.
//!
//! Builds are cached outside the work tree (`$VESSEL_CACHE_DIR`, default
//! `~/.cache/vessel`) under a key hashing the source package version, the
//! fragment, every patch and [`RECIPE_VERSION`], so fresh clones on the same
//! machine (CI) reuse them; the result is also copied to
//! `target/guest-kernel/vmlinux`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::run_cmd;

/// Bump when the build steps change in a way that changes the output.
const RECIPE_VERSION: &str = "1";
const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
const BUILD_PACKAGES: &[&str] = &[
    "linux-source-6.12",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the source package and build tools with apt-get when missing.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let install = |update: bool| -> Result<()> {
        if update {
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        }
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    install(false).or_else(|_| install(true))
}

fn source_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .output()
        .context("cannot run dpkg-query")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if v.is_empty() {
        bail!("{SOURCE_PACKAGE} is not installed");
    }
    Ok(v)
}

fn patches(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("guest-kernel/patches");
    let mut list: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    list.sort();
    Ok(list)
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VESSEL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/vessel")
}

/// The options the fragment sets to `y`: each must be set after olddefconfig.
pub fn required_options(fragment: &str) -> Vec<String> {
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
        .map(|l| l.trim_end_matches("=y").to_string())
        .collect()
}

/// Required options missing from a `.config`.
pub fn missing_options(required: &[String], config: &str) -> Vec<String> {
    required
        .iter()
        .filter(|o| !config.lines().any(|l| l.trim() == format!("{o}=y")))
        .cloned()
        .collect()
}

/// Builds (or returns the cached) guest kernel; returns the path of the
/// uncompressed ELF vmlinux under `target/guest-kernel/`.
pub fn build(root: &Path) -> Result<PathBuf> {
    ensure_packages()?;
    let fragment_path = root.join("guest-kernel/config.fragment");
    let fragment = std::fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let patch_files = patches(root)?;
    let version = source_version()?;

    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update(version.as_bytes());
    h.update(fragment.as_bytes());
    for p in &patch_files {
        h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    let key: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();

    let cache = cache_dir().join("guest-kernel");
    let cached = cache.join(format!("vmlinux-{key}"));
    let out_dir = root.join("target/guest-kernel");
    let out = out_dir.join("vmlinux");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    if !cached.exists() {
        eprintln!("xtask: building guest kernel {version} (key {key}); this takes several minutes");
        let start = std::time::Instant::now();
        compile(
            &cache,
            &key,
            &fragment_path,
            &fragment,
            &patch_files,
            &cached,
        )?;
        eprintln!(
            "xtask: guest kernel built in {:.0} s",
            start.elapsed().as_secs_f64()
        );
    }
    let tmp = out_dir.join("vmlinux.tmp");
    std::fs::copy(&cached, &tmp).with_context(|| format!("copying {}", cached.display()))?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

fn compile(
    cache: &Path,
    key: &str,
    fragment_path: &Path,
    fragment: &str,
    patch_files: &[PathBuf],
    cached: &Path,
) -> Result<()> {
    let work = cache.join(format!("build-{key}"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    run_cmd(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(&work),
    )?;
    let src = work.join("linux-source-6.12");
    for p in patch_files {
        run_cmd(
            Command::new("patch")
                .args(["-p1", "--forward", "-s", "-i"])
                .arg(p)
                .current_dir(&src),
        )
        .with_context(|| format!("applying {}", p.display()))?;
    }
    run_cmd(Command::new("make").arg("tinyconfig").current_dir(&src))?;
    run_cmd(
        Command::new("scripts/kconfig/merge_config.sh")
            .args(["-m", ".config"])
            .arg(fragment_path)
            .current_dir(&src),
    )?;
    run_cmd(Command::new("make").arg("olddefconfig").current_dir(&src))?;
    let config = std::fs::read_to_string(src.join(".config")).context("reading .config")?;
    let missing = missing_options(&required_options(fragment), &config);
    if !missing.is_empty() {
        bail!("kernel options required by guest-kernel/config.fragment are not set after olddefconfig: {}", missing.join(" "));
    }
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    run_cmd(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .arg("vmlinux")
            .current_dir(&src),
    )?;
    let tmp = cached.with_extension("tmp");
    std::fs::copy(src.join("vmlinux"), &tmp).context("copying vmlinux")?;
    std::fs::copy(src.join(".config"), cached.with_extension("config"))
        .context("copying .config")?;
    std::fs::rename(&tmp, cached)?;
    // The tree is big (about 1.5 GiB with objects); only the outputs are kept.
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_and_missing() {
        let frag = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=32\n";
        let req = required_options(frag);
        assert_eq!(req, vec!["CONFIG_A".to_string(), "CONFIG_C".to_string()]);
        let cfg = "CONFIG_A=y\nCONFIG_CC=y\n";
        assert_eq!(missing_options(&req, cfg), vec!["CONFIG_C".to_string()]);
    }

    #[test]
    fn shipped_fragment_has_what_design_requires() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let frag = std::fs::read_to_string(root.join("guest-kernel/config.fragment")).unwrap();
        let req = required_options(&frag);
        for o in [
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_VIRTIO_FS",
        ] {
            assert!(req.iter().any(|r| r == o), "{o} missing");
        }
    }
}

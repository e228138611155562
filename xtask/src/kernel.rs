//! The guest kernel: Debian's `linux-source-6.12`, configured as
//! `make tinyconfig` plus `guest-kernel/config.fragment`, patched with
//! `guest-kernel/patches/*.patch`, built as an uncompressed ELF `vmlinux`.
//!
//! Everything lives under `target/guest-kernel/`, outside git:
//!
//! ```text
//! src-<version>/linux-source-6.12/  pristine source, unpacked once per package version
//! build-<version>/tree/             hard-link copy of the source with our patches applied
//! build-<version>/obj/              kbuild output (O=), kept for incremental rebuilds
//! vmlinux-<key>, config-<key>       finished builds, one per cache key
//! vmlinux                           hard link to the build returned last
//! ```
//!
//! `<key>` is 16 hex digits of a SHA-256 over [`RECIPE_VERSION`], the source
//! package version, the fragment and every patch (name and contents). A build
//! is published by renaming into `vmlinux-<key>`, so an interrupted build never
//! looks cached, and a second call with the same inputs returns without
//! running make. Concurrent builds are serialized by a lock file.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

/// Bump when the build steps change in a way that changes the output.
const RECIPE_VERSION: &str = "2";
/// The Debian package that ships the source tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The top-level directory inside [`SOURCE_TARBALL`].
const SOURCE_TOP_DIR: &str = "linux-source-6.12";
/// Passed to every make call: a 64-bit tinyconfig, whatever `uname -m` says.
const ARCH: &str = "x86_64";
/// Everything the build needs from the package archive.
const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];
/// Environment variables that would change what kbuild produces behind the
/// cache key's back (toolchain selection, extra flags, an outer make's jobserver).
const SCRUBBED_ENV: &[&str] = &[
    "ARCH",
    "CROSS_COMPILE",
    "LLVM",
    "KCFLAGS",
    "KCPPFLAGS",
    "KAFLAGS",
    "KBUILD_OUTPUT",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
];

/// Builds (or returns the cached) guest kernel; returns the path to the uncompressed ELF vmlinux.
pub fn build(workspace_root: &Path) -> Result<PathBuf> {
    let root = std::path::absolute(workspace_root)
        .with_context(|| format!("resolving {}", workspace_root.display()))?;
    let version = ensure_packages()?;
    let inputs = Inputs::read(&root, version)?;
    let key = inputs.cache_key();

    let dir = root.join("target/guest-kernel");
    let cached = dir.join(format!("vmlinux-{key}"));
    if !cached.is_file() {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _lock = lock(&dir)?;
        // Another process may have built it while we waited for the lock.
        if !cached.is_file() {
            build_uncached(&dir, &inputs, &key, &cached)?;
        }
    }
    publish_stable(&dir, &cached)
}

/// What the cache key covers, read once.
#[derive(Clone)]
struct Inputs {
    /// `dpkg-query -W -f='${Version}' linux-source-6.12`.
    version: String,
    fragment_path: PathBuf,
    fragment: String,
    /// `guest-kernel/patches/*.patch` in name order.
    patches: Vec<Patch>,
}

#[derive(Clone)]
struct Patch {
    path: PathBuf,
    name: String,
    contents: Vec<u8>,
}

impl Inputs {
    fn read(root: &Path, version: String) -> Result<Self> {
        let fragment_path = root.join("guest-kernel/config.fragment");
        let fragment = fs::read_to_string(&fragment_path)
            .with_context(|| format!("reading {}", fragment_path.display()))?;
        let patch_dir = root.join("guest-kernel/patches");
        let mut patches = Vec::new();
        let entries =
            fs::read_dir(&patch_dir).with_context(|| format!("reading {}", patch_dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", patch_dir.display()))?
                .path();
            if path.extension().is_none_or(|e| e != "patch") {
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let contents =
                fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            patches.push(Patch {
                path,
                name,
                contents,
            });
        }
        patches.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            version,
            fragment_path,
            fragment,
            patches,
        })
    }

    /// 16 hex digits of a SHA-256 over everything that determines the output.
    /// Each field is length-prefixed so that no two input sets hash alike.
    fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(RECIPE_VERSION.as_bytes());
        field(self.version.as_bytes());
        field(self.fragment.as_bytes());
        for p in &self.patches {
            field(p.name.as_bytes());
            field(&p.contents);
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Installs whatever of [`BUILD_PACKAGES`] is missing (apt does not run when
/// all are present) and returns the version of the source package.
fn ensure_packages() -> Result<String> {
    install_missing(BUILD_PACKAGES, "the guest kernel build dependencies")?;
    let version = installed_packages(&[SOURCE_PACKAGE])?
        .remove(SOURCE_PACKAGE)
        .with_context(|| format!("{SOURCE_PACKAGE} is still not installed"))?;
    ensure!(
        Path::new(SOURCE_TARBALL).is_file(),
        "{SOURCE_PACKAGE} {version} is installed but {SOURCE_TARBALL} is missing"
    );
    Ok(version)
}

/// Installs those of the Debian `packages` that are missing (`what` names
/// them in messages); apt does not run when all are present. A failed
/// install is retried once after `apt-get update` (a new machine has no
/// package lists).
pub(crate) fn install_missing(packages: &[&str], what: &str) -> Result<()> {
    let installed = installed_packages(packages)?;
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed.contains_key(*p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    if apt_install(&missing).is_err() {
        eprintln!("xtask: apt-get install failed; running apt-get update and retrying");
        run(apt_get().arg("update"))?;
        apt_install(&missing).with_context(|| {
            format!(
                "installing {what}; as root, run: apt-get install {}",
                missing.join(" ")
            )
        })?;
    }
    let installed = installed_packages(&missing)?;
    let still: Vec<&str> = missing
        .into_iter()
        .filter(|p| !installed.contains_key(*p))
        .collect();
    ensure!(still.is_empty(), "{} still not installed", still.join(" "));
    Ok(())
}

/// The installed packages among `names`, with their versions (one dpkg-query).
fn installed_packages(names: &[&str]) -> Result<HashMap<String, String>> {
    // dpkg-query exits 1 when some name is unknown; the known ones are still listed.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package}\t${db:Status-Status}\t${Version}\n")
        .args(names)
        .output()
        .context("cannot run dpkg-query (the guest kernel build needs a Debian host)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            match (f.next(), f.next(), f.next()) {
                (Some(name), Some("installed"), Some(version)) => {
                    Some((name.to_string(), version.to_string()))
                }
                _ => None,
            }
        })
        .collect())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    // Wait for a concurrent apt/dpkg run instead of failing on its lock.
    cmd.args(["-o", "DPkg::Lock::Timeout=900"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run(apt_get()
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages))
}

/// Takes the build lock of `dir`, waiting (and saying so) if another build holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            eprintln!("xtask: waiting for another guest kernel build to finish");
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    Ok(file)
}

/// Configures, checks and compiles the kernel, then publishes it as `cached`.
fn build_uncached(dir: &Path, inputs: &Inputs, key: &str, cached: &Path) -> Result<()> {
    let shown = dir.display().to_string();
    ensure!(
        !shown.contains(char::is_whitespace),
        "kbuild cannot build in a path with spaces: {shown}"
    );
    let start = Instant::now();
    eprintln!(
        "xtask: building the guest kernel from {SOURCE_PACKAGE} {} (key {key}); \
         a fresh build takes several minutes",
        inputs.version
    );
    let tag = sanitize(&inputs.version);
    let source = unpack_source(dir, &tag)?;
    let build_dir = dir.join(format!("build-{tag}"));
    let tree = build_dir.join("tree");
    let obj = build_dir.join("obj");
    prepare_tree(&source, &tree, &inputs.patches)?;
    fs::create_dir_all(&obj).with_context(|| format!("creating {}", obj.display()))?;

    // tinyconfig, our fragment on top, then olddefconfig fills in the
    // defaults of everything the fragment made visible.
    run(make(&tree, &obj).arg("tinyconfig"))?;
    let config_path = obj.join(".config");
    let tiny = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    fs::write(&config_path, merge_fragment(&tiny, &inputs.fragment))
        .with_context(|| format!("writing {}", config_path.display()))?;
    run(make(&tree, &obj).arg("olddefconfig"))?;
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let unmet = unmet_options(&inputs.fragment, &config);
    if !unmet.is_empty() {
        bail!(
            "after `make olddefconfig`, {} options of {} are not as asked \
             (a dependency is missing, or something selects them; see {}):\n  {}",
            unmet.len(),
            inputs.fragment_path.display(),
            config_path.display(),
            unmet.join("\n  ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run(make(&tree, &obj).arg(format!("-j{jobs}")).arg("vmlinux"))?;

    // Publish: copy next to the final name, then rename, so that a
    // half-written file is never taken for a finished build.
    let config_out = dir.join(format!("config-{key}"));
    fs::copy(&config_path, &config_out)
        .with_context(|| format!("copying .config to {}", config_out.display()))?;
    // System.map, for symbolizing guest addresses (`cargo xtask bench profile`).
    let map_out = dir.join(format!("System.map-{key}"));
    fs::copy(obj.join("System.map"), &map_out)
        .with_context(|| format!("copying System.map to {}", map_out.display()))?;
    let tmp = dir.join(format!(".vmlinux-{key}.{}.tmp", std::process::id()));
    let built = obj.join("vmlinux");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, cached).with_context(|| format!("renaming to {}", cached.display()))?;

    let size = fs::metadata(cached)
        .with_context(|| format!("reading {}", cached.display()))?
        .len();
    eprintln!(
        "xtask: guest kernel {} built in {:.0} s: {:.1} MiB ({size} bytes)",
        cached.display(),
        start.elapsed().as_secs_f64(),
        size as f64 / (1024.0 * 1024.0),
    );
    Ok(())
}

/// Unpacks [`SOURCE_TARBALL`] once per package version into `src-<tag>/` and
/// removes the trees of other versions. Returns the source directory.
fn unpack_source(dir: &Path, tag: &str) -> Result<PathBuf> {
    let src = dir.join(format!("src-{tag}"));
    let top = src.join(SOURCE_TOP_DIR);
    if top.join("Makefile").is_file() {
        return Ok(top);
    }
    // Trees of other versions and interrupted unpacks are only disk space.
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() && (name.starts_with("src-") || name.starts_with("build-")) {
            eprintln!("xtask: removing stale {}", path.display());
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let tmp = dir.join(format!("src-{tag}.tmp"));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!("xtask: unpacking {SOURCE_TARBALL}");
    run(Command::new("tar")
        .arg("-xf")
        .arg(SOURCE_TARBALL)
        .arg("-C")
        .arg(&tmp))?;
    ensure!(
        tmp.join(SOURCE_TOP_DIR).join("Makefile").is_file(),
        "{SOURCE_TARBALL} does not contain {SOURCE_TOP_DIR}/Makefile"
    );
    fs::rename(&tmp, &src).with_context(|| format!("renaming to {}", src.display()))?;
    Ok(top)
}

/// Recreates `tree` as a hard-link copy of the pristine `source` (seconds, no
/// extra disk) and applies the patches. GNU patch writes a new file and
/// renames it over the old one, so the pristine tree is never modified.
/// Unchanged files keep their mtimes, so kbuild's incremental build in the
/// persistent object directory only recompiles what the patches touch.
fn prepare_tree(source: &Path, tree: &Path, patches: &[Patch]) -> Result<()> {
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    if let Some(parent) = tree.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    run(Command::new("cp").arg("-al").arg(source).arg(tree))?;
    for p in patches {
        run(Command::new("patch")
            .args(["-p1", "--forward", "--batch", "--quiet", "-i"])
            .arg(&p.path)
            .current_dir(tree))
        .with_context(|| format!("applying {}", p.path.display()))?;
    }
    Ok(())
}

/// `make -C <tree> O=<obj> ARCH=x86_64` with a scrubbed environment.
fn make(tree: &Path, obj: &Path) -> Command {
    let mut cmd = Command::new("make");
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.arg("-C")
        .arg(tree)
        .arg(format!("O={}", obj.display()))
        .arg(format!("ARCH={ARCH}"))
        // `uname -v` shows these; keep the builder's user and host names out.
        .env("KBUILD_BUILD_USER", "vessel")
        .env("KBUILD_BUILD_HOST", "vessel");
    cmd
}

/// Points the stable `vmlinux` name at `cached` (a hard link, so it is a
/// real file; a copy where links are not possible) and returns it.
fn publish_stable(dir: &Path, cached: &Path) -> Result<PathBuf> {
    // The matching System.map under a stable name too (best effort: builds
    // cached before it was kept have none).
    if let Some(key) = cached
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinux-"))
    {
        let map = dir.join(format!("System.map-{key}"));
        if map.is_file() {
            let tmp = dir.join(format!(".System.map.{}.tmp", std::process::id()));
            let _ = fs::remove_file(&tmp);
            if fs::hard_link(&map, &tmp).is_ok() {
                fs::rename(&tmp, dir.join("System.map"))
                    .with_context(|| format!("renaming {}", tmp.display()))?;
            }
        }
    }
    let stable = dir.join("vmlinux");
    let inode = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino()));
    if inode(&stable).ok()
        == Some(inode(cached).with_context(|| format!("reading {}", cached.display()))?)
    {
        // Already linked (and renaming a link over itself would do nothing).
        return Ok(stable);
    }
    let tmp = dir.join(format!(".vmlinux.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(cached, &tmp).is_err() {
        fs::copy(cached, &tmp).with_context(|| format!("copying {}", cached.display()))?;
    }
    fs::rename(&tmp, &stable).with_context(|| format!("renaming to {}", stable.display()))?;
    Ok(stable)
}

/// Runs `cmd`, sending its stdout to our stderr (stdout is for results).
fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run {desc}"))?;
    ensure!(status.success(), "{desc} failed with {status}");
    Ok(())
}

/// A package version as a file-name component (`1:6.12.1-1~deb12u1` → `1_6.12.1-1~deb12u1`).
fn sanitize(version: &str) -> String {
    version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+-.~_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What a config line says about a symbol: `Some((name, value))`, where the
/// value of `# CONFIG_X is not set` is `"n"`; `None` for other lines.
fn parse_config_line(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return name.starts_with("CONFIG_").then_some((name, "n"));
    }
    let (name, value) = line.split_once('=')?;
    name.starts_with("CONFIG_").then_some((name, value))
}

/// `config` with every symbol the fragment sets replaced by the fragment's
/// line (what `merge_config.sh -m` does).
fn merge_fragment(config: &str, fragment: &str) -> String {
    let ours: Vec<&str> = fragment
        .lines()
        .filter_map(parse_config_line)
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(config.len() + fragment.len());
    for line in config.lines() {
        if !parse_config_line(line).is_some_and(|(name, _)| ours.contains(&name)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# vessel: guest-kernel/config.fragment\n");
    for line in fragment.lines() {
        if parse_config_line(line).is_some() {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

/// Fragment lines the final `config` does not honour: every `CONFIG_X=v` must
/// be there with the same value, every `# CONFIG_X is not set` must be off.
fn unmet_options(fragment: &str, config: &str) -> Vec<String> {
    let actual: HashMap<&str, &str> = config.lines().filter_map(parse_config_line).collect();
    let shown = |v: &str| {
        if v == "n" {
            "not set".to_string()
        } else {
            format!("={v}")
        }
    };
    fragment
        .lines()
        .filter_map(parse_config_line)
        .filter_map(|(name, wanted)| {
            let got = actual.get(name).copied().unwrap_or("n");
            (got != wanted).then(|| format!("{name}: wanted {}, got {}", shown(wanted), shown(got)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAGMENT: &str = "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=32\n";

    fn workspace_root() -> Result<&'static Path> {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("no workspace root")
    }

    #[test]
    fn merge_replaces_and_appends() {
        let base = "CONFIG_A=m\nCONFIG_B=y\nCONFIG_KEEP=y\n# CONFIG_N is not set\n";
        let merged = merge_fragment(base, FRAGMENT);
        let lines: Vec<&str> = merged.lines().collect();
        assert_eq!(
            lines,
            [
                "CONFIG_KEEP=y",
                "# vessel: guest-kernel/config.fragment",
                "CONFIG_A=y",
                "# CONFIG_B is not set",
                "CONFIG_N=32",
            ]
        );
    }

    #[test]
    fn unmet_lists_every_difference() {
        assert!(unmet_options(FRAGMENT, "CONFIG_A=y\nCONFIG_N=32\n").is_empty());
        assert!(
            unmet_options(FRAGMENT, "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=32").is_empty()
        );
        assert_eq!(
            unmet_options(FRAGMENT, "CONFIG_B=y\nCONFIG_N=64\n"),
            [
                "CONFIG_A: wanted =y, got not set",
                "CONFIG_B: wanted not set, got =y",
                "CONFIG_N: wanted =32, got =64",
            ]
        );
    }

    #[test]
    fn key_covers_every_input() {
        let patch = |contents: &[u8]| Patch {
            path: PathBuf::new(),
            name: "0001.patch".into(),
            contents: contents.to_vec(),
        };
        let base = Inputs {
            version: "6.12.1-1".into(),
            fragment_path: PathBuf::new(),
            fragment: "CONFIG_A=y\n".into(),
            patches: vec![patch(b"x")],
        };
        let key = base.cache_key();
        assert_eq!(key.len(), 16);
        assert_eq!(key, base.clone().cache_key());
        let changed = [
            Inputs {
                version: "6.12.2-1".into(),
                ..base.clone()
            },
            Inputs {
                fragment: "CONFIG_A=m\n".into(),
                ..base.clone()
            },
            Inputs {
                patches: vec![],
                ..base.clone()
            },
            Inputs {
                patches: vec![patch(b"y")],
                ..base.clone()
            },
        ];
        for c in &changed {
            assert_ne!(c.cache_key(), key);
        }
    }

    #[test]
    fn sanitize_versions() {
        assert_eq!(sanitize("6.12.117-1~deb12u1"), "6.12.117-1~deb12u1");
        assert_eq!(sanitize("1:6.12/x"), "1_6.12_x");
    }

    /// The shipped fragment asks for what DESIGN.md requires.
    #[test]
    fn shipped_fragment_has_required_options() -> Result<()> {
        let fragment = fs::read_to_string(workspace_root()?.join("guest-kernel/config.fragment"))?;
        let set: Vec<&str> = fragment
            .lines()
            .filter_map(parse_config_line)
            .filter(|(_, v)| *v == "y")
            .map(|(n, _)| n)
            .collect();
        let required = "64BIT SMP PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD \
            BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS TMPFS DEVTMPFS UNIX98_PTYS FUTEX EPOLL \
            SIGNALFD TIMERFD EVENTFD FHANDLE INOTIFY_USER FILE_LOCKING MULTIUSER SYSVIPC \
            POSIX_MQUEUE VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VSOCKETS VIRTIO_VSOCKETS \
            FUSE_FS VIRTIO_FS FS_DAX FUSE_DAX OVERLAY_FS NAMESPACES UTS_NS IPC_NS PID_NS NET_NS \
            USER_NS CGROUPS MEMCG CGROUP_PIDS CGROUP_SCHED CPUSETS SECCOMP SECCOMP_FILTER NET \
            INET IPV6 UNIX VIRTIO_NET KVM_GUEST PARAVIRT PVH VIRTIO_BALLOON PAGE_REPORTING \
            HW_RANDOM_VIRTIO X86_MPPARSE";
        for opt in required.split_whitespace() {
            let name = format!("CONFIG_{opt}");
            assert!(
                set.contains(&name.as_str()),
                "{name}=y missing from the fragment"
            );
        }
        Ok(())
    }

    /// Builds the real kernel: `cargo test -p xtask -- --ignored build_guest_kernel`.
    #[test]
    #[ignore = "builds a kernel: minutes, and root for apt if packages are missing"]
    fn build_guest_kernel() -> Result<()> {
        let root = workspace_root()?;
        let path = build(root)?;
        let start = Instant::now();
        assert_eq!(build(root)?, path);
        assert!(start.elapsed().as_secs() < 2, "the cached build ran again");
        Ok(())
    }
}

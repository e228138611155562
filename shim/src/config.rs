//! Runtime defaults: where the VMM, guest kernel and initramfs are, and how
//! big a sandbox is. Engines call `vessel` with runc's flags only, so these
//! come from a file: `--config PATH`, else `$VESSEL_CONFIG`, else
//! `/etc/vessel/config.toml` if it exists, else built-in defaults that
//! point next to the `vessel` binary (the layout `cargo xtask install`
//! writes: `PREFIX/bin/{vessel,vessel-vmm}`,
//! `PREFIX/share/vessel/{vmlinux,initramfs.cpio}`).
//!
//! ```toml
//! vmm = "/usr/local/bin/vessel-vmm"
//! kernel = "/usr/local/share/vessel/vmlinux"
//! initrd = "/usr/local/share/vessel/initramfs.cpio"
//! mem_mib = 128
//! vcpus = 1
//! templates = true
//! template_dir = "/var/lib/vessel/templates"
//! balloon = true
//! net_slots = 1       # network devices of a template VM (a sandbox with more interfaces is cold-booted)
//! net_offload = true  # virtio-net checksum/TSO offloads (off: for measurements)
//! run_dir = "/run/vessel-vm"   # sandbox sockets (keep it short: Unix socket paths)
//! guest_cmdline = "vessel.debug"  # appended to the guest kernel command line (part of the template key)
//! profile_dir = "/tmp/vessel-profiles"  # debugging: each VMM samples guest rip into DIR/<sandbox>.rip
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The system-wide configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/vessel/config.toml";
/// Environment variable naming a configuration file.
pub const CONFIG_ENV: &str = "VESSEL_CONFIG";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

/// The file's keys; all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    vmm: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    mem_mib: Option<u64>,
    vcpus: Option<u8>,
    templates: Option<bool>,
    template_dir: Option<PathBuf>,
    balloon: Option<bool>,
    rootfs_dax_mib: Option<u64>,
    net_slots: Option<u8>,
    net_offload: Option<bool>,
    run_dir: Option<PathBuf>,
    profile_dir: Option<PathBuf>,
    guest_cmdline: Option<String>,
}

/// Most network interfaces a sandbox can have.
pub const MAX_NET_SLOTS: u8 = 8;

/// Default `rootfs_dax_mib`: a DAX window for the root file system share.
/// Executables and libraries are then mapped from the host's page cache
/// instead of being copied through FUSE into the guest's: on PVM hosts,
/// where each FUSE round trip costs the guest ~20 ms of emulated kernel
/// time, `vessel run true` took a quarter less (`cargo xtask bench run`).
/// 64 MiB: 32 files (2 MiB ranges) mapped at once; the guest's page
/// structures for it take 1 MiB.
pub const DEFAULT_ROOTFS_DAX_MIB: u64 = 64;

/// Largest `rootfs_dax_mib` (the VMM's limit is 8x the guest's memory).
pub const MAX_ROOTFS_DAX_MIB: u64 = 64 << 10;

/// Effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `vessel-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Initramfs with the agent.
    pub initrd: PathBuf,
    /// Guest memory per sandbox.
    pub mem_mib: u64,
    /// vCPUs per sandbox.
    pub vcpus: u8,
    /// Start sandboxes from templates (snapshots) when possible.
    pub templates: bool,
    /// Where templates live.
    pub template_dir: PathBuf,
    /// Give sandboxes a balloon with free page reporting (memory the guest
    /// frees goes back to the host).
    pub balloon: bool,
    /// Size of the container root file system share's DAX window (MiB,
    /// a multiple of 2; 0: none). With a window the guest maps files from
    /// the host's page cache instead of copying them into its own.
    pub rootfs_dax_mib: u64,
    /// virtio-net devices (without a backend) in a template VM: a restored
    /// sandbox binds one per interface of its network namespace; one with
    /// more interfaces is cold-booted. Unused ones stay in the guest as
    /// links that are down.
    pub net_slots: u8,
    /// Offer checksum and segmentation offloads on virtio-net (the
    /// default; off only to measure what they bring).
    pub net_offload: bool,
    /// Where sandboxes keep their sockets ([`crate::state::Store::sandbox_dir`]).
    pub run_dir: PathBuf,
    /// Appended to the guest kernel's command line at a cold boot (so also
    /// part of every template built with it), e.g. `vessel.debug` for the
    /// agent's step timings on the console.
    pub guest_cmdline: String,
    /// Debugging: every VMM runs with `--profile-rip DIR/<sandbox>.rip`
    /// (guest rip sampled once per ms per vCPU, written when the VM stops;
    /// `cargo xtask bench profile-run` reads them).
    pub profile_dir: Option<PathBuf>,
    /// The file these came from, if any.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Built-in defaults relative to the directory holding the `vessel`
    /// binary (`PREFIX/bin`).
    pub fn defaults(bin_dir: &Path) -> Config {
        let prefix = bin_dir.parent().unwrap_or(Path::new("/usr/local"));
        let share = prefix.join("share/vessel");
        Config {
            vmm: bin_dir.join("vessel-vmm"),
            kernel: share.join("vmlinux"),
            initrd: share.join("initramfs.cpio"),
            mem_mib: 128,
            vcpus: 1,
            templates: true,
            template_dir: PathBuf::from("/var/lib/vessel/templates"),
            balloon: true,
            rootfs_dax_mib: DEFAULT_ROOTFS_DAX_MIB,
            net_slots: 1,
            net_offload: true,
            run_dir: PathBuf::from(crate::state::DEFAULT_RUN_DIR),
            profile_dir: None,
            guest_cmdline: String::new(),
            source: None,
        }
    }

    /// Finds and reads the configuration (see the module documentation).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
        let mut cfg = Config::defaults(&bin_dir);
        let path = match (explicit, std::env::var_os(CONFIG_ENV)) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(p)) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => Some(PathBuf::from(SYSTEM_CONFIG)).filter(|p| p.exists()),
        };
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            cfg.apply(&text, &path)?;
        }
        Ok(cfg)
    }

    /// Applies the keys of a TOML document read from `path`.
    pub fn apply(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("/"));
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        if let Some(p) = f.vmm {
            self.vmm = abs(p);
        }
        if let Some(p) = f.kernel {
            self.kernel = abs(p);
        }
        if let Some(p) = f.initrd {
            self.initrd = abs(p);
        }
        if let Some(p) = f.template_dir {
            self.template_dir = abs(p);
        }
        if let Some(p) = f.run_dir {
            let p = abs(p);
            // <run_dir>/<16 hex>/vsock.sock_NNNNN must fit in sun_path (108).
            if p.as_os_str().len() > 64 {
                return Err(ConfigError::Invalid(format!(
                    "run_dir {} is longer than 64 bytes: sandbox socket paths would not fit",
                    p.display()
                )));
            }
            self.run_dir = p;
        }
        if let Some(m) = f.mem_mib {
            if !(32..=1 << 20).contains(&m) {
                return Err(ConfigError::Invalid(format!(
                    "mem_mib must be between 32 and 1048576, got {m}"
                )));
            }
            self.mem_mib = m;
        }
        if let Some(v) = f.vcpus {
            if !(1..=32).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "vcpus must be between 1 and 32, got {v}"
                )));
            }
            self.vcpus = v;
        }
        if let Some(t) = f.templates {
            self.templates = t;
        }
        if let Some(b) = f.balloon {
            self.balloon = b;
        }
        if let Some(m) = f.rootfs_dax_mib {
            if m % 2 != 0 || m > MAX_ROOTFS_DAX_MIB {
                return Err(ConfigError::Invalid(format!(
                    "rootfs_dax_mib must be 0 or an even number up to {MAX_ROOTFS_DAX_MIB}, got {m}"
                )));
            }
            self.rootfs_dax_mib = m;
        }
        if let Some(n) = f.net_slots {
            if n > MAX_NET_SLOTS {
                return Err(ConfigError::Invalid(format!(
                    "net_slots must be at most {MAX_NET_SLOTS}, got {n}"
                )));
            }
            self.net_slots = n;
        }
        if let Some(o) = f.net_offload {
            self.net_offload = o;
        }
        if let Some(c) = f.guest_cmdline {
            if c.len() > 512 || c.contains(|ch: char| ch.is_ascii_control()) {
                return Err(ConfigError::Invalid(
                    "guest_cmdline must be at most 512 bytes on one line".into(),
                ));
            }
            self.guest_cmdline = c;
        }
        if let Some(p) = f.profile_dir {
            self.profile_dir = Some(abs(p));
        }
        self.source = Some(path.to_path_buf());
        Ok(())
    }

    /// Checks that the guest artifacts exist; the error says how to get them.
    pub fn check_artifacts(&self) -> Result<(), ConfigError> {
        for (what, p) in [
            ("vessel-vmm", &self.vmm),
            ("guest kernel", &self.kernel),
            ("initramfs", &self.initrd),
        ] {
            if !p.is_file() {
                return Err(ConfigError::Invalid(format!(
                    "{what} not found at {}: build and install it with `cargo xtask install` \
                     (or set its path in {SYSTEM_CONFIG}, --config or ${CONFIG_ENV})",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_install_layout() {
        let c = Config::defaults(Path::new("/opt/v/bin"));
        assert_eq!(c.vmm, Path::new("/opt/v/bin/vessel-vmm"));
        assert_eq!(c.kernel, Path::new("/opt/v/share/vessel/vmlinux"));
        assert_eq!(c.initrd, Path::new("/opt/v/share/vessel/initramfs.cpio"));
        assert_eq!((c.mem_mib, c.vcpus, c.templates), (128, 1, true));
    }

    #[test]
    fn file_overrides_and_relative_paths() {
        let mut c = Config::defaults(Path::new("/x/bin"));
        c.apply(
            "kernel = \"k/vmlinux\"\nmem_mib = 256\nvcpus = 2\ntemplates = false\n",
            Path::new("/etc/vessel/config.toml"),
        )
        .unwrap();
        assert_eq!(c.kernel, Path::new("/etc/vessel/k/vmlinux"));
        assert_eq!((c.mem_mib, c.vcpus, c.templates), (256, 2, false));
        assert_eq!(
            c.source.as_deref(),
            Some(Path::new("/etc/vessel/config.toml"))
        );
    }

    #[test]
    fn bad_files_are_refused() {
        let p = Path::new("/c.toml");
        let mut c = Config::defaults(Path::new("/x/bin"));
        assert!(matches!(
            c.apply("mem = 1", p),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            c.apply("mem_mib = \"a\"", p),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            c.apply("mem_mib = 1", p),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            c.apply("vcpus = 0", p),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(c.apply("[[[", p), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn missing_artifacts_say_how_to_install() {
        let c = Config::defaults(Path::new("/nonexistent/bin"));
        let e = c.check_artifacts().unwrap_err().to_string();
        assert!(e.contains("cargo xtask install"), "{e}");
    }
}

//! A private podman for the engine tests and `cargo xtask bench podman`:
//! Debian's podman 4.3 through conmon, with its storage (`--root`,
//! `--runroot`, overlay driver), its `containers.conf` (`CONTAINERS_CONF`:
//! cgroupfs, a file events log, a private tmp dir and network config dir,
//! `[engine.runtimes] vessel = [<wrapper>]`) and both runtimes' state in a
//! temporary directory; every podman command runs inside a network
//! namespace made for it, so netavark's bridge and firewall rules stay
//! there. runc is selected with `--runtime <path>`, vessel with `--runtime
//! vessel` (the name `containers.conf` defines): the two ways a user
//! configures podman. Each runtime is reached through a
//! [`RuntimeWrapper`] that logs every call and gives the runtime a private
//! `--root` (podman passes none) and, for vessel, `--config`.
//!
//! The one host quirk handled, for both runtimes alike: the root shell of
//! these hosts lacks CAP_SYS_RESOURCE and its hard nofile limit is 20000,
//! so `containers.conf` sets `default_ulimits` below it.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::engines::{leaks, output_within, poll_until, Netns, RuntimePair, RuntimeWrapper, Timed};
use crate::Artifacts;

/// The local busybox image [`Podman::import_busybox`] makes.
pub const IMAGE: &str = "localhost/busybox:test";

/// Bound for a command that starts a container (a vessel container may
/// build the template on its first start: about a minute here).
pub const START: Duration = Duration::from_secs(240);
/// Bound for any other podman command.
pub const SHORT: Duration = Duration::from_secs(90);

/// The runtime a podman command uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rt {
    /// runc, through its wrapper, by path (`--runtime PATH`).
    Runc,
    /// vessel, through its wrapper, by the name containers.conf gives it
    /// (`--runtime vessel`).
    Vessel,
}

impl Rt {
    /// `runc` or `vessel`.
    pub fn name(self) -> &'static str {
        match self {
            Rt::Runc => "runc",
            Rt::Vessel => "vessel",
        }
    }
}

/// A private podman: its directories, config, runtimes and netns; drop
/// removes every container, process, mount and directory it made.
pub struct Podman {
    /// Scratch directory holding everything below.
    pub tmp: PathBuf,
    /// podman `--root` (storage).
    pub root: PathBuf,
    /// podman `--runroot`.
    pub runroot: PathBuf,
    /// Its `containers.conf`.
    pub conf: PathBuf,
    /// Value of [`crate::engines::TAG_VAR`] in the runtimes' environment.
    pub tag: String,
    /// The `vessel` binary under test.
    pub vessel_bin: PathBuf,
    /// vessel `--config` file.
    pub vessel_config: PathBuf,
    /// vessel `--root`.
    pub vessel_state: PathBuf,
    /// runc `--root`.
    pub runc_state: PathBuf,
    /// runc's wrapper.
    pub runc: RuntimeWrapper,
    /// vessel's wrapper.
    pub vessel: RuntimeWrapper,
    /// The network namespace podman runs in (dropped after `Drop::drop`
    /// cleaned up inside it).
    pub netns: Netns,
}

impl Podman {
    /// Sets up directories, wrappers, containers.conf and the netns under
    /// `$TMPDIR/vessel-podman-<pid>` (`name` replaces `podman` in the
    /// directory and netns names).
    pub fn new(art: &Artifacts, name: &str) -> Podman {
        let tmp = std::env::temp_dir().join(format!("vessel-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        let tag = format!("{name}-{}", std::process::id());
        let vessel_state = tmp.join("vessel-state");
        let runc_state = tmp.join("runc-state");
        let pair = RuntimePair::write(
            art,
            &tmp,
            &tag,
            &["--root", &runc_state.to_string_lossy()],
            &["--root", &vessel_state.to_string_lossy()],
        );
        let (runc, vessel) = (pair.runc, pair.vessel);
        let vessel_config = pair.config;
        let vessel_bin = art.vmm.with_file_name("vessel");
        let conf = tmp.join("containers.conf");
        fs::create_dir_all(tmp.join("networks")).expect("networks dir");
        fs::write(
            &conf,
            format!(
                r#"[containers]
# This host's root shell lacks CAP_SYS_RESOURCE and has a hard nofile limit
# of 20000: the same for both runtimes.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# No systemd on these hosts.
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{libpod_tmp}"

[engine.runtimes]
vessel = ["{vessel}"]

[network]
network_config_dir = "{networks}"
"#,
                events = tmp.join("events.log").display(),
                libpod_tmp = tmp.join("libpod-tmp").display(),
                vessel = vessel.path.display(),
                networks = tmp.join("networks").display(),
            ),
        )
        .expect("write containers.conf");
        let netns = Netns::new(name);
        Podman {
            root: tmp.join("storage"),
            runroot: tmp.join("runroot"),
            tmp,
            conf,
            tag,
            vessel_bin,
            vessel_config,
            vessel_state,
            runc_state,
            runc,
            vessel,
            netns,
        }
    }

    /// `podman --root R --runroot RR --storage-driver overlay args...` in
    /// the netns, with this test's containers.conf.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.netns.command("podman");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "overlay"])
            .args(args)
            .env("CONTAINERS_CONF", &self.conf);
        c
    }

    /// `podman args...` within `timeout`.
    pub fn podman(&self, args: &[&str], timeout: Duration) -> Timed {
        output_within(&mut self.cmd(args), timeout)
    }

    /// `podman --runtime X args...` within `timeout`.
    pub fn with(&self, rt: Rt, args: &[&str], timeout: Duration) -> Timed {
        let runtime = self.runtime_arg(rt);
        let mut all = vec!["--runtime", runtime.as_str()];
        all.extend_from_slice(args);
        self.podman(&all, timeout)
    }

    /// `podman inspect -f FORMAT NAME`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> Result<String, String> {
        let t = self.podman(&["inspect", "-f", format, name], SHORT);
        t.ok(&format!("inspect {name}"))?;
        Ok(t.stdout.trim().to_string())
    }

    /// Polls `inspect` until the status is `want` (bounded).
    pub fn wait_status(&self, name: &str, want: &str, timeout: Duration) -> Result<(), String> {
        let mut last = String::new();
        let got = poll_until(timeout, || {
            last = self
                .inspect(name, "{{.State.Status}}")
                .unwrap_or_else(|e| e);
            (last == want).then_some(())
        });
        got.ok_or_else(|| format!("{name}: status {last:?}, not {want:?} after {timeout:?}"))
    }

    /// Builds the busybox image tar and `podman import`s it as [`IMAGE`].
    pub fn import_busybox(&self) -> Result<(), String> {
        let tar = crate::engines::busybox_image_tar(&self.tmp);
        let t = self.podman(&["import", &tar.to_string_lossy(), IMAGE], SHORT);
        t.ok("podman import").map(|_| ())
    }

    /// What `--runtime` names for `rt`: runc's wrapper by path, vessel by
    /// the name containers.conf gives its wrapper.
    pub fn runtime_arg(&self, rt: Rt) -> String {
        match rt {
            Rt::Runc => self.runc.path.to_string_lossy().into_owned(),
            Rt::Vessel => "vessel".to_string(),
        }
    }

    /// The wrapper of runtime `rt`.
    pub fn wrapper(&self, rt: Rt) -> &RuntimeWrapper {
        match rt {
            Rt::Runc => &self.runc,
            Rt::Vessel => &self.vessel,
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // podman first (it knows its containers), then whatever is left.
        let t = self.podman(&["rm", "-af", "-t", "0"], Duration::from_secs(120));
        if !t.status.is_some_and(|s| s.success()) {
            eprintln!("cleanup: {}", t.describe("podman rm -af"));
        }
        for id in leaks::entries(&self.vessel_state) {
            let _ = output_within(
                Command::new(&self.vessel_bin)
                    .arg("--root")
                    .arg(&self.vessel_state)
                    .arg("--config")
                    .arg(&self.vessel_config)
                    .args(["delete", "--force", &id]),
                Duration::from_secs(60),
            );
        }
        let killed = leaks::kill_tagged(&self.tag);
        // conmon processes name the storage directories.
        let me = std::process::id() as i32;
        let stray: Vec<i32> = crate::cli::processes_mentioning(&self.tmp.to_string_lossy(), "")
            .into_iter()
            .filter(|&p| p != me)
            .collect();
        for &pid in &stray {
            // SAFETY: kill with a pid and a signal number only.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.podman(&["system", "reset", "-f"], Duration::from_secs(60));
        let unmounted = leaks::unmount_under(&self.tmp);
        if !killed.is_empty() || !stray.is_empty() {
            eprintln!(
                "cleanup: killed tagged {killed:?}, killed {stray:?}; unmounted {unmounted:?}"
            );
        }
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

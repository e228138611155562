//! Sandboxes: one `vessel-vmm` process per container, cold-booted or
//! restored from a template, and the templates themselves.
//!
//! A template is a snapshot of a VM that booted our kernel and agent with
//! two unmounted virtio-fs shares tagged [`ROOTFS_TAG`] and [`MOUNTS_TAG`]
//! (on an empty directory), taken before anything mounted them. A restore
//! binds the first to the container's root filesystem and the second to
//! the staging directory of its host bind mounts (see vmm/SNAPSHOT.md and
//! [`crate::binds`]). Templates live
//! in `template_dir/<key>/`, where the key hashes everything the snapshot
//! depends on: the VMM binary, kernel, initramfs, memory size, vCPUs,
//! whether it has a balloon and how many network devices. A
//! template whose inputs changed simply has another key (the old one is
//! stale and removed by `vessel template rm` or the next build); a corrupt
//! one is rejected by the VMM's checksum and rebuilt.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vessel_proto::client::AgentClient;
use vessel_proto::{AGENT_PORT, READY_PORT};

use crate::binds::HostBind;
use crate::config::Config;

/// The virtio-fs tag of the container's root filesystem.
pub const ROOTFS_TAG: &str = "rootfs";
/// The virtio-fs tag of the staging directory of host bind mounts (see
/// [`crate::binds`]).
pub const MOUNTS_TAG: &str = "mounts";
/// How long a cold boot may take (guest kernels are slow where ring 0 is
/// emulated).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a restored VM may take to answer.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of sandbox and template handling.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited or the agent never answered.
    #[error("{0}")]
    Vm(String),
    /// The template could not be built.
    #[error("template: {0}")]
    Template(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// What a template depends on, hashed into its key.
pub fn template_key(cfg: &Config) -> Result<String, SandboxError> {
    let mut h = Sha256::new();
    h.update(b"vessel-template-v1\0");
    for (name, path) in [
        ("vmm", &cfg.vmm),
        ("kernel", &cfg.kernel),
        ("initrd", &cfg.initrd),
    ] {
        let mut f =
            std::fs::File::open(path).map_err(io(format!("reading {name} {}", path.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        h.update(name.as_bytes());
        loop {
            let n = f
                .read(&mut buf)
                .map_err(io(format!("reading {}", path.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    h.update(cfg.mem_mib.to_le_bytes());
    h.update([
        cfg.vcpus,
        u8::from(cfg.balloon),
        cfg.net_slots,
        u8::from(cfg.net_offload),
    ]);
    h.update(cfg.rootfs_dax_mib.to_le_bytes());
    h.update(cfg.guest_cmdline.as_bytes());
    h.update([0]);
    for tag in [ROOTFS_TAG, MOUNTS_TAG] {
        h.update(tag.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    Ok(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// The `--fs` option giving the rootfs share its DAX window, if configured
/// (`,dax=NM`, or nothing). A restore takes the window from the snapshot.
pub fn rootfs_dax(cfg: &Config) -> String {
    if cfg.rootfs_dax_mib == 0 {
        String::new()
    } else {
        format!(",dax={}M", cfg.rootfs_dax_mib)
    }
}

/// A running `vessel-vmm` and its files.
pub struct Sandbox {
    child: Child,
    /// Private directory (sockets, logs).
    pub dir: PathBuf,
    /// The vsock Unix socket.
    pub uds: PathBuf,
    /// Control socket.
    pub api: PathBuf,
}

/// What the VMM process applies to itself between fork and exec.
#[derive(Debug, Default)]
pub struct HostSide {
    /// The bind mounts' staging directory (the `MOUNTS_TAG` share), made
    /// read-only for the VMM ([`HostBind::apply`]).
    pub stage: Option<CString>,
    /// Host bind mounts, in a mount namespace of the VMM's own
    /// ([`crate::binds`]).
    pub binds: Vec<HostBind>,
    /// The VMM's `--net` values, in order ([`crate::network`]).
    pub nets: Vec<String>,
}

/// Where a sandbox keeps its files: logs in `dir` (any length), Unix
/// sockets in `sockets` (short: see [`crate::state::Store::sandbox_dir`]).
#[derive(Clone, Copy, Debug)]
pub struct Dirs<'a> {
    /// Logs and the serial output.
    pub dir: &'a Path,
    /// `vsock.sock` (and its `_PORT` listeners) and `api.sock`.
    pub sockets: &'a Path,
}

impl<'a> Dirs<'a> {
    /// Everything in one directory (tests, templates with short paths).
    pub fn one(dir: &'a Path) -> Dirs<'a> {
        Dirs { dir, sockets: dir }
    }

    fn create(&self) -> Result<(), SandboxError> {
        for d in [self.dir, self.sockets] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        Ok(())
    }
}

fn vmm_command(cfg: &Config, dirs: Dirs<'_>, host: &HostSide) -> Command {
    let dir = dirs.dir;
    let mut cmd = Command::new(&cfg.vmm);
    cmd.arg("--vsock-uds")
        .arg(dirs.sockets.join("vsock.sock"))
        .arg("--api-sock")
        .arg(dirs.sockets.join("api.sock"))
        .arg("--serial-out")
        .arg(dir.join("serial.log"))
        .arg("--log")
        .arg(dir.join("vmm.log"))
        .arg("--log-format")
        .arg("json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for n in &host.nets {
        cmd.arg("--net").arg(n);
    }
    if let (Some(pd), Some(name)) = (&cfg.profile_dir, dir.file_name()) {
        let mut file = name.to_os_string();
        file.push(".rip");
        cmd.arg("--profile-rip").arg(pd.join(file));
    }
    let binds = host.binds.clone();
    let stage = host.stage.clone();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes system calls (prctl, unshare, mount), which are
    // async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // The VMM dies with the thread that started it (a monitor or a
            // test), so a crashed owner leaves no VM behind.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            HostBind::apply(stage.as_deref(), &binds)
        });
    }
    cmd
}

impl Sandbox {
    fn new(child: Child, dirs: Dirs<'_>) -> Sandbox {
        Sandbox {
            child,
            dir: dirs.dir.to_path_buf(),
            uds: dirs.sockets.join("vsock.sock"),
            api: dirs.sockets.join("api.sock"),
        }
    }

    /// Cold-boots a VM in `dir` (created if missing) with `shares`
    /// (`TAG=DIR[,ro]`) and the host side `host` (bind mounts in the VMM's own mount
    /// namespace, and waits for its agent's ready announcement.
    pub fn boot(
        cfg: &Config,
        dirs: Dirs<'_>,
        shares: &[String],
        host: &HostSide,
    ) -> Result<(Sandbox, AgentClient), SandboxError> {
        dirs.create()?;
        let ready_path = PathBuf::from(format!(
            "{}_{READY_PORT}",
            dirs.sockets.join("vsock.sock").display()
        ));
        let _ = std::fs::remove_file(&ready_path);
        let ready = UnixListener::bind(&ready_path)
            .map_err(io(format!("binding {}", ready_path.display())))?;
        ready.set_nonblocking(true).map_err(io("ready socket"))?;
        let mut cmd = vmm_command(cfg, dirs, host);
        cmd.arg("--kernel")
            .arg(&cfg.kernel)
            .arg("--initrd")
            .arg(&cfg.initrd)
            .arg("--mem-mib")
            .arg(cfg.mem_mib.to_string())
            .arg("--vcpus")
            .arg(cfg.vcpus.to_string());
        if !cfg.guest_cmdline.is_empty() {
            cmd.arg("--cmdline").arg(&cfg.guest_cmdline);
        }
        if cfg.balloon {
            cmd.arg("--balloon");
        }
        for s in shares {
            cmd.arg("--fs").arg(s);
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", cfg.vmm.display())))?;
        let mut sb = Sandbox::new(child, dirs);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let result = loop {
            match ready.accept() {
                Ok(_) => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => break Err(io("ready socket")(e)),
            }
            if let Some(e) = sb.exited() {
                break Err(e);
            }
            if Instant::now() > deadline {
                break Err(SandboxError::Vm(format!(
                    "the agent was not ready after {BOOT_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = std::fs::remove_file(&ready_path);
        let client = result.and_then(|()| {
            AgentClient::connect(&sb.uds, AGENT_PORT, Duration::from_secs(10))
                .map_err(|e| SandboxError::Vm(format!("connecting to the agent: {e}")))
        });
        match client {
            Ok(c) => Ok((sb, c)),
            Err(e) => {
                sb.kill();
                Err(e)
            }
        }
    }

    /// Restores a VM from the snapshot in `template` into `dir`, binds the
    /// snapshot's share tags (`TAG=DIR[,ro]`; the host side `host` as for
    /// [`Sandbox::boot`]), and gives it fresh entropy and `hostname`.
    pub fn restore(
        cfg: &Config,
        template: &Path,
        dirs: Dirs<'_>,
        shares: &[String],
        host: &HostSide,
        hostname: Option<String>,
    ) -> Result<(Sandbox, AgentClient), SandboxError> {
        dirs.create()?;
        let mut cid_bytes = [0u8; 4];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut cid_bytes))
            .map_err(io("reading /dev/urandom"))?;
        // Any CID of 3.. works: the vsock device is ours, not the host's.
        let cid = 3 + u32::from_le_bytes(cid_bytes) % (u32::MAX - 4);
        let mut cmd = vmm_command(cfg, dirs, host);
        cmd.arg("--restore")
            .arg(template)
            .arg("--vsock-cid")
            .arg(cid.to_string());
        for s in shares {
            cmd.arg("--fs").arg(s);
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", cfg.vmm.display())))?;
        let mut sb = Sandbox::new(child, dirs);
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        let mut client = loop {
            if let Some(e) = sb.exited() {
                return Err(e);
            }
            match AgentClient::connect(&sb.uds, AGENT_PORT, Duration::from_secs(5)) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    sb.kill();
                    return Err(SandboxError::Vm(format!(
                        "the restored agent did not answer: {e}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let mut entropy = vec![0u8; 64];
        let seeded = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(io("reading /dev/urandom"))
            .and_then(|()| {
                // The connect timeout (5 s) is too short for a guest that
                // shares its cores with many others just restored (10 at
                // once on 2 cores timed out here).
                client
                    .set_timeout(Some(RESTORE_TIMEOUT))
                    .and_then(|()| client.restored(entropy, hostname))
                    .map_err(|e| SandboxError::Vm(format!("reseeding the guest: {e}")))
            });
        if let Err(e) = seeded {
            sb.kill();
            return Err(e);
        }
        Ok((sb, client))
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// If the VMM has exited: an error with its status and last stderr line.
    fn exited(&mut self) -> Option<SandboxError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut s) = self.child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                Some(SandboxError::Vm(format!(
                    "vessel-vmm exited with {status}: {}",
                    err.trim()
                )))
            }
            _ => None,
        }
    }

    /// Whether the VMM has exited (it is reaped then), waiting up to
    /// `grace` for it: the agent's connection can close a moment before
    /// the process is gone.
    pub fn vmm_exited(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one request line to the VMM's control socket.
    pub fn api(&self, request: &str) -> Result<String, SandboxError> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.api)
            .map_err(io(format!("connecting to {}", self.api.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("control socket"))?;
        s.write_all(format!("{request}\n").as_bytes())
            .map_err(io("control socket"))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(io("control socket"))?;
        Ok(line.trim_end().to_string())
    }

    /// Asks the guest to shut down and waits for the VMM to exit; kills it
    /// if it does not within `timeout`.
    pub fn shutdown(
        mut self,
        client: &mut AgentClient,
        timeout: Duration,
    ) -> Result<(), SandboxError> {
        let _ = client.shutdown();
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(SandboxError::Vm(format!("vessel-vmm exited with {status}")))
                }
                _ if Instant::now() > deadline => {
                    self.kill();
                    return Err(SandboxError::Vm("the VM did not stop; killed".into()));
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Kills the VMM and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.uds);
        let _ = std::fs::remove_file(&self.api);
    }
}

/// User + system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at ')';
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// User + system CPU time of process `pid` so far, in milliseconds. For a
/// VMM on a PVM host this is mostly emulated guest kernel time, which makes
/// it a measure that other load on the host hardly moves.
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(cpu_ticks(pid)? as f64 * 1000.0 / hz)
}

/// Waits until the VM in process `pid` is idle: its CPU time grows by at
/// most 1 tick (10 ms) per 250 ms, twice in a row, or `max` passes.
/// Returns how long it waited.
///
/// A guest that just booted still has work queued (timers, deferred
/// work); a snapshot taken then makes every clone do that work before it
/// answers. On PVM hosts, snapshotting a settled guest cut restore to first
/// answer from ~530 ms to ~80 ms (`cargo xtask bench restore`).
pub fn wait_idle(pid: u32, max: Duration) -> Duration {
    let start = Instant::now();
    let mut quiet = 0;
    let Some(mut last) = cpu_ticks(pid) else {
        return start.elapsed();
    };
    while start.elapsed() < max {
        std::thread::sleep(Duration::from_millis(250));
        let Some(now) = cpu_ticks(pid) else {
            break;
        };
        if now.saturating_sub(last) <= 1 {
            quiet += 1;
            if quiet >= 2 {
                break;
            }
        } else {
            quiet = 0;
        }
        last = now;
    }
    start.elapsed()
}

/// Readies a freshly booted template guest for its snapshot: one `Ping`
/// on `client`, which is then closed, then [`wait_idle`]. Returns how long
/// it waited for idle.
///
/// The `Ping` runs the agent's request path once (accept, read, dispatch,
/// write), so its code and data pages are mapped in the guest's page tables
/// when the snapshot is taken instead of being faulted in by every clone's
/// first request. Closing the connection means no guest socket is connected
/// at the snapshot: an open one would be reset by every clone when the
/// restored vsock device sends its transport reset, and the agent thread
/// blocked on it would wake up and run its error path, all on the one vCPU
/// before the clone's first connection is served.
pub fn settle_for_snapshot(
    pid: u32,
    mut client: AgentClient,
    max: Duration,
) -> Result<Duration, SandboxError> {
    client
        .ping()
        .map_err(|e| SandboxError::Vm(format!("pinging the template's agent: {e}")))?;
    drop(client);
    Ok(wait_idle(pid, max))
}

/// Removes a directory tree when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One template on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInfo {
    /// Its key.
    pub key: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Whether it matches the current configuration's inputs.
    pub current: bool,
    /// Bytes on disk (memory file blocks + state).
    pub disk_bytes: u64,
}

/// The template store of a configuration.
pub struct Templates<'a> {
    cfg: &'a Config,
}

impl<'a> Templates<'a> {
    /// Templates for `cfg`.
    pub fn new(cfg: &'a Config) -> Self {
        Templates { cfg }
    }

    /// The directory of the current template (it may not exist yet).
    pub fn current_dir(&self) -> Result<PathBuf, SandboxError> {
        Ok(self.cfg.template_dir.join(template_key(self.cfg)?))
    }

    /// The current template, built if missing (or if `rebuild`). Returns
    /// its directory and whether it was built now.
    pub fn ensure(&self, rebuild: bool) -> Result<(PathBuf, bool), SandboxError> {
        let dir = self.current_dir()?;
        if !rebuild && dir.join("vmstate").is_file() {
            match self.check(&dir) {
                Ok(()) => return Ok((dir, false)),
                Err(e) => tracing::warn!("rebuilding template {}: {e}", dir.display()),
            }
        }
        self.build(&dir)?;
        Ok((dir, true))
    }

    /// Checks a template's state file (magic, format version, build,
    /// checksum, consistency) and that its memory file has the size the
    /// state describes, by asking the VMM (`--check-snapshot`): the
    /// snapshot format is the VMM's, and `vessel` does not link it.
    pub fn check(&self, dir: &Path) -> Result<(), SandboxError> {
        let out = Command::new(&self.cfg.vmm)
            .arg("--check-snapshot")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!(
                "running {} --check-snapshot",
                self.cfg.vmm.display()
            )))?;
        if out.status.success() {
            return Ok(());
        }
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim().trim_start_matches("vessel-vmm: error: ");
        Err(SandboxError::Template(format!("{}: {why}", dir.display())))
    }

    /// Boots a VM and snapshots it into `dir` (atomically: built in a
    /// temporary directory, then renamed).
    fn build(&self, dir: &Path) -> Result<(), SandboxError> {
        let root = &self.cfg.template_dir;
        std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        let work = root.join(format!(".build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let empty = work.join("empty-rootfs");
        std::fs::create_dir_all(&empty).map_err(io(format!("creating {}", empty.display())))?;
        let result = (|| {
            let shares = [
                format!("{ROOTFS_TAG}={}{}", empty.display(), rootfs_dax(self.cfg)),
                format!("{MOUNTS_TAG}={}", empty.display()),
            ];
            // The template directory may be long; its sockets go to a
            // short directory under the run directory.
            let sockets = self
                .cfg
                .run_dir
                .join(format!("template-build-{}", std::process::id()));
            let dirs = Dirs {
                dir: &work.join("vm"),
                sockets: &sockets,
            };
            // Network devices without a backend: a restore binds each to
            // a tap of its own.
            let host = HostSide {
                nets: vec![
                    crate::network::with_offload("none".into(), self.cfg.net_offload);
                    usize::from(self.cfg.net_slots)
                ],
                ..HostSide::default()
            };
            let booted = Sandbox::boot(self.cfg, dirs, &shares, &host);
            let (mut sb, client) = match booted {
                Ok(b) => b,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&sockets);
                    return Err(e);
                }
            };
            let _sockets = RemoveOnDrop(sockets);
            let waited = match settle_for_snapshot(sb.pid(), client, Duration::from_secs(30)) {
                Ok(w) => w,
                Err(e) => {
                    sb.kill();
                    return Err(e);
                }
            };
            tracing::debug!("template guest idle after {waited:?}");
            let snap = work.join("snapshot");
            let answer = sb.api(&format!("snapshot {}", snap.display()));
            let shut = match AgentClient::connect(&sb.uds, AGENT_PORT, Duration::from_secs(10)) {
                Ok(mut client) => sb.shutdown(&mut client, Duration::from_secs(30)),
                Err(e) => {
                    sb.kill();
                    Err(SandboxError::Vm(format!(
                        "connecting to the template's agent to stop it: {e}"
                    )))
                }
            };
            let answer = answer?;
            if !answer.starts_with("OK") {
                return Err(SandboxError::Template(format!("snapshot failed: {answer}")));
            }
            shut?;
            let _ = std::fs::remove_dir_all(dir);
            std::fs::rename(&snap, dir).map_err(io(format!("installing {}", dir.display())))?;
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    /// Every template directory, current or stale.
    pub fn list(&self) -> Result<Vec<TemplateInfo>, SandboxError> {
        let current = template_key(self.cfg)?;
        let root = &self.cfg.template_dir;
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", root.display()))(e)),
        };
        let mut out = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let Ok(key) = e.file_name().into_string() else {
                continue;
            };
            if key.starts_with('.') || !e.path().join("vmstate").is_file() {
                continue;
            }
            let disk_bytes = std::fs::read_dir(e.path())
                .map(|it| {
                    it.filter_map(Result::ok)
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                        .sum()
                })
                .unwrap_or(0);
            out.push(TemplateInfo {
                current: key == current,
                dir: e.path(),
                key,
                disk_bytes,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes templates: all of them, or only stale ones.
    pub fn remove(&self, stale_only: bool) -> Result<Vec<String>, SandboxError> {
        let mut removed = Vec::new();
        for t in self.list()? {
            if stale_only && t.current {
                continue;
            }
            std::fs::remove_dir_all(&t.dir).map_err(io(format!("removing {}", t.dir.display())))?;
            removed.push(t.key);
        }
        Ok(removed)
    }
}

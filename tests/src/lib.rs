//! Shared fixtures for vessel's end-to-end tests (and for `cargo xtask
//! demo`/`bench`): locate the built artifacts, start a `vessel-vmm` process
//! with its sockets and logs in a private directory, talk to the agent, and
//! clean up everything on drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::{AGENT_PORT, READY_PORT};

pub mod cli;
pub mod containerd;
#[cfg(feature = "cri")]
pub mod cri;
pub mod docker;
pub mod engines;
pub mod fsread;
pub mod guest;
pub mod net;
pub mod podman;

/// How long a cold boot may take on the slowest hosts we support.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(480);

/// Paths of the binaries and guest artifacts under test.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// `vessel-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Initramfs with the agent as /init.
    pub initrd: PathBuf,
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

impl Artifacts {
    /// Paths from `VESSEL_VMM`, `VESSEL_KERNEL`, `VESSEL_INITRD`, or the
    /// places `cargo xtask build` writes them. Errors name what is missing.
    pub fn locate() -> Result<Artifacts, String> {
        let root = workspace_root();
        let pick = |var: &str, default: PathBuf| -> PathBuf {
            std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
        };
        let a = Artifacts {
            vmm: pick("VESSEL_VMM", root.join("target/release/vessel-vmm")),
            kernel: pick("VESSEL_KERNEL", root.join("target/guest-kernel/vmlinux")),
            initrd: pick("VESSEL_INITRD", root.join("target/vessel/initramfs.cpio")),
        };
        for (what, p) in [
            ("vessel-vmm", &a.vmm),
            ("guest kernel", &a.kernel),
            ("initramfs", &a.initrd),
        ] {
            if !p.exists() {
                return Err(format!(
                    "{what} not found at {} (run `cargo xtask build` or `cargo xtask test`)",
                    p.display()
                ));
            }
        }
        Ok(a)
    }
}

impl Artifacts {
    /// A `vessel` config file (TOML) pointing at these artifacts, with
    /// templates in `template_dir`, on unless `extra` (more TOML lines,
    /// appended) sets `templates` itself.
    pub fn vessel_config(&self, template_dir: &Path, extra: &str) -> String {
        let templates = if extra.contains("templates =") {
            ""
        } else {
            "templates = true\n"
        };
        format!(
            "vmm = {:?}\nkernel = {:?}\ninitrd = {:?}\ntemplate_dir = {:?}\n{templates}{extra}",
            self.vmm, self.kernel, self.initrd, template_dir
        )
    }
}

/// The release in the guest kernel's `Linux version X (...)` banner.
pub fn guest_release(vmlinux: &Path) -> String {
    let bytes = fs::read(vmlinux).expect("read vmlinux");
    let needle = b"Linux version ";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("no version banner in vmlinux")
        + needle.len();
    let end = bytes[at..]
        .iter()
        .position(|&b| b == b' ')
        .map_or(bytes.len(), |e| at + e);
    String::from_utf8_lossy(&bytes[at..end]).into_owned()
}

/// True when KVM tests should run. Panics (fails the test loudly) when
/// `/dev/kvm` is missing, unless `VESSEL_SKIP_KVM=1` asks to skip.
pub fn kvm_available_or_skip() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("VESSEL_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("skipped: /dev/kvm is missing and VESSEL_SKIP_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing: these tests boot real microVMs (set VESSEL_SKIP_KVM=1 to skip them explicitly)");
}

/// A directory removed (with its contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/vessel-{name}-{pid}`, emptied and created.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vessel-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `len` pseudo-random bytes (xorshift from `seed`): file contents that
/// differ at every offset, so misplaced bytes show.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Options for one VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Guest memory.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Extra `vessel-vmm` arguments (e.g. diagnostics).
    pub vmm_args: Vec<String>,
    /// Give the VMM a control socket (`--api-sock`), see [`VmProcess::api`].
    pub api_sock: bool,
    /// Shared directories, each a `--fs` argument (`TAG=HOST_DIR[,ro]`).
    pub shares: Vec<String>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            mem_mib: 128,
            vcpus: 1,
            cmdline: String::new(),
            vmm_args: Vec::new(),
            api_sock: false,
            shares: Vec::new(),
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running `vessel-vmm` and its private directory.
pub struct VmProcess {
    child: Child,
    exit: Option<ExitStatus>,
    /// Private directory holding the socket and logs.
    pub dir: PathBuf,
    /// vsock Unix socket.
    pub uds: PathBuf,
    /// Guest serial console output.
    pub serial: PathBuf,
    /// VMM log (JSON lines).
    pub log: PathBuf,
    /// When the process was spawned.
    pub started: Instant,
    /// Control socket, when asked for.
    pub api_sock: Option<PathBuf>,
    ready: Option<std::os::unix::net::UnixListener>,
}

fn private_dir() -> io::Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vessel-vm-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl VmProcess {
    /// Starts a VM.
    pub fn spawn(art: &Artifacts, opts: &VmOptions) -> io::Result<VmProcess> {
        let dir = private_dir()?;
        let api_sock = opts.api_sock.then(|| dir.join("api.sock"));
        let uds = dir.join("vsock.sock");
        let serial = dir.join("serial.log");
        let log = dir.join("vmm.log");
        // The agent connects here once it listens (see vessel_proto::READY_PORT).
        let ready =
            std::os::unix::net::UnixListener::bind(format!("{}_{READY_PORT}", uds.display()))?;
        ready.set_nonblocking(true)?;
        let started = Instant::now();
        let mut cmd = Command::new(&art.vmm);
        if let Some(api) = &api_sock {
            cmd.arg("--api-sock").arg(api);
        }
        for share in &opts.shares {
            cmd.arg("--fs").arg(share);
        }
        let child = cmd
            .arg("--kernel")
            .arg(&art.kernel)
            .arg("--initrd")
            .arg(&art.initrd)
            .arg("--mem-mib")
            .arg(opts.mem_mib.to_string())
            .arg("--vcpus")
            .arg(opts.vcpus.to_string())
            .arg("--cmdline")
            .arg(&opts.cmdline)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--serial-out")
            .arg(&serial)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .args(&opts.vmm_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(VmProcess {
            child,
            exit: None,
            dir,
            uds,
            serial,
            log,
            started,
            api_sock,
            ready: Some(ready),
        })
    }

    /// Restores a VM from `snapshot` with its own directory, vsock socket
    /// and guest `cid`. The agent does not announce itself after a restore
    /// (it already listens): connect with [`VmProcess::connect`].
    pub fn restore(art: &Artifacts, snapshot: &Path, cid: u32) -> io::Result<VmProcess> {
        Self::restore_with_shares(art, snapshot, cid, &[])
    }

    /// Like [`VmProcess::restore`], binding the snapshot's virtio-fs tags
    /// to directories (`--fs TAG=DIR[,ro]` arguments).
    pub fn restore_with_shares(
        art: &Artifacts,
        snapshot: &Path,
        cid: u32,
        shares: &[String],
    ) -> io::Result<VmProcess> {
        let args: Vec<String> = shares
            .iter()
            .flat_map(|s| ["--fs".to_string(), s.clone()])
            .collect();
        Self::restore_with_args(art, snapshot, cid, &args)
    }

    /// Like [`VmProcess::restore`], with extra `vessel-vmm` arguments
    /// (`--fs TAG=DIR`, `--net tap=NAME`, ...).
    pub fn restore_with_args(
        art: &Artifacts,
        snapshot: &Path,
        cid: u32,
        args: &[String],
    ) -> io::Result<VmProcess> {
        let dir = private_dir()?;
        let uds = dir.join("vsock.sock");
        let serial = dir.join("serial.log");
        let log = dir.join("vmm.log");
        let started = Instant::now();
        let child = Command::new(&art.vmm)
            .arg("--restore")
            .arg(snapshot)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--vsock-cid")
            .arg(cid.to_string())
            .args(args)
            .arg("--serial-out")
            .arg(&serial)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(VmProcess {
            child,
            exit: None,
            dir,
            uds,
            serial,
            log,
            started,
            api_sock: None,
            ready: None,
        })
    }

    /// Sends one request line to the control socket and returns the answer
    /// line (without the newline).
    pub fn api(&self, request: &str) -> io::Result<String> {
        use std::io::{BufRead, Write};
        let path = self
            .api_sock
            .as_ref()
            .ok_or_else(|| io::Error::other("no --api-sock for this VM"))?;
        let mut s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        s.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        io::BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }

    /// Connects to the agent and pings it, retrying until it answers or
    /// `timeout` passes; returns the client.
    pub fn connect_and_ping(&mut self, timeout: Duration) -> Result<AgentClient, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Err(format!(
                    "vessel-vmm exited with {status}: {}",
                    self.stderr()
                ));
            }
            match AgentClient::connect(&self.uds, AGENT_PORT, Duration::from_secs(5)) {
                Ok(mut c) => match c.ping() {
                    Ok(_) => return Ok(c),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(format!("no ping answer after {timeout:?}: {last}"))
    }

    /// PID of the VMM.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the agent announces itself on the ready port and answers
    /// a connection, or the VMM exits, or `timeout`. Waiting costs the guest
    /// nothing: no connection attempts are made before the announcement.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<AgentClient, String> {
        let deadline = Instant::now() + timeout;
        let Some(ready) = self.ready.take() else {
            return Err("no ready socket (a restored VM): use connect_and_ping".into());
        };
        loop {
            match ready.accept() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("ready socket: {e}")),
            }
            if let Some(status) = self.try_wait() {
                return Err(format!(
                    "vessel-vmm exited with {status} before the agent was ready; serial: {}",
                    self.serial_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "agent not ready after {timeout:?}; serial: {}",
                    self.serial_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        loop {
            if let Some(status) = self.try_wait() {
                return Err(format!(
                    "vessel-vmm exited with {status} before the agent was ready; serial: {}",
                    self.serial_tail()
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "agent not ready after {timeout:?}; serial: {}",
                    self.serial_tail()
                ));
            }
            match AgentClient::wait_ready(&self.uds, AGENT_PORT, left.min(Duration::from_secs(2))) {
                Ok(c) => return Ok(c),
                Err(ClientError::Timeout) | Err(ClientError::NotReady) => continue,
                Err(e) => {
                    if self.try_wait().is_some() {
                        continue;
                    }
                    return Err(format!("cannot connect to the agent: {e}"));
                }
            }
        }
    }

    /// A new connection to the agent (the VM must be ready).
    pub fn connect(&self) -> Result<AgentClient, ClientError> {
        AgentClient::connect(&self.uds, AGENT_PORT, Duration::from_secs(10))
    }

    /// Exit status if the VMM has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the VMM to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// What the VMM wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// The guest serial output so far.
    pub fn serial_output(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn serial_tail(&self) -> String {
        let s = self.serial_output();
        let start = s.len().saturating_sub(2000);
        s.get(start..).unwrap_or_default().to_string()
    }

    /// Boot timeline milestones from the VMM log: (name, ms since VMM start).
    pub fn timeline(&self) -> Vec<(String, f64)> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        parse_timeline(&text)
    }
}

/// Extracts `timeline` events from JSON log lines.
pub fn parse_timeline(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("target").and_then(|t| t.as_str()) == Some("timeline"))
        .filter_map(|v| {
            let f = v.get("fields")?;
            let name = f.get("milestone")?.as_str()?.to_string();
            let ms = f.get("ms")?.as_str()?.parse::<f64>().ok()?;
            Some((name, ms))
        })
        .collect()
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_lines_are_parsed() {
        let log = r#"{"timestamp":"x","level":"INFO","fields":{"message":"boot timeline","milestone":"agent_ready","ms":"1234.5"},"target":"timeline"}
{"timestamp":"x","level":"INFO","fields":{"message":"other"},"target":"vessel_vmm"}
not json"#;
        assert_eq!(
            parse_timeline(log),
            vec![("agent_ready".to_string(), 1234.5)]
        );
    }
}

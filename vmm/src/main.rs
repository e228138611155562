//! `vessel-vmm`: boots one microVM (or restores one from a snapshot with
//! `--restore DIR`) and runs it until the guest resets.
//!
//! Exit status: 0 when the guest rebooted or powered off, 1 on errors
//! (reported as one line on stderr), 2 on a guest triple fault, 128+N when
//! stopped by signal N.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;
use vessel_vmm::builder::{
    build_microvm, error_chain, restore_microvm, RestoreConfig, VmConfig, VsockConfig,
};
use vessel_vmm::devices::virtio::fs::ShareConfig;
use vessel_vmm::devices::virtio::net::NetConfig;
use vessel_vmm::host::HostKind;
use vessel_vmm::seccomp::Mode as SeccompMode;
use vessel_vmm::timeline;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HostKindArg {
    Auto,
    Pvm,
    Hardware,
}

/// vessel's virtual machine monitor: one KVM microVM per process.
#[derive(Debug, Parser)]
#[command(name = "vessel-vmm", version)]
struct Args {
    /// Uncompressed ELF guest kernel (vmlinux).
    #[arg(long, required_unless_present_any = ["restore", "check_snapshot"])]
    kernel: Option<PathBuf>,
    /// Check the snapshot in this directory (state file format, version,
    /// checksum, consistency, memory file size) and exit: 0 if it can be
    /// restored, 1 with the reason on stderr. Starts no VM.
    #[arg(long, exclusive = true)]
    check_snapshot: Option<PathBuf>,
    /// Restore from this snapshot directory instead of booting a kernel
    /// (kernel, initrd, cmdline, memory and vCPU options come from the snapshot).
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "balloon"])]
    restore: Option<PathBuf>,
    /// Control socket: `pause`, `resume`, `status`, `snapshot <dir>` (one per line).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Initramfs (newc cpio) whose /init is the vessel agent.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line arguments (appended last).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB [default: 128].
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest vsock context id.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Host Unix socket of the vsock device ("CONNECT <port>" protocol); no vsock without it.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Share a host directory with the guest as virtio-fs tag TAG
    /// (repeatable); `,ro` makes the share read-only; `,dax[=SIZE]` gives
    /// it a DAX window of SIZE (K/M/G suffix, a multiple of 2M; default
    /// 256M) so the guest maps host page-cache pages instead of copying
    /// files. The guest mounts it with `mount -t virtiofs TAG /target`.
    #[arg(long = "fs", value_name = "TAG=HOST_DIR[,ro][,dax[=SIZE]]")]
    shares: Vec<String>,
    /// A network interface (repeatable; eth0, eth1, ... in order), one
    /// virtio-net device each: `tap=NAME` creates (or opens) the tap NAME
    /// in the VMM's network namespace, `fd=N` uses the open tap fd N
    /// inherited from the parent (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR),
    /// `none` has no backend (link down; what templates hold). `mac=` sets
    /// the guest's MAC (default: random, locally administered; at
    /// `--restore`, the snapshot's). At `--restore`, the i-th `--net`
    /// binds the snapshot's i-th interface; the rest stay unbound.
    /// `offload=off` offers no checksum/TSO offload (measurements; a
    /// restored device keeps what its driver negotiated).
    #[arg(
        long = "net",
        value_name = "tap=NAME|fd=N|none[,mac=MAC][,offload=off]"
    )]
    nets: Vec<String>,
    /// File that receives the guest serial console (default: stderr).
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// Log file (default: stderr).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    /// Default: info into a --log file, warn on stderr.
    #[arg(long)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Host kind; `auto` detects it (PVM hosts need extra guest kernel switches).
    #[arg(long, value_enum, default_value_t = HostKindArg::Auto)]
    host_kind: HostKindArg,
    /// Add a virtio-balloon device with free page reporting: memory the
    /// guest frees goes back to the host.
    #[arg(long)]
    balloon: bool,
    /// Opt guest memory into KSM (`MADV_MERGEABLE`), for hosts that run it.
    /// Off by default: merging costs host CPU and lets guests time each
    /// other's memory.
    #[arg(long)]
    ksm: bool,
    /// Diagnostics: sample every vCPU's guest rip once per millisecond and
    /// write the histogram (`<rip> <count>` lines) to this file at exit.
    #[arg(long)]
    profile_rip: Option<PathBuf>,
    /// The system call filter loaded before the guest runs (see
    /// vmm/src/seccomp.rs): `kill` (a call outside the allowlist kills the
    /// VMM), `log` (allowed, logged as audit type=1326) or `off`. Default:
    /// `$VESSEL_VMM_SECCOMP`, else `kill`.
    #[arg(long, value_enum)]
    seccomp: Option<SeccompMode>,
    /// The same as `--seccomp off`: for debugging only.
    #[arg(long)]
    no_seccomp: bool,
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let level = args
        .log_level
        .clone()
        .unwrap_or_else(|| if args.log.is_some() { "info" } else { "warn" }.to_string());
    let filter = EnvFilter::try_new(&level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let result = match (&args.log, args.log_format) {
        (Some(path), format) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let builder = builder.with_writer(std::sync::Mutex::new(file));
            match format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            }
        }
        (None, LogFormat::Text) => builder.with_writer(std::io::stderr).try_init(),
        (None, LogFormat::Json) => builder.with_writer(std::io::stderr).json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

fn run(args: Args) -> anyhow::Result<i32> {
    if let Some(dir) = &args.check_snapshot {
        vessel_vmm::snapshot::check_dir(dir)?;
        return Ok(0);
    }
    // Before any file of ours is opened: an inherited tap fd must be open.
    let nets = args
        .nets
        .iter()
        .map(|s| NetConfig::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    for n in &nets {
        n.check_inherited_fd()?;
    }
    init_logging(&args)?;
    // Parsed here rather than by clap so that errors are one line like the others.
    let shares = args
        .shares
        .iter()
        .map(|s| ShareConfig::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let vsock = args.vsock_uds.map(|uds_path| VsockConfig {
        cid: args.vsock_cid,
        uds_path,
    });
    let vm = match (args.restore, args.kernel) {
        (Some(dir), _) => restore_microvm(&RestoreConfig {
            dir,
            vsock,
            serial_out: args.serial_out,
            api_sock: args.api_sock,
            shares,
            ksm: args.ksm,
            nets,
        })?,
        (None, Some(kernel)) => build_microvm(&VmConfig {
            kernel,
            initrd: args.initrd,
            extra_cmdline: args.cmdline.unwrap_or_default(),
            mem_mib: args.mem_mib.unwrap_or(128),
            vcpus: args.vcpus.unwrap_or(1),
            vsock,
            serial_out: args.serial_out,
            host_kind: match args.host_kind {
                HostKindArg::Auto => None,
                HostKindArg::Pvm => Some(HostKind::Pvm),
                HostKindArg::Hardware => Some(HostKind::Hardware),
            },
            api_sock: args.api_sock,
            shares,
            balloon: args.balloon,
            ksm: args.ksm,
            nets,
        })?,
        (None, None) => anyhow::bail!("--kernel or --restore is required"),
    };
    let profile = args.profile_rip;
    if profile.is_some() {
        vessel_vmm::profiler::enable()
            .map_err(|e| anyhow::anyhow!("cannot enable the rip sampler: {e}"))?;
    }
    // Set-up is done: from here on the guest's input is parsed.
    let mode = if args.no_seccomp {
        SeccompMode::Off
    } else {
        match (args.seccomp, std::env::var("VESSEL_VMM_SECCOMP")) {
            (Some(m), _) => m,
            (None, Ok(v)) => SeccompMode::from_str(&v, true)
                .map_err(|e| anyhow::anyhow!("VESSEL_VMM_SECCOMP={v:?}: {e}"))?,
            (None, Err(_)) => SeccompMode::Kill,
        }
    };
    vessel_vmm::seccomp::install(mode)
        .map_err(|e| anyhow::anyhow!("cannot load the system call filter: {e}"))?;
    if mode != SeccompMode::Kill {
        tracing::warn!(?mode, "system call filter not enforcing");
    }
    let outcome = vm.run();
    if let Some(path) = &profile {
        let samples = vessel_vmm::profiler::write(path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        tracing::info!(samples, path = %path.display(), "rip profile written");
    }
    let code = outcome.exit_code();
    match &outcome {
        vessel_vmm::builder::VmOutcome::GuestReset => tracing::info!("guest reset, exiting"),
        other => tracing::warn!(?other, "VM stopped"),
    }
    if let vessel_vmm::builder::VmOutcome::VcpuError(e) = &outcome {
        eprintln!("vessel-vmm: error: {}", error_chain(e));
    }
    Ok(code)
}

fn main() -> ExitCode {
    timeline::start();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("vessel-vmm: error: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}

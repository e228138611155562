//! `vessel`: the runc-compatible command line.
//!
//! Engines (podman, docker, conmon, containerd's runc shim) call it with
//! runc's global flags and commands. `create`, `start`, `run`, `state`,
//! `list`, `kill`, `delete`, `exec`, `ps`, `spec`, `pause`, `resume`,
//! `update`, `events` and `features` work, terminal containers too
//! (`--console-socket`, see `cli`).

mod cli;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::layer::SubscriberExt;

use vessel_shim::bundle::Bundle;
use vessel_shim::config::Config;
use vessel_shim::runtime::{exec, monitor, CreateOptions, Launcher, Runtime};
use vessel_shim::sandbox::Templates;
use vessel_shim::state::Store;
use vessel_shim::{log, spec};

/// What `vessel -v` prints after the name, shaped like runc's answer
/// (`runc version X`, then `spec: Y`), which engines show in their info.
const VERSION: &str = concat!("version ", env!("CARGO_PKG_VERSION"), "\nspec: ", "1.2.0");

/// vessel: OCI containers, each in its own KVM microVM (runc-compatible CLI).
#[derive(Debug, Parser)]
#[command(name = "vessel", version = VERSION, disable_version_flag = true)]
struct Cli {
    /// Print the version (runc's `-v`).
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    version: Option<bool>,
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/vessel")]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = log::Format::Text)]
    log_format: log::Format,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Read `linux.cgroupsPath` in systemd's `slice:prefix:name` form.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Configuration file (default: $VESSEL_CONFIG, then /etc/vessel/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Container id.
    id: String,
    /// Bundle directory (default: the current directory).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write the container's host pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master (terminal containers).
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility: the guest kernel has no keyrings
    /// (`CONFIG_KEYS` is off), so containers neither get nor share one.
    #[arg(long)]
    no_new_keyring: bool,
    /// Pass N extra file descriptors (3..3+N) to the container.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// vessel: create the container inside the VM of this running
    /// container (a pod: shared VM, namespace paths of the spec naming the
    /// sandbox's /proc/PID/ns are joined in the guest).
    #[arg(long, value_name = "ID")]
    sandbox: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container (its init waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start {
        /// Container id.
        id: String,
    },
    /// Create and start a container.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Detach from the container's process.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Print a container's state as JSON.
    State {
        /// Container id.
        id: String,
    },
    /// Send a signal to a container's init (or all its processes).
    Kill {
        /// Container id.
        id: String,
        /// Signal name or number (default SIGTERM).
        signal: Option<String>,
        /// Signal every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Delete a container and everything it holds.
    Delete {
        /// Container id.
        id: String,
        /// Kill a running container first.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Run a new process in a running container.
    Exec(cli::exec::ExecArgs),
    /// List a container's processes.
    Ps {
        /// Container id.
        id: String,
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Arguments for ps (refused: see `vessel ps --help` / docs).
        #[arg(last = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Print only the ids.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Freeze a container's processes.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// Container id.
        id: String,
    },
    /// Change a container's resource limits.
    Update(cli::resources::UpdateArgs),
    /// Container events and statistics.
    Events(cli::events::EventsArgs),
    /// Write a default config.json.
    Spec {
        /// Bundle directory.
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        /// Rootless spec (not supported).
        #[arg(long)]
        rootless: bool,
    },
    /// Print the OCI features JSON.
    Features,
    /// Manage VM templates (snapshots new sandboxes start from).
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Internal: owns one container's sandbox (started by `create`).
    #[command(hide = true)]
    Monitor {
        /// Container id.
        id: String,
        /// Absolute bundle directory.
        #[arg(long)]
        bundle: PathBuf,
        /// Pipe to report readiness on.
        #[arg(long)]
        ready_fd: i32,
        /// Unix socket that receives the pty master.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// A pod member: the sandbox container whose VM runs it.
        #[arg(long, requires = "stage")]
        sandbox: Option<String>,
        /// A pod member: its directory in the sandbox's share of mounts.
        #[arg(long, requires = "sandbox")]
        stage: Option<String>,
    },
    /// Internal: runs one detached exec (started by `exec --detach`).
    #[command(hide = true)]
    ExecMonitor(cli::exec::ExecMonitorArgs),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Build the template for the current configuration (if missing).
    Build {
        /// Build it again even if it exists.
        #[arg(long)]
        rebuild: bool,
    },
    /// List templates (current and stale).
    List,
    /// Remove templates.
    Rm {
        /// Only those whose inputs changed (not the current one).
        #[arg(long)]
        stale: bool,
    },
}

fn init_logging(cli: &Cli) -> Result<()> {
    let out: Box<dyn Write + Send> = match &cli.log {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open log file {}", p.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let max = if cli.debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    let subscriber =
        tracing_subscriber::registry().with(log::RuncLayer::new(out, cli.log_format, max));
    tracing::subscriber::set_global_default(subscriber).context("cannot set up logging")
}

fn list(rt: &Runtime, format: &str, quiet: bool) -> Result<()> {
    let states = rt.list()?;
    if quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::to_string(&states)?),
        "table" => {
            println!(
                "{:<12} {:<10} {:<10} {:<40} {:<31} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                println!(
                    "{:<12} {:<10} {:<10} {:<40} {:<31} {}",
                    s.id,
                    s.pid,
                    s.status.as_str(),
                    s.bundle.display(),
                    s.created,
                    s.owner
                );
            }
        }
        other => bail!("invalid format option {other:?}: use table or json"),
    }
    Ok(())
}

fn spec(bundle: &std::path::Path, rootless: bool) -> Result<()> {
    if rootless {
        bail!("rootless containers are not supported by vessel");
    }
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let body = serde_json::to_string_pretty(&spec::default_spec())?;
    std::fs::write(&path, body + "\n").with_context(|| format!("writing {}", path.display()))
}

/// The global flags a monitor is started with (the same store, config
/// and logging as the `create` that starts it).
fn monitor_globals(cli: &Cli) -> Result<Vec<OsString>> {
    let mut g: Vec<OsString> = vec!["--root".into()];
    g.push(std::path::absolute(&cli.root)?.into());
    if let Some(c) = &cli.config {
        g.push("--config".into());
        g.push(std::path::absolute(c)?.into());
    }
    if let Some(l) = &cli.log {
        g.push("--log".into());
        g.push(std::path::absolute(l)?.into());
    }
    if let Some(v) = cli.log_format.to_possible_value() {
        g.push("--log-format".into());
        g.push(v.get_name().into());
    }
    if cli.debug {
        g.push("--debug".into());
    }
    if cli.systemd_cgroup {
        g.push("--systemd-cgroup".into());
    }
    Ok(g)
}

impl CreateArgs {
    /// The runtime's create options (`foreground` as given).
    fn options(&self, foreground: bool) -> Result<CreateOptions> {
        if self.preserve_fds > 0 {
            bail!("--preserve-fds is not supported: host descriptors cannot be passed into the VM");
        }
        Ok(CreateOptions {
            pid_file: self.pid_file.clone(),
            console_socket: self.console_socket.clone(),
            stdio: None,
            foreground,
            sandbox: self.sandbox.clone(),
        })
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cfg = Config::load(cli.config.as_deref())?;
    let store = Store::with_run_dir(&cli.root, &cfg.run_dir);
    let launcher = Launcher {
        exe: std::env::current_exe().context("finding the vessel binary")?,
        globals: monitor_globals(&cli)?,
    };
    let rt = Runtime {
        store,
        cfg,
        launcher,
        systemd_cgroup: cli.systemd_cgroup,
    };
    let ok = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match &cli.command {
        Command::State { id } => {
            let s = rt.state(id)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::List { format, quiet } => ok(list(&rt, format, *quiet)),
        Command::Delete { id, force } => Ok(rt.delete(id, *force).map(|()| ExitCode::SUCCESS)?),
        Command::Spec { bundle, rootless } => ok(spec(bundle, *rootless)),
        Command::Create(a) => {
            let o = a.options(false)?;
            rt.cfg.check_artifacts()?;
            let b = Bundle::load(&a.bundle)?;
            rt.create(&a.id, &b, &o)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { create: a, detach } => {
            let o = a.options(!detach)?;
            rt.cfg.check_artifacts()?;
            let b = Bundle::load(&a.bundle)?;
            Ok(ExitCode::from(rt.run(&a.id, &b, &o, *detach)?))
        }
        Command::Monitor {
            id,
            bundle,
            ready_fd,
            console_socket,
            sandbox,
            stage,
        } => {
            let console = console_socket.as_deref();
            Ok(ExitCode::from(match (sandbox, stage) {
                (Some(sandbox), Some(stage)) => {
                    let pod = vessel_shim::state::PodMember {
                        sandbox: sandbox.clone(),
                        stage: stage.clone(),
                    };
                    vessel_shim::runtime::pod::run_member(&rt, id, &pod, bundle, console, *ready_fd)
                }
                _ => monitor::run(&rt, id, bundle, console, *ready_fd),
            }))
        }
        Command::ExecMonitor(a) => Ok(ExitCode::from(exec::monitor(
            &rt,
            &a.id,
            &a.exec_id,
            &a.process_file,
            a.console_socket.as_deref(),
            a.ready_fd,
        ))),
        Command::Start { id } => Ok(rt.start(id).map(|()| ExitCode::SUCCESS)?),
        Command::Kill { id, signal, all } => {
            let sig = vessel_shim::signal::parse(signal.as_deref().unwrap_or("SIGTERM"))?;
            Ok(rt.kill(id, sig, *all).map(|()| ExitCode::SUCCESS)?)
        }
        Command::Exec(a) => Ok(ExitCode::from(rt.exec(&a.id, &a.options()?)?)),
        Command::Ps {
            id,
            format,
            ps_args,
        } => ok(cli::exec::ps(&rt, id, format, ps_args)),
        Command::Pause { id } => Ok(rt.pause(id).map(|()| ExitCode::SUCCESS)?),
        Command::Resume { id } => Ok(rt.resume(id).map(|()| ExitCode::SUCCESS)?),
        Command::Update(a) => ok(cli::resources::update(&rt, a)),
        Command::Events(a) => ok(cli::events::events(&rt, a)),
        Command::Features => ok(cli::features::features()),
        Command::Template(t) => ok(template(&rt.cfg, t)),
    }
}

fn template(cfg: &Config, cmd: &TemplateCommand) -> Result<()> {
    let templates = Templates::new(cfg);
    match cmd {
        TemplateCommand::Build { rebuild } => {
            cfg.check_artifacts()?;
            let t = std::time::Instant::now();
            let (dir, built) = templates.ensure(*rebuild)?;
            if built {
                println!(
                    "built {} in {:.1} s",
                    dir.display(),
                    t.elapsed().as_secs_f64()
                );
            } else {
                println!("{} is up to date", dir.display());
            }
        }
        TemplateCommand::List => {
            println!("{:<18} {:<8} {:>10}  DIR", "KEY", "CURRENT", "DISK MiB");
            for t in templates.list()? {
                println!(
                    "{:<18} {:<8} {:>10.1}  {}",
                    t.key,
                    if t.current { "yes" } else { "stale" },
                    t.disk_bytes as f64 / (1024.0 * 1024.0),
                    t.dir.display()
                );
            }
        }
        TemplateCommand::Rm { stale } => {
            for key in templates.remove(*stale)? {
                println!("removed {key}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("vessel: {e:#}");
        return ExitCode::from(1);
    }
    let logs_to_file = cli.log.is_some();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!("{msg}");
            // Without --log the record above is on stderr already; with it,
            // stderr gets the message too, for callers that only read stderr.
            if logs_to_file {
                eprintln!("vessel: {msg}");
            }
            ExitCode::from(1)
        }
    }
}

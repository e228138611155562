//! `vessel exec`, the hidden `vessel exec-monitor`, and `vessel ps`: runc's
//! flags, turned into [`ExecOptions`] for the runtime
//! ([`vessel_shim::runtime::exec`]).

use std::path::PathBuf;

use anyhow::{bail, Result};
use vessel_shim::runtime::exec::ExecOptions;
use vessel_shim::runtime::Runtime;

/// `vessel exec` (runc's flags).
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Container id.
    pub id: String,
    /// Command and arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// OCI process JSON.
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Allocate a pty.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Detach.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the host pid that stands for the process here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long, short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Add a capability to the bounding, effective and permitted sets.
    #[arg(long, short = 'c')]
    pub cap: Vec<String>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// SELinux label (accepted; the guest applies none).
    #[arg(long)]
    pub process_label: Option<String>,
    /// AppArmor profile (accepted; the guest applies none).
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Pass N extra file descriptors (not supported).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// The hidden `vessel exec-monitor`: runs one exec for a detached
/// `vessel exec`.
#[derive(Debug, clap::Args)]
pub struct ExecMonitorArgs {
    /// Container id.
    pub id: String,
    /// The exec's id.
    #[arg(long)]
    pub exec_id: String,
    /// The OCI process JSON (removed once read).
    #[arg(long)]
    pub process_file: PathBuf,
    /// Unix socket that receives the pty master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Pipe to report the start on.
    #[arg(long)]
    pub ready_fd: i32,
}

impl ExecArgs {
    /// The runtime's view of these flags.
    pub fn options(&self) -> Result<ExecOptions> {
        if self.preserve_fds > 0 {
            bail!("--preserve-fds is not supported: host descriptors cannot be passed into the VM");
        }
        Ok(ExecOptions {
            command: self.command.clone(),
            process: self.process.clone(),
            tty: self.tty,
            detach: self.detach,
            pid_file: self.pid_file.clone(),
            console_socket: self.console_socket.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            user: self.user.clone(),
            additional_gids: self.additional_gids.clone(),
            cap: self.cap.clone(),
            no_new_privs: self.no_new_privs,
            process_label: self.process_label.clone(),
            apparmor: self.apparmor.clone(),
        })
    }
}

/// `vessel ps`: the guest pids of the container's processes (from its
/// cgroup). `json`: a JSON array like runc; `table`: PID and the command
/// line read from the guest's /proc (runc runs the host's `ps` instead,
/// which cannot see into the VM, so `ps` arguments are refused).
pub fn ps(rt: &Runtime, id: &str, format: &str, ps_args: &[String]) -> Result<()> {
    if !matches!(format, "table" | "json") {
        bail!("invalid format option {format:?}: use table or json");
    }
    let (pids, mut c) = rt.pids(id)?;
    if format == "json" {
        println!("{}", serde_json::to_string(&pids)?);
        return Ok(());
    }
    if !ps_args.is_empty() {
        bail!("ps arguments are not supported: the processes run in the container's VM, where the host's ps cannot see them");
    }
    println!("{:>8}  CMD", "PID");
    for pid in pids {
        let cmd = c
            .read_file(vessel_proto::ReadFileRequest {
                path: format!("/proc/{pid}/cmdline"),
                max_len: 4096,
                offset: 0,
                discard: false,
            })
            .map(|d| {
                d.data
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|_| "?".into());
        println!("{pid:>8}  {cmd}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;
    use vessel_shim::runtime::exec::build_process;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ExecArgs,
    }

    fn args(v: &[&str]) -> ExecOptions {
        T::try_parse_from(std::iter::once("exec").chain(v.iter().copied()))
            .unwrap()
            .a
            .options()
            .unwrap()
    }

    #[test]
    fn process_follows_runc_overrides() {
        let d = std::env::temp_dir().join(format!("vessel-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rootfs")).unwrap();
        let spec = json!({"root": {"path": "rootfs"}, "process": {
            "args": ["init"], "env": ["PATH=/bin", "FOO=old"], "cwd": "/",
            "user": {"uid": 0, "gid": 5}, "consoleSize": {"height": 1, "width": 1},
            "capabilities": {"bounding": ["CAP_KILL"]}}});
        std::fs::write(d.join("config.json"), spec.to_string()).unwrap();
        let a = args(&[
            "-e",
            "FOO=new",
            "--cwd",
            "/tmp",
            "-u",
            "1000",
            "--cap",
            "net_raw",
            "-t",
            "--no-new-privs",
            "box",
            "sh",
            "-c",
            "echo hi",
        ]);
        let p = build_process(&a, &d).unwrap();
        assert_eq!(p["args"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(p["env"], json!(["PATH=/bin", "FOO=new"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"], json!({"uid": 1000, "gid": 5}));
        assert_eq!(p["terminal"], true);
        assert_eq!(p["noNewPrivileges"], true);
        assert!(p.get("consoleSize").is_none());
        assert_eq!(
            p["capabilities"]["bounding"],
            json!(["CAP_KILL", "CAP_NET_RAW"])
        );
        assert_eq!(p["capabilities"]["effective"], json!(["CAP_NET_RAW"]));
        let p = build_process(&args(&["-u", "7:8", "box", "id"]), &d).unwrap();
        assert_eq!(p["user"], json!({"uid": 7, "gid": 8}));
        assert!(build_process(&args(&["-u", "x", "box", "id"]), &d).is_err());
        assert!(build_process(&args(&["box"]), &d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}

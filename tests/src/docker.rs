//! A dockerd of a test's own (Debian's `docker.io` 20.10): private data
//! and exec roots and socket, in a network namespace the test created;
//! stopped, with everything it left, on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::engines::{leaks, output_within, poll_until, Netns, Timed};
use crate::TempDir;

/// The 20.10 client from Debian's `docker.io`.
pub const DOCKER: &str = "/usr/bin/docker";
/// dockerd from Debian's `docker.io`.
pub const DOCKERD: &str = "/usr/sbin/dockerd";

/// A dockerd of this test: its netns, directories and process; stopped,
/// with everything it left, on drop.
pub struct Dockerd {
    /// Its directories (data root, exec root, socket, log).
    pub tmp: TempDir,
    sock: PathBuf,
    exec_root: PathBuf,
    child: Option<Child>,
    /// The runtimes' process tag ([`crate::engines::TAG_VAR`]).
    pub tag: String,
    /// The network namespace it runs in.
    pub ns: Option<Netns>,
}

impl Dockerd {
    /// Starts dockerd in a new network namespace named after `name`, with
    /// the runtimes `wrappers` (`--add-runtime NAME=PATH`) and the network
    /// options `net_args` (e.g. `--bridge none`; none: docker's default
    /// bridge and iptables rules, inside that namespace); waits until it
    /// answers.
    pub fn start(
        name: &str,
        tmp: TempDir,
        wrappers: &[(&str, &Path)],
        tag: &str,
        net_args: &[&str],
    ) -> Dockerd {
        let ns = Netns::new(name);
        // Longer than the default /var/run/docker (15 bytes).
        let exec_root = tmp.0.join("exec-root");
        let data_root = tmp.0.join("data-root");
        let sock = tmp.0.join("docker.sock");
        let mut cmd = ns.command(DOCKERD);
        cmd.arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(tmp.0.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(net_args);
        for (name, path) in wrappers {
            cmd.arg("--add-runtime")
                .arg(format!("{name}={}", path.display()));
        }
        let log = fs::File::create(tmp.0.join("dockerd.log")).expect("dockerd.log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let d = Dockerd {
            tmp,
            sock,
            exec_root,
            child: Some(child),
            tag: tag.to_string(),
            ns: Some(ns),
        };
        let up = poll_until(Duration::from_secs(60), || {
            d.docker(&["version", "--format", "{{.Server.Version}}"], 10)
                .ok("version")
                .ok()
                .map(|t| t.stdout.clone())
        });
        assert!(
            up.is_some(),
            "dockerd did not answer within 60 s; its log:\n{}",
            d.log()
        );
        eprintln!("dockerd {} up", up.unwrap_or_default().trim());
        d
    }

    /// `docker -H SOCK args...`.
    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        c
    }

    /// `docker args...` within `secs` seconds.
    pub fn docker(&self, args: &[&str], secs: u64) -> Timed {
        output_within(&mut self.docker_cmd(args), Duration::from_secs(secs))
    }

    /// The last 30 lines of dockerd's log.
    pub fn log(&self) -> String {
        let l = fs::read_to_string(self.tmp.0.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `--root` dockerd gives every runtime.
    pub fn runtime_root(&self) -> PathBuf {
        self.exec_root.join("runtime-runc/moby")
    }

    /// Names of every container (`ps -a`).
    pub fn containers(&self) -> Vec<String> {
        self.docker(&["ps", "-a", "--format", "{{.Names}}"], 30)
            .stdout
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `inspect -f FORMAT name`, trimmed, or the error.
    pub fn inspect(&self, name: &str, format: &str) -> Result<String, String> {
        let t = self.docker(&["inspect", "-f", format, name], 30);
        t.ok("inspect")?;
        Ok(t.stdout.trim().to_string())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Runtime processes first: a monitor stuck on a pipe can hold the
        // shim, and with it every docker call on its container.
        let killed = leaks::kill_tagged(&self.tag);
        let left = self.containers();
        if !left.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(left.iter().map(String::as_str));
            let _ = self.docker(&args, 60);
        }
        let mut killed = killed;
        killed.extend(leaks::stop_daemon(
            self.child.take(),
            "dockerd",
            &self.tag,
            &self.tmp.0,
        ));
        if !left.is_empty() || !killed.is_empty() {
            eprintln!("cleanup: removed containers {left:?}, killed {killed:?}");
        }
        self.ns.take();
    }
}

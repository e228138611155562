//! A containerd 1.6 of a test (Debian's `containerd`): its own network
//! namespace, root, state and socket; stopped on drop with everything it
//! left (tasks, containers, tagged processes). Shared by `engine_containerd`,
//! `shim_v2` and the CRI tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::engines::{
    busybox_image_rootfs, leaks, output_within, poll_until, Netns, Timed, TAG_VAR,
};
use crate::TempDir;

/// The busybox image's name once imported.
pub const IMAGE: &str = "docker.io/library/vessel-busybox:1";

/// How a test's containerd is set up besides its own directories.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// Directory put first on containerd's PATH (where it finds shims).
    pub bin: Option<&'a Path>,
    /// Environment of containerd, inherited by every shim it starts.
    pub env: Vec<(&'a str, String)>,
    /// TOML appended to the generated config (after the CRI plugin's
    /// `restrict_oom_score_adj`, so it may add CRI tables).
    pub extra_config: String,
    /// Put the test's tag in containerd's environment, so that the shims
    /// it starts (and their children) carry it; containerd itself is then
    /// tagged too and spared by the cleanup's sweep of tagged processes.
    pub tagged: bool,
}

/// A containerd started by a test.
pub struct Containerd {
    /// Its directory (root, state, socket, config, log).
    pub tmp: TempDir,
    /// Its gRPC socket.
    pub sock: PathBuf,
    child: Option<Child>,
    /// The test's tag (see [`TAG_VAR`]).
    pub tag: String,
    ns: Option<Netns>,
    env: Vec<(String, String)>,
}

/// Starts containerd in `ns` with the config in `dir`, its output
/// appended to `dir/containerd.log`.
fn spawn(ns: &Netns, dir: &Path, env: &[(String, String)]) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .expect("containerd.log");
    let mut cmd = ns.command("containerd");
    cmd.arg("--config").arg(dir.join("containerd.toml"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn containerd")
}

impl Containerd {
    /// Starts containerd in a new netns named after `name`, tagged with
    /// `tag` (its shims and runtimes inherit the tag), and waits until
    /// `ctr version` answers.
    pub fn start(tmp: TempDir, tag: &str, name: &str, o: &Options<'_>) -> Containerd {
        let ns = Netns::new(name);
        let sock = tmp.0.join("containerd.sock");
        let config = tmp.0.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n{}",
                tmp.0.join("root"),
                tmp.0.join("state"),
                sock,
                o.extra_config
            ),
        )
        .expect("write containerd.toml");
        let mut env: Vec<(String, String)> = o
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        if o.tagged {
            env.push((TAG_VAR.to_string(), tag.to_string()));
        }
        if let Some(bin) = o.bin {
            let path = format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            env.push(("PATH".to_string(), path));
        }
        let child = spawn(&ns, &tmp.0, &env);
        let c = Containerd {
            tmp,
            sock,
            child: Some(child),
            tag: tag.to_string(),
            ns: Some(ns),
            env,
        };
        c.wait_up();
        c
    }

    /// Stops containerd (SIGTERM; its shims and tasks live on) and starts
    /// it again with the same configuration, as after an upgrade.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill with a pid and a signal number only.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if crate::engines::wait_within(&mut child, Duration::from_secs(30)).is_none() {
                eprintln!("containerd did not stop on SIGTERM within 30 s: killed");
            }
        }
        let ns = self.ns.as_ref().expect("containerd's netns");
        self.child = Some(spawn(ns, &self.tmp.0, &self.env));
        self.wait_up();
    }

    fn wait_up(&self) {
        let up = poll_until(Duration::from_secs(60), || {
            self.ctr(&["version"], 10).ok("version").ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "containerd did not answer within 60 s; its log:\n{}",
            self.log()
        );
    }

    /// containerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The test's network namespace containerd runs in.
    pub fn netns(&self) -> Option<&Netns> {
        self.ns.as_ref()
    }

    /// A `ctr --address SOCK ARGS` command.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).args(args);
        c
    }

    /// Runs `ctr ARGS`, killed after `secs`.
    pub fn ctr(&self, args: &[&str], secs: u64) -> Timed {
        output_within(&mut self.ctr_cmd(args), Duration::from_secs(secs))
    }

    /// The last 40 lines of containerd's log.
    pub fn log(&self) -> String {
        let l = fs::read_to_string(self.tmp.0.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// First column of `ctr <what> ls -q` in the default namespace.
    pub fn list(&self, what: &str) -> Vec<String> {
        self.ctr(&[what, "ls", "-q"], 30)
            .stdout
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// STATUS of task `id` in `task ls`, or the error.
    pub fn status(&self, id: &str) -> Result<String, String> {
        let t = self.ctr(&["task", "ls"], 30);
        t.ok("task ls")?;
        t.stdout
            .lines()
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.first() == Some(&id)).then(|| w.get(2).copied().unwrap_or("").to_string())
            })
            .ok_or_else(|| format!("task {id} not listed: {:?}", t.stdout))
    }

    /// Every `shim.log` of namespace `ns`'s task bundles, for a failure
    /// report.
    pub fn shim_logs(&self, ns: &str) -> String {
        let mut out = String::new();
        let dir = self
            .tmp
            .0
            .join("state/io.containerd.runtime.v2.task")
            .join(ns);
        for d in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(l) = fs::read_to_string(d.path().join("shim.log")) {
                out.push_str(&format!("{}/shim.log:\n{l}\n", d.path().display()));
            }
        }
        out
    }

    /// The busybox image (an OCI layout tar built with umoci in `work`)
    /// imported into containerd namespace `ns` as [`IMAGE`].
    pub fn import_busybox(&self, work: &Path, ns: &str) {
        let layout = work.join("layout");
        let bundle = work.join("umoci-bundle");
        let image = format!("{}:1", layout.display());
        let umoci = |args: &[&str]| {
            let t = output_within(Command::new("umoci").args(args), Duration::from_secs(120));
            t.ok(&format!("umoci {args:?}"))
                .map(|_| ())
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let l = layout.to_string_lossy().into_owned();
        let b = bundle.to_string_lossy().into_owned();
        umoci(&["init", "--layout", &l]);
        umoci(&["new", "--image", &image]);
        umoci(&["unpack", "--image", &image, &b]);
        busybox_image_rootfs(&bundle.join("rootfs"));
        umoci(&["repack", "--image", &image, &b]);
        umoci(&[
            "config",
            "--image",
            &image,
            "--config.env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]);
        let tar = work.join("layout.tar");
        crate::engines::tar_dir(&layout, &tar);
        let t = self.ctr(
            &[
                "-n",
                ns,
                "images",
                "import",
                "--base-name",
                "docker.io/library/vessel-busybox",
                &tar.to_string_lossy(),
            ],
            120,
        );
        t.ok("ctr images import").unwrap_or_else(|e| panic!("{e}"));
        let listed = self.ctr(&["-n", ns, "images", "ls", "-q"], 30).stdout;
        assert!(listed.lines().any(|l| l == IMAGE), "images: {listed:?}");
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Runtime processes first: a monitor stuck on a pipe can hold the
        // shim, and with it every ctr call on its task.
        let me = self.pid().map(|p| p as i32);
        let mut killed = Vec::new();
        for (pid, _) in leaks::tagged_processes(&self.tag) {
            if Some(pid) != me {
                // SAFETY: kill with a pid and a signal number only.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.push(pid);
            }
        }
        let tasks = self.list("task");
        for t in &tasks {
            let _ = self.ctr(&["task", "rm", "-f", t], 30);
        }
        let containers = self.list("containers");
        for c in &containers {
            let _ = self.ctr(&["containers", "rm", c], 30);
        }
        killed.extend(leaks::stop_daemon(
            self.child.take(),
            "containerd",
            &self.tag,
            &self.tmp.0,
        ));
        if !tasks.is_empty() || !containers.is_empty() || !killed.is_empty() {
            eprintln!(
                "cleanup: removed tasks {tasks:?}, containers {containers:?}, killed {killed:?}"
            );
        }
        self.ns.take();
    }
}

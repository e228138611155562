//! containerd 1.6 (Debian's `containerd`) runs vessel through its own shim
//! v2, `containerd-shim-vessel-v2` (runtime `io.containerd.vessel.v2`):
//! `ctr run --rm --runtime io.containerd.vessel.v2` of `uname -r` prints
//! the guest kernel's release, `sh -c 'exit 3'` exits 3, and afterwards no
//! task, container, shim, `vessel-vmm`, monitor, socket or state is left.
//!
//! The test starts its own containerd in a network namespace with its own
//! root, state and socket (as `engine_containerd` does), with the shim on
//! its PATH and the test's tag, `VESSEL_CONFIG` and `VESSEL_SHIM_ROOT` in
//! its environment, which every shim it starts inherits.
//!
//! Needs Debian's `containerd`, `umoci`, `busybox-static` and `iproute2`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vessel_tests::engines::{
    busybox_image_rootfs, leaks, output_within, poll_until, require_tools, Netns, Timed, TAG_VAR,
};
use vessel_tests::{kvm_available_or_skip, workspace_root, Artifacts, TempDir};

const IMAGE: &str = "docker.io/library/vessel-busybox:1";
const RUNTIME: &str = "io.containerd.vessel.v2";

struct Containerd {
    tmp: TempDir,
    sock: PathBuf,
    child: Option<Child>,
    tag: String,
    ns: Option<Netns>,
}

impl Containerd {
    fn start(tmp: TempDir, tag: &str, bin: &Path, config: &Path, shim_root: &Path) -> Containerd {
        let ns = Netns::new("shimv2");
        let sock = tmp.0.join("containerd.sock");
        let cfg = tmp.0.join("containerd.toml");
        fs::write(
            &cfg,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n",
                tmp.0.join("root"),
                tmp.0.join("state"),
                sock
            ),
        )
        .expect("write containerd.toml");
        let log = fs::File::create(tmp.0.join("containerd.log")).expect("containerd.log");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = ns
            .command("containerd")
            .arg("--config")
            .arg(&cfg)
            .env("PATH", path)
            .env(TAG_VAR, tag)
            .env("VESSEL_CONFIG", config)
            .env("VESSEL_SHIM_ROOT", shim_root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let c = Containerd {
            tmp,
            sock,
            child: Some(child),
            tag: tag.to_string(),
            ns: Some(ns),
        };
        let up = poll_until(Duration::from_secs(60), || {
            c.ctr(&["version"], 10).ok("version").ok().map(|_| ())
        });
        assert!(up.is_some(), "containerd did not answer; log:\n{}", c.log());
        c
    }

    fn ctr(&self, args: &[&str], secs: u64) -> Timed {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock).args(args);
        output_within(&mut c, Duration::from_secs(secs))
    }

    fn log(&self) -> String {
        let l = fs::read_to_string(self.tmp.0.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn list(&self, what: &str) -> Vec<String> {
        self.ctr(&[what, "ls", "-q"], 30)
            .stdout
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for t in self.list("task") {
            let _ = self.ctr(&["task", "rm", "-f", &t], 30);
        }
        for c in self.list("containers") {
            let _ = self.ctr(&["containers", "rm", &c], 30);
        }
        let killed = leaks::stop_daemon(self.child.take(), "containerd", &self.tag, &self.tmp.0);
        if !killed.is_empty() {
            eprintln!("cleanup: killed {killed:?}");
        }
        self.ns.take();
    }
}

/// The busybox image (umoci layout tar) imported into `c`.
fn import_image(c: &Containerd, work: &Path) {
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
    vessel_tests::engines::tar_dir(&layout, &tar);
    let t = c.ctr(
        &[
            "images",
            "import",
            "--base-name",
            "docker.io/library/vessel-busybox",
            &tar.to_string_lossy(),
        ],
        120,
    );
    t.ok("ctr images import").unwrap_or_else(|e| panic!("{e}"));
}

/// The release in the guest kernel's `Linux version X (...)` banner.
fn guest_release(vmlinux: &Path) -> String {
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

/// Task sockets in the shim's socket directory, except `known`.
fn shim_sockets(known: &[String]) -> Vec<String> {
    fs::read_dir("/run/vessel-shim")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".sock"))
        .map(|p| format!("socket {p}"))
        .filter(|s| !known.contains(s))
        .collect()
}

#[test]
fn ctr_runs_tasks_through_the_vessel_shim() {
    if !kvm_available_or_skip() {
        return;
    }
    require_tools(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("umoci", "umoci"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ]);
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let release_dir = workspace_root().join("target/release");
    let shim = release_dir.join("containerd-shim-vessel-v2");
    assert!(
        shim.exists() && release_dir.join("vessel").exists(),
        "{} or vessel missing (run `cargo xtask build`)",
        shim.display()
    );
    let tmp = TempDir::new("shim-v2");
    let tag = format!("shimv2-{}", std::process::id());
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-vessel-v2")).expect("symlink");
    let config = tmp.0.join("vessel.toml");
    fs::write(&config, art.vessel_config(&tmp.0.join("templates"), "")).expect("vessel.toml");
    let shim_root = tmp.0.join("shim-root");
    let work = tmp.0.join("image");
    fs::create_dir_all(&work).expect("mkdir image");
    let want = guest_release(&art.kernel);
    let tmp_path = tmp.0.clone();

    let sockets_before = shim_sockets(&[]);
    let c = Containerd::start(tmp, &tag, &bin, &config, &shim_root);
    import_image(&c, &work);

    let run = |id: &str, cmd: &[&str]| -> Timed {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        c.ctr(&args, 300)
    };
    let mut failures = Vec::new();
    let t = run("uname", &["uname", "-r"]);
    let got = t.stdout.trim().to_string();
    eprintln!("uname -r: {got:?} (want {want:?}) in {:.1?}", t.took);
    if t.status.map(|s| s.code()) != Some(Some(0)) || got != want {
        failures.push(format!(
            "uname -r: status {:?}, stdout {:?}, stderr {:?}; want {want:?}",
            t.status, t.stdout, t.stderr
        ));
    }
    let t = run("exit3", &["sh", "-c", "exit 3"]);
    eprintln!("exit 3: {:?} in {:.1?}", t.status, t.took);
    if t.status.map(|s| s.code()) != Some(Some(3)) {
        failures.push(format!(
            "sh -c 'exit 3': status {:?}, stderr {:?}",
            t.status, t.stderr
        ));
    }
    let (tasks, containers) = (c.list("task"), c.list("containers"));
    if !tasks.is_empty() || !containers.is_empty() {
        failures.push(format!("left: tasks {tasks:?}, containers {containers:?}"));
    }
    // containerd carries the tag too (its shims inherit it from it).
    let daemon = c.child.as_ref().map(|ch| format!("process {}:", ch.id()));
    let find = || -> Vec<String> {
        let mut f = leaks::find(&tag, &[&tmp_path], &[shim_root.as_path()]);
        if let Some(d) = &daemon {
            f.retain(|l| !l.starts_with(d.as_str()));
        }
        f.extend(shim_sockets(&sockets_before));
        f
    };
    if poll_until(Duration::from_secs(20), || find().is_empty().then_some(())).is_none() {
        failures.push(format!("left behind: {:?}", find()));
    }
    if !failures.is_empty() {
        eprintln!("containerd log:\n{}", c.log());
        for d in fs::read_dir(c.tmp.0.join("state/io.containerd.runtime.v2.task/default"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(l) = fs::read_to_string(d.path().join("shim.log")) {
                eprintln!("{}/shim.log:\n{l}", d.path().display());
            }
        }
    }
    drop(c);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

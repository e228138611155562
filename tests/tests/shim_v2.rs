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
use std::path::Path;
use std::time::Duration;

use vessel_tests::containerd::{Containerd, Options, IMAGE};
use vessel_tests::engines::{leaks, poll_until, require_tools, Timed};
use vessel_tests::{kvm_available_or_skip, workspace_root, Artifacts, TempDir};

const RUNTIME: &str = "io.containerd.vessel.v2";

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
    let opts = Options {
        bin: Some(&bin),
        env: vec![
            ("VESSEL_CONFIG", config.display().to_string()),
            ("VESSEL_SHIM_ROOT", shim_root.display().to_string()),
        ],
        tagged: true,
        ..Options::default()
    };
    let c = Containerd::start(tmp, &tag, "shimv2", &opts);
    c.import_busybox(&work, "default");

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
    let daemon = c.pid().map(|p| format!("process {p}:"));
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
        eprintln!("{}", c.shim_logs("default"));
    }
    drop(c);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

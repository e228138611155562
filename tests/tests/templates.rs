//! Templates in the runtime: `vessel template build|list|rm` against a
//! config file pointing at this build's artifacts, a corrupt template is
//! rebuilt, a template whose inputs changed is stale; and a sandbox
//! restored from the template by the runtime's library answers with its own
//! root filesystem and a reseeded RNG. Two cold boots in all (build and the
//! rebuild after corruption).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vessel_proto::ReadFileRequest;
use vessel_shim::config::Config;
use vessel_shim::sandbox::{Dirs, HostSide, Sandbox, Templates, MOUNTS_TAG, ROOTFS_TAG};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir};

fn vessel(bin: &Path, config: &Path, args: &[&str]) -> Output {
    let o = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run vessel");
    assert!(
        o.status.success(),
        "vessel {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn template_build_list_rebuild_rm_and_restore() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let bin = art.vmm.with_file_name("vessel");
    assert!(
        bin.is_file(),
        "{} missing (cargo xtask build)",
        bin.display()
    );
    let tmp = TempDir::new("tmpl");
    let tdir = tmp.0.join("templates");
    let config = tmp.0.join("config.toml");
    let write_config = |mem: u64| {
        std::fs::write(
            &config,
            format!(
                "vmm = {:?}\nkernel = {:?}\ninitrd = {:?}\ntemplate_dir = {:?}\nmem_mib = {mem}\n",
                art.vmm, art.kernel, art.initrd, tdir
            ),
        )
        .unwrap();
    };
    write_config(128);

    assert_eq!(
        stdout(&vessel(&bin, &config, &["template", "list"]))
            .lines()
            .count(),
        1
    );
    let out = stdout(&vessel(&bin, &config, &["template", "build"]));
    assert!(out.starts_with("built "), "{out}");
    let list = stdout(&vessel(&bin, &config, &["template", "list"]));
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.lines().nth(1).unwrap().contains(" yes "), "{list}");
    let t = Instant::now();
    let out = stdout(&vessel(&bin, &config, &["template", "build"]));
    assert!(out.contains("up to date"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // A sandbox restored from it, with its own root filesystem.
    let cfg = Config::load(Some(&config)).expect("config");
    let templates = Templates::new(&cfg);
    let (tpl, built) = templates.ensure(false).expect("template");
    assert!(!built);
    let rootfs = tmp.0.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("os-release"), b"NAME=vessel-test\n").unwrap();
    let t = Instant::now();
    let (sb, mut c) = Sandbox::restore(
        &cfg,
        &tpl,
        Dirs::one(&tmp.0.join("sb1")),
        &[
            format!("{ROOTFS_TAG}={},ro", rootfs.display()),
            format!("{MOUNTS_TAG}={},ro", rootfs.display()),
        ],
        &HostSide::default(),
        Some("sb1".into()),
    )
    .expect("restore");
    eprintln!("restore + Restored: {:?}", t.elapsed());
    assert_eq!(c.ping().unwrap().uname.nodename, "sb1");
    c.mount(ROOTFS_TAG, "/run/rootfs", true)
        .expect("mount rootfs");
    let d = c
        .read_file(ReadFileRequest {
            path: "/run/rootfs/os-release".into(),
            max_len: 4096,
            offset: 0,
            discard: false,
        })
        .expect("read");
    assert_eq!(d.data, b"NAME=vessel-test\n");
    sb.shutdown(&mut c, Duration::from_secs(30))
        .expect("sandbox shutdown");
    assert!(!tmp.0.join("sb1/vsock.sock").exists());

    // Corrupt: the state's checksum fails, so the next build rebuilds.
    let state = tpl.join("vmstate");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    assert!(templates.check(&tpl).is_err());
    let out = stdout(&vessel(&bin, &config, &["template", "build"]));
    assert!(out.starts_with("built "), "{out}");
    templates.check(&tpl).expect("rebuilt template is valid");

    // Inputs changed: the old template is stale; rm --stale removes it.
    write_config(96);
    let list = stdout(&vessel(&bin, &config, &["template", "list"]));
    assert!(list.contains("stale"), "{list}");
    let out = stdout(&vessel(&bin, &config, &["template", "rm", "--stale"]));
    assert!(out.starts_with("removed "), "{out}");
    assert_eq!(
        stdout(&vessel(&bin, &config, &["template", "list"]))
            .lines()
            .count(),
        1
    );
    assert!(!tpl.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&tdir).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

//! Templates with virtio-fs: a template VM boots with a share it never
//! mounts (tag `rootfs`, an empty directory), is snapshotted, and two
//! clones restored from it bind that tag to directories of their own; each
//! mounts it and reads its own file. Once the guest has mounted a share,
//! a snapshot is refused (the FUSE server's state cannot be saved), and a
//! restore whose `--fs` tags differ from the snapshot's is refused. One
//! cold boot for everything; nothing is left behind.

use std::path::Path;
use std::time::Duration;

use vessel_proto::ReadFileRequest;
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

fn share(tag: &str, dir: &Path) -> String {
    format!("{tag}={}", dir.display())
}

#[test]
fn template_with_unused_share_serves_each_clone_its_own_directory() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let empty = TempDir::new("tfs-empty");
    let a = TempDir::new("tfs-a");
    let b = TempDir::new("tfs-b");
    std::fs::write(a.0.join("hello"), b"from directory A\n").unwrap();
    std::fs::write(b.0.join("hello"), b"from directory B\n").unwrap();
    let snap = TempDir::new("tfs-snap");
    let snap_dir = snap.0.join("template");

    // The template: one cold boot with an unmounted share.
    let opts = VmOptions {
        api_sock: true,
        shares: vec![share("rootfs", &empty.0)],
        ..VmOptions::default()
    };
    let mut template = VmProcess::spawn(&art, &opts).expect("spawn template");
    let mut tc = template
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = template
        .api(&format!("snapshot {}", snap_dir.display()))
        .unwrap();
    assert!(answer.starts_with("OK snapshot"), "{answer}");

    // Once mounted, the share has FUSE state: no more snapshots.
    tc.mount("rootfs", "/mnt/r", true).expect("template mount");
    let answer = template
        .api(&format!("snapshot {}", snap.0.join("refused").display()))
        .unwrap();
    assert!(
        answer.starts_with("ERR ") && answer.contains("in use"),
        "{answer}"
    );
    assert!(!snap.0.join("refused").join("vmstate").exists());
    tc.shutdown().expect("template shutdown");
    let status = template.wait_exit(Duration::from_secs(60)).expect("exit");
    assert!(status.success(), "template: {status}");

    // A restore must name exactly the snapshot's tags.
    for bad in [vec![], vec![share("other", &a.0)]] {
        let mut vm =
            VmProcess::restore_with_shares(&art, &snap_dir, 9, &bad).expect("spawn bad restore");
        let status = vm
            .wait_exit(Duration::from_secs(30))
            .expect("bad restore exits");
        assert!(!status.success());
        let err = vm.stderr();
        assert!(err.contains("virtio-fs tags"), "{err}");
        assert!(!vm.uds.exists());
    }

    // Two clones, each with its own directory behind the same tag.
    for (cid, dir, want) in [
        (7u32, &a.0, "from directory A\n"),
        (8u32, &b.0, "from directory B\n"),
    ] {
        let mut vm = VmProcess::restore_with_shares(&art, &snap_dir, cid, &[share("rootfs", dir)])
            .expect("spawn clone");
        let mut c = vm
            .connect_and_ping(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("clone {cid}: {e}; serial: {}", vm.serial_output()));
        c.mount("rootfs", "/mnt/r", true).expect("clone mount");
        let d = c
            .read_file(ReadFileRequest {
                path: "/mnt/r/hello".into(),
                max_len: 4096,
                offset: 0,
                discard: false,
            })
            .expect("read hello");
        assert_eq!(String::from_utf8_lossy(&d.data), want, "clone {cid}");
        let pid = vm.pid();
        c.shutdown().expect("clone shutdown");
        let status = vm.wait_exit(Duration::from_secs(60)).expect("clone exit");
        assert!(status.success(), "clone {cid}: {status}: {}", vm.stderr());
        assert!(!vm.uds.exists(), "clone {cid} left its socket");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "clone {cid} still runs"
        );
    }
}

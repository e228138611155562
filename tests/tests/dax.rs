//! virtio-fs DAX on a real VM: one boot with four devices sharing the
//! same host directory: `dax` (read-write, 64 MiB window), `plain` (no
//! window), `rodax` (read-only, 16 MiB window) and `daxinode` (16 MiB
//! window, mounted without `dax`). Checks, against that one boot:
//!
//! - `Mount { dax: true }` works on a device with a window (and
//!   `/proc/mounts` says `dax=always`), and fails on one without;
//! - a windowed share mounted without `dax` still maps files (the kernel's
//!   per-inode mode, the server marks every file DAX);
//! - a file larger than one 2 MiB DAX chunk whose size is not a multiple of
//!   the page size reads the same through DAX (`read(2)` and `mmap`),
//!   through the plain share, and on the host, byte for byte around the
//!   chunk boundary and at the end of the file;
//! - the VMM really maps the host file into the window (its
//!   `/proc/PID/maps`), read-only when the guest only reads;
//! - the read-only DAX share refuses writes through a read-write mount;
//! - a container whose rootfs is a windowed share (`ctr`, busybox; the agent
//!   mounts it itself, without `dax`) runs busybox from it and overwrites
//!   bytes inside an existing file: a writable DAX mapping (`rw-s` in the
//!   VMM), and the host file has the new bytes at the same length;
//! - reading more than its 16 MiB window holds (the guest reclaims ranges)
//!   still gives the right bytes;
//! - the guest's read throughput of a `VESSEL_DAX_BENCH_MIB` (default 8)
//!   MiB file with and without DAX (`read(2)` with 1 MiB reads, and `mmap`),
//!   guest clock, is printed;
//! - a snapshot taken before any mount keeps the windows: a clone restored
//!   from it (its `--fs` without `dax`: the snapshot's window) mounts with DAX and
//!   maps files; a restore asking for another window size is refused; once
//!   mounted, snapshots are refused;
//! - a file the clone has mapped, truncated on the host behind its back and
//!   then read again through `mmap`: either the guest sees the new size
//!   (what happens: opening revalidates it), or the VM stops with `KVM_RUN`
//!   failing and the VMM exits with status 1, not by `SIGBUS` (which of the
//!   two happened is printed);
//! - `Shutdown` ends the VMM with status 0.

use std::time::{Duration, Instant};

use serde_json::json;
use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::container::{CreateContainerRequest, RootfsSource, StdioSpec};
use vessel_proto::{fnv1a, ReadFileRequest, FNV1A_INIT};
use vessel_tests::fsread::{guest_read, mount_share, vmm_mappings};
use vessel_tests::{
    kvm_available_or_skip, pattern, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT,
};

/// Largest `ReadFile` answered in one frame (guest->host vsock packets
/// above about 32 KiB are lost today; see vmm/VIRTIOFS.md).
const READ_CHUNK: u64 = 6 * 1024;

/// Reads `len` bytes at `offset` in chunks of [`READ_CHUNK`].
fn read_at(c: &mut AgentClient, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let d = c.read_file(ReadFileRequest {
            path: path.into(),
            max_len: READ_CHUNK.min(len - out.len() as u64),
            offset: offset + out.len() as u64,
            discard: false,
        })?;
        out.extend_from_slice(&d.data);
        if d.eof || out.len() as u64 >= len {
            return Ok(out);
        }
    }
}

/// `(length, fnv1a, guest seconds)` of a whole-file read in the guest.
fn checksum(c: &mut AgentClient, path: &str, mmap: bool) -> (u64, u64, f64) {
    let r =
        guest_read(c, path, mmap).unwrap_or_else(|e| panic!("reading {path} (mmap: {mmap}): {e}"));
    (r.len, r.fnv1a, r.secs)
}

/// A minimal runc-like spec running `args` with a writable rootfs.
fn spec(args: &[&str]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ctr",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "network"}]
        }
    })
}

#[test]
fn dax_reads_match_and_map_host_pages() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = TempDir::new("dax");
    let data = root.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Two full 2 MiB chunks and a partial third, not page aligned.
    let odd = pattern((4 << 20) + 5000, 11);
    std::fs::write(data.join("odd.bin"), &odd).unwrap();
    std::fs::write(data.join("victim.bin"), &odd).unwrap();
    std::fs::write(data.join("small.txt"), b"small file\n").unwrap();
    let inode_file = pattern(300_000, 17);
    std::fs::write(data.join("inode.bin"), &inode_file).unwrap();
    let bench_mib: usize = std::env::var("VESSEL_DAX_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let bench = pattern(bench_mib << 20, 5);
    let bench_sum = fnv1a(FNV1A_INIT, &bench);
    std::fs::write(data.join("bench.bin"), &bench).unwrap();
    drop(bench);
    // The two read paths must agree on a second copy too (not only on
    // one file the host has cached for the other share).
    // A busybox root filesystem for a container, on a windowed share.
    let ctr = root.0.join("ctr");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(ctr.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", ctr.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
    for a in ["sh", "dd"] {
        std::os::unix::fs::symlink("busybox", ctr.join("bin").join(a)).unwrap();
    }
    let ctr_data = pattern(3 * 4096 + 77, 23);
    std::fs::write(ctr.join("data.bin"), &ctr_data).unwrap();
    let bench_plain = data.join("bench-plain.bin");
    std::fs::copy(data.join("bench.bin"), &bench_plain).unwrap();

    let opts = VmOptions {
        mem_mib: 256,
        api_sock: true,
        shares: vec![
            format!("dax={},dax=64M", data.display()),
            format!("plain={}", data.display()),
            format!("rodax={},ro,dax=16M", data.display()),
            format!("daxinode={},dax=16M", data.display()),
            format!("ctr={},dax=16M", ctr.display()),
        ],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::spawn(&art, &opts).expect("spawn vessel-vmm");
    let pid = vm.pid();
    let mut c = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", vm.started.elapsed());
    c.set_timeout(Some(Duration::from_secs(900))).unwrap();
    // A template: snapshot before any mount (the guest has probed the
    // devices, so it knows where the windows are).
    let snap = root.0.join("snap");
    let answer = vm.api(&format!("snapshot {}", snap.display())).unwrap();
    assert!(answer.starts_with("OK snapshot"), "{answer}");

    // Mounts.
    let t = Instant::now();
    if let Err(e) = mount_share(&mut c, "dax", "/mnt/dax", false, true) {
        panic!("DAX mount failed: {e}\nserial:\n{}", vm.serial_output());
    }
    eprintln!("DAX mount took {:?}", t.elapsed());
    // Before its first mount (later mounts of a tag share the first one's
    // superblock and options).
    match mount_share(&mut c, "plain", "/mnt/plain-dax", false, true) {
        Err(ClientError::Remote(e)) => eprintln!("dax=always without a window: {}", e.message),
        other => panic!("DAX mount of a share without a window: {other:?}"),
    }
    mount_share(&mut c, "plain", "/mnt/plain", false, false).expect("mount plain");
    mount_share(&mut c, "rodax", "/mnt/rodax", false, true).expect("mount rodax");
    mount_share(&mut c, "daxinode", "/mnt/daxinode", false, false).expect("mount daxinode");
    let mounts = String::from_utf8(read_at(&mut c, "/proc/mounts", 0, 64 * 1024).unwrap())
        .expect("/proc/mounts is text");
    // The mount options of `target`.
    let options = |target: &str| {
        mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(target))
            .and_then(|l| l.split(' ').nth(3))
            .unwrap_or_else(|| panic!("{target} not in /proc/mounts:\n{mounts}"))
            .to_string()
    };
    let has_dax = |target: &str| options(target).split(',').any(|o| o.starts_with("dax"));
    eprintln!("/mnt/dax: {}", options("/mnt/dax"));
    assert!(options("/mnt/dax").contains("dax=always"), "{mounts}");
    assert!(options("/mnt/rodax").contains("dax=always"), "{mounts}");
    assert!(!has_dax("/mnt/plain"), "{mounts}");
    assert!(!has_dax("/mnt/daxinode"), "{mounts}");

    // Same bytes through DAX, without DAX and on the host.
    let odd_sum = fnv1a(FNV1A_INIT, &odd);
    for (path, mmap) in [
        ("/mnt/dax/odd.bin", false),
        ("/mnt/dax/odd.bin", true),
        ("/mnt/plain/odd.bin", false),
        ("/mnt/plain/odd.bin", true),
        ("/mnt/rodax/odd.bin", false),
        ("/mnt/rodax/odd.bin", true),
    ] {
        let (len, sum, _) = checksum(&mut c, path, mmap);
        assert_eq!(len, odd.len() as u64, "{path} mmap {mmap}");
        assert_eq!(
            sum, odd_sum,
            "{path} (mmap: {mmap}) differs from the host's bytes"
        );
    }
    let boundary = (2 << 20) - READ_CHUNK;
    let tail = odd.len() as u64 - 3000;
    for (off, len) in [(0, READ_CHUNK), (boundary, 2 * READ_CHUNK), (tail, 3000)] {
        let range = off as usize..(off + len) as usize;
        let dax = read_at(&mut c, "/mnt/dax/odd.bin", off, len).unwrap();
        let plain = read_at(&mut c, "/mnt/plain/odd.bin", off, len).unwrap();
        assert!(dax == odd[range.clone()], "DAX bytes at {off:#x} differ");
        assert!(plain == odd[range], "plain bytes at {off:#x} differ");
    }
    assert_eq!(
        read_at(&mut c, "/mnt/dax/small.txt", 0, 4096).unwrap(),
        b"small file\n"
    );

    // The VMM maps the host file into the window, read-only for reads.
    let maps = vmm_mappings(pid, &data.join("odd.bin"));
    eprintln!("VMM mappings of odd.bin:\n{}", maps.join("\n"));
    assert!(!maps.is_empty(), "odd.bin is not mapped in the VMM");
    for l in &maps {
        let perms = l.split_whitespace().nth(1).unwrap_or("");
        assert!(perms.starts_with("r-") && perms.ends_with('s'), "{l}");
    }

    // Per-inode mode: inode.bin is only read through /mnt/daxinode.
    let (len, sum, _) = checksum(&mut c, "/mnt/daxinode/inode.bin", false);
    assert_eq!(
        (len, sum),
        (inode_file.len() as u64, fnv1a(FNV1A_INIT, &inode_file))
    );
    assert!(
        !vmm_mappings(pid, &data.join("inode.bin")).is_empty(),
        "a windowed share mounted without dax=always does not use DAX"
    );

    let answer = vm
        .api(&format!("snapshot {}", root.0.join("refused").display()))
        .unwrap();
    assert!(
        answer.starts_with("ERR ") && answer.contains("in use"),
        "{answer}"
    );

    // Writes: the read-write DAX share takes them, the read-only one
    // refuses them although the guest mounted it read-write.
    let from_guest = pattern(10_000, 3);
    c.write_file("/mnt/dax/from-guest.bin", &from_guest)
        .expect("write through the DAX share");
    assert_eq!(
        std::fs::read(data.join("from-guest.bin")).unwrap(),
        from_guest
    );
    assert_eq!(
        read_at(&mut c, "/mnt/dax/from-guest.bin", 0, 20_000).unwrap(),
        from_guest
    );
    for path in ["/mnt/rodax/small.txt", "/mnt/rodax/new.txt"] {
        match c.write_file(path, b"overwritten") {
            Err(ClientError::Remote(e)) => {
                assert!(e.message.contains("Read-only"), "{path}: {}", e.message)
            }
            other => panic!("write to {path}: {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read(data.join("small.txt")).unwrap(),
        b"small file\n"
    );
    assert!(!data.join("new.txt").exists());

    // A container on a windowed rootfs: exec from DAX, and a write inside
    // an existing file (not extending it) through a writable mapping.
    let req = CreateContainerRequest {
        id: "daxctr".into(),
        rootfs: RootfsSource {
            tag: Some("ctr".into()),
            path: "/run/vessel/daxctr/rootfs".into(),
        },
        spec: spec(&[
            "sh",
            "-c",
            "printf XYZ | dd of=/data.bin bs=1 seek=100 conv=notrunc && exit 7",
        ]),
        stdio: StdioSpec::default(),
    };
    c.create_container(req).expect("create the container");
    c.start_container("daxctr").expect("start the container");
    let exit = c.wait_process("daxctr", None).expect("wait the container");
    assert_eq!(exit.status, 7, "{exit:?}");
    c.delete_container("daxctr", false)
        .expect("delete the container");
    let mut want = ctr_data.clone();
    want[100..103].copy_from_slice(b"XYZ");
    assert!(
        std::fs::read(ctr.join("data.bin")).unwrap() == want,
        "data.bin on the host lacks the container's write"
    );
    let busybox_maps = vmm_mappings(pid, &ctr.join("bin/busybox"));
    let data_maps = vmm_mappings(pid, &ctr.join("data.bin"));
    eprintln!(
        "container: busybox mapped {} times; data.bin: {data_maps:?}",
        busybox_maps.len()
    );
    assert!(!busybox_maps.is_empty(), "busybox did not run from DAX");
    assert!(
        data_maps
            .iter()
            .any(|l| l.split_whitespace().nth(1) == Some("rw-s")),
        "no writable DAX mapping of data.bin"
    );

    // Throughput, guest clock.
    let mut results = Vec::new();
    for (label, path, mmap) in [
        ("plain read(2), cold", "/mnt/plain/bench-plain.bin", false),
        ("plain read(2), warm", "/mnt/plain/bench-plain.bin", false),
        ("plain mmap, warm", "/mnt/plain/bench-plain.bin", true),
        ("DAX read(2), first", "/mnt/dax/bench.bin", false),
        ("DAX read(2), again", "/mnt/dax/bench.bin", false),
        ("DAX mmap", "/mnt/dax/bench.bin", true),
    ] {
        let (len, sum, secs) = checksum(&mut c, path, mmap);
        assert_eq!(len, (bench_mib << 20) as u64, "{label}");
        assert_eq!(sum, bench_sum, "{label}: checksum differs");
        let rate = bench_mib as f64 / secs.max(1e-6);
        eprintln!("{label}: {bench_mib} MiB in {secs:.2} s guest time = {rate:.1} MiB/s");
        results.push((label, rate));
    }
    assert!(
        vmm_mappings(pid, &bench_plain).is_empty(),
        "the plain share must not map files"
    );

    // More data than the 16 MiB read-only window holds: the guest must
    // reclaim ranges (REMOVEMAPPING) and map others, and still read the
    // right bytes.
    let t = Instant::now();
    for _ in 0..2 {
        for path in ["/mnt/rodax/bench.bin", "/mnt/rodax/bench-plain.bin"] {
            let (len, sum, _) = checksum(&mut c, path, false);
            assert_eq!((len, sum), ((bench_mib << 20) as u64, bench_sum), "{path}");
        }
    }
    eprintln!(
        "read 4 x {bench_mib} MiB through the 16 MiB window in {:?}",
        t.elapsed()
    );
    let maps = vmm_mappings(pid, &data.join("bench.bin"));
    eprintln!("VMM mappings of bench.bin: {}", maps.len());
    assert!(!maps.is_empty(), "bench.bin is not mapped in the VMM");

    c.shutdown().expect("shutdown");
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .expect("VMM did not exit after Shutdown");
    assert!(
        status.success(),
        "VMM exit status {status}: {}",
        vm.stderr()
    );
    eprintln!("summary (MiB/s): {results:?}");

    // Clones of the snapshot: the window must be the snapshot's.
    let restore_shares = |dax_opt: &str| {
        vec![
            format!("dax={}{dax_opt}", data.display()),
            format!("plain={}", data.display()),
            format!("rodax={},ro", data.display()),
            format!("daxinode={},dax=16M", data.display()),
            format!("ctr={}", ctr.display()),
        ]
    };
    let mut bad = VmProcess::restore_with_shares(&art, &snap, 9, &restore_shares(",dax=32M"))
        .expect("spawn bad restore");
    let status = bad
        .wait_exit(Duration::from_secs(60))
        .expect("bad restore exits");
    assert!(!status.success());
    let err = bad.stderr();
    assert!(err.contains("DAX window"), "{err}");
    let mut clone =
        VmProcess::restore_with_shares(&art, &snap, 10, &restore_shares("")).expect("spawn clone");
    let mut cc = clone
        .connect_and_ping(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("clone: {e}; serial: {}", clone.serial_output()));
    cc.set_timeout(Some(Duration::from_secs(600))).unwrap();
    mount_share(&mut cc, "dax", "/mnt/dax", false, true).expect("clone DAX mount");
    let (len, sum, _) = checksum(&mut cc, "/mnt/dax/odd.bin", false);
    assert_eq!(
        (len, sum),
        (odd.len() as u64, odd_sum),
        "clone reads odd.bin"
    );
    assert!(
        !vmm_mappings(clone.pid(), &data.join("odd.bin")).is_empty(),
        "the clone does not map odd.bin"
    );

    // Host truncation behind the guest's back (the documented limit).
    let victim = data.join("victim.bin");
    let (len, _, _) = checksum(&mut cc, "/mnt/dax/victim.bin", true);
    assert_eq!(len, odd.len() as u64);
    std::fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(0)
        .unwrap();
    // The guest keeps a file's attributes (its size) for the attribute
    // timeout (5 s, fuse-backend-rs's default): an open within it maps by
    // the old size and touches the vanished pages (see VIRTIOFS.md, which
    // says what that does). Past it, the open revalidates the size.
    std::thread::sleep(Duration::from_secs(6));
    let after = cc.mmap_read_file(ReadFileRequest {
        path: "/mnt/dax/victim.bin".into(),
        max_len: u64::MAX,
        offset: 0,
        discard: true,
    });
    match after {
        Ok(d) => {
            eprintln!(
                "truncated on the host: the guest read {} bytes (it saw the new size)",
                d.len
            );
            cc.shutdown().expect("clone shutdown");
            let status = clone
                .wait_exit(Duration::from_secs(120))
                .expect("clone exit");
            assert!(status.success(), "clone: {status}: {}", clone.stderr());
        }
        Err(e) => {
            let status = clone
                .wait_exit(Duration::from_secs(120))
                .expect("the clone's VMM does not end after losing its guest");
            let stderr = clone.stderr();
            eprintln!("truncated on the host: the clone stopped ({e}): {status}: {stderr}");
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), None, "the VMM died of a signal");
            assert_eq!(status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("KVM_RUN"), "{stderr}");
        }
    }
}

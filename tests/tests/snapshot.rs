//! Snapshot and restore, against one cold boot: boot a template VM, take a
//! snapshot through the API socket, restore two clones concurrently with
//! their own CIDs and sockets, check both answer (the VMM drops guest
//! packets whose source CID is not the clone's, so an answer proves the
//! guest re-read its new CID after the transport reset), reseed their RNGs
//! with different host entropy and check they diverge, shut everything
//! down with status 0, check the template's memory file is byte for byte
//! what it was before the clones ran, and check nothing is left behind.
//!
//! Prints the headline figures: restore (process start) -> first
//! successful ping, and each clone's private memory (Private_Dirty of
//! /proc/PID/smaps_rollup).

use std::path::Path;
use std::time::{Duration, Instant};

use vessel_tests::{kvm_available_or_skip, Artifacts, VmOptions, VmProcess, BOOT_TIMEOUT};

fn smaps_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z")
}

fn shutdown_and_check(vm: &mut VmProcess, client: &mut vessel_proto::client::AgentClient) {
    let pid = vm.pid();
    client.shutdown().expect("shutdown");
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("VMM did not exit after Shutdown");
    assert!(status.success(), "exit status {status}: {}", vm.stderr());
    assert!(!vm.uds.exists(), "{} left behind", vm.uds.display());
    if let Some(api) = &vm.api_sock {
        assert!(!api.exists(), "{} left behind", api.display());
    }
    assert!(gone(pid), "VMM {pid} still running");
}

#[test]
fn snapshot_restore_two_clones() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let snap_dir = std::env::temp_dir().join(format!("vessel-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snap_dir);

    // The template: one cold boot.
    let opts = VmOptions {
        api_sock: true,
        ..VmOptions::default()
    };
    let mut template = VmProcess::spawn(&art, &opts).expect("spawn template");
    let mut tclient = template
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("template ready after {:?}", template.started.elapsed());
    let pong = tclient.ping().expect("template ping");

    // API: status, pause/resume, bad requests, then the snapshot.
    assert_eq!(template.api("status").unwrap(), "OK running");
    assert_eq!(template.api("pause").unwrap(), "OK paused");
    assert_eq!(template.api("status").unwrap(), "OK paused");
    assert_eq!(template.api("resume").unwrap(), "OK running");
    assert!(template.api("frobnicate").unwrap().starts_with("ERR "));
    assert!(template.api("snapshot").unwrap().starts_with("ERR "));
    let t = Instant::now();
    let answer = template
        .api(&format!("snapshot {}", snap_dir.display()))
        .unwrap();
    assert!(answer.starts_with("OK snapshot"), "{answer}");
    eprintln!("snapshot took {:?}", t.elapsed());
    let mem_file = snap_dir.join("memory");
    let mem_len = std::fs::metadata(&mem_file).expect("memory file").len();
    assert_eq!(mem_len, 128 << 20);
    // What the clones start from; they must never write to it.
    let template_memory = std::fs::read(&mem_file).expect("read the memory file");
    // The template keeps running after the snapshot.
    assert_eq!(template.api("status").unwrap(), "OK running");
    assert_eq!(tclient.ping().expect("template ping after snapshot"), pong);
    shutdown_and_check(&mut template, &mut tclient);

    // Two clones, restored concurrently, each with its own CID.
    let cids = [7u32, 8u32];
    let clones: Vec<VmProcess> = cids
        .iter()
        .map(|&cid| VmProcess::restore(&art, &snap_dir, cid).expect("spawn clone"))
        .collect();
    let waiters: Vec<_> = clones
        .into_iter()
        .map(|mut vm| {
            std::thread::spawn(move || {
                let client = vm.connect_and_ping(Duration::from_secs(60));
                let first_ping = vm.started.elapsed();
                (vm, client, first_ping)
            })
        })
        .collect();
    let mut clones = Vec::new();
    for w in waiters {
        let (mut vm, client, first_ping) = w.join().expect("clone thread");
        let client = client.unwrap_or_else(|e| {
            panic!(
                "clone did not answer: {e}; serial: {}; log: {}",
                vm.serial_output(),
                std::fs::read_to_string(&vm.log).unwrap_or_default()
            )
        });
        eprintln!(
            "clone pid {}: restore -> first successful ping {:.1} ms",
            vm.pid(),
            first_ping.as_secs_f64() * 1000.0
        );
        let _ = vm.try_wait();
        clones.push((vm, client, first_ping));
    }

    // Both answer like the template did (same kernel, same agent).
    for (_, c, _) in clones.iter_mut() {
        let p = c.ping().expect("clone ping");
        assert_eq!(p.uname.release, pong.uname.release);
        assert_eq!(p.agent_version, pong.agent_version);
    }

    // Fresh entropy and host names; the RNGs diverge.
    let mut randoms = Vec::new();
    for (i, (_, c, _)) in clones.iter_mut().enumerate() {
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .expect("host entropy");
        let t = Instant::now();
        c.restored(entropy, Some(format!("clone-{i}")))
            .expect("Restored");
        eprintln!("clone {i}: Restored took {:?}", t.elapsed());
        assert_eq!(c.ping().unwrap().uname.nodename, format!("clone-{i}"));
        let r = c.get_random(32).expect("GetRandom");
        assert_eq!(r.len(), 32);
        randoms.push(r);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "clones produce the same random bytes"
    );

    // Memory: each clone's private pages (copy-on-write of the template file).
    for (vm, _, _) in &clones {
        let pid = vm.pid();
        eprintln!(
            "clone pid {pid}: Rss {} KiB, Private_Dirty {} KiB, Shared_Clean {} KiB, Private_Clean {} KiB (guest memory 131072 KiB)",
            smaps_kib(pid, "Rss").unwrap_or(0),
            smaps_kib(pid, "Private_Dirty").unwrap_or(0),
            smaps_kib(pid, "Shared_Clean").unwrap_or(0),
            smaps_kib(pid, "Private_Clean").unwrap_or(0),
        );
    }
    // Reference on the same host and VM: a new connection + ping on a warm
    // clone (on PVM hosts this alone costs tens of ms of emulated guest
    // kernel time).
    let (vm0, _, _) = &mut clones[0];
    let t = Instant::now();
    let mut c = vm0.connect().expect("reference connect");
    c.ping().expect("reference ping");
    let reference = t.elapsed();
    eprintln!(
        "reference: connect + ping on a running clone {:.1} ms",
        reference.as_secs_f64() * 1000.0
    );
    drop(c);
    let times: Vec<f64> = clones
        .iter()
        .map(|(_, _, t)| t.as_secs_f64() * 1000.0)
        .collect();
    eprintln!("restore -> first ping (ms): {times:?}");

    for (mut vm, mut c, _) in clones {
        shutdown_and_check(&mut vm, &mut c);
    }
    // The clones ran (and wrote their guest memory) on a copy-on-write
    // mapping: the template's memory file is byte for byte unchanged.
    assert!(
        std::fs::read(&mem_file).expect("read the memory file again") == template_memory,
        "a clone wrote into the template's memory file"
    );
    drop(template_memory);
    // The snapshot itself stays (it is the template); remove it.
    std::fs::remove_dir_all(&snap_dir).expect("remove snapshot");
    assert!(!Path::new(&snap_dir).exists());
}

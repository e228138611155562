//! Boots one real microVM and checks, against that one boot: the agent is
//! reachable over vsock, `Ping` answers with the guest's uname (our 6.12
//! kernel, not the host's), two concurrent host connections work, a reply
//! larger than one vsock packet (a 100 KiB `ReadFile`) arrives intact, malformed
//! input gets an error and leaves the agent alive, the balloon is bound
//! with free page reporting, every VMM thread runs under the system call
//! filter, `Shutdown` ends the VMM with status 0, and nothing is left
//! behind.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use vessel_proto::{ReadFileRequest, ResponseBody};
use vessel_tests::{kvm_available_or_skip, Artifacts, VmOptions, VmProcess, BOOT_TIMEOUT};

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[test]
fn boot_ping_concurrency_shutdown_cleanup() {
    if !kvm_available_or_skip() {
        return;
    }
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let opts = VmOptions {
        vcpus: 2,
        vmm_args: vec!["--balloon".into()],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::spawn(&art, &opts).expect("spawn vessel-vmm");
    let vmm_pid = vm.pid();
    let mut client = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", vm.started.elapsed());

    // Ping answers with the guest's uname: our 6.12 kernel.
    let pong = client.ping().expect("ping");
    assert_eq!(pong.uname.sysname, "Linux");
    assert_eq!(pong.uname.machine, "x86_64");
    assert!(
        pong.uname.release.starts_with("6.12"),
        "guest release {}",
        pong.uname.release
    );
    assert_ne!(
        pong.uname.release,
        host_release(),
        "uname came from the host kernel"
    );
    assert_eq!(pong.agent_version, env!("CARGO_PKG_VERSION"));

    // The system call filter is loaded on every thread (vmm/src/seccomp.rs):
    // filter mode, no_new_privs, on the vCPU threads too.
    if std::env::var_os("VESSEL_VMM_SECCOMP").is_none() {
        for task in std::fs::read_dir(format!("/proc/{vmm_pid}/task")).expect("tasks") {
            let task = task.expect("task").path();
            let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            assert!(
                status.contains("\nSeccomp:\t2\n") && status.contains("\nNoNewPrivs:\t1\n"),
                "thread {} ({}) runs without the filter:\n{status}",
                task.display(),
                comm.trim()
            );
        }
    }

    // Two concurrent host connections, used at the same time from two threads.
    let mut a = vm.connect().expect("second connection");
    let mut b = vm.connect().expect("third connection");
    let ta = std::thread::spawn(move || {
        (0..5)
            .map(|_| a.ping().map(|p| p.uname.release))
            .collect::<Vec<_>>()
    });
    let tb = std::thread::spawn(move || {
        (0..5)
            .map(|_| b.ping().map(|p| p.uname.release))
            .collect::<Vec<_>>()
    });
    for r in ta.join().unwrap().into_iter().chain(tb.join().unwrap()) {
        assert_eq!(r.expect("concurrent ping"), pong.uname.release);
    }

    // Replies larger than one vsock packet: Linux sends payloads over
    // ~32 KiB with one TX descriptor per page fragment, and up to 64 KiB per
    // packet. A ~100 KiB file written with WriteFile comes back intact in
    // one ReadFile reply (about 350 KiB of JSON, several full packets).
    let big: Vec<u8> = (0..100 * 1024u32)
        .map(|i| (i.wrapping_mul(7) ^ (i >> 12)) as u8)
        .collect();
    assert_eq!(
        client.write_file("/tmp/big", &big).expect("WriteFile"),
        big.len() as u64
    );
    let t = Instant::now();
    let read = client
        .read_file(ReadFileRequest {
            path: "/tmp/big".into(),
            max_len: 128 * 1024,
            offset: 0,
            discard: false,
        })
        .expect("ReadFile of a 100 KiB file");
    eprintln!("100 KiB ReadFile reply took {:?}", t.elapsed());
    assert_eq!(read.len, big.len() as u64);
    assert!(read.eof);
    assert!(read.data == big, "100 KiB ReadFile reply corrupted");
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    assert!(
        !log.contains("invalid tx descriptor chain"),
        "the VMM dropped guest packets: {log}"
    );

    // Malformed input on a raw connection: an oversized length prefix gets an
    // error reply (or a close), never a crash; the agent keeps serving.
    {
        let mut raw = std::os::unix::net::UnixStream::connect(&vm.uds).expect("raw connect");
        raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        raw.write_all(b"CONNECT 1024\n").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while raw.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert!(
            line.starts_with(b"OK "),
            "handshake: {:?}",
            String::from_utf8_lossy(&line)
        );
        raw.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut reply = Vec::new();
        let _ = raw.read_to_end(&mut reply);
        if reply.len() > 4 {
            let body = String::from_utf8_lossy(&reply[4..]);
            assert!(body.contains("rror"), "unexpected reply {body}");
        }
    }
    let mut c = vm.connect().expect("connection after malformed input");
    // A well-formed frame with an unknown request type gets an Error reply.
    match c.call_raw_json(r#"{"id":7,"body":{"NoSuchRequest":{}}}"#) {
        Ok(ResponseBody::Error(e)) => eprintln!("unknown request rejected: {}", e.message),
        other => panic!("unknown request type: {other:?}"),
    }
    assert_eq!(
        c.ping().expect("ping after bad input").uname.release,
        pong.uname.release
    );

    // The balloon: the guest driver bound it and negotiated free page
    // reporting (feature bit 5 in the sysfs feature string).
    let mut balloon_features = None;
    for n in 0..4 {
        let dev = format!("/sys/bus/virtio/devices/virtio{n}");
        let Ok(id) = c.read_file(vessel_proto::ReadFileRequest {
            path: format!("{dev}/device"),
            max_len: 64,
            offset: 0,
            discard: false,
        }) else {
            continue;
        };
        if String::from_utf8_lossy(&id.data).trim() == "0x0005" {
            let f = c
                .read_file(vessel_proto::ReadFileRequest {
                    path: format!("{dev}/features"),
                    max_len: 256,
                    offset: 0,
                    discard: false,
                })
                .expect("balloon features");
            balloon_features = Some(String::from_utf8_lossy(&f.data).trim().to_string());
        }
    }
    let features = balloon_features.expect("no virtio-balloon device in the guest");
    assert_eq!(
        features.as_bytes().get(5),
        Some(&b'1'),
        "free page reporting not negotiated: {features}"
    );

    // Shutdown ends the VMM with status 0.
    let t = Instant::now();
    client.shutdown().expect("shutdown");
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("VMM did not exit after Shutdown");
    assert!(
        status.success(),
        "VMM exit status {status}: {}",
        vm.stderr()
    );
    eprintln!("shutdown took {:?}", t.elapsed());

    // Nothing left behind: socket removed, no VMM process, no children.
    assert!(
        !vm.uds.exists(),
        "vsock socket {} left behind",
        vm.uds.display()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{vmm_pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{vmm_pid}/stat")).unwrap_or_default();
            stat.contains(") Z") || stat.is_empty()
        }
    );
    assert!(children_of(vmm_pid).is_empty());
    let timeline = vm.timeline();
    let names: Vec<&str> = timeline.iter().map(|(n, _)| n.as_str()).collect();
    for m in ["vm_setup_done", "first_vcpu_entry", "agent_ready"] {
        assert!(names.contains(&m), "timeline lacks {m}: {names:?}");
    }
}

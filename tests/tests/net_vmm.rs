//! virtio-net end to end, against one cold boot. The test thread moves
//! into a network namespace of its own (`unshare(CLONE_NEWNET)`: namespaces
//! are per thread, and children inherit the thread's), so the VMM it
//! spawns creates its taps there and the namespace, taps and addresses
//! vanish with the test; the host's interfaces are never touched.
//!
//! The VM boots with `--net tap=vtap0,mac=… --net none`. Before anything
//! else it is snapshotted (the template: eth0 bound, eth1 without a
//! backend). Then a busybox container (sharing the guest's network
//! namespace) brings eth0 up, pings the host side of the tap, sends a few
//! MiB over TCP to a server of the test and receives them back; both ends
//! check the bytes, and the throughput both ways is printed. eth1 has no
//! carrier. A clone restored with `--net tap=vtap1 --net tap=vtap2` sees
//! eth1's link come up (config-change interrupt) and pings over it (busybox
//! `ip` sets MACs through an AF_PACKET socket, which the guest kernel does
//! not have, so the MAC change the agent makes over netlink is not
//! exercised here); a
//! restore with more `--net` than the snapshot has fails clearly.
//!
//! Needs Debian's `busybox-static` and `ip` (iproute2) on the host.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_proto::client::AgentClient;
use vessel_proto::container::{ProcessExit, StdioSpec, StdioStream};
use vessel_tests::cli::busybox_rootfs;
use vessel_tests::guest::{self, attach, drain};
use vessel_tests::{kvm_available_or_skip, Artifacts, TempDir, VmOptions, VmProcess, BOOT_TIMEOUT};

const ROOTFS: &str = "/run/rootfs";
const APPLETS: [&str; 14] = [
    "sh", "ip", "ping", "nc", "seq", "cmp", "cat", "echo", "httpd", "wget", "sleep", "mkdir",
    "true", "head",
];
/// The data both ways: `seq 1 N` (about 4.6 MiB), which the guest makes
/// itself and the host knows.
const SEQ_N: u32 = 700_000;
const GUEST_MAC: &str = "02:00:00:00:07:02";

fn seq_bytes(n: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 << 20);
    for i in 1..=n {
        v.extend_from_slice(format!("{i}\n").as_bytes());
    }
    v
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Waits (bounded) until the VMM has created tap `name` in our namespace.
fn wait_for_tap(vm: &mut VmProcess, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ip(&["link", "show", name]).is_err() {
        if let Some(st) = vm.try_wait() {
            panic!("vessel-vmm exited with {st}: {}", vm.stderr());
        }
        assert!(Instant::now() < deadline, "tap {name} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A container spec: busybox, root, the capabilities `ip` and `ping` need,
/// the guest's network namespace (no network namespace of its own).
fn spec(script: &str) -> Value {
    let caps = json!(["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_DAC_OVERRIDE"]);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    })
}

/// Runs `script` in a container and returns its exit, stdout and stderr.
fn run(
    c: &mut AgentClient,
    vm: &VmProcess,
    id: &str,
    script: &str,
) -> (ProcessExit, String, String) {
    let out = drain(attach(vm, id, None, StdioStream::Stdout));
    let err = drain(attach(vm, id, None, StdioStream::Stderr));
    let stdio = StdioSpec {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    c.create_container(guest::create_req(id, ROOTFS, spec(script), stdio))
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    c.start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    let exit = c
        .wait_process(id, None)
        .unwrap_or_else(|e| panic!("wait {id}: {e}"));
    c.delete_container(id, false)
        .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    (exit, out.join().unwrap(), err.join().unwrap())
}

/// A transfer thread: when the body started and how long it took.
type Transfer = std::thread::JoinHandle<(Instant, Duration)>;

/// The test's side of the transfers, over HTTP so that the guest's side
/// is busybox `httpd` (which sends the file with sendfile(2)) and `wget`
/// (4 KiB reads) rather than `nc` (1 KiB writes: one TCP segment per write
/// at guest kernel speed). When the guest says it is ready on port 5003,
/// the test fetches `/d` from the guest's httpd (guest -> host) and checks
/// it is `expect`; it also serves `send` on port 5002 (host -> guest). Each
/// returns the time from the first to the last byte of the body.
fn serve_tcp(expect: Vec<u8>, send: Vec<u8>) -> (Transfer, Transfer) {
    let ready = TcpListener::bind("10.0.7.1:5003").expect("bind 5003");
    let down = TcpListener::bind("10.0.7.1:5002").expect("bind 5002");
    let up = std::thread::spawn(move || {
        let (mut ctl, _) = ready.accept().expect("accept ready");
        ctl.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let mut b = [0u8; 6];
        ctl.read_exact(&mut b).expect("ready line");
        let mut s =
            std::net::TcpStream::connect("10.0.7.2:8080").expect("connect to the guest's httpd");
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s.write_all(b"GET /d HTTP/1.0\r\n\r\n").unwrap();
        let mut got = Vec::with_capacity(expect.len() + 512);
        let mut buf = vec![0u8; 256 << 10];
        let mut first: Option<Instant> = None;
        loop {
            let n = s.read(&mut buf).expect("read from the guest");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got.extend_from_slice(&buf[..n]);
        }
        let started = first.unwrap_or_else(Instant::now);
        let took = started.elapsed();
        drop(ctl);
        let body_at = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("HTTP header")
            + 4;
        assert!(got.starts_with(b"HTTP/1.") && got[..body_at].windows(3).any(|w| w == b"200"));
        assert_eq!(got.len() - body_at, expect.len(), "guest -> host length");
        assert!(got[body_at..] == expect[..], "guest -> host bytes differ");
        (started, took)
    });
    let down = std::thread::spawn(move || {
        let (mut s, _) = down.accept().expect("accept download");
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).expect("request");
            assert!(n > 0, "EOF in the request");
            req.extend_from_slice(&b[..n]);
        }
        let t = Instant::now();
        s.write_all(
            format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", send.len()).as_bytes(),
        )
        .unwrap();
        s.write_all(&send).expect("send download");
        s.shutdown(Shutdown::Write).expect("shutdown");
        // wget closes once it has the whole body.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (t, t.elapsed())
    });
    (up, down)
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

#[test]
fn virtio_net_end_to_end() {
    if !kvm_available_or_skip() {
        return;
    }
    // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's
    // network namespace; the thread ends with the test.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "cannot create a network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    ip(&["link", "set", "lo", "up"]).unwrap();
    // Full-size TSO segments even while the rate is low (see the module doc).
    std::fs::write("/proc/sys/net/ipv4/tcp_min_tso_segs", "44").expect("tcp_min_tso_segs");
    // The host's default here may be BBR, which paces at the (low)
    // bandwidth it measures and sends 2-segment frames whatever
    // tcp_min_tso_segs says; reno (always allowed) does neither.
    std::fs::write("/proc/sys/net/ipv4/tcp_congestion_control", "reno")
        .expect("tcp_congestion_control");
    let art = Artifacts::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = TempDir::new("netvmm");
    busybox_rootfs(&root.0, &APPLETS);
    let snap = TempDir::new("netvmm-snap");
    let snap_dir = snap.0.join("tmpl");

    let opts = VmOptions {
        mem_mib: 256,
        shares: vec![format!("rootfs={}", root.0.display())],
        api_sock: true,
        vmm_args: vec![
            "--net".into(),
            format!("tap=vtap0,mac={GUEST_MAC}"),
            "--net".into(),
            "none".into(),
        ],
        ..VmOptions::default()
    };
    let mut opts = opts;
    // Diagnostics: VESSEL_NET_PROFILE=FILE samples the guest's rip
    // (`vessel-vmm --profile-rip`).
    if let Ok(path) = std::env::var("VESSEL_NET_PROFILE") {
        opts.vmm_args.extend(["--profile-rip".into(), path]);
    }
    let mut vm = VmProcess::spawn(&art, &opts).expect("spawn vessel-vmm");
    wait_for_tap(&mut vm, "vtap0");
    ip(&["addr", "add", "10.0.7.1/24", "dev", "vtap0"]).unwrap();
    let link = ip(&["link", "show", "vtap0"]).unwrap();
    assert!(link.contains(",UP"), "the VMM sets the tap up: {link}");
    let mut c = vm
        .wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", vm.started.elapsed());
    c.set_timeout(Some(Duration::from_secs(600))).unwrap();

    // The template: eth0 bound to vtap0, eth1 without a backend, the
    // rootfs share not mounted yet.
    let answer = vm.api(&format!("snapshot {}", snap_dir.display())).unwrap();
    assert!(answer.starts_with("OK snapshot"), "{answer}");

    c.mount("rootfs", ROOTFS, false).expect("mount rootfs");
    let data = seq_bytes(SEQ_N);
    let (up, down) = serve_tcp(data.clone(), data.clone());
    let script = format!(
        "set -e
ip link set eth0 up
ip link set eth1 up
ip addr add 10.0.7.2/24 dev eth0
ip link show eth0
ip link show eth1
ping -c 3 -W 10 10.0.7.1
echo 44 > /proc/sys/net/ipv4/tcp_min_tso_segs
mkdir /tmp/www
seq 1 {SEQ_N} > /tmp/www/d
httpd -p 10.0.7.2:8080 -h /tmp/www
echo ready | nc 10.0.7.1 5003
wget -q -O /tmp/got http://10.0.7.1:5002/d
cmp /tmp/got /tmp/www/d
echo TRANSFER-OK"
    );
    let t = Instant::now();
    let (exit, out, err) = run(&mut c, &vm, "net", &script);
    eprintln!("container ran in {:?}\n{out}\n{err}", t.elapsed());
    assert_eq!(exit.status, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(GUEST_MAC),
        "eth0 has the MAC from --net: {out}"
    );
    assert!(out.contains("3 packets received"), "{out}");
    assert!(out.contains("TRANSFER-OK"), "{out}");
    let eth1 = out
        .lines()
        .find(|l| l.contains("eth1:"))
        .unwrap_or_default();
    assert!(eth1.contains("NO-CARRIER"), "eth1 has no backend: {eth1}");
    let (up_at, up_t) = up.join().expect("upload server");
    let (down_at, down_t) = down.join().expect("download server");
    let ms = |t: Instant| t.duration_since(vm.started).as_millis();
    eprintln!(
        "transfers (ms since VMM start): guest -> host {}..{}, host -> guest {}..{}",
        ms(up_at),
        ms(up_at + up_t),
        ms(down_at),
        ms(down_at + down_t)
    );
    eprintln!(
        "TCP {} bytes: guest -> host {:.1} MiB/s ({:?}), host -> guest {:.1} MiB/s ({:?})",
        data.len(),
        mib_s(data.len(), up_t),
        up_t,
        mib_s(data.len(), down_t),
        down_t
    );
    c.shutdown().expect("shutdown");
    let st = vm
        .wait_exit(Duration::from_secs(60))
        .expect("VMM did not exit");
    assert!(st.success(), "{st}: {}", vm.stderr());
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    for l in log.lines().filter(|l| l.contains("virtio-net counters")) {
        eprintln!("{l}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("tap offloads") && l.contains("\"flags\":7")),
        "the guest acked checksum and TSO offloads (TUN_F_CSUM|TSO4|TSO6)"
    );
    assert!(
        ip(&["link", "show", "vtap0"]).is_err(),
        "the VMM's tap outlived it"
    );

    // More --net than the snapshot has: a clear error, no VM.
    let mut too_many: Vec<String> = ["tap=vtapx", "none", "none"]
        .iter()
        .flat_map(|n| ["--net".to_string(), n.to_string()])
        .collect();
    too_many.extend(["--fs".to_string(), format!("rootfs={}", root.0.display())]);
    let mut bad = VmProcess::restore_with_args(&art, &snap_dir, 9, &too_many).expect("spawn");
    let st = bad
        .wait_exit(Duration::from_secs(60))
        .expect("VMM did not exit");
    assert_eq!(st.code(), Some(1));
    let msg = bad.stderr();
    assert!(msg.contains("2 network interfaces, 3 --net given"), "{msg}");

    // A clone: eth0 on vtap1, eth1 (saved without a backend) on vtap2.
    let args: Vec<String> = vec![
        "--fs".into(),
        format!("rootfs={}", root.0.display()),
        "--net".into(),
        "tap=vtap1".into(),
        "--net".into(),
        "tap=vtap2,mac=02:00:00:00:08:02".into(),
    ];
    let mut clone = VmProcess::restore_with_args(&art, &snap_dir, 7, &args).expect("restore");
    wait_for_tap(&mut clone, "vtap2");
    ip(&["addr", "add", "10.0.8.1/24", "dev", "vtap2"]).unwrap();
    let mut cc = clone
        .connect_and_ping(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("clone: {e}"));
    cc.set_timeout(Some(Duration::from_secs(600))).unwrap();
    cc.mount("rootfs", ROOTFS, false)
        .expect("mount rootfs in the clone");
    let (exit, out, err) = run(
        &mut cc,
        &clone,
        "net2",
        "set -e
ip link set eth1 up
ip addr add 10.0.8.2/24 dev eth1
ip link show eth1
ping -c 2 -W 10 10.0.8.1
echo CLONE-OK",
    );
    eprintln!("clone container:\n{out}\n{err}");
    assert_eq!(exit.status, 0, "stdout: {out}\nstderr: {err}");
    let eth1 = out
        .lines()
        .find(|l| l.contains("eth1:"))
        .unwrap_or_default();
    assert!(
        eth1.contains("LOWER_UP") && !eth1.contains("NO-CARRIER"),
        "eth1's link came up after the restore: {eth1}"
    );
    assert!(out.contains("2 packets received"), "{out}");
    cc.shutdown().expect("clone shutdown");
    let st = clone
        .wait_exit(Duration::from_secs(60))
        .expect("clone did not exit");
    assert!(st.success(), "{st}: {}", clone.stderr());
}

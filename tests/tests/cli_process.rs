//! Processes of running containers through the `vessel` binary, like an
//! engine drives runc: `exec` (stdout and stderr apart, exit status,
//! stdin, `--env`, `--cwd`, `--user`, `--detach --pid-file`), `ps`, exec
//! into an unknown container, a container of a few hundred system calls
//! stopped within 10 s of `start`, and terminal containers: `create
//! --console-socket` (the test receives the pty master with SCM_RIGHTS,
//! types into it, reads the answer, resizes it) and `exec --tty
//! --console-socket --detach`. Four container starts in all; at the end no
//! VMM or monitor of the test runs and `--root` is empty.
//!
//! Needs Debian's `busybox-static` (`/bin/busybox`).

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Value};
use vessel_tests::cli::{busybox_rootfs, read_pid, reap, text, CliEnv};
use vessel_tests::kvm_available_or_skip;

const APPLETS: [&str; 9] = [
    "sh", "echo", "true", "sleep", "cat", "id", "pwd", "tty", "stty",
];

/// A runc-like `config.json` running `args` in the busybox root
/// filesystem at `rootfs`.
fn spec(rootfs: &Path, args: &[&str], terminal: bool) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": true},
        "hostname": "proc",
        "process": {
            "terminal": terminal,
            "args": args,
            "env": ["PATH=/bin", "HOME=/", "FOO=old"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"},
                           {"type": "uts"}]
        }
    })
}

/// A bundle named `name` running `args` in the shared root file system.
fn bundle(env: &CliEnv, name: &str, args: &[&str], terminal: bool) -> String {
    env.write_bundle(name, &spec(&env.tmp.join("rootfs"), args, terminal))
}

/// Accepts one connection on `l` and receives the descriptor sent on it.
fn receive_master(l: &UnixListener) -> OwnedFd {
    let (conn, _) = l.accept().expect("accept on the console socket");
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("recvmsg");
    let mut fd = None;
    for c in msg.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            fd = fds.first().copied();
        }
    }
    let len = msg.bytes;
    let name = text(&buf[..len]);
    assert_eq!(name, "/dev/ptmx", "runc sends the master's name");
    let fd = fd.expect("no descriptor in the console message");
    // SAFETY: a descriptor we just received and own alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads everything from a pty master until EIO (no slave left) in a
/// thread.
fn read_all(master: &OwnedFd) -> std::thread::JoinHandle<String> {
    let mut f = File::from(master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        text(&out)
    })
}

fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a live pointer.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "TIOCSWINSZ");
}

/// Runs vessel with a new pty (of size rows x cols) as its stdin, stdout
/// and stderr, like a user's terminal; returns the child, the master
/// and a slave we keep (to look at its modes afterwards).
fn spawn_on_pty(env: &CliEnv, args: &[&str], rows: u16, cols: u16) -> (Child, OwnedFd, OwnedFd) {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
    for fd in [&pty.master, &pty.slave] {
        // SAFETY: fcntl(F_SETFD) on a descriptor we own.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(r, 0);
    }
    let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
    let child = env
        .cmd(args)
        .stdin(io(&pty.slave))
        .stdout(io(&pty.slave))
        .stderr(io(&pty.slave))
        .spawn()
        .expect("run vessel");
    (child, pty.master, pty.slave)
}

/// Waits for `child` within `timeout`; its exit code.
fn wait_child(child: &mut Child, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(255);
        }
        assert!(Instant::now() < deadline, "vessel did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_cooked(slave: &OwnedFd) -> bool {
    let t = nix::sys::termios::tcgetattr(slave).expect("tcgetattr");
    t.local_flags
        .contains(nix::sys::termios::LocalFlags::ECHO | nix::sys::termios::LocalFlags::ICANON)
}

#[test]
fn exec_ps_and_terminals() {
    if !kvm_available_or_skip() {
        return;
    }
    let env = CliEnv::new("proc", "");
    busybox_rootfs(&env.tmp.join("rootfs"), &APPLETS);

    // Exec into an unknown container.
    let o = env.output(&["exec", "nosuch", "true"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("does not exist"),
        "{}",
        text(&o.stderr)
    );

    // One running container for the execs.
    let b = bundle(&env, "b-box", &["sleep", "100000"], false);
    let box_pf = env.tmp.join("box.pid");
    let t = Instant::now();
    let (st, err) = env.detached(&[
        "run",
        "-d",
        "--bundle",
        &b,
        "--pid-file",
        &box_pf.to_string_lossy(),
        "box",
    ]);
    assert!(st.success(), "run -d: {err}");
    eprintln!(
        "run -d (template build included unless another test built it): {:?}",
        t.elapsed()
    );
    let box_pid = read_pid(&box_pf);

    let o = env.output(&["ps", "--format", "json", "box"]);
    assert!(o.status.success(), "ps: {}", text(&o.stderr));
    let before: Vec<i32> = serde_json::from_slice(&o.stdout).expect("ps JSON");
    assert_eq!(before.len(), 1, "{before:?}");

    // stdout and stderr apart, exit status.
    let t = Instant::now();
    let o = env.output(&["exec", "box", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    eprintln!("exec sh -c 'echo; echo >&2; exit 3': {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(3), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");

    // Latency of `exec true`.
    let mut took = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let o = env.output(&["exec", "box", "true"]);
        took.push(t.elapsed());
        assert!(o.status.success(), "exec true: {}", text(&o.stderr));
    }
    eprintln!("exec true: {took:?}");

    // stdin piped into the process.
    let mut c = env
        .cmd(&["exec", "box", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"hello\nworld\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "exec cat: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hello\nworld\n");

    // --env (overrides the container's FOO), --cwd, --user.
    let o = env.output(&[
        "exec",
        "--env",
        "FOO=bar",
        "-e",
        "BAZ=qux",
        "--cwd",
        "/tmp",
        "--user",
        "1000:1000",
        "box",
        "sh",
        "-c",
        "echo $FOO $BAZ; pwd; id -u; id -g",
    ]);
    assert!(o.status.success(), "exec env: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "bar qux\n/tmp\n1000\n1000\n");

    // --detach --pid-file: the pid lives as long as the process and exits
    // with its status; ps sees the process meanwhile.
    let pf = env.tmp.join("exec.pid");
    let (st, err) = env.detached(&[
        "exec",
        "--detach",
        "--pid-file",
        &pf.to_string_lossy(),
        "box",
        "sh",
        "-c",
        "sleep 4; exit 7",
    ]);
    assert!(st.success(), "exec -d: {err}");
    let pid = read_pid(&pf);
    // SAFETY: kill with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "exec pid {pid} is gone");
    let o = env.output(&["ps", "--format", "json", "box"]);
    assert!(o.status.success(), "ps: {}", text(&o.stderr));
    let during: Vec<i32> = serde_json::from_slice(&o.stdout).expect("ps JSON");
    assert!(during.len() >= 2, "{during:?}");
    let o = env.output(&["ps", "box"]);
    assert!(o.status.success(), "ps table: {}", text(&o.stderr));
    let table = text(&o.stdout);
    eprintln!("ps:\n{table}");
    assert!(
        table.contains("sleep 100000") && table.contains("sh -c"),
        "{table}"
    );
    assert_eq!(reap(pid, Duration::from_secs(120)), 7);
    let o = env.output(&["ps", "--format", "json", "box"]);
    let after: Vec<i32> = serde_json::from_slice(&o.stdout).expect("ps JSON");
    assert_eq!(after, before);

    // A terminal exec, detached, through a console socket (like podman).
    let sock = env.tmp.join("exec-console.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let pf = env.tmp.join("exec-tty.pid");
    let (st, err) = env.detached(&[
        "exec",
        "--detach",
        "--tty",
        "--console-socket",
        &sock.to_string_lossy(),
        "--pid-file",
        &pf.to_string_lossy(),
        "box",
        "sh",
    ]);
    assert!(st.success(), "exec -d -t: {err}");
    let master = receive_master(&l);
    drop(l);
    let _ = std::fs::remove_file(&sock);
    let pid = read_pid(&pf);
    let reader = read_all(&master);
    File::from(master.try_clone().unwrap())
        .write_all(b"tty; exit 4\n")
        .unwrap();
    assert_eq!(reap(pid, Duration::from_secs(120)), 4);
    drop(master);
    let out = reader.join().unwrap();
    assert!(out.contains("/dev/pts/"), "{out:?}");

    // A foreground terminal exec on the caller's terminal (raw mode while
    // it runs, restored after; the window size goes along).
    let (mut c, master, slave) = spawn_on_pty(
        &env,
        &["exec", "-t", "box", "sh", "-c", "tty; stty size; exit 2"],
        30,
        90,
    );
    let reader = read_all(&master);
    assert_eq!(wait_child(&mut c, Duration::from_secs(120)), 2);
    assert!(is_cooked(&slave), "terminal left in raw mode");
    drop(slave);
    let out = reader.join().unwrap();
    drop(master);
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("30 90"), "{out:?}");

    let o = env.output(&["delete", "--force", "box"]);
    assert!(o.status.success(), "delete -f: {}", text(&o.stderr));
    assert_eq!(reap(box_pid, Duration::from_secs(60)), 137);
    let o = env.output(&["exec", "box", "true"]);
    assert!(!o.status.success(), "exec into a deleted container");

    // A terminal container: the pty master arrives on the console socket.
    let b = bundle(&env, "b-tty", &["sh"], true);
    let sock = env.tmp.join("console.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let pf = env.tmp.join("tty.pid");
    // Like `out=$(vessel create ...)`, dockerd and containerd's shim: the
    // caller reads create's stdout and stderr to EOF, which must come when
    // create exits (runc leaves nothing of them to a terminal container).
    let mut child = env
        .cmd(&[
            "create",
            "--bundle",
            &b,
            "--console-socket",
            &sock.to_string_lossy(),
            "--pid-file",
            &pf.to_string_lossy(),
            "tty1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut errp) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let (mut o, mut e) = (String::new(), String::new());
        let _ = out.read_to_string(&mut o);
        let _ = errp.read_to_string(&mut e);
        let _ = tx.send(e);
    });
    let st = child.wait().unwrap();
    let err = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("create's stdout/stderr stay open after it exited: the monitor holds them");
    assert!(st.success(), "create --console-socket: {err}");
    let master = receive_master(&l);
    drop(l);
    let _ = std::fs::remove_file(&sock);
    let pid = read_pid(&pf);
    let o = env.output(&["exec", "tty1", "true"]);
    assert!(
        !o.status.success() && text(&o.stderr).contains("not been started"),
        "exec into a created container: {}",
        text(&o.stderr)
    );
    set_winsize(&master, 40, 100);
    let reader = read_all(&master);
    let o = env.output(&["start", "tty1"]);
    assert!(o.status.success(), "start: {}", text(&o.stderr));
    // Give the size poller a moment before asking.
    std::thread::sleep(Duration::from_secs(1));
    File::from(master.try_clone().unwrap())
        .write_all(b"stty size; echo hi; tty; exit 5\n")
        .unwrap();
    assert_eq!(reap(pid, Duration::from_secs(120)), 5);
    drop(master);
    let out = reader.join().unwrap();
    assert!(out.contains("\nhi\r\n"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(
        out.contains("40 100\r\n"),
        "window size not applied: {out:?}"
    );
    let o = env.output(&["delete", "tty1"]);
    assert!(o.status.success(), "delete: {}", text(&o.stderr));

    // A foreground terminal container on the caller's terminal.
    let (mut c, master, slave) = spawn_on_pty(&env, &["run", "--bundle", &b, "tty3"], 25, 70);
    let reader = read_all(&master);
    File::from(master.try_clone().unwrap())
        .write_all(b"stty size; tty; exit 6\n")
        .unwrap();
    assert_eq!(wait_child(&mut c, Duration::from_secs(120)), 6);
    assert!(is_cooked(&slave), "terminal left in raw mode");
    drop(slave);
    let out = reader.join().unwrap();
    drop(master);
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("25 70"), "{out:?}");

    // A container doing a few hundred system calls (shell built-ins
    // only: open, write, read, close and dup2 per round) reaches `stopped`
    // well within 10 s of `start`: engines and harnesses built around runc
    // wait a few seconds for a state change (issue 17).
    let b_calls = bundle(
        &env,
        "b-calls",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 60 ]; do echo $i > /tmp/n; read x < /tmp/n; i=$((x+1)); done; \
             [ $i = 60 ]",
        ],
        false,
    );
    let calls_pf = env.tmp.join("calls.pid");
    let (st, err) = env.detached(&[
        "create",
        "--bundle",
        &b_calls,
        "--pid-file",
        &calls_pf.to_string_lossy(),
        "calls",
    ]);
    assert!(st.success(), "create: {err}");
    let calls_pid = read_pid(&calls_pf);
    let t = Instant::now();
    env.ok(&["start", "calls"]);
    // The pid in --pid-file exits with the container's status.
    assert_eq!(reap(calls_pid, Duration::from_secs(10)), 0);
    eprintln!("start -> exited, ~600 system calls: {:?}", t.elapsed());
    assert_eq!(env.state("calls")["status"], "stopped");
    env.ok(&["delete", "calls"]);

    // A terminal container without a console socket cannot be detached.
    let (st, err) = env.detached(&["create", "--bundle", &b, "tty2"]);
    assert!(!st.success() && err.contains("console socket"), "{err}");

    assert!(env.vmms().is_empty(), "VMMs left behind");
    assert!(env.monitors().is_empty(), "monitors left behind");
    assert!(env.root_entries().is_empty(), "{:?}", env.root_entries());
    assert!(
        env.run_entries().is_empty(),
        "sockets left: {:?}",
        env.run_entries()
    );
}

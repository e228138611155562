//! Bad input to `vessel-vmm`: a one-line error on stderr and a non-zero
//! exit, before any VM runs.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vessel-vmm"))
        .args(args)
        .output()
        .expect("run vessel-vmm")
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-vmm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(
        !out.status.success(),
        "expected failure, got {}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("vessel-vmm: error: "), "{err}");
    assert!(lines[0].contains(needle), "{err:?} lacks {needle:?}");
}

fn kvm_or_skip() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("VESSEL_SKIP_KVM").as_deref() == Ok("1") {
        return false;
    }
    panic!("/dev/kvm is missing (set VESSEL_SKIP_KVM=1 to skip KVM tests explicitly)");
}

#[test]
fn missing_kernel() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&out, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn non_elf_kernel() {
    if !kvm_or_skip() {
        return;
    }
    let d = tempdir("nonelf");
    let k = d.join("vmlinux");
    std::fs::write(
        &k,
        b"this is not an ELF file at all, just text padding it out",
    )
    .unwrap();
    let out = vmm(&["--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&out, "is not an uncompressed x86_64 ELF vmlinux");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn too_little_memory() {
    let out = vmm(&["--kernel", "/nonexistent", "--mem-mib", "8"]);
    assert_one_line_error(&out, "guest memory must be between 32 and");
}

#[test]
fn existing_socket_path() {
    let d = tempdir("sock");
    let sock = d.join("vsock.sock");
    std::fs::write(&sock, b"").unwrap();
    let k = d.join("vmlinux");
    std::fs::write(&k, b"x").unwrap();
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock-uds",
        sock.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "already exists");
    assert!(sock.exists(), "an existing path must not be removed");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unwritable_log_path() {
    let out = vmm(&[
        "--kernel",
        "/nonexistent",
        "--log",
        "/nonexistent-dir/vmm.log",
    ]);
    assert_one_line_error(&out, "cannot open log file /nonexistent-dir/vmm.log");
}

#[test]
fn bad_vcpu_count() {
    let out = vmm(&["--kernel", "/nonexistent", "--vcpus", "0"]);
    assert_one_line_error(&out, "vcpus must be between 1 and");
}

fn restore(dir: &std::path::Path) -> Output {
    vmm(&["--restore", dir.to_str().unwrap()])
}

#[test]
fn restore_missing_dir() {
    let out = restore(std::path::Path::new("/nonexistent/snapshot"));
    assert_one_line_error(
        &out,
        "snapshot directory /nonexistent/snapshot does not exist",
    );
}

#[test]
fn restore_rejects_bad_state_files() {
    use vessel_vmm::snapshot::file;
    let d = tempdir("restore");
    let state = d.join("vmstate");
    let payload = serde_json::json!({"not": "a state"});

    // Missing state file.
    assert_one_line_error(&restore(&d), "cannot access state file");

    // Not a state file at all.
    std::fs::write(&state, b"hello").unwrap();
    assert_one_line_error(&restore(&d), "bad magic");

    // One flipped byte: checksum.
    let mut bytes = file::encode(&payload).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    assert_one_line_error(&restore(&d), "checksum mismatch");

    // Truncated.
    let bytes = file::encode(&payload).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() - 10]).unwrap();
    assert_one_line_error(&restore(&d), "truncated");

    // Another format version, valid checksum.
    let bytes = file::encode_with(&payload, file::FORMAT_MAJOR + 1, 0, file::BUILD_ID).unwrap();
    std::fs::write(&state, &bytes).unwrap();
    assert_one_line_error(&restore(&d), "format version 2.0 is not supported");

    // Another build.
    let bytes =
        file::encode_with(&payload, file::FORMAT_MAJOR, 0, "vessel-vmm/0.0.1/x86_64").unwrap();
    std::fs::write(&state, &bytes).unwrap();
    assert_one_line_error(&restore(&d), "incompatible build");

    // Valid container, payload of the wrong shape.
    std::fs::write(&state, file::encode(&payload).unwrap()).unwrap();
    assert_one_line_error(&restore(&d), "payload does not decode");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn fs_share_syntax_errors() {
    for (arg, needle) in [
        ("noequals", "expected TAG=HOST_DIR[,ro]"),
        ("=/tmp", "invalid share tag \"\": it is empty"),
        ("t=", "expected TAG=HOST_DIR[,ro]"),
        ("t=/tmp,rx", "unknown option \"rx\""),
        ("a b=/tmp", "only printable ASCII"),
    ] {
        let out = vmm(&["--kernel", "/nonexistent", "--fs", arg]);
        assert_one_line_error(&out, needle);
    }
}

#[test]
fn fs_tag_longer_than_36_bytes() {
    let ok = format!("{}=/tmp", "x".repeat(36));
    let long = format!("{}=/tmp", "x".repeat(37));
    let out = vmm(&["--kernel", "/nonexistent", "--fs", &long]);
    assert_one_line_error(&out, "longer than 36 bytes");
    // A 36-byte tag passes validation (and the run fails later, on the kernel).
    let out = vmm(&["--kernel", "/nonexistent", "--fs", &ok]);
    assert_one_line_error(&out, "cannot open kernel");
}

#[test]
fn fs_duplicate_tag() {
    let out = vmm(&[
        "--kernel",
        "/nonexistent",
        "--fs",
        "data=/tmp",
        "--fs",
        "data=/,ro",
    ]);
    assert_one_line_error(&out, "share tag \"data\" is used twice");
}

#[test]
fn fs_missing_or_non_directory() {
    let out = vmm(&["--kernel", "/nonexistent", "--fs", "t=/nonexistent/dir"]);
    assert_one_line_error(&out, "share \"t\": /nonexistent/dir is not a directory");
    let d = tempdir("fsfile");
    let f = d.join("file");
    std::fs::write(&f, b"x").unwrap();
    let arg = format!("t={}", f.display());
    let out = vmm(&["--kernel", "/nonexistent", "--fs", &arg]);
    assert_one_line_error(&out, "is not a directory");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn restore_conflicts_with_kernel() {
    let out = vmm(&["--restore", "/tmp", "--kernel", "/x"]);
    assert!(!out.status.success());
}

#[test]
fn fs_too_many_shares() {
    let args: Vec<String> = (0..9).map(|i| format!("t{i}=/tmp")).collect();
    let mut argv = vec!["--kernel", "/nonexistent"];
    for a in &args {
        argv.push("--fs");
        argv.push(a);
    }
    let out = vmm(&argv);
    assert_one_line_error(&out, "at most 8 shared directories");
}

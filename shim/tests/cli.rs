//! The `vessel` command's runc-compatible surface that works without a
//! sandbox: spec, state, list, delete, errors and their log records.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vessel(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("VESSEL_CONFIG", "")
        .output()
        .expect("run vessel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn spec_writes_runc_default_once() {
    let d = tempdir("spec");
    let b = d.to_str().unwrap();
    let o = vessel(&d.join("root"), &["spec", "--bundle", b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["root"]["path"], "rootfs");
    let o = vessel(&d.join("root"), &["spec", "--bundle", b]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("exists. Remove it first"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unknown_and_invalid_ids_fail_like_runc() {
    let d = tempdir("ids");
    let root = d.join("root");
    for cmd in ["state", "delete"] {
        let o = vessel(&root, &[cmd, "nosuch"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("container does not exist"),
            "{}",
            stderr(&o)
        );
    }
    let o = vessel(&root, &["state", "../etc"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid container id"),
        "{}",
        stderr(&o)
    );
    assert!(!root.exists(), "a failed command created state");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn list_of_nothing() {
    let d = tempdir("list");
    let root = d.join("root");
    let o = vessel(&root, &["list", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let o = vessel(&root, &["list"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ID"));
    let o = vessel(&root, &["list", "--format", "yaml"]);
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn errors_land_in_the_json_log_as_runc_records() {
    let d = tempdir("log");
    let log = d.join("log.json");
    let o = vessel(
        &d.join("root"),
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "x",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container does not exist");
    assert!(last["time"].as_str().unwrap().ends_with('Z'));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn create_without_installed_artifacts_says_how_to_install() {
    let d = tempdir("create");
    let cfg = d.join("config.toml");
    std::fs::write(&cfg, "kernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let o = vessel(
        &d.join("root"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "create",
            "--bundle",
            "/nonexistent",
            "c1",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cargo xtask install"), "{}", stderr(&o));
    assert!(!d.join("root").exists());
    let _ = std::fs::remove_dir_all(&d);
}

//! Pieces of the network tests: an HTTP server in a namespace the test
//! created, a bounded fetch from inside one, and the comparison of what an
//! engine assigned with the guest's `eth0`.
//!
//! Fetches run busybox `wget` under busybox `timeout`: Debian's busybox
//! 1.35 `wget -T` crashes (SIGSEGV) with its static glibc.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::engines::{poll_until, Netns};

/// busybox `httpd` serving `dir` on `port` of every address of a
/// namespace; killed on drop.
pub struct HttpServer(Child);

impl HttpServer {
    /// Writes `page` to `dir/index.html` and serves `dir` in `ns`.
    pub fn start(ns: &Netns, port: u16, dir: &Path, page: &str) -> HttpServer {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        fs::write(dir.join("index.html"), page).expect("write index.html");
        let child = ns
            .command("busybox")
            .args(["httpd", "-f", "-p", &port.to_string(), "-h"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        HttpServer(child)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body at `url`, fetched from inside `ns` (5 s per attempt), retried
/// until it answers or `within` passed.
pub fn fetch(ns: &Netns, url: &str, within: Duration) -> Option<String> {
    poll_until(within, || {
        let o = ns
            .command("busybox")
            .args(["timeout", "5", "busybox", "wget", "-q", "-O", "-", url])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    })
}

/// Checks that `ip -o addr` (`addr`) and `ip -o link` (`link`) of the
/// container's `eth0` show what the engine assigned (`assigned`: the
/// inspect output `ADDR/PREFIX MAC`).
pub fn eth0_has(engine: &str, assigned: &str, addr: &str, link: &str) -> Result<(), String> {
    let mut want = assigned.split_whitespace();
    let (a, mac) = (want.next().unwrap_or(""), want.next().unwrap_or(""));
    if addr.contains(&format!("inet {a} ")) && link.contains(&format!("link/ether {mac} ")) {
        Ok(())
    } else {
        Err(format!(
            "{engine} assigned {assigned:?}; eth0: {addr:?} {link:?}"
        ))
    }
}

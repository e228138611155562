//! `cargo xtask bench engines [N]`: `podman run --rm IMG true`, `docker
//! run --rm IMG true` and `ctr run --rm true` with vessel against runc,
//! through the engines themselves, in one invocation.
//!
//! Podman is the engine tests' ([`vessel_tests::podman::Podman`]: podman
//! 4.3 through conmon, private storage and containers.conf, its own
//! network namespace, vessel by its `[engine.runtimes]` name, runc by
//! path).
//! Method: a private dockerd 20.10 (`--add-runtime` for both runtimes,
//! each a wrapper script that passes vessel its config) and a private
//! containerd 1.6, each in a network namespace of its own made for the
//! bench, with data, state and sockets in a scratch directory (as
//! tests/tests/engine_docker.rs and engine_containerd.rs do). Docker runs
//! a busybox image made with `docker import`; ctr runs the same root file
//! system with `--rootfs` (no snapshotter), `--runc-binary` naming the
//! runtime. One warm-up run of each (vessel's builds its VM template),
//! then N rounds alternate runc and vessel, each timed from spawn to exit
//! of the engine's client; the table shows medians.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vessel_tests::engines::{
    busybox_image_tar, leaks, output_within, poll_until, wait_within, Netns, RuntimePair,
};

use vessel_tests::podman::{Podman, Rt};

use crate::bench_podman::run_true;

use crate::bench::median;
use crate::build;

/// The 20.10 client from Debian's docker.io.
const DOCKER: &str = "/usr/bin/docker";

/// An engine daemon of the bench, stopped (and what it left removed) on
/// drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
    tag: String,
    _ns: Netns,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        leaks::kill_tagged(&self.tag);
        // SAFETY: kill with a pid and a signal number only.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if wait_within(&mut self.child, Duration::from_secs(30)).is_none() {
            eprintln!("engine did not stop within 30 s: killed");
        }
        leaks::kill_tagged(&self.tag);
        std::thread::sleep(Duration::from_millis(300));
        leaks::unmount_under(&self.dir);
    }
}

fn spawn(ns: &Netns, program: &str, args: &[String], log: &Path) -> Result<Child> {
    let f = fs::File::create(log).with_context(|| log.display().to_string())?;
    ns.command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting {program}"))
}

/// Times `cmd`, which must exit 0 within 10 minutes; seconds.
fn timed(mut cmd: Command, what: &str) -> Result<f64> {
    let t = output_within(&mut cmd, Duration::from_secs(600));
    if t.code() != 0 {
        bail!("{}", t.describe(what));
    }
    Ok(t.took.as_secs_f64())
}

pub fn run(root: &Path, rounds: usize) -> Result<()> {
    if rounds == 0 {
        bail!("bench engines needs at least one round");
    }
    let art = build::all(root)?;
    let scratch = std::env::temp_dir().join(format!("vessel-bench-engines-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let result = bench(root, &art, &scratch, rounds);
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn bench(root: &Path, art: &vessel_tests::Artifacts, dir: &Path, rounds: usize) -> Result<()> {
    let tag = format!("bench-engines-{}", std::process::id());
    vessel_tests::engines::which("runc").context("runc missing (apt-get install runc)")?;
    let pair = RuntimePair::write(art, dir, &tag, &[], &[]);
    let (w_runc, w_vessel) = (&pair.runc, &pair.vessel);
    let tar = busybox_image_tar(dir);
    let rootfs = dir.join("busybox-rootfs");

    // dockerd, its exec root longer than the default /var/run/docker.
    let sock = dir.join("docker.sock");
    let ns = Netns::new("bench-docker");
    let args: Vec<String> = vec![
        "--data-root".into(),
        dir.join("docker-data").display().to_string(),
        "--exec-root".into(),
        dir.join("docker-exec").display().to_string(),
        "--pidfile".into(),
        dir.join("docker.pid").display().to_string(),
        "-H".into(),
        format!("unix://{}", sock.display()),
        "--bridge".into(),
        "none".into(),
        "--iptables=false".into(),
        "--add-runtime".into(),
        format!("runcw={}", w_runc.path.display()),
        "--add-runtime".into(),
        format!("vessel={}", w_vessel.path.display()),
    ];
    let child = spawn(&ns, "dockerd", &args, &dir.join("dockerd.log"))?;
    let docker_d = Daemon {
        child,
        dir: dir.to_path_buf(),
        tag: tag.clone(),
        _ns: ns,
    };
    let docker = |args: &[&str]| {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(args);
        c
    };
    poll_until(Duration::from_secs(60), || {
        output_within(&mut docker(&["version"]), Duration::from_secs(10))
            .ok("version")
            .ok()
            .map(|_| ())
    })
    .context("dockerd did not answer within 60 s")?;
    let tar_s = tar.to_string_lossy().into_owned();
    timed(
        docker(&["import", "-c", "ENV PATH=/bin", &tar_s, "bench:1"]),
        "docker import",
    )?;
    let docker_run = |rt: &str| docker(&["run", "--rm", "--runtime", rt, "bench:1", "true"]);

    // containerd with its own root, state and socket.
    let csock = dir.join("containerd.sock");
    let ctoml = dir.join("containerd.toml");
    fs::write(
        &ctoml,
        format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n",
            dir.join("ctrd-root"),
            dir.join("ctrd-state"),
            csock
        ),
    )?;
    let ns = Netns::new("bench-containerd");
    let child = spawn(
        &ns,
        "containerd",
        &["--config".into(), ctoml.display().to_string()],
        &dir.join("containerd.log"),
    )?;
    let ctr_d = Daemon {
        child,
        dir: dir.to_path_buf(),
        tag: tag.clone(),
        _ns: ns,
    };
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&csock).args(args);
        c
    };
    poll_until(Duration::from_secs(60), || {
        output_within(&mut ctr(&["version"]), Duration::from_secs(10))
            .ok("version")
            .ok()
            .map(|_| ())
    })
    .context("containerd did not answer within 60 s")?;
    let rootfs_s = rootfs.to_string_lossy().into_owned();
    let ctr_root = dir.join("ctr-runtime-root").display().to_string();
    let mut n = 0;
    let mut ctr_run = |w: &Path| {
        n += 1;
        let id = format!("b{n}");
        let bin = w.to_string_lossy().into_owned();
        ctr(&[
            "run",
            "--rm",
            "--runc-binary",
            &bin,
            "--runc-root",
            &ctr_root,
            "--rootfs",
            &rootfs_s,
            &id,
            "/bin/true",
        ])
    };

    let pod = Podman::new(art, "bench-engines-podman");
    pod.import_busybox()
        .map_err(anyhow::Error::msg)
        .context("importing the busybox image into podman")?;
    let podman_run = |rt: Rt| run_true(&pod, rt).map(|ms| ms / 1000.0);

    let t = Instant::now();
    podman_run(Rt::Runc).context("podman run runc (warm-up)")?;
    podman_run(Rt::Vessel).context("podman run vessel (warm-up)")?;
    timed(docker_run("runcw"), "docker run runc (warm-up)")?;
    timed(docker_run("vessel"), "docker run vessel (warm-up)")?;
    timed(ctr_run(&w_runc.path), "ctr run runc (warm-up)")?;
    timed(ctr_run(&w_vessel.path), "ctr run vessel (warm-up)")?;
    println!(
        "warm-up (vessel's template build included): {:.1?}",
        t.elapsed()
    );
    let (mut dr, mut dv, mut cr, mut cv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pr, mut pv) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        pr.push(podman_run(Rt::Runc).context("podman run runc")?);
        pv.push(podman_run(Rt::Vessel).context("podman run vessel")?);
        dr.push(timed(docker_run("runcw"), "docker run runc")?);
        dv.push(timed(docker_run("vessel"), "docker run vessel")?);
        cr.push(timed(ctr_run(&w_runc.path), "ctr run runc")?);
        cv.push(timed(ctr_run(&w_vessel.path), "ctr run vessel")?);
        println!(
            "round {}: podman runc {:.3} s, vessel {:.3} s; docker runc {:.3} s, vessel {:.3} s; ctr runc {:.3} s, vessel {:.3} s",
            i + 1,
            pr[i],
            pv[i],
            dr[i],
            dv[i],
            cr[i],
            cv[i]
        );
    }
    println!("\nmedian of {rounds} alternating rounds, client spawn to exit, `run --rm ... true`:");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "engine", "runc", "vessel", "ratio"
    );
    let mut json = serde_json::Map::new();
    for (name, key, r, v) in [
        ("podman 4.3 (conmon)", "podman", pr, pv),
        ("docker 20.10 (dockerd)", "docker", dr, dv),
        ("containerd 1.6 (ctr)", "ctr", cr, cv),
    ] {
        let (mr, mv) = (median(r.clone()), median(v.clone()));
        println!("{name:<28} {mr:>9.3}s {mv:>9.3}s {:>9.1}x", mv / mr);
        json.insert(
            key.to_string(),
            serde_json::json!({"runc_s": r, "vessel_s": v, "runc_median_s": mr,
                               "vessel_median_s": mv, "ratio": mv / mr}),
        );
    }
    let out = root.join("target/vessel/bench-engines.json");
    fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!("(also written to {})", out.display());
    drop(pod);
    drop(ctr_d);
    drop(docker_d);
    Ok(())
}

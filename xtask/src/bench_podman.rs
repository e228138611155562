//! `cargo xtask bench podman [N]`: `podman run --rm IMG true` with vessel
//! next to the same with runc, from the same private podman in the same
//! invocation (issue 14's "Done when").
//!
//! Method: the podman of the engine tests ([`vessel_tests::podman::Podman`]:
//! Debian's podman 4.3 through conmon, private storage and containers.conf,
//! a network namespace of its own, the local busybox image, each runtime
//! behind its argv-logging wrapper). One warm-up run of each runtime (the
//! first vessel run builds the VM template if this build has none yet),
//! then N rounds alternate `podman --runtime vessel run --rm IMG true` and
//! `podman --runtime <runc> run --rm IMG true`, each timed from spawn to
//! exit of the podman process; the table shows medians and the ratio, and
//! the median time of each runtime call (`create`, `start`, `delete`) from
//! the wrappers' logs, which says where the difference goes.

use std::path::Path;

use anyhow::{bail, Context, Result};
use vessel_tests::podman::{Podman, Rt, IMAGE, START};

use crate::bench::median;
use crate::build;

/// Milliseconds of the calls of `verb` in a wrapper's `<ms> ms, exit N:
/// <args>` lines, from line `skip` on.
fn call_ms(lines: &[String], skip: usize, verb: &str) -> Vec<f64> {
    lines
        .iter()
        .skip(skip)
        .filter_map(|l| {
            let (ms, rest) = l.split_once(" ms, exit ")?;
            let (_, args) = rest.split_once(": ")?;
            args.split_whitespace()
                .find(|w| !w.starts_with('-'))
                .filter(|w| *w == verb)?;
            ms.parse::<f64>().ok()
        })
        .collect()
}

/// One timed `podman run --rm IMAGE true`; milliseconds.
pub(crate) fn run_true(p: &Podman, rt: Rt) -> Result<f64> {
    let t = p.with(rt, &["run", "--rm", IMAGE, "true"], START);
    if !t.status.is_some_and(|s| s.success()) {
        bail!(
            "{}",
            t.describe(&format!("podman {} run --rm true", rt.name()))
        );
    }
    Ok(t.took.as_secs_f64() * 1000.0)
}

pub fn run(root: &Path, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("need at least one run");
    }
    crate::kernel::install_missing(
        &[
            "podman",
            "conmon",
            "netavark",
            "catatonit",
            "runc",
            "busybox-static",
        ],
        "podman (the engine), runc (the reference) and busybox (the image)",
    )?;
    let a = build::all(root)?;
    let p = Podman::new(&a, "bench-podman");
    p.import_busybox()
        .map_err(anyhow::Error::msg)
        .context("importing the busybox image")?;
    eprintln!("bench podman: warm-up (builds the VM template if this build has none)");
    let warm_vessel = run_true(&p, Rt::Vessel)?;
    run_true(&p, Rt::Runc)?;
    let skip_v = p.vessel.timed_calls().len();
    let skip_r = p.runc.timed_calls().len();
    let (mut v, mut r) = (Vec::new(), Vec::new());
    for i in 0..runs {
        v.push(run_true(&p, Rt::Vessel)?);
        r.push(run_true(&p, Rt::Runc)?);
        eprintln!(
            "bench podman: round {i}: vessel {:.0} ms, runc {:.0} ms",
            v[i], r[i]
        );
    }
    let (vc, rc) = (p.vessel.timed_calls(), p.runc.timed_calls());
    let (mv, mr) = (median(v.clone()), median(r.clone()));
    println!();
    println!("podman: `podman run --rm {IMAGE} true`, runtime vessel (containers.conf name) vs runc (path), same podman 4.3 + conmon, same invocation");
    println!("method: podman spawn -> exit, median of {runs} alternating rounds after one warm-up each; runtime calls timed by the wrappers");
    println!(
        "{:<52} {:>10.1}",
        "vessel warm-up (template build if none) (ms)", warm_vessel
    );
    println!(
        "{:<52} {:>10.1}",
        "podman run --rm true, vessel, median (ms)", mv
    );
    println!(
        "{:<52} {:>10.1}",
        "podman run --rm true, runc, median (ms)", mr
    );
    println!("{:<52} {:>10.1}x", "vessel / runc", mv / mr);
    let mut calls = serde_json::Map::new();
    for verb in ["create", "start", "delete"] {
        let (cv, cr) = (call_ms(&vc, skip_v, verb), call_ms(&rc, skip_r, verb));
        let (mcv, mcr) = (median(cv.clone()), median(cr.clone()));
        println!(
            "{:<52} {:>10.1} vs {:.1}",
            format!("  runtime `{verb}`, median, vessel vs runc (ms)"),
            mcv,
            mcr
        );
        calls.insert(
            verb.to_string(),
            serde_json::json!({"vessel_ms": cv, "runc_ms": cr}),
        );
    }
    let json = serde_json::json!({
        "benchmark": "podman",
        "runs": runs,
        "vessel_warmup_ms": warm_vessel,
        "vessel_ms": v,
        "runc_ms": r,
        "vessel_median_ms": mv,
        "runc_median_ms": mr,
        "ratio": mv / mr,
        "runtime_calls": calls,
    });
    drop(p);
    let out = root.join("target/vessel/bench-podman.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("(also written to {})", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_times_are_read_per_verb() {
        let lines: Vec<String> = [
            "12 ms, exit 0: create --bundle /b --pid-file /p id",
            "3 ms, exit 0: start id",
            "5 ms, exit 0: delete --force id",
            "14 ms, exit 0: create --bundle /b --pid-file /p id2",
            "garbage",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(call_ms(&lines, 0, "create"), vec![12.0, 14.0]);
        assert_eq!(call_ms(&lines, 1, "create"), vec![14.0]);
        assert_eq!(call_ms(&lines, 0, "delete"), vec![5.0]);
    }
}

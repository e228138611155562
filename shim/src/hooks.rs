//! OCI lifecycle hooks that run on the host (`hooks` in `config.json`).
//!
//! Engines use them to wire the sandbox into the host: docker's
//! `libnetwork-setkey` prestart hook reads the state's `pid` and fills
//! `/proc/PID/ns/net` with the container's interfaces. In vessel that pid
//! is the monitor's, whose network namespace the VMM shares, so the hooks
//! see the sandbox where runc's see the container.
//!
//! | hook | where vessel runs it |
//! |---|---|
//! | `prestart`, `createRuntime` | by the monitor, after the sandbox's network namespace exists and before the VM starts; a failure fails `create` |
//! | `poststart` | by `start`, once the init runs; a failure is logged |
//! | `poststop` | by `delete`, after everything stopped; a failure is logged |
//! | `createContainer`, `startContainer` | refused: the runtime spec runs them inside the container's namespaces, which are in the guest, where a host binary cannot run; `create` fails with a clear error before anything starts rather than silently skipping them |
//!
//! Each hook gets the state JSON on stdin, exactly its `args` (the first
//! is argv\[0\]) and `env` (nothing else), and is killed after its
//! `timeout` (seconds; [`DEFAULT_TIMEOUT`] when unset, so a stuck hook
//! cannot hang an engine).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a hook without a `timeout` may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors running hooks.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook list is not what the spec says it is.
    #[error("config.json: hooks.{kind}: {reason}")]
    Invalid {
        /// The hook kind.
        kind: String,
        /// What is wrong.
        reason: String,
    },
    /// The hook could not be started or talked to.
    #[error("{kind} hook {}: {source}", path.display())]
    Run {
        /// The hook kind.
        kind: String,
        /// Its path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A hook the runtime spec runs inside the container.
    #[error(
        "config.json: hooks.{kind} ({}): vessel cannot run {kind} hooks: the runtime spec runs \
         them in the container's namespaces, which are inside the container's VM, where a host \
         binary does not exist (use prestart/createRuntime/poststart/poststop hooks, which run \
         on the host)", path.display()
    )]
    InContainer {
        /// The hook kind.
        kind: String,
        /// The first such hook.
        path: PathBuf,
    },
    /// The hook failed or ran out of time.
    #[error("{kind} hook {} {outcome}{}", path.display(), if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        /// The hook kind.
        kind: String,
        /// Its path.
        path: PathBuf,
        /// `exited with ...` or `timed out after ...`.
        outcome: String,
        /// What it wrote to stderr.
        stderr: String,
    },
}

/// Refuses a spec with `createContainer` or `startContainer` hooks: the
/// runtime spec runs them in the container's namespaces, which live in
/// another kernel, and skipping them silently would break whatever the
/// user relies on them for.
pub fn refuse_in_container(spec: &Value) -> Result<(), HookError> {
    for kind in ["createContainer", "startContainer"] {
        if let Some(h) = of_kind(spec, kind)?.first() {
            return Err(HookError::InContainer {
                kind: kind.into(),
                path: h.path.clone(),
            });
        }
    }
    Ok(())
}

/// One hook of the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Hook {
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// argv, argv\[0\] first (default: the path).
    pub args: Vec<String>,
    /// The whole environment.
    pub env: Vec<String>,
    /// Time limit.
    pub timeout: Duration,
}

/// The hooks of kind `kind` (`prestart`, `poststart`, ...) in `spec`.
pub fn of_kind(spec: &Value, kind: &str) -> Result<Vec<Hook>, HookError> {
    let invalid = |reason: String| HookError::Invalid {
        kind: kind.into(),
        reason,
    };
    let Some(list) = spec.pointer(&format!("/hooks/{kind}")) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid("not a list".into()))?;
    let strings = |v: &Value, what: &str| -> Result<Vec<String>, HookError> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(format!("{what} must be strings")))
                })
                .collect(),
            _ => Err(invalid(format!("{what} must be a list"))),
        }
    };
    list.iter()
        .map(|h| {
            let path = h["path"]
                .as_str()
                .filter(|p| p.starts_with('/'))
                .ok_or_else(|| invalid("every hook needs an absolute path".into()))?;
            let mut args = strings(&h["args"], "args")?;
            if args.is_empty() {
                args.push(path.to_string());
            }
            let timeout = match &h["timeout"] {
                Value::Null => DEFAULT_TIMEOUT,
                t => match t.as_u64() {
                    Some(s) if s > 0 => Duration::from_secs(s),
                    _ => return Err(invalid("timeout must be a positive number".into())),
                },
            };
            Ok(Hook {
                path: PathBuf::from(path),
                args,
                env: strings(&h["env"], "env")?,
                timeout,
            })
        })
        .collect()
}

/// Runs `hooks` of kind `kind` one after the other, each with `state` on
/// stdin; stops at the first failure.
pub fn run(kind: &str, hooks: &[Hook], state: &Value) -> Result<(), HookError> {
    let input = state.to_string();
    for h in hooks {
        run_one(kind, h, input.as_bytes())?;
    }
    Ok(())
}

fn run_one(kind: &str, h: &Hook, input: &[u8]) -> Result<(), HookError> {
    let fail = |source| HookError::Run {
        kind: kind.into(),
        path: h.path.clone(),
        source,
    };
    let mut cmd = Command::new(&h.path);
    cmd.arg0(&h.args[0])
        .args(&h.args[1..])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0);
    for kv in &h.env {
        match kv.split_once('=') {
            Some((k, v)) => cmd.env(k, v),
            None => cmd.env(kv, ""),
        };
    }
    let mut child = cmd.spawn().map_err(fail)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state closes stdin early: fine.
        let _ = stdin.write_all(input);
    }
    let stderr = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        let _ = tx.send(s);
    });
    let deadline = Instant::now() + h.timeout;
    let status = loop {
        match child.try_wait().map_err(fail)? {
            Some(st) => break Some(st),
            None if Instant::now() >= deadline => {
                if let Ok(pgid) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) of the hook's own process group.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    // Something the hook left running may hold stderr open: wait briefly.
    let stderr = rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default()
        .trim()
        .to_string();
    let outcome = match status {
        Some(st) if st.success() => return Ok(()),
        Some(st) => format!("exited with {st}"),
        None => format!("timed out after {:?}", h.timeout),
    };
    Err(HookError::Failed {
        kind: kind.into(),
        path: h.path.clone(),
        outcome,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hooks_parse_with_defaults_and_refuse_bad_entries() {
        let spec = json!({"hooks": {"prestart": [
            {"path": "/bin/true"},
            {"path": "/bin/sh", "args": ["sh", "-c", "x"], "env": ["A=1"], "timeout": 3}
        ]}});
        let h = of_kind(&spec, "prestart").unwrap();
        assert_eq!(h[0].args, ["/bin/true"]);
        assert_eq!(h[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(h[1].env, ["A=1"]);
        assert_eq!(h[1].timeout, Duration::from_secs(3));
        assert!(of_kind(&spec, "poststop").unwrap().is_empty());
        for bad in [
            json!({"hooks": {"prestart": [{"path": "rel"}]}}),
            json!({"hooks": {"prestart": [{"path": "/x", "timeout": 0}]}}),
            json!({"hooks": {"prestart": [{"path": "/x", "args": [1]}]}}),
            json!({"hooks": {"prestart": {}}}),
        ] {
            assert!(of_kind(&bad, "prestart").is_err(), "{bad}");
        }
    }

    #[test]
    fn hooks_get_the_state_args_and_env_and_fail_loudly() {
        let dir = std::env::temp_dir().join(format!("vessel-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!(
            "cat > {o}; echo \" $0 $1 $A ${{HOME:-nohome}}\" >> {o}",
            o = out.display()
        );
        let spec = json!({"hooks": {"poststart": [
            {"path": "/bin/sh", "args": ["hook0", "-c", script, "zero", "one"], "env": ["A=b"]}
        ], "poststop": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo bad >&2; exit 3"]}
        ], "prestart": [
            {"path": "/bin/sh", "args": ["sh", "-c", "sleep 5"], "timeout": 1}
        ]}});
        let state = json!({"id": "c", "pid": 7});
        run("poststart", &of_kind(&spec, "poststart").unwrap(), &state).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, format!("{state} zero one b nohome\n"));
        let e = run("poststop", &of_kind(&spec, "poststop").unwrap(), &state).unwrap_err();
        assert!(
            e.to_string().contains("exit status: 3") && e.to_string().contains("bad"),
            "{e}"
        );
        let t = Instant::now();
        let e = run("prestart", &of_kind(&spec, "prestart").unwrap(), &state).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Container state under `--root` (default `/run/vessel`), one directory per
//! container:
//!
//! ```text
//! <root>/<id>/state.json   what `vessel state` prints, plus our own fields
//! <root>/<id>/lock         flock(2)ed by every command that changes the container
//! <run_dir>/<key>/         the sandbox's sockets (vsock.sock, api.sock)
//! ```
//!
//! Unix socket paths are limited to 107 bytes, and engines pick long
//! roots (dockerd: `/var/run/docker/runtime-runc/moby` and 64-hex ids), so
//! a sandbox's sockets never live under `--root`: they go to a short
//! directory under a fixed run directory, named by a hash of the absolute
//! root and the id ([`Store::sandbox_dir`]), whatever the root's length.
//!
//! `state.json` is replaced atomically (write to a temporary file, fsync,
//! rename), so a reader sees the old or the new state, never a torn one;
//! two commands on the same id serialize on the lock file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The OCI runtime spec version whose state format we print.
pub const OCI_VERSION: &str = "1.2.0";
/// Where sandbox sockets live unless configured otherwise (`run_dir`).
pub const DEFAULT_RUN_DIR: &str = "/run/vessel-vm";

/// Errors of the state store; their messages are what the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id is not acceptable (runc's rule: `^[\w+-\.]+$`, not `.` or `..`).
    #[error("invalid container id {0:?}: use letters, digits, '_', '+', '-' and '.'")]
    InvalidId(String),
    /// No such container.
    #[error("container does not exist")]
    NotFound,
    /// The id is taken.
    #[error("container with id {0:?} already exists")]
    Exists(String),
    /// The operation is not allowed in the container's current status
    /// (runc's messages).
    #[error("{0}")]
    InvalidState(String),
    /// The state file does not parse.
    #[error("corrupt state for container {id:?}: {reason}")]
    Corrupt {
        /// Container id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// File system errors, with the path.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Container status, as the OCI runtime spec names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created.
    Creating,
    /// Created, waiting for `start`.
    Created,
    /// Its init process runs.
    Running,
    /// Frozen (`pause`).
    Paused,
    /// Its init process has exited.
    Stopped,
}

/// What a command wants to do to a container; [`Status::check`] says
/// whether its current status allows it (the one place that decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `start`.
    Start,
    /// `kill`.
    Kill,
    /// `exec`.
    Exec,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `update`.
    Update,
    /// `ps`, `events`: anything that asks the running guest.
    Inspect,
    /// `delete` without `--force`.
    Delete,
}

impl Status {
    /// Whether `op` is allowed in this status; the error carries runc's
    /// message for the refusal.
    pub fn check(self, op: Op, id: &str) -> Result<(), StateError> {
        use Status::*;
        let ok = match op {
            Op::Start => self == Created,
            Op::Kill => matches!(self, Created | Running | Paused),
            Op::Exec => self == Running,
            Op::Pause => self == Running,
            Op::Resume => self == Paused,
            Op::Update | Op::Inspect => matches!(self, Created | Running | Paused),
            Op::Delete => matches!(self, Created | Stopped | Creating),
        };
        if ok {
            return Ok(());
        }
        let msg = match (op, self) {
            (Op::Start, Stopped) => "cannot start a container that has stopped".to_string(),
            (Op::Start, Running) => "cannot start an already running container".to_string(),
            (Op::Start, s) => format!("cannot start a container in the {} state", s.as_str()),
            (Op::Kill, _) => "container not running".to_string(),
            (Op::Exec, Stopped) => "cannot exec in a stopped container".to_string(),
            (Op::Exec, Paused) => "cannot exec in a paused container".to_string(),
            (Op::Exec, _) => "cannot exec in a container that has not been started".to_string(),
            (Op::Pause, Paused) => format!("container {id} is already paused"),
            (Op::Pause, s) => format!("container {id} is not running: {}", s.as_str()),
            (Op::Resume, s) => format!("container {id} is not paused: {}", s.as_str()),
            (Op::Update | Op::Inspect, s) => {
                format!("container {id} is not running: {}", s.as_str())
            }
            (Op::Delete, s) => format!(
                "cannot delete container {id} that is not stopped: {}",
                s.as_str()
            ),
        };
        Err(StateError::InvalidState(msg))
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// `state.json`: runc's state fields first, vessel's after them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    /// OCI runtime spec version.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// Host pid that stands for the container (0 once stopped).
    pub pid: i32,
    /// Status.
    pub status: Status,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute root filesystem path.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339 in UTC.
    pub created: String,
    /// Owner (runc prints the user name for rootless containers, else "").
    pub owner: String,
    /// Annotations from the bundle's config.json.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// vessel: the container init's exit status once stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// vessel: the init was killed by the OOM killer of its cgroup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
    /// vessel: the start time of `pid` (field 22 of `/proc/PID/stat`), so
    /// a recycled pid is never taken for the container's monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// vessel: the host cgroup the sandbox runs in (what vessel created,
    /// so `delete` removes exactly that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<crate::cgroup::HostCgroupState>,
    /// vessel: the spec's `hooks`, for `poststart` and `poststop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<serde_json::Value>,
    /// vessel: a container created inside another container's VM (a pod
    /// member, see `runtime::pod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodMember>,
}

/// Where a pod member lives: its sandbox container (whose VM runs it) and
/// the name of its directory in the sandbox's share of host mounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMember {
    /// The sandbox container's id.
    pub sandbox: String,
    /// `<root>/<sandbox>/mounts/<stage>` holds the member's rootfs and
    /// binds (mounted in the VMM's mount namespace only).
    pub stage: String,
}

/// The start time (clock ticks since boot) of a live, non-zombie process.
pub fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses):
    // field 3 (state) is the first, field 22 (starttime) the 20th.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    if matches!(f.next(), None | Some("Z") | Some("X")) {
        return None;
    }
    f.nth(18)?.parse().ok()
}

/// Whether process `pid` is alive and is the one that started at `start`.
pub fn same_process(pid: i32, start: u64) -> bool {
    process_start(pid) == Some(start)
}

/// Checks a container id the way runc does.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// The state directory (`--root`) and the run directory of sockets.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    run_dir: PathBuf,
}

/// An exclusive lock on one container, held until dropped.
pub struct Lock {
    _file: File,
}

impl Store {
    /// A store at `root` (created with mode 0711 when first written to),
    /// its sockets under [`DEFAULT_RUN_DIR`].
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store::with_run_dir(root, DEFAULT_RUN_DIR)
    }

    /// A store at `root` whose sandboxes keep their sockets under `run_dir`.
    pub fn with_run_dir(root: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Store {
        let root = root.into();
        let root = std::path::absolute(&root).unwrap_or(root);
        Store {
            root,
            run_dir: run_dir.into(),
        }
    }

    /// The short directory of container `id`'s sandbox sockets:
    /// `<run_dir>/<16 hex digits of SHA-256(root, id)>`, so its length does
    /// not depend on the root's or the id's.
    pub fn sandbox_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        let mut h = Sha256::new();
        h.update(self.root.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(id.as_bytes());
        let key: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(self.run_dir.join(key))
    }

    /// Creates the sandbox directory of `id` (mode 0700) and returns it.
    pub fn create_sandbox_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let dir = self.sandbox_dir(id)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.run_dir)
            .map_err(io("creating", &self.run_dir))?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(io("creating", &dir)(e)),
        }
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        Ok(self.root.join(id))
    }

    /// Creates the directory of a new container and locks it. Fails with
    /// [`StateError::Exists`] when the id is taken (atomically: mkdir).
    pub fn create(&self, id: &str) -> Result<(PathBuf, Lock), StateError> {
        let dir = self.dir(id)?;
        // Another process may remove the (empty) root between the two
        // mkdirs: a shim v2 that ends removes its namespace's root if no
        // container is left. Once `dir` exists the root is not empty.
        let mut attempts = 0;
        loop {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&self.root)
                .map_err(io("creating", &self.root))?;
            match fs::DirBuilder::new().mode(0o711).create(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(StateError::Exists(id.to_string()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 10 => {
                    attempts += 1;
                }
                Err(e) => return Err(io("creating", &dir)(e)),
            }
        }
        let lock = self.lock_dir(&dir)?;
        Ok((dir, lock))
    }

    /// Locks an existing container.
    pub fn lock(&self, id: &str) -> Result<Lock, StateError> {
        let dir = self.dir(id)?;
        if !dir.is_dir() {
            return Err(StateError::NotFound);
        }
        self.lock_dir(&dir)
    }

    fn lock_dir(&self, dir: &Path) -> Result<Lock, StateError> {
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("opening", &path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking", &path)(std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }

    /// Reads the state of `id`.
    pub fn load(&self, id: &str) -> Result<ContainerState, StateError> {
        let dir = self.dir(id)?;
        let path = dir.join("state.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotFound),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let state: ContainerState =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        if state.id != id {
            return Err(StateError::Corrupt {
                id: id.to_string(),
                reason: format!("it names container {:?}", state.id),
            });
        }
        Ok(state)
    }

    /// Replaces the state of `state.id` atomically. The caller holds its lock.
    pub fn save(&self, state: &ContainerState, _lock: &Lock) -> Result<(), StateError> {
        let dir = self.dir(&state.id)?;
        let path = dir.join("state.json");
        let tmp = dir.join(".state.json.tmp");
        let body = serde_json::to_vec(state).map_err(|e| StateError::Corrupt {
            id: state.id.clone(),
            reason: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("writing", &tmp))?;
        f.write_all(&body).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
        Ok(())
    }

    /// Removes the directory of `id` and everything in it, and its
    /// sandbox directory.
    pub fn remove(&self, id: &str, _lock: Lock) -> Result<(), StateError> {
        let sb = self.sandbox_dir(id)?;
        match fs::remove_dir_all(&sb) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &sb)(e)),
        }
        let dir = self.dir(id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &dir)(e)),
        }
    }

    /// Ids of every container, sorted.
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &self.root)(e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// Seconds since the epoch as RFC 3339 UTC with nanoseconds, like Go's
/// `time.RFC3339Nano` that runc prints.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn store(name: &str) -> Store {
        let root = std::env::temp_dir().join(format!("vessel-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        Store::with_run_dir(&root, root.join("run"))
    }

    fn state(id: &str) -> ContainerState {
        ContainerState {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            pid: 42,
            status: Status::Created,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: rfc3339(UNIX_EPOCH),
            owner: String::new(),
            annotations: Default::default(),
            exit_status: None,
            oom_killed: false,
            pid_start: None,
            host_cgroup: None,
            hooks: None,
            pod: None,
        }
    }

    #[test]
    fn sandbox_dirs_are_short_and_distinct() {
        let long = "/var/run/docker/runtime-runc/moby".to_string();
        let id = "a".repeat(64);
        let s = Store::with_run_dir(&long, DEFAULT_RUN_DIR);
        let d = s.sandbox_dir(&id).unwrap();
        assert!(d.join("vsock.sock_1025").as_os_str().len() < 60, "{d:?}");
        assert_ne!(
            d,
            Store::with_run_dir("/other", DEFAULT_RUN_DIR)
                .sandbox_dir(&id)
                .unwrap()
        );
        assert_ne!(d, s.sandbox_dir("b").unwrap());
        assert!(s.sandbox_dir("../x").is_err());
    }

    #[test]
    fn status_checks_follow_runc() {
        use Status::*;
        Created.check(Op::Start, "c").unwrap();
        assert!(Running.check(Op::Start, "c").is_err());
        assert!(Stopped.check(Op::Kill, "c").is_err());
        Created.check(Op::Kill, "c").unwrap();
        Running.check(Op::Exec, "c").unwrap();
        assert!(Paused.check(Op::Exec, "c").is_err());
        Running.check(Op::Pause, "c").unwrap();
        Paused.check(Op::Resume, "c").unwrap();
        assert!(Running.check(Op::Delete, "c").is_err());
        Stopped.check(Op::Delete, "c").unwrap();
        Created.check(Op::Delete, "c").unwrap();
    }

    #[test]
    fn process_start_identifies_live_processes() {
        let me = i32::try_from(std::process::id()).unwrap();
        let t = process_start(me).unwrap();
        assert!(same_process(me, t));
        assert!(!same_process(me, t + 1));
        assert_eq!(process_start(0), None);
    }

    #[test]
    fn ids_follow_runc_rules() {
        for ok in ["a", "abc-1_2+3.4", "A.b"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_save_load_list_remove() {
        let s = store("crud");
        let (_, lock) = s.create("c1").unwrap();
        s.save(&state("c1"), &lock).unwrap();
        assert!(matches!(s.create("c1"), Err(StateError::Exists(_))));
        assert_eq!(s.load("c1").unwrap(), state("c1"));
        drop(lock);
        let (_, l2) = s.create("c0").unwrap();
        drop(l2);
        assert_eq!(s.ids().unwrap(), ["c0", "c1"]);
        let lock = s.lock("c1").unwrap();
        s.remove("c1", lock).unwrap();
        assert!(matches!(s.load("c1"), Err(StateError::NotFound)));
        assert!(matches!(s.lock("c1"), Err(StateError::NotFound)));
        let _ = fs::remove_dir_all(s.root());
    }

    #[test]
    fn corrupt_and_mismatched_state_is_reported() {
        let s = store("corrupt");
        let (dir, _lock) = s.create("c").unwrap();
        fs::write(dir.join("state.json"), b"{not json").unwrap();
        assert!(matches!(s.load("c"), Err(StateError::Corrupt { .. })));
        fs::write(
            dir.join("state.json"),
            serde_json::to_vec(&state("other")).unwrap(),
        )
        .unwrap();
        assert!(matches!(s.load("c"), Err(StateError::Corrupt { .. })));
        let _ = fs::remove_dir_all(s.root());
    }

    #[test]
    fn state_json_has_runc_field_names() {
        let v = serde_json::to_value(state("c")).unwrap();
        for k in [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(v["status"], "created");
    }

    #[test]
    fn rfc3339_formats_like_go() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 123);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000123Z");
    }
}

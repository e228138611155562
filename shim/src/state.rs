//! Container state under `--root` (default `/run/vessel`), one directory per
//! container:
//!
//! ```text
//! <root>/<id>/state.json   what `vessel state` prints, plus our own fields
//! <root>/<id>/lock         flock(2)ed by every command that changes the container
//! ```
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

/// The OCI runtime spec version whose state format we print.
pub const OCI_VERSION: &str = "1.2.0";

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

impl Status {
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

/// The state directory (`--root`).
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// An exclusive lock on one container, held until dropped.
pub struct Lock {
    _file: File,
}

impl Store {
    /// A store at `root` (created with mode 0711 when first written to).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
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
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.root)
            .map_err(io("creating", &self.root))?;
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_string()))
            }
            Err(e) => return Err(io("creating", &dir)(e)),
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

    /// Removes the directory of `id` and everything in it.
    pub fn remove(&self, id: &str, _lock: Lock) -> Result<(), StateError> {
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
        Store::new(root)
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
        }
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

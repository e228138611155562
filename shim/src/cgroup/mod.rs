//! The sandbox's host cgroup: where the `vessel` monitor and its
//! `vessel-vmm` child live on the host.
//!
//! The container runs in a VM, so the cgroup the OCI spec asks for
//! (`linux.cgroupsPath`) has two readers on the host that expect it to exist
//! and to hold the container's work: the engine's stats (podman reads the
//! cgroup files at that path; containerd's runc shim loads the cgroup of the
//! init pid) and the kernel's OOM and CPU accounting. As Kata does with
//! `sandbox_cgroup_only`, vessel puts the whole sandbox (the monitor, and the
//! VMM it spawns, which inherits it) into that cgroup, in every mounted
//! hierarchy: all v1 controllers and named hierarchies (`name=systemd`), and
//! the cgroup2 hierarchy, whether it is the only one (pure v2) or mounted
//! beside v1 (hybrid, `/sys/fs/cgroup/unified` on our hosts). Hierarchies are
//! found in `/proc/self/mountinfo` and `/proc/self/cgroup`, never assumed.
//!
//! **Limits are not written here.** The container's `linux.resources`
//! (memory, pids, CPU quota, devices, block I/O) keep applying *inside the
//! guest*, where the agent writes them to the guest's cgroup. Writing the
//! memory or pids limit to the host cgroup would apply a container's limit to
//! the VMM, which needs its guest's RAM plus its own: a container with a
//! 6 MiB memory limit would have its VMM killed. What is written is what does
//! not starve the VMM: the CPU weight (`cpu.shares`, `cpu.weight` on v2) and
//! the allowed CPUs and memory nodes, through [`HostCgroup::apply_cpu`], only
//! if the caller asks. An engine that wants a host-side ceiling sets it on a
//! parent (a pod cgroup, `--cgroup-parent`), which covers the sandbox.
//!
//! Memory is charged to the cgroup a process is in when it allocates (v1
//! does not move charges with a process unless
//! `memory.move_charge_at_immigrate` asks for it): move the monitor in
//! ([`HostCgroup::add_pid`]) before the VMM allocates guest memory.
//!
//! **Path forms**, as runc reads them ([`CgroupPath::parse`]):
//! - cgroupfs (the default): `/a/b` names `/a/b` from each hierarchy's root;
//!   a relative `a/b` is relative to the cgroup of the calling process (v1
//!   and hybrid; on pure v2, to its parent, where controllers can be
//!   enabled); no path means the container id, relative.
//! - with runc's global `--systemd-cgroup`: `slice:prefix:name`, which names
//!   the unit `prefix-name.scope` (or `name` as is when it ends in `.slice`)
//!   in `slice`, whose dashes nest (`machine-libpod.slice` is
//!   `machine.slice/machine-libpod.slice`); an empty slice is
//!   `system.slice`; no path means `:runc:<id>`.
//!
//! Paths with `..`, and paths naming a hierarchy's root, are refused.
//!
//! **No systemd here.** With systemd as PID 1, a runtime given the systemd
//! form asks systemd over D-Bus to create a transient scope (`Delegate=yes`)
//! and to move the pid into it, so that systemd does not later move the
//! processes or remove the directory behind the runtime's back. vessel does
//! not speak D-Bus (not done): it creates the same directories in cgroupfs
//! directly, which is right on hosts without systemd as PID 1 (ours) and
//! would race with systemd on hosts that have it.
//!
//! **Pure v2:** the controllers listed in each parent's `cgroup.controllers`
//! are enabled in its `cgroup.subtree_control` (from the hierarchy's root
//! down to the leaf's parent, one by one, errors ignored, as runc does), so
//! `memory.current`, `cpu.stat` and `pids.current` exist in the leaf. In
//! hybrid mode the cgroup2 hierarchy is left as it is (controllers are bound
//! to v1 there). On v1, a new `cpuset` cgroup gets its parent's `cpus` and
//! `mems` (it starts empty and would refuse processes).
//!
//! **Clean-up:** vessel remembers which directories it created
//! ([`HostCgroupState`], plain data for the container's state file) and
//! removes only those, leaf first; processes left in a leaf it created are
//! killed (SIGKILL; `cgroup.kill` on v2), and `EBUSY` right after they exit
//! is retried for a bounded time. A parent that someone else has started
//! using in the meantime is left in place.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long [`HostCgroup::remove`] retries a leaf that stays busy.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors of the host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The spec's `linux.cgroupsPath` is not acceptable.
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No cgroup hierarchy is mounted.
    #[error("no cgroup hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoHierarchy,
    /// The cgroup lies outside the part of a hierarchy that is mounted here.
    #[error(
        "cgroup {cgroup} of the {hierarchy:?} hierarchy is outside its mount at {} (mounted \
         from {root})",
        mount.display()
    )]
    OutsideMount {
        /// Hierarchy (`memory`, `name=systemd`, `""` for cgroup2).
        hierarchy: String,
        /// The cgroup asked for.
        cgroup: String,
        /// Where the hierarchy is mounted.
        mount: PathBuf,
        /// The part of the hierarchy mounted there.
        root: String,
    },
    /// A cgroup file or directory cannot be read, created or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A process cannot be moved into the cgroup.
    #[error("cannot move process {pid} into {}", path.display())]
    AddPid {
        /// The process.
        pid: i32,
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup vessel created stays busy.
    #[error(
        "cannot remove cgroup {}: still busy after {:?} (processes left: {pids:?})",
        path.display(),
        REMOVE_TIMEOUT
    )]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// Processes still in it.
        pids: Vec<i32>,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A cgroup named by `linux.cgroupsPath`, checked and expanded: a list of
/// directory names from a hierarchy's root (absolute) or from the calling
/// process's own cgroup (relative).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPath {
    /// Relative to the caller's cgroup rather than to the hierarchy's root.
    pub relative: bool,
    /// The components, joined with `/`, no leading or trailing `/`.
    pub path: String,
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.relative {
            f.write_str(&self.path)
        } else {
            write!(f, "/{}", self.path)
        }
    }
}

impl CgroupPath {
    /// Reads `linux.cgroupsPath` (`spec_path`) as runc does: cgroupfs
    /// paths, or with `systemd` (runc's `--systemd-cgroup`) the
    /// `slice:prefix:name` form. `id` (the container id) names the cgroup
    /// when the spec gives none.
    pub fn parse(spec_path: Option<&str>, systemd: bool, id: &str) -> Result<Self, CgroupError> {
        let given = spec_path.unwrap_or_default();
        let invalid = |reason: &str| CgroupError::InvalidPath {
            path: given.into(),
            reason: reason.into(),
        };
        if given.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if systemd {
            let (slice, prefix, name) = if given.is_empty() {
                ("", "runc", id)
            } else {
                let parts: Vec<&str> = given.split(':').collect();
                let [slice, prefix, name] = parts[..] else {
                    return Err(invalid(
                        "with --systemd-cgroup, expected the form \"slice:prefix:name\"",
                    ));
                };
                (slice, prefix, name)
            };
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let mut path = expand_slice(slice).map_err(|r| invalid(&r))?;
            if name.is_empty() {
                return Err(invalid("the name (after the second ':') is empty"));
            }
            let unit = if name.ends_with(".slice") {
                name.to_string()
            } else {
                format!("{prefix}-{name}.scope")
            };
            check_component(&unit).map_err(|r| invalid(&r))?;
            path.push(unit);
            return Ok(CgroupPath {
                relative: false,
                path: path.join("/"),
            });
        }
        let (relative, text) = if given.is_empty() {
            (true, id)
        } else {
            (!given.starts_with('/'), given)
        };
        let mut parts = Vec::new();
        for c in text.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(invalid("'..' is not allowed")),
                c => parts.push(c),
            }
        }
        if parts.is_empty() {
            return Err(invalid(
                "names the root of the hierarchy; a sandbox needs a cgroup of its own",
            ));
        }
        Ok(CgroupPath {
            relative,
            path: parts.join("/"),
        })
    }
}

/// A unit name or path component: not empty, no `/`, not `.` or `..`.
fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty() || c == "." || c == ".." || c.contains('/') {
        return Err(format!("{c:?} is not a valid cgroup name"));
    }
    Ok(())
}

/// systemd's slice naming (runc's `ExpandSlice`): `a-b.slice` is
/// `a.slice/a-b.slice`; `-.slice` is the root.
fn expand_slice(slice: &str) -> Result<Vec<String>, String> {
    let bad = || format!("invalid slice name {slice:?}");
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(bad());
    };
    if stem.is_empty() || slice.contains('/') {
        return Err(bad());
    }
    if stem == "-" {
        return Ok(Vec::new());
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad());
        }
        path.push(format!("{prefix}{part}.slice"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Ok(path)
}

/// One mounted cgroup hierarchy, as this process sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its controllers as `/proc/self/cgroup` lists them (`cpu,cpuacct`,
    /// `memory`, `name=systemd`), `""` for cgroup2.
    pub name: String,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The part of the hierarchy mounted there (`/` usually).
    pub mount_root: String,
    /// This process's cgroup in it.
    pub own: String,
}

impl Hierarchy {
    /// Whether this is the cgroup2 hierarchy.
    pub fn is_v2(&self) -> bool {
        self.name.is_empty()
    }
}

/// Finds the mounted hierarchies of this process.
pub fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let read = |p: &str| fs::read_to_string(p).map_err(io_err("read", Path::new(p)));
    hierarchies_from(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
}

/// [`hierarchies`] from the text of `/proc/self/mountinfo` and
/// `/proc/self/cgroup`. A hierarchy listed but not mounted is skipped.
pub fn hierarchies_from(mountinfo: &str, proc_cgroup: &str) -> Result<Vec<Hierarchy>, CgroupError> {
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(parse_mountinfo_line).collect();
    let mut found = Vec::new();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(num), Some(ctrls), Some(own)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v2 = num == "0" && ctrls.is_empty();
        let wanted: Vec<&str> = ctrls.split(',').filter(|c| !c.is_empty()).collect();
        let candidates = mounts.iter().filter(|m| {
            if v2 {
                m.fstype == "cgroup2"
            } else {
                m.fstype == "cgroup"
                    && !wanted.is_empty()
                    && wanted.iter().all(|w| m.options.iter().any(|o| o == w))
            }
        });
        // Prefer a mount of the whole hierarchy; else one that holds our cgroup.
        let best = candidates
            .clone()
            .find(|m| m.root == "/")
            .or_else(|| candidates.clone().find(|m| under(own, &m.root).is_some()))
            .or_else(|| candidates.clone().next());
        let Some(m) = best else {
            tracing::debug!(hierarchy = ctrls, "cgroup hierarchy not mounted; skipped");
            continue;
        };
        if found.iter().any(|h: &Hierarchy| h.mount == m.mount_point) {
            continue;
        }
        found.push(Hierarchy {
            name: ctrls.into(),
            mount: m.mount_point.clone(),
            mount_root: m.root.clone(),
            own: own.into(),
        });
    }
    if found.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(found)
}

/// What a cgroup line of `/proc/self/mountinfo` says.
struct Mount {
    root: String,
    mount_point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    let fstype = *right.first()?;
    if fstype != "cgroup" && fstype != "cgroup2" {
        return None;
    }
    Some(Mount {
        root: unescape(left.get(3)?),
        mount_point: PathBuf::from(unescape(left.get(4)?)),
        fstype: fstype.into(),
        options: right.get(2)?.split(',').map(String::from).collect(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(digits) = octal {
            let v = digits
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` below `root` (both absolute cgroup paths), as a relative path.
fn under<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix('/')
}

/// One hierarchy's part of a [`HostCgroup`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    /// The hierarchy (`memory`, `cpu,cpuacct`, `name=systemd`; `""` for
    /// cgroup2).
    pub hierarchy: String,
    /// The cgroup's directory.
    pub leaf: PathBuf,
    /// The directories vessel created, outermost first (the leaf last if
    /// vessel created it); only these are removed.
    pub created: Vec<PathBuf>,
}

/// What [`HostCgroup::create`] did, as plain data: kept in the container's
/// state so a later `vessel delete` can undo it ([`HostCgroup::from_state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroupState {
    /// The cgroup, as parsed from the spec.
    pub path: CgroupPath,
    /// One entry per hierarchy.
    pub dirs: Vec<CgroupDir>,
}

/// The sandbox's host cgroup, created in every mounted hierarchy.
#[derive(Debug)]
pub struct HostCgroup {
    state: HostCgroupState,
}

impl HostCgroup {
    /// Creates `path` in every hierarchy mounted here (directories that
    /// exist are used as they are). Nothing is left behind on error.
    pub fn create(path: &CgroupPath) -> Result<Self, CgroupError> {
        Self::create_in(&hierarchies()?, path)
    }

    /// [`Self::create`] in the given hierarchies.
    pub fn create_in(hierarchies: &[Hierarchy], path: &CgroupPath) -> Result<Self, CgroupError> {
        let pure_v2 = hierarchies
            .iter()
            .all(|h| h.is_v2() || h.name.starts_with("name="));
        let mut cg = HostCgroup {
            state: HostCgroupState {
                path: path.clone(),
                dirs: Vec::new(),
            },
        };
        for h in hierarchies {
            let mut dir = CgroupDir {
                hierarchy: h.name.clone(),
                leaf: PathBuf::new(),
                created: Vec::new(),
            };
            let res = create_one(h, path, pure_v2 && h.is_v2(), &mut dir);
            cg.state.dirs.push(dir);
            if let Err(e) = res {
                if let Err(e2) = cg.remove() {
                    tracing::warn!(error = %e2, "cannot undo a partly created host cgroup");
                }
                return Err(e);
            }
        }
        tracing::debug!(cgroup = %path, dirs = ?cg.state.dirs, "host cgroup created");
        Ok(cg)
    }

    /// The cgroup again from what [`Self::state`] returned.
    pub fn from_state(state: HostCgroupState) -> Self {
        HostCgroup { state }
    }

    /// What was created, to persist.
    pub fn state(&self) -> &HostCgroupState {
        &self.state
    }

    /// The cgroup's directory in the hierarchy `name` (`memory`,
    /// `""` for cgroup2), if that hierarchy is mounted.
    pub fn leaf(&self, name: &str) -> Option<&Path> {
        self.state
            .dirs
            .iter()
            .find(|d| d.hierarchy == name || d.hierarchy.split(',').any(|c| c == name))
            .map(|d| d.leaf.as_path())
    }

    /// Moves process `pid` (and so its future children) into the cgroup in
    /// every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.state.dirs {
            let procs = d.leaf.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::AddPid {
                pid,
                path: procs,
                source,
            })?;
        }
        Ok(())
    }

    /// Writes the CPU weight and the allowed CPUs and memory nodes that
    /// `res` gives (see the module documentation for why nothing else).
    pub fn apply_cpu(&self, res: &CpuResources) -> Result<(), CgroupError> {
        for d in &self.state.dirs {
            let has = |c: &str| d.hierarchy.split(',').any(|h| h == c);
            let v2 = d.hierarchy.is_empty();
            let mut writes: Vec<(&str, String)> = Vec::new();
            if let Some(shares) = res.shares {
                if has("cpu") {
                    writes.push(("cpu.shares", shares.to_string()));
                } else if v2 && d.leaf.join("cpu.weight").exists() {
                    writes.push(("cpu.weight", shares_to_weight(shares).to_string()));
                }
            }
            if has("cpuset") || (v2 && d.leaf.join("cpuset.cpus").exists()) {
                if let Some(cpus) = &res.cpus {
                    writes.push(("cpuset.cpus", cpus.clone()));
                }
                if let Some(mems) = &res.mems {
                    writes.push(("cpuset.mems", mems.clone()));
                }
            }
            for (file, value) in writes {
                let p = d.leaf.join(file);
                fs::write(&p, &value).map_err(io_err("write", &p))?;
            }
        }
        Ok(())
    }

    /// Removes the directories vessel created, leaf first, killing
    /// processes left in a leaf it created. Every hierarchy is tried; the
    /// first error is returned.
    pub fn remove(self) -> Result<(), CgroupError> {
        let mut first = None;
        for d in self.state.dirs.iter().rev() {
            for dir in d.created.iter().rev() {
                let is_leaf = *dir == d.leaf;
                if let Err(e) = remove_dir(dir, is_leaf) {
                    tracing::warn!(error = %e, "host cgroup not removed");
                    first.get_or_insert(e);
                    // Its parents cannot go either.
                    break;
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The part of `linux.resources.cpu` that [`HostCgroup::apply_cpu`] writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuResources {
    /// `linux.resources.cpu.shares`.
    pub shares: Option<u64>,
    /// `linux.resources.cpu.cpus`.
    pub cpus: Option<String>,
    /// `linux.resources.cpu.mems`.
    pub mems: Option<String>,
}

impl CpuResources {
    /// Reads them from an OCI spec; absent or empty values are `None`.
    pub fn from_spec(spec: &Value) -> Self {
        let cpu = spec.pointer("/linux/resources/cpu");
        let text = |k: &str| {
            cpu.and_then(|c| c.get(k))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        CpuResources {
            shares: cpu
                .and_then(|c| c.get("shares"))
                .and_then(Value::as_u64)
                .filter(|s| *s > 0),
            cpus: text("cpus"),
            mems: text("mems"),
        }
    }
}

/// cgroup v1 `cpu.shares` (2..262144) to v2 `cpu.weight` (1..10000), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// Creates `path` in hierarchy `h`, recording in `dir` what it created.
fn create_one(
    h: &Hierarchy,
    path: &CgroupPath,
    enable_controllers: bool,
    dir: &mut CgroupDir,
) -> Result<(), CgroupError> {
    // The cgroup as an absolute path in the hierarchy.
    let cgroup = if path.relative {
        let base = if enable_controllers {
            // runc on pure v2: the parent of our own cgroup, which (unlike
            // ours, holding processes) may enable controllers for children.
            Path::new(&h.own)
                .parent()
                .and_then(Path::to_str)
                .unwrap_or("/")
        } else {
            h.own.as_str()
        };
        format!("{}/{}", base.trim_end_matches('/'), path.path)
    } else {
        format!("/{}", path.path)
    };
    let Some(rel) = under(&cgroup, &h.mount_root).filter(|r| !r.is_empty()) else {
        return Err(CgroupError::OutsideMount {
            hierarchy: h.name.clone(),
            cgroup,
            mount: h.mount.clone(),
            root: h.mount_root.clone(),
        });
    };
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    dir.leaf = parts.iter().fold(h.mount.clone(), |p, c| p.join(c));
    // A parent removed by a concurrent `delete` between our mkdirs makes
    // the next mkdir fail with ENOENT: walk again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match make_dirs(h, &parts, enable_controllers, &mut dir.created) {
            Ok(()) => return Ok(()),
            Err(CgroupError::Io { source, .. })
                if source.kind() == ErrorKind::NotFound && attempts < 3 => {}
            Err(e) => return Err(e),
        }
    }
}

fn make_dirs(
    h: &Hierarchy,
    parts: &[&str],
    enable_controllers: bool,
    created: &mut Vec<PathBuf>,
) -> Result<(), CgroupError> {
    let cpuset = h.name.split(',').any(|c| c == "cpuset");
    let mut cur = h.mount.clone();
    for part in parts {
        if enable_controllers {
            enable_subtree_controllers(&cur);
        }
        let parent = cur.clone();
        cur.push(part);
        match fs::create_dir(&cur) {
            Ok(()) => {
                created.push(cur.clone());
                if cpuset {
                    inherit_cpuset(&parent, &cur)?;
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create cgroup", &cur)(e)),
        }
    }
    Ok(())
}

/// Enables in `dir`'s children every controller `dir` has (pure v2), one
/// by one, ignoring refusals (a controller in use by processes in `dir`
/// itself cannot be), as runc does.
fn enable_subtree_controllers(dir: &Path) {
    let Ok(available) = fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in available.split_whitespace() {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        let file = dir.join("cgroup.subtree_control");
        if let Err(e) = fs::write(&file, format!("+{c}")) {
            tracing::debug!(controller = c, dir = %dir.display(), error = %e,
                "controller not enabled");
        }
    }
}

/// A new v1 cpuset cgroup has no CPUs and memory nodes and refuses
/// processes until given some: copy the parent's.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let cur = fs::read_to_string(&own).map_err(io_err("read", &own))?;
        if !cur.trim().is_empty() {
            continue;
        }
        let from = parent.join(file);
        let value = fs::read_to_string(&from).map_err(io_err("read", &from))?;
        fs::write(&own, value.trim()).map_err(io_err("write", &own))?;
    }
    Ok(())
}

/// The processes in a cgroup.
fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in the cgroup `dir` (and its children on v2).
fn kill_all(dir: &Path) {
    // v1 freezer: a frozen process does not die until thawed.
    let freezer = dir.join("freezer.state");
    if fs::read_to_string(&freezer).is_ok_and(|s| s.trim() != "THAWED") {
        let _ = fs::write(&freezer, "THAWED");
    }
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in procs(dir) {
        if pid <= 0 {
            continue;
        }
        // SAFETY: kill(2) takes plain integers; `pid` is positive, so it
        // names one process (a member of the cgroup), never a group.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes one cgroup directory vessel created. A leaf's processes are
/// killed; a parent that is in use by someone else stays (not an error).
fn remove_dir(dir: &Path, is_leaf: bool) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        let err = match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => e,
        };
        let busy = matches!(
            err.raw_os_error(),
            Some(libc::EBUSY) | Some(libc::ENOTEMPTY)
        );
        if !busy {
            return Err(io_err("remove cgroup", dir)(err));
        }
        if !is_leaf {
            tracing::debug!(dir = %dir.display(), "cgroup parent in use; left in place");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Busy {
                path: dir.to_path_buf(),
                pids: procs(dir),
            });
        }
        kill_all(dir);
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests;

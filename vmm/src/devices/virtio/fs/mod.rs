//! The virtio-fs device (virtio device id 26): shares a host directory with
//! the guest. The guest's FUSE requests are answered by `fuse-backend-rs`'s
//! passthrough filesystem behind [`confine::ConfinedFs`], which applies our
//! security policy (see `vmm/VIRTIOFS.md`), on a worker thread of its own
//! (see [`worker`]).
//!
//! Queues: 0 is the high-priority queue (FORGET, INTERRUPT), 1 the single
//! request queue. The configuration space holds the tag and the number of
//! request queues.

pub mod confine;
pub mod device;
pub mod worker;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use device::VirtioFs;

/// Longest tag: the size of `virtio_fs_config.tag`.
pub const TAG_MAX_LEN: usize = 36;

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A `--fs` argument is not `TAG=DIR[,ro]`.
    #[error("invalid share {arg:?}: expected TAG=HOST_DIR[,ro]")]
    Syntax {
        /// The argument given.
        arg: String,
    },
    /// An option after the directory is unknown.
    #[error("invalid share {arg:?}: unknown option {option:?} (only \"ro\" is known)")]
    UnknownOption {
        /// The argument given.
        arg: String,
        /// The option.
        option: String,
    },
    /// The tag is empty, too long or has characters the guest cannot pass to mount(2).
    #[error("invalid share tag {tag:?}: {why}")]
    BadTag {
        /// The tag.
        tag: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Two shares have the same tag.
    #[error("share tag {tag:?} is used twice")]
    DuplicateTag {
        /// The tag.
        tag: String,
    },
    /// The shared directory does not exist or is not a directory.
    #[error("share {tag:?}: {} is not a directory", dir.display())]
    NotADirectory {
        /// The tag.
        tag: String,
        /// The directory.
        dir: PathBuf,
    },
    /// The shared directory cannot be opened.
    #[error("share {tag:?}: cannot open {}", dir.display())]
    Open {
        /// The tag.
        tag: String,
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The passthrough filesystem cannot be created.
    #[error("share {tag:?}: cannot set up the FUSE server")]
    Backend {
        /// The tag.
        tag: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd, epoll or thread could not be created.
    #[error("virtio-fs {what}")]
    Os {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One shared directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG /target`).
    pub tag: String,
    /// Host directory exported to the guest.
    pub dir: PathBuf,
    /// Refuse every write-type request.
    pub read_only: bool,
}

impl ShareConfig {
    /// Parses `TAG=HOST_DIR[,ro]`. A directory containing a comma can be
    /// given as long as the last comma-separated part is not an option.
    pub fn parse(arg: &str) -> Result<ShareConfig, FsError> {
        let syntax = || FsError::Syntax {
            arg: arg.to_string(),
        };
        let (tag, rest) = arg.split_once('=').ok_or_else(syntax)?;
        let (dir, read_only) = match rest.rsplit_once(',') {
            Some((dir, "ro")) => (dir, true),
            Some((dir, "rw")) => (dir, false),
            Some((_, opt)) if !opt.contains('/') => {
                return Err(FsError::UnknownOption {
                    arg: arg.to_string(),
                    option: opt.to_string(),
                })
            }
            _ => (rest, false),
        };
        if dir.is_empty() {
            return Err(syntax());
        }
        let share = ShareConfig {
            tag: tag.to_string(),
            dir: PathBuf::from(dir),
            read_only,
        };
        validate_tag(&share.tag)?;
        Ok(share)
    }

    /// Checks the tag and that the directory is an existing directory.
    pub fn validate(&self) -> Result<(), FsError> {
        validate_tag(&self.tag)?;
        if !is_dir(&self.dir) {
            return Err(FsError::NotADirectory {
                tag: self.tag.clone(),
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

/// Tags are non-empty, at most [`TAG_MAX_LEN`] bytes, and printable ASCII
/// without spaces or commas, so the agent can pass them to mount(2) and
/// they read the same in logs.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    let bad = |why| FsError::BadTag {
        tag: tag.to_string(),
        why,
    };
    if tag.is_empty() {
        return Err(bad("it is empty"));
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(bad("it is longer than 36 bytes"));
    }
    if !tag.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(bad(
            "only printable ASCII without spaces or commas is allowed",
        ));
    }
    Ok(())
}

/// Validates a list of shares: each one, and that tags are unique.
pub fn validate_shares(shares: &[ShareConfig]) -> Result<(), FsError> {
    let mut seen = std::collections::HashSet::new();
    for s in shares {
        s.validate()?;
        if !seen.insert(s.tag.as_str()) {
            return Err(FsError::DuplicateTag { tag: s.tag.clone() });
        }
    }
    Ok(())
}

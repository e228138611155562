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
pub mod dax;
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
    /// A `--fs` argument is not `TAG=DIR[,ro][,dax[=SIZE]]`.
    #[error("invalid share {arg:?}: expected TAG=HOST_DIR[,ro][,dax[=SIZE]]")]
    Syntax {
        /// The argument given.
        arg: String,
    },
    /// An option after the directory is unknown.
    #[error("invalid share {arg:?}: unknown option {option:?} (known: ro, rw, dax, dax=SIZE)")]
    UnknownOption {
        /// The argument given.
        arg: String,
        /// The option.
        option: String,
    },
    /// The DAX window size is not a multiple of 2 MiB between 2 MiB and 64 GiB.
    #[error(
        "invalid share {arg:?}: DAX window {size:?} must be a multiple of 2M between 2M and 64G"
    )]
    BadDaxWindow {
        /// The argument given.
        arg: String,
        /// The size given.
        size: String,
    },
    /// The DAX window cannot be reserved.
    #[error("share {tag:?}: cannot reserve the DAX window")]
    DaxWindow {
        /// The tag.
        tag: String,
        /// Cause.
        #[source]
        source: std::io::Error,
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
    /// Size of the DAX window (virtio-fs shared memory region 0) in bytes;
    /// `None`: no window, no DAX.
    pub dax_window: Option<u64>,
}

/// Parses a DAX window size: bytes, or a number with a `K`, `M` or `G`
/// suffix; a multiple of [`dax::DAX_CHUNK`] up to [`dax::MAX_DAX_WINDOW`].
pub fn parse_dax_size(size: &str) -> Option<u64> {
    let (num, shift) = match size.as_bytes().last()? {
        b'K' | b'k' => (&size[..size.len() - 1], 10),
        b'M' | b'm' => (&size[..size.len() - 1], 20),
        b'G' | b'g' => (&size[..size.len() - 1], 30),
        _ => (size, 0),
    };
    let n: u64 = num.parse().ok()?;
    let bytes = n.checked_mul(1u64 << shift)?;
    (bytes > 0 && bytes % dax::DAX_CHUNK == 0 && bytes <= dax::MAX_DAX_WINDOW).then_some(bytes)
}

impl ShareConfig {
    /// Parses `TAG=HOST_DIR[,ro|rw][,dax[=SIZE]]`. A directory containing a
    /// comma can be given as long as the part after its last comma is not
    /// an option. `dax` alone asks for a window of
    /// [`dax::DEFAULT_DAX_WINDOW`].
    pub fn parse(arg: &str) -> Result<ShareConfig, FsError> {
        let syntax = || FsError::Syntax {
            arg: arg.to_string(),
        };
        let (tag, mut dir) = arg.split_once('=').ok_or_else(syntax)?;
        let mut read_only = None;
        let mut dax_window = None;
        while let Some((rest, opt)) = dir.rsplit_once(',') {
            match opt {
                "ro" | "rw" if read_only.is_none() => read_only = Some(opt == "ro"),
                "dax" if dax_window.is_none() => dax_window = Some(dax::DEFAULT_DAX_WINDOW),
                _ if opt.starts_with("dax=") && dax_window.is_none() => {
                    let size = &opt["dax=".len()..];
                    dax_window =
                        Some(parse_dax_size(size).ok_or_else(|| FsError::BadDaxWindow {
                            arg: arg.to_string(),
                            size: size.to_string(),
                        })?);
                }
                _ if opt.contains('/') => break,
                _ => {
                    return Err(FsError::UnknownOption {
                        arg: arg.to_string(),
                        option: opt.to_string(),
                    })
                }
            }
            dir = rest;
        }
        if dir.is_empty() {
            return Err(syntax());
        }
        let share = ShareConfig {
            tag: tag.to_string(),
            dir: PathBuf::from(dir),
            read_only: read_only.unwrap_or(false),
            dax_window,
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

//! The initramfs: a newc cpio archive written by our own code, holding the
//! static `vessel-agent` as `/init` and the few directories it needs.
//!
//! The archive is deterministic (fixed inode numbers, mtime 0), so the same
//! agent binary always gives the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, run_cmd};

/// The musl target the agent is built for (a static binary).
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// One archive entry.
pub enum Entry<'a> {
    /// A directory with its mode bits.
    Dir(&'a str, u32),
    /// A regular file with mode bits and contents.
    File(&'a str, u32, &'a [u8]),
    /// A character device node: mode bits, major, minor.
    CharDev(&'a str, u32, u32, u32),
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
    name: &str,
) {
    let namesize = name.len() as u32 + 1;
    let fields = [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Serializes entries as a newc archive with its trailer.
pub fn write_newc(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir(name, perm) => header(&mut out, ino, S_IFDIR | perm, 2, 0, (0, 0), name),
            Entry::CharDev(name, perm, major, minor) => {
                header(&mut out, ino, S_IFCHR | perm, 1, 0, (*major, *minor), name)
            }
            Entry::File(name, perm, data) => {
                let size = u32::try_from(data.len()).context("file too large for newc")?;
                header(&mut out, ino, S_IFREG | perm, 1, size, (0, 0), name);
                out.extend_from_slice(data);
                pad4(&mut out);
            }
        }
    }
    header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
    Ok(out)
}

/// Builds the static agent; returns the binary's path.
pub fn build_agent(root: &Path) -> Result<PathBuf> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == AGENT_TARGET)
    {
        run_cmd(Command::new("rustup").args(["target", "add", AGENT_TARGET]))?;
    }
    run_cmd(cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "vessel-agent",
        "--target",
        AGENT_TARGET,
    ]))?;
    let built = root
        .join("target")
        .join(AGENT_TARGET)
        .join("release/vessel-agent");
    // Symbols are useless in the guest and cost unpacking time there.
    let stripped = built.with_file_name("vessel-agent.stripped");
    run_cmd(Command::new("strip").arg("-o").arg(&stripped).arg(&built))?;
    Ok(stripped)
}

/// Writes the initramfs with `agent` as /init to `out` (atomically).
pub fn build(_root: &Path, agent: &Path, out: &Path) -> Result<()> {
    let agent_bytes =
        std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let entries = [
        Entry::Dir("dev", 0o755),
        Entry::CharDev("dev/console", 0o600, 5, 1),
        Entry::Dir("proc", 0o555),
        Entry::Dir("sys", 0o555),
        Entry::Dir("run", 0o755),
        Entry::Dir("tmp", 0o1777),
        Entry::Dir("mnt", 0o755),
        Entry::Dir("etc", 0o755),
        Entry::File("init", 0o755, &agent_bytes),
    ];
    let bytes = write_newc(&entries)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("cpio.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Parsed {
        name: String,
        mode: u32,
        rdevmajor: u32,
        data: Vec<u8>,
    }

    fn parse(mut buf: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let total = buf.len();
        loop {
            assert_eq!(&buf[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let mode = field(1);
            let filesize = field(6) as usize;
            let rdevmajor = field(9);
            let namesize = field(11) as usize;
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[110 + namesize - 1], 0);
            let mut off = 110 + namesize;
            off = off.div_ceil(4) * 4;
            let data = buf[off..off + filesize].to_vec();
            off = (off + filesize).div_ceil(4) * 4;
            assert_eq!((total - buf.len() + off) % 4, 0);
            buf = &buf[off..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty());
                return out;
            }
            out.push(Parsed {
                name,
                mode,
                rdevmajor,
                data,
            });
        }
    }

    #[test]
    fn archive_parses_back() {
        let bytes = write_newc(&[
            Entry::Dir("dev", 0o755),
            Entry::CharDev("dev/console", 0o600, 5, 1),
            Entry::File("init", 0o755, b"hello"),
            Entry::File("x", 0o644, b""),
        ])
        .unwrap();
        let p = parse(&bytes);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].name, "dev");
        assert_eq!(p[0].mode, S_IFDIR | 0o755);
        assert_eq!(p[1].mode, S_IFCHR | 0o600);
        assert_eq!(p[1].rdevmajor, 5);
        assert_eq!(p[2].data, b"hello");
        assert_eq!(p[3].data, b"");
    }

    #[test]
    fn archive_is_deterministic() {
        let e = [Entry::File("init", 0o755, b"abc")];
        assert_eq!(write_newc(&e).unwrap(), write_newc(&e).unwrap());
    }
}

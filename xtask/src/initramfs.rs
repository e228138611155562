//! The initramfs: a newc ("070701") cpio archive written by our own code,
//! holding the static `vessel-agent` as `/init`, the directories it mounts
//! on, and a `/dev/console` node so the kernel can give /init a console
//! before devtmpfs is mounted.
//!
//! The archive is deterministic (fixed inode numbers, uid/gid 0, mtime 0), so
//! the same agent binary always gives the same bytes. It is not compressed:
//! the guest kernel would decompress it at emulated speed on some hosts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, run_cmd};

/// The musl target the agent is built for (a static binary).
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// newc magic.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends a newc archive.
const TRAILER: &str = "TRAILER!!!";

/// One archive entry; names are relative to the root ("dev/console").
#[derive(Clone, Copy, Debug)]
pub enum Entry<'a> {
    /// A directory with its permission bits.
    Dir(&'a str, u32),
    /// A regular file with permission bits and contents.
    File(&'a str, u32, &'a [u8]),
    /// A character device node: permission bits, major, minor.
    CharDev(&'a str, u32, u32, u32),
}

/// What the initramfs holds besides /init, parents before children.
const LAYOUT: [Entry<'static>; 8] = [
    Entry::Dir("dev", 0o755),
    Entry::CharDev("dev/console", 0o600, 5, 1),
    Entry::Dir("proc", 0o555),
    Entry::Dir("sys", 0o555),
    Entry::Dir("run", 0o755),
    Entry::Dir("tmp", 0o1777),
    Entry::Dir("mnt", 0o755),
    Entry::Dir("etc", 0o755),
];

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The fixed fields of one header.
struct Header<'a> {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
    name: &'a str,
}

impl Header<'_> {
    /// Appends the header, the NUL-terminated name and padding to 4 bytes.
    fn write(&self, out: &mut Vec<u8>) -> Result<()> {
        if self.name.is_empty() || self.name.contains('\0') {
            bail!("invalid cpio entry name {:?}", self.name);
        }
        let namesize = u32::try_from(self.name.len() + 1).context("cpio entry name too long")?;
        let (uid, gid, mtime, devmajor, devminor, check) = (0, 0, 0, 0, 0, 0);
        let fields = [
            self.ino,
            self.mode,
            uid,
            gid,
            self.nlink,
            mtime,
            self.filesize,
            devmajor,
            devminor,
            self.rdev.0,
            self.rdev.1,
            namesize,
            check,
        ];
        out.extend_from_slice(MAGIC);
        for f in fields {
            write!(out, "{f:08x}")?;
        }
        out.extend_from_slice(self.name.as_bytes());
        out.push(0);
        pad4(out);
        Ok(())
    }
}

/// Serializes `entries` as a newc archive, with inode numbers 1, 2, … in
/// order, and the trailer.
pub fn write_newc(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).context("too many cpio entries")?;
        let (name, mode, nlink, data, rdev): (&str, u32, u32, &[u8], (u32, u32)) = match *e {
            Entry::Dir(name, perm) => (name, S_IFDIR | perm, 2, &[], (0, 0)),
            Entry::CharDev(name, perm, major, minor) => {
                (name, S_IFCHR | perm, 1, &[], (major, minor))
            }
            Entry::File(name, perm, data) => (name, S_IFREG | perm, 1, data, (0, 0)),
        };
        let filesize = u32::try_from(data.len())
            .with_context(|| format!("{name} is too large for a newc archive"))?;
        Header {
            ino,
            mode,
            nlink,
            filesize,
            rdev,
            name,
        }
        .write(&mut out)?;
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        filesize: 0,
        rdev: (0, 0),
        name: TRAILER,
    }
    .write(&mut out)?;
    Ok(out)
}

/// Builds the static agent (installing the musl target first if needed) and
/// returns `target/x86_64-unknown-linux-musl/release/vessel-agent`. The
/// agent's build script strips its symbols.
pub fn build_agent(workspace_root: &Path) -> Result<PathBuf> {
    build_static(workspace_root, "vessel-agent", "vessel-agent")
}

/// Builds `package` in release mode for the musl target (installed first if
/// needed) and returns the static binary `bin` it produced.
pub fn build_static(workspace_root: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if !installed.status.success() {
        bail!(
            "`rustup target list --installed` failed with {}",
            installed.status
        );
    }
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == AGENT_TARGET)
    {
        run_cmd(Command::new("rustup").args(["target", "add", AGENT_TARGET]))?;
    }
    run_cmd(cargo().current_dir(workspace_root).args([
        "build",
        "--release",
        "-p",
        package,
        "--target",
        AGENT_TARGET,
    ]))?;
    let out = workspace_root
        .join("target")
        .join(AGENT_TARGET)
        .join("release")
        .join(bin);
    if !out.is_file() {
        bail!("cargo did not produce {}", out.display());
    }
    Ok(out)
}

/// Writes the initramfs with `agent` as /init to `out`, atomically (a
/// temporary file in the same directory, synced, then renamed).
pub fn build(_workspace_root: &Path, agent: &Path, out: &Path) -> Result<()> {
    let agent_bytes =
        std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let mut entries = LAYOUT.to_vec();
    entries.push(Entry::File("init", 0o755, &agent_bytes));
    let bytes = write_newc(&entries)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file_name = out
        .file_name()
        .with_context(|| format!("{} has no file name", out.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written.and_then(|()| Ok(std::fs::rename(&tmp, out)?)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of a newc header: the magic and 13 fields of 8 hex digits.
    const HEADER_LEN: usize = 6 + 13 * 8;

    /// One entry read back from an archive.
    #[derive(Debug)]
    struct Parsed {
        ino: u32,
        name: String,
        mode: u32,
        uid: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A strict newc reader: checks magic, NUL-terminated names, padding of
    /// header+name and of data to 4 bytes, and that the trailer ends the
    /// archive exactly.
    fn parse(buf: &[u8]) -> Vec<Parsed> {
        assert_eq!(buf.len() % 4, 0, "archive length not padded");
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let h = &buf[off..off + HEADER_LEN];
            assert_eq!(&h[..6], MAGIC, "bad magic at {off}");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let filesize = field(6) as usize;
            let name_start = off + HEADER_LEN;
            let name = &buf[name_start..name_start + namesize];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let name = std::str::from_utf8(&name[..namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (name_start + namesize).div_ceil(4) * 4;
            assert!(
                buf[name_start + namesize..data_start]
                    .iter()
                    .all(|&b| b == 0),
                "padding after the name of {name} is not zero"
            );
            let data = buf[data_start..data_start + filesize].to_vec();
            off = (data_start + filesize).div_ceil(4) * 4;
            assert!(buf[data_start + filesize..off].iter().all(|&b| b == 0));
            assert_eq!(field(12), 0, "check field");
            if name == TRAILER {
                assert_eq!(off, buf.len(), "bytes after the trailer");
                return out;
            }
            out.push(Parsed {
                ino: field(0),
                name,
                mode: field(1),
                uid: field(2),
                mtime: field(5),
                rdev: (field(9), field(10)),
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
            Entry::File("abcd", 0o644, b"1234"),
        ])
        .unwrap();
        let p = parse(&bytes);
        assert_eq!(p.len(), 5);
        assert_eq!(p[0].name, "dev");
        assert_eq!(p[0].mode, S_IFDIR | 0o755);
        assert_eq!(p[1].mode, S_IFCHR | 0o600);
        assert_eq!(p[1].rdev, (5, 1));
        assert_eq!(p[2].data, b"hello");
        assert_eq!(p[3].data, b"");
        assert_eq!(p[4].data, b"1234");
        for (i, e) in p.iter().enumerate() {
            assert_eq!(e.ino as usize, i + 1);
            assert_eq!((e.uid, e.mtime), (0, 0));
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(write_newc(&[Entry::Dir("", 0o755)]).is_err());
        assert!(write_newc(&[Entry::Dir("a\0b", 0o755)]).is_err());
    }

    #[test]
    fn build_writes_a_reproducible_initramfs() {
        let dir = std::env::temp_dir().join(format!("vessel-initramfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent = dir.join("agent");
        let agent_bytes: Vec<u8> = (0..10_001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&agent, &agent_bytes).unwrap();
        let out = dir.join("out/initramfs.cpio");
        build(&dir, &agent, &out).unwrap();
        let first = std::fs::read(&out).unwrap();
        build(&dir, &agent, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), first, "not reproducible");

        let p = parse(&first);
        let names: Vec<&str> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "proc",
                "sys",
                "run",
                "tmp",
                "mnt",
                "etc",
                "init"
            ]
        );
        let get = |n: &str| p.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("tmp").mode, S_IFDIR | 0o1777);
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, agent_bytes);
        // No temporary file is left next to the output.
        let left: Vec<_> = std::fs::read_dir(dir.join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["initramfs.cpio"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_agent_is_an_error() {
        let dir = std::env::temp_dir().join(format!("vessel-initramfs-m-{}", std::process::id()));
        let out = dir.join("initramfs.cpio");
        let e = build(&dir, &dir.join("nope"), &out).unwrap_err();
        assert!(format!("{e:#}").contains("nope"));
        assert!(!out.exists());
    }
}

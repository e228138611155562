//! Host-side tests of the FUSE server as the guest reaches it: crafted FUSE
//! requests are laid out in guest memory as virtio descriptor chains
//! (`MockSplitQueue`) and served by the same `process_queue` the worker
//! thread runs, on a thread restricted like the worker. Each escape
//! attempt is checked against the host filesystem, not only the error code.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, GetattrIn, InHeader, InitIn, LinkIn, MkdirIn, MknodIn, Opcode, OpenIn,
    OpenOut, OutHeader, ReadIn, RenameIn, SetattrIn, SetattrValid, WriteIn,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use fuse_backend_rs::abi::virtio_fs::{
    RemovemappingIn, RemovemappingOne, SetupmappingFlags, SetupmappingIn,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::dax::{DaxHandler, DaxWindow, DAX_CHUNK};
use super::device::{new_server, passthrough_config, VirtioFs, READ_ONLY_TIMEOUT};
use super::worker::{process_queue, restrict_thread, BadRequests, FsServer};
use super::{FsError, ShareConfig};
use crate::devices::virtio::{device_type, Interrupt, VirtioDevice};

const FATTR_MODE: u32 = SetattrValid::MODE.bits();
const FATTR_MTIME: u32 = SetattrValid::MTIME.bits();
const FATTR_SIZE: u32 = SetattrValid::SIZE.bits();

const ROOT: u64 = 1;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 32 << 20;
const OUT_CAP: u32 = 64 * 1024;

fn tmp(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "vessel-fs-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A temp root with `share/` (exported) and `outside/secret` next to it.
struct Layout {
    root: PathBuf,
    share: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
}

impl Layout {
    fn new(name: &str) -> Layout {
        let root = tmp(name);
        let share = root.join("share");
        let outside = root.join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let secret = outside.join("secret");
        std::fs::write(&secret, b"host secret").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        Layout {
            root,
            share,
            outside,
            secret,
        }
    }

    fn secret_unchanged(&self) {
        assert_eq!(std::fs::read(&self.secret).unwrap(), b"host secret");
        let m = std::fs::symlink_metadata(&self.secret).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o644, "secret's mode changed");
        assert_eq!(m.nlink(), 1, "secret got a hard link");
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The guest driver: one request queue in guest memory and the server.
struct Guest {
    mem: &'static GuestMemoryMmap,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    queue: Queue,
    server: Arc<FsServer>,
    next_desc: u16,
    used_seen: u16,
    next_buf: u64,
    unique: u64,
    bad: BadRequests,
    /// The DAX handler given to the server, if any.
    cache: Option<Box<dyn FsCacheReqHandler>>,
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl Guest {
    /// A restricted thread (like the worker's) serving `dir`, after INIT.
    fn new(dir: &Path, read_only: bool) -> Guest {
        restrict_thread().unwrap();
        let share = ShareConfig {
            tag: "t".into(),
            dir: dir.to_path_buf(),
            read_only,
            dax_window: None,
        };
        let (_fs, server) = new_server(&share).unwrap();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let mock = MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE);
        let queue = mock.create_queue().unwrap();
        let mut g = Guest {
            mem,
            mock,
            queue,
            server,
            next_desc: 0,
            used_seen: 0,
            next_buf: 0x10_0000,
            unique: 0,
            bad: BadRequests::default(),
            cache: None,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x20000,
            flags: 0,
        };
        g.call(Opcode::Init, 0, init.as_slice()).unwrap();
        g
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len + 16 >= MEM_SIZE as u64 {
            self.next_buf = 0x10_0000;
        }
        let addr = self.next_buf;
        self.next_buf += (len.max(16) + 15) & !15;
        addr
    }

    /// Makes a chain of (addr, len, flags) available and serves the queue;
    /// returns the used length.
    fn submit(&mut self, descs: &[(u64, u32, u32)]) -> u32 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                let next = if last {
                    0
                } else {
                    (head + i as u16 + 1) % QSIZE
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let cache = self
            .cache
            .as_mut()
            .map(|c| &mut **c as &mut (dyn FsCacheReqHandler + 'static));
        assert!(process_queue(
            &self.server,
            self.mem,
            &mut self.queue,
            cache,
            "t",
            &mut self.bad
        ));
        let ring = self.mock.used();
        let e = ring
            .ring()
            .ref_at(usize::from(self.used_seen % QSIZE))
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        assert_eq!(ring.idx().load(), self.used_seen);
        e.len()
    }

    /// Sends one request; `Ok(reply body)` or `Err(errno)`.
    fn call(&mut self, op: Opcode, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        self.unique += 1;
        let hdr = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: op as u32,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let req = cat(&[hdr.as_slice(), body]);
        let inb = self.alloc(req.len() as u64);
        self.mem.write_slice(&req, GuestAddress(inb)).unwrap();
        let outb = self.alloc(u64::from(OUT_CAP));
        let len = self.submit(&[
            (inb, req.len() as u32, 0),
            (outb, OUT_CAP, VRING_DESC_F_WRITE),
        ]);
        let oh: OutHeader = self.mem.read_obj(GuestAddress(outb)).unwrap();
        assert_eq!(oh.unique, self.unique);
        assert_eq!(oh.len, len, "used length and reply length differ");
        if oh.error != 0 {
            return Err(-oh.error);
        }
        let mut out = vec![0u8; len as usize - std::mem::size_of::<OutHeader>()];
        self.mem
            .read_slice(
                &mut out,
                GuestAddress(outb + std::mem::size_of::<OutHeader>() as u64),
            )
            .unwrap();
        Ok(out)
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let out = self.call(Opcode::Lookup, parent, &cstr(name))?;
        Ok(*EntryOut::from_slice(&out[..std::mem::size_of::<EntryOut>()]).unwrap())
    }

    fn open(&mut self, inode: u64, flags: i32) -> Result<u64, i32> {
        let o = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let out = self.call(Opcode::Open, inode, o.as_slice())?;
        Ok(OpenOut::from_slice(&out[..std::mem::size_of::<OpenOut>()])
            .unwrap()
            .fh)
    }

    fn read(&mut self, inode: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        let r = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        self.call(Opcode::Read, inode, r.as_slice())
    }

    fn write(&mut self, inode: u64, fh: u64, data: &[u8]) -> Result<Vec<u8>, i32> {
        let w = WriteIn {
            fh,
            offset: 0,
            size: data.len() as u32,
            ..Default::default()
        };
        self.call(Opcode::Write, inode, &cat(&[w.as_slice(), data]))
    }

    fn setattr(&mut self, inode: u64, s: SetattrIn) -> Result<Vec<u8>, i32> {
        self.call(Opcode::Setattr, inode, s.as_slice())
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let m = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let out = self.call(Opcode::Mknod, parent, &cat(&[m.as_slice(), &cstr(name)]))?;
        Ok(*EntryOut::from_slice(&out[..std::mem::size_of::<EntryOut>()]).unwrap())
    }

    fn create(&mut self, parent: u64, name: &str, flags: i32, mode: u32) -> Result<EntryOut, i32> {
        let c = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        let out = self.call(Opcode::Create, parent, &cat(&[c.as_slice(), &cstr(name)]))?;
        Ok(*EntryOut::from_slice(&out[..std::mem::size_of::<EntryOut>()]).unwrap())
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<Vec<u8>, i32> {
        let m = MkdirIn { mode, umask: 0 };
        self.call(Opcode::Mkdir, parent, &cat(&[m.as_slice(), &cstr(name)]))
    }

    fn link(&mut self, inode: u64, newparent: u64, name: &str) -> Result<Vec<u8>, i32> {
        let l = LinkIn { oldnodeid: inode };
        self.call(Opcode::Link, newparent, &cat(&[l.as_slice(), &cstr(name)]))
    }

    fn rename(&mut self, dir: u64, old: &str, newdir: u64, new: &str) -> Result<Vec<u8>, i32> {
        let r = RenameIn { newdir };
        self.call(
            Opcode::Rename,
            dir,
            &cat(&[r.as_slice(), &cstr(old), &cstr(new)]),
        )
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<Vec<u8>, i32> {
        self.call(Opcode::Symlink, parent, &cat(&[&cstr(name), &cstr(target)]))
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn normal_file_reads_back() {
    let l = Layout::new("read");
    std::fs::write(l.share.join("hello"), b"hello from the host").unwrap();
    let mut g = Guest::new(&l.share, false);
    let e = g.lookup(ROOT, "hello").unwrap();
    assert_eq!(e.attr.size, 19);
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(e.nodeid, fh, 4096).unwrap(), b"hello from the host");
}

#[test]
fn dot_dot_and_slashes_cannot_leave_the_root() {
    let l = Layout::new("dotdot");
    std::fs::create_dir(l.share.join("sub")).unwrap();
    let mut g = Guest::new(&l.share, false);
    for name in ["..", ".", "../outside", "sub/../../outside", "/etc", ""] {
        assert_eq!(g.lookup(ROOT, name).unwrap_err(), libc::EINVAL, "{name:?}");
    }
    let sub = g.lookup(ROOT, "sub").unwrap().nodeid;
    assert_eq!(g.lookup(sub, "..").unwrap_err(), libc::EINVAL);
    // `outside` is a sibling of the share: unreachable by name.
    assert_eq!(g.lookup(ROOT, "outside").unwrap_err(), libc::ENOENT);
    assert_eq!(g.lookup(ROOT, "secret").unwrap_err(), libc::ENOENT);
    // Renames take single names too.
    assert_eq!(
        g.rename(ROOT, "sub", ROOT, "../escaped").unwrap_err(),
        libc::EINVAL
    );
    assert!(!l.root.join("escaped").exists());
    assert_eq!(g.mkdir(ROOT, "../made", 0o755).unwrap_err(), libc::EINVAL);
    assert!(!l.root.join("made").exists());
}

#[test]
fn symlinks_pointing_out_are_never_followed_on_the_host() {
    let l = Layout::new("symlink");
    let abs = l.share.join("abs");
    std::os::unix::fs::symlink(&l.secret, &abs).unwrap();
    std::os::unix::fs::symlink("../outside/secret", l.share.join("rel")).unwrap();
    std::os::unix::fs::symlink(&l.outside, l.share.join("dirlink")).unwrap();
    let secret_ino = std::fs::metadata(&l.secret).unwrap().ino();
    let mut g = Guest::new(&l.share, false);
    for name in ["abs", "rel"] {
        let e = g.lookup(ROOT, name).unwrap();
        // The entry is the link itself, not the outside file.
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_ne!(e.attr.ino, secret_ino, "{name}");
        // READLINK hands the guest the text only; the guest resolves it.
        let target = g.call(Opcode::Readlink, e.nodeid, &[]).unwrap();
        assert!(target.ends_with(b"outside/secret"), "{name}");
        // OPEN through the link's inode: refused, for reading and writing.
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            assert!(g.open(e.nodeid, flags).is_err(), "{name} {flags:#x}");
        }
        // SETATTR on the link: size and mode never reach the target.
        let s = SetattrIn {
            valid: FATTR_SIZE,
            size: 0,
            ..Default::default()
        };
        assert!(g.setattr(e.nodeid, s).is_err(), "{name}: truncate");
        let s = SetattrIn {
            valid: FATTR_MODE | FATTR_MTIME,
            mode: libc::S_IFREG | 0o777,
            mtime: 1,
            ..Default::default()
        };
        let _ = g.setattr(e.nodeid, s);
        // Hard-linking the link links the link, not the outside file.
        let _ = g.link(e.nodeid, ROOT, &format!("{name}-hard"));
        l.secret_unchanged();
    }
    // A symlinked directory is not a directory for lookups under it.
    let d = g.lookup(ROOT, "dirlink").unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(g.lookup(d.nodeid, "secret").unwrap_err(), libc::ENOTDIR);
    assert_eq!(
        g.create(d.nodeid, "planted", libc::O_WRONLY, 0o644)
            .unwrap_err(),
        libc::ENOTDIR
    );
    assert!(!l.outside.join("planted").exists());
    // CREATE over an existing link pointing out does not open the target.
    assert!(g
        .create(ROOT, "abs", libc::O_WRONLY | libc::O_TRUNC, 0o644)
        .is_err());
    l.secret_unchanged();
}

#[test]
fn a_directory_swapped_for_a_symlink_is_not_followed() {
    // The rename race: the guest looked up `d`, then `d` is replaced by a
    // link to the outside (as a second guest process could do with its
    // own rename). The held inode still names the original directory and
    // the new name resolves to the link itself.
    let l = Layout::new("swap");
    std::fs::create_dir(l.share.join("d")).unwrap();
    std::fs::write(l.share.join("d/inside"), b"in").unwrap();
    let mut g = Guest::new(&l.share, false);
    let d = g.lookup(ROOT, "d").unwrap().nodeid;
    g.mkdir(ROOT, "moved", 0o755).unwrap();
    let moved = g.lookup(ROOT, "moved").unwrap().nodeid;
    g.rename(ROOT, "d", moved, "d").unwrap();
    std::os::unix::fs::symlink(&l.outside, l.share.join("d")).unwrap();
    // The old inode follows the directory to its new place inside the share.
    assert!(g.lookup(d, "inside").is_ok());
    assert_eq!(g.lookup(d, "secret").unwrap_err(), libc::ENOENT);
    let link = g.lookup(ROOT, "d").unwrap().nodeid;
    assert_eq!(g.lookup(link, "secret").unwrap_err(), libc::ENOTDIR);
    l.secret_unchanged();
}

#[test]
fn forged_inode_numbers_reach_nothing() {
    // Inodes are indices into the server's table of things looked up inside
    // the share; a made-up number is not a host inode.
    let l = Layout::new("forged");
    let mut g = Guest::new(&l.share, false);
    let secret_ino = std::fs::metadata(&l.secret).unwrap().ino();
    for forged in [secret_ino, 2, 3, 1000, u64::MAX] {
        assert!(g.link(forged, ROOT, "hard").is_err(), "{forged}");
        assert!(g.open(forged, libc::O_RDONLY).is_err(), "{forged}");
        let ga = GetattrIn::default();
        assert!(g.call(Opcode::Getattr, forged, ga.as_slice()).is_err());
    }
    assert!(!l.share.join("hard").exists());
    l.secret_unchanged();
}

#[test]
fn device_nodes_are_refused() {
    let l = Layout::new("mknod");
    let mut g = Guest::new(&l.share, false);
    // /dev/null (1:3) and /dev/sda (8:0), encoded the way FUSE sends them.
    for (name, mode, rdev) in [
        ("null", libc::S_IFCHR | 0o666, (1 << 8) | 3),
        ("sda", libc::S_IFBLK | 0o660, 8 << 8),
    ] {
        assert_eq!(g.mknod(ROOT, name, mode, rdev).unwrap_err(), libc::EPERM);
        assert!(std::fs::symlink_metadata(l.share.join(name)).is_err());
    }
    // FIFOs and regular files are fine (the guest kernel serves FIFOs).
    let e = g.mknod(ROOT, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    // OPEN on the FIFO (which the guest kernel never sends) is refused, so
    // it cannot block the server thread.
    assert!(g.open(e.nodeid, libc::O_RDONLY).is_err());
}

#[test]
fn the_restricted_thread_cannot_make_devices_even_without_the_policy() {
    if !is_root() {
        eprintln!("skipped: needs root to mean anything");
        return;
    }
    let l = Layout::new("capmknod");
    restrict_thread().unwrap();
    let p = CString::new(l.share.join("null").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path; mknod only creates a file.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
}

#[test]
fn set_id_bits_never_reach_the_host() {
    let l = Layout::new("suid");
    let mut g = Guest::new(&l.share, false);
    g.create(ROOT, "created", libc::O_WRONLY, libc::S_IFREG | 0o6755)
        .unwrap();
    assert_eq!(mode_of(&l.share.join("created")) & 0o7777, 0o755);
    let e = g.mknod(ROOT, "made", libc::S_IFREG | 0o4755, 0).unwrap();
    assert_eq!(mode_of(&l.share.join("made")) & 0o7777, 0o755);
    let s = SetattrIn {
        valid: FATTR_MODE,
        mode: libc::S_IFREG | 0o6777,
        ..Default::default()
    };
    g.setattr(e.nodeid, s).unwrap();
    assert_eq!(mode_of(&l.share.join("made")) & 0o7777, 0o777);
    g.mkdir(ROOT, "dir", 0o6755).unwrap();
    assert_eq!(mode_of(&l.share.join("dir")) & libc::S_ISUID, 0);
}

#[test]
fn writes_clear_the_set_id_bits_of_existing_files() {
    if !is_root() {
        eprintln!("skipped: as non-root the host kernel clears the bits anyway");
        return;
    }
    // An image may ship set-user-ID root binaries; a guest that rewrites one
    // must not leave a set-user-ID root file with its content on the host.
    let l = Layout::new("killpriv");
    let p = l.share.join("passwd");
    std::fs::write(&p, b"original").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mut g = Guest::new(&l.share, false);
    let e = g.lookup(ROOT, "passwd").unwrap();
    let fh = g.open(e.nodeid, libc::O_WRONLY).unwrap();
    g.write(e.nodeid, fh, b"evil").unwrap();
    assert_eq!(mode_of(&p) & 0o7777, 0o755);
}

#[test]
fn read_only_shares_refuse_every_write() {
    let l = Layout::new("ro");
    std::fs::write(l.share.join("f"), b"keep").unwrap();
    std::fs::create_dir(l.share.join("d")).unwrap();
    let mut g = Guest::new(&l.share, true);
    let f = g.lookup(ROOT, "f").unwrap().nodeid;
    let d = g.lookup(ROOT, "d").unwrap().nodeid;
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_WRONLY | libc::O_APPEND,
    ] {
        assert_eq!(g.open(f, flags).unwrap_err(), libc::EROFS, "{flags:#x}");
    }
    let fh = g.open(f, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(f, fh, 100).unwrap(), b"keep");
    assert_eq!(g.write(f, fh, b"x").unwrap_err(), libc::EROFS);
    let s = SetattrIn {
        valid: FATTR_SIZE,
        ..Default::default()
    };
    assert_eq!(g.setattr(f, s).unwrap_err(), libc::EROFS);
    let s = SetattrIn {
        valid: FATTR_MODE,
        mode: 0o777,
        ..Default::default()
    };
    assert_eq!(g.setattr(f, s).unwrap_err(), libc::EROFS);
    assert_eq!(
        g.create(ROOT, "new", libc::O_WRONLY, 0o644).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(
        g.mknod(ROOT, "new", libc::S_IFREG | 0o644, 0).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(g.mkdir(ROOT, "new", 0o755).unwrap_err(), libc::EROFS);
    assert_eq!(g.symlink(ROOT, "new", "/etc").unwrap_err(), libc::EROFS);
    assert_eq!(g.link(f, ROOT, "new").unwrap_err(), libc::EROFS);
    assert_eq!(g.rename(ROOT, "f", ROOT, "g").unwrap_err(), libc::EROFS);
    assert_eq!(
        g.call(Opcode::Unlink, ROOT, &cstr("f")).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(
        g.call(Opcode::Rmdir, ROOT, &cstr("d")).unwrap_err(),
        libc::EROFS
    );
    let _ = d;
    assert_eq!(std::fs::read(l.share.join("f")).unwrap(), b"keep");
    assert!(l.share.join("d").is_dir());
    assert!(!l.share.join("new").exists());
    // statfs reports the share read-only.
    let st = g.call(Opcode::Statfs, ROOT, &[]).unwrap();
    assert!(!st.is_empty());
}

#[test]
fn extended_attributes_and_ioctls_are_not_served() {
    let l = Layout::new("xattr");
    std::fs::write(l.share.join("f"), b"x").unwrap();
    let mut g = Guest::new(&l.share, false);
    let f = g.lookup(ROOT, "f").unwrap().nodeid;
    // setxattr_in: size, flags; then name and value.
    let body = cat(&[
        &4u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &cstr("security.capability"),
        b"\x01\x00\x00\x02",
    ]);
    assert_eq!(
        g.call(Opcode::Setxattr, f, &body).unwrap_err(),
        libc::ENOSYS
    );
    let body = cat(&[&0u32.to_le_bytes(), &0u32.to_le_bytes(), &cstr("user.x")]);
    assert_eq!(
        g.call(Opcode::Getxattr, f, &body).unwrap_err(),
        libc::ENOSYS
    );
}

#[test]
fn read_only_shares_answer_missing_names_with_cacheable_negative_entries() {
    let l = Layout::new("negative");
    std::fs::write(l.share.join("there"), b"x").unwrap();
    // Read-only: a missing name is a negative entry (node 0) the guest may
    // cache for the read-only timeout; an existing one is trusted as long.
    let mut g = Guest::new(&l.share, true);
    let missing = g.lookup(ROOT, "missing").unwrap();
    assert_eq!(missing.nodeid, 0);
    assert_eq!(missing.entry_valid, READ_ONLY_TIMEOUT.as_secs());
    let there = g.lookup(ROOT, "there").unwrap();
    assert_ne!(there.nodeid, 0);
    assert_eq!(there.entry_valid, READ_ONLY_TIMEOUT.as_secs());
    assert_eq!(there.attr_valid, READ_ONLY_TIMEOUT.as_secs());
    // Names that are refused stay errors, negative caching or not.
    assert_eq!(g.lookup(ROOT, "..").unwrap_err(), libc::EINVAL);
    // Read-write: ENOENT, nothing cached, the passthrough's 5 s timeouts.
    let mut g = Guest::new(&l.share, false);
    assert_eq!(g.lookup(ROOT, "missing").unwrap_err(), libc::ENOENT);
    assert_eq!(g.lookup(ROOT, "there").unwrap().entry_valid, 5);
}

#[test]
fn secure_defaults_are_what_the_documentation_says() {
    for ro in [false, true] {
        for dax in [false, true] {
            let c = passthrough_config("/x".into(), ro, dax);
            assert!(!c.inode_file_handles, "open_by_handle_at must stay off");
            assert!(!c.xattr);
            assert!(!c.writeback);
            assert!(!c.killpriv_v2);
            assert_eq!(c.dax_file_size, dax.then_some(0));
            assert!(c.do_import);
        }
    }
}

#[test]
fn malformed_chains_are_returned_unanswered() {
    let l = Layout::new("malformed");
    let mut g = Guest::new(&l.share, false);
    let out = g.alloc(4096);
    let inb = g.alloc(4096);
    // Truncated header.
    g.mem.write_slice(&[1, 2, 3], GuestAddress(inb)).unwrap();
    assert_eq!(g.submit(&[(inb, 3, 0), (out, 4096, VRING_DESC_F_WRITE)]), 0);
    // Only writable descriptors.
    assert_eq!(g.submit(&[(out, 4096, VRING_DESC_F_WRITE)]), 0);
    // Buffers outside guest memory.
    let far = 0x7fff_0000_0000;
    assert_eq!(
        g.submit(&[(far, 64, 0), (out, 4096, VRING_DESC_F_WRITE)]),
        0
    );
    assert_eq!(
        g.submit(&[(inb, 64, 0), (far, 4096, VRING_DESC_F_WRITE)]),
        0
    );
    // A header whose length claims far more than was sent.
    let hdr = InHeader {
        len: u32::MAX,
        opcode: Opcode::Lookup as u32,
        unique: 99,
        nodeid: ROOT,
        ..Default::default()
    };
    g.mem.write_obj(hdr, GuestAddress(inb)).unwrap();
    let _ = g.submit(&[
        (inb, std::mem::size_of::<InHeader>() as u32, 0),
        (out, 4096, VRING_DESC_F_WRITE),
    ]);
    // A reply buffer too small for the reply.
    let hdr = InHeader {
        len: 42,
        opcode: Opcode::Lookup as u32,
        unique: 100,
        nodeid: ROOT,
        ..Default::default()
    };
    let req = cat(&[hdr.as_slice(), b"x\0"]);
    g.mem.write_slice(&req, GuestAddress(inb)).unwrap();
    let _ = g.submit(&[(inb, req.len() as u32, 0), (out, 8, VRING_DESC_F_WRITE)]);
    // Unknown opcode.
    let hdr = InHeader {
        len: 40,
        opcode: 9999,
        unique: 101,
        nodeid: ROOT,
        ..Default::default()
    };
    g.mem.write_obj(hdr, GuestAddress(inb)).unwrap();
    let _ = g.submit(&[(inb, 40, 0), (out, 4096, VRING_DESC_F_WRITE)]);
    // And the server still answers.
    std::fs::write(l.share.join("ok"), b"ok").unwrap();
    assert!(g.lookup(ROOT, "ok").is_ok());
}

#[test]
fn share_arguments_parse_and_validate() {
    let s = ShareConfig::parse("root=/tmp").unwrap();
    assert_eq!(
        (s.tag.as_str(), s.dir.as_path(), s.read_only),
        ("root", Path::new("/tmp"), false)
    );
    let s = ShareConfig::parse("data=/tmp,ro").unwrap();
    assert!(s.read_only);
    let s = ShareConfig::parse("data=/a,b/c").unwrap();
    assert_eq!(s.dir, Path::new("/a,b/c"));
    for bad in ["", "noequals", "=/tmp", "t=", "t=,ro", "t=/tmp,rw,x"] {
        assert!(ShareConfig::parse(bad).is_err(), "{bad:?}");
    }
    assert!(matches!(
        ShareConfig::parse("t=/tmp,rx"),
        Err(FsError::UnknownOption { .. })
    ));
    let long = format!("{}=/tmp", "x".repeat(37));
    assert!(matches!(
        ShareConfig::parse(&long),
        Err(FsError::BadTag { .. })
    ));
    assert!(ShareConfig::parse(&format!("{}=/tmp", "x".repeat(36))).is_ok());
    assert!(ShareConfig::parse("a b=/tmp").is_err());
    let dup = vec![
        ShareConfig::parse("a=/tmp").unwrap(),
        ShareConfig::parse("a=/").unwrap(),
    ];
    assert!(matches!(
        super::validate_shares(&dup),
        Err(FsError::DuplicateTag { .. })
    ));
    let s = ShareConfig::parse("d=/tmp,dax").unwrap();
    assert_eq!(
        (s.dir.as_path(), s.read_only, s.dax_window),
        (
            Path::new("/tmp"),
            false,
            Some(super::dax::DEFAULT_DAX_WINDOW)
        )
    );
    let s = ShareConfig::parse("d=/tmp,ro,dax=1G").unwrap();
    assert_eq!((s.read_only, s.dax_window), (true, Some(1 << 30)));
    let s = ShareConfig::parse("d=/tmp,dax=4M,ro").unwrap();
    assert_eq!((s.read_only, s.dax_window), (true, Some(4 << 20)));
    assert_eq!(
        ShareConfig::parse("d=/tmp,dax=4194304").unwrap().dax_window,
        Some(4 << 20)
    );
    assert_eq!(ShareConfig::parse("d=/tmp").unwrap().dax_window, None);
    for bad in [
        "d=/tmp,dax=",
        "d=/tmp,dax=0",
        "d=/tmp,dax=3M",
        "d=/tmp,dax=1K",
        "d=/tmp,dax=65G",
        "d=/tmp,dax=99999999999999999999G",
        "d=/tmp,dax=18446744073709551615G",
        "d=/tmp,dax=-2M",
    ] {
        assert!(
            matches!(ShareConfig::parse(bad), Err(FsError::BadDaxWindow { .. })),
            "{bad:?}"
        );
    }
    for bad in [
        "d=/tmp,dax,dax",
        "d=/tmp,ro,rw",
        "d=/tmp,ro,ro",
        "d=/tmp,daxx",
    ] {
        assert!(ShareConfig::parse(bad).is_err(), "{bad:?}");
    }
    let missing = ShareConfig::parse("a=/nonexistent/dir").unwrap();
    assert!(matches!(
        missing.validate(),
        Err(FsError::NotADirectory { .. })
    ));
}

#[test]
fn device_config_activation_and_reset() {
    let l = Layout::new("device");
    std::fs::write(l.share.join("f"), b"data").unwrap();
    let share = ShareConfig {
        tag: "mytag".into(),
        dir: l.share.clone(),
        read_only: false,
        dax_window: None,
    };
    let umask_before = process_umask();
    let mut dev = VirtioFs::new(&share).unwrap();
    assert_eq!(dev.device_type(), device_type::FS);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..5], b"mytag");
    assert!(cfg[5..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
    let mut past = [0xffu8; 8];
    dev.read_config(38, &mut past);
    assert_eq!(past, [0, 0, 0, 0, 0, 0, 0, 0]);

    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ));
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    // One queue is not enough.
    let hi = MockSplitQueue::create(mem, GuestAddress(0x10000), 128);
    assert!(dev
        .activate(mem.clone(), irq.clone(), vec![hi.create_queue().unwrap()])
        .is_err());
    assert!(!dev.is_activated());
    let req = MockSplitQueue::create(mem, GuestAddress(0x40000), QSIZE);
    dev.activate(
        mem.clone(),
        irq.clone(),
        vec![hi.create_queue().unwrap(), req.create_queue().unwrap()],
    )
    .unwrap();
    assert!(dev.is_activated());
    // An INIT on the request queue, signalled like a KVM ioeventfd would.
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let hdr = InHeader {
        len: (40 + std::mem::size_of::<InitIn>()) as u32,
        opcode: Opcode::Init as u32,
        unique: 1,
        nodeid: 0,
        ..Default::default()
    };
    let body = cat(&[hdr.as_slice(), init.as_slice()]);
    mem.write_slice(&body, GuestAddress(0x10_0000)).unwrap();
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(
            0x10_0000,
            body.len() as u32,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            0x20_0000,
            4096,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    req.add_desc_chains(&raw, 0).unwrap();
    dev.queue_events()[1].write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while req.used().idx().load() == 0 {
        assert!(std::time::Instant::now() < deadline, "no reply to INIT");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let oh: OutHeader = mem.read_obj(GuestAddress(0x20_0000)).unwrap();
    assert_eq!((oh.unique, oh.error), (1, 0));
    // The interrupt was raised (the mock driver did not suppress it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while irq.status() == 0 {
        assert!(std::time::Instant::now() < deadline, "no interrupt");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(dev.reset());
    assert!(!dev.is_activated());
    // The worker's import() (at INIT and reset) did not touch the umask
    // of the rest of the process.
    assert_eq!(process_umask(), umask_before);
}

fn process_umask() -> libc::mode_t {
    // SAFETY: umask only swaps the mask; the old one is restored at once.
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    old
}

#[test]
fn server_read_throughput_on_the_host() {
    // The device side of a guest's sequential read: READs of 128 KiB (the
    // guest's default max_pages) into guest memory. Prints MiB/s; checks
    // the bytes.
    const CHUNK: u32 = 128 * 1024;
    const SIZE: usize = 16 << 20;
    let l = Layout::new("throughput");
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(l.share.join("big"), &data).unwrap();
    let mut g = Guest::new(&l.share, false);
    let e = g.lookup(ROOT, "big").unwrap();
    let fh = g.open(e.nodeid, libc::O_RDONLY).unwrap();
    let outb = 0x100_0000u64;
    let inb = 0x0f0_0000u64;
    let start = std::time::Instant::now();
    let mut off = 0u64;
    while (off as usize) < SIZE {
        g.unique += 1;
        let r = ReadIn {
            fh,
            offset: off,
            size: CHUNK,
            ..Default::default()
        };
        let hdr = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<ReadIn>()) as u32,
            opcode: Opcode::Read as u32,
            unique: g.unique,
            nodeid: e.nodeid,
            ..Default::default()
        };
        let req = cat(&[hdr.as_slice(), r.as_slice()]);
        g.mem.write_slice(&req, GuestAddress(inb)).unwrap();
        let out_len = CHUNK + 16;
        let len = g.submit(&[
            (inb, req.len() as u32, 0),
            (outb, out_len, VRING_DESC_F_WRITE),
        ]);
        assert_eq!(len, out_len);
        let mut got = vec![0u8; CHUNK as usize];
        g.mem.read_slice(&mut got, GuestAddress(outb + 16)).unwrap();
        assert!(got[..] == data[off as usize..off as usize + CHUNK as usize]);
        off += u64::from(CHUNK);
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "FUSE READ through the virtqueue on the host: {:.0} MiB/s ({} requests of 128 KiB)",
        (SIZE >> 20) as f64 / secs,
        SIZE / CHUNK as usize
    );
}

impl Guest {
    fn setupmapping(
        &mut self,
        inode: u64,
        fh: u64,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: SetupmappingFlags,
    ) -> Result<Vec<u8>, i32> {
        let s = SetupmappingIn {
            fh,
            foffset,
            len,
            flags: flags.bits(),
            moffset,
        };
        self.call(Opcode::SetupMapping, inode, s.as_slice())
    }

    fn removemapping(&mut self, inode: u64, ranges: &[(u64, u64)]) -> Result<Vec<u8>, i32> {
        let mut body = RemovemappingIn {
            count: ranges.len() as u32,
        }
        .as_slice()
        .to_vec();
        for &(moffset, len) in ranges {
            body.extend_from_slice(RemovemappingOne { moffset, len }.as_slice());
        }
        self.call(Opcode::RemoveMapping, inode, &body)
    }
}

/// Reads byte `off` of the window's host memory (the test plays the guest).
fn window_byte(w: &DaxWindow, off: u64) -> u8 {
    assert!(off < w.len());
    // SAFETY: the caller mapped a file page at `off` just before.
    unsafe { std::ptr::read_volatile((w.host_addr() + off) as *const u8) }
}

#[test]
fn per_inode_dax_is_negotiated_and_files_are_marked_with_a_window() {
    use fuse_backend_rs::abi::fuse_abi::{FsOptions, InitIn2, InitOut};
    const ATTR_DAX: u32 = 1 << 1;
    for dax in [false, true] {
        let l = Layout::new("perfile-dax");
        std::fs::write(l.share.join("f"), b"data").unwrap();
        let mut g = Guest::new(&l.share, false);
        if dax {
            // What new_server does for a share with a window.
            let share = ShareConfig {
                tag: "t".into(),
                dir: l.share.clone(),
                read_only: false,
                dax_window: Some(DAX_CHUNK),
            };
            g.server = new_server(&share).unwrap().1;
        }
        // A kernel asking for per-inode DAX, as Linux does when the device
        // has a window and the mount is not dax=always.
        let flags = FsOptions::INIT_EXT | FsOptions::PERFILE_DAX;
        let init = InitIn {
            major: 7,
            minor: 38,
            max_readahead: 0x20000,
            flags: flags.bits() as u32,
        };
        let init2 = InitIn2 {
            flags2: (flags.bits() >> 32) as u32,
            unused: [0; 11],
        };
        let out = g
            .call(Opcode::Init, 0, &cat(&[init.as_slice(), init2.as_slice()]))
            .unwrap();
        let io = InitOut::from_slice(&out[..std::mem::size_of::<InitOut>()]).unwrap();
        assert!(
            io.flags & FsOptions::INIT_EXT.bits() as u32 != 0,
            "no INIT_EXT"
        );
        assert_eq!(
            u64::from(io.flags2) << 32 & FsOptions::PERFILE_DAX.bits(),
            FsOptions::PERFILE_DAX.bits()
        );
        let e = g.lookup(ROOT, "f").unwrap();
        assert_eq!(e.attr.flags & ATTR_DAX != 0, dax, "FUSE_ATTR_DAX");
    }
}

#[test]
fn dax_mappings_are_checked_and_read_only_shares_refuse_writable_ones() {
    const PAGE: u64 = 4096;
    let read = SetupmappingFlags::READ;
    let write = SetupmappingFlags::READ | SetupmappingFlags::WRITE;
    for read_only in [false, true] {
        let l = Layout::new("dax");
        // Bigger than one 2 MiB chunk, not a multiple of the page size.
        let data: Vec<u8> = (0..DAX_CHUNK + 3 * PAGE + 123)
            .map(|i| (i % 253) as u8)
            .collect();
        let path = l.share.join("f");
        std::fs::write(&path, &data).unwrap();
        let mut g = Guest::new(&l.share, read_only);
        let f = g.lookup(ROOT, "f").unwrap().nodeid;
        let fh = g.open(f, libc::O_RDONLY).unwrap();
        // No window: the server answers EINVAL.
        assert_eq!(
            g.setupmapping(f, fh, 0, 0, DAX_CHUNK, read).unwrap_err(),
            libc::EINVAL
        );
        let window = Arc::new(DaxWindow::new(1 << 32, 2 * DAX_CHUNK).unwrap());
        g.cache = Some(Box::new(DaxHandler::new(window.clone(), read_only)));
        // The second chunk of the file reaches past its end, as the guest
        // maps it: mmap accepts that.
        g.setupmapping(f, fh, 0, 0, DAX_CHUNK, read).unwrap();
        g.setupmapping(f, fh, DAX_CHUNK, DAX_CHUNK, DAX_CHUNK, read)
            .unwrap();
        for off in [
            0,
            4095,
            DAX_CHUNK - 1,
            DAX_CHUNK,
            DAX_CHUNK + 3 * PAGE + 122,
        ] {
            assert_eq!(window_byte(&window, off), data[off as usize], "{off}");
        }
        assert_eq!(window.setups(), 2);
        // Ranges outside the window, unaligned or empty, and forged inodes.
        for (fo, mo, len) in [
            (0, 2 * DAX_CHUNK, PAGE),
            (0, DAX_CHUNK, DAX_CHUNK + PAGE),
            (0, u64::MAX - PAGE + 1, 2 * PAGE),
            (0, PAGE, u64::MAX - PAGE + 1),
            (0, 0, 0),
            (0, 1, PAGE),
            (1, 0, PAGE),
            (u64::MAX - PAGE + 1, 0, PAGE),
        ] {
            assert!(
                g.setupmapping(f, fh, fo, mo, len, read).is_err(),
                "{fo:#x} {mo:#x} {len:#x}"
            );
        }
        assert!(g.setupmapping(12345, fh, 0, 0, PAGE, read).is_err());
        assert!(g.setupmapping(ROOT, fh, 0, 0, PAGE, read).is_err());
        assert_eq!(window.setups(), 2);
        // Writable mappings: refused on read-only shares, and the file
        // stays as it was.
        let r = g.setupmapping(f, fh, 0, 0, PAGE, write);
        if read_only {
            assert_eq!(r.unwrap_err(), libc::EROFS);
            assert_eq!(std::fs::read(&path).unwrap(), data);
        } else {
            r.unwrap();
            // SAFETY: a writable file page is mapped at offset 0.
            unsafe { std::ptr::write_volatile(window.host_addr() as *mut u8, 0xaa) };
            assert_eq!(std::fs::read(&path).unwrap()[0], 0xaa);
        }
        // REMOVEMAPPING: checked the same way; all or nothing per entry.
        assert_eq!(
            g.removemapping(f, &[(2 * DAX_CHUNK, PAGE)]).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            g.removemapping(f, &[(PAGE, u64::MAX - PAGE + 1)])
                .unwrap_err(),
            libc::EINVAL
        );
        g.removemapping(f, &[(0, DAX_CHUNK), (DAX_CHUNK, DAX_CHUNK)])
            .unwrap();
        assert_eq!(window.removals(), 2);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(path.to_str().unwrap()), "still mapped");
        l.secret_unchanged();
    }
}

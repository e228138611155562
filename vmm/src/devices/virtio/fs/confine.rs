//! The security policy in front of the passthrough filesystem. The guest is
//! untrusted: every FUSE request reaches the host filesystem through
//! [`ConfinedFs`], which
//!
//! - refuses `.`/`..` and names with `/` in LOOKUP (the Linux FUSE client
//!   resolves those itself; only NFS export, which we do not offer, sends
//!   them), so no lookup can climb above the share root;
//! - on read-only shares refuses every request that could change the host
//!   filesystem with `EROFS` (opening for writing or truncating included);
//! - never creates device nodes (MKNOD is limited to regular files, FIFOs
//!   and sockets);
//! - never lets the guest set the set-user-ID or set-group-ID bit of a host
//!   file (stripped from CREATE, MKNOD, MKDIR and SETATTR modes; the
//!   directory set-group-ID bit, which only affects group inheritance, is
//!   kept);
//! - answers `ENOSYS` to what it does not forward: extended attributes,
//!   ioctl, POSIX locks (handled by the guest kernel), bmap, poll;
//! - on read-only shares answers a LOOKUP of a missing name with a negative
//!   entry the guest may cache ([`ConfinedFs::with_negative_entries`]), so
//!   a `$PATH` search or a loader's library search does not ask again for
//!   every name that is not there;
//! - forwards the DAX SETUPMAPPING/REMOVEMAPPING requests (the window
//!   handler checks every range), refusing writable mappings on read-only
//!   shares with `EROFS` (the passthrough would open the file `O_RDWR`).
//!
//! What the passthrough filesystem already guarantees and we rely on (each
//! is covered by a test in `tests.rs`): every name is resolved with one
//! `openat(parent_fd, name, O_PATH | O_NOFOLLOW)` relative to the parent's
//! file descriptor, so symlinks are never followed on the host and renames
//! cannot race a path walk; OPEN only reopens regular files and directories;
//! LINK and RENAME only take inodes the guest looked up inside the share.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

/// Mode bits the guest may never set on a host file.
const SUID_SGID: u32 = libc::S_ISUID | libc::S_ISGID;

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Whether `mode` asks for write access or truncation.
fn open_writes(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

/// `mode` without the set-user-ID bit, and without set-group-ID unless it
/// is a directory (where it only means "inherit the group").
fn strip_privileges(mode: u32, is_dir: bool) -> u32 {
    if is_dir {
        mode & !libc::S_ISUID
    } else {
        mode & !SUID_SGID
    }
}

/// The policy wrapper; see the module documentation.
pub struct ConfinedFs<F> {
    inner: F,
    read_only: bool,
    /// How long the guest may cache that a name does not exist; `None`:
    /// it may not (`ENOENT`, asked again next time).
    negative: Option<Duration>,
}

impl<F: FileSystem> ConfinedFs<F> {
    /// Wraps `inner`; with `read_only` every write-type request fails with `EROFS`.
    pub fn new(inner: F, read_only: bool) -> Self {
        ConfinedFs {
            inner,
            read_only,
            negative: None,
        }
    }

    /// Answers LOOKUPs of missing names with a negative entry valid for
    /// `timeout`, which the guest caches (a negative dentry) instead of
    /// asking again. Only for shares nothing else changes while the guest
    /// uses them: a name created on the host stays invisible to the guest
    /// for `timeout` (one the guest creates itself replaces the cached
    /// entry at once).
    pub fn with_negative_entries(mut self, timeout: Duration) -> Self {
        self.negative = Some(timeout);
        self
    }

    /// The wrapped filesystem.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }
}

impl<F: FileSystem> FileSystem for ConfinedFs<F>
where
    F::Inode: Copy,
{
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.inner.init(capable)?;
        // The kernel reads the reply's `flags2` (options above bit 31, such
        // as per-inode DAX) only when the reply has INIT_EXT; the
        // passthrough returns such options without it, so they were lost.
        if want.bits() >> 32 != 0 && capable.contains(FsOptions::INIT_EXT) {
            want |= FsOptions::INIT_EXT;
        }
        Ok(want)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let bytes = name.to_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(err(libc::EINVAL));
        }
        match (self.inner.lookup(ctx, parent, name), self.negative) {
            (Err(e), Some(timeout)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Entry {
                inode: 0,
                entry_timeout: timeout,
                ..Entry::default()
            }),
            (result, _) => result,
        }
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        mut attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        if valid.contains(SetattrValid::MODE) {
            // The file type comes from the host, not from the request.
            let (st, _) = self.inner.getattr(ctx, inode, None)?;
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            attr.st_mode = strip_privileges(attr.st_mode, is_dir);
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(err(libc::EPERM)),
        }
        self.inner
            .mknod(ctx, inode, name, strip_privileges(mode, false), rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.inner
            .mkdir(ctx, parent, name, strip_privileges(mode, true), umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        if open_writes(flags) {
            self.writable()?;
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.writable()?;
        args.mode = strip_privileges(args.mode, false);
        self.inner.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        // Handles on a read-only share are never writable, but a guest may
        // send WRITE on a handle opened for reading.
        self.writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        if flags & SetupmappingFlags::WRITE.bits() != 0 {
            self.writable()?;
        }
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn privilege_bits_are_stripped() {
        assert_eq!(
            strip_privileges(libc::S_IFREG | 0o6755, false),
            libc::S_IFREG | 0o755
        );
        assert_eq!(strip_privileges(0o6755, true), 0o2755);
        assert_eq!(strip_privileges(0o1777, true), 0o1777);
    }

    #[test]
    fn write_intent_of_open_flags() {
        assert!(!open_writes(libc::O_RDONLY as u32));
        assert!(!open_writes((libc::O_RDONLY | libc::O_DIRECTORY) as u32));
        for f in [libc::O_WRONLY, libc::O_RDWR, libc::O_TRUNC, libc::O_CREAT] {
            assert!(open_writes(f as u32), "{f:#x}");
        }
    }
}

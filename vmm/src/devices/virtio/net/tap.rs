//! A tap device opened for virtio-net: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! a 12-byte `virtio_net_hdr_v1` in front of every frame both ways,
//! nonblocking. Either created (or opened, if it exists) by name in the
//! network namespace the VMM runs in, or adopted from an fd the parent
//! passed down.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// Errors of opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a NUL byte.
    #[error("invalid tap name {0:?}: 1 to 15 bytes, no NUL")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// An ioctl failed.
    #[error("tap {name}: {what}")]
    Ioctl {
        /// Interface name (or `fd N`).
        name: String,
        /// Which request.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is not a tap opened the way virtio-net needs.
    #[error("fd {fd} is not usable as a virtio-net tap: {reason}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// Why.
        reason: String,
    },
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// An `ifreq` with `name` filled in.
fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers, addresses and pointers); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(ifr)
}

fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Tap {
    /// Creates the tap `name` (or opens it if it exists, e.g. made
    /// persistent by `ip tuntap add`) in this thread's network namespace,
    /// and sets its link up.
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        let mut ifr = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on our
        // stack for the call; the fd is the tun device we just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: name.to_string(),
                what: "TUNSETIFF",
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name_of(&ifr),
        };
        tap.set_vnet_hdr_size()?;
        tap.set_link_up()?;
        Ok(tap)
    }

    /// Adopts tap fd `fd` inherited from the parent (the caller gives up
    /// the fd). It must be a tap opened with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`; it is made nonblocking and its header size set.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        if fd < 3 {
            return Err(bad("stdio fds cannot be taps".into()));
        }
        // SAFETY: F_GETFD only reads the fd's flags; an invalid fd fails
        // with EBADF, which we check before taking ownership.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(io::Error::last_os_error().to_string()));
        }
        // SAFETY: the fd is open (checked above) and the caller hands it
        // over: nothing else in this process uses or closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(owned);
        // SAFETY: a zeroed ifreq is valid (see ifreq_for).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq into our stack variable; on a
        // non-tun fd it fails with EBADFD/ENOTTY.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
            return Err(bad(format!(
                "TUNGETIFF: {} (not a tap)",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & want != want {
            return Err(bad(format!(
                "opened with flags {flags:#x}, needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
            )));
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(bad(format!("O_NONBLOCK: {}", io::Error::last_os_error())));
        }
        // SAFETY: FD_CLOEXEC on an fd we own, so children do not inherit it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let tap = Tap {
            file,
            name: name_of(&ifr),
        };
        tap.set_vnet_hdr_size()?;
        if let Err(e) = tap.set_link_up() {
            tracing::warn!("virtio-net: {e}");
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_err(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points at a live local.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(self.ioctl_err("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// Tells the tap which offloads the guest accepts (`TUN_F_*`): with
    /// `TUN_F_TSO4` the tap may hand us 64 KiB TCP segments.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(self.ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Sets IFF_UP on the interface (SIOCGIFFLAGS/SIOCSIFFLAGS through an
    /// AF_INET datagram socket of this network namespace).
    fn set_link_up(&self) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        // SAFETY: plain socket(2); the result is checked and owned below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(self.ioctl_err("socket(AF_INET)"));
        }
        // SAFETY: sock is a fresh fd owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: SIOCGIFFLAGS fills the flags member of our ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(self.ioctl_err("SIOCGIFFLAGS"));
        }
        // SAFETY: the flags member was just written by the kernel.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16 };
        // SAFETY: SIOCSIFFLAGS reads our ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
            return Err(self.ioctl_err("SIOCSIFFLAGS (link up)"));
        }
        Ok(())
    }

    /// Reads one frame (with its header); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (header first) gathered from `iov`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable
    /// for the duration of the call (guest memory, or a live buffer).
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the caller guarantees every iovec is readable memory;
        // the kernel only reads from it.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

//! Requests for VMs restored from a snapshot: reseed the RNG with host
//! entropy, set the host name, and read random bytes (so the host can check
//! that clones diverged). Each costs only a few system calls: guest system
//! calls are expensive on some hosts.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use vessel_proto::{MAX_RANDOM_LEN, MAX_RESTORE_ENTROPY, MIN_RESTORE_ENTROPY};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Longest host name (`HOST_NAME_MAX`).
const MAX_HOSTNAME: usize = 64;

/// Checks a `Restored` request before anything is changed.
pub fn check(entropy: &[u8], hostname: Option<&str>) -> Result<(), String> {
    if !(MIN_RESTORE_ENTROPY..=MAX_RESTORE_ENTROPY).contains(&entropy.len()) {
        return Err(format!(
            "entropy must be {MIN_RESTORE_ENTROPY} to {MAX_RESTORE_ENTROPY} bytes, got {}",
            entropy.len()
        ));
    }
    if let Some(h) = hostname {
        if h.is_empty() || h.len() > MAX_HOSTNAME || h.bytes().any(|b| b == 0 || b == b'/') {
            return Err(format!("invalid host name {h:?}"));
        }
    }
    Ok(())
}

/// `struct rand_pool_info` followed by its buffer, as RNDADDENTROPY takes it.
fn pool_info(entropy: &[u8]) -> Vec<u8> {
    let bits = i32::try_from(entropy.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(entropy.len()).unwrap_or(i32::MAX);
    let mut buf = Vec::with_capacity(8 + entropy.len());
    buf.extend_from_slice(&bits.to_ne_bytes());
    buf.extend_from_slice(&size.to_ne_bytes());
    buf.extend_from_slice(entropy);
    buf
}

/// Credits `entropy` to the kernel's input pool and reseeds the CRNG, then
/// sets the host name: open + 2 ioctls + close (+ sethostname).
pub fn apply(entropy: &[u8], hostname: Option<&str>) -> Result<(), String> {
    check(entropy, hostname)?;
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    let info = pool_info(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size (the
    // second int) is exactly the number of bytes that follow in `info`.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Some(h) = hostname {
        // SAFETY: the pointer and length describe `h`, which outlives the call.
        let rc = unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
        if rc != 0 {
            return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `len` bytes from getrandom(2): one system call.
pub fn random(len: u32) -> Result<Vec<u8>, String> {
    if len > MAX_RANDOM_LEN {
        return Err(format!(
            "at most {MAX_RANDOM_LEN} random bytes, asked {len}"
        ));
    }
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: writes at most rest.len() bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("getrandom: {e}"));
        }
        filled += n as usize;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(check(&[0; 32], None).is_ok());
        assert!(check(&[0; 31], None).is_err());
        assert!(check(&[0; 4097], None).is_err());
        assert!(check(&[0; 32], Some("clone-1")).is_ok());
        assert!(check(&[0; 32], Some("")).is_err());
        assert!(check(&[0; 32], Some(&"x".repeat(65))).is_err());
        assert!(check(&[0; 32], Some("a\0b")).is_err());
    }

    #[test]
    fn pool_info_layout() {
        let b = pool_info(&[7; 40]);
        assert_eq!(&b[..4], &320i32.to_ne_bytes());
        assert_eq!(&b[4..8], &40i32.to_ne_bytes());
        assert_eq!(b.len(), 48);
    }

    #[test]
    fn random_bytes() {
        let a = random(32).unwrap();
        let b = random(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(random(0).unwrap().is_empty());
        assert!(random(MAX_RANDOM_LEN + 1).is_err());
    }
}

//! Step timestamps for profiling container creation and start.
//!
//! With `vessel.debug` and `printk.devkmsg=on` on the guest kernel command
//! line (the host's `guest_cmdline` setting; a template built with it),
//! the agent and the container's child write `vessel-step NAME US` lines
//! (`CLOCK_BOOTTIME` in microseconds) to `/dev/kmsg`, which reach the
//! sandbox's serial log: the difference between two lines is the guest
//! time of a step. The child may not allocate or lock (see `child`), so a
//! line is formatted on the stack and written with one `write`. Off (one
//! relaxed load) unless [`open`] found debugging on.

use std::sync::atomic::{AtomicI32, Ordering};

/// `/dev/kmsg`, or -1 when tracing is off. Close-on-exec: the container's
/// process never inherits it.
static KMSG: AtomicI32 = AtomicI32::new(-1);

/// Turns tracing on when the agent runs with debugging on.
pub fn open(debug: bool) {
    if !debug {
        return;
    }
    // SAFETY: open(2) of a NUL-terminated literal.
    let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    KMSG.store(fd, Ordering::Relaxed);
}

/// Writes the line for step `name` (at most 32 bytes). Allocation-free.
pub fn mark(name: &str) {
    let fd = KMSG.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: clock_gettime fills the zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above, a valid pointer to our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let us = (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000);
    let mut buf = [0u8; 80];
    let n = format_line(&mut buf, name, us);
    // SAFETY: write(2) of our initialized stack buffer.
    unsafe { libc::write(fd, buf.as_ptr().cast(), n) };
}

/// `<3>vessel-step NAME US\n` into `buf`; returns its length. Level 3
/// (error) so that the console shows it under `quiet`.
fn format_line(buf: &mut [u8; 80], name: &str, us: u64) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if n < buf.len() - 1 {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"<3>vessel-step ");
    put(&name.as_bytes()[..name.len().min(32)]);
    put(b" ");
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = us;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    digits[..d].reverse();
    put(&digits[..d]);
    buf[n] = b'\n';
    n + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_formatted_without_allocating() {
        let mut buf = [0u8; 80];
        let n = format_line(&mut buf, "pivot", 12_345_678);
        assert_eq!(&buf[..n], b"<3>vessel-step pivot 12345678\n");
        let n = format_line(&mut buf, "x", 0);
        assert_eq!(&buf[..n], b"<3>vessel-step x 0\n");
        let long = "y".repeat(100);
        let n = format_line(&mut buf, &long, u64::MAX);
        assert!(n <= 80 && buf[n - 1] == b'\n');
    }
}

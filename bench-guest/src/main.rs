//! `vessel-floor ROOT [BUDGET_MS]`: the cost of basic kernel operations, as
//! a static binary that `cargo xtask bench floor` runs inside a container
//! (ROOT = `/`) and directly on the host (ROOT = the bundle's rootfs).
//!
//! Each figure loops over one operation in growing batches until BUDGET_MS
//! (default 1000) have passed or the operation runs out of fresh material,
//! and prints `floor NAME MICROSECONDS_PER_OP OPS` (or `floor NAME error
//! MESSAGE`). The clock is read once per batch only, so a slow clock does
//! not distort the cheap operations. `ROOT/floor.dat` is a data file of a
//! few MiB (written by xtask). `vessel-floor --noop` exits at once: the
//! program the spawn figure executes.

use std::ffi::CString;
use std::io::Error;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::null_mut;
use std::time::Instant;

type Res<T> = Result<T, String>;

const PAGE: usize = 4096;
/// The kernel's default fault-around window: one fault maps up to this much
/// of a file, so touching one page per window makes every touch a fault.
const FAULT_AROUND: usize = 64 * 1024;
const ANON_BYTES: usize = 32 << 20;

fn os_err(what: &str) -> String {
    format!("{what}: {}", Error::last_os_error())
}

/// Calls `op(0)`, `op(1)`, ... in batches (the clock is read between
/// batches) until `budget_ms` have passed or `max` calls were made; returns
/// microseconds per call and the number of calls.
fn measure(budget_ms: f64, max: usize, mut op: impl FnMut(usize) -> Res<()>) -> Res<(f64, usize)> {
    let start = Instant::now();
    let (mut done, mut batch) = (0usize, 1usize);
    loop {
        for _ in 0..batch.min(max - done) {
            op(done)?;
            done += 1;
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if ms >= budget_ms || done >= max {
            return Ok((ms * 1000.0 / done.max(1) as f64, done));
        }
        // Aim at the budget, at most doubling the batch.
        let per_call = ms / done as f64;
        batch = (((budget_ms - ms) / per_call).ceil() as usize).clamp(1, batch * 2);
    }
}

/// A memory mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: libc::c_int, flags: libc::c_int, fd: libc::c_int) -> Res<Map> {
        // SAFETY: a new mapping chosen by the kernel (no address hint), so
        // no existing memory is affected; the result is checked.
        let ptr = unsafe { libc::mmap(null_mut(), len, prot, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let map = Map {
            ptr: ptr.cast(),
            len,
        };
        Ok(map)
    }

    fn advise(&self, advice: libc::c_int) -> Res<()> {
        // SAFETY: the range is this mapping; advice changes no contents.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } != 0 {
            return Err(os_err("madvise"));
        }
        Ok(())
    }

    /// Reads the byte at `off` (< len), faulting its page in.
    fn touch(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: `off` is inside the mapping, which is readable.
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn getppid_loop(budget: f64) -> Res<(f64, usize)> {
    measure(budget, usize::MAX, |_| {
        // SAFETY: getppid takes no arguments and touches no memory; the raw
        // system call makes sure no libc caching answers instead.
        unsafe { libc::syscall(libc::SYS_getppid) };
        Ok(())
    })
}

fn anon_fault(budget: f64) -> Res<(f64, usize)> {
    let map = Map::new(
        ANON_BYTES,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    // One fault per 4 KiB page, not one per 2 MiB (a kernel without
    // transparent huge pages refuses the advice and needs none).
    let _ = map.advise(libc::MADV_NOHUGEPAGE);
    measure(budget, ANON_BYTES / PAGE, |i| {
        // SAFETY: i * PAGE < ANON_BYTES, inside the writable mapping.
        unsafe { std::ptr::write_volatile(map.ptr.add(i * PAGE), 1) };
        Ok(())
    })
}

fn file_map(file: &std::fs::File, len: usize) -> Res<Map> {
    let map = Map::new(len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd())?;
    // No read-ahead: a fault reads the one page it needs.
    map.advise(libc::MADV_RANDOM)?;
    Ok(map)
}

/// Drops `file` from this kernel's page cache (clean pages only).
fn drop_cache(file: &std::fs::File) {
    // SAFETY: an advice on a file descriptor we own; no memory involved.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// File page faults on `floor.dat`, as (cold, cached, cold sequential).
/// Cold and cached: one fault per 64 KiB window, first with the file dropped
/// from this kernel's page cache, then again on fresh mappings (a minor
/// fault). Cold sequential: the file dropped again, every page touched in
/// order with read-ahead on (time per page, not per fault).
fn file_faults(data: &str, budget: f64) -> Res<[(f64, usize); 3]> {
    let file = std::fs::File::open(data).map_err(|e| format!("{data}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{data}: {e}"))?.len() as usize;
    let windows = len / FAULT_AROUND;
    if windows == 0 {
        return Err(format!("{data} is smaller than {FAULT_AROUND} bytes"));
    }
    drop_cache(&file);
    let map = file_map(&file, len)?;
    let mut sum = 0u8;
    let cold = measure(budget, windows, |i| {
        sum = sum.wrapping_add(map.touch(i * FAULT_AROUND));
        Ok(())
    })?;
    drop(map);
    let mut map: Option<Map> = None;
    let cached = measure(budget, usize::MAX, |i| {
        if i % windows == 0 {
            map = None;
            map = Some(file_map(&file, len)?);
        }
        if let Some(m) = &map {
            sum = sum.wrapping_add(m.touch((i % windows) * FAULT_AROUND));
        }
        Ok(())
    })?;
    drop(map);
    drop_cache(&file);
    let map = Map::new(len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd())?;
    let sequential = measure(budget, len / PAGE, |i| {
        sum = sum.wrapping_add(map.touch(i * PAGE));
        Ok(())
    })?;
    std::hint::black_box(sum);
    Ok([cold, cached, sequential])
}

fn pread_direct(data: &str, budget: f64) -> Res<(f64, usize)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(data)
        .map_err(|e| format!("open {data} O_DIRECT: {e}"))?;
    let pages = file.metadata().map_err(|e| format!("{data}: {e}"))?.len() as usize / PAGE;
    // A page-aligned buffer, as O_DIRECT wants.
    let buf = Map::new(
        PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    )?;
    measure(budget, usize::MAX, |i| {
        let off = ((i % pages.max(1)) * PAGE) as libc::off_t;
        // SAFETY: `buf` is a writable mapping of PAGE bytes that outlives
        // the call.
        let n = unsafe { libc::pread(file.as_raw_fd(), buf.ptr.cast(), PAGE, off) };
        if n != PAGE as isize {
            return Err(os_err("pread"));
        }
        Ok(())
    })
}

fn open_close(data: &str, budget: f64) -> Res<(f64, usize)> {
    let path = CString::new(data).map_err(|e| e.to_string())?;
    measure(budget, usize::MAX, |_| {
        // SAFETY: `path` is a NUL-terminated string.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(os_err("open"));
        }
        // SAFETY: closes the descriptor just opened, owned by nobody else.
        unsafe { libc::close(fd) };
        Ok(())
    })
}

/// A different missing name each time, so no negative dentry answers.
fn stat_missing(root: &str, budget: f64) -> Res<(f64, usize)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    measure(budget, usize::MAX, |i| {
        let path = CString::new(format!("{root}/floor-missing-{i}")).map_err(|e| e.to_string())?;
        // SAFETY: `path` is NUL-terminated and `st` is writable stat storage.
        if unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) } == 0 {
            return Err(format!("{path:?} exists"));
        }
        Ok(())
    })
}

fn wait(pid: libc::pid_t) -> Res<()> {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(os_err("waitpid"));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child ended with status {status:#x}"));
    }
    Ok(())
}

fn fork_exit_wait(budget: f64) -> Res<(f64, usize)> {
    measure(budget, usize::MAX, |_| {
        // SAFETY: this program is single-threaded; the child only calls
        // _exit, which is async-signal-safe.
        match unsafe { libc::fork() } {
            -1 => Err(os_err("fork")),
            // SAFETY: ends the child at once, running no destructors.
            0 => unsafe { libc::_exit(0) },
            pid => wait(pid),
        }
    })
}

/// posix_spawn of this binary with `--noop`: musl implements it as
/// clone(CLONE_VM | CLONE_VFORK) + execve, i.e. vfork+exec.
fn spawn_exec_wait(budget: f64) -> Res<(f64, usize)> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let exe = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let noop = CString::new("--noop").map_err(|e| e.to_string())?;
    let argv = [
        exe.as_ptr().cast_mut(),
        noop.as_ptr().cast_mut(),
        null_mut(),
    ];
    let envp = [null_mut()];
    measure(budget, usize::MAX, |_| {
        let mut pid = 0;
        // SAFETY: `exe` and the NULL-terminated `argv`/`envp` arrays point
        // to live NUL-terminated strings; null file actions and attributes
        // are allowed.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                exe.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(format!("posix_spawn: {}", Error::from_raw_os_error(rc)));
        }
        wait(pid)
    })
}

fn report(name: &str, r: Res<(f64, usize)>) {
    match r {
        Ok((us, n)) => println!("floor {name} {us:.3} {n}"),
        Err(e) => println!("floor {name} error {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--noop") {
        return;
    }
    let root = args.get(1).map_or("", |r| r.trim_end_matches('/'));
    let budget: f64 = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(1000.0);
    let data = format!("{root}/floor.dat");
    report("syscall_getppid", getppid_loop(budget));
    report("anon_page_fault", anon_fault(budget));
    let names = [
        "file_page_fault_cold",
        "file_page_fault_cached",
        "file_page_sequential_cold",
    ];
    match file_faults(&data, budget) {
        Ok(figures) => {
            for (name, f) in names.into_iter().zip(figures) {
                report(name, Ok(f));
            }
        }
        Err(e) => {
            for name in names {
                report(name, Err(e.clone()));
            }
        }
    }
    report("pread_4k_o_direct", pread_direct(&data, budget));
    report("open_close", open_close(&data, budget));
    report("stat_missing", stat_missing(root, budget));
    report("fork_exit_wait", fork_exit_wait(budget));
    report("vfork_exec_wait", spawn_exec_wait(budget));
}

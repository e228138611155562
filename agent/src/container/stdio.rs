//! Process stdio: vsock connections attached with `AttachStdio` wait here
//! until `CreateContainer`/`ExecProcess` takes them. A stdin/stdout/stderr
//! connection becomes the process's descriptor itself (no copying in the
//! agent); a terminal connection is relayed to and from a guest pty master
//! by two small threads.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use vessel_proto::container::{AttachStdioRequest, StdioSpec, StdioStream};

/// Most connections waiting to be taken (each holds a descriptor).
pub const MAX_PENDING: usize = 64;

/// Stack of a terminal relay thread.
const RELAY_STACK: usize = 64 * 1024;

type Key = (String, Option<String>, StdioStream);

/// Attached streams not yet taken by a process.
#[derive(Default)]
pub struct Pending {
    map: Mutex<HashMap<Key, OwnedFd>>,
}

/// The streams a process takes.
#[derive(Debug, Default)]
pub struct Taken {
    /// fd 0, 1, 2 (None: /dev/null).
    pub std: [Option<OwnedFd>; 3],
    /// Terminal connection.
    pub terminal: Option<OwnedFd>,
}

impl Pending {
    fn check_locked(map: &HashMap<Key, OwnedFd>, req: &AttachStdioRequest) -> Result<(), String> {
        if map.len() >= MAX_PENDING {
            return Err(format!(
                "too many stdio streams waiting (at most {MAX_PENDING})"
            ));
        }
        let key = (req.id.clone(), req.exec_id.clone(), req.stream);
        if map.contains_key(&key) {
            return Err(format!(
                "{:?} of this process is attached already",
                req.stream
            ));
        }
        Ok(())
    }

    /// Keeps `fd` for the stream `req` names.
    pub fn attach(&self, req: &AttachStdioRequest, fd: OwnedFd) -> Result<(), String> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Self::check_locked(&map, req)?;
        let key = (req.id.clone(), req.exec_id.clone(), req.stream);
        map.insert(key, fd);
        Ok(())
    }

    /// Takes the streams `spec` says were attached for a process; a
    /// missing one is an error (and nothing is taken).
    pub fn take(
        &self,
        id: &str,
        exec_id: Option<&str>,
        spec: StdioSpec,
        terminal: bool,
    ) -> Result<Taken, String> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: Vec<StdioStream> = if terminal {
            if !spec.terminal {
                return Err("process.terminal is set but no Terminal stream was attached".into());
            }
            vec![StdioStream::Terminal]
        } else {
            [
                (spec.stdin, StdioStream::Stdin),
                (spec.stdout, StdioStream::Stdout),
                (spec.stderr, StdioStream::Stderr),
            ]
            .into_iter()
            .filter_map(|(on, s)| on.then_some(s))
            .collect()
        };
        let key = |s| (id.to_string(), exec_id.map(str::to_string), s);
        if let Some(missing) = wanted.iter().find(|s| !map.contains_key(&key(**s))) {
            return Err(format!(
                "no {missing:?} stream was attached for this process"
            ));
        }
        let mut t = Taken::default();
        for s in wanted {
            let fd = map.remove(&key(s));
            match s {
                StdioStream::Stdin => t.std[0] = fd,
                StdioStream::Stdout => t.std[1] = fd,
                StdioStream::Stderr => t.std[2] = fd,
                StdioStream::Terminal => t.terminal = fd,
            }
        }
        Ok(t)
    }

    /// Drops the streams waiting for exec `exec_id` of container `id`.
    pub fn forget_process(&self, id: &str, exec_id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| !(k.0 == id && k.1.as_deref() == Some(exec_id)));
    }

    /// Drops every stream waiting for container `id`.
    pub fn forget(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| k.0 != id);
    }
}

/// Opens a pty pair in the agent's devpts: (master, slave), both
/// close-on-exec, with the window size set when given.
pub fn open_pty(size: Option<(u16, u16)>) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let master = crate::init::open_raw_mode(
        c"/dev/ptmx",
        libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        0,
    )?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a live pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER returns a new descriptor for the slave.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    if let Some((rows, cols)) = size {
        resize(&master, rows, cols)?;
    }
    Ok((master, slave))
}

/// Sets a pty's window size.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a live pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies between the pty master and the terminal connection until either
/// side ends; returns a duplicate of the master for resizing.
pub fn relay(master: OwnedFd, conn: OwnedFd) -> std::io::Result<OwnedFd> {
    let keep = master.try_clone()?;
    let m2 = master.try_clone()?;
    let c2 = conn.try_clone()?;
    let spawn = |name: &str, mut from: File, mut to: File| {
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                // Ends the other direction's peer: the host sees EOF.
                // SAFETY: shutdown(2) on a descriptor we own (ENOTSOCK on
                // the pty is ignored).
                unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            })
    };
    spawn("pty-out", File::from(master), File::from(conn))?;
    spawn("pty-in", File::from(c2), File::from(m2))?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        File::open("/dev/null").unwrap().into()
    }

    fn attach(p: &Pending, exec: Option<&str>, s: StdioStream) -> Result<(), String> {
        let r = AttachStdioRequest {
            id: "c".into(),
            exec_id: exec.map(str::to_string),
            stream: s,
        };
        p.attach(&r, fd())
    }

    #[test]
    fn streams_are_taken_per_process() {
        let p = Pending::default();
        attach(&p, None, StdioStream::Stdout).unwrap();
        attach(&p, None, StdioStream::Stderr).unwrap();
        assert!(attach(&p, None, StdioStream::Stdout).is_err());
        attach(&p, Some("e"), StdioStream::Stdin).unwrap();
        let spec = StdioSpec {
            stdin: true,
            ..StdioSpec::default()
        };
        // Init has no stdin attached.
        assert!(p.take("c", None, spec, false).is_err());
        let spec = StdioSpec {
            stdout: true,
            stderr: true,
            ..StdioSpec::default()
        };
        let t = p.take("c", None, spec, false).unwrap();
        assert!(t.std[0].is_none() && t.std[1].is_some() && t.std[2].is_some());
        assert!(p.take("c", None, spec, false).is_err());
        assert!(p.take("c", None, StdioSpec::default(), true).is_err());
        attach(&p, Some("f"), StdioStream::Stdout).unwrap();
        p.forget_process("c", "f");
        assert_eq!(p.map.lock().unwrap().len(), 1);
        p.forget("c");
        assert!(p.map.lock().unwrap().is_empty());
    }
}

//! The control socket of a running VMM (`--api-sock PATH`).
//!
//! A line protocol on a Unix stream socket; one request per line, one
//! answer line per request:
//!
//! ```text
//! pause            -> OK paused
//! resume           -> OK running
//! snapshot <dir>   -> OK snapshot <dir>     (the VM keeps its run state)
//! status           -> OK running | OK paused
//! anything else    -> ERR <message>
//! ```
//!
//! A thread accepts connections and parses lines; the requests themselves
//! run on the VMM's event-loop thread (which owns the VM), woken through an
//! eventfd. Connections are served one at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;
/// How long a request may take on the event loop (a snapshot writes all of
/// guest memory).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors of setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path is taken.
    #[error("api socket path {0} already exists")]
    Exists(PathBuf),
    /// bind, eventfd or thread creation failed.
    #[error("cannot set up the api socket {path}")]
    Setup {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// Pause every vCPU.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Save a snapshot into a directory.
    Snapshot(PathBuf),
    /// Running or paused.
    Status,
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<ApiRequest, String> {
    let line = line.trim();
    let (verb, arg) = match line.split_once(char::is_whitespace) {
        Some((v, a)) => (v, a.trim()),
        None => (line, ""),
    };
    match (verb, arg.is_empty()) {
        ("pause", true) => Ok(ApiRequest::Pause),
        ("resume", true) => Ok(ApiRequest::Resume),
        ("status", true) => Ok(ApiRequest::Status),
        ("snapshot", false) => Ok(ApiRequest::Snapshot(PathBuf::from(arg))),
        ("snapshot", true) => Err("snapshot needs a directory".into()),
        ("pause" | "resume" | "status", false) => Err(format!("{verb} takes no argument")),
        ("", _) => Err("empty request".into()),
        _ => Err(format!("unknown request {verb:?}")),
    }
}

/// A request waiting for the event loop, with where its answer goes.
pub struct PendingRequest {
    /// What is asked.
    pub request: ApiRequest,
    /// `Ok(text)` or `Err(message)`.
    pub reply: Sender<Result<String, String>>,
}

/// The listening socket and its thread.
pub struct ApiServer {
    path: PathBuf,
    socket_id: Option<(u64, u64)>,
    requests: Receiver<PendingRequest>,
    wake: Arc<EventFd>,
}

impl ApiServer {
    /// Binds `path` (which must not exist) and starts the accept thread.
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(ApiError::Exists(path.to_path_buf()));
        }
        let setup = |source| ApiError::Setup {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(setup)?;
        let socket_id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?);
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, &tx, &thread_wake))
            .map_err(setup)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            socket_id,
            requests: rx,
            wake,
        })
    }

    /// The eventfd written when a request is waiting.
    pub fn wake_evt(&self) -> Arc<EventFd> {
        self.wake.clone()
    }

    /// The next waiting request, if any.
    pub fn next_request(&self) -> Option<PendingRequest> {
        self.requests.try_recv().ok()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.socket_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(listener: &UnixListener, tx: &Sender<PendingRequest>, wake: &EventFd) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if !serve(s, tx, wake) {
                    return;
                }
            }
            Err(e) => tracing::warn!("api: accept: {e}"),
        }
    }
}

/// Serves one connection; false when the VMM side is gone.
fn serve(stream: UnixStream, tx: &Sender<PendingRequest>, wake: &EventFd) -> bool {
    let Ok(mut out) = stream.try_clone() else {
        return true;
    };
    let mut reader = BufReader::new(stream).take(u64::MAX);
    loop {
        let mut line = Vec::new();
        reader.set_limit(MAX_LINE as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let _ = out.write_all(b"ERR request line too long\n");
            return true;
        }
        let answer = match std::str::from_utf8(&line)
            .map_err(|_| "request is not UTF-8".to_string())
            .and_then(parse_request)
        {
            Err(e) => Err(e),
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                if tx
                    .send(PendingRequest {
                        request,
                        reply: reply_tx,
                    })
                    .is_err()
                {
                    return false;
                }
                let _ = wake.write(1);
                reply_rx
                    .recv_timeout(REQUEST_TIMEOUT)
                    .unwrap_or_else(|_| Err("the VMM did not answer".into()))
            }
        };
        let text = match answer {
            Ok(t) => format!("OK {t}\n"),
            Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
        };
        if out.write_all(text.as_bytes()).is_err() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(parse_request("pause\n"), Ok(ApiRequest::Pause));
        assert_eq!(parse_request(" resume "), Ok(ApiRequest::Resume));
        assert_eq!(parse_request("status"), Ok(ApiRequest::Status));
        assert_eq!(
            parse_request("snapshot /tmp/a b\n"),
            Ok(ApiRequest::Snapshot(PathBuf::from("/tmp/a b")))
        );
        for bad in ["", "snapshot", "pause now", "frobnicate", "PAUSE"] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_reach_the_loop_and_answers_come_back() {
        let dir = std::env::temp_dir().join(format!("vessel-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = ApiServer::bind(&path).unwrap();
        assert!(matches!(ApiServer::bind(&path), Err(ApiError::Exists(_))));
        let wake = server.wake_evt();
        let loop_thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 2 {
                std::thread::sleep(Duration::from_millis(5));
                if wake.read().is_err() {
                    continue;
                }
                while let Some(p) = server.next_request() {
                    let answer = match &p.request {
                        ApiRequest::Pause => Ok("paused".to_string()),
                        _ => Err("nope\nreally".to_string()),
                    };
                    seen.push(p.request.clone());
                    p.reply.send(answer).unwrap();
                }
            }
            drop(server);
            seen
        });
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"pause\nbogus\nresume\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(
            out,
            "OK paused\nERR unknown request \"bogus\"\nERR nope really\n"
        );
        let seen = loop_thread.join().unwrap();
        assert_eq!(seen, vec![ApiRequest::Pause, ApiRequest::Resume]);
        assert!(!path.exists(), "socket removed on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

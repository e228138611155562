//! A process's stdio on the host: the vsock streams attached for it before
//! it is created (see `proto/README.md`, "Stdio streams"), and the
//! threads that relay them to our stdio or to a terminal.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Context, Result};
use vessel_proto::client::AgentClient;
use vessel_proto::container::{ResizeTerminalRequest, StdioSpec, StdioStream};
use vessel_proto::AGENT_PORT;

use super::tty::{self, HostEnd};
use super::{relay, stdin_wanted};

/// How long to wait for the last output once the process has exited (a
/// child holding the stream open must not keep us forever).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams attached for one process (not yet created).
pub enum Attached {
    /// stdout and stderr apart; stdin when ours is worth relaying.
    Pipes {
        out: UnixStream,
        err: UnixStream,
        input: Option<UnixStream>,
    },
    /// One stream both ways (the guest pty).
    Terminal(UnixStream),
}

/// Output relays running; one message each on `done` when it ends.
pub struct Relays {
    done: mpsc::Receiver<()>,
    count: usize,
}

impl Relays {
    /// Waits until every output relay ended, or `timeout`.
    pub fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for _ in 0..self.count {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

fn attach_one(uds: &Path, id: &str, exec_id: Option<&str>, s: StdioStream) -> Result<UnixStream> {
    let stream = AgentClient::connect(uds, AGENT_PORT, Duration::from_secs(10))
        .and_then(|c| c.attach_stdio(id, exec_id, s))
        .with_ctx(|| format!("attaching {s:?}"))?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .ctx("setting up a stdio stream")?;
    Ok(stream)
}

impl Attached {
    /// Attaches the streams of process `exec_id` (None: init) of `id`.
    pub fn attach(uds: &Path, id: &str, exec_id: Option<&str>, terminal: bool) -> Result<Self> {
        if terminal {
            return Ok(Attached::Terminal(attach_one(
                uds,
                id,
                exec_id,
                StdioStream::Terminal,
            )?));
        }
        let out = attach_one(uds, id, exec_id, StdioStream::Stdout)?;
        let err = attach_one(uds, id, exec_id, StdioStream::Stderr)?;
        let input = if stdin_wanted() {
            Some(attach_one(uds, id, exec_id, StdioStream::Stdin)?)
        } else {
            None
        };
        Ok(Attached::Pipes { out, err, input })
    }

    /// What to tell the agent was attached.
    pub fn spec(&self) -> StdioSpec {
        match self {
            Attached::Pipes { input, .. } => StdioSpec {
                stdin: input.is_some(),
                stdout: true,
                stderr: true,
                terminal: false,
            },
            Attached::Terminal(_) => StdioSpec {
                terminal: true,
                ..StdioSpec::default()
            },
        }
    }

    /// Starts relaying (after the process was created): pipes to our
    /// stdin/stdout/stderr, a terminal to `end` (default: our stdio) with
    /// window size changes sent to the process (`initial`: the size the
    /// guest pty has).
    pub fn relay(
        self,
        end: Option<HostEnd>,
        initial: Option<(u16, u16)>,
        resize: Resizer,
    ) -> Result<Relays> {
        match self {
            Attached::Terminal(conn) => {
                let end = end.unwrap_or(HostEnd::Caller);
                let done = tty::relay(conn, end, initial, move |r, c| resize.resize(r, c))?;
                Ok(Relays { done, count: 1 })
            }
            Attached::Pipes { out, err, input } => {
                let (tx, rx) = mpsc::channel();
                let stdout = std::fs::File::from(
                    std::io::stdout()
                        .as_fd()
                        .try_clone_to_owned()
                        .ctx("duplicating stdout")?,
                );
                let stderr = std::fs::File::from(
                    std::io::stderr()
                        .as_fd()
                        .try_clone_to_owned()
                        .ctx("duplicating stderr")?,
                );
                for (src, dst) in [(out, stdout), (err, stderr)] {
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        relay(src, dst);
                        let _ = tx.send(());
                    });
                }
                if let Some(input) = input {
                    let stdin = std::fs::File::from(
                        std::io::stdin()
                            .as_fd()
                            .try_clone_to_owned()
                            .ctx("duplicating stdin")?,
                    );
                    // Dropping the stream at EOF closes the process's stdin.
                    std::thread::spawn(move || relay(stdin, input));
                }
                Ok(Relays { done: rx, count: 2 })
            }
        }
    }
}

/// Sends `ResizeTerminal` for one process (a connection per change: they
/// are rare).
pub struct Resizer {
    uds: PathBuf,
    id: String,
    exec_id: Option<String>,
}

impl Resizer {
    /// For process `exec_id` (None: init) of container `id`.
    pub fn new(uds: &Path, id: &str, exec_id: Option<&str>) -> Self {
        Resizer {
            uds: uds.to_path_buf(),
            id: id.into(),
            exec_id: exec_id.map(str::to_string),
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let r = AgentClient::connect(&self.uds, AGENT_PORT, Duration::from_secs(10)).and_then(
            |mut c| {
                c.resize_terminal(ResizeTerminalRequest {
                    id: self.id.clone(),
                    exec_id: self.exec_id.clone(),
                    rows,
                    cols,
                })
            },
        );
        if let Err(e) = r {
            tracing::debug!("{}: resizing the terminal: {e}", self.id);
        }
    }
}

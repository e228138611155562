//! Host-side client of the agent, through the VMM's hybrid vsock socket:
//! connect to the Unix socket, send `CONNECT <port>\n`, read `OK <port>\n`,
//! then exchange frames.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frame::{read_frame, read_frame_bytes, write_frame, write_frame_bytes, FrameError};
use crate::messages::{PingReply, Request, RequestBody, Response, ResponseBody};

/// Longest handshake answer line we accept.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM closed the connection without `OK`: nothing listens on the
    /// port in the guest yet (or the vsock driver is not up).
    #[error("the agent is not listening yet")]
    NotReady,
    /// The socket file does not exist or refuses connections.
    #[error("cannot connect to the VMM socket")]
    Connect(#[source] io::Error),
    /// Waiting for the agent took too long.
    #[error("timed out waiting for the agent")]
    Timeout,
    /// The peer said something that is not our protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Framing or decoding failed.
    #[error("frame")]
    Frame(#[from] FrameError),
    /// I/O on the socket failed.
    #[error("i/o error")]
    Io(#[from] io::Error),
}

/// A connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
}

fn read_line(stream: &mut UnixStream) -> Result<Option<String>, ClientError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HANDSHAKE_LINE {
                    return Err(ClientError::Protocol("handshake line too long".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout)
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ClientError::Protocol("handshake line is not UTF-8".into()))
}

impl AgentClient {
    /// Connects to `port` in the guest through the VMM socket at `uds_path`.
    /// `timeout` bounds the handshake and every later read and write.
    pub fn connect(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let mut stream = UnixStream::connect(uds_path).map_err(ClientError::Connect)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        if let Err(e) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
            // The VMM drops clients while the guest cannot take connections.
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::NotReady,
                _ => ClientError::Io(e),
            });
        }
        match read_line(&mut stream)? {
            None => Err(ClientError::NotReady),
            Some(line) => {
                let ok = line
                    .strip_prefix("OK ")
                    .map(|p| p.trim().parse::<u32>().is_ok())
                    .unwrap_or(false);
                if ok {
                    Ok(AgentClient { stream, next_id: 1 })
                } else {
                    Err(ClientError::Protocol(format!(
                        "unexpected handshake answer {line:?}"
                    )))
                }
            }
        }
    }

    /// Retries [`AgentClient::connect`] every 20 ms while the socket is
    /// missing or the agent does not listen yet, up to `timeout` in all.
    pub fn wait_ready(
        uds_path: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            match Self::connect(uds_path, port, left.max(Duration::from_millis(100))) {
                Ok(c) => {
                    c.stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    c.stream.set_write_timeout(Some(Duration::from_secs(30)))?;
                    return Ok(c);
                }
                Err(ClientError::NotReady) | Err(ClientError::Connect(_)) => {}
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &Request { id, body })?;
        let resp: Response = read_frame(&mut self.stream)?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                resp.id
            )));
        }
        Ok(resp.body)
    }

    /// Sends a raw JSON frame body (for tests of the agent's input checks).
    pub fn call_raw_json(&mut self, json: &str) -> Result<ResponseBody, ClientError> {
        write_frame_bytes(&mut self.stream, json.as_bytes())?;
        let body = read_frame_bytes(&mut self.stream)?;
        let resp: Response = serde_json::from_slice(&body).map_err(FrameError::Json)?;
        Ok(resp.body)
    }

    /// `Ping`.
    pub fn ping(&mut self) -> Result<PingReply, ClientError> {
        match self.call(RequestBody::Ping)? {
            ResponseBody::Pong(p) => Ok(p),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Ping: {other:?}"
            ))),
        }
    }

    /// `Shutdown`: the VM powers off after answering.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        match self.call(RequestBody::Shutdown)? {
            ResponseBody::ShuttingDown => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to Shutdown: {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn server(answer: &'static [u8]) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = std::env::temp_dir().join(format!(
            "vessel-proto-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = vec![0u8; 13];
            s.read_exact(&mut got).unwrap();
            s.write_all(answer).unwrap();
            if answer.starts_with(b"OK") {
                let req: Request = read_frame(&mut s).unwrap();
                write_frame(
                    &mut s,
                    &Response {
                        id: req.id,
                        body: ResponseBody::Pong(PingReply {
                            agent_version: "t".into(),
                            ..Default::default()
                        }),
                    },
                )
                .unwrap();
            }
            got
        });
        (path, h)
    }

    #[test]
    fn handshake_ok_then_ping() {
        let (path, h) = server(b"OK 1073741824\n");
        let mut c = AgentClient::connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(c.ping().unwrap().agent_version, "t");
        assert_eq!(h.join().unwrap(), b"CONNECT 1024\n");
    }

    #[test]
    fn closed_without_ok_is_not_ready() {
        let (path, h) = server(b"");
        let r = AgentClient::connect(&path, 1024, Duration::from_secs(5));
        assert!(matches!(r, Err(ClientError::NotReady)), "{r:?}");
        h.join().unwrap();
    }

    #[test]
    fn garbage_answer_is_a_protocol_error() {
        let (path, h) = server(b"HELLO\n");
        let r = AgentClient::connect(&path, 1024, Duration::from_secs(5));
        assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
        h.join().unwrap();
    }

    #[test]
    fn missing_socket_times_out() {
        let r = AgentClient::wait_ready(
            Path::new("/nonexistent/x.sock"),
            1024,
            Duration::from_millis(100),
        );
        assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
    }
}

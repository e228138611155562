//! Length-prefixed JSON frames.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body accepted or sent (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// Errors of reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The announced length is over [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    /// A frame with an empty body.
    #[error("empty frame")]
    Empty,
    /// The body is not the JSON we expect.
    #[error("invalid frame body")]
    Json(#[source] serde_json::Error),
    /// An I/O error.
    #[error("i/o error")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// True when the stream is no longer aligned on a frame boundary (or
    /// gone), so the connection must be closed rather than answered.
    pub fn is_desync(&self) -> bool {
        !matches!(self, FrameError::Json(_))
    }
}

/// Reads exactly `buf.len()` bytes; returns how many arrived before EOF.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one raw frame body.
pub fn read_frame_bytes<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    match read_full(r, &mut header)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        got => return Err(FrameError::Truncated { expected: 4, got }),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got != len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(body)
}

/// Reads and decodes one frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let body = read_frame_bytes(r)?;
    serde_json::from_slice(&body).map_err(FrameError::Json)
}

/// Writes a raw frame body (one `write_all` of header and body together).
pub fn write_frame_bytes<W: Write>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Encodes and writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Json)?;
    write_frame_bytes(w, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Request, RequestBody};
    use std::io::Cursor;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let req = Request {
            id: 9,
            body: RequestBody::Ping,
        };
        write_frame(&mut buf, &req).unwrap();
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        let back: Request = read_frame(&mut Cursor::new(buf)).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn closed_between_frames() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(Vec::<u8>::new()));
        assert!(matches!(r, Err(FrameError::Closed)));
    }

    #[test]
    fn truncated_header() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(vec![0u8, 0]));
        assert!(matches!(
            r,
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
    }

    #[test]
    fn truncated_body() {
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{\"id\"");
        let r: Result<Request, _> = read_frame(&mut Cursor::new(data));
        assert!(matches!(
            r,
            Err(FrameError::Truncated {
                expected: 10,
                got: 5
            })
        ));
    }

    #[test]
    fn oversized_is_rejected_without_reading_the_body() {
        let data = u32::MAX.to_be_bytes().to_vec();
        let r: Result<Request, _> = read_frame(&mut Cursor::new(data));
        assert!(matches!(r, Err(FrameError::TooLarge(n)) if n == u32::MAX as usize));
        let big = vec![b'x'; MAX_FRAME + 1];
        assert!(matches!(
            write_frame_bytes(&mut Vec::new(), &big),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn empty_and_invalid_json() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(0u32.to_be_bytes().to_vec()));
        assert!(matches!(r, Err(FrameError::Empty)));
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{{{");
        let r: Result<Request, _> = read_frame(&mut Cursor::new(data));
        let e = r.unwrap_err();
        assert!(matches!(e, FrameError::Json(_)));
        assert!(!e.is_desync());
    }
}

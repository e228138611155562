//! Length-prefixed JSON frames.
//!
//! A frame is a 4-byte big-endian length `N` followed by `N` bytes of JSON
//! (one message), with `0 < N <= MAX_FRAME`. The length is checked before
//! the body buffer is allocated, so a hostile or corrupted peer cannot make
//! the reader allocate more than [`MAX_FRAME`] bytes.

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
        /// Bytes the frame (header or body) needed.
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
    /// True when the stream is no longer aligned on a frame boundary (or is
    /// gone), so the connection must be closed. An empty frame or a body
    /// that is not valid JSON leaves the stream in step: the reader can
    /// answer with an error and read the next frame.
    pub fn is_desync(&self) -> bool {
        !matches!(self, FrameError::Json(_) | FrameError::Empty)
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

/// Reads one raw frame body without decoding it.
///
/// Errors: [`FrameError::Closed`] at a clean EOF between frames,
/// [`FrameError::Truncated`] at an EOF inside a header or body,
/// [`FrameError::TooLarge`] (nothing allocated, the body left unread),
/// [`FrameError::Empty`], [`FrameError::Io`].
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

/// Writes a raw frame body: header and body in one `write_all`, then a flush.
pub fn write_frame_bytes<W: Write>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    // MAX_FRAME fits in u32, checked above.
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

    fn req(id: u64) -> Request {
        Request {
            id,
            body: RequestBody::Ping,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &req(9)).unwrap();
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        assert_eq!(&buf[4..], br#"{"id":9,"body":"Ping"}"#);
        let back: Request = read_frame(&mut Cursor::new(buf)).unwrap();
        assert_eq!(back, req(9));
    }

    #[test]
    fn several_frames_in_one_stream() {
        let mut buf = Vec::new();
        for id in 1..=3 {
            write_frame(&mut buf, &req(id)).unwrap();
        }
        let mut cur = Cursor::new(buf);
        for id in 1..=3 {
            assert_eq!(read_frame::<_, Request>(&mut cur).unwrap().id, id);
        }
        assert!(matches!(
            read_frame::<_, Request>(&mut cur),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn max_frame_is_accepted() {
        let body = vec![b' '; MAX_FRAME];
        let mut buf = Vec::new();
        write_frame_bytes(&mut buf, &body).unwrap();
        let back = read_frame_bytes(&mut Cursor::new(buf)).unwrap();
        assert_eq!(back.len(), MAX_FRAME);
    }

    #[test]
    fn closed_between_frames() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(Vec::<u8>::new()));
        assert!(matches!(r, Err(FrameError::Closed)));
    }

    #[test]
    fn truncated_header() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(vec![0u8, 0]));
        let e = r.unwrap_err();
        assert!(matches!(
            e,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
        assert!(e.is_desync());
    }

    #[test]
    fn truncated_body() {
        let mut data = 10u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{\"id\"");
        let r: Result<Request, _> = read_frame(&mut Cursor::new(data));
        let e = r.unwrap_err();
        assert!(matches!(
            e,
            FrameError::Truncated {
                expected: 10,
                got: 5
            }
        ));
        assert!(e.is_desync());
    }

    #[test]
    fn oversized_is_rejected_without_allocating_or_reading_the_body() {
        // A header announcing 4 GiB, followed by some bytes: the length is
        // refused before a buffer is allocated or a body byte is read.
        let mut data = u32::MAX.to_be_bytes().to_vec();
        data.extend_from_slice(b"{}");
        let mut cur = Cursor::new(data);
        let r: Result<Request, _> = read_frame(&mut cur);
        let e = r.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(n) if n == u32::MAX as usize));
        assert!(e.is_desync());
        assert_eq!(cur.position(), 4);
        // One byte over the limit is refused too, on both sides.
        let over = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes().to_vec();
        let r: Result<Request, _> = read_frame(&mut Cursor::new(over));
        assert!(matches!(r, Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1));
        let big = vec![b'x'; MAX_FRAME + 1];
        let mut out = Vec::new();
        assert!(matches!(
            write_frame_bytes(&mut out, &big),
            Err(FrameError::TooLarge(_))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn empty_frame() {
        let r: Result<Request, _> = read_frame(&mut Cursor::new(0u32.to_be_bytes().to_vec()));
        let e = r.unwrap_err();
        assert!(matches!(e, FrameError::Empty));
        assert!(!e.is_desync());
        assert!(matches!(
            write_frame_bytes(&mut Vec::new(), b""),
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn invalid_json() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"{{{");
        write_frame(&mut data, &req(2)).unwrap();
        let mut cur = Cursor::new(data);
        let e = read_frame::<_, Request>(&mut cur).unwrap_err();
        assert!(matches!(e, FrameError::Json(_)));
        assert!(!e.is_desync());
        // The stream is still in step: the next frame reads fine.
        assert_eq!(read_frame::<_, Request>(&mut cur).unwrap().id, 2);
    }
}

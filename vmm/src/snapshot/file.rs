//! The state file container: a small binary header, a JSON payload and a
//! SHA-256 over both, so that a file from an incompatible build or a
//! corrupt/truncated file is refused with a clear error before anything in
//! it is interpreted.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "VSSLSNAP"
//! 8       2     format major version (LE)
//! 10      2     format minor version (LE)
//! 12      2     length B of the build id (LE)
//! 14      B     build id (UTF-8), must equal this build's BUILD_ID
//! 14+B    8     length P of the payload (LE)
//! 22+B    P     payload: JSON of the state
//! 22+B+P  32    SHA-256 of every byte before it
//! ```

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"VSSLSNAP";
/// Format major version: a file with another major is refused.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version: a file with a newer minor is refused (an older
/// minor is read: minor versions only add fields with defaults).
pub const FORMAT_MINOR: u16 = 0;
/// What a snapshot must have been written by to be restored by this build:
/// device models and the state layout are only guaranteed to match within
/// one release of the VMM.
pub const BUILD_ID: &str = concat!("vessel-vmm/", env!("CARGO_PKG_VERSION"), "/x86_64");
/// Largest state file we read (the real ones are tens of KiB per vCPU).
pub const MAX_STATE_FILE: u64 = 64 << 20;

const DIGEST_LEN: usize = 32;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read or written.
    #[error("cannot access state file {path}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a vessel state file.
    #[error("not a vessel snapshot state file (bad magic)")]
    BadMagic,
    /// The file ends before its declared contents.
    #[error("state file is truncated ({len} bytes)")]
    Truncated {
        /// Actual length.
        len: usize,
    },
    /// The file is larger than its declared contents or than we accept.
    #[error("state file has an invalid length ({len} bytes)")]
    BadLength {
        /// Actual length.
        len: u64,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("state file checksum mismatch: the file is corrupt")]
    Checksum,
    /// The format version is not one this build reads.
    #[error("snapshot format version {major}.{minor} is not supported (this build reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR})")]
    Version {
        /// Major found.
        major: u16,
        /// Minor found.
        minor: u16,
    },
    /// Written by an incompatible build.
    #[error("snapshot was written by {found:?}, this is {BUILD_ID:?}: incompatible build")]
    Build {
        /// Build id found.
        found: String,
    },
    /// The payload does not decode.
    #[error("state file payload does not decode")]
    Payload(#[source] serde_json::Error),
}

/// Encodes `state` into the container format.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, serde_json::Error> {
    encode_with(state, FORMAT_MAJOR, FORMAT_MINOR, BUILD_ID)
}

/// Encodes `state` with an explicit version and build id: for tests and
/// tools that need files this build must refuse.
pub fn encode_with<T: Serialize>(
    state: &T,
    major: u16,
    minor: u16,
    build: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(state)?;
    let build = build.as_bytes();
    let build_len = u16::try_from(build.len()).unwrap_or(u16::MAX);
    let build = &build[..usize::from(build_len)];
    let mut out = Vec::with_capacity(payload.len() + 64 + build.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&major.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&build_len.to_le_bytes());
    out.extend_from_slice(build);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// A cursor that reports truncation instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(StateFileError::Truncated {
                len: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, StateFileError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, StateFileError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes a state file image: checks magic, length, checksum, version and
/// build id, in that order, then parses the payload.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, StateFileError> {
    let mut r = Reader { buf, pos: 0 };
    if buf.len() < MAGIC.len() || r.take(MAGIC.len())? != MAGIC {
        return Err(StateFileError::BadMagic);
    }
    let major = r.u16()?;
    let minor = r.u16()?;
    let build_len = r.u16()?;
    let build = r.take(usize::from(build_len))?;
    let payload_len = r.u64()?;
    let payload_len =
        usize::try_from(payload_len).map_err(|_| StateFileError::BadLength { len: payload_len })?;
    let payload = r.take(payload_len)?;
    let body_end = r.pos;
    let digest = r.take(DIGEST_LEN)?;
    if r.pos != buf.len() {
        return Err(StateFileError::BadLength {
            len: buf.len() as u64,
        });
    }
    if Sha256::digest(&buf[..body_end]).as_slice() != digest {
        return Err(StateFileError::Checksum);
    }
    if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
        return Err(StateFileError::Version { major, minor });
    }
    if build != BUILD_ID.as_bytes() {
        return Err(StateFileError::Build {
            found: String::from_utf8_lossy(build).into_owned(),
        });
    }
    serde_json::from_slice(payload).map_err(StateFileError::Payload)
}

/// Writes `state` to `path` atomically: a temporary file in the same
/// directory, fsync, rename.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = encode(state).map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Reads and checks the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_STATE_FILE {
        return Err(StateFileError::BadLength { len });
    }
    let buf = std::fs::read(path).map_err(io)?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
        c: Option<String>,
    }

    fn sample() -> S {
        S {
            a: 7,
            b: vec![1, 2, 3, 255],
            c: Some("x".into()),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(decode::<S>(&bytes).unwrap(), sample());
    }

    #[test]
    fn file_round_trip() {
        let dir = std::env::temp_dir().join(format!("vessel-statefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vmstate");
        write(&p, &sample()).unwrap();
        assert_eq!(read::<S>(&p).unwrap(), sample());
        assert!(!p.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(read::<S>(&p), Err(StateFileError::Io { .. })));
    }

    #[test]
    fn wrong_version_is_rejected() {
        for (major, minor) in [
            (FORMAT_MAJOR + 1, 0),
            (0, 0),
            (FORMAT_MAJOR, FORMAT_MINOR + 1),
        ] {
            let bytes = encode_with(&sample(), major, minor, BUILD_ID).unwrap();
            let e = decode::<S>(&bytes).unwrap_err();
            assert!(matches!(e, StateFileError::Version { .. }), "{e}");
            assert!(e.to_string().contains("not supported"), "{e}");
        }
    }

    #[test]
    fn other_build_is_rejected() {
        let bytes = encode_with(&sample(), FORMAT_MAJOR, 0, "vessel-vmm/9.9.9/x86_64").unwrap();
        let e = decode::<S>(&bytes).unwrap_err();
        assert!(e.to_string().contains("incompatible build"), "{e}");
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(decode::<S>(&b).is_err(), "flip at {i} accepted");
        }
        // A flip in the payload is caught by the checksum.
        let mut b = bytes.clone();
        let at = bytes.len() - DIGEST_LEN - 3;
        b[at] ^= 1;
        assert!(matches!(decode::<S>(&b), Err(StateFileError::Checksum)));
    }

    #[test]
    fn truncated_or_extended_file_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            let e = decode::<S>(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    e,
                    StateFileError::Truncated { .. } | StateFileError::BadMagic
                ),
                "len {len}: {e}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<S>(&longer),
            Err(StateFileError::BadLength { .. })
        ));
        // A huge declared payload length is a truncation, not an allocation.
        let mut huge = bytes[..14 + BUILD_ID.len()].to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<S>(&huge).is_err());
    }

    #[test]
    fn valid_container_with_bad_payload() {
        #[derive(Serialize)]
        struct Other {
            z: bool,
        }
        let bytes = encode(&Other { z: true }).unwrap();
        assert!(matches!(
            decode::<S>(&bytes),
            Err(StateFileError::Payload(_))
        ));
    }
}

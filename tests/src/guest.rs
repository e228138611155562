//! Helpers for tests that drive the guest agent directly (containers
//! created over the agent protocol, without the `vessel` CLI): stdio
//! streams, error answers and guest files.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use vessel_proto::client::{AgentClient, ClientError};
use vessel_proto::container::{CreateContainerRequest, RootfsSource, StdioSpec, StdioStream};
use vessel_proto::{ErrorCode, ReadFileRequest};

use crate::VmProcess;

/// A `CreateContainer` of `id` whose root file system is the guest
/// directory `rootfs` (a share the test mounted).
pub fn create_req(id: &str, rootfs: &str, spec: Value, stdio: StdioSpec) -> CreateContainerRequest {
    CreateContainerRequest {
        id: id.into(),
        rootfs: RootfsSource {
            tag: None,
            path: rootfs.into(),
        },
        spec,
        stdio,
    }
}

/// Attaches one stdio stream of container `id` (or of its exec `exec`),
/// with a read timeout of five minutes.
pub fn attach(vm: &VmProcess, id: &str, exec: Option<&str>, s: StdioStream) -> UnixStream {
    let stream = vm
        .connect()
        .expect("connect for stdio")
        .attach_stdio(id, exec, s)
        .unwrap_or_else(|e| panic!("attach {s:?} of {id}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("set_read_timeout");
    stream
}

/// Reads a stream to EOF in a thread.
pub fn drain(mut s: UnixStream) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Reads from `s` until what was read contains `needle`; returns it all.
pub fn read_until(s: &mut UnixStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match s.read(&mut buf) {
            Ok(0) => panic!("EOF before {needle:?}: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading for {needle:?}: {e}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The code and message of an error answer; panics on anything else.
pub fn remote_code(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Remote(e)) => (e.code, e.message),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

/// The first 6 KiB of a guest file (enough for /proc and cgroup files).
pub fn read_guest(c: &mut AgentClient, path: &str) -> Result<String, ClientError> {
    c.read_file(ReadFileRequest {
        path: path.into(),
        max_len: 6 * 1024,
        offset: 0,
        discard: false,
    })
    .map(|d| String::from_utf8_lossy(&d.data).into_owned())
}

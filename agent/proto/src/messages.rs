//! Request and response types.

use serde::{Deserialize, Serialize};

/// A request from the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// What the host asks. Serialized externally tagged: `{"Ping":null}` or `"Ping"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Liveness and identity: agent version and guest uname.
    Ping,
    /// Sync filesystems and power the VM off (reboot, which ends the VMM).
    Shutdown,
}

/// A response from the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered (0 when the request could not be parsed).
    pub id: u64,
    /// The answer.
    pub body: ResponseBody,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// Answer to `Ping`.
    Pong(PingReply),
    /// Answer to `Shutdown`; the VM stops right after.
    ShuttingDown,
    /// The request failed or was not understood.
    Error(ErrorReply),
}

/// Error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame or request could not be decoded.
    InvalidRequest,
    /// The request type is unknown to this agent.
    Unsupported,
    /// The operation failed inside the guest.
    Internal,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Class of error.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

/// The guest's `uname(2)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uname {
    /// e.g. "Linux".
    pub sysname: String,
    /// Host name.
    pub nodename: String,
    /// Kernel release.
    pub release: String,
    /// Kernel version string.
    pub version: String,
    /// Machine, e.g. "x86_64".
    pub machine: String,
}

/// Answer to `Ping`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// `vessel-agent` version.
    pub agent_version: String,
    /// Protocol version the agent speaks.
    pub protocol_version: u32,
    /// The guest's uname.
    pub uname: Uname,
    /// Guest CLOCK_BOOTTIME (ms) when the agent started as /init.
    #[serde(default)]
    pub init_started_ms: Option<u64>,
    /// Guest CLOCK_BOOTTIME (ms) when the agent started listening.
    #[serde(default)]
    pub listening_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request {
            id: 1,
            body: RequestBody::Ping,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":1,"body":"Ping"}"#
        );
        let e = Response {
            id: 2,
            body: ResponseBody::Error(ErrorReply {
                code: ErrorCode::Unsupported,
                message: "x".into(),
            }),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
    }

    #[test]
    fn unknown_request_type_is_a_decode_error() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"body":{"Frobnicate":{}}}"#).is_err());
    }
}

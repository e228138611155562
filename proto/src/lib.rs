//! vessel-proto: the host <-> guest agent protocol.
//!
//! Both sides use these types: the host side (VMM launcher, CLI, shim) and
//! `vessel-agent` inside the guest. The crate is std + serde only, so the
//! host does not pull in the agent's guest-only dependencies.
//!
//! # Framing
//!
//! Every message is a frame: a 4-byte big-endian length `N` followed by `N`
//! bytes of JSON (see [`frame`]). Frames larger than [`MAX_FRAME`] are
//! rejected before anything is allocated. See README.md in this crate for why
//! this framing was chosen over ttrpc/protobuf.
//!
//! # Messages
//!
//! The host sends [`Request`]s and the agent answers each with a [`Response`]
//! carrying the same id (see [`messages`] for the JSON and the rules for
//! adding requests). The agent decodes with [`decode_request`], which turns
//! an unknown request type into an `Error` reply instead of a failure.
//!
//! # Host side
//!
//! [`client::AgentClient`] connects through the VMM's hybrid vsock socket
//! (`CONNECT <port>\n` / `OK <port>\n`) and makes calls.

pub mod client;
pub mod container;
pub mod frame;
pub mod messages;
pub mod network;
pub mod resources;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME};
pub use messages::*;

/// vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Host vsock port the agent connects to once it listens on [`AGENT_PORT`]:
/// a host waiting for the agent listens on `<vsock uds>_1025` instead of
/// polling, because every refused connection attempt costs guest kernel time.
pub const READY_PORT: u32 = 1025;
/// The host's vsock context id.
pub const HOST_CID: u32 = 2;
/// Protocol version; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

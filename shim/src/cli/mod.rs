//! The runc-compatible command line's flags and output: each command turns
//! runc's flags into a call of the runtime library
//! ([`vessel_shim::runtime`]), which holds the lifecycle for every front
//! end.

pub mod events;
pub mod exec;
pub mod features;
pub mod resources;

//! vessel's host side: the runc-compatible `vessel` command's building
//! blocks (state store, configuration, runc-style logging, default spec).

pub mod binds;
pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod log;
pub mod netns;
pub mod sandbox;
pub mod signal;
pub mod spec;
pub mod state;

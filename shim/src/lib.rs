//! vessel's host side: the container lifecycle ([`runtime`]) and its
//! building blocks (state store, configuration, sandboxes and templates,
//! host bind mounts, runc-style logging, default spec). The `vessel` CLI
//! is a thin front end over it.

pub mod binds;
pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod hooks;
pub mod log;
pub mod netns;
pub mod network;
pub mod runtime;
pub mod sandbox;
pub mod signal;
pub mod spec;
pub mod state;

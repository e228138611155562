//! vessel-vmm: the virtual machine monitor of vessel.
//!
//! One process runs one microVM: KVM vCPU threads, guest memory, a 8250
//! UART, an i8042 (for reboot) and virtio-mmio devices (vsock, virtio-fs,
//! virtio-net, balloon), driven by one
//! event-loop thread. See `builder` for the boot path and the restore
//! path, `snapshot` for the snapshot format, `api` for the control socket.

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod host;
pub mod profiler;
pub mod seccomp;
pub mod snapshot;
pub mod timeline;
pub mod vstate;

//! Emulated devices: legacy PIO devices and virtio-mmio devices.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

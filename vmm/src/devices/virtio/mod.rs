//! virtio devices over the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] exposes it to
//! the guest as a virtio-mmio register window. Queue notifications reach the
//! device through ioeventfds (one per queue, registered with KVM by the
//! builder); the device signals the guest through an [`Interrupt`] whose
//! eventfd is an irqfd.

pub mod balloon;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// `VIRTIO_F_VERSION_1`: we only speak modern (non-legacy) virtio.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device ids from the virtio specification.
pub mod device_type {
    /// virtio-vsock
    pub const VSOCK: u32 = 19;
    /// virtio-fs
    pub const FS: u32 = 26;
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up queues the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueue(String),
    /// The device could not set up its backend.
    #[error("device backend: {0}")]
    Backend(#[source] std::io::Error),
}

/// The interrupt line of one virtio-mmio device: an irqfd plus the
/// InterruptStatus register the guest reads and acknowledges.
#[derive(Debug)]
pub struct Interrupt {
    irq_evt: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    /// Wraps an eventfd that the builder registered with KVM as an irqfd.
    pub fn new(irq_evt: EventFd) -> Self {
        Interrupt {
            irq_evt,
            status: AtomicU32::new(0),
        }
    }

    /// The eventfd the builder registers as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq_evt
    }

    /// Sets `bit` in InterruptStatus and raises the line.
    pub fn trigger(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus (snapshot restore) without raising the line.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A virtio device as seen by the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver acknowledged (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads from the device configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device configuration space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, signalled (by KVM ioeventfd or by the transport)
    /// when the driver writes that queue's index to QueueNotify.
    fn queue_events(&self) -> &[EventFd];
    /// DRIVER_OK: the device takes over the validated queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver wrote 0 to Status: drop queues and connections. Returns
    /// false if the device cannot be reset (the transport then sets
    /// DEVICE_NEEDS_RESET).
    fn reset(&mut self) -> bool;
    /// True once activated.
    fn is_activated(&self) -> bool;
}

/// Copies `config[offset..]` into `data` for a driver read of a device's
/// configuration space; bytes beyond `config` (or an offset that does not
/// fit) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Whether the driver wants an interrupt for new used buffers on `q`.
/// Without VIRTIO_F_EVENT_IDX that is the avail ring's NO_INTERRUPT flag.
pub fn guest_wants_interrupt(mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
    // needs_notification() also orders our used ring writes before the
    // flag read, so a driver re-enabling interrupts is never missed.
    if !q.needs_notification(mem).unwrap_or(true) {
        return false;
    }
    let flags = mem
        .read_obj::<u16>(GuestAddress(q.avail_ring()))
        .map(u16::from_le)
        .unwrap_or(0);
    u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
}

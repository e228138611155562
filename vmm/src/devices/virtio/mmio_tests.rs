//! More tests of the virtio-mmio register window against a dummy device:
//! spec-ordered status transitions, queue set-up rules, notify, reset.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};

const FEATURE_X: u64 = 1 << 3;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

struct Dummy {
    acked: u64,
    activated: bool,
    fail_activation: bool,
    refuse_reset: bool,
    resets: u32,
    evts: Vec<EventFd>,
    config: [u8; 8],
    config_writes: Vec<(u64, Vec<u8>)>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn avail_features(&self) -> u64 {
        FEATURE_X
    }
    fn set_acked_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation || queues.len() != 2 {
            return Err(ActivateError::BadQueue("refused".into()));
        }
        self.activated = true;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        if self.refuse_reset {
            return false;
        }
        self.activated = false;
        true
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
}

fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = Arc::new(Mutex::new(Dummy {
        acked: 0,
        activated: false,
        fail_activation: false,
        refuse_reset: false,
        resets: 0,
        evts: vec![evt(), evt()],
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        config_writes: Vec::new(),
    }));
    let irq = Arc::new(Interrupt::new(evt()));
    let d: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    (MmioTransport::new(mem, d, irq), dev)
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn ack_features(t: &mut MmioTransport, features: u64) {
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
}

fn negotiate(t: &mut MmioTransport) {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    ack_features(t, VERSION_1 | FEATURE_X);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, i: u32, base: u32) {
    w(t, reg::QUEUE_SEL, i);
    w(t, reg::QUEUE_NUM, 16);
    w(t, reg::QUEUE_DESC_LOW, base);
    w(t, reg::QUEUE_DESC_HIGH, 0);
    w(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
    w(t, reg::QUEUE_DRIVER_HIGH, 0);
    w(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
    w(t, reg::QUEUE_DEVICE_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _) = setup();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
    assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
    assert_eq!(r(&mut t, 0x0f0), 0, "unknown register reads 0");
}

#[test]
fn narrow_register_accesses_are_ignored() {
    let (mut t, _) = setup();
    let mut narrow = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut narrow);
    assert_eq!(narrow, [0, 0]);
    let mut wide = [0xffu8; 8];
    t.read(reg::MAGIC_VALUE, &mut wide);
    assert_eq!(wide, [0; 8]);
    t.write(reg::STATUS, &[1]);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn config_space_any_width() {
    let (mut t, dev) = setup();
    let mut cfg = [0u8; 2];
    t.read(reg::CONFIG + 2, &mut cfg);
    assert_eq!(cfg, [3, 4]);
    let mut one = [0u8; 1];
    t.read(reg::CONFIG + 7, &mut one);
    assert_eq!(one, [8]);
    // Writes before DRIVER are ignored, after it they reach the device.
    t.write(reg::CONFIG, &[9]);
    assert!(dev.lock().unwrap().config_writes.is_empty());
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    t.write(reg::CONFIG + 1, &[9, 10]);
    assert_eq!(dev.lock().unwrap().config_writes, vec![(1, vec![9, 10])]);
}

#[test]
fn feature_negotiation_and_activation() {
    let (mut t, dev) = setup();
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 offered");
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), FEATURE_X as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    negotiate(&mut t);
    assert_ne!(t.status() & status::FEATURES_OK, 0);
    assert_eq!(dev.lock().unwrap().acked, VERSION_1 | FEATURE_X);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert!(dev.lock().unwrap().activated);
    assert_eq!(t.status(), ALL_OK);
    // Features and queue registers are frozen after DRIVER_OK.
    ack_features(&mut t, VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_READY, 0);
    w(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    assert_eq!(t.queue(0).unwrap().size(), 16);
}

#[test]
fn driver_features_only_during_negotiation() {
    let (mut t, dev) = setup();
    // Before DRIVER: ignored, so FEATURES_OK is refused later (no VERSION_1).
    ack_features(&mut t, VERSION_1);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status() & status::FEATURES_OK, 0);
    assert_eq!(dev.lock().unwrap().acked, 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let (mut t, _) = setup();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    ack_features(&mut t, FEATURE_X);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status() & status::FEATURES_OK, 0);
}

#[test]
fn unoffered_features_are_refused() {
    let (mut t, _) = setup();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    ack_features(&mut t, VERSION_1 | (1 << 5));
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status() & status::FEATURES_OK, 0);
}

#[test]
fn illegal_status_orders_are_refused() {
    let (mut t, dev) = setup();
    w(&mut t, reg::STATUS, status::DRIVER_OK);
    assert_eq!(t.status(), 0);
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(t.status(), 0);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    // Two steps at once.
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.status(), status::ACKNOWLEDGE);
    // DRIVER_OK without FEATURES_OK.
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
    // Clearing bits without a reset.
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
    // The driver may not set DEVICE_NEEDS_RESET.
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
    );
    assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert!(!dev.lock().unwrap().activated);
    // FAILED is accepted at any time, and sticks until reset.
    w(&mut t, reg::STATUS, status::FAILED);
    assert_eq!(
        t.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_ne!(t.status() & status::FAILED, 0);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
}

#[test]
fn queue_registers_need_features_ok() {
    let (mut t, _) = setup();
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 8);
    w(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.queue(0).unwrap().size(), 16);
}

#[test]
fn queue_set_up_and_invalid_sizes_and_indices() {
    let (mut t, _) = setup();
    negotiate(&mut t);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
    w(&mut t, reg::QUEUE_NUM, 8);
    assert_eq!(t.queue(1).unwrap().size(), 8);
    w(&mut t, reg::QUEUE_NUM, 12); // not a power of two
    w(&mut t, reg::QUEUE_NUM, 32); // over the maximum
    w(&mut t, reg::QUEUE_NUM, 0);
    w(&mut t, reg::QUEUE_NUM, 0x1_0000 | 4); // does not fit in 16 bits
    assert_eq!(t.queue(1).unwrap().size(), 8);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x3000);
    w(&mut t, reg::QUEUE_DESC_HIGH, 0x1);
    assert_eq!(t.queue(1).unwrap().desc_table(), 0x1_0000_3000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x4000);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x5000);
    assert_eq!(t.queue(1).unwrap().avail_ring(), 0x4000);
    assert_eq!(t.queue(1).unwrap().used_ring(), 0x5000);
    // No such queue: reads 0, writes go nowhere.
    w(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    w(&mut t, reg::QUEUE_NUM, 8);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::QUEUE_SEL, u32::MAX);
    w(&mut t, reg::QUEUE_READY, 1);
    assert!(!t.queue(0).unwrap().ready());
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let (mut t, dev) = setup();
    // Before DRIVER_OK nothing is signalled.
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert!(dev.lock().unwrap().evts[1].read().is_err());
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(dev.lock().unwrap().evts[1].read().unwrap(), 1);
    assert!(dev.lock().unwrap().evts[0].read().is_err());
    // Invalid indices are ignored.
    w(&mut t, reg::QUEUE_NOTIFY, 2);
    w(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, _) = setup();
    t.interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    t.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG).unwrap();
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
    w(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let (mut t, dev) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    t.interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    w(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
    assert!(!dev.lock().unwrap().activated);
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.queue(0).unwrap().size(), 16);
    // The driver can start over.
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert!(dev.lock().unwrap().activated);
}

#[test]
fn reset_refused_by_the_device_sets_needs_reset() {
    let (mut t, dev) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    dev.lock().unwrap().refuse_reset = true;
    w(&mut t, reg::STATUS, 0);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_outside_memory_fails_activation() {
    let (mut t, dev) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x7fff_0000); // beyond the 1 MiB of guest memory
    w(&mut t, reg::STATUS, ALL_OK);
    assert!(!dev.lock().unwrap().activated);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    w(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    // Queue registers stay frozen until the driver resets.
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x30000);
    assert_eq!(t.queue(1).unwrap().desc_table(), 0x7fff_0000);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
}

#[test]
fn misaligned_queue_addresses_are_ignored() {
    let (mut t, _) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x30008); // descriptor table needs 16-byte alignment
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x31001); // avail ring: 2 bytes
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x32002); // used ring: 4 bytes
    let q = t.queue(1).unwrap();
    assert_eq!(q.desc_table(), 0x20000);
    assert_eq!(q.avail_ring(), 0x21000);
    assert_eq!(q.used_ring(), 0x22000);
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let (mut t, dev) = setup();
    dev.lock().unwrap().fail_activation = true;
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x20000);
    w(&mut t, reg::STATUS, ALL_OK);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(t.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
}

#[test]
fn shared_memory_regions() {
    let (mut t, _) = setup();
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r(&mut t, reg::SHM_BASE_LOW), 0);
    t.set_shm_regions(vec![ShmRegion {
        base: 0x1_0000_0000,
        len: 0x200_0000,
    }]);
    assert_eq!(r(&mut t, reg::SHM_BASE_HIGH), 1);
    assert_eq!(r(&mut t, reg::SHM_BASE_LOW), 0);
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), 0x200_0000);
    assert_eq!(r(&mut t, reg::SHM_LEN_HIGH), 0);
    w(&mut t, reg::SHM_SEL, 1);
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
}

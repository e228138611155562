//! The virtio-mmio transport (virtio 1.2, section 4.2.2), modern only
//! (Version 2): the register window through which the guest driver finds,
//! negotiates with, and sets up the queues of one device.
//!
//! Every value comes from the guest and is checked: queue registers only
//! change before DRIVER_OK, sizes must be powers of two within the maximum,
//! status bits must follow the order the specification prescribes, and the
//! queues are validated against guest memory before the device sees them.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("VSSL").
pub const VENDOR_ID: u32 = 0x4c53_5356;

/// Register offsets.
pub mod reg {
    /// MagicValue.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// SHMSel.
    pub const SHM_SEL: u64 = 0x0ac;
    /// SHMLenLow.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// SHMLenHigh.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// SHMBaseLow.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// SHMBaseHigh.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
    /// End of the window.
    pub const WINDOW_END: u64 = 0x1000;
}

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// A shared memory region a device exposes (e.g. a virtio-fs DAX window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmRegion {
    /// Guest physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One virtqueue in a snapshot: the driver's registers plus the device's
/// ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available ring index the device will read.
    pub next_avail: u16,
    /// Next used ring index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
}

impl QueueSnapshot {
    /// Captures `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// Rebuilds the queue; sizes are checked like guest writes are.
    pub fn to_queue(&self) -> Result<Queue, String> {
        if self.max_size == 0
            || !self.max_size.is_power_of_two()
            || !self.size.is_power_of_two()
            || self.size > self.max_size
        {
            return Err(format!(
                "invalid queue sizes {}/{}",
                self.size, self.max_size
            ));
        }
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("invalid queue: {e:?}"))
    }
}

/// The transport's registers in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures (both halves).
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// The driver's view of each queue.
    pub queues: Vec<QueueSnapshot>,
}

/// The register window of one virtio device.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    shm_regions: Vec<ShmRegion>,
    shm_sel: u32,
}

impl MmioTransport {
    /// A transport for `device`, raising interrupts through `interrupt`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            mem,
            device,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            shm_regions: Vec::new(),
            shm_sel: 0,
        }
    }

    fn fresh_queues(device: &Arc<Mutex<dyn VirtioDevice>>) -> Vec<Queue> {
        let sizes: Vec<u16> = device
            .lock()
            .map(|d| d.queue_max_sizes().to_vec())
            .unwrap_or_default();
        sizes
            .into_iter()
            .filter_map(|s| Queue::new(s).ok())
            .collect()
    }

    /// The registers, for a snapshot (the device must be quiescent).
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            shm_sel: self.shm_sel,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// A transport with restored registers. The device is not activated
    /// here: it restores its own queue positions (see the device's restore).
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, String> {
        let mut t = MmioTransport::new(mem, device, interrupt);
        if state.queues.len() != t.queues.len() {
            return Err(format!(
                "snapshot has {} queues, the device has {}",
                state.queues.len(),
                t.queues.len()
            ));
        }
        for (q, s) in t.queues.iter_mut().zip(&state.queues) {
            if s.max_size != q.max_size() {
                return Err("queue maximum sizes differ".into());
            }
            *q = s.to_queue()?;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.shm_sel = state.shm_sel;
        t.interrupt.set_status(state.interrupt_status);
        Ok(t)
    }

    /// Announces shared memory regions (SHMSel/SHMLen/SHMBase registers).
    pub fn set_shm_regions(&mut self, regions: Vec<ShmRegion>) {
        self.shm_regions = regions;
    }

    /// The device behind this transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn with_device<T>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> T) -> Option<T> {
        match self.device.lock() {
            Ok(mut d) => Some(f(&mut *d)),
            Err(_) => {
                tracing::error!("virtio device lock poisoned");
                None
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver is setting up.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    /// Guest read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if (reg::CONFIG..reg::WINDOW_END).contains(&offset) {
            let off = offset - reg::CONFIG;
            if self.with_device(|d| d.read_config(off, data)).is_none() {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: ignoring non 32-bit register read"
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.with_device(|d| d.device_type()).unwrap_or(0),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.with_device(|d| d.avail_features()).unwrap_or(0)
                    | (1u64 << VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                let region = self.shm_regions.get(self.shm_sel as usize);
                let v = match (offset, region) {
                    // No such region: length all ones (virtio 1.2, 4.2.2.1).
                    (reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH, None) => u64::MAX,
                    (reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH, None) => 0,
                    (reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH, Some(r)) => r.len,
                    (_, Some(r)) => r.base,
                    _ => 0,
                };
                if offset == reg::SHM_LEN_LOW || offset == reg::SHM_BASE_LOW {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if (reg::CONFIG..reg::WINDOW_END).contains(&offset) {
            if self.status & status::DRIVER != 0 && self.status & status::FAILED == 0 {
                let off = offset - reg::CONFIG;
                self.with_device(|d| d.write_config(off, data));
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: ignoring non 32-bit register write"
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    tracing::warn!("virtio-mmio: driver features written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if !self.queue_config_allowed() {
                    return;
                }
                if let Some(q) = self.selected_queue() {
                    let ok = u16::try_from(v)
                        .ok()
                        .filter(|s| s.is_power_of_two() && *s <= q.max_size());
                    match ok {
                        Some(size) => q.set_size(size),
                        None => tracing::warn!(size = v, "virtio-mmio: invalid queue size"),
                    }
                }
            }
            reg::QUEUE_READY => {
                if !self.queue_config_allowed() {
                    return;
                }
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_config_allowed() {
                    return;
                }
                if let Some(q) = self.selected_queue() {
                    match offset {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                        reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                        reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                        reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by a KVM ioeventfd; this is the fallback.
                if self.status & status::DRIVER_OK != 0 {
                    self.with_device(|d| {
                        if let Some(evt) = d.queue_events().get(v as usize) {
                            let _ = evt.write(1);
                        }
                    });
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => self.shm_sel = v,
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        // Bits only get added, one step at a time, in the specified order.
        if v & self.status != self.status {
            tracing::warn!(
                old = self.status,
                new = v,
                "virtio-mmio: status bits cleared without reset"
            );
            return;
        }
        let added = v & !self.status;
        let ok = match added {
            ACKNOWLEDGE => self.status == 0,
            DRIVER => self.status == ACKNOWLEDGE,
            FEATURES_OK => self.status == ACKNOWLEDGE | DRIVER && self.features_acceptable(),
            DRIVER_OK => self.status == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            0 => true,
            _ => false,
        };
        if !ok {
            tracing::warn!(
                old = self.status,
                new = v,
                "virtio-mmio: invalid status transition"
            );
            return;
        }
        match added {
            FEATURES_OK => {
                let acked = self.acked_features;
                self.with_device(|d| d.set_acked_features(acked));
                self.status = v;
            }
            DRIVER_OK => {
                self.status = v;
                self.activate();
            }
            _ => self.status = v,
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered =
            self.with_device(|d| d.avail_features()).unwrap_or(0) | (1u64 << VIRTIO_F_VERSION_1);
        self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
            && self.acked_features & !offered == 0
    }

    fn activate(&mut self) {
        let all_valid = self
            .queues
            .iter()
            .filter(|q| q.ready())
            .all(|q| q.is_valid(&self.mem));
        let result = if all_valid {
            // The device gets its own copies; the transport keeps the register view.
            let queues: Result<Vec<Queue>, _> = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect();
            let queues = match queues {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!("virtio-mmio: cannot copy queue state: {e:?}");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            };
            let mem = self.mem.clone();
            let interrupt = self.interrupt.clone();
            self.with_device(|d| {
                d.activate(mem, interrupt, queues)
                    .map_err(|e| e.to_string())
            })
            .unwrap_or_else(|| Err("device unavailable".into()))
        } else {
            Err("a ready queue is not valid in guest memory".into())
        };
        if let Err(e) = result {
            tracing::error!("virtio-mmio: activation failed: {e}");
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        let was_active = self.status & status::DRIVER_OK != 0;
        if was_active && self.with_device(|d| d.reset()) != Some(true) {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
    }
}

#[cfg(test)]
impl MmioTransport {
    /// The driver's view of queue `i`, for tests.
    fn queue(&self, i: usize) -> Option<&Queue> {
        self.queues.get(i)
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod register_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        acked: u64,
        activated: bool,
        evts: Vec<EventFd>,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            1 << 3
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn activate(
            &mut self,
            _m: GuestMemoryMmap,
            _i: Arc<Interrupt>,
            q: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if q.len() != 2 {
                return Err(ActivateError::BadQueue("count".into()));
            }
            self.activated = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.activated = false;
            true
        }
        fn is_activated(&self) -> bool {
            self.activated
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            acked: 0,
            activated: false,
            evts: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
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

    fn negotiate(t: &mut MmioTransport) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1 << 3);
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
        w(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
        w(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        let mut narrow = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        let mut cfg = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut cfg);
        assert_eq!(cfg, [3, 4]);
    }

    #[test]
    fn feature_negotiation_and_activation() {
        let (mut t, dev) = setup();
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 offered");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        negotiate(&mut t);
        assert_eq!(t.status() & status::FEATURES_OK, status::FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | (1 << 3));
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(dev.lock().unwrap().activated);
        assert_eq!(t.status(), 0xf);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Reset.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert!(!dev.lock().unwrap().activated);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, _) = setup();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 3);
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
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(t.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn out_of_order_status_is_ignored() {
        let (mut t, dev) = setup();
        w(&mut t, reg::STATUS, status::DRIVER_OK);
        assert_eq!(t.status(), 0);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(t.status(), status::ACKNOWLEDGE);
        assert!(!dev.lock().unwrap().activated);
        w(&mut t, reg::STATUS, status::FAILED);
        assert_ne!(t.status() & status::FAILED, 0);
    }

    #[test]
    fn invalid_queue_sizes_and_indices() {
        let (mut t, _) = setup();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_NUM, 12); // not a power of two
        w(&mut t, reg::QUEUE_NUM, 32); // over the maximum
        w(&mut t, reg::QUEUE_SEL, 7); // no such queue
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9);
    }

    #[test]
    fn queue_outside_memory_fails_activation() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x7fff_0000); // beyond the 1 MiB of guest memory
        w(&mut t, reg::STATUS, 0xf);
        assert!(!dev.lock().unwrap().activated);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
        w(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn state_round_trip() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, reg::STATUS, 0xf);
        w(&mut t, reg::QUEUE_SEL, 1);
        let st = t.save_state();
        assert_eq!(st.status, 0xf);
        assert_eq!(st.queues[1].desc_table, 0x20000);
        let json = serde_json::to_string(&st).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let d: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let mut rt = MmioTransport::restore(mem.clone(), d.clone(), irq.clone(), &back).unwrap();
        assert_eq!(rt.status(), 0xf);
        assert_eq!(rt.save_state(), st);
        assert_eq!(rt.queue(1).unwrap().desc_table(), 0x20000);
        assert_eq!(rt.queue(0).unwrap().size(), 16);
        // Registers stay frozen after DRIVER_OK in the restored transport too.
        w(&mut rt, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut rt, reg::QUEUE_READY), 1);

        // A state for another device shape, or with bad sizes, is refused.
        let mut wrong = st.clone();
        wrong.queues.pop();
        assert!(MmioTransport::restore(mem.clone(), d.clone(), irq.clone(), &wrong).is_err());
        let mut wrong = st.clone();
        wrong.queues[0].size = 12;
        assert!(MmioTransport::restore(mem, d, irq, &wrong).is_err());
    }

    #[test]
    fn no_shared_memory_regions() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
        t.set_shm_regions(vec![ShmRegion {
            base: 0x1_0000_0000,
            len: 0x200_0000,
        }]);
        assert_eq!(r(&mut t, reg::SHM_BASE_HIGH), 1);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), 0x200_0000);
    }
}

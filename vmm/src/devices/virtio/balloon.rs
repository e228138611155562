//! virtio-balloon (device id 5) with free page reporting.
//!
//! Memory density is the point: a guest that frees memory should give it
//! back to the host. With `VIRTIO_BALLOON_F_REPORTING` the Linux driver
//! reports ranges of free guest pages (whole 2 MiB page blocks, after a
//! short delay) on the reporting queue; the device `madvise(MADV_DONTNEED)`s
//! the host memory behind them, so the VMM's RSS drops. For a clone mapped
//! from a template (`MAP_PRIVATE`), that drops its private copies and the
//! range reads back from the template file, which is fine: reported pages
//! are free and their contents undefined to the guest.
//!
//! The classic balloon is there too: the host sets a target in pages
//! (`num_pages` in config space) and the driver hands pages to the inflate
//! queue (released the same way) or takes them back with the deflate queue
//! (nothing to do: the next guest touch faults a zero page in).
//! `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` lets the guest deflate under memory
//! pressure instead of running out of memory.
//!
//! Everything in the queues comes from the guest: page frame numbers and
//! ranges outside guest RAM, or not aligned to pages, are skipped and
//! counted, never acted on.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    guest_wants_interrupt, ActivateError, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
};

/// virtio device id of the balloon.
pub const DEVICE_ID: u32 = 5;
/// The guest may deflate when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Free page reporting.
pub const F_REPORTING: u32 = 5;
/// Balloon pages are always 4 KiB (the virtio spec's unit).
const PAGE: u64 = 4096;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 32];

/// What the device has done, for logs and tests.
#[derive(Debug, Default)]
pub struct BalloonStats {
    /// Bytes released through the inflate queue.
    pub inflated_bytes: AtomicU64,
    /// Bytes released through free page reports.
    pub reported_bytes: AtomicU64,
    /// Entries (PFNs or ranges) skipped as invalid.
    pub rejected: AtomicU64,
}

/// The balloon's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Target size in pages.
    pub num_pages: u32,
    /// Size the driver reported, in pages.
    pub actual: u32,
    /// The queues when the device was active.
    pub queues: Option<Vec<crate::devices::virtio::mmio::QueueSnapshot>>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// The balloon device.
pub struct Balloon {
    acked_features: u64,
    /// Target size in 4 KiB pages (config `num_pages`).
    num_pages: u32,
    /// What the driver says it holds (config `actual`).
    actual: u32,
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    stats: Arc<BalloonStats>,
}

impl Balloon {
    /// A balloon with an empty target.
    pub fn new() -> std::io::Result<Balloon> {
        let queue_evts = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Balloon {
            acked_features: 0,
            num_pages: 0,
            actual: 0,
            queue_evts,
            active: None,
            stats: Arc::new(BalloonStats::default()),
        })
    }

    /// What a snapshot keeps: features, target and actual size, and the
    /// queues (at their ring positions) if the driver had activated it.
    pub fn save_state(&self) -> BalloonState {
        BalloonState {
            acked_features: self.acked_features,
            num_pages: self.num_pages,
            actual: self.actual,
            queues: self.active.as_ref().map(|a| {
                a.queues
                    .iter()
                    .map(crate::devices::virtio::mmio::QueueSnapshot::of)
                    .collect()
            }),
        }
    }

    /// Brings a new device to a saved state (see [`Balloon::save_state`]).
    pub fn restore_state(
        &mut self,
        state: &BalloonState,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.acked_features = state.acked_features;
        self.num_pages = state.num_pages;
        self.actual = state.actual;
        if let Some(saved) = &state.queues {
            let queues = saved
                .iter()
                .map(|q| q.to_queue())
                .collect::<Result<Vec<Queue>, String>>()
                .map_err(ActivateError::BadQueue)?;
            if queues
                .iter()
                .filter(|q| q.ready())
                .any(|q| !q.is_valid(&mem))
            {
                return Err(ActivateError::BadQueue(
                    "a saved queue is not valid in guest memory".into(),
                ));
            }
            self.activate(mem, interrupt, queues)?;
        }
        Ok(())
    }

    /// Counters shared with the caller.
    pub fn stats(&self) -> Arc<BalloonStats> {
        self.stats.clone()
    }

    /// Sets the target balloon size in MiB and tells the driver.
    pub fn set_target_mib(&mut self, mib: u32) {
        self.num_pages = mib.saturating_mul((1 << 20) / PAGE as u32);
        if let Some(a) = &self.active {
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
                tracing::error!("balloon: cannot raise the config interrupt: {e}");
            }
        }
    }

    /// The balloon size the driver reports, in MiB.
    pub fn actual_mib(&self) -> u32 {
        self.actual / ((1 << 20) / PAGE as u32)
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// Releases `len` bytes of guest memory at `addr` to the host, if the
    /// range is page-aligned and lies in one guest RAM region.
    fn release(mem: &GuestMemoryMmap, addr: u64, len: u64, stats: &BalloonStats) -> Option<u64> {
        if len == 0 || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Ok(len_usize) = usize::try_from(len) else {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // get_slice fails unless the whole range is inside one region.
        let Ok(slice) = mem.get_slice(GuestAddress(addr), len_usize) else {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // SAFETY: the range is guest RAM mapped by this process for the
        // VM's lifetime (checked by get_slice above); MADV_DONTNEED only
        // drops its contents, which the guest has given up, and never
        // unmaps it.
        let rc = unsafe {
            libc::madvise(
                slice.ptr_guard_mut().as_ptr().cast(),
                len_usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "balloon: madvise at {addr:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(len)
    }

    /// Handles every available chain of queue `index`; true if any was used.
    fn process_queue(&mut self, index: usize) -> bool {
        let stats = self.stats.clone();
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let Some(queue) = a.queues.get_mut(index) else {
            return false;
        };
        if !queue.ready() {
            return false;
        }
        let mut used = false;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!("balloon: queue {index}: {e:?}");
                    None
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            for desc in chain {
                match index {
                    INFLATE => {
                        // An array of little-endian u32 page frame numbers.
                        let n = desc.len() / 4;
                        for i in 0..u64::from(n) {
                            let Some(at) = desc.addr().checked_add(i * 4) else {
                                break;
                            };
                            match mem.read_obj::<u32>(at) {
                                Ok(pfn) => {
                                    let pfn = u64::from(u32::from_le(pfn));
                                    if let Some(b) = Self::release(mem, pfn * PAGE, PAGE, &stats) {
                                        stats.inflated_bytes.fetch_add(b, Ordering::Relaxed);
                                    }
                                }
                                Err(_) => {
                                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                    }
                    REPORTING => {
                        // Each descriptor is one free range.
                        if let Some(b) =
                            Self::release(mem, desc.addr().0, u64::from(desc.len()), &stats)
                        {
                            stats.reported_bytes.fetch_add(b, Ordering::Relaxed);
                        }
                    }
                    // DEFLATE: the pages come back on the next guest touch.
                    _ => {}
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("balloon: queue {index}: add_used: {e:?}");
                break;
            }
            used = true;
        }
        if used && index == REPORTING {
            tracing::debug!(
                reported_mib = stats.reported_bytes.load(Ordering::Relaxed) >> 20,
                "balloon: free page report"
            );
        }
        if used && guest_wants_interrupt(mem, queue) {
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("balloon: cannot raise interrupt: {e}");
            }
        }
        used
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1u64 << F_DEFLATE_ON_OOM) | (1u64 << F_REPORTING)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        crate::devices::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is driver-writable.
        let mut bytes = self.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                return;
            };
            if let Some(slot) = o.checked_sub(4).and_then(|j| bytes.get_mut(j)) {
                *slot = *b;
            }
        }
        self.actual = u32::from_le_bytes(bytes);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() || !queues[INFLATE].ready() || !queues[DEFLATE].ready()
        {
            return Err(ActivateError::BadQueue(
                "the balloon needs its inflate and deflate queues".into(),
            ));
        }
        if self.acked(F_REPORTING) && !queues[REPORTING].ready() {
            return Err(ActivateError::BadQueue(
                "free page reporting was negotiated but its queue is not ready".into(),
            ));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // Anything posted before activation was not seen yet.
        for i in 0..QUEUE_SIZES.len() {
            self.process_queue(i);
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.actual = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new_raw(evt.as_raw_fd(), EventSet::IN)) {
                tracing::error!("balloon: cannot register a queue eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[i].read();
            self.process_queue(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryRegion;

    const MIB: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap()
    }

    fn touch(mem: &GuestMemoryMmap, addr: u64, len: u64) {
        mem.write_slice(&vec![0xabu8; len as usize], GuestAddress(addr))
            .unwrap();
    }

    fn byte(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(addr)).unwrap()
    }

    /// An active balloon whose queue `index` holds one chain of `descs`
    /// (built in a mock queue at 1 MiB).
    fn with_chain(
        mem: &GuestMemoryMmap,
        index: usize,
        descs: &[(u64, u32, bool)],
        features: u64,
    ) -> Balloon {
        let mock = MockSplitQueue::create(mem, GuestAddress(MIB), 32);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { 2 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= 1;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        mock.build_desc_chain(&raw).unwrap();
        let mut queues: Vec<Queue> = (0..3)
            .map(|_| {
                let mut q = Queue::new(32).unwrap();
                q.set_ready(false);
                q
            })
            .collect();
        queues[index] = mock.create_queue().unwrap();
        for (i, q) in queues.iter_mut().enumerate() {
            if i != index {
                let m = MockSplitQueue::create(mem, GuestAddress(2 * MIB + i as u64 * 0x10000), 32);
                *q = m.create_queue().unwrap();
            }
        }
        let mut b = Balloon::new().unwrap();
        b.set_acked_features(features);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        b.activate(mem.clone(), Arc::new(Interrupt::new(irq)), queues)
            .unwrap();
        b
    }

    #[test]
    fn reported_ranges_are_released_and_bad_ones_skipped() {
        let mem = memory();
        touch(&mem, 8 * MIB, 2 * MIB);
        let size = mem.iter().next().unwrap().len();
        let b = with_chain(
            &mem,
            REPORTING,
            &[
                (8 * MIB, 2 * MIB as u32, true),
                (size - 4096, 8192, true),     // runs past the end of RAM
                (4 * MIB + 1, 4096, true),     // not page-aligned
                (u64::MAX - 4095, 4096, true), // nowhere
            ],
            1 << F_REPORTING,
        );
        assert_eq!(byte(&mem, 8 * MIB), 0, "released page reads as zero");
        assert_eq!(b.stats.reported_bytes.load(Ordering::Relaxed), 2 * MIB);
        assert_eq!(b.stats.rejected.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn inflated_pfns_are_released_and_out_of_range_ones_skipped() {
        let mem = memory();
        touch(&mem, 12 * MIB, 8192);
        // PFN array at 3 MiB: two valid pages, one beyond RAM.
        let pfns: [u32; 3] = [
            (12 * MIB / PAGE) as u32,
            (12 * MIB / PAGE) as u32 + 1,
            0x00ff_ffff,
        ];
        for (i, p) in pfns.iter().enumerate() {
            mem.write_obj(p.to_le(), GuestAddress(3 * MIB + i as u64 * 4))
                .unwrap();
        }
        let b = with_chain(&mem, INFLATE, &[(3 * MIB, 12, false)], 0);
        assert_eq!(byte(&mem, 12 * MIB), 0);
        assert_eq!(byte(&mem, 12 * MIB + 4096), 0);
        assert_eq!(b.stats.inflated_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(b.stats.rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn config_space_target_and_actual() {
        let mut b = Balloon::new().unwrap();
        b.set_target_mib(64);
        let mut buf = [0u8; 4];
        b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 64 * 256);
        // `num_pages` is read-only for the driver, `actual` is writable.
        b.write_config(0, &[9, 9, 9, 9]);
        b.write_config(4, &(32u32 * 256).to_le_bytes());
        b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf), 64 * 256);
        assert_eq!(b.actual_mib(), 32);
        // Out-of-range accesses are harmless.
        b.write_config(u64::MAX, &[1, 2]);
        let mut big = [0xffu8; 16];
        b.read_config(6, &mut big);
        assert_eq!(&big[2..], &[0u8; 14]);
    }

    #[test]
    fn activation_needs_the_negotiated_queues() {
        let mem = memory();
        let mut b = Balloon::new().unwrap();
        b.set_acked_features(1 << F_REPORTING);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queues: Vec<Queue> = (0..3).map(|_| Queue::new(32).unwrap()).collect();
        assert!(b
            .activate(mem, Arc::new(Interrupt::new(irq)), queues)
            .is_err());
        assert!(!b.is_activated());
    }
}

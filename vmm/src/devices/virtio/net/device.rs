//! The virtio-net device: queues, config space, the tap, the event loop.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::features::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP};
use super::{
    format_mac, offered_features, offered_features_without_offloads, tap_offload_flags, NetError,
    NetState, NetStats, Tap, DEVICE_ID, GSO_TYPE_OFFSET, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET,
    VNET_HDR_LEN,
};
use crate::devices::virtio::mmio::QueueSnapshot;
use crate::devices::virtio::{
    guest_wants_interrupt, read_config_bytes, ActivateError, Interrupt, VirtioDevice,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};

/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Frames moved per event before the event loop gets a turn (the tap
/// fd is level-triggered: the rest comes with the next wakeup).
const BATCH: usize = 64;
/// TX chains handled per wakeup before the event loop gets a turn.
const TX_BUDGET: usize = 256;
/// At most one warning per interval about malformed guest input.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// Warnings about guest input, at most one per [`WARN_INTERVAL`].
#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn warn(&mut self, dir: &'static str, why: &str) {
        tracing::debug!(dir, why, "virtio-net: malformed chain");
        if self.last.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            dir,
            suppressed = self.suppressed,
            "virtio-net: dropped a malformed chain from the guest: {why}"
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// What happened to one received frame.
#[derive(Debug, PartialEq, Eq)]
enum RxOutcome {
    /// In the guest's buffers.
    Delivered,
    /// The guest has no (or not enough) buffers: keep the frame.
    NoBuffers,
    /// Dropped; `returned` when guest buffers were given back (used).
    Dropped { returned: bool },
}

/// One virtio-net device.
pub struct Net {
    mac: [u8; 6],
    tap: Option<Tap>,
    /// What the device offers ([`offered_features`], or fewer with
    /// offloads off).
    features: u64,
    acked_features: u64,
    queue_evts: Vec<EventFd>,
    /// Written on activation and reset (vCPU thread), so the event loop
    /// updates its interest in the tap and looks at the queues.
    state_evt: EventFd,
    active: Option<Active>,
    /// Set at restore: the interrupt to raise a config change with.
    interrupt: Option<Arc<Interrupt>>,
    /// The link state differs from what the snapshotted guest saw.
    link_changed: bool,
    stats: Arc<NetStats>,
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` not yet delivered.
    rx_pending: Option<usize>,
    /// Out of guest RX buffers: the tap is not read until the guest adds some.
    rx_blocked: bool,
    tap_registered: bool,
    tap_broken: bool,
    warn: WarnLimiter,
}

impl Net {
    /// A device with MAC `mac`, moving frames to and from `tap` (none:
    /// link down, TX dropped).
    pub fn new(mac: [u8; 6], tap: Option<Tap>) -> Result<Net, NetError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            mac,
            tap,
            features: offered_features(),
            acked_features: 0,
            queue_evts: vec![evt()?, evt()?],
            state_evt: evt()?,
            active: None,
            interrupt: None,
            link_changed: false,
            stats: Arc::new(NetStats::default()),
            rx_buf: vec![0u8; MAX_BUFFER_LEN],
            rx_pending: None,
            rx_blocked: false,
            tap_registered: false,
            tap_broken: false,
            warn: WarnLimiter::default(),
        })
    }

    /// Offers no checksum or segmentation offload
    /// ([`offered_features_without_offloads`]).
    pub fn without_offloads(mut self) -> Net {
        self.features = offered_features_without_offloads();
        self
    }

    /// The MAC in config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's name, if a backend is bound.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_ref().map(Tap::name)
    }

    /// Counters shared with the caller.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// Logs the counters (at exit).
    pub fn log_stats(&self) {
        let s = &self.stats;
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            mac = format_mac(&self.mac),
            tap = self.tap_name().unwrap_or("none"),
            tx_frames = g(&s.tx_frames),
            tx_bytes = g(&s.tx_bytes),
            rx_frames = g(&s.rx_frames),
            rx_bytes = g(&s.rx_bytes),
            tx_malformed = g(&s.tx_malformed),
            rx_malformed = g(&s.rx_malformed),
            tx_dropped = g(&s.tx_dropped),
            rx_dropped = g(&s.rx_dropped),
            rx_no_buffers = g(&s.rx_no_buffers),
            tx_gso_frames = g(&s.tx_gso_frames),
            rx_gso_frames = g(&s.rx_gso_frames),
            tx_max_len = g(&s.tx_max_len),
            rx_max_len = g(&s.rx_max_len),
            "virtio-net counters"
        );
    }

    fn link_up(&self) -> bool {
        self.tap.is_some()
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// What a snapshot keeps: MAC, features, link state, and the queues
    /// (at their ring positions) if the driver had activated the device.
    pub fn save_state(&self) -> NetState {
        NetState {
            mac: self.mac,
            acked_features: self.acked_features,
            link_up: self.link_up(),
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(QueueSnapshot::of).collect()),
        }
    }

    /// Brings a new device (with this instance's MAC and backend) to a
    /// saved state. When the link state differs from the saved one, the
    /// guest is told with a config-change interrupt once the VM runs (see
    /// [`Net::announce_link_change`]).
    pub fn restore_state(
        &mut self,
        state: &NetState,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        // The driver negotiated before the snapshot: it keeps what it got.
        self.features |= state.acked_features & offered_features();
        self.set_acked_features(state.acked_features);
        self.interrupt = Some(interrupt.clone());
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
            self.link_changed = state.link_up != self.link_up();
        }
        Ok(())
    }

    /// After a restore: raises the config-change interrupt if the link
    /// state changed (a template saved without a backend, restored with
    /// one), so the driver re-reads `status` and sets its carrier.
    pub fn announce_link_change(&mut self) {
        if !std::mem::take(&mut self.link_changed) {
            return;
        }
        if let Some(i) = &self.interrupt {
            tracing::info!(
                mac = format_mac(&self.mac),
                link_up = self.link_up(),
                "virtio-net: link state changed since the snapshot"
            );
            if let Err(e) = i.trigger(VIRTIO_MMIO_INT_CONFIG) {
                tracing::error!("virtio-net: cannot raise the config interrupt: {e}");
            }
        }
    }

    /// Tells the tap which offloads the driver accepts.
    fn apply_offloads(&self) {
        if let Some(tap) = &self.tap {
            let flags = tap_offload_flags(self.acked_features);
            match tap.set_offload(flags) {
                Ok(()) => tracing::info!(tap = tap.name(), flags, "virtio-net: tap offloads"),
                Err(e) => tracing::warn!("virtio-net: {e}"),
            }
        }
    }

    /// Moves every frame the guest queued for transmission to the tap.
    /// Returns whether chains were used.
    fn process_tx(&mut self) -> bool {
        let Net {
            active,
            tap,
            stats,
            warn,
            queue_evts,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let q = &mut a.queues[TXQ];
        let mut used = false;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(8);
        let mut budget = TX_BUDGET;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            budget -= 1;
            if budget == 0 {
                // A guest that keeps the queue full does not keep the
                // event loop: the rest waits for the next turn.
                let _ = queue_evts[TXQ].write(1);
            }
            let head = chain.head_index();
            let mut gso_type = 0u8;
            iov.clear();
            let mut total = 0usize;
            let mut bad: Option<&'static str> = None;
            for desc in chain {
                if desc.is_write_only() {
                    bad = Some("write-only descriptor in a TX chain");
                    break;
                }
                let len = desc.len() as usize;
                total = total.saturating_add(len);
                if total > MAX_BUFFER_LEN {
                    bad = Some("TX frame larger than 64 KiB plus headers");
                    break;
                }
                if len == 0 {
                    continue;
                }
                if iov.is_empty() {
                    gso_type = mem
                        .read_obj::<u8>(desc.addr().unchecked_add(GSO_TYPE_OFFSET as u64))
                        .unwrap_or(0);
                }
                match mem.get_slice(desc.addr(), len) {
                    Ok(s) => iov.push(libc::iovec {
                        iov_base: s.ptr_guard().as_ptr().cast_mut().cast(),
                        iov_len: len,
                    }),
                    Err(_) => {
                        bad = Some("TX descriptor outside guest memory");
                        break;
                    }
                }
            }
            if bad.is_none() && total <= VNET_HDR_LEN {
                bad = Some("TX chain without a frame after the header");
            }
            match (bad, tap.as_ref()) {
                (Some(why), _) => {
                    stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
                    warn.warn("tx", why);
                }
                (None, None) => {
                    stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                (None, Some(tap)) => {
                    // SAFETY: every iovec points into guest memory checked
                    // by get_slice above; it stays mapped while `mem` lives.
                    match unsafe { tap.writev(&iov) } {
                        Ok(_) => {
                            stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                            stats.tx_max_len.fetch_max(total as u64, Ordering::Relaxed);
                            if gso_type != 0 {
                                stats.tx_gso_frames.fetch_add(1, Ordering::Relaxed);
                            }
                            stats
                                .tx_bytes
                                .fetch_add((total - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("virtio-net: tap write: {e}");
                        }
                    }
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                warn.warn("tx", &format!("add_used: {e:?}"));
                break;
            }
            used = true;
            if budget == 0 {
                break;
            }
        }
        if used && guest_wants_interrupt(mem, q) {
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("virtio-net: cannot raise interrupt: {e}");
            }
        }
        used
    }

    /// Reads frames from the tap into guest RX buffers until the tap is
    /// empty, the guest runs out of buffers (then the tap is not read
    /// until the guest adds some), or a batch is done.
    fn process_rx(&mut self) -> bool {
        let mut returned_any = false;
        for _ in 0..BATCH {
            if self.active.is_none() || self.rx_blocked {
                break;
            }
            let Some(tap) = &self.tap else {
                break;
            };
            let len = match self.rx_pending {
                Some(n) => n,
                None => match tap.read(&mut self.rx_buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: tap read: {e}");
                        self.tap_broken = true;
                        break;
                    }
                },
            };
            if len <= VNET_HDR_LEN {
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.rx_pending = Some(len);
            match self.deliver_frame(len) {
                RxOutcome::Delivered => {
                    self.rx_pending = None;
                    returned_any = true;
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .rx_max_len
                        .fetch_max(len as u64, Ordering::Relaxed);
                    if self.rx_buf[GSO_TYPE_OFFSET] != 0 {
                        self.stats.rx_gso_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                RxOutcome::NoBuffers => {
                    self.rx_blocked = true;
                    self.stats.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                }
                RxOutcome::Dropped { returned } => {
                    self.rx_pending = None;
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    returned_any |= returned;
                }
            }
        }
        if returned_any {
            if let Some(a) = self.active.as_mut() {
                if guest_wants_interrupt(&a.mem, &mut a.queues[RXQ]) {
                    if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                        tracing::error!("virtio-net: cannot raise interrupt: {e}");
                    }
                }
            }
        }
        returned_any
    }

    /// Copies the frame in `rx_buf[..len]` into the guest's RX buffers:
    /// one chain, or with MRG_RXBUF as many as it takes (`num_buffers` in
    /// the header says how many). Nothing is published unless the whole
    /// frame fits; the used entries of one frame appear at once.
    fn deliver_frame(&mut self, len: usize) -> RxOutcome {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let Net {
            active,
            rx_buf,
            stats,
            warn,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return RxOutcome::NoBuffers;
        };
        let mem = &a.mem;
        let q = &mut a.queues[RXQ];
        let start = q.next_avail();
        // (head, first segment, end of segments, capacity) per chain.
        let mut chains: Vec<(u16, usize, usize, usize)> = Vec::new();
        let mut segs: Vec<(GuestAddress, usize)> = Vec::new();
        let mut capacity = 0usize;
        let mut bad: Option<&'static str> = None;
        while capacity < len {
            if !mergeable && !chains.is_empty() {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Not enough buffers: give back what we took (nothing was
                // written to the used ring) and wait for the guest.
                q.set_next_avail(start);
                return RxOutcome::NoBuffers;
            };
            let head = chain.head_index();
            let first = segs.len();
            let mut chain_cap = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = Some("read-only descriptor in an RX chain");
                    break;
                }
                let dlen = desc.len() as usize;
                if dlen == 0 {
                    continue;
                }
                if !mem.check_range(desc.addr(), dlen) {
                    bad = Some("RX descriptor outside guest memory");
                    break;
                }
                segs.push((desc.addr(), dlen));
                chain_cap = chain_cap.saturating_add(dlen);
                if chain_cap >= MAX_BUFFER_LEN {
                    break;
                }
            }
            chains.push((head, first, segs.len(), chain_cap));
            if bad.is_none() && chain_cap == 0 {
                bad = Some("RX chain without writable bytes");
            }
            if bad.is_none() && chains.len() == 1 && chain_cap < VNET_HDR_LEN {
                bad = Some("first RX buffer smaller than the header");
            }
            if bad.is_some() {
                break;
            }
            capacity = capacity.saturating_add(chain_cap);
        }
        if let Some(why) = bad {
            // Every chain taken for this frame goes back unused (length 0:
            // the driver drops each as a short frame); the frame is lost.
            stats.rx_malformed.fetch_add(1, Ordering::Relaxed);
            warn.warn("rx", why);
            for &(head, ..) in &chains {
                if q.add_used(mem, head, 0).is_err() {
                    break;
                }
            }
            return RxOutcome::Dropped { returned: true };
        }
        if capacity < len {
            // One buffer without MRG_RXBUF, and the frame does not fit:
            // drop the frame, keep the buffer for the next one.
            q.set_next_avail(start);
            warn.warn("rx", "frame larger than the guest's receive buffer");
            return RxOutcome::Dropped { returned: false };
        }
        let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        rx_buf[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut used: Vec<(u16, u32)> = Vec::with_capacity(chains.len());
        let mut off = 0usize;
        for &(head, first, end, _) in &chains {
            let mut written = 0usize;
            for &(addr, dlen) in &segs[first..end] {
                if off >= len {
                    break;
                }
                let n = dlen.min(len - off);
                if mem.write_slice(&rx_buf[off..off + n], addr).is_err() {
                    // check_range passed, so only a racing memory change
                    // gets here: give the chains back empty.
                    for &(h, ..) in &chains {
                        let _ = q.add_used(mem, h, 0);
                    }
                    return RxOutcome::Dropped { returned: true };
                }
                off += n;
                written += n;
            }
            used.push((head, written as u32));
        }
        if let Err(e) = add_used_batch(q, mem, &used) {
            warn.warn("rx", &format!("used ring: {e:?}"));
            return RxOutcome::Dropped { returned: false };
        }
        RxOutcome::Delivered
    }

    /// Registers the tap fd with the event loop exactly when frames can
    /// move: a backend, an active device, guest buffers.
    fn update_tap_interest(&mut self, ops: &mut EventOps) {
        let Some(tap) = &self.tap else {
            return;
        };
        let want = self.active.is_some() && !self.rx_blocked && !self.tap_broken;
        if want == self.tap_registered {
            return;
        }
        let events = Events::new_raw(tap.as_raw_fd(), EventSet::IN);
        let r = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match r {
            Ok(()) => self.tap_registered = want,
            Err(e) => {
                tracing::error!("virtio-net: cannot (un)register the tap: {e:?}");
                self.tap_broken = true;
            }
        }
    }
}

/// Publishes used entries for the chains of one frame at once: the
/// elements are written first and the ring index moves once, with
/// release ordering, so a driver polling the ring never sees part of a
/// merged frame.
fn add_used_batch(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = q.size();
    if size == 0 {
        return Err(virtio_queue::Error::InvalidSize);
    }
    let start = q.next_used();
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[]; }
        let addr = q
            .used_ring()
            .checked_add(4 + slot * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let elem = (u64::from(len) << 32) | u64::from(head);
        mem.write_obj(elem.to_le(), GuestAddress(addr))
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    q.set_next_used(start.wrapping_add(rest.len() as u16));
    q.add_used(mem, last_head, last_len)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
        self.apply_offloads();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..].copy_from_slice(&status.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Modern drivers do not write the MAC (no CTRL_MAC_ADDR offered).
        tracing::debug!(offset, "virtio-net: config write ignored");
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
        if queues.len() != QUEUE_SIZES.len() || !queues.iter().all(|q| q.ready()) {
            return Err(ActivateError::BadQueue(
                "virtio-net needs its receive and transmit queues".into(),
            ));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.rx_blocked = false;
        // The event loop registers the tap and looks at the queues.
        if let Err(e) = self.state_evt.write(1) {
            tracing::error!("virtio-net: cannot wake the event loop: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.rx_pending = None;
        self.rx_blocked = false;
        self.apply_offloads();
        let _ = self.state_evt.write(1);
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<i32> = self.queue_evts.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.state_evt.as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("virtio-net: cannot register fd {fd}: {e:?}");
            }
        }
        self.update_tap_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_evts[RXQ].as_raw_fd() {
            let _ = self.queue_evts[RXQ].read();
            self.rx_blocked = false;
            self.process_rx();
        } else if fd == self.queue_evts[TXQ].as_raw_fd() {
            let _ = self.queue_evts[TXQ].read();
            self.process_tx();
        } else if fd == self.state_evt.as_raw_fd() {
            let _ = self.state_evt.read();
            self.process_tx();
            self.process_rx();
        } else if self.tap.as_ref().is_some_and(|t| t.as_raw_fd() == fd) {
            let set = events.event_set();
            if set.contains(EventSet::IN) {
                self.process_rx();
            } else if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                tracing::warn!("virtio-net: tap error or hang-up; no more receiving");
                self.tap_broken = true;
            }
        }
        self.update_tap_interest(ops);
    }
}

#[cfg(test)]
impl Net {
    /// Runs what the event loop runs for queue notifications, for tests.
    pub(crate) fn kick(&mut self) {
        self.rx_blocked = false;
        self.process_tx();
        self.process_rx();
    }

    /// Puts `frame` (header + data) where a tap read would have put it, for
    /// tests without a tap.
    pub(crate) fn inject_rx(&mut self, frame: &[u8]) -> bool {
        self.rx_buf[..frame.len()].copy_from_slice(frame);
        let delivered = self.deliver_frame(frame.len()) == RxOutcome::Delivered;
        if delivered {
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        }
        delivered
    }
}

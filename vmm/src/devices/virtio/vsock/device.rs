//! The vsock device: three queues (rx, tx, event) moving packets between
//! guest memory and the [`Muxer`], driven by the VMM's event loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{EpollChange, Muxer};
use super::packet::{Packet, HDR_SIZE, MAX_PKT_DATA};
use super::VsockError;
use crate::devices::virtio::{
    device_type, ActivateError, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING,
};

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

enum DeviceState {
    Inactive,
    Active {
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    },
}

/// The vsock device in a snapshot. Connections are not saved: they are
/// host sockets, and a restored VM gets a transport reset instead. The
/// guest CID is not restored either: each restored VM gets its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// Guest CID at snapshot time (informational).
    pub cid: u64,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The device's queues (ring positions included) when it was active.
    pub queues: Option<Vec<crate::devices::virtio::mmio::QueueSnapshot>>,
    /// Local port of the next host-initiated connection. A restored VM
    /// continues from here: the guest still has the sockets of connections
    /// open at snapshot time until it has processed the transport reset
    /// and their owners have closed them, and Linux looks up an incoming
    /// packet by source address and destination *port* only, so a new
    /// connection from a reused host port would hit a stale socket and be
    /// reset (one wasted round trip and a client retry after every restore).
    #[serde(default)]
    pub next_local_port: Option<u32>,
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    state: DeviceState,
    muxer: Muxer,
    bad_chains: u64,
    /// A transport reset event waits for an event queue buffer.
    transport_reset_pending: bool,
    /// A transport reset was delivered and the guest has not yet shown that
    /// it handled it (see [`Vsock::process_rx`]): since when.
    reset_unacked_since: Option<Instant>,
}

/// How long RX is held back waiting for the guest to handle a transport
/// reset before it is released anyway.
const RESET_ACK_TIMEOUT: Duration = Duration::from_millis(500);

impl Vsock {
    /// A device for guest `cid`, with its host socket at `uds_path`.
    pub fn new(cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        let muxer = Muxer::new(cid, uds_path)?;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Io);
        Ok(Vsock {
            cid,
            acked_features: 0,
            queue_evts: vec![evt()?, evt()?, evt()?],
            activate_evt: evt()?,
            timer: nonblocking_timer()?,
            timer_armed: false,
            state: DeviceState::Inactive,
            muxer,
            bad_chains: 0,
            transport_reset_pending: false,
            reset_unacked_since: None,
        })
    }

    /// The device state for a snapshot (call with the event loop and the
    /// vCPUs stopped).
    pub fn save_state(&self) -> VsockState {
        let queues = match &self.state {
            DeviceState::Active { queues, .. } => Some(
                queues
                    .iter()
                    .map(crate::devices::virtio::mmio::QueueSnapshot::of)
                    .collect(),
            ),
            DeviceState::Inactive => None,
        };
        VsockState {
            cid: self.cid,
            acked_features: self.acked_features,
            queues,
            next_local_port: Some(self.muxer.next_local_port()),
        }
    }

    /// Brings a new device (with this VM's own CID and socket) to the saved
    /// state: acknowledged features and, if the driver had activated it,
    /// the queues at their saved ring positions. Follow with
    /// [`Vsock::reset_connections_and_send_transport_reset`] once the VM's
    /// interrupt controller is restored.
    pub fn restore_state(
        &mut self,
        state: &VsockState,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.acked_features = state.acked_features;
        if let Some(port) = state.next_local_port {
            self.muxer.set_next_local_port(port);
        }
        if let Some(saved) = &state.queues {
            let queues = saved
                .iter()
                .map(|q| q.to_queue())
                .collect::<Result<Vec<Queue>, String>>()
                .map_err(ActivateError::BadQueue)?;
            if queues.iter().any(|q| !q.is_valid(&mem)) {
                return Err(ActivateError::BadQueue(
                    "a saved queue is not valid in guest memory".into(),
                ));
            }
            self.activate(mem, interrupt, queues)?;
        }
        Ok(())
    }

    /// Called once when the guest accepts its first host connection.
    pub fn set_on_first_response(&mut self, f: Box<dyn FnOnce(u32) + Send>) {
        self.muxer.set_on_first_response(f);
    }

    fn log_bad_chain(&mut self, what: &str, err: impl std::fmt::Debug) {
        self.bad_chains += 1;
        if self.bad_chains.is_power_of_two() {
            tracing::warn!(
                count = self.bad_chains,
                "vsock: invalid {what} descriptor chain: {err:?}"
            );
        }
    }

    /// Moves guest TX packets to the muxer. Returns whether used buffers were added.
    fn process_tx(&mut self) -> bool {
        let DeviceState::Active { mem, queues, .. } = &mut self.state else {
            return false;
        };
        let mut used = false;
        let mut bad = Vec::new();
        while !self.muxer.control_full() {
            let Some(mut chain) = queues[TXQ].pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            match Packet::from_tx_chain(&*mem, &mut chain) {
                Ok(p) => {
                    trace_packet("tx", &p);
                    self.muxer.handle_guest_packet(p)
                }
                Err(e) => bad.push(e.to_string()),
            }
            if let Err(e) = queues[TXQ].add_used(&*mem, head, 0) {
                bad.push(format!("add_used: {e:?}"));
                break;
            }
            used = true;
        }
        for e in bad {
            self.log_bad_chain("tx", e);
        }
        used
    }

    /// Fills guest RX buffers from the muxer. Returns whether used buffers were added.
    ///
    /// After a transport reset, nothing goes to the guest until it has
    /// handled the reset event: Linux resets every connected socket when it
    /// handles the event (without telling the host), so a host connection
    /// that it accepted just before would silently die. The driver re-posts
    /// the event buffer (and notifies the event queue) right after handling
    /// the event, which is the acknowledgement.
    fn process_rx(&mut self) -> bool {
        if let Some(since) = self.reset_unacked_since {
            if since.elapsed() < RESET_ACK_TIMEOUT {
                return false;
            }
            tracing::warn!("vsock: guest did not acknowledge the transport reset; RX released");
            self.reset_unacked_since = None;
        }
        let DeviceState::Active { mem, queues, .. } = &mut self.state else {
            return false;
        };
        let mut used = false;
        let mut bad = Vec::new();
        while self.muxer.has_rx() {
            let Some(mut chain) = queues[RXQ].pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut len = 0u32;
            match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA as u32) {
                Ok(mut vp) => {
                    let room = vp.data_slice().map_or(0, |s| s.len()).min(MAX_PKT_DATA);
                    match self.muxer.next_rx(room) {
                        Some(p) => {
                            trace_packet("rx", &p);
                            let hdr_ok = vp.set_header_from_raw(&p.hdr.to_bytes()).is_ok();
                            let data_ok = p.data.is_empty()
                                || vp
                                    .data_slice()
                                    .is_some_and(|s| s.write_slice(&p.data, 0).is_ok());
                            if hdr_ok && data_ok {
                                len = (HDR_SIZE + p.data.len()) as u32;
                            } else {
                                bad.push("cannot write packet into rx buffer".to_string());
                            }
                        }
                        None => {
                            queues[RXQ].go_to_previous_position();
                            break;
                        }
                    }
                }
                Err(e) => bad.push(format!("{e:?}")),
            }
            if let Err(e) = queues[RXQ].add_used(&*mem, head, len) {
                bad.push(format!("add_used: {e:?}"));
                break;
            }
            used = true;
        }
        for e in bad {
            self.log_bad_chain("rx", e);
        }
        used
    }

    /// Runs both directions until nothing moves, then signals the guest
    /// unless it asked not to be interrupted (VRING_AVAIL_F_NO_INTERRUPT).
    fn kick(&mut self) {
        let (mut tx_used, mut rx_used) = (false, false);
        loop {
            let tx = self.process_tx();
            let rx = self.process_rx();
            tx_used |= tx;
            rx_used |= rx;
            if !tx && !rx {
                break;
            }
        }
        let ev_used = self.deliver_transport_reset();
        let DeviceState::Active {
            mem,
            interrupt,
            queues,
        } = &mut self.state
        else {
            return;
        };
        let mut signal = false;
        for (used, q) in [(rx_used, RXQ), (tx_used, TXQ), (ev_used, EVQ)] {
            if used {
                if let Some(q) = queues.get_mut(q) {
                    signal |= guest_wants_interrupt(mem, q);
                }
            }
        }
        if tracing::enabled!(target: "vsock_pkt", tracing::Level::TRACE) {
            tracing::trace!(
                target: "vsock_pkt",
                ms = format!("{:.2}", crate::timeline::elapsed_ms()),
                cpu_ms = format!("{:.2}", crate::timeline::process_cpu_ms()),
                rx_used,
                tx_used,
                ev_used,
                signal,
                "kick done"
            );
        }
        if signal {
            if let Err(e) = interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("vsock: cannot raise interrupt: {e}");
            }
        }
    }

    /// Drops every connection and tells the guest with a transport reset
    /// event (after a snapshot restore, host-side connections are gone).
    /// If the guest has no event buffer posted, the event is sent as soon as
    /// it posts one.
    pub fn reset_connections_and_send_transport_reset(&mut self) {
        self.muxer.reset_all();
        self.transport_reset_pending = true;
        self.kick();
        // Let the event loop apply the epoll removals and close the streams.
        let _ = self.activate_evt.write(1);
    }

    /// Writes a pending transport reset event; returns whether a used
    /// buffer was added to the event queue.
    fn deliver_transport_reset(&mut self) -> bool {
        if !self.transport_reset_pending {
            return false;
        }
        let DeviceState::Active { mem, queues, .. } = &mut self.state else {
            return false;
        };
        let Some(q) = queues.get_mut(EVQ) else {
            return false;
        };
        let Some(chain) = q.pop_descriptor_chain(&*mem) else {
            tracing::debug!("vsock: transport reset waits for an event buffer");
            return false;
        };
        let head = chain.head_index();
        let mut written = 0;
        if let Some(desc) = chain.clone().find(|d| d.is_write_only() && d.len() >= 4) {
            if mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                .is_ok()
            {
                written = 4;
                trace_event("transport reset delivered");
                self.transport_reset_pending = false;
                self.reset_unacked_since = Some(Instant::now());
            }
        }
        if let Err(e) = q.add_used(&*mem, head, written) {
            tracing::warn!("vsock: cannot return an event buffer: {e:?}");
            return false;
        }
        true
    }

    fn apply_epoll_changes(&mut self, ops: &mut EventOps) {
        for change in self.muxer.take_epoll_changes() {
            let r = match change {
                EpollChange::Add(fd, set) => ops.add(Events::new_raw(fd, set)).inspect_err(|_| {
                    // Without readiness events the stream cannot be served.
                    self.muxer.registration_failed(fd);
                }),
                EpollChange::Remove(fd) => ops.remove(Events::empty_raw(fd)),
            };
            if let Err(e) = r {
                tracing::warn!("vsock: epoll update failed: {e:?}");
            }
        }
        self.muxer.bury();
        let want = self.muxer.has_deadlines();
        if want != self.timer_armed {
            let r = if want {
                self.timer.reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL))
            } else {
                self.timer.clear()
            };
            if r.is_ok() {
                self.timer_armed = want;
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        crate::devices::virtio::read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        tracing::debug!("vsock: guest write to read-only config space ignored");
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
                "vsock needs its three queues ready".into(),
            ));
        }
        self.state = DeviceState::Active {
            mem,
            interrupt,
            queues,
        };
        self.muxer.set_active(true);
        self.activate_evt.write(1).map_err(ActivateError::Backend)?;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.muxer.set_active(false);
        self.muxer.reset_all();
        self.state = DeviceState::Inactive;
        self.transport_reset_pending = false;
        self.reset_unacked_since = None;
        // Called from a vCPU thread: wake the event loop so that it removes
        // the streams from epoll and closes them now.
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("vsock: cannot wake the event loop: {e}");
        }
        true
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Active { .. })
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<i32> = self.queue_evts.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.activate_evt.as_raw_fd());
        fds.push(self.muxer.listener_fd());
        fds.push(self.timer.as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("vsock: cannot register fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[i].read();
            if tracing::enabled!(target: "vsock_pkt", tracing::Level::TRACE) {
                tracing::trace!(
                    target: "vsock_pkt",
                    ms = format!("{:.2}", crate::timeline::elapsed_ms()),
                cpu_ms = format!("{:.2}", crate::timeline::process_cpu_ms()),
                    queue = i,
                    "queue notify"
                );
            }
            if i == EVQ && self.reset_unacked_since.take().is_some() {
                tracing::debug!("vsock: guest handled the transport reset");
            }
        } else if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
        } else if fd == self.muxer.listener_fd() {
            trace_event("host client");
            self.muxer.on_listener_ready();
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: the timer may have been re-armed or cleared since
            // epoll reported it, and a blocking read would then stall the loop.
            let _ = self.timer.wait();
            self.muxer.sweep(Instant::now());
        } else {
            self.muxer.on_stream_event(fd, set);
        }
        if self.is_activated() {
            self.kick();
        }
        self.apply_epoll_changes(ops);
    }
}

/// Per-packet trace (`--log-level vsock_pkt=trace`) with the time since
/// the VMM started, to see where a request's round trips go.
fn trace_packet(dir: &'static str, p: &Packet) {
    if tracing::enabled!(target: "vsock_pkt", tracing::Level::TRACE) {
        tracing::trace!(
            target: "vsock_pkt",
            ms = format!("{:.2}", crate::timeline::elapsed_ms()),
            cpu_ms = format!("{:.2}", crate::timeline::process_cpu_ms()),
            dir,
            op = p.hdr.op,
            src = p.hdr.src_port,
            dst = p.hdr.dst_port,
            len = p.hdr.len,
            flags = p.hdr.flags,
            "packet"
        );
    }
}

fn trace_event(what: &'static str) {
    if tracing::enabled!(target: "vsock_pkt", tracing::Level::TRACE) {
        tracing::trace!(
            target: "vsock_pkt",
            ms = format!("{:.2}", crate::timeline::elapsed_ms()),
            cpu_ms = format!("{:.2}", crate::timeline::process_cpu_ms()),
            what
        );
    }
}

/// A timerfd whose reads never block.
fn nonblocking_timer() -> Result<TimerFd, VsockError> {
    let timer = TimerFd::new().map_err(|e| VsockError::Io(e.into()))?;
    set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Io)?;
    Ok(timer)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a valid fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the driver wants an interrupt for new used buffers on `q`.
/// Without VIRTIO_F_EVENT_IDX that is the avail ring's NO_INTERRUPT flag.
fn guest_wants_interrupt(mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
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

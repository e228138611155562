//! The host side of vsock, Firecracker's "hybrid" style: host programs
//! connect to a Unix socket and write `CONNECT <port>\n`; guest connections
//! to host port P go to the Unix socket `<uds_path>_<P>`.
//!
//! The muxer owns the connection table. It consumes packets from the guest
//! ([`Muxer::handle_guest_packet`]), produces packets for the guest
//! ([`Muxer::next_rx`]), reacts to host socket readiness, and records the
//! epoll registrations the event loop must apply. Host streams are
//! non-blocking and registered edge-triggered; `readable`/`writable` flags
//! remember readiness until a read or write returns `WouldBlock`, so nothing
//! spins when the guest cannot take data.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use super::VsockError;

/// Host context id.
pub const HOST_CID: u64 = 2;
/// Receive buffer we advertise per connection (what the guest may send ahead).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// First local port handed to host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host client may take to send its CONNECT line, and the guest to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Control packets queued for the guest before we stop taking its TX packets.
const CONTROL_QUEUE_HIGH: usize = 1024;
/// Send a credit update once this much was consumed since the last one.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// An epoll registration change for the event loop to apply.
#[derive(Debug, PartialEq, Eq)]
pub enum EpollChange {
    /// Start watching `fd`.
    Add(RawFd, EventSet),
    /// Stop watching `fd` (the stream is closed only after this is applied).
    Remove(RawFd),
}

/// Events a host stream is registered for.
pub fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// (host-side port, guest port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    /// Host initiated; OP_REQUEST sent, waiting for OP_RESPONSE.
    Connecting { deadline: Instant },
    /// Data flows.
    Established,
}

struct Connection {
    stream: UnixStream,
    state: ConnState,
    host_initiated: bool,
    readable: bool,
    writable: bool,
    /// Bytes for the host stream that it could not take yet.
    to_host: VecDeque<u8>,
    /// Bytes read from the host before the connection was established.
    early: Vec<u8>,
    /// Bytes we forwarded to the host stream (reported as fwd_cnt).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    host_eof: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, host_initiated: bool) -> Self {
        Connection {
            stream,
            state,
            host_initiated,
            readable: true,
            writable: true,
            to_host: VecDeque::new(),
            early: Vec::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_eof: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
        }
    }

    /// Bytes we may still send to the guest.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered bytes to the host stream; returns false on a fatal error.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() && self.writable {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// A host client that has not sent its CONNECT line yet.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Parses `CONNECT <port>\n` (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// The connection table of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    active: bool,
    conns: HashMap<ConnKey, Connection>,
    fd_to_conn: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingClient>,
    control: VecDeque<Packet>,
    next_local_port: u32,
    epoll_changes: Vec<EpollChange>,
    graveyard: Vec<UnixStream>,
    on_first_response: Option<Box<dyn FnOnce(u32) + Send>>,
}

impl Muxer {
    /// Binds the host socket at `uds_path` (which must not exist).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Muxer, VsockError> {
        if uds_path.exists() {
            return Err(VsockError::SocketExists(uds_path));
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(VsockError::Io)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            active: false,
            conns: HashMap::new(),
            fd_to_conn: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
            epoll_changes: Vec::new(),
            graveyard: Vec::new(),
            on_first_response: None,
        })
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Path of the listening socket.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Called once, the first time a connection is established in either
    /// direction (the agent accepts one, or connects to the ready port).
    pub fn set_on_first_response(&mut self, f: Box<dyn FnOnce(u32) + Send>) {
        self.on_first_response = Some(f);
    }

    /// Whether the guest driver is up (connections are only made then).
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    /// Registration changes to apply, in order.
    pub fn take_epoll_changes(&mut self) -> Vec<EpollChange> {
        std::mem::take(&mut self.epoll_changes)
    }

    /// Closes streams whose epoll registration has been removed.
    pub fn bury(&mut self) {
        self.graveyard.clear();
    }

    /// Number of live connections (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Too many control packets are waiting for RX buffers: the device stops
    /// taking TX packets until the guest drains RX.
    pub fn control_full(&self) -> bool {
        self.control.len() >= CONTROL_QUEUE_HIGH
    }

    /// True when something could be sent to the guest now.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(|c| self.can_pull(c))
    }

    fn can_pull(&self, c: &Connection) -> bool {
        c.state == ConnState::Established
            && !c.peer_shut_rcv
            && (!c.early.is_empty() || (c.readable && !c.host_eof))
            && (c.peer_credit() > 0 || !c.credit_requested)
    }

    fn header(&self, key: ConnKey, op: u16) -> Header {
        let c = self.conns.get(&key);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: c.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        let mut hdr = self.header(key, op);
        hdr.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(Packet {
            hdr,
            data: Vec::new(),
        });
    }

    fn rst_reply(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return; // never answer a reset with a reset
        }
        self.control.push_back(Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            },
            data: Vec::new(),
        });
    }

    fn register(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            let fd = c.stream.as_raw_fd();
            self.fd_to_conn.insert(fd, key);
            self.epoll_changes
                .push(EpollChange::Add(fd, stream_events()));
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.fd_to_conn.remove(&fd);
            self.epoll_changes.push(EpollChange::Remove(fd));
            self.graveyard.push(c.stream);
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        self.push_control(key, OP_RST, 0);
        self.remove(key);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX {
                LOCAL_PORT_BASE
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, pkt: Packet) {
        let hdr = pkt.hdr;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: packet with wrong cids dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.rst_reply(&hdr);
            return;
        }
        if hdr.len as usize != pkt.data.len() {
            self.rst_reply(&hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.rst_reply(&hdr);
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        match hdr.op {
            OP_RESPONSE => {
                if matches!(conn.state, ConnState::Connecting { .. }) {
                    conn.state = ConnState::Established;
                    let line = format!("OK {}\n", key.local_port);
                    // A fresh Unix socket buffer always takes a short line.
                    if conn.stream.write_all(line.as_bytes()).is_err() {
                        self.reset_conn(key);
                        return;
                    }
                    if let Some(f) = self.on_first_response.take() {
                        tracing::info!(target: "timeline", port = key.peer_port, "agent ready");
                        f(key.peer_port);
                    }
                } else {
                    self.reset_conn(key);
                }
            }
            OP_RW => {
                if conn.state != ConnState::Established || conn.peer_shut_send {
                    self.reset_conn(key);
                    return;
                }
                let buffered = conn.to_host.len() + pkt.data.len();
                if buffered > CONN_BUF_ALLOC as usize {
                    tracing::warn!(
                        port = key.peer_port,
                        "vsock: guest exceeded its credit; resetting"
                    );
                    self.reset_conn(key);
                    return;
                }
                conn.to_host.extend(pkt.data.iter());
                if !conn.flush_to_host() {
                    self.reset_conn(key);
                    return;
                }
                self.maybe_credit_update(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.push_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                conn.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if conn.peer_shut_send && conn.to_host.is_empty() {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
                if conn.peer_shut_rcv && conn.peer_shut_send {
                    let _ = conn.flush_to_host();
                    self.reset_conn(key);
                }
            }
            OP_RST => self.remove(key),
            _ => self.reset_conn(key),
        }
    }

    fn maybe_credit_update(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
                self.push_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let mut c = Connection::new(stream, ConnState::Established, false);
                c.peer_buf_alloc = hdr.buf_alloc;
                c.peer_fwd_cnt = hdr.fwd_cnt;
                self.conns.insert(key, c);
                self.register(key);
                self.push_control(key, OP_RESPONSE, 0);
                if let Some(f) = self.on_first_response.take() {
                    tracing::info!(target: "timeline", port = key.local_port, "agent ready");
                    f(key.peer_port);
                }
            }
            Err(e) => {
                tracing::debug!(%path, "vsock: guest connection refused: {e}");
                self.rst_reply(hdr);
            }
        }
    }

    /// Produces the next packet for the guest, with at most `max_data`
    /// payload bytes, or `None` if there is nothing to send.
    pub fn next_rx(&mut self, max_data: usize) -> Option<Packet> {
        if let Some(p) = self.control.pop_front() {
            return Some(p);
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.state != ConnState::Established || c.peer_shut_rcv {
                continue;
            }
            let credit = c.peer_credit() as usize;
            let want_data = !c.early.is_empty() || (c.readable && !c.host_eof);
            if !want_data {
                continue;
            }
            if credit == 0 {
                if !c.credit_requested {
                    c.credit_requested = true;
                    let mut hdr = self.header(key, OP_CREDIT_REQUEST);
                    hdr.fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
                    return Some(Packet {
                        hdr,
                        data: Vec::new(),
                    });
                }
                continue;
            }
            let n = credit.min(max_data).min(MAX_PKT_DATA);
            let mut data;
            if !c.early.is_empty() {
                let take = n.min(c.early.len());
                data = c.early.drain(..take).collect::<Vec<u8>>();
            } else {
                data = vec![0u8; n];
                match c.stream.read(&mut data) {
                    Ok(0) => {
                        c.host_eof = true;
                        let done = c.peer_shut_send;
                        if done {
                            self.reset_conn(key);
                            return self.control.pop_front();
                        }
                        let mut hdr = self.header(key, OP_SHUTDOWN);
                        hdr.flags = SHUTDOWN_SEND;
                        return Some(Packet {
                            hdr,
                            data: Vec::new(),
                        });
                    }
                    Ok(got) => data.truncate(got),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.readable = false;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.reset_conn(key);
                        return self.control.pop_front();
                    }
                }
            }
            c.tx_cnt = c.tx_cnt.wrapping_add(data.len() as u32);
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let mut hdr = self.header(key, OP_RW);
            hdr.len = data.len() as u32;
            return Some(Packet { hdr, data });
        }
        None
    }

    /// New host clients on the listening socket.
    pub fn on_listener_ready(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.active || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: the guest cannot take connections yet
                    }
                    let fd = stream.as_raw_fd();
                    self.epoll_changes
                        .push(EpollChange::Add(fd, stream_events()));
                    self.pending.insert(
                        fd,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + CONNECT_TIMEOUT,
                        },
                    );
                    // The line may already be there (edge-triggered).
                    self.read_connect_line(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            self.epoll_changes.push(EpollChange::Remove(fd));
            self.graveyard.push(p.stream);
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 64];
        loop {
            match p.stream.read(&mut buf) {
                Ok(0) => {
                    self.drop_pending(fd);
                    return;
                }
                Ok(n) => {
                    p.line.extend_from_slice(&buf[..n]);
                    if let Some(nl) = p.line.iter().position(|b| *b == b'\n') {
                        let rest = p.line.split_off(nl + 1);
                        let port = parse_connect_line(&p.line[..nl]);
                        let Some(p) = self.pending.remove(&fd) else {
                            return;
                        };
                        match port {
                            Some(port) if self.active => self.host_connect(p.stream, port, rest),
                            _ => {
                                self.epoll_changes.push(EpollChange::Remove(fd));
                                self.graveyard.push(p.stream);
                            }
                        }
                        return;
                    }
                    if p.line.len() > MAX_CONNECT_LINE {
                        self.drop_pending(fd);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_pending(fd);
                    return;
                }
            }
        }
    }

    fn host_connect(&mut self, stream: UnixStream, port: u32, early: Vec<u8>) {
        let key = ConnKey {
            local_port: self.alloc_local_port(),
            peer_port: port,
        };
        let fd = stream.as_raw_fd();
        let mut c = Connection::new(
            stream,
            ConnState::Connecting {
                deadline: Instant::now() + CONNECT_TIMEOUT,
            },
            true,
        );
        c.early = early;
        self.conns.insert(key, c);
        // Already registered with epoll while pending.
        self.fd_to_conn.insert(fd, key);
        self.push_control(key, OP_REQUEST, 0);
    }

    /// Readiness on a host stream (pending client or connection).
    pub fn on_stream_event(&mut self, fd: RawFd, events: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.fd_to_conn.get(&fd) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::IN)
            || events.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP)
        {
            c.readable = true;
            if matches!(c.state, ConnState::Connecting { .. })
                && events.contains(EventSet::READ_HANG_UP)
            {
                // The host client gave up before the guest answered.
                self.reset_conn(key);
                return;
            }
        }
        if events.contains(EventSet::OUT) {
            c.writable = true;
            if !c.flush_to_host() {
                self.reset_conn(key);
                return;
            }
            if c.to_host.is_empty() && c.peer_shut_send {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            self.maybe_credit_update(key);
        }
        if events.contains(EventSet::ERROR) {
            self.reset_conn(key);
        }
    }

    /// True while something has a deadline (the device arms its timer).
    pub fn has_deadlines(&self) -> bool {
        !self.pending.is_empty()
            || self
                .conns
                .values()
                .any(|c| !matches!(c.state, ConnState::Established))
    }

    /// Expires pending clients and connects the guest did not answer.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            self.drop_pending(fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::Connecting { deadline } => deadline <= now,
                ConnState::Established => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset_conn(key);
        }
    }

    /// Drops every connection and queued packet (device reset, restore).
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.pending.keys().copied().collect();
        for fd in fds {
            self.drop_pending(fd);
        }
        self.control.clear();
    }

    /// Whether a connection is host initiated (diagnostics).
    pub fn host_initiated_count(&self) -> usize {
        self.conns.values().filter(|c| c.host_initiated).count()
    }

    #[cfg(test)]
    fn close_deadline_for_tests(&mut self) {
        for c in self.conns.values_mut() {
            c.state = ConnState::Connecting {
                deadline: Instant::now() - Duration::from_secs(1),
            };
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn guest_pkt(src_port: u32, dst_port: u32, op: u16, data: &[u8]) -> Packet {
        Packet {
            hdr: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 64 * 1024,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    /// EOF, or a reset when the peer closed with our data unread.
    fn assert_closed(s: &mut UnixStream) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("stream not closed: {other:?}"),
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    /// Host connect handshake; returns (muxer, client, local_port).
    fn connected(name: &str) -> (Muxer, UnixStream, u32, PathBuf) {
        let d = dir(name);
        let mut m = Muxer::new(CID, d.join("v.sock")).unwrap();
        m.set_active(true);
        let mut client = UnixStream::connect(d.join("v.sock")).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        m.on_listener_ready();
        let req = m.next_rx(4096).expect("OP_REQUEST");
        assert_eq!(req.hdr.op, OP_REQUEST);
        assert_eq!(req.hdr.dst_port, 1024);
        assert_eq!(req.hdr.dst_cid, CID);
        let local = req.hdr.src_port;
        m.handle_guest_packet(guest_pkt(1024, local, OP_RESPONSE, &[]));
        assert_eq!(read_line(&mut client), format!("OK {local}"));
        (m, client, local, d)
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
        assert_eq!(parse_connect_line(b"\xff\xfe"), None);
    }

    #[test]
    fn existing_socket_path_is_refused() {
        let d = dir("exists");
        std::fs::write(d.join("v.sock"), b"").unwrap();
        assert!(matches!(
            Muxer::new(CID, d.join("v.sock")),
            Err(VsockError::SocketExists(_))
        ));
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let (mut m, mut client, local, d) = connected("data");
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Guest -> host.
        m.handle_guest_packet(guest_pkt(1024, local, OP_RW, b"hello"));
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Host -> guest.
        client.write_all(b"world").unwrap();
        let p = m.next_rx(4096).expect("data packet");
        assert_eq!(p.hdr.op, OP_RW);
        assert_eq!(p.data, b"world");
        assert_eq!(p.hdr.len, 5);
        assert_eq!(p.hdr.fwd_cnt, 5, "we consumed 5 bytes of the guest's");
        assert!(m.next_rx(4096).is_none());
        assert!(!fired.load(std::sync::atomic::Ordering::SeqCst));
        drop(m);
        assert!(!d.join("v.sock").exists(), "socket unlinked on drop");
    }

    #[test]
    fn credit_is_respected() {
        let (mut m, mut client, local, _d) = connected("credit");
        // Guest advertises only 8 bytes of buffer.
        let mut upd = guest_pkt(1024, local, OP_CREDIT_UPDATE, &[]);
        upd.hdr.buf_alloc = 8;
        m.handle_guest_packet(upd);
        client.write_all(b"0123456789abcdef").unwrap();
        let p = m.next_rx(4096).unwrap();
        assert_eq!(p.data, b"01234567");
        // Out of credit: one credit request, then nothing.
        let r = m.next_rx(4096).unwrap();
        assert_eq!(r.hdr.op, OP_CREDIT_REQUEST);
        assert!(m.next_rx(4096).is_none());
        // The guest consumed it all.
        let mut upd = guest_pkt(1024, local, OP_CREDIT_UPDATE, &[]);
        upd.hdr.buf_alloc = 8;
        upd.hdr.fwd_cnt = 8;
        m.handle_guest_packet(upd);
        assert_eq!(m.next_rx(4096).unwrap().data, b"89abcdef");
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let (mut m, _client, local, _d) = connected("flood");
        let chunk = vec![0u8; MAX_PKT_DATA];
        // Nobody reads the client side: data piles up in our buffer.
        for _ in 0..64 {
            m.handle_guest_packet(guest_pkt(1024, local, OP_RW, &chunk));
            if m.connection_count() == 0 {
                break;
            }
        }
        assert_eq!(m.connection_count(), 0);
        let mut saw_rst = false;
        while let Some(p) = m.next_rx(4096) {
            saw_rst |= p.hdr.op == OP_RST;
        }
        assert!(saw_rst);
    }

    #[test]
    fn rst_when_guest_has_no_listener() {
        let d = dir("rst");
        let mut m = Muxer::new(CID, d.join("v.sock")).unwrap();
        m.set_active(true);
        let mut client = UnixStream::connect(d.join("v.sock")).unwrap();
        client.write_all(b"CONNECT 9999\n").unwrap();
        m.on_listener_ready();
        let req = m.next_rx(4096).unwrap();
        m.handle_guest_packet(guest_pkt(9999, req.hdr.src_port, OP_RST, &[]));
        assert_eq!(m.connection_count(), 0);
        m.bury();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 8];
        assert_eq!(client.read(&mut b).unwrap(), 0, "client sees EOF, no OK");
    }

    #[test]
    fn junk_connect_line_closes_the_stream() {
        let d = dir("junk");
        let mut m = Muxer::new(CID, d.join("v.sock")).unwrap();
        m.set_active(true);
        let mut client = UnixStream::connect(d.join("v.sock")).unwrap();
        client.write_all(b"HELLO THERE\n").unwrap();
        m.on_listener_ready();
        m.bury();
        assert!(m.next_rx(4096).is_none());
        assert_closed(&mut client);
        // Overlong line without newline.
        let mut c2 = UnixStream::connect(d.join("v.sock")).unwrap();
        c2.write_all(&[b'C'; 100]).unwrap();
        m.on_listener_ready();
        m.bury();
        assert_closed(&mut c2);
    }

    #[test]
    fn inactive_device_refuses_host_clients() {
        let d = dir("inactive");
        let mut m = Muxer::new(CID, d.join("v.sock")).unwrap();
        let mut client = UnixStream::connect(d.join("v.sock")).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        m.on_listener_ready();
        assert!(m.next_rx(4096).is_none());
        assert_closed(&mut client);
    }

    #[test]
    fn bad_packets_are_dropped_or_reset() {
        let (mut m, _client, local, _d) = connected("bad");
        // Wrong source cid: silently dropped.
        let mut p = guest_pkt(1024, local, OP_RW, b"x");
        p.hdr.src_cid = 99;
        m.handle_guest_packet(p);
        // Wrong destination cid.
        let mut p = guest_pkt(1024, local, OP_RW, b"x");
        p.hdr.dst_cid = 7;
        m.handle_guest_packet(p);
        assert!(m.next_rx(4096).is_none());
        assert_eq!(m.connection_count(), 1);
        // Unsupported type: RST reply.
        let mut p = guest_pkt(5, 6, OP_REQUEST, &[]);
        p.hdr.type_ = 2;
        m.handle_guest_packet(p);
        assert_eq!(m.next_rx(4096).unwrap().hdr.op, OP_RST);
        // Header length that does not match the payload.
        let mut p = guest_pkt(1024, local, OP_RW, b"abc");
        p.hdr.len = 100;
        m.handle_guest_packet(p);
        assert_eq!(m.next_rx(4096).unwrap().hdr.op, OP_RST);
        // Unknown op on a live connection resets it.
        m.handle_guest_packet(guest_pkt(1024, local, 42, &[]));
        assert_eq!(m.connection_count(), 0);
        // Packet for an unknown connection: RST, but never answer RST with RST.
        m.handle_guest_packet(guest_pkt(1, 2, OP_RW, b"z"));
        m.handle_guest_packet(guest_pkt(1, 2, OP_RST, &[]));
        let mut rsts = 0;
        while let Some(p) = m.next_rx(4096) {
            if p.hdr.op == OP_RST {
                rsts += 1;
            }
        }
        assert_eq!(
            rsts, 2,
            "one for the unknown op, one for the unknown connection"
        );
    }

    #[test]
    fn guest_initiated_connection() {
        let d = dir("guest");
        let base = d.join("v.sock");
        let l = UnixListener::bind(format!("{}_5000", base.display())).unwrap();
        let mut m = Muxer::new(CID, base).unwrap();
        m.set_active(true);
        m.handle_guest_packet(guest_pkt(777, 5000, OP_REQUEST, &[]));
        let resp = m.next_rx(4096).unwrap();
        assert_eq!(resp.hdr.op, OP_RESPONSE);
        assert_eq!(resp.hdr.dst_port, 777);
        let (mut s, _) = l.accept().unwrap();
        m.handle_guest_packet(guest_pkt(777, 5000, OP_RW, b"ping"));
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // No listener on another port: RST.
        m.handle_guest_packet(guest_pkt(778, 5001, OP_REQUEST, &[]));
        assert_eq!(m.next_rx(4096).unwrap().hdr.op, OP_RST);
    }

    #[test]
    fn shutdowns() {
        let (mut m, mut client, local, _d) = connected("shut");
        // Host half-close: the guest gets SHUTDOWN(SEND).
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let p = m.next_rx(4096).unwrap();
        assert_eq!(p.hdr.op, OP_SHUTDOWN);
        assert_eq!(p.hdr.flags, SHUTDOWN_SEND);
        // The guest can still send.
        m.handle_guest_packet(guest_pkt(1024, local, OP_RW, b"late"));
        let mut b = [0u8; 4];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"late");
        // Full shutdown from the guest: RST and the stream closes.
        let mut s = guest_pkt(1024, local, OP_SHUTDOWN, &[]);
        s.hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        m.handle_guest_packet(s);
        assert_eq!(m.next_rx(4096).unwrap().hdr.op, OP_RST);
        assert_eq!(m.connection_count(), 0);
        m.bury();
        assert_eq!(client.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn timeouts_reset_connections() {
        let (mut m, _client, _local, _d) = connected("timeout");
        m.close_deadline_for_tests();
        assert!(m.has_deadlines());
        m.sweep(Instant::now());
        assert_eq!(m.connection_count(), 0);
        assert!(!m.has_deadlines());
    }
}

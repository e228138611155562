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
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
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
/// How long a slow host reader gets to drain what a closing guest sent
/// (Linux guests give up and reset after 8 s themselves).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// The guest shut down both directions while data for the host stream
    /// was still buffered: flush it, then answer OP_RST.
    Closing { deadline: Instant },
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
    /// The host peer closed both directions (EPOLLHUP), not just its write side.
    host_hup: bool,
    /// We told the guest that we will neither send nor receive any more.
    sent_full_shutdown: bool,
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
            host_hup: false,
            sent_full_shutdown: false,
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

/// Connects to a host listener without blocking the event loop: a Unix
/// stream connect completes at once, or fails (EAGAIN) when the listener's
/// backlog is full.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unusable socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a plain system call without pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"))?;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len`
    // does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
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
    agent_ready: bool,
    /// Where the next round-robin pass over the connections starts.
    rr_cursor: usize,
    /// (device, inode) of the socket we bound, so Drop only unlinks our own.
    socket_id: Option<(u64, u64)>,
}

impl Muxer {
    /// Binds the host socket at `uds_path` (which must not exist).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Muxer, VsockError> {
        // symlink_metadata: a dangling symlink also counts as existing.
        if std::fs::symlink_metadata(&uds_path).is_ok() {
            return Err(VsockError::SocketExists(uds_path));
        }
        let listener = match UnixListener::bind(&uds_path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(VsockError::SocketExists(uds_path));
            }
            Err(source) => {
                return Err(VsockError::Bind {
                    path: uds_path,
                    source,
                })
            }
        };
        let socket_id = std::fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
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
            agent_ready: false,
            rr_cursor: 0,
            socket_id,
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

    /// The local port the next host-initiated connection gets.
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Continues local port numbering from `port` (a restored VM carries
    /// on from its snapshot, see [`super::device::VsockState`]); ports
    /// below the host-initiated range are ignored.
    pub fn set_next_local_port(&mut self, port: u32) {
        if port >= LOCAL_PORT_BASE {
            self.next_local_port = port;
        }
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
                    self.note_agent_ready(key.peer_port);
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
                if conn.peer_shut_rcv {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Read);
                }
                if conn.peer_shut_rcv && conn.peer_shut_send {
                    if !conn.flush_to_host() || conn.to_host.is_empty() {
                        self.reset_conn(key);
                    } else {
                        // Keep what the guest sent: finish writing it first.
                        conn.state = ConnState::Closing {
                            deadline: Instant::now() + CLOSE_TIMEOUT,
                        };
                    }
                }
            }
            OP_RST => self.remove(key),
            _ => self.reset_conn(key),
        }
    }

    /// The first established connection (either direction) means the agent
    /// is up: log it for the boot timeline and run the callback once.
    fn note_agent_ready(&mut self, port: u32) {
        if self.agent_ready {
            return;
        }
        self.agent_ready = true;
        tracing::info!(target: "timeline", port, "agent ready");
        if let Some(f) = self.on_first_response.take() {
            f(port);
        }
    }

    /// The event loop could not watch `fd`: drop whatever it belongs to
    /// (there is no epoll registration to remove).
    pub fn registration_failed(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            self.graveyard.push(p.stream);
            return;
        }
        if let Some(key) = self.fd_to_conn.remove(&fd) {
            self.push_control(key, OP_RST, 0);
            if let Some(c) = self.conns.remove(&key) {
                self.graveyard.push(c.stream);
            }
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
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut c = Connection::new(stream, ConnState::Established, false);
                c.peer_buf_alloc = hdr.buf_alloc;
                c.peer_fwd_cnt = hdr.fwd_cnt;
                self.conns.insert(key, c);
                self.register(key);
                self.push_control(key, OP_RESPONSE, 0);
                self.note_agent_ready(key.local_port);
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
        // Round robin over the connections so that one busy stream cannot
        // starve the others (the map's order is stable while it is unchanged).
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let start = self.rr_cursor % keys.len().max(1);
        for i in 0..keys.len() {
            let pos = (start + i) % keys.len();
            let Some(&key) = keys.get(pos) else {
                continue;
            };
            if let Some(p) = self.pull(key, max_data) {
                self.rr_cursor = pos + 1;
                return Some(p);
            }
        }
        None
    }

    /// The next packet of one connection, if it has something to send.
    fn pull(&mut self, key: ConnKey, max_data: usize) -> Option<Packet> {
        let c = self.conns.get_mut(&key)?;
        if c.state != ConnState::Established || c.peer_shut_rcv {
            return None;
        }
        let credit = c.peer_credit() as usize;
        let want_data = !c.early.is_empty() || (c.readable && !c.host_eof);
        if !want_data {
            return None;
        }
        if credit == 0 {
            if !c.credit_requested {
                c.credit_requested = true;
                let hdr = self.header(key, OP_CREDIT_REQUEST);
                return Some(Packet {
                    hdr,
                    data: Vec::new(),
                });
            }
            return None;
        }
        let n = credit.min(max_data).min(MAX_PKT_DATA);
        if n == 0 {
            // An RX buffer without room for data; reading 0 bytes would look like EOF.
            return None;
        }
        let mut data;
        if !c.early.is_empty() {
            let take = n.min(c.early.len());
            data = c.early.drain(..take).collect::<Vec<u8>>();
        } else {
            data = vec![0u8; n];
            match c.stream.read(&mut data) {
                Ok(0) => {
                    c.host_eof = true;
                    if c.peer_shut_send {
                        // Both directions are finished.
                        self.reset_conn(key);
                        return self.control.pop_front();
                    }
                    // A host peer that closed (rather than shut down its
                    // write side) will not read either.
                    let mut flags = SHUTDOWN_SEND;
                    if c.host_hup {
                        flags |= SHUTDOWN_RCV;
                        c.sent_full_shutdown = true;
                    }
                    let mut hdr = self.header(key, OP_SHUTDOWN);
                    hdr.flags = flags;
                    return Some(Packet {
                        hdr,
                        data: Vec::new(),
                    });
                }
                Ok(got) => data.truncate(got),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return None,
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
        Some(Packet { hdr, data })
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
                        let port = if nl <= MAX_CONNECT_LINE {
                            parse_connect_line(&p.line[..nl])
                        } else {
                            None
                        };
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
        if events.contains(EventSet::HANG_UP) {
            c.host_hup = true;
            // We already forwarded the host's EOF as a half-close; now it is
            // gone entirely, so it will not read either.
            if c.host_eof && !c.sent_full_shutdown && c.state == ConnState::Established {
                c.sent_full_shutdown = true;
                self.push_control(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                return;
            }
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            c.writable = true;
            if !c.flush_to_host() {
                self.reset_conn(key);
                return;
            }
            if c.to_host.is_empty() && c.peer_shut_send {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                if matches!(c.state, ConnState::Closing { .. }) {
                    self.reset_conn(key);
                    return;
                }
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
                ConnState::Connecting { deadline } | ConnState::Closing { deadline } => {
                    deadline <= now
                }
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
        // Only unlink the socket we created, not one that replaced it.
        let current = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    /// A test's socket directory, removed when the test ends.
    struct TestDir(PathBuf);

    impl std::ops::Deref for TestDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("vessel-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
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
    fn connected(name: &str) -> (Muxer, UnixStream, u32, TestDir) {
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

    #[test]
    fn rx_buffer_without_data_room_is_not_eof() {
        let (mut m, mut client, _local, _d) = connected("zero-room");
        client.write_all(b"abc").unwrap();
        let p = m.next_rx(0);
        assert_ne!(
            p.map(|p| p.hdr.op),
            Some(OP_SHUTDOWN),
            "a 0-byte rx buffer made us report host EOF"
        );
    }
}

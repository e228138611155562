//! Device-level tests: guest memory from `from_ranges`, virtqueues laid out
//! by `MockSplitQueue`, the device driven through a real `EventManager`, and
//! real Unix sockets in a temp dir as the host side. No KVM needed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::packet::*;
use super::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};

const CID: u64 = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 16 << 20;
/// Far outside the 16 MiB of guest memory.
const OUTSIDE: u64 = 0x7fff_0000_0000;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn parse_header(b: &[u8; HDR_SIZE]) -> Header {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// The guest driver side: three queues in guest memory, buffers, and the
/// device behind an event manager.
struct Harness {
    mem: &'static GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    next_desc: [u16; 3],
    used_seen: [u16; 3],
    next_buf: u64,
    /// RX chain head -> (header address, data address, data length).
    rx_bufs: HashMap<u16, (u64, u64, u32)>,
    vsock: Arc<Mutex<Vsock>>,
    em: EventManager<Subscriber>,
    irq: Arc<Interrupt>,
    dir: PathBuf,
    uds: PathBuf,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!("vsock-dev-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let queues = (0..3u64)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x10000 * (i + 1)), QSIZE))
            .collect();
        let vsock = Arc::new(Mutex::new(Vsock::new(CID, uds.clone()).unwrap()));
        let mut em = EventManager::<Subscriber>::new().unwrap();
        let sub: Subscriber = vsock.clone();
        em.add_subscriber(sub);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Harness {
            mem,
            queues,
            next_desc: [0; 3],
            used_seen: [0; 3],
            next_buf: 0x10_0000,
            rx_bufs: HashMap::new(),
            vsock,
            em,
            irq,
            dir,
            uds,
        }
    }

    fn activated(name: &str) -> Harness {
        let mut h = Harness::new(name);
        let queues: Vec<Queue> = h.queues.iter().map(|q| q.create_queue().unwrap()).collect();
        h.vsock
            .lock()
            .unwrap()
            .activate(h.mem.clone(), h.irq.clone(), queues)
            .unwrap();
        h.pump();
        h
    }

    /// Runs the event loop until it has nothing left to do.
    fn pump(&mut self) {
        for _ in 0..50 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
    }

    fn notify(&mut self, q: usize) {
        self.vsock.lock().unwrap().queue_events()[q]
            .write(1)
            .unwrap();
        self.pump();
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len.max(16) + 15) & !15;
        assert!(self.next_buf < MEM_SIZE as u64);
        addr
    }

    /// Makes a chain of (addr, len, flags) descriptors available on `q`;
    /// returns its head index.
    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u32)]) -> u16 {
        let head = self.next_desc[q];
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        self.queues[q].add_desc_chains(&raw, head).unwrap();
        self.next_desc[q] = (head + n) % QSIZE;
        head
    }

    /// Puts a packet on the TX queue (header and data in separate descriptors).
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let h = self.alloc(HDR_SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.add_chain(TXQ, &[(h, HDR_SIZE as u32, 0)]);
        } else {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.add_chain(TXQ, &[(h, HDR_SIZE as u32, 0), (d, data.len() as u32, 0)]);
        }
        self.notify(TXQ);
    }

    /// Puts a packet on the TX queue with its bytes (header then payload)
    /// cut into descriptors of the given lengths, wherever the cuts fall.
    /// The last descriptor takes whatever is left. Returns the head index.
    fn send_layout(&mut self, mut hdr: Header, data: &[u8], cuts: &[usize]) -> u16 {
        hdr.len = data.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        let mut descs = Vec::new();
        let mut rest = &bytes[..];
        for &n in cuts {
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            descs.push(piece);
            rest = tail;
        }
        if !rest.is_empty() {
            descs.push(rest);
        }
        let descs: Vec<(u64, u32, u32)> = descs
            .into_iter()
            .map(|piece| {
                let a = self.alloc(piece.len() as u64);
                self.mem.write_slice(piece, GuestAddress(a)).unwrap();
                (a, piece.len() as u32, 0)
            })
            .collect();
        let head = self.add_chain(TXQ, &descs);
        self.notify(TXQ);
        head
    }

    /// Posts `n` RX buffers with room for `room` bytes of data each.
    fn post_rx(&mut self, n: usize, room: u32) {
        for _ in 0..n {
            let h = self.alloc(HDR_SIZE as u64);
            let d = self.alloc(u64::from(room));
            let head = self.add_chain(
                RXQ,
                &[
                    (h, HDR_SIZE as u32, VRING_DESC_F_WRITE),
                    (d, room, VRING_DESC_F_WRITE),
                ],
            );
            self.rx_bufs.insert(head, (h, d, room));
        }
        self.notify(RXQ);
    }

    /// New used entries of queue `q`: (head, len).
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let ring = self.queues[q].used();
        let idx = ring.idx().load();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = ring
                .ring()
                .ref_at(usize::from(self.used_seen[q] % QSIZE))
                .unwrap()
                .load();
            out.push((e.id() as u16, e.len()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Packets the device wrote into RX buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.used(RXQ) {
            let Some(&(h, d, room)) = self.rx_bufs.get(&head) else {
                continue;
            };
            if len == 0 {
                continue;
            }
            let mut b = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut b, GuestAddress(h)).unwrap();
            let hdr = parse_header(&b);
            assert_eq!(len as usize, HDR_SIZE + hdr.len as usize);
            assert!(hdr.len <= room);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
            out.push((hdr, data));
        }
        out
    }

    fn interrupted(&self) -> bool {
        self.irq.eventfd().read().is_ok()
    }

    /// Host client CONNECT -> guest OP_REQUEST -> OP_RESPONSE -> "OK".
    /// Returns (client, host-side local port).
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.pump();
        self.post_rx(1, 4096);
        let pkts = self.received();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].0;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (2, CID, port));
        assert_eq!(req.type_, TYPE_STREAM);
        assert!(
            req.src_port >= 1 << 30,
            "local ports come from the ephemeral range"
        );
        assert_eq!(req.buf_alloc, 256 * 1024);
        self.send(guest_hdr(port, req.src_port, OP_RESPONSE), &[]);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while client.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        assert_eq!(
            String::from_utf8(line).unwrap(),
            format!("OK {}", req.src_port)
        );
        (client, req.src_port)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_closed(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("stream not closed: {other:?}"),
    }
}

#[test]
fn config_space_features_and_queues() {
    let h = Harness::new("config");
    let v = h.vsock.lock().unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        v.avail_features() & !(1 << 32),
        0,
        "nothing beyond VERSION_1"
    );
    assert_eq!(v.queue_events().len(), 3);
    let mut cfg = [0u8; 8];
    v.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0xffu8; 4];
    v.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 4];
    v.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    v.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn existing_socket_path_is_refused_and_kept() {
    let h = Harness::new("exists");
    assert!(Vsock::new(CID, h.uds.clone()).is_err());
    assert!(h.uds.exists(), "the other owner's socket is not unlinked");
}

#[test]
fn activation_needs_three_ready_queues() {
    let h = Harness::new("activate");
    let mut queues: Vec<Queue> = h.queues.iter().map(|q| q.create_queue().unwrap()).collect();
    queues.pop();
    let mut v = h.vsock.lock().unwrap();
    assert!(v.activate(h.mem.clone(), h.irq.clone(), queues).is_err());
    assert!(!v.is_activated());
}

#[test]
fn bad_tx_chains_are_consumed_without_reply_or_panic() {
    let mut h = Harness::activated("badtx");
    h.post_rx(4, 4096);
    let hdr_at = |h: &mut Harness, len: u32| {
        let mut hdr = guest_hdr(1000, 2000, OP_RW);
        hdr.len = len;
        let a = h.alloc(HDR_SIZE as u64);
        h.mem.write_slice(&hdr.to_bytes(), GuestAddress(a)).unwrap();
        a
    };
    // Header descriptor outside guest memory.
    h.add_chain(TXQ, &[(OUTSIDE, HDR_SIZE as u32, 0)]);
    // Header descriptor shorter than a header.
    let a = hdr_at(&mut h, 0);
    h.add_chain(TXQ, &[(a, 10, 0)]);
    // Header-only chain that claims a payload.
    let a = hdr_at(&mut h, 100);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32, 0)]);
    // Payload descriptor shorter than the claimed length.
    let a = hdr_at(&mut h, 100);
    let d = h.alloc(100);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32, 0), (d, 50, 0)]);
    // Payload descriptor outside guest memory.
    let a = hdr_at(&mut h, 100);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32, 0), (OUTSIDE, 100, 0)]);
    // Payload straddling the end of guest memory.
    let a = hdr_at(&mut h, 100);
    h.add_chain(
        TXQ,
        &[(a, HDR_SIZE as u32, 0), (MEM_SIZE as u64 - 50, 100, 0)],
    );
    // Length over the 64 KiB maximum.
    let a = hdr_at(&mut h, 100_000);
    let d = h.alloc(100_000);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32, 0), (d, 100_000, 0)]);
    // Device-writable descriptors on the TX queue.
    let a = hdr_at(&mut h, 0);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32, VRING_DESC_F_WRITE)]);
    // A descriptor whose `next` points past the table.
    let a = hdr_at(&mut h, 4);
    let raw = RawDescriptor::from(SplitDescriptor::new(
        a,
        HDR_SIZE as u32,
        VRING_DESC_F_NEXT as u16,
        QSIZE + 5,
    ));
    let head = h.next_desc[TXQ];
    h.queues[TXQ].add_desc_chains(&[raw], head).unwrap();
    h.next_desc[TXQ] += 1;
    h.notify(TXQ);
    assert_eq!(h.used(TXQ).len(), 9, "every chain is returned to the guest");
    assert!(
        h.received().is_empty(),
        "nothing to answer for packets we cannot read"
    );
    // The device still works.
    h.send(guest_hdr(1000, 77, OP_REQUEST), &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
}

#[test]
fn header_checks_drop_or_reset() {
    let mut h = Harness::activated("headers");
    h.post_rx(8, 4096);
    // Wrong source or destination cid: dropped silently.
    let mut hdr = guest_hdr(1, 2, OP_REQUEST);
    hdr.src_cid = 99;
    h.send(hdr, &[]);
    let mut hdr = guest_hdr(1, 2, OP_REQUEST);
    hdr.dst_cid = 7;
    h.send(hdr, &[]);
    assert!(h.received().is_empty());
    // Unsupported socket type: RST.
    let mut hdr = guest_hdr(1, 2, OP_REQUEST);
    hdr.type_ = 2;
    h.send(hdr, &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (2, 1));
    assert_eq!((pkts[0].0.src_cid, pkts[0].0.dst_cid), (2, CID));
    // Unknown op or data for a connection that does not exist: RST.
    h.send(guest_hdr(1, 2, 99), &[]);
    h.send(guest_hdr(1, 2, OP_RW), b"data");
    let ops: Vec<u16> = h.received().iter().map(|p| p.0.op).collect();
    assert_eq!(ops, vec![OP_RST, OP_RST]);
    // A reset is never answered with a reset.
    h.send(guest_hdr(1, 2, OP_RST), &[]);
    assert!(h.received().is_empty());
}

#[test]
fn bad_rx_chains_are_consumed_without_panic() {
    let mut h = Harness::activated("badrx");
    // RX buffer outside memory, a read-only one, a too short header, then a good one.
    h.add_chain(RXQ, &[(OUTSIDE, 4096, VRING_DESC_F_WRITE)]);
    let a = h.alloc(4096);
    h.add_chain(RXQ, &[(a, 4096, 0)]);
    let a = h.alloc(16);
    h.add_chain(RXQ, &[(a, 16, VRING_DESC_F_WRITE)]);
    h.post_rx(1, 4096);
    h.send(guest_hdr(5, 6, OP_REQUEST), &[]);
    let used = h.used(RXQ);
    assert_eq!(used.len(), 4, "{used:?}");
    assert_eq!(used.iter().filter(|(_, len)| *len == 0).count(), 3);
    let (head, len) = used[3];
    assert_eq!(len as usize, HDR_SIZE);
    let (hh, _, _) = h.rx_bufs[&head];
    let mut b = [0u8; HDR_SIZE];
    h.mem.read_slice(&mut b, GuestAddress(hh)).unwrap();
    assert_eq!(parse_header(&b).op, OP_RST);
}

#[test]
fn host_connect_handshake_and_relay_both_ways() {
    let mut h = Harness::activated("relay");
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    h.vsock
        .lock()
        .unwrap()
        .set_on_first_response(Box::new(move |port| s.store(port, Ordering::SeqCst)));
    let (mut client, local) = h.host_connect(1024);
    assert_eq!(seen.load(Ordering::SeqCst), 1024, "boot timeline callback");
    // Guest -> host.
    h.send(guest_hdr(1024, local, OP_RW), b"ping");
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    // Host -> guest.
    let _ = h.interrupted();
    client.write_all(b"pong").unwrap();
    h.pump();
    h.post_rx(1, 4096);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    let (hdr, data) = &pkts[0];
    assert_eq!(hdr.op, OP_RW);
    assert_eq!(data, b"pong");
    assert_eq!((hdr.src_port, hdr.dst_port), (local, 1024));
    assert_eq!(hdr.fwd_cnt, 4, "we report what we forwarded to the host");
    assert_eq!(hdr.buf_alloc, 256 * 1024);
    assert!(h.interrupted(), "the guest is told about used RX buffers");
}

#[test]
fn no_interrupt_flag_is_honoured() {
    let mut h = Harness::activated("noirq");
    let (mut client, _local) = h.host_connect(1024);
    // The driver sets VRING_AVAIL_F_NO_INTERRUPT on the RX queue.
    let avail = h.queues[RXQ].avail_addr();
    h.mem.write_obj(1u16.to_le(), avail).unwrap();
    h.post_rx(1, 4096);
    let _ = h.interrupted();
    client.write_all(b"x").unwrap();
    h.pump();
    assert_eq!(h.received().len(), 1);
    assert!(!h.interrupted());
}

#[test]
fn host_connect_refused_by_guest_closes_client() {
    let mut h = Harness::activated("refused");
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 9999\n").unwrap();
    h.pump();
    h.post_rx(1, 4096);
    let req = h.received()[0].0;
    h.send(guest_hdr(9999, req.src_port, OP_RST), &[]);
    assert_closed(&mut client);
}

#[test]
fn host_connect_before_activation_is_closed() {
    let mut h = Harness::new("inactive");
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    assert_closed(&mut client);
}

#[test]
fn junk_connect_lines_close_the_stream() {
    let mut h = Harness::activated("junk");
    for junk in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        b"CONNECT 1 2\n",
        &[b'7'; 100],
    ] {
        let mut client = UnixStream::connect(&h.uds).unwrap();
        client.write_all(junk).unwrap();
        h.pump();
        assert_closed(&mut client);
    }
    h.post_rx(1, 4096);
    assert!(h.received().is_empty(), "no request reached the guest");
}

#[test]
fn guest_initiated_connection_to_host_port() {
    let mut h = Harness::activated("guestinit");
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    h.post_rx(2, 4096);
    h.send(guest_hdr(777, 5000, OP_REQUEST), &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5000, 777));
    let (mut s, _) = listener.accept().unwrap();
    h.send(guest_hdr(777, 5000, OP_RW), b"hello host");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    // No listener on port 5001: RST.
    h.send(guest_hdr(778, 5001, OP_REQUEST), &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
}

#[test]
fn host_to_guest_data_respects_guest_credit() {
    let mut h = Harness::activated("credit");
    let (mut client, local) = h.host_connect(1024);
    let mut upd = guest_hdr(1024, local, OP_CREDIT_UPDATE);
    upd.buf_alloc = 10;
    h.send(upd, &[]);
    client.write_all(&[b'a'; 100]).unwrap();
    h.pump();
    h.post_rx(4, 4096);
    let pkts = h.received();
    let data: usize = pkts
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .map(|p| p.1.len())
        .sum();
    assert_eq!(data, 10, "{pkts:?}");
    assert_eq!(pkts.last().unwrap().0.op, OP_CREDIT_REQUEST);
    // The guest consumed the 10 bytes.
    let mut upd = guest_hdr(1024, local, OP_CREDIT_UPDATE);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    h.send(upd, &[]);
    let pkts = h.received();
    let data: usize = pkts
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .map(|p| p.1.len())
        .sum();
    assert_eq!(data, 10);
}

#[test]
fn guest_credit_request_is_answered() {
    let mut h = Harness::activated("creditreq");
    let (_client, local) = h.host_connect(1024);
    h.post_rx(1, 4096);
    h.send(guest_hdr(1024, local, OP_CREDIT_REQUEST), &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].0.buf_alloc, 256 * 1024);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut h = Harness::activated("flood");
    let (mut client, local) = h.host_connect(1024);
    h.post_rx(4, 4096);
    // Nobody reads the host side: past 256 KiB (plus what the socket
    // buffer takes) the guest has sent more than it was allowed to.
    let chunk = vec![1u8; 60 * 1024];
    for _ in 0..20 {
        h.send(guest_hdr(1024, local, OP_RW), &chunk);
    }
    let ops: Vec<u16> = h.received().iter().map(|p| p.0.op).collect();
    assert!(ops.contains(&OP_RST), "{ops:?}");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
}

#[test]
fn host_close_and_guest_shutdown() {
    let mut h = Harness::activated("close");
    let (client, local) = h.host_connect(1024);
    drop(client);
    h.pump();
    h.post_rx(2, 4096);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, OP_SHUTDOWN);
    assert_eq!(
        pkts[0].0.flags,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        "host closed both ways"
    );
    h.send(guest_hdr(1024, local, OP_RST), &[]);
    // Guest-side full shutdown of another connection: RST back.
    let (mut client, local) = h.host_connect(1025);
    let mut s = guest_hdr(1025, local, OP_SHUTDOWN);
    s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.post_rx(1, 4096);
    h.send(s, &[]);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_closed(&mut client);
}

#[test]
fn transport_reset_event_drops_connections() {
    let mut h = Harness::activated("treset");
    let (mut client, _local) = h.host_connect(1024);
    let ev = h.alloc(4);
    h.mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
    h.add_chain(EVQ, &[(ev, 4, VRING_DESC_F_WRITE)]);
    h.vsock
        .lock()
        .unwrap()
        .reset_connections_and_send_transport_reset();
    h.pump();
    assert_eq!(h.used(EVQ), vec![(h.next_desc[EVQ] - 1, 4)]);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(ev)).unwrap(), 0);
    assert_closed(&mut client);
}

#[test]
fn device_reset_closes_host_streams() {
    let mut h = Harness::activated("reset");
    let (mut client, _local) = h.host_connect(1024);
    assert!(h.vsock.lock().unwrap().reset());
    h.pump();
    assert_closed(&mut client);
    assert!(!h.vsock.lock().unwrap().is_activated());
}

#[test]
fn socket_path_is_unlinked_on_drop() {
    let h = Harness::new("unlink");
    let uds = h.uds.clone();
    assert!(uds.exists());
    drop(h);
    assert!(!uds.exists());
}

#[test]
fn expired_timer_never_blocks_the_event_loop() {
    let mut h = Harness::activated("timer");
    let mut client = UnixStream::connect(&h.uds).unwrap();
    h.pump(); // accepted: a pending client arms the sweep timer
    std::thread::sleep(Duration::from_millis(100));
    client.write_all(b"JUNK\n").unwrap(); // ready first...
    std::thread::sleep(Duration::from_millis(600)); // ...then the timer fires
    let (tx, rx) = std::sync::mpsc::channel();
    let mut em = std::mem::replace(&mut h.em, EventManager::new().unwrap());
    std::thread::spawn(move || {
        // Dropping the junk client disarms the timer before its event is handled.
        let _ = em.run_with_timeout(0);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_ok(),
        "event loop stuck"
    );
}

#[test]
fn guest_close_flushes_backlog_to_slow_host_reader() {
    let mut h = Harness::activated("backlog");
    let (client, local) = h.host_connect(1024);
    h.post_rx(4, 4096);
    // The host does not read while the guest sends 200 KiB (within its
    // 256 KiB credit) and then closes its socket.
    let chunk = vec![7u8; 4096];
    for _ in 0..50 {
        h.send(guest_hdr(1024, local, OP_RW), &chunk);
    }
    let mut s = guest_hdr(1024, local, OP_SHUTDOWN);
    s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(s, &[]);
    let reader = std::thread::spawn(move || {
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got);
        got.len()
    });
    while !reader.is_finished() {
        h.pump();
    }
    assert_eq!(
        reader.join().unwrap(),
        50 * 4096,
        "every byte reached the host"
    );
    let ops: Vec<u16> = h.received().iter().map(|p| p.0.op).collect();
    assert_eq!(ops.last(), Some(&OP_RST), "{ops:?}");
}

#[test]
fn state_restores_into_a_new_device_with_its_own_cid() {
    let mut h = Harness::activated("snap");
    let (_client, template_port) = h.host_connect(1024);
    let state = h.vsock.lock().unwrap().save_state();
    let queues = state
        .queues
        .clone()
        .expect("active device saves its queues");
    assert!(queues[RXQ].next_used > 0 && queues[TXQ].next_avail > 0);
    let json = serde_json::to_string(&state).unwrap();
    let state: super::device::VsockState = serde_json::from_str(&json).unwrap();

    // A new device, with another CID and socket, continues from the state.
    let uds2 = h.dir.join("clone.sock");
    let mut v2 = Vsock::new(7, uds2.clone()).unwrap();
    v2.restore_state(&state, h.mem.clone(), h.irq.clone())
        .unwrap();
    assert!(v2.is_activated());
    let mut cfg = [0u8; 8];
    v2.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 7, "config space shows the new CID");
    assert_eq!(v2.save_state().queues, state.queues);
    let v2 = Arc::new(Mutex::new(v2));
    let mut em = EventManager::<Subscriber>::new().unwrap();
    let sub: Subscriber = v2.clone();
    em.add_subscriber(sub);
    h.vsock = v2;
    h.em = em;
    h.uds = uds2;

    // The transport reset goes out on the event queue.
    let ev = h.alloc(4);
    h.mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
    h.add_chain(EVQ, &[(ev, 4, VRING_DESC_F_WRITE)]);
    h.vsock
        .lock()
        .unwrap()
        .reset_connections_and_send_transport_reset();
    h.pump();
    assert_eq!(h.used(EVQ).len(), 1);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(ev)).unwrap(), 0);

    // A new host connection is held back until the guest has handled the
    // reset (it re-posts the event buffer and notifies the event queue);
    // then it reaches the guest, addressed to the new CID, through the
    // restored RX ring.
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    h.post_rx(1, 4096);
    assert!(h.received().is_empty(), "RX before the reset was handled");
    let ev2 = h.alloc(4);
    h.add_chain(EVQ, &[(ev2, 4, VRING_DESC_F_WRITE)]);
    h.notify(EVQ);
    let pkts = h.received();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    assert_eq!(pkts[0].0.dst_cid, 7);
    assert!(
        pkts[0].0.src_port > template_port,
        "host ports continue from the snapshot, so the guest's stale sockets are not hit"
    );
}

#[test]
fn snapshot_without_a_port_counter_still_restores() {
    let h = Harness::activated("snap-oldstate");
    let mut state = h.vsock.lock().unwrap().save_state();
    state.next_local_port = None;
    let json = serde_json::to_string(&state).unwrap();
    let json = json.replace(",\"next_local_port\":null", "");
    assert!(!json.contains("next_local_port"));
    let state: super::device::VsockState = serde_json::from_str(&json).unwrap();
    let mut v2 = Vsock::new(7, h.dir.join("old.sock")).unwrap();
    v2.restore_state(&state, h.mem.clone(), h.irq.clone())
        .unwrap();
    assert!(v2.is_activated());
}

#[test]
fn inactive_state_restores_inactive_and_bad_queues_are_refused() {
    let h = Harness::new("snap-inactive");
    let state = h.vsock.lock().unwrap().save_state();
    assert!(state.queues.is_none());
    let mut v2 = Vsock::new(9, h.dir.join("c2.sock")).unwrap();
    v2.restore_state(&state, h.mem.clone(), h.irq.clone())
        .unwrap();
    assert!(!v2.is_activated());

    let h = Harness::activated("snap-bad");
    let mut state = h.vsock.lock().unwrap().save_state();
    if let Some(q) = state.queues.as_mut() {
        q[TXQ].desc_table = OUTSIDE;
    }
    let mut v3 = Vsock::new(9, h.dir.join("c3.sock")).unwrap();
    assert!(v3
        .restore_state(&state, h.mem.clone(), h.irq.clone())
        .is_err());
    assert!(!v3.is_activated());
}

/// Pattern bytes that show misplaced or missing pieces.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Reads exactly `len` bytes from the host end of a connection.
fn read_all(client: &mut UnixStream, len: usize) -> Vec<u8> {
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = vec![0u8; len];
    client.read_exact(&mut got).unwrap();
    got
}

#[test]
fn multi_descriptor_payloads_reach_the_host_intact() {
    let mut h = Harness::activated("multidesc");
    let (mut client, local) = h.host_connect(1024);
    // Linux 6.12.y for payloads over ~32 KiB: the header alone, then one
    // descriptor per page fragment.
    let data = pattern(40 * 1024);
    h.send_layout(
        guest_hdr(1024, local, OP_RW),
        &data,
        &[HDR_SIZE, 4096, 10_000, 4096],
    );
    assert_eq!(read_all(&mut client, data.len()), data);
    // Header and payload in one descriptor (Linux 6.2+ may do that).
    let data = pattern(1000);
    h.send_layout(guest_hdr(1024, local, OP_RW), &data, &[]);
    assert_eq!(read_all(&mut client, data.len()), data);
    // A header split over two descriptors, the second also holding the
    // start of the payload.
    let data = pattern(3000);
    h.send_layout(guest_hdr(1024, local, OP_RW), &data, &[20, 100, 1]);
    assert_eq!(read_all(&mut client, data.len()), data);
    // Descriptors past the payload are ignored.
    let mut hdr = guest_hdr(1024, local, OP_RW);
    hdr.len = 5;
    let a = h.alloc(HDR_SIZE as u64 + 5);
    h.mem.write_slice(&hdr.to_bytes(), GuestAddress(a)).unwrap();
    h.mem
        .write_slice(b"hello", GuestAddress(a + HDR_SIZE as u64))
        .unwrap();
    let spare = h.alloc(64);
    h.add_chain(TXQ, &[(a, HDR_SIZE as u32 + 5, 0), (spare, 64, 0)]);
    h.notify(TXQ);
    assert_eq!(read_all(&mut client, 5), b"hello");
    assert_eq!(
        h.used(TXQ).len(),
        4 + 1,
        "the OP_RESPONSE and four data chains"
    );
}

#[test]
fn full_64k_packet_in_page_descriptors() {
    let mut h = Harness::activated("64k");
    let (mut client, local) = h.host_connect(1024);
    let data = pattern(MAX_PKT_DATA);
    let mut cuts = vec![HDR_SIZE];
    cuts.extend(std::iter::repeat_n(4096, MAX_PKT_DATA / 4096));
    let reader = std::thread::spawn(move || {
        let got = read_all(&mut client, MAX_PKT_DATA);
        (client, got)
    });
    h.send_layout(guest_hdr(1024, local, OP_RW), &data, &cuts);
    let (mut client, got) = reader.join().unwrap();
    assert!(got == data, "64 KiB payload corrupted");
    // And one more right after it on the same connection.
    h.send_layout(guest_hdr(1024, local, OP_RW), b"tail", &[HDR_SIZE]);
    assert_eq!(read_all(&mut client, 4), b"tail");
}

#[test]
fn malformed_multi_descriptor_chains_are_consumed() {
    let mut h = Harness::activated("badmulti");
    let (mut client, local) = h.host_connect(1024);
    h.post_rx(4, 4096);
    let _ = h.used(TXQ);
    let hdr_with_len = |len: u32| {
        let mut hdr = guest_hdr(1024, local, OP_RW);
        hdr.len = len;
        hdr.to_bytes()
    };
    let buf = |h: &mut Harness, bytes: &[u8]| {
        let a = h.alloc(bytes.len() as u64);
        h.mem.write_slice(bytes, GuestAddress(a)).unwrap();
        a
    };
    let page = pattern(4096);
    // The pages hold less than the header claims.
    let a = buf(&mut h, &hdr_with_len(3 * 4096));
    let (p1, p2) = (buf(&mut h, &page), buf(&mut h, &page));
    h.add_chain(
        TXQ,
        &[(a, HDR_SIZE as u32, 0), (p1, 4096, 0), (p2, 4096, 0)],
    );
    // A device-writable page in the middle.
    let a = buf(&mut h, &hdr_with_len(2 * 4096));
    let (p1, p2) = (buf(&mut h, &page), buf(&mut h, &page));
    h.add_chain(
        TXQ,
        &[
            (a, HDR_SIZE as u32, 0),
            (p1, 4096, VRING_DESC_F_WRITE),
            (p2, 4096, 0),
        ],
    );
    // A page outside guest memory after a good one.
    let a = buf(&mut h, &hdr_with_len(2 * 4096));
    let p1 = buf(&mut h, &page);
    h.add_chain(
        TXQ,
        &[(a, HDR_SIZE as u32, 0), (p1, 4096, 0), (OUTSIDE, 4096, 0)],
    );
    // A page that runs past the end of guest memory.
    let a = buf(&mut h, &hdr_with_len(2 * 4096));
    let p1 = buf(&mut h, &page);
    h.add_chain(
        TXQ,
        &[
            (a, HDR_SIZE as u32, 0),
            (p1, 4096, 0),
            (MEM_SIZE as u64 - 100, 4096, 0),
        ],
    );
    // More than 64 KiB announced, with enough pages to hold it.
    let a = buf(&mut h, &hdr_with_len(MAX_PKT_DATA as u32 + 1));
    let mut descs = vec![(a, HDR_SIZE as u32, 0)];
    for _ in 0..17 {
        descs.push((buf(&mut h, &page), 4096, 0));
    }
    h.add_chain(TXQ, &descs);
    // A header cut short: 30 bytes, then the chain ends.
    let a = buf(&mut h, &hdr_with_len(0)[..30]);
    h.add_chain(TXQ, &[(a, 30, 0)]);
    // A header split over zero-length descriptors and a 14-byte tail that
    // is outside guest memory.
    let a = buf(&mut h, &hdr_with_len(0)[..30]);
    h.add_chain(TXQ, &[(a, 0, 0), (a, 30, 0), (a, 0, 0), (OUTSIDE, 14, 0)]);
    h.notify(TXQ);
    assert_eq!(h.used(TXQ).len(), 7, "every chain is returned");
    assert!(h.received().is_empty(), "nothing answered");
    // The connection is untouched: no partial payload reached the host,
    // and it still carries data.
    h.send_layout(guest_hdr(1024, local, OP_RW), b"after", &[HDR_SIZE]);
    assert_eq!(read_all(&mut client, 5), b"after");
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    let mut h = Harness::activated("indirect");
    let (mut client, local) = h.host_connect(1024);
    let data = pattern(8192);
    let mut hdr = guest_hdr(1024, local, OP_RW);
    hdr.len = data.len() as u32;
    let ha = h.alloc(HDR_SIZE as u64);
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(ha))
        .unwrap();
    let da = h.alloc(data.len() as u64);
    h.mem.write_slice(&data, GuestAddress(da)).unwrap();
    // The indirect table: header, then two pages.
    let table = h.alloc(3 * 16);
    let entries = [
        SplitDescriptor::new(ha, HDR_SIZE as u32, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(da, 4096, VRING_DESC_F_NEXT as u16, 2),
        SplitDescriptor::new(da + 4096, 4096, 0, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        h.mem
            .write_obj(*e, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    h.add_chain(TXQ, &[(table, 3 * 16, VRING_DESC_F_INDIRECT)]);
    h.notify(TXQ);
    assert_eq!(read_all(&mut client, data.len()), data);
}

#[test]
fn header_codec_round_trips() {
    let mut hdr = guest_hdr(0x1234_5678, 0x9abc_def0, OP_CREDIT_UPDATE);
    hdr.len = 0xdead;
    hdr.flags = 3;
    hdr.buf_alloc = 0x4_0000;
    hdr.fwd_cnt = 0xffff_fffe;
    assert_eq!(Header::from_bytes(&hdr.to_bytes()), hdr);
    assert_eq!(parse_header(&hdr.to_bytes()), hdr);
}

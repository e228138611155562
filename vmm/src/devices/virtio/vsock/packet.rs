//! Owned vsock packets and the header codec.
//!
//! Packets are copied out of (and into) guest memory at the queue boundary,
//! so the connection logic in `muxer` never touches guest memory and can be
//! tested on its own.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload we put in or accept from one packet.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or reset.
pub const OP_RST: u16 = 3;
/// Half or full shutdown.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit query.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

impl Header {
    /// Little-endian wire encoding.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the little-endian wire encoding.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: u64::from_le_bytes(field(b, 0)),
            dst_cid: u64::from_le_bytes(field(b, 8)),
            src_port: u32::from_le_bytes(field(b, 16)),
            dst_port: u32::from_le_bytes(field(b, 20)),
            len: u32::from_le_bytes(field(b, 24)),
            type_: u16::from_le_bytes(field(b, 28)),
            op: u16::from_le_bytes(field(b, 30)),
            flags: u32::from_le_bytes(field(b, 32)),
            buf_alloc: u32::from_le_bytes(field(b, 36)),
            fwd_cnt: u32::from_le_bytes(field(b, 40)),
        }
    }
}

/// `N` header bytes at `offset` (all offsets above are constants within
/// the header).
fn field<const N: usize>(b: &[u8; HDR_SIZE], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[offset..offset + N]);
    out
}

/// A packet with its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// Header (its `len` equals `data.len()` for packets we build).
    pub hdr: Header,
    /// Payload.
    pub data: Vec<u8>,
}

/// Why a TX descriptor chain is not a packet. The chain is returned to the
/// guest unread either way.
#[derive(Debug, thiserror::Error)]
pub enum TxChainError {
    /// A descriptor the device may write to (TX buffers are read-only).
    #[error("device-writable descriptor in a tx chain")]
    WriteOnly,
    /// The chain ends before a whole header.
    #[error("chain ends after {0} of the {HDR_SIZE} header bytes")]
    ShortHeader(usize),
    /// The header announces more payload than a packet may carry.
    #[error("payload length {0} exceeds {MAX_PKT_DATA}")]
    TooLong(u32),
    /// The chain ends before the payload the header announces.
    #[error("chain holds {got} of the {want} payload bytes")]
    ShortPayload {
        /// Header's length.
        want: usize,
        /// Bytes the chain holds.
        got: usize,
    },
    /// A descriptor's buffer is not (entirely) in guest memory.
    #[error("descriptor buffer at {addr:#x} ({len} bytes) is not in guest memory")]
    Memory {
        /// Guest physical address of the part read.
        addr: u64,
        /// Its length.
        len: usize,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Copies `dst.len()` bytes from guest memory at `addr`.
fn read_guest<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    dst: &mut [u8],
) -> Result<(), TxChainError> {
    mem.read_slice(dst, addr)
        .map_err(|source| TxChainError::Memory {
            addr: addr.raw_value(),
            len: dst.len(),
            source,
        })
}

impl Packet {
    /// Copies a packet the guest placed on the TX queue out of its
    /// descriptor chain.
    ///
    /// The layout of the chain is not assumed (virtio 1.2, 2.6.4 "Message
    /// Framing"): the header and the payload are the first `HDR_SIZE` and
    /// the next `hdr.len` bytes of the chain, wherever the descriptor
    /// boundaries fall. Linux puts the header in a descriptor of its own and
    /// the payload in one descriptor, or (6.12.y stable, payloads over
    /// ~32 KiB since "vsock/virtio: Allocate nonlinear SKBs for handling
    /// large transmit buffers") in one descriptor per page fragment; Linux
    /// 6.2+ may also put both in one descriptor. Descriptors past the
    /// payload are ignored.
    ///
    /// Bounded: the chain iterator stops after as many descriptors as the
    /// queue has (and follows indirect tables with the same bound), the
    /// payload length is checked against [`MAX_PKT_DATA`] before anything is
    /// allocated, and every byte is read through `mem`, which refuses
    /// addresses outside guest memory.
    pub fn from_tx_chain<M, I>(mem: &M, chain: I) -> Result<Packet, TxChainError>
    where
        M: GuestMemory,
        I: IntoIterator<Item = Descriptor>,
    {
        let mut raw = [0u8; HDR_SIZE];
        let mut hdr_got = 0usize;
        let mut hdr: Option<Header> = None;
        let mut data: Vec<u8> = Vec::new();
        for desc in chain {
            if desc.is_write_only() {
                return Err(TxChainError::WriteOnly);
            }
            let mut addr = desc.addr();
            // u32 always fits in usize on the 64-bit hosts we build for.
            let mut left = desc.len() as usize;
            if hdr.is_none() {
                let n = left.min(HDR_SIZE - hdr_got);
                if n > 0 {
                    read_guest(mem, addr, &mut raw[hdr_got..hdr_got + n])?;
                }
                hdr_got += n;
                left -= n;
                if hdr_got < HDR_SIZE {
                    continue;
                }
                let h = Header::from_bytes(&raw);
                if h.len as usize > MAX_PKT_DATA {
                    return Err(TxChainError::TooLong(h.len));
                }
                data.reserve_exact(h.len as usize);
                hdr = Some(h);
                if left > 0 {
                    addr = addr.checked_add(n as u64).ok_or(TxChainError::Memory {
                        addr: addr.raw_value(),
                        len: left,
                        source: vm_memory::GuestMemoryError::InvalidGuestAddress(addr),
                    })?;
                }
            }
            let Some(h) = &hdr else { continue };
            let want = h.len as usize;
            let n = left.min(want - data.len());
            if n > 0 {
                let start = data.len();
                data.resize(start + n, 0);
                read_guest(mem, addr, &mut data[start..])?;
            }
            if data.len() == want {
                break;
            }
        }
        let Some(hdr) = hdr else {
            return Err(TxChainError::ShortHeader(hdr_got));
        };
        if data.len() < hdr.len as usize {
            return Err(TxChainError::ShortPayload {
                want: hdr.len as usize,
                got: data.len(),
            });
        }
        Ok(Packet { hdr, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 0x1234,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x40000,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &2u64.to_le_bytes());
        assert_eq!(&b[20..24], &1024u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }
}

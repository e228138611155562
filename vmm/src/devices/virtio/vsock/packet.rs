//! Owned vsock packets and the header codec.
//!
//! Packets are copied out of (and into) guest memory at the queue boundary,
//! so the connection logic in `muxer` never touches guest memory and can be
//! tested on its own.

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
}

/// A packet with its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// Header (its `len` equals `data.len()` for packets we build).
    pub hdr: Header,
    /// Payload.
    pub data: Vec<u8>,
}

impl Packet {
    /// Copies a packet the guest placed on the TX queue.
    pub fn from_guest<B: vm_memory::bitmap::BitmapSlice>(
        pkt: &virtio_vsock::packet::VsockPacket<'_, B>,
    ) -> Result<Packet, String> {
        let hdr = Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        let mut data = Vec::new();
        if hdr.len > 0 {
            let slice = pkt.data_slice().ok_or("payload length without payload")?;
            let len = hdr.len as usize;
            if len > MAX_PKT_DATA || slice.len() < len {
                return Err(format!("bad payload length {len}"));
            }
            data = vec![0u8; len];
            slice
                .subslice(0, len)
                .map_err(|e| format!("payload: {e}"))?
                .copy_to(&mut data[..]);
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

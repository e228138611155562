//! The rtnetlink socket and the requests vessel sends.
//!
//! Requests are encoded here with a small attribute writer ([`Msg`]) rather
//! than with `netlink-packet-route`'s message types: the guest agent sends
//! only a handful of fixed messages, and emitting through the crate's
//! attribute enums links the encoders of every attribute the kernel knows
//! (link info of every device kind, bridge and VF attributes, ...) into the
//! agent, which is copied into every guest's initramfs. Replies are parsed
//! with `netlink-packet-core` (framing, attributes) and, on the host side,
//! `netlink-packet-route` (link, address and route dumps). Unit tests parse
//! every request back with `netlink-packet-route` to check the encoding.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NlaBuffer, NlasIterator};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use crate::Error;

// linux/netlink.h
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
/// On an error message: the echoed request is only its header.
const NLM_F_CAPPED: u16 = 0x100;
/// On an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

// linux/rtnetlink.h
pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const RTM_GETLINK: u16 = 18;
pub(crate) const RTM_NEWADDR: u16 = 20;
pub(crate) const RTM_GETADDR: u16 = 22;
pub(crate) const RTM_NEWROUTE: u16 = 24;
pub(crate) const RTM_GETROUTE: u16 = 26;
pub(crate) const RTM_NEWQDISC: u16 = 36;
pub(crate) const RTM_DELQDISC: u16 = 37;
pub(crate) const RTM_NEWTFILTER: u16 = 44;
pub(crate) const RTM_DELTFILTER: u16 = 45;

// linux/if_link.h, linux/if_addr.h, linux/rtnetlink.h attributes
pub(crate) const IFLA_ADDRESS: u16 = 1;
pub(crate) const IFLA_IFNAME: u16 = 3;
pub(crate) const IFLA_MTU: u16 = 4;
pub(crate) const IFA_ADDRESS: u16 = 1;
pub(crate) const IFA_LOCAL: u16 = 2;
pub(crate) const IFA_FLAGS: u16 = 8;
pub(crate) const IFA_F_NODAD: u32 = 0x02;
pub(crate) const RTA_DST: u16 = 1;
pub(crate) const RTA_OIF: u16 = 4;
pub(crate) const RTA_GATEWAY: u16 = 5;
pub(crate) const RTA_PRIORITY: u16 = 6;
pub(crate) const RTPROT_BOOT: u8 = 3;
pub(crate) const RT_SCOPE_UNIVERSE: u8 = 0;
pub(crate) const RT_SCOPE_LINK: u8 = 253;
pub(crate) const RTN_UNICAST: u8 = 1;
pub(crate) const RT_TABLE_MAIN: u8 = 254;
pub(crate) const IFF_UP: u32 = 0x1;
pub(crate) const IFF_LOOPBACK: u32 = 0x8;
pub(crate) const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
pub(crate) const AF_INET: u8 = libc::AF_INET as u8;
pub(crate) const AF_INET6: u8 = libc::AF_INET6 as u8;

/// Size of `struct ifinfomsg`.
pub(crate) const IFINFOMSG_LEN: usize = 16;

/// Largest datagram read at once: the kernel sizes dump messages after the
/// largest receive buffer seen on the socket, up to 32 KiB.
const RECV_BUF: usize = 32 * 1024;

/// Largest datagram of requests [`Netlink::batch`] sends at once (well
/// below the socket's send buffer, whatever the sysctls say).
const BATCH_BYTES: usize = 32 * 1024;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink request being written: header, family header, attributes.
#[derive(Debug, Clone)]
pub(crate) struct Msg {
    buf: Vec<u8>,
    /// Start offsets of the nested attributes still open.
    open: Vec<usize>,
    /// What the request does, for error messages.
    what: String,
}

impl Msg {
    /// A request of type `ty` with `flags` (`NLM_F_REQUEST` is added) whose
    /// family header is `header` (padded to 4 bytes).
    pub(crate) fn new(ty: u16, flags: u16, header: &[u8], what: impl Into<String>) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&[0; 4]); // length, set by `bytes`
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&[0; 8]); // sequence number, port id
        buf.extend_from_slice(header);
        buf.resize(align4(buf.len()), 0);
        Msg {
            buf,
            open: Vec::new(),
            what: what.into(),
        }
    }

    /// Appends an attribute.
    pub(crate) fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Msg {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub(crate) fn attr_u32(&mut self, ty: u16, value: u32) -> &mut Msg {
        self.attr(ty, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn attr_str(&mut self, ty: u16, value: &str) -> &mut Msg {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    /// Opens a nested attribute; close it with [`Msg::end_nest`].
    pub(crate) fn begin_nest(&mut self, ty: u16) -> &mut Msg {
        self.open.push(self.buf.len());
        self.attr(ty, &[])
    }

    pub(crate) fn end_nest(&mut self) -> &mut Msg {
        if let Some(start) = self.open.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// Whether the request asks for an acknowledgement.
    fn wants_ack(&self) -> bool {
        u16::from_ne_bytes([self.buf[6], self.buf[7]]) & NLM_F_ACK != 0
    }

    fn set_flag(&mut self, flag: u16) {
        let flags = u16::from_ne_bytes([self.buf[6], self.buf[7]]) | flag;
        self.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
    }

    /// The wire bytes with sequence number `seq`.
    pub(crate) fn bytes(&mut self, seq: u32) -> &[u8] {
        debug_assert!(self.open.is_empty(), "unclosed nested attribute");
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }

    pub(crate) fn what(&self) -> &str {
        &self.what
    }
}

/// `struct ifinfomsg`.
pub(crate) fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut h = [0u8; IFINFOMSG_LEN];
    h[0] = AF_UNSPEC;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// One reply message: its type, flags and payload.
pub(crate) struct Reply<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

/// Splits a datagram into messages.
pub(crate) fn split(mut data: &[u8]) -> impl Iterator<Item = Result<Reply<'_>, Error>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        if data.len() < NLMSG_HDRLEN {
            data = &[];
            return Some(Err(Error::Decode("truncated netlink header".into())));
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            data = &[];
            return Some(Err(Error::Decode(format!(
                "netlink message length {len} out of range"
            ))));
        }
        let reply = Reply {
            ty: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[NLMSG_HDRLEN..len],
        };
        data = &data[align4(len).min(data.len())..];
        Some(Ok(reply))
    })
}

/// The errno of an `NLMSG_ERROR` payload (0: acknowledgement) and the
/// kernel's extended-ack message, if any.
pub(crate) fn parse_error(flags: u16, payload: &[u8]) -> Result<(i32, Option<String>), Error> {
    let Some(code) = payload.get(..4) else {
        return Err(Error::Decode("truncated netlink error".into()));
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    let mut text = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request follows: its header only when capped.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            payload
                .get(4..8)
                .map(|l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize)
                .unwrap_or(0)
        };
        if let Some(tlvs) = payload.get(4 + align4(echoed)..) {
            for nla in NlasIterator::new(tlvs).map_while(Result::ok) {
                if nla.kind() == NLMSGERR_ATTR_MSG {
                    text = Some(c_string(nla.value()));
                }
            }
        }
    }
    Ok((code, text))
}

/// A NUL-terminated (or not) byte string as text.
pub(crate) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Iterates the attributes of `data`, stopping at the first malformed one.
pub(crate) fn attrs(data: &[u8]) -> impl Iterator<Item = NlaBuffer<&[u8]>> {
    NlasIterator::new(data).map_while(Result::ok)
}

/// An rtnetlink socket in the calling thread's network namespace.
pub(crate) struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens the socket: one system call, or three with `ext_ack` (the
    /// kernel's error text in errors; not worth two more guest system
    /// calls in the agent).
    pub(crate) fn open(ext_ack: bool) -> Result<Netlink, Error> {
        let socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        if ext_ack {
            for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
                setsockopt_int(&socket, opt, 1).map_err(Error::Socket)?;
            }
        }
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Receives one datagram into `self.buf`.
    fn recv(&mut self) -> Result<(), Error> {
        self.buf.clear();
        let n = loop {
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Socket(e)),
            }
        };
        if n > self.buf.len() {
            return Err(Error::Decode(format!(
                "netlink reply of {n} bytes exceeds the {RECV_BUF}-byte buffer"
            )));
        }
        Ok(())
    }

    fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        loop {
            match self.socket.send(bytes, 0) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(Error::Socket(io::Error::other(format!(
                        "netlink send wrote {n} of {} bytes",
                        bytes.len()
                    ))))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Socket(e)),
            }
        }
    }

    /// Sends one request and waits for its acknowledgement.
    pub(crate) fn request(&mut self, mut msg: Msg) -> Result<(), Error> {
        msg.set_flag(NLM_F_ACK);
        self.batch(&mut [msg])
    }

    /// Sends `msgs` and waits until the kernel has handled them all,
    /// returning the first failure. Messages go out in datagrams of up to
    /// [`BATCH_BYTES`] (normally all in one): the last of each asks for an
    /// acknowledgement, the others are only answered when they fail (the
    /// kernel handles every message of a datagram, in order, even after a
    /// failure). One `send` and, normally, one `recv` per datagram.
    pub(crate) fn batch(&mut self, msgs: &mut [Msg]) -> Result<(), Error> {
        let mut first_error: Option<Error> = None;
        let mut rest = msgs;
        while !rest.is_empty() {
            // At least one message per datagram, however large.
            let mut n = 1;
            let mut bytes = rest[0].buf.len();
            while n < rest.len() && bytes + rest[n].buf.len() <= BATCH_BYTES {
                bytes += rest[n].buf.len();
                n += 1;
            }
            let (chunk, tail) = rest.split_at_mut(n);
            if let Err(e) = self.send_chunk(chunk) {
                first_error.get_or_insert(e);
            }
            rest = tail;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One datagram of [`Netlink::batch`] (`msgs` is not empty).
    fn send_chunk(&mut self, msgs: &mut [Msg]) -> Result<(), Error> {
        let last = msgs.len() - 1;
        if !msgs[last].wants_ack() {
            msgs[last].set_flag(NLM_F_ACK);
        }
        let first_seq = self.seq.wrapping_add(1);
        let mut out = Vec::with_capacity(msgs.iter().map(|m| m.buf.len()).sum());
        for m in msgs.iter_mut() {
            let seq = self.next_seq();
            out.extend_from_slice(m.bytes(seq));
        }
        let last_seq = self.seq;
        self.send(&out)?;
        let mut first_error: Option<Error> = None;
        loop {
            self.recv()?;
            let mut done = false;
            for reply in split(&self.buf) {
                let reply = reply?;
                let index = reply.seq.wrapping_sub(first_seq) as usize;
                if reply.ty != NLMSG_ERROR || index > last {
                    continue; // not ours (e.g. a stale reply)
                }
                let (code, text) = parse_error(reply.flags, reply.payload)?;
                if code != 0 && first_error.is_none() {
                    first_error = Some(Error::kernel(msgs[index].what(), code, text));
                }
                done |= reply.seq == last_seq;
            }
            if done {
                return first_error.map_or(Ok(()), Err);
            }
        }
    }

    /// Sends a request answered with one message (a `GET` without dump)
    /// and calls `each` with that message's type and payload.
    pub(crate) fn get(
        &mut self,
        mut msg: Msg,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), Error> {
        let seq = self.next_seq();
        self.send(msg.bytes(seq))?;
        loop {
            self.recv()?;
            for reply in split(&self.buf) {
                let reply = reply?;
                if reply.seq != seq {
                    continue;
                }
                if reply.ty == NLMSG_ERROR {
                    let (code, text) = parse_error(reply.flags, reply.payload)?;
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(Error::kernel(msg.what(), code, text))
                    };
                }
                each(reply.ty, reply.payload);
                return Ok(());
            }
        }
    }

    /// Sends a dump request and calls `each` with the type and payload of
    /// every message of the answer. A dump that the kernel marks as
    /// interrupted (the tables changed meanwhile) is
    /// [`Error::DumpInterrupted`].
    pub(crate) fn dump(
        &mut self,
        mut msg: Msg,
        mut each: impl FnMut(u16, &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        msg.set_flag(NLM_F_DUMP);
        let seq = self.next_seq();
        let what = msg.what().to_string();
        self.send(msg.bytes(seq))?;
        let mut interrupted = false;
        loop {
            self.recv()?;
            for reply in split(&self.buf) {
                let reply = reply?;
                if reply.seq != seq {
                    continue;
                }
                interrupted |= reply.flags & NLM_F_DUMP_INTR != 0;
                match reply.ty {
                    NLMSG_DONE => {
                        // The payload may carry the dump's error.
                        let code = reply
                            .payload
                            .get(..4)
                            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .unwrap_or(0);
                        if code < 0 {
                            return Err(Error::kernel(&what, code, None));
                        }
                        if interrupted {
                            return Err(Error::DumpInterrupted);
                        }
                        return Ok(());
                    }
                    NLMSG_ERROR => {
                        let (code, text) = parse_error(reply.flags, reply.payload)?;
                        return Err(Error::kernel(&what, code, text));
                    }
                    ty => each(ty, reply.payload)?,
                }
            }
        }
    }
}

fn setsockopt_int(socket: &Socket, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int that outlives the call, and its
    // size is passed along; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_NETLINK,
            opt,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_and_padding() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE, &[1, 2, 3], "t");
        m.attr(7, &[9]).begin_nest(8).attr_u32(1, 5).end_nest();
        let b = m.bytes(42).to_vec();
        // header 16 + family header 3 (padded to 4) + attr 5 (padded to 8)
        // + nest 4 + u32 attr 8
        assert_eq!(b.len(), 16 + 4 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWLINK);
        assert_eq!(
            u16::from_ne_bytes([b[6], b[7]]),
            NLM_F_CREATE | NLM_F_REQUEST
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        assert_eq!(&b[16..20], &[1, 2, 3, 0]);
        assert_eq!(&b[20..25], &[5, 0, 7, 0, 9]);
        // The nest's length covers its child.
        assert_eq!(u16::from_ne_bytes([b[28], b[29]]), 12);
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 8);
    }

    #[test]
    fn split_and_errors() {
        let mut data = Vec::new();
        // An error message: errno -17 with an echoed capped header and an
        // extended-ack text.
        let mut err = Msg::new(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, &[], "");
        let mut payload = (-17i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        err.buf.extend_from_slice(&payload);
        err.attr_str(NLMSGERR_ATTR_MSG, "File exists here");
        data.extend_from_slice(err.bytes(3));
        let mut ack = Msg::new(NLMSG_ERROR, 0, &[0; 20], "");
        data.extend_from_slice(ack.bytes(4));
        let replies: Vec<_> = split(&data).collect::<Result<_, _>>().unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].seq, 3);
        let (code, text) = parse_error(replies[0].flags, replies[0].payload).unwrap();
        assert_eq!(code, -17);
        assert_eq!(text.as_deref(), Some("File exists here"));
        let (code, text) = parse_error(replies[1].flags, replies[1].payload).unwrap();
        assert_eq!((code, text), (0, None));
        // Garbage lengths are errors, not panics.
        let mut bad = data.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(split(&bad).any(|r| r.is_err()));
        assert!(split(&data[..10]).any(|r| r.is_err()));
        assert!(parse_error(0, &[1, 2]).is_err());
    }
}

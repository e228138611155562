//! Guest networking: `lo` up at start, and `ConfigureNetwork`.

use vessel_proto::network::NetworkConfig;
use vessel_proto::{ErrorCode, ErrorReply};

/// Brings `lo` up (four system calls), so that containers sharing the
/// VM's network namespace have a working loopback. Done at start, before
/// the agent listens, so templates are snapshotted with it.
pub fn loopback_up() {
    let started = crate::init::boottime_ms();
    match vessel_net::loopback_up() {
        Ok(()) if crate::init::debug() => crate::init::log_fmt(format_args!(
            "lo up in {} ms",
            crate::init::boottime_ms().saturating_sub(started)
        )),
        Ok(()) => {}
        Err(e) => crate::init::log_error(&e),
    }
}

/// TCP segments of at least this many MSS (44 x 1448 bytes: one 64 KiB
/// TSO segment). See [`tune_tcp`].
const MIN_TSO_SEGS: &[u8] = b"44\n";

/// Makes the guest's TCP hand virtio-net full 64 KiB segments. TCP sizes
/// its TSO segments from its pacing rate (about 1 ms worth each, at least
/// `tcp_min_tso_segs`, default 2): where the guest kernel is emulated the
/// rate stays low, so every 2-MSS segment would cost a whole pass through
/// the guest kernel and the VMM. Measured with `cargo xtask bench net`
/// (vmm/NET.md). The VM's own root network namespace only (containers
/// share it unless their spec asks for their own); three system calls at
/// start, before templates are snapshotted.
pub fn tune_tcp() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_min_tso_segs", MIN_TSO_SEGS) {
        crate::init::log_fmt(format_args!("tcp_min_tso_segs: {e}"));
    }
}

/// Applies a `ConfigureNetwork` request (validated by vessel-net first).
pub fn configure(config: &NetworkConfig) -> Result<(), ErrorReply> {
    vessel_net::configure(config).map_err(|e| {
        let code = match e {
            vessel_net::Error::Config(_)
            | vessel_net::Error::MissingLinks { .. }
            | vessel_net::Error::InvalidName(_) => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
        };
        ErrorReply {
            code,
            message: error_chain(&e),
        }
    })
}

/// `err: cause: cause ...` in one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_proto::network::{Interface, MacAddr};

    #[test]
    fn bad_configurations_are_invalid_requests() {
        assert!(configure(&NetworkConfig::default()).is_ok());
        let bad = NetworkConfig {
            interfaces: vec![Interface {
                name: "a/b".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                mtu: 0,
                addresses: vec![],
                routes: vec![],
            }],
        };
        let e = configure(&bad).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("invalid name"), "{}", e.message);
    }
}

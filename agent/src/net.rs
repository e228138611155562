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

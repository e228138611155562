//! tc redirects between two links: an ingress qdisc on the source and one
//! match-all filter whose `mirred` action redirects every frame to the
//! egress of the target. Two of them (veth -> tap, tap -> veth) join the
//! engine's interface and the VMM's tap.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::nl::{
    Msg, Netlink, NLM_F_CREATE, NLM_F_EXCL, RTM_DELQDISC, RTM_DELTFILTER, RTM_NEWQDISC,
    RTM_NEWTFILTER,
};
use crate::Result;

// linux/pkt_sched.h, pkt_cls.h, tc_act/tc_mirred.h
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
const ETH_P_ALL: u16 = 0x0003;
const TCA_MATCHALL_ACT: u16 = 2;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const TCA_MIRRED_PARMS: u16 = 2;
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;

/// Priority of vessel's filter (distinctive, so that replacing it never
/// touches another filter on the same qdisc).
pub(crate) const REDIRECT_PRIO: u16 = 0x7e55;

/// Which classifier works here: 0 not known yet, else a [`Classifier`].
static CLASSIFIER: AtomicU8 = AtomicU8::new(0);

/// The filter that matches every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Classifier {
    /// `matchall` (`CONFIG_NET_CLS_MATCHALL`).
    MatchAll = 1,
    /// `u32 match u32 0 0`, where matchall is missing (older or smaller
    /// kernels, e.g. this project's CI hosts).
    U32 = 2,
}

/// `struct tcmsg`: family, padding, ifindex, handle, parent, info.
fn tcmsg(index: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&handle.to_ne_bytes());
    h[12..16].copy_from_slice(&parent.to_ne_bytes());
    h[16..20].copy_from_slice(&info.to_ne_bytes());
    h
}

/// A filter's `tcm_info`: priority and protocol (network byte order).
fn filter_info(prio: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(ETH_P_ALL.to_be())
}

fn ingress_qdisc(index: u32, ty: u16, flags: u16, what: String) -> Msg {
    let mut m = Msg::new(
        ty,
        flags,
        &tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0),
        what,
    );
    m.attr_str(TCA_KIND, "ingress");
    m
}

/// `tc filter add dev FROM parent ffff: protocol all prio P <classifier>
/// action mirred egress redirect dev TO`.
pub(crate) fn redirect_filter(from: u32, to: u32, classifier: Classifier) -> Msg {
    let what = format!("add a redirect filter from link {from} to link {to}");
    let mut m = Msg::new(
        RTM_NEWTFILTER,
        NLM_F_CREATE | NLM_F_EXCL,
        &tcmsg(from, 0, INGRESS_HANDLE, filter_info(REDIRECT_PRIO)),
        what,
    );
    let actions = match classifier {
        Classifier::MatchAll => {
            m.attr_str(TCA_KIND, "matchall").begin_nest(TCA_OPTIONS);
            TCA_MATCHALL_ACT
        }
        Classifier::U32 => {
            // struct tc_u32_sel with one key that matches anything
            // (mask 0), terminal.
            let mut sel = [0u8; 16 + 16];
            sel[0] = TC_U32_TERMINAL;
            sel[2] = 1; // nkeys
            m.attr_str(TCA_KIND, "u32")
                .begin_nest(TCA_OPTIONS)
                .attr(TCA_U32_SEL, &sel);
            TCA_U32_ACT
        }
    };
    // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt),
    // eaction, ifindex.
    let mut parms = [0u8; 28];
    parms[8..12].copy_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
    parms[20..24].copy_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
    parms[24..28].copy_from_slice(&to.to_ne_bytes());
    m.begin_nest(actions)
        .begin_nest(1) // the first action of the list
        .attr_str(TCA_ACT_KIND, "mirred")
        .begin_nest(TCA_ACT_OPTIONS | NLA_F_NESTED)
        .attr(TCA_MIRRED_PARMS, &parms)
        .end_nest()
        .end_nest()
        .end_nest()
        .end_nest();
    m
}

/// Redirects every frame arriving on link `from` to the egress of link
/// `to`: adds the ingress qdisc `ffff:` to `from` (an existing one is
/// kept), removes vessel's previous redirect filter there if any, and adds
/// a `matchall` filter (a match-all `u32` one where the kernel has no
/// `matchall`) with the action `mirred egress redirect`. Calling it again
/// replaces the redirect.
pub fn redirect(from: u32, to: u32) -> Result<()> {
    let mut nl = Netlink::open(true)?;
    let what = format!("add an ingress qdisc to link {from}");
    match nl.request(ingress_qdisc(
        from,
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_EXCL,
        what,
    )) {
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            tracing::debug!(link = from, "ingress qdisc exists already");
        }
        other => other?,
    }
    let what = format!("remove the redirect filter of link {from}");
    let del = Msg::new(
        RTM_DELTFILTER,
        0,
        &tcmsg(from, 0, INGRESS_HANDLE, filter_info(REDIRECT_PRIO)),
        what,
    );
    match nl.request(del) {
        Err(e) if e.errno() == Some(libc::ENOENT) => {}
        other => other?,
    }
    let known = CLASSIFIER.load(Ordering::Relaxed);
    if known != Classifier::U32 as u8 {
        match nl.request(redirect_filter(from, to, Classifier::MatchAll)) {
            // No such classifier in this kernel.
            Err(e) if known == 0 && matches!(e.errno(), Some(libc::ENOENT | libc::EOPNOTSUPP)) => {
                tracing::debug!("no matchall classifier, using u32: {e}");
            }
            other => {
                if other.is_ok() {
                    CLASSIFIER.store(Classifier::MatchAll as u8, Ordering::Relaxed);
                }
                return other;
            }
        }
    }
    nl.request(redirect_filter(from, to, Classifier::U32))?;
    CLASSIFIER.store(Classifier::U32 as u8, Ordering::Relaxed);
    tracing::debug!(from, to, "redirect added");
    Ok(())
}

/// Removes the ingress qdisc of link `index`, and with it every filter on
/// it (the redirect of [`redirect`]). A link without one is left as it is
/// (the kernel answers ENOENT when the link never had one, and EINVAL,
/// "Invalid handle", after one was removed).
pub fn remove_redirect(index: u32) -> Result<()> {
    let mut nl = Netlink::open(true)?;
    let what = format!("remove the ingress qdisc of link {index}");
    match nl.request(ingress_qdisc(index, RTM_DELQDISC, 0, what)) {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL)) => {
            tracing::debug!(link = index, "no ingress qdisc to remove: {e}");
            Ok(())
        }
        other => other,
    }
}

/// Which filter kind the last [`redirect`] used, if any (for tests and
/// logs).
pub fn classifier_in_use() -> Option<&'static str> {
    match CLASSIFIER.load(Ordering::Relaxed) {
        1 => Some("matchall"),
        2 => Some("u32"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Parseable;
    use netlink_packet_route::tc::{
        TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
        TcFilterMatchAllOption, TcFilterU32Option, TcHandle, TcMessage, TcMirrorActionType,
        TcOption,
    };

    fn parse(mut m: Msg) -> (u16, TcMessage) {
        let b = m.bytes(1).to_vec();
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        (ty, TcMessage::parse(&b[16..]).unwrap())
    }

    fn check_mirred(actions: &[netlink_packet_route::tc::TcAction], to: u32) {
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].tab, 1);
        let a = &actions[0].attributes;
        assert_eq!(a[0], TcActionAttribute::Kind("mirred".into()));
        let TcActionAttribute::Options(opts) = &a[1] else {
            panic!("{a:?}");
        };
        let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = &opts[0] else {
            panic!("{opts:?}");
        };
        assert_eq!(p.ifindex, to);
        assert_eq!(p.eaction, TcMirrorActionType::EgressRedir);
        assert_eq!(p.generic.action, TcActionType::Stolen);
    }

    #[test]
    fn matchall_redirect_encoding() {
        let (ty, msg) = parse(redirect_filter(7, 9, Classifier::MatchAll));
        assert_eq!(ty, RTM_NEWTFILTER);
        assert_eq!(msg.header.index, 7);
        assert_eq!(
            msg.header.parent,
            TcHandle {
                major: 0xffff,
                minor: 0
            }
        );
        assert_eq!(msg.header.info >> 16, u32::from(REDIRECT_PRIO));
        assert_eq!(msg.header.info & 0xffff, 0x0300, "protocol all, big endian");
        assert_eq!(msg.attributes[0], TcAttribute::Kind("matchall".into()));
        let TcAttribute::Options(opts) = &msg.attributes[1] else {
            panic!("{msg:?}");
        };
        let TcOption::MatchAll(TcFilterMatchAllOption::Action(actions)) = &opts[0] else {
            panic!("{opts:?}");
        };
        check_mirred(actions, 9);
    }

    #[test]
    fn u32_redirect_encoding() {
        let (_, msg) = parse(redirect_filter(3, 4, Classifier::U32));
        assert_eq!(msg.attributes[0], TcAttribute::Kind("u32".into()));
        let TcAttribute::Options(opts) = &msg.attributes[1] else {
            panic!("{msg:?}");
        };
        let TcOption::U32(TcFilterU32Option::Selector(sel)) = &opts[0] else {
            panic!("{opts:?}");
        };
        assert_eq!(sel.nkeys, 1);
        assert_eq!(sel.keys.len(), 1);
        assert_eq!((sel.keys[0].mask, sel.keys[0].val), (0, 0));
        let TcOption::U32(TcFilterU32Option::Action(actions)) = &opts[1] else {
            panic!("{opts:?}");
        };
        check_mirred(actions, 4);
    }

    #[test]
    fn ingress_qdisc_encoding() {
        let (ty, msg) = parse(ingress_qdisc(5, RTM_NEWQDISC, 0, String::new()));
        assert_eq!(ty, RTM_NEWQDISC);
        assert_eq!(msg.header.index, 5);
        assert_eq!(
            msg.header.handle,
            TcHandle {
                major: 0xffff,
                minor: 0
            }
        );
        assert_eq!(msg.header.parent, TcHandle::INGRESS);
        assert_eq!(msg.attributes, vec![TcAttribute::Kind("ingress".into())]);
    }
}

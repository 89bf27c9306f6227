//! Packets on their way into a local pod (tcx egress of its host-side veth):
//! replies pass, later packets of admitted connections pass, and the first
//! packet of a new connection gets the pod's ingress verdict, which
//! conntrack then remembers.

use aya_ebpf::programs::TcContext;
use weir_abi::{
    ct::{CT_F_HAIRPIN, CT_KIND_FLOW, CT_KIND_INGRESS, CT_KIND_SERVICE, CT_STATE_CLOSING, CtEntry},
    events::{DIRECTION_INGRESS as EVENT_INGRESS, EVENT_NEW_CONNECTION, OBSERVED_TO_POD},
    metrics::{DROP_CT_CREATE_FAILED, DROP_POLICY_DENIED, POLICY_ALLOWED, REVERSE_NAT},
    policy::{DIRECTION_INGRESS, ENDPOINT_F_INGRESS_ISOLATED, IDENTITY_HOST},
};

use crate::{
    Verdict,
    conntrack::{self, is_syn, now_secs},
    events::{self, emit},
    from_pod::ct_key,
    maps::{CONFIG, CONNTRACK},
    metrics::count,
    nat::{End, rewrite_addr, rewrite_port},
    packet::Packet,
    policy,
};

#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet) -> Verdict {
    match try_handle(ctx, pkt) {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    }
}

#[inline(always)]
fn try_handle(ctx: &TcContext, pkt: &Packet) -> Result<(), u32> {
    // SAFETY: copied out at once.
    let cfg = CONFIG.get_ptr(0).map(|c| unsafe { *c }).unwrap_or_default();
    let now = now_secs();
    let len = ctx.len();

    // 1. A reply to a connection this pod opened, directly ...
    let opened = ct_key(pkt.daddr_be, pkt.saddr_be, pkt.dport_be, pkt.sport_be, pkt.proto, CT_KIND_FLOW);
    if let Some(flow) = CONNTRACK.get_ptr_mut(&opened) {
        // SAFETY: a valid map value; concurrent updates only race on counters.
        let flow = unsafe { &mut *flow };
        // A local peer's from-pod program has accounted (and, for a service
        // backend, reverse-translated) the reply already; a remote peer's
        // reply arrives here as it left the other node.
        if policy::endpoint(pkt.saddr_be).is_none() {
            conntrack::observe(flow, pkt, false, len, &cfg, now);
            if flow.service_id != 0 && flow.flags & CT_F_HAIRPIN == 0 {
                let (nat_addr_be, nat_port_be) = (flow.nat_addr_be, flow.nat_port_be);
                rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, nat_addr_be)?;
                rewrite_port(ctx, pkt, End::Source, pkt.sport_be, nat_port_be)?;
                count(REVERSE_NAT, len);
            }
        }
        return Ok(());
    }
    // ... or through a service (the source is the frontend again by now).
    let via_service =
        ct_key(pkt.daddr_be, pkt.saddr_be, pkt.dport_be, pkt.sport_be, pkt.proto, CT_KIND_SERVICE);
    if CONNTRACK.get_ptr(&via_service).is_some() {
        return Ok(());
    }

    // 2. A later packet of a connection this pod admitted.
    let key = ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_INGRESS);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a valid map value.
        let entry = unsafe { &mut *entry };
        if !(is_syn(pkt) && (entry.state == CT_STATE_CLOSING || entry.expires < now)) {
            conntrack::observe(entry, pkt, true, len, &cfg, now);
            return Ok(());
        }
    }

    // 3. A new connection: the ingress verdict of the destination pod.
    let Some(ep) = policy::endpoint(pkt.daddr_be) else {
        // Not a pod of this node: not ours to judge.
        return Ok(());
    };
    let isolated = ep.flags & ENDPOINT_F_INGRESS_ISOLATED != 0;
    let src_identity = if isolated || events::enabled(&cfg) { policy::identity_of(pkt.saddr_be) } else { 0 };
    if isolated {
        // The hairpin source is the pod itself reaching its own service.
        // The node itself (kubelet's probes) may always reach its pods.
        let allowed = pkt.saddr_be == cfg.hairpin_addr_be
            || src_identity == IDENTITY_HOST
            || policy::allows(ep.endpoint_id, DIRECTION_INGRESS, src_identity, pkt.proto, pkt.dport_be);
        if !allowed {
            policy::count_drop(ep.endpoint_id, DROP_POLICY_DENIED, len);
            return Err(DROP_POLICY_DENIED);
        }
        count(POLICY_ALLOWED, len);
    }
    let mut entry = CtEntry::default();
    conntrack::observe(&mut entry, pkt, true, len, &cfg, now);
    CONNTRACK.insert(&key, &entry, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
    if events::enabled(&cfg) {
        let mut event = events::for_packet(ctx, pkt, EVENT_NEW_CONNECTION, OBSERVED_TO_POD, EVENT_INGRESS);
        event.src_identity = src_identity;
        event.dst_identity = ep.identity;
        emit(&event);
    }
    Ok(())
}

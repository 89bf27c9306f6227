//! Packets sent by a local pod (tcx ingress of its host-side veth): reverse
//! NAT of replies, DNAT of service connections, the egress policy verdict for
//! new connections, and drops for service addresses that cannot be served.

use aya_ebpf::programs::TcContext;
use weir_abi::{
    config::Config,
    ct::{
        CT_F_HAIRPIN, CT_F_NORTH_SOUTH, CT_KIND_FLOW, CT_KIND_INGRESS, CT_KIND_SERVICE, CT_STATE_CLOSING,
        CtEntry, CtKey,
    },
    events::{DIRECTION_EGRESS as EVENT_EGRESS, EVENT_F_TRANSLATED, EVENT_NEW_CONNECTION, OBSERVED_FROM_POD},
    lb::SVC_FLAG_LOCAL,
    metrics::{
        DROP_CT_CREATE_FAILED, DROP_IS_CLUSTER_IP, DROP_POLICY_DENIED, HAIRPIN_NEW, POLICY_ALLOWED,
        REVERSE_NAT, SERVICE_ESTABLISHED, SERVICE_NEW,
    },
    policy::{DIRECTION_EGRESS, ENDPOINT_F_EGRESS_ISOLATED},
};

use crate::{
    Verdict,
    conntrack::{self, is_syn, now_secs},
    events, lb,
    maps::{CONFIG, CONNTRACK},
    metrics::count,
    nat::{self, End, rewrite_addr, rewrite_port},
    packet::{Packet, packet_hash},
    policy,
};

#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet) -> Verdict {
    match try_handle(ctx, pkt) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::Drop(reason),
    }
}

#[inline(always)]
pub fn ct_key(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8, kind: u8) -> CtKey {
    CtKey { saddr_be, daddr_be, sport_be, dport_be, proto, kind, _pad: [0; 2] }
}

#[inline(always)]
fn try_handle(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, u32> {
    // SAFETY: copied out at once.
    let cfg = CONFIG.get_ptr(0).map(|c| unsafe { *c }).unwrap_or_default();
    let now = now_secs();
    let len = ctx.len();

    // 1. A reply. To a connection that arrived at this pod (its ingress
    //    verdict was taken at this pod's to-pod program) ...
    let ingress_key =
        ct_key(pkt.daddr_be, pkt.saddr_be, pkt.dport_be, pkt.sport_be, pkt.proto, CT_KIND_INGRESS);
    let inbound = match CONNTRACK.get_ptr_mut(&ingress_key) {
        Some(entry) => {
            // SAFETY: a valid map value; concurrent updates only race on counters.
            conntrack::observe(unsafe { &mut *entry }, pkt, false, len, &cfg, now);
            true
        }
        None => false,
    };
    // ... and to a connection opened by a local pod, translated or not: its
    // flow entry is keyed by the (translated) tuple seen from the client.
    let reply_key = ct_key(pkt.daddr_be, pkt.saddr_be, pkt.dport_be, pkt.sport_be, pkt.proto, CT_KIND_FLOW);
    if let Some(flow) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value; concurrent updates only race on counters.
        let flow = unsafe { &mut *flow };
        conntrack::observe(flow, pkt, false, len, &cfg, now);
        if flow.service_id == 0 {
            return Ok(Verdict::Pass);
        }
        let hairpin = flow.flags & CT_F_HAIRPIN != 0;
        let north_south = flow.flags & CT_F_NORTH_SOUTH != 0;
        let client_be = if hairpin { flow.client_addr_be } else { pkt.daddr_be };
        // Keep the service entry alive as long as the flow: a server that
        // talks much more than its client must not lose its backend.
        let svc_key =
            ct_key(client_be, flow.nat_addr_be, pkt.dport_be, flow.nat_port_be, pkt.proto, CT_KIND_SERVICE);
        if let Some(svc) = CONNTRACK.get_ptr_mut(&svc_key) {
            // SAFETY: a valid map value.
            let svc = unsafe { &mut *svc };
            svc.expires = flow.expires;
            svc.state = flow.state;
        }
        let (nat_addr_be, nat_port_be) = (flow.nat_addr_be, flow.nat_port_be);
        rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, nat_addr_be)?;
        rewrite_port(ctx, pkt, End::Source, pkt.sport_be, nat_port_be)?;
        if hairpin {
            rewrite_addr(ctx, pkt, End::Destination, pkt.daddr_be, client_be)?;
        }
        count(REVERSE_NAT, len);
        // A reply to a client outside the node now comes from a node
        // address: send it out directly (the stack drops it as a martian).
        if north_south && let Some(action) = nat::redirect_to_route(ctx, nat_addr_be, client_be) {
            return Ok(Verdict::Redirect(action));
        }
        return Ok(Verdict::Pass);
    }
    if inbound {
        return Ok(Verdict::Pass);
    }

    // 2. A later packet of a service connection: follow the recorded
    //    backend, even if it has left the service since.
    let svc_key = ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_SERVICE);
    if let Some(svc) = CONNTRACK.get_ptr_mut(&svc_key).filter(|_| pkt.can_nat) {
        // SAFETY: a valid map value.
        let svc = unsafe { &mut *svc };
        // A new SYN on a closed or expired tuple is a new connection
        // (source port reuse): pick a backend again below.
        let reused = is_syn(pkt) && (svc.state == CT_STATE_CLOSING || svc.expires < now);
        if !reused {
            let hairpin = svc.flags & CT_F_HAIRPIN != 0;
            let src_be = if hairpin { cfg.hairpin_addr_be } else { pkt.saddr_be };
            let flow_key =
                ct_key(src_be, svc.nat_addr_be, pkt.sport_be, svc.nat_port_be, pkt.proto, CT_KIND_FLOW);
            match CONNTRACK.get_ptr_mut(&flow_key) {
                Some(flow) => {
                    // SAFETY: a valid map value.
                    let flow = unsafe { &mut *flow };
                    conntrack::observe(flow, pkt, true, len, &cfg, now);
                    svc.expires = flow.expires;
                    svc.state = flow.state;
                }
                None => {
                    // The LRU evicted the flow half: recreate it so replies
                    // are translated again.
                    let mut flow = flow_entry(pkt, svc, now, &cfg);
                    flow.state = svc.state;
                    CONNTRACK.insert(&flow_key, &flow, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
                    svc.expires = flow.expires;
                }
            }
            svc.tx_packets += 1;
            svc.tx_bytes += u64::from(len);
            translate(ctx, pkt, svc.nat_addr_be, svc.nat_port_be, hairpin.then_some(cfg.hairpin_addr_be))?;
            count(SERVICE_ESTABLISHED, len);
            return Ok(Verdict::Pass);
        }
    }

    // 3. A later packet of a connection without a service.
    let flow_key = ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_FLOW);
    if let Some(flow) = CONNTRACK.get_ptr_mut(&flow_key) {
        // SAFETY: a valid map value.
        let flow = unsafe { &mut *flow };
        if !(is_syn(pkt) && (flow.state == CT_STATE_CLOSING || flow.expires < now)) {
            conntrack::observe(flow, pkt, true, len, &cfg, now);
            return Ok(Verdict::Pass);
        }
    }

    // 4. A new connection: pick a backend if it goes to a frontend, then
    //    take the egress verdict against where it really goes.
    let service =
        if pkt.can_nat { lb::lookup_service_internal(pkt.daddr_be, pkt.dport_be, pkt.proto) } else { None };
    let (target_be, target_port_be, backend) = match &service {
        Some(service) => {
            let (backend_id, backend) = match lb::select_backend(service, pkt.saddr_be, now, packet_hash(pkt))
            {
                Ok(chosen) => chosen,
                // kube-proxy DROPs under a Local policy without local
                // endpoints, and REJECTs when there are none at all.
                Err(reason) if service.flags & SVC_FLAG_LOCAL != 0 => return Err(reason),
                Err(reason) => return Ok(Verdict::Reject(reason)),
            };
            (backend.address_be, backend.port_be, Some((service.service_id, backend_id)))
        }
        None => {
            // An address in the service range that no frontend serves (a
            // deleted service, an undefined port): drop instead of routing it
            // nowhere.
            if cfg.service_mask_be != 0 && pkt.daddr_be & cfg.service_mask_be == cfg.service_cidr_be {
                return Ok(Verdict::Reject(DROP_IS_CLUSTER_IP));
            }
            (pkt.daddr_be, pkt.dport_be, None)
        }
    };
    // The client is its own backend: without a source rewrite its kernel
    // would see a packet from itself and drop it as a martian.
    let hairpin = backend.is_some() && target_be == pkt.saddr_be;
    let source = policy::endpoint(pkt.saddr_be);
    if let Some(ep) = source
        && ep.flags & ENDPOINT_F_EGRESS_ISOLATED != 0
    {
        // A pod may always reach itself, also through a service.
        let allowed = target_be == pkt.saddr_be
            || policy::allows(
                ep.endpoint_id,
                DIRECTION_EGRESS,
                policy::identity_of(target_be),
                pkt.proto,
                target_port_be,
            );
        if !allowed {
            policy::count_drop(ep.endpoint_id, DROP_POLICY_DENIED, len);
            return Err(DROP_POLICY_DENIED);
        }
        count(POLICY_ALLOWED, len);
    }
    if events::enabled(&cfg) {
        let mut event = events::for_packet(ctx, pkt, EVENT_NEW_CONNECTION, OBSERVED_FROM_POD, EVENT_EGRESS);
        event.saddr_be = if hairpin { cfg.hairpin_addr_be } else { pkt.saddr_be };
        event.daddr_be = target_be;
        event.dport_be = target_port_be;
        event.src_identity = source.map_or(0, |ep| ep.identity);
        event.dst_identity = policy::identity_of(target_be);
        if let Some((service_id, _)) = backend {
            event.service_id = service_id;
            event.flags = EVENT_F_TRANSLATED;
        }
        events::emit(&event);
    }

    let Some((service_id, backend_id)) = backend else {
        let mut flow = CtEntry::default();
        conntrack::observe(&mut flow, pkt, true, len, &cfg, now);
        CONNTRACK.insert(&flow_key, &flow, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        return Ok(Verdict::Pass);
    };
    let mut svc = CtEntry {
        nat_addr_be: target_be,
        nat_port_be: target_port_be,
        service_id,
        backend_id,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        ..CtEntry::default()
    };
    let mut flow = flow_entry(pkt, &svc, now, &cfg);
    conntrack::observe(&mut flow, pkt, true, len, &cfg, now);
    svc.expires = flow.expires;
    svc.tx_packets = 1;
    svc.tx_bytes = u64::from(len);
    let src_be = if hairpin { cfg.hairpin_addr_be } else { pkt.saddr_be };
    let flow_key = ct_key(src_be, target_be, pkt.sport_be, target_port_be, pkt.proto, CT_KIND_FLOW);
    CONNTRACK.insert(&flow_key, &flow, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
    CONNTRACK.insert(&svc_key, &svc, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
    translate(ctx, pkt, target_be, target_port_be, hairpin.then_some(cfg.hairpin_addr_be))?;
    count(if hairpin { HAIRPIN_NEW } else { SERVICE_NEW }, len);
    Ok(Verdict::Pass)
}

/// The flow half of a service connection: keyed by the translated tuple,
/// remembering the frontend so replies can be reverse-translated.
#[inline(always)]
fn flow_entry(pkt: &Packet, svc: &CtEntry, now: u32, cfg: &Config) -> CtEntry {
    CtEntry {
        nat_addr_be: pkt.daddr_be,
        nat_port_be: pkt.dport_be,
        client_addr_be: pkt.saddr_be,
        service_id: svc.service_id,
        backend_id: svc.backend_id,
        flags: svc.flags,
        state: svc.state,
        expires: now + conntrack::lifetime(cfg, pkt.proto, svc.state),
        ..CtEntry::default()
    }
}

/// DNAT to the backend, and SNAT to the hairpin address when the client is
/// its own backend.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    addr_be: u32,
    port_be: u16,
    hairpin_src: Option<u32>,
) -> Result<(), u32> {
    rewrite_addr(ctx, pkt, End::Destination, pkt.daddr_be, addr_be)?;
    rewrite_port(ctx, pkt, End::Destination, pkt.dport_be, port_be)?;
    if let Some(src_be) = hairpin_src {
        rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, src_be)?;
    }
    Ok(())
}

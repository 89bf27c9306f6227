//! North-south traffic entering the node on one of its devices (tcx
//! ingress): NodePorts, external IPs and LoadBalancer IPs.
//!
//! A connection to a local backend is DNATed only, so the backend sees the
//! client's address; its replies are reverse-translated where the backend
//! sends them (the from-pod program), exactly as for a ClusterIP. A
//! connection to a backend on another node is also SNATed to this node's
//! address and a port chosen here, so that the replies come back through
//! this node, where a NAT_REPLY entry restores the client and the frontend.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use weir_abi::{
    config::Config,
    ct::{
        CT_F_NORTH_SOUTH, CT_F_SNAT, CT_KIND_FLOW, CT_KIND_NAT_REPLY, CT_KIND_SERVICE, CT_STATE_CLOSING,
        CtEntry,
    },
    lb::{SVC_FLAG_SOURCE_RANGES, SVC_FLAGS_NORTH_SOUTH, SourceRangeKey},
    metrics::{
        DROP_CT_CREATE_FAILED, DROP_NOT_IN_SOURCE_RANGE, REVERSE_NAT, SERVICE_ESTABLISHED, SERVICE_NEW,
    },
};

use crate::{
    Verdict,
    conntrack::{self, is_syn, now_secs},
    from_pod::ct_key,
    lb,
    maps::{CONFIG, CONNTRACK, DEVICES, SOURCE_RANGES},
    metrics::count,
    nat::{self, End, rewrite_addr, rewrite_port},
    packet::{Packet, packet_hash},
    policy,
};

/// SNAT source ports (Linux's default ephemeral range is 32768–60999; a
/// node running Weir does not need it for its own NodePort replies).
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_232;
/// Candidate ports tried before giving up on a new connection.
const SNAT_PROBES: u32 = 8;

#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet) -> Verdict {
    match try_handle(ctx, pkt) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::Drop(reason),
    }
}

#[inline(always)]
fn try_handle(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, u32> {
    if !pkt.can_nat {
        return Ok(Verdict::Pass);
    }
    // SAFETY: copied out at once.
    let cfg = CONFIG.get_ptr(0).map(|c| unsafe { *c }).unwrap_or_default();
    let now = now_secs();
    let len = ctx.len();

    // 1. A remote backend's reply to a SNATed client.
    let reply_key =
        ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_NAT_REPLY);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value; concurrent updates only race on counters.
        let entry = unsafe { &mut *entry };
        conntrack::observe(entry, pkt, false, len, &cfg, now);
        let (front_be, front_port_be) = (entry.nat_addr_be, entry.nat_port_be);
        let (client_be, client_port_be) = (entry.client_addr_be, entry.aux_port_be);
        rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, front_be)?;
        rewrite_port(ctx, pkt, End::Source, pkt.sport_be, front_port_be)?;
        rewrite_addr(ctx, pkt, End::Destination, pkt.daddr_be, client_be)?;
        rewrite_port(ctx, pkt, End::Destination, pkt.dport_be, client_port_be)?;
        count(REVERSE_NAT, len);
        return Ok(redirect(ctx, front_be, client_be));
    }

    // 2. A later packet of a north-south connection.
    let svc_key = ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_SERVICE);
    if let Some(svc) = CONNTRACK.get_ptr_mut(&svc_key) {
        // SAFETY: a valid map value.
        let svc = unsafe { &mut *svc };
        if !(is_syn(pkt) && (svc.state == CT_STATE_CLOSING || svc.expires < now)) {
            conntrack::observe(svc, pkt, true, len, &cfg, now);
            let snat = (svc.flags & CT_F_SNAT != 0).then_some((svc.client_addr_be, svc.aux_port_be));
            let backend_be = svc.nat_addr_be;
            translate(ctx, pkt, backend_be, svc.nat_port_be, snat)?;
            count(SERVICE_ESTABLISHED, len);
            return Ok(match snat {
                Some((snat_be, _)) => redirect(ctx, snat_be, backend_be),
                None => Verdict::Pass,
            });
        }
    }

    // 3. A new connection to a NodePort, external or LoadBalancer IP.
    let Some(service) = lb::lookup_service(pkt.daddr_be, pkt.dport_be, pkt.proto)
        .filter(|s| s.flags & SVC_FLAGS_NORTH_SOUTH != 0)
    else {
        return Ok(Verdict::Pass);
    };
    if service.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let key = Key::new(
            64,
            SourceRangeKey { service_id_be: service.service_id.to_be(), address_be: pkt.saddr_be },
        );
        if SOURCE_RANGES.get(&key).is_none() {
            return Err(DROP_NOT_IN_SOURCE_RANGE);
        }
    }
    let (backend_id, backend) = lb::select_backend(&service, pkt.saddr_be, now, packet_hash(pkt))?;
    let mut svc = CtEntry {
        nat_addr_be: backend.address_be,
        nat_port_be: backend.port_be,
        service_id: service.service_id,
        backend_id,
        ..CtEntry::default()
    };
    conntrack::observe(&mut svc, pkt, true, len, &cfg, now);

    if policy::endpoint(backend.address_be).is_some() {
        // Local backend: the client's address is preserved; replies are
        // reverse-translated by the backend's from-pod program.
        let flow = CtEntry {
            nat_addr_be: pkt.daddr_be,
            nat_port_be: pkt.dport_be,
            client_addr_be: pkt.saddr_be,
            service_id: service.service_id,
            backend_id,
            expires: svc.expires,
            flags: CT_F_NORTH_SOUTH,
            ..CtEntry::default()
        };
        let flow_key =
            ct_key(pkt.saddr_be, backend.address_be, pkt.sport_be, backend.port_be, pkt.proto, CT_KIND_FLOW);
        CONNTRACK.insert(&flow_key, &flow, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        CONNTRACK.insert(&svc_key, &svc, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        translate(ctx, pkt, backend.address_be, backend.port_be, None)?;
    } else {
        let (snat_be, port_be) = allocate_port(ctx, pkt, &backend, &cfg)?;
        let reply = CtEntry {
            nat_addr_be: pkt.daddr_be,
            nat_port_be: pkt.dport_be,
            client_addr_be: pkt.saddr_be,
            aux_port_be: pkt.sport_be,
            service_id: service.service_id,
            backend_id,
            expires: svc.expires,
            ..CtEntry::default()
        };
        let reply_key =
            ct_key(backend.address_be, snat_be, backend.port_be, port_be, pkt.proto, CT_KIND_NAT_REPLY);
        CONNTRACK.insert(&reply_key, &reply, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        svc.flags |= CT_F_SNAT;
        svc.client_addr_be = snat_be;
        svc.aux_port_be = port_be;
        CONNTRACK.insert(&svc_key, &svc, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        translate(ctx, pkt, backend.address_be, backend.port_be, Some((snat_be, port_be)))?;
        count(SERVICE_NEW, len);
        return Ok(redirect(ctx, snat_be, backend.address_be));
    }
    count(SERVICE_NEW, len);
    Ok(Verdict::Pass)
}

/// Picks a free (node address, port) for a SNATed connection: a hash of the
/// client tuple, then a few probes. A taken port is one whose NAT_REPLY
/// entry is alive.
#[inline(always)]
fn allocate_port(
    ctx: &TcContext,
    pkt: &Packet,
    backend: &weir_abi::lb::Backend,
    _cfg: &Config,
) -> Result<(u32, u16), u32> {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: copied out at once.
    let snat_be = DEVICES.get_ptr(&ifindex).map(|a| unsafe { *a }).unwrap_or(pkt.daddr_be);
    let now = now_secs();
    let seed = pkt.saddr_be ^ (u32::from(pkt.sport_be) << 16) ^ u32::from(pkt.dport_be) ^ backend.address_be;
    let mut i = 0;
    while i < SNAT_PROBES {
        let port = (SNAT_PORT_MIN
            + (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7_919)) % SNAT_PORT_SPAN)
            as u16;
        let port_be = port.to_be();
        let key = ct_key(backend.address_be, snat_be, backend.port_be, port_be, pkt.proto, CT_KIND_NAT_REPLY);
        // SAFETY: copied out at once.
        let taken = CONNTRACK.get_ptr(&key).map(|e| unsafe { (*e).expires }).is_some_and(|exp| exp >= now);
        if !taken {
            return Ok((snat_be, port_be));
        }
        i += 1;
    }
    Err(DROP_NAT_NO_PORT)
}

/// Sends a packet whose source is now a node address straight out (see
/// [`nat::redirect_to_route`]); without a route, the stack gets to try.
#[inline(always)]
fn redirect(ctx: &TcContext, saddr_be: u32, daddr_be: u32) -> Verdict {
    match nat::redirect_to_route(ctx, saddr_be, daddr_be) {
        Some(action) => Verdict::Redirect(action),
        None => Verdict::Pass,
    }
}

/// Cilium's DROP_NAT_NO_MAPPING: no SNAT port could be found.
const DROP_NAT_NO_PORT: u32 = weir_abi::metrics::DROP_NAT_NO_MAPPING;

#[inline(always)]
fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    addr_be: u32,
    port_be: u16,
    snat: Option<(u32, u16)>,
) -> Result<(), u32> {
    rewrite_addr(ctx, pkt, End::Destination, pkt.daddr_be, addr_be)?;
    rewrite_port(ctx, pkt, End::Destination, pkt.dport_be, port_be)?;
    if let Some((src_be, sport_be)) = snat {
        rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, src_be)?;
        rewrite_port(ctx, pkt, End::Source, pkt.sport_be, sport_be)?;
    }
    Ok(())
}

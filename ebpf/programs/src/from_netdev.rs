//! North-south traffic entering the node on one of its devices (tcx
//! ingress): NodePorts, external IPs and LoadBalancer IPs.
//!
//! A connection to a local backend is DNATed only, so the backend sees the
//! client's address; its replies are reverse-translated where the backend
//! sends them (the from-pod program), exactly as for a ClusterIP. A
//! connection to a backend on another node is also SNATed to this node's
//! address and a port chosen here, so that the replies come back through
//! this node, where a NAT_REPLY entry restores the client and the frontend.
//!
//! The decision ([`decide`]) is shared with the XDP program (`xdp.rs`),
//! which runs first on devices whose driver supports it; this tc program
//! then only sees what XDP passed on.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use weir_abi::{
    ct::{
        CT_F_NORTH_SOUTH, CT_F_SNAT, CT_KIND_FLOW, CT_KIND_NAT_REPLY, CT_KIND_SERVICE, CT_STATE_CLOSING,
        CtEntry,
    },
    lb::{SVC_FLAG_LOCAL, SVC_FLAG_SOURCE_RANGES, SVC_FLAGS_NORTH_SOUTH, SourceRangeKey, flow_hash},
    metrics::{
        DROP_CT_CREATE_FAILED, DROP_NAT_NO_MAPPING, DROP_NO_SERVICE, DROP_NOT_IN_SOURCE_RANGE, REVERSE_NAT,
        SERVICE_ESTABLISHED, SERVICE_NEW,
    },
};

use crate::{
    Verdict,
    conntrack::{self, is_syn, now_secs},
    from_pod::ct_key,
    lb,
    maps::{CONFIG, CONNTRACK, CT_SCRATCH, DEVICES, SOURCE_RANGES},
    metrics::count,
    nat::{self, End, rewrite_addr, rewrite_port},
    packet::{Packet, packet_hash},
    policy,
};

/// SNAT source ports: 32768 up, the span a prime so that any probe stride
/// visits distinct ports (Linux's default ephemeral range is 32768–60999; a
/// node running Weir does not need it for its own NodePort replies).
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_229;
/// Candidate ports tried before giving up on a new connection.
const SNAT_PROBES: u32 = 16;

/// The tuple a north-south packet leaves with (network order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Xlate {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

/// What to do with a packet entering on a node device. Decided from the maps
/// alone, so that the XDP program and the tc program share one decision.
pub enum Plan {
    /// Not a north-south service packet.
    Pass,
    /// Translate, then let the stack deliver it (a local backend).
    Local(Xlate),
    /// Translate, then send it out where the route to its new destination
    /// goes: its source is now a node address (SNAT to a remote backend, or
    /// a reply leaving as the frontend), which the stack would drop as a
    /// martian.
    Out(Xlate),
    /// The caller cannot send this packet where it must go (XDP, for a
    /// route that leaves by another device): nothing was recorded, and the
    /// packet is left to the tc program.
    Defer,
    /// A frontend without any backend: refuse (tc answers with an ICMP
    /// port unreachable, as kube-proxy's REJECT).
    Reject,
}

/// The tc program: decides (no XDP on this device, or XDP deferred the
/// packet) and applies the decision.
#[inline(always)]
pub fn handle(ctx: &TcContext, pkt: &Packet) -> Verdict {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // redirect_neigh can send a packet out of any device.
    let plan = match decide(pkt, ifindex, ctx.len(), |_| true) {
        Ok(plan) => plan,
        Err(reason) => return Verdict::Drop(reason),
    };
    let (xlate, out) = match plan {
        Plan::Pass | Plan::Defer => return Verdict::Pass,
        Plan::Reject => return Verdict::Reject(DROP_NO_SERVICE),
        Plan::Local(xlate) => (xlate, false),
        Plan::Out(xlate) => (xlate, true),
    };
    if let Err(reason) = translate(ctx, pkt, &xlate) {
        return Verdict::Drop(reason);
    }
    if out { redirect(ctx, xlate.saddr_be, xlate.daddr_be) } else { Verdict::Pass }
}

/// The decision for a packet that entered on device `ifindex`: conntrack
/// first (replies of SNATed connections, later packets), then the
/// frontends. Creates the conntrack entries of a new connection.
/// `can_send_out` is asked before anything is recorded whether the caller
/// can deliver a packet that must leave the node; if not, the decision is
/// [`Plan::Defer`] and no counter or conntrack entry has changed (a
/// session-affinity entry the backend choice made stays: tc, deciding
/// again, reuses it).
///
/// Not inlined: the XDP program calls it with its own frame (BPF stacks
/// are 512 bytes over all frames of a call chain).
#[inline(never)]
pub fn decide(
    pkt: &Packet,
    ifindex: u32,
    len: u32,
    mut can_send_out: impl FnMut(&Xlate) -> bool,
) -> Result<Plan, u32> {
    if !pkt.can_nat {
        return Ok(Plan::Pass);
    }
    // Read in place: a copy would cost 40 bytes of a tight stack.
    let Some(cfg) = CONFIG.get_ptr(0) else { return Ok(Plan::Pass) };
    // SAFETY: a valid map value for the program's lifetime.
    let cfg = unsafe { &*cfg };
    let now = now_secs();

    // 1. A remote backend's reply to a SNATed client: only the ports the
    //    SNAT hands out can carry one, so other packets skip the lookup.
    let to_snat_port = u32::from(u16::from_be(pkt.dport_be)).wrapping_sub(SNAT_PORT_MIN) < SNAT_PORT_SPAN;
    let reply_key =
        ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_NAT_REPLY);
    if to_snat_port && let Some(entry) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value; concurrent updates only race on counters.
        let entry = unsafe { &mut *entry };
        let xlate = Xlate {
            saddr_be: entry.nat_addr_be,
            sport_be: entry.nat_port_be,
            daddr_be: entry.client_addr_be,
            dport_be: entry.aux_port_be,
        };
        if !can_send_out(&xlate) {
            return Ok(Plan::Defer);
        }
        conntrack::observe(entry, pkt, false, len, cfg, now);
        count(REVERSE_NAT, len);
        return Ok(Plan::Out(xlate));
    }

    // 2. A later packet of a north-south connection.
    let svc_key = ct_key(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto, CT_KIND_SERVICE);
    if let Some(svc) = CONNTRACK.get_ptr_mut(&svc_key) {
        // SAFETY: a valid map value.
        let svc = unsafe { &mut *svc };
        if !(is_syn(pkt) && (svc.state == CT_STATE_CLOSING || svc.expires < now)) {
            let mut xlate = Xlate {
                saddr_be: pkt.saddr_be,
                sport_be: pkt.sport_be,
                daddr_be: svc.nat_addr_be,
                dport_be: svc.nat_port_be,
            };
            let snat = svc.flags & CT_F_SNAT != 0;
            if snat {
                xlate.saddr_be = svc.client_addr_be;
                xlate.sport_be = svc.aux_port_be;
                if !can_send_out(&xlate) {
                    return Ok(Plan::Defer);
                }
            }
            conntrack::observe(svc, pkt, true, len, cfg, now);
            count(SERVICE_ESTABLISHED, len);
            return Ok(if snat { Plan::Out(xlate) } else { Plan::Local(xlate) });
        }
    }

    // 3. A new connection to a NodePort, external or LoadBalancer IP.
    let Some(service) = lb::lookup_service(pkt.daddr_be, pkt.dport_be, pkt.proto)
        .filter(|s| s.flags & SVC_FLAGS_NORTH_SOUTH != 0)
    else {
        return Ok(Plan::Pass);
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
    let (backend_id, backend) = match lb::select_backend(&service, pkt.saddr_be, now, packet_hash(pkt)) {
        Ok(chosen) => chosen,
        // kube-proxy DROPs under a Local policy without local endpoints,
        // and REJECTs when there are none at all.
        Err(reason) if service.flags & SVC_FLAG_LOCAL != 0 => return Err(reason),
        Err(_) => return Ok(Plan::Reject),
    };
    // The two entries of a new connection are built in per-CPU scratch
    // space: on the stack they would not fit next to everything else.
    let (Some(svc), Some(second)) = (CT_SCRATCH.get_ptr_mut(0), CT_SCRATCH.get_ptr_mut(1)) else {
        return Err(DROP_CT_CREATE_FAILED);
    };
    // SAFETY: per-CPU slots, used by this packet only until it returns.
    let (svc, second) = unsafe { (&mut *svc, &mut *second) };
    *svc = CtEntry {
        nat_addr_be: backend.address_be,
        nat_port_be: backend.port_be,
        service_id: service.service_id,
        backend_id,
        ..CtEntry::default()
    };
    conntrack::observe(svc, pkt, true, len, cfg, now);
    let mut xlate = Xlate {
        saddr_be: pkt.saddr_be,
        sport_be: pkt.sport_be,
        daddr_be: backend.address_be,
        dport_be: backend.port_be,
    };

    if policy::endpoint(backend.address_be).is_some() {
        // Local backend: the client's address is preserved; replies are
        // reverse-translated by the backend's from-pod program.
        *second = CtEntry {
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
        CONNTRACK.insert(&flow_key, second, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        CONNTRACK.insert(&svc_key, svc, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
        count(SERVICE_NEW, len);
        return Ok(Plan::Local(xlate));
    }
    let (snat_be, port_be) = allocate_port(ifindex, pkt, &backend, now)?;
    xlate.saddr_be = snat_be;
    xlate.sport_be = port_be;
    // Checked before anything is recorded; a deferred packet comes back
    // through tc, which picks a backend anew (for a random choice, maybe
    // another: nothing was promised to the client yet).
    if !can_send_out(&xlate) {
        return Ok(Plan::Defer);
    }
    *second = CtEntry {
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
    CONNTRACK.insert(&reply_key, second, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
    svc.flags |= CT_F_SNAT;
    svc.client_addr_be = snat_be;
    svc.aux_port_be = port_be;
    CONNTRACK.insert(&svc_key, svc, 0).map_err(|_| DROP_CT_CREATE_FAILED)?;
    count(SERVICE_NEW, len);
    Ok(Plan::Out(xlate))
}

/// Picks a free (node address, port) for a SNATed connection: a hash of the
/// client tuple, then a few probes. A taken port is one whose NAT_REPLY
/// entry is alive.
// Not inlined: its hashing gets a frame of its own instead of growing the
// XDP program's past the 512-byte BPF stack.
#[inline(never)]
fn allocate_port(
    ifindex: u32,
    pkt: &Packet,
    backend: &weir_abi::lb::Backend,
    now: u32,
) -> Result<(u32, u16), u32> {
    // SAFETY: copied out at once.
    let snat_be = DEVICES.get_ptr(&ifindex).map(|a| unsafe { *a }).unwrap_or(pkt.daddr_be);
    // Double hashing over the whole client tuple: a start and a stride, both
    // well mixed, so that two flows share their candidates only by chance
    // (a busy client address must not exhaust a handful of candidate sets).
    let start = flow_hash(pkt.saddr_be, backend.address_be, pkt.sport_be, backend.port_be, pkt.proto);
    let stride = 1 + flow_hash(pkt.daddr_be, pkt.saddr_be, pkt.dport_be, pkt.sport_be, pkt.proto)
        % (SNAT_PORT_SPAN - 1);
    let mut i = 0;
    while i < SNAT_PROBES {
        let offset = (u64::from(start) + u64::from(i) * u64::from(stride)) % u64::from(SNAT_PORT_SPAN);
        let port = (SNAT_PORT_MIN + offset as u32) as u16;
        let port_be = port.to_be();
        let key = ct_key(backend.address_be, snat_be, backend.port_be, port_be, pkt.proto, CT_KIND_NAT_REPLY);
        // A live entry takes the port, unless it is this very client tuple's
        // earlier connection: a client that reuses its source port has
        // ended that one (its retransmitted SYNs never get here: they find
        // the service entry), so the new connection takes its place.
        // SAFETY: fields read in place (a copy would cost 64 bytes of stack).
        let taken = CONNTRACK.get_ptr(&key).is_some_and(|e| unsafe {
            (*e).expires >= now
                && !((*e).client_addr_be == pkt.saddr_be
                    && (*e).aux_port_be == pkt.sport_be
                    && (*e).nat_addr_be == pkt.daddr_be
                    && (*e).nat_port_be == pkt.dport_be)
        });
        if !taken {
            return Ok((snat_be, port_be));
        }
        i += 1;
    }
    Err(DROP_NAT_NO_MAPPING)
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

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, xlate: &Xlate) -> Result<(), u32> {
    rewrite_addr(ctx, pkt, End::Destination, pkt.daddr_be, xlate.daddr_be)?;
    rewrite_port(ctx, pkt, End::Destination, pkt.dport_be, xlate.dport_be)?;
    rewrite_addr(ctx, pkt, End::Source, pkt.saddr_be, xlate.saddr_be)?;
    rewrite_port(ctx, pkt, End::Source, pkt.sport_be, xlate.sport_be)
}

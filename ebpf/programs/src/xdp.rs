//! The XDP fast path for north-south traffic, on node devices whose driver
//! runs XDP natively: the same decision as the tc program
//! ([`from_netdev::decide`]), taken before the kernel allocates an skb.
//!
//! - Drops (source ranges, a Local policy without local backend) happen
//!   here, at the earliest point; a frontend without any backend is left to
//!   tc, which answers with an ICMP port unreachable.
//! - A local backend: the packet is translated and passed to the stack,
//!   which routes it to the pod.
//! - A packet that must leave again (SNAT to a remote backend, a reply to a
//!   client) and whose route leaves by this same device (a one-armed load
//!   balancer, the usual cloud NIC) is translated and sent back out with
//!   XDP_TX. If the route leaves by another device, XDP defers the packet,
//!   untouched and unrecorded, to the tc program: XDP_REDIRECT to another
//!   device needs driver support we cannot count on, while tc's
//!   redirect_neigh works everywhere.
//!
//! XDP cannot know whether a checksum is complete or a partial one left
//! for offload (only locally generated packets have those; packets from a
//! wire never do), so it updates checksums as complete ones. That is what
//! the device in front of a node delivers.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use weir_abi::metrics::{DROP_WRITE_ERROR, XDP_TO_STACK, XDP_TO_TC, XDP_TX};

use crate::{
    from_netdev::{self, Plan, Xlate},
    metrics::count,
    nat,
    packet::{Bytes, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet, parse_bytes, ptr_at},
};

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let pkt = match parse_bytes(Bytes::of_xdp(ctx)) {
        Ok(Some(pkt)) => pkt,
        // Not ours, or not ours to judge: the stack (and tc) decide.
        _ => return xdp_action::XDP_PASS,
    };
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u32;
    // The route of a packet that must leave again, if XDP can send it there
    // (back out of this device).
    let mut out_route = None;
    let can_send_out = |xlate: &Xlate| {
        out_route = route(ctx, ifindex, xlate).filter(|hop| hop.ifindex == ifindex);
        out_route.is_some()
    };
    let plan = match from_netdev::decide(&pkt, ifindex, len, can_send_out) {
        Ok(plan) => plan,
        Err(reason) => {
            count(reason, len);
            return xdp_action::XDP_DROP;
        }
    };
    match plan {
        // No backend at all: tc answers with an ICMP port unreachable
        // (nothing was recorded, so it decides again to the same result).
        Plan::Pass | Plan::Reject => xdp_action::XDP_PASS,
        Plan::Local(xlate) => {
            if rewrite(Bytes::of_xdp(ctx), &pkt, &xlate).is_err() {
                count(DROP_WRITE_ERROR, len);
                return xdp_action::XDP_DROP;
            }
            count(XDP_TO_STACK, len);
            xdp_action::XDP_PASS
        }
        Plan::Out(xlate) => {
            let Some(next_hop) = out_route else { return xdp_action::XDP_PASS };
            if rewrite(Bytes::of_xdp(ctx), &pkt, &xlate).is_err()
                || set_macs(Bytes::of_xdp(ctx), &next_hop).is_err()
            {
                count(DROP_WRITE_ERROR, len);
                return xdp_action::XDP_DROP;
            }
            count(XDP_TX, len);
            xdp_action::XDP_TX
        }
        // Another device (or no neighbour yet): tc decides and redirects.
        Plan::Defer => {
            count(XDP_TO_TC, len);
            xdp_action::XDP_PASS
        }
    }
}

/// Where the FIB sends a packet: the egress device and the MACs to use.
#[derive(Clone, Copy)]
struct NextHop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// The FIB's answer for the translated packet. Not inlined: its 64-byte
/// request lives in its own frame, not in the program's (BPF stacks are
/// 512 bytes).
#[inline(never)]
fn route(ctx: &XdpContext, ifindex: u32, xlate: &Xlate) -> Option<NextHop> {
    let mut params = nat::fib_request(ifindex, xlate.saddr_be, xlate.daddr_be);
    // SAFETY: the context the kernel handed us and a stack buffer of the size we pass.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some(NextHop {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

#[inline(always)]
fn set_macs(bytes: Bytes, hop: &NextHop) -> Result<(), ()> {
    let eth = ptr_at::<[u8; 12]>(bytes, 0).ok_or(())?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&hop.dmac);
    macs[6..].copy_from_slice(&hop.smac);
    // SAFETY: bounds checked by ptr_at.
    unsafe { core::ptr::write_unaligned(eth, macs) };
    Ok(())
}

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update of checksum `check` for a 32-bit field
/// changing from `old` to `new` (all as read from the packet).
#[inline(always)]
fn update32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

#[inline(always)]
fn update16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// Writes the translated tuple into the packet and updates the IPv4 and
/// L4 checksums (a UDP checksum of zero means "none" and stays so).
/// Not inlined, to keep its locals out of the frame that calls `decide`.
#[inline(never)]
fn rewrite(bytes: Bytes, pkt: &Packet, xlate: &Xlate) -> Result<(), ()> {
    // Bounded, so that the verifier can check the variable offsets.
    let l4_off = pkt.l4_off & 0x7f;
    let csum_off = pkt.l4_csum_off & 0x7f;
    let ip_csum = ptr_at::<u16>(bytes, IP_CSUM_OFF).ok_or(())?;
    let saddr = ptr_at::<u32>(bytes, IP_SADDR_OFF).ok_or(())?;
    let daddr = ptr_at::<u32>(bytes, IP_DADDR_OFF).ok_or(())?;
    let ports = ptr_at::<[u16; 2]>(bytes, l4_off).ok_or(())?;
    let l4_csum = ptr_at::<u16>(bytes, csum_off).ok_or(())?;
    // SAFETY: every pointer was bounds-checked by ptr_at.
    unsafe {
        let mut ip_check = core::ptr::read_unaligned(ip_csum);
        let mut check = core::ptr::read_unaligned(l4_csum);
        let no_l4_check = pkt.is_udp && check == 0;
        ip_check = update32(ip_check, pkt.saddr_be, xlate.saddr_be);
        ip_check = update32(ip_check, pkt.daddr_be, xlate.daddr_be);
        // The L4 checksum covers the pseudo-header's addresses too.
        check = update32(check, pkt.saddr_be, xlate.saddr_be);
        check = update32(check, pkt.daddr_be, xlate.daddr_be);
        check = update16(check, pkt.sport_be, xlate.sport_be);
        check = update16(check, pkt.dport_be, xlate.dport_be);
        if pkt.is_udp && check == 0 {
            check = 0xffff;
        }
        core::ptr::write_unaligned(saddr, xlate.saddr_be);
        core::ptr::write_unaligned(daddr, xlate.daddr_be);
        core::ptr::write_unaligned(ports, [xlate.sport_be, xlate.dport_be]);
        core::ptr::write_unaligned(ip_csum, ip_check);
        if !no_l4_check {
            core::ptr::write_unaligned(l4_csum, check);
        }
    }
    Ok(())
}

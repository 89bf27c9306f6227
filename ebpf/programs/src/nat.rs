//! Address and port rewrites with incremental checksum updates. The helpers
//! handle CHECKSUM_PARTIAL packets (veth offload) correctly when the
//! pseudo-header flag is given for address changes.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use weir_abi::metrics::DROP_WRITE_ERROR;

use crate::packet::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet};

/// Which end of the tuple to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    // A UDP checksum of zero means "none": keep it so, and never produce zero.
    if pkt.is_udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// Rewrites one address of the packet.
#[inline(always)]
pub fn rewrite_addr(ctx: &TcContext, pkt: &Packet, end: End, old_be: u32, new_be: u32) -> Result<(), u32> {
    if old_be == new_be {
        return Ok(());
    }
    let off = match end {
        End::Source => IP_SADDR_OFF,
        End::Destination => IP_DADDR_OFF,
    };
    ctx.l4_csum_replace(
        pkt.l4_csum_off,
        u64::from(old_be),
        u64::from(new_be),
        BPF_F_PSEUDO_HDR as u64 | l4_flags(pkt) | 4,
    )
    .map_err(|_| DROP_WRITE_ERROR)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_be), u64::from(new_be), 4)
        .map_err(|_| DROP_WRITE_ERROR)?;
    ctx.store(off, &new_be, 0).map_err(|_| DROP_WRITE_ERROR)
}

/// Rewrites one port of the packet.
#[inline(always)]
pub fn rewrite_port(ctx: &TcContext, pkt: &Packet, end: End, old_be: u16, new_be: u16) -> Result<(), u32> {
    if old_be == new_be {
        return Ok(());
    }
    let off = match end {
        End::Source => pkt.l4_off,
        End::Destination => pkt.l4_off + 2,
    };
    ctx.l4_csum_replace(pkt.l4_csum_off, u64::from(old_be), u64::from(new_be), l4_flags(pkt) | 2)
        .map_err(|_| DROP_WRITE_ERROR)?;
    ctx.store(off, &new_be, 0).map_err(|_| DROP_WRITE_ERROR)
}

/// A FIB lookup request for an IPv4 packet `saddr_be` → `daddr_be` that
/// entered on `ifindex` (tc and XDP each pass it to `bpf_fib_lookup` with
/// their own context).
#[inline(always)]
pub fn fib_request(ifindex: u32, saddr_be: u32, daddr_be: u32) -> bpf_fib_lookup {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = saddr_be;
    params.__bindgen_anon_4.ipv4_dst = daddr_be;
    params
}

/// Sends a rewritten packet straight out of the interface the routing table
/// picks for its (new) destination, resolving the next hop's MAC.
///
/// Needed when a rewrite makes the source one of this node's own addresses
/// (a NodePort reply, a SNATed client): the stack would drop such a packet
/// as a martian ("source is local") before forwarding it. Cilium bypasses
/// the stack the same way (`redirect_neigh`). Returns the TC action, or
/// `None` when there is no route (the caller lets the stack try).
#[inline(always)]
pub fn redirect_to_route(ctx: &TcContext, saddr_be: u32, daddr_be: u32) -> Option<i32> {
    // SAFETY: reading a field of the context the kernel handed us.
    let mut params = fib_request(unsafe { (*ctx.skb.skb).ingress_ifindex }, saddr_be, daddr_be);
    // SAFETY: the context's skb and a stack buffer of the size we pass.
    let rc = unsafe {
        bpf_fib_lookup(ctx.skb.skb.cast(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    // Success, or a route whose neighbour is not resolved yet (which
    // redirect_neigh resolves).
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return None;
    }
    // SAFETY: a helper on an ifindex the kernel just returned.
    let rc = unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) };
    Some(rc as i32)
}

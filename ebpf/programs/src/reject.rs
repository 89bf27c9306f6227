//! ICMP port unreachable for a new connection to a service address that has
//! nothing to serve it — kube-proxy's REJECT ("has no endpoints") — so the
//! client fails at once with "connection refused" instead of timing out.
//! The packet is rewritten in place into the ICMP error and sent back out of
//! the interface it came in on, toward the pod (Cilium's
//! `tail_no_service_ipv4` does the same).

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use weir_abi::proto;

use crate::{
    conntrack::is_syn,
    packet::{ETH_HLEN, Packet},
};

/// IPv4 header (20) + ICMP header (8) + the offending IPv4 header (20) and
/// the first 8 bytes of its payload.
const ICMP_LEN: usize = 20 + 8 + 28;

/// Whether the packet opens a connection worth rejecting (not a stray
/// segment of an old one, not a fragment with options we don't quote).
#[inline(always)]
pub fn applies(pkt: &Packet) -> bool {
    (is_syn(pkt) || pkt.proto == proto::UDP) && pkt.l4_off == ETH_HLEN + 20
}

/// The packet under construction, 4-byte aligned for `bpf_csum_diff`.
#[repr(C, align(4))]
struct Icmp([u8; ICMP_LEN]);

/// The Internet checksum of `len` bytes at `offset` (a multiple of 4), with
/// the kernel's helper: a loop here would cost the verifier far more.
#[inline(always)]
fn checksum(buf: &mut Icmp, offset: usize, len: usize) -> [u8; 2] {
    // SAFETY: `offset + len` lies inside `buf`, both multiples of 4.
    let sum = unsafe {
        bpf_csum_diff(core::ptr::null_mut(), 0, buf.0.as_mut_ptr().add(offset).cast(), len as u32, 0)
    } as u32;
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    // The sum is of native-order words; its complement's bytes are already
    // in the order the header wants.
    (!(folded as u16)).to_ne_bytes()
}

/// Turns the packet into an ICMP port unreachable and redirects it back.
/// Returns the TC verdict: a redirect of the ICMP error, or TC_ACT_SHOT when
/// the packet could not be rewritten. Inlined (the from-pod program has room
/// for its buffer, and a call would add a frame to its deepest chain).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> i32 {
    rewrite_into_port_unreachable(ctx, pkt).unwrap_or(TC_ACT_SHOT as i32)
}

/// [`port_unreachable`] in a frame of its own, for the from-netdev program,
/// whose deepest chain (the north-south decision) leaves no room for the
/// ICMP buffer. Returns a plain integer: a Rust enum in a subprogram's
/// signature puts a type in the object's BTF that the kernel rejects.
#[inline(never)]
pub fn port_unreachable_in_frame(ctx: &TcContext, pkt: &Packet) -> i32 {
    rewrite_into_port_unreachable(ctx, pkt).unwrap_or(TC_ACT_SHOT as i32)
}

#[inline(always)]
fn rewrite_into_port_unreachable(ctx: &TcContext, pkt: &Packet) -> Option<i32> {
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let quoted: [u8; 28] = ctx.load(ETH_HLEN).ok()?;
    // SAFETY: the context's own skb, resized before anything is written.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ICMP_LEN) as u32, 0) } != 0 {
        return None;
    }
    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12] = 0x08;
    let mut icmp = Icmp([0u8; ICMP_LEN]);
    let out = &mut icmp.0;
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(ICMP_LEN as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = 1; // ICMP
    // From the address the client tried, to the client.
    out[12..16].copy_from_slice(&pkt.daddr_be.to_ne_bytes());
    out[16..20].copy_from_slice(&pkt.saddr_be.to_ne_bytes());
    let ip_csum = checksum(&mut icmp, 0, 20);
    let out = &mut icmp.0;
    out[10..12].copy_from_slice(&ip_csum);
    out[20] = 3; // destination unreachable
    out[21] = 3; // port unreachable
    out[28..].copy_from_slice(&quoted);
    let icmp_csum = checksum(&mut icmp, 20, ICMP_LEN - 20);
    icmp.0[22..24].copy_from_slice(&icmp_csum);
    ctx.store(0, &eth, 0).ok()?;
    ctx.store(ETH_HLEN, &icmp.0, 0).ok()?;
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper on plain integers.
    unsafe { bpf_redirect(ifindex, 0) };
    Some(TC_ACT_REDIRECT as i32)
}

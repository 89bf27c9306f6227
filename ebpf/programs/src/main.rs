//! Weir's kernel programs.
//!
//! `weir_from_pod` runs at tcx ingress of the host side of every local pod's
//! veth, so it sees every packet a pod sends. It does the service translation
//! for new and established connections, and reverse translation of replies
//! (which are also sent by a pod: the backend). Per-packet work is a fixed
//! number of hash lookups, whatever the number of services or backends.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod from_netdev;
#[cfg(target_arch = "bpf")]
mod from_pod;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod metrics;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod to_pod;
#[cfg(target_arch = "bpf")]
mod xdp;

/// What a program decided about a packet.
#[cfg(target_arch = "bpf")]
pub enum Verdict {
    Pass,
    Drop(u32),
    /// Drop with this reason, answering with an ICMP port unreachable when
    /// the packet opens a connection: a service address with nothing behind
    /// it (kube-proxy's REJECT).
    Reject(u32),
    /// The packet was redirected; return this TC action.
    Redirect(i32),
}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        macros::{cgroup_sock_addr, classifier, xdp},
        programs::{SockAddrContext, TcContext, XdpContext},
    };

    use weir_abi::events::{DIRECTION_EGRESS, DIRECTION_INGRESS, OBSERVED_FROM_POD, OBSERVED_TO_POD};

    use crate::{Verdict, events, from_netdev, from_pod, metrics, packet, reject, sock, to_pod, xdp};

    /// Attached to tcx ingress of a pod's host-side veth: traffic from the pod.
    #[classifier]
    pub fn weir_from_pod(ctx: TcContext) -> i32 {
        let verdict = match packet::parse(&ctx) {
            Ok(Some(pkt)) => {
                let verdict = from_pod::handle(&ctx, &pkt);
                if let Verdict::Drop(reason) | Verdict::Reject(reason) = verdict {
                    events::drop(&ctx, &pkt, reason, OBSERVED_FROM_POD, DIRECTION_EGRESS);
                }
                if let Verdict::Reject(reason) = verdict
                    && reject::applies(&pkt)
                {
                    metrics::count(reason, ctx.len());
                    return reject::port_unreachable(&ctx, &pkt);
                }
                verdict
            }
            // Not IPv4 TCP/UDP/SCTP, or a non-first fragment: not ours.
            Ok(None) => Verdict::Pass,
            Err(reason) => Verdict::Drop(reason),
        };
        finish(&ctx, verdict)
    }

    /// Attached to tcx egress of a pod's host-side veth: traffic to the pod.
    #[classifier]
    pub fn weir_to_pod(ctx: TcContext) -> i32 {
        let verdict = match packet::parse(&ctx) {
            Ok(Some(pkt)) => {
                let verdict = to_pod::handle(&ctx, &pkt);
                if let Verdict::Drop(reason) = verdict {
                    events::drop(&ctx, &pkt, reason, OBSERVED_TO_POD, DIRECTION_INGRESS);
                }
                verdict
            }
            Ok(None) => Verdict::Pass,
            Err(reason) => Verdict::Drop(reason),
        };
        finish(&ctx, verdict)
    }

    /// Attached to tcx ingress of the node's devices: north-south traffic.
    #[classifier]
    pub fn weir_from_netdev(ctx: TcContext) -> i32 {
        let verdict = match packet::parse(&ctx) {
            Ok(Some(pkt)) => {
                let verdict = from_netdev::handle(&ctx, &pkt);
                // XDP leaves these to tc, which can answer.
                if let Verdict::Reject(reason) = verdict
                    && reject::applies(&pkt)
                {
                    metrics::count(reason, ctx.len());
                    return reject::port_unreachable_in_frame(&ctx, &pkt);
                }
                verdict
            }
            Ok(None) => Verdict::Pass,
            // Not ours to judge what else arrives from the network.
            Err(_) => Verdict::Pass,
        };
        finish(&ctx, verdict)
    }

    /// Attached (XDP, native mode) to the node's devices whose driver
    /// supports it: north-south traffic before tc and the stack.
    #[xdp]
    pub fn weir_xdp_from_netdev(ctx: XdpContext) -> u32 {
        xdp::handle(&ctx)
    }

    /// Socket LB, on the cgroup of the node's processes: `connect()` to a
    /// service (TCP, connected UDP).
    #[cgroup_sock_addr(connect4)]
    pub fn weir_sock_connect4(ctx: SockAddrContext) -> i32 {
        sock::translate_to_backend(&ctx)
    }

    /// Socket LB: `sendto()`/`sendmsg()` of unconnected UDP to a service.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn weir_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate_to_backend(&ctx)
    }

    /// Socket LB: the source of a received datagram, back to the service.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn weir_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate_to_service(&ctx)
    }

    /// Socket LB: `getpeername()` of a socket connected to a service.
    #[cgroup_sock_addr(getpeername4)]
    pub fn weir_sock_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::translate_to_service(&ctx)
    }

    #[inline(always)]
    fn finish(ctx: &TcContext, verdict: Verdict) -> i32 {
        match verdict {
            Verdict::Pass => TC_ACT_OK as i32,
            Verdict::Redirect(action) => action,
            Verdict::Drop(reason) | Verdict::Reject(reason) => {
                metrics::count(reason, ctx.len());
                TC_ACT_SHOT as i32
            }
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}

//! Flow events into the ring buffer, for the agent's flow monitor. Only new
//! connections and drops are reported, and only when the agent asked for
//! events; a full ring buffer is counted, never silent.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use weir_abi::{
    config::{CONFIG_F_EVENTS, Config},
    events::{EVENT_DROP, FlowEvent},
    metrics::EVENTS_LOST,
};

use crate::{
    maps::{CONFIG, EVENTS},
    metrics::count,
    packet::Packet,
};

#[inline(always)]
pub fn enabled(cfg: &Config) -> bool {
    cfg.flags & CONFIG_F_EVENTS != 0
}

/// An event describing `pkt` as it arrived.
#[inline(always)]
pub fn for_packet(ctx: &TcContext, pkt: &Packet, kind: u8, observed: u8, direction: u8) -> FlowEvent {
    FlowEvent {
        // SAFETY: a helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        proto: pkt.proto,
        tcp_flags: pkt.tcp_flags,
        observed,
        direction,
        // SAFETY: reading a field of the context the kernel handed us.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        orig_daddr_be: pkt.daddr_be,
        orig_dport_be: pkt.dport_be,
        packet_len: ctx.len(),
        ..FlowEvent::default()
    }
}

#[inline(always)]
pub fn emit(event: &FlowEvent) {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
        }
        None => count(EVENTS_LOST, 0),
    }
}

/// Reports a drop, if events are on.
#[inline(always)]
pub fn drop(ctx: &TcContext, pkt: &Packet, reason: u32, observed: u8, direction: u8) {
    // SAFETY: copied out at once.
    let cfg = CONFIG.get_ptr(0).map(|c| unsafe { *c }).unwrap_or_default();
    if !enabled(&cfg) {
        return;
    }
    let mut event = for_packet(ctx, pkt, EVENT_DROP, observed, direction);
    event.reason = reason as u8;
    emit(&event);
}

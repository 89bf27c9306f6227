//! Conntrack entry lifetimes and TCP state tracking.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use weir_abi::{
    config::Config,
    ct::{
        CT_F_RX_CLOSING, CT_F_TX_CLOSING, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtEntry,
        lifetime,
    },
    proto,
};

use crate::packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Seconds of CLOCK_MONOTONIC, the clock the agent's GC compares against.
#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn or_default(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

/// How long an entry in `state` lives without traffic.
#[inline(always)]
pub fn lifetime(cfg: &Config, proto: u8, state: u8) -> u32 {
    if proto != proto::TCP {
        return or_default(cfg.lifetime_non_tcp, lifetime::NON_TCP);
    }
    match state {
        CT_STATE_ESTABLISHED => or_default(cfg.lifetime_tcp_established, lifetime::TCP_ESTABLISHED),
        CT_STATE_CLOSING => or_default(cfg.lifetime_tcp_close, lifetime::TCP_CLOSE),
        _ => or_default(cfg.lifetime_tcp_syn, lifetime::TCP_SYN),
    }
}

/// A TCP SYN without ACK: the first packet of a connection.
#[inline(always)]
pub fn is_syn(pkt: &Packet) -> bool {
    pkt.proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Accounts a packet on a flow entry and advances its state. `tx` is true for
/// the originating side, false for the reply side.
#[inline(always)]
pub fn observe(entry: &mut CtEntry, pkt: &Packet, tx: bool, len: u32, cfg: &Config, now: u32) {
    if tx {
        entry.tx_packets += 1;
        entry.tx_bytes += u64::from(len);
        entry.tx_flags_seen |= pkt.tcp_flags;
    } else {
        entry.rx_packets += 1;
        entry.rx_bytes += u64::from(len);
        entry.rx_flags_seen |= pkt.tcp_flags;
    }
    if pkt.proto == proto::TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            entry.flags |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
        } else if pkt.tcp_flags & TCP_FIN != 0 {
            entry.flags |= if tx { CT_F_TX_CLOSING } else { CT_F_RX_CLOSING };
        }
        if entry.flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING) == CT_F_TX_CLOSING | CT_F_RX_CLOSING {
            entry.state = CT_STATE_CLOSING;
        } else if !tx && entry.state == CT_STATE_NEW {
            entry.state = CT_STATE_ESTABLISHED;
        }
    } else if !tx {
        entry.state = CT_STATE_ESTABLISHED;
    }
    entry.expires = now + lifetime(cfg, pkt.proto, entry.state);
}

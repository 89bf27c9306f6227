//! Address and port rewrites with incremental checksum updates. The helpers
//! handle CHECKSUM_PARTIAL packets (veth offload) correctly when the
//! pseudo-header flag is given for address changes.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
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

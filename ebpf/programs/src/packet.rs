//! Parsing: Ethernet → IPv4 → TCP/UDP, into the few fields the datapath
//! needs, with the offsets that the rewrite code patches.

use aya_ebpf::programs::{TcContext, XdpContext};
use weir_abi::{metrics::DROP_INVALID, proto};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 header checksum, source and destination address.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The parsed 5-tuple and where its fields live in the packet.
/// Addresses and ports are kept as read from the packet (network order).
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flags, zero for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Offset of the L4 checksum.
    pub l4_csum_off: usize,
    /// UDP: a zero checksum means "none" and must stay zero.
    pub is_udp: bool,
    /// Whether the datapath can rewrite this packet (TCP, UDP). SCTP's CRC32c
    /// cannot be updated incrementally, so SCTP is matched by policy but not
    /// load-balanced.
    pub can_nat: bool,
}

/// The packet's linear bytes, `[start, end)`: what tc and XDP both give.
#[derive(Clone, Copy)]
pub struct Bytes {
    pub start: usize,
    pub end: usize,
}

impl Bytes {
    #[inline(always)]
    pub fn of_tc(ctx: &TcContext) -> Bytes {
        Bytes { start: ctx.data(), end: ctx.data_end() }
    }

    #[inline(always)]
    pub fn of_xdp(ctx: &XdpContext) -> Bytes {
        Bytes { start: ctx.data(), end: ctx.data_end() }
    }
}

/// A bounds-checked pointer to a `T` at `off` (the check the verifier needs
/// before every packet access).
#[inline(always)]
pub fn ptr_at<T>(bytes: Bytes, off: usize) -> Option<*mut T> {
    if bytes.start + off + core::mem::size_of::<T>() > bytes.end {
        return None;
    }
    Some((bytes.start + off) as *mut T)
}

/// `Ok(None)` for traffic the datapath leaves alone (not IPv4, not TCP/UDP,
/// non-first fragments); `Err(reason)` for a truncated header.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, u32> {
    // Headers of locally generated veth traffic are linear, but pull them in
    // case they are not; a failure shows up as a truncated header below. A
    // packet that is short because it *is* short (a SYN, an ACK: most of
    // them) is all linear already and skips the helper call.
    const HEADERS: usize = ETH_HLEN + 60 + 20;
    let linear = ctx.data_end() - ctx.data();
    if linear < HEADERS && ctx.len() as usize > linear {
        let _ = ctx.pull_data(ctx.len().min(HEADERS as u32));
    }
    parse_bytes(Bytes::of_tc(ctx))
}

/// [`parse`] over bytes already linear (XDP's always are).
#[inline(always)]
pub fn parse_bytes(ctx: Bytes) -> Result<Option<Packet>, u32> {
    let mut pkt = Packet {
        saddr_be: 0,
        daddr_be: 0,
        sport_be: 0,
        dport_be: 0,
        proto: 0,
        tcp_flags: 0,
        l4_off: 0,
        l4_csum_off: 0,
        is_udp: false,
        can_nat: false,
    };
    match parse_into(ctx, &mut pkt) {
        PARSED => Ok(Some(pkt)),
        NOT_OURS => Ok(None),
        reason => Err(reason),
    }
}

const PARSED: u32 = 0;
const NOT_OURS: u32 = 1;

/// The parser proper, not inlined so that its temporaries stay out of the
/// callers' frames (BPF stacks are 512 bytes over a whole call chain). It
/// returns a plain code and fills `out`: a Rust enum in a subprogram's
/// signature would put a type in the object's BTF that the kernel rejects.
#[inline(never)]
fn parse_into(ctx: Bytes, out: &mut Packet) -> u32 {
    match parse_inline(ctx) {
        Ok(Some(pkt)) => {
            *out = pkt;
            PARSED
        }
        Ok(None) => NOT_OURS,
        Err(reason) => reason,
    }
}

#[inline(always)]
fn parse_inline(ctx: Bytes) -> Result<Option<Packet>, u32> {
    let Some(ethertype) = ptr_at::<[u8; 2]>(ctx, 12) else {
        return Ok(None);
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be_bytes(unsafe { *ethertype }) != ETH_P_IP {
        return Ok(None);
    }
    let ip = ptr_at::<[u8; 20]>(ctx, ETH_HLEN).ok_or(DROP_INVALID)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(DROP_INVALID);
    }
    // A non-first fragment carries no ports.
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if frag_off != 0 {
        return Ok(None);
    }
    let l4_proto = ip[9];
    let saddr_be = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr_be = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let l4_off = ETH_HLEN + ihl * 4;
    match l4_proto {
        proto::TCP => {
            let tcp = ptr_at::<[u8; 20]>(ctx, l4_off).ok_or(DROP_INVALID)?;
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            Ok(Some(Packet {
                saddr_be,
                daddr_be,
                sport_be: u16::from_ne_bytes([tcp[0], tcp[1]]),
                dport_be: u16::from_ne_bytes([tcp[2], tcp[3]]),
                proto: l4_proto,
                tcp_flags: tcp[13],
                l4_off,
                l4_csum_off: l4_off + 16,
                is_udp: false,
                can_nat: true,
            }))
        }
        proto::UDP => {
            let udp = ptr_at::<[u8; 8]>(ctx, l4_off).ok_or(DROP_INVALID)?;
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            Ok(Some(Packet {
                saddr_be,
                daddr_be,
                sport_be: u16::from_ne_bytes([udp[0], udp[1]]),
                dport_be: u16::from_ne_bytes([udp[2], udp[3]]),
                proto: l4_proto,
                tcp_flags: 0,
                l4_off,
                l4_csum_off: l4_off + 6,
                is_udp: true,
                can_nat: true,
            }))
        }
        proto::SCTP => {
            // The common header: ports, verification tag, checksum.
            let sctp = ptr_at::<[u8; 12]>(ctx, l4_off).ok_or(DROP_INVALID)?;
            // SAFETY: bounds checked by ptr_at.
            let sctp = unsafe { &*sctp };
            Ok(Some(Packet {
                saddr_be,
                daddr_be,
                sport_be: u16::from_ne_bytes([sctp[0], sctp[1]]),
                dport_be: u16::from_ne_bytes([sctp[2], sctp[3]]),
                proto: l4_proto,
                tcp_flags: 0,
                l4_off,
                l4_csum_off: l4_off + 8,
                is_udp: false,
                can_nat: false,
            }))
        }
        _ => Ok(None),
    }
}

/// The packet's flow hash for Maglev (see `weir_abi::lb::flow_hash`).
#[inline(always)]
pub fn packet_hash(pkt: &Packet) -> u32 {
    weir_abi::lb::flow_hash(pkt.saddr_be, pkt.daddr_be, pkt.sport_be, pkt.dport_be, pkt.proto)
}

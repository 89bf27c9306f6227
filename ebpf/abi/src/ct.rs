//! Connection tracking. One LRU map holds two kinds of entries per service
//! connection, as Cilium's CT_SERVICE and CT_EGRESS entries do:
//!
//! * a [`CT_KIND_SERVICE`] entry keyed by the tuple the client sent
//!   (client → ClusterIP:port) that remembers the chosen backend, so later
//!   packets keep it even after the backend leaves the service;
//! * a [`CT_KIND_FLOW`] entry keyed by the translated tuple (client →
//!   backend) that holds the TCP state and tells the reply path which
//!   frontend address to restore as the source.

/// Entry keyed by the client's original tuple (destination = frontend).
pub const CT_KIND_SERVICE: u8 = 1;
/// Entry keyed by the translated tuple (destination = backend), or by the
/// tuple of a connection a local pod opened without a service.
pub const CT_KIND_FLOW: u8 = 2;
/// Entry keyed by the tuple of a connection arriving at a local pod, created
/// where its ingress policy is checked.
pub const CT_KIND_INGRESS: u8 = 3;
/// Entry keyed by the tuple a remote backend's reply carries back to this
/// node (backend → node address:allocated port) for a north-south connection
/// whose client was SNATed: it names the client and the frontend to restore.
pub const CT_KIND_NAT_REPLY: u8 = 4;

/// Conntrack key. Addresses and ports are those of the original direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_KIND_*`.
    pub kind: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// No reply seen yet (TCP: SYN sent).
pub const CT_STATE_NEW: u8 = 0;
/// A reply was seen.
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// Both sides sent FIN, or one sent RST: the short close lifetime applies.
pub const CT_STATE_CLOSING: u8 = 2;

/// The client was also the chosen backend: its source was rewritten to the
/// hairpin address and replies restore it.
pub const CT_F_HAIRPIN: u8 = 1 << 0;
/// The originating side sent FIN.
pub const CT_F_TX_CLOSING: u8 = 1 << 1;
/// The replying side sent FIN.
pub const CT_F_RX_CLOSING: u8 = 1 << 2;
/// SERVICE entry of a north-south connection to a remote backend: the client
/// is SNATed to `client_addr_be`:`aux_port_be` (a node address and port).
pub const CT_F_SNAT: u8 = 1 << 3;
/// FLOW entry of a north-south connection to a local backend: its replies
/// leave with a node address as source, so they are sent out directly.
pub const CT_F_NORTH_SOUTH: u8 = 1 << 4;

/// Conntrack value. Byte and packet counters are updated without atomics and
/// may undercount under contention; they are for inspection only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// CLOCK_MONOTONIC seconds (the clock of `bpf_ktime_get_ns`) after which
    /// the entry is dead; the agent's GC deletes it.
    pub expires: u32,
    /// SERVICE: the backend address packets are sent to.
    /// FLOW: the frontend address replies are rewritten from.
    pub nat_addr_be: u32,
    /// FLOW with `CT_F_HAIRPIN`: the client's real address, restored as the
    /// destination of replies. SERVICE with `CT_F_SNAT`: the node address
    /// the client is SNATed to. NAT_REPLY: the client's address.
    pub client_addr_be: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// SERVICE: the backend port. FLOW: the frontend port.
    pub nat_port_be: u16,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// TCP flags seen from the originating side.
    pub tx_flags_seen: u8,
    /// TCP flags seen from the replying side.
    pub rx_flags_seen: u8,
    /// SERVICE with `CT_F_SNAT`: the allocated source port. NAT_REPLY: the
    /// client's port.
    pub aux_port_be: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 64);

/// Default lifetimes in seconds, as Cilium's (`bpf/lib/conntrack.h`).
pub mod lifetime {
    pub const TCP_SYN: u32 = 60;
    pub const TCP_ESTABLISHED: u32 = 21_600;
    pub const TCP_CLOSE: u32 = 10;
    pub const NON_TCP: u32 = 60;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
}

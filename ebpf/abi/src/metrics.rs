//! Datapath counters: a per-CPU array indexed by reason. Indices below 130 are
//! forwarding events; 130 and above are drops, numbered as Cilium's
//! (`bpf/lib/common.h`, `pkg/monitor/api/drop.go`) so flows and metrics can
//! share one table of names.

/// A packet and byte count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// A new service connection was translated to a backend.
pub const SERVICE_NEW: u32 = 1;
/// A packet of an established service connection was translated.
pub const SERVICE_ESTABLISHED: u32 = 2;
/// A reply was reverse-translated.
pub const REVERSE_NAT: u32 = 3;
/// A new hairpin connection (client is its own backend) was translated.
pub const HAIRPIN_NEW: u32 = 4;
/// A new connection was allowed by policy (or by the absence of any).
pub const POLICY_ALLOWED: u32 = 5;
/// A flow event was lost: the ring buffer was full.
pub const EVENTS_LOST: u32 = 6;
/// A node process's socket was connected (or a datagram sent) to a backend
/// by the socket-LB hooks (counts sockets and sends, not packets).
pub const SOCK_LB_TRANSLATED: u32 = 7;
/// A node process's connect or send to a service without backends was
/// refused by the socket-LB hooks.
pub const SOCK_LB_REFUSED: u32 = 8;
/// XDP translated a north-south packet and sent it back out of the device
/// it came in on (XDP_TX: a remote backend, or the reply to a client).
pub const XDP_TX: u32 = 9;
/// XDP translated a north-south packet for a local backend and passed it
/// to the stack.
pub const XDP_TO_STACK: u32 = 10;
/// XDP left a north-south packet whose route leaves by another device to
/// the tc program (which can redirect there).
pub const XDP_TO_TC: u32 = 11;

/// Cilium's DROP_POLICY: no policy entry allows the connection.
pub const DROP_POLICY_DENIED: u32 = 133;
/// Cilium's DROP_INVALID: the packet is truncated or malformed.
pub const DROP_INVALID: u32 = 134;
/// Cilium's DROP_WRITE_ERROR: rewriting the packet failed.
pub const DROP_WRITE_ERROR: u32 = 141;
/// Cilium's DROP_CT_CREATE_FAILED: the conntrack map refused an insert.
pub const DROP_CT_CREATE_FAILED: u32 = 155;
/// Cilium's DROP_NO_SERVICE: the frontend exists but has no backend.
pub const DROP_NO_SERVICE: u32 = 158;
/// Cilium's DROP_NAT_NO_MAPPING: no SNAT port was free for a north-south
/// connection to a remote backend.
pub const DROP_NAT_NO_MAPPING: u32 = 167;
/// Cilium's DROP_NOT_IN_SRC_RANGE: the client is outside the
/// LoadBalancer's `loadBalancerSourceRanges`.
pub const DROP_NOT_IN_SOURCE_RANGE: u32 = 177;
/// Cilium's DROP_IS_CLUSTER_IP: the address is in the service CIDR but no
/// frontend matches (a deleted service, or an undefined port).
pub const DROP_IS_CLUSTER_IP: u32 = 174;

/// Human-readable name of a reason, as Cilium prints it.
pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        SERVICE_NEW => "Service new connection",
        SERVICE_ESTABLISHED => "Service established",
        REVERSE_NAT => "Reverse NAT",
        HAIRPIN_NEW => "Service hairpin new connection",
        POLICY_ALLOWED => "Policy allowed new connection",
        EVENTS_LOST => "Flow events lost (ring buffer full)",
        SOCK_LB_TRANSLATED => "Socket LB translated to a backend",
        SOCK_LB_REFUSED => "Socket LB refused: service without backends",
        XDP_TX => "XDP translated, sent back out (XDP_TX)",
        XDP_TO_STACK => "XDP translated, passed to a local backend",
        XDP_TO_TC => "XDP deferred to tc (route via another device)",
        DROP_POLICY_DENIED => "Policy denied",
        DROP_INVALID => "Invalid packet",
        DROP_WRITE_ERROR => "Error writing to packet",
        DROP_CT_CREATE_FAILED => "CT: Map insertion failed",
        DROP_NO_SERVICE => "Service backend not found",
        DROP_NOT_IN_SOURCE_RANGE => "Not in source range",
        DROP_NAT_NO_MAPPING => "No mapping for NAT masquerade",
        DROP_IS_CLUSTER_IP => "Is a ClusterIP",
        _ => "Unknown",
    }
}

/// Whether a reason counts dropped packets.
pub const fn is_drop(reason: u32) -> bool {
    reason >= 130
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` integers, valid for any bit pattern.
unsafe impl aya::Pod for Counter {}

//! Flow events: what the datapath tells the agent's flow monitor, through a
//! ring buffer. Emitted at the points that matter — a new connection (with
//! its translation) and a drop (with its reason) — never per packet.

/// A new connection left a pod (after service translation, if any).
pub const EVENT_NEW_CONNECTION: u8 = 1;
/// A packet was dropped; `reason` says why.
pub const EVENT_DROP: u8 = 2;

/// Where the event was observed.
pub const OBSERVED_FROM_POD: u8 = 1;
pub const OBSERVED_TO_POD: u8 = 2;

/// Traffic direction relative to the local endpoint (Hubble's values).
pub const DIRECTION_UNKNOWN: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;
pub const DIRECTION_EGRESS: u8 = 2;

/// Event flags.
pub const EVENT_F_REPLY: u8 = 1 << 0;
pub const EVENT_F_TRANSLATED: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub timestamp_ns: u64,
    /// `EVENT_*`.
    pub kind: u8,
    /// Drop reason code (as [`crate::metrics`]), 0 when not a drop.
    pub reason: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    /// `OBSERVED_*`.
    pub observed: u8,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// `EVENT_F_*`.
    pub flags: u8,
    pub _pad: u8,
    pub ifindex: u32,
    /// The packet's addresses after translation (what the network carried
    /// on from here); for drops, as the packet arrived.
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// Before translation: the frontend the client addressed (with
    /// `EVENT_F_TRANSLATED`), else equal to daddr/dport.
    pub orig_daddr_be: u32,
    pub orig_dport_be: u16,
    pub _pad2: u16,
    /// Security identities when known (0 = unknown).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The service (frontend) id for translated connections.
    pub service_id: u32,
    pub packet_len: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` integers with explicit padding, valid for any bit pattern.
unsafe impl aya::Pod for FlowEvent {}

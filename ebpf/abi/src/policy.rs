//! NetworkPolicy: security identities, the ipcache, local endpoints and the
//! policy map, in the spirit of Cilium's (`bpf/lib/policy.h`, `maps.h`).
//!
//! A new connection costs one endpoint lookup, one ipcache (LPM) lookup and
//! at most four policy (LPM) lookups, whatever the number of policies, rules
//! or pods: (identity, proto), (any identity, proto), (identity, any proto),
//! (any, any); the destination port is matched by prefix inside each lookup,
//! which is how `endPort` ranges cost no more than single ports.

/// Reserved identities, numbered as Cilium's.
pub const IDENTITY_UNKNOWN: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
/// First identity of pods (Cilium's cluster-scoped range starts at 256).
pub const IDENTITY_MIN_POD: u32 = 256;
/// CIDR identities carry this bit (Cilium's local-scope identities).
pub const IDENTITY_CIDR_FLAG: u32 = 1 << 24;

/// In a policy key, matches any remote identity.
pub const POLICY_ANY_IDENTITY: u32 = 0;
/// In a policy key, matches any protocol (and then any port).
pub const POLICY_ANY_PROTO: u8 = 0;

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// ipcache key data (the LPM prefix length is aya's `Key::prefix_len`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub address_be: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheEntry {
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 8);

/// The endpoint enforces ingress policy (some policy selects it for ingress).
pub const ENDPOINT_F_INGRESS_ISOLATED: u32 = 1 << 0;
/// The endpoint enforces egress policy.
pub const ENDPOINT_F_EGRESS_ISOLATED: u32 = 1 << 1;

/// Value of the local-endpoints map, keyed by the pod's IPv4 address
/// (network order, as [`IpcacheKey::address_be`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// The endpoint's policy-map key prefix; per-node, chosen by the agent.
    pub endpoint_id: u32,
    /// The pod's security identity.
    pub identity: u32,
    /// `ENDPOINT_F_*`.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// Policy key data. The LPM prefix covers the fields in order; a rule's port
/// range becomes one or more prefixes over `dport_be` (96 + 0..=16 bits), a
/// rule without ports stops at 96 bits. `_pad2` is never part of a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// IP protocol, or `POLICY_ANY_PROTO`.
    pub proto: u8,
    pub _pad: [u8; 2],
    /// Remote identity, or `POLICY_ANY_IDENTITY`.
    pub identity: u32,
    pub dport_be: u16,
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);

/// Prefix length that covers everything but the port.
pub const POLICY_PREFIX_NO_PORT: u32 = 96;
/// Prefix length of an exact port.
pub const POLICY_PREFIX_FULL: u32 = 112;

/// The entry allows traffic (the only verdict NetworkPolicy has).
pub const POLICY_F_ALLOW: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// `POLICY_F_*`.
    pub flags: u32,
    /// Which policy rule produced the entry (an index the agent publishes),
    /// so `weir policy get` can say why a flow was allowed.
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 8);

/// Key of the per-endpoint drop counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointMetricKey {
    pub endpoint_id: u32,
    /// Reason code, as [`crate::metrics`].
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointMetricKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::IpcacheKey {}
    unsafe impl aya::Pod for super::IpcacheEntry {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyEntry {}
    unsafe impl aya::Pod for super::EndpointMetricKey {}
}

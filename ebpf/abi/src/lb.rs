//! Load-balancer maps, in the shape of Cilium's lb4 maps (`bpf/lib/lb.h`):
//! a frontend map, a slot map that lists each frontend's backends, and a
//! backend map shared by all frontends. The datapath does one lookup in each,
//! whatever the number of services or backends.

/// Key of the services map: one frontend (address, port, protocol) in one
/// lookup scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub address_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `SCOPE_*` (Cilium's `lb4_key.scope`).
    pub scope: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    pub const fn new(address_be: u32, port_be: u16, proto: u8) -> Self {
        Self { address_be, port_be, proto, scope: SCOPE_EXTERNAL }
    }

    pub const fn with_scope(address_be: u32, port_be: u16, proto: u8, scope: u8) -> Self {
        Self { address_be, port_be, proto, scope }
    }
}

/// The entry every lookup starts with; the only one for most frontends.
pub const SCOPE_EXTERNAL: u8 = 0;
/// The entry for in-cluster clients (pods, node processes) of an address
/// whose external entry keeps to this node's backends
/// (`externalTrafficPolicy: Local`): kube-proxy sends in-cluster traffic to
/// such an address to every endpoint. Present when the external entry has
/// [`SVC_FLAG_TWO_SCOPES`].
pub const SCOPE_INTERNAL: u8 = 1;

/// The frontend is a ClusterIP.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// `sessionAffinity: ClientIP`: a client keeps its backend for
/// `affinity_timeout` seconds after its last new connection.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 1;
/// The frontend is a NodePort on one of this node's addresses.
pub const SVC_FLAG_NODEPORT: u16 = 1 << 2;
/// The frontend is an external IP or a LoadBalancer ingress IP.
pub const SVC_FLAG_EXTERNAL: u16 = 1 << 3;
/// A LoadBalancer IP with `loadBalancerSourceRanges`: only clients in the
/// ranges (the source-ranges map) may connect.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 4;
/// Backends are chosen by Maglev consistent hashing of the flow instead of
/// at random: every node picks the same backend for the same flow, and
/// removing one of N backends moves about 1/N of the flows.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 5;
/// The external IP is a LoadBalancer's `status.loadBalancer.ingress` IP.
pub const SVC_FLAG_LOADBALANCER: u16 = 1 << 6;
/// A `Local` traffic policy applies (internal for a ClusterIP, external for
/// the rest): only this node's endpoints are backends, and with none the
/// traffic is dropped, not rejected (kube-proxy's "has no local endpoints").
pub const SVC_FLAG_LOCAL: u16 = 1 << 7;
/// In-cluster clients use this frontend's [`SCOPE_INTERNAL`] entry.
pub const SVC_FLAG_TWO_SCOPES: u16 = 1 << 8;

/// Key of the Maglev map: entry `index` of a service's lookup table; the
/// value is a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub service_id: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);

/// The flow hash Maglev indexes its table with: the same on every node, so
/// that two nodes send a flow to the same backend. A multiply-xorshift mix
/// of the 5-tuple (network-order fields as the packet carries them).
#[inline(always)]
pub const fn flow_hash(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    h = (h ^ saddr_be as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ daddr_be as u64).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h = (h ^ ((sport_be as u64) << 16 | dport_be as u64)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ proto as u64).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    (h ^ (h >> 33)) as u32
}

/// Frontends served to traffic from outside the node (north-south).
pub const SVC_FLAGS_NORTH_SOUTH: u16 = SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL;

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// Identifies the frontend: the slot map is keyed by it and conntrack
    /// records it (Cilium's `rev_nat_index`).
    pub service_id: u32,
    /// Number of backend slots, numbered 1..=count. Zero: no ready backend.
    pub count: u16,
    /// `SVC_FLAG_*`.
    pub flags: u16,
    /// Seconds, with `SVC_FLAG_AFFINITY`.
    pub affinity_timeout: u32,
    /// Entries of the service's Maglev table (a prime), with `SVC_FLAG_MAGLEV`.
    pub maglev_table_size: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 16);

/// Key of the session-affinity map: which backend a client has for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub client_be: u32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityEntry {
    pub backend_id: u32,
    /// The slot the backend had; the datapath checks the slot still holds
    /// it, which proves in one lookup that it is still in the service.
    pub slot: u32,
    /// CLOCK_MONOTONIC seconds of the last new connection.
    pub last_used: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);

/// Key of the slot map: the `slot`-th backend of a service (1-based).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// Backend states (Cilium's `BE_STATE_*`).
pub const BACKEND_STATE_ACTIVE: u8 = 0;
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// Value of the backends map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub address_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// Key data of the source-ranges LPM map: the service, then the client
/// address; the prefix covers the 32 bits of `service_id` plus the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id_be: u32,
    pub address_be: u32,
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::MaglevKey {}
}

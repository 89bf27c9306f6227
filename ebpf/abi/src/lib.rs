//! The contract between Weir's kernel programs and user space.
//!
//! Every type that crosses the kernel/user boundary lives here, once:
//! `#[repr(C)]`, fixed-width integers only, explicit padding, and the byte
//! order in the field name (`_be` = network order, as Cilium's `__be32`). A
//! compile-time size assertion sits next to each type (Cilium's alignchecker
//! idea) so that a layout change cannot slip through unnoticed. A layout change
//! must also bump the version in the map's name: aya reuses an existing pin
//! without checking its key or value size.
//!
//! Byte order: a `_be` field holds the bytes exactly as they travel on the
//! wire, read as a native integer. From user space that is
//! `u32::from_ne_bytes(ip.octets())` for an address and `port.to_be()` for a
//! port; the datapath compares and copies them without conversion.
#![no_std]

pub mod config;
pub mod ct;
pub mod events;
pub mod lb;
pub mod metrics;
pub mod policy;
pub mod sock;

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;

    /// The Kubernetes name of an IP protocol (`TCP`, `UDP`, `SCTP`).
    pub fn name(proto: u8) -> &'static str {
        match proto {
            TCP => "TCP",
            UDP => "UDP",
            SCTP => "SCTP",
            _ => "ANY",
        }
    }
}

/// Names of the pinned maps. They are also the file names under the agent's
/// bpffs root, so the CLI finds them there with the agent down.
pub mod map_name {
    /// [`crate::lb::ServiceKey`] → [`crate::lb::Service`].
    pub const SERVICES: &str = "LB4_SERVICES_V2";
    /// [`crate::lb::SlotKey`] → backend id (`u32`).
    pub const SLOTS: &str = "LB4_SLOTS_V1";
    /// backend id (`u32`) → [`crate::lb::Backend`].
    pub const BACKENDS: &str = "LB4_BACKENDS_V1";
    /// [`crate::ct::CtKey`] → [`crate::ct::CtEntry`] (LRU).
    pub const CONNTRACK: &str = "CT4_V1";
    /// Per-CPU array of [`crate::metrics::Counter`] indexed by reason.
    pub const METRICS: &str = "METRICS_V1";
    /// One-element array holding [`crate::config::Config`].
    pub const CONFIG: &str = "CONFIG_V2";
    /// LPM trie: CIDR ([`crate::policy::IpcacheKey`]) → [`crate::policy::IpcacheEntry`].
    pub const IPCACHE: &str = "IPCACHE_V1";
    /// Local pod IPv4 (network order `u32`) → [`crate::policy::EndpointInfo`].
    pub const ENDPOINTS: &str = "ENDPOINTS_V1";
    /// LPM trie: [`crate::policy::PolicyKey`] → [`crate::policy::PolicyEntry`].
    pub const POLICY: &str = "POLICY_V1";
    /// Per-CPU hash: [`crate::policy::EndpointMetricKey`] → [`crate::metrics::Counter`].
    pub const ENDPOINT_METRICS: &str = "EP_METRICS_V1";
    /// LRU: [`crate::lb::AffinityKey`] → [`crate::lb::AffinityEntry`].
    pub const AFFINITY: &str = "LB4_AFFINITY_V1";
    /// Node device ifindex (`u32`) → its IPv4 address (network order `u32`):
    /// where north-south traffic enters, and the SNAT address for it.
    pub const DEVICES: &str = "DEVICES_V1";
    /// LPM trie: [`crate::lb::SourceRangeKey`] → `u8` (present = allowed).
    pub const SOURCE_RANGES: &str = "LB4_SRC_RANGE_V1";
    /// [`crate::lb::MaglevKey`] → backend id (`u32`).
    pub const MAGLEV: &str = "LB4_MAGLEV_V1";
    /// Ring buffer of [`crate::events::FlowEvent`].
    pub const EVENTS: &str = "EVENTS_V1";
    /// LRU: [`crate::sock::SockRevNatKey`] → [`crate::sock::SockRevNatEntry`].
    pub const SOCK_REVNAT: &str = "LB4_SOCK_REVNAT_V1";

    pub const ALL: [&str; 16] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        CONNTRACK,
        METRICS,
        CONFIG,
        IPCACHE,
        ENDPOINTS,
        POLICY,
        ENDPOINT_METRICS,
        EVENTS,
        AFFINITY,
        DEVICES,
        SOURCE_RANGES,
        MAGLEV,
        SOCK_REVNAT,
    ];
}

/// Default map capacities; the agent overrides them from its flags.
pub mod capacity {
    /// Frontends (ClusterIP:port/proto). Cilium's default LB map size is 64k.
    pub const SERVICES: u32 = 65_536;
    /// Backend slots over all services (services × backends each).
    pub const SLOTS: u32 = 262_144;
    /// Distinct backends (ip:port/proto).
    pub const BACKENDS: u32 = 65_536;
    /// Session-affinity entries (client, service); Cilium's default is 64k.
    pub const AFFINITY: u32 = 65_536;
    /// Maglev table entries over all Maglev services (a 1021-entry table
    /// each by default: 256 services).
    pub const MAGLEV: u32 = 262_144;
    /// Conntrack entries; each service connection takes two.
    pub const CONNTRACK: u32 = 262_144;
    /// One counter per reason code.
    pub const METRICS: u32 = 256;
    /// Pod IPs cluster-wide plus policy CIDRs (Cilium's default is 512k).
    pub const IPCACHE: u32 = 131_072;
    /// Pods on this node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Policy entries over all local endpoints.
    pub const POLICY: u32 = 262_144;
    /// (endpoint, reason) drop counters.
    pub const ENDPOINT_METRICS: u32 = 16_384;
    /// Socket-LB reverse translations (sockets of node processes connected
    /// to services); Cilium's default is 256k.
    pub const SOCK_REVNAT: u32 = 65_536;
    /// Flow-event ring buffer bytes (a power of two pages): ~18k events.
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

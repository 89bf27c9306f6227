//! NetworkPolicy: security identities, the ipcache, and per-endpoint policy
//! entries computed from Pods, Namespaces and NetworkPolicies (`compute`),
//! written to the maps with the fewest writes (`sync`).
//!
//! Semantics follow the networking.k8s.io/v1 API documentation. Two choices
//! the API leaves to implementations:
//! * Established connections stay up when a policy stops allowing them (as
//!   with Cilium and iptables-based CNIs): the verdict is taken on a
//!   connection's first packet and kept in conntrack; new connections get
//!   the new verdict.
//! * `ipBlock` selects addresses that are not pods' (as Cilium does, and as
//!   the API documentation advises, since pod IPs are ephemeral): a pod's IP
//!   resolves to the pod's identity, not to the CIDR's.

pub mod compute;
pub mod identity;
pub mod ports;
pub mod selector;
pub mod sync;

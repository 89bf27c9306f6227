//! NetworkPolicy verdicts for the first packet of a connection: who the peer
//! is (ipcache), whether the local endpoint is isolated, and whether an entry
//! allows the (identity, protocol, port) — a fixed number of lookups.

use aya_ebpf::maps::lpm_trie::Key;
use weir_abi::{
    metrics::Counter,
    policy::{
        EndpointInfo, EndpointMetricKey, IDENTITY_WORLD, IpcacheKey, POLICY_ANY_IDENTITY, POLICY_ANY_PROTO,
        POLICY_F_ALLOW, POLICY_PREFIX_FULL, PolicyKey,
    },
};

use crate::maps::{ENDPOINT_METRICS, ENDPOINTS, IPCACHE, POLICY};

/// The security identity of an address: the longest ipcache prefix holding
/// it, or `world` for addresses the cluster does not know.
#[inline(always)]
pub fn identity_of(address_be: u32) -> u32 {
    let key = Key::new(32, IpcacheKey { address_be });
    match IPCACHE.get(&key) {
        Some(entry) => entry.identity,
        None => IDENTITY_WORLD,
    }
}

/// The local endpoint (pod on this node) with this address.
#[inline(always)]
pub fn endpoint(address_be: u32) -> Option<EndpointInfo> {
    // SAFETY: copied out at once.
    ENDPOINTS.get_ptr(&address_be).map(|ep| unsafe { *ep })
}

#[inline(always)]
fn lookup(endpoint_id: u32, direction: u8, identity: u32, proto: u8, dport_be: u16) -> bool {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey { endpoint_id, direction, proto, _pad: [0; 2], identity, dport_be, _pad2: [0; 2] },
    );
    POLICY.get(&key).is_some_and(|entry| entry.flags & POLICY_F_ALLOW != 0)
}

/// Whether the endpoint's policy allows a connection with a peer of
/// `identity` to `dport_be`/`proto`. Exact identity first, then any
/// identity; each with the protocol, then with any protocol (Cilium's order
/// in `bpf/lib/policy.h`). Ports match by prefix inside each lookup.
#[inline(always)]
pub fn allows(endpoint_id: u32, direction: u8, identity: u32, proto: u8, dport_be: u16) -> bool {
    lookup(endpoint_id, direction, identity, proto, dport_be)
        || lookup(endpoint_id, direction, POLICY_ANY_IDENTITY, proto, dport_be)
        || lookup(endpoint_id, direction, identity, POLICY_ANY_PROTO, 0)
        || lookup(endpoint_id, direction, POLICY_ANY_IDENTITY, POLICY_ANY_PROTO, 0)
}

/// Counts a drop against the endpoint, for per-pod drop statistics.
#[inline(always)]
pub fn count_drop(endpoint_id: u32, reason: u32, bytes: u32) {
    let key = EndpointMetricKey { endpoint_id, reason };
    match ENDPOINT_METRICS.get_ptr_mut(&key) {
        // SAFETY: a per-CPU value, written only by this CPU.
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        },
        None => {
            let counter = Counter { packets: 1, bytes: u64::from(bytes) };
            // A full counter map loses this count; the global counter still has it.
            let _ = ENDPOINT_METRICS.insert(&key, &counter, 0);
        }
    }
}

//! Security identities. A pod's identity is a function of its namespace and
//! labels alone, computed the same way on every node: a hash of the
//! canonical label string, with collisions resolved by probing in a fixed
//! order. Two agents that see the same pods therefore agree without talking
//! to each other or to the API server (Cilium allocates through the API or a
//! kvstore instead; we trade that for zero coordination). Two agents can
//! only disagree while their views of the cluster differ and a hash collision
//! involves the difference; in a 2^24 space that is rare and short-lived.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnetwork::Ipv4Network;
use weir_abi::policy::{IDENTITY_CIDR_FLAG, IDENTITY_MIN_POD};

use super::selector::Labels;

/// The automatic namespace label (Kubernetes ≥1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What a pod identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    /// `name/PROTO=number` of each named container port (see compute.rs).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub named_ports: BTreeSet<String>,
}

impl IdentityKey {
    /// `k8s:io.kubernetes.pod.namespace=NS,k=v,…` (Cilium's spelling).
    pub fn canonical(&self) -> String {
        let mut s = format!("k8s:io.kubernetes.pod.namespace={}", self.namespace);
        for (k, v) in &self.labels {
            s.push_str(&format!(",k8s:{k}={v}"));
        }
        for port in &self.named_ports {
            s.push_str(&format!(",named-port:{port}"));
        }
        s
    }
}

/// FNV-1a: small, stable across versions and platforms (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Gives each name a number in `[base, base + span)` by hash, probing
/// upward on collision. Names are placed in (hash, name) order, so the
/// result depends only on the set of names.
fn allocate<'a>(names: impl IntoIterator<Item = &'a str>, base: u32, span: u32) -> BTreeMap<&'a str, u32> {
    let mut ordered: Vec<(u64, &str)> = names.into_iter().map(|n| (fnv1a(n.as_bytes()), n)).collect();
    ordered.sort();
    ordered.dedup();
    let mut taken = HashSet::new();
    let mut out = BTreeMap::new();
    for (hash, name) in ordered {
        let mut slot = (hash % u64::from(span)) as u32;
        while !taken.insert(slot) {
            slot = (slot + 1) % span;
        }
        out.insert(name, base + slot);
    }
    out
}

/// Pod identities for every distinct (namespace, labels).
pub fn pod_identities(keys: &BTreeSet<IdentityKey>) -> BTreeMap<IdentityKey, u32> {
    let canon: Vec<(String, &IdentityKey)> = keys.iter().map(|k| (k.canonical(), k)).collect();
    let ids = allocate(canon.iter().map(|(c, _)| c.as_str()), IDENTITY_MIN_POD, (1 << 24) - IDENTITY_MIN_POD);
    canon.iter().map(|(c, k)| ((*k).clone(), ids[c.as_str()])).collect()
}

/// CIDR identities (node-local in Cilium; deterministic here as well).
pub fn cidr_identities(cidrs: &BTreeSet<Ipv4Network>) -> BTreeMap<Ipv4Network, u32> {
    let names: Vec<(String, Ipv4Network)> = cidrs.iter().map(|c| (format!("cidr:{c}"), *c)).collect();
    let ids = allocate(names.iter().map(|(n, _)| n.as_str()), IDENTITY_CIDR_FLAG, 1 << 24);
    names.iter().map(|(n, c)| (*c, ids[n.as_str()])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, labels: &[(&str, &str)]) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            named_ports: BTreeSet::new(),
        }
    }

    #[test]
    fn identities_depend_only_on_the_set() {
        let a: BTreeSet<_> =
            [key("x", &[("pod", "a")]), key("y", &[("pod", "a")]), key("x", &[("pod", "b")])].into();
        let first = pod_identities(&a);
        let second = pod_identities(&a.iter().rev().cloned().collect());
        assert_eq!(first, second);
        let distinct: HashSet<u32> = first.values().copied().collect();
        assert_eq!(distinct.len(), 3);
        assert!(first.values().all(|id| (IDENTITY_MIN_POD..1 << 24).contains(id)));
    }

    #[test]
    fn collisions_are_probed() {
        let ids = allocate(["a", "b", "c", "d"], 10, 2 + 2);
        let distinct: HashSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), 4);
        assert!(ids.values().all(|id| (10..14).contains(id)));
    }
}

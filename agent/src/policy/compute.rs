//! From Pods, Namespaces and NetworkPolicies to what the policy maps should
//! hold: identities, ipcache prefixes, and for every local endpoint its
//! isolation and allow entries. Pure; no maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use k8s_openapi::{
    api::{
        core::v1::Pod,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use weir_abi::policy::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_HOST, POLICY_ANY_IDENTITY, POLICY_ANY_PROTO,
};

use super::{
    identity::{IdentityKey, NAMESPACE_NAME_LABEL, cidr_identities, pod_identities},
    ports::{PortPrefix, range_prefixes},
    selector::{Labels, matches},
};
use crate::{cluster::Cluster, lb::translate::parse_protocol};

/// One allow entry of an endpoint (the map key without the endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    pub direction: u8,
    pub proto: u8,
    pub identity: u32,
    pub port: PortPrefix,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// `namespace/name`.
    pub pod: String,
    pub identity: u32,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Allow entries → the rule (1-based index into [`DesiredPolicy::rules`]).
    pub entries: BTreeMap<EntryKey, u32>,
}

#[derive(Clone, Debug, Default)]
pub struct DesiredPolicy {
    /// Pod identities in use.
    pub identities: BTreeMap<u32, IdentityKey>,
    /// CIDR identities in use.
    pub cidr_identities: BTreeMap<u32, Ipv4Network>,
    /// Every prefix the ipcache should hold.
    pub ipcache: BTreeMap<Ipv4Network, u32>,
    /// Local endpoints by pod IP.
    pub endpoints: BTreeMap<Ipv4Addr, LocalEndpoint>,
    /// Rule descriptions (`ns/policy ingress[0]`); rule id n is `rules[n-1]`.
    pub rules: Vec<String>,
}

struct PodInfo<'a> {
    name: String,
    namespace: String,
    ip: Option<Ipv4Addr>,
    local: bool,
    key: IdentityKey,
    pod: &'a Pod,
}

/// The ports a pod declares under `name` for `proto`.
fn named_port(pod: &Pod, name: &str, proto: u8) -> Vec<u16> {
    let containers =
        pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.name.as_deref() == Some(name) && parse_protocol(p.protocol.as_deref()) == Some(proto))
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect()
}

/// Every named port a pod declares, as `name/PROTO=number`. Part of the
/// identity so that pods with the same labels but different named ports
/// get different identities: egress rules with named ports resolve per
/// destination pod, and entries are keyed by identity (Cilium learned this
/// the hard way, cilium#45760).
fn named_ports(pod: &Pod) -> BTreeSet<String> {
    let containers =
        pod.spec.iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.as_deref()?;
            Some(format!("{name}/{}={}", p.protocol.as_deref().unwrap_or("TCP"), p.container_port))
        })
        .collect()
}

/// A rule's port, resolved: protocol and port prefixes, or a named port.
enum PortSpec {
    Numbered(u8, Vec<PortPrefix>),
    Named(u8, String),
}

fn port_specs(ports: Option<&Vec<NetworkPolicyPort>>) -> Vec<PortSpec> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        // No ports: every protocol, every port.
        return vec![PortSpec::Numbered(POLICY_ANY_PROTO, vec![PortPrefix::ANY])];
    };
    ports
        .iter()
        .filter_map(|p| {
            let proto = parse_protocol(p.protocol.as_deref())?;
            Some(match &p.port {
                None => PortSpec::Numbered(proto, vec![PortPrefix::ANY]),
                Some(IntOrString::Int(port)) => {
                    let lo = u16::try_from(*port).ok()?;
                    let hi = p.end_port.and_then(|e| u16::try_from(e).ok()).unwrap_or(lo).max(lo);
                    PortSpec::Numbered(proto, range_prefixes(lo, hi))
                }
                Some(IntOrString::String(name)) => PortSpec::Named(proto, name.clone()),
            })
        })
        .collect()
}

/// The remote side of a rule.
enum Peers {
    Any,
    Identities(BTreeSet<u32>),
}

struct Model<'a> {
    pods: Vec<PodInfo<'a>>,
    namespace_labels: BTreeMap<String, Labels>,
    ids: BTreeMap<IdentityKey, u32>,
    cidr_ids: BTreeMap<Ipv4Network, u32>,
}

impl Model<'_> {
    fn ns_labels(&self, namespace: &str) -> Labels {
        self.namespace_labels
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| [(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())].into())
    }

    fn peers(&self, peers: Option<&Vec<NetworkPolicyPeer>>, policy_ns: &str) -> Peers {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else { return Peers::Any };
        let mut out = BTreeSet::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                let Ok(cidr) = block.cidr.parse::<Ipv4Network>() else { continue };
                let except: Vec<Ipv4Network> =
                    block.except.iter().flatten().filter_map(|e| e.parse().ok()).collect();
                let inside = |p: &Ipv4Network, outer: &Ipv4Network| {
                    p.prefix() >= outer.prefix() && outer.contains(p.network())
                };
                for (prefix, id) in &self.cidr_ids {
                    if inside(prefix, &cidr) && !except.iter().any(|e| inside(prefix, e)) {
                        out.insert(*id);
                    }
                }
                continue;
            }
            for (key, id) in &self.ids {
                let ns_ok = match &peer.namespace_selector {
                    Some(sel) => matches(sel, &self.ns_labels(&key.namespace)),
                    // A podSelector alone selects in the policy's namespace.
                    None => key.namespace == policy_ns,
                };
                let pod_ok = peer.pod_selector.as_ref().is_none_or(|sel| matches(sel, &key.labels));
                if ns_ok && pod_ok {
                    out.insert(*id);
                }
            }
        }
        Peers::Identities(out)
    }
}

/// Whether the policy applies to ingress and/or egress, with the API's
/// defaulting when `policyTypes` is absent: always Ingress, Egress when the
/// policy has egress rules.
fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        // The API server defaults an empty list as it does an absent one.
        Some(types) if !types.is_empty() => {
            (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
        }
        _ => (true, spec.and_then(|s| s.egress.as_ref()).is_some_and(|e| !e.is_empty())),
    }
}

fn insert(entries: &mut BTreeMap<EntryKey, u32>, key: EntryKey, rule: u32) {
    entries.entry(key).or_insert(rule);
}

/// `host_addresses`: this node's own addresses. They get the reserved host
/// identity, and traffic from them to a local pod is always allowed (the
/// API: "traffic from the pod's local node" — kubelet's probes).
pub fn compute(cluster: &Cluster, node_name: &str, host_addresses: &[Ipv4Addr]) -> DesiredPolicy {
    let mut namespace_labels = BTreeMap::new();
    for ns in &cluster.namespaces {
        let Some(name) = ns.metadata.name.clone() else { continue };
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
        namespace_labels.insert(name, labels);
    }
    let pods: Vec<PodInfo> = cluster
        .pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true))
        .map(|pod| {
            let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let name = format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or(""));
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse().ok());
            let local = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name);
            let key = IdentityKey {
                namespace: namespace.clone(),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                named_ports: named_ports(pod),
            };
            PodInfo { name, namespace, ip, local, key, pod }
        })
        .collect();
    let ids = pod_identities(&pods.iter().map(|p| p.key.clone()).collect());

    let mut cidrs = BTreeSet::new();
    for policy in &cluster.network_policies {
        let spec = policy.spec.as_ref();
        let peers = spec
            .into_iter()
            .flat_map(|s| s.ingress.iter().flatten().flat_map(|r| r.from.iter().flatten()))
            .chain(
                spec.into_iter().flat_map(|s| s.egress.iter().flatten().flat_map(|r| r.to.iter().flatten())),
            );
        for block in peers.filter_map(|p| p.ip_block.as_ref()) {
            cidrs.extend(block.cidr.parse::<Ipv4Network>().ok());
            cidrs.extend(block.except.iter().flatten().filter_map(|e| e.parse::<Ipv4Network>().ok()));
        }
    }
    let cidr_ids = cidr_identities(&cidrs);

    let mut desired = DesiredPolicy::default();
    for (cidr, id) in &cidr_ids {
        desired.ipcache.insert(*cidr, *id);
        desired.cidr_identities.insert(*id, *cidr);
    }
    for address in host_addresses {
        desired.ipcache.insert(Ipv4Network::from(*address), IDENTITY_HOST);
    }
    for pod in &pods {
        let id = ids[&pod.key];
        desired.identities.insert(id, pod.key.clone());
        if let Some(ip) = pod.ip {
            // A pod's own /32 wins over any CIDR containing it.
            desired.ipcache.insert(Ipv4Network::from(ip), id);
        }
    }

    let model = Model { pods, namespace_labels, ids, cidr_ids };
    let mut policies: Vec<&NetworkPolicy> = cluster.network_policies.iter().map(|p| &**p).collect();
    policies.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));

    for pod in model.pods.iter().filter(|p| p.local) {
        let Some(ip) = pod.ip else { continue };
        let mut ep =
            LocalEndpoint { pod: pod.name.clone(), identity: model.ids[&pod.key], ..Default::default() };
        for policy in &policies {
            let policy_ns = policy.metadata.namespace.as_deref().unwrap_or("default");
            let Some(spec) = &policy.spec else { continue };
            let selects = spec.pod_selector.as_ref().is_none_or(|sel| matches(sel, &pod.key.labels));
            if policy_ns != pod.namespace || !selects {
                continue;
            }
            let (ingress, egress) = policy_types(policy);
            let policy_name = format!("{policy_ns}/{}", policy.metadata.name.as_deref().unwrap_or(""));
            if ingress {
                ep.ingress_isolated = true;
                for (i, rule) in spec.ingress.iter().flatten().enumerate() {
                    desired.rules.push(format!("{policy_name} ingress[{i}]"));
                    let rule_id = desired.rules.len() as u32;
                    let peers = model.peers(rule.from.as_ref(), policy_ns);
                    for port in port_specs(rule.ports.as_ref()) {
                        // Named ports resolve on the destination: this pod.
                        let (proto, prefixes) = match port {
                            PortSpec::Numbered(proto, prefixes) => (proto, prefixes),
                            PortSpec::Named(proto, name) => (
                                proto,
                                named_port(pod.pod, &name, proto)
                                    .iter()
                                    .flat_map(|p| range_prefixes(*p, *p))
                                    .collect(),
                            ),
                        };
                        for prefix in prefixes {
                            let identities: Vec<u32> = match &peers {
                                Peers::Any => vec![POLICY_ANY_IDENTITY],
                                Peers::Identities(ids) => ids.iter().copied().collect(),
                            };
                            for identity in identities {
                                let key =
                                    EntryKey { direction: DIRECTION_INGRESS, proto, identity, port: prefix };
                                insert(&mut ep.entries, key, rule_id);
                            }
                        }
                    }
                }
            }
            if egress {
                ep.egress_isolated = true;
                for (i, rule) in spec.egress.iter().flatten().enumerate() {
                    desired.rules.push(format!("{policy_name} egress[{i}]"));
                    let rule_id = desired.rules.len() as u32;
                    let peers = model.peers(rule.to.as_ref(), policy_ns);
                    for port in port_specs(rule.ports.as_ref()) {
                        match port {
                            PortSpec::Numbered(proto, prefixes) => {
                                let identities: Vec<u32> = match &peers {
                                    Peers::Any => vec![POLICY_ANY_IDENTITY],
                                    Peers::Identities(ids) => ids.iter().copied().collect(),
                                };
                                for identity in identities {
                                    for prefix in &prefixes {
                                        let key = EntryKey {
                                            direction: DIRECTION_EGRESS,
                                            proto,
                                            identity,
                                            port: *prefix,
                                        };
                                        insert(&mut ep.entries, key, rule_id);
                                    }
                                }
                            }
                            // Named ports resolve on each destination pod.
                            PortSpec::Named(proto, name) => {
                                for dest in &model.pods {
                                    let identity = model.ids[&dest.key];
                                    if let Peers::Identities(ids) = &peers
                                        && !ids.contains(&identity)
                                    {
                                        continue;
                                    }
                                    for port in named_port(dest.pod, &name, proto) {
                                        let key = EntryKey {
                                            direction: DIRECTION_EGRESS,
                                            proto,
                                            identity,
                                            port: PortPrefix { port, bits: 16 },
                                        };
                                        insert(&mut ep.entries, key, rule_id);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        desired.endpoints.insert(ip, ep);
    }
    desired
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cluster::Object;

    fn cluster(yaml: &str) -> Cluster {
        let mut objects = Vec::new();
        for doc in yaml.split("\n---\n") {
            let value: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
            let object = match value["kind"].as_str().unwrap() {
                "Pod" => Object::Pod(Arc::new(serde_yaml::from_value(value).unwrap())),
                "Namespace" => Object::Namespace(Arc::new(serde_yaml::from_value(value).unwrap())),
                "NetworkPolicy" => Object::NetworkPolicy(Arc::new(serde_yaml::from_value(value).unwrap())),
                other => panic!("{other}"),
            };
            objects.push(object);
        }
        Cluster::from_objects(&objects)
    }

    const PODS: &str = r#"kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.244.0.3}
---
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a}}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.244.1.2}
---
kind: Namespace
metadata: {name: y, labels: {team: blue}}"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn unselected_pods_are_not_isolated() {
        let d = compute(&cluster(PODS), "n1", &[]);
        assert_eq!(d.endpoints.len(), 2, "only n1's pods are local");
        assert!(
            d.endpoints.values().all(|e| !e.ingress_isolated && !e.egress_isolated && e.entries.is_empty())
        );
        assert_eq!(d.ipcache.len(), 3, "every pod IP cluster-wide is in the ipcache");
    }

    #[test]
    fn deny_all_isolates_with_no_entries_and_allow_all_has_an_any_entry() {
        let deny = format!(
            "{PODS}\n---\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: x}}\nspec: {{podSelector: {{}}, ingress: []}}"
        );
        let d = compute(&cluster(&deny), "n1", &[]);
        let a = &d.endpoints[&ip("10.244.0.2")];
        assert!(a.ingress_isolated && !a.egress_isolated && a.entries.is_empty());

        let allow = format!(
            "{PODS}\n---\nkind: NetworkPolicy\nmetadata: {{name: allow, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{}}]}}"
        );
        let d = compute(&cluster(&allow), "n1", &[]);
        let a = &d.endpoints[&ip("10.244.0.2")];
        assert_eq!(
            a.entries.keys().copied().collect::<Vec<_>>(),
            vec![EntryKey { direction: DIRECTION_INGRESS, proto: 0, identity: 0, port: PortPrefix::ANY }]
        );
    }

    #[test]
    fn namespace_selector_and_named_ports() {
        let policy = format!(
            "{PODS}\n---\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: blue}}}}}}]\n    ports: [{{port: web}}]"
        );
        let d = compute(&cluster(&policy), "n1", &[]);
        let a = &d.endpoints[&ip("10.244.0.2")];
        let y_a = d.ipcache[&Ipv4Network::from(ip("10.244.1.2"))];
        let keys: Vec<EntryKey> = a.entries.keys().copied().collect();
        assert_eq!(
            keys,
            vec![EntryKey {
                direction: DIRECTION_INGRESS,
                proto: 6,
                identity: y_a,
                port: PortPrefix { port: 8080, bits: 16 }
            }]
        );
        assert!(!d.endpoints[&ip("10.244.0.3")].ingress_isolated, "b is not selected");
        assert_eq!(d.rules, vec!["x/p ingress[0]".to_owned()]);
    }

    #[test]
    fn ip_block_except_excludes_nested_prefixes() {
        let policy = format!(
            "{PODS}\n---\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}}}]"
        );
        let d = compute(&cluster(&policy), "n1", &[]);
        let a = &d.endpoints[&ip("10.244.0.2")];
        assert!(a.egress_isolated && !a.ingress_isolated, "explicit policyTypes");
        let allowed: Vec<u32> = a.entries.keys().map(|k| k.identity).collect();
        let outer = d.ipcache[&"203.0.113.0/24".parse().unwrap()];
        let except = d.ipcache[&"203.0.113.128/25".parse().unwrap()];
        assert_eq!(allowed, vec![outer]);
        assert_ne!(outer, except);
    }
}

//! Kubernetes Services and EndpointSlices → the frontends and backends the
//! datapath should serve. Pure functions: no maps, no I/O.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use weir_abi::lb::{
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL, SVC_FLAG_LOADBALANCER,
    SVC_FLAG_LOCAL, SVC_FLAG_NODEPORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use super::{BackendAddr, Frontend};

/// Per-service choice of backend selection: `maglev` or `random` (Cilium's
/// `service.cilium.io/lb-algorithm`).
pub const LB_ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one frontend should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name` of the Service, for logs and the CLI.
    pub service: String,
    /// Backends that take new connections, ordered for determinism.
    pub backends: BTreeSet<BackendAddr>,
    /// No endpoint is ready and these backends are serving but terminating
    /// (KEP-1669's fallback): they are marked terminating in the maps.
    pub terminating: bool,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend.
    pub affinity_timeout: Option<u32>,
    /// What kind of frontend: `SVC_FLAG_CLUSTER_IP`, `_NODEPORT` or
    /// `_EXTERNAL`, with `_SOURCE_RANGES` when `source_ranges` applies.
    pub flags: u16,
    /// Choose backends by Maglev consistent hashing (the service's
    /// `weir.dev/lb-algorithm` annotation, else the agent's default).
    pub maglev: bool,
    /// `loadBalancerSourceRanges` (LoadBalancer IPs only, as kube-proxy:
    /// NodePorts and external IPs are not restricted).
    pub source_ranges: Vec<ipnetwork::Ipv4Network>,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 h).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

fn affinity_timeout(svc: &Service) -> Option<u32> {
    let spec = svc.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured =
        spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()?.timeout_seconds);
    Some(
        configured.and_then(|t| u32::try_from(t).ok()).filter(|t| *t > 0).unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
    )
}

/// Every frontend the maps should hold.
pub type Desired = BTreeMap<Frontend, FrontendSpec>;

/// Parses a Kubernetes protocol name; `None` (the API default) is TCP.
pub fn parse_protocol(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(weir_abi::proto::TCP),
        "UDP" => Some(weir_abi::proto::UDP),
        "SCTP" => Some(weir_abi::proto::SCTP),
        _ => None,
    }
}

/// A port number from the API's `i32`, if it is a valid port.
pub fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// The IPv4 ClusterIPs of a Service that load balancing applies to: none for
/// headless (`None`) and ExternalName Services.
pub fn cluster_ips(svc: &Service) -> Vec<Ipv4Addr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

pub(crate) fn namespace_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (meta.namespace.clone().unwrap_or_else(|| "default".to_owned()), meta.name.clone().unwrap_or_default())
}

/// Computes the frontends of all Services with their ready backends.
///
/// Backends are matched as kube-proxy matches them: an EndpointSlice belongs
/// to the Service named by its `kubernetes.io/service-name` label in the same
/// namespace, and a slice port serves a Service port when the names (and
/// protocols) are equal. An endpoint is used when its `ready` condition is
/// not false (unset means ready), and only its first address counts.
#[cfg(test)]
pub fn desired_frontends(services: &[Service], slices: &[EndpointSlice]) -> Desired {
    desired_frontends_on(services, slices, None, None, &[], false)
}

/// One endpoint of a service port, as endpoint selection sees it.
struct Candidate<'a> {
    backend: BackendAddr,
    node: Option<&'a str>,
    ready: bool,
    /// Serving and terminating: the fallback when nothing is ready.
    serving_terminating: bool,
    /// `hints.forZones` names.
    zone_hints: Vec<&'a str>,
    /// `hints.forNodes` names.
    node_hints: Vec<&'a str>,
}

impl Candidate<'_> {
    /// The hints `topology` goes by.
    fn hints(&self, topology: Topology) -> &[&str] {
        match topology {
            Topology::Any => &[],
            Topology::SameNode => &self.node_hints,
            Topology::SameZone => &self.zone_hints,
        }
    }
}

/// Which Cluster-policy endpoints this node uses, from the hints
/// (kube-proxy's `topologyModeFromHints`, pkg/proxy/topology.go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No usable hints: every endpoint.
    Any,
    /// `PreferSameNode`: the endpoints hinted for this node.
    SameNode,
    /// `PreferSameZone` (and `topology-mode: Auto`, `PreferClose`): the
    /// endpoints hinted for this node's zone.
    SameZone,
}

/// Where the agent runs: the names hints are matched against.
#[derive(Clone, Copy)]
struct Here<'a> {
    node: Option<&'a str>,
    zone: Option<&'a str>,
}

impl Here<'_> {
    fn name(&self, topology: Topology) -> Option<&str> {
        match topology {
            Topology::Any => None,
            Topology::SameNode => self.node,
            Topology::SameZone => self.zone,
        }
    }
}

impl Topology {
    /// Hints count only if *every* ready endpoint carries them and one is
    /// for this node (zone): a slice whose hints are being added or removed
    /// does not funnel all of this node's traffic into the few endpoints
    /// already hinted, and a node no hint names keeps every endpoint rather
    /// than none. Node hints are tried first; kube-proxy honours them since
    /// PreferSameTrafficDistribution (GA and locked on in 1.35). Neither the
    /// Service's `trafficDistribution` nor its `topology-mode` annotation is
    /// read here: the EndpointSlice controller turns them into hints, and
    /// since ServiceTrafficDistribution (GA in 1.33) kube-proxy goes by the
    /// hints alone.
    fn from_hints(endpoints: &[Candidate], here: Here) -> Self {
        let ready: Vec<&Candidate> = endpoints.iter().filter(|e| e.ready).collect();
        let honoured = |topology: Topology| {
            here.name(topology).is_some_and(|mine| {
                !ready.is_empty()
                    && ready.iter().all(|e| !e.hints(topology).is_empty())
                    && ready.iter().any(|e| e.hints(topology).contains(&mine))
            })
        };
        [Self::SameNode, Self::SameZone].into_iter().find(|t| honoured(*t)).unwrap_or(Self::Any)
    }

    fn admits(self, endpoint: &Candidate, here: Here) -> bool {
        self == Self::Any || here.name(self).is_some_and(|mine| endpoint.hints(self).contains(&mine))
    }
}

/// [`desired_frontends`] as seen from `node`, in `zone` (its Node's
/// `topology.kubernetes.io/zone` label): Services with
/// `internalTrafficPolicy: Local` keep only the endpoints on this node (and
/// none elsewhere: with no local endpoint their traffic is dropped, as
/// kube-proxy drops it), and Cluster policies follow the EndpointSlices'
/// topology hints for this node or zone.
pub fn desired_frontends_on(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: Option<&str>,
    zone: Option<&str>,
    node_addresses: &[Ipv4Addr],
    maglev_by_default: bool,
) -> Desired {
    // (namespace, service name) → slices
    let mut slices_by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.iter().map(Borrow::borrow) {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let (namespace, _) = namespace_name(&slice.metadata);
        slices_by_service.entry((namespace, service.clone())).or_default().push(slice);
    }

    let mut desired = Desired::new();
    for svc in services.iter().map(Borrow::borrow) {
        let (namespace, name) = namespace_name(&svc.metadata);
        let ips = cluster_ips(svc);
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        let (Some(ports), false) = (ports, ips.is_empty()) else {
            continue;
        };
        let service_slices = slices_by_service.get(&(namespace.clone(), name.clone()));
        let maglev = match svc.metadata.annotations.as_ref().and_then(|a| a.get(LB_ALGORITHM_ANNOTATION)) {
            Some(algorithm) => algorithm == "maglev",
            None => maglev_by_default,
        };
        let spec = svc.spec.as_ref();
        let internal_local = spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local");
        let external_local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
        let node_ports = matches!(spec.and_then(|s| s.type_.as_deref()), Some("NodePort" | "LoadBalancer"));
        let external_ips: Vec<Ipv4Addr> = spec
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let mut lb_ips: Vec<Ipv4Addr> = Vec::new();
        if spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
            let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref());
            lb_ips.extend(
                ingress.into_iter().flatten().filter_map(|i| i.ip.as_ref()?.parse::<Ipv4Addr>().ok()),
            );
        }
        let mut source_ranges: Vec<ipnetwork::Ipv4Network> = spec
            .and_then(|s| s.load_balancer_source_ranges.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        // As kube-proxy: when the node itself is inside a range, the LB IPs
        // are admitted as sources too. A VIP-like load balancer often makes
        // the VIP a local address, and a request from the node to it comes
        // back with the VIP as its source.
        // (127.0.0.1, a NodePort address for the node's own processes, is
        // not the node's address for this.)
        let node_ips = || node_addresses.iter().filter(|a| !a.is_loopback());
        if source_ranges.iter().any(|r| node_ips().any(|a| r.contains(*a))) {
            source_ranges.extend(lb_ips.iter().map(|ip| ipnetwork::Ipv4Network::from(*ip)));
        }
        let service_name = format!("{namespace}/{name}");
        let affinity = affinity_timeout(svc);
        for port in ports {
            let (Some(proto), Some(frontend_port)) =
                (parse_protocol(port.protocol.as_deref()), parse_port(port.port))
            else {
                continue;
            };
            let port_name = port.name.as_deref().unwrap_or("");
            let mut endpoints = Vec::new();
            for slice in service_slices.into_iter().flatten() {
                let slice_port = slice.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == port_name
                        && parse_protocol(p.protocol.as_deref()) == Some(proto)
                });
                let Some(target_port) = slice_port.and_then(|p| p.port).and_then(parse_port) else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    let conditions = endpoint.conditions.as_ref();
                    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                    // `serving` defaults to `ready` (discovery/v1 API docs).
                    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                    let Some(address) = endpoint.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok())
                    else {
                        continue;
                    };
                    let hints = endpoint.hints.as_ref();
                    let zones = hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten();
                    let nodes = hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten();
                    endpoints.push(Candidate {
                        backend: BackendAddr { address, port: target_port, proto },
                        node: endpoint.node_name.as_deref(),
                        ready,
                        serving_terminating: serving && terminating,
                        zone_hints: zones.map(|z| z.name.as_str()).collect(),
                        node_hints: nodes.map(|n| n.name.as_str()).collect(),
                    });
                }
            }
            let topology = Topology::from_hints(&endpoints, Here { node, zone });
            // kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go): ready
            // endpoints first, for a Cluster policy those the hints give this
            // node; only when there are none, serving terminating ones (with
            // no regard to hints: hints are only honoured when a ready
            // endpoint matches, so no ready endpoint exists at all then).
            // A Local policy keeps to this node's endpoints, hints or not
            // (and none elsewhere: with no local endpoint the traffic is
            // dropped).
            let pick = |local: bool| {
                let here = |e: &Candidate| !local || node.is_none() || e.node == node;
                let hinted = |e: &Candidate| local || topology.admits(e, Here { node, zone });
                let ready: BTreeSet<BackendAddr> =
                    endpoints.iter().filter(|e| e.ready && here(e) && hinted(e)).map(|e| e.backend).collect();
                if !ready.is_empty() {
                    return (ready, false);
                }
                let fallback: BTreeSet<BackendAddr> = endpoints
                    .iter()
                    .filter(|e| e.serving_terminating && here(e))
                    .map(|e| e.backend)
                    .collect();
                let terminating = !fallback.is_empty();
                (fallback, terminating)
            };
            // Computed once per port: every frontend address shares them.
            let picked = [pick(false), pick(true)];
            let mut insert = |address: Ipv4Addr, port: u16, scope: u8, flags: u16, local: bool| {
                let (backends, terminating) = picked[usize::from(local)].clone();
                let ranged = flags & SVC_FLAG_SOURCE_RANGES != 0;
                desired.insert(
                    Frontend { address, port, proto, scope },
                    FrontendSpec {
                        service: service_name.clone(),
                        backends,
                        terminating,
                        affinity_timeout: affinity,
                        maglev,
                        flags: flags | if local { SVC_FLAG_LOCAL } else { 0 },
                        source_ranges: if ranged { source_ranges.clone() } else { Vec::new() },
                    },
                );
            };
            // An external address under a Local policy serves in-cluster
            // clients from every endpoint, as kube-proxy does: a twin entry
            // in the internal scope, which they look up instead.
            let mut add = |address: Ipv4Addr, port: u16, flags: u16, local: bool| {
                let external = flags & (SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL) != 0;
                if external && local && node.is_some() {
                    insert(address, port, SCOPE_EXTERNAL, flags | SVC_FLAG_TWO_SCOPES, true);
                    insert(address, port, SCOPE_INTERNAL, flags & !SVC_FLAG_SOURCE_RANGES, false);
                } else {
                    insert(address, port, SCOPE_EXTERNAL, flags, local);
                }
            };
            for address in &ips {
                add(*address, frontend_port, SVC_FLAG_CLUSTER_IP, internal_local);
            }
            if let Some(node_port) = port.node_port.and_then(parse_port).filter(|_| node_ports) {
                for address in node_addresses {
                    add(*address, node_port, SVC_FLAG_NODEPORT, external_local);
                }
            }
            for address in &external_ips {
                add(*address, frontend_port, SVC_FLAG_EXTERNAL, external_local);
            }
            let lb_flags = SVC_FLAG_EXTERNAL
                | SVC_FLAG_LOADBALANCER
                | if source_ranges.is_empty() { 0 } else { SVC_FLAG_SOURCE_RANGES };
            for address in &lb_ips {
                add(*address, frontend_port, lb_flags, external_local);
            }
        }
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_yaml::from_str(s).unwrap()
    }

    fn web_service() -> Service {
        yaml(
            r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#,
        )
    }

    fn web_slice() -> EndpointSlice {
        yaml(
            r#"
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.0.2]
  conditions: {ready: true}
- addresses: [10.244.0.3]
- addresses: [10.244.0.4]
  conditions: {ready: false}
"#,
        )
    }

    fn backend(ip: &str, port: u16, proto: u8) -> BackendAddr {
        BackendAddr { address: ip.parse().unwrap(), port, proto }
    }

    #[test]
    fn ready_endpoints_become_backends_per_named_port() {
        let desired = desired_frontends(&[web_service()], &[web_slice()]);
        let http = Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        let dns = Frontend { address: "10.96.0.10".parse().unwrap(), port: 53, proto: 17, scope: 0 };
        assert_eq!(desired.len(), 2);
        assert_eq!(desired[&http].service, "shop/web");
        assert_eq!(
            desired[&http].backends,
            [backend("10.244.0.2", 8080, 6), backend("10.244.0.3", 8080, 6)].into(),
            "not-ready 10.244.0.4 must not be a backend; unset ready means ready"
        );
        assert_eq!(
            desired[&dns].backends,
            [backend("10.244.0.2", 5353, 17), backend("10.244.0.3", 5353, 17)].into()
        );
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let mut slice = web_slice();
        slice.endpoints = vec![
            yaml("{addresses: [10.244.0.7], conditions: {ready: false, serving: true, terminating: true}}"),
            yaml("{addresses: [10.244.0.8], conditions: {ready: false, serving: false, terminating: true}}"),
        ];
        let desired = desired_frontends(&[web_service()], &[slice.clone()]);
        let http = Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        assert!(desired[&http].terminating);
        assert_eq!(
            desired[&http].backends,
            [backend("10.244.0.7", 8080, 6)].into(),
            "serving+terminating only"
        );

        slice.endpoints.push(yaml("{addresses: [10.244.0.9], conditions: {ready: true}}"));
        let desired = desired_frontends(&[web_service()], &[slice]);
        assert!(!desired[&http].terminating);
        assert_eq!(desired[&http].backends, [backend("10.244.0.9", 8080, 6)].into(), "a ready endpoint wins");
    }

    #[test]
    fn internal_traffic_policy_local_keeps_local_endpoints() {
        let mut svc = web_service();
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let mut slice = web_slice();
        slice.endpoints[0].node_name = Some("n1".into());
        slice.endpoints[1].node_name = Some("n2".into());
        let http = Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        let on_n1 = desired_frontends_on(&[svc.clone()], &[slice.clone()], Some("n1"), None, &[], false);
        assert_eq!(on_n1[&http].backends, [backend("10.244.0.2", 8080, 6)].into());
        let on_n3 = desired_frontends_on(&[svc], &[slice], Some("n3"), None, &[], false);
        assert!(on_n3[&http].backends.is_empty(), "no local endpoint: no backend, traffic dropped");
    }

    /// A slice of `web` whose endpoints are given as YAML flow mappings.
    fn slice_with(endpoints: &[&str]) -> EndpointSlice {
        let mut slice = web_slice();
        slice.endpoints = endpoints.iter().map(|e| yaml(e)).collect();
        slice
    }

    fn ips(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    fn addresses(spec: &FrontendSpec) -> BTreeSet<Ipv4Addr> {
        spec.backends.iter().map(|b| b.address).collect()
    }

    /// The backends of `web`'s ClusterIP http port, served by `endpoints`,
    /// seen from `node` in `zone`, and whether they are the terminating
    /// fallback.
    fn clusterip_on(endpoints: &[&str], node: &str, zone: Option<&str>) -> (BTreeSet<Ipv4Addr>, bool) {
        let d =
            desired_frontends_on(&[web_service()], &[slice_with(endpoints)], Some(node), zone, &[], false);
        let spec = &d[&Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 }];
        (addresses(spec), spec.terminating)
    }

    const A1: &str = "{addresses: [10.244.0.2], nodeName: n1, hints: {forZones: [{name: a}]}}";
    const A2: &str = "{addresses: [10.244.0.3], nodeName: n2, hints: {forZones: [{name: a}]}}";
    const B1: &str = "{addresses: [10.244.0.4], nodeName: n3, hints: {forZones: [{name: b}]}}";

    #[test]
    fn zone_hints_keep_cluster_traffic_in_the_zone() {
        let on = |zone| clusterip_on(&[A1, A2, B1], "n1", zone).0;
        assert_eq!(on(Some("a")), ips(&["10.244.0.2", "10.244.0.3"]));
        assert_eq!(on(Some("b")), ips(&["10.244.0.4"]), "the zone decides, not where the node is");
        let all = ips(&["10.244.0.2", "10.244.0.3", "10.244.0.4"]);
        assert_eq!(on(Some("c")), all, "no endpoint hinted for this zone: every endpoint");
        assert_eq!(on(None), all, "a node without a zone label ignores zone hints");
    }

    #[test]
    fn zone_hints_count_only_when_every_ready_endpoint_has_one() {
        let on_a = |endpoints: &[&str]| clusterip_on(endpoints, "n1", Some("a")).0;
        let unhinted = "{addresses: [10.244.0.5], nodeName: n3}";
        assert_eq!(
            on_a(&[A1, A2, B1, unhinted]),
            ips(&["10.244.0.2", "10.244.0.3", "10.244.0.4", "10.244.0.5"]),
            "one ready endpoint without hints: every endpoint"
        );
        let empty = "{addresses: [10.244.0.5], hints: {forZones: []}}";
        assert_eq!(on_a(&[A1, B1, empty]).len(), 3, "an empty hint list is no hint");
        let not_ready = "{addresses: [10.244.0.6], conditions: {ready: false}}";
        assert_eq!(
            on_a(&[A1, A2, B1, not_ready]),
            ips(&["10.244.0.2", "10.244.0.3"]),
            "endpoints that are not ready do not count"
        );
        // The hints of a second slice of the same service count too.
        let mut second = slice_with(&[unhinted]);
        second.metadata.name = Some("web-def".into());
        let desired = desired_frontends_on(
            &[web_service()],
            &[slice_with(&[A1, B1]), second],
            Some("n1"),
            Some("a"),
            &[],
            false,
        );
        assert!(desired.values().all(|spec| spec.backends.len() == 3), "every endpoint of both slices");
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let hinted = |ip: &str, node: &str, zone: &str| {
            format!(
                "{{addresses: [{ip}], hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}}}"
            )
        };
        let endpoints = [
            hinted("10.244.0.2", "n1", "a"),
            hinted("10.244.0.3", "n2", "a"),
            hinted("10.244.0.4", "n3", "b"),
        ];
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let on = |node, zone| clusterip_on(&endpoints, node, Some(zone)).0;
        assert_eq!(on("n2", "a"), ips(&["10.244.0.3"]), "PreferSameNode: this node's endpoint");
        assert_eq!(on("n4", "a"), ips(&["10.244.0.2", "10.244.0.3"]), "no node hint for n4: zone hints");
    }

    #[test]
    fn local_policies_ignore_hints() {
        let mut svc = web_service();
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let http = Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        let d = desired_frontends_on(&[svc], &[slice_with(&[A1, A2, B1])], Some("n3"), Some("a"), &[], false);
        assert_eq!(
            addresses(&d[&http]),
            ips(&["10.244.0.4"]),
            "internalTrafficPolicy Local: this node's endpoint, though hinted for another zone"
        );

        let mut svc = web_service();
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.external_traffic_policy = Some("Local".into());
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        let node_ip: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let d = desired_frontends_on(
            &[svc],
            &[slice_with(&[A1, A2, B1])],
            Some("n3"),
            Some("a"),
            &[node_ip],
            false,
        );
        let node_port = Frontend { address: node_ip, port: 30080, proto: 6, scope: SCOPE_EXTERNAL };
        let twin = Frontend { scope: SCOPE_INTERNAL, ..node_port };
        assert_eq!(addresses(&d[&node_port]), ips(&["10.244.0.4"]), "eTP Local: this node's endpoint");
        assert_eq!(
            addresses(&d[&twin]),
            ips(&["10.244.0.2", "10.244.0.3"]),
            "in-cluster clients of an eTP Local address take the Cluster path, hints included"
        );
        assert_eq!(
            addresses(&d[&http]),
            ips(&["10.244.0.2", "10.244.0.3"]),
            "the ClusterIP follows the hints"
        );
    }

    #[test]
    fn hints_and_the_terminating_fallback() {
        let on_a = |endpoints: &[&str]| clusterip_on(endpoints, "n1", Some("a"));
        let draining_a = "{addresses: [10.244.0.7], hints: {forZones: [{name: a}]}, \
                          conditions: {ready: false, serving: true, terminating: true}}";
        let draining_b = "{addresses: [10.244.0.8], hints: {forZones: [{name: b}]}, \
                          conditions: {ready: false, serving: true, terminating: true}}";
        assert_eq!(
            on_a(&[B1, draining_a]),
            (ips(&["10.244.0.4"]), false),
            "hints give this zone no ready endpoint: every ready endpoint, never a terminating one"
        );
        assert_eq!(
            on_a(&[A1, B1, draining_a, draining_b]),
            (ips(&["10.244.0.2"]), false),
            "a ready endpoint in the zone: terminating ones wait"
        );
        assert_eq!(
            on_a(&[draining_a, draining_b]),
            (ips(&["10.244.0.7", "10.244.0.8"]), true),
            "nothing ready: every serving terminating endpoint, hints or not"
        );
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips() {
        let svc: Service = yaml(
            r#"
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}
"#,
        );
        let mut slice = web_slice();
        slice.endpoints[0].node_name = Some("n1".into());
        slice.endpoints[1].node_name = Some("n2".into());
        let node_ip: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let d = desired_frontends_on(&[svc], &[slice], Some("n1"), None, &[node_ip], false);
        let fe = |ip: &str, port| Frontend { address: ip.parse().unwrap(), port, proto: 6, scope: 0 };
        let internal = |ip: &str, port| Frontend { scope: SCOPE_INTERNAL, ..fe(ip, port) };
        assert_eq!(d[&fe("10.96.0.10", 80)].flags, SVC_FLAG_CLUSTER_IP);
        assert_eq!(d[&fe("10.96.0.10", 80)].backends.len(), 2, "eTP does not apply to ClusterIP traffic");
        let local_twin = SVC_FLAG_LOCAL | SVC_FLAG_TWO_SCOPES;
        assert_eq!(d[&fe("192.0.2.1", 30080)].flags, SVC_FLAG_NODEPORT | local_twin);
        assert_eq!(
            d[&fe("192.0.2.1", 30080)].backends,
            [backend("10.244.0.2", 8080, 6)].into(),
            "externalTrafficPolicy Local: this node's endpoints only"
        );
        assert_eq!(d[&internal("192.0.2.1", 30080)].flags, SVC_FLAG_NODEPORT);
        assert_eq!(d[&internal("192.0.2.1", 30080)].backends.len(), 2, "in-cluster clients: every endpoint");
        assert_eq!(d[&fe("198.51.100.7", 80)].flags, SVC_FLAG_EXTERNAL | local_twin);
        assert_eq!(d[&fe("203.0.113.9", 80)].flags, SVC_FLAG_EXTERNAL | SVC_FLAG_LOADBALANCER | local_twin);
        assert_eq!(d[&internal("203.0.113.9", 80)].flags, SVC_FLAG_EXTERNAL | SVC_FLAG_LOADBALANCER);
        assert_eq!(d.len(), 7, "ClusterIP, and three external addresses with their internal twins");
    }

    #[test]
    fn source_ranges_admit_the_load_balancer_ips_when_they_admit_the_node() {
        let svc = |ranges: &str| -> Service {
            yaml(&format!(
                r#"
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{name: http, port: 80, nodePort: 30080, protocol: TCP}}]
status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.9}}]}}}}
"#
            ))
        };
        let node_ip: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let lb = Frontend { address: "203.0.113.9".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        let ranges_of = |svc: Service| {
            let d = desired_frontends_on(&[svc], &[web_slice()], Some("n1"), None, &[node_ip], false);
            d[&lb].source_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(ranges_of(svc("198.51.100.0/24")), ["198.51.100.0/24"]);
        assert_eq!(
            ranges_of(svc("198.51.100.0/24, 192.0.2.0/24")),
            ["198.51.100.0/24", "192.0.2.0/24", "203.0.113.9/32"],
            "the node is inside a range: its requests looping back from the VIP pass"
        );
    }

    #[test]
    fn slices_of_other_namespaces_or_services_are_ignored() {
        let mut other_ns = web_slice();
        other_ns.metadata.namespace = Some("other".into());
        let mut other_svc = web_slice();
        other_svc.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), "api".to_owned())].into());
        let desired = desired_frontends(&[web_service()], &[other_ns, other_svc]);
        assert_eq!(desired.len(), 2);
        assert!(desired.values().all(|spec| spec.backends.is_empty()));
    }

    #[test]
    fn backends_of_several_slices_are_merged() {
        let mut second = web_slice();
        second.metadata.name = Some("web-def".into());
        second.endpoints = vec![yaml("addresses: [10.244.1.9]")];
        let desired = desired_frontends(&[web_service()], &[web_slice(), second]);
        let http = Frontend { address: "10.96.0.10".parse().unwrap(), port: 80, proto: 6, scope: 0 };
        assert_eq!(desired[&http].backends.len(), 3);
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontend() {
        let headless: Service = yaml("metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        let external: Service = yaml(
            "metadata: {name: e}\nspec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}",
        );
        assert!(desired_frontends(&[headless, external], &[]).is_empty());
    }

    #[test]
    fn a_service_without_slices_has_a_frontend_without_backends() {
        let desired = desired_frontends(&[web_service()], &[]);
        assert_eq!(desired.len(), 2, "the frontend must exist so the datapath can drop and count");
        assert!(desired.values().all(|spec| spec.backends.is_empty()));
    }
}

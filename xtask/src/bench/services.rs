//! The services every configuration serves: N ClusterIP services with ten
//! endpoints each, written as Kubernetes manifests for Weir, and as the
//! iptables and nftables rulesets kube-proxy would write for the same
//! objects (pkg/proxy/iptables and pkg/proxy/nftables in kubernetes/kubernetes,
//! v1.33: chain names, rule order, matches, probabilities, comments and the
//! large-cluster mode that drops per-endpoint comments beyond 1,000
//! endpoints).
//!
//! Two services are targets, backed by the benchmark's ten real pods: the
//! last one (the end of KUBE-SERVICES, iptables' worst case) and one at a
//! random position. Every other endpoint is an address with no pod behind
//! it: only the targets carry traffic.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Result;
use serde_json::json;
use weir_tests::manifests::{self, to_yaml};

/// Namespace of every benchmark object.
pub const NAMESPACE: &str = "bench";
/// The service port and the backends' port.
pub const SERVICE_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// Endpoints per service.
pub const ENDPOINTS: usize = 10;
/// The client pod and the backend pods, the same in every node namespace.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Services per manifest file (so one change rewrites a small file).
const SERVICES_PER_FILE: usize = 1000;

/// The address of backend pod `i` (0-based).
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

/// An endpoint address with no pod behind it (10.248.0.0/13 holds 524,288).
fn fake_endpoint(service: usize, e: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 248, 0, 0)) + (service * ENDPOINTS + e) as u32)
}

/// The ClusterIP of service `i`: 10.96.0.1 onwards.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// N services and where the two targets sit.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSet {
    pub n: usize,
    /// Index of the target at a random position (seeded, reported).
    pub random_target: usize,
}

impl ServiceSet {
    pub fn new(n: usize, seed: u64) -> ServiceSet {
        assert!(n >= 1 && n * ENDPOINTS <= 1 << 19, "1 to 52,428 services");
        let random_target = if n <= 2 { 0 } else { (splitmix(seed ^ n as u64) % (n as u64 - 1)) as usize };
        ServiceSet { n, random_target }
    }

    pub fn last_target(&self) -> usize {
        self.n - 1
    }

    fn is_target(&self, i: usize) -> bool {
        i == self.last_target() || i == self.random_target
    }

    /// The endpoints of service `i`.
    pub fn endpoints(&self, i: usize) -> Vec<Ipv4Addr> {
        if self.is_target(i) {
            (0..ENDPOINTS).map(backend_ip).collect()
        } else {
            (0..ENDPOINTS).map(|e| fake_endpoint(i, e)).collect()
        }
    }

    fn name(i: usize) -> String {
        format!("svc-{i}")
    }

    /// `(file name, YAML)` for every manifest file: Services and
    /// EndpointSlices, the last target's EndpointSlice alone in
    /// [`TARGET_FILE`].
    pub fn weir_manifests(&self) -> Vec<(String, String)> {
        let mut files = Vec::new();
        let mut text = String::new();
        for i in 0..self.n {
            service_yaml(&mut text, i);
            if i != self.last_target() {
                slice_yaml(&mut text, i, &self.endpoints(i));
            }
            if (i + 1) % SERVICES_PER_FILE == 0 || i + 1 == self.n {
                files
                    .push((format!("services-{:03}.yaml", i / SERVICES_PER_FILE), std::mem::take(&mut text)));
            }
        }
        files.push((TARGET_FILE.to_owned(), self.target_slice(&self.endpoints(self.last_target()))));
        files
    }

    /// The last target's EndpointSlice with `endpoints`.
    pub fn target_slice(&self, endpoints: &[Ipv4Addr]) -> String {
        let mut text = String::new();
        slice_yaml(&mut text, self.last_target(), endpoints);
        text
    }

    /// kube-proxy's iptables-restore input (`iptables-save` format) for
    /// these services.
    pub fn iptables_ruleset(&self) -> String {
        let large_cluster = self.n * ENDPOINTS > LARGE_CLUSTER_ENDPOINTS;
        let mut chains = String::new();
        let mut rules = String::new();
        let mut services = String::new();
        for i in 0..self.n {
            let port_name = format!("{NAMESPACE}/{}:http", Self::name(i));
            let svc_chain = format!("KUBE-SVC-{}", hash_name(&format!("{port_name}tcp"), 16));
            let ip = cluster_ip(i);
            let _ = writeln!(chains, ":{svc_chain} - [0:0]");
            let _ = writeln!(
                services,
                "-A KUBE-SERVICES -m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {ip} --dport {SERVICE_PORT} -j {svc_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {ip} --dport {SERVICE_PORT} ! -s {POD_CIDR} -j KUBE-MARK-MASQ"
            );
            let endpoints = self.endpoints(i);
            let mut sep_rules = String::new();
            for (e, ep) in endpoints.iter().enumerate() {
                let sep_chain =
                    format!("KUBE-SEP-{}", hash_name(&format!("{port_name}tcp{ep}:{BACKEND_PORT}"), 16));
                let _ = writeln!(chains, ":{sep_chain} - [0:0]");
                let comment = |text: &str| {
                    if large_cluster { String::new() } else { format!("-m comment --comment \"{text}\" ") }
                };
                let probability = if e + 1 < endpoints.len() {
                    format!(
                        "-m statistic --mode random --probability {:.10} ",
                        1.0 / (endpoints.len() - e) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} {}{probability}-j {sep_chain}",
                    comment(&format!("{port_name} -> {ep}:{BACKEND_PORT}"))
                );
                let _ =
                    writeln!(sep_rules, "-A {sep_chain} {}-s {ep} -j KUBE-MARK-MASQ", comment(&port_name));
                let _ = writeln!(
                    sep_rules,
                    "-A {sep_chain} {}-m tcp -p tcp -j DNAT --to-destination {ep}:{BACKEND_PORT}",
                    comment(&port_name)
                );
            }
            rules.push_str(&sep_rules);
        }
        let mut out = String::with_capacity(chains.len() + rules.len() + services.len() + 4096);
        out.push_str(IPTABLES_FILTER);
        out.push_str(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n",
        );
        out.push_str(&chains);
        out.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        );
        out.push_str(&services);
        out.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        out.push_str(&rules);
        out.push_str("COMMIT\n");
        out
    }

    /// kube-proxy's `nft -f` input (nftables mode) for these services.
    pub fn nftables_ruleset(&self) -> String {
        let mut out = String::from(NFT_BASE);
        for i in 0..self.n {
            let name = format!("{NAMESPACE}/{}/tcp/http", Self::name(i));
            let svc_chain = format!("service-{}-{name}", hash_name(&name, 8));
            let ip = cluster_ip(i);
            let _ = writeln!(out, "add chain ip kube-proxy {svc_chain}");
            let mut vmap = Vec::new();
            for (e, ep) in self.endpoints(i).iter().enumerate() {
                let ep_chain = format!(
                    "endpoint-{}-{name}__{ep}/{BACKEND_PORT}",
                    hash_name(&format!("{name}{ep}:{BACKEND_PORT}"), 8)
                );
                let _ = writeln!(out, "add chain ip kube-proxy {ep_chain}");
                let _ =
                    writeln!(out, "add rule ip kube-proxy {ep_chain} ip saddr {ep} jump mark-for-masquerade");
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {ep_chain} meta l4proto tcp dnat to {ep}:{BACKEND_PORT}"
                );
                vmap.push(format!("{e} : goto {ep_chain}"));
            }
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {svc_chain} ip daddr {ip} ip saddr != {POD_CIDR} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {svc_chain} numgen random mod {} vmap {{ {} }}",
                vmap.len(),
                vmap.join(" , ")
            );
            let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {ip} }}");
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {ip} . tcp . {SERVICE_PORT} : goto {svc_chain} }}"
            );
        }
        out
    }
}

/// The file holding the last target's EndpointSlice.
pub const TARGET_FILE: &str = "target.yaml";

/// kube-proxy's `largeClusterEndpointsThreshold`.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The filter table kube-proxy (iptables mode) writes with no
/// endpoint-less services.
pub const IPTABLES_FILTER: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A INPUT -j KUBE-FIREWALL\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -j KUBE-FIREWALL\n\
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
COMMIT\n";

/// An empty ruleset for the same tables: `iptables-restore` of it flushes
/// everything kube-proxy wrote (what "from scratch" starts from).
pub const IPTABLES_EMPTY: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// The base of kube-proxy's nftables table (its `baseRules` in
/// proxier_test.go), with this cluster's service CIDR and no node IPs.
const NFT_BASE: &str = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/12 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#;

fn service_yaml(out: &mut String, i: usize) {
    let ip = cluster_ip(i);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {BACKEND_PORT}, protocol: TCP}}]}}\n",
        name = ServiceSet::name(i)
    );
}

fn slice_yaml(out: &mut String, i: usize, endpoints: &[Ipv4Addr]) {
    let name = ServiceSet::name(i);
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-x1, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n"
    );
    for ep in endpoints {
        let _ = writeln!(out, "- {{addresses: [{ep}], conditions: {{ready: true}}}}");
    }
}

/// The Namespace and the Pods of the Weir node (the client and the
/// backends), labelled for the NetworkPolicy benchmark.
pub fn pods_manifest(node_name: &str) -> Result<String> {
    let mut docs = vec![manifests::namespace(NAMESPACE)];
    let mut client = manifests::pod(NAMESPACE, "client", node_name, CLIENT_IP);
    client["metadata"]["labels"]["role"] = json!("client");
    docs.push(client);
    for i in 0..ENDPOINTS {
        let mut pod = manifests::pod(NAMESPACE, &format!("backend-{i}"), node_name, backend_ip(i));
        pod["metadata"]["labels"]["role"] = json!("backend");
        docs.push(pod);
    }
    to_yaml(&docs)
}

/// `count` NetworkPolicies. The first lets the client reach the backends
/// (ingress on every backend, egress on the client: both directions
/// isolated). Each further one isolates the same pods again with an
/// `ipBlock` peer of its own (a /32 in 172.16.0.0/12, its own port),
/// alternately as backend ingress and client egress, so every policy adds
/// an ipcache prefix, a CIDR identity and policy-map entries that the
/// benchmark's packets never match: the lookups must not care.
pub fn policies_manifest(count: usize) -> String {
    let mut out = String::new();
    if count >= 1 {
        let _ = write!(
            out,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: allow-client, namespace: {NAMESPACE}}}\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n\
             \x20 ingress: [{{from: [{{podSelector: {{matchLabels: {{role: client}}}}}}], ports: [{{protocol: TCP, port: {BACKEND_PORT}}}]}}]\n\
             \x20 egress: [{{to: [{{podSelector: {{matchLabels: {{role: backend}}}}}}], ports: [{{protocol: TCP, port: {BACKEND_PORT}}}]}}]\n"
        );
    }
    for i in 1..count {
        let cidr = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32);
        let port = 1000 + (i % 60000);
        let (role, kind, rule) = if i % 2 == 0 {
            (
                "backend",
                "Ingress",
                format!(
                    "ingress: [{{from: [{{ipBlock: {{cidr: {cidr}/32}}}}], ports: [{{protocol: TCP, port: {port}}}]}}]"
                ),
            )
        } else {
            (
                "client",
                "Egress",
                format!(
                    "egress: [{{to: [{{ipBlock: {{cidr: {cidr}/32}}}}], ports: [{{protocol: TCP, port: {port}}}]}}]"
                ),
            )
        };
        let _ = write!(
            out,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: filler-{i}, namespace: {NAMESPACE}}}\n\
             spec:\n  podSelector: {{matchLabels: {{role: {role}}}}}\n  policyTypes: [{kind}]\n  {rule}\n"
        );
    }
    out
}

/// kube-proxy names chains after a base32 SHA-256 prefix; any stable hash of
/// the same length gives rulesets of the same shape and size.
fn hash_name(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(len);
    let mut state = fnv1a(text.as_bytes());
    let mut bits = 64;
    while out.len() < len {
        if bits < 5 {
            state = splitmix(state);
            bits = 64;
        }
        out.push(ALPHABET[(state & 31) as usize] as char);
        state >>= 5;
        bits -= 5;
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64: a small, good-enough mixer for seeds and names.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_backed_by_the_real_pods() {
        let set = ServiceSet::new(1000, 7);
        assert_eq!(set.last_target(), 999);
        assert!(set.random_target < 999);
        assert_eq!(set.endpoints(999)[0], backend_ip(0));
        assert_eq!(set.endpoints(set.random_target)[9], backend_ip(9));
        assert_ne!(set.endpoints(1)[0], set.endpoints(2)[0]);
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(cluster_ip(300), Ipv4Addr::new(10, 96, 1, 45));
    }

    #[test]
    fn iptables_ruleset_has_kube_proxy_shape() {
        let small = ServiceSet::new(2, 1).iptables_ruleset();
        // KUBE-SERVICES: one rule per service, then the nodeports rule last.
        let services: Vec<&str> = small.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(services.len(), 3);
        assert!(services[1].contains("-d 10.96.0.2 "), "{}", services[1]);
        assert!(services[2].contains("KUBE-NODEPORTS"));
        assert!(small.contains("--probability 0.1000000000"));
        assert!(small.contains("--probability 0.5000000000"));
        assert!(small.contains("-m comment --comment \"bench/svc-0:http -> "));
        assert_eq!(small.matches("-j DNAT").count(), 20);
        // Beyond 1,000 endpoints kube-proxy drops per-endpoint comments.
        let large = ServiceSet::new(101, 1).iptables_ruleset();
        assert!(!large.contains(" -> "));
    }

    #[test]
    fn nftables_ruleset_maps_every_service() {
        let rules = ServiceSet::new(3, 1).nftables_ruleset();
        assert_eq!(rules.matches("add element ip kube-proxy service-ips").count(), 3);
        assert!(rules.contains("numgen random mod 10 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("10.96.0.3 . tcp . 80 : goto service-"));
    }

    #[test]
    fn manifests_split_and_keep_the_target_alone() {
        let files = ServiceSet::new(2500, 3).weir_manifests();
        assert_eq!(files.len(), 4);
        assert_eq!(files[3].0, TARGET_FILE);
        assert_eq!(files[3].1.matches("addresses").count(), ENDPOINTS);
        let all: String = files.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(all.matches("kind: Service\n").count(), 2500);
        assert_eq!(all.matches("kind: EndpointSlice\n").count(), 2500);
        assert_eq!(policies_manifest(3).matches("kind: NetworkPolicy").count(), 3);
    }
}

//! Checks an object before it may reach the maps: a bad object is reported
//! and skipped, never half-applied.

use std::net::IpAddr;

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::lb::translate::{parse_port, parse_protocol};

fn check_port(what: &str, port: i32) -> Result<(), String> {
    parse_port(port).map(|_| ()).ok_or_else(|| format!("{what} {port} is not a port (1-65535)"))
}

fn check_protocol(protocol: Option<&str>) -> Result<(), String> {
    parse_protocol(protocol)
        .map(|_| ())
        .ok_or_else(|| format!("protocol {:?} is not TCP, UDP or SCTP", protocol.unwrap_or_default()))
}

fn check_ip(what: &str, ip: &str) -> Result<(), String> {
    ip.parse::<IpAddr>().map(|_| ()).map_err(|_| format!("{what} {ip:?} is not an IP address"))
}

pub fn service(svc: &Service) -> Result<(), String> {
    let Some(spec) = &svc.spec else { return Ok(()) };
    for ip in spec.cluster_ip.iter().chain(spec.cluster_ips.iter().flatten()) {
        if ip != "None" && !ip.is_empty() {
            check_ip("clusterIP", ip)?;
        }
    }
    for port in spec.ports.iter().flatten() {
        check_port("port", port.port)?;
        check_protocol(port.protocol.as_deref())?;
        if let Some(IntOrString::Int(target)) = port.target_port {
            check_port("targetPort", target)?;
        }
    }
    Ok(())
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    match slice.address_type.as_str() {
        "IPv4" => {
            for endpoint in &slice.endpoints {
                for address in &endpoint.addresses {
                    address
                        .parse::<std::net::Ipv4Addr>()
                        .map_err(|_| format!("endpoint address {address:?} is not an IPv4 address"))?;
                }
            }
        }
        "IPv6" | "FQDN" => {}
        other => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
    }
    for port in slice.ports.iter().flatten() {
        if let Some(port) = port.port {
            check_port("port", port)?;
        }
        check_protocol(port.protocol.as_deref())?;
    }
    Ok(())
}

pub fn network_policy(policy: &NetworkPolicy) -> Result<(), String> {
    let Some(spec) = &policy.spec else { return Ok(()) };
    for selector in spec.pod_selector.iter() {
        crate::policy::selector::validate(selector)?;
    }
    for t in spec.policy_types.iter().flatten() {
        if t != "Ingress" && t != "Egress" {
            return Err(format!("policyType {t:?} is not Ingress or Egress"));
        }
    }
    let ingress = spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref()));
    let egress = spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref()));
    for (peers, ports) in ingress.chain(egress) {
        for peer in peers.into_iter().flatten() {
            for selector in peer.pod_selector.iter().chain(peer.namespace_selector.iter()) {
                crate::policy::selector::validate(selector)?;
            }
            if let Some(block) = &peer.ip_block {
                let cidr: ipnetwork::IpNetwork =
                    block.cidr.parse().map_err(|_| format!("ipBlock cidr {:?} is not a CIDR", block.cidr))?;
                for except in block.except.iter().flatten() {
                    let e: ipnetwork::IpNetwork =
                        except.parse().map_err(|_| format!("ipBlock except {except:?} is not a CIDR"))?;
                    if !(cidr.contains(e.network()) && e.prefix() > cidr.prefix()) {
                        return Err(format!("ipBlock except {except} is not inside {}", block.cidr));
                    }
                }
            }
        }
        for port in ports.into_iter().flatten() {
            check_protocol(port.protocol.as_deref())?;
            match (&port.port, port.end_port) {
                (Some(IntOrString::Int(p)), end) => {
                    check_port("port", *p)?;
                    if let Some(end) = end {
                        check_port("endPort", end)?;
                        if end < *p {
                            return Err(format!("endPort {end} is below port {p}"));
                        }
                    }
                }
                (_, Some(_)) => return Err("endPort needs a numeric port".into()),
                _ => {}
            }
        }
    }
    Ok(())
}

pub fn pod(pod: &Pod) -> Result<(), String> {
    let Some(status) = &pod.status else {
        return Ok(());
    };
    for ip in status.pod_ip.iter().chain(status.pod_ips.iter().flatten().map(|p| &p.ip)) {
        check_ip("podIP", ip)?;
    }
    Ok(())
}

/// A Node is matched by name (this node's zone, its eligibility), so it
/// needs one; its addresses and pod CIDRs must parse, as everything else the
/// agent reads.
pub fn node(node: &Node) -> Result<(), String> {
    if node.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err("a Node needs metadata.name".into());
    }
    if let Some(spec) = &node.spec {
        for cidr in spec.pod_cidr.iter().chain(spec.pod_cidrs.iter().flatten()) {
            cidr.parse::<ipnetwork::IpNetwork>().map_err(|_| format!("podCIDR {cidr:?} is not a CIDR"))?;
        }
    }
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for address in addresses.into_iter().flatten() {
        // Hostname entries are names, not addresses.
        if matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
            check_ip(&address.type_, &address.address)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn rejects_bad_services() {
        assert!(
            service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}"))
                .is_err()
        );
        assert!(
            service(&svc("metadata: {name: a}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 70000}]}"))
                .is_err()
        );
        assert!(
            service(&svc(
                "metadata: {name: a}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80, targetPort: 0}]}"
            ))
            .is_err()
        );
        assert!(
            service(&svc(
                "metadata: {name: a}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80, protocol: ICMP}]}"
            ))
            .is_err()
        );
        assert!(
            service(&svc(
                "metadata: {name: a}\nspec: {clusterIP: None, ports: [{port: 80, targetPort: http}]}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn rejects_bad_endpoint_slices() {
        let slice: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [fe80::1]}]",
        )
        .unwrap();
        assert!(endpoint_slice(&slice).is_err());
    }

    #[test]
    fn rejects_bad_nodes() {
        let node_of = |yaml: &str| -> Node { serde_yaml::from_str(yaml).unwrap() };
        let good = "metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}\n\
                    spec: {podCIDR: 10.244.0.0/24}\n\
                    status: {addresses: [{type: InternalIP, address: 192.0.2.1}, {type: Hostname, address: n1}]}";
        assert_eq!(node(&node_of(good)), Ok(()));
        assert!(node(&node_of("metadata: {labels: {topology.kubernetes.io/zone: a}}")).is_err());
        assert!(node(&node_of("metadata: {name: n1}\nspec: {podCIDR: 10.244.0.0/33}")).is_err());
        assert!(
            node(&node_of("metadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: n1}]}"))
                .is_err()
        );
    }
}

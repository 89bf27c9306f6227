//! Which pods run on this node.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::cluster::Cluster;

/// IPv4 address → `namespace/name` of every pod scheduled on `node_name`
/// that has its own network namespace (hostNetwork pods share the node's).
pub fn local_pod_ips(cluster: &Cluster, node_name: &str) -> BTreeMap<Ipv4Addr, String> {
    let mut pods = BTreeMap::new();
    for pod in &cluster.pods {
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(node_name) || spec.host_network == Some(true) {
            continue;
        }
        let Some(status) = &pod.status else { continue };
        let ips = status.pod_ip.iter().chain(status.pod_ips.iter().flatten().map(|p| &p.ip));
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        for ip in ips.filter_map(|ip| ip.parse::<Ipv4Addr>().ok()) {
            pods.insert(ip, name.clone());
        }
    }
    pods
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cluster::Object;

    #[test]
    fn only_pods_of_this_node_with_their_own_netns() {
        let yaml = r#"
- {metadata: {name: a, namespace: x}, spec: {nodeName: n1, containers: []}, status: {podIP: 10.244.0.2}}
- {metadata: {name: b}, spec: {nodeName: n2, containers: []}, status: {podIP: 10.244.1.2}}
- {metadata: {name: c}, spec: {nodeName: n1, hostNetwork: true, containers: []}, status: {podIP: 192.0.2.1}}
- {metadata: {name: d}, spec: {nodeName: n1, containers: []}}
"#;
        let pods: Vec<k8s_openapi::api::core::v1::Pod> = serde_yaml::from_str(yaml).unwrap();
        let objects: Vec<Object> = pods.into_iter().map(|p| Object::Pod(Arc::new(p))).collect();
        let local = local_pod_ips(&Cluster::from_objects(&objects), "n1");
        assert_eq!(local, [("10.244.0.2".parse().unwrap(), "x/a".to_owned())].into());
    }
}

//! Kubernetes manifests for the agent's `--source dir:PATH`: builders for the
//! objects the agent understands (Namespace, Node, Pod, Service,
//! EndpointSlice) and a directory guard that writes files atomically.
//!
//! Builders return `serde_json::Value`s rather than typed structs so a test
//! can break one on purpose (`svc["spec"]["ports"][0]["port"] = json!(70000)`)
//! before writing it; files are rendered as multi-document YAML.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::tempdir::TempDir;

/// The label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// L4 protocol of a service port, spelled as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One port of a Service (and the matching EndpointSlice port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    /// The ClusterIP's port.
    pub port: u16,
    /// The backends' port (the EndpointSlice's port).
    pub target_port: u16,
    pub protocol: Protocol,
}

impl ServicePort {
    pub fn tcp(name: &str, port: u16, target_port: u16) -> ServicePort {
        ServicePort { name: name.to_owned(), port, target_port, protocol: Protocol::Tcp }
    }

    pub fn udp(name: &str, port: u16, target_port: u16) -> ServicePort {
        ServicePort { name: name.to_owned(), port, target_port, protocol: Protocol::Udp }
    }
}

/// One endpoint of an EndpointSlice: a backend pod's address and conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// `conditions.serving`; omitted when `None` (the API then takes `ready`).
    pub serving: Option<bool>,
    /// `conditions.terminating`; omitted when `None` (not terminating).
    pub terminating: Option<bool>,
    /// The backing pod (targetRef), informational.
    pub pod_name: Option<String>,
    pub node_name: Option<String>,
    /// `hints.forZones`; no `hints` at all when empty.
    pub zone_hints: Vec<String>,
}

impl Endpoint {
    /// A ready endpoint.
    pub fn ready(ip: Ipv4Addr) -> Endpoint {
        Endpoint {
            ip,
            ready: true,
            serving: None,
            terminating: None,
            pod_name: None,
            node_name: None,
            zone_hints: Vec::new(),
        }
    }

    /// An endpoint with `conditions.ready: false` (not a backend).
    pub fn not_ready(ip: Ipv4Addr) -> Endpoint {
        Endpoint { ready: false, ..Endpoint::ready(ip) }
    }

    /// A ready endpoint for a pod on a node (fills targetRef and nodeName).
    pub fn for_pod(ip: Ipv4Addr, pod_name: &str, node_name: &str) -> Endpoint {
        Endpoint {
            pod_name: Some(pod_name.to_owned()),
            node_name: Some(node_name.to_owned()),
            ..Endpoint::ready(ip)
        }
    }

    /// This endpoint while its pod shuts down: `ready: false`,
    /// `terminating: true`, and `serving` as given (whether the pod still
    /// passes its readiness probe).
    pub fn terminating(self, serving: bool) -> Endpoint {
        Endpoint { ready: false, serving: Some(serving), terminating: Some(true), ..self }
    }

    /// This endpoint with topology hints for `zones` (what the EndpointSlice
    /// controller writes for `trafficDistribution: PreferSameZone`).
    pub fn for_zones(self, zones: &[&str]) -> Endpoint {
        Endpoint { zone_hints: zones.iter().map(|z| (*z).to_owned()).collect(), ..self }
    }
}

/// A v1 Namespace.
pub fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name },
    })
}

/// The label that puts a Node in a zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A v1 Node named `name`, in `zone` (its `topology.kubernetes.io/zone`
/// label) when given.
pub fn node(name: &str, zone: Option<&str>) -> Value {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
    });
    if let Some(zone) = zone {
        node["metadata"]["labels"][ZONE_LABEL] = json!(zone);
    }
    node
}

/// A v1 Pod scheduled on `node_name` with `ip` as its (only) address. The
/// agent attaches its programs to the pods whose nodeName is its own.
pub fn pod(namespace: &str, name: &str, node_name: &str, ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": name } },
        "spec": {
            "nodeName": node_name,
            "containers": [ { "name": "app", "image": "weir.invalid/test:latest" } ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [ { "ip": ip.to_string() } ],
        },
    })
}

/// A v1 Service of type ClusterIP. `cluster_ip` is a string so a test can
/// write an invalid one.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[ServicePort]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "port": p.port,
                "targetPort": p.target_port,
                "protocol": p.protocol.as_str(),
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [ cluster_ip ],
            "ports": ports,
        },
    })
}

/// [`service`] of `type: NodePort`, its first port on `node_port`.
pub fn node_port_service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[ServicePort],
    node_port: u16,
) -> Value {
    let mut svc = service(namespace, name, cluster_ip, ports);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(node_port);
    svc
}

/// A discovery.k8s.io/v1 EndpointSlice named `<service>-<suffix>` for
/// `service`, with the service ports' names, target ports and protocols.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    suffix: &str,
    endpoints: &[Endpoint],
    ports: &[ServicePort],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [ e.ip.to_string() ],
                "conditions": { "ready": e.ready },
            });
            if let Some(serving) = e.serving {
                v["conditions"]["serving"] = json!(serving);
            }
            if let Some(terminating) = e.terminating {
                v["conditions"]["terminating"] = json!(terminating);
            }
            if let Some(node) = &e.node_name {
                v["nodeName"] = json!(node);
            }
            if let Some(pod) = &e.pod_name {
                v["targetRef"] = json!({ "kind": "Pod", "namespace": namespace, "name": pod });
            }
            if !e.zone_hints.is_empty() {
                let zones: Vec<Value> = e.zone_hints.iter().map(|z| json!({ "name": z })).collect();
                v["hints"] = json!({ "forZones": zones });
            }
            v
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({ "name": p.name, "port": p.target_port, "protocol": p.protocol.as_str() }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-{suffix}"),
            "namespace": namespace,
            "labels": { SERVICE_NAME_LABEL: service },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// Renders objects as one multi-document YAML text.
pub fn to_yaml(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).context("rendering YAML")?);
    }
    Ok(out)
}

/// The directory the agent watches, removed on drop.
#[derive(Debug)]
pub struct ManifestDir {
    dir: TempDir,
}

impl ManifestDir {
    /// A fresh, empty directory `$TMPDIR/<prefix><pid>-<n>`.
    pub fn new(prefix: &str) -> Result<ManifestDir> {
        Ok(ManifestDir { dir: TempDir::new(prefix)? })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `docs` as multi-document YAML to `file` (e.g. `web.yaml`).
    pub fn write(&self, file: &str, docs: &[Value]) -> Result<()> {
        self.write_raw(file, &to_yaml(docs)?)
    }

    /// Writes `text` verbatim to `file`, atomically: the text goes to a
    /// hidden temporary file (whose name the agent ignores) that is then
    /// renamed over `file`, so the agent never reads half a file.
    pub fn write_raw(&self, file: &str, text: &str) -> Result<()> {
        let target = self.path().join(file);
        let temp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&temp, text).with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(&temp, &target)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), target.display()))
    }

    /// Deletes `file` (the agent must then forget its objects).
    pub fn remove(&self, file: &str) -> Result<()> {
        let target = self.path().join(file);
        std::fs::remove_file(&target).with_context(|| format!("cannot remove {}", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_links_to_service_and_uses_target_ports() {
        let ports = [ServicePort::tcp("http", 80, 8080)];
        let svc = service("default", "web", "10.96.0.10", &ports);
        let slice = endpoint_slice(
            "default",
            "web",
            "abc",
            &[
                Endpoint::ready(Ipv4Addr::new(10, 244, 0, 3)),
                Endpoint::not_ready(Ipv4Addr::new(10, 244, 0, 4)),
                Endpoint::ready(Ipv4Addr::new(10, 244, 0, 5)).terminating(true).for_zones(&["a"]),
            ],
            &ports,
        );
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(slice["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(slice["endpoints"][1]["conditions"].get("serving"), None, "unset unless asked");
        assert_eq!(slice["endpoints"][1].get("hints"), None, "no hints unless asked");
        assert_eq!(slice["endpoints"][2]["hints"], json!({"forZones": [{"name": "a"}]}));
        assert_eq!(node("n1", Some("a"))["metadata"]["labels"][ZONE_LABEL], "a");
        assert_eq!(
            slice["endpoints"][2]["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        let yaml = to_yaml(&[svc, slice]).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 2);
        assert!(yaml.contains("clusterIP: 10.96.0.10"));
    }
}

//! The agent's view of the cluster: the Kubernetes objects Weir acts on, as
//! the last full read of its source delivered them (level-triggered: every
//! reconciliation starts from the whole state, never from single events).

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

/// One Kubernetes object of a kind Weir reads.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
}

/// All objects of the kinds Weir reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
    pub nodes: Vec<Node>,
}

/// The well-known Node label naming the node's zone (`v1.LabelTopologyZone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl Cluster {
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Self {
        let mut cluster = Self::default();
        for object in objects {
            match object {
                Object::Service(o) => cluster.services.push((**o).clone()),
                Object::EndpointSlice(o) => cluster.endpoint_slices.push((**o).clone()),
                Object::Pod(o) => cluster.pods.push((**o).clone()),
                Object::Namespace(o) => cluster.namespaces.push((**o).clone()),
                Object::NetworkPolicy(o) => cluster.network_policies.push((**o).clone()),
                Object::Node(o) => cluster.nodes.push((**o).clone()),
            }
        }
        cluster
    }

    /// The zone of Node `node_name` (its `topology.kubernetes.io/zone`
    /// label): `None` when the Node is unknown or the label is missing or
    /// empty, and then no zone hint can match (kube-proxy ignores zone hints
    /// on a node without the label).
    pub fn zone_of(&self, node_name: &str) -> Option<&str> {
        let node = self.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node_name))?;
        node.metadata.labels.as_ref()?.get(ZONE_LABEL).map(String::as_str).filter(|zone| !zone.is_empty())
    }
}

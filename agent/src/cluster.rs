//! The agent's view of the cluster: the Kubernetes objects Weir acts on, as
//! the last full read of its source delivered them (level-triggered: every
//! reconciliation starts from the whole state, never from single events).
//!
//! Objects are shared (`Arc`) between the source's store and every snapshot:
//! a snapshot of 10,000 Services copies pointers, not Services.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

/// One Kubernetes object of a kind Weir reads.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<Pod>),
    Namespace(Arc<Namespace>),
    NetworkPolicy(Arc<NetworkPolicy>),
    Node(Arc<Node>),
}

/// All objects of the kinds Weir reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub network_policies: Vec<Arc<NetworkPolicy>>,
    pub nodes: Vec<Arc<Node>>,
}

/// Taint the cluster autoscaler puts on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The well-known Node label naming the node's zone (`v1.LabelTopologyZone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl Cluster {
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Self {
        let mut cluster = Self::default();
        for object in objects {
            match object {
                Object::Service(o) => cluster.services.push(o.clone()),
                Object::EndpointSlice(o) => cluster.endpoint_slices.push(o.clone()),
                Object::Pod(o) => cluster.pods.push(o.clone()),
                Object::Namespace(o) => cluster.namespaces.push(o.clone()),
                Object::NetworkPolicy(o) => cluster.network_policies.push(o.clone()),
                Object::Node(o) => cluster.nodes.push(o.clone()),
            }
        }
        cluster
    }

    /// Whether `node_name` may receive traffic from load balancers (what
    /// `/healthz` reports as `nodeEligible`): not when it is being deleted or
    /// tainted for deletion by the cluster autoscaler. `None` when the Node
    /// is unknown.
    pub fn node_eligible(&self, node_name: &str) -> Option<bool> {
        let node = self.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(node_name))?;
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        Some(!deleting && !tainted)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_node(yaml: &str) -> Cluster {
        Cluster { nodes: vec![Arc::new(serde_yaml::from_str(yaml).unwrap())], ..Cluster::default() }
    }

    #[test]
    fn a_node_being_deleted_or_drained_by_the_autoscaler_is_not_eligible() {
        let plain = with_node("metadata: {name: n1}");
        assert_eq!(plain.node_eligible("n1"), Some(true));
        assert_eq!(plain.node_eligible("n2"), None, "unknown node");
        let drained = with_node(
            "metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}",
        );
        assert_eq!(drained.node_eligible("n1"), Some(false));
        let deleting = with_node("metadata: {name: n1, deletionTimestamp: '2026-12-07T20:00:00Z'}");
        assert_eq!(deleting.node_eligible("n1"), Some(false));
    }
}

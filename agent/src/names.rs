//! Names for the numbers the datapath deals in — pod by IP, service by id,
//! labels by identity — published after every reconciliation for whoever
//! turns datapath events into something a person reads (the flow monitor).

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use tokio::sync::watch;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
    /// `key=value`, sorted.
    pub labels: Vec<String>,
    pub node_name: String,
    pub identity: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Names {
    pub node_name: String,
    /// Every pod with an IPv4 address, cluster-wide.
    pub pods: HashMap<Ipv4Addr, PodName>,
    /// Frontend service id → the Service it belongs to.
    pub services: HashMap<u32, ServiceName>,
    /// Identity → `namespace` and `key=value` labels (pod identities), or
    /// `cidr:…` (CIDR identities).
    pub identities: HashMap<u32, Vec<String>>,
}

pub type NamesSender = watch::Sender<Arc<Names>>;
pub type NamesReceiver = watch::Receiver<Arc<Names>>;

pub fn channel() -> (NamesSender, NamesReceiver) {
    watch::channel(Arc::new(Names::default()))
}

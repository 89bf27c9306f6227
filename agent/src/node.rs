//! One node's agent state and what it does with a full read of the cluster:
//! program the load-balancer maps, attach to local pods.

use std::{collections::BTreeMap, net::Ipv4Addr};

use tracing::{info, warn};

use crate::{
    cluster::Cluster,
    datapath::{self, Datapath, attach::Attachments},
    lb::{self, sync::LbState, translate::desired_frontends},
    pods, system,
};

/// The agent's state between events.
pub struct Agent {
    pub node_name: String,
    pub datapath: Datapath,
    pub lb: LbState,
    pub attachments: Attachments,
    /// Local pod IP → `namespace/name`, from the last full read.
    pub local_pods: BTreeMap<Ipv4Addr, String>,
}

impl Agent {
    /// Applies a full read of the cluster: the load-balancer maps, then the
    /// attachments to local pods.
    pub fn apply(&mut self, cluster: &Cluster) {
        let started = std::time::Instant::now();
        let desired = desired_frontends(&cluster.services, &cluster.endpoint_slices);
        let report = self.lb.reconcile(&desired, &mut self.datapath);
        lb::sync::log_errors(&report);
        if report.writes + report.deletes > 0 {
            info!(
                frontends = report.frontends,
                backends = report.backends,
                writes = report.writes,
                deletes = report.deletes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "load-balancer maps updated"
            );
        }
        self.local_pods = pods::local_pod_ips(cluster, &self.node_name);
        self.attach_local_pods(true);
    }

    /// Attaches to every local pod whose interface exists; with `prune`, also
    /// drops links of interfaces that are no local pod's any more.
    pub fn attach_local_pods(&mut self, prune: bool) {
        let routes = match system::RouteTable::read() {
            Ok(routes) => routes,
            Err(err) => return warn!(error = %format!("{err:#}"), "cannot read routes"),
        };
        let mut keep = BTreeMap::new();
        let program = match self.datapath.from_pod_program() {
            Ok(program) => program,
            Err(err) => return warn!(error = %format!("{err:#}"), "program unavailable"),
        };
        for (ip, pod) in &self.local_pods {
            let Some(ifname) = routes.interface_for(*ip) else {
                // The CNI has not plumbed it yet; retried every second.
                continue;
            };
            match self.attachments.ensure(program, &ifname) {
                Ok(()) => {
                    if let Some(index) = datapath::attach::ifindex(&ifname) {
                        keep.insert(ifname, index);
                    }
                }
                Err(err) => {
                    warn!(%pod, interface = %ifname, error = %format!("{err:#}"), "cannot attach")
                }
            }
        }
        if prune && let Err(err) = self.attachments.prune(&keep) {
            warn!(error = %format!("{err:#}"), "cannot prune links");
        }
    }
}

//! One node's agent state and what it does with a full read of the cluster:
//! program the load-balancer and policy maps, attach to local pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::{info, warn};

use crate::{
    cluster::Cluster,
    datapath::{
        self, Datapath,
        attach::{Attachments, Hook},
    },
    lb::{self, sync::LbState, translate::desired_frontends},
    pods,
    policy::{self, sync::PolicyState},
    statefile, system,
};

/// The agent's state between events.
pub struct Agent {
    pub node_name: String,
    pub datapath: Datapath,
    pub lb: LbState,
    pub policy: PolicyState,
    pub attachments: Attachments,
    /// Local pod IP → `namespace/name`, from the last full read.
    pub local_pods: BTreeMap<Ipv4Addr, String>,
    /// The last state file written, to write it only when it changes.
    state_file: String,
}

impl Agent {
    /// Takes over what the maps and links already hold (from an earlier run),
    /// so the first reconciliation only writes differences.
    pub fn adopt(node_name: String, datapath: Datapath) -> anyhow::Result<Self> {
        let lb = datapath.adopt_lb_state()?;
        let policy = datapath.adopt_policy_state()?;
        let (frontends, backends) = lb.len();
        info!(
            root = %datapath.root().display(),
            frontends,
            backends,
            endpoints = policy.endpoints().len(),
            "datapath loaded; adopted pinned state"
        );
        let attachments = Attachments::new(datapath.root())?;
        Ok(Self {
            node_name,
            datapath,
            lb,
            policy,
            attachments,
            local_pods: BTreeMap::new(),
            state_file: String::new(),
        })
    }

    /// Applies a full read of the cluster: the load-balancer maps, the
    /// policy maps, then the attachments to local pods.
    pub fn apply(&mut self, cluster: &Cluster) {
        self.apply_services(cluster);
        self.apply_policy(cluster);
        self.local_pods = pods::local_pod_ips(cluster, &self.node_name);
        self.attach_local_pods(true);
    }

    fn apply_policy(&mut self, cluster: &Cluster) {
        let started = std::time::Instant::now();
        let desired = policy::compute::compute(cluster, &self.node_name);
        let report = self.policy.reconcile(&desired, &mut self.datapath);
        for err in &report.errors {
            warn!(error = %err, full = err.full, "policy map write failed; will retry");
        }
        if report.writes + report.deletes > 0 {
            info!(
                endpoints = desired.endpoints.len(),
                identities = desired.identities.len(),
                writes = report.writes,
                deletes = report.deletes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "policy maps updated"
            );
        }
        let state = statefile::render(&self.node_name, &desired, self.policy.endpoints());
        if state != self.state_file {
            match statefile::write(self.datapath.root(), &state) {
                Ok(()) => self.state_file = state,
                Err(err) => warn!(error = %format!("{err:#}"), "cannot write the state file"),
            }
        }
    }

    fn apply_services(&mut self, cluster: &Cluster) {
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
    }

    /// Attaches to every local pod whose interface exists; with `prune`, also
    /// drops links of interfaces that are no local pod's any more.
    pub fn attach_local_pods(&mut self, prune: bool) {
        let routes = match system::RouteTable::read() {
            Ok(routes) => routes,
            Err(err) => return warn!(error = %format!("{err:#}"), "cannot read routes"),
        };
        let mut keep = BTreeSet::new();
        for (ip, pod) in &self.local_pods {
            let Some(ifname) = routes.interface_for(*ip) else {
                // The CNI has not plumbed it yet; retried every second.
                continue;
            };
            for hook in Hook::ALL {
                let attached = self
                    .datapath
                    .program(hook)
                    .and_then(|program| self.attachments.ensure(hook, program, &ifname));
                if let Err(err) = attached {
                    warn!(%pod, interface = %ifname, error = %format!("{err:#}"), "cannot attach");
                }
            }
            if let Some(index) = datapath::attach::ifindex(&ifname) {
                keep.insert((ifname, index));
            }
        }
        if prune && let Err(err) = self.attachments.prune(&keep) {
            warn!(error = %format!("{err:#}"), "cannot prune links");
        }
    }
}

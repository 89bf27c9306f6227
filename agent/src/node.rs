//! One node's agent state and what it does with a full read of the cluster:
//! program the load-balancer and policy maps, attach to local pods.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use tracing::{info, warn};

use crate::{
    cluster::Cluster,
    datapath::{
        self, Datapath,
        attach::{Attachments, Hook},
        conntrack::{StaleUdpBackend, flush_stale_udp},
    },
    lb::{self, sync::LbState, translate::desired_frontends_on},
    names::{self, Names, NamesReceiver, NamesSender, PodName, ServiceName},
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
    /// Names for the flow monitor, republished after every apply.
    names: NamesSender,
    /// UDP backends per frontend as last applied, to end the flows of
    /// backends that leave.
    udp_backends: HashMap<(u32, u16), HashSet<(u32, u16)>>,
    /// The hairpin source address (network order), as configured.
    hairpin_be: u32,
    /// The node's devices (name, address) as last seen.
    devices: Vec<(String, Ipv4Addr)>,
    /// `--lb-algorithm maglev`.
    maglev_by_default: bool,
    /// `--lb-acceleration`: XDP on the node's devices, or tc only.
    pub acceleration: Acceleration,
    /// `--devices`: the devices that carry north-south traffic (and whose
    /// addresses serve NodePorts); empty means every device with an address.
    pub device_names: Vec<String>,
    /// Serve NodePorts on 127.0.0.1 too (kube-proxy's localhost NodePorts):
    /// only node processes reach that address, through the socket LB.
    pub localhost_node_ports: bool,
    /// Devices where native XDP failed, warned about once.
    xdp_unsupported: BTreeSet<String>,
}

/// Where north-south traffic is handled (Cilium's `--bpf-lb-acceleration`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Acceleration {
    /// Native XDP on every device whose driver supports it, tc elsewhere.
    #[default]
    BestEffort,
    /// Native XDP on every device; a device without it is reported on every
    /// attach attempt (tc still serves it).
    Native,
    /// tc only.
    Disabled,
}

/// Backend selection defaults (`--lb-algorithm`, `--maglev-table-size`).
#[derive(Clone, Copy, Debug)]
pub struct MaglevOptions {
    pub by_default: bool,
    pub table_size: u32,
}

impl Agent {
    /// Takes over what the maps and links already hold (from an earlier run),
    /// so the first reconciliation only writes differences.
    pub fn adopt(
        node_name: String,
        datapath: Datapath,
        hairpin: Ipv4Addr,
        maglev: MaglevOptions,
    ) -> anyhow::Result<Self> {
        let mut lb = datapath.adopt_lb_state()?;
        lb.set_maglev_table_size(maglev.table_size);
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
            names: names::channel().0,
            udp_backends: HashMap::new(),
            hairpin_be: u32::from_ne_bytes(hairpin.octets()),
            devices: Vec::new(),
            maglev_by_default: maglev.by_default,
            acceleration: Acceleration::default(),
            device_names: Vec::new(),
            localhost_node_ports: false,
            xdp_unsupported: BTreeSet::new(),
        })
    }

    /// Follows the names of pods, services and identities as they change.
    pub fn names(&self) -> NamesReceiver {
        self.names.subscribe()
    }

    /// Applies a full read of the cluster: the load-balancer maps, the
    /// policy maps, then the attachments to local pods.
    /// Returns the map writes that failed, as (map, full), for the metrics.
    pub fn apply(&mut self, cluster: &Cluster) -> Vec<(&'static str, bool)> {
        let mut devices = system::local_devices();
        if !self.device_names.is_empty() {
            devices.retain(|(name, _)| self.device_names.contains(name));
        }
        let addresses: Vec<Ipv4Addr> = devices.iter().map(|(_, ip)| *ip).collect();
        let mut failed = Vec::new();
        let mut frontend_addresses = addresses.clone();
        if self.localhost_node_ports {
            frontend_addresses.push(Ipv4Addr::LOCALHOST);
        }
        let services = self.apply_services(cluster, &frontend_addresses, &mut failed);
        let (identities, by_ip) = self.apply_policy(cluster, &addresses, &mut failed);
        self.devices = devices;
        self.publish_names(cluster, services, identities, &by_ip);
        self.local_pods = pods::local_pod_ips(cluster, &self.node_name);
        self.attach_local_pods(true);
        failed
    }

    fn publish_names(
        &mut self,
        cluster: &Cluster,
        services: HashMap<u32, ServiceName>,
        identities: HashMap<u32, Vec<String>>,
        identity_by_ip: &HashMap<Ipv4Addr, u32>,
    ) {
        let mut pods = HashMap::new();
        for pod in &cluster.pods {
            let Some(ip) = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let labels: Vec<String> =
                pod.metadata.labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
            let identity = identity_by_ip.get(&ip).copied().unwrap_or(0);
            pods.insert(
                ip,
                PodName {
                    namespace,
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    labels,
                    node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                    identity,
                },
            );
        }
        let names = Names { node_name: self.node_name.clone(), pods, services, identities };
        self.names.send_replace(Arc::new(names));
    }

    /// Returns identity → `[namespace, key=value…]` (or `[cidr:…]`), and
    /// the identity of each pod IP.
    fn apply_policy(
        &mut self,
        cluster: &Cluster,
        host_addresses: &[Ipv4Addr],
        failed: &mut Vec<(&'static str, bool)>,
    ) -> (HashMap<u32, Vec<String>>, HashMap<Ipv4Addr, u32>) {
        let started = std::time::Instant::now();
        let desired = policy::compute::compute(cluster, &self.node_name, host_addresses);
        let report = self.policy.reconcile(&desired, &mut self.datapath);
        for err in &report.errors {
            warn!(error = %err, full = err.full, "policy map write failed; will retry");
            failed.push((err.map, err.full));
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
        let mut identities: HashMap<u32, Vec<String>> = desired
            .identities
            .iter()
            .map(|(id, key)| {
                let labels = key.labels.iter().map(|(k, v)| format!("{k}={v}"));
                (*id, std::iter::once(key.namespace.clone()).chain(labels).collect())
            })
            .collect();
        identities
            .extend(desired.cidr_identities.iter().map(|(id, cidr)| (*id, vec![format!("cidr:{cidr}")])));
        let by_ip = desired
            .ipcache
            .iter()
            .filter(|(prefix, _)| prefix.prefix() == 32)
            .map(|(prefix, id)| (prefix.ip(), *id))
            .collect();
        (identities, by_ip)
    }

    /// Ends the UDP flows of backends that left their frontend. (TCP flows
    /// keep their backend until they close, as with kube-proxy.)
    fn flush_stale_udp(&mut self, desired: &lb::translate::Desired) {
        let be = |addr: Ipv4Addr, port: u16| (u32::from_ne_bytes(addr.octets()), port.to_be());
        // By address and port: the two scopes of one frontend (its
        // external entry and its internal twin) pool their backends.
        let mut current: HashMap<(u32, u16), HashSet<(u32, u16)>> = HashMap::new();
        for (f, spec) in desired.iter().filter(|(f, _)| f.proto == weir_abi::proto::UDP) {
            current
                .entry(be(f.address, f.port))
                .or_default()
                .extend(spec.backends.iter().map(|b| be(b.address, b.port)));
        }
        let mut stale = HashSet::new();
        for (frontend, before) in &self.udp_backends {
            let now = current.get(frontend);
            for backend in before {
                if now.is_none_or(|n| !n.contains(backend)) {
                    stale.insert(StaleUdpBackend { frontend_be: *frontend, backend_be: *backend });
                }
            }
        }
        self.udp_backends = current;
        if !stale.is_empty() {
            let deleted = flush_stale_udp(self.datapath.conntrack_mut(), &stale, self.hairpin_be);
            info!(backends = stale.len(), entries = deleted, "ended UDP flows to removed backends");
            // The node's own connected UDP sockets (socket LB) are pinned to
            // their backend in the socket itself, not in conntrack.
            match datapath::sockets::destroy_stale_udp(self.datapath.sock_revnat(), &stale) {
                Ok(0) => {}
                Ok(sockets) => info!(sockets, "destroyed node UDP sockets connected to removed backends"),
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "cannot end node UDP sockets of removed backends")
                }
            }
        }
    }

    /// Returns service id → Service name.
    fn apply_services(
        &mut self,
        cluster: &Cluster,
        node_addresses: &[Ipv4Addr],
        failed: &mut Vec<(&'static str, bool)>,
    ) -> HashMap<u32, ServiceName> {
        let started = std::time::Instant::now();
        let desired = desired_frontends_on(
            &cluster.services,
            &cluster.endpoint_slices,
            Some(&self.node_name),
            cluster.zone_of(&self.node_name),
            node_addresses,
            self.maglev_by_default,
        );
        let report = self.lb.reconcile(&desired, &mut self.datapath);
        lb::sync::log_errors(&report);
        failed.extend(report.errors.iter().map(|(_, err)| (err.map, err.full)));
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
        self.flush_stale_udp(&desired);
        desired
            .iter()
            .filter_map(|(frontend, spec)| {
                let (namespace, name) = spec.service.split_once('/')?;
                let id = self.lb.service_id(frontend)?;
                Some((id, ServiceName { namespace: namespace.to_owned(), name: name.to_owned() }))
            })
            .collect()
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
            for hook in Hook::POD {
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
        // The node's devices: north-south traffic, and the SNAT addresses.
        let mut device_map = BTreeMap::new();
        // Loopback carries the node's traffic to itself, never north-south:
        // it may hold node addresses, but it gets no program.
        for (ifname, address) in self.devices.iter().filter(|(name, _)| name != "lo") {
            let Some(index) = datapath::attach::ifindex(ifname) else { continue };
            // Kept whatever the attach's outcome: prune must not remove the
            // XDP link of a device whose tc attach failed.
            keep.insert((ifname.clone(), index));
            let attached = self
                .datapath
                .program(Hook::FromNetdev)
                .and_then(|program| self.attachments.ensure(Hook::FromNetdev, program, ifname));
            match attached {
                Ok(()) => {
                    device_map.entry(index).or_insert(*address);
                }
                Err(err) => warn!(device = %ifname, error = %format!("{err:#}"), "cannot attach"),
            }
            if self.acceleration == Acceleration::Disabled {
                self.attachments.remove_xdp(ifname);
                continue;
            }
            let accelerated = self
                .datapath
                .xdp_program()
                .and_then(|program| self.attachments.ensure(Hook::XdpFromNetdev, program, ifname));
            match accelerated {
                Ok(()) => {}
                // best-effort: say it once per device, tc serves it.
                Err(err)
                    if self.acceleration == Acceleration::Native
                        || self.xdp_unsupported.insert(ifname.clone()) =>
                {
                    warn!(device = %ifname, error = %format!("{err:#}"), "no native XDP; north-south traffic handled by tc")
                }
                Err(_) => {}
            }
        }
        if let Err(err) = self.datapath.set_devices(&device_map) {
            warn!(error = %format!("{err:#}"), "cannot write the devices map");
        }
        if prune && let Err(err) = self.attachments.prune(&keep) {
            warn!(error = %format!("{err:#}"), "cannot prune links");
        }
    }
}

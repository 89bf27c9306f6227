//! The model of the Kubernetes network-policy conformance suite
//! (`test/e2e/network/netpol` upstream), on one Weir node.
//!
//! - Namespaces `x`, `y`, `z`, each labelled `ns: <name>` (the agent adds
//!   the automatic `kubernetes.io/metadata.name: <name>` itself, as the API
//!   server would; the manifests deliberately leave it out).
//! - Pods `a`, `b`, `c` in each, labelled `pod: <name>`, all on the one node
//!   the agent runs for. Each declares one container per port and protocol,
//!   as upstream does: container `cont-80-tcp` with port `serve-80-tcp`
//!   (80/TCP), and so on for 80, 81 × TCP, UDP, SCTP, so named ports can be
//!   tested. Every pod serves TCP and UDP on 80 and 81 (the harness servers,
//!   which answer with the pod's name); this kernel has no SCTP sockets, so
//!   SCTP is tested with crafted packets (see [`sctp_init_frame`]).
//! - A probe is one new connection (TCP: connect, send a line, read the
//!   answer; UDP: one datagram and its answer) from one pod to another pod's
//!   IP. Every pod is probed from every pod (9 × 9), all probes of a matrix in
//!   parallel, each in its own thread inside the client pod's namespace, with
//!   a short timeout: a denied probe is one whose first packet is dropped, so
//!   it times out. The observed matrix is compared with an expectation that
//!   the test writes from the NetworkPolicy API documentation (never derived
//!   from what Weir does), and a mismatch prints both matrices and the cells
//!   that differ.
//! - Traffic from a pod to itself (its own IP) never leaves the pod's network
//!   namespace, so no datapath sees it: it is always allowed, whatever the
//!   policies (upstream's suite expects the same). [`Reachability`] builds
//!   that in: its diagonal is always "allowed".
//! - Optional "external" hosts: network namespaces wired to the node like a
//!   pod (a veth, a static route) but unknown to the cluster (no Pod object),
//!   with addresses outside the pod CIDR, e.g. in TEST-NET-3 (203.0.113.0/24),
//!   for `ipBlock`. They serve TCP and UDP on 80 and 81 too.
//!
//! Synchronisation: the agent rescans the manifest directory every 100 ms and
//! rereads every file that changed. [`NetpolBed::sync`] writes a last file,
//! `sync.yaml`, holding a pod (no IP, on no node) with a label
//! `weir-sync-generation: N`, and waits until identity N shows in
//! `weir identity list`: the agent writes that list (its state file) after
//! it has written the maps, and a scan that sees `sync.yaml` sees every file
//! written before it, so from then on the datapath enforces what the
//! directory says. The sentinel pod is in its own namespace with no address:
//! it adds one identity and never takes part in a probe.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{Cli, wait_for, wait_until};
use crate::fixture::{AGENT_TIMEOUT, TestBed};
use crate::servers::{TcpMode, TcpServer, UdpServer};
use crate::topology::Pod;

/// The model's namespaces.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods in each namespace.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// The ports every pod serves (TCP and UDP).
pub const PORTS: [u16; 2] = [80, 81];

/// How long a probe waits for its first packet to be answered (TCP connect,
/// UDP reply) before calling it denied.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// Timeout of a retried probe (see [`NetpolBed::check`]).
const RETRY_TIMEOUT: Duration = Duration::from_millis(1500);
/// How many times a mismatched cell is probed again before it counts.
const RETRIES: usize = 2;
/// Once connected, how long a TCP probe waits for the server's answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// The deadline the issue sets for label and policy changes to apply to new
/// connections.
pub const CHANGE_DEADLINE: Duration = Duration::from_millis(500);
/// [`NetpolBed::time_to_flip`]: a probe starts every this often ...
const FLIP_PROBE_INTERVAL: Duration = Duration::from_millis(25);
/// ... for this long after the change ...
const FLIP_WINDOW: Duration = Duration::from_millis(1200);
/// ... and each waits this long.
const FLIP_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// UDP probes bind explicit, never reused source ports (per client) below the
/// kernel's ephemeral range: a reused 5-tuple would hit the conntrack entry
/// of an earlier probe, whose verdict Weir keeps on purpose.
const UDP_SOURCE_PORTS: std::ops::Range<u32> = 20000..32000;

/// A manifest file for whatever else a case needs (e.g. Services); removed
/// by [`NetpolBed::reset`].
pub const EXTRA_FILE: &str = "extra.yaml";

/// The key of the node's own UDP source ports (see [`NetpolBed::probe_from_node`]).
const NODE_CLIENT: &str = "(node)";

/// The label of the sentinel pod [`NetpolBed::sync`] writes.
const SYNC_LABEL: &str = "weir-sync-generation";

/// L4 protocol of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// What to probe: a protocol and a destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub protocol: Protocol,
    pub port: u16,
}

impl Probe {
    pub const fn tcp(port: u16) -> Probe {
        Probe { protocol: Protocol::Tcp, port }
    }

    pub const fn udp(port: u16) -> Probe {
        Probe { protocol: Protocol::Udp, port }
    }

    /// TCP and UDP on 80 and 81.
    pub fn all() -> [Probe; 4] {
        [Probe::tcp(80), Probe::tcp(81), Probe::udp(80), Probe::udp(81)]
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        write!(f, "{proto}/{}", self.port)
    }
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the right server.
    Allowed,
    /// No answer within the timeout: the first packet was dropped.
    Denied,
    /// Anything else (refused, a wrong answer, a local error): never
    /// matches an expectation.
    Error(String),
}

impl Outcome {
    fn symbol(&self) -> char {
        match self {
            Outcome::Allowed => '.',
            Outcome::Denied => 'X',
            Outcome::Error(_) => '?',
        }
    }

    fn matches(&self, allowed: bool) -> bool {
        matches!((self, allowed), (Outcome::Allowed, true) | (Outcome::Denied, false))
    }
}

/// The model's pod names, `x/a` … `z/c`, in matrix order.
pub fn pod_names() -> Vec<String> {
    NAMESPACES.iter().flat_map(|ns| POD_NAMES.iter().map(move |p| format!("{ns}/{p}"))).collect()
}

/// The namespace of a pod name `ns/pod` (`""` for an external host).
pub fn ns_of(name: &str) -> &str {
    name.split_once('/').map_or("", |(ns, _)| ns)
}

/// The pod part of a pod name `ns/pod` (`""` for an external host).
pub fn pod_of(name: &str) -> &str {
    name.split_once('/').map_or("", |(_, pod)| pod)
}

/// An expected reachability matrix: for each client (row) and server
/// (column), whether a new connection is allowed. Rows and columns are host
/// names: `x/a` for pods, the address for external hosts. A host reaching
/// itself is always allowed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    rows: Vec<String>,
    cols: Vec<String>,
    cells: Vec<bool>,
}

impl Reachability {
    /// The 9 × 9 pod matrix with every cell `allowed`.
    pub fn pods(allowed: bool) -> Reachability {
        let names = pod_names();
        Reachability::new(&names, &names, allowed)
    }

    /// A matrix over any clients and servers.
    pub fn new(rows: &[String], cols: &[String], allowed: bool) -> Reachability {
        Reachability {
            rows: rows.to_vec(),
            cols: cols.to_vec(),
            cells: vec![allowed; rows.len() * cols.len()],
        }
    }

    pub fn rows(&self) -> &[String] {
        &self.rows
    }

    pub fn cols(&self) -> &[String] {
        &self.cols
    }

    fn index(&self, from: &str, to: &str) -> usize {
        let r = self.rows.iter().position(|n| n == from).unwrap_or_else(|| panic!("no client {from}"));
        let c = self.cols.iter().position(|n| n == to).unwrap_or_else(|| panic!("no server {to}"));
        r * self.cols.len() + c
    }

    /// Whether `from` may open a connection to `to`.
    pub fn get(&self, from: &str, to: &str) -> bool {
        from == to || self.cells[self.index(from, to)]
    }

    /// One cell.
    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        let i = self.index(from, to);
        self.cells[i] = allowed;
        self
    }

    /// Every cell for which `which(from, to)` holds.
    pub fn expect_where(&mut self, which: impl Fn(&str, &str) -> bool, allowed: bool) -> &mut Self {
        for (r, from) in self.rows.iter().enumerate() {
            for (c, to) in self.cols.iter().enumerate() {
                if which(from, to) {
                    self.cells[r * self.cols.len() + c] = allowed;
                }
            }
        }
        self
    }

    /// Every connection *to* `to` (its ingress).
    pub fn expect_ingress(&mut self, to: &str, allowed: bool) -> &mut Self {
        self.expect_where(|_, t| t == to, allowed)
    }

    /// Every connection *from* `from` (its egress).
    pub fn expect_egress(&mut self, from: &str, allowed: bool) -> &mut Self {
        self.expect_where(|f, _| f == from, allowed)
    }

    /// Renders a matrix of symbols, one per cell, with row and column names.
    fn render(&self, cell: impl Fn(usize, usize) -> String) -> String {
        let width = self.cols.iter().chain(&self.rows).map(String::len).max().unwrap_or(3).max(3) + 1;
        let mut out = format!("{:width$}", "");
        for c in &self.cols {
            let _ = write!(out, "{c:>width$}");
        }
        out.push('\n');
        for (r, row) in self.rows.iter().enumerate() {
            let _ = write!(out, "{row:width$}");
            for c in 0..self.cols.len() {
                let _ = write!(out, "{:>width$}", cell(r, c));
            }
            out.push('\n');
        }
        out
    }
}

/// A host of the model: a pod (or an external host) with its servers'
/// answer, and the harness guard of its namespace.
#[derive(Debug)]
pub struct Host {
    /// `x/a`, or the address of an external host.
    pub name: String,
    /// What its servers answer (the harness pod name, `x-a`).
    pub reply: String,
    pub pod: Pod,
}

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip()
    }

    fn netns_path(&self) -> PathBuf {
        self.pod.netns().path()
    }
}

/// Removes the agent's state directory (`/run/weir/<bpffs root name>`), which
/// the agent guard leaves behind.
#[derive(Debug)]
struct RunStateDir(PathBuf);

impl Drop for RunStateDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("weir-tests: cannot remove {}: {e}", self.0.display()),
        }
    }
}

/// The model on one node with its agent: 9 pods in x, y, z, their servers,
/// optional external hosts, and the manifests that describe them.
///
/// Fields drop in order: servers, hosts, then the test bed (agent, manifest
/// directory, node), then the agent's state directory.
#[derive(Debug)]
pub struct NetpolBed {
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
    externals: Vec<Host>,
    pods: Vec<Host>,
    bed: TestBed,
    _state_dir: RunStateDir,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    extra_ports: BTreeMap<String, Vec<(String, u16, String)>>,
    generation: u32,
    udp_ports: BTreeMap<String, AtomicU32>,
}

/// `{"matchLabels": {k: v, ...}}`.
pub fn match_labels(pairs: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> =
        pairs.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect();
    json!({ "matchLabels": labels })
}

/// A networking.k8s.io/v1 NetworkPolicy.
pub fn network_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })
}

fn labels_value(labels: &BTreeMap<String, String>) -> Value {
    Value::Object(labels.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect())
}

fn default_pod_labels(name: &str) -> BTreeMap<String, String> {
    [("pod".to_owned(), pod_of(name).to_owned())].into()
}

fn default_ns_labels(ns: &str) -> BTreeMap<String, String> {
    [("ns".to_owned(), ns.to_owned())].into()
}

/// `weir policy get -o json` row: one local endpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyEndpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub endpoint_id: u32,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<PolicyEntry>,
    pub drops: Vec<PolicyDrop>,
}

/// One allow entry of an endpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyEntry {
    pub direction: String,
    pub identity: u32,
    pub labels: String,
    pub protocol: String,
    pub port_first: Option<u16>,
    pub port_last: Option<u16>,
    pub rule: String,
}

/// Drops counted against an endpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyDrop {
    pub code: u32,
    pub reason: String,
    pub packets: u64,
}

/// `weir ipcache list -o json` row.
#[derive(Debug, Clone, Deserialize)]
pub struct IpcacheRow {
    pub prefix: String,
    pub identity: u32,
    pub labels: String,
}

/// `weir identity list -o json` row.
#[derive(Debug, Clone, Deserialize)]
pub struct IdentityRow {
    pub identity: u32,
    pub labels: String,
}

impl NetpolBed {
    /// The model without external hosts.
    pub fn new() -> Result<NetpolBed> {
        NetpolBed::with_externals(&[])
    }

    /// The model plus one external host per address (which must be outside
    /// 10.244.0.0/16 and the service CIDR).
    pub fn with_externals(externals: &[Ipv4Addr]) -> Result<NetpolBed> {
        let bed = TestBed::new()?;
        let state_dir = RunStateDir(
            PathBuf::from("/run/weir").join(bed.agent().bpffs_root().file_name().unwrap_or_default()),
        );
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, name) in POD_NAMES.iter().enumerate() {
                let ip = Ipv4Addr::new(10, 244, 1 + i as u8, 10 + j as u8);
                let pod = bed.node().add_pod(&format!("{ns}-{name}"), ip)?;
                pods.push(Host { name: format!("{ns}/{name}"), reply: pod.name().to_owned(), pod });
            }
        }
        let mut hosts = Vec::new();
        for ip in externals {
            let pod = bed.node().add_pod(&format!("ext-{}", ip.octets()[3]), *ip)?;
            hosts.push(Host { name: ip.to_string(), reply: pod.name().to_owned(), pod });
        }
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for host in pods.iter().chain(&hosts) {
            for port in PORTS {
                tcp.push(TcpServer::start(&host.pod, port, TcpMode::Lines)?);
                udp.push(UdpServer::start(&host.pod, port)?);
            }
        }
        let udp_ports = pods
            .iter()
            .chain(&hosts)
            .map(|h| h.name.clone())
            .chain([NODE_CLIENT.to_owned()])
            .map(|name| (name, AtomicU32::new(UDP_SOURCE_PORTS.start)))
            .collect();
        let pod_labels = pod_names().iter().map(|n| (n.clone(), default_pod_labels(n))).collect();
        let ns_labels = NAMESPACES.iter().map(|ns| ((*ns).to_owned(), default_ns_labels(ns))).collect();

        let mut model = NetpolBed {
            _tcp: tcp,
            _udp: udp,
            externals: hosts,
            pods,
            bed,
            _state_dir: state_dir,
            pod_labels,
            ns_labels,
            extra_ports: BTreeMap::new(),
            generation: 0,
            udp_ports,
        };
        model.write_namespaces()?;
        model.write_pods()?;
        model.sync()?;
        model.wait_for_links()?;
        let cli = model.cli().clone();
        wait_until(AGENT_TIMEOUT, "9 endpoints in `weir policy get`", || {
            Ok(policy_get(&cli, None)?.len() == 9)
        })?;
        // Attaching retries every second: wait until every pod answers.
        let all = Reachability::pods(true);
        wait_for(AGENT_TIMEOUT, "every pod to reach every pod", || {
            Ok(model.mismatches(&all, Probe::tcp(80), PROBE_TIMEOUT).is_empty().then_some(()))
        })?;
        Ok(model)
    }

    /// Waits until the agent has pinned both links (`from-pod:<ifindex>:<ifname>`,
    /// `to-pod:…`) of every pod of the model.
    fn wait_for_links(&mut self) -> Result<()> {
        let dir = self.bed.agent().bpffs_root().join("links");
        let wanted: Vec<String> = self
            .pods
            .iter()
            .flat_map(|h| ["from-pod", "to-pod"].map(|hook| format!("{hook}:{}", h.pod.host_interface())))
            .collect();
        let agent = self.bed.agent_mut();
        wait_until(AGENT_TIMEOUT, "a from-pod and a to-pod link pinned for every pod", || {
            agent.ensure_running()?;
            let pins: Vec<String> =
                std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
            Ok(wanted.iter().all(|w| {
                let (hook, ifname) = w.split_once(':').unwrap_or_default();
                pins.iter().any(|p| p.starts_with(&format!("{hook}:")) && p.ends_with(&format!(":{ifname}")))
            }))
        })
    }

    pub fn test_bed(&self) -> &TestBed {
        &self.bed
    }

    pub fn cli(&self) -> &Cli {
        self.bed.cli()
    }

    /// A pod (`x/a`) or an external host (its address).
    pub fn host(&self, name: &str) -> &Host {
        self.pods
            .iter()
            .chain(&self.externals)
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the model"))
    }

    /// The names of the external hosts.
    pub fn external_names(&self) -> Vec<String> {
        self.externals.iter().map(|h| h.name.clone()).collect()
    }

    fn write_namespaces(&self) -> Result<()> {
        let docs: Vec<Value> = self
            .ns_labels
            .iter()
            .map(|(ns, labels)| {
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": { "name": ns, "labels": labels_value(labels) },
                })
            })
            .collect();
        self.bed.manifests().write("namespaces.yaml", &docs)
    }

    fn write_pods(&self) -> Result<()> {
        let node = self.bed.node().name();
        let docs: Vec<Value> = self
            .pods
            .iter()
            .map(|host| {
                let containers: Vec<Value> = PORTS
                    .iter()
                    .flat_map(|port| {
                        ["tcp", "udp", "sctp"].map(|proto| {
                            json!({
                                "name": format!("cont-{port}-{proto}"),
                                "image": "weir.invalid/agnhost:latest",
                                "ports": [{
                                    "name": format!("serve-{port}-{proto}"),
                                    "containerPort": port,
                                    "protocol": proto.to_uppercase(),
                                }],
                            })
                        })
                    })
                    .chain(self.extra_ports.get(&host.name).map(|ports| {
                        let ports: Vec<Value> = ports
                            .iter()
                            .map(|(name, port, proto)| {
                                json!({ "name": name, "containerPort": port, "protocol": proto })
                            })
                            .collect();
                        json!({ "name": "extra", "image": "weir.invalid/agnhost:latest", "ports": ports })
                    }))
                    .collect();
                json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_of(&host.name),
                        "namespace": ns_of(&host.name),
                        "labels": labels_value(&self.pod_labels[&host.name]),
                    },
                    "spec": { "nodeName": node, "containers": containers },
                    "status": {
                        "phase": "Running",
                        "podIP": host.ip().to_string(),
                        "podIPs": [{ "ip": host.ip().to_string() }],
                    },
                })
            })
            .collect();
        self.bed.manifests().write("pods.yaml", &docs)
    }

    /// Replaces a pod's labels (not applied until [`NetpolBed::sync`]).
    pub fn set_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) -> Result<()> {
        let entry = self.pod_labels.get_mut(pod).with_context(|| format!("no pod {pod}"))?;
        *entry = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.write_pods()
    }

    /// Declares extra named container ports on a pod, `(name, port,
    /// protocol)`, in one more container (not applied until
    /// [`NetpolBed::sync`]); the ports need not be served.
    pub fn set_extra_ports(&mut self, pod: &str, ports: &[(&str, u16, &str)]) -> Result<()> {
        ensure!(self.pod_labels.contains_key(pod), "no pod {pod}");
        let ports = ports.iter().map(|(n, p, proto)| ((*n).to_owned(), *p, (*proto).to_owned())).collect();
        self.extra_ports.insert(pod.to_owned(), ports);
        self.write_pods()
    }

    /// Replaces a namespace's labels (not applied until [`NetpolBed::sync`]).
    /// The agent adds `kubernetes.io/metadata.name` by itself.
    pub fn set_namespace_labels(&mut self, ns: &str, labels: &[(&str, &str)]) -> Result<()> {
        let entry = self.ns_labels.get_mut(ns).with_context(|| format!("no namespace {ns}"))?;
        *entry = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.write_namespaces()
    }

    /// Writes `policies.yaml` with these NetworkPolicies (removes it when
    /// there are none); not applied until [`NetpolBed::sync`].
    pub fn write_policies(&self, policies: &[Value]) -> Result<()> {
        let path = self.bed.manifests().path().join("policies.yaml");
        if policies.is_empty() {
            if path.exists() {
                self.bed.manifests().remove("policies.yaml")?;
            }
            Ok(())
        } else {
            self.bed.manifests().write("policies.yaml", policies)
        }
    }

    /// Replaces the policies and waits until the datapath enforces them.
    pub fn set_policies(&mut self, policies: &[Value]) -> Result<()> {
        self.write_policies(policies)?;
        self.sync()
    }

    /// Back to the model's initial state: default labels, no policy.
    pub fn reset(&mut self) -> Result<()> {
        self.pod_labels = pod_names().iter().map(|n| (n.clone(), default_pod_labels(n))).collect();
        self.ns_labels = NAMESPACES.iter().map(|ns| ((*ns).to_owned(), default_ns_labels(ns))).collect();
        self.extra_ports.clear();
        self.write_pods()?;
        self.write_namespaces()?;
        self.write_policies(&[])?;
        if self.bed.manifests().path().join(EXTRA_FILE).exists() {
            self.bed.manifests().remove(EXTRA_FILE)?;
        }
        self.sync()
    }

    /// Waits until the agent has applied every manifest written so far (see
    /// the module documentation).
    pub fn sync(&mut self) -> Result<()> {
        self.generation += 1;
        let generation = self.generation;
        let sentinel = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "sync",
                "namespace": "weir-sync",
                "labels": { SYNC_LABEL: generation.to_string() },
            },
            "spec": {
                "nodeName": "weir-sync-nowhere",
                "containers": [{ "name": "c", "image": "weir.invalid/none:latest" }],
            },
        });
        self.bed.manifests().write("sync.yaml", &[sentinel])?;
        let want = format!("k8s:{SYNC_LABEL}={generation}");
        let cli = self.cli().clone();
        wait_until(AGENT_TIMEOUT, &format!("generation {generation} in `weir identity list`"), || {
            let rows: Vec<IdentityRow> = cli.json(&["identity", "list"])?;
            Ok(rows.iter().any(|r| r.labels.split(',').any(|l| l == want)))
        })
    }

    /// The next unused UDP source port of `client`.
    fn udp_source_port(&self, client: &str) -> u16 {
        let n = self.udp_ports[client].fetch_add(1, Ordering::Relaxed);
        let span = UDP_SOURCE_PORTS.end - UDP_SOURCE_PORTS.start;
        (UDP_SOURCE_PORTS.start + (n - UDP_SOURCE_PORTS.start) % span) as u16
    }

    /// Runs probes, all at once, and returns their outcomes in order.
    pub fn probe_all(&self, probes: &[(&str, &str, Probe)], timeout: Duration) -> Vec<Outcome> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = probes
                .iter()
                .map(|(from, to, probe)| {
                    let client = self.host(from);
                    let server = self.host(to);
                    let src_port = self.udp_source_port(from);
                    scope.spawn(move || probe_from(client, server, *probe, src_port, timeout))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Outcome::Error("probe thread panicked".into())))
                .collect()
        })
    }

    /// Probes one connection from the node's own network namespace (the
    /// pods' local node) to `to`, with the node's source address selection.
    pub fn probe_from_node(&self, to: &str, probe: Probe) -> Outcome {
        let server = self.host(to);
        let node = self.bed.node().netns().path();
        let src_port = self.udp_source_port(NODE_CLIENT);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Err(e) = crate::netns::enter(&node) {
                        return Outcome::Error(format!("{e:#}"));
                    }
                    probe_to(server, probe, src_port, PROBE_TIMEOUT)
                })
                .join()
                .unwrap_or_else(|_| Outcome::Error("probe thread panicked".into()))
        })
    }

    /// Probes one connection.
    pub fn probe(&self, from: &str, to: &str, probe: Probe) -> Outcome {
        self.probe_all(&[(from, to, probe)], PROBE_TIMEOUT).remove(0)
    }

    /// The cells of `expected` that a probe contradicts (one round).
    fn mismatches(&self, expected: &Reachability, probe: Probe, timeout: Duration) -> Vec<(String, String)> {
        let cells: Vec<(&str, &str, Probe)> = expected
            .rows
            .iter()
            .flat_map(|r| expected.cols.iter().map(move |c| (r.as_str(), c.as_str(), probe)))
            .collect();
        let outcomes = self.probe_all(&cells, timeout);
        cells
            .iter()
            .zip(outcomes)
            .filter(|((r, c, _), o)| !o.matches(expected.get(r, c)))
            .map(|((r, c, _), _)| ((*r).to_owned(), (*c).to_owned()))
            .collect()
    }

    /// Probes the full matrix of every expectation (all at once) and
    /// compares. A cell that does not match is probed again (up to twice,
    /// with a longer timeout) before it counts, so that a slow machine does
    /// not turn an allowed connection into a "denied" one; a cell expected
    /// denied but allowed never changes on retry. The error shows, per
    /// probe, the expected and observed matrices and the differing cells,
    /// followed by `weir policy get`.
    pub fn check(&self, expectations: &[(Probe, &Reachability)]) -> Result<()> {
        let cells: Vec<(usize, &str, &str, Probe)> = expectations
            .iter()
            .enumerate()
            .flat_map(|(k, (probe, reach))| {
                reach
                    .rows
                    .iter()
                    .flat_map(move |r| reach.cols.iter().map(move |c| (k, r.as_str(), c.as_str(), *probe)))
            })
            .collect();
        let jobs: Vec<(&str, &str, Probe)> = cells.iter().map(|(_, r, c, p)| (*r, *c, *p)).collect();
        let mut outcomes = self.probe_all(&jobs, PROBE_TIMEOUT);
        let wrong = |outcomes: &[Outcome]| -> Vec<usize> {
            (0..cells.len())
                .filter(|&i| {
                    let (k, r, c, _) = cells[i];
                    !outcomes[i].matches(expectations[k].1.get(r, c))
                })
                .collect()
        };
        for attempt in 1..=RETRIES {
            let retry = wrong(&outcomes);
            if retry.is_empty() {
                break;
            }
            eprintln!("weir-tests: {} probe(s) differ from the expectation, retry {attempt}", retry.len());
            let again: Vec<(&str, &str, Probe)> = retry.iter().map(|&i| jobs[i]).collect();
            for (i, outcome) in retry.iter().zip(self.probe_all(&again, RETRY_TIMEOUT)) {
                outcomes[*i] = outcome;
            }
        }
        let mut report = String::new();
        for (k, (probe, reach)) in expectations.iter().enumerate() {
            let observed: Vec<&Outcome> =
                cells.iter().zip(&outcomes).filter(|((kk, ..), _)| *kk == k).map(|(_, o)| o).collect();
            let ncols = reach.cols.len();
            let differ: Vec<usize> = (0..observed.len())
                .filter(|&i| !observed[i].matches(reach.get(&reach.rows[i / ncols], &reach.cols[i % ncols])))
                .collect();
            if differ.is_empty() {
                continue;
            }
            let _ = writeln!(
                report,
                "\n{probe}: {} of {} probes differ (rows: clients, columns: servers; \
                 '.' allowed, 'X' denied, '?' error; '*' marks a difference)",
                differ.len(),
                observed.len()
            );
            let expected_text =
                reach.render(
                    |r, c| if reach.get(&reach.rows[r], &reach.cols[c]) { ".".into() } else { "X".into() },
                );
            let observed_text = reach.render(|r, c| {
                let i = r * ncols + c;
                let mark = if differ.contains(&i) { "*" } else { "" };
                format!("{}{mark}", observed[i].symbol())
            });
            let _ = writeln!(report, "expected:\n{expected_text}observed:\n{observed_text}");
            for &i in &differ {
                let (from, to) = (&reach.rows[i / ncols], &reach.cols[i % ncols]);
                let want = if reach.get(from, to) { "allowed" } else { "denied" };
                let _ =
                    writeln!(report, "  {from} -> {to} {probe}: expected {want}, observed {:?}", observed[i]);
            }
        }
        if report.is_empty() {
            return Ok(());
        }
        let explain = self
            .cli()
            .output(&["policy", "get"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("{e:#}"));
        bail!("reachability differs from the expectation:{report}\n`weir policy get`:\n{explain}")
    }

    /// Checks the same expectation on several probes.
    pub fn check_probes(&self, probes: &[Probe], expected: &Reachability) -> Result<()> {
        let expectations: Vec<(Probe, &Reachability)> = probes.iter().map(|p| (*p, expected)).collect();
        self.check(&expectations)
    }

    /// After a change written at `since`, starts a probe `from` → `to` every
    /// 25 ms for 1.2 s and returns when the result flipped to `allowed`
    /// for good: the start time (from `since`) of the first probe from which
    /// on every probe saw `allowed`. A probe's verdict is taken on its first
    /// packet, sent when it starts, so this measures when the datapath
    /// changed, to within 25 ms. Fails if the last probes do not show
    /// `allowed` or a probe errs.
    pub fn time_to_flip(
        &self,
        from: &str,
        to: &str,
        probe: Probe,
        allowed: bool,
        since: Instant,
    ) -> Result<Duration> {
        let client = self.host(from);
        let server = self.host(to);
        let samples: Vec<(Duration, Outcome)> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            loop {
                let offset = since.elapsed();
                if offset > FLIP_WINDOW {
                    break;
                }
                let src_port = self.udp_source_port(from);
                handles.push((
                    offset,
                    scope.spawn(move || probe_from(client, server, probe, src_port, FLIP_PROBE_TIMEOUT)),
                ));
                std::thread::sleep(FLIP_PROBE_INTERVAL);
            }
            handles
                .into_iter()
                .map(|(offset, h)| {
                    (offset, h.join().unwrap_or_else(|_| Outcome::Error("probe thread panicked".into())))
                })
                .collect()
        });
        let timeline: String = samples.iter().map(|(_, o)| o.symbol()).collect();
        if let Some((offset, Outcome::Error(e))) =
            samples.iter().find(|(_, o)| matches!(o, Outcome::Error(_)))
        {
            bail!("{from} -> {to} {probe}: probe at {offset:?} failed: {e} (timeline {timeline})");
        }
        let first_good = samples.iter().rposition(|(_, o)| !o.matches(allowed)).map_or(0, |i| i + 1);
        let want = if allowed { "allowed" } else { "denied" };
        ensure!(
            first_good < samples.len(),
            "{from} -> {to} {probe}: still not {want} {FLIP_WINDOW:?} after the change \
             (one probe every {FLIP_PROBE_INTERVAL:?}, '.' allowed, 'X' denied: {timeline})"
        );
        let flipped = samples[first_good].0;
        eprintln!("weir-tests: {from} -> {to} {probe} {want} after {flipped:?} ({timeline})");
        Ok(flipped)
    }

    /// `weir policy get [filter] -o json`.
    pub fn policy_get(&self, filter: Option<&str>) -> Result<Vec<PolicyEndpoint>> {
        policy_get(self.cli(), filter)
    }

    /// `weir ipcache list -o json`.
    pub fn ipcache(&self) -> Result<Vec<IpcacheRow>> {
        self.cli().json(&["ipcache", "list"])
    }

    /// The identity the ipcache gives `ip` (its /32).
    pub fn identity_of(&self, ip: Ipv4Addr) -> Result<u32> {
        let prefix = format!("{ip}/32");
        self.ipcache()?
            .into_iter()
            .find(|r| r.prefix == prefix)
            .map(|r| r.identity)
            .with_context(|| format!("{prefix} is not in `weir ipcache list`"))
    }
}

impl Drop for NetpolBed {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [["policy", "get"], ["ipcache", "list"], ["identity", "list"]] {
            match self.cli().output(&args) {
                Ok(out) => eprintln!(
                    "----- weir {} -----\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("weir {}: {e:#}", args.join(" ")),
            }
        }
    }
}

fn policy_get(cli: &Cli, filter: Option<&str>) -> Result<Vec<PolicyEndpoint>> {
    let mut args = vec!["policy", "get"];
    args.extend(filter);
    cli.json(&args)
}

/// One probe from `client` (on this thread, which enters the client's
/// namespace and ends afterwards) to `server`.
fn probe_from(client: &Host, server: &Host, probe: Probe, udp_src_port: u16, timeout: Duration) -> Outcome {
    if let Err(e) = crate::netns::enter(&client.netns_path()) {
        return Outcome::Error(format!("{e:#}"));
    }
    probe_to(server, probe, udp_src_port, timeout)
}

/// One probe to `server` from the calling thread's namespace.
fn probe_to(server: &Host, probe: Probe, udp_src_port: u16, timeout: Duration) -> Outcome {
    let addr = SocketAddrV4::new(server.ip(), probe.port);
    let result = match probe.protocol {
        Protocol::Tcp => tcp_probe(addr, &server.reply, timeout),
        Protocol::Udp => udp_probe(addr, &server.reply, udp_src_port, timeout),
    };
    result.unwrap_or_else(|e| Outcome::Error(format!("{e:#}")))
}

fn tcp_probe(addr: SocketAddrV4, reply: &str, timeout: Duration) -> Result<Outcome> {
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            return Ok(Outcome::Denied);
        }
        Err(e) => bail!("connect to {addr}: {e}"),
    };
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.write_all(b"probe\n").with_context(|| format!("send to {addr}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) => bail!("{addr} closed the connection without an answer"),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => bail!("connected to {addr} but no answer: {e}"),
        }
    }
    let answer = String::from_utf8_lossy(&answer).trim().to_owned();
    ensure!(answer == reply, "{addr} answered {answer:?}, expected {reply:?}");
    Ok(Outcome::Allowed)
}

fn udp_probe(addr: SocketAddrV4, reply: &str, src_port: u16, timeout: Duration) -> Result<Outcome> {
    let socket =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, src_port)).with_context(|| format!("bind UDP {src_port}"))?;
    socket.send_to(b"probe\n", addr).with_context(|| format!("send to {addr}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Outcome::Denied);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let answer = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                ensure!(
                    from == SocketAddr::V4(addr) && answer == reply,
                    "{addr}: got {answer:?} from {from}, expected {reply:?} from {addr}"
                );
                return Ok(Outcome::Allowed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(Outcome::Denied);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => bail!("receive from {addr}: {e}"),
        }
    }
}

/// Collects the results of several cases that share one [`NetpolBed`], so
/// that one failing case does not hide the others; [`Cases::finish`] fails
/// the test with every failure.
#[derive(Debug, Default)]
pub struct Cases {
    failures: Vec<String>,
}

impl Cases {
    pub fn new() -> Cases {
        Cases::default()
    }

    /// Runs one case (errors and panics are recorded, not propagated).
    pub fn run(&mut self, name: &str, case: impl FnOnce() -> Result<()>) {
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case));
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        };
        match failure {
            None => eprintln!("case {name}: ok ({:?})", started.elapsed()),
            Some(text) => {
                eprintln!("case {name}: FAILED ({:?})\n{text}", started.elapsed());
                self.failures.push(format!("case {name}: {text}"));
            }
        }
    }

    /// Panics with every failure, if any.
    pub fn finish(self) {
        if !self.failures.is_empty() {
            panic!("{} case(s) failed:\n\n{}", self.failures.len(), self.failures.join("\n\n"));
        }
    }
}

/// CRC32c (Castagnoli), reflected, as SCTP's checksum (RFC 9260, appendix A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// The IPv4 header checksum.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an IPv4 packet carrying an SCTP INIT chunk (the
/// first packet of an SCTP association), with valid IPv4 and SCTP checksums.
pub fn sctp_init_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    // SCTP: common header (ports, verification tag 0 for an INIT, checksum),
    // then INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, outbound
    // and inbound streams, initial TSN.
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    sctp.extend_from_slice(&0u32.to_be_bytes());
    sctp.extend_from_slice(&0u32.to_be_bytes());
    sctp.extend_from_slice(&[1, 0]);
    sctp.extend_from_slice(&20u16.to_be_bytes());
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    sctp.extend_from_slice(&65535u32.to_be_bytes());
    sctp.extend_from_slice(&10u16.to_be_bytes());
    sctp.extend_from_slice(&10u16.to_be_bytes());
    sctp.extend_from_slice(&1u32.to_be_bytes());
    // The CRC32c is stored little-endian (RFC 9260, appendix A).
    let crc = crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());

    let total = u16::try_from(20 + sctp.len()).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0]); // id 1, DF
    ip.extend_from_slice(&[64, 132, 0, 0]); // TTL, protocol SCTP, checksum
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sctp);
    frame
}

/// The id of the program behind a link pinned by the agent under
/// `<bpffs root>/links/<hook>:<ifindex>:<ifname>` (hook `to-pod` or
/// `from-pod`), via `bpftool -j link show pinned`.
pub fn pinned_link_prog_id(bed: &TestBed, hook: &str, ifname: &str) -> Result<u32> {
    let dir = bed.agent().bpffs_root().join("links");
    let pin = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{hook}:")) && n.ends_with(&format!(":{ifname}")))
        })
        .with_context(|| format!("no {hook} link for {ifname} under {}", dir.display()))?;
    #[derive(Deserialize)]
    struct Link {
        prog_id: u32,
    }
    let json = crate::cmd::run("bpftool", &["-j", "link", "show", "pinned", &pin.display().to_string()])?;
    let link: Link =
        serde_json::from_str(&json).with_context(|| format!("parsing bpftool output: {json}"))?;
    Ok(link.prog_id)
}

/// Runs `frame` once through program `prog_id` with BPF_PROG_TEST_RUN
/// (`bpftool prog run`) and returns the program's return value (for a TC
/// program 0 = TC_ACT_OK, 2 = TC_ACT_SHOT).
pub fn prog_test_run(prog_id: u32, frame: &[u8]) -> Result<i64> {
    let dir = crate::tempdir::TempDir::new(&format!("{}prog-run-", crate::names::TEST_PREFIX))?;
    let file = dir.path().join("frame.bin");
    std::fs::write(&file, frame).with_context(|| format!("cannot write {}", file.display()))?;
    let json = crate::cmd::run(
        "bpftool",
        &["-j", "prog", "run", "id", &prog_id.to_string(), "data_in", &file.display().to_string()],
    )?;
    #[derive(Deserialize)]
    struct Run {
        retval: i64,
    }
    let run: Run = serde_json::from_str(&json).with_context(|| format!("parsing bpftool output: {json}"))?;
    Ok(run.retval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let frame = sctp_init_frame(Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 10), 5000, 80);
        assert_eq!(frame.len(), 14 + 20 + 32);
        assert_eq!(ipv4_checksum(&frame[14..34]), 0, "a header with its checksum sums to 0");
    }

    #[test]
    fn reachability_diagonal_and_rendering() {
        let mut r = Reachability::pods(false);
        r.expect_ingress("x/a", true).expect("y/b", "x/a", false);
        assert!(r.get("z/c", "z/c"), "self is always allowed");
        assert!(r.get("x/b", "x/a") && !r.get("y/b", "x/a") && !r.get("x/a", "x/b"));
        let text = r.render(|_, _| ".".into());
        assert_eq!(text.lines().count(), 10);
        assert_eq!(ns_of("x/a"), "x");
        assert_eq!(pod_of("x/a"), "a");
        assert_eq!(ns_of("203.0.113.10"), "");
    }
}

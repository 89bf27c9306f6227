//! North-south: NodePort connections from a client outside the cluster,
//! through a one-armed node (one uplink, the usual cloud NIC), to a backend
//! on another node (the node DNATs and SNATs and sends the packet back out
//! of the device it came in on: what XDP_TX is for) and to a backend on the
//! node itself (DNAT only, the client's address kept).
//!
//! ```text
//!                         ┌ node 0: routing only ── local pod
//!  client ── router ──────┼ node 1: Weir, --lb-acceleration native ── local pod
//!              │          ├ node 2: Weir, --lb-acceleration disabled (tc) ── local pod
//!              │          ├ node 3: the same, and XDP_PASS on its uplink ── local pod
//!              │          ├ node 4: kube-proxy's iptables NodePort rules ── local pod
//!              │          └ node 5: the same behind 1,000 other services' rules ── local pod
//!              └── far node: one remote backend pod per configuration
//! ```
//!
//! Node 3 is there because veth is not a NIC: XDP on a veth runs on an skb
//! the sender already built, which veth converts into an XDP buffer (copying
//! it when its head cannot serve as one), a cost a NIC driver's XDP does not
//! have. Node 3 pays that conversion without doing anything in XDP, so Weir
//! XDP against node 3 is XDP's own work against tc's.
//!
//! Every node has its own /24 to the router, its own local pod and its own
//! remote pod, so the configurations share nothing but the client, the
//! router and the far node, and are measured interleaved, connection by
//! connection, as the ClusterIP benchmark does. "Direct" connects to the pod
//! addresses behind node 0, which the router sends through node 0 both ways
//! (policy routing for the remote pod), so that it pays the same hops as
//! the NodePort connections without any service translation.
//!
//! As in `tests/tests/xdp.rs`, the links model wires: the senders into the
//! nodes (client, far node) compute full checksums (TX offload off), and the
//! router's side of every node's uplink runs an XDP_PASS program (veth
//! delivers XDP_TX frames only to a peer that runs XDP; on every node
//! so that their receive paths are alike).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;
use serde_json::Value;
use weir_tests::ethtool::{self, SET_TX_CHECKSUM};
use weir_tests::manifests::{self, Endpoint, ManifestDir, ServicePort};
use weir_tests::tempdir::TempDir;
use weir_tests::topology::{Node, Pod, link};

use weir_abi::metrics::{XDP_TO_STACK, XDP_TO_TC, XDP_TX};

use super::agent::BenchAgent;
use super::load::{self, CrrRun, EchoServer, RrRun};
use super::{PREFIX, Plan, netfilter, services, wait_reachable};
use crate::cargo::Binaries;

/// The configurations compared, one node each (in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NsConfig {
    Direct,
    WeirXdp,
    WeirTc,
    /// tc only, with an XDP_PASS program on the node's uplink: what veth's
    /// XDP mode costs by itself (see [`NsConfig::label`]).
    WeirTcXdpPass,
    Iptables,
    /// iptables with [`BUSY_SERVICES`] other ClusterIP services in the
    /// cluster: every NodePort connection walks their KUBE-SERVICES rules
    /// first, as on a real cluster.
    IptablesBusy,
}

/// The other services of [`NsConfig::IptablesBusy`]'s cluster.
pub const BUSY_SERVICES: usize = 1_000;

impl NsConfig {
    pub const ALL: [NsConfig; 6] = [
        NsConfig::Direct,
        NsConfig::WeirXdp,
        NsConfig::WeirTc,
        NsConfig::WeirTcXdpPass,
        NsConfig::Iptables,
        NsConfig::IptablesBusy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            NsConfig::Direct => "direct pod IP",
            NsConfig::WeirXdp => "Weir, XDP",
            NsConfig::WeirTc => "Weir, tc only",
            NsConfig::WeirTcXdpPass => "Weir tc, uplink XDP_PASS",
            NsConfig::Iptables => "iptables",
            NsConfig::IptablesBusy => "iptables, 1,000 services",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the NodePort's backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// On the far node: DNAT + SNAT, out of the uplink again.
    Remote,
    /// On the node itself: DNAT only.
    Local,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Remote, Backend::Local];

    pub fn label(self) -> &'static str {
        match self {
            Backend::Remote => "remote (DNAT + SNAT, out of the uplink again)",
            Backend::Local => "local (DNAT)",
        }
    }
}

/// One configuration's figures for one backend case.
#[derive(Debug, Serialize)]
pub struct Series {
    pub backend: Backend,
    pub config: NsConfig,
    pub crr: Vec<CrrRun>,
    pub rr: Vec<RrRun>,
}

/// Weir's XDP counters (`weir metrics list`) over the connection-rate runs.
#[derive(Debug, Default, Serialize)]
pub struct XdpCounters {
    /// On the XDP node: packets sent back out with XDP_TX, passed to the
    /// stack after translation, left to tc.
    pub xdp_tx: u64,
    pub xdp_to_stack: u64,
    pub xdp_to_tc: u64,
    /// Connections through the XDP node's NodePorts (remote, local).
    pub remote_connections: u64,
    pub local_connections: u64,
    /// The same three counters on the tc-only node (all zero expected).
    pub tc_node: [u64; 3],
    /// Drops counted by the Weir nodes over the whole measurement:
    /// (configuration, reason, packets).
    pub drops: Vec<(NsConfig, String, u64)>,
    /// The most SNAT translations each Weir node held right after a
    /// connection-rate run (`weir nat list`).
    pub nat_entries: Vec<(NsConfig, usize)>,
}

#[derive(Debug, Serialize)]
pub struct NorthSouthResult {
    pub date: String,
    pub commit: String,
    pub profile: String,
    pub load_before: String,
    pub load_after: String,
    pub seconds: f64,
    pub runs: usize,
    /// Seconds of connections per configuration and backend case per run.
    pub crr_seconds: f64,
    pub rr_round_trips: u64,
    pub series: Vec<Series>,
    pub counters: XdpCounters,
}

impl NorthSouthResult {
    pub fn series(&self, backend: Backend, config: NsConfig) -> Option<&Series> {
        self.series.iter().find(|s| s.backend == backend && s.config == config)
    }
}

const REMOTE_NODE_PORT: u16 = 30090;
const LOCAL_NODE_PORT: u16 = 30091;
const REMOTE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 1);
const LOCAL_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 80, 2);
const FAR_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 70, 2);
const ROUTER_FAR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 70, 254);
/// The router's table for the direct configuration's remote traffic.
const DIRECT_TABLE: &str = "100";

fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 60 + k as u8, 1)
}

fn router_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 60 + k as u8, 254)
}

fn local_pod_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 60 + k as u8, 10)
}

fn remote_pod_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 50, 10 + k as u8)
}

/// The namespaces, servers and agents of the benchmark. Fields drop in
/// order: agents and servers before the pods, pods before their nodes.
struct Topology {
    agents: Vec<(NsConfig, BenchAgent)>,
    _servers: Vec<EchoServer>,
    _xdp_pass: Vec<OwnedFd>,
    client: Pod,
    _pods: Vec<Pod>,
    _dirs: Vec<ManifestDir>,
    _scratch: TempDir,
    _nodes: Vec<Node>,
    _far: Node,
    _router: Node,
}

impl Topology {
    fn build(plan: &Plan, bins: &Binaries) -> Result<Topology> {
        let router = Node::create(PREFIX)?;
        let far = Node::create(PREFIX)?;
        let r = router.netns();
        let client = router.add_pod("client", CLIENT_IP)?;
        client.run(|| ethtool::set("eth0", SET_TX_CHECKSUM, false))??;
        let far_dev = link(r, ROUTER_FAR_IP, far.netns(), "uplink", FAR_NODE_IP, 24)?;
        far.netns().ip(&["route", "add", "default", "via", &ROUTER_FAR_IP.to_string()])?;
        far.netns().run(|| ethtool::set("uplink", SET_TX_CHECKSUM, false))??;

        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        let mut xdp_pass = Vec::new();
        for config in NsConfig::ALL {
            let k = config.index();
            let node = Node::create(PREFIX)?;
            let dev = format!("node{k}");
            let uplink = link(node.netns(), node_ip(k), r, &dev, router_ip(k), 24)?;
            if config == NsConfig::WeirTcXdpPass {
                xdp_pass.push(node.netns().run(|| weir_tests::xdp_pass::attach(&uplink))??);
            }
            node.netns().ip(&["route", "add", "default", "via", &router_ip(k).to_string()])?;
            xdp_pass.push(r.run(|| weir_tests::xdp_pass::attach(&dev))??);
            r.ip(&["route", "add", &format!("10.244.{}.0/24", 60 + k), "via", &node_ip(k).to_string()])?;
            let local = node.add_pod("local", local_pod_ip(k))?;
            servers.push(EchoServer::start(&local, services::BACKEND_PORT, plan.cpu)?);
            pods.push(local);
            let remote = far.add_pod(&format!("remote{k}"), remote_pod_ip(k))?;
            servers.push(EchoServer::start(&remote, services::BACKEND_PORT, plan.cpu)?);
            pods.push(remote);
            nodes.push(node);
        }
        r.ip(&["route", "add", "10.244.50.0/24", "via", &FAR_NODE_IP.to_string()])?;
        // Direct: the remote pod of node 0 is reached through node 0 (which
        // routes it back out of its uplink), and so is its reply.
        let k = NsConfig::Direct.index();
        let via = node_ip(k).to_string();
        let (pod_ip, client_ip) = (format!("{}/32", remote_pod_ip(k)), format!("{CLIENT_IP}/32"));
        r.ip(&["route", "add", &pod_ip, "via", &via, "table", DIRECT_TABLE])?;
        r.ip(&["route", "add", &client_ip, "via", &via, "table", DIRECT_TABLE])?;
        let client_dev = client.host_interface();
        r.ip(&["rule", "add", "iif", client_dev, "to", &pod_ip, "lookup", DIRECT_TABLE])?;
        r.ip(&["rule", "add", "iif", &far_dev, "from", &pod_ip, "to", &client_ip, "lookup", DIRECT_TABLE])?;

        // iptables: kube-proxy's NodePort rules, alone and behind other
        // services' rules.
        let scratch = TempDir::new(PREFIX)?;
        for (config, others) in [(NsConfig::Iptables, 0), (NsConfig::IptablesBusy, BUSY_SERVICES)] {
            let k = config.index();
            let rules = scratch.path().join(format!("nodeport{k}.rules"));
            std::fs::write(&rules, iptables_ruleset(remote_pod_ip(k), local_pod_ip(k), others))?;
            netfilter::iptables_restore(nodes[k].name(), &rules, Duration::from_secs(60))?
                .context("iptables-restore of the NodePort rules timed out")?;
        }

        // Weir: both agents started, then waited for.
        let mut dirs = Vec::new();
        let mut agents = Vec::new();
        for (config, mode) in [
            (NsConfig::WeirXdp, "native"),
            (NsConfig::WeirTc, "disabled"),
            (NsConfig::WeirTcXdpPass, "disabled"),
        ] {
            let k = config.index();
            let dir = ManifestDir::new(PREFIX)?;
            dir.write("north-south.yaml", &weir_manifests(&nodes[k], far.name(), k))?;
            let args: Vec<String> =
                ["--lb-acceleration", mode, "--healthz-bind-address", "", "--metrics-bind-address", ""]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
            agents.push((config, BenchAgent::start(&bins.agent, &nodes[k], &dir, &args, plan.agent_cpu)?));
            dirs.push(dir);
        }
        for (_, a) in &mut agents {
            a.wait_line(Duration::from_secs(120), "initial sync complete", 0)?;
        }
        let topology = Topology {
            agents,
            _servers: servers,
            _xdp_pass: xdp_pass,
            client,
            _pods: pods,
            _dirs: dirs,
            _scratch: scratch,
            _nodes: nodes,
            _far: far,
            _router: router,
        };
        for backend in Backend::ALL {
            for config in NsConfig::ALL {
                wait_reachable(&topology.client, target(config, backend), Duration::from_secs(30))
                    .with_context(|| format!("north-south: {} to a {backend:?} backend", config.label()))?;
            }
        }
        Ok(topology)
    }

    fn agent(&self, config: NsConfig) -> Option<&BenchAgent> {
        self.agents.iter().find(|(c, _)| *c == config).map(|(_, a)| a)
    }
}

/// What the client connects to.
fn target(config: NsConfig, backend: Backend) -> SocketAddrV4 {
    let k = config.index();
    match (config, backend) {
        (NsConfig::Direct, Backend::Remote) => SocketAddrV4::new(remote_pod_ip(k), services::BACKEND_PORT),
        (NsConfig::Direct, Backend::Local) => SocketAddrV4::new(local_pod_ip(k), services::BACKEND_PORT),
        (_, Backend::Remote) => SocketAddrV4::new(node_ip(k), REMOTE_NODE_PORT),
        (_, Backend::Local) => SocketAddrV4::new(node_ip(k), LOCAL_NODE_PORT),
    }
}

/// The local pod, and two NodePort services: one backed by this node's
/// remote pod (on the far node), one by its local pod.
fn weir_manifests(node: &Node, far: &str, k: usize) -> Vec<Value> {
    let ns = services::NAMESPACE;
    let mut docs = vec![manifests::namespace(ns), manifests::pod(ns, "local", node.name(), local_pod_ip(k))];
    let ports = [ServicePort::tcp("http", services::SERVICE_PORT, services::BACKEND_PORT)];
    for (name, vip, node_port, endpoint) in [
        (
            "far",
            REMOTE_CLUSTER_IP,
            REMOTE_NODE_PORT,
            Endpoint::for_pod(remote_pod_ip(k), &format!("remote{k}"), far),
        ),
        ("near", LOCAL_CLUSTER_IP, LOCAL_NODE_PORT, Endpoint::for_pod(local_pod_ip(k), "local", node.name())),
    ] {
        let svc = manifests::node_port_service(ns, name, &vip.to_string(), &ports, node_port);
        docs.push(svc);
        docs.push(manifests::endpoint_slice(ns, name, "s1", &[endpoint], &ports));
    }
    docs
}

/// kube-proxy's iptables rules (pkg/proxy/iptables, v1.33) for the two
/// NodePort services, each with one endpoint: the remote one with
/// `externalTrafficPolicy: Cluster` (KUBE-EXT marks for masquerade, SNAT to
/// the node's address in POSTROUTING), the local one with `Local` (KUBE-EXT
/// → KUBE-SVL, no masquerade: the client's address is kept, as Weir keeps it
/// for a local backend). Filter table as kube-proxy writes it.
///
/// `others` ClusterIP services come first in KUBE-SERVICES, each rule with
/// a chain of its own, as kube-proxy writes them; the NodePort jump is the
/// chain's last rule, so a NodePort connection walks them all.
fn iptables_ruleset(remote: Ipv4Addr, local: Ipv4Addr, others: usize) -> String {
    use std::fmt::Write as _;
    let cidr = services::POD_CIDR;
    let (sp, bp) = (services::SERVICE_PORT, services::BACKEND_PORT);
    let far = "bench/far:http";
    let near = "bench/near:http";
    let (mut other_chains, mut other_rules) = (String::new(), String::new());
    for i in 0..others {
        let (name, ip) = (format!("bench/other{i}:http"), services::cluster_ip(i));
        let _ = writeln!(other_chains, ":KUBE-SVC-OTHER{i} - [0:0]");
        let _ = writeln!(
            other_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {ip} --dport {sp} -j KUBE-SVC-OTHER{i}\n\
             -A KUBE-SVC-OTHER{i} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {ip} --dport {sp} ! -s {cidr} -j KUBE-MARK-MASQ"
        );
    }
    format!(
        "{filter}*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n\
:KUBE-SVC-FAR - [0:0]\n:KUBE-EXT-FAR - [0:0]\n:KUBE-SEP-FAR - [0:0]\n\
:KUBE-SVC-NEAR - [0:0]\n:KUBE-SVL-NEAR - [0:0]\n:KUBE-EXT-NEAR - [0:0]\n:KUBE-SEP-NEAR - [0:0]\n\
{other_chains}\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
{other_rules}\
-A KUBE-SERVICES -m comment --comment \"{far} cluster IP\" -m tcp -p tcp -d {REMOTE_CLUSTER_IP} --dport {sp} -j KUBE-SVC-FAR\n\
-A KUBE-SERVICES -m comment --comment \"{near} cluster IP\" -m tcp -p tcp -d {LOCAL_CLUSTER_IP} --dport {sp} -j KUBE-SVC-NEAR\n\
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
-A KUBE-NODEPORTS -m comment --comment \"{far}\" -m tcp -p tcp --dport {REMOTE_NODE_PORT} -j KUBE-EXT-FAR\n\
-A KUBE-NODEPORTS -m comment --comment \"{near}\" -m tcp -p tcp --dport {LOCAL_NODE_PORT} -j KUBE-EXT-NEAR\n\
-A KUBE-EXT-FAR -m comment --comment \"masquerade traffic for {far} external destinations\" -j KUBE-MARK-MASQ\n\
-A KUBE-EXT-FAR -j KUBE-SVC-FAR\n\
-A KUBE-SVC-FAR -m comment --comment \"{far} cluster IP\" -m tcp -p tcp -d {REMOTE_CLUSTER_IP} --dport {sp} ! -s {cidr} -j KUBE-MARK-MASQ\n\
-A KUBE-SVC-FAR -m comment --comment \"{far} -> {remote}:{bp}\" -j KUBE-SEP-FAR\n\
-A KUBE-SEP-FAR -m comment --comment \"{far}\" -s {remote} -j KUBE-MARK-MASQ\n\
-A KUBE-SEP-FAR -m comment --comment \"{far}\" -m tcp -p tcp -j DNAT --to-destination {remote}:{bp}\n\
-A KUBE-EXT-NEAR -m comment --comment \"pod traffic for {near} external destinations\" -s {cidr} -j KUBE-SVC-NEAR\n\
-A KUBE-EXT-NEAR -m comment --comment \"masquerade LOCAL traffic for {near} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
-A KUBE-EXT-NEAR -m comment --comment \"route LOCAL traffic for {near} external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-NEAR\n\
-A KUBE-EXT-NEAR -j KUBE-SVL-NEAR\n\
-A KUBE-SVC-NEAR -m comment --comment \"{near} cluster IP\" -m tcp -p tcp -d {LOCAL_CLUSTER_IP} --dport {sp} ! -s {cidr} -j KUBE-MARK-MASQ\n\
-A KUBE-SVC-NEAR -m comment --comment \"{near} -> {local}:{bp}\" -j KUBE-SEP-NEAR\n\
-A KUBE-SVL-NEAR -m comment --comment \"{near} -> {local}:{bp}\" -j KUBE-SEP-NEAR\n\
-A KUBE-SEP-NEAR -m comment --comment \"{near}\" -s {local} -j KUBE-MARK-MASQ\n\
-A KUBE-SEP-NEAR -m comment --comment \"{near}\" -m tcp -p tcp -j DNAT --to-destination {local}:{bp}\n\
COMMIT\n",
        filter = services::IPTABLES_FILTER
    )
}

/// `weir <args> -o json` on an agent's pins.
fn cli_json<T: serde::de::DeserializeOwned>(bins: &Binaries, agent: &BenchAgent, args: &[&str]) -> Result<T> {
    let out = crate::cmd::stdout(
        crate::cmd::new(&bins.cli).args(args).args(["-o", "json", "--bpffs-root"]).arg(agent.root()),
    )?;
    serde_json::from_str(&out).with_context(|| format!("parsing `weir {}`", args.join(" ")))
}

/// `weir metrics list` on an agent: the XDP_TX, to-stack and to-tc counters.
fn xdp_counters(bins: &Binaries, agent: &BenchAgent) -> Result<[u64; 3]> {
    let rows: Vec<weir_tests::cli::Metric> = cli_json(bins, agent, &["metrics", "list"])?;
    let sum = |code: u32| rows.iter().filter(|m| m.code == code).map(|m| m.packets).sum();
    Ok([sum(XDP_TX), sum(XDP_TO_STACK), sum(XDP_TO_TC)])
}

/// Builds the topology, measures every configuration and backend case
/// interleaved, `plan.runs` times (once, briefly, in a smoke run), and tears
/// everything down.
pub fn measure(plan: &Plan, bins: &Binaries) -> Result<NorthSouthResult> {
    let started = Instant::now();
    let load_before = super::load_average();
    eprintln!(
        "bench: north-south: building the one-armed topology ({} nodes, router, far node, client)",
        NsConfig::ALL.len()
    );
    let topology = Topology::build(plan, bins)?;
    let cases: Vec<(Backend, NsConfig)> =
        Backend::ALL.iter().flat_map(|b| NsConfig::ALL.iter().map(move |c| (*b, *c))).collect();
    let clients: Vec<load::Client> = cases
        .iter()
        .map(|(b, c)| load::Client { pod: &topology.client, targets: vec![target(*c, *b)] })
        .collect();
    let xdp_agent = topology.agent(NsConfig::WeirXdp).context("XDP agent")?;
    let tc_agent = topology.agent(NsConfig::WeirTc).context("tc agent")?;
    // The smoke run (part of `cargo xtask test`) keeps to one short run.
    let (runs, crr_time) = if plan.smoke { (1, Duration::from_millis(100)) } else { (plan.runs, plan.crr) };
    let mut series: Vec<Series> = cases
        .iter()
        .map(|(b, c)| Series { backend: *b, config: *c, crr: Vec::new(), rr: Vec::new() })
        .collect();
    // The XDP counters move over the connection-rate runs only, so that
    // they can be read per connection.
    let (mut xdp, mut tc) = ([0u64; 3], [0u64; 3]);
    let mut nat_entries: Vec<(NsConfig, usize)> = Vec::new();
    for run in 0..runs {
        let seed = plan.seed ^ (run as u64 * 104_729);
        let (xdp0, tc0) = (xdp_counters(bins, xdp_agent)?, xdp_counters(bins, tc_agent)?);
        let crr = load::crr(&clients, crr_time * clients.len() as u32, seed, plan.cpu)
            .context("north-south connection rate")?;
        let (xdp1, tc1) = (xdp_counters(bins, xdp_agent)?, xdp_counters(bins, tc_agent)?);
        for (config, agent) in &topology.agents {
            let nat: Vec<Value> = cli_json(bins, agent, &["nat", "list"])?;
            match nat_entries.iter_mut().find(|(c, _)| c == config) {
                Some((_, most)) => *most = nat.len().max(*most),
                None => nat_entries.push((*config, nat.len())),
            }
        }
        for i in 0..3 {
            xdp[i] += xdp1[i] - xdp0[i];
            tc[i] += tc1[i] - tc0[i];
        }
        let rr = load::rr(&clients, plan.rr_round_trips, plan.cpu).context("north-south request/response")?;
        for ((s, c), r) in series.iter_mut().zip(crr).zip(rr) {
            s.crr.push(c);
            s.rr.push(r);
        }
    }
    let conns = |b: Backend| -> u64 {
        series
            .iter()
            .filter(|s| s.backend == b && s.config == NsConfig::WeirXdp)
            .flat_map(|s| s.crr.iter().map(|c| c.connections))
            .sum()
    };
    let mut drops = Vec::new();
    for (config, agent) in &topology.agents {
        let rows: Vec<weir_tests::cli::Metric> = cli_json(bins, agent, &["metrics", "list"])?;
        drops.extend(rows.into_iter().filter(|m| m.drop).map(|m| (*config, m.reason, m.packets)));
    }
    for (config, reason, packets) in &drops {
        eprintln!("bench:   {}: {packets} packets dropped: {reason}", config.label());
    }
    let counters = XdpCounters {
        xdp_tx: xdp[0],
        xdp_to_stack: xdp[1],
        xdp_to_tc: xdp[2],
        remote_connections: conns(Backend::Remote),
        local_connections: conns(Backend::Local),
        tc_node: tc,
        drops,
        nat_entries,
    };
    ensure!(
        counters.xdp_tx > 0 && counters.tc_node == [0, 0, 0],
        "north-south: the XDP node sent nothing with XDP_TX, or the tc-only node ran XDP: {counters:?}"
    );
    for s in &series {
        let rates: Vec<f64> = s.crr.iter().map(|c| c.rate).collect();
        eprintln!(
            "bench:   {:<7} {:<14} {:>8.0} conn/s",
            format!("{:?}", s.backend),
            s.config.label(),
            super::stats::Spread::of(&rates).median
        );
    }
    drop(topology);
    let meta = super::Meta::collect(plan);
    Ok(NorthSouthResult {
        date: meta.date,
        commit: meta.commit,
        profile: meta.profile,
        load_before,
        load_after: super::load_average(),
        seconds: started.elapsed().as_secs_f64(),
        runs,
        crr_seconds: crr_time.as_secs_f64(),
        rr_round_trips: plan.rr_round_trips,
        series,
        counters,
    })
}

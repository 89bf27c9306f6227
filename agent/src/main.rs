//! weir-agent: Weir's per-node agent.
//!
//! Reads Kubernetes objects, computes what the eBPF maps should hold, writes
//! only the difference, attaches the datapath to local pods, and garbage-
//! collects conntrack. Everything it programs is pinned under `--bpffs-root`,
//! so the datapath keeps serving while the agent is stopped or restarting.

mod cluster;
mod datapath;
mod flows;
mod health;
mod healthcheck;
mod lb;
mod metrics;
mod names;
mod node;
mod pods;
mod policy;
mod source;
mod statefile;
mod system;

use std::{
    collections::BTreeMap, net::Ipv4Addr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use ipnetwork::Ipv4Network;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use weir_abi::{capacity, config::Config};

use crate::{
    datapath::{Datapath, MapSizes, conntrack},
    health::Health,
    metrics::Metrics,
    source::{Source, SourceSpec, kube::KubeOptions},
};

#[derive(Debug, Parser)]
#[command(
    name = "weir-agent",
    version,
    about = "Weir's node agent: eBPF service load balancing for Kubernetes"
)]
struct Args {
    /// Where Kubernetes objects come from: `kube` (the API server) or
    /// dir:PATH (manifests in a directory, watched).
    #[arg(long)]
    source: SourceSpec,
    /// With --source kube: the kubeconfig to use (default: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// With --source kube: the API server's URL (or host:port), overriding the
    /// kubeconfig's. In a pod, KUBERNETES_SERVICE_HOST/PORT set to the real
    /// API server do the same: the `kubernetes` ClusterIP is not usable by
    /// the component that programs ClusterIPs.
    #[arg(long, env = "WEIR_API_SERVER")]
    api_server: Option<String>,
    /// Address of /healthz and /livez (kube-proxy's port); empty disables, port 0 picks one.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Address of /metrics (kube-proxy's port); empty disables, port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// Seconds between full reconciliations from the last known state, also
    /// when nothing changed (retries failed map writes, repairs tampering).
    #[arg(long, default_value_t = 30)]
    sync_period: u64,
    /// This node's name: pods with this spec.nodeName are local.
    #[arg(long, env = "WEIR_NODE_NAME")]
    node_name: String,
    /// Network namespace to run in (a name under /run/netns, or a path). Entered before any thread starts.
    #[arg(long)]
    netns: Option<String>,
    /// Directory in a bpffs for this agent's pinned maps and links (one per node).
    #[arg(long, default_value = "/sys/fs/bpf/weir")]
    bpffs_root: PathBuf,
    /// The service CIDR: traffic to an address in it that no service serves is dropped.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: Ipv4Network,
    /// Source address for hairpin connections (a pod reaching a service it backs).
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_snat_ip: Ipv4Addr,
    /// Seconds between conntrack garbage-collection passes.
    #[arg(long, default_value_t = 10)]
    ct_gc_interval: u64,
    #[arg(long, default_value_t = capacity::SERVICES)]
    map_size_services: u32,
    #[arg(long, default_value_t = capacity::SLOTS)]
    map_size_slots: u32,
    #[arg(long, default_value_t = capacity::BACKENDS)]
    map_size_backends: u32,
    #[arg(long, default_value_t = capacity::CONNTRACK)]
    map_size_ct: u32,
    /// How new connections pick a backend, unless a Service's
    /// `weir.dev/lb-algorithm` annotation says otherwise.
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    lb_algorithm: LbAlgorithm,
    /// Entries of each Maglev table; a prime well above 100 × backends.
    #[arg(long, default_value_t = lb::maglev::DEFAULT_TABLE_SIZE, value_parser = parse_prime)]
    maglev_table_size: u32,
    /// Do not emit flow events from the datapath (for measuring their cost).
    #[arg(long)]
    no_flow_events: bool,
    /// North-south traffic (NodePorts, external and LoadBalancer IPs) in
    /// native XDP on the node's devices (`native`, `best-effort`: where the
    /// driver supports it) or in tc only (`disabled`). tc always runs too.
    #[arg(long, value_enum, default_value_t = node::Acceleration::BestEffort)]
    lb_acceleration: node::Acceleration,
    /// The node devices that carry north-south traffic and whose addresses
    /// serve NodePorts (Cilium's --devices), comma-separated; default: all
    /// devices with an IPv4 address.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Socket LB for the node's own processes (kubelet, hostNetwork pods):
    /// attach the connect/sendmsg/recvmsg/getpeername hooks to this cgroup v2
    /// directory (the host's cgroup root on a real node, e.g. /sys/fs/cgroup).
    /// They act only on sockets in the agent's network namespace, and NodePorts
    /// then answer on 127.0.0.1 too (kube-proxy's localhost NodePorts). Unset: off.
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
    #[command(flatten)]
    flows: flows::FlowArgs,
    #[arg(long, default_value_t = capacity::IPCACHE)]
    map_size_ipcache: u32,
    #[arg(long, default_value_t = capacity::POLICY)]
    map_size_policy: u32,
    /// Conntrack lifetime of TCP connections that have not completed the handshake (seconds).
    #[arg(long, default_value_t = weir_abi::ct::lifetime::TCP_SYN)]
    ct_lifetime_tcp_syn: u32,
    /// Conntrack lifetime of established TCP connections (seconds).
    #[arg(long, default_value_t = weir_abi::ct::lifetime::TCP_ESTABLISHED)]
    ct_lifetime_tcp_established: u32,
    /// Conntrack lifetime of closing TCP connections (seconds).
    #[arg(long, default_value_t = weir_abi::ct::lifetime::TCP_CLOSE)]
    ct_lifetime_tcp_close: u32,
    /// Conntrack lifetime of UDP and other flows (seconds).
    #[arg(long, default_value_t = weir_abi::ct::lifetime::NON_TCP)]
    ct_lifetime_non_tcp: u32,
}

/// Backend selection for new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LbAlgorithm {
    /// A random backend (Cilium's default).
    Random,
    /// Maglev consistent hashing: the same backend on every node for a flow.
    Maglev,
}

fn parse_prime(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if (251..=131_071).contains(&n) && lb::maglev::is_prime(n) {
        Ok(n)
    } else {
        Err(format!("{n} is not a prime between 251 and 131071"))
    }
}

impl Args {
    fn datapath_config(&self, netns_cookie: u64) -> Config {
        Config {
            service_cidr_be: u32::from_ne_bytes(self.service_cidr.network().octets()),
            service_mask_be: u32::from_ne_bytes(self.service_cidr.mask().octets()),
            hairpin_addr_be: u32::from_ne_bytes(self.hairpin_snat_ip.octets()),
            lifetime_tcp_syn: self.ct_lifetime_tcp_syn,
            lifetime_tcp_established: self.ct_lifetime_tcp_established,
            lifetime_tcp_close: self.ct_lifetime_tcp_close,
            lifetime_non_tcp: self.ct_lifetime_non_tcp,
            flags: if self.no_flow_events { 0 } else { weir_abi::config::CONFIG_F_EVENTS },
            netns_cookie,
        }
    }
}

/// `weir-agent uninstall`: removes what the agent installed on this node.
#[derive(Debug, Parser)]
#[command(name = "weir-agent uninstall")]
struct UninstallArgs {
    /// The agent's --bpffs-root.
    #[arg(long, default_value = "/sys/fs/bpf/weir")]
    bpffs_root: PathBuf,
}

/// Unpins every link (which detaches the programs) and every map under the
/// bpffs root, and removes the state file. Stopping the agent (SIGTERM)
/// leaves all of this in place on purpose; this is the explicit opposite.
fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let root = &args.bpffs_root;
    if !root.exists() {
        info!(root = %root.display(), "nothing to uninstall");
        return Ok(());
    }
    // Links first: the datapath stops before the maps it reads disappear.
    for dir in ["links", "socklb"] {
        let links = root.join(dir);
        if links.exists() {
            std::fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
        }
    }
    std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    if let Some(dir) = statefile::path(root).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    info!(root = %root.display(), "uninstalled: links, maps and state removed");
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("uninstall") {
        tracing_subscriber::fmt().with_writer(std::io::stderr).init();
        let args = UninstallArgs::parse_from(std::env::args().skip(1));
        return match uninstall(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("weir-agent uninstall: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's client logs every failed request at ERROR; the source
            // reports the same failures once per watch, with what it does.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before the runtime exists: only this thread runs yet.
    if let Some(netns) = &args.netns
        && let Err(err) = system::enter_netns(netns)
    {
        eprintln!("weir-agent: {err:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("weir-agent: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weir-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Health first: probes get 503 (not "connection refused") while loading.
    let flow_metrics = Arc::new(flows::FlowMetrics::default());
    let metrics = Arc::new(Metrics::new(&args.bpffs_root, flow_metrics.clone()));
    let health = Arc::new(Health::new(health::DEFAULT_TIMEOUT, metrics.clone()));
    health::start_servers(
        args.healthz_bind_address.clone(),
        args.metrics_bind_address.clone(),
        health.clone(),
        metrics.clone(),
    )
    .context("starting the health and metrics servers")?;

    system::ensure_bpffs(&args.bpffs_root)?;
    let sizes = MapSizes {
        services: args.map_size_services,
        slots: args.map_size_slots,
        backends: args.map_size_backends,
        conntrack: args.map_size_ct,
        ipcache: args.map_size_ipcache,
        policy: args.map_size_policy,
    };
    let mut datapath = Datapath::load(&args.bpffs_root, sizes)?;
    // The socket-LB hooks act only on sockets of this namespace (cookie 0: none).
    let netns_cookie = match &args.socket_lb_cgroup {
        Some(_) => datapath::socklb::netns_cookie()?,
        None => 0,
    };
    datapath.write_config(&args.datapath_config(netns_cookie))?;
    datapath.set_socket_lb(args.socket_lb_cgroup.as_deref()).context("setting up the socket LB")?;
    let maglev = node::MaglevOptions {
        by_default: args.lb_algorithm == LbAlgorithm::Maglev,
        table_size: args.maglev_table_size,
    };
    let mut agent = node::Agent::adopt(args.node_name.clone(), datapath, args.hairpin_snat_ip, maglev)?;
    agent.acceleration = args.lb_acceleration;
    agent.device_names = args.devices.clone();
    // Only node processes can reach 127.0.0.1, and only the socket LB sees them.
    agent.localhost_node_ports = args.socket_lb_cgroup.is_some();
    let _flow_metrics = flows::start(
        &args.flows,
        agent.datapath.take_events(),
        agent.names(),
        &args.bpffs_root,
        flow_metrics,
    )?;

    let kube_options =
        KubeOptions { kubeconfig: args.kubeconfig.clone(), api_server: args.api_server.clone() };
    let mut source = Source::start(&args.source, &kube_options, metrics.clone(), health.clone()).await?;
    let health_checks =
        healthcheck::HealthCheckServers::start(&args.node_name, health.clone(), metrics.clone())?;
    let mut synced = false;
    let mut last: Option<cluster::Cluster> = None;
    let mut programming = ProgrammingLatency::default();

    let mut retry_attach = tokio::time::interval(Duration::from_secs(1));
    let mut gc = tokio::time::interval(Duration::from_secs(args.ct_gc_interval.max(1)));
    let mut resync = tokio::time::interval(Duration::from_secs(args.sync_period.max(1)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    loop {
        tokio::select! {
            changed = source.changed() => match changed {
                Ok(cluster) => {
                    // Nothing is removed before this first complete read: a
                    // restart must not flush maps that live connections use.
                    let started = std::time::Instant::now();
                    let failed = agent.apply(&cluster);
                    metrics.map_write_failed(&failed);
                    metrics.synced(started.elapsed());
                    health.updated();
                    health_checks.update(&cluster);
                    source.programmed();
                    programming.observe(&cluster, &metrics);
                    if let Some(eligible) = cluster.node_eligible(&args.node_name) {
                        health.set_node_eligible(eligible);
                    }
                    if !synced {
                        synced = true;
                        info!(source = ?args.source, elapsed_ms = started.elapsed().as_millis() as u64, "initial sync complete");
                    }
                    last = Some(cluster);
                }
                // The maps keep their last good state meanwhile.
                Err(err) => warn!(error = %format!("{err:#}"), "cannot read the source; keeping the current state"),
            },
            _ = retry_attach.tick(), if synced => agent.attach_local_pods(false),
            _ = resync.tick(), if synced => {
                if let Some(cluster) = &last {
                    let started = std::time::Instant::now();
                    let failed = agent.apply(cluster);
                    metrics.map_write_failed(&failed);
                    metrics.synced(started.elapsed());
                    health.updated();
                    health_checks.update(cluster);
                }
            }
            _ = gc.tick() => {
                let started = std::time::Instant::now();
                let report = conntrack::collect_garbage(agent.datapath.conntrack_mut(), conntrack::now_secs());
                metrics.ct_gc_duration.observe(started.elapsed().as_secs_f64());
                metrics.ct_gc_runs.inc();
                metrics.ct_gc_deleted.inc_by(report.deleted as u64);
                if report.deleted > 0 {
                    info!(scanned = report.scanned, deleted = report.deleted, "conntrack GC");
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

/// `kubeproxy_network_programming_duration_seconds`: for every EndpointSlice
/// whose `endpoints.kubernetes.io/last-change-trigger-time` changed, the time
/// from that trigger to the end of the reconciliation that programmed it.
/// Like kube-proxy, triggers from before the agent started are ignored (they
/// would measure the agent's downtime, not programming).
struct ProgrammingLatency {
    started: k8s_openapi::jiff::Timestamp,
    seen: BTreeMap<String, k8s_openapi::jiff::Timestamp>,
}

impl Default for ProgrammingLatency {
    fn default() -> Self {
        Self { started: k8s_openapi::jiff::Timestamp::now(), seen: BTreeMap::new() }
    }
}

impl ProgrammingLatency {
    fn observe(&mut self, cluster: &cluster::Cluster, metrics: &Metrics) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let times = source::kube::trigger_times(cluster);
        for (slice, time) in &times {
            if *time > self.started && self.seen.get(slice) != Some(time) {
                let latency = now.duration_since(*time);
                metrics.network_programming.observe(latency.as_secs_f64().max(0.0));
            }
        }
        self.seen = times;
    }
}

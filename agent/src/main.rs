//! weir-agent: Weir's per-node agent.
//!
//! Reads Kubernetes objects, computes what the eBPF maps should hold, writes
//! only the difference, attaches the datapath to local pods, and garbage-
//! collects conntrack. Everything it programs is pinned under `--bpffs-root`,
//! so the datapath keeps serving while the agent is stopped or restarting.

mod cluster;
mod datapath;
mod lb;
mod node;
mod pods;
mod source;
mod system;

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use ipnetwork::Ipv4Network;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use weir_abi::{capacity, config::Config};

use crate::{
    datapath::{Datapath, MapSizes, attach::Attachments, conntrack},
    source::{Source, SourceSpec},
};

#[derive(Debug, Parser)]
#[command(
    name = "weir-agent",
    version,
    about = "Weir's node agent: eBPF service load balancing for Kubernetes"
)]
struct Args {
    /// Where Kubernetes objects come from: dir:PATH (manifests in a directory, watched).
    #[arg(long)]
    source: SourceSpec,
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

impl Args {
    fn datapath_config(&self) -> Config {
        Config {
            service_cidr_be: u32::from_ne_bytes(self.service_cidr.network().octets()),
            service_mask_be: u32::from_ne_bytes(self.service_cidr.mask().octets()),
            hairpin_addr_be: u32::from_ne_bytes(self.hairpin_snat_ip.octets()),
            lifetime_tcp_syn: self.ct_lifetime_tcp_syn,
            lifetime_tcp_established: self.ct_lifetime_tcp_established,
            lifetime_tcp_close: self.ct_lifetime_tcp_close,
            lifetime_non_tcp: self.ct_lifetime_non_tcp,
            _pad: 0,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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
    system::ensure_bpffs(&args.bpffs_root)?;
    let sizes = MapSizes {
        services: args.map_size_services,
        slots: args.map_size_slots,
        backends: args.map_size_backends,
        conntrack: args.map_size_ct,
    };
    let mut datapath = Datapath::load(&args.bpffs_root, sizes)?;
    datapath.write_config(&args.datapath_config())?;
    let lb = datapath.adopt_lb_state()?;
    let (frontends, backends) = lb.len();
    info!(root = %args.bpffs_root.display(), frontends, backends, "datapath loaded; adopted pinned state");
    let attachments = Attachments::new(datapath.root())?;
    let mut agent = node::Agent {
        node_name: args.node_name.clone(),
        datapath,
        lb,
        attachments,
        local_pods: BTreeMap::new(),
    };

    let mut source = Source::start(&args.source)?;
    let mut synced = false;

    let mut retry_attach = tokio::time::interval(Duration::from_secs(1));
    let mut gc = tokio::time::interval(Duration::from_secs(args.ct_gc_interval.max(1)));
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    loop {
        tokio::select! {
            changed = source.changed() => match changed {
                Ok(cluster) => {
                    // Nothing is removed before this first complete read: a
                    // restart must not flush maps that live connections use.
                    agent.apply(&cluster);
                    if !synced {
                        synced = true;
                        info!(source = ?args.source, "initial sync complete");
                    }
                }
                // The maps keep their last good state meanwhile.
                Err(err) => warn!(error = %format!("{err:#}"), "cannot read the source; keeping the current state"),
            },
            _ = retry_attach.tick(), if synced => agent.attach_local_pods(false),
            _ = gc.tick() => {
                let report = conntrack::collect_garbage(agent.datapath.conntrack_mut(), conntrack::now_secs());
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

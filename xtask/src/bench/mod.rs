//! `cargo xtask bench`: Weir against direct pod-IP traffic and against the
//! iptables and nftables rulesets kube-proxy would write for the same
//! services, measured in one run on this machine, written to
//! docs/BENCHMARKS.md with SVG plots.
//!
//! Four node namespaces with identical pods (a client and ten backends with
//! the same addresses in each): one runs weir-agent, one runs it without
//! flow events, one holds kube-proxy's iptables ruleset, one its nftables
//! ruleset. For each number of services all are programmed (and timed), then
//! the configurations are measured in turn, connection by connection, so
//! that a machine that gets busier affects them alike; every figure is the
//! median of several runs with their range, and every ratio is taken within
//! a run.
//!
//! North-south (`northsouth`): NodePort connections from a client outside
//! the cluster through a one-armed node, to a remote and to a local backend,
//! with Weir's XDP path, its tc path, kube-proxy's iptables NodePort rules
//! and plain routing side by side. `--only north-south` runs just that and
//! splices its section into the existing BENCHMARKS.md.
//!
//! `--smoke` runs every benchmark briefly at tiny sizes (it is part of
//! `cargo xtask test`, so the benchmark cannot rot) and writes its report
//! under target/bench/smoke instead of docs/.

mod agent;
mod load;
mod netfilter;
mod northsouth;
mod progcost;
mod report;
mod services;
mod stats;
mod svg;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;
use weir_tests::{bpf, manifests::ManifestDir, tempdir::TempDir, topology::Node, topology::Pod};

use self::agent::BenchAgent;
use self::load::{CrrRun, EchoServer, RrRun};
use self::progcost::{Costs, Effort, Ports, Programs};
use self::services::{BACKEND_PORT, ENDPOINTS, SERVICE_PORT, ServiceSet, backend_ip, cluster_ip};
use crate::cargo::{Binaries, Workspace};
use crate::cmd;

/// What every name the benchmark creates starts with (namespaces, pins,
/// temporary directories), followed by the benchmark's pid.
pub const PREFIX: &str = "weir-bench";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Run every benchmark briefly at tiny sizes (what `cargo xtask test`
    /// does); the report goes to target/bench/smoke.
    #[arg(long)]
    pub smoke: bool,
    /// Numbers of services to sweep, e.g. `1,1000,10000,50000`.
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<usize>>,
    /// Numbers of NetworkPolicies for the first-packet benchmark.
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<usize>>,
    /// Runs per datapath figure (the report gives their median and range).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seconds per connection-rate run.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Benchmark the debug build (default: release, except with --smoke).
    #[arg(long)]
    pub debug: bool,
    /// Directory for BENCHMARKS.md and the plots (default: docs/, or
    /// target/bench/smoke with --smoke).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The CPU that runs the datapath measurements: clients, servers and
    /// test runs (default: the last one; the agents run on another).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Load kube-proxy's nftables ruleset at 10,000 services and more too.
    /// Off by default: on a 2-core VM every `nft -f` of the 10,000-service
    /// ruleset held a CPU in the kernel for 100-130 s (soft-lockup warnings),
    /// stalling whatever else shares the machine.
    #[arg(long)]
    pub nft_large: bool,
    /// Run only one part and splice it into the existing BENCHMARKS.md
    /// (the rest of the file keeps its figures and says which run they come
    /// from).
    #[arg(long, value_enum)]
    pub only: Option<Only>,
}

/// Parts of the benchmark that run on their own (`--only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// NodePort traffic from an external client: plain routing, Weir with
    /// XDP, Weir with tc only (with and without an XDP_PASS on the uplink),
    /// kube-proxy's iptables rules.
    NorthSouth,
}

/// From this many services on, the nftables ruleset is not loaded unless
/// `--nft-large` asks for it.
pub const NFT_LARGE: usize = 10_000;

/// The configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    Direct,
    Weir,
    WeirNoEvents,
    IptablesLast,
    IptablesRandom,
    Nftables,
}

impl Config {
    pub const ALL: [Config; 6] = [
        Config::Direct,
        Config::Weir,
        Config::WeirNoEvents,
        Config::IptablesLast,
        Config::IptablesRandom,
        Config::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct pod IP",
            Config::Weir => "Weir ClusterIP",
            Config::WeirNoEvents => "Weir, flow events off",
            Config::IptablesLast => "iptables, target last",
            Config::IptablesRandom => "iptables, target random",
            Config::Nftables => "nftables",
        }
    }
}

/// How much of everything to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub smoke: bool,
    pub sizes: Vec<usize>,
    pub policies: Vec<usize>,
    pub runs: usize,
    pub crr: Duration,
    pub rr_round_trips: u64,
    pub effort: Effort,
    /// The number of services at which endpoint changes are timed.
    pub change_at: usize,
    pub changes: usize,
    /// Longest a ruleset load may take (projected or real) before it is
    /// reported instead of waited for.
    pub iptables_budget: Duration,
    pub nft_budget: Duration,
    /// Whether to load the nftables ruleset at [`NFT_LARGE`] services or more.
    pub nft_large: bool,
    /// Only this part (spliced into the existing report).
    pub only: Option<Only>,
    /// Time per tool and size spent repeating a from-scratch programming.
    pub repeat_budget: Duration,
    pub seed: u64,
    /// Where the client, the servers and the test runs run.
    pub cpu: usize,
    /// Where the agents run (another CPU when there is one, so that their
    /// flow-event processing shows as their own CPU time rather than as
    /// slower connections of whichever configuration happens to run).
    pub agent_cpu: usize,
    pub release: bool,
    pub out: PathBuf,
    /// Raw results (JSON), kept out of the repository.
    pub json: PathBuf,
}

impl Plan {
    fn new(args: &BenchArgs, ws: &Workspace) -> Plan {
        let smoke = args.smoke;
        let mut sizes = args
            .services
            .clone()
            .unwrap_or_else(|| if smoke { vec![1, 40] } else { vec![1, 1000, 10_000, 50_000] });
        sizes.sort_unstable();
        sizes.dedup();
        sizes.retain(|n| (1..=52_000).contains(n));
        let mut policies = args
            .policies
            .clone()
            .unwrap_or_else(|| if smoke { vec![0, 1, 10] } else { vec![0, 1, 100, 10_000] });
        policies.push(0);
        policies.sort_unstable();
        policies.dedup();
        let change_at = sizes.iter().copied().filter(|n| *n <= 10_000).max().unwrap_or(sizes[0]);
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let cpu = args.cpu.unwrap_or(cpus - 1).min(cpus - 1);
        Plan {
            smoke,
            sizes,
            policies,
            runs: args.runs.unwrap_or(if smoke { 2 } else { 5 }).max(1),
            crr: Duration::from_secs_f64(args.seconds.unwrap_or(if smoke { 0.2 } else { 1.5 })),
            rr_round_trips: if smoke { 200 } else { 3000 },
            effort: if smoke {
                Effort { new_samples: 100, repeat: 1000, batches: 5 }
            } else {
                Effort { new_samples: 2000, repeat: 100_000, batches: 15 }
            },
            change_at,
            changes: if smoke { 4 } else { 50 },
            iptables_budget: Duration::from_secs(if smoke { 60 } else { 480 }),
            nft_budget: Duration::from_secs(if smoke { 60 } else { 240 }),
            nft_large: args.nft_large,
            only: args.only,
            repeat_budget: Duration::from_secs(if smoke { 5 } else { 40 }),
            seed: 0x5eed_0001,
            cpu,
            agent_cpu: if cpus > 1 { (cpu + cpus - 1) % cpus } else { cpu },
            release: !(smoke || args.debug),
            out: args.out.clone().unwrap_or_else(|| {
                if smoke { ws.target_dir.join("bench").join("smoke") } else { ws.root.join("docs") }
            }),
            json: ws.target_dir.join("bench").join(if smoke { "smoke-results.json" } else { "results.json" }),
        }
    }

    /// Map sizes large enough for the largest size, the same at every size.
    fn agent_args(&self) -> Vec<String> {
        let max = self.sizes.iter().copied().max().unwrap_or(1);
        let services = (max + 64).next_power_of_two().max(65_536);
        let slots = (max * ENDPOINTS + 1024).next_power_of_two().max(262_144);
        vec![
            "--map-size-services".into(),
            services.to_string(),
            "--map-size-slots".into(),
            slots.to_string(),
            "--map-size-backends".into(),
            slots.to_string(),
            // No API server in the namespace; keep kube-proxy's ports free.
            "--healthz-bind-address".into(),
            String::new(),
            "--metrics-bind-address".into(),
            String::new(),
        ]
    }
}

/// A node namespace with the benchmark's pods and their servers. Fields drop
/// in order: servers, pods, node.
struct Site {
    _servers: Vec<EchoServer>,
    client: Pod,
    _backends: Vec<Pod>,
    node: Node,
}

impl Site {
    fn build(cpu: usize) -> Result<Site> {
        let node = Node::create(PREFIX)?;
        let client = node.add_pod("client", services::CLIENT_IP)?;
        let mut backends = Vec::new();
        for i in 0..ENDPOINTS {
            backends.push(node.add_pod(&format!("backend-{i}"), backend_ip(i))?);
        }
        let mut servers = Vec::new();
        for pod in &backends {
            servers.push(EchoServer::start(pod, BACKEND_PORT, cpu)?);
        }
        Ok(Site { _servers: servers, client, _backends: backends, node })
    }

    fn name(&self) -> &str {
        self.node.name()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // All at once: each server takes up to its poll interval to stop.
        for server in &self._servers {
            server.signal_stop();
        }
    }
}

// ---------------------------------------------------------------- results

#[derive(Debug, Default, Serialize)]
pub struct Programming {
    /// Weir: agent start to "initial sync complete" (wall clock, ms).
    pub weir_wall_ms: Vec<f64>,
    /// Weir: programs loaded to initial sync complete: reading and parsing
    /// the manifests, computing and writing every map entry (log timestamps).
    pub weir_sync_ms: Vec<f64>,
    /// Weir: the agent's own timing of its first reconciliation.
    pub weir_apply_ms: Vec<f64>,
    /// Weir: of which the load-balancer maps (log `elapsed_ms`, whole ms).
    pub weir_lb_ms: Vec<f64>,
    pub iptables_ms: Vec<f64>,
    pub iptables_rss_kib: u64,
    pub iptables_note: Option<String>,
    pub iptables_lines: usize,
    pub nft_ms: Vec<f64>,
    pub nft_rss_kib: u64,
    pub nft_note: Option<String>,
    pub nft_lines: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Memory {
    pub agent_rss_kib: u64,
    pub agent_hwm_kib: u64,
    pub maps: Vec<(String, u64)>,
    pub map_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RuntimeStats {
    pub from_pod_ns: f64,
    pub to_pod_ns: f64,
    pub from_pod_runs: u64,
    pub to_pod_runs: u64,
    pub connections: u64,
    /// Connections per second of that run.
    pub rate: f64,
}

#[derive(Debug, Serialize)]
pub struct SizeResult {
    pub services: usize,
    pub random_target: usize,
    pub crr: BTreeMap<Config, Vec<CrrRun>>,
    pub rr: BTreeMap<Config, Vec<RrRun>>,
    pub missing: BTreeMap<Config, String>,
    pub costs: Option<Costs>,
    pub runtime: Option<RuntimeStats>,
    pub runtime_no_events: Option<RuntimeStats>,
    pub program: Programming,
    pub memory: Memory,
    /// The agents' CPU use during each run, % of a core: with flow events
    /// (the Weir node, which carries the direct and the service
    /// connections) and without.
    pub agent_cpu_pct: Vec<f64>,
    pub quiet_agent_cpu_pct: Vec<f64>,
    /// Connections of the Weir node per second of each run.
    pub weir_node_conns_per_s: Vec<f64>,
    /// Weir's rate with one agent per size side by side (per run).
    pub side_by_side_rates: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct PolicyResult {
    pub policies: usize,
    pub costs: Option<Costs>,
    /// Connections per second per side-by-side run.
    pub rates: Vec<f64>,
    /// The agent's time for the policy maps (log `elapsed_ms`).
    pub agent_ms: Option<f64>,
    /// Policy-map writes of that update.
    pub writes: Option<f64>,
}

/// The cost of flow events: the same measurements with `--no-flow-events`.
#[derive(Debug, Serialize)]
pub struct EventsResult {
    pub on: Costs,
    pub off: Costs,
    /// Connections per second per side-by-side run.
    pub on_rates: Vec<f64>,
    pub off_rates: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ChangeResult {
    pub services: usize,
    /// File written → new backend count visible in the services map.
    pub e2e_ms: Vec<f64>,
    /// The agent's load-balancer reconciliation for each change.
    pub reconcile_ms: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Meta {
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub load_before: String,
    pub load_after: String,
    pub iptables: String,
    pub nft: String,
    pub profile: String,
    pub seconds_total: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub meta: Meta,
    #[serde(skip)]
    pub plan: Plan,
    pub sizes: Vec<SizeResult>,
    pub policies: Vec<PolicyResult>,
    pub change: Option<ChangeResult>,
    pub events: Option<EventsResult>,
    pub north_south: Option<northsouth::NorthSouthResult>,
}

impl Serialize for Plan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{self:?}"))
    }
}

// ------------------------------------------------------------------- run

/// `cargo xtask bench`.
pub fn run(args: &BenchArgs, ws: &Workspace) -> Result<()> {
    let plan = Plan::new(args, ws);
    let bins = ws.build_binaries(plan.release)?;
    cmd::require_root("the benchmark (it creates network namespaces and loads eBPF programs)")?;
    for tool in ["iptables-restore", "nft", "bpftool"] {
        cmd::probe(cmd::new(tool).arg("--version")).with_context(|| format!("{tool} is needed"))?;
    }
    remove_leftovers();
    if ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        cleanup_own();
        std::process::exit(130);
    })
    .is_err()
    {
        eprintln!("bench: a Ctrl-C handler is already installed; an interrupt may leave namespaces behind");
    }
    run_plan(plan, &bins)
}

/// `cargo xtask bench --smoke`, for `cargo xtask test` (binaries built).
pub fn smoke(ws: &Workspace, bins: &Binaries) -> Result<()> {
    let args = BenchArgs {
        smoke: true,
        services: None,
        policies: None,
        runs: None,
        seconds: None,
        debug: true,
        out: None,
        cpu: None,
        nft_large: false,
        only: None,
    };
    remove_leftovers();
    run_plan(Plan::new(&args, ws), bins)
}

fn run_plan(plan: Plan, bins: &Binaries) -> Result<()> {
    let started = Instant::now();
    let mut meta = Meta::collect(&plan);
    if plan.only == Some(Only::NorthSouth) {
        eprintln!(
            "bench: north-south only, {} runs of {:?} per configuration; load average {}",
            plan.runs, plan.crr, meta.load_before
        );
        let ns = northsouth::measure(&plan, bins)?;
        let file = plan.out.join("BENCHMARKS.md");
        report::splice_north_south(&plan, &ns)?;
        eprintln!("bench: done in {:.0} s; north-south section of {} replaced", ns.seconds, file.display());
        return Ok(());
    }
    eprintln!(
        "bench: {} run, services {:?}, policies {:?}, {} runs of {:?}; load average {}",
        if plan.smoke { "smoke" } else { "full" },
        plan.sizes,
        plan.policies,
        plan.runs,
        plan.crr,
        meta.load_before
    );
    let (sizes, policies, change, events) = measure_all(&plan, bins)?;
    let north_south = Some(northsouth::measure(&plan, bins)?);
    meta.load_after = load_average();
    meta.seconds_total = started.elapsed().as_secs_f64();
    let results = Results { meta, plan, sizes, policies, change, events, north_south };
    report::write(&results)?;
    eprintln!(
        "bench: done in {:.0} s; report in {}",
        results.meta.seconds_total,
        results.plan.out.join("BENCHMARKS.md").display()
    );
    Ok(())
}

type Measured = (Vec<SizeResult>, Vec<PolicyResult>, Option<ChangeResult>, Option<EventsResult>);

fn measure_all(plan: &Plan, bins: &Binaries) -> Result<Measured> {
    eprintln!("bench: building four nodes (client + {ENDPOINTS} backends each)");
    let weir = Site::build(plan.cpu)?;
    let quiet = Site::build(plan.cpu)?;
    let ipt = Site::build(plan.cpu)?;
    let nft = Site::build(plan.cpu)?;
    // One manifest directory per node (the pods name their node).
    let mut dirs = Vec::new();
    for site in [&weir, &quiet, &ipt, &nft] {
        let dir = ManifestDir::new(PREFIX)?;
        dir.write_raw("pods.yaml", &services::pods_manifest(site.name())?)?;
        dirs.push(dir);
    }
    let (manifests, quiet_manifests) = (&dirs[0], &dirs[1]);
    let scratch = TempDir::new(PREFIX)?;
    let mut agent: Option<BenchAgent> = None;
    let mut quiet_agent: Option<BenchAgent> = None;
    let mut ports = Ports::default();
    let mut growth = Growth::default();
    let mut sizes = Vec::new();
    let mut policies = Vec::new();
    let mut change = None;

    for &n in &plan.sizes {
        let set = ServiceSet::new(n, plan.seed);
        eprintln!("bench: {n} services (random target: #{})", set.random_target);
        let mut r = SizeResult {
            services: n,
            random_target: set.random_target,
            crr: BTreeMap::new(),
            rr: BTreeMap::new(),
            missing: BTreeMap::new(),
            costs: None,
            runtime: None,
            runtime_no_events: None,
            program: Programming::default(),
            memory: Memory::default(),
            agent_cpu_pct: Vec::new(),
            quiet_agent_cpu_pct: Vec::new(),
            weir_node_conns_per_s: Vec::new(),
            side_by_side_rates: Vec::new(),
        };

        // Program every node.
        write_services(manifests, &set)?;
        write_services(quiet_manifests, &set)?;
        drop(agent.take()); // the previous agent and its pins go first
        drop(quiet_agent.take());
        agent = Some(start_weir(plan, bins, &weir, manifests, &mut r.program)?);
        quiet_agent =
            Some(start_weir_with(plan, bins, &quiet, quiet_manifests, &["--no-flow-events"], None)?);
        let ipt_file = scratch.path().join("iptables.rules");
        let rules = set.iptables_ruleset();
        r.program.iptables_lines = rules.lines().count();
        std::fs::write(&ipt_file, rules)?;
        let nft_file = scratch.path().join("kube-proxy.nft");
        let rules = set.nftables_ruleset();
        r.program.nft_lines = rules.lines().count();
        std::fs::write(&nft_file, rules)?;
        let ipt_loaded = load_ruleset(Tool::Iptables, plan, &ipt, &ipt_file, n, &mut growth, &mut r.program)?;
        let nft_loaded = load_ruleset(Tool::Nft, plan, &nft, &nft_file, n, &mut growth, &mut r.program)?;

        // What each configuration talks to.
        let direct: Vec<SocketAddrV4> =
            (0..ENDPOINTS).map(|i| SocketAddrV4::new(backend_ip(i), BACKEND_PORT)).collect();
        let last = SocketAddrV4::new(cluster_ip(set.last_target()), SERVICE_PORT);
        let random = SocketAddrV4::new(cluster_ip(set.random_target), SERVICE_PORT);
        let mut configs: Vec<(Config, &Site, Vec<SocketAddrV4>)> = vec![
            (Config::Direct, &weir, direct),
            (Config::Weir, &weir, vec![last]),
            (Config::WeirNoEvents, &quiet, vec![last]),
        ];
        if ipt_loaded {
            configs.push((Config::IptablesLast, &ipt, vec![last]));
            configs.push((Config::IptablesRandom, &ipt, vec![random]));
        } else {
            let note = r.program.iptables_note.clone().unwrap_or_default();
            r.missing.insert(Config::IptablesLast, note.clone());
            r.missing.insert(Config::IptablesRandom, note);
        }
        if nft_loaded {
            configs.push((Config::Nftables, &nft, vec![last]));
        } else {
            r.missing.insert(Config::Nftables, r.program.nft_note.clone().unwrap_or_default());
        }
        for (config, site, targets) in &configs {
            wait_reachable(&site.client, targets[0], Duration::from_secs(15))
                .with_context(|| format!("{} at {n} services", config.label()))?;
        }

        // The datapath: every configuration in turn, connection by
        // connection, in each run.
        let clients: Vec<load::Client> = configs
            .iter()
            .map(|(_, site, targets)| load::Client { pod: &site.client, targets: targets.clone() })
            .collect();
        for run in 0..plan.runs {
            let agent_cpu0 = agent.as_ref().map_or(f64::NAN, BenchAgent::cpu_us);
            let quiet_cpu0 = quiet_agent.as_ref().map_or(f64::NAN, BenchAgent::cpu_us);
            let started = Instant::now();
            let seed = plan.seed ^ (run as u64 * 7919);
            let crr = load::crr(&clients, plan.crr * clients.len() as u32, seed, plan.cpu)
                .with_context(|| format!("connection rate at {n} services"))?;
            let rr = load::rr(&clients, plan.rr_round_trips, plan.cpu)?;
            let wall_us = started.elapsed().as_secs_f64() * 1e6;
            let conns = |c: Config| {
                crr.iter().zip(&configs).filter(|(_, k)| k.0 == c).map(|(x, _)| x.connections).sum::<u64>()
            };
            let agent_cpu1 = agent.as_ref().map_or(f64::NAN, BenchAgent::cpu_us);
            let quiet_cpu1 = quiet_agent.as_ref().map_or(f64::NAN, BenchAgent::cpu_us);
            r.agent_cpu_pct.push((agent_cpu1 - agent_cpu0) / wall_us * 100.0);
            r.quiet_agent_cpu_pct.push((quiet_cpu1 - quiet_cpu0) / wall_us * 100.0);
            r.weir_node_conns_per_s
                .push((conns(Config::Direct) + conns(Config::Weir)) as f64 / wall_us * 1e6);
            for (((config, _, _), crr), rr) in configs.iter().zip(crr).zip(rr) {
                r.crr.entry(*config).or_default().push(crr);
                r.rr.entry(*config).or_default().push(rr);
            }
        }
        print_size_summary(&r);

        // The programs under real traffic, flow events on and off.
        let a = agent.as_mut().context("agent")?;
        let q = quiet_agent.as_ref().context("agent")?;
        let progs = Programs::open(a.root(), weir.client.host_interface())?;
        let quiet_progs = Programs::open(q.root(), quiet.client.host_interface())?;
        let (on, off) = runtime_stats(plan, [(&progs, &weir), (&quiet_progs, &quiet)], last)?;
        r.runtime = Some(on);
        r.runtime_no_events = Some(off);
        let (rss, hwm) = a.memory_kib()?;
        r.memory.agent_rss_kib = rss;
        r.memory.agent_hwm_kib = hwm;
        let mut maps = progcost::map_memory(progs.from_pod_id)?;
        maps.extend(progcost::map_memory(progs.to_pod_id)?);
        maps.sort();
        maps.dedup();
        r.memory.map_bytes = maps.iter().map(|(_, b)| b).sum();
        r.memory.maps = maps;
        drop((progs, quiet_progs));

        if n == plan.change_at {
            eprintln!("bench: {} endpoint changes at {n} services", plan.changes);
            change = Some(endpoint_changes(plan, a, manifests, &set)?);
        }
        if n == plan.sizes[0] {
            // NetworkPolicy: the agent's programming time and the connection
            // rate (the per-packet cost comes at the end).
            policies = policy_sweep(plan, a, manifests, &weir, last)?;
        }

        // More from-scratch programming runs, within the time budget.
        repeat_programming(
            plan, bins, &weir, &ipt, &nft, manifests, &ipt_file, &nft_file, &mut agent, &mut r,
        )?;
        sizes.push(r);
    }
    drop(agent);
    drop(quiet_agent);

    // Per-packet cost, compared within one time window: one agent per
    // configuration compared, on the four nodes, measured round by round.
    let sites = [&weir, &quiet, &ipt, &nft];
    for tool in [Tool::Iptables, Tool::Nft] {
        clear_ruleset(tool, if tool == Tool::Iptables { &ipt } else { &nft })?;
    }
    for chunk in plan.sizes.chunks(sites.len()) {
        eprintln!("bench: side by side at {chunk:?} services");
        let variants: Vec<Variant> =
            chunk.iter().map(|&n| Variant { services: n, policies: 0, events: true }).collect();
        let measured = side_by_side(plan, bins, &sites, &dirs, &variants, &mut ports)?;
        for (n, (costs, rates)) in chunk.iter().zip(measured) {
            if let Some(r) = sizes.iter_mut().find(|r: &&mut SizeResult| r.services == *n) {
                r.costs = Some(costs);
                r.side_by_side_rates = rates;
            }
        }
    }
    let first = plan.sizes[0];
    eprintln!("bench: side by side, flow events on and off");
    let variants = [
        Variant { services: first, policies: 0, events: true },
        Variant { services: first, policies: 0, events: false },
    ];
    let mut measured = side_by_side(plan, bins, &sites, &dirs, &variants, &mut ports)?.into_iter();
    let ((on, on_rates), (off, off_rates)) =
        (measured.next().context("events on")?, measured.next().context("events off")?);
    let events = Some(EventsResult { on, off, on_rates, off_rates });
    let counts: Vec<usize> = policies.iter().map(|p: &PolicyResult| p.policies).collect();
    for chunk in counts.chunks(sites.len()) {
        eprintln!("bench: side by side with {chunk:?} NetworkPolicies");
        let variants: Vec<Variant> =
            chunk.iter().map(|&p| Variant { services: first, policies: p, events: true }).collect();
        let measured = side_by_side(plan, bins, &sites, &dirs, &variants, &mut ports)?;
        for (p, (costs, rates)) in chunk.iter().zip(measured) {
            if let Some(result) = policies.iter_mut().find(|r| r.policies == *p) {
                result.costs = Some(costs);
                result.rates = rates;
            }
        }
    }

    drop(scratch);
    drop(dirs);
    drop((weir, quiet, ipt, nft));
    Ok((sizes, policies, change, events))
}

/// One agent configuration for [`paired_costs`].
#[derive(Debug, Clone, Copy)]
struct Variant {
    services: usize,
    policies: usize,
    events: bool,
}

/// Starts one agent per variant (one per node), then measures them side by
/// side: the per-packet cost of all of them interleaved (see
/// [`progcost::measure`]), and `plan.runs` connection-rate runs with their
/// clients taking turns. Returns each variant's costs and rates.
fn side_by_side(
    plan: &Plan,
    bins: &Binaries,
    sites: &[&Site],
    dirs: &[ManifestDir],
    variants: &[Variant],
    ports: &mut Ports,
) -> Result<Vec<(Costs, Vec<f64>)>> {
    let mut agents = Vec::new();
    for ((v, site), dir) in variants.iter().zip(sites).zip(dirs) {
        let set = ServiceSet::new(v.services, plan.seed);
        write_services(dir, &set)?;
        if v.policies > 0 {
            dir.write_raw("policies.yaml", &services::policies_manifest(v.policies))?;
        }
        let extra: &[&str] = if v.events { &[] } else { &["--no-flow-events"] };
        let a = start_weir_with(plan, bins, site, dir, extra, None)?;
        let target = SocketAddrV4::new(cluster_ip(set.last_target()), SERVICE_PORT);
        wait_reachable(&site.client, target, Duration::from_secs(15))
            .with_context(|| format!("side by side: {v:?}"))?;
        agents.push((a, target));
    }
    let progs: Vec<(Programs, Ipv4Addr)> = agents
        .iter()
        .zip(sites)
        .map(|((a, target), site)| {
            Ok((Programs::open(a.root(), site.client.host_interface())?, *target.ip()))
        })
        .collect::<Result<_>>()?;
    let sets: Vec<(&Programs, Ipv4Addr)> = progs.iter().map(|(p, ip)| (p, *ip)).collect();
    let costs = progcost::measure(&sets, plan, ports)?;
    let clients: Vec<load::Client> = agents
        .iter()
        .zip(sites)
        .map(|((_, target), site)| load::Client { pod: &site.client, targets: vec![*target] })
        .collect();
    let mut rates: Vec<Vec<f64>> = variants.iter().map(|_| Vec::new()).collect();
    for run in 0..plan.runs {
        let runs = load::crr(&clients, plan.crr * clients.len() as u32, plan.seed ^ run as u64, plan.cpu)?;
        for (into, run) in rates.iter_mut().zip(runs) {
            into.push(run.rate);
        }
    }
    drop(progs);
    drop(agents);
    Ok(costs.into_iter().zip(rates).collect())
}

fn write_services(manifests: &ManifestDir, set: &ServiceSet) -> Result<()> {
    for entry in std::fs::read_dir(manifests.path())? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("services-") || name == services::TARGET_FILE || name == "policies.yaml" {
            std::fs::remove_file(&path)?;
        }
    }
    for (file, text) in set.weir_manifests() {
        manifests.write_raw(&file, &text)?;
    }
    Ok(())
}

/// Starts a fresh agent on the node, waits for its first full sync and for
/// every pod's programs, and records the timings.
fn start_weir(
    plan: &Plan,
    bins: &Binaries,
    site: &Site,
    manifests: &ManifestDir,
    program: &mut Programming,
) -> Result<BenchAgent> {
    start_weir_with(plan, bins, site, manifests, &[], Some(program))
}

fn start_weir_with(
    plan: &Plan,
    bins: &Binaries,
    site: &Site,
    manifests: &ManifestDir,
    extra: &[&str],
    program: Option<&mut Programming>,
) -> Result<BenchAgent> {
    let mut args = plan.agent_args();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let mut a = BenchAgent::start(&bins.agent, &site.node, manifests, &args, plan.agent_cpu)?;
    let done = a.wait_line(Duration::from_secs(600), "initial sync complete", 0)?;
    let wall = a.started.elapsed().as_secs_f64() * 1e3;
    let loaded = a.wait_line(Duration::from_secs(5), "datapath loaded", 0)?;
    let lb = a.wait_line(Duration::from_secs(5), "load-balancer maps updated", 0)?;
    if let Some(program) = program {
        if let (Some(t0), Some(t1)) = (agent::timestamp(&loaded), agent::timestamp(&done)) {
            program.weir_sync_ms.push(t1.duration_since(t0).unwrap_or_default().as_secs_f64() * 1e3);
        }
        program.weir_wall_ms.push(wall);
        if let Some(ms) = agent::field(&done, "elapsed_ms") {
            program.weir_apply_ms.push(ms);
        }
        if let Some(ms) = agent::field(&lb, "elapsed_ms") {
            program.weir_lb_ms.push(ms);
        }
    }
    a.wait_links(2 * (ENDPOINTS + 1), Duration::from_secs(30))?;
    Ok(a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Iptables,
    Nft,
}

/// The last measured load per tool, to project the next one.
#[derive(Debug, Default)]
struct Growth {
    iptables: Option<(usize, f64)>,
    nft: Option<(usize, f64)>,
}

/// Loads a ruleset from scratch into its node, unless the load projected from
/// the previous size exceeds the budget. Returns whether it is loaded.
fn load_ruleset(
    tool: Tool,
    plan: &Plan,
    site: &Site,
    file: &Path,
    n: usize,
    growth: &mut Growth,
    program: &mut Programming,
) -> Result<bool> {
    let (budget, previous, exponent) = match tool {
        // Growth measured on this machine kind: iptables-nft ~N^1.4 from
        // 3,000 to 10,000 services and steeper beyond, nft ~N^1.9 (the
        // kernel's chain validation); projected as N^2.
        Tool::Iptables => (plan.iptables_budget, growth.iptables, 2.0),
        Tool::Nft => (plan.nft_budget, growth.nft, 2.0),
    };
    let mut note = |text: String| match tool {
        Tool::Iptables => program.iptables_note = Some(text),
        Tool::Nft => program.nft_note = Some(text),
    };
    clear_ruleset(tool, site)?;
    if tool == Tool::Nft && n >= NFT_LARGE && !plan.nft_large {
        note(format!(
            "not loaded: skipped at ≥ {} services by default (every `nft -f` of the 10,000-service ruleset \
             caused 100–130 s kernel soft lockups on this 2-core VM); `--nft-large` includes it",
            report::services(NFT_LARGE)
        ));
        eprintln!("bench:   {tool:?}: skipped at {n} (≥ {NFT_LARGE}; --nft-large includes it)");
        return Ok(false);
    }
    if let Some((n0, s0)) = previous
        && s0 > 1.0
    {
        let projected = s0 * (n as f64 / n0 as f64).powf(exponent);
        if projected > budget.as_secs_f64() {
            note(format!(
                "not loaded: projected ≈ {:.0} s (from {s0:.0} s at {} services, growing ~N^{exponent}), over the {} s budget",
                projected,
                n0,
                budget.as_secs()
            ));
            eprintln!("bench:   {tool:?}: skipped at {n} (projected {projected:.0} s)");
            return Ok(false);
        }
    }
    let loaded = match tool {
        Tool::Iptables => netfilter::iptables_restore(site.name(), file, budget)?,
        Tool::Nft => netfilter::nft_load(site.name(), file, budget)?,
    };
    let Some(load) = loaded else {
        note(format!("not loaded: still running after the {} s budget", budget.as_secs()));
        clear_ruleset(tool, site)?;
        return Ok(false);
    };
    eprintln!("bench:   {tool:?}: {n} services loaded in {:.2} s", load.seconds);
    match tool {
        Tool::Iptables => {
            program.iptables_ms.push(load.seconds * 1e3);
            program.iptables_rss_kib = program.iptables_rss_kib.max(load.peak_rss_kib);
            growth.iptables = Some((n, load.seconds));
        }
        Tool::Nft => {
            program.nft_ms.push(load.seconds * 1e3);
            program.nft_rss_kib = program.nft_rss_kib.max(load.peak_rss_kib);
            growth.nft = Some((n, load.seconds));
        }
    }
    Ok(true)
}

fn clear_ruleset(tool: Tool, site: &Site) -> Result<()> {
    match tool {
        Tool::Iptables => {
            let empty = TempDir::new(PREFIX)?;
            let file = empty.path().join("empty.rules");
            std::fs::write(&file, services::IPTABLES_EMPTY)?;
            netfilter::iptables_restore(site.name(), &file, Duration::from_secs(600))?;
        }
        Tool::Nft => netfilter::nft_delete_table(site.name())?,
    }
    Ok(())
}

fn wait_reachable(pod: &Pod, target: SocketAddrV4, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match load::probe(pod, target) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{target} never answered"))),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One more connection-rate run, Weir with and without flow events
/// interleaved, with the kernel's BPF run-time statistics on: the programs'
/// mean cost per run under real traffic. (Not part of the ratio runs: the
/// statistics add two clock reads per program run.)
fn runtime_stats(
    plan: &Plan,
    nodes: [(&Programs, &Site); 2],
    target: SocketAddrV4,
) -> Result<(RuntimeStats, RuntimeStats)> {
    let stats = bpf::enable_stats()?;
    let read = |p: &Programs| -> Result<[u64; 4]> {
        let (f, fc) = progcost::runtime_stats(p.from_pod_id)?;
        let (t, tc) = progcost::runtime_stats(p.to_pod_id)?;
        Ok([f, fc, t, tc])
    };
    let before = [read(nodes[0].0)?, read(nodes[1].0)?];
    let clients: Vec<load::Client> =
        nodes.iter().map(|(_, site)| load::Client { pod: &site.client, targets: vec![target] }).collect();
    let runs = load::crr(&clients, plan.crr * 2, 1, plan.cpu)?;
    let after = [read(nodes[0].0)?, read(nodes[1].0)?];
    drop(stats);
    let per = |t: u64, c: u64| if c == 0 { f64::NAN } else { t as f64 / c as f64 };
    let result = |i: usize| {
        let (b, a) = (before[i], after[i]);
        RuntimeStats {
            from_pod_ns: per(a[0] - b[0], a[1] - b[1]),
            to_pod_ns: per(a[2] - b[2], a[3] - b[3]),
            from_pod_runs: a[1] - b[1],
            to_pod_runs: a[3] - b[3],
            connections: runs[i].connections,
            rate: runs[i].rate,
        }
    };
    Ok((result(0), result(1)))
}

/// The services map's value (`weir_abi::lb::Service`) as bytes, and where
/// its backend count sits: the ABI type has no `Default` to read into.
type ServiceBytes = [u8; size_of::<weir_abi::lb::Service>()];
const COUNT_OFFSET: usize = std::mem::offset_of!(weir_abi::lb::Service, count);

fn backend_count(value: &ServiceBytes) -> u16 {
    u16::from_ne_bytes([value[COUNT_OFFSET], value[COUNT_OFFSET + 1]])
}

/// Adds and removes one endpoint of the last target, `plan.changes` times,
/// and times each from the file write to the new backend count in the map.
fn endpoint_changes(
    plan: &Plan,
    a: &mut BenchAgent,
    manifests: &ManifestDir,
    set: &ServiceSet,
) -> Result<ChangeResult> {
    let map = bpf::obj_get(&a.root().join(weir_abi::map_name::SERVICES))?;
    let key = weir_abi::lb::ServiceKey::new(
        u32::from_ne_bytes(cluster_ip(set.last_target()).octets()),
        SERVICE_PORT.to_be(),
        weir_abi::proto::TCP,
    );
    let base = set.endpoints(set.last_target());
    let mut more = base.clone();
    more.push(Ipv4Addr::new(10, 244, 0, 99));
    let lb_before = a.count_lines("load-balancer maps updated");
    let mut e2e = Vec::new();
    let mut rng = plan.seed;
    for c in 0..plan.changes {
        let endpoints = if c % 2 == 0 { &more } else { &base };
        let want = endpoints.len() as u16;
        let text = set.target_slice(endpoints);
        let temp = manifests.path().join(".target.tmp");
        std::fs::write(&temp, text)?;
        let t0 = Instant::now();
        std::fs::rename(&temp, manifests.path().join(services::TARGET_FILE))?;
        loop {
            let value: Option<ServiceBytes> = bpf::map_lookup(&map, &key)?;
            if value.is_some_and(|v| backend_count(&v) == want) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change {c}: the services map never showed {want} backends");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        e2e.push(t0.elapsed().as_secs_f64() * 1e3);
        // Let the agent finish logging, and land the next write at a random
        // point of its 100 ms scan period.
        rng = services::splitmix(rng);
        std::thread::sleep(Duration::from_millis(30 + rng % 100));
    }
    a.wait_line(Duration::from_secs(5), "load-balancer maps updated", lb_before + plan.changes - 1)?;
    let log = a.log();
    let reconcile_ms: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("load-balancer maps updated"))
        .skip(lb_before)
        .filter_map(|l| agent::field(l, "elapsed_ms"))
        .collect();
    Ok(ChangeResult { services: set.n, e2e_ms: e2e, reconcile_ms })
}

/// NetworkPolicy counts on the running agent: how long the agent takes to
/// program each (the datapath figures come from the side-by-side phase).
/// The agent is left without policies.
fn policy_sweep(
    plan: &Plan,
    a: &mut BenchAgent,
    manifests: &ManifestDir,
    site: &Site,
    target: SocketAddrV4,
) -> Result<Vec<PolicyResult>> {
    let mut results = Vec::new();
    let mut current = 0;
    for &p in &plan.policies {
        eprintln!("bench: {p} NetworkPolicies");
        let (agent_ms, writes) = set_policies(a, manifests, &mut current, p)?;
        wait_reachable(&site.client, target, Duration::from_secs(10))
            .with_context(|| format!("the client cannot reach the service with {p} policies"))?;
        results.push(PolicyResult { policies: p, costs: None, rates: Vec::new(), agent_ms, writes });
    }
    set_policies(a, manifests, &mut current, 0)?;
    Ok(results)
}

/// Writes `p` policies (or removes them) and waits for the agent to program
/// them; returns its `elapsed_ms` and `writes` for the update.
fn set_policies(
    a: &mut BenchAgent,
    manifests: &ManifestDir,
    current: &mut usize,
    p: usize,
) -> Result<(Option<f64>, Option<f64>)> {
    if p == *current {
        return Ok((None, None));
    }
    let before = a.count_lines("policy maps updated");
    if p == 0 {
        manifests.remove("policies.yaml")?;
    } else {
        manifests.write_raw("policies.yaml", &services::policies_manifest(p))?;
    }
    let line = a.wait_line(Duration::from_secs(600), "policy maps updated", before)?;
    *current = p;
    Ok((agent::field(&line, "elapsed_ms"), agent::field(&line, "writes")))
}

/// Repeats each from-scratch programming until `plan.runs` samples or the
/// time budget per tool is used up; leaves every node programmed.
#[allow(clippy::too_many_arguments)]
fn repeat_programming(
    plan: &Plan,
    bins: &Binaries,
    weir: &Site,
    ipt: &Site,
    nft: &Site,
    manifests: &ManifestDir,
    ipt_file: &Path,
    nft_file: &Path,
    agent: &mut Option<BenchAgent>,
    r: &mut SizeResult,
) -> Result<()> {
    let budget = plan.repeat_budget.as_secs_f64() * 1e3;
    let spent = |v: &[f64]| v.iter().sum::<f64>();
    while r.program.weir_wall_ms.len() < plan.runs && spent(&r.program.weir_wall_ms) < budget {
        drop(agent.take());
        *agent = Some(start_weir(plan, bins, weir, manifests, &mut r.program)?);
    }
    for (tool, site, file) in [(Tool::Iptables, ipt, ipt_file), (Tool::Nft, nft, nft_file)] {
        loop {
            let samples = match tool {
                Tool::Iptables => &r.program.iptables_ms,
                Tool::Nft => &r.program.nft_ms,
            };
            // Only where the first load happened, and while the next one fits.
            let mean = spent(samples) / samples.len().max(1) as f64;
            if samples.is_empty() || samples.len() >= plan.runs || spent(samples) + mean > budget {
                break;
            }
            clear_ruleset(tool, site)?;
            let loaded = match tool {
                Tool::Iptables => netfilter::iptables_restore(site.name(), file, plan.iptables_budget)?,
                Tool::Nft => netfilter::nft_load(site.name(), file, plan.nft_budget)?,
            };
            let Some(load) = loaded else { break };
            match tool {
                Tool::Iptables => r.program.iptables_ms.push(load.seconds * 1e3),
                Tool::Nft => r.program.nft_ms.push(load.seconds * 1e3),
            }
        }
    }
    Ok(())
}

fn print_size_summary(r: &SizeResult) {
    for (config, runs) in &r.crr {
        let rates: Vec<f64> = runs.iter().map(|c| c.rate).collect();
        let p99: Vec<f64> = runs.iter().map(|c| c.connect_p99_us).collect();
        let s = stats::Spread::of(&rates);
        eprintln!(
            "bench:   {:<24} {:>8.0} conn/s (±{:.1}%), connect p99 {:.0} µs",
            config.label(),
            s.median,
            s.spread_pct(),
            stats::Spread::of(&p99).median
        );
    }
}

// --------------------------------------------------------------- cleanup

/// Kills this process's children (agents, ruleset loaders), then removes
/// every namespace, pin and temporary directory named after this process.
fn cleanup_own() {
    let me = std::process::id();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid …; comm may contain spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(me) {
                // SAFETY: sending a signal to our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    remove_named(&format!("{PREFIX}{me}-"));
}

/// Removes namespaces, bpffs directories and temporary directories whose
/// names start with `prefix`.
fn remove_named(prefix: &str) {
    if let Ok(out) = std::process::Command::new("ip").args(["netns", "list"]).output() {
        for name in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(prefix) {
                let _ = std::process::Command::new("ip").args(["netns", "delete", name]).status();
            }
        }
    }
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// Removes what earlier benchmark processes that are gone left behind (a
/// killed run cannot clean up). Names carry the pid of the process that
/// made them; those of live processes are left alone. Agents such a run
/// left running are reported, not killed.
fn remove_leftovers() {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let mut dead = std::collections::BTreeSet::new();
    let mut names: Vec<String> = Vec::new();
    if let Ok(out) = std::process::Command::new("ip").args(["netns", "list"]).output() {
        names.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned)),
        );
    }
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            names.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
    }
    for name in names {
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        if let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok())
            && !alive(pid)
        {
            dead.insert(pid);
        }
    }
    for pid in dead {
        remove_named(&format!("{PREFIX}{pid}-"));
        let marker = format!("/sys/fs/bpf/{PREFIX}{pid}-");
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    eprintln!(
                        "bench: process {} is an agent a killed benchmark run left behind; stop it with `kill {}`",
                        entry.file_name().to_string_lossy(),
                        entry.file_name().to_string_lossy()
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------ meta

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Meta {
    fn collect(plan: &Plan) -> Meta {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let git = |args: &[&str]| {
            cmd::stdout(cmd::new("git").args(args)).map(|s| s.trim().to_owned()).unwrap_or_default()
        };
        let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Meta {
            date: cmd::stdout(cmd::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            commit: format!(
                "{}{}",
                git(&["rev-parse", "--short", "HEAD"]),
                if dirty { " (with local changes)" } else { "" }
            ),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            load_before: load_average(),
            load_after: String::new(),
            iptables: netfilter::version("iptables"),
            nft: netfilter::version("nft"),
            profile: if plan.release { "release".into() } else { "debug".into() },
            seconds_total: 0.0,
        }
    }
}

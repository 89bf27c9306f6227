//! `cargo xtask demo`: a node on this machine, in network namespaces, running
//! Weir on the manifests in `examples/`.
//!
//! One namespace per pod of `examples/pods.yaml` (with the pod's IP), wired to
//! a node namespace; HTTP servers in the backends that answer with their pod
//! name; a host outside the cluster wired to the node's uplink; the agent on
//! a copy of `examples/`. Then: requests to the ClusterIP and how they
//! spread, the CLI's view of the maps, a connection the NetworkPolicy drops
//! and why, the outside host reaching the same Service through its NodePort
//! (XDP on the uplink), and one backend removed with traffic moving away
//! from it. Everything is removed at the end, on failure and on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Deserialize;
use weir_tests::{
    agent::{Agent, AgentOptions},
    cli::wait_until,
    clients::{http_get, http_get_from},
    manifests::ManifestDir,
    netns::NetNs,
    servers::{TcpMode, TcpServer},
    topology::{Node, Pod, external_host},
};

use crate::cargo::{Binaries, Workspace};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many requests to send to the ClusterIP in each phase.
    #[arg(long, default_value_t = 30)]
    pub requests: u32,
}

/// The node name the example manifests use; replaced by the demo node's.
const EXAMPLE_NODE: &str = "demo-node";
/// What every name the demo creates starts with (namespaces, pins, dirs).
const PREFIX: &str = "weir-demo";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_PORT: u16 = 8080;
/// examples/web.yaml's `nodePort`.
const NODE_PORT: u16 = 30080;
/// The node's uplink and the outside host behind it (examples/policy.yaml
/// admits 198.18.0.0/24).
const NODE_UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

#[derive(Deserialize)]
struct PodManifest {
    metadata: PodMeta,
    status: PodStatus,
}

#[derive(Deserialize)]
struct PodMeta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Ipv4Addr,
}

fn example_pods(examples: &Path) -> Result<Vec<PodManifest>> {
    let path = examples.join("pods.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| PodManifest::deserialize(doc).with_context(|| format!("parsing {}", path.display())))
        .collect()
}

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Sends `n` requests from `client` to the ClusterIP and prints the spread.
fn spread(client: &Pod, n: u32) -> Result<BTreeMap<String, u32>> {
    spread_with(n, || http_get(client, SocketAddrV4::new(CLUSTER_IP, 80), Duration::from_secs(2)))
}

fn spread_with(n: u32, mut request: impl FnMut() -> Result<String>) -> Result<BTreeMap<String, u32>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let name = request()?;
        *counts.entry(name.trim().to_owned()).or_insert(0) += 1;
    }
    for (backend, count) in &counts {
        println!("  {backend:<10} {count:>4}  {}", "#".repeat(*count as usize));
    }
    Ok(counts)
}

fn show(agent: &Agent, args: &[&str], max_lines: usize) -> Result<()> {
    let cli = agent.cli()?;
    let output = cli.output(args)?;
    println!("$ weir {}", args.join(" "));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines().take(max_lines) {
        println!("  {line}");
    }
    let total = stdout.lines().count();
    if total > max_lines {
        println!("  … ({} more lines)", total - max_lines);
    }
    Ok(())
}

/// Removes what an interrupted demo left: namespaces, pins and agents whose
/// names start with the demo's prefix.
fn remove_leftovers() {
    if let Ok(out) = std::process::Command::new("ip").args(["netns", "list"]).output() {
        for name in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(PREFIX) {
                let _ = std::process::Command::new("ip").args(["netns", "delete", name]).status();
            }
        }
    }
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("bpffs-root /sys/fs/bpf/{PREFIX}")])
        .status();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

pub fn run(args: &DemoArgs, bins: &Binaries) -> Result<()> {
    // SAFETY: no other thread runs yet.
    unsafe {
        std::env::set_var("WEIR_AGENT_BIN", &bins.agent);
        std::env::set_var("WEIR_CLI_BIN", &bins.cli);
    }
    remove_leftovers();
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        remove_leftovers();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let examples = Workspace::discover()?.root.join("examples");
    let pod_manifests = example_pods(&examples)?;

    heading("A node and its pods, in network namespaces");
    let node = Node::create(PREFIX)?;
    let mut pods = BTreeMap::new();
    for manifest in &pod_manifests {
        let pod = node.add_pod(&manifest.metadata.name, manifest.status.pod_ip)?;
        println!(
            "  pod {:<10} {:<12} app={:<9} host side {}",
            manifest.metadata.name,
            manifest.status.pod_ip,
            manifest.metadata.labels.get("app").map_or("", String::as_str),
            pod.host_interface()
        );
        pods.insert(manifest.metadata.name.clone(), (pod, manifest));
    }
    let mut servers = Vec::new();
    for (pod, manifest) in pods.values() {
        if manifest.metadata.labels.get("app").map(String::as_str) == Some("web") {
            servers.push(TcpServer::start(pod, BACKEND_PORT, TcpMode::Http)?);
        }
    }
    println!("  backends serve HTTP on :{BACKEND_PORT} and answer with their pod name");
    let outside = external_host(&node, "outside", NODE_UPLINK_IP, OUTSIDE_IP)?;
    println!("  host outside  {OUTSIDE_IP:<12} wired to the node's uplink {NODE_UPLINK_IP}");

    heading("weir-agent on the example manifests");
    let manifests = ManifestDir::new(PREFIX)?;
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?.replace(EXAMPLE_NODE, node.name());
        let file = path.file_name().context("file name")?.to_string_lossy().into_owned();
        manifests.write_raw(&file, &text)?;
        println!("  {file}");
    }
    let agent = Agent::start_with(
        &node,
        &manifests,
        AgentOptions { prefix: PREFIX.to_owned(), ..Default::default() },
    )?;
    let cli = agent.cli()?;
    let backends: Vec<Ipv4Addr> = pod_manifests
        .iter()
        .filter(|p| p.metadata.labels.get("app").map(String::as_str) == Some("web"))
        .map(|p| p.status.pod_ip)
        .collect();
    cli.wait_for_backends(Duration::from_secs(20), CLUSTER_IP, 80, "TCP", &backends)?;
    let (client, _) = pods.get("client").context("examples/pods.yaml has no pod named client")?;
    // The programs attach to every pod's veth right after the maps are
    // written; wait until the first request goes through.
    wait_until(Duration::from_secs(20), "the first request through the ClusterIP", || {
        Ok(http_get(client, SocketAddrV4::new(CLUSTER_IP, 80), Duration::from_millis(500)).is_ok())
    })?;
    println!("  agent log: {}", agent.log_path().display());

    heading(&format!("{} requests from demo/client to web.demo ({CLUSTER_IP}:80)", args.requests));
    let counts = spread(client, args.requests)?;
    if counts.len() < 2 {
        bail!("all requests reached one backend: {counts:?}");
    }

    heading("The datapath, as the CLI reads it from the pinned maps");
    show(&agent, &["lb", "list"], 20)?;
    show(&agent, &["ct", "list"], 4)?;

    heading("demo/intruder tries the same ClusterIP: NetworkPolicy web-from-client drops it");
    let (intruder, _) = pods.get("intruder").context("examples/pods.yaml has no pod named intruder")?;
    match http_get(intruder, SocketAddrV4::new(CLUSTER_IP, 80), Duration::from_secs(1)) {
        Ok(body) => bail!("the intruder got an answer from {body}: the policy did not apply"),
        Err(err) => println!("  intruder: {err:#}"),
    }
    show(&agent, &["metrics", "list"], 20)?;
    show(&agent, &["policy", "get", "demo/backend-1"], 20)?;
    show(&agent, &["observe", "--last", "4"], 8)?;

    node_port(&agent, &outside, args.requests)?;

    heading("backend-3 leaves the EndpointSlice (examples/web.yaml without it)");
    let web = std::fs::read_to_string(examples.join("web.yaml"))?.replace(EXAMPLE_NODE, node.name());
    let without = remove_endpoint(&web, "10.244.0.13");
    manifests.write_raw("web.yaml", &without)?;
    let remaining: Vec<Ipv4Addr> = backends.iter().copied().filter(|ip| ip.octets()[3] != 13).collect();
    cli.wait_for_backends(Duration::from_secs(10), CLUSTER_IP, 80, "TCP", &remaining)?;
    let counts = spread(client, args.requests)?;
    if counts.contains_key("backend-3") {
        bail!("backend-3 still got new connections after it left the service");
    }
    show(&agent, &["lb", "list"], 20)?;

    heading("Cleaning up");
    drop(agent);
    drop(servers);
    drop(pods);
    drop(outside);
    drop(node);
    println!("  agent stopped, pins, namespaces and interfaces removed");
    Ok(())
}

/// North-south: the outside host reaches web through its NodePort on the
/// node's uplink, where the XDP program translates it (the backends keep
/// seeing the client's own address, which the policy admits).
fn node_port(agent: &Agent, outside: &NetNs, requests: u32) -> Result<()> {
    let target = SocketAddrV4::new(NODE_UPLINK_IP, NODE_PORT);
    heading(&format!("{requests} requests from the outside host ({OUTSIDE_IP}) to the NodePort {target}"));
    let get = || http_get_from(outside, target, Duration::from_secs(2));
    wait_until(Duration::from_secs(20), "the first request through the NodePort", || Ok(get().is_ok()))?;
    spread_with(requests, get)?;
    show(agent, &["metrics", "list"], 20)?;
    Ok(())
}

/// The EndpointSlice text without the endpoint whose address is `ip`.
fn remove_endpoint(text: &str, ip: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with("- addresses:") {
            skipping = line.contains(ip);
        } else if !line.starts_with("  ") {
            skipping = false;
        }
        if !skipping {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn removes_one_endpoint_block() {
        let web =
            "endpoints:\n- addresses: [10.0.0.1]\n  nodeName: n\n- addresses: [10.0.0.2]\n  nodeName: n\n";
        assert_eq!(
            super::remove_endpoint(web, "10.0.0.1"),
            "endpoints:\n- addresses: [10.0.0.2]\n  nodeName: n\n"
        );
    }
}

//! A ready-made test bed: one node, a watched manifest directory, and an agent
//! for that node; pods get consecutive addresses and Pod manifests.
//!
//! Drop order matters and is encoded in the field order: the agent is killed
//! (and its pins removed) first, then the manifest directory goes, then the
//! node namespace. Tests own their pods and servers as locals declared *after*
//! the test bed, so those are dropped before it.

use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::agent::{Agent, AgentOptions};
use crate::cli::{Cli, wait_for};
use crate::clients::{self, UdpReply};
use crate::manifests::{self, ManifestDir};
use crate::topology::{Node, Pod};

/// The Kubernetes namespace test objects live in.
pub const NAMESPACE: &str = "default";

/// How long tests wait for the agent to start and program something (the
/// contract says 500 ms after a file change; this bound leaves room for a
/// loaded 2-core CI machine verifying the programs at start).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the set of pinned links must stay unchanged for the agent to be
/// considered done attaching (its attach retry runs every second).
pub const SETTLE: Duration = Duration::from_millis(1200);

/// Per-attempt timeout while polling for a service to become reachable.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// One node with its agent and manifest directory.
#[derive(Debug)]
pub struct TestBed {
    agent: Agent,
    cli: Cli,
    manifests: ManifestDir,
    node: Node,
    next_host: Cell<u8>,
    pods: Cell<usize>,
    attached_pods: Cell<usize>,
}

impl TestBed {
    /// A node `weir-t<pid>-<n>`, a manifest directory holding the `default`
    /// Namespace, and an agent with default options.
    pub fn new() -> Result<TestBed> {
        TestBed::with_options(AgentOptions::default())
    }

    /// Like [`TestBed::new`], with agent options (e.g. map sizes).
    pub fn with_options(options: AgentOptions) -> Result<TestBed> {
        crate::require_root();
        let node = Node::create(&options.prefix)?;
        let manifests = ManifestDir::new(&format!("{}manifests-", options.prefix))?;
        manifests.write("namespace.yaml", &[manifests::namespace(NAMESPACE)])?;
        let agent = Agent::start_with(&node, &manifests, options)?;
        let cli = agent.cli()?;
        Ok(TestBed {
            agent,
            cli,
            manifests,
            node,
            next_host: Cell::new(10),
            pods: Cell::new(0),
            attached_pods: Cell::new(0),
        })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn manifests(&self) -> &ManifestDir {
        &self.manifests
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn agent_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }

    /// `weir` pointed at this agent's pins.
    pub fn cli(&self) -> &Cli {
        &self.cli
    }

    /// The agent's Prometheus metrics (`/metrics` on the node's loopback,
    /// the agent's default address), as text.
    pub fn scrape_metrics(&self) -> Result<String> {
        let address = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249));
        let (status, body) = self
            .node
            .netns()
            .run(|| crate::apiserver::http_get(address, "/metrics", Duration::from_secs(5)))??;
        anyhow::ensure!(status == 200, "GET /metrics: HTTP {status}");
        Ok(body)
    }

    /// Writes `<name>.yaml`: a ClusterIP Service `vip` in the test namespace
    /// and its EndpointSlice with `backends` (ready pods of this node).
    pub fn write_service(
        &self,
        name: &str,
        vip: Ipv4Addr,
        ports: &[manifests::ServicePort],
        backends: &[&Pod],
    ) -> Result<()> {
        let endpoints: Vec<manifests::Endpoint> = backends
            .iter()
            .map(|p| manifests::Endpoint::for_pod(p.ip(), p.name(), self.node.name()))
            .collect();
        self.manifests.write(
            &format!("{name}.yaml"),
            &[
                manifests::service(NAMESPACE, name, &vip.to_string(), ports),
                manifests::endpoint_slice(NAMESPACE, name, "s1", &endpoints, ports),
            ],
        )
    }

    /// Creates pod `name` on the node with the next free address in
    /// 10.244.0.0/24 and writes its Pod manifest (`pod-<name>.yaml`), so the
    /// agent treats it as local and attaches to its interface.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let host = self.next_host.get();
        self.next_host.set(host.checked_add(1).context("out of pod addresses")?);
        let pod = self.node.add_pod(name, Ipv4Addr::new(10, 244, 0, host))?;
        self.pods.set(self.pods.get() + 1);
        self.manifests.write(
            &format!("pod-{name}.yaml"),
            &[manifests::pod(NAMESPACE, name, self.node.name(), pod.ip())],
        )?;
        Ok(pod)
    }

    /// Waits until at least `links` links are pinned under the agent's bpffs
    /// root (see [`Agent::pinned_links`]), for callers that know how many
    /// hooks the agent uses per pod; [`TestBed::wait_attached`] does not
    /// need to know.
    pub fn wait_for_pinned_links(&mut self, links: usize) -> Result<()> {
        let agent = &mut self.agent;
        wait_for(AGENT_TIMEOUT, &format!("{links} pinned links under the bpffs root"), || {
            agent.ensure_running()?;
            Ok((agent.pinned_links()?.len() >= links).then_some(()))
        })
    }

    /// Waits until the agent has attached to every pod created with
    /// [`TestBed::add_pod`]: at least as many pinned links under the bpffs
    /// root as pods (see [`Agent::pinned_links`]), and no change to the set
    /// of pinned links for [`SETTLE`] (longer than the agent's 1 s attach
    /// retry), since the number of hooks per pod is the agent's business.
    ///
    /// Why wait at all: traffic through a service needs the programs on the
    /// client's *and* the backend's interface (replies are translated where
    /// the backend sends them), so one answered request does not prove every
    /// backend is ready; and a link exists (the datapath works) a moment
    /// before the agent pins it, so a SIGKILL before that detaches it.
    pub fn wait_attached(&mut self) -> Result<()> {
        let pods = self.pods.get();
        if self.attached_pods.get() == pods {
            return Ok(());
        }
        let agent = &mut self.agent;
        let mut seen: Option<(Vec<u32>, Instant)> = None;
        wait_for(AGENT_TIMEOUT, &format!("pinned links for {pods} pods to settle"), || {
            agent.ensure_running()?;
            let mut ids = agent.pinned_links()?;
            ids.sort_unstable();
            if ids.len() < pods {
                seen = None;
                return Ok(None);
            }
            match &seen {
                Some((previous, since)) if *previous == ids => Ok((since.elapsed() >= SETTLE).then_some(())),
                _ => {
                    seen = Some((ids, Instant::now()));
                    Ok(None)
                }
            }
        })?;
        self.attached_pods.set(pods);
        Ok(())
    }

    /// Waits for all pods to be attached (see [`TestBed::wait_attached`]),
    /// then polls a TCP request from `client` to `addr` until one is answered
    /// (the agent may still be attaching), and returns the answering pod.
    pub fn wait_tcp(&mut self, client: &Pod, addr: SocketAddrV4) -> Result<String> {
        self.wait_attached()?;
        let agent = &mut self.agent;
        wait_for(AGENT_TIMEOUT, &format!("a TCP answer from {addr} to {}", client.name()), || {
            agent.ensure_running()?;
            clients::tcp_request(client, addr, ATTEMPT_TIMEOUT).map(Some)
        })
    }

    /// Waits for all pods to be attached, then polls a UDP request from
    /// `client` to `addr` until one is answered.
    pub fn wait_udp(&mut self, client: &Pod, addr: SocketAddrV4) -> Result<UdpReply> {
        self.wait_attached()?;
        let agent = &mut self.agent;
        wait_for(AGENT_TIMEOUT, &format!("a UDP answer from {addr} to {}", client.name()), || {
            agent.ensure_running()?;
            clients::udp_request(client, addr, ATTEMPT_TIMEOUT).map(Some)
        })
    }
}

impl Drop for TestBed {
    /// Prints what the datapath holds (the CLI reads the pins, so this works
    /// whether or not the agent runs) before the agent guard removes them:
    /// shown by libtest only when the test fails.
    fn drop(&mut self) {
        for args in [["lb", "list"], ["ct", "list"], ["metrics", "list"]] {
            let text = match self.cli.output(&args) {
                Ok(out) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => format!("{e:#}"),
            };
            let lines: Vec<&str> = text.lines().collect();
            let shown = lines.len().min(DUMP_LINES);
            eprintln!("----- weir {} ({} lines) -----", args.join(" "), lines.len());
            eprintln!("{}", lines[..shown].join("\n"));
        }
    }
}

/// At most this many lines of each `weir ... list` in the failure dump.
const DUMP_LINES: usize = 60;

//! A ready-made test bed: one node, a watched manifest directory, and an agent
//! for that node; pods get consecutive addresses and Pod manifests.
//!
//! Drop order matters and is encoded in the field order: the agent is killed
//! (and its pins removed) first, then the manifest directory goes, then the
//! node namespace. Tests own their pods and servers as locals declared *after*
//! the test bed, so those are dropped before it.

use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent::{Agent, AgentOptions};
use crate::cli::{Cli, wait_for};
use crate::clients::{self, UdpReply};
use crate::manifests::{self, ManifestDir};
use crate::names;
use crate::topology::{Node, Pod};

/// The Kubernetes namespace test objects live in.
pub const NAMESPACE: &str = "default";

/// How long tests wait for the agent to program something (the contract says
/// 500 ms after a file change; attaching to a new pod retries every second).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Creates pod `name` on the node with the next free address in
    /// 10.244.0.0/24 and writes its Pod manifest (`pod-<name>.yaml`), so the
    /// agent treats it as local and attaches to its interface.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let host = self.next_host.get();
        self.next_host
            .set(host.checked_add(1).context("out of pod addresses")?);
        let pod = self.node.add_pod(name, Ipv4Addr::new(10, 244, 0, host))?;
        self.manifests.write(
            &format!("pod-{name}.yaml"),
            &[manifests::pod(NAMESPACE, name, self.node.name(), pod.ip())],
        )?;
        Ok(pod)
    }

    /// Polls a TCP request from `client` to `addr` until one is answered
    /// (the agent may still be attaching), and returns the answering pod.
    pub fn wait_tcp(&mut self, client: &Pod, addr: SocketAddrV4) -> Result<String> {
        let agent = &mut self.agent;
        wait_for(
            AGENT_TIMEOUT,
            &format!("a TCP answer from {addr} to {}", client.name()),
            || {
                agent.ensure_running()?;
                clients::tcp_request(client, addr, ATTEMPT_TIMEOUT).map(Some)
            },
        )
    }

    /// Polls a UDP request from `client` to `addr` until one is answered.
    pub fn wait_udp(&mut self, client: &Pod, addr: SocketAddrV4) -> Result<UdpReply> {
        let agent = &mut self.agent;
        wait_for(
            AGENT_TIMEOUT,
            &format!("a UDP answer from {addr} to {}", client.name()),
            || {
                agent.ensure_running()?;
                clients::udp_request(client, addr, ATTEMPT_TIMEOUT).map(Some)
            },
        )
    }
}

/// A unique name for a test's temporary objects, with the test prefix.
pub fn unique_name() -> String {
    names::unique(names::TEST_PREFIX)
}

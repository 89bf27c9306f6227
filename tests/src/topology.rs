//! A simulated Kubernetes node: a "node" network namespace, and pods, each in
//! its own namespace, joined to the node by a veth pair, exactly as the
//! contract (/tmp/weir-contract.md, "Node/pod topology") describes.
//!
//! Routing is fully static, Calico/Cilium style: every pod's default gateway
//! is the link-local 169.254.1.1, answered by a permanent neighbour entry that
//! points at the host side of its veth; the node routes each pod IP (/32) to
//! that pod's host-side interface, again with a permanent neighbour entry. No
//! ARP anywhere and no IPv4 address on the node, so the only thing between
//! two pods is the node's forwarding path and the agent's TC programs on the
//! host-side interfaces.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::names;
use crate::netns::NetNs;

/// The pods' default gateway: never assigned to an interface, only present as
/// a static neighbour entry (the host-side veth's MAC).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A node: one network namespace that forwards between its pods. Its netns
/// name doubles as the Kubernetes node name (`spec.nodeName`).
#[derive(Debug)]
pub struct Node {
    ns: NetNs,
}

impl Node {
    /// Creates the node namespace `<prefix><pid>-<n>` (prefix `weir-t` for
    /// tests, `weir-demo` for the demo) with forwarding on, reverse-path
    /// filtering off and redirects off. The sysctls are set before any
    /// interface exists, so the `default` values apply to every later one.
    pub fn create(prefix: &str) -> Result<Node> {
        let ns = NetNs::create(&names::unique(prefix))?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            ns.set_sysctl(key, value)?;
        }
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(Node { ns })
    }

    /// The Kubernetes node name (`--node-name`, `spec.nodeName`), equal to the
    /// netns name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Creates pod `pod_name` with address `ip` (/32) in its own namespace
    /// `<node>-<pod_name>`, wired to this node by a veth pair. The returned
    /// guard removes the veth pair and the namespace.
    pub fn add_pod(&self, pod_name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let ns = NetNs::create(&format!("{}-{pod_name}", self.name()))?;
        // Build the guard before wiring anything, so a failure half-way
        // through still removes what was created.
        let pod = Pod {
            name: pod_name.to_owned(),
            ip,
            host_interface: names::host_interface(),
            node_ns: self.name().to_owned(),
            ns,
        };
        pod.wire(&self.ns)
            .with_context(|| format!("cannot wire pod {pod_name} ({ip}) to node {}", self.name()))?;
        Ok(pod)
    }
}

/// A pod: its own namespace with `eth0` (the pod IP, /32) and the host side of
/// the veth pair (`lxc<n>`) in the node namespace.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    host_interface: String,
    node_ns: String,
    // Last: dropped after the veth pair is deleted in `Drop::drop`.
    ns: NetNs,
}

impl Pod {
    /// The Kubernetes pod name (what the servers answer with).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Name of the host-side veth in the node namespace, where the agent
    /// attaches its programs.
    pub fn host_interface(&self) -> &str {
        &self.host_interface
    }

    /// Runs `f` on a fresh thread inside the pod's namespace (see
    /// [`NetNs::run`]): sockets it creates are the pod's sockets.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        self.ns.run(f)
    }

    fn wire(&self, node: &NetNs) -> Result<()> {
        let pod = &self.ns;
        let host_if = self.host_interface.as_str();
        let ip = self.ip.to_string();
        let gateway = POD_GATEWAY.to_string();

        pod.set_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        pod.set_sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        pod.ip(&["link", "set", "lo", "up"])?;

        node.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod.name()])?;
        let host_mac = mac_of(node, host_if)?;
        let pod_mac = mac_of(pod, "eth0")?;

        // Pod side.
        pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.set_sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
        pod.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        pod.ip(&["neigh", "replace", &gateway, "lladdr", &host_mac, "dev", "eth0", "nud", "permanent"])?;

        // Node side.
        node.ip(&["link", "set", host_if, "up"])?;
        node.set_sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter"), "0")?;
        node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])?;
        node.ip(&["neigh", "replace", &ip, "lladdr", &pod_mac, "dev", host_if, "nud", "permanent"])?;
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both. If the node namespace
        // is already gone, so is the pair; ignore that error. Deleting the
        // link explicitly (rather than relying on the namespace going away)
        // matters when a socket still pins the pod namespace.
        let _ = crate::cmd::ip(&["-n", &self.node_ns, "link", "del", &self.host_interface]);
    }
}

#[derive(Deserialize)]
struct LinkInfo {
    address: String,
}

/// The MAC address of `dev` in namespace `ns`, from `ip -j link show`.
fn mac_of(ns: &NetNs, dev: &str) -> Result<String> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let links: Vec<LinkInfo> =
        serde_json::from_str(&json).with_context(|| format!("parsing `ip -j link show {dev}`"))?;
    links.into_iter().next().map(|l| l.address).with_context(|| format!("{}: no link {dev}", ns.name()))
}

/// Wires namespace `a` to namespace `b` with a veth pair: a fresh device in
/// `a` with `a_ip`, device `b_dev` in `b` with `b_ip` (both `/prefix`), up,
/// with reverse-path filtering off. Returns the device name in `a`. The
/// pair goes when either namespace does.
pub fn link(a: &NetNs, a_ip: Ipv4Addr, b: &NetNs, b_dev: &str, b_ip: Ipv4Addr, prefix: u8) -> Result<String> {
    let a_dev = names::host_interface();
    a.ip(&["link", "add", &a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name()])?;
    for (ns, dev, ip) in [(a, a_dev.as_str(), a_ip), (b, b_dev, b_ip)] {
        ns.ip(&["addr", "add", &format!("{ip}/{prefix}"), "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
        ns.set_sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
    }
    Ok(a_dev)
}

/// A host outside the cluster: namespace `<node>-<suffix>` whose `eth0`
/// (`host_ip`/24) is wired to a fresh uplink of `node` (`node_ip`/24); it
/// routes everything through the node.
pub fn external_host(node: &Node, suffix: &str, node_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Result<NetNs> {
    let host = NetNs::create(&format!("{}-{suffix}", node.name()))?;
    host.ip(&["link", "set", "lo", "up"])?;
    link(node.netns(), node_ip, &host, "eth0", host_ip, 24)?;
    host.ip(&["route", "add", "default", "via", &node_ip.to_string()])?;
    Ok(host)
}

/// A second node of the tests (no agent), linked to `node` by a /30 of its
/// own (198.19.0.1 – 198.19.0.2): `node` routes the second node's pods
/// (10.244.1.0/24) over it, and the second node routes everything back.
pub fn second_node(node: &Node) -> Result<Node> {
    let node2 = Node::create(names::TEST_PREFIX)?;
    let (near, far) = (Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2));
    link(node.netns(), near, node2.netns(), "uplink", far, 30)?;
    node.netns().ip(&["route", "add", "10.244.1.0/24", "via", &far.to_string()])?;
    node2.netns().ip(&["route", "add", "default", "via", &near.to_string()])?;
    Ok(node2)
}

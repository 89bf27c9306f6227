//! The XDP fast path for north-south traffic (issue 6), with real packets.
//!
//! The topology is a one-armed load balancer, the usual cloud shape: node 1
//! (with the agent) has a single uplink to a router, behind which sit the
//! external client and node 2 (no agent, a backend pod). A NodePort
//! connection to the remote backend is SNATed and sent back out of the same
//! uplink with XDP_TX, and so is its reply: the stack of node 1 never sees
//! either. A connection to a local backend is translated in XDP and passed
//! to the stack. With `--lb-acceleration disabled`, tc does all of it.
//!
//! The links model wires: senders compute full checksums (TX offload off,
//! see `weir_tests::ethtool`), and the router's side of node 1's uplink runs
//! an XDP_PASS program, without which veth does not deliver XDP_TX frames
//! (see `weir_tests::xdp_pass`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use weir_tests::agent::AgentOptions;
use weir_tests::cli::Cli;
use weir_tests::cli::codes::{XDP_TO_STACK, XDP_TO_TC, XDP_TX};
use weir_tests::clients::connect_when_ready;
use weir_tests::ethtool::{self, SET_TX_CHECKSUM};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, node_port_service};
use weir_tests::names;
use weir_tests::netns::NetNs;
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::topology::{Node, link};

const NODE1_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const ROUTER_NODE1_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 254);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 2);
const ROUTER_NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 254);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 2);
const ROUTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 254);
const REMOTE_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 5);
const REMOTE_NODE_PORT: u16 = 30090;
const LOCAL_NODE_PORT: u16 = 30091;

/// The namespaces around node 1, dropped (and unwired) together.
struct OneArm {
    client: NetNs,
    _xdp_pass: std::os::fd::OwnedFd,
    _router: NetNs,
    node2: Node,
}

fn one_armed(bed: &TestBed) -> Result<OneArm> {
    let router = NetNs::create(&format!("{}-rtr", bed.node().name()))?;
    router.set_sysctl("net.ipv4.ip_forward", "1")?;
    router.set_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    let client = NetNs::create(&format!("{}-ext", bed.node().name()))?;
    let node2 = Node::create(names::TEST_PREFIX)?;
    let node1 = bed.node().netns();

    link(node1, NODE1_IP, &router, "n1", ROUTER_NODE1_IP, 24)?;
    node1.ip(&["route", "add", "default", "via", &ROUTER_NODE1_IP.to_string()])?;
    let xdp_pass = router.run(|| weir_tests::xdp_pass::attach("n1"))??;

    link(&router, ROUTER_NODE2_IP, node2.netns(), "uplink", NODE2_IP, 24)?;
    node2.netns().ip(&["route", "add", "default", "via", &ROUTER_NODE2_IP.to_string()])?;
    router.ip(&["route", "add", "10.244.5.0/24", "via", &NODE2_IP.to_string()])?;
    // Node 2 forwards its pod's (offloaded) replies with full checksums.
    node2.netns().run(|| ethtool::set("uplink", SET_TX_CHECKSUM, false))??;

    client.ip(&["link", "set", "lo", "up"])?;
    link(&router, ROUTER_CLIENT_IP, &client, "eth0", CLIENT_IP, 24)?;
    client.ip(&["route", "add", "default", "via", &ROUTER_CLIENT_IP.to_string()])?;
    client.run(|| ethtool::set("eth0", SET_TX_CHECKSUM, false))??;
    Ok(OneArm { client, _xdp_pass: xdp_pass, _router: router, node2 })
}

fn counters(cli: &Cli) -> Result<[u64; 3]> {
    Ok([cli.metric_packets(XDP_TX)?, cli.metric_packets(XDP_TO_STACK)?, cli.metric_packets(XDP_TO_TC)?])
}

/// Runs a NodePort connection to a remote and to a local backend through
/// the one-armed node; returns the XDP counters it moved.
fn north_south(extra_args: &[&str]) -> Result<(TestBed, [u64; 3])> {
    let options = AgentOptions {
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        ..AgentOptions::default()
    };
    let mut bed = TestBed::with_options(options)?;
    let net = one_armed(&bed)?;
    let remote = net.node2.add_pod("remote", REMOTE_POD_IP)?;
    let remote_server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let local = bed.add_pod("local")?;
    let local_server = TcpServer::start(&local, 8080, TcpMode::Lines)?;

    let ports = [ServicePort::tcp("http", 80, 8080)];
    let mut objects = Vec::new();
    for (name, vip, node_port, pod, node) in [
        ("far", "10.96.50.1", REMOTE_NODE_PORT, &remote, net.node2.name()),
        ("near", "10.96.50.2", LOCAL_NODE_PORT, &local, bed.node().name()),
    ] {
        let svc = node_port_service(NAMESPACE, name, vip, &ports, node_port);
        objects.push(svc);
        let endpoints = [Endpoint::for_pod(pod.ip(), pod.name(), node)];
        objects.push(endpoint_slice(NAMESPACE, name, "s1", &endpoints, &ports));
    }
    bed.manifests().write("north-south.yaml", &objects)?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE1_IP, REMOTE_NODE_PORT, "TCP", &[remote.ip()])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE1_IP, LOCAL_NODE_PORT, "TCP", &[local.ip()])?;
    bed.wait_attached()?;
    let before = counters(bed.cli())?;

    let far = SocketAddrV4::new(NODE1_IP, REMOTE_NODE_PORT);
    let mut conn = connect_when_ready(&net.client, far, AGENT_TIMEOUT)?;
    ensure!(conn.peer_addr()? == SocketAddr::V4(far), "replies come from the NodePort");
    for _ in 0..3 {
        ensure!(conn.exchange()? == "remote");
    }
    let peers = remote_server.peers();
    ensure!(
        peers.iter().all(|p| p.ip() == IpAddr::V4(NODE1_IP)),
        "the remote backend sees node 1's address (SNAT): {peers:?}"
    );

    let near = SocketAddrV4::new(NODE1_IP, LOCAL_NODE_PORT);
    let mut conn = connect_when_ready(&net.client, near, AGENT_TIMEOUT)?;
    ensure!(conn.exchange()? == "local");
    let local_addr = conn.local_addr()?;
    ensure!(
        local_server.peers().contains(&local_addr),
        "the local backend sees the client's own address {local_addr}: {:?}",
        local_server.peers()
    );
    let after = counters(bed.cli())?;
    let moved = [after[0] - before[0], after[1] - before[1], after[2] - before[2]];
    drop((conn, remote_server, local_server, remote, local, net));
    Ok((bed, moved))
}

#[test]
fn xdp_sends_north_south_traffic_back_out_and_passes_local_traffic() -> Result<()> {
    let (bed, [tx, to_stack, to_tc]) = north_south(&[])?;
    println!("XDP counters: XDP_TX {tx}, to the stack {to_stack}, deferred to tc {to_tc}");
    // Every packet of the remote connection, both ways, must leave again:
    // none was deferred to tc, so all (handshake, three exchanges and
    // their replies: 8 at least) went out with XDP_TX.
    ensure!(to_tc == 0, "nothing needed tc in a one-armed node: {to_tc}");
    ensure!(tx >= 8, "the remote connection's packets were sent back out by XDP: {tx}");
    ensure!(to_stack >= 3, "the local backend's packets were translated in XDP: {to_stack}");
    let links = bed.agent().pinned_link_names()?;
    ensure!(links.iter().any(|l| l.starts_with("xdp:")), "a pinned XDP link: {links:?}");
    Ok(())
}

#[test]
fn with_acceleration_disabled_tc_serves_north_south_traffic() -> Result<()> {
    let (bed, moved) = north_south(&["--lb-acceleration", "disabled"])?;
    ensure!(moved == [0, 0, 0], "no XDP counter moves: {moved:?}");
    let links = bed.agent().pinned_link_names()?;
    ensure!(!links.iter().any(|l| l.starts_with("xdp:")), "no XDP link: {links:?}");
    Ok(())
}

/// The XDP link is pinned like the tc links: with the agent SIGKILLed, a
/// NodePort connection through XDP_TX keeps working; the restarted agent
/// adopts the link (same id, program swapped in place) and XDP goes on.
#[test]
fn xdp_keeps_serving_while_the_agent_restarts() -> Result<()> {
    let mut bed = TestBed::new()?;
    let net = one_armed(&bed)?;
    let remote = net.node2.add_pod("remote", REMOTE_POD_IP)?;
    let _server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let svc = node_port_service(NAMESPACE, "far", "10.96.50.3", &ports, REMOTE_NODE_PORT);
    let endpoints = [Endpoint::for_pod(remote.ip(), remote.name(), net.node2.name())];
    bed.manifests().write("far.yaml", &[svc, endpoint_slice(NAMESPACE, "far", "s1", &endpoints, &ports)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE1_IP, REMOTE_NODE_PORT, "TCP", &[remote.ip()])?;
    bed.wait_attached()?;

    let mut conn =
        connect_when_ready(&net.client, SocketAddrV4::new(NODE1_IP, REMOTE_NODE_PORT), AGENT_TIMEOUT)?;
    ensure!(conn.exchange()? == "remote");
    // The uplink's tc and XDP links (node 1 has no pods); the uplink came
    // after the agent, whose attach retry runs every second.
    bed.wait_for_pinned_links(2)?;
    let mut links_before = bed.agent().pinned_links()?;
    bed.agent_mut().kill()?;
    let tx_down = bed.cli().metric_packets(XDP_TX)?;
    for _ in 0..3 {
        ensure!(conn.exchange()? == "remote", "the connection works with the agent down");
    }
    ensure!(bed.cli().metric_packets(XDP_TX)? > tx_down, "through XDP while the agent is down");

    bed.agent_mut().restart()?;
    bed.agent_mut().wait_for_log_line(AGENT_TIMEOUT, "the XDP link adopted", |line| {
        line.contains("adopted pinned link") && line.contains("hook=\"xdp\"")
    })?;
    bed.wait_attached()?;
    let mut links_after = bed.agent().pinned_links()?;
    links_before.sort_unstable();
    links_after.sort_unstable();
    ensure!(links_after == links_before, "links adopted, not recreated: {links_before:?} → {links_after:?}");
    let tx_up = bed.cli().metric_packets(XDP_TX)?;
    ensure!(conn.exchange()? == "remote", "the connection works after the restart");
    ensure!(bed.cli().metric_packets(XDP_TX)? > tx_up, "through XDP after the restart");
    Ok(())
}

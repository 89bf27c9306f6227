//! Two simulated nodes, each with its own agent and bpffs root (issue 4): a
//! ClusterIP reached from a pod on node 1 is served by a backend on node 2,
//! and the reply comes back from the ClusterIP. Node 1 translates the
//! connection (and, on the reply's way into the client, reverse-translates
//! it); node 2 only sees pod-to-pod traffic.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use weir_tests::agent::{Agent, AgentOptions};
use weir_tests::clients::{DEFAULT_TIMEOUT, TcpConn};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, pod, service};
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::topology::second_node;

#[test]
fn cluster_ip_served_by_a_backend_on_the_other_node() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    // A second node, linked to the first; each routes the other's pods.
    let node2 = second_node(bed.node())?;
    let far = node2.add_pod("far", Ipv4Addr::new(10, 244, 1, 5))?;
    let server = TcpServer::start(&far, 8080, TcpMode::Lines)?;

    // Both agents read the same cluster; each programs its own node.
    let vip = Ipv4Addr::new(10, 96, 0, 40);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints = [Endpoint::for_pod(far.ip(), far.name(), node2.name())];
    bed.manifests().write("pod-far.yaml", &[pod(NAMESPACE, "far", node2.name(), far.ip())])?;
    bed.manifests().write(
        "web.yaml",
        &[
            service(NAMESPACE, "web", &vip.to_string(), &ports),
            endpoint_slice(NAMESPACE, "web", "s1", &endpoints, &ports),
        ],
    )?;
    let agent2 = Agent::start_with(&node2, bed.manifests(), AgentOptions::default())?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[far.ip()])?;
    agent2.cli()?.wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[far.ip()])?;
    ensure!(agent2.bpffs_root() != bed.agent().bpffs_root(), "two bpffs roots side by side");
    bed.wait_attached()?;

    let target = SocketAddrV4::new(vip, 80);
    ensure!(bed.wait_tcp(&client, target)? == "far");
    let mut conn = TcpConn::connect(&client, target, DEFAULT_TIMEOUT)?;
    ensure!(conn.peer_addr()? == SocketAddr::V4(target), "the reply comes from the ClusterIP");
    ensure!(conn.exchange()? == "far");
    ensure!(conn.exchange()? == "far");
    let local = conn.local_addr()?;
    ensure!(
        server.peers().contains(&local),
        "the backend sees the client's own address: {:?}",
        server.peers()
    );
    // Node 1 holds the service translation; node 2 only the ingress verdict.
    let ct1 = bed.cli().ct_list()?;
    ensure!(ct1.iter().any(|e| e.kind == "service" && e.nat.address == far.ip()), "node 1: {ct1:#?}");
    let ct2 = agent2.cli()?.ct_list()?;
    ensure!(ct2.iter().all(|e| e.kind != "service"), "node 2 translates nothing: {ct2:#?}");
    ensure!(ct2.iter().any(|e| e.kind == "ingress"), "node 2 admitted the connection: {ct2:#?}");
    Ok(())
}

//! North-south traffic (issue 6): a client outside the cluster — its own
//! network namespace, wired to the node's "uplink" device — reaches a
//! Service through a NodePort on the node's address and through an external
//! IP, and a local backend sees the client's own address.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};

use anyhow::{Context, Result, ensure};
use weir_tests::clients::{DEFAULT_TIMEOUT, TcpConn};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::names;
use weir_tests::netns::NetNs;
use weir_tests::servers::{TcpMode, TcpServer};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);

/// A host outside the cluster, on the node's uplink (198.18.0.0/24, a
/// benchmarking range that never leaves these namespaces).
fn external_client(bed: &TestBed) -> Result<NetNs> {
    let ns = NetNs::create(&format!("{}-ext", bed.node().name()))?;
    let node = bed.node().netns();
    let uplink = names::host_interface();
    node.ip(&["link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
    node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", &uplink])?;
    node.ip(&["link", "set", &uplink, "up"])?;
    node.set_sysctl(&format!("net.ipv4.conf.{uplink}.rp_filter"), "0")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", &NODE_IP.to_string()])?;
    Ok(ns)
}

#[test]
fn node_port_and_external_ip_reach_a_local_backend_with_the_client_address() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_client(&bed)?;
    let backend = bed.add_pod("backend")?;
    let server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let mut svc = service(NAMESPACE, "web", &vip.to_string(), &ports);
    svc["spec"]["type"] = serde_json::json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = serde_json::json!(30080);
    svc["spec"]["externalIPs"] = serde_json::json!([EXTERNAL_IP.to_string()]);
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    bed.manifests().write("web.yaml", &[svc, endpoint_slice(NAMESPACE, "web", "s1", &endpoints, &ports)])?;

    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, 30080, "TCP", &[backend.ip()])?;
    ensure!(row.flags.iter().any(|f| f == "NodePort"), "lb list flags the NodePort: {row:?}");
    bed.cli().wait_for_backends(AGENT_TIMEOUT, EXTERNAL_IP, 80, "TCP", &[backend.ip()])?;
    bed.wait_attached()?;
    // The external IP is routed to the node, as a cloud router would.
    client.ip(&["route", "add", &format!("{EXTERNAL_IP}/32"), "via", &NODE_IP.to_string()])?;

    for target in [SocketAddrV4::new(NODE_IP, 30080), SocketAddrV4::new(EXTERNAL_IP, 80)] {
        let mut conn = None;
        weir_tests::cli::wait_until(AGENT_TIMEOUT, &format!("a connection to {target}"), || {
            let stream = client.run(move || TcpStream::connect_timeout(&target.into(), DEFAULT_TIMEOUT))?;
            conn = stream.ok().map(|s| TcpConn::from_stream(s, DEFAULT_TIMEOUT)).transpose()?;
            Ok(conn.is_some())
        })?;
        let mut conn = conn.context("connected")?;
        ensure!(conn.peer_addr()? == SocketAddr::V4(target), "replies come from {target}");
        ensure!(conn.exchange()? == "backend");
        ensure!(conn.exchange()? == "backend", "the connection keeps working");
        let local = conn.local_addr()?;
        ensure!(
            server.peers().contains(&local),
            "a local backend sees the client's own address {local}; it saw {:?}",
            server.peers()
        );
    }
    Ok(())
}

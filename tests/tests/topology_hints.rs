//! Topology-aware routing, proven with real packets: a Service whose
//! EndpointSlice hints every endpoint to a zone (what the EndpointSlice
//! controller writes for `trafficDistribution: PreferSameZone`) is served,
//! on a node whose Node object is labelled with one of those zones, by the
//! endpoints hinted for that zone only. As kube-proxy, the agent honours the
//! hints only when every ready endpoint has one: a single endpoint without a
//! hint brings every endpoint back.
//!
//! All pods live on the bed's one node; zones are only labels, so "the
//! zone-B backend" is a local pod the hints assign elsewhere. Every "never"
//! is a count over [`CONNECTIONS`] new connections that would all miss one
//! of three equally likely backends with probability (2/3)^60 < 10^-10.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Result, ensure};
use weir_tests::clients::{DEFAULT_TIMEOUT, tally, tcp_request};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, node, service};
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::topology::Pod;

/// New connections per check.
const CONNECTIONS: usize = 60;

/// Zone hints keep a ClusterIP's traffic in the node's zone (`zone-a`): the
/// endpoint hinted for `zone-b` gets no connection. One endpoint without a
/// hint turns the hints off and `zone-b`'s endpoint is used again; with the
/// hints back and the Node relabelled `zone-b`, only that endpoint serves,
/// so the zone is the Node's label as it is now.
#[test]
fn zone_hints_keep_cluster_traffic_in_the_nodes_zone() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let [a1, a2, b1] = ["a1", "a2", "b1"].map(|name| bed.add_pod(name));
    let (a1, a2, b1) = (a1?, a2?, b1?);
    let _a1_server = TcpServer::start(&a1, 8080, TcpMode::Lines)?;
    let _a2_server = TcpServer::start(&a2, 8080, TcpMode::Lines)?;
    let b1_server = TcpServer::start(&b1, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 8, 10);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let node_name = bed.node().name().to_owned();
    let endpoint = |pod: &Pod| Endpoint::for_pod(pod.ip(), pod.name(), &node_name);
    let write_service = |bed: &TestBed, endpoints: &[Endpoint]| {
        bed.manifests().write(
            "zoned.yaml",
            &[
                service(NAMESPACE, "zoned", &vip.to_string(), &ports),
                endpoint_slice(NAMESPACE, "zoned", "s1", endpoints, &ports),
            ],
        )
    };
    let write_node =
        |bed: &TestBed, zone: &str| bed.manifests().write("node.yaml", &[node(&node_name, Some(zone))]);
    let hinted = || {
        [
            endpoint(&a1).for_zones(&["zone-a"]),
            endpoint(&a2).for_zones(&["zone-a"]),
            endpoint(&b1).for_zones(&["zone-b"]),
        ]
    };
    let target = SocketAddrV4::new(vip, 80);
    let request = || tcp_request(&client, target, DEFAULT_TIMEOUT);

    write_node(&bed, "zone-a")?;
    write_service(&bed, &hinted())?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[a1.ip(), a2.ip()])?;
    bed.wait_tcp(&client, target)?;
    let answers = tally(CONNECTIONS, request)?;
    eprintln!("{CONNECTIONS} connections from zone-a, every endpoint hinted: {answers:?}");
    ensure!(!answers.contains_key("b1"), "the zone-b endpoint answered: {answers:?}");
    ensure!(b1_server.accepted() == 0, "the zone-b endpoint got {} connections", b1_server.accepted());
    ensure!(answers.len() == 2, "both zone-a endpoints share the traffic: {answers:?}");

    // a2 loses its hint: the hints are incomplete, so ignored.
    let [h1, _, h3] = hinted();
    write_service(&bed, &[h1, endpoint(&a2), h3])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[a1.ip(), a2.ip(), b1.ip()])?;
    let answers = tally(CONNECTIONS, request)?;
    eprintln!("{CONNECTIONS} connections with one endpoint unhinted: {answers:?}");
    ensure!(answers.get("b1").is_some_and(|n| *n > 0), "the zone-b endpoint is used again: {answers:?}");
    ensure!(answers.len() == 3, "every endpoint answers: {answers:?}");

    write_service(&bed, &hinted())?;
    write_node(&bed, "zone-b")?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[b1.ip()])?;
    let answers = tally(CONNECTIONS, request)?;
    eprintln!("{CONNECTIONS} connections from zone-b: {answers:?}");
    ensure!(answers.keys().all(|name| name == "b1"), "only the zone-b endpoint answers: {answers:?}");
    Ok(())
}

//! North-south traffic (issue 6): a client outside the cluster — its own
//! network namespace, wired to the node's "uplink" device — reaches a
//! Service through a NodePort on the node's address and through an external
//! IP, and a local backend sees the client's own address.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};

use anyhow::{Context, Result, ensure};
use weir_tests::cli::codes;
use weir_tests::clients::{DEFAULT_TIMEOUT, connect_from, connect_when_ready};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, node_port_service, service};
use weir_tests::netns::NetNs;
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::topology::{external_host, second_node};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);

#[test]
fn node_port_and_external_ip_reach_a_local_backend_with_the_client_address() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let backend = bed.add_pod("backend")?;
    let server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let mut svc = node_port_service(NAMESPACE, "web", &vip.to_string(), &ports, 30080);
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
        let mut conn = connect_when_ready(&client, target, AGENT_TIMEOUT)?;
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

/// A NodePort whose only backend runs on another node: the client is SNATed
/// to this node's address (so the reply comes back here), the reply is
/// translated back to the NodePort, and the client sees a normal connection.
#[test]
fn node_port_reaches_a_backend_on_another_node_through_snat() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let node2 = second_node(bed.node())?;
    let remote = node2.add_pod("remote", Ipv4Addr::new(10, 244, 1, 5))?;
    let server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;

    let vip = Ipv4Addr::new(10, 96, 0, 31);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let svc = node_port_service(NAMESPACE, "far", &vip.to_string(), &ports, 30081);
    let endpoints = [Endpoint::for_pod(remote.ip(), remote.name(), node2.name())];
    bed.manifests().write("far.yaml", &[svc, endpoint_slice(NAMESPACE, "far", "s1", &endpoints, &ports)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, 30081, "TCP", &[remote.ip()])?;
    bed.wait_attached()?;

    let target = SocketAddrV4::new(NODE_IP, 30081);
    let mut conn = connect_when_ready(&client, target, AGENT_TIMEOUT)?;
    ensure!(conn.peer_addr()? == SocketAddr::V4(target), "replies come from the NodePort");
    ensure!(conn.exchange()? == "remote");
    ensure!(conn.exchange()? == "remote", "the connection keeps working");
    let peers = server.peers();
    ensure!(
        peers.iter().all(|p| p.ip() == std::net::IpAddr::V4(NODE_IP)),
        "the remote backend sees the node's address (SNAT), not the client's: {peers:?}"
    );
    let ct = bed.cli().ct_list()?;
    ensure!(ct.iter().any(|e| e.kind == "nat-reply"), "a nat-reply entry: {ct:#?}");
    let nat: serde_json::Value = bed.cli().json(&["nat", "list"])?;
    let row = &nat[0];
    ensure!(
        row["xlate_src"]["address"] == NODE_IP.to_string()
            && row["backend"]["address"] == remote.ip().to_string()
            && row["frontend"]["port"] == 30081,
        "`weir nat list` shows the translation: {nat:#}"
    );
    Ok(())
}

/// `loadBalancerSourceRanges` admits the listed clients to a LoadBalancer IP
/// and drops the rest (counted as "Not in source range").
#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let lb_ip = Ipv4Addr::new(198, 18, 9, 9);
    let vip = Ipv4Addr::new(10, 96, 0, 32);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    let write = |bed: &TestBed, range: &str| {
        let mut svc = service(NAMESPACE, "lb", &vip.to_string(), &ports);
        svc["spec"]["type"] = serde_json::json!("LoadBalancer");
        svc["spec"]["ports"][0]["nodePort"] = serde_json::json!(30082);
        svc["spec"]["loadBalancerSourceRanges"] = serde_json::json!([range]);
        svc["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}});
        bed.manifests().write("lb.yaml", &[svc, endpoint_slice(NAMESPACE, "lb", "s1", &endpoints, &ports)])
    };
    write(&bed, &format!("{CLIENT_IP}/32"))?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, lb_ip, 80, "TCP", &[backend.ip()])?;
    bed.wait_attached()?;
    client.ip(&["route", "add", &format!("{lb_ip}/32"), "via", &NODE_IP.to_string()])?;
    let target = SocketAddrV4::new(lb_ip, 80);
    let connect = |timeout| client.run(move || TcpStream::connect_timeout(&target.into(), timeout));
    weir_tests::cli::wait_until(AGENT_TIMEOUT, "the listed client to connect", || {
        Ok(connect(DEFAULT_TIMEOUT)?.is_ok())
    })?;

    write(&bed, "198.18.5.0/24")?;
    weir_tests::cli::wait_until(AGENT_TIMEOUT, "an unlisted client to be dropped", || {
        Ok(connect(std::time::Duration::from_millis(500))?.is_err())
    })?;
    ensure!(bed.cli().metric_packets(177)? > 0, "drops counted under 177 (Not in source range)");
    // The NodePort of the same service is not subject to the ranges.
    let node_port = SocketAddrV4::new(NODE_IP, 30082);
    ensure!(client.run(move || TcpStream::connect_timeout(&node_port.into(), DEFAULT_TIMEOUT))?.is_ok());
    Ok(())
}

/// `--devices` limits north-south handling to the listed devices: NodePorts
/// answer on their addresses only, and only they get the XDP/tc programs.
#[test]
fn devices_flag_limits_node_ports_to_the_listed_devices() -> Result<()> {
    let options = weir_tests::agent::AgentOptions {
        extra_args: vec!["--devices".into(), "ext0".into()],
        ..Default::default()
    };
    let mut bed = TestBed::with_options(options)?;
    let outside = NetNs::create(&format!("{}-out", bed.node().name()))?;
    let node = bed.node().netns();
    for (dev, peer, node_ip, peer_ip) in
        [("ext0", "p0", "198.18.60.1", "198.18.60.2"), ("ext1", "p1", "198.18.61.1", "198.18.61.2")]
    {
        node.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer, "netns", outside.name()])?;
        node.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", dev])?;
        node.ip(&["link", "set", dev, "up"])?;
        outside.ip(&["addr", "add", &format!("{peer_ip}/24"), "dev", peer])?;
        outside.ip(&["link", "set", peer, "up"])?;
    }
    let backend = bed.add_pod("backend")?;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let svc = node_port_service(NAMESPACE, "np", "10.96.0.33", &ports, 30083);
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    bed.manifests().write("np.yaml", &[svc, endpoint_slice(NAMESPACE, "np", "s1", &endpoints, &ports)])?;
    let listed = Ipv4Addr::new(198, 18, 60, 1);
    bed.cli().wait_for_backends(AGENT_TIMEOUT, listed, 30083, "TCP", &[backend.ip()])?;
    bed.wait_attached()?;
    let rows = bed.cli().lb_list()?;
    let node_ports: Vec<Ipv4Addr> =
        rows.iter().filter(|r| r.frontend.port == 30083).map(|r| r.frontend.address).collect();
    ensure!(node_ports == [listed], "the NodePort is served on ext0's address only: {node_ports:?}");
    let pins: Vec<String> = bed.agent().pinned_link_names()?;
    ensure!(pins.iter().any(|p| p.ends_with(":ext0")), "ext0 has the north-south programs: {pins:?}");
    ensure!(!pins.iter().any(|p| p.ends_with(":ext1")), "ext1 is left alone: {pins:?}");
    Ok(())
}

/// SNAT port allocation under load: 1,000 NodePort connections to a remote
/// backend, each SNATed to the node's address, must all get distinct ports
/// (a shared port would cross two connections' replies) and all work. By
/// the birthday bound about 17 of them find their first-choice port taken
/// by a live entry, so the probing is exercised.
#[test]
fn snat_ports_stay_distinct_over_a_thousand_connections() -> Result<()> {
    const CONNECTIONS: usize = 1000;
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let node2 = second_node(bed.node())?;
    let remote = node2.add_pod("remote", Ipv4Addr::new(10, 244, 1, 6))?;
    let server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let svc = node_port_service(NAMESPACE, "many", "10.96.0.34", &ports, 30084);
    let endpoints = [Endpoint::for_pod(remote.ip(), remote.name(), node2.name())];
    bed.manifests()
        .write("many.yaml", &[svc, endpoint_slice(NAMESPACE, "many", "s1", &endpoints, &ports)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, 30084, "TCP", &[remote.ip()])?;
    bed.wait_attached()?;
    let target = SocketAddrV4::new(NODE_IP, 30084);
    connect_when_ready(&client, target, AGENT_TIMEOUT)?;
    for i in 0..CONNECTIONS {
        let mut conn =
            connect_from(&client, target, DEFAULT_TIMEOUT).with_context(|| format!("connection {i}"))?;
        ensure!(conn.exchange()? == "remote", "connection {i}");
    }
    let nat: Vec<serde_json::Value> = bed.cli().json(&["nat", "list"])?;
    let snat_ports: std::collections::BTreeSet<u64> =
        nat.iter().filter_map(|row| row["xlate_src"]["port"].as_u64()).collect();
    ensure!(
        nat.len() > CONNECTIONS && snat_ports.len() == nat.len(),
        "{} NAT entries, {} distinct SNAT ports",
        nat.len(),
        snat_ports.len()
    );
    let peers: std::collections::BTreeSet<SocketAddr> = server.peers().into_iter().collect();
    ensure!(peers.len() == server.peers().len(), "the backend saw every connection from its own port");
    Ok(())
}

/// A NodePort whose service has no endpoints refuses external clients at
/// once (ICMP port unreachable, kube-proxy's REJECT "has no endpoints"),
/// through XDP (which leaves it to tc) and tc alike.
#[test]
fn node_port_without_endpoints_refuses_external_clients() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let svc = node_port_service(NAMESPACE, "empty", "10.96.0.35", &ports, 30085);
    bed.manifests().write("empty.yaml", &[svc])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, 30085, "TCP", &[])?;
    bed.wait_for_pinned_links(2)?;
    let target = SocketAddrV4::new(NODE_IP, 30085);
    let started = std::time::Instant::now();
    let attempt = client.run(move || TcpStream::connect_timeout(&target.into(), DEFAULT_TIMEOUT))?;
    ensure!(
        attempt.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "connection refused, got {attempt:?}"
    );
    ensure!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "refused at once: {:?}",
        started.elapsed()
    );
    ensure!(bed.cli().metric_packets(codes::NO_BACKEND)? > 0, "counted under 158 (no backend)");
    Ok(())
}

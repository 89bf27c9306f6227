//! ClusterIP load balancing with real packets through a node namespace and
//! the agent's TC programs (issue 2, tests 1–5).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use weir_tests::cli::{codes, wait_until};
use weir_tests::clients::{self, DEFAULT_TIMEOUT, TcpConn};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};
use weir_tests::topology::Pod;

const HAIRPIN_SNAT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Test 1: TCP and UDP through a ClusterIP reach the backend, and replies come
/// back from the ClusterIP:port.
#[test]
fn tcp_and_udp_through_cluster_ip() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let tcp = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let udp = UdpServer::start(&backend, 5353)?;

    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let ports = [ServicePort::tcp("http", 80, 8080), ServicePort::udp("dns", 53, 5353)];
    bed.write_service("web", vip, &ports, &[&backend])?;
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend.ip()])?;
    assert_eq!(row.backends[0].port, 8080, "lb list: wrong target port: {row:?}");
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 53, "UDP", &[backend.ip()])?;

    // TCP: the handshake only completes if the SYN-ACK comes back from
    // vip:80 (the client would answer anything else with a RST), and the
    // data exchange proves both directions are translated.
    let tcp_vip = SocketAddrV4::new(vip, 80);
    assert_eq!(bed.wait_tcp(&client, tcp_vip)?, "backend");
    let mut conn = TcpConn::connect(&client, tcp_vip, DEFAULT_TIMEOUT)?;
    assert_eq!(conn.peer_addr()?, SocketAddr::V4(tcp_vip));
    assert_eq!(conn.exchange()?, "backend");
    assert_eq!(conn.exchange()?, "backend");
    let local = conn.local_addr()?;
    // No SNAT outside hairpin: the backend sees the client itself.
    assert!(
        tcp.peers().contains(&local),
        "backend did not see the client address {local}; it saw {:?}",
        tcp.peers()
    );

    // The service conntrack entry of this very connection.
    let ct = bed.cli().ct_list()?;
    let entry = ct
        .iter()
        .find(|e| {
            e.kind == "service"
                && e.protocol == "TCP"
                && SocketAddr::from((e.source.address, e.source.port)) == local
        })
        .with_context(|| format!("no service CT entry for {local} in `weir ct list`: {ct:#?}"))?;
    assert_eq!((entry.destination.address, entry.destination.port), (vip, 80));
    assert_eq!((entry.nat.address, entry.nat.port), (backend.ip(), 8080));
    assert_eq!(entry.state, "established", "{entry:?}");

    // UDP on an unconnected socket: the reply's source must be vip:53.
    let udp_vip = SocketAddrV4::new(vip, 53);
    let reply = bed.wait_udp(&client, udp_vip)?;
    assert_eq!(reply.name, "backend");
    assert_eq!(reply.from, SocketAddr::V4(udp_vip), "UDP reply not reverse-NATed");
    assert_eq!(udp.peers().last().map(SocketAddr::ip), Some(client.ip().into()));
    let ct = bed.cli().ct_list()?;
    assert!(
        ct.iter().any(|e| e.kind == "service"
            && e.protocol == "UDP"
            && e.source.address == client.ip()
            && (e.destination.address, e.destination.port) == (vip, 53)),
        "no UDP service CT entry: {ct:#?}"
    );
    Ok(())
}

/// Test 2: 600 new connections over 3 backends; each gets 20%–47%.
#[test]
fn spread_600_connections_over_3_backends() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends = [bed.add_pod("backend-a")?, bed.add_pod("backend-b")?, bed.add_pod("backend-c")?];
    let servers =
        backends.iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;

    let vip = Ipv4Addr::new(10, 96, 0, 20);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    bed.write_service("spread", vip, &ports, &backends.iter().collect::<Vec<_>>())?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(Pod::ip).collect();
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &ips)?;
    let addr = SocketAddrV4::new(vip, 80);
    bed.wait_tcp(&client, addr)?;
    let accepted_before: usize = servers.iter().map(TcpServer::accepted).sum();

    const N: usize = 600;
    let mut counts: BTreeMap<String, usize> = backends.iter().map(|p| (p.name().to_owned(), 0)).collect();
    for i in 0..N {
        let name = clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)
            .with_context(|| format!("connection {i} of {N}"))?;
        *counts.get_mut(&name).with_context(|| format!("answer from an unknown pod {name:?}"))? += 1;
    }
    eprintln!("spread of {N} connections: {counts:?}");
    let accepted: usize = servers.iter().map(TcpServer::accepted).sum::<usize>() - accepted_before;
    assert_eq!(accepted, N, "each request must be a new connection");
    for (name, count) in &counts {
        let share = *count as f64 / N as f64;
        assert!(
            (0.20..=0.47).contains(&share),
            "backend {name} got {count}/{N} ({:.1}%), outside 20%–47%: {counts:?}",
            share * 100.0
        );
    }
    Ok(())
}

/// Test 3: after an endpoint is removed from the EndpointSlice, no new
/// connection reaches it, while an established connection to it keeps
/// carrying data (it follows its conntrack entry).
#[test]
fn removed_endpoint_keeps_established_but_gets_no_new_connections() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends = [bed.add_pod("backend-a")?, bed.add_pod("backend-b")?, bed.add_pod("backend-c")?];
    let _servers =
        backends.iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;

    let vip = Ipv4Addr::new(10, 96, 0, 30);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    bed.write_service("shrink", vip, &ports, &backends.iter().collect::<Vec<_>>())?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(Pod::ip).collect();
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &ips)?;
    let addr = SocketAddrV4::new(vip, 80);
    bed.wait_tcp(&client, addr)?;

    // The established connection; whichever backend it reached is removed.
    let mut conn = TcpConn::connect(&client, addr, DEFAULT_TIMEOUT)?;
    let pinned = conn.exchange()?;
    let removed = backends
        .iter()
        .find(|p| p.name() == pinned)
        .with_context(|| format!("answer from an unknown pod {pinned:?}"))?;
    let remaining: Vec<&Pod> = backends.iter().filter(|p| p.name() != pinned).collect();
    bed.write_service("shrink", vip, &ports, &remaining)?;
    let remaining_ips: Vec<Ipv4Addr> = remaining.iter().map(|p| p.ip()).collect();
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &remaining_ips)?;
    eprintln!("removed {} ({}); remaining {remaining_ips:?}", removed.name(), removed.ip());

    assert_eq!(conn.exchange()?, pinned, "established connection broke after the endpoint was removed");
    // With 3 equally likely backends, 60 misses by chance happen with
    // probability (2/3)^60 ≈ 3e-11: this fails if removal is ignored.
    for i in 0..60 {
        let name = clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)
            .with_context(|| format!("new connection {i}"))?;
        assert_ne!(name, pinned, "new connection {i} reached the removed endpoint");
    }
    assert_eq!(conn.exchange()?, pinned, "established connection broke");
    Ok(())
}

/// The converse of test 3: an endpoint added to a live service starts
/// receiving new connections (the agent's diff adds it).
#[test]
fn added_endpoint_receives_new_connections() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let first = bed.add_pod("backend-a")?;
    let second = bed.add_pod("backend-b")?;
    let _servers =
        [TcpServer::start(&first, 8080, TcpMode::Lines)?, TcpServer::start(&second, 8080, TcpMode::Lines)?];

    let vip = Ipv4Addr::new(10, 96, 0, 35);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    bed.write_service("grow", vip, &ports, &[&first])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[first.ip()])?;
    let addr = SocketAddrV4::new(vip, 80);
    for i in 0..10 {
        let name = if i == 0 {
            bed.wait_tcp(&client, addr)?
        } else {
            clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?
        };
        assert_eq!(name, first.name(), "only backend-a is an endpoint yet");
    }

    bed.write_service("grow", vip, &ports, &[&first, &second])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[first.ip(), second.ip()])?;
    // With two equally likely backends, 60 connections all missing the new
    // one happens with probability 2^-60.
    let mut reached_second = 0;
    for i in 0..60 {
        let name = clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)
            .with_context(|| format!("connection {i}"))?;
        if name == second.name() {
            reached_second += 1;
        }
    }
    assert!(reached_second > 0, "no new connection reached the added endpoint");
    eprintln!("added endpoint got {reached_second}/60 new connections");
    Ok(())
}

/// Test 4a: once the Service is deleted, traffic to its ClusterIP is dropped
/// and counted under 174 ("Is a ClusterIP").
#[test]
fn deleted_service_traffic_is_dropped_and_counted() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let tcp = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let _udp = UdpServer::start(&backend, 5353)?;

    let vip = Ipv4Addr::new(10, 96, 0, 40);
    let ports = [ServicePort::tcp("http", 80, 8080), ServicePort::udp("dns", 53, 5353)];
    bed.write_service("doomed", vip, &ports, &[&backend])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend.ip()])?;
    let addr = SocketAddrV4::new(vip, 80);
    assert_eq!(bed.wait_tcp(&client, addr)?, "backend");

    let dropped_before = bed.cli().metric_packets(codes::IS_A_CLUSTER_IP)?;
    bed.manifests().remove("doomed.yaml")?;
    bed.cli().wait_for_no_frontend(AGENT_TIMEOUT, vip)?;
    let accepted_before = tcp.accepted();

    let result = TcpConn::connect(&client, addr, Duration::from_secs(1));
    assert!(result.is_err(), "connected to a deleted service: {result:?}");
    let udp = clients::udp_request(&client, SocketAddrV4::new(vip, 53), Duration::from_millis(500));
    assert!(udp.is_err(), "UDP answer from a deleted service: {udp:?}");
    assert_eq!(tcp.accepted(), accepted_before, "the backend still got a connection");

    let cli = bed.cli();
    wait_until(AGENT_TIMEOUT, "metric 174 to count the dropped packets", || {
        Ok(cli.metric_packets(codes::IS_A_CLUSTER_IP)? > dropped_before)
    })
    .with_context(|| format!("metrics: {:?}", cli.metrics()))?;
    let metric = cli
        .metrics()?
        .into_iter()
        .find(|m| m.code == codes::IS_A_CLUSTER_IP)
        .context("metric 174 missing")?;
    assert!(metric.drop, "metric 174 must be a drop reason: {metric:?}");
    Ok(())
}

/// Test 4b: a service whose only endpoint is not ready has a frontend and no
/// backend; its traffic is dropped and counted under 158.
#[test]
fn service_without_ready_endpoints_drops_with_158() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let tcp = TcpServer::start(&backend, 8080, TcpMode::Lines)?;

    // A working service first, so we know the client's interface is attached.
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let live = Ipv4Addr::new(10, 96, 0, 50);
    bed.write_service("live", live, &ports, &[&backend])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, live, 80, "TCP", &[backend.ip()])?;
    bed.wait_tcp(&client, SocketAddrV4::new(live, 80))?;

    let empty = Ipv4Addr::new(10, 96, 0, 51);
    bed.manifests().write(
        "empty.yaml",
        &[
            service(NAMESPACE, "empty", &empty.to_string(), &ports),
            endpoint_slice(NAMESPACE, "empty", "s1", &[Endpoint::not_ready(backend.ip())], &ports),
        ],
    )?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, empty, 80, "TCP", &[])?;
    let dropped_before = bed.cli().metric_packets(codes::NO_BACKEND)?;
    let accepted_before = tcp.accepted();

    let result = TcpConn::connect(&client, SocketAddrV4::new(empty, 80), Duration::from_secs(1));
    assert!(result.is_err(), "connected to a service without ready endpoints: {result:?}");
    assert_eq!(tcp.accepted(), accepted_before, "a not-ready endpoint got a connection");
    let cli = bed.cli();
    wait_until(AGENT_TIMEOUT, "metric 158 to count the dropped packets", || {
        Ok(cli.metric_packets(codes::NO_BACKEND)? > dropped_before)
    })
    .with_context(|| format!("metrics: {:?}", cli.metrics()))?;
    Ok(())
}

/// Test 5 (TCP): a pod that is the only backend of a service reaches the
/// service's ClusterIP and is answered by itself; it sees the connection come
/// from the hairpin SNAT address.
#[test]
fn hairpin_tcp() -> Result<()> {
    let mut bed = TestBed::new()?;
    let solo = bed.add_pod("solo")?;
    let tcp = TcpServer::start(&solo, 8080, TcpMode::Lines)?;

    let vip = Ipv4Addr::new(10, 96, 0, 60);
    bed.write_service("self", vip, &[ServicePort::tcp("http", 80, 8080)], &[&solo])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[solo.ip()])?;
    let addr = SocketAddrV4::new(vip, 80);
    assert_eq!(bed.wait_tcp(&solo, addr)?, "solo");

    let mut conn = TcpConn::connect(&solo, addr, DEFAULT_TIMEOUT)?;
    assert_eq!(conn.exchange()?, "solo");
    assert_eq!(conn.exchange()?, "solo");
    let seen = tcp.peers();
    let last = seen.last().context("the server saw no connection")?;
    ensure!(
        last.ip() == HAIRPIN_SNAT_IP,
        "hairpin connection should come from {HAIRPIN_SNAT_IP}, came from {last}"
    );
    let ct = bed.cli().ct_list()?;
    assert!(
        ct.iter().any(|e| e.flags.iter().any(|f| f == "hairpin")),
        "no conntrack entry flagged hairpin: {ct:#?}"
    );
    Ok(())
}

/// Test 5 (UDP): hairpin for datagrams; the reply comes from the ClusterIP.
#[test]
fn hairpin_udp() -> Result<()> {
    let mut bed = TestBed::new()?;
    let solo = bed.add_pod("solo")?;
    let udp = UdpServer::start(&solo, 5353)?;

    let vip = Ipv4Addr::new(10, 96, 0, 61);
    bed.write_service("self", vip, &[ServicePort::udp("dns", 53, 5353)], &[&solo])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 53, "UDP", &[solo.ip()])?;
    let addr = SocketAddrV4::new(vip, 53);
    let reply = bed.wait_udp(&solo, addr)?;
    assert_eq!(reply.name, "solo");
    assert_eq!(reply.from, SocketAddr::V4(addr), "hairpin UDP reply not reverse-NATed");
    assert_eq!(udp.peers().last().map(SocketAddr::ip), Some(HAIRPIN_SNAT_IP.into()));
    Ok(())
}

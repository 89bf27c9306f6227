//! Service semantics beyond the basic ClusterIP path: conntrack garbage
//! collection and full maps (issue 2: entries past their lifetime disappear; a
//! map that is too small is reported, never silent, while what fits keeps
//! being served), and kube-proxy behaviours users rely on (issue 6): UDP
//! flows leave a removed backend at once, session affinity.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weir_tests::agent::AgentOptions;
use weir_tests::cli::wait_until;
use weir_tests::clients::{DEFAULT_TIMEOUT, udp_request};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};

fn options(extra: &[&str]) -> AgentOptions {
    AgentOptions { extra_args: extra.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// A UDP flow through a service leaves a service and a flow entry; once idle
/// for longer than the (shortened) lifetime, the agent's GC deletes both.
#[test]
fn expired_entries_are_garbage_collected() -> Result<()> {
    let mut bed = TestBed::with_options(options(&["--ct-lifetime-non-tcp", "2", "--ct-gc-interval", "1"]))?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _udp = UdpServer::start(&backend, 5353)?;
    let vip = Ipv4Addr::new(10, 96, 0, 53);
    let ports = [ServicePort::udp("dns", 53, 5353)];
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    bed.manifests().write(
        "dns.yaml",
        &[
            service(NAMESPACE, "dns", &vip.to_string(), &ports),
            endpoint_slice(NAMESPACE, "dns", "s1", &endpoints, &ports),
        ],
    )?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 53, "UDP", &[backend.ip()])?;
    bed.wait_attached()?;
    let reply = udp_request(&client, SocketAddrV4::new(vip, 53), DEFAULT_TIMEOUT)?;
    ensure!(reply.name == "backend", "unexpected reply {reply:?}");

    let udp_entries = |bed: &TestBed| -> Result<usize> {
        Ok(bed.cli().ct_list()?.iter().filter(|e| e.protocol == "UDP").count())
    };
    // The client's side keeps a service and a flow entry, the backend's side
    // an ingress entry (where its ingress verdict was taken).
    let kinds: Vec<String> =
        bed.cli().ct_list()?.into_iter().filter(|e| e.protocol == "UDP").map(|e| e.kind).collect();
    ensure!(
        kinds.len() == 3 && ["service", "flow", "ingress"].iter().all(|k| kinds.iter().any(|x| x == k)),
        "{kinds:?}"
    );
    wait_until(Duration::from_secs(8), "the GC to delete the expired UDP entries", || {
        Ok(udp_entries(&bed)? == 0)
    })?;
    ensure!(bed.agent().log().contains("conntrack GC"), "the GC pass is logged:\n{}", bed.agent().log());
    Ok(())
}

/// With room for two frontends, a third is reported as a full map in the
/// log, and the two that fit are served.
#[test]
fn a_full_services_map_is_reported_and_the_rest_served() -> Result<()> {
    let mut bed = TestBed::with_options(options(&["--map-size-services", "2"]))?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _tcp = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let vips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(10, 96, 1, i)).collect();
    let mut docs = Vec::new();
    for (i, vip) in vips.iter().enumerate() {
        let name = format!("svc{i}");
        docs.push(service(NAMESPACE, &name, &vip.to_string(), &ports));
        docs.push(endpoint_slice(NAMESPACE, &name, "s1", &endpoints, &ports));
    }
    bed.manifests().write("three.yaml", &docs)?;
    bed.agent_mut()
        .wait_for_log_line(AGENT_TIMEOUT, "a map-full warning", |line| line.contains("map full"))?;
    let served = bed.cli().lb_list()?;
    ensure!(served.len() == 2, "two frontends fit: {served:#?}");
    // And the agent's metrics say which map is full. The counter is bumped
    // when the reconciliation that logged it returns.
    wait_until(AGENT_TIMEOUT, "weir_map_write_errors_total for the services map", || {
        let metrics = bed.scrape_metrics()?;
        Ok(metrics.lines().any(|l| {
            l.starts_with("weir_map_write_errors_total")
                && l.contains("map=\"LB4_SERVICES_V2\"")
                && l.contains("full=\"true\"")
        }))
    })?;
    bed.wait_attached()?;
    for row in &served {
        let vip = row.frontend.address;
        ensure!(bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))? == "backend", "{vip} is served");
    }
    Ok(())
}

/// A client that keeps one UDP socket (a resolver talking to a DNS service)
/// moves to the remaining backend as soon as its backend leaves the
/// service: the agent ends the UDP flows of removed backends, as kube-proxy
/// does, instead of letting them live until they idle out.
#[test]
fn udp_flows_to_a_removed_backend_end_at_once() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let old = bed.add_pod("old")?;
    let new = bed.add_pod("new")?;
    let _old_udp = UdpServer::start(&old, 5353)?;
    let _new_udp = UdpServer::start(&new, 5353)?;
    let vip = Ipv4Addr::new(10, 96, 0, 54);
    let ports = [ServicePort::udp("dns", 53, 5353)];
    let write = |bed: &TestBed, pod: &weir_tests::topology::Pod| {
        let endpoints = [Endpoint::for_pod(pod.ip(), pod.name(), bed.node().name())];
        bed.manifests().write(
            "dns.yaml",
            &[
                service(NAMESPACE, "dns", &vip.to_string(), &ports),
                endpoint_slice(NAMESPACE, "dns", "s1", &endpoints, &ports),
            ],
        )
    };
    write(&bed, &old)?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 53, "UDP", &[old.ip()])?;
    bed.wait_attached()?;

    let socket = client.run(|| -> std::io::Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(SocketAddrV4::new(vip, 53))?;
        socket.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(socket)
    })??;
    let ask = || -> Result<String> {
        socket.send(b"q\n")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    ensure!(ask()? == "old");

    write(&bed, &new)?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 53, "UDP", &[new.ip()])?;
    // The flush follows the map update within the same sync; wait for it.
    bed.agent_mut().wait_for_log_line(AGENT_TIMEOUT, "the UDP flush", |l| l.contains("ended UDP flows"))?;
    ensure!(ask()? == "new", "the same UDP socket must reach the new backend at once");
    Ok(())
}

/// `sessionAffinity: ClientIP`: every new connection of one client goes to
/// the same backend (31 in a row over 3 backends: by chance 1 in 10^14).
#[test]
fn session_affinity_keeps_a_client_on_one_backend() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends: Vec<_> = (0..3).map(|i| bed.add_pod(&format!("be{i}"))).collect::<Result<_>>()?;
    let _servers: Vec<_> =
        backends.iter().map(|b| TcpServer::start(b, 8080, TcpMode::Lines)).collect::<Result<_>>()?;
    let vip = Ipv4Addr::new(10, 96, 0, 80);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints: Vec<Endpoint> =
        backends.iter().map(|b| Endpoint::for_pod(b.ip(), b.name(), bed.node().name())).collect();
    let mut svc = service(NAMESPACE, "sticky", &vip.to_string(), &ports);
    svc["spec"]["sessionAffinity"] = serde_json::json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = serde_json::json!({"clientIP": {"timeoutSeconds": 60}});
    bed.manifests()
        .write("sticky.yaml", &[svc, endpoint_slice(NAMESPACE, "sticky", "s1", &endpoints, &ports)])?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.ip()).collect();
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &ips)?;
    ensure!(row.flags.iter().any(|f| f == "SessionAffinity"), "lb list shows the affinity: {row:?}");
    bed.wait_attached()?;
    let first = bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;
    for _ in 0..30 {
        let name = weir_tests::clients::tcp_request(&client, SocketAddrV4::new(vip, 80), DEFAULT_TIMEOUT)?;
        ensure!(name == first, "affinity broken: {name} after {first}");
    }
    Ok(())
}

/// A new connection to a service with no endpoints, or to an address in the
/// service range that no service has, is refused at once (ICMP port
/// unreachable, as kube-proxy's REJECT) instead of hanging until a timeout;
/// the drop is still counted.
#[test]
fn connections_to_services_without_endpoints_are_refused() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let vip = Ipv4Addr::new(10, 96, 0, 90);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints = [Endpoint::not_ready(backend.ip())];
    bed.manifests().write(
        "empty.yaml",
        &[
            service(NAMESPACE, "empty", &vip.to_string(), &ports),
            endpoint_slice(NAMESPACE, "empty", "s1", &endpoints, &ports),
        ],
    )?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[])?;
    bed.wait_attached()?;
    for (addr, code) in
        [(SocketAddrV4::new(vip, 80), 158), (SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 91), 80), 174)]
    {
        let started = std::time::Instant::now();
        let result =
            client.run(move || std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)))?;
        let err = result.err().ok_or_else(|| anyhow::anyhow!("{addr}: connected, but nothing serves it"))?;
        ensure!(
            err.kind() == std::io::ErrorKind::ConnectionRefused,
            "{addr}: {err} after {:?}",
            started.elapsed()
        );
        ensure!(
            started.elapsed() < Duration::from_secs(1),
            "{addr}: refused only after {:?}",
            started.elapsed()
        );
        ensure!(bed.cli().metric_packets(code)? > 0, "{addr}: drop code {code} counted");
    }
    Ok(())
}

/// `weir.dev/lb-algorithm: maglev`: the backend is a function of the flow,
/// so the same client address and port always land on the same backend
/// (with random selection, 12 connections from one port would spread).
#[test]
fn maglev_picks_the_same_backend_for_the_same_flow() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends: Vec<_> = (0..3).map(|i| bed.add_pod(&format!("mg{i}"))).collect::<Result<_>>()?;
    let _servers: Vec<_> =
        backends.iter().map(|b| TcpServer::start(b, 8080, TcpMode::Lines)).collect::<Result<_>>()?;
    let vip = Ipv4Addr::new(10, 96, 0, 81);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints: Vec<Endpoint> =
        backends.iter().map(|b| Endpoint::for_pod(b.ip(), b.name(), bed.node().name())).collect();
    let mut svc = service(NAMESPACE, "hashed", &vip.to_string(), &ports);
    svc["metadata"]["annotations"] = serde_json::json!({"weir.dev/lb-algorithm": "maglev"});
    bed.manifests()
        .write("hashed.yaml", &[svc, endpoint_slice(NAMESPACE, "hashed", "s1", &endpoints, &ports)])?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.ip()).collect();
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &ips)?;
    ensure!(row.flags.iter().any(|f| f == "Maglev"), "lb list shows Maglev: {row:?}");
    bed.wait_attached()?;
    bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;

    // Each connection from the same source port, closed with a reset so the
    // port is free again at once (no TIME_WAIT). The reset goes out when the
    // last reference to the socket closes: a process another test forks in
    // the meantime holds one until its exec, and for those milliseconds the
    // old socket still owns the tuple (connect says EADDRNOTAVAIL), so that
    // error is retried briefly.
    let connect_from = move |port: u16| -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
        socket.connect_timeout(&SocketAddrV4::new(vip, 80).into(), DEFAULT_TIMEOUT)?;
        socket.set_linger(Some(Duration::ZERO))?;
        Ok(socket.into())
    };
    let from_port = |port: u16| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let stream = loop {
            match client.run(move || connect_from(port))? {
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.with_context(|| format!("connect from port {port}"))?,
            }
        };
        let mut conn = weir_tests::clients::TcpConn::from_stream(stream, DEFAULT_TIMEOUT)?;
        conn.exchange()
    };
    let mut seen = std::collections::BTreeSet::new();
    for port in [40001, 40002, 40003, 40004] {
        let first = from_port(port)?;
        for _ in 0..3 {
            ensure!(from_port(port)? == first, "port {port}: the flow moved off {first}");
        }
        seen.insert(first);
    }
    ensure!(!seen.is_empty());
    Ok(())
}

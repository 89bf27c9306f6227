//! Service semantics users rely on, proven with real packets (issue 6):
//! traffic policy `Local` (external on a NodePort, internal on a ClusterIP),
//! session affinity that ends after its timeout, serving-terminating
//! endpoints (KEP-1669: no new connections while a ready endpoint exists,
//! the fallback when none does, never an endpoint that is not serving), and
//! named target ports resolved per EndpointSlice. Where `weir lb list` shows
//! the state (frontend kind, affinity timeout, backend state) the tests read
//! it too.
//!
//! The traffic-policy tests add a second node without an agent, linked to
//! the first (its pods in 10.244.1.0/24), and a client outside the cluster on
//! the first node's uplink (198.18.40.0/24).
//!
//! Every "never" below is a count over many new connections that would, by
//! chance, all miss a backend that should not be used with a probability of
//! at most 2^-49, so each test fails when the semantics are not honoured.
//!
//! Pods reaching an `externalTrafficPolicy: Local` address use every
//! endpoint, as with kube-proxy and Cilium: the agent writes an internal
//! twin of such a frontend, which in-cluster clients look up.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weir_tests::cli::{LbService, codes, wait_for, wait_until};
use weir_tests::clients::{DEFAULT_TIMEOUT, TcpConn, connect_from, connect_when_ready, tally, tcp_request};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, node_port_service, service};
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::topology::{Pod, external_host, second_node};

/// The first node's address on its uplink, where its NodePorts listen.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 1);
/// The client outside the cluster.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);

/// New connections per check: if a backend that must not be used were one
/// of two equally likely choices, all of them missing it would happen with
/// probability 2^-50.
const CONNECTIONS: usize = 50;
/// How long a connection that must fail is given.
const FAILING_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts that must all fail.
const FAILING_ATTEMPTS: usize = 5;

/// Fails unless every one of [`FAILING_ATTEMPTS`] connections fails.
fn ensure_connections_fail(connect: impl Fn() -> Result<TcpConn>, what: &str) -> Result<()> {
    for i in 0..FAILING_ATTEMPTS {
        if let Ok(mut conn) = connect() {
            let answer = conn.exchange().unwrap_or_else(|e| format!("no answer: {e:#}"));
            anyhow::bail!("{what}: attempt {i} connected ({answer})");
        }
    }
    Ok(())
}

/// The backend states of a `weir lb list` row, by address.
fn states(row: &LbService) -> BTreeMap<Ipv4Addr, &str> {
    row.backends.iter().map(|b| (b.address, b.state.as_str())).collect()
}

/// `externalTrafficPolicy: Local` on a NodePort: external clients reach only
/// this node's backend, which sees their own address; the backend on the
/// other node gets nothing, even when it is the only one left (the NodePort
/// then drops, as kube-proxy's "has no local endpoints"). The ClusterIP is
/// not affected, and with the policy `Cluster` the remote backend is
/// reachable through the same NodePort, so its silence above is the policy's
/// doing.
#[test]
fn external_traffic_policy_local_serves_a_node_port_from_local_endpoints_only() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = external_host(bed.node(), "ext", NODE_IP, CLIENT_IP)?;
    let node2 = second_node(bed.node())?;
    let local = bed.add_pod("local")?;
    let remote = node2.add_pod("remote", Ipv4Addr::new(10, 244, 1, 5))?;
    let local_server = TcpServer::start(&local, 8080, TcpMode::Lines)?;
    let remote_server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 7, 10);
    let node_port = 30710;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let local_endpoint = Endpoint::for_pod(local.ip(), local.name(), bed.node().name());
    let remote_endpoint = Endpoint::for_pod(remote.ip(), remote.name(), node2.name());
    let write = |bed: &TestBed, policy: &str, endpoints: &[Endpoint]| {
        let mut svc = node_port_service(NAMESPACE, "etp", &vip.to_string(), &ports, node_port);
        svc["spec"]["externalTrafficPolicy"] = json!(policy);
        bed.manifests().write("etp.yaml", &[svc, endpoint_slice(NAMESPACE, "etp", "s1", endpoints, &ports)])
    };
    write(&bed, "Local", &[local_endpoint.clone(), remote_endpoint.clone()])?;
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, node_port, "TCP", &[local.ip()])?;
    ensure!(row.flags.iter().any(|f| f == "NodePort"), "lb list flags the NodePort: {row:?}");
    bed.cli()
        .wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[local.ip(), remote.ip()])
        .context("the ClusterIP keeps both backends (the policy is for external traffic)")?;
    bed.wait_attached()?;

    let target = SocketAddrV4::new(NODE_IP, node_port);
    connect_when_ready(&client, target, AGENT_TIMEOUT)?;
    let answers = tally(CONNECTIONS, || connect_from(&client, target, DEFAULT_TIMEOUT)?.exchange())?;
    eprintln!("{CONNECTIONS} connections to the NodePort: {answers:?}");
    ensure!(answers.keys().all(|name| name == "local"), "only the local backend answers: {answers:?}");
    let peers = local_server.peers();
    ensure!(
        peers.iter().all(|p| p.ip() == CLIENT_IP),
        "the local backend sees the client's own address: {peers:?}"
    );
    ensure!(remote_server.accepted() == 0, "the remote backend got {} connections", remote_server.accepted());

    // Only the remote endpoint is left: the NodePort has no backend here.
    write(&bed, "Local", std::slice::from_ref(&remote_endpoint))?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, node_port, "TCP", &[])?;
    let dropped_before = bed.cli().metric_packets(codes::NO_BACKEND)?;
    ensure_connections_fail(
        || connect_from(&client, target, FAILING_TIMEOUT),
        "a NodePort without local endpoints",
    )?;
    ensure!(remote_server.accepted() == 0, "the remote backend got {} connections", remote_server.accepted());
    ensure!(bed.cli().metric_packets(codes::NO_BACKEND)? > dropped_before, "the drops are counted as 158");

    write(&bed, "Cluster", &[remote_endpoint])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, NODE_IP, node_port, "TCP", &[remote.ip()])?;
    let name = wait_for(AGENT_TIMEOUT, "the NodePort to reach the remote backend", || {
        Ok(connect_from(&client, target, DEFAULT_TIMEOUT).and_then(|mut c| c.exchange()).ok())
    })?;
    ensure!(name == "remote", "policy Cluster: answered by {name}");
    Ok(())
}

/// `internalTrafficPolicy: Local` on a ClusterIP: a pod reaches only the
/// backend on its own node, never the one on the other node; with no local
/// endpoint its connections fail. Switching the policy to `Cluster` then
/// reaches the remote backend, which proves it was reachable all along.
#[test]
fn internal_traffic_policy_local_keeps_pods_on_their_own_node() -> Result<()> {
    let mut bed = TestBed::new()?;
    let node2 = second_node(bed.node())?;
    let client = bed.add_pod("client")?;
    let local = bed.add_pod("local")?;
    let remote = node2.add_pod("remote", Ipv4Addr::new(10, 244, 1, 6))?;
    let _local_server = TcpServer::start(&local, 8080, TcpMode::Lines)?;
    let remote_server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 7, 20);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let local_endpoint = Endpoint::for_pod(local.ip(), local.name(), bed.node().name());
    let remote_endpoint = Endpoint::for_pod(remote.ip(), remote.name(), node2.name());
    let write = |bed: &TestBed, policy: &str, endpoints: &[Endpoint]| {
        let mut svc = service(NAMESPACE, "itp", &vip.to_string(), &ports);
        svc["spec"]["internalTrafficPolicy"] = json!(policy);
        bed.manifests().write("itp.yaml", &[svc, endpoint_slice(NAMESPACE, "itp", "s1", endpoints, &ports)])
    };
    write(&bed, "Local", &[local_endpoint, remote_endpoint.clone()])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[local.ip()])?;
    let target = SocketAddrV4::new(vip, 80);
    bed.wait_tcp(&client, target)?;
    let answers = tally(CONNECTIONS, || tcp_request(&client, target, DEFAULT_TIMEOUT))?;
    eprintln!("{CONNECTIONS} connections to the ClusterIP: {answers:?}");
    ensure!(answers.keys().all(|name| name == "local"), "only the local backend answers: {answers:?}");
    ensure!(remote_server.accepted() == 0, "the remote backend got {} connections", remote_server.accepted());

    write(&bed, "Local", std::slice::from_ref(&remote_endpoint))?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[])?;
    ensure_connections_fail(
        || TcpConn::connect(&client, target, FAILING_TIMEOUT),
        "a ClusterIP without local endpoints",
    )?;
    // Dropped, not refused: kube-proxy's "has no local endpoints" is a DROP
    // (a service without any endpoint is a REJECT).
    let attempt = client.run(move || TcpStream::connect_timeout(&target.into(), FAILING_TIMEOUT))?;
    ensure!(
        attempt.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "a Local policy without local endpoints drops (the connect times out): {attempt:?}"
    );
    ensure!(remote_server.accepted() == 0, "the remote backend got {} connections", remote_server.accepted());

    write(&bed, "Cluster", &[remote_endpoint])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[remote.ip()])?;
    ensure!(bed.wait_tcp(&client, target)? == "remote", "policy Cluster reaches the remote backend");
    Ok(())
}

/// `sessionAffinity: ClientIP` with `timeoutSeconds: 2`: a client that keeps
/// opening connections keeps its backend, also for longer than the timeout
/// in all (the timeout counts from its last connection, as kube-proxy's
/// `recent` match); once it stays quiet for longer than the timeout, its
/// next connection is balanced again, and sticks to where it lands.
#[test]
fn session_affinity_ends_after_the_timeout_without_connections() -> Result<()> {
    const TIMEOUT_SECONDS: u64 = 2;
    // The datapath counts whole seconds: idle for more than timeout + 1.
    const IDLE: Duration = Duration::from_millis(TIMEOUT_SECONDS * 1000 + 1500);
    // With 3 backends, a rebalanced client stays where it was with
    // probability 1/3: 12 idle periods all in place happen with 2e-6.
    const IDLE_ROUNDS: usize = 12;

    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends: Vec<Pod> = (0..3).map(|i| bed.add_pod(&format!("aff{i}"))).collect::<Result<_>>()?;
    let _servers: Vec<TcpServer> =
        backends.iter().map(|b| TcpServer::start(b, 8080, TcpMode::Lines)).collect::<Result<_>>()?;
    let vip = Ipv4Addr::new(10, 96, 7, 30);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints: Vec<Endpoint> =
        backends.iter().map(|b| Endpoint::for_pod(b.ip(), b.name(), bed.node().name())).collect();
    let mut svc = service(NAMESPACE, "brief", &vip.to_string(), &ports);
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": TIMEOUT_SECONDS}});
    bed.manifests()
        .write("brief.yaml", &[svc, endpoint_slice(NAMESPACE, "brief", "s1", &endpoints, &ports)])?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(Pod::ip).collect();
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &ips)?;
    let rows: Vec<Value> = bed.cli().json(&["lb", "list"])?;
    let row = rows.iter().find(|r| r["frontend"]["address"] == vip.to_string()).context("no row")?;
    ensure!(
        row["flags"].as_array().is_some_and(|f| f.contains(&json!("SessionAffinity")))
            && row["affinity_timeout_seconds"] == TIMEOUT_SECONDS,
        "lb list shows the affinity and its timeout: {row:#}"
    );

    let target = SocketAddrV4::new(vip, 80);
    let first = bed.wait_tcp(&client, target)?;
    let request = || tcp_request(&client, target, DEFAULT_TIMEOUT);
    for i in 0..20 {
        ensure!(request()? == first, "connection {i} in a row left {first}");
    }
    // 4 connections 1.2 s apart: 4.8 s in all, no gap longer than the timeout.
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(1200));
        ensure!(request()? == first, "a connection {i} after 1.2 s left {first}");
    }

    // After each idle period, the backend of the next connection.
    let mut after_idle = vec![first];
    let moved = loop {
        ensure!(
            after_idle.len() <= IDLE_ROUNDS,
            "{IDLE_ROUNDS} idle periods of {IDLE:?} and the client never left its backend: {after_idle:?}"
        );
        std::thread::sleep(IDLE);
        let name = request()?;
        after_idle.push(name.clone());
        if after_idle[after_idle.len() - 2] != name {
            break name;
        }
    };
    eprintln!("backends after idle periods of {IDLE:?}: {after_idle:?}");
    for i in 0..20 {
        ensure!(request()? == moved, "connection {i} after rebalancing left {moved}");
    }
    Ok(())
}

/// `externalTrafficPolicy: Local` restricts traffic from outside the
/// cluster only: a pod that connects to the service's LoadBalancer IP is
/// balanced over every endpoint, as kube-proxy does ("pod traffic for
/// external destinations" jumps to the cluster-wide chain) and Cilium does
/// (its internal lookup scope). Here the only endpoint is on the other node.
#[test]
fn pods_reach_an_external_traffic_policy_local_address_through_every_endpoint() -> Result<()> {
    let mut bed = TestBed::new()?;
    let node2 = second_node(bed.node())?;
    let client = bed.add_pod("client")?;
    let remote = node2.add_pod("remote", Ipv4Addr::new(10, 244, 1, 7))?;
    let _remote_server = TcpServer::start(&remote, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 7, 60);
    let lb_ip = Ipv4Addr::new(198, 18, 41, 9);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let mut svc = service(NAMESPACE, "lb-local", &vip.to_string(), &ports);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["ports"][0]["nodePort"] = json!(30711);
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}});
    let endpoints = [Endpoint::for_pod(remote.ip(), remote.name(), node2.name())];
    bed.manifests()
        .write("lb-local.yaml", &[svc, endpoint_slice(NAMESPACE, "lb-local", "s1", &endpoints, &ports)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[remote.ip()])?;
    wait_until(AGENT_TIMEOUT, "the LoadBalancer IP's frontend", || {
        Ok(bed.cli().service(lb_ip, 80, "TCP")?.is_some())
    })?;
    ensure!(bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))? == "remote", "the ClusterIP works");
    let answer = tcp_request(&client, SocketAddrV4::new(lb_ip, 80), DEFAULT_TIMEOUT);
    ensure!(
        answer.as_ref().is_ok_and(|name| name == "remote"),
        "a pod connecting to the LoadBalancer IP: {answer:?}"
    );
    // `weir lb list`: the external entry (no local backend) and its twin.
    let rows = bed.cli().lb_list()?;
    let at_lb: Vec<&LbService> = rows.iter().filter(|r| r.frontend.address == lb_ip).collect();
    let external = at_lb.iter().find(|r| !r.flags.iter().any(|f| f == "internal")).context("external row")?;
    let internal = at_lb.iter().find(|r| r.flags.iter().any(|f| f == "internal")).context("internal row")?;
    ensure!(
        ["LoadBalancer", "ExternalLocal"].iter().all(|f| external.flags.iter().any(|x| x == f))
            && external.backends.is_empty(),
        "the external entry: type, policy, local backends only: {external:?}"
    );
    ensure!(internal.backends.len() == 1, "the internal twin has every endpoint: {internal:?}");
    Ok(())
}

/// Serving-terminating endpoints (KEP-1669, kube-proxy's
/// `pkg/proxy/topology.go`): while a ready endpoint exists, a terminating one
/// takes no new connection, but a connection opened to it while it was
/// ready keeps working; once only terminating endpoints are left, the
/// serving ones take new connections (shown as `terminating` by `weir lb
/// list`), and one that is no longer serving is never used.
#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let [ready, draining, stopped] = ["ready", "draining", "stopped"].map(|name| bed.add_pod(name));
    let (ready, draining, stopped) = (ready?, draining?, stopped?);
    let _ready_server = TcpServer::start(&ready, 8080, TcpMode::Lines)?;
    let draining_server = TcpServer::start(&draining, 8080, TcpMode::Lines)?;
    let stopped_server = TcpServer::start(&stopped, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 7, 40);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let node = bed.node().name().to_owned();
    let endpoint = |pod: &Pod| Endpoint::for_pod(pod.ip(), pod.name(), &node);
    let write = |bed: &TestBed, endpoints: &[Endpoint]| {
        bed.manifests().write(
            "drain.yaml",
            &[
                service(NAMESPACE, "drain", &vip.to_string(), &ports),
                endpoint_slice(NAMESPACE, "drain", "s1", endpoints, &ports),
            ],
        )
    };
    let target = SocketAddrV4::new(vip, 80);
    let request = || tcp_request(&client, target, DEFAULT_TIMEOUT);

    write(&bed, &[endpoint(&ready), endpoint(&draining)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[ready.ip(), draining.ip()])?;
    bed.wait_tcp(&client, target)?;
    let mut to_draining = wait_for(AGENT_TIMEOUT, "a connection to the draining pod", || {
        let mut conn = TcpConn::connect(&client, target, DEFAULT_TIMEOUT)?;
        Ok((conn.exchange()? == "draining").then_some(conn))
    })?;

    // The pod starts terminating while still serving.
    write(&bed, &[endpoint(&ready), endpoint(&draining).terminating(true)])?;
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[ready.ip()])?;
    ensure!(states(&row) == BTreeMap::from([(ready.ip(), "active")]), "lb list: {row:?}");
    ensure!(to_draining.exchange()? == "draining", "the established connection to the draining pod broke");
    let accepted = draining_server.accepted();
    let answers = tally(CONNECTIONS, request)?;
    eprintln!("{CONNECTIONS} connections with a ready and a terminating endpoint: {answers:?}");
    ensure!(answers.keys().all(|name| name == "ready"), "only the ready endpoint answers: {answers:?}");
    ensure!(draining_server.accepted() == accepted, "the terminating endpoint accepted new connections");
    ensure!(to_draining.exchange()? == "draining", "the established connection to the draining pod broke");

    // No ready endpoint left: the serving one of the terminating endpoints
    // takes the new connections.
    write(&bed, &[endpoint(&draining).terminating(true), endpoint(&stopped).terminating(false)])?;
    let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[draining.ip()])?;
    ensure!(
        states(&row) == BTreeMap::from([(draining.ip(), "terminating")]),
        "lb list marks the fallback backend terminating: {row:?}"
    );
    let answers = tally(CONNECTIONS, request)?;
    eprintln!("{CONNECTIONS} connections with terminating endpoints only: {answers:?}");
    ensure!(answers.keys().all(|name| name == "draining"), "only the serving endpoint answers: {answers:?}");
    ensure!(stopped_server.accepted() == 0, "a terminating endpoint that is not serving got a connection");
    ensure!(to_draining.exchange()? == "draining", "the established connection to the draining pod broke");

    // Nothing serving at all: no backend, connections are refused.
    write(&bed, &[endpoint(&stopped).terminating(false)])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[])?;
    ensure_connections_fail(
        || TcpConn::connect(&client, target, FAILING_TIMEOUT),
        "a service whose only endpoint is not serving",
    )?;
    ensure!(stopped_server.accepted() == 0, "a terminating endpoint that is not serving got a connection");
    Ok(())
}

/// A Service whose ports name their targets (`http` → `web`, `admin` →
/// `admin`), served by two EndpointSlices whose pods number those ports
/// differently (and list them in a different order): each service port
/// reaches, on each backend, the process its slice names, and no other.
#[test]
fn named_target_ports_resolve_per_endpoint_slice() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let first = bed.add_pod("first")?;
    let second = bed.add_pod("second")?;
    // Every pod listens on every port in play, so a port resolved wrongly
    // reaches a process that counts it instead of a refusal.
    let listened = [8080, 8081, 9090, 9091];
    let mut servers = BTreeMap::new();
    for pod in [&first, &second] {
        for port in listened {
            servers.insert((pod.name().to_owned(), port), TcpServer::start(pod, port, TcpMode::Lines)?);
        }
    }
    let vip = Ipv4Addr::new(10, 96, 7, 50);
    let mut svc = service(
        NAMESPACE,
        "multi",
        &vip.to_string(),
        &[ServicePort::tcp("http", 80, 8080), ServicePort::tcp("admin", 81, 9090)],
    );
    svc["spec"]["ports"][0]["targetPort"] = json!("web");
    svc["spec"]["ports"][1]["targetPort"] = json!("admin");
    let slice = |suffix: &str, pod: &Pod, ports: &[ServicePort]| {
        let endpoints = [Endpoint::for_pod(pod.ip(), pod.name(), bed.node().name())];
        endpoint_slice(NAMESPACE, "multi", suffix, &endpoints, ports)
    };
    let first_ports = [ServicePort::tcp("http", 80, 8080), ServicePort::tcp("admin", 81, 9090)];
    let second_ports = [ServicePort::tcp("admin", 81, 9091), ServicePort::tcp("http", 80, 8081)];
    bed.manifests().write(
        "multi.yaml",
        &[svc, slice("s1", &first, &first_ports), slice("s2", &second, &second_ports)],
    )?;

    // (service port, the target port on each pod)
    let expected = [(80, [(&first, 8080), (&second, 8081)]), (81, [(&first, 9090), (&second, 9091)])];
    for (port, targets) in &expected {
        let ips = targets.map(|(pod, _)| pod.ip());
        let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, *port, "TCP", &ips)?;
        let mut have: Vec<(Ipv4Addr, u16)> = row.backends.iter().map(|b| (b.address, b.port)).collect();
        have.sort();
        let mut want: Vec<(Ipv4Addr, u16)> = targets.iter().map(|(pod, p)| (pod.ip(), *p)).collect();
        want.sort();
        ensure!(have == want, "lb list, port {port}: {have:?}, expected {want:?}");
    }
    bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;

    for (port, targets) in &expected {
        let before: BTreeMap<_, usize> = servers.iter().map(|(k, s)| (k.clone(), s.accepted())).collect();
        let target = SocketAddrV4::new(vip, *port);
        let answers = tally(CONNECTIONS, || tcp_request(&client, target, DEFAULT_TIMEOUT))?;
        eprintln!("{CONNECTIONS} connections to port {port}: {answers:?}");
        for ((pod, listening), server) in &servers {
            let got = server.accepted() - before[&(pod.clone(), *listening)];
            let named = targets.iter().any(|(p, t)| p.name() == pod && t == listening);
            let want = if named { answers.get(pod).copied().unwrap_or(0) } else { 0 };
            ensure!(
                got == want,
                "port {port}: {pod}:{listening} accepted {got} connections, expected {want} ({answers:?})"
            );
        }
        for (pod, _) in targets {
            ensure!(
                answers.contains_key(pod.name()),
                "port {port}: {} never answered: {answers:?}",
                pod.name()
            );
        }
    }
    Ok(())
}

//! Traffic from the node itself (issue 6): processes in the node's network
//! namespace — kubelet, hostNetwork pods — reach ClusterIPs as kube-proxy's
//! OUTPUT-chain rules let them, through the socket-LB hooks (cgroup
//! connect4/sendmsg4/recvmsg4/getpeername4): translated once per socket, no
//! per-packet NAT, the service address shown back to the application, and
//! connected UDP sockets never left talking to a removed backend.
//!
//! The agent attaches the hooks to a cgroup made for this test, and the test
//! process joins it: nothing outside the test is affected. One test function
//! runs the cases in order, because joining a cgroup moves the whole process.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use weir_tests::agent::AgentOptions;
use weir_tests::cgroup::TestCgroup;
use weir_tests::cli::codes::SOCK_LB_TRANSLATED;
use weir_tests::cli::wait_until;
use weir_tests::clients::{DEFAULT_TIMEOUT, TcpConn, connect_from};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, node_port_service, service};
use weir_tests::netns::NetNs;
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};

/// The node's own address (kubelet's InternalIP), on its loopback device.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 40, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 40, 11);
const NODE_PORT: u16 = 30400;

fn connected_udp(node: &NetNs, addr: SocketAddrV4) -> Result<UdpSocket> {
    let socket = node
        .run(move || -> std::io::Result<UdpSocket> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(addr)?;
            Ok(socket)
        })?
        .with_context(|| format!("node process: UDP connect to {addr}"))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(socket)
}

/// One request on a connected UDP socket: the answering pod's name.
fn udp_exchange(socket: &UdpSocket) -> std::io::Result<String> {
    socket.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// Service `web` (TCP 80, UDP 53) backed by `pods`, and `empty` without
/// endpoints.
fn write_backends(bed: &TestBed, pods: &[&weir_tests::topology::Pod]) -> Result<()> {
    let ports = [ServicePort::tcp("http", 80, 8080), ServicePort::udp("dns", 53, 5353)];
    let endpoints: Vec<Endpoint> =
        pods.iter().map(|p| Endpoint::for_pod(p.ip(), p.name(), bed.node().name())).collect();
    let web = node_port_service(NAMESPACE, "web", &VIP.to_string(), &ports, NODE_PORT);
    bed.manifests().write(
        "web.yaml",
        &[
            web,
            endpoint_slice(NAMESPACE, "web", "s1", &endpoints, &ports),
            service(NAMESPACE, "empty", &EMPTY_VIP.to_string(), &ports[..1]),
        ],
    )
}

#[test]
fn node_processes_reach_services_through_the_socket_lb() -> Result<()> {
    let cgroup = TestCgroup::create()?;
    let path = cgroup.path().to_string_lossy().into_owned();
    let options =
        AgentOptions { extra_args: vec!["--socket-lb-cgroup".into(), path], ..AgentOptions::default() };
    let mut bed = TestBed::with_options(options)?;
    let node = bed.node().netns();
    node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    let a = bed.add_pod("backend-a")?;
    let b = bed.add_pod("backend-b")?;
    let tcp_a = TcpServer::start(&a, 8080, TcpMode::Lines)?;
    let tcp_b = TcpServer::start(&b, 8080, TcpMode::Lines)?;
    let udp_a = UdpServer::start(&a, 5353)?;
    let _udp_b = UdpServer::start(&b, 5353)?;

    write_backends(&bed, &[&a])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, 80, "TCP", &[a.ip()])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, 53, "UDP", &[a.ip()])?;
    bed.wait_attached()?;
    let node = bed.node().netns();

    let membership = cgroup.join()?;
    let http = SocketAddrV4::new(VIP, 80);
    let dns = SocketAddrV4::new(VIP, 53);
    let translated_before = bed.cli().metric_packets(SOCK_LB_TRANSLATED)?;

    // TCP: connected to the backend itself, yet getpeername says ClusterIP.
    let mut conn = connect_from(node, http, DEFAULT_TIMEOUT)?;
    ensure!(conn.exchange()? == "backend-a", "a node process reaches the ClusterIP over TCP");
    ensure!(conn.peer_addr()? == SocketAddr::V4(http), "getpeername() shows the service address");
    ensure!(
        tcp_a.peers().iter().any(|p| p.ip() == std::net::IpAddr::V4(NODE_IP)),
        "the backend sees the node's address: {:?}",
        tcp_a.peers()
    );
    // Translated at connect: the datapath keeps no per-packet NAT state.
    let ct = bed.cli().ct_list()?;
    ensure!(ct.iter().all(|e| e.kind != "service"), "no service conntrack entry for socket LB: {ct:#?}");

    // NodePorts from the node itself: on its address and on 127.0.0.1
    // (kube-proxy's localhost NodePorts).
    for address in [NODE_IP, Ipv4Addr::LOCALHOST] {
        let target = SocketAddrV4::new(address, NODE_PORT);
        let mut node_port = connect_from(node, target, DEFAULT_TIMEOUT)?;
        ensure!(node_port.exchange()? == "backend-a", "a node process reaches the NodePort on {address}");
        ensure!(node_port.peer_addr()? == SocketAddr::V4(target), "getpeername() shows {target}");
    }

    // Unconnected UDP: sendmsg4 translates, recvmsg4 shows the service as source.
    let unconnected = node.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
    unconnected.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    unconnected.send_to(b"ping\n", dns)?;
    let mut buf = [0u8; 512];
    let (n, from) = unconnected.recv_from(&mut buf).context("a reply to an unconnected UDP socket")?;
    ensure!(String::from_utf8_lossy(&buf[..n]).trim() == "backend-a");
    ensure!(from == SocketAddr::V4(dns), "the reply's source is the ClusterIP, not {from}");

    // Connected UDP: the socket is bound to backend a at connect().
    let dns_socket = connected_udp(node, dns)?;
    ensure!(udp_exchange(&dns_socket)? == "backend-a");
    ensure!(dns_socket.peer_addr()? == SocketAddr::V4(dns), "getpeername() on UDP shows the service");
    let translated = bed.cli().metric_packets(SOCK_LB_TRANSLATED)? - translated_before;
    ensure!(translated >= 5, "the socket-LB counter counts the translations: {translated}");

    // No endpoints: refused at once, as kube-proxy's REJECT.
    let started = Instant::now();
    let refused =
        node.run(|| TcpStream::connect_timeout(&SocketAddrV4::new(EMPTY_VIP, 80).into(), DEFAULT_TIMEOUT))?;
    match refused {
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("a service without endpoints refuses the connection, got {other:?}"),
    }
    ensure!(started.elapsed() < Duration::from_secs(1), "refused at once: {:?}", started.elapsed());

    // Backend change: a leaves, b takes over.
    write_backends(&bed, &[&b])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, 53, "UDP", &[b.ip()])?;
    let mut fresh = connect_from(node, http, DEFAULT_TIMEOUT)?;
    ensure!(fresh.exchange()? == "backend-b", "new connections follow the backend change");
    ensure!(tcp_b.peers().len() == 1, "b served the new connection: {:?}", tcp_b.peers());
    // Established TCP keeps its backend (as under kube-proxy).
    ensure!(conn.exchange()? == "backend-a", "the established TCP connection keeps working");

    // The connected UDP socket must not stay pinned to a: the agent destroys
    // it, the application sees an error, and its reconnect reaches b.
    let requests_before = udp_a.requests();
    let mut outcome = None;
    wait_until(
        Duration::from_secs(5),
        "the connected UDP socket to leave backend a",
        || match udp_exchange(&dns_socket) {
            Ok(name) if name == "backend-a" => Ok(false),
            Ok(name) => bail!("the connected socket moved to {name} without a reconnect"),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(err) => {
                outcome = Some(err);
                Ok(true)
            }
        },
    )?;
    let err = outcome.context("an error")?;
    // The kernel aborts the socket (ECONNABORTED, reported once) and
    // disconnects it, so a send without an address fails with EDESTADDRREQ.
    ensure!(
        matches!(err.raw_os_error(), Some(libc::ECONNABORTED | libc::EDESTADDRREQ)),
        "the destroyed socket reports ECONNABORTED or EDESTADDRREQ, got {err:?}"
    );
    ensure!(
        udp_a.requests() <= requests_before + 1,
        "at most one datagram raced the removal to a: {} → {}",
        requests_before,
        udp_a.requests()
    );
    let reconnected = connected_udp(node, dns)?;
    ensure!(udp_exchange(&reconnected)? == "backend-b", "the reconnect reaches the live backend");
    ensure!(bed.agent().log().contains("destroyed node UDP sockets"), "the agent logs it");

    // Scope: a pod's socket, in the same cgroup, is not translated by the
    // socket hooks (another namespace); the tc datapath serves it instead.
    membership.check()?;
    let mut pod_conn = TcpConn::connect(&a, http, DEFAULT_TIMEOUT)?;
    ensure!(pod_conn.exchange()? == "backend-b");
    let ct = bed.cli().ct_list()?;
    ensure!(
        ct.iter().any(|e| e.kind == "service"),
        "the pod's connection went through the tc datapath (a service entry): {ct:#?}"
    );

    // The hooks are pinned links: the socket LB serves with the agent down,
    // and the restarted agent replaces them without a gap.
    bed.agent_mut().kill()?;
    let mut while_down = connect_from(bed.node().netns(), http, DEFAULT_TIMEOUT)?;
    ensure!(while_down.exchange()? == "backend-b", "socket LB with the agent down");
    bed.agent_mut().restart()?;
    wait_until(AGENT_TIMEOUT, "the restarted agent to attach the socket LB", || {
        bed.agent_mut().ensure_running()?;
        Ok(bed.agent().log().matches("socket LB attached").count() >= 2)
    })?;
    let mut after = connect_from(bed.node().netns(), http, DEFAULT_TIMEOUT)?;
    ensure!(after.exchange()? == "backend-b", "socket LB after the restart");
    ensure!(while_down.exchange()? == "backend-b", "a connection made meanwhile keeps working");
    drop(membership);
    Ok(())
}

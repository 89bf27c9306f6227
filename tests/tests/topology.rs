//! The harness itself, without the agent: two pods on one node reach each
//! other by pod IP through the node's static routes, and the guards clean up.
//! If this fails, every other test's failure is about the harness, not Weir.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use weir_tests::clients::{self, TcpConn};
use weir_tests::names::TEST_PREFIX;
use weir_tests::netns;
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};
use weir_tests::topology::Node;

const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn pod_to_pod_direct() -> Result<()> {
    weir_tests::require_root();
    let root_ip_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;

    let node = Node::create(TEST_PREFIX)?;
    let a = node.add_pod("pod-a", Ipv4Addr::new(10, 244, 0, 2))?;
    let b = node.add_pod("pod-b", Ipv4Addr::new(10, 244, 0, 3))?;

    // The node forwards; the sysctl was set in the node, not in the root namespace.
    assert_eq!(node.netns().sysctl("net.ipv4.ip_forward")?, "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?,
        root_ip_forward,
        "the harness changed the root namespace's ip_forward"
    );
    assert_eq!(node.netns().sysctl(&format!("net.ipv4.conf.{}.rp_filter", a.host_interface()))?, "0");

    let tcp_b = TcpServer::start(&b, 8080, TcpMode::Lines)?;
    let udp_b = UdpServer::start(&b, 5353)?;
    let http_a = TcpServer::start(&a, 8081, TcpMode::Http)?;

    // TCP, a long-lived connection answered line after line.
    let mut conn = TcpConn::connect(&a, SocketAddrV4::new(b.ip(), 8080), TIMEOUT)?;
    assert_eq!(conn.exchange()?, "pod-b");
    assert_eq!(conn.exchange()?, "pod-b");
    assert_eq!(conn.peer_addr()?, SocketAddr::from((b.ip(), 8080)));
    // No NAT on the direct path: the server sees the client's pod IP.
    assert_eq!(tcp_b.peers(), vec![conn.local_addr()?]);
    assert_eq!(tcp_b.requests(), 2);

    // UDP: the reply comes from the server's address.
    let reply = clients::udp_request(&a, SocketAddrV4::new(b.ip(), 5353), TIMEOUT)?;
    assert_eq!(reply.name, "pod-b");
    assert_eq!(reply.from, SocketAddr::from((b.ip(), 5353)));
    assert_eq!(udp_b.peers()[0].ip(), a.ip());

    // And the other way round, over HTTP.
    assert_eq!(clients::http_get(&b, SocketAddrV4::new(a.ip(), 8081), TIMEOUT)?, "pod-a");
    assert_eq!(http_a.requests(), 1);

    // An address without a pod is not reachable: the checks above can fail.
    let nobody = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 99), 8080);
    assert!(clients::tcp_request(&a, nobody, Duration::from_millis(500)).is_err());
    Ok(())
}

#[test]
fn guards_remove_namespaces_and_interfaces() -> Result<()> {
    weir_tests::require_root();
    let node = Node::create(TEST_PREFIX)?;
    let node_name = node.name().to_owned();
    let pod = node.add_pod("gone", Ipv4Addr::new(10, 244, 0, 2))?;
    let pod_ns = pod.netns().name().to_owned();
    let host_if = pod.host_interface().to_owned();
    let server = TcpServer::start(&pod, 8080, TcpMode::Lines)?;
    assert!(Path::new(&netns::path_of(&pod_ns)).exists());

    drop(server);
    drop(pod);
    let links = node.netns().ip(&["-o", "link", "show"])?;
    assert!(!links.contains(&format!("{host_if}@")), "{host_if} still exists:\n{links}");
    assert!(!netns::path_of(&pod_ns).exists(), "{pod_ns} still exists");

    drop(node);
    assert!(!netns::path_of(&node_name).exists(), "{node_name} still exists");
    Ok(())
}

//! Issue 2, test 7: SIGKILL the agent and start it again. The datapath keeps
//! running while the agent is dead (pins keep programs, links and maps alive),
//! the restarted agent adopts the state, and an established TCP connection
//! carries data before, during and after.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use weir_tests::cli::LbService;
use weir_tests::clients::{self, DEFAULT_TIMEOUT, TcpConn};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};

/// `weir lb list` in a canonical order (frontends, then backends by slot).
fn sorted(mut lb: Vec<LbService>) -> Vec<LbService> {
    for s in &mut lb {
        s.backends.sort_by_key(|b| b.slot);
    }
    lb.sort_by(|a, b| {
        (a.frontend.address, a.frontend.port, &a.frontend.protocol).cmp(&(
            b.frontend.address,
            b.frontend.port,
            &b.frontend.protocol,
        ))
    });
    lb
}

#[test]
fn agent_sigkill_and_restart_keeps_connections_and_maps() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backends = [bed.add_pod("backend-a")?, bed.add_pod("backend-b")?];
    let _tcp =
        backends.iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;
    let _udp = backends.iter().map(|p| UdpServer::start(p, 5353)).collect::<Result<Vec<_>>>()?;

    let node = bed.node().name().to_owned();
    let endpoints: Vec<Endpoint> =
        backends.iter().map(|p| Endpoint::for_pod(p.ip(), p.name(), &node)).collect();
    let web = Ipv4Addr::new(10, 96, 0, 70);
    let dns = Ipv4Addr::new(10, 96, 0, 71);
    let web_ports = [ServicePort::tcp("http", 80, 8080)];
    let dns_ports = [ServicePort::udp("dns", 53, 5353)];
    bed.manifests().write(
        "services.yaml",
        &[
            service(NAMESPACE, "web", &web.to_string(), &web_ports),
            endpoint_slice(NAMESPACE, "web", "s1", &endpoints, &web_ports),
            service(NAMESPACE, "dns", &dns.to_string(), &dns_ports),
            endpoint_slice(NAMESPACE, "dns", "s1", &endpoints, &dns_ports),
        ],
    )?;
    let ips: Vec<Ipv4Addr> = backends.iter().map(|p| p.ip()).collect();
    bed.cli().wait_for_backends(AGENT_TIMEOUT, web, 80, "TCP", &ips)?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, dns, 53, "UDP", &ips)?;
    let addr = SocketAddrV4::new(web, 80);
    bed.wait_tcp(&client, addr)?;
    bed.wait_udp(&client, SocketAddrV4::new(dns, 53))?;

    // The datapath works as soon as a link exists, a moment before the agent
    // pins it: wait for the pins so the kill finds a settled state.
    bed.wait_attached()?;
    let mut links_before = bed.agent().pinned_links()?;
    links_before.sort_unstable();

    // Before.
    let mut conn =
        TcpConn::connect(&client, addr, DEFAULT_TIMEOUT).context("before: long-lived connection")?;
    let pinned = conn.exchange().context("before: exchange")?;
    let before = sorted(bed.cli().lb_list()?);
    assert_eq!(before.len(), 2, "{before:#?}");

    // During: the agent is dead, the datapath is not.
    bed.agent_mut().kill()?;
    let during = conn.exchange().context("during: exchange on the established connection")?;
    assert_eq!(during, pinned, "established connection moved when the agent died");
    assert_eq!(sorted(bed.cli().lb_list()?), before, "maps changed when the agent died");
    clients::tcp_request(&client, addr, DEFAULT_TIMEOUT).context("during: new TCP connection")?;
    clients::udp_request(&client, SocketAddrV4::new(dns, 53), DEFAULT_TIMEOUT)
        .context("during: UDP request")?;

    // After: the restarted agent works (it programs a new service) and kept
    // the existing state as it was, ids and slots included.
    bed.agent_mut().restart()?;
    let probe = Ipv4Addr::new(10, 96, 0, 72);
    bed.manifests().write(
        "probe.yaml",
        &[
            service(NAMESPACE, "probe", &probe.to_string(), &web_ports),
            endpoint_slice(NAMESPACE, "probe", "s1", &endpoints, &web_ports),
        ],
    )?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, probe, 80, "TCP", &ips)?;
    bed.agent_mut().ensure_running()?;
    let after: Vec<LbService> =
        sorted(bed.cli().lb_list()?).into_iter().filter(|s| s.frontend.address != probe).collect();
    assert_eq!(after, before, "`weir lb list` differs after the restart");
    let mut links_after = bed.agent().pinned_links()?;
    links_after.sort_unstable();
    assert_eq!(
        links_after, links_before,
        "the restarted agent replaced its pinned links instead of adopting them"
    );
    let after_restart = conn.exchange().context("after: exchange on the established connection")?;
    assert_eq!(after_restart, pinned, "established connection moved after the restart");
    bed.wait_tcp(&client, SocketAddrV4::new(probe, 80)).context("after: the new service")?;
    clients::tcp_request(&client, addr, DEFAULT_TIMEOUT).context("after: new TCP connection")?;
    let last = conn.exchange().context("after: last exchange")?;
    assert_eq!(last, pinned);
    Ok(())
}

/// `weir-agent uninstall` is the explicit opposite of a stop: programs are
/// detached (traffic to the ClusterIP no longer translated) and every pin
/// is gone.
#[test]
fn uninstall_removes_programs_links_and_pins() -> anyhow::Result<()> {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
    use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
    use weir_tests::servers::{TcpMode, TcpServer};

    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 0, 70);
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    bed.manifests().write(
        "web.yaml",
        &[
            service(NAMESPACE, "web", &vip.to_string(), &ports),
            endpoint_slice(NAMESPACE, "web", "s1", &endpoints, &ports),
        ],
    )?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend.ip()])?;
    anyhow::ensure!(bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))? == "backend");

    bed.agent_mut().kill()?;
    let root = bed.agent().bpffs_root().to_owned();
    let status = std::process::Command::new(weir_tests::agent::binary("WEIR_AGENT_BIN", "weir-agent")?)
        .args(["uninstall", "--bpffs-root"])
        .arg(&root)
        .status()?;
    anyhow::ensure!(status.success(), "uninstall failed: {status}");
    anyhow::ensure!(!root.exists(), "{} still exists", root.display());
    // The kernel releases an unpinned link from a work queue: poll briefly.
    weir_tests::cli::wait_until(AGENT_TIMEOUT, "the ClusterIP to stop answering", || {
        let result = weir_tests::clients::tcp_request(
            &client,
            SocketAddrV4::new(vip, 80),
            std::time::Duration::from_millis(300),
        );
        Ok(result.is_err())
    })?;
    Ok(())
}

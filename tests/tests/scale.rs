//! Issue 2, test 6: 10,000 services in one manifest file; the first-added and
//! last-added ClusterIPs (at opposite ends of 10.96.0.0/12) both work.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;
use weir_tests::cli::wait_for_every;
use weir_tests::fixture::{NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::servers::{TcpMode, TcpServer};

const SERVICES: u32 = 10_000;

/// Service `i`'s ClusterIP: spread over the whole 10.96.0.0/12 (2^20
/// addresses) with a stride of 104, from 10.96.0.10 to 10.111.222.82.
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i * 104)
}

#[test]
fn ten_thousand_services_first_and_last_work() -> Result<()> {
    assert!(vip(SERVICES - 1) < Ipv4Addr::new(10, 112, 0, 0), "VIPs leave 10.96.0.0/12");
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;

    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoint = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    let mut docs: Vec<Value> = Vec::with_capacity(2 * SERVICES as usize);
    for i in 0..SERVICES {
        let name = format!("svc-{i:05}");
        docs.push(service(NAMESPACE, &name, &vip(i).to_string(), &ports));
        docs.push(endpoint_slice(NAMESPACE, &name, "s1", &endpoint, &ports));
    }
    let started = Instant::now();
    bed.manifests().write("many.yaml", &docs)?;

    let (first, last) = (vip(0), vip(SERVICES - 1));
    let cli = bed.cli().clone();
    // Programming 20,000 map entries takes the (debug) agent tens of seconds
    // on a small, busy CI machine; poll the 10,000-row list only every 2 s so
    // the polling does not compete with the agent for the CPU.
    wait_for_every(
        Duration::from_secs(2),
        Duration::from_secs(240),
        "all 10,000 frontends in `weir lb list`",
        || {
            let lb = cli.lb_list()?;
            let ends: Vec<_> =
                lb.iter().filter(|s| s.frontend.address == first || s.frontend.address == last).collect();
            let done = lb.len() >= SERVICES as usize
                && ends.len() == 2
                && ends.iter().all(|s| s.backends.len() == 1);
            Ok(done.then_some(()))
        },
    )?;
    eprintln!("10,000 services programmed {:?} after the file was written", started.elapsed());
    let lb = cli.lb_list()?;
    assert_eq!(lb.len(), SERVICES as usize, "unexpected number of frontends");

    for (what, address) in [("last-added", last), ("first-added", first), ("middle", vip(SERVICES / 2))] {
        let answered = bed.wait_tcp(&client, SocketAddrV4::new(address, 80))?;
        assert_eq!(answered, "backend", "{what} service {address}");
    }
    Ok(())
}

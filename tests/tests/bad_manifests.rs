//! Issue 2, test 8: malformed manifests next to good ones are reported in the
//! agent's log (file and object name, "skipped") and skipped, while the good
//! services are served, both when files change under a running agent and
//! when an agent starts on an existing directory.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use serde_json::json;
use weir_tests::cli::wait_until;
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::servers::{TcpMode, TcpServer};

/// What must be reported: (file, object name or None for a syntax error).
const BAD: &[(&str, Option<&str>)] = &[
    ("bad-ip.yaml", Some("bad-ip")),
    ("bad-port.yaml", Some("bad-port")),
    ("unknown-kind.yaml", Some("mystery")),
    ("syntax.yaml", None),
    ("mixed.yaml", Some("mixed-bad")),
];

/// The log lines of the agent's latest run.
fn latest_run(log: &str) -> &str {
    log.rfind("=== weir-tests: starting").map_or(log, |i| &log[i..])
}

fn reported(log: &str, file: &str, object: Option<&str>) -> bool {
    latest_run(log).lines().any(|line| {
        line.contains(file) && line.contains("skipped") && object.is_none_or(|name| line.contains(name))
    })
}

#[test]
fn malformed_manifests_are_reported_and_skipped() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let endpoints = [Endpoint::for_pod(backend.ip(), backend.name(), bed.node().name())];
    let good = Ipv4Addr::new(10, 96, 0, 80);
    let mixed_good = Ipv4Addr::new(10, 96, 0, 81);
    let bad_port_vip = Ipv4Addr::new(10, 96, 0, 82);
    let mixed_bad_vip = Ipv4Addr::new(10, 96, 0, 83);

    let m = bed.manifests();
    m.write(
        "good.yaml",
        &[
            service(NAMESPACE, "good", &good.to_string(), &ports),
            endpoint_slice(NAMESPACE, "good", "s1", &endpoints, &ports),
        ],
    )?;
    m.write(
        "bad-ip.yaml",
        &[
            service(NAMESPACE, "bad-ip", "10.96.0.300", &ports),
            endpoint_slice(NAMESPACE, "bad-ip", "s1", &endpoints, &ports),
        ],
    )?;
    let mut bad_port = service(NAMESPACE, "bad-port", &bad_port_vip.to_string(), &ports);
    bad_port["spec"]["ports"][0]["port"] = json!(70000);
    m.write("bad-port.yaml", &[bad_port, endpoint_slice(NAMESPACE, "bad-port", "s1", &endpoints, &ports)])?;
    m.write(
        "unknown-kind.yaml",
        &[json!({ "apiVersion": "v1", "kind": "Frobnicator", "metadata": { "name": "mystery", "namespace": NAMESPACE } })],
    )?;
    m.write_raw(
        "syntax.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: [broken\n  namespace: default\nspec: {\n",
    )?;
    // One file, one good and one bad object: only the bad one is skipped.
    let mut mixed_bad = service(NAMESPACE, "mixed-bad", &mixed_bad_vip.to_string(), &ports);
    mixed_bad["spec"]["clusterIP"] = json!("not-an-ip");
    mixed_bad["spec"]["clusterIPs"] = json!(["not-an-ip"]);
    m.write(
        "mixed.yaml",
        &[
            service(NAMESPACE, "mixed-good", &mixed_good.to_string(), &ports),
            endpoint_slice(NAMESPACE, "mixed-good", "s1", &endpoints, &ports),
            mixed_bad,
        ],
    )?;

    for run in ["watching", "starting"] {
        if run == "starting" {
            // The same directory read at start-up rather than through the watch.
            bed.agent_mut().restart()?;
        }
        for (file, object) in BAD {
            let agent = bed.agent_mut();
            let logged = wait_until(
                AGENT_TIMEOUT,
                &format!("{run}: a log line with {file}, {object:?} and \"skipped\""),
                || {
                    agent.ensure_running()?;
                    Ok(reported(&agent.log(), file, *object))
                },
            );
            if let Err(e) = logged {
                panic!("{e:#}\nagent log:\n{}", agent.log());
            }
        }
        bed.cli().wait_for_backends(AGENT_TIMEOUT, good, 80, "TCP", &[backend.ip()])?;
        bed.cli().wait_for_backends(AGENT_TIMEOUT, mixed_good, 80, "TCP", &[backend.ip()])?;
        assert_eq!(bed.wait_tcp(&client, SocketAddrV4::new(good, 80))?, "backend");
        assert_eq!(bed.wait_tcp(&client, SocketAddrV4::new(mixed_good, 80))?, "backend");
        let frontends: Vec<Ipv4Addr> = bed.cli().lb_list()?.iter().map(|s| s.frontend.address).collect();
        assert!(
            !frontends.contains(&bad_port_vip) && !frontends.contains(&mixed_bad_vip),
            "{run}: a skipped service has a frontend: {frontends:?}"
        );
        assert_eq!(frontends.len(), 2, "{run}: only the two good services should be served: {frontends:?}");
    }
    Ok(())
}

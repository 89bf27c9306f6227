//! kube-proxy's `healthCheckNodePort` servers: a cloud load balancer in front
//! of a `type: LoadBalancer`, `externalTrafficPolicy: Local` Service probes
//! every node on that port, over HTTP, and sends traffic only to the nodes
//! that answer 200 (those with a ready endpoint of the Service). The load
//! balancer here is a client in its own namespace on the node's uplink.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use weir_tests::cli::{wait_for, wait_until};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::{ServicePort, endpoint_slice, service};
use weir_tests::netns::NetNs;
use weir_tests::topology::external_host;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(2);

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and its
/// EndpointSlice.
fn manifests(name: &str, vip: &str, health_port: u16, endpoints: &[Value]) -> Vec<Value> {
    let ports = [ServicePort::tcp("http", 80, 8080)];
    let mut svc = service(NAMESPACE, name, vip, &ports);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["spec"]["healthCheckNodePort"] = json!(health_port);
    svc["spec"]["ports"][0]["nodePort"] = json!(health_port - 2000);
    let mut slice = endpoint_slice(NAMESPACE, name, "s1", &[], &ports);
    slice["endpoints"] = json!(endpoints);
    vec![svc, slice]
}

/// A ready endpoint on `node`, for [`manifests`].
fn on(node: &str, host: u8) -> Value {
    json!({"addresses": [format!("10.244.0.{host}")], "conditions": {"ready": true}, "nodeName": node})
}

/// One health-check answer.
#[derive(Debug)]
struct Probe {
    status: u16,
    /// Header names in lower case.
    headers: BTreeMap<String, String>,
    body: Value,
}

/// `GET /` from the load balancer to the node's `port`; `Ok(None)` when the
/// connection is refused (no listener).
fn probe(lb: &NetNs, port: u16) -> Result<Option<Probe>> {
    let target = SocketAddr::V4(SocketAddrV4::new(NODE_IP, port));
    let mut stream = match lb.run(|| TcpStream::connect_timeout(&target, TIMEOUT))? {
        Ok(stream) => stream,
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("connecting to {target}")),
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("reading the answer of {target}"))?;
    let (head, body) = response.split_once("\r\n\r\n").with_context(|| format!("not HTTP: {response:?}"))?;
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = serde_json::from_str(body).with_context(|| format!("not JSON: {body:?}"))?;
    Ok(Some(Probe { status: status.with_context(|| format!("no status: {head:?}"))?, headers, body }))
}

/// Polls until the probe of `port` reports `local` endpoints, and returns it.
fn wait_for_count(bed: &TestBed, lb: &NetNs, port: u16, local: u64) -> Result<Probe> {
    wait_for(AGENT_TIMEOUT, &format!("port {port} to report {local} local endpoints"), || {
        Ok(probe(lb, port)?.filter(|p| p.body["localEndpoints"] == local))
    })
    .with_context(|| format!("agent log:\n{}", bed.agent().log()))
}

fn wait_refused(lb: &NetNs, port: u16) -> Result<()> {
    wait_until(
        AGENT_TIMEOUT,
        &format!("port {port} to refuse connections"),
        || Ok(probe(lb, port)?.is_none()),
    )
}

#[test]
fn health_check_node_port_reports_ready_local_endpoints() -> Result<()> {
    let bed = TestBed::new()?;
    let lb = external_host(bed.node(), "lb", NODE_IP, LB_IP)?;
    let (here, port) = (bed.node().name().to_owned(), 32100);
    let write = |endpoints: &[Value]| {
        bed.manifests().write("web.yaml", &manifests("web", "10.96.0.40", port, endpoints))
    };

    write(&[on(&here, 10), on("elsewhere", 11)])?;
    let answer = wait_for_count(&bed, &lb, port, 1)?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers["x-load-balancing-endpoint-weight"], "1");
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.headers["x-content-type-options"], "nosniff");
    assert_eq!(answer.body["service"], json!({"namespace": NAMESPACE, "name": "web"}));
    assert_eq!(answer.body["serviceProxyHealthy"], true);

    // Not ready, or serving but terminating: not counted.
    let mut not_ready = on(&here, 13);
    not_ready["conditions"] = json!({"ready": false});
    let mut terminating = on(&here, 14);
    terminating["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    write(&[on(&here, 10), on(&here, 12), not_ready, terminating.clone(), on("elsewhere", 11)])?;
    let answer = wait_for_count(&bed, &lb, port, 2)?;
    assert_eq!((answer.status, answer.headers["x-load-balancing-endpoint-weight"].as_str()), (200, "2"));

    write(&[on("elsewhere", 11), terminating])?;
    let answer = wait_for_count(&bed, &lb, port, 0)?;
    assert_eq!(answer.status, 503, "no ready local endpoint: the load balancer must skip this node");
    assert_eq!(answer.headers["x-load-balancing-endpoint-weight"], "0");

    bed.manifests().remove("web.yaml")?;
    wait_refused(&lb, port)?;
    Ok(())
}

#[test]
fn health_check_node_port_moves_and_a_taken_port_is_only_a_warning() -> Result<()> {
    let mut bed = TestBed::new()?;
    let lb = external_host(bed.node(), "lb", NODE_IP, LB_IP)?;
    let here = bed.node().name().to_owned();
    let (taken, old, new) = (32110, 32111, 32112);
    // Another process of the node holds `taken`.
    let squatter = bed.node().netns().run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, taken)))??;
    bed.manifests().write("squat.yaml", &manifests("squat", "10.96.0.41", taken, &[on(&here, 10)]))?;
    let web = |port| manifests("web", "10.96.0.42", port, &[on(&here, 11)]);
    bed.manifests().write("web.yaml", &web(old))?;
    wait_for_count(&bed, &lb, old, 1)?;
    let line = bed.agent_mut().wait_for_log_line(AGENT_TIMEOUT, "a warning about the taken port", |l| {
        l.contains("WARN") && l.contains("healthCheckNodePort") && l.contains(&taken.to_string())
    })?;
    assert!(line.contains("default/squat"), "the warning names the service: {line}");
    let metrics = bed.scrape_metrics()?;
    assert!(
        metrics.lines().any(|l| l.starts_with("weir_health_check_bind_errors_total ") && !l.ends_with(" 0")),
        "bind failures are counted: {metrics}"
    );

    // Freed, the port is taken on the next sync (here: the next change).
    drop(squatter);
    bed.manifests().write("web.yaml", &web(new))?;
    wait_for_count(&bed, &lb, new, 1)?;
    wait_refused(&lb, old)?;
    let answer = wait_for_count(&bed, &lb, taken, 1)?;
    assert_eq!(answer.body["service"]["name"], "squat");
    bed.agent_mut().ensure_running()?;
    Ok(())
}

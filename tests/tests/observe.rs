//! The flow monitor (issue 5), with real packets through a node namespace:
//! `weir observe` and the Hubble-compatible Observer gRPC API, read back over
//! the agent's unix socket (and its TCP address) by the CLI and by a tonic
//! client built from the .proto files.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};
use weir_proto::flow::{FlowFilter, Verdict};
use weir_proto::health::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weir_proto::observer::{
    GetAgentEventsRequest, GetFlowsRequest, GetNodesRequest, ServerStatusRequest, ServerStatusResponse,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,
};
use weir_tests::agent::{AgentOptions, binary};
use weir_tests::cli::{wait_for, wait_until};
use weir_tests::clients::{self, DEFAULT_TIMEOUT, TcpConn, udp_request};
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::manifests::ServicePort;
use weir_tests::servers::{TcpMode, TcpServer, UdpServer};

/// Short, for connections that are expected to be dropped.
const DROP_TIMEOUT: Duration = Duration::from_millis(300);

/// Runs `weir observe <args> -o json` and returns its responses.
fn observe(bed: &TestBed, args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["observe"];
    full.extend(args);
    full.extend(["-o", "json"]);
    let out = bed.cli().output(&full)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "`weir {}` failed ({}): {}",
        full.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("`weir {}`: not JSON: {l}", full.join(" "))))
        .collect()
}

/// The flows among `weir observe` responses.
fn flows(responses: &[Value]) -> Vec<Value> {
    responses.iter().filter_map(|r| r.get("flow").cloned()).collect()
}

/// Runs plain `weir observe <args>` (compact output) and returns stdout.
fn observe_text(bed: &TestBed, args: &[&str]) -> Result<String> {
    let mut full = vec!["observe"];
    full.extend(args);
    let out = bed.cli().output(&full)?;
    ensure!(
        out.status.success(),
        "`weir {}` failed: {}",
        full.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `weir observe --all` until a flow satisfies `pred`.
fn wait_flow(bed: &TestBed, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    wait_for(AGENT_TIMEOUT, what, || Ok(flows(&observe(bed, &["--all"])?).into_iter().find(|f| pred(f))))
        .with_context(|| format!("flows: {:#}", json!(flows(&observe(bed, &["--all"]).unwrap_or_default()))))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[*k]).as_str().unwrap_or("")
}

fn u64_at(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// (protocol, source port, destination port) of a flow.
fn l4(f: &Value) -> (&str, u64, u64) {
    for proto in ["TCP", "UDP", "SCTP"] {
        if let Some(p) = f["l4"].get(proto) {
            return (proto, u64_at(p, &["source_port"]), u64_at(p, &["destination_port"]));
        }
    }
    ("", 0, 0)
}

/// The TCP connection's flow as the client's egress saw it (to-stack).
fn is_egress_of(f: &Value, sport: u16) -> bool {
    l4(f).1 == u64::from(sport) && str_at(f, &["trace_observation_point"]) == "TO_STACK"
}

/// A client of the agent's Observer API over its unix socket (a fresh
/// runtime per call: the tests are synchronous).
fn socket_of(bed: &TestBed) -> PathBuf {
    weir_proto::default_socket_path(bed.agent().bpffs_root())
}

async fn unix_channel(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_static("http://weir-agent").connect_with_connector(connector).await?)
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn server_status(bed: &TestBed) -> Result<ServerStatusResponse> {
    let path = socket_of(bed);
    block_on(async move {
        let mut client = ObserverClient::new(unix_channel(&path).await?);
        Ok(client.server_status(ServerStatusRequest {}).await?.into_inner())
    })
}

/// Test 1: a connection through a ClusterIP is two flows — the client's
/// egress, translated (backend address and port, the Service, the ClusterIP
/// it addressed), and the backend's ingress — with pods, identities and
/// Hubble's event types; the compact line reads like hubble's.
#[test]
fn cluster_ip_connection_is_a_flow() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 5, 10);
    bed.write_service("web", vip, &[ServicePort::tcp("http", 80, 8080)], &[&backend])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend.ip()])?;
    bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;

    let mut conn = TcpConn::connect(&client, SocketAddrV4::new(vip, 80), DEFAULT_TIMEOUT)?;
    assert_eq!(conn.exchange()?, "backend");
    let sport = conn.local_addr()?.port();

    let egress = wait_flow(&bed, "the client's egress flow", |f| is_egress_of(f, sport))?;
    assert_eq!(str_at(&egress, &["verdict"]), "FORWARDED", "{egress:#}");
    assert_eq!(str_at(&egress, &["source", "namespace"]), NAMESPACE);
    assert_eq!(str_at(&egress, &["source", "pod_name"]), "client");
    assert_eq!(str_at(&egress, &["destination", "pod_name"]), "backend");
    assert!(u64_at(&egress, &["source", "identity"]) >= 256, "pod identity: {egress:#}");
    assert!(u64_at(&egress, &["destination", "identity"]) >= 256, "pod identity: {egress:#}");
    assert_ne!(u64_at(&egress, &["source", "identity"]), u64_at(&egress, &["destination", "identity"]));
    assert!(egress["source"]["labels"].as_array().unwrap().contains(&json!("k8s:app=client")), "{egress:#}");
    // Translated: the backend, its port, the Service, and the ClusterIP.
    assert_eq!(str_at(&egress, &["IP", "source"]), client.ip().to_string());
    assert_eq!(str_at(&egress, &["IP", "destination"]), backend.ip().to_string());
    assert_eq!(l4(&egress), ("TCP", u64::from(sport), 8080));
    assert_eq!(egress["destination_service"], json!({ "name": "web", "namespace": NAMESPACE }));
    assert_eq!(egress["extensions"]["value"]["original_destination_ip"], json!(vip.to_string()));
    assert_eq!(egress["extensions"]["value"]["original_destination_port"], json!(80));
    assert_eq!(egress["event_type"], json!({ "type": 4, "sub_type": 3 }), "to-stack");
    assert_eq!(str_at(&egress, &["traffic_direction"]), "EGRESS");
    assert_eq!(egress["is_reply"], json!(false));
    assert_eq!(egress["l4"]["TCP"]["flags"], json!({ "SYN": true }));
    assert_eq!(str_at(&egress, &["Summary"]), "TCP Flags: SYN");
    assert_eq!(str_at(&egress, &["node_name"]), bed.node().name());
    assert_eq!(str_at(&egress, &["Type"]), "L3_L4");
    assert_eq!(str_at(&egress, &["interface", "name"]), client.host_interface());

    let ingress = wait_flow(&bed, "the backend's ingress flow", |f| {
        l4(f).1 == u64::from(sport) && str_at(f, &["trace_observation_point"]) == "TO_ENDPOINT"
    })?;
    assert_eq!(str_at(&ingress, &["source", "pod_name"]), "client");
    assert_eq!(str_at(&ingress, &["destination", "pod_name"]), "backend");
    assert_eq!(ingress["event_type"], json!({ "type": 4 }), "to-endpoint is sub-type 0");
    assert_eq!(str_at(&ingress, &["traffic_direction"]), "INGRESS");
    assert_eq!(str_at(&ingress, &["verdict"]), "FORWARDED");
    assert!(ingress["time"].as_str().unwrap() >= egress["time"].as_str().unwrap());

    // The compact line, as hubble prints it (plus the service it went through).
    let text = observe_text(&bed, &["--all", "--from-port", &sport.to_string()])?;
    eprintln!("weir observe (compact):\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let src_id = u64_at(&egress, &["source", "identity"]);
    let dst_id = u64_at(&egress, &["destination", "identity"]);
    let egress_line = lines.iter().find(|l| l.contains("to-stack")).context("no to-stack line")?;
    let (time, rest) = egress_line.split_once(": ").context("no time")?;
    assert_eq!(time.len(), "Dec  7 14:44:48.705".len(), "{egress_line}");
    assert_eq!(
        rest,
        format!(
            "default/client:{sport} (ID:{src_id}) -> default/backend:8080 (ID:{dst_id}) to-stack FORWARDED \
             (TCP Flags: SYN) via service default/web ({vip}:80)"
        )
    );
    assert!(
        text.contains(&format!(
            "default/client:{sport} (ID:{src_id}) -> default/backend:8080 (ID:{dst_id}) to-endpoint FORWARDED (TCP Flags: SYN)\n"
        )),
        "{text}"
    );
    let table = observe_text(&bed, &["--all", "--from-port", &sport.to_string(), "-o", "table"])?;
    assert!(table.starts_with("TIMESTAMP"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    Ok(())
}

/// Test 2: dropped packets appear with their reason: a deleted service (174
/// "Is a ClusterIP"), a service without endpoints (158, named after the
/// service), and a NetworkPolicy (133 "Policy denied", at the backend's
/// ingress).
#[test]
fn drops_carry_their_reason() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let ports = [ServicePort::tcp("http", 80, 8080)];

    // 174: the service is gone, its ClusterIP is still in the service CIDR.
    let gone = Ipv4Addr::new(10, 96, 6, 10);
    bed.write_service("gone", gone, &ports, &[&backend])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, gone, 80, "TCP", &[backend.ip()])?;
    bed.wait_tcp(&client, SocketAddrV4::new(gone, 80))?;
    bed.manifests().remove("gone.yaml")?;
    bed.cli().wait_for_no_frontend(AGENT_TIMEOUT, gone)?;
    assert!(clients::tcp_request(&client, SocketAddrV4::new(gone, 80), DROP_TIMEOUT).is_err());
    let drop = wait_flow(&bed, "a 174 drop", |f| str_at(f, &["drop_reason_desc"]) == "IS_A_CLUSTERIP")?;
    assert_eq!(str_at(&drop, &["verdict"]), "DROPPED", "{drop:#}");
    assert_eq!(u64_at(&drop, &["drop_reason"]), 174);
    assert_eq!(drop["event_type"], json!({ "type": 1, "sub_type": 174 }));
    assert_eq!(str_at(&drop, &["IP", "destination"]), gone.to_string());
    assert_eq!(l4(&drop).2, 80);
    assert_eq!(str_at(&drop, &["source", "pod_name"]), "client");
    assert_eq!(str_at(&drop, &["traffic_direction"]), "EGRESS");
    assert_eq!(u64_at(&drop, &["destination", "identity"]), 2, "world");
    let text = observe_text(&bed, &["--verdict", "DROPPED", "--to-ip", &gone.to_string()])?;
    assert!(
        text.contains(&format!(" -> {gone}:80 (world) Is a ClusterIP DROPPED (TCP Flags: SYN)")),
        "{text}"
    );

    // 158: the frontend exists without a backend; the drop names the service.
    let empty = Ipv4Addr::new(10, 96, 6, 11);
    bed.write_service("empty", empty, &ports, &[])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, empty, 80, "TCP", &[])?;
    wait_until(AGENT_TIMEOUT, "a 158 drop", || {
        let _ = clients::tcp_request(&client, SocketAddrV4::new(empty, 80), DROP_TIMEOUT);
        Ok(!flows(&observe(&bed, &["--drop-reason-desc", "SERVICE_BACKEND_NOT_FOUND"])?).is_empty())
    })?;
    let text = observe_text(&bed, &["--drop-reason-desc", "158"])?;
    assert!(
        text.contains(" -> default/empty:80 (world) Service backend not found DROPPED (TCP Flags: SYN)"),
        "{text}"
    );

    // 133: a NetworkPolicy isolates the backend for ingress, allowing nothing.
    bed.manifests().write(
        "deny.yaml",
        &[json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": { "name": "deny-backend", "namespace": NAMESPACE },
            "spec": { "podSelector": { "matchLabels": { "app": "backend" } }, "policyTypes": ["Ingress"] },
        })],
    )?;
    let direct = SocketAddrV4::new(backend.ip(), 8080);
    wait_until(AGENT_TIMEOUT, "a policy drop", || {
        let _ = clients::tcp_request(&client, direct, DROP_TIMEOUT);
        Ok(flows(&observe(&bed, &["--verdict", "dropped", "--to-pod", "backend"])?)
            .iter()
            .any(|f| str_at(f, &["drop_reason_desc"]) == "POLICY_DENIED"))
    })?;
    let denied = flows(&observe(&bed, &["--drop-reason-desc", "POLICY_DENIED"])?);
    let denied = denied.last().context("no policy drop")?;
    assert_eq!(str_at(denied, &["source", "pod_name"]), "client");
    assert_eq!(str_at(denied, &["destination", "pod_name"]), "backend");
    assert_eq!(str_at(denied, &["traffic_direction"]), "INGRESS");
    assert_eq!(denied["event_type"], json!({ "type": 1, "sub_type": 133 }));
    let text = observe_text(&bed, &["--drop-reason-desc", "POLICY_DENIED", "--last", "1"])?;
    assert!(
        text.contains(" -> default/backend:8080 (ID:")
            && text.contains(") Policy denied DROPPED (TCP Flags: SYN)"),
        "{text}"
    );
    Ok(())
}

/// Test 3: every filter flag selects exactly the flows it describes, checked
/// against the whole buffer (the flows do not change meanwhile).
#[test]
fn filters_select_exactly_the_matching_flows() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client_a = bed.add_pod("client-a")?;
    let client_b = bed.add_pod("client-b")?;
    let backend_1 = bed.add_pod("backend-1")?;
    let backend_2 = bed.add_pod("backend-2")?;
    let _s1 = TcpServer::start(&backend_1, 8080, TcpMode::Lines)?;
    let _s2 = TcpServer::start(&backend_2, 9090, TcpMode::Lines)?;
    let _u2 = UdpServer::start(&backend_2, 5353)?;
    let vip = Ipv4Addr::new(10, 96, 7, 10);
    bed.write_service("web", vip, &[ServicePort::tcp("http", 80, 8080)], &[&backend_1])?;
    bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend_1.ip()])?;

    bed.wait_tcp(&client_a, SocketAddrV4::new(vip, 80))?;
    bed.wait_tcp(&client_b, SocketAddrV4::new(backend_2.ip(), 9090))?;
    bed.wait_udp(&client_a, SocketAddrV4::new(backend_2.ip(), 5353))?;
    assert!(
        clients::tcp_request(&client_b, SocketAddrV4::new(Ipv4Addr::new(10, 96, 77, 77), 80), DROP_TIMEOUT)
            .is_err()
    );
    wait_flow(&bed, "the drop", |f| str_at(f, &["verdict"]) == "DROPPED")?;
    // Let the last SYN's flows land before taking the reference.
    std::thread::sleep(Duration::from_millis(300));

    let all = flows(&observe(&bed, &["--all"])?);
    let key = |f: &Value| f.to_string();
    let pod = |f: &Value, side: &str| str_at(f, &[side, "pod_name"]).to_owned();
    let has_label = |f: &Value, side: &str, label: &str| {
        f[side]["labels"].as_array().is_some_and(|l| l.iter().any(|x| x == label))
    };
    let svc = |f: &Value| str_at(f, &["destination_service", "name"]).to_owned();
    let b2_ip = backend_2.ip().to_string();
    let b_ip = client_b.ip().to_string();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(Vec<&str>, Box<dyn Fn(&Value) -> bool>)> = vec![
        (vec!["--from-pod", "client-a"], Box::new(|f| pod(f, "source") == "client-a")),
        (
            vec!["--pod", "backend-2"],
            Box::new(|f| pod(f, "source") == "backend-2" || pod(f, "destination") == "backend-2"),
        ),
        (vec!["--to-pod", "default/backend"], Box::new(|f| pod(f, "destination").starts_with("backend"))),
        (vec!["--protocol", "udp"], Box::new(|f| l4(f).0 == "UDP")),
        (vec!["--verdict", "DROPPED"], Box::new(|f| str_at(f, &["verdict"]) == "DROPPED")),
        (vec!["--port", "9090"], Box::new(|f| l4(f).1 == 9090 || l4(f).2 == 9090)),
        (vec!["--to-port", "5353"], Box::new(|f| l4(f).2 == 5353)),
        (
            vec!["--ip", &b_ip],
            Box::new(|f| str_at(f, &["IP", "source"]) == b_ip || str_at(f, &["IP", "destination"]) == b_ip),
        ),
        (
            vec!["--from-ip", "10.244.0.0/16", "--protocol", "tcp", "--to-ip", &b2_ip],
            Box::new(|f| str_at(f, &["IP", "destination"]) == b2_ip && l4(f).0 == "TCP"),
        ),
        (
            vec!["--label", "app=client-b"],
            Box::new(|f| {
                has_label(f, "source", "k8s:app=client-b") || has_label(f, "destination", "k8s:app=client-b")
            }),
        ),
        (
            vec!["--to-label", "app in (backend-1, backend-2)"],
            Box::new(|f| pod(f, "destination") == "backend-1" || pod(f, "destination") == "backend-2"),
        ),
        (vec!["--service", "default/web"], Box::new(|f| svc(f) == "web")),
        (
            vec!["-n", "default", "--not", "--from-pod", "client-a"],
            Box::new(|f| {
                (str_at(f, &["source", "namespace"]) == "default"
                    || str_at(f, &["destination", "namespace"]) == "default")
                    && pod(f, "source") != "client-a"
            }),
        ),
        (
            vec!["--traffic-direction", "ingress"],
            Box::new(|f| str_at(f, &["traffic_direction"]) == "INGRESS"),
        ),
        (vec!["-t", "trace:to-stack"], Box::new(|f| f["event_type"] == json!({ "type": 4, "sub_type": 3 }))),
        (vec!["-t", "drop"], Box::new(|f| f["event_type"]["type"] == json!(1))),
        (vec!["--tcp-flags", "SYN"], Box::new(|f| f["l4"]["TCP"]["flags"]["SYN"] == json!(true))),
        (
            vec!["--from-pod", "client-a", "--from-pod", "client-b", "--verdict", "FORWARDED"],
            Box::new(|f| {
                ["client-a", "client-b"].contains(&pod(f, "source").as_str())
                    && str_at(f, &["verdict"]) == "FORWARDED"
            }),
        ),
        (vec!["--not", "--protocol", "tcp"], Box::new(|f| l4(f).0 != "TCP")),
    ];
    for (args, pred) in &cases {
        let mut full = args.clone();
        full.push("--all");
        let got: BTreeSet<String> = flows(&observe(&bed, &full)?).iter().map(key).collect();
        let want: BTreeSet<String> = all.iter().filter(|f| pred(f)).map(key).collect();
        assert!(!want.is_empty(), "`weir observe {}`: the test traffic has no such flow", args.join(" "));
        assert!(want.len() < all.len(), "`weir observe {}`: selects everything", args.join(" "));
        assert_eq!(got, want, "`weir observe {}`", args.join(" "));
    }
    // --last counts matching flows.
    let last = flows(&observe(&bed, &["--last", "2", "--from-pod", "client-a"])?);
    let want: Vec<&Value> = all.iter().filter(|f| pod(f, "source") == "client-a").collect();
    assert_eq!(last.iter().collect::<Vec<_>>(), want[want.len() - 2..].to_vec());
    let first = flows(&observe(&bed, &["--first", "1", "--protocol", "udp"])?);
    assert_eq!(first.first(), all.iter().find(|f| l4(f).0 == "UDP"));
    // A future --since selects nothing; an old one everything.
    assert!(flows(&observe(&bed, &["--since", "2999-01-01T00:00:00Z"])?).is_empty());
    assert_eq!(flows(&observe(&bed, &["--since", "1h"])?).len(), all.len());
    Ok(())
}

/// Kills a child process on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Test 4: `weir observe --follow` prints the flows that happen after it
/// starts, and none from before.
#[test]
fn follow_streams_new_flows() -> Result<()> {
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let target = SocketAddrV4::new(backend.ip(), 8080);
    bed.wait_tcp(&client, target)?;
    let mut old = TcpConn::connect(&client, target, DEFAULT_TIMEOUT)?;
    old.exchange()?;
    let old_port = old.local_addr()?.port();
    wait_flow(&bed, "the old flow", |f| l4(f).1 == u64::from(old_port))?;

    let mut child = ChildGuard(
        Command::new(binary("WEIR_CLI_BIN", "weir")?)
            .args(["observe", "-f", "-o", "json", "--from-pod", "client", "--bpffs-root"])
            .arg(bed.agent().bpffs_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weir observe -f")?,
    );
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stdout = child.0.stdout.take().context("no stdout")?;
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // Until the stream is up, new flows may come before it: keep making
    // connections until one shows up.
    let mut new_ports = Vec::new();
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let got = loop {
        if let Some(status) = child.0.try_wait()? {
            let mut err = String::new();
            std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err)?;
            bail!("weir observe -f exited ({status}): {err}");
        }
        let mut conn = TcpConn::connect(&client, target, DEFAULT_TIMEOUT)?;
        conn.exchange()?;
        new_ports.push(u64::from(conn.local_addr()?.port()));
        std::thread::sleep(Duration::from_millis(200));
        let seen: Vec<Value> =
            lines.lock().unwrap().iter().map(|l| serde_json::from_str(l)).collect::<Result<_, _>>()?;
        if seen.iter().filter_map(|r| r.get("flow")).any(|f| new_ports.contains(&l4(f).1)) {
            break seen;
        }
        ensure!(Instant::now() < deadline, "no new flow from `weir observe -f` within {AGENT_TIMEOUT:?}");
    };
    for response in &got {
        let flow = &response["flow"];
        assert_ne!(l4(flow).1, u64::from(old_port), "a flow from before --follow started: {flow:#}");
        assert_eq!(str_at(flow, &["source", "pod_name"]), "client");
    }
    drop(child);
    let _ = reader.join();

    let out = bed.cli().output(&["observe", "-f", "-o", "table"])?;
    assert!(!out.status.success());
    Ok(())
}

/// The pid of the agent serving `bed` (from /proc: its command line holds
/// its bpffs root).
fn agent_pid(bed: &TestBed) -> Result<Pid> {
    let root = bed.agent().bpffs_root().display().to_string();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("weir-agent")) && args.contains(&root) {
            return Ok(Pid::from_raw(pid));
        }
    }
    bail!("no weir-agent process with {root}")
}

/// Resumes a stopped process on drop.
struct Stopped(Pid);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Test 5: while the agent does not read (SIGSTOP), a burst of drop events
/// larger than the datapath's ring buffer (1 MiB, 16384 records) overflows
/// it: the loss is counted in the datapath and reported in-stream as a
/// PERF_EVENT_RING_BUFFER LostEvent; the agent's own ring (here 63 flows)
/// keeps the newest flows only.
#[test]
fn overflow_is_reported_as_lost_events() -> Result<()> {
    let options = AgentOptions {
        extra_args: vec!["--flow-buffer-capacity".into(), "63".into()],
        ..AgentOptions::default()
    };
    let mut bed = TestBed::with_options(options)?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    bed.wait_tcp(&client, SocketAddrV4::new(backend.ip(), 8080))?;
    // Every datagram to an unserved address in the service CIDR is dropped
    // (174), and every drop is an event.
    let nowhere = SocketAddrV4::new(Ipv4Addr::new(10, 96, 99, 99), 9);
    let _ = udp_request(&client, nowhere, DROP_TIMEOUT);
    wait_flow(&bed, "a first drop", |f| str_at(f, &["drop_reason_desc"]) == "IS_A_CLUSTERIP")?;
    let before = server_status(&bed)?;

    const BURST: usize = 60_000;
    let stopped = Stopped(agent_pid(&bed)?);
    kill(stopped.0, Signal::SIGSTOP)?;
    let sent = client.run(|| -> Result<usize> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let mut sent = 0;
        for _ in 0..BURST {
            if socket.send_to(b"x", nowhere).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    })??;
    // The datapath may still be working through queued datagrams: resume
    // the agent once every one of them has been dropped (and reported), so
    // that no event arrives after the agent's LostEvent and evicts it from
    // the 63-flow ring.
    let mut drops = bed.cli().metric_packets(174)?;
    wait_until(AGENT_TIMEOUT, "the datapath to be done with the datagrams", || {
        std::thread::sleep(Duration::from_millis(200));
        let now = bed.cli().metric_packets(174)?;
        Ok(std::mem::replace(&mut drops, now) == now)
    })?;
    drop(stopped);

    let lost: Vec<Value> = wait_for(AGENT_TIMEOUT, "a LostEvent", || {
        let lost: Vec<Value> =
            observe(&bed, &["--all"])?.into_iter().filter_map(|r| r.get("lost_events").cloned()).collect();
        Ok((!lost.is_empty()).then_some(lost))
    })?;
    let total: u64 = lost
        .iter()
        .map(|l| {
            assert_eq!(str_at(l, &["source"]), "PERF_EVENT_RING_BUFFER", "{l:#}");
            assert!(l.get("cpu").is_some(), "{l:#}");
            str_at(l, &["num_events_lost"]).parse::<u64>().unwrap_or(0)
        })
        .sum();
    let status = server_status(&bed)?;
    eprintln!("sent {sent} datagrams while the agent was stopped; lost {total}; status {status:?}");
    assert!(total > 0 && total < sent as u64, "lost {total} of {sent}");
    // What was not lost reached the agent: the kernel ring buffer's worth.
    let read = status.seen_flows - before.seen_flows;
    assert!(read >= 10_000, "only {read} flows read after the burst");
    assert!(read + total >= sent as u64 * 9 / 10, "read {read} + lost {total} << sent {sent}");
    assert_eq!(status.max_flows, 63);
    assert!((60..=63).contains(&status.num_flows), "{status:?}");
    // The datapath counted them too (weir metrics list, EVENTS_LOST = 6).
    assert!(bed.cli().metric_packets(6)? >= total);
    // The compact output reports the loss on stderr, as hubble does.
    let out = bed.cli().output(&["observe", "--all"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("EVENTS LOST: PERF_EVENT_RING_BUFFER CPU("), "{stderr}");
    Ok(())
}

/// Test 6: the gRPC API answers a tonic client built from the .proto files,
/// over the unix socket and over TCP: health (under hubble's service name),
/// ServerStatus, GetFlows (with filters, InvalidArgument for unsupported
/// ones, follow), GetNodes, Unimplemented for agent events; and `weir
/// observe` says clearly when the agent is down.
#[test]
fn grpc_api_answers_a_client_built_from_the_proto() -> Result<()> {
    let options = AgentOptions {
        extra_args: vec!["--hubble-listen-address".into(), "127.0.0.1:0".into()],
        ..AgentOptions::default()
    };
    let mut bed = TestBed::with_options(options)?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = TcpServer::start(&backend, 8080, TcpMode::Lines)?;
    let target = SocketAddrV4::new(backend.ip(), 8080);
    bed.wait_tcp(&client, target)?;
    wait_flow(&bed, "a flow", |f| pod_is(f, "destination", "backend"))?;
    let node = bed.node().name().to_owned();

    let path = socket_of(&bed);
    let follow_target = target;
    let client_pod = &client;
    block_on(async {
        let channel = unix_channel(&path).await?;
        let mut health = HealthClient::new(channel.clone());
        for service in ["hubble.server.Observer", ""] {
            let status = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner();
            assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
        }
        let err = health.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);

        let mut observer = ObserverClient::new(channel);
        let status = observer.server_status(ServerStatusRequest {}).await?.into_inner();
        assert_eq!(status.max_flows, 4095);
        assert!(status.num_flows >= 1 && status.seen_flows >= status.num_flows, "{status:?}");
        assert_eq!(status.num_connected_nodes, Some(1));
        assert!(status.uptime_ns > 0);

        let mut stream =
            observer.get_flows(GetFlowsRequest { number: 1, ..Default::default() }).await?.into_inner();
        let mut got = Vec::new();
        while let Some(response) = stream.message().await? {
            assert_eq!(response.node_name, node);
            assert!(response.time.is_some());
            got.push(response);
        }
        assert_eq!(got.len(), 1, "number = 1: {got:?}");

        let filter = FlowFilter { source_pod: vec!["default/client".into()], ..Default::default() };
        let request = GetFlowsRequest { number: 1000, whitelist: vec![filter], ..Default::default() };
        let mut stream = observer.get_flows(request).await?.into_inner();
        let mut n = 0;
        while let Some(response) = stream.message().await? {
            let Some(ResponseTypes::Flow(flow)) = response.response_types else { continue };
            assert_eq!(flow.source.as_ref().map(|s| s.pod_name.as_str()), Some("client"), "{flow:?}");
            assert_eq!(flow.verdict, Verdict::Forwarded as i32);
            n += 1;
        }
        assert!(n >= 1);

        let fqdn = FlowFilter { source_fqdn: vec!["example.com".into()], ..Default::default() };
        let err = observer
            .get_flows(GetFlowsRequest { whitelist: vec![fqdn], ..Default::default() })
            .await
            .expect_err("an unsupported filter field must be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("source_fqdn"), "{err:?}");
        let err = observer
            .get_flows(GetFlowsRequest { number: 1, first: true, follow: true, ..Default::default() })
            .await
            .expect_err("first with follow");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err =
            observer.get_agent_events(GetAgentEventsRequest::default()).await.expect_err("agent events");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        let nodes = observer.get_nodes(GetNodesRequest {}).await?.into_inner().nodes;
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, node);

        // Follow: only flows after the call, as they happen.
        let mut stream =
            observer.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await?.into_inner();
        let before = std::time::SystemTime::now();
        clients::tcp_request(client_pod, follow_target, DEFAULT_TIMEOUT)?;
        let response =
            tokio::time::timeout(AGENT_TIMEOUT, stream.message()).await??.context("stream ended")?;
        let Some(ResponseTypes::Flow(flow)) = response.response_types else {
            bail!("not a flow: {response:?}")
        };
        let time = flow.time.context("no time")?;
        let since = before.duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        assert!(time.seconds >= since - 1, "a flow from before the call: {flow:?}");
        Ok(())
    })?;

    // The same API on TCP, inside the node's namespace.
    let line = bed.agent_mut().wait_for_log_line(AGENT_TIMEOUT, "the Observer API's TCP address", |l| {
        l.contains("serving the Hubble Observer API") && l.contains("address=")
    })?;
    let address =
        line.split("address=").nth(1).and_then(|a| a.split_whitespace().next()).context("no address")?;
    let uri = format!("http://{address}");
    let status = bed.node().netns().run(move || {
        block_on(async move {
            let channel = Endpoint::from_shared(uri)?.connect().await?;
            let mut health = HealthClient::new(channel.clone());
            let ok = health.check(HealthCheckRequest { service: "hubble.server.Observer".into() }).await?;
            ensure!(ok.into_inner().status == ServingStatus::Serving as i32);
            Ok(ObserverClient::new(channel).server_status(ServerStatusRequest {}).await?.into_inner())
        })
    })??;
    assert!(status.seen_flows >= 1, "{status:?}");

    // With the agent down, weir observe says so.
    bed.agent_mut().kill()?;
    let out = bed.cli().output(&["observe"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the Weir agent") && stderr.contains("is weir-agent running"),
        "{stderr}"
    );
    Ok(())
}

fn pod_is(f: &Value, side: &str, name: &str) -> bool {
    str_at(f, &[side, "pod_name"]) == name
}

/// Test 7 (measurement): new connections per second through a ClusterIP
/// with flow events on and off (`--no-flow-events`), in the same run, in
/// many short alternating rounds so that noise from the rest of the machine
/// spreads over both. Measured twice: with the agents stopped (SIGSTOP)
/// during their rounds, which isolates the datapath's cost (writing the
/// events into the ring buffer; the kernel keeps them for the agent), and
/// with the agents running, which adds the agent's cost of reading them on
/// the same two cores. Prints the rates and ratios; fails only on a gross
/// regression, since a shared machine is noisier than a few percent.
#[test]
fn cost_of_flow_events() -> Result<()> {
    let mut on = TestBed::new()?;
    let off_options = AgentOptions { extra_args: vec!["--no-flow-events".into()], ..AgentOptions::default() };
    let mut off = TestBed::with_options(off_options)?;
    let vip = Ipv4Addr::new(10, 96, 8, 10);
    let mut pods = Vec::new();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for bed in [&mut on, &mut off] {
        let client = bed.add_pod("client")?;
        let backend = bed.add_pod("backend")?;
        servers.push(TcpServer::start(&backend, 8080, TcpMode::Lines)?);
        bed.write_service("web", vip, &[ServicePort::tcp("http", 80, 8080)], &[&backend])?;
        bed.cli().wait_for_backends(AGENT_TIMEOUT, vip, 80, "TCP", &[backend.ip()])?;
        bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;
        pods.push(client);
        backends.push(backend);
    }
    let pids = [agent_pid(&on)?, agent_pid(&off)?];
    const N: usize = 250;
    const ROUNDS: usize = 10;
    let addr = SocketAddrV4::new(vip, 80);
    let mut report = Vec::new();
    for agents_running in [false, true] {
        let mut elapsed = [Duration::ZERO; 2];
        for round in 0..ROUNDS * 2 {
            // on, off, off, on, on, off, ...: each goes first as often.
            let which = (round + round / 2) % 2;
            let stopped = (!agents_running).then(|| Stopped(pids[which]));
            if let Some(stopped) = &stopped {
                kill(stopped.0, Signal::SIGSTOP)?;
            }
            let started = Instant::now();
            for _ in 0..N {
                clients::tcp_request(&pods[which], addr, DEFAULT_TIMEOUT)?;
            }
            elapsed[which] += started.elapsed();
            drop(stopped);
        }
        let rate = |d: Duration| (N * ROUNDS) as f64 / d.as_secs_f64();
        let (rate_on, rate_off) = (rate(elapsed[0]), rate(elapsed[1]));
        let what = if agents_running { "agents running" } else { "agents stopped (datapath only)" };
        report.push((what, rate_on, rate_off, rate_on / rate_off));
    }
    for (what, rate_on, rate_off, ratio) in &report {
        eprintln!(
            "connections/s through a ClusterIP, {what}: events on {rate_on:.0}, off {rate_off:.0}, on/off = {ratio:.3} \
             ({} connections each)",
            N * ROUNDS
        );
    }
    // The events were there (two per connection) or not at all.
    let status_on = wait_for(AGENT_TIMEOUT, "the agent to read every event", || {
        let status = server_status(&on)?;
        Ok((status.seen_flows >= (4 * N * ROUNDS) as u64).then_some(status))
    })?;
    let status_off = server_status(&off)?;
    assert_eq!(status_off.seen_flows, 0, "{status_off:?}");
    assert!(status_on.num_flows > 0);
    let datapath_ratio = report[0].3;
    assert!(datapath_ratio > 0.5, "flow events cost too much: on/off = {datapath_ratio:.3}");
    Ok(())
}

/// Hubble's flow metrics on the agent's /metrics: flows by type and verdict,
/// drops by reason and protocol.
#[test]
fn flow_metrics_are_exported_to_prometheus() -> Result<()> {
    use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
    use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
    let mut bed = TestBed::new()?;
    let client = bed.add_pod("client")?;
    let backend = bed.add_pod("backend")?;
    let _server = weir_tests::servers::TcpServer::start(&backend, 8080, weir_tests::servers::TcpMode::Lines)?;
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 95);
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
    bed.wait_tcp(&client, std::net::SocketAddrV4::new(vip, 80))?;
    // A drop: an address in the service range that no service has.
    let _ = weir_tests::clients::tcp_request(
        &client,
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 96), 80),
        Duration::from_millis(300),
    );
    weir_tests::cli::wait_until(AGENT_TIMEOUT, "flow metrics", || {
        let body = bed.scrape_metrics()?;
        Ok(body
            .lines()
            .any(|l| l.starts_with("hubble_flows_processed_total") && l.contains("verdict=\"FORWARDED\""))
            && body.lines().any(|l| l.starts_with("hubble_drop_total") && l.contains("protocol=\"TCP\"")))
    })?;
    Ok(())
}

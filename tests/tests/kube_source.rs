//! Issue 4: `weir-agent --source kube` against the test API server
//! ([`weir_tests::apiserver`]), which speaks the real list/watch protocol,
//! with real pods and traffic in network namespaces.
//!
//! The API server listens on 127.0.0.1 *inside the node's namespace* (the
//! agent runs there), and the agent reaches it through a kubeconfig. The
//! agent's /healthz and /metrics are on their default addresses in the node
//! namespace, so parallel tests never collide.
//!
//! What each test proves:
//! - `objects_created_updated_and_deleted_reach_the_maps`: API objects become
//!   frontends and backends, traffic flows through the ClusterIP, and updates
//!   and deletes follow;
//! - `watch_disconnect_and_api_server_outage`: cut watches resume from their
//!   resourceVersion (no relist); while the API server is away the maps keep
//!   their state and traffic flows; changes made during the outage arrive;
//! - `gone_relist_removes_objects_deleted_during_the_outage`: after history
//!   is compacted, the resumed watch gets 410 Gone, the agent lists again,
//!   and objects deleted while it was not watching leave the maps (no Delete
//!   event was ever delivered for them);
//! - `restart_keeps_connections_and_does_not_flush_before_resync`: SIGKILL
//!   and restart, once with a slow EndpointSlice list and once with the API
//!   server down: `weir lb list`, polled every 20 ms, never loses the service
//!   or a backend, and an established connection carries data throughout;
//! - `health_and_metrics`: /healthz is 503 until the first sync and 200
//!   after, with kube-proxy's JSON; node eligibility; /metrics has the
//!   `kubeproxy_*` and `weir_*` metrics, including network programming
//!   latency from the EndpointSlice trigger-time annotation.

use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weir_tests::agent::{Agent, AgentOptions};
use weir_tests::apiserver::{self, ApiServer, Kind};
use weir_tests::cli::{Cli, LbService, wait_for, wait_until};
use weir_tests::clients::{self, DEFAULT_TIMEOUT, TcpConn};
use weir_tests::manifests::{self, Endpoint, ManifestDir, ServicePort};
use weir_tests::names::TEST_PREFIX;
use weir_tests::servers::{TcpMode, TcpServer};
use weir_tests::tempdir::TempDir;
use weir_tests::topology::{Node, Pod};

const NAMESPACE: &str = "default";

/// Generous: the watcher's reconnect backoff grows 0.8 s, 1.6 s, 3.2 s…
const TIMEOUT: Duration = Duration::from_secs(30);

const HEALTHZ: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256));
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249));

/// A node, the test API server listening inside it, and an agent following
/// that API server. Field order is drop order: the agent goes first.
struct KubeBed {
    agent: Agent,
    cli: Cli,
    api: ApiServer,
    _config_dir: TempDir,
    _manifests: ManifestDir,
    node: Node,
    next_host: Cell<u8>,
    pods: Cell<usize>,
}

/// How the agent finds the API server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Connect {
    /// `--kubeconfig PATH`.
    Kubeconfig,
    /// `--api-server URL` alone (what a DaemonSet does when it cannot use
    /// the `kubernetes` ClusterIP).
    ApiServerFlag,
}

impl KubeBed {
    /// With `api_up` false the API server is away when the agent starts.
    fn new(api_up: bool) -> Result<KubeBed> {
        KubeBed::start(api_up, Connect::Kubeconfig, |_| Ok(()))
    }

    /// `preload` fills the API server before the agent starts.
    fn start(
        api_up: bool,
        connect: Connect,
        preload: impl FnOnce(&ApiServer) -> Result<()>,
    ) -> Result<KubeBed> {
        weir_tests::require_root();
        let node = Node::create(TEST_PREFIX)?;
        let api = ApiServer::new();
        let address = api.listen(Some(&node.netns().path()))?;
        let config_dir = TempDir::new(&format!("{TEST_PREFIX}kubeconfig-"))?;
        let kubeconfig = config_dir.path().join("kubeconfig");
        apiserver::write_kubeconfig(&kubeconfig, address)?;
        api.create(manifests::namespace(NAMESPACE))?;
        api.create(node_object(node.name(), false))?;
        preload(&api)?;
        if !api_up {
            api.stop();
        }
        // The agent insists on a manifest directory; --source kube ignores it.
        let manifests = ManifestDir::new(&format!("{TEST_PREFIX}manifests-"))?;
        let mut extra_args = match connect {
            Connect::Kubeconfig => vec!["--kubeconfig".to_owned(), kubeconfig.display().to_string()],
            Connect::ApiServerFlag => vec!["--api-server".to_owned(), ApiServer::url(address)],
        };
        extra_args.extend([
            "--healthz-bind-address".to_owned(),
            HEALTHZ.to_string(),
            "--metrics-bind-address".to_owned(),
            METRICS.to_string(),
            // No periodic resync: tests count reconciliations.
            "--sync-period".to_owned(),
            "3600".to_owned(),
        ]);
        let options = AgentOptions { source: Some("kube".to_owned()), extra_args, ..AgentOptions::default() };
        let agent = Agent::start_with(&node, &manifests, options)?;
        let cli = agent.cli()?;
        Ok(KubeBed {
            agent,
            cli,
            api,
            _config_dir: config_dir,
            _manifests: manifests,
            node,
            next_host: Cell::new(10),
            pods: Cell::new(0),
        })
    }

    /// A pod on the node, published to the API server.
    fn add_pod(&self, name: &str) -> Result<Pod> {
        let host = self.next_host.get();
        self.next_host.set(host + 1);
        let pod = self.node.add_pod(name, Ipv4Addr::new(10, 244, 0, host))?;
        self.api.apply(manifests::pod(NAMESPACE, name, self.node.name(), pod.ip()))?;
        self.pods.set(self.pods.get() + 1);
        Ok(pod)
    }

    /// `GET path` from inside the node namespace.
    fn get(&self, address: SocketAddr, path: &str) -> Result<(u16, String)> {
        self.node.netns().run(|| apiserver::http_get(address, path, Duration::from_secs(5)))?
    }

    /// The `/healthz` answer, parsed.
    fn healthz(&self) -> Result<(u16, Value)> {
        let (code, body) = self.get(HEALTHZ, "/healthz")?;
        let json = serde_json::from_str(&body).with_context(|| format!("/healthz: {body:?}"))?;
        Ok((code, json))
    }

    fn metrics(&self) -> Result<String> {
        let (code, body) = self.get(METRICS, "/metrics")?;
        ensure!(code == 200, "/metrics answered {code}: {body}");
        Ok(body)
    }

    /// Waits until the agent watches every kind (after a start or a
    /// reconnection).
    fn wait_watching(&mut self) -> Result<()> {
        let api = &self.api;
        let agent = &mut self.agent;
        wait_until(TIMEOUT, "the agent to watch all six kinds", || {
            agent.ensure_running()?;
            let watches = api.active_watches();
            Ok(Kind::ALL.iter().all(|k| watches.get(k).copied().unwrap_or(0) >= 1))
        })
    }

    /// Waits until every pod's tcx links are pinned: before that, a SIGKILL
    /// would detach a link the agent has not pinned yet.
    fn wait_attached(&mut self) -> Result<()> {
        let pods = self.pods.get();
        let agent = &mut self.agent;
        wait_until(TIMEOUT, &format!("links for {pods} pods pinned"), || {
            agent.ensure_running()?;
            Ok(agent.pinned_links()?.len() >= pods)
        })
    }

    /// Waits for every pod to be attached, then for a TCP answer through
    /// `addr`.
    fn wait_tcp(&mut self, client: &Pod, addr: SocketAddrV4) -> Result<String> {
        self.wait_attached()?;
        let agent = &mut self.agent;
        wait_for(TIMEOUT, &format!("a TCP answer from {addr}"), || {
            agent.ensure_running()?;
            clients::tcp_request(client, addr, Duration::from_secs(1)).map(Some)
        })
    }

    /// How many times the agent's log says `text`.
    fn log_count(&self, text: &str) -> usize {
        self.agent.log().lines().filter(|l| l.contains(text)).count()
    }
}

fn node_object(name: &str, to_be_deleted: bool) -> Value {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        "spec": {},
        "status": { "addresses": [ { "type": "InternalIP", "address": "192.0.2.10" } ] },
    });
    if to_be_deleted {
        node["spec"]["taints"] = json!([{
            "key": "ToBeDeletedByClusterAutoscaler",
            "value": "1700000000",
            "effect": "NoSchedule",
        }]);
    }
    node
}

fn http() -> [ServicePort; 1] {
    [ServicePort::tcp("http", 80, 8080)]
}

fn endpoints(pods: &[&Pod], node: &Node) -> Vec<Endpoint> {
    pods.iter().map(|p| Endpoint::for_pod(p.ip(), p.name(), node.name())).collect()
}

fn ips(pods: &[&Pod]) -> Vec<Ipv4Addr> {
    pods.iter().map(|p| p.ip()).collect()
}

fn service(name: &str, ip: Ipv4Addr, ports: &[ServicePort]) -> Value {
    manifests::service(NAMESPACE, name, &ip.to_string(), ports)
}

fn slice(service: &str, endpoints: &[Endpoint], ports: &[ServicePort]) -> Value {
    manifests::endpoint_slice(NAMESPACE, service, "abc", endpoints, ports)
}

#[test]
fn objects_created_updated_and_deleted_reach_the_maps() -> Result<()> {
    let mut bed = KubeBed::new(true)?;
    let client = bed.add_pod("client")?;
    let b1 = bed.add_pod("backend-1")?;
    let b2 = bed.add_pod("backend-2")?;
    let _servers =
        [&b1, &b2].iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;
    let vip = Ipv4Addr::new(10, 96, 1, 10);
    let addr = SocketAddrV4::new(vip, 80);

    // Created.
    let started = Instant::now();
    bed.api.create(service("web", vip, &http()))?;
    bed.api.create(slice("web", &endpoints(&[&b1, &b2], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1, &b2]))?;
    eprintln!("service created -> in the maps: {:?}", started.elapsed());
    let name = bed.wait_tcp(&client, addr)?;
    assert!(name == "backend-1" || name == "backend-2", "answered by {name}");

    // Updated: one endpoint removed, then a port added.
    let started = Instant::now();
    bed.api.update(slice("web", &endpoints(&[&b1], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1]))?;
    eprintln!("endpoint removed -> in the maps: {:?}", started.elapsed());
    for _ in 0..10 {
        assert_eq!(clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?, "backend-1");
    }
    let two_ports = [ServicePort::tcp("http", 80, 8080), ServicePort::tcp("alt", 81, 8080)];
    bed.api.update(service("web", vip, &two_ports))?;
    bed.api.update(slice("web", &endpoints(&[&b1, &b2], &bed.node), &two_ports))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 81, "TCP", &ips(&[&b1, &b2]))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1, &b2]))?;
    clients::tcp_request(&client, SocketAddrV4::new(vip, 81), DEFAULT_TIMEOUT)?;

    // Deleted.
    let started = Instant::now();
    bed.api.delete(Kind::Service, NAMESPACE, "web")?;
    bed.api.delete(Kind::EndpointSlice, NAMESPACE, "web-abc")?;
    bed.cli.wait_for_no_frontend(TIMEOUT, vip)?;
    eprintln!("service deleted -> out of the maps: {:?}", started.elapsed());
    assert!(
        clients::tcp_request(&client, addr, Duration::from_millis(500)).is_err(),
        "a deleted service still answers"
    );
    bed.agent.ensure_running()?;
    Ok(())
}

#[test]
fn watch_disconnect_and_api_server_outage() -> Result<()> {
    // The agent is given the API server's address, with no kubeconfig.
    let mut bed = KubeBed::start(true, Connect::ApiServerFlag, |_| Ok(()))?;
    let client = bed.add_pod("client")?;
    let b1 = bed.add_pod("backend-1")?;
    let b2 = bed.add_pod("backend-2")?;
    let _servers =
        [&b1, &b2].iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;
    let vip = Ipv4Addr::new(10, 96, 2, 10);
    let addr = SocketAddrV4::new(vip, 80);
    bed.api.create(service("web", vip, &http()))?;
    bed.api.create(slice("web", &endpoints(&[&b1], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1]))?;
    bed.wait_tcp(&client, addr)?;
    bed.wait_watching()?;
    let lists = bed.api.requests(Kind::EndpointSlice, "list");
    let watches = bed.api.requests(Kind::EndpointSlice, "watch");

    // Every watch is cut: the agent watches again from where it was.
    bed.api.disconnect_watches();
    wait_until(TIMEOUT, "a new EndpointSlice watch", || {
        Ok(bed.api.requests(Kind::EndpointSlice, "watch") > watches)
    })?;
    bed.wait_watching()?;
    bed.api.update(slice("web", &endpoints(&[&b1, &b2], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1, &b2]))?;
    assert_eq!(
        bed.api.requests(Kind::EndpointSlice, "list"),
        lists,
        "a cut watch should resume from its resourceVersion, not list again"
    );

    // The API server goes away: the datapath keeps its state and serves.
    let before: Vec<LbService> = bed.cli.lb_list()?;
    bed.api.stop();
    let mut conn = TcpConn::connect(&client, addr, DEFAULT_TIMEOUT)?;
    let pinned = conn.exchange()?;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(2) {
        assert_eq!(bed.cli.lb_list()?, before, "the maps changed while the API server was away");
        clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    bed.agent.ensure_running()?;
    assert_eq!(bed.healthz()?.0, 200, "nothing is pending: still healthy");
    // A change made while the agent cannot see it arrives when it is back.
    bed.api.update(slice("web", &endpoints(&[&b2], &bed.node), &http()))?;
    bed.api.start()?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b2]))?;
    bed.wait_watching()?;
    assert_eq!(
        bed.api.requests(Kind::EndpointSlice, "list"),
        lists,
        "the history was kept: resuming the watch should be enough"
    );
    // Removing backend-1 leaves the established connection to it alone.
    assert_eq!(conn.exchange()?, pinned);
    assert_eq!(clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?, "backend-2");
    assert!(bed.log_count("watch failed") > 0, "the outage was not logged");
    Ok(())
}

#[test]
fn gone_relist_removes_objects_deleted_during_the_outage() -> Result<()> {
    let mut bed = KubeBed::new(true)?;
    let client = bed.add_pod("client")?;
    let b1 = bed.add_pod("backend-1")?;
    let b2 = bed.add_pod("backend-2")?;
    let _servers =
        [&b1, &b2].iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;
    let web = Ipv4Addr::new(10, 96, 3, 10);
    let old = Ipv4Addr::new(10, 96, 3, 11);
    bed.api.create(service("web", web, &http()))?;
    bed.api.create(slice("web", &endpoints(&[&b1, &b2], &bed.node), &http()))?;
    bed.api.create(service("old", old, &http()))?;
    bed.api.create(slice("old", &endpoints(&[&b1], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, web, 80, "TCP", &ips(&[&b1, &b2]))?;
    bed.cli.wait_for_backends(TIMEOUT, old, 80, "TCP", &ips(&[&b1]))?;
    bed.wait_tcp(&client, SocketAddrV4::new(old, 80))?;
    bed.wait_watching()?;
    let service_lists = bed.api.requests(Kind::Service, "list");
    let slice_lists = bed.api.requests(Kind::EndpointSlice, "list");

    // While the agent cannot watch: a service is deleted, a backend is
    // removed, and the history that would have told it is compacted away.
    bed.api.stop();
    bed.api.delete(Kind::Service, NAMESPACE, "old")?;
    bed.api.delete(Kind::EndpointSlice, NAMESPACE, "old-abc")?;
    bed.api.update(slice("web", &endpoints(&[&b1], &bed.node), &http()))?;
    bed.api.compact();
    bed.api.start()?;

    bed.cli.wait_for_no_frontend(TIMEOUT, old)?;
    bed.cli.wait_for_backends(TIMEOUT, web, 80, "TCP", &ips(&[&b1]))?;
    assert!(bed.api.requests(Kind::Service, "list") > service_lists, "no relist of Services");
    assert!(bed.api.requests(Kind::EndpointSlice, "list") > slice_lists, "no relist of EndpointSlices");
    assert!(bed.log_count("listed again") >= 2, "the relist was not logged");
    for _ in 0..10 {
        assert_eq!(clients::tcp_request(&client, SocketAddrV4::new(web, 80), DEFAULT_TIMEOUT)?, "backend-1");
    }
    Ok(())
}

/// Polls `weir lb list` every 20 ms on a thread and records every snapshot
/// in which `vip`:80 is missing or does not have exactly `want` backends.
struct MapWatch {
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<usize>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MapWatch {
    fn start(bpffs_root: PathBuf, vip: Ipv4Addr, want: Vec<Ipv4Addr>) -> Result<MapWatch> {
        let cli = Cli::new(&bpffs_root)?;
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let thread = std::thread::spawn({
            let (stop, bad, polls) = (stop.clone(), bad.clone(), polls.clone());
            move || {
                let mut want = want;
                want.sort();
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let verdict = match cli.service(vip, 80, "TCP") {
                        Ok(Some(s)) => {
                            let mut have: Vec<Ipv4Addr> = s.backends.iter().map(|b| b.address).collect();
                            have.sort();
                            (have != want).then(|| format!("backends {have:?}"))
                        }
                        Ok(None) => Some("service missing".to_owned()),
                        Err(e) => Some(format!("weir lb list failed: {e:#}")),
                    };
                    if let Some(problem) = verdict {
                        bad.lock().unwrap().push(format!("at {:?}: {problem}", started.elapsed()));
                    }
                    *polls.lock().unwrap() += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Ok(MapWatch { stop, bad, polls, thread: Some(thread) })
    }

    /// Fails if any snapshot so far was wrong.
    fn check(&self) -> Result<usize> {
        let bad = self.bad.lock().unwrap();
        let polls = *self.polls.lock().unwrap();
        if !bad.is_empty() {
            bail!(
                "{} of {polls} snapshots of `weir lb list` were wrong: {:#?}",
                bad.len(),
                &bad[..bad.len().min(20)]
            );
        }
        Ok(polls)
    }

    /// Stops polling; fails if any snapshot was wrong.
    fn finish(mut self) -> Result<usize> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.check()
    }
}

impl Drop for MapWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn restart_keeps_connections_and_does_not_flush_before_resync() -> Result<()> {
    let mut bed = KubeBed::new(true)?;
    let client = bed.add_pod("client")?;
    let b1 = bed.add_pod("backend-1")?;
    let b2 = bed.add_pod("backend-2")?;
    let _servers =
        [&b1, &b2].iter().map(|p| TcpServer::start(p, 8080, TcpMode::Lines)).collect::<Result<Vec<_>>>()?;
    let vip = Ipv4Addr::new(10, 96, 4, 10);
    let addr = SocketAddrV4::new(vip, 80);
    bed.api.create(service("web", vip, &http()))?;
    bed.api.create(slice("web", &endpoints(&[&b1, &b2], &bed.node), &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1, &b2]))?;
    bed.wait_tcp(&client, addr)?;
    bed.wait_for_sync(1)?;

    let mut conn = TcpConn::connect(&client, addr, DEFAULT_TIMEOUT)?;
    let pinned = conn.exchange()?;
    let watch = MapWatch::start(bed.agent.bpffs_root().to_owned(), vip, ips(&[&b1, &b2]))?;

    // 1. Restart while EndpointSlices take 2 s to list: the Services arrive
    // first, and applying them alone would drop every backend.
    bed.agent.kill()?;
    assert_eq!(conn.exchange()?, pinned, "the connection broke when the agent died");
    bed.api.set_list_delay(Kind::EndpointSlice, Some(Duration::from_secs(2)));
    bed.agent.restart()?;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(conn.exchange()?, pinned, "the connection broke while the agent resynced");
        std::thread::sleep(Duration::from_millis(100));
    }
    watch.check()?;
    bed.expect_unhealthy_until_synced()?;
    bed.wait_for_sync(2)?;
    bed.api.set_list_delay(Kind::EndpointSlice, None);
    assert_eq!(bed.healthz()?.0, 200);

    // 2. Restart while the API server is away: nothing can be listed, and
    // nothing may be removed.
    bed.agent.kill()?;
    bed.api.stop();
    bed.agent.restart()?;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(conn.exchange()?, pinned, "the connection broke while the API server was away");
        clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    watch.check()?;
    bed.expect_unhealthy_until_synced()?;
    bed.api.start()?;
    bed.wait_for_sync(3)?;

    let polls = watch.finish()?;
    eprintln!("`weir lb list` polled {polls} times across two restarts: always complete");
    assert!(polls > 50, "only {polls} polls");
    assert_eq!(conn.exchange()?, pinned, "the connection broke after the restarts");
    clients::tcp_request(&client, addr, DEFAULT_TIMEOUT)?;
    Ok(())
}

impl KubeBed {
    /// Waits until the log shows the `n`th "initial sync complete" (one per
    /// agent start).
    fn wait_for_sync(&mut self, n: usize) -> Result<()> {
        let agent = &mut self.agent;
        wait_until(TIMEOUT, &format!("initial sync #{n}"), || {
            agent.ensure_running()?;
            Ok(agent.log().lines().filter(|l| l.contains("initial sync complete")).count() >= n)
        })
    }

    /// /healthz answers 503 (once the server is up) while the agent has not
    /// completed its first sync.
    fn expect_unhealthy_until_synced(&self) -> Result<()> {
        let (code, body) = wait_for(TIMEOUT, "/healthz to answer", || Ok(self.healthz().ok()))?;
        ensure!(code == 503, "/healthz answered {code} before the first sync: {body}");
        Ok(())
    }
}

#[test]
fn health_and_metrics() -> Result<()> {
    // The API server is away when the agent starts: not healthy yet.
    let mut bed = KubeBed::new(false)?;
    let (code, body) = wait_for(TIMEOUT, "/healthz to answer", || Ok(bed.healthz().ok()))?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC", "{body}");
    assert!(body["currentTime"].as_str().is_some_and(|t| t.ends_with(" +0000 UTC")), "{body}");
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert_eq!(bed.get(HEALTHZ, "/livez")?.0, 200, "alive, only not ready");
    bed.agent.wait_for_log_line(TIMEOUT, "a failed watch", |l| l.contains("watch failed"))?;
    assert_eq!(bed.healthz()?.0, 503, "healthy without ever listing");

    bed.api.start()?;
    let body = wait_for(TIMEOUT, "/healthz to turn 200", || {
        bed.agent.ensure_running()?;
        let (code, body) = bed.healthz()?;
        Ok((code == 200).then_some(body))
    })?;
    assert_eq!(body["lastUpdated"], body["currentTime"], "kube-proxy reports lastUpdated = now when healthy");
    let (code, livez) = bed.get(HEALTHZ, "/livez")?;
    assert_eq!(code, 200);
    let livez: Value = serde_json::from_str(&livez)?;
    assert!(livez.get("nodeEligible").is_none(), "{livez}");
    assert_eq!(bed.get(HEALTHZ, "/nope")?.0, 404);

    // A change with a trigger time: network programming latency is measured.
    let client = bed.add_pod("client")?;
    let b1 = bed.add_pod("backend-1")?;
    let _server = TcpServer::start(&b1, 8080, TcpMode::Lines)?;
    let vip = Ipv4Addr::new(10, 96, 5, 10);
    let empty = Ipv4Addr::new(10, 96, 5, 11);
    bed.api.create(service("web", vip, &http()))?;
    let mut web = slice("web", &endpoints(&[&b1], &bed.node), &http());
    web["metadata"]["annotations"] = json!({
        "endpoints.kubernetes.io/last-change-trigger-time": apiserver::rfc3339(SystemTime::now(), true),
    });
    bed.api.create(web)?;
    bed.api.create(service("empty", empty, &http()))?;
    bed.api.create(slice("empty", &[], &http()))?;
    bed.cli.wait_for_backends(TIMEOUT, vip, 80, "TCP", &ips(&[&b1]))?;
    bed.cli.wait_for_backends(TIMEOUT, empty, 80, "TCP", &[])?;
    bed.wait_tcp(&client, SocketAddrV4::new(vip, 80))?;
    // A service without backends drops, counted by reason.
    assert!(clients::tcp_request(&client, SocketAddrV4::new(empty, 80), Duration::from_millis(300)).is_err());

    let metrics = wait_for(TIMEOUT, "network programming latency in /metrics", || {
        let metrics = bed.metrics()?;
        Ok((metric_value(&metrics, "kubeproxy_network_programming_duration_seconds_count") >= Some(1.0))
            .then_some(metrics))
    })?;
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_proxy_healthz_total",
        "weir_map_entries{map=\"LB4_SERVICES_V",
        "weir_map_capacity{map=\"LB4_SERVICES_V",
        "weir_map_entries{map=\"CT4_V",
        "weir_conntrack_gc_runs_total",
        "weir_k8s_relists_total{kind=\"EndpointSlice\"}",
        "weir_k8s_watch_errors_total{kind=\"Service\"}",
        "weir_datapath_packets_total{",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "{name} missing from /metrics:\n{metrics}");
    }
    let last_sync =
        metric_value(&metrics, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap_or(0.0);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
    assert!((now - last_sync).abs() < 120.0, "last sync {last_sync}, now {now}");
    let services = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("weir_map_entries{map=\"LB4_SERVICES_V"))
        .find_map(|rest| rest.split_once("\"} ").and_then(|(_, v)| v.trim().parse::<f64>().ok()));
    assert!(services >= Some(2.0), "{metrics}");
    let programming =
        metric_value(&metrics, "kubeproxy_network_programming_duration_seconds_sum").unwrap_or(-1.0);
    assert!((0.0..10.0).contains(&programming), "programming latency sum {programming}");
    wait_until(TIMEOUT, "the no-backend drop in /metrics", || {
        Ok(bed.metrics()?.lines().any(|l| {
            l.starts_with("weir_datapath_packets_total{")
                && l.contains("code=\"158\"")
                && l.contains("verdict=\"dropped\"")
        }))
    })?;
    wait_until(TIMEOUT, "no pending changes", || {
        let metrics = bed.metrics()?;
        Ok(metric_value(&metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == Some(0.0)
            && metric_value(&metrics, "kubeproxy_sync_proxy_rules_service_changes_pending") == Some(0.0))
    })?;

    // Status churn of fields Weir does not read causes no reconciliation;
    // a label change (policy selectors read labels) does.
    let syncs = || -> Result<f64> {
        metric_value(&bed.metrics()?, "weir_syncs_total").context("weir_syncs_total missing")
    };
    let before = syncs()?;
    let mut pod = manifests::pod(NAMESPACE, "client", bed.node.name(), client.ip());
    for ready in ["True", "False", "True", "False"] {
        pod["status"]["conditions"] = json!([{ "type": "Ready", "status": ready }]);
        bed.api.update(pod.clone())?;
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(syncs()?, before, "Pod status churn caused reconciliations");
    pod["metadata"]["labels"]["tier"] = json!("front");
    bed.api.update(pod)?;
    wait_until(TIMEOUT, "a reconciliation after a label change", || Ok(syncs()? > before))?;

    // A node the autoscaler is about to delete is not eligible: /healthz
    // fails (load balancers drain it), /livez does not.
    bed.api.update(node_object(bed.node.name(), true))?;
    let body = wait_for(TIMEOUT, "/healthz to report the node ineligible", || {
        let (code, body) = bed.healthz()?;
        Ok((code == 503).then_some(body))
    })?;
    assert_eq!(body["nodeEligible"], false, "{body}");
    assert_eq!(bed.get(HEALTHZ, "/livez")?.0, 200);
    bed.api.update(node_object(bed.node.name(), false))?;
    wait_until(TIMEOUT, "/healthz back to 200", || Ok(bed.healthz()?.0 == 200))?;
    Ok(())
}

/// The value of the first sample line that starts with `series` followed by
/// a space (so `name` does not match `name_bucket`).
fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Prometheus' `histogram_quantile`: the `q` quantile of histogram `name`,
/// interpolated linearly inside the bucket it falls in.
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(previous.0);
            }
            let within = if count > previous.1 { (rank - previous.1) / (count - previous.1) } else { 0.0 };
            return Some(previous.0 + (le - previous.0) * within);
        }
        previous = (le, count);
    }
    None
}

/// The measurement behind the closing note: with 10,000 services
/// (and 10,000 EndpointSlices) loaded, a few hundred EndpointSlice changes,
/// each stamped with `endpoints.kubernetes.io/last-change-trigger-time` when
/// it is written to the API server; the agent measures from that stamp to
/// the end of the reconciliation that put it in the maps
/// (`kubeproxy_network_programming_duration_seconds`).
#[test]
#[ignore = "a measurement (about 2 minutes with a debug agent); run it with \
            WEIR_AGENT_BIN=target/release/weir-agent and --ignored --nocapture"]
fn event_to_map_latency_with_10000_services() -> Result<()> {
    const SERVICES: usize = 10_000;
    const CHANGES: usize = 300;
    let vip = |i: usize| Ipv4Addr::new(10, 100, (i / 256) as u8, (i % 256) as u8);
    let backend =
        |i: usize, n: u8| Endpoint::ready(Ipv4Addr::new(10, 250 + n, (i / 256) as u8, (i % 256) as u8));
    let name = |i: usize| format!("svc-{i}");
    let mut bed = KubeBed::start(true, Connect::Kubeconfig, |api| {
        for i in 0..SERVICES {
            api.create(service(&name(i), vip(i), &http()))?;
            api.create(slice(&name(i), &[backend(i, 0)], &http()))?;
        }
        Ok(())
    })?;
    let started = Instant::now();
    bed.wait_for_sync(1)?;
    let cli = bed.cli.clone();
    wait_until(Duration::from_secs(120), "10,000 services in the maps", || {
        Ok(cli.lb_list()?.len() >= SERVICES)
    })?;
    eprintln!("10,000 services listed and programmed in {:?}", started.elapsed());

    let changes = Instant::now();
    for change in 0..CHANGES {
        let i = (change * 7919) % SERVICES;
        let endpoints =
            if change % 2 == 0 { vec![backend(i, 0), backend(i, 1)] } else { vec![backend(i, 0)] };
        let mut updated = slice(&name(i), &endpoints, &http());
        updated["metadata"]["annotations"] = json!({
            "endpoints.kubernetes.io/last-change-trigger-time": apiserver::rfc3339(SystemTime::now(), true),
        });
        bed.api.update(updated)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = wait_for(TIMEOUT, "every change measured", || {
        let metrics = bed.metrics()?;
        let count =
            metric_value(&metrics, "kubeproxy_network_programming_duration_seconds_count").unwrap_or(0.0);
        Ok((count >= CHANGES as f64).then_some(metrics))
    })?;
    let changes = changes.elapsed();
    let p50 =
        histogram_quantile(&metrics, "kubeproxy_network_programming_duration_seconds", 0.5).unwrap_or(-1.0);
    let p99 =
        histogram_quantile(&metrics, "kubeproxy_network_programming_duration_seconds", 0.99).unwrap_or(-1.0);
    let sum = metric_value(&metrics, "kubeproxy_network_programming_duration_seconds_sum").unwrap_or(-1.0);
    let sync50 =
        histogram_quantile(&metrics, "kubeproxy_sync_proxy_rules_duration_seconds", 0.5).unwrap_or(-1.0);
    let sync99 =
        histogram_quantile(&metrics, "kubeproxy_sync_proxy_rules_duration_seconds", 0.99).unwrap_or(-1.0);
    eprintln!(
        "event-to-map latency over {CHANGES} EndpointSlice changes with {SERVICES} services: \
         p50 {:.1} ms, p99 {:.1} ms, mean {:.1} ms (reconciliation p50 {:.1} ms, p99 {:.1} ms; {changes:?} in all)",
        p50 * 1e3,
        p99 * 1e3,
        sum / CHANGES as f64 * 1e3,
        sync50 * 1e3,
        sync99 * 1e3,
    );
    // Generous: CI machines are slow and this is a debug build.
    assert!(p99 < 5.0, "p99 event-to-map latency {p99} s");
    bed.agent.ensure_running()?;
    Ok(())
}

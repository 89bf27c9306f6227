//! kube-proxy's per-Service health checks (`pkg/proxy/healthcheck/
//! service_health.go`): for every `type: LoadBalancer` Service with
//! `externalTrafficPolicy: Local`, an HTTP server on
//! `0.0.0.0:<spec.healthCheckNodePort>` of the node that tells the cloud load
//! balancer whether this node has endpoints of the Service, so that the load
//! balancer only sends traffic to nodes that can serve it locally (and keep
//! the client's address):
//!
//! - any request gets `{"service": {"namespace", "name"}, "localEndpoints": N,
//!   "serviceProxyHealthy": bool}` with `X-Load-Balancing-Endpoint-Weight: N`
//!   (weighted load balancers spread traffic by it);
//! - 200 when N > 0 and the agent is healthy, else 503.
//!
//! N counts this node's *ready* endpoints, by address (an endpoint serving
//! several ports counts once). Serving-but-terminating endpoints do not
//! count, although the datapath still uses them when nothing is ready: a node
//! left with only terminating endpoints must fail its check so that the load
//! balancer drains it first.
//!
//! Listeners are opened and closed one by one as Services appear, change
//! port or go away. A port that cannot be bound (another process has it) is
//! a warning and a metric, retried on every reconciliation; it never stops
//! the agent. The servers run on a thread of their own, like `/healthz`, so
//! they answer while the reconcile loop is busy.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{Response, body::Bytes, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    cluster::Cluster,
    health::Health,
    lb::translate::{SERVICE_NAME_LABEL, cluster_ips, namespace_name, parse_port},
    metrics::Metrics,
    names::ServiceName,
};

/// What one Service's health check should serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the Service on this node, by address.
    pub local_endpoints: usize,
}

/// The health checks a node should serve: one per `LoadBalancer` Service
/// with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, with its
/// ready local endpoints counted as kube-proxy counts them
/// (`EndpointsMap.LocalReadyEndpoints`): distinct addresses of endpoints
/// whose `ready` condition is not false and whose `nodeName` is `node`, in the
/// Service's IPv4 EndpointSlices that list a port.
pub fn desired(cluster: &Cluster, node: &str) -> BTreeMap<ServiceName, HealthCheck> {
    let mut checks = BTreeMap::new();
    for svc in &cluster.services {
        let Some(spec) = &svc.spec else {
            continue;
        };
        let wanted = spec.type_.as_deref() == Some("LoadBalancer")
            && spec.external_traffic_policy.as_deref() == Some("Local")
            // As kube-proxy: Services it does not proxy (headless, no
            // ports) get no health check either.
            && spec.ports.as_ref().is_some_and(|p| !p.is_empty())
            && !cluster_ips(svc).is_empty();
        let Some(port) = spec.health_check_node_port.and_then(parse_port).filter(|_| wanted) else {
            continue;
        };
        let (namespace, name) = namespace_name(&svc.metadata);
        checks.insert(ServiceName { namespace, name }, (port, BTreeSet::<Ipv4Addr>::new()));
    }
    for slice in &cluster.endpoint_slices {
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let name = ServiceName { namespace: namespace_name(&slice.metadata).0, name: service.clone() };
        let Some((_, addresses)) = checks.get_mut(&name) else {
            continue;
        };
        // kube-proxy builds its endpoints from the slice's ports: a slice
        // without a usable one contributes nothing.
        let has_port = slice.ports.iter().flatten().any(|p| p.port.and_then(parse_port).is_some());
        if slice.address_type != "IPv4" || !has_port {
            continue;
        }
        for endpoint in &slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready || endpoint.node_name.as_deref() != Some(node) {
                continue;
            }
            if let Some(address) = endpoint.addresses.first().and_then(|a| a.parse().ok()) {
                addresses.insert(address);
            }
        }
    }
    checks
        .into_iter()
        .map(|(name, (port, addresses))| (name, HealthCheck { port, local_endpoints: addresses.len() }))
        .collect()
}

/// The answer to a health-check request.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    weight: usize,
    body: String,
}

/// kube-proxy's answer, byte for byte (its Go template, dedented: tabs).
fn answer(service: &ServiceName, local_endpoints: usize, proxy_healthy: bool) -> Answer {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": \
         {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&service.namespace),
        quote(&service.name),
    );
    let status = if local_endpoints > 0 && proxy_healthy { 200 } else { 503 };
    Answer { status, weight: local_endpoints, body }
}

/// The health checks the reconcile loop last computed; the servers read
/// them on every request.
type Snapshot = BTreeMap<ServiceName, HealthCheck>;

/// The health-check servers of one node. Feed it the cluster after every
/// reconciliation with [`HealthCheckServers::update`].
#[derive(Debug)]
pub struct HealthCheckServers {
    node: String,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl HealthCheckServers {
    /// Starts the thread that serves the health checks of `node`; nothing
    /// listens before the first [`HealthCheckServers::update`].
    /// `serviceProxyHealthy` comes from `health`, as kube-proxy's comes from
    /// its `/healthz` state.
    pub fn start(node: &str, health: Arc<Health>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let (snapshot, receiver) = watch::channel(Arc::new(Snapshot::new()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("weir-hcnp".to_owned()).spawn(move || {
            runtime.block_on(reconcile(receiver, health, metrics));
        })?;
        Ok(Self { node: node.to_owned(), snapshot })
    }

    /// Opens, moves and closes listeners to match `cluster`, and updates the
    /// endpoint counts they report. Does not wait for the listeners.
    pub fn update(&self, cluster: &Cluster) {
        self.snapshot.send_replace(Arc::new(desired(cluster, &self.node)));
    }
}

/// One open health-check port.
struct Listener {
    port: u16,
    /// Accepts and answers; aborting it closes the port and its connections.
    task: tokio::task::JoinHandle<()>,
}

/// Makes the open listeners follow the snapshots until the sender goes away.
async fn reconcile(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let mut open: BTreeMap<ServiceName, Listener> = BTreeMap::new();
    // Ports that failed to bind, warned about once until they work or change.
    let mut failing: BTreeSet<(ServiceName, u16)> = BTreeSet::new();
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        let port_of = |service: &ServiceName| snapshot.get(service).map(|c| c.port);
        let closing: Vec<ServiceName> =
            open.iter().filter(|(s, l)| port_of(s) != Some(l.port)).map(|(s, _)| s.clone()).collect();
        for service in closing {
            let Some(listener) = open.remove(&service) else {
                continue;
            };
            listener.task.abort();
            // Waiting for the task to drop its socket frees the port now, for
            // a Service that takes it over in this same pass.
            let _ = listener.task.await;
            info!(%service, port = listener.port, "closed health check");
        }
        failing.retain(|(service, port)| port_of(service) == Some(*port));
        for (service, check) in snapshot.iter() {
            if open.contains_key(service) {
                continue;
            }
            match TcpListener::bind((Ipv4Addr::UNSPECIFIED, check.port)).await {
                Ok(socket) => {
                    info!(%service, port = check.port, "serving health check");
                    failing.remove(&(service.clone(), check.port));
                    let task =
                        tokio::spawn(serve(socket, service.clone(), snapshots.clone(), health.clone()));
                    open.insert(service.clone(), Listener { port: check.port, task });
                }
                Err(err) => {
                    metrics.health_check_bind_errors.inc();
                    if failing.insert((service.clone(), check.port)) {
                        warn!(%service, port = check.port, error = %err,
                            "cannot listen on the healthCheckNodePort; load balancers will see this node \
                             as down; retrying on every sync");
                    } else {
                        debug!(%service, port = check.port, error = %err, "health check port still unavailable");
                    }
                }
            }
        }
    }
}

/// Answers every request on `socket` for `service` from the latest snapshot.
/// Connections live in a [`JoinSet`] so that aborting this task closes them
/// with the port: a load balancer's keep-alive connection must not outlive
/// the Service.
async fn serve(
    socket: TcpListener,
    service: ServiceName,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    health: Arc<Health>,
) {
    let service = Arc::new(service);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => {
                    let (service, snapshots, health) = (service.clone(), snapshots.clone(), health.clone());
                    connections.spawn(connection(stream, service, snapshots, health));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%service, error = %err, "health check: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// One HTTP/1 connection. Like kube-proxy, every method and path gets the
/// same answer.
async fn connection(
    stream: tokio::net::TcpStream,
    service: Arc<ServiceName>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    health: Arc<Health>,
) {
    let handler = hyper::service::service_fn(move |_request| {
        let count = snapshots.borrow().get(&*service).map_or(0, |c| c.local_endpoints);
        let reply = answer(&service, count, health.proxy_healthy());
        let response = Response::builder()
            .status(reply.status)
            .header(header::CONTENT_TYPE, "application/json")
            .header("X-Content-Type-Options", "nosniff")
            .header("X-Load-Balancing-Endpoint-Weight", reply.weight)
            .body(Full::new(Bytes::from(reply.body)))
            .unwrap_or_default();
        async move { Ok::<_, Infallible>(response) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), handler)
        .await;
    if let Err(err) = served {
        debug!(error = %err, "health check connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_yaml::from_str(s).unwrap()
    }

    fn web() -> ServiceName {
        ServiceName { namespace: "shop".into(), name: "web".into() }
    }

    #[test]
    fn answers_as_kube_proxy() {
        let ok = answer(&web(), 2, true);
        assert_eq!((ok.status, ok.weight), (200, 2));
        assert_eq!(
            ok.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let json: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["localEndpoints"], 2);

        let none = answer(&web(), 0, true);
        assert_eq!((none.status, none.weight), (503, 0), "no local endpoint: drain this node");
        let stuck = answer(&web(), 3, false);
        assert_eq!(stuck.status, 503, "an unhealthy agent fails every check");
        assert!(stuck.body.contains("\"serviceProxyHealthy\": false"), "{}", stuck.body);
    }

    fn cluster() -> Cluster {
        Cluster {
            services: vec![Arc::new(yaml(
                r#"
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080}, {name: https, port: 443, nodePort: 30443}]
"#,
            ))],
            endpoint_slices: vec![Arc::new(yaml(
                r#"
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints:
- {addresses: [10.244.0.2], nodeName: n1}
- {addresses: [10.244.0.3], nodeName: n1, conditions: {ready: true}}
- {addresses: [10.244.0.4], nodeName: n1, conditions: {ready: false}}
- {addresses: [10.244.0.5], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.1.2], nodeName: n2}
"#,
            ))],
            ..Cluster::default()
        }
    }

    #[test]
    fn counts_ready_local_endpoints_once_per_address() {
        let mut cluster = cluster();
        let mut second = (*cluster.endpoint_slices[0]).clone();
        second.metadata.name = Some("web-b".into());
        second.endpoints.truncate(1); // 10.244.0.2 again
        cluster.endpoint_slices.push(Arc::new(second));
        let checks = desired(&cluster, "n1");
        assert_eq!(
            checks[&web()],
            HealthCheck { port: 32000, local_endpoints: 2 },
            "unset ready is ready; not ready and serving-terminating endpoints do not count; \
             an address counts once over ports and slices"
        );
        assert_eq!(desired(&cluster, "n2")[&web()].local_endpoints, 1);
        assert_eq!(desired(&cluster, "n3")[&web()].local_endpoints, 0, "still served: 503");
    }

    #[test]
    fn only_load_balancers_with_local_policy_and_a_port_are_checked() {
        for change in
            ["externalTrafficPolicy: Cluster", "type: NodePort", "healthCheckNodePort: 0", "clusterIP: None"]
        {
            let mut cluster = cluster();
            let mut spec = serde_json::to_value(cluster.services[0].spec.as_ref()).unwrap();
            let (key, value) = change.split_once(": ").unwrap();
            spec[key] = yaml(value);
            spec["clusterIPs"] = serde_json::Value::Null;
            Arc::make_mut(&mut cluster.services[0]).spec = serde_json::from_value(spec).unwrap();
            assert!(desired(&cluster, "n1").is_empty(), "{change}: no health check");
        }
    }
}

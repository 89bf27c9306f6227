//! `--source kube`: the Kubernetes API server, through kube-rs watchers and
//! reflector stores.
//!
//! One watcher per kind (Services, EndpointSlices, Pods, Namespaces,
//! NetworkPolicies, Nodes) keeps a reflector store up to date; objects are
//! trimmed to what Weir reads before they are stored. The agent never acts
//! on single watch events: [`KubeSource::changed`] hands out the *whole*
//! content of the stores, so the reconciliation is level-triggered and a lost
//! Delete cannot leave a stale backend behind.
//!
//! - Nothing is handed out before every store has completed its first list,
//!   so a restarted agent never removes anything before it has resynced.
//! - A `410 Gone` (watch too old, e.g. after an outage) makes the watcher list
//!   again (`Init`, `InitApply`…, `InitDone`); the store swaps in the new list
//!   at `InitDone` rather than adding to the old content, so objects deleted
//!   during the outage disappear. The old content is served until then.
//! - Failures are retried with kube's default backoff (0.8 s doubling to
//!   30 s), logged, and counted; the stores, and so the maps, keep their last
//!   state meanwhile.
//! - Changes are batched: the state is handed out at most once per
//!   [`BATCH`]. A change after a quiet period goes out at once; changes that
//!   arrive while one is being applied, or within [`BATCH`] of the last
//!   hand-out, go out together when the window ends (kube-proxy's
//!   `minSyncPeriod`, as a bounded-frequency runner).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::{debug, info, warn};

use super::validate;
use crate::{
    cluster::Cluster,
    health::Health,
    metrics::{KindLabel, Metrics},
};

/// The shortest interval between two hand-outs of the state.
pub const BATCH: Duration = Duration::from_millis(50);

/// The annotation kube-proxy measures network programming latency from.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// `--kubeconfig`: a kubeconfig file (its current context).
    pub kubeconfig: Option<PathBuf>,
    /// `--api-server`: the API server's address, overriding the kubeconfig's
    /// or the in-cluster one. A kube-proxy replacement cannot reach the API
    /// server through the `kubernetes` Service's ClusterIP, which it is
    /// itself responsible for.
    pub api_server: Option<String>,
}

/// Builds the client configuration: `--kubeconfig`, else `KUBECONFIG` /
/// `~/.kube/config`, else in-cluster (service account, and
/// `KUBERNETES_SERVICE_HOST`/`PORT`, which a DaemonSet sets to the real API
/// server address). `--api-server` replaces the server address of any of
/// them; alone, it uses the service account's credentials when present.
pub async fn client_config(options: &KubeOptions) -> anyhow::Result<Config> {
    let mut config = if let Some(path) = &options.kubeconfig {
        let kubeconfig = Kubeconfig::read_from(path)
            .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading the kubeconfig {}", path.display()))?
    } else if options.api_server.is_some() {
        if std::env::var_os("KUBECONFIG").is_some() {
            Config::from_kubeconfig(&KubeConfigOptions::default()).await.context("loading $KUBECONFIG")?
        } else {
            match Config::incluster_dns() {
                Ok(config) => config,
                Err(err) => {
                    debug!(error = %err, "no in-cluster credentials; connecting without");
                    Config::new("http://localhost".parse()?)
                }
            }
        }
    } else {
        Config::infer().await.context(
            "no Kubernetes API configuration: pass --kubeconfig or --api-server, set KUBECONFIG, \
             or run in a pod (KUBERNETES_SERVICE_HOST/PORT and a service account)",
        )?
    };
    if let Some(server) = &options.api_server {
        let url = if server.contains("://") { server.clone() } else { format!("https://{server}") };
        config.cluster_url = url.parse().with_context(|| format!("--api-server {server:?} is not a URL"))?;
    }
    Ok(config)
}

/// Counts objects that change while the agent runs, for the pending-changes
/// metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Services,
    Endpoints,
    No,
}

/// One kind's store and whether it has completed its first list.
struct Watched<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    ready: Arc<AtomicBool>,
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts watching every `K` in the cluster; every change to the store
    /// bumps `notify`.
    fn start(client: &Client, trim: fn(&mut K), counted: Counted, shared: &Shared) -> (Self, JoinHandle<()>) {
        let kind = K::kind(&());
        let (store, writer) = reflector::store::<K>();
        let ready = Arc::new(AtomicBool::new(false));
        let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(trim)
            .reflect(writer);
        let task = tokio::spawn({
            let ready = ready.clone();
            let shared = shared.clone();
            let store = store.clone();
            async move {
                let mut stream = std::pin::pin!(stream);
                let mut failing = false;
                // What Weir reads of each object (after trimming), to ignore
                // updates that change nothing of it: Pod and Node status
                // churn would otherwise cause a full reconciliation each.
                let mut seen: HashMap<String, u64> = HashMap::new();
                let mut listing: HashMap<String, u64> = HashMap::new();
                while let Some(event) = stream.next().await {
                    let event = match event {
                        Ok(event) => event,
                        Err(err) => {
                            // The watcher retries after a backoff; the store
                            // (and so the maps) keeps its last state.
                            shared
                                .metrics
                                .watch_errors
                                .get_or_create(&KindLabel { kind: kind.to_string() })
                                .inc();
                            warn!(%kind, error = %err, "watch failed; retrying with backoff, keeping the last state");
                            failing = true;
                            continue;
                        }
                    };
                    // Init comes before the list request: not yet a success.
                    if failing && !matches!(event, watcher::Event::Init) {
                        failing = false;
                        info!(%kind, "watch recovered");
                    }
                    match &event {
                        watcher::Event::Init => {
                            debug!(%kind, "listing");
                            listing.clear();
                            continue;
                        }
                        // The store changes only at InitDone.
                        watcher::Event::InitApply(object) => {
                            listing.insert(object_key(object), fingerprint(object));
                            continue;
                        }
                        watcher::Event::InitDone => {
                            seen = std::mem::take(&mut listing);
                            shared.metrics.relists.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
                            let first = !ready.swap(true, Ordering::SeqCst);
                            info!(%kind, objects = store.len(), "{}", if first { "listed" } else { "listed again" });
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            if let watcher::Event::Apply(object) = &event {
                                let print = fingerprint(object);
                                if seen.insert(object_key(object), print) == Some(print) {
                                    continue;
                                }
                            } else if let watcher::Event::Delete(object) = &event {
                                seen.remove(&object_key(object));
                            }
                            match counted {
                                Counted::Services => {
                                    shared.metrics.service_changes_pending.inc();
                                    shared.metrics.service_changes_total.inc();
                                }
                                Counted::Endpoints => {
                                    shared.metrics.endpoint_changes_pending.inc();
                                    shared.metrics.endpoint_changes_total.inc();
                                }
                                Counted::No => {}
                            }
                        }
                    }
                    shared.health.queued();
                    shared.notify.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        });
        (Self { store, ready }, task)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The store's objects, shared with it (not copied), sorted by namespace
    /// and name (the store is a hash map; sorting makes every
    /// reconciliation see the same order).
    fn objects(&self) -> Vec<Arc<K>> {
        let mut objects: Vec<Arc<K>> = self.store.state();
        objects.sort_by(|a, b| {
            (a.meta().namespace.as_deref(), a.meta().name.as_deref())
                .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
        });
        objects
    }
}

/// `namespace/name`.
fn object_key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    format!("{}/{}", meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""))
}

/// A hash of everything but the resourceVersion and generation (which change
/// with writes to fields the trimming removed).
fn fingerprint<K: Resource + Clone + serde::Serialize>(object: &K) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    object.meta_mut().generation = None;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(&object).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// What the watch tasks share with the source.
#[derive(Clone)]
struct Shared {
    notify: Arc<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub struct KubeSource {
    services: Watched<Service>,
    endpoint_slices: Watched<EndpointSlice>,
    pods: Watched<Pod>,
    namespaces: Watched<Namespace>,
    network_policies: Watched<NetworkPolicy>,
    nodes: Watched<Node>,
    changes: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    /// A change was seen since the state was last handed out.
    dirty: bool,
    /// When the state was last handed out (`None`: never).
    delivered_at: Option<Instant>,
    closed: bool,
    /// Pending-change gauges as they were when the state was last handed
    /// out: [`KubeSource::programmed`] takes them off.
    handed_out: (i64, i64),
    /// Invalid objects already reported (kind, namespace/name, resourceVersion).
    reported: HashSet<(&'static str, String, String)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Connects (lazily: the watchers retry until the API server answers)
    /// and starts the watchers.
    pub async fn start(
        options: &KubeOptions,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let config = client_config(options).await?;
        info!(api_server = %config.cluster_url, "watching the Kubernetes API");
        let client = Client::try_from(config).context("creating the Kubernetes client")?;
        let (notify, changes) = watch::channel(0u64);
        let shared = Shared { notify: Arc::new(notify), metrics: metrics.clone(), health };
        let mut tasks = Vec::new();
        let mut start = |task: JoinHandle<()>| tasks.push(task);
        let (services, t) = Watched::start(&client, trim_service, Counted::Services, &shared);
        start(t);
        let (endpoint_slices, t) = Watched::start(&client, trim_endpoint_slice, Counted::Endpoints, &shared);
        start(t);
        let (pods, t) = Watched::start(&client, trim_pod, Counted::No, &shared);
        start(t);
        let (namespaces, t) = Watched::start(&client, trim_namespace, Counted::No, &shared);
        start(t);
        let (network_policies, t) = Watched::start(&client, trim_network_policy, Counted::No, &shared);
        start(t);
        let (nodes, t) = Watched::start(&client, trim_node, Counted::No, &shared);
        start(t);
        Ok(Self {
            services,
            endpoint_slices,
            pods,
            namespaces,
            network_policies,
            nodes,
            changes,
            metrics,
            dirty: false,
            delivered_at: None,
            closed: false,
            handed_out: (0, 0),
            reported: HashSet::new(),
            tasks,
        })
    }

    fn kinds_ready(&self) -> [(&'static str, bool); 6] {
        [
            ("Service", self.services.ready()),
            ("EndpointSlice", self.endpoint_slices.ready()),
            ("Pod", self.pods.ready()),
            ("Namespace", self.namespaces.ready()),
            ("NetworkPolicy", self.network_policies.ready()),
            ("Node", self.nodes.ready()),
        ]
    }

    fn all_ready(&self) -> bool {
        self.kinds_ready().iter().all(|(_, ready)| *ready)
    }

    /// See [`super::Source::changed`]. Cancel-safe: all progress is kept in
    /// `self` between polls.
    pub async fn changed(&mut self) -> anyhow::Result<Cluster> {
        loop {
            if self.closed {
                std::future::pending::<()>().await;
            }
            if self.changes.has_changed().unwrap_or(false) {
                self.changes.borrow_and_update();
                self.dirty = true;
            }
            if self.all_ready() && (self.dirty || self.delivered_at.is_none()) {
                let deadline = self.delivered_at.map_or_else(Instant::now, |at| at + BATCH);
                tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(deadline) => {
                        // Mark what is about to be read as seen: a change
                        // after this point goes out with the next batch.
                        self.changes.borrow_and_update();
                        self.dirty = false;
                        self.delivered_at = Some(Instant::now());
                        let started = std::time::Instant::now();
                        let cluster = self.cluster();
                        debug!(elapsed_us = started.elapsed().as_micros() as u64, "cluster state read from the stores");
                        return Ok(cluster);
                    }
                    changed = self.changes.changed() => {
                        if changed.is_err() {
                            self.closed = true;
                            anyhow::bail!("the Kubernetes watchers stopped");
                        }
                        self.dirty = true;
                    }
                }
            } else if self.changes.changed().await.is_err() {
                self.closed = true;
                anyhow::bail!("the Kubernetes watchers stopped");
            } else {
                self.dirty = true;
                if !self.all_ready() {
                    let waiting: Vec<&str> = self
                        .kinds_ready()
                        .iter()
                        .filter(|(_, ready)| !ready)
                        .map(|(kind, _)| *kind)
                        .collect();
                    debug!(?waiting, "waiting for the initial list of every kind");
                }
            }
        }
    }

    /// Everything in the stores, invalid objects left out (and reported once
    /// per version).
    fn cluster(&mut self) -> Cluster {
        self.handed_out =
            (self.metrics.service_changes_pending.get(), self.metrics.endpoint_changes_pending.get());
        let services = self.valid("Service", self.services.objects(), validate::service);
        let endpoint_slices =
            self.valid("EndpointSlice", self.endpoint_slices.objects(), validate::endpoint_slice);
        let pods = self.valid("Pod", self.pods.objects(), validate::pod);
        let nodes = self.valid("Node", self.nodes.objects(), validate::node);
        Cluster {
            services,
            endpoint_slices,
            pods,
            namespaces: self.namespaces.objects(),
            network_policies: self.network_policies.objects(),
            nodes,
        }
    }

    fn valid<K: Resource>(
        &mut self,
        kind: &'static str,
        objects: Vec<Arc<K>>,
        check: fn(&K) -> Result<(), String>,
    ) -> Vec<Arc<K>> {
        objects
            .into_iter()
            .filter(|object| match check(object) {
                Ok(()) => true,
                Err(error) => {
                    let meta = object.meta();
                    let name = format!(
                        "{}/{}",
                        meta.namespace.as_deref().unwrap_or(""),
                        meta.name.as_deref().unwrap_or("")
                    );
                    let version = meta.resource_version.clone().unwrap_or_default();
                    if self.reported.insert((kind, name.clone(), version)) {
                        warn!(kind, object = %name, %error, "invalid object skipped");
                    }
                    false
                }
            })
            .collect()
    }

    /// The state last handed out is now in the maps: its changes are no
    /// longer pending.
    pub fn programmed(&mut self) {
        let (services, endpoints) = std::mem::take(&mut self.handed_out);
        self.metrics.service_changes_pending.dec_by(services);
        self.metrics.endpoint_changes_pending.dec_by(endpoints);
    }
}

// Trimming: stores hold only what Weir reads (kube's pod_reflector example).

fn trim_meta(meta: &mut ObjectMeta, keep_annotations: &[&str]) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| keep_annotations.contains(&key.as_str()));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Service annotations that may carry proxy behaviour (kube-proxy honours
/// `service.kubernetes.io/*`); the rest (last-applied-configuration…) goes.
fn trim_service(service: &mut Service) {
    service.meta_mut().managed_fields = None;
    if let Some(annotations) = &mut service.metadata.annotations {
        annotations.retain(|key, _| key.starts_with("service.kubernetes.io/"));
    }
    service.status = None;
}

fn trim_endpoint_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata, &[LAST_CHANGE_TRIGGER_TIME]);
}

/// Pods: node, addresses, labels (policy selectors) and container ports
/// (named ports in policies and services).
fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata, &[]);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| Container { name: c.name, ports: c.ports, ..Container::default() })
                .collect(),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            host_ips: status.host_ips,
            ..PodStatus::default()
        });
    }
}

fn trim_namespace(namespace: &mut Namespace) {
    trim_meta(&mut namespace.metadata, &[]);
    namespace.spec = None;
    namespace.status = None;
}

fn trim_network_policy(policy: &mut NetworkPolicy) {
    trim_meta(&mut policy.metadata, &[]);
}

/// Nodes: labels (the zone, for topology hints), taints and deletion
/// (health), addresses and pod CIDRs (NodePort, routing); images, conditions
/// and the rest go.
fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata, &[]);
    if let Some(spec) = node.spec.take() {
        node.spec = Some(NodeSpec {
            pod_cidr: spec.pod_cidr,
            pod_cidrs: spec.pod_cidrs,
            taints: spec.taints,
            unschedulable: spec.unschedulable,
            ..NodeSpec::default()
        });
    }
    if let Some(status) = node.status.take() {
        node.status = Some(NodeStatus { addresses: status.addresses, ..NodeStatus::default() });
    }
}

/// The last-change-trigger-time of every EndpointSlice that has one, by
/// `namespace/name`: what the network-programming latency is measured from.
pub fn trigger_times(cluster: &Cluster) -> BTreeMap<String, k8s_openapi::jiff::Timestamp> {
    cluster
        .endpoint_slices
        .iter()
        .filter_map(|slice| {
            let value = slice.annotations().get(LAST_CHANGE_TRIGGER_TIME)?;
            let time = value.parse().ok()?;
            Some((format!("{}/{}", slice.namespace().unwrap_or_default(), slice.name_any()), time))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_keep_what_weir_reads() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "x"},
                         "annotations": {"big": "y"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "c", "image": "img", "ports": [{"name": "http", "containerPort": 80}],
                 "env": [{"name": "A", "value": "B"}]}]},
            "status": {"podIP": "10.244.0.2", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        trim_pod(&mut pod);
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "n", "labels": {"app": "x"}},
                "spec": {"nodeName": "n1", "containers": [
                    {"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
                "status": {"podIP": "10.244.0.2", "phase": "Running"}
            })
        );
    }

    #[test]
    fn nodes_keep_their_zone() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "status": {"images": [{"names": ["img"]}], "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
        }))
        .unwrap();
        trim_node(&mut node);
        assert!(node.status.as_ref().unwrap().images.is_none());
        let cluster = Cluster { nodes: vec![Arc::new(node)], ..Cluster::default() };
        assert_eq!(cluster.zone_of("n1"), Some("zone-a"));
    }

    #[test]
    fn endpoint_slices_keep_the_trigger_time() {
        let mut slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n", "annotations": {
                LAST_CHANGE_TRIGGER_TIME: "2024-01-02T03:04:05.123456Z",
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        trim_endpoint_slice(&mut slice);
        assert_eq!(slice.annotations().len(), 1);
        let cluster = Cluster { endpoint_slices: vec![Arc::new(slice)], ..Cluster::default() };
        let times = trigger_times(&cluster);
        assert_eq!(times["n/s"].to_string(), "2024-01-02T03:04:05.123456Z", "{times:?}");
    }

    #[test]
    fn the_store_is_rebuilt_by_a_relist() {
        // kube's Writer swaps the relisted objects in at InitDone: objects
        // deleted while the watch was gone do not survive a 410 relist.
        let (store, mut writer) = reflector::store::<Namespace>();
        let ns = |name: &str| Namespace {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            ..Namespace::default()
        };
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(ns("a")));
        writer.apply_watcher_event(&watcher::Event::InitApply(ns("b")));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(store.len(), 2);
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(ns("a")));
        assert_eq!(store.len(), 2, "the old state is served during a relist");
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let names: Vec<String> = store.state().iter().map(|n| n.name_any()).collect();
        assert_eq!(names, ["a"]);
    }
}

//! Prometheus metrics on `--metrics-bind-address` (default 127.0.0.1:10249,
//! kube-proxy's metrics port).
//!
//! Two families:
//! - the mode-independent `kubeproxy_*` metrics (kube-proxy's
//!   `pkg/proxy/metrics/metrics.go`), so existing dashboards and alerts work
//!   with "sync" meaning one reconciliation of the eBPF maps;
//! - Weir's own `weir_*`: entries and capacity of every pinned map, datapath
//!   counters by reason (drops included, with Cilium's reason names),
//!   conntrack GC, and watch errors.
//!
//! Datapath numbers are read from the pinned maps when scraped, on a blocking
//! thread, so a scrape never stalls the reconcile loop and always reflects the
//! kernel's current state (also what a previous agent run left behind).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use crate::flows::FlowMetrics;
use aya::maps::{MapData, MapInfo, MapType, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use weir_abi::{
    map_name,
    metrics::{Counter as DatapathCounter, is_drop, reason_name},
};

/// A `code` label (HTTP status of the health endpoints).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// A `kind` label (Kubernetes resource kind).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// A failed map write: which map, and whether it was full.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapWriteLabel {
    pub map: String,
    pub full: String,
}

/// Every metric the agent updates, and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: one reconciliation.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub sync_last_timestamp: Gauge<f64, AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`: the last
    /// time a change was queued (much larger than `last_timestamp` = hung).
    pub sync_last_queued_timestamp: Gauge<f64, AtomicU64>,
    /// `kubeproxy_network_programming_duration_seconds`: from an
    /// EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to
    /// the maps holding the change.
    pub network_programming: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    /// `kubeproxy_proxy_healthz_total{code}` / `kubeproxy_proxy_livez_total{code}`.
    pub healthz_total: Family<CodeLabel, Counter>,
    pub livez_total: Family<CodeLabel, Counter>,
    pub ct_gc_runs: Counter,
    pub ct_gc_deleted: Counter,
    pub ct_gc_duration: Histogram,
    /// Watch and list failures against the API server, by kind.
    pub watch_errors: Family<KindLabel, Counter>,
    /// Complete re-lists (startup, and after `410 Gone`), by kind.
    pub relists: Family<KindLabel, Counter>,
    /// Reconciliations.
    pub syncs: Counter,
    /// Map writes that failed (retried on the next reconciliation), with
    /// `full="true"` when the map had no room: raise its `--map-size-*`.
    pub map_write_errors: Family<MapWriteLabel, Counter>,
    /// Failed attempts to listen on a Service's `healthCheckNodePort`.
    pub health_check_bind_errors: Counter,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    /// Registers every metric; `bpffs_root` is where the datapath's maps are
    /// pinned (read on each scrape).
    pub fn new(bpffs_root: &Path, flows: Arc<FlowMetrics>) -> Self {
        let mut registry = Registry::default();
        // kube-proxy: exponential buckets 1 ms × 2^0..2^15.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds: one reconciliation of the eBPF maps",
            sync_duration.clone(),
        );
        let sync_last_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time the eBPF maps were successfully reconciled",
            sync_last_timestamp.clone(),
        );
        let sync_last_queued_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of the eBPF maps was queued",
            sync_last_queued_timestamp.clone(),
        );
        // kube-proxy's buckets (0.25 s .. 5 min) with finer ones below them:
        // an eBPF map update takes milliseconds, not seconds.
        let programming_buckets: Vec<f64> = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
            .into_iter()
            .chain([0.25, 0.5])
            .chain((1..=59).map(f64::from))
            .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
            .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)))
            .collect();
        let network_programming = Histogram::new(programming_buckets);
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency in seconds",
            network_programming.clone(),
        );
        let endpoint_changes_pending = Gauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending EndpointSlice changes, received but not yet programmed",
            endpoint_changes_pending.clone(),
        );
        let endpoint_changes_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative EndpointSlice changes",
            endpoint_changes_total.clone(),
        );
        let service_changes_pending = Gauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending Service changes, received but not yet programmed",
            service_changes_pending.clone(),
        );
        let service_changes_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative Service changes",
            service_changes_total.clone(),
        );
        let healthz_total = Family::<CodeLabel, Counter>::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz_total.clone(),
        );
        let livez_total = Family::<CodeLabel, Counter>::default();
        registry.register("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", livez_total.clone());
        let ct_gc_runs = Counter::default();
        registry.register(
            "weir_conntrack_gc_runs",
            "Conntrack garbage-collection passes",
            ct_gc_runs.clone(),
        );
        let ct_gc_deleted = Counter::default();
        registry.register(
            "weir_conntrack_gc_deleted_entries",
            "Expired conntrack entries deleted by the garbage collector",
            ct_gc_deleted.clone(),
        );
        let ct_gc_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "weir_conntrack_gc_duration_seconds",
            "Duration of one conntrack garbage-collection pass",
            ct_gc_duration.clone(),
        );
        let watch_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "weir_k8s_watch_errors",
            "Failed list or watch requests to the Kubernetes API server (retried with backoff)",
            watch_errors.clone(),
        );
        let relists = Family::<KindLabel, Counter>::default();
        registry.register(
            "weir_k8s_relists",
            "Complete lists of a kind (at start, and after a watch expired with 410 Gone)",
            relists.clone(),
        );
        let syncs = Counter::default();
        registry.register("weir_syncs", "Reconciliations of the eBPF maps", syncs.clone());
        let map_write_errors = Family::<MapWriteLabel, Counter>::default();
        registry.register(
            "weir_map_write_errors",
            "Failed eBPF map writes by map; full=true: the map is full",
            map_write_errors.clone(),
        );
        let health_check_bind_errors = Counter::default();
        registry.register(
            "weir_health_check_bind_errors",
            "Failed attempts to listen on a Service's healthCheckNodePort (retried on every sync)",
            health_check_bind_errors.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector { root: bpffs_root.to_owned() }));
        registry.register_collector(Box::new(FlowCollector(flows)));
        Self {
            map_write_errors,
            health_check_bind_errors,
            registry,
            sync_duration,
            sync_last_timestamp,
            sync_last_queued_timestamp,
            network_programming,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            healthz_total,
            livez_total,
            ct_gc_runs,
            ct_gc_deleted,
            ct_gc_duration,
            watch_errors,
            relists,
            syncs,
        }
    }

    /// Counts the map writes a reconciliation could not make.
    pub fn map_write_failed(&self, errors: &[(&'static str, bool)]) {
        for (map, full) in errors {
            self.map_write_errors
                .get_or_create(&MapWriteLabel { map: (*map).to_owned(), full: full.to_string() })
                .inc();
        }
    }

    /// Records one reconciliation that took `elapsed`.
    pub fn synced(&self, elapsed: Duration) {
        self.sync_duration.observe(elapsed.as_secs_f64());
        self.sync_last_timestamp.set(unix_now());
        self.syncs.inc();
    }

    /// Records that a change was queued for the next reconciliation.
    pub fn queued(&self) {
        self.sync_last_queued_timestamp.set(unix_now());
    }

    /// The Prometheus text exposition (format 0.0.4). Reads the pinned maps:
    /// call it from a blocking thread.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %err, "cannot encode metrics");
        }
        out
    }
}

/// `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Reads the datapath's pinned maps on each scrape.
#[derive(Debug)]
struct DatapathCollector {
    root: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    code: String,
    reason: String,
    verdict: String,
}

struct MapStat {
    name: String,
    entries: u64,
    capacity: u64,
}

impl DatapathCollector {
    /// Every map pinned directly under the root (links and other objects are
    /// skipped), with its entry count and capacity.
    fn maps(&self) -> Vec<MapStat> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut stats = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let Ok(info) = MapInfo::from_pin(&path) else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            // The info call does not check the object type: a pinned program
            // or link would come back as nonsense. A map's kernel name is its
            // pin name, truncated to 15 bytes.
            if !info.name_as_str().is_some_and(|n| !n.is_empty() && name.starts_with(n)) {
                continue;
            }
            let capacity = u64::from(info.max_entries());
            let entries = match info.map_type() {
                // Arrays always hold max_entries elements.
                Ok(MapType::Array | MapType::PerCpuArray) => capacity,
                // Ring and perf buffers have bytes or CPUs, not entries.
                Ok(MapType::RingBuf | MapType::PerfEventArray) => continue,
                _ => match info.fd() {
                    Ok(fd) => {
                        count_keys(fd.as_fd(), info.key_size() as usize, capacity).unwrap_or_else(|err| {
                            tracing::debug!(map = %name, error = %err, "cannot count entries");
                            0
                        })
                    }
                    Err(_) => continue,
                },
            };
            stats.push(MapStat { name, entries, capacity });
        }
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    /// Packets and bytes per reason, summed over CPUs (non-zero only).
    fn counters(&self) -> Vec<(u32, DatapathCounter)> {
        let path = self.root.join(map_name::METRICS);
        let Ok(data) = MapData::from_pin(&path) else {
            return Vec::new();
        };
        let Ok(map) = PerCpuArray::<MapData, DatapathCounter>::try_from(aya::maps::Map::PerCpuArray(data))
        else {
            return Vec::new();
        };
        let mut rows = Vec::new();
        for code in 0..map.len() {
            let Ok(per_cpu) = map.get(&code, 0) else {
                continue;
            };
            let total = per_cpu.iter().fold(DatapathCounter::default(), |acc, c| DatapathCounter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            if total.packets > 0 {
                rows.push((code, total));
            }
        }
        rows
    }
}

/// Hubble's flow metrics, from the flow monitor's counters.
#[derive(Debug)]
struct FlowCollector(Arc<FlowMetrics>);

impl Collector for FlowCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.snapshot();
        let mut family = encoder.encode_descriptor(
            "hubble_flows_processed",
            "Flows processed, by type, subtype and verdict",
            None,
            MetricType::Counter,
        )?;
        for ((kind, subtype, verdict), n) in &counts.flows {
            let labels = vec![("type", *kind), ("subtype", *subtype), ("verdict", *verdict)];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hubble_drop",
            "Drops, by reason and protocol",
            None,
            MetricType::Counter,
        )?;
        for ((reason, protocol), n) in &counts.drops {
            let labels = vec![("reason", *reason), ("protocol", *protocol)];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hubble_lost_events",
            "Flow events lost, by source (perf_event_ring_buffer: the kernel ring buffer was full)",
            None,
            MetricType::Counter,
        )?;
        for (source, n) in &counts.lost {
            ConstCounter::new(*n).encode(family.encode_family(&vec![("source", *source)])?)?;
        }
        Ok(())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = self.maps();
        let mut family = encoder.encode_descriptor(
            "weir_map_entries",
            "Entries in each pinned eBPF map (arrays count as full)",
            None,
            MetricType::Gauge,
        )?;
        for map in &maps {
            let labels = MapLabel { map: map.name.clone() };
            ConstGauge::new(map.entries as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "weir_map_capacity",
            "Capacity (max_entries) of each pinned eBPF map",
            None,
            MetricType::Gauge,
        )?;
        for map in &maps {
            let labels = MapLabel { map: map.name.clone() };
            ConstGauge::new(map.capacity as i64).encode(family.encode_family(&labels)?)?;
        }
        let counters = self.counters();
        for (name, help, bytes) in [
            (
                "weir_datapath_packets",
                "Packets seen by the datapath, by reason (verdict=dropped for drops)",
                false,
            ),
            (
                "weir_datapath_bytes",
                "Bytes seen by the datapath, by reason (verdict=dropped for drops)",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (code, counter) in &counters {
                let labels = ReasonLabels {
                    code: code.to_string(),
                    reason: reason_name(*code).to_owned(),
                    verdict: if is_drop(*code) { "dropped" } else { "forwarded" }.to_owned(),
                };
                let value = if bytes { counter.bytes } else { counter.packets };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Counts the keys of a hash-like map with `BPF_MAP_GET_NEXT_KEY`, stopping
/// at twice its capacity (concurrent deletions make the kernel restart the
/// walk, which could otherwise go on for ever).
fn count_keys(fd: BorrowedFd<'_>, key_size: usize, capacity: u64) -> io::Result<u64> {
    #[repr(C)]
    struct GetNextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut count = 0u64;
    loop {
        let attr = GetNextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for BPF_MAP_GET_NEXT_KEY
        // whose pointers reference buffers of the map's key size that live
        // across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const GetNextKeyAttr,
                size_of::<GetNextKeyAttr>(),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOENT) => Ok(count),
                _ => Err(err),
            };
        }
        count += 1;
        if count >= capacity.saturating_mul(2).max(1) {
            return Ok(count.min(capacity));
        }
        std::mem::swap(&mut key, &mut next);
    }
}

/// Serves `/metrics` on `listener` until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    crate::health::serve_http(listener, move |path| {
        let metrics = metrics.clone();
        async move {
            match path.as_str() {
                "/metrics" => {
                    let body =
                        tokio::task::spawn_blocking(move || metrics.render()).await.unwrap_or_default();
                    crate::health::Reply { status: 200, content_type: CONTENT_TYPE, body }
                }
                _ => crate::health::Reply::not_found(),
            }
        }
    })
    .await;
}

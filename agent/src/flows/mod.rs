//! The flow monitor: what the datapath reports (new connections and drops,
//! through the EVENTS_V1 ring buffer), named with the agent's caches, kept in
//! a bounded ring (`--flow-buffer-capacity`) and served over Hubble's
//! Observer gRPC API on a TCP address and a unix socket, so that both
//! `weir observe` and the stock `hubble observe --server …` read it.
//!
//! Pieces:
//! - [`enrich`]: a datapath record → a Hubble `flow.Flow`;
//! - [`ring`]: the last N flows, numbered for readers and followers;
//! - [`filter`]: Hubble's whitelist/blacklist flow filters;
//! - [`server`]: the Observer and health services;
//! - here: the flags, the reader of the kernel ring buffer, the poller of
//!   its lost-event counter, and [`FlowMetrics`] for the Prometheus code.

mod enrich;
mod filter;
mod ring;
mod server;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};
use weir_abi::{
    events::FlowEvent,
    map_name,
    metrics::{Counter, EVENTS_LOST, reason_name},
};
use weir_proto::flow::{Flow, LostEvent, LostEventSource, Verdict, layer4};

use self::{
    enrich::{Enricher, WallClock, monotonic_ns},
    ring::{Event, Ring},
    server::ObserverService,
};
use crate::names::NamesReceiver;

/// Flags of the flow monitor (Hubble's names where Hubble has one).
#[derive(Clone, Debug, clap::Args)]
pub struct FlowArgs {
    /// Flows kept in memory for `weir observe` and the Observer API (like
    /// Hubble's --hubble-event-buffer-capacity).
    #[arg(long, default_value_t = 4095, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub flow_buffer_capacity: u64,
    /// TCP address of the Hubble-compatible Observer API; empty disables, port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:4244")]
    pub hubble_listen_address: String,
    /// Unix socket of the Observer API (default /run/weir/<name of --bpffs-root>/hubble.sock,
    /// where `weir observe` looks); empty disables.
    #[arg(long)]
    pub hubble_socket: Option<PathBuf>,
}

/// How often the datapath's lost-event counter is read (Hubble sends at most
/// one LostEvent per second and source).
const LOST_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Events processed between wake-ups of followers (and yields to the
/// runtime) while draining a large backlog.
const BATCH: usize = 512;

/// After draining the ring buffer, the reader waits this long before it
/// listens again. The kernel wakes a reader up only when the reader has
/// caught up, so without this pause a steady stream of new connections
/// means one wake-up (an irq_work in the kernel, a context switch and a
/// runtime poll here) per event; with it, at most 1/DRAIN_PAUSE wake-ups per
/// second, and the 1 MiB ring buffer (16384 events) absorbs 800k events/s
/// meanwhile. Flows show up at most this much later.
const DRAIN_PAUSE: Duration = Duration::from_millis(20);

/// Counters for Prometheus, Hubble's metrics: `hubble_flows_processed_total{type,subtype,verdict}`,
/// `hubble_drop_total{reason,protocol}`, `hubble_lost_events_total{source}`.
/// Read them with [`FlowMetrics::snapshot`].
#[derive(Debug, Default)]
pub struct FlowMetrics {
    inner: Mutex<FlowCounts>,
}

/// A copy of the counters. Label values follow Hubble's metrics: `type` is
/// `Trace` or `Drop`, `subtype` the observation point (`to-endpoint`,
/// `to-stack`; empty for drops), `verdict` `FORWARDED`/`DROPPED`; `reason`
/// the DropReason name (`POLICY_DENIED`), `protocol` `TCP`/`UDP`/`SCTP`;
/// `source` `perf_event_ring_buffer` (the kernel ring buffer was full) or
/// `hubble_ring_buffer` (a slow client was overtaken).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// (type, subtype, verdict) → flows.
    pub flows: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    /// (reason, protocol) → drops.
    pub drops: BTreeMap<(&'static str, &'static str), u64>,
    /// source → lost events.
    pub lost: BTreeMap<&'static str, u64>,
}

impl FlowMetrics {
    /// For the Prometheus endpoint (see `crate::metrics`).
    pub fn snapshot(&self) -> FlowCounts {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlowCounts> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flow(&self, flow: &Flow) {
        let event_type = flow.event_type.unwrap_or_default();
        let dropped = flow.verdict == Verdict::Dropped as i32;
        let (kind, subtype) = match event_type.r#type {
            enrich::message_type::DROP => ("Drop", ""),
            _ => (
                "Trace",
                match event_type.sub_type {
                    enrich::trace_point::TO_ENDPOINT => "to-endpoint",
                    enrich::trace_point::TO_STACK => "to-stack",
                    _ => "",
                },
            ),
        };
        let verdict = Verdict::try_from(flow.verdict).map_or("VERDICT_UNKNOWN", |v| v.as_str_name());
        let mut counts = self.lock();
        *counts.flows.entry((kind, subtype, verdict)).or_default() += 1;
        if dropped {
            let reason = weir_proto::flow::DropReason::try_from(flow.drop_reason_desc)
                .map_or_else(|_| reason_name(flow.drop_reason), |r| r.as_str_name());
            let protocol = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(layer4::Protocol::Tcp(_)) => "TCP",
                Some(layer4::Protocol::Udp(_)) => "UDP",
                Some(layer4::Protocol::Sctp(_)) => "SCTP",
                _ => "",
            };
            *counts.drops.entry((reason, protocol)).or_default() += 1;
        }
    }

    fn lost(&self, source: LostEventSource, count: u64) {
        let name = match source {
            LostEventSource::PerfEventRingBuffer => "perf_event_ring_buffer",
            LostEventSource::ObserverEventsQueue => "observer_events_queue",
            LostEventSource::HubbleRingBuffer => "hubble_ring_buffer",
            LostEventSource::UnknownLostEventSource => "unknown",
        };
        *self.lock().lost.entry(name).or_default() += count;
    }
}

/// Starts the flow monitor: the reader of `events` (absent when another
/// reader has it) and the Observer API servers. Returns the counters for
/// the metrics endpoint. Must be called within the tokio runtime.
pub fn start(
    args: &FlowArgs,
    events: Option<RingBuf<MapData>>,
    names: NamesReceiver,
    bpffs_root: &Path,
    metrics: Arc<FlowMetrics>,
) -> anyhow::Result<Arc<FlowMetrics>> {
    let clock = WallClock::now();
    let ring = Arc::new(Ring::new(args.flow_buffer_capacity as usize));

    let events = match events {
        Some(events) => {
            // SAFETY: the ring buffer owns its map's file descriptor and
            // keeps it open, unchanged, for as long as the AsyncFd owns it.
            let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(std::io::Error::from)
                .context("registering the flow-event ring buffer with the runtime")?;
            Some(events)
        }
        None => {
            warn!("no flow-event ring buffer to read: the flow monitor will stay empty");
            None
        }
    };
    let lost = lost_counter(bpffs_root)
        .inspect_err(|err| warn!(error = %format!("{err:#}"), "lost flow events will not be reported"))
        .ok();
    let reader = Reader {
        enricher: Enricher::new(clock, bpffs_root),
        clock,
        names: names.clone(),
        ring: ring.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(reader.run(events, lost));

    let tcp = std::net::TcpListener::bind_or_none(&args.hubble_listen_address)?;
    let socket = match &args.hubble_socket {
        Some(path) if path.as_os_str().is_empty() => None,
        Some(path) => Some(path.clone()),
        None => Some(weir_proto::default_socket_path(bpffs_root)),
    };
    let address = match &tcp {
        Some(listener) => listener.local_addr()?.to_string(),
        None => socket.as_ref().map(|p| format!("unix://{}", p.display())).unwrap_or_default(),
    };
    let service =
        ObserverService { ring, names, metrics: metrics.clone(), clock, started: Instant::now(), address };
    if let Some(listener) = tcp {
        server::serve_tcp(tokio::net::TcpListener::from_std(listener)?, &service);
    }
    if let Some(path) = socket {
        let listener = server::bind_unix(&path)?;
        server::serve_unix(listener, path, &service);
    }
    Ok(metrics)
}

/// Binding without awaiting, so that [`start`] stays synchronous.
trait BindOrNone: Sized {
    fn bind_or_none(address: &str) -> anyhow::Result<Option<Self>>;
}

impl BindOrNone for std::net::TcpListener {
    fn bind_or_none(address: &str) -> anyhow::Result<Option<Self>> {
        if address.is_empty() {
            return Ok(None);
        }
        let listener = std::net::TcpListener::bind(address)
            .with_context(|| format!("binding the Observer API (--hubble-listen-address) to {address}"))?;
        listener.set_nonblocking(true)?;
        Ok(Some(listener))
    }
}

/// The one task that writes the ring: flows from the kernel ring buffer and
/// reports of what it lost.
struct Reader {
    enricher: Enricher,
    clock: WallClock,
    names: NamesReceiver,
    ring: Arc<Ring>,
    metrics: Arc<FlowMetrics>,
}

/// Waits until the ring buffer (if any) has data.
async fn readable(
    events: &mut Option<AsyncFd<RingBuf<MapData>>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match events {
        Some(events) => events.readable_mut().await,
        None => std::future::pending().await,
    }
}

impl Reader {
    /// Drains the ring buffer whenever it has data, and reads the lost-event
    /// counter every second. One task, and draining before each report: a
    /// LostEvent comes after the flows that survived the same burst, so a
    /// small flow ring does not evict the report of the loss.
    async fn run(
        mut self,
        mut events: Option<AsyncFd<RingBuf<MapData>>>,
        lost: Option<PerCpuArray<MapData, Counter>>,
    ) {
        if events.is_none() && lost.is_none() {
            return;
        }
        info!("reading flow events");
        let read_lost = |counter: &PerCpuArray<MapData, Counter>| -> Vec<u64> {
            counter.get(&EVENTS_LOST, 0).map(|v| v.iter().map(|c| c.packets).collect()).unwrap_or_default()
        };
        // Losses from before this start (an earlier run) are not reported again.
        let mut last_lost = lost.as_ref().map(read_lost).unwrap_or_default();
        let mut tick = tokio::time::interval(LOST_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                guard = readable(&mut events) => match guard {
                    Ok(mut guard) => {
                        self.drain(guard.get_inner_mut()).await;
                        guard.clear_ready();
                        tokio::time::sleep(DRAIN_PAUSE).await;
                    }
                    Err(err) => {
                        warn!(error = %err, "cannot poll the flow-event ring buffer; no more flow events");
                        events = None;
                    }
                },
                _ = tick.tick(), if lost.is_some() => {
                    // Whatever the ring buffer holds goes first, so that the
                    // report follows the flows of the same burst (the timer
                    // may wake this task before the ring buffer's readiness
                    // is seen, e.g. after a stop).
                    if let Some(events) = events.as_mut() {
                        self.drain(events.get_mut()).await;
                    }
                    if let Some(counter) = &lost {
                        let now = read_lost(counter);
                        self.report_lost(&last_lost, &now);
                        if !now.is_empty() {
                            last_lost = now;
                        }
                    }
                }
            }
        }
    }

    /// Turns every record in the ring buffer into a flow in the ring.
    async fn drain(&mut self, events: &mut RingBuf<MapData>) {
        let names = self.names.borrow().clone();
        let mut batch = 0;
        loop {
            let record = {
                let Some(item) = events.next() else { break };
                if item.len() < size_of::<FlowEvent>() {
                    continue;
                }
                // SAFETY: the record holds at least a FlowEvent, written by the
                // datapath; FlowEvent is plain integers, valid for any bits.
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) }
            };
            let flow = self.enricher.flow(&record, &names);
            self.metrics.flow(&flow);
            let time_ns = flow.time.as_ref().map_or(0, enrich::timestamp_ns);
            self.ring.push(time_ns, Event::Flow(Box::new(flow)));
            batch += 1;
            if batch == BATCH {
                // Let followers and the rest of the agent run meanwhile.
                batch = 0;
                self.ring.publish();
                tokio::task::yield_now().await;
            }
        }
        self.ring.publish();
    }

    /// PERF_EVENT_RING_BUFFER LostEvents for the increase of the datapath's
    /// per-CPU lost-event counter, one per CPU that lost some.
    fn report_lost(&self, before: &[u64], now: &[u64]) {
        let now_ns = self.clock.wall_ns(monotonic_ns());
        let mut reported = false;
        for (cpu, value) in now.iter().enumerate() {
            let lost = value.saturating_sub(before.get(cpu).copied().unwrap_or(0));
            if lost == 0 {
                continue;
            }
            warn!(cpu, lost, "flow events lost: the datapath's ring buffer was full");
            self.metrics.lost(LostEventSource::PerfEventRingBuffer, lost);
            self.ring.push(
                now_ns,
                Event::Lost(LostEvent {
                    source: LostEventSource::PerfEventRingBuffer as i32,
                    num_events_lost: lost,
                    cpu: Some(cpu as i32),
                    ..LostEvent::default()
                }),
            );
            reported = true;
        }
        if reported {
            self.ring.publish();
        }
    }
}

fn lost_counter(bpffs_root: &Path) -> anyhow::Result<PerCpuArray<MapData, Counter>> {
    let path = bpffs_root.join(map_name::METRICS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    PerCpuArray::try_from(Map::PerCpuArray(data))
        .with_context(|| format!("{} is no per-CPU array", path.display()))
}

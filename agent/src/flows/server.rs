//! Hubble's Observer gRPC service over the flow ring, and the gRPC health
//! service `hubble status` checks, on a TCP address and a unix socket.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weir_proto::{
    OBSERVER_HEALTH_SERVICE,
    flow::{LostEvent, LostEventSource},
    health::{
        HealthCheckRequest, HealthCheckResponse,
        health_check_response::ServingStatus,
        health_server::{Health, HealthServer},
    },
    observer::{
        GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
        GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse, GetNodesRequest,
        GetNodesResponse, Namespace, Node, ServerStatusRequest, ServerStatusResponse, Tls,
        get_flows_response::ResponseTypes,
        observer_server::{Observer, ObserverServer},
    },
    relay::NodeState,
};

use super::{
    FlowMetrics,
    enrich::{WallClock, monotonic_ns, timestamp, timestamp_ns},
    filter::Filters,
    ring::{Entry, Event, Ring},
};
use crate::names::NamesReceiver;

/// Responses buffered per GetFlows stream before the handler waits for the
/// client (and, if the client is too slow, the ring overtakes it: a
/// HUBBLE_RING_BUFFER LostEvent).
const STREAM_BUFFER: usize = 256;

/// The Observer service: everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct ObserverService {
    pub ring: Arc<Ring>,
    pub names: NamesReceiver,
    pub metrics: Arc<FlowMetrics>,
    pub clock: WallClock,
    pub started: Instant,
    /// Where the service listens, for GetNodes.
    pub address: String,
}

impl ObserverService {
    fn node_name(&self) -> String {
        self.names.borrow().node_name.clone()
    }

    fn now_ns(&self) -> i128 {
        self.clock.wall_ns(monotonic_ns())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = ReceiverStream<Result<GetFlowsResponse, Status>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let request = request.into_inner();
        let filters =
            Filters::compile(&request.whitelist, &request.blacklist).map_err(Status::invalid_argument)?;
        if request.first && request.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        tokio::spawn(async move { service.stream_flows(request, filters, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;

    async fn get_agent_events(
        &self,
        _: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("Weir reports no agent events"))
    }

    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("Weir reports no debug events"))
    }

    async fn get_nodes(&self, _: Request<GetNodesRequest>) -> Result<Response<GetNodesResponse>, Status> {
        let stats = self.ring.stats();
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.node_name(),
                version: version(),
                address: self.address.clone(),
                state: NodeState::NodeConnected as i32,
                tls: Some(Tls { enabled: false, server_name: String::new() }),
                uptime_ns: self.started.elapsed().as_nanos() as u64,
                num_flows: stats.num_flows,
                max_flows: stats.max_flows,
                seen_flows: stats.seen_flows,
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        // Namespaces of flows of the last hour, as Hubble.
        let since = self.now_ns() - 3600 * 1_000_000_000;
        let mut seen = std::collections::BTreeSet::new();
        self.ring.scan_back(|entry| {
            if entry.time_ns < since {
                return false;
            }
            if let Event::Flow(flow) = &entry.event {
                for ep in [&flow.source, &flow.destination].into_iter().flatten() {
                    if !ep.namespace.is_empty() {
                        seen.insert(ep.namespace.clone());
                    }
                }
            }
            true
        });
        let namespaces =
            seen.into_iter().map(|namespace| Namespace { cluster: String::new(), namespace }).collect();
        Ok(Response::new(GetNamespacesResponse { namespaces }))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let stats = self.ring.stats();
        // Flows per second over the last minute.
        let since = self.now_ns() - 60 * 1_000_000_000;
        let mut recent = 0u64;
        self.ring.scan_back(|entry| {
            if entry.time_ns < since {
                return false;
            }
            recent += u64::from(matches!(entry.event, Event::Flow(_)));
            true
        });
        Ok(Response::new(ServerStatusResponse {
            num_flows: stats.num_flows,
            max_flows: stats.max_flows,
            seen_flows: stats.seen_flows,
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            num_connected_nodes: Some(1),
            num_unavailable_nodes: Some(0),
            unavailable_nodes: Vec::new(),
            version: version(),
            flows_rate: recent as f64 / 60.0,
        }))
    }
}

fn version() -> String {
    format!("weir-agent {}", env!("CARGO_PKG_VERSION"))
}

impl ObserverService {
    /// Sends the requested part of the ring, then (with `follow`) what the
    /// reader adds, until the client goes away.
    async fn stream_flows(
        self,
        request: GetFlowsRequest,
        filters: Filters,
        tx: mpsc::Sender<Result<GetFlowsResponse, Status>>,
    ) {
        // Subscribe before taking the snapshot: nothing falls in between.
        let mut written = self.ring.subscribe();
        let since = request.since.as_ref().map(timestamp_ns);
        let until = request.until.as_ref().map(timestamp_ns);
        let in_window =
            |e: &Entry| since.is_none_or(|s| e.time_ns >= s) && until.is_none_or(|u| e.time_ns <= u);
        let selected = |e: &Entry| matches!(&e.event, Event::Flow(flow) if filters.matches(flow));

        let (oldest, end) = self.ring.bounds();
        let number = request.number;
        let start = if number > 0 && !request.first {
            // The last `number` matching flows: walk back to the oldest of them.
            let (mut found, mut start) = (0, end);
            self.ring.scan_back(|e| {
                if e.seq >= end {
                    return true;
                }
                if found == number {
                    return false;
                }
                if in_window(e) && selected(e) {
                    found += 1;
                    start = e.seq;
                }
                true
            });
            start
        } else if number == 0 && request.follow && since.is_none() {
            // Only what happens from now on.
            end
        } else {
            oldest
        };

        let mut sent = 0u64;
        let (entries, _) = self.ring.range(start, end);
        for entry in &entries {
            if until.is_some_and(|u| entry.time_ns > u) {
                return;
            }
            if !in_window(entry) {
                continue;
            }
            match self.response(entry, &filters) {
                Some(response) => {
                    let is_flow = matches!(entry.event, Event::Flow(_));
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    sent += u64::from(is_flow);
                    if request.first && number > 0 && sent >= number {
                        return;
                    }
                }
                None => continue,
            }
        }
        if !request.follow {
            return;
        }

        let mut next = end;
        loop {
            let (entries, lost) = self.ring.range(next, u64::MAX);
            if lost > 0 {
                // The writer overtook this reader (a slow client).
                self.metrics.lost(LostEventSource::HubbleRingBuffer, lost);
                let response = self.lost_response(LostEvent {
                    source: LostEventSource::HubbleRingBuffer as i32,
                    num_events_lost: lost,
                    cpu: None,
                    ..LostEvent::default()
                });
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                next += lost;
            }
            for entry in &entries {
                next = entry.seq + 1;
                if until.is_some_and(|u| entry.time_ns > u) {
                    return;
                }
                if let Some(response) = self.response(entry, &filters)
                    && tx.send(Ok(response)).await.is_err()
                {
                    return;
                }
            }
            tokio::select! {
                changed = written.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    }

    /// The response for an entry: a matching flow, or a lost-events report
    /// (sent whatever the filters, as Hubble does).
    fn response(&self, entry: &Entry, filters: &Filters) -> Option<GetFlowsResponse> {
        match &entry.event {
            Event::Flow(flow) if filters.matches(flow) => Some(GetFlowsResponse {
                node_name: flow.node_name.clone(),
                time: flow.time,
                response_types: Some(ResponseTypes::Flow(flow.as_ref().clone())),
            }),
            Event::Flow(_) => None,
            Event::Lost(lost) => Some(GetFlowsResponse {
                node_name: self.node_name(),
                time: Some(timestamp(entry.time_ns)),
                response_types: Some(ResponseTypes::LostEvents(*lost)),
            }),
        }
    }

    fn lost_response(&self, lost: LostEvent) -> GetFlowsResponse {
        GetFlowsResponse {
            node_name: self.node_name(),
            time: Some(timestamp(self.now_ns())),
            response_types: Some(ResponseTypes::LostEvents(lost)),
        }
    }
}

/// grpc.health.v1: the Observer (and the server as a whole) is serving
/// whenever it answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct HealthService;

fn serving(service: &str) -> ServingStatus {
    if service.is_empty() || service == OBSERVER_HEALTH_SERVICE || service == "observer.Observer" {
        ServingStatus::Serving
    } else {
        ServingStatus::ServiceUnknown
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match serving(&service) {
            ServingStatus::ServiceUnknown => Err(Status::not_found(format!("unknown service {service:?}"))),
            status => Ok(Response::new(HealthCheckResponse { status: status as i32 })),
        }
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let status = serving(&request.into_inner().service);
        let first = futures::stream::once(async move { Ok(HealthCheckResponse { status: status as i32 }) });
        // The status never changes while the server runs.
        Ok(Response::new(first.chain(futures::stream::pending()).boxed()))
    }
}

fn router(service: &ObserverService) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(ObserverServer::new(service.clone()))
        .add_service(HealthServer::new(HealthService))
}

/// Binds the unix socket, replacing a stale one left by an earlier run.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale socket {}", path.display())),
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the Observer API (--hubble-socket) to {}", path.display()))
}

pub fn serve_tcp(listener: tokio::net::TcpListener, service: &ObserverService) {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(%address, "serving the Hubble Observer API");
    let router = router(service);
    tokio::spawn(async move {
        if let Err(err) = router.serve_with_incoming(TcpListenerStream::new(listener)).await {
            warn!(%address, error = %err, "the Observer API server stopped");
        }
    });
}

pub fn serve_unix(listener: tokio::net::UnixListener, path: PathBuf, service: &ObserverService) {
    info!(socket = %path.display(), "serving the Hubble Observer API");
    let router = router(service);
    tokio::spawn(async move {
        if let Err(err) = router.serve_with_incoming(UnixListenerStream::new(listener)).await {
            warn!(socket = %path.display(), error = %err, "the Observer API server stopped");
        }
    });
}

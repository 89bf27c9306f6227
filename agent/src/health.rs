//! `/healthz` and `/livez` on `--healthz-bind-address` (default
//! 0.0.0.0:10256), answering as kube-proxy does (`pkg/proxy/healthcheck/
//! proxy_health.go`), so cloud load balancers and probes written for
//! kube-proxy work unchanged:
//!
//! - 200 or 503 with `{"lastUpdated": "...","currentTime": "...", "nodeEligible": true}`
//!   (`/livez` leaves out `nodeEligible`);
//! - both are unhealthy when a queued change has waited longer than the
//!   health timeout (the reconcile loop is stuck);
//! - `/healthz` (readiness, and what load balancers probe) is also unhealthy
//!   until the first complete programming of the maps, and while the Node is
//!   being deleted or carries the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint, so that load balancers drain it
//!   first. `/livez` is not: an agent waiting for an unreachable API server
//!   keeps serving the pinned state, and a restart would not help it.
//!
//! Also the small HTTP/1 server that `/metrics` shares.

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{Method, Request, Response, body::Bytes, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::jiff::Timestamp;
use tracing::{debug, warn};

use crate::metrics::{CodeLabel, Metrics};

/// kube-proxy's default: two sync periods of 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct State {
    /// The end of the last complete reconciliation.
    last_updated: Option<SystemTime>,
    /// The oldest change received and not yet programmed.
    oldest_pending: Option<SystemTime>,
    /// False while the Node is being deleted or drained by the autoscaler.
    node_ineligible: bool,
}

/// What the health endpoints report; updated by the reconcile loop and the
/// source.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self { state: Mutex::default(), timeout, metrics }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived; it is pending until the next [`Health::updated`].
    pub fn queued(&self) {
        let mut state = self.state();
        if state.oldest_pending.is_none() {
            state.oldest_pending = Some(SystemTime::now());
        }
        self.metrics.queued();
    }

    /// The maps were programmed from a complete view of the cluster.
    pub fn updated(&self) {
        let mut state = self.state();
        state.last_updated = Some(SystemTime::now());
        state.oldest_pending = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_ineligible = !eligible;
    }

    /// kube-proxy's `IsHealthy()`, which the healthCheckNodePort answers
    /// report as `serviceProxyHealthy`: no change has waited longer than the
    /// health timeout.
    pub fn proxy_healthy(&self) -> bool {
        !self.check(SystemTime::now()).stuck
    }

    /// The state behind the answers at `now`.
    fn check(&self, now: SystemTime) -> Check {
        let state = self.state();
        Check {
            last_updated: state.last_updated,
            stuck: state
                .oldest_pending
                .is_some_and(|queued| now.duration_since(queued).is_ok_and(|waited| waited > self.timeout)),
            node_eligible: !state.node_ineligible,
        }
    }

    /// The `/healthz` (`readiness`) or `/livez` answer. `/healthz` is also
    /// unhealthy before the first sync and on an ineligible node; `/livez`
    /// only when changes wait too long: an agent that cannot reach the API
    /// server at start is not helped by a restart (and keeps serving the
    /// pinned state meanwhile).
    fn reply(&self, readiness: bool) -> Reply {
        let now = SystemTime::now();
        let check = self.check(now);
        let node_eligible = check.node_eligible;
        let mut last_updated = check.last_updated;
        let healthy = !check.stuck && (!readiness || (last_updated.is_some() && node_eligible));
        if healthy {
            // As kube-proxy: a healthy server reports lastUpdated = now, as
            // older releases did when they synced periodically.
            last_updated = Some(now);
        }
        let status = if healthy { 200 } else { 503 };
        let counter = if readiness { &self.metrics.healthz_total } else { &self.metrics.livez_total };
        counter.get_or_create(&CodeLabel { code: status.to_string() }).inc();
        let body = if readiness {
            format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {node_eligible}}}"#,
                go_time(last_updated),
                go_time(Some(now)),
            )
        } else {
            format!(
                r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
                go_time(last_updated),
                go_time(Some(now)),
            )
        };
        Reply { status, content_type: "application/json", body }
    }
}

/// The state behind a health answer.
struct Check {
    last_updated: Option<SystemTime>,
    /// A change has waited longer than the health timeout.
    stuck: bool,
    node_eligible: bool,
}

/// A time as Go's `time.Time.String()` prints it in UTC, which is what
/// kube-proxy's `%q` produces: `2006-01-02 15:04:05.999999999 +0000 UTC`
/// (`0001-01-01 00:00:00 +0000 UTC` for "never").
fn go_time(time: Option<SystemTime>) -> String {
    match time.and_then(|t| Timestamp::try_from(t).ok()) {
        Some(ts) => ts.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => "0001-01-01 00:00:00 +0000 UTC".to_owned(),
    }
}

/// Serves `/healthz` and `/livez` on `listener` until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    serve_http(listener, move |path| {
        let health = health.clone();
        async move {
            match path.as_str() {
                "/healthz" => health.reply(true),
                "/livez" => health.reply(false),
                _ => Reply::not_found(),
            }
        }
    })
    .await;
}

/// An answer of the tiny HTTP server.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn not_found() -> Self {
        Self {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "404 page not found\n".to_owned(),
        }
    }
}

/// Starts `/healthz`+`/livez` on `healthz_address` and `/metrics` on
/// `metrics_address` on a thread of their own, so that they answer (503)
/// while the main loop is busy, e.g. while the kernel verifies the programs
/// at startup. Call it after entering the node's network namespace: the
/// thread inherits it.
pub fn start_servers(
    healthz_address: String,
    metrics_address: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("weir-http".to_owned()).spawn(move || {
        runtime.block_on(async move {
            spawn_server("health", healthz_address, move |listener| serve(listener, health));
            spawn_server("metrics", metrics_address, move |listener| {
                crate::metrics::serve(listener, metrics)
            });
            std::future::pending::<()>().await;
        });
    })?;
    Ok(())
}

/// Runs one of the agent's HTTP endpoints on `address`: an empty address
/// disables it, port 0 picks a free port (logged). A failure to bind is
/// logged and retried every 5 s, as kube-proxy does: the datapath matters
/// more than its probes.
fn spawn_server<F, Fut>(what: &'static str, address: String, serve: F)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if address.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            match tokio::net::TcpListener::bind(&address).await {
                Ok(listener) => {
                    match listener.local_addr() {
                        Ok(local) => tracing::info!(address = %local, "serving {what}"),
                        Err(_) => tracing::info!(%address, "serving {what}"),
                    }
                    return serve(listener).await;
                }
                Err(err) => {
                    warn!(%address, error = %err, "cannot serve {what}; retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    });
}

/// A minimal HTTP/1.1 server: GET (and HEAD) of a path, answered by
/// `handler`. Each connection runs on its own task.
pub async fn serve_http<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move {
                    let reply = match *request.method() {
                        Method::GET | Method::HEAD => handler(request.uri().path().to_owned()).await,
                        _ => Reply {
                            status: 405,
                            content_type: "text/plain; charset=utf-8",
                            body: "method not allowed\n".to_owned(),
                        },
                    };
                    let response = Response::builder()
                        .status(reply.status)
                        .header(header::CONTENT_TYPE, reply.content_type)
                        .header("X-Content-Type-Options", "nosniff")
                        .body(Full::new(Bytes::from(reply.body)))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                debug!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_like_go() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(go_time(Some(t)), "2023-11-14 22:13:20.123456789 +0000 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(go_time(Some(t)), "2023-11-14 22:13:20 +0000 UTC");
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn unhealthy_until_updated_and_when_stuck() {
        let metrics = Arc::new(Metrics::new(std::path::Path::new("/nonexistent"), Default::default()));
        let health = Health::new(Duration::from_secs(60), metrics);
        assert_eq!(health.reply(true).status, 503, "not ready before the first sync");
        assert_eq!(health.reply(false).status, 200, "but alive");
        assert!(health.proxy_healthy(), "the health checks' view: nothing is stuck yet");
        health.queued();
        health.updated();
        let reply = health.reply(true);
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains(r#""nodeEligible": true"#), "{}", reply.body);
        health.set_node_eligible(false);
        assert_eq!(health.reply(true).status, 503);
        assert_eq!(health.reply(false).status, 200, "livez ignores eligibility");
        assert!(health.proxy_healthy(), "so do the health checks, as kube-proxy's");
        health.queued();
        let later = SystemTime::now() + Duration::from_secs(61);
        assert!(health.check(later).stuck, "a change pending too long is unhealthy");
        // Which the health checks report as serviceProxyHealthy: false.
        health.state().oldest_pending = Some(SystemTime::now() - Duration::from_secs(61));
        assert!(!health.proxy_healthy());
    }
}

//! The HTTP API (axum): checkpoint, proofs, consistency, health, metrics,
//! served by our own accept loop ([`serve`]) so that no client can hold
//! the listener: at most `max_connections` connections at once (more are
//! closed at once and counted), a header-read timeout that also closes
//! connections idle between requests, and accept errors (out of file
//! descriptors) backed off and logged at a bounded rate.

use crate::health::Part;
use crate::metrics::Metrics;
use crate::mqtt_api::parse_digest;
use crate::proofs::{ProofAnswer, ProofError, ProofService};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Limits of the HTTP listener (`[http]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    /// A connection must send a request's headers within this time, from
    /// when it opens or its last response was sent; else it is closed.
    pub header_read_timeout: Duration,
}

/// Longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this interval for repeated accept errors.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a shutdown waits for requests in progress.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop` is cancelled, then lets
/// requests in progress finish (for up to 5 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let max = limits.max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut backoff = Duration::ZERO;
    let mut failed_accepts = 0u64;
    let mut last_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if failed_accepts > 0 {
                    tracing::info!(failed_accepts, "HTTP accepts work again");
                    metrics.health.recovered(Part::HttpListener);
                    failed_accepts = 0;
                }
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                // Out of file descriptors and the like: back off, never
                // spin, and log a summary at most every ACCEPT_LOG_EVERY.
                failed_accepts += 1;
                Metrics::inc(&metrics.accept_errors_total);
                metrics.health.failing(Part::HttpListener, format!("cannot accept HTTP connections: {e}"));
                if last_log.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                    tracing::error!(error = %e, failed_accepts, "HTTP accept failed; backing off");
                    last_log = Some(Instant::now());
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            Metrics::inc(&metrics.http_connections_refused_total);
            tracing::debug!("HTTP connection refused: max_connections are open");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    // Wait for the requests in progress: every permit back.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, slots.acquire_many(all)).await;
}

#[derive(Clone)]
pub struct Api {
    pub proofs: Arc<ProofService>,
    pub metrics: Arc<Metrics>,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/checkpoint", get(checkpoint))
        .route("/v1/proofs/{digest}", get(proofs))
        .route("/v1/consistency", get(consistency))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(api)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({"status": "error", "error": {"code": code, "message": message.into()}})))
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "HTTP request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
}

/// A failed proof lookup: 500 with `store_damaged` when the stored data
/// does not check out, so an operator can tell damage from a passing fault.
fn failed(e: ProofError) -> Response {
    tracing::error!(error = %e, "HTTP request failed");
    let message = match e.code() {
        "store_damaged" => "the stored data for this answer is damaged; see the broker's log",
        _ => "internal error",
    };
    error(StatusCode::INTERNAL_SERVER_ERROR, e.code(), message)
}

/// Runs blocking store work off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

async fn checkpoint(State(api): State<Api>) -> Response {
    match blocking(move || api.proofs.latest_checkpoint()).await {
        Ok(Ok(Some((_, note)))) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], note).into_response()
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "not_found", "no checkpoint yet"),
        Ok(Err(e)) => internal(e),
        Err(r) => r,
    }
}

async fn proofs(State(api): State<Api>, Path(digest): Path<String>) -> Response {
    Metrics::inc(&api.metrics.proof_requests_http_total);
    let Some(digest) = parse_digest(&digest) else {
        Metrics::inc(&api.metrics.proof_request_errors_total);
        return error(StatusCode::BAD_REQUEST, "bad_request", "digest must be 64 hex digits (BLAKE3-256)");
    };
    match blocking(move || api.proofs.lookup(&digest)).await {
        Ok(Ok(ProofAnswer::Ready(bundles))) => Json(bundles).into_response(),
        Ok(Ok(ProofAnswer::Pending)) => {
            (StatusCode::ACCEPTED, Json(json!({"status": "pending"}))).into_response()
        }
        Ok(Ok(ProofAnswer::Rejected(r))) => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"status": "rejected", "rejections": r})))
                .into_response()
        }
        Ok(Ok(ProofAnswer::Unknown)) => {
            error(StatusCode::NOT_FOUND, "not_found", "no message with this digest was notarized")
        }
        Ok(Ok(ProofAnswer::Pruned { batch })) => {
            (StatusCode::GONE, Json(json!({"status": "pruned", "batch": batch}))).into_response()
        }
        Ok(Err(e)) => failed(e),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct Range {
    from: u64,
    to: u64,
}

async fn consistency(
    State(api): State<Api>,
    range: Result<Query<Range>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(Range { from, to })) = range else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "need ?from=N&to=M with decimal sizes");
    };
    match blocking(move || api.proofs.consistency(from, to)).await {
        Ok(Ok(c)) => Json(c).into_response(),
        Ok(Err(ProofError::BadRange(m))) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        Ok(Err(e)) => failed(e),
        Err(r) => r,
    }
}

/// 200 `ok`, or 503 `unhealthy` with each problem (crate::health).
async fn healthz(State(api): State<Api>) -> Response {
    let proofs = api.proofs.clone();
    let queue_depth = api.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed);
    let problems = api.metrics.health.problems(queue_depth);
    let (status, word) = if problems.is_empty() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    let problems: serde_json::Map<String, serde_json::Value> =
        problems.into_iter().map(|(p, why)| (p.as_str().to_owned(), why.into())).collect();
    match blocking(move || proofs.latest_checkpoint()).await {
        Ok(Ok(latest)) => (status, Json(json!({
            "status": word,
            "problems": problems,
            "log_size": latest.map_or(0, |(size, _)| size),
            "queue_depth": api.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed).max(0),
            "gap_messages": api.metrics.gap_messages_total.load(std::sync::atomic::Ordering::Relaxed),
            "source_outages": api.metrics.source_outages_total.load(std::sync::atomic::Ordering::Relaxed),
            "source_outage_ms": api.metrics.source_disconnected_ms_total.load(std::sync::atomic::Ordering::Relaxed),
        })))
        .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "health check cannot read the store");
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unreadable", format!("cannot read the store: {e}"))
        }
        Err(r) => r,
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], api.metrics.render()).into_response()
}

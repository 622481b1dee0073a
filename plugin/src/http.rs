//! The HTTP API (axum): checkpoint, proofs, consistency, health, metrics.

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
        Ok(Err(e)) => internal(e),
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
        Ok(Err(e)) => internal(e),
        Err(r) => r,
    }
}

async fn healthz(State(api): State<Api>) -> Response {
    let proofs = api.proofs.clone();
    match blocking(move || proofs.latest_checkpoint()).await {
        Ok(Ok(latest)) => Json(json!({
            "status": "ok",
            "log_size": latest.map_or(0, |(size, _)| size),
            "queue_depth": api.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed).max(0),
            "gap_messages": api.metrics.gap_messages_total.load(std::sync::atomic::Ordering::Relaxed),
            "source_outages": api.metrics.source_outages_total.load(std::sync::atomic::Ordering::Relaxed),
            "source_outage_ms": api.metrics.source_disconnected_ms_total.load(std::sync::atomic::Ordering::Relaxed),
        }))
        .into_response(),
        Ok(Err(e)) => internal(e),
        Err(r) => r,
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], api.metrics.render()).into_response()
}

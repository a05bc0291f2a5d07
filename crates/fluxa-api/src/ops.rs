//! Operations endpoints: `/healthz` (liveness), `/readyz` (store, queue and blob store reachable)
//! and `/metrics` (Prometheus text). Open to all, like a load balancer expects.

use crate::dto::{Health, Ready, ReadyChecks};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::error::{ApiError, ApiErrorCode};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
}

/// Liveness: the process is serving.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "Alive.", body = crate::dto::Health)),
)]
async fn healthz() -> Response {
    Json(Health { status: "ok" }).into_response()
}

/// Readiness: the store, the queue and the blob store are reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready.", body = crate::dto::Ready),
        (status = 503, description = "Not ready: the message names what is unreachable; or \
            the server is at a load limit.", body = crate::error::ErrorBody),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Response {
    // Only the parts this host has: a host without a queue is not unready for lacking one.
    use futures::future::OptionFuture;
    let (store, queue, blobs) = tokio::join!(
        OptionFuture::from(state.reader.as_ref().map(|reader| reader.ping())),
        OptionFuture::from(state.queue.as_ref().map(|queue| queue.ping())),
        OptionFuture::from(state.blobs.as_ref().map(|blobs| blobs.check())),
    );
    let (store, queue, blobs) = (
        store.map(|r| r.is_ok()),
        queue.map(|r| r.is_ok()),
        blobs.map(|r| r.is_ok()),
    );
    let parts = [("store", store), ("queue", queue), ("blob store", blobs)];
    let down: Vec<&str> = parts
        .iter()
        .filter_map(|(name, ok)| (*ok == Some(false)).then_some(*name))
        .collect();
    if down.is_empty() {
        let ok = |part: Option<bool>| part.map(|_| "ok");
        let checks = ReadyChecks {
            store: ok(store),
            queue: ok(queue),
            blob_store: ok(blobs),
        };
        Json(Ready {
            status: "ready",
            checks,
        })
        .into_response()
    } else {
        // The contract's error body (with Retry-After), naming what is down.
        ApiError::new(
            ApiErrorCode::Unavailable,
            format!("not ready: unreachable: {}", down.join(", ")),
        )
        .into_response()
    }
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses(
        (status = 200, description = "The Prometheus text exposition format (version 0.0.4).",
            content_type = "text/plain", body = String),
    ),
)]
async fn metrics_text(State(state): State<AppState>) -> Response {
    // Depths are read at scrape time so they are never stale; the backends keep them in
    // counters, so a scrape costs the same however deep the queue is.
    let depth = match &state.dead_letters {
        Some(dead_letters) => Some(dead_letters.depth().await),
        None => None,
    };
    match depth {
        None => {}
        Some(Ok(depth)) => {
            metrics::gauge!("fluxa_queue_depth").set(depth.pending as f64);
            metrics::gauge!("fluxa_queue_in_flight").set(depth.in_flight as f64);
            metrics::gauge!("fluxa_dlq_depth").set(depth.dead_letters as f64);
            let oldest_age = depth.oldest_enqueued_at.map_or(0.0, |at| {
                (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            metrics::gauge!("fluxa_queue_oldest_message_age_seconds").set(oldest_age);
            // Labels from the fixed set of codes only (contract section 7), each set every
            // scrape so a code whose dead letters are gone reads 0, not its last value.
            for code in fluxa_core::ErrorCode::ALL {
                let count = depth
                    .dead_letters_by_code
                    .iter()
                    .find(|(name, _)| name == code.as_str())
                    .map_or(0, |(_, count)| *count);
                metrics::gauge!("fluxa_dlq_depth_by_code", "error_code" => code.as_str())
                    .set(count as f64);
            }
        }
        Some(Err(e)) => {
            tracing::warn!(error.message = %e, "could not read queue depth for metrics")
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

//! `POST /v1/events` and `POST /v1/events/batch`: validate, hash, route inline or to the blob
//! store, enqueue durably, then answer (contract sections 1 and 1b).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use fluxa_core::ingest::{parse_batch, parse_event, ValidatedEvent};
use fluxa_core::CorrelationId;
use fluxa_operations::{AcceptError, Accepted};

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use crate::dto::{
    ApiCodeMessage, BatchItemAccepted, BatchItemOut, BatchItemRejected, BatchOut, IngestAccepted,
};
use crate::error::ApiError;
use crate::{context, AppState};

/// Room for the envelope around a payload of the maximum size (ids, type, hash, whitespace).
pub(crate) const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/events", post(ingest_one))
        .route("/v1/events/batch", post(ingest_batch))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |s, r, n| auth::require(Scope::Ingest, s, r, n),
        ))
}

/// The answer for an event the queue did not take, or for a request none of whose events it
/// took: an outage is a 503 to retry; a refusal (which validated input cannot cause) is our
/// bug, a 500 that retrying would not cure.
fn queue_error(error: &fluxa_queue::Error) -> ApiError {
    ApiError::from_queue(error)
}

fn accept_error(error: &AcceptError) -> ApiError {
    match error {
        AcceptError::BlobStore(e) => {
            tracing::warn!(error.cause_chain = ?e, error.message = %e, "blob write failed");
            ApiError::unavailable("blob store")
        }
        AcceptError::Queue(e) => queue_error(e),
    }
}

/// Accepts `events`, parsed from `body`, with the state's queue and blob store.
async fn accept_all(
    state: &AppState,
    body: &Bytes,
    events: &[ValidatedEvent<'_>],
    correlation_id: &CorrelationId,
) -> Result<fluxa_operations::Acceptance, ApiError> {
    let producer = state.queue()?;
    let blobs = state.blobs()?;
    fluxa_operations::accept(producer, blobs, body, events, correlation_id)
        .await
        .map_err(|e| accept_error(&e))
}

fn current_correlation_id() -> CorrelationId {
    context::correlation_id().unwrap_or_else(CorrelationId::generate)
}

fn count_rejection(error: &ApiError) {
    metrics::counter!("fluxa_ingest_rejected_total", "code" => error.code.as_str()).increment(1);
}

/// Ingest one event.
///
/// Answers 202 only once the event's message is durably in the queue (and, for a payload over
/// 256 KiB, the payload durably in the blob store). Sending the same event again is accepted
/// again: the processor deduplicates.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "ingest",
    operation_id = "ingest_event",
    request_body(content = crate::dto::EventIn, content_type = "application/json"),
    responses(
        (status = 202, description = "Durably queued.", body = crate::dto::IngestAccepted),
        (status = 400, description = "`invalid_json`: the body is not JSON; \
            `validation_error`: not an object, or a member missing, unknown, of the wrong type \
            or invalid (the message names it), the payload nested too deep, or an invalid \
            X-Correlation-ID; `hash_mismatch`: `payload_sha256` is not the payload's hash.",
            body = crate::error::ErrorBody),
        (status = 413, description = "The payload is over `max_payload_bytes` (default \
            10 MiB).", body = crate::error::ErrorBody),
        (status = 503, description = "The queue or the blob store is unavailable (nothing \
            half-done is left visible), or the server is at a load limit.",
            body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["ingest"])),
)]
async fn ingest_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = ingest_one_inner(&state, &headers, body).await;
    if let Err(error) = &result {
        count_rejection(error);
    }
    result
}

async fn ingest_one_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(headers)?;
    let limit = state
        .limits
        .max_payload_bytes
        .saturating_add(ENVELOPE_ALLOWANCE);
    let bytes = read_body(headers, body, limit).await?;
    let event = parse_event(&bytes, state.limits.payload())?;
    let correlation_id = current_correlation_id();
    let mut results =
        accept_all(state, &bytes, std::slice::from_ref(&event), &correlation_id).await?;
    let accepted = match results.pop() {
        Some(Ok(accepted)) => accepted,
        Some(Err(e)) => return Err(queue_error(&e)),
        None => return Err(ApiError::unavailable("queue")),
    };
    tracing::info!(
        event_id = accepted.event_id.as_str(),
        payload_size = accepted.payload_size,
        payload_mode = accepted.payload_mode.as_str(),
        "event accepted"
    );
    let body = IngestAccepted {
        event_id: accepted.event_id.to_string(),
        correlation_id: correlation_id.to_string(),
        payload_sha256: accepted.payload_sha256.to_string(),
        payload_size: accepted.payload_size,
        payload_mode: accepted.payload_mode.as_str(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Ingest up to 1000 events.
///
/// Items are independent: each is validated, hashed and queued as a single ingest would, and
/// gets its own result. 200 only once every accepted item is durably in the queue.
#[utoipa::path(
    post,
    path = "/v1/events/batch",
    tag = "ingest",
    operation_id = "ingest_batch",
    request_body(content = crate::dto::BatchIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Every item judged; the accepted ones are durably \
            queued.", body = crate::dto::BatchOut),
        (status = 400, description = "The whole request: `invalid_json`, or \
            `validation_error` (not an object with an `events` array of 1 to 1000 items, or \
            an invalid X-Correlation-ID). Nothing is accepted.", body = crate::error::ErrorBody),
        (status = 413, description = "The body is over `max_batch_bytes` (default 32 MiB). \
            Nothing is accepted.", body = crate::error::ErrorBody),
        (status = 503, description = "The queue or the blob store is unavailable, or the \
            server is at a load limit. Nothing is accepted.", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["ingest"])),
)]
async fn ingest_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = ingest_batch_inner(&state, &headers, body).await;
    if let Err(error) = &result {
        count_rejection(error);
    }
    result
}

async fn ingest_batch_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(headers)?;
    let bytes = read_body(headers, body, state.limits.max_batch_bytes).await?;
    let parsed = parse_batch(&bytes, state.limits.payload())?;
    let correlation_id = current_correlation_id();
    // Each item's answer: refused now (invalid), or the index of its event among the valid.
    let mut events = Vec::with_capacity(parsed.len());
    let slots: Vec<Result<usize, ApiError>> = parsed
        .into_iter()
        .map(|item| match item {
            Ok(event) => {
                events.push(event);
                Ok(events.len() - 1)
            }
            Err(e) => Err(ApiError::from(e)),
        })
        .collect();
    // A blob store outage, or a queue that took nothing, is the whole request's problem
    // (contract section 1b); a partial send (SQS sends per entry) is the unsent items' own.
    let mut accepted: Vec<Option<Result<Accepted, ApiError>>> = if events.is_empty() {
        Vec::new()
    } else {
        accept_all(state, &bytes, &events, &correlation_id)
            .await?
            .into_iter()
            .map(|result| Some(result.map_err(|e| queue_error(&e))))
            .collect()
    };
    let mut n_accepted = 0;
    let results: Vec<BatchItemOut> = slots
        .into_iter()
        .enumerate()
        .map(|(event_idx, slot)| {
            let answer = slot.and_then(|i| {
                accepted
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| Err(ApiError::unavailable("queue")))
            });
            match answer {
                Ok(accepted) => {
                    n_accepted += 1;
                    BatchItemOut::Accepted(BatchItemAccepted {
                        index: event_idx as u64,
                        status: StatusCode::ACCEPTED.as_u16(),
                        event_id: accepted.event_id.to_string(),
                        payload_sha256: accepted.payload_sha256.to_string(),
                        payload_size: accepted.payload_size,
                        payload_mode: accepted.payload_mode.as_str(),
                    })
                }
                Err(error) => {
                    count_rejection(&error);
                    BatchItemOut::Rejected(BatchItemRejected {
                        index: event_idx as u64,
                        status: error.status().as_u16(),
                        error: ApiCodeMessage {
                            code: error.code,
                            message: error.message,
                        },
                    })
                }
            }
        })
        .collect();
    tracing::info!(n_events = results.len(), n_accepted, "batch accepted");
    let body = BatchOut {
        correlation_id: correlation_id.to_string(),
        accepted: n_accepted as u64,
        rejected: (results.len() - n_accepted) as u64,
        results,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

//! `POST /v1/events` and `POST /v1/events/batch`: validate, hash, route inline or to the blob
//! store, enqueue durably, then answer (contract sections 1 and 1b).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use chrono::Utc;
use fluxa_core::ingest::{parse_batch, parse_event, ValidatedEvent};
use fluxa_core::{CorrelationId, EventMessageV1, FluxaTask, PayloadMode};
use fluxa_queue::{MessageAttributes, NewMessage};

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use crate::dto::{
    ApiCodeMessage, BatchItemAccepted, BatchItemOut, BatchItemRejected, BatchOut, IngestAccepted,
};
use crate::error::ApiError;
use crate::{correlation, AppState};

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

/// What ingest knows about one accepted event once its message is built.
struct Prepared {
    /// Taken by [`enqueue`], which hands it to the queue without a copy.
    message: Option<NewMessage>,
    blob_key: Option<String>,
    mode: PayloadMode,
    event_id: String,
    payload_sha256: String,
    payload_size: u64,
}

/// Builds one event's queue message, storing its payload in the blob store first if it is
/// over the inline limit.
/// `body` is the request body `event` was parsed from, so the payload can be handed to the
/// blob store as a slice of it, without a copy.
async fn prepare(
    state: &AppState,
    body: &Bytes,
    event: &ValidatedEvent<'_>,
    correlation_id: &CorrelationId,
) -> Result<Prepared, ApiError> {
    let header = event.header(correlation_id.clone(), Utc::now());
    let mode = event.payload_mode();
    let (message, blob_key) = match mode {
        PayloadMode::Inline => (EventMessageV1::inline(header, event.payload), None),
        PayloadMode::Blob => {
            let key = fluxa_blob::BlobStore::new_key(&event.event_id);
            let bytes = body.slice_ref(event.payload.get().as_bytes());
            let blob = state.blobs()?.put(&key, bytes).await.map_err(|e| {
                tracing::warn!(error.cause_chain = ?e, error.message = %e, "blob write failed");
                ApiError::unavailable("blob store")
            })?;
            // The whole key, as the message body names it (the attribute is what the
            // sweeper and the SQS attributes go by).
            let key = blob.key.clone();
            (EventMessageV1::in_blob(header, blob), Some(key))
        }
    };
    Ok(Prepared {
        message: Some(NewMessage {
            body: FluxaTask::EventV1(message).encode(),
            attributes: MessageAttributes {
                event_id: Some(event.event_id.clone()),
                correlation_id: Some(correlation_id.clone()),
                blob_key: blob_key.clone(),
                event_type: Some(event.event_type.clone()),
            },
        }),
        blob_key,
        mode,
        event_id: event.event_id.to_string(),
        payload_sha256: event.payload_sha256.to_string(),
        payload_size: event.payload_size() as u64,
    })
}

/// Sends the prepared messages in one call and says, per message, whether it was sent. The
/// blobs of messages that were not sent are deleted (best effort: a leftover blob is
/// unreferenced and swept later); a message that was sent keeps its blob.
async fn enqueue(state: &AppState, prepared: &mut [&mut Prepared]) -> Enqueued {
    let messages = prepared
        .iter_mut()
        .filter_map(|p| p.message.take())
        .collect();
    let queue = match state.queue() {
        Ok(queue) => queue,
        Err(e) => {
            return Enqueued {
                sent: vec![false; prepared.len()],
                error: Some(e),
            }
        }
    };
    let (sent, error): (Vec<bool>, _) = match queue.send(messages).await {
        Ok(_) => (vec![true; prepared.len()], None),
        // An outage is a 503 to retry; a refusal (which validated input cannot cause) is
        // our bug, a 500 that retrying would not cure. Either is logged once, here.
        Err(e) => (
            e.sent.iter().map(Option::is_some).collect(),
            Some(ApiError::from_queue(&e.source)),
        ),
    };
    let unsent_blobs = prepared
        .iter()
        .zip(&sent)
        .filter(|(_, sent)| !**sent)
        .filter_map(|(p, _)| p.blob_key.as_deref());
    delete_blobs(state, unsent_blobs).await;
    for (p, _) in prepared.iter().zip(&sent).filter(|(_, sent)| **sent) {
        metrics::counter!("fluxa_events_ingested_total", "payload_mode" => p.mode.as_str())
            .increment(1);
    }
    Enqueued { sent, error }
}

/// Which prepared messages [`enqueue`] sent, and the answer for those it could not.
struct Enqueued {
    sent: Vec<bool>,
    error: Option<ApiError>,
}

impl Enqueued {
    fn error(&self) -> ApiError {
        self.error
            .clone()
            .unwrap_or_else(|| ApiError::unavailable("queue"))
    }
}

async fn delete_blobs(state: &AppState, keys: impl Iterator<Item = &str>) {
    let Ok(blobs) = state.blobs() else { return };
    for key in keys {
        if let Err(e) = blobs.delete(key).await {
            tracing::warn!(blob_key = key, error.message = %e, "could not delete an orphaned blob");
        }
    }
}

fn current_correlation_id() -> CorrelationId {
    correlation::current()
        .and_then(|id| CorrelationId::parse(&id).ok())
        .unwrap_or_else(CorrelationId::generate)
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
    let mut prepared = prepare(state, &bytes, &event, &correlation_id).await?;
    let enqueued = enqueue(state, &mut [&mut prepared]).await;
    if enqueued.sent != [true] {
        return Err(enqueued.error());
    }
    tracing::info!(
        event_id = event.event_id.as_str(),
        payload_size = event.payload_size(),
        payload_mode = event.payload_mode().as_str(),
        "event accepted"
    );
    let body = IngestAccepted {
        event_id: prepared.event_id,
        correlation_id: correlation_id.to_string(),
        payload_sha256: prepared.payload_sha256,
        payload_size: prepared.payload_size,
        payload_mode: prepared.mode.as_str(),
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
    let events = parse_batch(&bytes, state.limits.payload())?;
    let correlation_id = current_correlation_id();
    let mut items: Vec<Result<Prepared, ApiError>> = Vec::with_capacity(events.len());
    for parsed in events {
        let item = match parsed {
            Ok(event) => prepare(state, &bytes, &event, &correlation_id).await,
            Err(e) => Err(ApiError::from(e)),
        };
        // A blob store outage is the whole request's problem, not this item's.
        if let Err(error) = &item {
            if error.status() == StatusCode::SERVICE_UNAVAILABLE {
                let written = items.iter().flatten().filter_map(|p| p.blob_key.as_deref());
                delete_blobs(state, written).await;
                return Err(error.clone());
            }
        }
        items.push(item);
    }
    let mut accepted: Vec<&mut Prepared> = items.iter_mut().flatten().collect();
    if !accepted.is_empty() {
        let enqueued = enqueue(state, &mut accepted).await;
        if !enqueued.sent.contains(&true) {
            // Nothing reached the queue: the whole request's problem (contract section 1b).
            return Err(enqueued.error());
        }
        // A partial send (SQS sends per entry): the unsent items carry the error in their
        // results (503 for an outage).
        let mut sent = enqueued.sent.iter();
        for item in &mut items {
            if item.is_ok() && sent.next() == Some(&false) {
                *item = Err(enqueued.error());
            }
        }
    }
    let n_accepted = items.iter().filter(|item| item.is_ok()).count();
    let results: Vec<BatchItemOut> = items
        .into_iter()
        .enumerate()
        .map(|(event_idx, item)| match item {
            Ok(prepared) => BatchItemOut::Accepted(BatchItemAccepted {
                index: event_idx as u64,
                status: StatusCode::ACCEPTED.as_u16(),
                event_id: prepared.event_id,
                payload_sha256: prepared.payload_sha256,
                payload_size: prepared.payload_size,
                payload_mode: prepared.mode.as_str(),
            }),
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

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
use fluxa_core::ingest::{check_json_syntax, parse_checked_event, parse_event, ValidatedEvent};
use fluxa_core::{CorrelationId, EventMessageV1, FluxaTask, PayloadMode};
use fluxa_queue::{MessageAttributes, NewMessage};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use crate::error::ApiError;
use crate::{correlation, AppState};

/// Room for the envelope around a payload of the maximum size (ids, type, hash, whitespace).
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// Most events one batch may carry.
const MAX_BATCH_EVENTS: usize = 1000;

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
    message: NewMessage,
    blob_key: Option<String>,
    result: Value,
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
        PayloadMode::Inline => {
            let payload = RawValue::from_string(event.payload.get().to_owned())
                .map_err(|e| ApiError::internal(&e))?;
            (EventMessageV1::inline(header, payload), None)
        }
        PayloadMode::S3 => {
            let key = fluxa_blob::BlobStore::new_key(&event.event_id);
            let bytes = body.slice_ref(event.payload.get().as_bytes());
            let blob = state.blobs.put(&key, bytes).await.map_err(|e| {
                tracing::warn!(error.cause_chain = ?e, error.message = %e, "blob write failed");
                ApiError::unavailable("blob store")
            })?;
            (EventMessageV1::in_blob(header, blob), Some(key))
        }
    };
    let result = json!({
        "event_id": event.event_id.as_str(),
        "payload_sha256": event.payload_sha256.as_str(),
        "payload_size": event.payload_size(),
        "payload_mode": mode.as_str(),
    });
    Ok(Prepared {
        message: NewMessage {
            body: FluxaTask::EventV1(message).encode(),
            attributes: MessageAttributes {
                event_id: Some(event.event_id.to_string()),
                correlation_id: Some(correlation_id.to_string()),
                blob_key: blob_key.clone(),
            },
        },
        blob_key,
        result,
    })
}

/// Enqueues the prepared messages as one atomic send. On failure the blobs written for them are
/// deleted (best effort; a leftover blob is unreferenced and harmless) and the caller answers 503.
async fn enqueue(state: &AppState, prepared: &[&Prepared]) -> Result<(), ApiError> {
    let messages = prepared.iter().map(|p| p.message.clone()).collect();
    if let Err(e) = state.queue.send(messages).await {
        tracing::warn!(error.cause_chain = ?e, error.message = %e, "enqueue failed");
        delete_blobs(state, prepared.iter().filter_map(|p| p.blob_key.as_deref())).await;
        return Err(ApiError::unavailable("queue"));
    }
    for p in prepared.iter() {
        let mode = p.result["payload_mode"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        metrics::counter!("fluxa_events_ingested_total", "payload_mode" => mode).increment(1);
    }
    Ok(())
}

async fn delete_blobs(state: &AppState, keys: impl Iterator<Item = &str>) {
    for key in keys {
        if let Err(e) = state.blobs.delete(key).await {
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
    metrics::counter!("fluxa_ingest_rejected_total", "code" => error.code).increment(1);
}

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
    let event = parse_event(&bytes, state.limits.max_payload_bytes)?;
    let correlation_id = current_correlation_id();
    let prepared = prepare(state, &bytes, &event, &correlation_id).await?;
    enqueue(state, &[&prepared]).await?;
    tracing::info!(
        event_id = event.event_id.as_str(),
        payload_size = event.payload_size(),
        payload_mode = event.payload_mode().as_str(),
        "event accepted"
    );
    let mut body = prepared.result;
    body["correlation_id"] = Value::String(correlation_id.to_string());
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn<'body> {
    #[serde(borrow)]
    events: Vec<&'body RawValue>,
}

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
    check_json_syntax(&bytes)?;
    let batch: BatchIn<'_> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::validation(format!(
            "events: the body must be an object with an \"events\" array ({e})"
        ))
    })?;
    if batch.events.is_empty() || batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::validation(format!(
            "events: must hold 1 to {MAX_BATCH_EVENTS} events, not {}",
            batch.events.len()
        )));
    }
    let correlation_id = current_correlation_id();
    let mut items: Vec<Result<Prepared, ApiError>> = Vec::with_capacity(batch.events.len());
    for raw in &batch.events {
        let item = match parse_checked_event(raw.get().as_bytes(), state.limits.max_payload_bytes) {
            Ok(event) => prepare(state, &bytes, &event, &correlation_id).await,
            Err(e) => Err(ApiError::from(e)),
        };
        // A blob store outage is the whole request's problem, not this item's.
        if let Err(error) = &item {
            if error.status == StatusCode::SERVICE_UNAVAILABLE {
                let written = items.iter().flatten().filter_map(|p| p.blob_key.as_deref());
                delete_blobs(state, written).await;
                return Err(error.clone());
            }
        }
        items.push(item);
    }
    let accepted: Vec<&Prepared> = items.iter().flatten().collect();
    if !accepted.is_empty() {
        enqueue(state, &accepted).await?;
    }
    let n_accepted = accepted.len();
    let results: Vec<Value> = items
        .into_iter()
        .enumerate()
        .map(|(event_idx, item)| match item {
            Ok(prepared) => {
                let mut result = prepared.result;
                result["index"] = json!(event_idx);
                result["status"] = json!(202);
                result
            }
            Err(error) => {
                count_rejection(&error);
                json!({
                    "index": event_idx,
                    "status": error.status.as_u16(),
                    "error": {"code": error.code, "message": error.message},
                })
            }
        })
        .collect();
    tracing::info!(n_events = results.len(), n_accepted, "batch accepted");
    Ok((
        StatusCode::OK,
        Json(json!({
            "correlation_id": correlation_id.as_str(),
            "accepted": n_accepted,
            "rejected": results.len() - n_accepted,
            "results": results,
        })),
    )
        .into_response())
}

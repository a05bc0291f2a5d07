//! `GET /v1/events/{event_id}` and `GET /v1/events/{event_id}/status`: reads only, through an
//! [`fluxa_store::EventReader`] (seed invariant 7).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fluxa_core::time::format_rfc3339;
use fluxa_core::{EventId, PayloadHash};
use fluxa_store::StoredEvent;
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::auth::{self, Scope};
use crate::error::ApiError;
use crate::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/events/{event_id}", get(get_event))
        .route("/v1/events/{event_id}/status", get(get_status))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |s, r, n| auth::require(Scope::Read, s, r, n),
        ))
}

/// An id that breaks the id rules can never have been stored, so it is simply not found.
fn parse_id(event_id: &str) -> Result<EventId, ApiError> {
    EventId::parse(event_id)
        .map_err(|rule| ApiError::not_found(format!("no event with that id (event ids {rule})")))
}

#[derive(Debug, thiserror::Error)]
#[error("stored payload of event {event_id} is corrupt: {reason}")]
struct CorruptPayload {
    event_id: String,
    reason: &'static str,
}

/// The stored payload as the raw JSON it was ingested as, checked against its hash first so
/// seed invariant 3 holds at rest too: a corrupted row is reported, never served.
fn verified_payload(event: &StoredEvent) -> Result<&RawValue, ApiError> {
    let corrupt = |reason| {
        ApiError::internal(&CorruptPayload {
            event_id: event.event_id.clone(),
            reason,
        })
    };
    if PayloadHash::of(&event.payload).as_str() != event.payload_sha256 {
        return Err(corrupt("its hash does not match payload_sha256"));
    }
    let text = std::str::from_utf8(&event.payload).map_err(|_| corrupt("it is not UTF-8"))?;
    serde_json::from_str(text).map_err(|_| corrupt("it is not JSON"))
}

async fn get_event(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(&event_id)?;
    let event = state
        .reader
        .event(&event_id)
        .await
        .map_err(|e| {
            tracing::warn!(error.cause_chain = ?e, error.message = %e, "event lookup failed");
            ApiError::unavailable("store")
        })?
        .ok_or_else(|| {
            ApiError::not_found(format!("no event with id {event_id} has been stored"))
        })?;
    let payload = verified_payload(&event)?;
    // A struct, not `json!`: converting a RawValue into a `Value` would re-format the payload.
    Ok(Json(EventOut {
        event_id: &event.event_id,
        event_type: &event.event_type,
        source: event.source.as_deref(),
        occurred_at: event.occurred_at.as_ref().map(format_rfc3339),
        payload,
        payload_sha256: &event.payload_sha256,
        payload_size: event.payload_size,
        payload_mode: &event.payload_mode,
        correlation_id: &event.correlation_id,
        received_at: format_rfc3339(&event.received_at),
        processed_at: format_rfc3339(&event.processed_at),
    })
    .into_response())
}

/// The body of `GET /v1/events/{event_id}`.
#[derive(Serialize)]
struct EventOut<'a> {
    event_id: &'a str,
    event_type: &'a str,
    source: Option<&'a str>,
    occurred_at: Option<String>,
    /// The payload exactly as ingested.
    payload: &'a RawValue,
    payload_sha256: &'a str,
    payload_size: u64,
    payload_mode: &'a str,
    correlation_id: &'a str,
    received_at: String,
    processed_at: String,
}

async fn get_status(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(&event_id)?;
    let status = state
        .reader
        .status(&event_id)
        .await
        .map_err(|e| {
            tracing::warn!(error.cause_chain = ?e, error.message = %e, "status lookup failed");
            ApiError::unavailable("store")
        })?
        .ok_or_else(|| {
            ApiError::not_found(format!("the processor has never seen event id {event_id}"))
        })?;
    Ok(Json(json!({
        "event_id": status.event_id,
        "status": status.status.as_str(),
        "attempts": status.attempts,
        "last_error": status.last_error.map(|e| json!({"code": e.code, "message": e.message})),
        "updated_at": format_rfc3339(&status.updated_at),
    }))
    .into_response())
}

//! `GET /v1/events/{event_id}` and `GET /v1/events/{event_id}/status`: reads only, through an
//! [`fluxa_store::EventReader`] (seed invariant 7).

use axum::extract::rejection::PathRejection;
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
use crate::error::{path_id, ApiError};
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

/// The path's event id, parsed before any store sees it: an id that breaks the id rules can
/// never have been stored, so it is simply not found.
fn parse_id(event_id: Result<Path<String>, PathRejection>) -> Result<EventId, ApiError> {
    path_id(event_id, EventId::parse, "event_id", "event")
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

/// Read one stored event, its payload byte for byte as ingested.
#[utoipa::path(
    get,
    path = "/v1/events/{event_id}",
    tag = "query",
    operation_id = "get_event",
    params(("event_id" = crate::openapi::schema::EventId, Path, description = "The event id.")),
    responses(
        (status = 200, description = "The stored event.", body = EventOut),
        (status = 404, description = "No event with that id has been stored (or the id \
            cannot be one).", body = crate::openapi::schema::ErrorBody),
    ),
    security(("bearer" = ["read"])),
)]
async fn get_event(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(event_id)?;
    let event = state
        .reader
        .event(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?
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
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventOut)]
struct EventOut<'a> {
    #[schema(value_type = crate::openapi::schema::EventId)]
    event_id: &'a str,
    event_type: &'a str,
    #[schema(required = true)]
    source: Option<&'a str>,
    /// RFC 3339, UTC.
    #[schema(required = true, format = DateTime)]
    occurred_at: Option<String>,
    /// The payload exactly as ingested.
    #[schema(value_type = serde_json::Value)]
    payload: &'a RawValue,
    #[schema(value_type = crate::openapi::schema::PayloadSha256)]
    payload_sha256: &'a str,
    payload_size: u64,
    #[schema(value_type = crate::openapi::schema::PayloadMode)]
    payload_mode: &'a str,
    #[schema(value_type = crate::openapi::schema::CorrelationId)]
    correlation_id: &'a str,
    #[schema(format = DateTime)]
    received_at: String,
    #[schema(format = DateTime)]
    processed_at: String,
}

/// Read the processor's record of an event: processing, processed, failed or erased.
#[utoipa::path(
    get,
    path = "/v1/events/{event_id}/status",
    tag = "query",
    operation_id = "get_event_status",
    params(("event_id" = crate::openapi::schema::EventId, Path, description = "The event id.")),
    responses(
        (status = 200, description = "The idempotency record.",
            body = crate::openapi::schema::StatusOut),
        (status = 404, description = "The processor has never seen that id.",
            body = crate::openapi::schema::ErrorBody),
    ),
    security(("bearer" = ["read"])),
)]
async fn get_status(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(event_id)?;
    let status = state
        .reader
        .status(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?
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

//! `GET /v1/events` (a filtered listing, one page at a time), `GET /v1/events/{event_id}` and
//! `GET /v1/events/{event_id}/status`: reads only, through an [`fluxa_store::EventReader`]
//! (seed invariant 7).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fluxa_core::cursor::{Listing, Position};
use fluxa_core::time::format_rfc3339;
use fluxa_core::{EventId, EventType, PayloadHash, Source};
use fluxa_store::{EventFilter, EventPosition, StoredEvent};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::{self, Scope};
use crate::dto::{CodeMessage, StatusOut};
use crate::error::{path_id, ApiError};
use crate::{listing, AppState};

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(list_events))
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
            event_id: event.event_id.to_string(),
            reason,
        })
    };
    let payload = event
        .payload
        .as_deref()
        .ok_or_else(|| corrupt("it was not read"))?;
    if PayloadHash::of(payload) != event.payload_sha256 {
        return Err(corrupt("its hash does not match payload_sha256"));
    }
    let text = std::str::from_utf8(payload).map_err(|_| corrupt("it is not UTF-8"))?;
    serde_json::from_str(text).map_err(|_| corrupt("it is not JSON"))
}

/// Read one stored event, its payload byte for byte as ingested.
#[utoipa::path(
    get,
    path = "/v1/events/{event_id}",
    tag = "query",
    operation_id = "get_event",
    params(("event_id" = crate::schemas::EventId, Path, description = "The event id.")),
    responses(
        (status = 200, description = "The stored event.", body = EventOut),
        (status = 404, description = "No event with that id has been stored (or the id \
            cannot be one).", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"])),
)]
async fn get_event(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(event_id)?;
    let event = state
        .reader()?
        .event(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?
        .ok_or_else(|| {
            ApiError::not_found(format!("no event with id {event_id} has been stored"))
        })?;
    // A struct, not `json!`: converting a RawValue into a `Value` would re-format the payload.
    Ok(Json(EventOut {
        summary: EventSummary::of(&event),
        payload: verified_payload(&event)?,
    })
    .into_response())
}

/// The body of `GET /v1/events/{event_id}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventOut)]
struct EventOut<'a> {
    #[serde(flatten)]
    summary: EventSummary<'a>,
    /// The payload exactly as ingested.
    #[schema(value_type = serde_json::Value)]
    payload: &'a RawValue,
}

/// An item of `GET /v1/events`: a stored event, its payload only when asked for.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventListItem)]
struct EventListItem<'a> {
    #[serde(flatten)]
    summary: EventSummary<'a>,
    /// The payload exactly as ingested, with `include=payload`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    payload: Option<&'a RawValue>,
}

/// A stored event's fields beside its payload.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventSummary)]
struct EventSummary<'a> {
    #[schema(value_type = crate::schemas::EventId)]
    event_id: &'a str,
    event_type: &'a str,
    #[schema(required = true)]
    source: Option<&'a str>,
    /// RFC 3339, UTC.
    #[schema(required = true, format = DateTime)]
    occurred_at: Option<String>,
    #[schema(value_type = crate::schemas::PayloadSha256)]
    payload_sha256: &'a str,
    payload_size: u64,
    #[schema(value_type = crate::schemas::PayloadMode)]
    payload_mode: &'a str,
    #[schema(value_type = crate::schemas::CorrelationId)]
    correlation_id: &'a str,
    #[schema(format = DateTime)]
    received_at: String,
    #[schema(format = DateTime)]
    processed_at: String,
}

impl<'a> EventSummary<'a> {
    fn of(event: &'a StoredEvent) -> Self {
        Self {
            event_id: event.event_id.as_str(),
            event_type: event.event_type.as_str(),
            source: event.source.as_ref().map(Source::as_str),
            occurred_at: event.occurred_at.as_ref().map(format_rfc3339),
            payload_sha256: event.payload_sha256.as_str(),
            payload_size: event.payload_size,
            payload_mode: event.payload_mode.as_str(),
            correlation_id: event.correlation_id.as_str(),
            received_at: format_rfc3339(&event.received_at),
            processed_at: format_rfc3339(&event.processed_at),
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only events of this type (exact match).
    #[param(value_type = Option<crate::schemas::EventType>)]
    event_type: Option<String>,
    /// Only events from this source (exact match).
    #[param(value_type = Option<crate::schemas::Source>)]
    source: Option<String>,
    /// Only events received at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only events received before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// At most this many events (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page, with the same filters.
    #[param(value_type = Option<crate::schemas::Cursor>)]
    cursor: Option<String>,
    /// `payload` to include each event's payload.
    #[param(pattern = "^payload$")]
    include: Option<String>,
}

/// The body of `GET /v1/events`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = EventList)]
struct EventList<'a> {
    events: Vec<EventListItem<'a>>,
    /// Pass it back as `cursor`, with the same filters, for the next page; `null` on the last.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// List stored events, oldest `received_at` first (ties by `event_id`), one page at a time.
///
/// Paging with `next_cursor` through a table that is growing neither skips nor repeats an
/// event that existed when paging began. Every filter combination is served by an index.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "query",
    operation_id = "list_events",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of events.", body = EventList),
        (status = 400, description = "`validation_error` naming the parameter: an unknown \
            one, `limit` outside 1..=1000, a time that is not RFC 3339, an invalid \
            `event_type` or `source`, a malformed cursor or one made under other filters, \
            or an invalid X-Correlation-ID.", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"])),
)]
async fn list_events(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = listing::query(query)?;
    let limit = listing::limit(query.limit)?;
    let include_payload = match query.include.as_deref() {
        None => false,
        Some("payload") => true,
        Some(_) => return Err(ApiError::validation("include: the only value is `payload`")),
    };
    let filter = EventFilter {
        event_type: query
            .event_type
            .as_deref()
            .map(EventType::parse)
            .transpose()
            .map_err(|rule| ApiError::validation(format!("event_type: {rule}")))?,
        source: query
            .source
            .as_deref()
            .map(Source::parse)
            .transpose()
            .map_err(|rule| ApiError::validation(format!("source: {rule}")))?,
        since: listing::time("since", query.since.as_deref())?,
        until: listing::time("until", query.until.as_deref())?,
    };
    let filters = listing::fingerprint(
        &[
            filter.event_type.as_ref().map(EventType::as_str),
            filter.source.as_ref().map(Source::as_str),
        ],
        &[filter.since, filter.until],
    );
    let after = listing::after(Listing::Events, &filters, query.cursor.as_deref())?
        .map(|position| {
            // A cursor only this server made can name an id; one that breaks the id rules
            // was tampered with.
            EventId::parse(&position.id)
                .map(|event_id| EventPosition {
                    received_at: position.at,
                    event_id,
                })
                .map_err(|_| ApiError::validation("cursor: not a cursor this server made"))
        })
        .transpose()?;
    let page = state
        .reader()?
        .list_events(&filter, after.as_ref(), limit, include_payload)
        .await
        .map_err(|e| ApiError::from_store(&e))?;
    let events = page
        .events
        .iter()
        .map(|event| {
            Ok(EventListItem {
                summary: EventSummary::of(event),
                payload: if include_payload {
                    Some(verified_payload(event)?)
                } else {
                    None
                },
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let next = page.next.map(|next| Position {
        at: next.received_at,
        id: next.event_id.into(),
    });
    Ok(Json(EventList {
        events,
        next_cursor: listing::next_cursor(Listing::Events, &filters, next),
    })
    .into_response())
}

/// Read the processor's record of an event: processing, processed, failed or erased.
#[utoipa::path(
    get,
    path = "/v1/events/{event_id}/status",
    tag = "query",
    operation_id = "get_event_status",
    params(("event_id" = crate::schemas::EventId, Path, description = "The event id.")),
    responses(
        (status = 200, description = "The idempotency record.",
            body = crate::dto::StatusOut),
        (status = 404, description = "The processor has never seen that id.",
            body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"])),
)]
async fn get_status(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_id(event_id)?;
    let status = state
        .reader()?
        .status(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?
        .ok_or_else(|| {
            ApiError::not_found(format!("the processor has never seen event id {event_id}"))
        })?;
    Ok(Json(StatusOut {
        event_id: status.event_id.to_string(),
        status: status.status.as_str(),
        attempts: u64::from(status.attempts),
        last_error: status.last_error.map(|e| CodeMessage {
            code: e.code.as_str().to_owned(),
            message: e.message,
        }),
        updated_at: format_rfc3339(&status.updated_at),
    })
    .into_response())
}

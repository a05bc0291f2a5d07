//! `/v1/admin/dlq…`: list, show and redrive dead letters (contract section 4).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::time::format_rfc3339;
use fluxa_core::EventId;
use fluxa_queue::{DeadLetter, RedriveSelector};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use crate::error::{path_id, ApiError};
use crate::AppState;

const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 1000;

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/admin/dlq", get(list))
        .route("/v1/admin/dlq/redrive", post(redrive))
        .route("/v1/admin/dlq/{id}", get(show))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |s, r, n| auth::require(Scope::Admin, s, r, n),
        ))
}

/// One dead letter as the admin API and the CLI show it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = DeadLetterOut)]
pub struct DeadLetterOut<'a> {
    #[schema(value_type = crate::openapi::schema::DeadLetterId)]
    id: &'a str,
    /// The event id, when the message could be parsed far enough to have one.
    #[schema(required = true)]
    event_id: Option<&'a str>,
    #[schema(required = true)]
    correlation_id: Option<&'a str>,
    /// `permanent` or `retries_exhausted`.
    error_class: &'a str,
    error: ErrorOut<'a>,
    receive_count: u32,
    #[schema(format = DateTime)]
    enqueued_at: String,
    #[schema(format = DateTime)]
    first_failure_at: String,
    #[schema(format = DateTime)]
    last_failure_at: String,
    #[schema(format = DateTime)]
    dead_lettered_at: String,
    /// The original message, byte for byte: embedded as JSON when it is JSON (always, for
    /// messages Fluxa wrote), as a string otherwise.
    #[schema(value_type = serde_json::Value)]
    message: OriginalMessage<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = DeadLetterError)]
struct ErrorOut<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OriginalMessage<'a> {
    Json(&'a RawValue),
    Text(String),
}

pub fn dead_letter_json(entry: &DeadLetter) -> DeadLetterOut<'_> {
    let message = std::str::from_utf8(&entry.body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        .map_or_else(
            || OriginalMessage::Text(String::from_utf8_lossy(&entry.body).into_owned()),
            OriginalMessage::Json,
        );
    DeadLetterOut {
        id: &entry.id,
        event_id: entry.attributes.event_id.as_deref(),
        correlation_id: entry.attributes.correlation_id.as_deref(),
        error_class: entry.error_class.as_str(),
        error: ErrorOut {
            code: &entry.error.code,
            message: &entry.error.message,
        },
        receive_count: entry.receive_count,
        enqueued_at: format_rfc3339(&entry.enqueued_at),
        first_failure_at: format_rfc3339(&entry.first_failure_at),
        last_failure_at: format_rfc3339(&entry.last_failure_at),
        dead_lettered_at: format_rfc3339(&entry.dead_lettered_at),
        message,
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = DeadLetterList)]
struct DeadLetterList<'a> {
    total: u64,
    dead_letters: Vec<DeadLetterOut<'a>>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only the dead letters of this event id.
    #[param(value_type = Option<crate::openapi::schema::EventId>)]
    event_id: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// List dead letters, oldest first.
#[utoipa::path(
    get,
    path = "/v1/admin/dlq",
    tag = "admin",
    operation_id = "list_dead_letters",
    params(ListQuery),
    responses(
        (status = 200, description = "The dead letters and the DLQ's total depth.",
            body = DeadLetterList),
        (status = 400, description = "`validation_error`: an unknown or invalid query \
            parameter (`limit` outside 1..=1000, say), or an invalid X-Correlation-ID.",
            body = crate::openapi::schema::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::validation(format!("query: {}", e.body_text())))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::validation(format!(
            "limit: must be 1 to {MAX_LIST_LIMIT}"
        )));
    }
    // Parsed before the queue sees it: a value no event id can have is the client's mistake.
    let event_id = query
        .event_id
        .as_deref()
        .map(EventId::parse)
        .transpose()
        .map_err(|rule| ApiError::validation(format!("event_id: {rule}")))?;
    let entries = state
        .dead_letters
        .list_dead_letters(limit, event_id.as_ref().map(EventId::as_str))
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    let depth = state
        .dead_letters
        .depth()
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    let dead_letters: Vec<DeadLetterOut<'_>> = entries.iter().map(dead_letter_json).collect();
    Ok(Json(DeadLetterList {
        total: depth.dead_letters,
        dead_letters,
    })
    .into_response())
}

/// Show one dead letter.
#[utoipa::path(
    get,
    path = "/v1/admin/dlq/{id}",
    tag = "admin",
    operation_id = "get_dead_letter",
    params(("id" = crate::openapi::schema::DeadLetterId, Path, description = "The dead letter's id.")),
    responses(
        (status = 200, description = "The dead letter.", body = DeadLetterOut),
        (status = 404, description = "No dead letter with that id (or the id cannot be one).",
            body = crate::openapi::schema::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn show(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id, DeadLetterId::parse, "id", "dead letter")?;
    let entry = state
        .dead_letters
        .get_dead_letter(id.as_str())
        .await
        .map_err(|e| ApiError::from_queue(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no dead letter with id {id}")))?;
    Ok(Json(dead_letter_json(&entry)).into_response())
}

/// Body of a redrive request: exactly one of the three selectors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveIn {
    #[serde(default)]
    all: bool,
    event_id: Option<String>,
    id: Option<String>,
}

/// Largest accepted redrive request body; the real ones are a few dozen bytes.
const MAX_REDRIVE_BODY: usize = 64 * 1024;

/// Move dead letters back to the queue: all of them, every one of an event id, or one by id.
#[utoipa::path(
    post,
    path = "/v1/admin/dlq/redrive",
    tag = "admin",
    operation_id = "redrive_dead_letters",
    request_body(content = crate::openapi::schema::RedriveIn, content_type = "application/json"),
    responses(
        (status = 200, description = "How many dead letters went back to the queue.",
            body = crate::openapi::schema::RedriveOut),
        (status = 400, description = "`invalid_json`, or `validation_error`: not exactly one \
            selector, an unknown member, or an invalid X-Correlation-ID.",
            body = crate::openapi::schema::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn redrive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let body = read_body(&headers, body, MAX_REDRIVE_BODY).await?;
    fluxa_core::ingest::check_json_syntax(&body)?;
    let request: RedriveIn =
        serde_json::from_slice(&body).map_err(|e| ApiError::validation(format!("body: {e}")))?;
    // Each id is parsed before the queue sees it, and named when it is refused.
    let selector = match (request.all, request.event_id, request.id) {
        (true, None, None) => RedriveSelector::All,
        (false, Some(event_id), None) => {
            let event_id = EventId::parse(&event_id)
                .map_err(|rule| ApiError::validation(format!("event_id: {rule}")))?;
            RedriveSelector::EventId(event_id.into())
        }
        (false, None, Some(id)) => {
            let id = DeadLetterId::parse(&id)
                .map_err(|rule| ApiError::validation(format!("id: {rule}")))?;
            RedriveSelector::Id(id.into())
        }
        _ => {
            return Err(ApiError::validation(
                "body: give exactly one of {\"all\": true}, {\"event_id\": …} or {\"id\": …}",
            ))
        }
    };
    let n_redriven = state
        .dead_letters
        .redrive(&selector)
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    tracing::info!(n_redriven, selector = ?selector, "dead letters redriven");
    Ok(Json(json!({ "redriven": n_redriven })).into_response())
}

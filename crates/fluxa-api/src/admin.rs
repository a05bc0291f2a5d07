//! `/v1/admin/dlq…`: list, show and redrive dead letters (contract section 4).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fluxa_core::time::format_rfc3339;
use fluxa_queue::{DeadLetter, RedriveSelector};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use crate::error::ApiError;
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
#[derive(Serialize)]
pub struct DeadLetterOut<'a> {
    id: &'a str,
    event_id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    error_class: &'a str,
    error: ErrorOut<'a>,
    receive_count: u32,
    enqueued_at: String,
    first_failure_at: String,
    last_failure_at: String,
    dead_lettered_at: String,
    /// The original message, byte for byte: embedded as JSON when it is JSON (always, for
    /// messages Fluxa wrote), as a string otherwise.
    message: OriginalMessage<'a>,
}

#[derive(Serialize)]
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

fn queue_down(error: &fluxa_queue::Error) -> ApiError {
    tracing::warn!(error.cause_chain = ?error, error.message = %error, "dead-letter queue access failed");
    ApiError::unavailable("queue")
}

#[derive(Serialize)]
struct DeadLetterList<'a> {
    total: u64,
    dead_letters: Vec<DeadLetterOut<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    event_id: Option<String>,
    limit: Option<usize>,
}

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
    let entries = state
        .dead_letters
        .list_dead_letters(limit, query.event_id.as_deref())
        .await
        .map_err(|e| queue_down(&e))?;
    let depth = state
        .dead_letters
        .depth()
        .await
        .map_err(|e| queue_down(&e))?;
    let dead_letters: Vec<DeadLetterOut<'_>> = entries.iter().map(dead_letter_json).collect();
    Ok(Json(DeadLetterList {
        total: depth.dead_letters,
        dead_letters,
    })
    .into_response())
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let entry = state
        .dead_letters
        .get_dead_letter(&id)
        .await
        .map_err(|e| queue_down(&e))?
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
    let selector = match (request.all, request.event_id, request.id) {
        (true, None, None) => RedriveSelector::All,
        (false, Some(event_id), None) => RedriveSelector::EventId(event_id),
        (false, None, Some(id)) => RedriveSelector::Id(id),
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
        .map_err(|e| queue_down(&e))?;
    tracing::info!(n_redriven, selector = ?selector, "dead letters redriven");
    Ok(Json(json!({ "redriven": n_redriven })).into_response())
}

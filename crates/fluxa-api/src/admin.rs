//! `/v1/admin/…` (scope `admin`): list, show and redrive dead letters (contract section 4);
//! inspect and evict idempotency records, and erase events (contract section 8).
//!
//! Every action that changes something is logged once, at its end, with its parameters and
//! counts, under the `fluxa::audit` target, so an operator's actions can be told apart from the
//! pipeline's own logs.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fluxa_core::cursor::{Listing, Position};
use fluxa_core::ids::DeadLetterId;
use fluxa_core::time::format_rfc3339;
use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, PayloadHash};
use fluxa_queue::{DeadLetter, DeadLetterFilter, DeadLetterPosition, RedriveSelector};
use fluxa_store::{Eviction, IdempotencyRecord};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::{self, Scope};
use crate::body::{read_body, require_json};
use fluxa_operations::EraseError;

use crate::error::{path_id, ApiError, ApiErrorCode};
use crate::{listing, AppState};

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/admin/dlq", get(list))
        .route("/v1/admin/dlq/redrive", post(redrive))
        .route("/v1/admin/dlq/{id}", get(show))
        .route(
            "/v1/admin/idempotency/{event_id}",
            get(get_idempotency).delete(evict_idempotency),
        )
        .route("/v1/admin/events/{event_id}", delete(erase_event))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            |s, r, n| auth::require(Scope::Admin, s, r, n),
        ))
}

/// One dead letter as the admin API and the CLI show it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = DeadLetterOut)]
pub struct DeadLetterOut<'a> {
    #[schema(value_type = crate::schemas::DeadLetterId)]
    id: &'a str,
    /// The event id, when the message could be parsed far enough to have one.
    #[schema(required = true)]
    event_id: Option<&'a str>,
    #[schema(required = true)]
    correlation_id: Option<&'a str>,
    /// The event's type, when the message carried it (dead letters recorded before Fluxa
    /// kept it have none).
    #[schema(required = true)]
    event_type: Option<&'a str>,
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
        id: entry.id.as_str(),
        event_id: entry.attributes.event_id.as_ref().map(EventId::as_str),
        correlation_id: entry
            .attributes
            .correlation_id
            .as_ref()
            .map(CorrelationId::as_str),
        event_type: entry.attributes.event_type.as_ref().map(EventType::as_str),
        error_class: entry.error_class.as_str(),
        error: ErrorOut {
            code: entry.error.code.as_str(),
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
    /// Every dead letter in the DLQ, whatever the filters.
    total: u64,
    dead_letters: Vec<DeadLetterOut<'a>>,
    /// Pass it back as `cursor`, with the same filters, for the next page; `null` on the last.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// The DLQ filters of contract section 4, as the query string and a redrive's `filter` give
/// them. All optional; combined with AND.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = DeadLetterFilter)]
#[serde(deny_unknown_fields)]
pub struct FilterIn {
    /// Only the dead letters of this event id.
    #[schema(value_type = Option<crate::schemas::EventId>)]
    event_id: Option<String>,
    /// Only this error code.
    #[schema(value_type = Option<crate::schemas::ProcessingErrorCode>)]
    error_code: Option<String>,
    /// Only this class of failure.
    #[schema(value_type = Option<crate::schemas::ErrorClass>)]
    error_class: Option<String>,
    /// Only dead letters of events of this type.
    #[schema(value_type = Option<crate::schemas::EventType>)]
    event_type: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339).
    #[schema(format = DateTime)]
    since: Option<String>,
    /// Only those dead-lettered before this time (RFC 3339).
    #[schema(format = DateTime)]
    until: Option<String>,
}

impl FilterIn {
    /// Parses every value before the queue sees it; a value no dead letter can have is the
    /// client's mistake, named in a 400 (`prefix` says where the filter was, for the message).
    fn parse(&self, prefix: &str) -> Result<DeadLetterFilter, ApiError> {
        let field = |name: &str| format!("{prefix}{name}");
        let event_id = self
            .event_id
            .as_deref()
            .map(EventId::parse)
            .transpose()
            .map_err(|rule| ApiError::validation(format!("{}: {rule}", field("event_id"))))?;
        let error_code = self
            .error_code
            .as_deref()
            .map(|code| {
                ErrorCode::parse(code).ok_or_else(|| {
                    let known: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
                    ApiError::validation(format!(
                        "{}: not an error code; one of {}",
                        field("error_code"),
                        known.join(", ")
                    ))
                })
            })
            .transpose()?;
        let error_class = self
            .error_class
            .as_deref()
            .map(|class| {
                FailureClass::parse(class).ok_or_else(|| {
                    ApiError::validation(format!(
                        "{}: must be permanent or retries_exhausted",
                        field("error_class")
                    ))
                })
            })
            .transpose()?;
        let event_type = self
            .event_type
            .as_deref()
            .map(EventType::parse)
            .transpose()
            .map_err(|rule| ApiError::validation(format!("{}: {rule}", field("event_type"))))?;
        Ok(DeadLetterFilter {
            event_id: event_id.map(String::from),
            error_code,
            error_class,
            event_type: event_type.map(String::from),
            since: listing::time(&field("since"), self.since.as_deref())?,
            until: listing::time(&field("until"), self.until.as_deref())?,
        })
    }
}

/// The cursor fingerprint of a DLQ filter.
fn fingerprint(filter: &DeadLetterFilter) -> String {
    listing::fingerprint(
        &[
            filter.event_id.as_deref(),
            filter.error_code.map(ErrorCode::as_str),
            filter.error_class.map(FailureClass::as_str),
            filter.event_type.as_deref(),
        ],
        &[filter.since, filter.until],
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only the dead letters of this event id.
    #[param(value_type = Option<crate::schemas::EventId>)]
    event_id: Option<String>,
    /// Only this error code.
    #[param(value_type = Option<crate::schemas::ProcessingErrorCode>)]
    error_code: Option<String>,
    /// Only this class of failure.
    #[param(value_type = Option<crate::schemas::ErrorClass>)]
    error_class: Option<String>,
    /// Only dead letters of events of this type.
    #[param(value_type = Option<crate::schemas::EventType>)]
    event_type: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only those dead-lettered before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page, with the same filters.
    #[param(value_type = Option<crate::schemas::Cursor>)]
    cursor: Option<String>,
}

/// List dead letters, oldest `dead_lettered_at` first, one page at a time.
#[utoipa::path(
    get,
    path = "/v1/admin/dlq",
    tag = "admin",
    operation_id = "list_dead_letters",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of dead letters, and the DLQ's total depth.",
            body = DeadLetterList),
        (status = 400, description = "`validation_error` naming the parameter: an unknown \
            one, `limit` outside 1..=1000, an unknown error code or class, a time that is not \
            RFC 3339, a malformed cursor or one made under other filters, or an invalid \
            X-Correlation-ID.", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = listing::query(query)?;
    let limit = listing::limit(query.limit)?;
    let filter = FilterIn {
        event_id: query.event_id,
        error_code: query.error_code,
        error_class: query.error_class,
        event_type: query.event_type,
        since: query.since,
        until: query.until,
    }
    .parse("")?;
    let filters = fingerprint(&filter);
    let after =
        listing::after(Listing::DeadLetters, &filters, query.cursor.as_deref())?.map(|position| {
            DeadLetterPosition {
                dead_lettered_at: position.at,
                id: position.id,
            }
        });
    let page = state
        .dead_letters()?
        .list_dead_letters(&filter, after.as_ref(), limit)
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    let depth = state
        .dead_letters()?
        .depth()
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    let next = page.next.map(|next| Position {
        at: next.dead_lettered_at,
        id: next.id,
    });
    Ok(Json(DeadLetterList {
        total: depth.dead_letters,
        dead_letters: page.dead_letters.iter().map(dead_letter_json).collect(),
        next_cursor: listing::next_cursor(Listing::DeadLetters, &filters, next),
    })
    .into_response())
}

/// Show one dead letter.
#[utoipa::path(
    get,
    path = "/v1/admin/dlq/{id}",
    tag = "admin",
    operation_id = "get_dead_letter",
    params(("id" = crate::schemas::DeadLetterId, Path, description = "The dead letter's id.")),
    responses(
        (status = 200, description = "The dead letter.", body = DeadLetterOut),
        (status = 404, description = "No dead letter with that id (or the id cannot be one).",
            body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn show(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id, DeadLetterId::parse, "id", "dead letter")?;
    let entry = state
        .dead_letters()?
        .get_dead_letter(&id)
        .await
        .map_err(|e| ApiError::from_queue(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no dead letter with id {id}")))?;
    Ok(Json(dead_letter_json(&entry)).into_response())
}

/// Body of a redrive request: exactly one selector (`all` true, or `event_id`, `id` or
/// `filter` not null), and optionally `dry_run`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RedriveIn {
    /// `true`: every dead letter.
    #[serde(default)]
    all: bool,
    /// Every dead letter of this event.
    #[schema(value_type = Option<crate::schemas::EventId>)]
    event_id: Option<String>,
    /// The one dead letter with this id.
    #[schema(value_type = Option<crate::schemas::DeadLetterId>)]
    id: Option<String>,
    /// Every dead letter the filter matches (the filters of `GET /v1/admin/dlq`).
    filter: Option<FilterIn>,
    /// Only count what would be redriven.
    #[serde(default)]
    dry_run: bool,
    /// Move at most this many in this call, so a client can redrive a large DLQ in short
    /// requests and show its progress.
    #[schema(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
}

/// Largest `limit` a redrive takes.
pub(crate) const MAX_REDRIVE_LIMIT: u64 = 10_000;

/// The answer to a redrive.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = RedriveOut)]
struct RedriveOut {
    /// Dead letters the selector matched when the redrive began.
    matched: u64,
    /// Dead letters moved back to the queue (0 on a dry run).
    redriven: u64,
    dry_run: bool,
}

/// Largest accepted redrive request body; the real ones are a few hundred bytes.
const MAX_REDRIVE_BODY: usize = 64 * 1024;

/// Move dead letters back to the queue: all of them, every one of an event id, one by id, or
/// every one a filter matches; or, with `dry_run`, only count them.
///
/// A redrive of many entries runs in bounded batches (one short transaction each), never
/// picks up an entry that fails again while it runs, and may be repeated safely: what has
/// moved is no longer in the DLQ. With `limit`, one call moves at most that many (the CLI
/// loops this way, with `until` fixed at its start, to show progress).
#[utoipa::path(
    post,
    path = "/v1/admin/dlq/redrive",
    tag = "admin",
    operation_id = "redrive_dead_letters",
    request_body(content = RedriveIn, content_type = "application/json"),
    responses(
        (status = 200, description = "How many dead letters matched and how many went back \
            to the queue.", body = RedriveOut),
        (status = 400, description = "`invalid_json`, or `validation_error`: not exactly one \
            selector, an unknown member, an invalid filter value (named), or an invalid \
            X-Correlation-ID.", body = crate::error::ErrorBody),
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
    let request: RedriveIn = fluxa_core::ingest::read_object(&body, "a redrive request")?;
    // Each value is parsed before the queue sees it, and named when it is refused.
    let selector = match (request.all, request.event_id, request.id, request.filter) {
        (true, None, None, None) => RedriveSelector::Filter(DeadLetterFilter::default()),
        (false, Some(event_id), None, None) => RedriveSelector::Filter(
            FilterIn {
                event_id: Some(event_id),
                ..FilterIn::default()
            }
            .parse("")?,
        ),
        (false, None, Some(id), None) => {
            let id = DeadLetterId::parse(&id)
                .map_err(|rule| ApiError::validation(format!("id: {rule}")))?;
            RedriveSelector::Id(id)
        }
        (false, None, None, Some(filter)) => RedriveSelector::Filter(filter.parse("filter.")?),
        _ => {
            return Err(ApiError::validation(
                "body: give exactly one of {\"all\": true}, {\"event_id\": …}, {\"id\": …} \
                 or {\"filter\": {…}}",
            ))
        }
    };
    let dry_run = request.dry_run;
    let limit = match request.limit {
        None => None,
        Some(limit @ 1..=MAX_REDRIVE_LIMIT) => Some(limit),
        Some(_) => {
            return Err(ApiError::validation(format!(
                "limit: must be 1 to {MAX_REDRIVE_LIMIT}"
            )))
        }
    };
    let options = fluxa_operations::RedriveOptions { dry_run, limit };
    let report = fluxa_operations::redrive(state.dead_letters()?, &selector, options)
        .await
        .map_err(|e| ApiError::from_queue(&e))?;
    Ok(Json(RedriveOut {
        matched: report.matched,
        redriven: report.redriven,
        dry_run,
    })
    .into_response())
}

/// An idempotency record in full (contract section 8).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = IdempotencyRecordOut)]
struct IdempotencyRecordOut<'a> {
    #[schema(value_type = crate::schemas::EventId)]
    event_id: &'a str,
    #[schema(value_type = crate::schemas::ProcessingStatus)]
    status: &'a str,
    attempts: u32,
    /// `null` for an erased record, which keeps no hash.
    #[schema(required = true, value_type = Option<crate::schemas::PayloadSha256>)]
    payload_sha256: Option<&'a str>,
    /// When a `processing` record's lease runs out and another delivery may take over.
    #[schema(required = true, format = DateTime)]
    lease_expires_at: Option<String>,
    #[schema(required = true)]
    last_error: Option<ErrorOut<'a>>,
    #[schema(required = true, value_type = Option<crate::schemas::CorrelationId>)]
    correlation_id: Option<&'a str>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

fn record_json(record: &IdempotencyRecord) -> IdempotencyRecordOut<'_> {
    IdempotencyRecordOut {
        event_id: record.event_id.as_str(),
        status: record.status.as_str(),
        attempts: record.attempts,
        payload_sha256: record.payload_sha256.as_ref().map(PayloadHash::as_str),
        lease_expires_at: record.lease_expires_at.as_ref().map(format_rfc3339),
        last_error: record.last_error.as_ref().map(|error| ErrorOut {
            code: error.code.as_str(),
            message: &error.message,
        }),
        correlation_id: record.correlation_id.as_ref().map(CorrelationId::as_str),
        created_at: format_rfc3339(&record.created_at),
        updated_at: format_rfc3339(&record.updated_at),
    }
}

fn parse_event_id(event_id: Result<Path<String>, PathRejection>) -> Result<EventId, ApiError> {
    path_id(event_id, EventId::parse, "event_id", "event")
}

/// Read an event's idempotency record.
#[utoipa::path(
    get,
    path = "/v1/admin/idempotency/{event_id}",
    tag = "admin",
    operation_id = "get_idempotency_record",
    params(("event_id" = crate::schemas::EventId, Path, description = "The event id.")),
    responses(
        (status = 200, description = "The record.", body = IdempotencyRecordOut),
        (status = 404, description = "No record for that id.",
            body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn get_idempotency(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_event_id(event_id)?;
    let record = state
        .store_admin()?
        .idempotency_record(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no idempotency record for {event_id}")))?;
    Ok(Json(record_json(&record)).into_response())
}

/// Evict a `processing` or `failed` idempotency record, so the next delivery starts fresh.
#[utoipa::path(
    delete,
    path = "/v1/admin/idempotency/{event_id}",
    tag = "admin",
    operation_id = "evict_idempotency_record",
    params(("event_id" = crate::schemas::EventId, Path, description = "The event id.")),
    responses(
        (status = 204, description = "Evicted."),
        (status = 404, description = "No record for that id.",
            body = crate::error::ErrorBody),
        (status = 409, description = "`conflict`: the record is `processed` or `erased`, and \
            evicting it would let the event be stored twice or come back.",
            body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn evict_idempotency(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_event_id(event_id)?;
    let eviction = state
        .store_admin()?
        .evict(&event_id)
        .await
        .map_err(|e| ApiError::from_store(&e))?;
    tracing::info!(
        target: "fluxa::audit",
        action = "idempotency.evict",
        event_id = event_id.as_str(),
        outcome = ?eviction,
        "operator action"
    );
    match eviction {
        Eviction::Evicted => Ok(StatusCode::NO_CONTENT.into_response()),
        Eviction::Refused(status) => Err(ApiError::new(
            ApiErrorCode::Conflict,
            format!(
                "the record of {event_id} is {}; only a processing or failed record can be \
                 evicted",
                status.as_str()
            ),
        )),
        Eviction::NotFound => Err(ApiError::not_found(format!(
            "no idempotency record for {event_id}"
        ))),
    }
}

/// Erase an event: its row and payload, its dead letters and blobs; its idempotency record
/// becomes an `erased` tombstone so a late redelivery can never store it again.
#[utoipa::path(
    delete,
    path = "/v1/admin/events/{event_id}",
    tag = "admin",
    operation_id = "erase_event",
    params(("event_id" = crate::schemas::EventId, Path, description = "The event id.")),
    responses(
        (status = 204, description = "Erased (also when it already was)."),
        (status = 404, description = "Nothing with that id exists: no event, record, dead \
            letter, queued message or blob.", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
async fn erase_event(
    State(state): State<AppState>,
    event_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let event_id = parse_event_id(event_id)?;
    let report = fluxa_operations::erase(
        state.dead_letters()?,
        state.store_admin()?,
        state.blobs()?,
        &event_id,
    )
    .await
    .map_err(|e| match e {
        EraseError::Queue(e) => ApiError::from_queue(&e),
        EraseError::Store(e) => ApiError::from_store(&e),
        EraseError::BlobStore(e) => {
            tracing::warn!(error.message = %e, "could not delete an erased event's blobs");
            ApiError::unavailable("blob store")
        }
    })?;
    if !report.found_anything() {
        return Err(ApiError::not_found(format!(
            "nothing with event id {event_id} exists"
        )));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

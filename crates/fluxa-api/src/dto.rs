//! The bodies the API answers with, as the structs that are serialized and, by their
//! `ToSchema`, described in the OpenAPI document: a field changes in one place. Also the two
//! request bodies that `fluxa-core` parses itself (to keep a payload's exact bytes), which are
//! only described here.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiErrorCode;
use crate::schemas;

/// One event, as `POST /v1/events` takes it and as each item of a batch.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(
    dead_code,
    reason = "described, never built: fluxa-core parses the body itself"
)]
pub struct EventIn {
    #[schema(value_type = schemas::EventId)]
    pub event_id: String,
    /// What happened, e.g. `order.created`.
    #[schema(value_type = schemas::EventType)]
    pub event_type: String,
    /// The producer.
    #[schema(value_type = Option<schemas::Source>)]
    pub source: Option<String>,
    /// When it happened (RFC 3339); stored normalised to UTC, to microseconds.
    #[schema(format = DateTime)]
    pub occurred_at: Option<String>,
    /// Any JSON value. Its exact bytes in the request are hashed, stored and returned.
    #[schema(value_type = Value)]
    pub payload: serde_json::Value,
    /// The SHA-256 of the payload bytes, if the producer wants it checked (a different
    /// hash: 400 `hash_mismatch`).
    #[schema(value_type = Option<schemas::PayloadSha256>)]
    pub payload_sha256: Option<String>,
}

/// The body of `POST /v1/events/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(
    dead_code,
    reason = "described, never built: fluxa-core parses the body itself"
)]
pub struct BatchIn {
    /// 1 to 1000 items, each judged on its own, so an item may be any JSON value: an
    /// event as `POST /v1/events` takes it (`EventIn`) is validated, hashed and queued,
    /// and any other item (not an object, a member missing, unknown or invalid, a hash
    /// that does not match) gets its own 400 result while the others go ahead.
    #[schema(min_items = 1, max_items = 1000, value_type = Vec<Value>)]
    pub events: Vec<serde_json::Value>,
}

/// 202 from `POST /v1/events`: the event is durably queued.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestAccepted {
    #[schema(value_type = schemas::EventId)]
    pub event_id: String,
    #[schema(value_type = schemas::CorrelationId)]
    pub correlation_id: String,
    #[schema(value_type = schemas::PayloadSha256)]
    pub payload_sha256: String,
    /// The payload's length in bytes.
    pub payload_size: u64,
    #[schema(value_type = schemas::PayloadMode)]
    pub payload_mode: &'static str,
}

/// 200 from `POST /v1/events/batch`: per-item results, in request order.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchOut {
    /// The request's correlation id, which every item shares.
    #[schema(value_type = schemas::CorrelationId)]
    pub correlation_id: String,
    pub accepted: u64,
    pub rejected: u64,
    pub results: Vec<BatchItemOut>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItemOut {
    Accepted(BatchItemAccepted),
    Rejected(BatchItemRejected),
}

/// An item that is durably queued.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItemAccepted {
    /// The item's position in the request.
    pub index: u64,
    /// Always 202.
    #[schema(minimum = 202, maximum = 202)]
    pub status: u16,
    #[schema(value_type = schemas::EventId)]
    pub event_id: String,
    #[schema(value_type = schemas::PayloadSha256)]
    pub payload_sha256: String,
    pub payload_size: u64,
    #[schema(value_type = schemas::PayloadMode)]
    pub payload_mode: &'static str,
}

/// An item that was refused; the others are unaffected.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItemRejected {
    pub index: u64,
    /// 400 (`validation_error`, `hash_mismatch`), 413 (`payload_too_large`) or 503
    /// (`unavailable`: the queue took the other items but not this one).
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    pub error: ApiCodeMessage,
}

/// An API error without a correlation id (the enclosing answer has it).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiCodeMessage {
    pub code: ApiErrorCode,
    pub message: String,
}

/// A processing failure as a status record keeps it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeMessage {
    #[schema(value_type = schemas::ProcessingErrorCode)]
    pub code: String,
    pub message: String,
}

/// 200 from `GET /v1/events/{event_id}/status`: the processor's idempotency record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusOut {
    #[schema(value_type = schemas::EventId)]
    pub event_id: String,
    #[schema(value_type = schemas::ProcessingStatus)]
    pub status: &'static str,
    /// Deliveries that reached the processor.
    pub attempts: u64,
    /// The last failure, if any.
    pub last_error: Option<CodeMessage>,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// 200 from `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[schema(pattern = "^ok$")]
    pub status: &'static str,
}

/// 200 from `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    #[schema(pattern = "^ready$")]
    pub status: &'static str,
    pub checks: ReadyChecks,
}

/// The parts this host has, each `ok` (a host without a part leaves it out).
#[derive(Debug, Default, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadyChecks {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^ok$")]
    pub store: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^ok$")]
    pub queue: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^ok$")]
    pub blob_store: Option<&'static str>,
}

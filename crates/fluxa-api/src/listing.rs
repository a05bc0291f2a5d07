//! What the listing endpoints (`GET /v1/events`, `GET /v1/admin/dlq`) share: the query string's
//! `limit`, its RFC 3339 bounds and its opaque cursor, each refused with a
//! `validation_error` that names the parameter.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use chrono::{DateTime, Utc};
use fluxa_core::cursor::{self, Listing, Position};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The parsed query string, or a 400 naming what is wrong with it.
pub fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|e| ApiError::validation(format!("query: {}", e.body_text())))
}

/// `limit`, 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub fn limit(value: Option<usize>) -> Result<usize, ApiError> {
    match value.unwrap_or(DEFAULT_LIMIT) {
        limit @ 1..=MAX_LIMIT => Ok(limit),
        _ => Err(ApiError::validation(format!(
            "limit: must be 1 to {MAX_LIMIT}"
        ))),
    }
}

/// An RFC 3339 bound such as `since` or `until`.
pub fn time(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|text| {
            DateTime::parse_from_rfc3339(text)
                .map(|at| at.with_timezone(&Utc))
                .map_err(|e| ApiError::validation(format!("{name}: not an RFC 3339 time: {e}")))
        })
        .transpose()
}

/// The fingerprint of a listing's filters, with times in one canonical form so that two
/// spellings of one instant page alike.
pub fn fingerprint(texts: &[Option<&str>], times: &[Option<DateTime<Utc>>]) -> String {
    let times: Vec<Option<String>> = times
        .iter()
        .map(|at| at.map(|at| at.timestamp_micros().to_string()))
        .collect();
    let parts: Vec<Option<&str>> = texts
        .iter()
        .copied()
        .chain(times.iter().map(Option::as_deref))
        .collect();
    cursor::fingerprint(&parts)
}

/// The position `cursor` names, if one was given.
pub fn after(
    listing: Listing,
    filters: &str,
    value: Option<&str>,
) -> Result<Option<Position>, ApiError> {
    value
        .map(|text| {
            cursor::decode(listing, filters, text)
                .map_err(|e| ApiError::validation(format!("cursor: {e}")))
        })
        .transpose()
}

/// The cursor of the next page, if there is one.
pub fn next_cursor(listing: Listing, filters: &str, next: Option<Position>) -> Option<String> {
    next.map(|position| cursor::encode(listing, filters, &position))
}

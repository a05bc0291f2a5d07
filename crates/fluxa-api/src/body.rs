//! Reading JSON request bodies the contract's way: `Content-Type: application/json` or 415,
//! a size limit or 413 (with the body drained so the client sees the answer), shared by every
//! handler that takes a body.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// Checks `Content-Type: application/json` (parameters such as charset allowed).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .is_some_and(|mime| mime.eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ))
    }
}

/// Past the limit we keep reading (and discarding) up to this much more, so the client gets a
/// clean 413 instead of a connection reset mid-upload; beyond it we stop reading.
const DRAIN_CAP: usize = 64 * 1024 * 1024;

/// Reads the whole body, refusing (413) anything over `limit` bytes without keeping it.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|n| n > limit as u64);
    // Sized from Content-Length (when honest and within the limit) so a large body is not
    // copied again each time the buffer would have grown.
    let capacity = declared.filter(|n| *n <= limit as u64).unwrap_or(0);
    let mut buffer = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let mut n_read: usize = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the request body could not be read completely",
            ));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        n_read = n_read.saturating_add(data.len());
        too_large |= n_read > limit;
        if too_large {
            if n_read > limit.saturating_add(DRAIN_CAP) {
                break;
            }
        } else {
            buffer.extend_from_slice(&data);
        }
    }
    if too_large {
        return Err(ApiError::payload_too_large(format!(
            "the request body is over {limit} bytes"
        )));
    }
    Ok(buffer.freeze())
}

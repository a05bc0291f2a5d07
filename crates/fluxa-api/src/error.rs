//! [`ApiError`]: the contract's error body (`{"error": {code, message, correlation_id}}`) and
//! status codes, in one place.

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fluxa_core::ingest::IngestError;
use serde_json::json;

use crate::correlation;

/// An error answer. Internal failures carry only a generic message outward; their cause is
/// logged once, where they are created.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// A backend (queue, blob store, store) is down: 503 with `Retry-After`.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the {what} is unavailable; retry later"),
        )
    }

    /// The request body arrived too slowly (contract section 7): 408.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// The server is at one of the limits it protects itself with (concurrent requests, body
    /// memory): 503 with `Retry-After`, as for a backend outage.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// An unexpected failure. Logs `error` with its cause chain and answers a generic 500.
    #[track_caller]
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        let location = std::panic::Location::caller();
        tracing::error!(
            error.message = %error,
            error.cause_chain = ?error,
            error.location = %location,
            "internal error"
        );
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }

    /// A store failure as the API answers it. An outage is 503 `unavailable`. A statement the
    /// database refused, or a record it holds malformed, is a bug of ours, never the client's
    /// (every id is parsed before a store sees it) and never an outage: 500 `internal`.
    #[track_caller]
    pub fn from_store(error: &fluxa_store::Error) -> Self {
        match error {
            fluxa_store::Error::Unavailable(_) => {
                tracing::warn!(error.cause_chain = ?error, error.message = %error, "store access failed");
                Self::unavailable("store")
            }
            fluxa_store::Error::Rejected(_) | fluxa_store::Error::Corrupt(_) => {
                Self::internal(error)
            }
        }
    }

    /// A queue failure as the API answers it, on the rules of [`ApiError::from_store`].
    #[track_caller]
    pub fn from_queue(error: &fluxa_queue::Error) -> Self {
        match error {
            fluxa_queue::Error::Unavailable(_) => {
                tracing::warn!(error.cause_chain = ?error, error.message = %error, "queue access failed");
                Self::unavailable("queue")
            }
            fluxa_queue::Error::Rejected(_) | fluxa_queue::Error::Corrupt(_) => {
                Self::internal(error)
            }
        }
    }

    /// The JSON body for this error under `correlation_id`.
    pub fn body(&self, correlation_id: &str) -> serde_json::Value {
        json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "correlation_id": correlation_id,
            }
        })
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        let status = match error {
            IngestError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, error.code(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let correlation_id = correlation::current().unwrap_or_default();
        let mut response = (self.status, axum::Json(self.body(&correlation_id))).into_response();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// Parses the one id of a URL path (`/v1/events/{event_id}`, `/v1/admin/dlq/{id}`) with `parse`,
/// before any store sees it. A segment that is not even text once percent-decoded is a malformed
/// request: 400 `validation_error` naming `field`. Text that breaks the id rules can never name
/// anything, so the lookup of `what` simply finds nothing: 404, the same answer as for a
/// well-formed id that names nothing.
pub(crate) fn path_id<T>(
    path: Result<Path<String>, PathRejection>,
    parse: impl FnOnce(&str) -> Result<T, String>,
    field: &str,
    what: &str,
) -> Result<T, ApiError> {
    let Path(text) =
        path.map_err(|_| ApiError::validation(format!("{field}: must be percent-encoded UTF-8")))?;
    parse(&text).map_err(|rule| {
        ApiError::not_found(format!("no {what} with that {field} ({field} {rule})"))
    })
}

pub(crate) async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such route")
}

pub(crate) async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not support that method",
    )
}

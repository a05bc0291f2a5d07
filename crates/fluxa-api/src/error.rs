//! [`ApiError`]: the contract's error body (`{"error": {code, message, correlation_id}}`) and
//! status codes, in one place.

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fluxa_core::ingest::IngestError;
use serde::Serialize;
use utoipa::openapi::{ObjectBuilder, RefOr, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::context;

/// The error codes of contract section 6. Each owns its status, so an answer cannot pair a
/// code with another code's status; its text, its status and the OpenAPI document's tables
/// all come from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiErrorCode {
    InvalidJson,
    ValidationError,
    HashMismatch,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    RequestTimeout,
    Unavailable,
    Internal,
}

impl ApiErrorCode {
    pub const ALL: [Self; 13] = [
        Self::InvalidJson,
        Self::ValidationError,
        Self::HashMismatch,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::Conflict,
        Self::RequestTimeout,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The code as the error body carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::ValidationError => "validation_error",
            Self::HashMismatch => "hash_mismatch",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::RequestTimeout => "request_timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The status every answer with this code has.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson | Self::ValidationError | Self::HashMismatch => {
                StatusCode::BAD_REQUEST
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code for an error answer made without one (an axum rejection): the code of that
    /// status, `validation_error` for any other 4xx and `internal` for any other 5xx.
    pub fn for_status(status: StatusCode) -> Self {
        Self::ALL
            .into_iter()
            .filter(|code| code.status() == status)
            // 400 has three codes; a rejection is about the request's form.
            .find(|code| status != StatusCode::BAD_REQUEST || *code == Self::ValidationError)
            .unwrap_or(if status.is_server_error() {
                Self::Internal
            } else {
                Self::ValidationError
            })
    }
}

impl Serialize for ApiErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialSchema for ApiErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Self::ALL.map(Self::as_str)))
            .description(Some("The error codes of the contract (section 6)."))
            .into()
    }
}

impl ToSchema for ApiErrorCode {
    fn name() -> std::borrow::Cow<'static, str> {
        "ErrorCode".into()
    }
}

/// Every error answer's body.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: ApiErrorCode,
    /// What went wrong; a validation error names the field.
    pub message: String,
    /// The request's correlation id (also in `X-Correlation-ID`).
    #[schema(value_type = crate::schemas::CorrelationId)]
    pub correlation_id: String,
}

/// An error answer. Internal failures carry only a generic message outward; their cause is
/// logged once, where they are created.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ApiErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::ValidationError, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::NotFound, message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::PayloadTooLarge, message)
    }

    /// A backend (queue, blob store, store) is down: 503 with `Retry-After`.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            ApiErrorCode::Unavailable,
            format!("the {what} is unavailable; retry later"),
        )
    }

    /// The request body arrived too slowly (contract section 7): 408.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::RequestTimeout, message)
    }

    /// The server is at one of the limits it protects itself with (concurrent requests, body
    /// memory): 503 with `Retry-After`, as for a backend outage.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::Unavailable, message)
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
        Self::new(ApiErrorCode::Internal, "an internal error occurred")
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

    /// The body for this error under `correlation_id`.
    pub fn body(&self, correlation_id: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
                correlation_id: correlation_id.to_owned(),
            },
        }
    }
}

/// The one mapping of ingest's rule violations to the contract's codes.
impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        let code = match error {
            IngestError::InvalidJson(_) => ApiErrorCode::InvalidJson,
            IngestError::Validation { .. } => ApiErrorCode::ValidationError,
            IngestError::HashMismatch { .. } => ApiErrorCode::HashMismatch,
            IngestError::PayloadTooLarge { .. } => ApiErrorCode::PayloadTooLarge,
        };
        Self::new(code, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let correlation_id = context::correlation_id()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let status = self.status();
        let mut response = (status, axum::Json(self.body(&correlation_id))).into_response();
        match status {
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
        ApiErrorCode::MethodNotAllowed,
        "this route does not support that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_serializes_as_its_text_and_owns_one_status() {
        for code in ApiErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
        let texts: std::collections::HashSet<_> =
            ApiErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(texts.len(), ApiErrorCode::ALL.len());
    }

    #[test]
    fn an_answer_made_without_a_code_gets_the_code_of_its_status() {
        let cases = [
            (StatusCode::BAD_REQUEST, ApiErrorCode::ValidationError),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                ApiErrorCode::ValidationError,
            ),
            (StatusCode::NOT_FOUND, ApiErrorCode::NotFound),
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ApiErrorCode::UnsupportedMediaType,
            ),
            (StatusCode::SERVICE_UNAVAILABLE, ApiErrorCode::Unavailable),
            (StatusCode::BAD_GATEWAY, ApiErrorCode::Internal),
        ];
        for (status, code) in cases {
            assert_eq!(ApiErrorCode::for_status(status), code, "{status}");
        }
    }
}

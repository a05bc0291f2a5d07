//! The outermost middleware: settles the request's correlation id (contract section 1), opens
//! the request's root span, turns a panic into a 500 `internal`, and stamps `X-Correlation-ID`
//! on every response.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fluxa_core::CorrelationId;
use futures::FutureExt;
use tracing::Instrument;

use crate::context;
use crate::error::{ApiError, ApiErrorCode};

pub const HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

pub async fn middleware(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (correlation_id, header_error) = match request.headers().get(&HEADER) {
        None => (CorrelationId::generate(), None),
        Some(value) => match value.to_str().ok().map(CorrelationId::parse) {
            Some(Ok(id)) => (id, None),
            _ => (
                CorrelationId::generate(),
                Some(ApiError::validation(
                    "X-Correlation-ID: must be 1 to 128 characters of [A-Za-z0-9._:-]",
                )),
            ),
        },
    };
    let span = tracing::info_span!(
        "http_request",
        correlation_id = %correlation_id,
        http.method = %method,
        http.path = %path,
    );

    let handled = context::scope(correlation_id.clone(), async move {
        if let Some(error) = header_error {
            return error.into_response();
        }
        match AssertUnwindSafe(next.run(request)).catch_unwind().await {
            Ok(response) => into_contract_error(response).await,
            Err(_) => {
                // The panic hook has already logged the panic message and location.
                tracing::error!("request handler panicked");
                ApiError::new(ApiErrorCode::Internal, "an internal error occurred").into_response()
            }
        }
    });
    let mut response = handled.instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(correlation_id.as_str()) {
        response.headers_mut().insert(HEADER, value);
    }

    let status = response.status();
    let elapsed = started.elapsed();
    // Labels come from fixed sets only, so nothing a client sends can add a series.
    let route = response
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(&method);
    metrics::counter!("fluxa_http_requests_total",
        "method" => method, "route" => route.clone(), "status" => status.as_u16().to_string())
    .increment(1);
    metrics::histogram!("fluxa_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(elapsed);
    span.in_scope(|| {
        tracing::info!(
            http.status = status.as_u16(),
            duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            "request completed"
        );
    });
    response
}

/// Copies the route template the router matched onto the response, where the outer
/// [`middleware`] (which runs before routing) can read it for the metrics' `route` label.
pub async fn stamp_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(matched);
    }
    response
}

/// The `method` label: the standard methods by name, anything invented as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Safety net for errors answered by axum itself (an extractor's rejection, say) rather than
/// through [`ApiError`]: every error body must be the contract's JSON.
async fn into_contract_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let code = ApiErrorCode::for_status(status);
    let message = if status.is_server_error() {
        "an internal error occurred".to_owned()
    } else {
        // Rejection texts are axum's own words about the request, never secrets.
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap_or_default();
        String::from_utf8_lossy(&body).trim().to_owned()
    };
    ApiError::new(code, message).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// Seed invariant 8: a panicking handler becomes a 500 `internal` with the contract's body,
    /// and the message of the panic is not sent to the client.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_internal_with_the_correlation_id() {
        let app = Router::new()
            .route(
                "/boom",
                get(|| async { panic!("secret detail") as &'static str }),
            )
            .layer(axum::middleware::from_fn(middleware));
        let request = Request::get("/boom")
            .header("x-correlation-id", "panic-1")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(response.headers()["x-correlation-id"], "panic-1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert_eq!(body["error"]["correlation_id"], "panic-1");
        assert!(!body.to_string().contains("secret detail"));
    }
}

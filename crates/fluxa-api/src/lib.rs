//! Fluxa's HTTP API. [`app`] builds the one router every host serves: `axum::serve` in the
//! self-hosted binary, the Lambda HTTP adapter later, `tower::ServiceExt::oneshot` in tests.
//!
//! # Layout
//! - [`error`]: [`ApiError`], the only way a handler answers with an error; it owns the mapping
//!   to status codes and the contract's error body.
//! - `correlation`: the outermost middleware: correlation id, request span, panic guard.
//! - `auth`: bearer tokens with scopes, compared in constant time.
//! - `body`: JSON request bodies: content type (415) and size limits (413).
//! - `ingest`, `query`, `admin`, `ops`: one router per resource.
//!
//! **Architecture Invariant:** only this crate knows HTTP. **Architecture Invariant:** the query
//! routes hold an [`EventReader`], which has no write methods (seed invariant 7).

mod admin;
mod auth;
mod body;
mod correlation;
pub mod error;
mod ingest;
mod ops;
mod query;

use std::sync::Arc;

use axum::Router;
use fluxa_blob::BlobStore;
use fluxa_queue::{DeadLetterAdmin, Producer};
use fluxa_store::EventReader;
use metrics_exporter_prometheus::PrometheusHandle;

pub use admin::{dead_letter_json, DeadLetterOut};
pub use auth::{ApiToken, Scope, TokenParseError};
pub use error::ApiError;

/// Request-size limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted payload (`payload_size`), default 10 MiB.
    pub max_payload_bytes: usize,
    /// Largest accepted batch request body, default 32 MiB.
    pub max_batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 10 * 1024 * 1024,
            max_batch_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Ingest's side of the queue.
    pub queue: Arc<dyn Producer>,
    /// Operators' side of the queue (the DLQ routes and the depth gauges).
    pub dead_letters: Arc<dyn DeadLetterAdmin>,
    pub blobs: BlobStore,
    pub reader: Arc<dyn EventReader>,
    pub limits: Limits,
    /// Configured API tokens; empty means authentication is off.
    pub tokens: Arc<Vec<ApiToken>>,
    pub metrics: PrometheusHandle,
}

/// Builds the whole API: every route, the 404/405 fallbacks and the middleware stack.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(ingest::router(&state))
        .merge(query::router(&state))
        .merge(admin::router(&state))
        .merge(ops::router())
        .fallback(error::not_found_fallback)
        .method_not_allowed_fallback(error::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn(correlation::middleware))
        .with_state(state)
}

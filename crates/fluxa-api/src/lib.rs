//! Fluxa's HTTP API. [`app`] builds the one router every host serves: `fluxa-server`'s
//! connection loop in the self-hosted binary, the Lambda functions (through [`app_with`], each
//! with its role's routes), `tower::ServiceExt::oneshot` in tests.
//!
//! # Layout
//! - [`error`]: [`ApiError`], the only way a handler answers with an error; it owns the mapping
//!   to status codes and the contract's error body.
//! - `correlation`: the outermost middleware: correlation id, request span, panic guard.
//! - `auth`: bearer tokens with scopes, compared in constant time.
//! - `body`: JSON request bodies: content type (415) and size limits (413); the middleware that
//!   bounds the body bytes held in memory (503) and a body's minimum data rate (408).
//! - `ingest`, `query`, `admin`, `ops`: one router per resource.
//!
//! **Architecture Invariant:** only this crate knows HTTP. **Architecture Invariant:** the query
//! routes hold an [`EventReader`], which has no write methods (seed invariant 7).

mod admin;
mod auth;
mod body;
mod context;
mod correlation;
mod dto;
pub mod error;
mod ingest;
mod listing;
mod openapi;
mod ops;
mod query;
mod schemas;

use std::sync::Arc;

use axum::Router;
use fluxa_blob::BlobStore;
use fluxa_queue::{DeadLetterAdmin, Producer};
use fluxa_store::{EventReader, StoreAdmin};
use metrics_exporter_prometheus::PrometheusHandle;

pub use auth::{ApiToken, Scope, TokenParseError};
pub use error::ApiError;

/// Request limits: sizes, and how the API protects itself from slow or greedy clients
/// (contract section 7).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted payload (`payload_size`), default 10 MiB.
    pub max_payload_bytes: usize,
    /// Largest accepted batch request body, default 32 MiB.
    pub max_batch_bytes: usize,
    /// Deepest accepted payload nesting (arrays and objects), default 128.
    pub max_payload_depth: usize,
    /// Bytes per second a request body must average once `body_rate_grace` has passed, or the
    /// request gets 408 and its connection is closed; default 1 KiB/s (a 10 MiB upload then
    /// has almost three hours).
    pub min_body_rate: u64,
    /// How long a body may arrive at any pace before `min_body_rate` applies, default 10 s.
    pub body_rate_grace: std::time::Duration,
    /// Requests handled at once (operations endpoints aside); past it, 503 at once rather
    /// than a queue. Default 1024.
    pub max_concurrent_requests: usize,
    /// Bytes of request bodies held in memory across all requests; a body that would pass it
    /// gets 503 before it is read. Default 256 MiB; at least [`Limits::largest_body`].
    pub max_body_memory: usize,
}

impl Limits {
    /// The bounds each payload is validated against.
    pub fn payload(&self) -> fluxa_core::ingest::PayloadLimits {
        fluxa_core::ingest::PayloadLimits {
            max_bytes: self.max_payload_bytes,
            max_depth: self.max_payload_depth,
        }
    }

    /// The largest body any route keeps in memory: a batch, or one event of the largest
    /// payload with its envelope. `max_body_memory` must hold at least this.
    pub fn largest_body(&self) -> usize {
        self.max_batch_bytes.max(
            self.max_payload_bytes
                .saturating_add(ingest::ENVELOPE_ALLOWANCE),
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        let payload = fluxa_core::ingest::PayloadLimits::default();
        Self {
            max_payload_bytes: payload.max_bytes,
            max_batch_bytes: 32 * 1024 * 1024,
            max_payload_depth: payload.max_depth,
            min_body_rate: 1024,
            body_rate_grace: std::time::Duration::from_secs(10),
            max_concurrent_requests: 1024,
            max_body_memory: 256 * 1024 * 1024,
        }
    }
}

/// Everything the handlers share. A part a host does not have is `None`: the Lambda functions
/// each hold only what their role needs (ingest has no database, query no queue and no bucket),
/// and [`app_with`] refuses to serve a route whose parts are missing.
#[derive(Clone)]
pub struct AppState {
    /// Ingest's side of the queue.
    pub queue: Option<Arc<dyn Producer>>,
    /// Operators' side of the queue (the DLQ routes and the depth gauges).
    pub dead_letters: Option<Arc<dyn DeadLetterAdmin>>,
    /// Payloads over the inline limit (ingest writes them, erasure deletes them).
    pub blobs: Option<BlobStore>,
    pub reader: Option<Arc<dyn EventReader>>,
    /// The store's deleting side: idempotency records, erasure (admin routes only).
    pub store_admin: Option<Arc<dyn StoreAdmin>>,
    pub limits: Limits,
    /// Configured API tokens; empty means authentication is off.
    pub tokens: Arc<Vec<ApiToken>>,
    pub metrics: PrometheusHandle,
}

/// A part [`app_with`] needed for the routes it was asked for, and the state did not have.
#[derive(Debug, thiserror::Error)]
#[error("the {routes} routes need {part}, which this host does not have")]
pub struct MissingPart {
    pub routes: &'static str,
    pub part: &'static str,
}

impl AppState {
    pub(crate) fn queue(&self) -> Result<&dyn Producer, ApiError> {
        part(self.queue.as_deref(), "queue")
    }

    pub(crate) fn dead_letters(&self) -> Result<&dyn DeadLetterAdmin, ApiError> {
        part(self.dead_letters.as_deref(), "dead-letter queue")
    }

    pub(crate) fn blobs(&self) -> Result<&BlobStore, ApiError> {
        part(self.blobs.as_ref(), "blob store")
    }

    pub(crate) fn reader(&self) -> Result<&dyn EventReader, ApiError> {
        part(self.reader.as_deref(), "store reader")
    }

    pub(crate) fn store_admin(&self) -> Result<&dyn StoreAdmin, ApiError> {
        part(self.store_admin.as_deref(), "store")
    }

    /// What `routes` needs and this state lacks, if anything.
    fn check(&self, routes: Routes) -> Result<(), MissingPart> {
        let needs: [(bool, &'static str, &'static str, bool); 6] = [
            (routes.ingest, "ingest", "a queue", self.queue.is_some()),
            (
                routes.ingest,
                "ingest",
                "a blob store",
                self.blobs.is_some(),
            ),
            (
                routes.query,
                "query",
                "a store reader",
                self.reader.is_some(),
            ),
            (
                routes.admin,
                "admin",
                "a dead-letter queue",
                self.dead_letters.is_some(),
            ),
            (routes.admin, "admin", "a blob store", self.blobs.is_some()),
            (routes.admin, "admin", "a store", self.store_admin.is_some()),
        ];
        match needs
            .into_iter()
            .find(|(wanted, _, _, has)| *wanted && !has)
        {
            Some((_, routes, part, _)) => Err(MissingPart { routes, part }),
            None => Ok(()),
        }
    }
}

/// A part the routes were built with; its absence is a host wiring bug that [`app_with`]
/// already refused, so it answers 500 rather than panicking.
fn part<'a, T: ?Sized>(part: Option<&'a T>, name: &'static str) -> Result<&'a T, ApiError> {
    part.ok_or_else(|| {
        ApiError::internal(&MissingPart {
            routes: "these",
            part: name,
        })
    })
}

/// Which route groups a host serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routes {
    /// `POST /v1/events`, `POST /v1/events/batch`.
    pub ingest: bool,
    /// `GET /v1/events…`.
    pub query: bool,
    /// `/v1/admin/…`.
    pub admin: bool,
    /// `/healthz`, `/readyz`, `/metrics`: a process's own operations endpoints (a Lambda
    /// function has none; its health and metrics are the platform's).
    pub operations: bool,
}

impl Routes {
    /// Everything: `fluxa serve`.
    pub const ALL: Self = Self {
        ingest: true,
        query: true,
        admin: true,
        operations: true,
    };
    const NONE: Self = Self {
        ingest: false,
        query: false,
        admin: false,
        operations: false,
    };
    /// The ingest function's routes.
    pub const INGEST: Self = Self {
        ingest: true,
        ..Self::NONE
    };
    /// The query function's routes.
    pub const QUERY: Self = Self {
        query: true,
        ..Self::NONE
    };
    /// The admin function's routes.
    pub const ADMIN: Self = Self {
        admin: true,
        ..Self::NONE
    };
}

/// Builds the whole API: every route, the 404/405 fallbacks and the middleware stack.
///
/// # Panics
/// If `state` lacks a part (every part is needed); hosts that hold fewer use [`app_with`].
pub fn app(state: AppState) -> Router {
    app_with(state, Routes::ALL).expect("the full API needs every part of the state")
}

/// Builds the API with only `routes` (everything else is a 404 in the contract's body), after
/// checking that `state` has every part they use. `/v1/openapi.json` is always served.
pub fn app_with(state: AppState, routes: Routes) -> Result<Router, MissingPart> {
    state.check(routes)?;
    // The operations endpoints stay outside the concurrency limit: they read no body, cost
    // little, and are how an orchestrator and an operator see an overloaded server (a liveness
    // probe shed with 503 would get a busy but healthy server restarted).
    let mut limited = Router::new();
    if routes.ingest {
        limited = limited.merge(ingest::router(&state));
    }
    if routes.query {
        limited = limited.merge(query::router(&state));
    }
    if routes.admin {
        limited = limited.merge(admin::router(&state));
    }
    let limited = limited
        .layer(
            // One semaphore across all these routes (not one per route, as the per-service
            // `ConcurrencyLimitLayer` would give); a request beyond it is shed at once
            // rather than left waiting for a slot.
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(shed_error))
                .layer(tower::load_shed::LoadShedLayer::new())
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    state.limits.max_concurrent_requests,
                )),
        )
        .layer(axum::middleware::from_fn_with_state(
            body::BodyGuards::new(&state.limits),
            body::guard,
        ));
    let mut app = Router::new().merge(limited);
    if routes.operations {
        app = app.merge(ops::router());
    }
    Ok(app
        .merge(openapi::router())
        .route_layer(axum::middleware::from_fn(correlation::stamp_route))
        .fallback(error::not_found_fallback)
        .method_not_allowed_fallback(error::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn(correlation::middleware))
        .with_state(state))
}

/// The answer to a request the concurrency limit shed: 503 `unavailable` with `Retry-After`.
async fn shed_error(error: axum::BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("fluxa_http_requests_shed_total").increment(1);
        ApiError::overloaded("the server is handling too many requests; retry later")
    } else {
        ApiError::internal(&*error)
    }
}

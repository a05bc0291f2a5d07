//! What every piece of code handling a request may read about it: its correlation id, settled
//! by the correlation middleware. Kept apart from that middleware so that [`crate::error`]
//! (which puts the id in every error body) and the middleware (which answers with errors) do
//! not import each other.

use std::future::Future;

use fluxa_core::CorrelationId;

tokio::task_local! {
    static CORRELATION_ID: CorrelationId;
}

/// The correlation id of the request being handled, if any.
pub fn correlation_id() -> Option<CorrelationId> {
    CORRELATION_ID.try_with(Clone::clone).ok()
}

/// Runs `handling` with `id` as the request's correlation id.
pub(crate) async fn scope<F: Future>(id: CorrelationId, handling: F) -> F::Output {
    CORRELATION_ID.scope(id, handling).await
}

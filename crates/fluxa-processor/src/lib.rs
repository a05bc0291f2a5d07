//! The processor: [`Processor::process_batch`] takes a batch of queue deliveries to exactly one
//! [`Outcome`] each (contract section 3); [`Outcome::disposition`] says what the queue should do
//! with each; [`settle`] does it on a [`Consumer`]; [`run_workers`] is the self-hosted worker pool
//! around them.
//!
//! `process_batch` is the one function every host calls: the self-hosted workers here, and the
//! Lambda SQS handler, which settles dispositions its own way (partial batch failures).
//!
//! It works in phases, so the cost per event is amortised over the batch:
//! 1. decode every message, once (undecodable: permanent `invalid_message`);
//! 2. claim the events whose payload is in the blob store, in one [`Store::apply`] (a lease,
//!    because fetching a blob happens outside any transaction); an event already processed is
//!    decided as a duplicate or a conflict by its payload hash, and an erased one is dropped,
//!    *before* any blob is read;
//! 3. fetch those blobs concurrently (missing: permanent; blob store down: transient);
//! 4. verify every payload's SHA-256 (mismatch: permanent, no row written);
//! 5. store every event and settle every idempotency record in one [`Store::apply`]: an inline
//!    event is claimed inside that same transaction, so it costs no commit of its own.
//!
//! One bad item never fails its neighbours: if a batch write fails as a whole, its writes are
//! retried one by one.
//!
//! The crate's files: `batch.rs` has the phases, `budget.rs` the blob-memory budget and the
//! grouping it implies, `outcome.rs` the outcomes, their dispositions and [`settle`];
//! `worker.rs`, `pruner.rs` and `sweeper.rs` are the background tasks a self-hosted server runs.

mod batch;
mod budget;
mod outcome;
mod pruner;
mod sweeper;
mod worker;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxa_blob::BlobStore;
use fluxa_core::{ErrorCode, EventId, FailureInfo};
use fluxa_queue::{Delivery, ExhaustedNotice};
use fluxa_store::Store;
use futures::FutureExt;

use budget::BlobBudget;
pub use outcome::{settle, Disposition, Outcome};
pub use pruner::{run_pruner, Pruned, Retention};
pub use sweeper::run_blob_sweeper;
pub use worker::run_workers;

/// Blobs fetched (or deleted) at once by one batch: bounds memory (payloads may be 10 MiB each).
const CONCURRENT_BLOB_FETCHES: usize = 4;

/// Processor settings.
#[derive(Clone, Copy, Debug)]
pub struct ProcessorConfig {
    /// How long a claim on an event id stays exclusive; a crashed worker's claim expires then.
    pub lease: Duration,
    /// First retry delay after a transient failure; doubles with every receive.
    pub backoff_base: Duration,
    /// Upper bound for the retry delay.
    pub backoff_max: Duration,
    /// Bytes of fetched blob payloads held in memory at once, across every batch this
    /// processor runs; a batch whose blobs would pass it waits, and a batch whose blobs alone
    /// pass it is stored in groups that fit.
    pub max_blob_memory: usize,
}

/// Processes deliveries against a store and a blob store.
#[derive(Clone)]
pub struct Processor {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    config: ProcessorConfig,
    /// Fetched blob payloads held in memory, shared by the clones every worker holds.
    blob_memory: BlobBudget,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("config", &self.config)
            .finish()
    }
}

impl Processor {
    pub fn new(store: Arc<dyn Store>, blobs: BlobStore, config: ProcessorConfig) -> Self {
        Self {
            store,
            blobs,
            config,
            blob_memory: BlobBudget::new(config.max_blob_memory),
        }
    }

    /// Decides every delivery's outcome (in order) and makes the store reflect them. Never
    /// touches the queue and never panics outward: a panic inside becomes a transient
    /// `internal` failure for the whole batch.
    pub async fn process_batch(&self, deliveries: &[Delivery]) -> Vec<Outcome> {
        let started = Instant::now();
        let outcomes = AssertUnwindSafe(self.process_batch_inner(deliveries))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(n_messages = deliveries.len(), "processing a batch panicked");
                let error = FailureInfo::new(ErrorCode::Internal, "processing panicked");
                // The panicking attempt may still hold leases; wait them out.
                let retry_after = self.config.lease;
                deliveries
                    .iter()
                    .map(|_| Outcome::Transient {
                        error: error.clone(),
                        retry_after,
                    })
                    .collect()
            });
        metrics::histogram!("fluxa_process_duration_seconds").record(started.elapsed());
        metrics::histogram!("fluxa_process_batch_size").record(deliveries.len() as f64);
        for (delivery, outcome) in deliveries.iter().zip(&outcomes) {
            outcome::record_outcome(delivery, outcome);
        }
        outcomes
    }

    /// Tells the store about messages the queue gave up on, so a record whose last worker died
    /// mid-message ends `failed` rather than `processing`. Best effort: the DLQ entry is the
    /// durable record, and a redrive settles the event either way.
    pub async fn record_exhausted(&self, notices: &[ExhaustedNotice]) {
        let exhausted: Vec<(EventId, FailureInfo)> = notices
            .iter()
            .map(|notice| (notice.event_id.clone(), notice.error.clone()))
            .collect();
        if exhausted.is_empty() {
            return;
        }
        if let Err(e) = self.store.mark_exhausted(&exhausted).await {
            tracing::warn!(
                n_events = exhausted.len(),
                error.cause_chain = ?e,
                error.message = %e,
                "could not mark dead-lettered events failed"
            );
        }
    }

    /// Deletes the blobs of messages that are done with (processed, duplicate or erased), a few
    /// at a time: the payload now lives in the store (or must not live anywhere), and a
    /// redelivery of the same message is decided before any payload is read. Dead-lettered
    /// messages keep theirs.
    pub async fn discard_payloads(&self, deliveries: &[&Delivery]) {
        let keys: Vec<&str> = deliveries
            .iter()
            .filter_map(|delivery| delivery.attributes.blob_key.as_deref())
            .collect();
        for chunk in keys.chunks(CONCURRENT_BLOB_FETCHES) {
            futures::future::join_all(chunk.iter().map(|key| self.discard_payload(key))).await;
        }
    }

    async fn discard_payload(&self, key: &str) {
        if let Err(e) = self.blobs.delete(key).await {
            // Harmless: an unreferenced blob is collected by the sweeper later.
            tracing::warn!(blob_key = %key, error.message = %e, "could not delete a payload blob");
        }
    }
}

#[cfg(test)]
mod tests;

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

mod pruner;
mod sweeper;
mod worker;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluxa_blob::BlobStore;
use fluxa_core::{ErrorCode, EventId, EventMessageV1, FailureInfo, FluxaTask, PayloadHash};
use fluxa_queue::{Consumer, Delivery, ExhaustedNotice};
use fluxa_store::{Lease, NewEvent, Store, Write, WriteAction, WriteResult};
use futures::FutureExt;

pub use pruner::{run_pruner, Pruned, Retention};
pub use sweeper::run_blob_sweeper;
pub use worker::run_workers;

/// Blobs fetched at once by one batch: bounds memory (payloads may be 10 MiB each).
const CONCURRENT_BLOB_FETCHES: usize = 4;

/// How much later than a live lease's expiry a message that met it comes back, so that the
/// holder's own completion (or its expiry) is seen by then.
const LEASE_EXPIRY_MARGIN: Duration = Duration::from_millis(50);

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

/// Blob payload bytes one store transaction carries at most (a single larger payload goes
/// alone). A database client keeps the buffer it encoded its largest statement into for the
/// life of the connection (sqlx's PostgreSQL write buffer never shrinks), so a statement of
/// 128 MiB of payloads would leave every pooled connection holding that much after a flood.
const MAX_GROUP_BLOB_BYTES: u64 = 16 * 1024 * 1024;

/// The blob-memory budget is counted in KiB, so that a `u32` of permits covers terabytes.
const BUDGET_UNIT: u64 = 1024;

/// The one result of processing one delivery (contract section 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First successful processing: one row written.
    Processed,
    /// Already processed with the same payload hash: nothing written.
    Duplicate,
    /// The event was erased by an operator: nothing written, the message (and its blob) goes,
    /// as a duplicate's does, so a late redelivery can never bring the event back.
    Erased,
    /// Already processed with a different payload hash: nothing written, dead-letter.
    Conflict(FailureInfo),
    /// Can never succeed: dead-letter, never retry.
    Permanent(FailureInfo),
    /// Worth another delivery after `retry_after`.
    Transient {
        error: FailureInfo,
        retry_after: Duration,
    },
}

/// What the queue should do with a delivery once its outcome is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done with: delete the message.
    Delete,
    /// Deliver it again after `delay`.
    RetryAfter { delay: Duration, error: FailureInfo },
    /// Move it to the dead-letter queue with its reason.
    DeadLetter(FailureInfo),
}

impl Outcome {
    /// The label used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::Erased => "erased",
            Self::Conflict(_) => "conflict",
            Self::Permanent(_) => "permanent_failure",
            Self::Transient { .. } => "transient_failure",
        }
    }

    /// The queue's part of the contract's outcome table; pure, so every host maps alike.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Processed | Self::Duplicate | Self::Erased => Disposition::Delete,
            Self::Conflict(error) | Self::Permanent(error) => {
                Disposition::DeadLetter(error.clone())
            }
            Self::Transient { error, retry_after } => Disposition::RetryAfter {
                delay: *retry_after,
                error: error.clone(),
            },
        }
    }
}

/// Processes deliveries against a store and a blob store.
#[derive(Clone)]
pub struct Processor {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    config: ProcessorConfig,
    /// Permits of [`BUDGET_UNIT`] bytes of fetched blob payloads; shared by the clones every
    /// worker holds.
    blob_memory: Arc<tokio::sync::Semaphore>,
    blob_memory_permits: u32,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("config", &self.config)
            .finish()
    }
}

/// A decoded delivery on its way through the phases.
struct Item<'d> {
    delivery_idx: usize,
    message: EventMessageV1<'d>,
    /// The lease taken in phase 2 (blob payloads only).
    lease: Option<Lease>,
    /// The payload bytes once known: a slice of the message body, or the fetched blob.
    payload: Option<Bytes>,
    /// The blob store failed to answer (as opposed to the blob being missing).
    blob_unavailable: bool,
}

/// What a phase-5 write was for, to turn its result into an outcome.
enum Intent {
    Store,
    /// A permanent failure recorded as such.
    Fail(FailureInfo),
    /// A transient failure recorded on the record (release, or the last try's `failed`).
    Transient(FailureInfo),
}

impl Processor {
    pub fn new(store: Arc<dyn Store>, blobs: BlobStore, config: ProcessorConfig) -> Self {
        let blob_memory_permits = u32::try_from(budget_units(config.max_blob_memory as u64))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            store,
            blobs,
            config,
            blob_memory: Arc::new(tokio::sync::Semaphore::new(blob_memory_permits as usize)),
            blob_memory_permits,
        }
    }

    /// Decides one delivery's outcome: [`Processor::process_batch`] with a batch of one.
    pub async fn process(&self, delivery: &Delivery) -> Outcome {
        let mut outcomes = self.process_batch(std::slice::from_ref(delivery)).await;
        outcomes.pop().unwrap_or_else(|| Outcome::Transient {
            error: FailureInfo::new(ErrorCode::Internal, "no outcome was decided"),
            retry_after: self.config.backoff_base,
        })
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
            record_outcome(delivery, outcome);
        }
        outcomes
    }

    async fn process_batch_inner(&self, deliveries: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; deliveries.len()];

        // Phase 1: decode.
        let mut items = Vec::with_capacity(deliveries.len());
        for (delivery_idx, delivery) in deliveries.iter().enumerate() {
            match FluxaTask::decode(&delivery.body) {
                Ok(FluxaTask::EventV1(message)) => {
                    let payload = message
                        .payload_inline
                        .map(|raw| delivery.body.slice_ref(raw.get().as_bytes()));
                    items.push(Item {
                        delivery_idx,
                        message,
                        lease: None,
                        payload,
                        blob_unavailable: false,
                    });
                }
                Err(e) => {
                    let error = FailureInfo::new(ErrorCode::InvalidMessage, e.to_string());
                    outcomes[delivery_idx] = Some(self.undecodable(delivery, error).await);
                }
            }
        }

        // Phases 2 to 5 run once per group of items whose blobs fit the memory budget: one
        // group unless the batch's blobs alone would pass it.
        let group_bytes = (self.config.max_blob_memory as u64).min(MAX_GROUP_BLOB_BYTES);
        for group in groups_within(items, group_bytes) {
            self.process_group(deliveries, group, &mut outcomes).await;
        }

        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| Outcome::Transient {
                    error: FailureInfo::new(ErrorCode::Internal, "no outcome was decided"),
                    retry_after: self.config.backoff_base,
                })
            })
            .collect()
    }

    /// Phases 2 to 5 for one group: lease the blob items, fetch their blobs (once the memory
    /// budget holds them), verify everything, then store and settle every record in one
    /// transaction.
    async fn process_group(
        &self,
        deliveries: &[Delivery],
        mut items: Vec<Item<'_>>,
        outcomes: &mut [Option<Outcome>],
    ) {
        let blob_bytes: u64 = items
            .iter()
            .filter(|item| item.payload.is_none())
            .map(|item| item.message.payload_size)
            .sum();
        // Held until the group is stored, when its payloads are dropped. The semaphore is never
        // closed, so acquiring cannot fail; a group larger than the whole budget (a single
        // payload over it) takes all of it.
        let _budget = if blob_bytes > 0 {
            let units = u32::try_from(budget_units(blob_bytes))
                .unwrap_or(u32::MAX)
                .min(self.blob_memory_permits);
            self.blob_memory.acquire_many(units).await.ok()
        } else {
            None
        };

        // Phase 2: lease the events whose payload must be fetched first.
        self.lease_blob_items(deliveries, &mut items, outcomes)
            .await;

        // Phase 3: fetch their blobs concurrently.
        self.fetch_blobs(&mut items).await;

        // Phases 4 and 5: verify, then store and settle every record in one transaction.
        let mut writes = Vec::with_capacity(items.len());
        let mut intents = Vec::with_capacity(items.len());
        for item in items {
            if outcomes[item.delivery_idx].is_some() {
                continue;
            }
            let delivery = &deliveries[item.delivery_idx];
            let (action, intent) = self.decide_write(delivery, &item);
            let message = &item.message;
            writes.push(Write {
                event_id: message.event_id.clone(),
                payload_sha256: message.payload_sha256.clone(),
                correlation_id: message.correlation_id.clone(),
                lease: item.lease,
                action,
            });
            intents.push((item.delivery_idx, intent));
        }
        let results = self.apply_isolating_failures(&writes).await;
        let mut unstored = Vec::new();
        for ((write, (delivery_idx, intent)), result) in writes.iter().zip(intents).zip(results) {
            let delivery = &deliveries[delivery_idx];
            let outcome = match result {
                Ok(result) => self.outcome_of(delivery, write, intent, result).await,
                Err(failure) => {
                    if failure.reachable {
                        unstored.push((delivery, write, failure.error.clone()));
                    }
                    self.transient(delivery, failure.error)
                }
            };
            outcomes[delivery_idx] = Some(outcome);
        }
        self.note_transient_failures(unstored).await;
    }

    /// An undecodable message: permanent, and noted on the event's record when the message's
    /// attributes name a valid event id.
    async fn undecodable(&self, delivery: &Delivery, error: FailureInfo) -> Outcome {
        let event_id = delivery
            .attributes
            .event_id
            .as_deref()
            .and_then(|id| EventId::parse(id).ok());
        if let Some(event_id) = event_id {
            if let Err(e) = self.store.record_error(&event_id, &error).await {
                return self.transient(delivery, store_error(&e));
            }
        }
        Outcome::Permanent(error)
    }

    /// Phase 2: one `apply` of lease writes for the items whose payload is in the blob store.
    async fn lease_blob_items(
        &self,
        deliveries: &[Delivery],
        items: &mut [Item<'_>],
        outcomes: &mut [Option<Outcome>],
    ) {
        let blob_items: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].payload.is_none())
            .collect();
        if blob_items.is_empty() {
            return;
        }
        let writes: Vec<Write> = blob_items
            .iter()
            .map(|&i| {
                let message = &items[i].message;
                Write {
                    event_id: message.event_id.clone(),
                    payload_sha256: message.payload_sha256.clone(),
                    correlation_id: message.correlation_id.clone(),
                    lease: None,
                    action: WriteAction::Lease(self.config.lease),
                }
            })
            .collect();
        let results = self.apply_isolating_failures(&writes).await;
        for (&i, result) in blob_items.iter().zip(results) {
            let item = &mut items[i];
            let delivery = &deliveries[item.delivery_idx];
            let outcome = match result {
                Ok(WriteResult::Applied { lease }) => {
                    item.lease = lease;
                    continue;
                }
                Ok(WriteResult::AlreadyProcessed { payload_sha256 }) => {
                    self.already_processed(&item.message, &payload_sha256).await
                }
                Ok(WriteResult::Busy { until }) => {
                    self.busy(delivery, &item.message.event_id, until)
                }
                Ok(WriteResult::LeaseLost) => self.lease_lost(delivery),
                Ok(WriteResult::Erased) => Outcome::Erased,
                Err(failure) => self.transient(delivery, failure.error),
            };
            outcomes[item.delivery_idx] = Some(outcome);
        }
    }

    /// Phase 3: fetches the blobs of leased items, a few at a time. A missing or unreadable
    /// blob leaves the payload `None`; `blob_unavailable` tells the two apart.
    async fn fetch_blobs(&self, items: &mut [Item<'_>]) {
        let mut waiting: Vec<&mut Item<'_>> = items
            .iter_mut()
            .filter(|item| item.lease.is_some() && item.payload.is_none())
            .collect();
        for chunk in waiting.chunks_mut(CONCURRENT_BLOB_FETCHES) {
            futures::future::join_all(chunk.iter_mut().map(|item| self.fetch_blob(item))).await;
        }
    }

    async fn fetch_blob(&self, item: &mut Item<'_>) {
        let Some(blob) = &item.message.payload_blob else {
            return;
        };
        match self.blobs.get(blob).await {
            Ok(bytes) => item.payload = Some(bytes),
            Err(fluxa_blob::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(
                    event_id = %item.message.event_id,
                    correlation_id = %item.message.correlation_id,
                    error.cause_chain = ?e, error.message = %e,
                    "blob store read failed"
                );
                item.blob_unavailable = true;
            }
        }
    }

    /// Phase 4 for one item: what to write, and what it means.
    fn decide_write(&self, delivery: &Delivery, item: &Item<'_>) -> (WriteAction, Intent) {
        let message = &item.message;
        let Some(payload) = &item.payload else {
            if item.blob_unavailable {
                let error = FailureInfo::new(
                    ErrorCode::BlobStoreUnavailable,
                    "the blob store could not be read",
                );
                if delivery.receives_left == 0 {
                    // The queue dead-letters the message next: the record must not stay
                    // `processing`.
                    return (
                        WriteAction::Fail(exhausted(delivery, &error)),
                        Intent::Transient(error),
                    );
                }
                return (
                    WriteAction::Release(error.clone()),
                    Intent::Transient(error),
                );
            }
            let error = match &message.payload_blob {
                Some(blob) => FailureInfo::new(
                    ErrorCode::BlobMissing,
                    format!("payload blob {} does not exist", blob.key),
                ),
                // FluxaTask::decode already refuses this shape; keep the processor total anyway.
                None => FailureInfo::new(
                    ErrorCode::InvalidMessage,
                    "message carries neither an inline payload nor a blob",
                ),
            };
            return (WriteAction::Fail(error.clone()), Intent::Fail(error));
        };
        let actual = PayloadHash::of(payload);
        if actual != message.payload_sha256 || payload.len() as u64 != message.payload_size {
            let error = FailureInfo::new(
                ErrorCode::HashMismatch,
                format!(
                    "payload of {} bytes hashes to {actual}, the message says {} ({} bytes)",
                    payload.len(),
                    message.payload_sha256,
                    message.payload_size
                ),
            );
            return (WriteAction::Fail(error.clone()), Intent::Fail(error));
        }
        let event = NewEvent {
            event_type: message.event_type.clone(),
            source: message.source.clone(),
            occurred_at: message.occurred_at,
            payload: payload.clone(),
            payload_mode: message.payload_mode,
            received_at: message.received_at,
        };
        (WriteAction::Store(event), Intent::Store)
    }

    /// Writes the database refused leave no trace of their own (an inline event's claim was
    /// part of the failed transaction), so note each failed attempt on its record: the status
    /// API then shows the attempts and the last error, and on the last receive the record
    /// ends `failed` rather than missing. Best effort, only on the failure path, and not when
    /// the store is out of reach (the note could not be written either).
    async fn note_transient_failures(&self, failed: Vec<(&Delivery, &Write, FailureInfo)>) {
        let notes: Vec<Write> = failed
            .into_iter()
            .map(|(delivery, write, error)| {
                let action = if delivery.receives_left == 0 {
                    WriteAction::Fail(exhausted(delivery, &error))
                } else {
                    WriteAction::Release(error)
                };
                Write {
                    action,
                    ..write.clone()
                }
            })
            .collect();
        // Errors were logged inside; the queue's redelivery and redrive carry on regardless.
        let _ = self.apply_isolating_failures(&notes).await;
    }

    /// Turns a phase-5 write's result into the delivery's outcome.
    async fn outcome_of(
        &self,
        delivery: &Delivery,
        write: &Write,
        intent: Intent,
        result: WriteResult,
    ) -> Outcome {
        match result {
            WriteResult::Applied { .. } => match intent {
                Intent::Store => Outcome::Processed,
                Intent::Fail(error) => Outcome::Permanent(error),
                Intent::Transient(error) => self.transient(delivery, error),
            },
            WriteResult::AlreadyProcessed { payload_sha256 } => {
                self.conflict_or_duplicate(&write.event_id, &write.payload_sha256, &payload_sha256)
                    .await
            }
            WriteResult::Busy { until } => self.busy(delivery, &write.event_id, until),
            WriteResult::LeaseLost => self.lease_lost(delivery),
            // Whatever this delivery would have written (the event, or a failure it met on
            // the way, such as a hash mismatch), the event is erased: nothing to keep, and no
            // dead letter to hold its payload either.
            WriteResult::Erased => Outcome::Erased,
        }
    }

    async fn already_processed(
        &self,
        message: &EventMessageV1<'_>,
        stored: &PayloadHash,
    ) -> Outcome {
        self.conflict_or_duplicate(&message.event_id, &message.payload_sha256, stored)
            .await
    }

    /// The event is stored already: the same payload is a duplicate, another is a conflict
    /// (noted on the record, which otherwise stays `processed`).
    async fn conflict_or_duplicate(
        &self,
        event_id: &EventId,
        ours: &PayloadHash,
        stored: &PayloadHash,
    ) -> Outcome {
        if ours == stored {
            return Outcome::Duplicate;
        }
        let error = FailureInfo::new(
            ErrorCode::EventIdConflict,
            format!(
                "event {event_id} was already processed with payload_sha256 {stored}; this \
                 message has {ours}"
            ),
        );
        if let Err(e) = self.store.record_error(event_id, &error).await {
            return Outcome::Transient {
                error: store_error(&e),
                retry_after: self.config.backoff_base,
            };
        }
        Outcome::Conflict(error)
    }

    /// Another worker holds a live lease on the event.
    fn busy(
        &self,
        delivery: &Delivery,
        event_id: &EventId,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Outcome {
        let error = FailureInfo::new(
            ErrorCode::LeaseHeld,
            format!("another worker holds the lease on {event_id}"),
        );
        // The holder usually finishes within moments, so retry on the normal back-off; but make
        // the last allowed receive wait out the lease, so a holder that died is taken over
        // instead of this message being dead-lettered.
        let backoff = self.backoff(delivery.receive_count);
        let retry_after = if delivery.receives_left <= 1 {
            let lease_left = (until - chrono::Utc::now()).to_std().unwrap_or_default();
            lease_left.max(backoff) + LEASE_EXPIRY_MARGIN
        } else {
            backoff
        };
        Outcome::Transient { error, retry_after }
    }

    fn lease_lost(&self, delivery: &Delivery) -> Outcome {
        self.transient(
            delivery,
            FailureInfo::new(
                ErrorCode::LeaseHeld,
                "the lease expired and another worker took the event over",
            ),
        )
    }

    /// Applies `writes` in one transaction. If the database refused the batch, applies them one
    /// by one so that one write it refuses cannot fail its neighbours; if the store is out of
    /// reach, every write fails at once (retrying them one by one would only wait out a
    /// connection timeout per write).
    async fn apply_isolating_failures(
        &self,
        writes: &[Write],
    ) -> Vec<Result<WriteResult, StoreFailure>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let error = match self.store.apply(writes.to_vec()).await {
            Ok(results) => return results.into_iter().map(Ok).collect(),
            Err(e) => e,
        };
        if writes.len() == 1 || !matches!(error, fluxa_store::Error::Rejected(_)) {
            let failure = StoreFailure::of(&error);
            return writes.iter().map(|_| Err(failure.clone())).collect();
        }
        tracing::warn!(
            n_writes = writes.len(),
            error.cause_chain = ?error, error.message = %error,
            "a batch write was refused; retrying its writes one by one"
        );
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let result = match self.store.apply(vec![write.clone()]).await {
                Ok(mut one) => one.pop().ok_or_else(|| StoreFailure {
                    error: FailureInfo::new(ErrorCode::Internal, "no write result"),
                    reachable: true,
                }),
                Err(e) => Err(StoreFailure::of(&e)),
            };
            results.push(result);
        }
        results
    }

    fn transient(&self, delivery: &Delivery, error: FailureInfo) -> Outcome {
        Outcome::Transient {
            error,
            retry_after: self.backoff(delivery.receive_count),
        }
    }

    /// Exponential back-off: base, 2×base, 4×base, … capped at `backoff_max`.
    fn backoff(&self, receive_count: u32) -> Duration {
        // 2^16 × any sensible base is past any sensible cap; the bound keeps the shift defined.
        let exponent = receive_count.saturating_sub(1).min(16);
        self.config
            .backoff_base
            .saturating_mul(1 << exponent)
            .min(self.config.backoff_max)
    }

    /// Tells the store about messages the queue gave up on, so a record whose last worker died
    /// mid-message ends `failed` rather than `processing`. Best effort: the DLQ entry is the
    /// durable record, and a redrive settles the event either way.
    pub async fn record_exhausted(&self, notices: &[ExhaustedNotice]) {
        let exhausted: Vec<(EventId, FailureInfo)> = notices
            .iter()
            .filter_map(|notice| {
                let event_id = EventId::parse(&notice.event_id).ok()?;
                Some((event_id, notice.error.clone()))
            })
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

/// A write that did not apply: the failure to report, and whether the store answered at all.
#[derive(Clone, Debug)]
struct StoreFailure {
    error: FailureInfo,
    reachable: bool,
}

impl StoreFailure {
    fn of(error: &fluxa_store::Error) -> Self {
        Self {
            error: store_error(error),
            reachable: matches!(error, fluxa_store::Error::Rejected(_)),
        }
    }
}

/// What the record says once the queue will dead-letter a message after this last failure.
fn exhausted(delivery: &Delivery, last: &FailureInfo) -> FailureInfo {
    FailureInfo::new(
        ErrorCode::RetriesExhausted,
        format!(
            "gave up after {} receives; last error: {}: {}",
            delivery.receive_count, last.code, last.message
        ),
    )
}

fn budget_units(bytes: u64) -> u64 {
    bytes.div_ceil(BUDGET_UNIT)
}

/// Splits a batch's items into groups whose blob payloads (by their declared sizes) fit in
/// `budget` bytes together, keeping their order; inline items, already in memory with their
/// message, go with the first group. Every group holds at least one item.
fn groups_within(items: Vec<Item<'_>>, budget: u64) -> Vec<Vec<Item<'_>>> {
    let mut groups: Vec<Vec<Item<'_>>> = vec![Vec::new()];
    let mut blob_bytes = 0u64;
    let (inline, blob): (Vec<_>, Vec<_>) = items.into_iter().partition(|i| i.payload.is_some());
    groups[0].extend(inline);
    for item in blob {
        let size = item.message.payload_size;
        if blob_bytes > 0 && blob_bytes.saturating_add(size) > budget {
            groups.push(Vec::new());
            blob_bytes = 0;
        }
        blob_bytes = blob_bytes.saturating_add(size);
        groups.last_mut().expect("groups is never empty").push(item);
    }
    groups.retain(|group| !group.is_empty());
    groups
}

fn store_error(error: &fluxa_store::Error) -> FailureInfo {
    tracing::warn!(error.cause_chain = ?error, error.message = %error, "store operation failed");
    FailureInfo::new(
        ErrorCode::StoreUnavailable,
        "the store could not be written or read",
    )
}

/// Logs and counts one outcome, in a span that carries the message's ids (invariant 9).
fn record_outcome(delivery: &Delivery, outcome: &Outcome) {
    let span = tracing::info_span!(
        "process_message",
        message_id = %delivery.message_id,
        receive_count = delivery.receive_count,
        event_id = delivery.attributes.event_id.as_deref(),
        correlation_id = delivery.attributes.correlation_id.as_deref(),
    );
    let _entered = span.enter();
    match outcome {
        Outcome::Processed => {
            metrics::counter!("fluxa_events_processed_total").increment(1);
            tracing::info!(outcome = outcome.name(), "event processed");
        }
        Outcome::Duplicate => {
            metrics::counter!("fluxa_events_duplicate_total").increment(1);
            tracing::info!(outcome = outcome.name(), "duplicate delivery ignored");
        }
        Outcome::Erased => {
            metrics::counter!("fluxa_events_erased_redelivery_total").increment(1);
            tracing::info!(
                outcome = outcome.name(),
                "erased event's redelivery dropped"
            );
        }
        Outcome::Conflict(error) | Outcome::Permanent(error) => {
            metrics::counter!("fluxa_processing_failures_total",
                "class" => "permanent", "code" => error.code.clone())
            .increment(1);
            tracing::error!(
                outcome = outcome.name(),
                error.code = %error.code,
                error.message = %error.message,
                "event failed permanently; dead-lettering"
            );
        }
        Outcome::Transient { error, retry_after } => {
            metrics::counter!("fluxa_processing_failures_total",
                "class" => "transient", "code" => error.code.clone())
            .increment(1);
            tracing::warn!(
                outcome = outcome.name(),
                error.code = %error.code,
                error.message = %error.message,
                retry_after_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
                "event failed transiently; will retry"
            );
        }
    }
}

/// Carries out every delivery's disposition on `consumer`: the deletes in one round trip, the
/// retries and dead-letter moves one by one. Returns one result per delivery, so the host sees
/// every failure to apply a disposition (a Lambda turns them into batch item failures).
pub async fn settle(
    consumer: &dyn Consumer,
    deliveries: &[Delivery],
    outcomes: &[Outcome],
) -> Vec<Result<(), Arc<fluxa_queue::Error>>> {
    let mut results = vec![Ok(()); deliveries.len()];
    let mut deletes: HashMap<usize, &Delivery> = HashMap::new();
    for (delivery_idx, (delivery, outcome)) in deliveries.iter().zip(outcomes).enumerate() {
        let result = match outcome.disposition() {
            Disposition::Delete => {
                deletes.insert(delivery_idx, delivery);
                continue;
            }
            Disposition::RetryAfter { delay, error } => {
                consumer.retry_later(delivery, delay, &error).await
            }
            Disposition::DeadLetter(error) => consumer.dead_letter(delivery, &error).await,
        };
        results[delivery_idx] = result.map_err(Arc::new);
    }
    if !deletes.is_empty() {
        let batch: Vec<&Delivery> = deletes.values().copied().collect();
        if let Err(e) = consumer.delete_many(&batch).await {
            let e = Arc::new(e);
            for delivery_idx in deletes.keys() {
                results[*delivery_idx] = Err(Arc::clone(&e));
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use chrono::Utc;
    use fluxa_core::task::EventHeader;
    use fluxa_core::{CorrelationId, EventType};
    use fluxa_queue::MessageAttributes;
    use fluxa_store::Result;
    use serde_json::value::RawValue;

    use super::*;

    /// A store whose every batch answer is scripted by the test, and that counts the batches.
    struct ScriptedStore {
        apply: fn() -> Result<WriteResult>,
        n_applies: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Store for ScriptedStore {
        async fn apply(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
            self.n_applies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            writes.iter().map(|_| (self.apply)()).collect()
        }
        async fn record_error(&self, _: &EventId, _: &FailureInfo) -> Result<()> {
            Ok(())
        }
        async fn mark_exhausted(&self, _: &[(EventId, FailureInfo)]) -> Result<()> {
            Ok(())
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    fn processor(apply: fn() -> Result<WriteResult>) -> (tempfile::TempDir, Processor) {
        let (dir, processor, _) = counted_processor(apply);
        (dir, processor)
    }

    fn counted_processor(
        apply: fn() -> Result<WriteResult>,
    ) -> (tempfile::TempDir, Processor, Arc<ScriptedStore>) {
        counted_processor_with_budget(apply, 64 * 1024 * 1024)
    }

    fn counted_processor_with_budget(
        apply: fn() -> Result<WriteResult>,
        max_blob_memory: usize,
    ) -> (tempfile::TempDir, Processor, Arc<ScriptedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ScriptedStore {
            apply,
            n_applies: Default::default(),
        });
        let processor = Processor::new(
            Arc::clone(&store) as Arc<dyn Store>,
            BlobStore::local(dir.path()).unwrap(),
            ProcessorConfig {
                lease: Duration::from_secs(30),
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                max_blob_memory,
            },
        );
        (dir, processor, store)
    }

    fn delivery(receive_count: u32, payload: &str, claimed: &[u8]) -> Delivery {
        let header = EventHeader {
            event_id: EventId::parse("e").unwrap(),
            event_type: EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            correlation_id: CorrelationId::parse("c").unwrap(),
            received_at: Utc::now(),
            payload_sha256: PayloadHash::of(claimed),
            payload_size: claimed.len() as u64,
        };
        let raw = RawValue::from_string(payload.into()).unwrap();
        let message = EventMessageV1::inline(header, &raw);
        Delivery {
            message_id: "m".into(),
            receipt: "r".into(),
            body: FluxaTask::EventV1(message).encode().into(),
            attributes: MessageAttributes::default(),
            receive_count,
            receives_left: 3u32.saturating_sub(receive_count),
            enqueued_at: Utc::now(),
        }
    }

    /// A first delivery whose `payload` is in `blobs`.
    async fn blob_delivery(blobs: &BlobStore, event_id: &str, payload: &[u8]) -> Delivery {
        let event_id = EventId::parse(event_id).unwrap();
        let key = BlobStore::new_key(&event_id);
        let blob = blobs
            .put(&key, Bytes::copy_from_slice(payload))
            .await
            .unwrap();
        let header = EventHeader {
            event_id,
            event_type: EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            correlation_id: CorrelationId::parse("c").unwrap(),
            received_at: Utc::now(),
            payload_sha256: PayloadHash::of(payload),
            payload_size: payload.len() as u64,
        };
        Delivery {
            body: FluxaTask::EventV1(EventMessageV1::in_blob(header, blob))
                .encode()
                .into(),
            ..good(1)
        }
    }

    fn good(receive_count: u32) -> Delivery {
        delivery(receive_count, "1", b"1")
    }

    /// Seed invariant 8: a panic inside processing is caught and becomes a retry, not a crash.
    #[tokio::test]
    async fn a_panic_while_processing_becomes_a_transient_internal_failure() {
        let (_dir, panicking) = processor(|| panic!("store exploded"));
        let outcome = panicking.process(&good(1)).await;
        let Outcome::Transient { error, .. } = outcome else {
            panic!("expected a transient failure, got {outcome:?}");
        };
        assert_eq!(error.code, "internal");
    }

    /// Seed invariant 6: store errors are transient and back off exponentially up to the cap.
    #[tokio::test]
    async fn a_store_error_is_transient_with_exponential_backoff() {
        let (_dir, failing) = processor(|| Err(fluxa_store::Error::Corrupt("boom".into())));
        let mut delays = Vec::new();
        for receive_count in 1..=6 {
            match failing.process(&good(receive_count)).await {
                Outcome::Transient { error, retry_after } => {
                    assert_eq!(error.code, "store_unavailable");
                    delays.push(retry_after.as_millis());
                }
                other => panic!("expected transient, got {other:?}"),
            }
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[tokio::test]
    async fn a_busy_event_is_retried_soon_but_its_last_try_waits_out_the_lease() {
        let (_dir, busy) = processor(|| {
            Ok(WriteResult::Busy {
                until: Utc::now() + chrono::Duration::seconds(10),
            })
        });
        let Outcome::Transient { retry_after, .. } = busy.process(&good(1)).await else {
            panic!("expected transient");
        };
        assert!(retry_after < Duration::from_secs(1));
        let Outcome::Transient { retry_after, .. } = busy.process(&good(2)).await else {
            panic!("expected transient");
        };
        assert!(retry_after >= Duration::from_secs(9), "{retry_after:?}");
    }

    /// Seed invariant 3: a payload that does not hash to what the message says is permanent.
    #[tokio::test]
    async fn in_a_batch_a_corrupt_payload_fails_alone_and_its_neighbours_are_processed() {
        let (_dir, storing) = processor(|| Ok(WriteResult::Applied { lease: None }));
        let batch = [good(1), delivery(1, "2", b"1"), good(1)];
        let outcomes = storing.process_batch(&batch).await;
        assert_eq!(outcomes[0], Outcome::Processed);
        assert!(
            matches!(&outcomes[1], Outcome::Permanent(e) if e.code == "hash_mismatch"),
            "{:?}",
            outcomes[1]
        );
        assert_eq!(outcomes[2], Outcome::Processed);
    }

    #[tokio::test]
    async fn a_refused_batch_is_retried_write_by_write_but_an_unreachable_store_is_not() {
        let refused = || {
            Err(fluxa_store::Error::rejected(std::io::Error::other(
                "no table",
            )))
        };
        let (_dir, refusing, store) = counted_processor(refused);
        refusing.process_batch(&[good(1), good(1), good(1)]).await;
        // The batch, its three writes alone, then the notes of the failed attempts (a batch
        // and its three writes again).
        assert_eq!(
            store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
            8
        );

        let down = || {
            Err(fluxa_store::Error::unavailable(std::io::Error::other(
                "down",
            )))
        };
        let (_dir, unreachable, store) = counted_processor(down);
        let outcomes = unreachable
            .process_batch(&[good(1), good(1), good(1)])
            .await;
        assert!(outcomes.iter().all(
            |o| matches!(o, Outcome::Transient { error, .. } if error.code == "store_unavailable")
        ));
        assert_eq!(
            store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "an unreachable store must not be asked once per write"
        );
    }

    #[tokio::test]
    async fn a_batch_whose_blobs_pass_the_memory_budget_is_stored_in_groups_that_fit() {
        let applied = || {
            Ok(WriteResult::Applied {
                lease: Some(Lease {
                    event_id: EventId::parse("e").unwrap(),
                    token: "t".into(),
                    attempts: 1,
                }),
            })
        };
        // 3 KiB of budget; blobs of 2 KiB each: one blob per group.
        let (dir, processor, store) = counted_processor_with_budget(applied, 3 * 1024);
        let blobs = BlobStore::local(dir.path()).unwrap();
        let payload = format!("\"{}\"", "x".repeat(2046));
        let mut batch = vec![good(1), good(1)];
        for i in 0..3 {
            batch.push(blob_delivery(&blobs, &format!("b{i}"), payload.as_bytes()).await);
        }
        let outcomes = processor.process_batch(&batch).await;
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Processed),
            "{outcomes:?}"
        );
        // Three groups (the inline events ride with the first), each a lease and a store.
        assert_eq!(
            store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
            6
        );

        // Within the budget, the whole batch is one group.
        let (dir, processor, store) = counted_processor_with_budget(applied, 64 * 1024);
        let blobs = BlobStore::local(dir.path()).unwrap();
        let mut batch = vec![good(1)];
        for i in 0..3 {
            batch.push(blob_delivery(&blobs, &format!("b{i}"), payload.as_bytes()).await);
        }
        processor.process_batch(&batch).await;
        assert_eq!(
            store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    /// Contract section 8: an erased event's late redelivery is dropped like a duplicate (the
    /// message is deleted, never dead-lettered), whether it carries its payload inline or in a
    /// blob; a blob payload is never read, is not stored, and is discarded with the message.
    #[tokio::test]
    async fn an_erased_events_redelivery_is_dropped_and_its_blob_discarded_without_storing() {
        let (dir, processor, store) = counted_processor(|| Ok(WriteResult::Erased));
        let blobs = BlobStore::local(dir.path()).unwrap();
        let mut in_blob = blob_delivery(&blobs, "erased-blob", b"\"big\"").await;
        let FluxaTask::EventV1(message) = FluxaTask::decode(&in_blob.body).unwrap();
        let blob = message.payload_blob.clone().expect("a blob delivery");
        in_blob.attributes.blob_key = Some(blob.key.clone());
        let batch = [good(1), in_blob];
        let outcomes = processor.process_batch(&batch).await;
        assert_eq!(outcomes, vec![Outcome::Erased, Outcome::Erased]);
        assert!(outcomes
            .iter()
            .all(|outcome| outcome.disposition() == Disposition::Delete));
        // The blob item's lease answered `Erased`, so it never reached the store phase: one
        // apply for the leases, one for the inline event.
        assert_eq!(
            store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // What the worker does with every deleted message.
        let done: Vec<&Delivery> = batch.iter().collect();
        processor.discard_payloads(&done).await;
        assert!(
            matches!(
                blobs.get(&blob).await,
                Err(fluxa_blob::Error::NotFound { .. })
            ),
            "the erased event's blob must go with its message"
        );
    }

    #[test]
    fn every_outcome_maps_to_the_disposition_of_the_contracts_table() {
        let error = FailureInfo::new(ErrorCode::HashMismatch, "x");
        assert_eq!(Outcome::Processed.disposition(), Disposition::Delete);
        assert_eq!(Outcome::Duplicate.disposition(), Disposition::Delete);
        assert_eq!(Outcome::Erased.disposition(), Disposition::Delete);
        assert_eq!(
            Outcome::Conflict(error.clone()).disposition(),
            Disposition::DeadLetter(error.clone())
        );
        assert_eq!(
            Outcome::Permanent(error.clone()).disposition(),
            Disposition::DeadLetter(error.clone())
        );
        assert_eq!(
            Outcome::Transient {
                error: error.clone(),
                retry_after: Duration::from_secs(2)
            }
            .disposition(),
            Disposition::RetryAfter {
                delay: Duration::from_secs(2),
                error
            }
        );
    }
}

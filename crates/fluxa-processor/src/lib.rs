//! The processor: [`Processor::process`] takes one queue delivery to exactly one [`Outcome`]
//! (contract section 3), and [`run_workers`] is the self-hosted worker pool around it.
//!
//! `process` is the one function every host calls: the embedded/self-hosted workers here, and
//! the Lambda SQS handler, which settles outcomes its own way (partial batch failures).
//!
//! The order of checks is what keeps seed invariants 1, 2, 3 and 6:
//! 1. decode the message (undecodable: permanent `invalid_message`);
//! 2. claim the event id in the store (already processed: duplicate or conflict, decided by the
//!    payload hash *before* touching the payload, so a redelivered message never needs its blob);
//! 3. load the payload (missing blob: permanent; blob store down: transient);
//! 4. verify the SHA-256 (mismatch: permanent, no row written);
//! 5. insert the row and mark the record processed in one transaction, if the lease is still ours.

mod sweeper;
mod worker;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxa_blob::BlobStore;
use fluxa_core::{ErrorCode, EventId, EventMessageV1, FailureInfo, FluxaTask, PayloadHash};
use fluxa_queue::{Delivery, Queue};
use fluxa_store::{Claim, ClaimRequest, Completion, Lease, NewEvent, Store};
use futures::FutureExt;
use tracing::{field, Instrument};

pub use sweeper::{run_blob_sweeper, sweep_orphan_blobs};
pub use worker::run_workers;

/// Processor settings.
#[derive(Clone, Copy, Debug)]
pub struct ProcessorConfig {
    /// How long a claim on an event id stays exclusive; a crashed worker's claim expires then.
    pub lease: Duration,
    /// The queue's receive limit; on the last receive a transient failure marks the record
    /// `failed` (`retries_exhausted`) because the queue will dead-letter the message next.
    pub max_receives: u32,
    /// First retry delay after a transient failure; doubles with every receive.
    pub backoff_base: Duration,
    /// Upper bound for the retry delay.
    pub backoff_max: Duration,
}

/// The one result of processing one delivery (contract section 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First successful processing: one row written.
    Processed,
    /// Already processed with the same payload hash: nothing written.
    Duplicate,
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

impl Outcome {
    /// The label used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::Conflict(_) => "conflict",
            Self::Permanent(_) => "permanent_failure",
            Self::Transient { .. } => "transient_failure",
        }
    }
}

/// Processes deliveries against a store and a blob store.
#[derive(Clone)]
pub struct Processor {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    config: ProcessorConfig,
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
        }
    }

    /// Decides one delivery's outcome and makes the store reflect it. Never touches the queue
    /// and never panics outward: a panic inside becomes a transient `internal` failure.
    pub async fn process(&self, delivery: &Delivery) -> Outcome {
        let span = tracing::info_span!(
            "process_message",
            message_id = %delivery.message_id,
            receive_count = delivery.receive_count,
            event_id = field::Empty,
            correlation_id = field::Empty,
        );
        if let Some(event_id) = &delivery.attributes.event_id {
            span.record("event_id", event_id.as_str());
        }
        if let Some(correlation_id) = &delivery.attributes.correlation_id {
            span.record("correlation_id", correlation_id.as_str());
        }
        let started = Instant::now();
        let outcome = AssertUnwindSafe(self.process_inner(delivery))
            .catch_unwind()
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| Outcome::Transient {
                error: FailureInfo::new(ErrorCode::Internal, "processing panicked"),
                // The panicking attempt may still hold the lease; wait it out.
                retry_after: self.config.lease,
            });
        metrics::histogram!("fluxa_process_duration_seconds").record(started.elapsed());
        span.in_scope(|| record_outcome(&outcome));
        outcome
    }

    async fn process_inner(&self, delivery: &Delivery) -> Outcome {
        let message = match FluxaTask::decode(&delivery.body) {
            Ok(FluxaTask::EventV1(message)) => message,
            Err(e) => {
                let error = FailureInfo::new(ErrorCode::InvalidMessage, e.to_string());
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
                return Outcome::Permanent(error);
            }
        };
        let span = tracing::Span::current();
        span.record("event_id", message.event_id.as_str());
        span.record("correlation_id", message.correlation_id.as_str());

        let claim = self
            .store
            .claim(ClaimRequest {
                event_id: &message.event_id,
                payload_sha256: &message.payload_sha256,
                correlation_id: &message.correlation_id,
                lease: self.config.lease,
            })
            .await;
        let lease = match claim {
            Err(e) => return self.transient(delivery, store_error(&e)),
            Ok(Claim::Acquired(lease)) => lease,
            Ok(Claim::AlreadyProcessed { payload_sha256 })
                if payload_sha256 == message.payload_sha256.as_str() =>
            {
                return Outcome::Duplicate;
            }
            Ok(Claim::AlreadyProcessed { payload_sha256 }) => {
                let error = FailureInfo::new(
                    ErrorCode::EventIdConflict,
                    format!(
                        "event {} was already processed with payload_sha256 {}; this message has {}",
                        message.event_id, payload_sha256, message.payload_sha256
                    ),
                );
                if let Err(e) = self.store.record_error(&message.event_id, &error).await {
                    return self.transient(delivery, store_error(&e));
                }
                return Outcome::Conflict(error);
            }
            Ok(Claim::Busy { until }) => {
                let error = FailureInfo::new(
                    ErrorCode::LeaseHeld,
                    format!("another worker holds the lease on {}", message.event_id),
                );
                // The holder usually finishes within moments, so retry on the normal back-off;
                // but make the last allowed receive wait out the lease, so a holder that died
                // is taken over instead of this message being dead-lettered.
                let backoff = self.backoff(delivery.receive_count);
                let retry_after = if delivery.receive_count + 1 >= self.config.max_receives {
                    let lease_left = (until - chrono::Utc::now()).to_std().unwrap_or_default();
                    lease_left.max(backoff) + Duration::from_millis(50)
                } else {
                    backoff
                };
                return Outcome::Transient { error, retry_after };
            }
        };

        let payload = match self.load_payload(&message).await {
            Ok(payload) => payload,
            Err(PayloadError::Missing(error)) => return self.fail(&lease, error).await,
            Err(PayloadError::Unavailable(error)) => {
                return self.give_back(delivery, &lease, error).await
            }
        };
        let actual = PayloadHash::of(&payload);
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
            return self.fail(&lease, error).await;
        }

        let event = NewEvent {
            event_id: message.event_id.clone(),
            event_type: message.event_type.to_string(),
            source: message.source.as_ref().map(ToString::to_string),
            occurred_at: message.occurred_at,
            payload,
            payload_sha256: message.payload_sha256.clone(),
            payload_mode: message.payload_mode,
            correlation_id: message.correlation_id.clone(),
            received_at: message.received_at,
        };
        match self.store.complete(&lease, event).await {
            Ok(Completion::Stored) => Outcome::Processed,
            Ok(Completion::LeaseLost) => Outcome::Transient {
                error: FailureInfo::new(
                    ErrorCode::LeaseHeld,
                    "the lease expired and another worker took the event over",
                ),
                retry_after: self.backoff(delivery.receive_count),
            },
            Err(e) => self.give_back(delivery, &lease, store_error(&e)).await,
        }
    }

    async fn load_payload(&self, message: &EventMessageV1) -> Result<Vec<u8>, PayloadError> {
        if let Some(inline) = &message.payload_inline {
            return Ok(inline.get().as_bytes().to_vec());
        }
        let Some(blob) = &message.payload_blob else {
            // FluxaTask::decode already refuses this shape; keep the processor total anyway.
            return Err(PayloadError::Missing(FailureInfo::new(
                ErrorCode::InvalidMessage,
                "message carries neither an inline payload nor a blob",
            )));
        };
        match self.blobs.get(blob).await {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(fluxa_blob::Error::NotFound { key }) => {
                Err(PayloadError::Missing(FailureInfo::new(
                    ErrorCode::BlobMissing,
                    format!("payload blob {key} does not exist"),
                )))
            }
            Err(e) => {
                tracing::warn!(error.cause_chain = ?e, error.message = %e, "blob store read failed");
                Err(PayloadError::Unavailable(FailureInfo::new(
                    ErrorCode::BlobStoreUnavailable,
                    "the blob store could not be read",
                )))
            }
        }
    }

    /// A permanent failure with a lease: mark the record failed.
    async fn fail(&self, lease: &Lease, error: FailureInfo) -> Outcome {
        if let Err(e) = self.store.fail(lease, &error).await {
            tracing::warn!(error.cause_chain = ?e, error.message = %e, "could not mark the event failed");
            return Outcome::Transient {
                error: store_error(&e),
                retry_after: self.config.backoff_base,
            };
        }
        Outcome::Permanent(error)
    }

    /// A transient failure with a lease: hand the lease back (or, on the last allowed receive,
    /// mark the record failed since the queue will dead-letter the message next).
    async fn give_back(&self, delivery: &Delivery, lease: &Lease, error: FailureInfo) -> Outcome {
        let result = if delivery.receive_count >= self.config.max_receives {
            let exhausted = FailureInfo::new(
                ErrorCode::RetriesExhausted,
                format!(
                    "gave up after {} receives; last error: {}: {}",
                    delivery.receive_count, error.code, error.message
                ),
            );
            self.store.fail(lease, &exhausted).await
        } else {
            self.store.release(lease, &error).await
        };
        if let Err(e) = result {
            // The lease will simply expire; nothing is lost.
            tracing::warn!(error.cause_chain = ?e, error.message = %e, "could not release the lease");
        }
        self.transient(delivery, error)
    }

    fn transient(&self, delivery: &Delivery, error: FailureInfo) -> Outcome {
        Outcome::Transient {
            error,
            retry_after: self.backoff(delivery.receive_count),
        }
    }

    /// Exponential back-off: base, 2×base, 4×base, … capped at `backoff_max`.
    fn backoff(&self, receive_count: u32) -> Duration {
        let exponent = receive_count.saturating_sub(1).min(16);
        self.config
            .backoff_base
            .saturating_mul(1 << exponent)
            .min(self.config.backoff_max)
    }
}

enum PayloadError {
    Missing(FailureInfo),
    Unavailable(FailureInfo),
}

fn store_error(error: &fluxa_store::Error) -> FailureInfo {
    tracing::warn!(error.cause_chain = ?error, error.message = %error, "store operation failed");
    FailureInfo::new(
        ErrorCode::StoreUnavailable,
        "the store could not be written or read",
    )
}

fn record_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Processed => {
            metrics::counter!("fluxa_events_processed_total").increment(1);
            tracing::info!(outcome = outcome.name(), "event processed");
        }
        Outcome::Duplicate => {
            metrics::counter!("fluxa_events_duplicate_total").increment(1);
            tracing::info!(outcome = outcome.name(), "duplicate delivery ignored");
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

impl Processor {
    /// Deletes the blob of a message that is done with (processed or duplicate): the payload now
    /// lives in the store, and a redelivery of the same message is decided as a duplicate
    /// before any payload is read. Dead-lettered messages keep their blobs for a redrive.
    pub async fn discard_payload(&self, delivery: &Delivery) {
        // The key travels as a message attribute, so this costs nothing for inline messages.
        if let Some(key) = &delivery.attributes.blob_key {
            if let Err(e) = self.blobs.delete(key).await {
                // Harmless: an unreferenced blob is collected by the sweeper later.
                tracing::warn!(blob_key = %key, error.message = %e, "could not delete a payload blob");
            }
        }
    }

    /// Tells the store about messages the queue gave up on, so a record whose last worker died
    /// mid-message ends `failed` rather than `processing`. Best effort: the DLQ entry is the
    /// durable record, and a redrive settles the event either way.
    pub async fn record_exhausted(&self, notices: Vec<fluxa_queue::ExhaustedNotice>) {
        for notice in notices {
            let Ok(event_id) = EventId::parse(&notice.event_id) else {
                continue;
            };
            if let Err(e) = self.store.mark_exhausted(&event_id, &notice.error).await {
                tracing::warn!(
                    event_id = %event_id,
                    error.cause_chain = ?e,
                    error.message = %e,
                    "could not mark a dead-lettered event failed"
                );
            }
        }
    }
}

/// Settles a delivery on the queue the way the self-hosted worker does: delete on success,
/// dead-letter permanent failures, delay transient ones. A settle error only delays things: the
/// message reappears after its visibility timeout and the store's idempotency absorbs it.
pub async fn settle(queue: &dyn Queue, delivery: &Delivery, outcome: &Outcome) {
    let result = match outcome {
        Outcome::Processed | Outcome::Duplicate => queue.delete(delivery).await,
        Outcome::Conflict(error) | Outcome::Permanent(error) => {
            queue.dead_letter(delivery, error).await
        }
        Outcome::Transient { error, retry_after } => {
            queue.retry_later(delivery, *retry_after, error).await
        }
    };
    if let Err(e) = result {
        tracing::warn!(
            message_id = %delivery.message_id,
            error.cause_chain = ?e,
            error.message = %e,
            "could not settle the message; it will be redelivered"
        );
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use chrono::Utc;
    use fluxa_core::task::EventHeader;
    use fluxa_core::{CorrelationId, EventType};
    use fluxa_queue::MessageAttributes;
    use fluxa_store::{Completion, NewEvent, Result};
    use serde_json::value::RawValue;

    use super::*;

    /// A store whose every answer is scripted by the test.
    struct ScriptedStore {
        claim: fn() -> Result<Claim>,
    }

    #[async_trait]
    impl Store for ScriptedStore {
        async fn claim(&self, _: ClaimRequest<'_>) -> Result<Claim> {
            (self.claim)()
        }
        async fn complete(&self, _: &Lease, _: NewEvent) -> Result<Completion> {
            Ok(Completion::Stored)
        }
        async fn fail(&self, _: &Lease, _: &FailureInfo) -> Result<()> {
            Ok(())
        }
        async fn release(&self, _: &Lease, _: &FailureInfo) -> Result<()> {
            Ok(())
        }
        async fn record_error(&self, _: &EventId, _: &FailureInfo) -> Result<()> {
            Ok(())
        }
        async fn mark_exhausted(&self, _: &EventId, _: &FailureInfo) -> Result<()> {
            Ok(())
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    fn processor(claim: fn() -> Result<Claim>) -> Processor {
        let dir = std::env::temp_dir().join(format!("fluxa-proc-{}", std::process::id()));
        Processor::new(
            Arc::new(ScriptedStore { claim }),
            BlobStore::local(&dir).unwrap(),
            ProcessorConfig {
                lease: Duration::from_secs(30),
                max_receives: 3,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
            },
        )
    }

    fn delivery(receive_count: u32) -> Delivery {
        let header = EventHeader {
            event_id: EventId::parse("e").unwrap(),
            event_type: EventType::parse("t").unwrap(),
            source: None,
            occurred_at: None,
            correlation_id: CorrelationId::parse("c").unwrap(),
            received_at: Utc::now(),
            payload_sha256: PayloadHash::of(b"1"),
            payload_size: 1,
        };
        let message = EventMessageV1::inline(header, RawValue::from_string("1".into()).unwrap());
        Delivery {
            message_id: "m".into(),
            receipt: "r".into(),
            body: FluxaTask::EventV1(message).encode(),
            attributes: MessageAttributes::default(),
            receive_count,
            enqueued_at: Utc::now(),
        }
    }

    /// Seed invariant 8: a panic inside processing is caught and becomes a retry, not a crash.
    #[tokio::test]
    async fn a_panic_while_processing_becomes_a_transient_internal_failure() {
        let outcome = processor(|| panic!("store exploded"))
            .process(&delivery(1))
            .await;
        let Outcome::Transient { error, .. } = outcome else {
            panic!("expected a transient failure, got {outcome:?}");
        };
        assert_eq!(error.code, "internal");
    }

    /// Seed invariant 6: store errors are transient and back off exponentially up to the cap.
    #[tokio::test]
    async fn a_store_error_is_transient_with_exponential_backoff() {
        let failing = processor(|| Err(fluxa_store::Error::Corrupt("boom".into())));
        let mut delays = Vec::new();
        for receive_count in 1..=6 {
            match failing.process(&delivery(receive_count)).await {
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
        let busy = processor(|| {
            Ok(Claim::Busy {
                until: Utc::now() + chrono::Duration::seconds(10),
            })
        });
        let Outcome::Transient { retry_after, .. } = busy.process(&delivery(1)).await else {
            panic!("expected transient");
        };
        assert!(retry_after < Duration::from_secs(1));
        let Outcome::Transient { retry_after, .. } = busy.process(&delivery(2)).await else {
            panic!("expected transient");
        };
        assert!(retry_after >= Duration::from_secs(9), "{retry_after:?}");
    }
}

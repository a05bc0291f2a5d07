//! What processing decided for each delivery ([`Outcome`]), what the queue should do about it
//! ([`Disposition`], a pure mapping so that every host maps alike), [`settle`], which does it on
//! a [`Consumer`], and the one log line and counter per outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{CorrelationId, EventId, FailureInfo};
use fluxa_queue::{Consumer, Delivery};

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

/// Logs and counts one outcome, in a span that carries the message's ids (invariant 9).
pub(crate) fn record_outcome(delivery: &Delivery, outcome: &Outcome) {
    let span = tracing::info_span!(
        "process_message",
        message_id = %delivery.message_id,
        receive_count = delivery.receive_count,
        event_id = delivery.attributes.event_id.as_ref().map(EventId::as_str),
        correlation_id = delivery
            .attributes
            .correlation_id
            .as_ref()
            .map(CorrelationId::as_str),
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
                "class" => "permanent", "code" => error.code.as_str())
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
                "class" => "transient", "code" => error.code.as_str())
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

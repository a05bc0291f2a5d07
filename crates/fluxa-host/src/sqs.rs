//! The queue on SQS (`FLUXA_QUEUE_URL`) with its dead letters kept operable: the SQS
//! dead-letter queue is drained into the PostgreSQL store's `dead_letters` table, which the
//! admin API and `fluxa dlq …` read, filter and redrive as on every other backend.
//!
//! Why a drain (docs/DEPLOY-AWS.md, "Dead letters on AWS"): SQS cannot list, filter or show its
//! DLQ without receiving from it, and it moves a message whose receives are used up without a
//! word to anyone. Recording every DLQ message in the store gives operators the contract's
//! filters and cursors, and gives the store the news it needs: a `retries_exhausted` message's
//! idempotency record is marked `failed`, so an event whose last receiver died never stays
//! `processing` (seed invariant 5). A DLQ message is deleted from SQS only once it is recorded,
//! so the SQS DLQ remains the safety net whenever the database is down.
//!
//! The same [`record_dead_letters`] serves `fluxa serve` ([`run_dead_letter_drain`], a long
//! poll of the DLQ beside the workers) and the Lambda processor (a second event source mapping,
//! on the DLQ).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fluxa_aws::sqs::SqsQueue;
use fluxa_core::ids::DeadLetterId;
use fluxa_core::{CorrelationId, ErrorCode, EventId, FailureClass, FailureInfo};
use fluxa_postgres::DeadLetterTable;
use fluxa_queue::{
    BlobReferences, DeadLetter, DeadLetterAdmin, DeadLetterFilter, DeadLetterPage,
    DeadLetterPosition, Error, EventPurge, PendingMessage, QueueDepth, RedriveSelector, Result,
};
use fluxa_store::{Store, StoreAdmin};
use tokio_util::sync::CancellationToken;

/// The operators' side of an SQS queue: counts from SQS, dead letters from the store.
#[derive(Clone, Debug)]
pub struct SqsDeadLetters {
    queue: SqsQueue,
    table: DeadLetterTable,
}

impl SqsDeadLetters {
    pub fn new(queue: SqsQueue, table: DeadLetterTable) -> Self {
        Self { queue, table }
    }
}

/// Why [`SqsDeadLetters::peek`] cannot answer.
#[derive(Debug, thiserror::Error)]
#[error("SQS cannot show waiting messages without receiving them (which counts towards their receive limit)")]
struct CannotPeek;

#[async_trait]
impl DeadLetterAdmin for SqsDeadLetters {
    /// Pending and in-flight counts are SQS's approximate attributes; the age of the oldest
    /// message is CloudWatch's (`ApproximateAgeOfOldestMessage`), not known here. Dead letters
    /// are those recorded in the store.
    async fn depth(&self) -> Result<QueueDepth> {
        let ((pending, in_flight), counts) =
            tokio::try_join!(self.queue.approximate_counts(), self.table.counts())?;
        Ok(QueueDepth {
            pending,
            in_flight,
            dead_letters: counts.total,
            oldest_enqueued_at: None,
            dead_letters_by_code: counts.by_code,
        })
    }

    async fn peek(&self, _limit: usize) -> Result<Vec<PendingMessage>> {
        Err(Error::rejected(CannotPeek))
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage> {
        self.table.list(filter, after, limit).await
    }

    async fn count_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64> {
        self.table.count(filter).await
    }

    async fn get_dead_letter(&self, id: &DeadLetterId) -> Result<Option<DeadLetter>> {
        self.table.get(id).await
    }

    /// Sends the selected dead letters back to the SQS queue (a new message each, with a fresh
    /// receive count) and deletes them from the store.
    async fn redrive(&self, selector: &RedriveSelector, limit: usize) -> Result<u64> {
        self.table
            .redrive_through(&self.queue, selector, limit)
            .await
    }

    async fn purge_event(&self, event_id: &str) -> Result<EventPurge> {
        let purged = self.table.purge_event(event_id).await?;
        Ok(EventPurge {
            dead_letters: purged.dead_letters,
            blob_keys: purged.blob_keys,
            queued: 0,
            queue_unsearchable: true,
        })
    }

    async fn prune_dead_letters(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.table.prune(before, limit).await
    }
}

/// What the blob sweeper may delete when the queue is SQS: nothing. SQS cannot say whether a
/// waiting message points at a blob, so every blob counts as referenced, and orphans (from
/// a failed send, or a dead letter pruned from the store) are left to the bucket's lifecycle
/// rule (`payload_expiration_days` in the Terraform; docs/DEPLOY-AWS.md).
#[derive(Clone, Copy, Debug)]
pub struct LifecycleRuleCollectsBlobs;

#[async_trait]
impl BlobReferences for LifecycleRuleCollectsBlobs {
    async fn references_blob(&self, _key: &str) -> Result<bool> {
        Ok(true)
    }
}

/// Records dead letters drained from the SQS DLQ: each once in the store's DLQ (an id
/// already there is kept as it is), and for those SQS moved after their last receive, the
/// event's idempotency record marked `failed`. SQS says nothing of why a moved message kept
/// failing, so its entry takes the last error the processor recorded on the event. An error
/// means nothing may be deleted from the SQS DLQ yet: the messages come back and are recorded
/// on a later try.
pub async fn record_dead_letters(
    table: &DeadLetterTable,
    store: &dyn Store,
    admin: &dyn StoreAdmin,
    mut dead_letters: Vec<DeadLetter>,
) -> anyhow::Result<u64> {
    let mut exhausted: Vec<(EventId, FailureInfo)> = Vec::new();
    for dead_letter in &mut dead_letters {
        if dead_letter.error_class != FailureClass::RetriesExhausted {
            continue;
        }
        let Some(event_id) = dead_letter.attributes.event_id.clone() else {
            continue;
        };
        // The record tells what SQS does not: when the event first and last failed, and why.
        // A record that does not parse tells nothing; the dead letter is recorded without it
        // rather than holding up the drain.
        let record = match admin.idempotency_record(&event_id).await {
            Ok(record) => record,
            Err(fluxa_store::Error::Corrupt(reason)) => {
                tracing::warn!(
                    event_id = event_id.as_str(),
                    reason,
                    "the idempotency record of a drained dead letter is corrupt"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(record) = record {
            dead_letter.first_failure_at = record.created_at.min(dead_letter.dead_lettered_at);
            dead_letter.last_failure_at = record.updated_at.min(dead_letter.dead_lettered_at);
            match record.last_error {
                Some(last) if last.code == ErrorCode::RetriesExhausted => {
                    dead_letter.error.message = last.message;
                }
                Some(last) => {
                    dead_letter.error.message = format!(
                        "{}; last error: {}: {}",
                        dead_letter.error.message, last.code, last.message
                    );
                }
                None => {}
            }
        }
        exhausted.push((event_id, dead_letter.error.clone()));
    }
    let recorded = table.record(&dead_letters).await?;
    if !exhausted.is_empty() {
        store.mark_exhausted(&exhausted).await?;
    }
    for dead_letter in &dead_letters {
        tracing::info!(
            dead_letter_id = dead_letter.id.as_str(),
            event_id = dead_letter
                .attributes
                .event_id
                .as_ref()
                .map(EventId::as_str),
            correlation_id = dead_letter
                .attributes
                .correlation_id
                .as_ref()
                .map(CorrelationId::as_str),
            error.class = dead_letter.error_class.as_str(),
            error.code = dead_letter.error.code.as_str(),
            "dead letter recorded from the SQS dead-letter queue"
        );
    }
    metrics::counter!("fluxa_dead_letters_drained_total").increment(recorded);
    Ok(recorded)
}

/// How long one receive from the DLQ waits for a message (SQS's longest long poll).
const DRAIN_WAIT: Duration = Duration::from_secs(20);

/// After a failed receive or record, the drain waits this long before trying again.
const DRAIN_BACKOFF: Duration = Duration::from_secs(1);

/// Moves every message of the SQS dead-letter queue into the store's DLQ until `shutdown`:
/// long polls of up to 10 messages, each batch recorded before it is deleted from SQS.
pub async fn run_dead_letter_drain(
    queue: SqsQueue,
    table: DeadLetterTable,
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            received = queue.receive_dead_letters(DRAIN_WAIT) => received,
        };
        let drained = match received {
            Ok(drained) if drained.is_empty() => continue,
            Ok(drained) => drained,
            Err(e) => {
                tracing::warn!(error.message = %e, "could not receive from the SQS dead-letter queue");
                pause(&shutdown).await;
                continue;
            }
        };
        let dead_letters: Vec<DeadLetter> = drained.iter().map(|d| d.dead_letter.clone()).collect();
        let n_dead_letters = dead_letters.len();
        if let Err(e) = record_dead_letters(&table, &*store, &*admin, dead_letters).await {
            // They stay in the SQS DLQ and come back after its visibility timeout.
            tracing::warn!(
                error.cause_chain = ?e,
                error.message = %e,
                n_dead_letters,
                "could not record dead letters from the SQS dead-letter queue"
            );
            pause(&shutdown).await;
            continue;
        }
        let receipts: Vec<&str> = drained.iter().map(|d| d.receipt.as_str()).collect();
        if let Err(e) = queue.delete_dead_letters(&receipts).await {
            // Harmless: they come back and are recorded again, as the same entries.
            tracing::warn!(error.message = %e, "could not delete drained dead letters from SQS");
        }
    }
}

async fn pause(shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(DRAIN_BACKOFF) => {}
    }
}

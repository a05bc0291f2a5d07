//! The phases of [`Processor::process_batch`] (the crate's doc lists them): decode, lease the
//! blob items, fetch their blobs, verify, then store and settle every record in one write.

use std::time::Duration;

use bytes::Bytes;
use fluxa_core::{ErrorCode, EventId, EventMessageV1, FailureInfo, FluxaTask, PayloadHash};
use fluxa_queue::Delivery;
use fluxa_store::{Lease, NewEvent, Write, WriteAction, WriteResult};

use crate::budget::{groups_within, MAX_GROUP_BLOB_BYTES};
use crate::{Outcome, Processor, CONCURRENT_BLOB_FETCHES};

/// How much later than a live lease's expiry a message that met it comes back, so that the
/// holder's own completion (or its expiry) is seen by then.
const LEASE_EXPIRY_MARGIN: Duration = Duration::from_millis(50);

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
    pub(crate) async fn process_batch_inner(&self, deliveries: &[Delivery]) -> Vec<Outcome> {
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
        let blob_size =
            |item: &Item<'_>| item.payload.is_none().then_some(item.message.payload_size);
        for group in groups_within(items, group_bytes, blob_size) {
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
        // Held until the group is stored, when its payloads are dropped.
        let _budget = self.blob_memory.hold(blob_bytes).await;

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
        if let Some(event_id) = &delivery.attributes.event_id {
            if let Err(e) = self.store.record_error(event_id, &error).await {
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

    /// Applies `writes` in one transaction. If the database refused the batch, or one of its
    /// records is corrupt, applies them one by one so that one such write cannot fail its
    /// neighbours; if the store is out of reach, every write fails at once (retrying them one
    /// by one would only wait out a connection timeout per write).
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
        if writes.len() == 1 || !store_answered(&error) {
            let failure = StoreFailure::of(&error);
            return writes.iter().map(|_| Err(failure.clone())).collect();
        }
        tracing::warn!(
            n_writes = writes.len(),
            error.cause_chain = ?error, error.message = %error,
            "a batch write was refused or met a corrupt record; retrying its writes one by one"
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
}

/// Whether the store answered at all: it refused a statement, or found a record it holds
/// corrupt. Either is about some of the writes, not the store being down.
fn store_answered(error: &fluxa_store::Error) -> bool {
    matches!(
        error,
        fluxa_store::Error::Rejected(_) | fluxa_store::Error::Corrupt(_)
    )
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
            reachable: store_answered(error),
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

fn store_error(error: &fluxa_store::Error) -> FailureInfo {
    tracing::warn!(error.cause_chain = ?error, error.message = %error, "store operation failed");
    FailureInfo::new(
        ErrorCode::StoreUnavailable,
        "the store could not be written or read",
    )
}

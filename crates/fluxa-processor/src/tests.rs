//! Unit tests of the processor over a scripted store: outcomes, back-off, batching and the
//! blob-memory budget.

use async_trait::async_trait;
use chrono::Utc;
use fluxa_core::task::EventHeader;
use fluxa_core::{CorrelationId, EventType};
use fluxa_queue::MessageAttributes;
use fluxa_store::Result;
use serde_json::value::RawValue;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fluxa_blob::BlobStore;
use fluxa_core::{ErrorCode, EventId, EventMessageV1, FailureInfo, FluxaTask, PayloadHash};
use fluxa_queue::Delivery;
use fluxa_store::{Lease, Store, Write, WriteResult};

use crate::{Disposition, Outcome, Processor, ProcessorConfig};

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

/// One delivery's outcome: a batch of one.
async fn process_one(processor: &Processor, delivery: &Delivery) -> Outcome {
    let mut outcomes = processor
        .process_batch(std::slice::from_ref(delivery))
        .await;
    assert_eq!(outcomes.len(), 1);
    outcomes.pop().unwrap()
}

fn good(receive_count: u32) -> Delivery {
    delivery(receive_count, "1", b"1")
}

/// Seed invariant 8: a panic inside processing is caught and becomes a retry, not a crash.
#[tokio::test]
async fn a_panic_while_processing_becomes_a_transient_internal_failure() {
    let (_dir, panicking) = processor(|| panic!("store exploded"));
    let outcome = process_one(&panicking, &good(1)).await;
    let Outcome::Transient { error, .. } = outcome else {
        panic!("expected a transient failure, got {outcome:?}");
    };
    assert_eq!(error.code, ErrorCode::Internal);
}

/// Seed invariant 6: store errors are transient and back off exponentially up to the cap.
#[tokio::test]
async fn a_store_error_is_transient_with_exponential_backoff() {
    let (_dir, failing) = processor(|| Err(fluxa_store::Error::Corrupt("boom".into())));
    let mut delays = Vec::new();
    for receive_count in 1..=6 {
        match process_one(&failing, &good(receive_count)).await {
            Outcome::Transient { error, retry_after } => {
                assert_eq!(error.code, ErrorCode::StoreUnavailable);
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
    let Outcome::Transient { retry_after, .. } = process_one(&busy, &good(1)).await else {
        panic!("expected transient");
    };
    assert!(retry_after < Duration::from_secs(1));
    let Outcome::Transient { retry_after, .. } = process_one(&busy, &good(2)).await else {
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
        matches!(&outcomes[1], Outcome::Permanent(e) if e.code == ErrorCode::HashMismatch),
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
        |o| matches!(o, Outcome::Transient { error, .. } if error.code == ErrorCode::StoreUnavailable)
    ));
    assert_eq!(
        store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "an unreachable store must not be asked once per write"
    );
}

/// A corrupt record belongs to one event, and the store that found it is up: the batch's
/// writes are retried one by one, as for a refused statement, so its neighbours are not held
/// back by it.
#[tokio::test]
async fn a_batch_that_meets_a_corrupt_record_is_retried_write_by_write() {
    let corrupt = || Err(fluxa_store::Error::Corrupt("bad hash".into()));
    let (_dir, processor, store) = counted_processor(corrupt);
    processor.process_batch(&[good(1), good(1), good(1)]).await;
    assert_eq!(
        store.n_applies.load(std::sync::atomic::Ordering::Relaxed),
        8,
        "the batch, its three writes alone, then the notes of the failed attempts the same way"
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

//! Store conformance checks (feature `conformance`): the semantics every [`Store`] must keep,
//! written once and run by each backend crate's tests against a real database. Each function
//! panics with a sentence saying which promise broke.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fluxa_core::{
    CorrelationId, ErrorCode, EventId, EventType, FailureInfo, PayloadHash, PayloadMode,
};

use crate::{
    Claim, ClaimRequest, EventReader, Lease, NewEvent, Status, Store, Write, WriteAction,
    WriteResult,
};

fn new_event(payload: &'static [u8]) -> NewEvent {
    NewEvent {
        event_type: EventType::parse("t").unwrap(),
        source: None,
        occurred_at: None,
        payload: Bytes::from_static(payload),
        payload_mode: PayloadMode::Inline,
        received_at: chrono::Utc::now(),
    }
}

fn store_write(event_id: &str, payload: &'static [u8]) -> Write {
    Write {
        event_id: EventId::parse(event_id).unwrap(),
        payload_sha256: PayloadHash::of(payload),
        correlation_id: CorrelationId::parse("c").unwrap(),
        lease: None,
        action: WriteAction::Store(new_event(payload)),
    }
}

/// A batch of inline events is claimed and stored in one `apply`: new ones are stored, a
/// repeat of an event within the batch or of one stored earlier is reported as already
/// processed with the stored hash, and every stored event reads back byte for byte.
pub async fn a_batch_stores_new_events_and_reports_repeats_as_already_processed(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
) {
    let first = store.apply(vec![store_write("old", b"1")]).await.unwrap();
    assert_eq!(first, vec![WriteResult::Applied { lease: None }]);
    let mut batch: Vec<Write> = (0..100)
        .map(|n| store_write(&format!("new-{n}"), b"{\"n\": 1}"))
        .collect();
    batch.push(store_write("old", b"2"));
    batch.push(store_write("new-7", b"{\"n\": 1}"));
    let results = store.apply(batch).await.unwrap();
    assert_eq!(results.len(), 102);
    assert!(
        results[..100]
            .iter()
            .all(|r| *r == WriteResult::Applied { lease: None }),
        "every new event must be stored"
    );
    assert_eq!(
        results[100],
        WriteResult::AlreadyProcessed {
            payload_sha256: PayloadHash::of(b"1")
        },
        "a stored event must not be written again"
    );
    assert_eq!(
        results[101],
        WriteResult::AlreadyProcessed {
            payload_sha256: PayloadHash::of(b"{\"n\": 1}")
        },
        "a repeat within the batch sees the write before it"
    );
    let stored = reader
        .event(&EventId::parse("new-42").unwrap())
        .await
        .unwrap()
        .expect("a stored event must be readable");
    assert_eq!(stored.payload, b"{\"n\": 1}");
    let status = reader
        .status(&EventId::parse("new-42").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status.status, status.attempts), (Status::Processed, 1));
}

/// A permanent failure written without a lease marks the record failed, and a later write of
/// the event (a redrive) takes it over and stores it.
pub async fn a_failed_record_is_taken_over_by_the_next_write(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
) {
    let mut failing = store_write("bad", b"1");
    failing.action = WriteAction::Fail(FailureInfo::new(ErrorCode::HashMismatch, "x"));
    store.apply(vec![failing]).await.unwrap();
    let event_id = EventId::parse("bad").unwrap();
    let status = reader.status(&event_id).await.unwrap().unwrap();
    assert_eq!(status.status, Status::Failed);
    assert_eq!(
        store.apply(vec![store_write("bad", b"1")]).await.unwrap(),
        vec![WriteResult::Applied { lease: None }]
    );
    let status = reader.status(&event_id).await.unwrap().unwrap();
    assert_eq!((status.status, status.attempts), (Status::Processed, 2));
    assert!(status.last_error.is_none(), "a stored event has no error");
}

/// Sixteen concurrent claims on one event id: exactly one wins, the rest see a live lease.
pub async fn only_one_of_many_concurrent_claims_on_an_event_wins(store: Arc<dyn Store>) {
    let event_id = EventId::parse("contended").unwrap();
    let hash = PayloadHash::of(b"1");
    let correlation_id = CorrelationId::parse("c").unwrap();
    let mut claims = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let store = store.clone();
        let (event_id, hash, correlation_id) =
            (event_id.clone(), hash.clone(), correlation_id.clone());
        claims.spawn(async move {
            store
                .claim(ClaimRequest {
                    event_id: &event_id,
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease: Duration::from_secs(30),
                })
                .await
                .unwrap()
        });
    }
    let mut n_acquired = 0;
    while let Some(claim) = claims.join_next().await {
        match claim.unwrap() {
            Claim::Acquired(_) => n_acquired += 1,
            Claim::Busy { .. } => {}
            other => panic!("unexpected claim {other:?}"),
        }
    }
    assert_eq!(n_acquired, 1, "exactly one claim may win");
}

/// An expired lease is taken over (attempts counts up) and the old holder can no longer finish.
pub async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete(
    store: Arc<dyn Store>,
) {
    let event_id = EventId::parse("taken-over").unwrap();
    let hash = PayloadHash::of(b"1");
    let correlation_id = CorrelationId::parse("c").unwrap();
    let request = |lease_ms| ClaimRequest {
        event_id: &event_id,
        payload_sha256: &hash,
        correlation_id: &correlation_id,
        lease: Duration::from_millis(lease_ms),
    };
    let Claim::Acquired(old) = store.claim(request(100)).await.unwrap() else {
        panic!("the first claim must win");
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    let Claim::Acquired(new) = store.claim(request(30_000)).await.unwrap() else {
        panic!("an expired lease must be taken over");
    };
    assert_eq!(new.attempts, 2);
    let store_write = |lease: &Lease| Write {
        event_id: event_id.clone(),
        payload_sha256: hash.clone(),
        correlation_id: correlation_id.clone(),
        lease: Some(lease.clone()),
        action: WriteAction::Store(new_event(b"1")),
    };
    assert_eq!(
        store.apply(vec![store_write(&old)]).await.unwrap(),
        vec![WriteResult::LeaseLost],
        "a lost lease must not write"
    );
    assert_eq!(
        store.apply(vec![store_write(&new)]).await.unwrap(),
        vec![WriteResult::Applied { lease: None }]
    );
    assert_eq!(
        store.claim(request(1000)).await.unwrap(),
        Claim::AlreadyProcessed {
            payload_sha256: hash.clone()
        }
    );
}

/// `mark_exhausted` fails a record whose worker is gone, and nothing else.
pub async fn mark_exhausted_fails_only_abandoned_records(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
) {
    let hash = PayloadHash::of(b"1");
    let correlation_id = CorrelationId::parse("c").unwrap();
    let error = FailureInfo::new(ErrorCode::RetriesExhausted, "gave up after 3 receives");
    let claim = |event_id: &'static str, lease_ms: u64| {
        let (store, hash, correlation_id) = (store.clone(), hash.clone(), correlation_id.clone());
        async move {
            let event_id = EventId::parse(event_id).unwrap();
            let claim = store
                .claim(ClaimRequest {
                    event_id: &event_id,
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease: Duration::from_millis(lease_ms),
                })
                .await
                .unwrap();
            let Claim::Acquired(lease) = claim else {
                panic!("a first claim must win")
            };
            lease
        }
    };
    let abandoned = claim("abandoned", 50).await;
    let live = claim("live", 60_000).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    store
        .mark_exhausted(&[
            (abandoned.event_id.clone(), error.clone()),
            (live.event_id.clone(), error.clone()),
        ])
        .await
        .unwrap();
    let abandoned_status = reader.status(&abandoned.event_id).await.unwrap().unwrap();
    assert_eq!(
        abandoned_status.status,
        Status::Failed,
        "an abandoned record must end failed"
    );
    assert_eq!(
        abandoned_status.last_error.map(|e| e.code).as_deref(),
        Some("retries_exhausted")
    );
    let live_status = reader.status(&live.event_id).await.unwrap().unwrap();
    assert_eq!(
        live_status.status,
        Status::Processing,
        "a live lease must not be failed"
    );

    let retry = store
        .claim(ClaimRequest {
            event_id: &abandoned.event_id,
            payload_sha256: &hash,
            correlation_id: &correlation_id,
            lease: Duration::from_secs(1),
        })
        .await
        .unwrap();
    let Claim::Acquired(retry) = retry else {
        panic!("a failed record must be taken over by the next delivery (a redrive)")
    };
    assert_eq!(retry.attempts, 2);
    assert!(
        matches!(
            store
                .claim(ClaimRequest {
                    event_id: &live.event_id,
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease: Duration::from_secs(1),
                })
                .await
                .unwrap(),
            Claim::Busy { .. }
        ),
        "a live lease must not be failed"
    );
}

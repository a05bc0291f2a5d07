//! Backend conformance checks (feature `conformance`): the semantics every [`Queue`] and every
//! [`fluxa_store::Store`] must keep, written once and run by each backend crate's tests against
//! a real database. Each function panics with a sentence saying which promise broke.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{CorrelationId, ErrorCode, EventId, FailureInfo, PayloadHash};
use fluxa_store::{Claim, ClaimRequest, Store};

use crate::{MessageAttributes, NewMessage, Queue, QueueDepth, RedriveSelector};

fn message(n: usize) -> NewMessage {
    NewMessage {
        body: format!("{{\"n\":{n}}}").into_bytes(),
        attributes: MessageAttributes {
            event_id: Some(format!("e-{n}")),
            correlation_id: Some("c".into()),
            blob_key: Some(format!("events/e-{n}/blob.json")),
        },
    }
}

/// Eight receivers on two handles (two "processes") drain 200 messages; none is seen twice.
/// The queues must have a long visibility timeout.
pub async fn concurrent_receivers_never_get_the_same_message(
    first: Arc<dyn Queue>,
    second: Arc<dyn Queue>,
) {
    first.send((0..200).map(message).collect()).await.unwrap();
    let mut receivers = tokio::task::JoinSet::new();
    for receiver_idx in 0..8 {
        let queue = if receiver_idx % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        receivers.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let got = queue.receive(3, Duration::ZERO).await.unwrap();
                if got.is_empty() {
                    return ids;
                }
                ids.extend(got.into_iter().map(|d| d.message_id));
            }
        });
    }
    let mut seen = HashSet::new();
    while let Some(ids) = receivers.join_next().await {
        for id in ids.unwrap() {
            assert!(seen.insert(id), "a message was delivered to two receivers");
        }
    }
    assert_eq!(seen.len(), 200, "every message must be delivered once");
}

/// The queue must have a visibility timeout of about 100 ms.
pub async fn a_message_reappears_after_its_visibility_timeout_and_a_stale_receipt_settles_nothing(
    queue: Arc<dyn Queue>,
) {
    queue.send(vec![message(1)]).await.unwrap();
    let first = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    assert!(
        queue.receive(1, Duration::ZERO).await.unwrap().is_empty(),
        "a received message must be hidden"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    // The first receiver wakes up late and deletes: it no longer owns the message.
    queue.delete(&first).await.unwrap();
    assert_eq!(
        queue.depth().await.unwrap().in_flight,
        1,
        "a stale receipt deleted the message"
    );
    assert!(queue.references_blob("events/e-1/blob.json").await.unwrap());
    queue.delete(&second).await.unwrap();
    assert!(
        !queue.references_blob("events/e-1/blob.json").await.unwrap(),
        "a deleted message no longer references its blob"
    );
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth::default(),
        "delete must remove the message"
    );

    queue.send(vec![message(2), message(3)]).await.unwrap();
    let both = queue.receive(2, Duration::ZERO).await.unwrap();
    assert_eq!(both.len(), 2);
    queue.delete_many(&both).await.unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth::default(),
        "delete_many must remove all"
    );
}

/// The queue must allow 3 receives and have a long visibility timeout.
pub async fn after_max_receives_the_next_receive_dead_letters_the_message_as_retries_exhausted(
    queue: Arc<dyn Queue>,
) {
    queue.send(vec![message(7)]).await.unwrap();
    let error = FailureInfo::new(ErrorCode::StoreUnavailable, "db down");
    for receive in 1..=3 {
        let delivery = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
        assert_eq!(delivery.receive_count, receive);
        queue
            .retry_later(&delivery, Duration::ZERO, &error)
            .await
            .unwrap();
    }
    assert!(queue.receive(1, Duration::ZERO).await.unwrap().is_empty());
    let notices = queue.take_exhausted();
    assert_eq!(notices.len(), 1, "the redrive must be announced once");
    assert_eq!(notices[0].event_id, "e-7");
    assert_eq!(notices[0].error.code, "retries_exhausted");
    assert!(queue.take_exhausted().is_empty(), "notices are drained");
    let dead = queue.list_dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error_class, "retries_exhausted");
    assert_eq!(dead[0].error.code, "retries_exhausted");
    assert!(dead[0].error.message.contains("store_unavailable: db down"));
    assert_eq!(dead[0].receive_count, 3);
    assert_eq!(
        dead[0].body, b"{\"n\":7}",
        "the original bytes must be kept"
    );
    assert_eq!(dead[0].attributes.event_id.as_deref(), Some("e-7"));
    assert!(
        queue.references_blob("events/e-7/blob.json").await.unwrap(),
        "a dead letter's blob is still referenced"
    );
    assert!(!queue.references_blob("events/e-8/blob.json").await.unwrap());

    assert_eq!(
        queue
            .redrive(&RedriveSelector::EventId("e-7".into()))
            .await
            .unwrap(),
        1
    );
    let again = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    assert_eq!(
        again.receive_count, 1,
        "a redriven message starts a fresh receive count"
    );
}

/// A permanent failure moves the message with its reason, once.
pub async fn a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue(queue: Arc<dyn Queue>) {
    queue.send(vec![message(3)]).await.unwrap();
    let delivery = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    let error = FailureInfo::new(ErrorCode::HashMismatch, "bad bytes");
    queue.dead_letter(&delivery, &error).await.unwrap();
    queue.dead_letter(&delivery, &error).await.unwrap();
    let dead = queue.list_dead_letters(10, Some("e-3")).await.unwrap();
    assert_eq!(
        dead.len(),
        1,
        "dead-lettering twice must not duplicate the entry"
    );
    assert_eq!(dead[0].error_class, "permanent");
    assert_eq!(dead[0].error, error);
    assert!(queue.get_dead_letter(&dead[0].id).await.unwrap().is_some());
    assert_eq!(queue.depth().await.unwrap().pending, 0);
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
    let event = fluxa_store::NewEvent {
        event_id: event_id.clone(),
        event_type: "t".into(),
        source: None,
        occurred_at: None,
        payload: b"1".to_vec(),
        payload_sha256: hash.clone(),
        payload_mode: fluxa_core::PayloadMode::Inline,
        correlation_id: correlation_id.clone(),
        received_at: chrono::Utc::now(),
    };
    assert_eq!(
        store.complete(&old, event.clone()).await.unwrap(),
        fluxa_store::Completion::LeaseLost,
        "a lost lease must not write"
    );
    assert_eq!(
        store.complete(&new, event).await.unwrap(),
        fluxa_store::Completion::Stored
    );
    assert_eq!(
        store.claim(request(1000)).await.unwrap(),
        Claim::AlreadyProcessed {
            payload_sha256: hash.to_string()
        }
    );
}

/// `mark_exhausted` fails a record whose worker is gone, and nothing else.
pub async fn mark_exhausted_fails_only_abandoned_records(store: Arc<dyn Store>) {
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
        .mark_exhausted(&abandoned.event_id, &error)
        .await
        .unwrap();
    store.mark_exhausted(&live.event_id, &error).await.unwrap();

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

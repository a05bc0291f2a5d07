//! Claim and delivery semantics of the SQLite backends that the black-box suite cannot pin down
//! precisely: SQLite has no `SKIP LOCKED`, so "one receiver per message" and "one lease per
//! event" are checked here with real concurrency against a real database file.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{CorrelationId, EventId, FailureInfo, PayloadHash};
use fluxa_queue::{MessageAttributes, NewMessage, Queue, RedriveSelector};
use fluxa_sqlite::QueueConfig;
use fluxa_store::{Claim, ClaimRequest, Store};

async fn open(dir: &std::path::Path, visibility_ms: u64) -> fluxa_sqlite::Backends {
    fluxa_sqlite::open(
        dir,
        QueueConfig {
            visibility_timeout: Duration::from_millis(visibility_ms),
            max_receives: 3,
        },
    )
    .await
    .unwrap()
}

fn message(n: usize) -> NewMessage {
    NewMessage {
        body: format!("{{\"n\":{n}}}").into_bytes(),
        attributes: MessageAttributes {
            event_id: Some(format!("e-{n}")),
            correlation_id: Some("c".into()),
        },
    }
}

#[tokio::test]
async fn concurrent_receivers_never_get_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), 60_000).await;
    let queue = Arc::new(backends.queue);
    queue.send((0..200).map(message).collect()).await.unwrap();
    // A second process-like handle on the same files competes too.
    let other = Arc::new(open(dir.path(), 60_000).await.queue);
    let mut receivers = tokio::task::JoinSet::new();
    for receiver_idx in 0..8 {
        let queue: Arc<dyn Queue> = if receiver_idx % 2 == 0 {
            queue.clone()
        } else {
            other.clone()
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
    assert_eq!(seen.len(), 200);
}

#[tokio::test]
async fn a_message_reappears_after_its_visibility_timeout_and_a_stale_receipt_settles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), 100).await.queue;
    queue.send(vec![message(1)]).await.unwrap();
    let first = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    assert!(queue.receive(1, Duration::ZERO).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    // The first receiver wakes up late and tries to delete: it no longer owns the message.
    queue.delete(&first).await.unwrap();
    assert_eq!(queue.depth().await.unwrap().in_flight, 1);
    queue.delete(&second).await.unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        fluxa_queue::QueueDepth::default()
    );
}

#[tokio::test]
async fn after_max_receives_the_next_receive_dead_letters_the_message_as_retries_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), 60_000).await.queue;
    queue.send(vec![message(7)]).await.unwrap();
    let error = FailureInfo::new(fluxa_core::ErrorCode::StoreUnavailable, "db down");
    for receive in 1..=3 {
        let delivery = queue.receive(1, Duration::ZERO).await.unwrap().remove(0);
        assert_eq!(delivery.receive_count, receive);
        queue
            .retry_later(&delivery, Duration::ZERO, &error)
            .await
            .unwrap();
    }
    assert!(queue.receive(1, Duration::ZERO).await.unwrap().is_empty());
    let dead = queue.list_dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error_class, "retries_exhausted");
    assert_eq!(dead[0].error.code, "retries_exhausted");
    assert!(dead[0].error.message.contains("store_unavailable: db down"));
    assert_eq!(dead[0].receive_count, 3);
    assert_eq!(dead[0].body, b"{\"n\":7}");

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

#[tokio::test]
async fn only_one_of_many_concurrent_claims_on_an_event_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 1000).await.store);
    let event_id = EventId::parse("contended").unwrap();
    let hash = PayloadHash::of(b"1");
    let correlation_id = CorrelationId::parse("c").unwrap();
    let claims = (0..16).map(|_| {
        let store = store.clone();
        let (event_id, hash, correlation_id) =
            (event_id.clone(), hash.clone(), correlation_id.clone());
        tokio::spawn(async move {
            store
                .claim(ClaimRequest {
                    event_id: &event_id,
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease: Duration::from_secs(30),
                })
                .await
                .unwrap()
        })
    });
    let results = futures::future::join_all(claims).await;
    let n_acquired = results
        .iter()
        .filter(|r| matches!(r.as_ref().unwrap(), Claim::Acquired(_)))
        .count();
    assert_eq!(n_acquired, 1);
}

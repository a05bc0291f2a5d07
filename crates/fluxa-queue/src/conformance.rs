//! Queue conformance checks (feature `conformance`), written once and run by each backend
//! crate's tests against a real backend. Each function panics with a sentence saying which
//! promise broke.
//! - Core checks hold for every [`Producer`] + [`Consumer`] (SQS included).
//! - Capability checks hold for backends that offer a capability: [`DeadLetterAdmin`],
//!   [`BlobReferences`], and the database backends' stronger promise that a stale receipt
//!   settles nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{ErrorCode, FailureClass, FailureInfo};

use crate::{
    BlobReferences, Consumer, DeadLetterAdmin, MessageAttributes, NewMessage, Producer, QueueDepth,
    RedriveSelector,
};

/// What the core checks need.
pub trait CoreQueue: Producer + Consumer {}
impl<Q: Producer + Consumer> CoreQueue for Q {}

/// What the capability checks need.
pub trait FullQueue: CoreQueue + DeadLetterAdmin + BlobReferences {}
impl<Q: CoreQueue + DeadLetterAdmin + BlobReferences> FullQueue for Q {}

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
pub async fn concurrent_receivers_never_get_the_same_message<Q: CoreQueue>(
    first: Arc<Q>,
    second: Arc<Q>,
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
                let got = queue.receive(3, Duration::ZERO).await.unwrap().deliveries;
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

/// Receives one delivery, which must be there.
async fn receive_one<Q: CoreQueue + ?Sized>(queue: &Q) -> crate::Delivery {
    let mut got = queue.receive(1, Duration::ZERO).await.unwrap().deliveries;
    assert_eq!(got.len(), 1, "a message must be delivered");
    got.remove(0)
}

/// Receives nothing, or panics with `why`.
async fn receive_none<Q: CoreQueue + ?Sized>(queue: &Q, why: &str) {
    let received = queue.receive(1, Duration::ZERO).await.unwrap();
    assert!(received.deliveries.is_empty(), "{why}");
}

/// Core: a received message is hidden, then reappears after its visibility timeout with its
/// receive count up, and a delete removes it. The queue must have a visibility timeout of about
/// 100 ms.
pub async fn a_message_reappears_after_its_visibility_timeout_and_delete_removes_it<
    Q: CoreQueue,
>(
    queue: Arc<Q>,
) {
    queue.send(vec![message(1)]).await.unwrap();
    let first = receive_one(queue.as_ref()).await;
    receive_none(queue.as_ref(), "a received message must be hidden").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = receive_one(queue.as_ref()).await;
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.receive_count, 2);
    assert_eq!(second.receives_left, 1, "max_receives is 3");
    queue.delete_many(&[&second]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    receive_none(queue.as_ref(), "delete must remove the message").await;
}

/// Capability (database backends): a stale receipt settles nothing, and blob references
/// follow the message. The queue must have a visibility timeout of about 100 ms.
pub async fn a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob<
    Q: FullQueue,
>(
    queue: Arc<Q>,
) {
    queue.send(vec![message(1)]).await.unwrap();
    let first = receive_one(queue.as_ref()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = receive_one(queue.as_ref()).await;
    assert_eq!(second.message_id, first.message_id);
    // The first receiver wakes up late and deletes: it no longer owns the message.
    queue.delete_many(&[&first]).await.unwrap();
    assert_eq!(
        queue.depth().await.unwrap().in_flight,
        1,
        "a stale receipt deleted the message"
    );
    assert!(queue.references_blob("events/e-1/blob.json").await.unwrap());
    queue.delete_many(&[&second]).await.unwrap();
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
    let both = queue.receive(2, Duration::ZERO).await.unwrap().deliveries;
    assert_eq!(both.len(), 2);
    queue
        .delete_many(&both.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        queue.depth().await.unwrap(),
        QueueDepth::default(),
        "delete_many must remove all"
    );
}

/// Sends message `n`, then receives it 3 times, failing each transiently ("db down").
async fn fail_three_times<Q: CoreQueue + ?Sized>(queue: &Q, n: usize) {
    queue.send(vec![message(n)]).await.unwrap();
    let error = FailureInfo::new(ErrorCode::StoreUnavailable, "db down");
    for receive in 1..=3 {
        let delivery = receive_one(queue).await;
        assert_eq!(delivery.receive_count, receive);
        assert_eq!(delivery.receives_left, 3 - receive);
        queue
            .retry_later(&delivery, Duration::ZERO, &error)
            .await
            .unwrap();
    }
}

/// Core: the receive that meets a message received `max_receives` times dead-letters it and
/// reports it in its own result, once. The queue must allow 3 receives and have a long
/// visibility timeout.
pub async fn after_max_receives_the_next_receive_reports_the_message_exhausted<Q: CoreQueue>(
    queue: Arc<Q>,
) {
    fail_three_times(queue.as_ref(), 7).await;
    let received = queue.receive(1, Duration::ZERO).await.unwrap();
    assert!(received.deliveries.is_empty());
    assert_eq!(received.exhausted.len(), 1, "the redrive must be reported");
    assert_eq!(received.exhausted[0].event_id, "e-7");
    assert_eq!(received.exhausted[0].error.code, "retries_exhausted");
    assert!(
        queue
            .receive(1, Duration::ZERO)
            .await
            .unwrap()
            .exhausted
            .is_empty(),
        "a redrive is reported once"
    );
}

/// Capability: an exhausted message's DLQ entry keeps its bytes, its last error and its blob,
/// and a redrive starts it afresh. The queue must allow 3 receives and have a long visibility
/// timeout.
pub async fn an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven<Q: FullQueue>(
    queue: Arc<Q>,
) {
    fail_three_times(queue.as_ref(), 7).await;
    assert_eq!(
        queue
            .receive(1, Duration::ZERO)
            .await
            .unwrap()
            .exhausted
            .len(),
        1
    );
    let dead = queue.list_dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error_class, FailureClass::RetriesExhausted);
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
    let again = receive_one(queue.as_ref()).await;
    assert_eq!(
        again.receive_count, 1,
        "a redriven message starts a fresh receive count"
    );
}

/// Capability: a permanent failure moves the message with its reason, once.
pub async fn a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue<Q: FullQueue>(
    queue: Arc<Q>,
) {
    queue.send(vec![message(3)]).await.unwrap();
    let delivery = receive_one(queue.as_ref()).await;
    let error = FailureInfo::new(ErrorCode::HashMismatch, "bad bytes");
    queue.dead_letter(&delivery, &error).await.unwrap();
    queue.dead_letter(&delivery, &error).await.unwrap();
    let dead = queue.list_dead_letters(10, Some("e-3")).await.unwrap();
    assert_eq!(
        dead.len(),
        1,
        "dead-lettering twice must not duplicate the entry"
    );
    assert_eq!(dead[0].error_class, FailureClass::Permanent);
    assert_eq!(dead[0].error, error);
    assert!(queue.get_dead_letter(&dead[0].id).await.unwrap().is_some());
    assert_eq!(queue.depth().await.unwrap().pending, 0);
}

//! Queue conformance checks (feature `conformance`), written once and run by each backend
//! crate's tests against a real backend. Each function panics with a sentence saying which
//! promise broke.
//! - Core checks hold for every [`Producer`] + [`Consumer`] (SQS included).
//! - Capability checks hold for backends that offer a capability: [`DeadLetterAdmin`],
//!   [`BlobReferences`], and the database backends' stronger promise that a stale receipt
//!   settles nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fluxa_core::ids::DeadLetterId;
use fluxa_core::{CorrelationId, ErrorCode, EventId, EventType, FailureClass, FailureInfo};

use crate::{
    BlobReferences, Consumer, DeadLetter, DeadLetterAdmin, DeadLetterFilter, EventPurge,
    MessageAttributes, NewMessage, Producer, QueueDepth, RedriveSelector,
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
            event_id: EventId::parse(&format!("e-{n}")).ok(),
            correlation_id: CorrelationId::parse("c").ok(),
            blob_key: Some(format!("events/e-{n}/blob.json")),
            event_type: EventType::parse("test.event").ok(),
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
    fail_three_times_message(queue, message(n)).await;
}

/// Sends `message`, then receives it 3 times, failing each transiently ("db down"). No other
/// message may be visible.
async fn fail_three_times_message<Q: CoreQueue + ?Sized>(queue: &Q, message: NewMessage) {
    queue.send(vec![message]).await.unwrap();
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
    assert_eq!(received.exhausted[0].event_id.as_str(), "e-7");
    assert_eq!(
        received.exhausted[0].error.code,
        ErrorCode::RetriesExhausted
    );
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
    let dead = queue
        .list_dead_letters(&DeadLetterFilter::default(), None, 10)
        .await
        .unwrap()
        .dead_letters;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error_class, FailureClass::RetriesExhausted);
    assert_eq!(dead[0].error.code, ErrorCode::RetriesExhausted);
    assert!(dead[0].error.message.contains("store_unavailable: db down"));
    assert_eq!(dead[0].receive_count, 3);
    assert_eq!(
        dead[0].body, b"{\"n\":7}",
        "the original bytes must be kept"
    );
    assert_eq!(event_id_of(&dead[0].attributes), Some("e-7"));
    assert_eq!(
        event_type_of(&dead[0].attributes),
        Some("test.event"),
        "a dead letter keeps its event type"
    );
    assert!(
        queue.references_blob("events/e-7/blob.json").await.unwrap(),
        "a dead letter's blob is still referenced"
    );
    assert!(!queue.references_blob("events/e-8/blob.json").await.unwrap());

    assert_eq!(
        queue
            .redrive(
                &RedriveSelector::Filter(DeadLetterFilter {
                    event_id: Some("e-7".into()),
                    ..DeadLetterFilter::default()
                }),
                10
            )
            .await
            .unwrap(),
        1
    );
    let again = receive_one(queue.as_ref()).await;
    assert_eq!(
        again.receive_count, 1,
        "a redriven message starts a fresh receive count"
    );
    assert_eq!(
        event_type_of(&again.attributes),
        Some("test.event"),
        "a redriven message keeps its event type"
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
    let dead = queue
        .list_dead_letters(
            &DeadLetterFilter {
                event_id: Some("e-3".into()),
                ..DeadLetterFilter::default()
            },
            None,
            10,
        )
        .await
        .unwrap()
        .dead_letters;
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

// Operator features (contract sections 4 and 8): DLQ filters, paging, bounded redrives,
// erasure, retention, and depth gauges that stay exact.

/// Message `n` (event `e-{n}`) of type `event_type`.
fn typed_message(n: usize, event_type: &str) -> NewMessage {
    let mut message = message(n);
    message.attributes.event_type = EventType::parse(event_type).ok();
    message
}

/// Sends `message`, receives it and dead-letters it as `code`, then waits a few milliseconds so
/// that the next dead letter is strictly later (SQLite keeps milliseconds). No other message
/// may be visible. Returns the new dead letter.
async fn dead_letter_one<Q: FullQueue + ?Sized>(
    queue: &Q,
    message: NewMessage,
    code: ErrorCode,
) -> DeadLetter {
    queue.send(vec![message]).await.unwrap();
    let delivery = receive_one(queue).await;
    let error = FailureInfo::new(code, format!("test {}", code.as_str()));
    queue.dead_letter(&delivery, &error).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    queue
        .get_dead_letter(&dead_letter_id(&delivery.message_id))
        .await
        .unwrap()
        .expect("a dead-lettered message must be in the DLQ")
}

/// Sends `messages`, receives them all and dead-letters each as `code`, all at once (so a
/// backend that groups writes gets groups, and many entries share a timestamp). No other
/// message may be visible and the visibility timeout must be long.
async fn dead_letter_all<Q: FullQueue>(queue: &Arc<Q>, messages: Vec<NewMessage>, code: ErrorCode) {
    let n_messages = messages.len();
    queue.send(messages).await.unwrap();
    let mut deliveries = Vec::with_capacity(n_messages);
    while deliveries.len() < n_messages {
        let got = queue.receive(100, Duration::ZERO).await.unwrap().deliveries;
        assert!(!got.is_empty(), "every message sent must be delivered");
        deliveries.extend(got);
    }
    let mut dead_letterings = tokio::task::JoinSet::new();
    for delivery in deliveries {
        let queue = Arc::clone(queue);
        dead_letterings.spawn(async move {
            let error = FailureInfo::new(code, "test");
            queue.dead_letter(&delivery, &error).await.unwrap();
        });
    }
    while let Some(done) = dead_letterings.join_next().await {
        done.unwrap();
    }
}

/// Every dead letter `filter` matches, read page by page (small pages, so paging is
/// exercised); checks the order and that only a full page says where the next one starts.
async fn all_dead_letters<Q: FullQueue + ?Sized>(
    queue: &Q,
    filter: &DeadLetterFilter,
) -> Vec<DeadLetter> {
    const PAGE: usize = 7;
    let mut all: Vec<DeadLetter> = Vec::new();
    let mut after = None;
    loop {
        let page = queue
            .list_dead_letters(filter, after.as_ref(), PAGE)
            .await
            .unwrap();
        assert!(
            page.dead_letters.len() <= PAGE,
            "a page holds at most its limit"
        );
        assert_eq!(
            page.next.is_some(),
            page.dead_letters.len() == PAGE,
            "a page says where the next starts exactly when it is full"
        );
        all.extend(page.dead_letters);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    for pair in all.windows(2) {
        assert!(
            (pair[0].dead_lettered_at, pair[0].id.as_str())
                < (pair[1].dead_lettered_at, pair[1].id.as_str()),
            "dead letters are listed in (dead_lettered_at, id) order, each once"
        );
    }
    all
}

fn ids(dead_letters: &[DeadLetter]) -> Vec<DeadLetterId> {
    dead_letters.iter().map(|d| d.id.clone()).collect()
}

/// A message id the backend chose, as a dead letter's id (the same id once dead-lettered).
fn dead_letter_id(message_id: &str) -> DeadLetterId {
    DeadLetterId::parse(message_id).expect("a backend's message ids are valid dead-letter ids")
}

fn event_id_of(attributes: &MessageAttributes) -> Option<&str> {
    attributes.event_id.as_ref().map(EventId::as_str)
}

fn event_type_of(attributes: &MessageAttributes) -> Option<&str> {
    attributes.event_type.as_ref().map(EventType::as_str)
}

/// Checks that `depth` says exactly what the queue and the DLQ hold, given how many messages
/// are in flight.
async fn assert_depth_is_exact<Q: FullQueue + ?Sized>(queue: &Q, in_flight: u64, step: &str) {
    let queued = queue.peek(100_000).await.unwrap();
    let dead = all_dead_letters(queue, &DeadLetterFilter::default()).await;
    let mut by_code = BTreeMap::<String, u64>::new();
    for dead_letter in &dead {
        *by_code
            .entry(dead_letter.error.code.as_str().to_owned())
            .or_default() += 1;
    }
    let expected = QueueDepth {
        pending: queued.len() as u64 - in_flight,
        in_flight,
        dead_letters: dead.len() as u64,
        oldest_enqueued_at: queued.first().map(|message| message.enqueued_at),
        dead_letters_by_code: by_code.into_iter().collect(),
    };
    assert_eq!(
        queue.depth().await.unwrap(),
        expected,
        "after {step}, depth must say exactly what the queue and the DLQ hold"
    );
}

/// Capability: every DLQ filter (error code, error class, event type, event id, since, until)
/// selects exactly its entries, alone and combined, and a count agrees with the listing. The
/// queue must allow 3 receives and have a long visibility timeout.
pub async fn dead_letters_can_be_filtered_by_code_class_type_event_and_time<Q: FullQueue>(
    queue: Arc<Q>,
) {
    let queue = queue.as_ref();
    let a = dead_letter_one(
        queue,
        typed_message(1, "order.created"),
        ErrorCode::HashMismatch,
    )
    .await;
    let b = dead_letter_one(
        queue,
        typed_message(2, "order.created"),
        ErrorCode::InvalidMessage,
    )
    .await;
    let c = dead_letter_one(
        queue,
        typed_message(3, "user.deleted"),
        ErrorCode::HashMismatch,
    )
    .await;
    fail_three_times_message(queue, typed_message(4, "user.deleted")).await;
    assert_eq!(
        queue
            .receive(1, Duration::ZERO)
            .await
            .unwrap()
            .exhausted
            .len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(3)).await;
    let e = dead_letter_one(
        queue,
        typed_message(1, "order.created"),
        ErrorCode::BlobMissing,
    )
    .await;
    let all = all_dead_letters(queue, &DeadLetterFilter::default()).await;
    assert_eq!(all.len(), 5);
    let d = all[3].clone();
    assert_eq!(
        ids(&all),
        ids(&[a.clone(), b.clone(), c.clone(), d.clone(), e.clone()]),
        "the listing runs oldest first"
    );
    assert_eq!(d.error_class, FailureClass::RetriesExhausted);
    assert_eq!(
        event_type_of(&d.attributes),
        Some("user.deleted"),
        "an exhausted message keeps its event type in the DLQ"
    );
    assert_eq!(event_type_of(&a.attributes), Some("order.created"));

    let nanosecond = chrono::TimeDelta::nanoseconds(1);
    let cases: Vec<(&str, DeadLetterFilter, Vec<&DeadLetter>)> = vec![
        (
            "no filter",
            DeadLetterFilter::default(),
            vec![&a, &b, &c, &d, &e],
        ),
        (
            "error_code",
            DeadLetterFilter {
                error_code: Some(ErrorCode::HashMismatch),
                ..DeadLetterFilter::default()
            },
            vec![&a, &c],
        ),
        (
            "error_class retries_exhausted",
            DeadLetterFilter {
                error_class: Some(FailureClass::RetriesExhausted),
                ..DeadLetterFilter::default()
            },
            vec![&d],
        ),
        (
            "error_class permanent",
            DeadLetterFilter {
                error_class: Some(FailureClass::Permanent),
                ..DeadLetterFilter::default()
            },
            vec![&a, &b, &c, &e],
        ),
        (
            "event_type",
            DeadLetterFilter {
                event_type: Some("user.deleted".into()),
                ..DeadLetterFilter::default()
            },
            vec![&c, &d],
        ),
        (
            "event_id",
            DeadLetterFilter {
                event_id: Some("e-1".into()),
                ..DeadLetterFilter::default()
            },
            vec![&a, &e],
        ),
        (
            "since (inclusive)",
            DeadLetterFilter {
                since: Some(c.dead_lettered_at),
                ..DeadLetterFilter::default()
            },
            vec![&c, &d, &e],
        ),
        (
            "until (exclusive)",
            DeadLetterFilter {
                until: Some(c.dead_lettered_at),
                ..DeadLetterFilter::default()
            },
            vec![&a, &b],
        ),
        (
            "since a nanosecond after an entry",
            DeadLetterFilter {
                since: Some(c.dead_lettered_at + nanosecond),
                ..DeadLetterFilter::default()
            },
            vec![&d, &e],
        ),
        (
            "until a nanosecond after an entry",
            DeadLetterFilter {
                until: Some(c.dead_lettered_at + nanosecond),
                ..DeadLetterFilter::default()
            },
            vec![&a, &b, &c],
        ),
        (
            "since and until",
            DeadLetterFilter {
                since: Some(b.dead_lettered_at),
                until: Some(d.dead_lettered_at),
                ..DeadLetterFilter::default()
            },
            vec![&b, &c],
        ),
        (
            "error_code and event_type",
            DeadLetterFilter {
                error_code: Some(ErrorCode::HashMismatch),
                event_type: Some("user.deleted".into()),
                ..DeadLetterFilter::default()
            },
            vec![&c],
        ),
        (
            "every filter at once",
            DeadLetterFilter {
                event_id: Some("e-1".into()),
                error_code: Some(ErrorCode::BlobMissing),
                error_class: Some(FailureClass::Permanent),
                event_type: Some("order.created".into()),
                since: Some(a.dead_lettered_at),
                until: Some(e.dead_lettered_at + nanosecond),
            },
            vec![&e],
        ),
        (
            "an error code no entry has",
            DeadLetterFilter {
                error_code: Some(ErrorCode::LeaseHeld),
                ..DeadLetterFilter::default()
            },
            vec![],
        ),
    ];
    for (name, filter, expected) in cases {
        let expected: Vec<DeadLetterId> = expected.into_iter().map(|d| d.id.clone()).collect();
        let listed = all_dead_letters(queue, &filter).await;
        assert_eq!(
            ids(&listed),
            expected,
            "filter {name} must select exactly its entries"
        );
        assert_eq!(
            queue.count_dead_letters(&filter).await.unwrap(),
            expected.len() as u64,
            "a count with filter {name} must agree with the listing"
        );
    }
}

/// Capability: paging through the DLQ with a cursor returns every entry exactly once, in
/// order, while more dead letters arrive between pages. The queue must have a long visibility
/// timeout.
pub async fn paging_through_dead_letters_returns_each_once_while_more_arrive<Q: FullQueue>(
    queue: Arc<Q>,
) {
    // Dead-lettered at once, so many share a timestamp and the id breaks the tie.
    dead_letter_all(
        &queue,
        (0..10).map(message).collect(),
        ErrorCode::InvalidMessage,
    )
    .await;
    let filter = DeadLetterFilter::default();
    let mut seen: Vec<DeadLetter> = Vec::new();
    let mut after = None;
    let mut n_pages = 0;
    loop {
        let page = queue
            .list_dead_letters(&filter, after.as_ref(), 3)
            .await
            .unwrap();
        n_pages += 1;
        seen.extend(page.dead_letters);
        if n_pages <= 4 {
            for n in 0..2 {
                dead_letter_one(
                    queue.as_ref(),
                    message(100 + 10 * n_pages + n),
                    ErrorCode::HashMismatch,
                )
                .await;
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let unique: HashSet<&str> = seen.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "paging must return no entry twice"
    );
    assert_eq!(
        seen.len(),
        18,
        "paging must return every entry, those that arrived meanwhile included"
    );
    for pair in seen.windows(2) {
        assert!(
            (pair[0].dead_lettered_at, pair[0].id.as_str())
                < (pair[1].dead_lettered_at, pair[1].id.as_str()),
            "pages run in (dead_lettered_at, id) order"
        );
    }
    assert_eq!(
        n_pages, 7,
        "18 entries in pages of 3: the sixth page is full, so a seventh (empty) one ends"
    );
    assert_eq!(queue.count_dead_letters(&filter).await.unwrap(), 18);
    let empty = queue.list_dead_letters(&filter, None, 0).await.unwrap();
    assert!(empty.dead_letters.is_empty() && empty.next.is_none());
}

/// Capability: a redrive moves at most its limit, oldest first, only what its selector
/// matches, and a redriven message keeps its attributes. The queue must have a long visibility
/// timeout.
pub async fn a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects<
    Q: FullQueue,
>(
    queue: Arc<Q>,
) {
    let queue = queue.as_ref();
    let mut hash_mismatches = Vec::new();
    for n in 0..4 {
        hash_mismatches.push(
            dead_letter_one(
                queue,
                typed_message(n, "order.created"),
                ErrorCode::HashMismatch,
            )
            .await,
        );
    }
    let mut invalid = Vec::new();
    for n in 10..12 {
        invalid.push(dead_letter_one(queue, message(n), ErrorCode::InvalidMessage).await);
    }
    let by_code = |code: ErrorCode| {
        RedriveSelector::Filter(DeadLetterFilter {
            error_code: Some(code),
            ..DeadLetterFilter::default()
        })
    };
    assert_eq!(
        queue
            .redrive(&by_code(ErrorCode::HashMismatch), 0)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        queue
            .redrive(&by_code(ErrorCode::HashMismatch), 3)
            .await
            .unwrap(),
        3,
        "a redrive moves at most its limit"
    );
    let redriven = queue.receive(10, Duration::ZERO).await.unwrap().deliveries;
    let mut redriven_ids: Vec<DeadLetterId> = redriven
        .iter()
        .map(|d| dead_letter_id(&d.message_id))
        .collect();
    redriven_ids.sort();
    let mut oldest_three = ids(&hash_mismatches[..3]);
    oldest_three.sort();
    assert_eq!(
        redriven_ids, oldest_three,
        "a redrive takes the oldest matching entries, and only matching ones"
    );
    for delivery in &redriven {
        assert_eq!(delivery.receive_count, 1);
        assert_eq!(event_type_of(&delivery.attributes), Some("order.created"));
        assert!(delivery.attributes.event_id.is_some());
        assert!(delivery.attributes.blob_key.is_some());
    }
    assert_eq!(
        ids(&all_dead_letters(queue, &DeadLetterFilter::default()).await),
        ids(&[
            hash_mismatches[3].clone(),
            invalid[0].clone(),
            invalid[1].clone()
        ]),
        "what was not selected stays in the DLQ"
    );
    assert_eq!(
        queue
            .redrive(&by_code(ErrorCode::BlobMissing), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        queue
            .redrive(&RedriveSelector::Id(invalid[1].id.clone()), 10)
            .await
            .unwrap(),
        1,
        "a redrive by id moves that entry"
    );
    assert_eq!(
        queue
            .redrive(&RedriveSelector::Id(invalid[1].id.clone()), 10)
            .await
            .unwrap(),
        0,
        "an entry is redriven once"
    );
    assert_eq!(
        queue
            .redrive(&RedriveSelector::Id(dead_letter_id("no-such-id")), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        ids(&all_dead_letters(queue, &DeadLetterFilter::default()).await),
        ids(&[hash_mismatches[3].clone(), invalid[0].clone()])
    );
}

/// Capability: `redrive_in_batches` moves every entry (more than two batches' worth), reports
/// its progress batch by batch, and a repeat moves nothing; two running at once on two handles
/// never move an entry twice. The queues must share one backend and have a long visibility
/// timeout.
pub async fn redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once<Q: FullQueue>(
    first: Arc<Q>,
    second: Arc<Q>,
) {
    const N: usize = 1200;
    dead_letter_all(
        &first,
        (0..N).map(message).collect(),
        ErrorCode::InvalidMessage,
    )
    .await;
    let everything = DeadLetterFilter::default();
    let mut progress = Vec::new();
    let moved = crate::redrive_in_batches(first.as_ref(), &everything, 500, |total| {
        progress.push(total)
    })
    .await
    .unwrap();
    assert_eq!(moved, N as u64, "a batched redrive moves everything");
    assert_eq!(
        progress,
        vec![500, 1000, 1200],
        "progress is reported batch by batch"
    );
    let again = crate::redrive_in_batches(first.as_ref(), &everything, 500, |_| {})
        .await
        .unwrap();
    assert_eq!(again, 0, "a repeated redrive moves nothing");
    let depth = first.depth().await.unwrap();
    assert_eq!((depth.pending, depth.dead_letters), (N as u64, 0));

    // Back to the DLQ, then two redrives at once.
    let mut deliveries = Vec::with_capacity(N);
    while deliveries.len() < N {
        let got = first.receive(100, Duration::ZERO).await.unwrap().deliveries;
        assert!(!got.is_empty());
        deliveries.extend(got);
    }
    let mut dead_letterings = tokio::task::JoinSet::new();
    for delivery in deliveries {
        let queue = Arc::clone(&first);
        dead_letterings.spawn(async move {
            let error = FailureInfo::new(ErrorCode::InvalidMessage, "again");
            queue.dead_letter(&delivery, &error).await.unwrap();
        });
    }
    while let Some(done) = dead_letterings.join_next().await {
        done.unwrap();
    }
    let (moved_first, moved_second) = tokio::join!(
        crate::redrive_in_batches(first.as_ref(), &everything, 100, |_| {}),
        crate::redrive_in_batches(second.as_ref(), &everything, 100, |_| {}),
    );
    assert_eq!(
        moved_first.unwrap() + moved_second.unwrap(),
        N as u64,
        "two redrives at once move every entry once between them"
    );
    let mut received = HashSet::new();
    loop {
        let got = first.receive(100, Duration::ZERO).await.unwrap().deliveries;
        if got.is_empty() {
            break;
        }
        for delivery in got {
            assert!(
                received.insert(delivery.message_id),
                "a message was enqueued twice"
            );
        }
    }
    assert_eq!(
        received.len(),
        N,
        "every redriven entry is in the queue once"
    );
    assert_eq!(first.count_dead_letters(&everything).await.unwrap(), 0);
}

/// Capability: purging an event deletes its dead letters (and only its), reports the blobs they
/// pointed at once each, and counts its messages still queued. The queue must have a long
/// visibility timeout.
pub async fn purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages<
    Q: FullQueue,
>(
    queue: Arc<Q>,
) {
    let queue = queue.as_ref();
    let mut other_blob = message(1);
    other_blob.attributes.blob_key = Some("events/e-1/other.json".into());
    dead_letter_one(queue, message(1), ErrorCode::HashMismatch).await;
    dead_letter_one(queue, message(1), ErrorCode::InvalidMessage).await;
    dead_letter_one(queue, other_blob, ErrorCode::BlobMissing).await;
    let kept = dead_letter_one(queue, message(2), ErrorCode::HashMismatch).await;
    queue.send(vec![message(1)]).await.unwrap();

    let purged = queue.purge_event("e-1").await.unwrap();
    assert_eq!(
        purged,
        EventPurge {
            dead_letters: 3,
            blob_keys: vec![
                "events/e-1/blob.json".to_owned(),
                "events/e-1/other.json".to_owned()
            ],
            queued: 1,
            queue_unsearchable: false,
        },
        "a purge deletes the event's dead letters, names their blobs once each and counts its queued messages"
    );
    assert_eq!(
        ids(&all_dead_letters(queue, &DeadLetterFilter::default()).await),
        vec![kept.id.clone()],
        "a purge deletes only that event's dead letters"
    );
    assert!(
        !queue
            .references_blob("events/e-1/other.json")
            .await
            .unwrap(),
        "a purged dead letter no longer references its blob"
    );
    assert_eq!(
        queue.purge_event("e-1").await.unwrap(),
        EventPurge {
            dead_letters: 0,
            blob_keys: vec![],
            queued: 1,
            queue_unsearchable: false,
        },
        "a repeated purge finds nothing more in the DLQ"
    );
    assert_eq!(
        queue.purge_event("e-unknown").await.unwrap(),
        EventPurge::default()
    );
    assert_depth_is_exact(queue, 0, "purges").await;
}

/// Capability: pruning deletes dead letters older than a time, oldest first, at most `limit`
/// at a time. The queue must have a long visibility timeout.
pub async fn pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches<
    Q: FullQueue,
>(
    queue: Arc<Q>,
) {
    let queue = queue.as_ref();
    let mut dead = Vec::new();
    for n in 0..5 {
        dead.push(dead_letter_one(queue, message(n), ErrorCode::InvalidMessage).await);
    }
    let before = dead[3].dead_lettered_at;
    assert_eq!(queue.prune_dead_letters(before, 0).await.unwrap(), 0);
    assert_eq!(queue.prune_dead_letters(before, 2).await.unwrap(), 2);
    assert_eq!(
        ids(&all_dead_letters(queue, &DeadLetterFilter::default()).await),
        ids(&dead[2..]),
        "a prune deletes the oldest entries first"
    );
    assert_eq!(queue.prune_dead_letters(before, 2).await.unwrap(), 1);
    assert_eq!(
        queue.prune_dead_letters(before, 2).await.unwrap(),
        0,
        "a prune keeps what was dead-lettered at or after its time"
    );
    assert_eq!(
        ids(&all_dead_letters(queue, &DeadLetterFilter::default()).await),
        ids(&dead[3..])
    );
    assert_depth_is_exact(queue, 0, "prunes").await;
}

/// Capability: `depth` (read from counters, not by counting rows) stays exact through send,
/// receive, delete, retry_later, dead_letter, exhaustion on receive, redrive, purge_event and
/// prune_dead_letters, including writes from two handles at once. The queues must share one
/// backend, allow 3 receives and have a long visibility timeout.
pub async fn the_depth_counters_stay_exact_through_every_kind_of_change<Q: FullQueue>(
    first: Arc<Q>,
    second: Arc<Q>,
) {
    let queue = first.as_ref();
    assert_eq!(queue.depth().await.unwrap(), QueueDepth::default());
    fail_three_times(queue, 7).await;
    assert_depth_is_exact(queue, 0, "three receives and retries").await;
    assert_eq!(
        queue
            .receive(1, Duration::ZERO)
            .await
            .unwrap()
            .exhausted
            .len(),
        1
    );
    assert_depth_is_exact(queue, 0, "an exhaustion on receive").await;

    queue.send((10..15).map(message).collect()).await.unwrap();
    assert_depth_is_exact(queue, 0, "a send").await;
    let received = queue.receive(2, Duration::ZERO).await.unwrap().deliveries;
    assert_eq!(received.len(), 2);
    assert_depth_is_exact(queue, 2, "a receive").await;
    queue.delete_many(&[&received[0]]).await.unwrap();
    assert_depth_is_exact(queue, 1, "a delete").await;
    queue.delete_many(&[&received[0]]).await.unwrap();
    assert_depth_is_exact(queue, 1, "a repeated delete").await;
    let error = FailureInfo::new(ErrorCode::StoreUnavailable, "db down");
    queue
        .retry_later(&received[1], Duration::from_secs(3600), &error)
        .await
        .unwrap();
    assert_depth_is_exact(queue, 0, "a retry later (a delayed message is pending)").await;
    let delivery = receive_one(queue).await;
    let failure = FailureInfo::new(ErrorCode::HashMismatch, "bad bytes");
    queue.dead_letter(&delivery, &failure).await.unwrap();
    assert_depth_is_exact(queue, 0, "a dead letter").await;
    queue.dead_letter(&delivery, &failure).await.unwrap();
    assert_depth_is_exact(queue, 0, "a repeated dead letter").await;
    assert_eq!(
        queue
            .redrive(
                &RedriveSelector::Id(dead_letter_id(&delivery.message_id)),
                1
            )
            .await
            .unwrap(),
        1
    );
    assert_depth_is_exact(queue, 0, "a redrive (the emptied code disappears)").await;
    queue.purge_event("e-7").await.unwrap();
    assert_depth_is_exact(queue, 0, "a purge").await;

    // Writes from two handles at once (on PostgreSQL, several connections and counter slots).
    let mut writers = tokio::task::JoinSet::new();
    for writer_idx in 0..10 {
        let queue = Arc::clone(if writer_idx % 2 == 0 { &first } else { &second });
        writers.spawn(async move {
            let first_n = 100 + 20 * writer_idx;
            queue
                .send((first_n..first_n + 20).map(message).collect())
                .await
                .unwrap();
            let got = queue.receive(10, Duration::ZERO).await.unwrap().deliveries;
            let (deleted, failed) = got.split_at(got.len() / 2);
            queue
                .delete_many(&deleted.iter().collect::<Vec<_>>())
                .await
                .unwrap();
            for (delivery_idx, delivery) in failed.iter().enumerate() {
                let code = if delivery_idx % 2 == 0 {
                    ErrorCode::InvalidMessage
                } else {
                    ErrorCode::BlobMissing
                };
                queue
                    .dead_letter(delivery, &FailureInfo::new(code, "test"))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    assert_depth_is_exact(queue, 0, "concurrent sends, deletes and dead letters").await;
    let dead = queue
        .count_dead_letters(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert!(dead > 10, "the concurrent writers dead-lettered messages");
    assert_eq!(
        queue
            .prune_dead_letters(chrono::Utc::now(), 7)
            .await
            .unwrap(),
        7
    );
    assert_depth_is_exact(queue, 0, "a prune").await;
    let moved = crate::redrive_in_batches(queue, &DeadLetterFilter::default(), 4, |_| {})
        .await
        .unwrap();
    assert_eq!(moved, dead - 7);
    assert_depth_is_exact(queue, 0, "a batched redrive").await;
}

/// Capability (database backends): a dead letter's own record (id, class, code, counts,
/// times) is parsed when it is read back, and one that does not parse (damage done outside
/// Fluxa; here `corrupt` runs a plain SQL statement on the backend's database) is
/// `Error::Corrupt`, never a default or another code. A message attribute that does not parse
/// is only a hint lost: it reads as absent, and neither the receive nor the DLQ fails over it.
/// The queue must have a long visibility timeout.
pub async fn a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent<
    Q: FullQueue,
    F,
    Fut,
>(
    queue: Arc<Q>,
    corrupt: F,
) where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    queue.send(vec![message(1)]).await.unwrap();
    corrupt("UPDATE queue_messages SET event_id = 'not/an id', event_type = ''").await;
    let delivery = receive_one(queue.as_ref()).await;
    assert_eq!(
        (
            &delivery.attributes.event_id,
            &delivery.attributes.event_type
        ),
        (&None, &None),
        "attributes that do not parse read as absent"
    );
    assert_eq!(
        delivery.attributes.correlation_id,
        CorrelationId::parse("c").ok(),
        "the attributes that parse are kept"
    );
    let error = FailureInfo::new(ErrorCode::HashMismatch, "test");
    queue.dead_letter(&delivery, &error).await.unwrap();
    let id = dead_letter_id(&delivery.message_id);
    let dead = queue
        .get_dead_letter(&id)
        .await
        .unwrap()
        .expect("a dead-lettered message must be in the DLQ");
    assert_eq!(dead.attributes.event_id, None);
    assert_eq!(dead.error, error, "the reason reads back as written");

    corrupt("UPDATE dead_letters SET error_code = 'gremlins'").await;
    match queue.get_dead_letter(&id).await {
        Err(crate::Error::Corrupt(_)) => {}
        other => panic!("a dead letter with an unknown error code must be Corrupt, not {other:?}"),
    }
    match queue
        .list_dead_letters(&DeadLetterFilter::default(), None, 10)
        .await
    {
        Err(crate::Error::Corrupt(_)) => {}
        other => panic!(
            "a listing over a dead letter with an unknown error code must be Corrupt, not {other:?}"
        ),
    }
}

/// Generates one `#[tokio::test]` per core check, under the check's own name (the names are
/// what `ARCHITECTURE.md` and `docs/RELIABILITY.md` cite), for a backend that is only a
/// [`CoreQueue`] (SQS). Each test makes its own database with `database`, then opens as many
/// handles on it as the check needs (two play two processes) with `open`, given the
/// visibility timeout the check needs:
///
/// ```ignore
/// fluxa_queue::core_queue_conformance_tests! {
///     database: dir = tempfile::tempdir().unwrap(),
///     open: |visibility| open(dir.path(), visibility).await.queue,
/// }
/// ```
///
/// The `database` binding is the backend file's own name, so `open` can use it.
#[macro_export]
macro_rules! core_queue_conformance_tests {
    (
        database: $db:ident = $database:expr,
        open: |$visibility:ident| $open:expr $(,)?
    ) => {
        #[::tokio::test]
        async fn concurrent_receivers_never_get_the_same_message() {
            let $db = $database;
            let $visibility = ::std::time::Duration::from_secs(60);
            let first = ::std::sync::Arc::new($open);
            let second = ::std::sync::Arc::new($open);
            $crate::conformance::concurrent_receivers_never_get_the_same_message(first, second)
                .await;
        }

        #[::tokio::test]
        async fn a_message_reappears_after_its_visibility_timeout_and_delete_removes_it() {
            let $db = $database;
            let $visibility = ::std::time::Duration::from_millis(100);
            let queue = ::std::sync::Arc::new($open);
            $crate::conformance::a_message_reappears_after_its_visibility_timeout_and_delete_removes_it(queue)
                .await;
        }

        #[::tokio::test]
        async fn after_max_receives_the_next_receive_reports_the_message_exhausted() {
            let $db = $database;
            let $visibility = ::std::time::Duration::from_secs(60);
            let queue = ::std::sync::Arc::new($open);
            $crate::conformance::after_max_receives_the_next_receive_reports_the_message_exhausted(queue)
                .await;
        }
    };
}

/// Generates one `#[tokio::test]` per check, core and capability, under the check's own name,
/// for a backend that is a [`FullQueue`] (the database backends). `database` and `open` are as
/// for [`core_queue_conformance_tests!`]; `run_sql` runs a plain SQL statement on the queue's
/// database (damage done outside Fluxa):
///
/// ```ignore
/// fluxa_queue::queue_conformance_tests! {
///     database: dir = tempfile::tempdir().unwrap(),
///     open: |visibility| open(dir.path(), visibility).await.queue,
///     run_sql: |sql| run_sql_on(dir.path(), "queue.db", sql),
/// }
/// ```
#[macro_export]
macro_rules! queue_conformance_tests {
    (
        database: $db:ident = $database:expr,
        open: |$visibility:ident| $open:expr,
        run_sql: |$sql:ident| $run_sql:expr $(,)?
    ) => {
        $crate::core_queue_conformance_tests! {
            database: $db = $database,
            open: |$visibility| $open,
        }

        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob, from_millis(100));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            dead_letters_can_be_filtered_by_code_class_type_event_and_time, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            paging_through_dead_letters_returns_each_once_while_more_arrive, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages, from_secs(60));
        $crate::queue_conformance_tests!(@one $db = $database, |$visibility| $open;
            pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches, from_secs(60));
        $crate::queue_conformance_tests!(@two $db = $database, |$visibility| $open;
            redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once);
        $crate::queue_conformance_tests!(@two $db = $database, |$visibility| $open;
            the_depth_counters_stay_exact_through_every_kind_of_change);

        #[::tokio::test]
        async fn a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent() {
            let $db = $database;
            let $visibility = ::std::time::Duration::from_secs(60);
            let queue = ::std::sync::Arc::new($open);
            $crate::conformance::a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent(
                queue,
                |$sql| $run_sql,
            )
            .await;
        }
    };

    // A check on one handle, with the visibility timeout it needs.
    (@one $db:ident = $database:expr, |$visibility:ident| $open:expr;
        $check:ident, $visible_for:ident($amount:literal)) => {
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let $visibility = ::std::time::Duration::$visible_for($amount);
            let queue = ::std::sync::Arc::new($open);
            $crate::conformance::$check(queue).await;
        }
    };

    // A check on two handles (two processes), with a long visibility timeout.
    (@two $db:ident = $database:expr, |$visibility:ident| $open:expr; $check:ident) => {
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let $visibility = ::std::time::Duration::from_secs(60);
            let first = ::std::sync::Arc::new($open);
            let second = ::std::sync::Arc::new($open);
            $crate::conformance::$check(first, second).await;
        }
    };
}

//! Store conformance checks (feature `conformance`): the semantics every [`Store`] must keep,
//! written once and run by each backend crate's tests against a real database. Each function
//! panics with a sentence saying which promise broke.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use fluxa_core::{
    CorrelationId, ErrorCode, EventId, EventType, FailureInfo, PayloadHash, PayloadMode, Source,
};

use crate::{
    Erasure, EventFilter, EventPosition, EventReader, Eviction, Lease, NewEvent, Status, Store,
    StoreAdmin, Write, WriteAction, WriteResult,
};

/// What [`ClaimExt::claim`] asks for: a lease on one event.
#[derive(Clone, Debug)]
pub struct ClaimRequest<'a> {
    pub event_id: &'a EventId,
    pub payload_sha256: &'a PayloadHash,
    pub correlation_id: &'a CorrelationId,
    pub lease: Duration,
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Go ahead: no one has processed this event and no live lease is held on it.
    Acquired(Lease),
    /// The event is already stored, with this payload hash.
    AlreadyProcessed { payload_sha256: PayloadHash },
    /// Another worker holds a live lease until `until`.
    Busy { until: DateTime<Utc> },
    /// The event was erased by an operator: drop the message.
    Erased,
}

/// A lease on one event at a time, for tests: the processor takes its leases in batches with
/// [`Store::apply`], so this is test surface, kept out of the production trait.
#[async_trait::async_trait]
pub trait ClaimExt {
    /// Takes a lease on one event: [`Store::apply`] with one [`WriteAction::Lease`].
    async fn claim(&self, request: ClaimRequest<'_>) -> crate::Result<Claim>;
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> ClaimExt for S {
    async fn claim(&self, request: ClaimRequest<'_>) -> crate::Result<Claim> {
        let write = Write {
            event_id: request.event_id.clone(),
            payload_sha256: request.payload_sha256.clone(),
            correlation_id: request.correlation_id.clone(),
            lease: None,
            action: WriteAction::Lease(request.lease),
        };
        match self.apply(vec![write]).await?.pop() {
            Some(WriteResult::Applied { lease: Some(lease) }) => Ok(Claim::Acquired(lease)),
            Some(WriteResult::AlreadyProcessed { payload_sha256 }) => {
                Ok(Claim::AlreadyProcessed { payload_sha256 })
            }
            Some(WriteResult::Busy { until }) => Ok(Claim::Busy { until }),
            Some(WriteResult::Erased) => Ok(Claim::Erased),
            other => Err(crate::Error::Corrupt(format!(
                "a lease write answered {other:?}"
            ))),
        }
    }
}

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
    assert_eq!(stored.payload.as_deref(), Some(&b"{\"n\": 1}"[..]));
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
        abandoned_status.last_error.map(|e| e.code),
        Some(ErrorCode::RetriesExhausted)
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

/// A fixed instant in whole milliseconds, so every backend stores it exactly.
fn base_time() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_800_000_000_000).unwrap()
}

fn at(millis: i64) -> DateTime<Utc> {
    base_time() + chrono::Duration::milliseconds(millis)
}

fn event_id(text: &str) -> EventId {
    EventId::parse(text).unwrap()
}

/// A `Store` write (claim and store in one) of an event with the given listing columns; its
/// payload is its own id, so a listing's payloads can be checked against its ids.
fn listed_write(
    id: &str,
    event_type: &str,
    source: Option<&str>,
    received_at: DateTime<Utc>,
) -> Write {
    let payload = Bytes::copy_from_slice(format!("\"{id}\"").as_bytes());
    Write {
        event_id: event_id(id),
        payload_sha256: PayloadHash::of(&payload),
        correlation_id: CorrelationId::parse("c").unwrap(),
        lease: None,
        action: WriteAction::Store(NewEvent {
            event_type: EventType::parse(event_type).unwrap(),
            source: source.map(|source| Source::parse(source).unwrap()),
            occurred_at: None,
            payload,
            payload_mode: PayloadMode::Inline,
            received_at,
        }),
    }
}

async fn store_all(store: &dyn Store, writes: Vec<Write>) {
    let n_writes = writes.len();
    let results = store.apply(writes).await.unwrap();
    assert_eq!(
        results,
        vec![WriteResult::Applied { lease: None }; n_writes],
        "every event of the fixture must be stored"
    );
}

/// The ids of one listing, all of it, in the order pages returned them.
async fn list_ids(
    reader: &dyn EventReader,
    filter: &EventFilter,
    limit: usize,
    include_payload: bool,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<EventPosition> = None;
    for _ in 0..1000 {
        let page = reader
            .list_events(filter, after.as_ref(), limit, include_payload)
            .await
            .unwrap();
        assert!(page.events.len() <= limit, "a page holds at most `limit`");
        for event in &page.events {
            let expected = include_payload.then(|| format!("\"{}\"", event.event_id).into_bytes());
            assert_eq!(
                event.payload, expected,
                "a listing carries the payload exactly when asked to"
            );
        }
        ids.extend(page.events.iter().map(|event| event.event_id.to_string()));
        match page.next {
            Some(next) => {
                let last = page.events.last().expect("a page with a next has events");
                assert_eq!(
                    (next.received_at, next.event_id.as_str()),
                    (last.received_at, last.event_id.as_str()),
                    "the next page starts after the last event of this one"
                );
                after = Some(next);
            }
            None => {
                assert!(
                    page.events.len() < limit,
                    "a full page always says where the next one starts"
                );
                return ids;
            }
        }
    }
    panic!("a listing of a few events must end: the cursor does not move it forward");
}

/// Contract section 2: a listing returns the stored events oldest `received_at` first (ties by
/// `event_id`), `event_type` and `source` match exactly, `since` is inclusive and `until`
/// exclusive, the filters combine with AND, and the payload comes only when asked for.
pub async fn listing_filters_by_type_source_and_time_window_in_received_order(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
) {
    store_all(
        store.as_ref(),
        vec![
            listed_write("ev-5", "order.created", Some("checkout"), at(5_000)),
            listed_write("ev-1", "order.created", Some("checkout"), at(1_000)),
            listed_write("ev-2b", "order.paid", Some("billing"), at(2_000)),
            listed_write("ev-2a", "order.created", None, at(2_000)),
            listed_write("ev-3", "order.paid", Some("checkout"), at(3_000)),
            listed_write("ev-4", "order.created", Some("billing"), at(4_000)),
        ],
    )
    .await;
    let ids = |list: &[&str]| list.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    let order_created = Some(EventType::parse("order.created").unwrap());
    let checkout = Some(Source::parse("checkout").unwrap());
    let cases = [
        (
            EventFilter::default(),
            ids(&["ev-1", "ev-2a", "ev-2b", "ev-3", "ev-4", "ev-5"]),
        ),
        (
            EventFilter {
                event_type: order_created.clone(),
                ..EventFilter::default()
            },
            ids(&["ev-1", "ev-2a", "ev-4", "ev-5"]),
        ),
        (
            EventFilter {
                source: checkout.clone(),
                ..EventFilter::default()
            },
            ids(&["ev-1", "ev-3", "ev-5"]),
        ),
        (
            EventFilter {
                event_type: order_created.clone(),
                source: checkout.clone(),
                ..EventFilter::default()
            },
            ids(&["ev-1", "ev-5"]),
        ),
        (
            EventFilter {
                since: Some(at(2_000)),
                until: Some(at(4_000)),
                ..EventFilter::default()
            },
            ids(&["ev-2a", "ev-2b", "ev-3"]),
        ),
        (
            EventFilter {
                event_type: order_created.clone(),
                since: Some(at(1_001)),
                ..EventFilter::default()
            },
            ids(&["ev-2a", "ev-4", "ev-5"]),
        ),
        (
            EventFilter {
                source: checkout.clone(),
                until: Some(at(3_000)),
                ..EventFilter::default()
            },
            ids(&["ev-1"]),
        ),
        (
            EventFilter {
                event_type: order_created,
                source: checkout,
                since: Some(at(1_000)),
                until: Some(at(5_001)),
            },
            ids(&["ev-1", "ev-5"]),
        ),
        (
            EventFilter {
                event_type: Some(EventType::parse("nothing.here").unwrap()),
                ..EventFilter::default()
            },
            Vec::new(),
        ),
    ];
    for (filter, expected) in cases {
        for limit in [1, 2, 100] {
            for include_payload in [false, true] {
                assert_eq!(
                    list_ids(reader.as_ref(), &filter, limit, include_payload).await,
                    expected,
                    "listing {filter:?} by pages of {limit}"
                );
            }
        }
    }

    let page = reader
        .list_events(&EventFilter::default(), None, 6, false)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 6);
    let first = &page.events[0];
    assert_eq!(
        (
            first.event_type.as_str(),
            first.source.as_ref().map(Source::as_str)
        ),
        ("order.created", Some("checkout"))
    );
    assert_eq!(first.received_at, at(1_000), "received_at round-trips");
    assert_eq!(first.payload_sha256, PayloadHash::of(b"\"ev-1\""));
    assert_eq!(first.payload_size, 6);
    let next = page.next.expect("a full page has a next position");
    let rest = reader
        .list_events(&EventFilter::default(), Some(&next), 6, false)
        .await
        .unwrap();
    assert!(
        rest.events.is_empty() && rest.next.is_none(),
        "after the last event, an empty last page"
    );
}

/// Contract section 2: paging through a table that grows between pages returns every event
/// that existed when paging began exactly once, in order, and never one twice; events that
/// arrive later show up only if they sort after the page in hand.
pub async fn paging_returns_every_event_once_while_new_events_arrive(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
) {
    // 30 events, in threes with the same received_at, so pages split ties.
    let initial: Vec<String> = (0..30).map(|n| format!("page-{n:02}")).collect();
    store_all(
        store.as_ref(),
        initial
            .iter()
            .enumerate()
            .map(|(n, id)| listed_write(id, "t", Some("s"), at((n / 3) as i64 * 10)))
            .collect(),
    )
    .await;
    let filter = EventFilter {
        event_type: Some(EventType::parse("t").unwrap()),
        ..EventFilter::default()
    };
    let mut seen: Vec<(DateTime<Utc>, String)> = Vec::new();
    let mut after: Option<EventPosition> = None;
    for page_idx in 0.. {
        let page = reader
            .list_events(&filter, after.as_ref(), 4, false)
            .await
            .unwrap();
        seen.extend(
            page.events
                .iter()
                .map(|event| (event.received_at, event.event_id.to_string())),
        );
        // New arrivals between pages: one late (received before the page in hand, as a
        // message that waited in the queue is), one at the same instant as the page's last
        // event, one in the future.
        if let Some(last) = page.events.last() {
            store_all(
                store.as_ref(),
                vec![
                    listed_write(&format!("late-{page_idx}"), "t", None, at(0)),
                    listed_write(&format!("tie-{page_idx}"), "t", None, last.received_at),
                    listed_write(
                        &format!("new-{page_idx}"),
                        "t",
                        None,
                        at(1_000_000 + page_idx),
                    ),
                ],
            )
            .await;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(page_idx < 1000, "paging must end");
    }
    for id in &initial {
        assert_eq!(
            seen.iter().filter(|(_, seen_id)| seen_id == id).count(),
            1,
            "{id} existed when paging began and must be listed exactly once"
        );
    }
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "pages follow (received_at, event_id) strictly: no event twice, none out of order"
    );
}

/// Contract section 8: erasing an event deletes its row and turns its record into an `erased`
/// tombstone without a payload hash; every later write of it (a redelivery, with or without a
/// lease) answers `Erased` and stores nothing. A tombstone can be asked for an event that is
/// only in the queue, and a lease held during the erasure loses.
pub async fn an_erased_event_is_gone_and_no_later_write_brings_it_back(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
    reader: Arc<dyn EventReader>,
) {
    store_all(store.as_ref(), vec![listed_write("gone", "t", None, at(0))]).await;
    let gone = event_id("gone");
    assert_eq!(
        admin.erase(&gone, false).await.unwrap(),
        Erasure {
            event_deleted: true,
            had_record: true
        }
    );
    assert!(
        reader.event(&gone).await.unwrap().is_none(),
        "the row is gone"
    );
    let record = admin.idempotency_record(&gone).await.unwrap().unwrap();
    assert_eq!(record.status, Status::Erased);
    assert_eq!(
        record.payload_sha256, None,
        "an erased record keeps no hash"
    );
    assert_eq!(record.lease_expires_at, None);
    assert!(record.last_error.is_none());
    assert_eq!(
        reader.status(&gone).await.unwrap().unwrap().status,
        Status::Erased
    );
    assert!(
        list_ids(reader.as_ref(), &EventFilter::default(), 10, true)
            .await
            .is_empty(),
        "an erased event is not listed"
    );

    // A redelivery: the same event again, claimed and stored in one write.
    assert_eq!(
        store
            .apply(vec![listed_write("gone", "t", None, at(0))])
            .await
            .unwrap(),
        vec![WriteResult::Erased]
    );
    let hash = PayloadHash::of(b"\"gone\"");
    let correlation_id = CorrelationId::parse("c").unwrap();
    assert_eq!(
        store
            .claim(ClaimRequest {
                event_id: &gone,
                payload_sha256: &hash,
                correlation_id: &correlation_id,
                lease: Duration::from_secs(30),
            })
            .await
            .unwrap(),
        Claim::Erased
    );
    assert!(reader.event(&gone).await.unwrap().is_none());

    // A worker holds a lease while the event is erased: its store finds the tombstone.
    let leased = event_id("leased");
    let Claim::Acquired(lease) = store
        .claim(ClaimRequest {
            event_id: &leased,
            payload_sha256: &PayloadHash::of(b"\"leased\""),
            correlation_id: &correlation_id,
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
    else {
        panic!("a first claim must win");
    };
    assert_eq!(
        admin.erase(&leased, false).await.unwrap(),
        Erasure {
            event_deleted: false,
            had_record: true
        }
    );
    let record = admin.idempotency_record(&leased).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.lease_expires_at),
        (Status::Erased, None),
        "erasing breaks the lease"
    );
    let mut with_lease = listed_write("leased", "t", None, at(0));
    with_lease.lease = Some(lease);
    assert_eq!(
        store.apply(vec![with_lease]).await.unwrap(),
        vec![WriteResult::Erased]
    );
    assert!(reader.event(&leased).await.unwrap().is_none());

    // Only in the queue so far: the tombstone is written ahead of the delivery.
    let queued = event_id("queued");
    assert_eq!(
        admin.erase(&queued, true).await.unwrap(),
        Erasure::default()
    );
    assert_eq!(
        admin
            .idempotency_record(&queued)
            .await
            .unwrap()
            .map(|record| record.status),
        Some(Status::Erased)
    );
    assert_eq!(
        store
            .apply(vec![listed_write("queued", "t", None, at(0))])
            .await
            .unwrap(),
        vec![WriteResult::Erased]
    );
    assert!(reader.event(&queued).await.unwrap().is_none());

    // Erasing twice is harmless.
    assert_eq!(
        admin.erase(&gone, false).await.unwrap(),
        Erasure {
            event_deleted: false,
            had_record: true
        }
    );
}

/// Erasing an id the store has never seen, without asking for a tombstone, writes nothing: the
/// event can still be stored afterwards.
pub async fn erasing_an_unknown_event_without_a_tombstone_writes_nothing(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
) {
    let nobody = event_id("nobody");
    assert_eq!(
        admin.erase(&nobody, false).await.unwrap(),
        Erasure::default()
    );
    assert!(admin.idempotency_record(&nobody).await.unwrap().is_none());
    assert_eq!(
        store
            .apply(vec![listed_write("nobody", "t", None, at(0))])
            .await
            .unwrap(),
        vec![WriteResult::Applied { lease: None }]
    );
}

/// Contract section 8: evicting deletes a `processing` or `failed` record, so the next
/// delivery starts afresh (attempts from 1); a `processed` or `erased` record is refused and
/// stays; an unknown id is not found.
pub async fn evict_deletes_processing_and_failed_records_and_refuses_the_rest(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
) {
    let hash = PayloadHash::of(b"1");
    let correlation_id = CorrelationId::parse("c").unwrap();
    let claim = |id: &'static str| {
        let (store, hash, correlation_id) = (store.clone(), hash.clone(), correlation_id.clone());
        async move {
            store
                .claim(ClaimRequest {
                    event_id: &event_id(id),
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease: Duration::from_secs(30),
                })
                .await
                .unwrap()
        }
    };
    assert!(matches!(claim("in-progress").await, Claim::Acquired(_)));
    store
        .record_error(
            &event_id("broken"),
            &FailureInfo::new(ErrorCode::InvalidMessage, "x"),
        )
        .await
        .unwrap();
    store_all(store.as_ref(), vec![listed_write("done", "t", None, at(0))]).await;
    admin.erase(&event_id("erased"), true).await.unwrap();

    for (id, expected) in [
        ("in-progress", Eviction::Evicted),
        ("broken", Eviction::Evicted),
        ("done", Eviction::Refused(Status::Processed)),
        ("erased", Eviction::Refused(Status::Erased)),
        ("unknown", Eviction::NotFound),
    ] {
        assert_eq!(
            admin.evict(&event_id(id)).await.unwrap(),
            expected,
            "evicting {id}"
        );
        let kept = admin.idempotency_record(&event_id(id)).await.unwrap();
        assert_eq!(
            kept.is_some(),
            matches!(expected, Eviction::Refused(_)),
            "only a refused record stays ({id})"
        );
    }
    let Claim::Acquired(fresh) = claim("in-progress").await else {
        panic!("an evicted record's event can be claimed at once");
    };
    assert_eq!(fresh.attempts, 1, "an evicted record starts afresh");
    assert!(matches!(claim("broken").await, Claim::Acquired(_)));
}

/// Retention: `prune_events` deletes events received before the cut-off (and only those),
/// oldest first, at most `limit` a call, and leaves idempotency records alone.
pub async fn pruning_events_deletes_only_older_ones_at_most_limit_per_call(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
    reader: Arc<dyn EventReader>,
) {
    let mut writes: Vec<Write> = (0..5)
        .map(|n| listed_write(&format!("old-{n}"), "t", None, at(n * 1_000)))
        .collect();
    writes.push(listed_write("at-cutoff", "t", None, at(10_000)));
    writes.push(listed_write("young", "t", None, at(3_600_000)));
    store_all(store.as_ref(), writes).await;
    let cutoff = at(10_000);
    let mut n_deleted = Vec::new();
    loop {
        let n = admin.prune_events(cutoff, 2).await.unwrap();
        n_deleted.push(n);
        if n == 0 {
            break;
        }
        assert!(n_deleted.len() < 10, "pruning must end");
    }
    assert_eq!(n_deleted, vec![2, 2, 1, 0], "at most `limit` a call");
    assert_eq!(
        list_ids(reader.as_ref(), &EventFilter::default(), 10, false).await,
        vec!["at-cutoff".to_owned(), "young".to_owned()],
        "the cut-off is exclusive and younger events stay"
    );
    assert_eq!(
        reader
            .status(&event_id("old-0"))
            .await
            .unwrap()
            .map(|status| status.status),
        Some(Status::Processed),
        "pruning events leaves their records to the idempotency window"
    );
}

/// Retention: `prune_idempotency` deletes records last updated before the cut-off whose event
/// is gone (pruned, erased, never stored) and that no live lease holds, at most `limit` a
/// call; a pruned id may then be stored again (the end of the deduplication window).
pub async fn pruning_idempotency_records_deletes_only_stale_ones_without_an_event_or_live_lease(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
    reader: Arc<dyn EventReader>,
) {
    let correlation_id = CorrelationId::parse("c").unwrap();
    let hash = PayloadHash::of(b"1");
    let claim = |id: &'static str, lease: Duration| {
        let (store, hash, correlation_id) = (store.clone(), hash.clone(), correlation_id.clone());
        async move {
            let claim = store
                .claim(ClaimRequest {
                    event_id: &event_id(id),
                    payload_sha256: &hash,
                    correlation_id: &correlation_id,
                    lease,
                })
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Acquired(_)), "a first claim wins");
        }
    };
    // Stored long ago, its event pruned since: stale.
    store_all(
        store.as_ref(),
        vec![
            listed_write("pruned-processed", "t", None, at(0)),
            listed_write("kept-stored", "t", None, at(3_600_000)),
        ],
    )
    .await;
    assert_eq!(admin.prune_events(at(1), 10).await.unwrap(), 1);
    store
        .record_error(
            &event_id("pruned-failed"),
            &FailureInfo::new(ErrorCode::InvalidMessage, "x"),
        )
        .await
        .unwrap();
    admin.erase(&event_id("pruned-erased"), true).await.unwrap();
    claim("pruned-expired", Duration::from_millis(30)).await;
    claim("kept-live", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .record_error(
            &event_id("kept-recent"),
            &FailureInfo::new(ErrorCode::InvalidMessage, "x"),
        )
        .await
        .unwrap();

    let mut n_deleted = Vec::new();
    loop {
        let n = admin.prune_idempotency(cutoff, 3).await.unwrap();
        n_deleted.push(n);
        if n == 0 {
            break;
        }
        assert!(n_deleted.len() < 10, "pruning must end");
    }
    assert_eq!(n_deleted, vec![3, 1, 0], "at most `limit` a call");
    for id in [
        "pruned-processed",
        "pruned-failed",
        "pruned-erased",
        "pruned-expired",
    ] {
        assert!(
            admin
                .idempotency_record(&event_id(id))
                .await
                .unwrap()
                .is_none(),
            "{id} must be pruned"
        );
    }
    for id in ["kept-stored", "kept-live", "kept-recent"] {
        assert!(
            admin
                .idempotency_record(&event_id(id))
                .await
                .unwrap()
                .is_some(),
            "{id} must stay"
        );
    }
    assert!(reader
        .event(&event_id("kept-stored"))
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .apply(vec![listed_write("pruned-erased", "t", None, at(0))])
            .await
            .unwrap(),
        vec![WriteResult::Applied { lease: None }],
        "past the window, an erased id may be stored again"
    );
}

/// `record_error` and `mark_exhausted` never touch an erased record: no error comes back onto
/// the tombstone, and its status stays `erased`.
pub async fn record_error_and_mark_exhausted_leave_an_erased_record_alone(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
) {
    let erased = event_id("erased-while-leased");
    let Claim::Acquired(_) = store
        .claim(ClaimRequest {
            event_id: &erased,
            payload_sha256: &PayloadHash::of(b"1"),
            correlation_id: &CorrelationId::parse("c").unwrap(),
            lease: Duration::from_millis(30),
        })
        .await
        .unwrap()
    else {
        panic!("a first claim must win");
    };
    admin.erase(&erased, false).await.unwrap();
    let before = admin.idempotency_record(&erased).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let error = FailureInfo::new(ErrorCode::RetriesExhausted, "gave up");
    store
        .mark_exhausted(&[(erased.clone(), error.clone())])
        .await
        .unwrap();
    store.record_error(&erased, &error).await.unwrap();
    let after = admin.idempotency_record(&erased).await.unwrap().unwrap();
    assert_eq!(after.status, Status::Erased);
    assert!(after.last_error.is_none(), "no error on a tombstone");
    assert_eq!(
        after.updated_at, before.updated_at,
        "the tombstone is untouched"
    );
}

/// An erasure racing the event's store, whichever commits first, never leaves the event
/// stored: once both are done, the row is gone and the record is an `erased` tombstone.
pub async fn an_erasure_racing_a_store_never_leaves_the_event_behind(
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
    reader: Arc<dyn EventReader>,
) {
    let ids: Vec<String> = (0..32).map(|n| format!("race-{n:02}")).collect();
    let mut racers = tokio::task::JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        let (store, admin, id) = (store.clone(), admin.clone(), id.clone());
        racers.spawn(async move {
            let write = listed_write(&id, "t", None, at(0));
            let erased_id = event_id(&id);
            let erase = admin.erase(&erased_id, true);
            // Alternate which side starts first, so both orders are exercised.
            let (stored, erased) = if n % 2 == 0 {
                tokio::join!(store.apply(vec![write]), erase)
            } else {
                let (erased, stored) = tokio::join!(erase, store.apply(vec![write]));
                (stored, erased)
            };
            let stored = stored.unwrap();
            assert!(
                matches!(
                    stored.as_slice(),
                    [WriteResult::Applied { .. } | WriteResult::Erased]
                ),
                "{id}: {stored:?}"
            );
            erased.unwrap();
        });
    }
    while let Some(raced) = racers.join_next().await {
        raced.unwrap();
    }
    for id in &ids {
        assert!(
            reader.event(&event_id(id)).await.unwrap().is_none(),
            "{id} was erased and must not be stored"
        );
        assert_eq!(
            admin
                .idempotency_record(&event_id(id))
                .await
                .unwrap()
                .map(|record| record.status),
            Some(Status::Erased),
            "{id}"
        );
    }
}

/// The read side's types: every value a backend reads back is parsed into its domain type
/// once, and one that does not parse (damage done outside Fluxa; here `corrupt` runs a plain
/// SQL statement on the backend's database) is reported as `Error::Corrupt` by whatever reads
/// it, never replaced by a default. In particular a malformed stored hash never stands in for
/// the payload's (a redelivery would otherwise be called a conflict), and an unknown error
/// code never becomes another. An operator can still evict a failed record that is corrupt.
pub async fn stored_values_that_do_not_parse_are_corrupt_never_defaults<F, Fut>(
    store: Arc<dyn Store>,
    reader: Arc<dyn EventReader>,
    admin: Arc<dyn StoreAdmin>,
    corrupt: F,
) where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    store
        .apply(vec![store_write("bad-hash", b"1")])
        .await
        .unwrap();
    corrupt(
        "UPDATE idempotency_keys SET payload_sha256 = 'not-a-hash' WHERE event_id = 'bad-hash'",
    )
    .await;
    assert_corrupt(
        store.apply(vec![store_write("bad-hash", b"1")]).await,
        "a redelivery meeting a record with a malformed hash",
    );
    assert_corrupt(
        admin.idempotency_record(&event_id("bad-hash")).await,
        "a record with a malformed hash",
    );

    let mut failing = store_write("bad-code", b"2");
    failing.action = WriteAction::Fail(FailureInfo::new(ErrorCode::HashMismatch, "x"));
    store.apply(vec![failing]).await.unwrap();
    corrupt("UPDATE idempotency_keys SET last_error_code = 'gremlins' WHERE event_id = 'bad-code'")
        .await;
    assert_corrupt(
        reader.status(&event_id("bad-code")).await,
        "the status of a record with an unknown error code",
    );
    assert_corrupt(
        admin.idempotency_record(&event_id("bad-code")).await,
        "a record with an unknown error code",
    );
    assert_eq!(
        admin.evict(&event_id("bad-code")).await.unwrap(),
        Eviction::Evicted,
        "a corrupt failed record can still be evicted"
    );
    assert!(reader
        .status(&event_id("bad-code"))
        .await
        .unwrap()
        .is_none());

    store
        .apply(vec![store_write("bad-type", b"3")])
        .await
        .unwrap();
    corrupt("UPDATE events SET event_type = '' WHERE event_id = 'bad-type'").await;
    assert_corrupt(
        reader.event(&event_id("bad-type")).await,
        "an event row with an empty event type",
    );
    assert_corrupt(
        reader
            .list_events(&EventFilter::default(), None, 10, false)
            .await,
        "a listing over an event row with an empty event type",
    );
}

/// Panics unless `result` is `Error::Corrupt`, saying what was read instead.
#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(result: crate::Result<T>, what: &str) {
    match result {
        Err(crate::Error::Corrupt(_)) => {}
        Err(other) => panic!("{what} must be Corrupt, not {other:?}"),
        Ok(value) => panic!("{what} must be Corrupt, not read as {value:?}"),
    }
}

/// Generates one `#[tokio::test]` per check under the check's own name (the names are what
/// `ARCHITECTURE.md` and `docs/RELIABILITY.md` cite). Each test makes its own database with
/// `database` and opens the backend on it with `open`, which gives the store (a [`Store`] and
/// [`StoreAdmin`]) and its reader; `run_sql` runs a plain SQL statement on the store's database
/// (damage done outside Fluxa):
///
/// ```ignore
/// fluxa_store::store_conformance_tests! {
///     database: dir = tempfile::tempdir().unwrap(),
///     open: {
///         let backends = open(dir.path()).await;
///         (backends.store, backends.reader)
///     },
///     run_sql: |sql| run_sql_on(dir.path(), "store.db", sql),
/// }
/// ```
///
/// The `database` binding is the backend file's own name, so `open` and `run_sql` can use it.
#[macro_export]
macro_rules! store_conformance_tests {
    (
        database: $db:ident = $database:expr,
        open: $open:expr,
        run_sql: |$sql:ident| $run_sql:expr $(,)?
    ) => {
        $crate::store_conformance_tests!(@store $db = $database, $open;
            only_one_of_many_concurrent_claims_on_an_event_wins,
            an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete,
        );
        $crate::store_conformance_tests!(@store_reader $db = $database, $open;
            mark_exhausted_fails_only_abandoned_records,
            a_batch_stores_new_events_and_reports_repeats_as_already_processed,
            a_failed_record_is_taken_over_by_the_next_write,
            listing_filters_by_type_source_and_time_window_in_received_order,
            paging_returns_every_event_once_while_new_events_arrive,
        );
        $crate::store_conformance_tests!(@store_admin $db = $database, $open;
            erasing_an_unknown_event_without_a_tombstone_writes_nothing,
            evict_deletes_processing_and_failed_records_and_refuses_the_rest,
            record_error_and_mark_exhausted_leave_an_erased_record_alone,
        );
        $crate::store_conformance_tests!(@store_admin_reader $db = $database, $open;
            an_erased_event_is_gone_and_no_later_write_brings_it_back,
            pruning_events_deletes_only_older_ones_at_most_limit_per_call,
            pruning_idempotency_records_deletes_only_stale_ones_without_an_event_or_live_lease,
            an_erasure_racing_a_store_never_leaves_the_event_behind,
        );

        #[::tokio::test]
        async fn stored_values_that_do_not_parse_are_corrupt_never_defaults() {
            let $db = $database;
            let (store, reader) = $open;
            let store = ::std::sync::Arc::new(store);
            $crate::conformance::stored_values_that_do_not_parse_are_corrupt_never_defaults(
                store.clone(),
                ::std::sync::Arc::new(reader),
                store,
                |$sql| $run_sql,
            )
            .await;
        }
    };

    // Checks that take the store alone, the store and its reader, the store as `Store` and as
    // `StoreAdmin`, or all three.
    (@store $db:ident = $database:expr, $open:expr; $($check:ident,)+) => {$(
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let (store, _reader) = $open;
            $crate::conformance::$check(::std::sync::Arc::new(store)).await;
        }
    )+};
    (@store_reader $db:ident = $database:expr, $open:expr; $($check:ident,)+) => {$(
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let (store, reader) = $open;
            $crate::conformance::$check(
                ::std::sync::Arc::new(store),
                ::std::sync::Arc::new(reader),
            )
            .await;
        }
    )+};
    (@store_admin $db:ident = $database:expr, $open:expr; $($check:ident,)+) => {$(
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let (store, _reader) = $open;
            let store = ::std::sync::Arc::new(store);
            $crate::conformance::$check(store.clone(), store).await;
        }
    )+};
    (@store_admin_reader $db:ident = $database:expr, $open:expr; $($check:ident,)+) => {$(
        #[::tokio::test]
        async fn $check() {
            let $db = $database;
            let (store, reader) = $open;
            let store = ::std::sync::Arc::new(store);
            $crate::conformance::$check(store.clone(), store, ::std::sync::Arc::new(reader))
                .await;
        }
    )+};
}

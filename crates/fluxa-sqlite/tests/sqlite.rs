//! The SQLite backends against the shared conformance checks (`fluxa_queue::conformance`, `fluxa_store::conformance`).
//! SQLite has no `SKIP LOCKED`; these prove its single write lock gives the same guarantees,
//! with real concurrency against a real database file (two handles play two processes).

use std::sync::Arc;
use std::time::Duration;

use fluxa_queue::conformance;
use fluxa_queue::QueueSettings;
use fluxa_sqlite::Backends;
use fluxa_store::conformance as store_conformance;

async fn open(dir: &std::path::Path, visibility: Duration) -> Backends {
    let config = QueueSettings {
        visibility_timeout: visibility,
        max_receives: 3,
    };
    fluxa_sqlite::open(dir, config).await.unwrap()
}

#[tokio::test]
async fn concurrent_receivers_never_get_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), Duration::from_secs(60)).await.queue;
    let second = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::concurrent_receivers_never_get_the_same_message(Arc::new(first), Arc::new(second))
        .await;
}

#[tokio::test]
async fn a_message_reappears_after_its_visibility_timeout_and_delete_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_millis(100)).await.queue;
    conformance::a_message_reappears_after_its_visibility_timeout_and_delete_removes_it(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_millis(100)).await.queue;
    conformance::a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn after_max_receives_the_next_receive_reports_the_message_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::after_max_receives_the_next_receive_reports_the_message_exhausted(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven(Arc::new(queue)).await;
}

#[tokio::test]
async fn a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn only_one_of_many_concurrent_claims_on_an_event_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Duration::from_secs(1)).await.store;
    store_conformance::only_one_of_many_concurrent_claims_on_an_event_wins(Arc::new(store)).await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Duration::from_secs(1)).await.store;
    store_conformance::an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete(Arc::new(
        store,
    ))
    .await;
}

#[tokio::test]
async fn mark_exhausted_fails_only_abandoned_records() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    store_conformance::mark_exhausted_fails_only_abandoned_records(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn a_batch_stores_new_events_and_reports_repeats_as_already_processed() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    store_conformance::a_batch_stores_new_events_and_reports_repeats_as_already_processed(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn a_failed_record_is_taken_over_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    store_conformance::a_failed_record_is_taken_over_by_the_next_write(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn listing_filters_by_type_source_and_time_window_in_received_order() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    store_conformance::listing_filters_by_type_source_and_time_window_in_received_order(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn paging_returns_every_event_once_while_new_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    store_conformance::paging_returns_every_event_once_while_new_events_arrive(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn an_erased_event_is_gone_and_no_later_write_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::an_erased_event_is_gone_and_no_later_write_brings_it_back(
        store.clone(),
        store,
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn erasing_an_unknown_event_without_a_tombstone_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::erasing_an_unknown_event_without_a_tombstone_writes_nothing(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn evict_deletes_processing_and_failed_records_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::evict_deletes_processing_and_failed_records_and_refuses_the_rest(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn pruning_events_deletes_only_older_ones_at_most_limit_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::pruning_events_deletes_only_older_ones_at_most_limit_per_call(
        store.clone(),
        store,
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn pruning_idempotency_records_deletes_only_stale_ones_without_an_event_or_live_lease() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::pruning_idempotency_records_deletes_only_stale_ones_without_an_event_or_live_lease(
        store.clone(), store, Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn record_error_and_mark_exhausted_leave_an_erased_record_alone() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::record_error_and_mark_exhausted_leave_an_erased_record_alone(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn an_erasure_racing_a_store_never_leaves_the_event_behind() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::an_erasure_racing_a_store_never_leaves_the_event_behind(
        store.clone(),
        store,
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn dead_letters_can_be_filtered_by_code_class_type_event_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::dead_letters_can_be_filtered_by_code_class_type_event_and_time(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn paging_through_dead_letters_returns_each_once_while_more_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::paging_through_dead_letters_returns_each_once_while_more_arrive(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), Duration::from_secs(60)).await.queue;
    let second = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once(
        Arc::new(first),
        Arc::new(second),
    )
    .await;
}

#[tokio::test]
async fn purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages(
        Arc::new(queue),
    )
    .await;
}

#[tokio::test]
async fn pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches(
        Arc::new(queue),
    )
    .await;
}

#[tokio::test]
async fn the_depth_counters_stay_exact_through_every_kind_of_change() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), Duration::from_secs(60)).await.queue;
    let second = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::the_depth_counters_stay_exact_through_every_kind_of_change(
        Arc::new(first),
        Arc::new(second),
    )
    .await;
}

/// Runs one statement on the database file `name` in `dir` from a connection of its own, as
/// damage done outside Fluxa would.
async fn run_sql_on(dir: &std::path::Path, name: &str, sql: &str) {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join(name));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn stored_values_that_do_not_parse_are_corrupt_never_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::stored_values_that_do_not_parse_are_corrupt_never_defaults(
        store.clone(),
        Arc::new(backends.reader),
        store,
        |sql| run_sql_on(dir.path(), "store.db", sql),
    )
    .await;
}

#[tokio::test]
async fn a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent(
        Arc::new(queue),
        |sql| run_sql_on(dir.path(), "queue.db", sql),
    )
    .await;
}

/// Right to erasure on disk: SQLite keeps deleted content in free space until it is reused, so
/// without `secure_delete` an erased payload could still be read from `store.db` with a hex
/// editor. Once the WAL is checkpointed, none of its bytes may remain, on b-tree pages or on
/// the overflow pages a large payload spills onto.
#[tokio::test]
async fn an_erased_payload_leaves_none_of_its_bytes_in_the_store_file() {
    use fluxa_core::{CorrelationId, EventId, EventType, PayloadHash, PayloadMode};
    use fluxa_store::{NewEvent, Store, StoreAdmin, Write, WriteAction};

    let dir = tempfile::tempdir().unwrap();
    let backends = open(dir.path(), Duration::from_secs(60)).await;
    let marker = "erase-me-7f3a";
    let small = format!("{{\"secret\":\"{marker}\"}}");
    let large = format!("{{\"secret\":\"{}\"}}", marker.repeat(3000));
    let mut writes = Vec::new();
    for (event_id, payload) in [("small", &small), ("large", &large)] {
        let payload = bytes::Bytes::from(payload.clone().into_bytes());
        writes.push(Write {
            event_id: EventId::parse(event_id).unwrap(),
            payload_sha256: PayloadHash::of(&payload),
            correlation_id: CorrelationId::parse("c").unwrap(),
            lease: None,
            action: WriteAction::Store(NewEvent {
                event_type: EventType::parse("t").unwrap(),
                source: None,
                occurred_at: None,
                payload,
                payload_mode: PayloadMode::Inline,
                received_at: chrono::Utc::now(),
            }),
        });
    }
    backends.store.apply(writes).await.unwrap();
    for event_id in ["small", "large"] {
        let erasure = backends
            .store
            .erase(&EventId::parse(event_id).unwrap(), false)
            .await
            .unwrap();
        assert!(erasure.event_deleted, "{event_id}");
    }
    drop(backends);

    let path = dir.path().join("store.db");
    let mut connection: sqlx::SqliteConnection =
        sqlx::Connection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut connection)
        .await
        .unwrap();
    sqlx::Connection::close(connection).await.unwrap();
    for file in ["store.db", "store.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        let found = bytes
            .windows(marker.len())
            .filter(|window| *window == marker.as_bytes())
            .count();
        assert_eq!(
            found, 0,
            "{file} still holds the erased payload {found} times"
        );
    }
}

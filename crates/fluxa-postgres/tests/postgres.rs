//! The PostgreSQL backends against the shared conformance checks (`fluxa_queue::conformance`, `fluxa_store::conformance`),
//! each test on a fresh database of the server in `FLUXA_TEST_PG_URL` (default: the local
//! server; `./test` starts it).

use std::sync::Arc;
use std::time::Duration;

use fluxa_postgres::testing::ScratchDatabase;
use fluxa_postgres::Backends;
use fluxa_queue::conformance;
use fluxa_queue::QueueSettings;
use fluxa_store::conformance as store_conformance;
use secrecy::{ExposeSecret, SecretString};

/// Opens the backends on `db`, as a replica would; several opens on one database play several
/// replicas.
async fn open(db: &ScratchDatabase, visibility: Duration) -> Backends {
    let config = QueueSettings {
        visibility_timeout: visibility,
        max_receives: 3,
    };
    fluxa_postgres::open(&db.url(), 8, config).await.unwrap()
}

#[tokio::test]
async fn concurrent_receivers_never_get_the_same_message() {
    let db = ScratchDatabase::create().await;
    let first = open(&db, Duration::from_secs(60)).await.queue;
    let second = open(&db, Duration::from_secs(60)).await.queue;
    conformance::concurrent_receivers_never_get_the_same_message(Arc::new(first), Arc::new(second))
        .await;
}

#[tokio::test]
async fn a_message_reappears_after_its_visibility_timeout_and_delete_removes_it() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_millis(100)).await.queue;
    conformance::a_message_reappears_after_its_visibility_timeout_and_delete_removes_it(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_millis(100)).await.queue;
    conformance::a_stale_receipt_settles_nothing_and_a_deleted_message_releases_its_blob(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn after_max_receives_the_next_receive_reports_the_message_exhausted() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::after_max_receives_the_next_receive_reports_the_message_exhausted(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::an_exhausted_message_is_kept_in_the_dlq_and_can_be_redriven(Arc::new(queue)).await;
}

#[tokio::test]
async fn a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::a_dead_lettered_message_keeps_its_reason_and_leaves_the_queue(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn only_one_of_many_concurrent_claims_on_an_event_wins() {
    let db = ScratchDatabase::create().await;
    let store = open(&db, Duration::from_secs(1)).await.store;
    store_conformance::only_one_of_many_concurrent_claims_on_an_event_wins(Arc::new(store)).await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete() {
    let db = ScratchDatabase::create().await;
    let store = open(&db, Duration::from_secs(1)).await.store;
    store_conformance::an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete(Arc::new(
        store,
    ))
    .await;
}

#[tokio::test]
async fn mark_exhausted_fails_only_abandoned_records() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    store_conformance::mark_exhausted_fails_only_abandoned_records(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn a_batch_stores_new_events_and_reports_repeats_as_already_processed() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    store_conformance::a_batch_stores_new_events_and_reports_repeats_as_already_processed(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn a_failed_record_is_taken_over_by_the_next_write() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    store_conformance::a_failed_record_is_taken_over_by_the_next_write(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn listing_filters_by_type_source_and_time_window_in_received_order() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    store_conformance::listing_filters_by_type_source_and_time_window_in_received_order(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn paging_returns_every_event_once_while_new_events_arrive() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    store_conformance::paging_returns_every_event_once_while_new_events_arrive(
        Arc::new(backends.store),
        Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn an_erased_event_is_gone_and_no_later_write_brings_it_back() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
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
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::erasing_an_unknown_event_without_a_tombstone_writes_nothing(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn evict_deletes_processing_and_failed_records_and_refuses_the_rest() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::evict_deletes_processing_and_failed_records_and_refuses_the_rest(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn pruning_events_deletes_only_older_ones_at_most_limit_per_call() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
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
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::pruning_idempotency_records_deletes_only_stale_ones_without_an_event_or_live_lease(
        store.clone(), store, Arc::new(backends.reader),
    )
    .await;
}

#[tokio::test]
async fn record_error_and_mark_exhausted_leave_an_erased_record_alone() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::record_error_and_mark_exhausted_leave_an_erased_record_alone(
        store.clone(),
        store,
    )
    .await;
}

#[tokio::test]
async fn an_erasure_racing_a_store_never_leaves_the_event_behind() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::an_erasure_racing_a_store_never_leaves_the_event_behind(
        store.clone(),
        store,
        Arc::new(backends.reader),
    )
    .await;
}

/// Seed invariant 7 at the session level: the query API's reader refuses writes.
#[tokio::test]
async fn the_query_readers_sessions_refuse_writes() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let attempt = sqlx::query("DELETE FROM idempotency_keys")
        .execute(backends.reader.pool())
        .await;
    let error = attempt.expect_err("the reader accepted a write");
    assert!(
        error.to_string().contains("read-only"),
        "unexpected error: {error}"
    );
}

#[tokio::test]
async fn replicas_starting_at_once_migrate_exactly_once() {
    let db = ScratchDatabase::create().await;
    let opens = (0..4).map(|_| open(&db, Duration::from_secs(1)));
    futures::future::join_all(opens).await;
    let pool = sqlx::PgPool::connect(db.url().expose_secret())
        .await
        .unwrap();
    let n_applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    let n_migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(
        n_applied as usize, n_migrations,
        "every migration applied exactly once"
    );
}

#[tokio::test]
async fn a_missing_database_is_created_at_first_start() {
    // Named but not created: `open` must create it.
    let db = ScratchDatabase::named();
    let backends = open(&db, Duration::from_secs(1)).await;
    fluxa_store::Store::ping(&backends.store).await.unwrap();
    // Replicas starting together against the now-existing database are fine too.
    let again = futures::future::join_all((0..3).map(|_| open(&db, Duration::from_secs(1)))).await;
    for backends in &again {
        fluxa_store::Store::ping(&backends.store).await.unwrap();
    }
}

#[test]
fn a_urls_password_never_appears_in_its_description() {
    let url =
        SecretString::from("postgres://fluxa:hunter2-secret@db.internal:6543/events".to_owned());
    let described = fluxa_postgres::describe_url(&url);
    assert_eq!(described, "db.internal:6543/events");
    assert!(!format!("{url:?}").contains("hunter2"));
}

/// A value PostgreSQL cannot store (text with a NUL) is a refusal, never reported as the
/// database being down, and the same handles keep working after it.
#[tokio::test]
async fn a_value_postgresql_refuses_is_reported_as_rejected_not_as_an_outage() {
    use fluxa_core::{ErrorCode, EventId, FailureInfo};
    use fluxa_queue::DeadLetterAdmin;
    use fluxa_store::Store;

    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(60)).await;
    // (A dead letter's id can no longer hold a NUL: `DeadLetterId` refuses one before any
    // backend sees it. A filter's event id still reaches the database as text.)
    let error = backends
        .queue
        .list_dead_letters(
            &fluxa_queue::DeadLetterFilter {
                event_id: Some("\0".into()),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .expect_err("PostgreSQL cannot take a NUL in text");
    assert!(
        matches!(error, fluxa_queue::Error::Rejected(_)),
        "a refused value is not an outage: {error:?}"
    );
    let error = backends
        .store
        .record_error(
            &EventId::parse("nul-note").unwrap(),
            &FailureInfo::new(ErrorCode::Internal, "a\0b"),
        )
        .await
        .expect_err("PostgreSQL cannot take a NUL in text");
    assert!(
        matches!(error, fluxa_store::Error::Rejected(_)),
        "a refused value is not an outage: {error:?}"
    );

    assert!(backends
        .queue
        .get_dead_letter(&fluxa_core::ids::DeadLetterId::parse("no-such-id").unwrap())
        .await
        .unwrap()
        .is_none());
    backends
        .store
        .record_error(
            &EventId::parse("nul-note").unwrap(),
            &FailureInfo::new(ErrorCode::Internal, "fine"),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn dead_letters_can_be_filtered_by_code_class_type_event_and_time() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::dead_letters_can_be_filtered_by_code_class_type_event_and_time(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn paging_through_dead_letters_returns_each_once_while_more_arrive() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::paging_through_dead_letters_returns_each_once_while_more_arrive(Arc::new(queue))
        .await;
}

#[tokio::test]
async fn a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::a_redrive_moves_at_most_its_limit_oldest_first_and_only_what_it_selects(Arc::new(
        queue,
    ))
    .await;
}

#[tokio::test]
async fn redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once() {
    let db = ScratchDatabase::create().await;
    let first = open(&db, Duration::from_secs(60)).await.queue;
    let second = open(&db, Duration::from_secs(60)).await.queue;
    conformance::redriving_in_batches_moves_every_entry_once_even_when_two_run_at_once(
        Arc::new(first),
        Arc::new(second),
    )
    .await;
}

#[tokio::test]
async fn purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::purging_an_event_deletes_its_dead_letters_and_counts_its_queued_messages(
        Arc::new(queue),
    )
    .await;
}

#[tokio::test]
async fn pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::pruning_deletes_the_oldest_dead_letters_before_a_time_in_bounded_batches(
        Arc::new(queue),
    )
    .await;
}

#[tokio::test]
async fn stored_values_that_do_not_parse_are_corrupt_never_defaults() {
    let db = ScratchDatabase::create().await;
    let backends = open(&db, Duration::from_secs(1)).await;
    let store = Arc::new(backends.store);
    store_conformance::stored_values_that_do_not_parse_are_corrupt_never_defaults(
        store.clone(),
        Arc::new(backends.reader),
        store,
        |sql| db.run_sql(sql),
    )
    .await;
}

#[tokio::test]
async fn a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent() {
    let db = ScratchDatabase::create().await;
    let queue = open(&db, Duration::from_secs(60)).await.queue;
    conformance::a_dead_letter_that_does_not_parse_is_corrupt_but_a_bad_attribute_reads_as_absent(
        Arc::new(queue),
        |sql| db.run_sql(sql),
    )
    .await;
}

#[tokio::test]
async fn the_depth_counters_stay_exact_through_every_kind_of_change() {
    let db = ScratchDatabase::create().await;
    let first = open(&db, Duration::from_secs(60)).await.queue;
    let second = open(&db, Duration::from_secs(60)).await.queue;
    conformance::the_depth_counters_stay_exact_through_every_kind_of_change(
        Arc::new(first),
        Arc::new(second),
    )
    .await;
}

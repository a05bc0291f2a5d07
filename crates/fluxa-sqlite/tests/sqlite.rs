//! The SQLite backends against the shared conformance checks (`fluxa_queue::conformance`, `fluxa_store::conformance`).
//! SQLite has no `SKIP LOCKED`; these prove its single write lock gives the same guarantees,
//! with real concurrency against a real database file (two handles play two processes).

use std::sync::Arc;
use std::time::Duration;

use fluxa_queue::conformance;
use fluxa_sqlite::{Backends, QueueConfig};
use fluxa_store::conformance as store_conformance;

async fn open(dir: &std::path::Path, visibility: Duration) -> Backends {
    let config = QueueConfig {
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

//! The SQLite backends against the shared conformance checks (`fluxa_queue::conformance`).
//! SQLite has no `SKIP LOCKED`; these prove its single write lock gives the same guarantees,
//! with real concurrency against a real database file (two handles play two processes).

use std::sync::Arc;
use std::time::Duration;

use fluxa_queue::conformance;
use fluxa_sqlite::{Backends, QueueConfig};

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
async fn a_message_reappears_after_its_visibility_timeout_and_a_stale_receipt_settles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_millis(100)).await.queue;
    conformance::a_message_reappears_after_its_visibility_timeout_and_a_stale_receipt_settles_nothing(
        Arc::new(queue),
    )
    .await;
}

#[tokio::test]
async fn after_max_receives_the_next_receive_dead_letters_the_message_as_retries_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), Duration::from_secs(60)).await.queue;
    conformance::after_max_receives_the_next_receive_dead_letters_the_message_as_retries_exhausted(
        Arc::new(queue),
    )
    .await;
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
    conformance::only_one_of_many_concurrent_claims_on_an_event_wins(Arc::new(store)).await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Duration::from_secs(1)).await.store;
    conformance::an_expired_lease_is_taken_over_and_the_old_holder_cannot_complete(Arc::new(store))
        .await;
}

#[tokio::test]
async fn mark_exhausted_fails_only_abandoned_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Duration::from_secs(1)).await.store;
    conformance::mark_exhausted_fails_only_abandoned_records(Arc::new(store)).await;
}

//! Many stateless replicas on one store and queue (issue: PostgreSQL backend). The embedded
//! backend runs the same test: SQLite files shared by several processes on one machine.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{event, TestApp, TestData, PATIENCE};

async fn post_batch(app: &TestApp, events: &[Value]) -> u64 {
    let response = app
        .client
        .post(app.url("/v1/events/batch"))
        .json(&json!({ "events": events }))
        .send()
        .await
        .expect("batch request");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["rejected"], 0);
    body["accepted"].as_u64().unwrap()
}

/// Invariants 1 and 2 across processes: two replicas, a burst with duplicates, one replica
/// SIGKILLed mid-run and restarted; every accepted event ends processed exactly once.
#[tokio::test]
async fn two_replicas_process_a_burst_with_duplicates_exactly_once_even_when_one_is_killed() {
    let data = TestData::new().await;
    let n_events: usize = if data.database_url().is_some() {
        10_000
    } else {
        3_000
    };
    let fast = [
        "--visibility-timeout",
        "2s",
        "--lease",
        "2s",
        "--workers",
        "4",
    ];
    let mut first = data.spawn(&fast).await;
    let second = data.spawn(&fast).await;

    let batch_size = 500;
    let n_batches = n_events / batch_size;
    let mut n_accepted = 0;
    for batch_idx in 0..n_batches {
        let mut events: Vec<Value> = (0..batch_size)
            .map(|i| {
                event(
                    &format!("rep-{}", batch_idx * batch_size + i),
                    json!({"i": i}),
                )
            })
            .collect();
        // Every batch re-sends a slice of the previous one: duplicates on purpose.
        if batch_idx > 0 {
            events.extend((0..50).map(|i| {
                event(
                    &format!("rep-{}", (batch_idx - 1) * batch_size + i),
                    json!({"i": i}),
                )
            }));
        }
        let target = if batch_idx % 2 == 0 { &first } else { &second };
        n_accepted += post_batch(target, &events).await;
        if batch_idx == n_batches / 2 {
            // Mid-run: kill one replica without warning, then bring it back.
            first.kill().await;
            first = data.spawn(&fast).await;
        }
    }
    assert_eq!(n_accepted as usize, n_events + 50 * (n_batches - 1));

    let deadline = Instant::now() + PATIENCE * 6;
    loop {
        let n_rows = data.count("SELECT COUNT(*) FROM events", None).await;
        let n_unsettled = data
            .count(
                "SELECT COUNT(*) FROM idempotency_keys WHERE status <> 'processed'",
                None,
            )
            .await;
        let queue_empty = data.queue_is_empty().await;
        if n_rows == n_events as i64 && n_unsettled == 0 && queue_empty {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the burst: {n_rows} of {n_events} rows, {n_unsettled} records not processed, queue empty: {queue_empty}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n_rows = data.count("SELECT COUNT(*) FROM events", None).await;
    assert_eq!(
        n_rows, n_events as i64,
        "no event lost and none stored twice"
    );
    let (_, dlq) = second.get_json("/v1/admin/dlq").await;
    assert_eq!(dlq["total"], 0, "no event may be dead-lettered: {dlq}");
}

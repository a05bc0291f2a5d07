//! One or more tests per seed invariant (see ARCHITECTURE.md's table): each fails if the
//! invariant breaks.

use std::time::{Duration, Instant};

use chrono::Utc;
use fluxa_core::task::EventHeader;
use fluxa_core::{CorrelationId, EventId, EventMessageV1, EventType, FluxaTask, PayloadHash};
use fluxa_queue::{MessageAttributes, NewMessage};
use fluxa_store::conformance::{Claim, ClaimExt, ClaimRequest};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::helpers::{event, TestData, PATIENCE};
use crate::ingest::raw_payload;

/// Invariants 1 and 2: twenty concurrent deliveries of one event give exactly one row.
#[tokio::test]
async fn the_same_event_delivered_many_times_concurrently_is_stored_exactly_once() {
    let data = TestData::new().await;
    let app = data.spawn(&["--workers", "8"]).await;
    let body = event("dup-1", json!({"same": true}));
    let posts = (0..20).map(|_| app.post_event(&body));
    for response in futures::future::join_all(posts).await {
        assert_eq!(response.status(), 202);
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let processed = app.metric("fluxa_events_processed_total").await;
        let duplicates = app.metric("fluxa_events_duplicate_total").await;
        if processed + duplicates >= 20.0 {
            assert_eq!(processed, 1.0, "exactly one delivery may store the event");
            assert_eq!(duplicates, 19.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {processed} + {duplicates} of 20 deliveries settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(data.count_event_rows("dup-1").await, 1);
    let status = app.wait_for_status("dup-1", "processed").await;
    assert_eq!(status["attempts"], 1);
}

/// Invariant 2, the conflict row of the contract's outcome table.
#[tokio::test]
async fn the_same_id_with_a_different_payload_ends_as_event_id_conflict_and_keeps_the_first() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    assert_eq!(
        app.post_event(&event("conf-1", json!({"v": 1})))
            .await
            .status(),
        202
    );
    app.wait_for_status("conf-1", "processed").await;
    assert_eq!(
        app.post_event(&event("conf-1", json!({"v": 2})))
            .await
            .status(),
        202
    );

    let entry = app.wait_for_dead_letter("conf-1").await;
    assert_eq!(entry["error_class"], "permanent");
    assert_eq!(entry["error"]["code"], "event_id_conflict");
    let status = app.wait_for_status("conf-1", "processed").await;
    assert_eq!(status["last_error"]["code"], "event_id_conflict");
    let text = app.get("/v1/events/conf-1").await.text().await.unwrap();
    assert_eq!(raw_payload(&text), r#"{"v":1}"#);
    assert_eq!(data.count_event_rows("conf-1").await, 1);
}

fn header_for(event_id: &str, claimed_payload: &[u8]) -> EventHeader {
    EventHeader {
        event_id: EventId::parse(event_id).unwrap(),
        event_type: EventType::parse("t").unwrap(),
        source: None,
        occurred_at: None,
        correlation_id: CorrelationId::parse("corrupt-corr").unwrap(),
        received_at: Utc::now(),
        payload_sha256: PayloadHash::of(claimed_payload),
        payload_size: claimed_payload.len() as u64,
    }
}

/// Invariant 3: an inline payload that does not match its hash is dead-lettered, never stored.
#[tokio::test]
async fn an_inline_payload_that_does_not_match_its_hash_goes_to_the_dlq_and_writes_no_row() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    // A message whose payload was altered after hashing (what corruption in transit looks like).
    let payload = RawValue::from_string(r#"{"amount":999}"#.to_owned()).unwrap();
    let message = EventMessageV1::inline(header_for("corrupt-1", br#"{"amount":100}"#), &payload);
    data.producer()
        .await
        .send(vec![NewMessage {
            body: FluxaTask::EventV1(message).encode(),
            attributes: MessageAttributes {
                event_id: EventId::parse("corrupt-1").ok(),
                correlation_id: CorrelationId::parse("corrupt-corr").ok(),
                blob_key: None,
                event_type: EventType::parse("test.corrupt").ok(),
            },
        }])
        .await
        .unwrap();
    let entry = app.wait_for_dead_letter("corrupt-1").await;
    assert_eq!(entry["error"]["code"], "hash_mismatch");
    assert_eq!(entry["error_class"], "permanent");
    assert_eq!(
        entry["receive_count"], 1,
        "a permanent failure is never retried"
    );
    assert_eq!(entry["correlation_id"], "corrupt-corr");
    let status = app.wait_for_status("corrupt-1", "failed").await;
    assert_eq!(status["last_error"]["code"], "hash_mismatch");
    assert_eq!(app.get("/v1/events/corrupt-1").await.status(), 404);
    assert_eq!(data.count_event_rows("corrupt-1").await, 0);
}

/// Invariants 3 and 5: a blob corrupted at rest is caught by the processor.
#[tokio::test]
async fn a_blob_corrupted_before_processing_goes_to_the_dlq_as_hash_mismatch() {
    let data = TestData::new().await;
    let api = data.spawn(&["--role", "api"]).await;
    let payload = format!("\"{}\"", "z".repeat(300_000));
    let body = format!(r#"{{"event_id":"corrupt-blob","event_type":"t","payload":{payload}}}"#);
    assert_eq!(
        api.post_raw("/v1/events", body, Some("application/json"))
            .await
            .status(),
        202
    );
    let keys = data.blob_keys().await;
    assert_eq!(keys.len(), 1);
    let mut bytes = data.read_blob(&keys[0]).await;
    bytes[1000] = b'Z';
    data.write_blob(&keys[0], bytes).await;

    let _worker = data.spawn(&["--role", "worker"]).await;
    let entry = api.wait_for_dead_letter("corrupt-blob").await;
    assert_eq!(entry["error"]["code"], "hash_mismatch");
    api.wait_for_status("corrupt-blob", "failed").await;
    assert_eq!(data.count_event_rows("corrupt-blob").await, 0);
}

/// Contract section 3: a missing blob can never succeed.
#[tokio::test]
async fn a_message_whose_blob_is_gone_is_dead_lettered_as_blob_missing() {
    let data = TestData::new().await;
    let api = data.spawn(&["--role", "api"]).await;
    let payload = format!("\"{}\"", "m".repeat(300_000));
    let body = format!(r#"{{"event_id":"lost-blob","event_type":"t","payload":{payload}}}"#);
    assert_eq!(
        api.post_raw("/v1/events", body, Some("application/json"))
            .await
            .status(),
        202
    );
    for key in data.blob_keys().await {
        data.remove_blob(&key).await;
    }
    let _worker = data.spawn(&["--role", "worker"]).await;
    let entry = api.wait_for_dead_letter("lost-blob").await;
    assert_eq!(entry["error"]["code"], "blob_missing");
    let status = api.wait_for_status("lost-blob", "failed").await;
    assert_eq!(status["last_error"]["code"], "blob_missing");
}

/// Invariant 6: an unparsable message is permanent, dead-lettered on its first receive.
#[tokio::test]
async fn an_unparsable_message_is_dead_lettered_at_once_with_its_original_bytes() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    data.producer()
        .await
        .send(vec![NewMessage {
            body: b"{\"type\":\"event.v1\",\"garbage\":true}".to_vec(),
            attributes: MessageAttributes {
                event_id: EventId::parse("garbled-1").ok(),
                correlation_id: CorrelationId::parse("garbled-corr").ok(),
                blob_key: None,
                event_type: None,
            },
        }])
        .await
        .unwrap();
    let entry = app.wait_for_dead_letter("garbled-1").await;
    assert_eq!(entry["error"]["code"], "invalid_message");
    assert_eq!(entry["receive_count"], 1);
    assert_eq!(
        entry["message"],
        json!({"type": "event.v1", "garbage": true})
    );
    let status = app.wait_for_status("garbled-1", "failed").await;
    assert_eq!(status["last_error"]["code"], "invalid_message");
}

/// Invariant 6: a store error is transient: retried, then dead-lettered as retries_exhausted
/// after three receives; once fixed, a redrive processes it.
#[tokio::test]
async fn a_store_error_is_retried_and_after_three_receives_is_dead_lettered_as_retries_exhausted() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    // Break the store: inserts into `events` now fail, like a database refusing writes.
    data.store_sql("ALTER TABLE events RENAME TO events_away")
        .await;
    assert_eq!(
        app.post_event(&event("flaky-1", json!({"k": 1})))
            .await
            .status(),
        202
    );

    let entry = app.wait_for_dead_letter("flaky-1").await;
    assert_eq!(entry["error_class"], "retries_exhausted");
    assert_eq!(entry["error"]["code"], "retries_exhausted");
    assert_eq!(entry["receive_count"], 3);
    assert!(entry["error"]["message"]
        .as_str()
        .unwrap()
        .contains("store_unavailable"));
    assert!(
        entry["first_failure_at"].as_str().unwrap() < entry["last_failure_at"].as_str().unwrap()
    );
    let status = app.wait_for_status("flaky-1", "failed").await;
    assert_eq!(status["attempts"], 3);
    assert_eq!(status["last_error"]["code"], "retries_exhausted");

    // Fix the store and redrive: the event is processed.
    data.store_sql("ALTER TABLE events_away RENAME TO events")
        .await;
    let response = app
        .client
        .post(app.url("/v1/admin/dlq/redrive"))
        .json(&json!({"event_id": "flaky-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["redriven"], 1);
    app.wait_for_status("flaky-1", "processed").await;
    assert_eq!(data.count_event_rows("flaky-1").await, 1);
    let (_, list) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(list["total"], 0);
}

/// Invariant 2 with a crashed worker: its claim expires and the next delivery takes over.
#[tokio::test]
async fn a_worker_that_dies_holding_an_event_does_not_leave_it_stuck() {
    let data = TestData::new().await;
    let api = data.spawn(&["--role", "api"]).await;
    assert_eq!(
        api.post_event(&event("crash-1", json!({"c": 1})))
            .await
            .status(),
        202
    );

    // Play the worker that dies mid-message: receive the message, claim the event, then vanish
    // without settling either.
    let queue = data.consumer().await;
    let deliveries = queue
        .receive(1, Duration::from_secs(1))
        .await
        .unwrap()
        .deliveries;
    assert_eq!(deliveries.len(), 1);
    let FluxaTask::EventV1(message) = FluxaTask::decode(&deliveries[0].body).unwrap();
    let store = data.store().await;
    let claim = store
        .claim(ClaimRequest {
            event_id: &message.event_id,
            payload_sha256: &message.payload_sha256,
            correlation_id: &message.correlation_id,
            lease: Duration::from_secs(2),
        })
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    drop((deliveries, store, queue));
    api.wait_for_status("crash-1", "processing").await;

    let _worker = data
        .spawn(&[
            "--role",
            "worker",
            "--visibility-timeout",
            "1s",
            "--lease",
            "2s",
        ])
        .await;
    let status = api.wait_for_status("crash-1", "processed").await;
    assert_eq!(
        status["attempts"], 2,
        "the second worker took the expired claim over"
    );
    assert_eq!(data.count_event_rows("crash-1").await, 1);
}

/// Invariant 2 at the edge: the worker dies on the last allowed receive. The queue's redrive
/// dead-letters the message, and the event must not be left looking `processing` forever.
#[tokio::test]
async fn a_worker_that_dies_on_the_last_attempt_leaves_the_event_failed_not_processing() {
    let data = TestData::new().await;
    let api = data.spawn(&["--role", "api"]).await;
    assert_eq!(
        api.post_event(&event("last-gasp", json!(1))).await.status(),
        202
    );

    // Three receives, none settled (visibility 1 s); the third receiver claims and dies.
    let queue = data.consumer().await;
    let mut last = None;
    for receive in 1..=3 {
        let mut deliveries = queue
            .receive(1, Duration::from_secs(5))
            .await
            .unwrap()
            .deliveries;
        assert_eq!(deliveries.len(), 1, "receive {receive}");
        last = deliveries.pop();
    }
    let last = last.unwrap();
    assert_eq!(last.receive_count, 3);
    let FluxaTask::EventV1(message) = FluxaTask::decode(&last.body).unwrap();
    let claim = data
        .store()
        .await
        .claim(ClaimRequest {
            event_id: &message.event_id,
            payload_sha256: &message.payload_sha256,
            correlation_id: &message.correlation_id,
            lease: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    api.wait_for_status("last-gasp", "processing").await;

    let _worker = data.spawn(&["--role", "worker"]).await;
    let entry = api.wait_for_dead_letter("last-gasp").await;
    assert_eq!(entry["error_class"], "retries_exhausted");
    let status = api.wait_for_status("last-gasp", "failed").await;
    assert_eq!(status["last_error"]["code"], "retries_exhausted");
}

/// Invariants 1 and 2 under a real crash: SIGKILL mid-burst, restart, nothing lost or doubled.
#[tokio::test]
async fn a_server_killed_mid_burst_loses_nothing_and_duplicates_nothing_after_restart() {
    let data = TestData::new().await;
    let fast = ["--visibility-timeout", "1s", "--lease", "1s"];
    let app = data.spawn(&fast).await;
    let n_events = 150;
    for batch_idx in 0..3 {
        let events: Vec<Value> = (0..n_events / 3)
            .map(|i| event(&format!("burst-{}", batch_idx * 1000 + i), json!({"i": i})))
            .collect();
        let response = app
            .client
            .post(app.url("/v1/events/batch"))
            .json(&json!({ "events": events }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.kill().await;

    let app = data.spawn(&fast).await;
    for batch_idx in 0..3 {
        for i in 0..n_events / 3 {
            let event_id = format!("burst-{}", batch_idx * 1000 + i);
            app.wait_for_status(&event_id, "processed").await;
            assert_eq!(data.count_event_rows(&event_id).await, 1);
        }
    }
    let (_, list) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(list["total"], 0, "no event may end in the DLQ: {list}");
    crate::reliability::record(crate::reliability::Trial {
        scenario: "kill -9 mid-burst",
        tried: "3 batches of 50 events, then SIGKILL 100 ms later, then a restart",
        requests: 3,
        accepted: n_events as u64,
        lost: 0,
        duplicated: 0,
        observed: "every event processed once after the restart, none dead-lettered".to_owned(),
    });
}

/// Invariant 9: the correlation id reaches the queue message, the row and every log line.
#[tokio::test]
async fn the_correlation_id_reaches_the_events_row_and_every_log_line_about_the_event() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let response = app
        .client
        .post(app.url("/v1/events"))
        .header("x-correlation-id", "trace-me-123")
        .json(&event("traced-1", json!({"t": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    app.wait_for_status("traced-1", "processed").await;
    let (_, stored) = app.get_json("/v1/events/traced-1").await;
    assert_eq!(stored["correlation_id"], "trace-me-123");

    let lines = app.logs_with("event_id", "traced-1");
    let targets: Vec<&str> = lines.iter().filter_map(|l| l["target"].as_str()).collect();
    assert!(
        targets.iter().any(|t| t.starts_with("fluxa_api")),
        "no API log line: {targets:?}"
    );
    assert!(
        targets.iter().any(|t| t.starts_with("fluxa_processor")),
        "no processor log line: {targets:?}"
    );
    for line in &lines {
        assert_eq!(
            line["correlation_id"], "trace-me-123",
            "line without the id: {line}"
        );
    }
}

/// Invariant 8: every log line is one JSON object with the contract's top-level fields.
#[tokio::test]
async fn every_log_line_is_a_json_object_with_timestamp_level_and_message() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    app.post_event(&event("log-1", json!(1))).await;
    app.wait_for_status("log-1", "processed").await;
    app.get("/v1/events/missing").await;
    let exited = app.terminate().await;
    assert_eq!(exited.code, 0);
    assert!(exited.stdout.len() >= 4);
    assert!(
        exited.stderr.is_empty(),
        "nothing but JSON logs may be written: {:?}",
        exited.stderr
    );
    for line in &exited.stdout {
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(value.get(key).is_some(), "{key} missing in {line}");
        }
        let timestamp = value["timestamp"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "bad timestamp {timestamp}"
        );
    }
}

//! Ingest (contract section 1 and 1b): exact payload bytes, hashing, inline/blob routing and
//! every kind of bad input.

use std::collections::HashMap;

use fluxa_core::FluxaTask;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::helpers::{event, sha256_hex, TestData};

/// The `payload` member of a GET body, as the exact text the server sent.
pub fn raw_payload(body: &str) -> String {
    let members: HashMap<String, Box<RawValue>> = serde_json::from_str(body).unwrap();
    members["payload"].get().to_owned()
}

#[tokio::test]
async fn an_accepted_event_is_stored_with_a_byte_identical_payload_and_the_same_hash() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let payload = r#"{ "b" : [1, 2.50, 1e3],  "s": "caf\u00e9 \"q\"", "n" : null }"#;
    let body = format!(
        r#"{{"event_id":"ord-1","event_type":"order.created","source":"checkout","occurred_at":"2026-11-23T12:00:00+02:00","payload": {payload} }}"#
    );
    let response = app
        .post_raw("/v1/events", body, Some("application/json; charset=utf-8"))
        .await;
    assert_eq!(response.status(), 202);
    let header_id = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["event_id"], "ord-1");
    assert_eq!(accepted["payload_sha256"], sha256_hex(payload.as_bytes()));
    assert_eq!(accepted["payload_size"], payload.len());
    assert_eq!(accepted["payload_mode"], "INLINE");
    assert_eq!(accepted["correlation_id"], header_id.as_str());

    app.wait_for_status("ord-1", "processed").await;
    let response = app.get("/v1/events/ord-1").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(raw_payload(&text), payload);
    let stored: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(stored["payload_sha256"], sha256_hex(payload.as_bytes()));
    assert_eq!(stored["occurred_at"], "2026-11-23T10:00:00Z");
    assert_eq!(stored["source"], "checkout");
    assert_eq!(stored["correlation_id"], header_id.as_str());
    assert!(stored["received_at"].as_str().unwrap().ends_with('Z'));
    assert!(stored["processed_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn every_kind_of_json_value_is_a_payload_that_round_trips_exactly() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let payloads = [
        "null",
        "true",
        "false",
        "0",
        "-12.5e-3",
        "\"text\"",
        "[]",
        "{}",
        "[ 1 ,{\"a\":[]} ]",
    ];
    for (idx, payload) in payloads.iter().enumerate() {
        let body = format!(r#"{{"event_id":"kind-{idx}","event_type":"t","payload":{payload}}}"#);
        assert_eq!(
            app.post_raw("/v1/events", body, Some("application/json"))
                .await
                .status(),
            202
        );
    }
    for (idx, payload) in payloads.iter().enumerate() {
        app.wait_for_status(&format!("kind-{idx}"), "processed")
            .await;
        let text = app
            .get(&format!("/v1/events/kind-{idx}"))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(raw_payload(&text), *payload);
        let stored: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(stored["source"], Value::Null);
        assert_eq!(stored["occurred_at"], Value::Null);
    }
}

/// A JSON string payload whose serialised form is exactly `size` bytes.
fn payload_of_size(size: usize) -> String {
    format!("\"{}\"", "x".repeat(size - 2))
}

#[tokio::test]
async fn a_262144_byte_payload_stays_inline_and_never_touches_the_blob_store() {
    let data = TestData::new().await;
    // API only: the message stays in the queue where the test can look at it.
    let app = data.spawn(&["--role", "api"]).await;
    let payload = payload_of_size(262_144);
    let body = format!(r#"{{"event_id":"edge-inline","event_type":"t","payload":{payload}}}"#);
    let response = app
        .post_raw("/v1/events", body, Some("application/json"))
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["payload_size"], 262_144);
    assert_eq!(accepted["payload_mode"], "INLINE");

    let pending = data.pending(10).await;
    assert_eq!(pending.len(), 1);
    let FluxaTask::EventV1(message) = FluxaTask::decode(&pending[0].body).unwrap();
    assert_eq!(message.payload_inline.unwrap().get(), payload);
    assert!(message.payload_blob.is_none());
    assert!(
        data.blob_keys().await.is_empty(),
        "an inline payload must not be written to the blob store"
    );
}

#[tokio::test]
async fn a_262145_byte_payload_goes_to_the_blob_store_and_its_message_carries_only_the_key() {
    let data = TestData::new().await;
    let api = data.spawn(&["--role", "api"]).await;
    let payload = payload_of_size(262_145);
    let body = format!(r#"{{"event_id":"edge-blob","event_type":"t","payload":{payload}}}"#);
    let response = api
        .post_raw("/v1/events", body, Some("application/json"))
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["payload_mode"], "S3");
    assert_eq!(accepted["payload_size"], 262_145);

    let pending = data.pending(10).await;
    assert_eq!(pending.len(), 1);
    assert!(
        pending[0].body.len() < 4096,
        "the queue message must hold only the key, not the {} payload bytes",
        payload.len()
    );
    let text = String::from_utf8(pending[0].body.clone()).unwrap();
    assert!(
        !text.contains("xxxxxxxx"),
        "payload bytes leaked into the queue message"
    );
    let FluxaTask::EventV1(message) = FluxaTask::decode(&pending[0].body).unwrap();
    assert!(message.payload_inline.is_none());
    // The reference is the bucket and the key, nothing else.
    let members: Value = serde_json::from_slice(&pending[0].body).unwrap();
    let mut names: Vec<&String> = members["payload_blob"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    names.sort();
    assert_eq!(names, ["bucket", "key"]);
    let blob = message.payload_blob.expect("blob reference");
    assert_eq!(blob.bucket, data.blob_bucket());
    // Keys spread over hashed prefixes: events/<2 hex of SHA-256(event id)>/<event id>/…, and
    // the key is the object's whole key in the bucket, its prefix included.
    let folder = format!(
        "{}{}/edge-blob/",
        data.blob_key_start(),
        &sha256_hex(b"edge-blob")[..2]
    );
    assert!(blob.key.starts_with(&folder), "{}", blob.key);
    assert_eq!(data.blob_keys().await, std::slice::from_ref(&blob.key));
    assert_eq!(data.read_blob(&blob.key).await, payload.as_bytes());
    assert_eq!(data.read_object(&blob.key).await, payload.as_bytes());
    if data.queue_url().is_some() {
        // On SQS the message's attributes say where the payload is, beside its ids.
        let (_, _, attributes) = data.sqs_peek(1).await.pop().expect("the message");
        assert_eq!(attributes["payload_mode"], "S3");
        assert_eq!(attributes["schema"], "event.v1");
        assert_eq!(attributes["event_id"], "edge-blob");
        assert_eq!(attributes["blob_key"], blob.key);
    }

    // A worker on the same data then stores it like any other event.
    let worker = data.spawn(&["--role", "worker"]).await;
    drop(worker_wait(&api, "edge-blob").await);
    let text = api.get("/v1/events/edge-blob").await.text().await.unwrap();
    assert_eq!(raw_payload(&text), payload);
    let stored: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(stored["payload_mode"], "S3");
    // Once stored, the payload lives in the store and its transport blob is gone.
    let deadline = std::time::Instant::now() + crate::helpers::PATIENCE;
    while !data.blob_keys().await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the processed event's blob was kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    drop(worker);
}

async fn worker_wait(api: &crate::helpers::TestApp, event_id: &str) -> Value {
    api.wait_for_status(event_id, "processed").await
}

#[tokio::test]
async fn a_payload_over_max_payload_bytes_is_refused_with_413() {
    let data = TestData::new().await;
    let app = data.spawn(&["--max-payload-bytes", "1000"]).await;
    // A JSON string of 998 characters serialises to exactly 1000 bytes.
    let ok = app.post_event(&event("fits", json!("x".repeat(998)))).await;
    assert_eq!(ok.status(), 202);
    let response = app
        .post_event(&event("too-big", json!("x".repeat(999))))
        .await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    // A body far beyond the limit is refused without being read in full.
    let huge = format!(
        r#"{{"event_id":"huge","event_type":"t","payload":"{}"}}"#,
        "y".repeat(5_000_000)
    );
    let response = app
        .post_raw("/v1/events", huge, Some("application/json"))
        .await;
    assert_eq!(response.status(), 413);
}

/// `[[…]]` nested `depth` levels deep.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn a_payload_deeper_than_max_payload_depth_is_a_400_naming_payload_alone_and_in_a_batch() {
    let data = TestData::new().await;
    let app = data.spawn(&["--role", "api"]).await;
    let single = |event_id: &str, depth: usize| {
        format!(
            r#"{{"event_id":"{event_id}","event_type":"t","payload":{}}}"#,
            nested(depth)
        )
    };
    for depth in [127, 128] {
        let response = app
            .post_raw(
                "/v1/events",
                single(&format!("d{depth}"), depth),
                Some("application/json"),
            )
            .await;
        assert_eq!(response.status(), 202, "depth {depth}");
    }
    for depth in [129, 100_000] {
        let response = app
            .post_raw(
                "/v1/events",
                single("deep", depth),
                Some("application/json"),
            )
            .await;
        assert_eq!(response.status(), 400, "depth {depth}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("payload"),
            "{body}"
        );
    }
    let batch = format!(
        r#"{{"events":[{},{}]}}"#,
        single("shallow", 128),
        single("deep", 100_000)
    );
    let response = app
        .post_raw("/v1/events/batch", batch, Some("application/json"))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["results"][0]["status"], 202);
    assert_eq!(body["results"][1]["status"], 400);
    assert_eq!(body["results"][1]["error"]["code"], "validation_error");

    // The limit is a setting.
    let strict = data
        .spawn(&["--role", "api", "--max-payload-depth", "2"])
        .await;
    let response = strict
        .post_raw("/v1/events", single("three", 3), Some("application/json"))
        .await;
    assert_eq!(response.status(), 400);
    crate::reliability::record(crate::reliability::Trial {
        scenario: "deep JSON",
        tried: "payloads 127, 128, 129 and 100,000 levels deep, alone and in a batch",
        requests: 5,
        accepted: 3,
        lost: 0,
        duplicated: 0,
        observed: "127 and 128 deep: 202; 129 and 100,000 deep: 400 naming payload".to_owned(),
    });
}

#[tokio::test]
async fn a_queue_that_refuses_a_message_is_a_500_not_a_503_and_ingest_resumes_once_it_accepts() {
    let data = TestData::new().await;
    let app = data.spawn(&["--role", "api"]).await;
    assert_eq!(
        app.post_event(&event("before", json!(1))).await.status(),
        202
    );
    // A refusal, as a constraint the database enforces: retrying would not cure it, so it must
    // not be answered as an outage (503 invites exactly that retry).
    // On SQS: a queue whose messages may be at most 1 KiB refuses a larger one.
    let sqs = data.queue_url().is_some();
    let embedded = data.database_url().is_none();
    let refused_payload = if sqs {
        json!("r".repeat(2048))
    } else {
        json!(1)
    };
    if sqs {
        data.sqs_set_queue_attribute("MaximumMessageSize", "1024")
            .await;
    } else if embedded {
        data.queue_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON queue_messages \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .await;
    } else {
        data.queue_sql("ALTER TABLE queue_messages ADD CONSTRAINT refuse CHECK (false) NOT VALID")
            .await;
    }
    let response = app
        .post_event(&event("refused", refused_payload.clone()))
        .await;
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal", "{body}");
    let batch = json!({"events": [
        event("refused-1", refused_payload.clone()),
        event("refused-2", refused_payload),
    ]});
    let response = app
        .client
        .post(app.url("/v1/events/batch"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    if sqs {
        data.sqs_set_queue_attribute("MaximumMessageSize", "1048576")
            .await;
    } else if embedded {
        data.queue_sql("DROP TRIGGER refuse").await;
    } else {
        data.queue_sql("ALTER TABLE queue_messages DROP CONSTRAINT refuse")
            .await;
    }
    assert_eq!(
        app.post_event(&event("after", json!(1))).await.status(),
        202
    );
}

#[tokio::test]
async fn sending_the_same_event_twice_is_accepted_twice_and_stored_once() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let first = event("twice", json!({"n": 1}));
    assert_eq!(app.post_event(&first).await.status(), 202);
    app.wait_for_status("twice", "processed").await;
    assert_eq!(app.post_event(&first).await.status(), 202);
    let deadline = std::time::Instant::now() + crate::helpers::PATIENCE;
    while app.metric("fluxa_events_duplicate_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the duplicate was never processed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(data.count_event_rows("twice").await, 1);
    let status = app.wait_for_status("twice", "processed").await;
    assert_eq!(status["attempts"], 1);
}

/// One bad-input case: what to send and what must come back.
struct BadInput {
    name: &'static str,
    body: Vec<u8>,
    content_type: Option<&'static str>,
    correlation_id: Option<&'static str>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
}

fn bad(
    name: &'static str,
    body: &str,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
) -> BadInput {
    BadInput {
        name,
        body: body.as_bytes().to_vec(),
        content_type: Some("application/json"),
        correlation_id: None,
        status,
        code,
        field,
    }
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx_and_error_code_and_is_never_stored() {
    let data = TestData::new().await;
    let app = data.spawn(&["--max-payload-bytes", "4096"]).await;
    let long_id = "i".repeat(129);
    let long_type = "t".repeat(129);
    let long_source = "s".repeat(257);
    let mut cases = vec![
        bad("empty body", "", 400, "invalid_json", None),
        bad(
            "truncated JSON",
            r#"{"event_id":"a","event_type":"t","payload":{"#,
            400,
            "invalid_json",
            None,
        ),
        bad(
            "trailing garbage",
            r#"{"event_id":"a","event_type":"t","payload":1} x"#,
            400,
            "invalid_json",
            None,
        ),
        bad(
            "syntax error after a type error",
            r#"{"event_id":5,"event_type":"t","payload":{]}"#,
            400,
            "invalid_json",
            None,
        ),
        bad("an array body", "[1,2]", 400, "validation_error", None),
        bad("a string body", "\"event\"", 400, "validation_error", None),
        bad(
            "missing event_id",
            r#"{"event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "missing event_type",
            r#"{"event_id":"a","payload":1}"#,
            400,
            "validation_error",
            Some("event_type"),
        ),
        bad(
            "missing payload",
            r#"{"event_id":"a","event_type":"t"}"#,
            400,
            "validation_error",
            Some("payload"),
        ),
        bad(
            "numeric event_id",
            r#"{"event_id":7,"event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "object event_type",
            r#"{"event_id":"a","event_type":{},"payload":1}"#,
            400,
            "validation_error",
            Some("event_type"),
        ),
        bad(
            "numeric source",
            r#"{"event_id":"a","event_type":"t","source":1,"payload":1}"#,
            400,
            "validation_error",
            Some("source"),
        ),
        bad(
            "unknown member",
            r#"{"event_id":"a","event_type":"t","payload":1,"paylaod":2}"#,
            400,
            "validation_error",
            Some("paylaod"),
        ),
        bad(
            "empty event_id",
            r#"{"event_id":"","event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "dot event_id",
            r#"{"event_id":".","event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "dot-dot event_id",
            r#"{"event_id":"..","event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "slash in event_id",
            r#"{"event_id":"a/b","event_type":"t","payload":1}"#,
            400,
            "validation_error",
            Some("event_id"),
        ),
        bad(
            "control character in event_type",
            r#"{"event_id":"a","event_type":"t\u0007","payload":1}"#,
            400,
            "validation_error",
            Some("event_type"),
        ),
        bad(
            "control character in source",
            r#"{"event_id":"a","event_type":"t","source":"x\ny","payload":1}"#,
            400,
            "validation_error",
            Some("source"),
        ),
        bad(
            "empty event_type",
            r#"{"event_id":"a","event_type":"","payload":1}"#,
            400,
            "validation_error",
            Some("event_type"),
        ),
        bad(
            "bad occurred_at",
            r#"{"event_id":"a","event_type":"t","occurred_at":"2026-13-01","payload":1}"#,
            400,
            "validation_error",
            Some("occurred_at"),
        ),
        bad(
            "malformed payload_sha256",
            r#"{"event_id":"a","event_type":"t","payload":1,"payload_sha256":"XYZ"}"#,
            400,
            "validation_error",
            Some("payload_sha256"),
        ),
        bad(
            "upper-case payload_sha256",
            &format!(
                r#"{{"event_id":"a","event_type":"t","payload":1,"payload_sha256":"{}"}}"#,
                "A".repeat(64)
            ),
            400,
            "validation_error",
            Some("payload_sha256"),
        ),
        bad(
            "wrong payload_sha256",
            &format!(
                r#"{{"event_id":"a","event_type":"t","payload":1,"payload_sha256":"{}"}}"#,
                "0".repeat(64)
            ),
            400,
            "hash_mismatch",
            Some("payload_sha256"),
        ),
        bad(
            "payload over the maximum",
            &format!(
                r#"{{"event_id":"a","event_type":"t","payload":"{}"}}"#,
                "x".repeat(5000)
            ),
            413,
            "payload_too_large",
            None,
        ),
    ];
    cases.push(BadInput {
        body: b"{\"event_id\":\"a\xff\",\"event_type\":\"t\",\"payload\":1}".to_vec(),
        ..bad("invalid UTF-8 is not JSON", "", 400, "invalid_json", None)
    });
    cases.push(bad(
        "129-character event_id",
        &format!(r#"{{"event_id":"{long_id}","event_type":"t","payload":1}}"#),
        400,
        "validation_error",
        Some("event_id"),
    ));
    cases.push(bad(
        "129-character event_type",
        &format!(r#"{{"event_id":"a","event_type":"{long_type}","payload":1}}"#),
        400,
        "validation_error",
        Some("event_type"),
    ));
    cases.push(bad(
        "257-character source",
        &format!(r#"{{"event_id":"a","event_type":"t","source":"{long_source}","payload":1}}"#),
        400,
        "validation_error",
        Some("source"),
    ));
    let good = r#"{"event_id":"a","event_type":"t","payload":1}"#;
    for (name, content_type) in [
        ("no content type", None),
        ("text/plain", Some("text/plain")),
        ("form encoding", Some("application/x-www-form-urlencoded")),
        ("json lookalike", Some("application/jsonp")),
        // JSON between systems is UTF-8 (RFC 8259 §8.1): another charset would be misread.
        ("latin1 charset", Some("application/json; charset=latin1")),
        (
            "quoted other charset",
            Some("application/json;charset=\"ISO-8859-1\""),
        ),
        ("utf-16 charset", Some("Application/JSON; charset=utf-16")),
    ] {
        cases.push(BadInput {
            content_type,
            ..bad(name, good, 415, "unsupported_media_type", None)
        });
    }
    for (name, correlation_id) in [
        ("empty correlation id", ""),
        ("correlation id with a space", "a b"),
        ("correlation id with a slash", "a/b"),
        ("129-character correlation id", "ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"),
    ] {
        cases.push(BadInput {
            correlation_id: Some(correlation_id),
            ..bad(name, good, 400, "validation_error", Some("X-Correlation-ID"))
        });
    }

    for case in &cases {
        let mut request = app
            .client
            .post(app.url("/v1/events"))
            .body(case.body.clone());
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(correlation_id) = case.correlation_id {
            request = request.header("x-correlation-id", correlation_id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            case.status,
            "case: {}",
            case.name
        );
        let header_id = response.headers()["x-correlation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], case.code,
            "case: {}: {body}",
            case.name
        );
        let message = body["error"]["message"].as_str().unwrap();
        if let Some(field) = case.field {
            assert!(
                message.contains(field),
                "case {}: message {message:?} must name {field}",
                case.name
            );
        }
        let correlation_id = body["error"]["correlation_id"].as_str().unwrap();
        assert_eq!(correlation_id, header_id, "case: {}", case.name);
        if let Some(sent) = case.correlation_id {
            assert_ne!(
                correlation_id, sent,
                "case {}: an invalid id must be replaced",
                case.name
            );
            assert!(
                uuid_like(correlation_id),
                "case {}: a fresh UUID is expected",
                case.name
            );
        }
    }
    assert_eq!(
        app.get("/v1/events/a/status").await.status(),
        404,
        "nothing bad may reach the processor"
    );
}

fn uuid_like(text: &str) -> bool {
    text.len() == 36 && text.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn a_valid_correlation_id_is_echoed_and_a_missing_one_is_generated() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let response = app
        .client
        .post(app.url("/v1/events"))
        .header("content-type", "application/json")
        .header("x-correlation-id", "Abc.123_x:y-z")
        .body(serde_json::to_vec(&event("corr-given", json!(1))).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "Abc.123_x:y-z");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["correlation_id"], "Abc.123_x:y-z");

    let response = app.post_event(&event("corr-generated", json!(1))).await;
    let generated = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid_like(&generated));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["correlation_id"], generated.as_str());
}

#[tokio::test]
async fn a_batch_accepts_good_items_reports_bad_ones_in_order_and_stores_the_good_ones() {
    let data = TestData::new().await;
    let app = data.spawn(&["--max-payload-bytes", "300000"]).await;
    let big = payload_of_size(262_145);
    let body = format!(
        r#"{{"events":[
            {{"event_id":"b-0","event_type":"t","payload":{{"i":0}}}},
            {{"event_id":"b-1","event_type":"t"}},
            {{"event_id":"b-2","event_type":"t","payload":{big}}},
            7,
            {{"event_id":"b-4","event_type":"t","payload":[4],"payload_sha256":"{zero}"}}
        ]}}"#,
        zero = "0".repeat(64)
    );
    let response = app
        .client
        .post(app.url("/v1/events/batch"))
        .header("content-type", "application/json")
        .header("x-correlation-id", "batch-corr")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["correlation_id"], "batch-corr");
    assert_eq!(result["accepted"], 2);
    assert_eq!(result["rejected"], 3);
    let items = result["results"].as_array().unwrap();
    let statuses: Vec<(u64, u64)> = items
        .iter()
        .map(|i| (i["index"].as_u64().unwrap(), i["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        vec![(0, 202), (1, 400), (2, 202), (3, 400), (4, 400)]
    );
    assert_eq!(items[0]["payload_mode"], "INLINE");
    assert_eq!(items[2]["payload_mode"], "S3");
    assert_eq!(items[1]["error"]["code"], "validation_error");
    assert!(items[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("payload"));
    assert_eq!(items[4]["error"]["code"], "hash_mismatch");

    app.wait_for_status("b-0", "processed").await;
    app.wait_for_status("b-2", "processed").await;
    let (_, stored) = app.get_json("/v1/events/b-2").await;
    assert_eq!(stored["correlation_id"], "batch-corr");
    assert_eq!(app.get("/v1/events/b-1/status").await.status(), 404);
}

#[tokio::test]
async fn whole_batch_problems_answer_like_a_single_ingest_and_accept_nothing() {
    let data = TestData::new().await;
    let app = data
        .spawn(&["--role", "api", "--max-batch-bytes", "100000"])
        .await;
    let one = r#"{"event_id":"w","event_type":"t","payload":1}"#;
    let too_many = format!(r#"{{"events":[{}]}}"#, vec![one; 1001].join(","));
    let oversized = format!(
        r#"{{"events":[{{"event_id":"w","event_type":"t","payload":"{}"}}]}}"#,
        "x".repeat(100_001)
    );
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "not JSON",
            "{".to_owned(),
            Some("application/json"),
            400,
            "invalid_json",
        ),
        (
            "no events member",
            "{}".to_owned(),
            Some("application/json"),
            400,
            "validation_error",
        ),
        (
            "events is not an array",
            r#"{"events":{}}"#.to_owned(),
            Some("application/json"),
            400,
            "validation_error",
        ),
        (
            "no events",
            r#"{"events":[]}"#.to_owned(),
            Some("application/json"),
            400,
            "validation_error",
        ),
        (
            "unknown member",
            format!(r#"{{"events":[{one}],"extra":1}}"#),
            Some("application/json"),
            400,
            "validation_error",
        ),
        (
            "1001 events",
            too_many,
            Some("application/json"),
            400,
            "validation_error",
        ),
        (
            "body too large",
            oversized,
            Some("application/json"),
            413,
            "payload_too_large",
        ),
        (
            "wrong content type",
            format!(r#"{{"events":[{one}]}}"#),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "a charset other than utf-8",
            format!(r#"{{"events":[{one}]}}"#),
            Some("application/json; charset=windows-1252"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (name, body, content_type, status, code) in cases {
        let response = app.post_raw("/v1/events/batch", body, content_type).await;
        assert_eq!(response.status().as_u16(), status, "case: {name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "case: {name}");
    }
    assert!(data.queue_is_empty().await);
}

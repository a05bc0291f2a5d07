//! The Lambda handlers, each fed what AWS feeds it: API Gateway v2 request JSON for ingest,
//! query and admin, and `SqsEvent` JSON built from messages received from a real queue (moto)
//! for the processor, with an emulated event source mapping around it. Ignored by default:
//! `./test` runs them with moto and PostgreSQL up.

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use common::{api_request, sqs_event, Deployment};
use fluxa_lambda::processor::ProcessorFunction;
use fluxa_lambda::Role;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Sends `request` (API Gateway v2 JSON) through lambda_http's own decoding to `app`.
async fn call(app: &Router, request: Value) -> (u16, Value) {
    let request = lambda_http::request::from_str(&request.to_string()).expect("a v2 request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

fn event(event_id: &str, payload: Value) -> String {
    json!({"event_id": event_id, "event_type": "lambda.test", "payload": payload}).to_string()
}

/// Polls both queues, as their two event source mappings do, until both are empty and the
/// store holds `dead_letters` dead letters; returns how many failures the main queue's
/// invocations reported.
async fn drain(deployment: &Deployment, function: &ProcessorFunction, dead_letters: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut main_failures = 0;
    loop {
        assert!(Instant::now() < deadline, "the queues never emptied");
        let (n_main, failed) = poll_once(
            deployment,
            function,
            &deployment.queue_url,
            &deployment.queue_arn,
        )
        .await;
        main_failures += failed.len();
        let (n_dead, failed_dead) = poll_once(
            deployment,
            function,
            &deployment.dlq_url,
            &deployment.dlq_arn,
        )
        .await;
        assert!(failed_dead.is_empty(), "recording dead letters failed");
        if n_main == 0 && n_dead == 0 {
            let recorded = deployment
                .scalar("SELECT COUNT(*)::text FROM dead_letters")
                .await;
            if recorded == Some(dead_letters.to_string()) {
                return main_failures;
            }
        }
    }
}

/// One poll of an event source mapping: receive from `queue_url`, invoke, delete what did not
/// fail (failures stay, and come back after the visibility timeout). Returns how many records
/// the invocation had and the ids it reported as failures.
async fn poll_once(
    deployment: &Deployment,
    function: &ProcessorFunction,
    queue_url: &str,
    source_arn: &str,
) -> (usize, Vec<String>) {
    let messages = deployment.receive(queue_url).await;
    if messages.is_empty() {
        return (0, Vec::new());
    }
    let event = serde_json::from_value(sqs_event(&messages, source_arn)).expect("an SqsEvent");
    let response = function.handle(event).await;
    let failed: Vec<String> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    for message in &messages {
        if !failed
            .iter()
            .any(|id| Some(id.as_str()) == message.message_id())
        {
            deployment
                .delete(queue_url, message.receipt_handle().unwrap())
                .await;
        }
    }
    (messages.len(), failed)
}

#[tokio::test]
#[ignore = "needs moto and PostgreSQL: ./test runs it"]
async fn ingest_answers_an_api_gateway_request_and_a_large_payload_travels_as_its_s3_key_only() {
    let deployment = Deployment::create().await;
    let config = deployment.config();
    let ingest = fluxa_lambda::http_app(Role::Ingest, &config).await.unwrap();

    let big = json!("x".repeat(300_000));
    let (status, body) = call(
        &ingest,
        api_request("POST", "/v1/events", Some(&event("big-1", big))),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["payload_mode"], "S3");

    let messages = deployment.receive(&deployment.queue_url).await;
    assert_eq!(messages.len(), 1);
    let message: Value = serde_json::from_str(messages[0].body().unwrap()).unwrap();
    assert!(messages[0].body().unwrap().len() < 4096);
    let mut names: Vec<&String> = message["payload_blob"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    names.sort();
    assert_eq!(names, ["bucket", "key"], "{message}");
    assert_eq!(message["payload_blob"]["bucket"], deployment.bucket);
    let attributes = messages[0].message_attributes().unwrap();
    assert_eq!(attributes["payload_mode"].string_value(), Some("S3"));
    assert_eq!(
        attributes["correlation_id"].string_value(),
        Some("lambda-test-correlation")
    );

    // The ingest function has no query or admin routes (and no database to serve them).
    let (status, _) = call(&ingest, api_request("GET", "/v1/events/big-1", None)).await;
    assert_eq!(status, 404);
    let (status, _) = call(&ingest, api_request("GET", "/v1/admin/dlq", None)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
#[ignore = "needs moto and PostgreSQL: ./test runs it"]
async fn the_processor_reports_exactly_the_transient_failures_and_dead_letters_the_permanent_ones()
{
    let deployment = Deployment::create().await;
    let config = deployment.config();
    let ingest = fluxa_lambda::http_app(Role::Ingest, &config).await.unwrap();
    let processor = ProcessorFunction::open(&config).await.unwrap();

    for (id, payload) in [("ok-1", json!({"n": 1})), ("busy-1", json!({"n": 2}))] {
        let (status, _) = call(
            &ingest,
            api_request("POST", "/v1/events", Some(&event(id, payload))),
        )
        .await;
        assert_eq!(status, 202);
    }
    deployment
        .send_raw(r#"{"type":"event.v1","garbage":true}"#)
        .await;
    // Another worker holds busy-1's lease: processing it now is a transient failure.
    deployment
        .sql(
            "INSERT INTO idempotency_keys (event_id, status, attempts, lease_token, \
             lease_expires_at, created_at, updated_at) VALUES ('busy-1', 'processing', 1, \
             'another-worker', now() + interval '1 hour', now(), now())",
        )
        .await;

    // All three in one invocation, as an event source mapping batches them.
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while messages.len() < 3 && Instant::now() < deadline {
        messages.extend(deployment.receive(&deployment.queue_url).await);
    }
    assert_eq!(messages.len(), 3);
    let event = serde_json::from_value(sqs_event(&messages, &deployment.queue_arn)).unwrap();
    let response = processor.handle(event).await;
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    let busy = messages
        .iter()
        .find(|m| m.body().unwrap().contains("busy-1"))
        .unwrap();
    assert_eq!(
        failed,
        [busy.message_id().unwrap()],
        "only the transient failure"
    );

    assert_eq!(
        deployment
            .scalar("SELECT status FROM idempotency_keys WHERE event_id = 'ok-1'")
            .await
            .as_deref(),
        Some("processed")
    );
    // The permanent failure went to the SQS DLQ with its reason.
    let dead = deployment.receive(&deployment.dlq_url).await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].message_attributes().unwrap();
    assert_eq!(reason["error_code"].string_value(), Some("invalid_message"));
    assert_eq!(reason["error_class"].string_value(), Some("permanent"));
}

#[tokio::test]
#[ignore = "needs moto and PostgreSQL: ./test runs it"]
async fn under_an_emulated_event_source_mapping_failures_reach_the_dlq_and_the_admin_api_shows_why()
{
    let deployment = Deployment::create().await;
    let config = deployment.config();
    let ingest = fluxa_lambda::http_app(Role::Ingest, &config).await.unwrap();
    let processor = ProcessorFunction::open(&config).await.unwrap();
    let query = fluxa_lambda::http_app(Role::Query, &config).await.unwrap();
    let admin = fluxa_lambda::http_app(Role::Admin, &config).await.unwrap();

    let batch = json!({"events": [
        {"event_id": "esm-1", "event_type": "lambda.test", "payload": {"n": 1}},
        {"event_id": "esm-2", "event_type": "lambda.test", "payload": "y".repeat(270_000)},
    ]});
    let (status, body) = call(
        &ingest,
        api_request("POST", "/v1/events/batch", Some(&batch.to_string())),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    deployment.send_raw("not even json").await;
    drain(&deployment, &processor, 1).await;

    // The store refuses writes: every receive of the next event fails, and after its third
    // SQS moves it to the DLQ, whose own mapping records it.
    deployment
        .sql("ALTER TABLE events RENAME TO events_away")
        .await;
    let (status, _) = call(
        &ingest,
        api_request(
            "POST",
            "/v1/events",
            Some(&event("stuck-1", json!({"n": 3}))),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let main_failures = drain(&deployment, &processor, 2).await;
    assert_eq!(
        main_failures, 3,
        "the stuck event failed on each of its 3 receives"
    );
    deployment
        .sql("ALTER TABLE events_away RENAME TO events")
        .await;

    // A processor that dies holding the event on every receive (a claimed record, never
    // settled, and no answer to the mapping): SQS moves the message after its third receive
    // without a word, and only the drain can tell the store.
    let (status, _) = call(
        &ingest,
        api_request(
            "POST",
            "/v1/events",
            Some(&event("died-1", json!({"n": 4}))),
        ),
    )
    .await;
    assert_eq!(status, 202);
    deployment
        .sql(
            "INSERT INTO idempotency_keys (event_id, status, attempts, lease_token, \
             lease_expires_at, created_at, updated_at) VALUES ('died-1', 'processing', 1, \
             'a-worker-that-died', now() + interval '1 second', now(), now())",
        )
        .await;
    let mut receives = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while receives < 3 {
        assert!(Instant::now() < deadline, "died-1 was not received 3 times");
        receives += deployment.receive(&deployment.queue_url).await.len();
    }
    drain(&deployment, &processor, 3).await;
    let (_, body) = call(&query, api_request("GET", "/v1/events/died-1/status", None)).await;
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["last_error"]["code"], "retries_exhausted", "{body}");

    for id in ["esm-1", "esm-2"] {
        let (status, body) = call(
            &query,
            api_request("GET", &format!("/v1/events/{id}"), None),
        )
        .await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    // The event whose last receiver never finished ends failed, not processing.
    let (status, body) = call(
        &query,
        api_request("GET", "/v1/events/stuck-1/status", None),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["last_error"]["code"], "retries_exhausted", "{body}");

    let (status, body) = call(&admin, api_request("GET", "/v1/admin/dlq", None)).await;
    assert_eq!(status, 200, "{body}");
    let entries = body["dead_letters"].as_array().unwrap();
    let by_class = |class: &str| {
        entries
            .iter()
            .find(|e| e["error_class"] == class)
            .unwrap_or_else(|| panic!("no {class} entry in {body}"))
    };
    assert_eq!(by_class("permanent")["error"]["code"], "invalid_message");
    let exhausted = by_class("retries_exhausted");
    assert_eq!(exhausted["event_id"], "stuck-1");
    assert_eq!(exhausted["receive_count"], 3);

    // The query function writes nothing: its routes are reads, and its sessions are read-only.
    let (status, _) = call(
        &query,
        api_request("POST", "/v1/events", Some(&event("via-query", json!(1)))),
    )
    .await;
    assert_eq!(status, 405);

    // A redrive through the admin function sends it back to SQS; with the store back, it is
    // processed.
    let (status, body) = call(
        &admin,
        api_request(
            "POST",
            "/v1/admin/dlq/redrive",
            Some(r#"{"event_id":"stuck-1"}"#),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redriven"], 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        poll_once(
            &deployment,
            &processor,
            &deployment.queue_url,
            &deployment.queue_arn,
        )
        .await;
        let (_, body) = call(
            &query,
            api_request("GET", "/v1/events/stuck-1/status", None),
        )
        .await;
        if body["status"] == "processed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the redriven event was never processed: {body}"
        );
    }
}

fn sources(env: &[(&str, &str)]) -> fluxa_host::Sources {
    fluxa_host::Sources {
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn a_function_refuses_bodies_that_cannot_fit_in_a_lambda_invoke() {
    let tokens = ("FLUXA_API_TOKENS", "ingest=abcdefghijklmnop");
    let config = fluxa_lambda::LambdaConfig::from_sources(sources(&[tokens])).unwrap();
    assert_eq!(config.config.limits.max_batch_bytes, 2 * 1024 * 1024);
    assert!(config.config.limits.largest_body() <= fluxa_lambda::MAX_BODY_BYTES);

    let error = fluxa_lambda::LambdaConfig::from_sources(sources(&[
        tokens,
        ("FLUXA_MAX_BATCH_BYTES", "10485760"),
    ]))
    .unwrap_err();
    assert!(error.to_string().contains("6 MB"), "{error}");
}

#[tokio::test]
async fn the_http_functions_refuse_to_start_without_tokens_and_the_processor_needs_none() {
    // The processor's variables as the Terraform sets them: no tokens, and no switch either.
    let processor = fluxa_lambda::LambdaConfig::from_sources(sources(&[
        ("FLUXA_DATABASE_SECRET_ID", "fluxa-db"),
        (
            "FLUXA_QUEUE_URL",
            "https://sqs.us-east-1.amazonaws.com/1/fluxa",
        ),
        ("FLUXA_BLOB_URL", "s3://fluxa-payloads/payloads"),
        ("FLUXA_MAX_RECEIVES", "3"),
        ("FLUXA_LEASE", "60s"),
    ]))
    .expect("the processor's configuration needs no tokens");
    assert!(processor.tokens.is_empty());

    // An HTTP function is refused before it opens anything, whatever its role; with the
    // insecure switch it gets past the tokens, to what it opens (none of it configured here).
    let insecure =
        fluxa_lambda::LambdaConfig::from_sources(sources(&[("FLUXA_INSECURE_NO_AUTH", "true")]))
            .unwrap();
    for role in [Role::Ingest, Role::Query, Role::Admin] {
        let error = fluxa_lambda::http_app(role, &processor).await.unwrap_err();
        assert!(
            error.to_string().contains("FLUXA_API_TOKENS"),
            "{role:?}: {error}"
        );
        let error = fluxa_lambda::http_app(role, &insecure).await.unwrap_err();
        assert!(
            !error.to_string().contains("API tokens"),
            "{role:?}: {error}"
        );
    }
}

#[tokio::test]
#[ignore = "needs moto and PostgreSQL: ./test runs it"]
async fn a_batch_whose_sqs_send_fails_for_one_item_fails_that_item_alone_and_deletes_its_blob() {
    let deployment = Deployment::create().await;
    let config = deployment.config();
    let client = aws_sdk_sqs::Client::new(&fluxa_aws::sdk_config().await);
    // SQS refuses an entry with DelaySeconds over 900, and that entry alone: the second
    // message of every send fails. SQS calls it the sender's fault, which validated input
    // cannot cause, so that item is a 500 (an entry the service failed would be a 503).
    let queue = fluxa_aws::sqs::SqsQueue::open_sender(client, deployment.queue_url.clone())
        .await
        .unwrap()
        .with_entry_delay_for_tests(1, 1000);
    let blobs = fluxa_blob::BlobStore::s3(&deployment.bucket, "payloads").unwrap();
    let state = fluxa_api::AppState {
        queue: Some(std::sync::Arc::new(queue)),
        dead_letters: None,
        blobs: Some(blobs.clone()),
        reader: None,
        store_admin: None,
        limits: config.config.limits,
        tokens: std::sync::Arc::new(config.tokens.clone()),
        metrics: fluxa_telemetry::metrics_handle(),
    };
    let ingest = fluxa_api::app_with(state, fluxa_api::Routes::INGEST).unwrap();

    let big = "z".repeat(300_000);
    let batch = json!({"events": [
        {"event_id": "part-0", "event_type": "t", "payload": big},
        {"event_id": "part-1", "event_type": "t", "payload": big},
        {"event_id": "part-2", "event_type": "t", "payload": {"small": true}},
    ]});
    let (status, body) = call(
        &ingest,
        api_request("POST", "/v1/events/batch", Some(&batch.to_string())),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [202, 500, 202], "{body}");
    assert_eq!(body["results"][1]["error"]["code"], "internal", "{body}");

    let keys = blobs
        .payload_keys_older_than(chrono::Utc::now() + chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].contains("/part-0/"),
        "the sent item keeps its blob: {keys:?}"
    );
    let sent = deployment.receive(&deployment.queue_url).await;
    let mut ids: Vec<&str> = sent
        .iter()
        .filter_map(|m| m.message_attributes()?.get("event_id")?.string_value())
        .collect();
    ids.sort();
    assert_eq!(ids, ["part-0", "part-2"]);
}

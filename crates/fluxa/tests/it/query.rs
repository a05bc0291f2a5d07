//! The query API (contract section 2, seed invariant 7).

use serde_json::{json, Value};

use crate::helpers::{event, TestData};

#[tokio::test]
async fn unknown_and_invalid_ids_are_not_found_and_looking_creates_nothing() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    for path in [
        "/v1/events/never-sent",
        "/v1/events/never-sent/status",
        "/v1/events/..",
        "/v1/events/a%20b",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 404, "path {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    // Reads never write: the processor has still never seen the id.
    assert_eq!(app.get("/v1/events/never-sent/status").await.status(), 404);
    assert_eq!(data.count_event_rows("never-sent").await, 0);
}

#[tokio::test]
async fn the_status_endpoint_reports_the_idempotency_record() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    app.post_event(&event("st-1", json!([1]))).await;
    let status = app.wait_for_status("st-1", "processed").await;
    assert_eq!(status["event_id"], "st-1");
    assert_eq!(status["attempts"], 1);
    assert_eq!(status["last_error"], Value::Null);
    assert!(status["updated_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_with_the_contract_error_body() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let response = app.get("/v2/nothing").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["correlation_id"].is_string());

    let response = app
        .client
        .delete(app.url("/v1/events/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // GET lists and POST ingests; nothing else is served on the collection.
    let response = app.client.put(app.url("/v1/events")).send().await.unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn errors_raised_by_the_framework_still_use_the_contract_error_body() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let response = app.get("/v1/events/%FF").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("event_id"));

    let response = app
        .client
        .post(app.url("/v1/admin/dlq/redrive"))
        .header("content-type", "application/json")
        .body(" ".repeat(3_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert!(body["error"]["correlation_id"].is_string());
}

//! Dead-letter operations from the admin API and the CLI (contract section 4).

use serde_json::{json, Value};

use crate::helpers::{event, TestData};

#[tokio::test]
async fn dead_letters_can_be_listed_shown_and_redriven_from_the_cli() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    app.post_event(&event("cli-1", json!({"v": 1}))).await;
    app.wait_for_status("cli-1", "processed").await;
    app.post_event(&event("cli-1", json!({"v": 2}))).await;
    let entry = app.wait_for_dead_letter("cli-1").await;
    for key in [
        "id",
        "event_id",
        "correlation_id",
        "error_class",
        "error",
        "receive_count",
        "first_failure_at",
        "last_failure_at",
        "message",
    ] {
        assert!(entry.get(key).is_some(), "{key} missing from {entry}");
    }
    let id = entry["id"].as_str().unwrap().to_owned();
    let (code, shown) = app.get_json(&format!("/v1/admin/dlq/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(shown["message"]["event_id"], "cli-1");
    assert_eq!(app.get("/v1/admin/dlq/no-such-id").await.status(), 404);
    let data_dir = data.path().to_str().unwrap().to_owned();

    let output = data
        .command()
        .args(["dlq", "list", "--data-dir", &data_dir])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let listed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["error"]["code"], "event_id_conflict");

    let output = data
        .command()
        .args(["dlq", "show", &id, "--data-dir", &data_dir])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["id"], id.as_str());

    let output = data
        .command()
        .args(["dlq", "show", "nope", "--data-dir", &data_dir])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no dead letter"));

    let output = data
        .command()
        .args(["dlq", "redrive", "--data-dir", &data_dir])
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "redrive without a selector must be refused"
    );

    // Redriving a conflict is harmless: it conflicts again and the stored event is untouched.
    let output = data
        .command()
        .args([
            "dlq",
            "redrive",
            "--event-id",
            "cli-1",
            "--data-dir",
            &data_dir,
        ])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["redriven"], 1);
    let entry = app.wait_for_dead_letter("cli-1").await;
    assert_eq!(entry["error"]["code"], "event_id_conflict");
    let (_, stored) = app.get_json("/v1/events/cli-1").await;
    assert_eq!(stored["payload"], json!({"v": 1}));
}

#[tokio::test]
async fn redriving_an_event_that_was_processed_meanwhile_is_a_harmless_duplicate() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    data.store_sql("ALTER TABLE events RENAME TO events_away")
        .await;
    app.post_event(&event("redrive-dup", json!(1))).await;
    let entry = app.wait_for_dead_letter("redrive-dup").await;
    assert_eq!(entry["error_class"], "retries_exhausted");

    // The store comes back and the producer re-sends the event, which is processed.
    data.store_sql("ALTER TABLE events_away RENAME TO events")
        .await;
    app.post_event(&event("redrive-dup", json!(1))).await;
    app.wait_for_status("redrive-dup", "processed").await;

    let response = app
        .client
        .post(app.url("/v1/admin/dlq/redrive"))
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["redriven"], 1);
    let deadline = std::time::Instant::now() + crate::helpers::PATIENCE;
    while app.metric("fluxa_events_duplicate_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the redriven message was not processed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(data.count_event_rows("redrive-dup").await, 1);
    let (_, list) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(list["total"], 0);
}

#[tokio::test]
async fn redrive_requests_must_name_exactly_one_selector() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    for body in [
        json!({}),
        json!({"all": true, "event_id": "x"}),
        json!({"bogus": 1}),
        json!({"all": false}),
    ] {
        let response = app
            .client
            .post(app.url("/v1/admin/dlq/redrive"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "body {body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "validation_error");
    }
    let response = app.get("/v1/admin/dlq?limit=0").await;
    assert_eq!(response.status(), 400);
}

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

/// Contract section 6: a `validation_error` names the field, nested ones by their path.
#[tokio::test]
async fn a_wrong_typed_member_of_any_body_is_a_validation_error_naming_that_member() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let event = json!({"event_id": "typed-1", "event_type": "t", "payload": 1});
    let with = |base: &Value, path: &str, value: Value| {
        let mut body = base.clone();
        let mut member = &mut body;
        let names: Vec<&str> = path.split('.').collect();
        for name in &names[..names.len() - 1] {
            member = &mut member[*name];
        }
        member[names[names.len() - 1]] = value;
        body
    };
    let mut cases: Vec<(&str, Value, String)> = Vec::new();
    // The event's members (payload takes any JSON value, so it has no wrong type).
    for member in [
        "event_id",
        "event_type",
        "source",
        "occurred_at",
        "payload_sha256",
    ] {
        cases.push(("/v1/events", with(&event, member, json!(7)), member.into()));
        let batch = json!({"events": [with(&event, member, json!([]))]});
        cases.push(("/v1/events/batch", batch, format!("item {member}")));
    }
    cases.push((
        "/v1/events/batch",
        json!({"events": {"a": 1}}),
        "events".into(),
    ));
    // A redrive's members, each beside a valid selector so that only its type is wrong.
    let filter = json!({"filter": {"event_type": "t"}});
    for (member, value) in [
        ("dry_run", json!("yes")),
        ("limit", json!("ten")),
        ("limit", json!(-1)),
        ("all", json!("true")),
        ("event_id", json!(5)),
        ("id", json!(false)),
        ("filter", json!([])),
        ("filter.event_id", json!(1)),
        ("filter.error_code", json!(1)),
        ("filter.error_class", json!({})),
        ("filter.event_type", json!(true)),
        ("filter.since", json!(0)),
        ("filter.until", json!([])),
    ] {
        cases.push((
            "/v1/admin/dlq/redrive",
            with(&filter, member, value),
            member.into(),
        ));
    }

    for (path, body, member) in cases {
        let (status, answer) = app.post_json(path, &body).await;
        let context = format!("POST {path} {body}: {answer}");
        let (member, message) = if let Some(item) = member.strip_prefix("item ") {
            // A batch judges each item on its own: the item's own 400 names the member.
            assert_eq!(status, 200, "{context}");
            let result = &answer["results"][0];
            assert_eq!(result["status"], 400, "{context}");
            assert_eq!(result["error"]["code"], "validation_error", "{context}");
            (
                item.to_owned(),
                result["error"]["message"].as_str().unwrap().to_owned(),
            )
        } else {
            assert_eq!(status, 400, "{context}");
            assert_eq!(answer["error"]["code"], "validation_error", "{context}");
            (
                member.clone(),
                answer["error"]["message"].as_str().unwrap().to_owned(),
            )
        };
        assert!(
            message.starts_with(&format!("{member}:")),
            "the message must name {member}: {context}"
        );
        assert!(!message.contains(" at line "), "{context}");
    }
}

#[tokio::test]
async fn a_redrive_declared_in_a_charset_other_than_utf8_is_refused() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let response = app
        .post_raw(
            "/v1/admin/dlq/redrive",
            r#"{"all": true, "dry_run": true}"#,
            Some("application/json; charset=iso-8859-1"),
        )
        .await;
    assert_eq!(response.status(), 415);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "unsupported_media_type");
    let (status, _) = app
        .post_json(
            "/v1/admin/dlq/redrive",
            &json!({"all": true, "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200);
}

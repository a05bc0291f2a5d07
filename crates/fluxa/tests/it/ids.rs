//! Identifiers at the boundary (contract sections 6 and 7): an id that can never be valid (NUL,
//! control characters, too long, not even UTF-8) is turned away before any store sees it. In a
//! query or a body it is a 400 `validation_error` naming the field; in a path it is a lookup that
//! finds nothing (404), unless the segment is not even text (400 naming the field). Never a 5xx:
//! on PostgreSQL such a value used to reach the database, which refused it, and that was
//! reported as an outage.

use serde_json::{json, Value};

use crate::helpers::{TestApp, TestData};

/// Ids no route may pass on, as they would arrive in a JSON body or a query string.
fn bad_ids() -> Vec<String> {
    vec![
        "\0".to_owned(),
        "a\0b".to_owned(),
        "a\u{1}b".to_owned(),
        "line\nbreak".to_owned(),
        "del\u{7f}".to_owned(),
        "x".repeat(129),
        "%00".to_owned(),
        "a/b".to_owned(),
        "café".to_owned(),
        String::new(),
    ]
}

/// The same kind of ids as they arrive in a URL path segment, percent-encoded.
fn bad_path_segments() -> Vec<String> {
    vec![
        "%00".to_owned(),
        "a%00b".to_owned(),
        "a%01b".to_owned(),
        "line%0Abreak".to_owned(),
        "del%7F".to_owned(),
        "x".repeat(129),
        "a%2Fb".to_owned(),
        "caf%C3%A9".to_owned(),
        "%2500".to_owned(),
    ]
}

/// Path segments that are not even UTF-8 once percent-decoded.
fn non_text_path_segments() -> Vec<String> {
    vec!["%FF".to_owned(), "a%C3b".to_owned(), "%80%80".to_owned()]
}

/// Every route with an id in its path, and the id's name.
fn id_paths(segment: &str) -> [(String, &'static str); 3] {
    [
        (format!("/v1/events/{segment}"), "event_id"),
        (format!("/v1/events/{segment}/status"), "event_id"),
        (format!("/v1/admin/dlq/{segment}"), "id"),
    ]
}

/// Asserts the contract's error body with `code`, and returns its message.
#[track_caller]
fn assert_error_body(body: &Value, code: &str, context: &str) -> String {
    assert_eq!(body["error"]["code"], code, "{context}: {body}");
    assert!(
        body["error"]["correlation_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{context}: the error body carries no correlation id: {body}"
    );
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn post_redrive(app: &TestApp, body: &Value) -> (u16, Value) {
    let response = app
        .client
        .post(app.url("/v1/admin/dlq/redrive"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn ids_that_can_never_be_valid_in_a_path_find_nothing_on_every_route() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    for segment in bad_path_segments() {
        for (path, _) in id_paths(&segment) {
            let (status, body) = app.get_json(&path).await;
            assert_eq!(status, 404, "GET {path}: {body}");
            assert_error_body(&body, "not_found", &format!("GET {path}"));
        }
    }
    for segment in non_text_path_segments() {
        for (path, field) in id_paths(&segment) {
            let (status, body) = app.get_json(&path).await;
            let context = format!("GET {path}");
            assert_eq!(status, 400, "{context}: {body}");
            let message = assert_error_body(&body, "validation_error", &context);
            assert!(message.starts_with(field), "{context}: {message}");
        }
    }
    crate::reliability::record(crate::reliability::Trial {
        scenario: "invalid ids in paths",
        tried: "NUL, control characters, 129 characters, slashes, non-ASCII and non-UTF-8 ids in every id path",
        requests: 3 * (bad_path_segments().len() + non_text_path_segments().len()) as u64,
        accepted: 0,
        lost: 0,
        duplicated: 0,
        observed: "404 not_found (400 naming the field when not UTF-8); never a 5xx".to_owned(),
    });
}

#[tokio::test]
async fn ids_that_can_never_be_valid_in_a_query_or_a_body_are_validation_errors_naming_the_field() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    for bad in bad_ids() {
        let response = app
            .client
            .get(app.url("/v1/admin/dlq"))
            .query(&[("event_id", bad.as_str())])
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let context = format!("GET /v1/admin/dlq?event_id={bad:?}");
        assert_eq!(status, 400, "{context}: {body}");
        let message = assert_error_body(&body, "validation_error", &context);
        assert!(message.starts_with("event_id"), "{context}: {message}");

        for field in ["event_id", "id"] {
            let (status, body) = post_redrive(&app, &json!({ field: bad })).await;
            let context = format!("POST /v1/admin/dlq/redrive {{{field:?}: {bad:?}}}");
            assert_eq!(status, 400, "{context}: {body}");
            let message = assert_error_body(&body, "validation_error", &context);
            assert!(message.starts_with(field), "{context}: {message}");
        }
    }
    crate::reliability::record(crate::reliability::Trial {
        scenario: "invalid ids in queries and bodies",
        tried: "the same ids as a DLQ filter and in redrive bodies",
        requests: 3 * bad_ids().len() as u64,
        accepted: 0,
        lost: 0,
        duplicated: 0,
        observed: "400 validation_error naming the field; never a 5xx".to_owned(),
    });
}

#[tokio::test]
async fn well_formed_ids_that_name_nothing_are_answered_as_absent_not_refused() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let max_length = "m".repeat(128);
    for id in ["no-such-id", max_length.as_str()] {
        for (path, _) in id_paths(id) {
            let (status, body) = app.get_json(&path).await;
            assert_eq!(status, 404, "GET {path}: {body}");
            assert_error_body(&body, "not_found", &format!("GET {path}"));
        }
        let (status, body) = app.get_json(&format!("/v1/admin/dlq?event_id={id}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dead_letters"], json!([]));
        for field in ["event_id", "id"] {
            let (status, body) = post_redrive(&app, &json!({ field: id })).await;
            assert_eq!(status, 200, "redrive {field} {id}: {body}");
            assert_eq!(body["redriven"], 0);
        }
    }
}

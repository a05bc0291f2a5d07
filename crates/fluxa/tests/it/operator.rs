//! Operator features (issue 9), black-box: the event listing with its filters and cursor
//! (contract section 2), filtered DLQ listing and redrive (section 4), the operator metrics
//! (section 7), erasure, idempotency records and retention (section 8), and the `fluxa` CLI
//! commands that drive them, on the backends directly or against a server.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{FixedOffset, SecondsFormat, Utc};
use fluxa_core::task::EventHeader;
use fluxa_core::{CorrelationId, EventId, EventMessageV1, EventType, FluxaTask, PayloadHash};
use fluxa_queue::{MessageAttributes, NewMessage};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::helpers::{event, fluxa_command, sha256_hex, TestApp, TestData, PATIENCE};
use crate::ingest::raw_payload;

const INGEST_TOKEN: &str = "op-ingest-secret-4b7e1d9a";
const READ_TOKEN: &str = "op-read-secret-8c2f5a0e";
const ADMIN_TOKEN: &str = "op-admin-secret-1e6d3b7c";

/// A query string's parameters, in order.
type QueryParams<'a> = Vec<(&'a str, &'a str)>;

/// An event with a chosen type and source.
fn typed_event(event_id: &str, event_type: &str, source: Option<&str>, payload: Value) -> Value {
    let mut body = json!({"event_id": event_id, "event_type": event_type, "payload": payload});
    if let Some(source) = source {
        body["source"] = json!(source);
    }
    body
}

/// POSTs an event and insists it was accepted; returns the ingest answer.
#[track_caller]
fn post_ok<'a>(app: &'a TestApp, body: &'a Value) -> impl std::future::Future<Output = Value> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let response = app.post_event(body).await;
        assert_eq!(response.status(), 202, "{caller}: posting {body}");
        response.json().await.unwrap()
    }
}

/// `path` with `params` as its query string, every value percent-encoded (the `+` of an
/// RFC 3339 offset would otherwise arrive as a space).
fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let url = reqwest::Url::parse_with_params(&format!("http://fluxa{path}"), params).unwrap();
    match url.query() {
        Some(query) if !query.is_empty() => format!("{}?{query}", url.path()),
        _ => url.path().to_owned(),
    }
}

/// The `event_id`s of listed items, in order.
fn event_ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// One page of `GET /v1/events` with `params`, which must be the last page.
async fn list_event_ids(app: &TestApp, params: &[(&str, &str)]) -> Vec<String> {
    let (code, page) = app.get_json(&with_query("/v1/events", params)).await;
    assert_eq!(code, 200, "params {params:?}: {page}");
    assert_eq!(page["next_cursor"], Value::Null, "params {params:?}");
    event_ids(page["events"].as_array().unwrap())
}

/// One page of `GET /v1/admin/dlq` with `params`, which must be the last page: the event ids
/// of its dead letters, sorted.
async fn dead_letter_event_ids(app: &TestApp, params: &[(&str, &str)]) -> Vec<String> {
    let (code, page) = app.get_json(&with_query("/v1/admin/dlq", params)).await;
    assert_eq!(code, 200, "params {params:?}: {page}");
    assert_eq!(page["next_cursor"], Value::Null, "params {params:?}");
    let mut ids = event_ids(page["dead_letters"].as_array().unwrap());
    ids.sort();
    ids
}

/// Asserts that GET `path` is a 400 `validation_error` whose message names `field`.
#[track_caller]
fn assert_refused<'a>(
    app: &'a TestApp,
    path: &'a str,
    field: &'a str,
) -> impl std::future::Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        let (code, body) = app.get_json(path).await;
        assert_eq!(code, 400, "{caller}: GET {path}: {body}");
        assert_eq!(
            body["error"]["code"], "validation_error",
            "{caller}: GET {path}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{caller}: GET {path}: the message should name {field}: {message}"
        );
    }
}

/// Enqueues `body` as a raw queue message for `event_id`, as a producer outside ingest (or
/// corruption in transit) would.
async fn enqueue(data: &TestData, event_id: &str, body: Vec<u8>) {
    data.producer()
        .await
        .send(vec![NewMessage {
            body,
            attributes: MessageAttributes {
                event_id: EventId::parse(event_id).ok(),
                correlation_id: CorrelationId::parse(&format!("{event_id}-corr")).ok(),
                ..MessageAttributes::default()
            },
        }])
        .await
        .unwrap();
}

/// A message no processor can parse: `invalid_message`, a permanent failure on its first
/// receive.
fn unparsable_message() -> Vec<u8> {
    br#"{"type":"event.v1","garbage":true}"#.to_vec()
}

/// A well-formed message whose inline payload does not match its hash: `hash_mismatch`, a
/// permanent failure.
fn hash_mismatch_message(event_id: &str) -> Vec<u8> {
    let claimed = br#"{"amount":100}"#;
    let header = EventHeader {
        event_id: EventId::parse(event_id).unwrap(),
        event_type: EventType::parse("t").unwrap(),
        source: None,
        occurred_at: None,
        correlation_id: CorrelationId::parse(&format!("{event_id}-corr")).unwrap(),
        received_at: Utc::now(),
        payload_sha256: PayloadHash::of(claimed),
        payload_size: claimed.len() as u64,
    };
    let altered = RawValue::from_string(r#"{"amount":999}"#.to_owned()).unwrap();
    FluxaTask::EventV1(EventMessageV1::inline(header, &altered)).encode()
}

/// What one `fluxa` CLI command did.
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl CliRun {
    #[track_caller]
    fn succeeded(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout, one JSON object per line.
    #[track_caller]
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
            })
            .collect()
    }

    /// The one JSON object on stdout.
    #[track_caller]
    fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "one object expected: {}", self.stdout);
        lines.remove(0)
    }
}

async fn run_cli(mut command: Command, stdin: Option<&[u8]>) -> CliRun {
    command
        // A developer's own settings must not redirect the command under test.
        .env_remove("FLUXA_SERVER")
        .env_remove("FLUXA_TOKEN")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn the fluxa CLI");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
        // Closing stdin is the end of the input.
        drop(pipe);
    }
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the fluxa CLI did not finish in time")
        .unwrap();
    CliRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `fluxa ARGS` on this test's backends directly (its data directory and database).
async fn local(data: &TestData, args: &[&str]) -> CliRun {
    local_with_stdin(data, args, None).await
}

async fn local_with_stdin(data: &TestData, args: &[&str], stdin: Option<&[u8]>) -> CliRun {
    let mut command = data.command();
    command.args(args).arg("--data-dir").arg(data.path());
    run_cli(command, stdin).await
}

/// `fluxa ARGS --server <app>`, with `--token` when given.
async fn remote(app: &TestApp, token: Option<&str>, args: &[&str]) -> CliRun {
    let mut command = fluxa_command();
    command.args(args).args(["--server", &app.url("")]);
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    run_cli(command, None).await
}

#[tokio::test]
async fn paging_a_filtered_listing_while_events_arrive_returns_every_existing_match_exactly_once() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let mut sent = BTreeMap::new();
    let mut existing = Vec::new();
    for n in 0..20 {
        let event_id = format!("pm-{n:02}");
        let payload = json!({"n": n, "text": format!("match {n}")});
        post_ok(
            &app,
            &typed_event(&event_id, "page.match", None, payload.clone()),
        )
        .await;
        sent.insert(event_id.clone(), payload);
        existing.push(event_id);
        if n % 2 == 0 {
            let other = typed_event(&format!("po-{n:02}"), "page.other", None, json!(n));
            post_ok(&app, &other).await;
        }
    }
    for event_id in &existing {
        app.wait_for_status(event_id, "processed").await;
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page_idx in 0.. {
        assert!(page_idx < 20, "paging never ended; seen {seen:?}");
        let mut params = vec![("event_type", "page.match"), ("limit", "7")];
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor.as_str()));
        }
        let (code, page) = app.get_json(&with_query("/v1/events", &params)).await;
        assert_eq!(code, 200, "{page}");
        let items = page["events"].as_array().unwrap();
        assert!(items.len() <= 7, "a page holds at most `limit` events");
        for item in items {
            assert_eq!(item["event_type"], "page.match", "{item}");
            assert!(
                item.get("payload").is_none(),
                "no payload without include=payload: {item}"
            );
        }
        seen.extend(event_ids(items));
        // The table grows between pages, with events that match and events that do not.
        if page_idx < 4 {
            let late_id = format!("pm-late-{page_idx}");
            let payload = json!({"late": page_idx});
            post_ok(
                &app,
                &typed_event(&late_id, "page.match", None, payload.clone()),
            )
            .await;
            sent.insert(late_id, payload);
            let other = typed_event(&format!("po-late-{page_idx}"), "page.other", None, json!(0));
            post_ok(&app, &other).await;
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was repeated: {seen:?}");
    // Oldest received_at first: what existed comes first, in the order it was received.
    assert!(
        seen.len() >= existing.len(),
        "events were skipped: {seen:?}"
    );
    assert_eq!(seen[..existing.len()], existing[..], "seen {seen:?}");

    let (code, page) = app
        .get_json(&with_query(
            "/v1/events",
            &[
                ("event_type", "page.match"),
                ("limit", "1000"),
                ("include", "payload"),
            ],
        ))
        .await;
    assert_eq!(code, 200, "{page}");
    let items = page["events"].as_array().unwrap();
    let listed: HashSet<String> = event_ids(items).into_iter().collect();
    assert!(existing.iter().all(|id| listed.contains(id)), "{listed:?}");
    for item in items {
        let event_id = item["event_id"].as_str().unwrap();
        assert_eq!(item["payload"], sent[event_id], "payload of {event_id}");
    }
}

#[tokio::test]
async fn listing_filters_combine_and_bad_limits_cursors_and_parameters_are_refused() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let mut received = BTreeMap::new();
    for (event_id, event_type, source) in [
        ("f-a", "f.t", Some("alpha")),
        ("f-b", "f.t", Some("beta")),
        ("f-c", "f.u", Some("alpha")),
        ("f-d", "f.u", None),
    ] {
        post_ok(&app, &typed_event(event_id, event_type, source, json!(1))).await;
        // One at a time, so received_at grows from a to d.
        app.wait_for_status(event_id, "processed").await;
        let (_, stored) = app.get_json(&format!("/v1/events/{event_id}")).await;
        received.insert(event_id, stored["received_at"].as_str().unwrap().to_owned());
    }
    let at = |event_id: &str| received[event_id].clone();
    // The same instant as f-b's received_at, written with another offset.
    let b_elsewhere = chrono::DateTime::parse_from_rfc3339(&at("f-b"))
        .unwrap()
        .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::AutoSi, false);
    let (since_b, until_b, until_d) = (at("f-b"), at("f-b"), at("f-d"));
    let (since_b, until_b, until_d) = (since_b.as_str(), until_b.as_str(), until_d.as_str());
    let b_elsewhere = b_elsewhere.as_str();
    // Each case: query parameters, and the events they list.
    let cases: Vec<(QueryParams, Vec<&str>)> = vec![
        (vec![], vec!["f-a", "f-b", "f-c", "f-d"]),
        (vec![("event_type", "f.t")], vec!["f-a", "f-b"]),
        (vec![("source", "alpha")], vec!["f-a", "f-c"]),
        (
            vec![("event_type", "f.u"), ("source", "alpha")],
            vec!["f-c"],
        ),
        (vec![("since", since_b)], vec!["f-b", "f-c", "f-d"]),
        (vec![("since", b_elsewhere)], vec!["f-b", "f-c", "f-d"]),
        (vec![("until", until_b)], vec!["f-a"]),
        (
            vec![("since", since_b), ("until", until_d)],
            vec!["f-b", "f-c"],
        ),
        (vec![("source", "alpha"), ("since", since_b)], vec!["f-c"]),
        (
            vec![
                ("event_type", "f.t"),
                ("until", until_d),
                ("since", since_b),
            ],
            vec!["f-b"],
        ),
        (
            vec![
                ("event_type", "f.t"),
                ("source", "alpha"),
                ("since", since_b),
            ],
            vec![],
        ),
    ];
    for (params, expected) in cases {
        assert_eq!(
            list_event_ids(&app, &params).await,
            expected,
            "params {params:?}"
        );
    }

    // A cursor pages on only under the filters it was made with.
    let (code, first) = app.get_json("/v1/events?event_type=f.t&limit=1").await;
    assert_eq!(code, 200);
    assert_eq!(event_ids(first["events"].as_array().unwrap()), ["f-a"]);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (code, second) = app
        .get_json(&with_query(
            "/v1/events",
            &[
                ("event_type", "f.t"),
                ("limit", "1"),
                ("cursor", cursor.as_str()),
            ],
        ))
        .await;
    assert_eq!(code, 200);
    assert_eq!(event_ids(second["events"].as_array().unwrap()), ["f-b"]);
    for path in [
        with_query(
            "/v1/events",
            &[("event_type", "f.u"), ("cursor", cursor.as_str())],
        ),
        with_query("/v1/events", &[("cursor", cursor.as_str())]),
        with_query("/v1/events", &[("cursor", "not-a-cursor")]),
        with_query("/v1/events", &[("cursor", "eyJ2IjoxfQ")]),
        // A cursor of another listing.
        with_query("/v1/admin/dlq", &[("cursor", cursor.as_str())]),
    ] {
        assert_refused(&app, &path, "cursor").await;
    }
    assert_refused(&app, "/v1/events?limit=0", "limit").await;
    assert_refused(&app, "/v1/events?limit=1001", "limit").await;
    assert_refused(&app, "/v1/events?since=yesterday", "since").await;
    assert_refused(&app, "/v1/events?colour=red", "colour").await;
    assert_eq!(list_event_ids(&app, &[("limit", "1000")]).await.len(), 4);
}

#[tokio::test]
async fn dead_letters_filter_and_page_and_a_filtered_redrive_dry_runs_then_processes_its_matches() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    // A conflict: a permanent dead letter that the redrive's filter must leave alone.
    post_ok(&app, &event("dq-conf", json!({"v": 1}))).await;
    app.wait_for_status("dq-conf", "processed").await;
    post_ok(&app, &event("dq-conf", json!({"v": 2}))).await;
    app.wait_for_dead_letter("dq-conf").await;
    // The store refuses writes: three events exhaust their retries.
    data.store_sql("ALTER TABLE events RENAME TO events_away")
        .await;
    let retried = ["dq-re-1", "dq-re-2", "dq-re-3"];
    for event_id in retried {
        post_ok(
            &app,
            &typed_event(event_id, "dlq.retry", None, json!({"id": event_id})),
        )
        .await;
    }
    for event_id in retried {
        let entry = app.wait_for_dead_letter(event_id).await;
        assert_eq!(entry["error_class"], "retries_exhausted");
    }
    data.store_sql("ALTER TABLE events_away RENAME TO events")
        .await;

    let exhausted = [("error_class", "retries_exhausted")];
    assert_eq!(dead_letter_event_ids(&app, &exhausted).await, retried);
    assert_eq!(
        dead_letter_event_ids(&app, &[("event_type", "dlq.retry")]).await,
        retried
    );
    assert_eq!(
        dead_letter_event_ids(&app, &[("error_code", "event_id_conflict")]).await,
        ["dq-conf"]
    );
    assert_eq!(
        dead_letter_event_ids(&app, &[("error_class", "permanent")]).await,
        ["dq-conf"]
    );
    assert!(dead_letter_event_ids(
        &app,
        &[
            ("error_code", "retries_exhausted"),
            ("event_type", "order.created")
        ]
    )
    .await
    .is_empty());

    // Two per page: every match once, in two pages.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut n_pages = 0;
    loop {
        n_pages += 1;
        assert!(n_pages <= 3, "paging never ended: {paged:?}");
        let mut params = vec![("error_class", "retries_exhausted"), ("limit", "2")];
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor.as_str()));
        }
        let (code, page) = app.get_json(&with_query("/v1/admin/dlq", &params)).await;
        assert_eq!(code, 200, "{page}");
        let entries = page["dead_letters"].as_array().unwrap();
        assert!(entries.len() <= 2);
        assert!(entries
            .iter()
            .all(|entry| entry["error_class"] == "retries_exhausted"));
        paged.extend(event_ids(entries));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    paged.sort();
    assert_eq!(paged, retried);
    assert!(n_pages >= 2, "three entries do not fit one page of two");

    let filter = json!({"error_class": "retries_exhausted"});
    let (code, answer) = app
        .post_json(
            "/v1/admin/dlq/redrive",
            &json!({"filter": filter, "dry_run": true}),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"matched": 3, "redriven": 0, "dry_run": true})
    );
    // A dry run changes nothing.
    assert_eq!(dead_letter_event_ids(&app, &exhausted).await, retried);
    let (_, all) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(all["total"], 4, "{all}");
    for event_id in retried {
        let (_, status) = app.get_json(&format!("/v1/events/{event_id}/status")).await;
        assert_eq!(status["status"], "failed", "{status}");
    }

    let (code, answer) = app
        .post_json("/v1/admin/dlq/redrive", &json!({"filter": filter}))
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"matched": 3, "redriven": 3, "dry_run": false})
    );
    for event_id in retried {
        app.wait_for_status(event_id, "processed").await;
        assert_eq!(data.count_event_rows(event_id).await, 1);
    }
    assert!(dead_letter_event_ids(&app, &exhausted).await.is_empty());
    assert_eq!(dead_letter_event_ids(&app, &[]).await, ["dq-conf"]);
    let (_, all) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(all["total"], 1, "{all}");
}

#[tokio::test]
async fn an_erased_event_is_gone_with_its_dead_letters_and_blobs_and_a_late_redelivery_never_restores_it(
) {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let small = event("er-small", json!({"name": "Ada"}));
    let big = |fill: &str| {
        format!(
            r#"{{"event_id":"er-big","event_type":"t","payload":"{}"}}"#,
            fill.repeat(300_000)
        )
    };
    post_ok(&app, &small).await;
    let response = app
        .post_raw("/v1/events", big("a"), Some("application/json"))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.unwrap()["payload_mode"],
        "S3"
    );
    app.wait_for_status("er-small", "processed").await;
    app.wait_for_status("er-big", "processed").await;
    // A conflicting copy of each leaves a dead letter; the big one's keeps its blob.
    post_ok(&app, &event("er-small", json!({"name": "Bob"}))).await;
    let response = app
        .post_raw("/v1/events", big("b"), Some("application/json"))
        .await;
    assert_eq!(response.status(), 202);
    app.wait_for_dead_letter("er-small").await;
    app.wait_for_dead_letter("er-big").await;
    let blobs_of_big = || async {
        data.blob_keys()
            .await
            .into_iter()
            .filter(|key| key.contains("/er-big/"))
            .count()
    };
    assert!(
        blobs_of_big().await >= 1,
        "the dead-lettered message's blob is kept until the erasure: {:?}",
        data.blob_keys().await
    );

    for event_id in ["er-small", "er-big"] {
        let response = app.delete(&format!("/v1/admin/events/{event_id}")).await;
        assert_eq!(response.status(), 204, "erasing {event_id}");
        assert_eq!(
            app.get(&format!("/v1/events/{event_id}")).await.status(),
            404
        );
        let (code, status) = app.get_json(&format!("/v1/events/{event_id}/status")).await;
        assert_eq!(code, 200, "{status}");
        assert_eq!(status["status"], "erased", "{status}");
        let (code, record) = app
            .get_json(&format!("/v1/admin/idempotency/{event_id}"))
            .await;
        assert_eq!(code, 200, "{record}");
        assert_eq!(record["status"], "erased", "{record}");
        assert_eq!(record["payload_sha256"], Value::Null, "{record}");
        assert!(dead_letter_event_ids(&app, &[("event_id", event_id)])
            .await
            .is_empty());
        assert_eq!(data.count_event_rows(event_id).await, 0);
    }
    assert_eq!(
        blobs_of_big().await,
        0,
        "blobs left: {:?}",
        data.blob_keys().await
    );
    let (_, all) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(all["total"], 0, "{all}");
    // Erasing again finds the tombstone: still 204, still nothing.
    assert_eq!(app.delete("/v1/admin/events/er-small").await.status(), 204);

    // A late redelivery of the erased event is handled and dropped.
    let redeliveries = "fluxa_events_erased_redelivery_total";
    let before = app.metric(redeliveries).await;
    post_ok(&app, &small).await;
    app.wait_for_metric(redeliveries, before + 1.0).await;
    assert_eq!(app.get("/v1/events/er-small").await.status(), 404);
    let (_, status) = app.get_json("/v1/events/er-small/status").await;
    assert_eq!(status["status"], "erased", "{status}");
    assert_eq!(data.count_event_rows("er-small").await, 0);
    assert!(dead_letter_event_ids(&app, &[("event_id", "er-small")])
        .await
        .is_empty());

    let response = app.delete("/v1/admin/events/never-was").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn an_idempotency_record_can_be_read_and_only_a_failed_one_evicted() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let ack = post_ok(&app, &event("idem-ok", json!({"k": 1}))).await;
    app.wait_for_status("idem-ok", "processed").await;
    let (code, record) = app.get_json("/v1/admin/idempotency/idem-ok").await;
    assert_eq!(code, 200, "{record}");
    for key in [
        "event_id",
        "status",
        "attempts",
        "payload_sha256",
        "lease_expires_at",
        "last_error",
        "correlation_id",
        "created_at",
        "updated_at",
    ] {
        assert!(record.get(key).is_some(), "{key} missing from {record}");
    }
    assert_eq!(record["event_id"], "idem-ok");
    assert_eq!(record["status"], "processed");
    assert_eq!(record["attempts"], 1);
    assert_eq!(record["payload_sha256"], sha256_hex(br#"{"k":1}"#).as_str());
    assert_eq!(record["last_error"], Value::Null);
    assert_eq!(record["correlation_id"], ack["correlation_id"]);
    for key in ["created_at", "updated_at"] {
        assert!(record[key].as_str().unwrap().ends_with('Z'), "{record}");
    }

    // Evicting a processed record would let the event be stored twice.
    let response = app.delete("/v1/admin/idempotency/idem-ok").await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    app.wait_for_status("idem-ok", "processed").await;

    enqueue(&data, "idem-bad", hash_mismatch_message("idem-bad")).await;
    app.wait_for_status("idem-bad", "failed").await;
    let (code, record) = app.get_json("/v1/admin/idempotency/idem-bad").await;
    assert_eq!(code, 200, "{record}");
    assert_eq!(record["status"], "failed");
    assert_eq!(record["last_error"]["code"], "hash_mismatch");
    assert_eq!(
        app.delete("/v1/admin/idempotency/idem-bad").await.status(),
        204
    );
    assert_eq!(
        app.get("/v1/admin/idempotency/idem-bad").await.status(),
        404
    );
    assert_eq!(app.get("/v1/events/idem-bad/status").await.status(), 404);
    assert_eq!(
        app.delete("/v1/admin/idempotency/idem-bad").await.status(),
        404
    );
    assert_eq!(
        app.get("/v1/admin/idempotency/never-seen").await.status(),
        404
    );
}

#[tokio::test]
async fn retention_prunes_old_events_records_and_dead_letters_and_frees_the_id_while_off_keeps_them(
) {
    let kept_data = TestData::new().await;
    let kept = kept_data.spawn(&[]).await;
    let pruned_data = TestData::new().await;
    let pruned = pruned_data
        .spawn(&[
            "--retention-events",
            "1s",
            "--retention-idempotency",
            "1s",
            "--retention-dead-letters",
            "1s",
            "--prune-interval",
            "200ms",
        ])
        .await;
    // The same history on both servers, the retention-off one's first, so it is the older.
    for (data, app) in [(&kept_data, &kept), (&pruned_data, &pruned)] {
        post_ok(app, &event("ret-1", json!({"v": 1}))).await;
        enqueue(data, "ret-dl", unparsable_message()).await;
        app.wait_for_status("ret-1", "processed").await;
        app.wait_for_dead_letter("ret-dl").await;
    }

    let deadline = Instant::now() + PATIENCE;
    loop {
        let event_gone = pruned.get("/v1/events/ret-1").await.status() == 404;
        let record_gone = pruned.get("/v1/admin/idempotency/ret-1").await.status() == 404;
        let failed_record_gone = pruned.get("/v1/admin/idempotency/ret-dl").await.status() == 404;
        let dead_letter_gone = dead_letter_event_ids(&pruned, &[("event_id", "ret-dl")])
            .await
            .is_empty();
        if event_gone && record_gone && failed_record_gone && dead_letter_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not pruned: event gone {event_gone}, its record gone {record_gone}, the failed \
             record gone {failed_record_gone}, the dead letter gone {dead_letter_gone}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (table, at_least) in [
        ("events", 1.0),
        ("dead_letters", 1.0),
        ("idempotency_records", 2.0),
    ] {
        let name = format!("fluxa_pruned_rows_total{{table=\"{table}\"}}");
        assert!(
            pruned.metric(&name).await >= at_least,
            "{name} should be at least {at_least}"
        );
    }
    // Past the deduplication window the id is free: a new payload is stored, not a conflict.
    post_ok(&pruned, &event("ret-1", json!({"v": 2}))).await;
    pruned.wait_for_status("ret-1", "processed").await;
    let (code, stored) = pruned.get_json("/v1/events/ret-1").await;
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["payload"], json!({"v": 2}));

    // Retention is off by default: the older history is all still there.
    let (code, stored) = kept.get_json("/v1/events/ret-1").await;
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["payload"], json!({"v": 1}));
    let (code, record) = kept.get_json("/v1/admin/idempotency/ret-1").await;
    assert_eq!((code, &record["status"]), (200, &json!("processed")));
    assert_eq!(kept.get("/v1/admin/idempotency/ret-dl").await.status(), 200);
    assert_eq!(
        dead_letter_event_ids(&kept, &[("event_id", "ret-dl")]).await,
        ["ret-dl"]
    );
    assert_eq!(
        kept.metric("fluxa_pruned_rows_total{table=\"events\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_events_commands_list_get_check_and_erase_with_script_friendly_exit_codes() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let ids = ["cli-ev-1", "cli-ev-2", "cli-ev-3", "cli-ev-4", "cli-ev-5"];
    for (n, event_id) in ids.iter().enumerate() {
        let body = typed_event(event_id, "cli.listed", Some("cli"), json!({"n": n}));
        post_ok(&app, &body).await;
        app.wait_for_status(event_id, "processed").await;
    }
    post_ok(&app, &typed_event("cli-other", "cli.other", None, json!(0))).await;
    app.wait_for_status("cli-other", "processed").await;

    // --all pages through every match (two per request here), one JSON object per line.
    let run = local(
        &data,
        &[
            "events",
            "list",
            "--event-type",
            "cli.listed",
            "--all",
            "--limit",
            "2",
            "--json",
        ],
    )
    .await;
    let listed = run.succeeded().json_lines();
    assert_eq!(event_ids(&listed), ids);
    assert!(listed.iter().all(|item| item.get("payload").is_none()));

    // One page at a time: JSON by default off a terminal, the next cursor on stderr.
    let run = local(
        &data,
        &[
            "events",
            "list",
            "--event-type",
            "cli.listed",
            "--limit",
            "2",
        ],
    )
    .await;
    assert_eq!(event_ids(&run.succeeded().json_lines()), ids[..2]);
    let cursor = run
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("more: --cursor "))
        .unwrap_or_else(|| panic!("no cursor on stderr: {}", run.stderr))
        .trim()
        .to_owned();
    let run = local(
        &data,
        &[
            "events",
            "list",
            "--event-type",
            "cli.listed",
            "--limit",
            "2",
            "--cursor",
            &cursor,
        ],
    )
    .await;
    assert_eq!(event_ids(&run.succeeded().json_lines()), ids[2..4]);

    // --table: a header row above the rows, not JSON.
    let run = local(
        &data,
        &["events", "list", "--event-type", "cli.listed", "--table"],
    )
    .await;
    run.succeeded();
    let lines: Vec<&str> = run.stdout.lines().collect();
    let header = lines
        .iter()
        .position(|line| line.contains("event_id") && line.contains("event_type"))
        .unwrap_or_else(|| panic!("no header row: {}", run.stdout));
    let first_row = lines
        .iter()
        .position(|line| line.contains("cli-ev-1"))
        .unwrap_or_else(|| panic!("no row: {}", run.stdout));
    assert!(header < first_row, "{}", run.stdout);
    assert!(!run.stdout.contains("cli-other"), "{}", run.stdout);
    assert!(serde_json::from_str::<Value>(lines[0]).is_err());

    let shown = local(&data, &["events", "get", "cli-ev-1"]).await;
    let shown = shown.succeeded().json();
    assert_eq!(shown["event_id"], "cli-ev-1");
    assert_eq!(shown["payload"], json!({"n": 0}));
    let status = local(&data, &["events", "status", "cli-ev-1"]).await;
    assert_eq!(status.succeeded().json()["status"], "processed");

    let erased = local(&data, &["events", "erase", "cli-ev-1"]).await;
    assert_eq!(
        erased.succeeded().json(),
        json!({"event_id": "cli-ev-1", "erased": true})
    );
    assert_eq!(app.get("/v1/events/cli-ev-1").await.status(), 404);
    let status = local(&data, &["events", "status", "cli-ev-1"]).await;
    assert_eq!(status.succeeded().json()["status"], "erased");

    // Exit codes a script can act on.
    let missing = local(&data, &["events", "get", "no-such-event"]).await;
    assert_eq!(missing.code, 3, "stderr: {}", missing.stderr);
    let missing = local(&data, &["events", "erase", "no-such-event"]).await;
    assert_eq!(missing.code, 3, "stderr: {}", missing.stderr);
    let bad = local(&data, &["events", "list", "--since", "yesterday"]).await;
    assert_eq!(bad.code, 2, "stderr: {}", bad.stderr);
    assert!(bad.stderr.contains("since"), "stderr: {}", bad.stderr);
    assert!(bad.stdout.is_empty(), "stdout: {}", bad.stdout);
}

#[tokio::test]
async fn the_dlq_and_idempotency_commands_filter_show_redrive_and_evict() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    post_ok(&app, &event("cli-conf", json!({"v": 1}))).await;
    app.wait_for_status("cli-conf", "processed").await;
    post_ok(&app, &event("cli-conf", json!({"v": 2}))).await;
    let conflict = app.wait_for_dead_letter("cli-conf").await;
    enqueue(&data, "cli-bad", unparsable_message()).await;
    app.wait_for_status("cli-bad", "failed").await;
    data.store_sql("ALTER TABLE events RENAME TO events_away")
        .await;
    post_ok(&app, &typed_event("cli-retry", "cli.retry", None, json!(1))).await;
    app.wait_for_dead_letter("cli-retry").await;
    data.store_sql("ALTER TABLE events_away RENAME TO events")
        .await;

    let listed = local(&data, &["dlq", "list", "--error-code", "event_id_conflict"]).await;
    assert_eq!(event_ids(&listed.succeeded().json_lines()), ["cli-conf"]);
    let listed = local(&data, &["dlq", "list", "--event-type", "cli.retry"]).await;
    assert_eq!(event_ids(&listed.succeeded().json_lines()), ["cli-retry"]);
    let listed = local(&data, &["dlq", "list", "--error-class", "permanent"]).await;
    let mut permanent = event_ids(&listed.succeeded().json_lines());
    permanent.sort();
    assert_eq!(permanent, ["cli-bad", "cli-conf"]);

    let conflict_id = conflict["id"].as_str().unwrap();
    let shown = local(&data, &["dlq", "show", conflict_id]).await;
    let shown = shown.succeeded().json();
    assert_eq!(shown["id"], conflict_id);
    assert_eq!(shown["error"]["code"], "event_id_conflict");

    let dry = local(&data, &["dlq", "redrive", "--id", conflict_id, "--dry-run"]).await;
    assert_eq!(
        dry.succeeded().json(),
        json!({"matched": 1, "redriven": 0, "dry_run": true})
    );
    let dry = local(
        &data,
        &[
            "dlq",
            "redrive",
            "--dry-run",
            "--error-class",
            "retries_exhausted",
        ],
    )
    .await;
    assert_eq!(
        dry.succeeded().json(),
        json!({"matched": 1, "redriven": 0, "dry_run": true})
    );
    let dry = local(&data, &["dlq", "redrive", "--all", "--dry-run"]).await;
    assert_eq!(
        dry.succeeded().json(),
        json!({"matched": 3, "redriven": 0, "dry_run": true})
    );
    let listed = local(&data, &["dlq", "list"]).await;
    assert_eq!(
        listed.succeeded().json_lines().len(),
        3,
        "a dry run moves nothing"
    );
    let (_, status) = app.get_json("/v1/events/cli-retry/status").await;
    assert_eq!(status["status"], "failed", "{status}");

    let redriven = local(
        &data,
        &["dlq", "redrive", "--error-class", "retries_exhausted"],
    )
    .await;
    assert_eq!(
        redriven.succeeded().json(),
        json!({"matched": 1, "redriven": 1, "dry_run": false})
    );
    app.wait_for_status("cli-retry", "processed").await;
    let listed = local(&data, &["dlq", "list"]).await;
    let mut left = event_ids(&listed.succeeded().json_lines());
    left.sort();
    assert_eq!(left, ["cli-bad", "cli-conf"]);

    let record = local(&data, &["idempotency", "show", "cli-conf"]).await;
    let record = record.succeeded().json();
    assert_eq!(record["status"], "processed");
    assert_eq!(record["payload_sha256"], sha256_hex(br#"{"v":1}"#).as_str());
    let refused = local(&data, &["idempotency", "evict", "cli-conf"]).await;
    assert_eq!(refused.code, 4, "stderr: {}", refused.stderr);
    let evicted = local(&data, &["idempotency", "evict", "cli-bad"]).await;
    assert_eq!(
        evicted.succeeded().json(),
        json!({"event_id": "cli-bad", "evicted": true})
    );
    let gone = local(&data, &["idempotency", "show", "cli-bad"]).await;
    assert_eq!(gone.code, 3, "stderr: {}", gone.stderr);
}

#[tokio::test]
async fn the_cli_works_against_a_server_with_its_token_and_exits_6_without_a_valid_one() {
    let data = TestData::new().await;
    let tokens = format!("ingest={INGEST_TOKEN},read={READ_TOKEN},admin={ADMIN_TOKEN}");
    let app = data.spawn(&["--api-tokens", &tokens]).await;
    let response = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(INGEST_TOKEN)
        .json(&event("srv-1", json!({"via": "server"})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let response = app
            .client
            .get(app.url("/v1/events/srv-1/status"))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if body["status"] == "processed" {
            break;
        }
        assert!(Instant::now() < deadline, "srv-1 never processed: {body}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let listed = remote(&app, Some(READ_TOKEN), &["events", "list", "--json"]).await;
    assert_eq!(event_ids(&listed.succeeded().json_lines()), ["srv-1"]);
    let shown = remote(&app, Some(READ_TOKEN), &["events", "get", "srv-1"]).await;
    assert_eq!(
        shown.succeeded().json()["payload"],
        json!({"via": "server"})
    );
    let record = remote(&app, Some(ADMIN_TOKEN), &["idempotency", "show", "srv-1"]).await;
    assert_eq!(record.succeeded().json()["status"], "processed");
    let missing = remote(&app, Some(READ_TOKEN), &["events", "get", "nope"]).await;
    assert_eq!(missing.code, 3, "stderr: {}", missing.stderr);

    for (token, args) in [
        (Some("op-wrong-secret-0a9b8c7d"), ["events", "get", "srv-1"]),
        (None, ["events", "get", "srv-1"]),
        // A valid token of the wrong scope: 403, the same exit code.
        (Some(READ_TOKEN), ["dlq", "list", "--json"]),
    ] {
        let refused = remote(&app, token, &args).await;
        assert_eq!(
            refused.code, 6,
            "token {token:?}, {args:?}: stderr {}",
            refused.stderr
        );
        assert!(refused.stdout.is_empty(), "stdout: {}", refused.stdout);
    }
}

#[tokio::test]
async fn importing_ndjson_names_every_rejected_line_and_a_rerun_stores_nothing_twice() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("events.ndjson");
    let imp_1_payload = r#"{"a": 1,  "b": [1, 2]}"#;
    let lines = [
        format!(r#"{{"event_id":"imp-1","event_type":"import.t","payload":{imp_1_payload}}}"#),
        r#"{"event_id":"imp-2","event_type":"import.t","source":"file","payload":"two"}"#.into(),
        r#"{"event_id":"imp-broken","#.into(),
        r#"{"event_id":"imp-untyped","payload":1}"#.into(),
        String::new(),
        r#"{"event_id":"imp-3","event_type":"import.t","payload":[3]}"#.into(),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let file = file.to_str().unwrap();
    let imported = ["imp-1", "imp-2", "imp-3"];

    for round in 0..2 {
        let run = remote(&app, None, &["import", file, "--json"]).await;
        assert_eq!(run.code, 5, "round {round}: stderr {}", run.stderr);
        let out = run.json_lines();
        let (summary, rejected) = out.split_last().unwrap();
        let rejected_lines: Vec<u64> = rejected
            .iter()
            .map(|row| row["line"].as_u64().unwrap())
            .collect();
        assert_eq!(rejected_lines, [3, 4], "round {round}: {}", run.stdout);
        assert_eq!(rejected[0]["code"], "invalid_json");
        assert_eq!(rejected[1]["code"], "validation_error");
        assert!(
            rejected[1]["message"]
                .as_str()
                .unwrap()
                .contains("event_type"),
            "{}",
            rejected[1]
        );
        assert_eq!(summary["summary"]["accepted"], 3, "{summary}");
        assert_eq!(summary["summary"]["rejected"], 2, "{summary}");
        if round == 0 {
            for event_id in imported {
                app.wait_for_status(event_id, "processed").await;
            }
        }
    }
    // The rerun's three events are duplicates, which the processor drops.
    app.wait_for_metric("fluxa_events_duplicate_total", 3.0)
        .await;
    for event_id in imported {
        assert_eq!(data.count_event_rows(event_id).await, 1, "{event_id}");
    }
    let text = app.get("/v1/events/imp-1").await.text().await.unwrap();
    assert_eq!(
        raw_payload(&text),
        imp_1_payload,
        "payload bytes as written"
    );
    let (_, all) = app.get_json("/v1/admin/dlq").await;
    assert_eq!(all["total"], 0, "{all}");

    // From stdin, on the backends directly.
    let stdin = concat!(
        r#"{"event_id":"imp-4","event_type":"import.t","payload":4}"#,
        "\n",
        r#"{"event_id":"imp-5","event_type":"import.t","payload":5}"#,
        "\n",
    );
    let run = local_with_stdin(&data, &["import", "-", "--json"], Some(stdin.as_bytes())).await;
    let summary = run.succeeded().json();
    assert_eq!(summary["summary"]["accepted"], 2, "{summary}");
    assert_eq!(summary["summary"]["rejected"], 0, "{summary}");
    for event_id in ["imp-4", "imp-5"] {
        app.wait_for_status(event_id, "processed").await;
    }
}

#[tokio::test]
async fn metrics_show_the_dlq_depth_by_error_code_and_the_age_of_the_oldest_queued_message() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    post_ok(&app, &event("met-conf", json!({"v": 1}))).await;
    app.wait_for_status("met-conf", "processed").await;
    post_ok(&app, &event("met-conf", json!({"v": 2}))).await;
    app.wait_for_dead_letter("met-conf").await;
    let conflicts = r#"fluxa_dlq_depth_by_code{error_code="event_id_conflict"}"#;
    assert_eq!(app.wait_for_metric(conflicts, 1.0).await, 1.0);
    let text = app.get("/metrics").await.text().await.unwrap();
    // Every known code has its series, so a code whose dead letters are gone reads 0.
    assert!(
        text.lines()
            .any(|line| line == r#"fluxa_dlq_depth_by_code{error_code="hash_mismatch"} 0"#),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("fluxa_queue_oldest_message_age_seconds ")),
        "{text}"
    );

    // With no worker, a message waits in the queue and its age grows. (SQS tells the age of
    // its oldest message to CloudWatch only.)
    if data.queue_url().is_some() {
        return;
    }
    let api_data = TestData::new().await;
    let api = api_data.spawn(&["--role", "api"]).await;
    post_ok(&api, &event("met-wait", json!(1))).await;
    let age = api
        .wait_for_metric("fluxa_queue_oldest_message_age_seconds", 0.3)
        .await;
    assert!(age < 60.0, "the only message is seconds old, not {age} s");
}

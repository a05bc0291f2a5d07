//! Operations (contract section 7) and process lifecycle: health, readiness, metrics, graceful
//! shutdown, migrations.

use serde_json::{json, Value};

use crate::helpers::{event, fluxa_command, TestData};

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let data = TestData::new().await;
    let app = data.spawn(&[]).await;
    let (code, health) = app.get_json("/healthz").await;
    assert_eq!((code, health), (200, json!({"status": "ok"})));
    let (code, ready) = app.get_json("/readyz").await;
    assert_eq!(code, 200);
    assert_eq!(
        ready["checks"],
        json!({"store": "ok", "queue": "ok", "blob_store": "ok"})
    );

    app.post_event(&event("m-1", json!(1))).await;
    app.wait_for_status("m-1", "processed").await;
    let response = app.get("/metrics").await;
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for name in [
        "fluxa_events_ingested_total",
        "fluxa_events_processed_total",
        "fluxa_queue_depth",
        "fluxa_dlq_depth",
        "fluxa_process_duration_seconds_bucket",
        "fluxa_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

/// The metric series (sample lines) `/metrics` exposes now.
async fn series(app: &crate::helpers::TestApp) -> Vec<String> {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(key, _)| key.to_owned()))
        .collect()
}

#[tokio::test]
async fn invented_methods_and_paths_add_no_series_to_metrics() {
    let data = TestData::new().await;
    let app = data.spawn(&["--role", "api"]).await;
    let invent = |i: usize| {
        let method = reqwest::Method::from_bytes(format!("X{i}FOO").as_bytes()).unwrap();
        (method, app.url(&format!("/v1/invented/{i}?q={i}")))
    };
    // One of each kind first: the fixed series they map to may appear once.
    let (method, url) = invent(0);
    app.client.request(method, &url).send().await.unwrap();
    app.client.get(&url).send().await.unwrap();
    app.get("/v1/events/known-route-unknown-id").await;
    series(&app).await;
    let before = series(&app).await;
    for i in 1..=100 {
        let (method, url) = invent(i);
        let response = app.client.request(method, &url).send().await.unwrap();
        assert!(response.status().is_client_error());
        app.client.get(&url).send().await.unwrap();
        app.get(&format!("/v1/events/unknown-{i}")).await;
    }
    let after = series(&app).await;
    let added: Vec<&String> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(added.is_empty(), "new series: {added:?}");
    let labelled: Vec<&String> = after
        .iter()
        .filter(|s| s.starts_with("fluxa_http_requests_total"))
        .collect();
    assert!(
        labelled
            .iter()
            .any(|s| s.contains(r#"method="other""#) && s.contains(r#"route="unmatched""#)),
        "{labelled:?}"
    );
    assert!(
        labelled
            .iter()
            .any(|s| s.contains(r#"route="/v1/events/{event_id}""#)),
        "{labelled:?}"
    );
    crate::reliability::record(crate::reliability::Trial {
        scenario: "invented methods and paths",
        tried: "100 invented methods, 100 unknown paths and 100 unknown ids",
        requests: 300,
        accepted: 0,
        lost: 0,
        duplicated: 0,
        observed: format!("0 new series ({} before and after)", before.len()),
    });
}

#[tokio::test]
async fn sigterm_stops_the_server_with_exit_code_0_and_loses_no_accepted_event() {
    let data = TestData::new().await;
    let app = data.spawn(&["--workers", "2"]).await;
    let events: Vec<Value> = (0..200)
        .map(|i| event(&format!("grace-{i}"), json!({"i": i})))
        .collect();
    let response = app
        .client
        .post(app.url("/v1/events/batch"))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let exited = app.terminate().await;
    assert_eq!(exited.code, 0, "stderr: {:?}", exited.stderr);

    // Whatever was not processed before the stop is still queued and is processed after it.
    let app = data.spawn(&[]).await;
    for i in 0..200 {
        app.wait_for_status(&format!("grace-{i}"), "processed")
            .await;
        assert_eq!(data.count_event_rows(&format!("grace-{i}")).await, 1);
    }
    crate::reliability::record(crate::reliability::Trial {
        scenario: "SIGTERM with a backlog",
        tried: "a batch of 200 events, then SIGTERM at once, then a restart",
        requests: 1,
        accepted: 200,
        lost: 0,
        duplicated: 0,
        observed: "exit 0; every event processed once after the restart".to_owned(),
    });
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let data = TestData::new().await;
    let data_dir = data.path().to_str().unwrap().to_owned();
    for _ in 0..2 {
        let output = data
            .command()
            .args(["migrate", "--data-dir", &data_dir])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(data.count_event_rows("x").await, 0);
    assert_eq!(
        data.count("SELECT COUNT(*) FROM idempotency_keys", None)
            .await,
        0
    );
}

#[tokio::test]
async fn invalid_options_are_refused_with_a_message_and_a_nonzero_exit() {
    for args in [
        vec!["serve", "--workers", "many"],
        vec!["serve", "--visibility-timeout", "soon"],
        vec!["serve", "--bind", "not-an-address"],
        vec!["serve", "--max-receives", "0", "--bind", "127.0.0.1:0"],
        vec![
            "serve",
            "--api-tokens",
            "read=short",
            "--bind",
            "127.0.0.1:0",
        ],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = fluxa_command()
            .args(&args)
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "args {args:?} must fail");
        assert!(!output.stderr.is_empty(), "args {args:?} must explain why");
    }
}

#[tokio::test]
async fn orphaned_payload_blobs_are_swept_but_a_dead_lettered_messages_blob_is_kept() {
    let data = TestData::new().await;
    if data.queue_url().is_some() {
        // SQS cannot say whether a waiting message points at a blob: with it the sweeper
        // deletes nothing and the bucket's lifecycle rule collects orphans (docs/DEPLOY-AWS.md).
        eprintln!("skipped: no blob sweeping with an SQS queue");
        return;
    }
    let app = data
        .spawn(&["--blob-sweep-interval", "200ms", "--blob-grace", "1s"])
        .await;
    let big = |fill: &str| format!("\"{}\"", fill.repeat(300_000));
    // A conflict leaves its message, and so its blob, in the DLQ.
    for fill in ["a", "b"] {
        let body = format!(
            r#"{{"event_id":"swept-conf","event_type":"t","payload":{}}}"#,
            big(fill)
        );
        let response = app
            .post_raw("/v1/events", body, Some("application/json"))
            .await;
        assert_eq!(response.status(), 202);
        if fill == "a" {
            app.wait_for_status("swept-conf", "processed").await;
        }
    }
    app.wait_for_dead_letter("swept-conf").await;
    let kept = data.blob_keys().await;
    assert_eq!(
        kept.len(),
        1,
        "only the dead-lettered message's blob remains"
    );

    // An ingest that died after writing its blob (in the key layout before hashed prefixes,
    // which the sweeper still serves). It is swept once older than the 1 s grace; the kept
    // blob, written earlier, is older still. (No backdating: S3 cannot.)
    let orphan = data
        .write_blob("events/orphan/0000.json", b"\"lost\"".to_vec())
        .await;
    assert!(data.blob_exists(&orphan).await);

    let deadline = std::time::Instant::now() + crate::helpers::PATIENCE;
    while data.blob_exists(&orphan).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphaned blob was never swept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        data.blob_exists(&kept[0]).await,
        "a blob a dead letter points at must survive the sweep"
    );
}

#[tokio::test]
async fn a_config_file_sets_options_and_flags_override_it() {
    let data = TestData::new().await;
    let file = data.path().join("fluxa.toml");
    std::fs::write(
        &file,
        "max_payload_bytes = 1000\nworkers = 2\nlease = \"5s\"\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let from_file = data.spawn(&["--config", config]).await;
    let too_big = from_file
        .post_event(&event("cfg-1", json!("x".repeat(1200))))
        .await;
    assert_eq!(
        too_big.status(),
        413,
        "the file's max_payload_bytes applies"
    );
    assert_eq!(
        from_file
            .post_event(&event("cfg-2", json!("small")))
            .await
            .status(),
        202
    );
    drop(from_file);

    let overridden = data
        .spawn(&["--config", config, "--max-payload-bytes", "5000"])
        .await;
    let fits = overridden
        .post_event(&event("cfg-3", json!("x".repeat(1200))))
        .await;
    assert_eq!(fits.status(), 202, "a flag overrides the file");
}

#[tokio::test]
async fn a_bad_config_file_is_refused_with_its_line_and_without_quoting_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let cases = [
        (
            "unknown key",
            "api_tokens = \"ingest=cfg-secret-0123456789\"\nworkerz = 2\n",
            "line 2: unknown field `workerz`",
        ),
        ("bad duration", "lease = \"soon\"\n", "lease"),
        ("bad role", "role = \"boss\"\n", "role"),
        (
            "syntax error",
            "workers = 2\napi_tokens = \"ingest=cfg-secret-0123456789\n",
            "line 2",
        ),
    ];
    for (name, text, expected) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let output = fluxa_command()
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--data-dir",
                &data_dir,
                "--config",
            ])
            .arg(&file)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "case {name} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "case {name}: {stderr}");
        assert!(
            !stderr.contains("cfg-secret"),
            "case {name} quoted a secret: {stderr}"
        );
    }
}

//! The AWS pieces a self-hosted server can use (contract section 9), on the suite's
//! `postgres-s3` and `sqs-s3` runs, where a moto server stands in for AWS: the database credentials from
//! Secrets Manager. On the other backends there is no emulator, and these tests say so and
//! pass without checking anything.

use serde_json::json;

use crate::helpers::{create_test_secret, event, Backend, TestData};

fn needs_moto() -> bool {
    if Backend::is_s3() {
        return true;
    }
    eprintln!("skipped: needs the postgres-s3 or sqs-s3 run (a moto server), which ./test makes");
    false
}

#[tokio::test]
async fn a_server_reads_its_database_credentials_from_secrets_manager_and_never_logs_them() {
    if !needs_moto() {
        return;
    }
    let data = TestData::new().await;
    let url = url::Url::parse(&data.database_url().unwrap()).unwrap();
    // The suite's PostgreSQL trusts local connections, so the password is never checked: it
    // is here to be looked for in the logs.
    let password = "pw-3b9c-never-logged";
    let secret = json!({
        "username": url.username(),
        "password": password,
        "engine": "postgres",
        "host": url.host_str().unwrap(),
        "port": url.port().unwrap_or(5432),
        "dbname": url.path().trim_start_matches('/'),
    });
    let secret_id = create_test_secret(&secret.to_string()).await;

    let app = data.spawn_with_secret(&secret_id, &[]).await;
    let response = app.post_event(&event("from-secret", json!({"n": 1}))).await;
    assert_eq!(response.status(), 202);
    app.wait_for_status("from-secret", "processed").await;
    assert_eq!(data.count_event_rows("from-secret").await, 1);
    let started = app.logs_with("message", "fluxa started");
    assert!(
        started[0]["backend"].as_str().unwrap().contains(&secret_id),
        "{started:?}"
    );
    let exited = app.terminate().await;
    for line in exited.stdout.iter().chain(&exited.stderr) {
        assert!(
            !line.contains(password),
            "a log line holds the password: {line}"
        );
    }
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_stops_the_start_with_a_message_naming_it() {
    if !needs_moto() {
        return;
    }
    let data = TestData::new().await;
    let output = data
        .command()
        .env_remove("FLUXA_DATABASE_URL")
        .env("FLUXA_DATABASE_SECRET_ID", "fluxa-test/no-such-secret")
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not read the secret fluxa-test/no-such-secret"),
        "{stderr}"
    );
}

//! Security (contract section 5, seed invariant 10): scoped tokens, no secret in any output.

use serde_json::{json, Value};

use crate::helpers::{event, fluxa_command, TestData};

const INGEST_TOKEN: &str = "ingest-secret-7f3a9c2e1b";
const READ_TOKEN: &str = "read-secret-5d8e2a1f9c";
const ADMIN_TOKEN: &str = "admin-secret-3c6b9e0d4a";

fn tokens_spec() -> String {
    format!("ingest={INGEST_TOKEN},read={READ_TOKEN},admin={ADMIN_TOKEN}")
}

#[tokio::test]
async fn tokens_are_required_and_scoped_when_configured() {
    let data = TestData::new().await;
    let app = data
        .spawn_with_env(&[], &[("FLUXA_API_TOKENS", &tokens_spec())])
        .await;
    let body = event("auth-1", json!(1));
    let post = |token: Option<&str>| {
        let mut request = app.client.post(app.url("/v1/events")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let expectations = [
        (None, 401, "unauthorized"),
        (Some("not-a-valid-token-at-all"), 401, "unauthorized"),
        (Some(READ_TOKEN), 403, "forbidden"),
        (Some(ADMIN_TOKEN), 403, "forbidden"),
    ];
    for (token, status, code) in expectations {
        let response = post(token).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "token {token:?}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code);
    }
    assert_eq!(post(Some(INGEST_TOKEN)).await.unwrap().status(), 202);

    let get = |path: &str, token: &str| app.client.get(app.url(path)).bearer_auth(token).send();
    assert_eq!(
        get("/v1/events/auth-1", INGEST_TOKEN)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        get("/v1/admin/dlq", READ_TOKEN).await.unwrap().status(),
        403
    );
    assert_eq!(
        get("/v1/admin/dlq", ADMIN_TOKEN).await.unwrap().status(),
        200
    );
    assert_eq!(app.get("/v1/events/auth-1").await.status(), 401);
    // Operations endpoints stay open for probes and scrapers.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

/// Invariant 10: configured secrets appear in no log line, error body or help text.
#[tokio::test]
async fn configured_secrets_never_appear_in_logs_error_bodies_or_help() {
    let data = TestData::new().await;
    let app = data
        .spawn_with_env(&[], &[("FLUXA_API_TOKENS", &tokens_spec())])
        .await;
    let mut bodies = Vec::new();
    // Right tokens, wrong scopes and a near miss, each on a request that fails validation.
    for token in [
        INGEST_TOKEN,
        READ_TOKEN,
        ADMIN_TOKEN,
        &format!("{INGEST_TOKEN}x"),
    ] {
        for path in ["/v1/events", "/v1/events/batch"] {
            let response = app
                .client
                .post(app.url(path))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(r#"{"event_id":"e-1","bad":1}"#)
                .send()
                .await
                .unwrap();
            bodies.push(response.text().await.unwrap());
        }
        let response = app
            .client
            .get(app.url("/v1/admin/dlq"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        bodies.push(response.text().await.unwrap());
    }
    let response = app
        .client
        .post(app.url("/v1/events"))
        .header("authorization", format!("Basic {ADMIN_TOKEN}"))
        .json(&event("s-1", json!(1)))
        .send()
        .await
        .unwrap();
    bodies.push(response.text().await.unwrap());
    let exited = app.terminate().await;
    assert_eq!(exited.code, 0);
    let output = format!(
        "{}\n{}\n{}",
        exited.stdout.join("\n"),
        exited.stderr.join("\n"),
        bodies.join("\n")
    );
    for secret in [INGEST_TOKEN, READ_TOKEN, ADMIN_TOKEN] {
        assert!(
            !output.contains(secret),
            "secret {secret} leaked into output"
        );
    }

    let help = fluxa_command()
        .args(["serve", "--help"])
        .env("FLUXA_API_TOKENS", tokens_spec())
        .output()
        .await
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("--api-tokens"));
    assert!(
        !help.contains(ADMIN_TOKEN),
        "--help shows the token's value"
    );
}

#[tokio::test]
async fn without_tokens_the_server_refuses_a_non_loopback_address_unless_told_it_is_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let output = fluxa_command()
        .args([
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--insecure-no-auth"));

    let data = TestData::new().await;
    let app = data
        .spawn(&["--bind", "0.0.0.0:0", "--insecure-no-auth"])
        .await;
    assert_eq!(app.get("/healthz").await.status(), 200);
}

/// Invariant 10 for the database password: not in startup errors, logs or `--help`.
#[tokio::test]
async fn a_database_password_never_appears_in_errors_logs_or_help() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the server must fail to start and say why, without the password.
    let url = "postgres://fluxa:hunter2-db-secret@127.0.0.1:1/fluxa";
    let output = fluxa_command()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .env("FLUXA_DATABASE_URL", url)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("127.0.0.1:1/fluxa"),
        "the error must say which database: {text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");

    for args in [
        vec!["serve", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["migrate", "--help"],
    ] {
        let output = fluxa_command()
            .args(&args)
            .env("FLUXA_DATABASE_URL", url)
            .output()
            .await
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(help.contains("--database-url"));
        assert!(!help.contains("hunter2"), "{args:?} shows the password");
    }
}

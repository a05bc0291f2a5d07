//! Every function binary, run for real under `cargo lambda watch` (cargo-lambda's emulator of
//! the Lambda Runtime API), invoked through its Invoke API with the JSON AWS would
//! send: ingest accepts an event, the processor stores it from a real `SqsEvent`, query reads
//! it back, admin lists the DLQ. Ignored by default: `./test` runs it with cargo-lambda (from
//! PyPI, in `.venv/cargo-lambda`), moto and PostgreSQL.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{api_request, sqs_event, Deployment};
use serde_json::{json, Value};

/// `cargo lambda watch` in the background, stopped (with its functions) on drop.
struct Watch {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Watch {
    fn start(deployment: &Deployment) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("watch.log");
        let out = std::fs::File::create(&log).unwrap();
        // cargo-lambda starts a function with `$CARGO run … --bin NAME`. This `cargo` runs the
        // binary `cargo test` built for this test instead (`CARGO_BIN_EXE_*`): the same code,
        // without a second build of the workspace with the package's own features.
        let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ingest"))
            .parent()
            .unwrap()
            .to_owned();
        let real_cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let cargo = dir.path().join("cargo");
        std::fs::write(
            &cargo,
            format!(
                "#!/bin/sh\nprev=\nfor arg in \"$@\"; do\n  \
                 if [ \"$prev\" = --bin ]; then exec \"{}/$arg\"; fi\n  prev=$arg\ndone\n\
                 exec \"{real_cargo}\" \"$@\"\n",
                bin_dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut command = std::process::Command::new("cargo-lambda");
        command.env("CARGO", &cargo);
        let child = command
            .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            .args(["--ignore-changes", "-q"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(deployment.environment())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cargo lambda is not installed: ./test installs it into .venv/cargo-lambda");
        let watch = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "cargo lambda watch never listened:\n{}",
                watch.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        watch
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Invokes `function` with `payload` as the Lambda Invoke API does, and returns its answer.
    async fn invoke(&self, function: &str, payload: &Value) -> Value {
        let response = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/2015-03-31/functions/{function}/invocations",
                self.port
            ))
            .json(payload)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .expect("the emulator answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(
            status.is_success(),
            "{function}: {status} {text}\n{}",
            self.log()
        );
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{function}: not JSON: {text}"))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SIGINT: cargo-lambda stops its function processes too.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A function's API Gateway answer: its status and its JSON body.
fn http_answer(answer: &Value) -> (u64, Value) {
    let status = answer["statusCode"].as_u64().expect("a statusCode");
    let body = answer["body"]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
#[ignore = "needs cargo-lambda, moto and PostgreSQL: ./test runs it"]
async fn every_function_binary_answers_its_invocations_under_cargo_lambda_watch() {
    let deployment = Deployment::create().await;
    let watch = Watch::start(&deployment);

    let event = json!({"event_id": "watched-1", "event_type": "lambda.test", "payload": {"n": 1}});
    let answer = watch
        .invoke(
            "ingest",
            &api_request("POST", "/v1/events", Some(&event.to_string())),
        )
        .await;
    let (status, body) = http_answer(&answer);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(body["event_id"], "watched-1");

    let messages = deployment.receive(&deployment.queue_url).await;
    assert_eq!(messages.len(), 1);
    let answer = watch
        .invoke("processor", &sqs_event(&messages, &deployment.queue_arn))
        .await;
    assert_eq!(answer, json!({"batchItemFailures": []}), "{}", watch.log());
    deployment
        .delete(&deployment.queue_url, messages[0].receipt_handle().unwrap())
        .await;

    let answer = watch
        .invoke("query", &api_request("GET", "/v1/events/watched-1", None))
        .await;
    let (status, body) = http_answer(&answer);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body["payload"], json!({"n": 1}));

    let answer = watch
        .invoke("admin", &api_request("GET", "/v1/admin/dlq", None))
        .await;
    let (status, body) = http_answer(&answer);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body["dead_letters"], json!([]));

    // Their logs are JSON lines that carry the invocation's request id, and their metrics are
    // CloudWatch EMF lines.
    let log = watch.log();
    assert!(
        log.lines()
            .any(|line| line.starts_with('{') && line.contains("\"requestId\"")),
        "no JSON log line with a requestId:\n{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("\"CloudWatchMetrics\"") && line.contains("\"Fluxa\"")),
        "no EMF metrics line:\n{log}"
    );
}

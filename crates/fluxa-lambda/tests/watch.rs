//! Every function binary, run for real under `cargo lambda watch` (cargo-lambda's emulator of
//! the Lambda Runtime API), each started with the environment the Terraform gives it (read from
//! infra/terraform, [`terraform_environments`]), and invoked through the Invoke API with the
//! JSON AWS would send: ingest accepts an event, the processor stores it from a real `SqsEvent`,
//! query reads it back, admin lists the DLQ. Ignored by default: `./test` runs it with
//! cargo-lambda (from PyPI, in `.venv/cargo-lambda`), tfparse (in `.venv/terraform`), moto and
//! PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{api_request, sqs_event, Deployment, TOKEN};
use serde_json::{json, Value};

/// Each function's environment variables, by function name.
type Environments = BTreeMap<String, BTreeMap<String, String>>;

/// The environment `infra/terraform` gives each function, with this test's deployment in it.
///
/// The test runs `infra/terraform/tests/function_environments.py`, which reads the functions'
/// environments with tfparse as `test_terraform.py` does, rather than reading a file that
/// `./test` would write beforehand: it then always sees the Terraform as it is now, and runs on
/// its own. The script prints every key and every literal as the Terraform writes it; what
/// exists only once applied is a placeholder naming its resource, and an operator's input one
/// naming its variable, and only those are replaced here, by this deployment's values.
/// Anything more a function sees comes from the harness, and none of it is `FLUXA_*`: the
/// `AWS_*` settings that point the SDKs at moto (on AWS, the Lambda runtime's), cargo-lambda's
/// `AWS_LAMBDA_*`, `PATH` and `HOME` ([`Watch::start`]).
///
/// The Python with tfparse is `FLUXA_TEST_TERRAFORM_PYTHON` (`./test` sets it from
/// `scripts/terraform-check.sh --python`), else the one in the workspace's `.venv/terraform`.
fn terraform_environments(deployment: &Deployment) -> Environments {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var_os("FLUXA_TEST_TERRAFORM_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace.join(".venv/terraform/bin/python"));
    let script = workspace.join("infra/terraform/tests/function_environments.py");
    let output = std::process::Command::new(&python)
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): set FLUXA_TEST_TERRAFORM_PYTHON to a Python with tfparse \
                 (scripts/terraform-check.sh --python installs one and prints it)",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let templates: Environments =
        serde_json::from_slice(&output.stdout).expect("the script prints JSON");

    let values = [
        (
            "${module.stateful.aws_sqs_queue.main}",
            &deployment.queue_url,
        ),
        (
            "${module.stateful.aws_secretsmanager_secret.db}",
            &deployment.secret_arn,
        ),
        (
            "${module.stateful.aws_s3_bucket.payloads}",
            &deployment.bucket,
        ),
        ("${var.api_tokens}", &format!("ingest+read+admin={TOKEN}")),
    ];
    templates
        .into_iter()
        .map(|(function, variables)| {
            let variables = variables
                .into_iter()
                .map(|(name, template)| {
                    let value = values.iter().fold(template, |value, (placeholder, real)| {
                        value.replace(placeholder, real)
                    });
                    assert!(
                        !value.contains("${"),
                        "{function}'s {name} holds a placeholder this test has no value for: \
                         {value}"
                    );
                    (name, value)
                })
                .collect();
            (function, variables)
        })
        .collect()
}

/// Quotes `text` as one word for `sh`.
fn shell_word(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `cargo lambda watch` in the background, stopped (with its functions) on drop.
struct Watch {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Watch {
    /// Starts the emulator, which starts each function it is asked to invoke with that
    /// function's `environments` entry.
    fn start(environments: &Environments) -> Self {
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
        // without a second build of the workspace with the package's own features. It is also
        // where each function gets its own environment: one emulator hands all of them its own.
        let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ingest"))
            .parent()
            .unwrap()
            .to_owned();
        let functions: String = environments
            .iter()
            .map(|(function, variables)| {
                let assignments: Vec<String> = variables
                    .iter()
                    .map(|(name, value)| shell_word(&format!("{name}={value}")))
                    .collect();
                format!(
                    "      {function}) exec env {} {} ;;\n",
                    assignments.join(" "),
                    shell_word(&bin_dir.join(function).display().to_string())
                )
            })
            .collect();
        let real_cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let cargo = dir.path().join("cargo");
        std::fs::write(
            &cargo,
            format!(
                "#!/bin/sh\nprev=\nfor arg in \"$@\"; do\n  if [ \"$prev\" = --bin ]; then\n    \
                 case \"$arg\" in\n{functions}      \
                 *) echo \"no Terraform environment for $arg\" >&2; exit 1 ;;\n    esac\n  \
                 fi\n  prev=$arg\ndone\nexec {} \"$@\"\n",
                shell_word(&real_cargo)
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // Nothing of this test's own environment reaches a function (no `FLUXA_*`, no
        // `RUST_LOG`) but what locates programs and the `AWS_*` settings of moto.
        let harness = std::env::vars()
            .filter(|(name, _)| name.starts_with("AWS_") || name == "PATH" || name == "HOME");
        let mut command = std::process::Command::new("cargo-lambda");
        command.env_clear().envs(harness).env("CARGO", &cargo);
        let child = command
            .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            .args(["--ignore-changes", "-q"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
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
        let log_before = self.log().len();
        let request = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/2015-03-31/functions/{function}/invocations",
                self.port
            ))
            .json(payload)
            .timeout(Duration::from_secs(120))
            .send();
        // A function that exits before it asks for its first event leaves the emulator waiting
        // for it, so the test watches for cargo-lambda's note of the exit instead.
        let exited = async {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let log = self.log();
                if log
                    .get(log_before..)
                    .is_some_and(|new| new.contains("command exited"))
                {
                    break;
                }
            }
        };
        let response = tokio::select! {
            response = request => response
                .unwrap_or_else(|e| panic!("{function} never answered: {e}\n{}", self.log())),
            () = exited => panic!("{function} exited instead of answering:\n{}", self.log()),
        };
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
#[ignore = "needs cargo-lambda, tfparse, moto and PostgreSQL: ./test runs it"]
async fn every_function_binary_started_with_its_terraform_environment_answers_its_invocations() {
    let deployment = Deployment::create().await;
    let environments = terraform_environments(&deployment);
    assert_eq!(
        environments.keys().collect::<Vec<_>>(),
        ["admin", "ingest", "processor", "query"]
    );
    // The processor serves no HTTP: it has no tokens, nor any switch to do without them.
    let processor = &environments["processor"];
    assert!(
        !processor.contains_key("FLUXA_API_TOKENS")
            && !processor.contains_key("FLUXA_INSECURE_NO_AUTH"),
        "{processor:?}"
    );
    let watch = Watch::start(&environments);

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

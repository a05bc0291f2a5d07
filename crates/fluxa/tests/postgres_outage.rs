//! A PostgreSQL restart while producers keep sending: ingest answers 503 `unavailable` with
//! `Retry-After` while the database is down, recovers by itself, and loses no event that got a
//! 202. Runs on a private PostgreSQL cluster made for this test (initdb in a temp dir), so
//! stopping it disturbs nothing else.

#[allow(dead_code)]
#[path = "it/helpers.rs"]
mod helpers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use helpers::{event, TestData};

/// A throwaway PostgreSQL cluster on a free port.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl PrivatePostgres {
    fn start() -> Self {
        let bindir = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config (PostgreSQL's server binaries) must be installed");
        let bindir = PathBuf::from(String::from_utf8(bindir.stdout).unwrap().trim());
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self { dir, bindir, port };
        if is_root() {
            // PostgreSQL refuses to run as root; hand the directory to the postgres user.
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(cluster.dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        cluster.run(
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-D",
                &cluster.data(),
            ],
        );
        cluster.pg_start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bindir.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(Path::new("/"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn pg_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    fn pg_stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new(self.bindir.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        if is_root() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bindir.join("pg_ctl"))
                .args(["-D", &self.data(), "-m", "immediate", "stop"])
                .output();
        }
    }
}

#[tokio::test]
async fn a_postgres_restart_during_ingest_answers_503_then_recovers_and_loses_no_accepted_event() {
    let postgres = PrivatePostgres::start();
    let data = TestData::new_embedded().await;
    let app = data
        .spawn_with_env(
            &["--workers", "2"],
            &[("FLUXA_DATABASE_URL", &postgres.url())],
        )
        .await;

    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<Mutex<Vec<Value>>> = Arc::default();
    let stop_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (accepted, refused, stop_sending) =
            (accepted.clone(), refused.clone(), stop_sending.clone());
        let (client, url) = (app.client.clone(), app.url("/v1/events"));
        tokio::spawn(async move {
            let mut event_idx = 0;
            while !stop_sending.load(std::sync::atomic::Ordering::SeqCst) {
                let event_id = format!("outage-{event_idx}");
                event_idx += 1;
                let response = client
                    .post(&url)
                    .json(&event(&event_id, json!({"n": event_idx})))
                    .send()
                    .await
                    .expect("the server must keep answering");
                match response.status().as_u16() {
                    202 => accepted.lock().unwrap().push(event_id),
                    503 => {
                        assert_eq!(response.headers()["retry-after"], "1");
                        let body: Value = response.json().await.unwrap();
                        refused.lock().unwrap().push(body);
                    }
                    other => panic!("unexpected status {other} during the outage"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let n_before = accepted.lock().unwrap().len();
    postgres.pg_stop();
    let readiness = app.get("/readyz").await;
    assert_eq!(readiness.status(), 503, "readiness must report the outage");
    assert_eq!(readiness.headers()["retry-after"], "1");
    let body: Value = readiness.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("store"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    postgres.pg_start();
    // Keep sending until ingest has recovered by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    let n_after_restart = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = accepted.lock().unwrap().len();
        if n > n_before + 10 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "ingest did not recover after PostgreSQL came back"
        );
    };
    stop_sending.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        app.get("/readyz").await.status(),
        200,
        "ready again after the restart"
    );
    producer.await.unwrap();

    assert!(n_before > 0, "nothing was accepted before the outage");
    assert!(n_after_restart > n_before);
    let refused = refused.lock().unwrap().clone();
    assert!(
        !refused.is_empty(),
        "no request was refused while PostgreSQL was down"
    );
    for body in &refused {
        assert_eq!(body["error"]["code"], "unavailable");
    }
    let accepted = accepted.lock().unwrap().clone();
    for event_id in &accepted {
        app.wait_for_status(event_id, "processed").await;
    }
}

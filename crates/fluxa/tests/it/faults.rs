//! Storage faults end without a restart (contract sections 1 and 4): the embedded backend's data
//! folder on a real filesystem that fills up. Ingest answers 503 `unavailable` with
//! `Retry-After` while the disk is full; once space is freed the same server process accepts,
//! processes and redrives again within seconds, and every event it accepted is stored byte for
//! byte. The disk is a small tmpfs mounted for the test, so the failures are the ones a full disk
//! really gives (SQLite's COMMIT failing on its WAL), not a simulation of them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{TestApp, TestData, PATIENCE};
use crate::ingest::raw_payload;

/// A tmpfs mounted for one test and unmounted when dropped. Mounting needs root, which CI has.
struct SmallDisk {
    mount_point: tempfile::TempDir,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0\n"))
}

impl SmallDisk {
    /// `None` when this user cannot mount (not root); as root, a failed mount fails the test.
    fn mount(size: &str) -> Option<Self> {
        if !is_root() {
            return None;
        }
        let mount_point = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "fluxa-test"])
            .arg(mount_point.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "root could not mount a tmpfs: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(Self { mount_point })
    }

    fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// Takes every free byte with one file, which [`Filler::free`] deletes again.
    fn fill(&self) -> Filler {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5_u8; 1 << 20];
        // Smaller and smaller writes, so that not even a page of the filesystem is left over.
        for n_bytes in [1 << 20, 1 << 16, 1 << 12, 1 << 9, 1] {
            loop {
                match file.write(&chunk[..n_bytes]) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling the disk failed: {e}"),
                }
            }
        }
        Filler { path }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: the killed server may not have been reaped yet and still hold files open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount_point.path())
            .status();
    }
}

/// The file that fills the disk.
struct Filler {
    path: PathBuf,
}

impl Filler {
    fn free(self) {
        std::fs::remove_file(&self.path).unwrap();
    }
}

/// Posts an event whose payload is `payload`, exactly these bytes.
async fn post(app: &TestApp, event_id: &str, payload: &str) -> reqwest::Response {
    let body =
        format!(r#"{{"event_id":"{event_id}","event_type":"disk.test","payload": {payload} }}"#);
    app.post_raw("/v1/events", body, Some("application/json"))
        .await
}

async fn redrive(app: &TestApp, selector: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/admin/dlq/redrive"))
        .json(selector)
        .send()
        .await
        .unwrap()
}

/// Asserts that `response` is a 503 `unavailable` with the contract's error body and
/// `Retry-After`.
async fn assert_unavailable(response: reqwest::Response, what: &str) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(body["error"]["code"], "unavailable", "{what}: {body}");
    assert!(
        body["error"]["correlation_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{what}: no correlation id in {body}"
    );
    assert!(
        retry_after
            .as_deref()
            .is_some_and(|seconds| seconds.parse::<u64>().is_ok()),
        "{what}: no Retry-After"
    );
}

#[tokio::test]
async fn a_full_disk_answers_503_and_ingest_processing_and_redrive_recover_once_space_is_freed() {
    let Some(disk) = SmallDisk::mount("32m") else {
        eprintln!("skipped: mounting a tmpfs to fill needs root (CI runs as root)");
        return;
    };
    let data = TestData::new_embedded_in(disk.path()).await;
    // A short visibility timeout, so that a message whose settling failed on the full disk is
    // delivered again well within the test's patience.
    let app = data.spawn(&["--visibility-timeout", "2s"]).await;
    // Every event that got a 202, with its exact payload text.
    let mut accepted: Vec<(String, String)> = Vec::new();

    // A dead letter to redrive once the disk has room again: an event whose store writes fail
    // until its retries are exhausted, while its table is away.
    data.store_sql("ALTER TABLE events RENAME TO events_away")
        .await;
    let stranded = r#"{ "stranded" : true }"#;
    assert_eq!(post(&app, "stranded", stranded).await.status(), 202);
    accepted.push(("stranded".to_owned(), stranded.to_owned()));
    let dead_letter = app.wait_for_dead_letter("stranded").await;
    data.store_sql("ALTER TABLE events_away RENAME TO events")
        .await;
    let before = r#"{ "when" : "before", "n" : [1, 2.50] }"#;
    assert_eq!(post(&app, "before", before).await.status(), 202);
    accepted.push(("before".to_owned(), before.to_owned()));
    app.wait_for_status("before", "processed").await;

    let filler = disk.fill();
    // The next ingest cannot be made durable: 503, never a 202 that is then lost.
    let deadline = Instant::now() + PATIENCE;
    let mut n_posted = 0;
    loop {
        let event_id = format!("during-{n_posted}");
        let payload = format!(r#"{{ "when" : "during", "n" : {n_posted} }}"#);
        n_posted += 1;
        let response = post(&app, &event_id, &payload).await;
        let status = response.status().as_u16();
        if status == 202 {
            accepted.push((event_id, payload));
            assert!(
                Instant::now() < deadline,
                "ingest never failed on a full disk"
            );
            continue;
        }
        assert_unavailable(response, "ingest on a full disk").await;
        break;
    }
    let response = redrive(&app, &json!({ "id": dead_letter["id"] })).await;
    assert_unavailable(response, "redrive on a full disk").await;

    // Space comes back; the same process, never restarted, accepts again within seconds.
    filler.free();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let after = r#"{ "when" : "after" }"#;
        let response = post(&app, "after-0", after).await;
        match response.status().as_u16() {
            202 => {
                accepted.push(("after-0".to_owned(), after.to_owned()));
                break;
            }
            503 => assert!(
                Instant::now() < deadline,
                "ingest still answers 503 {PATIENCE:?} after the disk has room again"
            ),
            other => panic!("ingest answered {other} while recovering"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 1..=3 {
        let event_id = format!("after-{n}");
        let payload = format!(r#"{{"when":"after","n":{n}}}"#);
        assert_eq!(post(&app, &event_id, &payload).await.status(), 202);
        accepted.push((event_id, payload));
    }

    // DLQ redrive works again, and the redriven event is processed now that its table is back.
    let response = redrive(&app, &json!({ "id": dead_letter["id"] })).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["redriven"], 1);

    // Nothing accepted was lost: every 202 is processed, its payload byte for byte.
    for (event_id, payload) in &accepted {
        app.wait_for_status(event_id, "processed").await;
        let text = app
            .get(&format!("/v1/events/{event_id}"))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(&raw_payload(&text), payload, "event {event_id}");
    }
    // The disk is the embedded backend's whatever the suite's backend: record it once.
    if crate::helpers::Backend::from_env() != crate::helpers::Backend::Embedded {
        return;
    }
    crate::reliability::record(crate::reliability::Trial {
        scenario: "full disk, then space freed",
        tried: "embedded data on a 32 MiB tmpfs filled to the last byte, ingest and redrive, then the space freed, without a restart",
        requests: n_posted + 6,
        accepted: accepted.len() as u64,
        lost: 0,
        duplicated: 0,
        observed: "503 with Retry-After while full; 202 again within seconds once freed; redrive works; every 202 processed byte-identical".to_owned(),
    });
}

//! What the harness sends: events with ~250-byte payloads and ids unique to the run, posted one
//! per request at a fixed concurrency, in batches, or on an open-loop schedule.
//!
//! Bodies are formatted as strings rather than built as `serde_json::Value`s: the client shares
//! two cores with the server under test, so every microsecond it spends is one the server loses.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

/// Size of every event's payload in bytes, the same as the anchors' rows.
pub const PAYLOAD_BYTES: usize = 250;

/// One event's JSON, with a payload of exactly [`PAYLOAD_BYTES`] bytes.
pub fn event_json(event_id: &str) -> String {
    // `{"id":"…","data":"…"}` is 19 bytes around the two strings.
    let padding = PAYLOAD_BYTES.saturating_sub(19 + event_id.len());
    format!(
        r#"{{"event_id":"{event_id}","event_type":"bench.event","source":"fluxa-bench","occurred_at":"2026-01-01T00:00:00Z","payload":{{"id":"{event_id}","data":"{}"}}}}"#,
        "x".repeat(padding)
    )
}

/// A `POST /v1/events/batch` body holding the events `prefix-first` to `prefix-(first+n-1)`.
pub fn batch_json(prefix: &str, first: usize, n: usize) -> String {
    let events: Vec<String> = (first..first + n)
        .map(|i| event_json(&format!("{prefix}-{i}")))
        .collect();
    format!(r#"{{"events":[{}]}}"#, events.join(","))
}

/// Posts `n` single events (`prefix-0` …), `concurrency` at a time, insisting on 202 for each;
/// returns how long it took until the last one was accepted.
pub async fn post_singles(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let url = format!("{base_url}/v1/events");
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(Ok)
        .try_for_each_concurrent(concurrency, |i| {
            let request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(event_json(&format!("{prefix}-{i}")));
            async move {
                let status = request.send().await?.status();
                if status != 202 {
                    bail!("POST /v1/events answered {status}");
                }
                Ok(())
            }
        })
        .await?;
    Ok(started.elapsed())
}

/// Posts `n` events in batches of `batch_size`, `concurrency` batches at a time, insisting that
/// every event of every batch was accepted; returns how long that took.
pub async fn post_batches(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    n: usize,
    batch_size: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let url = format!("{base_url}/v1/events/batch");
    let started = Instant::now();
    futures::stream::iter((0..n).step_by(batch_size))
        .map(Ok)
        .try_for_each_concurrent(concurrency, |first| {
            let size = batch_size.min(n - first);
            let request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(batch_json(prefix, first, size));
            async move {
                let response = request.send().await?;
                let status = response.status();
                if status != 200 {
                    bail!("POST /v1/events/batch answered {status}");
                }
                let body: Value = response.json().await?;
                let accepted = body["accepted"].as_u64().context("no `accepted` count")?;
                if accepted != size as u64 {
                    bail!("a batch of {size} had only {accepted} events accepted: {body}");
                }
                Ok(())
            }
        })
        .await?;
    Ok(started.elapsed())
}

/// Latencies of an open-loop run, in milliseconds.
pub struct OpenLoop {
    pub rate: f64,
    pub sent: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Sends single events at `rate` per second for `duration`, each on its schedule whether or not
/// earlier ones were answered, and measures each request's latency from its scheduled start, so
/// a stalled server shows up as latency (a closed loop would just send less and hide it).
/// Anything but 202, or no answer within `timeout`, counts as an error.
pub async fn open_loop(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<OpenLoop> {
    let url = format!("{base_url}/v1/events");
    let n = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let scheduled = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(event_json(&format!("{prefix}-{i}")));
        requests.spawn(async move {
            let answered = matches!(request.send().await, Ok(r) if r.status() == 202);
            answered.then(|| scheduled.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut latencies = Vec::with_capacity(n);
    let mut errors = 0;
    while let Some(result) = requests.join_next().await {
        match result? {
            Some(ms) => latencies.push(ms),
            None => errors += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(OpenLoop {
        rate,
        sent: n,
        errors,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

/// The nearest-rank percentile of sorted values (NaN when there are none).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_carries_a_payload_of_exactly_250_bytes() {
        for id in ["a", "run1-single-0", "r0123456789abcdef-drain-large-199999"] {
            let event: Value = serde_json::from_str(&event_json(id)).unwrap();
            assert_eq!(event["event_id"], id);
            assert_eq!(event["payload"].to_string().len(), PAYLOAD_BYTES);
        }
    }

    #[test]
    fn a_batch_body_holds_consecutive_ids_from_its_first() {
        let batch: Value = serde_json::from_str(&batch_json("p", 5, 3)).unwrap();
        let ids: Vec<&str> = batch["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["p-5", "p-6", "p-7"]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}

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
    let (_, took) = post_each(client, base_url, prefix, 0..n, concurrency).await?;
    Ok(took)
}

/// Posts single events (`prefix-0` …), `concurrency` at a time, insisting on 202 for each, and
/// starts no new one once `duration` has passed; returns how many were accepted and how long
/// that took.
pub async fn post_singles_for(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    // The stream asks for the next index only when a request finished, so the clock is read
    // when a request would start.
    let indices = (0..).take_while(move |_| started.elapsed() < duration);
    post_each(client, base_url, prefix, indices, concurrency).await
}

/// Posts the single events `prefix-i` for each `i` of `indices`, `concurrency` at a time,
/// insisting on 202 for each; returns how many and how long until the last was accepted.
async fn post_each(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    indices: impl Iterator<Item = usize>,
    concurrency: usize,
) -> anyhow::Result<(usize, Duration)> {
    let url = format!("{base_url}/v1/events");
    let started = Instant::now();
    let mut sent = 0;
    futures::stream::iter(indices.inspect(|_| sent += 1))
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
    Ok((sent, started.elapsed()))
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
/// Anything but 202, or no answer within the client's timeout, counts as an error.
pub async fn open_loop(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<OpenLoop> {
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let run = open_loop_windows(client, base_url, prefix, rate, start, duration, duration).await?;
    Ok(run.overall())
}

/// The requests of an open loop scheduled within one window, and how they fared.
#[derive(Default)]
pub struct Window {
    pub sent: usize,
    pub accepted: usize,
    /// 503s: the server shedding load (or a backend it found down).
    pub shed: usize,
    /// Any other status but 202.
    pub other_status: usize,
    /// No answer: connection errors and the client's timeout.
    pub failed: usize,
    /// The 202s' latencies in ms, sorted once the run is over.
    latencies: Vec<f64>,
}

impl Window {
    /// Every request but a 202.
    pub fn errors(&self) -> usize {
        self.shed + self.other_status + self.failed
    }

    pub fn p50_ms(&self) -> f64 {
        percentile(&self.latencies, 0.50)
    }

    pub fn p99_ms(&self) -> f64 {
        percentile(&self.latencies, 0.99)
    }

    pub fn max_ms(&self) -> f64 {
        self.latencies.last().copied().unwrap_or(f64::NAN)
    }

    fn record(&mut self, outcome: Outcome) {
        self.sent += 1;
        match outcome {
            Outcome::Accepted(ms) => {
                self.accepted += 1;
                self.latencies.push(ms);
            }
            Outcome::Status(503) => self.shed += 1,
            Outcome::Status(_) => self.other_status += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// What became of one open-loop request.
enum Outcome {
    /// 202, after this many ms from its scheduled start.
    Accepted(f64),
    Status(u16),
    Failed,
}

/// An open-loop run, window by window.
pub struct OpenLoopRun {
    pub rate: f64,
    /// By scheduled start: the first `window` of the run, the next, … (the last may be shorter).
    pub windows: Vec<Window>,
    /// Whether request `i` (event `prefix-i`) was answered 202.
    pub accepted: Vec<bool>,
    /// How far behind its schedule the client sent its latest request: when this grows, the
    /// client, not the server, is short of CPU (its lag still counts as latency).
    pub max_send_lag: Duration,
}

impl OpenLoopRun {
    /// The whole run's figures.
    pub fn overall(&self) -> OpenLoop {
        let mut latencies: Vec<f64> = self
            .windows
            .iter()
            .flat_map(|w| w.latencies.iter().copied())
            .collect();
        latencies.sort_by(f64::total_cmp);
        OpenLoop {
            rate: self.rate,
            sent: self.windows.iter().map(|w| w.sent).sum(),
            errors: self.windows.iter().map(Window::errors).sum(),
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// [`open_loop`] from `start` on, with its figures kept per `window` of scheduled start times,
/// so a long run shows drift rather than one average over it.
pub async fn open_loop_windows(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    rate: f64,
    start: tokio::time::Instant,
    duration: Duration,
    window: Duration,
) -> anyhow::Result<OpenLoopRun> {
    let url = format!("{base_url}/v1/events");
    let n = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let n_windows = window_count(duration, window);
    let mut windows: Vec<Window> = (0..n_windows).map(|_| Window::default()).collect();
    let mut accepted = vec![false; n];
    let mut record = |(i, scheduled_at, outcome): (usize, Duration, Outcome)| {
        if matches!(outcome, Outcome::Accepted(_)) {
            accepted[i] = true;
        }
        let w = (scheduled_at.as_secs_f64() / window.as_secs_f64()) as usize;
        windows[w.min(n_windows - 1)].record(outcome);
    };
    let mut max_send_lag = Duration::ZERO;
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let offset = period.mul_f64(i as f64);
        let scheduled = start + offset;
        tokio::time::sleep_until(scheduled).await;
        max_send_lag = max_send_lag.max(scheduled.elapsed());
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(event_json(&format!("{prefix}-{i}")));
        requests.spawn(async move {
            let outcome = match request.send().await {
                // Read the (small) body as a real client would: an unread body can cost the
                // connection its place in the pool, and a new connection per request would
                // time TCP set-up rather than the server.
                Ok(response) => match (response.status().as_u16(), response.bytes().await) {
                    (202, Ok(_)) => Outcome::Accepted(scheduled.elapsed().as_secs_f64() * 1000.0),
                    (_, Err(_)) => Outcome::Failed,
                    (status, Ok(_)) => Outcome::Status(status),
                },
                Err(_) => Outcome::Failed,
            };
            (i, offset, outcome)
        });
        // Reap as we go: a long run would otherwise hold every finished task until the end.
        while let Some(done) = requests.try_join_next() {
            record(done?);
        }
    }
    while let Some(done) = requests.join_next().await {
        record(done?);
    }
    for window in &mut windows {
        window.latencies.sort_by(f64::total_cmp);
    }
    Ok(OpenLoopRun {
        rate,
        windows,
        accepted,
        max_send_lag,
    })
}

/// How many windows `duration` is cut into, the last one possibly shorter.
pub fn window_count(duration: Duration, window: Duration) -> usize {
    (duration.as_secs_f64() / window.as_secs_f64() - 1e-9)
        .ceil()
        .max(1.0) as usize
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

    #[test]
    fn a_run_is_cut_into_whole_windows_and_a_shorter_last_one() {
        let s = Duration::from_secs;
        assert_eq!(window_count(s(600), s(60)), 10);
        assert_eq!(window_count(s(601), s(60)), 11);
        assert_eq!(window_count(s(30), s(60)), 1);
        assert_eq!(window_count(Duration::from_millis(8000), s(8)), 1);
    }

    #[test]
    fn a_window_counts_503s_other_statuses_and_failures_as_errors() {
        let mut window = Window::default();
        for outcome in [
            Outcome::Accepted(2.0),
            Outcome::Accepted(1.0),
            Outcome::Status(503),
            Outcome::Status(500),
            Outcome::Failed,
        ] {
            window.record(outcome);
        }
        assert_eq!((window.sent, window.accepted, window.errors()), (5, 2, 3));
        assert_eq!((window.shed, window.other_status, window.failed), (1, 1, 1));
    }
}

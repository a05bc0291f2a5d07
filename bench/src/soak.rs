//! `fluxa-bench soak`: minutes of open-loop load at a fraction of the maximum ingest rate, with
//! the server's memory, queue and latency recorded window by window, to show drift (a leak, a
//! growing backlog, latency creeping up) that a few seconds of load cannot.
//!
//! The maximum ingest rate is measured in the same run, on the same server, just before: an
//! absolute rate would overload a slower machine or idle a faster one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde_json::{json, Value};

use crate::load::{open_loop_windows, post_singles, post_singles_for, window_count, OpenLoopRun};
use crate::report::{figure, markdown};
use crate::server::{bench_database_name, Backend, Counter, Deployment, Role, Scrape, Server};
use crate::Run;

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// The backend to soak.
    #[arg(long, value_enum, default_value = "embedded")]
    backend: SoakBackend,
    /// Seconds of open-loop load.
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// The load as a fraction of the maximum ingest rate the probe measured.
    #[arg(long, default_value_t = 0.8)]
    fraction: f64,
    /// Seconds of closed-loop single-event load that measure the maximum ingest rate.
    #[arg(long, default_value_t = 15)]
    probe_seconds: u64,
    /// Seconds per window of the report.
    #[arg(long, default_value_t = 60)]
    window_seconds: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SoakBackend {
    Embedded,
    Postgres,
}

/// What "maximum ingest rate" means here, printed with every report. Accepted requests alone
/// would overstate it whenever the processor falls behind: the API answers 202 as soon as an
/// event is queued, so a growing queue looks like throughput.
const MAX_RATE_DEFINITION: &str = "maximum ingest rate: events stored per second while a \
     closed loop of single-event POSTs ran (stored count at its end minus at its start, over its \
     duration), and never more than the 202s per second; when the processor keeps up the two \
     agree, when it falls behind the queue grows and the stored rate is the sustainable one";

/// Events posted before the probe, so neither it nor the soak times opening connections.
const WARM_UP: usize = 64;

/// Runs the soak and prints its report; fails if a 202 was lost, the queue did not drain or the
/// server did not stop cleanly, after printing.
pub async fn run(run: &Run, args: &SoakArgs) -> anyhow::Result<()> {
    if args.fraction.is_nan()
        || args.fraction <= 0.0
        || args.soak_seconds == 0
        || args.window_seconds == 0
    {
        bail!("--fraction, --soak-seconds and --window-seconds must be positive");
    }
    let backend = match args.backend {
        SoakBackend::Embedded => Backend::Embedded,
        SoakBackend::Postgres => {
            bench_database_name(&run.args.database_url)?;
            Backend::Postgres {
                url: run.args.database_url.clone(),
            }
        }
    };
    let soak = soak(run, args, &backend).await?;
    if let Backend::Postgres { url } = &backend {
        crate::server::drop_database(url).await?;
    }
    let report = soak.markdown();
    print!("{report}");
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&soak.json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Err(e) = &soak.exit {
        bail!("the server did not stop cleanly: {e}");
    }
    if soak.lost > 0 {
        bail!("{} accepted events were never stored", soak.lost);
    }
    if !soak.drain.complete {
        bail!("the queue did not drain within --patience-seconds");
    }
    Ok(())
}

/// The server's state at one moment; `None` where it could not be read (the run goes on: a
/// failed scrape should not cost ten minutes of load, and the table shows the gap).
struct Sample {
    /// Seconds since the soak's load started.
    at_s: f64,
    rss_bytes: Option<u64>,
    metrics: Option<Scrape>,
    /// Events in the store (a cheap lower bound while the server writes).
    stored: Option<u64>,
}

impl Sample {
    async fn take(server: &Server, counter: &Counter, since: tokio::time::Instant) -> Self {
        let at_s = since.elapsed().as_secs_f64();
        let warn = |what: &str, e: &anyhow::Error| eprintln!("  at {at_s:.0} s: {what}: {e:#}");
        let rss_bytes = server.rss_bytes().inspect_err(|e| warn("no RSS", e)).ok();
        let metrics = server
            .scrape()
            .await
            .inspect_err(|e| warn("no /metrics", e))
            .ok();
        let stored = counter
            .processed()
            .await
            .inspect_err(|e| warn("no stored count", e))
            .ok();
        Self {
            at_s,
            rss_bytes,
            metrics,
            stored,
        }
    }

    /// Pending plus in flight: every event queued and not yet acknowledged.
    fn backlog(&self) -> Option<f64> {
        self.metrics.map(|q| q.pending + q.in_flight)
    }

    fn rss_mb(&self) -> f64 {
        self.rss_bytes.map_or(f64::NAN, |b| b as f64 / 1e6)
    }

    fn json(&self) -> Value {
        json!({
            "at_s": self.at_s,
            "rss_bytes": self.rss_bytes,
            "queue_depth": self.metrics.map(|q| q.pending),
            "queue_in_flight": self.metrics.map(|q| q.in_flight),
            "dlq_depth": self.metrics.map(|q| q.dead_letters),
            "shed_total": self.metrics.map(|q| q.shed_total),
            "connections_open": self.metrics.and_then(|q| q.connections),
            "stored": self.stored,
        })
    }
}

/// The closed-loop probe that sets the soak's rate.
struct Probe {
    seconds: f64,
    accepted: usize,
    accept_rate: f64,
    stored_rate: f64,
    before: Sample,
    after: Sample,
}

impl Probe {
    fn max_rate(&self) -> f64 {
        self.accept_rate.min(self.stored_rate)
    }

    /// How the queue moved during the probe, in words.
    fn queue_note(&self) -> String {
        match (self.before.backlog(), self.after.backlog()) {
            (Some(before), Some(after)) if after > before + 0.01 * self.accepted as f64 => {
                format!(
                    "queue grew from {before:.0} to {after:.0} during the probe: the processor \
                     fell behind the API"
                )
            }
            (Some(before), Some(after)) => {
                format!("queue {before:.0} → {after:.0} during the probe: the processor kept up")
            }
            _ => "queue depth not read during the probe".to_owned(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "accepted": self.accepted,
            "accept_rate": self.accept_rate,
            "stored_rate": self.stored_rate,
            "max_rate": self.max_rate(),
            "before": self.before.json(),
            "after": self.after.json(),
        })
    }
}

/// How the queue drained once the load stopped.
struct Drain {
    seconds: f64,
    /// Whether the queue was empty and every 202 stored within the patience.
    complete: bool,
    sample: Sample,
}

/// Everything one soak measured.
struct Soak {
    backend: &'static str,
    run_id: String,
    concurrency: usize,
    soak_seconds: u64,
    window_seconds: u64,
    fraction: f64,
    probe: Probe,
    load: OpenLoopRun,
    /// At the start of every window, and at the end of the last.
    samples: Vec<Sample>,
    drain: Drain,
    /// Answered 202 but not in the store once the queue drained.
    lost: usize,
    /// In the store without a 202: the client gave up (timeout) after the server queued it.
    stored_unacknowledged: usize,
    exit: Result<(), String>,
}

async fn soak(run: &Run, args: &SoakArgs, backend: &Backend) -> anyhow::Result<Soak> {
    let name = backend.name();
    let concurrency = run.args.concurrency;
    let patience = Duration::from_secs(run.args.patience_seconds);
    let deployment = Deployment::fresh(backend, run.scratch.path(), "soak").await?;
    let server = Server::start(&run.fluxa, &deployment, Role::All, run.args.workers).await?;
    let url = server.base_url();
    let counter = Counter::open(&deployment).await?;
    let mut expected = WARM_UP;
    post_singles(
        &server.client,
        &url,
        &format!("{}-warm-up", run.id),
        WARM_UP,
        16,
    )
    .await?;
    counter
        .wait_for(expected as u64, Instant::now(), patience)
        .await?
        .completed()?;

    eprintln!(
        "{name}: probing the maximum ingest rate, {concurrency} concurrent single-event \
         requests for {} s…",
        args.probe_seconds
    );
    let since = tokio::time::Instant::now();
    let before = Sample::take(&server, &counter, since).await;
    let (accepted, took) = post_singles_for(
        &server.client,
        &url,
        &format!("{}-probe", run.id),
        Duration::from_secs(args.probe_seconds),
        concurrency,
    )
    .await?;
    let after = Sample::take(&server, &counter, since).await;
    expected += accepted;
    let seconds = took.as_secs_f64();
    let stored_during = after
        .stored
        .zip(before.stored)
        .map(|(a, b)| a.saturating_sub(b));
    let probe = Probe {
        seconds,
        accepted,
        accept_rate: accepted as f64 / seconds,
        stored_rate: stored_during.context("could not count stored events")? as f64 / seconds,
        before,
        after,
    };
    eprintln!(
        "  {:.0} events/s accepted, {:.0} stored; {}",
        probe.accept_rate,
        probe.stored_rate,
        probe.queue_note()
    );
    eprintln!("  {MAX_RATE_DEFINITION}");
    // The soak starts on an empty queue, so its first window is not the probe's backlog.
    counter
        .wait_for(expected as u64, Instant::now(), patience)
        .await?
        .completed()
        .context("the probe's events were not all stored")?;

    let rate = args.fraction * probe.max_rate();
    let duration = Duration::from_secs(args.soak_seconds);
    let window = Duration::from_secs(args.window_seconds);
    eprintln!(
        "{name}: soak, open loop at {rate:.0}/s ({} × {:.0}) for {} s…",
        args.fraction,
        probe.max_rate(),
        args.soak_seconds
    );
    let prefix = format!("{}-soak", run.id);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let sampler = async {
        let n_windows = window_count(duration, window);
        let mut samples = Vec::with_capacity(n_windows + 1);
        for k in 0..=n_windows {
            tokio::time::sleep_until(start + (window * k as u32).min(duration)).await;
            let sample = Sample::take(&server, &counter, start).await;
            eprintln!(
                "  {:>4.0} s: RSS {:.1} MB, queue {}, in flight {}, DLQ {}, stored {}, \
                 shed so far {}, connections {}",
                sample.at_s,
                sample.rss_mb(),
                count(sample.metrics.map(|m| m.pending)),
                count(sample.metrics.map(|m| m.in_flight)),
                count(sample.metrics.map(|m| m.dead_letters)),
                count(sample.stored.map(|s| s as f64)),
                count(sample.metrics.map(|m| m.shed_total)),
                count(sample.metrics.and_then(|m| m.connections)),
            );
            samples.push(sample);
        }
        samples
    };
    let load = open_loop_windows(&server.client, &url, &prefix, rate, start, duration, window);
    let (load, samples) = tokio::join!(load, sampler);
    let load = load?;

    let soak_accepted = load.accepted.iter().filter(|&&a| a).count();
    expected += soak_accepted;
    eprintln!("{name}: load over; waiting for the queue to drain…");
    let drain_started = Instant::now();
    let stored = counter
        .wait_for(expected as u64, drain_started, patience)
        .await?;
    // The count can reach `expected` while a 202'd event is still queued, if the client gave up
    // on others the server went on to store; only an empty queue says the processor is done.
    let mut empty = false;
    while !empty && drain_started.elapsed() < patience {
        let backlog = server.scrape().await.map(|q| q.pending + q.in_flight);
        empty = matches!(backlog, Ok(b) if b == 0.0);
        if !empty {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let drain = Drain {
        seconds: drain_started.elapsed().as_secs_f64(),
        complete: stored.complete && empty,
        sample: Sample::take(&server, &counter, start).await,
    };
    let stored = counter.stored(&prefix, load.accepted.len()).await?;
    let (mut lost, mut stored_unacknowledged) = (0, 0);
    for (&accepted, &stored) in load.accepted.iter().zip(&stored) {
        lost += usize::from(accepted && !stored);
        stored_unacknowledged += usize::from(!accepted && stored);
    }
    drop(counter);
    let exit = server.stop().await.map_err(|e| format!("{e:#}"));
    Ok(Soak {
        backend: name,
        run_id: run.id.clone(),
        concurrency,
        soak_seconds: args.soak_seconds,
        window_seconds: args.window_seconds,
        fraction: args.fraction,
        probe,
        load,
        samples,
        drain,
        lost,
        stored_unacknowledged,
        exit,
    })
}

/// A gauge or count for a table: a whole number, or "–" when unread.
fn count(value: Option<f64>) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.0}"))
}

/// Milliseconds for a table.
fn ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "–".to_owned()
    }
}

impl Soak {
    fn sent(&self) -> usize {
        self.load.windows.iter().map(|w| w.sent).sum()
    }

    fn accepted(&self) -> usize {
        self.load.windows.iter().map(|w| w.accepted).sum()
    }

    fn shed(&self) -> usize {
        self.load.windows.iter().map(|w| w.shed).sum()
    }

    fn other_status(&self) -> usize {
        self.load.windows.iter().map(|w| w.other_status).sum()
    }

    fn failed(&self) -> usize {
        self.load.windows.iter().map(|w| w.failed).sum()
    }

    fn errors(&self) -> usize {
        self.shed() + self.other_status() + self.failed()
    }

    /// Requests shed from the start of the load until the queue drained.
    fn server_shed_total(&self) -> Option<f64> {
        let shed = |s: &Sample| s.metrics.map(|m| m.shed_total);
        Some(shed(&self.drain.sample)? - shed(self.start())?)
    }

    fn start(&self) -> &Sample {
        &self.samples[0]
    }

    fn end(&self) -> &Sample {
        self.samples.last().unwrap_or(self.start())
    }

    /// Start and end of window `k`, in seconds.
    fn bounds(&self, k: usize) -> (u64, u64) {
        let start = k as u64 * self.window_seconds;
        (start, (start + self.window_seconds).min(self.soak_seconds))
    }

    /// How much `reading` grew over window `k`, and in how many seconds.
    fn growth(&self, k: usize, reading: impl Fn(&Sample) -> Option<f64>) -> Option<(f64, f64)> {
        let (from, to) = (self.samples.get(k)?, self.samples.get(k + 1)?);
        Some((reading(to)? - reading(from)?, to.at_s - from.at_s))
    }

    /// Events stored per second during window `k`: the processor's pace, to set beside the
    /// offered rate (the queue grows exactly when this falls behind the 202s).
    fn stored_rate(&self, k: usize) -> f64 {
        self.growth(k, |s| s.stored.map(|n| n as f64))
            .map_or(f64::NAN, |(n, seconds)| n / seconds)
    }

    /// Requests the server's concurrency limit shed during window `k`, by its own counter.
    fn server_shed(&self, k: usize) -> Option<f64> {
        self.growth(k, |s| s.metrics.map(|m| m.shed_total))
            .map(|(n, _)| n)
    }

    /// The window table: the state before the load, each window's requests (by scheduled
    /// start) with the server's state at the window's end, and the state once drained.
    fn window_table(&self) -> String {
        let header = [
            "window (s)",
            "sent",
            "202",
            "errors",
            "503",
            "shed (server)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "conns",
            "RSS MB",
            "queue",
            "in flight",
            "DLQ",
            "stored/s",
        ];
        let mut right = [true; 15];
        right[0] = false;
        let server = |s: &Sample| {
            vec![
                count(s.metrics.and_then(|m| m.connections)),
                figure(s.rss_mb()),
                count(s.metrics.map(|m| m.pending)),
                count(s.metrics.map(|m| m.in_flight)),
                count(s.metrics.map(|m| m.dead_letters)),
            ]
        };
        let blank = || vec![String::new(); 8];
        let mut rows = Vec::new();
        let mut row = vec!["start".to_owned()];
        row.extend(blank());
        row.extend(server(self.start()));
        row.push(String::new());
        rows.push(row);
        for (k, w) in self.load.windows.iter().enumerate() {
            let (from, to) = self.bounds(k);
            let mut row = vec![
                format!("{from}–{to}"),
                w.sent.to_string(),
                w.accepted.to_string(),
                w.errors().to_string(),
                w.shed.to_string(),
                count(self.server_shed(k)),
                ms(w.p50_ms()),
                ms(w.p99_ms()),
                ms(w.max_ms()),
            ];
            if let Some(sample) = self.samples.get(k + 1) {
                row.extend(server(sample));
                row.push(figure(self.stored_rate(k)));
            }
            rows.push(row);
        }
        let mut row = vec![format!("drained, +{:.0} s", self.drain.seconds)];
        row.extend(blank());
        row.extend(server(&self.drain.sample));
        // Over a drain of a fraction of a second, a rate says nothing.
        let drained = match (self.end().stored, self.drain.sample.stored) {
            (Some(end), Some(drained)) if self.drain.seconds >= 1.0 => {
                drained.saturating_sub(end) as f64 / self.drain.seconds
            }
            _ => f64::NAN,
        };
        row.push(figure(drained));
        rows.push(row);
        markdown(&header, &right, rows)
    }

    /// The summary: what was asked, what was achieved, what drifted.
    fn summary_table(&self) -> String {
        let seconds = self.soak_seconds as f64;
        let probe = &self.probe;
        let overall = self.load.overall();
        let latency = |p50: f64, p99: f64| format!("{} / {} ms", ms(p50), ms(p99));
        let first = &self.load.windows[0];
        let last = self.load.windows.last().unwrap_or(first);
        let (last_from, last_to) = self.bounds(self.load.windows.len() - 1);
        let three = |f: &dyn Fn(&Sample) -> String| {
            format!(
                "{} → {} → {}",
                f(self.start()),
                f(self.end()),
                f(&self.drain.sample)
            )
        };
        let rows = [
            (
                "max ingest rate".to_owned(),
                format!(
                    "{:.0} events/s ({:.0} accepted, {:.0} stored per s in a {:.0} s probe, \
                     {} concurrent; {})",
                    probe.max_rate(),
                    probe.accept_rate,
                    probe.stored_rate,
                    probe.seconds,
                    self.concurrency,
                    probe.queue_note()
                ),
            ),
            (
                "target rate".to_owned(),
                format!("{:.0} events/s ({} × max)", self.load.rate, self.fraction),
            ),
            (
                "achieved rate".to_owned(),
                format!(
                    "{:.0} events/s (202s over {} s; {:.0} sent/s)",
                    self.accepted() as f64 / seconds,
                    self.soak_seconds,
                    self.sent() as f64 / seconds
                ),
            ),
            ("requests sent".to_owned(), self.sent().to_string()),
            ("202s".to_owned(), self.accepted().to_string()),
            (
                "errors".to_owned(),
                format!(
                    "{} ({:.1}% of requests; 503: {}, {:.1}/s; other status: {}; no answer: {})",
                    self.errors(),
                    100.0 * self.errors() as f64 / self.sent() as f64,
                    self.shed(),
                    self.shed() as f64 / seconds,
                    self.other_status(),
                    self.failed()
                ),
            ),
            (
                "503s shed by the concurrency limit".to_owned(),
                format!(
                    "{} by the server's fluxa_http_requests_shed_total (the rest of the 503s: \
                     a backend it found unavailable)",
                    count(self.server_shed_total())
                ),
            ),
            ("lost (202, never stored)".to_owned(), self.lost.to_string()),
            (
                "stored without a 202".to_owned(),
                self.stored_unacknowledged.to_string(),
            ),
            (
                "RSS MB: start → end of load → drained".to_owned(),
                three(&|s| figure(s.rss_mb())),
            ),
            (
                "queue + in flight: start → end of load → drained".to_owned(),
                three(&|s| count(s.backlog())),
            ),
            (
                "DLQ: start → end of load → drained".to_owned(),
                three(&|s| count(s.metrics.map(|q| q.dead_letters))),
            ),
            (
                "drain after the load".to_owned(),
                format!(
                    "{:.1} s{}",
                    self.drain.seconds,
                    if self.drain.complete {
                        ""
                    } else {
                        " (NOT drained: patience ran out)"
                    }
                ),
            ),
            (
                "p50 / p99, whole soak".to_owned(),
                latency(overall.p50_ms, overall.p99_ms),
            ),
            (
                format!("p50 / p99, first window (0–{} s)", self.bounds(0).1),
                latency(first.p50_ms(), first.p99_ms()),
            ),
            (
                format!("p50 / p99, last window ({last_from}–{last_to} s)"),
                latency(last.p50_ms(), last.p99_ms()),
            ),
            (
                "max latency".to_owned(),
                format!("{} ms", ms(overall.max_ms)),
            ),
            (
                "client send lag, max".to_owned(),
                format!("{:.1} ms", self.load.max_send_lag.as_secs_f64() * 1000.0),
            ),
            (
                "server exit on SIGTERM".to_owned(),
                match &self.exit {
                    Ok(()) => "clean".to_owned(),
                    Err(e) => e.clone(),
                },
            ),
        ];
        let rows = rows.into_iter().map(|(k, v)| vec![k, v]).collect();
        markdown(&["measure", "value"], &[false, false], rows)
    }

    fn markdown(&self) -> String {
        format!(
            "\nsoak run {}, {}: {} s open loop at {:.0} events/s ({} × max), {} s windows\n\n\
             {MAX_RATE_DEFINITION}.\n\n{}\n{}",
            self.run_id,
            self.backend,
            self.soak_seconds,
            self.load.rate,
            self.fraction,
            self.window_seconds,
            self.window_table(),
            self.summary_table()
        )
    }

    fn json(&self) -> Value {
        let overall = self.load.overall();
        let windows: Vec<Value> = self
            .load
            .windows
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let (from, to) = self.bounds(k);
                json!({
                    "from_s": from,
                    "to_s": to,
                    "sent": w.sent,
                    "accepted": w.accepted,
                    "errors": w.errors(),
                    "shed_503": w.shed,
                    "other_status": w.other_status,
                    "no_answer": w.failed,
                    "p50_ms": w.p50_ms(),
                    "p99_ms": w.p99_ms(),
                    "max_ms": w.max_ms(),
                    "stored_per_s": self.stored_rate(k),
                    "shed_by_server": self.server_shed(k),
                    "server_at_end": self.samples.get(k + 1).map(Sample::json),
                })
            })
            .collect();
        let last = self.load.windows.last();
        json!({
            "run": self.run_id,
            "backend": self.backend,
            "options": {
                "soak_seconds": self.soak_seconds,
                "window_seconds": self.window_seconds,
                "fraction": self.fraction,
                "probe_concurrency": self.concurrency,
            },
            "max_rate_definition": MAX_RATE_DEFINITION,
            "probe": self.probe.json(),
            "max_rate": self.probe.max_rate(),
            "target_rate": self.load.rate,
            "achieved_rate": self.accepted() as f64 / self.soak_seconds as f64,
            "sent": self.sent(),
            "accepted": self.accepted(),
            "errors": self.errors(),
            "shed_503": self.shed(),
            "shed_by_server": self.server_shed_total(),
            "other_status": self.other_status(),
            "no_answer": self.failed(),
            "lost": self.lost,
            "stored_without_202": self.stored_unacknowledged,
            "latency_ms": {
                "overall": {"p50": overall.p50_ms, "p99": overall.p99_ms, "max": overall.max_ms},
                "first_window": {
                    "p50": self.load.windows[0].p50_ms(),
                    "p99": self.load.windows[0].p99_ms(),
                },
                "last_window": {
                    "p50": last.map(|w| w.p50_ms()),
                    "p99": last.map(|w| w.p99_ms()),
                },
            },
            "max_send_lag_ms": self.load.max_send_lag.as_secs_f64() * 1000.0,
            "start": self.start().json(),
            "end": self.end().json(),
            "drained": {
                "seconds": self.drain.seconds,
                "complete": self.drain.complete,
                "server": self.drain.sample.json(),
            },
            "windows": windows,
            "clean_exit": self.exit.is_ok(),
            "exit_error": self.exit.as_ref().err(),
        })
    }
}

//! Fluxa's benchmark harness. Every figure is printed beside an anchor measured in the same run
//! on the same machine and disk, and judged as a ratio to it, because absolute numbers on a
//! noisy 2-core machine mean little. See docs/PERFORMANCE.md for what each figure means and the
//! numbers measured so far.
//!
//! It starts the `fluxa` binary as a child process (so the server is measured as deployed, and
//! memory is its own), on the embedded backend, on PostgreSQL, or both, and measures:
//!
//! 1. single-event requests end to end, from the first POST until the last event is stored;
//! 2. 100-event batches end to end;
//! 3. the drain rate of a `--role worker` process facing a small and a large backlog that a
//!    `--role api` process queued before it;
//! 4. p50/p99 latency of single-event ingest, open loop at half the rate measured in 1;
//!
//! plus peak memory under 10 MiB payloads. Anchors are in `anchors.rs`. It prints a table and
//! exits non-zero if a measurement failed, or, with `--strict`, if a target was missed.

mod anchors;
mod load;
mod report;
mod server;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};

use crate::anchors::{pgbench_anchors, sqlite_rows_per_second};
use crate::load::{open_loop, post_batches, post_singles};
use crate::report::{Row, Target};
use crate::server::{bench_database_name, Backend, Counter, Deployment, Progress, Role, Server};

#[derive(Parser, Debug)]
#[command(about = "Measure Fluxa against anchors measured in the same run")]
struct Args {
    /// Events per end-to-end measurement with 100-event batches.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events per end-to-end measurement with single-event requests [default: --events / 4].
    #[arg(long)]
    single_events: Option<usize>,
    /// Concurrent single-event requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Concurrent batch requests.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// Processor workers in the server under test [default: the server's own default].
    #[arg(long)]
    workers: Option<usize>,
    /// The small backlog a worker drains.
    #[arg(long, default_value_t = 10_000)]
    backlog_small: usize,
    /// The large backlog a worker drains.
    #[arg(long, default_value_t = 200_000)]
    backlog_large: usize,
    /// Which backends to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
    /// PostgreSQL database for the server under test. The harness DROPS it before every
    /// scenario (so its name must contain "bench") and creates `<name>_anchor` beside it for
    /// pgbench.
    #[arg(
        long,
        env = "FLUXA_BENCH_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/fluxa_bench"
    )]
    database_url: String,
    /// The `fluxa` binary to measure [default: `fluxa` beside this binary].
    #[arg(long)]
    fluxa_bin: Option<PathBuf>,
    /// The pgbench binary.
    #[arg(long, default_value = "pgbench")]
    pgbench: PathBuf,
    /// Seconds per pgbench anchor and for the SQLite 100-row anchor.
    #[arg(long, default_value_t = 10)]
    anchor_seconds: u64,
    /// Seconds of open-loop load for the latency figures.
    #[arg(long, default_value_t = 8)]
    latency_seconds: u64,
    /// Give up on an end-to-end measurement whose events are not all processed after this many
    /// seconds.
    #[arg(long, default_value_t = 600)]
    patience_seconds: u64,
    /// Stop timing a drain after this many seconds and report the rate so far, marked partial
    /// (a server whose drain slows as the backlog grows could otherwise take hours at 200k).
    #[arg(long, default_value_t = 150)]
    drain_seconds: u64,
    /// Exit non-zero when a target is missed (by default the table only marks it: the numbers
    /// are noisy).
    #[arg(long)]
    strict: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendChoice {
    Embedded,
    Postgres,
    Both,
}

/// Events per batch when filling a backlog: the fill is not timed, so use the largest batch
/// the API takes.
const FILL_BATCH: usize = 1000;
/// The issue's batch size for the end-to-end batch figure.
const BATCH: usize = 100;
/// The issue's latency target.
const P99_TARGET_MS: f64 = 10.0;

/// What every measurement of one run shares.
struct Run {
    args: Args,
    fluxa: PathBuf,
    scratch: tempfile::TempDir,
    /// Prefix of every event id, so ids are unique per run.
    id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fluxa = match &args.fluxa_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("fluxa"),
    };
    if !fluxa.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p fluxa`, or pass --fluxa-bin",
            fluxa.display()
        );
    }
    let mut backends = Vec::new();
    if args.backend != BackendChoice::Postgres {
        backends.push(Backend::Embedded);
    }
    if args.backend != BackendChoice::Embedded {
        bench_database_name(&args.database_url)?;
        backends.push(Backend::Postgres {
            url: args.database_url.clone(),
        });
    }
    let run = Run {
        fluxa,
        // Beside the OS's temp folder, on the disk the anchors measure.
        scratch: tempfile::tempdir_in(std::env::temp_dir())?,
        id: run_id(),
        args,
    };
    eprintln!(
        "run {}: measuring {} in {}",
        run.id,
        run.fluxa.display(),
        run.scratch.path().display()
    );

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for backend in &backends {
        // One backend failing (PostgreSQL down, say) should not hide the other's figures.
        if let Err(e) = measure_backend(&run, backend, &mut rows).await {
            eprintln!("{}: measurement failed: {e:#}", backend.name());
            failures.push(format!("{}: {e:#}", backend.name()));
        }
    }

    println!(
        "\nrun {}, {} concurrent single-event requests, {} concurrent batches, workers: {}\n",
        run.id,
        run.args.concurrency,
        run.args.batch_concurrency,
        run.args
            .workers
            .map_or("server default".to_owned(), |w| w.to_string()),
    );
    print!("{}", report::table(&rows));
    let missed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.target.as_ref().is_some_and(|t| !t.met))
        .collect();
    let n_targets = rows.iter().filter(|r| r.target.is_some()).count();
    println!("\n{} of {n_targets} targets met", n_targets - missed.len());
    if !failures.is_empty() {
        bail!("{} backend(s) could not be measured", failures.len());
    }
    if run.args.strict && !missed.is_empty() {
        bail!("{} target(s) missed", missed.len());
    }
    Ok(())
}

/// A prefix no earlier run used: seconds since the epoch and the process id.
fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("r{secs:x}{:x}", std::process::id())
}

/// The anchors a backend's figures are divided by.
struct Anchors {
    /// For batches and drains.
    batch: (String, f64),
    /// For single-event requests.
    single: (String, f64),
    /// For latencies, in ms.
    latency: (String, f64),
    /// The issue's targets for batches and single events, as ratios.
    batch_target: f64,
    single_target: f64,
}

async fn measure_anchors(run: &Run, backend: &Backend) -> anyhow::Result<Anchors> {
    let seconds = run.args.anchor_seconds;
    match backend {
        Backend::Embedded => {
            let dir = run.scratch.path().join("sqlite-anchors");
            std::fs::create_dir_all(&dir)?;
            let hundred = sqlite_rows_per_second(&dir, 100, Duration::from_secs(seconds)).await?;
            eprintln!("  SQLite 100 rows/txn: {hundred:.0} rows/s");
            let one = sqlite_rows_per_second(&dir, 1, Duration::from_secs(seconds.min(3))).await?;
            eprintln!("  SQLite 1 row/txn: {one:.0} rows/s");
            Ok(Anchors {
                batch: ("SQLite 100 rows/txn".to_owned(), hundred),
                single: ("SQLite 100 rows/txn".to_owned(), hundred),
                latency: ("one SQLite commit (ms)".to_owned(), 1000.0 / one),
                batch_target: 0.4,
                single_target: 0.2,
            })
        }
        Backend::Postgres { url } => {
            let pg = pgbench_anchors(&run.args.pgbench, url, seconds, run.scratch.path()).await?;
            eprintln!(
                "  pgbench 1 row/txn: {:.0} rows/s ({:.2} ms/txn); 100 rows/txn: {:.0} rows/s",
                pg.one_row.rows_per_s, pg.one_row.latency_ms, pg.hundred_rows.rows_per_s
            );
            Ok(Anchors {
                batch: (
                    "pgbench 100 rows/txn".to_owned(),
                    pg.hundred_rows.rows_per_s,
                ),
                single: ("pgbench 1 row/txn".to_owned(), pg.one_row.rows_per_s),
                latency: (
                    "pgbench 1 row/txn latency (ms)".to_owned(),
                    pg.one_row.latency_ms,
                ),
                batch_target: 0.15,
                single_target: 0.6,
            })
        }
    }
}

/// Measures one backend, appending its rows as they are measured.
async fn measure_backend(run: &Run, backend: &Backend, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let args = &run.args;
    let name = backend.name();
    let patience = Duration::from_secs(args.patience_seconds);
    let row = |measure: String, value: f64, unit, anchor: &(String, f64), target| Row {
        backend: name,
        measure,
        value,
        unit,
        anchor: anchor.0.clone(),
        anchor_value: anchor.1,
        target,
    };

    eprintln!("{name}: measuring anchors…");
    let anchors = measure_anchors(run, backend).await?;

    let n = args.single_events.unwrap_or(args.events / 4).max(1);
    eprintln!("{name}: {n} single-event requests, end to end…");
    let (ingest_rate, rate) = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "single").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        let counter = Counter::open(&deployment).await?;
        let started = Instant::now();
        let prefix = format!("{}-single", run.id);
        let accepted_in = post_singles(
            &server.client,
            &server.base_url(),
            &prefix,
            n,
            args.concurrency,
        )
        .await?;
        let processed = counter
            .wait_for(n as u64, started, patience)
            .await?
            .completed()?;
        server.stop().await?;
        (n as f64 / accepted_in.as_secs_f64(), processed.rate())
    };
    eprintln!("  {rate:.0} events/s end to end, {ingest_rate:.0} events/s accepted");
    let target = Target::ratio_at_least(rate / anchors.single.1, anchors.single_target);
    rows.push(row(
        "single events, end to end".to_owned(),
        rate,
        "events/s",
        &anchors.single,
        Some(target),
    ));
    rows.push(row(
        "single events, ingest only (all 202s)".to_owned(),
        ingest_rate,
        "events/s",
        &anchors.single,
        None,
    ));

    let n = args.events;
    eprintln!("{name}: {n} events in {BATCH}-event batches, end to end…");
    let (ingest_rate, rate) = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "batches").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        let counter = Counter::open(&deployment).await?;
        let started = Instant::now();
        let prefix = format!("{}-batch", run.id);
        let accepted_in = post_batches(
            &server.client,
            &server.base_url(),
            &prefix,
            n,
            BATCH,
            args.batch_concurrency,
        )
        .await?;
        let processed = counter
            .wait_for(n as u64, started, patience)
            .await?
            .completed()?;
        server.stop().await?;
        (n as f64 / accepted_in.as_secs_f64(), processed.rate())
    };
    eprintln!("  {rate:.0} events/s end to end, {ingest_rate:.0} events/s accepted");
    let target = Target::ratio_at_least(rate / anchors.batch.1, anchors.batch_target);
    rows.push(row(
        format!("{BATCH}-event batches, end to end"),
        rate,
        "events/s",
        &anchors.batch,
        Some(target),
    ));
    rows.push(row(
        format!("{BATCH}-event batches, ingest only"),
        ingest_rate,
        "events/s",
        &anchors.batch,
        None,
    ));

    let mut drains = Vec::new();
    for backlog in [args.backlog_small, args.backlog_large] {
        eprintln!("{name}: draining a backlog of {backlog}…");
        let drained = drain(run, backend, backlog).await?;
        let partial = if drained.complete {
            String::new()
        } else {
            format!(
                " (partial: {} in {:.0} s)",
                drained.processed,
                drained.elapsed.as_secs_f64()
            )
        };
        eprintln!("  {:.0} events/s{partial}", drained.rate());
        rows.push(row(
            format!("drain, {} backlog{partial}", thousands(backlog)),
            drained.rate(),
            "events/s",
            &anchors.batch,
            None,
        ));
        drains.push(drained.rate());
    }
    let small = (
        format!("drain, {} backlog", thousands(args.backlog_small)),
        drains[0],
    );
    rows.push(row(
        format!(
            "drain, {} : {} backlog",
            thousands(args.backlog_large),
            thousands(args.backlog_small)
        ),
        drains[1],
        "events/s",
        &small,
        Some(Target::ratio_at_least(drains[1] / drains[0], 0.9)),
    ));

    let rate = (ingest_rate_single(rows, name) / 2.0).max(1.0);
    eprintln!(
        "{name}: single-event ingest latency, open loop at {rate:.0}/s for {} s…",
        args.latency_seconds
    );
    let latency = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "latency").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        // Connections are opened once in real clients; do not time their setup.
        let warm_up = format!("{}-warm-up", run.id);
        post_singles(&server.client, &server.base_url(), &warm_up, 64, 16).await?;
        let prefix = format!("{}-latency", run.id);
        let duration = Duration::from_secs(args.latency_seconds);
        let latency =
            open_loop(&server.client, &server.base_url(), &prefix, rate, duration).await?;
        server.stop().await?;
        latency
    };
    eprintln!(
        "  p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors of {}",
        latency.p50_ms, latency.p99_ms, latency.max_ms, latency.errors, latency.sent
    );
    rows.push(row(
        format!("p50 single-event ingest at {:.0}/s", latency.rate),
        latency.p50_ms,
        "ms",
        &anchors.latency,
        None,
    ));
    rows.push(row(
        format!(
            "p99 single-event ingest at {:.0}/s, {} errors of {}",
            latency.rate, latency.errors, latency.sent
        ),
        latency.p99_ms,
        "ms",
        &anchors.latency,
        Some(Target {
            text: format!("≤ {P99_TARGET_MS} ms, 0 errors"),
            met: latency.p99_ms <= P99_TARGET_MS && latency.errors == 0,
        }),
    ));

    eprintln!("{name}: peak memory under 10 MiB payloads…");
    let (peak_extra, in_flight) = peak_extra_memory(run, backend).await?;
    let ratio = peak_extra / in_flight;
    rows.push(row(
        "peak extra memory, 4 × 10 MiB in flight".to_owned(),
        peak_extra / 1e6,
        "MB",
        &("bytes in flight (MB)".to_owned(), in_flight / 1e6),
        // Each request's body is held once (blob writes and messages borrow from it).
        Some(Target {
            text: "≤ 2.5".to_owned(),
            met: ratio <= 2.5,
        }),
    ));
    Ok(())
}

/// The single-event ingest rate this backend just measured.
fn ingest_rate_single(rows: &[Row], backend: &str) -> f64 {
    rows.iter()
        .find(|r| r.backend == backend && r.measure.starts_with("single events, ingest"))
        .map_or(1.0, |r| r.value)
}

/// Queues `backlog` events through a `--role api` server, stops it, then times a
/// `--role worker` server from its start until every event is stored, or for `--drain-seconds`.
async fn drain(run: &Run, backend: &Backend, backlog: usize) -> anyhow::Result<Progress> {
    let args = &run.args;
    let deployment =
        Deployment::fresh(backend, run.scratch.path(), &format!("drain-{backlog}")).await?;
    let api = Server::start(&run.fluxa, &deployment, Role::Api, args.workers).await?;
    let prefix = format!("{}-drain-{backlog}", run.id);
    let filled_in = post_batches(
        &api.client,
        &api.base_url(),
        &prefix,
        backlog,
        FILL_BATCH,
        args.batch_concurrency,
    )
    .await?;
    eprintln!("  queued in {:.1} s", filled_in.as_secs_f64());
    api.stop()
        .await
        .context("the api server did not stop cleanly")?;
    let worker = Server::start(&run.fluxa, &deployment, Role::Worker, args.workers).await?;
    // From `fluxa started`, logged just before the workers begin: process start-up is not
    // draining, and counting it would favour the large backlog in the ratio.
    let started = Instant::now();
    let counter = Counter::open(&deployment).await?;
    let limit = Duration::from_secs(args.drain_seconds);
    let drained = counter.wait_for(backlog as u64, started, limit).await?;
    worker
        .stop()
        .await
        .context("the worker did not stop cleanly")?;
    Ok(drained)
}

/// Peak memory beyond the idle server's while 4 requests of 10 MiB each are in flight (8 sent,
/// 4 at a time), and those 4 requests' bytes.
async fn peak_extra_memory(run: &Run, backend: &Backend) -> anyhow::Result<(f64, f64)> {
    let deployment = Deployment::fresh(backend, run.scratch.path(), "memory").await?;
    let server = Server::start(&run.fluxa, &deployment, Role::Api, run.args.workers).await?;
    let baseline = server.peak_rss_bytes()?;
    let payload_len = 10 * 1024 * 1024 - 1024;
    let n_parallel = 4;
    let payload = "x".repeat(payload_len - 2);
    let url = format!("{}/v1/events", server.base_url());
    let posts = (0..n_parallel * 2).map(|i| {
        let body = format!(
            r#"{{"event_id":"{}-big-{i}","event_type":"bench","payload":"{payload}"}}"#,
            run.id
        );
        let request = server
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let status = request.send().await?.status();
            if status != 202 {
                bail!("a 10 MiB event was answered {status}");
            }
            anyhow::Ok(())
        }
    });
    let _: Vec<()> = futures::stream::iter(posts)
        .buffer_unordered(n_parallel)
        .try_collect()
        .await?;
    let peak = server.peak_rss_bytes()?;
    server.stop().await?;
    Ok((
        peak.saturating_sub(baseline) as f64,
        (n_parallel * payload_len) as f64,
    ))
}

/// 10000 → "10k", 200000 → "200k", 1500 → "1500".
fn thousands(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

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
//!
//! `fluxa-bench soak` instead holds one backend at a fraction of its maximum ingest rate for
//! minutes and reports drift window by window (`soak.rs`).

mod anchors;
mod load;
mod operate;
mod report;
mod server;
mod soak;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use futures::{StreamExt, TryStreamExt};

use crate::anchors::{pgbench_anchors, sqlite_rows_per_second};
use crate::load::{open_loop, post_batches, post_singles, OpenLoop};
use crate::report::{AnchorRow, Row, Target};
use crate::server::{bench_database_name, Backend, Counter, Deployment, Progress, Role, Server};

#[derive(Parser, Debug)]
#[command(about = "Measure Fluxa against anchors measured in the same run")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Events per end-to-end measurement with 100-event batches.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events per end-to-end measurement with single-event requests [default: --events / 4].
    #[arg(long)]
    single_events: Option<usize>,
    /// Concurrent single-event requests.
    #[arg(long, global = true, default_value_t = 32)]
    concurrency: usize,
    /// Concurrent batch requests.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// Processor workers in the server under test [default: the server's own default].
    #[arg(long, global = true)]
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
        global = true,
        env = "FLUXA_BENCH_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/fluxa_bench"
    )]
    database_url: String,
    /// The `fluxa` binary to measure [default: `fluxa` beside this binary].
    #[arg(long, global = true)]
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
    #[arg(long, global = true, default_value_t = 600)]
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Hold one backend at a fraction of its maximum ingest rate (measured first) for minutes,
    /// open loop, and report latency, errors, memory and queue depth window by window.
    Soak(soak::SoakArgs),
    /// Measure `fluxa import` of a large file and ingest while the retention pruner deletes a
    /// large table, beside their anchors.
    Operate(operate::OperateArgs),
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
    let mut args = Args::parse();
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
    let command = args.command.take();
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
    match &command {
        Some(Command::Soak(soak)) => return soak::run(&run, soak).await,
        Some(Command::Operate(operate)) => return operate::run(&run, operate).await,
        None => {}
    }

    let mut backends = Vec::new();
    if run.args.backend != BackendChoice::Postgres {
        backends.push(Backend::Embedded);
    }
    if run.args.backend != BackendChoice::Embedded {
        bench_database_name(&run.args.database_url)?;
        backends.push(Backend::Postgres {
            url: run.args.database_url.clone(),
        });
    }
    let mut rows = Vec::new();
    let mut anchors = Vec::new();
    let mut failures = Vec::new();
    for backend in &backends {
        // One backend failing (PostgreSQL down, say) should not hide the other's figures.
        match measure_backend(&run, backend).await {
            Ok((backend_rows, backend_anchors)) => {
                rows.extend(backend_rows);
                anchors.extend(backend_anchors);
            }
            Err(e) => {
                eprintln!("{}: measurement failed: {e:#}", backend.name());
                failures.push(backend.name());
            }
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
    println!("\nanchors, measured before and after each backend's figures (the mean is used):\n");
    print!("{}", report::anchor_table(&anchors));
    let missed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.target.as_ref().is_some_and(|t| !t.met))
        .collect();
    let n_targets = rows.iter().filter(|r| r.target.is_some()).count();
    println!("\n{} of {n_targets} targets met", n_targets - missed.len());
    if !failures.is_empty() {
        bail!("not measured: {}", failures.join(", "));
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

/// One backend's anchor readings, by name, from one pass.
type Readings = Vec<(&'static str, f64)>;

/// Measures a backend's anchors once. Each backend measures them before and after its figures,
/// since a neighbour's burst of disk writes can change fsync costs several-fold within minutes.
async fn measure_anchors(run: &Run, backend: &Backend) -> anyhow::Result<Readings> {
    let seconds = run.args.anchor_seconds;
    match backend {
        Backend::Embedded => {
            let dir = tempfile::tempdir_in(run.scratch.path())?;
            let hundred =
                sqlite_rows_per_second(dir.path(), 100, Duration::from_secs(seconds)).await?;
            let one =
                sqlite_rows_per_second(dir.path(), 1, Duration::from_secs(seconds.min(3))).await?;
            eprintln!("  SQLite: 100 rows/txn {hundred:.0} rows/s; 1 row/txn {one:.0} rows/s");
            Ok(vec![
                (SQLITE_100, hundred),
                (SQLITE_1, one),
                (SQLITE_COMMIT_MS, 1000.0 / one),
            ])
        }
        Backend::Postgres { url } => {
            let pg = pgbench_anchors(&run.args.pgbench, url, seconds, run.scratch.path()).await?;
            eprintln!(
                "  pgbench: 1 row/txn {:.0} rows/s ({:.2} ms/txn); 100 rows/txn {:.0} rows/s",
                pg.one_row.rows_per_s, pg.one_row.latency_ms, pg.hundred_rows.rows_per_s
            );
            Ok(vec![
                (PGBENCH_1, pg.one_row.rows_per_s),
                (PGBENCH_1_MS, pg.one_row.latency_ms),
                (PGBENCH_100, pg.hundred_rows.rows_per_s),
            ])
        }
    }
}

const SQLITE_100: &str = "SQLite 100 rows/txn";
const SQLITE_1: &str = "SQLite 1 row/txn";
const SQLITE_COMMIT_MS: &str = "one SQLite commit (ms)";
const PGBENCH_1: &str = "pgbench 1 row/txn";
const PGBENCH_1_MS: &str = "pgbench 1 row/txn latency (ms)";
const PGBENCH_100: &str = "pgbench 100 rows/txn";

/// Which anchor each figure of a backend is divided by, and the issue's targets.
struct Plan {
    /// For batches and drains (rows/s).
    batch: &'static str,
    /// For single-event requests (rows/s).
    single: &'static str,
    /// For latencies (ms).
    latency: &'static str,
    batch_target: f64,
    single_target: f64,
}

fn plan(backend: &Backend) -> Plan {
    match backend {
        Backend::Embedded => Plan {
            batch: SQLITE_100,
            single: SQLITE_100,
            latency: SQLITE_COMMIT_MS,
            batch_target: 0.4,
            single_target: 0.2,
        },
        Backend::Postgres { .. } => Plan {
            batch: PGBENCH_100,
            single: PGBENCH_1,
            latency: PGBENCH_1_MS,
            batch_target: 0.15,
            single_target: 0.6,
        },
    }
}

/// What Fluxa did on one backend.
struct Figures {
    single_end_to_end: f64,
    single_ingest: f64,
    batch_end_to_end: f64,
    batch_ingest: f64,
    /// Backlog and how its drain went, small then large.
    drains: Vec<(usize, Progress)>,
    latency: OpenLoop,
    /// Peak extra memory and the bytes in flight that caused it.
    memory: (f64, f64),
}

/// Measures one backend: anchors, Fluxa's figures, anchors again.
async fn measure_backend(
    run: &Run,
    backend: &Backend,
) -> anyhow::Result<(Vec<Row>, Vec<AnchorRow>)> {
    let name = backend.name();
    eprintln!("{name}: measuring anchors…");
    let before = measure_anchors(run, backend).await?;
    let figures = measure_figures(run, backend).await?;
    eprintln!("{name}: measuring anchors again…");
    let after = measure_anchors(run, backend).await?;
    if let Backend::Postgres { url } = backend {
        server::drop_database(url).await?;
    }
    let anchors: Vec<AnchorRow> = before
        .iter()
        .zip(&after)
        .map(|(&(anchor, before), &(_, after))| AnchorRow {
            backend: name,
            anchor,
            before,
            after,
        })
        .collect();
    let rows = rows(name, &plan(backend), &figures, &anchors);
    Ok((rows, anchors))
}

/// The report's rows for one backend's figures.
fn rows(backend: &'static str, plan: &Plan, figures: &Figures, anchors: &[AnchorRow]) -> Vec<Row> {
    let anchor = |name: &str| {
        let value = anchors
            .iter()
            .find(|a| a.anchor == name)
            .map_or(f64::NAN, AnchorRow::value);
        (name.to_owned(), value)
    };
    let row = |measure: String, value: f64, unit, (anchor, anchor_value): (String, f64)| Row {
        backend,
        measure,
        value,
        unit,
        anchor,
        anchor_value,
        target: None,
    };
    let with_target = |mut row: Row, target: Target| {
        row.target = Some(target);
        row
    };
    let ratio_at_least = |row: Row, min: f64| {
        let target = Target::ratio_at_least(row.ratio(), min);
        with_target(row, target)
    };

    let mut rows = vec![
        ratio_at_least(
            row(
                "single events, end to end".to_owned(),
                figures.single_end_to_end,
                "events/s",
                anchor(plan.single),
            ),
            plan.single_target,
        ),
        row(
            "single events, ingest only (all 202s)".to_owned(),
            figures.single_ingest,
            "events/s",
            anchor(plan.single),
        ),
        ratio_at_least(
            row(
                format!("{BATCH}-event batches, end to end"),
                figures.batch_end_to_end,
                "events/s",
                anchor(plan.batch),
            ),
            plan.batch_target,
        ),
        row(
            format!("{BATCH}-event batches, ingest only"),
            figures.batch_ingest,
            "events/s",
            anchor(plan.batch),
        ),
    ];
    for (backlog, drained) in &figures.drains {
        let partial = if drained.complete {
            String::new()
        } else {
            format!(
                " (partial: {} in {:.0} s)",
                drained.processed,
                drained.elapsed.as_secs_f64()
            )
        };
        rows.push(row(
            format!("drain, {} backlog{partial}", thousands(*backlog)),
            drained.rate(),
            "events/s",
            anchor(plan.batch),
        ));
    }
    if let [(small, small_drain), (large, large_drain)] = figures.drains.as_slice() {
        rows.push(ratio_at_least(
            row(
                format!(
                    "drain, {} : {} backlog",
                    thousands(*large),
                    thousands(*small)
                ),
                large_drain.rate(),
                "events/s",
                (
                    format!("drain, {} backlog", thousands(*small)),
                    small_drain.rate(),
                ),
            ),
            0.9,
        ));
    }
    let latency = &figures.latency;
    rows.push(row(
        format!("p50 single-event ingest at {:.0}/s", latency.rate),
        latency.p50_ms,
        "ms",
        anchor(plan.latency),
    ));
    rows.push(with_target(
        row(
            format!(
                "p99 single-event ingest at {:.0}/s, {} errors of {}",
                latency.rate, latency.errors, latency.sent
            ),
            latency.p99_ms,
            "ms",
            anchor(plan.latency),
        ),
        Target {
            text: format!("≤ {P99_TARGET_MS} ms, 0 errors"),
            met: latency.p99_ms <= P99_TARGET_MS && latency.errors == 0,
        },
    ));
    let (peak_extra, in_flight) = figures.memory;
    let memory = row(
        "peak extra memory, 4 × 10 MiB in flight".to_owned(),
        peak_extra / 1e6,
        "MB",
        ("bytes in flight (MB)".to_owned(), in_flight / 1e6),
    );
    // Each request's body is held once (blob writes and messages borrow from it).
    let target = Target {
        text: "≤ 2.5".to_owned(),
        met: memory.ratio() <= 2.5,
    };
    rows.push(with_target(memory, target));
    rows
}

/// Measures Fluxa's figures on one backend, each scenario on an empty deployment.
async fn measure_figures(run: &Run, backend: &Backend) -> anyhow::Result<Figures> {
    let args = &run.args;
    let name = backend.name();
    let patience = Duration::from_secs(args.patience_seconds);

    let n = args.single_events.unwrap_or(args.events / 4).max(1);
    eprintln!("{name}: {n} single-event requests, end to end…");
    let (single_ingest, single_end_to_end) = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "single").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        let counter = Counter::open(&deployment).await?;
        let started = Instant::now();
        let prefix = format!("{}-single", run.id);
        let url = server.base_url();
        let accepted_in = post_singles(&server.client, &url, &prefix, n, args.concurrency).await?;
        let processed = counter
            .wait_for(n as u64, started, patience)
            .await?
            .completed()?;
        server.stop().await?;
        (n as f64 / accepted_in.as_secs_f64(), processed.rate())
    };
    eprintln!("  {single_end_to_end:.0} events/s end to end, {single_ingest:.0} accepted");

    let n = args.events;
    eprintln!("{name}: {n} events in {BATCH}-event batches, end to end…");
    let (batch_ingest, batch_end_to_end) = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "batches").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        let counter = Counter::open(&deployment).await?;
        let started = Instant::now();
        let prefix = format!("{}-batch", run.id);
        let url = server.base_url();
        let concurrency = args.batch_concurrency;
        let accepted_in =
            post_batches(&server.client, &url, &prefix, n, BATCH, concurrency).await?;
        let processed = counter
            .wait_for(n as u64, started, patience)
            .await?
            .completed()?;
        server.stop().await?;
        (n as f64 / accepted_in.as_secs_f64(), processed.rate())
    };
    eprintln!("  {batch_end_to_end:.0} events/s end to end, {batch_ingest:.0} accepted");

    let mut drains = Vec::new();
    for backlog in [args.backlog_small, args.backlog_large] {
        eprintln!("{name}: draining a backlog of {backlog}…");
        let drained = drain(run, backend, backlog).await?;
        eprintln!(
            "  {:.0} events/s ({} in {:.1} s)",
            drained.rate(),
            drained.processed,
            drained.elapsed.as_secs_f64()
        );
        drains.push((backlog, drained));
    }

    let rate = (single_ingest / 2.0).max(1.0);
    eprintln!(
        "{name}: single-event ingest latency, open loop at {rate:.0}/s for {} s…",
        args.latency_seconds
    );
    let latency = {
        let deployment = Deployment::fresh(backend, run.scratch.path(), "latency").await?;
        let server = Server::start(&run.fluxa, &deployment, Role::All, args.workers).await?;
        let url = server.base_url();
        // Real clients keep their connections; do not time opening them.
        let warm_up = format!("{}-warm-up", run.id);
        post_singles(&server.client, &url, &warm_up, 64, 16).await?;
        let prefix = format!("{}-latency", run.id);
        let duration = Duration::from_secs(args.latency_seconds);
        let latency = open_loop(&server.client, &url, &prefix, rate, duration).await?;
        server.stop().await?;
        latency
    };
    eprintln!(
        "  p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors of {}",
        latency.p50_ms, latency.p99_ms, latency.max_ms, latency.errors, latency.sent
    );

    eprintln!("{name}: peak memory under 10 MiB payloads…");
    let memory = peak_extra_memory(run, backend).await?;
    Ok(Figures {
        single_end_to_end,
        single_ingest,
        batch_end_to_end,
        batch_ingest,
        drains,
        latency,
        memory,
    })
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

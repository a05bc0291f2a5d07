//! `fluxa-bench operate`: the operator-side figures of docs/PERFORMANCE.md, each beside its
//! same-run anchor.
//!
//! 1. `fluxa import` of a large NDJSON file (1M events by default) straight into the backend
//!    (no server), against the backend's batch anchor (SQLite 100 rows per transaction,
//!    pgbench 100 rows per transaction): the import goes through the batch ingest handler, so
//!    it should run at a fair fraction of the anchor.
//! 2. Ingest while the retention pruner deletes that large table: a server drains the imported
//!    backlog, then ingest throughput (100-event batches) and the time to process what was
//!    ingested are measured twice, with retention off and with every event past its retention,
//!    and reported as a ratio, beside how many rows the pruner deleted during the window.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::anchors::{pgbench_anchors, sqlite_rows_per_second};
use crate::load::{event_json, post_batches};
use crate::report::{self, figure, Row, Target};
use crate::server::{gauge, Backend, Counter, Deployment, Role, Server};
use crate::{BackendChoice, Run};

#[derive(Args, Debug, Clone)]
pub struct OperateArgs {
    /// Events in the NDJSON file `fluxa import` loads.
    #[arg(long, default_value_t = 1_000_000)]
    import_events: usize,
    /// Events ingested (100 per batch) in each of the two pruning windows.
    #[arg(long, default_value_t = 50_000)]
    ingest_events: usize,
    /// Which backends to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
}

/// The issue asks that pruning not stall ingest: at least this ratio of the throughput
/// without it.
const PRUNE_TARGET: f64 = 0.8;

pub async fn run(run: &Run, args: &OperateArgs) -> anyhow::Result<()> {
    let mut backends = Vec::new();
    if args.backend != BackendChoice::Postgres {
        backends.push(Backend::Embedded);
    }
    if args.backend != BackendChoice::Embedded {
        backends.push(Backend::Postgres {
            url: run.args.database_url.clone(),
        });
    }
    let file = run.scratch.path().join("import.ndjson");
    write_ndjson(&file, &run.id, args.import_events)?;
    let mut rows = Vec::new();
    for backend in &backends {
        eprintln!("{}: operator figures", backend.name());
        rows.extend(measure(run, args, backend, &file).await?);
    }
    println!(
        "\nrun {}, import of {} events\n",
        run.id, args.import_events
    );
    print!("{}", report::table(&rows));
    Ok(())
}

fn write_ndjson(path: &Path, prefix: &str, n: usize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        writeln!(out, "{}", event_json(&format!("{prefix}-imp-{i}")))?;
    }
    out.flush()?;
    Ok(())
}

async fn measure(
    run: &Run,
    args: &OperateArgs,
    backend: &Backend,
    file: &Path,
) -> anyhow::Result<Vec<Row>> {
    let deployment = Deployment::fresh(backend, run.scratch.path(), "operate").await?;
    let name = backend.name();

    // 1. The import, with no server running: the store's own rate, nothing else competing.
    let started = Instant::now();
    let summary = import(run, &deployment, file).await?;
    let import_seconds = started.elapsed().as_secs_f64();
    let accepted = summary["accepted"].as_u64().unwrap_or(0);
    if accepted != args.import_events as u64 {
        bail!(
            "the import accepted {accepted} of {} events",
            args.import_events
        );
    }
    let import_rate = accepted as f64 / import_seconds;
    eprintln!("  import: {accepted} events in {import_seconds:.1} s ({import_rate:.0}/s)");
    let (anchor, anchor_value) = anchor(run, backend).await?;

    // 2. Drain the backlog into the store, so the pruner has a large table to delete.
    let server = Server::start(&run.fluxa, &deployment, Role::All, run.args.workers).await?;
    let counter = Counter::open(&deployment).await?;
    let drained = counter
        .wait_for(
            args.import_events as u64,
            Instant::now(),
            Duration::from_secs(run.args.patience_seconds),
        )
        .await?
        .completed()?;
    eprintln!(
        "  drained {} events in {:.1} s",
        drained.processed,
        drained.elapsed.as_secs_f64()
    );
    let base = ingest_window(&server, &format!("{}-base", run.id), args.ingest_events).await?;
    server.stop().await?;
    eprintln!(
        "  retention off: ingest {:.0}/s, processed {:.1} s after the last accept",
        base.rate, base.settle_seconds
    );

    let server = Server::start_with(
        &run.fluxa,
        &deployment,
        Role::All,
        run.args.workers,
        &["--retention-events", "1s", "--prune-interval", "1s"],
    )
    .await?;
    // Give the pruner its first pass before the window opens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pruned_before = pruned(&server).await?;
    let pruning = ingest_window(&server, &format!("{}-prune", run.id), args.ingest_events).await?;
    let pruned_during = pruned(&server).await? - pruned_before;
    server.stop().await?;
    eprintln!(
        "  pruning: ingest {:.0}/s, processed {:.1} s after the last accept, {pruned_during:.0} rows pruned meanwhile",
        pruning.rate, pruning.settle_seconds
    );
    if pruned_during < 1.0 {
        bail!("the pruner deleted nothing during the window: the figure would mean nothing");
    }

    let ratio = pruning.rate / base.rate;
    Ok(vec![
        Row {
            backend: name,
            measure: format!("import of {} events (events/s)", args.import_events),
            value: import_rate,
            unit: "/s",
            anchor,
            anchor_value,
            target: None,
        },
        Row {
            backend: name,
            measure: format!(
                "ingest while pruning ({} rows pruned in the window)",
                figure(pruned_during)
            ),
            value: pruning.rate,
            unit: "/s",
            anchor: "ingest with retention off".to_owned(),
            anchor_value: base.rate,
            target: Some(Target::ratio_at_least(ratio, PRUNE_TARGET)),
        },
        Row {
            backend: name,
            measure: "processing done after the last accept, pruning (s)".to_owned(),
            value: pruning.settle_seconds,
            unit: "s",
            anchor: "the same, retention off (s)".to_owned(),
            anchor_value: base.settle_seconds.max(0.001),
            target: None,
        },
    ])
}

/// `fluxa import FILE --json` on the deployment; returns its summary object.
async fn import(run: &Run, deployment: &Deployment, file: &Path) -> anyhow::Result<Value> {
    let mut command = tokio::process::Command::new(&run.fluxa);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLUXA_") {
            command.env_remove(key);
        }
    }
    command
        .arg("import")
        .arg(file)
        .arg("--json")
        .arg("--data-dir")
        .arg(&deployment.data_dir)
        .stderr(std::process::Stdio::inherit());
    if let Some(url) = &deployment.database_url {
        command.env("FLUXA_DATABASE_URL", url);
    }
    let output = command.output().await.context("cannot run fluxa import")?;
    if !output.status.success() {
        bail!("fluxa import exited with {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .last()
        .context("fluxa import printed nothing")?;
    let line: Value = serde_json::from_str(last)?;
    Ok(line["summary"].clone())
}

async fn anchor(run: &Run, backend: &Backend) -> anyhow::Result<(String, f64)> {
    let seconds = run.args.anchor_seconds;
    Ok(match backend {
        Backend::Embedded => {
            let dir = tempfile::tempdir_in(run.scratch.path())?;
            let rate =
                sqlite_rows_per_second(dir.path(), 100, Duration::from_secs(seconds)).await?;
            ("SQLite 100 rows/txn".to_owned(), rate)
        }
        Backend::Postgres { url } => {
            let pg = pgbench_anchors(&run.args.pgbench, url, seconds, run.scratch.path()).await?;
            (
                "pgbench 100 rows/txn".to_owned(),
                pg.hundred_rows.rows_per_s,
            )
        }
    })
}

/// One window of ingest: its accept rate, and how long after the last accept the queue was
/// empty again (processing kept up, or not).
struct Window {
    rate: f64,
    settle_seconds: f64,
}

async fn ingest_window(server: &Server, prefix: &str, n: usize) -> anyhow::Result<Window> {
    let took = post_batches(&server.client, &server.base_url(), prefix, n, 100, 4).await?;
    let accepted_at = Instant::now();
    loop {
        let scrape = server.scrape().await?;
        if scrape.pending + scrape.in_flight < 1.0 {
            break;
        }
        if accepted_at.elapsed() > Duration::from_secs(600) {
            bail!("the queue did not empty within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Window {
        rate: n as f64 / took.as_secs_f64(),
        settle_seconds: accepted_at.elapsed().as_secs_f64(),
    })
}

/// Rows the pruner has deleted from `events` so far.
async fn pruned(server: &Server) -> anyhow::Result<f64> {
    let text = server
        .client
        .get(format!("{}/metrics", server.base_url()))
        .send()
        .await?
        .text()
        .await?;
    Ok(gauge(&text, "fluxa_pruned_rows_total{table=\"events\"}").unwrap_or(0.0))
}
